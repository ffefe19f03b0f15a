"""Adapters (lowtune.adapters) and their fused kernels (lowtune.adapter_ops).

The fused path is held to the plain torch reference (reference_adapter) and both to float64
autograd on the dequantized base; every method's update is checked against the papers' formulas
(research seeds) as a dense ΔW and as a standard LoRA pair.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import lowtune
from lowtune import _C, adapter_ops, ops
from lowtune.adapters import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, METHODS, AdaptedLinear, AdapterConfig,
                              DyLoRAController, adapter_parameters, adapters_of, apply_adapters,
                              base_hash, load_adapter, mark_only_adapters_trainable, model_base_hash,
                              quant_group, remove_adapters, save_adapter, set_rank)
from lowtune.formats import get_format

from helpers import max_rel_err as rel_err, random_blocks, write_tiny_llama_gguf


def random_qtensor(qtype: str, n: int, k: int, seed: int = 0) -> lowtune.QTensor:
    fmt = get_format(qtype)
    rng = np.random.default_rng(seed)
    if not fmt.quantized:
        return ops.quantize(torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32)) * 0.1, fmt)
    return lowtune.QTensor.from_raw(random_blocks(fmt, n, k, rng, scale=0.01), fmt, (n, k))


class QLinear(nn.Module):
    """The minimal quantized linear adapters wrap: a QTensor weight and qmatmul."""

    def __init__(self, qt):
        super().__init__()
        self.weight = qt

    def forward(self, x):
        return ops.qmatmul(x, self.weight)

    def _apply(self, fn, recurse=True):
        # .cuda()/.to(device) move the blocks too (a QTensor is not a buffer)
        w = self.weight
        self.weight = lowtune.QTensor(fn(w.raw), w.format, w.shape)
        return super()._apply(fn, recurse)


class BiasedQLinear(QLinear):
    """A base whose forward is not plain qmatmul: the adapter must not fuse into it."""

    def __init__(self, qt):
        super().__init__(qt)
        self.bias = nn.Parameter(torch.randn(qt.shape[0]) * 0.1, requires_grad=False)

    def forward(self, x):
        return ops.qmatmul(x, self.weight) + self.bias.to(x.dtype)


def make_adapter(method, qtype="Q4_1", n=96, k=256, rank=4, alpha=8.0, device="cpu", seed=0,
                 base_cls=QLinear, **kw) -> AdaptedLinear:
    """An adapter with random (non-zero) weights, so that every path carries signal. Plain mode
    (merge_exact off) unless asked: these tests hold the adapter kernels to their references;
    tests/test_merge_exact.py holds the merge-exact layers."""
    kw.setdefault("merge_exact", False)
    qt = random_qtensor(qtype, n, k, seed).to(device)
    cfg = AdapterConfig(method=method, rank=rank, alpha=alpha, **kw)
    ad = AdaptedLinear(base_cls(qt), cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return ad


def grads_of(ad, x, dy, fused=True, rank=None):
    """(y, dx, [param grads]) of base + adapter, via the fused path or the torch reference."""
    x = x.detach().clone().requires_grad_(True)
    ad.zero_grad(set_to_none=True)
    y = ad(x) if fused else ad.base(x) + ad.reference_adapter(x, rank=rank)
    y.backward(dy)
    return y.detach(), x.grad, [p.grad.clone() for p in ad.parameters(recurse=False)]


def truth64(ad, x, dy):
    """The same quantities in float64 autograd on the dequantized base (on the CPU)."""
    w = lowtune.dequantize(ad.base.weight.to("cpu"), torch.float32).double()
    x64 = x.detach().to("cpu").double().requires_grad_(True)
    mats = [None if t is None else t.detach().to("cpu").double().requires_grad_(True)
            for t in ad._matrices()]
    y = x64 @ w.t() + ad.reference_adapter(x64, matrices=tuple(mats))
    y.backward(dy.to("cpu").double())
    if getattr(ad.base, "bias", None) is not None:
        y = y + ad.base.bias.double()
    return y.detach(), x64.grad, [m.grad for m in mats if m is not None]


METHOD_BASES = [("lora", "Q4_K"), ("qa-lora", "Q4_1"), ("qa-lora", "Q4_K"), ("qa-lora", "Q2_K"),
                ("q-bara", "Q6_K"), ("q-bara", "INT3-g128"), ("qa-hira", "Q4_1"), ("qa-hira", "Q5_K"),
                ("qa-hira", "INT4-g64"), ("qdylora", "Q8_0")]


# ---- fused kernels against the torch reference and float64 ---------------------------------------
@pytest.mark.parametrize("method,qtype", METHOD_BASES)
def test_fused_matches_reference_fp32(method, qtype):
    ad = make_adapter(method, qtype, n=96, k=256)
    if method == "qdylora":
        ad.set_rank(3)
    x = torch.randn(2, 19, 256)
    dy = torch.randn(2, 19, 96)
    fused, ref, t64 = grads_of(ad, x, dy), grads_of(ad, x, dy, fused=False), truth64(ad, x, dy)
    for got, want, truth in zip([fused[0], fused[1], *fused[2]], [ref[0], ref[1], *ref[2]],
                                [t64[0], t64[1], *t64[2]]):
        assert rel_err(got, want) < 2e-5
        assert rel_err(got, truth) < 2e-5
    # the adapter's share of dx is really there (not just the base's)
    base_dx = ops.qmatmul_input_grad(dy, ad.base.weight)
    assert rel_err(fused[1], base_dx) > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", METHODS)
def test_fused_16bit_close_to_float64(method, dtype):
    ad = make_adapter(method, "Q4_K", n=64, k=256)
    x, dy = torch.randn(33, 256).to(dtype), torch.randn(33, 64).to(dtype)
    fused, t64 = grads_of(ad, x, dy), truth64(ad, x, dy)
    assert fused[0].dtype == dtype and fused[1].dtype == dtype
    for got, truth in zip([fused[0], fused[1], *fused[2]], [t64[0], t64[1], *t64[2]]):
        assert rel_err(got, truth) < 2e-2


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_reference_float64(method):
    """torch.autograd.gradcheck on base (dequantized, float64) + the reference adapter."""
    ad = make_adapter(method, "Q4_1", n=8, k=64, rank=2)
    if method == "qdylora":
        ad.set_rank(1)
    w = lowtune.dequantize(ad.base.weight).double()
    mats = tuple(t.detach().double().requires_grad_(True) for t in ad._matrices() if t is not None)
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)

    def f(x, *m):
        m = m if len(m) == 2 else (m[0], None)
        return x @ w.t() + ad.reference_adapter(x, matrices=m)
    assert torch.autograd.gradcheck(f, (x, *mats))


@pytest.mark.parametrize("method", METHODS)
def test_fp32_input_under_bf16_autocast_keeps_the_products_dtypes(method, monkeypatch):
    """An fp32 activation (an fp32 norm or relu² before the layer) under a trainer's bf16 autocast, with
    the adapter's products through torch.mm (as on CUDA from 64 rows): the same step as without autocast
    (the products pick their dtypes; autocast would cast one operand of a product and not the other)."""
    monkeypatch.setattr(ops, "_cpu_gemm_mode", lambda: "dense")
    assert adapter_ops._use_torch_gemm(torch.empty(80, 256))
    ad = make_adapter(method, "Q4_K", n=96, k=256)
    x, dy = torch.randn(80, 256), torch.randn(80, 96)
    want = grads_of(ad, x, dy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = grads_of(ad, x, dy)
    for a, b in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]]):
        assert a.dtype == b.dtype and torch.equal(a, b)

def test_non_fusable_base_accumulates_in_place():
    ad = make_adapter("q-bara", "Q4_1", n=64, k=128, base_cls=BiasedQLinear)
    assert not lowtune.adapters._fusable(ad.base)
    x, dy = torch.randn(7, 128), torch.randn(7, 64)
    fused, t64 = grads_of(ad, x, dy), truth64(ad, x, dy)
    for got, truth in zip([fused[0], fused[1], *fused[2]], [t64[0], t64[1], *t64[2]]):
        assert rel_err(got, truth) < 2e-5


@pytest.mark.parametrize("method", ["lora", "qa-lora", "q-bara"])
def test_dropout_fused_equals_reference(method):
    ad = make_adapter(method, "Q4_1", n=64, k=128, dropout=0.3)
    ref = make_adapter(method, "Q4_1", n=64, k=128, dropout=0.3, fused=False)
    ref.load_state_dict(ad.state_dict())
    x, dy = torch.randn(5, 128), torch.randn(5, 64)
    torch.manual_seed(7)
    y1, dx1, g1 = grads_of(ad, x, dy)
    torch.manual_seed(7)
    y2, dx2, g2 = grads_of(ref, x, dy)
    for a, b in zip([y1, dx1, *g1], [y2, dx2, *g2]):
        assert rel_err(a, b) < 2e-5
    ad.eval()  # no dropout in eval: equals the reference without dropout
    assert rel_err(ad(x), ad.base(x) + ad.reference_adapter(x)) < 2e-5


def test_bad_inputs_are_value_errors():
    ad = make_adapter("lora", "Q4_1", n=64, k=128)
    A, B = ad.lora_A, ad.lora_B
    geom = ad.geometry()
    with pytest.raises(ValueError, match=r"x must have shape"):
        adapter_ops.adapted_qmatmul(torch.randn(3, 64), ad.base.weight, A, B, geom)
    with pytest.raises(ValueError, match=r"float32, float16 or bfloat16"):
        adapter_ops.adapted_qmatmul(torch.randn(3, 128, dtype=torch.float64), ad.base.weight, A, B, geom)
    with pytest.raises(ValueError, match=r"B must have shape"):
        adapter_ops.adapted_qmatmul(torch.randn(3, 128), ad.base.weight, A, B[:, :2].t(), geom)
    with pytest.raises(ValueError, match=r"pool=3 must divide"):
        adapter_ops.AdapterGeometry(128, 64, pool=3)
    with pytest.raises(ValueError, match="no QTensor"):
        AdaptedLinear(nn.Linear(4, 4), AdapterConfig())
    with pytest.raises(ValueError, match="unknown adapter method"):
        AdapterConfig(method="ia3")


# ---- each method's update: ΔW, the LoRA pair, the papers' formulas ------------------------------
def paper_delta(ad: AdaptedLinear, b=None) -> torch.Tensor:
    """ΔW [N, K] written from the formulas in the research notes, independent of as_lora()."""
    c, n, k = ad.config, ad.out_features, ad.in_features
    o, i = torch.arange(n)[:, None], torch.arange(k)[None, :]
    if ad.method == "lora":
        return c.alpha / c.rank * (ad.lora_B @ ad.lora_A).detach()
    if ad.method == "qa-lora":  # y += B A pool_G(x) α/r
        g = ad.group
        return (c.alpha / c.rank * (ad.lora_B @ ad.lora_A).detach() / g)[o, i // g]
    if ad.method == "q-bara":  # ΔW[o,i] = (α/r)/p · (BA)[o//p, i//p]
        p = c.pool
        return (c.alpha / c.rank / p * (ad.lora_B @ ad.lora_A).detach())[o // p, i // p]
    if ad.method == "qa-hira":  # ΔW[o,i] = (α/r)/G · M[o, i//G]
        g = ad.group
        return (c.alpha / c.rank / g * ad.hira_M.detach())[o, i // g]
    return c.alpha / b * (ad.lora_B[:, :b] @ ad.lora_A[:b]).detach()  # qdylora


@pytest.mark.parametrize("method,qtype,n,k,rank,want_rank", [
    ("lora", "Q4_0", 64, 128, 4, 4), ("qa-lora", "Q4_K", 64, 256, 4, 4),
    ("q-bara", "Q4_1", 64, 128, 4, 8), ("qa-hira", "Q4_1", 64, 128, 4, 4),
    ("qa-hira", "Q4_1", 2, 128, 4, 2), ("qdylora", "Q4_1", 64, 128, 6, 5)])
def test_delta_weight_and_as_lora(method, qtype, n, k, rank, want_rank):
    ad = make_adapter(method, qtype, n=n, k=k, rank=rank)
    b = None
    if method == "qdylora":
        b = 5
        ad.set_rank(b)
    x = torch.randn(9, k, dtype=torch.float64)
    effect = ad.reference_adapter(x.float()).double()
    fused_effect = (ad(x.float()) - ad.base(x.float())).double()
    dw = ad.delta_weight().double()
    a2, b2 = ad.as_lora()
    assert a2.shape == (want_rank, k) and b2.shape == (n, want_rank)
    assert rel_err(dw, paper_delta(ad, b).double()) < 1e-6
    assert rel_err(effect, x @ dw.t()) < 1e-5
    assert rel_err(fused_effect, x @ dw.t()) < 1e-4
    assert rel_err((x @ a2.double().t()) @ b2.double().t(), x @ dw.t()) < 1e-5


def test_group_methods_are_constant_per_block():
    for method in ("qa-lora", "qa-hira"):
        ad = make_adapter(method, "Q4_K", n=16, k=256)
        dw = ad.delta_weight()
        g = quant_group(get_format("Q4_K"))
        blocks = dw.unflatten(1, (-1, g))
        assert torch.equal(blocks, blocks[..., :1].expand_as(blocks))
        assert torch.allclose(ad.block_offsets(), blocks[..., 0])
    with pytest.raises(ValueError, match="not constant per quantization group"):
        make_adapter("lora").block_offsets()


def test_quant_groups_and_misaligned_pooling_refused():
    assert [quant_group(get_format(t)) for t in
            ("Q4_0", "Q4_1", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "INT3-g128", "INT2-g64")] \
        == [32, 32, 32, 32, 16, 16, 32, 32, 16, 128, 64]
    assert quant_group(get_format("F16")) is None
    q41 = random_qtensor("Q4_1", 32, 192)
    with pytest.raises(ValueError, match="exactly the base's quantization group"):
        AdaptedLinear(QLinear(q41), AdapterConfig(method="qa-hira", group=64))
    with pytest.raises(ValueError, match="does not align"):
        AdaptedLinear(QLinear(q41), AdapterConfig(method="qa-lora", group=48))
    with pytest.raises(ValueError, match="does not divide"):
        AdaptedLinear(QLinear(q41), AdapterConfig(method="qa-lora", group=128))
    assert AdaptedLinear(QLinear(q41), AdapterConfig(method="qa-lora", group=64)).group == 64
    f16 = random_qtensor("F16", 32, 192)
    for method in ("qa-lora", "qa-hira"):
        with pytest.raises(ValueError, match="has none; pass group="):
            AdaptedLinear(QLinear(f16), AdapterConfig(method=method))
    assert AdaptedLinear(QLinear(f16), AdapterConfig(method="qa-hira", group=48)).group == 48
    with pytest.raises(ValueError, match="Q-BaRA pools by p=3"):
        AdaptedLinear(QLinear(random_qtensor("Q4_1", 32, 128)), AdapterConfig(method="q-bara", pool=3))


def test_init_scaling_and_parameter_counts():
    n, k, r, alpha = 96, 256, 8, 16.0
    qt = random_qtensor("Q4_K", n, k)
    x = torch.randn(4, k)
    made = {m: AdaptedLinear(QLinear(qt), AdapterConfig(method=m, rank=r, alpha=alpha)) for m in METHODS}
    for m, ad in made.items():  # the adapter is zero at step 0
        assert torch.equal(ad(x), ad.base(x)), m
    lora, qalora, qbara, qahira, dy = (made[m] for m in METHODS)
    assert lora.num_adapter_parameters == r * (k + n) == qbara.num_adapter_parameters
    assert qalora.num_adapter_parameters == r * (k // 32 + n)
    assert qahira.num_adapter_parameters == n * k // 32 and torch.all(qahira.hira_M == 0)
    assert lora.lora_A.abs().max() <= 1 / math.sqrt(k) and lora.lora_A.abs().max() > 0.9 / math.sqrt(k)
    assert qbara.lora_A.shape == (2 * r, k // 2) and qbara.lora_A.abs().max() <= 1 / math.sqrt(k // 2)
    xavier = math.sqrt(6 / (k // 32 + r))
    assert 0.8 * xavier < qalora.lora_A.abs().max() <= xavier
    assert [ad.scale() for ad in (lora, qalora, qbara, qahira)] == [alpha / r] * 4
    dy.set_rank(3)
    assert dy.scale() == alpha / 3
    rs = AdaptedLinear(QLinear(qt), AdapterConfig(method="lora", rank=r, alpha=alpha, rslora=True))
    assert rs.scale() == alpha / math.sqrt(r)
    with pytest.raises(ValueError, match="QA-HiRA has no rank"):
        AdapterConfig(method="qa-hira", rslora=True)
    kai = AdaptedLinear(QLinear(qt), AdapterConfig(method="qa-hira", hira_init="kaiming"))
    assert kai.hira_M.abs().max() > 0


# ---- QDyLoRA -------------------------------------------------------------------------------------
@pytest.mark.parametrize("update", ["all", "slice"])
def test_dylora_gradients_reach_the_right_slices(update):
    ad = make_adapter("qdylora", "Q4_1", n=64, k=128, rank=6, dylora_update=update)
    ad.set_rank(4)
    x, dy = torch.randn(5, 128), torch.randn(5, 64)
    _, _, (gA, gB) = grads_of(ad, x, dy)
    _, _, (rA, rB) = grads_of(ad, x, dy, fused=False)
    assert rel_err(gA, rA) < 2e-5 and rel_err(gB, rB) < 2e-5
    first = 3 if update == "slice" else 0
    assert torch.all(gA[:first] == 0) and torch.all(gA[4:] == 0) and torch.all(gA[first:4].abs().sum(1) > 0)
    assert torch.all(gB[:, :first] == 0) and torch.all(gB[:, 4:] == 0)
    # the forward uses every slice up to b whatever the update rule
    b4 = (ad.lora_B[:, :4] @ ad.lora_A[:4]).detach() * ad.config.alpha / 4
    assert rel_err(ad(x) - ad.base(x), x @ b4.t()) < 1e-5


def test_dylora_controller_keeps_frozen_slices_still():
    model = TinyModel(n_layers=1, seed=3)
    ads = apply_adapters(model, AdapterConfig(method="qdylora", rank=6, dylora_update="slice",
                                              targets=("attn_q", "ffn_up")))
    with torch.no_grad():
        for p in adapter_parameters(ads):
            p.normal_()
    opt = torch.optim.AdamW(adapter_parameters(ads), lr=1e-2, weight_decay=0.1)
    ctl = DyLoRAController(model, opt, seed=1)
    ids = torch.randint(0, 256, (1, 16))
    seen = set()
    for _ in range(6):
        b = ctl.sample()
        seen.add(b)
        before = [(p.detach().clone()) for p in adapter_parameters(ads)]
        model.loss(ids).backward()
        opt.step()
        opt.zero_grad()
        for ad in ads.values():
            assert ad.rank_in_use == b
        for p0, p in zip(before, adapter_parameters(ads)):
            if p.shape[0] == 6:  # lora_A [r, K]: only row b-1 moved
                rows_moved = (p0 != p).any(1)
                assert rows_moved.nonzero().flatten().tolist() == [b - 1]
            else:  # lora_B [N, r]
                cols_moved = (p0 != p).any(0)
                assert cols_moved.nonzero().flatten().tolist() == [b - 1]
    assert len(seen) > 1 and all(1 <= b <= 6 for b in seen)
    for b in range(1, 7):  # any rank is evaluable afterwards
        set_rank(model, b)
        assert torch.isfinite(model.loss(ids))
    with pytest.raises(ValueError, match="rank must be in 1..6"):
        set_rank(model, 7)


# ---- models: apply, train, save, load ------------------------------------------------------------
class TinyLayer(nn.Module):
    def __init__(self, d, f, rng):
        super().__init__()
        shapes = {"attn_q": (d, d), "attn_k": (d, d), "attn_v": (d, d), "attn_output": (d, d),
                  "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}
        for name, (n, k) in shapes.items():
            w = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32)) / math.sqrt(k)
            setattr(self, name, QLinear(ops.quantize(w, "Q4_1")))

    def forward(self, h):
        x = nn.functional.rms_norm(h, h.shape[-1:])
        q, k, v = self.attn_q(x), self.attn_k(x), self.attn_v(x)
        h = h + self.attn_output(nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
        x = nn.functional.rms_norm(h, h.shape[-1:])
        return h + self.ffn_down(nn.functional.silu(self.ffn_gate(x)) * self.ffn_up(x))


class TinyModel(nn.Module):
    """A small Llama-shaped model over bytes whose linears are quantized (Q4_1)."""

    def __init__(self, n_layers=2, d=64, f=128, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.embed = nn.Parameter(torch.from_numpy(rng.standard_normal((256, d)).astype(np.float32)) * 0.5)
        self.layers = nn.ModuleList(TinyLayer(d, f, rng) for _ in range(n_layers))

    def forward(self, ids):
        h = self.embed[ids]
        for layer in self.layers:
            h = layer(h)
        return nn.functional.rms_norm(h, h.shape[-1:]) @ self.embed.t()

    def loss(self, ids):
        logits = self(ids[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1))


def botchan_ids(text: str, n: int) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")[1000:1000 + n]), dtype=torch.long)[None]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_a_tiny_model(method, botchan_text):
    torch.manual_seed(0)
    model = TinyModel()
    cfg = AdapterConfig(method=method, rank=8, alpha=16 if method != "qa-hira" else 64, seed=1)
    ads = apply_adapters(model, cfg)
    assert len(ads) == 14 and all(isinstance(model.get_submodule(n), AdaptedLinear) for n in ads)
    params = mark_only_adapters_trainable(model)
    assert not model.embed.requires_grad
    opt = torch.optim.AdamW(params, lr=1e-2)
    ctl = DyLoRAController(model, opt) if method == "qdylora" else None
    ids = botchan_ids(botchan_text, 64)
    with torch.no_grad():
        first = model.loss(ids).item()
    for _ in range(25):
        if ctl:
            ctl.sample()
        loss = model.loss(ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
    if ctl:
        ctl.set_rank(8)
    with torch.no_grad():
        last = model.loss(ids).item()
    assert last < 0.8 * first, (first, last)


def test_apply_selects_layers_and_targets_and_removes():
    model = TinyModel(n_layers=3)
    ads = apply_adapters(model, AdapterConfig(targets=("attn_v", "ffn_down"), layers=(0, 2)))
    assert sorted(ads) == ["layers.0.attn_v", "layers.0.ffn_down", "layers.2.attn_v", "layers.2.ffn_down"]
    with pytest.raises(ValueError, match="already has adapters"):
        apply_adapters(model, AdapterConfig())
    remove_adapters(model)
    assert adapters_of(model) == {} and isinstance(model.layers[0].attn_v, QLinear)
    with pytest.raises(ValueError, match="no quantized linears named"):
        apply_adapters(model, AdapterConfig(targets=("wq",)))


def test_base_hash_is_stable_and_sensitive(tmp_path):
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    for path, seed in ((a, 0), (b, 0), (c, 1)):
        write_tiny_llama_gguf(path, "Q4_1", layers=1, seed=seed)
    assert base_hash(a) == base_hash(b) == base_hash(str(a))
    assert base_hash(a) != base_hash(c)
    from safetensors.torch import save_file
    save_file({"w": torch.ones(4, 4)}, str(tmp_path / "s1.safetensors"))
    save_file({"w": torch.ones(4, 4) * 2}, str(tmp_path / "s2.safetensors"))
    h1, h2 = base_hash(tmp_path / "s1.safetensors"), base_hash(tmp_path / "s2.safetensors")
    assert h1 != h2 and len(h1) == 64
    (tmp_path / "junk.bin").write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="neither a GGUF nor a safetensors"):
        base_hash(tmp_path / "junk.bin")
    with pytest.raises(ValueError, match="cut.gguf"):  # read by the validating reader: no crash
        (tmp_path / "cut.gguf").write_bytes(a.read_bytes()[:2000])
        base_hash(tmp_path / "cut.gguf")


def test_smollm2_base_hash_is_the_one_earlier_adapters_recorded(smollm2_path):
    """The hash is read through gguf_io.GGUFFile now; adapters trained before (whose hash came from
    a byte-level parser of its own) must keep matching their base."""
    assert base_hash(smollm2_path) == "c3867972db80858fccbc77fa9e1e8642440e688bce32dae5942da71c46dca41c"


@pytest.mark.parametrize("method", ["q-bara", "qa-hira", "qdylora"])
def test_save_and_load_roundtrip(method, tmp_path):
    model = TinyModel(seed=5)
    ads = apply_adapters(model, AdapterConfig(method=method, rank=4, targets=("attn_q", "ffn_up")))
    with torch.no_grad():
        for p in adapter_parameters(ads):
            p.normal_()
    if method == "qdylora":
        set_rank(model, 3)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        want = model(ids)
    out = save_adapter(model, tmp_path / "ad", base_hash="abc123")
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_WEIGHTS, ADAPTER_CONFIG]
    meta = json.loads((out / ADAPTER_CONFIG).read_text())
    assert meta["method"] == method and meta["base_hash"] == "abc123" and meta["rank"] == 4
    assert meta["targets"] == ["attn_q", "ffn_up"] and len(meta["modules"]) == 4
    other = TinyModel(seed=5)
    load_adapter(other, out)
    with torch.no_grad():
        assert torch.equal(other(ids), want)


def test_the_model_file_hash_is_recorded(tmp_path):
    a = write_tiny_llama_gguf(tmp_path / "a.gguf", "Q4_1", layers=1)
    model = TinyModel(n_layers=1)
    model.source_path = str(a)
    assert model_base_hash(model) == base_hash(a)
    apply_adapters(model, AdapterConfig(targets=("attn_q",)))
    save_adapter(model, tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())["base_hash"] == base_hash(a)
    model.base_hash = "given"
    assert model_base_hash(model) == "given"


def test_load_refuses_a_different_architecture(tmp_path):
    model = TinyModel(n_layers=2)
    apply_adapters(model, AdapterConfig())
    save_adapter(model, tmp_path, base_hash="h")
    small = TinyModel(n_layers=1)
    with pytest.raises(ValueError, match="do not match the adapter's"):
        load_adapter(small, tmp_path)
    assert adapters_of(small) == {}  # a refused load leaves the model as it was


@pytest.mark.parametrize("folds", [False, True], ids=["cpu_form", "cuda_form"])
@pytest.mark.parametrize("method,qtype", METHOD_BASES)
def test_cublas_path_close_to_float64(method, qtype, folds, monkeypatch):
    """The GEMM formulation that CUDA uses from cuda_policy's kAdapterCublasMinRows rows on, run
    here through torch on the CPU (fp32), against float64 autograd: outputs, input and weight
    gradients; in the CPU's form and in CUDA's (the pool's and the repeat's expansions folded
    into the GEMMs)."""
    from lowtune import adapter_ops
    monkeypatch.setattr(adapter_ops, "_use_torch_gemm", lambda t: True)
    monkeypatch.setattr(adapter_ops, "_folds", lambda t: folds)
    ad = make_adapter(method, qtype, n=96, k=256)
    if method == "qdylora":
        ad.set_rank(3)  # gradients only for the leading slices, zero-padded to the full matrices
    x, dy = torch.randn(70, 256), torch.randn(70, 96)
    got = grads_of(ad, x, dy)
    t64 = truth64(ad, x, dy)
    for a, b in zip([got[0], got[1], *got[2]], [t64[0], t64[1], *t64[2]]):
        assert a.shape == b.shape and rel_err(a, b) < 2e-5


# ---- the CPU GEMM backend against its slow twin ----------------------------------------------------
# (m, k, n, pool, repeat, rank, has_b): LoRA at training-like and decode sizes, ranks below and
# above a register tile's width, pooling and expansion (QA-LoRA, Q-BaRA), a single matrix.
CPU_TWIN_GEOMS = [(70, 96, 40, 1, 1, 16, True), (1, 64, 48, 1, 1, 3, True), (33, 128, 96, 4, 1, 5, True),
                  (40, 64, 64, 2, 2, 40, True), (9, 96, 72, 32, 1, 72, False), (130, 64, 64, 2, 4, 16, False)]


def _adapter_buffers(g, dtype, seed):
    m, k, n, p, q, r, has_b = g
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    rows = r + 2 if has_b else n // q  # a_ld wider than k/p and A taller than the rank in use
    t = dict(x=rnd(m, k).to(dtype), dy=rnd(m, n).to(dtype), A=rnd(rows, k // p + 3), B=rnd(n // q, r + 1),
             y=rnd(m, n).to(dtype), dx=rnd(m, k).to(dtype))
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("geom", CPU_TWIN_GEOMS)
def test_cpu_gemm_backend_matches_reference_twin(geom, dtype):
    m, k, n, p, q, r, has_b = geom
    ga = (m, k, n, p, q, r, None, r + 1 if has_b else 0, has_b, 0.7)
    outs = []
    for suffix in ("", "_reference"):
        t = _adapter_buffers(geom, dtype, seed=3)
        a_ld = t["A"].shape[1]
        args = ga[:6] + (a_ld,) + ga[7:]
        B = t["B"] if has_b else None
        u = torch.zeros(m, r) if has_b else None
        xs = torch.zeros(m, k // p, dtype=dtype)
        getattr(_C, "adapter_forward" + suffix)(*args, t["x"].data_ptr(), ops.ACT_DTYPES[dtype], t["A"].data_ptr(),
                                                0 if B is None else B.data_ptr(), t["y"].data_ptr(),
                                                0 if u is None else u.data_ptr(), xs.data_ptr() if p > 1 else 0)
        dA, dB = torch.zeros_like(t["A"]), torch.zeros_like(t["B"])
        du = torch.zeros(m * (r if has_b else k // p))
        getattr(_C, "adapter_backward" + suffix)(*args, t["dy"].data_ptr(), ops.ACT_DTYPES[dtype], xs.data_ptr() if p > 1
                                                 else t["x"].data_ptr(), 1 if p > 1 else p, t["A"].data_ptr(),
                                                 0 if B is None else B.data_ptr(), 0 if u is None else u.data_ptr(),
                                                 t["dx"].data_ptr(), dA.data_ptr(), dB.data_ptr() if has_b else 0,
                                                 du.data_ptr())
        outs.append([t["y"], t["dx"], dA] + ([dB, u] if has_b else []) + ([xs] if p > 1 else []))
    # Same values, fp32 sums in another order; 16-bit outputs may land one rounding apart.
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    for fast, ref in zip(*outs):
        assert rel_err(fast.float(), ref.float()) < tol


def test_cpu_gemm_backend_thread_count_does_not_change_results():
    before = _C.num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            _C.set_num_threads(threads)
            ad = make_adapter("lora", "Q4_1", n=96, k=192, rank=16)
            x, dy = torch.randn(300, 192, generator=torch.Generator().manual_seed(0)), torch.ones(300, 96)
            y, dx, grads = grads_of(ad, x, dy)
            results.append([y, dx, *grads])
    finally:
        _C.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


# ---- CUDA ----------------------------------------------------------------------------------------
CUDA_SHAPES = [(300, 512, 160), (7, 256, 64), (1030, 1024, 96)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("method,qtype", METHOD_BASES)
def test_cuda_fused_close_to_float64(method, qtype, dtype):
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for m, k, n in CUDA_SHAPES:
        ad = make_adapter(method, qtype, n=n, k=k, device="cuda")
        if method == "qdylora":
            ad.set_rank(3)
        x, dy = torch.randn(m, k), torch.randn(m, n)
        fused = grads_of(ad, x.to("cuda", dtype), dy.to("cuda", dtype))
        t64 = truth64(ad, x.to(dtype), dy.to(dtype))
        for got, truth in zip([fused[0], fused[1], *fused[2]], [t64[0], t64[1], *t64[2]]):
            assert got.device.type == "cuda"
            assert rel_err(got, truth) < tol, (m, k, n)


@pytest.mark.parametrize("pool,repeat,rank", [(1, 1, 8), (32, 1, 8), (2, 2, 16), (4, 1, 3), (1, 4, 5)])
def test_merged_factors_give_the_adapters_update(pool, repeat, rank):
    """The merged route's factors (adapter_ops._merged_factors, which CUDA's route hands the
    dequantization kernel), checked on the CPU: x·(s·Bx·Atᵀ)ᵀ is the adapter's output for pooled and
    repeated geometries, with rows and columns past the rank in use (QDyLoRA)."""
    k, n, s = 128, 64, 0.7
    geom = adapter_ops.AdapterGeometry(k, n, pool, repeat, rank, True, s)
    A = torch.randn(rank + 2, k // pool, dtype=torch.float64)
    B = torch.randn(n // repeat, rank + 2, dtype=torch.float64)
    x = torch.randn(5, k, dtype=torch.float64)
    y = torch.zeros(5, n, dtype=torch.float64)
    adapter_ops._torch_forward(x, A, B, geom, y, pool)
    bx, at = adapter_ops._merged_factors(A, B, geom)
    assert bx.shape == (n, rank) and at.shape == (k, rank)
    assert y.abs().max() > 0.1
    torch.testing.assert_close(x @ (s * bx @ at.t()).t(), y)


def test_merge_setting_read():
    """LOWTUNE_CUDA_ADAPTER_MERGE's values: auto takes the kinds timed faster, 1 the epilogue and the expanded
    update, 0 none, or kinds by name; others refused."""
    assert adapter_ops._merge_kinds("auto") == adapter_ops._MERGE_AUTO
    assert adapter_ops._merge_kinds("1") == {"epilogue", "expanded"} and not adapter_ops._merge_kinds("0")
    assert adapter_ops._merge_kinds("lowrank,expanded") == {"lowrank", "expanded"}
    for bad in ("yes", "lowrank,", "epilogue,all"):
        with pytest.raises(ValueError, match="auto, 1, 0 or kinds among lowrank, epilogue, expanded"):
            adapter_ops._merge_kinds(bad)


@pytest.mark.cuda
@pytest.mark.parametrize("setting", ["epilogue,expanded", "lowrank,expanded"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method,qtype", METHOD_BASES)
def test_cuda_merged_route_close_to_float64(method, qtype, dtype, setting, monkeypatch):
    """The adapter merged into the frozen product (adapter_ops._MERGE_KINDS: ΔW = s/p·expand_q(B·A) formed in
    the chunked path's dequantization kernel or its two factors multiplied after each chunk's GEMM, or
    QA-HiRA's s/p·expand_q(A)) against float64, and taken exactly where it applies: at the rows the GEMM
    path takes (not M = 7), both directions."""
    monkeypatch.setattr(adapter_ops, "_MERGE_KINDS", adapter_ops._merge_kinds(setting))
    calls = []
    for name in ("_forward_lowrank_kernel", "_input_grad_lowrank_kernel", "_forward_expanded_kernel",
                 "_input_grad_expanded_kernel", "_forward_epilogue_kernel", "_input_grad_epilogue_kernel"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    for m, k, n in CUDA_SHAPES:
        ad = make_adapter(method, qtype, n=n, k=k, device="cuda")
        if method == "qdylora":
            ad.set_rank(3)
        x, dy = torch.randn(m, k), torch.randn(m, n)
        calls.clear()
        merged = grads_of(ad, x.to("cuda", dtype), dy.to("cuda", dtype))
        kind = "expanded" if method == "qa-hira" else setting.split(",")[0]
        want = [f"_forward_{kind}_kernel", f"_input_grad_{kind}_kernel"] if m >= 64 else []
        assert calls == want, (method, m, calls)
        t64 = truth64(ad, x.to(dtype), dy.to(dtype))
        for got, truth in zip([merged[0], merged[1], *merged[2]], [t64[0], t64[1], *t64[2]]):
            assert rel_err(got, truth) < 2e-2, (method, m, k, n)


def gemm_path_close_to_float64(method, qtype, calls, expected):
    """The adapter's GEMM path in bf16 at two shapes (QDyLoRA at rank 16 of 32): the patched kernel's record
    `calls` equals expected(m, k, n), and the outputs and gradients stay within the route's tolerance of float64."""
    for m, k, n in ((300, 512, 256), (1030, 1024, 384)):
        ad = make_adapter(method, qtype, n=n, k=k, rank=32 if method == "qdylora" else 16, device="cuda")
        if method == "qdylora":
            ad.set_rank(16)
        x, dy = torch.randn(m, k), torch.randn(m, n)
        calls.clear()
        got = grads_of(ad, x.to("cuda", torch.bfloat16), dy.to("cuda", torch.bfloat16))
        assert calls == expected(m, k, n), (method, m, calls)
        t64 = truth64(ad, x.to(torch.bfloat16), dy.to(torch.bfloat16))
        for g, truth in zip([got[0], got[1], *got[2]], [t64[0], t64[1], *t64[2]]):
            assert rel_err(g, truth) < 2e-2, (method, m, k, n)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("r", [16, 32, 48, 64])
@pytest.mark.parametrize("stages", ["1", "2"])
def test_cuda_dual_products_match_float64(r, dtype, stages, monkeypatch):
    """g = s·dy·B and dB = s·dyᵀ·u from one read of dy (lowtune's kernel, adapter_ops._dual_products, one or two
    tile buffers) against float64 on the same rounded inputs: one row, rows ending inside a tile, and enough rows
    and columns for several row splits and column strips (fp32 sums: error far below the inputs' rounding)."""
    monkeypatch.setenv("LOWTUNE_CUDA_DUAL_STAGES", stages)
    for m, n in ((1, 128), (300, 384), (2048, 512), (1000, 4096)):  # the last: splits of several tiles
        dy, B, u = (torch.randn(shape, device="cuda").to(dtype) for shape in ((m, n), (n, r), (m, r)))
        g, dB = adapter_ops._dual_products(dy, B, u, 0.5)
        wants = (0.5 * dy.double() @ B.double(), 0.5 * dy.double().t() @ u.double())
        for got, want in zip((g, dB), wants):
            assert got.dtype == torch.float32 and got.shape == want.shape
            assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max() + 1e-6, (m, n, r)


@pytest.mark.cuda
@pytest.mark.parametrize("method,qtype", [("lora", "Q4_K"), ("qa-lora", "Q4_1"), ("q-bara", "Q6_K"),
                                          ("qdylora", "Q8_0")])
def test_cuda_dual_products_in_the_backward(method, qtype, monkeypatch):
    """With adapter_ops._DUAL the GEMM path's backward takes g and dB from the dual kernel (where N is a multiple
    of 128: the repeat folded into B's rows for Q-BaRA, QDyLoRA's leading slice) and its gradients stay within
    the route's tolerance of float64."""
    monkeypatch.setattr(adapter_ops, "_DUAL", True)
    calls = []
    real = adapter_ops._dual_products
    monkeypatch.setattr(adapter_ops, "_dual_products", lambda *a: calls.append(a[0].shape) or real(*a))
    gemm_path_close_to_float64(method, qtype, calls, lambda m, k, n: [(m, n)])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kmajor", [False, True], ids=["right_cr", "right_rc"])
@pytest.mark.parametrize("r", [16, 32, 48, 64])
def test_cuda_rank_update_matches_float64(r, kmajor, dtype, monkeypatch):
    """out += alpha·left·right by lowtune's kernel (adapter_ops._rank_update, right [c, r] or [r, c]) against
    float64 on the same rounded inputs: one row, rows ending inside a tile, several tiles of rows and columns. Each
    element is within twice the output's rounding of the truth."""
    monkeypatch.setattr(adapter_ops, "_RANK_UPDATE", True)
    for m, c in ((1, 128), (300, 384), (1030, 512), (1000, 4096)):  # the last: splits of several tiles
        out, left = (torch.randn(shape, device="cuda").to(dtype) for shape in ((m, c), (m, r)))
        right = torch.randn((r, c) if kmajor else (c, r), device="cuda").to(dtype)
        want = out.double() + 0.5 * left.double() @ (right.double() if kmajor else right.double().t())
        got = out.clone()
        assert adapter_ops._rank_update(got, left, right, kmajor, 0.5)
        ulp = want.abs() * (2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10) + 1e-4  # twice the rounding
        assert ((got.double() - want).abs() <= ulp).all(), (m, c, r)


@pytest.mark.cuda
@pytest.mark.parametrize("method,qtype", [("lora", "Q4_K"), ("qa-lora", "Q4_1"), ("q-bara", "Q6_K"),
                                          ("qdylora", "Q8_0")])
def test_cuda_rank_update_in_the_adapter(method, qtype, monkeypatch):
    """With adapter_ops._RANK_UPDATE the GEMM path adds the rank-r update to y (forward) and to dx (backward) by
    lowtune's kernel (B's rows repeated for Q-BaRA, A's columns over QA-LoRA's and Q-BaRA's pools) and the
    outputs and gradients stay within the route's tolerance of float64."""
    monkeypatch.setattr(adapter_ops, "_RANK_UPDATE", True)
    monkeypatch.setattr(adapter_ops, "_MERGE_KINDS", frozenset())  # the separate products
    calls = []
    real = adapter_ops._rank_update
    monkeypatch.setattr(adapter_ops, "_rank_update",
                        lambda *a: real(*a) and (calls.append((tuple(a[0].shape), a[3])) or True))
    gemm_path_close_to_float64(method, qtype, calls, lambda m, k, n: [((m, n), False), ((m, k), True)])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("pool", [2, 3, 4, 8, 16, 32, 64, 256, 512])
@pytest.mark.parametrize("vecs", ["1", "4"])
def test_cuda_pool_kernel_equals_the_mean(pool, dtype, vecs, monkeypatch):
    """The cuBLAS path's pooling kernel against torch's mean over the pool (fp32 sums): its
    vector paths (a pool inside a 16-byte vector, or across lanes; one or four vectors a thread, the
    last block's partly past the end) and its scalar path (a pool that fits neither, or x not 16-byte
    aligned)."""
    monkeypatch.setenv("LOWTUNE_CUDA_POOL_VECS", vecs)
    m, k = 37, 1536
    base = torch.randn(m * k + 1, device="cuda").to(dtype)
    for x in (base[:-1].view(m, k), base[1:].view(m, k)):  # aligned, then 2 or 4 bytes off
        got = adapter_ops._pool(x, pool)
        want = x.float().view(m, k // pool, pool).mean(-1)
        assert got.dtype == dtype and got.shape == (m, k // pool)
        eps = {torch.float32: 1e-6, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -10}[dtype]
        assert torch.all((got.float() - want).abs() <= eps * want.abs() + 1e-6), (pool, x.data_ptr() % 16)


@pytest.mark.cuda
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu_kernels(method):
    ad = make_adapter(method, "Q4_K", n=192, k=512)
    x, dy = torch.randn(3, 100, 512), torch.randn(3, 100, 192)
    cpu = grads_of(ad, x, dy)
    ad.to("cuda")
    ad.base.weight = ad.base.weight.to("cuda")
    gpu = grads_of(ad, x.cuda(), dy.cuda())
    for a, b in zip([gpu[0], gpu[1], *gpu[2]], [cpu[0], cpu[1], *cpu[2]]):
        assert rel_err(a, b) < 1e-5


@pytest.mark.cuda
def test_cuda_model_trains():
    torch.manual_seed(0)
    model = TinyModel(n_layers=1)
    for layer in model.layers:
        for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            getattr(layer, name).weight = getattr(layer, name).weight.to("cuda")
    model.embed.data = model.embed.data.cuda()
    ads = apply_adapters(model, AdapterConfig(method="q-bara", rank=8))
    opt = torch.optim.AdamW(mark_only_adapters_trainable(model), lr=1e-2)
    ids = torch.tensor([list(range(40, 104))], device="cuda")
    first = model.loss(ids).item()
    for _ in range(20):
        with torch.autocast("cuda", torch.bfloat16):
            loss = model.loss(ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert model.loss(ids).item() < 0.8 * first
    assert all(p.device.type == "cuda" for p in adapter_parameters(ads))


# ---- the real model (slow) -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_tail(smollm2_path, botchan_text):
    """SmolLM2-135M with a 32-token Botchan sequence, and the hidden state entering its last
    two layers (computed once: adapters go only on those layers, so the rest never changes)."""
    from lowtune.loading import load
    model, tok = load(smollm2_path)
    ids = torch.tensor([tok.encode(botchan_text[20000:22000], add_bos=False)[:32]])
    first = model.config.n_layers - 2
    rot = model.rope_rotation(0, ids.shape[1])
    with torch.no_grad():
        x = model.tok_embd(ids)
        for layer in model.layers[:first]:
            x = layer(x, rot)
        base_loss = model.loss(ids).item()
    return model, ids, first, rot, x, base_loss


def tail_loss(model, ids, first, rot, x):
    """model.loss(ids) computed from the cached input of layer `first` onwards."""
    from lowtune.model import chunked_cross_entropy
    for layer in model.layers[first:]:
        x = layer(x, rot)
    h = model.output_norm(x)[:, :-1].reshape(-1, x.shape[-1])
    targets = ids[:, 1:].reshape(-1)
    return chunked_cross_entropy(h, targets, model, 1024) / targets.numel()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_smollm2(method, smollm2_tail):
    model, ids, first, rot, x, base_loss = smollm2_tail
    cfg = AdapterConfig(method=method, rank=8, alpha=16, layers=tuple(range(first, model.config.n_layers)))
    ads = apply_adapters(model, cfg)
    try:
        assert len(ads) == 14
        opt = torch.optim.AdamW(mark_only_adapters_trainable(model), lr=5e-3)
        ctl = DyLoRAController(model, opt) if method == "qdylora" else None
        with torch.no_grad():
            assert tail_loss(model, ids, first, rot, x).item() == pytest.approx(base_loss, rel=1e-5)
        for _ in range(8):
            if ctl:
                ctl.sample()
            loss = tail_loss(model, ids, first, rot, x)
            loss.backward()
            opt.step()
            opt.zero_grad()
        if ctl:
            ctl.set_rank(8)
        with torch.no_grad():  # through the model's own API
            trained = model.loss(ids).item()
        assert trained < 0.9 * base_loss, (base_loss, trained)
    finally:
        remove_adapters(model)
