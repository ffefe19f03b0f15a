"""What `lowtune export` accepts (lowtune.commands runs it with lowtune.export).

    lowtune export MODEL.gguf --adapter RUN_DIR -o merged.gguf            # each tensor in its own type
    lowtune export MODEL.gguf --adapter RUN_DIR -o merged.gguf --eval-text held_out.txt
    lowtune export MODEL.gguf --adapter RUN_DIR -o merged.gguf --type Q5_K
    lowtune export MODEL.gguf --adapter RUN_DIR --lora-gguf lora.gguf     # llama.cpp --lora
    lowtune export MODEL.gguf --adapter RUN_DIR --peft peft/ --hf hf/ --dtype bf16
    lowtune export MODEL.gguf -o model-f16.gguf --type F16                # no adapter: convert only
    lowtune export MODEL.gguf --adapter RUN_DIR -o merged.gguf --split-max-size 2G  # merged-00001-of-0000N.gguf, ...
"""
from __future__ import annotations

import argparse

from .paths import check_model_path, check_output_dir, check_output_file

DESCRIPTION = __doc__.split("\n\n")[1]


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
    p.add_argument("--split-max-size", metavar="SIZE", help="write the merged GGUF as split parts of at most "
                   "SIZE of tensor data (2G, 500M), OUT-00001-of-0000N.gguf, ... as llama.cpp's gguf-split; "
                   "llama.cpp and lowtune open them from the first part")
    p.add_argument("--split-max-tensors", type=int, metavar="N", help="split parts of at most N tensors")
    p.add_argument("--lora-gguf", metavar="OUT.gguf", help="write a GGUF LoRA adapter for llama.cpp --lora")
    p.add_argument("--lora-dtype", choices=["f32", "f16"], default="f32", help="GGUF LoRA tensor type (default f32)")
    p.add_argument("--peft", metavar="OUT_DIR", help="write a PEFT LoRA adapter (HF module names and q/k order)")
    p.add_argument("--hf", metavar="OUT_DIR", help="write merged Hugging Face safetensors + config + tokenizer")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="--hf weight dtype (default bf16)")
    p.add_argument("--rank", type=int, help="QDyLoRA: export rank b <= r_max (default: the saved one)")
    p.add_argument("--base-type", metavar="T", help="for a Hugging Face MODEL directory: the type training "
                   "quantized it to (default: the run's config.json, else finetune's default types)")
    p.add_argument("--force", "--ignore-base-hash", dest="force", action="store_true",
                   help="export even if the adapter was trained on another base model")
    p.add_argument("--eval-text", metavar="FILE", help="after merging, score this text with base + adapter "
                   "and with the merged GGUF, and print both perplexities")
    p.add_argument("--eval-chunks", type=int, metavar="K", help="--eval-text: at most K windows of 512 tokens")
    p.add_argument("--report", metavar="FILE.json", help="write a JSON report (per-tensor merge paths and errors)")
    p.add_argument("--quiet", action="store_true", help="print only errors and warnings")


def check(args: argparse.Namespace) -> bool:
    """Whether a merged GGUF is asked for; raises ValueError for a combination that cannot work."""
    merge = args.merge or args.output is not None
    if args.merge and args.output is None:
        raise ValueError("--merge needs -o OUT.gguf")
    if not (merge or args.lora_gguf or args.peft or args.hf):
        raise ValueError("nothing to export: give -o OUT.gguf (merged GGUF), --lora-gguf, --peft or --hf")
    if (args.lora_gguf or args.peft) and args.adapter is None:
        raise ValueError("--lora-gguf and --peft export an adapter: give --adapter RUN_DIR")
    if args.rank is not None and args.adapter is None:
        raise ValueError("--rank needs --adapter")
    check_model_path(args.model)
    for path in (args.output if merge else None, args.lora_gguf, args.report):
        if path is not None:
            check_output_file(path)
    for path in (args.peft, args.hf):
        if path is not None:
            check_output_dir(path)
    if (args.split_max_size or args.split_max_tensors is not None) and not merge:
        raise ValueError("--split-max-size and --split-max-tensors split the merged GGUF: give -o OUT.gguf")
    if args.eval_text is not None and not (merge and args.adapter is not None):
        raise ValueError("--eval-text compares the merged GGUF with base + adapter: give --adapter and -o OUT.gguf")
    if args.eval_chunks is not None and args.eval_chunks < 1:
        raise ValueError("--eval-chunks must be at least 1")
    return merge
