"""TQ1_0, TQ2_0 (GGUF types 34, 35: ternary BitNet b1.58 / TriLM files), Q1_0 and Q2_0 (41, 42: 1- and
2-bit): lowtune's C++, its NumPy references, gguf-py (TQ1_0, TQ2_0: the types it knows) and
llama.cpp agree, and the kernels compute with them.

    dequantize: C++ (fast and reference twins) == NumPy == llama.cpp (and gguf-py), bit for bit, on
        random bytes (every code, TQ1_0's bytes above 242 and TQ2_0's/Q2_0's code 3 included)
    quantize: C++ == NumPy == llama.cpp's quantize_row_*_ref (and gguf-py), byte for byte, on
        Gaussian rows at scales 1e-6..1e4, zeros, signed zeros, exact ties at half the scale, and
        blocks whose amax overflows fp16
    qmatmul forward / input gradient (CPU; CUDA under the cuda marker) against float64
    GGUF: written and read back with llama.cpp's file types 36, 37, 40, 41; llama.cpp runs a model
        lowtune wrote in each
The parametrized suites cover them too: test_formats.py, test_ops_cpu.py and test_cuda.py.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import lowtune
from lowtune import _C
from lowtune.formats import get_format
from lowtune.gguf_io import GGUFFile, main_file_type, write_gguf

import ggml_ref
from helpers import assert_logits_match_llamacpp, check_cuda_products_match_cpu, check_products_against_float64

TYPES = ["TQ1_0", "TQ2_0", "Q1_0", "Q2_0"]
GGUF_PY = ["TQ1_0", "TQ2_0"]  # gguf-py has no Q1_0 / Q2_0 quantizer
FTYPE = {"TQ1_0": 36, "TQ2_0": 37, "Q1_0": 40, "Q2_0": 41}  # llama.h's LLAMA_FTYPE_MOSTLY_*


def cpp_quantize(w: np.ndarray, name: str) -> np.ndarray:
    return lowtune.quantize(torch.from_numpy(np.ascontiguousarray(w, np.float32)), name).raw.numpy()


def cpp_dequantize(raw: np.ndarray, name: str, k: int) -> np.ndarray:
    qt = lowtune.QTensor.from_raw(torch.from_numpy(np.ascontiguousarray(raw)), name, (raw.shape[0], k))
    return lowtune.dequantize(qt, torch.float32).numpy()


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(np.ascontiguousarray(a, np.float32).view(np.uint32),
                                                 np.ascontiguousarray(b, np.float32).view(np.uint32))


def hard_rows(name: str, rng) -> np.ndarray:
    """float32 [n, 256] rows of the cases the scale and the rounding can get wrong."""
    e = get_format(name).block_elems
    ties = np.tile(np.array([4, 2, -2, 1.999999, -2.000001, 0, -0.0, 4, -4, 3], np.float32), 256)[:256]
    rows = [ties, np.zeros(256), -np.zeros(256), np.full(256, 1e5), rng.standard_normal(256) * 3e4,
            np.where(np.arange(256) % e == 0, 70000.0, rng.standard_normal(256))]  # amax past fp16's range
    scaled = rng.standard_normal((40, 256)) * 10.0 ** rng.uniform(-6, 4, size=(40, 1))
    return np.concatenate([np.stack(rows), scaled]).astype(np.float32)


# ---- dequantize ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TYPES)
def test_dequantize_matches_llamacpp_and_gguf_py(name, rng, random_blocks):
    fmt = get_format(name)
    k = 2 * 256
    raw = random_blocks(fmt, 9, k, rng)
    ours = cpp_dequantize(raw, name, k)
    assert same_bits(fmt.dequantize(raw, k), ours), "NumPy reference differs from the C++"
    if name in GGUF_PY:
        assert same_bits(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]).reshape(9, k), ours)
    if ggml_ref.available():
        assert same_bits(ggml_ref.dequantize(raw, fmt.type_id, k), ours), "C++ dequantize differs from llama.cpp"


@pytest.mark.parametrize("name", TYPES)
def test_fast_dequantize_matches_its_slow_twin(name, rng, random_blocks):
    # lowtune.dequantize takes dequant_block.h's per-block decoder; the reference product dequantizes
    # with block_math.h's Traits: an identity X reads W back through it.
    fmt = get_format(name)
    k = 256
    raw = random_blocks(fmt, 5, k, rng)
    x = torch.eye(k)
    out = torch.full((k, 5), float("nan"))
    raw_t = torch.from_numpy(raw)
    _C.qmatmul_forward_reference(fmt.type_id, x.data_ptr(), 0, raw_t.data_ptr(), out.data_ptr(), k, 5, k)
    # + 0: the product's sums turn the -0 of code 1 times a negative d into +0
    assert same_bits(out.numpy().T + np.float32(0), cpp_dequantize(raw, name, k) + np.float32(0))


def test_tq1_digits_cover_every_byte():
    # digit n of byte q is ((q * 3^n mod 256) * 3) >> 8: every byte (243..255 too) decodes as ggml does
    raw = np.zeros((1, 54 * 6), np.uint8)
    blocks = raw.reshape(6, 54)
    blocks[:5, :48] = np.arange(256 - 16).reshape(5, 48)
    blocks[5, :16] = np.arange(240, 256)
    blocks[5, 48:52] = [0, 81, 162, 255]
    blocks[:, 52:54] = np.array([1.0], "<f2").view(np.uint8)
    ours = cpp_dequantize(raw, "TQ1_0", 6 * 256)
    assert set(np.unique(ours)) == {-1.0, 0.0, 1.0}
    if ggml_ref.available():
        assert same_bits(ggml_ref.dequantize(raw, 34, 6 * 256), ours)


# ---- quantize ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TYPES)
def test_quantize_matches_numpy_and_gguf_py(name, rng):
    fmt = get_format(name)
    w = hard_rows(name, rng)
    ours = cpp_quantize(w, name)
    assert ours.shape == (w.shape[0], fmt.row_bytes(256))
    assert np.array_equal(ours, fmt.quantize(w)), "C++ quantizer differs from the NumPy reference"
    if name in GGUF_PY:
        with np.errstate(over="ignore"):  # the fp16 scale of amax 70000 is inf, in gguf-py as in ggml
            theirs = gguf.quants.quantize(w, gguf.GGMLQuantizationType[name])
        assert np.array_equal(ours, theirs), "C++ quantizer differs from gguf-py"


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", TYPES)
def test_quantize_matches_llamacpp(name, rng):
    fmt = get_format(name)
    w = hard_rows(name, rng)
    theirs = ggml_ref.quantize(w, fmt.type_id)
    ours = cpp_quantize(w, name)
    bad = np.flatnonzero((ours.reshape(-1, fmt.block_bytes) != theirs.reshape(-1, fmt.block_bytes)).any(axis=1))
    assert bad.size == 0, f"{bad.size} blocks differ from llama.cpp's, first {bad[:5]}"


@pytest.mark.parametrize("name,levels,err_range", [
    # relative RMS error on N(0, 1) (measured over six seeds); a wrong scale or code order moves it far more
    # (0.805-0.811 for the ternary types, whose scale is the amax of 256 inputs; 0.595-0.602; 0.708-0.725)
    ("TQ1_0", (-1, 0, 1), (0.79, 0.83)), ("TQ2_0", (-1, 0, 1), (0.79, 0.83)),
    ("Q1_0", (-1, 1), (0.58, 0.62)), ("Q2_0", (-1, 0, 1), (0.69, 0.74))])
def test_quantize_levels_and_round_trip(name, levels, err_range, rng):
    fmt = get_format(name)
    g = rng.standard_normal((16, 1024)).astype(np.float32)
    raw = cpp_quantize(g, name)
    back = cpp_dequantize(raw, name, 1024)
    d = back.reshape(-1, fmt.block_elems)
    units = np.unique(np.round(d / np.abs(d).max(axis=1, keepdims=True)).astype(int))
    assert set(units.tolist()) == set(levels)
    err = np.linalg.norm(back - g) / np.linalg.norm(g)
    assert err_range[0] < err < err_range[1], err
    zero = cpp_quantize(np.zeros((1, 256), np.float32), name)  # d = 0 (Q1_0: +0 for every sign)
    assert np.array_equal(cpp_dequantize(zero, name, 256), np.zeros((1, 256), np.float32))


# ---- products ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("m", [1, 3, 70])
def test_qmatmul_and_input_grad_match_float64(name, m, rng):
    check_products_against_float64(name, 45, 3 * 256, m, rng)


@pytest.mark.cuda
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("path", ["", "staged", "direct", "cublas"])
@pytest.mark.parametrize("m", [1, 7, 24, 40])
def test_cuda_products_match_cpu(name, path, m, rng, monkeypatch):
    # every CUDA path that takes the shape (staged: M <= 16, direct: M <= 32; otherwise the default)
    monkeypatch.setenv("LOWTUNE_CUDA_PATH", path)
    check_cuda_products_match_cpu(name, 130, 9 * 256, m, rng)


# ---- GGUF -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TYPES)
def test_gguf_round_trip(name, tmp_path, rng):
    fmt = get_format(name)
    w = rng.standard_normal((6, 512)).astype(np.float32)
    q = lowtune.quantize(torch.from_numpy(w), name)
    out = tmp_path / "lowbit.gguf"
    write_gguf(out, {"general.architecture": "llama"},
               [("blk.0.attn_q.weight", q), ("blk.0.attn_norm.weight", torch.ones(512))])
    with GGUFFile(out) as f:
        assert f.metadata["general.file_type"] == FTYPE[name]
        info = f.tensor_infos["blk.0.attn_q.weight"]
        assert info.type is fmt and info.type_id == fmt.type_id and info.nbytes == 6 * fmt.row_bytes(512)
        back = f.tensor("blk.0.attn_q.weight")
        assert back.format is fmt and back.shape == (6, 512) and torch.equal(back.raw, q.raw)
    if name in GGUF_PY:
        t = {t.name: t for t in gguf.GGUFReader(out).tensors}["blk.0.attn_q.weight"]
        theirs = gguf.quants.dequantize(np.asarray(t.data).reshape(6, -1), t.tensor_type).reshape(6, 512)
        assert same_bits(theirs, cpp_dequantize(q.raw.numpy(), name, 512))
    assert main_file_type({name: 10, "Q8_0": 5}) == FTYPE[name]


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", TYPES)
def test_llamacpp_runs_a_model_lowtune_wrote(name, tmp_path):
    # a tiny Llama whose decoder matrices are lowtune's blocks: llama.cpp loads it and its logits
    # agree with lowtune's (measured: 0.01-0.03% of the largest logit; llama.cpp rounds activations to
    # Q8_0 / Q8_K and keeps an F16 KV cache; a misread block is O(1)). Weights of RMS 0.02 keep the
    # 256-wide model from amplifying those roundings (at 0.08 even Q4_0 differs by 1%).
    from helpers import write_tiny_llama_gguf
    path = write_tiny_llama_gguf(tmp_path / f"tiny-{name}.gguf", name, dim=256, ffn=512, scale=0.02, embed_type="F32")
    with GGUFFile(path) as f:
        assert f.tensor_infos["blk.0.ffn_down.weight"].type_name == name
    assert_logits_match_llamacpp(path, 2e-3)


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", TYPES)
def test_lowtune_reads_what_llama_quantize_writes(name, tmp_path):
    # llama-quantize's recipe for the type (its file type, its choices for token_embd and the head)
    # on an F32 model: lowtune reads every tensor's type and computes llama.cpp's logits. (llama-quantize
    # has no NVFP4 recipe: only the converter writes NVFP4, from NVIDIA's checkpoints.)
    from helpers import write_tiny_llama_gguf
    src = write_tiny_llama_gguf(tmp_path / "f32.gguf", "F32", dim=256, ffn=512, scale=0.02)
    path = tmp_path / f"{name}.gguf"
    ggml_ref.quantize_model(src, path, name)
    with GGUFFile(path) as f:
        assert f.metadata["general.file_type"] == ggml_ref.FTYPES[name]
        assert f.tensor_infos["blk.0.ffn_down.weight"].type_name == name
    assert_logits_match_llamacpp(path, 2e-3)
