"""Gemma 3n (gemma3n: E2B, E4B), after llama.cpp's src/models/gemma3n.cpp, which runs the exported
files, and transformers' Gemma3nTextModel. Shapes as in lowtune.model, plus A AltUp copies, L layers,
P per-layer width:

    token_embd              QEmbedding [V, D]      × sqrt(D); the head is tied to it
    per_layer_token_embd    QEmbedding [V, L·P]    × sqrt(P): each token's input to every layer
    per_layer_model_proj    QLinear [L·P, D]       the embedding's share of those inputs (÷ sqrt(D), normed
    per_layer_proj_norm     RMSNorm [P]            by per_layer_proj_norm, added, the sum ÷ sqrt(2))
    altup_proj              QLinear [(A-1)·D, D]   the embedding's other A-1 copies, each rescaled to its norm
    altup_unembd_proj       QLinear [(A-1)·D, D]   those copies back before the head, rescaled to the first's
                                                   norm; the head reads the mean of the A copies
    blk.N (Gemma3nLayer)    Gemma 3's layer (q/k norms, post-norms, GeGLU) on the active copy, plus
        altup_router_norm, altup_router [A, D]      modalities tanh(router(norm(x) / D)) of a copy
        altup_predict_coef [A·A, A]                 before the layer: copy j += Σ_k c_jk(active) copy k
        altup_correct_coef [A, A]                   after it: copy j += (1 + c_j(out)) (out - active)
        laurel_l [64, D], laurel_r [D, 64], laurel_post_norm   h + norm(r(l(h))) beside attention
        altup_correct_scale [D], inp_gate [P, D], proj [D, P], post_norm   gelu(inp_gate(corrected
                                                    active · scale)) · per-layer input, projected and
                                                    normed, added to copies 1..A-1

The layer's attention norms v without a weight and does not scale its queries; the first layers'
FFN gate keeps only what lies std_mul standard deviations (n - 1 in the variance, as llama.cpp
computes it; transformers divides by n) above its mean, ReLU-shifted; the layers from kv_layers on
compute no K/V and attend to the last earlier layer of their kind (sliding or global) that does.

llama.cpp fixes what the file also states (its hparams do not read them): 4 copies, the first
active, Laurel rank 64, per-layer width 256, K/V of their own in the first 20 layers, the gate's
sparsity in the first 10 at the 95th percentile, a final soft-cap of 30. A file that says otherwise is refused
(gemma3n_layout_problems), as llama.cpp would run it otherwise than it says.

Adapters go on the attention's and the FFN's linears (model.LINEAR_NAMES); AltUp, Laurel and the
per-layer inputs stay frozen, the gradient going through them.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F

from . import glue_ops
from .model import (DecoderLayer, KVCache, Model, ModelConfig, QEmbedding, QLinear, RMSNorm, _vector, apply_rope,
                    attention, checkpoint)

LAUREL_RANK = 64  # llama.cpp's hparams.laurel_rank
# llama.cpp's fixed layout (src/llama-hparams.h, src/models/gemma3n.cpp): the numbers a file must say
LLAMACPP_LAYOUT = {"altup_inputs": 4, "altup_active": 0, "per_layer_dim": 256}
LAYOUT_KEYS = {"altup_inputs": "altup.num_inputs", "altup_active": "altup.active_idx",  # (the file's keys of them)
               "per_layer_dim": "embedding_length_per_layer_input"}
LLAMACPP_KV_LAYERS = 20            # n_layer_kv_from_start
LLAMACPP_SPARSE_LAYERS = 10        # n_layer_sparsity
LLAMACPP_SPARSITY_STD = 1.6448533535003662  # f_sparsity_std_mul, the standard normal's 95th percentile
LLAMACPP_FINAL_SOFTCAP = 30.0      # f_final_logit_softcapping's default (its gemma3n reads no key)


def gemma3n_layout_problems(c: ModelConfig) -> list[str]:
    """What in config `c` llama.cpp, whose gemma3n fixes these numbers, would run otherwise."""
    out = [f"{LAYOUT_KEYS[k]} {getattr(c, k)} (llama.cpp: {v})" for k, v in LLAMACPP_LAYOUT.items()
           if getattr(c, k) != v]
    want_kv = LLAMACPP_KV_LAYERS if c.n_layers > LLAMACPP_KV_LAYERS else 0
    if c.kv_layers != want_kv:
        out.append(f"K/V of their own in {c.kv_layers or c.n_layers} layers (attention.shared_kv_layers; llama.cpp: "
                   f"the first {LLAMACPP_KV_LAYERS})")
    elif shared_kv_sources_differ(c):
        out.append(f"layers {want_kv - 2} and {want_kv - 1} not sliding and global (llama.cpp's shared K/V "
                   "come from them)")
    sparse = [i for i, s in enumerate(c.sparsity_std[:c.n_layers]) if math.isfinite(s)]
    if sparse != list(range(min(LLAMACPP_SPARSE_LAYERS, c.n_layers))) \
            or any(abs(c.sparsity_std[i] - LLAMACPP_SPARSITY_STD) > 1e-5 for i in sparse):
        out.append(f"activation sparsity in layers {sparse} (activation_sparsity_scale; llama.cpp: the first "
                   f"{LLAMACPP_SPARSE_LAYERS}, at the 95th percentile)")
    if c.final_softcap != LLAMACPP_FINAL_SOFTCAP:
        out.append(f"a final soft-cap of {c.final_softcap:g} (llama.cpp: {LLAMACPP_FINAL_SOFTCAP:g})")
    return out


def shared_kv_sources_differ(c: ModelConfig) -> bool:
    """Whether a layer that reuses K/V reuses another layer's than llama.cpp's: the sliding ones kv_layers - 2's,
    the global ones kv_layers - 1's (llama.cpp's rule for Gemma 3n and Gemma 4)."""
    return bool(c.kv_layers) and any(c.kv_source(i) != c.kv_layers - (2 if c.is_sliding(i) else 1)
                                     for i in range(c.kv_layers, c.n_layers))


def gaussian_top(g: torch.Tensor, std_mul: float) -> torch.Tensor:
    """relu(g - (mean + std_mul · std)) over the last dim: what lies above the Gaussian quantile,
    shifted down to it (llama.cpp's gaussian_topk: the variance over n - 1)."""
    x = g.float()
    mean = x.mean(-1, keepdim=True)
    std = ((x - mean).square().sum(-1, keepdim=True) / (x.shape[-1] - 1)).sqrt()
    return F.relu(x - (mean + std * std_mul)).to(g.dtype)


def rescaled(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x with each row's norm made like's (AltUp's copies keep the magnitude of the one they come from)."""
    norm = lambda t: torch.linalg.vector_norm(t.float(), dim=-1, keepdim=True)  # noqa: E731
    return (x.float() * norm(like) / norm(x)).to(x.dtype)


def attention_with_shared_kv(layer: DecoderLayer, h: torch.Tensor, rot: list[torch.Tensor], cache: KVCache | None,
                             start: int, kv: dict) -> torch.Tensor:
    """Gemma 3n's and Gemma 4's attention of a layer for normed h [B, T, D], post-normed: q and k normed
    before RoPE, v normed without a weight (from attn_k's output where the layer has no attn_v: Gemma 4's
    global layers), queries unscaled; a layer that reuses K/V (kv_source) reads them from kv, which each
    layer that computes its own fills."""
    c = layer.config
    b, t, _ = h.shape
    r = rot[layer.rope_kind]
    q = apply_rope(layer.attn_q_norm(layer.attn_q(h).view(b, t, c.n_heads, c.head_dim)).transpose(1, 2), r, "neox")
    if c.has_kv(layer.index):
        k = layer.attn_k(h).view(b, t, c.n_kv_heads, c.head_dim)
        v = layer.attn_v(h).view(b, t, c.n_kv_heads, c.head_dim) if hasattr(layer, "attn_v") else k
        k = apply_rope(layer.attn_k_norm(k).transpose(1, 2), r, "neox")
        v = glue_ops.rms_norm(v, layer.v_norm_weight, c.norm_eps).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer.index, start, k, v)
        kv[layer.index] = (k, v)
    k, v = kv[c.kv_source(layer.index)]
    attn = attention(q, k, v, start, c.query_scale, layer.window)
    return layer.post_attention_norm(layer.attn_output(attn.transpose(1, 2).reshape(b, t, c.n_heads * c.head_dim)))


class Gemma3nLayer(DecoderLayer):
    """Gemma 3's decoder layer inside AltUp, with Laurel and a per-layer input (the module's docstring)."""

    def __init__(self, config: ModelConfig, index: int, w: Mapping[str, object]):
        super().__init__(config, index, w)
        p, c = f"blk.{index}.", config
        for name in ("laurel_l", "laurel_r", "inp_gate", "proj", "altup_router", "altup_predict_coef",
                     "altup_correct_coef"):
            setattr(self, name, QLinear(w[p + name + ".weight"], p + name + ".weight"))
        for name in ("laurel_post_norm", "post_norm", "altup_router_norm"):
            setattr(self, name, RMSNorm(w[p + name + ".weight"], c.norm_eps))
        self.register_buffer("altup_correct_scale", _vector(w[p + "altup_correct_scale.weight"]), persistent=False)
        self.register_buffer("v_norm_weight", torch.ones(c.head_dim), persistent=False)  # (a norm without one)
        std = c.sparsity_std[index] if index < len(c.sparsity_std) else -math.inf
        self.sparsity_std = std if math.isfinite(std) else None

    def modalities(self, x: torch.Tensor) -> torch.Tensor:
        """AltUp's router on copy x [B, T, D] -> [B, T, A]."""
        return torch.tanh(self.altup_router(self.altup_router_norm(x) * (1.0 / x.shape[-1])).float()).to(x.dtype)

    def predict(self, xs: torch.Tensor) -> torch.Tensor:
        """xs [A, B, T, D] -> each copy plus its prediction from all of them."""
        a = xs.shape[0]
        coefs = self.altup_predict_coef(self.modalities(xs[self.config.altup_active]))
        coefs = coefs.view(*coefs.shape[:-1], a, a)  # [B, T, j, k]
        return xs + torch.einsum("btjk,kbtd->jbtd", coefs, xs)

    def correct(self, predictions: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Each predicted copy moved by (1 + its coefficient) times what the layer changed in the active one."""
        coefs = self.altup_correct_coef(self.modalities(out)) + 1.0   # [B, T, A]
        innovation = out - predictions[self.config.altup_active]
        return predictions + coefs.permute(2, 0, 1)[..., None] * innovation

    def forward(self, xs: torch.Tensor, per_layer: torch.Tensor, rot: torch.Tensor, cache: KVCache | None = None,
                start: int = 0, kv: dict | None = None) -> torch.Tensor:
        """xs [A, B, T, D] at positions start..start+T, per_layer [B, T, P] this layer's input -> [A, B, T, D].
        kv: the K/V of the layers before (layer -> (k, v) of every position so far), which this layer
        adds its own to or reads another's from."""
        predictions = self.predict(xs)
        active = predictions[self.config.altup_active]
        h = self.attn_norm(active)
        laurel = h + self.laurel_post_norm(self.laurel_r(self.laurel_l(h)))
        s = (active + self.attention_of(h, rot, cache, start, {} if kv is None else kv) + laurel) * 2 ** -0.5
        out = s + self.post_ffw_norm(self.ffn(self.ffn_norm(s)))
        corrected = self.correct(predictions, out)
        first = corrected[self.config.altup_active] * self.altup_correct_scale.to(out.dtype)
        first = F.gelu(self.inp_gate(first), approximate="tanh") * per_layer
        first = self.post_norm(self.proj(first))
        return torch.cat([corrected[:1], corrected[1:] + first])

    attention_of = attention_with_shared_kv

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        """GeGLU, its gate made sparse in the first layers."""
        g = self.ffn_gate(h)
        if self.sparsity_std is not None:
            g = gaussian_top(g, self.sparsity_std)
        return self.ffn_down(glue_ops.gated("gelu_tanh", g, self.ffn_up(h)))


class Gemma3nModel(Model):
    """lowtune.model.Model with Gemma 3n's AltUp copies and per-layer inputs around its layers."""

    layer_class = Gemma3nLayer

    def __init__(self, config: ModelConfig, weights: Mapping[str, object], dtype: torch.dtype = torch.float32):
        problems = gemma3n_layout_problems(config)
        if problems:
            raise ValueError("this gemma3n file has " + "; ".join(problems) + ", which llama.cpp's gemma3n fixes "
                             "(E2B's and E4B's layout); lowtune refuses it, as llama.cpp would run it otherwise")
        super().__init__(config, weights, dtype)
        c = config
        self.per_layer_token_embd = QEmbedding(weights["per_layer_token_embd.weight"], dtype,
                                               "per_layer_token_embd.weight", scale=math.sqrt(c.per_layer_dim))
        self.per_layer_model_proj = QLinear(weights["per_layer_model_proj.weight"], "per_layer_model_proj.weight")
        self.per_layer_proj_norm = RMSNorm(weights["per_layer_proj_norm.weight"], c.norm_eps)
        self.altup_proj = QLinear(weights["altup_proj.weight"], "altup_proj.weight")
        unembd = weights["altup_unembd_proj.weight"]
        self.altup_unembd_proj = torch.nn.ModuleList(
            QLinear(unembd.rows(i * c.dim, (i + 1) * c.dim), "altup_unembd_proj.weight",
                    fused_from=("altup_unembd_proj.weight", i * c.dim, (i + 1) * c.dim))
            for i in range(c.altup_inputs - 1))

    @staticmethod
    def own_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
        c = config
        d, a, p = c.dim, c.altup_inputs, c.per_layer_dim
        out = {"altup_proj.weight": ((a - 1) * d, d), "altup_unembd_proj.weight": ((a - 1) * d, d),
               "per_layer_token_embd.weight": (c.vocab_size, c.n_layers * p),
               "per_layer_model_proj.weight": (c.n_layers * p, d), "per_layer_proj_norm.weight": (p,)}
        layer = {"altup_correct_scale": (d,), "altup_correct_coef": (a, a), "altup_predict_coef": (a * a, a),
                 "altup_router": (a, d), "altup_router_norm": (d,), "laurel_l": (LAUREL_RANK, d),
                 "laurel_r": (d, LAUREL_RANK), "laurel_post_norm": (d,), "inp_gate": (p, d), "proj": (d, p),
                 "post_norm": (d,)}
        for i in range(c.n_layers):
            out.update({f"blk.{i}.{n}.weight": shape for n, shape in layer.items()})
        return out

    def per_layer_inputs(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Every layer's input for tokens ids [B, T] of embeddings x: [B, T, L, P]."""
        c = self.config
        table = self.per_layer_token_embd(ids, self.device).view(*ids.shape, c.n_layers, c.per_layer_dim)
        proj = self.per_layer_model_proj(x) * (1.0 / math.sqrt(c.dim))
        proj = self.per_layer_proj_norm(proj.view(*ids.shape, c.n_layers, c.per_layer_dim))
        return (proj + table) * 2 ** -0.5

    def hidden(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if ids.dim() != 2:
            raise ValueError(f"ids must have shape [B, T], got {tuple(ids.shape)}")
        c = self.config
        start = cache.length if cache is not None else 0
        t = ids.shape[1]
        rot = self._rotation_on_device(start, t, cache.max_len if cache is not None else None)
        x = self.tok_embd(ids, self.device)
        per_layer = self.per_layer_inputs(ids, x)
        copies = self.altup_proj(x).view(*x.shape[:-1], c.altup_inputs - 1, c.dim).movedim(-2, 0)
        xs = torch.cat([x[None], rescaled(copies, x)])
        kv: dict = {}
        recompute = self.gradient_checkpointing and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.layers):
            if recompute:
                xs = checkpoint(lambda xs, pl, layer=layer: layer(xs, pl, rot, None, 0, kv), xs, per_layer[:, :, i])
            else:
                xs = layer(xs, per_layer[:, :, i], rot, cache, start, kv)
        if cache is not None:
            cache.length = start + t
        back = [rescaled(proj(xs[i + 1]), xs[0]) for i, proj in enumerate(self.altup_unembd_proj)]
        return self.output_norm(torch.stack([xs[0], *back]).mean(0))
