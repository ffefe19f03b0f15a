// Fast device-side block unpacking for the CUDA kernels.
//
//   Unpack<T>::run<SPAN>(blk, e, v)   v[i] = element e + i of the block at blk, i < SPAN
//   Unpack<T>::load<SPAN>(blk, e, r)  the raw words run needs (Words<SPAN> of them) ...
//   Unpack<T>::decode<SPAN>(r, e, v)  ... and the arithmetic on them: kernels issue the loads
//                                     of the next piece of work before decoding this one.
//   Unpack<T>::codes<SPAN>(r, e, cw, s, z)   the span as small unsigned codes u_i (byte i%4 of
//                                     cw[i/4]) and one affine map x_i ~ u_i*s + z (decode_fast);
//                                     kCodeBits bounds the codes (u_i < 2^kCodeBits). The 4-bit
//                                     table types (IQ4_NL, IQ4_XS, MXFP4, NVFP4) give level + 128,
//                                     the grid I-quants their signed grid values plus an offset.
//
// SPAN is 8 or 16 and e a multiple of SPAN, so one call never crosses a sub-block scale.
// The values are bit-identical to Traits<T>::dequant in block_math.h (the CPU twin): the
// same float operations in the same order, each rounded on its own (__fmul_rn/__fadd_rn keep
// nvcc from contracting a*b+c into an FMA, which rounds once and gives different bits).
// Small integer codes become floats through the exponent trick as_float(2^23 | q) - 2^23,
// exact for 0 <= q < 2^23 and cheaper than an int-to-float conversion.
//
// Alignment: the kernels require the packed tensor to start 16-byte aligned; a block then
// starts at a multiple of gcd(block bytes, 16) (kAlign: 1 for MXFP4's 17 bytes), and loads use the
// widest access that alignment allows.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "../block_math.h"

namespace lowtune::cuda {

// ---- scalar helpers ----------------------------------------------------------------------------
__device__ __forceinline__ float code_f(uint32_t q) {  // (float)q, q < 2^23
  return __fsub_rn(__uint_as_float(0x4B000000u | q), 8388608.0f);
}
__device__ __forceinline__ float code_minus_f(uint32_t q, int off) {  // (float)((int)q - off), exact
  return __fsub_rn(__uint_as_float(0x4B000000u | q), 8388608.0f + (float)off);
}
__device__ __forceinline__ float half_f(uint16_t h) {  // exact for every finite or infinite half
  return __half2float(__ushort_as_half(h));
}

// ---- loads ---------------------------------------------------------------------------------------
// Plain loads (not the read-only-cache intrinsic): the same load<SPAN> reads a block in global
// memory or a copy staged in shared memory (the staged kernels), and the compiler picks the
// instruction from the pointer's origin (the kernels' global pointers are const __restrict__, so
// they may still use the read-only path). New types should read through these helpers too.
__device__ __forceinline__ uint16_t ld_u16(const uint8_t* p) { return *reinterpret_cast<const uint16_t*>(p); }
__device__ __forceinline__ uint8_t ld_u8(const uint8_t* p) { return *p; }
__device__ __forceinline__ uint32_t ld_u32(const uint8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// NB bytes at p (p aligned to A bytes) into little-endian words w[NB/4].
template <int NB, int A>
__device__ __forceinline__ void ld_words(const uint8_t* p, uint32_t* w) {
  static_assert(NB % 4 == 0, "whole words");
  if constexpr (A >= 16 && NB % 16 == 0) {
#pragma unroll
    for (int i = 0; i < NB / 16; ++i) {
      const uint4 v = reinterpret_cast<const uint4*>(p)[i];
      w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
    }
  } else if constexpr (A >= 8 && NB % 8 == 0) {
#pragma unroll
    for (int i = 0; i < NB / 8; ++i) {
      const uint2 v = reinterpret_cast<const uint2*>(p)[i];
      w[2 * i] = v.x; w[2 * i + 1] = v.y;
    }
  } else if constexpr (A >= 4) {
#pragma unroll
    for (int i = 0; i < NB / 4; ++i) w[i] = ld_u32(p + 4 * i);
  } else if constexpr (A >= 2) {
#pragma unroll
    for (int i = 0; i < NB / 4; ++i)
      w[i] = (uint32_t)ld_u16(p + 4 * i) | ((uint32_t)ld_u16(p + 4 * i + 2) << 16);
  } else {  // byte-aligned blocks (MXFP4's 17 bytes)
#pragma unroll
    for (int i = 0; i < NB / 4; ++i)
      w[i] = (uint32_t)ld_u8(p + 4 * i) | ((uint32_t)ld_u8(p + 4 * i + 1) << 8) |
             ((uint32_t)ld_u8(p + 4 * i + 2) << 16) | ((uint32_t)ld_u8(p + 4 * i + 3) << 24);
  }
}
// Byte i of a word array (i a compile-time constant after unrolling).
__device__ __forceinline__ uint32_t byte_of(const uint32_t* w, int i) {
  return (w[i >> 2] >> (8 * (i & 3))) & 0xFFu;
}

constexpr int gcd_c(int a, int b) { return b == 0 ? a : gcd_c(b, a % b); }

// ---- fast decode (for the matmul kernels) ---------------------------------------------------------
// decode_fast<SPAN>(r, e, v) gives v[i] = fma(u_i, s, z) for the block's code u_i and affine
// (s, z): equal to decode for the symmetric types (z = -offset*s is exact: (u - o)*s rounds
// once either way) and within one fp32 rounding of it for types with a min (one rounding instead
// of two). Codes are built four at a time as bytes of a word, then widened with one byte permute.
// A type whose values are not an affine map of small codes defines decode_fast itself (and no codes).
__device__ __forceinline__ float byte_f(uint32_t w, int i) {  // (float) byte i of w
  return __fsub_rn(__uint_as_float(__byte_perm(w, 0x4B000000u, 0x7440u + i)), 8388608.0f);
}
template <int S>
__device__ __forceinline__ void affine_codes(const uint32_t* cw, float s, float z, float* v) {
#pragma unroll
  for (int i = 0; i < S; ++i) v[i] = __fmaf_rn(byte_f(cw[i >> 2], i & 3), s, z);
}
// Four consecutive bits (bit 0 = first element) spread to bit 0 of four bytes.
__device__ __forceinline__ uint32_t spread4(uint32_t bits) { return ((bits & 0xFu) * 0x00204081u) & 0x01010101u; }

template <int T> struct Unpack;

// run = load + decode, and decode_fast = codes + affine_codes, for every type.
template <class Self> struct UnpackBase {
  static constexpr int kCodeBits = 8;  // a type with narrower codes says so
  // > 0: the spans e and e + kSameWords (e % (2 kSameWords) == 0, SPAN 16) load the same words
  // (the low and high nibbles of the same bytes), so a kernel may load them once.
  static constexpr int kSameWords = 0;
  // The first kHeadWords words of load's output depend only on the block (its scales), not on e:
  // spans of one block may take them from one load, and share the arithmetic on them.
  static constexpr int kHeadWords = 0;
  // true: the codes come from a table of levels or grid points with an offset (level + 128: the
  // codes' offset -128 s) that can leave a 16-bit type's range where the values do not, so the staged
  // kernels' narrow path skips them (they decode with decode: UnpackIq)
  static constexpr bool kTableCodes = false;
  template <int SPAN> __device__ static void run(const uint8_t* b, int e, float* v) {
    uint32_t r[Self::template Words<SPAN>::value];
    Self::template load<SPAN>(b, e, r);
    Self::template decode<SPAN>(r, e, v);
  }
  template <int SPAN> __device__ static void decode_fast(const uint32_t* r, int e, float* v) {
    uint32_t cw[SPAN / 4];
    float s, z;
    Self::template codes<SPAN>(r, e, cw, s, z);
    affine_codes<SPAN>(cw, s, z, v);
  }
};
template <int N> struct IntC { static constexpr int value = N; };
// The map of codes that carry an offset O: values d (u - O), exact where O is a power of two (the symmetric
// legacy and K-quant types' codes, the table types' level + 128, the grid I-quants' O ± g, the ternary types'
// digit: O = 1).
template <uint32_t O>
__device__ __forceinline__ void offset_map(float d, float& scale, float& offset) {
  scale = d;
  offset = O == 1 ? -d : __fmul_rn(-(float)O, d);  // (the same value; a negation folds into its user's FMA)
}

// ---- legacy 32-element blocks --------------------------------------------------------------------
// Q4_0: d, qs[16]; element j < 16 low nibble of qs[j], j >= 16 high nibble of qs[j-16].
template <> struct Unpack<T_Q4_0> : UnpackBase<Unpack<T_Q4_0>> {
  static constexpr int kElems = 32, kBytes = 18, kAlign = gcd_c(kBytes, 16), kCodeBits = 4, kSameWords = 16, kHeadWords = 1;
  template <int S> using Words = IntC<1 + S / 4>;
  template <int S> __device__ static void load(const uint8_t* b, int e, uint32_t* r) {
    r[0] = ld_u16(b);
    ld_words<S, 2>(b + 2 + (e & 15), r + 1);  // offset 2 + {0,8}: 2-byte aligned
  }
  template <int S> __device__ static void decode(const uint32_t* r, int e, float* v) {
    const float d = half_f((uint16_t)r[0]);
    const int sh = (e >> 4) * 4;
#pragma unroll
    for (int i = 0; i < S; ++i) v[i] = __fmul_rn(code_minus_f((byte_of(r + 1, i) >> sh) & 0xF, 8), d);
  }
  template <int S> __device__ static void codes(const uint32_t* r, int e, uint32_t* cw, float& scale, float& offset) {
    const float d = half_f((uint16_t)r[0]);
    const int sh = (e >> 4) * 4;
#pragma unroll
    for (int j = 0; j < S / 4; ++j) cw[j] = (r[1 + j] >> sh) & 0x0F0F0F0Fu;
    offset_map<8>(d, scale, offset);
  }
};

// Q4_1: d, m, qs[16]; x = q*d + m.
template <> struct Unpack<T_Q4_1> : UnpackBase<Unpack<T_Q4_1>> {
  static constexpr int kElems = 32, kBytes = 20, kAlign = gcd_c(kBytes, 16), kCodeBits = 4, kSameWords = 16, kHeadWords = 1;
  template <int S> using Words = IntC<1 + S / 4>;
  template <int S> __device__ static void load(const uint8_t* b, int e, uint32_t* r) {
    r[0] = ld_u32(b);
    ld_words<S, 4>(b + 4 + (e & 15), r + 1);
  }
  template <int S> __device__ static void decode(const uint32_t* r, int e, float* v) {
    const float d = half_f(r[0] & 0xFFFF), m = half_f(r[0] >> 16);
    const int sh = (e >> 4) * 4;
#pragma unroll
    for (int i = 0; i < S; ++i) v[i] = __fadd_rn(__fmul_rn(code_f((byte_of(r + 1, i) >> sh) & 0xF), d), m);
  }
  template <int S> __device__ static void codes(const uint32_t* r, int e, uint32_t* cw, float& scale, float& offset) {
    const float d = half_f(r[0] & 0xFFFF), m = half_f(r[0] >> 16);
    const int sh = (e >> 4) * 4;
#pragma unroll
    for (int j = 0; j < S / 4; ++j) cw[j] = (r[1 + j] >> sh) & 0x0F0F0F0Fu;
    scale = d;
    offset = m;
  }
};

// Q5_0: d, qh (u32, bit j = fifth bit of element j), qs[16]; x = (q - 16) * d.
template <> struct Unpack<T_Q5_0> : UnpackBase<Unpack<T_Q5_0>> {
  static constexpr int kElems = 32, kBytes = 22, kAlign = gcd_c(kBytes, 16), kCodeBits = 5;
  template <int S> using Words = IntC<2 + S / 4>;
  template <int S> __device__ static void load(const uint8_t* b, int e, uint32_t* r) {
    r[0] = ld_u16(b);
    r[1] = (uint32_t)ld_u16(b + 2) | ((uint32_t)ld_u16(b + 4) << 16);
    ld_words<S, 2>(b + 6 + (e & 15), r + 2);
  }
  template <int S> __device__ static void decode(const uint32_t* r, int e, float* v) {
    const float d = half_f((uint16_t)r[0]);
    const uint32_t qh = r[1] >> e;
    const int sh = (e >> 4) * 4;
#pragma unroll
    for (int i = 0; i < S; ++i) {
      const uint32_t q = ((byte_of(r + 2, i) >> sh) & 0xF) | (((qh >> i) & 1u) << 4);
      v[i] = __fmul_rn(code_minus_f(q, 16), d);
    }
  }
  template <int S> __device__ static void codes(const uint32_t* r, int e, uint32_t* cw, float& scale, float& offset) {
    const float d = half_f((uint16_t)r[0]);
    const uint32_t qh = r[1] >> e;
    const int sh = (e >> 4) * 4;
#pragma unroll
    for (int j = 0; j < S / 4; ++j) cw[j] = ((r[2 + j] >> sh) & 0x0F0F0F0Fu) | (spread4(qh >> (4 * j)) << 4);
    offset_map<16>(d, scale, offset);
  }
};

// Q5_1: d, m, qh, qs[16]; x = q*d + m.
template <> struct Unpack<T_Q5_1> : UnpackBase<Unpack<T_Q5_1>> {
  static constexpr int kElems = 32, kBytes = 24, kAlign = gcd_c(kBytes, 16), kCodeBits = 5;
  template <int S> using Words = IntC<2 + S / 4>;
  template <int S> __device__ static void load(const uint8_t* b, int e, uint32_t* r) {
    r[0] = ld_u32(b);
    r[1] = ld_u32(b + 4);
    ld_words<S, 8>(b + 8 + (e & 15), r + 2);
  }
  template <int S> __device__ static void decode(const uint32_t* r, int e, float* v) {
    const float d = half_f(r[0] & 0xFFFF), m = half_f(r[0] >> 16);
    const uint32_t qh = r[1] >> e;
    const int sh = (e >> 4) * 4;
#pragma unroll
    for (int i = 0; i < S; ++i) {
      const uint32_t q = ((byte_of(r + 2, i) >> sh) & 0xF) | (((qh >> i) & 1u) << 4);
      v[i] = __fadd_rn(__fmul_rn(code_f(q), d), m);
    }
  }
  template <int S> __device__ static void codes(const uint32_t* r, int e, uint32_t* cw, float& scale, float& offset) {
    const float d = half_f(r[0] & 0xFFFF), m = half_f(r[0] >> 16);
    const uint32_t qh = r[1] >> e;
    const int sh = (e >> 4) * 4;
#pragma unroll
    for (int j = 0; j < S / 4; ++j) cw[j] = ((r[2 + j] >> sh) & 0x0F0F0F0Fu) | (spread4(qh >> (4 * j)) << 4);
    scale = d;
    offset = m;
  }
};

// Q8_0: d, qs[32] int8; x = q * d.
template <> struct Unpack<T_Q8_0> : UnpackBase<Unpack<T_Q8_0>> {
  static constexpr int kElems = 32, kBytes = 34, kAlign = gcd_c(kBytes, 16), kCodeBits = 8;
  template <int S> using Words = IntC<1 + S / 4>;
  template <int S> __device__ static void load(const uint8_t* b, int e, uint32_t* r) {
    r[0] = ld_u16(b);
    ld_words<S, 2>(b + 2 + e, r + 1);
  }
  template <int S> __device__ static void decode(const uint32_t* r, int e, float* v) {
    const float d = half_f((uint16_t)r[0]);
#pragma unroll
    for (int i = 0; i < S; ++i) v[i] = __fmul_rn(code_minus_f(byte_of(r + 1, i) ^ 0x80u, 128), d);
  }
  template <int S> __device__ static void codes(const uint32_t* r, int e, uint32_t* cw, float& scale, float& offset) {
    const float d = half_f((uint16_t)r[0]);
#pragma unroll
    for (int j = 0; j < S / 4; ++j) cw[j] = r[1 + j] ^ 0x80808080u;  // int8 q -> q + 128
    offset_map<128>(d, scale, offset);
  }
};

// ---- K-quants: 256-element super-blocks ----------------------------------------------------------
// Q2_K: scales[16], qs[64], d, dmin. Element e: half h = e/128, e' = e%128, shift 2*(e'/32),
// sub-block 8h + 2*(e'/32) + (e'%32)/16, byte qs[32h + e'%32]. load reads the scale bytes of four
// sub-blocks (8h + 4(s/2) ..: those of shifts s and s + 1), so the spans e and e + 32 (shifts s and
// s + 1 of the same qs bytes, s even) load the same words.
template <> struct Unpack<T_Q2_K> : UnpackBase<Unpack<T_Q2_K>> {
  static constexpr int kElems = 256, kBytes = 84, kAlign = gcd_c(kBytes, 16), kCodeBits = 2, kSameWords = 32;
  template <int S> using Words = IntC<2 + S / 4>;
  template <int S> __device__ static void load(const uint8_t* b, int e, uint32_t* r) {
    const int h = e >> 7, ep = e & 127, s = ep >> 5, l0 = ep & 31;
    r[0] = ld_u32(b + 80);
    r[1] = ld_u32(b + 8 * h + 2 * (s & 2));
    ld_words<S, 4>(b + 16 + 32 * h + l0, r + 2);
  }
  // the span's scale byte (low nibble: scale, high: min) of load's four
  __device__ static uint32_t scale_byte(const uint32_t* r, int e) {
    const int s = (e & 127) >> 5;
    return (r[1] >> (8 * (2 * (s & 1) + ((e >> 4) & 1)))) & 0xFFu;
  }
  template <int S> __device__ static void decode(const uint32_t* r, int e, float* v) {
    const float d = half_f(r[0] & 0xFFFF), dmin = half_f(r[0] >> 16);
    const int s = (e & 127) >> 5;
    const uint32_t sb = scale_byte(r, e);
    const float dl = __fmul_rn(d, code_f(sb & 0xF)), ml = __fmul_rn(dmin, code_f(sb >> 4));
#pragma unroll
    for (int i = 0; i < S; ++i) v[i] = __fsub_rn(__fmul_rn(dl, code_f((byte_of(r + 2, i) >> (2 * s)) & 3)), ml);
  }
  template <int S> __device__ static void codes(const uint32_t* r, int e, uint32_t* cw, float& scale, float& offset) {
    const float d = half_f(r[0] & 0xFFFF), dmin = half_f(r[0] >> 16);
    const int s = (e & 127) >> 5;
    const uint32_t sb = scale_byte(r, e);
    const float dl = __fmul_rn(d, code_f(sb & 0xF)), ml = __fmul_rn(dmin, code_f(sb >> 4));
#pragma unroll
    for (int j = 0; j < S / 4; ++j) cw[j] = (r[2 + j] >> (2 * s)) & 0x03030303u;
    scale = dl;
    offset = -ml;
  }
};

// Q3_K: hmask[32], qs[64], scales[12], d. Same element order as Q2_K; the hmask bit 4h + s of
// byte e%32 set means no -4 offset; six-bit signed scales (see q3_K_scales): sub-block is = 8h + 2s
// + (e%32)/16 takes its low four bits from scales[is % 8] (the low nibble for h = 0, the high one for
// h = 1) and its top two from bits 2(is/4) of scales[8 + is % 4]. load reads the scale bytes of both
// shifts s and s + 1 (s even): four from 96 + 2s and four from 104, so the spans e and e + 32 (the
// same qs and hmask bytes) load the same words.
template <> struct Unpack<T_Q3_K> : UnpackBase<Unpack<T_Q3_K>> {
  static constexpr int kElems = 256, kBytes = 110, kAlign = gcd_c(kBytes, 16), kCodeBits = 3, kSameWords = 32;
  template <int S> using Words = IntC<3 + S / 2>;
  template <int S> __device__ static void load(const uint8_t* b, int e, uint32_t* r) {
    const int h = e >> 7, s = (e & 127) >> 5, l0 = e & 31;
    r[0] = ld_u16(b + 108);
    r[1] = (uint32_t)ld_u16(b + 96 + 2 * (s & 2)) | ((uint32_t)ld_u16(b + 98 + 2 * (s & 2)) << 16);
    r[2] = (uint32_t)ld_u16(b + 104) | ((uint32_t)ld_u16(b + 106) << 16);
    ld_words<S, 2>(b + 32 + 32 * h + l0, r + 3);
    ld_words<S, 2>(b + l0, r + 3 + S / 4);
  }
  // d times the span's scale (its six bits less 32)
  __device__ static float span_scale(const uint32_t* r, int e) {
    const int h = e >> 7, s = (e & 127) >> 5;
    const int sh = 8 * (2 * (s & 1) + ((e >> 4) & 1));  // the sub-block's byte in both windows
    const uint32_t lo = r[1] >> sh;
    const int low = (int)(h ? (lo >> 4) & 0xF : lo & 0xF);
    const int high = (int)(r[2] >> (sh + 2 * (2 * h + (s >> 1)))) & 3;
    return __fmul_rn(half_f((uint16_t)r[0]), (float)((low | (high << 4)) - 32));
  }
  template <int S> __device__ static void decode(const uint32_t* r, int e, float* v) {
    const int h = e >> 7, s = (e & 127) >> 5;
    const float dl = span_scale(r, e);
    const int hbit = 4 * h + s;
#pragma unroll
    for (int i = 0; i < S; ++i) {
      // ((q >> 2s) & 3) - (bit ? 0 : 4)  ==  ((q >> 2s) & 3) + 4*bit - 4
      const uint32_t u = ((byte_of(r + 3, i) >> (2 * s)) & 3) + (((byte_of(r + 3 + S / 4, i) >> hbit) & 1u) << 2);
      v[i] = __fmul_rn(dl, code_minus_f(u, 4));
    }
  }
  template <int S> __device__ static void codes(const uint32_t* r, int e, uint32_t* cw, float& scale, float& offset) {
    const int h = e >> 7, s = (e & 127) >> 5;
    const float dl = span_scale(r, e);
    const int hbit = 4 * h + s;
#pragma unroll
    for (int j = 0; j < S / 4; ++j)
      cw[j] = ((r[3 + j] >> (2 * s)) & 0x03030303u) | (((r[3 + S / 4 + j] >> hbit) & 0x01010101u) << 2);
    offset_map<4>(dl, scale, offset);
  }
};

// Q4_K / Q5_K: the six-bit scale and min of sub-block j (get_scale_min_k4) from all twelve scale
// bytes as three little-endian words s[0..2] (byte k of the array is byte k%4 of s[k/4]): sub-block
// j reads byte j%4 of each word.
__device__ __forceinline__ void scale_min_k4_words(const uint32_t* s, int j, uint32_t* sc, uint32_t* mn) {
  const uint32_t sel = 0x4440u | (uint32_t)(j & 3);  // byte j%4 into byte 0, zeros above
  const uint32_t b0 = __byte_perm(s[0], 0u, sel), b1 = __byte_perm(s[1], 0u, sel);
  if (j < 4) {
    *sc = b0 & 63; *mn = b1 & 63;
  } else {
    const uint32_t b2 = __byte_perm(s[2], 0u, sel);
    *sc = (b2 & 0xF) | ((b0 >> 6) << 4);
    *mn = (b2 >> 4) | ((b1 >> 6) << 4);
  }
}

// Q4_K: d, dmin, scales[12], qs[128]. Chunk j = e/64 uses qs[32j .. 32j+32): low nibbles are
// elements 64j .. 64j+31 (sub-block 2j), high nibbles the next 32 (sub-block 2j+1). load reads
// all twelve scale bytes, so the spans e and e + 32 load the same words (kSameWords).
template <> struct Unpack<T_Q4_K> : UnpackBase<Unpack<T_Q4_K>> {
  static constexpr int kElems = 256, kBytes = 144, kAlign = gcd_c(kBytes, 16), kCodeBits = 4, kSameWords = 32, kHeadWords = 4;
  template <int S> using Words = IntC<4 + S / 4>;
  template <int S> __device__ static void load(const uint8_t* b, int e, uint32_t* r) {
    const int j = e >> 6, l0 = e & 31;
    r[0] = ld_u32(b);
    ld_words<12, 4>(b + 4, r + 1);
    ld_words<S, 8>(b + 16 + 32 * j + l0, r + 4);
  }
  template <int S> __device__ static void decode(const uint32_t* r, int e, float* v) {
    const int j = e >> 6, hi = (e >> 5) & 1;
    const float d = half_f(r[0] & 0xFFFF), dmin = half_f(r[0] >> 16);
    uint32_t sc, mn;
    scale_min_k4_words(r + 1, 2 * j + hi, &sc, &mn);
    const float d1 = __fmul_rn(d, code_f(sc)), m1 = __fmul_rn(dmin, code_f(mn));
    const int sh = 4 * hi;
#pragma unroll
    for (int i = 0; i < S; ++i) v[i] = __fsub_rn(__fmul_rn(d1, code_f((byte_of(r + 4, i) >> sh) & 0xF)), m1);
  }
  template <int S> __device__ static void codes(const uint32_t* r, int e, uint32_t* cw, float& scale, float& offset) {
    const int j = e >> 6, hi = (e >> 5) & 1;
    const float d = half_f(r[0] & 0xFFFF), dmin = half_f(r[0] >> 16);
    uint32_t sc, mn;
    scale_min_k4_words(r + 1, 2 * j + hi, &sc, &mn);
    const float d1 = __fmul_rn(d, code_f(sc)), m1 = __fmul_rn(dmin, code_f(mn));
#pragma unroll
    for (int w = 0; w < S / 4; ++w) cw[w] = (r[4 + w] >> (4 * hi)) & 0x0F0F0F0Fu;
    scale = d1;
    offset = -m1;
  }
};

// Q5_K: d, dmin, scales[12], qh[32], qs[128]; as Q4_K plus a fifth bit, bit 2j + hi of qh[e%32].
// As Q4_K's, load reads all twelve scale bytes, so the spans e and e + 32 load the same words (the
// low and high nibbles of the same qs bytes, bits 2j and 2j + 1 of the same qh bytes).
template <> struct Unpack<T_Q5_K> : UnpackBase<Unpack<T_Q5_K>> {
  static constexpr int kElems = 256, kBytes = 176, kAlign = gcd_c(kBytes, 16), kCodeBits = 5, kSameWords = 32, kHeadWords = 4;
  template <int S> using Words = IntC<4 + S / 2>;
  template <int S> __device__ static void load(const uint8_t* b, int e, uint32_t* r) {
    const int j = e >> 6, l0 = e & 31;
    r[0] = ld_u32(b);
    ld_words<12, 4>(b + 4, r + 1);
    ld_words<S, 8>(b + 48 + 32 * j + l0, r + 4);
    ld_words<S, 8>(b + 16 + l0, r + 4 + S / 4);
  }
  template <int S> __device__ static void decode(const uint32_t* r, int e, float* v) {
    const int j = e >> 6, hi = (e >> 5) & 1;
    const float d = half_f(r[0] & 0xFFFF), dmin = half_f(r[0] >> 16);
    uint32_t sc, mn;
    scale_min_k4_words(r + 1, 2 * j + hi, &sc, &mn);
    const float d1 = __fmul_rn(d, code_f(sc)), m1 = __fmul_rn(dmin, code_f(mn));
    const int sh = 4 * hi, hb = 2 * j + hi;
#pragma unroll
    for (int i = 0; i < S; ++i) {
      const uint32_t q = ((byte_of(r + 4, i) >> sh) & 0xF) | (((byte_of(r + 4 + S / 4, i) >> hb) & 1u) << 4);
      v[i] = __fsub_rn(__fmul_rn(d1, code_f(q)), m1);
    }
  }
  template <int S> __device__ static void codes(const uint32_t* r, int e, uint32_t* cw, float& scale, float& offset) {
    const int j = e >> 6, hi = (e >> 5) & 1;
    const float d = half_f(r[0] & 0xFFFF), dmin = half_f(r[0] >> 16);
    uint32_t sc, mn;
    scale_min_k4_words(r + 1, 2 * j + hi, &sc, &mn);
    const float d1 = __fmul_rn(d, code_f(sc)), m1 = __fmul_rn(dmin, code_f(mn));
    const int hb = 2 * j + hi;
#pragma unroll
    for (int w = 0; w < S / 4; ++w)
      cw[w] = ((r[4 + w] >> (4 * hi)) & 0x0F0F0F0Fu) | (((r[4 + S / 4 + w] >> hb) & 0x01010101u) << 4);
    scale = d1;
    offset = -m1;
  }
};

// Q6_K: ql[128], qh[64], scales[16] int8, d. Half h = e/128; quarter w = (e%128)/32, l = e%32:
// low 4 bits from ql[64h + 32*(w&1) + l] (low nibble for w < 2, high for w >= 2), top 2 bits from
// qh[32h + l] >> 2w, scale scales[8h + l/16 + 2w]; x = d * sc * (q - 32).
template <> struct Unpack<T_Q6_K> : UnpackBase<Unpack<T_Q6_K>> {
  static constexpr int kElems = 256, kBytes = 210, kAlign = gcd_c(kBytes, 16), kCodeBits = 6;
  template <int S> using Words = IntC<2 + S / 2>;
  template <int S> __device__ static void load(const uint8_t* b, int e, uint32_t* r) {
    const int h = e >> 7, w = (e >> 5) & 3, l0 = e & 31;
    r[0] = ld_u16(b + 208);
    r[1] = ld_u8(b + 192 + 8 * h + (l0 >> 4) + 2 * w);
    ld_words<S, 2>(b + 64 * h + 32 * (w & 1) + l0, r + 2);
    ld_words<S, 2>(b + 128 + 32 * h + l0, r + 2 + S / 4);
  }
  template <int S> __device__ static void decode(const uint32_t* r, int e, float* v) {
    const int w = (e >> 5) & 3;
    const float ds = __fmul_rn(half_f((uint16_t)r[0]), (float)(int8_t)r[1]);
    const int sl = 4 * (w >> 1), shh = 2 * w;
#pragma unroll
    for (int i = 0; i < S; ++i) {
      const uint32_t q = ((byte_of(r + 2, i) >> sl) & 0xF) | (((byte_of(r + 2 + S / 4, i) >> shh) & 3u) << 4);
      v[i] = __fmul_rn(ds, code_minus_f(q, 32));
    }
  }
  template <int S> __device__ static void codes(const uint32_t* r, int e, uint32_t* cw, float& scale, float& offset) {
    const int w = (e >> 5) & 3;
    const float ds = __fmul_rn(half_f((uint16_t)r[0]), (float)(int8_t)r[1]);
    const int sl = 4 * (w >> 1), shh = 2 * w;
#pragma unroll
    for (int j = 0; j < S / 4; ++j)
      cw[j] = ((r[2 + j] >> sl) & 0x0F0F0F0Fu) | (((r[2 + S / 4 + j] >> shh) & 0x03030303u) << 4);
    offset_map<32>(ds, scale, offset);
  }
};

// ---- I-quants -----------------------------------------------------------------------------------
// Codes index the tables of iq_grids.h (read from device memory in decode; they are small and stay
// in cache). The values are Traits' products, each rounded on its own:
//   IQ4: dl * level;  IQ3/IQ2: (db * grid) * sign == db * (±grid);  IQ1: dl * (grid + delta).
// decode_fast is decode (the staged kernels' path); codes (the one-row kernels' integer path) give the
// levels + 128, or the signed grid values plus an offset, for a span of 16.
// ksigns_iq2xs(i) without its table's gather: bit 7 makes the count of set bits (minus signs) even.
__device__ __forceinline__ uint32_t ksigns_rule(uint32_t i) { return i | (__popc(i) & 1u) << 7; }
constexpr bool ksigns_rule_is_the_table() {
  for (int i = 0; i < 128; ++i) {
    int ones = 0;
    for (int b = 0; b < 7; ++b) ones += (i >> b) & 1;
    if (k_ksigns_iq2xs[i] != (i | (ones & 1) << 7)) return false;
  }
  return true;
}
static_assert(ksigns_rule_is_the_table(), "ksigns_rule: ggml's sign table is the even-parity rule");
// The grids in shared memory. codes() gathers a grid point per 4 or 8 elements; from L1 a warp's 32
// points cost a wavefront per cache line they touch (up to 32 of the shared L1/LSU's one a cycle), from
// shared memory a few bank conflicts. So codes() reads a copy of its type's grid in shared memory
// (grid_copy), which every kernel that calls it fills first (gemv.cuh: stage_grid); decode() reads the
// global table.
template <int T> struct GridOf { static constexpr int kPoints = 0; };
#ifdef __CUDA_ARCH__
#define LT_GRID_TABLE(NAME) d_##NAME
#else  // the host twin of the table (tests/cuda_host compiles these decoders for the host)
#define LT_GRID_TABLE(NAME) k_##NAME
#endif
#define LT_GRID_OF(TYPE, POINT, N, NAME)                                   \
  template <> struct GridOf<TYPE> {                                        \
    using Point = POINT;                                                   \
    static constexpr int kPoints = N;                                      \
    __device__ static const Point* table() { return LT_GRID_TABLE(NAME); } \
  };
LT_GRID_OF(T_IQ2_XXS, uint64_t, 256, iq2xxs_grid)
LT_GRID_OF(T_IQ2_XS, uint64_t, 512, iq2xs_grid)
LT_GRID_OF(T_IQ2_S, uint64_t, 1024, iq2s_grid)
LT_GRID_OF(T_IQ3_XXS, uint32_t, 256, iq3xxs_grid)
LT_GRID_OF(T_IQ3_S, uint32_t, 512, iq3s_grid)
LT_GRID_OF(T_IQ1_S, uint64_t, 2048, iq1s_grid)
LT_GRID_OF(T_IQ1_M, uint64_t, 2048, iq1s_grid)
#undef LT_GRID_OF
#undef LT_GRID_TABLE
template <int T> __device__ __forceinline__ typename GridOf<T>::Point* grid_copy() {
  __shared__ typename GridOf<T>::Point points[GridOf<T>::kPoints];  // one per CTA of a kernel that calls this
  return points;
}
template <class Self> struct UnpackIq : UnpackBase<Self> {
  static constexpr bool kTableCodes = true;
  template <int S> __device__ static void decode_fast(const uint32_t* r, int e, float* v) {
    Self::template decode<S>(r, e, v);
  }
};
__device__ __forceinline__ float signed_f(uint32_t g, bool negative) {  // ±(float)g, g < 2^23
  const float f = code_f(g);
  return negative ? -f : f;
}
// Four grid values (the bytes of g, each at most O) with their signs (bits 0..3 of s4, set: negative) as
// the codes O ± g for the one-row kernels' integer dot products (values: the scale times (u - O)). Every
// byte stays in 0..2 O < 256, so no byte carries into or borrows from the next.
template <uint32_t O>
__device__ __forceinline__ uint32_t signed_grid_codes(uint32_t g, uint32_t s4) {
  const uint32_t neg = g & (spread4(s4) * 0xFFu);
  return g + O * 0x01010101u - 2u * neg;
}
// The level of a 4-bit code in a table of 16 int8 levels (IQ4_NL's, MXFP4's), without a memory
// access: the table as four words (built at compile time from iq_grids.h), one byte selected by
// __byte_perm.
constexpr uint32_t level_word(const int8_t* table, int w) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= (uint32_t)(uint8_t)table[4 * w + i] << (8 * i);
  return v;
}
template <const int8_t* Table>
__device__ __forceinline__ float nibble_level(uint32_t q) {
  constexpr uint32_t w0 = level_word(Table, 0), w1 = level_word(Table, 1);
  constexpr uint32_t w2 = level_word(Table, 2), w3 = level_word(Table, 3);
  const uint32_t b = __byte_perm(q & 8 ? w2 : w0, q & 8 ? w3 : w1, q & 7);  // level in the low byte
  return (float)(int)(int8_t)b;
}
__device__ __forceinline__ float iq4nl_level(uint32_t q) { return nibble_level<k_kvalues_iq4nl>(q); }

// Four 4-bit codes (the bytes of q, each < 16) as the unsigned bytes level + 128 of such a table:
// codes for the one-row gemv's integer dot products (values: the scale times (u - 128)). The codes
// become a selector's four nibbles; one byte permute looks them up in the table's lower half, one in
// its upper half, and a third takes each byte from the half its code is in (the code's bit 3).
constexpr uint32_t level_word_u(const int8_t* table, int w) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= (uint32_t)(uint8_t)(table[4 * w + i] + 128) << (8 * i);
  return v;
}
// the four codes in bits 0..15 of sel (a nibble each), looked up
template <const int8_t* Table>
__device__ __forceinline__ uint32_t level_lookup(uint32_t sel) {
  constexpr uint32_t w0 = level_word_u(Table, 0), w1 = level_word_u(Table, 1);
  constexpr uint32_t w2 = level_word_u(Table, 2), w3 = level_word_u(Table, 3);
  const uint32_t s7 = sel & 0x7777u;  // (a selector nibble's bit 3 would replicate a sign)
  const uint32_t lo = __byte_perm(w0, w1, s7), hi = __byte_perm(w2, w3, s7);
  return __byte_perm(lo, hi, ((sel >> 1) & 0x4444u) | 0x3210u);
}
template <const int8_t* Table>
__device__ __forceinline__ uint32_t level_codes(uint32_t q) {
  return level_lookup<Table>(__byte_perm(q | (q >> 4), 0u, 0x0020u));  // codes 0..3 in bits 0..15
}
// Both nibbles of the four bytes of w at once: lo the low nibbles' codes, hi the high ones'. A 16-bit
// half of w is already a selector of four codes (low, high, low, high), so no compaction: two
// lookups, then the bytes sorted by nibble (~1.9 instructions a code against level_codes' ~2.5).
template <const int8_t* Table>
__device__ __forceinline__ void level_codes_pair(uint32_t w, uint32_t& lo, uint32_t& hi) {
  const uint32_t a = level_lookup<Table>(w), b = level_lookup<Table>(w >> 16);
  lo = __byte_perm(a, b, 0x6420u);
  hi = __byte_perm(a, b, 0x7531u);
}
// A span's codes from its code words q (the low nibbles, or the high ones: sh = 4), and the affine
// map of levels + 128 with scale d: what codes() gives for every 4-bit table type.
template <const int8_t* Table, int S>
__device__ __forceinline__ void level_span_codes(const uint32_t* q, int sh, float d, uint32_t* cw, float& scale,
                                                 float& offset) {
#pragma unroll
  for (int j = 0; j < S / 4; ++j) cw[j] = level_codes<Table>((q[j] >> sh) & 0x0F0F0F0Fu);
  offset_map<128>(d, scale, offset);
}
// Both spans' codes (the low nibbles' in cw, the high ones' in cw1) and their one map: what codes2()
// gives for every 4-bit table type.
template <const int8_t* Table, int S>
__device__ __forceinline__ void level_pair_codes(const uint32_t* q, float d, uint32_t* cw, uint32_t* cw1, float& scale,
                                                 float& offset) {
#pragma unroll
  for (int j = 0; j < S / 4; ++j) level_codes_pair<Table>(q[j], cw[j], cw1[j]);
  offset_map<128>(d, scale, offset);
}

// IQ4_NL: d, qs[16]; element j < 16 low nibble of qs[j], j >= 16 high nibble of qs[j-16].
template <> struct Unpack<T_IQ4_NL> : UnpackIq<Unpack<T_IQ4_NL>> {
  static constexpr int kElems = 32, kBytes = 18, kAlign = gcd_c(kBytes, 16), kSameWords = 16;
  template <int S> using Words = IntC<1 + S / 4>;
  template <int S> __device__ static void load(const uint8_t* b, int e, uint32_t* r) {
    r[0] = ld_u16(b);
    ld_words<S, 2>(b + 2 + (e & 15), r + 1);
  }
  template <int S> __device__ static void decode(const uint32_t* r, int e, float* v) {
    const float d = half_f((uint16_t)r[0]);
    const int sh = (e >> 4) * 4;
#pragma unroll
    for (int i = 0; i < S; ++i) v[i] = __fmul_rn(d, iq4nl_level((byte_of(r + 1, i) >> sh) & 0xF));
  }
  template <int S> __device__ static void codes(const uint32_t* r, int e, uint32_t* cw, float& scale, float& offset) {
    level_span_codes<k_kvalues_iq4nl, S>(r + 1, (e >> 4) * 4, half_f((uint16_t)r[0]), cw, scale, offset);
  }
  template <int S>
  __device__ static void codes2(const uint32_t* r, int /*e*/, uint32_t* cw, uint32_t* cw1, float& scale,
                                float& offset) {
    level_pair_codes<k_kvalues_iq4nl, S>(r + 1, half_f((uint16_t)r[0]), cw, cw1, scale, offset);
  }
};

// IQ4_XS: d, scales_h, scales_l[4], qs[128]; sub-block ib = e/32 as IQ4_NL at qs + 16ib.
template <> struct Unpack<T_IQ4_XS> : UnpackIq<Unpack<T_IQ4_XS>> {
  static constexpr int kElems = 256, kBytes = 136, kAlign = gcd_c(kBytes, 16), kSameWords = 16;
  template <int S> using Words = IntC<2 + S / 4>;
  template <int S> __device__ static void load(const uint8_t* b, int e, uint32_t* r) {
    const int ib = e >> 5;
    r[0] = ld_u32(b);  // d | scales_h << 16
    r[1] = ld_u8(b + 4 + (ib >> 1));
    ld_words<S, 8>(b + 8 + 16 * ib + (e & 15), r + 2);
  }
  // sub-block ib's scale d * (ls - 32), ls its six bits from scales_l and scales_h
  __device__ static float sub_scale(const uint32_t* r, int ib) {
    const int ls = (int)((r[1] >> (4 * (ib & 1))) & 0xF) | (int)(((r[0] >> (16 + 2 * ib)) & 3) << 4);
    return __fmul_rn(half_f((uint16_t)r[0]), (float)(ls - 32));
  }
  template <int S> __device__ static void decode(const uint32_t* r, int e, float* v) {
    const int sh = ((e >> 4) & 1) * 4;
    const float dl = sub_scale(r, e >> 5);
#pragma unroll
    for (int i = 0; i < S; ++i) v[i] = __fmul_rn(dl, iq4nl_level((byte_of(r + 2, i) >> sh) & 0xF));
  }
  template <int S> __device__ static void codes(const uint32_t* r, int e, uint32_t* cw, float& scale, float& offset) {
    level_span_codes<k_kvalues_iq4nl, S>(r + 2, ((e >> 4) & 1) * 4, sub_scale(r, e >> 5), cw, scale, offset);
  }
  template <int S>
  __device__ static void codes2(const uint32_t* r, int e, uint32_t* cw, uint32_t* cw1, float& scale,
                                float& offset) {
    level_pair_codes<k_kvalues_iq4nl, S>(r + 2, sub_scale(r, e >> 5), cw, cw1, scale, offset);
  }
};

// IQ3_XXS: d, qs[64] (one grid index per 4 elements), then per 32 a u32: four 7-bit sign indices
// (one per 8 elements) and the scale at bit 28.
template <> struct Unpack<T_IQ3_XXS> : UnpackIq<Unpack<T_IQ3_XXS>> {
  static constexpr int kElems = 256, kBytes = 98, kAlign = gcd_c(kBytes, 16), kCodeBits = 7;
  template <int S> using Words = IntC<3>;
  template <int S> __device__ static void load(const uint8_t* b, int e, uint32_t* r) {
    const int ib = e >> 5, j0 = e & 31;
    r[0] = ld_u16(b);
    r[1] = (uint32_t)ld_u16(b + 66 + 4 * ib) | ((uint32_t)ld_u16(b + 68 + 4 * ib) << 16);
    const uint8_t* q = b + 2 + 8 * ib + j0 / 4;
    r[2] = S == 16 ? (uint32_t)ld_u16(q) | ((uint32_t)ld_u16(q + 2) << 16) : (uint32_t)ld_u16(q);
  }
  template <int S> __device__ static void decode(const uint32_t* r, int e, float* v) {
    const int j0 = e & 31;
    const uint32_t aux = r[1];
    const float db = __fmul_rn(__fmul_rn(half_f((uint16_t)r[0]), __fadd_rn(0.5f, code_f(aux >> 28))), 0.5f);
#pragma unroll
    for (int p = 0; p < S / 4; ++p) {
      const int l4 = j0 / 4 + p;  // grid point in the 32 elements
      const uint32_t signs = ksigns_rule((aux >> (7 * (l4 >> 1))) & 127) >> (4 * (l4 & 1));
      const uint32_t g = iq3xxs_grid(byte_of(r + 2, p));
#pragma unroll
      for (int j = 0; j < 4; ++j) v[4 * p + j] = __fmul_rn(db, signed_f((g >> (8 * j)) & 0xFF, (signs >> j) & 1));
    }
  }
  // the one-row kernels' spans (S = 16): four grid points of four, 64 ± g
  template <int S> __device__ static void codes(const uint32_t* r, int e, uint32_t* cw, float& scale, float& offset) {
    static_assert(S == 16, "codes of a 16-element span");
    const int j0 = e & 31;
    const uint32_t aux = r[1];
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const int l4 = j0 / 4 + p;
      const uint32_t signs = ksigns_rule((aux >> (7 * (l4 >> 1))) & 127) >> (4 * (l4 & 1));
      cw[p] = signed_grid_codes<64>(grid_copy<T_IQ3_XXS>()[byte_of(r + 2, p)], signs);
    }
    offset_map<64>(__fmul_rn(__fmul_rn(half_f((uint16_t)r[0]), __fadd_rn(0.5f, code_f(aux >> 28))), 0.5f), scale,
                   offset);
  }
};

// IQ3_S: d, qs[64], qh[8], signs[32], scales[4]; index k of sub-block ib: qs[8ib + k] | bit k of
// qh[ib] << 8; a sign bit per element; the scale nibble ib % 2 of scales[ib / 2].
template <> struct Unpack<T_IQ3_S> : UnpackIq<Unpack<T_IQ3_S>> {
  static constexpr int kElems = 256, kBytes = 110, kAlign = gcd_c(kBytes, 16), kCodeBits = 5;
  template <int S> using Words = IntC<3>;
  template <int S> __device__ static void load(const uint8_t* b, int e, uint32_t* r) {
    const int ib = e >> 5, j0 = e & 31;
    r[0] = (uint32_t)ld_u16(b) | ((uint32_t)ld_u8(b + 106 + (ib >> 1)) << 16) | ((uint32_t)ld_u8(b + 66 + ib) << 24);
    const uint8_t* q = b + 2 + 8 * ib + j0 / 4;
    r[1] = S == 16 ? (uint32_t)ld_u16(q) | ((uint32_t)ld_u16(q + 2) << 16) : (uint32_t)ld_u16(q);
    const uint8_t* sg = b + 74 + 4 * ib + j0 / 8;
    r[2] = S == 16 ? (uint32_t)ld_u16(sg) : (uint32_t)ld_u8(sg);
  }
  template <int S> __device__ static void decode(const uint32_t* r, int e, float* v) {
    const int ib = e >> 5, j0 = e & 31;
    const uint32_t s = (r[0] >> (16 + 4 * (ib & 1))) & 0xF, qh = r[0] >> 24;
    const float db = __fmul_rn(half_f((uint16_t)r[0]), code_f(1 + 2 * s));
#pragma unroll
    for (int p = 0; p < S / 4; ++p) {
      const int k = j0 / 4 + p;
      const uint32_t g = iq3s_grid(byte_of(r + 1, p) | (((qh >> k) & 1) << 8));
#pragma unroll
      for (int j = 0; j < 4; ++j) v[4 * p + j] = __fmul_rn(db, signed_f((g >> (8 * j)) & 0xFF, (r[2] >> (4 * p + j)) & 1));
    }
  }
  template <int S> __device__ static void codes(const uint32_t* r, int e, uint32_t* cw, float& scale, float& offset) {
    static_assert(S == 16, "codes of a 16-element span");
    const int ib = e >> 5, j0 = e & 31;
    const uint32_t s = (r[0] >> (16 + 4 * (ib & 1))) & 0xF, qh = r[0] >> 24;
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const int k = j0 / 4 + p;
      const uint32_t g = grid_copy<T_IQ3_S>()[byte_of(r + 1, p) | (((qh >> k) & 1) << 8)];
      cw[p] = signed_grid_codes<16>(g, r[2] >> (4 * p));
    }
    offset_map<16>(__fmul_rn(half_f((uint16_t)r[0]), code_f(1 + 2 * s)), scale, offset);
  }
};

// IQ2_XXS: d, then per 32 two u32: four grid indices (bytes, 8 elements each), four 7-bit sign
// indices and the scale at bit 28.
template <> struct Unpack<T_IQ2_XXS> : UnpackIq<Unpack<T_IQ2_XXS>> {
  static constexpr int kElems = 256, kBytes = 66, kAlign = gcd_c(kBytes, 16), kCodeBits = 7;
  template <int S> using Words = IntC<3>;
  template <int S> __device__ static void load(const uint8_t* b, int e, uint32_t* r) {
    const int ib = e >> 5, j0 = e & 31;
    r[0] = ld_u16(b);
    r[1] = (uint32_t)ld_u16(b + 6 + 8 * ib) | ((uint32_t)ld_u16(b + 8 + 8 * ib) << 16);
    const uint8_t* q = b + 2 + 8 * ib + j0 / 8;
    r[2] = S == 16 ? (uint32_t)ld_u16(q) : (uint32_t)ld_u8(q);
  }
  template <int S> __device__ static void decode(const uint32_t* r, int e, float* v) {
    const int j0 = e & 31;
    const uint32_t aux = r[1];
    const float db = __fmul_rn(__fmul_rn(half_f((uint16_t)r[0]), __fadd_rn(0.5f, code_f(aux >> 28))), 0.25f);
#pragma unroll
    for (int p = 0; p < S / 8; ++p) {
      const int l = j0 / 8 + p;
      const uint32_t signs = ksigns_rule((aux >> (7 * l)) & 127);
      const uint64_t g = iq2xxs_grid(byte_of(r + 2, p));
#pragma unroll
      for (int j = 0; j < 8; ++j) v[8 * p + j] = __fmul_rn(db, signed_f((uint32_t)(g >> (8 * j)) & 0xFF, (signs >> j) & 1));
    }
  }
  template <int S> __device__ static void codes(const uint32_t* r, int e, uint32_t* cw, float& scale, float& offset) {
    static_assert(S == 16, "codes of a 16-element span");
    const int j0 = e & 31;
    const uint32_t aux = r[1];
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const uint32_t signs = ksigns_rule((aux >> (7 * (j0 / 8 + p))) & 127);
      const uint64_t g = grid_copy<T_IQ2_XXS>()[byte_of(r + 2, p)];
      cw[2 * p] = signed_grid_codes<64>((uint32_t)g, signs);
      cw[2 * p + 1] = signed_grid_codes<64>((uint32_t)(g >> 32), signs >> 4);
    }
    offset_map<64>(__fmul_rn(__fmul_rn(half_f((uint16_t)r[0]), __fadd_rn(0.5f, code_f(aux >> 28))), 0.25f), scale,
                   offset);
  }
};

// IQ2_XS: d, qs[32] (u16 per 8 elements: 9-bit grid index, 7-bit sign index), scales[8] (a nibble
// per 16 elements).
template <> struct Unpack<T_IQ2_XS> : UnpackIq<Unpack<T_IQ2_XS>> {
  static constexpr int kElems = 256, kBytes = 74, kAlign = gcd_c(kBytes, 16), kCodeBits = 7;
  template <int S> using Words = IntC<2>;
  template <int S> __device__ static void load(const uint8_t* b, int e, uint32_t* r) {
    r[0] = (uint32_t)ld_u16(b) | ((uint32_t)ld_u8(b + 66 + (e >> 5)) << 16);
    const uint8_t* q = b + 2 + 2 * (e >> 3);
    r[1] = S == 16 ? (uint32_t)ld_u16(q) | ((uint32_t)ld_u16(q + 2) << 16) : (uint32_t)ld_u16(q);
  }
  template <int S> __device__ static void decode(const uint32_t* r, int e, float* v) {
    const uint32_t s = (r[0] >> (16 + 4 * ((e >> 4) & 1))) & 0xF;
    const float db = __fmul_rn(__fmul_rn(half_f((uint16_t)r[0]), __fadd_rn(0.5f, code_f(s))), 0.25f);
#pragma unroll
    for (int p = 0; p < S / 8; ++p) {
      const uint32_t q = (r[1] >> (16 * p)) & 0xFFFF;
      const uint32_t signs = ksigns_rule(q >> 9);
      const uint64_t g = iq2xs_grid(q & 511);
#pragma unroll
      for (int j = 0; j < 8; ++j) v[8 * p + j] = __fmul_rn(db, signed_f((uint32_t)(g >> (8 * j)) & 0xFF, (signs >> j) & 1));
    }
  }
  template <int S> __device__ static void codes(const uint32_t* r, int e, uint32_t* cw, float& scale, float& offset) {
    static_assert(S == 16, "codes of a 16-element span");
    const uint32_t s = (r[0] >> (16 + 4 * ((e >> 4) & 1))) & 0xF;
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const uint32_t q = (r[1] >> (16 * p)) & 0xFFFF;
      const uint32_t signs = ksigns_rule(q >> 9);
      const uint64_t g = grid_copy<T_IQ2_XS>()[q & 511];
      cw[2 * p] = signed_grid_codes<64>((uint32_t)g, signs);
      cw[2 * p + 1] = signed_grid_codes<64>((uint32_t)(g >> 32), signs >> 4);
    }
    offset_map<64>(__fmul_rn(__fmul_rn(half_f((uint16_t)r[0]), __fadd_rn(0.5f, code_f(s))), 0.25f), scale, offset);
  }
};

// IQ2_S: d, qs[64] (low index bytes, then a sign byte per 8 elements), qh[8] (index bits 8-9 of
// point l of sub-block ib at bit 2l), scales[8] (a nibble per 16).
template <> struct Unpack<T_IQ2_S> : UnpackIq<Unpack<T_IQ2_S>> {
  static constexpr int kElems = 256, kBytes = 82, kAlign = gcd_c(kBytes, 16), kCodeBits = 7;
  template <int S> using Words = IntC<3>;
  template <int S> __device__ static void load(const uint8_t* b, int e, uint32_t* r) {
    const int ib = e >> 5, l0 = (e & 31) >> 3;
    r[0] = (uint32_t)ld_u16(b) | ((uint32_t)ld_u8(b + 66 + ib) << 16) | ((uint32_t)ld_u8(b + 74 + ib) << 24);
    r[1] = S == 16 ? (uint32_t)ld_u16(b + 2 + 4 * ib + l0) : (uint32_t)ld_u8(b + 2 + 4 * ib + l0);
    r[2] = S == 16 ? (uint32_t)ld_u16(b + 34 + 4 * ib + l0) : (uint32_t)ld_u8(b + 34 + 4 * ib + l0);
  }
  template <int S> __device__ static void decode(const uint32_t* r, int e, float* v) {
    const int l0 = (e & 31) >> 3;
    const uint32_t qh = (r[0] >> 16) & 0xFF, s = (r[0] >> (24 + 4 * ((e >> 4) & 1))) & 0xF;
    const float db = __fmul_rn(__fmul_rn(half_f((uint16_t)r[0]), __fadd_rn(0.5f, code_f(s))), 0.25f);
#pragma unroll
    for (int p = 0; p < S / 8; ++p) {
      const int l = l0 + p;
      const uint64_t g = iq2s_grid(byte_of(r + 1, p) | (((qh >> (2 * l)) & 3) << 8));
      const uint32_t signs = byte_of(r + 2, p);
#pragma unroll
      for (int j = 0; j < 8; ++j) v[8 * p + j] = __fmul_rn(db, signed_f((uint32_t)(g >> (8 * j)) & 0xFF, (signs >> j) & 1));
    }
  }
  template <int S> __device__ static void codes(const uint32_t* r, int e, uint32_t* cw, float& scale, float& offset) {
    static_assert(S == 16, "codes of a 16-element span");
    const int l0 = (e & 31) >> 3;
    const uint32_t qh = (r[0] >> 16) & 0xFF, s = (r[0] >> (24 + 4 * ((e >> 4) & 1))) & 0xF;
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const uint64_t g = grid_copy<T_IQ2_S>()[byte_of(r + 1, p) | (((qh >> (2 * (l0 + p))) & 3) << 8)];
      const uint32_t signs = byte_of(r + 2, p);
      cw[2 * p] = signed_grid_codes<64>((uint32_t)g, signs);
      cw[2 * p + 1] = signed_grid_codes<64>((uint32_t)(g >> 32), signs >> 4);
    }
    offset_map<64>(__fmul_rn(__fmul_rn(half_f((uint16_t)r[0]), __fadd_rn(0.5f, code_f(s))), 0.25f), scale, offset);
  }
};

// IQ1 grid values are int8 in {-1, 0, 1}; x = dl * (grid + delta), delta = ±1/8.
__device__ __forceinline__ void iq1_points(uint64_t g, float dl, float delta, float* v) {
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = __fmul_rn(dl, __fadd_rn((float)(int8_t)(g >> (8 * j)), delta));
}
// Four IQ1 grid points (int8 bytes of g4 in {-1, 0, 1}) as the codes u = 8 (g + delta) + 9 (0..18), so
// that dl (g + delta) = (dl / 8) (u - 9): with c = g + 1 (bit 0 of the byte, less twice bit 1), u = 8 c + 2
// where delta = +1/8 and 8 c where it is -1/8.
__device__ __forceinline__ uint32_t iq1_codes(uint32_t g4, bool minus) {
  const uint32_t c = 0x01010101u + (g4 & 0x01010101u) - 2u * ((g4 >> 1) & 0x01010101u);
  return (c << 3) + (minus ? 0u : 0x02020202u);
}
__device__ __forceinline__ void iq1_map(float dl, float& scale, float& offset) {
  scale = __fmul_rn(dl, 0.125f);
  offset = __fmul_rn(-9.0f, scale);
}

// IQ1_S: d, qs[32] (index bits 0-7), qh[8] (u16 per 32: index bits 8-10 of point l at bit 3l, the
// scale at bits 12-14, the delta sign at bit 15).
template <> struct Unpack<T_IQ1_S> : UnpackIq<Unpack<T_IQ1_S>> {
  static constexpr int kElems = 256, kBytes = 50, kAlign = gcd_c(kBytes, 16), kCodeBits = 5;
  template <int S> using Words = IntC<2>;
  template <int S> __device__ static void load(const uint8_t* b, int e, uint32_t* r) {
    const int ib = e >> 5, l0 = (e & 31) >> 3;
    r[0] = (uint32_t)ld_u16(b) | ((uint32_t)ld_u16(b + 34 + 2 * ib) << 16);
    r[1] = S == 16 ? (uint32_t)ld_u16(b + 2 + 4 * ib + l0) : (uint32_t)ld_u8(b + 2 + 4 * ib + l0);
  }
  template <int S> __device__ static void decode(const uint32_t* r, int e, float* v) {
    const int l0 = (e & 31) >> 3;
    const uint32_t qh = r[0] >> 16;
    const float dl = __fmul_rn(half_f((uint16_t)r[0]), code_f(2 * ((qh >> 12) & 7) + 1));
    const float delta = (qh & 0x8000) ? -kIq1Delta : kIq1Delta;
#pragma unroll
    for (int p = 0; p < S / 8; ++p)
      iq1_points(iq1s_grid(byte_of(r + 1, p) | (((qh >> (3 * (l0 + p))) & 7) << 8)), dl, delta, v + 8 * p);
  }
  template <int S> __device__ static void codes(const uint32_t* r, int e, uint32_t* cw, float& scale, float& offset) {
    static_assert(S == 16, "codes of a 16-element span");
    const int l0 = (e & 31) >> 3;
    const uint32_t qh = r[0] >> 16;
    const bool minus = (qh & 0x8000) != 0;
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const uint64_t g = grid_copy<T_IQ1_S>()[byte_of(r + 1, p) | (((qh >> (3 * (l0 + p))) & 7) << 8)];
      cw[2 * p] = iq1_codes((uint32_t)g, minus);
      cw[2 * p + 1] = iq1_codes((uint32_t)(g >> 32), minus);
    }
    iq1_map(__fmul_rn(half_f((uint16_t)r[0]), code_f(2 * ((qh >> 12) & 7) + 1)), scale, offset);
  }
};

// IQ1_M: qs[32], qh[16] (a nibble per 8 elements: index bits 8-10, delta sign), scales[8] (four
// u16: 3-bit scales per 16 elements, and d's fp16 bits in their top nibbles).
template <> struct Unpack<T_IQ1_M> : UnpackIq<Unpack<T_IQ1_M>> {
  static constexpr int kElems = 256, kBytes = 56, kAlign = gcd_c(kBytes, 16), kCodeBits = 5;
  template <int S> using Words = IntC<3>;
  template <int S> __device__ static void load(const uint8_t* b, int e, uint32_t* r) {
    const int ib = e >> 5, l0 = (e & 31) >> 3;
    r[0] = ld_u32(b + 48);
    r[1] = ld_u32(b + 52);
    const uint32_t q = S == 16 ? (uint32_t)ld_u16(b + 4 * ib + l0) : (uint32_t)ld_u8(b + 4 * ib + l0);
    r[2] = q | ((uint32_t)ld_u8(b + 32 + 2 * ib + (l0 >> 1)) << 16);
  }
  template <int S> __device__ static void decode(const uint32_t* r, int e, float* v) {
    const int ib = e >> 5, l0 = (e & 31) >> 3;
    const uint32_t d_bits = ((r[0] & 0xFFFF) >> 12) | ((r[0] >> 24) & 0x00F0) | (((r[1] & 0xFFFF) >> 4) & 0x0F00) |
                            ((r[1] >> 16) & 0xF000);
    const float d = half_f((uint16_t)d_bits);
    const uint32_t sc = ((ib >> 2 ? r[1] : r[0]) >> (16 * ((ib >> 1) & 1))) & 0xFFFF;  // no dynamic index into r
    const float dl = __fmul_rn(d, code_f(2 * ((sc >> (6 * (ib & 1) + 3 * (l0 >> 1))) & 7) + 1));
    const uint32_t qh = r[2] >> 16;
#pragma unroll
    for (int p = 0; p < S / 8; ++p) {
      const uint32_t h = qh >> (4 * ((l0 + p) & 1));
      iq1_points(iq1s_grid(byte_of(r + 2, p) | ((h & 7) << 8)), dl, (h & 8) ? -kIq1Delta : kIq1Delta, v + 8 * p);
    }
  }
  template <int S> __device__ static void codes(const uint32_t* r, int e, uint32_t* cw, float& scale, float& offset) {
    static_assert(S == 16, "codes of a 16-element span");
    const int ib = e >> 5, l0 = (e & 31) >> 3;
    const uint32_t d_bits = ((r[0] & 0xFFFF) >> 12) | ((r[0] >> 24) & 0x00F0) | (((r[1] & 0xFFFF) >> 4) & 0x0F00) |
                            ((r[1] >> 16) & 0xF000);
    const uint32_t sc = ((ib >> 2 ? r[1] : r[0]) >> (16 * ((ib >> 1) & 1))) & 0xFFFF;
    const uint32_t qh = r[2] >> 16;
#pragma unroll
    for (int p = 0; p < 2; ++p) {  // (a delta per 8 elements: in the codes, not the span's map)
      const uint32_t h = qh >> (4 * ((l0 + p) & 1));
      const uint64_t g = grid_copy<T_IQ1_M>()[byte_of(r + 2, p) | ((h & 7) << 8)];
      cw[2 * p] = iq1_codes((uint32_t)g, (h & 8) != 0);
      cw[2 * p + 1] = iq1_codes((uint32_t)(g >> 32), (h & 8) != 0);
    }
    iq1_map(__fmul_rn(half_f((uint16_t)d_bits), code_f(2 * ((sc >> (6 * (ib & 1) + 3 * (l0 >> 1))) & 7) + 1)), scale,
            offset);
  }
};

// ---- MXFP4 ---------------------------------------------------------------------------------------
// e, qs[16]: IQ4_NL's nibbles with E2M1 levels and the E8M0 scale 2^(e-128); 17-byte blocks are
// only byte-aligned, so every load is a byte load. Not affine in its codes (E2M1 levels), so it
// decodes as the I-quants do (UnpackIq: decode_fast is decode).
template <> struct Unpack<T_MXFP4> : UnpackIq<Unpack<T_MXFP4>> {
  static constexpr int kElems = 32, kBytes = 17, kAlign = gcd_c(kBytes, 16), kSameWords = 16;
  template <int S> using Words = IntC<1 + S / 4>;
  template <int S> __device__ static void load(const uint8_t* b, int e, uint32_t* r) {
    r[0] = ld_u8(b);
    ld_words<S, kAlign>(b + 1 + (e & 15), r + 1);
  }
  template <int S> __device__ static void decode(const uint32_t* r, int e, float* v) {
    const float d = e8m0_to_fp32_half((uint8_t)r[0]);
    const int sh = (e >> 4) * 4;
#pragma unroll
    for (int i = 0; i < S; ++i) v[i] = __fmul_rn(nibble_level<k_kvalues_mxfp4>((byte_of(r + 1, i) >> sh) & 0xF), d);
  }
  template <int S> __device__ static void codes(const uint32_t* r, int e, uint32_t* cw, float& scale, float& offset) {
    level_span_codes<k_kvalues_mxfp4, S>(r + 1, (e >> 4) * 4, e8m0_to_fp32_half((uint8_t)r[0]), cw, scale, offset);
  }
  template <int S>
  __device__ static void codes2(const uint32_t* r, int /*e*/, uint32_t* cw, uint32_t* cw1, float& scale,
                                float& offset) {
    level_pair_codes<k_kvalues_mxfp4, S>(r + 1, e8m0_to_fp32_half((uint8_t)r[0]), cw, cw1, scale, offset);
  }
};

// NVFP4: d[4] (UE4M3 per 16 elements), qs[32]; within sub-block s, byte 8s + j holds elements j (low
// nibble) and j + 8 (high). Both spans of 8 of a sub-block read its 8 bytes; 4-byte aligned.
template <> struct Unpack<T_NVFP4> : UnpackIq<Unpack<T_NVFP4>> {
  static constexpr int kElems = 64, kBytes = 36, kAlign = gcd_c(kBytes, 16), kCodeBits = 8;
  template <int S> using Words = IntC<3>;
  template <int S> __device__ static void load(const uint8_t* b, int e, uint32_t* r) {
    r[0] = ld_u8(b + (e >> 4));
    ld_words<8, kAlign>(b + 4 + 8 * (e >> 4), r + 1);
  }
  template <int S> __device__ static void decode(const uint32_t* r, int e, float* v) {
    const float d = ue4m3_to_fp32_half((uint8_t)r[0]);
    const int sh = S == 16 ? 0 : (e & 8) >> 1;  // a span of 8: the low or the high nibbles
#pragma unroll
    for (int i = 0; i < S; ++i)
      v[i] = __fmul_rn(nibble_level<k_kvalues_mxfp4>((byte_of(r + 1, i & 7) >> (sh + 4 * (i >> 3))) & 0xF), d);
  }
  // a 16-element span is one sub-block: its low nibbles, then its high ones
  template <int S> __device__ static void codes(const uint32_t* r, int e, uint32_t* cw, float& scale, float& offset) {
    static_assert(S == 16, "codes of a 16-element span");
    level_codes_pair<k_kvalues_mxfp4>(r[1], cw[0], cw[2]);
    level_codes_pair<k_kvalues_mxfp4>(r[2], cw[1], cw[3]);
    offset_map<128>(ue4m3_to_fp32_half((uint8_t)r[0]), scale, offset);
  }
};

// ---- TQ1_0, TQ2_0, Q1_0, Q2_0 ------------------------------------------------------------------------
// One fp16 d times (code - 1) (Q1_0: ±d), as Traits rounds it (offset_map<1>: -1 times d is exact). Their
// codes' map is exact (d u - d in one FMA is d (u - 1) rounded once), so decode_fast is codes + affine_codes
// and the staged kernels take their narrow codes.
__device__ __forceinline__ uint32_t tq1_mult(int n) { return (uint32_t)(uint8_t)(0x00F3511B090301ull >> (8 * n)); }
__device__ __forceinline__ uint32_t tq1_digit_u(uint32_t q, int n) {  // tq1_digit (block_math.h)
  return (((q * tq1_mult(n)) & 0xFFu) * 3u) >> 8;
}
// tq1_digit_u of the four bytes of w at once (digit n through its multiplier m = tq1_mult(n)), in two
// halves of two 16-bit lanes: a byte times m (< 2^16) and its low byte times 3 (< 2^10) stay in a lane.
__device__ __forceinline__ uint32_t tq1_digits4(uint32_t w, uint32_t m) {
  const uint32_t even = ((((w & 0x00FF00FFu) * m) & 0x00FF00FFu) * 3u >> 8) & 0x00FF00FFu;
  const uint32_t odd = (((((w >> 8) & 0x00FF00FFu) * m) & 0x00FF00FFu) * 3u >> 8) & 0x00FF00FFu;
  return even | (odd << 8);
}

// TQ1_0: qs[48], qh[4], d. A span lies in one of three runs: elements [0, 160) digit e/32 of qs[e%32],
// [160, 240) digit (e-160)/16 of qs[32 + e%16], [240, 256) digit (e-240)/4 of qh[e%4] (the 4 bytes).
template <> struct Unpack<T_TQ1_0> : UnpackBase<Unpack<T_TQ1_0>> {
  static constexpr int kElems = 256, kBytes = 54, kAlign = gcd_c(kBytes, 16), kCodeBits = 2;
  template <int S> using Words = IntC<1 + S / 4>;
  template <int S> __device__ static void load(const uint8_t* b, int e, uint32_t* r) {
    r[0] = ld_u16(b + 52);
    if (e >= 240) {  // 4 bytes: a span of 16 would read past the block
      ld_words<4, kAlign>(b + 48, r + 1);
#pragma unroll
      for (int i = 2; i < 1 + S / 4; ++i) r[i] = 0;
    } else {
      ld_words<S, kAlign>(b + (e < 160 ? (e & 31) : 32 + ((e - 160) & 15)), r + 1);
    }
  }
  template <int S> __device__ static void decode(const uint32_t* r, int e, float* v) {
    const float d = half_f((uint16_t)r[0]);
    if (e >= 240) {
#pragma unroll
      for (int i = 0; i < S; ++i) {
        const int t = e - 240 + i;
        v[i] = __fmul_rn(code_minus_f(tq1_digit_u((r[1] >> (8 * (t & 3))) & 0xFFu, t >> 2), 1), d);
      }
    } else {
      const int n = e < 160 ? (e >> 5) : ((e - 160) >> 4);
#pragma unroll
      for (int i = 0; i < S; ++i) v[i] = __fmul_rn(code_minus_f(tq1_digit_u(byte_of(r + 1, i), n), 1), d);
    }
  }
  template <int S> __device__ static void codes(const uint32_t* r, int e, uint32_t* cw, float& scale, float& offset) {
    if (e >= 240) {  // element 240 + i: digit i / 4 of qh[i % 4]
      const int n0 = S == 16 ? 0 : (e - 240) / 4;  // a span of 16 is the whole run: constant digits
#pragma unroll
      for (int j = 0; j < S / 4; ++j) cw[j] = tq1_digits4(r[1], tq1_mult(n0 + j));
    } else {
      const uint32_t m = tq1_mult(e < 160 ? (e >> 5) : ((e - 160) >> 4));
#pragma unroll
      for (int j = 0; j < S / 4; ++j) cw[j] = tq1_digits4(r[1 + j], m);
    }
    offset_map<1>(half_f((uint16_t)r[0]), scale, offset);
  }
};

// TQ2_0: qs[64], d; element 128c + 32l + m at bit 2l of qs[32c + m].
template <> struct Unpack<T_TQ2_0> : UnpackBase<Unpack<T_TQ2_0>> {
  static constexpr int kElems = 256, kBytes = 66, kAlign = gcd_c(kBytes, 16), kCodeBits = 2;
  template <int S> using Words = IntC<1 + S / 4>;
  template <int S> __device__ static void load(const uint8_t* b, int e, uint32_t* r) {
    r[0] = ld_u16(b + 64);
    ld_words<S, kAlign>(b + 32 * (e >> 7) + (e & 31), r + 1);
  }
  template <int S> __device__ static void decode(const uint32_t* r, int e, float* v) {
    const float d = half_f((uint16_t)r[0]);
    const int sh = 2 * ((e >> 5) & 3);
#pragma unroll
    for (int i = 0; i < S; ++i) v[i] = __fmul_rn(code_minus_f((byte_of(r + 1, i) >> sh) & 3, 1), d);
  }
  template <int S> __device__ static void codes(const uint32_t* r, int e, uint32_t* cw, float& scale, float& offset) {
    const int sh = 2 * ((e >> 5) & 3);
#pragma unroll
    for (int j = 0; j < S / 4; ++j) cw[j] = (r[1 + j] >> sh) & 0x03030303u;
    offset_map<1>(half_f((uint16_t)r[0]), scale, offset);
  }
};

// Q1_0: d, qs[16]; bit j of the little-endian bits is element j's sign (set: +d).
template <> struct Unpack<T_Q1_0> : UnpackBase<Unpack<T_Q1_0>> {
  static constexpr int kElems = 128, kBytes = 18, kAlign = gcd_c(kBytes, 16), kCodeBits = 1;
  template <int S> using Words = IntC<2>;
  template <int S> __device__ static void load(const uint8_t* b, int e, uint32_t* r) {
    r[0] = ld_u16(b);
    r[1] = ld_u16(b + 2 + 2 * (e >> 4)) >> (e & 8);  // bit i: element e + i
  }
  template <int S> __device__ static void decode(const uint32_t* r, int e, float* v) {
    const float d = half_f((uint16_t)r[0]), neg_d = -d;
#pragma unroll
    for (int i = 0; i < S; ++i) v[i] = (r[1] >> i) & 1u ? d : neg_d;
  }
  // codes: the bits themselves, x = 2d u - d (exact: d or -d)
  template <int S> __device__ static void codes(const uint32_t* r, int, uint32_t* cw, float& scale, float& offset) {
#pragma unroll
    for (int j = 0; j < S / 4; ++j) cw[j] = spread4(r[1] >> (4 * j));
    const float d = half_f((uint16_t)r[0]);
    scale = __fmul_rn(2.0f, d);
    offset = -d;
  }
};

// Q2_0: d, qs[16]; element j at bit 2(j%4) of qs[j/4]: a span of 8 is 2 bytes, of 16 four.
template <> struct Unpack<T_Q2_0> : UnpackBase<Unpack<T_Q2_0>> {
  static constexpr int kElems = 64, kBytes = 18, kAlign = gcd_c(kBytes, 16), kCodeBits = 2;
  template <int S> using Words = IntC<2>;
  template <int S> __device__ static void load(const uint8_t* b, int e, uint32_t* r) {
    r[0] = ld_u16(b);
    const uint8_t* q = b + 2 + (e >> 2);
    r[1] = S == 16 ? (uint32_t)ld_u16(q) | ((uint32_t)ld_u16(q + 2) << 16) : (uint32_t)ld_u16(q);
  }
  template <int S> __device__ static void decode(const uint32_t* r, int e, float* v) {
    const float d = half_f((uint16_t)r[0]);
#pragma unroll
    for (int i = 0; i < S; ++i) v[i] = __fmul_rn(code_minus_f((r[1] >> (2 * i)) & 3, 1), d);
  }
  template <int S> __device__ static void codes(const uint32_t* r, int, uint32_t* cw, float& scale, float& offset) {
#pragma unroll
    for (int j = 0; j < S / 4; ++j) {  // the four 2-bit fields of byte j, one a byte
      const uint32_t b = r[1] >> (8 * j);
      cw[j] = (b & 0x3u) | ((b & 0xCu) << 6) | ((b & 0x30u) << 12) | ((b & 0xC0u) << 18);
    }
    offset_map<1>(half_f((uint16_t)r[0]), scale, offset);
  }
};

// ---- INTb-gG -------------------------------------------------------------------------------------
// d, m, then the high-bit plane (b = 3, 5, 6), then the low-bit plane; layout in blocks.h.
template <int B, int G> struct UnpackInt : UnpackBase<UnpackInt<B, G>> {
  using blk = block_int<B, G>;
  static constexpr int kElems = G, kBytes = (int)sizeof(blk), kAlign = gcd_c(kBytes, 16), kCodeBits = B;
  static constexpr int kSameWords = B == 4 ? 16 : 0;  // a 32-element chunk's low and high nibbles
  static constexpr int kHeadWords = 1;                 // d and m
  static constexpr int kHighBytes = G * blk::high_bits / 8;
  template <int S> static constexpr int low_words() { return blk::low_bits == 2 ? 2 : S / 4; }
  template <int S> static constexpr int high_words() { return blk::high_bits == 2 ? 2 : blk::high_bits; }
  template <int S> using Words = IntC<1 + low_words<S>() + high_words<S>()>;
  template <int S> __device__ static void load(const uint8_t* b, int e, uint32_t* r) {
    const uint8_t* high = b + 4;
    const uint8_t* low = high + kHighBytes;
    const int c = e >> 5, j0 = e & 31;  // 32-element chunk, offset of the span inside it
    r[0] = ld_u32(b);
    if constexpr (blk::low_bits == 8) ld_words<S, 4>(low + e, r + 1);
    else if constexpr (blk::low_bits == 4) ld_words<S, 4>(low + 16 * c + (j0 & 15), r + 1);
    else ld_words<8, 4>(low + 8 * c, r + 1);
    uint32_t* rh = r + 1 + low_words<S>();
    if constexpr (blk::high_bits == 1) {
      rh[0] = ld_u8(high + (e >> 3));
      if constexpr (S == 16) rh[0] |= (uint32_t)ld_u8(high + (e >> 3) + 1) << 8;
    } else if constexpr (blk::high_bits == 2) {
      ld_words<8, 4>(high + 8 * c, rh);
    }
  }
  template <int S> __device__ static void decode(const uint32_t* r, int e, float* v) {
    const float d = half_f(r[0] & 0xFFFF), m = half_f(r[0] >> 16);
    const uint32_t* rl = r + 1;
    const uint32_t* rh = r + 1 + low_words<S>();
    const int j0 = e & 31;
#pragma unroll
    for (int i = 0; i < S; ++i) {
      uint32_t q;
      if constexpr (blk::low_bits == 8) q = byte_of(rl, i);
      else if constexpr (blk::low_bits == 4) q = (byte_of(rl, i) >> ((j0 >> 4) * 4)) & 0xF;
      else q = (byte_of(rl, i & 7) >> (2 * ((j0 + i) >> 3))) & 3;  // byte 8c + j%8, shift 2*(j/8)
      if constexpr (blk::high_bits == 1) q |= ((rh[0] >> i) & 1u) << blk::low_bits;
      else if constexpr (blk::high_bits == 2) q |= ((byte_of(rh, i & 7) >> (2 * ((j0 + i) >> 3))) & 3) << blk::low_bits;
      v[i] = __fadd_rn(__fmul_rn(code_f(q), d), m);
    }
  }
  template <int S> __device__ static void codes(const uint32_t* r, int e, uint32_t* cw, float& scale, float& offset) {
    const float d = half_f(r[0] & 0xFFFF), m = half_f(r[0] >> 16);
    const uint32_t* rl = r + 1;
    const uint32_t* rh = r + 1 + low_words<S>();
    const int j0 = e & 31;
#pragma unroll
    for (int j = 0; j < S / 4; ++j) {  // elements 4j .. 4j+3 of the span
      uint32_t q;
      if constexpr (blk::low_bits == 8) q = rl[j];
      else if constexpr (blk::low_bits == 4) q = (rl[j] >> ((j0 >> 4) * 4)) & 0x0F0F0F0Fu;
      else q = (rl[j & 1] >> (2 * ((j0 + 4 * j) >> 3))) & 0x03030303u;
      if constexpr (blk::high_bits == 1) q |= spread4(rh[0] >> (4 * j)) << blk::low_bits;
      else if constexpr (blk::high_bits == 2) q |= ((rh[j & 1] >> (2 * ((j0 + 4 * j) >> 3))) & 0x03030303u) << blk::low_bits;
      cw[j] = q;
    }
    scale = d;
    offset = m;
  }
};

#define LT_UNPACK_INT(T) \
  template <> struct Unpack<T> : UnpackInt<int_type_bits(T), int_type_group(T)> {};
LT_TYPES_INT(LT_UNPACK_INT)
#undef LT_UNPACK_INT

// The types whose values are an affine map of small codes (Unpack<T>::codes): every type.
template <int T>
concept HasCodes = requires(const uint32_t* r, uint32_t* cw, float& s, float& z) {
  Unpack<T>::template codes<16>(r, 0, cw, s, z);
};
// The types that give both spans of a kSameWords pair (e, e + 16: the low and the high nibbles of the
// same words, one scale) from one lookup of each word (Unpack<T>::codes2): the 4-bit table types.
template <int T>
concept HasCodes2 = requires(const uint32_t* r, uint32_t* cw, float& s, float& z) {
  Unpack<T>::template codes2<16>(r, 0, cw, cw, s, z);
};

}  // namespace lowtune::cuda
