"""Data-parallel fine-tuning under torchrun: the process group and the few collectives the
trainer needs.

    torchrun --standalone --nproc-per-node 4 -m lowtune finetune model.gguf --data d.jsonl -o runs/a

torchrun starts one process per GPU (or per CPU worker) and sets WORLD_SIZE, RANK and LOCAL_RANK;
`init(device)` then joins the group (NCCL on GPUs, gloo on CPUs), puts every rank on the GPU of its
LOCAL_RANK, and everything below works unchanged in a single process (world size 1, rank 0, no
communication). Without torchrun nothing here does anything.

How the trainer uses it (trainer.py):
  - every rank holds (or streams) the packed base and its own copy of the adapters; `wrap_loss`
    wraps the adapters in DistributedDataParallel, which all-reduces their gradients;
  - the data is sharded without overlap: rank r takes its slice of the global micro-batch;
  - `all_reduce_sum` makes token counts, losses and held-out sums global, so every rank computes
    the same numbers (and takes the same decisions);
  - only the main rank (`is_main()`) writes the run directory; `broadcast_object` hands what it
    read (the checkpoint to resume from) to the others, and `barrier` keeps them in step.

When a rank fails, `stop_together` (around Trainer.run) records its error in torchrun's key-value
store before the exception leaves the process. The other ranks then stop too: gloo's collectives fail
as soon as the failed process's sockets close, and torchrun sends SIGTERM to every rank of the
group once one of them has exited (NCCL collectives waiting for a dead peer are ended that way, or
by NCCL's watchdog after the timeout, TORCH_NCCL_ASYNC_ERROR_HANDLING). Each survivor raises an
error naming the rank that failed, its message and what was kept (only the main rank writes
checkpoints, atomically, so the last one is intact). A rank that hangs instead of failing is found by
the collective timeout, LOWTUNE_DIST_TIMEOUT seconds (default 1800).
"""
from __future__ import annotations

import datetime
import os
import signal
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

_FAILED_COUNT = "lowtune/failed"
_FAILED_MESSAGE = "lowtune/failure"
_state = {"owner": False, "failed": False, "stopping": False}


def launched() -> bool:
    """True in a process that torchrun started as part of a group of more than one."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def prefix() -> str:
    """'[rank 1/4] ' for messages in a group, '' in a single process (works before `init`)."""
    if active():
        return f"[rank {rank()}/{world_size()}] "
    if launched():
        return f"[rank {os.environ.get('RANK', '?')}/{os.environ['WORLD_SIZE']}] "
    return ""


def init(device: torch.device) -> torch.device:
    """Join torchrun's group (once) and return the device of this rank: with CUDA, the GPU of
    LOCAL_RANK (an explicit cuda:N is refused when several ranks share the node). A no-op that
    returns `device` outside torchrun."""
    if not launched():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is not None and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise ValueError(f"--device {device} would put every rank of this node on one GPU; "
                             "under torchrun use --device cuda (or auto): rank r takes GPU LOCAL_RANK")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("LOWTUNE_DIST_TIMEOUT", 1800)))
        if device.type == "cuda":
            dist.init_process_group("nccl", timeout=timeout, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timeout)
        _state["owner"] = True
        try:
            signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread: torchrun's SIGTERM then ends the process as usual
            pass
    _state["device"] = device
    return device


def shutdown() -> None:
    """Leave the group this module joined (nothing after a failure: peers may be gone)."""
    if _state["owner"] and dist.is_initialized() and not _state["failed"]:
        # every rank is done with the group before any tears down its connections (a rank
        # destroying gloo's pairs while a peer still uses them aborts in C++ at exit)
        barrier()
        dist.destroy_process_group()
    _state["owner"] = False


class Stopped(RuntimeError):
    """SIGTERM: torchrun stops the whole group when one rank has exited."""


def _on_sigterm(signum, frame):
    if _state["stopping"]:  # already on the way out: let the first stop finish its message
        return
    _state["stopping"] = True
    raise Stopped("stopped by SIGTERM (torchrun stops every rank once one has failed)")


# ---------------------------------------------------------------------------------------------
# Collectives (identity in a single process)

def _comm_device() -> torch.device:
    return _state.get("device", torch.device("cpu")) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(*values: float) -> list[float]:
    """The sums over ranks of a few numbers (float64, exact for integers below 2**53)."""
    if not active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src`, on every rank (pickled; tensors come back on the CPU)."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def all_gather_object(obj: Any) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[_comm_device().index])
        else:
            dist.barrier()


def rank_seed(seed: int, r: int | None = None) -> int:
    """The RNG seed of rank r (for checkpoint.seed_everything: dropout masks differ between ranks;
    rank 0 keeps `seed`, so its random numbers are those of a single-process run)."""
    r = rank() if r is None else r
    return seed if r == 0 else int(np.random.default_rng([seed, r]).integers(1 << 62))


# ---------------------------------------------------------------------------------------------
# The model in DistributedDataParallel

class LossModule(nn.Module):
    """What DDP wraps: forward(ids, labels) = model.loss(ids, labels, reduction="sum").

    Only the trainable parameters are registered here; the model (packed base weights, maybe
    streamed from host memory) is held outside the module tree, so DDP broadcasts and
    all-reduces the adapters and nothing else. forward() without inputs returns a zero that
    depends on every parameter: a rank with nothing to score in the last micro-batch of a step
    still takes part in the gradient all-reduce."""

    def __init__(self, model, params: list[nn.Parameter]):
        super().__init__()
        self.params = nn.ParameterList(params)
        self.__dict__["model"] = model  # not a submodule

    def forward(self, ids: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        if ids is None:
            return sum(p.sum() for p in self.params) * 0.0
        return self.model.loss(ids, labels, reduction="sum")


def wrap_loss(model, params: list[nn.Parameter]):
    """DistributedDataParallel(LossModule(model, params)), or None in a single process. DDP
    averages gradients over ranks; the trainer scales the loss by the world size to undo that."""
    if not active():
        return None
    return nn.parallel.DistributedDataParallel(LossModule(model, params))


def no_sync(ddp, sync: bool):
    """ddp.no_sync() for the micro-batches before the last of an optimizer step."""
    return nullcontext() if ddp is None or sync else ddp.no_sync()


# ---------------------------------------------------------------------------------------------
# Failures

def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store: peers learn nothing beyond the lost connection
        return None


def _lost_peer(err: BaseException) -> bool:
    """The error is a collective that failed because another rank went away (or SIGTERM)."""
    if isinstance(err, (Stopped, dist.DistError)):
        return True
    text = str(err).lower()
    return any(s in text for s in ("connection closed", "connection reset", "broken pipe",
                                   "socket", "timed out", "nccl", "gloo"))


def _peer_failure(err: BaseException) -> tuple[int, str] | None:
    """None when `err` is this rank's own failure (recorded for the others if it is the first);
    else, for a collective broken by another rank, (rank, message) of the first rank that failed,
    or (-1, '') when none said why (it was killed, or the whole group was stopped)."""
    store = _store()
    own = not _lost_peer(err)
    if store is None:
        return None if own else (-1, "")
    try:
        store.set_timeout(datetime.timedelta(seconds=10))
        if own:
            if store.add(_FAILED_COUNT, 1) == 1:  # the first failure is the one to report
                store.set(_FAILED_MESSAGE, f"{rank()}\n{type(err).__name__}: {err}")
            return None
        deadline = time.monotonic() + 3.0  # the first to fail writes its message right after
        while not store.check([_FAILED_MESSAGE]):
            if time.monotonic() > deadline:
                return (-1, "")
            time.sleep(0.05)
        who, _, text = store.get(_FAILED_MESSAGE).decode(errors="replace").partition("\n")
        return int(who), text
    except Exception:  # noqa: BLE001 - the store went away too (its host is gone)
        return None if own else (-1, "")


@contextmanager
def stop_together(error: type[Exception] = RuntimeError, note: Callable[[], str] = lambda: ""):
    """Around a rank's whole run. A rank's own error is raised as it is (the first one is
    recorded for the others); a rank whose collectives broke because another rank failed, or
    that torchrun stopped, raises `error` naming the failed rank, its message and `note()` (what
    was kept). A no-op in a single process."""
    try:
        yield
    except BaseException as e:
        if not active() or isinstance(e, KeyboardInterrupt):
            raise
        _state["failed"] = _state["stopping"] = True
        peer = _peer_failure(e)
        if peer is None:
            raise
        who, text = peer
        why = (f"rank {who} failed: {text}" if who >= 0 else
               f"the group was stopped, or another rank was lost without a message (killed or "
               f"crashed; torchrun's report names it) ({type(e).__name__}: {e})")
        raise error(f"stopping: {why}. {note()}".strip()) from e
