"""The fixed-length decode cache and the step decoder behind CUDA-graph generation
(lowtune.generate.StaticKVCache, StepDecoder): the same logits as the plain KV-cache path, across
attention-window boundaries; greedy steps chained on the device against step-by-step argmax; the
grouped q/k/v and gate/up products (DecoderLayer.group_products); on a GPU, replayed graphs
against eager steps."""
from __future__ import annotations

import pytest
import torch

from lowtune import ops
from lowtune.adapters import AdapterConfig, apply_adapters
from lowtune.generate import GenerationStats, StepDecoder, generate
from lowtune.model import LlamaModel

from test_model import gguf_weights, tiny_config, tiny_weights


def tiny_model(device: str, dtype=torch.float32) -> LlamaModel:
    c = tiny_config(layers=2)
    return LlamaModel(c, gguf_weights(c, tiny_weights(c), "Q8_0"), dtype).to(device).eval()


def plain_logits(model, prompt, tokens):
    cache = model.new_cache(1, len(prompt) + len(tokens))
    out = [model(torch.tensor([prompt]), cache)[0, -1]]
    out += [model(torch.tensor([[t]]), cache)[0, -1] for t in tokens]
    return out


@torch.no_grad()
def test_step_decoder_matches_the_plain_cache_across_windows():
    """80 steps cross the 64-position window; the masked fixed-length cache gives the plain
    path's logits (float32 on the CPU, eager steps)."""
    model = tiny_model("cpu")
    prompt = [3, 1, 4, 1, 5]
    tokens = torch.randint(0, 101, (80,)).tolist()
    want = plain_logits(model, prompt, tokens)
    dec = StepDecoder(model, len(prompt) + len(tokens), graphs=False)
    got = [dec.prefill(prompt)] + [dec.step(t).clone() for t in tokens]
    assert dec.cache.length == len(prompt) + len(tokens) and dec.cache.window == 85  # 128, capped
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {i}")


@torch.no_grad()
def test_step_decoder_refuses_a_full_cache():
    model = tiny_model("cpu")
    dec = StepDecoder(model, 4, graphs=False)
    dec.prefill([1, 2, 3])
    dec.step(4)
    with pytest.raises(ValueError, match="holds 4 positions"):
        dec.step(5)


def test_generate_reports_prompt_and_decode_times():
    model = tiny_model("cpu")
    stats = GenerationStats()
    out = generate(model, [1, 2, 3], max_new_tokens=6, stats=stats)
    assert len(out) == 6 and stats.prompt_tokens == 3 and stats.decode_tokens == 5
    assert stats.prompt_seconds > 0 and stats.decode_seconds > 0
    assert stats.decode_tokens_per_second == stats.decode_tokens / stats.decode_seconds


@pytest.mark.cuda
@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graph_steps_match_eager_steps(dtype):
    """Replayed graphs (two windows) against the same steps run eagerly, and (float32) greedy
    generation with graphs against the plain path."""
    model = tiny_model("cuda", dtype)
    prompt = [3, 1, 4, 1, 5]
    tokens = torch.randint(0, 101, (70,)).tolist()
    eager = StepDecoder(model, 80, graphs=False)
    graph = StepDecoder(model, 80, graphs=True)
    assert torch.equal(eager.prefill(prompt), graph.prefill(prompt))
    for i, t in enumerate(tokens):
        a, b = eager.step(t), graph.step(t)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(b, a, rtol=tol, atol=tol, msg=f"step {i}")
    assert sorted(graph._graphs) == [(64, False), (80, False)]
    if dtype == torch.float32:  # (bf16 logits of the two cache layouts may break argmax ties apart)
        assert generate(model, prompt, 20, graphs=True) == generate(model, prompt, 20, graphs=False)


def count_products(monkeypatch) -> list:
    seen = []
    real = ops.qmatmul
    monkeypatch.setattr(ops, "qmatmul", lambda x, w, *a, **k: (seen.append(w.shape), real(x, w, *a, **k))[1])
    return seen


def test_grouped_products_share_the_storage_and_give_the_same_logits(monkeypatch):
    model = tiny_model("cpu")
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        want = model(ids)
    layer = model.layers[0]
    parts = [layer.attn_q, layer.attn_k, layer.attn_v]
    for lay in model.layers:
        lay.group_products()
    qkv = layer.grouped[("attn_q", "attn_k", "attn_v")]
    assert qkv.out_features == sum(p.out_features for p in parts)
    assert [p.raw.data_ptr() - qkv.raw.data_ptr() for p in parts] == \
        [0, parts[0].raw.nbytes, parts[0].raw.nbytes + parts[1].raw.nbytes]  # views, not copies
    seen = count_products(monkeypatch)
    with torch.no_grad():
        got = model(ids)
    assert torch.equal(got, want)
    per_layer = len(seen) - 1  # the head
    assert per_layer == 4 * len(model.layers)  # qkv, output, gate+up, down
    seen.clear()
    model(ids)  # autograd recording: the parts, one product each
    assert len(seen) - 1 == 7 * len(model.layers)
    apply_adapters(model, AdapterConfig(targets=("attn_q",)))
    seen.clear()
    with torch.no_grad():
        model(ids)
    # q's adapter ends the q/k/v group's use (k and v run on their own); gate+up stays grouped
    assert qkv.weight.shape not in seen and seen.count(parts[1].weight.shape) == 2 * len(model.layers)
    assert layer.grouped[("ffn_gate", "ffn_up")].weight.shape in seen
    other = model.layers[1]
    other.ffn_up.raw = other.ffn_up.raw.clone()  # a part given new bytes (as a merge may) ends its group's use
    seen.clear()
    with torch.no_grad():
        model(ids)
    assert seen.count(other.grouped[("ffn_gate", "ffn_up")].weight.shape) == 1  # layer 0's only
    model.float()
    assert all(lay.grouped == {} for lay in model.layers)  # .to()/.float() drop the groups


@torch.no_grad()
def test_greedy_chain_matches_step_by_step_argmax():
    model = tiny_model("cpu")
    prompt = [3, 1, 4, 1, 5]
    plain = StepDecoder(model, 40, graphs=False)
    tok = int(plain.prefill(prompt).argmax())
    want = []
    for _ in range(20):
        tok = int(plain.step(tok).argmax())
        want.append(tok)
    chained = StepDecoder(model, 40, graphs=False)
    first = int(chained.prefill(prompt).argmax())
    seen = []
    got = chained.greedy(first, 20, on_token=seen.append)
    assert got == want == seen and chained.cache.length == len(prompt) + 20
    stop = want[6]
    again = StepDecoder(model, 40, graphs=False)
    again.prefill(prompt)
    got = again.greedy(first, 20, stop_ids={stop})
    assert got == want[:want.index(stop) + 1]
    with pytest.raises(ValueError, match="holds 40 positions"):
        again.greedy(first, 40)


def test_generate_through_the_step_decoder_gives_the_plain_paths_tokens():
    """generate(graphs=True) on the CPU takes StepDecoder's chained greedy steps (no graphs there):
    the tokens of the plain KV-cache path, stopping after a stop token."""
    model = tiny_model("cpu")
    prompt = [3, 1, 4, 1, 5]
    want = generate(model, prompt, 30, graphs=False)
    assert generate(model, prompt, 30, graphs=True) == want
    stop = want[9]
    assert generate(model, prompt, 30, graphs=True, stop_ids={stop}) == want[:want.index(stop) + 1]


@pytest.mark.cuda
@torch.no_grad()
def test_cuda_greedy_chain_with_graphs_matches_eager_steps(monkeypatch):
    """The grouped products and the chained greedy graphs give the tokens of ungrouped eager steps,
    and a step runs 4 products per layer."""
    model = tiny_model("cuda")
    prompt = [3, 1, 4, 1, 5]
    plain = StepDecoder(model, 100, graphs=False, group_products=False)
    tok = int(plain.prefill(prompt).argmax())
    want = []
    for _ in range(90):  # crosses the 64-position window
        tok = int(plain.step(tok).argmax())
        want.append(tok)
    dec = StepDecoder(model, 100, graphs=True)
    assert all(len(lay.grouped) == 2 for lay in model.layers)
    first = int(dec.prefill(prompt).argmax())
    assert dec.greedy(first, 90) == want
    assert sorted(dec._graphs) == [(64, True), (100, True)]
    seen = count_products(monkeypatch)
    StepDecoder(model, 8, graphs=False).step(1)
    assert len(seen) - 1 == 4 * len(model.layers)
