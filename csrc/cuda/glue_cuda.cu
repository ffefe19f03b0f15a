// CUDA kernels of csrc/glue_kernels.h (forward only; the formulas they follow are there).
// Every kernel here opens with pdl_launch_dependents and pdl_wait and is launched by launch_pdl
// (pdl.cuh), so that in a decode step each one's launch overlaps the previous kernel's end. Before
// the wait a kernel touches only what the previous kernel does not write (the decode attention:
// *pos and an L2 prefetch of its rows; cuda_policy::pdl_early_loads).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>
#include <stdexcept>
#include <type_traits>

#include "../blocks.h"
#include "../cuda_policy.h"  // decode_attention_splits, decode_attention_merge_in_split
#include "../glue_kernels.h"
#include "common.cuh"
#include "cp_async.cuh"  // prefetch_l2
#include "internal.h"  // ScratchBuffer, kernel_ctas, launch_pdl
#include "pdl.cuh"
#include "glue_math.cuh"  // cta_sum, the norm and SwiGLU formulas
#include "mma.cuh"  // act_to_f, f_to_act

namespace lowtune::cuda {
namespace {

// One CTA per row: the sum of squares over the row, then the scaled row (the second pass reads
// the row again, from L1/L2).
template <class T>
__global__ void __launch_bounds__(kNormThreads) rms_norm_kernel(const T* __restrict__ x, const float* __restrict__ w,
                                                                T* __restrict__ y, int64_t dim, float eps) {
  pdl_launch_dependents();
  pdl_wait();  // the inputs are the previous kernel's outputs
  const T* xr = x + blockIdx.x * dim;
  T* yr = y + blockIdx.x * dim;
  float s = 0.0f;
  for (int64_t i = threadIdx.x; i < dim; i += kNormThreads) {
    const float v = act_to_f(xr[i]);
    s = fmaf(v, v, s);
  }
  const float rstd = rsqrtf(cta_sum(s) / (float)dim + eps);
  for (int64_t i = threadIdx.x; i < dim; i += kNormThreads)
    yr[i] = rms_scaled<T>(act_to_f(xr[i]), rstd, w[i]);
}

// Element e of one head's row x (position tt of t, tables rot [2, t, d]) after RoPE; dims past d
// are copied. The formula of glue_ops.rope: x·C + swap(x)·S, each product and the sum rounded.
template <class T>
__device__ __forceinline__ T rotated(const T* x, int64_t e, const float* rot, int64_t tt, int64_t t, int64_t d,
                                     bool neox) {
  if (e >= d) return x[e];
  const int64_t sw = neox ? (e < d / 2 ? e + d / 2 : e - d / 2) : (e ^ 1);
  const float c = rot[tt * d + e], s = rot[(t + tt) * d + e];
  return f_to_act<T>(__fadd_rn(__fmul_rn(act_to_f(x[e]), c), __fmul_rn(act_to_f(x[sw]), s)));
}

// Rows whose dim is a multiple of 16 bytes' worth of elements and at most kNormThreads * 4 of
// them: each thread keeps its (at most four) 16-byte pieces of the row in registers, so the row
// is read once, with vector loads. With r: s = x + r rounded to T (torch's residual add) is
// written out and normalized. Its sum of squares runs in rms_sq_part's order (glue_math.cuh), which
// the one-row product's fused norm (gemv.cuh) repeats: keep the two the same.
template <class T, int V>
__global__ void __launch_bounds__(kNormThreads) rms_norm_vec_kernel(const T* __restrict__ x, const T* __restrict__ r,
                                                                    const float* __restrict__ w, T* __restrict__ y,
                                                                    T* __restrict__ s, int64_t dim, float eps) {
  pdl_launch_dependents();
  pdl_wait();  // the inputs are the previous kernel's outputs
  constexpr int E = 16 / (int)sizeof(T);
  const int64_t off = (int64_t)blockIdx.x * dim;
  float v[V][E];
  float ss = 0.0f;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const int64_t e0 = ((int64_t)i * kNormThreads + threadIdx.x) * E;
    if (e0 >= dim) break;
    uint4 xv = *reinterpret_cast<const uint4*>(x + off + e0);
    const T* xe = reinterpret_cast<const T*>(&xv);
    if (r != nullptr) {
      const uint4 rv = *reinterpret_cast<const uint4*>(r + off + e0);
      const T* re = reinterpret_cast<const T*>(&rv);
      uint4 sv;
      T* se = reinterpret_cast<T*>(&sv);
#pragma unroll
      for (int e = 0; e < E; ++e) se[e] = residual_add(xe[e], re[e]);
      *reinterpret_cast<uint4*>(s + off + e0) = sv;
      xv = sv;
    }
#pragma unroll
    for (int e = 0; e < E; ++e) {
      v[i][e] = act_to_f(xe[e]);
      ss = fmaf(v[i][e], v[i][e], ss);
    }
  }
  const float rstd = rsqrtf(cta_sum(ss) / (float)dim + eps);
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const int64_t e0 = ((int64_t)i * kNormThreads + threadIdx.x) * E;
    if (e0 >= dim) break;
    uint4 yv;
    T* ye = reinterpret_cast<T*>(&yv);
#pragma unroll
    for (int e = 0; e < E; ++e) ye[e] = rms_scaled<T>(v[i][e], rstd, w[e0 + e]);
    *reinterpret_cast<uint4*>(y + off + e0) = yv;
  }
}

// One thread per element of y.
template <class T>
__global__ void rope_kernel(const T* __restrict__ x, const float* __restrict__ rot, T* __restrict__ y, int64_t total,
                            int64_t h, int64_t t, int64_t hd, int64_t d, int64_t sb, int64_t sh, int64_t st,
                            bool neox) {
  pdl_launch_dependents();
  pdl_wait();  // the inputs are the previous kernel's outputs
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t e = i % hd, row = i / hd;  // row = (b, h, t) in that order
  const int64_t tt = row % t, bh = row / t, hh = bh % h, bb = bh / h;
  const int64_t base = bb * sb + hh * sh + tt * st;
  y[base + e] = rotated(x + base, e, rot, tt, t, d, neox);
}

// One thread per element of q, k and v: row j < h is a query head, then hkv key heads, then hkv
// value heads (copied).
template <class T>
__global__ void rope_store_kernel(RopeStoreGeom g, const T* __restrict__ q, const T* __restrict__ k,
                                  const T* __restrict__ v, const float* __restrict__ rot, T* __restrict__ q_out,
                                  T* __restrict__ k_cache, T* __restrict__ v_cache, const int64_t* __restrict__ pos,
                                  int64_t total) {
  pdl_launch_dependents();
  pdl_wait();  // the inputs are the previous kernel's outputs
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t heads = g.h + 2 * g.hkv;
  const int64_t e = i % g.hd, r = i / g.hd;  // r = (b, t, head) in that order
  const int64_t j = r % heads, bt = r / heads, tt = bt % g.t, bb = bt / g.t;
  if (j < g.h) {
    const T* x = q + bb * g.q_strides[0] + j * g.q_strides[1] + tt * g.q_strides[2];
    q_out[((bb * g.h + j) * g.t + tt) * g.hd + e] = rotated(x, e, rot, tt, g.t, g.d, g.neox);
    return;
  }
  const int64_t p = *pos + tt;
  if (p < 0 || p >= g.cache_len) return;
  const bool is_k = j < g.h + g.hkv;
  const int64_t hh = is_k ? j - g.h : j - g.h - g.hkv;
  const int64_t dst = ((bb * g.hkv + hh) * g.cache_len + p) * g.hd + e;
  if (is_k)
    k_cache[dst] = rotated(k + bb * g.k_strides[0] + hh * g.k_strides[1] + tt * g.k_strides[2], e, rot, tt, g.t,
                           g.d, g.neox);
  else
    v_cache[dst] = v[bb * g.v_strides[0] + hh * g.v_strides[1] + tt * g.v_strides[2] + e];
}

template <class T>
__global__ void silu_mul_kernel(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ y, int64_t n) {
  pdl_launch_dependents();
  pdl_wait();  // the inputs are the previous kernel's outputs
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  y[i] = silu_mul_value(g[i], u[i]);
}

// Flash-decoding: CTA (head, split) takes its share of positions 0..*pos (n / splits, rounded up)
// and writes a partial result (the share's max score m, its sum of exp(score - m) l, and the
// values weighted by exp(score - m)); the last of a head's CTAs to finish (a counter per head,
// `done`, which it sets back to 0) merges the head's partials into out (combined_value). Without
// `done` (null), decode_attention_combine_kernel merges them instead.
// With `early` a CTA asks L2 for its share's key and value rows before its PDL wait: *pos was set
// before the step and the rows are this layer's cache, out of L2 since the last token, so their
// memory round trip overlaps the kernel before (which writes q and the newest row).
// Within a CTA: a thread per position for the scores (its key row in registers, q in shared
// memory), then a thread per (position, 16-byte piece of the value row), kRowsPer positions at a
// time and several passes' loads in flight, the passes' sums added in shared memory. fp32 throughout.
constexpr int kAttnThreads = 128;

// Element i of a head's attention output from its splits' partials hw [splits][m, l, HD sums]:
// each rescaled to the largest max, in split order. Read through L2 (other CTAs wrote them).
template <int HD>
__device__ __forceinline__ float combined_value(const float* hw, int splits, int i) {
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, __ldcg(hw + s * (HD + 2)));
  float l = 0.0f, o = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const float* w = hw + s * (HD + 2);
    const float ms = __ldcg(w);
    const float f = ms == -INFINITY ? 0.0f : expf(ms - m);
    l = fmaf(f, __ldcg(w + 1), l);
    o = fmaf(f, __ldcg(w + 2 + i), o);
  }
  return o / l;
}

template <class T, int HD>
__global__ void __launch_bounds__(kAttnThreads) decode_attention_split_kernel(
    const T* __restrict__ q, const T* __restrict__ k_cache, const T* __restrict__ v_cache, float* __restrict__ ws,
    const int64_t* __restrict__ pos, int64_t h, int64_t hkv, int64_t cache_len, float scale, bool early, int* done,
    T* __restrict__ result) {
  pdl_launch_dependents();
  constexpr int E = 16 / (int)sizeof(T);
  constexpr int kPieces = HD / E, kRowsPer = kAttnThreads / kPieces;  // row pieces; positions per pass
  extern __shared__ float attn_smem[];
  float* qs = attn_smem;                // HD
  float* part = qs + HD;                // kAttnThreads * E: each thread's partial sums
  float* p = part + kAttnThreads * E;   // the share's scores, then weights
  __shared__ float red_max[kAttnThreads / 32], red_sum[kAttnThreads / 32];
  const int head = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int64_t kvh = head / (h / hkv);
  const int64_t n = min(*pos + 1, cache_len), share = (n + splits - 1) / splits;
  const int64_t j0 = min(n, split * share), cnt = min(n, j0 + share) - j0;
  const T* kh = k_cache + (kvh * cache_len + j0) * HD;
  const T* vh = v_cache + (kvh * cache_len + j0) * HD;
  if (early) {  // the share's key and value rows into L2 (a prefetch returns nothing: safe for the newest row)
    const int64_t lines = (cnt * HD * (int64_t)sizeof(T) + 127) / 128;
    for (int64_t i = threadIdx.x; i < lines; i += kAttnThreads) {
      prefetch_l2(reinterpret_cast<const char*>(kh) + 128 * i);
      prefetch_l2(reinterpret_cast<const char*>(vh) + 128 * i);
    }
  }
  pdl_wait();  // q and the newest row are the previous kernel's outputs
  for (int i = threadIdx.x; i < HD; i += kAttnThreads) qs[i] = act_to_f(q[(int64_t)head * HD + i]) * scale;
  __syncthreads();
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < cnt; j += kAttnThreads) {
    const uint4* row = reinterpret_cast<const uint4*>(kh + j * HD);
    uint4 raw[kPieces];
#pragma unroll
    for (int c = 0; c < kPieces; ++c) raw[c] = row[c];  // the whole row in flight
    float s = 0.0f;
#pragma unroll
    for (int c = 0; c < kPieces; ++c) {
      const T* e = reinterpret_cast<const T*>(&raw[c]);
#pragma unroll
      for (int i = 0; i < E; ++i) s = fmaf(act_to_f(e[i]), qs[c * E + i], s);
    }
    p[j] = s;
    mx = fmaxf(mx, s);
  }
  mx = cta_reduce<kAttnThreads>(mx, red_max, Max{});
  float sum = 0.0f;
  for (int64_t j = threadIdx.x; j < cnt; j += kAttnThreads) {
    const float e = expf(p[j] - mx);
    p[j] = e;
    sum += e;
  }
  sum = cta_reduce<kAttnThreads>(sum, red_sum, Add{});  // its barrier: every weight p[j] is written
  const int piece = threadIdx.x % kPieces, r0 = threadIdx.x / kPieces;
  float acc[E] = {};
#pragma unroll 4
  for (int64_t j = r0; j < cnt; j += kRowsPer) {
    const uint4 raw = reinterpret_cast<const uint4*>(vh + j * HD)[piece];
    const T* e = reinterpret_cast<const T*>(&raw);
    const float w = p[j];
#pragma unroll
    for (int i = 0; i < E; ++i) acc[i] = fmaf(w, act_to_f(e[i]), acc[i]);
  }
#pragma unroll
  for (int i = 0; i < E; ++i) part[r0 * HD + piece * E + i] = acc[i];
  __syncthreads();
  float* out = ws + ((int64_t)head * splits + split) * (HD + 2);  // m, l, then HD weighted sums
  if (threadIdx.x == 0) {
    out[0] = mx;  // -inf for an empty share (then l = 0 and the sums are 0)
    out[1] = sum;
  }
  for (int i = threadIdx.x; i < HD; i += kAttnThreads) {
    float o = 0.0f;
#pragma unroll
    for (int r = 0; r < kRowsPer; ++r) o += part[r * HD + i];
    out[2 + i] = o;
  }
  if (done == nullptr) return;
  __shared__ bool last;
  __threadfence();  // this CTA's partial is visible to the CTA that merges
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(done + head, 1) == splits - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const float* hw = ws + (int64_t)head * splits * (HD + 2);
  for (int i = threadIdx.x; i < HD; i += kAttnThreads)
    result[(int64_t)head * HD + i] = f_to_act<T>(combined_value<HD>(hw, splits, i));
  if (threadIdx.x == 0) done[head] = 0;  // for the next call (and graph replay)
}

// A thread per output element of a head: the splits' partials rescaled to the largest max.
template <class T, int HD>
__global__ void __launch_bounds__(HD) decode_attention_combine_kernel(const float* __restrict__ ws, T* __restrict__ out,
                                                                      int splits) {
  pdl_launch_dependents();
  pdl_wait();  // the inputs are the previous kernel's outputs
  const float* hw = ws + (int64_t)blockIdx.x * splits * (HD + 2);
  out[(int64_t)blockIdx.x * HD + threadIdx.x] = f_to_act<T>(combined_value<HD>(hw, splits, threadIdx.x));
}

template <class F> void by_dtype(int dtype, F&& f) {
  if (dtype == D_F32) f(float{});
  else if (dtype == D_F16) f(__half{});
  else if (dtype == D_BF16) f(__nv_bfloat16{});
  else throw std::invalid_argument("glue kernels take float32, float16 or bfloat16 activations");
}
unsigned grid_for(int64_t n, int threads) { return (unsigned)((n + threads - 1) / threads); }

}  // namespace

bool rms_norm_vectorized(int dtype, int64_t dim, const void* x, const void* r, const void* y, const void* s) {
  const int64_t e = dtype == D_F32 ? 4 : 8;  // elements per 16 bytes
  return dim > 0 && dim % e == 0 && dim <= kNormThreads * e * 4 && aligned16(x) && aligned16(r) && aligned16(y) &&
         aligned16(s);  // (r and s may be null: no residual)
}

void rms_norm(const void* x, int dtype, const float* w, void* y, int64_t rows, int64_t dim, float eps, void* stream,
              const void* r, void* s) {
  if (rows == 0) return;
  if (dim <= 0) throw std::invalid_argument("rms_norm: dim must be positive");
  const bool vec = rms_norm_vectorized(dtype, dim, x, r, y, s);
  if (r != nullptr && !vec)
    throw std::invalid_argument("rms_norm with a residual needs 16-byte aligned rows of at most 1024 vectors");
  const auto st = static_cast<cudaStream_t>(stream);
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T *xt = static_cast<const T*>(x), *rt = static_cast<const T*>(r);
    T *yt = static_cast<T*>(y), *sv = static_cast<T*>(s);
    if (!vec) {
      launch_pdl(rms_norm_kernel<T>, dim3((unsigned)rows), dim3(kNormThreads), 0, st, xt, w, yt, dim, eps);
      return;
    }
    const int64_t per = (dim / (16 / (int64_t)sizeof(T)) + kNormThreads - 1) / kNormThreads;  // vectors per thread
    const auto kernel = per <= 1   ? rms_norm_vec_kernel<T, 1>
                        : per == 2 ? rms_norm_vec_kernel<T, 2>
                                   : rms_norm_vec_kernel<T, 4>;
    launch_pdl(kernel, dim3((unsigned)rows), dim3(kNormThreads), 0, st, xt, rt, w, yt, sv, dim, eps);
  });
  LT_CUDA_CHECK_LAUNCH();
}

void rope(const void* x, int dtype, const float* rot, void* y, int64_t b, int64_t h, int64_t t, int64_t hd,
          int64_t d, int64_t sb, int64_t sh, int64_t st, bool neox, void* stream) {
  const int64_t total = b * h * t * hd;
  if (total == 0) return;
  if (d <= 0 || d > hd || d % 2) throw std::invalid_argument("rope: the rotated dims must be even and at most head_dim");
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_pdl(rope_kernel<T>, dim3(grid_for(total, 256)), dim3(256), 0, static_cast<cudaStream_t>(stream),
               static_cast<const T*>(x), rot, static_cast<T*>(y), total, h, t, hd, d, sb, sh, st, neox);
  });
  LT_CUDA_CHECK_LAUNCH();
}

void rope_store(const RopeStoreGeom& g, const void* q, const void* k, const void* v, int dtype, const float* rot,
                void* q_out, void* k_cache, void* v_cache, const int64_t* pos, void* stream) {
  const int64_t total = g.b * g.t * (g.h + 2 * g.hkv) * g.hd;
  if (total == 0) return;
  if (g.d < 0 || g.d > g.hd || g.d % 2)
    throw std::invalid_argument("rope_store: the rotated dims must be even and at most head_dim");
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_pdl(rope_store_kernel<T>, dim3(grid_for(total, 256)), dim3(256), 0, static_cast<cudaStream_t>(stream), g,
               static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), rot,
               static_cast<T*>(q_out), static_cast<T*>(k_cache), static_cast<T*>(v_cache), pos, total);
  });
  LT_CUDA_CHECK_LAUNCH();
}

void silu_mul(const void* g, const void* u, int dtype, void* y, int64_t n, void* stream) {
  if (n == 0) return;
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_pdl(silu_mul_kernel<T>, dim3(grid_for(n, 256)), dim3(256), 0, static_cast<cudaStream_t>(stream),
               static_cast<const T*>(g), static_cast<const T*>(u), static_cast<T*>(y), n);
  });
  LT_CUDA_CHECK_LAUNCH();
}

using cuda_policy::decode_attention_splits;

// The per-head counters of the merge in the split kernel (zeroed once, set back to 0 by each
// merge), per device; null (the separate merge kernel) while a graph is being captured before they
// exist, for more heads than they hold, or where cuda_policy::decode_attention_merge_in_split says
// no. Calls on one device run in stream order, as the layer graphs and decode steps do.
constexpr int64_t kAttnCounters = 4096;
int* decode_attention_counters(int64_t heads, cudaStream_t stream) {
  static int* counters[kMaxDevices] = {};
  static std::mutex mu;
  if (heads > kAttnCounters || !cuda_policy::decode_attention_merge_in_split()) return nullptr;
  const int dev = current_device();
  std::lock_guard<std::mutex> lock(mu);
  if (!counters[dev]) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    LT_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    if (capture != cudaStreamCaptureStatusNone) return nullptr;
    int* c = nullptr;
    LT_CUDA_CHECK(cudaMalloc(&c, kAttnCounters * sizeof(int)));
    LT_CUDA_CHECK(cudaMemset(c, 0, kAttnCounters * sizeof(int)));
    counters[dev] = c;
  }
  return counters[dev];
}

size_t decode_attention_smem(int64_t hd, int64_t cache_len) {
  const int64_t splits = decode_attention_splits(cache_len), share = (cache_len + splits - 1) / splits;
  return (size_t)(hd + kAttnThreads * 8 + share) * sizeof(float);  // q, partial sums (8 per thread), scores
}

bool decode_attention_fits(int dtype, int64_t h, int64_t hkv, int64_t hd, int64_t cache_len) {
  return dtype != D_F32 && (hd == 64 || hd == 128 || hd == 256) && hkv > 0 && h % hkv == 0 && cache_len > 0 &&
         decode_attention_smem(hd, cache_len) <= (size_t)smem_optin_limit();
}

void decode_attention(const void* q, const void* k_cache, const void* v_cache, int dtype, void* out, const int64_t* pos,
                      int64_t h, int64_t hkv, int64_t hd, int64_t cache_len, float scale, void* stream) {
  if (!decode_attention_fits(dtype, h, hkv, hd, cache_len))
    throw std::invalid_argument("decode_attention: fp16/bf16, head_dim 64, 128 or 256, whole groups of heads, "
                                "and a cache whose scores fit shared memory");
  const auto st = static_cast<cudaStream_t>(stream);
  const int splits = (int)decode_attention_splits(cache_len);
  const size_t smem = decode_attention_smem(hd, cache_len);
  ScratchBuffer ws((size_t)(h * splits * (hd + 2)) * sizeof(float), st);
  int* done = decode_attention_counters(h, st);
  auto launch = [&](auto tag, auto hd_c) {
    using T = decltype(tag);
    constexpr int HD = decltype(hd_c)::value;
    constexpr auto kernel = decode_attention_split_kernel<T, HD>;
    kernel_ctas<kernel>(smem, kAttnThreads);  // raises the kernel's shared-memory limit where smem needs it
    launch_pdl(kernel, dim3((unsigned)h, (unsigned)splits), dim3(kAttnThreads), smem, st, static_cast<const T*>(q),
               static_cast<const T*>(k_cache), static_cast<const T*>(v_cache), ws.as<float>(), pos, h, hkv, cache_len,
               scale, cuda_policy::early_attention_rows(), done, static_cast<T*>(out));
    if (done == nullptr)
      launch_pdl(decode_attention_combine_kernel<T, HD>, dim3((unsigned)h), dim3(HD), 0, st,
                 static_cast<const float*>(ws.as<float>()), static_cast<T*>(out), splits);
  };
  auto by_hd = [&](auto tag) {
    if (hd == 64) launch(tag, std::integral_constant<int, 64>{});
    else if (hd == 128) launch(tag, std::integral_constant<int, 128>{});
    else launch(tag, std::integral_constant<int, 256>{});
  };
  if (dtype == D_F16) by_hd(__half{});
  else by_hd(__nv_bfloat16{});
  LT_CUDA_CHECK_LAUNCH();
}
}  // namespace lowtune::cuda
