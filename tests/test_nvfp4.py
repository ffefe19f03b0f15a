"""NVFP4 (GGUF type 40, NVIDIA's FP4 checkpoints as llama.cpp converts them): lowtune's C++, its NumPy
reference, gguf-py and llama.cpp agree, and the kernels compute with it.

    UE4M3 scales: every byte's half value (subnormals, 0x7F and bit 7 included)
    dequantize: C++ (fast and reference twins) == NumPy == gguf-py == llama.cpp, bit for bit, every
        scale byte
    quantize: C++ == NumPy == llama.cpp's quantize_row_nvfp4_ref, byte for byte (gguf-py has only the
        scale's rounding, checked against the NumPy one), on Gaussian
        rows at scales 1e-6..1e4, zeros, scales below the smallest subnormal and above 448, values at
        the scale's rounding boundaries, and ties between levels
    qmatmul forward / input gradient (CPU; CUDA under the cuda marker) against float64
    GGUF: written and read back as type 40 (file type 39), read by gguf-py; llama.cpp runs a model
        lowtune wrote in it
The parametrized suites cover it too: test_formats.py, test_ops_cpu.py and test_cuda.py.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import lowtune
from lowtune import _C
from lowtune.formats import get_format
from lowtune.formats.nvfp4 import fp32_to_ue4m3, ue4m3_to_fp32_half
from lowtune.gguf_io import GGUFFile, main_file_type, write_gguf

import ggml_ref
from helpers import assert_logits_match_llamacpp, check_cuda_products_match_cpu, check_products_against_float64

NV = get_format("NVFP4")
GGUF_NV = gguf.GGMLQuantizationType.NVFP4


def cpp_quantize(w: np.ndarray) -> np.ndarray:
    return lowtune.quantize(torch.from_numpy(np.ascontiguousarray(w, np.float32)), "NVFP4").raw.numpy()


def cpp_dequantize(raw: np.ndarray, k: int) -> np.ndarray:
    qt = lowtune.QTensor.from_raw(torch.from_numpy(np.ascontiguousarray(raw)), "NVFP4", (raw.shape[0], k))
    return lowtune.dequantize(qt, torch.float32).numpy()


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(np.ascontiguousarray(a, np.float32).view(np.uint32),
                                                 np.ascontiguousarray(b, np.float32).view(np.uint32))


def hard_rows(rng) -> np.ndarray:
    """float32 [n, 64] (one block a row) of the cases the scale and the rounding can get wrong."""
    # amax / 6 on every UE4M3 value, and half way between neighbours (the rounding bit), past 448
    # and below the smallest subnormal
    values = ue4m3_to_fp32_half(np.arange(0x7F, dtype=np.uint8)).astype(np.float64) * 2
    mids = (values[1:] + values[:-1]) / 2
    amaxes = np.concatenate([values, mids, [500.0, 448.0 * 1.07, 1e-4, 2.0 ** -11]]) * 6
    rows = []
    for amax in amaxes:
        r = rng.standard_normal(64) * amax / 3
        r[rng.integers(0, 16, size=4) + np.arange(0, 64, 16)] = amax * rng.choice([-1, 1], size=4)
        rows.append(np.clip(r, -amax, amax))
    ties = np.zeros(64)  # sub-block amax 6 -> d = 0.5 (UE4M3 1.0): halves of the level unit are ties
    ties[:16] = [6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5, 0.125]
    ties[16:32] = -ties[:16]
    rows += [ties, np.zeros(64)]
    scaled = rng.standard_normal((40, 64)) * 10.0 ** rng.uniform(-6, 4, size=(40, 1))
    return np.concatenate([np.stack(rows), scaled]).astype(np.float32)


# ---- scale ------------------------------------------------------------------------------------------

def test_ue4m3_scales_every_byte():
    b = np.arange(256, dtype=np.uint8)
    half = ue4m3_to_fp32_half(b)
    exp, man = (b >> 3) & 15, (b & 7).astype(np.float64)
    want = np.where(exp == 0, man * 2.0 ** -10, (1 + man / 8) * 2.0 ** (exp.astype(np.int64) - 8))
    want[(b & 0x7F) == 0x7F] = np.where(b[(b & 0x7F) == 0x7F] == 0x7F, 0.0, 240.0)  # 0x7F reads 0, 0xFF 240
    assert np.array_equal(half.astype(np.float64), want)
    assert same_bits(half, gguf.quants.NVFP4.ue4m3_to_fp32(b).astype(np.float32))
    # the C++ scale, read through a block of level 2 (code 2) for each byte
    raw = np.zeros((64, 36), np.uint8)
    raw[:, :4], raw[:, 4:] = b.reshape(64, 4), 0x22
    assert same_bits(cpp_dequantize(raw.reshape(1, -1), 64 * 64).reshape(64, 4, 16)[:, :, 0].reshape(-1), 2 * half)
    assert NV.block_bytes == 36 and NV.block_elems == 64 and _C.block_info(40) == (64, 36)


def test_fp32_to_ue4m3_matches_gguf_py(rng):
    x = np.concatenate([ue4m3_to_fp32_half(np.arange(0x7F, dtype=np.uint8)) * 2,
                        np.exp(rng.uniform(-14, 7, 4000)), [0, -1, 448, 449, 1e30, 2.0 ** -10]]).astype(np.float32)
    x = np.concatenate([x, np.nextafter(x, np.float32(np.inf)), np.nextafter(x, np.float32(0))])
    assert np.array_equal(fp32_to_ue4m3(x), gguf.quants.NVFP4.fp32_to_ue4m3(x))


# ---- dequantize ------------------------------------------------------------------------------------

def test_dequantize_matches_gguf_py_and_llamacpp_for_every_scale_byte(rng):
    raw = rng.integers(0, 256, size=(64, 2 * 36), dtype=np.uint8)
    raw[:, :4] = np.arange(256, dtype=np.uint8).reshape(64, 4)
    expected = gguf.quants.dequantize(raw, GGUF_NV).reshape(64, 128)
    assert same_bits(cpp_dequantize(raw, 128), expected), "C++ dequantize differs from gguf-py"
    assert same_bits(NV.dequantize(raw, 128), expected), "NumPy reference differs from gguf-py"
    if ggml_ref.available():
        assert same_bits(ggml_ref.dequantize(raw, 40, 128), expected), "gguf-py differs from llama.cpp"


def test_fast_dequantize_matches_its_slow_twin(rng, random_blocks):
    # lowtune.dequantize takes the per-block decoder of dequant_block.h; the reference product
    # dequantizes with block_math.h's Traits: an identity X reads W back through it.
    k = 3 * 64
    raw = random_blocks(NV, 7, k, rng)
    x = torch.eye(k)
    out = torch.full((k, 7), float("nan"))
    raw_t = torch.from_numpy(raw)
    _C.qmatmul_forward_reference(40, x.data_ptr(), 0, raw_t.data_ptr(), out.data_ptr(), k, 7, k)
    assert same_bits(out.numpy().T, cpp_dequantize(raw, k))


# ---- quantize ---------------------------------------------------------------------------------------

def test_quantize_matches_numpy(rng):
    w = hard_rows(rng)
    ours = cpp_quantize(w)
    assert ours.shape == (w.shape[0], 36)
    assert np.array_equal(ours, NV.quantize(w)), "C++ quantizer differs from the NumPy reference"


@pytest.mark.llamacpp
def test_quantize_matches_llamacpp(rng):
    w = np.concatenate([hard_rows(rng), rng.standard_normal((32, 64)).astype(np.float32)])
    theirs = ggml_ref.quantize(w, 40)
    ours = cpp_quantize(w)
    bad = np.flatnonzero((ours != theirs).any(axis=1))
    assert bad.size == 0, f"{bad.size} blocks differ from llama.cpp's, first {bad[:5]}"


def test_quantize_edges_and_round_trip(rng):
    # the tie row: amax 6 gives the scale byte of 1.0 (0x38), level unit 0.5; ties go to the smaller
    # magnitude (the first code), and code 8 ("-0") is never written
    w = np.zeros((1, 64), np.float32)
    w[0, :8] = [6, 0.25, 0.75, -1.25, 2.5, -3.5, 5, -0.125]
    raw = cpp_quantize(w)
    assert raw[0, 0] == 0x38 and raw[0, 1:4].tolist() == [0, 0, 0]  # all-zero sub-blocks: scale byte 0
    assert np.array_equal(cpp_dequantize(raw, 64)[0, :8], [6, 0, 0.5, -1, 2, -3, 4, -0.0])
    codes = np.concatenate([raw[:, 4:] & 15, raw[:, 4:] >> 4], axis=1)
    assert not (codes == 8).any()
    # relative RMS error on N(0, 1): E2M1 with a 16-input E4M3 scale (measured over six seeds:
    # 0.093-0.095); a wrong scale rounding or level table moves it far more
    g = rng.standard_normal((16, 1024)).astype(np.float32)
    err = np.linalg.norm(cpp_dequantize(cpp_quantize(g), 1024) - g) / np.linalg.norm(g)
    assert 0.085 < err < 0.105, err


# ---- products ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("m", [1, 3, 70])
def test_qmatmul_and_input_grad_match_float64(m, rng):
    check_products_against_float64("NVFP4", 45, 7 * 64, m, rng)


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["", "staged", "direct", "cublas"])
@pytest.mark.parametrize("m", [1, 7, 24, 40])
def test_cuda_products_match_cpu(path, m, rng, monkeypatch):
    # every CUDA path that takes the shape (staged: M <= 16, direct: M <= 32; otherwise the default)
    monkeypatch.setenv("LOWTUNE_CUDA_PATH", path)
    check_cuda_products_match_cpu("NVFP4", 130, 23 * 64, m, rng)


# ---- GGUF -------------------------------------------------------------------------------------------

def test_gguf_round_trip(tmp_path, rng):
    w = rng.standard_normal((6, 128)).astype(np.float32)
    q = lowtune.quantize(torch.from_numpy(w), "NVFP4")
    out = tmp_path / "nv.gguf"
    write_gguf(out, {"general.architecture": "llama"},
               [("blk.0.attn_q.weight", q), ("blk.0.attn_norm.weight", torch.ones(128))])
    with GGUFFile(out) as f:
        assert f.metadata["general.file_type"] == 39  # LLAMA_FTYPE_MOSTLY_NVFP4
        info = f.tensor_infos["blk.0.attn_q.weight"]
        assert info.type is NV and info.type_id == 40 and info.ne == (128, 6) and info.nbytes == 6 * 2 * 36
        back = f.tensor("blk.0.attn_q.weight")
        assert back.format is NV and back.shape == (6, 128) and torch.equal(back.raw, q.raw)
    t = {t.name: t for t in gguf.GGUFReader(out).tensors}["blk.0.attn_q.weight"]
    assert t.tensor_type == GGUF_NV
    theirs = gguf.quants.dequantize(np.asarray(t.data).reshape(6, -1), GGUF_NV).reshape(6, 128)
    assert same_bits(theirs, cpp_dequantize(q.raw.numpy(), 128))
    assert main_file_type({"NVFP4": 10, "Q8_0": 5}) == 39


@pytest.mark.llamacpp
def test_llamacpp_runs_a_model_lowtune_wrote_in_nvfp4(tmp_path):
    # a tiny Llama whose decoder matrices are NVFP4 blocks from lowtune's quantizer: llama.cpp loads
    # it and its logits agree with lowtune's (llama.cpp rounds activations to Q8_0 and keeps an F16
    # KV cache; a misread block is O(1))
    from helpers import write_tiny_llama_gguf
    path = write_tiny_llama_gguf(tmp_path / "tiny-nvfp4.gguf", "NVFP4", dim=64, ffn=128, embed_type="F32")
    with GGUFFile(path) as f:
        assert f.tensor_infos["blk.0.ffn_down.weight"].type_name == "NVFP4"
    assert_logits_match_llamacpp(path, 1e-2)


def test_second_level_scales_are_refused_by_name(tmp_path):
    # llama.cpp's converter keeps a checkpoint's per-tensor second scale as blk.N.<weight>.scale, which
    # llama.cpp multiplies into the product; lowtune does not apply it, and says so rather than
    # computing without it
    from helpers import write_tiny_llama_gguf
    from lowtune.loading import load_model
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", "NVFP4", dim=64, ffn=128, embed_type="F32")
    with GGUFFile(path) as f:
        tensors = [(n, f.tensor(n)) for n in f.tensor_infos] + [("blk.0.attn_q.scale", torch.full((1,), 0.5))]
        write_gguf(tmp_path / "scaled.gguf", f.metadata, tensors, f.metadata_types)
    with pytest.raises(ValueError, match="second scales of an NVFP4 checkpoint"):
        load_model(tmp_path / "scaled.gguf")
