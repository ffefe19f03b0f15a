"""llama.cpp's CPU rounding of activations, to reproduce its perplexities.

llama.cpp's CPU products do not multiply the weight by the float activations: each activation
row is first quantized to the 8-bit format its weight type pairs with (ggml-cpu's vec_dot_type),
and the dot products run on those bytes. lowtune keeps the activations in float. On the same GGUF
the two engines therefore differ by that rounding (a few tenths of a percent of perplexity on
SmolLM2), not by the weights, which decode bit-identically.

    with rounded_like_llamacpp():          every lowtune.ops.qmatmul in the block rounds its
        ppl = perplexity(model, ids)       activations as llama.cpp's CPU does first
    round_activations(x, fmt)              that rounding, for one product (x [..., K] float)

The formats (ggml-quants.c, the reference quantizers; the values are what the dot product sees):
    Q8_0, Q8_1   blocks of 32: d = max|x| / 127 stored as fp16, q = round(x·127 / max|x|)
                                                                                       x' = fp16(d)·q
    Q8_K         blocks of 256: m = the x of largest |x|, s = -127 / m, q = min(127, round(s·x)),
                 d = 1 / s stored as fp32                                              x' = d·q
    F16, BF16    each value rounded to the weight's float type
Rounding is to nearest, ties to even (the AVX2 quantizers; the reference ones round ties away from
zero, which float data almost never meets). Not reproduced: llama.cpp's F16 KV cache and the
order of its sums; these move perplexity by far less.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import Tensor

from .formats import Format

# ggml-cpu's type_traits_cpu[type].vec_dot_type for the weight types llama.cpp has (lowtune's
# INTb-gG types have none: their GGUF export writes legacy types). F32 weights: no rounding.
VEC_DOT = {
    "Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0", "IQ4_NL": "Q8_0", "MXFP4": "Q8_0", "NVFP4": "Q8_0",
    "Q1_0": "Q8_0", "Q2_0": "Q8_0", "TQ1_0": "Q8_K", "TQ2_0": "Q8_K",
    "Q4_1": "Q8_1", "Q5_1": "Q8_1",
    "Q2_K": "Q8_K", "Q3_K": "Q8_K", "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K",
    "IQ4_XS": "Q8_K", "IQ3_XXS": "Q8_K", "IQ3_S": "Q8_K", "IQ2_XXS": "Q8_K", "IQ2_XS": "Q8_K",
    "IQ2_S": "Q8_K", "IQ1_S": "Q8_K", "IQ1_M": "Q8_K",
    "F16": "F16", "BF16": "BF16", "F32": None,
}
_BLOCK = {"Q8_0": 32, "Q8_1": 32, "Q8_K": 256}

_active: contextvars.ContextVar[bool] = contextvars.ContextVar("lowtune_llamacpp_activations", default=False)


@contextlib.contextmanager
def rounded_like_llamacpp():
    """Within the block, lowtune.ops.qmatmul rounds its activations as llama.cpp's CPU does.
    For evaluation: the rounding has no gradient, and a product that needs one is refused."""
    token = _active.set(True)
    try:
        yield
    finally:
        _active.reset(token)


def active() -> bool:
    return _active.get()


def activation_format(fmt: Format) -> str | None:
    """The format llama.cpp rounds activations to before a product with weights of `fmt`."""
    if fmt.name not in VEC_DOT:
        raise ValueError(f"llama.cpp has no {fmt.name} weights, so there is no rounding of its to "
                         "reproduce (lowtune's INTb-gG types export as legacy GGUF types)")
    return VEC_DOT[fmt.name]


def round_activations(x: Tensor, fmt: Format) -> Tensor:
    """x [..., K] as llama.cpp's CPU sees it in a product with weights of `fmt`, in x's dtype."""
    kind = activation_format(fmt)
    if kind is None:
        return x
    if kind == "F16":
        return x.to(torch.float16).to(x.dtype)
    if kind == "BF16":
        return x.to(torch.bfloat16).to(x.dtype)
    block = _BLOCK[kind]
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"{kind} rounds blocks of {block} activations; this row has {k}")
    v = x.float().reshape(-1, k // block, block)
    if kind == "Q8_K":
        idx = v.abs().argmax(dim=-1, keepdim=True)
        m = v.gather(-1, idx)                                  # the signed value of largest |x|
        # tensor / tensor: a correctly rounded division (a scalar over a tensor multiplies by a
        # reciprocal, one ulp off ggml's float division)
        scale = torch.where(m != 0, torch.full_like(m, -127.0) / m, torch.zeros_like(m))
        q = torch.round(scale * v).clamp(max=127)
        d = torch.where(m != 0, torch.ones_like(m) / scale, torch.zeros_like(m))
    else:
        amax = v.abs().amax(dim=-1, keepdim=True)
        inv = torch.where(amax != 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))  # as AVX2 does
        q = torch.round(v * inv)
        d = (amax / torch.full_like(amax, 127.0)).to(torch.float16).float()
    return (d * q).reshape(x.shape).to(x.dtype)


__all__ = ["VEC_DOT", "activation_format", "active", "round_activations", "rounded_like_llamacpp"]
