"""The fine-tuning loop: adapters on a frozen quantized model, resumable, reproducible.

    result = lowtune.finetune("model.gguf", "train.jsonl", "runs/a", method="qa-hira", steps=200)
    lowtune.resume("runs/a")                                  # continue a killed run
    Trainer(cfg, model=model, dataset=dataset).run()          # a model of your own (tests, LREC)

One optimizer step = `grad_accum` micro-batches of `batch` examples; its loss is the mean over
every scored token of all its micro-batches (token-weighted, not a mean of means). AdamW with
fp32 state updates the adapter parameters only, which stay fp32 whatever the activations run in
(cfg.dtype: by default bf16 on CUDA, fp32 on the CPU); the learning rate warms up linearly for
`warmup` steps, then stays constant or follows a cosine to zero. The configuration is
train_config.TrainConfig, the run directory rundir.RunDir, the failures failures.py, the model
loading.load_for_training.

Reproducibility: everything random is a function of `seed` (adapter initialisation, dropout,
QDyLoRA ranks, the data order `data.epoch_order(seed, epoch)`); checkpoints hold every RNG state
and the data position follows from the step, so a run killed anywhere and resumed logs the same
metrics as one never interrupted.

Under torchrun (lowtune.distributed) `batch` is per rank: a micro-batch of the run is the
`batch * world` sequences one process would take, split between the ranks, and losses are
normalised by the scored tokens of all ranks, so the run is the single-process one (to float
rounding). Rank 0 writes the run directory and logs; held-out evaluation is shared out and
summed; checkpoints hold every rank's RNG state. Dropout masks differ between ranks (rank 0 draws
those of a single process); the QDyLoRA rank of a step is the same on all.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import checkpoint as ckpt
from . import distributed
from .adapters import DyLoRAController, adapters_of
from .checkpoint import seed_everything
from .data import (Dataset, collate, count_targets, first_tokens, load_dataset, micro_batch_indices,
                   micro_batches_per_epoch)
from .failures import (OOM_ERRORS, NonFiniteLossError, PeerFailedError, TrainingError, TrainingOutOfMemoryError,
                       changed_batching, existing_run, kept_checkpoint, nonfinite_message, oom_message)
from .host_adamw import make_adamw
from .loading import activation_dtype, load_for_training, pick_device
from .model import Model
from .paths import check_output_dir
from .progress import Progress, plural
from .rundir import RunDir, save_run_adapter
from .streaming import optimizer_on_host
from .tokenizer import load_tokenizer
from .train_config import TrainConfig


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    eval_before: dict | None
    eval_after: dict | None
    wall_s: float
    adapter_path: Path | None


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """Runs one configuration. `model`, `tokenizer`, `dataset` and `save_adapter` may be given
    (tests, notebooks, LREC); otherwise they come from cfg.model / cfg.data (loading.py) and
    save_run_adapter. A given model must already carry its trainable parameters and have
    `loss(ids, labels, reduction="sum")`; it keeps its own activation dtype (cfg.dtype decides
    only CUDA's bf16 autocast for it)."""

    def __init__(self, cfg: TrainConfig, *, model=None, tokenizer=None, dataset: Dataset | None = None,
                 save_adapter: Callable[[Any, Path], Path] | None = None,
                 log: Callable[[str], None] | None = None):
        cfg.check()
        self.cfg = cfg
        self.model, self.tokenizer, self.dataset = model, tokenizer, dataset
        self.save_adapter = save_adapter or save_run_adapter
        self.log = log or (lambda s: print(s, flush=True))
        self.run_dir = Path(cfg.out)
        self.last_checkpoint: Path | None = None
        self.ddp = None  # DistributedDataParallel around the loss, under torchrun

    # -- set-up ----------------------------------------------------------------------------------

    def _setup(self, resume: bool = False) -> None:
        cfg = self.cfg
        self.device = distributed.init(pick_device(cfg.device))  # torchrun: this rank's GPU
        self.dtype = activation_dtype(self.device, cfg.dtype)
        # (auto stays auto in config.json: a run resumed on another device takes that device's dtype)
        self.rundir = RunDir(self.run_dir, writer=distributed.is_main())
        if distributed.is_main():  # what the run directory allows is known before anything loads
            check_output_dir(self.run_dir, "run directory")
            newest = self.rundir.newest_step()
            if newest is not None and not resume:
                raise existing_run(self.run_dir, newest)
        if not distributed.is_main():
            self.log = lambda s: None  # rank 0 speaks for the group
        seed_everything(cfg.seed)
        if self.model is None:
            self.model, tok = load_for_training(cfg, self.device, self.log)
            self.tokenizer = self.tokenizer or tok
        else:
            self.model.to(self.device)
            if self.tokenizer is None and getattr(self.model, "metadata", None):
                self.tokenizer = load_tokenizer(self.model.metadata)
        try:  # (learned positions bound the sequence: GPT-2's 1024)
            getattr(self.model, "check_positions", lambda end: None)(cfg.seq_len)
        except ValueError as e:
            raise TrainingError(str(e)) from None
        if hasattr(self.model, "gradient_checkpointing"):
            gc = cfg.gradient_checkpointing
            self.model.gradient_checkpointing = (self.device.type == "cuda") if gc is None else gc
        self._compile()
        self.params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not self.params:
            raise TrainingError("the model has no trainable parameters (were adapters applied?)")
        for _, p in self.params:  # master weights and AdamW state in fp32
            if p.dtype != torch.float32:
                p.data = p.data.float()
        if self.dataset is None:
            self.log(f"reading {cfg.data}")
            self.dataset = load_dataset(cfg.data, self.tokenizer, cfg.seq_len,
                                        train_on_prompt=cfg.train_on_prompt,
                                        eval_fraction=cfg.eval_fraction, strict=cfg.strict,
                                        allow_binary=cfg.allow_binary)
        if cfg.eval_tokens is not None:
            ds = self.dataset
            self.dataset = Dataset(ds.train, first_tokens(ds.eval, cfg.eval_tokens), ds.stats)
        self.dataset.stats.train_tokens = sum(len(e) for e in self.dataset.train)
        self.dataset.stats.eval_tokens = sum(len(e) for e in self.dataset.eval)
        self.pad_id = int(getattr(self.tokenizer, "eos_id", 0) or 0) if self.tokenizer else 0
        self._resolve()

    def _compile(self) -> None:
        """cfg.compile and cfg.cuda_graphs applied to a lowtune model (lowtune.compile); other
        models (tests, LREC's distillation wrapper) run as they are."""
        cfg = self.cfg
        if not isinstance(self.model, Model):
            return
        from .compile import compile_model, default_cuda_graphs, default_mode
        mode = default_mode(self.device, self.model) if cfg.compile == "auto" else cfg.compile
        graphs = default_cuda_graphs(self.device, self.model) if cfg.cuda_graphs is None else cfg.cuda_graphs
        if graphs and self.device.type != "cuda":
            raise TrainingError(f"--cuda-graphs on needs a CUDA device; this run is on {self.device}")
        plan = getattr(self.model, "stream_plan", None)
        if graphs and plan is not None and plan.budget is not None and not plan.cuda_graphs:
            # the --max-vram plan left no room for the graphs' pool: capturing would overrun it
            self.log("no room for CUDA graphs within --max-vram: layers run without them (slower; "
                     "a larger budget makes room)")
            graphs = False
        cfg.extra["compile"] = {"mode": mode, "cuda_graphs": graphs}
        if mode == "off" and not graphs:
            return  # eager, as the model comes
        # compilation and capture happen in the first step; the log says when and how long
        compile_model(self.model, mode, cuda_graphs=graphs, on_event=lambda line: self.log(line))

    def _resolve(self) -> None:
        cfg = self.cfg
        # torchrun: --batch is per rank; a micro-batch of the run is `global_batch` sequences,
        # of which rank r takes the r-th slice of `batch` (see _batch).
        self.world = distributed.world_size()
        self.global_batch = cfg.batch * self.world
        per_epoch = micro_batches_per_epoch(len(self.dataset.train), self.global_batch)
        if cfg.steps is None:
            cfg.steps = max(1, math.ceil((cfg.epochs or 1.0) * per_epoch / cfg.grad_accum))
        cfg.total_steps = cfg.steps
        if cfg.warmup is None:
            cfg.warmup = int(round(0.03 * cfg.steps))
        if cfg.eval_every is None:
            cfg.eval_every = max(1, math.ceil(cfg.steps / 5)) if self.dataset.eval else 0
        if cfg.save_every is None:
            cfg.save_every = cfg.eval_every or max(1, math.ceil(cfg.steps / 10))
        cfg.extra["data"] = dataclasses.asdict(self.dataset.stats)
        cfg.extra["trainable_parameters"] = sum(p.numel() for _, p in self.params)
        cfg.extra["device"] = str(self.device)
        cfg.extra["micro_batches_per_epoch"] = per_epoch
        cfg.extra["distributed"] = {"world_size": self.world,
                                    "sequences_per_step": self.global_batch * cfg.grad_accum}

    # -- the step ----------------------------------------------------------------------------------

    def _autocast(self):
        # A loaded model computes in self.dtype already. CUDA adds bf16 autocast (models given to
        # the trainer follow it too); the CPU runs without autocast, which would only add casts.
        bf16_cuda = self.device.type == "cuda" and self.dtype == torch.bfloat16
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16_cuda)

    def _batch(self, index: int):
        """This rank's part of micro-batch `index`: (input_ids, labels), or None when the slice is
        empty (the short last micro-batch of an epoch). Every rank draws the same global
        micro-batch of `global_batch` sequences and takes its own `batch` of them, so the ranks
        together see exactly what one process with --batch global_batch would."""
        _, idx = micro_batch_indices(len(self.dataset.train), self.global_batch, self.cfg.seed, index)
        idx = idx[distributed.rank() * self.cfg.batch:][:self.cfg.batch]
        return collate([self.dataset.train[i] for i in idx], self.pad_id) if len(idx) else None

    def _loss_sum(self, batch):
        """Summed loss of a micro-batch (through DDP, whose forward arms the gradient all-reduce)."""
        if self.ddp is None:
            ids, labels = batch
            return self.model.loss(ids.to(self.device), labels.to(self.device), reduction="sum")
        if batch is None:
            return self.ddp()
        return self.ddp(batch[0].to(self.device), batch[1].to(self.device))

    def _train_step(self, step: int) -> dict:
        """One optimizer step (0-based `step`): grad_accum micro-batches, clip, AdamW.

        The loss is normalised by the scored tokens of the step over all ranks; DDP averages
        gradients over ranks, so each rank's loss is scaled by world/total: the gradient is then
        the single-process one of the global batch."""
        cfg = self.cfg
        batches = [self._batch(step * cfg.grad_accum + k) for k in range(cfg.grad_accum)]
        counts = [count_targets(b[1]) if b is not None else 0 for b in batches]
        total, tokens = distributed.all_reduce_sum(
            sum(counts), sum(int(b[0].numel()) for b in batches if b is not None))
        total, tokens, loss_sum = int(total), int(tokens), 0.0
        if self.dylora is not None:
            self.dylora.sample()  # one rank b for every layer, for this step (same on all ranks)
        for k, (batch, n) in enumerate(zip(batches, counts)):
            last = k == cfg.grad_accum - 1  # DDP all-reduces in the last micro-batch's backward
            if n == 0 and not (self.ddp is not None and last and total > 0):
                continue
            with distributed.no_sync(self.ddp, last):
                with self._autocast():
                    loss = self._loss_sum(batch if n else None)
                value = float(loss.detach())
                if not math.isfinite(value):
                    self._fail_nonfinite(f"the loss is {value}", step, k)
                (loss / (total / self.world)).backward()
            loss_sum += value
        loss_sum = distributed.all_reduce_sum(loss_sum)[0]
        params = [p for _, p in self.params]
        norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip and cfg.clip > 0 else float("inf")))
        if not math.isfinite(norm):
            self._fail_nonfinite(f"the gradient norm is {norm}", step, None)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_sum / max(total, 1), "lr": lr, "grad_norm": norm,
                "tokens": tokens, "targets": total}

    def _fail_nonfinite(self, what: str, step: int, micro: int | None) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(nonfinite_message(what, step, micro, self.cfg, self.run_dir,
                                                   self.last_checkpoint))

    def _guard_oom(self, fn, step: int):
        try:
            return fn(step)
        except OOM_ERRORS as e:
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingOutOfMemoryError(oom_message(e, self.cfg, self.device, step)) from None

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Held-out loss (mean over scored tokens) and perplexity. RNG states are restored
        afterwards, so evaluating does not change the training that follows. Under torchrun
        rank r evaluates batches r, r + world, ... and the sums are all-reduced: every rank
        returns the same numbers."""
        if not self.dataset.eval:
            return None
        rng = ckpt.capture_rng()
        was_training = self.model.training
        self.model.eval()
        nll, scored, t0 = 0.0, 0, time.perf_counter()
        rank, world = distributed.rank(), distributed.world_size()
        ex = self.dataset.eval
        starts = list(range(0, len(ex), self.cfg.batch))[rank::world]  # this rank's batches
        # a bar for an evaluation that takes more than a moment; cleared when it ends
        bar = Progress(total=len(starts), desc="held-out eval", unit="batch", delay=1.0, leave=False,
                       enabled=distributed.is_main())
        try:
            for s in starts:
                ids, labels = collate(ex[s:s + self.cfg.batch], self.pad_id)
                n = count_targets(labels)
                if n:
                    with self._autocast():
                        nll += float(self.model.loss(ids.to(self.device), labels.to(self.device),
                                                     reduction="sum"))
                    scored += n
                bar.update(1, tokens=int(ids.numel()))
        finally:
            bar.close()
            self.model.train(was_training)
            ckpt.restore_rng(rng)
        nll, scored = distributed.all_reduce_sum(nll, scored)
        scored = int(scored)
        loss = nll / max(scored, 1)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "eval_tokens": scored,
                "eval_s": round(time.perf_counter() - t0, 3)}

    # -- checkpoints ---------------------------------------------------------------------------

    def _state(self, step: int, elapsed: float, tokens: int, rng_ranks: list | None = None) -> dict:
        epoch, _ = micro_batch_indices(len(self.dataset.train), self.global_batch, self.cfg.seed,
                                       step * self.cfg.grad_accum)
        return {
            "params": {n: p.detach().cpu() for n, p in self.params},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": ckpt.capture_rng(),
            "rng_ranks": rng_ranks,  # torchrun: every rank's RNG states (dropout differs by rank)
            "data": {"micro_batch": step * self.cfg.grad_accum, "epoch": epoch,
                     "seed": self.cfg.seed, "n_train": len(self.dataset.train),
                     "sequences_per_micro_batch": self.global_batch, "world_size": self.world},
            "elapsed_s": elapsed, "tokens": tokens,
            "dylora_rng": list(self.dylora.rng.getstate()) if self.dylora is not None else None,
        }

    def _restore(self, state: dict) -> tuple[int, float, int]:
        data = state["data"]
        if data["n_train"] != len(self.dataset.train):
            raise TrainingError(
                f"the data changed since the checkpoint ({data['n_train']} training examples "
                f"then, {len(self.dataset.train)} now); resume with the same data file")
        # The data order follows from the sequences of a micro-batch over all ranks; another
        # number of ranks is fine when --batch keeps that number.
        world0 = data.get("world_size", 1)
        seqs = data.get("sequences_per_micro_batch", self.cfg.batch * world0)
        if seqs != self.global_batch:
            raise TrainingError(changed_batching(world0, seqs, self.world, self.cfg.batch))
        if set(state["params"]) != {n for n, _ in self.params}:
            raise TrainingError("the checkpoint's trainable parameters do not match the model's "
                                "adapters; resume with the run's own configuration")
        with torch.no_grad():
            for n, p in self.params:
                p.copy_(state["params"][n].to(p.device, p.dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rngs = state.get("rng_ranks") or [state["rng"]]
        if distributed.rank() < len(rngs):
            ckpt.restore_rng(rngs[distributed.rank()])
        else:  # more ranks than when the checkpoint was written: a fresh stream for this one
            ckpt.restore_rng(state["rng"])
            seed_everything(distributed.rank_seed(self.cfg.seed + int(state["step"])))
        if self.dylora is not None and state.get("dylora_rng") is not None:
            v, internal, gauss = state["dylora_rng"]
            self.dylora.rng.setstate((v, tuple(internal), gauss))
        return int(state["step"]), float(state["elapsed_s"]), int(state["tokens"])

    def _save(self, step: int, elapsed: float, tokens: int) -> None:
        """Rank 0 writes the checkpoint; the others wait until it is in place."""
        rngs = distributed.all_gather_object(ckpt.capture_rng()) if self.world > 1 else None
        state = self._state(step, elapsed, tokens, rngs) if distributed.is_main() else {}
        self.last_checkpoint = self.rundir.save_checkpoint(step, state, self.cfg.keep_checkpoints)
        distributed.barrier()

    # -- the run -------------------------------------------------------------------------------

    def run(self, resume: bool = False) -> TrainResult:
        """Train (or continue, with resume) to cfg.steps. Under torchrun every rank calls this;
        when one rank fails, the others raise PeerFailedError naming it."""
        with distributed.stop_together(PeerFailedError, lambda: kept_checkpoint(self.run_dir, self.last_checkpoint)):
            return self._run(resume)

    def _begin(self, resume: bool) -> tuple[int, float, int]:
        """Optimizer, schedule, QDyLoRA and DDP; then the checkpoint to continue from, if any:
        (step, elapsed seconds, tokens) to start at."""
        cfg = self.cfg
        # rank 0 reads the checkpoints and hands what it found to the others
        newest = distributed.broadcast_object(self.rundir.newest_step() if distributed.is_main() else None)
        if newest is not None and not resume:  # before config.json: the old run stays as it was
            raise existing_run(self.run_dir, newest)
        self.rundir.start(cfg)
        params = [p for _, p in self.params]
        # one fused kernel for all parameters on CUDA; on the CPU one multi-tensor op per step
        impl = {"fused": True} if all(p.is_cuda for p in params) else {"foreach": True}
        self.optimizer = make_adamw(params, optimizer_on_host(self.model), lr=cfg.lr, betas=(0.9, 0.999),
                                    eps=1e-8, weight_decay=cfg.weight_decay, **impl)
        total, warmup, schedule = cfg.steps, cfg.warmup, cfg.schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total, warmup, schedule))
        qdylora = any(a.method == "qdylora" for a in adapters_of(self.model).values())
        self.dylora = DyLoRAController(self.model, self.optimizer, seed=cfg.seed) if qdylora else None
        self.ddp = distributed.wrap_loss(self.model, params)  # None in a single process
        if distributed.rank():  # dropout masks differ between ranks; rank 0 keeps cfg.seed's
            seed_everything(distributed.rank_seed(cfg.seed))
        found = self.rundir.latest_checkpoint() if distributed.is_main() and resume and newest is not None else None
        found = distributed.broadcast_object(found)
        if found is None:
            if resume:
                self.log(f"no checkpoint in {self.rundir.ckpt_dir}; starting {self.run_dir} from step 0")
            self.rundir.truncate_metrics(-1)
            return 0, 0.0, 0
        self.last_checkpoint, state = found
        start = self._restore(state)
        self.rundir.truncate_metrics(start[0])
        self.log(f"resuming {self.run_dir} from step {start[0]}/{total}")
        return start

    def _run(self, resume: bool) -> TrainResult:
        cfg = self.cfg
        self._setup(resume)  # model and data first: a mistake there leaves no empty run directory
        step, elapsed, tokens = self._begin(resume)
        rows = self.rundir.metrics() if distributed.is_main() else []
        self.model.train()
        self.log(f"{cfg.method} on {cfg.model or 'the given model'}: {plural(cfg.steps, 'step')} of "
                 f"{self._step_shape()} of up to {cfg.seq_len} tokens, "
                 f"{cfg.extra['trainable_parameters']:,} trainable parameters, {self.device}; "
                 f"{self.dataset.stats.summary()}")
        if step == 0:
            rows += self._run_eval(0)
        t_start = time.perf_counter() - elapsed
        log = self.log
        with Progress(total=cfg.steps, desc="finetune", unit="step", initial=step,
                      enabled=distributed.is_main()) as bar:
            self.log = lambda text: bar.write(text, log)  # log lines above the bar, not into it
            try:
                step = self._loop(bar, step, tokens, rows, t_start)
            finally:
                self.log = log
        return self._finish(rows, time.perf_counter() - t_start, step)

    def _loop(self, bar: Progress, step: int, tokens: int, rows: list[dict], t_start: float) -> int:
        """Steps from `step` to cfg.steps, with their metrics (appended to `rows`), evaluations
        and checkpoints; returns the step reached."""
        cfg = self.cfg
        while step < cfg.steps:
            t0 = time.perf_counter()
            out = self._guard_oom(self._train_step, step)
            step += 1
            tokens += out["tokens"]
            dt = time.perf_counter() - t0
            row = {"step": step, "loss": out["loss"], "lr": out["lr"],
                   "grad_norm": out["grad_norm"], "tokens": tokens,
                   "tokens_per_s": round(out["tokens"] / dt, 2) if dt > 0 else None,
                   "elapsed_s": round(time.perf_counter() - t_start, 3)}
            if self.device.type == "cuda":
                row["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
            self.rundir.append_metrics(row)
            rows.append(row)
            bar.update(1, tokens=out["tokens"], loss=round(out["loss"], 4), lr=f"{out['lr']:.2e}")
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                rows.extend(self._run_eval(step))
            if step % cfg.save_every == 0 or step == cfg.steps:
                self._save(step, time.perf_counter() - t_start, tokens)
        return step

    def _step_shape(self) -> str:
        """'1 sequence', '8 sequences (2 micro-batches of 4)', '16 sequences (4 ranks x 2
        micro-batches of 2)': what one optimizer step sees."""
        cfg = self.cfg
        text = plural(self.global_batch * cfg.grad_accum, "sequence")
        parts = [f"{self.world} ranks"] if self.world > 1 else []
        if cfg.grad_accum > 1 or self.world > 1:
            parts.append(f"{plural(cfg.grad_accum, 'micro-batch', 'micro-batches')} of {cfg.batch}")
            text += f" ({' x '.join(parts)})"
        return text

    def _run_eval(self, step: int) -> list[dict]:
        """The held-out evaluation at `step`, logged and written: [its metrics row], or []."""
        if self.dylora is not None:
            self.dylora.set_rank(self.dylora.r_max)  # held-out loss at the full rank
        ev = self._guard_oom(lambda _: self.evaluate(), step)
        if ev is None:
            return []
        row = {"step": step, **ev}
        self.rundir.append_metrics(row)
        self.log(f"step {step}: held-out loss {ev['eval_loss']:.4f}, perplexity {ev['eval_ppl']:.3f} "
                 f"({ev['eval_tokens']} tokens, {ev['eval_s']:.1f} s)")
        return [row]

    def _choose_dylora_rank(self) -> dict:
        """QDyLoRA: held-out loss at ranks 1, 2, 4, ..., r_max; the best one is kept (and saved
        with the adapter)."""
        r_max = self.dylora.r_max
        ranks = sorted({1 << i for i in range(r_max.bit_length()) if 1 << i <= r_max} | {r_max})
        losses = {}
        for b in ranks:
            self.dylora.set_rank(b)
            losses[b] = self._guard_oom(lambda _: self.evaluate(), self.cfg.steps)["eval_loss"]
        best = min(losses, key=losses.get)
        self.dylora.set_rank(best)
        self.log("QDyLoRA held-out loss by rank: " + ", ".join(f"{b}: {v:.4f}" for b, v in losses.items())
                 + f"; keeping rank {best}")
        return {"dylora_eval_loss_by_rank": {str(b): v for b, v in losses.items()}, "dylora_rank": best}

    def _finish(self, rows: list[dict], wall: float, step: int) -> TrainResult:
        evals = [r for r in rows if "eval_loss" in r]
        before = next((r for r in evals if r["step"] == 0), None)
        after = evals[-1] if evals and evals[-1]["step"] == step and step > 0 else None
        extra = {}
        if self.dylora is not None and self.dataset.eval:
            extra = self._choose_dylora_rank()  # every rank evaluates its share
        adapter_path = None
        if distributed.is_main():
            adapter_path = self.save_adapter(self.model, self.run_dir)
            summary = {"steps": step, "wall_s": round(wall, 2), "method": self.cfg.method,
                       "adapter": str(adapter_path) if adapter_path else None,
                       "eval_before": before, "eval_after": after, **extra}
            note = self.rundir.finish(rows, summary, title=self.cfg.method)
            if note:
                self.log(note)
        # Every rank returns once the run directory is complete.
        adapter_path = distributed.broadcast_object(adapter_path)
        if before and after:
            change = 100.0 * (after["eval_ppl"] / before["eval_ppl"] - 1.0)
            self.log(f"held-out perplexity: {before['eval_ppl']:.3f} before, {after['eval_ppl']:.3f} "
                     f"after ({change:+.1f}%)")
        if distributed.is_main():
            self.log(f"wrote {self.run_dir}: {self.rundir.contents()}")
        return TrainResult(self.run_dir, step, before, after, wall, adapter_path)


def finetune(model: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike,
             method: str = "qa-hira", **options) -> TrainResult:
    """Fine-tune `model` (GGUF file or safetensors dir) on `data` into run directory `out`.
    Options are TrainConfig fields (rank, alpha, steps, epochs, seq_len, batch, lr, max_vram, ...)."""
    cfg = TrainConfig(model=str(model), data=str(data), out=str(out), method=method, **options)
    return Trainer(cfg).run()


def resume(run_dir: str | os.PathLike, **overrides) -> TrainResult:
    """Continue the run in `run_dir` from its newest checkpoint (overrides: RESUME_OVERRIDES)."""
    cfg = TrainConfig.load(run_dir)
    cfg.apply_overrides(overrides)
    return Trainer(cfg).run(resume=True)
