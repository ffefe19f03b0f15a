"""What each `lowtune` command does: parsed arguments (cli.py and the *_cli modules) in, the
library out. One function per command, named after it; cli.main calls the chosen one.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys

import torch

from . import _C, distributed
from .cli import CLIError
from .correct import correct as run_correct, resume_correct
from .correct_cli import check as check_correct, train_options
from .evaluate import perplexity
from .export import (compare_perplexity, describe_perplexity, export_hf, export_lora_gguf, export_merged_gguf,
                     export_peft)
from .export_cli import check as check_export
from .failures import TrainingError
from .finetune_cli import config_from_args, resumed_config
from .generate import GenerationStats, generate_text
from .llamacpp_activations import rounded_like_llamacpp
from .loading import activation_dtype, describe, load, pick_device
from .memory_budget import prepare_process
from .progress import Progress
from .quantize_model import quantize_model
from .train_config import parse_size
from .trainer import Trainer


def _runtime(args) -> tuple[torch.device, torch.dtype]:
    """Device and activation dtype from --device, --dtype, --threads."""
    if args.threads:
        if args.threads < 0:
            raise CLIError("--threads must be positive")
        torch.set_num_threads(args.threads)
        _C.set_num_threads(args.threads)
    device = pick_device(args.device)
    return device, activation_dtype(device, args.dtype)


def _load(args):
    device, dtype = _runtime(args)
    return load(args.model, device=device, dtype=dtype, adapter=args.adapter, rank=args.rank, force=args.force)


def _file(path: str, what: str):
    if not os.path.isfile(path):
        raise CLIError(f"{what} file not found: {path}")
    return path


# ----------------------------------------------------------------------------------------------

def info(args: argparse.Namespace) -> int:
    info = describe(args.model)
    if args.json:
        print(json.dumps(info))
        return 0
    parts = f", {info['parts']} split parts" if info.get("parts", 1) > 1 else ""
    print(f"file            {info['file']} ({info['file_bytes'] / 1e6:.1f} MB{parts})")
    print(f"architecture    {info['architecture']}" + (f"  ({info['name']})" if info["name"] else ""))
    c = info.get("config")
    if c:
        print(f"layers          {c['layers']}  dim {c['dim']}  ffn {c['ffn_dim']}  heads {c['heads']} "
              f"(kv {c['kv_heads']}, head_dim {c['head_dim']})")
        if c["experts"]:
            print(f"experts         {c['experts']} ({c['experts_used']} used a token, ffn {c['expert_ffn_dim']} each)")
        if c["conv_layers"]:
            print(f"short conv      layers {', '.join(map(str, c['conv_layers']))} (width {c['conv_kernel']}), "
                  "attention in the others")
        if c["ssm_layers"]:
            m, layers = c["ssm"], ", ".join(map(str, c["ssm_layers"]))
            beside = ("no attention" if not c["heads"] else "attention beside them"
                      if len(c["ssm_layers"]) == c["layers"] else "attention in the others")
            if "dt_rank" in m:  # (Mamba 1's selective scan: Mamba, Jamba)
                print(f"mamba           layers {layers} ({m['inner']} channels, state {m['state']}, dt rank "
                      f"{m['dt_rank']}, conv {m['conv_kernel']}), {beside}")
            else:
                print(f"mamba2          layers {layers} ({m['heads']} heads of {m['inner'] // m['heads']}, state "
                      f"{m['state']}, {m['groups']} groups, conv {m['conv_kernel']}), {beside}")
        if c["rwkv"]:  # (RWKV's time mix in place of attention)
            mlp = "Qwen2's gated MLP" if c["rwkv_mlp"] else "RWKV's channel mix"
            print(f"rwkv            RWKV-{c['rwkv']} time mix in every layer ({c['heads']} heads of {c['head_dim']}, "
                  f"low ranks {c['wkv_lora_ranks']}), then {mlp}")
        if c["layer_widths"]:  # (Gemma 4: the sliding and the global layers' own)
            kinds = {tuple(w.values()): w for w in c["layer_widths"]}.values()
            print("layer widths    " + "; ".join(f"head_dim {w['head_dim']} (kv {w['kv_heads']}, rope {w['rope_dim']}) "
                                                 f"ffn {w['ffn_dim']}" for w in kinds))
        print(f"vocab           {c['vocab']}  context {c['context']}  tied embeddings "
              f"{'yes' if info['tied_embeddings'] else 'no'}")
        rope = f"theta {c['rope_theta']:g}"
        if c["rope_linear_scale"] != 1.0:
            rope += f", linear scale {c['rope_linear_scale']:g}"
        if c["rope_yarn_factor"]:
            rope += f", YaRN x{c['rope_yarn_factor']:g} of {c['rope_orig_context']}"
        if c["rope_freqs"]:
            # (Gemma 4's apply to its global layers; Deci's, OpenELM's widths by layer take Llama 3's)
            gemma4 = c["layer_widths"] and info["architecture"].startswith("gemma4")
            rope += ", the global layers' rope_freqs" if gemma4 else ", llama3 rope_freqs"
        if c["no_rope"]:  # (Granite 4's hybrids' attention)
            rope = "none (the file switches it off)"
        if c["rwkv"]:
            rope = "none (RWKV's token shift and recurrence order the positions)"
        print(f"rope            {rope}  rms eps {c['rms_eps']:g}")
    else:
        print(f"note            {info['unsupported']}")
    print(f"params          {info['params']:,}")
    print(f"bits per weight {info['bits_per_weight']:.3f}  ({info['tensor_bytes'] / 1e6:.1f} MB of tensors)")
    print("tensor types    " + ", ".join(f"{t} x{v['tensors']} ({v['params'] / info['params']:.1%} of params)"
                                         for t, v in info["tensor_types"].items()))
    print(f"tokenizer       {info['tokenizer']}" + ("  (chat template)" if info["chat_template"] else ""))
    return 0


def eval(args: argparse.Namespace) -> int:  # noqa: A001 - the command's name
    if args.ctx < 2:
        raise CLIError("--ctx must be at least 2")
    if args.chunks is not None and args.chunks < 1:
        raise CLIError("--chunks must be at least 1")
    text_path = _file(args.text, "text")
    model, tok = _load(args)
    try:
        with open(text_path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise CLIError(f"{args.text} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    ids = tok.encode(text, add_bos=False)
    n_windows = len(ids) // args.ctx
    if args.chunks is not None:
        n_windows = min(n_windows, args.chunks)
    if n_windows == 0:
        raise CLIError(f"{args.text} has {len(ids)} tokens, fewer than one window of --ctx {args.ctx}")
    done = [0]
    with Progress(total=n_windows, desc="eval", unit="window", enabled=not args.quiet) as bar:
        def progress(windows_done, nll_sum, scored):
            bar.update(windows_done - done[0], tokens=(windows_done - done[0]) * args.ctx,
                       ppl=math.exp(nll_sum / scored))
            done[0] = windows_done

        rounding = rounded_like_llamacpp() if args.activations == "llama.cpp" else contextlib.nullcontext()
        try:
            with rounding:
                r = perplexity(model, ids, ctx=args.ctx, chunks=args.chunks, batch=args.batch, progress=progress)
        except ValueError as e:
            if args.activations == "llama.cpp":
                raise CLIError(f"--activations llama.cpp: {e}") from None
            raise
    print(f"perplexity {r['perplexity']:.4f} over {r['tokens']} tokens ({r['windows']} windows of "
          f"{args.ctx}{', activations rounded as llama.cpp does' if args.activations == 'llama.cpp' else ''}), "
          f"{r['seconds']:.1f} s, {r['tokens_per_second']:.1f} tok/s")
    if args.json:
        print(json.dumps({"perplexity": r["perplexity"], "tokens": r["tokens"], "nll": r["nll"],
                          "windows": r["windows"], "ctx": args.ctx,
                          "tokens_per_second": r["tokens_per_second"]}))
    return 0


def generate(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise CLIError("-n must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise CLIError("need --temperature >= 0, 0 < --top-p <= 1 and --top-k >= 0")
    model, tok = _load(args)
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


def quantize(args: argparse.Namespace) -> int:
    say = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    res = quantize_model(args.source, args.output, args.qtype, pure=args.pure, output_type=args.output_type,
                         token_embedding_type=args.token_embedding_type, progress=say)
    print(res.summary())
    return 0


def finetune(args: argparse.Namespace) -> int:
    if getattr(args, "max_vram", None):
        prepare_process()   # before CUDA starts: allocator and workspace settings the budget counts
    try:
        if args.resume:
            Trainer(resumed_config(args, lambda s: print(s, file=sys.stderr))).run(resume=True)
        else:
            Trainer(config_from_args(args)).run()
    except TrainingError as e:
        raise CLIError(str(e)) from e
    finally:
        distributed.shutdown()
    return 0


def export(args: argparse.Namespace) -> int:
    merge = check_export(args)
    common = dict(rank=args.rank, base_type=args.base_type, force=args.force)
    reports = []
    if merge:
        reports.append(export_merged_gguf(args.model, args.adapter, args.output, qtype=args.type,
                                          kquant_mins=args.kquant_mins,
                                          split_max_bytes=parse_size(args.split_max_size),
                                          split_max_tensors=args.split_max_tensors, **common))
    if args.lora_gguf:
        reports.append(export_lora_gguf(args.model, args.adapter, args.lora_gguf, dtype=args.lora_dtype, **common))
    if args.peft:
        reports.append(export_peft(args.model, args.adapter, args.peft, **common))
    if args.hf:
        reports.append(export_hf(args.model, args.adapter, args.hf, dtype=args.dtype, **common))
    if not args.quiet:
        for r in reports:
            print("\n".join(r.summary()))
    if args.eval_text:
        with open(_file(args.eval_text, "--eval-text"), encoding="utf-8") as f:
            ppl = compare_perplexity(args.model, args.adapter, args.output, f.read(), chunks=args.eval_chunks, **common)
        reports[0].perplexity = ppl
        if not args.quiet:
            print(f"  {describe_perplexity(ppl)}")
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump([r.as_dict() for r in reports], f, indent=1)
    return 0


def correct(args: argparse.Namespace) -> int:
    try:
        if args.resume:
            resume_correct(args.resume, steps=args.steps, max_vram=args.max_vram,
                           device=None if args.device == "auto" else args.device)
            return 0
        check_correct(args)
        run_correct(args.student, args.teacher, args.text, args.output, rank=args.rank, alpha=args.alpha,
                    kl_weight=args.kl_weight, ce_weight=args.ce_weight, lr=args.lr,
                    eval_texts=args.eval_text, eval_tokens=args.eval_tokens, kl_chunk=args.kl_chunk,
                    teacher_device=args.teacher_device, dtype=args.dtype, **train_options(args))
    except TrainingError as e:
        raise CLIError(str(e)) from e
    return 0
