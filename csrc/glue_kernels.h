// A decoder layer's elementwise glue for inference on CUDA: one kernel each where torch runs a
// chain of them (RMSNorm with its fp32 casts, RoPE's multiplies and pair swap, SwiGLU's product).
// At one token per step these chains are ~30 kernel launches per layer, a third of a decode step
// (BENCHMARKS.md, "Where a CUDA decode step's time goes"). lowtune.glue_ops holds the torch
// formulas these kernels are tested against (tests/test_glue_cuda.py) and picks between them.
//
// Activations x, y, g, u are D_F32, D_F16 or D_BF16, all of one dtype; arithmetic is fp32.
//   rms_norm: y[r, :] = x[r, :] * rsqrt(mean(x[r, :]²) + eps) * w   (rows x dim, contiguous); with
//             a residual r (rows x dim), x + r rounded to the dtype is written to s and normalized
//             (a layer's residual add and the next norm: one kernel). rms_norm_vectorized says
//             whether the one-read vector kernel takes a call (which a residual needs).
//   rope:     y = x with its first d dims of every head rotated by the tables rot [2, T, d]
//             (C, S; fp32, contiguous), y[i] = x[i]·C[t, i] + x[swap(i)]·S[t, i], swap pairing
//             2j <-> 2j+1 (neox = false) or j <-> j ± d/2 (neox = true); each product and the sum
//             rounded on its own, as torch computes the formula. x and y [B, H, T, hd] share the
//             strides sb, sh, st (elements; the last dim is contiguous).
//   silu_mul: y = silu(g) * u, silu rounded to the dtype first (torch's two operations).
//   rope_store: a step's q, k, v [B, H|Hkv, T, hd] (strided views of the q/k/v product, last dim
//             contiguous) -> q rotated into q_out [B, H, T, hd] (contiguous), k rotated and v
//             copied into the KV caches [B, Hkv, L, hd] at positions *pos .. *pos + T (pos is read
//             on the device, so one captured graph serves every position; positions >= L are
//             skipped, the caller checks the length). Rotation as rope's. Replaces two rope
//             launches and two cache writes per layer.
//   decode_attention: one query token against a KV cache (batch 1): out[h] = softmax(q[h]·K[g]ᵀ
//             · scale over positions 0..*pos) · V[g], g = h / (H / Hkv); q, out [H, hd], caches
//             [Hkv, L, hd], all contiguous, fp16/bf16, fp32 arithmetic. pos is read on the device
//             (one captured graph serves every position) and only the filled positions are read,
//             split over up to 32 CTAs per head whose partial softmaxes a second kernel merges
//             (flash-decoding). decode_attention_fits says whether the kernels take a shape
//             (head_dim 64, 128 or 256; a split's scores fit shared memory).
#pragma once
#include <cstdint>

namespace lowtune::cuda {
struct RopeStoreGeom {
  int64_t b, t, h, hkv, hd, d, cache_len;
  int64_t q_strides[3], k_strides[3], v_strides[3];  // (b, head, t) strides in elements
  bool neox;
};
void rope_store(const RopeStoreGeom& g, const void* q, const void* k, const void* v, int dtype, const float* rot,
                void* q_out, void* k_cache, void* v_cache, const int64_t* pos, void* stream);
void rms_norm(const void* x, int dtype, const float* w, void* y, int64_t rows, int64_t dim, float eps,
              void* stream, const void* r = nullptr, void* s = nullptr);
bool rms_norm_vectorized(int dtype, int64_t dim, const void* x, const void* r, const void* y, const void* s);
void rope(const void* x, int dtype, const float* rot, void* y, int64_t b, int64_t h, int64_t t, int64_t hd,
          int64_t d, int64_t sb, int64_t sh, int64_t st, bool neox, void* stream);
void silu_mul(const void* g, const void* u, int dtype, void* y, int64_t n, void* stream);
bool decode_attention_fits(int dtype, int64_t h, int64_t hkv, int64_t hd, int64_t cache_len);
void decode_attention(const void* q, const void* k_cache, const void* v_cache, int dtype, void* out, const int64_t* pos,
                      int64_t h, int64_t hkv, int64_t hd, int64_t cache_len, float scale, void* stream);
}  // namespace lowtune::cuda
