"""A GGUF's tensors and vocabulary under another Llama-shaped family's architecture, for timing
that family's code paths on real shapes and a real vocabulary (decoding, prompt evaluation): the
rotation pairs and the extra tensors differ, so the variant's text is not meaningful, but lowtune
and llama.cpp compute the same function of it (bench_eval.py checks their perplexities agree).

    python tools/family_variant.py SmolLM2.Q4_1.gguf qwen3 -o smollm2-as-qwen3.gguf

qwen2: zero q/k/v biases; qwen3: unit per-head q/k norms; smollm3: as is (every 4th layer then
has no RoPE); granite: the scales of Granite 3.x 2B (embedding 12, residual 0.22, query 1/64,
logits / 8).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
from lowtune.gguf_io import GGUFFile, write_gguf  # noqa: E402

GRANITE = {"embedding_scale": 12.0, "residual_scale": 0.22, "attention.scale": 0.015625, "logit_scale": 8.0}


def variant(src: str, arch: str, out: str) -> None:
    with GGUFFile(src) as f:
        old = f.metadata["general.architecture"]
        md = {(arch + k[len(old):] if k.startswith(old + ".") else k): v for k, v in f.metadata.items()}
        types = {(arch + k[len(old):] if k.startswith(old + ".") else k): v for k, v in f.metadata_types.items()}
        md["general.architecture"] = arch
        tensors = [(n, f.qtensor(n) if len(f.tensor_infos[n].shape) == 2 else f.tensor(n)) for n in f.tensor_infos]
    layers, heads = md[f"{arch}.block_count"], md[f"{arch}.attention.head_count"]
    kv = md.get(f"{arch}.attention.head_count_kv", heads)
    hd = md.get(f"{arch}.attention.key_length", md[f"{arch}.embedding_length"] // heads)
    for i in range(layers):
        if arch == "qwen2":
            tensors += [(f"blk.{i}.attn_q.bias", torch.zeros(heads * hd)),
                        (f"blk.{i}.attn_k.bias", torch.zeros(kv * hd)), (f"blk.{i}.attn_v.bias", torch.zeros(kv * hd))]
        elif arch == "qwen3":
            tensors += [(f"blk.{i}.attn_q_norm.weight", torch.ones(hd)),
                        (f"blk.{i}.attn_k_norm.weight", torch.ones(hd))]
    if arch == "granite":
        md.update({f"granite.{k}": v for k, v in GRANITE.items()})
    elif arch not in ("qwen2", "qwen3", "smollm3"):
        raise SystemExit(f"no variant for {arch!r} (qwen2, qwen3, smollm3, granite)")
    write_gguf(out, md, tensors, metadata_types=types)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("arch")
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args(argv)
    variant(a.model, a.arch, a.out)
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
