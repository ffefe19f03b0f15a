// Fused kernels for few activation rows (bf16/fp16; forward M <= 32, input gradient M <= 16):
// the packed weight is read once, unpacked in registers and multiplied on the tensor cores
// (mma.m16n8k16, fp32 accumulation); rows of X beyond M are zero. Memory-bound by design: the
// aim is to stream W's bytes at HBM speed, so each warp issues the loads of its next piece of W
// before unpacking the current one. (Measured on an H100, 2026-11: 0.7-1.1 TB/s, limited by the
// latency of the per-lane 4- and 8-byte loads at ~30% occupancy; staging raw tiles through
// shared memory with cp.async is the next step.)
//
// Forward  Y[M,N] = X[M,K]·deq(W)ᵀ. A warp owns 32 rows of W (four n8 tiles); a CTA of four warps
//   owns 128 rows and one range of K, whose slice of X it first copies to shared memory. Per
//   64-wide chunk of K, lane (g, c) unpacks elements [16c, 16c+16) of row g of each tile straight
//   into B-fragment registers and reads the matching 16 elements of X rows g and g+8. The order
//   of the reduction index inside a chunk is permuted (any order gives the same sum): in step u
//   (u < 4), fragment index 2c, 2c+1 is element 16c+4u, +1 and index 2c+8, 2c+9 is 16c+4u+2, +3,
//   for A and B alike.
// Input gradient dX[M,K] = dY[M,N]·deq(W). A CTA owns 128 columns of dX (32 per warp) and one
//   range of W's rows (the reduction), whose slice of dY it first copies to shared memory. Per
//   stage it unpacks a 64-row x 128-column tile of W into shared memory as 16-bit values and
//   reads A fragments with ldmatrix and B fragments with ldmatrix.trans.
// Both split the reduction over gridDim.y so that the grid fills the GPU; the splits write fp32
// partial sums that a second kernel adds in a fixed order (deterministic results).
#pragma once
#include <algorithm>

#include "../cuda_policy.h"
#include "common.cuh"
#include "internal.h"
#include "mma.cuh"
#include "pdl.cuh"
#include "unpack.cuh"

namespace lowtune::cuda {

constexpr int kSmallMaxM = 32;                      // M of the fused forward (MT <= 2)
constexpr int kSmallMaxGradM = 16;                  // M of the fused input gradient (MT = 1); at 17..32
                                                    // the chunked cuBLAS path measured faster
constexpr int kFwdTiles = 4;                        // n8 tiles per warp
constexpr int kFwdRows = 4 * 8 * kFwdTiles;         // W rows per CTA (four warps)
constexpr int kSpan = 16;                           // elements one lane unpacks per call
constexpr int kChunk = 4 * kSpan;                   // K elements per forward iteration
constexpr int kIgCols = 128;                        // dX columns per CTA (32 per warp)
constexpr int kIgRows = 64;                         // W rows per shared-memory stage
constexpr int kIgPitch = kIgCols + 8;               // 272-byte rows: ldmatrix rows hit distinct banks
constexpr int kIgGroups = kIgRows * kIgCols / kSpan / 128;  // 16-element groups per thread per stage

// Raw words of elements [k, k+16) of a row (k clamped into the row by the caller).
template <int T>
__device__ __forceinline__ void load_span(const uint8_t* row, int k, uint32_t* r) {
  using U = Unpack<T>;
  U::template load<kSpan>(row + ((unsigned)k / U::kElems) * U::kBytes, (int)((unsigned)k % U::kElems), r);
}
// ... unpacked (decode_fast: one fused multiply-add per value) and packed into eight 16-bit
// pairs. Padding lanes (rows past N, columns past K) unpack real, finite weights that meet zeros
// in X or dY, or whose outputs are never stored.
template <int T, class ACT>
__device__ __forceinline__ void decode_span(const uint32_t* r, int k, uint32_t* pw) {
  using U = Unpack<T>;
  float v[kSpan];
  U::template decode_fast<kSpan>(r, (int)((unsigned)k % U::kElems), v);
#pragma unroll
  for (int i = 0; i < kSpan / 2; ++i) pw[i] = pack2<ACT>(v[2 * i], v[2 * i + 1]);
}

// ---- forward ---------------------------------------------------------------------------------------
template <int T, class ACT, int MT>
__device__ __forceinline__ void fwd_chunk(float (&acc)[MT][kFwdTiles][4], const uint32_t (&r)[kFwdTiles][Unpack<T>::template Words<kSpan>::value],
                                          int kl, const uint16_t* xrow, int pitch) {
  uint32_t xa[MT][8], xb[MT][8];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const uint4* pa = reinterpret_cast<const uint4*>(xrow + 16 * mt * pitch);
    const uint4* pb = reinterpret_cast<const uint4*>(xrow + (16 * mt + 8) * pitch);
    const uint4 a0 = pa[0], a1 = pa[1], b0 = pb[0], b1 = pb[1];
    xa[mt][0] = a0.x; xa[mt][1] = a0.y; xa[mt][2] = a0.z; xa[mt][3] = a0.w;
    xa[mt][4] = a1.x; xa[mt][5] = a1.y; xa[mt][6] = a1.z; xa[mt][7] = a1.w;
    xb[mt][0] = b0.x; xb[mt][1] = b0.y; xb[mt][2] = b0.z; xb[mt][3] = b0.w;
    xb[mt][4] = b1.x; xb[mt][5] = b1.y; xb[mt][6] = b1.z; xb[mt][7] = b1.w;
  }
#pragma unroll
  for (int t = 0; t < kFwdTiles; ++t) {
    uint32_t pw[8];
    decode_span<T, ACT>(r[t], kl, pw);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const uint32_t a[4] = {xa[mt][2 * u], xb[mt][2 * u], xa[mt][2 * u + 1], xb[mt][2 * u + 1]};
        mma16816<ACT>(acc[mt][t], a, pw[2 * u], pw[2 * u + 1]);
      }
  }
}

template <int T, class ACT, int MT>
__global__ void __launch_bounds__(128) small_forward_kernel(const uint16_t* __restrict__ x,
                                                            const uint8_t* __restrict__ w, ACT* __restrict__ y,
                                                            float* __restrict__ part, int M, int N, int K,
                                                            int64_t row_bytes, int chunks_per_split) {
  constexpr int W = Unpack<T>::template Words<kSpan>::value;
  extern __shared__ __align__(16) uint16_t sx[];  // [16*MT][pitch]: this split's slice of X
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  const int nchunks = (K + kChunk - 1) / kChunk;
  const int q0 = blockIdx.y * chunks_per_split, q1 = min(nchunks, q0 + chunks_per_split);
  const int kbeg = q0 * kChunk, pitch = chunks_per_split * kChunk + 8;  // +16 bytes: no bank conflicts

  // X[0:16*MT, kbeg : kbeg + chunks_per_split*64] -> shared memory, zeros outside the matrix.
  const int groups_per_row = chunks_per_split * kChunk / 8;
  for (int i = threadIdx.x; i < 16 * MT * groups_per_row; i += blockDim.x) {
    const int r = i / groups_per_row, k = kbeg + (i % groups_per_row) * 8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < M && k < K) v = __ldg(reinterpret_cast<const uint4*>(x + (int64_t)r * K + k));
    *reinterpret_cast<uint4*>(&sx[r * pitch + (k - kbeg)]) = v;
  }
  __syncthreads();

  const int n_warp = blockIdx.x * kFwdRows + warp * 8 * kFwdTiles;
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

  // Two register sets: the loads of chunk q+1 are in flight while chunk q is unpacked.
  uint32_t ra[kFwdTiles][W], rb[kFwdTiles][W];
  // A last half chunk (K % 64 == 32) loads in bounds; X is zero there.
  auto kclamp = [&](int q) { return min(q * kChunk + c * kSpan, K - kSpan); };
  auto load = [&](uint32_t (&r)[kFwdTiles][W], int q) {
#pragma unroll
    for (int t = 0; t < kFwdTiles; ++t) load_span<T>(wrow[t], kclamp(q), r[t]);
  };
  auto xrow = [&](int q) { return sx + g * pitch + (q - q0) * kChunk + c * kSpan; };
  if (q0 < q1) load(ra, q0);
#pragma unroll 1
  for (int q = q0; q < q1; q += 2) {
    if (q + 1 < q1) load(rb, q + 1);
    fwd_chunk<T, ACT, MT>(acc, ra, kclamp(q), xrow(q), pitch);
    if (q + 1 >= q1) break;
    if (q + 2 < q1) load(ra, q + 2);
    fwd_chunk<T, ACT, MT>(acc, rb, kclamp(q + 1), xrow(q + 1), pitch);
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

// ---- input gradient --------------------------------------------------------------------------------
template <int T, class ACT, int MT>
__global__ void __launch_bounds__(128) small_input_grad_kernel(const uint16_t* __restrict__ dy,
                                                               const uint8_t* __restrict__ w, ACT* __restrict__ dx,
                                                               float* __restrict__ part, int M, int N, int K,
                                                               int64_t row_bytes, int rows_per_split) {
  constexpr int W = Unpack<T>::template Words<kSpan>::value;
  __shared__ __align__(16) uint16_t sw[kIgRows * kIgPitch];
  extern __shared__ __align__(16) uint16_t sdy[];  // [16*MT][dpitch]: this split's slice of dY
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  const int col_cta = blockIdx.x * kIgCols;
  const int n_begin = blockIdx.y * rows_per_split, n_end = min(N, n_begin + rows_per_split);
  const int dpitch = rows_per_split + 8;  // +16 bytes: ldmatrix rows hit distinct banks

  for (int i = threadIdx.x; i < 16 * MT * rows_per_split; i += blockDim.x) {
    const int r = i / rows_per_split, j = i % rows_per_split, n = n_begin + j;
    sdy[r * dpitch + j] = (r < M && n < n_end) ? dy[(int64_t)r * N + n] : (uint16_t)0;
  }

  float acc[MT][4][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][t][i] = 0.0f;

  // Thread's 16-element groups of a stage: group it*128 + tid = (row r, column group cg).
  auto grow = [&](int it) { return (it * 128 + (int)threadIdx.x) >> 3; };
  auto gcol = [&](int it) { return col_cta + ((it * 128 + (int)threadIdx.x) & 7) * kSpan; };
  auto load = [&](uint32_t (&r)[kIgGroups][W], int n0) {
#pragma unroll
    for (int it = 0; it < kIgGroups; ++it) {
      const int n = min(n0 + grow(it), N - 1), k = min(gcol(it), K - kSpan);  // in bounds
      load_span<T>(w + (int64_t)n * row_bytes, k, r[it]);
    }
  };
  auto stage = [&](const uint32_t (&r)[kIgGroups][W], int n0) {
#pragma unroll
    for (int it = 0; it < kIgGroups; ++it) {
      uint32_t pw[8];
      const int k = min(gcol(it), K - kSpan);
      decode_span<T, ACT>(r[it], k, pw);  // rows past n_end meet zeros in dY
      uint4* dst = reinterpret_cast<uint4*>(&sw[grow(it) * kIgPitch + (gcol(it) - col_cta)]);
      dst[0] = make_uint4(pw[0], pw[1], pw[2], pw[3]);
      dst[1] = make_uint4(pw[4], pw[5], pw[6], pw[7]);
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < kIgRows / 16; ++s) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ldmatrix_x4(a[mt], &sdy[(16 * mt + (lane & 15)) * dpitch + (n0 - n_begin) + 16 * s + (lane >> 4) * 8]);
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
  };

  uint32_t ra[kIgGroups][W], rb[kIgGroups][W];
  if (n_begin < n_end) load(ra, n_begin);
#pragma unroll 1
  for (int n0 = n_begin; n0 < n_end; n0 += 2 * kIgRows) {
    if (n0 + kIgRows < n_end) load(rb, n0 + kIgRows);
    stage(ra, n0);
    if (n0 + kIgRows >= n_end) break;
    if (n0 + 2 * kIgRows < n_end) load(ra, n0 + 2 * kIgRows);
    stage(rb, n0 + kIgRows);
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

// out[i] = sum over splits s (in order) of part[s * count + i]. Launched with programmatic dependent
// launch: it starts while the kernel that writes part ends.
template <class ACT>
__global__ void reduce_splits_kernel(const float* __restrict__ part, int splits, int64_t count, ACT* __restrict__ out) {
  pdl_launch_dependents();
  pdl_wait();  // part is the previous kernel's output
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < count; i += (int64_t)gridDim.x * blockDim.x) {
    float s = 0.0f;
    for (int j = 0; j < splits; ++j) s += part[j * count + i];
    out[i] = f_to_act<ACT>(s);
  }
}

template <class ACT>
void launch_reduce(const float* part, int splits, int64_t count, void* out, cudaStream_t stream) {
  const int64_t blocks = std::min<int64_t>((count + 255) / 256, 4 * (int64_t)sm_count());
  launch_pdl(reduce_splits_kernel<ACT>, dim3((unsigned)blocks), dim3(256), 0, stream, part, splits, count,
             static_cast<ACT*>(out));
}

// Units of the reduction per split: enough CTAs for one full wave (ctas_per_sm resident on
// every multiprocessor), at most max_per units (the shared-memory slice of X or dY holds that many).
inline int units_per_split(int tiles, int units, int max_per, int ctas_per_sm) {
  const int64_t per = cuda_policy::per_split_rounded_up(tiles, units, (int64_t)ctas_per_sm * sm_count());
  return std::max({1, (int)std::min<int64_t>(per, max_per), (units + 65534) / 65535});  // (gridDim.y's limit)
}

template <int T, class ACT, int MT>
void small_forward_typed(const void* x, const uint8_t* w, void* y, int m, int n, int k, int64_t row_bytes,
                         cudaStream_t stream) {
  constexpr int kMaxPer = 16 / MT;  // X slice <= 16*MT x 1024/MT: 33 KB
  constexpr auto kernel = small_forward_kernel<T, ACT, MT>;
  const size_t smem_max = (size_t)16 * MT * (kMaxPer * kChunk + 8) * sizeof(uint16_t);  // every launch's at most
  const int ctas = std::max(kernel_ctas<kernel>(smem_max, 128), 1);
  const int tiles = (n + kFwdRows - 1) / kFwdRows, nchunks = (k + kChunk - 1) / kChunk;
  const int per = units_per_split(tiles, nchunks, kMaxPer, ctas);
  const int splits = (nchunks + per - 1) / per;
  const size_t smem = (size_t)16 * MT * (per * kChunk + 8) * sizeof(uint16_t);
  ScratchBuffer part(splits > 1 ? (size_t)splits * m * n * sizeof(float) : 0, stream);
  kernel<<<dim3((unsigned)tiles, (unsigned)splits), 128, smem, stream>>>(
      static_cast<const uint16_t*>(x), w, static_cast<ACT*>(y), part.as<float>(), m, n, k, row_bytes, per);
  LT_CUDA_CHECK_LAUNCH();
  if (splits > 1) launch_reduce<ACT>(part.as<float>(), splits, (int64_t)m * n, y, stream);
}

template <int T, class ACT, int MT>
void small_input_grad_typed(const void* dy, const uint8_t* w, void* dx, int m, int n, int k, int64_t row_bytes,
                            cudaStream_t stream) {
  constexpr int kMaxPer = 16 / MT;  // dY slice <= 16*MT x 1024/MT: 33 KB (plus 17 KB of W tile)
  constexpr auto kernel = small_input_grad_kernel<T, ACT, MT>;
  const size_t smem_max = (size_t)16 * MT * (kMaxPer * kIgRows + 8) * sizeof(uint16_t);  // every launch's at most
  const int ctas = std::max(kernel_ctas<kernel>(smem_max, 128), 1);
  const int tiles = (k + kIgCols - 1) / kIgCols, stages = (n + kIgRows - 1) / kIgRows;
  const int per = units_per_split(tiles, stages, kMaxPer, ctas);
  const int splits = (stages + per - 1) / per, rows_per_split = per * kIgRows;
  const size_t smem = (size_t)16 * MT * (rows_per_split + 8) * sizeof(uint16_t);
  ScratchBuffer part(splits > 1 ? (size_t)splits * m * k * sizeof(float) : 0, stream);
  kernel<<<dim3((unsigned)tiles, (unsigned)splits), 128, smem, stream>>>(
      static_cast<const uint16_t*>(dy), w, static_cast<ACT*>(dx), part.as<float>(), m, n, k, row_bytes,
      rows_per_split);
  LT_CUDA_CHECK_LAUNCH();
  if (splits > 1) launch_reduce<ACT>(part.as<float>(), splits, (int64_t)m * k, dx, stream);
}

template <int T>
void launch_small_forward(const void* x, int dtype, const uint8_t* w, void* y, int m, int n, int k,
                          int64_t row_bytes, cudaStream_t stream) {
  if (m > kSmallMaxM) throw std::invalid_argument("the small-M kernels take M <= 32");
  const bool one = m <= 16;
  if (dtype == D_BF16) {
    if (one) small_forward_typed<T, __nv_bfloat16, 1>(x, w, y, m, n, k, row_bytes, stream);
    else small_forward_typed<T, __nv_bfloat16, 2>(x, w, y, m, n, k, row_bytes, stream);
  } else if (dtype == D_F16) {
    if (one) small_forward_typed<T, __half, 1>(x, w, y, m, n, k, row_bytes, stream);
    else small_forward_typed<T, __half, 2>(x, w, y, m, n, k, row_bytes, stream);
  } else {
    throw std::invalid_argument("the small-M kernels take bf16 or fp16 activations");
  }
}

template <int T>
void launch_small_input_grad(const void* dy, int dtype, const uint8_t* w, void* dx, int m, int n, int k,
                             int64_t row_bytes, cudaStream_t stream) {
  if (m > kSmallMaxGradM) throw std::invalid_argument("the small-M input-gradient kernel takes M <= 16");
  if (dtype == D_BF16) small_input_grad_typed<T, __nv_bfloat16, 1>(dy, w, dx, m, n, k, row_bytes, stream);
  else if (dtype == D_F16) small_input_grad_typed<T, __half, 1>(dy, w, dx, m, n, k, row_bytes, stream);
  else throw std::invalid_argument("the small-M kernels take bf16 or fp16 activations");
}

}  // namespace lowtune::cuda
