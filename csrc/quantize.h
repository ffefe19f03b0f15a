// Host quantizers: quantize_row<T>(x, blocks, k) turns one row of k floats (k a multiple of the
// block size) into k / Traits<T>::kElems blocks of type T. One specialization per type of the
// type list (blocks.h), defined beside its algorithm in cpu/quantize_*.cpp: ggml's reference
// algorithms for GGUF types (bytes equal to llama.cpp's), min-max rounding for INTb-gG.
// cpu::quantize reaches them through dispatch_qtype; the CUDA code has no quantizer.
#pragma once
#include <cstdint>

#include "blocks.h"

namespace lowtune {

template <int T> void quantize_row(const float* x, void* blocks, int64_t k);

#define LT_DECLARE_QUANTIZE_ROW(T) template <> void quantize_row<T>(const float* x, void* blocks, int64_t k);
LT_TYPES(LT_DECLARE_QUANTIZE_ROW)
#undef LT_DECLARE_QUANTIZE_ROW

}  // namespace lowtune
