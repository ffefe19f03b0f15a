"""lowtune: fine-tune block-quantized LLMs (GGUF and INTb-gG weights) on small GPUs and CPUs.

    import lowtune
    qt = lowtune.quantize(w, "Q4_K")          # QTensor: blocks in GGUF layout
    y = lowtune.qmatmul(x, qt)                # x · deq(W)ᵀ, differentiable w.r.t. x
    w2 = lowtune.dequantize(qt, torch.bfloat16)
    run = lowtune.finetune("model.gguf", "notes.txt", "runs/notes", steps=200)

`import lowtune` loads only the compiled module (which needs no torch); the names below load
their modules, and torch, on first use, so the command line starts at once.
"""
try:
    from . import _C
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "lowtune's compiled module lowtune._C could not be loaded "
        f"({e}). Reinstall with `pip install .` from the source tree.") from e

__version__ = _C.build_info()["version"]


def build_info() -> dict:
    """What the compiled module holds: version, cuda (bool), cuda_archs, compiler, cpu_threads."""
    return dict(_C.build_info())


# public name -> the module that defines it
_LAZY = {"FORMATS": "formats", "Format": "formats", "get_format": "formats", "QTensor": "qtensor",
         "dequantize": "ops", "qmatmul": "ops", "qmatmul_input_grad": "ops", "quantize": "ops",
         "finetune": "trainer", "resume": "trainer", "TrainConfig": "train_config", "Trainer": "trainer",
         "load": "loading", "load_model": "loading"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lowtune' has no attribute {name!r}")


__all__ = ["FORMATS", "Format", "QTensor", "build_info", "dequantize", "get_format", "qmatmul",
           "qmatmul_input_grad", "quantize"]
