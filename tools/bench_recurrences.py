#!/usr/bin/env python
"""The linear recurrences stepped (one position at a time, the decode step's form) against chunked (the form
T > 1 runs): forward + backward seconds over a training sequence.

    PYTHONPATH=python python tools/bench_recurrences.py                   # CPU
    PYTHONPATH=python python tools/bench_recurrences.py --device cuda --json recurrences.json

RWKV-6's wkv6, QRWKV6's gated linear attention and RWKV-7's wkv7 over B=1, H heads of N (default 4 of 64),
Mamba 1's selective scan over `--inner` channels of state `--state` (default 1536, 16); random fp32 inputs
with RWKV-6's decays (log w = -exp(.)), or as RWKV-7's time mix makes them (w = exp(-0.606531 sigmoid(.)),
a = -kk, b = kk · a with kk normed). Each time is the best of `--repeats` runs after one warm-up (the least
disturbed by other work on the machine); the
chunked run's largest relative error (outputs, last state, gradients) against the stepped one is printed
beside it.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from lowtune.model import SCAN_CHUNK, _selective_scan_stepped, selective_scan
from lowtune.rwkv import (DECAY_SCALE, DIAG_DECAY_CHUNK, _gla_stepped, _wkv6_stepped, _wkv7_stepped,
                          gated_linear_attention, wkv6, wkv7)


def inputs_of(name: str, t: int, args, device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    b, h, n = 1, args.heads, args.head_size
    if name == "selective_scan":
        d, s = args.inner, args.state
        xs = [rand(b, t, d), F.softplus(rand(b, t, d)), -torch.exp(rand(d, s)), rand(b, t, s), rand(b, t, s)]
    elif name == "wkv7":
        r, k, v = (rand(b, t, h, n) for _ in range(3))
        w = torch.exp(-DECAY_SCALE * torch.sigmoid(rand(b, t, h, n)))
        kk = F.normalize(rand(b, t, h, n), dim=-1)
        xs = [r, w, k, v, -kk, kk * torch.rand(b, t, h, n, generator=g)]
    else:
        qkv = [rand(b, t, h, n) * n ** -0.5 for _ in range(3)]
        log_w = -torch.exp(rand(b, t, h, n) - 1)
        xs = qkv + ([rand(h, n), log_w] if name == "wkv6" else [log_w])
    return [x.to(device) for x in xs]


def timed(fn, xs: list[torch.Tensor], repeats: int, device: str) -> tuple[float, list[torch.Tensor]]:
    """The best seconds of fn's forward + backward on fresh leaves of xs, and the last run's results."""
    times = []
    for _ in range(repeats + 1):
        leaves = [x.clone().requires_grad_() for x in xs]
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        o, s = fn(*leaves)
        (o.square().sum() + s.square().sum()).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times[1:]), [o.detach(), s.detach()] + [x.grad for x in leaves]


def max_rel_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((a.double() - b.double()).norm() / b.double().norm()) for a, b in zip(got, want))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--rwkv-lengths", default="512,2048", help="sequence lengths of wkv6 and gated linear attention")
    p.add_argument("--mamba-lengths", default="512", help="sequence lengths of the selective scan")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--inner", type=int, default=1536)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--chunk", type=int, help=f"chunk size of wkv6, gated linear attention and the selective scan "
                   f"(default: the functions' own, {DIAG_DECAY_CHUNK} and {SCAN_CHUNK})")
    p.add_argument("--wkv7-chunk", default="32/8", help="wkv7's chunk/block sizes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch's CPU threads (default: its own)")
    p.add_argument("--json", help="write the rows here too")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    chunk = {} if args.chunk is None else {"chunk": args.chunk}
    c7, b7 = map(int, args.wkv7_chunk.split("/"))
    cases = [("wkv6", lambda *a: wkv6(*a, **chunk), _wkv6_stepped, args.rwkv_lengths),
             ("gated_linear_attention", lambda *a: gated_linear_attention(*a, **chunk), _gla_stepped,
              args.rwkv_lengths),
             ("wkv7", lambda *a: wkv7(*a, chunk=c7, block=b7), _wkv7_stepped, args.rwkv_lengths),
             ("selective_scan", lambda *a: selective_scan(*a, **chunk), _selective_scan_stepped, args.mamba_lengths)]
    rows = []
    print(f"{'recurrence':24} {'T':>6} {'stepped s':>10} {'chunked s':>10} {'speed-up':>9} {'max rel err':>12}")
    for name, chunked, stepped, lengths in cases:
        for t in (int(x) for x in lengths.split(",") if x):
            xs = inputs_of(name, t, args, args.device)
            slow, want = timed(stepped, xs, args.repeats, args.device)
            fast, got = timed(chunked, xs, args.repeats, args.device)
            err = max_rel_err(got, want)
            rows.append(dict(recurrence=name, T=t, stepped_s=slow, chunked_s=fast, speedup=slow / fast,
                             max_rel_err=err))
            print(f"{name:24} {t:6} {slow:10.3f} {fast:10.3f} {slow / fast:8.1f}x {err:12.1e}", flush=True)
    if args.json:
        shapes = dict(heads=args.heads, head_size=args.head_size, inner=args.inner, state=args.state,
                      chunk=args.chunk, wkv7_chunk=args.wkv7_chunk, device=args.device, threads=torch.get_num_threads(),
                      gpu=torch.cuda.get_device_name() if args.device == "cuda" else None)
        with open(args.json, "w") as f:
            json.dump(dict(shapes=shapes, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
