"""The fixed-length decode cache and the step decoder behind CUDA-graph generation
(lowtune.generate.StaticKVCache, StepDecoder): the same logits as the plain KV-cache path, across
attention-window boundaries; on a GPU, replayed graphs against eager steps."""
from __future__ import annotations

import pytest
import torch

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
    assert sorted(graph._graphs) == [64, 80]
    if dtype == torch.float32:  # (bf16 logits of the two cache layouts may break argmax ties apart)
        assert generate(model, prompt, 20, graphs=True) == generate(model, prompt, 20, graphs=False)
