// Kernel instantiations for the KQUANTS type group (see instantiate.cuh).
#include "internal.h"
#define LT_INSTANTIATE_TYPES LT_TYPES_KQUANTS
#define LT_INSTANTIATE_WITHOUT_STAGED  // in inst_staged_kquants.cu
#include "instantiate.cuh"
