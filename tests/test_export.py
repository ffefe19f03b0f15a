"""Exports on a tiny random Llama written to GGUF here (fast, no real model):
merged GGUF in each tensor's own type, GGUF LoRA, PEFT adapter, merged HF safetensors, the
`lowtune export` CLI, and base + adapter unmerged (loading.load_model(adapter=...)).

The helpers make_tiny_gguf / make_adapter are shared with test_export_llamacpp.py.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf.constants import GGUFValueType

import lowtune
from lowtune import adapters as A
from lowtune import cli
from lowtune.export import SavedAdapter, export_hf, export_lora_gguf, export_merged_gguf, export_peft
from lowtune.gguf_io import GGUFFile
from lowtune.loading import BaseMismatchError, find_adapter_dir, load_model, open_base
from lowtune.model import LlamaConfig, LlamaModel

from helpers import SPECIAL, TINY_VOCAB, max_rel_err as rel_err, write_tiny_llama_gguf

# ---- a tiny Llama and adapters on it ---------------------------------------------------------------


def make_tiny_gguf(path, qtype="Q4_1", dim=256, ffn=512, layers=2, heads=4, kv_heads=2, seed=0,
                   tied=True) -> Path:
    """A random Llama GGUF: every matrix in `qtype` (token_embd Q8_0), norms F32, a byte-level
    BPE tokenizer, and a UINT8-typed key to check that KV types survive an export."""
    return write_tiny_llama_gguf(path, qtype, dim=dim, ffn=ffn, layers=layers, heads=heads, kv_heads=kv_heads,
                                 seed=seed, tied=tied, embed_type="Q8_0", output_scale=0.3,
                                 output_type="Q6_K" if dim % 256 == 0 else "Q8_0",
                                 metadata={"lowtune.test.u8": 7},
                                 metadata_types={"lowtune.test.u8": GGUFValueType.UINT8})


def randomize_adapters(ads: dict, rel: float = 0.05, seed: int = 0) -> None:
    """Give every adapter a non-trivial update: its B (M for QA-HiRA) random, scaled so that
    RMS(ΔW) = rel · RMS(W) (a freshly initialised adapter is zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ad in ads.values():
            p = ad.hira_M if ad.method == "qa-hira" else ad.lora_B
            p.copy_(torch.randn(p.shape, generator=g))
            d = ad.delta_weight()
            w = lowtune.dequantize(ad.base.weight)
            p.mul_(rel * w.pow(2).mean().sqrt() / d.pow(2).mean().sqrt())


def make_adapter(model_path, out_dir, method: str, rel: float = 0.05, seed: int = 0, model=None, **cfg):
    """Train-free adapter: apply `method` to the model at model_path, randomize it, save it to
    out_dir (with the base hash). Returns the model with the adapter applied (base + adapter)."""
    model = model if model is not None else load_model(model_path)
    cfg.setdefault("rank", 8)
    ads = A.apply_adapters(model, A.AdapterConfig(method=method, alpha=cfg.pop("alpha", 16.0), seed=seed, **cfg))
    randomize_adapters(ads, rel, seed)
    A.save_adapter(model, out_dir)   # tied to the model's file by its hash
    return model.eval()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def ids_for(vocab: int, seed: int = 0, t: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (2, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return {q: make_tiny_gguf(d / f"tiny-{q}.gguf", q) for q in ("Q4_1", "Q5_1", "Q4_0", "Q4_K", "Q2_K")}


# ---- merged GGUF ------------------------------------------------------------------------------------

def check_carried_over(base_path, out_path, adapted: set[str]):
    """Every KV of the base with its type; the same tensors in the same order; tensors without
    an adapter byte-identical."""
    with GGUFFile(base_path) as b, GGUFFile(out_path) as o:
        for key, val in b.metadata.items():
            assert key in o.metadata, key
            assert o.metadata_types[key] == b.metadata_types[key], key
            if key != "general.file_type":
                assert o.metadata[key] == val, key
        assert list(o.tensor_infos) == list(b.tensor_infos)
        for name, ti in b.tensor_infos.items():
            assert o.tensor_infos[name].ne == ti.ne
            if name not in adapted:
                assert torch.equal(o.raw(name), b.raw(name)), name


@pytest.mark.parametrize("method,base", [("qa-hira", "Q4_1"), ("qa-lora", "Q4_1"), ("qa-hira", "Q5_1"),
                                         ("qa-lora", "Q5_1")])
def test_exact_merge_moves_only_mins(method, base, tiny, tmp_path):
    model = make_adapter(tiny[base], tmp_path / "ad", method)
    out = tmp_path / "merged.gguf"
    rep = export_merged_gguf(tiny[base], tmp_path / "ad", out)
    adapted = set(SavedAdapter(tmp_path / "ad").tensor_names)
    assert len(adapted) == 14
    assert rep.paths() == {"min": 14, "copy": 1}
    assert all(rep.tensors[n].exact for n in adapted)
    check_carried_over(tiny[base], out, adapted)
    with GGUFFile(tiny[base]) as b, GGUFFile(out) as o:
        for name in adapted:
            rb = b.qtensor(name).raw.numpy().reshape(-1, 20 if base == "Q4_1" else 24)
            ro = o.qtensor(name).raw.numpy().reshape(rb.shape)
            assert np.array_equal(np.delete(rb, [2, 3], 1), np.delete(ro, [2, 3], 1))  # d and codes kept
            assert not np.array_equal(rb[:, 2:4], ro[:, 2:4])
    ids = ids_for(TINY_VOCAB)
    base_logits = logits(load_model(tiny[base]), ids)
    want = logits(model, ids)
    got = logits(load_model(out), ids)
    assert rel_err(base_logits, want) > 0.05          # the adapter matters
    assert rel_err(got, want) < 2e-3                  # and the merged file is base + adapter
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("method,base,path", [
    ("lora", "Q4_1", "requantize"), ("q-bara", "Q4_1", "requantize"), ("qdylora", "Q5_1", "requantize"),
    ("qa-hira", "Q4_0", "requantize"), ("qa-lora", "Q4_K", "min-refit"), ("qa-hira", "Q2_K", "min-refit"),
    ("lora", "Q4_K", "requantize")])
def test_requantized_merge_lands_near_base_plus_adapter(method, base, path, tiny, tmp_path):
    """Re-rounding loses the part of an update below half a quantization step (a 4-bit step is
    about 25% of the weights' RMS), so this update is large: 30% of RMS(W)."""
    model = make_adapter(tiny[base], tmp_path / "ad", method, rel=0.3)
    out = tmp_path / "merged.gguf"
    rep = export_merged_gguf(tiny[base], tmp_path / "ad", out)
    assert rep.paths()[path] == 14
    if base == "Q4_0":
        assert any("no min" in n for n in rep.notes)
    with GGUFFile(out) as o:
        assert {ti.type_name for n, ti in o.tensor_infos.items() if n.startswith("blk.") and ti.ne[1:]} == {base}
    check_carried_over(tiny[base], out, set(SavedAdapter(tmp_path / "ad").tensor_names))
    ids = ids_for(TINY_VOCAB)
    want = logits(model, ids)
    before = rel_err(logits(load_model(tiny[base]), ids), want)
    after = rel_err(logits(load_model(out), ids), want)
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("base", ["NVFP4", "TQ1_0", "TQ2_0", "Q1_0", "Q2_0"])
def test_scale_only_types_merge_as_ggml_quantizes(base, tmp_path):
    """NVFP4, the ternary and 1-/2-bit types have no min to move: every adapted tensor is re-quantized,
    and its blocks are exactly ggml's quantization (lowtune's ggml-exact quantizer) of deq(W) + ΔW. (With
    one scale per 64-256 inputs and 1-2 bit codes little of an update survives the re-rounding; what
    does is what llama-quantize would keep.)"""
    path = make_tiny_gguf(tmp_path / f"tiny-{base}.gguf", base)
    model = load_model(path)
    ads = A.apply_adapters(model, A.AdapterConfig(method="lora", alpha=16.0, seed=0, rank=8))
    randomize_adapters(ads, 0.3)
    A.save_adapter(model, tmp_path / "ad")
    rep = export_merged_gguf(path, tmp_path / "ad", tmp_path / "merged.gguf")
    assert rep.paths()["requantize"] == 14
    with GGUFFile(tmp_path / "merged.gguf") as o, torch.no_grad():
        for name in ("layers.0.attn_q", "layers.1.ffn_down"):
            ad = ads[name]
            want = lowtune.quantize(lowtune.dequantize(ad.base.weight) + ad.delta_weight().float(), base)
            got = o.tensor("blk." + name.removeprefix("layers.") + ".weight")
            assert got.type == base and torch.equal(got.raw, want.raw), name


def test_dylora_rank_and_retarget(tiny, tmp_path):
    """QDyLoRA exports at the chosen rank; --type re-targets every quantized tensor."""
    model = make_adapter(tiny["Q4_1"], tmp_path / "ad", "qdylora")
    A.set_rank(model, 3)
    out = tmp_path / "m.gguf"
    rep = export_merged_gguf(tiny["Q4_1"], tmp_path / "ad", out, qtype="F32", rank=3)
    assert rep.rank == 3 and rep.paths() == {"float": 14, "requantize": 1}
    ids = ids_for(TINY_VOCAB)
    assert rel_err(logits(load_model(out), ids), logits(model, ids)) < 1e-4
    with GGUFFile(out) as o:
        types = {ti.type_name for ti in o.tensor_infos.values()}
    assert types == {"F32"}
    with pytest.raises(ValueError, match="QDyLoRA rank must be in 1..8"):
        export_merged_gguf(tiny["Q4_1"], tmp_path / "ad", out, rank=9)


def test_retarget_falls_back_where_rows_do_not_fit(tmp_path):
    base = make_tiny_gguf(tmp_path / "small.gguf", "Q4_1", dim=64, ffn=256, heads=2, kv_heads=1)
    make_adapter(base, tmp_path / "ad", "lora")
    rep = export_merged_gguf(base, tmp_path / "ad", tmp_path / "k.gguf", qtype="Q4_K")
    with GGUFFile(tmp_path / "k.gguf") as o:
        t = {n: ti.type_name for n, ti in o.tensor_infos.items()}
    assert t["blk.0.ffn_down.weight"] == "Q4_K"          # 256 inputs fit
    assert t["blk.0.attn_q.weight"] == "Q5_0"            # 64 do not: llama-quantize's fallback
    assert any("do not fit Q4_K blocks: Q5_0" in n for n in rep.notes)


def test_convert_only_and_errors(tiny, tmp_path):
    rep = export_merged_gguf(tiny["Q4_1"], None, tmp_path / "f16.gguf", qtype="F16")
    assert rep.method is None and rep.paths() == {"requantize": 15}
    with GGUFFile(tmp_path / "f16.gguf") as o:
        assert o.metadata["general.file_type"] == 1
        assert o.tensor_infos["blk.0.attn_norm.weight"].type_name == "F32"
    # an adapter trained on another base: refused, nothing written
    make_adapter(tiny["Q4_1"], tmp_path / "ad", "qa-hira")
    with pytest.raises(BaseMismatchError, match="trained on base .* not on .*tiny-Q5_1.gguf.*--force"):
        export_merged_gguf(tiny["Q5_1"], tmp_path / "ad", tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="trained on a Q4_1"):   # forced: the types still must match
        export_merged_gguf(tiny["Q5_1"], tmp_path / "ad", tmp_path / "x.gguf", force=True)
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob("*.tmp*"))
    with pytest.raises(ValueError, match="picks a QDyLoRA rank"):
        export_merged_gguf(tiny["Q4_1"], tmp_path / "ad", tmp_path / "x.gguf", rank=2)
    with pytest.raises(ValueError, match="unknown quantization type"):
        export_merged_gguf(tiny["Q4_1"], tmp_path / "ad", tmp_path / "x.gguf", qtype="Q9_9")


def test_adapter_dir_lookup(tiny, tmp_path):
    make_adapter(tiny["Q4_1"], tmp_path / "run" / "adapter", "lora")
    assert find_adapter_dir(tmp_path / "run") == tmp_path / "run" / "adapter"
    assert find_adapter_dir(tmp_path / "run" / "adapter") == tmp_path / "run" / "adapter"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "adapter.safetensors").mkdir()   # a directory of that name is no adapter
    with pytest.raises(FileNotFoundError, match="no adapter in .*adapter_config.json and adapter.safetensors"):
        find_adapter_dir(tmp_path / "empty")


@pytest.mark.parametrize("method", ["qa-lora", "qa-hira"])
def test_block_offsets_are_the_dense_update_per_group(method, tiny, tmp_path):
    model = make_adapter(tiny["Q4_K"], tmp_path / "ad", method)
    for ad in A.adapters_of(model).values():
        dense = ad.delta_weight()
        torch.testing.assert_close(ad.block_offsets(), dense[:, ::ad.pool], rtol=1e-5, atol=1e-9)
        assert torch.equal(dense, dense[:, ::ad.pool].repeat_interleave(ad.pool, dim=1))  # constant per group


# ---- INTb-gG bases from a Hugging Face directory ----------------------------------------------------

def test_int_base_from_hf_dir_exports_exactly_to_q4_1(tiny, tmp_path):
    """HF dir -> quantized to INT4-g64 as training would -> QA-HiRA -> merged GGUF: Q4_1, exact."""
    export_hf(tiny["Q4_1"], None, tmp_path / "hf", dtype="fp32")
    model = load_model(tmp_path / "hf", qtype="INT4-g64")
    model = make_adapter(tmp_path / "hf", tmp_path / "ad", "qa-hira", model=model)
    rep = export_merged_gguf(tmp_path / "hf", tmp_path / "ad", tmp_path / "m.gguf", base_type="INT4-g64")
    assert rep.paths() == {"min": 14, "repack": 1}   # token_embd (INT4-g64 too) is repacked
    assert {i.out_type for n, i in rep.tensors.items() if n.startswith("blk.")} == {"Q4_1"}
    assert all(i.exact for i in rep.tensors.values() if i.base_type == "INT4-g64")
    ids = ids_for(TINY_VOCAB)
    assert rel_err(logits(load_model(tmp_path / "m.gguf"), ids), logits(model, ids)) < 2e-3
    with pytest.raises(ValueError, match="trained on a INT4-g64"):   # default: finetune's own types
        export_merged_gguf(tmp_path / "hf", tmp_path / "ad", tmp_path / "m2.gguf")


# ---- GGUF LoRA ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "qa-hira", "q-bara", "qdylora"])
def test_lora_gguf_is_llama_cpp_shaped_and_exact(method, tiny, tmp_path):
    model = make_adapter(tiny["Q4_1"], tmp_path / "ad", method)
    out = tmp_path / "lora.gguf"
    export_lora_gguf(tiny["Q4_1"], tmp_path / "ad", out)
    ads = A.adapters_of(model)
    with GGUFFile(out) as f:
        md, ty = f.metadata, f.metadata_types
        assert md["general.architecture"] == "llama" and md["general.type"] == "adapter"
        assert md["adapter.type"] == "lora" and ty["adapter.lora.alpha"] == GGUFValueType.FLOAT32
        alpha = md["adapter.lora.alpha"]
        assert len(f.tensor_infos) == 2 * len(ads)
        for mod, ad in ads.items():
            name = f"blk.{mod.split('.')[1]}.{mod.split('.')[2]}.weight"
            ia, ib = f.tensor_infos[name + ".lora_a"], f.tensor_infos[name + ".lora_b"]
            n, k = ad.out_features, ad.in_features
            r = ia.ne[1]
            assert ia.ne == (k, r) and ib.ne == (r, n) and ia.type_name == ib.type_name == "F32"
            # llama.cpp: W·x + (alpha / r) · B·(A·x), r = lora_b's ne[0]
            dw = (alpha / ib.ne[0]) * f.tensor(name + ".lora_b") @ f.tensor(name + ".lora_a")
            torch.testing.assert_close(dw, ad.delta_weight(), rtol=1e-4, atol=1e-7)
    if method == "qa-hira":  # ranks K/G differ (8 for 256 inputs, 16 for ffn_down's 512)
        assert alpha == 16.0
    export_lora_gguf(tiny["Q4_1"], tmp_path / "ad", tmp_path / "lora16.gguf", dtype="f16")
    with GGUFFile(tmp_path / "lora16.gguf") as f:
        assert {ti.type_name for ti in f.tensor_infos.values()} == {"F16"}


# ---- PEFT and HF -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "qa-hira"])
def test_peft_adapter(method, tiny, tmp_path):
    from safetensors.torch import load_file
    from lowtune.hf_names import permute_qk_hf_to_gguf
    model = make_adapter(tiny["Q4_1"], tmp_path / "ad", method)
    export_peft(tiny["Q4_1"], tmp_path / "ad", tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    t = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["lora_alpha"] == cfg["r"]
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(t) == 28
    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
    for mod, ad in A.adapters_of(model).items():
        _, i, leaf = mod.split(".")
        module = f"model.layers.{i}.{hf[leaf]}"
        a = t[f"base_model.model.{module}.lora_A.weight"]
        b = t[f"base_model.model.{module}.lora_B.weight"]
        r = cfg["rank_pattern"].get(module, cfg["r"])
        alpha = cfg["alpha_pattern"].get(module, cfg["lora_alpha"])
        assert a.shape == (r, ad.in_features) and b.shape == (ad.out_features, r)
        if leaf in ("attn_q", "attn_k"):  # HF's rotate-half order; back to GGUF's to compare
            b = permute_qk_hf_to_gguf(b, 4 if leaf == "attn_q" else 2)
        torch.testing.assert_close(alpha / r * b @ a, ad.delta_weight(), rtol=1e-4, atol=1e-7)
    if method == "qa-hira":
        assert cfg["rank_pattern"]  # ffn_down's 16 vs 8 elsewhere


def test_hf_export_round_trips(tiny, tmp_path):
    """Merged HF safetensors read back by safetensors_io (which permutes q/k into GGUF order
    again) equal bf16(deq(W) + ΔW); the model built from them matches the merged model."""
    from tokenizers import Tokenizer
    from lowtune.loading import build_model
    from lowtune.safetensors_io import HFCheckpoint
    from lowtune.tokenizer import load_tokenizer, tokenizer_metadata_from_dir
    model = make_adapter(tiny["Q4_1"], tmp_path / "ad", "lora")
    rep = export_hf(tiny["Q4_1"], tmp_path / "ad", tmp_path / "hf", dtype="bf16")
    d = tmp_path / "hf"
    assert {p.name for p in d.iterdir()} == {"model.safetensors", "config.json", "generation_config.json",
                                            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"], cfg["vocab_size"]) == (256, 2, 4, 2, 512, TINY_VOCAB)
    assert cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == "bfloat16"
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 10000.0
    (tmp_path / "plain").write_text("")   # outputs get the permissions of any new file
    assert {(d / f).stat().st_mode & 0o777 for f in ("model.safetensors", "config.json")} == \
        {(tmp_path / "plain").stat().st_mode & 0o777}
    ckpt = HFCheckpoint(d)
    assert set(ckpt.tensor_infos) == {n for n in GGUFFile(tiny["Q4_1"]).tensor_infos}
    ads = {f"blk.{m.split('.')[1]}.{m.split('.')[2]}.weight": ad for m, ad in A.adapters_of(model).items()}
    with GGUFFile(tiny["Q4_1"]) as b:
        for name in ckpt.tensor_infos:
            got = ckpt.tensor(name)
            assert got.dtype == torch.bfloat16
            if b.tensor_infos[name].ne[1:]:
                want = lowtune.dequantize(b.qtensor(name)) + (ads[name].delta_weight() if name in ads else 0)
            else:
                want = b.tensor(name)
            assert torch.equal(got, want.to(torch.bfloat16)), name
    hf_model = build_model(ckpt)   # the bf16 weights as they are, unquantized
    ids = ids_for(TINY_VOCAB)
    assert rel_err(logits(hf_model, ids), logits(model, ids)) < 0.02  # bf16 weights
    # tokenizer: the tokenizers library reads it and encodes as lowtune does; metadata round-trips
    text = "the cat sat on the mat" + SPECIAL + " then the cat"
    tok = load_tokenizer(GGUFFile(tiny["Q4_1"]).metadata)
    assert Tokenizer.from_file(str(d / "tokenizer.json")).encode(text, add_special_tokens=False).ids == tok.encode(text)
    back = tokenizer_metadata_from_dir(d)
    md = GGUFFile(tiny["Q4_1"]).metadata
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id",
                "tokenizer.chat_template"):
        assert back[key] == md[key], key
    assert rep.bytes > 0


def test_hf_export_untied_head_and_fp16(tmp_path):
    base = make_tiny_gguf(tmp_path / "u.gguf", "Q4_K", tied=False)
    export_hf(base, None, tmp_path / "hf", dtype="fp16")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("lm_head.weight").dtype == torch.float16
    assert "lm_head.weight" in keys and "model.layers.1.mlp.down_proj.weight" in keys
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is False


# ---- unmerged: eval/generate --adapter ----------------------------------------------------------------

def test_load_model_with_an_adapter(tiny, tmp_path):
    model = make_adapter(tiny["Q4_1"], tmp_path / "run" / "adapter", "qdylora")
    ids = ids_for(TINY_VOCAB)
    A.set_rank(model, 2)
    got = load_model(tiny["Q4_1"], adapter=tmp_path / "run", rank=2)
    torch.testing.assert_close(logits(got, ids), logits(model, ids))
    plain = load_model(tiny["Q4_1"])
    assert not A.adapters_of(plain)
    with pytest.raises(ValueError, match="--rank needs --adapter"):
        load_model(tiny["Q4_1"], rank=2)
    make_adapter(tiny["Q4_1"], tmp_path / "lora", "lora")
    with pytest.raises(ValueError, match="picks a QDyLoRA rank"):
        load_model(tiny["Q4_1"], adapter=tmp_path / "lora", rank=2)


# ---- CLI ------------------------------------------------------------------------------------------------

def test_cli(tiny, tmp_path, capsys):
    main = cli.main
    make_adapter(tiny["Q4_1"], tmp_path / "ad", "qa-hira")
    argv = ["export", str(tiny["Q4_1"]), "--adapter", str(tmp_path / "ad"), "-o", str(tmp_path / "m.gguf"),
            "--lora-gguf", str(tmp_path / "l.gguf"), "--peft", str(tmp_path / "peft"),
            "--report", str(tmp_path / "r.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "14 x Q4_1 -> Q4_1: min" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["kind"] for r in report] == ["merged-gguf", "lora-gguf", "peft"]
    assert report[0]["paths"] == {"copy": 1, "min": 14}
    assert (tmp_path / "l.gguf").is_file() and (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    assert main(["export", str(tiny["Q4_1"])]) == 1
    assert "nothing to export" in capsys.readouterr().err
    assert main(["export", str(tiny["Q4_1"]), "--merge"]) == 1
    assert main(["export", str(tmp_path / "missing.gguf"), "-o", str(tmp_path / "x.gguf")]) == 1
    assert "not found" in capsys.readouterr().err


def test_eval_and_generate_cli_apply_the_adapter(tiny, tmp_path, capsys):
    """`lowtune eval/generate --adapter` run base + adapter: the perplexity moves away from the
    base's and equals the exactly merged file's; a wrong --rank is a one-line error."""
    run_cli = cli.main
    make_adapter(tiny["Q4_1"], tmp_path / "run" / "adapter", "qa-hira", rel=0.2)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    assert run_cli(["export", str(tiny["Q4_1"]), "--adapter", str(tmp_path / "run"),
                    "-o", str(tmp_path / "m.gguf")]) == 0
    capsys.readouterr()

    def ppl(*argv):
        assert run_cli(["eval", *argv, "--text", str(text), "--ctx", "64", "--json", "--quiet",
                        "--device", "cpu"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]

    base = ppl(str(tiny["Q4_1"]))
    adapted = ppl(str(tiny["Q4_1"]), "--adapter", str(tmp_path / "run"))
    merged = ppl(str(tmp_path / "m.gguf"))
    # The random tiny model's perplexities are huge: compare mean log-likelihoods. The merged file
    # differs from base + adapter only by the fp16 rounding of the new mins.
    moved = abs(math.log(adapted) - math.log(base))
    assert moved > 1e-3
    assert abs(math.log(merged) - math.log(adapted)) < 0.05 * moved
    assert run_cli(["generate", str(tiny["Q4_1"]), "--adapter", str(tmp_path / "run"), "--prompt", "the",
                "-n", "4", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert run_cli(["eval", str(tiny["Q4_1"]), "--adapter", str(tmp_path / "run"), "--rank", "2",
                "--text", str(text), "--device", "cpu"]) == 1
    assert "picks a QDyLoRA rank" in capsys.readouterr().err
