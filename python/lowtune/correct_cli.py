"""What `lowtune correct` accepts (lowtune.commands runs it with lowtune.correct)."""
from __future__ import annotations

import argparse

from .paths import check_input_file, check_model_path, check_output_dir
from .train_config import (DTYPES, LREC_ALPHA, LREC_CE_WEIGHT, LREC_KL_CHUNK, LREC_LR, LREC_RANK, SCHEDULES,
                           dtype_setting)

DESCRIPTION = """LREC (INT2.1): train a LoRA on a quantized student so that its next-token distribution
matches a full-precision teacher's (forward KL over the whole vocabulary + weighted cross-entropy).

examples:
  lowtune quantize SmolLM2.Q4_1.gguf --type F32 -o teacher.gguf
  lowtune quantize SmolLM2.Q4_1.gguf --type INT2-g32 -o student.gguf
  lowtune correct student.gguf --teacher teacher.gguf --text train.txt -o runs/lrec
  lowtune finetune student.gguf --base-adapter runs/lrec --data task.jsonl -o runs/task

RUN_DIR gets the run directory of a fine-tune (config.json, metrics.jsonl, checkpoints/, adapter/)
and report.json: bits per weight with and without the correction, and the perplexity of teacher,
student and corrected student with the mean KL per token, on the held-out end of --text and on
every --eval-text.
"""

# the options that are TrainConfig fields, passed through as they are
TRAIN_OPTIONS = ("steps", "epochs", "seq_len", "batch", "grad_accum", "warmup", "schedule", "eval_every",
                 "eval_fraction", "seed", "device", "max_vram", "targets")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("student", nargs="?", help="the quantized student (GGUF, e.g. from lowtune quantize)")
    p.add_argument("--teacher", help="the full-precision teacher (GGUF with the same tokenizer, e.g. "
                   "`lowtune quantize SRC --type F32`)")
    p.add_argument("--text", help="training text (plain text; its last --eval-fraction is held out)")
    p.add_argument("--rank", type=int, default=LREC_RANK, help=f"LoRA rank (default {LREC_RANK})")
    p.add_argument("--alpha", type=float, default=LREC_ALPHA,
                   help=f"LoRA alpha, scale = alpha/rank (default {LREC_ALPHA:g}, as lrec.py)")
    p.add_argument("--targets", type=lambda s: [t for t in s.split(",") if t],
                   help="comma-separated linears (default: all seven; the released INT2.1 runs left "
                   "out ffn_down)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help="optimizer steps")
    g.add_argument("--epochs", type=float, help="passes over the training text (default 1)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch (default 4)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    p.add_argument("--lr", type=float, default=LREC_LR, help=f"peak learning rate (default {LREC_LR:g})")
    p.add_argument("--warmup", type=int, help="warm-up steps (default 3%% of the steps)")
    p.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    p.add_argument("--kl-weight", type=float, default=1.0, help="weight of the mean KL (default 1)")
    p.add_argument("--ce-weight", type=float, default=LREC_CE_WEIGHT,
                   help=f"weight of the mean cross-entropy (default {LREC_CE_WEIGHT:.4f} = lrec.py's "
                   "200 with its KL summed over 2048 positions)")
    p.add_argument("--kl-chunk", type=int, default=LREC_KL_CHUNK,
                   help=f"positions whose logits are computed at once (default {LREC_KL_CHUNK})")
    p.add_argument("--eval-text", action="append", default=[],
                   help="extra held-out text (repeatable), e.g. of another source")
    p.add_argument("--eval-tokens", type=int, default=16384, help="tokens scored per --eval-text")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share of --text")
    p.add_argument("--eval-every", type=int, help="held-out evaluation interval in steps")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--teacher-device", help="keep the teacher elsewhere (e.g. cpu)")
    p.add_argument("--dtype", metavar="{" + ",".join(DTYPES) + "}",
                   help="student activation dtype (default auto: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--max-vram", help="GPU memory budget (layer streaming), e.g. 6GB")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("-o", "--output", metavar="RUN_DIR", help="run directory to create")


def check(args: argparse.Namespace) -> None:
    missing = [f for f, v in (("STUDENT", args.student), ("--teacher", args.teacher),
                              ("--text", args.text), ("-o RUN_DIR", args.output)) if not v]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (or --resume RUN_DIR to continue a run)")
    check_model_path(args.student)
    check_model_path(args.teacher)
    check_input_file(args.text, "text file")
    check_output_dir(args.output, "run directory")
    if args.dtype is not None:
        dtype_setting(args.dtype)


def train_options(args: argparse.Namespace) -> dict:
    """The TrainConfig fields given on the command line."""
    return {k: getattr(args, k) for k in TRAIN_OPTIONS if getattr(args, k) is not None}
