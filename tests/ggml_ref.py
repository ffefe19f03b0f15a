"""llama.cpp's own quantizer, reached through ctypes, for tests only.

llama-cpp-python ships ggml's shared libraries inside its package (llama_cpp/lib/). ggml's C API
has `ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)` (ggml.h), which with
imatrix = NULL runs the reference quantizer quantize_row_*_ref -- what `llama-quantize` uses
when no importance matrix is given.

    available()                -> True when llama_cpp and its libggml-base are importable
    quantize(w[N, K], type_id[, imatrix]) -> uint8 [N, row_bytes]: ggml's bytes for a float32 matrix
    dequantize(raw[N, row_bytes], type_id, K) -> float32 [N, K]: ggml's dequantize_row_* (to_float)
    quantize_model(src, out, ftype[, imatrix]) -> llama-quantize on a whole GGUF (llama_model_quantize)
    rewrite_split(first_part, prefix)          -> the same split model written by llama.cpp's writer
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
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


class _TypeTraits(ctypes.Structure):  # ggml.h's struct ggml_type_traits
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def dequantize(raw: np.ndarray, type_id: int, k: int) -> np.ndarray:
    """ggml's dequantization (type_traits[type_id].to_float) of uint8 raw [N, row_bytes] into float32 [N, K]."""
    lib = _ggml_base()
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if raw.ndim != 2 or raw.shape[1] != lib.ggml_row_size(type_id, k):
        raise ValueError(f"raw must be uint8 [N, {lib.ggml_row_size(type_id, k)}] for K={k}, got {raw.shape}")
    out = np.zeros((raw.shape[0], k), np.float32)
    _TO_FLOAT(lib.ggml_get_type_traits(type_id).contents.to_float)(raw.ctypes.data, out.ctypes.data, out.size)
    return out


# llama_ftype values of the recipes the tests ask llama.cpp for (llama.h)
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q2_K": 10, "Q3_K_M": 12, "Q4_K_M": 15, "Q5_K_S": 16, "IQ2_XXS": 19,
          "IQ2_XS": 20, "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26, "IQ3_M": 27, "IQ2_S": 28,
          "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31, "TQ1_0": 36, "TQ2_0": 37, "MXFP4_MOE": 38, "Q1_0": 40, "Q2_0": 41}


def quantize_model(src, out, recipe: str, imatrix: dict[str, np.ndarray] | None = None,
                   tensor_types: dict[str, int] | None = None, threads: int = 2) -> None:
    """llama-quantize SRC OUT RECIPE (llama_model_quantize, requantizing a quantized source as
    --allow-requantize does), with an importance matrix {tensor name: float32 [K]} and
    --tensor-type overrides {regex on tensor names: ggml type id} where given; written to a
    temporary name, then renamed."""
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread, params.ftype, params.allow_requantize = threads, FTYPES[recipe], True
    keep = []
    if tensor_types:
        overrides = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()  # pattern NULL ends it
        for o, (pattern, type_id) in zip(overrides, tensor_types.items()):
            o.pattern, o.type = pattern.encode(), type_id
        params.tt_overrides = overrides
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # name NULL ends the list
        for e, (name, values) in zip(entries, imatrix.items()):
            v = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(v)
            e.name, e.data, e.size = name.encode(), v.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), v.size
        params.imatrix = entries
    tmp = f"{out}.tmp"
    rc = llama_cpp.llama_model_quantize(os.fspath(src).encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise RuntimeError(f"llama_model_quantize({src} -> {recipe}) failed with status {rc}")
    os.replace(tmp, out)


def rewrite_split(first_part, out_prefix) -> None:
    """llama.cpp's own split writer: llama-quantize --keep-split over a split model, copying every
    tensor (only_copy); writes <out_prefix>-0000i-of-0000N.gguf with the source's split."""
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread, params.only_copy, params.keep_split = 2, True, True
    rc = llama_cpp.llama_model_quantize(os.fspath(first_part).encode(), os.fspath(out_prefix).encode(),
                                        ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize(--keep-split {first_part}) failed with status {rc}")
