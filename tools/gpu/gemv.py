"""Graph-replay timings of one-row products (decoding): the gemv kernel (LOWTUNE_CUDA_PATH=gemv)
against the staged kernel (LOWTUNE_CUDA_PATH=staged), the gemv with one or two rows a warp forced
(LOWTUNE_CUDA_GEMV_ROWS), K split over a cluster of two CTAs or not (LOWTUNE_CUDA_GEMV_SPLIT) and the
default choice (cuda_policy), the streamed kernel off or at one to three CTAs an SM
(LOWTUNE_CUDA_GEMV_STREAM), per type, on the shapes of 7B/8B decode steps, in one process, weights
rotated past 2x L2 (tools/bench_kernels.py's GraphTimer), after a warm-up; µs and TB/s per shape,
type and setting, JSON lines to --out.

    python3 tools/gpu/gemv.py [--types Q4_K,Q4_0] [--out gemv.jsonl]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import lowtune  # noqa: E402
from bench_kernels import GraphTimer, copies_for, random_qtensor  # noqa: E402

FOUR_BIT = ["Q4_K", "Q4_0", "Q4_1", "INT4-g64"]
OTHERS = ["Q2_K", "Q3_K", "Q5_K", "Q6_K", "Q8_0", "Q5_0", "INT2-g64", "INT3-g128", "INT8-g32"]
DECODE_SHAPES = ["4096x4096", "12288x4096", "22016x4096", "4096x11008", "14336x4096", "4096x14336"]
FEW_SHAPES = ["4096x4096", "14336x4096", "4096x14336"]
_GEMV = {"LOWTUNE_CUDA_PATH": "gemv"}
SETTINGS = {"staged": {"LOWTUNE_CUDA_PATH": "staged"}, "default": {}, "gemv": _GEMV,
            # rows a warp forced (gemv: cuda_policy::gemv_rows_per_warp chooses)
            "gemv_rows1": {**_GEMV, "LOWTUNE_CUDA_GEMV_ROWS": "1"},
            "gemv_rows2": {**_GEMV, "LOWTUNE_CUDA_GEMV_ROWS": "2"},
            # K split over a cluster of two CTAs off / forced where it fits (cuda_policy::gemv_split_k)
            "gemv_split1": {**_GEMV, "LOWTUNE_CUDA_GEMV_SPLIT": "1"},
            "gemv_split2": {**_GEMV, "LOWTUNE_CUDA_GEMV_SPLIT": "2"},
            # the streamed kernel (weights through bulk copies) at one to three CTAs an SM, or off
            "stream1": {**_GEMV, "LOWTUNE_CUDA_GEMV_STREAM": "1"},
            "stream2": {**_GEMV, "LOWTUNE_CUDA_GEMV_STREAM": "2"},
            "stream3": {**_GEMV, "LOWTUNE_CUDA_GEMV_STREAM": "3"},
            "stream0": {**_GEMV, "LOWTUNE_CUDA_GEMV_STREAM": "0"}}
KNOBS = ("LOWTUNE_CUDA_PATH", "LOWTUNE_CUDA_GEMV_ROWS", "LOWTUNE_CUDA_GEMV_SPLIT", "LOWTUNE_CUDA_GEMV_STREAM")

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default=",".join(FOUR_BIT + OTHERS))
    ap.add_argument("--settings", default=",".join(SETTINGS), help="which of " + ", ".join(SETTINGS))
    ap.add_argument("--shapes", help="NxK,... for every type (default: the decode shapes)")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    timer = GraphTimer(target_ms=2.0, reps=5)
    x0 = torch.randn(1, 4096, device="cuda").to(torch.bfloat16)
    w0 = random_qtensor("Q4_K", 4096, 4096)
    t = time.time()
    while time.time() - t < 1.0:  # clocks up
        lowtune.qmatmul(x0, w0)
    torch.cuda.synchronize()
    out = open(a.out, "a") if a.out else None
    for qtype in a.types.split(","):
        shapes = a.shapes.split(",") if a.shapes else DECODE_SHAPES if qtype in FOUR_BIT else FEW_SHAPES
        for shape in shapes:
            n, k = (int(v) for v in shape.split("x"))
            one = random_qtensor(qtype, n, k)
            qts = [one] + [random_qtensor(qtype, n, k) for _ in range(copies_for(one.nbytes) - 1)]
            x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
            nbytes = one.nbytes + (k + n) * 2
            for name in a.settings.split(","):
                env = SETTINGS[name]
                for key in KNOBS:
                    os.environ.pop(key, None)
                os.environ.update(env)
                us = timer(lambda i: lowtune.qmatmul(x, qts[i % len(qts)]))
                rec = {"type": qtype, "shape": shape, "setting": name, "us": us, "tb_s": nbytes / us / 1e6}
                print(f"{qtype:>9} {shape:>11} {name:>9}: {us:7.2f} us {rec['tb_s']:.2f} TB/s", flush=True)
                if out:
                    out.write(json.dumps(rec) + "\n")
            qts = one = None  # freed before the next shape's copies
            torch.cuda.empty_cache()
    for key in KNOBS:
        os.environ.pop(key, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
