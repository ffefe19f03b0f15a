"""The dispatch point for the fused adapter kernels (csrc/adapter_kernels.h).

Like lowtune.ops: checks dtype, device, contiguity and shape (a bad one is a ValueError naming
the tensor), then calls a PyTorch custom op (namespace lowtune) that picks the CPU or CUDA
kernel and passes raw pointers and torch's current stream. Each op has a fake implementation and
an autograd formula (itself a custom op), so torch.compile traces through and CUDA graphs capture.
In eager mode the same functions run without the dispatcher, as in lowtune.ops.

    AdapterGeometry(k, n, pool, repeat, rank, has_b, scale)      one adapter's shape and scale
    adapted_qmatmul(x, qt, A, B, geom)      -> x·deq(W)ᵀ + adapter(x)   (base and adapter fused)
    adapter_accumulate(y, x, A, B, geom)    -> y + adapter(x), a new tensor (y from any base layer)

    lowtune::adapted_qmatmul(x, xa?, A, B?, raw, type_id, k, n, pool, repeat, rank, has_b, scale,
        grad_from) -> (y, xs, u)           backward: lowtune::adapted_qmatmul_backward
    lowtune::adapter_accumulate(y, xa, A, B?, k, n, pool, repeat, rank, has_b, scale, grad_from,
        pooled) -> (y', xs, u)             backward: lowtune::adapter_backward

    adapter(x) = scale · expand_q(pool_p(x) · A[:rank]ᵀ · B[:, :rank]ᵀ)      (has_b)
               = scale · expand_q(pool_p(x) · Aᵀ)                             (single matrix: A is M)

A is [rows >= rank, k/p], B is [n/q, cols >= rank] (QDyLoRA uses their leading slices). Both
may be any float dtype; the kernels read them as fp32 and the gradients come back in their dtype.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _C
from . import ops
from .qtensor import QTensor

ACT_DTYPES = ops.ACT_DTYPES


@dataclass(frozen=True)
class AdapterGeometry:
    """k, n: the base layer's in/out features. pool (p): inputs averaged per adapter input.
    repeat (q): outputs sharing one adapter output. rank: rows of A in use (single matrix:
    n/q). has_b: False for a single matrix M (QA-HiRA). scale: multiplies the adapter output.
    grad_from: rows/columns of A/B below this index get zero gradient (DyLoRA's frozen mode)."""
    k: int
    n: int
    pool: int = 1
    repeat: int = 1
    rank: int = 1
    has_b: bool = True
    scale: float = 1.0
    grad_from: int = 0

    def __post_init__(self):
        if self.k <= 0 or self.n <= 0:
            raise ValueError(f"k and n must be positive, got k={self.k}, n={self.n}")
        if self.pool < 1 or self.k % self.pool:
            raise ValueError(f"pool={self.pool} must divide the input features k={self.k}")
        if self.repeat < 1 or self.n % self.repeat:
            raise ValueError(f"repeat={self.repeat} must divide the output features n={self.n}")
        if not self.has_b and self.rank != self.n // self.repeat:
            raise ValueError(f"a single matrix has rank n/repeat = {self.n // self.repeat}, got {self.rank}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")

    @property
    def k_pooled(self) -> int:
        return self.k // self.pool

    @property
    def n_pooled(self) -> int:
        return self.n // self.repeat


def _check_weights(A: torch.Tensor, B, geom: AdapterGeometry, device: torch.device) -> None:
    if not isinstance(A, torch.Tensor) or not A.is_floating_point():
        raise ValueError(f"A must be a floating-point tensor, got {getattr(A, 'dtype', type(A))}")
    if A.dim() != 2 or A.shape[1] != geom.k_pooled or A.shape[0] < geom.rank:
        raise ValueError(f"A must have shape [>= {geom.rank}, k/pool={geom.k_pooled}], got {tuple(A.shape)}")
    if not geom.has_b and A.shape[0] != geom.n_pooled:
        raise ValueError(f"the single matrix must have shape [{geom.n_pooled}, {geom.k_pooled}], got {tuple(A.shape)}")
    if A.device != device:
        raise ValueError(f"A is on {A.device} but the activations are on {device}")
    if geom.has_b:
        if not isinstance(B, torch.Tensor) or not B.is_floating_point():
            raise ValueError(f"B must be a floating-point tensor, got {getattr(B, 'dtype', type(B))}")
        if B.dim() != 2 or B.shape[0] != geom.n_pooled or B.shape[1] < geom.rank:
            raise ValueError(f"B must have shape [n/repeat={geom.n_pooled}, >= {geom.rank}], got {tuple(B.shape)}")
        if B.device != device:
            raise ValueError(f"B is on {B.device} but the activations are on {device}")
    elif B is not None:
        raise ValueError("a single-matrix adapter takes no B")


def _check_act(t: torch.Tensor, name: str, last: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in ACT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() < 1 or t.shape[-1] != last:
        raise ValueError(f"{name} must have shape [..., {last}], got {tuple(t.shape)}")


def _f32(t):
    # called below autograd (inside an op, or an autograd.Function's forward/backward): fp32
    # contiguous weights, the usual case, pass through without an operator call
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.to(torch.float32).contiguous()


def _geom_args(geom: AdapterGeometry, m: int, A32, B32, k: int | None = None, pool: int | None = None):
    k = geom.k if k is None else k
    pool = geom.pool if pool is None else pool
    b_ld = B32.shape[1] if B32 is not None else 0
    return (m, k, geom.n, pool, geom.repeat, geom.rank, A32.shape[1], b_ld, geom.has_b, float(geom.scale))


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def _use_torch_gemm(t: torch.Tensor) -> bool:
    """Whether the adapter products of t's rows run as torch GEMMs (cuBLAS, or the CPU's sgemm)
    around lowtune's pooling and expansion, or in the fused kernels: on CUDA the choice the
    compiled kernels' one policy (csrc/cuda_policy.h) makes for the quantized products too, on
    the CPU the one ops.cpu_dense_gemm makes for them."""
    if t.device.type == "cpu":
        return ops.cpu_dense_gemm(t.shape[0], t.dtype)
    return t.device.type == "cuda" and _C.cuda_path("adapter", t.shape[0], ACT_DTYPES[t.dtype], True) == "cublas"


def _pool(x2: torch.Tensor, pool: int) -> torch.Tensor:
    """x2 [m, k] averaged over each `pool` adjacent columns: [m, k/pool] (on CUDA one pass of
    lowtune's kernel; torch's reduction over a short last axis is ~10x slower there)."""
    m, k = x2.shape
    if pool == 1:
        return x2
    if x2.device.type != "cuda":
        return x2.view(m, k // pool, pool).mean(-1)
    xs = torch.empty((m, k // pool), dtype=x2.dtype, device=x2.device)
    with torch.cuda.device(x2.device):
        _C.cuda_adapter_pool(x2.data_ptr(), ACT_DTYPES[x2.dtype], xs.data_ptr(), m, k, pool, ops._stream(x2.device))
    return xs


def _folds(t: torch.Tensor) -> bool:
    """Whether the torch GEMM path folds the pool's and the repeat's expansions into the GEMMs
    (the small factor's rows or columns repeated) instead of running them as passes over [m, k]
    or [m, n]: on CUDA, where those passes cost memory traffic the GEMMs do not (BENCHMARKS.md,
    "Where the adapters' GPU time went"); not on the CPU, where the folded GEMMs' extra products
    cost more than the passes."""
    return t.device.type == "cuda"


def _rows_repeated(w: torch.Tensor, q: int, dtype: torch.dtype) -> torch.Tensor:
    """w [j, c] in `dtype` with each row repeated q times ([j q, c])."""
    w = w.to(dtype)
    return w if q == 1 else w.repeat_interleave(q, dim=0)


def _rows_summed(g: torch.Tensor, q: int) -> torch.Tensor:
    """The gradient of a factor whose rows were repeated q times: each run of q rows summed."""
    return g if q == 1 else g.view(-1, q, g.shape[1]).sum(1)


_MM_TO_F32 = "dtype" in torch.ops.aten.mm.overloads()  # torch.mm(..., out_dtype=) (torch >= 2.8)
_ADDMM_TO_F32 = "dtype" in torch.ops.aten.addmm.overloads()


def _mm_f32(a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """alpha·a·b as fp32 (the adapter weights' gradients): straight from the GEMM's accumulator on CUDA
    (one kernel, no bf16 rounding; alpha applied in its epilogue, not by a kernel of its own), else the
    product cast and scaled."""
    if a.device.type == "cuda" and a.dtype != torch.float32 and _MM_TO_F32:
        if alpha == 1.0:
            return torch.mm(a, b, out_dtype=torch.float32)
        if _ADDMM_TO_F32:  # beta = 0: the input is not read
            c = torch.empty((a.shape[0], b.shape[1]), dtype=torch.float32, device=a.device)
            return torch.addmm(c, a, b, out_dtype=torch.float32, beta=0, alpha=alpha)
    c = (a @ b).float()
    return c if alpha == 1.0 else c.mul_(alpha)


def _mm_scaled(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha·a·b in a's dtype; on CUDA alpha is applied in the GEMM's epilogue (one kernel, one rounding)."""
    if a.device.type == "cuda":
        return torch.addmm(torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device), a, b,
                           beta=0, alpha=alpha)
    return (a @ b).mul_(alpha)


@functools.lru_cache(maxsize=16)
def _expansion(cols: int, pool: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """E [cols, cols·pool] with E[j, j·pool + t] = 1: v·E repeats each column of v pool times."""
    return torch.eye(cols, dtype=dtype, device=device).repeat_interleave(pool, dim=1)


# out += alpha·left·rightᵀ by lowtune's kernel in one pass over out (LOWTUNE_CUDA_RANK_UPDATE=1): 8-11% faster than
# cuBLAS's addmm alone, yet the adapted step was slower with it, so off (BENCHMARKS.md "Two kernels of lowtune's own
# for the LoRA types' skinny passes").
_RANK_UPDATE = os.environ.get("LOWTUNE_CUDA_RANK_UPDATE", "0") == "1"


def _rank_update(out: Tensor, left: Tensor, right: Tensor, kmajor: bool, alpha: float) -> bool:
    """out [m, c] += alpha·left·right (right [r, c] when kmajor, else rightᵀ with right [c, r]) by lowtune's
    kernel where it takes them (16-bit, contiguous and 16-byte aligned, r 16, 32, 48 or 64, c a multiple of 128);
    False, with nothing done, elsewhere."""
    m, c = out.shape
    r = left.shape[1]
    if not (_RANK_UPDATE and out.is_cuda and out.dtype in (torch.float16, torch.bfloat16) and r in (16, 32, 48, 64)
            and c % 128 == 0 and left.dtype == out.dtype and right.dtype == out.dtype and out.is_contiguous()):
        return False
    left, right = left.contiguous(), right.contiguous()
    if any(t.data_ptr() % 16 for t in (out, left, right)):
        return False
    with torch.cuda.device(out.device):
        _C.cuda_adapter_rank_update(out.data_ptr(), ACT_DTYPES[out.dtype], left.data_ptr(), right.data_ptr(), m, c, r,
                                    kmajor, float(alpha), ops._stream(out.device))
    return True


def _add_repeated_cols(y: torch.Tensor, left: torch.Tensor, w: torch.Tensor, q: int, alpha: float) -> None:
    """y [m, n] += alpha · expand_q(left·wᵀ), each column of the product repeated over q adjacent
    ones (w [n/q, c] in y's dtype)."""
    if q > 1 and not _folds(y):
        y.view(y.shape[0], -1, q).add_((left @ w.t()).unsqueeze(-1), alpha=alpha)
        return
    w = _rows_repeated(w, q, w.dtype)
    if not _rank_update(y, left, w, False, alpha):
        y.addmm_(left, w.t(), alpha=alpha)


def _add_pooled_cols(dx: torch.Tensor, left: torch.Tensor, right: torch.Tensor, pool: int, alpha: float) -> None:
    """dx [m, k] += alpha/pool · expand_pool(left·right), each column repeated over pool adjacent
    ones. Folded: one GEMM into dx, with right's columns repeated when left is the narrow side
    (the rank), else through the 0/1 expansion matrix (a GEMM over k/pool)."""
    if pool > 1 and not _folds(dx):
        dx.view(dx.shape[0], -1, pool).add_((left @ right).unsqueeze(-1), alpha=alpha / pool)
    elif pool > 1 and left.shape[1] > right.shape[1]:
        t = left @ right
        dx.addmm_(t, _expansion(t.shape[1], pool, t.dtype, t.device), alpha=alpha / pool)
    else:
        right = right if pool == 1 else right.repeat_interleave(pool, dim=1)
        if not _rank_update(dx, left, right, True, alpha / pool):
            dx.addmm_(left, right, alpha=alpha / pool)


@ops.without_autocast  # (an fp32 x under bf16 autocast: u in bf16 against B in fp32)
def _torch_forward(x2, A32, B32, geom, y, pool):
    """_launch_forward's products through torch.mm (cuBLAS or the CPU's sgemm): u = pool(x)·A[:r]ᵀ,
    y += s·expand_q(u·B[:, :r]ᵀ)."""
    xs = _pool(x2, pool)
    r = geom.rank
    if not geom.has_b:
        _add_repeated_cols(y, xs, A32[:r].to(x2.dtype), geom.repeat, geom.scale)
        return None, xs
    u = xs @ A32[:r].to(x2.dtype).t()
    _add_repeated_cols(y, u, B32[:, :r].to(x2.dtype), geom.repeat, geom.scale)
    return u, xs


def _widen(g: torch.Tensor, shape) -> torch.Tensor:
    """A gradient of the leading rows/columns in use, zero-padded to the parameter's shape
    (QDyLoRA at rank b < r_max); the gradient itself when it already has that shape."""
    if tuple(g.shape) == tuple(shape):
        return g
    full = g.new_zeros(shape)
    full[:g.shape[0], :g.shape[1]] = g
    return full


# g = s·dy·B and dB = s·dyᵀ·u by lowtune's kernel from one read of dy, where cuBLAS's two calls read it twice
# (LOWTUNE_CUDA_DUAL_PRODUCTS=1): bound by its atomics, 1.65x cuBLAS's two calls, so off (BENCHMARKS.md, same
# section).
_DUAL = os.environ.get("LOWTUNE_CUDA_DUAL_PRODUCTS", "0") == "1"


def _dual_fits(dys: Tensor, u: Tensor) -> bool:
    r = u.shape[1]
    return (_DUAL and dys.is_cuda and dys.dtype in (torch.float16, torch.bfloat16) and u.dtype == dys.dtype
            and r in (16, 32, 48, 64) and dys.shape[1] % 128 == 0)


def _dual_products(dys: Tensor, B: Tensor, u: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(s·dys·B [m, r], s·dysᵀ·u [n, r]) in fp32 from one read of dys [m, n] (lowtune's kernel; B [n, r] and u
    [m, r] in dys's dtype, r 16, 32, 48 or 64, n a multiple of 128)."""
    m, n = dys.shape
    r = u.shape[1]
    dys, B, u = dys.contiguous(), B.contiguous(), u.contiguous()
    g = torch.zeros((m, r), dtype=torch.float32, device=dys.device)
    dB = torch.zeros((n, r), dtype=torch.float32, device=dys.device)
    with torch.cuda.device(dys.device):
        _C.cuda_adapter_dual_products(dys.data_ptr(), ACT_DTYPES[dys.dtype], B.data_ptr(), u.data_ptr(), g.data_ptr(),
                                      dB.data_ptr(), m, n, r, float(scale), ops._stream(dys.device))
    return g, dB


@ops.without_autocast  # (an fp32 x under bf16 autocast: u in bf16 against B in fp32)
def _torch_backward(dy2, xs, A32, B32, u, geom, dx, pool):
    """(dA, dB, du) with dA and dB in fp32, full-size (rows/columns past the rank in use stay 0), and du =
    s·dy·B [m, r] (None for a single matrix); dx += the adapter's input gradient, expanded over the pool, in
    place. Folded (_folds), dy is not summed over the repeat's q columns: the last factor's rows are
    repeated instead and its small gradient summed."""
    q, r, s = geom.repeat, geom.rank, geom.scale
    dt = dy2.dtype
    fold = _folds(dy2)
    dys = dy2 if q == 1 or fold else dy2.view(dy2.shape[0], -1, q).sum(-1)
    qf = q if fold else 1  # the repeat the products below still carry
    A = A32[:r].to(dt) if dx is not None else None  # (the merged route's dx needs no cast of A)
    dB = du = None
    if geom.has_b:
        Bq = _rows_repeated(B32[:, :r], qf, dt)
        if _dual_fits(dys, u):  # both from one read of dy
            g, dB_rows = _dual_products(dys, Bq, u, s)
            du = g.to(dt)
        else:
            dB_rows = _mm_f32(dys.t(), u, s)
            du = _mm_scaled(dys, Bq, s)  # [m, r]
        dB = _widen(_rows_summed(dB_rows, qf), B32.shape)
        dA = _widen(_mm_f32(du.t(), xs), A32.shape)
        if dx is not None:
            _add_pooled_cols(dx, du, A, pool, 1.0)
    else:  # dM = s·dysᵀ·xs
        dA = _widen(_rows_summed(_mm_f32(dys.t(), xs, s), qf), A32.shape)
        if dx is not None:
            _add_pooled_cols(dx, dys, _rows_repeated(A, qf, dt), pool, s)
    return dA, dB, du


def _launch_forward(x2, A32, B32, geom, y, pool):
    """y += adapter(x2) in place. x2 [m, k'] with k' = k/ (geom.pool / pool). Returns (u, xs):
    u the first product (fp32 [m, rank]) and xs the adapter input pooled (kept for backward)."""
    m, k = x2.shape
    dev = x2.device
    if _use_torch_gemm(x2):
        return _torch_forward(x2, A32, B32, geom, y, pool)
    u = torch.empty((m, geom.rank), dtype=torch.float32, device=dev) if geom.has_b else None
    xs = torch.empty((m, k // pool), dtype=x2.dtype, device=dev) if pool > 1 else x2
    args = _geom_args(geom, m, A32, B32, k=k, pool=pool)
    ptrs = (x2.data_ptr(), ACT_DTYPES[x2.dtype], A32.data_ptr(), _ptr(B32), y.data_ptr(), _ptr(u),
            xs.data_ptr() if pool > 1 else 0)
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            _C.cuda_adapter_forward(*args, *ptrs, ops._stream(dev))
    else:
        _C.adapter_forward(*args, *ptrs)
    return u, xs


def _launch_backward(dy2, xs, A, B, A32, B32, u, geom, dx, k, pool):
    """Gradients (dA, dB) in A's and B's dtypes, and du = s·dy·B [m, r] where the torch GEMMs made it (else
    None); accumulates the adapter's input gradient into dx [m, k] when dx is given. xs is the saved, already
    pooled adapter input."""
    du = None
    if _use_torch_gemm(dy2):
        dA, dB, du = _torch_backward(dy2, xs, A32, B32, u, geom, dx, pool)
    else:
        dA, dB = _fused_backward(dy2, xs, A32, B32, u, geom, dx, k, pool)
    if geom.grad_from > 0:  # DyLoRA's frozen mode: only the newest slice learns
        dA[:geom.grad_from] = 0
        if dB is not None:
            dB[:, :geom.grad_from] = 0
    dA = dA.to(A.dtype)
    dB = dB.to(B.dtype) if dB is not None else None
    return dA, dB, du


def _fused_backward(dy2, xs, A32, B32, u, geom, dx, k, pool):
    m = dy2.shape[0]
    dev = dy2.device
    dA = torch.zeros(A32.shape, dtype=torch.float32, device=dev)
    dB = torch.zeros(B32.shape, dtype=torch.float32, device=dev) if geom.has_b else None
    # scratch: du [m, rank], or (single matrix) the input gradient before expansion [m, k/p]
    du = torch.empty((m, geom.rank if geom.has_b else k // pool), dtype=torch.float32, device=dev)
    args = _geom_args(geom, m, A32, B32, k=k, pool=pool)
    ptrs = (dy2.data_ptr(), ACT_DTYPES[dy2.dtype], xs.data_ptr(), 1, A32.data_ptr(), _ptr(B32),
            _ptr(u), _ptr(dx), dA.data_ptr(), _ptr(dB), _ptr(du))
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            _C.cuda_adapter_backward(*args, *ptrs, ops._stream(dev))
    else:
        _C.adapter_backward(*args, *ptrs)
    return dA, dB


# ---- the custom ops ------------------------------------------------------------------------------
# Geometry travels as ints (k, n, pool, repeat, rank, has_b, scale, grad_from): the kernels'
# AdapterGeometry rebuilt inside the op. The adapter input is x pooled by `pool`, or (separate /
# pooled) an already pooled input [M, k/pool], e.g. with dropout applied. Auxiliary outputs the
# backward needs: xs, the pooled adapter input (empty when it is the input itself), and u, the
# first product [M, rank] (empty for a single matrix). The ops trust their arguments: the public
# functions below validate.

def _kernel_input(geom: AdapterGeometry, pooled: bool) -> tuple[int, int]:
    """(k, pool) the kernels see: the full input pooled by p, or an already pooled input of
    width k/p that needs no further pooling."""
    return (geom.k_pooled, 1) if pooled else (geom.k, geom.pool)


def _u_dtype(x: Tensor, has_b: bool) -> torch.dtype:
    # the fused kernels keep u in fp32; the torch GEMM path in the activation dtype
    return x.dtype if has_b and _use_torch_gemm(x) else torch.float32


def _aux_outputs(x2: Tensor, ain: Tensor, u, xs, has_b: bool):
    """(xs, u) as op outputs: never an alias of an input (an op output may not be one)."""
    xs = xs if xs is not None and xs is not ain else x2.new_empty((0,))
    u = u if u is not None else x2.new_empty((0,), dtype=torch.float32)
    return xs, u


def _fake_aux(x2: Tensor, geom: AdapterGeometry, pooled: bool):
    m = x2.shape[0]
    xs = x2.new_empty((m, geom.k_pooled)) if geom.pool > 1 and not pooled else x2.new_empty((0,))
    u = x2.new_empty((m, geom.rank) if geom.has_b else (0,), dtype=_u_dtype(x2, geom.has_b))
    return xs, u


# The adapter merged into the frozen product. Where it applies (CUDA, 16-bit activations, the rows the
# torch GEMM path takes, the adapter reading x itself rather than a separate input such as a dropped-out
# one), y = x·deq(W)ᵀ + adapter(x) and dx = dy·deq(W) + the adapter's share come out of the chunked
# path's products, in one of three kinds:
#   lowrank   ΔW = s/p·expand_q(B·A) added to each dequantized chunk (ops.qmatmul_lowrank);
#   epilogue  the same two factors, B's against u = pool(x)·Aᵀ (forward) or expand_p(A)/p's against
#             du = s·dy·B (input gradient) multiplied into each chunk's slice of y or dx by a GEMM of its
#             own, after the chunk's GEMM (the slice still in L2) or before it (LOWTUNE_CUDA_UPDATE_FIRST)
#             (ops._forward_epilogue_kernel);
#   expanded  a single matrix (QA-HiRA): ΔW = s/p·expand_q(A) added to each dequantized chunk.
# None needs a pass over y or dx of its own. u, dA and dB are the torch path's. LOWTUNE_CUDA_ADAPTER_MERGE:
# auto (the kinds timed faster than the separate products: BENCHMARKS.md "The adapter's update inside the
# dequantization kernel"), 1 (epilogue and expanded), 0 (none), or kinds joined by commas.
_MERGE_AUTO = frozenset({"expanded"})
_MERGE_NAMES = ("lowrank", "epilogue", "expanded")


def _merge_kinds(setting: str) -> frozenset:
    choices = {"auto": _MERGE_AUTO, "1": frozenset({"epilogue", "expanded"}), "0": frozenset()}
    if setting in choices:
        return choices[setting]
    kinds = frozenset(setting.split(","))
    if not kinds <= set(_MERGE_NAMES):
        raise ValueError(f"LOWTUNE_CUDA_ADAPTER_MERGE must be auto, 1, 0 or kinds among {', '.join(_MERGE_NAMES)} "
                         f"joined by commas, got {setting!r}")
    return kinds


_MERGE_KINDS = _merge_kinds(os.environ.get("LOWTUNE_CUDA_ADAPTER_MERGE", "auto"))


def _merge_kind(t: Tensor, geom: AdapterGeometry, separate: bool) -> str | None:
    """The kind of merge the adapter's products take for rows t, or None for the separate products
    (the epilogue before lowrank where both are allowed)."""
    if separate or t.device.type != "cuda" or t.dtype not in (torch.float16, torch.bfloat16):
        return None
    kinds = ("epilogue", "lowrank") if geom.has_b else ("expanded",)
    kind = next((c for c in kinds if c in _MERGE_KINDS), None)
    return kind if kind is not None and _use_torch_gemm(t) else None


def _merged_factors(A32: Tensor, B32: Tensor, geom: AdapterGeometry) -> tuple[Tensor, Tensor]:
    """(Bx [n, r], At [k, r]) with Bx·Atᵀ = expand_q(B[:, :r])·expand_p(A[:r])/p: B's rows repeated over
    the repeat's q outputs, A's columns over the pool's p inputs (each weighing 1/p)."""
    return _merged_bx(B32, geom), _merged_at(A32, geom)


def _merged_bx(B32: Tensor, geom: AdapterGeometry) -> Tensor:
    return B32[:, :geom.rank].repeat_interleave(geom.repeat, dim=0) if geom.repeat > 1 else B32[:, :geom.rank]


def _merged_at(A32: Tensor, geom: AdapterGeometry) -> Tensor:
    r, p = geom.rank, geom.pool
    return (A32[:r] / p).repeat_interleave(p, dim=1).t() if p > 1 else A32[:r].t()


def _merged_product(t: Tensor, raw: Tensor, type_id: int, A32: Tensor, B32: Tensor | None, geom: AdapterGeometry,
                    kind: str, forward: bool, left: Tensor | None = None) -> Tensor:
    """y = t·W'ᵀ (forward) or dx = t·W' (t = dy), W' = deq(W) + ΔW; for the epilogue, left is u (forward) or
    du (input gradient, already scaled)."""
    if kind == "epilogue":
        right = _merged_bx(B32, geom) if forward else _merged_at(A32, geom)
        right = right.to(t.dtype, memory_format=torch.contiguous_format)
        kernel = ops._forward_epilogue_kernel if forward else ops._input_grad_epilogue_kernel
        return kernel(t, raw, type_id, geom.n, geom.k, left, right, geom.scale if forward else 1.0)
    if kind == "lowrank":
        f = ops.lowrank_ready(*_merged_factors(A32, B32, geom), t.dtype)
        kernel = ops._forward_lowrank_kernel if forward else ops._input_grad_lowrank_kernel
        return kernel(t, raw, type_id, geom.n, geom.k, f, geom.scale)
    kernel = ops._forward_expanded_kernel if forward else ops._input_grad_expanded_kernel
    return kernel(t, raw, type_id, geom.n, geom.k, A32[:geom.rank].contiguous(), geom.pool, geom.repeat, geom.scale)


def _adapted_qmatmul(x: Tensor, xa: Tensor | None, A: Tensor, B: Tensor | None, raw: Tensor,
                       type_id: int, k: int, n: int, pool: int, repeat: int, rank: int, has_b: bool,
                       scale: float, grad_from: int) -> tuple[Tensor, Tensor, Tensor]:
    """(y, xs, u): y [M, n] = x [M, k]·deq(W)ᵀ + adapter(xa if given else x), the adapter
    accumulated into the frozen matmul's output."""
    geom = AdapterGeometry(k, n, pool, repeat, rank, has_b, scale, grad_from)
    kind = _merge_kind(x, geom, xa is not None)
    if kind is not None:
        A32 = _f32(A)
        xs = _pool(x, pool)
        u = xs @ A32[:rank].to(x.dtype).t() if has_b else None  # for dB, as the torch path keeps it
        y = _merged_product(x, raw, type_id, A32, _f32(B), geom, kind, forward=True, left=u)
        return (y, *_aux_outputs(x, x, u, xs, has_b))
    y = ops._forward_kernel(x, raw, type_id, n, k)
    ain = x if xa is None else xa
    kk, pp = _kernel_input(geom, xa is not None)
    u, xs = _launch_forward(ain, _f32(A), _f32(B), geom, y, pp)
    return (y, *_aux_outputs(x, ain, u, xs, has_b))


adapted_qmatmul_op = torch.library.custom_op("lowtune::adapted_qmatmul", _adapted_qmatmul, mutates_args=())


@adapted_qmatmul_op.register_fake
def _(x, xa, A, B, raw, type_id, k, n, pool, repeat, rank, has_b, scale, grad_from):
    geom = AdapterGeometry(k, n, pool, repeat, rank, has_b, scale, grad_from)
    return (x.new_empty((x.shape[0], n)), *_fake_aux(x, geom, xa is not None))


def _adapted_qmatmul_backward(
        dy: Tensor, xs: Tensor, u: Tensor, A: Tensor, B: Tensor | None, raw: Tensor, type_id: int,
        k: int, n: int, pool: int, repeat: int, rank: int, has_b: bool, scale: float,
        grad_from: int, separate: bool, need_dx: bool, need_dxa: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dxa, dA, dB) of adapted_qmatmul. xs is the pooled adapter input [M, k/pool]. dx =
    dy·deq(W) plus (unless separate) the adapter's share; dxa (separate only) the adapter
    input's gradient. Unrequested or absent ones are empty."""
    geom = AdapterGeometry(k, n, pool, repeat, rank, has_b, scale, grad_from)
    dy, m = dy.contiguous(), dy.shape[0]
    A32, B32 = _f32(A), _f32(B)
    kind = _merge_kind(dy, geom, separate) if need_dx else None
    merged = kind is not None  # the adapter's share of dx comes out of the frozen product
    dx = None
    if kind in ("lowrank", "expanded"):  # (the epilogue's needs du, made below)
        dx = _merged_product(dy, raw, type_id, A32, B32, geom, kind, forward=False)
    elif need_dx and not merged:
        dx = ops._input_grad_kernel(dy, raw, type_id, n, k)
    dxa = None
    if separate:
        if need_dxa:
            dxa = torch.zeros((m, geom.k_pooled), dtype=dy.dtype, device=dy.device)
        target = dxa
    else:
        target = None if merged else dx  # the adapter's share accumulates into the frozen layer's dx
    kk, pp = _kernel_input(geom, separate)
    dA, dB, du = _launch_backward(dy, xs, A, B, A32, B32, u if has_b else None, geom, target, kk, pp)
    if kind == "epilogue":  # du (the torch path's, scaled) multiplied into each chunk of dx
        dx = _merged_product(dy, raw, type_id, A32, B32, geom, kind, forward=False, left=du)
    empty = dy.new_empty((0,))
    return (dx if dx is not None else empty, dxa if dxa is not None else dy.new_empty((0,)),
            dA, dB if dB is not None else A.new_empty((0,)))


adapted_qmatmul_backward_op = torch.library.custom_op("lowtune::adapted_qmatmul_backward",
                                                      _adapted_qmatmul_backward, mutates_args=())


@adapted_qmatmul_backward_op.register_fake
def _(dy, xs, u, A, B, raw, type_id, k, n, pool, repeat, rank, has_b, scale, grad_from, separate,
      need_dx, need_dxa):
    m = dy.shape[0]
    dx = dy.new_empty((m, k)) if need_dx else dy.new_empty((0,))
    dxa = dy.new_empty((m, k // pool)) if separate and need_dxa else dy.new_empty((0,))
    return dx, dxa, A.new_empty(A.shape), B.new_empty(B.shape) if has_b else A.new_empty((0,))


def _adapted_setup(ctx, inputs, output):
    x, xa, A, B, raw, type_id, k, n, pool, repeat, rank, has_b, scale, grad_from = inputs
    _, xs, u = output
    ctx.mark_non_differentiable(xs, u)
    ctx.set_materialize_grads(False)  # xs and u get no gradient: no zeros made for them
    pooled_input = xs if pool > 1 and xa is None else (x if xa is None else xa)
    ctx.save_for_backward(pooled_input, u, A, B, raw)
    ctx.args = (type_id, k, n, pool, repeat, rank, has_b, scale, grad_from, xa is not None)


def _adapted_backward(backward_fn):
    """adapted_qmatmul's backward formula, computed by `backward_fn` (the backward op when
    traced, its kernel function in eager mode)."""
    def backward(ctx, dy, _dxs, _du):
        xs, u, A, B, raw = ctx.saved_tensors
        need = ctx.needs_input_grad
        has_b = ctx.args[6]
        dx, dxa, dA, dB = backward_fn(dy.contiguous(), xs, u, A, B, raw, *ctx.args, need[0], need[1])
        return (dx if need[0] else None, dxa if need[1] else None, dA if need[2] else None,
                dB if has_b and need[3] else None) + (None,) * 10
    return backward


adapted_qmatmul_op.register_autograd(_adapted_backward(adapted_qmatmul_backward_op), setup_context=_adapted_setup)


# the eager twin of the op's autograd (see lowtune.ops._eager_twin)
_AdaptedQMatmul = ops._eager_twin(_adapted_qmatmul, _adapted_setup, _adapted_backward(_adapted_qmatmul_backward),
                                  "_AdaptedQMatmul")


def _adapter_accumulate(y: Tensor, xa: Tensor, A: Tensor, B: Tensor | None, k: int, n: int,
                          pool: int, repeat: int, rank: int, has_b: bool, scale: float,
                          grad_from: int, pooled: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(y + adapter(xa), xs, u) for y [M, n] from any base layer. xa is the layer input [M, k],
    or (pooled) the already pooled adapter input [M, k/pool]."""
    geom = AdapterGeometry(k, n, pool, repeat, rank, has_b, scale, grad_from)
    out = y.clone(memory_format=torch.contiguous_format)
    kk, pp = _kernel_input(geom, pooled)
    u, xs = _launch_forward(xa, _f32(A), _f32(B), geom, out, pp)
    return (out, *_aux_outputs(xa, xa, u, xs, has_b))


adapter_accumulate_op = torch.library.custom_op("lowtune::adapter_accumulate", _adapter_accumulate, mutates_args=())


@adapter_accumulate_op.register_fake
def _(y, xa, A, B, k, n, pool, repeat, rank, has_b, scale, grad_from, pooled):
    geom = AdapterGeometry(k, n, pool, repeat, rank, has_b, scale, grad_from)
    return (torch.empty_like(y, memory_format=torch.contiguous_format), *_fake_aux(xa, geom, pooled))


def _adapter_backward(dy: Tensor, xs: Tensor, u: Tensor, A: Tensor, B: Tensor | None, k: int,
                        n: int, pool: int, repeat: int, rank: int, has_b: bool, scale: float,
                        grad_from: int, pooled: bool, need_dxa: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dxa, dA, dB) of adapter_accumulate; xs is the pooled adapter input [M, k/pool]."""
    geom = AdapterGeometry(k, n, pool, repeat, rank, has_b, scale, grad_from)
    dy = dy.contiguous()
    kk, pp = _kernel_input(geom, pooled)
    dxa = torch.zeros((dy.shape[0], kk), dtype=dy.dtype, device=dy.device) if need_dxa else None
    dA, dB, _ = _launch_backward(dy, xs, A, B, _f32(A), _f32(B), u if has_b else None, geom, dxa, kk, pp)
    return (dxa if dxa is not None else dy.new_empty((0,)), dA,
            dB if dB is not None else A.new_empty((0,)))


adapter_backward_op = torch.library.custom_op("lowtune::adapter_backward", _adapter_backward, mutates_args=())


@adapter_backward_op.register_fake
def _(dy, xs, u, A, B, k, n, pool, repeat, rank, has_b, scale, grad_from, pooled, need_dxa):
    kk = k // pool if pooled else k
    dxa = dy.new_empty((dy.shape[0], kk)) if need_dxa else dy.new_empty((0,))
    return dxa, A.new_empty(A.shape), B.new_empty(B.shape) if has_b else A.new_empty((0,))


def _accumulate_setup(ctx, inputs, output):
    y, xa, A, B, k, n, pool, repeat, rank, has_b, scale, grad_from, pooled = inputs
    _, xs, u = output
    ctx.mark_non_differentiable(xs, u)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(xs if pool > 1 and not pooled else xa, u, A, B)
    ctx.args = (k, n, pool, repeat, rank, has_b, scale, grad_from, pooled)


def _accumulate_backward(backward_fn):
    def backward(ctx, dy, _dxs, _du):
        xs, u, A, B = ctx.saved_tensors
        need = ctx.needs_input_grad
        dxa, dA, dB = backward_fn(dy.contiguous(), xs, u, A, B, *ctx.args, need[1])
        return (dy if need[0] else None, dxa if need[1] else None, dA if need[2] else None,
                dB if ctx.args[5] and need[3] else None) + (None,) * 9
    return backward


adapter_accumulate_op.register_autograd(_accumulate_backward(adapter_backward_op), setup_context=_accumulate_setup)


_AdapterAccumulate = ops._eager_twin(_adapter_accumulate, _accumulate_setup, _accumulate_backward(_adapter_backward),
                                     "_AdapterAccumulate")


# ---- the public functions ------------------------------------------------------------------------

def _prepare(x: torch.Tensor, A, B, geom: AdapterGeometry, xa):
    _check_act(x, "x", geom.k)
    _check_weights(A, B, geom, x.device)
    if not x.is_contiguous():
        raise ValueError("x must be contiguous (call .contiguous() first)")
    xa2 = None
    if xa is not None:
        _check_act(xa, "adapter_input", geom.k_pooled)
        if xa.dtype != x.dtype or xa.device != x.device or xa.shape[:-1] != x.shape[:-1]:
            raise ValueError(f"adapter_input must match x in dtype, device and leading shape "
                             f"{tuple(x.shape[:-1])}, got {xa.dtype} {xa.device} {tuple(xa.shape)}")
        xa2 = xa.contiguous().reshape(-1, geom.k_pooled)
    return x.reshape(-1, geom.k), xa2


def _call(op, function, kernel, tensors: tuple, *args):
    """As lowtune.ops._call: the custom op while tracing, else the eager autograd twin, or the
    kernel function when none of `tensors` needs a gradient."""
    if type(tensors[0]) is not Tensor or torch.compiler.is_compiling():
        return op(*tensors, *args)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return function.apply(*tensors, *args)
    return kernel(*tensors, *args)


def _geom_ints(geom: AdapterGeometry) -> tuple:
    return (geom.k, geom.n, geom.pool, geom.repeat, geom.rank, geom.has_b, float(geom.scale), geom.grad_from)


def adapted_qmatmul(x: torch.Tensor, qt: QTensor, A: torch.Tensor, B: torch.Tensor | None,
                    geom: AdapterGeometry, adapter_input: torch.Tensor | None = None) -> torch.Tensor:
    """Y[..., N] = X[..., K]·deq(W)ᵀ + adapter(X), differentiable w.r.t. x, A, B (and
    adapter_input). adapter_input, when given, is the adapter's already pooled input [..., K/p]
    (dropout applied), used instead of pooling x."""
    ops._check_qtensor(qt)
    if tuple(qt.shape) != (geom.n, geom.k):
        raise ValueError(f"weight has shape {qt.shape} but the adapter expects ({geom.n}, {geom.k})")
    if x.device != qt.device:
        raise ValueError(f"x is on {x.device} but the weight is on {qt.device}; move one of them")
    if not qt.format.quantized:  # a float base is a plain matmul: the adapter adds to its output
        return adapter_accumulate(ops.qmatmul(x, qt), x, A, B, geom, adapter_input)
    x2, xa2 = _prepare(x, A, B, geom, adapter_input)
    y, _, _ = _call(adapted_qmatmul_op, _AdaptedQMatmul, _adapted_qmatmul, (x2, xa2, A, B),
                    qt.raw, qt.format.type_id, *_geom_ints(geom))
    return y.reshape(*x.shape[:-1], geom.n)


def adapter_accumulate(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor | None,
                       geom: AdapterGeometry, adapter_input: torch.Tensor | None = None) -> torch.Tensor:
    """y + adapter(x) as a new tensor, for y [..., N] (of x's dtype, device and leading shape)
    from any base layer."""
    _check_act(y, "y", geom.n)
    x2, xa2 = _prepare(x, A, B, geom, adapter_input)
    if y.dtype != x.dtype or y.device != x.device or y.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"y must match x in dtype, device and leading shape, got "
                         f"{y.dtype} {y.device} {tuple(y.shape)}")
    xa = x2 if xa2 is None else xa2
    out, _, _ = _call(adapter_accumulate_op, _AdapterAccumulate, _adapter_accumulate,
                      (y.reshape(-1, geom.n), xa, A, B), *_geom_ints(geom), xa2 is not None)
    return out.reshape(y.shape)


# read once: a call into the extension inside a traced function would break the graph
_BUILT_WITH_CUDA = bool(_C.build_info()["cuda"])


def kernels_support(x: torch.Tensor) -> bool:
    """Whether the compiled kernels can run on x (dtype and device)."""
    if x.dtype not in ACT_DTYPES:
        return False
    if x.device.type == "cuda":
        return _BUILT_WITH_CUDA
    return x.device.type == "cpu"


__all__ = ["AdapterGeometry", "adapted_qmatmul", "adapter_accumulate", "kernels_support"]
