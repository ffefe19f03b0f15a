// Kernel instantiations for the INT45 type group (see instantiate.cuh).
#include "internal.h"
#define LT_INSTANTIATE_TYPES LT_TYPES_INT45
#define LT_INSTANTIATE_WITHOUT_STAGED  // in inst_staged_int45.cu
#include "instantiate.cuh"
