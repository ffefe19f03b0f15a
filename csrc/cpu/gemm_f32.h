// Float32 GEMMs whose second operand is produced panel by panel by a callback (which, in the
// quantized matmuls, dequantizes W into the panel). Two shapes:
//
// gemm_packed_b: C[m, ncols] = A[m, depth] · B[depth, ncols]   (input gradient: B = deq(W))
// Blocking (GotoBLAS order, A read in place):
//   threads own disjoint column panels of kNC columns of C;
//   per panel, depth runs in steps of kKC: pack B[d0:d0+kc, panel] into an L2-resident buffer
//   of kNR-column strips (bp[s][p][0..kNR)), then for every kMC rows of A, every strip, every
//   kMR rows: a register tile C[kMR x kNR] += A[kMR x kc] · strip[kc x kNR].
//
// gemm_abt: C[m, ncols] = A[m, depth] · B[ncols, depth]ᵀ   (forward: B = deq(W), rows as stored)
// Dot-product form, so W's rows are dequantized into the panel as they are (no transpose):
//   threads own disjoint panels of kRowsD rows of B; depth runs in steps of kDepthD (the
//   panel, kRowsD x kDepthD floats, stays in L2); a register tile holds kMRD x kNRD vector
//   accumulators along depth, summed across lanes at the end of each depth step.
//
// Every element of C is summed by one thread in one fixed order (depth chunks in order), so the
// result does not depend on the number of threads.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

#include "parallel.h"
#include "simd.h"

namespace lowtune::cpu {

constexpr int kNR = 32;   // columns per register tile (and per packed strip)
constexpr int kMR = simd::kLanes == 16 ? 8 : (simd::kLanes == 8 ? 2 : 1);  // rows per register tile
constexpr int64_t kKC = 256;  // depth per packed panel (a multiple of every block size)
constexpr int64_t kNC = 256;  // columns per packed panel (a multiple of every block size)
constexpr int64_t kMC = 128;  // rows of A per pass over a panel (A block stays in L2)

// 64-byte aligned float scratch, so that vector loads never split cache lines.
struct AlignedFloats {
  std::unique_ptr<float, decltype(&std::free)> p{nullptr, &std::free};
  explicit AlignedFloats(int64_t n) : p(static_cast<float*>(std::aligned_alloc(64, ((n * 4 + 63) / 64) * 64)), &std::free) {
    if (!p) throw std::bad_alloc();
  }
  float* get() const { return p.get(); }
};

// C[R, cols] = (accumulate ? C : 0) + alpha · A[R, kc] · S[kc, kNR] (first `cols` columns kept).
// A rows are lda apart; the strip S is packed, kNR floats per depth step.
template <int R>
inline void gemm_tile(int64_t kc, const float* __restrict a, int64_t lda, const float* __restrict s,
                      float* __restrict c, int64_t ldc, int cols, bool accumulate, float alpha) {
  using namespace simd;
  constexpr int NV = kNR / kLanes;
  vf acc[R][NV];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[i][v] = zero();
  for (int64_t p = 0; p < kc; ++p) {
    vf b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = load(s + p * kNR + v * kLanes);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const vf ai = set1(a[i * lda + p]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] = fma(ai, b[v], acc[i][v]);
    }
  }
  if (alpha != 1.0f) {
    const vf va = set1(alpha);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] = mul(va, acc[i][v]);
  }
  if (cols == kNR) {
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        float* dst = c + i * ldc + v * kLanes;
        store(dst, accumulate ? add(load(dst), acc[i][v]) : acc[i][v]);
      }
  } else {
    alignas(64) float row[kNR];
    for (int i = 0; i < R; ++i) {
      for (int v = 0; v < NV; ++v) store(row + v * kLanes, acc[i][v]);
      for (int j = 0; j < cols; ++j) c[i * ldc + j] = accumulate ? c[i * ldc + j] + row[j] : row[j];
    }
  }
}

template <int R = kMR>
inline void gemm_rows(int rows, int64_t kc, const float* a, int64_t lda, const float* s, float* c, int64_t ldc,
                      int cols, bool accumulate, float alpha) {
  if constexpr (R > 0) {
    if (rows == R) return gemm_tile<R>(kc, a, lda, s, c, ldc, cols, accumulate, alpha);
    return gemm_rows<R - 1>(rows, kc, a, lda, s, c, ldc, cols, accumulate, alpha);
  }
}

// How to split a grid of col_units x row_units over `threads`: (column parts, row parts) with
// the smallest largest share. Columns first (a row split packs the same B panel twice).
struct Split2D { int64_t cols, rows; };
inline Split2D split_2d(int64_t col_units, int64_t row_units, int64_t threads) {
  Split2D best{1, 1};
  int64_t best_load = col_units * row_units;
  for (int64_t rs = 1; rs <= std::min(threads, row_units); ++rs) {
    const int64_t cs = std::min(threads / rs, col_units);
    const int64_t load = ((col_units + cs - 1) / cs) * ((row_units + rs - 1) / rs);
    if (load < best_load) { best_load = load; best = {cs, rs}; }
  }
  return best;
}

// pack(col0, cols, d0, kc, bp) must write B[d0 + p][col0 + kNR*s + j] to bp[(s*kc + p)*kNR + j]
// for p < kc, j < kNR, s < ceil(cols / kNR), with zeros past `cols`. col0 and cols are
// multiples of col_align (a multiple of kNR), except where the last panel ends at ncols.
// C = (accumulate ? C : 0) + alpha · A · B.
//
// Work is a grid of column units (col_align wide) by row tiles (kMR rows), split over the
// threads in contiguous blocks so that every thread gets an equal share (SmolLM2's 576 columns
// are 2.25 panels of kNC: whole panels per thread would leave one thread idle a third of the time).
template <class Pack>
void gemm_packed_b(int64_t m, int64_t ncols, int64_t depth, const float* a, int64_t lda, float* c, int64_t ldc,
                   const Pack& pack, int64_t col_align = kNR, float alpha = 1.0f, bool accumulate = false) {
  if (m <= 0 || ncols <= 0) return;
  if (depth <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + ncols, 0.0f);
    return;
  }
  const int64_t col_units = (ncols + col_align - 1) / col_align, row_units = (m + kMR - 1) / kMR;
  // One thread's work must be worth a wake-up; below ~64k multiply-adds it runs alone.
  const int64_t threads = m * ncols * depth < (int64_t{1} << 16) ? 1 : num_threads();
  const Split2D sp = split_2d(col_units, row_units, threads);
  const int64_t panel_units = std::max<int64_t>(1, kNC / col_align);
  parallel_for(sp.cols * sp.rows, 1, [&](int64_t u0, int64_t u1) {
    AlignedFloats bp(kKC * panel_units * col_align);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t cu = u % sp.cols, ru = u / sp.cols;
      const int64_t cbeg = std::min(ncols, cu * col_units / sp.cols * col_align);
      const int64_t cend = std::min(ncols, (cu + 1) * col_units / sp.cols * col_align);
      const int64_t rbeg = std::min(m, ru * row_units / sp.rows * kMR);
      const int64_t rend = std::min(m, (ru + 1) * row_units / sp.rows * kMR);
      for (int64_t col0 = cbeg; col0 < cend; col0 += panel_units * col_align) {
        const int64_t cols = std::min(panel_units * col_align, cend - col0);
        const int64_t strips = (cols + kNR - 1) / kNR;
        for (int64_t d0 = 0; d0 < depth; d0 += kKC) {
          const int64_t kc = std::min(kKC, depth - d0);
          pack(col0, cols, d0, kc, bp.get());
          for (int64_t i0 = rbeg; i0 < rend; i0 += kMC) {
            const int64_t mc = std::min(kMC, rend - i0);
            for (int64_t s = 0; s < strips; ++s) {
              const int scols = (int)std::min<int64_t>(kNR, cols - s * kNR);
              for (int64_t i = i0; i < i0 + mc; i += kMR) {
                gemm_rows((int)std::min<int64_t>(kMR, i0 + mc - i), kc, a + i * lda + d0, lda, bp.get() + s * kc * kNR,
                          c + i * ldc + col0 + s * kNR, ldc, scols, accumulate || d0 > 0, alpha);
              }
            }
          }
        }
      }
    }
  });
}

// ---- gemm_abt ----------------------------------------------------------------------------------

constexpr int kMRD = simd::kLanes == 16 ? 4 : 2;   // rows of A per dot tile
constexpr int kNRD = simd::kLanes == 16 ? 6 : (simd::kLanes == 8 ? 4 : 2);  // rows of B per dot tile
constexpr int64_t kRowsD = 48;      // rows of B per packed panel (a multiple of kNRD)
constexpr int64_t kDepthD = 1024;   // depth per packed panel (a multiple of every block size)
constexpr int64_t kMCD = 32;        // rows of A per pass over a panel

// C[R, nrows] = (accumulate ? C : 0) + A[R, kc] · B[nrows, kc]ᵀ, kc a multiple of kLanes.
// B's rows are ldb apart; rows past `nrows` must be readable (they are computed, not stored).
template <int R>
inline void dot_tile(int64_t kc, const float* __restrict a, int64_t lda, const float* __restrict b, int64_t ldb,
                     float* __restrict c, int64_t ldc, int nrows, bool accumulate) {
  using namespace simd;
  vf acc[R][kNRD];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < kNRD; ++j) acc[i][j] = zero();
  for (int64_t p = 0; p < kc; p += kLanes) {
    vf av[R];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) av[i] = load(a + i * lda + p);
#pragma GCC unroll 8
    for (int j = 0; j < kNRD; ++j) {
      const vf bv = load(b + j * ldb + p);
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) acc[i][j] = fma(av[i], bv, acc[i][j]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < nrows; ++j) {
      const float v = sum(acc[i][j]);
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + v : v;
    }
}

template <int R = kMRD>
inline void dot_rows(int rows, int64_t kc, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                     int64_t ldc, int nrows, bool accumulate) {
  if constexpr (R > 0) {
    if (rows == R) return dot_tile<R>(kc, a, lda, b, ldb, c, ldc, nrows, accumulate);
    return dot_rows<R - 1>(rows, kc, a, lda, b, ldb, c, ldc, nrows, accumulate);
  }
}

// pack(row0, rows, d0, kc, bp) must write B[row0 + r][d0 + p] to bp[r*kc + p] for r < rows,
// p < kc; the driver zero-fills rows past `rows` up to a multiple of kNRD. depth must be a
// multiple of kLanes.
template <class Pack>
void gemm_abt(int64_t m, int64_t ncols, int64_t depth, const float* a, int64_t lda, float* c, int64_t ldc,
              const Pack& pack) {
  if (m <= 0 || ncols <= 0) return;
  if (depth <= 0) {
    for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + ncols, 0.0f);
    return;
  }
  const int64_t panels = (ncols + kRowsD - 1) / kRowsD;
  parallel_for(panels, 1, [&](int64_t p0, int64_t p1) {
    AlignedFloats bp(kRowsD * kDepthD);
    for (int64_t panel = p0; panel < p1; ++panel) {
      const int64_t row0 = panel * kRowsD, rows = std::min(kRowsD, ncols - row0);
      const int64_t padded = (rows + kNRD - 1) / kNRD * kNRD;
      for (int64_t d0 = 0; d0 < depth; d0 += kDepthD) {
        const int64_t kc = std::min(kDepthD, depth - d0);
        pack(row0, rows, d0, kc, bp.get());
        std::fill(bp.get() + rows * kc, bp.get() + padded * kc, 0.0f);
        for (int64_t i0 = 0; i0 < m; i0 += kMCD) {
          const int64_t mc = std::min(kMCD, m - i0);
          for (int64_t j = 0; j < rows; j += kNRD) {
            const int nrows = (int)std::min<int64_t>(kNRD, rows - j);
            for (int64_t i = i0; i < i0 + mc; i += kMRD) {
              dot_rows((int)std::min<int64_t>(kMRD, i0 + mc - i), kc, a + i * lda + d0, lda, bp.get() + j * kc, kc,
                       c + i * ldc + row0 + j, ldc, nrows, d0 > 0);
            }
          }
        }
      }
    }
  });
}

}  // namespace lowtune::cpu
