"""Files that survive a crash: atomic writes, and the trainer's resumable checkpoints.

Every file lowtune writes (checkpoints, adapters, exports, configs) goes through `atomic_write`:
the bytes go to `path.tmp`, are flushed and fsync'ed, and `os.replace` puts them at `path` in one
step. A kill, a full disk or an unwritable directory therefore leaves either the old file or the
new one, never half of one.

    atomic_write(path, lambda f: f.write(data))      # any writer taking a binary file object
    atomic_write_bytes / atomic_write_text / atomic_write_json / atomic_torch_save

A training checkpoint is one file `checkpoints/step-00000120.pt` holding the trainable parameters,
the optimizer and scheduler states, every RNG state and the data position (see trainer.py).
`latest_checkpoint` returns the newest one that loads, skipping damaged or leftover files.
"""
from __future__ import annotations

import json
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch

from .paths import WriteError, failed_write  # noqa: F401 - WriteError: part of this module's API

CHECKPOINT_FORMAT = "lowtune-checkpoint"
CHECKPOINT_VERSION = 1
_CKPT_NAME = re.compile(r"^step-(\d{8})\.pt$")


def tmp_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every OS/filesystem, which is fine.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call `write(f)` on `path.tmp`, fsync it, then rename it to `path` atomically.

    On any error the temporary file is removed, `path` keeps its previous content, and an
    OSError (`WriteError`, with the original errno) names `path`, says what happened and what to
    do."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        raise failed_write(e, path, [tmp])
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


# ---------------------------------------------------------------------------------------------
# RNG states (python, numpy, torch CPU, torch CUDA), stored as plain lists and tensors so that
# checkpoints load with torch.load(weights_only=True).

def seed_everything(seed: int) -> None:
    """Seed python's, NumPy's and torch's generators (what capture_rng saves)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def capture_rng() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Training checkpoints

def checkpoint_path(ckpt_dir: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_dir) / f"step-{step:08d}.pt"


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint file, oldest first (`.tmp` leftovers excluded)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = _CKPT_NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, state: dict, keep: int = 2) -> Path:
    """Write `state` as the checkpoint of `step` (atomically), then delete all but the newest
    `keep` checkpoints. Old ones are only deleted after the new one is safely in place."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    payload = dict(state, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, step=step)
    path = atomic_torch_save(payload, checkpoint_path(ckpt_dir, step))
    for _, old in list_checkpoints(ckpt_dir)[:-max(1, keep)]:
        try:
            old.unlink()
        except OSError:
            pass
    for leftover in ckpt_dir.glob("*.tmp"):  # from a run killed while writing
        try:
            leftover.unlink()
        except OSError:
            pass
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a lowtune checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} has checkpoint version {state.get('version')}; this lowtune "
                         f"reads version {CHECKPOINT_VERSION}")
    return state


def latest_checkpoint(ckpt_dir: str | os.PathLike, map_location="cpu") -> tuple[Path, dict] | None:
    """The newest checkpoint that loads, or None. A damaged newer file is skipped with a warning
    (it cannot come from lowtune's own atomic writes, but disks and users do surprising things)."""
    for step, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return path, load_checkpoint(path, map_location)
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped the same way
            warnings.warn(f"skipping unreadable checkpoint {path}: {e}", stacklevel=2)
    return None
