"""lowtune: fine-tune block-quantized LLMs (GGUF and INTb-gG weights) on small GPUs and CPUs.

    import lowtune
    qt = lowtune.quantize(w, "Q4_K")          # QTensor: blocks in GGUF layout
    y = lowtune.qmatmul(x, qt)                # x · deq(W)ᵀ, differentiable w.r.t. x
    w2 = lowtune.dequantize(qt, torch.bfloat16)
"""
try:
    from . import _C
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "lowtune's compiled module lowtune._C could not be loaded "
        f"({e}). Reinstall with `pip install .` from the source tree.") from e

from .formats import FORMATS, Format, get_format
from .qtensor import QTensor
from .ops import dequantize, qmatmul, qmatmul_input_grad, quantize

__version__ = _C.build_info()["version"]


def build_info() -> dict:
    """What the compiled module holds: version, cuda (bool), cuda_archs, compiler, cpu_threads."""
    return dict(_C.build_info())


_LAZY = {"finetune": "trainer", "resume": "trainer", "TrainConfig": "trainer", "Trainer": "trainer"}


def __getattr__(name: str):
    # The training API imports on first use, so `import lowtune` stays light.
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lowtune' has no attribute {name!r}")


__all__ = ["FORMATS", "Format", "QTensor", "build_info", "dequantize", "get_format", "qmatmul",
           "qmatmul_input_grad", "quantize"]
