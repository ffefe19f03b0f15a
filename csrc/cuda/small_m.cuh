// Fused kernels for few activation rows (M <= 64, bf16/fp16): the packed weight is read once,
// unpacked in registers and multiplied on the tensor cores (mma.m16n8k16, fp32 accumulation);
// rows of X beyond M are zero. Memory-bound: the aim is to stream W's bytes at HBM speed.
//
// Forward  Y[M,N] = X[M,K]·deq(W)ᵀ. A warp owns 32 rows of W (four n8 tiles); a CTA of four warps
//   owns 128 rows and one range of K. Per 64-wide chunk of K, lane (g, c) unpacks elements
//   [16c, 16c+16) of row g of each tile straight into B-fragment registers and loads the
//   matching 16 elements of X rows g and g+8 with two 16-byte loads. The order of the
//   reduction index inside a chunk is permuted (any order gives the same sum): in step u
//   (u < 4), fragment index 2c, 2c+1 is element 16c+4u, +1 and index 2c+8, 2c+9 is 16c+4u+2, +3,
//   for A and B alike.
// Input gradient dX[M,K] = dY[M,N]·deq(W). A CTA owns 128 columns of dX (32 per warp) and one
//   range of W's rows (the reduction). Per stage it unpacks a 64-row x 128-column tile of W
//   into shared memory as 16-bit values and reads B fragments with ldmatrix.trans.
// Both split the reduction over gridDim.y when the grid would otherwise be too small to keep
// the memory busy; the splits write fp32 partial sums that a second kernel adds in a fixed order
// (deterministic results).
#pragma once
#include <algorithm>

#include "common.cuh"
#include "internal.h"
#include "mma.cuh"
#include "unpack.cuh"

namespace lowtune::cuda {

constexpr int kWarps = 4;
constexpr int kFwdTiles = 4;                        // n8 tiles per warp
constexpr int kFwdRows = kWarps * 8 * kFwdTiles;    // W rows per CTA
constexpr int kSpan = 16;                           // elements one lane unpacks per call
constexpr int kChunk = 4 * kSpan;                   // K elements per forward iteration
constexpr int kIgCols = 128;                        // dX columns per CTA (32 per warp)
constexpr int kIgRows = 64;                         // W rows per shared-memory stage
constexpr int kIgPitch = kIgCols + 8;               // 272-byte rows: ldmatrix rows hit distinct banks

template <int T, class ACT>
__device__ __forceinline__ void unpack_pairs(const uint8_t* row, int k, uint32_t* pw) {
  using U = Unpack<T>;
  float v[kSpan];
  U::template run<kSpan>(row + ((unsigned)k / U::kElems) * U::kBytes, (int)((unsigned)k % U::kElems), v);
#pragma unroll
  for (int i = 0; i < kSpan / 2; ++i) pw[i] = pack2<ACT>(v[2 * i], v[2 * i + 1]);
}

// 16 consecutive 16-bit values at p (32-byte aligned) into 8 words; zeros when p is null.
__device__ __forceinline__ void load_x16(const uint16_t* p, uint32_t* w) {
  if (p) {
    const uint4 a = __ldg(reinterpret_cast<const uint4*>(p));
    const uint4 b = __ldg(reinterpret_cast<const uint4*>(p) + 1);
    w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w; w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) w[i] = 0;
  }
}

template <int T, class ACT, int MT>
__global__ void __launch_bounds__(128) small_forward_kernel(const uint16_t* __restrict__ x,
                                                            const uint8_t* __restrict__ w, ACT* __restrict__ y,
                                                            float* __restrict__ part, int M, int N, int K,
                                                            int64_t row_bytes, int chunks_per_split) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  const int n_warp = blockIdx.x * kFwdRows + warp * 8 * kFwdTiles;
  const int nchunks = (K + kChunk - 1) / kChunk;
  const int q0 = blockIdx.y * chunks_per_split, q1 = min(nchunks, q0 + chunks_per_split);
  const uint8_t* wrow[kFwdTiles];
#pragma unroll
  for (int t = 0; t < kFwdTiles; ++t) wrow[t] = w + (int64_t)min(n_warp + 8 * t + g, N - 1) * row_bytes;

  float acc[MT][kFwdTiles][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int t = 0; t < kFwdTiles; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][t][i] = 0.0f;

#pragma unroll 1
  for (int q = q0; q < q1; ++q) {
    const int k0 = q * kChunk + c * kSpan;
    const bool kval = k0 < K;  // false only in a last half chunk (K % 64 == 32)
    uint32_t xa[MT][8], xb[MT][8];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int r0 = 16 * mt + g, r1 = r0 + 8;
      load_x16(kval && r0 < M ? x + (int64_t)r0 * K + k0 : nullptr, xa[mt]);
      load_x16(kval && r1 < M ? x + (int64_t)r1 * K + k0 : nullptr, xb[mt]);
    }
#pragma unroll
    for (int t = 0; t < kFwdTiles; ++t) {
      uint32_t pw[8];
      if (kval) {
        unpack_pairs<T, ACT>(wrow[t], k0, pw);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) pw[i] = 0;
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const uint32_t a[4] = {xa[mt][2 * u], xb[mt][2 * u], xa[mt][2 * u + 1], xb[mt][2 * u + 1]};
          mma16816<ACT>(acc[mt][t], a, pw[2 * u], pw[2 * u + 1]);
        }
    }
  }

#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int t = 0; t < kFwdTiles; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = 16 * mt + g + 8 * (i >> 1), col = n_warp + 8 * t + 2 * c + (i & 1);
        if (row < M && col < N) {
          if (part) part[((int64_t)blockIdx.y * M + row) * N + col] = acc[mt][t][i];
          else y[(int64_t)row * N + col] = f_to_act<ACT>(acc[mt][t][i]);
        }
      }
}

// dY[r, n] and dY[r, n+1] as one pair register; zero outside rows < M and n < n_end.
__device__ __forceinline__ uint32_t load_pair(const uint16_t* dy, int r, int n, int M, int N, int n_end) {
  if (r >= M) return 0;
  const uint16_t* p = dy + (int64_t)r * N + n;
  const uint32_t lo = n < n_end ? p[0] : 0u, hi = n + 1 < n_end ? p[1] : 0u;
  return lo | (hi << 16);
}

template <int T, class ACT, int MT>
__global__ void __launch_bounds__(128) small_input_grad_kernel(const uint16_t* __restrict__ dy,
                                                               const uint8_t* __restrict__ w, ACT* __restrict__ dx,
                                                               float* __restrict__ part, int M, int N, int K,
                                                               int64_t row_bytes, int rows_per_split) {
  __shared__ __align__(16) uint16_t sw[kIgRows * kIgPitch];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  const int col_cta = blockIdx.x * kIgCols;
  const int n_begin = blockIdx.y * rows_per_split, n_end = min(N, n_begin + rows_per_split);

  float acc[MT][4][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][t][i] = 0.0f;

#pragma unroll 1
  for (int n0 = n_begin; n0 < n_end; n0 += kIgRows) {
    // W[n0 .. n0+64) x [col_cta .. col_cta+128) -> shared memory, zeros outside the matrix.
#pragma unroll
    for (int it = 0; it < kIgRows * kIgCols / kSpan / 128; ++it) {
      const int i = it * 128 + threadIdx.x;
      const int r = i / (kIgCols / kSpan), cg = i % (kIgCols / kSpan);
      const int n = n0 + r, k = col_cta + cg * kSpan;
      uint32_t pw[8];
      if (n < n_end && k < K) {
        unpack_pairs<T, ACT>(w + (int64_t)n * row_bytes, k, pw);
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) pw[j] = 0;
      }
      uint4* dst = reinterpret_cast<uint4*>(&sw[r * kIgPitch + cg * kSpan]);
      dst[0] = make_uint4(pw[0], pw[1], pw[2], pw[3]);
      dst[1] = make_uint4(pw[4], pw[5], pw[6], pw[7]);
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < kIgRows / 16; ++s) {
      const int nn = n0 + 16 * s + 2 * c;
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int r0 = 16 * mt + g, r1 = r0 + 8;
        a[mt][0] = load_pair(dy, r0, nn, M, N, n_end);
        a[mt][1] = load_pair(dy, r1, nn, M, N, n_end);
        a[mt][2] = load_pair(dy, r0, nn + 8, M, N, n_end);
        a[mt][3] = load_pair(dy, r1, nn + 8, M, N, n_end);
      }
#pragma unroll
      for (int tp = 0; tp < 2; ++tp) {
        const int mid = lane >> 3;
        const int row = 16 * s + (mid & 1) * 8 + (lane & 7);
        const int col = warp * 32 + tp * 16 + (mid >> 1) * 8;
        uint32_t b[4];
        ldmatrix_x4_trans(b, &sw[row * kIgPitch + col]);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816<ACT>(acc[mt][2 * tp], a[mt], b[0], b[1]);
          mma16816<ACT>(acc[mt][2 * tp + 1], a[mt], b[2], b[3]);
        }
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = 16 * mt + g + 8 * (i >> 1), col = col_cta + warp * 32 + 8 * t + 2 * c + (i & 1);
        if (row < M && col < K) {
          if (part) part[((int64_t)blockIdx.y * M + row) * K + col] = acc[mt][t][i];
          else dx[(int64_t)row * K + col] = f_to_act<ACT>(acc[mt][t][i]);
        }
      }
}

// out[i] = sum over splits s (in order) of part[s * count + i].
template <class ACT>
__global__ void reduce_splits_kernel(const float* __restrict__ part, int splits, int64_t count, ACT* __restrict__ out) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < count; i += (int64_t)gridDim.x * blockDim.x) {
    float s = 0.0f;
    for (int j = 0; j < splits; ++j) s += part[j * count + i];
    out[i] = f_to_act<ACT>(s);
  }
}

// How many ways to split a reduction of `units` work units over a grid `tiles` wide: enough
// CTAs for about three waves, but partial sums (m x outputs fp32 per split) no more than a
// quarter of the weight's bytes.
inline int choose_splits(int tiles, int units, double weight_bytes, double m, double outputs) {
  int s = (3 * sm_count() + tiles - 1) / tiles;
  const double cap = weight_bytes / 4.0 / (4.0 * m * outputs);
  s = std::min(s, (int)std::max(1.0, cap));
  s = std::max(1, std::min(std::min(s, units), 65535));
  const int per = (units + s - 1) / s;
  return (units + per - 1) / per;
}

template <class ACT>
void launch_reduce(const float* part, int splits, int64_t count, void* out, cudaStream_t stream) {
  const int64_t blocks = std::min<int64_t>((count + 255) / 256, 4 * (int64_t)sm_count());
  reduce_splits_kernel<ACT><<<(unsigned)blocks, 256, 0, stream>>>(part, splits, count, static_cast<ACT*>(out));
  LT_CUDA_CHECK_LAUNCH();
}

template <int T, class ACT>
void small_forward_typed(const void* x, const uint8_t* w, void* y, int m, int n, int k, int64_t row_bytes,
                         cudaStream_t stream) {
  const int tiles = (n + kFwdRows - 1) / kFwdRows, nchunks = (k + kChunk - 1) / kChunk;
  const int splits = choose_splits(tiles, nchunks, (double)n * row_bytes, m, n);
  const int per = (nchunks + splits - 1) / splits;
  ScratchBuffer part(splits > 1 ? (size_t)splits * m * n * sizeof(float) : 0, stream);
  const dim3 grid((unsigned)tiles, (unsigned)splits);
  const auto* xs = static_cast<const uint16_t*>(x);
  auto* ys = static_cast<ACT*>(y);
  float* p = part.as<float>();
  if (m <= 16) small_forward_kernel<T, ACT, 1><<<grid, 128, 0, stream>>>(xs, w, ys, p, m, n, k, row_bytes, per);
  else if (m <= 32) small_forward_kernel<T, ACT, 2><<<grid, 128, 0, stream>>>(xs, w, ys, p, m, n, k, row_bytes, per);
  else small_forward_kernel<T, ACT, 4><<<grid, 128, 0, stream>>>(xs, w, ys, p, m, n, k, row_bytes, per);
  LT_CUDA_CHECK_LAUNCH();
  if (p) launch_reduce<ACT>(p, splits, (int64_t)m * n, y, stream);
}

template <int T, class ACT>
void small_input_grad_typed(const void* dy, const uint8_t* w, void* dx, int m, int n, int k, int64_t row_bytes,
                            cudaStream_t stream) {
  const int tiles = (k + kIgCols - 1) / kIgCols, stages = (n + kIgRows - 1) / kIgRows;
  const int splits = choose_splits(tiles, stages, (double)n * row_bytes, m, k);
  const int rows_per_split = ((stages + splits - 1) / splits) * kIgRows;
  ScratchBuffer part(splits > 1 ? (size_t)splits * m * k * sizeof(float) : 0, stream);
  const dim3 grid((unsigned)tiles, (unsigned)splits);
  const auto* ds = static_cast<const uint16_t*>(dy);
  auto* xs = static_cast<ACT*>(dx);
  float* p = part.as<float>();
  if (m <= 16) small_input_grad_kernel<T, ACT, 1><<<grid, 128, 0, stream>>>(ds, w, xs, p, m, n, k, row_bytes, rows_per_split);
  else if (m <= 32) small_input_grad_kernel<T, ACT, 2><<<grid, 128, 0, stream>>>(ds, w, xs, p, m, n, k, row_bytes, rows_per_split);
  else small_input_grad_kernel<T, ACT, 4><<<grid, 128, 0, stream>>>(ds, w, xs, p, m, n, k, row_bytes, rows_per_split);
  LT_CUDA_CHECK_LAUNCH();
  if (p) launch_reduce<ACT>(p, splits, (int64_t)m * k, dx, stream);
}

template <int T>
void launch_small_forward(const void* x, int dtype, const uint8_t* w, void* y, int m, int n, int k,
                          int64_t row_bytes, cudaStream_t stream) {
  if (dtype == D_BF16) small_forward_typed<T, __nv_bfloat16>(x, w, y, m, n, k, row_bytes, stream);
  else if (dtype == D_F16) small_forward_typed<T, __half>(x, w, y, m, n, k, row_bytes, stream);
  else throw std::invalid_argument("the small-M kernels take bf16 or fp16 activations");
}

template <int T>
void launch_small_input_grad(const void* dy, int dtype, const uint8_t* w, void* dx, int m, int n, int k,
                             int64_t row_bytes, cudaStream_t stream) {
  if (dtype == D_BF16) small_input_grad_typed<T, __nv_bfloat16>(dy, w, dx, m, n, k, row_bytes, stream);
  else if (dtype == D_F16) small_input_grad_typed<T, __half>(dy, w, dx, m, n, k, row_bytes, stream);
  else throw std::invalid_argument("the small-M kernels take bf16 or fp16 activations");
}

}  // namespace lowtune::cuda
