// Explicit instantiations of every kernel family for the types of one group; each inst_*.cu
// file defines LT_INSTANTIATE_TYPES to one group of the type list (blocks.h) and includes this file.
#include "../cuda_policy.h"  // has_gemv, checked against the kernels' types
#include "dequant_tile.cuh"
#include "gemv.cuh"
#include "gemv_grad.cuh"
#include "small_m.cuh"
#include "small_m_regs.cuh"
#include "staged_gemv.cuh"

namespace lowtune::cuda {
// The staged kernels compile in files of their own (inst_staged_*.cu) so that a build runs both
// halves in parallel: such a file defines LT_INSTANTIATE_STAGED_ONLY, and a file that leaves the
// staged kernels to one defines LT_INSTANTIATE_WITHOUT_STAGED (neither: everything here).
#ifndef LT_INSTANTIATE_STAGED_ONLY
#define LT_INSTANTIATE(T)                                                                          \
  template void launch_dequant_tile<T>(const uint8_t*, int64_t, int64_t, int64_t, int64_t, void*, int, \
                                       int64_t, cudaStream_t);                                     \
  template void launch_dequant_lowrank_tile<T>(const uint8_t*, int64_t, int64_t, int64_t, int64_t, void*, int, \
                                               int64_t, const void*, const void*, int, float, cudaStream_t); \
  template void launch_dequant_expand_tile<T>(const uint8_t*, int64_t, int64_t, int64_t, int64_t, void*, int, \
                                              int64_t, const float*, int64_t, int, int, int64_t, float, cudaStream_t); \
  template void launch_small_forward<T>(const void*, int, const uint8_t*, void*, int, int, int, int64_t, \
                                        cudaStream_t);                                             \
  template void launch_small_input_grad<T>(const void*, int, const uint8_t*, void*, int, int, int, int64_t, \
                                           cudaStream_t);                                          \
  template void launch_gemv<T>(const void*, int, const uint8_t*, void*, int64_t, int64_t, int64_t, cudaStream_t, \
                               const GemvPrologue&);                                       \
  template void launch_gemv_input_grad<T>(const void*, int, const uint8_t*, void*, int64_t, int64_t, int64_t, \
                                          cudaStream_t);                                           \
  static_assert(cuda_policy::has_gemv(T) == HasCodes<T>, "cuda_policy::has_gemv lists the types with codes");
LT_INSTANTIATE_TYPES(LT_INSTANTIATE)
#undef LT_INSTANTIATE
#endif
#ifndef LT_INSTANTIATE_WITHOUT_STAGED
#define LT_INSTANTIATE(T)                                                                          \
  template void launch_staged_forward<T>(const void*, int, const uint8_t*, void*, int, int, int, int64_t, \
                                         cudaStream_t);                                            \
  template void launch_staged_input_grad<T>(const void*, int, const uint8_t*, void*, int, int, int, int64_t, \
                                            cudaStream_t);                                         \
  template void launch_regs_forward<T>(const void*, int, const uint8_t*, void*, int, int, int, int64_t, cudaStream_t);
LT_INSTANTIATE_TYPES(LT_INSTANTIATE)
#undef LT_INSTANTIATE
#endif
}  // namespace lowtune::cuda
