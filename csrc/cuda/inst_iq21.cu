// Kernel instantiations for the IQ21 type group (see instantiate.cuh).
#include "internal.h"
#define LT_INSTANTIATE_TYPES LT_TYPES_IQ21
#include "instantiate.cuh"
