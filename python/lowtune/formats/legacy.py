"""GGUF legacy block formats (32 elements per block): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

NumPy references written from the format specification. Nibble order: byte j of qs holds
element j (low nibble) and element j+16 (high nibble); Q5's fifth bits are the little-endian
u32 qh, bit j for element j.
"""
from __future__ import annotations

from . import Format, register


class Q4_0(Format):
    """d (f16), qs[16]; x = (q - 8) * d."""
    name, type_id, block_elems, block_bytes = "Q4_0", 2, 32, 18


class Q4_1(Format):
    """d, m (f16), qs[16]; x = q * d + m."""
    name, type_id, block_elems, block_bytes, float_min = "Q4_1", 3, 32, 20, True


class Q5_0(Format):
    """d (f16), qh[4], qs[16]; x = (q - 16) * d."""
    name, type_id, block_elems, block_bytes = "Q5_0", 6, 32, 22


class Q5_1(Format):
    """d, m (f16), qh[4], qs[16]; x = q * d + m."""
    name, type_id, block_elems, block_bytes, float_min = "Q5_1", 7, 32, 24, True


class Q8_0(Format):
    """d (f16), qs[32] int8; x = q * d."""
    name, type_id, block_elems, block_bytes = "Q8_0", 8, 32, 34


for _cls in (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0):
    register(_cls())
