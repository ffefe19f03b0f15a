// Asynchronous global -> shared copies (sm_80+): the bytes go to shared memory without passing
// through registers, so a thread may have many in flight. Used by the staged kernels' stages and
// by the gemv's copy of x.
#pragma once
#include <cstdint>

namespace lowtune::cuda {

// 16 bytes global -> shared (a shared-space address); src_bytes < 16 copies that many and
// zero-fills the rest (0: nothing is read).
__device__ __forceinline__ void cp_async16(uint32_t smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace lowtune::cuda
