"""A run killed with SIGKILL at any point and resumed ends with the same metrics as a run that
was never interrupted. The training runs in subprocesses (this file is also their script)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import curve, kill_after_step

HERE = Path(__file__).resolve().parent
STEPS = 30


def worker(run_dir: str, resume: bool, sleep_s: float) -> None:
    sys.path.insert(0, str(HERE))
    import torch
    from helpers import TinyLM, markov_dataset, save_tiny_adapter

    from lowtune.train_config import TrainConfig
    from lowtune.trainer import Trainer

    class SlowTinyLM(TinyLM):  # slow enough to be killed mid-run
        def loss(self, ids, labels=None, reduction="mean"):
            time.sleep(sleep_s)
            return super().loss(ids, labels, reduction)

    torch.set_num_threads(1)
    cfg = TrainConfig(out=run_dir, steps=STEPS, batch=4, grad_accum=2, seq_len=32, lr=3e-2,
                      warmup=3, eval_every=4, save_every=3, seed=11, device="cpu")
    Trainer(cfg, model=SlowTinyLM(), dataset=markov_dataset(), save_adapter=save_tiny_adapter,
            log=lambda s: None).run(resume=resume)


def launch(run_dir: Path, resume: bool = False, sleep_s: float = 0.0) -> subprocess.Popen:
    import lowtune
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(lowtune.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]))
    args = [sys.executable, str(Path(__file__).resolve()), str(run_dir), str(sleep_s)]
    return subprocess.Popen(args + (["--resume"] if resume else []), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(p: subprocess.Popen, timeout: float = 120) -> None:
    _, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err.decode(errors="replace")[-3000:]


def test_killed_and_resumed_runs_match_an_uninterrupted_run(tmp_path):
    from lowtune.checkpoint import list_checkpoints
    ref, run = tmp_path / "ref", tmp_path / "run"
    reference = launch(ref)
    # Killed twice: before the first checkpoint (the resumed run starts over), then between
    # checkpoints, after an evaluation (the resumed run goes on from the step-9 checkpoint and
    # logs steps 10.. again). Killing in the middle of a checkpoint write is covered by the
    # atomic-write tests in test_trainer.py.
    p = launch(run, sleep_s=0.01)
    kill_after_step(p, run / "metrics.jsonl", 1, timeout=60)
    assert not list_checkpoints(run / "checkpoints")
    p = launch(run, resume=True, sleep_s=0.01)
    kill_after_step(p, run / "metrics.jsonl", 10, timeout=60)
    assert list_checkpoints(run / "checkpoints")
    finish(launch(run, resume=True))
    finish(reference)

    assert curve(run) == curve(ref)
    rows = curve(ref)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 4, 8, 12, 16, 20, 24, 28, 30]
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [27, 30]
    import torch
    a = torch.load(run / "adapter.pt", weights_only=True)
    b = torch.load(ref / "adapter.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


if __name__ == "__main__":
    worker(sys.argv[1], "--resume" in sys.argv[3:], float(sys.argv[2]))
