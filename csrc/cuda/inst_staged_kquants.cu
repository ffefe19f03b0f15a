// Staged-kernel instantiations for the KQUANTS type group (see instantiate.cuh).
#include "internal.h"
#define LT_INSTANTIATE_TYPES LT_TYPES_KQUANTS
#define LT_INSTANTIATE_STAGED_ONLY
#include "instantiate.cuh"
