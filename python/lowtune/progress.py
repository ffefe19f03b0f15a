"""A small progress bar for long work (eval, fine-tuning, loading, export): no dependency, writes
to stderr; and the plural words the messages around it use.

    with Progress(total=steps, desc="train", unit="step") as bar:
        for step in range(steps):
            ...
            bar.update(1, tokens=n_tokens, loss=loss.item(), lr=lr)
            bar.write("step 10: held-out loss 2.31")   # a log line above the bar (stdout)

Shows done/total, a bar, tokens/s (from the `tokens` counts passed to update), any other named
values (floats with 4 significant digits), memory (peak CUDA memory when a GPU is in use, else
the process's peak resident memory), the time spent and, with a total, the time left (from the
pace since the first update, so a slow first step such as compilation weighs little). On a
terminal the line redraws in place; otherwise (logs, CI) a plain line is printed at most every
`log_every` seconds and at the end. `delay`: draw nothing before that many seconds, so short work
stays silent; `leave=False`: clear the line at the end instead of keeping it (a bar inside
another one's work).
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """'1 step', '12 steps', '1 sequence'; `nouns` for an irregular plural."""
    return f"{n} {noun if n == 1 else (nouns or noun + 's')}"


def duration(seconds: float) -> str:
    """'42s', '3m05s', '1h02m'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


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
                 initial: int = 0, delay: float = 0.0, leave: bool = True, memory: bool = True):
        self.total, self.desc, self.unit, self.width = total, desc, unit, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.log_every = log_every if not self.tty else 0.2
        self.enabled, self.delay, self.leave, self.memory = enabled, delay, leave, memory
        self.n = self.initial = initial  # initial: e.g. the step a resumed run starts from
        self.tokens = 0
        self.values: dict[str, object] = {}
        self.start = time.perf_counter()
        self._first: tuple[float, int] | None = None  # (time, n) after the first update
        self._last = float("-inf")
        self._drawn = None  # (n, values) at the last draw
        self._on_screen = False  # a tty line of ours is showing (no newline after it yet)
        self._closed = False

    def update(self, n: int = 1, tokens: int = 0, **values) -> None:
        """Advance by n; count `tokens` towards tokens/s; show `values` (e.g. loss=2.31)."""
        now = time.perf_counter()
        self.n += n
        self.tokens += tokens
        self.values.update(values)
        if self._first is None:
            self._first = (now, self.n)
        if now - self._last >= self.log_every or (self.total is not None and self.n >= self.total):
            self._draw()

    def eta(self) -> float | None:
        """Seconds left: at the pace since the first update (which may hold a slow start such as
        compilation) once there are two, else at the pace so far. None without a total or update."""
        if not self.total or self._first is None or self.n >= self.total:
            return None
        now = time.perf_counter()
        t1, n1 = self._first
        if self.n > n1:
            per = (now - t1) / (self.n - n1)
        else:
            per = (now - self.start) / max(self.n - self.initial, 1)
        return per * (self.total - self.n)

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
        mem = memory_string() if self.memory else ""
        if mem:
            parts.append(mem)
        left = self.eta()
        parts.append(duration(elapsed) + (f", eta {duration(left)}" if left is not None else ""))
        return " | ".join(parts)

    def _draw(self) -> None:
        self._last = time.perf_counter()
        if not self.enabled or self._last - self.start < self.delay:
            return
        self._drawn = (self.n, dict(self.values))
        text = self.line()
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
            self._on_screen = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def write(self, text: str, emit=None) -> None:
        """Show a log line above the bar: emit(text) (default: print to stdout), the bar's line
        cleared first on a terminal and drawn again below the text."""
        if self._on_screen:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
        if emit is not None:
            emit(text)
        else:
            print(text, flush=True)
        if self._on_screen and not self._closed:
            self.stream.write(self.line())
            self.stream.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self._drawn is not None or self.delay <= 0:
            if self._drawn != (self.n, self.values) and (self.leave or not self.tty):
                self._draw()  # show the final state once
        if self._on_screen:
            self.stream.write("\n" if self.leave else "\r\x1b[2K")
            self.stream.flush()
            self._on_screen = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tracked(items: Iterable[T], total: int, desc: str, unit: str = "it", delay: float = 2.0) -> Iterator[T]:
    """The items of `items`, with a bar that counts them (shown only after `delay` seconds)."""
    with Progress(total=total, desc=desc, unit=unit, delay=delay) as bar:
        for item in items:
            yield item
            bar.update(1)
