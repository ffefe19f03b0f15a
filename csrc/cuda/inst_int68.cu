// Kernel instantiations for the INT68 type group (see instantiate.cuh).
#include "internal.h"
#define LT_INSTANTIATE_TYPES LT_TYPES_INT68
#define LT_INSTANTIATE_WITHOUT_STAGED  // in inst_staged_int68.cu
#include "instantiate.cuh"
