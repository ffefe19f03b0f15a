// Host quantizers, one per type: quantize one row of k floats (k a multiple of the block size)
// into k/elems blocks. Each follows ggml's reference (quantize_row_*_ref) for GGUF types, and
// min-max rounding for INTb-gG. Used by cpu::quantize; the CUDA code has no quantizer.
#pragma once
#include <cstdint>

namespace lowtune {

void quantize_row_q4_0(const float* x, void* y, int64_t k);
void quantize_row_q4_1(const float* x, void* y, int64_t k);
void quantize_row_q5_0(const float* x, void* y, int64_t k);
void quantize_row_q5_1(const float* x, void* y, int64_t k);
void quantize_row_q8_0(const float* x, void* y, int64_t k);

void quantize_row_q2_K(const float* x, void* y, int64_t k);
void quantize_row_q3_K(const float* x, void* y, int64_t k);
void quantize_row_q4_K(const float* x, void* y, int64_t k);
void quantize_row_q5_K(const float* x, void* y, int64_t k);
void quantize_row_q6_K(const float* x, void* y, int64_t k);

// INTb-gG: bits in {2,3,4,5,6,8}, group in {32,64,128}.
void quantize_row_int(int bits, int group, const float* x, void* y, int64_t k);

}  // namespace lowtune
