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
"""
from __future__ import annotations

from . import Format, register

BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)


class IntFormat(Format):
    float_min = True
    gguf = False  # exported to GGUF as Q4_1 (b <= 4) or Q5_1 (b = 5)

    def __init__(self, bits: int, group: int):
        self.bits, self.group = bits, group
        self.name = f"INT{bits}-g{group}"
        self.type_id = 1000 + 10 * bits + GROUPS.index(group)
        self.block_elems = group
        self.block_bytes = 4 + group * bits // 8
        self.high_bits = {3: 1, 5: 1, 6: 2}.get(bits, 0)
        self.low_bits = bits - self.high_bits


for _b in BITS:
    for _g in GROUPS:
        register(IntFormat(_b, _g))
