"""GGUF K-quant formats (256-element super-blocks): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

NumPy references written from the format specification (ggml-common.h layouts, ggml-quants.c
reference algorithms).
"""
from __future__ import annotations

from . import Format, register


class Q2_K(Format):
    """scales[16] (4-bit scale | 4-bit min << 4), qs[64], d, dmin; x = d*sc*q - dmin*mn."""
    name, type_id, block_elems, block_bytes = "Q2_K", 10, 256, 84


class Q3_K(Format):
    """hmask[32], qs[64], scales[12] (6-bit, +32), d; x = d*(sc-32)*(q-4*(1-h))."""
    name, type_id, block_elems, block_bytes = "Q3_K", 11, 256, 110


class Q4_K(Format):
    """d, dmin, scales[12] (6-bit scale and min per 32), qs[128]; x = d*sc*q - dmin*mn."""
    name, type_id, block_elems, block_bytes = "Q4_K", 12, 256, 144


class Q5_K(Format):
    """d, dmin, scales[12], qh[32], qs[128]; x = d*sc*q - dmin*mn, q in [0, 31]."""
    name, type_id, block_elems, block_bytes = "Q5_K", 13, 256, 176


class Q6_K(Format):
    """ql[128], qh[64], scales[16] int8, d; x = d*sc*(q-32)."""
    name, type_id, block_elems, block_bytes = "Q6_K", 14, 256, 210


for _cls in (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K):
    register(_cls())
