"""Block formats: one class per type, each with a NumPy reference quantize/dequantize.

A format describes how an ``[N, K]`` weight is stored: every row of K values is split into
blocks of ``block_elems`` consecutive inputs, each ``block_bytes`` bytes. The NumPy code in
this package is written from the format specifications (GGUF's ggml-common.h / ggml-quants.c
reference, and the INTb-gG layout in csrc/blocks.h) and is the slow, obvious reference the
C++ and CUDA kernels are tested against.

    get_format("q4_k")      -> the Q4_K format (names are case-insensitive)
    FORMATS                  -> {name: format} for every supported type
"""
from __future__ import annotations

import numpy as np


class Format:
    """A block format. Subclasses implement the NumPy reference.

    name         GGUF name ("Q4_K") or "INTb-gG"
    type_id      ggml_type id for GGUF types; 1000 + 10*b + {0,1,2} for INTb-gG
    block_elems  inputs per block
    block_bytes  bytes per block
    float_min    True when each block carries a float (fp16) additive min: a constant added to a
                 whole block is absorbed exactly by changing that min (Q4_1, Q5_1, INTb-gG)
    scale_group  consecutive inputs of a row that share one scale: the block, or the sub-block of
                 a super-block (16 or 32); None for the float formats
    min_group    consecutive inputs that share one min (fp16 or quantized); None when the format
                 has no min (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K, every I-quant, MXFP4, NVFP4, TQ1_0, TQ2_0,
                 Q1_0, Q2_0) or is a float format
    quantized    False for the F32/F16/BF16 passthrough formats
    needs_imatrix  quantizing needs an importance matrix (ggml's IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S,
                 IQ1_M); lowtune computes none, so it reads and trains on these blocks but does
                 not write them (lowtune.quantize refuses, naming the types to use instead)
    """

    name: str = ""
    type_id: int = -1
    block_elems: int = 1
    block_bytes: int = 4
    float_min: bool = False
    scale_group: int | None = None
    min_group: int | None = None
    quantized: bool = True
    needs_imatrix: bool = False
    gguf: bool = True  # storable in a GGUF file as its own type

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block_elems

    def row_bytes(self, k: int) -> int:
        if k % self.block_elems:
            raise ValueError(f"{self.name}: row length {k} is not a multiple of the block size {self.block_elems}")
        return k // self.block_elems * self.block_bytes

    # NumPy reference: w float32 [N, K] -> uint8 [N, row_bytes(K)]
    def quantize(self, w: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"no NumPy reference quantizer for {self.name}")

    # NumPy reference: uint8 [N, row_bytes] -> float32 [N, K]
    def dequantize(self, raw: np.ndarray, k: int) -> np.ndarray:
        raise NotImplementedError(f"no NumPy reference dequantizer for {self.name}")

    def __repr__(self) -> str:
        return f"<format {self.name}: {self.block_elems} elems / {self.block_bytes} bytes>"


class BlockwiseFormat(Format):
    """A format whose NumPy reference works on whole blocks: subclasses give
    _quantize_blocks(float32 [B, block_elems]) -> uint8 [B, block_bytes] and
    _dequantize_blocks(uint8 [B, block_bytes]) -> float32 [B, block_elems]; this class owns the
    rows <-> blocks plumbing and the input checks."""

    def _blocks_in(self, w: np.ndarray) -> np.ndarray:
        w = np.asarray(w)
        if w.ndim != 2:
            raise ValueError(f"{self.name}: w must have shape [N, K], got {w.shape}")
        self.row_bytes(w.shape[1])  # raises ValueError unless K is a multiple of the block size
        w = np.ascontiguousarray(w, dtype=np.float32)
        if not np.isfinite(w).all():
            raise ValueError(f"{self.name}: w contains NaN or inf; quantization needs finite weights")
        return w.reshape(-1, self.block_elems)

    def _blocks_out(self, raw: np.ndarray, k: int) -> np.ndarray:
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        if raw.ndim != 2 or raw.shape[1] != self.row_bytes(k):
            raise ValueError(f"{self.name}: raw must be uint8 [N, {self.row_bytes(k)}] for K={k}, got {raw.shape}")
        return raw.reshape(-1, self.block_bytes)

    def quantize(self, w: np.ndarray) -> np.ndarray:
        x = self._blocks_in(w)
        n = np.asarray(w).shape[0]
        if x.shape[0] == 0:
            return np.zeros((n, 0), np.uint8)
        with np.errstate(all="ignore"):  # masked-out lanes may divide by zero; they are discarded
            return self._quantize_blocks(x).reshape(n, -1)

    def _quantize_blocks(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"no NumPy reference quantizer for {self.name}")

    def dequantize(self, raw: np.ndarray, k: int) -> np.ndarray:
        b = self._blocks_out(raw, k)
        return self._dequantize_blocks(b).reshape(raw.shape[0], k)


class _FloatFormat(Format):
    quantized = False
    _dtype: np.dtype

    def quantize(self, w):
        return np.ascontiguousarray(np.asarray(w, np.float32).astype(self._dtype)).view(np.uint8)

    def dequantize(self, raw, k):
        return np.ascontiguousarray(raw).view(self._dtype).reshape(raw.shape[0], k).astype(np.float32)


class F32(_FloatFormat):
    name, type_id, block_bytes, _dtype = "F32", 0, 4, np.dtype(np.float32)


class F16(_FloatFormat):
    name, type_id, block_bytes, _dtype = "F16", 1, 2, np.dtype(np.float16)


class BF16(_FloatFormat):
    name, type_id, block_bytes = "BF16", 30, 2

    def quantize(self, w):
        bits = np.ascontiguousarray(np.asarray(w, np.float32)).view(np.uint32)
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        rounded = np.where(nan, ((bits >> 16) | 0x40).astype(np.uint16), rounded)
        return rounded.view(np.uint8)

    def dequantize(self, raw, k):
        h = np.ascontiguousarray(raw).view(np.uint16).reshape(raw.shape[0], k).astype(np.uint32)
        return (h << 16).view(np.float32)


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    FORMATS[fmt.name.upper()] = fmt
    return fmt


for _cls in (F32, F16, BF16):
    register(_cls())

# (they register their formats)
from . import legacy, kquants, iquants, mxfp4, nvfp4, lowbit, intgroup  # noqa: E402


def get_format(name_or_format) -> Format:
    """The format for a name ("Q4_K", "int4-g64"), a type id, or a Format (returned as is)."""
    if isinstance(name_or_format, Format):
        return name_or_format
    if isinstance(name_or_format, (int, np.integer)):
        for f in FORMATS.values():
            if f.type_id == int(name_or_format):
                return f
        raise ValueError(f"unknown quantization type id {name_or_format}; known: {sorted(f.type_id for f in FORMATS.values())}")
    key = str(name_or_format).upper()
    if key not in FORMATS:
        raise ValueError(f"unknown quantization type {name_or_format!r}; known types: {', '.join(FORMATS)}")
    return FORMATS[key]


__all__ = ["Format", "FORMATS", "get_format", "register"]
