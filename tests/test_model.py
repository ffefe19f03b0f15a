"""The Llama model: tiny random models built in memory (fast), and the real SmolLM2.

The fast tests compare against a reference written the Hugging Face way (weights in HF row order,
rotate-half RoPE, explicit softmax attention): GGUF's q/k row permutation plus adjacent-pair RoPE
must give the same logits.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowtune
from lowtune import ops
from lowtune.generate import generate, sample_next
from lowtune.model import (LINEAR_NAMES, KVCache, LlamaConfig, LlamaModel, QLinear, apply_rope,
                           chunked_cross_entropy, embedding_rows, rope_inv_freq)

from conftest import devices
from helpers import compiled_decoder_steps, gguf_weights, rand_ids, tiny_config, tiny_model, tiny_weights

# ----------------------------------------------------------------------------------------------
# a tiny random model, and an independent Hugging Face-style reference


def hf_reference_logits(c: LlamaConfig, hf: dict, ids: torch.Tensor) -> torch.Tensor:
    """Llama forward as Hugging Face writes it, in float64: rotate-half RoPE on HF-order rows."""
    d = {k: v.double() for k, v in hf.items()}

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.norm_eps) * w

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    b, t = ids.shape
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim))
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    x = d["embed"][ids]
    mask = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)
    rep = c.n_heads // c.n_kv_heads
    for i in range(c.n_layers):
        h = rms(x, d[f"{i}.ln1"])
        q = (h @ d[f"{i}.q"].T).view(b, t, c.n_heads, c.head_dim).transpose(1, 2)
        k = (h @ d[f"{i}.k"].T).view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = (h @ d[f"{i}.v"].T).view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c.head_dim) + mask, -1) @ v
        x = x + att.transpose(1, 2).reshape(b, t, -1) @ d[f"{i}.o"].T
        h = rms(x, d[f"{i}.ln2"])
        x = x + (F.silu(h @ d[f"{i}.gate"].T) * (h @ d[f"{i}.up"].T)) @ d[f"{i}.down"].T
    x = rms(x, d["norm"])
    return x @ d.get("lm_head", d["embed"]).T


# ----------------------------------------------------------------------------------------------
# forward against the reference


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (4, 1)])
def test_forward_matches_hf_reference(tied, heads):
    model, hf = tiny_model("F32", tied=tied, n_heads=heads[0], n_kv_heads=heads[1])
    ids = rand_ids(2, 13)
    ref = hf_reference_logits(model.config, hf, ids)
    got = model(ids)
    assert got.shape == (2, 13, 101) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "F16"])
def test_packed_forward_matches_dequantized_reference(qtype):
    """Packed weights give the reference's logits computed from the same, dequantized weights."""
    model, hf = tiny_model(qtype)
    c = model.config
    deq = dict(hf)
    deq["embed"] = lowtune.dequantize(model.tok_embd.weight)
    for i, layer in enumerate(model.layers):
        for ours, theirs in [("attn_v", "v"), ("attn_output", "o"), ("ffn_gate", "gate"), ("ffn_up", "up"),
                             ("ffn_down", "down")]:
            deq[f"{i}.{theirs}"] = lowtune.dequantize(getattr(layer, ours).weight)
        for ours, theirs, nh in [("attn_q", "q", c.n_heads), ("attn_k", "k", c.n_kv_heads)]:
            w = lowtune.dequantize(getattr(layer, ours).weight)  # GGUF order -> back to HF order
            deq[f"{i}.{theirs}"] = w.reshape(nh, -1, 2, c.dim).swapaxes(1, 2).reshape(w.shape)
    ids = rand_ids(1, 9)
    torch.testing.assert_close(model(ids).double(), hf_reference_logits(c, deq, ids), atol=5e-4, rtol=1e-4)


def test_bf16_activations_close_to_fp32():
    m32, _ = tiny_model("Q8_0")
    m16, _ = tiny_model("Q8_0", dtype=torch.bfloat16)
    ids = rand_ids(1, 11)
    a, b = m32(ids), m16(ids)
    assert b.dtype == torch.float32  # logits are returned in fp32 either way
    assert (a - b).abs().max() < 0.1 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8


# ----------------------------------------------------------------------------------------------
# KV cache and generation


@pytest.mark.parametrize("device", devices())
def test_kv_cache_equals_full_recompute(device):
    model, _ = tiny_model("Q4_1", device=device)
    ids = rand_ids(2, 12).to(device)
    full = model(ids)
    cache = model.new_cache(batch=2, max_len=16)
    parts = [model(ids[:, :5], cache), model(ids[:, 5:8], cache)]  # prefill, then 3 at once
    parts += [model(ids[:, t:t + 1], cache) for t in range(8, 12)]   # then one at a time
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)


def test_generate_greedy_equals_argmax_without_cache():
    model, _ = tiny_model("Q8_0")
    prompt = [3, 14, 15, 92, 65]
    got = generate(model, prompt, max_new_tokens=10)
    seq = list(prompt)
    for _ in range(10):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[len(prompt):]


def test_generate_stops_at_stop_id_and_is_seeded():
    model, _ = tiny_model("Q8_0")
    greedy = generate(model, [1, 2, 3], max_new_tokens=8)
    stop = greedy[3]
    first = greedy.index(stop)
    assert generate(model, [1, 2, 3], 8, stop_ids={stop}) == greedy[:first + 1]
    a = generate(model, [1, 2, 3], 8, temperature=1.0, top_p=0.9, seed=7)
    b = generate(model, [1, 2, 3], 8, temperature=1.0, top_p=0.9, seed=7)
    assert a == b and len(a) == 8


# (qtype, tied, heads, kv heads, head_dim, rope_dim, dim, ffn, YaRN factor): legacy, K-type, NVFP4
# and low-bit blocks, GQA and plain heads, RoPE on part of each head, a separate LM head, YaRN.
DECODER_CASES = [("Q4_1", True, 4, 2, 16, 16, 64, 96, 0.0), ("Q8_0", False, 4, 4, 16, 8, 64, 96, 0.0),
                 ("Q4_K", True, 8, 2, 32, 32, 256, 256, 0.0), ("Q5_0", True, 4, 1, 16, 16, 64, 64, 4.0),
                 ("NVFP4", True, 4, 2, 16, 16, 64, 128, 0.0), ("TQ2_0", False, 8, 2, 32, 32, 256, 256, 0.0),
                 ("Q1_0", True, 4, 2, 32, 32, 128, 128, 0.0)]


@pytest.mark.parametrize("qtype,tied,heads,kv,hd,rd,dim,ffn,yarn", DECODER_CASES)
def test_compiled_cpu_decoder_matches_the_model(qtype, tied, heads, kv, hd, rd, dim, ffn, yarn):
    # lowtune._C.CpuDecoder against the model's own forward, one token at a time after a prefill:
    # the same logits and the same cached keys/values (float32 summation order apart).
    from lowtune.families import yarn_magnitude
    c = tiny_config(n_heads=heads, n_kv_heads=kv, head_dim=hd, dim=dim, ffn=ffn)
    c.rope_dim, c.rope_yarn_factor, c.rope_attn_factor, c.rope_orig_context = rd, yarn, yarn_magnitude(yarn), 8
    model = LlamaModel(c, gguf_weights(c, tiny_weights(c, tied=tied), qtype)).eval()
    ids = torch.randint(0, c.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    steps, ours, theirs = compiled_decoder_steps(model, ids, 5, max_len=16)
    assert steps is not None
    for got, want in steps:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert ours.length == theirs.length == 12
    for a, b in zip(ours.k + ours.v, theirs.k + theirs.v):
        torch.testing.assert_close(a[:, :, :12], b[:, :, :12], rtol=1e-4, atol=1e-5)


def test_compiled_cpu_decoder_applies_only_where_it_runs_the_model():
    from lowtune.adapters import AdapterConfig, apply_adapters
    from lowtune.generate import GenerationStats, cpu_decoder
    model, _ = tiny_model("Q4_1")
    assert cpu_decoder(model, model.new_cache(1, 8)) is not None
    stats = GenerationStats()
    out = generate(model, [3, 1, 4], max_new_tokens=6, stats=stats)
    assert stats.compiled_decoder and stats.prompt_tokens == 3 and stats.decode_tokens == len(out) - 1 == 5
    assert stats.decode_seconds > 0 and stats.decode_tokens_per_second > 0
    assert cpu_decoder(model, model.new_cache(2, 8)) is None                         # batch 2
    assert cpu_decoder(tiny_model("F32")[0], model.new_cache(1, 8)) is None         # float matrices
    assert cpu_decoder(tiny_model("Q4_1", dtype=torch.bfloat16)[0], model.new_cache(1, 8)) is None
    biased, _ = tiny_model("Q4_1")
    biased.layers[1].attn_v.bias = torch.ones(biased.layers[1].attn_v.out_features)
    assert cpu_decoder(biased, biased.new_cache(1, 8)) is not None                  # biases: taken
    biased.layers[1].attn_v.bias = torch.ones(biased.layers[1].attn_v.out_features, dtype=torch.bfloat16)
    assert cpu_decoder(biased, biased.new_cache(1, 8)) is None                      # a bf16 bias
    tempered, _ = tiny_model("Q4_1")
    tempered.config.attn_temperature, tempered.config.rope_orig_context = 0.5, 4
    assert cpu_decoder(tempered, tempered.new_cache(1, 8)) is None                  # queries scaled past 4
    assert cpu_decoder(tempered, tempered.new_cache(1, 4)) is not None
    apply_adapters(model, AdapterConfig(method="lora", rank=2))
    assert cpu_decoder(model, model.new_cache(1, 8)) is None                         # adapters
    stats = GenerationStats()
    generate(model, [3, 1, 4], max_new_tokens=3, stats=stats)
    assert not stats.compiled_decoder and stats.decode_tokens == 2


def test_compiled_cpu_decoder_applies_to_a_llama_gguf(tmp_path):
    # a file's config (defaults filled in from its metadata) is still a plain Llama's
    from lowtune.generate import cpu_decoder
    from helpers import write_tiny_llama_gguf
    model = lowtune.load_model(write_tiny_llama_gguf(tmp_path / "tiny.gguf", "Q4_1"))
    assert cpu_decoder(model, model.new_cache(1, 8)) is not None


def test_sample_next_filters():
    logits = torch.tensor([0.0, 5.0, 4.9, -1.0])
    assert sample_next(logits) == 1
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 1.0, top_k=1, generator=g) for _ in range(20)} == {1}
    assert {sample_next(logits, 1.0, top_p=0.3, generator=g) for _ in range(20)} == {1}
    # top-k 2 never picks outside the two best; at a high temperature both appear
    seen = {sample_next(logits, 5.0, top_k=2, generator=g) for _ in range(200)}
    assert seen == {1, 2}


# ----------------------------------------------------------------------------------------------
# loss


def _plain_loss(model, ids, labels):
    logits = model(ids)[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def test_chunked_loss_equals_cross_entropy():
    model, _ = tiny_model("Q8_0")
    model.loss_chunk_tokens = 7  # several chunks and a ragged last one
    ids = rand_ids(3, 10)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[2, 7:] = -100
    torch.testing.assert_close(model.loss(ids, labels), _plain_loss(model, ids, labels), atol=1e-5, rtol=1e-5)
    n = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(model.loss(ids, labels, reduction="sum"), _plain_loss(model, ids, labels) * n,
                               atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("wrap_head", [False, True])
def test_negative_targets_are_not_scored(wrap_head):
    """The GPU loss keeps unscored rows in place (target -1, no data-dependent shape): they add
    nothing to the loss and get exactly zero gradient, as if they had been dropped."""
    model, _ = tiny_model("Q8_0", tied=False)
    if wrap_head:
        model.output = _Wrapped(model.output)
    g = torch.Generator().manual_seed(4)
    h = torch.randn(13, 64, generator=g, requires_grad=True)
    t = torch.randint(0, 101, (13,), generator=g)
    t[[0, 5, 6, 12]] = -1
    loss = chunked_cross_entropy(h, t, model, chunk=4)
    loss.backward()
    keep = t >= 0
    h2 = h.detach()[keep].clone().requires_grad_()
    ref = chunked_cross_entropy(h2, t[keep], model, chunk=4)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-6)
    assert torch.equal(h.grad[~keep], torch.zeros_like(h.grad[~keep]))
    torch.testing.assert_close(h.grad[keep], h2.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("wrap_head", [False, True])
def test_chunked_head_gradient_equals_autograd(wrap_head):
    """d loss / d h from the fused chunked head equals autograd through a plain head."""
    model, _ = tiny_model("Q8_0", tied=False)
    if wrap_head:  # an adapter-like wrapper on `output` takes the checkpointed path
        model.output = _Wrapped(model.output)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(19, 64, generator=g, requires_grad=True)
    t = torch.randint(0, 101, (19,), generator=g)
    loss = chunked_cross_entropy(h, t, model, chunk=5) * 0.5
    loss.backward()
    h2 = h.detach().clone().requires_grad_()
    ref = F.cross_entropy(model.lm_head(h2).float(), t, reduction="sum") * 0.5
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("cap,bias", [(0.0, False), (7.5, True)])
def test_head_vocab_chunks_equal_row_chunks(device, cap, bias):
    """The LM head's two chunkings (rows of logits, or vocabulary chunks over every row with an
    online log-sum-exp) give the loss and dh of autograd through the whole head, soft-cap, bias
    and unscored rows included; a ragged last vocabulary chunk too."""
    from lowtune.model import _HeadCrossEntropy, _head_ce_row_chunks, _head_ce_vocab_chunks
    g = torch.Generator().manual_seed(11)
    vocab, dim, n = 203, 64, 37
    weight = ops.quantize(torch.randn(vocab, dim, generator=g), "Q8_0").to(device)
    b = (torch.randn(vocab, generator=g) if bias else None)
    b = None if b is None else b.to(device)
    h = torch.randn(n, dim, generator=g).to(device)
    t = torch.randint(0, vocab, (n,), generator=g)
    t[[0, 9, 36]] = -1
    t = t.to(device)
    w = ops.dequantize(weight, torch.float32)
    hr = h.clone().requires_grad_()
    z = hr @ w.T + (0 if b is None else b)
    if cap:
        z = torch.tanh(z / cap) * cap
    ref = F.cross_entropy(z, t.clamp(min=-100).masked_fill(t < 0, -100), reduction="sum", ignore_index=-100)
    ref.backward()
    for got, dh in (_head_ce_row_chunks(h, t, weight, b, cap, 8, True),
                    _head_ce_vocab_chunks(h, t, weight, b, cap, 48, True)):   # 48, 96, ..., 192, 11
        torch.testing.assert_close(got, ref.detach(), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(dh, hr.grad, atol=1e-5, rtol=1e-4)
        assert torch.equal(dh[t < 0], torch.zeros_like(dh[t < 0]))
    # the autograd function (vocabulary chunks past two row chunks on CUDA), without a gradient
    loss = _HeadCrossEntropy.apply(h, t, weight, b, cap, 8, False)
    torch.testing.assert_close(loss, ref.detach(), atol=1e-4, rtol=1e-5)


class _Wrapped(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base = base
        self.delta = nn.Parameter(torch.zeros(base.out_features))

    def forward(self, x):
        return self.base(x) + self.delta


class _Lora(nn.Module):
    def __init__(self, base: QLinear, r=2):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.base = base
        self.a = nn.Parameter(torch.randn(r, base.in_features, generator=g) * 0.1)
        self.b = nn.Parameter(torch.randn(base.out_features, r, generator=g) * 0.1)

    def forward(self, x):
        return self.base(x) + (x @ self.a.T) @ self.b.T


@pytest.mark.parametrize("checkpointing", [False, True])
def test_loss_gradients_reach_adapters(checkpointing):
    """Training path: grads of adapter params through the chunked loss equal those through a plain CE
    (and are the same with per-layer activation checkpointing)."""
    def build():
        model, _ = tiny_model("Q4_1")
        for layer in model.layers:
            layer.attn_q = _Lora(layer.attn_q)
            layer.ffn_down = _Lora(layer.ffn_down)
        return model

    ids = rand_ids(2, 9)
    m1, m2 = build(), build()
    m1.gradient_checkpointing = checkpointing
    m1.loss_chunk_tokens = 4
    m1.loss(ids).backward()
    _plain_loss(m2, ids, ids).backward()
    for (n1, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert p1.grad is not None and p1.grad.abs().sum() > 0, n1
        torch.testing.assert_close(p1.grad, p2.grad, atol=1e-5, rtol=1e-4)
    # only what is trained is in the state dict: base blocks and norms are not
    assert set(m1.state_dict()) == {n for n, _ in m1.named_parameters()}


# ----------------------------------------------------------------------------------------------
# pieces


def test_gqa_shapes():
    model, _ = tiny_model("Q8_0", n_heads=8, n_kv_heads=2, head_dim=8)
    layer = model.layers[0]
    assert (layer.attn_q.out_features, layer.attn_k.out_features, layer.attn_v.out_features) == (64, 16, 16)
    assert [n for n in LINEAR_NAMES if isinstance(getattr(layer, n), QLinear)] == list(LINEAR_NAMES)
    cache = model.new_cache(batch=3, max_len=20)
    assert isinstance(cache, KVCache) and cache.k[0].shape == (3, 2, 20, 8)
    out = model(rand_ids(3, 6), cache)
    assert out.shape == (3, 6, 101) and cache.length == 6
    with pytest.raises(ValueError, match="not a multiple"):
        tiny_model(n_heads=6, n_kv_heads=4, head_dim=8, dim=48)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0", "F16", "F32"])
def test_embedding_rows_equals_dequantized_rows(qtype):
    w = torch.randn(50, 64)
    qt = ops.quantize(w, qtype)
    ids = torch.tensor([[3, 3, 49], [0, 17, 2]])
    got = embedding_rows(qt, ids)
    assert got.shape == (2, 3, 64)
    torch.testing.assert_close(got, lowtune.dequantize(qt)[ids])
    assert embedding_rows(qt, ids, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0", "F16"])
def test_embedding_rows_decoded_on_another_device(device, qtype):
    """Blocks in host memory, rows decoded on `device` (a streamed model's host embedding: only
    the gathered packed rows cross, from pinned memory on CUDA): the same values as decoding
    where the blocks are, ids from either device."""
    w = torch.randn(300, 256)
    qt = ops.quantize(w, qtype)
    ids = torch.tensor([[7, 299, 7], [0, 128, 31]])
    want = embedding_rows(qt, ids, torch.bfloat16)
    for where in ("cpu", device):
        got = embedding_rows(qt, ids.to(where), torch.bfloat16, device=torch.device(device))
        assert got.device.type == device and got.dtype == torch.bfloat16
        assert torch.equal(got.cpu(), want)


def test_rope_is_relative_and_identity_at_zero():
    c = tiny_config()
    inv = rope_inv_freq(c)
    def rot(pos):  # apply_rope's table: cosines, and sines signed (-, +) within each pair
        c, s = (pos * inv).cos(), (pos * inv).sin()
        return torch.stack((torch.stack((c, c), -1), torch.stack((-s, s), -1))).flatten(-2)[:, None].float()

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)
    torch.testing.assert_close(apply_rope(q, rot(0)), q)
    dot = lambda m, n: float((apply_rope(q, rot(m)) * apply_rope(k, rot(n))).sum())
    assert abs(dot(7, 3) - dot(24, 20)) < 1e-4 and abs(dot(7, 3) - dot(3, 7)) > 1e-3


def test_config_from_metadata():
    md = {"general.architecture": "llama", "llama.embedding_length": 576, "llama.block_count": 30,
          "llama.feed_forward_length": 1536, "llama.attention.head_count": 9,
          "llama.attention.head_count_kv": 3, "llama.rope.freq_base": 100000.0,
          "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.context_length": 8192,
          "llama.vocab_size": 49152, "llama.rope.dimension_count": 64}
    c = LlamaConfig.from_gguf_metadata(md)
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.rope_dim, c.vocab_size) == \
        (576, 30, 9, 3, 64, 64, 49152)
    assert c.rope_theta == 100000.0 and c.norm_eps == 1e-5 and c.rope_linear_scale == 1.0
    lin = LlamaConfig.from_gguf_metadata({**md, "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    assert lin.rope_linear_scale == 4.0
    torch.testing.assert_close(rope_inv_freq(lin), rope_inv_freq(c) / 4)
    factors = torch.linspace(1, 8, 32)
    torch.testing.assert_close(rope_inv_freq(c, factors), rope_inv_freq(c) / factors.double())
    no_vocab = {k: v for k, v in md.items() if k != "llama.vocab_size"}
    assert LlamaConfig.from_gguf_metadata({**no_vocab, "tokenizer.ggml.tokens": ["a"] * 7}).vocab_size == 7
    # YaRN (ggml's rope_yarn): pairs below ggml's corrected dims keep their speed, pairs above are
    # slowed by the factor, the ones between are mixed
    yarn = LlamaConfig.from_gguf_metadata({**md, "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
                                           "llama.rope.scaling.original_context_length": 2048})
    turns = lambda n: 64 * math.log(2048 / (n * 2 * math.pi)) / (2 * math.log(100000.0))  # noqa: E731
    low, high = math.floor(turns(32)), math.ceil(turns(1))
    inv, plain = rope_inv_freq(yarn), rope_inv_freq(c)
    assert 0 < low < high < 31 and yarn.rope_attn_factor == pytest.approx(1 + 0.1 * math.log(4))
    torch.testing.assert_close(inv[:low + 1], plain[:low + 1])
    torch.testing.assert_close(inv[high:], plain[high:] / 4)
    assert ((inv[low + 1:high] < plain[low + 1:high]) & (inv[low + 1:high] > plain[low + 1:high] / 4)).all()
    with pytest.raises(ValueError, match="'dynamic' is not supported"):
        LlamaConfig.from_gguf_metadata({**md, "llama.rope.scaling.type": "dynamic"})
    with pytest.raises(ValueError, match="'mamba3' is a recurrent"):
        LlamaConfig.from_gguf_metadata({**md, "general.architecture": "mamba3"})
    with pytest.raises(ValueError, match="block_count"):
        LlamaConfig.from_gguf_metadata({k: v for k, v in md.items() if k != "llama.block_count"})


def test_missing_or_misshapen_tensor_is_a_clear_error():
    from lowtune.model import _check_weights
    c = tiny_config()
    w = gguf_weights(c, tiny_weights(c))
    del w["blk.1.ffn_up.weight"]
    with pytest.raises(ValueError, match="blk.1.ffn_up.weight"):
        _check_weights(c, w)
    w = gguf_weights(c, tiny_weights(c))
    w["blk.0.attn_k.weight"] = w["blk.0.attn_q.weight"]
    with pytest.raises(ValueError, match="attn_k.*expected"):
        _check_weights(c, w)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    cpu, _ = tiny_model("Q4_1")
    gpu = tiny_model("Q4_1")[0].to("cuda")
    ids = rand_ids(2, 10)
    torch.testing.assert_close(gpu(ids.cuda()).cpu(), cpu(ids), atol=1e-3, rtol=1e-3)
    assert gpu.layers[0].attn_q.weight.device.type == "cuda"


# ----------------------------------------------------------------------------------------------
# the real model

# lowtune's perplexity of SmolLM2-135M-Instruct Q4_1 on the bundled Botchan (Gutenberg header and
# footer removed), every token but each window's first: 33.93 over 20 windows of 512; the first 4
# windows, which this test scores to stay quick, give 37.59. On the full Gutenberg file the
# 20-window recipe gives 33.085, research's reference number; llama.cpp's own perplexity on the
# same tokens is test_eval_llamacpp's.
SMOLLM2_BOTCHAN_PPL_4x512 = 37.593


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    from lowtune.loading import load
    return load(smollm2_path)


def test_smollm2_loads_and_says_paris(smollm2):
    model, tok = smollm2
    assert model.config.n_layers == 30 and model.config.n_kv_heads == 3 and model.output is None
    assert model.tensor_types["blk.0.attn_q.weight"] == "Q4_1"
    assert model.tensor_types["token_embd.weight"] == "Q8_0"
    out = generate(model, tok.encode("The capital of France is"), max_new_tokens=3)
    assert tok.decode(out).startswith(" Paris")


def test_smollm2_perplexity_botchan(smollm2, botchan_text):
    from lowtune.evaluate import perplexity
    model, tok = smollm2
    ids = tok.encode(botchan_text, add_bos=False)
    r = perplexity(model, ids, ctx=512, chunks=4, batch=4)
    assert r["tokens"] == 4 * 511
    assert r["perplexity"] == pytest.approx(SMOLLM2_BOTCHAN_PPL_4x512, abs=0.05)
