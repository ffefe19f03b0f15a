// The elementwise formulas of the decode glue, as device functions shared by the glue kernels
// (glue_cuda.cu) and the one-row product's preparation of x (gemv.cuh's prepare_kernel), so that a
// norm or SwiGLU's product done inside a product gives the separate kernel's values bit for bit:
//   cta_reduce / cta_sum   a CTA's reduction, warps then their results in a fixed order
//   residual_add           x + r rounded to the dtype (torch's residual add)
//   rms_sq_part            a thread's share of a row's sum of squares, in the vector RMSNorm
//                          kernel's order (16-byte pieces i kNormThreads + thread, in order)
//   rms_scaled             x rstd w, each product rounded, then rounded to the dtype
//   silu_mul_value         silu(g) rounded to the dtype, times u, rounded (torch's two operations)
#pragma once
#include <cstdint>

#include "mma.cuh"  // act_to_f, f_to_act

namespace lowtune::cuda {

constexpr int kNormThreads = 256;  // threads of every CTA that sums a row for RMSNorm

// op over v of the kThreads threads of a CTA, the same in every thread (warp results, then the
// warps' results in a fixed order), through part[kThreads / 32] in shared memory; a second
// reduction through the same part needs a barrier between them.
template <int kThreads, class Op>
__device__ __forceinline__ float cta_reduce(float v, float* part, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = part[0];
#pragma unroll
  for (int i = 1; i < kThreads / 32; ++i) total = op(total, part[i]);
  return total;
}
struct Add {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// The sum of v over the kNormThreads threads of a CTA (the RMSNorm kernels' sum of squares).
__device__ __forceinline__ float cta_sum(float v) {
  __shared__ float part[kNormThreads / 32];
  return cta_reduce<kNormThreads>(v, part, Add{});
}

template <class T>
__device__ __forceinline__ T residual_add(T x, T r) {
  return f_to_act<T>(__fadd_rn(act_to_f(x), act_to_f(r)));
}

// Thread threadIdx.x's share of the sum of squares of a row of dim elements (x + r where r is not
// null), in rms_norm_vec_kernel's order: its 16-byte pieces i kNormThreads + threadIdx.x, each
// element in order, one fmaf each. (16-byte aligned rows, dim a multiple of a piece.)
template <class T>
__device__ __forceinline__ float rms_sq_part(const T* __restrict__ x, const T* __restrict__ r, int64_t dim) {
  constexpr int E = 16 / (int)sizeof(T);
  float ss = 0.0f;
  for (int64_t e0 = (int64_t)threadIdx.x * E; e0 < dim; e0 += (int64_t)kNormThreads * E) {
    uint4 xv = *reinterpret_cast<const uint4*>(x + e0);
    T* xe = reinterpret_cast<T*>(&xv);
    if (r != nullptr) {
      const uint4 rv = *reinterpret_cast<const uint4*>(r + e0);
      const T* re = reinterpret_cast<const T*>(&rv);
#pragma unroll
      for (int e = 0; e < E; ++e) xe[e] = residual_add(xe[e], re[e]);
    }
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const float v = act_to_f(xe[e]);
      ss = fmaf(v, v, ss);
    }
  }
  return ss;
}

template <class T>
__device__ __forceinline__ T rms_scaled(float v, float rstd, float w) {
  return f_to_act<T>(__fmul_rn(__fmul_rn(v, rstd), w));
}

template <class T>
__device__ __forceinline__ T silu_mul_value(T g, T u) {
  const float gf = act_to_f(g);
  const float a = act_to_f(f_to_act<T>(gf / (1.0f + expf(-gf))));
  return f_to_act<T>(__fmul_rn(a, act_to_f(u)));
}

}  // namespace lowtune::cuda
