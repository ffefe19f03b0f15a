// INTb-gG quantizer: per group, min-max asymmetric rounding, w ≈ d·q + m.
// Rounds exactly as Q4_1/Q5_1's reference does, so INT4-g32 and INT5-g32 equal them byte for byte.
#include <algorithm>
#include <cfloat>

#include "../block_math.h"
#include "../quantize.h"

namespace lowtune {

template <int B, int G>
static void quantize_row_int_t(const float* x, void* vy, int64_t k) {
  using blk = block_int<B, G>;
  auto* y = static_cast<blk*>(vy);
  constexpr int maxq = (1 << B) - 1;
  for (int64_t i = 0; i < k / G; ++i, x += G) {
    float mn = FLT_MAX, mx = -FLT_MAX;
    for (int j = 0; j < G; ++j) { mn = std::min(mn, x[j]); mx = std::max(mx, x[j]); }
    const float d = (mx - mn) / (float)maxq;
    const float id = d ? 1.0f / d : 0.0f;
    y[i].d = fp32_to_fp16(d);
    y[i].m = fp32_to_fp16(mn);
    std::fill(y[i].planes, y[i].planes + sizeof(y[i].planes), 0);
    uint8_t* high = y[i].planes;
    uint8_t* low = y[i].planes + G * blk::high_bits / 8;
    for (int e = 0; e < G; ++e) {
      const int q = std::min(maxq, (int)((x[e] - mn) * id + 0.5f));
      const int c = e / 32, j = e % 32;
      const int lo = q & ((1 << blk::low_bits) - 1), hi = q >> blk::low_bits;
      if (blk::low_bits == 8) low[e] = (uint8_t)q;
      else if (blk::low_bits == 4) low[16 * c + (j % 16)] |= (uint8_t)(lo << (j < 16 ? 0 : 4));
      else low[8 * c + (j % 8)] |= (uint8_t)(lo << (2 * (j / 8)));
      if (blk::high_bits == 1) high[e / 8] |= (uint8_t)(hi << (e % 8));
      else if (blk::high_bits == 2) high[8 * c + (j % 8)] |= (uint8_t)(hi << (2 * (j / 8)));
    }
  }
}

#define LT_QUANTIZE_ROW_INT(T)                                                   \
  template <> void quantize_row<T>(const float* x, void* y, int64_t k) {         \
    quantize_row_int_t<int_type_bits(T), int_type_group(T)>(x, y, k);            \
  }
LT_TYPES_INT(LT_QUANTIZE_ROW_INT)
#undef LT_QUANTIZE_ROW_INT

}  // namespace lowtune
