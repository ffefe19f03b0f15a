#!/usr/bin/env python3
"""Control experiment for the merge-exact gain comparison: how much does a perplexity move when the fp16 mins of the
adapted tensors (the last `layers` decoder layers' linears) move by +-1 ulp at random, in
llama.cpp (llama-cpp-python) and in lowtune (fp32, and with llama.cpp's 8-bit activation rounding)?

    PYTHONPATH=python python3 tools/llamacpp_jitter.py --seeds 0 1 2 3 4 --out tools/results/llamacpp_jitter_cpu.json

Copies of the SmolLM2 Q4_1 GGUF: every min (byte 2..3 of each 20-byte Q4_1 block) of the 14 linears
of blk.28 and blk.29 moved to the next fp16 up or down (random sign per block, np.nextafter), or
with --fraction f only a random fraction f of them; every other byte stays identical (checked).
Held-out texts: Botchan's last 10% (tokenized by lowtune; identical to llama.cpp's tokenizer,
checked), "short" = the first 4 windows of 128 tokens (the tool's 508 scored tokens), "long" =
all 13 windows of 512 (6643 scored tokens).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_methods import DATA, default_smollm2, llamacpp_ppl, split_text  # noqa: E402
from quality_merge_exact import test_tokens  # noqa: E402

from lowtune import _C  # noqa: E402
from lowtune.evaluate import perplexity  # noqa: E402
from lowtune.llamacpp_activations import rounded_like_llamacpp  # noqa: E402
from lowtune.loading import load_model  # noqa: E402

LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def perturb(src: Path, dst: Path, layers: list[int], seed: int, fraction: float) -> int:
    """Copy src to dst with the Q4_1 mins of the named tensors moved by +-1 ulp; returns how many."""
    import gguf
    r = gguf.GGUFReader(str(src))
    buf = np.fromfile(src, dtype=np.uint8)
    rng = np.random.default_rng(seed)
    names = {f"blk.{i}.{n}.weight" for i in layers for n in LINEARS}
    moved = 0
    for t in r.tensors:
        if t.name not in names:
            continue
        assert t.tensor_type.name == "Q4_1", t.name
        nb = t.n_bytes // 20
        off = int(t.data_offset)
        assert bytes(buf[off:off + t.n_bytes]) == bytes(np.asarray(t.data).tobytes())
        blocks = buf[off:off + t.n_bytes].reshape(nb, 20)
        m = blocks[:, 2:4].copy().view(np.float16).reshape(nb)
        up = rng.random(nb) < 0.5
        pick = rng.random(nb) < fraction
        new = np.where(up, np.nextafter(m, np.float16(np.inf)), np.nextafter(m, np.float16(-np.inf)))
        new = np.where(pick, new, m).astype(np.float16)
        moved += int((new.view(np.uint16) != m.view(np.uint16)).sum())
        blocks[:, 2:4] = new.view(np.uint8).reshape(nb, 2)
        buf[off:off + t.n_bytes] = blocks.reshape(-1)
    buf.tofile(dst)
    return moved


def lowtune_ppls(path: Path, sets: dict) -> dict:
    m = load_model(path, device="cpu")
    out = {}
    for name, (ids, ctx) in sets.items():
        out[f"lowtune_{name}"] = perplexity(m, ids, ctx=ctx)["perplexity"]
        with rounded_like_llamacpp():
            out[f"lowtune_q8_{name}"] = perplexity(m, ids, ctx=ctx)["perplexity"]
    del m
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--fraction", type=float, default=1.0)
    ap.add_argument("--layers", nargs="+", type=int, default=[28, 29])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sets", nargs="+", default=["short", "long"])
    ap.add_argument("--no-lowtune", action="store_true")
    ap.add_argument("--no-llamacpp", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _C.set_num_threads(args.threads)
    smol = default_smollm2()
    _, test = split_text((DATA / "botchan.txt").read_text(encoding="utf-8"), 0.1)
    all_sets = {"short": (test_tokens(test, smol, 128, 4), 128), "long": (test_tokens(test, smol, 512, 0), 512)}
    sets = {k: all_sets[k] for k in args.sets}
    work = Path(tempfile.mkdtemp(prefix="jitter-"))
    doc = {"device": f"CPU ({platform.machine()}, {args.threads} threads)", "model": smol.name,
           "layers": args.layers, "fraction": args.fraction,
           "sets": {k: {"ctx": c, "windows": len(t) // c, "scored": len(t) // c * (c - 1)} for k, (t, c) in sets.items()},
           "files": []}
    out = Path(args.out)
    try:
        for seed in [None] + args.seeds:
            t0 = time.perf_counter()
            if seed is None:
                path, moved = smol, 0
            else:
                path = work / f"perturbed-{seed}.gguf"
                moved = perturb(smol, path, args.layers, seed, args.fraction)
                a, b = np.fromfile(smol, dtype=np.uint8), np.fromfile(path, dtype=np.uint8)
                assert a.size == b.size
                ndiff = int((a != b).sum())
            row = {"file": "base" if seed is None else f"perturbed seed {seed}", "mins_moved": moved}
            if seed is not None:
                row["bytes_differing"] = ndiff
            for name, (t, c) in [] if args.no_llamacpp else sets.items():
                row[f"llamacpp_{name}"] = llamacpp_ppl(path, t, c, threads=args.threads)
            if not args.no_lowtune:
                row.update(lowtune_ppls(path, sets))
            row["seconds"] = round(time.perf_counter() - t0, 1)
            doc["files"].append(row)
            base = doc["files"][0]
            print(json.dumps({k: (v if not isinstance(v, float) or seed is None else f"{v / base[k] - 1:+.3e}")
                              for k, v in row.items()}), flush=True)
            out.write_text(json.dumps(doc, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # summary: relative change against the base, per scorer and set
    base = doc["files"][0]
    keys = [k for k in base if k.startswith(("llamacpp_", "lowtune_"))]
    doc["summary"] = {}
    for k in keys:
        rel = [f[k] / base[k] - 1 for f in doc["files"][1:]]
        if rel:
            doc["summary"][k] = {"mean": float(np.mean(rel)), "max_abs": float(np.max(np.abs(rel))),
                                 "std": float(np.std(rel, ddof=1)) if len(rel) > 1 else None}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
