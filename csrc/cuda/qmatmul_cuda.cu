// CUDA entry points (kernels.h): pick a kernel for the shape, dtype and alignment.
//
//   dequantize           the tiled unpack kernel, bit-identical to the CPU twin
//   forward/input grad   bf16/fp16 with M <= small_m_max() (input grad: and M <= 16): the fused
//                        small-M tensor-core kernels (packed weight read once, nothing materialised)
//                        otherwise: W is dequantized in chunks of rows (forward) or columns
//                        (input grad) into one reused scratch buffer in the activation dtype, and
//                        each chunk is multiplied with cuBLAS (opened at run time). Scratch is
//                        bounded by scratch_bytes(), not by the weight's size.
//   fallback             the reference kernels, when cuBLAS cannot be loaded (correct, slow).
// A packed weight that does not start 16-byte aligned is first copied to an aligned scratch
// buffer; activations that are not aligned skip the fused kernels.
//
// Tuning knobs, read on every call (so a benchmark can sweep them):
//   LOWTUNE_CUDA_SMALL_M      largest M for the fused kernels (default 32, at most 32; 0 = never)
//   LOWTUNE_CUDA_SCRATCH_MB   scratch budget of the chunked path in MiB (default 128)
#include <climits>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>

#include "../block_math.h"
#include "../kernels.h"
#include "common.cuh"
#include "internal.h"

namespace lowtune::cuda {

bool available() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

namespace {

constexpr int kMaxDevices = 64;

int current_device() {
  int dev = 0;
  LT_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 0 || dev >= kMaxDevices) throw std::runtime_error("device index out of range");
  return dev;
}

int64_t env_int(const char* name, int64_t fallback) {
  const char* s = std::getenv(name);
  return (s && *s) ? std::atoll(s) : fallback;
}
int64_t small_m_max() { return std::min<int64_t>(env_int("LOWTUNE_CUDA_SMALL_M", 32), 32); }
int64_t scratch_bytes() { return std::max<int64_t>(env_int("LOWTUNE_CUDA_SCRATCH_MB", 128), 1) << 20; }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

int cuda_data_type(int dtype) {  // cudaDataType values (library_types.h)
  switch (dtype) {
    case D_F32: return 0;   // CUDA_R_32F
    case D_F16: return 2;   // CUDA_R_16F
    case D_BF16: return 14; // CUDA_R_16BF
  }
  throw std::invalid_argument("unknown activation dtype " + std::to_string(dtype));
}
int dtype_size(int dtype) { return dtype == D_F32 ? 4 : 2; }

cudaMemPool_t scratch_pool() {
  static std::mutex mu;
  static cudaMemPool_t pools[kMaxDevices] = {};
  const int dev = current_device();
  std::lock_guard<std::mutex> lock(mu);
  if (!pools[dev]) {
    cudaMemPoolProps props = {};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = dev;
    LT_CUDA_CHECK(cudaMemPoolCreate(&pools[dev], &props));
    uint64_t keep = 512ull << 20;  // keep freed scratch (up to 512 MiB) for the next call
    LT_CUDA_CHECK(cudaMemPoolSetAttribute(pools[dev], cudaMemPoolAttrReleaseThreshold, &keep));
  }
  return pools[dev];
}

// The packed weight at a 16-byte aligned address: the pointer itself, or an aligned copy.
class AlignedWeight {
 public:
  AlignedWeight(const void* w, size_t bytes, cudaStream_t stream)
      : copy_(aligned16(w) ? 0 : bytes, stream), ptr_(static_cast<const uint8_t*>(w)) {
    if (copy_.as<void>()) {
      LT_CUDA_CHECK(cudaMemcpyAsync(copy_.as<void>(), w, bytes, cudaMemcpyDeviceToDevice, stream));
      ptr_ = copy_.as<uint8_t>();
    }
  }
  const uint8_t* get() const { return ptr_; }

 private:
  ScratchBuffer copy_;
  const uint8_t* ptr_;
};

// Shape and argument checks shared by the entry points; returns the block geometry.
BlockInfo check_args(int qtype, int dtype, int64_t m, int64_t n, int64_t k) {
  const BlockInfo bi = block_info(qtype);  // throws for an unknown type
  if (k % bi.elems)
    throw std::invalid_argument("K = " + std::to_string(k) + " is not a multiple of the block size " +
                                std::to_string(bi.elems));
  if (m < 0 || n < 0 || k < 0) throw std::invalid_argument("negative size");
  if (m >= INT_MAX || n >= INT_MAX || k >= INT_MAX)
    throw std::invalid_argument("each of M, N, K must be below 2^31 for the CUDA kernels");
  cuda_data_type(dtype);  // validates
  return bi;
}

// Y[:, r0:r0+rows] = X · deq(W[r0:r0+rows])ᵀ for chunks of rows through one scratch buffer.
template <int T>
void chunked_forward(const void* x, int dtype, const uint8_t* w, void* y, int64_t m, int64_t n, int64_t k,
                     int64_t row_bytes, cudaStream_t stream) {
  const int es = dtype_size(dtype);
  int64_t rows = scratch_bytes() / (k * es) / 128 * 128;
  rows = std::min(std::max<int64_t>(rows, 128), n);
  ScratchBuffer scratch((size_t)(rows * k * es), stream);
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t nr = std::min(rows, n - r0);
    launch_dequant_tile<T>(w + r0 * row_bytes, row_bytes, nr, 0, k, scratch.as<void>(), dtype, k, stream);
    // column-major view: Yᵀ[r0:r0+nr, :] (nr x m, ld n) = S (nr x k, stored as k x nr, ld k)ᵀ · Xᵀ (k x m, ld k)
    cublas_gemm(true, false, (int)nr, (int)m, (int)k, scratch.as<void>(), (int)k, x, (int)k,
                static_cast<char*>(y) + r0 * es, (int)n, cuda_data_type(dtype), stream);
  }
}

// dX[:, c0:c0+cols] = dY · deq(W[:, c0:c0+cols]) for chunks of columns through one scratch buffer.
template <int T>
void chunked_input_grad(const void* dy, int dtype, const uint8_t* w, void* dx, int64_t m, int64_t n, int64_t k,
                        int64_t row_bytes, cudaStream_t stream) {
  const int es = dtype_size(dtype);
  int64_t cols = scratch_bytes() / (n * es) / 128 * 128;
  cols = std::min(std::max<int64_t>(cols, 128), k);
  ScratchBuffer scratch((size_t)(cols * n * es), stream);
  for (int64_t c0 = 0; c0 < k; c0 += cols) {
    const int64_t nc = std::min(cols, k - c0);  // a multiple of 32 (K and cols are)
    launch_dequant_tile<T>(w, row_bytes, n, c0, nc, scratch.as<void>(), dtype, nc, stream);
    // column-major: dXᵀ[c0:c0+nc, :] (ld k) = S (nc x n, ld nc) · dYᵀ (n x m, ld n)
    cublas_gemm(false, false, (int)nc, (int)m, (int)n, scratch.as<void>(), (int)nc, dy, (int)n,
                static_cast<char*>(dx) + c0 * es, (int)k, cuda_data_type(dtype), stream);
  }
}

}  // namespace

int sm_count() {
  static int counts[kMaxDevices] = {};
  const int dev = current_device();
  if (!counts[dev]) LT_CUDA_CHECK(cudaDeviceGetAttribute(&counts[dev], cudaDevAttrMultiProcessorCount, dev));
  return counts[dev];
}

void* scratch_alloc(size_t bytes, cudaStream_t stream) {
  void* p = nullptr;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  LT_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture == cudaStreamCaptureStatusActive) LT_CUDA_CHECK(cudaMallocAsync(&p, bytes, stream));
  else LT_CUDA_CHECK(cudaMallocFromPoolAsync(&p, bytes, scratch_pool(), stream));
  return p;
}

void scratch_free(void* p, cudaStream_t stream) {
  if (p) LT_CUDA_CHECK(cudaFreeAsync(p, stream));
}

void dequantize(int qtype, const void* blocks, void* out, int out_dtype, int64_t n, int64_t k, void* stream) {
  const BlockInfo bi = check_args(qtype, out_dtype, 0, n, k);
  if (n == 0 || k == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  const int64_t row_bytes = k / bi.elems * bi.bytes;
  const AlignedWeight w(blocks, (size_t)(n * row_bytes), s);
  if (!aligned16(out)) {  // the fast kernel stores 16 bytes at a time
    reference::dequantize(qtype, w.get(), out, out_dtype, n, k, stream);
    return;
  }
  dispatch_qtype(qtype, [&]<int T>() { launch_dequant_tile<T>(w.get(), row_bytes, n, 0, k, out, out_dtype, k, s); });
}

void qmatmul_forward(int qtype, const void* x, int dtype, const void* w, void* y, int64_t m, int64_t n, int64_t k,
                     void* stream) {
  const BlockInfo bi = check_args(qtype, dtype, m, n, k);
  if (m == 0 || n == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  if (k == 0) {  // empty reduction
    LT_CUDA_CHECK(cudaMemsetAsync(y, 0, (size_t)(m * n * dtype_size(dtype)), s));
    return;
  }
  const int64_t row_bytes = k / bi.elems * bi.bytes;
  const AlignedWeight wa(w, (size_t)(n * row_bytes), s);
  const uint8_t* wb = wa.get();
  if (dtype != D_F32 && m <= small_m_max() && aligned16(x)) {
    dispatch_qtype(qtype, [&]<int T>() { launch_small_forward<T>(x, dtype, wb, y, (int)m, (int)n, (int)k, row_bytes, s); });
  } else if (cublas_available()) {
    dispatch_qtype(qtype, [&]<int T>() { chunked_forward<T>(x, dtype, wb, y, m, n, k, row_bytes, s); });
  } else {
    reference::qmatmul_forward(qtype, x, dtype, wb, y, m, n, k, stream);
  }
}

void qmatmul_input_grad(int qtype, const void* dy, int dtype, const void* w, void* dx, int64_t m, int64_t n,
                        int64_t k, void* stream) {
  const BlockInfo bi = check_args(qtype, dtype, m, n, k);
  if (m == 0 || k == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  if (n == 0) {  // empty reduction
    LT_CUDA_CHECK(cudaMemsetAsync(dx, 0, (size_t)(m * k * dtype_size(dtype)), s));
    return;
  }
  const int64_t row_bytes = k / bi.elems * bi.bytes;
  const AlignedWeight wa(w, (size_t)(n * row_bytes), s);
  const uint8_t* wb = wa.get();
  if (dtype != D_F32 && m <= std::min<int64_t>(small_m_max(), 16)) {
    dispatch_qtype(qtype, [&]<int T>() { launch_small_input_grad<T>(dy, dtype, wb, dx, (int)m, (int)n, (int)k, row_bytes, s); });
  } else if (cublas_available()) {
    dispatch_qtype(qtype, [&]<int T>() { chunked_input_grad<T>(dy, dtype, wb, dx, m, n, k, row_bytes, s); });
  } else {
    reference::qmatmul_input_grad(qtype, dy, dtype, wb, dx, m, n, k, stream);
  }
}

}  // namespace lowtune::cuda
