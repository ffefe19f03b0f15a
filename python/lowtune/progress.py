"""A small progress bar for long work (eval, fine-tuning): no dependency, writes to stderr.

    with Progress(total=steps, desc="train", unit="step") as bar:
        for step in range(steps):
            ...
            bar.update(1, tokens=n_tokens, loss=loss.item(), lr=lr)

Shows done/total, a bar, tokens/s (from the `tokens` counts passed to update), any other named
values (floats with 4 significant digits), and memory: peak CUDA memory when a GPU is in use,
else the process's peak resident memory. On a terminal the line redraws in place; otherwise
(logs, CI) a plain line is printed at most every `log_every` seconds and at the end.
"""
from __future__ import annotations

import sys
import time


def memory_string() -> str:
    """Peak memory of this process: 'vram 1.23 GiB' on CUDA, else 'rss 0.45 GiB'."""
    try:
        import torch
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return f"vram {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    except Exception:  # pragma: no cover - torch is always there in practice
        pass
    try:
        import resource
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        scale = 1 if sys.platform != "darwin" else 1 / 1024       # bytes on macOS
        return f"rss {kib * scale / 2**20:.2f} GiB"
    except Exception:  # Windows has no resource module
        return ""


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Progress:
    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it",
                 stream=None, width: int = 24, log_every: float = 10.0, enabled: bool = True,
                 initial: int = 0):
        self.total, self.desc, self.unit, self.width = total, desc, unit, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.log_every = log_every if not self.tty else 0.2
        self.enabled = enabled
        self.n = initial  # e.g. the step a resumed run starts from
        self.tokens = 0
        self.values: dict[str, object] = {}
        self.start = time.perf_counter()
        self._last = float("-inf")
        self._drawn = None  # (n, values) at the last draw
        self._closed = False

    def update(self, n: int = 1, tokens: int = 0, **values) -> None:
        """Advance by n; count `tokens` towards tokens/s; show `values` (e.g. loss=2.31)."""
        self.n += n
        self.tokens += tokens
        self.values.update(values)
        now = time.perf_counter()
        if now - self._last >= self.log_every or (self.total is not None and self.n >= self.total):
            self._last = now
            self._draw()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        parts = [self.desc] if self.desc else []
        if self.total:
            frac = min(self.n / self.total, 1.0)
            filled = int(frac * self.width)
            parts.append(f"{self.n}/{self.total} [{'#' * filled}{'.' * (self.width - filled)}]")
        else:
            parts.append(f"{self.n} {self.unit}")
        parts += [f"{k} {_fmt(v)}" for k, v in self.values.items()]
        if self.tokens and elapsed > 0:
            parts.append(f"{self.tokens / elapsed:.1f} tok/s")
        mem = memory_string()
        if mem:
            parts.append(mem)
        parts.append(f"{elapsed:.0f}s")
        return " | ".join(parts)

    def _draw(self) -> None:
        if not self.enabled:
            return
        self._drawn = (self.n, dict(self.values))
        text = self.line()
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            if self._drawn != (self.n, self.values):  # show the final state once
                self._draw()
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
