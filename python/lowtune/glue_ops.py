"""A decoder layer's elementwise math: RMSNorm, RoPE and the gated activation, each as its torch
formula and, for inference on CUDA, as one fused kernel (csrc/glue_kernels.h).

    rms_norm(x, w, eps)        x / sqrt(mean(x²) + eps) · w over the last dim, in fp32, in x's dtype
    add_rms_norm(x, r, w, eps) (x + r, rms_norm(x + r)): a residual add and the norm after it
    rope(x, rot, style)        the first rope_dim dims of every head rotated (see rope's docstring)
    gated(activation, g, u)    activation(g) · u (SwiGLU's product for "silu")
    ungated(activation, x, s)  activation(x) of an MLP without a gate (xIELU with its layer's scalars s)
    rope_store(q, k, v, ...)   a decode step's RoPE with its KV-cache write
    add_rms_norm_product(x, r, w, eps, qt), silu_mul_product(g, u, qt)
                               the norm, or SwiGLU's product, and the one-row product after it
                               in one kernel pair (None where the M = 1 CUDA kernel does not apply)
    decode_attention(q, k_cache, v_cache, pos, scale)   one token's attention over the filled cache
                               (decode_attention_fused: whether its CUDA kernels take the operands)

The formulas are the reference: training, the CPU and anything torch.compile traces run them
(inductor fuses them there). An eager call on CUDA that needs no autograd (generation, no_grad
evaluation) runs the fused kernel instead, one launch where the formula takes three to six: at
one token per step these chains are a third of a decode step. The kernels round as the formulas
do (RoPE and the gated product bit for bit; RMSNorm's sum of squares in another order, so its
result may differ in the last bit). FUSED = False (or LOWTUNE_FUSED_GLUE=0 at import) keeps the
formulas everywhere, for comparisons.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _C, llamacpp_activations
from .ops import ACT_DTYPES, _stream
from .qtensor import QTensor

SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT = 1.702, 7.0  # (gpt-oss's constants, fixed in llama.cpp too)


def _swiglu_oai(g: Tensor, u: Tensor) -> Tensor:
    """gpt-oss's gated activation, llama.cpp's ggml_swiglu_oai: g clamped above, u both ways."""
    g = g.clamp(max=SWIGLU_OAI_LIMIT)
    return g * torch.sigmoid(SWIGLU_OAI_ALPHA * g) * (u.clamp(-SWIGLU_OAI_LIMIT, SWIGLU_OAI_LIMIT) + 1)


# the MLP's activation of ffn_up's output where it has no gate, by name
UNGATED = {"relu2": lambda x: F.relu(x).square(), "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def xielu(x: Tensor, scalars: Tensor) -> Tensor:
    """Apertus's xIELU, llama.cpp's ggml_xielu, in fp32: scalars [4] are (alpha_p, alpha_n, beta, eps)
    as the file stores them, the alphas before their softplus: with a_p = softplus(alpha_p) and
    a_n = beta + softplus(alpha_n), a_p x² + beta x where x > 0, else (expm1(min(x, eps)) - x) a_n + beta x."""
    alpha_p, alpha_n, beta, eps = scalars.float().unbind()
    a_p, a_n, xf = F.softplus(alpha_p), beta + F.softplus(alpha_n), x.float()
    y = torch.where(xf > 0, a_p * xf * xf + beta * xf, (torch.expm1(torch.minimum(xf, eps)) - xf) * a_n + beta * xf)
    return y.to(x.dtype)


def ungated(activation: str, x: Tensor, scalars: Tensor | None = None) -> Tensor:
    """activation(x) for an MLP without a gate (glue_ops.UNGATED; "xielu" with its layer's scalars)."""
    return xielu(x, scalars) if activation == "xielu" else UNGATED[activation](x)


# the gated MLP's activation(g) · u, by name
ACTIVATIONS = {"silu": lambda g, u: F.silu(g) * u, "gelu_tanh": lambda g, u: UNGATED["gelu_tanh"](g) * u,
               "swiglu_oai": _swiglu_oai, "relu2": lambda g, u: UNGATED["relu2"](g) * u}
FUSED = os.environ.get("LOWTUNE_FUSED_GLUE", "1") != "0"


def _fused(*ts: Tensor) -> bool:
    """Whether the fused kernel may run: eager, on CUDA, plain tensors of one supported dtype, and
    no autograd to record."""
    x = ts[0]
    return (FUSED and x.is_cuda and x.dtype in ACT_DTYPES and not torch.is_grad_enabled()
            and all(type(t) is Tensor and t.dtype == x.dtype and t.device == x.device for t in ts)
            and not torch.compiler.is_compiling())


def _norm_weight_fits(x: Tensor, w: Tensor) -> bool:
    """Whether the RMSNorm kernels take w for rows of x: fp32 on CUDA, contiguous, one per column."""
    return w.dtype == torch.float32 and w.is_cuda and x.shape[-1] > 0 and w.shape == x.shape[-1:] \
        and w.is_contiguous()


def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x²) + eps) · w over the last dim, computed in fp32 and returned in x's dtype."""
    if _fused(x) and _norm_weight_fits(x, w):
        xc = x.contiguous()
        y = torch.empty_like(xc)
        _C.cuda_rms_norm(xc.data_ptr(), ACT_DTYPES[x.dtype], w.data_ptr(), y.data_ptr(), xc.numel() // x.shape[-1],
                         x.shape[-1], float(eps), _stream(x.device))
        return y
    return F.rms_norm(x.float(), (x.shape[-1],), w.float(), eps).to(x.dtype)


def add_rms_norm(x: Tensor, r: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x + r, rms_norm(x + r, w, eps)): a residual add and the norm after it, one kernel on CUDA
    without autograd where the rows suit the vector kernel (16-byte aligned, at most 1024 vectors)."""
    if _fused(x, r) and x.shape == r.shape and _norm_weight_fits(x, w):
        xc, rc = x.contiguous(), r.contiguous()
        s, y = torch.empty_like(xc), torch.empty_like(xc)
        dt, dim = ACT_DTYPES[x.dtype], x.shape[-1]
        if _C.cuda_rms_norm_vectorized(dt, dim, xc.data_ptr(), rc.data_ptr(), y.data_ptr(), s.data_ptr()):
            _C.cuda_rms_norm(xc.data_ptr(), dt, w.data_ptr(), y.data_ptr(), xc.numel() // dim, dim, float(eps),
                             _stream(x.device), rc.data_ptr(), s.data_ptr())
            return s, y
    s = x + r
    return s, rms_norm(s, w, eps)


def rope(x: Tensor, rot: Tensor, style: str = "norm") -> Tensor:
    """Rotate the first rope_dim dims of each head, pair by pair. A pair is one complex number, and
    rotating it by angle a (and scaling it by m) is multiplying by m·e^{ia}.

    style "norm" pairs adjacent dims (x[2i], x[2i+1]): GGUF's converter permutes Llama's q/k rows so
    that ggml's NORM rope equals the original model's. "neox" pairs x[i] with x[i + rope_dim/2], on
    rows as Hugging Face keeps them (Qwen, Phi-3, Gemma). Rotating a pair (a, b) by θ and scaling it
    by m is (a·m·cos θ - b·m·sin θ, b·m·cos θ + a·m·sin θ), which is x·C + swap(x)·S with swap
    exchanging the two of each pair: real arithmetic, which compilers fuse.
    x [B, H, T, hd]; rot [2, T, rope_dim] float32 (C, S laid out in the style's pairing, see
    Model.rope_rotation). Computed in fp32, returned in x's dtype."""
    if style not in ("norm", "neox"):
        raise ValueError(f"unknown rope style {style!r} (norm or neox)")
    d = rot.shape[-1]
    if _fused(x) and x.dim() == 4 and rot.dtype == torch.float32 and rot.is_cuda \
            and tuple(rot.shape) == (2, x.shape[2], d) and 0 < d <= x.shape[-1] and d % 2 == 0 \
            and x.stride(-1) == 1:
        y = torch.empty_like(x)  # x's strides (a dense transposed view keeps them)
        if y.stride() == x.stride():
            r = rot.contiguous()
            b, h, t, hd = x.shape
            _C.cuda_rope(x.data_ptr(), ACT_DTYPES[x.dtype], r.data_ptr(), y.data_ptr(), b, h, t, hd, d,
                         x.stride(0), x.stride(1), x.stride(2), style == "neox", _stream(x.device))
            return y
    xr = x[..., :d].float()
    if style == "norm":
        swapped = xr.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    else:
        swapped = torch.cat((xr[..., d // 2:], xr[..., :d // 2]), dim=-1)
    out = (xr * rot[0] + swapped * rot[1]).to(x.dtype)
    return out if d == x.shape[-1] else torch.cat((out, x[..., d:]), dim=-1)


def rope_store(q: Tensor, k: Tensor, v: Tensor, rot: Tensor, style: str, k_cache: Tensor, v_cache: Tensor,
               pos: Tensor) -> Tensor:
    """One decode step's RoPE and KV-cache write: k rotated and v written into the caches
    [B, Hkv, L, hd] at positions pos..pos+T (pos: a one-element long tensor on the caches' device,
    so a captured CUDA graph replays it at any position); returns q rotated. q [B, H, T, hd], k, v
    [B, Hkv, T, hd] (views of the q/k/v product). On CUDA without autograd, one kernel for what is
    otherwise two rotations and two cache writes."""
    b, h, t, hd = q.shape
    hkv, d = k.shape[1], rot.shape[-1]
    if _fused(q, k, v, k_cache, v_cache) and rot.dtype == torch.float32 and rot.is_cuda \
            and tuple(rot.shape) == (2, t, d) and 0 < d <= hd and d % 2 == 0 \
            and k.shape == v.shape == (b, hkv, t, hd) and k_cache.shape == v_cache.shape \
            and tuple(k_cache.shape[:2]) == (b, hkv) and k_cache.shape[3] == hd \
            and k_cache.is_contiguous() and v_cache.is_contiguous() \
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 \
            and pos.dtype == torch.long and pos.numel() == 1 and pos.device == q.device:
        q_out = torch.empty((b, h, t, hd), dtype=q.dtype, device=q.device)
        r = rot.contiguous()
        geom = (b, t, h, hkv, hd, d, k_cache.shape[2], *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                style == "neox")
        _C.cuda_rope_store(geom, q.data_ptr(), k.data_ptr(), v.data_ptr(), ACT_DTYPES[q.dtype], r.data_ptr(),
                           q_out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), pos.data_ptr(),
                           _stream(q.device))
        return q_out
    at = pos.reshape(1) + torch.arange(t, device=pos.device)
    k_cache.index_copy_(2, at, rope(k, rot, style))
    v_cache.index_copy_(2, at, v)
    return rope(q, rot, style)


def decode_attention_fused(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor) -> bool:
    """Whether decode_attention runs its CUDA kernels for these operands (else the formula, which
    reads the whole cache: a caller with a faster fallback of its own should take that)."""
    _, h, t, hd = q.shape
    return _fused(q, k_cache, v_cache) and q.shape[0] == 1 and t == 1 and k_cache.shape[0] == 1 \
        and k_cache.shape == v_cache.shape and k_cache.shape[3] == hd \
        and q.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous() \
        and pos.dtype == torch.long and pos.numel() == 1 and pos.device == q.device \
        and _C.cuda_decode_attention_fits(ACT_DTYPES[q.dtype], h, k_cache.shape[1], hd, k_cache.shape[2])


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor, scale: float) -> Tensor:
    """One token's attention against a KV cache (batch 1): q [1, H, 1, hd], caches [1, Hkv, L, hd]
    of which positions 0..pos are filled (pos: a one-element long tensor on their device, so a
    captured graph replays at any position) -> [1, H, 1, hd]. Query head h reads cache head
    h // (H / Hkv). On CUDA (decode_attention_fused) kernels that read only the filled positions;
    the formula (fp32 scores, softmax and sum, masked past pos) elsewhere."""
    _, h, _, hd = q.shape
    hkv, length = k_cache.shape[1], k_cache.shape[2]
    if decode_attention_fused(q, k_cache, v_cache, pos):
        out = torch.empty_like(q)
        _C.cuda_decode_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), ACT_DTYPES[q.dtype],
                                 out.data_ptr(), pos.data_ptr(), h, hkv, hd, length, float(scale), _stream(q.device))
        return out
    rep = h // hkv
    k = k_cache.float().repeat_interleave(rep, dim=1)
    v = v_cache.float().repeat_interleave(rep, dim=1)
    scores = (q.float() * scale) @ k.transpose(-1, -2)
    filled = torch.arange(length, device=q.device) <= pos.reshape(())
    scores = scores.masked_fill(~filled, float("-inf"))
    return (scores.softmax(-1) @ v).to(q.dtype)


def gated(activation: str, g: Tensor, u: Tensor) -> Tensor:
    """activation(g) · u, g and u of one shape (the gated MLP's product)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r} (known: {', '.join(ACTIVATIONS)})")
    if activation == "silu" and _fused(g, u) and g.shape == u.shape:
        gc, uc = g.contiguous(), u.contiguous()
        y = torch.empty_like(gc)
        _C.cuda_silu_mul(gc.data_ptr(), uc.data_ptr(), ACT_DTYPES[g.dtype], y.data_ptr(), gc.numel(),
                         _stream(g.device))
        return y
    return ACTIVATIONS[activation](g, u)


def _one_row(x: Tensor, qt: QTensor) -> bool:
    """Whether x is one row of qt's K on qt's device, for a packed qt (the products below)."""
    return (qt.format.quantized and qt.raw.device == x.device and qt.raw.is_contiguous()
            and x.shape[-1] == qt.shape[1] and x.numel() == qt.shape[1] and not llamacpp_activations.active())


def add_rms_norm_product(x: Tensor, r: Tensor | None, w: Tensor, eps: float,
                         qt: QTensor) -> tuple[Tensor, Tensor] | None:
    """(x + r, rms_norm(x + r, w, eps) · deq(qt)ᵀ) for one row (r None: (x, rms_norm(x) · deq(qt)ᵀ)),
    with the norm made inside the product's preparation of its input (csrc/kernels.h, GemvPrologue:
    a decode step launches no norm kernel, and the values are add_rms_norm's and the product's bit
    for bit). None where that does not apply (not an eager CUDA call without autograd, not one
    row, a type, K or alignment the M = 1 kernel does not take): the caller runs the two."""
    ts = (x,) if r is None else (x, r)
    if not (_fused(*ts) and _one_row(x, qt) and _norm_weight_fits(x, w) and (r is None or r.shape == x.shape)):
        return None
    n, k = qt.shape
    xc = x.contiguous()
    rc = None if r is None else r.contiguous()
    s = xc if rc is None else torch.empty_like(xc)
    y = xc.new_empty((*x.shape[:-1], n))
    ok = _C.cuda_qmatmul_forward_add_rms_norm(
        qt.format.type_id, xc.data_ptr(), 0 if rc is None else rc.data_ptr(), w.data_ptr(), float(eps),
        0 if rc is None else s.data_ptr(), ACT_DTYPES[x.dtype], qt.raw.data_ptr(), y.data_ptr(), n, k,
        _stream(x.device))
    return (s, y) if ok else None


def silu_mul_product(g: Tensor, u: Tensor, qt: QTensor) -> Tensor | None:
    """(silu(g) · u) · deq(qt)ᵀ for one row, SwiGLU's product made inside the product's preparation
    of its input (as add_rms_norm_product's norm); None where that does not apply."""
    if not (_fused(g, u) and g.shape == u.shape and _one_row(g, qt)):
        return None
    n, k = qt.shape
    gc, uc = g.contiguous(), u.contiguous()
    y = gc.new_empty((*g.shape[:-1], n))
    ok = _C.cuda_qmatmul_forward_silu_mul(qt.format.type_id, gc.data_ptr(), uc.data_ptr(), ACT_DTYPES[g.dtype],
                                          qt.raw.data_ptr(), y.data_ptr(), n, k, _stream(g.device))
    return y if ok else None
