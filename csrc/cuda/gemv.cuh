// The M = 1 forward on CUDA cores with integer dot products (decoding), for every type whose
// values are an affine map of small codes (Unpack<T>::codes; for the 4-bit table types IQ4_NL,
// IQ4_XS and MXFP4 the codes are their levels + 128): y[n] = sum_k x[k] * deq(W)[n, k], bf16 or
// fp16 activations. cuda_policy::choose sends one-row forwards here ("gemv").
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
// prepare_kernel writes x in that form once per product, in the order lanes read it (a warp's 32
// units side by side, 16 bytes per lane per load: conflict-free); each CTA of gemv_kernel copies
// it into shared memory, then its warps take rows, one at a time (gemv_kernel) or two
// (gemv_rows_kernel: one read of x for both; gemv_stream_kernel: the same with the weights streamed
// into shared memory by bulk copies). All launch with programmatic dependent launch (launch_pdl), so
// that a kernel's start overlaps the previous one's end.
//
// Error: below the bf16 rounding of each weight that the MMA kernels apply (x to ~2^-16 of its
// span's largest element, the sums exact); tests/test_cuda.py holds both to one tolerance
// against float64.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <type_traits>

#include "../cuda_policy.h"  // gemv_rows_per_warp
#include "common.cuh"
#include "cp_async.cuh"
#include "glue_math.cuh"  // the prologues' formulas
#include "internal.h"
#include "mma.cuh"     // act_to_f, f_to_act
#include "pdl.cuh"
#include "unpack.cuh"  // Unpack<T>, HasCodes

namespace lowtune::cuda {
namespace gemv {

namespace cg = cooperative_groups;

constexpr int kWarps = 8, kThreads = 32 * kWarps;
constexpr int kInFlight = 4;  // units per lane loaded before any is decoded
constexpr float kXMax = 32767.0f;

// Shared memory per K: x as int16 (64 bytes per 32-element unit, for whole groups of 32 units:
// xs_index's layout) and per unit one float4 (sigma and sigma sum(xq) of its two spans).
__host__ __device__ inline int64_t padded_units(int64_t k) { return (k / 32 + 31) / 32 * 32; }
__host__ __device__ inline size_t smem_bytes(int64_t k) { return (size_t)padded_units(k) * 64 + (size_t)(k / 32) * 16; }

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

// a warp's sum of v, in every lane (one order of addition in every kernel: the same bits)
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ uint32_t pack_xq(float a, float b) {
  return (uint32_t)(uint16_t)(int16_t)__float2int_rn(a) | ((uint32_t)(uint16_t)(int16_t)__float2int_rn(b) << 16);
}

// x's form (xs_index's layout, then aux) in global memory, once per product: four threads per
// unit, each taking 8 elements of one span (lanes 2i and 2i + 1 share a span: its max, NaN probe
// and sum go across the pair). Units from K / 32 up to padded_units(K) get zero codes. (Each CTA
// preparing all of x cost 2.4 µs of 14 at K = 4096 and 6 µs of 19 at K = 14336: BENCHMARKS.md.)
// P (GemvPrologue) makes x from the previous glue's inputs first; for the norm every CTA sums the
// whole row itself (K <= 8192: at most 16 KB, from L2), in the RMSNorm kernel's order. With `early`
// the norm's weights, a parameter and never the previous kernel's output, are loaded before the PDL
// wait (they have left L2 since the last token: a memory round trip off the step's critical path).
template <int T, class ACT, int P>
__global__ void __launch_bounds__(kThreads) prepare_kernel(const ACT* __restrict__ x, int k, uint4* __restrict__ form,
                                                           GemvPrologue pro, bool early) {
  using Un = Units<T>;
  static_assert(kThreads == kNormThreads, "the fused norm sums a row as the RMSNorm kernel does");
  pdl_launch_dependents();
  const int units = k / 32, t = blockIdx.x * kThreads + threadIdx.x;
  const int q = t >> 2, p = (t >> 1) & 1, h = t & 1;
  const bool on = q < units;
  const int first = on ? (q / Un::kPerBlock) * Unpack<T>::kElems + Un::e0(q % Un::kPerBlock) + p * Un::kGap + 8 * h : 0;
  float wv[8];
  auto load_w = [&] {
#pragma unroll
    for (int i = 0; i < 8; ++i) wv[i] = pro.w[first + i];
  };
  if constexpr (P == GemvPrologue::AddRmsNorm)
    if (early && on) load_w();
  pdl_wait();  // x is the previous kernel's output
  const ACT* b = static_cast<const ACT*>(pro.b);
  float rstd = 0.0f;
  if constexpr (P == GemvPrologue::AddRmsNorm) rstd = rsqrtf(cta_sum(rms_sq_part(x, b, k)) / (float)k + pro.eps);
  float v[8];
  if (on) {
    uint4 raw = *reinterpret_cast<const uint4*>(x + first);  // 16-byte aligned: spans start at 16k
    ACT* el = reinterpret_cast<ACT*>(&raw);
    if (P != GemvPrologue::None && b != nullptr) {
      const uint4 braw = *reinterpret_cast<const uint4*>(b + first);
      const ACT* be = reinterpret_cast<const ACT*>(&braw);
#pragma unroll
      for (int i = 0; i < 8; ++i)
        el[i] = P == GemvPrologue::SiluMul ? silu_mul_value(el[i], be[i]) : residual_add(el[i], be[i]);
      if (P == GemvPrologue::AddRmsNorm)
        *reinterpret_cast<uint4*>(static_cast<ACT*>(pro.s) + first) = raw;  // x + b: the residual stream
    }
    if constexpr (P == GemvPrologue::AddRmsNorm) {
      if (!early) load_w();
#pragma unroll
      for (int i = 0; i < 8; ++i) el[i] = rms_scaled<ACT>(act_to_f(el[i]), rstd, wv[i]);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = act_to_f(el[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = 0.0f;
  }
  float mx = 0.0f, probe = 0.0f;  // probe: NaN where an element is NaN or infinite
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    mx = fmaxf(mx, fabsf(v[i]));
    probe += 0.0f * v[i];
  }
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  probe += __shfl_xor_sync(0xffffffffu, probe, 1);
  const bool finite = probe == 0.0f;
  // xq = rint(x 32767 / mx); below 2^-100 through mx = m 2^e (m in [0.5, 1)), so that 32767 / mx
  // cannot overflow (the common case skips the slow ldexpf); a NaN or infinite element makes
  // sigma NaN, and with it the row's result
  const bool tiny = mx < 0x1p-100f;
  int e = 0;
  const float m = tiny ? frexpf(mx, &e) : mx;
  const float inv = m > 0.0f ? kXMax / m : 0.0f;
  const float sig = !finite ? __int_as_float(0x7fffffff) : tiny ? ldexpf(m / kXMax, e) : mx / kXMax;
  int s = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    v[i] = finite ? rintf((tiny ? ldexpf(v[i], -e) : v[i]) * inv) : 0.0f;  // |v| <= 32767: |x| <= mx
    s += (int)v[i];
  }
  s += __shfl_xor_sync(0xffffffffu, s, 1);  // |s| <= 16 * 32767: exact
  if (q < padded_units(k))
    form[xs_index(q, 2 * p + h)] = make_uint4(pack_xq(v[0], v[1]), pack_xq(v[2], v[3]), pack_xq(v[4], v[5]),
                                              pack_xq(v[6], v[7]));
  if (on && h == 0)  // aux[q] = (sigma0, sigma0 sum0, sigma1, sigma1 sum1): span p's pair
    reinterpret_cast<float2*>(form + 4 * padded_units(k))[2 * q + p] = make_float2(sig, sig * (float)s);
}

// Types with one (s, z) per block of 32 or more elements (the legacy types and INTb-gG): a unit's
// two spans share it. (The K-quants scale each sub-block of 16 or 32 on its own.)
template <int B, int G> std::true_type is_unpack_int(const UnpackInt<B, G>*);
std::false_type is_unpack_int(const void*);
template <int T>
constexpr bool kOneScale = Unpack<T>::kElems == QK || decltype(is_unpack_int((const Unpack<T>*)nullptr))::value;

// Q4_K (and Q5_K's scale format): the six-bit scales and mins of sub-blocks j and j + 1 (j even)
// from the twelve scale bytes as words s[0..2] (scale_min_k4_words' layout), as the bytes of one
// word: scale j, scale j + 1, min j, min j + 1. The selectors depend on j only (constant per lane:
// hoisted out of the loops), so both cases cost ~9 instructions a unit and no branch.
__device__ __forceinline__ uint32_t scale_min_pair_k4(const uint32_t* s, int j) {
  const uint32_t jp = (uint32_t)(j & 3);  // byte of the words: 0 or 2
  const uint32_t b01 = __byte_perm(s[0], s[1], jp * 0x1111u + 0x5410u);  // s0.b[jp, jp+1], s1.b[jp, jp+1]
  const uint32_t b2 = __byte_perm(s[2], 0u, jp * 0x1111u + 0x1010u);     // s2.b[jp, jp+1] twice
  // j < 4: the low six bits; else the low four from s2's nibbles (low: scales, high: mins) and the
  // top two from bits 6-7 of b01 (both computed: a select, not a branch that splits the warp)
  const uint32_t lo = b01 & 0x3F3F3F3Fu;
  const uint32_t hi = (b2 & 0x00000F0Fu) | ((b2 >> 4) & 0x0F0F0000u) | ((b01 >> 2) & 0x30303030u);
  return j < 4 ? lo : hi;
}

// Where a lane's units are (see gemv_kernel): its spans' e in every block it reads, its x (xs_index(u,
// h) = xl[4 (u - lane) + 32 h]) and aux (al[u - lane]).
struct LaneUnits {
  int e0, e1;
  const uint4* xl;
  const float4* al;
};

// acc plus the sum of one unit: its raw words r, its x at xu (xs_index(u, h) = xu[XS h]: XS = 32 in
// shared memory, 1 where a caller holds the unit's four loads), a = aux[u] (sigma0, sigma0 sum(xq0),
// sigma1, sigma1 sum(xq1)).
template <int T, int XS = 32>
__device__ __forceinline__ float unit_sum(const uint32_t* r, const LaneUnits& l, const uint4* xu, float4 a, float acc) {
  using U = Unpack<T>;
  constexpr int kW = U::template Words<16>::value;
  constexpr int kLoads = Units<T>::kSame ? 1 : 2;
  uint32_t cw[4];
  if constexpr (T == T_Q4_K || T == T_Q5_K) {
    // one head for both spans (sub-blocks j, j + 1 of chunk j / 2: low and high nibbles). Q4_K: the
    // high nibbles meet xq unshifted (16 u per byte; the sum < 2^31) and their sum is shifted back
    // (exact: a multiple of 16). Q5_K: the fifth bits, bits 2j and 2j + 1 of the qh bytes, rotated to
    // bit 4 of each byte (a rotation keeps each byte's bits in its byte). sc_j D_j < 63 * 16 * 31 *
    // 32767: exact in int32.
    const uint32_t* q = r + 4;
    const int j2 = l.e0 >> 5;  // 2j
    const uint32_t sm = scale_min_pair_k4(r + 1, j2);
    int d0, d1;
    if constexpr (T == T_Q4_K) {
#pragma unroll
      for (int t = 0; t < 4; ++t) cw[t] = q[t] & 0x0F0F0F0Fu;
      d0 = span_dot(cw, xu[0], xu[XS]);
#pragma unroll
      for (int t = 0; t < 4; ++t) cw[t] = q[t] & 0xF0F0F0F0u;
      d1 = span_dot(cw, xu[2 * XS], xu[3 * XS]) >> 4;
    } else {
      const uint32_t* qh = r + 8;
#pragma unroll
      for (int t = 0; t < 4; ++t)
        cw[t] = (q[t] & 0x0F0F0F0Fu) | (__funnelshift_r(qh[t], qh[t], (j2 - 4) & 31) & 0x10101010u);
      d0 = span_dot(cw, xu[0], xu[XS]);
#pragma unroll
      for (int t = 0; t < 4; ++t)
        cw[t] = ((q[t] >> 4) & 0x0F0F0F0Fu) | (__funnelshift_r(qh[t], qh[t], (j2 - 3) & 31) & 0x10101010u);
      d1 = span_dot(cw, xu[2 * XS], xu[3 * XS]);
    }
    const float d = half_f(r[0] & 0xFFFF), dmin = half_f(r[0] >> 16);
    const float sd = fmaf(a.z, (float)(d1 * (int)__byte_perm(sm, 0u, 0x4441u)),
                          a.x * (float)(d0 * (int)__byte_perm(sm, 0u, 0x4440u)));
    const float sm_ = fmaf(a.w, byte_f(sm, 3), a.y * byte_f(sm, 2));
    return fmaf(d, sd, fmaf(-dmin, sm_, acc));
  } else if constexpr (T == T_Q2_K) {
    // both spans (shifts s and s + 1, s even: the two halves of one nibble of each byte) with the
    // block's d and dmin once, and their 4-bit scales and mins (bytes t and t + 2 of the scale window)
    // as integers: sc D < 15 * 16 * 3 * 32767, exact in int32. The second span's codes meet xq
    // unshifted (4 u per byte) and its sum is shifted back (exact: a multiple of 4).
    const uint32_t* q = r + 2;
    const int s = (l.e0 >> 5) & 3;
    const uint32_t sb = r[1] >> (8 * ((l.e0 >> 4) & 1));  // byte 0: span s's scale and min, byte 2: s + 1's
#pragma unroll
    for (int t = 0; t < 4; ++t) cw[t] = (q[t] >> (2 * s)) & 0x03030303u;
    const int d0 = span_dot(cw, xu[0], xu[XS]);
#pragma unroll
    for (int t = 0; t < 4; ++t) cw[t] = (q[t] >> (2 * s)) & 0x0C0C0C0Cu;
    const int d1 = span_dot(cw, xu[2 * XS], xu[3 * XS]) >> 2;
    const float d = half_f(r[0] & 0xFFFF), dmin = half_f(r[0] >> 16);
    const float sd = fmaf(a.z, (float)(d1 * (int)((sb >> 16) & 0xF)), a.x * (float)(d0 * (int)(sb & 0xF)));
    const float smn = fmaf(a.w, code_f((sb >> 20) & 0xF), a.y * code_f((sb >> 4) & 0xF));
    return fmaf(d, sd, fmaf(-dmin, smn, acc));
  } else if constexpr (T == T_Q3_K) {
    // as Q2_K's: shifts s and s + 1 (s even) from one nibble of each qs byte, the hmask bits 4h + s and
    // 4h + s + 1 rotated into place (bit 2 of the first span's codes, bit 4 of the second's, which meets
    // xq unshifted: 4 u per byte), d once, and the six-bit scales less 32 as integers (bytes t and
    // t + 2 of both scale windows): x = d sc (u - 4), so a span adds d sc (sum(u xq) - 4 sum(xq)).
    // sc D < 32 * 16 * 28 * 32767: exact in int32.
    const uint32_t *q = r + 3, *hm = r + 7;
    const int h = l.e0 >> 7, s = (l.e0 >> 5) & 3, hbit = 4 * h + s, sh = 8 * ((l.e0 >> 4) & 1);
    const uint32_t lo = r[1] >> sh, hi = r[2] >> (sh + 2 * (2 * h + (s >> 1)));
    const int sc0 = (int)((h ? (lo >> 4) & 0xF : lo & 0xF) | ((hi & 3) << 4)) - 32;
    const int sc1 = (int)((h ? (lo >> 20) & 0xF : (lo >> 16) & 0xF) | (((hi >> 16) & 3) << 4)) - 32;
#pragma unroll
    for (int t = 0; t < 4; ++t)
      cw[t] = ((q[t] >> (2 * s)) & 0x03030303u) | (__funnelshift_r(hm[t], hm[t], (hbit - 2) & 31) & 0x04040404u);
    const int d0 = span_dot(cw, xu[0], xu[XS]);
#pragma unroll
    for (int t = 0; t < 4; ++t)
      cw[t] = ((q[t] >> (2 * s)) & 0x0C0C0C0Cu) | (__funnelshift_r(hm[t], hm[t], (hbit - 3) & 31) & 0x10101010u);
    const int d1 = span_dot(cw, xu[2 * XS], xu[3 * XS]) >> 2;
    const float sd = fmaf(a.z, (float)(d1 * sc1), a.x * (float)(d0 * sc0));
    const float so = fmaf(a.w, (float)sc1, a.y * (float)sc0);
    return fmaf(half_f((uint16_t)r[0]), fmaf(-4.0f, so, sd), acc);
  } else if constexpr (HasCodes2<T>) {
    // the table types: both spans' codes from one lookup of each word, and one (s, z) for both
    float s, z;
    uint32_t cw1[4];
    U::template codes2<16>(r, l.e0, cw, cw1, s, z);
    const int d0 = span_dot(cw, xu[0], xu[XS]);
    const int d1 = span_dot(cw1, xu[2 * XS], xu[3 * XS]);
    return fmaf(s, fmaf(a.z, (float)d1, a.x * (float)d0), fmaf(z, a.y + a.w, acc));
  } else if constexpr (kOneScale<T>) {
    // both spans' (s, z) are the block's: s (sigma0 D0 + sigma1 D1) + z (sigma0 S0 + sigma1 S1)
    float s, z, s1, z1;
    U::template codes<16>(r, l.e0, cw, s, z);
    const int d0 = span_dot(cw, xu[0], xu[XS]);
    U::template codes<16>(r + (kLoads - 1) * kW, l.e1, cw, s1, z1);  // s1, z1: s, z again
    const int d1 = span_dot(cw, xu[2 * XS], xu[3 * XS]);
    return fmaf(s, fmaf(a.z, (float)d1, a.x * (float)d0), fmaf(z, a.y + a.w, acc));
  } else {
    // per span: sigma (s sum(u xq) + z sum(xq)) = s (sigma sum(u xq)) + z (sigma sum(xq)) (sigma
    // times the integer sums first: sigma s could fall below the normal range for tiny x)
    float s, z;
    U::template codes<16>(r, l.e0, cw, s, z);
    const int d0 = span_dot(cw, xu[0], xu[XS]);
    acc = fmaf(s, a.x * (float)d0, fmaf(z, a.y, acc));
    U::template codes<16>(r + (kLoads - 1) * kW, l.e1, cw, s, z);
    const int d1 = span_dot(cw, xu[2 * XS], xu[3 * XS]);
    return fmaf(s, a.z * (float)d1, fmaf(z, a.w, acc));
  }
}

// Q4_0's and IQ4_NL's 18-byte, Q5_0's 22-byte and Q8_0's 34-byte blocks (a 2-byte d, then NQ = 4, 5
// or 8 words: Q5_0's first is qh) are only 2-byte aligned, and Unpack's loads read them 2 bytes at a
// time (9, 22 and 18 loads a unit). round_sum reads the NQ + 1 aligned words around a block instead,
// w[0..NQ] from the block's start (the last a 2-byte load there: not past the block) or from 2 before
// it (odd); this turns them into d and the words after it, and for Q5_0 and Q8_0 (two spans a unit)
// into load's layout of both spans.
template <int T>
__device__ __forceinline__ void legacy_words(uint32_t* w, bool odd) {
  constexpr int NQ = Unpack<T>::kBytes / 4;
  const uint32_t d = odd ? w[0] >> 16 : w[0] & 0xFFFFu;
#pragma unroll
  for (int j = NQ; j >= 1; --j) w[j] = __funnelshift_rc(w[j - 1], w[j], odd ? 32 : 16);
  w[0] = d;
  if constexpr (NQ == 8) {  // d, q0..q7 -> d, q0..q3, d, q4..q7
#pragma unroll
    for (int j = 9; j >= 6; --j) w[j] = w[j - 1];
    w[5] = d;
  } else if constexpr (T == T_Q5_0) {  // d, qh, q0..q3 -> the same again for the unit's second span
#pragma unroll
    for (int j = 0; j < 6; ++j) w[6 + j] = w[j];
  }
}

// MXFP4's 17-byte blocks are only byte-aligned, and Unpack's loads read them a byte at a time (17
// loads a unit). round_sum reads the five aligned words around a block instead, from `mis` (its
// address mod 4) bytes before it; the fifth only up to the block's last byte (a tensor's last block
// may end inside it). This turns them into load's layout, e and the four code words (both spans').
__device__ __forceinline__ void mxfp4_words(uint32_t* w, int mis) {
  uint32_t q[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) q[j] = __funnelshift_rc(w[j], w[j + 1], 8 * (mis + 1));
  w[0] = (w[0] >> (8 * mis)) & 0xFFu;
#pragma unroll
  for (int j = 0; j < 4; ++j) w[1 + j] = q[j];
}

// Two runs of 4 NW bytes at a and c (2-byte aligned) as aligned words, r[0 .. NW] and r[NW + 1 .. 2 NW + 1]:
// from 2 bytes before each where odd (a block at the tensor's offset 0 never is), the last word only
// then (both runs end at least 2 bytes before their block does). q6k_words places them.
template <int NW>
__device__ __forceinline__ void two_runs(const uint8_t* a, const uint8_t* c, bool odd, uint32_t* r) {
  const uint32_t* wa = reinterpret_cast<const uint32_t*>(a - (odd ? 2 : 0));
  const uint32_t* wc = reinterpret_cast<const uint32_t*>(c - (odd ? 2 : 0));
#pragma unroll
  for (int j = 0; j < NW; ++j) {
    r[j] = wa[j];
    r[NW + 1 + j] = wc[j];
  }
  r[NW] = odd ? wa[NW] : 0u;
  r[2 * NW + 1] = odd ? wc[NW] : 0u;
}

// Q6_K's 210-byte blocks are only 2-byte aligned, and Unpack's loads read a span in 18 loads (d, its
// scale, eight 2-byte halves each of ql and qh), 36 a unit. round_sum reads the unit's two 32-byte
// code arrays (both spans side by side) as nine aligned words each, r[0..8] and r[9..17] (from 2
// before them where odd; the ninth only then), d as r[18] and the two spans' scale bytes as one 2-byte
// load, r[19]: 20 loads. This puts them in load's layout, span e0 then e1: d, the span's scale byte,
// the first array's 16 bytes, the second's.
__device__ __forceinline__ void q6k_words(uint32_t* r, bool odd) {
  constexpr int S = 10;  // words a span
  const int sh = odd ? 16 : 0;
  uint32_t out[2 * S];
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    out[S * p] = r[18];
    out[S * p + 1] = p ? r[19] >> 8 : r[19] & 0xFFu;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      out[S * p + 2 + j] = __funnelshift_r(r[4 * p + j], r[4 * p + j + 1], sh);
      out[S * p + 6 + j] = __funnelshift_r(r[9 + 4 * p + j], r[9 + 4 * p + j + 1], sh);
    }
  }
#pragma unroll
  for (int j = 0; j < 2 * S; ++j) r[j] = out[j];
}

// Q3_K's 110-byte blocks are only 2-byte aligned too. A unit (spans e0 and e0 + 32: shifts s and s + 1
// of the same 16 qs and 16 hmask bytes, Unpack's kSameWords) is read as five aligned words of each
// array, r[0..4] and r[5..9] (from 2 before them where odd; the fifth only then), d as r[10] and the
// two four-byte scale windows as r[11], r[12] (two 2-byte loads each): 15 loads, against 21 for a
// unit of one shift's 32 bytes of each array. This puts them in load's layout.
__device__ __forceinline__ void q3k_words(uint32_t* r, bool odd) {
  const int sh = odd ? 16 : 0;
  uint32_t out[11];
  out[0] = r[10], out[1] = r[11], out[2] = r[12];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    out[3 + j] = __funnelshift_r(r[j], r[j + 1], sh);
    out[7 + j] = __funnelshift_r(r[5 + j], r[6 + j], sh);
  }
#pragma unroll
  for (int j = 0; j < 11; ++j) r[j] = out[j];
}

// A unit's words as round_load left them, put where Unpack<T> reads them: the types that round_load
// reads as aligned words. odd: the 2-byte-aligned types' block starts 2 bytes into a word; MXFP4's
// blocks start anywhere: block is the unit's block (or one at the same address mod 4). (odd is the
// callers' own: derived here from block, ptxas gave Q4_0's persistent gemv an 8-byte spill.)
template <int T>
__device__ __forceinline__ void place_words(uint32_t* r, bool odd, const uint8_t* block) {
  if constexpr (T == T_Q4_0 || T == T_Q5_0 || T == T_Q8_0 || T == T_IQ4_NL) legacy_words<T>(r, odd);
  if constexpr (T == T_Q3_K) q3k_words(r, odd);
  if constexpr (T == T_Q6_K) q6k_words(r, odd);
  if constexpr (T == T_MXFP4) mxfp4_words(r, (int)(reinterpret_cast<uintptr_t>(block) & 3));
}

// A round: units u0 + 32 i + lane (i < N) of a row, the lane's first of them in the block at b, the
// rest kStep bytes apart. round_load issues all of its loads into r, round_decode then adds their
// sums to acc (round_sum: both). kCheck (a row's last round where 32 kInFlight does not divide
// K / 32): units at or past `units` are skipped. A unit holds its words in load's layout (once where
// its spans share them), or Q3_K's 13 raw words before q3k_words places them.
template <int T>
constexpr int kRoundWords = T == T_Q3_K ? 13 : (Units<T>::kSame ? 1 : 2) * Unpack<T>::template Words<16>::value;

// kLoad, kDecode: which halves of the round run (round_load, round_decode, round_sum: both). One
// function for both halves: with two, ptxas gave the persistent loop different registers (8 bytes
// of spills for Q4_0 and INT6-g32); this way its PTX is what it was before the one-row kernel.
template <int T, int N, bool kCheck, bool kLoad, bool kDecode>
__device__ __forceinline__ float round_impl(const uint8_t* b, int u0, int units, const LaneUnits& l,
                                            uint32_t (&r)[N][kRoundWords<T>], float acc) {
  using U = Unpack<T>;
  using Un = Units<T>;
  constexpr int kW = U::template Words<16>::value;
  constexpr int kLoads = Un::kSame ? 1 : 2;
  constexpr int kStep = 32 / Un::kPerBlock * U::kBytes;
  const int lane = threadIdx.x & 31;
  const bool odd = (reinterpret_cast<uintptr_t>(b) & 2) != 0;  // the 2-byte-aligned types: a lane's blocks share it
  if constexpr (kLoad) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (kCheck && u0 + 32 * i + lane >= units) continue;
      // every block starts kAlign-aligned (16-byte aligned tensor): the compiler may widen loads
      const auto* bi = static_cast<const uint8_t*>(__builtin_assume_aligned(b + i * kStep, U::kAlign));
      if constexpr (T == T_Q4_K || T == T_Q5_K) {  // Unpack<T>::load<16>(bi, e0) in 16-byte loads
        constexpr int kQs = T == T_Q4_K ? 16 : 48;  // Q5_K: qh[32] before qs
        const uint4 head = *reinterpret_cast<const uint4*>(bi);
        const uint4 q = *reinterpret_cast<const uint4*>(bi + kQs + 32 * (l.e0 >> 6) + (l.e0 & 31));
        r[i][0] = head.x; r[i][1] = head.y; r[i][2] = head.z; r[i][3] = head.w;
        r[i][4] = q.x; r[i][5] = q.y; r[i][6] = q.z; r[i][7] = q.w;
        if constexpr (T == T_Q5_K) {
          const uint4 qh = *reinterpret_cast<const uint4*>(bi + 16 + (l.e0 & 31));
          r[i][8] = qh.x; r[i][9] = qh.y; r[i][10] = qh.z; r[i][11] = qh.w;
        }
      } else if constexpr (T == T_Q4_0 || T == T_Q5_0 || T == T_Q8_0 || T == T_IQ4_NL) {  // aligned words: legacy_words
        constexpr int NQ = U::kBytes / 4;
        const uint32_t* wa = reinterpret_cast<const uint32_t*>(bi - (odd ? 2 : 0));
#pragma unroll
        for (int j = 0; j < NQ; ++j) r[i][j] = wa[j];
        r[i][NQ] = odd ? wa[NQ] : (uint32_t)ld_u16(bi + 4 * NQ);  // not past the block's end
      } else if constexpr (T == T_Q3_K) {  // aligned words, put in place by q3k_words
        // shifts s, s + 1 (s even) of half h: 16 bytes of qs[32 h ..] and of hmask[0 .. 32) from e0 % 32
        // (written out: through two_runs<4> ptxas scheduled Q3_K's kernels otherwise, and its one-row
        // forward took 4-6% longer on an H100; BENCHMARKS.md "Shared unit words for Q5_K, Q2_K and Q3_K")
        const int h = l.e0 >> 7, s = (l.e0 >> 5) & 3, l0 = l.e0 & 31;
        // odd: from 2 bytes before (hmask at l0 = 0: in the block before, as a block at offset 0 is never odd)
        const uint32_t* wa = reinterpret_cast<const uint32_t*>(bi + 32 + 32 * h + l0 - (odd ? 2 : 0));
        const uint32_t* wc = reinterpret_cast<const uint32_t*>(bi + l0 - (odd ? 2 : 0));
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          r[i][j] = wa[j];
          r[i][5 + j] = wc[j];
        }
        r[i][4] = odd ? wa[4] : 0u;  // (inside the block: both runs end at least 2 bytes before it)
        r[i][9] = odd ? wc[4] : 0u;
        r[i][10] = ld_u16(bi + 108);
        r[i][11] = (uint32_t)ld_u16(bi + 96 + 2 * s) | ((uint32_t)ld_u16(bi + 98 + 2 * s) << 16);
        r[i][12] = (uint32_t)ld_u16(bi + 104) | ((uint32_t)ld_u16(bi + 106) << 16);
      } else if constexpr (T == T_Q6_K) {  // aligned words, put in place by q6k_words
        // the unit's 32 ql bytes and 32 qh bytes, then d and the scale bytes
        const int h = l.e0 >> 7, w = (l.e0 >> 5) & 3;
        two_runs<8>(bi + 64 * h + 32 * (w & 1), bi + 128 + 32 * h, odd, r[i]);
        r[i][18] = ld_u16(bi + 208);
        r[i][19] = ld_u16(bi + 192 + 8 * h + 2 * w);
      } else if constexpr (T == T_MXFP4) {  // aligned words, put in place by mxfp4_words
        const int mis = (int)(reinterpret_cast<uintptr_t>(bi) & 3);
        const uint32_t* wa = reinterpret_cast<const uint32_t*>(bi - mis);
#pragma unroll
        for (int j = 0; j < 4; ++j) r[i][j] = wa[j];
        // bytes 0..mis of the fifth word are the block's last (2-byte loads from 4-aligned addresses)
        r[i][4] = mis == 3 ? wa[4]
                  : mis == 2 ? (uint32_t)ld_u16(bi + 14) | (uint32_t)ld_u8(bi + 16) << 16
                  : mis == 1 ? (uint32_t)ld_u16(bi + 15)
                             : (uint32_t)ld_u8(bi + 16);
      } else {
        U::template load<16>(bi, l.e0, r[i]);
        if constexpr (kLoads == 2) U::template load<16>(bi, l.e1, r[i] + kW);
      }
    }
  }
  if constexpr (kDecode) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (kCheck && u0 + 32 * i + lane >= units) continue;
      place_words<T>(r[i], odd, b);  // (every block of the round at b's address mod 4: kStep is a multiple of 4)
      acc = unit_sum<T>(r[i], l, l.xl + 4 * (u0 + 32 * i), l.al[u0 + 32 * i], acc);
    }
  }
  return acc;
}

template <int T, int N, bool kCheck>
__device__ __forceinline__ void round_load(const uint8_t* b, int u0, int units, const LaneUnits& l,
                                           uint32_t (&r)[N][kRoundWords<T>]) {
  round_impl<T, N, kCheck, true, false>(b, u0, units, l, r, 0.0f);
}
template <int T, int N, bool kCheck>
__device__ __forceinline__ float round_decode(const uint8_t* b, int u0, int units, const LaneUnits& l,
                                              uint32_t (&r)[N][kRoundWords<T>], float acc) {
  return round_impl<T, N, kCheck, false, true>(b, u0, units, l, r, acc);
}
template <int T, int N, bool kCheck>
__device__ __forceinline__ float round_sum(const uint8_t* b, int u0, int units, const LaneUnits& l, float acc) {
  uint32_t r[N][kRoundWords<T>];
  return round_impl<T, N, kCheck, true, true>(b, u0, units, l, r, acc);
}

// A grid type's table into shared memory for codes() (GridOf, grid_copy), by cp.async: a constant table,
// so before the PDL wait; waited with the kernel's copy of x (stage_form_after_wait) or by its own wait.
template <int T> __device__ __forceinline__ void stage_grid() {
  if constexpr (GridOf<T>::kPoints > 0) {
    using P = typename GridOf<T>::Point;
    P* dst = grid_copy<T>();
    for (int i = threadIdx.x; i < GridOf<T>::kPoints; i += blockDim.x)
      cp_async_ca<sizeof(P)>(smem_addr(dst + i), GridOf<T>::table() + i);
    cp_async_commit();
  }
}

// The kernels that load their first round early: the PDL wait (x's form is prepare_kernel's
// output), then the form into shared memory by cp.async (no registers between the load and the
// store while the round is held).
// With a split of K (gemv_rows_kernel over a cluster) a CTA stages only its part, units u0 .. u0 +
// units - 1 (u0 a multiple of 32): xs_index(u0 + v, h) = 4 u0 + xs_index(v, h), so the part's x is
// one contiguous run of the form, and its aux another.
__device__ __forceinline__ void stage_form_after_wait(uint4* smem, const uint4* form, int k, int u0 = 0,
                                                      int units = -1) {
  pdl_launch_dependents();
  pdl_wait();
  if (units < 0) units = k / 32;
  const int xs = 4 * padded_units(32 * units);
  const uint4* aux = form + 4 * padded_units(k) + u0;
  for (int i = threadIdx.x; i < xs + units; i += kThreads)
    cp_async16(smem_addr(smem + i), i < xs ? form + 4 * u0 + i : aux + (i - xs), 16);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
}

// CTAs per multiprocessor that ptxas is held to (__launch_bounds__: 65536 / (256 CTAs) registers a
// thread, in steps of 8). Left to itself it took more registers than needed for some types and so
// cost a CTA (Q6_K: 130 registers, one CTA). Measured with nvcc 13.0 for sm_90, the most CTAs at
// which each type compiles without spills (both activation types); 0: no bound (Q8_0, INT6-g64/g128
// and INT8 spill when held to 4, and take 3; Q5_0's aligned words spill when held to 4 or 5, and
// unbound take 64 registers: 4). Q5_1 spilled 16 bytes at 5; at 4 it takes 63 registers without.
// Q2_K and Q5_K, whose units load their words once for both spans (kSameWords), spill at 5 and 4
// (48-108 bytes) and not at 4 and 3; Q3_K's, held to 3, spill nothing (4 not tried). Holding the
// early round (kOneRow) a few one-row kernels spill a little where their bound stays: Q4_1,
// INT2-g32, INT4-g32, Q2_K and Q5_K 8 bytes, INT2-g64/g128 4, Q4_K and INT6-g32 40 (BENCHMARKS.md,
// "The gemv's first round loaded before its wait"); the persistent kernels spill nothing. The grid
// I-quants and Q1_0/Q2_0, unbound, took 59-128 registers: at 5 (IQ1_*, IQ2_XXS, IQ2_XS, IQ3_XXS, Q1_0, Q2_0)
// and 4 (IQ2_S, IQ3_S) they spill at most 16 bytes (IQ3_XXS 24-40 with its grid's copy). TQ1_0, TQ2_0 and
// NVFP4 held to 4 were no faster (1.0-1.45x the time, BENCHMARKS.md "The grids in shared memory"): unbound.
template <int T> constexpr int min_ctas() {
  if constexpr (T == T_Q4_0 || T == T_Q4_1 || T == int_type_id(4, 32) ||
                T == int_type_id(6, 32) || (T >= int_type_id(2, 32) && T <= int_type_id(3, 128)) ||
                T == T_IQ1_S || T == T_IQ1_M || T == T_IQ2_XXS || T == T_IQ2_XS || T == T_IQ3_XXS ||
                T == T_Q1_0 || T == T_Q2_0)
    return 5;
  else if constexpr (T == T_Q4_K || T == T_Q2_K || T == T_Q5_1 ||
                     (T >= int_type_id(4, 64) && T <= int_type_id(5, 128)) ||
                     T == T_IQ2_S || T == T_IQ3_S)
    return 4;
  else if constexpr (T == T_Q3_K || T == T_Q5_K)
    return 3;
  else if constexpr (T == T_Q6_K)
    return 2;
  else
    return 0;
}

// Each warp takes rows first, first + stride, ...; a row in rounds of 32 kInFlight units, each
// round's loads issued before any is decoded. (Loading the next round while decoding this one,
// with half the units per round, was slower: BENCHMARKS.md.)
// Lane l takes units u0 + 32 i + l: since kPerBlock divides 32, its unit in the block (and so its
// spans' e) is the same in every round and row, and its blocks are kStep bytes apart; the address
// math is one pointer per row, immediate offsets per unit. Rounds are whole (no bounds checks) but
// for a row's last one where 32 kInFlight does not divide K / 32.
// kOneRow (launch_gemv: where the grid gives every warp at most one row, N up to ~4096): the
// warp's first round is loaded into registers before the wait, so that its latency overlaps the
// previous kernels' ends and x's copy (W is never written by a kernel that triggers its dependents
// early). Where a warp takes several rows the loop below is kept as it was: holding that round
// across the wait costs the persistent loop registers (spills), and those shapes lost 1-9%.
// (Prefetching the first rows into L2 before the wait instead made decoding slower: BENCHMARKS.md.)
// Units of the one-row kernel's first round loaded before the wait: all of them, but half for Q4_K,
// which spilled 40 bytes at its 64-register bound holding four (32 registers) across the wait; with
// two, 16 (with one, 4). Two took 5-8% off Q4_K's one-row shapes (BENCHMARKS.md, "Q4_K's one-row
// gemv with half its first round loaded early"); with four it ran within 3% of no early round.
template <int T> constexpr int kEarlyUnits = T == T_Q4_K ? kInFlight / 2 : kInFlight;

template <int T, class ACT, bool kOneRow>
__global__ void __launch_bounds__(kThreads, min_ctas<T>())
gemv_kernel(const uint4* __restrict__ form, const uint8_t* __restrict__ w,
            ACT* __restrict__ y, int n, int k, int64_t row_bytes) {
  using U = Unpack<T>;
  using Un = Units<T>;
  constexpr int kStep = 32 / Un::kPerBlock * U::kBytes;  // bytes between a lane's units i and i + 1
  static_assert(32 % Un::kPerBlock == 0, "a lane's unit of its block is the same in every round");
  extern __shared__ uint4 smem[];
  const int units = k / 32;
  uint4* xs = smem;
  float4* aux = reinterpret_cast<float4*>(smem + 4 * padded_units(k));
  const int lane = threadIdx.x & 31;
  const int first = blockIdx.x * kWarps + (threadIdx.x >> 5), stride = gridDim.x * kWarps;
  if constexpr (kOneRow) {
    const int e0 = Un::e0(lane % Un::kPerBlock);  // the lane's spans in every block it reads
    const int whole = units - units % (32 * kInFlight);  // units in whole rounds
    const LaneUnits l{e0, e0 + Un::kGap, xs + lane, aux + lane};
    const uint8_t* b = w + (int64_t)first * row_bytes + lane / Un::kPerBlock * U::kBytes;
    constexpr int E = kEarlyUnits<T>, R = kInFlight - E;  // the first round: E units early, R after
    uint32_t r0[E][kRoundWords<T>];
    stage_grid<T>();
    if (first < n) {
      if (whole > 0) round_load<T, E, false>(b, 0, units, l, r0);
      else round_load<T, E, true>(b, 0, units, l, r0);
    }
    stage_form_after_wait(smem, form, k);
    if (first >= n) return;
    float acc = whole > 0 ? round_decode<T, E, false>(b, 0, units, l, r0, 0.0f)
                          : round_decode<T, E, true>(b, 0, units, l, r0, 0.0f);
    if constexpr (R > 0) {
      const uint8_t* br = b + E * kStep;
      acc = whole > 0 ? round_sum<T, R, false>(br, 32 * E, units, l, acc)
                      : round_sum<T, R, true>(br, 32 * E, units, l, acc);
    }
    int u0 = 32 * kInFlight;
    for (b += kInFlight * kStep; u0 < whole; u0 += 32 * kInFlight, b += kInFlight * kStep)
      acc = round_sum<T, kInFlight, false>(b, u0, units, l, acc);
    if (u0 < units) acc = round_sum<T, kInFlight, true>(b, u0, units, l, acc);  // the rest
    acc = warp_sum(acc);
    if (lane == 0) y[first] = f_to_act<ACT>(acc);
  } else {
    stage_grid<T>();
    pdl_launch_dependents();
    pdl_wait();  // x's form is prepare_kernel's output
    for (int i = threadIdx.x; i < 4 * padded_units(k) + units; i += kThreads) smem[i] = form[i];
    if constexpr (GridOf<T>::kPoints > 0) cp_async_wait<0>();  // the grid's copy
    __syncthreads();

    const int e0 = Un::e0(lane % Un::kPerBlock);  // the lane's spans in every block it reads
    const LaneUnits l{e0, e0 + Un::kGap, xs + lane, aux + lane};
    const int whole = units - units % (32 * kInFlight);  // units in whole rounds
    float acc = 0.0f;
    for (int row = first; row < n; row += stride) {
      const uint8_t* b = w + (int64_t)row * row_bytes + lane / Un::kPerBlock * U::kBytes;
      int u0 = 0;
      for (; u0 < whole; u0 += 32 * kInFlight, b += kInFlight * kStep)
        acc = round_sum<T, kInFlight, false>(b, u0, units, l, acc);
      if (u0 < units) acc = round_sum<T, kInFlight, true>(b, u0, units, l, acc);  // the rest
      // the row's sum
      acc = warp_sum(acc);
      if (lane == 0) y[row] = f_to_act<ACT>(acc);
      acc = 0.0f;
    }
  }
}

// R rows a warp (cuda_policy::gemv_rows_per_warp; launched with R = 2): a lane decodes the same
// units of rows R t .. R t + R - 1 against one read of x from shared memory. gemv_kernel reads x's
// 64 bytes and aux's 16 a unit for every row, against 18 bytes of W for a 4-bit type, so its
// shared-memory traffic is 4x its DRAM traffic and grows as the type narrows (INT2-g64: 8x); here it
// is 1/R of that. Each row has kInFlight / R units in flight, so the loaded words take the registers
// they took before.
template <int T, int R, int N>
using RowsWords = uint32_t[R][N][kRoundWords<T>];

// rows_round's halves: the loads of R rows' units u0 + 32 i + lane (i < N), then their sums, one
// read of x a unit for all R rows
template <int T, int R, int N, bool kCheck>
__device__ __forceinline__ void rows_load(const uint8_t* const (&b)[R], int u0, int units, const LaneUnits& l,
                                          RowsWords<T, R, N>& r) {
#pragma unroll
  for (int j = 0; j < R; ++j) round_load<T, N, kCheck>(b[j], u0, units, l, r[j]);
}
template <int T, int R, int N, bool kCheck>
__device__ __forceinline__ void rows_decode(const uint8_t* const (&b)[R], int u0, int units, const LaneUnits& l,
                                            RowsWords<T, R, N>& r, float (&acc)[R]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if (kCheck && u0 + 32 * i + lane >= units) continue;
    const uint4* xu = l.xl + 4 * (u0 + 32 * i);
    const uint4 xv[4] = {xu[0], xu[32], xu[64], xu[96]};
    const float4 a = l.al[u0 + 32 * i];
#pragma unroll
    for (int j = 0; j < R; ++j) {
      place_words<T>(r[j][i], (reinterpret_cast<uintptr_t>(b[j]) & 2) != 0, b[j]);
      acc[j] = unit_sum<T, 1>(r[j][i], l, xv, a, acc[j]);
    }
  }
}
template <int T, int R, int N, bool kCheck>
__device__ __forceinline__ void rows_round(const uint8_t* const (&b)[R], int u0, int units, const LaneUnits& l,
                                           float (&acc)[R]) {
  RowsWords<T, R, N> r;
  rows_load<T, R, N, kCheck>(b, u0, units, l, r);
  rows_decode<T, R, N, kCheck>(b, u0, units, l, r, acc);
}

// R rows' words and x's four loads held at once take more registers than gemv_kernel's bound
// leaves some types (spills, nvcc 13.0, sm_90): one CTA fewer where that bound is 3 to 5.
template <int T> constexpr int rows_min_ctas() { return min_ctas<T>() >= 3 ? min_ctas<T>() - 1 : min_ctas<T>(); }

// Task t's R sums (lane 0's) into y: rows R t .. R t + R - 1 that exist
template <class ACT, int R>
__device__ __forceinline__ void store_task(ACT* y, int n, int t, const float (&acc)[R]) {
#pragma unroll
  for (int j = 0; j < R; ++j)
    if ((threadIdx.x & 31) == 0 && R * t + j < n) y[R * t + j] = f_to_act<ACT>(acc[j]);
}

// Warp task t: rows R t .. R t + R - 1, where a last task short of R rows reads its last row again.
// The warp's first round is loaded before the wait (as gemv_kernel's one-row case does), so that its
// latency overlaps the kernels before: without it the kernel was up to 1.5x slower (BENCHMARKS.md).
// C > 1 (sm_90, launched in clusters of C CTAs along x): K is split over the cluster. Rank c takes
// units c part .. (c + 1) part - 1 of the same tasks (part a multiple of 32, so a lane's unit of its
// block stays what it was) and stages only that part of x; ranks 1.. add their sums into rank 0's
// shared memory, which writes y. The launch gives every warp one task (launch_gemv), so that every
// thread reaches the cluster barriers once.
template <int T, class ACT, int R, int C = 1>
__global__ void __launch_bounds__(kThreads, rows_min_ctas<T>())
gemv_rows_kernel(const uint4* __restrict__ form, const uint8_t* __restrict__ w,
                 ACT* __restrict__ y, int n, int k, int64_t row_bytes, int part) {
  using U = Unpack<T>;
  using Un = Units<T>;
  constexpr int N = kInFlight / R;
  static_assert(N * R == kInFlight, "R divides the units in flight");
  constexpr int kStep = 32 / Un::kPerBlock * U::kBytes;
  extern __shared__ uint4 smem[];
  const int rank = C > 1 ? (int)(blockIdx.x % C) : 0;
  const int u_first = rank * part;  // the part's units, counted from here on
  const int units = C > 1 ? min(part, k / 32 - u_first) : k / 32;
  const float4* aux = reinterpret_cast<const float4*>(smem + 4 * padded_units(32 * units));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int first = (int)(blockIdx.x / C) * kWarps + warp, stride = (int)(gridDim.x / C) * kWarps;
  const int e0 = Un::e0(lane % Un::kPerBlock);
  const LaneUnits l{e0, e0 + Un::kGap, smem + lane, aux + lane};
  const int whole = units - units % (32 * N);
  const int tasks = (n + R - 1) / R;
  const int64_t lane_bytes = (int64_t)(u_first / Un::kPerBlock + lane / Un::kPerBlock) * U::kBytes;
  const uint8_t* b[R];
  auto task_rows = [&](int t) {
#pragma unroll
    for (int j = 0; j < R; ++j) b[j] = w + (int64_t)min(R * t + j, n - 1) * row_bytes + lane_bytes;
  };
  RowsWords<T, R, N> r0;  // the first task's first round
  stage_grid<T>();
  task_rows(first);
  if (first < tasks) {
    if (whole > 0) rows_load<T, R, N, false>(b, 0, units, l, r0);
    else rows_load<T, R, N, true>(b, 0, units, l, r0);
  }
  stage_form_after_wait(smem, form, k, u_first, units);

  // task t's rounds from unit u0 on, then its R sums (in every lane)
  auto finish = [&](int u0, float (&acc)[R]) {
    for (; u0 < whole; u0 += 32 * N) {
      rows_round<T, R, N, false>(b, u0, units, l, acc);
#pragma unroll
      for (int j = 0; j < R; ++j) b[j] += N * kStep;
    }
    if (u0 < units) rows_round<T, R, N, true>(b, u0, units, l, acc);  // the rest
#pragma unroll
    for (int j = 0; j < R; ++j) acc[j] = warp_sum(acc[j]);
  };
  auto store = [&](int t, const float (&acc)[R]) { store_task(y, n, t, acc); };
  float acc[R] = {};
  if (first < tasks) {  // the first task's first round, outside the loop: r0 dies here
    if (whole > 0) rows_decode<T, R, N, false>(b, 0, units, l, r0, acc);
    else rows_decode<T, R, N, true>(b, 0, units, l, r0, acc);
#pragma unroll
    for (int j = 0; j < R; ++j) b[j] += N * kStep;
    finish(32 * N, acc);
  }
  if constexpr (C > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    __shared__ float red[C - 1][kWarps][R];
    cg::cluster_group cl = cg::this_cluster();
    if (rank > 0 && lane == 0) {
      float* dst = cl.map_shared_rank(&red[rank - 1][warp][0], 0);
#pragma unroll
      for (int j = 0; j < R; ++j) dst[j] = acc[j];
    }
    cl.sync();
    if (rank == 0 && first < tasks) {
      for (int c = 0; c + 1 < C; ++c)  // in rank order: the same sum in every run
#pragma unroll
        for (int j = 0; j < R; ++j) acc[j] += red[c][warp][j];
      store(first, acc);
    }
#endif
    return;
  } else {
    if (first < tasks) store(first, acc);
    for (int t = first + stride; t < tasks; t += stride) {
      float acc_t[R] = {};
      task_rows(t);
      finish(0, acc_t);
      store(t, acc_t);
    }
  }
}

// The streamed gemv (sm_90; cuda_policy::gemv_stream_ctas): gemv_rows_kernel's two rows a warp and
// its order of addition (the same bits), but the weights reach shared memory through the copy
// engine, not registers. Each warp keeps `stages` slots, each one step of its task (64 units of
// both rows, two bulk copies, one mbarrier); lane 0 refills a slot once the warp has decoded it. The
// first `stages` steps are issued before the PDL wait: shared memory, unlike registers, holds tens
// of KB an SM in flight, and with one CTA an SM (LOWTUNE_CUDA_GEMV_STREAM=1) sized to leave room
// for a second, the next product's CTAs start and stream their first steps while this one decodes
// its last (the register kernels' fixed few us a call: BENCHMARKS.md, "The streamed gemv").
// A step is 64 units of a row (two a lane; 0.7-2.2 KB), so that the slot a warp decodes is a small
// part of what it has in flight.
template <int T> struct StreamStep {
  static constexpr int kUnits = 64;
  // units a lane loads before it decodes them: both, but one for the types whose words would spill
  // at the register bound (Q6_K 350-380 bytes with two; Q3_K 12 even at 128 registers)
  static constexpr int kAtOnce = T == T_Q3_K || T == T_Q6_K ? 1 : 2;
  static constexpr int kRowBytes = kUnits / Units<T>::kPerBlock * Unpack<T>::kBytes;  // a row's bytes a step
};
constexpr int kStreamRows = 2, kMaxStages = 8;
// CTAs an SM its registers are held to (nvcc 13.0, sm_90): 3 leaves room beside one CTA of the next
// product; Q3_K spilled 8 bytes there and takes 2
template <int T> constexpr int stream_min_ctas() { return T == T_Q3_K ? 2 : 3; }
// shared memory for `stages` slots a warp beside x's form
inline size_t stream_smem_bytes(int64_t k, int row_bytes, int stages) {
  return smem_bytes(k) + (size_t)kWarps * stages * kStreamRows * row_bytes;
}

template <int T, class ACT>
__global__ void __launch_bounds__(kThreads, stream_min_ctas<T>())
gemv_stream_kernel(const uint4* __restrict__ form, const uint8_t* __restrict__ w, ACT* __restrict__ y, int n, int k,
                   int64_t row_bytes, int stages) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using U = Unpack<T>;
  using Un = Units<T>;
  using St = StreamStep<T>;
  constexpr int R = kStreamRows, N = St::kUnits / 32, A = St::kAtOnce;
  constexpr int kStep = 32 / Un::kPerBlock * U::kBytes;
  extern __shared__ uint4 smem[];
  __shared__ uint64_t bars[kWarps][kMaxStages];
  const int units = k / 32;
  const float4* aux = reinterpret_cast<const float4*>(smem + 4 * padded_units(k));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint8_t* slots = reinterpret_cast<uint8_t*>(smem) + smem_bytes(k) + (size_t)warp * stages * R * St::kRowBytes;
  uint64_t* bar = bars[warp];
  const int e0 = Un::e0(lane % Un::kPerBlock);
  const LaneUnits l{e0, e0 + Un::kGap, smem + lane, aux + lane};
  const int tasks = (n + R - 1) / R, rounds = (units + St::kUnits - 1) / St::kUnits;
  const int gw = blockIdx.x * kWarps + warp, G = gridDim.x * kWarps;
  const int steps = gw < tasks ? (tasks - gw + G - 1) / G * rounds : 0;
  auto issue = [&](int s) {  // lane 0: step s (task gw + (s / rounds) G, its round s % rounds) into its slot
    const int t = gw + s / rounds * G;
    const int64_t off = (int64_t)(s % rounds) * St::kRowBytes;
    const uint32_t bytes = (uint32_t)(row_bytes - off < St::kRowBytes ? row_bytes - off : St::kRowBytes);
    uint8_t* dst = slots + (size_t)(s % stages) * R * St::kRowBytes;
    mbar_arrive_expect_tx(bar + s % stages, R * bytes);
#pragma unroll
    for (int j = 0; j < R; ++j)
      bulk_copy(dst + j * St::kRowBytes, w + (int64_t)min(R * t + j, n - 1) * row_bytes + off, bytes, bar + s % stages);
  };
  if (lane == 0) {
    for (int i = 0; i < stages; ++i) mbar_init(bar + i, 1);
    mbar_init_fence();
    for (int s = 0; s < min(stages, steps); ++s) issue(s);  // weights only: safe before the wait
  }
  stage_grid<T>();
  stage_form_after_wait(smem, form, k);  // (its barrier also orders the mbarriers' init before the waits)

  float acc[R] = {};
  for (int s = 0; s < steps; ++s) {
    const int slot = s % stages, u0 = s % rounds * St::kUnits;
    mbar_wait(bar + slot, (uint32_t)(s / stages) & 1u);
    const uint8_t* base = slots + (size_t)slot * R * St::kRowBytes + lane / Un::kPerBlock * U::kBytes;
#pragma unroll
    for (int i = 0; i < N; i += A) {  // A units' loads, then their sums
      const uint8_t* const b[R] = {base + i * kStep, base + St::kRowBytes + i * kStep};
      if (u0 + St::kUnits <= units) rows_round<T, R, A, false>(b, u0 + 32 * i, units, l, acc);
      else rows_round<T, R, A, true>(b, u0 + 32 * i, units, l, acc);
    }
    __syncwarp();  // every lane's reads of the slot done before the copy engine refills it
    if (lane == 0 && s + stages < steps) issue(s + stages);
    if (s % rounds == rounds - 1) {  // the task's last step: its two sums
#pragma unroll
      for (int j = 0; j < R; ++j) acc[j] = warp_sum(acc[j]);
      store_task(y, n, gw + s / rounds * G, acc);
#pragma unroll
      for (int j = 0; j < R; ++j) acc[j] = 0.0f;
    }
  }
#endif
}

}  // namespace gemv

template <int T>
void launch_gemv(const void* x, int dtype, const uint8_t* w, void* y, int64_t n, int64_t k, int64_t row_bytes,
                 cudaStream_t stream, const GemvPrologue& pro) {
  if constexpr (!HasCodes<T>) {
    throw std::invalid_argument("gemv: this type has no codes kernel (cuda_policy::has_gemv)");
  } else {
    static_assert(Unpack<T>::kElems % 32 == 0, "units of 32 elements");
    const size_t smem = gemv::smem_bytes(k);
    auto launch = [&](auto tag) {
      using ACT = decltype(tag);
      // (kernel_ctas also raises each kernel's dynamic shared memory limit to smem)
      const int per_sm = kernel_ctas<gemv::gemv_kernel<T, ACT, false>>(smem, gemv::kThreads);
      const int per_sm_one = kernel_ctas<gemv::gemv_kernel<T, ACT, true>>(smem, gemv::kThreads);
      if (per_sm < 1 || per_sm_one < 1) throw std::runtime_error("gemv: no CTA fits for this K");
      const int64_t want = (n + gemv::kWarps - 1) / gemv::kWarps;
      const bool one_row = want <= (int64_t)per_sm_one * sm_count();  // every warp's row in one wave
      const int grid = (int)(one_row ? want : std::min<int64_t>(want, (int64_t)per_sm * sm_count()));
      ScratchBuffer form(smem, stream);  // x's form: smem_bytes(k) is its size too
      const int64_t threads = 4 * gemv::padded_units(k);  // prepare_kernel: four a unit
      const dim3 prep_grid((unsigned)((threads + gemv::kThreads - 1) / gemv::kThreads));
      const auto prepare = pro.kind == GemvPrologue::AddRmsNorm ? gemv::prepare_kernel<T, ACT, GemvPrologue::AddRmsNorm>
                           : pro.kind == GemvPrologue::SiluMul  ? gemv::prepare_kernel<T, ACT, GemvPrologue::SiluMul>
                                                                : gemv::prepare_kernel<T, ACT, GemvPrologue::None>;
      launch_pdl(prepare, prep_grid, dim3(gemv::kThreads), 0, stream, static_cast<const ACT*>(x), (int)k,
                 form.as<uint4>(), pro, cuda_policy::early_norm_weights());
      const int64_t tasks = (n + 1) / 2;  // of two rows
      // the streamed gemv (sm_90): as many stages a warp as leave room for its CTAs an SM (at one, for
      // a second: the next product's), 2 at least; its bulk copies need 16-byte aligned rows and steps
      using St = gemv::StreamStep<T>;
      constexpr auto stream_kernel = gemv::gemv_stream_kernel<T, ACT>;
      if constexpr (St::kRowBytes % 16 == 0) {
        const int stream_ctas = cuda_policy::gemv_stream_ctas(T, n, k);
        if (stream_ctas > 0 && row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0 &&
            built_for_sm90<stream_kernel>()) {
          const int need = std::max(stream_ctas, 2);  // (one: room for the next product's CTA beside it)
          auto fits = [&](int stages) {  // (beside its barriers and a grid's copy, and 512 bytes to spare)
            const size_t bytes = gemv::stream_smem_bytes(k, St::kRowBytes, stages);
            return bytes + static_smem<stream_kernel>() + 512 <= (size_t)smem_optin_limit() &&
                   kernel_ctas<stream_kernel>(bytes, gemv::kThreads) >= need;
          };
          int stages = gemv::kMaxStages;
          while (stages >= 2 && !fits(stages)) --stages;
          if (stages >= 2) {
            const int64_t ctas = std::min<int64_t>((int64_t)stream_ctas * sm_count(),
                                                   (tasks + gemv::kWarps - 1) / gemv::kWarps);
            launch_pdl(stream_kernel, dim3((unsigned)ctas), dim3(gemv::kThreads),
                       gemv::stream_smem_bytes(k, St::kRowBytes, stages), stream, form.as<const uint4>(), w,
                       static_cast<ACT*>(y), (int)n, (int)k, row_bytes, stages);
            return;
          }
        }
      }
      const int per_sm_rows = kernel_ctas<gemv::gemv_rows_kernel<T, ACT, 2>>(smem, gemv::kThreads);
      // K split over clusters of two CTAs (sm_90): each stages half of x, every warp takes one task
      constexpr auto split_kernel = gemv::gemv_rows_kernel<T, ACT, 2, 2>;
      const int part = (int)(((k / 32 + 1) / 2 + 31) / 32 * 32);
      const size_t split_smem = gemv::smem_bytes(32 * (int64_t)part);
      const int64_t split_fit = per_sm_rows > 0 && k / 32 > 32 && built_for_sm90<split_kernel>()
          ? (int64_t)kernel_ctas<split_kernel>(split_smem, gemv::kThreads) * sm_count() * gemv::kWarps : 0;
      if (cuda_policy::gemv_split_k(k, 2 * tasks <= split_fit) == 2) {
        launch_pdl_cluster(split_kernel, dim3((unsigned)(2 * ((tasks + gemv::kWarps - 1) / gemv::kWarps))), dim3(2),
                           dim3(gemv::kThreads), split_smem, stream, form.as<const uint4>(), w, static_cast<ACT*>(y),
                           (int)n, (int)k, row_bytes, part);
        return;
      }
      if (per_sm_rows > 0 && cuda_policy::gemv_rows_per_warp(T, one_row, k) == 2) {
        // every warp the same count of tasks (but the last): as many warps as that takes
        const int64_t fit = (int64_t)per_sm_rows * sm_count() * gemv::kWarps;
        const int64_t per_warp = (tasks + fit - 1) / fit, warps = (tasks + per_warp - 1) / per_warp;
        launch_pdl(gemv::gemv_rows_kernel<T, ACT, 2>, dim3((unsigned)((warps + gemv::kWarps - 1) / gemv::kWarps)),
                   dim3(gemv::kThreads), smem, stream, form.as<const uint4>(), w, static_cast<ACT*>(y), (int)n, (int)k,
                   row_bytes, 0);
        return;
      }
      const auto kernel = one_row ? gemv::gemv_kernel<T, ACT, true> : gemv::gemv_kernel<T, ACT, false>;
      launch_pdl(kernel, dim3(grid), dim3(gemv::kThreads), smem, stream, form.as<const uint4>(), w,
                 static_cast<ACT*>(y), (int)n, (int)k, row_bytes);
    };
    if (dtype == D_BF16) launch(__nv_bfloat16{});
    else if (dtype == D_F16) launch(__half{});
    else throw std::invalid_argument("gemv takes bfloat16 or float16 activations");
    LT_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace lowtune::cuda
