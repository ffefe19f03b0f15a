// Host quantizers: quantize_row<T>(x, blocks, k) turns one row of k floats (k a multiple of the
// block size) into k / Traits<T>::kElems blocks of type T. One specialization per type of the
// type list (blocks.h), defined beside its algorithm in cpu/quantize_*.cpp: ggml's reference
// algorithms for GGUF types (bytes equal to llama.cpp's), min-max rounding for INTb-gG.
// cpu::quantize reaches them through dispatch_qtype; the CUDA code has no quantizer.
#pragma once
#include <cmath>
#include <cstdint>

#include "blocks.h"

namespace lowtune {

template <int T> void quantize_row(const float* x, void* blocks, int64_t k);

#define LT_DECLARE_QUANTIZE_ROW(T) template <> void quantize_row<T>(const float* x, void* blocks, int64_t k);
LT_TYPES(LT_DECLARE_QUANTIZE_ROW)
#undef LT_DECLARE_QUANTIZE_ROW

// The element with the largest magnitude, with its sign (the first one wins ties; 0 when all are
// 0): the "max" ggml's reference quantizers derive a block's or a super-block's scale from.
inline float signed_absmax(const float* x, int n) {
  float amax = 0.0f, max = 0.0f;
  for (int j = 0; j < n; ++j) {
    if (amax < std::fabs(x[j])) { amax = std::fabs(x[j]); max = x[j]; }
  }
  return max;
}

}  // namespace lowtune
