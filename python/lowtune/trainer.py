"""Fine-tuning loop: adapters on a frozen quantized model, resumable, reproducible.

    cfg = TrainConfig(model="model.gguf", data="train.jsonl", out="runs/a", method="qahira")
    result = Trainer(cfg).run()                 # or lowtune.finetune("model.gguf", "train.jsonl", "runs/a")
    Trainer(TrainConfig.load("runs/a")).run(resume=True)   # continue a killed run

One optimizer step = `grad_accum` micro-batches of `batch` examples. The loss of a step is the mean
over every scored token of all its micro-batches (token-weighted, not a mean of means). AdamW
with fp32 state updates the trainable (adapter) parameters only; the learning rate warms up
linearly for `warmup` steps, then stays constant or follows a cosine to zero.

The run directory:
    config.json        the resolved configuration (what `--resume` reads back)
    metrics.jsonl      one line per step {step, loss, lr, grad_norm, tokens, ...}
                       and per evaluation {step, eval_loss, eval_ppl, eval_tokens}
    checkpoints/       step-XXXXXXXX.pt: trainable parameters, optimizer, scheduler, RNG states,
                       data position (see checkpoint.py); the newest `keep_checkpoints` are kept
    adapter*           the trained adapter (adapters.save_adapter)
    loss.png           training and held-out loss (when matplotlib is installed)
    summary.json       held-out perplexity before/after, steps, wall time

Reproducibility: everything random is a function of `seed` — adapter initialisation, dropout,
DyLoRA ranks (torch/numpy/python RNGs) and the data order (`data.epoch_order(seed, epoch)`).
Checkpoints hold every RNG state, and the data position follows from the step, so a run killed
at any point and resumed produces the same metrics as one that was never interrupted.

Under torchrun (lowtune.distributed) `batch` is per rank: a micro-batch of the run is the
`batch * world` sequences that one process would take with that batch, split between the ranks;
losses are normalised by the scored tokens of all ranks, so the run is the single-process one
(to float rounding). Rank 0 writes the run directory and logs; held-out evaluation is shared out
and summed; checkpoints hold every rank's RNG state. Dropout masks differ between ranks (rank 0
draws those of a single process), the QDyLoRA rank of a step is the same on all.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import checkpoint as ckpt
from . import distributed
from .data import (Dataset, collate, count_targets, load_dataset, micro_batch_indices,
                   micro_batches_per_epoch)

_OOM_ERRORS = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)
METHODS = ("lora", "qalora", "qbara", "qahira", "dylora")
SCHEDULES = ("cosine", "constant")


class TrainingError(RuntimeError):
    """Training stopped; the message says why, what was kept and what to change."""


class NonFiniteLossError(TrainingError):
    pass


class TrainingOutOfMemoryError(TrainingError, MemoryError):
    pass


class PeerFailedError(TrainingError):
    """torchrun: this rank stopped because another rank of the group failed."""


@dataclass
class TrainConfig:
    """Everything a run depends on. `None` fields are resolved by the Trainer (see `resolve`)
    and written back, so config.json of a run is complete."""
    model: str = ""                 # GGUF file or Hugging Face safetensors directory
    data: str = ""                  # text, JSONL or JSON file (see data.py)
    out: str = ""                   # run directory
    method: str = "qahira"          # lora | qalora | qbara | qahira | dylora
    rank: int | None = None         # adapter rank (dylora: the largest rank); method default
    alpha: float | None = None      # adapter scale numerator; method default
    dropout: float = 0.0
    targets: list[str] | None = None  # which linears get adapters; adapters' default (all)
    layers: list[int] | None = None   # which decoder layers get adapters; None = all
    steps: int | None = None        # optimizer steps (wins over epochs); default: `epochs` epochs
    epochs: float | None = None     # used when steps is None (default 1)
    seq_len: int = 512
    batch: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    warmup: int | None = None       # steps; default 3% of steps
    schedule: str = "cosine"
    weight_decay: float = 0.0
    clip: float = 1.0               # max gradient norm; 0 = no clipping
    eval_every: int | None = None   # steps; default: 5 evaluations per run; 0 = only before/after
    eval_fraction: float = 0.1      # held-out share of the data
    eval_tokens: int | None = None  # evaluate on the first N held-out tokens only (None = all)
    save_every: int | None = None   # checkpoint interval in steps; default: eval_every
    keep_checkpoints: int = 2
    seed: int = 42
    qtype: str | None = None        # quantization type for a safetensors model (--type)
    max_vram: int | None = None     # bytes; the model streams layers to stay under it
    strict: bool = False            # stop at the first bad data record
    train_on_prompt: bool = False   # loss on prompts too (instruction/chat data)
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    gradient_checkpointing: bool | None = None  # default: on for CUDA, off on CPU
    base_adapter: str | None = None # run dir of an adapter applied first and frozen (e.g. LREC)
    # Resolved at run time (informational in config.json):
    total_steps: int | None = None
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be cosine or constant, got {self.schedule!r}")
        for name in ("seq_len", "batch", "grad_accum", "keep_checkpoints"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not self.out:
            raise ValueError("an output run directory is needed (-o RUN_DIR)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
        return cls(**d)

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> "TrainConfig":
        """The configuration a run directory was started with (its config.json)."""
        path = Path(run_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {run_dir} is not a lowtune run directory")
        cfg = cls.from_dict(json.loads(path.read_text())["train"])
        cfg.out = str(run_dir)
        return cfg


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        import lowtune
        use_cuda = torch.cuda.is_available() and lowtune.build_info().get("cuda", False)
        return torch.device("cuda" if use_cuda else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible")
    return dev


def parse_size(text: str | int | None) -> int | None:
    """'6GB', '6G', '5.5GiB', '800MB', '1234' -> bytes (GB and GiB both mean 2**30 here, as
    VRAM is sold)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise ValueError(f"cannot read the size {text!r}; write it like 6GB or 800MB")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


# ---------------------------------------------------------------------------------------------
# Progress display (lowtune.progress when present, else a plain line printer)

class _LinePrinter:
    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream, self.last = total, stream, 0.0

    def update(self, step: int, tokens: int = 0, **fields) -> None:
        now = time.monotonic()
        if step < self.total and now - self.last < 2.0 and step != 1:
            return
        self.last = now
        text = "  ".join(f"{k} {v}" for k, v in fields.items())
        print(f"step {step}/{self.total}  {text}", file=self.stream, flush=True)

    def close(self) -> None:
        pass


class _Bar:
    """lowtune.progress.Progress driven by absolute step numbers."""

    def __init__(self, total: int, start: int):
        from .progress import Progress
        self.bar = Progress(total=total, desc="finetune", unit="step")
        self.bar.n = start

    def update(self, step: int, tokens: int = 0, **fields) -> None:
        self.bar.update(step - self.bar.n, tokens=tokens, **fields)

    def close(self) -> None:
        self.bar.close()


class _NoProgress:
    """Ranks other than 0 show nothing."""

    def update(self, step: int, tokens: int = 0, **fields) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, start: int):
    try:
        return _Bar(total, start)
    except ImportError:
        return _LinePrinter(total)


# ---------------------------------------------------------------------------------------------

def default_qtype(shape: tuple[int, ...]) -> str:
    """The type a safetensors weight gets without --type: Q4_K where its rows are whole 256-wide
    super-blocks, else Q4_1 (32-wide blocks with a float min, so QA-HiRA/QA-LoRA merge exactly)."""
    return "Q4_K" if shape[-1] % 256 == 0 else "Q4_1"


def _load_safetensors_dir(path: Path, qtype: str | None):
    """A Hugging Face Llama directory as a GGUF-like object (lowtune.safetensors_io), every
    matrix quantized: to `qtype` (with llama-quantize's fallbacks), or per default_qtype."""
    from . import ops
    from .safetensors_io import load_hf_checkpoint
    if qtype is not None:
        return load_hf_checkpoint(path, qtype=qtype)
    src = load_hf_checkpoint(path, qtype=None)
    for name, t in list(src.tensors.items()):
        if isinstance(t, torch.Tensor) and t.dim() == 2 and name != "rope_freqs.weight":
            src.tensors[name] = ops.quantize(t, default_qtype(tuple(t.shape)))
    return type(src)(Path(src.path), src.metadata, src.metadata_types, src.tensors)


def _model_from_source(src, device: torch.device, dtype: torch.dtype):
    """LlamaModel from a GGUF-like object (metadata, tensor_infos, qtensor(name)), as
    LlamaModel.from_gguf builds it from a file."""
    from . import ops
    from .model import LlamaConfig, LlamaModel
    md = dict(src.metadata)
    weights = {}
    for name in src.tensor_infos:
        qt = src.qtensor(name)
        if name.endswith("_norm.weight") or name == "rope_freqs.weight":
            weights[name] = ops.dequantize(qt, torch.float32).reshape(-1).to(device)
        else:
            weights[name] = qt.to(device)
    model = LlamaModel(LlamaConfig.from_gguf_metadata(md), weights, dtype)
    model.metadata = md
    model.tensor_types = {n: src.qtensor(n).type for n in src.tensor_infos}
    return model


def load_model(cfg: TrainConfig, device: torch.device):
    """(model, tokenizer) for cfg.model: a GGUF file, or a safetensors directory quantized on
    load (cfg.qtype, default per default_qtype). Activations are bf16 on a GPU, fp32 on a CPU."""
    from .model import LlamaModel
    from .tokenizer import load_tokenizer
    path = Path(cfg.model)
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist (a .gguf file or a Hugging Face "
                                "safetensors directory is expected)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # Under a memory budget the packed weights stay in host memory; lowtune.streaming places
    # them (Trainer._setup, once the adapters exist).
    load_on = torch.device("cpu") if cfg.max_vram is not None else device
    if path.is_dir():
        model = _model_from_source(_load_safetensors_dir(path, cfg.qtype), load_on, dtype)
    else:
        if cfg.qtype is not None:
            raise ValueError("--type applies to safetensors models; a GGUF file is trained in its "
                             "own quantization (re-quantize it with `lowtune quantize` first)")
        model = LlamaModel.from_gguf(path, load_on, dtype)
    tokenizer = getattr(model, "tokenizer", None) or load_tokenizer(model.metadata)
    return model, tokenizer


def apply_adapters(model, cfg: TrainConfig) -> dict:
    """Wrap the model's linears with cfg.method adapters and freeze everything else; returns the
    resolved adapter config."""
    from . import adapters
    kw = dict(method=cfg.method, dropout=cfg.dropout, seed=cfg.seed)
    if cfg.rank is not None:
        kw["rank"] = cfg.rank
    if cfg.alpha is not None:
        kw["alpha"] = cfg.alpha
    if cfg.targets is not None:
        kw["targets"] = tuple(cfg.targets)
    if cfg.layers is not None:
        kw["layers"] = tuple(cfg.layers)
    acfg = adapters.AdapterConfig(**kw)
    adapters.apply_adapters(model, acfg)
    adapters.mark_only_adapters_trainable(model)
    return acfg.to_dict()


def default_save_adapter(model, run_dir: Path) -> Path:
    """adapter/ (adapter.safetensors + adapter_config.json, lowtune.adapters' format), tied to
    the base model file by its hash."""
    from . import adapters
    source = getattr(model, "gguf_path", None)
    digest = adapters.base_hash(source) if source and Path(source).is_file() else None
    return adapters.save_adapter(model, run_dir / "adapter", base_hash=digest)


def dylora_controller(model, optimizer, seed: int):
    """The QDyLoRA rank sampler when the model has QDyLoRA adapters, else None."""
    try:
        from . import adapters
    except ImportError:
        return None
    if not any(getattr(a, "method", None) == "qdylora" for a in adapters.adapters_of(model).values()):
        return None
    return adapters.DyLoRAController(model, optimizer, seed=seed)


class Trainer:
    """Runs one configuration. `model`, `tokenizer`, `dataset` and `save_adapter` may be given
    (tests, notebooks); otherwise they come from cfg.model / cfg.data and lowtune.adapters.
    A given model must already carry its trainable parameters and have `loss(ids, labels,
    reduction="sum")`."""

    def __init__(self, cfg: TrainConfig, *, model=None, tokenizer=None, dataset: Dataset | None = None,
                 save_adapter: Callable[[Any, Path], Path] | None = None,
                 log: Callable[[str], None] | None = None):
        cfg.check()
        self.cfg = cfg
        self.model, self.tokenizer, self.dataset = model, tokenizer, dataset
        self.save_adapter = save_adapter or default_save_adapter
        self.log = log or (lambda s: print(s, flush=True))
        self.run_dir = Path(cfg.out)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.last_checkpoint: Path | None = None
        self.ddp = None  # DistributedDataParallel around the loss, under torchrun

    # -- set-up ----------------------------------------------------------------------------------

    def _setup(self) -> None:
        cfg = self.cfg
        self.device = distributed.init(pick_device(cfg.device))  # torchrun: this rank's GPU
        if not distributed.is_main():
            self.log = lambda s: None  # rank 0 speaks for the group
        seed_everything(cfg.seed)
        if self.model is None:
            self.model, tok = load_model(cfg, self.device)
            self.tokenizer = self.tokenizer or tok
            if cfg.base_adapter:  # frozen under the trainable adapter (correct.py)
                from .correct import apply_frozen_base_adapter
                apply_frozen_base_adapter(self.model, cfg.base_adapter)
            cfg.extra["adapter"] = apply_adapters(self.model, cfg)
            if cfg.max_vram is not None and self.device.type != "cuda":
                self.log("--max-vram is a GPU memory budget; on the CPU nothing streams")
            elif cfg.max_vram is not None:
                from .streaming import stream_model
                plan = stream_model(self.model, self.device, cfg.max_vram,
                                    tokens=cfg.seq_len * cfg.batch)
                cfg.extra["streaming"] = plan.to_dict()
                self.log(plan.summary())
        else:
            self.model.to(self.device)
            if self.tokenizer is None and getattr(self.model, "metadata", None):
                from .tokenizer import load_tokenizer
                self.tokenizer = load_tokenizer(self.model.metadata)
        if hasattr(self.model, "gradient_checkpointing"):
            gc = cfg.gradient_checkpointing
            self.model.gradient_checkpointing = (self.device.type == "cuda") if gc is None else gc
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
                                        eval_fraction=cfg.eval_fraction, strict=cfg.strict)
        if cfg.eval_tokens is not None:
            ds = self.dataset
            self.dataset = Dataset(ds.train, first_tokens(ds.eval, cfg.eval_tokens), ds.stats)
        self.dataset.stats.train_tokens = sum(len(e) for e in self.dataset.train)
        self.dataset.stats.eval_tokens = sum(len(e) for e in self.dataset.eval)
        self.pad_id = int(getattr(self.tokenizer, "eos_id", 0) or 0) if self.tokenizer else 0
        self._resolve()

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

    # -- metrics -----------------------------------------------------------------------------------

    def _append_metrics(self, row: dict) -> None:
        if not distributed.is_main():
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def _truncate_metrics(self, step: int) -> None:
        """Keep the metrics of steps <= `step` (a killed run may have logged steps after its last
        checkpoint, which the resumed run logs again)."""
        if not distributed.is_main():
            return
        rows = read_metrics(self.metrics_path) if self.metrics_path.exists() else []
        kept = "".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= step)
        ckpt.atomic_write_text(self.metrics_path, kept)

    # -- the step ----------------------------------------------------------------------------------

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

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
        if cfg.clip and cfg.clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip))
        else:
            norm = float(torch.nn.utils.clip_grad_norm_(params, float("inf")))
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
        where = f"step {step + 1}" + (f" (micro-batch {micro + 1}/{self.cfg.grad_accum})"
                                      if micro is not None else "")
        if self.last_checkpoint is not None:
            kept = (f"The last good checkpoint, {self.last_checkpoint}, is kept; continue from it "
                    f"with `lowtune finetune --resume {self.run_dir} --lr {self.cfg.lr / 2:g}`.")
        else:
            kept = "No checkpoint had been written yet."
        raise NonFiniteLossError(
            f"{what} at {where}; training stopped and nothing of this step was applied. {kept} "
            f"Usual fixes: a lower --lr (now {self.cfg.lr:g}), a longer --warmup (now "
            f"{self.cfg.warmup}), gradient clipping (--clip, now {self.cfg.clip:g}). A non-finite "
            "loss at the very first step points at the model file or the data instead.")

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
        try:
            ex = self.dataset.eval
            for j, s in enumerate(range(0, len(ex), self.cfg.batch)):
                if j % world != rank:
                    continue
                ids, labels = collate(ex[s:s + self.cfg.batch], self.pad_id)
                n = count_targets(labels)
                if n == 0:
                    continue
                with self._autocast():
                    nll += float(self.model.loss(ids.to(self.device), labels.to(self.device),
                                                 reduction="sum"))
                scored += n
        finally:
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
            fix = (f"--batch {seqs // self.world}" if seqs % self.world == 0 else
                   f"{world0} rank(s) with --batch {seqs // world0}")
            raise TrainingError(
                f"the checkpoint was written by {world0} rank(s) x --batch {seqs // world0} = "
                f"{seqs} sequences per micro-batch; this run has {self.world} x {self.cfg.batch} "
                f"= {self.global_batch}, which would change the data order. Resume with {fix}")
        names = {n for n, _ in self.params}
        if set(state["params"]) != names:
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
        if distributed.is_main():
            ckpt.save_checkpoint(self.ckpt_dir, step, self._state(step, elapsed, tokens, rngs),
                                 keep=self.cfg.keep_checkpoints)
        distributed.barrier()
        self.last_checkpoint = ckpt.checkpoint_path(self.ckpt_dir, step)

    # -- the run -------------------------------------------------------------------------------

    def run(self, resume: bool = False) -> TrainResult:
        """Train (or continue, with resume) to cfg.steps. Under torchrun every rank calls this;
        when one rank fails, the others raise PeerFailedError naming it."""
        with distributed.stop_together(PeerFailedError, self._kept):
            return self._run(resume)

    def _kept(self) -> str:
        if self.last_checkpoint is None:
            return "No checkpoint had been written yet."
        return (f"The last checkpoint, {self.last_checkpoint}, is intact; continue with the same "
                f"torchrun command and `lowtune finetune --resume {self.run_dir}`.")

    def _run(self, resume: bool) -> TrainResult:
        cfg = self.cfg
        self._setup()  # model and data first: a mistake there leaves no empty run directory
        # rank 0 reads the checkpoints and hands what it found to the others
        newest = None
        if distributed.is_main():
            existing = ckpt.list_checkpoints(self.ckpt_dir)
            newest = existing[-1][0] if existing else None
        newest = distributed.broadcast_object(newest)
        if newest is not None and not resume:  # before config.json: the old run stays as it was
            raise TrainingError(
                f"{self.run_dir} already holds a run (checkpoints up to step {newest}): "
                f"continue it with `lowtune finetune --resume {self.run_dir}`, or give another -o")
        if distributed.is_main():  # rank 0 alone writes the run directory
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_write_json(self.run_dir / "config.json", _config_json(cfg))

        params = [p for _, p in self.params]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=cfg.weight_decay)
        total, warmup, schedule = cfg.steps, cfg.warmup, cfg.schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total, warmup, schedule))
        self.dylora = dylora_controller(self.model, self.optimizer, cfg.seed)
        self.ddp = distributed.wrap_loss(self.model, params)  # None in a single process
        if distributed.rank():  # dropout masks differ between ranks; rank 0 keeps cfg.seed's
            seed_everything(distributed.rank_seed(cfg.seed))

        step, elapsed, tokens = 0, 0.0, 0
        found = None
        if distributed.is_main() and resume and newest is not None:
            found = ckpt.latest_checkpoint(self.ckpt_dir)
        found = distributed.broadcast_object(found)
        if found is not None:
            self.last_checkpoint, state = found
            step, elapsed, tokens = self._restore(state)
            self._truncate_metrics(step)
            self.log(f"resuming {self.run_dir} from step {step}/{total}")
        else:
            if resume:
                self.log(f"no checkpoint in {self.ckpt_dir}; starting {self.run_dir} from step 0")
            self._truncate_metrics(-1)
        rows = read_metrics(self.metrics_path) if distributed.is_main() else []

        self.model.train()
        ranks = f"{self.world} ranks x " if self.world > 1 else ""
        self.log(f"{cfg.method} on {cfg.model or 'the given model'}: {total} steps of "
                 f"{ranks}{cfg.batch}x{cfg.grad_accum} sequences of <= {cfg.seq_len} tokens, "
                 f"{cfg.extra['trainable_parameters']:,} trainable parameters, {self.device}; "
                 f"{self.dataset.stats.summary()}")
        if step == 0:
            ev = self._run_eval(0)
            rows += [ev] if ev else []

        bar = _progress(total, step) if distributed.is_main() else _NoProgress()
        t_start = time.perf_counter() - elapsed
        try:
            while step < total:
                t0 = time.perf_counter()
                out = self._guard_oom(self._train_step, step)
                step += 1
                tokens += out["tokens"]
                dt = time.perf_counter() - t0
                elapsed = time.perf_counter() - t_start
                row = {"step": step, "loss": out["loss"], "lr": out["lr"],
                       "grad_norm": out["grad_norm"], "tokens": tokens,
                       "tokens_per_s": round(out["tokens"] / dt, 2) if dt > 0 else None,
                       "elapsed_s": round(elapsed, 3)}
                if self.device.type == "cuda":
                    row["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
                self._append_metrics(row)
                rows.append(row)
                bar.update(step, tokens=out["tokens"], loss=round(out["loss"], 4),
                           lr=f"{out['lr']:.2e}")
                if (cfg.eval_every and step % cfg.eval_every == 0) or step == total:
                    ev = self._run_eval(step)
                    rows += [ev] if ev else []
                if step % cfg.save_every == 0 or step == total:
                    self._save(step, time.perf_counter() - t_start, tokens)
        finally:
            bar.close()
        return self._finish(rows, time.perf_counter() - t_start, step)

    def _run_eval(self, step: int) -> dict | None:
        if self.dylora is not None:
            self.dylora.set_rank(self.dylora.r_max)  # held-out loss at the full rank
        ev = self._guard_oom(lambda _: self.evaluate(), step)
        if ev is None:
            return None
        row = {"step": step, **ev}
        self._append_metrics(row)
        self.log(f"step {step}: held-out loss {ev['eval_loss']:.4f}, perplexity {ev['eval_ppl']:.3f} "
                 f"({ev['eval_tokens']} tokens, {ev['eval_s']:.1f} s)")
        return row

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
        return {"dylora_eval_loss_by_rank": {str(b): v for b, v in losses.items()},
                "dylora_rank": best}

    def _guard_oom(self, fn, step: int):
        try:
            return fn(step)
        except _OOM_ERRORS as e:
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingOutOfMemoryError(oom_message(e, self.cfg, self.device, step)) from None

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
            note = plot_losses(rows, self.run_dir / "loss.png", title=f"{self.cfg.method}")
            if note:
                self.log(note)
            summary = {"steps": step, "wall_s": round(wall, 2), "method": self.cfg.method,
                       "adapter": str(adapter_path) if adapter_path else None,
                       "eval_before": before, "eval_after": after, **extra}
            ckpt.atomic_write_json(self.run_dir / "summary.json", summary)
        # Every rank returns once the run directory is complete.
        adapter_path = distributed.broadcast_object(adapter_path)
        if before and after:
            change = 100.0 * (after["eval_ppl"] / before["eval_ppl"] - 1.0)
            self.log(f"held-out perplexity: {before['eval_ppl']:.3f} before, {after['eval_ppl']:.3f} "
                     f"after ({change:+.1f}%)")
        self.log(f"run directory: {self.run_dir} (adapter {adapter_path})")
        return TrainResult(self.run_dir, step, before, after, wall, adapter_path)


def first_tokens(examples: list, n: int) -> list:
    """The leading examples holding at most n tokens in all (the last one cut to fit)."""
    out, left = [], n
    for e in examples:
        if left < 2:
            break
        if len(e) > left:
            e = type(e)(e.input_ids[:left], e.labels[:left])
        out.append(e)
        left -= len(e)
    return out


def _config_json(cfg: TrainConfig) -> dict:
    import lowtune
    return {"train": cfg.to_dict(), "lowtune": getattr(lowtune, "__version__", "?"),
            "torch": torch.__version__}


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


def oom_message(err: BaseException, cfg: TrainConfig, device: torch.device, step: int) -> str:
    """What was asked, what was free, and the flags that lower memory."""
    text = str(err)
    m = re.search(r"Tried to allocate ([0-9.]+ [KMGT]?i?B)", text)
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


def finetune(model: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike,
             method: str = "qahira", **options) -> TrainResult:
    """Fine-tune `model` (GGUF file or safetensors dir) on `data` into run directory `out`.
    Options are TrainConfig fields (rank, alpha, steps, epochs, seq_len, batch, lr, ...)."""
    if "max_vram" in options:
        options["max_vram"] = parse_size(options["max_vram"])
    cfg = TrainConfig(model=str(model), data=str(data), out=str(out), method=method, **options)
    return Trainer(cfg).run()


def resume(run_dir: str | os.PathLike, **overrides) -> TrainResult:
    """Continue the run in `run_dir` from its newest checkpoint (see RESUME_OVERRIDES)."""
    cfg = TrainConfig.load(run_dir)
    apply_overrides(cfg, overrides)
    return Trainer(cfg).run(resume=True)


# Settings that may change when resuming: they do not change which data a step sees.
# `batch` (per rank) may change with the number of torchrun ranks as long as ranks x batch
# stays the same (Trainer._restore checks it).
RESUME_OVERRIDES = ("lr", "clip", "steps", "eval_every", "save_every", "keep_checkpoints",
                    "max_vram", "device", "gradient_checkpointing", "warmup", "schedule", "batch")


def apply_overrides(cfg: TrainConfig, overrides: dict) -> None:
    for k, v in overrides.items():
        if v is None:
            continue
        if k not in RESUME_OVERRIDES:
            raise ValueError(f"{k} cannot change when resuming (it would change the data or the "
                             f"model); allowed: {', '.join(RESUME_OVERRIDES)}")
        setattr(cfg, k, v)


def add_parser(subparsers):
    """`lowtune finetune` (registered by cli.py; the arguments live in finetune_cli.py)."""
    from .finetune_cli import add_parser as add
    return add(subparsers)
