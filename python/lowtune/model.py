"""One readable Llama: Llama 1/2/3, Mistral, TinyLlama, SmolLM2 — anything GGUF calls `llama`.

Every weight matrix stays in its own block format (a QTensor) and is used through
`lowtune.ops.qmatmul`; nothing is dequantized at load. The layout follows GGUF exactly:

    token_embd          QEmbedding  [vocab, dim]       rows dequantized on demand
    blk.N.attn_norm     RMSNorm
    blk.N.attn_q/k/v    QLinear     [H*hd | Hkv*hd, dim]  q/k rows in GGUF's (interleaved) RoPE order
    blk.N.attn_output   QLinear     [dim, H*hd]
    blk.N.ffn_norm      RMSNorm
    blk.N.ffn_gate/up   QLinear     [ffn, dim]        SwiGLU: down(silu(gate(x)) * up(x))
    blk.N.ffn_down      QLinear     [dim, ffn]
    output_norm         RMSNorm
    output              QLinear     [vocab, dim]      absent when tied: token_embd is reused

Shapes: B batch, T tokens, D model width, H query heads, Hkv key/value heads, hd head width, V vocab.

    model = LlamaModel.from_gguf("model.gguf", device="cpu", dtype=torch.float32)
    logits = model(ids)                     # [B, T, V] float32, for eval and generation
    loss = model.loss(ids, labels)          # chunked LM head: no [B*T, V] logits kept for backward
    layer = model.layers[3]; layer.attn_q   # QLinear, GGUF name blk.3.attn_q; adapters wrap these

Base weights are buffers with persistent=False: `model.state_dict()` holds only what is trained
(adapters), and `model.to(device)` moves the packed blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import ops
from .qtensor import QTensor

LINEAR_NAMES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class LlamaConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int
    rope_dim: int                 # leading dims of each head that RoPE rotates (= head_dim for Llama)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_linear_scale: float = 1.0  # positions are divided by this ("linear" rope scaling)
    context_length: int = 2048
    arch: str = "llama"

    @classmethod
    def from_gguf_metadata(cls, md: Mapping) -> "LlamaConfig":
        """Read the `general.architecture` and `<arch>.*` keys of a GGUF file's metadata."""
        arch = md.get("general.architecture")
        if arch != "llama":
            raise ValueError(f"architecture {arch!r} is not supported: lowtune runs Llama-family "
                             "models (general.architecture = 'llama')")

        def get(key, default=None):
            v = md.get(f"{arch}.{key}", default)
            if v is None:
                raise ValueError(f"GGUF metadata lacks {arch}.{key}, which a Llama model needs")
            return v

        if int(md.get(f"{arch}.expert_count", 0) or 0) > 0:
            raise ValueError("mixture-of-experts Llama models (expert_count > 0) are not supported")
        dim, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
        head_dim = int(md.get(f"{arch}.attention.key_length", dim // n_heads))
        vocab = md.get(f"{arch}.vocab_size")
        if vocab is None:
            tokens = md.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise ValueError(f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
            vocab = len(tokens)

        scaling = md.get(f"{arch}.rope.scaling.type", "none")
        linear_scale = 1.0
        if scaling == "linear":
            linear_scale = float(get("rope.scaling.factor"))
        elif scaling not in ("none", None):
            raise ValueError(f"rope scaling {scaling!r} is not supported (only none, linear, and "
                             "Llama 3's rope_freqs tensor)")
        if f"{arch}.rope.scale_linear" in md:  # older GGUFs
            linear_scale = float(md[f"{arch}.rope.scale_linear"])

        return cls(
            vocab_size=int(vocab), dim=dim, n_layers=int(get("block_count")), n_heads=n_heads,
            n_kv_heads=int(md.get(f"{arch}.attention.head_count_kv", n_heads)),
            ffn_dim=int(get("feed_forward_length")), head_dim=head_dim,
            rope_dim=int(md.get(f"{arch}.rope.dimension_count", head_dim)),
            norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_theta=float(md.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_linear_scale=linear_scale,
            context_length=int(md.get(f"{arch}.context_length", 2048)), arch=arch)

    def check(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"head_count {self.n_heads} is not a multiple of head_count_kv {self.n_kv_heads}")
        if self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise ValueError(f"rope dimension {self.rope_dim} must be even and at most head_dim {self.head_dim}")


# ----------------------------------------------------------------------------------------------
# Quantized building blocks


class QLinear(nn.Module):
    """y[..., N] = x[..., K] · deq(W[N, K])ᵀ with W kept packed (any format, F32/F16 included).

    The block bytes are a non-persistent buffer, so `.to(device)` moves them and state_dict()
    leaves them out. `weight` rebuilds the QTensor view. No bias (Llama has none)."""

    def __init__(self, weight: QTensor, name: str = ""):
        super().__init__()
        self.register_buffer("raw", weight.raw, persistent=False)
        self.format = weight.format
        self.out_features, self.in_features = weight.shape
        self.name = name  # GGUF tensor name, e.g. "blk.3.attn_q.weight"

    @property
    def weight(self) -> QTensor:
        return QTensor(self.raw, self.format, (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.qmatmul(x.contiguous(), self.weight)

    def extra_repr(self) -> str:
        return f"{self.format.name}, in={self.in_features}, out={self.out_features}"


def embedding_rows(qt: QTensor, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows `ids` (any shape) of a [V, D] QTensor, dequantized: [*ids.shape, D].

    Packed rows are independent, so only the selected rows' bytes are gathered and decoded."""
    flat = ids.reshape(-1).to(qt.raw.device)
    rows = QTensor(qt.raw.index_select(0, flat), qt.format, (flat.numel(), qt.shape[1]))
    return ops.dequantize(rows, dtype).reshape(*ids.shape, qt.shape[1])


class QEmbedding(nn.Module):
    """Token embedding [V, D] kept packed; forward(ids) -> [*ids.shape, D] in `dtype`."""

    def __init__(self, weight: QTensor, dtype: torch.dtype, name: str = "token_embd.weight"):
        super().__init__()
        self.register_buffer("raw", weight.raw, persistent=False)
        self.format = weight.format
        self.num_embeddings, self.embedding_dim = weight.shape
        self.dtype = dtype
        self.name = name

    @property
    def weight(self) -> QTensor:
        return QTensor(self.raw, self.format, (self.num_embeddings, self.embedding_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return embedding_rows(self.weight, ids, self.dtype)

    def extra_repr(self) -> str:
        return f"{self.format.name}, {self.num_embeddings}, {self.embedding_dim}"


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · w, computed in fp32 and returned in x's dtype."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.register_buffer("weight", weight.float(), persistent=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# RoPE in GGUF order


def rope_inv_freq(config: LlamaConfig, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """[rope_dim/2] float64 angular speed of each rotated pair: base^(-2i/d) / factor_i / linear_scale."""
    i = torch.arange(0, config.rope_dim, 2, dtype=torch.float64)
    inv = config.rope_theta ** (-i / config.rope_dim) / config.rope_linear_scale
    if freq_factors is not None:  # Llama 3.1's rope_freqs.weight divides each pair's frequency
        inv = inv / freq_factors.double().cpu()
    return inv


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the first rope_dim dims of each head.

    GGUF's converter permutes q/k rows so that ggml's "NORM" rope (adjacent pairs) equals the
    original model's rope; using GGUF rows as they are, we rotate adjacent pairs too. A pair is
    one complex number, and rotating it by angle a is multiplying by e^{ia}.
    x [B, H, T, hd]; rot [T, rope_dim/2] complex64 (e^{i·pos·freq}). Returned in x's dtype."""
    d = rot.shape[-1] * 2
    pairs = torch.view_as_complex(x[..., :d].float().unflatten(-1, (-1, 2)))
    out = torch.view_as_real(pairs * rot).flatten(-2).to(x.dtype)
    return out if d == x.shape[-1] else torch.cat((out, x[..., d:]), dim=-1)


# ----------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Keys and values of past positions, per layer: k[i], v[i] [B, Hkv, max_len, hd].

    `length` is how many positions are filled; the model appends and advances it."""

    def __init__(self, config: LlamaConfig, batch: int, max_len: int, device, dtype: torch.dtype):
        shape = (batch, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
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


# ----------------------------------------------------------------------------------------------
# Decoder


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, index: int, w: Mapping[str, object]):
        super().__init__()
        self.config, self.index = config, index
        p = f"blk.{index}."
        self.attn_norm = RMSNorm(w[p + "attn_norm.weight"], config.norm_eps)
        self.ffn_norm = RMSNorm(w[p + "ffn_norm.weight"], config.norm_eps)
        for name in LINEAR_NAMES:
            setattr(self, name, QLinear(w[p + name + ".weight"], p + name + ".weight"))

    def forward(self, x: torch.Tensor, rot: torch.Tensor, cache: KVCache | None = None,
                start: int = 0) -> torch.Tensor:
        """x [B, T, D] at positions start..start+T -> [B, T, D]."""
        c = self.config
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = self.attn_q(h).view(b, t, c.n_heads, c.head_dim).transpose(1, 2)
        k = self.attn_k(h).view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = self.attn_v(h).view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, rot), apply_rope(k, rot)
        if cache is not None:
            k, v = cache.update(self.index, start, k, v)
        attn = attention(q, k, v, start)
        x = x + self.attn_output(attn.transpose(1, 2).reshape(b, t, c.n_heads * c.head_dim))
        h = self.ffn_norm(x)
        return x + self.ffn_down(F.silu(self.ffn_gate(h)) * self.ffn_up(h))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention. q [B, H, T, hd] at positions start..start+T; k, v [B, Hkv, S, hd] for
    positions 0..S (S = start + T). Query head h reads key/value head h // (H/Hkv), as in ggml."""
    n_rep = q.shape[1] // k.shape[1]
    gqa = {}
    if n_rep > 1:
        # torch >= 2.5's CPU kernels read shared heads in place: no copies
        if q.device.type == "cpu" and tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 5):
            gqa = {"enable_gqa": True}
        else:
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    t, s = q.shape[2], k.shape[2]
    if start == 0 and t == s:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
    if t == 1:  # one new token sees every cached position
        return F.scaled_dot_product_attention(q, k, v, **gqa)
    # Several new tokens after a cached prefix: query i sees keys 0..start+i.
    mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=start)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig, weights: Mapping[str, object],
                 dtype: torch.dtype = torch.float32):
        """weights: GGUF tensor name -> QTensor (matrices) or torch.Tensor (norms, rope_freqs)."""
        super().__init__()
        config.check()
        self.config, self.dtype = config, dtype
        self.tok_embd = QEmbedding(weights["token_embd.weight"], dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, i, weights) for i in range(config.n_layers))
        self.output_norm = RMSNorm(weights["output_norm.weight"], config.norm_eps)
        # Tied embeddings: no output.weight; the head then reads tok_embd's blocks (no second copy).
        out = weights.get("output.weight")
        self.output = QLinear(out, "output.weight") if out is not None else None
        factors = weights.get("rope_freqs.weight")
        # float64 on the CPU, not a buffer, so that model.to(dtype) cannot round it
        self.rope_inv_freq = rope_inv_freq(config, factors)
        self.gradient_checkpointing = False  # recompute each layer in backward (training)
        self.streamer = None                 # a lowtune.streaming.LayerStreamer, when streaming
        self.loss_chunk_tokens = 1024       # LM-head rows computed at once by loss()
        self.metadata: dict = {}             # the GGUF metadata, when loaded from a file
        self.tensor_types: dict[str, str] = {}

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path, device="cpu", dtype: torch.dtype = torch.float32) -> "LlamaModel":
        """Load a Llama GGUF. Matrices stay in their blocks (memory-mapped on CPU, copied as
        blocks to a GPU); norms are read as fp32. dtype: activation dtype (fp32, bf16, fp16)."""
        from .gguf_io import GGUFFile

        weights, types = {}, {}
        with GGUFFile(path) as f:
            md = dict(f.metadata)
            config = LlamaConfig.from_gguf_metadata(md)
            for name in f.tensor_infos:
                qt = f.qtensor(name)
                types[name] = qt.type
                if name.endswith("_norm.weight") or name == "rope_freqs.weight":
                    weights[name] = ops.dequantize(qt, torch.float32).reshape(-1).to(device)
                else:
                    weights[name] = qt.to(device)
        _check_weights(config, weights)
        model = cls(config, weights, dtype)
        model.metadata, model.tensor_types = md, types
        model.gguf_path = str(path)
        return model.eval()

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.float() leave the host packs of streamed layers where they are
        if self.streamer is None:
            return super()._apply(fn, recurse)
        with self.streamer.packs_aside():
            return super()._apply(fn, recurse)

    # -- forward -------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.tok_embd.raw.device

    def head_weight(self) -> QTensor:
        """The LM head's packed [V, D] matrix (token_embd when embeddings are tied)."""
        return self.output.weight if isinstance(self.output, QLinear) else self.tok_embd.weight

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        """Normed hidden [..., D] -> logits [..., V] in h's dtype."""
        if self.output is not None:
            return self.output(h)
        return ops.qmatmul(h.contiguous(), self.tok_embd.weight)

    def rope_rotation(self, start: int, t: int) -> torch.Tensor:
        """[T, rope_dim/2] complex64 e^{i·pos·freq} for positions start..start+T."""
        pos = torch.arange(start, start + t, dtype=torch.float64)
        ang = pos[:, None] * self.rope_inv_freq[None, :]
        return torch.polar(torch.ones_like(ang), ang).to(torch.complex64)

    def hidden(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """ids [B, T] -> final normed hidden states [B, T, D] in the activation dtype.
        With a cache, ids continue the cached sequence and the cache is extended."""
        if ids.dim() != 2:
            raise ValueError(f"ids must have shape [B, T], got {tuple(ids.shape)}")
        start = cache.length if cache is not None else 0
        t = ids.shape[1]
        rot = self.rope_rotation(start, t).to(self.device)
        x = self.tok_embd(ids.to(self.device))
        recompute = self.gradient_checkpointing and torch.is_grad_enabled() and cache is None
        for layer in self.layers:
            if self.streamer is not None:  # lowtune.streaming: weights copied in, checkpointed
                x = self.streamer.run(layer, x, rot, cache, start)
            elif recompute:
                x = checkpoint(layer, x, rot, use_reentrant=False)
            else:
                x = layer(x, rot, cache, start)
        if cache is not None:
            cache.length = start + t
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

        The LM head runs over `loss_chunk_tokens` positions at a time and (for a plain packed
        head) computes its input gradient on the fly, so [B*T, V] logits are never stored.
        reduction: "mean" over scored tokens, or "sum"."""
        labels = ids if labels is None else labels
        h = self.hidden(ids)
        targets = labels[:, 1:].to(h.device).reshape(-1)
        h = h[:, :-1].reshape(-1, h.shape[-1])
        keep = targets != ignore_index
        if not bool(keep.all()):
            h, targets = h[keep], targets[keep]
        total = chunked_cross_entropy(h, targets, self, self.loss_chunk_tokens)
        if reduction == "sum":
            return total
        if reduction != "mean":
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        return total / max(targets.numel(), 1)

    # -- sizes ---------------------------------------------------------------------------------

    def packed_tensors(self) -> dict[str, QTensor]:
        """GGUF name -> QTensor for every packed matrix."""
        out = {"token_embd.weight": self.tok_embd.weight}
        if isinstance(self.output, QLinear):
            out["output.weight"] = self.output.weight
        for layer in self.layers:
            for name in LINEAR_NAMES:
                lin = getattr(layer, name)
                base = lin if isinstance(lin, QLinear) else getattr(lin, "base", None)
                if isinstance(base, QLinear):
                    out[base.name] = base.weight
        return out


def _check_weights(config: LlamaConfig, w: Mapping[str, object]) -> None:
    c = config
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    want = {"token_embd.weight": (c.vocab_size, c.dim), "output_norm.weight": (c.dim,)}
    if "output.weight" in w:
        want["output.weight"] = (c.vocab_size, c.dim)
    if "rope_freqs.weight" in w:
        want["rope_freqs.weight"] = (c.rope_dim // 2,)
    for i in range(c.n_layers):
        p = f"blk.{i}."
        want.update({p + "attn_norm.weight": (c.dim,), p + "ffn_norm.weight": (c.dim,),
                     p + "attn_q.weight": (q, c.dim), p + "attn_k.weight": (kv, c.dim),
                     p + "attn_v.weight": (kv, c.dim), p + "attn_output.weight": (c.dim, q),
                     p + "ffn_gate.weight": (c.ffn_dim, c.dim), p + "ffn_up.weight": (c.ffn_dim, c.dim),
                     p + "ffn_down.weight": (c.dim, c.ffn_dim)})
    for name, shape in want.items():
        if name not in w:
            raise ValueError(f"GGUF file lacks tensor {name!r}, which this Llama model needs")
        got = tuple(w[name].shape)
        if got != shape and not (len(shape) == 1 and math.prod(got) == shape[0]):
            raise ValueError(f"tensor {name!r} has shape {got}, expected {shape} from the metadata")


# ----------------------------------------------------------------------------------------------
# LM head + cross-entropy in chunks


def chunked_cross_entropy(h: torch.Tensor, targets: torch.Tensor, model: LlamaModel,
                          chunk: int = 1024) -> torch.Tensor:
    """Sum over rows of -log softmax(lm_head(h))[target]. h [N, D], targets [N] -> scalar fp32.

    A plain packed head goes through _HeadCrossEntropy (gradient computed chunk by chunk in the
    forward, nothing of size V kept); a wrapped head (an adapter on `output`) is recomputed
    chunk by chunk with activation checkpointing instead."""
    if targets.numel() == 0:
        return h.sum() * 0.0
    if model.output is None or type(model.output) is QLinear:
        need_grad = torch.is_grad_enabled() and h.requires_grad
        return _HeadCrossEntropy.apply(h, targets, model.head_weight(), chunk, need_grad)
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        part = lambda hc, tc: F.cross_entropy(model.lm_head(hc).float(), tc, reduction="sum")
        total = total + checkpoint(part, h[s:s + chunk], targets[s:s + chunk], use_reentrant=False)
    return total


class _HeadCrossEntropy(torch.autograd.Function):
    """Fused LM head + cross-entropy over row chunks. The loss is a scalar, so its gradient
    w.r.t. h is known in the forward: dh = (softmax(logits) - onehot) · W, one chunk at a time."""

    @staticmethod
    def forward(ctx, h, targets, weight: QTensor, chunk: int, need_grad: bool):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if need_grad else None
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s:s + chunk].contiguous(), targets[s:s + chunk]
            # one fused pass for log-probabilities, then softmax in the same buffer: the chunk's
            # [rows, V] logits are the largest tensors of a step (and 49k-wide on SmolLM2)
            logp = torch.log_softmax(ops.qmatmul(hc, weight).float(), dim=-1)
            total -= logp.gather(1, tc[:, None]).sum()
            if need_grad:
                p = logp.exp_()
                p[torch.arange(p.shape[0], device=p.device), tc] -= 1.0
                dh[s:s + chunk] = ops.qmatmul_input_grad(p.to(h.dtype), weight)
        ctx.save_for_backward(dh if need_grad else torch.empty(0))
        return total

    @staticmethod
    def backward(ctx, grad):
        (dh,) = ctx.saved_tensors
        return (dh * grad.to(dh.dtype)), None, None, None, None
