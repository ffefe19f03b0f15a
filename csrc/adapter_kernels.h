// Adapter paths: pooled adapter matmuls fused around a frozen quantized linear.
//
// Every adapter lowtune trains (LoRA, QA-LoRA, Q-BaRA, QA-HiRA, QDyLoRA) is one geometry:
//
//   u[m, r]  = pool_p(x)[m, k/p] · A[:r]ᵀ                       (first product, pooling fused in)
//   y[m, o] += scale · u[m, :] · B[o/q, :r]                      (expansion by q and scaling fused
//                                                                 into the accumulation into y)
// or, for a single matrix M (QA-HiRA: has_b = 0, A holds M [n/q, k/p]):
//   y[m, o] += scale · pool_p(x)[m, :] · M[o/q, :]
//
// where pool_p averages p adjacent inputs and "o/q" repeat-interleaves each adapter output over
// q adjacent outputs. Backward (dy [m, n]):
//   du  = scale · sum_q(dy) · B[:, :r]          dB = scale · sum_q(dy)ᵀ · u
//   dA  = duᵀ · pool_p(x)                       dx += expand_p(du · A[:r]) / p
// (single matrix: dM = scale · sum_q(dy)ᵀ · pool_p(x), dx += expand_p(scale · sum_q(dy) · M) / p).
// dx is accumulated into the frozen layer's input gradient, so the adapter costs no extra pass.
//
// Shapes are row-major and contiguous except where a leading dimension is given: A rows have
// stride a_ld (= k/p), B rows stride b_ld (QDyLoRA uses B[:, :r] of a wider [n/q, r_max] matrix).
// Activations (x, y, dy, dx, xs) share one dtype (D_F32/D_F16/D_BF16); adapter weights, u, du
// and the weight gradients are fp32. Accumulation is fp32; on CUDA the 16-bit paths multiply in
// the activation dtype on tensor cores (as torch autocast would), the fp32 path in fp32.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include "blocks.h"

namespace lowtune {

// One adapter's geometry (see the file comment).
struct AdapterGeom {
  int64_t m, k, n;  // x [m, k] -> y [m, n]
  int64_t pool;     // p: adjacent inputs averaged into one adapter input (1 = none)
  int64_t repeat;   // q: adjacent outputs that share one adapter output (1 = none)
  int64_t rank;     // r: rows of A in use; for a single matrix, n / q
  int64_t a_ld;     // row stride of A (elements); >= k / p
  int64_t b_ld;     // row stride of B (elements); >= rank
  bool has_b;       // false: single matrix M (given as A), no B
  float scale;
};

// Throws std::invalid_argument when the geometry is inconsistent.
inline void check_geom(const AdapterGeom& g) {
  auto bad = [](const std::string& s) { throw std::invalid_argument("adapter geometry: " + s); };
  if (g.m < 0 || g.k <= 0 || g.n <= 0) bad("m must be >= 0 and k, n > 0");
  if (g.pool < 1 || g.k % g.pool) bad("pool must divide k");
  if (g.repeat < 1 || g.n % g.repeat) bad("repeat must divide n");
  if (g.a_ld < g.k / g.pool) bad("a_ld must be >= k / pool");
  if (g.has_b) {
    if (g.rank < 1 || g.b_ld < g.rank) bad("rank must be >= 1 and b_ld >= rank");
  } else if (g.rank != g.n / g.repeat) {
    bad("a single matrix has rank n / repeat");
  }
}

// Floats of scratch adapter_backward needs: du [m, rank] with B; without, the input gradient
// before its expansion, [m, k/p].
inline int64_t adapter_scratch_elems(const AdapterGeom& g) {
  return g.has_b ? g.m * g.rank : g.m * (g.k / g.pool);
}

// ---- The one primitive both backends implement ------------------------------------------------
// C[i, j] = sum_k a(i, k) * b(j, k) for i < I, j < J, k < Kc, where an operand element is a
// (scaled) sum over `pool` adjacent source values along the source's contiguous axis:
//   k_contig: a(i, k) = ps * sum_t src[i * ld + k * pool + t]
//   else:     a(i, k) = ps * sum_t src[k * ld + i * pool + t]
struct Operand {
  const void* p;
  int dtype;       // D_F32 / D_F16 / D_BF16
  int64_t ld;
  bool k_contig;
  int64_t pool;
  float ps;        // 1/pool to average, 1 to sum
};
// out[i * ld + j * repeat + t] (= or +=) alpha * C[i, j] for t < repeat.
struct Epilogue {
  void* p;
  int dtype;
  int64_t ld;
  int64_t repeat;
  float alpha;
  bool accumulate;
};

// The adapter passes, written once over a backend that provides
//   Backend::gemm(I, J, Kc, Operand a, Operand b, Epilogue e, void* save_a)
//     (save_a, when not null, receives the A-operand [I, Kc] in the activation dtype: the
//     pooled input, kept for the backward pass so the full x need not be), and
//   Backend::expand_add(I, J, const float* src, int64_t src_ld, Epilogue e)
//     out[i * e.ld + j * e.repeat + t] += e.alpha * src[i * src_ld + j] (e.accumulate is true).
template <class Backend>
void adapter_forward_passes(Backend& be, const AdapterGeom& g, const void* x, int dt,
                            const float* A, const float* B, void* y, float* u, void* xs_out) {
  const int64_t kp = g.k / g.pool, nq = g.n / g.repeat;
  const Operand xpool{x, dt, g.k, true, g.pool, 1.0f / (float)g.pool};
  if (g.has_b) {
    be.gemm(g.m, g.rank, kp, xpool, Operand{A, D_F32, g.a_ld, true, 1, 1.0f},
            Epilogue{u, D_F32, g.rank, 1, 1.0f, false}, xs_out);
    be.gemm(g.m, nq, g.rank, Operand{u, D_F32, g.rank, true, 1, 1.0f},
            Operand{B, D_F32, g.b_ld, true, 1, 1.0f}, Epilogue{y, dt, g.n, g.repeat, g.scale, true},
            nullptr);
  } else {
    be.gemm(g.m, nq, kp, xpool, Operand{A, D_F32, g.a_ld, true, 1, 1.0f},
            Epilogue{y, dt, g.n, g.repeat, g.scale, true}, xs_out);
  }
}

// xs is the adapter input as saved by the forward: x itself (xs_pool = p) or pool_p(x)
// (xs_pool = 1). dx may be null (no input gradient wanted). dA is [rank, a_ld] (single matrix:
// [n/q, a_ld]), dB is [n/q, b_ld]; only the columns/rows in use are written.
template <class Backend>
void adapter_backward_passes(Backend& be, const AdapterGeom& g, const void* dy, int dt,
                             const void* xs, int64_t xs_pool, const float* A, const float* B,
                             const float* u, void* dx, float* dA, float* dB, float* du) {
  const int64_t kp = g.k / g.pool, nq = g.n / g.repeat;
  // The output gradient summed over each group of q outputs that share an adapter output.
  const Operand dy_rows{dy, dt, g.n, true, g.repeat, 1.0f};   // (m, o')
  const Operand dy_cols{dy, dt, g.n, false, g.repeat, 1.0f};  // (o', m)
  const Operand xs_cols{xs, dt, kp * xs_pool, false, xs_pool, 1.0f / (float)xs_pool};  // (j, m)
  if (g.has_b) {
    be.gemm(g.m, g.rank, nq, dy_rows, Operand{B, D_F32, g.b_ld, false, 1, 1.0f},
            Epilogue{du, D_F32, g.rank, 1, g.scale, false}, nullptr);
    be.gemm(nq, g.rank, g.m, dy_cols, Operand{u, D_F32, g.rank, false, 1, 1.0f},
            Epilogue{dB, D_F32, g.b_ld, 1, g.scale, false}, nullptr);
    be.gemm(g.rank, kp, g.m, Operand{du, D_F32, g.rank, false, 1, 1.0f}, xs_cols,
            Epilogue{dA, D_F32, g.a_ld, 1, 1.0f, false}, nullptr);
    if (dx)
      be.gemm(g.m, kp, g.rank, Operand{du, D_F32, g.rank, true, 1, 1.0f},
              Operand{A, D_F32, g.a_ld, false, 1, 1.0f},
              Epilogue{dx, dt, g.k, g.pool, 1.0f / (float)g.pool, true}, nullptr);
  } else {
    be.gemm(nq, kp, g.m, dy_cols, xs_cols, Epilogue{dA, D_F32, g.a_ld, 1, g.scale, false}, nullptr);
    // dy · M reduces over all n/q outputs into a narrow [m, k/p]: it goes to fp32 scratch
    // (so the backend may split that reduction), then expands into dx.
    if (dx) {
      be.gemm(g.m, kp, nq, dy_rows, Operand{A, D_F32, g.a_ld, false, 1, 1.0f},
              Epilogue{du, D_F32, kp, 1, 1.0f, false}, nullptr);
      be.expand_add(g.m, kp, du, kp, Epilogue{dx, dt, g.k, g.pool, g.scale / (float)g.pool, true});
    }
  }
}

namespace cpu {
// y += adapter(x); u [m, rank] fp32 receives the first product (unused without B);
// xs_out (nullable) receives pool_p(x) [m, k/p] in the activation dtype.
void adapter_forward(const AdapterGeom& g, const void* x, int dtype, const float* A, const float* B,
                     void* y, float* u, void* xs_out);
// Gradients of the adapter (see adapter_backward_passes); du is scratch of
// adapter_scratch_elems(g) floats (may be null when it is 0).
void adapter_backward(const AdapterGeom& g, const void* dy, int dtype, const void* xs,
                      int64_t xs_pool, const float* A, const float* B, const float* u, void* dx,
                      float* dA, float* dB, float* du);
// The obvious loops the two above are tested against (same arguments, same results up to
// float32 summation order).
void adapter_forward_reference(const AdapterGeom& g, const void* x, int dtype, const float* A,
                               const float* B, void* y, float* u, void* xs_out);
void adapter_backward_reference(const AdapterGeom& g, const void* dy, int dtype, const void* xs,
                                int64_t xs_pool, const float* A, const float* B, const float* u,
                                void* dx, float* dA, float* dB, float* du);
}  // namespace cpu

namespace cuda {
void adapter_forward(const AdapterGeom& g, const void* x, int dtype, const float* A, const float* B,
                     void* y, float* u, void* xs_out, void* stream);
void adapter_backward(const AdapterGeom& g, const void* dy, int dtype, const void* xs,
                      int64_t xs_pool, const float* A, const float* B, const float* u, void* dx,
                      float* dA, float* dB, float* du, void* stream);
// xs [m, k/pool] = x [m, k] averaged over each `pool` adjacent columns (the torch GEMM path's
// pooled adapter input; the fused kernels pool on the fly).
void adapter_pool(const void* x, int dtype, void* xs, int64_t m, int64_t k, int64_t pool, void* stream);
// g [m, r] += scale·dy·B and dB [n, r] += scale·dyᵀ·u from one read of dy [m, n] (B [n, r], u [m, r]; fp16 or
// bf16, row-major, 16-byte aligned; g and dB fp32): r 16, 32, 48 or 64, n a multiple of 128.
void adapter_dual_products(const void* dy, int dtype, const void* B, const void* u, float* g, float* dB, int64_t m,
                           int64_t n, int64_t r, float scale, void* stream);
// out [m, c] += alpha·left·rightᵀ, the adapter's rank-r update of y or dx, in one pass over out (left [m, r];
// right [c, r], or [r, c] when right_kmajor; fp16 or bf16, row-major, 16-byte aligned): r 16, 32, 48 or 64, c a
// multiple of 128.
void adapter_rank_update(void* out, int dtype, const void* left, const void* right, int64_t m, int64_t c, int64_t r,
                         bool right_kmajor, float alpha, void* stream);
}  // namespace cuda

}  // namespace lowtune
