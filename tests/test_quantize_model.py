"""quantize_model.py and recipes.py: per-tensor types of the llama.cpp recipes (byte for byte
against llama.cpp's own quantizer), INTb-gG stored exactly as Q4_1/Q5_1/F32 and re-packed on
load, metadata carried, sources (GGUF, requantized GGUF, HF safetensors), bits per weight. The
models are tiny random Llamas written on the fly; one test runs the real SmolLM2."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lowtune import cli, ops
from lowtune.formats import get_format
from lowtune.gguf_io import GGUFFile, write_gguf
from lowtune.loading import load_model
from lowtune.quantize_model import holds_logical, model_bits, quantize_model
from lowtune.recipes import (LOGICAL_TYPES_KEY, RECIPES, TypePlan, llama_cpp_order, storage_format, to_storage,
                             use_more_bits)
from lowtune.safetensors_io import HFCheckpoint

import ggml_ref
from helpers import TINY_VOCAB, write_tiny_llama_gguf, write_tiny_llama_hf

INT_TYPES = [f"INT{b}-g{g}" for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128)]


def tiny_llama_gguf(path, layers: int = 8, tied: bool = True, **kw):
    """An F32 Llama: rows of 64 fit no K-quant, rows of 256 (ffn) do: both kinds of recipe
    choice occur."""
    return write_tiny_llama_gguf(path, "F32", layers=layers, ffn=256, tied=tied, **kw)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, botchan_text):
    d = tmp_path_factory.mktemp("tiny_llama")
    cfg, weights = write_tiny_llama_hf(d, botchan_text[:40000], shards=2)
    return d, cfg, weights


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory):
    return tiny_llama_gguf(tmp_path_factory.mktemp("tiny") / "tiny-f32.gguf")


# ---- INTb-gG storage ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", INT_TYPES)
def test_int_storage_is_exact_and_repacks(name, rng):
    """INTb-gG is no ggml type, so a GGUF file stores it in the llama.cpp type that holds it
    exactly (llama.cpp then loads the file): b <= 4 as Q4_1 (codes 0..2^b-1 fit Q4_1's 0..15,
    each group's fp16 d and m repeated in its 32-blocks), b = 5 as Q5_1, and b = 6, 8 as F32
    values: no llama.cpp block type holds 6- or 8-bit codes with a float min (Q8_0 has no min and
    would round a second time), and exact beats small for the format lowtune trains on. The
    merge of an export stores them the same way (test_merge)."""
    fmt = get_format(name)
    w = torch.from_numpy(rng.standard_normal((6, 256)).astype(np.float32)) * 0.1
    qt = ops.quantize(w, fmt)
    stored = to_storage(qt)
    want = {2: "Q4_1", 3: "Q4_1", 4: "Q4_1", 5: "Q5_1", 6: "F32", 8: "F32"}[fmt.bits]
    assert stored.type == want == storage_format(fmt).name
    values = ops.dequantize(qt, torch.float32)
    back = ops.dequantize(stored, torch.float32)
    assert torch.equal(back, values)                      # bit for bit
    repacked = ops.quantize(back, fmt)                    # what load_model does
    assert torch.equal(ops.dequantize(repacked, torch.float32), values)
    if name == "INT4-g32":                                 # the same bytes, as the format doc says
        assert torch.equal(stored.raw, qt.raw)


# ---- recipes --------------------------------------------------------------------------------------

def test_use_more_bits_picks_llama_cpp_layers():
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def _plan_types(qtype, names_shapes, md, **kw):
    plan = TypePlan.for_source(qtype, md, [n for n, _ in names_shapes], **kw)
    return {n: plan.choose(n, s).name for n, s in names_shapes}


def test_recipe_choices_on_256_wide_rows():
    """A model whose rows all fit K-quants: Q4_K_M, Q2_K and Q3_K_M choices as in llama.cpp."""
    md = {"general.architecture": "llama", "llama.block_count": 16, "llama.attention.head_count": 8,
          "llama.attention.head_count_kv": 2}
    shapes = [("token_embd.weight", (1000, 256)), ("output.weight", (1000, 256)), ("output_norm.weight", (256,))]
    for i in range(16):
        shapes += [(f"blk.{i}.{n}.weight", (256, 256)) for n in
                   ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
        shapes.append((f"blk.{i}.attn_norm.weight", (256,)))
    q4km = _plan_types("Q4_K_M", shapes, md)
    more = [i for i in range(16) if use_more_bits(i, 16)]
    for i in range(16):
        want = "Q6_K" if i in more else "Q4_K"
        assert q4km[f"blk.{i}.attn_v.weight"] == want and q4km[f"blk.{i}.ffn_down.weight"] == want
        assert q4km[f"blk.{i}.attn_q.weight"] == "Q4_K" and q4km[f"blk.{i}.attn_norm.weight"] == "F32"
    assert q4km["output.weight"] == "Q6_K" and q4km["token_embd.weight"] == "Q4_K"
    q2k = _plan_types("Q2_K", shapes, md)
    assert q2k["blk.3.attn_v.weight"] == "Q4_K"            # n_head / n_head_kv = 4
    assert q2k["blk.3.ffn_down.weight"] == q2k["blk.3.attn_output.weight"] == "Q3_K"
    assert q2k["blk.3.ffn_up.weight"] == "Q2_K" and q2k["output.weight"] == "Q6_K"
    q3km = _plan_types("Q3_K", shapes, md)                  # llama-quantize's alias for Q3_K_M
    assert [q3km[f"blk.{i}.attn_v.weight"] for i in range(3)] == ["Q5_K", "Q5_K", "Q4_K"]
    assert q3km["blk.0.ffn_down.weight"] == "Q5_K" and q3km["blk.5.ffn_down.weight"] == "Q4_K"
    assert _plan_types("Q4_K_M", shapes, md, output_type="Q8_0")["output.weight"] == "Q8_0"
    pure = _plan_types("Q2_K", shapes, md, pure=True)
    assert {pure[n] for n, s in shapes if len(s) == 2} == {"Q2_K"}


def test_iquant_recipe_choices_on_256_wide_rows():
    """llama.cpp's choices for the I-quant recipes (no importance matrix), n_head/n_head_kv = 2 and 4."""
    shapes = [("token_embd.weight", (1000, 256)), ("output.weight", (1000, 256))]
    for i in range(16):
        shapes += [(f"blk.{i}.{n}.weight", (256, 256)) for n in
                   ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
    for kv, gqa4 in ((4, False), (2, True)):
        md = {"general.architecture": "llama", "llama.block_count": 16, "llama.attention.head_count": 8,
              "llama.attention.head_count_kv": kv}
        xs = _plan_types("IQ4_XS", shapes, md)
        assert xs["output.weight"] == "Q6_K" and xs["token_embd.weight"] == "IQ4_XS"
        assert [xs[f"blk.{i}.ffn_down.weight"] for i in (0, 1, 2)] == ["Q5_K", "Q5_K", "IQ4_XS"]
        assert xs["blk.5.attn_v.weight"] == ("Q5_K" if gqa4 else "IQ4_XS") and xs["blk.5.attn_q.weight"] == "IQ4_XS"
        m = _plan_types("IQ3_M", shapes, md)
        assert m["blk.5.attn_v.weight"] == m["blk.5.attn_output.weight"] == m["blk.1.ffn_down.weight"] == "Q4_K"
        assert m["blk.2.ffn_down.weight"] == m["blk.5.ffn_up.weight"] == "IQ3_S" and m["output.weight"] == "Q6_K"
        s3 = _plan_types("IQ3_S", shapes, md)
        assert s3["blk.5.attn_v.weight"] == ("Q4_K" if gqa4 else "IQ3_S") and s3["blk.5.ffn_down.weight"] == "IQ3_S"
        x3 = _plan_types("IQ3_XS", shapes, md)  # the middle 3/4 of ffn_gate/ffn_up and all attn_q/attn_k drop
        assert [x3[f"blk.{i}.ffn_up.weight"] for i in (1, 2, 13, 14)] == ["IQ3_S", "IQ3_XXS", "IQ3_XXS", "IQ3_S"]
        assert x3["blk.0.attn_q.weight"] == x3["blk.0.attn_k.weight"] == "IQ3_XXS"
        assert x3["blk.0.attn_v.weight"] == ("Q4_K" if gqa4 else "IQ3_S")
        # The 1- and 2-bit recipes' own branch (refused when quantizing; the choices are llama.cpp's).
        plan = TypePlan.for_source("IQ2_M", md, [n for n, _ in shapes])
        m2 = {n: plan.choose(n, sh).name for n, sh in shapes}
        assert m2["output.weight"] == "Q5_K" and m2["token_embd.weight"] == "IQ3_S"
        assert m2["blk.0.attn_v.weight"] == ("Q4_K" if gqa4 else "IQ3_S")
        assert m2["blk.1.ffn_down.weight"] == m2["blk.5.attn_output.weight"] == "IQ3_S"
        assert m2["blk.2.ffn_down.weight"] == m2["blk.5.attn_q.weight"] == "IQ2_S"
        with pytest.raises(ValueError, match="blk.0.attn_q.weight the type IQ2_S, which needs an importance matrix"):
            plan.choose_quantizable("blk.0.attn_q.weight", (256, 256))
        assert plan.choose_quantizable("blk.0.attn_v.weight", (256, 256)).name == m2["blk.0.attn_v.weight"]
        s1 = {n: TypePlan.for_source("IQ1_S", md, [n for n, _ in shapes]).choose(n, sh).name for n, sh in shapes}
        assert s1["token_embd.weight"] == "Q2_K" and s1["blk.5.attn_output.weight"] == "IQ2_XXS"
        assert s1["blk.0.ffn_down.weight"] == "Q2_K" and s1["blk.5.ffn_gate.weight"] == "IQ1_S"
    # 576-wide rows (SmolLM2) fall back to IQ4_NL, as llama-quantize's do
    assert _plan_types("IQ3_S", [("blk.0.attn_q.weight", (576, 576))], {"llama.block_count": 1}) == \
        {"blk.0.attn_q.weight": "IQ4_NL"}


def test_counters_follow_layer_order_not_file_order():
    names = [f"blk.{i}.attn_v.weight" for i in (0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9)]
    assert llama_cpp_order(names)[:4] == ["blk.0.attn_v.weight", "blk.1.attn_v.weight",
                                          "blk.2.attn_v.weight", "blk.3.attn_v.weight"]


def test_int_types_keep_embeddings_f16_and_fall_back():
    md = {"general.architecture": "llama", "llama.block_count": 1}
    shapes = [("token_embd.weight", (300, 576)), ("blk.0.attn_q.weight", (576, 576)),
              ("blk.0.ffn_down.weight", (576, 1536)), ("blk.0.attn_k.weight", (64, 96))]
    t = _plan_types("INT3-g128", shapes, md)
    assert t == {"token_embd.weight": "F16", "blk.0.attn_q.weight": "INT3-g64",  # 576 = 9 x 64
                 "blk.0.ffn_down.weight": "INT3-g128", "blk.0.attn_k.weight": "INT3-g32"}
    assert _plan_types("INT2-g32", shapes, md, token_embedding_type="Q8_0")["token_embd.weight"] == "Q8_0"


def test_bad_types_say_what_to_use():
    for bad in ("Q9_K", "Q6_K_M", "INT7-g32"):
        with pytest.raises(ValueError, match="recipe"):
            TypePlan(bad)
    with pytest.raises(ValueError, match="unknown quantization type"):
        TypePlan("Q4_K_M", output_type="Q7_0")


def test_importance_matrix_recipes_are_refused_before_writing(tiny_f32, tmp_path):
    for recipe in ("IQ2_XS", "IQ1_M"):
        with pytest.raises(ValueError, match="needs an importance matrix.*use IQ3_M, IQ3_S, IQ4_XS"):
            quantize_model(tiny_f32, tmp_path / "out.gguf", recipe)
        assert not (tmp_path / "out.gguf").exists()


@pytest.mark.llamacpp
@pytest.mark.parametrize("recipe", ["Q4_K_M", "Q2_K", "Q3_K_M", "Q5_K_S", "Q4_0", "IQ4_XS", "IQ4_NL", "IQ3_M",
                                    "IQ3_S", "TQ1_0", "TQ2_0", "Q1_0", "Q2_0"])
@pytest.mark.parametrize("tied", [True, False])
def test_recipes_equal_llama_quantize_byte_for_byte(recipe, tied, tmp_path):
    """Every tensor gets llama-quantize's type and bytes."""
    # (llama-quantize has no fallback for Q1_0's 128-wide blocks: rows of 128 there)
    src = tiny_llama_gguf(tmp_path / "src.gguf", tied=tied, **({"dim": 128} if recipe == "Q1_0" else {}))
    ours = quantize_model(src, tmp_path / "ours.gguf", recipe).path
    theirs = tmp_path / "theirs.gguf"
    ggml_ref.quantize_model(src, theirs, recipe, threads=1)
    with GGUFFile(ours) as a, GGUFFile(theirs) as b:
        assert set(a.tensor_infos) == set(b.tensor_infos)
        for name, info in b.tensor_infos.items():
            mine = a.tensor_infos[name]
            assert mine.type_name == info.type_name, name
            assert np.array_equal(a.raw(name).numpy(), b.raw(name).numpy()), name
        # general.file_type is the recipe's, except where its main type ended up in no tensor
        # (write_gguf then names the most common type; llama.cpp keeps the recipe's id)
        main = RECIPES[recipe][1]
        if any(i.type_name == main for i in a.tensor_infos.values()):
            assert a.metadata["general.file_type"] == b.metadata["general.file_type"]


# ---- files ----------------------------------------------------------------------------------------

def test_int_file_types_metadata_bits_and_reload(tiny_f32, tmp_path):
    res = quantize_model(tiny_f32, tmp_path / "int3.gguf", "INT3-g64")
    with GGUFFile(tiny_f32) as src, GGUFFile(res.path) as f:
        md = f.metadata
        assert md["tokenizer.ggml.tokens"] == src.metadata["tokenizer.ggml.tokens"]
        assert md["tokenizer.ggml.merges"] == src.metadata["tokenizer.ggml.merges"]
        assert md["lowtune.quantize.type"] == "INT3-g64" and md["general.file_type"] == 3  # mostly Q4_1
        logical = dict(e.split("=") for e in md[LOGICAL_TYPES_KEY])
        assert len(logical) == 8 * 7 and set(logical.values()) == {"INT3-g64"}
        assert f.tensor_infos["blk.0.attn_q.weight"].type_name == "Q4_1"
        assert f.tensor_infos["token_embd.weight"].type_name == "F16"
        assert f.tensor_infos["blk.0.attn_norm.weight"].type_name == "F32"
    bits = model_bits(res.path)
    assert bits.linear_bpw == pytest.approx(3.5)               # 3 bits + fp16 d, m per 64
    assert bits.embedding_bits / bits.embedding_params == pytest.approx(16.0)
    assert bits.with_adapter(1000)["linear_bpw"] == pytest.approx(3.5 + 16000 / bits.linear_params)

    packed = load_model(res.path, restore_int_types=True)
    stored = load_model(res.path)
    assert packed.layers[0].attn_q.format.name == "INT3-g64"
    assert stored.layers[0].attn_q.format.name == "Q4_1"
    assert packed.layers[0].attn_q.raw.numel() < stored.layers[0].attn_q.raw.numel()
    ids = torch.randint(0, TINY_VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(packed(ids), stored(ids), atol=1e-5, rtol=1e-5)


def test_bits_count_only_tensors_that_still_hold_their_int_type(tiny_f32, tmp_path):
    """A file whose INT tensors were rewritten as plain Q4_1 (as a merge does) is counted as Q4_1."""
    int2 = quantize_model(tiny_f32, tmp_path / "int2.gguf", "INT2-g64").path
    with GGUFFile(int2) as f:
        md, types = dict(f.metadata), dict(f.metadata_types)
        qt = f.qtensor("blk.0.attn_q.weight")
        assert holds_logical(qt, get_format("INT2-g64"))
        assert not holds_logical(qt, get_format("INT2-g128"))
        real_q41 = ops.quantize(ops.dequantize(qt, torch.float32) * 1.01, "Q4_1")
        assert not holds_logical(real_q41, get_format("INT2-g64"))
        tensors = [(n, f.tensor(n) if n != "blk.0.attn_q.weight" else real_q41) for n in f.tensor_infos]
        write_gguf(tmp_path / "merged.gguf", md, tensors, types)
    before, after = model_bits(int2), model_bits(tmp_path / "merged.gguf")
    q = 64 * 64
    assert after.linear_bits - before.linear_bits == pytest.approx(q * (5.0 - 2.5))


def test_requantizing_starts_from_the_f32_dequantization(tiny_f32, tmp_path):
    q40 = quantize_model(tiny_f32, tmp_path / "q40.gguf", "Q4_0").path
    again = quantize_model(q40, tmp_path / "again.gguf", "Q4_0").path       # same type: copied
    via_f32 = quantize_model(q40, tmp_path / "f32.gguf", "F32").path         # the teacher
    int2 = quantize_model(q40, tmp_path / "int2.gguf", "INT2-g32").path
    int2_from_f32 = quantize_model(via_f32, tmp_path / "int2b.gguf", "INT2-g32").path
    with GGUFFile(q40) as a, GGUFFile(again) as b, GGUFFile(via_f32) as t, GGUFFile(int2) as c, \
            GGUFFile(int2_from_f32) as d:
        for name, info in a.tensor_infos.items():
            assert np.array_equal(a.raw(name).numpy(), b.raw(name).numpy()), name
            if info.type.quantized:
                deq = ops.dequantize(a.qtensor(name), torch.float32).reshape(t.tensor_infos[name].shape)
                assert torch.equal(t.tensor(name), deq), name
            assert np.array_equal(c.raw(name).numpy(), d.raw(name).numpy()), name
    # and an INTb-gG file requantized to its own type is copied as stored
    int2_again = quantize_model(int2, tmp_path / "int2c.gguf", "INT2-g32").path
    with GGUFFile(int2) as c, GGUFFile(int2_again) as e:
        assert all(np.array_equal(c.raw(n).numpy(), e.raw(n).numpy()) for n in c.tensor_infos)


def test_safetensors_source_matches_the_checkpoint_reader(hf_dir, tmp_path):
    d, cfg, _ = hf_dir
    ck = HFCheckpoint(d)
    out = quantize_model(d, tmp_path / "from-hf.gguf", "F32").path
    with GGUFFile(out) as f:
        assert set(f.tensor_infos) == set(ck.tensor_infos)
        for name in f.tensor_infos:
            assert torch.equal(f.tensor(name).float(), ck.tensor(name).float()), name
        assert f.metadata["tokenizer.ggml.tokens"] == ck.metadata["tokenizer.ggml.tokens"]
        assert f.metadata["general.file_type"] == 0
    q = quantize_model(d, tmp_path / "from-hf-q4km.gguf", "Q4_K_M")
    assert q.types["blk.0.attn_q.weight"] == "Q5_0"               # 64-wide rows: Q4_K falls back
    assert q.types["output.weight"] == "Q8_0" and q.types["output_norm.weight"] == "F32"


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        quantize_model(tmp_path / "nope.gguf", tmp_path / "o.gguf", "Q4_0")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        quantize_model(tmp_path / "empty", tmp_path / "o.gguf", "Q4_0")
    assert not (tmp_path / "o.gguf").exists()


def test_cli(tiny_f32, tmp_path, capsys):
    assert cli.main(["quantize", str(tiny_f32), "--type", "Q2_K", "-o", str(tmp_path / "q2k.gguf"), "-q"]) == 0
    assert "bits/weight" in capsys.readouterr().out
    assert cli.main(["quantize", str(tiny_f32), "--type", "Q7_X", "-o", str(tmp_path / "x.gguf")]) == 1
    assert "unknown --type" in capsys.readouterr().err


@pytest.mark.llamacpp
def test_llama_cpp_runs_an_int_file_like_lowtune(tiny_f32, tmp_path):
    """An INT3-g64 file (stored as Q4_1) loads in llama.cpp, whose logits match ours up to
    llama.cpp's own rounding (its CPU matmuls quantize activations to 8 bits for Q4_1 weights
    and to fp16 for the F16 head: about 1% of the logit range here)."""
    import llama_cpp
    path = quantize_model(tiny_f32, tmp_path / "int3.gguf", "INT3-g64").path
    ids = [5, 70, 80, 71, 32, 100, 101, 102, 40, 41, 42, 43]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, n_batch=32, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids)
    got = torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))
    with torch.no_grad():
        want = load_model(path, restore_int_types=True)(torch.tensor([ids]))[0]
    assert (got - want).abs().max() < 0.03 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    wrong = quantize_model(tiny_f32, tmp_path / "int2.gguf", "INT2-g32").path  # a different model
    with torch.no_grad():
        other = load_model(wrong, restore_int_types=True)(torch.tensor([ids]))[0]
    assert (got - other).abs().max() > 3 * (got - want).abs().max()


def test_smollm2_students(smollm2_path, tmp_path):
    """SmolLM2's 576-wide rows: Q2_K falls back to Q4_0 almost everywhere, INT2-g32 is exact."""
    res = quantize_model(smollm2_path, tmp_path / "q2k.gguf", "Q2_K")
    counts = {}
    for t in res.types.values():
        counts[t] = counts.get(t, 0) + 1
    assert counts == {"Q4_0": 180, "Q3_K": 30, "Q8_0": 1, "F32": 61}
    int2 = quantize_model(smollm2_path, tmp_path / "int2.gguf", "INT2-g32")
    assert int2.bits.linear_bpw == pytest.approx(3.0) and math.isclose(int2.bits.embedding_bits
                                                                        / int2.bits.embedding_params, 16.0)


def test_type_plan_reads_the_sources_counts_layer_0s_where_per_layer_and_refuses_damaged_ones():
    """TypePlan.for_source: llama.cpp's n_gqa (heads over KV heads, layer 0's where the file holds a
    count a layer, 0 where layer 0 has no KV heads) and the layer count, through families.key_number's
    checks: a count that is no number is refused with the key named."""
    from lowtune.recipes import TypePlan
    names = ["blk.0.attn_v.weight", "blk.1.attn_v.weight", "output.weight"]

    def plan(**md):
        return TypePlan.for_source("Q4_K_M", {"general.architecture": "a", **{"a." + k: v for k, v in md.items()}},
                                   names)
    p = plan(**{"attention.head_count": 32, "attention.head_count_kv": 8, "block_count": 2})
    assert (p.n_gqa, p.n_layers, p.counts["attn_v.weight"]) == (4, 2, 2)
    assert plan(**{"attention.head_count": [16, 16], "attention.head_count_kv": 4}).n_gqa == 4
    assert plan(**{"attention.head_count": 32, "attention.head_count_kv": [0, 8]}).n_gqa == 0
    assert plan(**{"attention.head_count": 32}).n_gqa == 1  # no KV count: as many as heads
    for key, bad in (("block_count", "two"), ("attention.head_count_kv", 2.5), ("attention.head_count", [-1])):
        with pytest.raises(ValueError, match=f"a.{key}"):
            plan(**{"attention.head_count": 32, key: bad})
