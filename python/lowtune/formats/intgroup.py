"""The papers' uniform asymmetric format INTb-gG: b in {2,3,4,5,6,8} bits, groups of G in
{32,64,128} consecutive inputs of one output row, each with an fp16 scale d and an fp16 min m:
x = d * q + m, q in [0, 2^b - 1].

Block layout (csrc/blocks.h is the C++ side of the same contract): d, m, then for b in {3,5,6}
a high-bit plane, then the low-bit plane.
  4-bit low plane (b = 4, 5, 6): per 32-element chunk c, 16 bytes; byte j holds element 32c+j
      in its low nibble and 32c+j+16 in its high nibble (Q4_1's order: INT4-g32 is Q4_1).
  2-bit low plane (b = 2, 3): per 32-element chunk c, 8 bytes; byte j holds element 32c+j+8s
      at bit 2s, s = 0..3.
  1-bit high plane (b = 3, 5): bit e (byte e//8, bit e%8) is the top bit of element e
      (Q5_1's qh: INT5-g32 is Q5_1).
  2-bit high plane (b = 6): the 2-bit plane order above, holding bits 4..5.
  b = 8: one byte per element.

Quantization is min-max rounding with Q4_1/Q5_1's arithmetic (float32, 1/d taken once,
q = trunc((x - min) * (1/d) + 1/2) clamped to 2^b - 1), so INT4-g32 and INT5-g32 give the same
bytes as Q4_1 and Q5_1.
"""
from __future__ import annotations

import numpy as np

from . import Format, register
from .legacy import (F32, as_blocks, f16_bytes, f16_values, minmax_codes, pack_bits, pack_nibbles,
                     raw_blocks, to_rows, unpack_bits, unpack_nibbles)

BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)


def pack_crumbs(q: np.ndarray) -> np.ndarray:
    """int [B, 32c] in [0, 3] -> uint8 [B, 8c]: per 32-chunk, byte j = sum_s q[j + 8s] << 2s."""
    b, e = q.shape
    q = q.reshape(b, e // 32, 4, 8).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(b, e // 4)


def unpack_crumbs(p: np.ndarray) -> np.ndarray:
    """uint8 [B, 8c] -> int32 [B, 32c], inverse of pack_crumbs."""
    b, n = p.shape
    p = p.reshape(b, n // 8, 1, 8)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((p >> shifts) & 3).reshape(b, 4 * n).astype(np.int32)


class IntFormat(Format):
    float_min = True
    gguf = False  # exported to GGUF as Q4_1 (b <= 4) or Q5_1 (b = 5)

    def __init__(self, bits: int, group: int):
        self.bits, self.group = bits, group
        self.name = f"INT{bits}-g{group}"
        self.type_id = 1000 + 10 * bits + GROUPS.index(group)
        self.block_elems = self.scale_group = self.min_group = group
        self.block_bytes = 4 + group * bits // 8
        self.high_bits = {3: 1, 5: 1, 6: 2}.get(bits, 0)
        self.low_bits = bits - self.high_bits

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def _pack_planes(self, q: np.ndarray) -> list[np.ndarray]:
        low = q & ((1 << self.low_bits) - 1)
        high = q >> self.low_bits
        pack_low = {8: lambda v: v.astype(np.uint8), 4: pack_nibbles, 2: pack_crumbs}[self.low_bits]
        planes = [pack_low(low)]
        if self.high_bits == 1:
            planes.insert(0, pack_bits(high))
        elif self.high_bits == 2:
            planes.insert(0, pack_crumbs(high))
        return planes

    def _unpack_codes(self, planes: np.ndarray) -> np.ndarray:
        high_bytes = self.group * self.high_bits // 8
        high, low = planes[:, :high_bytes], planes[:, high_bytes:]
        q = {8: lambda v: v.astype(np.int32), 4: unpack_nibbles, 2: unpack_crumbs}[self.low_bits](low)
        if self.high_bits == 1:
            q |= unpack_bits(high) << self.low_bits
        elif self.high_bits == 2:
            q |= unpack_crumbs(high) << self.low_bits
        return q

    def quantize(self, w):
        d, lo, q = minmax_codes(as_blocks(w, self.group), self.maxq)
        return to_rows([f16_bytes(d), f16_bytes(lo), *self._pack_planes(q)], w, self)

    def dequantize(self, raw, k):
        n, b = raw_blocks(raw, k, self)
        q = self._unpack_codes(b[:, 4:]).astype(F32)
        return (q * f16_values(b[:, 0:2]) + f16_values(b[:, 2:4])).reshape(n, k)


for _b in BITS:
    for _g in GROUPS:
        register(IntFormat(_b, _g))
