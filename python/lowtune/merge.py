"""Merging an adapter's update into a quantized weight, tensor by tensor.

Pure functions on QTensors (CPU); lowtune.export feeds them one tensor at a time.

    merge_group_constant(qt, delta_g)    Q4_1, Q5_1, INTb-gG: min' = fp16(min + δ), codes and
                                         scales byte-identical (exact up to the fp16 min)
    refit_kquant_mins(qt, delta_sub)     Q2_K, Q4_K, Q5_K: keep weight and scale codes, refit
                                         the quantized mins and dmin; returns the residual
    requantize(qt, delta, target)        deq(W) + ΔW rounded once into `target`
    best_blocks(a, b, target)            per super-block, whichever of two encodings is nearer
    merge_weight(qt, ...)                picks one of the above for a tensor and says which
    check_weight(merged, trained, ...)   a written merged weight against the trained model's
    describe_merge(checks)               in words: exact bit for bit, or how far off and why

Why the mins: an update that is constant on every run of inputs sharing one min (QA-LoRA and
QA-HiRA pool exactly over that run) is absorbed by that min, since x = d·q + m and
x + c = d·q + (m + c). Where the min is a float (Q4_1, Q5_1, INTb-gG) this is exact but for the
fp16 rounding of m + c, and exact bit for bit for an adapter trained in merge-exact mode, which
computes with those rounded mins (lowtune.merge_exact owns the rule). K-quants store their mins
as 6-bit (Q4_K, Q5_K) or 4-bit (Q2_K) codes times a per-super-block fp16 dmin,
x = d·sc·q − dmin·mn: the weight codes q and the scales sc can stay, but mn and dmin must be
refitted, which leaves a residual per sub-block of up to half the min resolution dmin' (about
max|min|/126): updates smaller than that are partly lost, and for much larger ones re-quantizing
is closer, so merge_weight keeps per super-block whichever of the two lands nearer the exact
target (kquant_mins="best"). Types without a min (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K) cannot absorb a
constant and are re-quantized.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from . import merge_exact, ops
from .formats import FORMATS, Format, get_format
from .formats.intgroup import IntFormat
from .formats.kquants import _pack_scale_min_k4, _unpack_scale_min_k4
from .qtensor import QTensor
from .recipes import storage_format, to_storage

# K-types whose sub-blocks carry a quantized min: (sub-blocks per 256, largest min code,
# byte offset of dmin). Q2_K keeps scale | min << 4 in bytes 0-15; Q4_K/Q5_K pack 6-bit scales
# and mins into bytes 4-15 (get_scale_min_k4).
KQUANT_MINS = {"Q2_K": (16, 15, 82), "Q4_K": (8, 63, 2), "Q5_K": (8, 63, 2)}
# No min: a constant cannot be absorbed (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K and every I-quant).
MIN_FREE = tuple(f.name for f in FORMATS.values() if f.quantized and f.min_group is None)


def min_group(fmt: Format) -> int | None:
    """Inputs sharing one min in `fmt` (block or K sub-block); None when there is no min."""
    return get_format(fmt).min_group


def _cpu_blocks(qt: QTensor) -> np.ndarray:
    """A writable copy of qt's bytes as uint8 [blocks, block_bytes]."""
    return qt.raw.detach().to("cpu").numpy().reshape(-1, qt.format.block_bytes).copy()


def _wrap(blocks: np.ndarray, fmt: Format, shape) -> QTensor:
    return QTensor.from_raw(torch.from_numpy(np.ascontiguousarray(blocks).reshape(-1)), fmt, shape)


def _as_f64(delta, shape: tuple[int, int], what: str) -> np.ndarray:
    d = delta.detach().to("cpu", torch.float64).numpy() if isinstance(delta, torch.Tensor) \
        else np.asarray(delta, np.float64)
    if d.shape != shape:
        raise ValueError(f"{what} must have shape {list(shape)}, got {list(d.shape)}")
    if not np.isfinite(d).all():
        raise ValueError(f"{what} contains NaN or inf")
    return d


# ---- float mins: exact -----------------------------------------------------------------------

def merge_group_constant(qt: QTensor, delta_g) -> QTensor:
    """Add delta_g [N, K/G] (one constant per block of G = block_elems inputs) to a Q4_1, Q5_1
    or INTb-gG weight by moving each block's fp16 min: m' = fp16(fp32(m) + fp32(δ))
    (lowtune.merge_exact.stored_mins, the rule merge-exact training computes with). Scales and
    codes are left byte for byte; deq(W') = deq(W) + expand(δ) up to the rounding of m'.
    Returns a new CPU QTensor."""
    fmt = qt.format
    if not merge_exact.supports(fmt):
        raise ValueError(f"{fmt.name} has no float min per block; use refit_kquant_mins (Q2_K, Q4_K, "
                         f"Q5_K) or requantize")
    n, k = qt.shape
    delta = torch.from_numpy(_as_f64(delta_g, (n, k // fmt.block_elems), "delta_g").astype(np.float32))
    out = merge_exact.shift_mins(qt.to("cpu"), delta)
    if not torch.isfinite(merge_exact.block_mins(out)).all():
        raise ValueError(f"merged min overflows fp16 (|min + delta| > 65504) in a {fmt.name} tensor")
    return out


# ---- quantized mins: refit -------------------------------------------------------------------

@dataclass
class MinResidual:
    """How far the refitted per-sub-block offsets −dmin'·mn' land from the exact targets
    −dmin·mn + δ (absolute, in weight units)."""
    max: float
    rms: float
    delta_rms: float  # the size of what was merged, for scale

    def as_dict(self) -> dict:
        return {"max": self.max, "rms": self.rms, "delta_rms": self.delta_rms}


def _fp16(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return x.astype(np.float16).astype(np.float64)


def _codes_for(u: np.ndarray, s: np.ndarray, mmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Best codes m in [0, mmax] for targets u [B, S] at scale s [B] (u ≈ s·m), and the squared
    error per block."""
    safe = np.where(s == 0, 1.0, s)[:, None]
    m = np.where(s[:, None] == 0, 0, np.clip(np.rint(u / safe), 0, mmax))
    err = ((s[:, None] * m - u) ** 2).sum(axis=1)
    return m, err


def fit_min_codes(u: np.ndarray, mmax: int, s_old: np.ndarray | None = None,
                  m_old: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fit u [B, S] ≈ s·m with one fp16 scale s per row (either sign) and codes m in [0, mmax].

    Candidates per row: the old scale, and for each sign a sweep of s = max|u|/mmax·f
    (f in 0.8..1.2) each followed by a least-squares step s = Σu·m / Σm²; every candidate is
    rounded to fp16 first and scored with the codes that are best for that fp16 value.
    Returns (s float64 [B] exactly representable in fp16, m int [B, S])."""
    b = u.shape[0]
    best_s = np.zeros(b)
    best_m, best_err = _codes_for(u, best_s, mmax)
    cands = []
    if s_old is not None:
        cands.append(np.asarray(s_old, np.float64))
    for sign in (1.0, -1.0):
        vmax = (sign * u).max(axis=1)
        ok = vmax > 0
        for f in np.linspace(0.8, 1.2, 17):
            s0 = np.where(ok, sign * vmax / mmax * f, 0.0)
            cands.append(s0)
            m0, _ = _codes_for(u, s0, mmax)
            mm = (m0 * m0).sum(axis=1)
            cands.append(np.where(mm > 0, (u * m0).sum(axis=1) / np.where(mm > 0, mm, 1), 0.0))
    for s in cands:
        s = _fp16(s)
        s = np.where(np.isfinite(s), s, 0.0)
        m, err = _codes_for(u, s, mmax)
        better = err < best_err
        best_s = np.where(better, s, best_s)
        best_m = np.where(better[:, None], m, best_m)
        best_err = np.where(better, err, best_err)
    if m_old is not None and s_old is not None:  # keep the old codes where nothing beats them
        _, err_old = _codes_for(u, np.asarray(s_old, np.float64), mmax)
        keep = err_old <= best_err
        best_s = np.where(keep, s_old, best_s)
        best_m = np.where(keep[:, None], m_old, best_m)
    return best_s, best_m.astype(np.int64)


def refit_kquant_mins(qt: QTensor, delta_sub) -> tuple[QTensor, MinResidual]:
    """Add delta_sub [N, K/S] (one constant per sub-block: 16 inputs for Q2_K, 32 for Q4_K/Q5_K)
    to a K-quant weight by refitting only its min codes and the super-block dmin so that
    −dmin'·mn' ≈ −dmin·mn + δ. Weight codes, scale codes and d are byte-identical.
    Returns (new CPU QTensor, residual of the merged offsets against the exact targets)."""
    fmt = qt.format
    if fmt.name not in KQUANT_MINS:
        raise ValueError(f"{fmt.name} has no quantized mins to refit (Q2_K, Q4_K, Q5_K do)")
    subs, mmax, off = KQUANT_MINS[fmt.name]
    n, k = qt.shape
    delta = _as_f64(delta_sub, (n, k // (256 // subs)), "delta_sub").reshape(-1, subs)
    blocks = _cpu_blocks(qt)
    dmin = blocks[:, off:off + 2].copy().view("<f2").astype(np.float64)[:, 0]
    if fmt.name == "Q2_K":
        mins = (blocks[:, 0:16] >> 4).astype(np.int64)
    else:
        scales, mins = _unpack_scale_min_k4(blocks[:, 4:16])
        mins = mins.astype(np.int64)
    u = dmin[:, None] * mins - delta          # what dmin'·mn' must equal
    s, m = fit_min_codes(u, mmax, dmin, mins)
    if fmt.name == "Q2_K":
        blocks[:, 0:16] = (blocks[:, 0:16] & 0x0F) | (m.astype(np.uint8) << 4)
    else:
        blocks[:, 4:16] = _pack_scale_min_k4(scales, m)
    blocks[:, off:off + 2] = s.astype("<f2").view(np.uint8).reshape(-1, 2)
    e = s[:, None] * m - u
    res = MinResidual(float(np.abs(e).max(initial=0.0)), float(np.sqrt((e * e).mean())) if e.size else 0.0,
                      float(np.sqrt((delta * delta).mean())) if delta.size else 0.0)
    return _wrap(blocks, fmt, qt.shape), res


# ---- re-quantization and INTb-gG -> GGUF ------------------------------------------------------

def dense(qt: QTensor) -> torch.Tensor:
    """deq(W) as a new float32 [N, K] tensor on the CPU (never a view of qt's bytes)."""
    w = ops.dequantize(qt.to("cpu"), torch.float32)
    return w if qt.format.quantized else w.clone()


def requantize(qt: QTensor, delta, target) -> QTensor:
    """deq(W) + delta (dense [N, K], or None) rounded once into `target` (any format, float
    formats included). One rounding: there is no 16-bit intermediate."""
    w = dense(qt)
    if delta is not None:
        d = delta.detach().to("cpu", torch.float32) if isinstance(delta, torch.Tensor) else torch.as_tensor(delta, dtype=torch.float32)
        if tuple(d.shape) != tuple(w.shape):
            raise ValueError(f"delta must have shape {list(w.shape)}, got {list(d.shape)}")
        w += d
    return ops.quantize(w, get_format(target))


def best_blocks(a: QTensor, b: QTensor, target: torch.Tensor) -> tuple[QTensor, float]:
    """Per block (super-block for K-types), the bytes of a or b whose dequantization is nearer
    target [N, K] (squared error; ties keep a). Both must share one format. Returns (QTensor,
    the fraction of blocks taken from a)."""
    if a.format != b.format or a.shape != b.shape:
        raise ValueError("best_blocks needs two tensors of one format and shape")
    e = a.format.block_elems
    sse_a = (ops.dequantize(a, torch.float32) - target).pow(2).reshape(-1, e).sum(1)
    sse_b = (ops.dequantize(b, torch.float32) - target).pow(2).reshape(-1, e).sum(1)
    take_a = (sse_a <= sse_b).numpy()
    blocks = np.where(take_a[:, None], _cpu_blocks(a), _cpu_blocks(b))
    return _wrap(blocks, a.format, a.shape), float(take_a.mean()) if take_a.size else 1.0


# ---- one tensor ------------------------------------------------------------------------------

@dataclass
class MergeInfo:
    """What merge_weight did to one tensor.

    path        "copy" (unchanged bytes), "repack" (INTb-gG -> its GGUF storage, exact), "min" (float
                mins moved, exact up to fp16), "min-refit" (K-quant mins refitted), "requantize",
                "float" (float weight + ΔW in its own dtype)
    exact       True when no weight was re-rounded (copy, repack, min)
    base_type, out_type   format names
    err_rms, err_max      deq(out) against the exact target deq(W) + ΔW (None when not measured)
    delta_rms             RMS of ΔW
    min_residual          refit residual (min-refit only)
    note                  why a fallback was taken
    """
    path: str
    base_type: str
    out_type: str
    exact: bool
    err_rms: float | None = None
    err_max: float | None = None
    delta_rms: float | None = None
    min_residual: dict | None = None
    note: str = ""

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None and v != ""}


def _expand_groups(delta_g: torch.Tensor, width: int, k: int) -> torch.Tensor:
    return delta_g.repeat_interleave(width, dim=1)[:, :k] if width > 1 else delta_g


def merge_weight(qt: QTensor, delta: torch.Tensor | None = None, delta_groups: torch.Tensor | None = None,
                 group: int | None = None, target=None, kquant_mins: str = "best",
                 measure: bool = True) -> tuple[QTensor, MergeInfo]:
    """Merge one weight. qt: the base QTensor [N, K] (any format). The update is either dense
    `delta` [N, K] or `delta_groups` [N, K/group], constant on runs of `group` inputs (QA-LoRA,
    QA-HiRA), or neither (a plain conversion). target: output format (None: the tensor's own;
    an INTb-gG target is merged in that format and written as recipes.storage_format(it)).
    kquant_mins, for Q2_K/Q4_K/Q5_K: "refit" (weight codes kept, mins refitted), "requantize",
    or "best" (per super-block, whichever lands nearer the exact target: the refit wins for
    moderate updates, re-quantization for updates much larger than the min resolution).

    Paths, best first: the exact min merge (float mins, group a multiple of the block), the
    K-quant min refit (group a multiple of the sub-block), else re-quantization of
    deq(W) + ΔW into the target. An INTb-gG base is merged in its own format and then stored
    exactly in its GGUF type (recipes.to_storage: Q4_1, Q5_1, or F32 for INT6/INT8).
    Returns (QTensor in a GGUF type, MergeInfo)."""
    if kquant_mins not in ("best", "refit", "requantize"):
        raise ValueError(f"kquant_mins must be 'best', 'refit' or 'requantize', got {kquant_mins!r}")
    if delta is not None and delta_groups is not None:
        raise ValueError("pass either delta or delta_groups, not both")
    if delta_groups is not None and (group is None or group < 1):
        raise ValueError("delta_groups needs its group width")
    fmt = qt.format
    n, k = qt.shape
    if delta is not None and tuple(delta.shape) != (n, k):
        raise ValueError(f"delta must have shape [{n}, {k}] like the weight, got {list(delta.shape)}")
    if delta_groups is not None and (k % group or tuple(delta_groups.shape) != (n, k // group)):
        raise ValueError(f"delta_groups must have shape [{n}, {k}/{group}], got {list(delta_groups.shape)}")
    want = fmt if target is None else get_format(target)
    out_fmt = storage_format(want)
    # the format the merge happens in: INTb-gG is merged as itself, then stored (exactly)
    repack = isinstance(want, IntFormat)
    work_fmt = want if repack else out_fmt
    has_delta = delta is not None or delta_groups is not None

    cache = {}

    def dense_delta():  # ΔW [N, K] fp32, built once
        if "d" not in cache:
            cache["d"] = delta.detach().to("cpu", torch.float32) if delta is not None else \
                _expand_groups(delta_groups.detach().to("cpu", torch.float32), group, k)
        return cache["d"]

    def exact_target():  # deq(W) + ΔW, built once
        if "t" not in cache:
            cache["t"] = dense(qt).add_(dense_delta())
        return cache["t"]

    note = ""
    if not has_delta:
        if work_fmt == fmt:
            out, path, exact = qt.to("cpu"), "copy", True
        else:  # dequantized values are float32 numbers, so only F32 holds them all exactly
            out, path, exact = requantize(qt, None, work_fmt), "requantize", work_fmt.name == "F32"
            note = f"re-targeted from {fmt.name} to {work_fmt.name}"
        return _finish(out, MergeInfo(path, fmt.name, out_fmt.name, exact, note=note), repack)

    mg = min_group(work_fmt) if work_fmt == fmt else None
    aligned = delta_groups is not None and mg is not None and group % mg == 0
    info = MergeInfo("requantize", fmt.name, out_fmt.name, False)
    measured = False
    if aligned and work_fmt.float_min:
        per_block = _expand_groups(delta_groups, group // mg, k // mg)
        out = merge_group_constant(qt, per_block)
        info.path, info.exact = "min", True
        if measure:  # the error is the fp16 rounding of each new min, constant over its block
            want_m = _block_mins(qt) + _as_f64(per_block, per_block.shape, "delta").reshape(-1)
            e = _block_mins(out) - want_m
            info.err_rms, info.err_max = _rms(e), float(np.abs(e).max(initial=0.0))
            info.delta_rms = _rms(_as_f64(per_block, per_block.shape, "delta"))
            measured = True
    elif aligned and work_fmt.name in KQUANT_MINS and kquant_mins != "requantize":
        out, res = refit_kquant_mins(qt, _expand_groups(delta_groups, group // mg, k // mg))
        info.path, info.min_residual = "min-refit", res.as_dict()
        if kquant_mins == "best":
            out, kept = best_blocks(out, ops.quantize(exact_target(), work_fmt), exact_target())
            info.min_residual["refit_blocks"] = kept
            if kept < 1.0:
                info.note = f"{1 - kept:.0%} of super-blocks re-quantized (nearer than the min refit)"
        else:
            info.err_rms, info.err_max, info.delta_rms = res.rms, res.max, res.delta_rms
            measured = True
    else:
        out = ops.quantize(exact_target(), work_fmt)
        info.path = "requantize" if work_fmt.quantized else "float"
        if delta_groups is not None and work_fmt == fmt and work_fmt.quantized:
            if work_fmt.name in MIN_FREE:
                info.note = f"{work_fmt.name} has no min to absorb the group-constant update"
            elif not aligned:
                info.note = f"update groups of {group} do not align with {work_fmt.name}'s min groups of {mg}"
            else:
                info.note = "K-quant mins not refitted (kquant_mins='requantize')"
        elif work_fmt != fmt:
            info.note = f"re-targeted from {fmt.name} to {work_fmt.name}"
    if measure and not measured and n * k:
        err = dense(out).sub_(exact_target())
        info.err_rms = float(torch.linalg.vector_norm(err)) / math.sqrt(n * k)
        info.err_max = float(err.abs_().max())
        info.delta_rms = float(torch.linalg.vector_norm(dense_delta())) / math.sqrt(n * k)
    return _finish(out, info, repack)


# ---- checking a written merge against the trained model -----------------------------------------

@dataclass
class WeightCheck:
    """One merged weight as read back from the written file, against the weight the adapted
    model computes with (AdaptedLinear.effective_weight): how many values differ and by how much.

    weights, differ       values compared, and of them not bit-identical
    max_error, rms_error  |merged − trained|, largest and RMS (0 when exact)
    update_rms            RMS of the update ΔW (the scale of what was merged)
    path, out_type        how merge_weight merged it, into which type
    merge_exact           the layer was trained through the stored mins (AdapterConfig.merge_exact)
    """
    weights: int
    differ: int
    max_error: float
    rms_error: float
    update_rms: float
    path: str
    out_type: str
    merge_exact: bool

    @property
    def exact(self) -> bool:
        return self.differ == 0

    def cause(self) -> str:
        """Why a merged weight differs from the trained one, in words ("" when it does not)."""
        if self.exact:
            return ""
        if self.path == "min":
            return ("the merged fp16 mins round m + δ, a rounding the adapter was not trained through"
                    if not self.merge_exact else "the merged mins are not the ones training computed with")
        if self.path == "min-refit":
            return (f"{self.out_type} stores its mins as small integer codes, which can only approximate "
                    "m + δ (re-quantizing where that is nearer)")
        if self.path == "float":
            return f"W + ΔW is rounded to {self.out_type}"
        return f"W + ΔW is re-quantized to {self.out_type}"

    def as_dict(self) -> dict:
        return {"weights": self.weights, "differ": self.differ, "max_error": self.max_error,
                "rms_error": self.rms_error, "update_rms": self.update_rms, "path": self.path,
                "out_type": self.out_type, "merge_exact": self.merge_exact}


def check_weight(merged: QTensor, trained: torch.Tensor, update: torch.Tensor, info: MergeInfo,
                 merge_exact: bool = False) -> WeightCheck:
    """Compare a merged weight (as written) with `trained` [N, K], the dense weight the adapted
    model computes with; `update` is ΔW [N, K] (for scale); info: merge_weight's MergeInfo."""
    got = dense(merged)
    if tuple(got.shape) != tuple(trained.shape):
        raise ValueError(f"the merged weight has shape {list(got.shape)}, the trained one {list(trained.shape)}")
    e = got.sub_(trained.to(torch.float32))
    n = e.numel()
    rms = (lambda t: float(torch.linalg.vector_norm(t.double())) / math.sqrt(n) if n else 0.0)
    return WeightCheck(n, int(torch.count_nonzero(e)), float(e.abs().max()) if n else 0.0, rms(e),
                       rms(update.to(torch.float32)), info.path, info.out_type, bool(merge_exact))


def describe_merge(checks: dict[str, WeightCheck]) -> str:
    """One line on how the merged file's adapted weights compare with the trained model's: exact
    bit for bit, or how many differ, by how much against the update, and why."""
    total = sum(c.weights for c in checks.values())
    off = [c for c in checks.values() if not c.exact]
    if not checks:
        return "merge: no adapted weight to check"
    if not off:
        return (f"merge: exact: all {total:,} adapted weights of the merged file equal the trained "
                f"model's, bit for bit")
    differ = sum(c.differ for c in off)
    worst = max(c.max_error for c in off)
    rms = math.sqrt(sum(c.rms_error ** 2 * c.weights for c in checks.values()) / total)
    upd = math.sqrt(sum(c.update_rms ** 2 * c.weights for c in checks.values()) / total)
    share = f", {rms / upd:.1%} of the update's RMS {upd:.3g}" if upd > 0 else ""
    causes = Counter(c.cause() for c in off)
    why = "; ".join(f"{cause} ({n} tensor{'s' if n > 1 else ''})" if len(causes) > 1 else cause
                    for cause, n in causes.most_common())
    line = (f"merge: {differ:,} of {total:,} adapted weights differ from the trained model's, by at most "
            f"{worst:.3g} (RMS {rms:.3g}{share}): {why}")
    if any(c.path == "min" and not c.merge_exact for c in off):
        line += "; training with --merge-exact on makes this merge exact"
    return line


def _block_mins(qt: QTensor) -> np.ndarray:
    """The fp16 min of every block of a float-min format, float64 [blocks]."""
    b = qt.raw.detach().to("cpu").numpy().reshape(-1, qt.format.block_bytes)
    return np.ascontiguousarray(b[:, 2:4]).view("<f2").astype(np.float64)[:, 0]


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0


def _finish(out: QTensor, info: MergeInfo, repack: bool):
    """INTb-gG results in their GGUF storage type (exact)."""
    if repack:
        out = to_storage(out)
        info.path = "repack" if info.path == "copy" else info.path
    return out, info


__all__ = ["KQUANT_MINS", "MIN_FREE", "MergeInfo", "MinResidual", "WeightCheck", "best_blocks", "check_weight",
           "dense", "describe_merge", "fit_min_codes", "merge_group_constant", "merge_weight", "min_group",
           "refit_kquant_mins", "requantize"]
