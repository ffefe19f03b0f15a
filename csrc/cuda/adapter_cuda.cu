// CUDA twin of the adapter kernels (csrc/adapter_kernels.h).
//
// One tiled kernel computes every adapter product: C[i, j] = sum_k a(i, k) b(j, k) over 64x64
// output tiles and 32-wide k steps. Each step gathers both operand tiles into shared memory,
// pooling on the fly (a pooled input is never written out, except as the saved copy for the
// backward pass, which the first column of tiles writes while it loads it). The 16-bit paths
// multiply on tensor cores (WMMA 16x16x16, fp32 accumulation); fp32 activations multiply in
// fp32. The epilogue scales, repeat-interleaves and accumulates straight into y or dx.
// Products whose output is a small fp32 matrix (u, du, dA, dB) but whose reduction is long
// split the reduction over several CTAs that add into the zeroed output with atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <initializer_list>
#include <string>
#include <type_traits>

#include "../adapter_kernels.h"
#include "../cuda_policy.h"  // pool_vectors, dual_stages
#include "../fp16.h"
#include "common.cuh"
#include "cp_async.cuh"  // the dual products' tiles
#include "internal.h"  // sm_count
#include "mma.cuh"      // the dual products' fragments

namespace lowtune::cuda {
namespace {

constexpr int BM = 64, BN = 64, BK = 32, THREADS = 128;
constexpr int LDS16 = BK + 8;  // 16-bit tile row stride: a multiple of 8 elements, as WMMA needs
constexpr int LDS32 = BK + 1;  // fp32 tile row stride: odd, so column reads do not conflict
constexpr int LDC = BN + 4;    // fp32 C tile row stride: a multiple of 4, as WMMA needs

__device__ __forceinline__ float ld_act(const void* p, int dt, int64_t i) {
  if (dt == D_F32) return static_cast<const float*>(p)[i];
  const uint16_t v = static_cast<const uint16_t*>(p)[i];
  return dt == D_F16 ? fp16_to_fp32(v) : bf16_to_fp32(v);
}
__device__ __forceinline__ void st_act(void* p, int dt, int64_t i, float v) {
  if (dt == D_F32) static_cast<float*>(p)[i] = v;
  else static_cast<uint16_t*>(p)[i] = dt == D_F16 ? fp32_to_fp16(v) : fp32_to_bf16(v);
}

__device__ __forceinline__ float op_at(const Operand& o, int64_t i, int64_t k) {
  const int64_t base = o.k_contig ? i * o.ld + k * o.pool : k * o.ld + i * o.pool;
  float s = 0.0f;
  for (int64_t t = 0; t < o.pool; ++t) s += ld_act(o.p, o.dtype, base + t);
  return s * o.ps;
}

template <class CT> __device__ __forceinline__ CT to_ct(float v);
template <> __device__ __forceinline__ float to_ct<float>(float v) { return v; }
template <> __device__ __forceinline__ __half to_ct<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 to_ct<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
__device__ __forceinline__ float from_ct(float v) { return v; }
__device__ __forceinline__ float from_ct(__half v) { return __half2float(v); }
__device__ __forceinline__ float from_ct(__nv_bfloat16 v) { return __bfloat162float(v); }

// 16 bytes of a source as floats: 8 fp16/bf16 values or 4 fp32 values.
__device__ __forceinline__ void load16(const uint16_t* p, int dt, float* f) {
  const uint4 q = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {q.x, q.y, q.z, q.w};
  for (int t = 0; t < 4; ++t) {
    const uint16_t lo = (uint16_t)(w[t] & 0xFFFFu), hi = (uint16_t)(w[t] >> 16);
    f[2 * t] = dt == D_F16 ? fp16_to_fp32(lo) : bf16_to_fp32(lo);
    f[2 * t + 1] = dt == D_F16 ? fp16_to_fp32(hi) : bf16_to_fp32(hi);
  }
}
__device__ __forceinline__ void load16(const float* p, int, float* f) {
  const float4 q = *reinterpret_cast<const float4*>(p);
  f[0] = q.x; f[1] = q.y; f[2] = q.z; f[3] = q.w;
}

// Whether an operand can be read in 16-byte vectors: aligned rows, and a pooling width that
// either fits whole into one vector or spans whole vectors.
__device__ __forceinline__ bool vector_ok(const Operand& o) {
  const int64_t v = o.dtype == D_F32 ? 4 : 8;
  return reinterpret_cast<uintptr_t>(o.p) % 16 == 0 && o.ld % v == 0 &&
         (o.pool % v == 0 || v % o.pool == 0);
}

// The vector path of load_tile for a tile that lies wholly inside the operand. A task reads
// nvec consecutive vectors along the source's contiguous axis and yields npv pooled values
// (npv = V/pool when a vector holds several pools, else 1 from pool/V vectors).
template <class CT, int LDS, bool KC, class Src>
__device__ __forceinline__ void load_tile_vec(CT* s, const Operand& o, int64_t i0, int64_t k0,
                                              void* save, int64_t save_ld) {
  constexpr int V = 16 / sizeof(Src);
  constexpr int INNER = KC ? BK : 64, OUTER = KC ? 64 : BK;  // contiguous / other extent
  const int pool = (int)o.pool;
  const int npv = pool >= V ? 1 : V / pool, nvec = pool >= V ? pool / V : 1;
  const int per_line = INNER / npv;
  const Src* src = static_cast<const Src*>(o.p);
  for (int task = threadIdx.x; task < OUTER * per_line; task += THREADS) {
    const int outer = task / per_line, inner0 = (task % per_line) * npv;
    const int64_t base = KC ? (i0 + outer) * o.ld + (k0 + inner0) * pool
                            : (k0 + outer) * o.ld + (i0 + inner0) * pool;
    float f[V];
    if (nvec == 1) {  // pool divides V (both powers of two): pairwise sums, f[u] = pool u
      load16(src + base, o.dtype, f);
#pragma unroll
      for (int w = 2; w <= V; w *= 2)
        if (pool >= w) {
#pragma unroll
          for (int t = 0; t < V / w; ++t) f[t] = f[2 * t] + f[2 * t + 1];
        }
    } else {
      float sum = 0.0f;
      for (int v = 0; v < nvec; ++v) {
        float g[V];
        load16(src + base + (int64_t)v * V, o.dtype, g);
#pragma unroll
        for (int t = 0; t < V; ++t) sum += g[t];
      }
      f[0] = sum;
    }
#pragma unroll
    for (int u = 0; u < V; ++u) {
      if (u >= npv) break;
      const CT c = to_ct<CT>(f[u] * o.ps);
      const int ii = KC ? outer : inner0 + u, kk = KC ? inner0 + u : outer;
      s[ii * LDS + kk] = c;
      if (save) st_act(save, o.dtype, (i0 + ii) * save_ld + k0 + kk, from_ct(c));
    }
  }
}

// Gathers the 64 x BK operand tile starting at (i0, k0) into s (row stride LDS), zero-padded
// past the edges (rows >= I, k >= Kc). Consecutive threads walk the source's contiguous axis,
// so loads coalesce; whole tiles of aligned operands load 16 bytes at a time.
template <class CT, int LDS>
__device__ __forceinline__ void load_tile(CT* s, const Operand& o, bool vec, int64_t i0, int64_t k0,
                                          int64_t I, int64_t Kc, void* save, int64_t save_ld) {
  constexpr int ROWS = 64;
  if (vec && i0 + ROWS <= I && k0 + BK <= Kc) {
    if (o.dtype == D_F32) {
      if (o.k_contig) load_tile_vec<CT, LDS, true, float>(s, o, i0, k0, save, save_ld);
      else load_tile_vec<CT, LDS, false, float>(s, o, i0, k0, save, save_ld);
    } else {
      if (o.k_contig) load_tile_vec<CT, LDS, true, uint16_t>(s, o, i0, k0, save, save_ld);
      else load_tile_vec<CT, LDS, false, uint16_t>(s, o, i0, k0, save, save_ld);
    }
    return;
  }
  for (int e = threadIdx.x; e < ROWS * BK; e += THREADS) {
    const int ii = o.k_contig ? e / BK : e % ROWS;
    const int kk = o.k_contig ? e % BK : e / ROWS;
    const int64_t i = i0 + ii, k = k0 + kk;
    const bool in = i < I && k < Kc;
    const CT c = to_ct<CT>(in ? op_at(o, i, k) : 0.0f);
    s[ii * LDS + kk] = c;
    if (save && in) st_act(save, o.dtype, i * save_ld + k, from_ct(c));
  }
}

template <class CT>
__global__ void __launch_bounds__(THREADS)
pooled_gemm_kernel(int64_t I, int64_t J, int64_t Kc, Operand a, Operand b, Epilogue ep,
                   void* save_a, int64_t tiles_per_split, bool atomic) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  constexpr bool kWmma = std::is_same_v<CT, __half>;  // bf16 WMMA needs sm_80
#else
  constexpr bool kWmma = !std::is_same_v<CT, float>;
#endif
  constexpr int LDS = kWmma ? LDS16 : LDS32;
  __shared__ __align__(32) CT As[BM * LDS];
  __shared__ __align__(32) CT Bs[BN * LDS];
  __shared__ __align__(32) float Cs[BM * LDC];

  const int64_t i0 = (int64_t)blockIdx.x * BM, j0 = (int64_t)blockIdx.y * BN;
  const int64_t k_tiles = (Kc + BK - 1) / BK;
  const int64_t kt0 = (int64_t)blockIdx.z * tiles_per_split;
  const int64_t kt1 = std::min(kt0 + tiles_per_split, k_tiles);
  void* save = (save_a != nullptr && blockIdx.y == 0) ? save_a : nullptr;
  const int tid = threadIdx.x;
  const bool a_vec = vector_ok(a), b_vec = vector_ok(b);

  if constexpr (kWmma) {
    using namespace nvcuda;
    const int warp = tid / 32, wm = warp / 2, wn = warp % 2;  // each warp: a 32x32 quarter
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
    for (int x = 0; x < 2; ++x)
      for (int y = 0; y < 2; ++y) wmma::fill_fragment(acc[x][y], 0.0f);
    for (int64_t kt = kt0; kt < kt1; ++kt) {
      __syncthreads();
      load_tile<CT, LDS>(As, a, a_vec, i0, kt * BK, I, Kc, save, Kc);
      load_tile<CT, LDS>(Bs, b, b_vec, j0, kt * BK, J, Kc, nullptr, 0);
      __syncthreads();
      for (int ks = 0; ks < BK / 16; ++ks) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, CT, wmma::row_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, CT, wmma::col_major> fb[2];
        for (int x = 0; x < 2; ++x)
          wmma::load_matrix_sync(fa[x], As + (wm * 32 + x * 16) * LDS + ks * 16, LDS);
        for (int y = 0; y < 2; ++y)
          wmma::load_matrix_sync(fb[y], Bs + (wn * 32 + y * 16) * LDS + ks * 16, LDS);
        for (int x = 0; x < 2; ++x)
          for (int y = 0; y < 2; ++y) wmma::mma_sync(acc[x][y], fa[x], fb[y], acc[x][y]);
      }
    }
    for (int x = 0; x < 2; ++x)
      for (int y = 0; y < 2; ++y)
        wmma::store_matrix_sync(Cs + (wm * 32 + x * 16) * LDC + wn * 32 + y * 16, acc[x][y], LDC,
                                wmma::mem_row_major);
  } else {
    // Thread (tr, tc) owns rows tr + 8*x and columns tc + 16*y of the tile.
    const int tr = tid / 16, tc = tid % 16;
    float acc[8][4];
    for (int x = 0; x < 8; ++x)
      for (int y = 0; y < 4; ++y) acc[x][y] = 0.0f;
    for (int64_t kt = kt0; kt < kt1; ++kt) {
      __syncthreads();
      load_tile<CT, LDS>(As, a, a_vec, i0, kt * BK, I, Kc, save, Kc);
      load_tile<CT, LDS>(Bs, b, b_vec, j0, kt * BK, J, Kc, nullptr, 0);
      __syncthreads();
      for (int kk = 0; kk < BK; ++kk) {
        float av[8], bv[4];
        for (int x = 0; x < 8; ++x) av[x] = from_ct(As[(tr + 8 * x) * LDS + kk]);
        for (int y = 0; y < 4; ++y) bv[y] = from_ct(Bs[(tc + 16 * y) * LDS + kk]);
        for (int x = 0; x < 8; ++x)
          for (int y = 0; y < 4; ++y) acc[x][y] = fmaf(av[x], bv[y], acc[x][y]);
      }
    }
    for (int x = 0; x < 8; ++x)
      for (int y = 0; y < 4; ++y) Cs[(tr + 8 * x) * LDC + tc + 16 * y] = acc[x][y];
  }
  __syncthreads();

  // Epilogue over output elements, consecutive threads on consecutive output columns.
  const int rep = (int)ep.repeat, row_elems = BN * rep;
  if (!atomic && ep.accumulate && ep.dtype != D_F32 && i0 + BM <= I && j0 + BN <= J &&
      ep.ld % 8 == 0 && reinterpret_cast<uintptr_t>(ep.p) % 16 == 0) {
    // Whole tile accumulating into 16-bit activations: 8 outputs (16 bytes) per access.
    uint16_t* out = static_cast<uint16_t*>(ep.p);
    for (int e = tid; e < BM * row_elems / 8; e += THREADS) {
      const int ii = e / (row_elems / 8), c0 = (e % (row_elems / 8)) * 8;
      uint16_t* p = out + (i0 + ii) * ep.ld + j0 * rep + c0;
      float f[8];
      load16(p, ep.dtype, f);
      uint16_t h[8];
      for (int t = 0; t < 8; ++t) {
        const float v = f[t] + ep.alpha * Cs[ii * LDC + (c0 + t) / rep];
        h[t] = ep.dtype == D_F16 ? fp32_to_fp16(v) : fp32_to_bf16(v);
      }
      uint4 q;
      q.x = h[0] | ((uint32_t)h[1] << 16); q.y = h[2] | ((uint32_t)h[3] << 16);
      q.z = h[4] | ((uint32_t)h[5] << 16); q.w = h[6] | ((uint32_t)h[7] << 16);
      *reinterpret_cast<uint4*>(p) = q;
    }
    return;
  }
  for (int e = tid; e < BM * row_elems; e += THREADS) {
    const int ii = e / row_elems, c = e % row_elems, jj = c / rep;
    const int64_t i = i0 + ii, j = j0 + jj;
    if (i >= I || j >= J) continue;
    const float v = ep.alpha * Cs[ii * LDC + jj];
    const int64_t idx = i * ep.ld + j * rep + c % rep;
    if (atomic) atomicAdd(static_cast<float*>(ep.p) + idx, v);
    else if (ep.accumulate) st_act(ep.p, ep.dtype, idx, ld_act(ep.p, ep.dtype, idx) + v);
    else st_act(ep.p, ep.dtype, idx, v);
  }
}

// out[i * ld + c] += alpha * src[i * src_ld + c / repeat] for c < J * repeat: one output
// element per thread (grid-stride), consecutive threads on consecutive outputs. Idx is int when
// the output is small enough, so the index arithmetic stays 32-bit.
template <class Idx>
__global__ void expand_add_kernel(Idx I, Idx J, const float* src, Idx src_ld, Epilogue ep) {
  const Idx rep = (Idx)ep.repeat, width = J * rep, total = I * width;
  for (Idx e = blockIdx.x * (Idx)blockDim.x + threadIdx.x; e < total; e += (Idx)gridDim.x * blockDim.x) {
    const Idx i = e / width, c = e % width;
    const int64_t idx = (int64_t)i * ep.ld + c;
    st_act(ep.p, ep.dtype, idx, ld_act(ep.p, ep.dtype, idx) + ep.alpha * src[(int64_t)i * src_ld + c / rep]);
  }
}

// How a product is cut: output tiles, and (for a long reduction into a small fp32 output) how
// many CTAs share each tile's reduction, adding into the zeroed output with atomics.
struct GemmPlan {
  int64_t tiles_i, tiles_j, splits, tiles_per_split;
  bool zero_first;  // the output must be zeroed before the launch
};

GemmPlan plan_gemm(int64_t I, int64_t J, int64_t Kc, const Epilogue& e, int sms) {
  GemmPlan p{(I + BM - 1) / BM, (J + BN - 1) / BN, 1, 1, false};
  const int64_t k_tiles = (Kc + BK - 1) / BK;
  const bool splittable = e.dtype == D_F32 && !e.accumulate && e.repeat == 1;
  if (splittable && k_tiles >= 8) {
    const int64_t want = (4LL * sms + p.tiles_i * p.tiles_j - 1) / (p.tiles_i * p.tiles_j);
    p.splits = std::max<int64_t>(1, std::min(want, k_tiles / 4));
  }
  p.tiles_per_split = std::max<int64_t>(1, (k_tiles + p.splits - 1) / p.splits);
  p.splits = std::max<int64_t>(1, (k_tiles + p.tiles_per_split - 1) / p.tiles_per_split);
  p.zero_first = splittable && (p.splits > 1 || Kc == 0);
  return p;
}

// ---- host side -------------------------------------------------------------------------------
struct CudaBackend {
  int dtype;
  cudaStream_t stream;
  int sms;

  void gemm(int64_t I, int64_t J, int64_t Kc, const Operand& a, const Operand& b, const Epilogue& e,
            void* save_a) {
    if (I == 0 || J == 0) return;
    const GemmPlan p = plan_gemm(I, J, Kc, e, sms);
    if (p.zero_first)
      LT_CUDA_CHECK(cudaMemset2DAsync(e.p, e.ld * sizeof(float), 0, J * sizeof(float), I, stream));
    if (Kc == 0) return;  // an empty reduction: zeros stored, nothing to accumulate
    const dim3 grid((unsigned)p.tiles_i, (unsigned)p.tiles_j, (unsigned)p.splits);
    const int64_t per = p.tiles_per_split;
    const bool atomic = p.splits > 1;
    switch (dtype) {
      case D_F32: pooled_gemm_kernel<float><<<grid, THREADS, 0, stream>>>(I, J, Kc, a, b, e, save_a, per, atomic); break;
      case D_F16: pooled_gemm_kernel<__half><<<grid, THREADS, 0, stream>>>(I, J, Kc, a, b, e, save_a, per, atomic); break;
      default: pooled_gemm_kernel<__nv_bfloat16><<<grid, THREADS, 0, stream>>>(I, J, Kc, a, b, e, save_a, per, atomic); break;
    }
    LT_CUDA_CHECK_LAUNCH();
  }

  void expand_add(int64_t I, int64_t J, const float* src, int64_t src_ld, const Epilogue& e) {
    const int64_t total = I * J * e.repeat;
    if (total == 0) return;
    const int64_t blocks = std::min<int64_t>((total + 255) / 256, 32LL * sms);
    if (total < (int64_t{1} << 31) && I * src_ld < (int64_t{1} << 31))
      expand_add_kernel<int><<<(unsigned)blocks, 256, 0, stream>>>((int)I, (int)J, src, (int)src_ld, e);
    else
      expand_add_kernel<int64_t><<<(unsigned)blocks, 256, 0, stream>>>(I, J, src, src_ld, e);
    LT_CUDA_CHECK_LAUNCH();
  }
};

// xs[i, j] = mean of x[i, j p .. j p + p - 1]: the pooled adapter input of the cuBLAS path, one
// pass over x (for [2048, 4096] bf16 on an H200: 7.4-7.6 us, where torch's mean over the short
// last axis took 54-60 us). The vector kernels load U 16-byte vectors of V elements a thread,
// kPoolThreads apart, before summing any (cuda_policy::pool_vectors: four by default): one vector a thread
// left too few bytes in flight to cover the H200's memory latency (6.0 us for 16.8 MB, 65% of its read
// bandwidth). Sums in fp32.
constexpr int kPoolThreads = 256;

// The sum of the V elements of a 16-byte vector
template <class T, int V>
__device__ __forceinline__ float vec_sum(const uint4& q) {
  const T* e = reinterpret_cast<const T*>(&q);
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < V; ++i) s += from_ct(e[i]);
  return s;
}

// This thread's U vectors (index of vector u: first + u kPoolThreads), loaded before any is used;
// those past the end stay zero.
template <int U>
__device__ __forceinline__ void load_pool_vecs(const void* x, int64_t first, int64_t vectors, uint4 (&q)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t v = first + u * kPoolThreads;
    q[u] = v < vectors ? reinterpret_cast<const uint4*>(x)[v] : make_uint4(0, 0, 0, 0);
  }
}

template <int U>
__device__ __forceinline__ int64_t pool_first_vec() {
  return blockIdx.x * (int64_t)(kPoolThreads * U) + threadIdx.x;
}

template <int Bytes> struct Word;  // an unsigned type of that size, to store several outputs at once
template <> struct Word<2> { using type = uint16_t; };
template <> struct Word<4> { using type = uint32_t; };
template <> struct Word<8> { using type = uint2; };

// P <= V: a vector holds V / P whole pools, stored as one word (P a template argument, so that
// the sums index registers, not local memory).
template <class T, int V, int P, int U>
__global__ void __launch_bounds__(kPoolThreads) pool_mean_vec_kernel(const T* __restrict__ x, T* __restrict__ xs,
                                                                     int64_t vectors, float inv) {
  const int64_t first = pool_first_vec<U>();
  uint4 q[U];
  load_pool_vecs(x, first, vectors, q);
  using W = typename Word<V / P * sizeof(T)>::type;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t v = first + u * kPoolThreads;
    if (v >= vectors) break;
    const T* e = reinterpret_cast<const T*>(&q[u]);
    T o[V / P];
#pragma unroll
    for (int j = 0; j < V / P; ++j) {
      float s = 0.0f;
#pragma unroll
      for (int t = 0; t < P; ++t) s += from_ct(e[j * P + t]);
      o[j] = to_ct<T>(s * inv);
    }
    reinterpret_cast<W*>(xs)[v] = *reinterpret_cast<const W*>(o);
  }
}

// p > V: a pool spans g = p / V lanes (g a power of two up to 32), summed by shuffles.
template <class T, int V, int U>
__global__ void __launch_bounds__(kPoolThreads) pool_mean_lanes_kernel(const T* __restrict__ x, T* __restrict__ xs,
                                                                       int64_t vectors, int g, float inv) {
  const int64_t first = pool_first_vec<U>();
  uint4 q[U];
  load_pool_vecs(x, first, vectors, q);  // no early return: every lane takes part in the shuffles
  float s[U];
#pragma unroll
  for (int u = 0; u < U; ++u) s[u] = vec_sum<T, V>(q[u]);
  // groups of g lanes never straddle rows or the end (vectors % g == 0, kPoolThreads % 32 == 0); the loop
  // over the offsets outside the one over u keeps s[u] in registers
  for (int o = g / 2; o > 0; o >>= 1) {
#pragma unroll
    for (int u = 0; u < U; ++u) s[u] += __shfl_xor_sync(0xffffffffu, s[u], o);
  }
  if ((threadIdx.x & (g - 1)) != 0) return;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t v = first + u * kPoolThreads;
    if (v < vectors) xs[v / g] = to_ct<T>(s[u] * inv);
  }
}

// Any p: one output per thread.
template <class T>
__global__ void pool_mean_kernel(const T* __restrict__ x, T* __restrict__ xs, int64_t outputs, int p, float inv) {
  const int64_t o = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (o >= outputs) return;
  float s = 0.0f;
  for (int t = 0; t < p; ++t) s += from_ct(x[o * p + t]);
  xs[o] = to_ct<T>(s * inv);
}

template <class T, int U>
void launch_pool_mean_vectors(const T* x, T* xs, int64_t m, int64_t k, int p, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T), N = kPoolThreads;
  const float inv = 1.0f / (float)p;
  const bool aligned = aligned16(x) && aligned16(xs) && k % V == 0;
  const int64_t vectors = m * k / V;
  const unsigned blocks = (unsigned)((vectors + N * U - 1) / (N * U));
  const int g = p / V;
  if (aligned && p == 2) pool_mean_vec_kernel<T, V, 2, U><<<blocks, N, 0, stream>>>(x, xs, vectors, inv);
  else if (aligned && p == 4) pool_mean_vec_kernel<T, V, 4, U><<<blocks, N, 0, stream>>>(x, xs, vectors, inv);
  else if (aligned && p == V) pool_mean_vec_kernel<T, V, V, U><<<blocks, N, 0, stream>>>(x, xs, vectors, inv);
  else if (aligned && p % V == 0 && g <= 32 && (g & (g - 1)) == 0)
    pool_mean_lanes_kernel<T, V, U><<<blocks, N, 0, stream>>>(x, xs, vectors, g, inv);
  else {
    const int64_t outputs = m * (k / p);
    pool_mean_kernel<T><<<(unsigned)((outputs + 255) / 256), 256, 0, stream>>>(x, xs, outputs, p, inv);
  }
  LT_CUDA_CHECK_LAUNCH();
}

template <class T>
void launch_pool_mean(const T* x, T* xs, int64_t m, int64_t k, int p, cudaStream_t stream) {
  if (cuda_policy::pool_vectors() == 4) launch_pool_mean_vectors<T, 4>(x, xs, m, k, p, stream);
  else launch_pool_mean_vectors<T, 1>(x, xs, m, k, p, stream);
}

// The rows of each split of m rows over a grid of strips × splits that fills ctas_per_sm CTAs a multiprocessor,
// a whole number of tiles of tile_rows (the dual products' and the rank update's CTAs walk their split's tiles).
int64_t split_rows(int64_t m, int tile_rows, int strips, int ctas_per_sm) {
  const int64_t want = std::max<int64_t>(1, (std::max(ctas_per_sm, 1) * sm_count() + strips - 1) / strips);
  const int64_t tiles = (m + tile_rows - 1) / tile_rows;
  return (tiles + std::min(want, tiles) - 1) / std::min(want, tiles) * tile_rows;
}

// g = s·dy·B [m, R] and dB = s·dyᵀ·u [n, R] from one read of dy [m, n] (B [n, R], u [m, R]; all 16-bit,
// row-major; g and dB fp32, zeroed by the caller): the rank-R adapter's two products of dy, which cuBLAS runs
// as two calls that each read dy. CTA (strip, split) takes dy's columns n0 .. n0 + kDualCols and its split's
// rows in tiles of kDualRows. Per tile, warps 0-7 take g's partial (m16 tile w % 4, half w / 4 of R), which goes
// out by fp32 atomics, and dB's (the strip's m16 tile w, all of R), which stays in registers until the split
// ends. Fragments by ldmatrix (mma.cuh's layouts); dyᵀ's and u's by its transposing form. Tiles come in by
// cp.async into STAGES buffers: with two, the next tile's copies are in flight during this tile's products.
constexpr int kDualCols = 128, kDualRows = 64, kDualThreads = 256, kDualPad = 8;

// p[0] += a, p[1] += b (p 8-byte aligned): one vector atomic on sm_90, where the atomics' count bounds the kernel
__device__ __forceinline__ void add_pair(float* p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}

template <class T, int R, int STAGES>
constexpr size_t dual_smem_bytes() {
  return sizeof(T) * (kDualCols * (R + kDualPad) + STAGES * kDualRows * (kDualCols + kDualPad + R + kDualPad));
}

template <class T, int R, int STAGES>
__global__ void __launch_bounds__(kDualThreads)
dual_products_kernel(const T* __restrict__ dy, const T* __restrict__ B, const T* __restrict__ u,
                     float* __restrict__ g, float* __restrict__ dB, int m, int n, int rows_per_split, float s) {
  static_assert(R % 16 == 0 && R <= 64, "R: a multiple of 16 up to 64");
  static_assert(STAGES == 1 || STAGES == 2, "one or two tile buffers");
  constexpr int LD = kDualCols + kDualPad, LR = R + kDualPad;  // padded rows: ldmatrix without bank conflicts
  extern __shared__ __align__(16) unsigned char dual_smem[];
  auto bs = reinterpret_cast<T(*)[LR]>(dual_smem);  // [kDualCols][LR]
  auto ds = reinterpret_cast<T(*)[kDualRows][LD]>(dual_smem + sizeof(T) * kDualCols * LR);  // [STAGES][..]
  auto us = reinterpret_cast<T(*)[kDualRows][LR]>(dual_smem + sizeof(T) * (kDualCols * LR + STAGES * kDualRows * LD));
  const int n0 = blockIdx.x * kDualCols;
  const int r0 = blockIdx.y * rows_per_split, r1 = min(m, r0 + rows_per_split);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gq = lane >> 2, cq = lane & 3;  // the fragments' row and column pair
  const int q = lane >> 3, l8 = lane & 7;   // ldmatrix: the lane's matrix and row in it
  constexpr int RV = R / 8;                 // 16-byte vectors a row of B or u
  auto load_tile = [&](int t0, int buf) {   // rows past the split's end zero-filled
    for (int i = threadIdx.x; i < kDualRows * (kDualCols / 8); i += kDualThreads) {
      const int row = i / (kDualCols / 8), v = i % (kDualCols / 8);
      const bool in = t0 + row < r1;
      cp_async16(smem_addr(&ds[buf][row][8 * v]), in ? dy + (int64_t)(t0 + row) * n + n0 + 8 * v : dy, in ? 16 : 0);
    }
    for (int i = threadIdx.x; i < kDualRows * RV; i += kDualThreads) {
      const int row = i / RV, v = i % RV;
      const bool in = t0 + row < r1;
      cp_async16(smem_addr(&us[buf][row][8 * v]), in ? u + (int64_t)(t0 + row) * R + 8 * v : u, in ? 16 : 0);
    }
  };
  for (int i = threadIdx.x; i < kDualCols * RV; i += kDualThreads) {
    const int row = i / RV, v = i % RV;
    cp_async16(smem_addr(&bs[row][8 * v]), B + (int64_t)(n0 + row) * R + 8 * v, 16);
  }
  load_tile(r0, 0);
  cp_async_commit();
  constexpr int GN = R / 16;  // g's n8 tiles a warp (half of R)
  constexpr int DN = R / 8;   // dB's n8 tiles a warp (all of R)
  float acc_db[DN][4] = {};
  const int gm = (warp & 3) * 16, gj = (warp >> 2) * (R / 2);  // the warp's g tile: rows gm.., columns gj..
  const int di = warp * 16;                                     // the warp's dB tile: strip columns di..
  int buf = 0;
  for (int t0 = r0; t0 < r1; t0 += kDualRows) {
    if constexpr (STAGES == 2) {
      if (t0 + kDualRows < r1) load_tile(t0 + kDualRows, buf ^ 1);
      cp_async_commit();  // (empty after the last tile: the wait below still counts one group behind)
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // this tile's copies (and B's) visible to every warp
    // g's partial: rows gm..gm+15 of the tile against the strip's B rows, columns gj .. gj + R/2
    float acc_g[GN][4] = {};
#pragma unroll
    for (int k0 = 0; k0 < kDualCols; k0 += 16) {
      uint32_t a[4];
      ldmatrix_x4(a, &ds[buf][gm + (lane & 15)][k0 + (lane >> 4) * 8]);
#pragma unroll
      for (int j = 0; j < GN; j += 2) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, &bs[k0 + (q & 1) * 8 + l8][gj + 8 * j + (q >> 1) * 8]);
        mma16816<T>(acc_g[j], a, b[0], b[1]);
        if (j + 1 < GN) mma16816<T>(acc_g[j + 1], a, b[2], b[3]);
      }
    }
#pragma unroll
    for (int j = 0; j < GN; ++j) {
      const int col = gj + 8 * j + 2 * cq, row = t0 + gm + gq;
      if (row < r1) add_pair(g + (int64_t)row * R + col, s * acc_g[j][0], s * acc_g[j][1]);
      if (row + 8 < r1) add_pair(g + (int64_t)(row + 8) * R + col, s * acc_g[j][2], s * acc_g[j][3]);
    }
    // dB's partial: the strip's columns di..di+15 (dyᵀ's rows) against the tile's rows of u
#pragma unroll
    for (int k0 = 0; k0 < kDualRows; k0 += 16) {
      uint32_t a[4];
      ldmatrix_x4_trans(a, &ds[buf][k0 + (q >> 1) * 8 + l8][di + (q & 1) * 8]);
#pragma unroll
      for (int j = 0; j < DN; j += 2) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, &us[buf][k0 + (q & 1) * 8 + l8][8 * j + (q >> 1) * 8]);
        mma16816<T>(acc_db[j], a, b[0], b[1]);
        mma16816<T>(acc_db[j + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with this buffer before it is refilled
    if constexpr (STAGES == 1) {
      if (t0 + kDualRows < r1) load_tile(t0 + kDualRows, 0);
      cp_async_commit();
    } else {
      buf ^= 1;
    }
  }
#pragma unroll
  for (int j = 0; j < DN; ++j) {
    const int col = 8 * j + 2 * cq, row = n0 + di + gq;
    add_pair(dB + (int64_t)row * R + col, s * acc_db[j][0], s * acc_db[j][1]);
    add_pair(dB + (int64_t)(row + 8) * R + col, s * acc_db[j][2], s * acc_db[j][3]);
  }
}

template <class T, int R, int STAGES>
void launch_dual_products_at(const T* dy, const T* B, const T* u, float* g, float* dB, int64_t m, int64_t n, float s,
                             cudaStream_t stream) {
  constexpr size_t smem = dual_smem_bytes<T, R, STAGES>();
  const int per_sm = kernel_ctas<dual_products_kernel<T, R, STAGES>>(smem, kDualThreads);  // (raises the limit)
  const int strips = (int)(n / kDualCols);
  const int64_t per = split_rows(m, kDualRows, strips, per_sm);
  const dim3 grid(strips, (unsigned)((m + per - 1) / per));
  dual_products_kernel<T, R, STAGES><<<grid, kDualThreads, smem, stream>>>(dy, B, u, g, dB, (int)m, (int)n, (int)per,
                                                                          s);
  LT_CUDA_CHECK_LAUNCH();
}

template <class T>
void launch_dual_products(const T* dy, const T* B, const T* u, float* g, float* dB, int64_t m, int64_t n, int r,
                          float s, cudaStream_t stream) {
  auto by_rank = [&]<int S>() {
    if (r == 16) launch_dual_products_at<T, 16, S>(dy, B, u, g, dB, m, n, s, stream);
    else if (r == 32) launch_dual_products_at<T, 32, S>(dy, B, u, g, dB, m, n, s, stream);
    else if (r == 48) launch_dual_products_at<T, 48, S>(dy, B, u, g, dB, m, n, s, stream);
    else launch_dual_products_at<T, 64, S>(dy, B, u, g, dB, m, n, s, stream);
  };
  if (cuda_policy::dual_stages() == 1) by_rank.template operator()<1>();
  else by_rank.template operator()<2>();
}

// out [m, c] += alpha·left·rightᵀ: the adapter's rank-R update of y or dx (left u or du [m, R]; right [c, R], or
// [R, c] when KMAJOR), which cuBLAS runs at about half the rate of its pass over out. A CTA owns a strip of 128
// columns and walks its split's rows in tiles of 64: right's strip goes to shared memory once; each tile's left
// rows come by cp.async into two buffers and its out rows into registers, both one tile ahead, so that the next
// tile's bytes are in flight during this tile's products and stores. Warp w takes rows 16 (w % 4) and columns
// 64 (w / 4) of a tile; each lane's n8 tiles are relabelled so that its accumulators over four tiles are 8
// consecutive columns of out, read and written as 16-byte vectors.
constexpr int kRankRows = 64, kRankCols = 128, kRankThreads = 256;

// The shared-memory row of right's row (out's column) a of a CTA's 128: group h = a / 32 of the warp's 64, lane
// column pair c, relabelled tile j and element e (a % 32 = 8c + 2j + e) -> 32h + 8j + 2c + e.
__device__ __forceinline__ int rank_srow(int a) {
  const int h = a >> 5, b = a & 31;
  return (h << 5) + (((b & 7) >> 1) << 3) + ((b >> 3) << 1) + (b & 1);
}

template <class T>
__device__ __forceinline__ uint4 rank_add(uint4 o, const float* acc, float alpha) {  // o + alpha·acc[0..7]
  T* v = reinterpret_cast<T*>(&o);
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = f_to_act<T>(act_to_f<T>(v[e]) + alpha * acc[e]);
  return o;
}

template <class T, int R, bool KMAJOR>
__global__ void __launch_bounds__(kRankThreads, 2)
rank_update_kernel(T* __restrict__ out, const T* __restrict__ left, const T* __restrict__ right, int m, int c,
                   int rows_per_split, float alpha) {
  static_assert(R % 16 == 0 && R <= 64, "R: 16, 32, 48 or 64");
  constexpr int LK = R + 8;  // padded rows: ldmatrix without bank conflicts
  __shared__ __align__(16) T ls[2][kRankRows][LK];
  __shared__ __align__(16) T rs[kRankCols][LK];
  const int col0 = blockIdx.x * kRankCols;
  const int r0 = blockIdx.y * rows_per_split, r1 = min(m, r0 + rows_per_split);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gq = lane >> 2, cq = lane & 3;
  const int wm = (warp & 3) * 16, wn = (warp >> 2) * 64;
  T* const ocol = out + col0 + wn + 8 * cq;  // + row · c + 32h: this lane's vectors
  auto load_out = [&](int t0, uint4 (&o)[2][2]) {  // [column group h][row g or g + 8]; rows past r1 not read
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int hi = 0; hi < 2; ++hi) {
        const int row = t0 + wm + gq + 8 * hi;
        o[h][hi] = row < r1 ? *reinterpret_cast<const uint4*>(ocol + (int64_t)row * c + 32 * h)
                            : make_uint4(0, 0, 0, 0);
      }
  };
  auto load_left = [&](int t0, int buf) {  // rows past r1 zero-filled
    for (int i = threadIdx.x; i < kRankRows * (R / 8); i += kRankThreads) {
      const int row = i / (R / 8), v = i % (R / 8);
      const bool in = t0 + row < r1;
      cp_async16(smem_addr(&ls[buf][row][8 * v]), in ? left + (int64_t)(t0 + row) * R + 8 * v : left, in ? 16 : 0);
    }
  };
  if (r0 >= r1) return;
  uint4 o[2][2], on[2][2];
  load_out(r0, o);
  load_left(r0, 0);
  cp_async_commit();
  if constexpr (!KMAJOR) {  // right [c, R]: its rows straight into their relabelled places
    for (int i = threadIdx.x; i < kRankCols * (R / 8); i += kRankThreads) {
      const int a = i / (R / 8), v = i % (R / 8);
      *reinterpret_cast<uint4*>(&rs[rank_srow(a)][8 * v]) =
          *reinterpret_cast<const uint4*>(right + (int64_t)(col0 + a) * R + 8 * v);
    }
  } else {  // right [R, c]: 8 columns of one rank row a vector, transposed element by element
    for (int i = threadIdx.x; i < R * (kRankCols / 8); i += kRankThreads) {
      const int k = i / (kRankCols / 8), v = i % (kRankCols / 8);
      const uint4 val = *reinterpret_cast<const uint4*>(right + (int64_t)k * c + col0 + 8 * v);
      const T* e = reinterpret_cast<const T*>(&val);
#pragma unroll
      for (int t = 0; t < 8; ++t) rs[rank_srow(8 * v + t)][k] = e[t];
    }
  }
  int buf = 0;
  for (int t0 = r0; t0 < r1; t0 += kRankRows) {
    const bool more = t0 + kRankRows < r1;
    if (more) {  // the next tile's bytes in flight during this one's products
      load_left(t0 + kRankRows, buf ^ 1);
      load_out(t0 + kRankRows, on);
    }
    cp_async_commit();  // (empty after the last tile: the wait below still counts one group behind)
    cp_async_wait<1>();
    __syncthreads();  // this tile's left rows (and right's strip) visible to every warp
    float acc[2][4][4] = {};
#pragma unroll
    for (int kk = 0; kk < R; kk += 16) {
      uint32_t a[4];
      ldmatrix_x4(a, &ls[buf][wm + (lane & 15)][kk + (lane >> 4) * 8]);
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int j = 0; j < 4; j += 2) {  // tiles j, j + 1: matrices (j, k lo), (j, k hi), (j+1, lo), (j+1, hi)
          uint32_t b[4];
          const int q = lane >> 3;
          ldmatrix_x4(b, &rs[wn + 32 * h + 8 * (j + (q >> 1)) + (lane & 7)][kk + (q & 1) * 8]);
          mma16816<T>(acc[h][j], a, b[0], b[1]);
          mma16816<T>(acc[h][j + 1], a, b[2], b[3]);
        }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int hi = 0; hi < 2; ++hi) {
        const int row = t0 + wm + gq + 8 * hi;
        float v[8];
#pragma unroll
        for (int j = 0; j < 4; ++j) v[2 * j] = acc[h][j][2 * hi], v[2 * j + 1] = acc[h][j][2 * hi + 1];
        if (row < r1) *reinterpret_cast<uint4*>(ocol + (int64_t)row * c + 32 * h) = rank_add<T>(o[h][hi], v, alpha);
        o[h][hi] = on[h][hi];
      }
    __syncthreads();  // every warp is done with this buffer before it is refilled
    buf ^= 1;
  }
}

template <class T>
void launch_rank_update(T* out, const T* left, const T* right, int64_t m, int64_t c, int r, bool kmajor, float alpha,
                        cudaStream_t stream) {
  const int strips = (int)(c / kRankCols);
  const int64_t per = split_rows(m, kRankRows, strips, 2);  // two CTAs a multiprocessor: its register bound
  const dim3 grid((unsigned)strips, (unsigned)((m + per - 1) / per));
  auto go = [&](auto kernel) {
    kernel<<<grid, kRankThreads, 0, stream>>>(out, left, right, (int)m, (int)c, (int)per, alpha);
  };
  auto by_rank = [&]<bool K>() {
    if (r == 16) go(rank_update_kernel<T, 16, K>);
    else if (r == 32) go(rank_update_kernel<T, 32, K>);
    else if (r == 48) go(rank_update_kernel<T, 48, K>);
    else go(rank_update_kernel<T, 64, K>);
  };
  if (kmajor) by_rank.template operator()<true>();
  else by_rank.template operator()<false>();
  LT_CUDA_CHECK_LAUNCH();
}

void check_dtype(int dtype) {
  if (dtype != D_F32 && dtype != D_F16 && dtype != D_BF16)
    throw std::invalid_argument("adapter: unknown activation dtype " + std::to_string(dtype));
}

}  // namespace

void adapter_forward(const AdapterGeom& g, const void* x, int dtype, const float* A, const float* B,
                     void* y, float* u, void* xs_out, void* stream) {
  check_geom(g);
  check_dtype(dtype);
  if (g.m == 0) return;
  CudaBackend be{dtype, static_cast<cudaStream_t>(stream), sm_count()};
  adapter_forward_passes(be, g, x, dtype, A, B, y, u, xs_out);
}

void adapter_backward(const AdapterGeom& g, const void* dy, int dtype, const void* xs,
                      int64_t xs_pool, const float* A, const float* B, const float* u, void* dx,
                      float* dA, float* dB, float* du, void* stream) {
  check_geom(g);
  check_dtype(dtype);
  if (xs_pool != 1 && xs_pool != g.pool) throw std::invalid_argument("adapter: xs_pool must be 1 or pool");
  CudaBackend be{dtype, static_cast<cudaStream_t>(stream), sm_count()};
  adapter_backward_passes(be, g, dy, dtype, xs, xs_pool, A, B, u, dx, dA, dB, du);
}

void adapter_pool(const void* x, int dtype, void* xs, int64_t m, int64_t k, int64_t pool, void* stream) {
  check_dtype(dtype);
  if (pool < 1 || k % pool) throw std::invalid_argument("adapter_pool: the pool must divide K");
  if (m == 0 || k == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    launch_pool_mean(static_cast<const T*>(x), static_cast<T*>(xs), m, k, (int)pool, s);
  };
  if (dtype == D_F32) launch(float{});
  else if (dtype == D_F16) launch(__half{});
  else launch(__nv_bfloat16{});
}

namespace {
// The dual products' and the rank update's common arguments: fp16 or bf16, the rank 16, 32, 48 or 64, cols (N, or
// out's columns) a multiple of 128, both sizes in 32 bits, every operand 16-byte aligned.
void check_skinny(const char* name, int dtype, int64_t m, int64_t cols, int64_t r, const char* cols_name,
                  std::initializer_list<const void*> operands, const char* operand_names) {
  const std::string who = std::string(name) + ": ";
  if (dtype != D_F16 && dtype != D_BF16) throw std::invalid_argument(who + "fp16 or bf16 only");
  if (r % 16 || r < 16 || r > 64 || cols % 128)
    throw std::invalid_argument(who + "the rank must be 16, 32, 48 or 64 and " + cols_name + " a multiple of 128");
  if (m >= (int64_t{1} << 31) || cols >= (int64_t{1} << 31))
    throw std::invalid_argument(who + "M and " + cols_name + " must fit in 32 bits");
  for (const void* p : operands)
    if (!aligned16(p)) throw std::invalid_argument(who + operand_names + " must be 16-byte aligned");
}

// f(T{}) for the 16-bit activation type of dtype (fp16 or bf16).
template <class F>
void with_half_type(int dtype, F f) {
  if (dtype == D_F16) f(__half{});
  else f(__nv_bfloat16{});
}
}  // namespace

void adapter_dual_products(const void* dy, int dtype, const void* B, const void* u, float* g, float* dB, int64_t m,
                           int64_t n, int64_t r, float scale, void* stream) {
  static_assert(kDualCols == 128, "check_skinny's multiple");
  check_skinny("adapter_dual_products", dtype, m, n, r, "N", {dy, B, u}, "dy, B and u");
  if (m == 0) return;
  with_half_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_dual_products(static_cast<const T*>(dy), static_cast<const T*>(B), static_cast<const T*>(u), g, dB, m, n,
                         (int)r, scale, static_cast<cudaStream_t>(stream));
  });
}

void adapter_rank_update(void* out, int dtype, const void* left, const void* right, int64_t m, int64_t c, int64_t r,
                         bool right_kmajor, float alpha, void* stream) {
  static_assert(kRankCols == 128, "check_skinny's multiple");
  check_skinny("adapter_rank_update", dtype, m, c, r, "the columns", {out, left, right}, "out, left and right");
  if (m == 0 || c == 0) return;
  with_half_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_rank_update(static_cast<T*>(out), static_cast<const T*>(left), static_cast<const T*>(right), m, c, (int)r,
                       right_kmajor, alpha, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace lowtune::cuda
