// Type table, quantize and dequantize entry points (CPU).
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "../block_math.h"
#include "../kernels.h"
#include "../quantize.h"
#include "convert.h"
#include "dequant_block.h"
#include "parallel.h"
#include "simd.h"

namespace lowtune {

BlockInfo block_info(int qtype) {
  BlockInfo info{0, 0};
  const bool known = dispatch_qtype(qtype, [&]<int T>() {
    info = {Traits<T>::kElems, (int)sizeof(typename Traits<T>::block)};
  });
  if (!known) throw std::invalid_argument("unknown quantization type id " + std::to_string(qtype));
  return info;
}

std::vector<int> type_ids() {
  std::vector<int> ids;
#define LT_ID(T) ids.push_back(T);
  LT_TYPES(LT_ID)
#undef LT_ID
  return ids;
}

namespace cpu {

const char* simd_isa() { return simd::kIsa; }

// The scale of a block with a NaN or inf has no meaning: refuse such rows.
static bool all_finite(const float* x, int64_t k) {
  uint32_t bad = 0;  // branch-free, so the loop vectorizes
  for (int64_t i = 0; i < k; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    bad |= (uint32_t)((u & 0x7f800000u) == 0x7f800000u);
  }
  return bad == 0;
}

static void check_k(int qtype, int64_t k) {
  const BlockInfo b = block_info(qtype);
  if (k % b.elems != 0)
    throw std::invalid_argument("row length " + std::to_string(k) + " is not a multiple of the block size " +
                                std::to_string(b.elems));
}

void quantize(int qtype, const float* w, void* blocks, int64_t n, int64_t k) {
  check_k(qtype, k);
  const BlockInfo b = block_info(qtype);
  const int64_t row_bytes = k / b.elems * b.bytes;
  void (*row)(const float*, void*, int64_t) = nullptr;
  dispatch_qtype(qtype, [&]<int T>() { row = quantize_row<T>; });
  uint8_t* out = static_cast<uint8_t*>(blocks);
  parallel_for(n, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (!all_finite(w + r * k, k))
        throw std::invalid_argument("w contains NaN or inf (row " + std::to_string(r) +
                                    "); quantization needs finite weights");
      row(w + r * k, out + r * row_bytes, k);
    }
  });
}

// Dequantize all blocks in parallel. fp32 output: straight into it. Otherwise through an
// fp32 staging buffer of up to kStageElems floats, then store(at, values, len) converts them
// to the output at element offset `at`.
template <class Store>
static void dequantize_rows(int qtype, const void* blocks, int64_t n, int64_t k, Store store, float* f32_out) {
  constexpr int64_t kStageElems = 8192;
  dispatch_qtype(qtype, [&]<int T>() {
    using Tr = Traits<T>;
    const auto* base = static_cast<const typename Tr::block*>(blocks);
    const int64_t nb = k / Tr::kElems;
    parallel_for(n * nb, 64, [&](int64_t i0, int64_t i1) {
      if (f32_out) {
        for (int64_t i = i0; i < i1; ++i) dequant_block<T>(base + i, f32_out + i * Tr::kElems);
        return;
      }
      constexpr int64_t per_stage = kStageElems / Tr::kElems;
      std::vector<float> stage(kStageElems);
      for (int64_t s0 = i0; s0 < i1; s0 += per_stage) {
        const int64_t s1 = std::min(i1, s0 + per_stage);
        for (int64_t i = s0; i < s1; ++i) dequant_block<T>(base + i, stage.data() + (i - s0) * Tr::kElems);
        store(s0 * Tr::kElems, stage.data(), (s1 - s0) * Tr::kElems);
      }
    });
  });
}

void dequantize(int qtype, const void* blocks, void* out, int out_dtype, int64_t n, int64_t k) {
  check_k(qtype, k);
  switch (out_dtype) {
    case D_F32:
      dequantize_rows(qtype, blocks, n, k, [](int64_t, const float*, int64_t) {}, static_cast<float*>(out));
      break;
    case D_F16: {
      uint16_t* o = static_cast<uint16_t*>(out);
      dequantize_rows(qtype, blocks, n, k, [o](int64_t at, const float* v, int64_t len) {
        f32_to_f16_span(v, o + at, len);
      }, nullptr);
      break;
    }
    case D_BF16: {
      uint16_t* o = static_cast<uint16_t*>(out);
      dequantize_rows(qtype, blocks, n, k, [o](int64_t at, const float* v, int64_t len) {
        f32_to_bf16_span(v, o + at, len);
      }, nullptr);
      break;
    }
    default: throw std::invalid_argument("unknown output dtype " + std::to_string(out_dtype));
  }
}

}  // namespace cpu
}  // namespace lowtune
