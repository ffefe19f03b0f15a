// CPU forward Y = X·deq(W)ᵀ and input gradient dX = dY·deq(W), fp32 accumulation.
//
// *_reference: the straightforward version (dequantize a row of W, then dot / axpy), kept as
// the slow obvious twin the fast paths are tested against.
// Fast paths:
//   M <= kSmallM: the weight traffic is the floor, so W is read once, as stored, 4 rows at a
//     time, each block dequantized into L1 and consumed at once: dot products with every row
//     of X (forward), or scaled accumulation into rows of a partial dX per fixed chunk of W's
//     rows (input gradient). On AVX2 the forward takes this path up to kGroupedSmallM rows,
//     4 rows of X at a time.
//   larger M: a GEMM (gemm_f32.h) whose second operand is W dequantized into an L2-resident
//     fp32 panel once per panel:
//     forward, M < kTransposeM: dot-product tiles over W's rows as stored (gemm_abt);
//     forward, larger M: panels transposed once, outer-product tiles (gemm_packed_b), which
//       reach a higher FLOP rate once the transpose is paid for by enough rows of X;
//     input gradient: outer-product tiles over W's rows as stored (gemm_packed_b).
// Dequantization is dequant_block<T> (bit-exact with block_math.h), so the fast and the
// reference paths see the same weights and differ only in float32 summation order.
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "../block_math.h"
#include "../decode_kernels.h"
#include "../kernels.h"
#include "convert.h"
#include "dequant_block.h"
#include "dequant_regs.h"
#include "gemm_f32.h"
#include "parallel.h"
#include "simd.h"

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

// ---- fast paths --------------------------------------------------------------------------------

constexpr int64_t kSmallM = 4;  // up to this many rows of X/dY: the fused paths below
constexpr int kRowGroup = 4;    // rows of W dequantized together in the fused paths
constexpr int64_t kGradChunkRows = 512;  // rows of W per partial dX in the small-M input gradient
// The fused paths read 4 rows of W side by side; for some row lengths the hardware prefetchers
// do not keep up with the 4 streams, so each block also prefetches its row this far ahead.
constexpr int kPrefetchAhead = 256;
// From this many rows of X on, the forward transposes W's panels once and runs outer-product
// tiles (faster per FLOP); below, dot-product tiles over W's rows as stored (no transpose).
constexpr int64_t kTransposeM = 32;
// With 8-lane vectors (AVX2) the GEMM tiles are too small to pay for the panels: up to this many
// rows, the forward reads W once per 4 rows of X in the fused path instead (2-3x faster at M =
// 8-32 on a 2-core AVX2 EPYC; AVX-512's tiles win there). From 64 fp32 rows on, the Python
// dispatch (ops.cpu_dense_gemm) hands such products to torch's GEMM.
constexpr int64_t kGroupedSmallM = simd::kLanes == 8 ? 64 : kSmallM;

// Activations as fp32: the input itself when it is fp32, else converted into buf.
static const float* as_f32(const void* src, int dtype, int64_t count, std::vector<float>& buf) {
  if (dtype == D_F32) return static_cast<const float*>(src);
  buf.resize(count);
  convert_to_f32(src, dtype, buf.data(), count);
  return buf.data();
}

// An fp32 result buffer: the output itself when it is fp32, else buf (see finish_output).
static float* f32_output(void* dst, int dtype, int64_t count, std::vector<float>& buf) {
  if (dtype == D_F32) return static_cast<float*>(dst);
  buf.resize(count);
  return buf.data();
}

static void finish_output(void* dst, int dtype, const std::vector<float>& buf) {
  if (dtype != D_F32) convert_from_f32(buf.data(), dtype, dst, (int64_t)buf.size());
}

// Y[MX, rows r0..r1) of x[MX, k] · deq(W)ᵀ: per group of 4 rows of W, each block of the 4 rows
// is dequantized into L1 and dotted with the MX rows of x; 4*MX vector accumulators, summed
// across lanes at the end.
template <int T, int MX>
static void forward_small(const float* x, int64_t k, const void* w, float* y, int64_t n, int64_t r0, int64_t r1) {
  using namespace simd;
  using Tr = Traits<T>;
  constexpr int BS = Tr::kElems, NV = BS / kLanes;
  const auto* wb = static_cast<const typename Tr::block*>(w);
  const int64_t nb = k / BS;
  if constexpr (RegDequant<T>::kAvailable) {
    // The block's values go from the decoder straight into the multiply-adds.
    const float* table = regs::half_table();
    for (int64_t r = r0; r < r1; r += kRowGroup) {
      const int rows = (int)std::min<int64_t>(kRowGroup, r1 - r);
      vf acc[MX][kRowGroup];
      for (int i = 0; i < MX; ++i)
        for (int g = 0; g < kRowGroup; ++g) acc[i][g] = zero();
      const auto* row = wb + r * nb;
      for (int64_t b = 0; b < nb; ++b) {
        vf xv[MX][NV];
        for (int i = 0; i < MX; ++i)
          for (int v = 0; v < NV; ++v) xv[i][v] = load(x + i * k + b * BS + v * kLanes);
        if (rows == kRowGroup) {
#pragma GCC unroll 4
          for (int g = 0; g < kRowGroup; ++g) {
            __builtin_prefetch(reinterpret_cast<const char*>(row + g * nb + b) + kPrefetchAhead);
            vf wv[NV];
            RegDequant<T>::run(row + g * nb + b, table, wv);
            for (int i = 0; i < MX; ++i)
              for (int v = 0; v < NV; ++v) acc[i][g] = fma(xv[i][v], wv[v], acc[i][g]);
          }
        } else {
          for (int g = 0; g < rows; ++g) {
            vf wv[NV];
            RegDequant<T>::run(row + g * nb + b, table, wv);
            for (int i = 0; i < MX; ++i)
              for (int v = 0; v < NV; ++v) acc[i][g] = fma(xv[i][v], wv[v], acc[i][g]);
          }
        }
      }
      for (int i = 0; i < MX; ++i)
        for (int g = 0; g < rows; ++g) y[i * n + r + g] = sum(acc[i][g]);
    }
    return;
  }
  alignas(64) float tmp[kRowGroup][BS] = {};
  for (int64_t r = r0; r < r1; r += kRowGroup) {
    const int rows = (int)std::min<int64_t>(kRowGroup, r1 - r);
    vf acc[MX][kRowGroup];
    for (int i = 0; i < MX; ++i)
      for (int g = 0; g < kRowGroup; ++g) acc[i][g] = zero();
    for (int64_t b = 0; b < nb; ++b) {
      for (int g = 0; g < rows; ++g) {
        const auto* blk = wb + (r + g) * nb + b;
        __builtin_prefetch(reinterpret_cast<const char*>(blk) + kPrefetchAhead);
        dequant_block<T>(blk, tmp[g]);
      }
      const float* xb = x + b * BS;
      for (int v = 0; v < NV; ++v) {
        vf xv[MX];
        for (int i = 0; i < MX; ++i) xv[i] = load(xb + i * k + v * kLanes);
#pragma GCC unroll 4
        for (int g = 0; g < kRowGroup; ++g) {
          const vf t = load(tmp[g] + v * kLanes);
          for (int i = 0; i < MX; ++i) acc[i][g] = fma(xv[i], t, acc[i][g]);
        }
      }
    }
    for (int i = 0; i < MX; ++i)
      for (int g = 0; g < rows; ++g) y[i * n + r + g] = sum(acc[i][g]);
  }
}

// part[MX, K] = g[MX, rows r0..r1) · deq(W)[r0..r1, K]: rows of W in groups of 4 (read as
// stored, whole rows), each block of the group dequantized into L1 and accumulated into part's
// rows in order of the W row (acc = ((acc + g0 w0) + g1 w1) + ...), a fixed summation order.
template <int T, int MX>
static void input_grad_small(const float* g, int64_t n, const void* w, int64_t k, float* part, int64_t r0, int64_t r1) {
  using namespace simd;
  using Tr = Traits<T>;
  constexpr int BS = Tr::kElems, NV = BS / kLanes;
  const auto* wb = static_cast<const typename Tr::block*>(w);
  const int64_t nb = k / BS;
  std::fill(part, part + MX * k, 0.0f);
  alignas(64) float tmp[kRowGroup][BS] = {};
  for (int64_t r = r0; r < r1; r += kRowGroup) {
    const int rows = (int)std::min<int64_t>(kRowGroup, r1 - r);
    vf gv[MX][kRowGroup];
    for (int i = 0; i < MX; ++i)
      for (int q = 0; q < kRowGroup; ++q) gv[i][q] = set1(q < rows ? g[i * n + r + q] : 0.0f);
    if (rows < kRowGroup) std::memset(tmp, 0, sizeof tmp);  // unused rows contribute 0 * 0
    for (int64_t b = 0; b < nb; ++b) {
      for (int q = 0; q < rows; ++q) {
        const auto* blk = wb + (r + q) * nb + b;
        __builtin_prefetch(reinterpret_cast<const char*>(blk) + kPrefetchAhead);
        dequant_block<T>(blk, tmp[q]);
      }
      for (int v = 0; v < NV; ++v) {
        vf t[kRowGroup];
#pragma GCC unroll 4
        for (int q = 0; q < kRowGroup; ++q) t[q] = load(tmp[q] + v * kLanes);
        for (int i = 0; i < MX; ++i) {
          float* a = part + i * k + b * BS + v * kLanes;
          vf s = load(a);
#pragma GCC unroll 4
          for (int q = 0; q < kRowGroup; ++q) s = fma(gv[i][q], t[q], s);
          store(a, s);
        }
      }
    }
  }
}

template <template <int, int> class Kernel, int T, class... Args>
static void run_small(int64_t m, Args... args) {
  switch (m) {
    case 1: Kernel<T, 1>::run(args...); break;
    case 2: Kernel<T, 2>::run(args...); break;
    case 3: Kernel<T, 3>::run(args...); break;
    default: Kernel<T, 4>::run(args...); break;
  }
}
template <int T, int MX> struct ForwardSmall { template <class... A> static void run(A... a) { forward_small<T, MX>(a...); } };
template <int T, int MX> struct InputGradSmall { template <class... A> static void run(A... a) { input_grad_small<T, MX>(a...); } };

// Touch the bytes [p, p + len) ahead of use. The packers below read one short piece of each of
// many rows of W (a stride of a whole row apart), which the hardware prefetchers do not follow.
static inline void prefetch_bytes(const void* p, int64_t len) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < len; off += 64) __builtin_prefetch(c + off);
  __builtin_prefetch(c + len - 1);
}
constexpr int64_t kPrefetchRows = 8;  // rows of W ahead

// gemm_abt panel for the forward: rows row0.. of deq(W) over depth d0..d0+kc, as stored.
template <int T>
struct PackRowsAsStored {
  using Tr = Traits<T>;
  const typename Tr::block* w;
  int64_t nb;  // blocks per row of W
  void operator()(int64_t row0, int64_t rows, int64_t d0, int64_t kc, float* bp) const {
    constexpr int BS = Tr::kElems;
    for (int64_t r = 0; r < rows; ++r) {
      const auto* row = w + (row0 + r) * nb + d0 / BS;
      if (r + kPrefetchRows < rows) prefetch_bytes(row + kPrefetchRows * nb, kc / BS * sizeof(*row));
      for (int64_t b = 0; b < kc / BS; ++b) dequant_block<T>(row + b, bp + r * kc + b * BS);
    }
  }
};

// gemm_packed_b panel for the forward at larger M: B[k][n] = deq(W)[n][k]. Rows of W are
// dequantized kNR at a time (one strip) over the panel's depth, then transposed into the strip.
template <int T>
struct PackTransposed {
  using Tr = Traits<T>;
  const typename Tr::block* w;
  int64_t nb;  // blocks per row of W
  void operator()(int64_t col0, int64_t cols, int64_t d0, int64_t kc, float* bp) const {
    constexpr int BS = Tr::kElems;
    AlignedFloats tmp(kNR * kKC);
    for (int64_t s = 0; s * kNR < cols; ++s) {
      const int rows = (int)std::min<int64_t>(kNR, cols - s * kNR);
      for (int r = 0; r < rows; ++r) {
        const auto* row = w + (col0 + s * kNR + r) * nb + d0 / BS;
        if (r + kPrefetchRows < rows) prefetch_bytes(row + kPrefetchRows * nb, kc / BS * sizeof(*row));
        for (int64_t b = 0; b < kc / BS; ++b) dequant_block<T>(row + b, tmp.get() + r * kKC + b * BS);
      }
      if (rows < kNR) std::fill(tmp.get() + rows * kKC, tmp.get() + kNR * kKC, 0.0f);
      float* strip = bp + s * kc * kNR;
      for (int64_t p = 0; p < kc; ++p)
        for (int r = 0; r < kNR; ++r) strip[p * kNR + r] = tmp.get()[r * kKC + p];
    }
  }
};

// GEMM B panel for the input gradient: B[n][k] = deq(W)[n][k], W's rows as they are.
// cols is a multiple of the block size (the driver is given col_align = lcm(kNR, block size)
// and K is a multiple of the block size), hence of kNR: no padding.
template <int T>
struct PackRows {
  using Tr = Traits<T>;
  const typename Tr::block* w;
  int64_t nb;
  void operator()(int64_t col0, int64_t cols, int64_t d0, int64_t kc, float* bp) const {
    constexpr int BS = Tr::kElems;
    alignas(64) float tmp[kNC];
    for (int64_t p = 0; p < kc; ++p) {
      const auto* row = w + (d0 + p) * nb + col0 / BS;
      if (p + kPrefetchRows < kc) prefetch_bytes(row + kPrefetchRows * nb, cols / BS * sizeof(*row));
      for (int64_t b = 0; b < cols / BS; ++b) dequant_block<T>(row + b, tmp + b * BS);
      for (int64_t s = 0; s < cols / kNR; ++s) std::memcpy(bp + (s * kc + p) * kNR, tmp + s * kNR, kNR * sizeof(float));
    }
  }
};

void qmatmul_forward(int qtype, const void* x, int dtype, const void* w, void* y,
                     int64_t m, int64_t n, int64_t k) {
  const BlockInfo bi = block_info(qtype);
  if (k % bi.elems) throw std::invalid_argument("K is not a multiple of the block size");
  if (m <= 0 || n <= 0) return;
  std::vector<float> xbuf, ybuf;
  const float* xf = as_f32(x, dtype, m * k, xbuf);
  float* yf = f32_output(y, dtype, m * n, ybuf);
  dispatch_qtype(qtype, [&]<int T>() {
    using block = typename Traits<T>::block;
    if (m <= kGroupedSmallM) {
      for (int64_t i0 = 0; i0 < m; i0 += kSmallM) {  // rows of X 4 at a time, each row once
        parallel_for(n, kRowGroup, [&](int64_t r0, int64_t r1) {
          run_small<ForwardSmall, T>(std::min(kSmallM, m - i0), xf + i0 * k, k, w, yf + i0 * n, n, r0, r1);
        });
      }
    } else if (m < kTransposeM) {
      gemm_abt(m, n, k, xf, k, yf, n, PackRowsAsStored<T>{static_cast<const block*>(w), k / Traits<T>::kElems});
    } else {
      gemm_packed_b(m, n, k, xf, k, yf, n, PackTransposed<T>{static_cast<const block*>(w), k / Traits<T>::kElems});
    }
  });
  finish_output(y, dtype, ybuf);
}

void qmatvec_rows(int qtype, const float* x, const void* w, float* out, int64_t k, int64_t r0, int64_t r1) {
  if (!dispatch_qtype(qtype, [&]<int T>() { forward_small<T, 1>(x, k, w, out, 0, r0, r1); }))
    throw std::invalid_argument("unknown quantization type id " + std::to_string(qtype));
}

void qmatmul_input_grad(int qtype, const void* dy, int dtype, const void* w, void* dx,
                        int64_t m, int64_t n, int64_t k) {
  const BlockInfo bi = block_info(qtype);
  if (k % bi.elems) throw std::invalid_argument("K is not a multiple of the block size");
  if (m <= 0 || k <= 0) return;
  std::vector<float> gbuf, dxbuf;
  const float* gf = as_f32(dy, dtype, m * n, gbuf);
  float* dxf = f32_output(dx, dtype, m * k, dxbuf);
  dispatch_qtype(qtype, [&]<int T>() {
    using block = typename Traits<T>::block;
    const int64_t nb = k / Traits<T>::kElems;
    if (m <= kSmallM) {
      // W's rows in fixed chunks (not per thread, so the result does not depend on the thread
      // count), each chunk's partial dX from whole rows read as stored, then the partials
      // summed in chunk order.
      const int64_t chunks = (n + kGradChunkRows - 1) / kGradChunkRows;
      if (chunks <= 1) {
        run_small<InputGradSmall, T>(m, gf, n, w, k, dxf, (int64_t)0, n);
      } else {
        AlignedFloats parts(chunks * m * k);
        parallel_for(chunks, 1, [&](int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c)
            run_small<InputGradSmall, T>(m, gf, n, w, k, parts.get() + c * m * k, c * kGradChunkRows,
                                         std::min(n, (c + 1) * kGradChunkRows));
        });
        parallel_for(m * k, 1024, [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            float s = parts.get()[i];
            for (int64_t c = 1; c < chunks; ++c) s += parts.get()[c * m * k + i];
            dxf[i] = s;
          }
        });
      }
    } else {
      // Panels of whole blocks: PackRows dequantizes blocks of W's rows.
      gemm_packed_b(m, k, n, gf, n, dxf, k, PackRows<T>{static_cast<const block*>(w), nb},
                    std::lcm<int64_t>(kNR, Traits<T>::kElems));
    }
  });
  finish_output(dx, dtype, dxbuf);
}

}  // namespace lowtune::cpu
