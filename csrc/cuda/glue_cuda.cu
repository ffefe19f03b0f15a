// CUDA kernels of csrc/glue_kernels.h (forward only; the formulas they follow are there).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>

#include "../blocks.h"
#include "../glue_kernels.h"
#include "common.cuh"
#include "mma.cuh"  // act_to_f, f_to_act

namespace lowtune::cuda {
namespace {

constexpr int kNormThreads = 256;

// One CTA per row: the sum of squares over the row, then the scaled row (the second pass reads
// the row again, from L1/L2).
template <class T>
__global__ void __launch_bounds__(kNormThreads) rms_norm_kernel(const T* __restrict__ x, const float* __restrict__ w,
                                                                T* __restrict__ y, int64_t dim, float eps) {
  __shared__ float part[kNormThreads / 32];
  const T* xr = x + blockIdx.x * dim;
  T* yr = y + blockIdx.x * dim;
  float s = 0.0f;
  for (int64_t i = threadIdx.x; i < dim; i += kNormThreads) {
    const float v = act_to_f(xr[i]);
    s = fmaf(v, v, s);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int i = 0; i < kNormThreads / 32; ++i) total += part[i];
  const float rstd = rsqrtf(total / (float)dim + eps);
  for (int64_t i = threadIdx.x; i < dim; i += kNormThreads)
    yr[i] = f_to_act<T>(__fmul_rn(__fmul_rn(act_to_f(xr[i]), rstd), w[i]));
}

// One thread per element of y. Dims past d are copied.
template <class T>
__global__ void rope_kernel(const T* __restrict__ x, const float* __restrict__ rot, T* __restrict__ y, int64_t total,
                            int64_t h, int64_t t, int64_t hd, int64_t d, int64_t sb, int64_t sh, int64_t st,
                            bool neox) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t e = i % hd, row = i / hd;  // row = (b, h, t) in that order
  const int64_t tt = row % t, bh = row / t, hh = bh % h, bb = bh / h;
  const int64_t base = bb * sb + hh * sh + tt * st;
  if (e >= d) {
    y[base + e] = x[base + e];
    return;
  }
  const int64_t sw = neox ? (e < d / 2 ? e + d / 2 : e - d / 2) : (e ^ 1);
  const float c = rot[tt * d + e], s = rot[(t + tt) * d + e];
  y[base + e] = f_to_act<T>(__fadd_rn(__fmul_rn(act_to_f(x[base + e]), c), __fmul_rn(act_to_f(x[base + sw]), s)));
}

template <class T>
__global__ void silu_mul_kernel(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ y, int64_t n) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float gf = act_to_f(g[i]);
  const float a = act_to_f(f_to_act<T>(gf / (1.0f + expf(-gf))));
  y[i] = f_to_act<T>(__fmul_rn(a, act_to_f(u[i])));
}

template <class F> void by_dtype(int dtype, F&& f) {
  if (dtype == D_F32) f(float{});
  else if (dtype == D_F16) f(__half{});
  else if (dtype == D_BF16) f(__nv_bfloat16{});
  else throw std::invalid_argument("glue kernels take float32, float16 or bfloat16 activations");
}
unsigned grid_for(int64_t n, int threads) { return (unsigned)((n + threads - 1) / threads); }

}  // namespace

void rms_norm(const void* x, int dtype, const float* w, void* y, int64_t rows, int64_t dim, float eps, void* stream) {
  if (rows == 0) return;
  if (dim <= 0) throw std::invalid_argument("rms_norm: dim must be positive");
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    rms_norm_kernel<T><<<(unsigned)rows, kNormThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), w, static_cast<T*>(y), dim, eps);
  });
  LT_CUDA_CHECK_LAUNCH();
}

void rope(const void* x, int dtype, const float* rot, void* y, int64_t b, int64_t h, int64_t t, int64_t hd,
          int64_t d, int64_t sb, int64_t sh, int64_t st, bool neox, void* stream) {
  const int64_t total = b * h * t * hd;
  if (total == 0) return;
  if (d <= 0 || d > hd || d % 2) throw std::invalid_argument("rope: the rotated dims must be even and at most head_dim");
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    rope_kernel<T><<<grid_for(total, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), rot, static_cast<T*>(y), total, h, t, hd, d, sb, sh, st, neox);
  });
  LT_CUDA_CHECK_LAUNCH();
}

void silu_mul(const void* g, const void* u, int dtype, void* y, int64_t n, void* stream) {
  if (n == 0) return;
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    silu_mul_kernel<T><<<grid_for(n, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(g), static_cast<const T*>(u), static_cast<T*>(y), n);
  });
  LT_CUDA_CHECK_LAUNCH();
}

}  // namespace lowtune::cuda
