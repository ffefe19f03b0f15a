// Kernel instantiations for the LEGACY type group (see instantiate.cuh).
#include "internal.h"
#define LT_INSTANTIATE_TYPES LT_TYPES_LEGACY
#define LT_INSTANTIATE_WITHOUT_STAGED  // in inst_staged_legacy.cu
#include "instantiate.cuh"
