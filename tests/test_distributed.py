"""Data-parallel training under torchrun (lowtune.distributed): two gloo processes on the CPU
reproduce a single process with the same global batch; only rank 0 writes; a killed group resumes
exactly; a failing rank stops the others with a clear message. The ranks are real torchrun
workers (`python -m torch.distributed.run`); this file is also their script."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import curve, kill_after_step

HERE = Path(__file__).resolve().parent
# A tiny-model run: 30 training sequences (the last one short), so the global micro-batch of
# 2 ranks x 2 sequences ends each epoch with 2 sequences, all on rank 0 (rank 1 has an empty slice
# in the last micro-batch of step 4, and still takes part in the gradient all-reduce).
TINY = dict(steps=6, batch=2, grad_accum=2, seq_len=32, lr=3e-2, warmup=1, schedule="constant",
            eval_every=3, save_every=2, seed=7, device="cpu")
N_TOKENS = 1056


def tiny_data():
    sys.path.insert(0, str(HERE))
    from helpers import markov_dataset
    return markov_dataset(n_tokens=N_TOKENS)


def tiny_model(dropout: float, sleep_s: float = 0.0, fail_at: int = 0):
    """TinyLM (helpers.py); optionally slow (to be killed mid-run), or failing on rank 1 at
    its `fail_at`-th training forward."""
    sys.path.insert(0, str(HERE))
    from helpers import TinyLM

    class Model(TinyLM):
        calls = 0

        def loss(self, ids, labels=None, reduction="mean"):
            time.sleep(sleep_s)
            if self.training and fail_at and os.environ.get("RANK") == "1":
                Model.calls += 1
                if Model.calls == fail_at:
                    raise RuntimeError("the GPU of rank 1 caught fire")
            return super().loss(ids, labels, reduction)

    return Model(dropout=dropout)


def spy_on_writes(run_dir: str) -> None:
    """Record every file this process opens for writing under run_dir (in run_dir.writes-RANK)."""
    import builtins
    real_open = builtins.open
    log = real_open(f"{run_dir}.writes-{os.environ.get('RANK', '0')}", "w")

    def spying_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and str(file).startswith(run_dir):
            log.write(f"{file}\n")
            log.flush()
        return real_open(file, mode, *args, **kwargs)

    builtins.open = spying_open


def worker(run_dir: str, opts: dict) -> int:
    """One torchrun rank: a tiny-model run with TINY + opts['cfg']."""
    import torch

    from lowtune import distributed
    from lowtune.failures import TrainingError
    from lowtune.train_config import TrainConfig
    from lowtune.trainer import Trainer
    from helpers import save_tiny_adapter
    torch.set_num_threads(1)
    spy_on_writes(run_dir)
    cfg = TrainConfig(out=run_dir, **{**TINY, **opts.get("cfg", {})})
    model = tiny_model(opts.get("dropout", 0.0), opts.get("sleep_s", 0.0), opts.get("fail_at", 0))
    try:
        Trainer(cfg, model=model, dataset=tiny_data(), save_adapter=save_tiny_adapter,
                log=lambda s: None).run(resume=opts.get("resume", False))
    except TrainingError as e:
        print(f"error: {distributed.prefix()}{e}", file=sys.stderr, flush=True)
        return 1
    finally:
        distributed.shutdown()
    return 0


def torchrun(args: list[str], nproc: int = 2, **popen) -> subprocess.Popen:
    """`python -m torch.distributed.run --standalone --nproc-per-node N ARGS` (a free port of its
    own), in its own session so that the whole group can be killed."""
    import lowtune
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(lowtune.__file__).parent.parent), str(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, **popen)


def tiny_torchrun(run_dir: Path, **opts) -> subprocess.Popen:
    return torchrun([str(Path(__file__).resolve()), str(run_dir), json.dumps(opts)])


def finish(p: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = kill_group(p)
        pytest.fail("torchrun did not finish in time:\n" + err.decode(errors="replace")[-4000:])
    text = out.decode(errors="replace") + err.decode(errors="replace")
    assert p.returncode == 0, text[-6000:]
    return text


def single_process_tiny(run_dir: Path, dropout: float = 0.0, **cfg):
    """The reference: one process, --batch 4 (= 2 ranks x 2)."""
    import torch

    from lowtune.train_config import TrainConfig
    from lowtune.trainer import Trainer
    from helpers import save_tiny_adapter
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opts = {**TINY, "batch": 4, **cfg}
        return Trainer(TrainConfig(out=str(run_dir), **opts), model=tiny_model(dropout),
                       dataset=tiny_data(), save_adapter=save_tiny_adapter, log=lambda s: None)
    finally:
        torch.set_num_threads(n)


def assert_same_curve(a: list[dict], b: list[dict], rel: float) -> float:
    """Same rows, integers equal, floats within `rel`; returns the largest relative difference."""
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    worst = 0.0
    for ra, rb in zip(a, b):
        for k, va in ra.items():
            if isinstance(va, float):
                worst = max(worst, abs(va - rb[k]) / max(abs(rb[k]), 1e-12))
                assert va == pytest.approx(rb[k], rel=rel), (k, ra, rb)
            else:
                assert va == rb[k], (k, ra, rb)
    return worst


def test_two_ranks_reproduce_one_process_and_only_rank_0_writes(tmp_path):
    import torch

    from lowtune import checkpoint as ckpt
    from lowtune.failures import TrainingError
    from lowtune.train_config import TrainConfig
    from lowtune.trainer import Trainer
    from helpers import save_tiny_adapter
    run, ref = tmp_path / "run", tmp_path / "ref"
    p = tiny_torchrun(run)
    single_process_tiny(ref).run()
    finish(p)

    # Measured: 9e-8. Each of: no world-size factor on the loss, a per-rank token count, every
    # rank on the same slice, makes this fail.
    worst = assert_same_curve(curve(run), curve(ref), rel=1e-5)
    print(f"largest relative difference, 2 ranks vs 1 process: {worst:.2e}")
    rows = curve(run)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))  # each step once
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 3, 6]
    a = torch.load(run / "adapter.pt", weights_only=True)
    b = torch.load(ref / "adapter.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)

    config = json.loads((run / "config.json").read_text())["train"]
    assert config["batch"] == 2 and config["extra"]["distributed"] == {
        "world_size": 2, "sequences_per_step": 8}
    assert (tmp_path / "run.writes-1").read_text() == ""  # rank 1 wrote nothing
    written = {Path(f).name for f in (tmp_path / "run.writes-0").read_text().split()}
    assert {"config.json.tmp", "metrics.jsonl.tmp", "metrics.jsonl", "step-00000006.pt.tmp",
            "adapter.pt.tmp", "loss.png.tmp", "summary.json.tmp"} <= written
    state = ckpt.load_checkpoint(run / "checkpoints" / "step-00000006.pt")
    assert state["data"]["world_size"] == 2 and len(state["rng_ranks"]) == 2

    # Another number of ranks may continue the run when ranks x --batch stays the same...
    cfg = TrainConfig.load(run)
    cfg.apply_overrides({"steps": 8})
    t = Trainer(cfg, model=tiny_model(0.0), dataset=tiny_data(), save_adapter=save_tiny_adapter,
                log=lambda s: None)
    with pytest.raises(TrainingError, match=r"2 rank\(s\) x --batch 2 = 4 sequences .* --batch 4"):
        t.run(resume=True)
    cfg.apply_overrides({"batch": 4})
    Trainer(cfg, model=tiny_model(0.0), dataset=tiny_data(), save_adapter=save_tiny_adapter,
            log=lambda s: None).run(resume=True)
    longer = tmp_path / "longer"
    single_process_tiny(longer, steps=8).run()
    assert_same_curve(curve(run), curve(longer), rel=1e-5)


def kill_group(p: subprocess.Popen) -> tuple[bytes, bytes]:
    """SIGKILL torchrun and its ranks (which torchrun starts in sessions of their own), as if
    the machine had gone down."""
    def children(pid: int) -> list[int]:
        out = []
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                out += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        return out

    for pid in children(p.pid) + [p.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return p.communicate()


def test_a_killed_group_resumes_like_an_uninterrupted_one(tmp_path):
    """With dropout: every rank's RNG state is in the checkpoint."""
    from lowtune.checkpoint import list_checkpoints
    run, ref = tmp_path / "run", tmp_path / "ref"
    reference = tiny_torchrun(ref, dropout=0.1)
    p = tiny_torchrun(run, dropout=0.1, sleep_s=0.05)
    kill_after_step(p, run / "metrics.jsonl", 3, kill=kill_group)  # after the step-2 checkpoint
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2]
    finish(tiny_torchrun(run, dropout=0.1, resume=True))
    finish(reference)
    assert curve(run) == curve(ref)
    assert len({r["loss"] for r in curve(ref) if "loss" in r}) == 6


def test_a_failing_rank_stops_the_group_with_a_clear_message(tmp_path):
    from lowtune import checkpoint as ckpt
    run = tmp_path / "run"
    p = tiny_torchrun(run, fail_at=7)  # rank 1's 7th forward: step 4 (checkpoint at step 2)
    out, err = p.communicate(timeout=300)
    text = out.decode(errors="replace") + err.decode(errors="replace")
    assert p.returncode != 0
    assert "the GPU of rank 1 caught fire" in text  # rank 1's own error
    assert ("error: [rank 0/2] stopping: rank 1 failed: RuntimeError: the GPU of rank 1 caught "
            "fire. The last checkpoint, ") in text, text[-5000:]
    assert "step-00000002.pt, is intact" in text
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [2]
    assert ckpt.load_checkpoint(run / "checkpoints" / "step-00000002.pt")["step"] == 2
    assert not list(run.rglob("*.tmp"))


def test_two_gloo_ranks_on_smollm2_reproduce_the_single_process_curve(
        tmp_path, smollm2_path, botchan_text):
    """`torchrun --nproc-per-node 2 -m lowtune finetune` (--batch 2 per rank) against one
    `lowtune finetune` with --batch 4: the same losses, gradient norms and held-out losses."""
    from lowtune import cli
    text = tmp_path / "botchan.txt"
    text.write_text(botchan_text[:12000])
    common = [str(smollm2_path), "--data", str(text), "--method", "lora", "--rank", "4",
              "--layers", "28-29", "--steps", "3", "--seq-len", "32", "--grad-accum", "2",
              "--lr", "5e-3", "--warmup", "1", "--eval-tokens", "128", "--eval-every", "0",
              "--device", "cpu"]
    run, ref = tmp_path / "run", tmp_path / "ref"
    p = torchrun(["-m", "lowtune", "finetune", *common, "--batch", "2", "-o", str(run)])
    log = finish(p, timeout=900)
    assert cli.main(["finetune", *common, "--batch", "4", "-o", str(ref)]) == 0
    # Measured: 1e-7 here (7e-7 with --seq-len 64). A gradient off by the world size shows in
    # grad_norm (x2); both ranks on the same shard, in the very first loss (4%).
    worst = assert_same_curve(curve(run), curve(ref), rel=2e-5)
    print(f"largest relative difference, 2 ranks vs 1 process: {worst:.2e}")
    assert log.count("held-out loss") == 2  # rank 0 alone reports (before and after)
    config = json.loads((run / "config.json").read_text())["train"]
    assert config["extra"]["distributed"]["world_size"] == 2
    assert (run / "adapter" / "adapter.safetensors").exists() and (run / "summary.json").exists()


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1], json.loads(sys.argv[2])))
