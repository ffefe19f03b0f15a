"""Text generation with the KV cache: greedy, or temperature / top-k / top-p sampling.

    ids = generate(model, prompt_ids, max_new_tokens=32)                  # greedy
    ids = generate(model, prompt_ids, 64, temperature=0.8, top_p=0.95, seed=0, stop_ids={2})
    text = generate_text(model, tokenizer, "Hi!", chat=True)              # chat template applied

The prompt is run once (prefill), then one token per step against the cached keys/values. On a
GPU (layers not streamed) each step replays a captured CUDA graph (StepDecoder): the per-token
host work of launching a few hundred kernels is paid once per attention window, not per token.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable, Iterable, Sequence

import torch

from .model import KVCache


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


class StaticKVCache(KVCache):
    """A fixed-length KV cache (batch 1) whose one-token steps keep their shapes and addresses:
    the position written is the device tensor `pos`, and attention reads the first `window`
    positions under a mask of the filled ones (attn_mask). So one captured CUDA graph serves
    every step inside a window. The prompt (any number of tokens) goes through KVCache.update."""

    def __init__(self, config, max_len: int, device, dtype: torch.dtype):
        super().__init__(config, 1, max_len, device, dtype)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.window = max_len
        self.positions = torch.arange(max_len, device=device)
        self.valid = torch.zeros(max_len, dtype=torch.bool, device=device)

    def set_window(self, window: int) -> None:
        """Steps from now on attend over positions [0, window) (pos must stay below window)."""
        self.window = window
        self.attn_mask = self.valid[:window].unsqueeze(0)  # [1, window]: attention wants 2-D

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        if self.attn_mask is None or k.shape[2] != 1:
            return super().update(layer, start, k, v)
        if layer == 0:  # the mask of this step: positions 0..pos
            torch.le(self.positions[:self.window], self.pos, out=self.valid[:self.window])
        self.k[layer].index_copy_(2, self.pos, k)
        self.v[layer].index_copy_(2, self.pos, v)
        return self.k[layer][:, :, :self.window], self.v[layer][:, :, :self.window]


class StepDecoder:
    """Decodes one sequence: prefill(prompt) -> logits, then step(token) -> logits of the next
    position, against a StaticKVCache. With graphs=True (CUDA only) each step replays a CUDA
    graph captured for its attention window (64, 128, 256, ... positions, capped at max_len);
    the first step of a window runs eagerly (so one-time set-up stays outside the capture) and
    is then captured. The token and position go in through static device tensors."""

    MIN_WINDOW = 64

    def __init__(self, model, max_len: int, graphs: bool = True):
        if getattr(model, "streamer", None) is not None:
            raise ValueError("StepDecoder needs the model's layers resident (not streamed)")
        if any(model.config.is_sliding(i) for i in range(model.config.n_layers)):
            raise ValueError("StepDecoder's one mask per step cannot express sliding-window layers")
        dev = model.device
        self.model, self.max_len = model, max_len
        self.cache = StaticKVCache(model.config, max_len, dev, model.dtype)
        self.ids = torch.zeros((1, 1), dtype=torch.long, device=dev)
        self.rot = model.rope_rotation(0, max_len).to(dev)  # [kinds, 2, max_len, rope_dim]
        self.graphs = graphs and dev.type == "cuda"
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def prefill(self, prompt: Sequence[int]) -> torch.Tensor:
        """Logits [V] (float32) after the prompt."""
        ids = torch.tensor([list(prompt)], dtype=torch.long)
        return self.model(ids, self.cache)[0, -1]

    def _run(self) -> torch.Tensor:
        """One step at the static token and position (the body a graph captures)."""
        m, c = self.model, self.cache
        x = m.tok_embd(self.ids)
        rot = self.rot.index_select(2, c.pos)
        for layer in m.layers:
            x = layer(x, rot, c, 0)
        return m.lm_head(m.output_norm(x)).float()[0, -1]

    def step(self, token: int) -> torch.Tensor:
        """Logits [V] of the position after `token`, which is appended at position cache.length.
        The tensor is overwritten by the next step."""
        c = self.cache
        pos = c.length
        if pos >= self.max_len:
            raise ValueError(f"the decode cache holds {self.max_len} positions")
        window = self.MIN_WINDOW
        while window <= pos:
            window *= 2
        window = min(window, self.max_len)
        self.ids.fill_(int(token))
        c.pos.fill_(pos)
        c.set_window(window)
        captured = self._graphs.get(window)
        if captured is not None:
            captured[0].replay()
            out = captured[1]
        else:
            out = self._run()
            if self.graphs:
                try:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self._pool):
                        captured_out = self._run()
                except RuntimeError as e:  # an operation that cannot be captured: stay eager
                    warnings.warn(f"decoding without CUDA graphs: the step could not be captured ({e})")
                    self.graphs = False
                else:
                    self._graphs[window] = (graph, captured_out)
                    self._pool = graph.pool()
        c.length = pos + 1
        return out


@torch.no_grad()
def generate(model, prompt_ids: Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             stop_ids: Iterable[int] = (), on_token: Callable[[int], None] | None = None,
             graphs: bool | None = None, stats: dict | None = None) -> list[int]:
    """New token ids after `prompt_ids` (the prompt is not included). Stops after max_new_tokens,
    at the model's context length, or after emitting a token in stop_ids (which is included).
    on_token(id) is called for every new token (for streaming).

    graphs: decode through StepDecoder with CUDA graphs (None: wherever the model is on a GPU and
    not streamed; False: plain steps). stats, when given, receives prompt_tokens, prompt_s,
    decode_tokens and decode_s (wall time, the first token's sampling counted in the prompt's)."""
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
    if graphs is None:
        c = model.config  # graphs need the layers resident and one mask for every layer
        graphs = (model.device.type == "cuda" and getattr(model, "streamer", None) is None
                  and not any(c.is_sliding(i) for i in range(c.n_layers)))
    max_len = len(prompt) + max_new_tokens
    if graphs:
        decoder = StepDecoder(model, max_len)
        prefill, next_logits = decoder.prefill, decoder.step
    else:
        cache = model.new_cache(1, max_len)
        prefill = lambda ids: model(torch.tensor([ids], dtype=torch.long), cache)[0, -1]  # noqa: E731
        next_logits = lambda tok: model(torch.tensor([[tok]], dtype=torch.long), cache)[0, -1]  # noqa: E731
    out: list[int] = []
    t0 = time.perf_counter()
    t1 = None
    try:
        logits = prefill(prompt)
        for step in range(max_new_tokens):
            tok = sample_next(logits, temperature, top_k, top_p, generator)
            if t1 is None:
                t1 = time.perf_counter()
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            if tok in stop or step == max_new_tokens - 1:
                break
            logits = next_logits(tok)
    finally:
        model.train(was_training)
    if stats is not None:
        t2 = time.perf_counter()
        t1 = t2 if t1 is None else t1
        stats.update(prompt_tokens=len(prompt), prompt_s=t1 - t0, decode_tokens=max(len(out) - 1, 0),
                     decode_s=t2 - t1)
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
