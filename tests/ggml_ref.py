"""llama.cpp's own quantizer, reached through ctypes, for tests only.

llama-cpp-python ships ggml's shared libraries inside its package (llama_cpp/lib/). ggml's C API
has `ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)` (ggml.h), which with
imatrix = NULL runs the reference quantizer quantize_row_*_ref -- what `llama-quantize` uses
when no importance matrix is given.

    available()                -> True when llama_cpp and its libggml-base are importable
    quantize(w[N, K], type_id[, imatrix]) -> uint8 [N, row_bytes]: ggml's bytes for a float32 matrix
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

import numpy as np


def _lib_dir() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(spec.submodule_search_locations[0]) / "lib"
    return d if d.is_dir() else None


def available() -> bool:
    return _lib_dir() is not None and any(_lib_dir().glob("libggml-base.*"))


@functools.cache
def _ggml_base() -> ctypes.CDLL:
    d = _lib_dir()
    if d is None:
        raise RuntimeError("llama-cpp-python is not installed (pip install llama-cpp-python)")
    candidates = sorted(d.glob("libggml-base.so*")) + sorted(d.glob("libggml-base.dylib")) + sorted(d.glob("ggml-base.dll"))
    if not candidates:
        raise RuntimeError(f"no libggml-base shared library in {d}")
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return lib


def quantize(w: np.ndarray, type_id: int, imatrix: np.ndarray | None = None) -> np.ndarray:
    """ggml's reference quantization of float32 w [N, K] into type `type_id` (ggml_type).
    imatrix: float32 [K], the importance of each input column (llama-imatrix's per-column mean of
    squared activations); ggml needs one for IQ2_XXS, IQ2_XS and IQ1_S, and uses it where given."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"w must be [N, K], got shape {w.shape}")
    n, k = w.shape
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (k,):
            raise ValueError(f"imatrix must have shape [{k}], got {imatrix.shape}")
    lib = _ggml_base()
    row_bytes = lib.ggml_row_size(type_id, k)
    out = np.zeros((n, row_bytes), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(type_id, w.ctypes.data, out.ctypes.data, 0, n, k,
                                      None if imatrix is None else imatrix.ctypes.data)
    if written != n * row_bytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {n * row_bytes}")
    return out
