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

// What a row's 16 elements get added before they are stored: nothing (the plain chunk), or one matrix
// expanded over repeat and pool (ExpandUpdate). row() reads what a row needs before the row is decoded, so
// its load is in flight with the weights'.
struct NoUpdate {
  struct Row {};
  __device__ __forceinline__ Row row(int, int) const { return {}; }
  __device__ __forceinline__ void add(const Row&, int, float*) const {}
};

// W' = deq(W) + scale · a[(row0 + r) / repeat][c / pool]: QA-HiRA's update, scale including its 1/pool.
// a: fp32 [N / repeat][K / pool] (row length lda). Where pool is a multiple of 16 a thread's 16 elements
// share one value of a. Indices are 32-bit (K and N < 2^31): a 64-bit division is a long call.
struct ExpandUpdate {
  const float* a;
  int64_t lda;
  int pool, repeat, row0;
  float scale;
  struct Row {
    const float* arow;
    float d;
  };
  __device__ __forceinline__ Row row(int r, int k) const {
    const float* arow = a + (int64_t)((row0 + r) / repeat) * lda;
    return {arow, pool % 16 == 0 ? scale * __ldg(arow + k / pool) : 0.0f};
  }
  __device__ __forceinline__ void add(const Row& x, int k, float* v) const {
    if (pool % 16 == 0) {
#pragma unroll
      for (int i = 0; i < 16; ++i) v[i] += x.d;
    } else {
#pragma unroll
      for (int i = 0; i < 16; ++i) v[i] += scale * __ldg(x.arow + (k + i) / pool);
    }
  }
};

// Grid: x over 16-element groups of a row, y over pairs of rows (strided); the loads of both rows (and
// their updates' values) are issued before either is decoded.
template <int T, class OUT, class UPD>
__device__ __forceinline__ void dequant_rows(const uint8_t* __restrict__ w, int64_t row_bytes, int nrows, int col0,
                                             int groups, OUT* __restrict__ out, int64_t ldo, const UPD& upd) {
  using U = Unpack<T>;
  constexpr int W = U::template Words<16>::value;
  const int gi = blockIdx.x * blockDim.x + threadIdx.x;
  if (gi >= groups) return;
  const int k = col0 + 16 * gi;
  const uint8_t* blk = w + (int64_t)(k / U::kElems) * U::kBytes;
  const int e = k % U::kElems;
  for (int r = blockIdx.y; r < nrows; r += 2 * gridDim.y) {
    const int r2 = r + gridDim.y;
    const bool two = r2 < nrows;
    uint32_t ra[W], rb[W];
    U::template load<16>(blk + r * row_bytes, e, ra);
    if (two) U::template load<16>(blk + r2 * row_bytes, e, rb);
    const typename UPD::Row ua = upd.row(r, k);
    typename UPD::Row ub{};
    if (two) ub = upd.row(r2, k);
    float v[16];
    U::template decode<16>(ra, e, v);
    upd.add(ua, k, v);
    store16<OUT>(out + r * ldo + 16 * gi, v);
    if (two) {
      U::template decode<16>(rb, e, v);
      upd.add(ub, k, v);
      store16<OUT>(out + r2 * ldo + 16 * gi, v);
    }
  }
}

template <int T, class OUT>
__global__ void __launch_bounds__(128) dequant_tile_kernel(const uint8_t* __restrict__ w, int64_t row_bytes,
                                                           int nrows, int col0, int groups,
                                                           OUT* __restrict__ out, int64_t ldo) {
  dequant_rows<T, OUT>(w, row_bytes, nrows, col0, groups, out, ldo, NoUpdate{});
}

template <int T, class OUT>
__global__ void __launch_bounds__(128) dequant_expand_kernel(const uint8_t* __restrict__ w, int64_t row_bytes,
                                                             int nrows, int col0, int groups,
                                                             OUT* __restrict__ out, int64_t ldo, ExpandUpdate upd) {
  dequant_rows<T, OUT>(w, row_bytes, nrows, col0, groups, out, ldo, upd);
}

// The launches' grid: 128 threads over a row's 16-element groups, then pairs of rows.
inline dim3 dequant_rows_grid(int64_t nrows, int groups) {
  const int64_t row_pairs = (nrows + 1) / 2;
  return dim3((unsigned)((groups + 127) / 128), (unsigned)(row_pairs < 65535 ? row_pairs : 65535));
}

// K, N and a chunk's column offset index with 32 bits in the kernels.
inline void check_dequant_extent(int64_t nrows, int64_t col0, int64_t ncols) {
  if (nrows > INT32_MAX || col0 + ncols > INT32_MAX)
    throw std::invalid_argument("dequantize: a matrix needs fewer than 2^31 rows and columns");
}

template <int T>
void launch_dequant_tile(const uint8_t* w, int64_t row_bytes, int64_t nrows, int64_t col0, int64_t ncols,
                         void* out, int out_dtype, int64_t ldo, cudaStream_t stream) {
  if (nrows <= 0 || ncols <= 0) return;
  check_dequant_extent(nrows, col0, ncols);
  const int groups = (int)(ncols / 16);
  const dim3 grid = dequant_rows_grid(nrows, groups);
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
// memory. A warp takes 16 rows x 64 columns: its m16n8k16 products of Bx's rows and At's columns leave in
// each thread exactly the 16 consecutive columns of 2 rows that it then dequantizes, adds to and stores
// with 16-byte stores. That needs only a relabelling of the products' indices, which a sum over them
// allows: of 8-column tile j, column n is the warp's column 16 (n / 2) + 2 j + n % 2 (so thread c's
// accumulators hold columns 16 c .. 16 c + 15), and of 16-rank step s, pair index 2 c (+8) is rank
// 16 s + 4 c (+2). Bx and At come in the order those fragments are read (lowtune.ops.lowrank_ready): a
// lane's A registers of a step are one 16-byte load and its B registers of a tile one 8-byte load, and a
// warp's 32 loads are contiguous (512 or 256 bytes), so the factors cost the L1 whole lines. A CTA's 4
// warps are stacked in rows (64 x 64) and read the same At fragments. bx: the chunk's row tiles of Bx, at:
// its column tiles of At (N padded to 16 rows, K to 64 columns, rank to a multiple of 16, all zero: rows
// and columns past the chunk's are read, their products land only in accumulators that are not stored).
// Its twin: deq(W) + scale · Bx · Atᵀ in float64 (tests/test_cuda.py); the layout's test: test_ops_cpu.py.
constexpr int kLowRankRows = 64, kLowRankCols = 64;
template <int T, class OUT>
__global__ void __launch_bounds__(128, 5) dequant_lowrank_kernel(const uint8_t* __restrict__ w, int64_t row_bytes,
                                                                 int64_t nrows, int64_t col0, int64_t ncols,
                                                                 OUT* __restrict__ out, int64_t ldo,
                                                                 const OUT* __restrict__ bx,
                                                                 const OUT* __restrict__ at, int rank, float scale) {
  using U = Unpack<T>;
  constexpr int W = U::template Words<16>::value, kJ = kLowRankCols / 8;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int64_t row_tile = (int64_t)blockIdx.y * (kLowRankRows / 16) + warp;
  const int64_t wr0 = 16 * row_tile, wc0 = (int64_t)blockIdx.x * kLowRankCols;
  if (wr0 >= nrows) return;  // the whole warp: no product of it is stored
  const int steps = rank / 16;
  const uint4* fa = reinterpret_cast<const uint4*>(bx) + row_tile * steps * 32 + lane;  // step s: + 32 s
  // + 32 (8 s + j)
  const uint2* fb = reinterpret_cast<const uint2*>(at) + (int64_t)blockIdx.x * steps * kJ * 32 + lane;
  float acc[kJ][4];
#pragma unroll
  for (int j = 0; j < kJ; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
#pragma unroll 2
  for (int s = 0; s < steps; ++s) {
    const uint4 av = fa[32 * s];
    const uint32_t a[4] = {av.x, av.y, av.z, av.w};
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
      const uint2 b = fb[32 * (kJ * s + j)];
      mma16816<OUT>(acc[j], a, b.x, b.y);
    }
  }
  // this thread's rows wr0 + g, wr0 + g + 8 and columns col .. col + 15
  const int64_t row_a = wr0 + g, row_b = row_a + 8, col = wc0 + 16 * c;
  if (col >= ncols) return;
  const int64_t k = col0 + col;
  const int e = (int)(k % U::kElems);
  const uint8_t* blk = w + (k / U::kElems) * U::kBytes;
  uint32_t wa[W], wb[W];  // loaded after the products: held through them they would spill
  if (row_a < nrows) U::template load<16>(blk + row_a * row_bytes, e, wa);
  if (row_b < nrows) U::template load<16>(blk + row_b * row_bytes, e, wb);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t row = h ? row_b : row_a;
    if (row >= nrows) continue;
    float v[16];
    U::template decode<16>(h ? wb : wa, e, v);
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
      v[2 * j] += scale * acc[j][2 * h];
      v[2 * j + 1] += scale * acc[j][2 * h + 1];
    }
    store16<OUT>(out + row * ldo + col, v);
  }
}

template <int T>
void launch_dequant_expand_tile(const uint8_t* w, int64_t row_bytes, int64_t nrows, int64_t col0, int64_t ncols,
                                void* out, int out_dtype, int64_t ldo, const float* a, int64_t lda, int pool,
                                int repeat, int64_t row0, float scale, cudaStream_t stream) {
  if (nrows <= 0 || ncols <= 0) return;
  check_dequant_extent(row0 + nrows, col0, ncols);
  const int groups = (int)(ncols / 16);
  const dim3 grid = dequant_rows_grid(nrows, groups);
  const ExpandUpdate upd{a, lda, pool, repeat, (int)row0, scale};
  switch (out_dtype) {
    case D_F16:
      dequant_expand_kernel<T, __half><<<grid, 128, 0, stream>>>(w, row_bytes, (int)nrows, (int)col0, groups,
                                                                 static_cast<__half*>(out), ldo, upd);
      break;
    case D_BF16:
      dequant_expand_kernel<T, __nv_bfloat16><<<grid, 128, 0, stream>>>(
          w, row_bytes, (int)nrows, (int)col0, groups, static_cast<__nv_bfloat16*>(out), ldo, upd);
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
  if (nrows <= 0 || ncols <= 0) return;  // rank: a positive multiple of 16, checked by the products' entry points
  const int64_t row_tiles = (nrows + kLowRankRows - 1) / kLowRankRows;
  if (row_tiles > 65535) throw std::invalid_argument("dequant_lowrank: too many rows in one chunk");
  const dim3 grid((unsigned)((ncols + kLowRankCols - 1) / kLowRankCols), (unsigned)row_tiles);
  switch (out_dtype) {
    case D_F16:
      dequant_lowrank_kernel<T, __half><<<grid, 128, 0, stream>>>(
          w, row_bytes, nrows, col0, ncols, static_cast<__half*>(out), ldo, static_cast<const __half*>(bx),
          static_cast<const __half*>(at), rank, scale);
      break;
    case D_BF16:
      dequant_lowrank_kernel<T, __nv_bfloat16><<<grid, 128, 0, stream>>>(
          w, row_bytes, nrows, col0, ncols, static_cast<__nv_bfloat16*>(out), ldo,
          static_cast<const __nv_bfloat16*>(bx), static_cast<const __nv_bfloat16*>(at), rank, scale);
      break;
    default:
      throw std::invalid_argument("the low-rank update takes bfloat16 or float16 activations");
  }
  LT_CUDA_CHECK_LAUNCH();
}

}  // namespace lowtune::cuda
