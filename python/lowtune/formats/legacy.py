"""GGUF legacy block formats (32 elements per block): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

NumPy references written from the format specification (ggml-common.h layouts, the rounding
rules of ggml-quants.c's reference quantizers). Nibble order: byte j of qs holds element j
(low nibble) and element j+16 (high nibble); Q5's fifth bits are the little-endian u32 qh,
bit j for element j.

All arithmetic is float32, in the order the specification states it, so the bytes equal
ggml's (and gguf-py's) exactly. The quantizers round with the fp32 scale; only the stored
scale is fp16.

The small helpers here (blocking, nibble and bit packing, min-max codes) are shared with
intgroup.py, whose INT4-g32 and INT5-g32 are Q4_1 and Q5_1 byte for byte.
"""
from __future__ import annotations

import numpy as np

from . import Format, register

QK = 32
F32 = np.float32


# ---- shared helpers ---------------------------------------------------------------------------

def as_blocks(w: np.ndarray, elems: int) -> np.ndarray:
    """float [N, K] -> float32 [N * K / elems, elems] (blocks in row-major order)."""
    w = np.asarray(w, dtype=F32)
    if w.ndim != 2:
        raise ValueError(f"w must have shape [N, K], got {w.shape}")
    if w.shape[1] % elems:
        raise ValueError(f"row length {w.shape[1]} is not a multiple of the block size {elems}")
    return np.ascontiguousarray(w).reshape(-1, elems)


def raw_blocks(raw: np.ndarray, k: int, fmt: Format) -> tuple[int, np.ndarray]:
    """uint8 block bytes [N, row_bytes] (or flat, whole rows) -> (N, uint8 [N * K / elems, block_bytes])."""
    row_bytes = fmt.row_bytes(k)
    raw = np.ascontiguousarray(raw).view(np.uint8)
    if raw.ndim == 2 and raw.shape[1] == row_bytes:
        n = raw.shape[0]
    elif row_bytes and raw.size % row_bytes == 0:
        n = raw.size // row_bytes
    else:
        raise ValueError(f"{fmt.name}: {raw.shape} bytes are not whole rows of {row_bytes} bytes (K={k})")
    return n, raw.reshape(-1, fmt.block_bytes)


def f16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 [B] -> uint8 [B, 2]: little-endian IEEE half, round to nearest even (too large: inf,
    as in ggml)."""
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(v.astype("<f2")).view(np.uint8).reshape(-1, 2)


def f16_values(b: np.ndarray) -> np.ndarray:
    """uint8 [B, 2] -> float32 [B, 1]: the halves, exactly."""
    return np.ascontiguousarray(b).view("<f2").astype(F32).reshape(-1, 1)


def reciprocal_or_zero(d: np.ndarray) -> np.ndarray:
    """1/d in float32, 0 where d == 0 (a constant block stores code 0 / the zero point)."""
    with np.errstate(divide="ignore", over="ignore"):
        return np.where(d == 0, F32(0), F32(1) / np.where(d == 0, F32(1), d)).astype(F32)


def trunc_codes(v: np.ndarray, maxq: int) -> np.ndarray:
    """float32 -> integer codes: truncate toward zero (C's float -> int), clamp to [0, maxq]."""
    with np.errstate(invalid="ignore"):
        return np.clip(np.trunc(v), 0, maxq).astype(np.int32)


def minmax_codes(blocks: np.ndarray, maxq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric min-max rounding of float32 [B, E] to codes in [0, maxq]:
    d = (max - min) / maxq, q = trunc((x - min) / d + 1/2) (with 1/d taken once), x ~ d*q + min.
    Returns (d [B, 1], min [B, 1], q int32 [B, E])."""
    lo = blocks.min(axis=1, keepdims=True)
    hi = blocks.max(axis=1, keepdims=True)
    with np.errstate(over="ignore", invalid="ignore"):
        d = ((hi - lo) / F32(maxq)).astype(F32)
        q = trunc_codes((blocks - lo) * reciprocal_or_zero(d) + F32(0.5), maxq)
    return d, lo, q


def to_rows(parts: list[np.ndarray], w: np.ndarray, fmt: Format) -> np.ndarray:
    """Block fields [B, *] side by side -> uint8 [N, row_bytes] for the weight w [N, K]."""
    n, k = np.shape(w)
    return np.concatenate(parts, axis=1).reshape(n, fmt.row_bytes(k))


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """int [B, 32c] -> uint8 [B, 16c]: per 32-chunk, byte j = q[j] | q[j + 16] << 4."""
    b, e = q.shape
    q = q.reshape(b, e // 32, 2, 16).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(b, e // 2)


def unpack_nibbles(b: np.ndarray) -> np.ndarray:
    """uint8 [B, 16c] -> int32 [B, 32c], inverse of pack_nibbles."""
    nb, e = b.shape
    b = b.reshape(nb, e // 16, 1, 16)
    return np.concatenate([b & 0x0F, b >> 4], axis=2).reshape(nb, 2 * e).astype(np.int32)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """{0,1} [B, 8n] -> uint8 [B, n]: element e is bit e % 8 of byte e // 8 (little-endian)."""
    return np.packbits(bits.astype(np.uint8), axis=1, bitorder="little")


def unpack_bits(b: np.ndarray) -> np.ndarray:
    """uint8 [B, n] -> int32 [B, 8n], inverse of pack_bits."""
    return np.unpackbits(b, axis=1, bitorder="little").astype(np.int32)


# ---- the formats -------------------------------------------------------------------------------

class Q4_0(Format):
    """d (f16), qs[16]; x = (q - 8) * d."""
    name, type_id, block_elems, block_bytes, scale_group = "Q4_0", 2, 32, 18, 32

    def quantize(self, w):
        x = as_blocks(w, QK)
        d = signed_absmax(x) / F32(-8)
        q = trunc_codes(x * reciprocal_or_zero(d) + F32(8.5), 15)
        return to_rows([f16_bytes(d), pack_nibbles(q)], w, self)

    def dequantize(self, raw, k):
        n, b = raw_blocks(raw, k, self)
        q = unpack_nibbles(b[:, 2:]) - 8
        return (q.astype(F32) * f16_values(b[:, :2])).reshape(n, k)


class Q4_1(Format):
    """d, m (f16), qs[16]; x = q * d + m."""
    name, type_id, block_elems, block_bytes, float_min = "Q4_1", 3, 32, 20, True
    scale_group = min_group = 32

    def quantize(self, w):
        d, lo, q = minmax_codes(as_blocks(w, QK), 15)
        return to_rows([f16_bytes(d), f16_bytes(lo), pack_nibbles(q)], w, self)

    def dequantize(self, raw, k):
        n, b = raw_blocks(raw, k, self)
        q = unpack_nibbles(b[:, 4:]).astype(F32)
        return (q * f16_values(b[:, 0:2]) + f16_values(b[:, 2:4])).reshape(n, k)


class Q5_0(Format):
    """d (f16), qh[4], qs[16]; x = (q - 16) * d."""
    name, type_id, block_elems, block_bytes, scale_group = "Q5_0", 6, 32, 22, 32

    def quantize(self, w):
        x = as_blocks(w, QK)
        d = signed_absmax(x) / F32(-16)
        q = trunc_codes(x * reciprocal_or_zero(d) + F32(16.5), 31)
        return to_rows([f16_bytes(d), pack_bits(q >> 4), pack_nibbles(q & 15)], w, self)

    def dequantize(self, raw, k):
        n, b = raw_blocks(raw, k, self)
        q = (unpack_nibbles(b[:, 6:]) | (unpack_bits(b[:, 2:6]) << 4)) - 16
        return (q.astype(F32) * f16_values(b[:, :2])).reshape(n, k)


class Q5_1(Format):
    """d, m (f16), qh[4], qs[16]; x = q * d + m."""
    name, type_id, block_elems, block_bytes, float_min = "Q5_1", 7, 32, 24, True
    scale_group = min_group = 32

    def quantize(self, w):
        d, lo, q = minmax_codes(as_blocks(w, QK), 31)
        return to_rows([f16_bytes(d), f16_bytes(lo), pack_bits(q >> 4), pack_nibbles(q & 15)], w, self)

    def dequantize(self, raw, k):
        n, b = raw_blocks(raw, k, self)
        q = (unpack_nibbles(b[:, 8:]) | (unpack_bits(b[:, 4:8]) << 4)).astype(F32)
        return (q * f16_values(b[:, 0:2]) + f16_values(b[:, 2:4])).reshape(n, k)


class Q8_0(Format):
    """d (f16), qs[32] int8; x = q * d."""
    name, type_id, block_elems, block_bytes, scale_group = "Q8_0", 8, 32, 34, 32

    def quantize(self, w):
        x = as_blocks(w, QK)
        d = np.abs(x).max(axis=1, keepdims=True) / F32(127)
        q = round_half_away(x * reciprocal_or_zero(d)).astype(np.int8)
        return to_rows([f16_bytes(d), q.view(np.uint8)], w, self)

    def dequantize(self, raw, k):
        n, b = raw_blocks(raw, k, self)
        q = np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(F32)
        return (q * f16_values(b[:, :2])).reshape(n, k)


def signed_absmax(x: np.ndarray) -> np.ndarray:
    """float32 [B, E] -> [B, 1]: the element of largest magnitude, sign kept (first one on ties)."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)


def round_half_away(v: np.ndarray) -> np.ndarray:
    """C's roundf in float32: nearest integer, halves away from zero. (Adding 0.5 and truncating
    is wrong just below a half: 0.49999997 + 0.5 rounds up to 1.0 in float32.)"""
    a = np.abs(v)
    fl = np.floor(a)
    return np.copysign(fl + (a - fl >= F32(0.5)), v).astype(F32)


for _cls in (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0):
    register(_cls())
