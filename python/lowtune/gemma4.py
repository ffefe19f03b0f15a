"""Gemma 4 (gemma4: E2B, E4B, 31B; the language model), after llama.cpp's src/models/gemma4.cpp, which runs
the exported files, and transformers' Gemma4TextModel. Gemma 3's layer (q/k norms, post-norms, GeGLU),
with what is new:

    widths by layer         the global layers' heads are key_length wide with their own KV heads, the
                            sliding ones' key_length_swa (ModelConfig.at_layer); the last layers' FFNs
                            may be twice as wide (use_double_wide_mlp)
    RoPE                    the sliding layers' on rope.dimension_count_swa dims at freq_base_swa; the
                            global layers' on all key_length dims at freq_base, each pair's speed divided
                            by rope_freqs (1e30 for the pairs that "proportional" RoPE leaves unrotated)
    attention               queries unscaled; v normed without a weight; a global layer without attn_v
                            takes attn_k's projection (before its norm) as its values (attention_k_eq_v)
    K/V reuse               the layers from n_layers - shared_kv_layers on compute no K/V and attend to
                            the last earlier layer of their kind that does (Gemma 3n's rule)
    per-layer inputs        where embedding_length_per_layer_input P > 0, Gemma 3n's: per_layer_token_embd
                            [V, L·P] × sqrt(P) plus the normed projection per_layer_model_proj(x) / sqrt(D),
                            the sum ÷ sqrt(2); after the FFN's residual add, h += post_norm(proj(
                            gelu(inp_gate(h)) · the layer's input))
    layer_output_scale      each layer's output multiplied by its scalar
    experts (26B-A4B)       beside the dense FFN (its output post_ffw_norm_1-normed), lowtune.model.MoE on
                            pre_ffw_norm_2(x) (its output post_ffw_norm_2-normed), routed by x (the residual
                            stream) normed without a weight × ffn_gate_inp.scale / sqrt(D); the chosen
                            weights renormalized, each × its expert's ffn_down_exps.scale; the sum of the
                            two post_ffw_norm-normed (Family.moe_beside_ffn)

Adapters go on the attention's and the dense FFN's linears (model.LINEAR_NAMES); the per-layer inputs, the
router and the experts stay frozen, the gradient going through them.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F

from . import glue_ops
from .gemma3n import Gemma3nModel, attention_with_shared_kv, shared_kv_sources_differ
from .model import (DecoderLayer, KVCache, Model, ModelConfig, QEmbedding, QLinear, RMSNorm, _vector, checkpoint,
                    rope_inv_freq)


# an expert layer's norms: the dense FFN's output's, the experts' input's and output's
EXPERT_NORM_NAMES = ("post_ffw_norm_1", "pre_ffw_norm_2", "post_ffw_norm_2")


class Gemma4Layer(DecoderLayer):
    """Gemma 3's decoder layer at its own widths, with Gemma 4's attention, per-layer input and output
    scale (the module's docstring). self.config is the layer's (ModelConfig.at_layer)."""

    def __init__(self, config: ModelConfig, index: int, w: Mapping[str, object]):
        super().__init__(config, index, w)
        c, p = self.config, f"blk.{index}."
        self.rope_kind = int(c.is_sliding(index))  # (Gemma4Model's tables: the global layers', the sliding ones')
        if c.per_layer_dim:
            self.inp_gate = QLinear(w[p + "inp_gate.weight"], p + "inp_gate.weight")
            self.proj = QLinear(w[p + "proj.weight"], p + "proj.weight")
            self.post_norm = RMSNorm(w[p + "post_norm.weight"], c.norm_eps)
        if self.ffn_moe is not None:  # the experts' norms and the dense FFN's post-norm
            self.post_ffw_norm_1, self.pre_ffw_norm_2, self.post_ffw_norm_2 = (
                RMSNorm(w[p + n + ".weight"], c.norm_eps) for n in EXPERT_NORM_NAMES)
        scale = w.get(p + "layer_output_scale.weight")
        self.register_buffer("layer_output_scale", None if scale is None else _vector(scale), persistent=False)
        self.register_buffer("v_norm_weight", torch.ones(c.head_dim), persistent=False)  # (a norm without one)

    def forward(self, x: torch.Tensor, per_layer: torch.Tensor | None, rot: list[torch.Tensor],
                cache: KVCache | None = None, start: int = 0, kv: dict | None = None) -> torch.Tensor:
        """x [B, T, D] at positions start..start+T, per_layer [B, T, P] this layer's input (None: P = 0).
        kv: the K/V of the layers before (layer -> (k, v) of every position so far), which this layer
        adds its own to or reads another's from."""
        x = x + self.attention_of(self.attn_norm(x), rot, cache, start, {} if kv is None else kv)
        x = x + (self.mlp(self.ffn_norm(x)) if self.ffn_moe is None else self.dense_and_experts(x))
        if per_layer is not None:
            gate = F.gelu(self.inp_gate(x), approximate="tanh") * per_layer
            x = x + self.post_norm(self.proj(gate))
        return x if self.layer_output_scale is None else x * self.layer_output_scale.to(x.dtype)

    def dense_and_experts(self, x: torch.Tensor) -> torch.Tensor:
        """An expert layer's FFN output for the residual stream x: the dense FFN's and the experts' outputs,
        each normed by its own norms, summed and post-normed; the router reads x."""
        h = self.ffn_norm(x)
        dense = self.post_ffw_norm_1(self.ffn_down(glue_ops.gated(self.activation, self.ffn_gate(h), self.ffn_up(h))))
        experts = self.post_ffw_norm_2(self.ffn_moe(self.pre_ffw_norm_2(x), routed_by=x))
        return self.post_ffw_norm(dense + experts)

    attention_of = attention_with_shared_kv


class Gemma4Model(Model):
    """lowtune.model.Model with Gemma 4's layers, RoPE tables of two widths and per-layer inputs."""

    layer_class = Gemma4Layer

    def __init__(self, config: ModelConfig, weights: Mapping[str, object], dtype: torch.dtype = torch.float32):
        c = config
        if shared_kv_sources_differ(c):
            raise ValueError(f"this gemma4 file's layers {c.kv_layers - 2} and {c.kv_layers - 1}, before the first "
                             "that reuses K/V, are not sliding and global (attention.sliding_window_pattern), whose "
                             "K/V llama.cpp's gemma4 shares; lowtune refuses it, as llama.cpp cannot run it")
        super().__init__(config, weights, dtype)
        if c.per_layer_dim:
            self.per_layer_token_embd = QEmbedding(weights["per_layer_token_embd.weight"], dtype,
                                                   "per_layer_token_embd.weight", scale=math.sqrt(c.per_layer_dim))
            self.per_layer_model_proj = QLinear(weights["per_layer_model_proj.weight"], "per_layer_model_proj.weight")
            self.per_layer_proj_norm = RMSNorm(weights["per_layer_proj_norm.weight"], c.norm_eps)
        # the global layers' speeds at their width, divided by rope_freqs; the sliding layers' at theirs
        factors = weights.get("rope_freqs.weight")
        self.rope_inv_freqs = []
        for sliding in (False, True):
            layer = next((i for i in range(c.n_layers) if c.is_sliding(i) == sliding), None)
            self.rope_inv_freqs.append(None if layer is None else rope_inv_freq(
                c.at_layer(layer), None if sliding or factors is None else _vector(factors), sliding=sliding))

    @staticmethod
    def own_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
        c, p = config, config.per_layer_dim
        out = {f"blk.{i}.layer_output_scale.weight": (1,) for i in range(c.n_layers)}
        for i in range(c.n_layers):
            if c.has_experts(i):  # the router's scale, each expert's, the experts' norms
                out.update({f"blk.{i}.ffn_gate_inp.scale": (c.dim,), f"blk.{i}.ffn_down_exps.scale": (c.n_experts,)})
                out.update({f"blk.{i}.{n}.weight": (c.dim,) for n in EXPERT_NORM_NAMES})
        if p:
            out.update({"per_layer_token_embd.weight": (c.vocab_size, c.n_layers * p),
                        "per_layer_model_proj.weight": (c.n_layers * p, c.dim), "per_layer_proj_norm.weight": (p,)})
            for i in range(c.n_layers):
                out.update({f"blk.{i}.inp_gate.weight": (p, c.dim), f"blk.{i}.proj.weight": (c.dim, p),
                            f"blk.{i}.post_norm.weight": (c.dim,)})
        return out

    per_layer_inputs = Gemma3nModel.per_layer_inputs  # (the same tables, projection and norm)

    def rope_rotation(self, start: int, t: int, context: int | None = None) -> list[torch.Tensor]:
        """apply_rope's NEOX tables [2, T, rope_dim] for positions start..start+T: the global layers', then
        the sliding layers' (None where the model has no such layer)."""
        pos = torch.arange(start, start + t, dtype=torch.float64)
        out = []
        for inv in self.rope_inv_freqs:
            if inv is None:
                out.append(None)
                continue
            ang = pos[:, None] * inv[None, :]
            out.append(torch.stack((torch.cat((ang.cos(),) * 2, -1), torch.cat((-ang.sin(), ang.sin()), -1))).float())
        return out

    def _rotation_on_device(self, start: int, t: int, context: int | None = None) -> list[torch.Tensor]:
        key = (start, t, self.device)
        if self._rotation is None or self._rotation[0] != key:
            tables = self.rope_rotation(start, t)
            self._rotation = (key, [r if r is None else r.to(self.device) for r in tables])
        return self._rotation[1]

    def hidden(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if ids.dim() != 2:
            raise ValueError(f"ids must have shape [B, T], got {tuple(ids.shape)}")
        start = cache.length if cache is not None else 0
        t = ids.shape[1]
        rot = self._rotation_on_device(start, t)
        x = self.tok_embd(ids, self.device)
        per_layer = self.per_layer_inputs(ids, x) if self.config.per_layer_dim else None
        kv: dict = {}
        recompute = self.gradient_checkpointing and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.layers):
            pl = None if per_layer is None else per_layer[:, :, i]
            if recompute:
                x = checkpoint(lambda x, pl, layer=layer: layer(x, pl, rot, None, 0, kv), x, pl)
            else:
                x = layer(x, pl, rot, cache, start, kv)
        if cache is not None:
            cache.length = start + t
        return self.output_norm(x)
