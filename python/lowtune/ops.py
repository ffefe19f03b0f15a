"""The one dispatch point between PyTorch and the compiled kernels.

Every function here checks its arguments (dtype, device, contiguity, shape, type) and raises
ValueError naming the tensor and what was expected; then it picks the CPU or CUDA kernel and
passes raw pointers (and, on CUDA, torch's current stream).

    quantize(w[N, K] float, type) -> QTensor
    dequantize(qt, dtype)         -> [N, K]
    qmatmul(x[..., K], qt)        -> [..., N] = x · deq(W)ᵀ     differentiable w.r.t. x
    qmatmul_input_grad(dy[M, N], qt) -> [M, K] = dy · deq(W)
"""
from __future__ import annotations

import functools

import torch

from . import _C
from .formats import get_format
from .qtensor import QTensor

ACT_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


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
    fmt = qt.format
    if not fmt.quantized:
        return _float_view(qt).to(dtype)
    out = torch.empty((n, k), dtype=dtype, device=qt.device)
    if n * k == 0:
        return out
    if qt.device.type == "cuda":
        _C.cuda_dequantize(fmt.type_id, qt.raw.data_ptr(), out.data_ptr(), ACT_DTYPES[dtype], n, k, _stream(qt.device))
    else:
        _C.dequantize(fmt.type_id, qt.raw.data_ptr(), out.data_ptr(), ACT_DTYPES[dtype], n, k)
    return out


def _float_view(qt: QTensor) -> torch.Tensor:
    dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[qt.format.name]
    return qt.raw.view(dt).reshape(qt.shape)


def _forward(x2: torch.Tensor, qt: QTensor) -> torch.Tensor:
    m, k = x2.shape
    n = qt.shape[0]
    if not qt.format.quantized:
        return x2 @ _float_view(qt).to(x2.dtype).t()
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0 or n == 0:
        return y
    if x2.device.type == "cuda":
        _C.cuda_qmatmul_forward(qt.format.type_id, x2.data_ptr(), ACT_DTYPES[x2.dtype], qt.raw.data_ptr(), y.data_ptr(), m, n, k, _stream(x2.device))
    else:
        _C.qmatmul_forward(qt.format.type_id, x2.data_ptr(), ACT_DTYPES[x2.dtype], qt.raw.data_ptr(), y.data_ptr(), m, n, k)
    return y


def _input_grad(dy2: torch.Tensor, qt: QTensor) -> torch.Tensor:
    m, n = dy2.shape
    k = qt.shape[1]
    if not qt.format.quantized:
        return dy2 @ _float_view(qt).to(dy2.dtype)
    dx = torch.empty((m, k), dtype=dy2.dtype, device=dy2.device)
    if m == 0 or k == 0:
        return dx
    if n == 0:
        return dx.zero_()
    if dy2.device.type == "cuda":
        _C.cuda_qmatmul_input_grad(qt.format.type_id, dy2.data_ptr(), ACT_DTYPES[dy2.dtype], qt.raw.data_ptr(), dx.data_ptr(), m, n, k, _stream(dy2.device))
    else:
        _C.qmatmul_input_grad(qt.format.type_id, dy2.data_ptr(), ACT_DTYPES[dy2.dtype], qt.raw.data_ptr(), dx.data_ptr(), m, n, k)
    return dx


def qmatmul_input_grad(dy: torch.Tensor, qt: QTensor) -> torch.Tensor:
    """dX[..., K] = dY[..., N] · deq(W)."""
    _check_qtensor(qt)
    n, k = qt.shape
    _check_act(dy, "dy", qt.device, n, "N")
    return _input_grad(dy.reshape(-1, n), qt).reshape(*dy.shape[:-1], k)


class _QMatmul(torch.autograd.Function):
    """y = x · deq(W)ᵀ. Saves nothing but the (packed) weight: the frozen matmul keeps no input."""

    @staticmethod
    def forward(ctx, x2, raw, qt):
        ctx.qt = qt
        return _forward(x2, qt)

    @staticmethod
    def backward(ctx, dy):
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _input_grad(dy.contiguous(), ctx.qt)
        return dx, None, None


def qmatmul(x: torch.Tensor, qt: QTensor) -> torch.Tensor:
    """Y[..., N] = X[..., K] · deq(W[N, K])ᵀ, differentiable with respect to x only."""
    _check_qtensor(qt)
    n, k = qt.shape
    _check_act(x, "x", qt.device, k, "K")
    x2 = x.reshape(-1, k)
    if torch.is_grad_enabled() and x.requires_grad:
        y = _QMatmul.apply(x2, qt.raw, qt)
    else:
        y = _forward(x2, qt)
    return y.reshape(*x.shape[:-1], n)
