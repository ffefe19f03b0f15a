"""Adapters on a frozen quantized base: LoRA, QA-LoRA, Q-BaRA, QA-HiRA and QDyLoRA.

    cfg = AdapterConfig(method="q-bara", rank=16, alpha=16)
    adapters = apply_adapters(model, cfg)         # {"layers.0.attn_q": AdaptedLinear, ...}
    ...train...
    save_adapter(model, "run/adapter", base_hash=base_hash("model.gguf"))
    load_adapter(other_model, "run/adapter")      # lowtune.loading checks the base first

Every method is one geometry (lowtune.adapter_ops.AdapterGeometry): the input x [..., K] is
average-pooled over p adjacent inputs, multiplied by A [R, K/p] (and B [N/q, R]), repeated over
q adjacent outputs and scaled:

    method    p              q    R      matrices                 scale    init
    lora      1              1    r      A [r, K], B [N, r]       α/r      A kaiming(a=√5), B 0
    qa-lora   G              1    r      A [r, K/G], B [N, r]     α/r      A xavier, B 0
    q-bara    p (2)          p    p·r    A [p·r, K/p], B [N/p, p·r] α/r    A kaiming, B 0
    qa-hira   G              1    -      M [N, K/G]               α/r      M 0
    qdylora   1              1    b≤r    A [r, K], B [N, r]       α/b      A kaiming, B 0

rsLoRA (rslora=True) replaces α/r by α/√r (α/√b for QDyLoRA); QA-HiRA has no rank and refuses it.

G, the quantization group, is the width of the input run that shares one scale (and min) in the
base format: the block for the legacy types (32) and INTb-gG (G); the sub-block inside a K-type
super-block, 32 for Q4_K/Q5_K (6-bit scale and min per 32) and 16 for Q2_K (4-bit scale and min
per 16) and Q3_K/Q6_K (scale per 16). Pooling over G makes the update constant inside every block
that carries its own min, so QA-LoRA/QA-HiRA merge by changing mins only (exactly where the min
is a float: Q4_1, Q5_1, INTb-gG; Q2_K/Q4_K/Q5_K mins are quantized, Q4_0/Q5_0/Q8_0/Q3_K/Q6_K
have none, and those need a re-quantization to merge). Float bases have no group: pass group=.

Merge-exact mode (merge_exact; on by default for QA-LoRA and QA-HiRA): on a base with fp16 mins
the adapted layer computes with the merged weight itself, each block's min stored as
fp16(m + δ) exactly as the merge will write it (lowtune.merge_exact), so the merged file
computes what was trained bit for bit; the gradient passes straight through the rounding. On
bases without float mins it changes nothing. It excludes dropout (the merged weight has none).

QA-HiRA's scale is α/r with the configured r and α, as in the authors' code (16/64 = 0.25 at
their defaults), so one (r, α, lr) recipe gives every method the same update size per step.

QDyLoRA trains nested ranks: each step samples one b in 1..r for all layers (DyLoRAController),
uses A[:b], B[:, :b] with scale α/b; afterwards any b ≤ r is evaluable (set_rank). The update
rule "all" (default; QDyLoRA, seeds §4.2) trains every slice up to b; "slice" trains only row/
column b (DyLoRA's frozen mode). In "slice" mode the controller, given the optimizer, restores
the frozen slices and their optimizer state after each step, so neither momentum nor weight
decay moves them (the optimizer's per-tensor step count still advances).

The forward pass runs the fused kernels (lowtune.adapter_ops): the adapter accumulates into the
frozen matmul's output and, in backward, into its input gradient. reference_adapter() is the
plain torch version (the PEFT way) that the tests hold the kernels to; config.fused=False uses it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import adapter_ops, merge_exact, ops
from .adapter_ops import AdapterGeometry
from .checkpoint import atomic_write_text
from .dtypes import hf_name as dtype_name, torch_dtype
from .formats import Format, get_format
from .gguf_io import GGUFFile
from .gguf_split import gguf_parts
from .methods import GROUP_CONSTANT, METHODS, canonical_method
from .model import CONV_LINEAR_NAMES, DELTA_LINEAR_NAMES, LINEAR_NAMES
from .qtensor import QTensor
from .safetensors_io import safetensors_files, safetensors_table, write_safetensors_dict

TARGETS = LINEAR_NAMES + CONV_LINEAR_NAMES + DELTA_LINEAR_NAMES  # every logical linear of every family's layers
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def quant_group(fmt: Format) -> int | None:
    """Inputs that share one scale (and min) in `fmt`; None for the float formats."""
    return fmt.scale_group


@dataclass(frozen=True)
class AdapterConfig:
    """What to train. method: lora | qa-lora | q-bara | qa-hira | qdylora. rank: r (QDyLoRA:
    the largest rank). alpha, dropout (on the pooled adapter input), targets (module names in
    each decoder layer), layers (indices; None = all), rslora (α/√r), pool (Q-BaRA's p),
    group (QA-LoRA/QA-HiRA pooling; None = the base's quantization group), dylora_update
    ("all" | "slice"), hira_init ("zero" | "kaiming", the latter as the authors' committed
    code), dtype of the adapter weights, seed of their initialisation, fused (kernels or the
    plain torch reference), merge_exact (QA-LoRA/QA-HiRA: train through the fp16 rounding of
    the merged mins; None = on for those methods unless dropout is used)."""
    method: str = "lora"
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS
    layers: tuple[int, ...] | None = None
    rslora: bool = False
    pool: int = 2
    group: int | None = None
    dylora_update: str = "all"
    hira_init: str = "zero"
    dtype: str = "float32"
    seed: int = 0
    fused: bool = True
    merge_exact: bool | None = None

    def __post_init__(self):
        method = canonical_method(self.method)
        object.__setattr__(self, "method", method)
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if not self.targets:
            raise ValueError("targets is empty; name at least one linear (e.g. 'attn_q')")
        if int(self.rank) < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if int(self.pool) < 1:
            raise ValueError(f"pool must be >= 1, got {self.pool}")
        if self.group is not None and int(self.group) < 1:
            raise ValueError(f"group must be >= 1, got {self.group}")
        if self.dylora_update not in ("all", "slice"):
            raise ValueError(f"dylora_update must be 'all' or 'slice', got {self.dylora_update!r}")
        if self.hira_init not in ("zero", "kaiming"):
            raise ValueError(f"hira_init must be 'zero' or 'kaiming', got {self.hira_init!r}")
        object.__setattr__(self, "dtype", dtype_name(torch_dtype(self.dtype)))
        if self.rslora and method == "qa-hira":
            raise ValueError("rslora scales by 1/sqrt(rank); QA-HiRA has no rank (use alpha)")
        exact = self.merge_exact
        if exact is None:
            exact = method in GROUP_CONSTANT and float(self.dropout) == 0.0
        elif exact and method not in GROUP_CONSTANT:
            raise ValueError(f"merge_exact applies to qa-lora and qa-hira, whose updates fold into the "
                             f"blocks' mins; a {method} update merges by re-quantizing (leave merge_exact unset)")
        elif exact and float(self.dropout) > 0:
            raise ValueError("merge_exact trains the merged weight itself, which has no dropout: set "
                             "dropout to 0, or merge_exact to False")
        object.__setattr__(self, "merge_exact", bool(exact))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown adapter config keys {sorted(unknown)}")
        d = dict(d)
        d.setdefault("merge_exact", False)  # adapters saved before the mode trained without it
        d["targets"] = tuple(d.get("targets", TARGETS))
        if d.get("layers") is not None:
            d["layers"] = tuple(d["layers"])
        return cls(**d)


def pool_inputs(x: torch.Tensor, p: int) -> torch.Tensor:
    """Average of p adjacent features: [..., K] -> [..., K/p] (AvgPool1d(p) on the last dim)."""
    return x if p == 1 else x.unflatten(-1, (-1, p)).mean(-1)


def _base_qtensor(base: nn.Module) -> QTensor:
    qt = getattr(base, "weight", None)
    if not isinstance(qt, QTensor):
        raise ValueError(f"{type(base).__name__} has no QTensor `weight`; adapters wrap lowtune's "
                         "quantized linears (a module holding a QTensor as .weight)")
    return qt


def _fusable(base: nn.Module) -> bool:
    """Whether base(x) is exactly ops.qmatmul(x, base.weight), so the adapter can fuse into it."""
    return getattr(base, "lowtune_fusable", True) and getattr(base, "bias", None) is None


class AdaptedLinear(nn.Module):
    """A frozen quantized linear plus a trainable adapter: y = base(x) + adapter(x).

    Parameters: lora_A [R, K/p] and lora_B [N/q, R], or hira_M [N, K/G] for QA-HiRA.
    merge_exact: True when this layer computes with its merged weight (the config asks for it
    and the base stores fp16 mins): y = x·deq(W')ᵀ, W' the base with its mins moved by the
    update as a merge stores them."""

    def __init__(self, base: nn.Module, config: AdapterConfig, generator: torch.Generator | None = None):
        super().__init__()
        qt = _base_qtensor(base)
        self.base = base
        self.config = config
        self.out_features, self.in_features = qt.shape
        self.base_type = qt.type
        n, k = qt.shape
        c = config
        self.method = c.method
        self.pool, self.repeat, self.group = 1, 1, None
        if c.method in GROUP_CONSTANT:
            self.group = self.pool = _pool_group(c, qt.format, k)
        elif c.method == "q-bara":
            if k % c.pool or n % c.pool:
                raise ValueError(f"Q-BaRA pools by p={c.pool}, which must divide both the input "
                                 f"({k}) and output ({n}) features; choose another pool")
            self.pool = self.repeat = c.pool
        self.merge_exact = bool(c.merge_exact) and c.method in GROUP_CONSTANT and merge_exact.supports(qt.format)
        self._merged = None  # (key, merged QTensor) for decoding (_merged_weight)
        self.r_max = c.rank * (c.pool if c.method == "q-bara" else 1)
        self.rank_in_use = c.rank  # QDyLoRA's current b (set_rank); full rank until set
        dtype, dev = torch_dtype(c.dtype), qt.device
        kp, nq = k // self.pool, n // self.repeat
        if c.method == "qa-hira":
            m = torch.zeros(nq, kp, dtype=torch.float32)
            if c.hira_init == "kaiming":
                _kaiming_uniform(m, generator)
            self.hira_M = nn.Parameter(m.to(dev, dtype))
        else:
            a = torch.empty(self.r_max, kp, dtype=torch.float32)
            if c.method == "qa-lora":
                bound = math.sqrt(6.0 / (kp + self.r_max))  # xavier_uniform_
                a.uniform_(-bound, bound, generator=generator)
            else:
                _kaiming_uniform(a, generator)
            self.lora_A = nn.Parameter(a.to(dev, dtype))
            self.lora_B = nn.Parameter(torch.zeros(nq, self.r_max, dtype=dtype, device=dev))

    # ---- geometry ---------------------------------------------------------------------------
    def _rank(self, rank: int | None) -> int:
        if self.method != "qdylora":
            if rank is not None and rank != self.config.rank:
                raise ValueError(f"only QDyLoRA adapters change rank; this is {self.method} with rank {self.config.rank}")
            return self.r_max
        b = self.rank_in_use if rank is None else int(rank)
        if not 1 <= b <= self.r_max:
            raise ValueError(f"QDyLoRA rank must be in 1..{self.r_max}, got {b}")
        return b

    def scale(self, rank: int | None = None) -> float:
        c = self.config
        if self.method == "qdylora":
            b = self._rank(rank)
            return c.alpha / (math.sqrt(b) if c.rslora else b)
        return c.alpha / (math.sqrt(c.rank) if c.rslora else c.rank)

    def geometry(self, rank: int | None = None) -> AdapterGeometry:
        n, k = self.out_features, self.in_features
        if self.method == "qa-hira":
            return AdapterGeometry(k, n, self.pool, self.repeat, n // self.repeat, False, self.scale())
        b = self._rank(rank)
        grad_from = b - 1 if self.method == "qdylora" and self.config.dylora_update == "slice" else 0
        return AdapterGeometry(k, n, self.pool, self.repeat, b, True, self.scale(rank), grad_from)

    def set_rank(self, b: int) -> None:
        """QDyLoRA: use A[:b], B[:, :b] with scale α/b from now on."""
        if self.method != "qdylora":
            raise ValueError(f"set_rank applies to QDyLoRA adapters, this one is {self.method}")
        self.rank_in_use = self._rank(b)

    def _matrices(self):
        return (self.hira_M, None) if self.method == "qa-hira" else (self.lora_A, self.lora_B)

    def uncapturable(self, training: bool | None = None) -> str | None:
        """Why a CUDA graph cannot replay this adapter's work (None: it can), in training mode or
        not (default: the module's mode now). A replayed graph repeats the captured shapes and
        random masks: QDyLoRA draws a new rank every step, and dropout a new mask."""
        if self.method == "qdylora":
            return "QDyLoRA layers (a new rank every step)"
        if (self.training if training is None else training) and self.config.dropout > 0:
            return "layers with adapter dropout"
        return None

    @property
    def num_adapter_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters(recurse=False))

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merge_exact:
            return self._merged_forward(x)
        geom = self.geometry()
        A, B = self._matrices()
        xa = None
        if self.training and self.config.dropout > 0:
            xa = F.dropout(pool_inputs(x, self.pool), self.config.dropout, True)
        if not self.config.fused or not adapter_ops.kernels_support(x):
            y = self.base(x)
            return y + self.reference_adapter(x if xa is None else xa, pooled=xa is not None)
        x = x.contiguous()
        if _fusable(self.base):
            return adapter_ops.adapted_qmatmul(x, self.base.weight, A, B, geom, xa)
        y = self.base(x).to(x.dtype).contiguous()
        return adapter_ops.adapter_accumulate(y, x, A, B, geom, xa)

    def _merged_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x·deq(W')ᵀ: the merged weight's kernel on the merged bytes (bit-exact with the merged
        model), or for another base layer (or fused=False) base(x) plus the rounded update."""
        if not (self.config.fused and adapter_ops.kernels_support(x) and _fusable(self.base)):
            return self.base(x) + merge_exact.rounded_update(x, self.base.weight, self.block_deltas())
        if x.numel() <= _DECODE_ROWS * x.shape[-1] and not torch.is_grad_enabled() \
                and not torch.compiler.is_compiling():
            # a CUDA graph being captured may use a kept weight, not make one (its kernels only run at replay)
            merged = self._merged_weight(build=not (x.is_cuda and torch.cuda.is_current_stream_capturing()))
            if merged is not None:
                return ops.qmatmul(x.contiguous(), merged)
        return merge_exact.min_shifted_qmatmul(x.contiguous(), self.base.weight, self.block_deltas())

    def _merged_weight(self, build: bool = True) -> QTensor | None:
        """The merged weight, kept while neither the base bytes nor the adapter change: decoding
        a token at a time would otherwise rebuild it for every token. Dropped by train(). None
        when the kept one is stale and build is False."""
        qt = self.base.weight
        key = (qt.raw.data_ptr(), qt.raw._version, qt.raw.device,
               tuple((p.data_ptr(), p._version) for p in self.parameters(recurse=False)))
        if self._merged is None or self._merged[0] != key:
            self._merged = None  # the old copy goes before the new one is made
            if not build:
                return None
            self._merged = (key, merge_exact.shift_mins(qt, self.block_deltas().detach()))
        return self._merged[1]

    def train(self, mode: bool = True):
        if mode:
            self._merged = None
        return super().train(mode)

    def reference_adapter(self, x: torch.Tensor, pooled: bool = False, rank: int | None = None,
                          matrices: tuple | None = None) -> torch.Tensor:
        """adapter(x) in plain torch ops, the PEFT way: pool, A, B, repeat_interleave, scale.
        pooled=True: x is already the pooled adapter input [..., K/p]. matrices: (A, B) (or
        (M, None)) to use instead of the module's own, e.g. float64 copies for gradcheck."""
        g = self.geometry(rank)
        xa = x if pooled else pool_inputs(x, g.pool)
        A, B = self._matrices() if matrices is None else matrices
        if g.has_b:
            A, B = A[:g.rank], B[:, :g.rank]
            if g.grad_from > 0:  # DyLoRA's frozen mode: older slices take part but do not learn
                A = torch.cat([A[:g.grad_from].detach(), A[g.grad_from:]], 0)
                B = torch.cat([B[:, :g.grad_from].detach(), B[:, g.grad_from:]], 1)
            v = (xa @ A.to(xa.dtype).t()) @ B.to(xa.dtype).t()
        else:
            v = xa @ A.to(xa.dtype).t()
        if g.repeat > 1:
            v = v.repeat_interleave(g.repeat, dim=-1)
        return v * g.scale

    # ---- the update as a dense matrix or a standard LoRA pair --------------------------------
    @torch.no_grad()
    def as_lora(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A' [r', K], B' [N, r']) in fp32 with the scale folded into B', such that
        adapter(x) = x · A'ᵀ · B'ᵀ. r' is r (LoRA, QA-LoRA), p·r (Q-BaRA), b (QDyLoRA) and
        min(N, K/G) (QA-HiRA)."""
        g = self.geometry(rank)
        A, B = (t.detach().float() if t is not None else None for t in self._matrices())
        if g.has_b:
            a = A[:g.rank].repeat_interleave(g.pool, dim=1) / g.pool
            b = B[:, :g.rank].repeat_interleave(g.repeat, dim=0) * g.scale
            return a.contiguous(), b.contiguous()
        kp = g.k_pooled
        pooling = torch.eye(kp, device=A.device).repeat_interleave(g.pool, dim=1) / g.pool  # [K/G, K]
        m = A.repeat_interleave(g.repeat, dim=0) * g.scale  # [N, K/G]
        if g.n < kp:
            return (m @ pooling).contiguous(), torch.eye(g.n, device=A.device)
        return pooling.contiguous(), m.contiguous()

    @torch.no_grad()
    def delta_weight(self, rank: int | None = None) -> torch.Tensor:
        """The update as a dense fp32 matrix ΔW [N, K]: adapter(x) = x · ΔWᵀ."""
        a, b = self.as_lora(rank)
        return b @ a

    def group_offsets(self) -> torch.Tensor:
        """QA-LoRA / QA-HiRA: the constant ΔW adds to each quantization group, [N, K/G] fp32,
        differentiable, without building the dense ΔW: the pooled input is a mean, so
        ΔW[o, i] = scale · (B·A)[o, i // G] / G (QA-HiRA: M for B·A). The same bits on every
        device, so the offsets a merge-exact run trained with on a GPU are the ones its export
        merges on the CPU: QA-HiRA's is one fp32 product per element; QA-LoRA's B·A is taken
        in float64 (no TF32, no order-dependent fp32 sums) and rounded once."""
        if self.method not in GROUP_CONSTANT:
            raise ValueError(f"{self.method} updates are not constant per quantization group")
        g = self.geometry()  # repeat is 1: these methods pool inputs only
        if self.method == "qa-hira":
            return self.hira_M.float() * (g.scale / g.pool)
        ba = self.lora_B[:, :g.rank].double() @ self.lora_A[:g.rank].double()
        return ba.mul_(g.scale / g.pool).float()

    @torch.no_grad()
    def block_offsets(self) -> torch.Tensor:
        """group_offsets() detached and contiguous: what an exact merge adds to each block's min."""
        return self.group_offsets().contiguous()

    def block_deltas(self) -> torch.Tensor:
        """group_offsets() per block of the base format, [N, K/block] (a QA-LoRA group may span
        several blocks), differentiable."""
        d = self.group_offsets()
        per = self.group // self.base.weight.format.block_elems
        return d.repeat_interleave(per, dim=1) if per > 1 else d

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The dense fp32 [N, K] weight this layer computes with: deq(W') for a merge-exact layer
        (the bytes a merge writes), deq(W) + ΔW otherwise."""
        qt = self.base.weight
        if self.merge_exact:
            return ops.dequantize(merge_exact.shift_mins(qt, self.block_deltas()), torch.float32)
        return ops.dequantize(qt, torch.float32) + self.delta_weight()

    def extra_repr(self) -> str:
        g = self.geometry()
        return (f"{self.method}, in={self.in_features}, out={self.out_features}, base={self.base_type}, "
                f"pool={g.pool}, repeat={g.repeat}, rank={g.rank}, scale={g.scale:g}"
                + (", merge-exact" if self.merge_exact else ""))


# Inputs of at most this many rows (decoding) run merge-exact layers on a kept merged weight.
_DECODE_ROWS = 16


def _kaiming_uniform(t: torch.Tensor, generator) -> None:
    """kaiming_uniform_(a=√5) as nn.Linear and PEFT use: U(-1/√fan_in, 1/√fan_in)."""
    bound = 1.0 / math.sqrt(t.shape[1])
    t.uniform_(-bound, bound, generator=generator)


def _pool_group(c: AdapterConfig, fmt: Format, k: int) -> int:
    """The QA-LoRA / QA-HiRA pooling width for a base of format fmt with k inputs."""
    g0 = quant_group(fmt)
    name = "QA-HiRA" if c.method == "qa-hira" else "QA-LoRA"
    if c.group is None:
        if g0 is None:
            raise ValueError(f"{name} pools over the base's quantization group, but a {fmt.name} base "
                             "has none; pass group= (any divisor of the input features)")
        return g0
    g = int(c.group)
    if k % g:
        raise ValueError(f"{name} group {g} does not divide the input features {k}")
    if g0 is not None:
        if c.method == "qa-hira" and g != g0:
            raise ValueError(f"QA-HiRA pools over exactly the base's quantization group: {fmt.name} "
                             f"groups {g0} inputs, not {g}; leave group unset")
        if g % g0:
            raise ValueError(f"QA-LoRA group {g} does not align with the {fmt.name} base's groups of "
                             f"{g0}: the update would vary inside a block; use a multiple of {g0}")
    return g


def no_min_note(method: str, base_types) -> str | None:
    """What QA-LoRA / QA-HiRA say on bases without a min (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K, every
    I-quant): their update is pooled over the quantization groups so that it merges exactly
    into each group's min, and these types have none to merge into. They train as usual; the
    merge re-quantizes, as LoRA's does. None for other methods and bases."""
    if canonical_method(method) not in GROUP_CONSTANT:
        return None
    fmts = {get_format(t) for t in base_types}
    no_min = sorted(f.name for f in fmts if f.quantized and f.min_group is None)
    if not no_min:
        return None
    name = "QA-HiRA" if canonical_method(method) == "qa-hira" else "QA-LoRA"
    return (f"{name} pools its update over the quantization groups so that a merge moves only each group's "
            f"min, but {', '.join(no_min)} {'has' if len(no_min) == 1 else 'have'} no min to merge into: the "
            f"adapter trains, and merging it re-quantizes the weights as LoRA's merge does. {name} merges "
            f"exactly into Q4_1, Q5_1 and INTb-gG bases (and refits Q2_K/Q4_K/Q5_K mins); on this base "
            f"lora, q-bara or qdylora train without the pooling constraint")


# ---- models --------------------------------------------------------------------------------------
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def apply_adapters(model: nn.Module, config: AdapterConfig) -> dict[str, AdaptedLinear]:
    """Wrap the targeted quantized linears of every selected decoder layer (modules named
    `layers.<i>.<...>.<target>` holding a QTensor `weight`) in AdaptedLinear, in place.
    Returns {qualified name: AdaptedLinear}."""
    if adapters_of(model):
        raise ValueError("the model already has adapters; remove_adapters(model) first")
    gen = torch.Generator().manual_seed(int(config.seed))
    found: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in config.targets or not isinstance(getattr(mod, "weight", None), QTensor):
            continue
        mt = _LAYER_RE.search(name)
        if mt is None:
            continue
        if config.layers is not None and int(mt.group(1)) not in config.layers:
            continue
        found.append((name, mod))
    if not found:
        raise ValueError(f"no quantized linears named {list(config.targets)} under model.layers"
                         + ("" if config.layers is None else f" {list(config.layers)}"))
    out = {}
    for name, mod in found:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        ad = AdaptedLinear(mod, config, generator=gen)
        setattr(parent, attr, ad)
        out[name] = ad
    return out


def merge_exact_summary(model_or_adapters) -> str | None:
    """One line on which adapted linears train through their merged fp16 mins (merge-exact mode),
    or None when the config does not ask for it."""
    ads = list(adapters_of(model_or_adapters).values())
    if not ads or not any(a.config.merge_exact for a in ads):
        return None
    exact = [a for a in ads if a.merge_exact]
    types = ", ".join(sorted({a.base_type for a in ads if not a.merge_exact}))
    if len(exact) == len(ads):
        return (f"merge-exact: all {len(ads)} adapted linears compute with their merged weights, so the "
                "merged GGUF will compute what this run trains, bit for bit")
    return (f"merge-exact: {len(exact)} of {len(ads)} adapted linears compute with their merged weights; "
            f"the others ({types}) store no fp16 mins, and their merge will be approximate (the export "
            "reports by how much)")


def adapters_of(model_or_adapters) -> dict[str, AdaptedLinear]:
    """{name: AdaptedLinear} of a model (its modules), a dict of adapters, or one adapter."""
    if isinstance(model_or_adapters, AdaptedLinear):
        return {"": model_or_adapters}
    if isinstance(model_or_adapters, dict):
        bad = [k for k, v in model_or_adapters.items() if not isinstance(v, AdaptedLinear)]
        if bad:
            raise ValueError(f"not adapters: {bad[:5]}")
        return dict(model_or_adapters)
    if isinstance(model_or_adapters, nn.Module):
        return {n: m for n, m in model_or_adapters.named_modules() if isinstance(m, AdaptedLinear)}
    raise ValueError(f"expected a model, an AdaptedLinear or a dict of them, got {type(model_or_adapters).__name__}")


def remove_adapters(model: nn.Module) -> None:
    """Put the base linears back in place of their AdaptedLinear wrappers."""
    for name in list(adapters_of(model)):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, getattr(parent, attr).base)


def adapter_parameters(model_or_adapters) -> list[nn.Parameter]:
    return [p for ad in adapters_of(model_or_adapters).values() for p in ad.parameters(recurse=False)]


def mark_only_adapters_trainable(model: nn.Module) -> list[nn.Parameter]:
    """requires_grad=False on every parameter but the adapters'; returns the adapters'."""
    keep = {id(p) for p in adapter_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return adapter_parameters(model)


# ---- QDyLoRA -----------------------------------------------------------------------------------
def _dylora(model_or_adapters) -> list[AdaptedLinear]:
    ads = [a for a in adapters_of(model_or_adapters).values() if a.method == "qdylora"]
    if not ads:
        raise ValueError("no QDyLoRA adapters found")
    return ads


def set_rank(model_or_adapters, b: int) -> None:
    """Use rank b (A[:b], B[:, :b], scale α/b) in every QDyLoRA adapter."""
    for ad in _dylora(model_or_adapters):
        ad.set_rank(b)


def sample_rank(rng, r_max: int, r_min: int = 1) -> int:
    """b ~ Uniform{r_min..r_max}; rng is a random.Random, a torch.Generator or None."""
    if isinstance(rng, torch.Generator):
        return int(torch.randint(r_min, r_max + 1, (1,), generator=rng))
    return (rng or random).randint(r_min, r_max)


class DyLoRAController:
    """One rank per optimizer step for all QDyLoRA adapters of a model.

        ctl = DyLoRAController(model, optimizer, seed=0)
        for batch in data:
            ctl.sample()                 # b ~ U{1..r_max}, set in every layer
            loss(model(batch)).backward(); optimizer.step(); optimizer.zero_grad()
        ctl.set_rank(best_b)             # evaluate / export any b <= r_max

    With an optimizer and freeze_unused (default: on in "slice" mode), each optimizer step
    leaves the slices that got no gradient, and their optimizer state, exactly as they were.
    This copies those slices (weights and state) once per step."""

    def __init__(self, model_or_adapters, optimizer: torch.optim.Optimizer | None = None,
                 seed: int = 0, r_min: int = 1, freeze_unused: bool | None = None):
        self.adapters = _dylora(model_or_adapters)
        self.r_max = min(a.r_max for a in self.adapters)
        if not 1 <= r_min <= self.r_max:
            raise ValueError(f"r_min must be in 1..{self.r_max}, got {r_min}")
        self.r_min = r_min
        self.rng = random.Random(seed)
        slice_mode = self.adapters[0].config.dylora_update == "slice"
        self.freeze_unused = slice_mode if freeze_unused is None else bool(freeze_unused)
        self._saved = None
        self._hooks = []
        if optimizer is not None and self.freeze_unused:
            self._hooks = [optimizer.register_step_pre_hook(self._pre_step),
                           optimizer.register_step_post_hook(self._post_step)]

    @property
    def rank(self) -> int:
        return self.adapters[0].rank_in_use

    def sample(self) -> int:
        b = sample_rank(self.rng, self.r_max, self.r_min)
        self.set_rank(b)
        return b

    def set_rank(self, b: int) -> None:
        for ad in self.adapters:
            ad.set_rank(b)

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _frozen_ranges(self, ad: AdaptedLinear):
        g = ad.geometry()
        return [(s, e) for s, e in ((0, g.grad_from), (g.rank, ad.r_max)) if e > s]

    def _pre_step(self, optimizer, args, kwargs):
        self._saved = []
        for ad in self.adapters:
            for p, dim in ((ad.lora_A, 0), (ad.lora_B, 1)):
                state = optimizer.state.get(p, {})
                for s, e in self._frozen_ranges(ad):
                    snap = {key: v.narrow(dim, s, e - s).clone() for key, v in state.items()
                            if torch.is_tensor(v) and v.shape == p.shape}
                    self._saved.append((p, dim, s, e, p.detach().narrow(dim, s, e - s).clone(), snap))

    @torch.no_grad()
    def _post_step(self, optimizer, args, kwargs):
        for p, dim, s, e, value, snap in self._saved or ():
            p.narrow(dim, s, e - s).copy_(value)
            for key, v in optimizer.state.get(p, {}).items():
                if torch.is_tensor(v) and v.shape == p.shape:
                    if key in snap:
                        v.narrow(dim, s, e - s).copy_(snap[key])
                    else:  # state created by this very step: frozen slices keep none
                        v.narrow(dim, s, e - s).zero_()
        self._saved = None


# ---- saving and loading --------------------------------------------------------------------------
def base_hash(source) -> str:
    """A cheap, stable identity of a base model: sha256 over its tensor table and the first 4 KiB
    of every tensor's data (up to the next tensor). `source`: a GGUF file (read with the
    validating gguf_io.GGUFFile; from a split GGUF's first part, every part in order), a
    safetensors file, or a Hugging Face checkpoint directory (its safetensors files in order).
    Hex string. The GGUF hash is the one lowtune has always written: the table bytes are rebuilt
    from the parsed entries exactly as the file holds them."""
    path = Path(source)
    h = hashlib.sha256()
    for f in safetensors_files(path) if path.is_dir() else gguf_parts(path) if _is_gguf(path) else [path]:
        table, spans = _gguf_table(f) if _is_gguf(f) else safetensors_table(f)
        h.update(table)
        with open(f, "rb") as fh:
            for start, size in spans:
                fh.seek(start)
                h.update(fh.read(min(size, 4096)))
    return h.hexdigest()


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"


def _gguf_table(path) -> tuple[bytes, list[tuple[int, int]]]:
    """A GGUF file's tensor-info table as its bytes (name, n_dims, ne, type, relative offset per
    tensor) and, per tensor, (absolute offset, bytes up to the next tensor or the end of file)."""
    with GGUFFile(path) as f:
        infos, base, end = list(f.tensor_infos.values()), f.data_offset, f.size
    table = bytearray()
    for ti in infos:
        name = ti.name.encode("utf-8", errors="surrogateescape")
        table += struct.pack("<Q", len(name)) + name + struct.pack("<I", len(ti.ne))
        table += struct.pack(f"<{len(ti.ne)}Q", *ti.ne) + struct.pack("<IQ", ti.type_id, ti.offset - base)
    starts = sorted(ti.offset for ti in infos)
    nxt = {o: (starts[i + 1] if i + 1 < len(starts) else end) for i, o in enumerate(starts)}
    return bytes(table), [(ti.offset, nxt[ti.offset] - ti.offset) for ti in infos]


def model_base_hash(model) -> str | None:
    """The base hash a model knows of itself: a `base_hash` attribute (string or method), or
    the hash of the file or directory it was loaded from (`source_path`)."""
    h = getattr(model, "base_hash", None)
    if callable(h):
        h = h()
    if isinstance(h, str):
        return h
    p = getattr(model, "source_path", None)
    if isinstance(p, (str, os.PathLike)) and Path(p).exists():
        return base_hash(p)
    return None


def save_adapter(model_or_adapters, directory, base_hash: str | None = None) -> Path:
    """Write adapter.safetensors and adapter_config.json (method, rank, alpha, targets,
    pooling, base model hash, per-module shapes) into `directory`; each file goes to a
    temporary name first and is renamed. base_hash defaults to what a model knows of itself
    (model_base_hash). Returns the directory."""
    if base_hash is None and isinstance(model_or_adapters, nn.Module):
        base_hash = model_base_hash(model_or_adapters)
    ads = adapters_of(model_or_adapters)
    if not ads:
        raise ValueError("no adapters to save")
    configs = {ad.config for ad in ads.values()}
    if len(configs) != 1:
        raise ValueError("the adapters were built with different configs; save them separately")
    config = configs.pop()
    tensors, modules = {}, {}
    for name, ad in ads.items():
        for pname, p in ad.named_parameters(recurse=False):
            tensors[f"{name}.{pname}" if name else pname] = p.detach().to("cpu").contiguous()
        g = ad.geometry()
        modules[name] = {"in_features": ad.in_features, "out_features": ad.out_features,
                         "base_type": ad.base_type, "pool": g.pool, "repeat": g.repeat,
                         "group": ad.group, "scale": g.scale}
    meta = {"format": "lowtune-adapter", "version": 1, "method": config.method,
            "rank": config.rank, "alpha": config.alpha, "targets": list(config.targets),
            "base_hash": base_hash, "config": config.to_dict(), "modules": modules}
    if config.method == "qdylora":
        meta["dylora_rank"] = next(iter(ads.values())).rank_in_use
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    write_safetensors_dict(d / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
    atomic_write_text(d / ADAPTER_CONFIG, json.dumps(meta, indent=2) + "\n")
    return d


def read_adapter_config(directory) -> dict:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a lowtune adapter directory")
    meta = json.loads(path.read_text())
    if meta.get("format") != "lowtune-adapter":
        raise ValueError(f"{path} is not a lowtune adapter config (format {meta.get('format')!r})")
    meta["method"] = canonical_method(meta["method"])
    return meta


def load_adapter(model: nn.Module, directory) -> dict[str, AdaptedLinear]:
    """Apply the adapter saved in `directory` to `model` and load its weights; a model whose
    linears or shapes differ from the adapter's is refused and left as it was. Which base the
    adapter belongs to is lowtune.loading's check (attach_adapter), made before this."""
    from safetensors.torch import load_file

    meta = read_adapter_config(directory)
    config = AdapterConfig.from_dict(meta["config"])
    ads = apply_adapters(model, config)
    try:
        if set(ads) != set(meta["modules"]):
            missing, extra = set(meta["modules"]) - set(ads), set(ads) - set(meta["modules"])
            raise ValueError(f"the model's linears do not match the adapter's: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(extra)[:5]}")
        tensors = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
        for name, ad in ads.items():
            for pname, p in ad.named_parameters(recurse=False):
                key = f"{name}.{pname}" if name else pname
                if key not in tensors:
                    raise ValueError(f"{ADAPTER_WEIGHTS} lacks {key}")
                t = tensors[key]
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"{key}: saved shape {tuple(t.shape)} but the model needs {tuple(p.shape)}")
                with torch.no_grad():
                    p.copy_(t.to(p.device, p.dtype))
            if "dylora_rank" in meta:
                ad.set_rank(int(meta["dylora_rank"]))
    except Exception:
        remove_adapters(model)
        raise
    return ads


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdaptedLinear", "AdapterConfig", "DyLoRAController",
           "METHODS", "TARGETS", "adapter_parameters", "adapters_of", "apply_adapters", "base_hash",
           "load_adapter", "mark_only_adapters_trainable", "merge_exact_summary", "model_base_hash",
           "no_min_note", "pool_inputs",
           "quant_group", "read_adapter_config", "remove_adapters", "sample_rank", "save_adapter", "set_rank"]
