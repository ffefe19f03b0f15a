"""GGUF's MXFP4 (OCP microscaling FP4, gpt-oss's MoE experts): 32 inputs per 17-byte block.

NumPy reference written from the format specification (ggml-common.h's block_mxfp4, ggml-quants.c's
dequantize_row_mxfp4 / quantize_row_mxfp4_ref, ggml-impl.h's GGML_E8M0_TO_FP32_HALF):

    block: e (uint8, an E8M0 power of two), qs[16] (IQ4_NL's nibbles: byte j holds element j low,
           j + 16 high); x = d * kvalues_mxfp4[q], d = 2^(e - 128) (the E8M0 value halved, as the
           16 levels 0, 1, 2, 3, 4, 6, 8, 12, then the same negated, are the E2M1 values doubled;
           e = 0, 1 give the subnormals 2^-128, 2^-127)
    quantize: amax = max |x| of the block; e = floor(log2f(amax)) - 2 + 127 (0 for an all-zero
           block), wrapped to a byte as ggml's cast does on x86 (an amax below 2^-125 gives
           e = 255, 254, ...); each input takes the code whose level * d is nearest, the first
           code on a tie.

log2f is taken as the float32 rounding of the exact log2 (what glibc's log2f gives), not the
float's exponent field: a value just below a power of two rounds up to it (8 - 2^-21 -> 3.0).
No min; one scale per 32 inputs. csrc/cpu/quantize_mxfp4.cpp is the C++ twin (checked against
llama.cpp's bytes in tests/test_mxfp4.py).
"""
from __future__ import annotations

import numpy as np

from . import BlockwiseFormat, register
from . import iq_grids

F32 = np.float32
KVALUES_MXFP4 = np.array(iq_grids.KVALUES_MXFP4, np.int8)


def e8m0_to_fp32_half(e: np.ndarray) -> np.ndarray:
    """float32 2^(e - 128) for uint8 e: bits 0x00200000 << e below e = 2, else (e - 1) << 23."""
    e = np.asarray(e, np.uint32)
    return np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << 23).astype(np.uint32).view(F32)


def log2f_floor(a: np.ndarray) -> np.ndarray:
    """floor(log2f(a)) for positive float32 a, log2f correctly rounded to float32 (int64)."""
    return np.floor(np.log2(a.astype(np.float64)).astype(F32)).astype(np.int64)


class MXFP4(BlockwiseFormat):
    """e (E8M0), qs[16] (IQ4_NL's nibble order); x = 2^(e-128) * kvalues_mxfp4[q]."""
    name, type_id, block_elems, block_bytes, scale_group = "MXFP4", 39, 32, 17, 32

    def _quantize_blocks(self, x):
        amax = np.abs(x).max(axis=1)
        positive = amax > 0
        e = np.where(positive, log2f_floor(np.where(positive, amax, F32(1))) - 2 + 127, 0) & 0xFF
        levels = e8m0_to_fp32_half(e)[:, None] * KVALUES_MXFP4.astype(F32)  # [B, 16]
        codes = np.abs(levels[:, None, :] - x[:, :, None]).argmin(axis=2)  # argmin: the first on a tie
        qs = (codes[:, :16] | (codes[:, 16:] << 4)).astype(np.uint8)
        return np.concatenate([e.astype(np.uint8)[:, None], qs], axis=1)

    def _dequantize_blocks(self, b):
        codes = np.concatenate([b[:, 1:] & 0xF, b[:, 1:] >> 4], axis=1)
        with np.errstate(over="ignore"):  # e >= 253 times the top levels is inf, as in ggml
            return e8m0_to_fp32_half(b[:, 0])[:, None] * KVALUES_MXFP4[codes].astype(F32)


register(MXFP4())
