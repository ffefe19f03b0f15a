// TQ1_0, TQ2_0, Q1_0 and Q2_0 quantizers, byte for byte ggml's quantize_row_*_ref (llama-quantize
// uses them with or without an importance matrix). The ternary types and Q2_0 round x / amax (amax
// the block's largest magnitude, stored as the fp16 d; the rounding divides by the fp32 amax, as ggml)
// half away from zero; Q1_0 keeps each input's sign and the block's mean magnitude.
#include <cmath>
#include <cstdint>

#include "../blocks.h"
#include "../fp16.h"
#include "../quantize.h"

namespace lowtune {
namespace {

// ggml's MAX(amax, fabsf(x)) loop: a NaN input is kept only where the comparison lets it in.
float block_amax(const float* x, int n) {
  float amax = 0.0f;
  for (int j = 0; j < n; ++j) amax = amax > std::fabs(x[j]) ? amax : std::fabs(x[j]);
  return amax;
}

int ternary_digit(float x, float id) { return (int)std::lround(x * id) + 1; }  // -1, 0, 1 -> 0, 1, 2

// Base-3 digits (the first the most significant) as ggml stores them: the fraction of 256 rounded up.
uint8_t tq1_byte(const float* x, int stride, int digits, float id) {
  uint8_t q = 0;
  for (int n = 0; n < digits; ++n) q = (uint8_t)(q * 3 + ternary_digit(x[n * stride], id));
  if (digits == 4) q = (uint8_t)(q * 3);  // qh: the first digit moves to the top as in qs
  return (uint8_t)(((uint16_t)q * 256 + (243 - 1)) / 243);
}

}  // namespace

template <> void quantize_row<T_TQ1_0>(const float* x, void* vy, int64_t k) {
  auto* y = static_cast<block_tq1_0*>(vy);
  for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K) {
    const float d = block_amax(x, QK_K), id = d ? 1.0f / d : 0.0f;
    y[i].d = fp32_to_fp16(d);
    for (int m = 0; m < 32; ++m) y[i].qs[m] = tq1_byte(x + m, 32, 5, id);
    for (int m = 0; m < 16; ++m) y[i].qs[32 + m] = tq1_byte(x + 160 + m, 16, 5, id);
    for (int j = 0; j < 4; ++j) y[i].qh[j] = tq1_byte(x + 240 + j, 4, 4, id);
  }
}

template <> void quantize_row<T_TQ2_0>(const float* x, void* vy, int64_t k) {
  auto* y = static_cast<block_tq2_0*>(vy);
  for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K) {
    const float d = block_amax(x, QK_K), id = d ? 1.0f / d : 0.0f;
    y[i].d = fp32_to_fp16(d);
    for (int c = 0; c < 2; ++c) {
      for (int m = 0; m < 32; ++m) {
        uint8_t q = 0;
        for (int l = 0; l < 4; ++l) q |= (uint8_t)((ternary_digit(x[128 * c + 32 * l + m], id) & 3) << (2 * l));
        y[i].qs[32 * c + m] = q;
      }
    }
  }
}

template <> void quantize_row<T_Q1_0>(const float* x, void* vy, int64_t k) {
  auto* y = static_cast<block_q1_0*>(vy);
  for (int64_t i = 0; i < k / 128; ++i, x += 128) {
    float sum_abs = 0.0f;  // summed in order, as ggml
    for (int j = 0; j < 128; ++j) sum_abs += std::fabs(x[j]);
    y[i].d = fp32_to_fp16(sum_abs / 128);
    for (int j = 0; j < 16; ++j) y[i].qs[j] = 0;
    for (int j = 0; j < 128; ++j)
      if (x[j] >= 0.0f) y[i].qs[j / 8] |= (uint8_t)(1 << (j % 8));
  }
}

template <> void quantize_row<T_Q2_0>(const float* x, void* vy, int64_t k) {
  auto* y = static_cast<block_q2_0*>(vy);
  for (int64_t i = 0; i < k / 64; ++i, x += 64) {
    float amax = 0.0f;
    for (int j = 0; j < 64; ++j) amax = std::fabs(x[j]) > amax ? std::fabs(x[j]) : amax;
    const float id = amax > 0.0f ? 1.0f / amax : 0.0f;
    y[i].d = fp32_to_fp16(amax);
    for (int j = 0; j < 16; ++j) y[i].qs[j] = 0;
    for (int j = 0; j < 64; ++j) {
      int q = (int)std::round(x[j] * id) + 1;
      q = q < 0 ? 0 : q > 3 ? 3 : q;
      y[i].qs[j / 4] |= (uint8_t)(q << (2 * (j % 4)));
    }
  }
}

}  // namespace lowtune
