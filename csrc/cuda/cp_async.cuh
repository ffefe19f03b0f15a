// Asynchronous global -> shared copies (sm_80+): the bytes go to shared memory without passing
// through registers, so a thread may have many in flight. Used by the staged kernels' stages, by
// the gemv's copy of x and (bulk copies on mbarriers, sm_90) by the streamed gemv's weights; and an
// L2 prefetch (the decode attention's rows).
#pragma once
#include <cstdint>

namespace lowtune::cuda {

// 16 bytes global -> shared (a shared-space address); src_bytes < 16 copies that many and
// zero-fills the rest (0: nothing is read).
__device__ __forceinline__ void cp_async16(uint32_t smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(src_bytes) : "memory");
}
// B (4, 8 or 16) bytes global -> shared through L1 (.ca: sizes below 16; both addresses B-aligned)
template <int B> __device__ __forceinline__ void cp_async_ca(uint32_t smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(smem), "l"(gmem), "n"(B) : "memory");
}
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
// The 128-byte line holding p into L2, nothing returned (so it may run before a PDL wait even where
// the previous kernel writes that line: L2 is where its writes land, and no L1 line is made).
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Bulk copies (sm_90+): one thread moves a run of bytes global -> shared through the copy engine,
// completing on an mbarrier (the streamed gemv's weight stages). The addresses 16-byte aligned, the
// size a multiple of 16. A barrier of count 1: the issuing thread's arrive_expect_tx names the bytes,
// the copies' completion flips its phase; waiters pass a phase's parity.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
// the barriers' init visible to the copy engine (the async proxy) before the first copy
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\nfence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_copy(void* smem, const void* gmem, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   smem_addr(smem)),
               "l"(gmem), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done)
                 : "r"(smem_addr(bar)), "r"(parity)
                 : "memory");
  } while (!done);
}
#endif

}  // namespace lowtune::cuda
