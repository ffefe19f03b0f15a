"""K-quants (Q2_K..Q6_K): our C++ quantizer, our NumPy reference, gguf-py's dequantizer and
llama.cpp's own quantizer must agree byte for byte (bit for bit after dequantizing).

    C++ quantize  == NumPy quantize                     (every block, many kinds of data)
    C++ / NumPy dequantize == gguf.quants.dequantize    (random blocks and quantized blocks)
    C++ quantize  == ggml_quantize_chunk (llama.cpp)    (Gaussian data and real SmolLM2 weights)
    error on ggml's test-quantize-fns pattern <= the numbers ggml's own test prints
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize

import lowtune
from lowtune.formats import get_format

import ggml_ref

KTYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]

# ggml tests/test-quantize-fns.cpp, `test-quantize-fns -v` on ggml d99724f: sqrt(Σ err²)/n on
# 4096 values 0.1 + 2 cos(i), printed to 6 decimals (research anchors §7).
GGML_PATTERN_ERROR = {"Q2_K": 0.004672, "Q3_K": 0.002510, "Q4_K": 0.000982, "Q5_K": 0.000531, "Q6_K": 0.000261}


def cpp_quantize(w: np.ndarray, qtype: str) -> np.ndarray:
    return lowtune.quantize(torch.from_numpy(np.ascontiguousarray(w, np.float32)), qtype).raw.numpy()


def cpp_dequantize(raw: np.ndarray, qtype: str, k: int) -> np.ndarray:
    qt = lowtune.QTensor.from_raw(raw, qtype, (raw.shape[0], k))
    return lowtune.dequantize(qt, torch.float32).numpy()


def gguf_deq(raw: np.ndarray, qtype: str, k: int) -> np.ndarray:
    return gguf_dequantize(raw, GGMLQuantizationType[qtype]).reshape(raw.shape[0], k)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(np.ascontiguousarray(a, np.float32).view(np.uint32),
                                                 np.ascontiguousarray(b, np.float32).view(np.uint32))


def block_identity(a: np.ndarray, b: np.ndarray, qtype: str) -> float:
    """Fraction of blocks whose bytes are equal."""
    bb = get_format(qtype).block_bytes
    return float((a.reshape(-1, bb) == b.reshape(-1, bb)).all(axis=1).mean())


def mixed_rows(rng: np.random.Generator, n: int = 48, k: int = 1024) -> np.ndarray:
    """Gaussian rows at several scales plus the rows that take special paths: all zero, constant
    (positive and negative), a single huge outlier, integer and half-integer values (rounding
    ties), sparse rows, all-positive rows and tiny values (fp16 subnormal scales)."""
    w = rng.standard_normal((n, k)) * rng.choice([1e-3, 0.02, 1.0, 30.0], size=(n, 1))
    w[0] = 0.0
    w[1] = 0.37
    w[2] = -1.5
    w[3, 300] = 1e4
    w[4] = rng.integers(-8, 8, k)
    w[5] = rng.integers(-16, 16, k) / 2
    w[6] *= rng.random(k) < 0.05
    w[7] = np.abs(w[7]) + 3.0
    w[8] *= 1e-7
    w[9, :256] = 0.0  # one all-zero super-block inside a normal row
    w[10, 16:32] = 0.0  # one all-zero sub-block
    return w.astype(np.float32)


def ggml_pattern() -> np.ndarray:
    """test-quantize-fns' data: float(0.1 + 2*cosf(i)), i = 0..4095, as one row."""
    c = np.cos(np.arange(4096, dtype=np.float32).astype(np.float64)).astype(np.float32)
    return (0.1 + 2.0 * c.astype(np.float64)).astype(np.float32)[None, :]


# ---- dequantize --------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", KTYPES)
def test_dequantize_random_blocks_bit_identical_to_gguf(qtype):
    rng = np.random.default_rng(1)
    fmt = get_format(qtype)
    n, k = 16, 2048
    raw = rng.integers(0, 256, (n * k // 256, fmt.block_bytes), dtype=np.uint8)
    # fp16 scale fields: random finite halves (subnormals included), so every output is finite.
    halves = rng.integers(0, 0x7C00, (raw.shape[0], 2), dtype=np.uint16) | (rng.integers(0, 2, (raw.shape[0], 2), dtype=np.uint16) << 15)
    offsets = {"Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}[qtype]
    for j, off in enumerate(offsets):
        raw[:, off:off + 2] = halves[:, j:j + 1].view(np.uint8)
    raw = raw.reshape(n, -1)
    ref = gguf_deq(raw, qtype, k)
    assert np.isfinite(ref).all()
    assert same_bits(fmt.dequantize(raw, k), ref)
    assert same_bits(cpp_dequantize(raw, qtype, k), ref)


@pytest.mark.parametrize("qtype", KTYPES)
def test_dequantize_quantized_blocks_bit_identical_to_gguf(qtype):
    w = mixed_rows(np.random.default_rng(2))
    raw = cpp_quantize(w, qtype)
    ref = gguf_deq(raw, qtype, w.shape[1])
    assert same_bits(get_format(qtype).dequantize(raw, w.shape[1]), ref)
    assert same_bits(cpp_dequantize(raw, qtype, w.shape[1]), ref)
    for dtype in (torch.bfloat16, torch.float16):  # the narrower outputs round the same floats
        qt = lowtune.QTensor.from_raw(raw, qtype, w.shape)
        assert torch.equal(lowtune.dequantize(qt, dtype), torch.from_numpy(ref).to(dtype))


# ---- quantize: C++ against the NumPy reference --------------------------------------------------

@pytest.mark.parametrize("qtype", KTYPES)
def test_cpp_quantize_equals_numpy_reference(qtype):
    rng = np.random.default_rng(3)
    w = np.concatenate([mixed_rows(rng), rng.laplace(size=(16, 1024)).astype(np.float32),
                        np.repeat(ggml_pattern().reshape(4, 1024), 2, axis=0)])
    ours = cpp_quantize(w, qtype)
    ref = get_format(qtype).quantize(w)
    assert ours.shape == ref.shape == (w.shape[0], get_format(qtype).row_bytes(w.shape[1]))
    bad = np.nonzero((ours != ref).any(axis=1))[0]
    assert bad.size == 0, f"{qtype}: rows {bad[:10]} differ between C++ and NumPy"


@pytest.mark.parametrize("qtype", KTYPES)
def test_quantize_roundtrip_error_is_that_of_the_format(qtype):
    """Gaussian rows: RMSE of ggml's reference quantizers (anchors §7, 64x4096 N(0,1)), ±3%."""
    expected = {"Q2_K": 0.2950, "Q3_K": 0.1499, "Q4_K": 0.0710, "Q5_K": 0.0360, "Q6_K": 0.0176}[qtype]
    w = np.random.default_rng(4).standard_normal((32, 4096)).astype(np.float32)
    deq = cpp_dequantize(cpp_quantize(w, qtype), qtype, 4096)
    rmse = float(np.sqrt(np.mean((deq.astype(np.float64) - w) ** 2)))
    assert abs(rmse - expected) < 0.03 * expected, f"{qtype}: RMSE {rmse:.4f}, ggml's is {expected}"


# ---- the error table of ggml's own test ---------------------------------------------------------

@pytest.mark.parametrize("qtype", KTYPES)
def test_error_on_ggml_pattern_matches_ggml_table(qtype):
    x = ggml_pattern()
    for raw in (cpp_quantize(x, qtype), get_format(qtype).quantize(x)):
        deq = cpp_dequantize(raw, qtype, x.shape[1]).astype(np.float64)
        err = np.sqrt(np.sum((deq - x) ** 2)) / x.size
        assert err <= GGML_PATTERN_ERROR[qtype] + 5e-7, f"{qtype}: error {err:.7f} > ggml's {GGML_PATTERN_ERROR[qtype]}"


# ---- special rows and bad input -----------------------------------------------------------------

@pytest.mark.parametrize("qtype", KTYPES)
def test_special_rows(qtype):
    k = 512
    w = np.zeros((4, k), np.float32)
    w[1] = 0.37
    w[2] = -0.37
    w[3] = np.random.default_rng(5).standard_normal(k).astype(np.float32) * 0.02
    w[3, 77] = 100.0
    raw = cpp_quantize(w, qtype)
    assert np.array_equal(raw, get_format(qtype).quantize(w))
    deq = cpp_dequantize(raw, qtype, k)
    assert np.isfinite(deq).all()
    assert np.array_equal(deq[0], np.zeros(k, np.float32)), "an all-zero row must come back exactly zero"
    if qtype == "Q6_K":
        assert not raw[0].any(), "Q6_K writes an all-zero super-block as zero bytes"
    np.testing.assert_allclose(deq[1:3], w[1:3], rtol=1e-3)  # constant rows: only fp16/6-bit scale rounding
    assert abs(deq[3, 77] - 100.0) < 0.05, "the outlier itself survives"
    # The outlier's super-block pays for it; the other one is quantized as if alone.
    fmt = get_format(qtype)
    assert np.array_equal(raw[3, fmt.block_bytes:], cpp_quantize(w[3:4, 256:], qtype)[0])
    err = np.abs(deq[3] - w[3])
    assert err[256:].max() < np.delete(err[:256], 77).max()


@pytest.mark.parametrize("qtype", KTYPES)
def test_bad_input_is_a_clear_value_error(qtype):
    fmt = get_format(qtype)
    with pytest.raises(ValueError, match="multiple of the block size 256"):
        lowtune.quantize(torch.randn(4, 576), qtype)
    with pytest.raises(ValueError, match="multiple of the block size 256"):
        fmt.quantize(np.zeros((4, 576), np.float32))
    with pytest.raises(ValueError, match="multiple of the block size 256"):
        fmt.dequantize(np.zeros((4, 100), np.uint8), 576)
    with pytest.raises(ValueError, match="NaN or inf"):
        fmt.quantize(np.full((1, 256), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        fmt.quantize(np.zeros(256, np.float32))
    with pytest.raises(ValueError, match=r"raw must be uint8 \[N, "):
        fmt.dequantize(np.zeros((2, 10), np.uint8), 256)


# ---- against llama.cpp's own quantizer ----------------------------------------------------------

@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", KTYPES)
def test_quantize_matches_llamacpp_on_random_data(qtype):
    rng = np.random.default_rng(6)
    w = np.concatenate([rng.standard_normal((64, 4096)).astype(np.float32), mixed_rows(rng, 16, 4096),
                        ggml_pattern()])
    theirs = ggml_ref.quantize(w, get_format(qtype).type_id)
    ours = cpp_quantize(w, qtype)
    frac = block_identity(ours, theirs, qtype)
    print(f"{qtype}: {100 * frac:.2f}% of {ours.size // get_format(qtype).block_bytes} blocks byte-identical to llama.cpp")
    assert frac >= 0.99, f"{qtype}: only {100 * frac:.2f}% of blocks equal llama.cpp's"
    assert block_identity(get_format(qtype).quantize(w[::8]), theirs[::8], qtype) >= 0.99


def smollm2_matrices(path) -> dict[str, np.ndarray]:
    """Real weights, dequantized from the Q4_1 GGUF: the ffn_down matrices (K = 1536, a multiple
    of 256) as they are, and a few others reshaped into rows of a multiple of 256."""
    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}

    def floats(name, rows=None):
        t = tensors[name]
        data = t.data[:rows]
        return gguf_dequantize(data, t.tensor_type).reshape(data.shape[0], -1).astype(np.float32)

    out = {f"blk.{i}.ffn_down": floats(f"blk.{i}.ffn_down.weight") for i in (0, 15, 29)}
    out["blk.7.ffn_gate (as rows of 2304)"] = floats("blk.7.ffn_gate.weight").reshape(-1, 2304)
    out["blk.20.attn_q (as rows of 2304)"] = floats("blk.20.attn_q.weight").reshape(-1, 2304)
    out["blk.3.attn_k (as rows of 768)"] = floats("blk.3.attn_k.weight").reshape(-1, 768)
    out["token_embd[:2048] (as rows of 4608)"] = floats("token_embd.weight", 2048).reshape(-1, 4608)
    return out


@pytest.fixture(scope="module")
def smollm2_weights(smollm2_path):
    return smollm2_matrices(smollm2_path)


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", KTYPES)
def test_quantize_matches_llamacpp_on_smollm2(qtype, smollm2_weights):
    fmt = get_format(qtype)
    equal = total = 0
    for name, w in smollm2_weights.items():
        ours, theirs = cpp_quantize(w, qtype), ggml_ref.quantize(w, fmt.type_id)
        blocks = ours.size // fmt.block_bytes
        equal += round(block_identity(ours, theirs, qtype) * blocks)
        total += blocks
    frac = equal / total
    print(f"{qtype}: {100 * frac:.3f}% of {total} SmolLM2 blocks byte-identical to llama.cpp")
    assert frac >= 0.99, f"{qtype}: only {100 * frac:.2f}% of SmolLM2 blocks equal llama.cpp's"
    # The NumPy reference on one matrix of real weights.
    w = smollm2_weights["blk.0.ffn_down"][:128]
    assert np.array_equal(fmt.quantize(w), cpp_quantize(w, qtype))
