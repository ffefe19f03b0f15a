"""`lowtune export`: the command line of export.py.

    lowtune export MODEL.gguf --adapter RUN_DIR -o merged.gguf            # each tensor in its own type
    lowtune export MODEL.gguf --adapter RUN_DIR -o merged.gguf --type Q5_K
    lowtune export MODEL.gguf --adapter RUN_DIR --lora-gguf lora.gguf     # llama.cpp --lora
    lowtune export MODEL.gguf --adapter RUN_DIR --peft peft/ --hf hf/ --dtype bf16
    lowtune export MODEL.gguf -o model-f16.gguf --type F16                # no adapter: convert only

cli.py registers it through `add_parser(subparsers)`. `add_adapter_arguments(p)` and
`model_from_args(args, device, dtype)` give `lowtune eval` / `generate` their `--adapter RUN_DIR
[--rank b]` (base + adapter, unmerged).
"""
from __future__ import annotations

import argparse
import json
import sys


def add_adapter_arguments(p: argparse.ArgumentParser) -> None:
    """--adapter, --rank, --ignore-base-hash for commands that run base + adapter unmerged."""
    p.add_argument("--adapter", metavar="RUN_DIR", help="apply this adapter (a `lowtune finetune` run "
                   "directory or an adapter directory) without merging it")
    p.add_argument("--rank", type=int, help="QDyLoRA: the rank b <= r_max to use (default: the saved one)")
    p.add_argument("--ignore-base-hash", action="store_true",
                   help="use the adapter even if it was trained on another base file")


def model_from_args(args, device="cpu", dtype=None):
    """LlamaModel for args.model with args.adapter (if any) applied unmerged."""
    import torch
    from .export import load_model_with_adapter
    return load_model_with_adapter(args.model, getattr(args, "adapter", None), getattr(args, "rank", None),
                                   device=device, dtype=dtype or torch.float32,
                                   ignore_base_hash=getattr(args, "ignore_base_hash", False))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the base: GGUF file or Hugging Face directory")
    p.add_argument("--adapter", metavar="RUN_DIR", help="the trained adapter: a `lowtune finetune` run "
                   "directory or an adapter directory (omit to convert the base only)")
    p.add_argument("--merge", action="store_true", help="write the merged GGUF (needs -o)")
    p.add_argument("-o", "--output", metavar="OUT.gguf", help="merged GGUF to write (implies --merge)")
    p.add_argument("--type", metavar="T", help="re-quantize every quantized tensor to T (Q4_K, Q8_0, F16, "
                   "INT4-g64, ...) instead of keeping each tensor's own type")
    p.add_argument("--kquant-mins", choices=["best", "refit", "requantize"], default="best",
                   help="QA-LoRA/QA-HiRA on Q2_K/Q4_K/Q5_K: refit the quantized mins (codes kept), "
                   "re-quantize, or per super-block whichever is closer (default)")
    p.add_argument("--lora-gguf", metavar="OUT.gguf", help="write a GGUF LoRA adapter for llama.cpp --lora")
    p.add_argument("--lora-dtype", choices=["f32", "f16"], default="f32", help="GGUF LoRA tensor type (default f32)")
    p.add_argument("--peft", metavar="OUT_DIR", help="write a PEFT LoRA adapter (HF module names and q/k order)")
    p.add_argument("--hf", metavar="OUT_DIR", help="write merged Hugging Face safetensors + config + tokenizer")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="--hf weight dtype (default bf16)")
    p.add_argument("--rank", type=int, help="QDyLoRA: export rank b <= r_max (default: the saved one)")
    p.add_argument("--base-type", metavar="T", help="for a Hugging Face MODEL directory: the type training "
                   "quantized it to (default: the run's config.json, else finetune's default types)")
    p.add_argument("--ignore-base-hash", action="store_true",
                   help="export even if the adapter was trained on another base file")
    p.add_argument("--report", metavar="FILE.json", help="write a JSON report (per-tensor merge paths and errors)")
    p.add_argument("--quiet", action="store_true", help="print only errors and warnings")


def run(args) -> int:
    import logging

    from . import export

    logging.basicConfig(level=logging.WARNING, format="lowtune: warning: %(message)s")
    merge = args.merge or args.output is not None
    if args.merge and args.output is None:
        raise ValueError("--merge needs -o OUT.gguf")
    if not (merge or args.lora_gguf or args.peft or args.hf):
        raise ValueError("nothing to export: give -o OUT.gguf (merged GGUF), --lora-gguf, --peft or --hf")
    if (args.lora_gguf or args.peft) and args.adapter is None:
        raise ValueError("--lora-gguf and --peft export an adapter: give --adapter RUN_DIR")
    if args.rank is not None and args.adapter is None:
        raise ValueError("--rank needs --adapter")
    common = dict(rank=args.rank, base_type=args.base_type, ignore_base_hash=args.ignore_base_hash)
    reports = []
    if merge:
        reports.append(export.export_merged_gguf(args.model, args.adapter, args.output, qtype=args.type,
                                                 kquant_mins=args.kquant_mins, **common))
    if args.lora_gguf:
        reports.append(export.export_lora_gguf(args.model, args.adapter, args.lora_gguf, dtype=args.lora_dtype,
                                               **common))
    if args.peft:
        reports.append(export.export_peft(args.model, args.adapter, args.peft, **common))
    if args.hf:
        reports.append(export.export_hf(args.model, args.adapter, args.hf, dtype=args.dtype, **common))
    if not args.quiet:
        for r in reports:
            print("\n".join(r.summary()))
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump([r.as_dict() for r in reports], f, indent=1)
    return 0


def add_parser(subparsers):
    p = subparsers.add_parser("export", help="merge an adapter into the quantized model, or export it "
                              "(GGUF LoRA, PEFT, HF safetensors)",
                              description=__doc__.split("\n\n")[1] if __doc__ else None,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lowtune")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        print(f"lowtune: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
