// Kernel instantiations for the KQUANTS type group (see instantiate.cuh).
#include "internal.h"
#define LT_INSTANTIATE_TYPES LT_TYPES_KQUANTS
#include "instantiate.cuh"
