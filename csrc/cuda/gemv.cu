// Host side of the M = 1 forward on CUDA cores (gemv.cuh, instantiated per type in inst_*.cu).
#include <cuda_runtime.h>

#include "gemv.cuh"

namespace lowtune::cuda {

bool gemv_fits(int64_t k) {
  return k > 0 && k % 32 == 0 && gemv::smem_bytes(k) <= (size_t)smem_optin_limit();
}

}  // namespace lowtune::cuda
