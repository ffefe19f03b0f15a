"""llama.cpp's rounding of activations (lowtune.llamacpp_activations) against ggml's own quantizers
(quantize_row_q8_0_ref, _q8_1_ref, _q8_K_ref in llama-cpp-python's libggml-base), and the
evaluation mode of lowtune.ops.qmatmul that applies it."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

import lowtune
from lowtune import ops
from lowtune.formats import get_format
from lowtune.llamacpp_activations import activation_format, round_activations, rounded_like_llamacpp

import ggml_ref
from helpers import gguf_weights  # noqa: F401  (the helpers module sets up the path for ggml_ref)

# block layouts (ggml-common.h): bytes per block, offset of the int8 codes, block size
LAYOUT = {"Q8_0": (34, 2, 32), "Q8_1": (36, 4, 32), "Q8_K": (292, 4, 256)}


def ggml_rounded(x: np.ndarray, kind: str) -> np.ndarray:
    """ggml's reference quantization of the rows of x to `kind`, decoded back to float32."""
    lib = ggml_ref._ggml_base()
    fn = getattr(lib, f"quantize_row_{kind.lower().replace('q8_k', 'q8_K')}_ref")
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    nbytes, codes, block = LAYOUT[kind]
    x = np.ascontiguousarray(x, dtype=np.float32)
    blocks = x.size // block
    out = np.zeros(blocks * nbytes, dtype=np.uint8)
    fn(x.ctypes.data, out.ctypes.data, x.size)
    b = out.reshape(blocks, nbytes)
    q = b[:, codes:codes + block].view(np.int8).astype(np.float32)
    d = b[:, :4].copy().view(np.float32) if kind == "Q8_K" else b[:, :2].copy().view(np.float16).astype(np.float32)
    return (d * q).reshape(x.shape)


def sample(rows: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)).astype(np.float32) * rng.uniform(0.01, 30, (rows, 1)).astype(np.float32)
    x[0, :] = 0                     # a zero row: d = 0
    x[1, 5] = 1e4                   # one outlier sets the block's scale
    x[2, 7] = -50                   # a negative extreme: Q8_K takes its sign
    return x


@pytest.mark.llamacpp
@pytest.mark.parametrize("weight,kind", [("Q4_0", "Q8_0"), ("Q4_1", "Q8_1"), ("IQ4_NL", "Q8_0"),
                                         ("Q4_K", "Q8_K"), ("IQ4_XS", "Q8_K"), ("IQ2_XS", "Q8_K")])
def test_rounding_is_ggmls(weight, kind):
    if not ggml_ref.available():
        pytest.skip("llama-cpp-python is not installed")
    fmt = get_format(weight)
    assert activation_format(fmt) == kind
    x = sample(6, 1024)
    got = round_activations(torch.from_numpy(x), fmt).numpy()
    want = ggml_rounded(x, kind)
    assert not np.array_equal(got, x)                          # it rounds
    if kind == "Q8_K":                                         # same formula, same ties: bit for bit
        np.testing.assert_array_equal(got, want)
    else:
        # the AVX2 quantizer lowtune follows multiplies by 127/max where the reference multiplies by
        # 1/(max/127) and rounds ties to even: a value in ten thousand may land one step over
        step = np.repeat(np.abs(want).reshape(-1, 32).max(1, keepdims=True) / 127, 32, axis=1).reshape(x.shape)
        off = got != want
        assert off.mean() < 1e-3
        assert np.all(np.abs(got - want)[off] <= step[off] * 1.01)


def test_qmatmul_rounds_only_inside_the_block():
    torch.manual_seed(0)
    w = torch.randn(48, 256)
    x = torch.randn(3, 256)
    for name in ("Q4_K", "Q4_1", "IQ4_NL", "F16"):
        qt = lowtune.quantize(w, name)
        plain = ops.qmatmul(x, qt)
        with rounded_like_llamacpp():
            rounded = ops.qmatmul(x, qt)
        torch.testing.assert_close(ops.qmatmul(x, qt), plain, rtol=0, atol=0)       # mode left
        want = ops.qmatmul(round_activations(x, qt.format), qt)
        torch.testing.assert_close(rounded, want, rtol=0, atol=0)
        assert not torch.equal(rounded, plain)


def test_the_mode_refuses_gradients_and_types_llamacpp_lacks():
    qt = lowtune.quantize(torch.randn(32, 256), "Q4_K")
    x = torch.randn(2, 256, requires_grad=True)
    with rounded_like_llamacpp(), pytest.raises(ValueError, match="for evaluation"):
        ops.qmatmul(x, qt)
    with torch.no_grad(), rounded_like_llamacpp():
        ops.qmatmul(x, qt)                                    # no gradient wanted: fine
    with pytest.raises(ValueError, match="no INT4-g64 weights"):
        round_activations(torch.randn(2, 128), get_format("INT4-g64"))
