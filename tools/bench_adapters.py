#!/usr/bin/env python
"""One adapted layer's forward+backward against the bare quantized layer's.

    PYTHONPATH=python python tools/bench_adapters.py            # CUDA: M=2048, 4096x4096 Q4_K, r=64, bf16
    PYTHONPATH=python python tools/bench_adapters.py --device cpu --m 64 --k 512 --n 512 --rank 8

For each method it times the step with lowtune's fused kernels and the same step in unfused torch
ops (pool, A, B, repeat_interleave, scale, add: the PEFT way), as milliseconds and as a multiple
of the bare quantized layer (qmatmul forward + input gradient). The peer row is the same layer as
a dense bf16 matrix (cuBLAS). The base weights are random Q4_K blocks: timing does not depend on
their values. --profile prints the kernels of one step of the bare layer and of each method.

On CUDA every step is timed twice: eagerly (host dispatch included, as before), and as GPU work
alone: --graph-steps steps captured in one CUDA graph and replayed, the time per step the median
over --iters replays. The target is an adapted layer within 1.15x of the bare one in the latter.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import numpy as np
import torch

import lowtune
from lowtune import ops
from lowtune.adapters import METHODS, AdaptedLinear, AdapterConfig, quant_group

# Byte offsets of each block's fp16 scale (and min) fields, per format.
_FP16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
                "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_qtensor(qtype: str, n: int, k: int) -> lowtune.QTensor:
    """Valid blocks of any quantized type from random bytes with small fp16 scales and mins."""
    fmt = lowtune.get_format(qtype)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(n, k // fmt.block_elems, fmt.block_bytes), dtype=np.uint8)
    for j, off in enumerate(_FP16_FIELDS.get(fmt.name, (0, 2))):
        vals = (rng.uniform(0.002, 0.01, raw.shape[:2]) * (1 if j == 0 else -4)).astype(np.float16)
        raw[:, :, off:off + 2] = vals.view(np.uint8).reshape(*raw.shape[:2], 2)
    return lowtune.QTensor.from_raw(raw.reshape(n, -1), fmt, (n, k))


class QLinear(torch.nn.Module):
    def __init__(self, qt):
        super().__init__()
        self.weight = qt

    def forward(self, x):
        return ops.qmatmul(x, self.weight)


def timed(fn, device: str, iters: int, warmup: int) -> float:
    """Median milliseconds of fn() over iters runs."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    else:
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def graph_timed(fn, steps: int, replays: int) -> float:
    """Milliseconds per fn() as pure GPU work: `steps` calls captured in one CUDA graph, the
    median over `replays` replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(steps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / steps)
    del graph
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--m", type=int, default=2048, help="rows (tokens) of x")
    ap.add_argument("--k", type=int, default=4096, help="input features")
    ap.add_argument("--n", type=int, default=4096, help="output features")
    ap.add_argument("--type", default="Q4_K", help="base quantization type")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--graph-steps", type=int, default=20, help="CUDA: steps per captured graph")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--profile", action="store_true",
                    help="print the kernels of one step of the bare layer and of each method")
    args = ap.parse_args()

    dev, dtype = args.device, getattr(torch, args.dtype)
    graphs = dev == "cuda"
    qt = random_qtensor(args.type, args.n, args.k).to(dev)
    torch.manual_seed(0)
    x = torch.randn(args.m, args.k, device=dev, dtype=dtype, requires_grad=True)
    dy = torch.randn(args.m, args.n, device=dev, dtype=dtype)

    def step(f, params=()):
        def run():
            x.grad = None
            for p in params:
                p.grad = None
            f(x).backward(dy)
        return run

    def gpu_step(f, params=()):
        # autograd.grad, not .backward(): nothing accumulates into .grad across captured steps
        return lambda: torch.autograd.grad(f(x), [x, *params], dy)

    def measure(f, params=()):
        eager = timed(step(f, params), dev, args.iters, args.warmup)
        return eager, graph_timed(gpu_step(f, params), args.graph_steps, args.iters) if graphs else None

    rows = []
    bare, bare_g = measure(lambda t: ops.qmatmul(t, qt))
    w_dense = lowtune.dequantize(qt, dtype)
    dense, dense_g = measure(lambda t: t @ w_dense.t())
    del w_dense

    for method in args.methods.split(","):
        cfg = AdapterConfig(method=method, rank=args.rank, alpha=16)
        ad = AdaptedLinear(QLinear(qt), cfg)
        with torch.no_grad():  # non-zero adapters: the same work as mid-training
            for p in ad.parameters():
                p.normal_(0, 0.01)
        params = list(ad.parameters())
        fused, fused_g = measure(ad, params)
        unfused, unfused_g = measure(lambda t: ad.base(t) + ad.reference_adapter(t), params)
        g = ad.geometry()
        row = {"method": method, "pool": g.pool, "repeat": g.repeat, "rank": g.rank,
               "params": ad.num_adapter_parameters, "fused_ms": fused, "unfused_ms": unfused,
               "fused_x": fused / bare, "unfused_x": unfused / bare}
        if graphs:
            row.update(fused_graph_ms=fused_g, unfused_graph_ms=unfused_g, fused_graph_x=fused_g / bare_g,
                       unfused_graph_x=unfused_g / bare_g)
        rows.append(row)

    name = torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or platform.machine()
    print(f"# lowtune adapters: {name}, torch {torch.__version__}, {datetime.date.today()}")
    print(f"# x [{args.m}, {args.k}] {args.dtype}, base {args.type} [{args.n}, {args.k}] "
          f"(group {quant_group(qt.format)}), rank {args.rank}; forward + backward, median of {args.iters}"
          + (f"; graph: {args.graph_steps} steps per CUDA graph replay (GPU work only)" if graphs else ""))
    g_head = f"{'graph ms':>10}{'x bare':>8}" if graphs else ""
    print(f"{'':22}{'ms':>9}{'x bare':>9}{g_head}")
    g_cell = lambda v, ref: f"{v:10.3f}{v / ref:8.3f}" if graphs else ""  # noqa: E731
    print(f"{'bare quantized layer':22}{bare:9.3f}{1:9.2f}{g_cell(bare_g, bare_g) if graphs else ''}")
    print(f"{'dense bf16 (cuBLAS)' if dev == 'cuda' else 'dense (torch)':22}{dense:9.3f}{dense / bare:9.2f}"
          f"{g_cell(dense_g, bare_g) if graphs else ''}")
    print()
    print(f"{'method':10}{'pool':>5}{'rep':>4}{'rank':>6}{'params':>10}{'fused ms':>10}{'x bare':>8}"
          f"{'unfused ms':>12}{'x bare':>8}" + (f"{'fused graph ms':>16}{'x bare':>8}{'unfused graph':>15}{'x bare':>8}" if graphs else ""))
    for r in rows:
        line = (f"{r['method']:10}{r['pool']:5d}{r['repeat']:4d}{r['rank']:6d}{r['params']:10d}"
                f"{r['fused_ms']:10.3f}{r['fused_x']:8.3f}{r['unfused_ms']:12.3f}{r['unfused_x']:8.3f}")
        if graphs:
            line += (f"{r['fused_graph_ms']:16.3f}{r['fused_graph_x']:8.3f}{r['unfused_graph_ms']:15.3f}"
                     f"{r['unfused_graph_x']:8.3f}")
        print(line)
    if args.json:
        recorded = {k: v for k, v in vars(args).items() if k != "json"}  # not where this machine wrote it
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "date": str(datetime.date.today()),
                       "args": recorded, "bare_ms": bare, "dense_ms": dense, "bare_graph_ms": bare_g,
                       "dense_graph_ms": dense_g, "rows": rows}, f, indent=2)

    if args.profile:  # the kernels of one step of the bare layer and of each method, GPU time first
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
        key = "self_device_time_total" if dev == "cuda" else "self_cpu_time_total"
        layers = [("bare", lambda t: ops.qmatmul(t, qt), [])]
        for method in args.methods.split(","):
            ad = AdaptedLinear(QLinear(qt), AdapterConfig(method=method, rank=args.rank, alpha=16))
            layers.append((method, ad, list(ad.parameters())))
        for label, f, params in layers:
            run = step(f, params)
            run()
            with torch.profiler.profile(activities=acts) as prof:
                run()
                if dev == "cuda":
                    torch.cuda.synchronize()
            print(f"\n# profile of one {label} step")
            print(prof.key_averages().table(sort_by=key, row_limit=20))

if __name__ == "__main__":
    main()
