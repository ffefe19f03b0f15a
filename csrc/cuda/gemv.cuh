// The M = 1 forward on CUDA cores with integer dot products (decoding), for every type whose
// values are an affine map of small codes (Unpack<T>::codes): y[n] = sum_k x[k] * deq(W)[n, k],
// bf16 or fp16 activations. cuda_policy::choose sends one-row forwards here ("gemv").
//
// Why not the staged MMA kernels at M = 1: an m16n8k16 tile computes 8 columns where one is used,
// and feeding it costs ~5.7 instructions per weight (BENCHMARKS.md, "What bounds the staged
// small-M forward"), so those kernels are bound by issue, not by memory. Here a lane takes 32
// elements at a time (a "unit": two 16-element spans, Unpack<T>'s unit of decoding) and
//   - x is held as int16: per span xq = rint(x / sigma), sigma = max |x| / 32767 over the span,
//     so |xq| <= 32767 and x's error is at most sigma / 2 (16 bits per span, finer than bf16's 8
//     bits per element); the sum of xq per span is kept beside it;
//   - codes u (bytes of a word, u < 2^8) meet xq in dp2a (two int16 x two bytes, int32 sum):
//     two per four codes, exact; a span's weights are u s + z (codes's affine map), so
//       sum over the span of w x = sigma * (s * sum(u xq) + z * sum(xq)),
//     with the two sums exact integers and the rest one fp32 expression per span.
// Each CTA first writes x into shared memory in that form, in the order lanes read it (a warp's
// 32 units side by side, 16 bytes per lane per load: conflict-free); then its warps take rows.
//
// Error: below the bf16 rounding of each weight that the MMA kernels apply (x to ~2^-16 of its
// span's largest element, the sums exact); tests/test_cuda.py holds both to one tolerance
// against float64.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <stdexcept>
#include <type_traits>

#include "common.cuh"
#include "internal.h"
#include "mma.cuh"     // act_to_f, f_to_act
#include "unpack.cuh"  // Unpack<T>, HasCodes

namespace lowtune::cuda {
namespace gemv {

constexpr int kWarps = 8, kThreads = 32 * kWarps;
constexpr int kInFlight = 4;  // units per lane loaded before any is decoded
constexpr float kXMax = 32767.0f;

// Shared memory per K: x as int16 (64 bytes per 32-element unit, for whole groups of 32 units:
// xs_index's layout) and per unit one float4 (sigma and sum(xq) of its two spans).
__host__ __device__ inline int64_t padded_units(int64_t k) { return (k / 32 + 31) / 32 * 32; }
inline size_t smem_bytes(int64_t k) { return (size_t)padded_units(k) * 64 + (size_t)(k / 32) * 16; }

// Unit u of a block (u < kElems / 32): its two spans start at e0 and e1 = e0 + the distance at
// which Unpack<T> reads the same words again (the low and the high nibbles of the same bytes),
// or the next span where no two spans share words.
template <int T> struct Units {
  using U = Unpack<T>;
  static constexpr int kPerBlock = U::kElems / 32;
  static constexpr int kSame = U::kSameWords;   // 0, 16 or 32
  static constexpr int kGap = kSame ? kSame : 16;
  __device__ static int e0(int u) { return kSame ? 2 * kSame * (u / (kSame / 16)) + 16 * (u % (kSame / 16)) : 32 * u; }
};

// x's shared-memory form: load h (0, 1: span 0's first and last 8 elements; 2, 3: span 1's) of
// unit u is the uint4 xs[((u / 32) * 4 + h) * 32 + u % 32] (so xs spans whole groups of 32 units).
__device__ __forceinline__ int xs_index(int u, int h) { return ((u >> 5) * 4 + h) * 32 + (u & 31); }

__device__ __forceinline__ int dp2a_lo(uint32_t x2, uint32_t codes, int acc) {
  int d;
  asm("dp2a.lo.s32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(x2), "r"(codes), "r"(acc));
  return d;
}
__device__ __forceinline__ int dp2a_hi(uint32_t x2, uint32_t codes, int acc) {
  int d;
  asm("dp2a.hi.s32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(x2), "r"(codes), "r"(acc));
  return d;
}
// sum over a span of u_i xq_i: the codes as bytes of cw[4], xq as int16 pairs in a (elements
// 0..7) and b (8..15)
__device__ __forceinline__ int span_dot(const uint32_t* cw, uint4 a, uint4 b) {
  int d = dp2a_lo(a.x, cw[0], 0);
  d = dp2a_hi(a.y, cw[0], d);
  d = dp2a_lo(a.z, cw[1], d);
  d = dp2a_hi(a.w, cw[1], d);
  d = dp2a_lo(b.x, cw[2], d);
  d = dp2a_hi(b.y, cw[2], d);
  d = dp2a_lo(b.z, cw[3], d);
  return dp2a_hi(b.w, cw[3], d);
}

__device__ __forceinline__ uint32_t pack_xq(float a, float b) {
  return (uint32_t)(uint16_t)(int16_t)__float2int_rn(a) | ((uint32_t)(uint16_t)(int16_t)__float2int_rn(b) << 16);
}

// Unit q of x (its block q / kPerBlock, its spans at e0 and e1 of that block) into xs and aux[q].
template <int T, class ACT>
__device__ void prepare_unit(const ACT* __restrict__ x, int q, uint4* xs, float4* aux) {
  using Un = Units<T>;
  const int first = (q / Un::kPerBlock) * Unpack<T>::kElems + Un::e0(q % Un::kPerBlock);
  float sig[2], sum[2];
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    const ACT* base = x + first + p * Un::kGap;
    float v[16];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint4 raw = reinterpret_cast<const uint4*>(base)[h];  // 8 elements (16-byte aligned: spans start at 16k)
      const ACT* el = reinterpret_cast<const ACT*>(&raw);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[8 * h + i] = act_to_f(el[i]);
    }
    float mx = 0.0f, probe = 0.0f;  // probe: NaN where an element is NaN or infinite
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      mx = fmaxf(mx, fabsf(v[i]));
      probe += 0.0f * v[i];
    }
    const bool finite = probe == 0.0f;
    // xq = rint(x 32767 / mx); below 2^-100 through mx = m 2^e (m in [0.5, 1)), so that 32767 / mx
    // cannot overflow (the common case skips the slow ldexpf); a NaN or infinite element makes
    // sigma NaN, and with it the row's result
    const bool tiny = mx < 0x1p-100f;
    int e = 0;
    const float m = tiny ? frexpf(mx, &e) : mx;
    const float inv = m > 0.0f ? kXMax / m : 0.0f;
    sig[p] = !finite ? __int_as_float(0x7fffffff) : tiny ? ldexpf(m / kXMax, e) : mx / kXMax;
    int s = 0;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      v[i] = finite ? rintf((tiny ? ldexpf(v[i], -e) : v[i]) * inv) : 0.0f;  // |v| <= 32767: |x| <= mx
      s += (int)v[i];
    }
    sum[p] = (float)s;  // |s| <= 16 * 32767: exact
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float* xq = v + 8 * h;
      xs[xs_index(q, 2 * p + h)] = make_uint4(pack_xq(xq[0], xq[1]), pack_xq(xq[2], xq[3]), pack_xq(xq[4], xq[5]),
                                              pack_xq(xq[6], xq[7]));
    }
  }
  aux[q] = make_float4(sig[0], sum[0], sig[1], sum[1]);
}

// Each warp takes rows first, first + stride, ...; a row in rounds of 32 kInFlight units, each
// round's loads issued before any is decoded. (Loading the next round while decoding this one,
// with half the units per round, was slower: BENCHMARKS.md.)
template <int T, class ACT>
__global__ void __launch_bounds__(kThreads) gemv_kernel(const ACT* __restrict__ x, const uint8_t* __restrict__ w,
                                                        ACT* __restrict__ y, int n, int k, int64_t row_bytes) {
  using U = Unpack<T>;
  using Un = Units<T>;
  constexpr int kW = U::template Words<16>::value;  // raw words of one span
  constexpr int kLoads = Un::kSame ? 1 : 2;         // span loads per unit
  using Raw = uint32_t[kInFlight][kLoads * kW];
  extern __shared__ uint4 smem[];
  const int units = k / 32;
  uint4* xs = smem;
  float4* aux = reinterpret_cast<float4*>(smem + 4 * padded_units(k));
  const int lane = threadIdx.x & 31;
  const int first = blockIdx.x * kWarps + (threadIdx.x >> 5), stride = gridDim.x * kWarps;
  // the warp's first row streams into L2 while x is prepared (every CTA prepares at once)
  if (first < n)
    for (int64_t off = 128 * lane; off < row_bytes; off += 32 * 128)
      asm volatile("prefetch.global.L2 [%0];" ::"l"(w + (int64_t)first * row_bytes + off));
  for (int q = threadIdx.x; q < units; q += kThreads) prepare_unit<T>(x, q, xs, aux);
  __syncthreads();

  auto load = [&](int row, int u0, Raw& r) {
    const uint8_t* wrow = w + (int64_t)row * row_bytes;
#pragma unroll
    for (int i = 0; i < kInFlight; ++i) {
      const int u = u0 + 32 * i + lane;
      if (u < units) {
        const uint8_t* b = wrow + (int64_t)(u / Un::kPerBlock) * U::kBytes;
        const int e0 = Un::e0(u % Un::kPerBlock);
        U::template load<16>(b, e0, r[i]);
        if constexpr (kLoads == 2) U::template load<16>(b, e0 + Un::kGap, r[i] + kW);
      }
    }
  };
  float acc = 0.0f;
  auto decode = [&](int u0, const Raw& r) {
#pragma unroll
    for (int i = 0; i < kInFlight; ++i) {
      const int u = u0 + 32 * i + lane;
      if (u >= units) break;
      const int e0 = Un::e0(u % Un::kPerBlock);
      uint32_t cw[4];
      float s, z;
      U::template codes<16>(r[i], e0, cw, s, z);
      const int d0 = span_dot(cw, xs[xs_index(u, 0)], xs[xs_index(u, 1)]);
      const float4 a = aux[u];
      acc = fmaf(a.x, fmaf(s, (float)d0, z * a.y), acc);
      U::template codes<16>(r[i] + (kLoads - 1) * kW, e0 + Un::kGap, cw, s, z);
      const int d1 = span_dot(cw, xs[xs_index(u, 2)], xs[xs_index(u, 3)]);
      acc = fmaf(a.z, fmaf(s, (float)d1, z * a.w), acc);
    }
  };
  auto finish = [&](int row) {  // the row's sum
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) y[row] = f_to_act<ACT>(acc);
    acc = 0.0f;
  };
  for (int row = first; row < n; row += stride) {
    for (int u0 = 0; u0 < units; u0 += 32 * kInFlight) {
      Raw r;
      load(row, u0, r);
      decode(u0, r);
    }
    finish(row);
  }
}

// CTAs of gemv_kernel<T, ACT> one multiprocessor holds with `smem` bytes of shared memory (asked
// once per size; the kernel's shared-memory limit is raised as K needs).
template <int T, class ACT>
int resident_ctas(size_t smem) {
  static std::mutex mu;
  static size_t configured = 48 * 1024;
  static std::map<size_t, int> known;
  std::lock_guard<std::mutex> lock(mu);
  const auto it = known.find(smem);
  if (it != known.end()) return it->second;
  if (smem > configured) {
    LT_CUDA_CHECK(cudaFuncSetAttribute(gemv_kernel<T, ACT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       (int)smem));
    configured = smem;
  }
  int per_sm = 0;
  LT_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, gemv_kernel<T, ACT>, kThreads, smem));
  return known[smem] = per_sm;
}

}  // namespace gemv

template <int T>
void launch_gemv(const void* x, int dtype, const uint8_t* w, void* y, int64_t n, int64_t k, int64_t row_bytes,
                 cudaStream_t stream) {
  if constexpr (!HasCodes<T>) {
    throw std::invalid_argument("gemv: this type has no codes kernel (cuda_policy::has_gemv)");
  } else {
    static_assert(Unpack<T>::kElems % 32 == 0, "units of 32 elements");
    const size_t smem = gemv::smem_bytes(k);
    auto launch = [&](auto tag) {
      using ACT = decltype(tag);
      const int per_sm = gemv::resident_ctas<T, ACT>(smem);
      if (per_sm < 1) throw std::runtime_error("gemv: no CTA fits for this K");
      const int64_t want = (n + gemv::kWarps - 1) / gemv::kWarps;
      const int grid = (int)std::min<int64_t>(want, (int64_t)per_sm * sm_count());
      gemv::gemv_kernel<T, ACT><<<grid, gemv::kThreads, smem, stream>>>(
          static_cast<const ACT*>(x), w, static_cast<ACT*>(y), (int)n, (int)k, row_bytes);
    };
    if (dtype == D_BF16) launch(__nv_bfloat16{});
    else if (dtype == D_F16) launch(__half{});
    else throw std::invalid_argument("gemv takes bfloat16 or float16 activations");
    LT_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace lowtune::cuda
