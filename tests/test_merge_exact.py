"""Merge-exact training (lowtune.merge_exact, AdapterConfig.merge_exact) on tiny random models.

QA-LoRA and QA-HiRA on bases that store fp16 mins (Q4_1, Q5_1, INTb-gG) compute with the merged
weight itself: each block's min stored as fp16(m + δ), the gradient straight through that
rounding. Trained a few steps and merged, the GGUF then holds exactly the weights training
computed with and gives the same logits bit for bit; the export reads its file back and says so.
Trained without the mode, the same merge is off by the fp16 rounding, and the report says why.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lowtune
from lowtune import cli, merge_exact, ops
from lowtune.adapters import AdaptedLinear, AdapterConfig, adapter_parameters, apply_adapters, save_adapter
from lowtune.export import check_merged_gguf, export_hf, export_merged_gguf
from lowtune.loading import load_model
from lowtune.merge import describe_merge, merge_group_constant
from lowtune.train_config import TrainConfig

from helpers import TINY_VOCAB, max_rel_err as rel_err
from test_adapters import QLinear, BiasedQLinear, random_qtensor
from test_export import ids_for, logits, make_tiny_gguf

FLOAT_MIN = ["Q4_1", "Q5_1", "INT4-g64", "INT3-g128"]


# ---- the rule --------------------------------------------------------------------------------------

def test_stored_mins_is_one_fp32_add_rounded_to_nearest_even(rng):
    m = np.concatenate([rng.standard_normal(4000) * 0.1, rng.standard_normal(500) * 1e-5,
                        rng.standard_normal(500) * 300]).astype(np.float16)
    d = (rng.standard_normal(m.size) * 10.0 ** rng.integers(-8, 1, m.size)).astype(np.float32)
    got = merge_exact.stored_mins(torch.from_numpy(m), torch.from_numpy(d)).numpy()
    np.testing.assert_array_equal(got.view(np.uint16), (m.astype(np.float32) + d).astype(np.float16).view(np.uint16))
    # ties go to the even neighbour: 1 + half an ulp stays 1, 1 + 1.5 ulp becomes 1 + 2 ulp
    ulp = 2.0 ** -10
    ties = merge_exact.stored_mins(torch.ones(2, dtype=torch.float16), torch.tensor([ulp / 2, 1.5 * ulp]))
    assert ties.tolist() == [1.0, 1.0 + 2 * ulp]
    assert torch.isinf(merge_exact.stored_mins(torch.tensor([65504.0]).half(), torch.tensor([100.0])))


@pytest.mark.parametrize("qtype", FLOAT_MIN)
def test_shift_mins_moves_only_the_mins_and_is_what_the_merge_writes(qtype, rng):
    qt = lowtune.quantize(torch.from_numpy(rng.standard_normal((6, 256)).astype(np.float32) * 0.05), qtype)
    g = qt.format.block_elems
    delta = torch.from_numpy(rng.standard_normal((6, 256 // g)).astype(np.float32) * 0.02)
    out = merge_exact.shift_mins(qt, delta)
    a = qt.raw.numpy().reshape(-1, qt.format.block_bytes)
    b = out.raw.numpy().reshape(-1, qt.format.block_bytes)
    np.testing.assert_array_equal(np.delete(a, [2, 3], axis=1), np.delete(b, [2, 3], axis=1))
    assert torch.equal(merge_exact.block_mins(out), merge_exact.stored_mins(merge_exact.block_mins(qt), delta))
    assert torch.equal(merge_group_constant(qt, delta).raw, out.raw)
    with pytest.raises(ValueError, match="one value per block"):
        merge_exact.shift_mins(qt, delta[:, 1:])
    with pytest.raises(ValueError, match="store no fp16 min"):
        merge_exact.shift_mins(lowtune.quantize(torch.randn(4, 256), "Q4_K"), torch.zeros(4, 8))


# ---- one layer -------------------------------------------------------------------------------------

def exact_adapter(method, qtype, base_cls=QLinear, n=64, k=256, **kw) -> AdaptedLinear:
    """A merge-exact adapter with a random update of about 2% of the weights' scale."""
    ad = AdaptedLinear(base_cls(random_qtensor(qtype, n, k)), AdapterConfig(method=method, rank=4, alpha=8, **kw))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ad.parameters(recurse=False):
            p.copy_(torch.randn(p.shape, generator=g))
        scale = 0.02 * lowtune.dequantize(ad.base.weight).std() / ad.delta_weight().std()
        (ad.hira_M if method == "qa-hira" else ad.lora_B).mul_(scale)
    assert ad.merge_exact
    return ad


CASES = [("qa-hira", "Q4_1", {}), ("qa-hira", "Q5_1", {}), ("qa-hira", "INT4-g64", {}),
         ("qa-lora", "Q4_1", {}), ("qa-lora", "Q4_1", {"group": 64}), ("qa-lora", "INT3-g128", {})]


@pytest.mark.parametrize("method,qtype,kw", CASES)
def test_forward_is_the_merged_weights_matmul(method, qtype, kw):
    ad = exact_adapter(method, qtype, **kw)
    x = torch.randn(3, 7, 256)
    merged = merge_exact.shift_mins(ad.base.weight, ad.block_deltas().detach())
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert torch.equal(ad(x), ops.qmatmul(x, merged))
    assert torch.equal(ad.effective_weight(), lowtune.dequantize(merged))
    # the rounding is really there: the unrounded update gives other outputs
    plain = ad.base(x) + ad.reference_adapter(x)
    assert not torch.equal(ad(x), plain) and rel_err(ad(x), plain) < 1e-2


@pytest.mark.parametrize("method,qtype,kw", CASES)
def test_gradients_pass_straight_through_the_rounding(method, qtype, kw):
    """dx through the merged weight; the adapter's gradients those of the unrounded update at the
    rounded forward (checked in float64). The torch fallback (fused=False) agrees."""
    ad = exact_adapter(method, qtype, **kw)
    ref = exact_adapter(method, qtype, fused=False, **kw)
    x, dy = torch.randn(2, 9, 256), torch.randn(2, 9, 64)
    got = []
    for layer in (ad, ref):
        xx = x.clone().requires_grad_(True)
        layer(xx).backward(dy)
        got.append([xx.grad] + [p.grad for p in layer.parameters(recurse=False)])
    w = lowtune.dequantize(merge_exact.shift_mins(ad.base.weight, ad.block_deltas().detach())).double()
    x64 = x.double().requires_grad_(True)
    mats = [None if t is None else t.detach().double().requires_grad_(True) for t in ad._matrices()]
    y64 = x64 @ w.t() + ad.reference_adapter(x64.detach(), matrices=tuple(mats))  # dx through deq(W') only
    y64.backward(dy.double())
    want = [x64.grad] + [m.grad for m in mats if m is not None]
    for fused, fallback, truth in zip(*got, want):
        assert rel_err(fused, truth) < 2e-5
        assert rel_err(fallback, truth) < 2e-5


def test_other_bases_and_methods_are_untouched():
    for qtype in ("Q4_K", "Q2_K", "Q8_0", "IQ4_NL"):  # no fp16 min: the mode changes nothing
        ad = AdaptedLinear(QLinear(random_qtensor(qtype, 64, 256)), AdapterConfig(method="qa-hira"))
        assert ad.config.merge_exact and not ad.merge_exact
    biased = exact_adapter("qa-hira", "Q4_1", base_cls=BiasedQLinear)  # any base layer: base(x) + rounded update
    x = torch.randn(5, 256)
    want = ops.qmatmul(x, merge_exact.shift_mins(biased.base.weight, biased.block_deltas().detach()))
    assert rel_err(biased(x), want + biased.base.bias) < 1e-5


def test_config():
    assert AdapterConfig(method="qahira").merge_exact and AdapterConfig(method="qa-lora").merge_exact
    assert not AdapterConfig(method="lora").merge_exact and not AdapterConfig(method="q-bara").merge_exact
    assert not AdapterConfig(method="qa-hira", dropout=0.1).merge_exact  # the default gives way to dropout
    with pytest.raises(ValueError, match="applies to qa-lora and qa-hira"):
        AdapterConfig(method="lora", merge_exact=True)
    with pytest.raises(ValueError, match="no dropout"):
        AdapterConfig(method="qa-hira", dropout=0.1, merge_exact=True)
    cfg = AdapterConfig(method="qa-hira").to_dict()
    assert AdapterConfig.from_dict(cfg).merge_exact
    del cfg["merge_exact"]  # an adapter saved before the mode trained without it
    assert not AdapterConfig.from_dict(cfg).merge_exact
    assert TrainConfig.from_dict({"out": "x", "method": "qahira"}).merge_exact is False
    assert TrainConfig(method="qahira").merge_exact is None
    args = cli.build_parser().parse_args(["finetune", "m.gguf", "--merge-exact", "off"])
    from lowtune.finetune_cli import given
    assert given(args)["merge_exact"] is False


# ---- trained, merged, read back ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{type: (path, model type)}: tiny GGUFs, and an HF directory quantized to INT4-g64 on load."""
    d = tmp_path_factory.mktemp("bases")
    out = {q: (make_tiny_gguf(d / f"{q}.gguf", q), None) for q in ("Q4_1", "Q5_1", "Q4_K")}
    export_hf(out["Q4_1"][0], None, d / "hf", dtype="fp32")
    out["INT4-g64"] = (d / "hf", "INT4-g64")
    return out


def train(path, qtype, out_dir, method, steps=3, **cfg):
    """A few AdamW steps of `method` on random tokens; the adapter saved to out_dir."""
    model = load_model(path, qtype=qtype)
    apply_adapters(model, AdapterConfig(method=method, rank=4, alpha=8, seed=3, **cfg))
    params = adapter_parameters(model)
    opt = torch.optim.AdamW(params, lr=2e-2)
    model.train()
    for step in range(steps):
        model.loss(ids_for(TINY_VOCAB, seed=step, t=32)).backward()
        opt.step()
        opt.zero_grad()
    save_adapter(model, out_dir)
    return model.eval()


@pytest.mark.parametrize("qtype", ["Q4_1", "Q5_1", "INT4-g64"])
@pytest.mark.parametrize("method", ["qa-hira", "qa-lora"])
def test_trained_merge_is_bit_exact(method, qtype, bases, tmp_path):
    path, load_type = bases[qtype]
    model = train(path, load_type, tmp_path / "ad", method)
    rep = export_merged_gguf(path, tmp_path / "ad", tmp_path / "m.gguf", base_type=load_type)
    assert rep.exact and len(rep.checks) == 14
    assert all(c.differ == 0 and c.max_error == 0 and c.update_rms > 0 for c in rep.checks.values())
    assert "merge: exact" in rep.summary()[-1]
    ids = ids_for(TINY_VOCAB, seed=9)
    assert torch.equal(logits(load_model(tmp_path / "m.gguf"), ids), logits(model, ids))


@pytest.mark.parametrize("method", ["qa-hira", "qa-lora"])
def test_trained_without_the_mode_the_merge_is_off_by_the_rounding(method, bases, tmp_path):
    path, _ = bases["Q4_1"]
    model = train(path, None, tmp_path / "ad", method, merge_exact=False)
    rep = export_merged_gguf(path, tmp_path / "ad", tmp_path / "m.gguf")
    assert rep.exact is False
    off = [c for c in rep.checks.values() if not c.exact]
    assert off and all(c.path == "min" and c.max_error < 1e-3 for c in off)
    line = describe_merge(rep.checks)
    assert "fp16 mins round m + δ" in line and "--merge-exact on" in line
    ids = ids_for(TINY_VOCAB, seed=9)
    assert not torch.equal(logits(load_model(tmp_path / "m.gguf"), ids), logits(model, ids))
    # the standalone check of a file merged elsewhere says the same
    assert describe_merge(check_merged_gguf(tmp_path / "m.gguf", path, tmp_path / "ad")) == line


def test_quantized_mins_cannot_be_exact_and_the_report_says_why(bases, tmp_path):
    path, _ = bases["Q4_K"]
    model = train(path, None, tmp_path / "ad", "qa-hira", steps=1)
    assert not any(m.merge_exact for m in model.modules() if isinstance(m, AdaptedLinear))
    rep = export_merged_gguf(path, tmp_path / "ad", tmp_path / "m.gguf")
    assert rep.exact is False
    assert "Q4_K stores its mins as small integer codes" in describe_merge(rep.checks)
    assert rep.as_dict()["merge"]["exact"] is False


def test_cli_reports_the_check_and_the_perplexities(bases, tmp_path, capsys):
    path, _ = bases["Q4_1"]
    train(path, None, tmp_path / "ad", "qa-hira", steps=1)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 30)
    argv = ["export", str(path), "--adapter", str(tmp_path / "ad"), "-o", str(tmp_path / "m.gguf"),
            "--eval-text", str(text), "--eval-chunks", "2"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "merge: exact: all" in out and "(identical)" in out
    assert cli.main(["export", str(path), "-o", str(tmp_path / "x.gguf"), "--eval-text", str(text)]) == 1
    assert "--eval-text compares the merged GGUF with base + adapter" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.parametrize("method,qtype,kw", CASES)
def test_cuda_offsets_and_merged_bytes_equal_the_cpus(method, qtype, kw):
    """What a GPU run computes with is what the CPU export merges: the offsets bit for bit (float64
    products, no TF32), hence the same merged bytes; the forward is the kernel on those bytes."""
    ad = exact_adapter(method, qtype, **kw)
    cuda = exact_adapter(method, qtype, **kw).cuda()
    torch.backends.cuda.matmul.allow_tf32 = True  # must not matter
    try:
        assert torch.equal(cuda.block_deltas().cpu(), ad.block_deltas())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    merged = merge_exact.shift_mins(cuda.base.weight, cuda.block_deltas().detach())
    assert torch.equal(merged.raw.cpu(), merge_exact.shift_mins(ad.base.weight, ad.block_deltas().detach()).raw)
    x = torch.randn(2, 33, 256, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(cuda(x), ops.qmatmul(x, merged))


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["qa-hira", "qa-lora"])
def test_trained_on_cuda_the_merged_file_computes_the_same(method, bases, tmp_path):
    """Trained on the GPU in bf16, exported on the CPU: the file holds the weights the GPU trained
    with, and on the GPU it gives the adapted model's logits bit for bit."""
    path, _ = bases["Q4_1"]
    model = load_model(path, device="cuda", dtype=torch.bfloat16)
    apply_adapters(model, AdapterConfig(method=method, rank=4, alpha=8, seed=3))
    opt = torch.optim.AdamW(adapter_parameters(model), lr=2e-2)
    model.train()
    for step in range(3):
        model.loss(ids_for(TINY_VOCAB, seed=step, t=32).cuda()).backward()
        opt.step()
        opt.zero_grad()
    save_adapter(model, tmp_path / "ad")
    rep = export_merged_gguf(path, tmp_path / "ad", tmp_path / "m.gguf")
    assert rep.exact
    ids = ids_for(TINY_VOCAB, seed=9).cuda()
    merged = load_model(tmp_path / "m.gguf", device="cuda", dtype=torch.bfloat16)
    assert torch.equal(logits(merged, ids), logits(model.eval(), ids))


def test_training_says_which_linears_are_exact():
    from lowtune.adapters import merge_exact_summary
    def mk(qtype, **kw):
        return AdaptedLinear(QLinear(random_qtensor(qtype, 64, 256)), AdapterConfig(method="qa-hira", **kw))
    assert "all 2 adapted linears" in merge_exact_summary({"a": mk("Q4_1"), "b": mk("INT4-g64")})
    assert "1 of 2 adapted linears" in merge_exact_summary({"a": mk("Q4_1"), "b": mk("Q6_K")}) and "(Q6_K)" in \
        merge_exact_summary({"a": mk("Q4_1"), "b": mk("Q6_K")})
    assert merge_exact_summary({"a": mk("Q4_1", merge_exact=False)}) is None


def test_decoding_keeps_the_merged_weight_until_something_changes():
    ad = exact_adapter("qa-hira", "Q4_1").eval()
    x = torch.randn(1, 256)
    with torch.no_grad():
        y = ad(x)
        kept = ad._merged[1]
        assert torch.equal(y, ops.qmatmul(x, merge_exact.shift_mins(ad.base.weight, ad.block_deltas())))
        assert ad(torch.randn(3, 256)) is not None and ad._merged[1] is kept  # reused
        ad.hira_M.add_(0.01)  # an optimizer step: a new merged weight
        y2 = ad(x)
        assert ad._merged[1] is not kept
        assert torch.equal(y2, ops.qmatmul(x, merge_exact.shift_mins(ad.base.weight, ad.block_deltas())))
    assert torch.equal(ad(x), y2)  # with autograd: the same values, through the op
    ad.train()
    assert ad._merged is None
