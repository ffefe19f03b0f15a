"""GGUF I-quant formats: IQ4_NL, IQ4_XS, IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M.

NumPy references written from the format specification (ggml-common.h layouts, ggml-quants.c's
dequantize_row_iq*): codes index fixed tables (iq_grids.py, generated from gguf-py's copies;
csrc/iq_grids.h holds the same numbers for the C++ and CUDA code). Every value is float32
arithmetic in the specification's order, so the results equal ggml's (and gguf-py's) bit for
bit:  IQ4: d*sc * level;  IQ3/IQ2: (d*scale * grid) * sign;  IQ1: d*scale * (grid + delta).

None of them has a min. Inputs sharing one scale (`scale_group`): 32, but 16 for IQ2_XS, IQ2_S
and IQ1_M.

Quantizers: IQ4_NL and IQ4_XS follow ggml's quantize_iq4_nl / quantize_iq4_xs without an
importance matrix (what llama-quantize runs), byte for byte. IQ3_XXS and IQ3_S have a C++
quantizer only (csrc/cpu/quantize_iquants.cpp, tested against llama.cpp's bytes); IQ2_* and IQ1_*
have none (needs_imatrix: ggml quantizes them only with an importance matrix).
"""
from __future__ import annotations

import numpy as np

from . import BlockwiseFormat, register
from . import iq_grids

F32 = np.float32
QK_K = 256
_GROUP_MAX_EPS = F32(1e-15)

KVALUES_IQ4NL = np.array(iq_grids.KVALUES_IQ4NL, np.int8)
KSIGNS_IQ2XS = np.array(iq_grids.KSIGNS_IQ2XS, np.uint8)


def _grid_bytes(values, width: int) -> np.ndarray:
    """A table of grid points as uint8 [points, width]: element j of a point is byte j."""
    return np.array(values, np.uint64 if width == 8 else np.uint32).view(np.uint8).reshape(-1, width)


IQ2XXS_GRID = _grid_bytes(iq_grids.IQ2XXS_GRID, 8)
IQ2XS_GRID = _grid_bytes(iq_grids.IQ2XS_GRID, 8)
IQ2S_GRID = _grid_bytes(iq_grids.IQ2S_GRID, 8)
IQ3XXS_GRID = _grid_bytes(iq_grids.IQ3XXS_GRID, 4)
IQ3S_GRID = _grid_bytes(iq_grids.IQ3S_GRID, 4)
IQ1S_GRID = _grid_bytes(iq_grids.IQ1S_GRID, 8).view(np.int8)  # values -1, 0, 1
IQ1_DELTA = F32(0.125)


# ---- helpers ------------------------------------------------------------------------------------

def _half(b: np.ndarray, offset: int = 0) -> np.ndarray:
    """The fp16 at byte `offset` of every block b [B, bytes] as float32 [B, 1]."""
    return np.ascontiguousarray(b[:, offset:offset + 2]).view("<f2").astype(F32).reshape(-1, 1)


def _u16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<u2").astype(np.int64)


def _u32(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<u4").astype(np.int64)


def _nibbles(b: np.ndarray) -> np.ndarray:
    """uint8 [B, n] -> int64 [B, 2n]: low nibble of each byte, then its high nibble."""
    return np.stack([b & 0xF, b >> 4], axis=-1).reshape(b.shape[0], -1).astype(np.int64)


def _bits(b: np.ndarray) -> np.ndarray:
    """uint8 [B, n] -> {0, 1} [B, 8n], bit j of byte i at 8i + j."""
    return np.unpackbits(np.ascontiguousarray(b), axis=1, bitorder="little")


def _signs(bits: np.ndarray) -> np.ndarray:
    return np.where(bits != 0, F32(-1), F32(1))


def _sign_bytes(aux: np.ndarray) -> np.ndarray:
    """u32 words [B, G] holding four 7-bit sign indices (bits 0-27) -> sign bytes uint8 [B, G*4]."""
    idx = (aux[:, :, None] >> (7 * np.arange(4))) & 127
    return KSIGNS_IQ2XS[idx].reshape(aux.shape[0], -1)


# ---- formats ------------------------------------------------------------------------------------

class IQ4_NL(BlockwiseFormat):
    """d, qs[16] (Q4_0's nibble order); x = d * kvalues_iq4nl[q]."""
    name, type_id, block_elems, block_bytes, scale_group = "IQ4_NL", 20, 32, 18, 32

    def _quantize_blocks(self, x):
        d, L = _iq4_fit(x)
        return np.concatenate([_fp16_bytes(d), _pack_iq4(L)], axis=1)

    def _dequantize_blocks(self, b):
        q = KVALUES_IQ4NL[_iq4_codes(b[:, 2:18])].astype(F32)
        return _half(b) * q


class IQ4_XS(BlockwiseFormat):
    """d, scales_h (u16), scales_l[4], qs[128]; sub-block ib of 32: 6-bit ls (low nibble ib%2 of
    scales_l[ib/2], high bits 2ib..2ib+1 of scales_h), IQ4_NL's nibbles; x = d*(ls-32) * level."""
    name, type_id, block_elems, block_bytes, scale_group = "IQ4_XS", 23, 256, 136, 32

    def _quantize_blocks(self, x):
        nb = x.shape[0]
        sub_d, _ = _iq4_fit(x.reshape(-1, 32))
        scales = sub_d.reshape(nb, 8)
        _, max_scale = _first_absmax(scales)
        d = -max_scale / F32(32)
        inv_d = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0))
        ls = np.clip(_nearest_int(inv_d[:, None] * scales), -32, 31)
        dl = d[:, None] * ls.astype(F32)
        inv_dl = np.where(dl != 0, F32(1) / np.where(dl != 0, dl, F32(1)), F32(0))
        L = _best_index(inv_dl[:, :, None] * x.reshape(nb, 8, 32)).reshape(-1, 32)
        ls = ls + 32
        scales_l = ((ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)).astype(np.uint8)
        scales_h = ((ls >> 4) << (2 * np.arange(8))).sum(axis=1).astype("<u2")
        return np.concatenate([_fp16_bytes(d), scales_h.view(np.uint8).reshape(nb, 2), scales_l,
                               _pack_iq4(L).reshape(nb, 128)], axis=1)

    def _dequantize_blocks(self, b):
        ls = (_nibbles(b[:, 4:8]) | (((_u16(b[:, 2:4]) >> (2 * np.arange(8))) & 3) << 4)) - 32
        dl = _half(b) * ls.astype(F32)
        q = KVALUES_IQ4NL[_iq4_codes(b[:, 8:136])].astype(F32).reshape(-1, 8, 32)
        return (dl[:, :, None] * q).reshape(-1, QK_K)


class IQ3_XXS(BlockwiseFormat):
    """d, qs[64] (iq3xxs_grid indices, 4 elements each), then per 32 a u32 of four 7-bit sign
    indices and the 4-bit scale s (bit 28); x = d*(0.5+s)*0.5 * grid * sign."""
    name, type_id, block_elems, block_bytes, scale_group = "IQ3_XXS", 18, 256, 98, 32

    def _dequantize_blocks(self, b):
        aux = _u32(b[:, 66:98])
        db = _half(b) * (F32(0.5) + (aux >> 28).astype(F32)) * F32(0.5)
        grid = IQ3XXS_GRID[b[:, 2:66]].astype(F32).reshape(-1, 8, 32)
        sign = _signs(_bits(_sign_bytes(aux))).reshape(-1, 8, 32)
        return (db[:, :, None] * grid * sign).reshape(-1, QK_K)


class IQ3_S(BlockwiseFormat):
    """d, qs[64], qh[8], signs[32], scales[4]: 9-bit iq3s_grid indices (bit 8 = bit k of qh[ib]
    for index k of sub-block ib), a sign bit per element, a 4-bit scale s per 32;
    x = d*(1+2s) * grid * sign."""
    name, type_id, block_elems, block_bytes, scale_group = "IQ3_S", 21, 256, 110, 32

    def _dequantize_blocks(self, b):
        idx = b[:, 2:66].astype(np.int64) | (_bits(b[:, 66:74]).astype(np.int64) << 8)
        db = _half(b) * (1 + 2 * _nibbles(b[:, 106:110])).astype(F32)
        grid = IQ3S_GRID[idx].astype(F32).reshape(-1, 8, 32)
        sign = _signs(_bits(b[:, 74:106])).reshape(-1, 8, 32)
        return (db[:, :, None] * grid * sign).reshape(-1, QK_K)


class IQ2_XXS(BlockwiseFormat):
    """d, then per 32 two u32: four iq2xxs_grid indices (bytes; 8 elements each), four 7-bit sign
    indices and the 4-bit scale s (bit 28); x = d*(0.5+s)*0.25 * grid * sign."""
    name, type_id, block_elems, block_bytes, scale_group = "IQ2_XXS", 16, 256, 66, 32
    needs_imatrix = True

    def _dequantize_blocks(self, b):
        q = b[:, 2:66].reshape(-1, 8, 8)
        aux = _u32(q[:, :, 4:8].reshape(-1, 32))
        db = _half(b) * (F32(0.5) + (aux >> 28).astype(F32)) * F32(0.25)
        grid = IQ2XXS_GRID[q[:, :, 0:4]].astype(F32).reshape(-1, 8, 32)
        sign = _signs(_bits(_sign_bytes(aux))).reshape(-1, 8, 32)
        return (db[:, :, None] * grid * sign).reshape(-1, QK_K)


class IQ2_XS(BlockwiseFormat):
    """d, qs[32] (u16: 9-bit iq2xs_grid index, 7-bit sign index per 8 elements), scales[8] (a
    nibble per 16 elements); x = d*(0.5+s)*0.25 * grid * sign."""
    name, type_id, block_elems, block_bytes, scale_group = "IQ2_XS", 17, 256, 74, 16
    needs_imatrix = True

    def _dequantize_blocks(self, b):
        q = _u16(b[:, 2:66])
        db = _half(b) * (F32(0.5) + _nibbles(b[:, 66:74]).astype(F32)) * F32(0.25)
        grid = IQ2XS_GRID[q & 511].astype(F32).reshape(-1, 16, 16)
        sign = _signs(_bits(KSIGNS_IQ2XS[q >> 9])).reshape(-1, 16, 16)
        return (db[:, :, None] * grid * sign).reshape(-1, QK_K)


class IQ2_S(BlockwiseFormat):
    """d, qs[64] (low 8 bits of 10-bit iq2s_grid indices, then a sign byte per 8 elements),
    qh[8] (bits 8-9 of index l of sub-block ib at bit 2l), scales[8] (a nibble per 16);
    x = d*(0.5+s)*0.25 * grid * sign."""
    name, type_id, block_elems, block_bytes, scale_group = "IQ2_S", 22, 256, 82, 16
    needs_imatrix = True

    def _dequantize_blocks(self, b):
        high = (b[:, 66:74, None].astype(np.int64) >> (2 * np.arange(4))) & 3
        idx = b[:, 2:34].astype(np.int64) | (high.reshape(-1, 32) << 8)
        db = _half(b) * (F32(0.5) + _nibbles(b[:, 74:82]).astype(F32)) * F32(0.25)
        grid = IQ2S_GRID[idx].astype(F32).reshape(-1, 16, 16)
        sign = _signs(_bits(b[:, 34:66])).reshape(-1, 16, 16)
        return (db[:, :, None] * grid * sign).reshape(-1, QK_K)


class IQ1_S(BlockwiseFormat):
    """d, qs[32], qh[8] (u16 per 32: 3 high index bits per 8 elements, scale s at bits 12-14,
    delta sign at bit 15); 11-bit iq1s_grid indices, values in {-1, 0, 1};
    x = d*(2s+1) * (grid ± 1/8)."""
    name, type_id, block_elems, block_bytes, scale_group = "IQ1_S", 19, 256, 50, 32
    needs_imatrix = True

    def _dequantize_blocks(self, b):
        qh = _u16(b[:, 34:50])
        idx = b[:, 2:34].astype(np.int64) | ((((qh[:, :, None] >> (3 * np.arange(4))) & 7) << 8).reshape(-1, 32))
        dl = _half(b) * (2 * ((qh >> 12) & 7) + 1).astype(F32)
        delta = np.where(qh & 0x8000, -IQ1_DELTA, IQ1_DELTA)
        grid = IQ1S_GRID[idx].astype(F32).reshape(-1, 8, 32)
        return (dl[:, :, None] * (grid + delta[:, :, None])).reshape(-1, QK_K)


class IQ1_M(BlockwiseFormat):
    """qs[32], qh[16], scales[8]: no d field -- d's fp16 bits are the top nibbles of the four u16
    scale words; their other 12 bits are four 3-bit scales s (one per 16 elements); a qh nibble
    per 8 elements holds index bits 8-10 and the delta sign; x = d*(2s+1) * (grid ± 1/8)."""
    name, type_id, block_elems, block_bytes, scale_group = "IQ1_M", 29, 256, 56, 16
    needs_imatrix = True

    def _dequantize_blocks(self, b):
        sc = _u16(b[:, 48:56])
        d_bits = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0xF0) | ((sc[:, 2] >> 4) & 0xF00) | (sc[:, 3] & 0xF000)
        d = d_bits.astype("<u2").view("<f2").astype(F32).reshape(-1, 1)
        s = ((sc[:, :, None] >> (3 * np.arange(4))) & 7).reshape(-1, 16)
        dl = d * (2 * s + 1).astype(F32)
        h = _nibbles(b[:, 32:48])
        idx = b[:, 0:32].astype(np.int64) | ((h & 7) << 8)
        delta = np.where(h & 8, -IQ1_DELTA, IQ1_DELTA)
        grid = IQ1S_GRID[idx].astype(F32)  # [B, 32, 8]
        return (dl[:, :, None] * (grid + delta[:, :, None]).reshape(-1, 16, 16)).reshape(-1, QK_K)


# ---- IQ4 quantizers (ggml's quantize_row_iq4_nl_impl, no importance matrix, ntry = 7) ------------

def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int on float32: round half to even for |v| < 2^22."""
    bits = (np.asarray(v, F32) + F32(12582912.0)).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _first_absmax(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's `if (|a[j]| > amax) { amax = |a[j]|; max = a[j]; }` over the last axis from 0:
    (amax, the signed value), the first of largest magnitude; an all-zero row gives (0, 0)."""
    mag = np.abs(a)
    i = mag.argmax(axis=-1)[..., None]
    amax = np.take_along_axis(mag, i, axis=-1)[..., 0]
    return amax, np.where(amax > 0, np.take_along_axis(a, i, axis=-1)[..., 0], F32(0))


def _best_index(v: np.ndarray) -> np.ndarray:
    """ggml's best_index_int8 over IQ4_NL's levels: the nearest level, the upper one on a tie."""
    levels = KVALUES_IQ4NL.astype(F32)
    mu = np.clip(np.searchsorted(levels, v, side="right"), 1, 15)
    lower = np.where(v - levels[mu - 1] < levels[mu] - v, mu - 1, mu)
    return np.where(v <= levels[0], 0, np.where(v >= levels[15], 15, lower))


def _sums(x, w, L):
    """Σ w*q*x and Σ w*q*q over the last axis, left to right in float32 (ggml's loop)."""
    q = KVALUES_IQ4NL[L].astype(F32)
    sumqx = np.zeros(x.shape[:-1], F32)
    sumq2 = np.zeros(x.shape[:-1], F32)
    for j in range(x.shape[-1]):
        wq = w[..., j] * q[..., j]
        sumqx = sumqx + wq * x[..., j]
        sumq2 = sumq2 + wq * q[..., j]
    return sumqx, sumq2


def _iq4_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per block of 32 (x [B, 32]): the weighted least-squares scale d [B] over 16 candidate
    scales (max/127, then (t - 127)/max for t in -7..7; weights x²), and the codes L [B, 32]
    of x / d (IQ4_NL's final rounding: with the fp32 d, before d becomes fp16)."""
    w = x * x
    amax, mx = _first_absmax(x)
    zero = amax < _GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    d = -mx / F32(-127)
    L = _best_index((F32(1) / d)[:, None] * x)
    sumqx, sumq2 = _sums(x, w, L)
    d = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, F32(1)), F32(0))
    best = d * sumqx
    for itry in range(-7, 8):
        inv = F32(itry - 127) / mx
        sumqx, sumq2 = _sums(x, w, _best_index(inv[:, None] * x))
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        new_d = sumqx / np.where(sumq2 > 0, sumq2, F32(1))
        d = np.where(better, new_d, d)
        best = np.where(better, new_d * sumqx, best)
    d = np.where(zero, F32(0), d)
    inv_d = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0))
    return d, _best_index(inv_d[:, None] * x)


def _fp16_bytes(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, F32).astype("<f2").view(np.uint8).reshape(-1, 2)


def _pack_iq4(L: np.ndarray) -> np.ndarray:
    """codes [B, 32] -> uint8 [B, 16]: byte j = L[j] | L[j + 16] << 4."""
    return (L[:, :16] | (L[:, 16:] << 4)).astype(np.uint8)


def _iq4_codes(qs: np.ndarray) -> np.ndarray:
    """uint8 [B, 16c] -> codes [B, 32c], inverse of _pack_iq4 per 32 elements."""
    q = qs.reshape(qs.shape[0], -1, 1, 16)
    return np.concatenate([q & 0xF, q >> 4], axis=2).reshape(qs.shape[0], -1).astype(np.int64)


for _cls in (IQ4_NL, IQ4_XS, IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M):
    register(_cls())
