"""What `lowtune finetune` accepts, and the TrainConfig it makes of it (lowtune.commands runs it).

    lowtune finetune MODEL --data FILE --method qa-hira --steps 200 -o runs/demo
    lowtune finetune --resume runs/demo            # continue a killed run
"""
from __future__ import annotations

import argparse

from .methods import METHODS, canonical_method
from .paths import check_input_file, check_model_path, check_output_dir
from .train_config import COMPILE_MODES, DTYPES, RESUME_OVERRIDES, SCHEDULES, TrainConfig

# CLI dest -> TrainConfig field, where they differ.
_FIELDS = {"type": "qtype", "output": "out"}

DESCRIPTION = """Fine-tune adapters on a quantized model (a GGUF file, or a Hugging Face safetensors
directory quantized on load), keeping the base weights packed. The run directory gets
config.json, metrics.jsonl, loss.png, checkpoints/ and the adapter.

examples:
  lowtune finetune model.gguf --data book.txt --method qa-hira --steps 200 -o runs/book
  lowtune finetune model.gguf --data alpaca.jsonl --method lora --rank 16 --epochs 1 -o runs/a
  lowtune finetune --resume runs/a          # continue a killed run where it stopped
  torchrun --standalone --nproc-per-node 4 -m lowtune finetune model.gguf --data d.jsonl -o runs/b
                      # data-parallel on 4 GPUs: --batch is per GPU, rank 0 writes the run dir
"""


def parse_layers(text: str) -> list[int]:
    """'20-29' / '0,2,4' / '0-3,8' -> sorted layer indices."""
    out: set[int] = set()
    try:
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            out.update(range(int(a), int(b or a) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read layers {text!r}; write them like 20-29 or 0,2,4") from None
    return sorted(out)


def _method(text: str) -> str:
    try:
        return canonical_method(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="GGUF file or Hugging Face safetensors directory")
    p.add_argument("--data", help="training data: .txt (plain text), .jsonl/.json records "
                   "(text, Alpaca instruction/input/output, or chat messages)")
    p.add_argument("--method", type=_method, metavar="{" + ",".join(METHODS) + "}",
                   help="adapter method (default qa-hira; qalora, qbara, qahira, dylora also accepted)")
    p.add_argument("--rank", type=int, help="adapter rank (qdylora: the largest rank)")
    p.add_argument("--alpha", type=float, help="adapter scaling numerator (scale = alpha/rank)")
    p.add_argument("--dropout", type=float, help="adapter input dropout (default 0)")
    p.add_argument("--merge-exact", choices=["on", "off"],
                   help="qa-lora/qa-hira on Q4_1, Q5_1, INTb-gG: train through the fp16 rounding of the "
                   "merged mins, so the merged GGUF computes exactly what was trained (default: on "
                   "unless --dropout)")
    p.add_argument("--targets", type=lambda s: [t for t in s.split(",") if t],
                   help="comma-separated linears to adapt, e.g. attn_q,attn_v (default: all)")
    p.add_argument("--layers", type=parse_layers,
                   help="decoder layers that get adapters, e.g. 20-29 or 0,2,4 (default: all); "
                   "training only the last layers skips the backward pass through the others")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help="optimizer steps")
    g.add_argument("--epochs", type=float, help="passes over the training data (default 1)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 512)")
    p.add_argument("--batch", type=int, help="sequences per micro-batch (default 4); under torchrun "
                   "per rank (a step sees batch x ranks x grad-accum)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 2e-4)")
    p.add_argument("--warmup", type=int, help="warm-up steps (default 3%% of the steps)")
    p.add_argument("--schedule", choices=SCHEDULES, help="LR after warm-up (default cosine)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    p.add_argument("--clip", type=float, help="max gradient norm, 0 = off (default 1.0)")
    p.add_argument("--eval-every", type=int,
                   help="held-out evaluation interval in steps (default: 5 per run; 0 = only "
                   "before and after)")
    p.add_argument("--eval-fraction", type=float, help="held-out share of the data (default 0.1)")
    p.add_argument("--eval-tokens", type=int,
                   help="evaluate on the first N held-out tokens only (default: all of them)")
    p.add_argument("--save-every", type=int, help="checkpoint interval (default: --eval-every)")
    p.add_argument("--keep-checkpoints", type=int, help="checkpoints kept (default 2)")
    p.add_argument("--seed", type=int, help="seed for initialisation, dropout and data order (default 42)")
    p.add_argument("--type", help="quantization type for a safetensors MODEL (default Q4_K, "
                   "Q4_1 where rows are not a multiple of 256)")
    p.add_argument("--max-vram", help="GPU memory budget as the driver counts it (nvidia-smi), e.g. "
                   "6GB, or auto (the free memory less a margin): layers beyond it stream from host memory")
    p.add_argument("--host-ram", help="host memory for streamed layers, e.g. 16GB: those beyond it are "
                   "read from the GGUF file whenever they are needed")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--dtype", metavar="{" + ",".join(DTYPES) + "}",
                   help="activation dtype (default auto: bf16 on CUDA, fp32 on the CPU); adapter weights "
                   "and AdamW state stay fp32 either way. bf16 on the CPU pays off where it multiplies bf16 "
                   "natively (AVX512-BF16 or AMX); on other CPUs it runs, but no faster than fp32")
    p.add_argument("--gradient-checkpointing", choices=["on", "off"],
                   help="recompute each layer in the backward pass instead of keeping its "
                   "activations (default: on for CUDA, off on CPU)")
    p.add_argument("--compile", choices=COMPILE_MODES,
                   help="torch.compile each decoder layer (layer), the whole model (model) or nothing "
                   "(off); default auto: layer on CUDA, off on the CPU")
    p.add_argument("--cuda-graphs", choices=["auto", "on", "off"],
                   help="replay each decoder layer from CUDA graphs (default auto: on with CUDA)")
    p.add_argument("--strict", action="store_true", default=None,
                   help="stop at the first bad data record instead of skipping it")
    p.add_argument("--allow-binary", action="store_true", default=None,
                   help="train on data that does not look like text (many undecodable or control bytes)")
    p.add_argument("--train-on-prompt", action="store_true", default=None,
                   help="take loss on prompts too (instruction and chat data)")
    p.add_argument("--base-adapter", metavar="RUN_DIR",
                   help="apply the adapter of RUN_DIR (e.g. a `lowtune correct` run) frozen, and "
                   "train a second adapter on top of it")
    p.add_argument("--force", action="store_true", default=None,
                   help="use --base-adapter even if it was trained on another base model")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its newest checkpoint, with its own "
                   "settings; these may change: " + ", ".join(
                       "--" + k.replace("_", "-") for k in RESUME_OVERRIDES))
    p.add_argument("-o", "--output", metavar="RUN_DIR", help="run directory to create")


def given(args: argparse.Namespace) -> dict:
    """TrainConfig fields the user set on the command line."""
    out = {}
    for k, v in vars(args).items():
        if v is None or k in ("resume", "command"):
            continue
        k = _FIELDS.get(k, k)
        if k in ("gradient_checkpointing", "cuda_graphs"):
            v = None if v == "auto" else v == "on"
        elif k == "merge_exact":
            v = v == "on"
        if k in TrainConfig.__dataclass_fields__:
            out[k] = v
    return out


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of a new run."""
    fields = given(args)
    missing = [flag for flag, key in (("MODEL", "model"), ("--data", "data"), ("-o RUN_DIR", "out"))
               if key not in fields]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (or --resume RUN_DIR to continue a run)")
    return TrainConfig(**fields)


def check(args: argparse.Namespace) -> None:
    """What can be told before anything loads: the options make a config, the model and data are
    there, and -o is a directory that can be written."""
    if args.resume:
        return  # the run directory's config.json says the rest (resumed_config)
    cfg = config_from_args(args)
    cfg.check()
    check_model_path(cfg.model)
    check_input_file(cfg.data, "data file")
    check_output_dir(cfg.out, "run directory")


def resumed_config(args: argparse.Namespace, note=print) -> TrainConfig:
    """The TrainConfig of the run in --resume RUN_DIR, with the settings a resume may change."""
    cfg = TrainConfig.load(args.resume)
    fields = given(args)
    # MODEL/--data/-o may be repeated on resume; they must agree with the run's own.
    for key in ("model", "data", "out"):
        if key in fields and str(fields.pop(key)) != str(getattr(cfg, key)):
            note(f"note: --resume uses the run's own {key} ({getattr(cfg, key)})")
    cfg.apply_overrides(fields)
    return cfg
