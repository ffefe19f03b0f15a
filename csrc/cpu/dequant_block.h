// Fast per-block dequantization for the CPU kernels, bit-exact with block_math.h.
//
// dequant_block<T>(blk, y) writes the block's kElems floats, the same bits as
// Traits<T>::dequant. Most Traits loops already vectorize under -O3 (a fixed-length loop of
// "scale * (float)code - min" per sub-block); the types whose reference loop does not
// (Q6_K's interleaved scale index, INTb-gG's per-element bit gathering) are rewritten here:
// codes are unpacked 8 at a time as the bytes of a 64-bit word, then widened and mapped to
// floats 16 at a time with SIMD, with the reference's operations in the reference's order
// (no FMA contraction: -ffp-contract=off and explicit mul/add intrinsics).
#pragma once
#include <cstring>

#include "../block_math.h"

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

// Inline everything a per-block function calls (fp16 conversion, scale unpacking): called once
// per block from the kernels' inner loops, a call per scale costs more than the math.
#if defined(__GNUC__)
#define LT_FLATTEN __attribute__((flatten))
#else
#define LT_FLATTEN
#endif

namespace lowtune::cpu {

#if defined(__F16C__)
// The blocks' fp16 scales and mins through the F16C instruction: fp16.h's portable conversion
// costs ~10 instructions with branches, as much as decoding a whole legacy block. Same value for
// every input but a NaN (whose payload may differ). It hides lowtune::fp16_to_fp32 for the CPU
// kernels that include this file.
inline float fp16_to_fp32(uint16_t h) { return _cvtsh_ss(h); }
#endif

template <int T>
struct FastDequant {
  using block = typename Traits<T>::block;
  LT_FLATTEN static inline void run(const block* b, float* y) { Traits<T>::dequant(b, y); }
};

// 16 codes, bytes of two little-endian words (c0: codes 0-7, c1: codes 8-15), to floats:
//   affine:   y[i] = (float)q[i] * d + m          (multiply, then add: the reference's order)
//   centered: y[i] = s * (float)(q[i] - offset)
// The codes stay in registers: building them in memory with 8-byte stores and reloading 16
// bytes would stall on store forwarding.
inline void codes16_affine(uint64_t c0, uint64_t c1, float d, float m, float* __restrict y) {
#if defined(__AVX512F__)
  const __m512i qi = _mm512_cvtepu8_epi32(_mm_set_epi64x((long long)c1, (long long)c0));
  _mm512_storeu_ps(y, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(qi), _mm512_set1_ps(d)), _mm512_set1_ps(m)));
#elif defined(__AVX2__)
  const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
  const __m256i q0 = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)c0));
  const __m256i q1 = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)c1));
  _mm256_storeu_ps(y, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q0), vd), vm));
  _mm256_storeu_ps(y + 8, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q1), vd), vm));
#else
  for (int i = 0; i < 8; ++i) y[i] = (float)((c0 >> (8 * i)) & 0xFF) * d + m;
  for (int i = 0; i < 8; ++i) y[i + 8] = (float)((c1 >> (8 * i)) & 0xFF) * d + m;
#endif
}

inline void codes16_centered(uint64_t c0, uint64_t c1, int offset, float s, float* __restrict y) {
#if defined(__AVX512F__)
  const __m512i qi = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_set_epi64x((long long)c1, (long long)c0)),
                                      _mm512_set1_epi32(offset));
  _mm512_storeu_ps(y, _mm512_mul_ps(_mm512_set1_ps(s), _mm512_cvtepi32_ps(qi)));
#elif defined(__AVX2__)
  const __m256 vs = _mm256_set1_ps(s);
  const __m256i off = _mm256_set1_epi32(offset);
  const __m256i q0 = _mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)c0)), off);
  const __m256i q1 = _mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)c1)), off);
  _mm256_storeu_ps(y, _mm256_mul_ps(vs, _mm256_cvtepi32_ps(q0)));
  _mm256_storeu_ps(y + 8, _mm256_mul_ps(vs, _mm256_cvtepi32_ps(q1)));
#else
  for (int i = 0; i < 8; ++i) y[i] = s * (float)((int)((c0 >> (8 * i)) & 0xFF) - offset);
  for (int i = 0; i < 8; ++i) y[i + 8] = s * (float)((int)((c1 >> (8 * i)) & 0xFF) - offset);
#endif
}

// Byte t of kBitsToBytes.v[b] is bit t of b: spreads one byte of a 1-bit plane over 8 bytes.
struct BitsToBytes {
  uint64_t v[256];
  constexpr BitsToBytes() : v() {
    for (int b = 0; b < 256; ++b)
      for (int t = 0; t < 8; ++t) v[b] |= (uint64_t)((b >> t) & 1) << (8 * t);
  }
};
inline constexpr BitsToBytes kBitsToBytes{};

inline uint64_t load_u64(const uint8_t* p) { uint64_t v; std::memcpy(&v, p, 8); return v; }

// Q6_K: per 128-half, four 32-element parts p (elements 32p + l); part p takes its low nibble
// from ql[l + 32 (p & 1)] >> 4 (p >> 1) and its top two bits from qh[l] >> 2p; sub-block
// (16 elements) h of part p has scale sc[h + 2p]. x = (d * sc) * (q - 32), as the reference
// evaluates d * sc * q.
template <>
struct FastDequant<T_Q6_K> {
  static constexpr uint64_t kRep = 0x0101010101010101ull;
  LT_FLATTEN static inline void run(const block_q6_K* __restrict b, float* __restrict y) {
    const float d = fp16_to_fp32(b->d);
    for (int half = 0; half < 2; ++half) {
      const uint8_t* ql = b->ql + 64 * half;
      const uint8_t* qh = b->qh + 32 * half;
      const int8_t* sc = b->scales + 8 * half;
      for (int p = 0; p < 4; ++p) {
        uint64_t q[4];  // 8 codes each
        for (int w = 0; w < 4; ++w) {
          const uint64_t lo = (load_u64(ql + 32 * (p & 1) + 8 * w) >> (4 * (p >> 1))) & (0x0F * kRep);
          const uint64_t hi = (load_u64(qh + 8 * w) >> (2 * p)) & (0x03 * kRep);
          q[w] = lo | (hi << 4);
        }
        float* out = y + 128 * half + 32 * p;
        codes16_centered(q[0], q[1], 32, d * (float)sc[2 * p], out);
        codes16_centered(q[2], q[3], 32, d * (float)sc[2 * p + 1], out + 16);
      }
    }
  }
};

#if defined(__AVX512F__)
// Legacy 32-element blocks with AVX-512: qs[j] holds element j (low nibble) and j + 16 (high);
// Q5's fifth bit of element e is bit e of qh. Same operations, same order as the reference.
LT_FLATTEN inline __m512i q4_low(const uint8_t* qs) {
  return _mm512_and_si512(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs))), _mm512_set1_epi32(0xF));
}
LT_FLATTEN inline __m512i q4_high(const uint8_t* qs) {
  return _mm512_srli_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs))), 4);
}
// Bits first..first+15 of qh as 16 lanes of 0 or 16.
LT_FLATTEN inline __m512i q5_fifth_bits(uint32_t qh, int first) {
  const __m512i lanes = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(first));
  return _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)qh), lanes), _mm512_set1_epi32(1)), 4);
}

template <>
struct FastDequant<T_Q4_0> {
  LT_FLATTEN static inline void run(const block_q4_0* __restrict b, float* __restrict y) {
    const __m512 d = _mm512_set1_ps(fp16_to_fp32(b->d));
    const __m512i eight = _mm512_set1_epi32(8);
    _mm512_storeu_ps(y, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q4_low(b->qs), eight)), d));
    _mm512_storeu_ps(y + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q4_high(b->qs), eight)), d));
  }
};

template <>
struct FastDequant<T_Q4_1> {
  LT_FLATTEN static inline void run(const block_q4_1* __restrict b, float* __restrict y) {
    const __m512 d = _mm512_set1_ps(fp16_to_fp32(b->d)), m = _mm512_set1_ps(fp16_to_fp32(b->m));
    _mm512_storeu_ps(y, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q4_low(b->qs)), d), m));
    _mm512_storeu_ps(y + 16, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q4_high(b->qs)), d), m));
  }
};

template <>
struct FastDequant<T_Q5_0> {
  LT_FLATTEN static inline void run(const block_q5_0* __restrict b, float* __restrict y) {
    const __m512 d = _mm512_set1_ps(fp16_to_fp32(b->d));
    const uint32_t qh = load_u32_le(b->qh);
    const __m512i sixteen = _mm512_set1_epi32(16);
    const __m512i q0 = _mm512_or_si512(q4_low(b->qs), q5_fifth_bits(qh, 0));
    const __m512i q1 = _mm512_or_si512(q4_high(b->qs), q5_fifth_bits(qh, 16));
    _mm512_storeu_ps(y, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q0, sixteen)), d));
    _mm512_storeu_ps(y + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q1, sixteen)), d));
  }
};

template <>
struct FastDequant<T_Q5_1> {
  LT_FLATTEN static inline void run(const block_q5_1* __restrict b, float* __restrict y) {
    const __m512 d = _mm512_set1_ps(fp16_to_fp32(b->d)), m = _mm512_set1_ps(fp16_to_fp32(b->m));
    const uint32_t qh = load_u32_le(b->qh);
    const __m512i q0 = _mm512_or_si512(q4_low(b->qs), q5_fifth_bits(qh, 0));
    const __m512i q1 = _mm512_or_si512(q4_high(b->qs), q5_fifth_bits(qh, 16));
    _mm512_storeu_ps(y, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q0), d), m));
    _mm512_storeu_ps(y + 16, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q1), d), m));
  }
};

template <>
struct FastDequant<T_Q8_0> {
  LT_FLATTEN static inline void run(const block_q8_0* __restrict b, float* __restrict y) {
    const __m512 d = _mm512_set1_ps(fp16_to_fp32(b->d));
    for (int h = 0; h < 2; ++h) {
      const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b->qs + 16 * h)));
      _mm512_storeu_ps(y + 16 * h, _mm512_mul_ps(_mm512_cvtepi32_ps(q), d));
    }
  }
};

// Q4_K with AVX-512: each 16 bytes of qs widen once to 16 int32 lanes, whose low nibbles are
// elements l..l+15 of sub-block 2j and high nibbles the same of sub-block 2j+1.
// x = d1 * q - m1 (multiply, then subtract), as the reference.
template <>
struct FastDequant<T_Q4_K> {
  LT_FLATTEN static inline void run(const block_q4_K* __restrict b, float* __restrict y) {
    const float d = fp16_to_fp32(b->d), dmin = fp16_to_fp32(b->dmin);
    const __m512i nib = _mm512_set1_epi32(0xF);
    for (int j = 0; j < 4; ++j) {
      uint8_t sc, mn;
      get_scale_min_k4(2 * j, b->scales, &sc, &mn);
      const __m512 d1 = _mm512_set1_ps(d * sc), m1 = _mm512_set1_ps(dmin * mn);
      get_scale_min_k4(2 * j + 1, b->scales, &sc, &mn);
      const __m512 d2 = _mm512_set1_ps(d * sc), m2 = _mm512_set1_ps(dmin * mn);
      for (int h = 0; h < 2; ++h) {
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b->qs + 32 * j + 16 * h)));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(q, nib));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
        _mm512_storeu_ps(y + 64 * j + 16 * h, _mm512_sub_ps(_mm512_mul_ps(d1, lo), m1));
        _mm512_storeu_ps(y + 64 * j + 32 + 16 * h, _mm512_sub_ps(_mm512_mul_ps(d2, hi), m2));
      }
    }
  }
};

// Q2_K: per 128-half n, shift s (0, 2, 4, 6) and 16-byte half h: elements (q[16h + l] >> s) & 3
// with scale byte is = 8n + s + h (the reference's running index).
// x = (d * (sc & 15)) * q - dmin * (sc >> 4).
template <>
struct FastDequant<T_Q2_K> {
  LT_FLATTEN static inline void run(const block_q2_K* __restrict b, float* __restrict y) {
    const float d = fp16_to_fp32(b->d), dmin = fp16_to_fp32(b->dmin);
    const __m512i three = _mm512_set1_epi32(3);
    int is = 0;
    for (int n = 0; n < 2; ++n) {
      const __m512i q[2] = {
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b->qs + 32 * n))),
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b->qs + 32 * n + 16)))};
      for (int shift = 0; shift < 8; shift += 2) {
        for (int h = 0; h < 2; ++h, y += 16) {
          const uint8_t sc = b->scales[is++];
          const __m512 dl = _mm512_set1_ps(d * (float)(sc & 0xF)), ml = _mm512_set1_ps(dmin * (float)(sc >> 4));
          const __m512 v = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(q[h], shift), three));
          _mm512_storeu_ps(y, _mm512_sub_ps(_mm512_mul_ps(dl, v), ml));
        }
      }
    }
  }
};

// Q3_K: as Q2_K's layout for the low two bits; hmask bit (4n + s/2) of byte l set means no -4.
// x = (d * sc) * v with the 6-bit signed scales of q3_K_scales.
template <>
struct FastDequant<T_Q3_K> {
  LT_FLATTEN static inline void run(const block_q3_K* __restrict b, float* __restrict y) {
    const float d_all = fp16_to_fp32(b->d);
    int8_t sc[16];
    q3_K_scales(b->scales, sc);
    const __m512i three = _mm512_set1_epi32(3), four = _mm512_set1_epi32(4);
    const __m512i hm[2] = {_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b->hmask))),
                           _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b->hmask + 16)))};
    int is = 0, bit = 0;
    for (int n = 0; n < 2; ++n) {
      const __m512i q[2] = {
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b->qs + 32 * n))),
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b->qs + 32 * n + 16)))};
      for (int shift = 0; shift < 8; shift += 2, ++bit) {
        const __m512i m = _mm512_set1_epi32(1 << bit);
        for (int h = 0; h < 2; ++h, y += 16) {
          const __m512 dl = _mm512_set1_ps(d_all * (float)sc[is++]);
          const __m512i low = _mm512_and_si512(_mm512_srli_epi32(q[h], shift), three);
          const __mmask16 no_offset = _mm512_test_epi32_mask(hm[h], m);
          const __m512i v = _mm512_mask_sub_epi32(low, (__mmask16)~no_offset, low, four);
          _mm512_storeu_ps(y, _mm512_mul_ps(dl, _mm512_cvtepi32_ps(v)));
        }
      }
    }
  }
};

// Q5_K: Q4_K's nibbles plus a fifth bit: bit 2j (first 32) / 2j+1 (next 32) of qh[l].
template <>
struct FastDequant<T_Q5_K> {
  LT_FLATTEN static inline void run(const block_q5_K* __restrict b, float* __restrict y) {
    const float d = fp16_to_fp32(b->d), dmin = fp16_to_fp32(b->dmin);
    const __m512i nib = _mm512_set1_epi32(0xF), one = _mm512_set1_epi32(1);
    const __m512i qh[2] = {_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b->qh))),
                           _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b->qh + 16)))};
    for (int j = 0; j < 4; ++j) {
      uint8_t sc, mn;
      get_scale_min_k4(2 * j, b->scales, &sc, &mn);
      const __m512 d1 = _mm512_set1_ps(d * sc), m1 = _mm512_set1_ps(dmin * mn);
      get_scale_min_k4(2 * j + 1, b->scales, &sc, &mn);
      const __m512 d2 = _mm512_set1_ps(d * sc), m2 = _mm512_set1_ps(dmin * mn);
      for (int h = 0; h < 2; ++h) {
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b->qs + 32 * j + 16 * h)));
        const __m512i h1 = _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(qh[h], 2 * j), one), 4);
        const __m512i h2 = _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(qh[h], 2 * j + 1), one), 4);
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_or_si512(_mm512_and_si512(q, nib), h1));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_or_si512(_mm512_srli_epi32(q, 4), h2));
        _mm512_storeu_ps(y + 64 * j + 16 * h, _mm512_sub_ps(_mm512_mul_ps(d1, lo), m1));
        _mm512_storeu_ps(y + 64 * j + 32 + 16 * h, _mm512_sub_ps(_mm512_mul_ps(d2, hi), m2));
      }
    }
  }
};
#endif

#if defined(__AVX2__)
// I-quants and MXFP4 with AVX2 (AVX-512 machines have it too): a grid point's 8 byte values widen to 8
// float lanes, are scaled, and take their signs by flipping the sign bit (exactly the
// reference's (scale * g) * ±1); IQ4, MXFP4 and NVFP4 levels come from a byte shuffle of the
// 16-level table; IQ1 adds delta before scaling, as the reference.
inline __m256 iq_u8x8(uint64_t g) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)g))); }
inline __m256 iq_i8x8(uint64_t g) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128((long long)g))); }
inline __m256 iq_signed(__m256 v, uint32_t signs) {  // lane j negated where bit j of signs is set
  const __m256i bits = _mm256_srlv_epi32(_mm256_set1_epi32((int)signs), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_xor_ps(v, _mm256_castsi256_ps(_mm256_slli_epi32(bits, 31)));
}
inline void iq_store_point(float* y, float scale, uint64_t g, uint32_t signs) {
  _mm256_storeu_ps(y, iq_signed(_mm256_mul_ps(_mm256_set1_ps(scale), iq_u8x8(g)), signs));
}
// 32 4-bit codes (16 bytes: low nibbles first) -> 32 floats scale * table[code], for a table of 16
// int8 levels (IQ4_NL's, MXFP4's).
inline void nibbles_store32(float* y, float scale, const uint8_t* qs, const int8_t* table) {
  const __m128i levels = _mm_loadu_si128(reinterpret_cast<const __m128i*>(table));
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i lo = _mm_shuffle_epi8(levels, _mm_and_si128(q, _mm_set1_epi8(0xF)));
  const __m128i hi = _mm_shuffle_epi8(levels, _mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(0xF)));
  const __m256 s = _mm256_set1_ps(scale);
  _mm256_storeu_ps(y, _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo))));
  _mm256_storeu_ps(y + 8, _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)))));
  _mm256_storeu_ps(y + 16, _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi))));
  _mm256_storeu_ps(y + 24, _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)))));
}

// 16 4-bit codes (8 bytes: low nibbles first) -> 16 floats scale * table[code] (NVFP4's sub-blocks).
inline void nibbles_store16(float* y, float scale, const uint8_t* qs, const int8_t* table) {
  const __m128i levels = _mm_loadu_si128(reinterpret_cast<const __m128i*>(table));
  const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs));
  const __m128i lo = _mm_and_si128(q, _mm_set1_epi8(0xF)), hi = _mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(0xF));
  const __m128i v = _mm_shuffle_epi8(levels, _mm_unpacklo_epi64(lo, hi));
  const __m256 s = _mm256_set1_ps(scale);
  _mm256_storeu_ps(y, _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))));
  _mm256_storeu_ps(y + 8, _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)))));
}

template <>
struct FastDequant<T_IQ4_NL> {
  LT_FLATTEN static inline void run(const block_iq4_nl* __restrict b, float* __restrict y) {
    nibbles_store32(y, fp16_to_fp32(b->d), b->qs, k_kvalues_iq4nl);
  }
};

template <>
struct FastDequant<T_IQ4_XS> {
  LT_FLATTEN static inline void run(const block_iq4_xs* __restrict b, float* __restrict y) {
    const float d = fp16_to_fp32(b->d);
    for (int ib = 0; ib < 8; ++ib) {
      const int ls = ((b->scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF) | (((b->scales_h >> (2 * ib)) & 3) << 4);
      nibbles_store32(y + 32 * ib, d * (float)(ls - 32), b->qs + 16 * ib, k_kvalues_iq4nl);
    }
  }
};

// MXFP4: IQ4_NL's nibbles with E2M1 levels; level * d and d * level are the same rounding.
template <>
struct FastDequant<T_MXFP4> {
  LT_FLATTEN static inline void run(const block_mxfp4* __restrict b, float* __restrict y) {
    nibbles_store32(y, e8m0_to_fp32_half(b->e), b->qs, k_kvalues_mxfp4);
  }
};

// NVFP4: MXFP4's levels, four sub-blocks of 16 with their own UE4M3 scale.
template <>
struct FastDequant<T_NVFP4> {
  LT_FLATTEN static inline void run(const block_nvfp4* __restrict b, float* __restrict y) {
    for (int s = 0; s < 4; ++s)
      nibbles_store16(y + 16 * s, ue4m3_to_fp32_half(b->d[s]), b->qs + 8 * s, k_kvalues_mxfp4);
  }
};

template <>
struct FastDequant<T_IQ3_XXS> {
  LT_FLATTEN static inline void run(const block_iq3_xxs* __restrict b, float* __restrict y) {
    const float d = fp16_to_fp32(b->d);
    for (int ib = 0; ib < 8; ++ib) {
      const uint8_t* qs = b->qs + 8 * ib;
      const uint32_t aux = load_u32_le(b->qs + QK_K / 4 + 4 * ib);
      const float db = d * (0.5f + (float)(aux >> 28)) * 0.5f;
      for (int l = 0; l < 4; ++l)
        iq_store_point(y + 32 * ib + 8 * l, db, iq3xxs_grid(qs[2 * l]) | ((uint64_t)iq3xxs_grid(qs[2 * l + 1]) << 32),
                       ksigns_iq2xs((aux >> (7 * l)) & 127));
    }
  }
};

template <>
struct FastDequant<T_IQ3_S> {
  LT_FLATTEN static inline void run(const block_iq3_s* __restrict b, float* __restrict y) {
    const float d = fp16_to_fp32(b->d);
    for (int ib = 0; ib < 8; ++ib) {
      const float db = d * (float)(1 + 2 * ((b->scales[ib / 2] >> (4 * (ib % 2))) & 0xF));
      const uint8_t* qs = b->qs + 8 * ib;
      const int qh = b->qh[ib];
      for (int l = 0; l < 4; ++l) {
        const uint64_t g = iq3s_grid(qs[2 * l] | ((qh << (8 - 2 * l)) & 256)) |
                           ((uint64_t)iq3s_grid(qs[2 * l + 1] | ((qh << (7 - 2 * l)) & 256)) << 32);
        iq_store_point(y + 32 * ib + 8 * l, db, g, b->signs[4 * ib + l]);
      }
    }
  }
};

template <>
struct FastDequant<T_IQ2_XXS> {
  LT_FLATTEN static inline void run(const block_iq2_xxs* __restrict b, float* __restrict y) {
    const float d = fp16_to_fp32(b->d);
    const uint8_t* q = reinterpret_cast<const uint8_t*>(b->qs);
    for (int ib = 0; ib < 8; ++ib) {
      const uint32_t aux = load_u32_le(q + 8 * ib + 4);
      const float db = d * (0.5f + (float)(aux >> 28)) * 0.25f;
      for (int l = 0; l < 4; ++l)
        iq_store_point(y + 32 * ib + 8 * l, db, iq2xxs_grid(q[8 * ib + l]), ksigns_iq2xs((aux >> (7 * l)) & 127));
    }
  }
};

template <>
struct FastDequant<T_IQ2_XS> {
  LT_FLATTEN static inline void run(const block_iq2_xs* __restrict b, float* __restrict y) {
    const float d = fp16_to_fp32(b->d);
    for (int ib = 0; ib < 8; ++ib) {
      const float db[2] = {d * (0.5f + (float)(b->scales[ib] & 0xF)) * 0.25f,
                           d * (0.5f + (float)(b->scales[ib] >> 4)) * 0.25f};
      for (int l = 0; l < 4; ++l) {
        const uint16_t q = b->qs[4 * ib + l];
        iq_store_point(y + 32 * ib + 8 * l, db[l / 2], iq2xs_grid(q & 511), ksigns_iq2xs(q >> 9));
      }
    }
  }
};

template <>
struct FastDequant<T_IQ2_S> {
  LT_FLATTEN static inline void run(const block_iq2_s* __restrict b, float* __restrict y) {
    const float d = fp16_to_fp32(b->d);
    for (int ib = 0; ib < 8; ++ib) {
      const float db[2] = {d * (0.5f + (float)(b->scales[ib] & 0xF)) * 0.25f,
                           d * (0.5f + (float)(b->scales[ib] >> 4)) * 0.25f};
      for (int l = 0; l < 4; ++l)
        iq_store_point(y + 32 * ib + 8 * l, db[l / 2], iq2s_grid(b->qs[4 * ib + l] | ((b->qh[ib] << (8 - 2 * l)) & 0x300)),
                       b->qs[QK_K / 8 + 4 * ib + l]);
    }
  }
};

// ±1/8 from a sign bit (bit 0 of neg), without a branch: random data would mispredict half of them.
inline float iq1_delta(uint32_t neg) { return bits_to_float(float_to_bits(kIq1Delta) | (neg << 31)); }

template <>
struct FastDequant<T_IQ1_S> {
  LT_FLATTEN static inline void run(const block_iq1_s* __restrict b, float* __restrict y) {
    const float d = fp16_to_fp32(b->d);
    for (int ib = 0; ib < 8; ++ib) {
      const int qh = b->qh[ib];
      const __m256 dl = _mm256_set1_ps(d * (float)(2 * ((qh >> 12) & 7) + 1));
      const __m256 delta = _mm256_set1_ps(iq1_delta((uint32_t)qh >> 15));
      for (int l = 0; l < 4; ++l) {
        const uint64_t g = iq1s_grid(b->qs[4 * ib + l] | (((qh >> (3 * l)) & 7) << 8));
        _mm256_storeu_ps(y + 32 * ib + 8 * l, _mm256_mul_ps(dl, _mm256_add_ps(iq_i8x8(g), delta)));
      }
    }
  }
};

template <>
struct FastDequant<T_IQ1_M> {
  LT_FLATTEN static inline void run(const block_iq1_m* __restrict b, float* __restrict y) {
    const float d = fp16_to_fp32(iq1m_d_bits(b));
    for (int ib = 0; ib < 8; ++ib) {
      const int sc = b->scales[2 * (ib / 2)] | (b->scales[2 * (ib / 2) + 1] << 8);
      const __m256 dl[2] = {_mm256_set1_ps(d * (float)(2 * ((sc >> (6 * (ib % 2))) & 7) + 1)),
                            _mm256_set1_ps(d * (float)(2 * ((sc >> (6 * (ib % 2) + 3)) & 7) + 1))};
      for (int l = 0; l < 4; ++l) {
        const uint32_t h = b->qh[2 * ib + l / 2] >> (4 * (l % 2));
        const __m256 delta = _mm256_set1_ps(iq1_delta((h >> 3) & 1));
        const uint64_t g = iq1s_grid(b->qs[4 * ib + l] | ((h & 7) << 8));
        _mm256_storeu_ps(y + 32 * ib + 8 * l, _mm256_mul_ps(dl[l / 2], _mm256_add_ps(iq_i8x8(g), delta)));
      }
    }
  }
};
#endif

// INTb-gG: codes are unpacked 8 at a time in a 64-bit word (per 32-element chunk, four runs of
// 8 elements whose source bytes are consecutive and whose shifts are constant; layout in
// blocks.h), then mapped to floats with the reference's x = (float)q * d + m.
template <int B, int G>
struct FastDequantInt {
  using blk = block_int<B, G>;
  static constexpr int LB = blk::low_bits, HB = blk::high_bits;
  static constexpr uint64_t kRep = 0x0101010101010101ull;
  LT_FLATTEN static inline void run(const blk* __restrict b, float* __restrict y) {
    const uint8_t* high = b->planes;
    const uint8_t* low = b->planes + G * HB / 8;
    const float d = fp16_to_fp32(b->d), m = fp16_to_fp32(b->m);
    for (int c = 0; c < G / 32; ++c) {
      uint64_t q[4];  // codes 32c + 8s ... 32c + 8s + 7
      for (int s = 0; s < 4; ++s) {
        uint64_t v;
        if constexpr (LB == 8) v = load_u64(low + 32 * c + 8 * s);
        else if constexpr (LB == 4) v = (load_u64(low + 16 * c + 8 * (s & 1)) >> (4 * (s >> 1))) & (0x0F * kRep);
        else v = (load_u64(low + 8 * c) >> (2 * s)) & (0x03 * kRep);
        // High bits (at most 3) shifted by LB <= 4 stay inside their byte.
        if constexpr (HB == 1) v |= kBitsToBytes.v[high[4 * c + s]] << LB;
        if constexpr (HB == 2) v |= ((load_u64(high + 8 * c) >> (2 * s)) & (0x03 * kRep)) << LB;
        q[s] = v;
      }
      codes16_affine(q[0], q[1], d, m, y + 32 * c);
      codes16_affine(q[2], q[3], d, m, y + 32 * c + 16);
    }
  }
};

#define LT_FAST_INT(T) \
  template <> struct FastDequant<T> : FastDequantInt<int_type_bits(T), int_type_group(T)> {};
LT_TYPES_INT(LT_FAST_INT)
#undef LT_FAST_INT

template <int T>
inline void dequant_block(const typename Traits<T>::block* b, float* y) { FastDequant<T>::run(b, y); }

}  // namespace lowtune::cpu
