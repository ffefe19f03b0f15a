// CPU forward Y = X·deq(W)ᵀ and input gradient dX = dY·deq(W), fp32 accumulation.
// The straightforward version: dequantize a row panel of W into fp32, then dot/axpy.
#include <stdexcept>
#include <string>
#include <vector>

#include "../block_math.h"
#include "../kernels.h"
#include "parallel.h"

namespace lowtune::cpu {

// Activations in any supported dtype -> fp32 rows.
static std::vector<float> to_f32(const void* src, int dtype, int64_t count) {
  std::vector<float> out(count);
  switch (dtype) {
    case D_F32: { const float* s = static_cast<const float*>(src); std::copy(s, s + count, out.begin()); break; }
    case D_F16: { const uint16_t* s = static_cast<const uint16_t*>(src); for (int64_t i = 0; i < count; ++i) out[i] = fp16_to_fp32(s[i]); break; }
    case D_BF16: { const uint16_t* s = static_cast<const uint16_t*>(src); for (int64_t i = 0; i < count; ++i) out[i] = bf16_to_fp32(s[i]); break; }
    default: throw std::invalid_argument("unknown activation dtype " + std::to_string(dtype));
  }
  return out;
}

static void store(void* dst, int dtype, int64_t i, float v) {
  switch (dtype) {
    case D_F32: static_cast<float*>(dst)[i] = v; break;
    case D_F16: static_cast<uint16_t*>(dst)[i] = fp32_to_fp16(v); break;
    default: static_cast<uint16_t*>(dst)[i] = fp32_to_bf16(v); break;
  }
}

// Dequantize blocks [b0, b1) of row `row` of w into out (fp32).
template <int T>
static void dequant_row_range(const void* w, int64_t blocks_per_row, int64_t row, int64_t b0, int64_t b1, float* out) {
  using Tr = Traits<T>;
  const auto* blk = static_cast<const typename Tr::block*>(w) + row * blocks_per_row;
  for (int64_t b = b0; b < b1; ++b) Tr::dequant(blk + b, out + (b - b0) * Tr::kElems);
}

void qmatmul_forward_reference(int qtype, const void* x, int dtype, const void* w, void* y,
                     int64_t m, int64_t n, int64_t k) {
  const BlockInfo bi = block_info(qtype);
  if (k % bi.elems) throw std::invalid_argument("K is not a multiple of the block size");
  const std::vector<float> xf = to_f32(x, dtype, m * k);
  const int64_t nb = k / bi.elems;
  dispatch_qtype(qtype, [&]<int T>() {
    parallel_for(n, 8, [&](int64_t n0, int64_t n1) {
      std::vector<float> wrow(k);
      for (int64_t r = n0; r < n1; ++r) {
        dequant_row_range<T>(w, nb, r, 0, nb, wrow.data());
        for (int64_t i = 0; i < m; ++i) {
          const float* xr = xf.data() + i * k;
          float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
          int64_t j = 0;
          for (; j + 8 <= k; j += 8)
            for (int u = 0; u < 8; ++u) acc[u] += xr[j + u] * wrow[j + u];
          float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
          for (; j < k; ++j) s += xr[j] * wrow[j];
          store(y, dtype, i * n + r, s);
        }
      }
    });
  });
}

void qmatmul_input_grad_reference(int qtype, const void* dy, int dtype, const void* w, void* dx,
                        int64_t m, int64_t n, int64_t k) {
  const BlockInfo bi = block_info(qtype);
  if (k % bi.elems) throw std::invalid_argument("K is not a multiple of the block size");
  const std::vector<float> gf = to_f32(dy, dtype, m * n);
  const int64_t nb = k / bi.elems;
  dispatch_qtype(qtype, [&]<int T>() {
    // Threads own disjoint column (block) ranges of dX, so no reduction across threads.
    parallel_for(nb, 1, [&](int64_t b0, int64_t b1) {
      const int64_t width = (b1 - b0) * bi.elems, c0 = b0 * bi.elems;
      std::vector<float> wpart(width), acc(m * width, 0.0f);
      for (int64_t r = 0; r < n; ++r) {
        dequant_row_range<T>(w, nb, r, b0, b1, wpart.data());
        for (int64_t i = 0; i < m; ++i) {
          const float g = gf[i * n + r];
          if (g == 0.0f) continue;
          float* a = acc.data() + i * width;
          for (int64_t j = 0; j < width; ++j) a[j] += g * wpart[j];
        }
      }
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < width; ++j) store(dx, dtype, i * k + c0 + j, acc[i * width + j]);
    });
  });
}

void qmatmul_forward(int qtype, const void* x, int dtype, const void* w, void* y,
                     int64_t m, int64_t n, int64_t k) {
  qmatmul_forward_reference(qtype, x, dtype, w, y, m, n, k);
}

void qmatmul_input_grad(int qtype, const void* dy, int dtype, const void* w, void* dx,
                        int64_t m, int64_t n, int64_t k) {
  qmatmul_input_grad_reference(qtype, dy, dtype, w, dx, m, n, k);
}

}  // namespace lowtune::cpu
