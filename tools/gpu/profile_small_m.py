"""Runs lowtune's small-M CUDA products a few times each, for Nsight Compute to profile.

    ncu --clock-control none --kernel-name regex:staged --launch-skip 1 --launch-count 1 \
        python3 tools/gpu/profile_small_m.py --type Q4_K --shape 14336x4096 --m 1 --kernel forward

Each entry runs `--calls` times (the first warms up; ncu's --launch-skip skips it). With
--time, the entry is also timed by CUDA-graph replay over weight copies rotated past 2x L2, as
tools/bench_kernels.py does, so a profile and its timing come from one process.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import lowtune  # noqa: E402
from bench_kernels import GraphTimer, copies_for, random_qtensor  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--type", default="Q4_K")
    ap.add_argument("--shape", default="14336x4096", help="NxK")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--kernel", choices=["forward", "input_grad"], default="forward")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--time", action="store_true", help="also time by graph replay (run without ncu)")
    a = ap.parse_args(argv)
    n, k = (int(v) for v in a.shape.lower().split("x"))
    w = random_qtensor(a.type, n, k)
    x = torch.randn(a.m, k, device="cuda").to(torch.bfloat16)
    dy = torch.randn(a.m, n, device="cuda").to(torch.bfloat16)
    fn = (lambda q: lowtune.qmatmul(x, q)) if a.kernel == "forward" else (lambda q: lowtune.qmatmul_input_grad(dy, q))
    for _ in range(a.calls):
        fn(w)
    torch.cuda.synchronize()
    if a.time:
        qts = [w] + [random_qtensor(a.type, n, k) for _ in range(copies_for(w.nbytes) - 1)]
        us = GraphTimer()(lambda i: fn(qts[i % len(qts)]))
        io = (a.m * k + a.m * n) * 2
        print(f"{a.kernel} {a.type} {n}x{k} M={a.m}: {us:.2f} us, {(w.nbytes + io) / us / 1e6:.2f} TB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
