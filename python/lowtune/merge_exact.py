"""What a merged block stores, and training through it: merges that are exact bit for bit.

QA-LoRA and QA-HiRA add one constant δ to every block of inputs that shares a min. Where the block
stores its min as an fp16 float (Q4_1, Q5_1, INTb-gG: x = d·q + m, d in bytes 0-1 and m in bytes
2-3 of every block), the merge keeps every code and scale byte for byte and stores

    m' = fp16(fp32(m) + fp32(δ))           one fp32 addition, one round to nearest even

This module owns that rule (stored_mins). lowtune.merge writes merged blocks with it, and an
adapter in merge-exact mode (AdapterConfig.merge_exact) trains through it:

    stored_mins(m, delta)                  m' for fp16 mins m and fp32 updates δ, any device
    shift_mins(qt, delta)                  a QTensor whose block mins are m' (δ: [N, K/block])
    min_shifted_qmatmul(x, qt, delta)      y = x·deq(W')ᵀ, W' = shift_mins(W, δ); differentiable
                                           in x and δ
    rounded_update(x, qt, delta)           x·(deq(W') − deq(W))ᵀ in plain torch, for base layers
                                           that are more than a quantized matmul

min_shifted_qmatmul runs lowtune's matmul kernel on the very bytes the merged file holds, so
base + adapter and the merged model give the same outputs bit for bit. The rounding itself has no
useful gradient (a staircase); the backward passes straight through it, as if m' were m + δ:

    dδ[o, b] = Σ_t dy[t, o] · Σ_{i in block b} x[t, i]        dx = dy · deq(W')

i.e. the gradient an unrounded group-constant update gets (a straight-through estimator). The
shifted bytes are rebuilt in the backward rather than kept: one weight copy at a time, not one
per layer.

Like lowtune.ops, the matmul is a PyTorch custom op (lowtune::min_shifted_qmatmul, with a fake
implementation and an autograd formula) so torch.compile traces through and CUDA graphs capture
it; in eager mode an autograd.Function twin calls the kernels directly.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from .formats import Format
from .qtensor import QTensor

# Where a float-min block keeps its min: bytes 2-3, fp16 (after the fp16 scale in bytes 0-1).
MIN_HALF = 1  # index of the min in a block viewed as fp16 values


def supports(fmt: Format) -> bool:
    """Whether merges into `fmt` can be exact: its blocks store an fp16 min."""
    return bool(fmt.float_min)


def stored_mins(m: Tensor, delta: Tensor, out: Tensor | None = None) -> Tensor:
    """The fp16 mins a merge stores: fp16(fp32(m) + fp32(δ)), rounded to nearest even (IEEE, the
    same bits on every device). m: fp16 mins, δ: float32 updates of the same shape. out: an
    fp16 tensor to write them to (m itself is fine); one kernel, which adds in fp32 and rounds
    as it stores. Inf where the sum leaves fp16's range (|m + δ| > 65504)."""
    return torch.add(m, delta.float(), out=torch.empty_like(m) if out is None else out)


def _min_view(raw: Tensor, block_bytes: int) -> Tensor:
    """The mins of raw's blocks as an fp16 view [blocks] (raw: contiguous uint8, even block size)."""
    return raw.view(torch.float16).view(-1, block_bytes // 2)[:, MIN_HALF]


def _shift(raw: Tensor, block_bytes: int, delta: Tensor) -> Tensor:
    """A copy of raw with every block's min m replaced by stored_mins(m, δ) (δ: one per block)."""
    out = raw.clone()
    mins = _min_view(out, block_bytes)
    stored_mins(mins, delta.reshape(-1), out=mins)
    return out


def _check(qt: QTensor, delta: Tensor) -> None:
    ops._check_qtensor(qt)
    fmt = qt.format
    if not supports(fmt):
        raise ValueError(f"{fmt.name} blocks store no fp16 min: a merge into them cannot be exact "
                         "(Q4_1, Q5_1 and INTb-gG can)")
    n, k = qt.shape
    want = (n, k // fmt.block_elems)
    if not isinstance(delta, Tensor) or tuple(delta.shape) != want:
        raise ValueError(f"delta must be one value per block, shape {list(want)}, got "
                         f"{list(getattr(delta, 'shape', []))}")
    if delta.dtype != torch.float32:
        raise ValueError(f"delta must be float32 (the rule adds in fp32), got {delta.dtype}")
    if delta.device != qt.device:
        raise ValueError(f"delta is on {delta.device} but the weight is on {qt.device}")


def block_mins(qt: QTensor) -> Tensor:
    """The stored fp16 min of every block of a float-min weight, [N, K/block] (a copy)."""
    n, k = qt.shape
    return _min_view(qt.raw, qt.format.block_bytes).reshape(n, k // qt.format.block_elems).clone()


def shift_mins(qt: QTensor, delta: Tensor) -> QTensor:
    """qt with every block's min m replaced by stored_mins(m, δ), codes and scales unchanged:
    the weight a merge of δ writes. δ: float32 [N, K/block_elems] on qt's device."""
    _check(qt, delta)
    return QTensor(_shift(qt.raw, qt.format.block_bytes, delta.detach()), qt.format, qt.shape)


def block_sums(x: Tensor, block_elems: int) -> Tensor:
    """Σ of x over each run of block_elems inputs: [..., K] -> [..., K/block_elems]."""
    return x.unflatten(-1, (-1, block_elems)).sum(-1)


def rounded_update(x: Tensor, qt: QTensor, delta: Tensor) -> Tensor:
    """x·(deq(W') − deq(W))ᵀ with W' = shift_mins(W, δ): the merged weight's change applied to x,
    as block sums times the rounded mins' change (exact in arithmetic, not in float bits),
    differentiable in x and, straight through the rounding, in δ."""
    _check(qt, delta)
    m = block_mins(qt)
    moved = stored_mins(m, delta.detach()).float() - m.float()
    d = delta + (moved - delta).detach()
    return block_sums(x, qt.format.block_elems) @ d.to(x.dtype).t()


# ---- the matmul on shifted blocks: kernels, custom op, autograd ------------------------------------

def _forward(x: Tensor, delta: Tensor, raw: Tensor, type_id: int, n: int, k: int, block_elems: int,
             block_bytes: int) -> tuple[Tensor, Tensor]:
    """(y, xsum): y [M, n] = x [M, k]·deq(W')ᵀ and the block sums of x [M, k/block_elems], which
    the backward needs for dδ."""
    y = ops._forward_kernel(x, _shift(raw, block_bytes, delta), type_id, n, k)
    return y, block_sums(x, block_elems)


def _backward(dy: Tensor, xsum: Tensor, delta: Tensor, raw: Tensor, type_id: int, n: int, k: int,
              block_elems: int, block_bytes: int, need_dx: bool) -> tuple[Tensor, Tensor]:
    """(dx, dδ): dx = dy·deq(W') (empty unless need_dx), dδ = dyᵀ·xsum in fp32."""
    dx = ops._input_grad_kernel(dy, _shift(raw, block_bytes, delta), type_id, n, k) if need_dx \
        else dy.new_empty((0,))
    return dx, (dy.t() @ xsum.to(dy.dtype)).float()


min_shifted_qmatmul_op = torch.library.custom_op("lowtune::min_shifted_qmatmul", _forward, mutates_args=())


@min_shifted_qmatmul_op.register_fake
def _(x, delta, raw, type_id, n, k, block_elems, block_bytes):
    return x.new_empty((x.shape[0], n)), x.new_empty((x.shape[0], k // block_elems))


min_shifted_qmatmul_backward_op = torch.library.custom_op("lowtune::min_shifted_qmatmul_backward", _backward,
                                                          mutates_args=())


@min_shifted_qmatmul_backward_op.register_fake
def _(dy, xsum, delta, raw, type_id, n, k, block_elems, block_bytes, need_dx):
    dx = dy.new_empty((dy.shape[0], k)) if need_dx else dy.new_empty((0,))
    return dx, delta.new_empty(delta.shape)


def _setup(ctx, inputs, output):
    _, delta, raw, *args = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1], delta, raw)
    ctx.args = tuple(args)


def _autograd(backward_fn):
    def backward(ctx, dy, _dxsum):
        xsum, delta, raw = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dd = backward_fn(dy.contiguous(), xsum, delta, raw, *ctx.args, need[0])
        return (dx if need[0] else None, dd if need[1] else None) + (None,) * 6
    return backward


min_shifted_qmatmul_op.register_autograd(_autograd(min_shifted_qmatmul_backward_op), setup_context=_setup)
_MinShiftedQMatmul = ops._eager_twin(_forward, _setup, _autograd(_backward), "_MinShiftedQMatmul")


def min_shifted_qmatmul(x: Tensor, qt: QTensor, delta: Tensor) -> Tensor:
    """Y[..., N] = X[..., K]·deq(W')ᵀ with W' = shift_mins(qt, δ): the merged weight, computed by
    the kernel that computes the merged model. Differentiable in x and in δ (float32
    [N, K/block_elems]), the latter straight through the rounding of the mins."""
    _check(qt, delta)
    fmt = qt.format
    n, k = qt.shape
    ops._check_act(x, "x", qt.device, k, "K")
    x2 = x.reshape(-1, k)
    args = (qt.raw, fmt.type_id, n, k, fmt.block_elems, fmt.block_bytes)
    if type(x2) is not Tensor or torch.compiler.is_compiling():
        y, _ = min_shifted_qmatmul_op(x2, delta, *args)
    elif torch.is_grad_enabled() and (x2.requires_grad or delta.requires_grad):
        y, _ = _MinShiftedQMatmul.apply(x2, delta, *args)
    else:  # nothing to differentiate: no block sums either
        y = ops._forward_kernel(x2, _shift(qt.raw, fmt.block_bytes, delta), fmt.type_id, n, k)
    return y.reshape(*x.shape[:-1], n)


__all__ = ["block_mins", "block_sums", "min_shifted_qmatmul", "rounded_update", "shift_mins",
           "stored_mins", "supports"]
