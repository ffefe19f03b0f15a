"""A GGUF's tensors and vocabulary under another Llama-shaped family's architecture, for timing
that family's code paths on real shapes and a real vocabulary (decoding, prompt evaluation): the
rotation pairs and the extra tensors differ, so the variant's text is not meaningful, but lowtune
and llama.cpp compute the same function of it (bench_eval.py checks their perplexities agree).

    python tools/family_variant.py SmolLM2.Q4_1.gguf qwen3 -o smollm2-as-qwen3.gguf
    python tools/family_variant.py SmolLM2.Q4_1.gguf llama --experts 8 --used 2 -o smollm2-moe.gguf
    python tools/family_variant.py SmolLM2.Q4_1.gguf gpt-oss --experts 8 --used 2 --mxfp4 -o smollm2-gpt-oss.gguf

qwen2: zero q/k/v biases; qwen3: unit per-head q/k norms; smollm3: as is (every 4th layer then
has no RoPE); granite: the scales of Granite 3.x 2B (embedding 12, residual 0.22, query 1/64,
logits / 8).

--experts E (llama: Mixtral's layout; qwen3moe: Qwen3-MoE's; gpt-oss: gpt-oss's) makes each layer's
FFN a mixture of E copies of it with a random router, each token routed to --used of them: as the
copies are equal and the routing weights sum to 1, the model computes the dense one's function (its
text is the original's), through the whole mixture-of-experts path at the original FFN's width per
expert. gpt-oss adds what its layers have (zero biases on q/k/v/output, the router and the experts,
a sink of -1 per head, a window of 128 on every 2nd layer, swiglu_oai) and so computes another
function; --mxfp4 re-quantizes its experts to MXFP4, as gpt-oss's files keep them.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
from lowtune.gguf_io import GGUFFile, write_gguf  # noqa: E402
from lowtune.qtensor import QTensor  # noqa: E402

GRANITE = {"embedding_scale": 12.0, "residual_scale": 0.22, "attention.scale": 0.015625, "logit_scale": 8.0}


def experts_of(tensors: list, layers: int, dim: int, n: int, seed: int = 0) -> list:
    """tensors with each layer's ffn_gate/up/down replaced by ffn_*_exps of n equal experts (the
    packed rows repeated: [n, F, D] / [n, D, F]) and a random F32 router ffn_gate_inp [n, D]."""
    g = torch.Generator().manual_seed(seed)
    by_name = dict(tensors)
    out = [(k, v) for k, v in tensors if not any(f".{p}.weight" in k for p in ("ffn_gate", "ffn_up", "ffn_down"))]
    for i in range(layers):
        for part in ("ffn_gate", "ffn_up", "ffn_down"):
            qt = by_name[f"blk.{i}.{part}.weight"]
            rows = QTensor(qt.raw.repeat(n, 1), qt.format, (n * qt.shape[0], qt.shape[1]))
            out.append((f"blk.{i}.{part}_exps.weight", (rows, (n, qt.shape[0], qt.shape[1]))))
        out.append((f"blk.{i}.ffn_gate_inp.weight", torch.randn(n, dim, generator=g)))
    return out


def gpt_oss_parts(tensors: list, layers: int, dim: int, heads: int, kv: int, hd: int, n: int, ffn: int,
                  mxfp4: bool) -> list:
    """gpt-oss's extra tensors for a mixture made by experts_of: zero biases, a sink per head, the
    FFN norm under gpt-oss's name, and the head untied; the experts re-quantized to MXFP4 where asked."""
    from lowtune import ops
    out = []
    names = [name for name, _ in tensors]
    if "output.weight" not in names:  # (llama.cpp's gpt-oss has no tied head)
        out.append(("output.weight", dict(tensors)["token_embd.weight"]))
    for name, t in tensors:
        if name.endswith("ffn_norm.weight"):
            name = name.replace("ffn_norm", "post_attention_norm")
        elif mxfp4 and "_exps.weight" in name:
            rows, shape = t
            t = (ops.quantize(ops.dequantize(rows), "MXFP4"), shape)
        out.append((name, t))
    for i in range(layers):
        p = f"blk.{i}."
        out += [(p + "attn_q.bias", torch.zeros(heads * hd)), (p + "attn_k.bias", torch.zeros(kv * hd)),
                (p + "attn_v.bias", torch.zeros(kv * hd)), (p + "attn_output.bias", torch.zeros(dim)),
                (p + "attn_sinks.weight", torch.full((heads,), -1.0)), (p + "ffn_gate_inp.bias", torch.zeros(n)),
                (p + "ffn_gate_exps.bias", torch.zeros(n, ffn)), (p + "ffn_up_exps.bias", torch.zeros(n, ffn)),
                (p + "ffn_down_exps.bias", torch.zeros(n, dim))]
    return out


def variant(src: str, arch: str, out: str, experts: int = 0, used: int = 2, mxfp4: bool = False) -> None:
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
        elif arch in ("qwen3", "qwen3moe"):
            tensors += [(f"blk.{i}.attn_q_norm.weight", torch.ones(hd)),
                        (f"blk.{i}.attn_k_norm.weight", torch.ones(hd))]
    if arch == "granite":
        md.update({f"granite.{k}": v for k, v in GRANITE.items()})
    elif arch not in ("qwen2", "qwen3", "smollm3", "qwen3moe", "gpt-oss") and not (arch == "llama" and experts):
        raise SystemExit(f"no variant for {arch!r} (qwen2, qwen3, smollm3, granite; llama, qwen3moe or gpt-oss "
                         "with --experts)")
    if arch in ("qwen3moe", "gpt-oss") and not experts:
        raise SystemExit(f"{arch} needs --experts")
    if experts:
        tensors = experts_of(tensors, layers, md[f"{arch}.embedding_length"], experts)
        md.update({f"{arch}.expert_count": experts, f"{arch}.expert_used_count": used})
        if arch in ("qwen3moe", "gpt-oss"):
            md[f"{arch}.expert_feed_forward_length"] = md[f"{arch}.feed_forward_length"]
        if arch == "gpt-oss":
            md["gpt-oss.attention.sliding_window"] = 128
            tensors = gpt_oss_parts(tensors, layers, md[f"{arch}.embedding_length"], heads, kv, hd, experts,
                                    md[f"{arch}.feed_forward_length"], mxfp4)
    write_gguf(out, md, tensors, metadata_types=types)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("arch")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--experts", type=int, default=0, help="a mixture of this many copies of each FFN")
    ap.add_argument("--used", type=int, default=2, help="experts each token is routed to")
    ap.add_argument("--mxfp4", action="store_true", help="gpt-oss: the experts re-quantized to MXFP4")
    a = ap.parse_args(argv)
    variant(a.model, a.arch, a.out, a.experts, a.used, a.mxfp4)
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
