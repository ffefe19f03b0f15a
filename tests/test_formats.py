"""Block formats: the C++ quantizer/dequantizer, the NumPy references and gguf-py agree to the bit.

Legacy GGUF types (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0) are checked both ways against gguf-py (its quantize
and dequantize are bit-exact with ggml's reference C, research anchors §4.7); K-types, I-quants,
MXFP4, NVFP4, TQ1_0 and TQ2_0 are checked for dequantization (gguf-py has no K quantizer; the other
quantizers, and Q1_0 / Q2_0, which gguf-py lacks, are checked against llama.cpp in test_iquants.py,
test_mxfp4.py, test_nvfp4.py and test_lowbit.py); INTb-gG against our NumPy reference, and
INT4-g32 / INT5-g32 against Q4_1 / Q5_1. Data is fresh every run (fixture `rng` prints its seed).
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import lowtune
from lowtune.formats import FORMATS, get_format

LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
KTYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
IQUANTS = ["IQ4_NL", "IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"]
MX = ["MXFP4", "NVFP4"]  # their quantizers and edge cases: test_mxfp4.py, test_nvfp4.py
LOWBIT = ["TQ1_0", "TQ2_0", "Q1_0", "Q2_0"]  # test_lowbit.py
LOWBIT_IN_GGUF_PY = ["TQ1_0", "TQ2_0"]
INTS = [f.name for f in FORMATS.values() if f.name.startswith("INT")]
QUANTIZED = LEGACY + KTYPES + IQUANTS + MX + LOWBIT + INTS


def gguf_type(name: str):
    return gguf.GGMLQuantizationType[name]


def mixed_weights(rng, n: int, k: int, group: int = 32) -> np.ndarray:
    """float32 [n, k]: Gaussian rows with per-row scales from 1e-6 to 1e3, and (when n allows)
    the cases quantizers get wrong: an all-zero row, a constant row, a row of sign ties
    (+a and -a in one block), rows of tiny (1e-30) values, and outliers."""
    scale = 10.0 ** rng.uniform(-6, 3, size=(n, 1))
    w = (rng.standard_normal((n, k)) * scale).astype(np.float32)
    special = [
        lambda r: np.zeros(k),
        lambda r: np.full(k, rng.standard_normal()),
        lambda r: _ties(rng, k, group),
        lambda r: rng.standard_normal(k) * 1e-30,
        lambda r: np.where(rng.random(k) < 0.05, rng.standard_normal(k) * 50, rng.standard_normal(k) * 0.1),
    ]
    for i, make in enumerate(special[: max(0, n - 1)]):
        w[i + 1] = make(i).astype(np.float32)
    return w


def _ties(rng, k: int, group: int) -> np.ndarray:
    """Each block holds +a and -a as its largest magnitudes (the order decides the sign of d)."""
    v = rng.uniform(-0.5, 0.5, size=(k // group, group))
    a = rng.uniform(1, 2, size=(k // group, 1))
    v[:, 3:4], v[:, 9:10] = a, -a
    flip = rng.random(k // group) < 0.5
    v[flip] = -v[flip]
    return v.reshape(k)


def lt_quantize(w: np.ndarray, name: str) -> np.ndarray:
    return lowtune.quantize(torch.from_numpy(w), name).raw.numpy()


def lt_dequantize(raw: np.ndarray, name: str, k: int, dtype=torch.float32) -> torch.Tensor:
    qt = lowtune.QTensor.from_raw(torch.from_numpy(np.ascontiguousarray(raw)), name, (raw.shape[0], k))
    return lowtune.dequantize(qt, dtype)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))


# ---- legacy types against gguf-py, both ways ---------------------------------------------------

@pytest.mark.parametrize("name", LEGACY)
@pytest.mark.parametrize("n,k", [(1, 32), (1, 96), (6, 160), (9, 4096)])
def test_legacy_quantize_matches_gguf(name, n, k, rng):
    w = mixed_weights(rng, n, k)
    expected = gguf.quants.quantize(w, gguf_type(name))
    assert np.array_equal(get_format(name).quantize(w), expected), "NumPy reference differs from gguf-py"
    assert np.array_equal(lt_quantize(w, name), expected), "C++ quantizer differs from gguf-py"


@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("name", LEGACY)
def test_legacy_quantize_beyond_fp16_range_matches_gguf(name, rng):
    # Scales that overflow fp16 are stored as inf, as ggml does; the codes still follow the fp32 scale.
    w = (rng.standard_normal((3, 64)) * 1e6).astype(np.float32)
    expected = gguf.quants.quantize(w, gguf_type(name))
    assert np.array_equal(get_format(name).quantize(w), expected)
    assert np.array_equal(lt_quantize(w, name), expected)


@pytest.mark.parametrize("name,source", [(t, "quantized") for t in LEGACY] +  # gguf-py has no K quantizer
                         [(t, "random_bytes") for t in LEGACY + KTYPES + IQUANTS + MX + LOWBIT_IN_GGUF_PY])
def test_gguf_types_dequantize_match_gguf(name, source, rng, random_blocks):
    fmt = get_format(name)
    n, k = 5, 3 * fmt.block_elems
    if source == "quantized":
        raw = gguf.quants.quantize(mixed_weights(rng, n, k), gguf_type(name))
    else:
        raw = random_blocks(fmt, n, k, rng)
    expected = gguf.quants.dequantize(raw, gguf_type(name)).astype(np.float32)
    assert same_bits(lt_dequantize(raw, name, k).numpy(), expected), "C++ dequantize differs from gguf-py"
    if name in LEGACY + IQUANTS + MX + LOWBIT_IN_GGUF_PY:
        assert same_bits(fmt.dequantize(raw, k), expected), "NumPy reference differs from gguf-py"


# ---- INTb-gG against the NumPy reference ----------------------------------------------------------

@pytest.mark.parametrize("name", INTS)
def test_int_quantize_matches_reference(name, rng):
    fmt = get_format(name)
    n, k = 6, 3 * fmt.block_elems
    w = mixed_weights(rng, n, k, fmt.block_elems)
    ref = fmt.quantize(w)
    assert ref.shape == (n, fmt.row_bytes(k))
    assert np.array_equal(lt_quantize(w, name), ref), "C++ quantizer differs from the NumPy reference"
    assert same_bits(lt_dequantize(ref, name, k).numpy(), fmt.dequantize(ref, k))


@pytest.mark.parametrize("name", INTS)
def test_int_dequantize_random_blocks_matches_reference(name, rng, random_blocks):
    fmt = get_format(name)
    n, k = 3, 2 * fmt.block_elems
    raw = random_blocks(fmt, n, k, rng)
    assert same_bits(lt_dequantize(raw, name, k).numpy(), fmt.dequantize(raw, k))


@pytest.mark.parametrize("bits,legacy", [(4, "Q4_1"), (5, "Q5_1")])
def test_int_g32_is_legacy_byte_for_byte(bits, legacy, rng, random_blocks):
    w = mixed_weights(rng, 6, 224)
    ours, theirs = get_format(f"INT{bits}-g32"), get_format(legacy)
    expected = gguf.quants.quantize(w, gguf_type(legacy))
    assert np.array_equal(ours.quantize(w), expected)
    assert np.array_equal(lt_quantize(w, f"INT{bits}-g32"), expected)
    raw = random_blocks(theirs, 4, 224, rng)
    assert same_bits(ours.dequantize(raw, 224), gguf.quants.dequantize(raw, gguf_type(legacy)))


@pytest.mark.parametrize("name", INTS)
def test_int_codes_cover_the_full_range(name, rng):
    # A ramp through [0, 2^b - 1] per block: every code appears and survives the round trip.
    fmt = get_format(name)
    levels = np.arange(fmt.block_elems) % (1 << fmt.bits)
    w = np.stack([levels * 0.25 - 3.0, levels[::-1] * 0.5 + 1.0]).astype(np.float32)
    w[:, 0], w[:, 1] = 0.25 * ((1 << fmt.bits) - 1) - 3.0, -3.0  # min and max present in row 0
    w[1, 0], w[1, 1] = 1.0, 0.5 * ((1 << fmt.bits) - 1) + 1.0
    deq = fmt.dequantize(fmt.quantize(w), fmt.block_elems)
    np.testing.assert_allclose(deq, w, rtol=0, atol=2e-3 * np.abs(w).max())


# ---- dequantize to every output dtype --------------------------------------------------------------

@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_to_half_types_rounds_the_f32_result(name, dtype, rng, random_blocks):
    # f16/bf16 output is the f32 value rounded to nearest even: exactly torch's cast of it.
    fmt = get_format(name)
    n, k = 3, 2 * fmt.block_elems
    raw = random_blocks(fmt, n, k, rng)
    f32 = lt_dequantize(raw, name, k)
    assert f32.dtype == torch.float32 and torch.isfinite(f32).all()
    out = lt_dequantize(raw, name, k, dtype)
    assert out.dtype == dtype and out.shape == (n, k)
    assert torch.equal(out.view(torch.int16), f32.to(dtype).view(torch.int16))


# ---- format metadata and references' edges -----------------------------------------------------------

@pytest.mark.parametrize("name", QUANTIZED)
def test_row_bytes_and_bad_row_length(name):
    fmt = get_format(name)
    assert fmt.row_bytes(4 * fmt.block_elems) == 4 * fmt.block_bytes
    with pytest.raises(ValueError, match="multiple of the block size"):
        fmt.row_bytes(fmt.block_elems + 16)


@pytest.mark.parametrize("name", LEGACY + INTS)
def test_reference_handles_zero_rows(name):
    fmt = get_format(name)
    raw = fmt.quantize(np.zeros((0, 2 * fmt.block_elems), np.float32))
    assert raw.shape == (0, fmt.row_bytes(2 * fmt.block_elems))
    assert fmt.dequantize(raw, 2 * fmt.block_elems).shape == (0, 2 * fmt.block_elems)


def test_kernels_and_formats_list_the_same_types():
    # csrc/blocks.h's type list (every switch and instantiation in the C++ expands it) and the
    # formats package must name the same quantized types, with the same block geometry.
    from lowtune import _C
    ours = {f.type_id: f for f in FORMATS.values() if f.quantized}
    assert sorted(_C.type_ids()) == sorted(ours)
    for tid in _C.type_ids():
        assert _C.block_info(tid) == (ours[tid].block_elems, ours[tid].block_bytes), ours[tid].name
    with pytest.raises(ValueError, match="unknown quantization type id 9999"):
        _C.block_info(9999)


def test_reference_rejects_partial_rows():
    fmt = get_format("Q4_0")
    with pytest.raises(ValueError, match="whole rows"):
        fmt.dequantize(np.zeros(19, np.uint8), 32)
    with pytest.raises(ValueError, match="multiple of the block size"):
        fmt.quantize(np.zeros((2, 48), np.float32))


@pytest.mark.parametrize("name,rmse", [("Q4_0", 0.0856), ("Q4_1", 0.0778), ("Q5_0", 0.0426),
                                       ("Q5_1", 0.0377), ("Q8_0", 0.0053)])
def test_gaussian_rmse_matches_ggml(name, rmse, rng):
    # ggml's reference quantizers give these RMSEs on N(0, 1) data (research anchors §7); a
    # rounding or packing slip moves them by far more than the 3% allowed here.
    w = rng.standard_normal((64, 4096)).astype(np.float32)
    err = np.sqrt(np.mean((lt_dequantize(lt_quantize(w, name), name, 4096).numpy() - w) ** 2))
    assert abs(err - rmse) < 0.03 * rmse, err


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantizer_refuses_non_finite_rows(bad):
    # ops.quantize checks first; the C++ entry point refuses on its own too (a NaN scale would
    # silently poison a whole block).
    w = torch.ones(3, 64)
    w[2, 40] = bad
    raw = torch.empty(3, get_format("Q4_0").row_bytes(64), dtype=torch.uint8)
    with pytest.raises(ValueError, match="NaN or inf"):
        lowtune._C.quantize(get_format("Q4_0").type_id, w.data_ptr(), raw.data_ptr(), 3, 64)
    with pytest.raises(ValueError, match="NaN or inf"):
        lowtune.quantize(w, "INT3-g64")
