// Kernel instantiations for the INT23 type group (see instantiate.cuh).
#include "internal.h"
#define LT_INSTANTIATE_TYPES LT_TYPES_INT23
#define LT_INSTANTIATE_WITHOUT_STAGED  // in inst_staged_int23.cu
#include "instantiate.cuh"
