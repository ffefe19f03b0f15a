"""GGUF's NVFP4 (NVIDIA's FP4 checkpoints as llama.cpp converts them): 64 inputs per 36-byte block.

NumPy reference written from the format specification (ggml-common.h's block_nvfp4, ggml-quants.c's
dequantize_row_nvfp4 / quantize_row_nvfp4_ref, ggml-impl.h's ggml_ue4m3_to_fp32 / ggml_fp32_to_ue4m3):

    block: d[4] (uint8, an unsigned E4M3 scale per 16 inputs), qs[32] (8 bytes per sub-block s: byte j
           holds input 16s + j low, 16s + j + 8 high); x = d_s * kvalues_mxfp4[q], d_s the E4M3 value
           halved (MXFP4's levels: the E2M1 values doubled); bit 7 of a scale byte is ignored, 0x7F
           (E4M3's NaN) reads as 0, exponent 0 gives the subnormals man * 2^-10
    quantize: per 16 inputs, the scale byte of amax / 6 (its mantissa rounded by the first dropped bit,
           clamped to 448, 0 for amax = 0); each input takes the code whose level * d is nearest, the
           first code on a tie (MXFP4's rule).

Two-level scales: the per-tensor fp32 scale of NVIDIA's checkpoints is not in the block (llama.cpp
folds it into the scale bytes or keeps it as a separate tensor). No min. csrc/cpu/quantize_fp4.cpp
is the C++ twin (checked against llama.cpp's bytes in tests/test_nvfp4.py).
"""
from __future__ import annotations

import numpy as np

from . import BlockwiseFormat, register
from .mxfp4 import KVALUES_MXFP4

F32 = np.float32


def ue4m3_to_fp32_half(b: np.ndarray) -> np.ndarray:
    """float32 half the unsigned E4M3 value of each uint8 b (ggml_ue4m3_to_fp32)."""
    b = np.asarray(b, np.uint32)
    exp, man = (b >> 3) & 0xF, b & 7
    normal = (((exp + 119) << 23) | (man << 20)).astype(np.uint32).view(F32)
    value = np.where(exp == 0, man.astype(F32) * F32(2.0 ** -10), normal)
    return np.where(b == 0x7F, F32(0), value).astype(F32)


def fp32_to_ue4m3(x: np.ndarray) -> np.ndarray:
    """uint8 E4M3 bits of float32 x as ggml_fp32_to_ue4m3 rounds them (0 for x <= 0)."""
    x = np.minimum(np.asarray(x, F32), F32(448))
    bits = x.view(np.uint32)
    exp = ((bits >> 23) & 0xFF).astype(np.int64) - 127 + 7
    man = ((bits >> 20) & 7).astype(np.int64) + ((bits >> 19) & 1)
    exp, man = np.where(man > 7, exp + 1, exp), np.where(man > 7, 0, man)
    normal = np.where(exp >= 15, 0x7E, (exp << 3) | man)
    sub = np.clip((x * F32(512) + F32(0.5)).astype(np.int64), 0, 7)  # round(x * 2^9), below 2^-6
    out = np.where(((bits >> 23) & 0xFF).astype(np.int64) - 127 + 7 <= 0, sub, normal)
    return np.where(x > 0, out, 0).astype(np.uint8)


class NVFP4(BlockwiseFormat):
    """d[4] (UE4M3 per 16), qs[32]; x = ue4m3_half(d[s]) * kvalues_mxfp4[q]."""
    name, type_id, block_elems, block_bytes, scale_group = "NVFP4", 40, 64, 36, 16

    def _quantize_blocks(self, x):
        sub = x.reshape(-1, 16)
        ue = fp32_to_ue4m3(np.abs(sub).max(axis=1) / F32(6))
        levels = ue4m3_to_fp32_half(ue)[:, None] * KVALUES_MXFP4.astype(F32)  # [S, 16]
        codes = np.abs(levels[:, None, :] - sub[:, :, None]).argmin(axis=2)  # argmin: the first on a tie
        qs = (codes[:, :8] | (codes[:, 8:] << 4)).astype(np.uint8).reshape(-1, 32)
        return np.concatenate([ue.reshape(-1, 4), qs], axis=1)

    def _dequantize_blocks(self, b):
        qs = b[:, 4:].reshape(-1, 8)
        codes = np.concatenate([qs & 0xF, qs >> 4], axis=1)  # [S, 16]
        d = ue4m3_to_fp32_half(b[:, :4].reshape(-1))
        return (d[:, None] * KVALUES_MXFP4[codes].astype(F32)).reshape(-1, 64)


register(NVFP4())
