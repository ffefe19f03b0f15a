"""Graph-replay timings of the one-row Q4_K products of 7B/8B/70B decode steps: the gemv kernel
(LOWTUNE_CUDA_PATH=gemv) with one and two rows per warp (LOWTUNE_CUDA_GEMV_ROWS) against the
staged kernel (LOWTUNE_CUDA_PATH=staged) and the default choice (cuda_policy's kGemvMinN rule), in
one process, weights rotated past 2x L2 (tools/bench_kernels.py's GraphTimer), after a warm-up;
µs and TB/s per shape and setting, JSON lines to --out.

    python3 tools/gpu/gemv_q4k.py [--out gemv_q4k.jsonl]
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

SHAPES = ["4096x4096", "12288x4096", "22016x4096", "4096x11008", "14336x4096", "4096x14336", "6144x4096",
          "28672x4096", "4096x28672"]
SETTINGS = {"staged": {"LOWTUNE_CUDA_PATH": "staged"}, "default": {},
            "gemv_rows1": {"LOWTUNE_CUDA_PATH": "gemv", "LOWTUNE_CUDA_GEMV_ROWS": "1"},
            "gemv_rows2": {"LOWTUNE_CUDA_PATH": "gemv", "LOWTUNE_CUDA_GEMV_ROWS": "2"}}
KNOBS = ("LOWTUNE_CUDA_PATH", "LOWTUNE_CUDA_GEMV_ROWS")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    for shape in SHAPES:
        n, k = (int(v) for v in shape.split("x"))
        one = random_qtensor("Q4_K", n, k)
        qts = [one] + [random_qtensor("Q4_K", n, k) for _ in range(copies_for(one.nbytes) - 1)]
        x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
        nbytes = one.nbytes + (k + n) * 2
        for name, env in SETTINGS.items():
            for key in KNOBS:
                os.environ.pop(key, None)
            os.environ.update(env)
            us = timer(lambda i: lowtune.qmatmul(x, qts[i % len(qts)]))
            rec = {"shape": shape, "setting": name, "us": us, "tb_s": nbytes / us / 1e6}
            print(f"{shape:>11} {name:>10}: {us:7.2f} us {rec['tb_s']:.2f} TB/s", flush=True)
            if out:
                out.write(json.dumps(rec) + "\n")
        del qts, one
        torch.cuda.empty_cache()
    for key in KNOBS:
        os.environ.pop(key, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
