// Activation dtype conversions for the fast CPU paths, vectorized and multithreaded:
//   convert_to_f32(src, dtype, dst, n)     fp32/fp16/bf16 -> fp32 (exact)
//   convert_from_f32(src, dtype, dst, n)   fp32 -> fp32/fp16/bf16 (round to nearest even)
// They give the same values as fp16.h's scalar conversions; fp16 uses the F16C instructions
// where compiled for them (which differ from fp16.h only in the payload bits of a NaN).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../blocks.h"
#include "../fp16.h"
#include "parallel.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace lowtune::cpu {

inline void f16_to_f32_span(const uint16_t* __restrict s, float* __restrict d, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
  for (; i < n; ++i) d[i] = fp16_to_fp32(s[i]);
}

inline void f32_to_f16_span(const float* __restrict s, uint16_t* __restrict d, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) d[i] = fp32_to_fp16(s[i]);
}

inline void bf16_to_f32_span(const uint16_t* __restrict s, float* __restrict d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = (uint32_t)s[i] << 16;
    std::memcpy(d + i, &u, 4);
  }
}

// fp32_to_bf16 of fp16.h, written branch-free so that it vectorizes.
inline void f32_to_bf16_span(const float* __restrict s, uint16_t* __restrict d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t x;
    std::memcpy(&x, s + i, 4);
    const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
    const uint32_t quiet_nan = (x >> 16) | 0x40u;
    d[i] = (uint16_t)((x & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
  }
}

constexpr int64_t kConvertGrain = 1 << 15;  // elements per thread chunk at least

inline void convert_to_f32(const void* src, int dtype, float* dst, int64_t count) {
  parallel_for(count, kConvertGrain, [&](int64_t i0, int64_t i1) {
    const int64_t n = i1 - i0;
    if (dtype == D_F32) std::memcpy(dst + i0, static_cast<const float*>(src) + i0, n * sizeof(float));
    else if (dtype == D_F16) f16_to_f32_span(static_cast<const uint16_t*>(src) + i0, dst + i0, n);
    else bf16_to_f32_span(static_cast<const uint16_t*>(src) + i0, dst + i0, n);
  });
}

inline void convert_from_f32(const float* src, int dtype, void* dst, int64_t count) {
  parallel_for(count, kConvertGrain, [&](int64_t i0, int64_t i1) {
    const int64_t n = i1 - i0;
    if (dtype == D_F32) std::memcpy(static_cast<float*>(dst) + i0, src + i0, n * sizeof(float));
    else if (dtype == D_F16) f32_to_f16_span(src + i0, static_cast<uint16_t*>(dst) + i0, n);
    else f32_to_bf16_span(src + i0, static_cast<uint16_t*>(dst) + i0, n);
  });
}

}  // namespace lowtune::cpu
