"""The per-tensor merge math (lowtune.merge) on random QTensors; no model needed.

Float mins (Q4_1, Q5_1, INTb-gG): only the min bytes change and deq(W') = deq(W) + δ up to the
fp16 rounding of each new min. K-quant mins (Q2_K, Q4_K, Q5_K): weight codes, scale codes and d
stay byte-identical, the reported residual is the true error. INTb-gG repacks into Q4_1/Q5_1
without changing a single dequantized value (checked with gguf-py's dequantizer too).
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import lowtune
from lowtune.recipes import storage_format, to_storage
from lowtune.formats import get_format
from lowtune.formats.kquants import _unpack_scale_min_k4
from lowtune.merge import (fit_min_codes, merge_group_constant, merge_weight,
                           min_group, refit_kquant_mins, requantize)
from lowtune.qtensor import QTensor

FLOAT_MIN = ["Q4_1", "Q5_1", "INT2-g32", "INT3-g64", "INT4-g64", "INT4-g128", "INT5-g32", "INT6-g64", "INT8-g128"]
KMIN = ["Q2_K", "Q4_K", "Q5_K"]


def weights(rng, n: int, k: int) -> torch.Tensor:
    return torch.from_numpy((rng.standard_normal((n, k)) * 0.05).astype(np.float32))


def blocks(qt: QTensor) -> np.ndarray:
    return qt.raw.numpy().reshape(-1, qt.format.block_bytes)


def expand(delta: torch.Tensor, g: int) -> torch.Tensor:
    return delta.repeat_interleave(g, dim=1)


# ---- float mins --------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", FLOAT_MIN)
def test_group_constant_moves_only_the_mins(qtype, rng):
    fmt = get_format(qtype)
    qt = lowtune.quantize(weights(rng, 6, 256), qtype)
    g = fmt.block_elems
    delta = torch.from_numpy(rng.standard_normal((6, 256 // g)).astype(np.float32) * 0.02)
    out = merge_group_constant(qt, delta)
    assert out.type == qtype and out.shape == qt.shape
    a, b = blocks(qt), blocks(out)
    np.testing.assert_array_equal(np.delete(a, [2, 3], axis=1), np.delete(b, [2, 3], axis=1))  # d, codes
    # m' is m + δ added in fp32, rounded once to fp16 (lowtune.merge_exact.stored_mins)
    m_old = a[:, 2:4].copy().view("<f2").astype(np.float32)[:, 0]
    m_new = b[:, 2:4].copy().view("<f2")[:, 0]
    np.testing.assert_array_equal(m_new, (m_old + delta.numpy().reshape(-1)).astype(np.float16))
    # so deq moves by δ up to half an fp16 ulp of the new min (plus fp32 rounding of d*q + m)
    err = (lowtune.dequantize(out) - lowtune.dequantize(qt) - expand(delta, g)).abs().numpy()
    bound = np.repeat(np.spacing(np.abs(m_new)).astype(np.float64) / 2, g).reshape(6, 256) + 1e-6
    assert (err <= bound).all()


def test_group_constant_refuses_what_it_cannot_do(rng):
    with pytest.raises(ValueError, match="no float min"):
        merge_group_constant(lowtune.quantize(weights(rng, 2, 64), "Q4_0"), torch.zeros(2, 2))
    qt = lowtune.quantize(weights(rng, 2, 64), "Q4_1")
    with pytest.raises(ValueError, match=r"shape \[2, 2\]"):
        merge_group_constant(qt, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="overflows fp16"):
        merge_group_constant(qt, torch.full((2, 2), 1e5))
    with pytest.raises(ValueError, match="NaN"):
        merge_group_constant(qt, torch.full((2, 2), float("nan")))


# ---- quantized mins ------------------------------------------------------------------------------

def _codes_and_scales(qt: QTensor):
    """Everything a K-quant min refit must keep: (weight code bytes, scale codes, d bytes)."""
    b = blocks(qt)
    if qt.type == "Q2_K":
        return b[:, 16:80], b[:, 0:16] & 0x0F, b[:, 80:82]
    sc, _ = _unpack_scale_min_k4(b[:, 4:16])
    return b[:, 16:], sc, b[:, 0:2]


@pytest.mark.parametrize("qtype", KMIN)
@pytest.mark.parametrize("size", [0.3, 3.0])  # the update, in units of the min resolution dmin
def test_kquant_refit_keeps_codes_and_reports_its_residual(qtype, size, rng):
    qt = lowtune.quantize(weights(rng, 8, 512), qtype)
    sub = min_group(get_format(qtype))
    b = blocks(qt)
    dmin = np.abs(b[:, 82:84] if qtype == "Q2_K" else b[:, 2:4]).copy().view("<f2").astype(np.float32)
    step = float(np.median(dmin))
    delta = torch.from_numpy(rng.standard_normal((8, 512 // sub)).astype(np.float32) * step * size)
    out, res = refit_kquant_mins(qt, delta)
    for kept, new in zip(_codes_and_scales(qt), _codes_and_scales(out)):
        np.testing.assert_array_equal(kept, new)
    target = lowtune.dequantize(qt) + expand(delta, sub)
    err = lowtune.dequantize(out) - target
    assert res.rms == pytest.approx(float(err.pow(2).mean().sqrt()), rel=1e-3, abs=1e-7)
    assert res.max == pytest.approx(float(err.abs().max()), rel=1e-3, abs=1e-6)
    assert res.delta_rms == pytest.approx(float(delta.pow(2).mean().sqrt()), rel=1e-5)
    # the refit is never worse than leaving the mins alone, and clearly better for large updates
    unmerged = float((lowtune.dequantize(qt) - target).pow(2).mean().sqrt())
    assert res.rms <= unmerged * (1.0 if size < 1 else 0.5)


@pytest.mark.parametrize("qtype", KMIN)
def test_kquant_refit_of_zero_is_identity(qtype, rng):
    qt = lowtune.quantize(weights(rng, 4, 256), qtype)
    out, res = refit_kquant_mins(qt, torch.zeros(4, 256 // min_group(get_format(qtype))))
    assert torch.equal(out.raw, qt.raw) and res.max == 0.0


def test_fit_min_codes_both_signs():
    u = np.array([[0.0, 1.0, 2.0, 3.0], [0.0, -1.0, -2.0, -3.0], [0.5, 0.5, 0.5, 0.5]])
    s, m = fit_min_codes(u, 3)
    np.testing.assert_allclose(s[:, None] * m, u, atol=1e-3)
    assert s[0] > 0 > s[1]
    assert ((m >= 0) & (m <= 3)).all()
    s2, _ = fit_min_codes(np.array([[1.0, -1.0]]), 15)  # mixed signs: one side is clipped to 0
    assert s2[0] != 0


def test_kquant_refit_refuses_other_types(rng):
    with pytest.raises(ValueError, match="no quantized mins"):
        refit_kquant_mins(lowtune.quantize(weights(rng, 2, 256), "Q6_K"), torch.zeros(2, 16))


# ---- INTb-gG -> GGUF ------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 5])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int_repacks_exactly(bits, group, rng):
    qt = lowtune.quantize(weights(rng, 5, 256), f"INT{bits}-g{group}")
    out = to_storage(qt)
    assert out.type == ("Q4_1" if bits <= 4 else "Q5_1") and out.shape == qt.shape
    assert torch.equal(lowtune.dequantize(out), lowtune.dequantize(qt))
    ref = gguf.quants.dequantize(out.raw.numpy(), gguf.GGMLQuantizationType[out.type])  # an independent reader
    np.testing.assert_array_equal(ref.reshape(5, 256), lowtune.dequantize(qt).numpy())
    if group == 32 and bits in (4, 5):  # INT4-g32 is Q4_1 and INT5-g32 is Q5_1 byte for byte
        assert torch.equal(out.raw, qt.raw)


@pytest.mark.parametrize("name", ["INT6-g64", "INT8-g32"])
def test_int6_int8_are_merged_exactly_and_stored_as_f32(name, rng):
    """No llama.cpp block type holds 6- or 8-bit codes with a float min, so INT6/INT8 are stored
    as their F32 values (recipes.storage_format), in `lowtune quantize` files and merged exports
    alike: exact, and llama.cpp loads F32. Their group-constant merge moves the mins in INTb-gG
    itself, so the stored values are the exactly merged ones."""
    fmt = get_format(name)
    assert storage_format(fmt).name == "F32"
    assert storage_format(get_format("INT3-g128")).name == "Q4_1" and storage_format(get_format("Q4_K")).name == "Q4_K"
    qt = lowtune.quantize(weights(rng, 4, 128), fmt)
    delta_g = torch.from_numpy(rng.standard_normal((4, 128 // fmt.group))).float() * 0.01
    out, info = merge_weight(qt, delta_groups=delta_g, group=fmt.group)
    assert out.type == "F32" and info.path == "min" and info.exact and info.out_type == "F32"
    want = lowtune.dequantize(merge_group_constant(qt, delta_g))
    assert torch.equal(lowtune.dequantize(out), want)
    conv, info = merge_weight(qt)                    # converted without an adapter: the same values
    assert conv.type == "F32" and info.path == "repack" and torch.equal(lowtune.dequantize(conv), lowtune.dequantize(qt))


# ---- re-quantization ------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["Q8_0", "Q4_K", "F16", "INT4-g64", "MXFP4", "NVFP4", "TQ1_0", "TQ2_0", "Q1_0",
                                    "Q2_0"])
def test_requantize_rounds_once(target, rng):
    qt = lowtune.quantize(weights(rng, 4, 256), "Q5_1")
    delta = weights(rng, 4, 256) * 0.1
    out = requantize(qt, delta, target)
    want = lowtune.quantize(lowtune.dequantize(qt) + delta, target)
    assert out.type == target and torch.equal(out.raw, want.raw)


# ---- which path each tensor takes ----------------------------------------------------------------

CASES = [  # base, update ("groups" width or "dense" or None), target, path, exact, out type, note
    ("Q4_1", 32, None, "min", True, "Q4_1", ""),
    ("Q4_1", 64, None, "min", True, "Q4_1", ""),                 # QA-LoRA with a group of two blocks
    ("Q5_1", 32, None, "min", True, "Q5_1", ""),
    ("Q4_1", "dense", None, "requantize", False, "Q4_1", ""),
    ("Q4_1", 32, "Q8_0", "requantize", False, "Q8_0", "re-targeted"),
    ("Q4_0", 32, None, "requantize", False, "Q4_0", "no min"),
    ("Q8_0", 32, None, "requantize", False, "Q8_0", "no min"),
    ("Q6_K", 16, None, "requantize", False, "Q6_K", "no min"),
    ("Q3_K", 16, None, "requantize", False, "Q3_K", "no min"),
    ("NVFP4", 16, None, "requantize", False, "NVFP4", "no min"),  # E2M1 levels, one scale per 16
    ("TQ1_0", 256, None, "requantize", False, "TQ1_0", "no min"),  # ternary codes, one scale per 256
    ("TQ2_0", "dense", None, "requantize", False, "TQ2_0", ""),
    ("Q1_0", 128, None, "requantize", False, "Q1_0", "no min"),
    ("Q2_0", 64, None, "requantize", False, "Q2_0", "no min"),
    ("Q4_K", 32, None, "min-refit", False, "Q4_K", None),
    ("Q2_K", 16, None, "min-refit", False, "Q2_K", None),
    ("Q4_K", 16, None, "requantize", False, "Q4_K", "do not align"),
    ("INT4-g64", 64, None, "min", True, "Q4_1", ""),
    ("INT2-g128", 128, None, "min", True, "Q4_1", ""),
    ("INT5-g32", "dense", None, "requantize", False, "Q5_1", ""),
    ("INT8-g32", 32, None, "min", True, "F32", ""),                # stored as its exact F32 values
    ("INT3-g64", None, None, "repack", True, "Q4_1", ""),
    ("Q4_1", None, None, "copy", True, "Q4_1", ""),
    ("Q4_1", None, "F16", "requantize", False, "F16", "re-targeted"),
    ("Q4_1", None, "F32", "requantize", True, "F32", "re-targeted"),
    ("F16", "dense", None, "float", False, "F16", ""),
]


@pytest.mark.parametrize("base,update,target,path,exact,out_type,note", CASES)
def test_merge_weight_paths(base, update, target, path, exact, out_type, note, rng):
    n, k = 4, 512
    w = weights(rng, n, k)
    qt = lowtune.quantize(w, base)
    kw, dense_delta = {}, None
    if update == "dense":
        dense_delta = weights(rng, n, k) * 0.1
        kw = {"delta": dense_delta}
    elif update is not None:
        dg = torch.from_numpy(rng.standard_normal((n, k // update)).astype(np.float32) * 0.005)
        kw = {"delta_groups": dg, "group": update}
        dense_delta = expand(dg, update)
    out, info = merge_weight(qt, target=target, **kw)
    assert (info.path, info.exact, out.type, info.base_type, info.out_type) == (path, exact, out_type, base, out_type)
    assert out.format.gguf
    if note is not None:
        assert note in info.note if note else info.note == ""
    exact_w = lowtune.dequantize(qt) + (dense_delta if dense_delta is not None else 0)
    err = (lowtune.dequantize(out) - exact_w).abs()
    if update is not None:
        assert info.err_rms == pytest.approx(float(err.pow(2).mean().sqrt()), rel=1e-2, abs=1e-6)
        assert info.delta_rms == pytest.approx(float(dense_delta.pow(2).mean().sqrt()), rel=1e-4)
    if exact:  # only the fp16 rounding of mins
        assert float(err.max()) <= 1e-3 * float(exact_w.abs().max())
        if path in ("copy", "repack") or (out_type == "F32" and path != "min"):
            assert float(err.max()) == 0.0


@pytest.mark.parametrize("qtype", KMIN)
def test_best_of_refit_and_requantize(qtype, rng):
    """kquant_mins="best" keeps, per super-block, whichever encoding is nearer: never worse than
    either (a mix of small and huge updates makes each win somewhere)."""
    n, k = 16, 512
    qt = lowtune.quantize(weights(rng, n, k), qtype)
    g = min_group(get_format(qtype))
    size = np.where(np.arange(n)[:, None] < n // 2, 0.002, 0.05)
    dg = torch.from_numpy((rng.standard_normal((n, k // g)) * size).astype(np.float32))
    errs = {mode: merge_weight(qt, delta_groups=dg, group=g, kquant_mins=mode)[1].err_rms
            for mode in ("best", "refit", "requantize")}
    assert errs["best"] <= min(errs["refit"], errs["requantize"]) * (1 + 1e-6)
    assert errs["best"] < max(errs["refit"], errs["requantize"])


def test_merge_weight_bad_arguments(rng):
    qt = lowtune.quantize(weights(rng, 2, 64), "Q4_1")
    with pytest.raises(ValueError, match="either delta or delta_groups"):
        merge_weight(qt, delta=torch.zeros(2, 64), delta_groups=torch.zeros(2, 2), group=32)
    with pytest.raises(ValueError, match="group width"):
        merge_weight(qt, delta_groups=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="kquant_mins"):
        merge_weight(qt, kquant_mins="maybe")
    with pytest.raises(ValueError, match="shape"):
        merge_weight(qt, delta=torch.zeros(3, 64))


@pytest.mark.parametrize("base", ["F32", "F16", "Q4_1"])
@pytest.mark.parametrize("target", [None, "F32"])
def test_merge_leaves_its_input_alone(base, target, rng):
    """Float weights dequantize to views of their bytes: a merge must not write through them."""
    qt = lowtune.quantize(weights(rng, 4, 64), base)
    before = qt.raw.clone()
    delta = weights(rng, 4, 64)
    out, info = merge_weight(qt, delta=delta, target=target)
    assert torch.equal(qt.raw, before)
    if out.type == "F32":
        torch.testing.assert_close(lowtune.dequantize(out), lowtune.dequantize(qt) + delta, rtol=0, atol=1e-7)
    assert info.err_rms is not None
