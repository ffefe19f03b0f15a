// Staged-kernel instantiations for the INT45 type group (see instantiate.cuh).
#include "internal.h"
#define LT_INSTANTIATE_TYPES LT_TYPES_INT45
#define LT_INSTANTIATE_STAGED_ONLY
#include "instantiate.cuh"
