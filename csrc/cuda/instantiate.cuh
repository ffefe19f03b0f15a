// Explicit instantiations of every kernel family for the types of one group; each inst_*.cu
// file defines LT_INSTANTIATE_TYPES to one group of the type list (blocks.h) and includes this file.
#include "dequant_tile.cuh"
#include "small_m.cuh"

namespace lowtune::cuda {
#define LT_INSTANTIATE(T)                                                                          \
  template void launch_dequant_tile<T>(const uint8_t*, int64_t, int64_t, int64_t, int64_t, void*, int, \
                                       int64_t, cudaStream_t);                                     \
  template void launch_small_forward<T>(const void*, int, const uint8_t*, void*, int, int, int, int64_t, \
                                        cudaStream_t);                                             \
  template void launch_small_input_grad<T>(const void*, int, const uint8_t*, void*, int, int, int, int64_t, \
                                           cudaStream_t);
LT_INSTANTIATE_TYPES(LT_INSTANTIATE)
#undef LT_INSTANTIATE
}  // namespace lowtune::cuda
