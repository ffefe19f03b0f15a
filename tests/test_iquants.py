"""I-quants (IQ4_NL, IQ4_XS, IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M): lowtune's C++,
its NumPy references, gguf-py and llama.cpp agree.

    lookup tables (csrc/iq_grids.h, formats/iq_grids.py) == what tools/gen_iq_grids.py makes of gguf-py's
    C++ dequantize == NumPy dequantize == gguf.quants.dequantize, bit for bit
        on random blocks (test_formats.py) and here on real SmolLM2 weights that llama.cpp quantized
        (with an importance matrix from lowtune's activations where llama.cpp needs one)
    C++ quantize == llama.cpp's bytes: IQ4_NL, IQ4_XS, IQ3_XXS, IQ3_S (random and real weights)
    NumPy quantize == C++ quantize: IQ4_NL, IQ4_XS
    IQ2_*, IQ1_*: quantizing is refused with a message that names the types lowtune writes
CPU kernels on these types: test_ops_cpu.py (every format); CUDA: test_cuda.py (every format).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import lowtune
from lowtune.adapters import quant_group
from lowtune.formats import get_format
from lowtune.merge import min_group

import ggml_ref

ROOT = Path(__file__).resolve().parent.parent
IQUANTS = ["IQ4_NL", "IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"]
QUANTIZABLE = ["IQ4_NL", "IQ4_XS", "IQ3_XXS", "IQ3_S"]
NEEDS_IMATRIX = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"]


def cpp_quantize(w: np.ndarray, name: str) -> np.ndarray:
    return lowtune.quantize(torch.from_numpy(np.ascontiguousarray(w, np.float32)), name).raw.numpy()


def cpp_dequantize(raw: np.ndarray, name: str, k: int) -> np.ndarray:
    qt = lowtune.QTensor.from_raw(torch.from_numpy(np.ascontiguousarray(raw)), name, (raw.shape[0], k))
    return lowtune.dequantize(qt, torch.float32).numpy()


def gguf_dequantize(raw: np.ndarray, name: str, k: int) -> np.ndarray:
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]).reshape(raw.shape[0], k)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(np.ascontiguousarray(a, np.float32).view(np.uint32),
                                                 np.ascontiguousarray(b, np.float32).view(np.uint32))


def differing_blocks(a: np.ndarray, b: np.ndarray, name: str) -> int:
    bb = get_format(name).block_bytes
    return int((a.reshape(-1, bb) != b.reshape(-1, bb)).any(axis=1).sum())


def mixed_rows(rng, n: int, k: int) -> np.ndarray:
    """Gaussian rows at scales 1e-3..30, plus an all-zero row, constant rows of both signs, a row
    with one large outlier, rows of sign ties (+a and -a as a block's largest magnitudes), sparse
    rows and tiny values (fp16 subnormal scales)."""
    w = rng.standard_normal((n, k)) * rng.choice([1e-3, 0.02, 1.0, 30.0], size=(n, 1))
    w[0] = 0.0
    w[1] = 0.37
    w[2] = -1.5
    w[3] = rng.standard_normal(k) * 0.02
    w[3, 77] = 60.0
    w[4] = rng.uniform(-0.5, 0.5, k)
    w[4, 3::32], w[4, 9::32] = 1.25, -1.25
    w[5] = np.where(rng.random(k) < 0.1, rng.standard_normal(k), 0.0) + 1e-3  # no all-zero 32-group
    w[6] = rng.standard_normal(k) * 1e-6
    return w.astype(np.float32)


# ---- tables ---------------------------------------------------------------------------------------

def test_lookup_tables_are_generated_from_gguf_py():
    spec = importlib.util.spec_from_file_location("gen_iq_grids", ROOT / "tools" / "gen_iq_grids.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (ROOT / "csrc" / "iq_grids.h").read_text() == gen.render_header(), \
        "csrc/iq_grids.h differs from gguf-py's tables: run tools/gen_iq_grids.py"
    assert (ROOT / "python" / "lowtune" / "formats" / "iq_grids.py").read_text() == gen.render_python(), \
        "formats/iq_grids.py differs from gguf-py's tables: run tools/gen_iq_grids.py"
    # Spot checks against ggml-common.h's literals, independent of the generator.
    from lowtune.formats import iq_grids
    assert iq_grids.KVALUES_IQ4NL[:4] == (-127, -104, -83, -65) and len(iq_grids.IQ1S_GRID) == 2048
    assert iq_grids.IQ2XXS_GRID[1] == 0x080808080808082b and iq_grids.IQ3S_GRID[511] == 0x0f0f0101
    assert iq_grids.IQ1S_GRID[0] == 0xffffffffffffffff and iq_grids.KSIGNS_IQ2XS[1] == 129


# ---- format facts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,group", [("IQ4_NL", 32), ("IQ4_XS", 32), ("IQ3_XXS", 32), ("IQ3_S", 32),
                                        ("IQ2_XXS", 32), ("IQ2_XS", 16), ("IQ2_S", 16), ("IQ1_S", 32),
                                        ("IQ1_M", 16)])
def test_scale_groups_and_no_mins(name, group):
    # From ggml-common.h: one scale per 32 inputs, 4-bit scales per 16 for IQ2_XS/IQ2_S and 3-bit
    # per 16 for IQ1_M; no I-quant stores a min (IQ1's ±1/8 delta is part of the code).
    fmt = get_format(name)
    assert fmt.scale_group == group == quant_group(fmt)
    assert fmt.min_group is None and min_group(fmt) is None and not fmt.float_min
    assert fmt.gguf and fmt.quantized


# ---- quantizers -----------------------------------------------------------------------------------

@pytest.mark.llamacpp
@pytest.mark.parametrize("name", QUANTIZABLE)
def test_quantize_matches_llamacpp_on_random_data(name, rng):
    w = np.concatenate([rng.standard_normal((24, 2048)).astype(np.float32), mixed_rows(rng, 8, 2048)])
    theirs = ggml_ref.quantize(w, get_format(name).type_id)
    ours = cpp_quantize(w, name)
    assert differing_blocks(ours, theirs, name) == 0, \
        f"{name}: {differing_blocks(ours, theirs, name)} of {ours.size // get_format(name).block_bytes} blocks differ from llama.cpp's"


@pytest.mark.parametrize("name", ["IQ4_NL", "IQ4_XS"])
def test_numpy_quantizer_matches_cpp(name, rng):
    w = mixed_rows(rng, 10, 512)
    ref = get_format(name).quantize(w)
    assert ref.shape == (10, get_format(name).row_bytes(512))
    assert np.array_equal(cpp_quantize(w, name), ref)
    assert same_bits(cpp_dequantize(ref, name, 512), get_format(name).dequantize(ref, 512))


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_quantize_round_trip_error(name, rng):
    # Relative RMS error of 16 x 1024 N(0, 1) values; llama.cpp's own bytes are the same (the test
    # above). Measured over six seeds: IQ4_NL 0.075-0.076, IQ4_XS 0.076-0.077, IQ3_S 0.165-0.168,
    # IQ3_XXS 0.213-0.216.
    bound = {"IQ4_NL": 0.08, "IQ4_XS": 0.08, "IQ3_S": 0.175, "IQ3_XXS": 0.225}[name]
    w = rng.standard_normal((16, 1024)).astype(np.float32)
    raw = cpp_quantize(w, name)
    err = np.linalg.norm(cpp_dequantize(raw, name, 1024) - w) / np.linalg.norm(w)
    assert err < bound, f"{name}: relative error {err:.4f}"
    zero = cpp_quantize(np.zeros((1, 256), np.float32), name)
    assert not cpp_dequantize(zero, name, 256).any(), "an all-zero row comes back zero"


@pytest.mark.llamacpp
def test_iq3_s_writes_every_group_in_place(rng):
    # A super-block with an all-zero 32-group: ggml's quantize_iq3_s skips that group without
    # advancing its code and sign pointers, so later groups land one group early in its bytes.
    # lowtune writes every group where the format says; elsewhere its bytes are llama.cpp's.
    w = rng.standard_normal((4, 512)).astype(np.float32)
    w[:, 32:64] = 0.0  # first super-block of every row
    ours, theirs = cpp_quantize(w, "IQ3_S"), ggml_ref.quantize(w, get_format("IQ3_S").type_id)
    bb = get_format("IQ3_S").block_bytes
    assert np.array_equal(ours.reshape(4, 2, bb)[:, 1], theirs.reshape(4, 2, bb)[:, 1])
    deq = cpp_dequantize(ours, "IQ3_S", 512)
    assert np.abs(deq[:, 32:64]).max() < 0.02 * np.abs(w).max()  # IQ3_S has no exact zero: ±d
    first = np.linalg.norm(deq[:, :256] - w[:, :256]) / np.linalg.norm(w[:, :256])
    assert first < 0.2, f"relative error {first:.3f} in the super-blocks with a zero group"


def test_needs_imatrix_is_what_the_quantizer_refuses():
    # Format.needs_imatrix (read by the recipes) and the C++ quantizers' refusals agree.
    for fmt in lowtune.FORMATS.values():
        if not fmt.quantized:
            continue
        try:
            lowtune.quantize(torch.ones(1, fmt.block_elems), fmt)
            refused = False
        except ValueError as e:
            assert "needs an importance matrix" in str(e)
            refused = True
        assert refused == fmt.needs_imatrix == (fmt.name in NEEDS_IMATRIX), fmt.name


@pytest.mark.parametrize("name", NEEDS_IMATRIX)
def test_importance_matrix_types_are_refused_clearly(name):
    with pytest.raises(ValueError, match=rf"{name} needs an importance matrix.*IQ4_XS.*Q2_K.*INT2-g64"):
        lowtune.quantize(torch.randn(2, 256), name)
    with pytest.raises(NotImplementedError, match=f"no NumPy reference quantizer for {name}"):
        get_format(name).quantize(np.zeros((1, 256), np.float32))


# ---- real tensors ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_ffn_down(smollm2_path, botchan_text):
    """{layer: (w float32 [64, 1536], importance float32 [1536])}: 64 rows of blk.{0,15,29}.ffn_down
    as dequantized from the Q4_1 GGUF, and per input column the mean squared activation that
    reaches the layer over 96 tokens of text (the statistic llama-imatrix collects)."""
    from lowtune.model import LlamaModel
    from lowtune.tokenizer import load_tokenizer
    model = LlamaModel.from_gguf(smollm2_path)
    ids = load_tokenizer(model.metadata).encode(botchan_text[:2000], add_bos=True)[:96]
    layers, sums, hooks = (0, 15, 29), {}, []
    for i in layers:
        def hook(_module, args, i=i):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[i] = (x * x).mean(dim=0)
        hooks.append(model.layers[i].ffn_down.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    out = {}
    for i in layers:
        w = lowtune.dequantize(model.layers[i].ffn_down.weight, torch.float32).numpy()[:64]
        out[i] = (np.ascontiguousarray(w), sums[i].float().numpy())
    return out


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", IQUANTS)
def test_real_tensors_quantized_by_llamacpp_dequantize_bit_identically(name, smollm2_ffn_down):
    fmt = get_format(name)
    for layer, (w, importance) in smollm2_ffn_down.items():
        k = w.shape[1]
        raw = ggml_ref.quantize(w, fmt.type_id, importance if name in NEEDS_IMATRIX else None)
        expected = gguf_dequantize(raw, name, k)
        assert np.isfinite(expected).all()
        assert same_bits(cpp_dequantize(raw, name, k), expected), f"blk.{layer}: C++ differs from gguf-py"
        assert same_bits(fmt.dequantize(raw, k), expected), f"blk.{layer}: NumPy differs from gguf-py"
        if name in QUANTIZABLE:
            assert differing_blocks(cpp_quantize(w, name), raw, name) == 0, f"blk.{layer}: bytes differ from llama.cpp's"
        err = np.linalg.norm(expected - w) / np.linalg.norm(w)
        assert err < 0.6, f"blk.{layer}: llama.cpp's {name} of a real tensor has relative error {err:.3f}"
