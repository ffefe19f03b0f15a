// Kernel instantiations for the LOWBIT type group (see instantiate.cuh).
#include "internal.h"
#define LT_INSTANTIATE_TYPES LT_TYPES_LOWBIT
#include "instantiate.cuh"
