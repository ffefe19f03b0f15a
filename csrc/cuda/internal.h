// Declarations shared by the CUDA translation units (the kernels are split over several files
// so that they compile in parallel). Host-side only; no device code here.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "../kernels.h"
#include "common.cuh"  // LT_CUDA_CHECK

namespace lowtune::cuda {

// Devices the per-device state (pools, arenas, handles, caches) has room for.
constexpr int kMaxDevices = 64;
// The current device, below kMaxDevices (else std::runtime_error).
int current_device();
// Number of multiprocessors of the current device (cached).
int sm_count();
// Shared memory one CTA of the current device may opt in to, in bytes (cached): every one-row
// product and every decode attention step asks it.
int smem_optin_limit();

// For kernel K on the current device: its dynamic shared-memory limit raised to at least `smem`
// (the opt-in is per device; set even below 48 KiB, where the default leaves out the kernel's
// static shared memory), and how many of its CTAs of `threads` threads one multiprocessor holds
// with `smem` bytes. Asked once per device and size.
template <auto K>
int kernel_ctas(size_t smem, int threads) {
  static std::mutex mu;
  static size_t configured[kMaxDevices] = {};
  static std::map<std::pair<int, size_t>, int> known;
  const int dev = current_device();
  std::lock_guard<std::mutex> lock(mu);
  const auto it = known.find({dev, smem});
  if (it != known.end()) return it->second;
  if (smem > configured[dev]) {
    LT_CUDA_CHECK(cudaFuncSetAttribute(K, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    configured[dev] = smem;
  }
  int per_sm = 0;
  LT_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, K, threads, smem));
  return known[{dev, smem}] = per_sm;
}

// Whether launches use programmatic dependent launch: the current device has it (sm_90+) and
// LOWTUNE_CUDA_PDL is not 0.
bool pdl_supported();

// Launches kernel with programmatic dependent launch where the device has it: it may start while
// the previous kernel in the stream is finishing, so it must execute griddepcontrol.wait (pdl.cuh:
// pdl_wait) before it reads that kernel's output or writes anything. Elsewhere a plain launch.
// launch_cluster: in clusters of `cluster` CTAs (sm_90; dim3(1): no clusters), programmatically where
// `pdl` and the device has it; launch_pdl_cluster: the same with `pdl` true.
template <class... P, class... A>
void launch_cluster(void (*kernel)(P...), dim3 grid, dim3 cluster, dim3 block, size_t smem, cudaStream_t stream,
                    bool pdl, A&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  int n = 0;
  if (pdl && pdl_supported()) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster.x * cluster.y * cluster.z > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n++].val.clusterDim = {cluster.x, cluster.y, cluster.z};
  }
  cfg.attrs = attr;
  cfg.numAttrs = n;
  LT_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...));
}
template <class... P, class... A>
void launch_pdl_cluster(void (*kernel)(P...), dim3 grid, dim3 cluster, dim3 block, size_t smem, cudaStream_t stream,
                        A&&... args) {
  launch_cluster(kernel, grid, cluster, block, smem, stream, true, std::forward<A>(args)...);
}
template <class... P, class... A>
void launch_pdl(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A&&... args) {
  launch_pdl_cluster(kernel, grid, dim3(1), block, smem, stream, std::forward<A>(args)...);
}

// K's attributes on the current device (asked once a device).
template <auto K>
const cudaFuncAttributes& kernel_attributes() {
  static cudaFuncAttributes attributes[kMaxDevices] = {};
  static bool known[kMaxDevices] = {};
  const int dev = current_device();
  if (!known[dev]) {
    LT_CUDA_CHECK(cudaFuncGetAttributes(&attributes[dev], K));
    known[dev] = true;
  }
  return attributes[dev];
}

// Whether K's code for the current device is sm_90's or later (thread block clusters): a build
// for several architectures may run sm_80 code on a newer device.
template <auto K>
bool built_for_sm90() {
  return kernel_attributes<K>().binaryVersion >= 90;
}

// K's static shared memory (its __shared__ variables: barriers, a grid's copy), which counts against the
// opt-in limit beside the dynamic shared memory a launch asks for.
template <auto K>
size_t static_smem() {
  return kernel_attributes<K>().sharedSizeBytes;
}

// Scratch memory: stream-ordered from a memory pool of our own; while the stream is being
// captured into a graph, from an arena every graph shares (qmatmul_cuda.cu says why). Freed in
// stream order, so reuse is safe.
void* scratch_alloc(size_t bytes, cudaStream_t stream);
void scratch_free(void* p, cudaStream_t stream);

// cudaMalloc, also while this thread captures a stream: the thread's capture mode is relaxed for
// the call (as PyTorch's allocator does), since cudaMalloc is refused in the stricter modes.
void* device_malloc(size_t bytes);

// Owns a scratch allocation for one call; freed in stream order when it goes out of scope.
class ScratchBuffer {
 public:
  ScratchBuffer(size_t bytes, cudaStream_t stream)
      : stream_(stream), ptr_(bytes ? scratch_alloc(bytes, stream) : nullptr) {}
  ~ScratchBuffer() { if (ptr_) scratch_free(ptr_, stream_); }
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;
  template <class X> X* as() const { return static_cast<X*>(ptr_); }

 private:
  cudaStream_t stream_;
  void* ptr_;
};

// out[r, c] = deq(W)[row0 + r, col0 + c] for r < nrows, c < ncols, written with leading
// dimension ldo in out_dtype (DType). w points at row 0 of W; col0 and ncols are multiples of
// 32 and of nothing else; w, out and ldo*elemsize must be 16-byte aligned.
template <int T>
void launch_dequant_tile(const uint8_t* w, int64_t row_bytes, int64_t nrows, int64_t col0, int64_t ncols,
                         void* out, int out_dtype, int64_t ldo, cudaStream_t stream);
// The same tile of W' = deq(W) + scale · Bx · Atᵀ (dequant_tile.cuh): bx and at point at the tile's
// first row tile of Bx and first column tile of At, both in fragment order (lowtune.ops.lowrank_ready),
// in out_dtype (bf16 or fp16); rank a multiple of 16.
template <int T>
void launch_dequant_lowrank_tile(const uint8_t* w, int64_t row_bytes, int64_t nrows, int64_t col0, int64_t ncols,
                                 void* out, int out_dtype, int64_t ldo, const void* bx, const void* at, int rank,
                                 float scale, cudaStream_t stream);
// The same tile of W' = deq(W) + scale · a[(row0 + r) / repeat][(col0 + c) / pool] (dequant_tile.cuh):
// a fp32 with rows of lda values; row0 the tile's first row in W.
template <int T>
void launch_dequant_expand_tile(const uint8_t* w, int64_t row_bytes, int64_t nrows, int64_t col0, int64_t ncols,
                                void* out, int out_dtype, int64_t ldo, const float* a, int64_t lda, int pool,
                                int repeat, int64_t row0, float scale, cudaStream_t stream);

// Fused small-M kernels (bf16/fp16 activations): Y = X·deq(W)ᵀ for M <= 32 and dX = dY·deq(W)
// for M <= 16. x and w 16-byte aligned; may split the reduction and add a deterministic reduce pass.
template <int T>
void launch_small_forward(const void* x, int dtype, const uint8_t* w, void* y, int m, int n, int k,
                          int64_t row_bytes, cudaStream_t stream);
template <int T>
void launch_small_input_grad(const void* dy, int dtype, const uint8_t* w, void* dx, int m, int n, int k,
                             int64_t row_bytes, cudaStream_t stream);

// Staged small-M kernels (bf16/fp16 activations, 1 <= M <= 16): the packed weight streams
// through shared memory (staged_gemv.cuh). x/dy, w and y/dx 16-byte aligned.
template <int T>
void launch_staged_forward(const void* x, int dtype, const uint8_t* w, void* y, int m, int n, int k,
                           int64_t row_bytes, cudaStream_t stream);
template <int T>
void launch_staged_input_grad(const void* dy, int dtype, const uint8_t* w, void* dx, int m, int n, int k,
                              int64_t row_bytes, cudaStream_t stream);

// The M = 1 forward on CUDA cores (gemv.cuh) for the types with codes (cuda_policy::has_gemv),
// bf16/fp16 activations; x, w 16-byte aligned; x made by pro's prologue (kernels.h) while it is
// prepared. gemv_fits: x's shared-memory form fits one CTA.
bool gemv_fits(int64_t k);
template <int T>
void launch_gemv(const void* x, int dtype, const uint8_t* w, void* y, int64_t n, int64_t k, int64_t row_bytes,
                 cudaStream_t stream, const GemvPrologue& pro = {});
// The M <= 16 forward with W decoded straight into tensor-core fragments (small_m_regs.cuh), for
// the types with codes; x, w and y 16-byte aligned.
template <int T>
void launch_regs_forward(const void* x, int dtype, const uint8_t* w, void* y, int m, int n, int k, int64_t row_bytes,
                         cudaStream_t stream);
// Its transpose, the M = 1 input gradient (gemv_grad.cuh); dy, w 16-byte aligned.
template <int T>
void launch_gemv_input_grad(const void* dy, int dtype, const uint8_t* w, void* dx, int64_t n, int64_t k,
                            int64_t row_bytes, cudaStream_t stream);
// cuBLAS, opened at run time (never linked): false when no libcublas could be loaded.
// Column-major C[m,n] = alpha·op(A)·op(B) + beta·C, fp32 compute; types are cudaDataType values.
// Each stream the products run on gets its own cuBLAS workspace of LOWTUNE_CUBLAS_WORKSPACE_MB
// (default 8), set explicitly: left to itself, cuBLAS allocates a workspace inside every captured
// graph. Their total bytes and count:
bool cublas_available();
void cublas_workspace_stats(int64_t* bytes, int64_t* count);
void cublas_gemm(bool trans_a, bool trans_b, int m, int n, int k, const void* a, int lda, const void* b, int ldb,
                 void* c, int ldc, int data_type, cudaStream_t stream, float alpha = 1.0f, float beta = 0.0f);

}  // namespace lowtune::cuda
