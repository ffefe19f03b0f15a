// MXFP4 and NVFP4 quantizers, byte for byte ggml's quantize_row_mxfp4_ref / quantize_row_nvfp4_ref
// (what llama-quantize and gguf-py write). MXFP4, per 32 inputs: the stored scale is the power of
// two 2^(floor(log2 amax) - 2), the level unit d half of it, so that amax lies in [8, 16) units, at
// the top levels 8 and 12 (the largest inputs clip to 12); every input then takes the level nearest
// to it, the first in table order on a tie.
// Float details kept on purpose: log2f itself (not the float's exponent field: log2f rounds values
// just below a power of two up to it), errors as |level * d - x| in float, no FMA contraction.
// NVFP4, per 16 inputs: the UE4M3 scale nearest amax / 6 (ggml's rounding: by the first dropped
// mantissa bit, halves away from zero), so that the top level 12 times the half-scale d lands near
// amax; then the nearest levels as MXFP4's.
#include <cmath>
#include <cstdint>

#include "../block_math.h"
#include "../quantize.h"

namespace lowtune {
namespace {

// ggml's E8M0 exponent of a block. ggml casts the float (floor(log2f(amax)) + 125) straight to
// uint8_t; x86 converts through int32 and keeps the low byte, so an amax below 2^-125 wraps
// around (2^-126 -> 255): kept, for the same bytes. An all-zero block gets e = 0.
uint8_t mxfp4_exponent(float amax) {
  if (!(amax > 0.0f)) return 0;
  const int e = (int)std::floor(std::log2(amax)) - 2 + 127;
  return (uint8_t)(e & 0xFF);
}

// The code whose level times d is nearest to x; the first code wins a tie (so never 8, "-0").
int mxfp4_nearest_code(const float* candidates, float x) {
  int best = 0;
  float best_err = std::fabs(candidates[0] - x);
  for (int i = 1; i < 16; ++i) {
    const float err = std::fabs(candidates[i] - x);
    if (err < best_err) { best = i; best_err = err; }
  }
  return best;
}

// ggml_fp32_to_ue4m3: the E4M3 bits of a positive x (0 for x <= 0 or NaN), clamped to 448 (0x7E).
uint8_t fp32_to_ue4m3(float x) {
  if (!(x > 0.0f)) return 0;
  if (x > 448.0f) x = 448.0f;
  const uint32_t bits = float_to_bits(x);
  int exp = (int)((bits >> 23) & 0xFF) - 127 + 7;
  if (exp <= 0) {  // subnormal: man * 2^-9, man = round(x * 2^9)
    const int man = (int)(x * 512.0f + 0.5f);
    return man < 1 ? 0 : (uint8_t)(man > 7 ? 7 : man);
  }
  if (exp >= 15) return 0x7E;
  int man = (int)((bits >> 20) & 7) + (int)((bits >> 19) & 1);
  if (man > 7) {
    man = 0;
    if (++exp >= 15) return 0x7E;
  }
  return (uint8_t)((exp << 3) | man);
}

void fp4_candidates(float d, float* candidates) {  // ggml's level * d, one float product per level
  for (int c = 0; c < 16; ++c) candidates[c] = (float)k_kvalues_mxfp4[c] * d;
}

}  // namespace

template <> void quantize_row<T_MXFP4>(const float* x, void* vy, int64_t k) {
  auto* y = static_cast<block_mxfp4*>(vy);
  for (int64_t i = 0; i < k / QK; ++i, x += QK) {
    float amax = 0.0f;
    for (int j = 0; j < QK; ++j) amax = amax < std::fabs(x[j]) ? std::fabs(x[j]) : amax;
    const uint8_t e = mxfp4_exponent(amax);
    const float d = e8m0_to_fp32_half(e);
    float candidates[16];
    fp4_candidates(d, candidates);
    y[i].e = e;
    for (int j = 0; j < QK / 2; ++j) {
      const int low = mxfp4_nearest_code(candidates, x[j]), high = mxfp4_nearest_code(candidates, x[j + QK / 2]);
      y[i].qs[j] = (uint8_t)(low | (high << 4));
    }
  }
}

template <> void quantize_row<T_NVFP4>(const float* x, void* vy, int64_t k) {
  auto* y = static_cast<block_nvfp4*>(vy);
  for (int64_t i = 0; i < k / 64; ++i) {
    for (int s = 0; s < 4; ++s, x += 16) {
      float amax = 0.0f;
      for (int j = 0; j < 16; ++j) amax = amax < std::fabs(x[j]) ? std::fabs(x[j]) : amax;
      const uint8_t ue = fp32_to_ue4m3(amax / 6.0f);
      float candidates[16];
      fp4_candidates(ue4m3_to_fp32_half(ue), candidates);
      y[i].d[s] = ue;
      for (int j = 0; j < 8; ++j) {
        const int low = mxfp4_nearest_code(candidates, x[j]), high = mxfp4_nearest_code(candidates, x[j + 8]);
        y[i].qs[8 * s + j] = (uint8_t)(low | (high << 4));
      }
    }
  }
}

}  // namespace lowtune
