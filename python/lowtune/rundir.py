"""The run directory a fine-tune (or an LREC correction) writes, and reads back to resume.

    config.json        the resolved configuration (train_config.TrainConfig; what --resume reads)
    metrics.jsonl      one line per step {step, loss, lr, grad_norm, tokens, ...}
                       and per evaluation {step, eval_loss, eval_ppl, eval_tokens}
    checkpoints/       step-XXXXXXXX.pt (lowtune.checkpoint); the newest `keep` are kept
    adapter/           the trained adapter (adapters.save_adapter)
    loss.png           training and held-out loss (when matplotlib is installed)
    summary.json       held-out perplexity before/after, steps, wall time

Under torchrun only rank 0 writes: a RunDir made with writer=False reads but writes nothing.
Every file is written atomically (checkpoint.atomic_write).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import __version__
from . import checkpoint as ckpt
from .adapters import save_adapter
from .progress import plural
from .train_config import CONFIG_FILE, TrainConfig

METRICS, SUMMARY, PLOT, CHECKPOINTS, ADAPTER = "metrics.jsonl", "summary.json", "loss.png", "checkpoints", "adapter"


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl (a torn last line from a killed run is dropped)."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class RunDir:
    def __init__(self, path: str | os.PathLike, writer: bool = True):
        self.path = Path(path)
        self.writer = writer
        self.metrics_path = self.path / METRICS
        self.ckpt_dir = self.path / CHECKPOINTS
        self.adapter_dir = self.path / ADAPTER

    def newest_step(self) -> int | None:
        """The step of the newest checkpoint file, or None."""
        found = ckpt.list_checkpoints(self.ckpt_dir)
        return found[-1][0] if found else None

    def start(self, cfg: TrainConfig) -> None:
        """Create the directory and write config.json."""
        if not self.writer:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_json(self.path / CONFIG_FILE, {
            "train": cfg.to_dict(), "lowtune": __version__, "torch": torch.__version__})

    # -- metrics -------------------------------------------------------------------------------

    def metrics(self) -> list[dict]:
        return read_metrics(self.metrics_path)

    def append_metrics(self, row: dict) -> None:
        if not self.writer:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def truncate_metrics(self, step: int) -> None:
        """Keep the metrics of steps <= `step` (a killed run may have logged steps after its last
        checkpoint, which the resumed run logs again)."""
        if not self.writer:
            return
        kept = "".join(json.dumps(r) + "\n" for r in self.metrics() if r.get("step", 0) <= step)
        ckpt.atomic_write_text(self.metrics_path, kept)

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, step: int, state: dict, keep: int) -> Path:
        if self.writer:
            ckpt.save_checkpoint(self.ckpt_dir, step, state, keep=keep)
        return ckpt.checkpoint_path(self.ckpt_dir, step)

    def latest_checkpoint(self):
        """(path, state) of the newest checkpoint that loads, or None."""
        return ckpt.latest_checkpoint(self.ckpt_dir)

    # -- the end -------------------------------------------------------------------------------

    def contents(self) -> str:
        """What the directory holds, for the closing line: 'config.json, metrics.jsonl, adapter/
        (adapter.safetensors, adapter_config.json), checkpoints/ (2 files), ...'."""
        parts = []
        for p in sorted(self.path.iterdir(), key=lambda p: (p.is_dir(), p.name)) if self.path.is_dir() else []:
            if p.is_dir():
                inside = sorted(q.name for q in p.iterdir())
                shown = ", ".join(inside) if len(inside) <= 3 else plural(len(inside), "file")
                parts.append(f"{p.name}/ ({shown})")
            else:
                parts.append(p.name)
        return ", ".join(parts)

    def finish(self, rows: list[dict], summary: dict, title: str = "") -> str | None:
        """Write loss.png and summary.json; returns a note when the plot was skipped."""
        if not self.writer:
            return None
        note = plot_losses(rows, self.path / PLOT, title)
        ckpt.atomic_write_json(self.path / SUMMARY, summary)
        return note


def save_run_adapter(model, run_dir) -> Path:
    """RUN_DIR/adapter (adapters' format), tied to the base the model was loaded from by its hash."""
    return save_adapter(model, Path(run_dir) / ADAPTER)


def plot_losses(rows: list[dict], path: Path, title: str = "") -> str | None:
    """Write the loss curve PNG; returns a note instead when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed: loss.png skipped (pip install matplotlib)"
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        xs, ys = zip(*train)
        ax.plot(xs, ys, lw=0.8, alpha=0.5, label="train (per step)")
        smooth, acc = [], None
        for y in ys:
            acc = y if acc is None else 0.9 * acc + 0.1 * y
            smooth.append(acc)
        ax.plot(xs, smooth, lw=1.5, label="train (smoothed)")
    if evals:
        xs, ys = zip(*evals)
        ax.plot(xs, ys, "o-", lw=1.5, label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    ckpt.atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return None
