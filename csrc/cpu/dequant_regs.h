// Register-resident dequantization of the 32-element legacy blocks (and IQ4_NL, MXFP4), for the M <= 4 kernels
// (decoding), whose cost is the decoding itself: RegDequant<T>::run(blk, regs::half_table(), w)
// sets w[0..kVecs) to the block's 32 values, kLanes per vector in logical order, with the same bits as
// dequant_block<T> (the reference's operations in the reference's order), but without writing
// them to memory and reading them back. kAvailable is false for the types without one.
#pragma once
#include "../block_math.h"
#include "dequant_block.h"
#include "simd.h"

namespace lowtune::cpu {

template <int T>
struct RegDequant {
  static constexpr bool kAvailable = false;
};

// Inlined into the kernel's loop, so that the values stay in registers (a call passes them
// through memory).
#if defined(__GNUC__)
#define LT_REG_INLINE __attribute__((always_inline, flatten)) inline
#else
#define LT_REG_INLINE inline
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
namespace regs {
using simd::vf;
constexpr int kVecs = QK / simd::kLanes;

// Every fp16 value as fp32 (256 KiB, built once): a block's scale then reaches all lanes with a
// single broadcast load, where converting it takes three vector instructions on the same two
// ports the decoding itself needs.
struct HalfTable {
  float v[65536];
  HalfTable() {
    for (uint32_t h = 0; h < 65536; ++h) v[h] = lowtune::fp16_to_fp32((uint16_t)h);
  }
};
inline const float* half_table() {
  static const HalfTable table;
  return table.v;
}
inline vf scale(const float* table, uint16_t h) { return simd::set1(table[h]); }

#if defined(__AVX512F__)
using vi = __m512i;
// codes[v] = the block's byte codes for elements 16v..16v+15 (low nibbles, then high nibbles)
inline void nibbles(const uint8_t* qs, vi (&q)[kVecs]) {
  const vi all = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
  q[0] = _mm512_and_si512(all, _mm512_set1_epi32(0xF));
  q[1] = _mm512_srli_epi32(all, 4);
}
// Bits first..first+kLanes-1 of qh as lanes of 0 or 16.
inline vi fifth_bits(uint32_t qh, int first) { return q5_fifth_bits(qh, first); }
inline void bytes_signed(const int8_t* qs, vi (&q)[kVecs]) {
  for (int v = 0; v < kVecs; ++v)
    q[v] = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16 * v)));
}
// q[v] = table[code] (16 int8 levels: IQ4_NL's, MXFP4's) of the block's nibbles, in nibbles' order
inline void nibble_levels(const uint8_t* qs, const int8_t* table, vi (&q)[kVecs]) {
  const __m128i levels = _mm_loadu_si128(reinterpret_cast<const __m128i*>(table));
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  q[0] = _mm512_cvtepi8_epi32(_mm_shuffle_epi8(levels, _mm_and_si128(b, _mm_set1_epi8(0xF))));
  q[1] = _mm512_cvtepi8_epi32(_mm_shuffle_epi8(levels, _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0xF))));
}
inline vi add_i(vi a, vi b) { return _mm512_add_epi32(a, b); }
inline vi or_i(vi a, vi b) { return _mm512_or_si512(a, b); }
inline vi set1_i(int x) { return _mm512_set1_epi32(x); }
inline vf to_float(vi a) { return _mm512_cvtepi32_ps(a); }
#else
using vi = __m256i;
// AVX2: 8 lanes, so elements 0-7, 8-15 (low nibbles of bytes 0-7, 8-15), then 16-23, 24-31.
inline void nibbles(const uint8_t* qs, vi (&q)[kVecs]) {
  const vi a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs)));
  const vi b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8)));
  const vi nib = _mm256_set1_epi32(0xF);
  q[0] = _mm256_and_si256(a, nib);
  q[1] = _mm256_and_si256(b, nib);
  q[2] = _mm256_srli_epi32(a, 4);
  q[3] = _mm256_srli_epi32(b, 4);
}
inline vi fifth_bits(uint32_t qh, int first) {
  const vi lanes = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(first));
  return _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)qh), lanes), _mm256_set1_epi32(1)), 4);
}
inline void bytes_signed(const int8_t* qs, vi (&q)[kVecs]) {
  for (int v = 0; v < kVecs; ++v)
    q[v] = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8 * v)));
}
inline void nibble_levels(const uint8_t* qs, const int8_t* table, vi (&q)[kVecs]) {
  const __m128i levels = _mm_loadu_si128(reinterpret_cast<const __m128i*>(table));
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i lo = _mm_shuffle_epi8(levels, _mm_and_si128(b, _mm_set1_epi8(0xF)));
  const __m128i hi = _mm_shuffle_epi8(levels, _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0xF)));
  q[0] = _mm256_cvtepi8_epi32(lo);
  q[1] = _mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8));
  q[2] = _mm256_cvtepi8_epi32(hi);
  q[3] = _mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8));
}
inline vi add_i(vi a, vi b) { return _mm256_add_epi32(a, b); }
inline vi or_i(vi a, vi b) { return _mm256_or_si256(a, b); }
inline vi set1_i(int x) { return _mm256_set1_epi32(x); }
inline vf to_float(vi a) { return _mm256_cvtepi32_ps(a); }
#endif
}  // namespace regs

// x = (q - 8) * d
template <>
struct RegDequant<T_Q4_0> {
  static constexpr bool kAvailable = true;
  LT_REG_INLINE static void run(const block_q4_0* b, const float* t, simd::vf (&w)[regs::kVecs]) {
    regs::vi q[regs::kVecs];
    regs::nibbles(b->qs, q);
    const simd::vf d = regs::scale(t, b->d);
    for (int v = 0; v < regs::kVecs; ++v) w[v] = simd::mul(regs::to_float(regs::add_i(q[v], regs::set1_i(-8))), d);
  }
};

// x = q * d + m
template <>
struct RegDequant<T_Q4_1> {
  static constexpr bool kAvailable = true;
  LT_REG_INLINE static void run(const block_q4_1* b, const float* t, simd::vf (&w)[regs::kVecs]) {
    regs::vi q[regs::kVecs];
    regs::nibbles(b->qs, q);
    const simd::vf d = regs::scale(t, b->d), m = regs::scale(t, b->m);
    for (int v = 0; v < regs::kVecs; ++v) w[v] = simd::add(simd::mul(regs::to_float(q[v]), d), m);
  }
};

// The fifth bit of element e is bit e of qh: lanes of vector v hold elements v*kLanes + lane.
inline void add_fifth_bits(const uint8_t* qh_bytes, regs::vi (&q)[regs::kVecs]) {
  const uint32_t qh = load_u32_le(qh_bytes);
  for (int v = 0; v < regs::kVecs; ++v) q[v] = regs::or_i(q[v], regs::fifth_bits(qh, v * simd::kLanes));
}

// x = (q - 16) * d. With AVX-512 the fifth bits are lane masks (bit 16v + e of qh for lane e of
// vector v): q - 16 is the nibble less 16 where the bit is clear, one masked subtraction, where
// shifting the bits into lanes took five instructions a vector (decoding Q5_0 at M = 1 ran 2.3x
// Q4_1's time).
template <>
struct RegDequant<T_Q5_0> {
  static constexpr bool kAvailable = true;
  LT_REG_INLINE static void run(const block_q5_0* b, const float* t, simd::vf (&w)[regs::kVecs]) {
    regs::vi q[regs::kVecs];
    regs::nibbles(b->qs, q);
    const simd::vf d = regs::scale(t, b->d);
#if defined(__AVX512F__)
    const uint32_t qh = load_u32_le(b->qh);
    for (int v = 0; v < regs::kVecs; ++v) {
      q[v] = _mm512_mask_sub_epi32(q[v], (__mmask16)~(qh >> (16 * v)), q[v], _mm512_set1_epi32(16));
      w[v] = simd::mul(regs::to_float(q[v]), d);
    }
#else
    add_fifth_bits(b->qh, q);
    for (int v = 0; v < regs::kVecs; ++v) w[v] = simd::mul(regs::to_float(regs::add_i(q[v], regs::set1_i(-16))), d);
#endif
  }
};

// x = q * d + m
template <>
struct RegDequant<T_Q5_1> {
  static constexpr bool kAvailable = true;
  LT_REG_INLINE static void run(const block_q5_1* b, const float* t, simd::vf (&w)[regs::kVecs]) {
    regs::vi q[regs::kVecs];
    regs::nibbles(b->qs, q);
#if defined(__AVX512F__)
    const uint32_t qh = load_u32_le(b->qh);  // the fifth bits as lane masks (Q5_0's note)
    for (int v = 0; v < regs::kVecs; ++v)
      q[v] = _mm512_mask_add_epi32(q[v], (__mmask16)(qh >> (16 * v)), q[v], _mm512_set1_epi32(16));
#else
    add_fifth_bits(b->qh, q);
#endif
    const simd::vf d = regs::scale(t, b->d), m = regs::scale(t, b->m);
    for (int v = 0; v < regs::kVecs; ++v) w[v] = simd::add(simd::mul(regs::to_float(q[v]), d), m);
  }
};

// x = table[q] * d: IQ4_NL (d fp16) and MXFP4 (d = 2^(e - 128), its E2M1 levels doubled)
template <>
struct RegDequant<T_IQ4_NL> {
  static constexpr bool kAvailable = true;
  LT_REG_INLINE static void run(const block_iq4_nl* b, const float* t, simd::vf (&w)[regs::kVecs]) {
    regs::vi q[regs::kVecs];
    regs::nibble_levels(b->qs, k_kvalues_iq4nl, q);
    const simd::vf d = regs::scale(t, b->d);
    for (int v = 0; v < regs::kVecs; ++v) w[v] = simd::mul(regs::to_float(q[v]), d);
  }
};

template <>
struct RegDequant<T_MXFP4> {
  static constexpr bool kAvailable = true;
  LT_REG_INLINE static void run(const block_mxfp4* b, const float*, simd::vf (&w)[regs::kVecs]) {
    regs::vi q[regs::kVecs];
    regs::nibble_levels(b->qs, k_kvalues_mxfp4, q);
    const simd::vf d = simd::set1(e8m0_to_fp32_half(b->e));
    for (int v = 0; v < regs::kVecs; ++v) w[v] = simd::mul(regs::to_float(q[v]), d);
  }
};

// x = q * d
template <>
struct RegDequant<T_Q8_0> {
  static constexpr bool kAvailable = true;
  LT_REG_INLINE static void run(const block_q8_0* b, const float* t, simd::vf (&w)[regs::kVecs]) {
    regs::vi q[regs::kVecs];
    regs::bytes_signed(b->qs, q);
    const simd::vf d = regs::scale(t, b->d);
    for (int v = 0; v < regs::kVecs; ++v) w[v] = simd::mul(regs::to_float(q[v]), d);
  }
};
#endif

}  // namespace lowtune::cpu
