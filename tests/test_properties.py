"""Property tests: quantization error stays within half a step of each block's grid.

For the min-max formats (Q4_1, Q5_1, every INTb-gG) a block with minimum lo and maximum hi has
step d = (hi - lo) / (2^b - 1) and every value lies on the grid lo + d*q within d/2. What is
stored is d and lo rounded to fp16, which moves grid point q by at most q*|d - d16| + |lo - lo16|
with |v - v16| <= max(|v| 2^-11, 2^-25) (half an fp16 spacing, normal or subnormal), and the
float32 arithmetic of quantizing and dequantizing adds a few float32 roundings of the block's
magnitudes. Hence, per element of a block,

    |x - deq(q(x))| <= d/2 + maxq * h(d) + h(lo) + 8 * 2^-24 * (hi - lo + max|x|),
    h(v) = max(|v| * 2^-11, 2^-25).

Q8_0 is symmetric with d = max|x| / 127 and no clamping: the same bound without the min term.
Values are 0 or of magnitude in [1e-20, 1e4]: the fp16 fields then never overflow, and 1/d never
overflows float32 (ggml's reference has no defined result there).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lowtune
from lowtune.formats import FORMATS, get_format

MINMAX = ["Q4_1", "Q5_1"] + [f.name for f in FORMATS.values() if f.name.startswith("INT")]
U32 = 2.0 ** -24


def half_rounding(v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(v) * 2.0 ** -11, 2.0 ** -25)


def weights(block: int):
    """float32 [rows, block] (one block per row: the bound is per block), values of either sign,
    then scaled by a power of ten, so blocks of tiny or huge values, constant blocks and blocks
    with outliers all appear. Magnitudes below 1e-20 are flushed to 0."""
    def finish(w, e):
        w = (w * np.float32(10.0 ** e)).astype(np.float32)
        w[np.abs(w) < 1e-20] = 0
        return w
    return st.builds(
        finish,
        hnp.arrays(np.float32, st.tuples(st.integers(1, 2), st.just(block)),
                   elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=False)),
        st.integers(-6, 0))


def roundtrip(w: np.ndarray, name: str) -> list[np.ndarray]:
    """deq(q(w)) through the C++ kernels and through the NumPy reference."""
    fmt = get_format(name)
    qt = lowtune.quantize(torch.from_numpy(w), name)
    return [lowtune.dequantize(qt).numpy(), fmt.dequantize(fmt.quantize(w), w.shape[1])]


def check_bound(w: np.ndarray, deq: np.ndarray, bound: np.ndarray, block: int) -> None:
    err = np.abs(w.astype(np.float64) - deq).reshape(-1, block)
    worst = np.argmax((err - bound).max(axis=1))
    assert (err <= bound).all(), (
        f"block {worst}: error {err[worst].max():.6g} > bound {bound[worst, 0]:.6g}; "
        f"block values {w.reshape(-1, block)[worst]}")


@pytest.mark.parametrize("name", MINMAX)
def test_minmax_error_within_half_step(name):
    fmt = get_format(name)
    maxq = (1 << getattr(fmt, "bits", {"Q4_1": 4, "Q5_1": 5}.get(name))) - 1

    @settings(max_examples=40, deadline=None)
    @given(weights(fmt.block_elems))
    def prop(w):
        blocks = w.astype(np.float64).reshape(-1, fmt.block_elems)
        lo, hi = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
        d = (hi - lo) / maxq
        amax = np.abs(blocks).max(axis=1, keepdims=True)
        bound = d / 2 + maxq * half_rounding(d) + half_rounding(lo) + 8 * U32 * (hi - lo + amax)
        for deq in roundtrip(w, name):
            check_bound(w, deq, bound, fmt.block_elems)

    prop()


def test_q8_0_error_within_half_step():
    @settings(max_examples=60, deadline=None)
    @given(weights(32))
    def prop(w):
        blocks = w.astype(np.float64).reshape(-1, 32)
        amax = np.abs(blocks).max(axis=1, keepdims=True)
        d = amax / 127
        bound = d / 2 + 127 * half_rounding(d) + 8 * U32 * amax
        for deq in roundtrip(w, "Q8_0"):
            check_bound(w, deq, bound, 32)

    prop()


@pytest.mark.parametrize("name", MINMAX)
def test_minmax_keeps_block_extremes_and_constants(name):
    # The block minimum is stored as the min (up to fp16 rounding), and a constant block comes
    # back as that constant rounded to fp16: the code is 0 and d is 0.
    fmt = get_format(name)

    @settings(max_examples=25, deadline=None)
    @given(st.floats(-1e4, 1e4, width=32), st.integers(1, 3))
    def prop(c, rows):
        w = np.full((rows, fmt.block_elems), c, np.float32)
        for deq in roundtrip(w, name):
            assert np.array_equal(deq, np.full_like(w, np.float16(c)))

    prop()
