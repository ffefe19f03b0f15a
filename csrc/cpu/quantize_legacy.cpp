// Legacy GGUF quantizers, byte for byte ggml's quantize_row_q*_ref (and so gguf-py's).
// Note the scale used for rounding is the fp32 d, not its fp16 rounding: ggml does the same.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>

#include "../blocks.h"
#include "../fp16.h"
#include "../quantize.h"

namespace lowtune {

static void min_max(const float* x, int n, float* mn, float* mx) {
  float lo = FLT_MAX, hi = -FLT_MAX;
  for (int j = 0; j < n; ++j) { lo = std::min(lo, x[j]); hi = std::max(hi, x[j]); }
  *mn = lo; *mx = hi;
}

template <> void quantize_row<T_Q4_0>(const float* x, void* vy, int64_t k) {
  auto* y = static_cast<block_q4_0*>(vy);
  for (int64_t i = 0; i < k / QK; ++i, x += QK) {
    const float d = signed_absmax(x, QK) / -8.0f;
    const float id = d ? 1.0f / d : 0.0f;
    y[i].d = fp32_to_fp16(d);
    for (int j = 0; j < QK / 2; ++j) {
      const uint8_t a = std::min<int8_t>(15, (int8_t)(x[j] * id + 8.5f));
      const uint8_t b = std::min<int8_t>(15, (int8_t)(x[j + QK / 2] * id + 8.5f));
      y[i].qs[j] = a | (b << 4);
    }
  }
}

template <> void quantize_row<T_Q4_1>(const float* x, void* vy, int64_t k) {
  auto* y = static_cast<block_q4_1*>(vy);
  for (int64_t i = 0; i < k / QK; ++i, x += QK) {
    float mn, mx;
    min_max(x, QK, &mn, &mx);
    const float d = (mx - mn) / 15.0f;
    const float id = d ? 1.0f / d : 0.0f;
    y[i].d = fp32_to_fp16(d);
    y[i].m = fp32_to_fp16(mn);
    for (int j = 0; j < QK / 2; ++j) {
      const uint8_t a = std::min<int8_t>(15, (int8_t)((x[j] - mn) * id + 0.5f));
      const uint8_t b = std::min<int8_t>(15, (int8_t)((x[j + QK / 2] - mn) * id + 0.5f));
      y[i].qs[j] = a | (b << 4);
    }
  }
}

static void store_u32_le(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = (uint8_t)(v >> (8 * i));
}

template <> void quantize_row<T_Q5_0>(const float* x, void* vy, int64_t k) {
  auto* y = static_cast<block_q5_0*>(vy);
  for (int64_t i = 0; i < k / QK; ++i, x += QK) {
    const float d = signed_absmax(x, QK) / -16.0f;
    const float id = d ? 1.0f / d : 0.0f;
    y[i].d = fp32_to_fp16(d);
    uint32_t qh = 0;
    for (int j = 0; j < QK / 2; ++j) {
      const uint8_t a = std::min<int8_t>(31, (int8_t)(x[j] * id + 16.5f));
      const uint8_t b = std::min<int8_t>(31, (int8_t)(x[j + QK / 2] * id + 16.5f));
      y[i].qs[j] = (a & 0x0F) | ((b & 0x0F) << 4);
      qh |= ((uint32_t)(a & 0x10) >> 4) << j;
      qh |= ((uint32_t)(b & 0x10) >> 4) << (j + QK / 2);
    }
    store_u32_le(y[i].qh, qh);
  }
}

template <> void quantize_row<T_Q5_1>(const float* x, void* vy, int64_t k) {
  auto* y = static_cast<block_q5_1*>(vy);
  for (int64_t i = 0; i < k / QK; ++i, x += QK) {
    float mn, mx;
    min_max(x, QK, &mn, &mx);
    const float d = (mx - mn) / 31.0f;
    const float id = d ? 1.0f / d : 0.0f;
    y[i].d = fp32_to_fp16(d);
    y[i].m = fp32_to_fp16(mn);
    uint32_t qh = 0;
    for (int j = 0; j < QK / 2; ++j) {
      const uint8_t a = (uint8_t)((x[j] - mn) * id + 0.5f);
      const uint8_t b = (uint8_t)((x[j + QK / 2] - mn) * id + 0.5f);
      y[i].qs[j] = (a & 0x0F) | ((b & 0x0F) << 4);
      qh |= ((uint32_t)(a & 0x10) >> 4) << j;
      qh |= ((uint32_t)(b & 0x10) >> 4) << (j + QK / 2);
    }
    store_u32_le(y[i].qh, qh);
  }
}

// C's roundf (nearest, halves away from zero) to int, exactly and without a libm call or a
// branch: v - trunc(v) is exact in float, so comparing it with 0.5 decides the tie rule.
static inline int round_half_away(float v) {
  const float t = std::trunc(v);
  const int away = std::fabs(v - t) >= 0.5f;
  return (int)t + (v < 0 ? -away : away);
}

template <> void quantize_row<T_Q8_0>(const float* x, void* vy, int64_t k) {
  auto* y = static_cast<block_q8_0*>(vy);
  for (int64_t i = 0; i < k / QK; ++i, x += QK) {
    float amax = 0.0f;
    for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float d = amax / 127.0f;
    const float id = d ? 1.0f / d : 0.0f;
    y[i].d = fp32_to_fp16(d);
    for (int j = 0; j < QK; ++j) y[i].qs[j] = (int8_t)round_half_away(x[j] * id);
  }
}

}  // namespace lowtune
