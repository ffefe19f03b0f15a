// Kernel instantiations for the MX type group (see instantiate.cuh).
#include "internal.h"
#define LT_INSTANTIATE_TYPES LT_TYPES_MX
#include "instantiate.cuh"
