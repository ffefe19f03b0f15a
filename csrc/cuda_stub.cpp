// CUDA entry points for a build without CUDA: available() is false, the rest refuse.
#include <stdexcept>
#include "kernels.h"

namespace lowtune::cuda {
static void no_cuda() {
  throw std::runtime_error("lowtune was built without CUDA; rebuild with LOWTUNE_CUDA=ON on a machine with nvcc");
}
bool available() { return false; }
void dequantize(int, const void*, void*, int, int64_t, int64_t, void*) { no_cuda(); }
void qmatmul_forward(int, const void*, int, const void*, void*, int64_t, int64_t, int64_t, void*) { no_cuda(); }
void qmatmul_input_grad(int, const void*, int, const void*, void*, int64_t, int64_t, int64_t, void*) { no_cuda(); }
namespace reference {
void dequantize(int, const void*, void*, int, int64_t, int64_t, void*) { no_cuda(); }
void qmatmul_forward(int, const void*, int, const void*, void*, int64_t, int64_t, int64_t, void*) { no_cuda(); }
void qmatmul_input_grad(int, const void*, int, const void*, void*, int64_t, int64_t, int64_t, void*) { no_cuda(); }
}  // namespace reference
}  // namespace lowtune::cuda
