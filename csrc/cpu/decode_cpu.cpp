// The CPU decoding step (csrc/decode_kernels.h). Each phase of a layer is one parallel pass:
// the rows of Wq, Wk and Wv together, the heads of attention, the rows of Wo, the rows of Wg
// and Wu together, the rows of Wd, and the rows of the LM head.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "../block_math.h"
#include "../decode_kernels.h"
#include "../kernels.h"
#include "dequant_block.h"
#include "parallel.h"
#include "simd.h"

namespace lowtune::cpu {
namespace {

// A matrix-vector product of one pass: out = deq(m) · x.
struct MatVec {
  const DecodeMatrix* m;
  const float* x;
  float* out;
};

// Rows of W per thread chunk at least (a multiple of the fused kernel's 4-row groups).
constexpr int64_t kRowGrain = 16;

void matvecs(std::initializer_list<MatVec> jobs) {
  int64_t total = 0;
  for (const MatVec& j : jobs) total += j.m->n;
  parallel_for(total, kRowGrain, [&](int64_t r0, int64_t r1) {
    int64_t base = 0;
    for (const MatVec& j : jobs) {
      const int64_t lo = std::max(r0, base), hi = std::min(r1, base + j.m->n);
      if (lo < hi) qmatvec_rows(j.m->qtype, j.x, j.m->w, j.out, j.m->k, lo - base, hi - base);
      base += j.m->n;
    }
  });
}

// out = x / sqrt(mean(x²) + eps) · w, as F.rms_norm.
void rms_norm(const float* x, const float* w, float eps, int64_t n, float* out) {
  using namespace simd;
  vf acc = zero();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc = fma(load(x + i), load(x + i), acc);
  float ss = sum(acc);
  for (; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.0f / std::sqrt(ss / (float)n + eps);
  for (i = 0; i < n; ++i) out[i] = x[i] * r * w[i];
}

// out = (x - mean(x)) / sqrt(var(x) + eps) · w (+ b, where given), as F.layer_norm.
void layer_norm(const float* x, const float* w, const float* b, float eps, int64_t n, float* out) {
  float mean = 0.0f;
  for (int64_t i = 0; i < n; ++i) mean += x[i];
  mean /= (float)n;
  float var = 0.0f;
  for (int64_t i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
  const float r = 1.0f / std::sqrt(var / (float)n + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - mean) * r * w[i] + (b ? b[i] : 0.0f);
}

// Rotates pair i of the first rope_dim dims of each of `heads` heads by (cos, sin) = cs[2i, 2i + 1]:
// dims 2i and 2i + 1, or i and i + rope_dim/2 (neox).
void rope(float* x, int64_t heads, int64_t head_dim, int64_t rope_dim, const float* cs, bool neox) {
  const int64_t half = rope_dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* p = x + h * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      const int64_t i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
      const float a = p[i0], b = p[i1], c = cs[2 * i], s = cs[2 * i + 1];
      p[i0] = a * c - b * s;
      p[i1] = a * s + b * c;
    }
  }
}

// q or k of `heads` heads RMS-normed in place: each head with weight w [head_dim] (Qwen3), or all
// of them as one vector with w [heads·head_dim] (whole: OLMo 2).
void qk_norm(float* x, int64_t heads, int64_t head_dim, const float* w, float eps, bool whole) {
  if (whole) return rms_norm(x, w, eps, heads * head_dim, x);
  for (int64_t h = 0; h < heads; ++h) rms_norm(x + h * head_dim, w, eps, head_dim, x + h * head_dim);
}

void add_bias(float* x, const float* b, int64_t n) {
  if (b)
    for (int64_t i = 0; i < n; ++i) x[i] += b[i];
}

float dot(const float* a, const float* b, int64_t n) {
  using namespace simd;
  vf acc = zero();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc = fma(load(a + i), load(b + i), acc);
  float s = sum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// out[d] = Σ_j p[j] · v[j * hd + d] / total over positions j < len.
void weighted_sum(const float* p, const float* v, int64_t len, int64_t hd, float inv_total, float* out) {
  using namespace simd;
  int64_t d = 0;
  for (; d + kLanes <= hd; d += kLanes) {
    vf acc = zero();
    for (int64_t j = 0; j < len; ++j) acc = fma(set1(p[j]), load(v + j * hd + d), acc);
    store(out + d, mul(acc, set1(inv_total)));
  }
  for (; d < hd; ++d) {
    float acc = 0.0f;
    for (int64_t j = 0; j < len; ++j) acc += p[j] * v[j * hd + d];
    out[d] = acc * inv_total;
  }
}

// scores[j] = e^(s[j] - max), in place; returns their sum.
float softmax_numerators(float* s, int64_t n) {
  using namespace simd;
  float mx = -INFINITY;
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
  vf acc = zero();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vf e = simd::exp(sub(load(s + j), set1(mx)));
    store(s + j, e);
    acc = add(acc, e);
  }
  float total = sum(acc);
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - mx);
    total += s[j];
  }
  return total;
}

// g = gelu(g) · u, gelu's tanh form (torch's approximate="tanh").
float gelu_tanh(float x) {
  constexpr float kC = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * x * (1.0f + std::tanh(kC * (x + 0.044715f * x * x * x)));
}

void gelu_mul(float* g, const float* u, int64_t n) {
  for (int64_t i = 0; i < n; ++i) g[i] = gelu_tanh(g[i]) * u[i];
}

void gelu(float* u, int64_t n) {
  for (int64_t i = 0; i < n; ++i) u[i] = gelu_tanh(u[i]);
}

float softcap(float s, float cap) { return cap > 0.0f ? cap * std::tanh(s / cap) : s; }

// torch's softplus: log(1 + e^x), x itself beyond 20.
float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }

// u = xielu(u) with the file's scalars s = (alpha_p, alpha_n, beta, eps) (decode_kernels.h), as
// lowtune.glue_ops.xielu.
void xielu(float* u, const float* s, int64_t n) {
  const float a_p = softplus(s[0]), beta = s[2], a_n = beta + softplus(s[1]), eps = s[3];
  for (int64_t i = 0; i < n; ++i) {
    const float x = u[i];
    u[i] = x > 0.0f ? a_p * x * x + beta * x : (std::expm1(std::min(x, eps)) - x) * a_n + beta * x;
  }
}

// g = swiglu_oai(g, u) (decode_kernels.h), as lowtune.glue_ops.
void swiglu_oai_mul(float* g, const float* u, int64_t n) {
  constexpr float kAlpha = 1.702f, kLimit = 7.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float x = std::min(g[i], kLimit), y = std::clamp(u[i], -kLimit, kLimit);
    g[i] = x / (1.0f + std::exp(-kAlpha * x)) * (y + 1.0f);
  }
}

// g = silu(g) · u = g / (1 + e^-g) · u.
void silu_mul(float* g, const float* u, int64_t n) {
  using namespace simd;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vf x = load(g + i);
    const vf s = div(x, add(set1(1.0f), simd::exp(sub(zero(), x))));
    store(g + i, mul(s, load(u + i)));
  }
  for (; i < n; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

// Rows r0..r1 of m as a matrix of their own (packed rows are independent).
DecodeMatrix row_range(const DecodeMatrix& m, int64_t r0, int64_t r1) {
  const BlockInfo b = block_info(m.qtype);
  return {m.qtype, static_cast<const char*>(m.w) + r0 * (m.k / b.elems) * b.bytes, r1 - r0, m.k};
}

void check_matrix(const DecodeMatrix& m, int64_t n, int64_t k, const char* what) {
  if (m.n != n || m.k != k || !m.w)
    throw std::invalid_argument(std::string("decoder: ") + what + " must be [" + std::to_string(n) + ", " +
                                std::to_string(k) + "], got [" + std::to_string(m.n) + ", " + std::to_string(m.k) + "]");
  const BlockInfo b = block_info(m.qtype);
  if (k % b.elems) throw std::invalid_argument(std::string("decoder: ") + what + ": K is not a multiple of the block size");
}

}  // namespace

Decoder::Decoder(const DecodeConfig& c, std::vector<DecodeLayer> layers, DecodeMatrix embedding, DecodeMatrix head,
                 const float* output_norm, const float* rope, const float* output_norm_bias)
    : c_(c), layers_(std::move(layers)), embedding_(embedding), head_(head), output_norm_(output_norm), rope_(rope),
      output_norm_bias_(output_norm_bias) {
  if (c.n_heads <= 0 || c.n_kv_heads <= 0 || c.n_heads % c.n_kv_heads || c.head_dim <= 0 ||
      c.rope_dim % 2 || c.rope_dim > c.head_dim || c.max_len <= 0)
    throw std::invalid_argument("decoder: inconsistent head geometry");
  const int64_t qd = c.n_heads * c.head_dim, kvd = c.n_kv_heads * c.head_dim;
  check_matrix(embedding, c.vocab, c.dim, "the embedding");
  check_matrix(head, c.vocab, c.dim, "the LM head");
  for (const DecodeLayer& l : layers_) {
    check_matrix(l.q, qd, c.dim, "attn_q");
    check_matrix(l.k, kvd, c.dim, "attn_k");
    check_matrix(l.v, kvd, c.dim, "attn_v");
    check_matrix(l.o, c.dim, qd, "attn_output");
    const int64_t e = l.router ? c.n_experts : 1, f = l.router ? c.expert_ffn : c.ffn_dim;
    if (l.router && !(0 < c.n_experts_used && c.n_experts_used <= c.n_experts && f > 0))
      throw std::invalid_argument("decoder: inconsistent experts");
    if (!ungated(c.activation)) check_matrix(l.gate, e * f, c.dim, "ffn_gate");  // (none: no gate)
    if (c.activation == Activation::kXielu && (l.router || !l.xielu))
      throw std::invalid_argument("decoder: xIELU takes each dense layer's scalars");
    check_matrix(l.up, e * f, c.dim, "ffn_up");
    check_matrix(l.down, e * c.dim, f, "ffn_down");
    if (l.router && c.shared_ffn) {
      check_matrix(l.shared_gate, c.shared_ffn, c.dim, "ffn_gate_shexp");
      check_matrix(l.shared_up, c.shared_ffn, c.dim, "ffn_up_shexp");
      check_matrix(l.shared_down, c.dim, c.shared_ffn, "ffn_down_shexp");
    }
    if (l.rope_kind >= c.rope_kinds || l.rope_kind < -1 || l.window < 0)
      throw std::invalid_argument("decoder: a layer's rope kind or window is out of range");
  }
  x_.resize(c.dim);
  h_.resize(std::max(c.dim, c.ffn_dim));
  q_.resize(qd);
  k_.resize(kvd);
  v_.resize(kvd);
  o_.resize(qd);
  gate_.resize(std::max({c.ffn_dim, c.expert_ffn, c.shared_ffn}));
  up_.resize(std::max({c.ffn_dim, c.expert_ffn, c.shared_ffn}));
  expert_out_.resize(c.dim);
  parallel_out_.resize(c.parallel ? c.dim : 0);
  parallel_in_.resize(c.parallel ? c.dim : 0);
  moe_sum_.resize(c.dim);
  probs_.resize(c.n_experts);
  order_.resize(c.n_experts);
}

void Decoder::gated_mlp(const DecodeMatrix& g, const DecodeMatrix& u, const DecodeMatrix& d, const float* in,
                        float* out, const float* const* bias, const float* xielu_scalars) {
  const int64_t f = u.n;
  if (ungated(c_.activation)) {  // no gate: down(act(up))
    matvecs({{&u, in, up_.data()}});
    if (bias) add_bias(up_.data(), bias[1], f);
    if (c_.activation == Activation::kXielu) xielu(up_.data(), xielu_scalars, f);
    else if (c_.activation == Activation::kGeluTanhUngated) gelu(up_.data(), f);
    else
      for (int64_t i = 0; i < f; ++i) up_[i] = up_[i] > 0.0f ? up_[i] * up_[i] : 0.0f;
    matvecs({{&d, up_.data(), out}});
    if (bias) add_bias(out, bias[2], c_.dim);
    return;
  }
  matvecs({{&g, in, gate_.data()}, {&u, in, up_.data()}});
  if (bias) {
    add_bias(gate_.data(), bias[0], f);
    add_bias(up_.data(), bias[1], f);
  }
  switch (c_.activation) {
    case Activation::kGeluTanh: gelu_mul(gate_.data(), up_.data(), f); break;
    case Activation::kSwigluOai: swiglu_oai_mul(gate_.data(), up_.data(), f); break;
    default: silu_mul(gate_.data(), up_.data(), f);
  }
  matvecs({{&d, gate_.data(), out}});
  if (bias) add_bias(out, bias[2], c_.dim);
}

void Decoder::norm(const float* x, const float* w, const float* b, float* out) const {
  if (c_.layer_norm) layer_norm(x, w, b, c_.norm_eps, c_.dim, out);
  else rms_norm(x, w, c_.norm_eps, c_.dim, out);
}

void Decoder::ffn(const DecodeLayer& l, const float* in, float* out) {
  if (l.router) experts(l, in, out);
  else gated_mlp(l.gate, l.up, l.down, in, out, l.bias + 4, l.xielu);
  if (c_.residual_scale != 1.0f)
    for (int64_t i = 0; i < c_.dim; ++i) out[i] *= c_.residual_scale;
  if (l.post_ffn_norm) rms_norm(out, l.post_ffn_norm, c_.norm_eps, c_.dim, out);
}

// out = Σ over the chosen experts of weight · expert(in) (decode_kernels.h), as lowtune.model.MoE.
void Decoder::experts(const DecodeLayer& l, const float* in, float* out) {
  const int64_t n = c_.n_experts, f = c_.expert_ffn;
  float* p = probs_.data();
  const int64_t used = c_.n_experts_used;
  for (int64_t e = 0; e < n; ++e)
    p[e] = dot(l.router + e * c_.dim, in, c_.dim) + (l.router_bias ? l.router_bias[e] : 0.0f);
  if (c_.expert_gating == 1) {
    const float total = softmax_numerators(p, n);
    for (int64_t e = 0; e < n; ++e) p[e] /= total;
  }
  std::vector<int64_t>& order = order_;
  for (int64_t e = 0; e < n; ++e) order[e] = e;
  const float* sb = l.selection_bias;
  const auto pick = [&](int64_t e) { return sb ? p[e] + sb[e] : p[e]; };
  std::partial_sort(order.begin(), order.begin() + used, order.end(), [&](int64_t a, int64_t b) {
    return pick(a) > pick(b) || (pick(a) == pick(b) && a < b);
  });
  float sum = 0.0f;
  if (c_.expert_gating == 3) {  // the chosen logits' softmax
    const float top = p[order[0]];
    for (int64_t j = 0; j < used; ++j) sum += p[order[j]] = std::exp(p[order[j]] - top);
  } else {
    for (int64_t j = 0; j < used; ++j) sum += p[order[j]];
    sum = c_.moe_renorm ? std::max(sum, 6.103515625e-5f) : 1.0f;
  }
  float* acc = moe_sum_.data();
  std::fill_n(acc, c_.dim, 0.0f);
  for (int64_t j = 0; j < used; ++j) {
    const int64_t e = order[j];
    const DecodeMatrix g = row_range(l.gate, e * f, (e + 1) * f), u = row_range(l.up, e * f, (e + 1) * f);
    const DecodeMatrix d = row_range(l.down, e * c_.dim, (e + 1) * c_.dim);
    const float* b = l.expert_bias[0];
    const float* bias[3] = {b ? b + e * f : nullptr, b ? l.expert_bias[1] + e * f : nullptr,
                            b ? l.expert_bias[2] + e * c_.dim : nullptr};
    gated_mlp(g, u, d, in, expert_out_.data(), b ? bias : nullptr);
    const float w = p[e] / sum;
    for (int64_t i = 0; i < c_.dim; ++i) acc[i] += w * expert_out_[i];
  }
  if (c_.shared_ffn) {
    gated_mlp(l.shared_gate, l.shared_up, l.shared_down, in, expert_out_.data());
    const float w = l.shared_gate_inp ? 1.0f / (1.0f + std::exp(-dot(l.shared_gate_inp, in, c_.dim))) : 1.0f;
    for (int64_t i = 0; i < c_.dim; ++i) acc[i] += w * expert_out_[i];
  }
  std::copy_n(acc, c_.dim, out);
}

void Decoder::step(int64_t token, int64_t pos, float* logits) {
  if (token < 0 || token >= c_.vocab) throw std::invalid_argument("decoder: token id out of range");
  if (pos < 0 || pos >= c_.max_len) throw std::invalid_argument("decoder: position outside the cache");
  const int64_t hd = c_.head_dim, rep = c_.n_heads / c_.n_kv_heads, len = pos + 1;
  const float scale = c_.attn_scale != 0.0f ? c_.attn_scale : 1.0f / std::sqrt((float)hd);
  const float rs = c_.residual_scale;
  float* x = x_.data();
  float* h = h_.data();
  dispatch_qtype(embedding_.qtype, [&]<int T>() {
    using Tr = Traits<T>;
    const auto* row = static_cast<const typename Tr::block*>(embedding_.w) + token * (c_.dim / Tr::kElems);
    for (int64_t b = 0; b < c_.dim / Tr::kElems; ++b) dequant_block<T>(row + b, x + b * Tr::kElems);
  });
  if (c_.embedding_scale != 1.0f)
    for (int64_t i = 0; i < c_.dim; ++i) x[i] *= c_.embedding_scale;
  const int64_t stride = len + 1;  // a head's scores, and its sink's
  scores_.resize(c_.n_heads * stride);
  for (const DecodeLayer& l : layers_) {
    const float* in = x;  // the products' input: x normed, where the layer has the norm
    if (l.attn_norm) {
      norm(x, l.attn_norm, l.attn_norm_bias, h);
      in = h;
    }
    matvecs({{&l.q, in, q_.data()}, {&l.k, in, k_.data()}, {&l.v, in, v_.data()}});
    if (c_.parallel && l.ffn_norm) {  // (its own norm of x: GPT-NeoX's, Falcon 40B's)
      norm(x, l.ffn_norm, l.ffn_norm_bias, parallel_in_.data());
      ffn(l, parallel_in_.data(), parallel_out_.data());
    } else if (c_.parallel) {
      ffn(l, in, parallel_out_.data());  // (before the attention's output takes h)
    }
    add_bias(q_.data(), l.bias[0], c_.n_heads * hd);
    add_bias(k_.data(), l.bias[1], c_.n_kv_heads * hd);
    add_bias(v_.data(), l.bias[2], c_.n_kv_heads * hd);
    const auto qk_norms = [&] {
      if (l.q_norm) qk_norm(q_.data(), c_.n_heads, hd, l.q_norm, c_.norm_eps, c_.qk_norm_whole);
      if (l.k_norm) qk_norm(k_.data(), c_.n_kv_heads, hd, l.k_norm, c_.norm_eps, c_.qk_norm_whole);
    };
    if (!c_.qk_norm_after_rope) qk_norms();
    if (l.rope_kind >= 0) {
      const float* rot = rope_ + (l.rope_kind * c_.max_len + pos) * c_.rope_dim;
      rope(q_.data(), c_.n_heads, hd, c_.rope_dim, rot, c_.neox);
      rope(k_.data(), c_.n_kv_heads, hd, c_.rope_dim, rot, c_.neox);
    }
    if (c_.qk_norm_after_rope) qk_norms();
    const int64_t first = l.window > 0 ? std::max<int64_t>(0, len - l.window) : 0, seen = len - first;
    for (int64_t g = 0; g < c_.n_kv_heads; ++g) {
      std::copy_n(k_.data() + g * hd, hd, l.k_cache + (g * c_.max_len + pos) * hd);
      std::copy_n(v_.data() + g * hd, hd, l.v_cache + (g * c_.max_len + pos) * hd);
    }
    parallel_for(c_.n_heads, 1, [&](int64_t h0, int64_t h1) {
      for (int64_t head = h0; head < h1; ++head) {
        const int64_t g = head / rep;
        const float* kc = l.k_cache + (g * c_.max_len + first) * hd;
        const float* vc = l.v_cache + (g * c_.max_len + first) * hd;
        const float* qh = q_.data() + head * hd;
        float* s = scores_.data() + head * stride;
        for (int64_t j = 0; j < seen; ++j) s[j] = softcap(dot(qh, kc + j * hd, hd) * scale, c_.attn_softcap);
        if (l.sinks) s[seen] = l.sinks[head];  // in the softmax, weighing no value
        const float total = softmax_numerators(s, seen + (l.sinks ? 1 : 0));
        weighted_sum(s, vc, seen, hd, 1.0f / total, o_.data() + head * hd);
      }
    });
    float* attn_out = h;  // h (the normed input) is no longer needed
    matvecs({{&l.o, o_.data(), attn_out}});
    add_bias(attn_out, l.bias[3], c_.dim);
    if (rs != 1.0f)
      for (int64_t i = 0; i < c_.dim; ++i) attn_out[i] *= rs;
    if (l.post_attn_norm) rms_norm(attn_out, l.post_attn_norm, c_.norm_eps, c_.dim, attn_out);
    for (int64_t i = 0; i < c_.dim; ++i) x[i] += attn_out[i];
    if (c_.parallel) {
      for (int64_t i = 0; i < c_.dim; ++i) x[i] += parallel_out_[i];
      continue;
    }
    in = x;
    if (l.ffn_norm) {
      norm(x, l.ffn_norm, l.ffn_norm_bias, h);
      in = h;
    }
    ffn(l, in, h);
    for (int64_t i = 0; i < c_.dim; ++i) x[i] += h[i];
  }
  norm(x, output_norm_, output_norm_bias_, h);
  matvecs({{&head_, h, logits}});
  if (c_.logit_scale != 1.0f || c_.final_softcap > 0.0f)
    for (int64_t i = 0; i < c_.vocab; ++i) logits[i] = softcap(logits[i] / c_.logit_scale, c_.final_softcap);
}

}  // namespace lowtune::cpu
