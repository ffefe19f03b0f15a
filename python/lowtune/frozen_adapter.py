"""A frozen adapter under a trainable one: INT2.1's LREC-then-fine-tune.

    frozen = freeze_adapter(model, "runs/lrec/adapter")   # after adapters.load_adapter's checks
    apply_adapters(model, AdapterConfig(method="qa-hira"))  # a second, trainable adapter on top

lowtune.loading attaches a base adapter this way (`lowtune finetune --base-adapter RUN_DIR`),
after checking which base it belongs to.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import adapter_ops
from .adapters import AdaptedLinear, adapters_of, load_adapter, pool_inputs
from .qtensor import QTensor


class FrozenAdaptedLinear(nn.Module):
    """A quantized linear plus a frozen adapter (e.g. an LREC correction): y = base(x) + adapter(x).

    It shows the base's QTensor as `weight`, so apply_adapters wraps it like any quantized
    linear; the second adapter then runs as base(x) followed by its own accumulate. The frozen
    matrices are non-persistent buffers: no parameter, no optimizer state, not in state_dict()
    or in save_adapter()'s output (the run directory they came from is recorded instead)."""

    lowtune_fusable = False  # forward is more than qmatmul(x, weight)

    def __init__(self, adapted: AdaptedLinear, source: str = ""):
        super().__init__()
        self.base = adapted.base
        self.geom = adapted.geometry()
        self.method = adapted.method
        self.source = source
        A, B = adapted._matrices()
        self.register_buffer("frozen_A", A.detach().clone(), persistent=False)
        self.register_buffer("frozen_B", None if B is None else B.detach().clone(), persistent=False)
        self.out_features, self.in_features = adapted.out_features, adapted.in_features

    @property
    def weight(self) -> QTensor:
        return self.base.weight

    @property
    def name(self) -> str:
        return getattr(self.base, "name", "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B, g = self.frozen_A, self.frozen_B, self.geom
        if adapter_ops.kernels_support(x) and getattr(self.base, "lowtune_fusable", True) \
                and getattr(self.base, "bias", None) is None:
            y = adapter_ops.adapted_qmatmul(x.contiguous(), self.base.weight, A, B, g)
            # a second adapter accumulates into this output in place, which autograd forbids on
            # a custom Function's output view: hand out a tensor of our own
            return y.clone() if torch.is_grad_enabled() else y
        return self.base(x) + self.reference_adapter(x)

    def reference_adapter(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geom
        xa = pool_inputs(x, g.pool)
        A = self.frozen_A[:g.rank].to(xa.dtype)
        v = xa @ A.t()
        if g.has_b:
            v = v @ self.frozen_B[:, :g.rank].to(xa.dtype).t()
        if g.repeat > 1:
            v = v.repeat_interleave(g.repeat, dim=-1)
        return v * g.scale

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The frozen update as a dense fp32 [N, K]: adapter(x) = x · ΔWᵀ (what a merge adds)."""
        g = self.geom
        A = self.frozen_A[:g.rank].float()
        m = self.frozen_B[:, :g.rank].float() @ A if g.has_b else A
        return (m.repeat_interleave(g.repeat, dim=0) * g.scale).repeat_interleave(g.pool, dim=1) / g.pool

    def extra_repr(self) -> str:
        return f"frozen {self.method} from {self.source or '?'}, rank={self.geom.rank}, scale={self.geom.scale:g}"


def freeze_adapter(model: nn.Module, directory) -> dict[str, FrozenAdaptedLinear]:
    """Load the adapter saved in `directory` onto `model` and freeze it in place: each adapted
    linear becomes a FrozenAdaptedLinear, which a later apply_adapters() wraps again with a
    trainable adapter. Returns {module name: FrozenAdaptedLinear}."""
    if adapters_of(model):
        raise ValueError("apply the frozen base adapter before any trainable adapter")
    out = {}
    for name, ad in load_adapter(model, directory).items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        frozen = FrozenAdaptedLinear(ad, str(Path(directory)))
        setattr(parent, attr, frozen)
        out[name] = frozen
    return out


def frozen_adapters_of(model: nn.Module) -> dict[str, FrozenAdaptedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FrozenAdaptedLinear)}
