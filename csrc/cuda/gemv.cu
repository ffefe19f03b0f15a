// Host side of the M = 1 forward on CUDA cores (gemv.cuh, instantiated per type in inst_*.cu).
#include <cuda_runtime.h>

#include "gemv.cuh"

namespace lowtune::cuda {

bool gemv_fits(int64_t k) {
  // asked for every one-row product: the device's shared-memory limit is read once per device
  constexpr int kMaxDevices = 64;
  static int limits[kMaxDevices] = {};  // 0: not read yet
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) return false;
  if (!limits[dev] && cudaDeviceGetAttribute(&limits[dev], cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return false;
  return k > 0 && k % 32 == 0 && gemv::smem_bytes(k) <= (size_t)limits[dev];
}

}  // namespace lowtune::cuda
