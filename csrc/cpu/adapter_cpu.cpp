// CPU twin of the adapter kernels (csrc/adapter_kernels.h): the pooled GEMM primitive in fp32.
// Each thread takes a block of output rows, gathers its A-operand rows (pooling on the fly)
// into a small fp32 panel and accumulates row panels of C with axpy over k; the B operand is
// gathered once, pooled, as [Kc, J] so the inner loop runs over contiguous j.
#include <algorithm>
#include <functional>
#include <stdexcept>
#include <vector>

#include "../adapter_kernels.h"
#include "../fp16.h"
#include "../kernels.h"
#include "parallel.h"

namespace lowtune::cpu {
namespace {

inline float load(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case D_F32: return static_cast<const float*>(p)[i];
    case D_F16: return fp16_to_fp32(static_cast<const uint16_t*>(p)[i]);
    default: return bf16_to_fp32(static_cast<const uint16_t*>(p)[i]);
  }
}

inline void store(void* p, int dtype, int64_t i, float v) {
  switch (dtype) {
    case D_F32: static_cast<float*>(p)[i] = v; break;
    case D_F16: static_cast<uint16_t*>(p)[i] = fp32_to_fp16(v); break;
    default: static_cast<uint16_t*>(p)[i] = fp32_to_bf16(v); break;
  }
}

inline float operand(const Operand& o, int64_t i, int64_t k) {
  const int64_t base = o.k_contig ? i * o.ld + k * o.pool : k * o.ld + i * o.pool;
  float s = 0.0f;
  for (int64_t t = 0; t < o.pool; ++t) s += load(o.p, o.dtype, base + t);
  return s * o.ps;
}

struct CpuBackend {
  static constexpr int64_t kRows = 4;  // output rows per panel

  void gemm(int64_t I, int64_t J, int64_t Kc, const Operand& a, const Operand& b, const Epilogue& e,
            void* save_a) {
    if (I == 0 || J == 0) return;
    // Small products run on the calling thread: starting threads would cost more than they save.
    const bool small = I * J * Kc < (int64_t{1} << 20);
    auto run = [&](int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
      if (small) body(0, n); else parallel_for(n, grain, body);
    };
    // B operand as bt[k * J + j]: contiguous over j for the axpy below.
    std::vector<float> bt(Kc * J);
    run(Kc, 64, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k)
        for (int64_t j = 0; j < J; ++j) bt[k * J + j] = operand(b, j, k);
    });
    run(I, kRows, [&](int64_t i0, int64_t i1) {
      std::vector<float> ap(kRows * Kc), acc(kRows * J);
      for (int64_t ib = i0; ib < i1; ib += kRows) {
        const int64_t rows = std::min(kRows, i1 - ib);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t k = 0; k < Kc; ++k) {
            const float v = operand(a, ib + r, k);
            ap[r * Kc + k] = v;
            if (save_a) store(save_a, a.dtype, (ib + r) * Kc + k, v);
          }
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t k = 0; k < Kc; ++k) {
          const float* bk = bt.data() + k * J;
          for (int64_t r = 0; r < rows; ++r) {
            const float av = ap[r * Kc + k];
            float* c = acc.data() + r * J;
            for (int64_t j = 0; j < J; ++j) c[j] += av * bk[j];
          }
        }
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < J; ++j) {
            const float v = e.alpha * acc[r * J + j];
            for (int64_t t = 0; t < e.repeat; ++t) {
              const int64_t idx = (ib + r) * e.ld + j * e.repeat + t;
              store(e.p, e.dtype, idx, e.accumulate ? load(e.p, e.dtype, idx) + v : v);
            }
          }
      }
    });
  }

  void expand_add(int64_t I, int64_t J, const float* src, int64_t src_ld, const Epilogue& e) {
    for (int64_t i = 0; i < I; ++i)
      for (int64_t j = 0; j < J; ++j) {
        const float v = e.alpha * src[i * src_ld + j];
        for (int64_t t = 0; t < e.repeat; ++t) {
          const int64_t idx = i * e.ld + j * e.repeat + t;
          store(e.p, e.dtype, idx, load(e.p, e.dtype, idx) + v);
        }
      }
  }
};

void check_dtype(int dtype) {
  if (dtype != D_F32 && dtype != D_F16 && dtype != D_BF16)
    throw std::invalid_argument("adapter: unknown activation dtype " + std::to_string(dtype));
}

}  // namespace

void adapter_forward(const AdapterGeom& g, const void* x, int dtype, const float* A, const float* B,
                     void* y, float* u, void* xs_out) {
  check_geom(g);
  check_dtype(dtype);
  if (g.m == 0) return;
  CpuBackend be;
  adapter_forward_passes(be, g, x, dtype, A, B, y, u, xs_out);
}

void adapter_backward(const AdapterGeom& g, const void* dy, int dtype, const void* xs,
                      int64_t xs_pool, const float* A, const float* B, const float* u, void* dx,
                      float* dA, float* dB, float* du) {
  check_geom(g);
  check_dtype(dtype);
  if (xs_pool != 1 && xs_pool != g.pool) throw std::invalid_argument("adapter: xs_pool must be 1 or pool");
  CpuBackend be;
  // m == 0 still writes (zero) weight gradients: the Kc = 0 products store alpha * 0.
  adapter_backward_passes(be, g, dy, dtype, xs, xs_pool, A, B, u, dx, dA, dB, du);
}

}  // namespace lowtune::cpu
