// A float vector of kLanes lanes for the CPU kernels: AVX-512 where compiled for it, else
// AVX2+FMA, else a portable 4-lane GCC/Clang vector (SSE2/NEON or scalar code).
// Only what the kernels need: load, store, broadcast, fused multiply-add, the four operations,
// min, max, rounding, horizontal sum and max, and e^x.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace lowtune::cpu::simd {

#if defined(__AVX512F__)
constexpr const char* kIsa = "avx512";
constexpr int kLanes = 16;
using vf = __m512;
inline vf load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf set1(float x) { return _mm512_set1_ps(x); }
inline vf zero() { return _mm512_setzero_ps(); }
inline vf fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf div(vf a, vf b) { return _mm512_div_ps(a, b); }
inline float sum(vf v) { return _mm512_reduce_add_ps(v); }
inline float max(vf v) { return _mm512_reduce_max_ps(v); }
inline vf max(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf min(vf a, vf b) { return _mm512_min_ps(a, b); }
inline vf round(vf v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf exp2i(vf y, vf n) { return _mm512_scalef_ps(y, n); }  // y * 2^n, n integral

#elif defined(__AVX2__) && defined(__FMA__)
constexpr const char* kIsa = "avx2";
constexpr int kLanes = 8;
using vf = __m256;
inline vf load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf set1(float x) { return _mm256_set1_ps(x); }
inline vf zero() { return _mm256_setzero_ps(); }
inline vf fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf add(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf div(vf a, vf b) { return _mm256_div_ps(a, b); }
inline float sum(vf v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}
inline vf max(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf min(vf a, vf b) { return _mm256_min_ps(a, b); }
inline float max(vf v) {
  const __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
}
inline vf round(vf v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf exp2i(vf y, vf n) {  // y * 2^n, n integral in [-126, 127]
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

#else
constexpr const char* kIsa = "generic";
constexpr int kLanes = 4;
typedef float vf __attribute__((vector_size(16)));
inline vf load(const float* p) { vf v; __builtin_memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }
inline vf set1(float x) { return vf{x, x, x, x}; }
inline vf zero() { return vf{0, 0, 0, 0}; }
inline vf fma(vf a, vf b, vf c) { return a * b + c; }  // two roundings: fine for a dot product
inline vf add(vf a, vf b) { return a + b; }
inline vf mul(vf a, vf b) { return a * b; }
inline vf sub(vf a, vf b) { return a - b; }
inline vf div(vf a, vf b) { return a / b; }
inline float sum(vf v) { return (v[0] + v[1]) + (v[2] + v[3]); }
inline vf max(vf a, vf b) { return a > b ? a : b; }
inline vf min(vf a, vf b) { return a < b ? a : b; }
inline float max(vf v) { return std::max(std::max(v[0], v[1]), std::max(v[2], v[3])); }
inline vf round(vf v) { return vf{std::nearbyint(v[0]), std::nearbyint(v[1]), std::nearbyint(v[2]), std::nearbyint(v[3])}; }
inline vf exp2i(vf y, vf n) {
  return vf{std::ldexp(y[0], (int)n[0]), std::ldexp(y[1], (int)n[1]), std::ldexp(y[2], (int)n[2]), std::ldexp(y[3], (int)n[3])};
}
#endif

// e^x for softmax and SiLU: x = n·ln2 + r with |r| <= ln2/2 (ln2 split in two, Cody and
// Waite), e^r by Cephes' degree-6 polynomial, then scaled by 2^n: within 2 ulp of e^x.
// Inputs are clamped to [-87.3, 88]: e^x is ~1e-38 rather than 0 below, 1.65e38 above.
inline vf exp(vf x) {
  x = min(max(x, set1(-87.33654f)), set1(88.0f));
  const vf n = round(mul(x, set1(1.44269504088896341f)));
  vf r = fma(n, set1(-0.693359375f), x);
  r = fma(n, set1(2.12194440e-4f), r);
  vf p = set1(1.9875691500e-4f);
  p = fma(p, r, set1(1.3981999507e-3f));
  p = fma(p, r, set1(8.3334519073e-3f));
  p = fma(p, r, set1(4.1665795894e-2f));
  p = fma(p, r, set1(1.6666665459e-1f));
  p = fma(p, r, set1(5.0000001201e-1f));
  const vf y = add(fma(mul(p, r), r, r), set1(1.0f));
  return exp2i(y, n);
}

}  // namespace lowtune::cpu::simd
