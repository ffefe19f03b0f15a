// Host side of the M = 1 forward on CUDA cores (gemv.cuh, instantiated per type in inst_*.cu).
#include <cuda_runtime.h>

#include "gemv.cuh"

namespace lowtune::cuda {

// (beside x's form, the largest grid's copy: IQ1_S's 16 KB, gemv.cuh: stage_grid)
bool gemv_fits(int64_t k) {
  constexpr size_t kGridBytes = GridOf<T_IQ1_S>::kPoints * sizeof(GridOf<T_IQ1_S>::Point);
  return k > 0 && k % 32 == 0 && gemv::smem_bytes(k) + kGridBytes <= (size_t)smem_optin_limit();
}

}  // namespace lowtune::cuda
