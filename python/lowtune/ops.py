"""The one dispatch point between PyTorch and the compiled kernels.

Every function here checks its arguments (dtype, device, contiguity, shape, type) and raises
ValueError naming the tensor and what was expected; then it calls the kernel through a PyTorch
custom op, which picks the CPU or CUDA kernel and passes raw pointers (and, on CUDA, torch's
current stream).

    quantize(w[N, K] float, type) -> QTensor
    dequantize(qt, dtype)         -> [N, K]
    qmatmul(x[..., K], qt)        -> [..., N] = x · deq(W)ᵀ     differentiable w.r.t. x
    qmatmul_input_grad(dy[M, N], qt) -> [M, K] = dy · deq(W)

The custom ops (torch.ops.lowtune.*) take the raw uint8 blocks, the block type id and the shape
ints, never a QTensor; each has a fake implementation (shapes and dtypes only) and an autograd
formula, so torch.compile traces through them and CUDA graphs capture them:

    lowtune::dequantize(raw, type_id, n, k, dtype) -> [n, k]
    lowtune::qmatmul(x[M, k], raw, type_id, n, k) -> [M, n]             backward: qmatmul_input_grad
    lowtune::qmatmul_input_grad(dy[M, n], raw, type_id, n, k) -> [M, k] backward: qmatmul

The ops trust their arguments: only this module's functions validate. In eager mode (nothing
traced) the public functions skip the dispatcher, whose host cost exceeds a small kernel's: a
call that needs autograd goes through an autograd.Function twin of the op (the same context and
backward formula, the kernels called directly), one that does not calls the kernel. Float
weights (F32, F16, BF16) run as plain torch matmuls on a view of their bytes. On a CPU without
AVX-512, products of many fp32 rows run as W dequantized panel by panel into torch's GEMM
(cpu_dense_gemm says when): the kernel entries below are the one place that choice is made.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
from torch import Tensor

from . import _C, llamacpp_activations
from .formats import get_format
from .qtensor import QTensor

ACT_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def without_autocast(computation):
    """computation(first, ...) run with autocast off on first's device: it picks its own dtypes (a
    trainer's bf16 autocast around it would cast some operands and not others, or reach an op that
    has no bf16 kernel)."""
    @functools.wraps(computation)
    def run(first: Tensor, *args, **kwargs):
        with torch.autocast(first.device.type, enabled=False):
            return computation(first, *args, **kwargs)
    return run


def _check_qtensor(qt, name: str = "weight") -> QTensor:
    if not isinstance(qt, QTensor):
        raise ValueError(f"{name} must be a lowtune.QTensor, got {type(qt).__name__}")
    n, k = qt.shape
    if qt.raw.dtype != torch.uint8 or tuple(qt.raw.shape) != (n, qt.format.row_bytes(k)):
        raise ValueError(f"{name}.raw must be uint8 of shape ({n}, {qt.format.row_bytes(k)}), "
                         f"got {qt.raw.dtype} {tuple(qt.raw.shape)}")
    if not qt.raw.is_contiguous():
        raise ValueError(f"{name}.raw must be contiguous")
    return qt


def _check_act(t, name: str, device: torch.device, last_dim: int, last_name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in ACT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the weight is on {device}; move one of them")
    if t.dim() < 1 or t.shape[-1] != last_dim:
        raise ValueError(f"{name} must have shape [..., {last_name}={last_dim}], got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")


def _stream(device: torch.device) -> int:
    """torch's current stream on `device`, after checking the GPU can run the kernels."""
    _check_gpu(torch.cuda.current_device() if device.index is None else device.index)
    return torch.cuda.current_stream(device).cuda_stream


@functools.lru_cache(maxsize=None)
def _check_gpu(index: int) -> None:
    # The kernels use bf16 tensor-core MMA (sm_80+); an older GPU would fail at launch with
    # "no kernel image", so say what to do instead.
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        name = torch.cuda.get_device_name(index)
        raise ValueError(f"lowtune's CUDA kernels need compute capability 8.0 or newer (Ampere); "
                         f"cuda:{index} is {name} ({major}.{minor}): run on device='cpu' instead")


# ---- kernels (pointers in, nothing checked: the public functions below validate) --------------

def _dequantize_kernel(raw: Tensor, type_id: int, n: int, k: int, dtype: torch.dtype) -> Tensor:
    out = torch.empty((n, k), dtype=dtype, device=raw.device)
    if n * k == 0:
        return out
    if raw.device.type == "cuda":
        _C.cuda_dequantize(type_id, raw.data_ptr(), out.data_ptr(), ACT_DTYPES[dtype], n, k, _stream(raw.device))
    else:
        _C.dequantize(type_id, raw.data_ptr(), out.data_ptr(), ACT_DTYPES[dtype], n, k)
    return out


# ---- the CPU's products of many rows ----------------------------------------------------------
# Without AVX-512 the packed GEMM's register tiles are too small to keep two FMA ports busy: on a
# 2-core AVX2 EPYC it runs SmolLM2's M = 512 products at ~45 GFLOP/s where torch's sgemm runs
# 110-150 (tools/bench_train.py --device cpu, BENCHMARKS.md). There, many fp32 rows multiply W
# dequantized a panel of rows at a time into a reused fp32 buffer (a few MiB: no page faults, no
# dense copy of W kept) by torch's GEMM. Many bf16 rows do the same in bf16 panels wherever the
# CPU multiplies bf16 natively. LOWTUNE_CPU_GEMM=packed|dense overrides the choice.
_CPU_DENSE_MIN_ROWS = 64            # below it the packed kernels win (they read W once per 4 rows)
_CPU_PANEL_FLOATS = 1 << 20         # 4 MiB of dequantized W per panel


@functools.lru_cache(maxsize=None)
def _cpu_gemm_setting() -> str:
    mode = os.environ.get("LOWTUNE_CPU_GEMM", "auto")
    if mode not in ("auto", "packed", "dense"):
        raise ValueError(f"LOWTUNE_CPU_GEMM must be auto, packed or dense, got {mode!r}")
    return mode


@functools.lru_cache(maxsize=None)
def _cpu_gemm_mode() -> str:
    """The fp32 products' path: packed with AVX-512, dense without (unless the setting says)."""
    mode = _cpu_gemm_setting()
    if mode == "auto":
        mode = "packed" if _C.build_info()["cpu_isa"] == "avx512" else "dense"
    return mode


@functools.lru_cache(maxsize=None)
def _cpu_bf16_gemm() -> bool:
    """torch's CPU GEMM multiplies bf16 natively here (oneDNN on AVX512-BF16 or AMX: ~2.5-3x its
    fp32 rate on a 2-core AVX512-BF16 EPYC), where lowtune's packed kernels widen bf16 to fp32."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_dense_gemm(m: int, dtype: torch.dtype) -> bool:
    """Whether a CPU product of m rows of `dtype` runs as panels of dequantized W through torch's
    GEMM (True) or in lowtune's packed kernels: fp32 where LOWTUNE_CPU_GEMM says dense, bf16
    wherever the CPU multiplies bf16 natively (unless LOWTUNE_CPU_GEMM=packed)."""
    if m < _CPU_DENSE_MIN_ROWS:
        return False
    if dtype == torch.bfloat16:
        return _cpu_gemm_setting() != "packed" and _cpu_bf16_gemm()
    return dtype == torch.float32 and _cpu_gemm_mode() == "dense"


def _panels(raw: Tensor, type_id: int, n: int, k: int, dtype: torch.dtype = torch.float32):
    """(n0, rows, W[n0:n0+rows] in `dtype`) over W's rows, one reused buffer for all panels."""
    rows = max(1, min(n, _CPU_PANEL_FLOATS // k))
    buf = torch.empty((rows, k), dtype=dtype)
    for n0 in range(0, n, rows):
        r = min(rows, n - n0)
        _C.dequantize(type_id, raw[n0].data_ptr(), buf.data_ptr(), ACT_DTYPES[dtype], r, k)
        yield n0, r, buf[:r]


def _dense_forward(x2: Tensor, raw: Tensor, type_id: int, n: int, k: int, y: Tensor) -> Tensor:
    for n0, r, w in _panels(raw, type_id, n, k, x2.dtype):
        torch.mm(x2, w.t(), out=y if r == n else y[:, n0:n0 + r])
    return y


def _dense_input_grad(dy2: Tensor, raw: Tensor, type_id: int, n: int, k: int, dx: Tensor) -> Tensor:
    for n0, r, w in _panels(raw, type_id, n, k, dy2.dtype):
        if n0 == 0:
            torch.mm(dy2[:, :r], w, out=dx)
        else:
            dx.addmm_(dy2[:, n0:n0 + r], w)
    return dx


def _forward_kernel(x2: Tensor, raw: Tensor, type_id: int, n: int, k: int) -> Tensor:
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0 or n == 0:
        return y
    x2 = x2.contiguous()
    if x2.device.type == "cpu" and cpu_dense_gemm(m, x2.dtype):
        return _dense_forward(x2, raw, type_id, n, k, y)
    if x2.device.type == "cuda":
        _C.cuda_qmatmul_forward(type_id, x2.data_ptr(), ACT_DTYPES[x2.dtype], raw.data_ptr(), y.data_ptr(), m, n, k, _stream(x2.device))
    else:
        _C.qmatmul_forward(type_id, x2.data_ptr(), ACT_DTYPES[x2.dtype], raw.data_ptr(), y.data_ptr(), m, n, k)
    return y


def _input_grad_kernel(dy2: Tensor, raw: Tensor, type_id: int, n: int, k: int) -> Tensor:
    m = dy2.shape[0]
    dx = torch.empty((m, k), dtype=dy2.dtype, device=dy2.device)
    if m == 0 or k == 0:
        return dx
    if n == 0:
        return dx.zero_()
    dy2 = dy2.contiguous()
    if dy2.device.type == "cpu" and cpu_dense_gemm(m, dy2.dtype):
        return _dense_input_grad(dy2, raw, type_id, n, k, dx)
    if dy2.device.type == "cuda":
        _C.cuda_qmatmul_input_grad(type_id, dy2.data_ptr(), ACT_DTYPES[dy2.dtype], raw.data_ptr(), dx.data_ptr(), m, n, k, _stream(dy2.device))
    else:
        _C.qmatmul_input_grad(type_id, dy2.data_ptr(), ACT_DTYPES[dy2.dtype], raw.data_ptr(), dx.data_ptr(), m, n, k)
    return dx


# ---- the custom ops ------------------------------------------------------------------------------

@torch.library.custom_op("lowtune::dequantize", mutates_args=())
def dequantize_op(raw: Tensor, type_id: int, n: int, k: int, dtype: torch.dtype) -> Tensor:
    """Blocks [n, row_bytes] of type `type_id` -> dense [n, k] in `dtype`."""
    return _dequantize_kernel(raw, type_id, n, k, dtype)


@dequantize_op.register_fake
def _(raw, type_id, n, k, dtype):
    return raw.new_empty((n, k), dtype=dtype)


@torch.library.custom_op("lowtune::qmatmul", mutates_args=())
def qmatmul_op(x: Tensor, raw: Tensor, type_id: int, n: int, k: int) -> Tensor:
    """y [M, n] = x [M, k] · deq(W)ᵀ."""
    return _forward_kernel(x, raw, type_id, n, k)


@qmatmul_op.register_fake
def _(x, raw, type_id, n, k):
    return x.new_empty((x.shape[0], n))


@torch.library.custom_op("lowtune::qmatmul_input_grad", mutates_args=())
def qmatmul_input_grad_op(dy: Tensor, raw: Tensor, type_id: int, n: int, k: int) -> Tensor:
    """dx [M, k] = dy [M, n] · deq(W)."""
    return _input_grad_kernel(dy, raw, type_id, n, k)


@qmatmul_input_grad_op.register_fake
def _(dy, raw, type_id, n, k):
    return dy.new_empty((dy.shape[0], k))


def _save_weight(ctx, inputs, output):
    # The frozen matmul keeps no activation: only the packed weight (and its type and shape).
    _, raw, type_id, n, k = inputs
    ctx.save_for_backward(raw)
    ctx.weight = (type_id, n, k)


def _linear_backward(other):
    """The backward of y = x·deq(W)ᵀ (or of dx = dy·deq(W)): the other product, `other`, applied
    to the incoming gradient. Both are linear in their activation input."""
    def backward(ctx, grad):
        (raw,) = ctx.saved_tensors
        g = other(grad.contiguous(), raw, *ctx.weight) if ctx.needs_input_grad[0] else None
        return g, None, None, None, None
    return backward


qmatmul_op.register_autograd(_linear_backward(qmatmul_input_grad_op), setup_context=_save_weight)
qmatmul_input_grad_op.register_autograd(_linear_backward(qmatmul_op), setup_context=_save_weight)


def _eager_twin(kernel, setup, backward_formula, name: str):
    """The eager twin of a custom op's autograd: the same context and formula, the kernels
    called directly (the op's dispatch costs more host time than a small kernel, and the eager
    CPU path must not get slower). forward takes ctx (a separate setup_context would make every
    apply bind its arguments through inspect.signature)."""
    def forward(ctx, *args):
        out = kernel(*args)
        setup(ctx, args, out)
        return out
    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward_formula)})


_QMatmul = _eager_twin(_forward_kernel, _save_weight, _linear_backward(_input_grad_kernel), "_QMatmul")
_QMatmulInputGrad = _eager_twin(_input_grad_kernel, _save_weight, _linear_backward(_forward_kernel),
                                "_QMatmulInputGrad")


def _call(op, function, kernel, t: Tensor, needs_grad: bool, *args):
    """One kernel call: through its custom op while tracing (or for tensor subclasses), else
    through the eager autograd twin, or (no autograd needed) the kernel itself."""
    if type(t) is not Tensor or torch.compiler.is_compiling():
        return op(t, *args)
    return function.apply(t, *args) if needs_grad else kernel(t, *args)


# ---- the public functions ------------------------------------------------------------------------

def quantize(w: torch.Tensor, qtype) -> QTensor:
    """Quantize a float weight [N, K] (any float dtype, any device) into `qtype` blocks on the
    same device. Quantization runs on the CPU (the reference quantizers)."""
    fmt = get_format(qtype)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise ValueError(f"w must be a floating-point torch.Tensor, got {getattr(w, 'dtype', type(w))}")
    if w.dim() != 2:
        raise ValueError(f"w must have shape [N, K], got {tuple(w.shape)}")
    n, k = w.shape
    row_bytes = fmt.row_bytes(k)
    if not torch.isfinite(w).all():
        raise ValueError("w contains NaN or inf; quantization needs finite weights")
    src = w.detach().to("cpu", torch.float32).contiguous()
    if not fmt.quantized:
        raw = torch.from_numpy(fmt.quantize(src.numpy()).reshape(n, row_bytes))
    else:
        raw = torch.empty((n, row_bytes), dtype=torch.uint8)
        _C.quantize(fmt.type_id, src.data_ptr(), raw.data_ptr(), n, k)
    return QTensor(raw.to(w.device), fmt, (n, k))


def dequantize(qt: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Blocks -> dense [N, K] in `dtype` (float32, float16 or bfloat16) on qt's device."""
    _check_qtensor(qt, "qt")
    if dtype not in ACT_DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    n, k = qt.shape
    if not qt.format.quantized:
        return _float_view(qt).to(dtype)
    return _call(dequantize_op, None, _dequantize_kernel, qt.raw, False, qt.format.type_id, n, k, dtype)


def _float_view(qt: QTensor) -> torch.Tensor:
    dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[qt.format.name]
    return qt.raw.view(dt).reshape(qt.shape)


def qmatmul_input_grad(dy: torch.Tensor, qt: QTensor) -> torch.Tensor:
    """dX[..., K] = dY[..., N] · deq(W)."""
    _check_qtensor(qt)
    n, k = qt.shape
    _check_act(dy, "dy", qt.device, n, "N")
    dy2 = dy.reshape(-1, n)
    if not qt.format.quantized:
        dx = dy2 @ _float_view(qt).to(dy.dtype)
    else:
        dx = _call(qmatmul_input_grad_op, _QMatmulInputGrad, _input_grad_kernel, dy2,
                   torch.is_grad_enabled() and dy.requires_grad, qt.raw, qt.format.type_id, n, k)
    return dx.reshape(*dy.shape[:-1], k)


def qmatmul(x: torch.Tensor, qt: QTensor) -> torch.Tensor:
    """Y[..., N] = X[..., K] · deq(W[N, K])ᵀ, differentiable with respect to x only."""
    _check_qtensor(qt)
    n, k = qt.shape
    _check_act(x, "x", qt.device, k, "K")
    x2 = x.reshape(-1, k)
    if llamacpp_activations.active():
        if torch.is_grad_enabled() and x.requires_grad:
            raise ValueError("llama.cpp's rounding of activations is for evaluation: it has no gradient "
                             "(leave lowtune.llamacpp_activations.rounded_like_llamacpp() to train)")
        x2 = llamacpp_activations.round_activations(x2, qt.format)
    if not qt.format.quantized:
        y = x2 @ _float_view(qt).to(x.dtype).t()
    else:
        y = _call(qmatmul_op, _QMatmul, _forward_kernel, x2, torch.is_grad_enabled() and x.requires_grad,
                  qt.raw, qt.format.type_id, n, k)
    return y.reshape(*x.shape[:-1], n)


# ---- a rank-r update of W inside the large-M products -------------------------------------------
# The building block of an adapter merged into the frozen product (BENCHMARKS.md, "The adapter merged
# into the frozen product's chunks"): W' = deq(W) + scale·Bx·Atᵀ is formed chunk by chunk by the
# dequantization kernel of the chunked cuBLAS path, so y and dx need no pass of the update's own.
# CUDA, bf16/fp16 only; not differentiable (a caller's autograd formula uses it for both directions).

def _lowrank_args(a: Tensor, name: str, qt: QTensor, bx: Tensor, at: Tensor, last: int, last_name: str):
    _check_qtensor(qt)
    if not qt.format.quantized:
        raise ValueError(f"the low-rank update needs a quantized weight, got {qt.format.name}")
    _check_act(a, name, qt.device, last, last_name)
    if a.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{name} must be float16 or bfloat16 for the low-rank update, got {a.dtype}")
    n, k = qt.shape
    for t, tname, rows in ((bx, "bx", n), (at, "at", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != rows or t.device != qt.device:
            raise ValueError(f"{tname} must be a [{rows}, rank] tensor on {qt.device}, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if bx.shape[1] != at.shape[1] or bx.shape[1] == 0:
        raise ValueError(f"bx and at must share a positive rank, got {bx.shape[1]} and {at.shape[1]}")
    if qt.device.type != "cuda":
        raise ValueError("the low-rank update runs on CUDA only (its CPU twin: dequantize + the update + matmul)")
    return a.reshape(-1, last).contiguous(), lowrank_ready(bx, at, a.dtype)


class LowRankFragments(NamedTuple):
    """A rank-r update's factors in the order dequant_lowrank_kernel reads its MMA fragments (lowrank_ready)."""
    bx: Tensor
    at: Tensor
    rank: int  # padded to a multiple of 16


def lowrank_ready(bx: Tensor, at: Tensor, dtype: torch.dtype) -> LowRankFragments:
    """Bx [N, r] and At [K, r] in dtype, laid out so that each lane's fragment registers of an MMA step are one
    load and a warp's loads are contiguous (csrc/cuda/dequant_tile.cuh says which lane takes which element):
    the rank zero-padded to a multiple of 16, N to a multiple of 16 and K to a multiple of 64 (a warp's tile
    never reads past them), then, with row = 16 R + 8 h + g, column = 64 T + 16 gh + 2 j + gl and
    rank = 16 s + 4 c + q (q = 2 qh + ql):
      Bx as [R][s][g][c][qh][h][ql]: lane 4 g + c's A registers a0..a3 one 16-byte load;
      At as [T][s][j][gh][gl][c][q]: lane 4 (2 gh + gl) + c's B registers of 8-column tile j one 8-byte load."""
    r = -(-bx.shape[1] // 16) * 16

    def padded(t: Tensor, rows: int) -> Tensor:  # (a pad of nothing would still copy)
        if tuple(t.shape) == (rows, r):
            return t
        return torch.nn.functional.pad(t, (0, r - t.shape[1], 0, rows - t.shape[0]))

    n16, k64 = -(-bx.shape[0] // 16) * 16, -(-at.shape[0] // 64) * 64
    b = padded(bx, n16).view(n16 // 16, 2, 8, r // 16, 4, 2, 2).permute(0, 3, 2, 4, 5, 1, 6)
    a = padded(at, k64).view(k64 // 64, 4, 8, 2, r // 16, 4, 4).permute(0, 4, 2, 1, 3, 5, 6)
    # one copy each, cast included; fresh allocations are 16-byte aligned
    return LowRankFragments(torch.empty(b.shape, dtype=dtype, device=bx.device).copy_(b),
                            torch.empty(a.shape, dtype=dtype, device=at.device).copy_(a), r)


def _forward_lowrank_kernel(x2: Tensor, raw: Tensor, type_id: int, n: int, k: int, f: LowRankFragments,
                            scale: float) -> Tensor:
    """x2 [m, k]·(deq(W) + scale·Bx·Atᵀ)ᵀ with Bx, At as lowrank_ready lays them out (in x2's dtype)."""
    y = torch.empty((x2.shape[0], n), dtype=x2.dtype, device=x2.device)
    if y.numel():
        _C.cuda_qmatmul_forward_lowrank(type_id, x2.data_ptr(), ACT_DTYPES[x2.dtype], raw.data_ptr(),
                                        f.bx.data_ptr(), f.at.data_ptr(), f.rank, float(scale), y.data_ptr(),
                                        x2.shape[0], n, k, _stream(x2.device))
    return y


def _input_grad_lowrank_kernel(dy2: Tensor, raw: Tensor, type_id: int, n: int, k: int, f: LowRankFragments,
                               scale: float) -> Tensor:
    """dy2 [m, n]·(deq(W) + scale·Bx·Atᵀ), Bx and At as for _forward_lowrank_kernel."""
    dx = torch.empty((dy2.shape[0], k), dtype=dy2.dtype, device=dy2.device)
    if dx.numel():
        _C.cuda_qmatmul_input_grad_lowrank(type_id, dy2.data_ptr(), ACT_DTYPES[dy2.dtype], raw.data_ptr(),
                                           f.bx.data_ptr(), f.at.data_ptr(), f.rank, float(scale), dx.data_ptr(),
                                           dy2.shape[0], n, k, _stream(dy2.device))
    return dx


def _forward_epilogue_kernel(x2: Tensor, raw: Tensor, type_id: int, n: int, k: int, left: Tensor, right: Tensor,
                             scale: float) -> Tensor:
    """x2 [m, k]·deq(W)ᵀ + scale·left·rightᵀ, left [m, r] and right [n, r] contiguous in x2's dtype: the update
    multiplied into each chunk of y by a GEMM of its own, after the chunk's GEMM (the chunk still in L2) or
    before it (LOWTUNE_CUDA_UPDATE_FIRST=1)."""
    y = torch.empty((x2.shape[0], n), dtype=x2.dtype, device=x2.device)
    if y.numel():
        _C.cuda_qmatmul_forward_epilogue(type_id, x2.data_ptr(), ACT_DTYPES[x2.dtype], raw.data_ptr(),
                                         left.data_ptr(), right.data_ptr(), left.shape[1], float(scale),
                                         y.data_ptr(), x2.shape[0], n, k, _stream(x2.device))
    return y


def _input_grad_epilogue_kernel(dy2: Tensor, raw: Tensor, type_id: int, n: int, k: int, left: Tensor,
                                right: Tensor, scale: float) -> Tensor:
    """dy2 [m, n]·deq(W) + scale·left·rightᵀ, left [m, r] and right [k, r] as for _forward_epilogue_kernel."""
    dx = torch.empty((dy2.shape[0], k), dtype=dy2.dtype, device=dy2.device)
    if dx.numel():
        _C.cuda_qmatmul_input_grad_epilogue(type_id, dy2.data_ptr(), ACT_DTYPES[dy2.dtype], raw.data_ptr(),
                                            left.data_ptr(), right.data_ptr(), left.shape[1], float(scale),
                                            dx.data_ptr(), dy2.shape[0], n, k, _stream(dy2.device))
    return dx


def _forward_expanded_kernel(x2: Tensor, raw: Tensor, type_id: int, n: int, k: int, a: Tensor, pool: int,
                             repeat: int, scale: float) -> Tensor:
    """x2 [m, k]·(deq(W) + scale/pool·a[i/repeat][j/pool])ᵀ, a fp32 contiguous [n/repeat, k/pool]."""
    y = torch.empty((x2.shape[0], n), dtype=x2.dtype, device=x2.device)
    if y.numel():
        _C.cuda_qmatmul_forward_expanded(type_id, x2.data_ptr(), ACT_DTYPES[x2.dtype], raw.data_ptr(), a.data_ptr(),
                                         pool, repeat, float(scale), y.data_ptr(), x2.shape[0], n, k,
                                         _stream(x2.device))
    return y


def _input_grad_expanded_kernel(dy2: Tensor, raw: Tensor, type_id: int, n: int, k: int, a: Tensor, pool: int,
                                repeat: int, scale: float) -> Tensor:
    """dy2 [m, n]·(deq(W) + scale/pool·a[i/repeat][j/pool]), a as for _forward_expanded_kernel."""
    dx = torch.empty((dy2.shape[0], k), dtype=dy2.dtype, device=dy2.device)
    if dx.numel():
        _C.cuda_qmatmul_input_grad_expanded(type_id, dy2.data_ptr(), ACT_DTYPES[dy2.dtype], raw.data_ptr(),
                                            a.data_ptr(), pool, repeat, float(scale), dx.data_ptr(), dy2.shape[0],
                                            n, k, _stream(dy2.device))
    return dx


def qmatmul_lowrank(x: Tensor, qt: QTensor, bx: Tensor, at: Tensor, scale: float) -> Tensor:
    """Y[..., N] = X[..., K] · (deq(W) + scale·Bx·Atᵀ)ᵀ; Bx [N, r], At [K, r] (cast to x's dtype)."""
    n, k = qt.shape
    x2, f = _lowrank_args(x, "x", qt, bx, at, k, "K")
    y = _forward_lowrank_kernel(x2, qt.raw, qt.format.type_id, n, k, f, scale)
    return y.reshape(*x.shape[:-1], n)


def qmatmul_input_grad_lowrank(dy: Tensor, qt: QTensor, bx: Tensor, at: Tensor, scale: float) -> Tensor:
    """dX[..., K] = dY[..., N] · (deq(W) + scale·Bx·Atᵀ); Bx [N, r], At [K, r] (cast to dy's dtype)."""
    n, k = qt.shape
    dy2, f = _lowrank_args(dy, "dy", qt, bx, at, n, "N")
    dx = _input_grad_lowrank_kernel(dy2, qt.raw, qt.format.type_id, n, k, f, scale)
    return dx.reshape(*dy.shape[:-1], k)
