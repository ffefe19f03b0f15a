// Every CUDA entry point for a build without CUDA (the one place they live): available() is
// false, the rest refuse.
#include <stdexcept>

#include "adapter_kernels.h"
#include "glue_kernels.h"
#include "kernels.h"

namespace lowtune::cuda {
[[noreturn]] static void no_cuda() {
  throw std::runtime_error("lowtune was built without CUDA; rebuild with LOWTUNE_CUDA=ON on a machine with nvcc");
}
bool available() { return false; }
MemoryStats memory_stats() { return {}; }
void scratch_reserve(int64_t, void*) {}
void dequantize(int, const void*, void*, int, int64_t, int64_t, void*) { no_cuda(); }
void qmatmul_forward(int, const void*, int, const void*, void*, int64_t, int64_t, int64_t, void*) { no_cuda(); }
void qmatmul_input_grad(int, const void*, int, const void*, void*, int64_t, int64_t, int64_t, void*) { no_cuda(); }
void qmatmul_forward_lowrank(int, const void*, int, const void*, const LowRankUpdate&, void*, int64_t, int64_t, int64_t,
                             void*) { no_cuda(); }
void qmatmul_input_grad_lowrank(int, const void*, int, const void*, const LowRankUpdate&, void*, int64_t, int64_t,
                                int64_t, void*) { no_cuda(); }
bool qmatmul_forward_one_row(int, const GemvPrologue&, const void*, int, const void*, void*, int64_t, int64_t, void*) {
  no_cuda();
}
void adapter_forward(const AdapterGeom&, const void*, int, const float*, const float*, void*, float*, void*,
                     void*) { no_cuda(); }
void adapter_backward(const AdapterGeom&, const void*, int, const void*, int64_t, const float*, const float*,
                      const float*, void*, float*, float*, float*, void*) { no_cuda(); }
void adapter_pool(const void*, int, void*, int64_t, int64_t, int64_t, void*) { no_cuda(); }
void adapter_dual_products(const void*, int, const void*, const void*, float*, float*, int64_t, int64_t, int64_t,
                           float, void*) { no_cuda(); }
void adapter_rank_update(void*, int, const void*, const void*, int64_t, int64_t, int64_t, bool, float, void*) {
  no_cuda();
}
void rms_norm(const void*, int, const float*, void*, int64_t, int64_t, float, void*, const void*, void*) { no_cuda(); }
bool rms_norm_vectorized(int, int64_t, const void*, const void*, const void*, const void*) { return false; }
void rope(const void*, int, const float*, void*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
          int64_t, bool, void*) { no_cuda(); }
void silu_mul(const void*, const void*, int, void*, int64_t, void*) { no_cuda(); }
void rope_store(const RopeStoreGeom&, const void*, const void*, const void*, int, const float*, void*, void*, void*,
                const int64_t*, void*) { no_cuda(); }
bool decode_attention_fits(int, int64_t, int64_t, int64_t, int64_t) { return false; }
void decode_attention(const void*, const void*, const void*, int, void*, const int64_t*, int64_t, int64_t, int64_t,
                      int64_t, float, void*) { no_cuda(); }
namespace reference {
void dequantize(int, const void*, void*, int, int64_t, int64_t, void*) { no_cuda(); }
void qmatmul_forward(int, const void*, int, const void*, void*, int64_t, int64_t, int64_t, void*) { no_cuda(); }
void qmatmul_input_grad(int, const void*, int, const void*, void*, int64_t, int64_t, int64_t, void*) { no_cuda(); }
}  // namespace reference
}  // namespace lowtune::cuda
