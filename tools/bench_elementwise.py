#!/usr/bin/env python
"""Do the decoder layer's elementwise chains need fused kernels, or does torch.compile fuse them?

    PYTHONPATH=python python tools/bench_elementwise.py --json elementwise.json     # CUDA

For RMSNorm, RoPE and SwiGLU as lowtune's model writes them (lowtune.model), forward + backward
on one layer's activations (Llama-3.2-1B and Llama-2-7B shapes, 2048 tokens, bf16), timed as GPU
work alone (20 steps captured in one CUDA graph, median of 10 replays), eager and compiled
(inductor), against the chain's memory floor: the bytes it must read and write once (inputs,
outputs, gradients) at the HBM bandwidth measured here by a large copy. A compiled chain near
its floor is as good as a hand-fused kernel could be; one far above it is a candidate for one.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from lowtune.model import RMSNorm, apply_rope

from bench_adapters import graph_timed  # tools/ is the script's directory

SHAPES = {"llama32-1b": dict(dim=2048, ffn=8192, heads=32, kv_heads=8, head_dim=64),
          "llama2-7b": dict(dim=4096, ffn=11008, heads=32, kv_heads=32, head_dim=128)}


def graph_ms(fn, steps: int = 20, replays: int = 10) -> float:
    """Milliseconds per fn() as pure GPU work (bench_adapters.graph_timed: one CUDA graph of
    `steps` calls, median of `replays` replays)."""
    return graph_timed(fn, steps, replays)


def bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (graph_ms(lambda: dst.copy_(src), steps=5) / 1e3)


def chains(s: dict, tokens: int):
    """(name, function, inputs, bytes read and written once by forward + backward)."""
    bf = dict(device="cuda", dtype=torch.bfloat16)
    d, f, h, hd = s["dim"], s["ffn"], s["heads"], s["head_dim"]
    norm = RMSNorm(torch.ones(d), 1e-5).cuda()
    x = torch.randn(1, tokens, d, **bf, requires_grad=True)
    pos = torch.arange(tokens, dtype=torch.float64)[:, None]
    inv = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = pos * inv[None]
    cos, sin = ang.cos(), ang.sin()  # apply_rope's table: [2, T, hd]
    rot = torch.stack((torch.stack((cos, cos), -1), torch.stack((-sin, sin), -1))).flatten(-2).float().cuda()
    q = torch.randn(1, h, tokens, hd, **bf, requires_grad=True)
    gate = torch.randn(1, tokens, f, **bf, requires_grad=True)
    up = torch.randn(1, tokens, f, **bf, requires_grad=True)
    e = 2  # bytes per bf16 element
    return [
        ("RMSNorm", norm, (x,), 5 * tokens * d * e),             # x, y; x, dy, dx
        ("RoPE (q)", lambda t: apply_rope(t, rot), (q,), 4 * tokens * h * hd * e),
        ("SwiGLU", lambda g, u: F.silu(g) * u, (gate, up), 8 * tokens * f * e),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--json")
    args = ap.parse_args()
    bw = bandwidth()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; HBM {bw / 1e12:.2f} TB/s "
          f"(copy); forward + backward per chain, {args.tokens} tokens, bf16, GPU time per step")
    print(f"{'model':12}{'chain':10}{'eager ms':>10}{'compiled ms':>13}{'floor ms':>10}{'compiled/floor':>16}")
    rows = []
    for model in args.models.split(","):
        for name, fn, inputs, nbytes in chains(SHAPES[model], args.tokens):
            compiled = torch.compile(fn, fullgraph=True, dynamic=False)
            dy = torch.randn_like(fn(*inputs))
            times = {}
            for kind, f in (("eager", fn), ("compiled", compiled)):
                times[kind] = graph_ms(lambda f=f: torch.autograd.grad(f(*inputs), inputs, dy))
            floor = nbytes / bw * 1e3
            rows.append({"model": model, "chain": name, "eager_ms": times["eager"],
                         "compiled_ms": times["compiled"], "floor_ms": floor,
                         "compiled_over_floor": times["compiled"] / floor})
            r = rows[-1]
            print(f"{model:12}{name:10}{r['eager_ms']:10.3f}{r['compiled_ms']:13.3f}{floor:10.3f}"
                  f"{r['compiled_over_floor']:16.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "hbm_bytes_per_s": bw, "tokens": args.tokens, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
