// CPU twins of the adapter kernels (csrc/adapter_kernels.h): the pooled GEMM primitive in fp32.
//
// FastBackend (adapter_forward / adapter_backward): every product is a blocked GEMM
// (gemm_f32.h's gemm_packed_b). The left operand is used in place when it is plain fp32 rows,
// else gathered (pooled) into fp32 rows; the right operand is packed straight from its source,
// pooling and converting as it goes. A product is computed transposed (Cᵀ = b · aᵀ) where that
// is cheaper (a small cost model picks): when its output is narrower than the register tiles
// (a rank-r side of LoRA) and the as-is orientation would transpose a large operand.
// fp32 outputs without expansion are written by the GEMM itself; the others go through an fp32
// buffer and an epilogue pass (scale, repeat over q, dtype, accumulate).
//
// ReferenceBackend (adapter_*_reference): the obvious loops (each thread gathers a few rows of
// the A operand and accumulates row panels of C with axpy over k), kept as the slow twin the
// fast one is tested against.
#include <algorithm>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <vector>

#include "../adapter_kernels.h"
#include "../fp16.h"
#include "../kernels.h"
#include "gemm_f32.h"
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

struct ReferenceBackend {
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

// ---- the fast backend ------------------------------------------------------------------------

// Element i of an activation array of dtype D, as fp32.
template <int D>
inline float elem(const void* p, int64_t i) {
  if constexpr (D == D_F32) return static_cast<const float*>(p)[i];
  else if constexpr (D == D_F16) return fp16_to_fp32(static_cast<const uint16_t*>(p)[i]);
  else return bf16_to_fp32(static_cast<const uint16_t*>(p)[i]);
}

template <class F>
void with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case D_F32: f.template operator()<D_F32>(); break;
    case D_F16: f.template operator()<D_F16>(); break;
    default: f.template operator()<D_BF16>(); break;
  }
}

// Operand element (c, k), as the reference's operand() computes it (pool summed in order, then
// scaled), with the dtype fixed at compile time.
template <int D>
inline float operand_at(const Operand& o, int64_t c, int64_t k) {
  const int64_t base = o.k_contig ? c * o.ld + k * o.pool : k * o.ld + c * o.pool;
  if (o.pool == 1) return elem<D>(o.p, base) * o.ps;
  float s = 0.0f;
  for (int64_t t = 0; t < o.pool; ++t) s += elem<D>(o.p, base + t);
  return s * o.ps;
}

// Elements below which a pass over memory runs on the calling thread (a wake-up costs more).
constexpr int64_t kSerialElems = int64_t{1} << 15;

void maybe_parallel(int64_t n, int64_t work, const std::function<void(int64_t, int64_t)>& body) {
  if (work < kSerialElems) body(0, n); else parallel_for(n, 1, body);
}

// gemm_packed_b's panel: B[k][c] = operand(c, k) for the right-hand operand.
template <int D>
struct PackOperand {
  const Operand& o;
  void operator()(int64_t col0, int64_t cols, int64_t d0, int64_t kc, float* bp) const {
    for (int64_t s = 0; s * kNR < cols; ++s) {
      const int64_t c0 = col0 + s * kNR;
      const int n = (int)std::min<int64_t>(kNR, cols - s * kNR);
      float* strip = bp + s * kc * kNR;
      if (!o.k_contig && D == D_F32 && o.pool == 1 && o.ps == 1.0f) {  // rows of the strip are copies
        const float* src = static_cast<const float*>(o.p);
        for (int64_t p = 0; p < kc; ++p) {
          float* dst = strip + p * kNR;
          std::memcpy(dst, src + (d0 + p) * o.ld + c0, n * sizeof(float));
          std::fill(dst + n, dst + kNR, 0.0f);
        }
      } else if (!o.k_contig) {  // the columns are contiguous in the source: gather rows of the strip
        for (int64_t p = 0; p < kc; ++p) {
          float* dst = strip + p * kNR;
          for (int j = 0; j < n; ++j) dst[j] = operand_at<D>(o, c0 + j, d0 + p);
          for (int j = n; j < kNR; ++j) dst[j] = 0.0f;
        }
      } else {  // depth is contiguous: gather each column down the strip
        for (int j = 0; j < n; ++j)
          for (int64_t p = 0; p < kc; ++p) strip[p * kNR + j] = operand_at<D>(o, c0 + j, d0 + p);
        for (int j = n; j < kNR; ++j)
          for (int64_t p = 0; p < kc; ++p) strip[p * kNR + j] = 0.0f;
      }
    }
  }
};

// Rough cost, in element operations, of one orientation of a product: the GEMM's multiply-adds
// (register tiles padded to kMR x kNR, 32 per cycle), gathering the left operand into fp32 rows
// (none when it is used in place), packing the right one (a plain copy when its columns are
// contiguous fp32, a transposing gather when its depth is contiguous), and the epilogue pass.
inline bool plain_f32(const Operand& o) { return o.dtype == D_F32 && o.pool == 1 && o.ps == 1.0f; }
inline double orientation_cost(int64_t rows, int64_t cols, int64_t kc, const Operand& left, const Operand& right,
                               bool epilogue_pass, bool transposed_out) {
  const double tiles = (double)((rows + kMR - 1) / kMR * kMR) * (double)((cols + kNR - 1) / kNR * kNR) * kc / 32;
  const double lcost = plain_f32(left) && left.k_contig ? 0.0 : (double)rows * kc * left.pool * (left.k_contig ? 1 : 3);
  const double rcost = (double)cols * kc * right.pool * (right.k_contig ? 3 : plain_f32(right) ? 0.25 : 1);
  const double ecost = epilogue_pass ? (double)rows * cols * (transposed_out ? 2 : 1) : 0.0;
  return tiles + lcost + rcost + ecost;
}

struct FastBackend {
  void gemm(int64_t I, int64_t J, int64_t Kc, const Operand& a, const Operand& b, const Epilogue& e,
            void* save_a) {
    if (I == 0 || J == 0) return;
    if (save_a) save_pooled(a, I, Kc, save_a);
    // C = a · bᵀ as is, or Cᵀ = b · aᵀ when that is cheaper (a rank-r output is narrower than a
    // register tile, or the as-is orientation would transpose a large operand).
    const bool direct = e.dtype == D_F32 && e.repeat == 1;  // the GEMM can write the output itself
    const bool swap = orientation_cost(J, I, Kc, b, a, true, true) * e.repeat <
                      orientation_cost(I, J, Kc, a, b, !direct, false) * e.repeat;
    const Operand& left = swap ? b : a;
    const Operand& right = swap ? a : b;
    const int64_t rows = swap ? J : I, cols = swap ? I : J;

    std::vector<float> lbuf;
    const float* lp;
    int64_t lda;
    if (plain_f32(left) && left.k_contig) {
      lp = static_cast<const float*>(left.p);
      lda = left.ld;
    } else {
      lbuf.resize(rows * Kc);
      with_dtype(left.dtype, [&]<int D>() {
        maybe_parallel(rows, rows * Kc * left.pool, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r)
            for (int64_t k = 0; k < Kc; ++k) lbuf[r * Kc + k] = operand_at<D>(left, r, k);
        });
      });
      lp = lbuf.data();
      lda = Kc;
    }

    const bool to_out = direct && !swap;
    std::vector<float> cbuf;
    float* cp;
    int64_t ldc;
    if (to_out) {
      cp = static_cast<float*>(e.p);
      ldc = e.ld;
    } else {
      cbuf.resize(rows * cols);
      cp = cbuf.data();
      ldc = cols;
    }
    with_dtype(right.dtype, [&]<int D>() {
      gemm_packed_b(rows, cols, Kc, lp, lda, cp, ldc, PackOperand<D>{right}, kNR, to_out ? e.alpha : 1.0f,
                    to_out && e.accumulate);
    });
    if (!to_out) {
      // C(i, j) is cbuf[i * J + j], or cbuf[j * I + i] when computed transposed.
      const int64_t si = swap ? 1 : J, sj = swap ? I : 1;
      maybe_parallel(I, I * J * e.repeat, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = 0; j < J; ++j) {
            const float v = e.alpha * cbuf[i * si + j * sj];
            for (int64_t t = 0; t < e.repeat; ++t) {
              const int64_t idx = i * e.ld + j * e.repeat + t;
              store(e.p, e.dtype, idx, e.accumulate ? load(e.p, e.dtype, idx) + v : v);
            }
          }
      });
    }
  }

  // The pooled A operand [I, Kc], in its dtype (the forward keeps it for the backward pass).
  static void save_pooled(const Operand& a, int64_t I, int64_t Kc, void* out) {
    with_dtype(a.dtype, [&]<int D>() {
      maybe_parallel(I, I * Kc * a.pool, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t k = 0; k < Kc; ++k) store(out, a.dtype, i * Kc + k, operand_at<D>(a, i, k));
      });
    });
  }

  void expand_add(int64_t I, int64_t J, const float* src, int64_t src_ld, const Epilogue& e) {
    maybe_parallel(I, I * J * e.repeat, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = 0; j < J; ++j) {
          const float v = e.alpha * src[i * src_ld + j];
          for (int64_t t = 0; t < e.repeat; ++t) {
            const int64_t idx = i * e.ld + j * e.repeat + t;
            store(e.p, e.dtype, idx, load(e.p, e.dtype, idx) + v);
          }
        }
    });
  }
};

void check_dtype(int dtype) {
  if (dtype != D_F32 && dtype != D_F16 && dtype != D_BF16)
    throw std::invalid_argument("adapter: unknown activation dtype " + std::to_string(dtype));
}

template <class Backend>
void forward_with(const AdapterGeom& g, const void* x, int dtype, const float* A, const float* B, void* y,
                  float* u, void* xs_out) {
  check_geom(g);
  check_dtype(dtype);
  if (g.m == 0) return;
  Backend be;
  adapter_forward_passes(be, g, x, dtype, A, B, y, u, xs_out);
}

template <class Backend>
void backward_with(const AdapterGeom& g, const void* dy, int dtype, const void* xs, int64_t xs_pool,
                   const float* A, const float* B, const float* u, void* dx, float* dA, float* dB, float* du) {
  check_geom(g);
  check_dtype(dtype);
  if (xs_pool != 1 && xs_pool != g.pool) throw std::invalid_argument("adapter: xs_pool must be 1 or pool");
  Backend be;
  // m == 0 still writes (zero) weight gradients: the Kc = 0 products store alpha * 0.
  adapter_backward_passes(be, g, dy, dtype, xs, xs_pool, A, B, u, dx, dA, dB, du);
}

}  // namespace

void adapter_forward(const AdapterGeom& g, const void* x, int dtype, const float* A, const float* B,
                     void* y, float* u, void* xs_out) {
  forward_with<FastBackend>(g, x, dtype, A, B, y, u, xs_out);
}

void adapter_backward(const AdapterGeom& g, const void* dy, int dtype, const void* xs,
                      int64_t xs_pool, const float* A, const float* B, const float* u, void* dx,
                      float* dA, float* dB, float* du) {
  backward_with<FastBackend>(g, dy, dtype, xs, xs_pool, A, B, u, dx, dA, dB, du);
}

void adapter_forward_reference(const AdapterGeom& g, const void* x, int dtype, const float* A,
                               const float* B, void* y, float* u, void* xs_out) {
  forward_with<ReferenceBackend>(g, x, dtype, A, B, y, u, xs_out);
}

void adapter_backward_reference(const AdapterGeom& g, const void* dy, int dtype, const void* xs,
                                int64_t xs_pool, const float* A, const float* B, const float* u,
                                void* dx, float* dA, float* dB, float* du) {
  backward_with<ReferenceBackend>(g, dy, dtype, xs, xs_pool, A, B, u, dx, dA, dB, du);
}

}  // namespace lowtune::cpu
