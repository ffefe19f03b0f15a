"""Perplexity over non-overlapping windows.

The token stream is cut into windows of `ctx` tokens (a trailing partial window is dropped);
each window is run from scratch, and every token except the window's first is scored against
the model's prediction from the tokens before it in the same window:

    nll = Σ_windows Σ_{t=1..ctx-1} -log p(x_t | x_0..x_{t-1}),   perplexity = exp(nll / scored)

(llama.cpp's `llama-perplexity` scores only each window's second half, so its numbers are lower;
this is the "all tokens" variant, comparable to scoring the same windows with llama.cpp logits.)
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch


def windows(tokens: Sequence[int] | torch.Tensor, ctx: int, chunks: int | None = None,
            bos: int | None = None) -> torch.Tensor:
    """[W, ctx] long tensor of consecutive non-overlapping windows (at most `chunks`). With `bos`,
    each window is that token followed by the next ctx - 1 tokens of the text (models such as
    Gemma need their BOS first, as llama.cpp's perplexity puts it)."""
    t = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    if ctx < 2:
        raise ValueError(f"ctx must be at least 2, got {ctx}")
    width = ctx if bos is None else ctx - 1
    n = t.numel() // width
    if chunks is not None:
        n = min(n, chunks)
    if n == 0:
        raise ValueError(f"the text has {t.numel()} tokens, fewer than one window of ctx={ctx}")
    w = t[: n * width].view(n, width)
    return w if bos is None else torch.cat((torch.full((n, 1), int(bos)), w), dim=1)


@torch.no_grad()
def perplexity(model, tokens, ctx: int = 512, chunks: int | None = None, batch: int = 1,
               progress: Callable[[int, float, int], None] | None = None, bos: int | None = None) -> dict:
    """Score `tokens` (list or 1-D tensor of ids) with `model.loss`, `batch` windows at a time
    (bos: a token put first in every window, see windows()).

    Returns {"perplexity", "nll" (mean per scored token), "tokens" (scored), "windows",
    "seconds", "tokens_per_second" (tokens processed, ctx per window)}.
    progress(windows_done, nll_sum, scored) is called after each batch."""
    w = windows(tokens, ctx, chunks, bos)
    was_training = model.training
    model.eval()
    nll_sum, scored, t0 = 0.0, 0, time.perf_counter()
    try:
        for s in range(0, w.shape[0], batch):
            ids = w[s:s + batch]
            nll_sum += float(model.loss(ids, reduction="sum"))
            scored += ids.shape[0] * (ctx - 1)
            if progress is not None:
                progress(s + ids.shape[0], nll_sum, scored)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    nll = nll_sum / scored
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": scored, "windows": int(w.shape[0]),
            "seconds": seconds, "tokens_per_second": w.numel() / seconds if seconds > 0 else float("inf")}
