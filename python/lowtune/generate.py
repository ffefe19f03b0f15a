"""Text generation with the KV cache: greedy, or temperature / top-k / top-p sampling.

    ids = generate(model, prompt_ids, max_new_tokens=32)                  # greedy
    ids = generate(model, prompt_ids, 64, temperature=0.8, top_p=0.95, seed=0, stop_ids={2})
    text = generate_text(model, tokenizer, "Hi!", chat=True)              # chat template applied

The prompt is run once (prefill), then one token per step against the cached keys/values.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> int:
    """One token id from logits [V]. temperature <= 0 is greedy (argmax). top_k > 0 keeps the k most
    likely tokens; top_p < 1 keeps the smallest set whose probability reaches top_p."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens strictly before it already reach top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def generate(model, prompt_ids: Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             stop_ids: Iterable[int] = (), on_token: Callable[[int], None] | None = None) -> list[int]:
    """New token ids after `prompt_ids` (the prompt is not included). Stops after max_new_tokens,
    at the model's context length, or after emitting a token in stop_ids (which is included).
    on_token(id) is called for every new token (for streaming)."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("the prompt is empty; give at least one token (e.g. BOS)")
    limit = model.config.context_length
    if len(prompt) >= limit:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the model's context is {limit}")
    max_new_tokens = min(max_new_tokens, limit - len(prompt))
    stop = set(int(t) for t in stop_ids)
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    was_training = model.training
    model.eval()
    cache = model.new_cache(1, len(prompt) + max_new_tokens)
    out: list[int] = []
    try:
        logits = model(torch.tensor([prompt], dtype=torch.long), cache)[0, -1]
        for step in range(max_new_tokens):
            tok = sample_next(logits, temperature, top_k, top_p, generator)
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            if tok in stop or step == max_new_tokens - 1:
                break
            logits = model(torch.tensor([[tok]], dtype=torch.long), cache)[0, -1]
    finally:
        model.train(was_training)
    return out


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, chat: bool = False,
                  system: str | None = None, on_text: Callable[[str], None] | None = None,
                  **sampling) -> str:
    """Generate from a text prompt; returns only the new text. chat=True renders the prompt as a
    user turn with the tokenizer's chat template. Stops at end-of-generation tokens (EOS, EOT).
    on_text(piece) receives the new text as it becomes decodable (for streaming to a terminal)."""
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": prompt}]
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                               add_bos=False)
    else:
        ids = tokenizer.encode(prompt)
    stop = set(getattr(tokenizer, "eog_ids", ())) | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set())
    new: list[int] = []
    shown = 0

    def emit(tok: int) -> None:
        nonlocal shown
        new.append(tok)
        if on_text is None:
            return
        text = tokenizer.decode([t for t in new if t not in stop])
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            on_text(text[shown:])
            shown = len(text)

    generate(model, ids, max_new_tokens, stop_ids=stop, on_token=emit, **sampling)
    return tokenizer.decode([t for t in new if t not in stop])
