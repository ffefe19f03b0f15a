"""Training and export on I-quant bases (IQ4_NL, IQ4_XS, IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S,
IQ1_S, IQ1_M), on tiny random Llamas whose matrices, LM head included, are blocks of the type
(helpers.quantized: lowtune's quantizer where it has one, random blocks of the type for the IQ2_*
and IQ1_* types that ggml quantizes only with an importance matrix):

* every adapter method trains on every type, and streamed layers train as resident ones;
* the merged export writes the base's own type where lowtune quantizes it (one rounding of
  deq(W) + ΔW), and where it cannot (IQ2_*, IQ1_*) asks for --type and says why;
* QA-LoRA and QA-HiRA say that these types have no min to merge into.

On the real SmolLM2: test_iquant_smollm2.py.
"""
from __future__ import annotations

import logging

import pytest
import torch

import lowtune
from lowtune import adapters as A
from lowtune import cli
from lowtune.export import SavedAdapter, export_merged_gguf
from lowtune.formats import get_format
from lowtune.gguf_io import GGUFFile
from lowtune.loading import load_model
from lowtune.methods import METHODS

from helpers import TINY_VOCAB, fill_adapters, norm_rel_err, rand_ids, resident_and_streamed, write_tiny_llama_gguf
from test_export import make_adapter
from test_streaming import step_losses

IQUANTS = ["IQ4_NL", "IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"]
WRITABLE = [q for q in IQUANTS if not get_format(q).needs_imatrix]   # IQ4_NL, IQ4_XS, IQ3_XXS, IQ3_S


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """base(qtype): a tiny Llama (rows of 256, one layer) with every matrix in qtype, written once."""
    d, made = tmp_path_factory.mktemp("iq_bases"), {}

    def make(qtype):
        if qtype not in made:
            made[qtype] = write_tiny_llama_gguf(d / f"tiny-{qtype}.gguf", qtype, dim=256, ffn=256, layers=1,
                                                heads=4, kv_heads=2, emb_scale=0.2)
        return made[qtype]
    return make


@pytest.mark.parametrize("qtype", IQUANTS)
def test_every_method_trains_on_the_base(qtype, base):
    model = load_model(base(qtype))
    assert set(model.tensor_types.values()) == {qtype, "F32"}
    ids = rand_ids(2, 16, vocab=TINY_VOCAB)
    for method in METHODS:
        ads = A.apply_adapters(model, A.AdapterConfig(method=method, rank=4, alpha=8))
        assert {ad.base_type for ad in ads.values()} == {qtype}
        if method in ("qa-lora", "qa-hira"):  # pooled over the type's scale groups (16 or 32)
            assert {ad.group for ad in ads.values()} == {get_format(qtype).scale_group}
        losses, grads = step_losses(model, ids, steps=2, lr=2e-2)
        assert all(torch.isfinite(g).all() for g in grads.values()), method
        for name in ads:  # every adapter gets a gradient (LoRA's A only once B is non-zero)
            assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith(name + ".")), (method, name)
        assert losses[1] < losses[0], (method, losses)
        A.remove_adapters(model)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("qtype,method", zip(IQUANTS, METHODS * 2))
def test_streamed_training_equals_resident(qtype, method, base, device):
    def adapted():
        m = load_model(base(qtype))
        A.apply_adapters(m, A.AdapterConfig(method=method, rank=4, alpha=8))
        A.mark_only_adapters_trainable(m)
        fill_adapters(m, torch.Generator().manual_seed(1))
        return m
    resident, streaming, plan = resident_and_streamed(adapted, device, [0])
    assert plan.streamed == [0]
    ids = rand_ids(2, 16, vocab=TINY_VOCAB).to(device)
    want, want_g = step_losses(resident, ids)
    got, got_g = step_losses(streaming, ids)
    tol = dict(rtol=1e-5, atol=1e-6) if device == "cpu" else dict(rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), **tol)
    for name in want_g:
        torch.testing.assert_close(got_g[name], want_g[name], **tol, msg=name)
    assert streaming.streamer.bytes_copied > 0


@pytest.mark.parametrize("qtype,method", [("IQ4_NL", "lora"), ("IQ4_XS", "q-bara"), ("IQ3_XXS", "qdylora"),
                                          ("IQ3_S", "lora"), ("IQ4_XS", "qa-hira")])
def test_merge_writes_the_base_type(qtype, method, base, tmp_path):
    """One rounding of deq(W) + ΔW into the tensor's own type, which lowtune's quantizer writes
    as llama.cpp's would (test_iquants). The update is large (50 % of RMS(W)) so that what
    survives the rounding is measurable: the merged file's logits are nearer base + adapter than
    the base's by a factor of 0.2-0.3 (4-bit types) and 0.4-0.55 (3-bit), measured."""
    model = make_adapter(base(qtype), tmp_path / "ad", method, rel=0.5)
    out = tmp_path / "merged.gguf"
    rep = export_merged_gguf(base(qtype), tmp_path / "ad", out)
    ad = SavedAdapter(tmp_path / "ad")
    assert rep.paths() == {"requantize": len(ad.tensor_names), "copy": 1}
    if method == "qa-hira":
        assert any(f"{qtype} has no min" in n for n in rep.notes)
    with GGUFFile(base(qtype)) as b, GGUFFile(out) as o:
        for name in ad.tensor_names:
            assert o.tensor_infos[name].type_name == qtype
            qt = b.qtensor(name)
            want = lowtune.quantize(lowtune.dequantize(qt) + ad.adapted(name, qt).delta_weight(), qtype)
            assert torch.equal(o.qtensor(name).raw, want.raw), name
    ids = rand_ids(2, 16, vocab=TINY_VOCAB)
    with torch.no_grad():
        want = model(ids)
        before = norm_rel_err(load_model(base(qtype))(ids), want)
        after = norm_rel_err(load_model(out)(ids), want)
    assert after < (0.35 if qtype.startswith("IQ4") else 0.7) * before, (before, after)


@pytest.mark.parametrize("qtype", [q for q in IQUANTS if q not in WRITABLE])
def test_merge_into_an_imatrix_type_needs_type(qtype, base, tmp_path):
    make_adapter(base(qtype), tmp_path / "ad", "lora")
    with pytest.raises(ValueError, match=rf"needs --type.*7 x {qtype}.*importance matrix.*--type IQ4_XS"):
        export_merged_gguf(base(qtype), tmp_path / "ad", tmp_path / "m.gguf")
    assert not list(tmp_path.glob("m.gguf*"))
    with pytest.raises(ValueError, match=rf"--type {qtype}: .*importance matrix.*use IQ4_XS"):
        export_merged_gguf(base(qtype), tmp_path / "ad", tmp_path / "m.gguf", qtype=qtype)
    rep = export_merged_gguf(base(qtype), tmp_path / "ad", tmp_path / "m.gguf", qtype="IQ4_XS")
    with GGUFFile(tmp_path / "m.gguf") as o:
        assert {ti.type_name for ti in o.tensor_infos.values() if len(ti.ne) == 2} == {"IQ4_XS"}
    assert rep.paths() == {"requantize": 8}
    # no adapter: the base converts to another type, or copies into its own
    export_merged_gguf(base(qtype), None, tmp_path / "copy.gguf")
    with GGUFFile(base(qtype)) as b, GGUFFile(tmp_path / "copy.gguf") as o:
        assert all(torch.equal(o.raw(n), b.raw(n)) for n in b.tensor_infos)


def test_qa_methods_say_the_base_has_no_min(base, tmp_path, botchan_text, caplog, capsys):
    # Through the command line on an IQ2_XXS base: QA-HiRA trains and warns at setup; the merge
    # asks for --type and then writes it.
    text = tmp_path / "t.txt"
    text.write_text(botchan_text[:6000])
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="lowtune"):
        assert cli.main(["finetune", str(base("IQ2_XXS")), "--data", str(text), "--method", "qahira", "--steps",
                         "2", "--seq-len", "32", "--batch", "2", "--eval-tokens", "64", "--eval-every", "0",
                         "--device", "cpu", "-o", str(run)]) == 0
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "QA-HiRA" in said and "IQ2_XXS has no min to merge into" in said
    assert all(w in said for w in ("Q4_1, Q5_1 and INTb-gG", "lora, q-bara or qdylora"))
    capsys.readouterr()
    assert cli.main(["export", str(base("IQ2_XXS")), "--adapter", str(run), "-o", str(tmp_path / "m.gguf")]) == 1
    assert "needs --type" in capsys.readouterr().err
    assert cli.main(["export", str(base("IQ2_XXS")), "--adapter", str(run), "-o", str(tmp_path / "m.gguf"),
                     "--type", "IQ4_XS", "--quiet"]) == 0
    assert load_model(tmp_path / "m.gguf", adapter=None).tensor_types["blk.0.attn_q.weight"] == "IQ4_XS"
    # the rule: group-constant methods on types without a min, and nothing else
    assert A.no_min_note("qalora", ["IQ4_XS", "F32"]).startswith("QA-LoRA pools")
    assert "IQ1_M, IQ4_NL have no min" in A.no_min_note("qa-hira", ["IQ4_NL", "IQ1_M"])
    assert A.no_min_note("lora", ["IQ4_XS"]) is None and A.no_min_note("qa-hira", ["Q4_1", "Q4_K"]) is None
