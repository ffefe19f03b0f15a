// One decoding step of lowtune's decoder on the CPU in a single call (lowtune.generate's fast path
// for every family; RoPE's variants, LongRoPE's included, arrive as rotation tables).
//
// Decoding feeds one token at a time. Run module by module from Python, a step is ~50 torch
// calls per layer, whose dispatch costs more than the step's arithmetic on a small model; here
// the whole step is one call, with the same operations in the same order as lowtune.model:
//
//   x = embd[token] · embedding_scale
//   (norm: RMSNorm, or LayerNorm where layer_norm: Command-R's without a bias, Nemotron's with one)
//   per layer:  h = rmsnorm(x)·w_attn (x itself without w_attn: OLMo 2);  q, k, v = Wq h, Wk h, Wv h
//               (every product + its bias, if any)
//               q, k: rmsnorm(·)·w_qnorm, w_knorm where the layer has them, per head (Qwen3) or
//               over the whole projection (qk_norm_whole: OLMo 2); after RoPE where
//               qk_norm_after_rope (Hunyuan)
//               RoPE on q and k at `pos` by the layer's row of the tables (each head's first
//               rope_dim dims: adjacent pairs, or i with i + rope_dim/2 where neox), none in a
//               layer without RoPE (SmolLM3)
//               k, v -> the layer's cache at pos
//               o = softmax(cap(q·Kᵀ·attn_scale))·V per query head over positions 0..pos, or the
//                   last `window` of them (query head h reads key/value head h / (H/Hkv));
//                   cap(s) = c·tanh(s/c) where attn_softcap c > 0; where the layer has sinks, head
//                   h's softmax has one more logit, sinks[h], with no value (gpt-oss)
//               a = residual_scale·Wo o, then rmsnorm(a)·w_post_attn where the layer has it;  x += a
//               h = rmsnorm(x)·w_ffn (or x; where parallel, the attention's h and x before its
//               add: x += a + m at once);  m = residual_scale·Wd (act(Wg h) ⊙ Wu h), act silu,
//               gelu (tanh form) or swiglu_oai (Activation); without a gate Wd act(Wu h), act relu²
//               or xIELU with the layer's scalars; then its post-norm likewise;  x += m
//               (a mixture of experts: router logits r = W_router h (+ its bias), p = softmax(r),
//               the n_experts_used largest p (+ selection_bias, which picks but does not weigh:
//               ERNIE 4.5 MoE), renormalized to sum 1 (over at least 2^-14) where
//               moe_renorm — or, gating 3 (gpt-oss), the n_experts_used largest r and p their
//               softmax; m = Σ p_e ·
//               expert_e(h), expert e being rows e·F.. of Wg, Wu and e·dim.. of Wd (with rows
//               e·F.. and e·dim.. of the expert biases where the layer has them); plus a shared
//               expert's Wsd (silu(Wsg h) ⊙ Wsu h) where the layer has one, × sigmoid(w_sgate · h)
//               where it has that gate)
//   logits = cap(W_head (rmsnorm(x)·w_out) / logit_scale), c = final_softcap
//
// Batch 1, fp32 activations and caches; the matrices are quantized blocks of any type the
// qmatmul kernels take. The matrix-vector products are qmatmul's own M = 1 kernel, so they give
// the same bits as lowtune.ops.qmatmul; norms, RoPE and attention differ from torch's only in
// float32 summation order.
#pragma once
#include <cstdint>
#include <vector>

namespace lowtune::cpu {

// The gated MLP's act(g) · u: silu, gelu's tanh form (Gemma), or gpt-oss's swiglu_oai (g clamped
// above at 7, u to ±7: g · sigmoid(1.702 g) · (u + 1)); or, for an MLP without a gate (no ffn_gate
// matrix), act(u) = relu(u)² (Arcee, Nemotron), GELU's tanh form (StarCoder2, GPT-NeoX, Falcon) or
// xIELU (Apertus: with the layer's scalars alpha_p, alpha_n, beta, eps, a_p = softplus(alpha_p) and
// a_n = beta + softplus(alpha_n), a_p u² + beta u where u > 0, else (expm1(min(u, eps)) - u) a_n + beta u).
enum class Activation { kSilu = 0, kGeluTanh = 1, kSwigluOai = 2, kRelu2 = 3, kXielu = 4, kGeluTanhUngated = 5 };

// Whether the MLP of `a` has no gate (no ffn_gate matrix).
inline bool ungated(Activation a) {
  return a == Activation::kRelu2 || a == Activation::kXielu || a == Activation::kGeluTanhUngated;
}

struct DecodeMatrix {
  int qtype;
  const void* w;  // [n, k] blocks
  int64_t n, k;
};

struct DecodeLayer {
  DecodeMatrix q, k, v, o, gate, up, down;
  const float* attn_norm;  // [dim], or none (OLMo 2)
  const float* ffn_norm;   // [dim], or none
  float* k_cache;          // [n_kv_heads, max_len, head_dim]
  float* v_cache;
  // each matrix's bias (its rows), or none: q, k, v, o, gate, up, down
  const float* bias[7] = {};
  const float* q_norm = nullptr;  // [head_dim] ([n_heads·head_dim] if qk_norm_whole), or none
  const float* k_norm = nullptr;
  const float* post_attn_norm = nullptr;  // [dim], or none (Gemma 2/3)
  const float* post_ffn_norm = nullptr;
  // a mixture of experts: the router [n_experts, dim] fp32, gate and up then [n_experts·F, dim]
  // and down [n_experts·dim, F] (F = expert_ffn); none: the dense FFN
  const float* router = nullptr;
  DecodeMatrix shared_gate{}, shared_up{}, shared_down{};  // a shared expert [shared_ffn, dim] ..., or none
  const float* shared_gate_inp = nullptr;  // [dim]: its sigmoid gate, or none (ungated)
  const float* router_bias = nullptr;      // [n_experts], or none
  const float* expert_bias[3] = {};        // gate, up [n_experts·F], down [n_experts·dim], or none
  const float* sinks = nullptr;            // [n_heads]: each head's sink logit, or none
  const float* selection_bias = nullptr;   // [n_experts]: added to p to pick the experts, or none
  const float* attn_norm_bias = nullptr;   // [dim]: the LayerNorms' biases, or none (Nemotron has them)
  const float* ffn_norm_bias = nullptr;
  const float* xielu = nullptr;            // [4]: xIELU's alpha_p, alpha_n, beta, eps (Activation::kXielu)
  int rope_kind = 0;    // the layer's rotation tables (Decoder's rope); -1: no RoPE
  int64_t window = 0;   // attends to the last `window` positions (0: all)
};

struct DecodeConfig {
  int64_t dim, n_heads, n_kv_heads, head_dim, rope_dim, ffn_dim, vocab, max_len;
  float norm_eps;
  bool neox = false;            // RoPE rotates dims i and i + rope_dim/2 (else 2i and 2i + 1)
  float attn_scale = 0.0f;      // on q·k (0: 1/sqrt(head_dim))
  float embedding_scale = 1.0f;
  float residual_scale = 1.0f;
  float logit_scale = 1.0f;
  Activation activation = Activation::kSilu;  // of the gate
  float attn_softcap = 0.0f;    // 0: none
  float final_softcap = 0.0f;
  int rope_kinds = 1;           // rotation tables in Decoder's rope
  bool qk_norm_whole = false;   // q/k norms span all heads at once (OLMo 2), else each head
  bool qk_norm_after_rope = false;  // q/k norms after RoPE (Hunyuan), else before
  bool layer_norm = false;      // the norms are LayerNorm (Command-R, Nemotron), else RMSNorm
  bool parallel = false;        // the FFN reads the attention's normed input (Command-R), or its own norm of
  //                               the layer's input where the layer has an ffn_norm (GPT-NeoX, Falcon 40B)
  int64_t n_experts = 0, n_experts_used = 0, expert_ffn = 0, shared_ffn = 0;  // layers with a router
  bool moe_renorm = true;
  int expert_gating = 1;        // 1: softmax over every expert, then the top k; 3: the top k logits, then softmax
};

class Decoder {
 public:
  // rope: [kinds, max_len, rope_dim/2, 2] fp32 (cos, sin) of each position's rotation, per kind
  // (layers name theirs). Every pointer must stay valid for the decoder's life. Throws
  // std::invalid_argument on inconsistent shapes. output_norm_bias: the final LayerNorm's, or none.
  Decoder(const DecodeConfig& config, std::vector<DecodeLayer> layers, DecodeMatrix embedding,
          DecodeMatrix head, const float* output_norm, const float* rope, const float* output_norm_bias = nullptr);
  // Runs `token` at position `pos` (the caches hold positions 0..pos-1), writes its keys and
  // values at pos and the next-token logits [vocab] to `logits`.
  void step(int64_t token, int64_t pos, float* logits);

 private:
  DecodeConfig c_;
  std::vector<DecodeLayer> layers_;
  DecodeMatrix embedding_, head_;
  const float* output_norm_;
  const float* rope_;
  const float* output_norm_bias_;
  std::vector<float> x_, h_, q_, k_, v_, o_, gate_, up_, scores_, expert_out_, moe_sum_, probs_, parallel_out_,
      parallel_in_;
  std::vector<int64_t> order_;  // the experts by routing weight
  // out = Wd (act(Wg in + bg) ⊙ (Wu in + bu)) + bd, F = Wu's rows (biases: three pointers, or none);
  // an ungated activation (g unused): Wd act(Wu in + bu) + bd, xIELU with the scalars `xielu`
  void gated_mlp(const DecodeMatrix& g, const DecodeMatrix& u, const DecodeMatrix& d, const float* in, float* out,
                 const float* const* bias = nullptr, const float* xielu = nullptr);
  // the family's norm over dim (with the LayerNorm's bias b, or none)
  void norm(const float* x, const float* w, const float* b, float* out) const;
  void ffn(const DecodeLayer& l, const float* in, float* out);  // its output as added to x (in, out may alias)
  void experts(const DecodeLayer& l, const float* in, float* out);  // (in and out may be one buffer)
};

// out[r] = x · deq(W)[r] for rows r0..r1 of W [n, k] (qmatmul's M = 1 kernel).
void qmatvec_rows(int qtype, const float* x, const void* w, float* out, int64_t k, int64_t r0, int64_t r1);

}  // namespace lowtune::cpu
