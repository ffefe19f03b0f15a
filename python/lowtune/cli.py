"""The `lowtune` command (also `python -m lowtune`).

    lowtune info MODEL [--json]
    lowtune eval MODEL --text FILE [--ctx 512] [--chunks K] [--adapter RUN_DIR] [--json]
    lowtune generate MODEL --prompt TEXT [-n 64] [--temperature 0] [--chat] [--adapter RUN_DIR]
    lowtune quantize | finetune | export | correct ...     (quantize_cli, finetune_cli, ...)

This module and the *_cli modules say what each command accepts; lowtune.commands does what it
asks, through the library. The library (and torch) is imported only once a command is chosen, in
main(), so `lowtune --help` and a mistyped option answer at once. Errors a user can fix (missing
file, bad GGUF, bad option) print one line and exit with status 1; set LOWTUNE_DEBUG=1 to see the
traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from . import correct_cli, export_cli, finetune_cli, quantize_cli
from .paths import check_input_file, check_model_path, io_message


class CLIError(Exception):
    """A problem the user can fix; printed as one line."""


# ----------------------------------------------------------------------------------------------
# options shared by the commands that run a model


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """--device, --dtype, --threads."""
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="activation dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")


def add_adapter_arguments(p: argparse.ArgumentParser) -> None:
    """--adapter, --rank, --force: base + a trained adapter, unmerged."""
    p.add_argument("--adapter", metavar="RUN_DIR", help="apply this adapter (a `lowtune finetune` run "
                   "directory or an adapter directory) without merging it")
    p.add_argument("--rank", type=int, help="QDyLoRA: the rank b <= r_max to use (default: the saved one)")
    add_force_argument(p, "use the adapter even if it was trained on another base model")


def add_force_argument(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--force", "--ignore-base-hash", dest="force", action="store_true", help=text)


# ----------------------------------------------------------------------------------------------
# info, eval, generate


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="GGUF file (a split GGUF: its first part, NAME-00001-of-0000N.gguf) or "
                   "Hugging Face safetensors directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="GGUF file or Hugging Face safetensors directory")
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument("--ctx", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="score at most this many windows")
    p.add_argument("--batch", type=int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--json", action="store_true", help='end with a JSON line {"perplexity": ..., "tokens": ...}')
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--activations", choices=("float", "llama.cpp"), default="float",
                   help="float (default): lowtune's arithmetic; llama.cpp: round each product's activations "
                        "to 8 bits first, as llama.cpp's CPU does, to reproduce its perplexity")
    add_adapter_arguments(p)
    add_runtime_arguments(p)


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="GGUF file or Hugging Face safetensors directory")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("-n", type=int, default=64, help="new tokens at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    add_adapter_arguments(p)
    add_runtime_arguments(p)


# command: (help, add its arguments, description or None)
COMMANDS = {
    "info": ("architecture, sizes and tensor types of a model", add_info_arguments,
             "Architecture, sizes and tensor types of a model: any GGUF type (the K-quants and I-quants "
             "IQ4_NL..IQ1_M included), a split GGUF's parts counted."),
    "quantize": ("quantize a GGUF or safetensors model to a type or recipe", quantize_cli.add_arguments,
                 quantize_cli.DESCRIPTION),
    "eval": ("perplexity of a text file (non-overlapping windows)", add_eval_arguments, None),
    "generate": ("generate text from a prompt", add_generate_arguments, None),
    "finetune": ("fine-tune adapters on a quantized model", finetune_cli.add_arguments, finetune_cli.DESCRIPTION),
    "export": ("merge an adapter into the quantized model, or export it (GGUF LoRA, PEFT, HF safetensors)",
               export_cli.add_arguments, export_cli.DESCRIPTION),
    "correct": ("LREC: train a LoRA that makes a quantized model match its full-precision teacher",
                correct_cli.add_arguments, correct_cli.DESCRIPTION),
}


def _check_eval(args: argparse.Namespace) -> None:
    check_model_path(args.model)
    check_input_file(args.text, "text file")


# command: what can be checked before the library (and torch) loads: missing or unusable paths and
# options fail at once, not after seconds of loading
CHECKS = {
    "info": lambda args: check_model_path(args.model),
    "eval": _check_eval,
    "generate": lambda args: check_model_path(args.model),
    "quantize": quantize_cli.check,
    "finetune": finetune_cli.check,
    "export": export_cli.check,
    "correct": lambda args: None if args.resume else correct_cli.check(args),
}


def error_line(e: Exception) -> str:
    """An exception as the one line the user sees (no "[Errno N]": an OSError says which path and why)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror if e.filename is None else io_message(e, doing="open")
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowtune", description="Fine-tune, evaluate and run block-quantized (GGUF) Llama models.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (text, add, description) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=description or text[:1].upper() + text[1:] + ".",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add(p)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version
        return "lowtune " + version("lowtune")
    except Exception:
        return "lowtune (source tree)"


def main(argv: list[str] | None = None) -> int:
    debug = bool(os.environ.get("LOWTUNE_DEBUG"))
    logging.basicConfig(level=logging.WARNING, format="lowtune: warning: %(message)s")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        if args.command in CHECKS:
            CHECKS[args.command](args)
        # the one deferred import: the library, torch with it, once a command is chosen
        commands = importlib.import_module("lowtune.commands")
        return int(getattr(commands, args.command)(args) or 0)
    except KeyboardInterrupt:
        print("\nlowtune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `lowtune generate ... | head`
        return 0
    except Exception as e:  # one line for the user; the traceback only when asked for
        if debug:
            raise
        msg = error_line(e)
        if not isinstance(e, (CLIError, OSError, ValueError, KeyError, NotImplementedError)):
            msg = f"{type(e).__name__}: {msg} (set LOWTUNE_DEBUG=1 for the traceback)"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: say which rank
            msg = f"[rank {os.environ.get('RANK', '?')}/{os.environ['WORLD_SIZE']}] {msg}"
        print(f"lowtune: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
