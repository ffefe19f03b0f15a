"""The fused glue kernels (csrc/glue_kernels.h) against the torch formulas of lowtune.glue_ops:
RoPE (alone and with the KV-cache write), the residual add and the gated product bit for bit, RMSNorm within one rounding of the output dtype (its sum
of squares adds in another order); and a model's no-grad logits with the kernels against the
formulas. Inputs are strided as the decoder layer passes them (q, k transposed views)."""
from __future__ import annotations

import pytest
import torch

from lowtune import glue_ops, ops
from lowtune.model import LlamaModel

from helpers import quantized
from test_model import gguf_weights, tiny_config, tiny_weights

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def formula(fn, *args):
    """fn with the fused kernels switched off (the reference)."""
    old, glue_ops.FUSED = glue_ops.FUSED, False
    try:
        return fn(*args)
    finally:
        glue_ops.FUSED = old


def calls_kernel(monkeypatch, name: str) -> list:
    """Records the calls of glue kernel `name`, so a test can say the fused path ran."""
    seen = []
    real = getattr(glue_ops._C, name)
    monkeypatch.setattr(glue_ops._C, name, lambda *a: (seen.append(a), real(*a))[1])
    return seen


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,dim", [(1, 4096), (7, 576), (3, 100), (33, 64), (2, 8192), (2, 9000)])
@torch.no_grad()
def test_rms_norm(dtype, rows, dim, monkeypatch):
    g = torch.Generator(device="cuda").manual_seed(rows * dim)
    x = (torch.randn(rows, dim, device="cuda", generator=g) * 3).to(dtype)
    w = 1 + 0.1 * torch.randn(dim, device="cuda", generator=g)
    seen = calls_kernel(monkeypatch, "cuda_rms_norm")
    got = glue_ops.rms_norm(x, w, 1e-5)
    assert len(seen) == 1
    want = formula(glue_ops.rms_norm, x, w, 1e-5)
    ulp = {torch.float32: 1e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=ulp, atol=ulp)
    if dtype != torch.float32:  # fp32 keeps the sum's last bits; one rounding to 16 bits mostly hides them
        assert (got != want).float().mean() < 0.02


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,dim", [(1, 4096), (5, 576), (2, 8192), (3, 100), (1, 9000)])
@torch.no_grad()
def test_add_rms_norm(dtype, rows, dim, monkeypatch):
    """The residual add bit for bit, its norm within one rounding; rows the vector kernel cannot
    take (not whole 16-byte vectors, or more than 1024 of them) run the formulas."""
    per = 16 // torch.tensor([], dtype=dtype).element_size()
    fused = dim % per == 0 and dim // per <= 1024
    g = torch.Generator(device="cuda").manual_seed(rows + dim)
    x = (torch.randn(rows, dim, device="cuda", generator=g) * 3).to(dtype)
    r = torch.randn(rows, dim, device="cuda", generator=g).to(dtype)
    w = 1 + 0.1 * torch.randn(dim, device="cuda", generator=g)
    seen = calls_kernel(monkeypatch, "cuda_rms_norm")
    s, y = glue_ops.add_rms_norm(x, r, w, 1e-5)
    assert len(seen) == 1 and (len(seen[0]) == 10) == fused  # the residual's two pointers passed
    want_s, want_y = formula(glue_ops.add_rms_norm, x, r, w, 1e-5)
    assert torch.equal(s, want_s)
    ulp = {torch.float32: 1e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    torch.testing.assert_close(y.float(), want_y.float(), rtol=ulp, atol=ulp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("style", ["norm", "neox"])
@pytest.mark.parametrize("t,hd,d", [(1, 128, 128), (5, 64, 64), (3, 128, 64)])
@torch.no_grad()
def test_rope_bit_for_bit(dtype, style, t, hd, d, monkeypatch):
    g = torch.Generator(device="cuda").manual_seed(t * hd + d)
    b, h = 2, 3
    x = torch.randn(b, t, h, hd, device="cuda", generator=g).to(dtype).transpose(1, 2)  # as the layer passes q
    ang = torch.rand(t, d // 2, device="cuda", generator=g) * 6
    c, s = ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)
    rot = torch.stack([c, s * torch.tensor([-1.0, 1.0], device="cuda").repeat(d // 2)])
    seen = calls_kernel(monkeypatch, "cuda_rope")
    got = glue_ops.rope(x, rot, style)
    assert len(seen) == 1
    want = formula(glue_ops.rope, x, rot, style)
    assert got.shape == want.shape and torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@torch.no_grad()
def test_gated_silu_bit_for_bit(dtype, monkeypatch):
    g = torch.Generator(device="cuda").manual_seed(7)
    a = (torch.randn(3, 1000, device="cuda", generator=g) * 4).to(dtype)
    u = torch.randn(3, 1000, device="cuda", generator=g).to(dtype)
    seen = calls_kernel(monkeypatch, "cuda_silu_mul")
    got = glue_ops.gated("silu", a, u)
    assert len(seen) == 1
    assert torch.equal(got, formula(glue_ops.gated, "silu", a, u))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q4_0", "Q3_K"])
@pytest.mark.parametrize("k,residual", [(4096, True), (4096, False), (512, True), (8192, True)])
@pytest.mark.parametrize("early", ["3", "0"])
@torch.no_grad()
def test_norm_inside_the_product_bit_for_bit(dtype, qtype, k, residual, early, monkeypatch):
    """add_rms_norm_product's norm, made inside the one-row product's preparation, gives
    add_rms_norm's kernel values: x + r and the product of the normed row, bit for bit, with its
    weights loaded before the PDL wait (LOWTUNE_CUDA_EARLY_LOADS bit 1) or after."""
    monkeypatch.setenv("LOWTUNE_CUDA_EARLY_LOADS", early)
    g = torch.Generator(device="cuda").manual_seed(k + len(qtype))
    qt = quantized(torch.randn(96, k, generator=g, device="cuda").cpu() * 0.05, qtype).to("cuda")
    x = (torch.randn(1, k, device="cuda", generator=g) * 3).to(dtype)
    r = torch.randn(1, k, device="cuda", generator=g).to(dtype) if residual else None
    w = 1 + 0.1 * torch.randn(k, device="cuda", generator=g)
    got = glue_ops.add_rms_norm_product(x, r, w, 1e-5, qt)
    assert got is not None  # the fused path ran
    s, h = (x, glue_ops.rms_norm(x, w, 1e-5)) if r is None else glue_ops.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(got[0], s)
    assert torch.equal(got[1], ops.qmatmul(h, qt))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0", "INT4-g64"])
@torch.no_grad()
def test_silu_mul_inside_the_product_bit_for_bit(dtype, qtype):
    g = torch.Generator(device="cuda").manual_seed(11)
    qt = quantized(torch.randn(64, 2816, generator=g, device="cuda").cpu() * 0.05, qtype).to("cuda")
    a = (torch.randn(1, 2816, device="cuda", generator=g) * 4).to(dtype)
    u = torch.randn(1, 2816, device="cuda", generator=g).to(dtype)
    got = glue_ops.silu_mul_product(a, u, qt)
    assert got is not None
    assert torch.equal(got, ops.qmatmul(glue_ops.gated("silu", a, u), qt))


@torch.no_grad()
def test_products_with_a_glue_step_decline_what_the_one_row_kernel_does_not_take(monkeypatch):
    qt = quantized(torch.randn(64, 512) * 0.05, "Q4_K").to("cuda")
    x = torch.randn(2, 512, device="cuda", dtype=torch.bfloat16)  # two rows
    w = torch.ones(512, device="cuda")
    assert glue_ops.add_rms_norm_product(x, None, w, 1e-5, qt) is None
    assert glue_ops.silu_mul_product(x, x, qt) is None
    iq = quantized(torch.randn(64, 512) * 0.05, "IQ3_S").to("cuda")  # a grid type: its codes' one-row kernel
    assert glue_ops.add_rms_norm_product(x[:1], None, w, 1e-5, iq) is not None
    monkeypatch.setenv("LOWTUNE_CUDA_PATH", "staged")  # the policy sends the product elsewhere
    assert glue_ops.add_rms_norm_product(x[:1], None, w, 1e-5, iq) is None
    monkeypatch.delenv("LOWTUNE_CUDA_PATH")
    with torch.enable_grad():
        xg = x[:1].clone().requires_grad_()
        assert glue_ops.add_rms_norm_product(xg, None, w, 1e-5, qt) is None  # autograd: the formulas


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("style", ["norm", "neox"])
@pytest.mark.parametrize("t,h,hkv,hd,d", [(1, 8, 2, 128, 128), (1, 4, 4, 64, 32), (3, 6, 2, 64, 64)])
@torch.no_grad()
def test_rope_store_bit_for_bit(dtype, style, t, h, hkv, hd, d, monkeypatch):
    """q, k, v as views of one q/k/v product's output (as a grouped decode step passes them):
    the returned q and the caches' written positions equal the formulas', the rest is untouched."""
    g = torch.Generator(device="cuda").manual_seed(t * h + hkv * hd + d)
    b, length, pos = 2, 40, 17
    y = torch.randn(b, t, (h + 2 * hkv) * hd, device="cuda", generator=g).to(dtype)
    q, k, v = (part.view(b, t, -1, hd).transpose(1, 2) for part in y.split([h * hd, hkv * hd, hkv * hd], -1))
    rot = torch.randn(2, t, d, device="cuda", generator=g)
    caches = [torch.randn(b, hkv, length, hd, device="cuda", generator=g).to(dtype) for _ in range(2)]
    at = torch.tensor([pos], device="cuda")
    seen = calls_kernel(monkeypatch, "cuda_rope_store")
    kc, vc = (c.clone() for c in caches)
    got = glue_ops.rope_store(q, k, v, rot, style, kc, vc, at)
    assert len(seen) == 1
    wk, wv = (c.clone() for c in caches)
    want = formula(glue_ops.rope_store, q, k, v, rot, style, wk, wv, at)
    assert got.is_contiguous() and torch.equal(got, want)
    assert torch.equal(kc, wk) and torch.equal(vc, wv)
    assert torch.equal(vc[:, :, pos:pos + t], v) and not torch.equal(kc[:, :, pos:pos + t], k)
    untouched = torch.ones(length, dtype=torch.bool)
    untouched[pos:pos + t] = False
    assert torch.equal(kc[:, :, untouched], caches[0][:, :, untouched])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("h,hkv,hd,length,pos", [(32, 32, 128, 128, 95), (8, 2, 64, 40, 0), (4, 1, 256, 3000, 2999),
                                                 (6, 3, 128, 16, 7)])
@torch.no_grad()
def test_decode_attention_against_the_formula(dtype, h, hkv, hd, length, pos, monkeypatch):
    """Positions past pos hold garbage (inf and NaN among them) that the kernel must not read."""
    g = torch.Generator(device="cuda").manual_seed(h * hd + length)
    q = torch.randn(1, h, 1, hd, device="cuda", generator=g).to(dtype)
    kc, vc = (torch.randn(1, hkv, length, hd, device="cuda", generator=g).to(dtype) for _ in range(2))
    kc[:, :, pos + 1:] = float("inf")
    vc[:, :, pos + 1:] = float("nan")
    at = torch.tensor([pos], device="cuda")
    seen = calls_kernel(monkeypatch, "cuda_decode_attention")
    assert glue_ops.decode_attention_fused(q, kc, vc, at)
    got = glue_ops.decode_attention(q, kc, vc, at, 0.1)
    assert len(seen) == 1
    want = formula(glue_ops.decode_attention, q, kc[:, :, :pos + 1], vc[:, :, :pos + 1], at, 0.1)
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert torch.isfinite(got).all() and err < (2e-3 if dtype == torch.float16 else 1e-2), err


@pytest.mark.parametrize("positions", ["16", "64"])
@torch.no_grad()
def test_decode_attention_merge_in_the_split_kernel_equals_the_merge_kernel(positions, monkeypatch):
    """The last CTA of a head merging its splits' partials (a counter per head) gives the merge
    kernel's bits, call after call (the counters are set back) and replayed from a captured graph at
    other positions."""
    g = torch.Generator(device="cuda").manual_seed(7)
    q = torch.randn(1, 8, 1, 128, device="cuda", generator=g).to(torch.bfloat16)
    kc, vc = (torch.randn(1, 2, 300, 128, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
    monkeypatch.setenv("LOWTUNE_CUDA_ATTN_POSITIONS", positions)
    at = torch.tensor([0], device="cuda")
    runs = {}
    for combine in ("0", "1", "1"):
        monkeypatch.setenv("LOWTUNE_CUDA_ATTN_COMBINE", combine)
        for p in (0, 5, 120, 299):
            at.fill_(p)
            got = glue_ops.decode_attention(q, kc, vc, at, 0.1)
            assert torch.equal(runs.setdefault(p, got), got)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = glue_ops.decode_attention(q, kc, vc, at, 0.1)
    for p in (5, 120, 299, 0):
        at.fill_(p)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, runs[p])


@pytest.mark.parametrize("h,hkv,hd,length", [(8, 2, 128, 300), (4, 4, 64, 40), (4, 1, 256, 3000)])
@torch.no_grad()
def test_decode_attention_rows_prefetched_before_the_wait_change_no_bit(h, hkv, hd, length, monkeypatch):
    """The L2 prefetch of a split's key and value rows before the kernel's PDL wait
    (LOWTUNE_CUDA_EARLY_LOADS bit 2) leaves the results as without it, step after step, where the
    kernel just before (rope_store) writes the step's newest row: eagerly and replayed from a
    captured graph; and the last step agrees with the formula."""
    g = torch.Generator(device="cuda").manual_seed(h * hd + length)
    caches = [torch.randn(1, hkv, length, hd, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2)]
    positions = [p for p in (0, 1, 5, 63, 64, 65, 200, length - 2, length - 1) if p < length]
    steps = {p: torch.randn(1, 1, (h + 2 * hkv) * hd, device="cuda", generator=g).to(torch.bfloat16)
             for p in positions}
    rot = torch.randn(2, 1, hd, device="cuda", generator=g)
    y = torch.empty(1, 1, (h + 2 * hkv) * hd, device="cuda", dtype=torch.bfloat16)
    q, k, v = (part.view(1, 1, -1, hd).transpose(1, 2) for part in y.split([h * hd, hkv * hd, hkv * hd], -1))
    at = torch.tensor([0], device="cuda")

    def run(early: str, graphed: bool) -> list[torch.Tensor]:
        monkeypatch.setenv("LOWTUNE_CUDA_EARLY_LOADS", early)
        kc, vc = (c.clone() for c in caches)

        def step():
            return glue_ops.decode_attention(glue_ops.rope_store(q, k, v, rot, "norm", kc, vc, at), kc, vc, at, 0.1)
        if graphed:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step()
        outs = []
        for p in positions:
            y.copy_(steps[p])
            at.fill_(p)
            if graphed:
                graph.replay()
                outs.append(out.clone())
            else:
                outs.append(step())
        torch.cuda.synchronize()
        return outs + [kc, vc]

    seen = calls_kernel(monkeypatch, "cuda_decode_attention")
    without = run("0", False)
    assert len(seen) == len(positions)
    for early, graphed in (("3", False), ("3", True), ("0", True)):
        got = run(early, graphed)
        assert all(torch.equal(a, b) for a, b in zip(got, without)), (early, graphed)
    kc, vc = without[-2:]
    want = formula(glue_ops.decode_attention, glue_ops.rope_store(q, k, v, rot, "norm", kc.clone(), vc.clone(), at),
                   kc, vc, at, 0.1)  # the last step again, against the formula
    err = (without[-3].float() - want.float()).norm() / want.float().norm()
    assert torch.isfinite(without[-3]).all() and err < 1e-2, err


@torch.no_grad()
def test_decode_attention_kernels_refuse_head_sizes_they_lack():
    """Head size 96 (Phi-3): no kernel, so a decode step keeps its masked SDPA (StaticKVCache.attend_step)."""
    q = torch.randn(1, 4, 1, 96, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(1, 4, 32, 96, device="cuda", dtype=torch.bfloat16)
    assert not glue_ops.decode_attention_fused(q, kc, kc, torch.tensor([3], device="cuda"))


def test_autograd_takes_the_formulas(monkeypatch):
    """With autograd recording, the formulas run (the kernels have no backward)."""
    x = torch.randn(4, 64, device="cuda", requires_grad=True)
    w = torch.ones(64, device="cuda")
    seen = calls_kernel(monkeypatch, "cuda_rms_norm")
    glue_ops.rms_norm(x, w, 1e-5).sum().backward()
    assert not seen and x.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_model_logits_with_the_kernels(dtype):
    c = tiny_config(layers=2)
    model = LlamaModel(c, gguf_weights(c, tiny_weights(c), "Q8_0"), dtype).to("cuda").eval()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]], device="cuda")
    got = model(ids).float()
    want = formula(model, ids).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((got - want).norm() / want.norm()).item() < tol
