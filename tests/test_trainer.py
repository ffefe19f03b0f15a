"""trainer.py and checkpoint.py on a tiny torch model: the loop, the run directory, the LR
schedule, gradient accumulation, seeds, and the failures (NaN, full disk, out of memory)."""
from __future__ import annotations

import argparse
import errno
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowtune import checkpoint as ckpt
from lowtune import cli, finetune_cli
from lowtune.failures import NonFiniteLossError, TrainingError, TrainingOutOfMemoryError, oom_message
from lowtune.rundir import read_metrics
from lowtune.train_config import TrainConfig, parse_size
from lowtune.trainer import Trainer, lr_factor

from helpers import VOCAB, TinyLM, curve, markov_dataset, save_tiny_adapter, write_tiny_llama_hf


def tiny_trainer(tmp_path, model=None, dataset=None, log=None, **overrides) -> Trainer:
    opts = dict(out=str(tmp_path / "run"), steps=12, batch=4, seq_len=32, lr=3e-2, warmup=2,
                eval_every=4, save_every=4, seed=7, device="cpu")
    opts.update(overrides)
    return Trainer(TrainConfig(**opts), model=model or TinyLM(), dataset=dataset or markov_dataset(),
                   save_adapter=save_tiny_adapter, log=log or (lambda s: None))


def test_training_lowers_held_out_loss_and_fills_the_run_dir(tmp_path):
    result = tiny_trainer(tmp_path).run()
    run = tmp_path / "run"
    assert result.steps == 12
    assert result.eval_after["eval_ppl"] < 0.8 * result.eval_before["eval_ppl"]
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 4, 8, 12]
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["loss"]) for r in rows if "loss" in r)
    cfg = json.loads((run / "config.json").read_text())["train"]
    assert cfg["steps"] == 12 and cfg["total_steps"] == 12 and cfg["warmup"] == 2
    assert cfg["extra"]["trainable_parameters"] == 2 * 4 * 24
    assert (run / "adapter.pt").exists() and (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [8, 12]  # keep = 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_after"]["eval_ppl"] == result.eval_after["eval_ppl"]
    assert not list(run.rglob("*.tmp"))


def test_resolved_defaults_from_epochs(tmp_path):
    ds = markov_dataset(n_tokens=3200)  # 90 train sequences of 32 tokens
    t = tiny_trainer(tmp_path, dataset=ds, steps=None, epochs=2, batch=4, grad_accum=3,
                     warmup=None, eval_every=None, save_every=None)
    t.run()
    n = len(ds.train)
    assert t.cfg.steps == math.ceil(2 * math.ceil(n / 4) / 3)
    assert t.cfg.warmup == round(0.03 * t.cfg.steps)
    assert t.cfg.eval_every == math.ceil(t.cfg.steps / 5) and t.cfg.save_every == t.cfg.eval_every
    resumed = Trainer(TrainConfig.load(tmp_path / "run"), model=TinyLM(), dataset=ds,
                      save_adapter=save_tiny_adapter, log=lambda s: None).run(resume=True)
    assert resumed.steps == t.cfg.steps  # already finished: nothing more to do


def test_lr_schedule():
    assert [lr_factor(s, 10, 2, "constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    cos = [lr_factor(s, 10, 2, "cosine") for s in range(10)]
    assert cos[:2] == [0.5, 1.0] and cos[1] > cos[5] > cos[9] >= 0
    assert cos[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lr_factor(0, 5, 0, "cosine") == 1.0


def test_logged_learning_rates_follow_the_schedule(tmp_path):
    tiny_trainer(tmp_path, steps=6, warmup=2, schedule="cosine", lr=0.1).run()
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "lr" in r]
    assert lrs == pytest.approx([0.1 * lr_factor(s, 6, 2, "cosine") for s in range(6)])


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path):
    ds = markov_dataset(n_tokens=2560)  # 72 training sequences: divisible by 4
    a = tiny_trainer(tmp_path / "a", model=TinyLM(dropout=0.0), dataset=ds, steps=5, batch=4)
    b = tiny_trainer(tmp_path / "b", model=TinyLM(dropout=0.0), dataset=ds, steps=5, batch=2, grad_accum=2)
    a.run()
    b.run()
    ra = [r for r in read_metrics(tmp_path / "a" / "run" / "metrics.jsonl") if "loss" in r]
    rb = [r for r in read_metrics(tmp_path / "b" / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["loss"] for r in ra] == pytest.approx([r["loss"] for r in rb], rel=1e-5)
    for (_, pa), (_, pb) in zip(a.params, b.params):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6)


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        tiny_trainer(tmp_path / name, steps=5, seed=seed).run()
        runs[name] = curve(read_metrics(tmp_path / name / "run" / "metrics.jsonl"))
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


class NaNAfter(TinyLM):
    def __init__(self, bad_call: int):
        super().__init__()
        self.calls, self.bad_call = 0, bad_call

    def loss(self, ids, labels=None, reduction="mean"):
        out = super().loss(ids, labels, reduction)
        if self.training:
            self.calls += 1
            if self.calls >= self.bad_call:
                return out * float("nan")
        return out


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    t = tiny_trainer(tmp_path, model=NaNAfter(bad_call=6), steps=10, save_every=2, grad_accum=1)
    with pytest.raises(NonFiniteLossError) as e:
        t.run()
    msg = str(e.value)
    assert "step 6" in msg and "step-00000004.pt" in msg and "--lr" in msg and "--resume" in msg
    path, state = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert state["step"] == 4
    # The failed step applied nothing: the parameters are those after step 5, all finite.
    assert all(torch.isfinite(p).all() for _, p in t.params)


def test_full_disk_never_corrupts_the_last_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def save_then_fill_disk(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] >= 2:            # the second checkpoint: half written, then ENOSPC
            f.write(b"PK\x03\x04 partial checkpoint bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_then_fill_disk)
    t = tiny_trainer(tmp_path, steps=12, save_every=4)
    with pytest.raises(OSError) as e:
        t.run()
    assert e.value.errno == errno.ENOSPC
    assert "disk is full" in str(e.value) and "step-00000008.pt" in str(e.value)
    ckdir = tmp_path / "run" / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(ckdir)] == [4]
    assert not list(ckdir.glob("*.tmp"))
    assert ckpt.load_checkpoint(ckdir / "step-00000004.pt")["step"] == 4

    # With space again, the run resumes from step 4 and ends like an uninterrupted run.
    monkeypatch.setattr(torch, "save", real_save)
    tiny_trainer(tmp_path, steps=12, save_every=4).run(resume=True)
    tiny_trainer(tmp_path / "ref", steps=12, save_every=4).run()
    assert curve(read_metrics(tmp_path / "run" / "metrics.jsonl")) == \
        curve(read_metrics(tmp_path / "ref" / "run" / "metrics.jsonl"))


def test_atomic_write_keeps_the_old_file_on_error(tmp_path):
    p = tmp_path / "f.bin"
    ckpt.atomic_write_bytes(p, b"old")

    def boom(f):
        f.write(b"new but incomplete")
        raise OSError(errno.EACCES, "Permission denied")

    with pytest.raises(ckpt.WriteError, match="previous version is intact") as e:
        ckpt.atomic_write(p, boom)
    assert e.value.errno == errno.EACCES
    assert p.read_bytes() == b"old" and not ckpt.tmp_path(p).exists()


def test_damaged_newest_checkpoint_is_skipped(tmp_path):
    d = tmp_path / "ck"
    ckpt.save_checkpoint(d, 3, {"x": torch.ones(2)})
    ckpt.checkpoint_path(d, 5).write_bytes(b"garbage")
    (d / "step-00000007.pt.tmp").write_bytes(b"half")
    with pytest.warns(UserWarning, match="unreadable checkpoint"):
        path, state = ckpt.latest_checkpoint(d)
    assert state["step"] == 3 and torch.equal(state["x"], torch.ones(2))


def test_rng_capture_and_restore_round_trip():
    import random
    state = ckpt.capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.restore_rng(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


class OOMModel(TinyLM):
    def loss(self, ids, labels=None, reduction="mean"):
        if self.training:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has "
                                         "a total capacity of 7.66 GiB of which 1.01 GiB is free.")
        return super().loss(ids, labels, reduction)


def test_out_of_memory_says_what_to_change(tmp_path):
    t = tiny_trainer(tmp_path, model=OOMModel(), seq_len=512, batch=4)
    with pytest.raises(TrainingOutOfMemoryError) as e:
        t.run()
    msg = str(e.value)
    for needle in ("step 1", "2.00 GiB", "--seq-len 256", "--batch 2 --grad-accum 2", "--max-vram"):
        assert needle in msg


def test_oom_message_on_cuda_reports_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (3 * 2**30, 8 * 2**30))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    msg = oom_message(RuntimeError("Tried to allocate 512.00 MiB"), TrainConfig(out="x", batch=1),
                      torch.device("cuda"), 41)
    assert "step 42" in msg and "512.00 MiB" in msg and "3.00 GiB free of 8.00 GiB" in msg
    assert "--batch" not in msg and "--seq-len 256" in msg


def test_parse_size():
    assert parse_size("6GB") == 6 * 2**30 and parse_size("800MB") == 800 * 2**20
    assert parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size("1024") == 1024
    with pytest.raises(ValueError, match="6GB"):
        parse_size("six gigs")


def test_cli_arguments_become_a_config():
    p = argparse.ArgumentParser()
    finetune_cli.add_arguments(p)
    args = p.parse_args(["m.gguf", "--data", "d.jsonl", "--method", "dylora", "--rank", "8",
                         "--steps", "50", "--seq-len", "256", "--grad-accum", "4", "--lr", "1e-3",
                         "--schedule", "constant", "--type", "Q4_1", "--max-vram", "6GB",
                         "--strict", "--train-on-prompt", "--targets", "attn_q,attn_v", "--layers", "2-4,7",
                         "--gradient-checkpointing", "off",
                         "-o", "r"])
    cfg = finetune_cli.config_from_args(args)
    assert (cfg.model, cfg.data, cfg.out, cfg.method, cfg.rank) == ("m.gguf", "d.jsonl", "r", "qdylora", 8)
    assert (cfg.steps, cfg.seq_len, cfg.grad_accum, cfg.lr, cfg.schedule) == (50, 256, 4, 1e-3, "constant")
    assert cfg.qtype == "Q4_1" and cfg.max_vram == 6 * 2**30 and cfg.strict and cfg.train_on_prompt
    assert cfg.targets == ["attn_q", "attn_v"] and cfg.layers == [2, 3, 4, 7]
    assert cfg.gradient_checkpointing is False
    assert cfg.batch == 4  # unset flags keep defaults
    with pytest.raises(SystemExit):
        p.parse_args(["m", "--steps", "3", "--epochs", "1"])


def test_cli_resume_refuses_changes_that_alter_the_data(tmp_path, capsys):
    tiny_trainer(tmp_path, steps=2).run()
    with pytest.raises(TrainingError, match="already holds a run .* --resume"):
        tiny_trainer(tmp_path, steps=2).run()
    rc = cli.main(["finetune", "--resume", str(tmp_path / "run"), "--seq-len", "64"])
    assert rc == 1 and "seq_len cannot change when resuming" in capsys.readouterr().err
    rc = cli.main(["finetune", "--data", "d.txt"])
    assert rc == 1 and "missing MODEL, -o RUN_DIR" in capsys.readouterr().err


def test_method_names_are_canonical_past_the_command_line():
    """Both spellings are accepted where a user names a method; from there on one name is used."""
    p = argparse.ArgumentParser()
    finetune_cli.add_arguments(p)
    for given, canonical in (("qahira", "qa-hira"), ("qa-hira", "qa-hira"), ("dylora", "qdylora"),
                             ("qbara", "q-bara"), ("qalora", "qa-lora"), ("lora", "lora")):
        assert p.parse_args(["--method", given]).method == canonical
        assert TrainConfig(out="x", method=given).method == canonical
    with pytest.raises(ValueError, match="unknown adapter method 'hira'.*qa-hira"):
        TrainConfig(out="x", method="hira")
    assert TrainConfig.from_dict({"out": "x", "method": "qahira"}).method == "qa-hira"  # older config.json


# ---------------------------------------------------------------------------------------------
# With lowtune's own adapters on a tiny quantized model (names as in model.py: layers.N.attn_q)

class QLinear(nn.Module):
    def __init__(self, n: int, k: int, g: torch.Generator, device: str = "cpu"):
        super().__init__()
        import lowtune
        self.weight = lowtune.quantize(torch.randn(n, k, generator=g) / k**0.5, "Q4_1").to(device)

    def forward(self, x):
        import lowtune
        return lowtune.qmatmul(x.contiguous(), self.weight)


class Block(nn.Module):
    def __init__(self, dim: int, g: torch.Generator, device: str):
        super().__init__()
        self.attn_q = QLinear(dim, dim, g, device)
        self.ffn_up = QLinear(2 * dim, dim, g, device)
        self.ffn_down = QLinear(dim, 2 * dim, g, device)

    def forward(self, h):
        h = h + 0.5 * self.attn_q(h)
        return h + 0.5 * self.ffn_down(F.silu(self.ffn_up(h)))


class TinyQuantLM(nn.Module):
    def __init__(self, dim: int = 64, n_layers: int = 2, device: str = "cpu"):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Parameter(torch.randn(VOCAB, dim, generator=g).to(device), requires_grad=False)
        self.layers = nn.ModuleList(Block(dim, g, device) for _ in range(n_layers))
        self.head = nn.Parameter((torch.randn(VOCAB, dim, generator=g) / dim**0.5).to(device),
                                 requires_grad=False)

    def loss(self, ids, labels=None, reduction="mean"):
        labels = ids if labels is None else labels
        h = self.emb[ids]
        if h.is_cuda and torch.is_autocast_enabled("cuda"):
            h = h.to(torch.bfloat16)  # activations in bf16, as LlamaModel's on a GPU
        for layer in self.layers:
            h = layer(h)
        logits = (h @ self.head.T)[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                               ignore_index=-100, reduction=reduction)


def quant_trainer(tmp_path, method, **overrides):
    from lowtune.loading import apply_train_adapter
    from lowtune.rundir import save_run_adapter
    opts = dict(out=str(tmp_path / "run"), method=method, rank=4, alpha=8, steps=6, batch=4,
                seq_len=32, lr=2e-2, warmup=1, eval_every=3, save_every=3, seed=5, device="cpu",
                dropout=0.05)
    opts.update(overrides)
    cfg = TrainConfig(**opts)
    model = TinyQuantLM(device=cfg.device)
    apply_train_adapter(model, cfg)
    return Trainer(cfg, model=model, dataset=markov_dataset(n_tokens=2400),
                   save_adapter=save_run_adapter, log=lambda s: None)


def stop_before_step_4(t: Trainer) -> None:
    """Run `t` and stop it as if killed right after its step-3 checkpoint."""
    step_fn = t._train_step

    def stop_at_4(i):
        if i == 3:
            raise KeyboardInterrupt
        return step_fn(i)

    t._train_step = stop_at_4
    with pytest.raises(KeyboardInterrupt):
        t.run()


@pytest.mark.parametrize("method", ["lora", "qalora", "qbara", "qahira", "dylora"])
def test_every_adapter_method_trains_and_saves(tmp_path, method):
    from lowtune import adapters
    t = quant_trainer(tmp_path, method)
    result = t.run()
    assert result.eval_after["eval_loss"] < result.eval_before["eval_loss"]
    meta = adapters.read_adapter_config(tmp_path / "run" / "adapter")
    assert meta["method"] == adapters.AdapterConfig(method=method).method
    assert {n for n, _ in t.params} == {n for n, p in t.model.named_parameters() if p.requires_grad}
    if method == "dylora":
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert set(summary["dylora_eval_loss_by_rank"]) == {"1", "2", "4"}
        assert meta["dylora_rank"] == summary["dylora_rank"]


def test_dylora_resume_continues_the_same_rank_sequence(tmp_path):
    def recording_ranks(t, seen):
        step_fn = t._train_step

        def step(i):
            out = step_fn(i)
            seen.append(t.dylora.rank)
            return out

        t._train_step = step
        return t

    ref, cut = [], []
    recording_ranks(quant_trainer(tmp_path / "ref", "dylora"), ref).run()
    # Stopped as if killed right after the step-3 checkpoint, then resumed.
    stop_before_step_4(recording_ranks(quant_trainer(tmp_path / "cut", "dylora"), cut))
    recording_ranks(quant_trainer(tmp_path / "cut", "dylora"), cut).run(resume=True)
    assert cut == ref and len(set(ref)) > 1
    assert curve(read_metrics(tmp_path / "cut" / "run" / "metrics.jsonl")) == \
        curve(read_metrics(tmp_path / "ref" / "run" / "metrics.jsonl"))


def test_eval_tokens_limits_the_held_out_set(tmp_path):
    t = tiny_trainer(tmp_path, steps=1, eval_tokens=70)
    result = t.run()
    assert [len(e) for e in t.dataset.eval] == [32, 32, 6]
    assert result.eval_after["eval_tokens"] == 31 + 31 + 5


def test_finetune_command_on_smollm2(tmp_path, smollm2_path, botchan_text):
    """The real model through the command line: QA-HiRA on the last layer, a few steps; the
    saved adapter, loaded into a fresh model, gives the logged held-out loss."""
    from lowtune.loading import load_model
    text = tmp_path / "botchan.txt"
    text.write_text(botchan_text[:20000])
    run = tmp_path / "run"
    rc = cli.main(["finetune", str(smollm2_path), "--data", str(text), "--method", "qahira",
                            "--layers", "29", "--steps", "3", "--seq-len", "32", "--batch", "2",
                            "--lr", "5e-3", "--eval-tokens", "64", "--eval-every", "0",
                            "--device", "cpu", "-o", str(run)])
    assert rc == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_after"]["eval_loss"] != summary["eval_before"]["eval_loss"]
    cfg = json.loads((run / "config.json").read_text())["train"]
    assert cfg["extra"]["adapter"]["method"] == "qa-hira" and cfg["layers"] == [29]

    model = load_model(smollm2_path, adapter=run)   # the adapter's base hash is checked
    cfg = TrainConfig.load(run)
    cfg.device, cfg.out = "cpu", str(tmp_path / "re-eval")  # a finished run is not set up again
    t = Trainer(cfg, model=model, log=lambda s: None)
    t._setup()
    assert t.evaluate()["eval_loss"] == pytest.approx(summary["eval_after"]["eval_loss"], rel=1e-5)


def test_safetensors_model_is_quantized_on_load(tmp_path, botchan_text):
    hf = tmp_path / "tiny-hf"
    write_tiny_llama_hf(hf, botchan_text[:30000], hidden=256)  # rows of 256, and 96 (ffn_down)
    text = tmp_path / "t.txt"
    text.write_text(botchan_text[30000:36000])
    cfg = TrainConfig(model=str(hf), data=str(text), out=str(tmp_path / "run"), method="qahira",
                      steps=2, seq_len=64, batch=2, lr=1e-2, device="cpu", eval_tokens=128)
    t = Trainer(cfg, log=lambda s: None)
    result = t.run()
    types = t.model.tensor_types
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["token_embd.weight"] == "Q4_K"
    assert types["blk.0.ffn_down.weight"] == "Q4_1"  # rows of 96: not whole Q4_K super-blocks
    assert math.isfinite(result.eval_after["eval_loss"])
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").exists()
    import lowtune
    assert lowtune.resume(tmp_path / "run", device="cpu").steps == 2  # finished: nothing to do
    more = lowtune.resume(tmp_path / "run", steps=3, device="cpu")  # one more step, same data
    assert more.steps == 3 and more.eval_after["step"] == 3

    with pytest.raises(ValueError, match="--type applies to safetensors"):
        Trainer(TrainConfig(model=__file__, data=str(text), out=str(tmp_path / "r2"),
                            qtype="Q4_0", device="cpu"), log=lambda s: None).run()


# ---------------------------------------------------------------------------------------------
# --dtype on the CPU: bf16 activations, fp32 adapters and AdamW state, kept on resume

def dtype_run(tmp_path, botchan_text, name: str, **overrides) -> Trainer:
    """A tiny Q4_1 Llama GGUF fine-tuned on the CPU by a Trainer with `overrides`, in tmp_path/name."""
    from helpers import write_tiny_llama_gguf
    model = tmp_path / "tiny.gguf"
    if not model.exists():
        write_tiny_llama_gguf(model, "Q4_1", dim=64, ffn=128, emb_scale=0.1)
        (tmp_path / "t.txt").write_text(botchan_text[:12000])
    opts = dict(model=str(model), data=str(tmp_path / "t.txt"), out=str(tmp_path / name), method="lora",
                rank=8, steps=6, seq_len=32, batch=4, lr=2e-2, warmup=1, eval_tokens=256, device="cpu")
    return Trainer(TrainConfig(**{**opts, **overrides}), log=lambda s: None)


def test_bf16_on_the_cpu_trains_fp32_adapters_and_resumes_in_bf16(tmp_path, botchan_text):
    fp32 = dtype_run(tmp_path, botchan_text, "fp32")  # the default: fp32 activations on the CPU
    ref = fp32.run()
    bf16 = dtype_run(tmp_path, botchan_text, "bf16", dtype="bf16")
    result = bf16.run()
    assert fp32.model.dtype == torch.float32 and bf16.model.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for _, p in bf16.params)  # master weights
    assert all(v.dtype == torch.float32 for st in bf16.optimizer.state.values()
               for k, v in st.items() if k != "step")
    rows = read_metrics(tmp_path / "bf16" / "metrics.jsonl")
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert result.eval_after["eval_loss"] < result.eval_before["eval_loss"]
    # bf16 rounds the activations, not the training: the held-out losses stay close to fp32's
    assert result.eval_after["eval_loss"] == pytest.approx(ref.eval_after["eval_loss"], rel=0.02)
    for run, want in (("fp32", "auto"), ("bf16", "bf16")):
        assert json.loads((tmp_path / run / "config.json").read_text())["train"]["dtype"] == want
    resumed = Trainer(TrainConfig.load(tmp_path / "bf16"), log=lambda s: None)
    resumed.cfg.steps = 7
    assert resumed.run(resume=True).steps == 7 and resumed.model.dtype == torch.bfloat16
    assert TrainConfig.load(tmp_path / "bf16").dtype == "bf16"


def test_fp16_training_is_refused_before_anything_loads(tmp_path, capsys):
    with pytest.raises(ValueError, match="use --dtype bf16 or fp32"):
        TrainConfig(out="x", dtype="fp16").check()
    data = tmp_path / "d.txt"
    data.write_text("some text")
    rc = cli.main(["finetune", __file__, "--data", str(data), "--dtype", "fp16", "--device", "cpu",
                   "-o", str(tmp_path / "run")])
    assert rc == 1 and "fp16 gradients would need loss scaling" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="dtype must be one of auto, fp32, bf16"):
        TrainConfig(out="x", dtype="float8").check()


def test_dtype_from_the_command_line_and_on_resume(tmp_path, capsys):
    p = argparse.ArgumentParser()
    finetune_cli.add_arguments(p)
    new_run = ["m", "--data", "d", "-o", "r"]
    assert finetune_cli.config_from_args(p.parse_args(new_run)).dtype == "auto"
    assert finetune_cli.config_from_args(p.parse_args(new_run + ["--dtype", "bf16"])).dtype == "bf16"
    tiny_trainer(tmp_path, steps=1).run()
    assert TrainConfig.load(tmp_path / "run").dtype == "auto"  # resolved per device, also on resume
    args = p.parse_args(["--resume", str(tmp_path / "run"), "--dtype", "bf16"])
    assert finetune_cli.resumed_config(args).dtype == "bf16"  # a resume may change it
    assert finetune_cli.resumed_config(p.parse_args(["--resume", str(tmp_path / "run")])).dtype == "auto"


# ---------------------------------------------------------------------------------------------
# CUDA: bf16 autocast, fp32 adapter state, CUDA RNG in checkpoints, real out-of-memory errors

@pytest.mark.cuda
@pytest.mark.parametrize("method", ["qahira", "dylora"])
def test_cuda_training_resumes_like_an_uninterrupted_run(tmp_path, method):
    ref = quant_trainer(tmp_path / "ref", method, device="cuda")
    result = ref.run()
    assert result.eval_after["eval_loss"] < result.eval_before["eval_loss"]
    assert all(p.dtype == torch.float32 and p.is_cuda for _, p in ref.params)
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32
               for st in ref.optimizer.state.values() for k, v in st.items() if k != "step")
    rows = read_metrics(tmp_path / "ref" / "run" / "metrics.jsonl")
    assert all(r["gpu_mem_gb"] > 0 for r in rows if "loss" in r)

    stop_before_step_4(quant_trainer(tmp_path / "cut", method, device="cuda"))
    quant_trainer(tmp_path / "cut", method, device="cuda").run(resume=True)
    got = curve(read_metrics(tmp_path / "cut" / "run" / "metrics.jsonl"))
    want = curve(rows)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-7), (k, g, w)


class CudaHog(TinyLM):
    def loss(self, ids, labels=None, reduction="mean"):
        if self.training:
            torch.empty(1 << 46, dtype=torch.uint8, device="cuda")  # 64 TiB
        return super().loss(ids, labels, reduction)


@pytest.mark.cuda
def test_cuda_out_of_memory_reports_request_and_free_memory(tmp_path):
    t = tiny_trainer(tmp_path, model=CudaHog(), device="cuda", seq_len=32, batch=4)
    with pytest.raises(TrainingOutOfMemoryError) as e:
        t.run()
    msg = str(e.value)
    assert "tried to allocate 65536.00 GiB" in msg and "GiB free of" in msg
    assert "--batch 2 --grad-accum 2" in msg and "--seq-len" not in msg  # seq_len 32: already small


@pytest.mark.cuda
def test_safetensors_model_trains_on_cuda(tmp_path, botchan_text):
    hf = tmp_path / "tiny-hf"
    write_tiny_llama_hf(hf, botchan_text[:30000], hidden=256)
    text = tmp_path / "t.txt"
    text.write_text(botchan_text[30000:40000])
    cfg = TrainConfig(model=str(hf), data=str(text), out=str(tmp_path / "run"), method="lora",
                      rank=8, steps=8, seq_len=64, batch=2, lr=1e-2, device="cuda", eval_tokens=256)
    t = Trainer(cfg, log=lambda s: None)
    result = t.run()
    assert t.model.gradient_checkpointing and t.model.dtype == torch.bfloat16
    assert result.eval_after["eval_loss"] < result.eval_before["eval_loss"]
