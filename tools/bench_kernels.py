#!/usr/bin/env python3
"""Benchmark lowtune's kernels against dense PyTorch on the same shapes, in the same run.

For each kernel (quantize, dequantize, forward, input_grad), type and shape it prints the median
time, the achieved GB/s and GFLOP/s, a floor (bytes / measured memory bandwidth, FLOPs / measured
dense-matmul peak, whichever is larger; both measured at the start of this run) with our ratio to
it, and the peers timed on the same shape:
  cpu:  torch dense fp32 matmul (x @ W.T for forward, dy @ W for input_grad, W dense fp32)
  cuda: torch dense bf16 matmul on a pre-dequantized weight (cuBLAS), and "dequantize to bf16,
        then torch.matmul" (what a framework without fused kernels does)
quantize and dequantize are timed as kernels (lowtune._C into preallocated buffers: no input
checks, no allocation of fresh pages); forward and input_grad through lowtune.qmatmul /
qmatmul_input_grad, as a model calls them. Output is a markdown table with a header naming the
machine, for BENCHMARKS.md.

    PYTHONPATH=python python tools/bench_kernels.py --device cpu --quick
    PYTHONPATH=python python tools/bench_kernels.py --device cuda --types Q4_K,Q4_0 --ms 1,16,512
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

import lowtune
from lowtune import _C
from lowtune.formats import get_format

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (1024, 4096)]  # N x K (Llama-7B/8B)
MS = [1, 16, 512, 2048]
QUICK_SHAPES, QUICK_MS = [(4096, 4096)], [1, 16, 512]
TYPES = ["Q4_K", "Q4_1", "Q8_0", "IQ4_XS", "IQ3_S", "IQ2_XS"]
KERNELS = ["quantize", "dequantize", "forward", "input_grad"]

# Byte offsets of fp16 scale fields per block, for building weights from random bytes when a
# type has no quantizer in this build (the rest of every block is random codes).
HALF_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
               "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
               "IQ4_NL": (0,), "IQ4_XS": (0,), "IQ3_XXS": (0,), "IQ3_S": (0,), "IQ2_XXS": (0,),
               "IQ2_XS": (0,), "IQ2_S": (0,), "IQ1_S": (0,), "IQ1_M": ()}
# IQ1_M keeps its fp16 d in the top nibbles of the four u16 scale words at this byte offset.
SPLIT_HALF_FIELDS = {"IQ1_M": 48}


# ---- timing ----------------------------------------------------------------------------------------

class Timer:
    """Median wall time of fn() in ms: warmup, then reps until min_time has passed (3..max_reps).
    On CUDA, CUDA events around each call."""

    def __init__(self, device: str, min_time: float, max_reps: int):
        self.cuda = device == "cuda"
        self.min_time, self.max_reps = min_time, max_reps

    def __call__(self, fn) -> float:
        fn()
        fn()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < 3 or (time.perf_counter() - start < self.min_time and len(times) < self.max_reps):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)


def measure_bandwidth(device: str, timer: Timer) -> float:
    """Bytes/s of a large copy (read + write), the memory-bound floor's denominator."""
    n = (256 << 20) // 4 if device == "cpu" else (1 << 30) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3)


def measure_peak(device: str, timer: Timer, dtype: torch.dtype) -> float:
    """FLOP/s of a large dense matmul in `dtype`, the compute-bound floor's denominator."""
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = timer(lambda: torch.mm(a, b))
    return 2 * n ** 3 / (ms * 1e-3)


# ---- data ------------------------------------------------------------------------------------------

def make_weight(name: str, n: int, k: int, rng: np.random.Generator) -> tuple[lowtune.QTensor, bool]:
    """A QTensor of Gaussian weights quantized by lowtune (True), or, for a type this build
    cannot quantize, random code bytes with fp16 scales of sane magnitude (False)."""
    w = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32) * 0.02)
    try:
        return lowtune.quantize(w, name), True
    except (RuntimeError, NotImplementedError, ValueError):  # ValueError: needs an importance matrix
        fmt = get_format(name)
        raw = rng.integers(0, 256, size=(n * k // fmt.block_elems, fmt.block_bytes), dtype=np.uint8)
        for off in HALF_FIELDS.get(fmt.name, (0, 2)):
            halves = (rng.uniform(1e-4, 2e-3, size=raw.shape[0])).astype("<f2")
            raw[:, off:off + 2] = halves.view(np.uint8).reshape(-1, 2)
        if fmt.name in SPLIT_HALF_FIELDS:
            off = SPLIT_HALF_FIELDS[fmt.name]
            d = rng.uniform(1e-4, 2e-3, size=(raw.shape[0], 1)).astype("<f2").view(np.uint16)
            words = np.ascontiguousarray(raw[:, off:off + 8]).view("<u2")
            words = (words & 0x0FFF) | (((d >> (4 * np.arange(4, dtype=np.uint16))) & 0xF) << 12)
            raw[:, off:off + 8] = words.astype("<u2").view(np.uint8)
        return lowtune.QTensor.from_raw(torch.from_numpy(raw.reshape(n, -1)), name, (n, k)), False


def nonzero(*ts: torch.Tensor) -> None:
    for t in ts:
        assert bool(t.abs().sum() > 0), "refusing to time on all-zero data"


# ---- the table ---------------------------------------------------------------------------------

def fmt_ms(v) -> str:
    if v is None:
        return "—"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def machine_line(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        cpu = f"{info.get('Model name', cpu).strip()}, {info.get('CPU(s)', '?').strip()} CPUs"
    except (OSError, subprocess.CalledProcessError):
        pass
    parts = [f"date {datetime.date.today().isoformat()}", f"CPU {cpu}", f"torch {torch.__version__}",
             f"torch threads {torch.get_num_threads()}", f"lowtune threads {_C.num_threads()}",
             f"lowtune CPU kernels {_C.build_info().get('cpu_isa', '?')}"]
    if device == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name()}")
    return "; ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES}, M in {QUICK_MS}")
    ap.add_argument("--types", default=",".join(TYPES), help="comma-separated, e.g. Q4_K,Q4_1,INT4-g64")
    ap.add_argument("--shapes", help="comma-separated NxK, e.g. 4096x4096,11008x4096")
    ap.add_argument("--ms", help="comma-separated batch rows M, e.g. 1,16,512")
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds of repetitions per measurement")
    ap.add_argument("--max-reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch and lowtune (0: default)")
    args = ap.parse_args(argv)

    device = args.device
    if device == "cuda" and not (torch.cuda.is_available() and _C.cuda_available()):
        print("no CUDA device, or lowtune built without CUDA", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
        _C.set_num_threads(args.threads)
    shapes = ([tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")] if args.shapes
              else QUICK_SHAPES if args.quick else SHAPES)
    ms = [int(v) for v in args.ms.split(",")] if args.ms else QUICK_MS if args.quick else MS
    types = [get_format(t).name for t in args.types.split(",")]
    kernels = args.kernels.split(",")
    act = torch.float32 if device == "cpu" else torch.bfloat16
    timer = Timer(device, args.min_time, args.max_reps)
    rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))

    bandwidth = measure_bandwidth(device, timer)
    peak = measure_peak(device, timer, act)
    print(f"{machine_line(device)}")
    print(f"measured: copy bandwidth {bandwidth / 1e9:.1f} GB/s, dense {str(act).split('.')[1]} matmul "
          f"{peak / 1e9:.0f} GFLOP/s; activations {str(act).split('.')[1]}; times are medians in ms\n")
    peer_cols = ["torch fp32 ms", "ours/torch"] if device == "cpu" else \
        ["cuBLAS bf16 ms", "ours/cuBLAS", "deq+matmul ms"]
    print("| kernel | type | N×K | M | ms | GB/s | GFLOP/s | floor ms | ×floor | " + " | ".join(peer_cols) + " |")
    print("|" + "---|" * (9 + len(peer_cols)))

    def row(kernel, name, n, k, m, t, nbytes, flops, peers):
        floor = max(nbytes / bandwidth, flops / peak) * 1e3
        cells = [kernel, name, f"{n}×{k}", "—" if m is None else str(m), fmt_ms(t), f"{nbytes / t / 1e6:.1f}",
                 f"{flops / t / 1e6:.1f}" if flops else "—", fmt_ms(floor), f"{t / floor:.2f}"]
        print("| " + " | ".join(cells + peers) + " |", flush=True)

    for n, k in shapes:
        w_dense = torch.randn(n, k, device=device) * 0.02
        for name in types:
            fmt = get_format(name)
            qt, quantizable = make_weight(name, n, k, rng)
            qt = qt.to(device)
            wbytes = qt.nbytes
            if "quantize" in kernels and quantizable:
                src = w_dense.cpu()
                raw = torch.empty(n, fmt.row_bytes(k), dtype=torch.uint8)
                t = timer(lambda: _C.quantize(fmt.type_id, src.data_ptr(), raw.data_ptr(), n, k))
                row("quantize", name, n, k, None, t, n * k * 4 + wbytes, 0, ["—"] * len(peer_cols))
            if "dequantize" in kernels:
                out = torch.empty(n, k, dtype=act, device=device)
                dt = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[act]
                if device == "cpu":
                    deq_kernel = lambda: _C.dequantize(fmt.type_id, qt.raw.data_ptr(), out.data_ptr(), dt, n, k)  # noqa: E731
                else:
                    stream = torch.cuda.current_stream().cuda_stream
                    deq_kernel = lambda: _C.cuda_dequantize(fmt.type_id, qt.raw.data_ptr(), out.data_ptr(), dt, n, k, stream)  # noqa: E731
                t = timer(deq_kernel)
                row("dequantize", name, n, k, None, t, wbytes + n * k * act.itemsize, 0, ["—"] * len(peer_cols))
                del out
            if not ({"forward", "input_grad"} & set(kernels)):
                continue
            w_peer = lowtune.dequantize(qt, torch.float32 if device == "cpu" else torch.bfloat16)
            nonzero(w_peer)
            for m in ms:
                x = torch.randn(m, k, device=device).to(act)
                dy = torch.randn(m, n, device=device).to(act)
                nonzero(x, dy)
                flops = 2 * m * n * k
                for kernel in ("forward", "input_grad"):
                    if kernel not in kernels:
                        continue
                    if kernel == "forward":
                        ours = lambda: lowtune.qmatmul(x, qt)  # noqa: E731
                        dense = lambda: torch.mm(x, w_peer.t())  # noqa: E731
                        deq = lambda: torch.mm(x, lowtune.dequantize(qt, torch.bfloat16).t())  # noqa: E731
                        io = (m * k + m * n) * act.itemsize
                    else:
                        ours = lambda: lowtune.qmatmul_input_grad(dy, qt)  # noqa: E731
                        dense = lambda: torch.mm(dy, w_peer)  # noqa: E731
                        deq = lambda: torch.mm(dy, lowtune.dequantize(qt, torch.bfloat16))  # noqa: E731
                        io = (m * n + m * k) * act.itemsize
                    t = timer(ours)
                    t_dense = timer(dense)
                    peers = [fmt_ms(t_dense), f"{t / t_dense:.2f}"]
                    if device == "cuda":
                        peers.append(fmt_ms(timer(deq)))
                    row(kernel, name, n, k, m, t, wbytes + io, flops, peers)
            del w_peer
    return 0


if __name__ == "__main__":
    sys.exit(main())
