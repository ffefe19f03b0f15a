// MXFP4 quantizer, byte for byte ggml's quantize_row_mxfp4_ref (what llama-quantize and gguf-py
// write). Per 32 inputs: the stored scale is the power of two 2^(floor(log2 amax) - 2), the level unit
// d half of it, so that amax lies in [8, 16) units, at the top levels 8 and 12 (the largest inputs
// clip to 12); every input then takes the level nearest to it, the first in table order on a tie.
// Float details kept on purpose: log2f itself (not the float's exponent field: log2f rounds values
// just below a power of two up to it), errors as |level * d - x| in float, no FMA contraction.
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

}  // namespace

template <> void quantize_row<T_MXFP4>(const float* x, void* vy, int64_t k) {
  auto* y = static_cast<block_mxfp4*>(vy);
  for (int64_t i = 0; i < k / QK; ++i, x += QK) {
    float amax = 0.0f;
    for (int j = 0; j < QK; ++j) amax = amax < std::fabs(x[j]) ? std::fabs(x[j]) : amax;
    const uint8_t e = mxfp4_exponent(amax);
    const float d = e8m0_to_fp32_half(e);
    float candidates[16];  // ggml's level * d, the same float product for every input of the block
    for (int c = 0; c < 16; ++c) candidates[c] = (float)k_kvalues_mxfp4[c] * d;
    y[i].e = e;
    for (int j = 0; j < QK / 2; ++j) {
      const int low = mxfp4_nearest_code(candidates, x[j]), high = mxfp4_nearest_code(candidates, x[j + QK / 2]);
      y[i].qs[j] = (uint8_t)(low | (high << 4));
    }
  }
}

}  // namespace lowtune
