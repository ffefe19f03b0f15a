"""One readable decoder for every family lowtune runs: Llama (Llama 1/2/3, Mistral, SmolLM2, ...),
SmolLM3, Granite, ERNIE 4.5, Ministral 3, Qwen2/2.5, Qwen3, Qwen3 MoE, Mixtral, Phi-3/3.5, Gemma,
Gemma 2, Gemma 3, OLMo 2/3, GLM-4, DeepSeek V2/V3 and the other families lowtune.families lists;
LFM2's convolution layers take a ShortConv in place of attention, Granite 4's hybrids' Mamba2 layers
a Mamba2 (Mamba-2's layers are that alone), Qwen3.5's recurrent layers a Gated DeltaNet
(gated_delta_rule), and Gemma 3n's AltUp, Laurel and per-layer inputs wrap this decoder in
lowtune.gemma3n.

What differs between the families is data (lowtune.families.Family, reached through ModelConfig);
the one DecoderLayer below reads it. Every weight matrix stays in its own block format (a QTensor)
and is used through `lowtune.ops.qmatmul`; nothing is dequantized at load. Modules carry GGUF's names:

    token_embd                QEmbedding [V, D]   rows dequantized on demand (× sqrt(D) for Gemma)
    position_embd             QEmbedding [n_ctx, D] learned positions added to the token embeddings (GPT-2,
                                                  StarCoder, MPT's files without ALiBi); its rows bound the context
    token_embd_norm           LayerNorm           on the embeddings (BLOOM)
    blk.N.attn_norm           RMSNorm             (absent in OLMo 2: NoNorm; with a bias in PhiMoE: BiasedRMSNorm)
    blk.N.attn_q/k/v          QLinear [H*hd | Hkv*hd, D] (+ bias where the file has one, e.g. Qwen2);
                              row views of a fused attn_qkv where the file has one (Phi-3)
    blk.N.attn_q_a/q_b, attn_kv_a_mqa, attn_k_b, attn_v_b
                              QLinear             latent attention in place of attn_q/k/v (DeepSeek:
                              DecoderLayer._latent_qkv), attn_q_a_norm and attn_kv_a_norm RMSNorms
    blk.N.indexer             LightningIndexer    which keys each query attends to (DeepSeek-V3.2): attn_q_b,
                                                  attn_k, proj (QLinear, frozen), k_norm (LayerNorm)
    blk.N.attn_q/k_norm       RMSNorm [hd]        per head, before RoPE (Qwen3, Gemma 3); [H*hd | Hkv*hd]
                              over the whole projection (OLMo 2)
    blk.N.attn_output         QLinear [D, H*hd]
    blk.N.attn_gate           QLinear [H*hd, D]   the heads' output gate, act(attn_gate(x)) · attention before
                              attn_output (AFMoE: sigmoid; Laguna: softplus, [H, D] where one a head)
    blk.N.post_attention_norm RMSNorm             on the attention output (Gemma 2/3, OLMo 2, GLM-4)
    blk.N.attn_sub_norm       RMSNorm [H*hd]      on the heads' output before attn_output (BitNet)
    blk.N.ffn_norm            RMSNorm             (absent in OLMo 2: NoNorm)
    blk.N.ffn_gate/up         QLinear [F, D]      act(gate(x)) * up(x): SwiGLU, or GeGLU (Gemma); row
                              views of Phi-3's fused ffn_up [2F, D] (gate rows first)
    blk.N.ffn_down            QLinear [D, F]      (BitNet: ffn_sub_norm [F] on its input)
    blk.N.ffn_moe             MoE                 in place of ffn_gate/up/down where the file has experts
                              (Qwen3 MoE, Mixtral): ffn_gate_inp (router), ffn_{gate,up,down}_exps
    blk.N.post_ffw_norm       RMSNorm             on the FFN output (Gemma 2/3, OLMo 2, GLM-4)
    blk.N.shortconv           ShortConv           in place of attention in LFM2's convolution layers:
                              in_proj [3D, D], out_proj [D, D] (QLinear), conv [D, L] (the frozen kernel)
    blk.N.ssm_in, ssm_out     QLinear             in place of attention in Granite 4's Mamba2 layers, around
    blk.N.mamba               Mamba2              ssm_conv1d (+ bias), ssm_a, ssm_d, ssm_dt.bias, ssm_norm (frozen);
                                                  beside attention in Falcon-H1, alone in Mamba-2's layers
    blk.N.ssm_x, ssm_dt       QLinear             Mamba 1's dt, B, C and dt's projection (Mamba, Jamba), its
                              Mamba               blk.N.mamba: ssm_conv1d + bias, ssm_a [inner, state], ssm_d
    blk.N.attn_qkv/attn_gate  QLinear             in place of attention in Qwen3.5's Gated DeltaNet layers,
    blk.N.ssm_alpha/beta/out  QLinear             with ssm_conv1d [C, L], ssm_a, ssm_dt (frozen buffers) and
    blk.N.ssm_norm            RMSNorm [d_v]       (DecoderLayer.delta_net_branch); Qwen3.5's attn_q [2·H*hd, D]
                                                  gives each head's q, then its output gate
    blk.N.attn_q/k/v, ssm_f_a/f_b, ssm_beta, ssm_g_a/g_b, attn_output (QLinear) in place of attention in
                              Kimi Linear's KDA layers, with ssm_conv1d_q/k/v joined as ssm_conv1d [3·H*d_k, L]
    output_norm               RMSNorm             (LFM2's file names it token_embd_norm)
    output                    QLinear [V, D]      absent when tied: token_embd's blocks are reused

Attention is causal GQA, queries scaled by ModelConfig.query_scale, scores soft-capped c·tanh(s/c)
where the family has a cap (Gemma 2); sliding layers (Gemma 2/3, or wherever the file gives a window)
see only the last `window` positions and may have their own RoPE base (Llama 4's see their own chunk
of `window` positions instead); SmolLM3's and Llama 4's every 4th layer has no RoPE. BLOOM's and MPT's
scores take ALiBi's biases (alibi_slopes) in place of RoPE; MPT clamps q, k and v. Logits are
soft-capped where the family says (Gemma 2, Gemma 3 files that ask).
Granite scales embeddings, each branch before its residual add, queries and logits by its file's
numbers (ModelConfig.embedding_scale, residual_scale, attn_scale, logit_scale).

Shapes: B batch, T tokens, D model width, H query heads, Hkv key/value heads, hd head width, V vocab.

    model = lowtune.load_model("model.gguf", device="cpu", dtype=torch.float32)   # lowtune.loading
    logits = model(ids)                     # [B, T, V] float32, for eval and generation
    loss = model.loss(ids, labels)          # chunked LM head: no [B*T, V] logits kept for backward
    layer = model.layers[3]; layer.attn_q   # QLinear, GGUF name blk.3.attn_q; adapters wrap these
    model.fused_views                       # {"blk.3.attn_qkv.weight": (("blk.3.attn_q.weight", 0, 3072), ...)}

Model(config, weights, dtype) takes GGUF tensor names -> QTensor for every matrix (kept packed) and
a float tensor for every vector (norms, biases, RoPE factors). Base weights are buffers with
persistent=False: `model.state_dict()` holds only what is trained (adapters), and `model.to(device)`
moves the packed blocks.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Callable, Collection, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import checkpoint as torch_checkpoint

from . import glue_ops, ops
from .families import (ABSENT, FAMILIES, MAX_LAYERS, RECONVERT, XIELU_KEYS, Family, checked_number,
                       family_of, key_number, yarn_magnitude, yarn_mscale)
from .qtensor import QTensor

LINEAR_NAMES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# the linears of a short-convolution layer (LFM2), which takes them in place of the four attention ones;
# modules blk.N.shortconv.<name>
CONV_LINEAR_NAMES = ("in_proj", "out_proj")
# the linears of a Gated DeltaNet layer (Qwen3.5), in place of the four attention ones: q/k/v into the
# convolution, z (the output norm's gate), alpha (the decay's), beta (or both in Qwen3-Next's ssm_ba, head
# by head), and the output
DELTA_LINEAR_NAMES = ("attn_qkv", "attn_gate", "ssm_alpha", "ssm_beta", "ssm_ba", "ssm_out")
# the linears of a Kimi Delta Attention layer (Kimi Linear), in place of the four attention ones: q, k and v
# (each into its own convolution), the decay's low-rank pair f_a/f_b, beta, the output gate's g_a/g_b, the output
KDA_LINEAR_NAMES = ("attn_q", "attn_k", "attn_v", "ssm_f_a", "ssm_f_b", "ssm_beta", "ssm_g_a", "ssm_g_b",
                    "attn_output")
# the linears of a Mamba2 layer (Granite 4's hybrids), in place of the four attention ones; modules blk.N.<name>
SSM_LINEAR_NAMES = ("ssm_in", "ssm_out")
# the linears of a Mamba 1 layer (Mamba): Mamba2's and the scan's inputs, ssm_x (dt, B, C) and ssm_dt (dt)
MAMBA_LINEAR_NAMES = ("ssm_in", "ssm_x", "ssm_dt", "ssm_out")
# the norms of its dt, B and C where the file has them (Jamba), in that order
MAMBA_NORM_NAMES = ("ssm_dt_norm", "ssm_b_norm", "ssm_c_norm")
# RWKV-7's low-rank widths, as the metadata names them (attention.<name>_lora_rank): ModelConfig.wkv_lora_ranks
RWKV7_LORA_RANK_KEYS = ("decay", "iclr", "value_residual_mix", "gate")
# the linears of an RWKV-7 layer (lowtune.rwkv): the time mix's and the channel mix's, which llama.cpp's graph
# multiplies with their LoRA; the low-rank decay, learning rate, value mix and gate stay frozen
RWKV7_LINEAR_NAMES = ("time_mix_receptance", "time_mix_key", "time_mix_value", "time_mix_output", "channel_mix_key",
                      "channel_mix_value")
# ... and of an RWKV-6 layer: its time mix's gate and its channel mix's receptance besides
RWKV6_LINEAR_NAMES = RWKV7_LINEAR_NAMES[:3] + ("time_mix_gate",) + RWKV7_LINEAR_NAMES[3:] + ("channel_mix_receptance",)
# the attention's linears of multi-head latent attention (DeepSeek), attn_q or attn_q_a/attn_q_b, and
# attn_k_b/attn_v_b or (older conversions) attn_kv_b whole, as the file has them, and attn_output
MLA_LINEAR_NAMES = ("attn_q", "attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_k_b", "attn_v_b", "attn_kv_b",
                    "attn_output")
# per-head q/k norms (optional where the family says: Family.qk_norm_optional)
QK_NORM_NAMES = ("attn_q_norm", "attn_k_norm")
# a mixture's shared experts (lowtune.model.MoE's linears of these names)
SHARED_EXPERT_NAMES = ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")
# every linear of a decoder layer that adapters may wrap (a layer has those its family uses)
ADAPTER_TARGETS = tuple(dict.fromkeys(LINEAR_NAMES + MLA_LINEAR_NAMES + SHARED_EXPERT_NAMES + CONV_LINEAR_NAMES
                                     + MAMBA_LINEAR_NAMES + DELTA_LINEAR_NAMES + KDA_LINEAR_NAMES
                                     + RWKV6_LINEAR_NAMES))


# ----------------------------------------------------------------------------------------------
# Configuration


# ALiBi's max bias that llama.cpp fixes for BLOOM (Family.alibi "fixed"; its files carry none)
ALIBI_FIXED_MAX_BIAS = 8.0


# The rope kind of a layer without RoPE: its table rotates by nothing (cosines 1, sines 0), so that
# such a layer runs the same code, caches and kernels as every other, q and k unchanged bit for bit.
NO_ROPE = 2


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int
    rope_dim: int                 # leading dims of each head that RoPE rotates (= head_dim mostly)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_linear_scale: float = 1.0  # positions are divided by this ("linear" rope scaling)
    context_length: int = 2048
    arch: str = "llama"           # general.architecture: picks the Family
    sliding_window: int = 0       # sliding layers see the last `sliding_window` positions (0: none)
    swa_layers: tuple[int, ...] | None = None  # the sliding layers; None: every layer (with a window)
    rope_theta_swa: float | None = None        # RoPE base of sliding layers (None: rope_theta)
    rope_linear_scale_swa: float | None = None  # their linear scaling (None: rope_linear_scale)
    rope_attn_factor: float = 1.0  # magnitude of the rotation, on q and k (LongRoPE's attention factor)
    rope_orig_context: int = 0    # LongRoPE: contexts longer than this use rope_factors_long; YaRN: the
    #                               context it extends (0: context_length)
    rope_yarn_factor: float = 0.0  # YaRN: the context extended this many times (0: no YaRN)
    rope_yarn_beta_fast: float = 32.0  # YaRN's ramp: pairs turning more than this many times keep their speed
    rope_yarn_beta_slow: float = 1.0   # ... and pairs turning less than this many times are slowed
    attn_temperature: float = 0.0  # queries × 1 + t ln(1 + floor(pos / rope_orig_context)) (Ministral 3; 0: none)
    attn_scale: float = 0.0       # queries are multiplied by this (0: 1/sqrt(head_dim))
    clamp_qkv: float = 0.0        # q, k and v are clipped to ± this (OLMo's and MPT's clip_qkv; 0: not clipped)
    embedding_scale: float = 1.0  # token embeddings are multiplied by this (Granite; Gemma: sqrt(D))
    residual_scale: float = 1.0   # attention and FFN outputs are multiplied by this (Granite)
    logit_scale: float = 1.0      # logits are divided by this (Granite)
    attn_softcap: float = 0.0     # attention scores -> c·tanh(s/c) (0: none)
    final_softcap: float = 0.0    # logits -> c·tanh(l/c) (0: none)
    n_experts: int = 0            # a mixture-of-experts FFN of this many experts in every layer (0: dense)
    n_experts_used: int = 0       # experts each token is routed to
    expert_ffn_dim: int = 0       # an expert's FFN width (0: ffn_dim)
    shared_expert_ffn_dim: int = 0  # the width of a shared expert every token runs (0: none)
    expert_gating: int = 1        # llama.cpp's expert_gating_func: 1 softmax, then top k; 2 sigmoid, then top k;
    #                               3 top k, then softmax
    moe_layers: tuple[int, ...] | None = None  # the layers with experts (None: every layer, where n_experts)
    xielu: tuple[tuple[float, float, float, float], ...] = ()  # each layer's xIELU (alpha_p, alpha_n, beta,
    #                               eps) as the file's xielu.* arrays hold them (Apertus; glue_ops.xielu)
    conv_layers: tuple[int, ...] = ()  # the short-convolution layers, without attention (LFM2)
    conv_kernel: int = 0          # their convolution's width: the positions each output reads (shortconv.l_cache)
    expert_renorm: bool | None = None  # the chosen experts' weights divided by their sum (None: as the family)
    expert_weights_scale: float = 1.0  # the chosen experts' weights are multiplied by this (DeepSeek)
    expert_groups: int = 0        # experts are picked from the expert_groups_used best of this many groups
    expert_groups_used: int = 0   # (a group's score: the sum of its two best; 0: no groups)
    experts_per_group: int = 0    # Grove MoE: an adjugate expert for each group of this many experts (0: none),
    adjugate_ffn_dim: int = 0     # ... each this wide (expert_chunk_feed_forward_length; 0: head_dim),
    expert_group_scale: float = 0.0  # ... their output weighed by this (expert_group_scale)
    q_lora_rank: int = 0          # multi-head latent attention: q's latent width (0: q straight from x)
    kv_lora_rank: int = 0         # ... the keys' and values' latent width (0: no latent attention)
    kv_b_whole: bool = False      # ... attn_kv_b, not split into attn_k_b and attn_v_b (older conversions)
    value_head_dim: int = 0       # the width of each head's value (0: head_dim)
    attn_value_scale: float = 1.0  # the attention's output is multiplied by this (MiMo-V2-Flash's value scale)
    indexer_heads: int = 0        # DeepSeek's lightning indexer (Family.indexer): its heads (0: no indexer),
    indexer_head_dim: int = 0     # ... each this wide (RoPE on the first rope_dim dims),
    indexer_top_k: int = 0        # ... and the keys it keeps for each query
    indexer_shared: tuple[int, ...] = ()  # the layers without one, which reuse the keys of the last layer before
    #                                       them with one (GLM-5.2: Family.indexer_types)
    kv_layers: int = 0            # the first kv_layers layers have K/V of their own; the others reuse them
    #                               (0: every layer's own)
    altup_inputs: int = 0         # copies of the residual stream (AltUp, Gemma 3n; 0: one, no AltUp)
    altup_active: int = 0         # the copy each layer reads
    per_layer_dim: int = 0        # width of each layer's per-layer input (Gemma 3n, Gemma 4; 0: none)
    layer_widths: tuple[tuple[int, int, int, int], ...] = ()  # each layer's (head_dim, n_kv_heads, ffn_dim,
    #                               rope_dim) where they differ by layer (Gemma 4; at_layer); (): the fields'
    layer_heads: tuple[int, ...] = ()  # each layer's query heads where they differ by layer, with layer_widths
    #                               (OpenELM; at_layer); (): n_heads
    sparsity_std: tuple[float, ...] = ()  # per layer: the FFN gate keeps what lies this many standard
    #                                       deviations above its mean (-inf or absent: all of it)
    ssm_layers: tuple[int, ...] = ()  # the Mamba2 layers, without attention (Granite 4's hybrids)
    ssm: SSMShape | MambaShape | None = None  # their sizes (the file's ssm.* keys; Mamba 1's: Family.mamba1)
    no_rope: bool = False         # no layer applies RoPE (Granite 4's hybrids: rope.scaling.finetuned = false)
    mlp_layers: tuple[int, ...] | None = None  # the layers that are an MLP alone, the others a mixer alone
    #                               (Nemotron-H: Family.layer_parts); None: every layer a mixer and an FFN
    attentionless_layers: tuple[int, ...] = ()  # layers without attention, an FFN alone or nothing (Deci's)
    linear_attention_layers: tuple[int, ...] = ()  # layers whose attention is attn_output of the normed input
    #                               alone (Deci's replace_with_linear)
    ffnless_layers: tuple[int, ...] = ()  # layers without an FFN (Deci's)
    delta_layers: tuple[int, ...] = ()  # the Gated DeltaNet layers, without attention (Qwen3.5; Kimi Delta
    #                                     Attention's: Family.kda)
    ssm_conv_kernel: int = 0      # their convolution's width (ssm.conv_kernel)
    ssm_k_heads: int = 0          # their q/k heads (ssm.group_count), each d_k = ssm_head_dim wide
    ssm_v_heads: int = 0          # their value heads (ssm.time_step_rank), each ssm_inner / ssm_v_heads wide
    ssm_head_dim: int = 0         # d_k (ssm.state_size)
    ssm_inner: int = 0            # all value heads' width (ssm.inner_size)
    mlp_activation: str = ""      # the gated MLP's activation where the file names one (BitNet's
    #                               hidden_activation: relu2); "": the family's
    alibi_max_bias: float = 0.0   # ALiBi: each head's scores biased by its slope × (key pos - query pos), the
    #                               slopes from this bias (alibi_slopes; BLOOM, MPT; 0: none)
    sequential: bool = False      # a parallel family's layers run attention, then the FFN (GPT-NeoX's
    #                               use_parallel_residual = false: Family.parallel_key)
    wkv_lora_ranks: tuple[int, ...] = ()  # RWKV-7's low-rank widths of the decay, the in-context learning rate,
    #                               the value residual mix and the gate (attention.*_lora_rank); RWKV-6's of the
    #                               token-shift mix and the decay (time_mix_extra_dim, time_decay_extra_dim)
    rescale_every: int = 0        # RWKV-6 halves the residual stream after every this many layers (0: never)

    @property
    def family(self) -> Family:
        if self.arch not in FAMILIES:
            family_of({"general.architecture": self.arch})  # raises, saying why
        return FAMILIES[self.arch]

    def at_layer(self, layer: int) -> "ModelConfig":
        """The config of layer `layer`: this one with its own head, KV head, FFN and RoPE widths where the
        file gives them by layer (Gemma 4's global and sliding layers), its own query heads (OpenELM's), else
        this one."""
        if not self.layer_widths:
            return self
        head_dim, kv_heads, ffn_dim, rope_dim = self.layer_widths[layer]
        heads = self.layer_heads[layer] if self.layer_heads else self.n_heads
        return replace(self, n_heads=heads, head_dim=head_dim, n_kv_heads=kv_heads, ffn_dim=ffn_dim,
                       rope_dim=rope_dim, layer_widths=(), layer_heads=())

    @property
    def parallel(self) -> bool:
        """Whether attention and the FFN read the same x and add to it at once (Family.parallel)."""
        return self.family.parallel and not self.sequential

    @property
    def original_context(self) -> int:
        """The context RoPE's scaling extends (LongRoPE's switch point, YaRN's original context, where
        the attention temperature starts): rope_orig_context, else context_length."""
        return self.rope_orig_context or self.context_length

    @property
    def expert_width(self) -> int:
        return self.expert_ffn_dim or self.ffn_dim

    @property
    def v_dim(self) -> int:
        """The width of each head's value."""
        return self.value_head_dim or self.head_dim

    @property
    def renorms_experts(self) -> bool:
        return self.family.moe_renorm if self.expert_renorm is None else self.expert_renorm

    @property
    def query_scale(self) -> float:
        return self.attn_scale or 1.0 / math.sqrt(self.head_dim)

    def has_experts(self, layer: int) -> bool:
        """Whether layer `layer`'s FFN is a mixture of experts (ERNIE 4.5 MoE's first layers are dense)."""
        return bool(self.n_experts) and (self.moe_layers is None or layer in self.moe_layers)

    def is_conv(self, layer: int) -> bool:
        """Whether layer `layer` is a short convolution in place of attention (LFM2)."""
        return layer in self.conv_layers

    def has_kv(self, layer: int) -> bool:
        """Whether layer `layer` computes K/V of its own (Gemma 3n's last layers reuse earlier ones')."""
        return not self.kv_layers or layer < self.kv_layers

    def kv_source(self, layer: int) -> int:
        """The layer whose K/V layer `layer` attends to: itself, or the last layer of its kind (sliding
        or global) that has its own."""
        if self.has_kv(layer):
            return layer
        return max(i for i in range(self.kv_layers) if self.is_sliding(i) == self.is_sliding(layer))

    def is_ssm(self, layer: int) -> bool:
        """Whether layer `layer` runs a Mamba2 mixer: in place of attention (Granite 4's hybrids), or beside
        it (Falcon-H1: Family.parallel_ssm)."""
        return layer in self.ssm_layers

    def has_mixer(self, layer: int) -> bool:
        """Whether layer `layer` mixes positions (attention or its stand-in) before an FFN or alone."""
        # (each tuple asked only where it is not empty: a compiled layer reads its index only where it matters)
        return (self.mlp_layers is None or layer not in self.mlp_layers) and \
            (not self.attentionless_layers or layer not in self.attentionless_layers)

    def has_ffn(self, layer: int) -> bool:
        """Whether layer `layer` has an FFN (dense or experts) after its mixer, or as all of it."""
        return (self.mlp_layers is None or layer in self.mlp_layers) and \
            (not self.ffnless_layers or layer not in self.ffnless_layers)

    def has_attention(self, layer: int) -> bool:
        """Whether layer `layer` attends (and so keeps keys and values in a KV cache)."""
        in_place = self.is_conv(layer) or self.is_delta(layer) or self.is_ssm(layer) and not self.family.parallel_ssm
        in_place = in_place or bool(self.family.rwkv)  # (RWKV's time mix: lowtune.rwkv)
        return self.has_mixer(layer) and not in_place and layer not in self.linear_attention_layers

    @property
    def stateful_layers(self) -> tuple[int, ...]:
        """The layers that keep a recurrent state in the cache in place of keys and values (LFM2's short
        convolutions, Mamba2 layers, Gated DeltaNets), which the compiled CPU decoder and captured decode
        steps do not keep; every RWKV layer (its token shift and wkv state)."""
        if self.family.rwkv:
            return tuple(range(self.n_layers))
        return tuple(sorted(self.conv_layers + self.ssm_layers + self.delta_layers))

    def indexer_source(self, layer: int) -> int:
        """The layer whose lightning indexer picks layer `layer`'s keys: itself, or for GLM-5.2's shared layers
        the last before it with one (ModelConfig.indexer_shared)."""
        while layer in self.indexer_shared:
            layer -= 1
        return layer

    def is_delta(self, layer: int) -> bool:
        """Whether layer `layer` is a Gated DeltaNet in place of attention (Qwen3.5)."""
        return layer in self.delta_layers

    @property
    def ssm_conv_channels(self) -> int:
        """The DeltaNet convolution's channels: q, k and v (attn_qkv's rows)."""
        return 2 * self.ssm_k_heads * self.ssm_head_dim + self.ssm_inner

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window > 0 and (self.swa_layers is None or layer in self.swa_layers)

    def window(self, layer: int) -> int:
        """Positions layer `layer` attends to (0: all before it)."""
        return self.sliding_window if self.is_sliding(layer) else 0

    def l2_normed(self, layer: int) -> bool:
        """Whether layer `layer` RMS-norms q and k without a weight after RoPE (Llama 4's RoPE layers,
        not Maverick's: llama.cpp's use_kq_norm)."""
        return self.family.l2_qk_norm and self.n_experts != 128 and self.rope_kind(layer) != NO_ROPE

    def rope_kind(self, layer: int) -> int:
        """0: the global RoPE; 1: the sliding layers' own (another base or scaling); NO_ROPE: none
        (the family's NoPE layers)."""
        dense_lead = self.family.rope_dense_lead and self.n_experts and not self.has_experts(layer)
        if self.no_rope or not self.family.rotates(layer) or (
                self.family.nope_global and self.sliding_window and not self.is_sliding(layer) and not dense_lead):
            return NO_ROPE
        own = (self.rope_theta_swa not in (None, self.rope_theta)
               or self.rope_linear_scale_swa not in (None, self.rope_linear_scale) or self.swa_unscaled_yarn)
        return int(own and self.is_sliding(layer))

    @property
    def swa_unscaled_yarn(self) -> bool:
        """Whether the sliding layers leave out the global layers' YaRN (OLMo 3): their RoPE is plain,
        its magnitude 1."""
        return self.rope_yarn_factor > 1.0 and not self.family.swa_rope_scaled

    @classmethod
    def from_gguf_metadata(cls, md: Mapping, tensor_names: Collection[str] | None = None) -> "ModelConfig":
        """Read `general.architecture` and the `<arch>.*` keys of a GGUF file's metadata, with
        llama.cpp's defaults where a key is absent. Refuses (ValueError) what lowtune cannot run.
        tensor_names: the file's tensors, where the family finds its expert layers by them
        (Family.moe_by_router: ModelConfig.routed; without them every layer is an expert layer)."""
        fam = family_of(md)
        arch = fam.arch
        if fam.norm_switch and f"{arch}.attention.layer_norm_rms_epsilon" in md:
            raise ValueError(f"this {arch} file norms with RMSNorm (attention.layer_norm_rms_epsilon, transformers' "
                             "rms_norm_eps), which lowtune does not run; its files with LayerNorm it does")

        def get(key, default=ABSENT, kind=int, low=None):
            return key_number(md, f"{arch}.{key}", default, kind, low)

        n_layers, nextn = get("block_count", low=1), get("nextn_predict_layers", 0)
        if n_layers > MAX_LAYERS or nextn >= n_layers:
            raise ValueError(f"GGUF metadata {arch}.block_count is {n_layers} ({nextn} of them NextN layers): "
                             f"llama.cpp loads 1 to {MAX_LAYERS} layers, so the file is damaged; {RECONVERT}")
        blocks = _per_layer_blocks(md, arch, n_layers) if fam.per_layer_blocks else {}
        # (one query head count, or one a layer where all are the same: Laguna's files, 0 in the layers without
        # attention: PLaMo 2's; or each layer's own: Deci's and OpenELM's blocks)
        dim = get("embedding_length", low=1)
        n_heads = blocks.pop("n_heads", None) or _one_per_layer(md, f"{arch}.attention.head_count") \
            or get("attention.head_count")
        if not n_heads and not (fam.attention_free or fam.rwkv):
            raise ValueError(f"GGUF metadata {arch}.attention.head_count is 0, where a {arch} model attends with at "
                             f"least one head: the file is damaged; {RECONVERT}")
        rwkv = _rwkv_fields(md, fam, dim) if fam.rwkv else {}
        if rwkv:  # (the file's head_count is 0: RWKV's heads are wkv.head_size wide)
            n_heads = dim // get("wkv.head_size")
        if nextn and fam.nextn_layers:  # (the last blocks: llama.cpp's graph skips them, Family.nextn_layers)
            n_layers -= nextn
        elif nextn:
            raise ValueError(f"this {arch} file has multi-token-prediction (NextN) layers, which lowtune does not "
                             "run; a file converted without them is")
        loops = get("num_loops", 1) or 1
        if loops > 1:
            raise ValueError(f"this {arch} file runs its {n_layers} layers {loops} times over (num_loops: Nanbeige's "
                             "looped layers, each pass with its own K/V), which lowtune does not run; a file of one "
                             "loop it does")
        if fam.rope_block_counts and n_layers not in fam.rope_block_counts:
            raise ValueError(f"this {arch} file has {n_layers} layers; llama.cpp rotates q and k only at "
                             f"{' or '.join(map(str, fam.rope_block_counts))} layers (Baichuan 7B) and runs the "
                             "others with ALiBi (Baichuan 13B's 40) or no positions, which lowtune does not run")
        # (no heads, no key length: Mamba-2's 0)
        head_dim = get("attention.key_length", dim // n_heads if n_heads else 0, low=1 if n_heads else None)
        vocab = md.get(f"{arch}.vocab_size")
        if vocab is None:
            tokens = md.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise ValueError(f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
            vocab = len(tokens)
        vocab = checked_number(f"{arch}.vocab_size", vocab, low=1)

        scaling = md.get(f"{arch}.rope.scaling.type", "none")
        linear_scale, yarn, log_mul = 1.0, 0.0, 0.0
        attn_factor = get("rope.scaling.attn_factor", 1.0, kind=float)
        if scaling == "linear":
            linear_scale = get("rope.scaling.factor", 0.0, kind=float) or 1.0
        elif scaling == "yarn":
            yarn = get("rope.scaling.factor", 0.0, kind=float) or 1.0
            if fam.yarn_keys or fam.mla:
                log_mul = get("rope.scaling.yarn_log_multiplier", 0.0, kind=float)
            if fam.indexer_types:
                raise ValueError(f"this {arch} file scales RoPE by YaRN, which GLM-5's checkpoints do not and lowtune "
                                 f"does not run for {arch} (llama.cpp's graph reads no yarn_log_multiplier for it)")
            if fam.mla_yarn_mscale:  # (llama.cpp's deepseek2: magnitude 1 where the file gives mscale_all_dim)
                attn_factor *= 1.0 if log_mul else yarn_magnitude(yarn)
            elif fam.mla:  # (the others' mscale 1: m(1) / m(mscale_all_dim), the file's 0.1 · mscale_all_dim)
                attn_factor *= yarn_magnitude(yarn, log_mul / 0.1)
            else:
                attn_factor *= yarn_magnitude(yarn, log_mul)
        elif scaling not in ("none", "longrope", None):
            raise ValueError(f"rope scaling {scaling!r} is not supported ({arch}.rope.scaling.type: none, linear, "
                             "yarn, LongRoPE's rope_factors and Llama 3's rope_freqs are)")
        if f"{arch}.rope.scale_linear" in md:  # older GGUFs
            linear_scale = get("rope.scale_linear", kind=float)
        context = get("context_length", 2048)

        window = get("attention.sliding_window", fam.default_window) or 0
        if fam.windowless or fam.window_block_counts and n_layers not in fam.window_block_counts:
            window = 0  # (llama.cpp ignores the file's window there)
        if fam.chunked_attention:
            if not window:
                raise ValueError(f"this {arch} file turns chunked attention off (attention.sliding_window = 0: "
                                 "every layer global and rotated, as MobileLLM), which lowtune does not run")
            window = fam.default_window  # (llama.cpp's fixed chunk, whatever the file gives)
        swa_layers = None
        if window > 0:
            # llama.cpp's pattern: one flag per layer, or a period p (0: every layer slides;
            # p > 0: layer i slides when i % p < p - 1, so every p-th layer is global)
            pattern = md.get(f"{arch}.attention.sliding_window_pattern", fam.swa_period)
            if isinstance(pattern, (list, tuple)):
                flags = _per_layer(md, arch, "attention.sliding_window_pattern", n_layers)
                swa_layers = tuple(i for i, s in enumerate(flags) if s)
            elif checked_number(f"{arch}.attention.sliding_window_pattern", pattern) > 0:
                p = int(pattern)  # (Cohere2 MoE: the first of every p layers global, llama.cpp's dense_first)
                slides = (lambda i: i % p != 0) if fam.swa_global_first else (lambda i: i % p < p - 1)
                swa_layers = tuple(i for i in range(n_layers) if slides(i))
        theta = get("rope.freq_base", 10000.0, kind=float)
        # (Mellum's sliding layers: the global base, whatever the file gives, as llama.cpp's graph rotates them)
        theta_swa = None if fam.swa_rope_global_base else \
            get("rope.freq_base_swa", fam.swa_rope_theta, kind=float)
        if theta_swa is not None and float(theta_swa) == theta and fam.swa_rope_theta is None:
            theta_swa = None  # (OLMo 3's converter writes the global base again)
        if yarn and theta_swa is not None and float(theta_swa) != theta:
            raise ValueError(f"YaRN with a separate RoPE base for sliding layers ({arch}) is not supported")

        def cap(key, default):
            # families without a soft-cap ignore the key, as llama.cpp does
            return 0.0 if default is None else (get(key, default, kind=float) or 0.0)

        scale = 1.0 / head_dim if fam.mup_query_scale else fam.query_scale
        if fam.wide_query_scale_layers and n_layers == fam.wide_query_scale_layers:
            scale = 1.0 / math.sqrt(dim // n_heads)  # llama.cpp's rule for Gemma 27B
        latent = {}
        if fam.mla:
            latent = _latent_attention(md, arch, dim // n_heads)
            head_dim = latent.pop("head_dim")
            # mscale² / √key_length, mscale the rotation's magnitude × m(mscale_all_dim), which the
            # file keeps as 0.1 · mscale_all_dim (llama.cpp's deepseek2)
            scale = (attn_factor * yarn_mscale(yarn, log_mul / 0.1)) ** 2 / math.sqrt(head_dim)
        if fam.indexer:
            latent.update(indexer_heads=get("attention.indexer.head_count"),
                          indexer_head_dim=get("attention.indexer.key_length"),
                          indexer_top_k=get("attention.indexer.top_k"))
        if fam.indexer_types:  # (without the key: all full below GLM-5.2's context, its pattern from there)
            full = _per_layer(md, arch, "attention.indexer.types", n_layers, [
                context < 1048576 or i < 2 or (i - 2) % 4 == 0 for i in range(n_layers)])
            latent["indexer_shared"] = tuple(i for i in range(n_layers) if not full[i])
        yarn_keys = {}
        if fam.yarn_keys:  # as llama.cpp's mistral3 reads them
            yarn_keys = {"rope_yarn_beta_fast": get("rope.scaling.yarn_beta_fast", 32.0, kind=float),
                         "rope_yarn_beta_slow": get("rope.scaling.yarn_beta_slow", 1.0, kind=float),
                         "attn_temperature": get("attention.temperature_scale", 0.0, kind=float)}
        multipliers = {}
        if fam.logit_multiplier:  # ModelConfig divides by logit_scale
            multipliers["logit_scale"] = 1.0 / (get("logit_scale", 1.0, kind=float) or 1.0)
        if fam.file_scales:  # (Grok's; llama.cpp takes Grok-1's for an older file without them)
            missing = [k for k in ("embedding_scale", "attention.output_scale", "logit_scale")
                       if f"{arch}.{k}" not in md]
            if missing:
                raise ValueError(f"this {arch} file lacks {arch}.{missing[0]} (an older conversion), which lowtune "
                                 "needs; convert the checkpoint again with llama.cpp's convert_hf_to_gguf.py")
            if f"{arch}.expert_feed_forward_length" in md:
                raise ValueError(f"this {arch} file gives expert_feed_forward_length: Grok 2's layout (a dense FFN "
                                 "beside the experts), which lowtune does not run; Grok-1's files it does")
            multipliers["embedding_scale"] = get("embedding_scale", kind=float)
            scale = get("attention.output_scale", kind=float)
        experts = {}
        if fam.moe and get("expert_count", 0):  # (family_of refused experts elsewhere)
            if get("moe_latent_size", 0):
                raise ValueError(f"this {arch} file routes its experts through a latent (moe_latent_size: Nemotron 3 "
                                 "Super's ffn_latent_down/up), which lowtune does not run")
            experts = {"n_experts": get("expert_count", low=1),
                       "n_experts_used": _one_per_layer(md, f"{arch}.expert_used_count"),
                       "expert_ffn_dim": _one_per_layer(md, f"{arch}.expert_feed_forward_length"),
                       "shared_expert_ffn_dim": get("expert_shared_feed_forward_length", 0)}
            default = fam.moe_gating
            if fam.mla and n_layers in (47, 48) and int(vocab) == 154880:
                default = 2  # (llama.cpp's rule for GLM-4.7 Flash files written without expert_gating_func)
            gating = get("expert_gating_func", 0) or default
            if gating not in (1, 2, 3):
                raise ValueError(f"this {arch} file routes experts by gating function {gating} (expert_gating_func); "
                                 "lowtune runs softmax (1) and sigmoid (2: LFM2-MoE's, DeepSeek-V3's) routing and the "
                                 "softmax of the top k (3, gpt-oss's) only")
            experts["expert_gating"] = gating
            if fam.moe_adjugate:  # (Grove MoE's adjugate experts, as llama.cpp's grovemoe reads them)
                experts.update(experts_per_group=get("experts_per_group"),
                               adjugate_ffn_dim=get("expert_chunk_feed_forward_length", 0),
                               expert_group_scale=get("expert_group_scale", kind=float))
            shared = get("expert_shared_count", 0)
            if fam.moe_shared_expert:
                experts["shared_expert_ffn_dim"] = experts["expert_ffn_dim"]
            if fam.moe_shared_ffn_width and not experts["shared_expert_ffn_dim"]:
                experts["shared_expert_ffn_dim"] = _one_per_layer(md, f"{arch}.feed_forward_length")
            if fam.moe_weight_keys:  # (DeepSeek's keys; a shared expert's width where the file gives it)
                width = experts["expert_ffn_dim"] or _one_per_layer(md, f"{arch}.feed_forward_length")
                experts["shared_expert_ffn_dim"] = experts["shared_expert_ffn_dim"] or shared * width
                if not fam.kda:  # (kimi-linear: the family's moe_renorm, as llama.cpp's graph)
                    experts["expert_renorm"] = bool(md.get(f"{arch}.expert_weights_norm", False))
                experts["expert_weights_scale"] = get("expert_weights_scale", 0.0, kind=float) or 1.0
            groups = get("expert_group_count", 0)
            if groups > 1:
                experts.update(expert_groups=groups,
                               expert_groups_used=get("expert_group_used_count", 0))
            if shared and not experts["shared_expert_ffn_dim"]:
                raise ValueError(f"this {arch} file counts its shared experts (expert_shared_count, DeepSeek's "
                                 "layout) without giving their width, which lowtune does not run")
            # llama.cpp's rule: dense layers first, then experts in every step-th layer
            lead = get("leading_dense_block_count", 0)
            step = get("interleave_moe_layer_step", fam.moe_step) or fam.moe_step
            if lead or step > 1:
                experts["moe_layers"] = tuple(i for i in range(n_layers) if i >= lead and (i + 1) % step == 0)
        if fam.multipliers:  # Granite's scales; 0 or absent: the family's default or none, as llama.cpp reads them
            scales = {k: get(key, 0.0, kind=float) for k, key in (
                ("attn_scale", "attention.scale"), ("embedding_scale", "embedding_scale"),
                ("residual_scale", "residual_scale"), ("logit_scale", "logit_scale"))}
            scale = scales.pop("attn_scale")
            defaults = fam.scale_defaults(n_layers, dim) if fam.scale_defaults else {}
            multipliers = {k: v or defaults.get(k, 1.0) for k, v in scales.items()}
            if md.get(f"{arch}.rope.scaling.finetuned", True) is False and not fam.rope_switch:
                raise ValueError(f"this {arch} file switches RoPE off (rope.scaling.finetuned = false), "
                                 "which lowtune does not support")
        elif fam.scale_defaults:  # (scales llama.cpp's graph fixes, whatever the file says: MiniCPM3)
            multipliers = fam.scale_defaults(n_layers, dim)
        xielu = ()
        if fam.activation == "xielu":  # (llama.cpp's keys carry no architecture prefix)
            def per_layer(key):
                v = md.get(key)
                if v is None:
                    raise ValueError(f"GGUF metadata lacks {key} (xIELU's scalars), which {arch} needs; llama.cpp's "
                                     "converter writes them")
                v = [checked_number(key, x, float) for x in (v if isinstance(v, (list, tuple)) else [v] * n_layers)]
                if len(v) != n_layers:
                    raise ValueError(f"{key} holds {len(v)} values for {n_layers} layers")
                return v
            xielu = tuple(zip(*(per_layer(f"xielu.{k}") for k in XIELU_KEYS)))
        # (one width, or one a layer: Gemma 3n's, Nemotron-H's 0 in its mixer layers)
        ffn = md.get(f"{arch}.feed_forward_length")
        ffn = _per_layer(md, arch, "feed_forward_length", n_layers) if isinstance(ffn, (list, tuple)) else \
            get("feed_forward_length")
        parts = {}
        if fam.attention_free:  # (no FFN in any layer: Mamba-2)
            parts["mlp_layers"] = ()
        if fam.layer_widths:  # (each layer's own, ModelConfig.at_layer; the config's fields a global layer's)
            sliding = set(range(n_layers) if swa_layers is None else swa_layers) if window > 0 else set()
            parts["layer_widths"] = _layer_widths(md, arch, n_layers, sliding)
            first_global = next((i for i in range(n_layers) if i not in sliding), 0)
            head_dim, global_kv_heads, ffn, _ = parts["layer_widths"][first_global]
        if blocks:  # (each layer's own parts and widths, ModelConfig.at_layer; the config's fields the widest)
            ffn = max(w[2] for w in blocks["layer_widths"])
            parts.update(blocks)
        if fam.ffn_length_both_halves:  # (Qwen's file counts gate and up: llama.cpp's n_ff / 2)
            ffn = int(ffn) // 2
        if fam.layer_parts:  # (a width for the MLP layers, 0 for the mixers: Nemotron-H)
            widths = list(ffn)[:n_layers] if isinstance(ffn, (list, tuple)) else [int(ffn)] * n_layers
            parts["mlp_layers"] = tuple(i for i, f in enumerate(widths) if f)
            ffn = [f for f in widths if f] or [0]
            if experts:  # (Nemotron-H MoE: its MLP layers are the experts')
                experts["moe_layers"] = parts["mlp_layers"]
        if isinstance(ffn, (list, tuple)):  # one width a layer (Gemma 3n's files)
            if len(set(ffn)) != 1:
                raise ValueError(f"this {arch} file gives its layers FFNs of different widths {sorted(set(ffn))}, "
                                 "which lowtune does not run")
            ffn = ffn[0]
        if fam.moe_residual:  # (Arctic: feed_forward_length is the experts' width, the dense FFN D wide)
            if not experts:
                raise ValueError(f"this {arch} file has no experts (expert_count), which an {arch} model has")
            experts["expert_ffn_dim"] = experts["expert_ffn_dim"] or int(ffn)
            ffn = dim
        altup = {}
        if fam.altup or fam.layer_widths:  # (Gemma 3n and 4: per-layer inputs, K/V reused by the last layers)
            shared = get("attention.shared_kv_layers", 0)
            if shared >= n_layers:
                raise ValueError(f"GGUF metadata {arch}.attention.shared_kv_layers is {shared}: the layers that reuse "
                                 f"K/V must be fewer than the {n_layers} there are; {RECONVERT}")
            altup = {"per_layer_dim": get("embedding_length_per_layer_input", ABSENT if fam.altup else 0),
                     "kv_layers": n_layers - shared if shared else 0}
        if fam.altup:
            altup.update(altup_inputs=get("altup.num_inputs"), altup_active=get("altup.active_idx"),
                         sparsity_std=tuple(_per_layer(md, arch, "activation_sparsity_scale", n_layers, kind=float)
                                           if f"{arch}.activation_sparsity_scale" in md else ()))
        alibi = {"fixed": ALIBI_FIXED_MAX_BIAS, "": 0.0}.get(fam.alibi)
        if alibi is None:
            alibi = get("attention.max_alibi_bias", 0.0, kind=float)
        rope_dim = min(get("rope.dimension_count", head_dim), head_dim)
        swa_rope_dim = get("rope.dimension_count_swa", rope_dim)
        if not fam.layer_widths and window > 0 and swa_rope_dim != rope_dim:  # (Gemma 4's: its layer widths)
            raise ValueError(f"this {arch} file rotates its sliding layers over {swa_rope_dim} dims of each head and "
                             f"the others over {rope_dim} (rope.dimension_count_swa: Laguna-XS.2's), which lowtune "
                             "does not run")
        if fam.layer_widths:
            n_kv_heads, conv = global_kv_heads, {}
        elif fam.kv_by_layer:  # (each layer's own count, ModelConfig.at_layer; values of their own width)
            counts = _per_layer(md, arch, "attention.head_count_kv", n_layers, n_heads, low=1)
            n_kv_heads, conv = counts[0], {}
            if len(set(counts)) > 1:
                parts["layer_widths"] = tuple((head_dim, k, int(ffn), rope_dim) for k in counts)
            parts["value_head_dim"] = get("attention.value_length", head_dim)
            parts["attn_value_scale"] = get("attention.value_scale", 1.0, kind=float) or 1.0
        elif blocks:  # (Deci's and OpenELM's: _per_layer_blocks)
            n_kv_heads, conv = blocks["layer_widths"][0][1], {}
        else:
            n_kv_heads, conv = _kv_heads_and_conv_layers(md, fam, n_layers, n_heads, parts.get("mlp_layers", ()))
        delta = _delta_net_fields(md, fam, n_layers) if fam.delta_net or fam.kda else {}
        if f"{arch}.{fam.eps_key}" not in md and f"{arch}.attention.layer_norm_epsilon" in md:
            raise ValueError(f"this {arch} file gives its norms' epsilon under LayerNorm's key "
                             "(attention.layer_norm_epsilon, as llama.cpp's converter writes Qwen's "
                             f"layer_norm_epsilon), where llama.cpp's {arch} graph reads {fam.eps_key}, so llama.cpp "
                             "does not load it either: convert the checkpoint with rms_norm_eps added to its "
                             "config.json (its layer_norm_epsilon's value)")
        act = str(md.get(f"{arch}.hidden_activation", "")) if fam.activation_key else ""
        if act not in ("", fam.activation, "relu2"):
            raise ValueError(f"this {arch} file's hidden_activation {act!r} is not one lowtune runs "
                             f"({fam.activation} or relu2)")
        config = cls(
            vocab_size=int(vocab), dim=dim, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=n_heads if fam.mla else n_kv_heads,
            ffn_dim=int(ffn), head_dim=head_dim, rope_dim=rope_dim,
            norm_eps=get(fam.eps_key, kind=float),
            rope_theta=theta, rope_linear_scale=linear_scale, context_length=context, arch=arch,
            sliding_window=window, swa_layers=swa_layers,
            rope_theta_swa=None if theta_swa is None else float(theta_swa),
            rope_linear_scale_swa=None if fam.swa_rope_scaled else 1.0,
            rope_attn_factor=attn_factor, rope_yarn_factor=yarn, **yarn_keys,
            rope_orig_context=get("rope.scaling.original_context_length", 0),
            attn_scale=scale, attn_softcap=cap("attn_logit_softcapping", fam.attn_softcap),
            clamp_qkv=get("attention.clamp_kqv", 0.0, kind=float) if fam.qkv_clamp else 0.0,
            final_softcap=cap("final_logit_softcapping", fam.final_softcap), **multipliers, **experts, **conv,
            **latent, **altup, **delta, **parts, **rwkv, xielu=xielu, alibi_max_bias=alibi,
            mlp_activation="" if act == fam.activation else act,
            sequential=fam.parallel_key and not md.get(f"{arch}.use_parallel_residual", True),
            no_rope=fam.nope or fam.rope_switch and md.get(f"{arch}.rope.scaling.finetuned", True) is False)
        return config if tensor_names is None else config.routed(tensor_names)

    def routed(self, tensor_names: Collection[str]) -> "ModelConfig":
        """Family.moe_by_router: the experts in the layers whose tensors hold a router (ffn_gate_inp), a dense FFN
        in the others, as llama.cpp finds them; this config where the family counts its layers otherwise."""
        if not (self.family.moe_by_router and self.n_experts):
            return self
        return replace(self, moe_layers=tuple(i for i in range(self.n_layers)
                                              if f"blk.{i}.ffn_gate_inp.weight" in tensor_names))

    def check(self) -> None:
        self.family  # noqa: B018 (raises for an unsupported arch)
        if self.layer_widths and len(self.layer_widths) != self.n_layers:
            raise ValueError(f"widths for {len(self.layer_widths)} layers in a model of {self.n_layers}")
        for i in range(self.n_layers if self.layer_widths else 0):
            self.at_layer(i).check()
        if not self.family.attention_free and self.n_heads % self.n_kv_heads:
            raise ValueError(f"head_count {self.n_heads} is not a multiple of head_count_kv {self.n_kv_heads}")
        if self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise ValueError(f"rope dimension {self.rope_dim} must be even and at most head_dim {self.head_dim}")
        if self.n_experts and not 0 < self.n_experts_used <= self.n_experts:
            raise ValueError(f"{self.n_experts_used} experts used of {self.n_experts} (expert_used_count of "
                             f"expert_count): must be 1 to {self.n_experts}")
        if (self.family.activation == "xielu") != (len(self.xielu) == self.n_layers):
            raise ValueError(f"xIELU scalars for {len(self.xielu)} layers in a {self.arch} model of {self.n_layers}")
        if self.swa_layers is not None and any(not 0 <= i < self.n_layers for i in self.swa_layers):
            raise ValueError(f"sliding layers {self.swa_layers} name layers beyond the {self.n_layers} there are")
        if self.expert_groups and (self.n_experts % self.expert_groups
                                   or not 0 < self.expert_groups_used <= self.expert_groups):
            raise ValueError(f"{self.n_experts} experts in {self.expert_groups} groups, {self.expert_groups_used} "
                             "used (expert_count, expert_group_count, expert_group_used_count): the groups must "
                             "divide the experts, and 1 to all of them be used")
        if self.kv_lora_rank and self.rope_dim >= self.head_dim:
            raise ValueError(f"latent attention's heads of {self.head_dim} dims (attention.key_length_mla) must "
                             f"have more than the {self.rope_dim} RoPE dims (rope.dimension_count)")
        if self.indexer_heads and (not self.q_lora_rank or self.indexer_head_dim < self.rope_dim
                                   or self.indexer_top_k < 1):
            raise ValueError(f"a lightning indexer of {self.indexer_heads} heads of {self.indexer_head_dim} dims "
                             f"keeping {self.indexer_top_k} keys, beside q's latent of {self.q_lora_rank}: it reads "
                             f"q's latent, its heads take the {self.rope_dim} RoPE dims, and it keeps at least one key "
                             "(attention.q_lora_rank, attention.indexer.head_count, key_length and top_k)")
        if self.indexer_shared and (0 in self.indexer_shared or not self.indexer_heads):
            raise ValueError(f"layers {self.indexer_shared} reuse an earlier layer's indexer: the first layer must "
                             "have its own (attention.indexer.types, attention.indexer.head_count)")
        if self.ssm_layers and (self.ssm is None or not (self.family.mamba2 or self.family.mamba1)):
            raise ValueError(f"{self.arch} has no Mamba2 layers (Granite 4's hybrids have)")
        if (self.mlp_layers is not None) != (self.family.layer_parts or self.family.attention_free) or any(
                not 0 <= i < self.n_layers for i in self.mlp_layers or ()):
            raise ValueError(f"MLP-only layers {self.mlp_layers} in a {self.arch} model of {self.n_layers} layers "
                             "(Nemotron-H's files give them, as the layers with an FFN width)")
        if self.conv_layers and not self.family.short_conv:
            raise ValueError(f"{self.arch} has no short-convolution layers (LFM2 has)")
        if self.conv_layers and (self.conv_kernel < 2 or any(not 0 <= i < self.n_layers for i in self.conv_layers)):
            raise ValueError(f"short-convolution layers {self.conv_layers} of width {self.conv_kernel}: the width "
                             f"must be at least 2 and the layers among the {self.n_layers} there are "
                             "(shortconv.l_cache, attention.head_count_kv)")
        if self.delta_layers and not (self.family.delta_net or self.family.kda):
            raise ValueError(f"{self.arch} has no Gated DeltaNet layers (Qwen3.5 has)")
        if self.family.kda and self.ssm_k_heads != self.ssm_v_heads:
            raise ValueError(f"Kimi Delta Attention of {self.ssm_k_heads} q/k heads and {self.ssm_v_heads} value "
                             "heads: llama.cpp's kimi-linear runs as many of each")
        if self.delta_layers and (self.ssm_conv_kernel < 2 or not self.ssm_k_heads or not self.ssm_v_heads
                                  or self.ssm_v_heads % self.ssm_k_heads or self.ssm_inner % self.ssm_v_heads):
            raise ValueError(f"Gated DeltaNet of {self.ssm_k_heads} q/k heads, {self.ssm_v_heads} value heads "
                             f"{self.ssm_inner} wide and a convolution of width {self.ssm_conv_kernel}: the value "
                             "heads must be a multiple of the q/k heads, the width of the value heads, and the "
                             "convolution at least 2 wide (ssm.group_count, ssm.time_step_rank, ssm.inner_size, "
                             "ssm.conv_kernel)")


def _one_per_layer(md: Mapping, key: str) -> int:
    """A key's number, or the one number of its per-layer array (0 in the layers it does not apply to), or a
    ValueError where the layers' numbers differ (Nemotron 3 Puzzle's experts)."""
    v = md.get(key, 0) or 0
    if isinstance(v, (list, tuple)):
        values = sorted({x for x in (checked_number(key, x) for x in v) if x})
        if len(values) > 1:
            raise ValueError(f"this file gives its layers different {key} {values}, which lowtune does not run")
        v = values[0] if values else 0
    return checked_number(key, v)


def _per_layer(md: Mapping, arch: str, key: str, n_layers: int, default=None, kind: type = int,
               low: int | None = None) -> list:
    """The file's `key` for each of n_layers layers: its array's first n_layers, or its one number repeated
    (checked_number's kind and low: a ValueError naming the key where one is not a number of that kind, or the
    array is shorter than the layers)."""
    v = md.get(f"{arch}.{key}", default)
    if not isinstance(v, (list, tuple)):
        return [key_number(md, f"{arch}.{key}", ABSENT if default is None else default, kind, low)] * n_layers
    if len(v) < n_layers:
        raise ValueError(f"GGUF metadata {arch}.{key} holds {len(v)} values for the {n_layers} layers of "
                         f"{arch}.block_count: the file is damaged; {RECONVERT}")
    return [checked_number(f"{arch}.{key}", x, kind, low) for x in v[:n_layers]]


def _layer_widths(md: Mapping, arch: str, n_layers: int, sliding: set[int]) -> tuple[tuple[int, int, int, int], ...]:
    """Each layer's (head_dim, n_kv_heads, ffn_dim, rope_dim) as llama.cpp's gemma4 reads them: key_length and
    rope.dimension_count for the global layers, key_length_swa and rope.dimension_count_swa for the sliding
    ones; head_count_kv and feed_forward_length one number or one a layer."""
    def widths(suffix):
        head = key_number(md, f"{arch}.attention.key_length{suffix}")
        if key_number(md, f"{arch}.attention.value_length{suffix}", head) != head:
            raise ValueError(f"this {arch} file gives values (value_length{suffix}) another width than keys "
                             f"(key_length{suffix}), "
                             "which llama.cpp's gemma4 refuses")
        return head, min(key_number(md, f"{arch}.rope.dimension_count{suffix}", head), head)

    full, swa = widths(""), widths("_swa")
    kv, ffn = _per_layer(md, arch, "attention.head_count_kv", n_layers, low=1), \
        _per_layer(md, arch, "feed_forward_length", n_layers)
    return tuple(((swa if i in sliding else full)[0], kv[i], ffn[i], (swa if i in sliding else full)[1])
                 for i in range(n_layers))


def _per_layer_blocks(md: Mapping, arch: str, n_layers: int) -> dict:
    """Deci's and OpenELM's layers as llama.cpp reads their converters' per-layer head_count, head_count_kv and
    feed_forward_length: each layer's own query heads, KV heads and FFN width; no heads, no attention; heads
    without KV heads, attn_output alone on the normed input in attention's place; no FFN width, no FFN (Deci's).
    ModelConfig's fields: n_heads (the first attending layer's), each layer's widths and heads (a layer without
    attention the KV heads of the first with it) and its layers of each kind."""
    heads = _per_layer(md, arch, "attention.head_count", n_layers)
    kv = _per_layer(md, arch, "attention.head_count_kv", n_layers, heads)
    ffn = _per_layer(md, arch, "feed_forward_length", n_layers)
    n_heads = next((h for h in heads if h), 0)
    dim = key_number(md, f"{arch}.embedding_length")
    head_dim = key_number(md, f"{arch}.attention.key_length", dim // max(n_heads, 1))
    rope_dim = min(key_number(md, f"{arch}.rope.dimension_count", head_dim), head_dim)
    for i in range(n_layers):
        if heads[i] and not ffn[i]:
            raise ValueError(f"layer {i} of this {arch} file {'attends' if kv[i] else 'runs a linear'} without an "
                             f"FFN (attention.head_count {heads[i]}, feed_forward_length 0), whose output llama.cpp's "
                             "deci graph drops (it skips the rest of a layer without an FFN) where the checkpoint adds "
                             "it; lowtune does not run a layer the two disagree on")
    kv_heads = next((k for k in kv if k), n_heads)
    return {"n_heads": n_heads, "layer_heads": tuple(h or n_heads for h in heads) if len(set(heads) - {0}) > 1 else (),
            "layer_widths": tuple((head_dim, kv[i] or kv_heads, ffn[i], rope_dim) for i in range(n_layers)),
            "attentionless_layers": tuple(i for i in range(n_layers) if not heads[i]),
            "linear_attention_layers": tuple(i for i in range(n_layers) if heads[i] and not kv[i]),
            "ffnless_layers": tuple(i for i in range(n_layers) if not ffn[i])}


def _delta_net_fields(md: Mapping, fam: Family, n_layers: int) -> dict:
    """The Gated DeltaNet fields of ModelConfig from a file's metadata (llama.cpp's rule: the layers
    attention.recurrent_layers marks, else all but every full_attention_interval-th, 4 by default)."""
    arch = fam.arch
    if fam.kda:  # (Kimi Linear: the layers with no KV heads; as many q/k heads as value heads, kda.head_dim wide)
        return _kda_fields(md, arch, n_layers)
    every = key_number(md, f"{arch}.full_attention_interval", 4) or 4
    flags = _per_layer(md, arch, "attention.recurrent_layers", n_layers,
                       [(i + 1) % every != 0 for i in range(n_layers)])
    keys = {"ssm_conv_kernel": "ssm.conv_kernel", "ssm_k_heads": "ssm.group_count", "ssm_v_heads": "ssm.time_step_rank",
            "ssm_head_dim": "ssm.state_size", "ssm_inner": "ssm.inner_size"}
    missing = [f"{arch}.{k}" for k in keys.values() if f"{arch}.{k}" not in md]
    if missing:
        raise ValueError(f"GGUF metadata lacks {missing}, which a {arch} model's Gated DeltaNet layers need")
    return {"delta_layers": tuple(i for i, r in enumerate(flags) if r),
            **{f: key_number(md, f"{arch}.{k}") for f, k in keys.items()}}


def _rwkv_fields(md: Mapping, fam: Family, dim: int) -> dict:
    """RWKV's fields of ModelConfig (its low-rank widths, RWKV-6's halving) from a file's metadata, which must give
    heads that divide the width and the two token shifts (time mix's and channel mix's) llama.cpp's graph runs."""
    arch = fam.arch
    ranks = [f"{arch}.attention.{k}_lora_rank" for k in RWKV7_LORA_RANK_KEYS] if fam.rwkv == 7 else \
        [f"{arch}.time_mix_extra_dim", f"{arch}.time_decay_extra_dim"]
    keys = [f"{arch}.wkv.head_size"] + ranks
    missing = [k for k in keys if k not in md]
    if missing:
        raise ValueError(f"GGUF metadata lacks {missing}, which a {arch} model needs")
    head = key_number(md, keys[0])
    if head < 1 or dim % head:
        raise ValueError(f"wkv.head_size {head} does not divide the width {dim}")
    shifts, runs = key_number(md, f"{arch}.token_shift_count", 2), 1 if fam.rwkv_mlp else 2  # (ARWKV-7: the time mix's)
    if shifts != runs:
        raise ValueError(f"this {arch} file keeps {shifts} token shifts a layer; llama.cpp's {arch} graph runs {runs} "
                         "(token_shift_count)")
    return {"wkv_lora_ranks": tuple(key_number(md, k) for k in keys[1:]),
            "rescale_every": key_number(md, f"{arch}.rescale_every_n_layers", 0) if fam.rwkv == 6 else 0}


def _kda_fields(md: Mapping, arch: str, n_layers: int) -> dict:
    """The Kimi Delta Attention fields of ModelConfig, as llama.cpp's kimi-linear reads them: the layers
    whose head_count_kv is 0, head_count heads of kda.head_dim, a convolution of ssm.conv_kernel."""
    keys = [f"{arch}.{k}" for k in ("kda.head_dim", "ssm.conv_kernel")]
    missing = [k for k in keys if k not in md]
    if missing:
        raise ValueError(f"GGUF metadata lacks {missing}, which a {arch} model's Kimi Delta Attention layers need")
    counts = _per_layer(md, arch, "attention.head_count_kv", n_layers, 1)
    heads, dk = key_number(md, f"{arch}.attention.head_count"), key_number(md, keys[0])
    return {"delta_layers": tuple(i for i, k in enumerate(counts) if k == 0),
            "ssm_conv_kernel": key_number(md, keys[1]), "ssm_k_heads": heads, "ssm_v_heads": heads,
            "ssm_head_dim": dk, "ssm_inner": heads * dk}


@dataclass(frozen=True)
class SSMShape:
    """The sizes of a model's Mamba2 layers, as llama.cpp reads them (ssm.* keys): inner [= heads ·
    head_dim] is x's and z's width, state the state per head and position of B and C, groups the
    B/C groups that heads share (and the gated norm's groups), conv_kernel the causal convolution's
    width."""
    inner: int
    state: int
    heads: int
    groups: int
    conv_kernel: int

    @property
    def head_dim(self) -> int:
        return self.inner // self.heads

    @property
    def conv_dim(self) -> int:
        """The convolution's channels: x, B and C."""
        return self.inner + 2 * self.groups * self.state

    @property
    def in_dim(self) -> int:
        """ssm_in's rows: z, x, B, C and dt."""
        return 2 * self.inner + 2 * self.groups * self.state + self.heads

    @classmethod
    def from_gguf_metadata(cls, md: Mapping, arch: str) -> "SSMShape":
        keys = {"inner": "inner_size", "state": "state_size", "heads": "time_step_rank", "groups": "group_count",
                "conv_kernel": "conv_kernel"}
        missing = [f"{arch}.ssm.{k}" for k in keys.values() if f"{arch}.ssm.{k}" not in md]
        if missing:
            raise ValueError(f"GGUF metadata lacks {missing}, which a {arch} model with Mamba2 layers needs")
        shape = cls(**{f: key_number(md, f"{arch}.ssm.{k}", low=1) for f, k in keys.items()})
        if shape.inner % shape.heads or shape.inner % shape.groups or shape.heads % shape.groups \
                or shape.conv_kernel < 2:
            raise ValueError(f"Mamba2 sizes {shape} (ssm.inner_size, time_step_rank, group_count, conv_kernel): "
                             "inner must be a multiple of heads and groups, heads of groups, and the convolution "
                             "at least 2 wide")
        return shape


@dataclass(frozen=True)
class MambaShape:
    """The sizes of a model's Mamba 1 layers, as llama.cpp reads them (ssm.* keys): inner is x's and z's
    width (each channel a head of its own, with its own row of A), state B's and C's, dt_rank the width
    ssm_x gives dt, conv_kernel the causal convolution's; dt_b_c_rms: dt, B and C are RMS-normed without a
    weight (Falcon-Mamba's ssm.dt_b_c_rms). heads: the channels run in that many heads of inner / heads,
    each with one A, dt and D (Family.mamba_heads: PLaMo 2, whose file gives them as time_step_rank and
    dt_rank is llama.cpp's max(64, width / 16)); 0: a head a channel."""
    inner: int
    state: int
    dt_rank: int
    conv_kernel: int
    dt_b_c_rms: bool = False
    heads: int = 0

    @property
    def conv_dim(self) -> int:
        return self.inner

    @property
    def head_dim(self) -> int:
        return self.inner // self.heads if self.heads else 1

    def tensor_shapes(self, dim: int) -> dict[str, tuple[int, ...]]:
        """A layer's tensors after blk.N.: GGUF name -> shape as lowtune reads it (heads: no convolution bias)."""
        if self.heads:
            return {"ssm_in.weight": (2 * self.inner, dim), "ssm_out.weight": (dim, self.inner),
                    "ssm_conv1d.weight": (self.inner, self.conv_kernel),
                    "ssm_x.weight": (self.dt_rank + 2 * self.state, self.inner),
                    "ssm_dt.weight": (self.heads, self.dt_rank), "ssm_dt.bias": (self.heads,),
                    "ssm_a": (self.heads,), "ssm_d": (self.heads,)}
        return {"ssm_in.weight": (2 * self.inner, dim), "ssm_out.weight": (dim, self.inner),
                "ssm_conv1d.weight": (self.inner, self.conv_kernel), "ssm_conv1d.bias": (self.inner,),
                "ssm_x.weight": (self.dt_rank + 2 * self.state, self.inner),
                "ssm_dt.weight": (self.inner, self.dt_rank), "ssm_dt.bias": (self.inner,),
                "ssm_a": (self.inner, self.state), "ssm_d": (self.inner,)}

    @classmethod
    def from_gguf_metadata(cls, md: Mapping, arch: str, heads: bool = False) -> "MambaShape":
        keys = {"inner": "inner_size", "state": "state_size", "dt_rank": "time_step_rank", "conv_kernel": "conv_kernel"}
        missing = [f"{arch}.ssm.{k}" for k in keys.values() if f"{arch}.ssm.{k}" not in md]
        if missing:
            raise ValueError(f"GGUF metadata lacks {missing}, which a {arch} model's Mamba layers need")
        sizes = {f: key_number(md, f"{arch}.ssm.{k}") for f, k in keys.items()}
        if heads:  # (time_step_rank counts the heads; dt's width is llama.cpp's rule, not a key)
            if key_number(md, f"{arch}.ssm.group_count", 0):
                raise ValueError(f"this {arch} file gives its Mamba layers B/C groups (ssm.group_count), which "
                                 f"llama.cpp's {arch} graph refuses: its heads share one B and C")
            width = key_number(md, f"{arch}.embedding_length")
            sizes.update(heads=sizes["dt_rank"], dt_rank=max(64, width // 16))
        shape = cls(**sizes, dt_b_c_rms=bool(md.get(f"{arch}.ssm.dt_b_c_rms", False)))
        if min(shape.inner, shape.state, shape.dt_rank) < 1 or shape.conv_kernel < 2 \
                or shape.heads and shape.inner % shape.heads:
            raise ValueError(f"Mamba sizes {shape} (ssm.inner_size, state_size, time_step_rank, conv_kernel): "
                             "every size must be positive, the convolution at least 2 wide and the width a multiple "
                             "of the heads")
        return shape


def _kv_heads_and_conv_layers(md: Mapping, fam: Family, n_layers: int, n_heads: int,
                              mlp_layers: tuple[int, ...] = ()) -> tuple[int, dict]:
    """(the attention layers' KV head count, the short-convolution or Mamba2 fields of ModelConfig) of a
    file's metadata: head_count_kv is one number, or one a layer where LFM2's file gives 0 to its
    convolution layers (llama.cpp's rule), whose width is shortconv.l_cache, and Granite 4's hybrids' to
    their Mamba2 layers, whose sizes are the ssm.* keys; Nemotron-H's MLP layers (mlp_layers) have 0 too."""
    arch = fam.arch
    if fam.attention_free:  # (every layer a Mamba2 mixer: Mamba-2; Mamba 1's: Mamba)
        return 0, {"ssm_layers": tuple(range(n_layers)), "ssm": _ssm_shape(md, fam)}
    kv_key = f"{arch}.attention.head_count_kv"
    kv = md.get(kv_key, n_heads)
    if fam.parallel_ssm:  # (a Mamba2 mixer beside attention in every layer: Falcon-H1)
        if isinstance(kv, (list, tuple)):
            raise ValueError(f"this {arch} file gives its layers KV head counts {list(kv)}; {arch} attends in "
                             "every layer with one count")
        return checked_number(kv_key, kv, low=1), {"ssm_layers": tuple(range(n_layers)),
                                                     "ssm": SSMShape.from_gguf_metadata(md, arch)}
    if not isinstance(kv, (list, tuple)):
        return checked_number(kv_key, kv, low=1), {}
    counts = _per_layer(md, arch, "attention.head_count_kv", n_layers)
    attention = sorted({k for k in counts if k})
    if len(attention) > 1 or (0 in counts and not (fam.short_conv or fam.mamba2 or fam.mamba1 or fam.kda)):
        raise ValueError(f"this {arch} file gives its layers KV head counts {counts}; lowtune runs one count for "
                         "every attention layer (and layers without attention only as LFM2's short convolutions "
                         "and Granite 4's Mamba2 layers)")
    conv = tuple(i for i, k in enumerate(counts) if k == 0 and i not in mlp_layers)
    if not conv or fam.kda:  # (Kimi Linear's layers without KV heads: _kda_fields')
        return (attention or [n_heads])[0], {}
    if fam.mamba2 or fam.mamba1:  # (Mamba 1's layers: Jamba)
        return (attention or [n_heads])[0], {"ssm_layers": conv, "ssm": _ssm_shape(md, fam)}
    key = f"{arch}.shortconv.l_cache"
    if key not in md:
        raise ValueError(f"GGUF metadata lacks {key}, which a {arch} model with short-convolution layers needs")
    return (attention or [n_heads])[0], {"conv_layers": conv, "conv_kernel": key_number(md, key)}


def _ssm_shape(md: Mapping, fam: Family) -> SSMShape | MambaShape:
    """The sizes of the file's Mamba layers: Mamba2's, or Mamba 1's (Family.mamba1; in heads: mamba_heads)."""
    if fam.mamba1:
        return MambaShape.from_gguf_metadata(md, fam.arch, heads=fam.mamba_heads)
    return SSMShape.from_gguf_metadata(md, fam.arch)


def _latent_attention(md: Mapping, arch: str, head_width: int) -> dict:
    """Multi-head latent attention's widths from a deepseek2 or minicpm3 file's keys, as llama.cpp reads
    them (head_dim: key_length_mla, a head's no-RoPE and RoPE dims; in an older conversion, without the
    _mla keys and with attn_kv_b whole, key_length, and value_length or, where the file gives none as
    MiniCPM3's converter does, llama.cpp's default head_width, the model's width over its heads)."""
    if f"{arch}.attention.kv_lora_rank" not in md:
        raise ValueError(f"GGUF metadata lacks {arch}.attention.kv_lora_rank, which a {arch} model needs")
    if key_number(md, f"{arch}.attention.temperature_scale", 0.0, kind=float):
        raise ValueError(f"this {arch} file scales queries by position (attention.temperature_scale: Mistral Large "
                         "3's attention temperature), which lowtune does not run in latent attention")
    whole = f"{arch}.attention.key_length_mla" not in md
    widths = ("key_length", "value_length") if whole else ("key_length_mla", "value_length_mla")
    needed = widths[:1] if whole else widths  # (value_length: llama.cpp's default where absent)
    for key in needed:
        if f"{arch}.attention.{key}" not in md:
            raise ValueError(f"GGUF metadata lacks {arch}.attention.{key}, which a {arch} model needs")
    return {"head_dim": key_number(md, f"{arch}.attention.{widths[0]}", low=1),
            "value_head_dim": key_number(md, f"{arch}.attention.{widths[1]}", head_width), "kv_b_whole": whole,
            "kv_lora_rank": key_number(md, f"{arch}.attention.kv_lora_rank", low=1),
            "q_lora_rank": key_number(md, f"{arch}.attention.q_lora_rank", 0)}


LlamaConfig = ModelConfig  # the name before other families came


# ----------------------------------------------------------------------------------------------
# Quantized building blocks


def _table(t) -> torch.Tensor:
    """A float32 tensor from a weight read as a matrix (a QTensor) or a tensor (biases per expert)."""
    return (ops.dequantize(t) if isinstance(t, QTensor) else torch.as_tensor(t)).float().contiguous()


def checkpoint(fn: Callable, *args: torch.Tensor):
    """fn(*args), its activations recomputed in backward (torch's non-reentrant checkpoint), keeping
    the random state of the inputs' device: for CPU inputs torch would keep CUDA's where CUDA exists,
    and then fails its check when the first torch.compile of a layer, inside the forward, reads
    (so initializes) CUDA's random state."""
    if any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args):
        return torch_checkpoint.checkpoint(fn, *args, use_reentrant=False)
    default = torch_checkpoint.DefaultDeviceType
    before = default.get_device_type()
    default.set_device_type("cpu")
    try:
        return torch_checkpoint.checkpoint(fn, *args, use_reentrant=False)
    finally:
        default.set_device_type(before)


def _vector(t) -> torch.Tensor:
    """A 1-D float32 tensor from a vector weight (a tensor, or a QTensor of one row)."""
    return _table(t).reshape(-1)


class QLinear(nn.Module):
    """y[..., N] = x[..., K] · deq(W[N, K])ᵀ (+ bias[N]) with W kept packed (any format, F32/F16 included).

    The block bytes are a non-persistent buffer, so `.to(device)` moves them and state_dict()
    leaves them out. `weight` rebuilds the QTensor view. A linear cut out of a fused GGUF tensor
    (attn_qkv, Phi-3's ffn_up) holds a view of its rows and records where they come from:
    fused_from = (fused tensor name, first row, end row)."""

    def __init__(self, weight: QTensor, name: str = "", bias: torch.Tensor | None = None,
                 fused_from: tuple[str, int, int] | None = None):
        super().__init__()
        self.register_buffer("raw", weight.raw, persistent=False)
        self.register_buffer("bias", None if bias is None else _vector(bias), persistent=False)
        self.format = weight.format
        self.out_features, self.in_features = weight.shape
        self.name = name  # GGUF tensor name, e.g. "blk.3.attn_q.weight"
        self.fused_from = fused_from

    @property
    def weight(self) -> QTensor:
        return QTensor(self.raw, self.format, (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ops.qmatmul(x.contiguous(), self.weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        extra = ", bias" if self.bias is not None else ""
        if self.fused_from is not None:
            extra += f", rows {self.fused_from[1]}:{self.fused_from[2]} of {self.fused_from[0]}"
        return f"{self.format.name}, in={self.in_features}, out={self.out_features}{extra}"


def embedding_rows(qt: QTensor, ids: torch.Tensor, dtype: torch.dtype = torch.float32,
                   device: torch.device | None = None) -> torch.Tensor:
    """Rows `ids` (any shape) of a [V, D] QTensor, dequantized: [*ids.shape, D] on `device`
    (default: where the blocks are).

    Packed rows are independent, so only the selected rows' bytes are gathered; they are decoded
    on `device`. An embedding kept in host memory for a CUDA model thus sends a step's packed rows
    (~1/4 of their bf16 bytes), from pinned memory, and the GPU decodes them: decoded on the host
    and copied as bf16, 2048 rows of a 4096-wide Q4_K table held a streamed 7B step's first layer
    back ~10 ms (an H200's profiled step)."""
    flat = ids.reshape(-1).to(qt.raw.device)
    target = qt.raw.device if device is None else torch.device(device)
    if target.type == "cuda" and qt.raw.device.type == "cpu":
        # into pinned memory, so the copy does not hold the host; NumPy's take copies whole rows
        # (2048 random rows of 2304 bytes: 0.6 ms on a 2-core host, torch's index_select 1.9)
        raw = torch.empty((flat.numel(), qt.raw.shape[1]), dtype=torch.uint8, pin_memory=True)
        np.take(qt.raw.numpy(), flat.numpy(), axis=0, out=raw.numpy())
        raw = raw.to(target, non_blocking=True)
    else:
        raw = qt.raw.index_select(0, flat).to(target)
    rows = QTensor(raw, qt.format, (flat.numel(), qt.shape[1]))
    return ops.dequantize(rows, dtype).reshape(*ids.shape, qt.shape[1])


class QEmbedding(nn.Module):
    """Token embedding [V, D] kept packed; forward(ids) -> [*ids.shape, D] in `dtype`, multiplied
    by `scale` in fp32 first (Gemma's sqrt(D), as llama.cpp applies it)."""

    def __init__(self, weight: QTensor, dtype: torch.dtype, name: str = "token_embd.weight",
                 scale: float = 1.0):
        super().__init__()
        self.register_buffer("raw", weight.raw, persistent=False)
        self.format = weight.format
        self.num_embeddings, self.embedding_dim = weight.shape
        self.dtype = dtype
        self.name = name
        self.scale = scale

    @property
    def weight(self) -> QTensor:
        return QTensor(self.raw, self.format, (self.num_embeddings, self.embedding_dim))

    def forward(self, ids: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """Rows `ids`, decoded on `device` (default: where the blocks are; see embedding_rows)."""
        if self.scale == 1.0:
            return embedding_rows(self.weight, ids, self.dtype, device)
        return (embedding_rows(self.weight, ids, torch.float32, device) * self.scale).to(self.dtype)

    def extra_repr(self) -> str:
        scale = f", scale={self.scale:g}" if self.scale != 1.0 else ""
        return f"{self.format.name}, {self.num_embeddings}, {self.embedding_dim}{scale}"


def make_norm(family: Family, w: Mapping[str, object], name: str, eps: float, width: int) -> nn.Module:
    """The family's norm of GGUF tensor `name`.weight: RMSNorm, or LayerNorm (Command-R; with
    `name`.bias where the file has one: Phi-2, StarCoder2; OLMo's, whose file holds no weight, with
    `width` ones, x normed as it is), or RMSNorm plus that bias (PhiMoE)."""
    if family.norm == "layer":
        weight = w[name + ".weight"] if family.norm_weights else torch.ones(width)
        return LayerNorm(weight, eps, w.get(name + ".bias"))
    if family.norm == "rms_bias" and name + ".bias" in w:
        return BiasedRMSNorm(w[name + ".weight"], eps, w[name + ".bias"])
    return RMSNorm(w[name + ".weight"], eps)


def latent_linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """Multi-head latent attention's linears (MLA_LINEAR_NAMES, as the file has them): GGUF layer name ->
    [rows, columns] as lowtune reads them; attn_k_b [H, kv_lora_rank, no-RoPE dims] and attn_v_b
    [H, value dims, kv_lora_rank] are read as their heads' rows stacked; attn_kv_b [H·(no-RoPE dims +
    value dims), kv_lora_rank] holds each head's key rows, then its value rows."""
    c = config
    heads_k, rank, nope = c.n_heads * c.head_dim, c.kv_lora_rank, c.head_dim - c.rope_dim
    out = {"attn_q_a": (c.q_lora_rank, c.dim), "attn_q_b": (heads_k, c.q_lora_rank)} if c.q_lora_rank \
        else {"attn_q": (heads_k, c.dim)}
    out["attn_kv_a_mqa"] = (rank + c.rope_dim, c.dim)
    if c.kv_b_whole:
        out["attn_kv_b"] = (c.n_heads * (nope + c.v_dim), rank)
    else:
        out.update(attn_k_b=(c.n_heads * rank, nope), attn_v_b=(c.n_heads * c.v_dim, rank))
    return {**out, "attn_output": (c.dim, c.n_heads * c.v_dim)}


def layer_norm_shapes(config: ModelConfig, layer: int | None = None) -> dict[str, tuple[int]]:
    """The RMSNorm weights of layer `layer` (None: an attention layer of the family): GGUF layer name
    -> shape (the layer's attribute is the name, but ffn_norm for the FFN's input norm under its
    file name). LFM2's short-convolution layers, Mamba2 layers and Qwen3.5's DeltaNets have no q/k
    norms; Gemma 3n's layers that reuse another's K/V no k norm."""
    c, fam = config, config.family
    out = {}
    if fam.pre_norms:
        out["attn_norm"] = (c.dim,)
        # (a parallel FFN reads attn_norm's output, but GPT-NeoX's its own norm; a layer of one part has one)
        if not (c.parallel and not fam.parallel_ffn_norm or fam.layer_parts or fam.attention_free):
            out[fam.ffn_norm_tensor] = (c.dim,)
    if layer in c.attentionless_layers:  # (Deci's layers without attention: no attn_norm; without an FFN, no ffn_norm)
        del out["attn_norm"]
    if layer in c.ffnless_layers:
        del out[fam.ffn_norm_tensor]
    if fam.post_norms:
        out.update({name: (c.dim,) for name in fam.post_norm_tensors})
    if fam.moe_residual and (layer is None or c.has_experts(layer)):  # (Arctic: the experts' input norm)
        out["ffn_norm_exps"] = (c.dim,)
    if fam.sub_norms:
        out.update(attn_sub_norm=(c.n_heads * c.v_dim,), ffn_sub_norm=(c.ffn_dim,))
    latent = c.kv_lora_rank and (layer is None or c.has_attention(layer))  # (Kimi Linear's KDA layers: none)
    if latent and c.q_lora_rank:
        out["attn_q_a_norm"] = (c.q_lora_rank,)
    if latent:
        out["attn_kv_a_norm"] = (c.kv_lora_rank,)
    if fam.qk_norm and not (layer is not None and not c.has_attention(layer)):
        whole = fam.qk_norm == "whole"
        out.update(attn_q_norm=(c.n_heads * c.head_dim if whole else c.head_dim,),
                   attn_k_norm=(c.n_kv_heads * c.head_dim if whole else c.head_dim,))
        if fam.qk_norm_per_head:  # (a weight of each head's own: StableLM 2 12B)
            out.update(attn_q_norm=(c.n_heads, c.head_dim), attn_k_norm=(c.n_kv_heads, c.head_dim))
        if layer is not None and not c.has_kv(layer):
            del out["attn_k_norm"]
    return out


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · w over the last dim, computed in fp32 and returned in x's dtype.
    (Gemma's 1 + w convention is already in w: the converter stores it so.)"""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        w = _table(weight)  # ([heads, d]: a weight of each head's own, PLaMo 2's q/k norms)
        self.register_buffer("weight", w if w.dim() == 2 and w.shape[0] > 1 else w.reshape(-1), persistent=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dim() == 2:  # (each head by its own weight, x [..., heads, d])
            return (F.rms_norm(x.float(), x.shape[-1:], None, self.eps) * self.weight).to(x.dtype)
        return glue_ops.rms_norm(x, self.weight, self.eps)

    def after_residual(self, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + a, this norm of x + a): a residual add and the norm that follows it."""
        return glue_ops.add_rms_norm(x, a, self.weight, self.eps)


class BiasedRMSNorm(RMSNorm):
    """RMSNorm plus a bias, x / sqrt(mean(x²) + eps) · w + b, as llama.cpp norms PhiMoE (its own type: the
    fused norm-and-product paths and the compiled decoders take plain RMSNorms only)."""

    def __init__(self, weight: torch.Tensor, eps: float, bias: torch.Tensor):
        super().__init__(weight, eps)
        self.register_buffer("bias", _vector(bias), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.bias.to(x.dtype)

    def after_residual(self, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, h = super().after_residual(x, a)
        return s, h + self.bias.to(h.dtype)


class MoE(nn.Module):
    """A mixture-of-experts FFN (Qwen3 MoE, Mixtral, OLMoE, Qwen2 MoE, Granite MoE, gpt-oss, LFM2-MoE)
    as llama.cpp's build_moe_ffn runs it: router logits over E experts per token (plus the router's
    bias where the file has one), their softmax (gating 2, LFM2-MoE: each one's sigmoid), the
    n_experts_used largest, those weights divided by their sum (where the family renormalizes) — or,
    gating 3 (gpt-oss), the n_experts_used largest logits and the softmax of those; each chosen
    expert a gated MLP over the tokens routed to it (with its biases where the file has them; where the
    family's MLP has no gate, down(act(up x)): Nemotron-H MoE's relu²), and the token's output the
    weighted sum of its experts' (Llama 4: of its experts' on the weighted input), plus a shared
    expert's where the file has one (every token runs it; Qwen2 MoE scales it by sigmoid(x ·
    ffn_gate_inp_shexp)).

    The experts stay packed as GGUF stores them: ffn_gate_exps and ffn_up_exps [E·F, D],
    ffn_down_exps [E·D, F] (gate and up in one ffn_gate_up_exps [E·2F, D]: Gemma 4), an expert being a
    row range (QTensor.rows). They are frozen (adapters go on the attention's linears and the shared
    experts', ffn_{gate,up,down}_shexp); gradients flow through them and the router to the input."""

    def __init__(self, config: ModelConfig, index: int, w: Mapping[str, object]):
        super().__init__()
        p = f"blk.{index}."
        self.router = QLinear(w[p + "ffn_gate_inp.weight"], p + "ffn_gate_inp.weight", w.get(p + "ffn_gate_inp.bias"))
        self.gate_exps, self.up_exps, self.down_exps, self.gate_up_exps = (
            QLinear(w[p + n + ".weight"], p + n + ".weight") if p + n + ".weight" in w else None
            for n in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_up_exps"))
        # (no gate where the family's MLP has none; gate and up in one tensor, each expert's 2F rows its
        # gate's then its up's: Gemma 4)
        self.n_experts, self.n_used = config.n_experts, config.n_experts_used
        self.renorm, self.gating = config.renorms_experts, config.expert_gating
        self.weight_before = config.family.moe_weight_before
        self.shared_average = config.family.moe_shared_average
        self.weights_scale = config.expert_weights_scale
        self.groups, self.groups_used = config.expert_groups, config.expert_groups_used
        # a bias on the routing probabilities that picks the experts but does not weigh them (ERNIE 4.5 MoE)
        b = w.get(p + "exp_probs_b.bias")
        self.register_buffer("selection_bias", None if b is None else _vector(b), persistent=False)
        # the experts' biases [E, rows] (gpt-oss), frozen as the experts are
        for n in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            b = w.get(p + n + ".bias")
            self.register_buffer(n + "_bias", None if b is None else _table(b), persistent=False)
        # Gemma 4's router: its input RMS-normed without a weight, × ffn_gate_inp.scale / sqrt(D); each
        # expert's output × its ffn_down_exps.scale
        scale = w.get(p + "ffn_gate_inp.scale")
        self.register_buffer("router_scale", None if scale is None else _vector(scale) / math.sqrt(config.dim),
                             persistent=False)
        self.norm_eps = config.norm_eps
        scale = w.get(p + "ffn_down_exps.scale")
        self.register_buffer("expert_scales", None if scale is None else _vector(scale), persistent=False)
        self.activation = config.family.activation
        # Grove MoE's adjugate experts, one for each group of experts_per_group experts (frozen as the experts)
        self.gate_chexps, self.up_chexps, self.down_chexps = (
            QLinear(w[p + n + ".weight"], p + n + ".weight") if config.experts_per_group else None
            for n in ("ffn_gate_chexps", "ffn_up_chexps", "ffn_down_chexps"))
        self.group_size, self.group_scale = config.experts_per_group, config.expert_group_scale
        self.ffn_gate_shexp = self.ffn_up_shexp = self.ffn_down_shexp = None
        self.register_buffer("shared_gate", None, persistent=False)
        if config.shared_expert_ffn_dim:
            self.ffn_gate_shexp, self.ffn_up_shexp, self.ffn_down_shexp = (
                QLinear(w[p + n + ".weight"], p + n + ".weight") if p + n + ".weight" in w else None
                for n in SHARED_EXPERT_NAMES)
            if config.family.moe_shared_gate:
                self.shared_gate = _vector(w[p + "ffn_gate_inp_shexp.weight"])

    def forward(self, h: torch.Tensor, routed_by: torch.Tensor | None = None) -> torch.Tensor:
        """The experts' output for h [..., D]; routed_by: what the router reads (None: h; Gemma 4's the
        residual stream, its experts the stream normed by their own norm)."""
        x = h.reshape(-1, h.shape[-1]).contiguous()
        r = x if routed_by is None else routed_by.reshape(-1, h.shape[-1]).contiguous()
        if self.router_scale is not None:
            r = (F.rms_norm(r.float(), r.shape[-1:], None, self.norm_eps) * self.router_scale).to(r.dtype)
        logits = self.router(r).float()
        if self.gating == 3:  # the top k logits, then their softmax
            weights, chosen = logits.topk(self.n_used, dim=-1)
            weights = weights.softmax(-1)
        else:  # the top k of the softmax or sigmoid (+ the selection bias, which picks but does not weigh)
            probs = logits.sigmoid() if self.gating == 2 else logits.softmax(-1)
            picked = probs if self.selection_bias is None else probs + self.selection_bias
            if self.groups > 1:  # only the experts of the groups whose two best score most
                grouped = picked.view(-1, self.groups, self.n_experts // self.groups)
                best = grouped.topk(2, dim=-1).values.sum(-1).topk(self.groups_used, dim=-1).indices
                kept = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter(-1, best, True)
                picked = grouped.masked_fill(~kept[..., None], float("-inf")).view_as(picked)
            chosen = picked.topk(self.n_used, dim=-1).indices
            weights = probs.gather(-1, chosen)
        if self.renorm:
            weights = weights / weights.sum(-1, keepdim=True).clamp(min=6.103515625e-5)  # (llama.cpp's clamp)
        if self.weights_scale != 1.0:
            weights = weights * self.weights_scale
        if self.expert_scales is not None:
            weights = weights * self.expert_scales[chosen]
        d = self.down_exps.out_features // self.n_experts
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():  # the experts some token chose (a host sync: shapes follow the data)
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            weight = weights[rows, slot, None]
            xe = (x[rows].float() * weight).to(x.dtype) if self.weight_before else x[rows]
            y = self._expert(xe, *self.gate_up_of(e), self.down_exps.weight.rows(e * d, (e + 1) * d), e)
            out = out.index_add(0, rows, (y if self.weight_before else (y.float() * weight).to(out.dtype)))
        if self.down_chexps is not None:
            out = out + self.group_scale * self.adjugate_experts(out, logits, probs)
        if self.ffn_up_shexp is not None:  # (through the modules: adapters may wrap them)
            s = self.ffn_down_shexp(self._mlp(self.ffn_gate_shexp and self.ffn_gate_shexp(x), self.ffn_up_shexp(x)))
            if self.shared_gate is not None:
                s = (s.float() * torch.sigmoid(x.float() @ self.shared_gate)[:, None]).to(s.dtype)
            out = (out + s) * 0.5 if self.shared_average else out + s
        return out.view_as(h)

    def adjugate_experts(self, x: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Grove MoE's adjugate experts on x [N, D] as llama.cpp's grovemoe runs them: x is the routed experts'
        output; each of the top min(k, adjugates) experts e by the router's logits picks adjugate e // group,
        weighed by expert e // group's probability, those weights divided by their sum."""
        n = self.down_chexps.out_features // x.shape[-1]
        chosen = logits.topk(min(self.n_used, n), dim=-1).indices // self.group_size
        weights = probs.gather(-1, chosen)
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=6.103515625e-5)
        f, out = self.up_chexps.out_features // n, torch.zeros_like(x)
        for e in chosen.unique().tolist():
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            gate, up = (t.weight.rows(e * f, (e + 1) * f) for t in (self.gate_chexps, self.up_chexps))
            xe = x[rows]
            y = ops.qmatmul(self._mlp(ops.qmatmul(xe, gate), ops.qmatmul(xe, up)),
                            self.down_chexps.weight.rows(e * x.shape[-1], (e + 1) * x.shape[-1]))
            out = out.index_add(0, rows, (y.float() * weights[rows, slot, None]).to(out.dtype))
        return out

    def gate_up_of(self, e: int) -> tuple[QTensor | None, QTensor]:
        """Expert e's gate (None where the experts have none) and up rows."""
        if self.gate_up_exps is not None:
            f, gate_up = self.gate_up_exps.out_features // (2 * self.n_experts), self.gate_up_exps.weight
            return gate_up.rows(2 * e * f, (2 * e + 1) * f), gate_up.rows((2 * e + 1) * f, (2 * e + 2) * f)
        f = self.up_exps.out_features // self.n_experts
        gate = None if self.gate_exps is None else self.gate_exps.weight.rows(e * f, (e + 1) * f)
        return gate, self.up_exps.weight.rows(e * f, (e + 1) * f)

    def _mlp(self, g: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
        """act(g) ⊙ u, or act(u) where the experts have no gate."""
        y = glue_ops.ungated(self.activation, u) if g is None else glue_ops.gated(self.activation, g, u)
        return y.contiguous()

    def _expert(self, x: torch.Tensor, gate: QTensor | None, up: QTensor, down: QTensor, e: int) -> torch.Tensor:
        """down · (act(gate · x) ⊙ up · x) for rows x [N, D] (down · act(up · x) without a gate): routed
        expert e's MLP, with its biases where the file has them."""
        bias = lambda y, b: y if b is None else y + b[e].to(y.dtype)  # noqa: E731
        g = None if gate is None else bias(ops.qmatmul(x, gate), self.ffn_gate_exps_bias)
        return bias(ops.qmatmul(self._mlp(g, bias(ops.qmatmul(x, up), self.ffn_up_exps_bias)), down),
                    self.ffn_down_exps_bias)

    def extra_repr(self) -> str:
        return f"{self.n_experts} experts, {self.n_used} used, {self.down_exps.format.name}"


def causal_conv(x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None, cache: KVCache | None,
                index: int, start: int) -> torch.Tensor:
    """x [B, C, T] at positions start..start+T through the depthwise causal convolution of kernel [C, L]
    (and bias [C]): each output the kernel's weighted sum of the last L positions of its channel, the ones
    before the sequence zeros, or with a cache the last L - 1 inputs of the previous call (its conv_state
    of layer `index`, which this call then replaces). LFM2's short convolutions, Mamba2's and the Gated
    DeltaNet's."""
    past = x.new_zeros(x.shape[0], x.shape[1], kernel.shape[1] - 1)
    if cache is not None and start:
        past = cache.conv_state[index]
    seq = torch.cat([past, x], dim=-1)
    if cache is not None:
        cache.conv_state[index] = seq[:, :, seq.shape[-1] - past.shape[-1]:]
    return F.conv1d(seq, kernel[:, None, :], bias, groups=kernel.shape[0])


class ShortConv(nn.Module):
    """LFM2's short convolution, in place of attention in the layers its file gives no KV heads, as
    llama.cpp's build_shortconv_block runs it: in_proj(h) [.., 3D] split into B, C, x; B·x through a
    depthwise causal convolution, each output the kernel's weighted sum of the last conv_kernel
    positions of its channel (zeros before the sequence); C times that, through out_proj.

    in_proj and out_proj are QLinears that adapters wrap; the kernel [D, L] (shortconv.conv, which
    llama.cpp keeps in F32 and without a bias) is frozen as the norms are. With a KV cache the last
    L - 1 positions of B·x are its conv state, which the next call's positions read first."""

    def __init__(self, config: ModelConfig, index: int, w: Mapping[str, object]):
        super().__init__()
        p = f"blk.{index}.shortconv."
        self.in_proj, self.out_proj = (QLinear(w[p + n + ".weight"], p + n + ".weight") for n in CONV_LINEAR_NAMES)
        self.register_buffer("kernel", _table(w[p + "conv.weight"]).reshape(config.dim, -1), persistent=False)
        self.index = index

    def forward(self, h: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """h [B, T, D] (normed) at positions start..start+T -> [B, T, D]."""
        b, c, x = self.in_proj(h).chunk(3, dim=-1)
        bx = (b * x).transpose(1, 2)                                    # [B, D, T]
        conv = causal_conv(bx, self.kernel.to(bx.dtype), None, cache, self.index, start)
        return self.out_proj((c * conv.transpose(1, 2)).contiguous())

    def extra_repr(self) -> str:
        return f"kernel {tuple(self.kernel.shape)}"


class Mamba2(nn.Module):
    """A Mamba2 layer between its two linears (Granite 4's hybrids), as llama.cpp's build_mamba2_layer
    runs it: ssm_in's output [.., in_dim] is z, xBC and dt; xBC through a depthwise causal convolution
    (with its bias) and SiLU, then split into x [heads, head_dim], B and C [groups, state]; the scan
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t per head, with A = -exp(A_log)
    (the file holds A), dt = softplus(dt + dt_bias) and each group's B and C shared by its heads;
    then RMSNorm of y · silu(z) over each group (ssm_norm's weight), for ssm_out.

    The scan runs as the chunked SSD algorithm in fp32 (differentiable torch: each chunk's outputs
    from its own inputs as one masked product, the state carried from chunk to chunk), and one
    position as the recurrent step. The kernel, its bias, A, D, dt_bias and the norm are frozen as
    the norms are. With a KV cache the last conv_kernel - 1 positions of xBC are its conv state and
    the scan's state [B, heads, head_dim, state] its recurrent state."""

    chunk = 64  # positions the SSD algorithm takes at once

    def __init__(self, config: ModelConfig, index: int, w: Mapping[str, object]):
        super().__init__()
        p, m = f"blk.{index}.", config.ssm
        self.shape, self.index, self.eps = m, index, config.norm_eps
        self.register_buffer("kernel", _table(w[p + "ssm_conv1d.weight"]).reshape(m.conv_dim, m.conv_kernel),
                             persistent=False)
        bias = w.get(p + "ssm_conv1d.bias")
        self.register_buffer("conv_bias", None if bias is None else _vector(bias), persistent=False)
        for name, key in (("A", "ssm_a"), ("D", "ssm_d"), ("dt_bias", "ssm_dt.bias")):
            self.register_buffer(name, _vector(w[p + key]), persistent=False)
        norm = w.get(p + "ssm_norm.weight")  # (Falcon-H1's files may have none)
        self.register_buffer("norm", None if norm is None else _vector(norm), persistent=False)

    def forward(self, zxbcdt: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """ssm_in's output [B, T, in_dim] at positions start..start+T -> y [B, T, inner] for ssm_out."""
        m = self.shape
        b, t, _ = zxbcdt.shape
        z, xbc, dt = zxbcdt.split([m.inner, m.conv_dim, m.heads], dim=-1)
        xbc = xbc.transpose(1, 2)                                          # [B, C, T]
        bias = None if self.conv_bias is None else self.conv_bias.to(xbc.dtype)
        xbc = causal_conv(xbc, self.kernel.to(xbc.dtype), bias, cache, self.index, start)
        xbc = F.silu(xbc).transpose(1, 2).float()
        x, bb, cc = xbc.split([m.inner, m.groups * m.state, m.groups * m.state], dim=-1)
        x = x.reshape(b, t, m.heads, m.head_dim)
        rep = m.heads // m.groups  # (heads h·rep .. h·rep + rep - 1 read group h's B and C)
        bb = bb.reshape(b, t, m.groups, 1, m.state).expand(-1, -1, -1, rep, -1).reshape(b, t, m.heads, m.state)
        cc = cc.reshape(b, t, m.groups, 1, m.state).expand(-1, -1, -1, rep, -1).reshape(b, t, m.heads, m.state)
        dt = F.softplus(dt.float() + self.dt_bias)                          # [B, T, H]
        state = cache.recurrent_state.get(self.index) if cache is not None and start else None
        if state is None:
            state = x.new_zeros(b, m.heads, m.head_dim, m.state)
        if t == 1:
            y, state = _ssm_step(x, dt, self.A, bb, cc, state)
        else:
            y, state = _ssd_chunked(x, dt, self.A, bb, cc, state, self.chunk)
        if cache is not None:
            cache.recurrent_state[self.index] = state
        y = (y + x * self.D[:, None]).reshape(b, t, m.inner) * F.silu(z.float())
        if self.norm is not None:
            g = y.reshape(b, t, m.groups, -1)
            y = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)).reshape(b, t, m.inner) * self.norm
        return y.to(zxbcdt.dtype)

    def frozen_tensors(self) -> dict[str, torch.Tensor]:
        """The layer's frozen tensors under their GGUF names after blk.N. (no bias where the file has none)."""
        out = {"ssm_conv1d.weight": self.kernel, "ssm_a": self.A, "ssm_d": self.D, "ssm_dt.bias": self.dt_bias,
               "ssm_norm.weight": self.norm, "ssm_conv1d.bias": self.conv_bias}
        return {n: t for n, t in out.items() if t is not None}

    def extra_repr(self) -> str:
        m = self.shape
        return f"{m.heads} heads of {m.head_dim}, state {m.state}, {m.groups} groups, kernel {m.conv_kernel}"


class Mamba(nn.Module):
    """A Mamba 1 layer between its linears (Mamba, Falcon-Mamba), as llama.cpp's build_mamba_layer runs it:
    ssm_in's output [.., 2·inner] is x and z; x through a depthwise causal convolution (with its bias) and
    SiLU; ssm_x(x) gives dt [dt_rank], B and C [state] (RMS-normed without a weight where the file says:
    Falcon-Mamba), and dt = softplus(ssm_dt(dt)) (ssm_dt's bias included); then selective_scan, each of
    the inner channels with its own row of A = -exp(A_log) [inner, state] (the file holds A), the D skip,
    and y · silu(z) for ssm_out.

    In heads (MambaShape.heads: PLaMo 2, as llama.cpp's build_plamo2_mamba_layer) ssm_in's output holds each
    head's z, then its x; the convolution has no bias; ssm_x gives B, C, then dt, each normed by its weight;
    ssm_dt gives one dt a head, and the scan is Mamba2's, each head with one A and D, all heads sharing B
    and C.

    ssm_x and ssm_dt are the layer's QLinears (adapters wrap them), passed in; the kernel, its bias, A and
    D are frozen as the norms are. With a KV cache the last conv_kernel - 1 positions of x are its conv
    state and the scan's state [B, inner, state] (heads: [B, heads, head_dim, state]) its recurrent state."""

    chunk = Mamba2.chunk  # (heads: the SSD algorithm's positions at once)

    def __init__(self, config: ModelConfig, index: int, w: Mapping[str, object]):
        super().__init__()
        p, m = f"blk.{index}.", config.ssm
        self.shape, self.index, self.eps = m, index, config.norm_eps
        self.register_buffer("kernel", _table(w[p + "ssm_conv1d.weight"]).reshape(m.inner, m.conv_kernel),
                             persistent=False)
        bias = w.get(p + "ssm_conv1d.bias")  # (in heads: none)
        self.register_buffer("conv_bias", None if bias is None else _vector(bias), persistent=False)
        a = _table(w[p + "ssm_a"])
        self.register_buffer("A", a.reshape(-1) if m.heads else a.reshape(m.inner, m.state), persistent=False)
        self.register_buffer("D", _vector(w[p + "ssm_d"]), persistent=False)
        # the weights of dt's, B's and C's RMSNorms where the file has them (Jamba)
        self.norms = nn.ModuleList(RMSNorm(w[p + n + ".weight"], config.norm_eps) for n in MAMBA_NORM_NAMES
                                   if p + n + ".weight" in w) or None

    def forward(self, xz: torch.Tensor, ssm_x: nn.Module, ssm_dt: nn.Module, cache: KVCache | None = None,
                start: int = 0) -> torch.Tensor:
        """ssm_in's output [B, T, 2·inner] at positions start..start+T -> y [B, T, inner] for ssm_out."""
        m = self.shape
        if m.heads:  # (each head's z, then its x)
            z, x = xz.unflatten(-1, (m.heads, 2, m.head_dim)).unbind(-2)
            z, x = z.flatten(-2), x.flatten(-2)
        else:
            x, z = xz.chunk(2, dim=-1)
        bias = None if self.conv_bias is None else self.conv_bias.to(x.dtype)
        x = causal_conv(x.transpose(1, 2), self.kernel.to(x.dtype), bias, cache, self.index, start)
        x = F.silu(x).transpose(1, 2).contiguous()                           # [B, T, inner]
        parts = ssm_x(x).split([m.state, m.state, m.dt_rank] if m.heads else [m.dt_rank, m.state, m.state], dim=-1)
        b, c, dt = parts if m.heads else (parts[1], parts[2], parts[0])
        if self.norms is not None:
            dt, b, c = (norm(v) for norm, v in zip(self.norms, (dt, b, c)))
        elif m.dt_b_c_rms:
            dt, b, c = (F.rms_norm(v.float(), v.shape[-1:], None, self.eps).to(v.dtype) for v in (dt, b, c))
        dt = F.softplus(ssm_dt(dt.contiguous()).float())
        state = cache.recurrent_state.get(self.index) if cache is not None and start else None
        if m.heads:
            y = self._heads_scan(x.float(), dt, b.float(), c.float(), cache, state)
        else:
            y, state = selective_scan(x.float(), dt, self.A, b.float(), c.float(), state)
            if cache is not None:
                cache.recurrent_state[self.index] = state
            y = y + x.float() * self.D
        return (y * F.silu(z.float())).to(xz.dtype)

    def _heads_scan(self, x: torch.Tensor, dt: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                    cache: KVCache | None, state: torch.Tensor | None) -> torch.Tensor:
        """Mamba2's scan of x [B, T, inner] in heads, dt [B, T, heads], B and C [B, T, state] shared by every
        head, with the D skip -> [B, T, inner]."""
        m = self.shape
        bsz, t, _ = x.shape
        x = x.reshape(bsz, t, m.heads, m.head_dim)
        b, c = (v[:, :, None].expand(-1, -1, m.heads, -1) for v in (b, c))
        if state is None:
            state = x.new_zeros(bsz, m.heads, m.head_dim, m.state)
        scan = _ssm_step if t == 1 else lambda *a: _ssd_chunked(*a, self.chunk)
        y, state = scan(x, dt, self.A, b, c, state)
        if cache is not None:
            cache.recurrent_state[self.index] = state
        return (y + x * self.D[:, None]).reshape(bsz, t, m.inner)

    def frozen_tensors(self) -> dict[str, torch.Tensor]:
        """The layer's frozen tensors under their GGUF names after blk.N."""
        norms = {n + ".weight": norm.weight for n, norm in zip(MAMBA_NORM_NAMES, self.norms or ())}
        out = {"ssm_conv1d.weight": self.kernel, "ssm_conv1d.bias": self.conv_bias, "ssm_a": self.A, "ssm_d": self.D,
               **norms}
        return {n: t for n, t in out.items() if t is not None}

    def extra_repr(self) -> str:
        m = self.shape
        heads = f"{m.heads} heads of {m.head_dim}, " if m.heads else ""
        return f"{heads}{m.inner} channels, state {m.state}, dt rank {m.dt_rank}, kernel {m.conv_kernel}"


# positions a chunk of Mamba 1's chunked scan: it runs chunk + T / chunk steps, fewest near √T (training's T:
# 512-2048), and keeps the states of every position as the stepped form does
def carried_states(state: torch.Tensor, decays, ends) -> tuple[list[torch.Tensor], torch.Tensor]:
    """([the state entering each chunk], the state after the last) of a chunked linear recurrence whose chunk i
    takes the state s entering it to s · decays[i] + ends[i] (its total decay, broadcast against the state, and
    what its own positions add): the loop over chunks that Mamba's, Mamba2's and RWKV-6's chunked forms share."""
    starts = []
    for decay, own in zip(decays, ends):
        starts.append(state)
        state = state * decay + own
    return starts, state


SCAN_CHUNK = 32


@ops.without_autocast  # (the trainer's bf16 autocast would run its products in bf16)
def selective_scan(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                   state: torch.Tensor | None = None, chunk: int = SCAN_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba 1's selective scan in fp32: per channel d the state h [state] decays by exp(dt_t,d · A_d) and
    takes dt_t,d x_t,d B_t, and y_t,d = h · C_t. x, dt [B, T, inner], a [inner, state], b, c [B, T, state];
    state [B, inner, state] (None: zeros) -> (y [B, T, inner], the last state). One position is the
    recurrent step; more run chunked (_selective_scan_chunked), differentiable throughout."""
    if x.shape[1] == 1:
        return _selective_scan_stepped(x, dt, a, b, c, state)
    return _selective_scan_chunked(x, dt, a, b, c, state, chunk)


@ops.without_autocast  # (the trainer's bf16 autocast would run its products in bf16)
def _selective_scan_stepped(x, dt, a, b, c, state=None):
    """selective_scan position by position (its one-position step, and the reference of its chunked form):
    the decays of the whole sequence at once, then the recurrence."""
    decay = torch.exp(dt[..., None] * a)                                    # [B, T, inner, state]
    inputs = (dt * x)[..., None] * b[:, :, None]
    h = x.new_zeros(x.shape[0], x.shape[2], a.shape[1]) if state is None else state
    ys = []
    for t in range(x.shape[1]):
        h = h * decay[:, t] + inputs[:, t]
        ys.append(torch.einsum("bdn,bn->bd", h, c[:, t]))
    return torch.stack(ys, 1), h


@ops.without_autocast  # (the trainer's bf16 autocast would run its products in bf16)
def _selective_scan_chunked(x, dt, a, b, c, state, chunk: int):
    """selective_scan over T positions in chunks of `chunk`: the recurrence from a zero state within every
    chunk at once (chunk steps), then the state at each chunk's start carried by the chunk's total decay
    (T / chunk steps) and added to its positions' states through their decays since the chunk's start.
    (Not the pairwise form of _ssd_chunked: with a decay for each channel and state, its pairs cost
    chunk · inner · state a position, `chunk` times the recurrence's own work.) Shapes as selective_scan's;
    positions past T (padding to whole chunks) have dt = 0: decay 1, no input."""
    bsz, t, inner = x.shape
    chunk = min(chunk, t)
    pad = (-t) % chunk
    x, dt, b, c = (F.pad(v, (0, 0, 0, pad)) for v in (x, dt, b, c))
    n = (t + pad) // chunk
    x, dt, b, c = (v.reshape(bsz, n, chunk, -1) for v in (x, dt, b, c))
    log_decay = dt[..., None] * a                                          # [B, n, C, inner, state]
    inputs = (dt * x)[..., None] * b[..., None, :]
    h = x.new_zeros(bsz, n, inner, a.shape[1])
    within = []
    for decay, given in zip(log_decay.exp().unbind(2), inputs.unbind(2)):
        h = h * decay + given
        within.append(h)
    since_start = log_decay.cumsum(2)                                      # sums of one sign: no cancellation
    h = x.new_zeros(bsz, inner, a.shape[1]) if state is None else state
    starts, h = carried_states(h, since_start[:, :, -1].exp().unbind(1), within[-1].unbind(1))
    states = torch.stack(within, 2) + since_start.exp() * torch.stack(starts, 1)[:, :, None]
    y = torch.einsum("bcidn,bcin->bcid", states, c)
    return y.reshape(bsz, n * chunk, inner)[:, :t], h


@ops.without_autocast  # (the trainer's bf16 autocast would run its products in bf16)
def _ssm_step(x, dt, a, b, c, state):
    """One position of the scan: x [B, 1, H, P], dt [B, 1, H], a [H], b, c [B, 1, H, N], state
    [B, H, P, N] -> (y [B, 1, H, P], the state after it)."""
    dt = dt[:, 0]
    state = state * torch.exp(dt * a)[..., None, None] + (dt[..., None] * x[:, 0])[..., None] * b[:, 0, :, None, :]
    return torch.einsum("bhpn,bhn->bhp", state, c[:, 0])[:, None], state


@ops.without_autocast  # (the trainer's bf16 autocast would run its products in bf16)
def _ssd_chunked(x, dt, a, b, c, state, chunk: int):
    """The scan over T positions as Mamba2's chunked SSD algorithm (transformers' torch_forward):
    within a chunk y_l = sum_{s <= l} (c_l · b_s) exp(sum_{s < r <= l} dt_r a) dt_s x_s, one masked
    product; across chunks the state at each chunk's start, carried by the chunk's total decay.
    Shapes as _ssm_step's with T positions; positions past T (padding to whole chunks) have dt = 0."""
    bsz, t, h, p = x.shape
    pad = (-t) % chunk
    if pad:
        x, b, c = (F.pad(v, (0, 0, 0, 0, 0, pad)) for v in (x, b, c))
        dt = F.pad(dt, (0, 0, 0, pad))
    n = (t + pad) // chunk
    x, b, c = (v.reshape(bsz, n, chunk, h, -1) for v in (x, b, c))
    xdt = x * dt.reshape(bsz, n, chunk, h, 1)
    acum = torch.cumsum((dt * a).reshape(bsz, n, chunk, h).permute(0, 3, 1, 2), dim=-1)  # [B, H, n, L]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp((acum[..., :, None] - acum[..., None, :]).masked_fill(~causal, float("-inf")))
    y = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", c, b, decay, xdt)
    # each chunk's own contribution to the state at its end, then the states at the chunks' starts
    ends = torch.einsum("bclhn,bhcl,bclhp->bchpn", b, torch.exp(acum[..., -1:] - acum), xdt)
    total = torch.exp(acum[..., -1])                                                        # [B, H, n]
    starts, state = carried_states(state, total[..., None, None].unbind(2), ends.unbind(1))
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", c, torch.stack(starts, 1), torch.exp(acum))
    return y.reshape(bsz, n * chunk, h, p)[:, :t], state


@ops.without_autocast  # (in fp32 under a bf16 trainer too: CUDA has no bf16 triangular solve)
def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     state: torch.Tensor | None = None, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over T positions, in fp32: per head the state S [d_k, d_v] decays by exp(g_t),
    then takes the delta rule's correction k_t (beta_t (v_t - Sᵀk_t))ᵀ, and o_t = Sᵀ q_t. q, k [B, T, H, d_k]
    (normed, q scaled), v [B, T, H, d_v], beta [B, T, H], g [B, T, H] (one decay a head: the Gated DeltaNet)
    or [B, T, H, d_k] (a decay for each key channel, each row of S: Kimi Delta Attention); state
    [B, H, d_k, d_v] (None: zeros) -> (o [B, T, H, d_v], the last state). One position steps the
    recurrence; more run transformers' chunked form (chunks of `chunk` positions: a triangular solve within
    each, the state carried between), differentiable throughout."""
    q, k, v, g, beta = (x.transpose(1, 2).float() for x in (q, k, v, g, beta))  # heads first
    b, h, t, dk = k.shape
    if g.dim() == 3:  # (one decay a head: the same for every key channel)
        g = g[..., None]
    s = q.new_zeros(b, h, dk, v.shape[-1]) if state is None else state.float()
    if t == 1:
        kt = k[:, :, 0, :, None]
        s = s * g[:, :, 0, :, None].exp()
        s = s + kt * (beta[:, :, 0, None] * (v[:, :, 0] - (s * kt).sum(-2)))[:, :, None]
        return (s * q[:, :, 0, :, None]).sum(-2)[:, None], s
    pad = (chunk - t % chunk) % chunk
    q, k, v, g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
    beta = F.pad(beta, (0, pad))
    n = (t + pad) // chunk
    q, k, v, g = (x.reshape(b, h, n, chunk, -1) for x in (q, k, v, g))
    beta = beta.reshape(b, h, n, chunk)
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    decay = g.cumsum(-2)                                        # log decay since the chunk's start [.., chunk, 1 | d_k]
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    # exp(decay_i - decay_j) for j <= i, of each pair of positions (and key channel, where they differ)
    pair = (decay[..., :, None, :] - decay[..., None, :, :]).masked_fill(upper[..., None], float("-inf")).exp()
    if g.shape[-1] == 1:
        pair = pair[..., 0]
        system, inner = k_beta @ k.transpose(-1, -2) * pair, q @ k.transpose(-1, -2) * pair
    else:
        system, inner = (torch.einsum("...ic,...jc,...ijc->...ij", x, k, pair) for x in (k_beta, q))
    # the delta rule's updates within a chunk as one unit-lower-triangular system (the UT transform; its
    # diagonal is taken as ones)
    values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    k_decayed = torch.linalg.solve_triangular(system, k_beta * decay.exp(), upper=False, unitriangular=True)
    q_decayed = q * decay.exp()
    k_rest = k * (decay[..., -1:, :] - decay).exp()
    outs = []
    for i in range(n):
        new = values[:, :, i] - k_decayed[:, :, i] @ s
        outs.append(q_decayed[:, :, i] @ s + inner[:, :, i] @ new)
        s = s * decay[:, :, i, -1, :, None].exp() + k_rest[:, :, i].transpose(-1, -2) @ new
    o = torch.stack(outs, 2).reshape(b, h, n * chunk, -1)[:, :, :t]
    return o.transpose(1, 2), s


class LayerNorm(nn.Module):
    """(x - mean(x)) / sqrt(var(x) + eps) · w (+ b where the file has one: Phi-2; Command-R has
    none) over the last dim, in fp32, returned in x's dtype, with RMSNorm's interface."""

    def __init__(self, weight: torch.Tensor, eps: float, bias: torch.Tensor | None = None):
        super().__init__()
        w = _table(weight)  # ([heads, d]: a weight of each head's own, StableLM 2 12B's q/k norms)
        self.register_buffer("weight", w if w.dim() == 2 and w.shape[0] > 1 else w.reshape(-1), persistent=False)
        self.register_buffer("bias", None if bias is None else _vector(bias), persistent=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dim() == 1:
            return F.layer_norm(x.float(), (x.shape[-1],), self.weight, self.bias, self.eps).to(x.dtype)
        # each head by its own weight, x [..., heads, d] (no bias)
        return (F.layer_norm(x.float(), x.shape[-1:], None, None, self.eps) * self.weight).to(x.dtype)

    def after_residual(self, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = x + a
        return s, self(s)


class NoNorm(nn.Module):
    """Where a family has no norm before attention or the FFN (OLMo 2): x itself, with RMSNorm's
    interface (weight None)."""

    weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def after_residual(self, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = x + a
        return s, s


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap · tanh(x / cap) (Gemma's soft-capping); x itself when cap is 0."""
    return x if not cap else torch.tanh(x / cap) * cap


# ----------------------------------------------------------------------------------------------
# RoPE


def rope_inv_freq(config: ModelConfig, freq_factors: torch.Tensor | None = None,
                  sliding: bool = False) -> torch.Tensor:
    """[rope_dim/2] float64 angular speed of each rotated pair: base^(-2i/d) / factor_i / linear_scale,
    with the sliding layers' base and scaling when `sliding`."""
    c = config
    theta = c.rope_theta_swa if sliding and c.rope_theta_swa is not None else c.rope_theta
    scale = c.rope_linear_scale_swa if sliding and c.rope_linear_scale_swa is not None else c.rope_linear_scale
    i = torch.arange(0, c.rope_dim, 2, dtype=torch.float64)
    inv = theta ** (-i / c.rope_dim) / scale
    if freq_factors is not None:  # Llama 3.1's rope_freqs, LongRoPE's factors: divide each pair's frequency
        inv = inv / freq_factors.double().cpu()
    if c.rope_yarn_factor > 1.0 and not (sliding and c.swa_unscaled_yarn):
        # YaRN as ggml's rope_yarn (ext_factor 1): pairs that turn more than beta_fast (32) times
        # over the original context keep their speed, pairs that turn less than beta_slow (1)
        # times are slowed by the factor, a ramp between
        orig = c.original_context
        turns = lambda n: c.rope_dim * math.log(orig / (n * 2 * math.pi)) / (2 * math.log(theta))  # noqa: E731
        low = max(math.floor(turns(c.rope_yarn_beta_fast)), 0)
        high = min(math.ceil(turns(c.rope_yarn_beta_slow)), c.rope_dim - 1)
        kept = 1.0 - ((i / 2 - low) / max(0.001, high - low)).clamp(0.0, 1.0)
        inv = inv / c.rope_yarn_factor * (1.0 - kept) + inv * kept
    return inv


# Llama 4's NoPE layers' query temperature, fixed by llama.cpp: attn_temperature(0.1, 8192, pos + 1)
NOPE_TEMPERATURE, NOPE_TEMPERATURE_FLOOR = 0.1, 8192


def attn_temperature(t: float, orig: int, positions: torch.Tensor) -> torch.Tensor:
    """Llama 4's query scale at `positions`: 1 + t ln(1 + floor(pos / orig)) (Ministral 3)."""
    return 1.0 + t * (1.0 + (positions // orig)).log()


def alibi_slopes(config: ModelConfig) -> torch.Tensor | None:
    """[H] float32 ALiBi slopes for the config's max bias b, as ggml's softmax computes them: with n the
    largest power of two <= H, head h < n takes (2^(-b/n))^(h+1), the others (2^(-b/2n))^(2(h-n)+1)
    (BLOOM's rule for a head count that is not a power of two); None without ALiBi."""
    b, heads = config.alibi_max_bias, config.n_heads
    if not b:
        return None
    n = 2 ** math.floor(math.log2(heads))
    m0, m1 = 2.0 ** (-b / n), 2.0 ** (-b / 2 / n)
    return torch.tensor([m0 ** (h + 1) if h < n else m1 ** (2 * (h - n) + 1) for h in range(heads)])


def alibi_bias(slopes: torch.Tensor, allowed: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """The additive mask [H, T, S] in `dtype` of attention under ALiBi: slope × (key pos - query pos) where
    a query sees a key (`allowed`, [T, S]), -inf elsewhere; computed in fp32 (llama.cpp's mask of
    -|query pos - key pos|, times each head's slope)."""
    rel = (kpos - qpos).float()
    bias = slopes.float().view(-1, 1, 1).to(rel.device) * rel
    return bias.masked_fill(~allowed, float("-inf")).to(dtype)


apply_rope = glue_ops.rope  # x [B, H, T, hd], rot [2, T, rope_dim] -> x rotated (glue_ops.rope)


# ----------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Keys and values of past positions, per layer: k[i], v[i] [B, Hkv, max_len, hd] (v: the value
    width, ModelConfig.v_dim; both empty in the layers without attention: LFM2's short convolutions,
    Mamba2 layers and Qwen3.5's Gated DeltaNets, whose state is conv_state[i] [B, channels, kernel - 1],
    the last positions of their convolution's input, and for a Mamba2 layer recurrent_state[i] [B,
    heads, head_dim, state], for a DeltaNet [B, heads, d_k, d_v] in fp32, the state after the last
    position).

    `length` is how many positions are filled; the model appends and advances it. Sliding layers
    keep every position too; their attention masks the ones outside the window. `attn_mask`, when
    a cache sets it (generate's fixed-length decode cache), is the boolean mask of the positions a
    new token attends to among those update() returned."""

    attn_mask: torch.Tensor | None = None

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device, dtype: torch.dtype):
        def kv(i, width):  # (each layer's own widths: ModelConfig.at_layer)
            c = config.at_layer(i)
            shape = (batch, c.n_kv_heads, max_len, width(c)) if config.has_attention(i) else (0,)
            return torch.zeros(shape, device=device, dtype=dtype)
        self.k = [kv(i, lambda c: c.head_dim) for i in range(config.n_layers)]
        self.v = [kv(i, lambda c: c.v_dim) for i in range(config.n_layers)]
        # the lightning indexer's one key head [B, 1, max_len, width] in fp32, as it computes (DeepSeek-V3.2;
        # empty without one)
        self.indexer_k = [torch.zeros((batch, 1, max_len, config.indexer_head_dim) if config.indexer_heads
                                      and config.has_attention(i) and config.indexer_source(i) == i else (0,),
                                      device=device, dtype=torch.float32)
                          for i in range(config.n_layers)]
        self.conv_state: dict[int, torch.Tensor] = {}
        self.recurrent_state: dict[int, torch.Tensor] = {}
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, Hkv, T, hd] at positions start..start+T; return all keys/values so far."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} were asked for")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def update_indexer(self, layer: int, start: int, k: torch.Tensor) -> torch.Tensor:
        """Write the lightning indexer's keys k [B, 1, T, width] at positions start..start+T; return all so far."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} were asked for")
        self.indexer_k[layer][:, :, start:end] = k
        return self.indexer_k[layer][:, :, :end]

    def store(self, layer: int, start: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              rot: torch.Tensor, style: str):
        """RoPE on q and k [B, H|Hkv, T, hd] (tables rot, glue_ops.rope), then update(); returns
        (q rotated, all keys, all values so far)."""
        return (apply_rope(q, rot, style), *self.update(layer, start, apply_rope(k, rot, style), v))

    def attend_step(self, layer: int, q: torch.Tensor, scale: float | None, cap: float) -> torch.Tensor | None:
        """A one-token step's attention read straight from the cache, where the cache has a kernel
        for it (generate's StaticKVCache); None: the layer attends over what store() returned."""
        return None


# ----------------------------------------------------------------------------------------------
# Decoder


def fused_splits(config: ModelConfig, index: int, names) -> dict[str, tuple[tuple[str, int, int], ...]]:
    """The fused tensors of layer `index` among `names` (GGUF tensor names): fused weight name ->
    ((logical weight name, first row, end row), ...). attn_qkv holds q, k, v rows; Phi-3's ffn_up
    [2F, D] (with no ffn_gate) holds the gate rows, then the up rows."""
    c, p = config, f"blk.{index}."
    q, kv, f = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.ffn_dim
    if c.family.attn_output_gate:  # (Qwen3.5: q's rows hold each head's q and gate)
        q *= 2
    out = {}
    if p + "attn_qkv.weight" in names and not c.is_delta(index):  # (a DeltaNet's attn_qkv is its own linear)
        out[p + "attn_qkv.weight"] = ((p + "attn_q.weight", 0, q), (p + "attn_k.weight", q, q + kv),
                                      (p + "attn_v.weight", q + kv, q + 2 * kv))
    if p + "ffn_gate.weight" not in names and p + "ffn_up.weight" in names \
            and tuple(names[p + "ffn_up.weight"].shape)[0] == 2 * f:
        out[p + "ffn_up.weight"] = ((p + "ffn_gate.weight", 0, f), (p + "ffn_up.weight", f, 2 * f))
    return out


def _linears(config: ModelConfig, index: int, w: Mapping[str, object]) -> dict[str, QLinear]:
    """The seven logical linears of layer `index`, fused tensors cut into row views (no copy: packed
    rows are independent, so a row range of the blocks is a valid QTensor)."""
    p = f"blk.{index}."
    out = {}
    for fused, parts in fused_splits(config, index, w).items():
        qt, fused_bias = w[fused], w.get(fused[:-len("weight")] + "bias")
        for name, a, b in parts:
            bias = _vector(fused_bias)[a:b] if fused_bias is not None else w.get(name[:-len("weight")] + "bias")
            view = qt.rows(a, b)
            out[name[len(p):-len(".weight")]] = QLinear(view, name, bias, fused_from=(fused, a, b))
    experts_only = config.has_experts(index) and not config.family.moe_beside_ffn
    names = LINEAR_NAMES[:4] if experts_only else LINEAR_NAMES  # (experts: MoE's own)
    if not config.has_attention(index):  # (a short convolution's: ShortConv's own; a Mamba2 layer's: ssm_in/out)
        ssm = MAMBA_LINEAR_NAMES if config.family.mamba1 else SSM_LINEAR_NAMES
        names = names[4:] + (ssm if config.is_ssm(index) else ())
        if index in config.linear_attention_layers:  # (Deci's linear in attention's place)
            names = ("attn_output",) + names
        if config.is_delta(index):  # (a Gated DeltaNet's in place of attention's; b and a fused or not)
            fused_ba = ("ssm_alpha", "ssm_beta") if p + "ssm_ba.weight" in w else ("ssm_ba",)
            delta = KDA_LINEAR_NAMES if config.family.kda else DELTA_LINEAR_NAMES
            names = tuple(n for n in delta if n not in fused_ba) + names
    elif config.kv_lora_rank:
        names = tuple(latent_linear_shapes(config)) + names[4:]
    elif config.is_ssm(index):  # (Falcon-H1: a Mamba2 mixer's linears beside attention's)
        names = tuple(names) + SSM_LINEAR_NAMES
    elif config.family.attn_gate:  # (AFMoE, Laguna: the heads' output gate)
        names = tuple(names) + ("attn_gate",)
    if not config.has_kv(index):  # (K/V reused from an earlier layer)
        names = [n for n in names if n not in ("attn_k", "attn_v")]
    if config.family.values_from_keys and p + "attn_v.weight" not in w:  # (attn_k's projection: Gemma 4)
        names = [n for n in names if n != "attn_v"]
    if not config.has_ffn(index):  # (a mixer alone: Nemotron-H)
        names = [n for n in names if not n.startswith("ffn_")]
    for name in names if config.family.gated else [n for n in names if n != "ffn_gate"]:
        if name not in out:
            out[name] = QLinear(w[p + name + ".weight"], p + name + ".weight", w.get(p + name + ".bias"))
    return out


def neox_pairing(rot: torch.Tensor) -> torch.Tensor:
    """RoPE tables [..., rope_dim] laid out for "norm" pairing (adjacent dims) relaid for "neox" (halves)."""
    return torch.cat((rot[..., 0::2], rot[..., 1::2]), dim=-1)


class LightningIndexer(nn.Module):
    """DeepSeek's lightning indexer (DeepSeek Sparse Attention, Family.indexer): the keys each query of
    a latent-attention layer attends to, the top_k its score Σ_h w_h · relu(q_h · k) ranks best, as
    llama.cpp's deepseek32 graph picks them. q_h = attn_q_b(q's normed latent), one key head
    k = k_norm(attn_k(x)), both rotated on their first rope_dim dims in the family's indexer pairing,
    w = proj(x) / √(heads · width). The selection takes no gradient, so its linears stay frozen (their
    names are not attention's: adapters leave them alone)."""

    def __init__(self, config: ModelConfig, index: int, w: Mapping[str, object]):
        super().__init__()
        c, p = config, f"blk.{index}.indexer."
        self.index, self.heads, self.width, self.top_k = index, c.indexer_heads, c.indexer_head_dim, c.indexer_top_k
        self.style, self.relaid = c.family.indexer, c.family.indexer != c.family.rope
        self.wq_b = QLinear(w[p + "attn_q_b.weight"], p + "attn_q_b.weight")
        self.wk = QLinear(w[p + "attn_k.weight"], p + "attn_k.weight")
        self.weights_proj = QLinear(w[p + "proj.weight"], p + "proj.weight")
        self.k_norm = LayerNorm(w[p + "k_norm.weight"], c.family.indexer_norm_eps, w[p + "k_norm.bias"])

    @torch.no_grad()
    def forward(self, h: torch.Tensor, q_latent: torch.Tensor, rot: torch.Tensor, cache: KVCache | None = None,
                start: int = 0) -> torch.Tensor:
        """The keys that queries h [B, T, D] at positions start..start+T attend to: [B, 1, T, start + T] bool,
        causal and at most top_k of them (all of them where a query has no more than top_k before it).
        q_latent [B, T, q_lora_rank]: attn_q_a_norm(attn_q_a(h)); rot: the layer's RoPE tables."""
        b, t, _ = h.shape
        h, q_latent = h.float(), q_latent.float()  # (in fp32 whatever the activations: the choice flips near ties)
        r = neox_pairing(rot) if self.relaid else rot
        q = apply_rope(self.wq_b(q_latent).view(b, t, self.heads, self.width).transpose(1, 2), r, self.style)
        k = apply_rope(self.k_norm(self.wk(h)).unsqueeze(1), r, self.style)  # [B, 1, T, width]
        if cache is not None:
            k = cache.update_indexer(self.index, start, k)
        s = k.shape[2]
        causal = torch.arange(s, device=h.device)[None, :] <= torch.arange(start, start + t, device=h.device)[:, None]
        if s <= self.top_k:  # (every query keeps all its keys)
            return causal.expand(b, 1, t, s)
        weights = self.weights_proj(h) / math.sqrt(self.heads * self.width)  # [B, T, heads]
        rows = max(1, self.SCORES // (b * self.heads * s))  # (queries a chunk: [B, heads, rows, S] of scores)
        kept = [self._best(q[:, :, a:a + rows], k, weights[:, a:a + rows], causal[a:a + rows])
                for a in range(0, t, rows)]
        return torch.cat(kept, dim=1).unsqueeze(1)

    SCORES = 1 << 26  # the most per-head scores held at once (256 MiB in fp32)

    def _best(self, q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        """[B, rows, S] bool: the top_k keys of queries q [B, heads, rows, width] among keys k [B, 1, S, width],
        scored with their weights [B, rows, heads], of those causal [rows, S] lets them see."""
        scores = torch.einsum("bhts,bth->bts", torch.relu(q @ k.transpose(-1, -2)), weights)
        best = scores.masked_fill(~causal, float("-inf")).topk(self.top_k, dim=-1).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, best, True) & causal


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int, w: Mapping[str, object]):
        super().__init__()
        c, fam = config.at_layer(index), config.family
        self.config, self.index = c, index
        self.attends = c.has_attention(index)  # (a flag, not a lookup by index: compiled layers share their graphs)
        self.window = c.window(index)
        self.rope_kind = c.rope_kind(index)
        self.l2_normed = c.l2_normed(index)
        p = f"blk.{index}."
        # the GGUF layer name of each norm whose attribute is another name
        self.norm_files = {"ffn_norm": fam.ffn_norm_tensor}
        if fam.post_norms:  # (Grok's names of them; gpt-oss's FFN norm is its file's post_attention_norm)
            self.norm_files.update(post_attention_norm=fam.post_norm_tensors[0], post_ffw_norm=fam.post_norm_tensors[1])
        attrs = {file: attr for attr, file in self.norm_files.items()}
        for name, shape in layer_norm_shapes(c, index).items():
            if fam.qk_norm_optional and name in QK_NORM_NAMES and p + name + ".weight" not in w:
                continue  # (GLM-4.5 MoE's q/k norms: where the file has them)
            setattr(self, attrs.get(name, name), make_norm(fam, w, p + name, c.norm_eps, shape[0]))
        if fam.attn_norm_2 and p + "attn_norm_2.weight" in w:  # (Falcon 40B: attention's own norm, attn_norm the FFN's)
            self.ffn_norm, self.attn_norm = self.attn_norm, make_norm(fam, w, p + "attn_norm_2", c.norm_eps,
                                                                   c.dim)
            self.norm_files = {"attn_norm": "attn_norm_2", "ffn_norm": "attn_norm"}
        if not fam.pre_norms:
            self.attn_norm, self.ffn_norm = NoNorm(), NoNorm()
        for name, lin in _linears(c, index, w).items():
            setattr(self, name, lin)
        self.ffn_moe = MoE(c, index, w) if c.has_experts(index) else None  # in place of ffn_gate/up/down
        # the keys each query attends to (DeepSeek-V3.2), or the layer whose indexer picks them (GLM-5.2's shared
        # layers: its choice read from indexer_choices, one dict the model's layers share)
        own = c.indexer_heads and self.attends and c.indexer_source(index) == index
        self.indexer = LightningIndexer(c, index, w) if own else None
        self.indexer_source = c.indexer_source(index) if c.indexer_heads and not own else None
        self.indexer_choices: dict[int, torch.Tensor] = {}
        self.shortconv = ShortConv(c, index, w) if c.is_conv(index) else None  # in place of attention (LFM2)
        # between ssm_in and ssm_out (Granite 4; Mamba 1's, around ssm_x and ssm_dt: Mamba)
        self.mamba = (Mamba if fam.mamba1 else Mamba2)(c, index, w) if c.is_ssm(index) else None
        self.delta_net = c.is_delta(index)  # a Gated DeltaNet in place of attention (Qwen3.5): its frozen parts
        if self.delta_net:  # (Kimi Delta Attention's q, k and v kernels apart, joined as one convolution's)
            kernels = [p + f"ssm_conv1d_{x}.weight" for x in "qkv"] if fam.kda else [p + "ssm_conv1d.weight"]
            self.register_buffer("ssm_conv1d", torch.cat([_table(w[k]).reshape(-1, c.ssm_conv_kernel)
                                                          for k in kernels]), persistent=False)
            self.register_buffer("ssm_a", _vector(w[p + "ssm_a"]), persistent=False)  # -exp(A_log)
            self.register_buffer("ssm_dt", _vector(w[p + "ssm_dt.bias"]), persistent=False)
            self.ssm_norm = RMSNorm(w[p + "ssm_norm.weight"], c.norm_eps)
        # a learned logit per head that joins each query's softmax and takes no value (gpt-oss)
        sinks = w.get(p + "attn_sinks.weight")
        self.register_buffer("attn_sinks", None if sinks is None else _vector(sinks), persistent=False)
        # ALiBi's slopes, one a head (BLOOM, MPT), fp32 as llama.cpp's
        self.register_buffer("alibi_slopes", alibi_slopes(c), persistent=False)
        # xIELU's scalars (Apertus), frozen as the layer's other base weights
        xielu = torch.tensor(c.xielu[index], dtype=torch.float32) if c.xielu else None
        self.register_buffer("xielu", xielu, persistent=False)
        self.activation = c.mlp_activation or fam.activation  # of the gated MLP (glue_ops.ACTIVATIONS)
        if fam.attn_gate:  # (AFMoE, Laguna: the output gate reads attention's input, in its product)
            self.PRODUCT_GROUPS = (self.PRODUCT_GROUPS[0] + ("attn_gate",), *self.PRODUCT_GROUPS[1:])
        self.grouped: dict[tuple[str, ...], QLinear] = {}  # group_products(); not submodules
        # token chunks the MLP runs in without autograd and in checkpoint_backward (set by
        # lowtune.streaming's plan where a budget needs one chunk's intermediates at a time)
        self.mlp_chunks = 1
        # (attention_branch, norm_mlp) as lowtune.compile compiled them, for checkpoint_backward;
        # None: eager
        self.compiled_parts = None

    # Linears that read the same input, in the order their outputs are split.
    PRODUCT_GROUPS = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))

    def group_products(self) -> None:
        """Regroup the packed rows of q, k, v (and of gate, up) into one matrix each, where the
        parts are plain QLinears of one format, width and device, so that an inference step reads
        each group in one product: fewer launches, and at one token a grid large enough to fill
        the GPU. The parts become row views of the grouped storage (moved, not copied: packed rows
        are independent), so they stay what training, adapters, merging and export use; a part
        that is replaced (an adapter) or moved (.to) ends its group's use (_group)."""
        for names in self.PRODUCT_GROUPS:
            parts = [getattr(self, n, None) for n in names]  # (a MoE layer has no ffn_gate/up)
            if names in self.grouped or not all(type(p) is QLinear for p in parts):
                continue
            first = parts[0]
            if any(p.format != first.format or p.in_features != first.in_features or p.raw.device != first.raw.device
                   or (p.bias is None) != (first.bias is None) for p in parts):
                continue
            raw = torch.cat([p.raw for p in parts])
            bias = torch.cat([p.bias for p in parts]) if first.bias is not None else None
            rows = 0
            for p in parts:
                a, rows = rows, rows + p.out_features
                p.raw = raw[a:rows]
                if bias is not None:
                    p.bias = bias[a:rows]
            self.grouped[names] = QLinear(QTensor(raw, first.format, (rows, first.in_features)), "+".join(names), bias)

    def _group(self, names: tuple[str, ...]) -> QLinear | None:
        """The grouped linear of `names` if every part is still a view of its storage (bytes and
        bias), in inference."""
        g = self.grouped.get(names)
        if g is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        row = 0
        for n in names:
            p = getattr(self, n)
            if type(p) is not QLinear or p.raw.device != g.raw.device \
                    or p.raw.data_ptr() != g.raw[row:].data_ptr() or p.raw.shape != g.raw[row:row + p.out_features].shape:
                return None
            if g.bias is not None and (p.bias is None or p.bias.data_ptr() != g.bias[row:].data_ptr()):
                return None
            row += p.out_features
        return g

    def _apply(self, fn, recurse=True):
        self.grouped = {}  # .to() moves each part on its own: the groups' storage would be stale
        return super()._apply(fn, recurse)

    def _products(self, h: torch.Tensor, names: tuple[str, ...]) -> list[torch.Tensor]:
        """[linear(h) for each of names], through their grouped product where there is one."""
        g = self._group(names)
        if g is None:
            return [getattr(self, n)(h) for n in names]
        return list(g(h).split([getattr(self, n).out_features for n in names], dim=-1))

    def forward(self, x: torch.Tensor, rot: torch.Tensor, cache: KVCache | None = None,
                start: int = 0) -> torch.Tensor:
        """x [B, T, D] at positions start..start+T -> [B, T, D]. rot: the model's RoPE tables
        [kinds, T, rope_dim/2] (Model.rope_rotation); this layer uses rot[self.rope_kind].
        Without autograd the MLP runs in mlp_chunks token chunks (rows are independent); with
        autograd it runs whole (a checkpointed layer's backward chunks it: checkpoint_backward)."""
        y, h = self.attend(x, rot, cache, start)
        y = y if h is None else y + self._mlp_rows(h)
        return y + self.residual_experts(x) if self.residual_moe else y

    @property
    def residual_moe(self) -> bool:
        """Whether the experts read the layer's input beside the layer (Arctic: Family.moe_residual)."""
        return self.ffn_moe is not None and self.config.family.moe_residual

    def residual_experts(self, x: torch.Tensor) -> torch.Tensor:
        """The experts' output for the layer's input x, normed by ffn_norm_exps (Arctic)."""
        return self.ffn_moe(self.ffn_norm_exps(x))

    def forward_deferred(self, x: torch.Tensor, m: torch.Tensor | None, rot: torch.Tensor,
                         cache: KVCache | None = None, start: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """forward(x + m) as the pair (x', m') whose sum it is (m' None: x' alone), for inference: the residual add
        that ends a layer joins the next layer's first norm (glue_ops.add_rms_norm: one kernel on
        CUDA, where forward's add and norm are two; for one row both norms, and SwiGLU's product,
        run inside the product after them). m None: the pair of forward(x)."""
        c, i = self.config, self.index  # (parallel: the FFN reads the attention's normed input)
        if self.residual_moe:  # (Arctic: the experts read the layer's input; added last, as forward adds them)
            x = x if m is None else x + m
            y, h = self.attend(x, rot, cache, start)
            return y + self._mlp_rows(h), self.residual_experts(x)
        if c.parallel or c.family.parallel_ssm or not (self.attends and c.has_ffn(i)):
            x, h = self.attend(x if m is None else x + m, rot, cache, start)
            return x, None if h is None else self._mlp_rows(h)
        if self.config.kv_lora_rank:  # (latent attention: no grouped q/k/v product)
            x, h = (x, self.attn_norm(x)) if m is None else self.attn_norm.after_residual(x, m)
            a = self.attention_branch(x, rot, cache, start, normed=h)
        else:
            x, qkv = self._normed_products(x, m, self.attn_norm, self.PRODUCT_GROUPS[0])
            a = self.attention_branch(x, rot, cache, start, qkv=qkv)
        # the MLP's rows a chunk at a time, its norm included; experts and ungated MLPs take no grouped
        # product either
        if self.mlp_chunks > 1 or self.ffn_moe is not None or not self.config.family.gated:
            x, h = self.ffn_norm.after_residual(x, a)
            return x, self._mlp_rows(h)
        x, gu = self._normed_products(x, a, self.ffn_norm, self.PRODUCT_GROUPS[1])
        return x, self._mlp_out(*gu)

    def _normed_products(self, x: torch.Tensor, a: torch.Tensor | None, norm: RMSNorm,
                         names: tuple[str, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(s, [linear(norm(s)) for each of names]) for s = x + a (x where a is None): for one row
        on CUDA the norm runs inside the grouped product (glue_ops.add_rms_norm_product), else
        add_rms_norm and then _products."""
        g = self._group(names)
        if g is not None and g.bias is None and type(norm) is RMSNorm:
            done = glue_ops.add_rms_norm_product(x, a, norm.weight, norm.eps, g.weight)
            if done is not None:
                s, y = done
                return s, list(y.split([getattr(self, n).out_features for n in names], dim=-1))
        s, h = (x, norm(x)) if a is None else norm.after_residual(x, a)
        return s, self._products(h, names)

    def _mlp_rows(self, h: torch.Tensor) -> torch.Tensor:
        """mlp(h), in mlp_chunks token chunks without autograd (rows are independent)."""
        if self.mlp_chunks > 1 and not torch.is_grad_enabled():
            rows = h.reshape(-1, h.shape[-1])
            return torch.cat([self.mlp(part) for part in rows.tensor_split(self.mlp_chunks)]).view_as(h)
        return self.mlp(h)

    def attend(self, x: torch.Tensor, rot: torch.Tensor, cache: KVCache | None = None,
               start: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer up to its MLP: (x after the attention's residual add, the MLP's normed input; None
        where the layer has no MLP). A layer of an MLP alone norms its input with attn_norm (Nemotron-H)."""
        c, i = self.config, self.index
        if not c.has_mixer(i):  # (Deci's FFN alone reads its ffn_norm; without an FFN, the layer passes x on)
            if not c.has_ffn(i):
                return x, None
            return x, (self.ffn_norm if hasattr(self, "ffn_norm") else self.attn_norm)(x)
        if not c.has_ffn(i):
            return x + self.attention_branch(x, rot, cache, start), None
        if c.parallel:  # (the FFN's input: its own norm of x where it has one, GPT-NeoX's, Falcon 40B's; else h)
            h = self.attn_norm(x)
            return x + self.attention_branch(x, rot, cache, start, normed=h), \
                self.ffn_norm(x) if hasattr(self, "ffn_norm") else h
        return self.ffn_norm.after_residual(x, self.attention_branch(x, rot, cache, start))

    def attention_branch(self, x: torch.Tensor, rot: torch.Tensor, cache: KVCache | None = None,
                         start: int = 0, normed: torch.Tensor | None = None,
                         qkv: list[torch.Tensor] | None = None) -> torch.Tensor:
        """What the attention adds to the residual stream x (its post-norm applied, where the
        family has one). normed: attn_norm(x), where the caller computed it (checkpoint_backward);
        qkv: the q, k, v products of it (forward_deferred)."""
        if self.config.family.parallel_ssm:  # (Falcon-H1: its Mamba2 mixer beside attention, on the same input)
            h = self.attn_norm(x) if normed is None else normed
            mixed = self.ssm_out(self.mamba(self.ssm_in(h), cache, start))
            return self.attention_alone(x, rot, cache, start, h) + mixed
        return self.attention_alone(x, rot, cache, start, normed, qkv)

    def attention_alone(self, x: torch.Tensor, rot: torch.Tensor, cache: KVCache | None = None, start: int = 0,
                        normed: torch.Tensor | None = None, qkv: list[torch.Tensor] | None = None) -> torch.Tensor:
        """attention_branch's attention, or its recurrent stand-in, without a Mamba2 mixer beside it."""
        c, fam = self.config, self.config.family
        if not self.attends:  # (attention's stand-ins: LFM2, Mamba2, Gated DeltaNet, Deci's linear)
            h = self.attn_norm(x) if normed is None else normed
            if self.index in c.linear_attention_layers:
                return self.attn_output(h)
            if self.shortconv is not None:
                return self.shortconv(h, cache, start)
            if self.delta_net:
                return self.delta_net_branch(h, cache, start)
            if fam.mamba1:  # (post-normed as attention: PLaMo 2)
                a = self.ssm_out(self.mamba(self.ssm_in(h), self.ssm_x, self.ssm_dt, cache, start))
                return self.post_attention_norm(a) if fam.post_norms else a
            a = self.ssm_out(self.mamba(self.ssm_in(h), cache, start))
            return a * c.residual_scale if c.residual_scale != 1.0 else a
        b, t, _ = x.shape
        kept = None  # the keys each query attends to, where an indexer picks them
        if qkv is None:
            h = self.attn_norm(x) if normed is None else normed
            if c.kv_lora_rank:
                *qkv, q_latent = self._latent_qkv(h)
                if self.indexer is not None:
                    kept = self.indexer(h, q_latent, rot[self.rope_kind], cache, start)
                    if c.indexer_shared:  # (for the layers after it that reuse its choice)
                        self.indexer_choices[self.index] = kept
                elif self.indexer_source is not None:
                    kept = self.indexer_choices[self.indexer_source]
            else:
                qkv = self._products(h, self.PRODUCT_GROUPS[0])
        q, k, v, *own_gate = qkv  # (AFMoE's and Laguna's gate: its own product beside them)
        if c.clamp_qkv:  # (OLMo's and MPT's clip_qkv, as llama.cpp's build_qkv clamps them)
            q, k, v = (t.clamp(-c.clamp_qkv, c.clamp_qkv) for t in (q, k, v))
        gate = own_gate[0] if own_gate else None
        if fam.attn_output_gate:  # each head's q, then its gate
            q, gate = q.view(b, t, c.n_heads, 2, c.head_dim).unbind(3)
            gate = gate.reshape(b, t, c.n_heads * c.head_dim)
        if fam.qk_norm == "whole":
            q, k = self.attn_q_norm(q), self.attn_k_norm(k)
        q = q.reshape(b, t, c.n_heads, c.head_dim)
        k = k.view(b, t, c.n_kv_heads, c.head_dim)
        v = v.view(b, t, c.n_kv_heads, c.v_dim).transpose(1, 2)
        late = fam.qk_norm_after_rope or self.l2_normed  # (Hunyuan's per-head norms, Llama 4's L2: after RoPE)
        if fam.qk_norm == "head" and not late and hasattr(self, "attn_q_norm"):
            q, k = self.attn_q_norm(q), self.attn_k_norm(k)
        q, k, r = q.transpose(1, 2), k.transpose(1, 2), rot[self.rope_kind]
        if cache is None or late:
            q, k = apply_rope(q, r, fam.rope), apply_rope(k, r, fam.rope)
            if self.l2_normed:
                l2 = lambda x: F.rms_norm(x.float(), x.shape[-1:], None, c.norm_eps).to(x.dtype)  # noqa: E731
                q, k = l2(q), l2(k)
            elif late:
                q, k = self.attn_q_norm(q), self.attn_k_norm(k)
            if cache is not None:
                k, v = cache.update(self.index, start, k, v)
        else:
            q, k, v = cache.store(self.index, start, q, k, v, r, fam.rope)
        mask, attn = (None if cache is None else cache.attn_mask), None
        if kept is not None:  # (in place of causality: the cache of a model with an indexer sets no mask)
            mask = kept
        if c.attn_temperature and start + t > c.original_context:  # (1 within the original context)
            pos = torch.arange(start, start + t, device=q.device, dtype=torch.float32)
            q = (q.float() * attn_temperature(c.attn_temperature, c.original_context, pos)[:, None]).to(q.dtype)
        if fam.nope_temperature and self.rope_kind == NO_ROPE and start + t >= NOPE_TEMPERATURE_FLOOR:
            pos = torch.arange(start + 1, start + t + 1, device=q.device, dtype=torch.float32)  # (offset 1)
            q = (q.float() * attn_temperature(NOPE_TEMPERATURE, NOPE_TEMPERATURE_FLOOR, pos)[:, None]).to(q.dtype)
        # (sinks, ALiBi, an indexer's keys: the cache's kernel has none)
        if cache is not None and self.attn_sinks is None and self.alibi_slopes is None and kept is None:
            attn = cache.attend_step(self.index, q, c.query_scale, c.attn_softcap)
        if attn is None:
            attn = attention(q, k, v, start, c.query_scale, self.window, c.attn_softcap, mask, self.attn_sinks,
                             fam.chunked_attention, self.alibi_slopes)
        attn = attn.transpose(1, 2).reshape(b, t, c.n_heads * c.v_dim)
        if gate is not None:  # (sigmoid: Qwen3.5's, AFMoE's; softplus: Laguna's, in fp32 as transformers)
            g = F.softplus(gate.float()).to(gate.dtype) if fam.attn_gate == "softplus" else torch.sigmoid(gate)
            if g.shape[-1] == c.n_heads:  # (one a head: Laguna-XS.2's)
                attn = (attn.view(b, t, c.n_heads, c.v_dim) * g.unsqueeze(-1)).view_as(attn)
            else:
                attn = attn * g
        a = self.attn_output(self.attn_sub_norm(attn) if fam.sub_norms else attn)
        if c.attn_value_scale != 1.0:  # (MiMo-V2-Flash: the values', on the output as llama.cpp scales it)
            a = a * c.attn_value_scale
        if c.residual_scale != 1.0:
            a = a * c.residual_scale
        return self.post_attention_norm(a) if fam.post_norms else a

    def _latent_qkv(self, h: torch.Tensor) -> list[torch.Tensor | None]:
        """Multi-head latent attention's q, k [B, T, H·hd] and v [B, T, H·v_dim] for normed inputs h,
        decompressed (every head's key and value made whole, as llama.cpp's graph without the absorbed
        products): each head of q and k laid out (RoPE part, no-RoPE part), so that RoPE, the cache
        and the attention take them as any family's (a dot product does not see the order); then q's
        normed latent [B, T, q_lora_rank] (None where q comes straight from h), which an indexer reads."""
        c = self.config
        b, t, _ = h.shape
        rope, rank, heads = c.rope_dim, c.kv_lora_rank, c.n_heads
        q_latent = self.attn_q_a_norm(self.attn_q_a(h)) if c.q_lora_rank else None
        q = self.attn_q_b(q_latent) if c.q_lora_rank else self.attn_q(h)
        q = q.view(b, t, heads, c.head_dim)
        ckr = self.attn_kv_a_mqa(h)
        latent, k_rope = self.attn_kv_a_norm(ckr[..., :rank]), ckr[..., rank:]
        nope = c.head_dim - rope
        if c.kv_b_whole:  # each head's key rows, then its value rows
            k_nope, v = self.attn_kv_b(latent).view(b, t, heads, nope + c.v_dim).split([nope, c.v_dim], dim=-1)
            v = v.reshape(b, t, -1)
        else:
            # attn_k_b holds each head's [kv_lora_rank, no-RoPE dims] (rows of the keys' latent): its
            # product with the identity is its transpose, so an adapter on it is in the keys too
            eye = torch.eye(nope, dtype=h.dtype, device=h.device)
            k_b = self.attn_k_b(eye).view(nope, heads, rank)
            k_nope, v = torch.einsum("btr,nhr->bthn", latent, k_b.to(latent.dtype)), self.attn_v_b(latent)
        k = torch.cat([k_rope[:, :, None, :].expand(b, t, heads, rope), k_nope], dim=-1)
        q = torch.cat([q[..., nope:], q[..., :nope]], dim=-1)
        return [q.reshape(b, t, -1), k.reshape(b, t, -1), v, q_latent]

    def delta_net_branch(self, h: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """A Gated DeltaNet's output for normed h [B, T, D] at positions start..start+T, as llama.cpp's
        qwen35 runs it: attn_qkv(h) through the causal depthwise convolution (the cache's last inputs
        first) and SiLU into q, k, v; q and k L2-normed, each value head reading q/k head i mod (q/k heads)
        (the converter tiles Qwen3.5's value heads so; Qwen3-Next's are grouped: head i // (value heads per
        q/k head)); gated_delta_rule with the decay ssm_a · softplus(alpha +
        dt) and beta = sigmoid(ssm_beta(h)); each head's output RMS-normed, times silu(attn_gate(h)),
        through ssm_out. Kimi Delta Attention (Family.kda), as llama.cpp's kimi-linear: attn_q, attn_k and
        attn_v each through its own convolution, as many q/k heads as value heads, a decay for each key
        channel ssm_a · softplus(ssm_f_b(ssm_f_a(h)) + dt), and the output times sigmoid(ssm_g_b(ssm_g_a(h)))
        through attn_output."""
        c = self.config
        b, t, _ = h.shape
        hk, hv, dk, dv = c.ssm_k_heads, c.ssm_v_heads, c.ssm_head_dim, c.ssm_inner // c.ssm_v_heads
        fam = c.family
        qkv = torch.cat(self._products(h, self.PRODUCT_GROUPS[0]), -1) if fam.kda else self.attn_qkv(h)
        mixed = qkv.float().transpose(1, 2)                                   # [B, channels, T], in fp32
        mixed = F.silu(causal_conv(mixed, self.ssm_conv1d, None, cache, self.index, start)).transpose(1, 2)
        q, k, v = mixed.split([hk * dk, hk * dk, hv * dv], dim=-1)
        if fam.kda:  # (x / √(Σx² + eps), as llama.cpp's build_gdn_l2_norm and transformers' l2norm)
            q, k = (x.view(b, t, hk, dk) * torch.rsqrt(x.view(b, t, hk, dk).square().sum(-1, keepdim=True)
                                                        + c.norm_eps) for x in (q, k))
        else:
            q, k = (F.normalize(x.float().view(b, t, hk, dk), dim=-1, eps=c.norm_eps) for x in (q, k))
        if c.family.delta_heads_grouped:
            q, k = q.repeat_interleave(hv // hk, dim=2), k.repeat_interleave(hv // hk, dim=2)
        else:
            q, k = q.repeat(1, 1, hv // hk, 1), k.repeat(1, 1, hv // hk, 1)
        if fam.kda:  # (a decay for each key channel: low-rank f_a, f_b)
            beta = self.ssm_beta(h).float()
            alpha = self.ssm_f_b(self.ssm_f_a(h)).float().view(b, t, hk, dk)
        elif hasattr(self, "ssm_ba"):  # (Qwen3-Next: each q/k head's b, then its a)
            beta, alpha = self.ssm_ba(h).float().view(b, t, hk, 2, hv // hk).unbind(3)
            beta, alpha = beta.reshape(b, t, hv), alpha.reshape(b, t, hv)
        else:
            beta, alpha = self.ssm_beta(h).float(), self.ssm_alpha(h).float()
        beta = torch.sigmoid(beta)
        g = self.ssm_a[:, None] * F.softplus(alpha + self.ssm_dt.view(hk, dk)) if fam.kda else \
            self.ssm_a * F.softplus(alpha + self.ssm_dt)
        state = cache.recurrent_state.get(self.index) if cache is not None and start else None
        o, state = gated_delta_rule(q * dk ** -0.5, k, v.view(b, t, hv, dv), g, beta, state)
        if cache is not None:
            cache.recurrent_state[self.index] = state
        if fam.kda:  # (the output gate's sigmoid, through attn_output)
            z = self.ssm_g_b(self.ssm_g_a(h)).view(b, t, hv, dv)
            return self.attn_output((self.ssm_norm(o) * torch.sigmoid(z.float())).to(h.dtype).reshape(b, t, -1))
        z = self.attn_gate(h).view(b, t, hv, dv)
        o = (self.ssm_norm(o) * F.silu(z.float())).to(h.dtype)
        return self.ssm_out(o.reshape(b, t, hv * dv))

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        """The MLP's output for normed inputs h [..., D] (row by row: any rows at a time)."""
        if self.ffn_moe is not None and not self.config.family.moe_beside_ffn:
            return self._ffn_out(self.ffn_moe(h))
        if not self.config.family.gated:  # down(act(up(h)))
            return self._ffn_out(self.ffn_down(glue_ops.ungated(self.activation, self.ffn_up(h), self.xielu)))
        return self._mlp_out(*self._products(h, self.PRODUCT_GROUPS[1]))

    def _mlp_out(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """ffn_down(activation(g) · u), its post-norm applied where the family has one; for one row
        on CUDA SwiGLU's product runs inside ffn_down's (glue_ops.silu_mul_product)."""
        if self.config.family.sub_norms:  # (BitNet: the product normed before ffn_down)
            return self._ffn_out(self.ffn_down(self.ffn_sub_norm(glue_ops.gated(self.activation, g, u))))
        m = None
        if self.activation == "silu" and type(self.ffn_down) is QLinear and self.ffn_down.bias is None:
            m = glue_ops.silu_mul_product(g, u, self.ffn_down.weight)
        if m is None:
            m = self.ffn_down(glue_ops.gated(self.activation, g, u))
        return self._ffn_out(m)

    def _ffn_out(self, m: torch.Tensor) -> torch.Tensor:
        """The FFN's output m as the residual stream takes it: scaled, post-normed where the family says."""
        if self.config.residual_scale != 1.0:
            m = m * self.config.residual_scale
        return self.post_ffw_norm(m) if self.config.family.post_norms else m

    def norm_mlp(self, s: torch.Tensor) -> torch.Tensor:
        """The MLP's output for rows s [..., D] of the residual stream, ffn_norm included."""
        return self.mlp(self.ffn_norm(s))

    def checkpoint_backward(self, x: torch.Tensor, rot: torch.Tensor, dy: torch.Tensor,
                            inputs: list[torch.Tensor], recompute=contextlib.nullcontext) -> list[torch.Tensor | None]:
        """The gradients of layer(x, rot) against dy for `inputs` (x and parameters; None where
        one gets none), recomputing the layer from its input x: a checkpointed layer's backward.
        recompute(): the context the recomputation runs in (the forward's autocast); the
        gradients are taken outside it. With mlp_chunks > 1 the MLP, its norm included, is
        recomputed and differentiated one token chunk at a time, after the attention's
        recomputation, so only one chunk's [rows, F] intermediates, and the norm's fp32 input and
        normed output, are alive; its forward still runs once. attn_norm's fp32 input is one
        chunk's too: the attention is recomputed from its normed output, whose gradient goes
        through the norm chunk by chunk at the end (the products' launches stay one per layer:
        each chunk of them would add its kernel nodes to the layer's CUDA graphs)."""
        c, i = self.config, self.index  # (parallel: the MLP's input is not x1's; a layer of one part: one step;
        #                                 Arctic's experts read x)
        if self.mlp_chunks <= 1 or c.parallel or self.residual_moe or not (c.has_mixer(i) and c.has_ffn(i)):
            with torch.enable_grad(), recompute():
                y = self(x, rot)
            return list(torch.autograd.grad(y, inputs, dy, allow_unused=True))
        branch, norm_mlp = self.compiled_parts or (self.attention_branch, self.norm_mlp)
        at_x = [i for i, t in enumerate(inputs) if t is x]
        with torch.no_grad(), recompute():
            h = self.attn_norm(x).detach()  # (x itself where the family has no such norm)
        h.requires_grad_(bool(at_x))
        with torch.enable_grad(), recompute():
            x1 = x + branch(x, rot, normed=h)
        grads: list[torch.Tensor | None] = [None] * len(inputs)

        def add(new):
            for i, g in enumerate(new):
                if g is not None:
                    grads[i] = g if grads[i] is None else grads[i] + g

        rows, drows = x1.detach().reshape(-1, x1.shape[-1]), dy.reshape(-1, dy.shape[-1])
        dx1 = torch.empty_like(rows)
        start = 0
        # in forward order: adapter dropout draws its masks as the forward's chunks did
        for part, dpart in zip(rows.tensor_split(self.mlp_chunks), drows.tensor_split(self.mlp_chunks)):
            part = part.detach().requires_grad_()
            with torch.enable_grad(), recompute():
                m = norm_mlp(part)
            d, *rest = torch.autograd.grad(m, [part] + inputs, dpart, allow_unused=True)
            # y = x1 + m: x1's gradient is dy and what comes back through the MLP
            torch.add(d, dpart, out=dx1[start:start + part.shape[0]])
            start += part.shape[0]
            add(rest)
        if not x1.requires_grad:
            return grads
        new = list(torch.autograd.grad(x1, inputs + [h] if at_x else inputs, dx1.view_as(x1), allow_unused=True))
        dh = new.pop() if at_x else None
        add(new)
        if dh is not None:
            # x's gradient through attn_norm (x1's residual gave it dx1 already), recomputed a
            # chunk at a time; the norm draws nothing random, so any order does
            dx, start = grads[at_x[0]].view(-1, x.shape[-1]), 0
            xrows, dh = x.detach().reshape(-1, x.shape[-1]), dh.reshape(-1, x.shape[-1])
            for part, dpart in zip(xrows.tensor_split(self.mlp_chunks), dh.tensor_split(self.mlp_chunks)):
                part = part.detach().requires_grad_()
                with torch.enable_grad(), recompute():
                    n = self.attn_norm(part)
                dx[start:start + part.shape[0]] += torch.autograd.grad(n, part, dpart)[0]
                start += part.shape[0]
        return grads


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float | None = None,
              window: int = 0, cap: float = 0.0, mask: torch.Tensor | None = None,
              sinks: torch.Tensor | None = None, chunked: bool = False,
              alibi: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention. q [B, H, T, hd] at positions start..start+T; k, v [B, Hkv, S, hd] for
    positions 0..S (S = start + T). Query head h reads key/value head h // (H/Hkv), as in ggml.
    scale: on q·k (None: 1/sqrt(hd)); window > 0: query i sees only keys i-window+1..i; cap > 0:
    scores soft-capped before the softmax. mask (broadcast to [B, H, T, S]: bool, True where a
    query sees a key, or additive float, 0 or -inf), when given, replaces causality and the window
    (a fixed-length decode cache's mask; such caches serve models without sliding layers). sinks
    [H], when given: one more logit per head in every query's softmax, with no value (gpt-oss).
    chunked: the window is a chunk instead, query i sees keys of its own chunk of `window`
    positions (floor(pos / window) equal: Llama 4). alibi [H]: ALiBi's slopes (alibi_bias; BLOOM, MPT),
    which a given mask already carries."""
    n_rep = q.shape[1] // k.shape[1]
    gqa = {}
    if n_rep > 1:
        # torch >= 2.5's CPU kernels read shared heads in place: no copies (the soft-capped path
        # multiplies q·kᵀ itself and needs the heads repeated)
        if q.device.type == "cpu" and not cap and sinks is None \
                and tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 5):
            gqa = {"enable_gqa": True}
        else:
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    t, s = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if mask is not None:
        allowed = mask
    else:
        windowed = 0 < window < s  # a window (or chunk) no shorter than the sequence cuts nothing
        if not cap and not windowed and sinks is None and alibi is None:
            if start == 0 and t == s:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **gqa)
            if t == 1:  # one new token sees every cached position
                return F.scaled_dot_product_attention(q, k, v, scale=scale, **gqa)
        qpos = torch.arange(start, start + t, device=q.device)[:, None]
        kpos = torch.arange(s, device=q.device)[None, :]
        allowed = kpos <= qpos
        if windowed:
            allowed = allowed & ((qpos // window == kpos // window) if chunked else (qpos - kpos < window))
        if alibi is not None:
            allowed = alibi_bias(alibi, allowed, qpos, kpos, q.dtype)
    if not cap and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, **gqa)
    # soft-capped scores, or sinks: SDPA has neither, so the scores are materialised (as Hugging
    # Face's eager path)
    scores = (q @ k.transpose(-1, -2)).float() * scale
    if cap:
        scores = softcap(scores, cap)
    scores = scores.masked_fill(~allowed, float("-inf")) if allowed.dtype == torch.bool else scores + allowed.float()
    if sinks is None:
        return torch.softmax(scores, dim=-1).to(v.dtype) @ v
    sink = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return probs.to(v.dtype) @ v


class Model(nn.Module):
    def __init__(self, config: ModelConfig, weights: Mapping[str, object],
                 dtype: torch.dtype = torch.float32):
        """weights: GGUF tensor name -> QTensor (matrices) or float tensor (vectors: norms, biases,
        RoPE factors; a one-row QTensor is read as a vector too)."""
        super().__init__()
        config = config.routed(weights)
        config.check()
        bare = config.family.bare_tensors  # (read under their full names; exports copy the file's names)
        if bare:
            full = lambda n: n + (".bias" if n.endswith(".exp_probs_b") else ".weight")  # noqa: E731
            weights = {full(n) if n.startswith("blk.") and n.rsplit(".", 1)[1] in bare else n: t
                       for n, t in weights.items()}
        _check_weights(config, weights, self.own_tensor_shapes(config))
        c = config
        self.config, self.dtype = c, dtype
        embed_scale = float(torch.tensor(math.sqrt(c.dim), dtype=torch.float32)) if c.family.embed_scale \
            else c.embedding_scale
        self.tok_embd = QEmbedding(weights["token_embd.weight"], dtype, scale=embed_scale)
        # learned absolute positions, one row a position (GPT-2), and the embeddings' norm (BLOOM)
        pos = weights.get("position_embd.weight") if c.family.learned_positions else None
        self.position_embd = None if pos is None else QEmbedding(pos, dtype, "position_embd.weight")
        self.token_embd_norm = make_norm(c.family, weights, "token_embd_norm", c.norm_eps, c.dim) \
            if c.family.embedding_norm else None
        self.layers = nn.ModuleList(self.layer_class(c, i, weights) for i in range(c.n_layers))
        choices: dict[int, torch.Tensor] = {}  # the indexers' last choices, for GLM-5.2's shared layers
        for layer in self.layers:
            layer.indexer_choices = choices
        self.output_norm = make_norm(c.family, weights, c.family.output_norm_tensor, c.norm_eps, c.dim)
        # Tied embeddings: no output.weight; the head then reads tok_embd's blocks (no second copy).
        out = weights.get("output.weight")
        self.output = QLinear(out, "output.weight", weights.get("output.bias")) if out is not None else None
        # fused GGUF tensor -> its logical parts (name, first row, end row), for export to re-fuse
        self.fused_views: dict[str, tuple[tuple[str, int, int], ...]] = {}
        for i in range(c.n_layers):
            self.fused_views.update(fused_splits(c.at_layer(i), i, weights))
        # RoPE speeds [kinds, rope_dim/2] (kind 1: sliding layers with their own base), float64 on
        # the CPU, not buffers, so that model.to(dtype) cannot round them. LongRoPE files carry two
        # factor sets: short up to rope_orig_context positions, long beyond.
        kinds = 1 + max(c.rope_kind(i) for i in range(c.n_layers))
        speeds = lambda factors: torch.stack([rope_inv_freq(c, factors, sliding=bool(k)) for k in range(kinds)])
        long = weights.get("rope_factors_long.weight")
        short = weights.get("rope_factors_short.weight", weights.get("rope_freqs.weight"))
        self.rope_inv_freq = speeds(None if short is None else _vector(short))
        self.rope_inv_freq_long = None if long is None else speeds(_vector(long))
        self._rotation = None                # (key, tensor): the last rope table on the device
        self.gradient_checkpointing = False  # recompute each layer in backward (training)
        self.streamer = None                 # a lowtune.streaming.LayerStreamer, when streaming
        self.loss_chunk_tokens = 1024       # LM-head rows computed at once by loss()
        self.metadata: dict = {}             # the GGUF metadata, when loaded from a file
        self.tensor_types: dict[str, str] = {}

    layer_class = DecoderLayer

    @staticmethod
    def own_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
        """The tensors this model class adds to the family's decoder (name -> shape): none here."""
        return {}

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path, device="cpu", dtype: torch.dtype = torch.float32) -> "Model":
        """The older spelling of lowtune.load_model(path, device=device, dtype=dtype), which builds
        every model (lowtune.loading): matrices stay in their blocks, norms are read as fp32."""
        import lowtune  # the package loads lowtune.loading on first use (loading imports this module)
        return lowtune.load_model(path, device=device, dtype=dtype)

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.float() leave the host packs of streamed layers where they are
        if self.streamer is None:
            return super()._apply(fn, recurse)
        with self.streamer.packs_aside():
            return super()._apply(fn, recurse)

    # -- forward -------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        # not the embedding's: a streamed model may keep it in host memory (lowtune.streaming)
        return self.output_norm.weight.device

    def head_weight(self) -> QTensor:
        """The LM head's packed [V, D] matrix (token_embd when embeddings are tied)."""
        return self.output.weight if isinstance(self.output, QLinear) else self.tok_embd.weight

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        """Normed hidden [..., D] -> logits [..., V] in h's dtype (soft-capped where the family says)."""
        if self.output is not None:
            logits = self.output(h)
        else:
            logits = ops.qmatmul(h.contiguous(), self.tok_embd.weight)
        if self.config.logit_scale != 1.0:
            logits = logits / self.config.logit_scale
        return softcap(logits, self.config.final_softcap)

    def rope_rotation(self, start: int, t: int, context: int | None = None) -> torch.Tensor:
        """apply_rope's tables for positions start..start+T: [kinds, 2, T, rope_dim] float32 (kind 1:
        sliding layers with their own base; NO_ROPE: the identity), the cosines and the signed
        sines of pos·freq scaled by the RoPE attention factor, laid out in the family's pairing;
        computed in float64 on the CPU. context: the length of the context in use (default
        start + T); beyond rope_orig_context LongRoPE's long factors apply, as llama.cpp picks
        them by its context."""
        context = start + t if context is None else context
        inv = self.rope_inv_freq
        if self.rope_inv_freq_long is not None and \
                context > self.config.original_context:
            inv = self.rope_inv_freq_long
        pos = torch.arange(start, start + t, dtype=torch.float64)
        ang = pos[None, :, None] * inv[:, None, :]                  # [kinds, T, rope_dim/2]
        m = torch.full((inv.shape[0], 1, 1), self.config.rope_attn_factor, dtype=torch.float64)
        if self.config.swa_unscaled_yarn:
            m[1:] = 1.0  # (kind 1 is the sliding layers')
        cos, sin = ang.cos() * m, ang.sin() * m
        if self.config.family.rope == "norm":                       # adjacent pairs
            table = torch.stack((torch.stack((cos, cos), -1), torch.stack((-sin, sin), -1)), 1).flatten(-2)
        else:                                                        # halves
            table = torch.stack((torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)), 1)
        if table.shape[0] > NO_ROPE:
            table[NO_ROPE, 0], table[NO_ROPE, 1] = 1.0, 0.0
        return table.float()

    @torch.compiler.disable
    def _rotation_on_device(self, start: int, t: int, context: int | None = None) -> torch.Tensor:
        """rope_rotation(start, t, context) on the model's device. The last one is kept: a training
        step would otherwise copy it host -> device every time, which waits for the GPU."""
        key = (start, t, context, self.device)
        if self._rotation is None or self._rotation[0] != key:
            self._rotation = (key, self.rope_rotation(start, t, context).to(self.device))
        return self._rotation[1]

    def hidden(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """ids [B, T] -> final normed hidden states [B, T, D] in the activation dtype.
        With a cache, ids continue the cached sequence and the cache is extended."""
        if ids.dim() != 2:
            raise ValueError(f"ids must have shape [B, T], got {tuple(ids.shape)}")
        start = cache.length if cache is not None else 0
        t = ids.shape[1]
        self.check_positions(start + t)
        rot = self._rotation_on_device(start, t, cache.max_len if cache is not None else None)
        x = self.embed(ids, start)
        x = self.normed_layers(x, rot, cache, start)
        if cache is not None:
            cache.length = start + t
        return x

    @property
    def max_positions(self) -> int | None:
        """The positions the model has learned embeddings for (position_embd's rows: GPT-2), which no
        sequence may pass; None: no such bound."""
        return None if self.position_embd is None else self.position_embd.num_embeddings

    def check_positions(self, end: int) -> None:
        """A ValueError where positions up to `end` pass the learned ones (max_positions)."""
        if self.max_positions is not None and end > self.max_positions:
            raise ValueError(f"this {self.config.arch} model has learned embeddings for {self.max_positions} "
                             f"positions (position_embd) and none beyond; {end} were asked for: use a sequence "
                             f"(--seq-len, a prompt and its new tokens) of at most {self.max_positions} tokens")

    def embed(self, ids: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
        """The input of the first layer for ids [B, T] at positions start..start+T (start an int, or a
        device tensor [1]: StepDecoder's): the token embeddings, gathered where they live and decoded on
        the model's device, plus the learned position rows (GPT-2), normed by token_embd_norm (BLOOM)."""
        x = self.tok_embd(ids, self.device)
        if self.position_embd is not None:
            pos = start + torch.arange(ids.shape[1], device=self.position_embd.raw.device)
            x = x + self.position_embd(pos, self.device)
        return x if self.token_embd_norm is None else self.token_embd_norm(x)

    def normed_layers(self, x: torch.Tensor, rot: torch.Tensor, cache: KVCache | None = None,
                      start: int = 0) -> torch.Tensor:
        """x [B, T, D] at positions start..start+T through every layer, then output_norm.
        Without autograd, with the layers resident and eager, each layer's closing residual add
        joins the next norm (DecoderLayer.forward_deferred), the same values in one kernel less
        per layer."""
        if not torch.is_grad_enabled() and self.streamer is None and all(
                type(layer) is DecoderLayer and layer._compiled_call_impl is None
                and not (layer._forward_hooks or layer._forward_pre_hooks) for layer in self.layers):
            m = None
            for layer in self.layers:
                x, m = layer.forward_deferred(x, m, rot, cache, start)
            return self.output_norm(x) if m is None else self.output_norm.after_residual(x, m)[1]
        recompute = self.gradient_checkpointing and torch.is_grad_enabled() and cache is None
        for layer in self.layers:
            if self.streamer is not None:  # lowtune.streaming: weights copied in, checkpointed
                x = self.streamer.run(layer, x, rot, cache, start)
            elif recompute:
                x = checkpoint(layer, x, rot)
            else:
                x = layer(x, rot, cache, start)
        return self.output_norm(x)

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, V] float32 (for eval and generation; training uses loss())."""
        return self.lm_head(self.hidden(ids, cache)).float()

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        return KVCache(self.config, batch, max_len or self.config.context_length, self.device, self.dtype)

    def loss(self, ids: torch.Tensor, labels: torch.Tensor | None = None,
             reduction: str = "mean", ignore_index: int = -100) -> torch.Tensor:
        """Next-token cross-entropy: position t predicts labels[:, t+1] (labels aligned with ids,
        as in Hugging Face; None means labels = ids; ignore_index marks unscored positions).

        The LM head holds at most `loss_chunk_tokens` x V logits at a time (rows of positions,
        or on a GPU vocabulary chunks over all of them where rows would take more than two) and,
        for a plain packed head, computes its input gradient on the fly, so [B*T, V] logits are
        never stored.
        reduction: "mean" over scored tokens, or "sum"."""
        labels = ids if labels is None else labels
        h = self.hidden(ids)
        targets = labels[:, 1:].to(h.device).reshape(-1)
        h = h[:, :-1].reshape(-1, h.shape[-1])
        keep = targets != ignore_index
        if h.device.type == "cpu" and not torch.compiler.is_compiling():
            # no GPU queue to stall: unscored rows are dropped before the LM head
            if not bool(keep.all()):
                h, targets = h[keep], targets[keep]
            count = max(targets.numel(), 1)
        else:
            # no host sync and no data-dependent shape (so the step compiles and captures):
            # unscored rows (target -1) go through the head and are masked out
            targets = torch.where(keep, targets, -1)
            count = keep.sum().clamp(min=1)
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        total = chunked_cross_entropy(h, targets, self, self.loss_chunk_tokens)
        return total if reduction == "sum" else total / count

    # -- sizes ---------------------------------------------------------------------------------

    def packed_tensors(self) -> dict[str, QTensor]:
        """GGUF name -> QTensor for every packed matrix; a linear cut out of a fused tensor is
        listed under its logical name (model.fused_views says how they join)."""
        out = {"token_embd.weight": self.tok_embd.weight}
        if isinstance(self.output, QLinear):
            out["output.weight"] = self.output.weight
        for layer in self.layers:
            conv = getattr(layer, "shortconv", None)  # (an RWKV layer has none)
            lins = [getattr(layer, n, None) for n in ADAPTER_TARGETS]
            for lin in lins + ([] if conv is None else [conv.in_proj, conv.out_proj]):
                base = lin if isinstance(lin, QLinear) else getattr(lin, "base", None)
                if isinstance(base, QLinear):
                    out[base.name] = base.weight
        return out


LlamaModel = Model  # the name before other families came


def is_nextn_tensor(config: ModelConfig, name: str) -> bool:
    """Whether GGUF tensor `name` belongs to a multi-token-prediction layer after the model's
    (Family.nextn_layers: in the file, not in the model)."""
    return config.family.nextn_layers and name.startswith("blk.") and int(name.split(".")[1]) >= config.n_layers


def _check_weights(config: ModelConfig, w: Mapping[str, object],
                   own: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Every tensor the config needs is there with its shape, and nothing else is (a tensor the
    model would not use means a variant lowtune does not run, e.g. mixture-of-experts). own: the
    tensors a model class adds to the family's decoder (Gemma 3n's), name -> shape."""
    c = config

    def linear_shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:  # (of a layer's widths: at_layer)
        q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        shapes = {"attn_q": (2 * q if c.family.attn_output_gate else q, c.dim),  # (Qwen3.5: q and its gate)
                  "attn_k": (kv, c.dim), "attn_v": (c.n_kv_heads * c.v_dim, c.dim),
                  "attn_output": (c.dim, c.n_heads * c.v_dim), "ffn_gate": (c.ffn_dim, c.dim),
                  "ffn_up": (c.ffn_dim, c.dim), "ffn_down": (c.dim, c.ffn_dim)}
        if c.family.attn_gate:  # (AFMoE, Laguna: the heads' output gate, its own projection)
            shapes["attn_gate"] = (q, c.dim)
        if not c.family.gated:
            del shapes["ffn_gate"]
        if c.kv_lora_rank:  # latent attention's linears in place of attn_q/k/v
            del shapes["attn_q"], shapes["attn_k"], shapes["attn_v"]
            shapes.update(latent_linear_shapes(c))
        return shapes
    conv_shapes = {"shortconv.in_proj": (3 * c.dim, c.dim), "shortconv.out_proj": (c.dim, c.dim),
                   "shortconv.conv": (c.dim, c.conv_kernel)}
    ssm_shapes = {}
    if isinstance(c.ssm, MambaShape):
        ssm_shapes = c.ssm.tensor_shapes(c.dim)
    elif c.ssm is not None:
        m = c.ssm
        ssm_shapes = {"ssm_in.weight": (m.in_dim, c.dim), "ssm_out.weight": (c.dim, m.inner),
                      "ssm_conv1d.weight": (m.conv_dim, m.conv_kernel), "ssm_dt.bias": (m.heads,), "ssm_a": (m.heads,),
                      "ssm_d": (m.heads,), "ssm_norm.weight": (m.inner,)}
    ch = c.ssm_conv_channels
    delta_shapes = {"attn_qkv.weight": (ch, c.dim), "attn_gate.weight": (c.ssm_inner, c.dim),
                    "ssm_alpha.weight": (c.ssm_v_heads, c.dim), "ssm_beta.weight": (c.ssm_v_heads, c.dim),
                    "ssm_out.weight": (c.dim, c.ssm_inner), "ssm_conv1d.weight": (ch, c.ssm_conv_kernel),
                    "ssm_a": (c.ssm_v_heads,), "ssm_dt.bias": (c.ssm_v_heads,),
                    "ssm_norm.weight": (c.ssm_inner // max(c.ssm_v_heads, 1),)}
    if c.family.kda:  # (Kimi Delta Attention: q, k, v and their kernels apart, low-rank decay and gate)
        inner, dk = c.ssm_inner, c.ssm_head_dim
        delta_shapes = {**{f"attn_{x}.weight": (inner, c.dim) for x in "qkv"},
                        **{f"ssm_conv1d_{x}.weight": (inner, c.ssm_conv_kernel) for x in "qkv"},
                        "ssm_f_a.weight": (dk, c.dim), "ssm_f_b.weight": (inner, dk), "ssm_g_a.weight": (dk, c.dim),
                        "ssm_g_b.weight": (inner, dk), "ssm_beta.weight": (c.ssm_v_heads, c.dim),
                        "attn_output.weight": (c.dim, inner), "ssm_a": (c.ssm_v_heads,), "ssm_dt.bias": (inner,),
                        "ssm_norm.weight": (dk,)}
    if c.n_experts:  # the experts' tensors [E, F, D] / [E, D, F], read as [E·F, D] / [E·D, F]
        e, f = c.n_experts, c.expert_width
        moe = {"ffn_gate_inp": (e, c.dim), "ffn_gate_exps": (e * f, c.dim), "ffn_up_exps": (e * f, c.dim),
               "ffn_down_exps": (e * c.dim, f)}
        if c.experts_per_group:  # (Grove MoE's adjugate experts)
            n, fa = e // c.experts_per_group, c.adjugate_ffn_dim or c.head_dim
            moe.update({"ffn_gate_chexps": (n * fa, c.dim), "ffn_up_chexps": (n * fa, c.dim),
                        "ffn_down_chexps": (n * c.dim, fa)})
        if c.shared_expert_ffn_dim:
            fs = c.shared_expert_ffn_dim
            moe.update({"ffn_gate_shexp": (fs, c.dim), "ffn_up_shexp": (fs, c.dim), "ffn_down_shexp": (c.dim, fs)})
            if c.family.moe_shared_gate:
                moe["ffn_gate_inp_shexp"] = (c.dim,)
        if not c.family.gated:  # (experts without a gate: Nemotron-H MoE's)
            moe = {n: shape for n, shape in moe.items() if n not in ("ffn_gate_exps", "ffn_gate_shexp")}
        # biases where the file has them (gpt-oss): the router's, and each expert's [E, rows]
        moe_bias = {"ffn_gate_inp": (e,), "ffn_gate_exps": (e, f), "ffn_up_exps": (e, f),
                    "ffn_down_exps": (e, c.dim), "exp_probs_b": (e,)}
    norm = c.family.output_norm_tensor
    want = {"token_embd.weight": (c.vocab_size, c.dim), norm + ".weight": (c.dim,), **(own or {})}
    if not c.family.norm_weights:  # (OLMo's norms have no weight: the file holds none)
        del want[norm + ".weight"]
    optional = {"output.weight": (c.vocab_size, c.dim), norm + ".bias": (c.dim,),
                "rope_freqs.weight": (c.rope_dim // 2,), "rope_factors_long.weight": (c.rope_dim // 2,),
                "rope_factors_short.weight": (c.rope_dim // 2,)}
    if "output.weight" in w:
        optional["output.bias"] = (c.vocab_size,)
    if c.family.learned_positions:  # (MPT's files carry them where they have no ALiBi)
        (optional if c.family.alibi else want)["position_embd.weight"] = (c.context_length, c.dim)
    if c.family.embedding_norm:
        want["token_embd_norm.weight"], optional["token_embd_norm.bias"] = (c.dim,), (c.dim,)
    for i in range(0 if c.family.rwkv else c.n_layers):  # (RWKV's layers: their model class's, all in `own`)
        p, lc = f"blk.{i}.", c.at_layer(i)
        shapes = linear_shapes(lc)
        want.update({p + n + ".weight": shape for n, shape in layer_norm_shapes(lc, i).items()
                     if c.family.norm_weights})
        if c.family.qk_norm_optional:
            optional.update({p + n + ".weight": want.pop(p + n + ".weight") for n in QK_NORM_NAMES
                             if p + n + ".weight" in want})
        if c.family.norm != "rms":  # (LayerNorm biases where the file has them: Phi-2; PhiMoE's RMSNorm's)
            optional.update({p + n + ".bias": shape for n, shape in layer_norm_shapes(lc, i).items()})
        if c.family.attn_norm_2:  # (Falcon 40B's attention norm, where the file has one)
            optional.update({p + "attn_norm_2.weight": (c.dim,), p + "attn_norm_2.bias": (c.dim,)})
        layer_shapes = dict(shapes)
        if c.family.values_from_keys and p + "attn_v.weight" not in w:  # (attn_k's projection: Gemma 4)
            del layer_shapes["attn_v"]
        gate = w.get(p + "attn_gate.weight")  # (Laguna-XS.2's output gate: one a head)
        if "attn_gate" in layer_shapes and gate is not None and tuple(gate.shape)[0] == c.n_heads:
            layer_shapes["attn_gate"] = (c.n_heads, c.dim)
        if c.is_conv(i):  # the convolution's tensors in place of the attention's
            want.update({p + n + ".weight": shape for n, shape in conv_shapes.items()})
            layer_shapes = {n: s for n, s in layer_shapes.items() if n.startswith("ffn_")}
        if not c.has_kv(i):  # K/V reused: the file's own k, v and k norm (llama.cpp loads them) go unused
            layer_shapes = {n: s for n, s in layer_shapes.items() if n not in ("attn_k", "attn_v")}
            optional.update({p + "attn_k.weight": shapes["attn_k"], p + "attn_v.weight": shapes["attn_v"],
                             p + "attn_k_norm.weight": layer_norm_shapes(lc)["attn_k_norm"]})
        if c.is_ssm(i):  # the Mamba2 layer's in place of the attention's (beside it: Falcon-H1)
            want.update({p + n: shape for n, shape in ssm_shapes.items()})
            optional[p + "ssm_conv1d.bias"] = (c.ssm.conv_dim,)
            if isinstance(c.ssm, MambaShape):  # (the weights of the norms of dt, B and C: Jamba)
                m = c.ssm
                optional.update({p + "ssm_dt_norm.weight": (m.dt_rank,), p + "ssm_b_norm.weight": (m.state,),
                                 p + "ssm_c_norm.weight": (m.state,)})
            if c.family.parallel_ssm:  # (its gated norm where the file has one)
                optional[p + "ssm_norm.weight"] = want.pop(p + "ssm_norm.weight")
            else:
                layer_shapes = {n: s for n, s in layer_shapes.items() if n.startswith("ffn_")}
        if c.is_delta(i):  # the Gated DeltaNet's tensors in place of the attention's
            # (llama.cpp's graph reads a fused attn_qkv too; its converter writes q, k and v apart)
            if c.family.kda and p + "attn_qkv.weight" in w:
                raise ValueError(f"this {c.arch} file fuses the Kimi Delta Attention layers' q, k and v into "
                                 "attn_qkv, which lowtune does not split; convert the checkpoint with llama.cpp's "
                                 "convert_hf_to_gguf.py, which writes attn_q, attn_k and attn_v")
            own = dict(delta_shapes)
            if p + "ssm_ba.weight" in w:  # (Qwen3-Next: b and a in one tensor)
                del own["ssm_alpha.weight"], own["ssm_beta.weight"]
                own["ssm_ba.weight"] = (2 * c.ssm_v_heads, c.dim)
            want.update({p + n: shape for n, shape in own.items()})
            layer_shapes = {n: s for n, s in layer_shapes.items() if n.startswith("ffn_")}
        if i in c.linear_attention_layers:  # (Deci's linear in attention's place)
            layer_shapes = {n: s for n, s in layer_shapes.items() if n == "attn_output" or n.startswith("ffn_")}
        if not c.has_ffn(i):  # a mixer alone (Nemotron-H)
            layer_shapes = {n: s for n, s in layer_shapes.items() if not n.startswith("ffn_")}
        if not c.has_mixer(i):  # an MLP alone (Nemotron-H)
            layer_shapes = {n: s for n, s in layer_shapes.items() if n.startswith("ffn_")}
        if c.has_experts(i):
            layer_moe = dict(moe)
            if p + "ffn_gate_up_exps.weight" in w:  # (gate and up in one tensor: Gemma 4)
                del layer_moe["ffn_gate_exps"], layer_moe["ffn_up_exps"]
                layer_moe["ffn_gate_up_exps"] = (2 * e * f, c.dim)
            want.update({p + n + ".weight": shape for n, shape in layer_moe.items()})
            optional.update({p + n + ".bias": shape for n, shape in moe_bias.items()})
            if not c.family.moe_beside_ffn:
                layer_shapes = {n: s for n, s in layer_shapes.items() if not n.startswith("ffn_")}
        if c.indexer_heads and c.has_attention(i) and c.indexer_source(i) == i:  # (the indexer: DeepSeek-V3.2)
            heads, width = c.indexer_heads, c.indexer_head_dim
            want.update({p + "indexer.attn_q_b.weight": (heads * width, c.q_lora_rank),
                         p + "indexer.attn_k.weight": (width, c.dim), p + "indexer.proj.weight": (heads, c.dim),
                         p + "indexer.k_norm.weight": (width,), p + "indexer.k_norm.bias": (width,)})
        optional[p + "attn_sinks.weight"] = (c.n_heads,)
        fused = fused_splits(lc, i, w)
        in_fused = {part for parts in fused.values() for part, _, _ in parts}
        for n, shape in layer_shapes.items():
            if p + n + ".weight" not in in_fused:
                want[p + n + ".weight"] = shape
            optional[p + n + ".bias"] = (shape[0],)
        for name, parts in fused.items():  # a fused tensor [rows of its parts, D], maybe a fused bias
            want[name] = (parts[-1][2], c.dim)
            optional[name[:-len("weight")] + "bias"] = (parts[-1][2],)
    if c.family.nextn_layers and "blk.0.attn_norm.weight" not in w and any(is_nextn_tensor(c, n) for n in w):
        raise ValueError(f"this {c.arch} file holds only its multi-token-prediction layers (converted with "
                         "--mtp-only), which llama.cpp runs beside the model's own file; pass that file")
    for name, shape in want.items():
        if name not in w:
            hint = ""
            if name.endswith("time_mix_lerp_fused.weight"):  # (older RWKV-6 conversions keep them apart)
                hint = (" (its token-shift lerps apart, time_mix_lerp_w/k/v/r/g, as older conversions wrote them: "
                        "convert the checkpoint with llama.cpp's current convert_hf_to_gguf.py, which fuses them)")
            raise ValueError(f"GGUF file lacks tensor {name!r}, which this {c.arch} model needs{hint}")
    if c.family.nextn_layers:  # the multi-token-prediction layers' tensors, which the model leaves alone
        w = {n: t for n, t in w.items() if not is_nextn_tensor(c, n)}
    unused = [n for n in w if n not in want and n not in optional]
    if unused:
        hint = " (mixture-of-experts tensors)" if any("_exps" in n or "gate_inp" in n for n in unused) else ""
        if c.arch == "mpt" and any("attn_q_norm" in n for n in unused):
            hint = (" (MPT's q/k LayerNorms, qk_ln, whose graph llama.cpp fails to build beside a fused attn_qkv: "
                    "lowtune runs and exports MPT files as llama.cpp runs them)")
        if "cls_out.weight" in unused:  # (Qwen3 and Qwen3-VL rerankers: their yes/no rows of the head)
            hint = " (a reranker's classification head; lowtune fine-tunes the generative model it was made from)"
        if any(n.endswith((".scale", ".input_scale")) for n in unused):  # llama.cpp's NVFP4 conversion
            hint = (" (the per-tensor second scales of an NVFP4 checkpoint, which lowtune does not apply: quantize "
                    "the model's BF16 weights to NVFP4 instead, with lowtune or llama-quantize)")
        if c.family.sub_norms and any(n.endswith(".scale") for n in unused):  # (an older BitNet conversion)
            hint = (" (BitNet's per-tensor weight scales, which llama.cpp multiplies into each product and lowtune "
                    "does not apply: convert the checkpoint with llama.cpp's convert_hf_to_gguf.py, which multiplies "
                    "them into the weights, and quantize it with llama-quantize to TQ1_0 or TQ2_0)")
        raise ValueError(f"tensors {unused[:4]} are not part of a {c.arch} model as lowtune runs it{hint}; "
                         "this file is a variant lowtune does not support")
    for name in w:
        shape = want.get(name, optional.get(name))
        got = tuple(w[name].shape)
        if got != shape and not (len(shape) == 1 and math.prod(got) == shape[0]):
            hint = ""
            if name.endswith(("attn_qkv.weight", "attn_qkv.bias")) and c.n_kv_heads == 1 \
                    and got[0] == 3 * c.n_heads * c.head_dim:
                hint = (" (K/V heads for every query head where the metadata gives one: a GPT-BigCode model "
                        "without multi-query attention, whose file llama.cpp's converter writes wrong and "
                        "llama.cpp does not run either)")
            raise ValueError(f"tensor {name!r} has shape {got}, expected {shape} from the metadata{hint}")


# ----------------------------------------------------------------------------------------------
# LM head + cross-entropy in chunks


def head_operands(model, h: torch.Tensor) -> tuple[torch.Tensor, QTensor, torch.Tensor | None, float]:
    """(h', W, b, cap) such that cap·tanh((h' Wᵀ + b)/cap) are model.lm_head(h)'s logits, for the
    fused head losses that take the packed head itself (a plain QLinear head, or the tied
    embedding): Granite's logit scale s is folded into h and the bias, (h Wᵀ + b)/s = (h/s) Wᵀ + b/s."""
    bias = model.output.bias if model.output is not None else None
    c = getattr(model, "config", None)  # (LREC's tests hand in stand-ins without one)
    s = float(getattr(c, "logit_scale", 1.0))
    if s != 1.0:
        h, bias = h / s, None if bias is None else bias / s
    return h, model.head_weight(), bias, float(getattr(c, "final_softcap", 0.0) or 0.0)


def chunked_cross_entropy(h: torch.Tensor, targets: torch.Tensor, model: Model,
                          chunk: int = 1024) -> torch.Tensor:
    """Sum over rows of -log softmax(lm_head(h))[target]. h [N, D], targets [N] -> scalar fp32.
    Rows with a negative target are not scored (they add nothing, and get no gradient).

    A plain packed head goes through _HeadCrossEntropy (gradient computed chunk by chunk in the
    forward, nothing of size V kept); a wrapped head (an adapter on `output`) is recomputed
    chunk by chunk with activation checkpointing instead."""
    if targets.numel() == 0:
        return h.sum() * 0.0
    if model.output is None or type(model.output) is QLinear:
        h, weight, bias, cap = head_operands(model, h)
        need_grad = torch.is_grad_enabled() and h.requires_grad
        return _HeadCrossEntropy.apply(h, targets, weight, bias, cap, chunk, need_grad)
    total = h.new_zeros((), dtype=torch.float32)
    targets = targets.clamp(min=-1)
    for s in range(0, h.shape[0], chunk):
        part = lambda hc, tc: F.cross_entropy(model.lm_head(hc).float(), tc, reduction="sum", ignore_index=-1)
        total = total + checkpoint(part, h[s:s + chunk], targets[s:s + chunk])
    return total


class _HeadCrossEntropy(torch.autograd.Function):
    """Fused LM head + cross-entropy in chunks. The loss is a scalar, so its gradient w.r.t. h is
    known in the forward: dh = ((softmax(l) - onehot) · dl/dz) · W, where z = h·Wᵀ + bias and
    l = cap·tanh(z/cap) (l = z without a soft-cap).

    `chunk` rows of logits at a time bound the memory ([chunk, V] fp32). On a GPU, when that
    takes more than two row chunks, that memory goes to vocabulary chunks over all rows instead
    ([N, ~chunk·V/N]): a pass for the log-sum-exp (online, chunk by chunk) and one for dh, so W
    is dequantized and multiplied three times in products as wide as the step, where row chunks
    would do it twice per chunk in narrow ones. On the CPU the products are FLOP-bound and the
    row chunks' two passes cost less than three."""

    @staticmethod
    def forward(ctx, h, targets, weight: QTensor, bias, cap: float, chunk: int, need_grad: bool):
        n, vocab = h.shape[0], weight.shape[0]
        if n > 2 * chunk and h.device.type != "cpu":
            # half the row chunk's logits: each chunk's bf16 part of dh then fits in what the
            # memory planner counts for the head (70B: [2048, 8192]); 16 rows keep offsets aligned
            cols = max(16, chunk * vocab // (2 * n) // 16 * 16)
            total, dh = _head_ce_vocab_chunks(h, targets, weight, bias, cap, cols, need_grad)
        else:
            total, dh = _head_ce_row_chunks(h, targets, weight, bias, cap, chunk, need_grad)
        ctx.save_for_backward(dh if need_grad else torch.empty(0))
        return total

    @staticmethod
    def backward(ctx, grad):
        (dh,) = ctx.saved_tensors
        return (dh * grad.to(dh.dtype)), None, None, None, None, None, None


def _head_logits(h, weight: QTensor, bias, cap: float) -> torch.Tensor:
    """fp32 logits l = cap·tanh(z/cap) (or z) of rows h against the head rows in `weight`."""
    logits = ops.qmatmul(h, weight).float()
    if bias is not None:
        logits += bias.float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _head_ce_row_chunks(h, targets, weight: QTensor, bias, cap: float, chunk: int, need_grad: bool):
    """(loss, dh) over `chunk` rows at a time, all of V per chunk."""
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    dh = torch.empty_like(h) if need_grad else None
    for s in range(0, h.shape[0], chunk):
        hc, tc = h[s:s + chunk].contiguous(), targets[s:s + chunk]
        scored, tc = tc >= 0, tc.clamp(min=0)
        logits = _head_logits(hc, weight, bias, cap)
        # d(cap·tanh(z/cap))/dz = 1 - tanh², kept only when the gradient needs it
        dcap = 1.0 - (logits / cap) ** 2 if cap and need_grad else None
        # one fused pass for log-probabilities, then softmax in the same buffer: the chunk's
        # [rows, V] logits are the largest tensors of a step (and 49k-wide on SmolLM2)
        logp = torch.log_softmax(logits, dim=-1)
        del logits
        total -= torch.where(scored, logp.gather(1, tc[:, None])[:, 0], 0.0).sum()
        if need_grad:
            p = logp.exp_()
            p.scatter_add_(1, tc[:, None], torch.full_like(p[:, :1], -1.0))
            if dcap is not None:
                p *= dcap
            dhc = ops.qmatmul_input_grad(p.to(h.dtype), weight)
            dh[s:s + chunk] = torch.where(scored[:, None], dhc, 0.0)
    return total, dh


def _head_ce_vocab_chunks(h, targets, weight: QTensor, bias, cap: float, cols: int, need_grad: bool):
    """(loss, dh) over `cols` vocabulary rows of the head at a time, all of h's rows per chunk."""
    n, vocab = h.shape[0], weight.shape[0]
    h = h.contiguous()
    scored, tc = targets >= 0, targets.clamp(min=0)
    run_max = torch.full((n,), -math.inf, dtype=torch.float32, device=h.device)
    run_sum = torch.zeros(n, dtype=torch.float32, device=h.device)
    target_logit = torch.zeros(n, dtype=torch.float32, device=h.device)

    def part(v0):
        v1 = min(v0 + cols, vocab)
        w = weight.rows(v0, v1)
        b = None if bias is None else bias[v0:v1]
        inside = (tc >= v0) & (tc < v1)
        return _head_logits(h, w, b, cap), w, inside, (tc - v0).clamp(0, v1 - v0 - 1)[:, None]

    for v0 in range(0, vocab, cols):           # log-sum-exp, online over the chunks
        logits, _, inside, at = part(v0)
        target_logit += torch.where(inside, logits.gather(1, at)[:, 0], 0.0)
        new_max = torch.maximum(run_max, logits.amax(dim=1))
        run_sum = run_sum * torch.exp(run_max - new_max) + logits.sub_(new_max[:, None]).exp_().sum(dim=1)
        run_max = new_max
        del logits
    lse = run_max + torch.log(run_sum)
    total = -torch.where(scored, target_logit - lse, 0.0).sum()
    if not need_grad:
        return total, None
    dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    keep = scored[:, None].to(torch.float32)
    for v0 in range(0, vocab, cols):           # dh = Σ over chunks of (softmax - onehot)·dl/dz · W
        logits, w, inside, at = part(v0)
        dcap = 1.0 - (logits / cap) ** 2 if cap else None
        p = logits.sub_(lse[:, None]).exp_()
        p.scatter_add_(1, at, torch.where(inside, -1.0, 0.0)[:, None])
        if dcap is not None:
            p *= dcap
        p *= keep
        dh += ops.qmatmul_input_grad(p.to(h.dtype), w)
    return total, dh.to(h.dtype)
