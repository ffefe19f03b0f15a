// Reference CUDA kernels: one thread per output value (or per block for dequantize), the
// shared per-block math of block_math.h, fp32 accumulation in plain order. Slow and obvious;
// every fast kernel is tested against these. This file is compiled with --fmad=false so that
// the dequantized values are the CPU twin's to the bit.
#include <cstdint>

#include "../block_math.h"
#include "../kernels.h"
#include "common.cuh"

namespace lowtune::cuda::reference {

__device__ __forceinline__ float load_act(const void* p, int dtype, int64_t i) {
  if (dtype == D_F32) return static_cast<const float*>(p)[i];
  const uint16_t v = static_cast<const uint16_t*>(p)[i];
  return dtype == D_F16 ? fp16_to_fp32(v) : bf16_to_fp32(v);
}
__device__ __forceinline__ void store_act(void* p, int dtype, int64_t i, float v) {
  if (dtype == D_F32) static_cast<float*>(p)[i] = v;
  else static_cast<uint16_t*>(p)[i] = dtype == D_F16 ? fp32_to_fp16(v) : fp32_to_bf16(v);
}

template <int T>
__global__ void dequant_kernel(const void* w, void* out, int dtype, int64_t nblocks) {
  using Tr = Traits<T>;
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= nblocks) return;
  float v[Tr::kElems];
  Tr::dequant(static_cast<const typename Tr::block*>(w) + i, v);
  for (int e = 0; e < Tr::kElems; ++e) store_act(out, dtype, i * Tr::kElems + e, v[e]);
}

// y[row, col] = sum_k x[row, k] * deq(w)[col, k]; rows strided over gridDim.y.
template <int T>
__global__ void forward_kernel(const void* x, int dtype, const void* w, void* y, int64_t m, int64_t n, int64_t k) {
  using Tr = Traits<T>;
  const int64_t col = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (col >= n) return;
  const auto* wb = static_cast<const typename Tr::block*>(w) + col * (k / Tr::kElems);
  float v[Tr::kElems];
  for (int64_t row = blockIdx.y; row < m; row += gridDim.y) {
    float acc = 0.0f;
    for (int64_t b = 0; b < k / Tr::kElems; ++b) {
      Tr::dequant(wb + b, v);
      for (int e = 0; e < Tr::kElems; ++e) acc += load_act(x, dtype, row * k + b * Tr::kElems + e) * v[e];
    }
    store_act(y, dtype, row * n + col, acc);
  }
}

// dx[row, blk*E + e] = sum_r dy[row, r] * deq(w)[r, blk*E + e]; one thread per block column.
template <int T>
__global__ void input_grad_kernel(const void* dy, int dtype, const void* w, void* dx, int64_t m, int64_t n, int64_t k) {
  using Tr = Traits<T>;
  const int64_t blk = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const int64_t nb = k / Tr::kElems;
  if (blk >= nb) return;
  float acc[Tr::kElems], v[Tr::kElems];
  for (int64_t row = blockIdx.y; row < m; row += gridDim.y) {
    for (int e = 0; e < Tr::kElems; ++e) acc[e] = 0.0f;
    for (int64_t r = 0; r < n; ++r) {
      Tr::dequant(static_cast<const typename Tr::block*>(w) + r * nb + blk, v);
      const float g = load_act(dy, dtype, row * n + r);
      for (int e = 0; e < Tr::kElems; ++e) acc[e] += g * v[e];
    }
    for (int e = 0; e < Tr::kElems; ++e) store_act(dx, dtype, row * k + blk * Tr::kElems + e, acc[e]);
  }
}

static unsigned grid_rows(int64_t m) { return (unsigned)(m < 65535 ? m : 65535); }

static void check_type(int qtype, int64_t k) {
  const BlockInfo bi = block_info(qtype);  // throws for an unknown type
  if (k % bi.elems) throw std::invalid_argument("K is not a multiple of the block size");
}

void dequantize(int qtype, const void* blocks, void* out, int out_dtype, int64_t n, int64_t k, void* stream) {
  check_type(qtype, k);
  const int64_t nblocks = n * (k / block_info(qtype).elems);
  if (nblocks == 0) return;
  dispatch_qtype(qtype, [&]<int T>() {
    dequant_kernel<T><<<(unsigned)((nblocks + 127) / 128), 128, 0, (cudaStream_t)stream>>>(blocks, out, out_dtype, nblocks);
  });
  LT_CUDA_CHECK_LAUNCH();
}

void qmatmul_forward(int qtype, const void* x, int dtype, const void* w, void* y, int64_t m, int64_t n, int64_t k,
                     void* stream) {
  check_type(qtype, k);
  if (m == 0 || n == 0) return;
  dispatch_qtype(qtype, [&]<int T>() {
    dim3 grid((unsigned)((n + 127) / 128), grid_rows(m));
    forward_kernel<T><<<grid, 128, 0, (cudaStream_t)stream>>>(x, dtype, w, y, m, n, k);
  });
  LT_CUDA_CHECK_LAUNCH();
}

void qmatmul_input_grad(int qtype, const void* dy, int dtype, const void* w, void* dx, int64_t m, int64_t n,
                        int64_t k, void* stream) {
  check_type(qtype, k);
  if (m == 0 || k == 0) return;
  const BlockInfo bi = block_info(qtype);
  dispatch_qtype(qtype, [&]<int T>() {
    dim3 grid((unsigned)((k / bi.elems + 127) / 128), grid_rows(m));
    input_grad_kernel<T><<<grid, 128, 0, (cudaStream_t)stream>>>(dy, dtype, w, dx, m, n, k);
  });
  LT_CUDA_CHECK_LAUNCH();
}

}  // namespace lowtune::cuda::reference
