"""Why training stopped, and what to change: the trainer's errors and the advice they carry.

Every message says what happened, what was kept (the last good checkpoint) and the flags that
fix the usual causes, in one paragraph a user can act on.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .train_config import TrainConfig

OOM_ERRORS = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)


class TrainingError(RuntimeError):
    """Training stopped; the message says why, what was kept and what to change."""


class NonFiniteLossError(TrainingError):
    pass


class TrainingOutOfMemoryError(TrainingError, MemoryError):
    pass


class PeerFailedError(TrainingError):
    """torchrun: this rank stopped because another rank of the group failed."""


def existing_run(run_dir: Path, step: int, command: str = "finetune") -> TrainingError:
    return TrainingError(f"{run_dir} already holds a run (checkpoints up to step {step}): continue it "
                         f"with `lowtune {command} --resume {run_dir}`, or give another -o")


def kept_checkpoint(run_dir: Path, last: Path | None) -> str:
    """What a killed or failed distributed run can continue from."""
    if last is None:
        return "No checkpoint had been written yet."
    return (f"The last checkpoint, {last}, is intact; continue with the same torchrun command and "
            f"`lowtune finetune --resume {run_dir}`.")


def changed_batching(world0: int, seqs: int, world: int, batch: int) -> str:
    """A resume whose ranks x --batch differs from the checkpoint's `seqs` sequences per
    micro-batch (written by `world0` ranks): the data order would change."""
    fix = f"--batch {seqs // world}" if seqs % world == 0 else f"{world0} rank(s) with --batch {seqs // world0}"
    return (f"the checkpoint was written by {world0} rank(s) x --batch {seqs // world0} = {seqs} sequences "
            f"per micro-batch; this run has {world} x {batch} = {world * batch}, which would change the "
            f"data order. Resume with {fix}")


def nonfinite_message(what: str, step: int, micro: int | None, cfg: TrainConfig, run_dir: Path,
                      last: Path | None) -> str:
    """A NaN/inf loss or gradient norm at 0-based `step` (micro-batch `micro`, or None)."""
    where = f"step {step + 1}" + (f" (micro-batch {micro + 1}/{cfg.grad_accum})" if micro is not None else "")
    if last is not None:
        kept = (f"The last good checkpoint, {last}, is kept; continue from it with "
                f"`lowtune finetune --resume {run_dir} --lr {cfg.lr / 2:g}`.")
    else:
        kept = "No checkpoint had been written yet."
    return (f"{what} at {where}; training stopped and nothing of this step was applied. {kept} "
            f"Usual fixes: a lower --lr (now {cfg.lr:g}), a longer --warmup (now {cfg.warmup}), "
            f"gradient clipping (--clip, now {cfg.clip:g}). A non-finite loss at the very first step "
            "points at the model file or the data instead.")


def oom_message(err: BaseException, cfg: TrainConfig, device: torch.device, step: int) -> str:
    """What was asked, what was free, and the flags that lower memory."""
    m = re.search(r"Tried to allocate ([0-9.]+ [KMGT]?i?B)", str(err))
    asked = m.group(1) if m else "an unknown amount"
    free = total = None
    if device.type == "cuda":
        try:
            free, total = torch.cuda.mem_get_info(device)
        except Exception:  # noqa: BLE001
            pass
        torch.cuda.empty_cache()
    have = (f"{free / 2**30:.2f} GiB free of {total / 2**30:.2f} GiB" if free is not None
            else "unknown free memory")
    halves = []
    if cfg.seq_len > 64:
        halves.append(f"--seq-len {cfg.seq_len // 2}")
    if cfg.batch > 1:
        halves.append(f"--batch {cfg.batch // 2} --grad-accum {cfg.grad_accum * 2} (same "
                      "effective batch)")
    if cfg.gradient_checkpointing is False:
        halves.append("--gradient-checkpointing on")
    halves.append("--max-vram with a budget below the card's memory (layers then stream from "
                  "host memory)")
    return (f"out of {device.type.upper()} memory at step {step + 1}: tried to allocate {asked} with "
            f"{have}. Reduce memory with: " + "; ".join(halves) + ".")
