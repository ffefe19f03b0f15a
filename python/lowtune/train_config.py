"""What a run is configured with: TrainConfig, the settings a resumed run may change, and
LREC's defaults. No torch here: the command line builds its parser and config from this module
without loading the library.

    cfg = TrainConfig(model="model.gguf", data="train.jsonl", out="runs/a", method="qahira")
    cfg.method                       # "qa-hira": method names are canonical from here on
    cfg = TrainConfig.load("runs/a") # what config.json of a run directory holds
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .dtypes import type_of
from .methods import canonical_method

SCHEDULES = ("cosine", "constant")
# lowtune.compile's modes; auto: layer on CUDA, off on the CPU (compile.default_mode)
COMPILE_MODES = ("auto", "off", "layer", "model")
# activation dtypes a run trains in; auto: bf16 on CUDA, fp32 on the CPU (loading.activation_dtype);
# dtype_setting reads the user's spellings and refuses fp16
DTYPES = ("auto", "fp32", "bf16")
_SETTING_OF_TYPE = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}


def dtype_setting(name: str) -> str:
    """TrainConfig.dtype for a name the user gave: auto, or any spelling lowtune.dtypes knows
    (float32, bfloat16, BF16, ...) as fp32 or bf16. fp16 is refused: its gradients would need loss
    scaling, which the trainer does not do."""
    if name == "auto":
        return name
    try:
        setting = _SETTING_OF_TYPE[type_of(name)]
    except ValueError:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}") from None
    if setting == "fp16":
        raise ValueError("--dtype fp16 cannot train: fp16 gradients would need loss scaling, which the "
                         "trainer does not do; use --dtype bf16 or fp32")
    return setting


CONFIG_FILE = "config.json"  # in a run directory: {"train": TrainConfig, "lowtune": version, ...}

# Settings that may change when resuming: they do not change which data a step sees.
# `batch` (per rank) may change with the number of torchrun ranks as long as ranks x batch
# stays the same (the trainer checks it).
RESUME_OVERRIDES = ("lr", "clip", "steps", "eval_every", "save_every", "keep_checkpoints",
                    "max_vram", "host_ram", "device", "gradient_checkpointing", "warmup", "schedule", "batch",
                    "compile", "cuda_graphs", "dtype")

# LREC (lowtune correct), as the official lrec.py: r = 32, α = 128 (scale 4), lr 3e-4, and its
# ce_weight 200 with KL summed over 2048 positions, i.e. 200/2048 on per-token means (correct.py).
LREC_RANK, LREC_ALPHA, LREC_LR = 32, 128.0, 3e-4
LREC_CE_WEIGHT = 200.0 / 2048
LREC_KL_CHUNK = 256


def parse_size(text: str | int | None) -> int | None:
    """'6GB', '6G', '5.5GiB', '800MB', '1234' -> bytes (GB and GiB both mean 2**30 here, as
    VRAM is sold)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not m:
        raise ValueError(f"cannot read the size {text!r}; write it like 6GB or 800MB")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def parse_vram(text: str | int | None) -> int | str | None:
    """A GPU budget: a size (parse_size), or "auto" (the GPU's free memory less a margin)."""
    if isinstance(text, str) and text.strip().lower() == "auto":
        return "auto"
    return parse_size(text)


@dataclass
class TrainConfig:
    """Everything a run depends on. `None` fields are resolved by the Trainer and written back,
    so config.json of a run is complete."""
    model: str = ""                 # GGUF file or Hugging Face safetensors directory
    data: str = ""                  # text, JSONL or JSON file (see data.py)
    out: str = ""                   # run directory
    method: str = "qa-hira"         # lora | qa-lora | q-bara | qa-hira | qdylora (lowtune.methods)
    rank: int | None = None         # adapter rank (qdylora: the largest rank); method default
    alpha: float | None = None      # adapter scale numerator; method default
    dropout: float = 0.0
    merge_exact: bool | None = None # qa-lora/qa-hira: train through the merged fp16 mins; None = on unless dropout
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
    max_vram: int | str | None = None  # bytes (or "6GB", "auto"), as the driver counts them; layers stream to stay under it
    host_ram: int | None = None     # bytes (or "2GB") of host memory for streamed layers; the rest are read from the file
    strict: bool = False            # stop at the first bad data record
    allow_binary: bool = False      # train on data that does not look like text
    train_on_prompt: bool = False   # loss on prompts too (instruction/chat data)
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    gradient_checkpointing: bool | None = None  # default: on for CUDA, off on CPU
    compile: str = "auto"           # COMPILE_MODES (lowtune.compile)
    dtype: str = "auto"             # activations, DTYPES (auto: per device, also on resume)
    cuda_graphs: bool | None = None # replay decoder layers from CUDA graphs; default: on with CUDA
    base_adapter: str | None = None # run dir of an adapter applied first and frozen (e.g. LREC)
    force: bool = False             # use base_adapter even if it was trained on another base
    # Resolved at run time (informational in config.json):
    total_steps: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.method = canonical_method(self.method)
        self.max_vram = parse_vram(self.max_vram)
        self.host_ram = parse_size(self.host_ram)

    def check(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be cosine or constant, got {self.schedule!r}")
        for name in ("seq_len", "batch", "grad_accum", "keep_checkpoints"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        self.dtype = dtype_setting(self.dtype)
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
        d = dict(d)
        d.setdefault("merge_exact", False)  # runs started before the mode trained without it
        return cls(**d)

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> "TrainConfig":
        """The configuration a run directory was started with (its config.json)."""
        d = read_run_config(run_dir)
        if d is None:
            raise FileNotFoundError(f"{Path(run_dir) / CONFIG_FILE} not found: {run_dir} is not a "
                                    "lowtune run directory")
        cfg = cls.from_dict(d["train"])
        cfg.out = str(run_dir)
        return cfg

    def apply_overrides(self, overrides: dict) -> None:
        """Change the settings a resumed run may change (RESUME_OVERRIDES); None means unchanged."""
        for k, v in overrides.items():
            if v is None:
                continue
            if k not in RESUME_OVERRIDES:
                raise ValueError(f"{k} cannot change when resuming (it would change the data or the "
                                 f"model); allowed: {', '.join(RESUME_OVERRIDES)}")
            setattr(self, k, parse_vram(v) if k == "max_vram" else parse_size(v) if k == "host_ram" else v)


def read_run_config(run_dir) -> dict | None:
    """config.json of a run directory as a dict, or None when there is none."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())
