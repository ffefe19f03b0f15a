// Kernel instantiations for the IQ43 type group (see instantiate.cuh).
#include "internal.h"
#define LT_INSTANTIATE_TYPES LT_TYPES_IQ43
#include "instantiate.cuh"
