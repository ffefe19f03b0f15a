// Dequantize a tile of W (rows x columns, columns a multiple of 32) into a dense matrix:
// the fast twin of reference::dequantize, and the producer of the bf16/fp16/fp32 scratch that
// the large-M path hands to cuBLAS. One thread unpacks 16 consecutive elements and writes them
// with 16-byte stores; consecutive threads take consecutive 16-element groups of a row.
#pragma once
#include "common.cuh"
#include "internal.h"
#include "mma.cuh"
#include "unpack.cuh"

namespace lowtune::cuda {

template <class OUT>
__device__ __forceinline__ void store16(OUT* dst, const float* v) {
  if constexpr (std::is_same_v<OUT, float>) {
    float4* d = reinterpret_cast<float4*>(dst);
#pragma unroll
    for (int i = 0; i < 4; ++i) d[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
  } else {
    uint32_t p[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) p[i] = pack2<OUT>(v[2 * i], v[2 * i + 1]);
    uint4* d = reinterpret_cast<uint4*>(dst);
    d[0] = make_uint4(p[0], p[1], p[2], p[3]);
    d[1] = make_uint4(p[4], p[5], p[6], p[7]);
  }
}

// Grid: x over 16-element groups of a row, y over pairs of rows (strided); the loads of both
// rows are issued before either is decoded.
template <int T, class OUT>
__global__ void __launch_bounds__(128) dequant_tile_kernel(const uint8_t* __restrict__ w, int64_t row_bytes,
                                                           int64_t nrows, int64_t col0, int groups,
                                                           OUT* __restrict__ out, int64_t ldo) {
  using U = Unpack<T>;
  constexpr int W = U::template Words<16>::value;
  const int gi = blockIdx.x * blockDim.x + threadIdx.x;
  if (gi >= groups) return;
  const int64_t k = col0 + 16 * (int64_t)gi;
  const uint8_t* blk = w + (k / U::kElems) * U::kBytes;
  const int e = (int)(k % U::kElems);
  for (int64_t r = blockIdx.y; r < nrows; r += 2 * (int64_t)gridDim.y) {
    const int64_t r2 = r + gridDim.y;
    uint32_t ra[W], rb[W];
    U::template load<16>(blk + r * row_bytes, e, ra);
    if (r2 < nrows) U::template load<16>(blk + r2 * row_bytes, e, rb);
    float v[16];
    U::template decode<16>(ra, e, v);
    store16<OUT>(out + r * ldo + 16 * (int64_t)gi, v);
    if (r2 < nrows) {
      U::template decode<16>(rb, e, v);
      store16<OUT>(out + r2 * ldo + 16 * (int64_t)gi, v);
    }
  }
}

template <int T>
void launch_dequant_tile(const uint8_t* w, int64_t row_bytes, int64_t nrows, int64_t col0, int64_t ncols,
                         void* out, int out_dtype, int64_t ldo, cudaStream_t stream) {
  if (nrows <= 0 || ncols <= 0) return;
  const int groups = (int)(ncols / 16);
  const int64_t row_pairs = (nrows + 1) / 2;
  const dim3 grid((unsigned)((groups + 127) / 128), (unsigned)(row_pairs < 65535 ? row_pairs : 65535));
  switch (out_dtype) {
    case D_F32:
      dequant_tile_kernel<T, float><<<grid, 128, 0, stream>>>(w, row_bytes, nrows, col0, groups,
                                                              static_cast<float*>(out), ldo);
      break;
    case D_F16:
      dequant_tile_kernel<T, __half><<<grid, 128, 0, stream>>>(w, row_bytes, nrows, col0, groups,
                                                               static_cast<__half*>(out), ldo);
      break;
    case D_BF16:
      dequant_tile_kernel<T, __nv_bfloat16><<<grid, 128, 0, stream>>>(w, row_bytes, nrows, col0, groups,
                                                                      static_cast<__nv_bfloat16*>(out), ldo);
      break;
    default:
      throw std::invalid_argument("unknown output dtype " + std::to_string(out_dtype));
  }
  LT_CUDA_CHECK_LAUNCH();
}

// The chunk of W' = deq(W) + scale · Bx · Atᵀ (a rank-r update, e.g. an adapter's s·B·A with B and A
// expanded over repeat and pool) that the large-M path hands to cuBLAS, formed in one pass with no shared
// memory. A warp takes 32 rows x 64 columns: its m16n8k16 products of Bx's rows and At's columns leave in
// each thread exactly the 16 consecutive columns of 4 rows that it then dequantizes, adds to and stores
// with 16-byte stores. That needs only a relabelling of the products' indices, which a sum over them
// allows: of 8-column tile j, column n is the warp's column 16 (n / 2) + 2 j + n % 2 (so thread c's
// accumulators hold columns 16 c .. 16 c + 15), and of 16-rank step s, pair index 2 c (+8) is rank
// 16 s + 4 c (+2) (so each lane's A and B registers of a step are one 8-byte load). A CTA's 8 warps
// cover 128 x 128; warps on the same rows or columns read the same factor rows, mostly from L1.
// bx: the tile's rows of Bx [nrows][rank]; at: its columns of At [ncols][rank] (row-major, OUT's 16-bit
// type, rank a multiple of 16: zero-padded by the caller, 8-byte aligned). Rows and columns past the
// tile's are read as zero and not stored. Its twin: deq(W) + scale · Bx · Atᵀ in float64
// (tests/test_cuda.py).
constexpr int kLowRankWarpRows = 32, kLowRankWarpCols = 64, kLowRankRows = 128, kLowRankCols = 128;
template <int T, class OUT>
__global__ void __launch_bounds__(256, 2) dequant_lowrank_kernel(const uint8_t* __restrict__ w, int64_t row_bytes,
                                                                 int64_t nrows, int64_t col0, int64_t ncols,
                                                                 OUT* __restrict__ out, int64_t ldo,
                                                                 const OUT* __restrict__ bx,
                                                                 const OUT* __restrict__ at, int rank, float scale) {
  using U = Unpack<T>;
  constexpr int W = U::template Words<16>::value;
  constexpr int kM = kLowRankWarpRows / 16, kJ = kLowRankWarpCols / 8;
  constexpr int kWarpsAcross = kLowRankCols / kLowRankWarpCols;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int64_t wr0 = (int64_t)blockIdx.y * kLowRankRows + kLowRankWarpRows * (warp / kWarpsAcross);
  const int64_t wc0 = (int64_t)blockIdx.x * kLowRankCols + kLowRankWarpCols * (warp % kWarpsAcross);
  if (wr0 >= nrows || wc0 >= ncols) return;  // the whole warp: no product of it is stored
  // this thread's rows wr0 + 8 q + g (q = 2 m + h: m-tile m, fragment half h) and columns col .. col + 15
  const int64_t col = wc0 + 16 * c;
  const bool live_col = col < ncols;
  const int64_t k = col0 + col;
  const int e = (int)(k % U::kElems);
  const uint8_t* blk = w + (k / U::kElems) * U::kBytes;
  auto quad = [&](const OUT* f, int64_t i, int64_t rows, int t) -> uint2 {  // ranks t .. t + 3 of row i
    return i < rows ? *reinterpret_cast<const uint2*>(f + i * rank + t) : make_uint2(0u, 0u);
  };
  float acc[kM][kJ][4];
#pragma unroll
  for (int m = 0; m < kM; ++m)
#pragma unroll
    for (int j = 0; j < kJ; ++j) acc[m][j][0] = acc[m][j][1] = acc[m][j][2] = acc[m][j][3] = 0.0f;
  for (int t = 4 * c; t < rank; t += 16) {
    uint32_t a[kM][4];
#pragma unroll
    for (int m = 0; m < kM; ++m) {
      const uint2 lo = quad(bx, wr0 + 16 * m + g, nrows, t), hi = quad(bx, wr0 + 16 * m + g + 8, nrows, t);
      a[m][0] = lo.x, a[m][1] = hi.x, a[m][2] = lo.y, a[m][3] = hi.y;
    }
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
      const uint2 b = quad(at, wc0 + 16 * (g >> 1) + 2 * j + (g & 1), ncols, t);
#pragma unroll
      for (int m = 0; m < kM; ++m) mma16816<OUT>(acc[m][j], a[m], b.x, b.y);
    }
  }
  if (!live_col) return;
  uint32_t words[2 * kM][W];  // loaded after the products: held through them they would spill
#pragma unroll
  for (int q = 0; q < 2 * kM; ++q) {
    const int64_t row = wr0 + 8 * q + g;
    if (row < nrows) U::template load<16>(blk + row * row_bytes, e, words[q]);
  }
#pragma unroll
  for (int q = 0; q < 2 * kM; ++q) {
    const int64_t row = wr0 + 8 * q + g;
    if (row >= nrows) continue;
    float v[16];
    U::template decode<16>(words[q], e, v);
    const int m = q / 2, h = 2 * (q % 2);
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
      v[2 * j] += scale * acc[m][j][h];
      v[2 * j + 1] += scale * acc[m][j][h + 1];
    }
    store16<OUT>(out + row * ldo + col, v);
  }
}

// The chunk of W' = deq(W) + scale · a[(row0 + r) / repeat][(col0 + c) / pool] (one matrix expanded over
// repeat and pool: QA-HiRA's update, scale including its 1/pool) in one pass: dequant_tile_kernel's
// layout, the update added before the stores. a: fp32 [N / repeat][K / pool] (row length lda), row0 the
// tile's first row in W. Where pool is a multiple of 16 a thread's 16 elements share one value of a.
template <int T, class OUT>
__global__ void __launch_bounds__(128) dequant_expand_kernel(const uint8_t* __restrict__ w, int64_t row_bytes,
                                                             int64_t nrows, int64_t col0, int groups,
                                                             OUT* __restrict__ out, int64_t ldo,
                                                             const float* __restrict__ a, int64_t lda, int pool,
                                                             int repeat, int64_t row0, float scale) {
  using U = Unpack<T>;
  constexpr int W = U::template Words<16>::value;
  const int gi = blockIdx.x * blockDim.x + threadIdx.x;
  if (gi >= groups) return;
  const int64_t k = col0 + 16 * (int64_t)gi;
  const uint8_t* blk = w + (k / U::kElems) * U::kBytes;
  const int e = (int)(k % U::kElems);
  for (int64_t r = blockIdx.y; r < nrows; r += gridDim.y) {
    uint32_t words[W];
    U::template load<16>(blk + r * row_bytes, e, words);
    float v[16];
    U::template decode<16>(words, e, v);
    const float* arow = a + (row0 + r) / repeat * lda;
    if (pool % 16 == 0) {
      const float d = scale * arow[k / pool];
#pragma unroll
      for (int i = 0; i < 16; ++i) v[i] += d;
    } else {
#pragma unroll
      for (int i = 0; i < 16; ++i) v[i] += scale * arow[(k + i) / pool];
    }
    store16<OUT>(out + r * ldo + 16 * (int64_t)gi, v);
  }
}

template <int T>
void launch_dequant_expand_tile(const uint8_t* w, int64_t row_bytes, int64_t nrows, int64_t col0, int64_t ncols,
                                void* out, int out_dtype, int64_t ldo, const float* a, int64_t lda, int pool,
                                int repeat, int64_t row0, float scale, cudaStream_t stream) {
  if (nrows <= 0 || ncols <= 0) return;
  const int groups = (int)(ncols / 16);
  const dim3 grid((unsigned)((groups + 127) / 128), (unsigned)(nrows < 65535 ? nrows : 65535));
  switch (out_dtype) {
    case D_F16:
      dequant_expand_kernel<T, __half><<<grid, 128, 0, stream>>>(w, row_bytes, nrows, col0, groups,
                                                                 static_cast<__half*>(out), ldo, a, lda, pool,
                                                                 repeat, row0, scale);
      break;
    case D_BF16:
      dequant_expand_kernel<T, __nv_bfloat16><<<grid, 128, 0, stream>>>(
          w, row_bytes, nrows, col0, groups, static_cast<__nv_bfloat16*>(out), ldo, a, lda, pool, repeat, row0, scale);
      break;
    default:
      throw std::invalid_argument("the expanded update takes bfloat16 or float16 activations");
  }
  LT_CUDA_CHECK_LAUNCH();
}

template <int T>
void launch_dequant_lowrank_tile(const uint8_t* w, int64_t row_bytes, int64_t nrows, int64_t col0, int64_t ncols,
                                 void* out, int out_dtype, int64_t ldo, const void* bx, const void* at, int rank,
                                 float scale, cudaStream_t stream) {
  if (nrows <= 0 || ncols <= 0) return;
  if (rank <= 0 || rank % 16)
    throw std::invalid_argument("the low-rank update's rank must be a positive multiple of 16 (zero-padded)");
  const int64_t row_tiles = (nrows + kLowRankRows - 1) / kLowRankRows;
  if (row_tiles > 65535) throw std::invalid_argument("dequant_lowrank: too many rows in one chunk");
  const dim3 grid((unsigned)((ncols + kLowRankCols - 1) / kLowRankCols), (unsigned)row_tiles);
  switch (out_dtype) {
    case D_F16:
      dequant_lowrank_kernel<T, __half><<<grid, 256, 0, stream>>>(
          w, row_bytes, nrows, col0, ncols, static_cast<__half*>(out), ldo, static_cast<const __half*>(bx),
          static_cast<const __half*>(at), rank, scale);
      break;
    case D_BF16:
      dequant_lowrank_kernel<T, __nv_bfloat16><<<grid, 256, 0, stream>>>(
          w, row_bytes, nrows, col0, ncols, static_cast<__nv_bfloat16*>(out), ldo,
          static_cast<const __nv_bfloat16*>(bx), static_cast<const __nv_bfloat16*>(at), rank, scale);
      break;
    default:
      throw std::invalid_argument("the low-rank update takes bfloat16 or float16 activations");
  }
  LT_CUDA_CHECK_LAUNCH();
}

}  // namespace lowtune::cuda
