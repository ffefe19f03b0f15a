"""The `lowtune` command (also `python -m lowtune`).

    lowtune info MODEL.gguf [--json]
    lowtune eval MODEL.gguf --text FILE [--ctx 512] [--chunks K] [--json]
    lowtune generate MODEL.gguf --prompt TEXT [-n 64] [--temperature 0] [--chat] [--seed S]

Other subcommands live in their own modules: each module listed in COMMAND_MODULES exposes
`add_parser(subparsers)`, which adds its subparser and sets `func` (args -> exit code) with
`set_defaults`. Errors a user can fix (missing file, bad GGUF, bad option) print one line and
exit with status 1; set LOWTUNE_DEBUG=1 to see the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections import Counter
from pathlib import Path

# Modules that add subcommands (finetune, export, quantize, correct). A module that does not
# exist yet, or has no add_parser, is skipped.
COMMAND_MODULES = ("lowtune.quantize_model", "lowtune.trainer", "lowtune.export", "lowtune.correct")


class CLIError(Exception):
    """A problem the user can fix; printed as one line."""


# ----------------------------------------------------------------------------------------------
# shared options


def require_file(path: str, what: str = "model") -> Path:
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{what} file not found: {path}")
    if not p.is_file():
        raise CLIError(f"{what} path is not a file: {path}")
    return p


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """--device, --dtype, --threads: shared by every command that runs the model."""
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="activation dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")


def runtime(args) -> tuple[str, "torch.dtype"]:
    import torch
    import lowtune
    if args.threads:
        if args.threads < 0:
            raise CLIError("--threads must be positive")
        torch.set_num_threads(args.threads)
        lowtune._C.set_num_threads(args.threads)
    cuda_ok = torch.cuda.is_available() and lowtune.build_info()["cuda"]
    device = args.device
    if device == "auto":
        device = "cuda" if cuda_ok else "cpu"
    elif device.startswith("cuda") and not cuda_ok:
        raise CLIError("--device cuda asked for, but no CUDA GPU is visible or lowtune was built without CUDA")
    elif device != "cpu" and not device.startswith("cuda"):
        raise CLIError(f"unknown --device {device!r}: use cpu, cuda, cuda:N or auto")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return device, dtype


def load_model(args):
    """(model, tokenizer) from args.model with args' device and dtype."""
    from .model import LlamaModel
    from .tokenizer import load_tokenizer
    require_file(args.model)
    device, dtype = runtime(args)
    if getattr(args, "adapter", None) or getattr(args, "rank", None) is not None:
        from .export_cli import model_from_args  # base + adapter, unmerged
        model = model_from_args(args, device=device, dtype=dtype)
    else:
        model = LlamaModel.from_gguf(args.model, device=device, dtype=dtype)
    return model, load_tokenizer(model.metadata)


# ----------------------------------------------------------------------------------------------
# info


def model_info(path: str) -> dict:
    """Architecture, sizes and tensor types of a GGUF model, from its header only."""
    from .gguf_io import GGUFFile
    from .model import LlamaConfig
    with GGUFFile(path) as f:
        md = f.metadata
        infos = list(f.tensor_infos.values())
    types: Counter = Counter()
    params: Counter = Counter()
    total_bytes = total_params = 0
    for ti in infos:
        types[ti.type_name] += 1
        params[ti.type_name] += ti.n_elements
        total_bytes += ti.nbytes
        total_params += ti.n_elements
    names = {ti.name for ti in infos}
    info = {
        "file": str(path), "file_bytes": os.path.getsize(path),
        "architecture": md.get("general.architecture"), "name": md.get("general.name"),
        "params": total_params, "tensor_bytes": total_bytes,
        "bits_per_weight": 8.0 * total_bytes / total_params if total_params else 0.0,
        "tensor_types": {t: {"tensors": types[t], "params": params[t]} for t in sorted(types, key=lambda t: -params[t])},
        "tied_embeddings": "output.weight" not in names,
        "tokenizer": md.get("tokenizer.ggml.model"), "chat_template": "tokenizer.chat_template" in md,
    }
    try:
        c = LlamaConfig.from_gguf_metadata(md)
        info["config"] = {"layers": c.n_layers, "dim": c.dim, "ffn_dim": c.ffn_dim, "heads": c.n_heads,
                          "kv_heads": c.n_kv_heads, "head_dim": c.head_dim, "vocab": c.vocab_size,
                          "context": c.context_length, "rope_theta": c.rope_theta,
                          "rope_linear_scale": c.rope_linear_scale,
                          "rope_freqs": "rope_freqs.weight" in names, "rms_eps": c.norm_eps}
    except ValueError as e:
        info["unsupported"] = str(e)
    return info


def cmd_info(args) -> int:
    require_file(args.model)
    info = model_info(args.model)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"file            {info['file']} ({info['file_bytes'] / 1e6:.1f} MB)")
    print(f"architecture    {info['architecture']}" + (f"  ({info['name']})" if info["name"] else ""))
    c = info.get("config")
    if c:
        print(f"layers          {c['layers']}  dim {c['dim']}  ffn {c['ffn_dim']}  heads {c['heads']} "
              f"(kv {c['kv_heads']}, head_dim {c['head_dim']})")
        print(f"vocab           {c['vocab']}  context {c['context']}  tied embeddings "
              f"{'yes' if info['tied_embeddings'] else 'no'}")
        rope = f"theta {c['rope_theta']:g}"
        if c["rope_linear_scale"] != 1.0:
            rope += f", linear scale {c['rope_linear_scale']:g}"
        if c["rope_freqs"]:
            rope += ", llama3 rope_freqs"
        print(f"rope            {rope}  rms eps {c['rms_eps']:g}")
    else:
        print(f"note            {info['unsupported']}")
    print(f"params          {info['params']:,}")
    print(f"bits per weight {info['bits_per_weight']:.3f}  ({info['tensor_bytes'] / 1e6:.1f} MB of tensors)")
    print("tensor types    " + ", ".join(f"{t} x{v['tensors']} ({v['params'] / info['params']:.1%} of params)"
                                         for t, v in info["tensor_types"].items()))
    print(f"tokenizer       {info['tokenizer']}" + ("  (chat template)" if info["chat_template"] else ""))
    return 0


# ----------------------------------------------------------------------------------------------
# eval


def cmd_eval(args) -> int:
    from .evaluate import perplexity
    from .progress import Progress
    if args.ctx < 2:
        raise CLIError("--ctx must be at least 2")
    if args.chunks is not None and args.chunks < 1:
        raise CLIError("--chunks must be at least 1")
    text_path = require_file(args.text, "text")
    model, tok = load_model(args)
    try:
        text = text_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CLIError(f"{args.text} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    ids = tok.encode(text, add_bos=False)
    n_windows = len(ids) // args.ctx
    if args.chunks is not None:
        n_windows = min(n_windows, args.chunks)
    if n_windows == 0:
        raise CLIError(f"{args.text} has {len(ids)} tokens, fewer than one window of --ctx {args.ctx}")
    bar = Progress(total=n_windows, desc="eval", unit="window", enabled=not args.quiet)
    done = [0]

    def progress(windows_done, nll_sum, scored):
        import math
        bar.update(windows_done - done[0], tokens=(windows_done - done[0]) * args.ctx,
                   ppl=math.exp(nll_sum / scored))
        done[0] = windows_done

    with bar:
        r = perplexity(model, ids, ctx=args.ctx, chunks=args.chunks, batch=args.batch, progress=progress)
    print(f"perplexity {r['perplexity']:.4f} over {r['tokens']} tokens ({r['windows']} windows of "
          f"{args.ctx}), {r['seconds']:.1f} s, {r['tokens_per_second']:.1f} tok/s")
    if args.json:
        print(json.dumps({"perplexity": r["perplexity"], "tokens": r["tokens"], "nll": r["nll"],
                          "windows": r["windows"], "ctx": args.ctx,
                          "tokens_per_second": r["tokens_per_second"]}))
    return 0


# ----------------------------------------------------------------------------------------------
# generate


def cmd_generate(args) -> int:
    from .generate import GenerationStats, generate_text
    if args.n < 1:
        raise CLIError("-n must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise CLIError("need --temperature >= 0, 0 < --top-p <= 1 and --top-k >= 0")
    model, tok = load_model(args)
    if args.chat and not tok.chat_template:
        raise CLIError("this model has no chat template; run without --chat")

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if not args.chat:
        show(args.prompt)
    stats = GenerationStats()
    generate_text(model, tok, args.prompt, max_new_tokens=args.n, chat=args.chat, system=args.system,
                  on_text=show, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  seed=args.seed, stats=stats)
    show("\n")
    print(f"prompt: {stats.prompt_tokens} tokens, {stats.prompt_tokens_per_second:.1f} tokens/s; "
          f"decode: {stats.decode_tokens} tokens, {stats.decode_tokens_per_second:.1f} tokens/s",
          file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------
# parser and entry point


def build_parser() -> argparse.ArgumentParser:
    from .export_cli import add_adapter_arguments
    parser = argparse.ArgumentParser(
        prog="lowtune", description="Fine-tune, evaluate and run block-quantized (GGUF) Llama models.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="architecture, sizes and tensor types of a GGUF model")
    p.add_argument("model", help="GGUF file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("eval", help="perplexity of a text file (non-overlapping windows)")
    p.add_argument("model", help="GGUF file")
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument("--ctx", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="score at most this many windows")
    p.add_argument("--batch", type=int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--json", action="store_true", help='end with a JSON line {"perplexity": ..., "tokens": ...}')
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_adapter_arguments(p)
    add_runtime_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("model", help="GGUF file")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("-n", type=int, default=64, help="new tokens at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    add_adapter_arguments(p)
    add_runtime_args(p)
    p.set_defaults(func=cmd_generate)

    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue  # that command is not part of this build
            raise
        add = getattr(mod, "add_parser", None)
        if add is not None:
            add(sub)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version
        return "lowtune " + version("lowtune")
    except Exception:
        return "lowtune (source tree)"


def main(argv: list[str] | None = None) -> int:
    debug = bool(os.environ.get("LOWTUNE_DEBUG"))
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            parser.print_help(sys.stderr)
            return 2
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\nlowtune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `lowtune generate ... | head`
        return 0
    except Exception as e:  # one line for the user; the traceback only when asked for
        if debug:
            raise
        text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        msg = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        if not isinstance(e, (CLIError, OSError, ValueError, KeyError, NotImplementedError)):
            msg = f"{type(e).__name__}: {msg} (set LOWTUNE_DEBUG=1 for the traceback)"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: say which rank
            msg = f"[rank {os.environ.get('RANK', '?')}/{os.environ['WORLD_SIZE']}] {msg}"
        print(f"lowtune: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
