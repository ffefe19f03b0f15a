"""MXFP4 (GGUF type 39, gpt-oss's MoE experts): lowtune's C++, its NumPy reference, gguf-py and
llama.cpp agree, and the kernels compute with it.

    E8M0 scales: every byte's 2^(e-128), the subnormals e = 0, 1 included
    dequantize: C++ (fast and reference twins) == NumPy == gguf-py, bit for bit, every scale byte
    quantize: C++ == NumPy == gguf-py == llama.cpp's quantize_row_mxfp4_ref, byte for byte, on
        Gaussian rows at scales 1e-30..1e30, zeros, subnormal and huge blocks, values just below
        and at every power of two, and ties between levels
    qmatmul forward / input gradient (CPU; CUDA under the cuda marker) against float64
    GGUF: written and read back as type 39 (2-D and a 3-D expert stack), read by gguf-py
The parametrized suites cover it too: test_formats.py, test_ops_cpu.py and test_cuda.py (every
format of lowtune.formats).
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import lowtune
from lowtune import _C
from lowtune.formats import get_format, iq_grids
from lowtune.formats.mxfp4 import e8m0_to_fp32_half
from lowtune.gguf_io import GGUFFile, main_file_type, write_gguf

import ggml_ref
from helpers import (assert_logits_match_llamacpp, check_cuda_products_match_cpu, check_products_against_float64,
                     max_rel_err)

MX = get_format("MXFP4")
GGUF_MX = gguf.GGMLQuantizationType.MXFP4


def cpp_quantize(w: np.ndarray) -> np.ndarray:
    return lowtune.quantize(torch.from_numpy(np.ascontiguousarray(w, np.float32)), "MXFP4").raw.numpy()


def qtensor(raw: np.ndarray, k: int) -> lowtune.QTensor:
    return lowtune.QTensor.from_raw(torch.from_numpy(np.ascontiguousarray(raw)), "MXFP4", (raw.shape[0], k))


def cpp_dequantize(raw: np.ndarray, k: int) -> np.ndarray:
    return lowtune.dequantize(qtensor(raw, k), torch.float32).numpy()


def gguf_dequantize(raw: np.ndarray, k: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        return gguf.quants.dequantize(raw, GGUF_MX).reshape(raw.shape[0], k)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(np.ascontiguousarray(a, np.float32).view(np.uint32),
                                                 np.ascontiguousarray(b, np.float32).view(np.uint32))


def hard_rows(rng) -> np.ndarray:
    """float32 [n, 64] (two blocks a row) of the cases the scale and the rounding can get wrong."""
    p = np.ldexp(np.float32(1), np.arange(-149, 128)).astype(np.float32)  # every power of two
    below = np.nextafter(p, np.float32(0))  # log2f rounds some of these up to the power itself
    rows = []
    for amax in np.concatenate([p, below, -p[::7], -below[::5]]):
        r = rng.standard_normal(64).astype(np.float32) * np.float32(abs(amax) / 4)
        r[rng.integers(0, 32)] = amax
        r[32 + rng.integers(0, 32)] = amax
        rows.append(np.clip(r, -abs(amax), abs(amax)))
    ties = np.zeros(64, np.float32)  # amax 8: the level unit is 1, so halves are ties
    ties[:17] = [8, 0.5, 1.5, 2.5, 3.5, 5, 7, 10, -0.5, -1.5, -2.5, -3.5, -5, -7, -10, 14, -0.25]
    ties[32:49] = -ties[:17]
    rows += [ties, np.zeros(64, np.float32), np.full(64, 1e-40, np.float32), np.full(64, -3e38, np.float32)]
    scaled = rng.standard_normal((40, 64)) * 10.0 ** rng.uniform(-30, 30, size=(40, 1))
    return np.concatenate([np.stack(rows), scaled.astype(np.float32)])


# ---- table and scale -------------------------------------------------------------------------------

def test_levels_and_e8m0_scales():
    # ggml-common.h's kvalues_mxfp4, and GGML_E8M0_TO_FP32_HALF for every byte: 2^(e - 128)
    assert iq_grids.KVALUES_MXFP4 == (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
    e = np.arange(256, dtype=np.uint8)
    assert np.array_equal(e8m0_to_fp32_half(e).astype(np.float64), np.ldexp(1.0, e.astype(np.int64) - 128))
    assert same_bits(e8m0_to_fp32_half(e), gguf.quants.MXFP4.e8m0_to_fp32_half(e))
    # the C++ scale, read through a block of code 1 (level 1) for each byte
    raw = np.zeros((256, 17), np.uint8)
    raw[:, 0], raw[:, 1:] = e, 0x11
    assert same_bits(cpp_dequantize(raw.reshape(1, -1), 256 * 32).reshape(256, 32)[:, 0], e8m0_to_fp32_half(e))
    assert MX.block_bytes == 17 and MX.block_elems == 32 and _C.block_info(39) == (32, 17)


# ---- dequantize ---------------------------------------------------------------------------------------

def test_dequantize_matches_gguf_py_for_every_scale_byte(rng):
    raw = rng.integers(0, 256, size=(256, 3 * 17), dtype=np.uint8)
    raw[:, 0] = np.arange(256)  # each scale byte once, with e >= 253 overflowing to inf as in ggml
    expected = gguf_dequantize(raw, 96)
    assert np.isinf(expected[253:]).any() and (expected[:2, :32] != 0).any()  # overflow and subnormals seen
    assert same_bits(cpp_dequantize(raw, 96), expected), "C++ dequantize differs from gguf-py"
    assert same_bits(MX.dequantize(raw, 96), expected), "NumPy reference differs from gguf-py"


def test_fast_dequantize_matches_its_slow_twin(rng, random_blocks):
    # lowtune.dequantize takes the vectorized per-block decoder (dequant_block.h); the reference
    # product dequantizes with block_math.h's Traits: an identity X reads W back through it.
    k = 4 * 32
    raw = random_blocks(MX, 7, k, rng)
    w = np.zeros((k, k), np.float32)
    np.fill_diagonal(w, 1.0)
    y = np.full((k, 7), np.nan, np.float32)
    x = torch.from_numpy(w)
    raw_t = torch.from_numpy(raw)
    out = torch.from_numpy(y)
    _C.qmatmul_forward_reference(39, x.data_ptr(), 0, raw_t.data_ptr(), out.data_ptr(), k, 7, k)
    assert same_bits(out.numpy().T, cpp_dequantize(raw, k))


# ---- quantize -----------------------------------------------------------------------------------------

def test_quantize_matches_numpy_and_gguf_py(rng):
    w = hard_rows(rng)
    ours = cpp_quantize(w)
    assert ours.shape == (w.shape[0], 2 * 17)
    assert np.array_equal(ours, MX.quantize(w)), "C++ quantizer differs from the NumPy reference"
    with np.errstate(all="ignore"):
        assert np.array_equal(ours, gguf.quants.quantize(w, GGUF_MX)), "C++ quantizer differs from gguf-py"


@pytest.mark.llamacpp
def test_quantize_matches_llamacpp(rng):
    w = np.concatenate([hard_rows(rng), rng.standard_normal((32, 64)).astype(np.float32)])
    theirs = ggml_ref.quantize(w, 39)
    ours = cpp_quantize(w)
    bad = np.flatnonzero((ours.reshape(-1, 17) != theirs.reshape(-1, 17)).any(axis=1))
    assert bad.size == 0, f"{bad.size} blocks differ from llama.cpp's, first {bad[:5]}"


def test_quantize_edges_and_round_trip(rng):
    # the tie row of hard_rows: the smaller magnitude wins, and code 8 ("-0") is never written
    w = np.zeros((1, 32), np.float32)
    w[0, :8] = [8, 0.5, 1.5, -2.5, 5, -7, 10, -0.25]
    raw = cpp_quantize(w)
    assert raw[0, 0] == 128  # 2^(3 - 2) stored, level unit 1
    assert np.array_equal(cpp_dequantize(raw, 32)[0, :8], [8, 0, 1, -2, 4, -6, 8, -0.0])
    codes = np.concatenate([raw[:, 1:] & 15, raw[:, 1:] >> 4], axis=1)
    assert not (codes == 8).any()
    # an all-zero block: e = 0 and zero codes
    assert not cpp_quantize(np.zeros((2, 64), np.float32)).any()
    # relative RMS error on N(0, 1): E2M1 with a power-of-two scale (measured over six seeds:
    # 0.114-0.117); a wrong scale exponent or level table moves it far more
    g = rng.standard_normal((16, 1024)).astype(np.float32)
    err = np.linalg.norm(cpp_dequantize(cpp_quantize(g), 1024) - g) / np.linalg.norm(g)
    assert 0.105 < err < 0.125, err


# ---- products -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("m", [1, 3, 70])
def test_qmatmul_and_input_grad_match_float64(m, rng):
    k = 13 * 32  # 13 blocks: odd row bytes (221), so blocks start at odd addresses
    check_products_against_float64("MXFP4", 45, k, m, rng)
    # 16-bit activations: the output rounded once more
    w = rng.standard_normal((45, k)).astype(np.float32) * np.float32(0.03)
    qt = lowtune.quantize(torch.from_numpy(w), "MXFP4")
    x = rng.standard_normal((m, k)).astype(np.float32)
    y64 = torch.from_numpy(x.astype(np.float64) @ MX.dequantize(qt.raw.numpy(), k).astype(np.float64).T)
    yb = lowtune.qmatmul(torch.from_numpy(x).to(torch.bfloat16), qt)
    assert yb.dtype == torch.bfloat16 and max_rel_err(yb, y64) < 2e-2


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["", "staged", "direct", "cublas"])
@pytest.mark.parametrize("m", [1, 7, 24, 40])
def test_cuda_products_match_cpu(path, m, rng, monkeypatch):
    # every CUDA path that takes the shape (staged: M <= 16, direct: M <= 32; otherwise the
    # default); odd row bytes (45 blocks: 765 bytes)
    monkeypatch.setenv("LOWTUNE_CUDA_PATH", path)
    check_cuda_products_match_cpu("MXFP4", 130, 45 * 32, m, rng)


# ---- GGUF ---------------------------------------------------------------------------------------------

def test_gguf_round_trip(tmp_path, rng):
    w2 = rng.standard_normal((6, 64)).astype(np.float32)
    experts = rng.standard_normal((4 * 8, 96)).astype(np.float32)  # [n_expert, N, K] as gpt-oss's _exps
    q2, qe = lowtune.quantize(torch.from_numpy(w2), "MXFP4"), lowtune.quantize(torch.from_numpy(experts), "MXFP4")
    out = tmp_path / "mx.gguf"
    write_gguf(out, {"general.architecture": "llama"},
               [("blk.0.attn_q.weight", q2), ("blk.0.ffn_up_exps.weight", (qe, (4, 8, 96))),
                ("blk.0.attn_norm.weight", torch.ones(64))])
    with GGUFFile(out) as f:
        assert f.metadata["general.file_type"] == 38  # LLAMA_FTYPE_MOSTLY_MXFP4_MOE
        info = f.tensor_infos["blk.0.ffn_up_exps.weight"]
        assert info.type is MX and info.type_id == 39 and info.type_name == "MXFP4"
        assert info.ne == (96, 8, 4) and info.nbytes == 4 * 8 * 3 * 17
        back = f.tensor("blk.0.attn_q.weight")
        assert back.format is MX and back.shape == (6, 64) and torch.equal(back.raw, q2.raw)
        assert torch.equal(f.raw("blk.0.ffn_up_exps.weight"), qe.raw.reshape(-1))
    r = gguf.GGUFReader(out)
    t = {t.name: t for t in r.tensors}["blk.0.ffn_up_exps.weight"]
    assert t.tensor_type == GGUF_MX
    assert same_bits(gguf_dequantize(np.asarray(t.data).reshape(32, -1), 96), cpp_dequantize(qe.raw.numpy(), 96))
    assert main_file_type({"MXFP4": 10, "Q8_0": 5}) == 38


@pytest.mark.llamacpp
def test_llamacpp_runs_a_model_lowtune_wrote_in_mxfp4(tmp_path):
    # a tiny Llama whose decoder matrices are MXFP4 blocks from lowtune's quantizer: llama.cpp
    # loads it and its logits agree with lowtune's (measured max difference 0.2% of the largest
    # logit: llama.cpp rounds activations to Q8_0 and keeps an F16 KV cache; a misread block is O(1))
    from helpers import write_tiny_llama_gguf
    path = write_tiny_llama_gguf(tmp_path / "tiny-mxfp4.gguf", "MXFP4", embed_type="F32")
    with GGUFFile(path) as f:
        assert f.tensor_infos["blk.0.ffn_down.weight"].type_name == "MXFP4"
    assert_logits_match_llamacpp(path, 1e-2)
