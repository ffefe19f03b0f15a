"""GGUF's scale-only low-bit formats: TQ1_0 and TQ2_0 (ternary: BitNet b1.58, TriLM), Q1_0, Q2_0.

NumPy references written from the format specification (ggml-common.h's block_tq1_0, block_tq2_0,
block_q1_0, block_q2_0 and ggml-quants.c's dequantize_row_* / quantize_row_*_ref). One fp16 scale d
per block, no min; every value is (code - 1) * d (Q1_0: ±d), float32 as ggml computes it:

    TQ1_0  256 inputs, 54 bytes: qs[48], qh[4], d. Base-3 digits t in {0, 1, 2}, five per qs byte and
           four per qh byte, stored as the fraction ceil(T * 256 / 243) of their number T (the first
           digit the most significant; qh's shifted up one digit); digit n of byte q is
           ((q * 3^n mod 256) * 3) >> 8. Digit n of qs[m] is input 32n + m (m < 32), of qs[32 + m]
           input 160 + 16n + m, of qh[j] input 240 + 4n + j.
    TQ2_0  256 inputs, 66 bytes: qs[64], d; input 128c + 32l + m at bit 2l of qs[32c + m] (code 3,
           never written, reads as 2d).
    Q1_0   128 inputs, 18 bytes: d, qs[16]; bit j % 8 of qs[j / 8] set: +d, else -d.
    Q2_0   64 inputs, 18 bytes: d, qs[16]; input j at bit 2(j % 4) of qs[j / 4], x = (q - 1) * d.

Quantizers: TQ1_0, TQ2_0, Q2_0: d = amax (fp16 stored; codes rounded with the fp32 amax), code =
round(x / amax) + 1, halves away from zero (Q2_0 clamped to 0..3: never 3 in practice). Q1_0: the
sign (x >= 0: +) and d = the block's mean |x|, summed in order. ggml's quantizers take no importance
matrix for any of them. csrc/cpu/quantize_lowbit.cpp is the C++ twin (tests/test_lowbit.py checks
both against llama.cpp's bytes).
"""
from __future__ import annotations

import numpy as np

from . import BlockwiseFormat, register
from .legacy import f16_bytes, f16_values, round_half_away

F32 = np.float32
_POW3 = np.array([1, 3, 9, 27, 81], np.uint8)


def _inverse_amax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The blocks' amax [B] and 1 / amax (0 where amax is 0), float32."""
    amax = np.abs(x).max(axis=1)
    return amax, np.where(amax > 0, F32(1) / np.where(amax > 0, amax, F32(1)), F32(0)).astype(F32)


def _ternary(x: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """round(x / amax) + 1 as int64 codes (inv: [B] 1 / amax)."""
    return round_half_away(x * inv[:, None]).astype(np.int64) + 1


def tq1_digits(q: np.ndarray, count: int) -> np.ndarray:
    """uint8 [..., bytes] -> int64 [..., count, bytes]: digit n of every byte (n the middle axis)."""
    shifted = (q[..., None, :].astype(np.uint32) * _POW3[:count, None]) & 0xFF
    return ((shifted * 3) >> 8).astype(np.int64)


def _tq1_pack(t: np.ndarray, count: int) -> np.ndarray:
    """int64 digits [B, count, bytes] -> uint8 [B, bytes]: ceil(T * 256 / 243), T the digits' number."""
    number = (t * (3 ** (4 - np.arange(count)))[None, :, None]).sum(axis=1)  # qh (count 4): shifted a digit
    return ((number * 256 + 242) // 243).astype(np.uint8)


class TQ1_0(BlockwiseFormat):
    """qs[48], qh[4], d; base-3 digits t as fractions of 256, x = (t - 1) * d."""
    name, type_id, block_elems, block_bytes, scale_group = "TQ1_0", 34, 256, 54, 256

    def _quantize_blocks(self, x):
        amax, inv = _inverse_amax(x)
        t = _ternary(x, inv)
        qs0 = _tq1_pack(t[:, :160].reshape(-1, 5, 32), 5)
        qs1 = _tq1_pack(t[:, 160:240].reshape(-1, 5, 16), 5)
        qh = _tq1_pack(t[:, 240:].reshape(-1, 4, 4), 4)
        return np.concatenate([qs0, qs1, qh, f16_bytes(amax)], axis=1)

    def _dequantize_blocks(self, b):
        t = np.concatenate([tq1_digits(b[:, :32], 5).reshape(-1, 160), tq1_digits(b[:, 32:48], 5).reshape(-1, 80),
                            tq1_digits(b[:, 48:52], 4).reshape(-1, 16)], axis=1)
        return (t - 1).astype(F32) * f16_values(b[:, 52:54])


class TQ2_0(BlockwiseFormat):
    """qs[64], d; input 128c + 32l + m at bit 2l of qs[32c + m], x = (q - 1) * d."""
    name, type_id, block_elems, block_bytes, scale_group = "TQ2_0", 35, 256, 66, 256
    _SHIFTS = np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]

    def _quantize_blocks(self, x):
        amax, inv = _inverse_amax(x)
        q = (_ternary(x, inv) & 3).astype(np.uint8).reshape(-1, 2, 4, 32) << self._SHIFTS
        return np.concatenate([np.bitwise_or.reduce(q, axis=2).reshape(-1, 64), f16_bytes(amax)], axis=1)

    def _dequantize_blocks(self, b):
        q = (b[:, :64].reshape(-1, 2, 1, 32) >> self._SHIFTS) & 3
        return (q.reshape(-1, 256).astype(np.int64) - 1).astype(F32) * f16_values(b[:, 64:66])


class Q1_0(BlockwiseFormat):
    """d, qs[16]; bit j set: x = d, else -d."""
    name, type_id, block_elems, block_bytes, scale_group = "Q1_0", 41, 128, 18, 128

    def _quantize_blocks(self, x):
        sum_abs = np.zeros(x.shape[0], F32)
        for j in range(128):  # ggml sums in order; NumPy's sum is pairwise
            sum_abs = sum_abs + np.abs(x[:, j])
        bits = np.packbits(x >= 0, axis=1, bitorder="little")
        return np.concatenate([f16_bytes(sum_abs / F32(128)), bits], axis=1)

    def _dequantize_blocks(self, b):
        d = f16_values(b[:, :2])
        return np.where(np.unpackbits(b[:, 2:], axis=1, bitorder="little").astype(bool), d, -d)


class Q2_0(BlockwiseFormat):
    """d, qs[16]; input j at bit 2(j % 4) of qs[j / 4], x = (q - 1) * d."""
    name, type_id, block_elems, block_bytes, scale_group = "Q2_0", 42, 64, 18, 64
    _SHIFTS = np.array([0, 2, 4, 6], np.uint8)[None, None, :]

    def _quantize_blocks(self, x):
        amax, inv = _inverse_amax(x)
        q = np.clip(_ternary(x, inv), 0, 3).astype(np.uint8).reshape(-1, 16, 4) << self._SHIFTS
        return np.concatenate([f16_bytes(amax), np.bitwise_or.reduce(q, axis=2)], axis=1)

    def _dequantize_blocks(self, b):
        q = (b[:, 2:, None] >> self._SHIFTS) & 3
        return (q.reshape(-1, 64).astype(np.int64) - 1).astype(F32) * f16_values(b[:, :2])


for _cls in (TQ1_0, TQ2_0, Q1_0, Q2_0):
    register(_cls())
