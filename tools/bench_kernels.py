#!/usr/bin/env python3
"""Benchmark lowtune's kernels against their peers on the same shapes, in the same run.

CUDA (--device cuda) times kernels, not calls: each entry is many calls captured into one CUDA
graph and replayed (median replay time / calls), the calls rotating over enough copies of the
weight to exceed twice the L2 (so the weight streams from memory), after a warm-up of large
matrix products that raises the clocks. Each row gives µs per call, the fraction of the memory
bandwidth it reaches (weight + activation + output bytes / time, over the read bandwidth of a
1 GiB sum measured at the start) and of the bf16 peak (a large cuBLAS
product measured at the start). Ours is timed on each path the dispatch can take for that shape
(LOWTUNE_CUDA_PATH: staged, direct, cublas) and, above 32 rows, on variants of the chunked
cuBLAS path (side-stream overlap, chunk size). Peers, same shapes, same run:
  cublas_bf16   torch.matmul on a bf16 weight (rotated copies too)
  deq_mm        lowtune.dequantize to bf16, then torch.matmul (what a framework without fused
                kernels does)
  tinygemm      torch._weight_int4pack_mm (4-bit, group 64: the bytes of INT4-g64), forward only
  bnb_nf4       bitsandbytes' 4-bit matmul (nf4, block 64), forward, where bitsandbytes is installed
Every quantized format lowtune knows is a valid --types entry ("all" = every one), so new types
appear without edits here. Rows go to --out as JSON lines; --summary FILE... prints the tables
and the targets from such files. --decode times greedy decoding of a random 7B-shaped Llama
(every matrix Q4_K, or --decode-type) against its bytes-per-token roofline, with and without what
a decode step adds to the layers (DECODE_VARIANTS: CUDA graphs, grouped products, steps chained on
the device).

CPU (--device cpu) keeps the simple timer: median of repeated synchronous calls, dense fp32
torch as the peer.

    PYTHONPATH=python python tools/bench_kernels.py --device cpu --quick
    PYTHONPATH=python python tools/bench_kernels.py --device cuda --types Q4_K,INT4-g64 --ms 1,16 --out k.jsonl
    PYTHONPATH=python python tools/bench_kernels.py --device cuda --decode --out decode.jsonl
    PYTHONPATH=python python tools/bench_kernels.py --summary k.jsonl decode.jsonl
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
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
from lowtune.formats import FORMATS, get_format
from lowtune.generate import StepDecoder
from lowtune.model import Model, ModelConfig

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (11008, 4096), (4096, 11008)]  # N x K (Llama-7B/8B)
MS = [1, 16, 2048]
QUICK_SHAPES, QUICK_MS = [(4096, 4096)], [1, 16, 512]
TYPES = ["Q4_0", "Q4_1", "Q4_K", "INT4-g64", "IQ4_XS"]
CPU_TYPES = ["Q4_K", "Q4_1", "Q8_0", "IQ4_XS", "IQ3_S", "IQ2_XS"]
KERNELS = ["quantize", "dequantize", "forward", "input_grad"]
PEERS = ["cublas_bf16", "deq_mm", "tinygemm", "bnb_nf4"]
# Variants of our chunked cuBLAS path (M > 32): environment for each.
LARGE_VARIANTS = {
    "overlap": {},                                                     # the default: 16 MiB chunks, side stream
    "serial": {"LOWTUNE_CUDA_OVERLAP": "0"},                           # same chunks, one stream
    "chunk64": {"LOWTUNE_CUDA_CHUNK_MB": "64"},                        # bigger chunks, side stream
    "whole": {"LOWTUNE_CUDA_CHUNK_MB": "100000", "LOWTUNE_CUDA_OVERLAP": "0"},  # one pass, then one GEMM
}

# Byte offsets of the fp16 scale fields per block, for weights built from random bytes (the rest
# of every block is random codes). A format not listed has its fp16 scale at offset 0.
HALF_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
               "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
               "IQ4_NL": (0,), "IQ4_XS": (0,), "IQ3_XXS": (0,), "IQ3_S": (0,), "IQ2_XXS": (0,),
               "IQ2_XS": (0,), "IQ2_S": (0,), "IQ1_S": (0,), "IQ1_M": (), "MXFP4": (), "NVFP4": (),
               "TQ1_0": (52,), "TQ2_0": (64,), "Q1_0": (0,), "Q2_0": (0,)}
# IQ1_M keeps its fp16 d in the top nibbles of the four u16 scale words at this byte offset.
SPLIT_HALF_FIELDS = {"IQ1_M": 48}
# Byte offsets of E8M0 scale bytes (level unit 2^(e - 128)), set to sane powers of two.
E8M0_FIELDS = {"MXFP4": (0,)}
# Byte offsets of unsigned E4M3 scale bytes, set to sane values (subnormals: half value 2^-10..7 * 2^-10).
UE4M3_FIELDS = {"NVFP4": (0, 1, 2, 3)}


def quant_type_names() -> list[str]:
    return sorted(f.name for f in FORMATS.values() if f.quantized)


def parse_types(spec: str) -> list[str]:
    if spec == "all":
        return quant_type_names()
    return [get_format(t).name for t in spec.split(",")]


# ---- CPU timing (synchronous calls) ------------------------------------------------------------

class Timer:
    """Median wall time of fn() in ms: warmup, then reps until min_time has passed (3..max_reps)."""

    def __init__(self, min_time: float, max_reps: int):
        self.min_time, self.max_reps = min_time, max_reps

    def __call__(self, fn) -> float:
        fn()
        fn()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < 3 or (time.perf_counter() - start < self.min_time and len(times) < self.max_reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)


# ---- CUDA timing (graph replay) ------------------------------------------------------------------

class GraphTimer:
    """µs per call of fn(i) (i: the call's index, for rotating inputs). A few eager calls on a
    side stream first (one-time set-up stays out of the capture, and give a first estimate), then
    enough calls for ~target_ms captured into one CUDA graph; median of `reps` replays / calls."""

    def __init__(self, target_ms: float = 2.0, reps: int = 5):
        self.target_ms, self.reps = target_ms, reps

    def __call__(self, fn) -> float:
        cur = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(cur)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(side):
            fn(0)
            fn(1)
            e0.record()
            for i in range(3):
                fn(i)
            e1.record()
        e1.synchronize()
        cur.wait_stream(side)
        est_ms = max(e0.elapsed_time(e1) / 3, 1e-3)
        calls = int(min(max(self.target_ms / est_ms, 3), 3000))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls):
                fn(i)
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.reps):
            e0.record()
            graph.replay()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1))
        del graph
        return statistics.median(times) * 1e3 / calls


@contextlib.contextmanager
def env(values: dict):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def l2_bytes() -> int:
    return int(getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 64 << 20))


def copies_for(nbytes: int) -> int:
    """Copies of an operand of nbytes to rotate through: together more than twice the L2."""
    return max(2, math.ceil(2 * l2_bytes() / max(nbytes, 1)) + 1)


def measure_ceilings(timer: GraphTimer, warm_s: float) -> dict:
    """Warm-up, then the bf16 matmul peak (FLOP/s), the read bandwidth (a 1 GiB sum: bytes read/s,
    what a small-M product needs) and the copy bandwidth (read + write bytes/s). Both bandwidths by
    kernels: a plain device-to-device copy_ becomes a memcpy node in a graph, which the copy
    engines run at ~2/3 of what the SMs reach."""
    n = 8192
    a = torch.randn(n, n, device="cuda").to(torch.bfloat16)
    b = torch.randn(n, n, device="cuda").to(torch.bfloat16)
    end = time.time() + warm_s
    while time.time() < end:
        for _ in range(10):
            torch.mm(a, b)
        torch.cuda.synchronize()
    peak = 2 * n ** 3 / (timer(lambda i: torch.mm(a, b)) * 1e-6)
    src = torch.randn(1 << 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    acc = torch.empty((), device="cuda")
    read = src.numel() * 4 / (timer(lambda i: torch.sum(src, dim=0, out=acc)) * 1e-6)
    copy = 2 * src.numel() * 4 / (timer(lambda i: torch.add(src, 0.0, out=dst)) * 1e-6)
    del a, b, src, dst
    torch.cuda.empty_cache()
    return {"peak_flops": peak, "read_bw": read, "copy_bw": copy}


def random_qtensor(name: str, n: int, k: int) -> lowtune.QTensor:
    """Random block bytes on the GPU with finite fp16 scales of sane size at the scale fields."""
    fmt = get_format(name)
    nb = k // fmt.block_elems
    raw = torch.randint(0, 256, (n, nb, fmt.block_bytes), dtype=torch.uint8, device="cuda")
    for off in HALF_FIELDS.get(fmt.name, (0,)):
        halves = (torch.rand(n, nb, device="cuda") * 2e-3 + 1e-4).to(torch.float16)
        raw[:, :, off:off + 2] = halves.view(torch.uint8).view(n, nb, 2)
    for off in E8M0_FIELDS.get(fmt.name, ()):
        raw[:, :, off] = torch.randint(114, 119, (n, nb), dtype=torch.uint8, device="cuda")  # 2^-14..2^-10
    for off in UE4M3_FIELDS.get(fmt.name, ()):
        raw[:, :, off] = torch.randint(1, 8, (n, nb), dtype=torch.uint8, device="cuda")
    return lowtune.QTensor.from_raw(raw.view(n, nb * fmt.block_bytes), fmt.name, (n, k))


def nonzero(*ts: torch.Tensor) -> None:
    for t in ts:
        assert bool(t.float().abs().sum() > 0), "refusing to time on all-zero data"


def tinygemm_peer(n: int, k: int, group: int = 64):
    """(fn(x) -> y, weight bytes) for torch's int4 tinygemm, or None where it is unavailable."""
    try:
        w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
        packed = None
        for tiles in (8, 4, 2):
            try:
                packed = torch._convert_weight_to_int4pack(w, tiles)
                break
            except RuntimeError:
                continue
        if packed is None:
            return None
        scales = (torch.rand(k // group, n, 2, device="cuda") * 0.01 + 1e-3).to(torch.bfloat16)
        fn = lambda x: torch._weight_int4pack_mm(x, packed, group, scales)  # noqa: E731
        fn(torch.randn(1, k, device="cuda", dtype=torch.bfloat16))
        return fn, packed.numel() * packed.element_size() + scales.numel() * 2
    except (RuntimeError, AttributeError, TypeError):
        return None


def bnb_peer(n: int, k: int):
    """(fn(x) -> y, weight bytes) for bitsandbytes' nf4 matmul, or None where not installed."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf
    except ImportError:
        return None
    try:
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        q, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        fn = lambda x: bnb.matmul_4bit(x, q.t(), quant_state=state)  # noqa: E731
        fn(torch.randn(1, k, device="cuda", dtype=torch.bfloat16))
        return fn, q.numel() * q.element_size() + state.absmax.numel() * state.absmax.element_size()
    except Exception:  # noqa: BLE001 - an optional peer; any failure just leaves it out
        return None


def our_variants(m: int, kernel: str) -> dict[str, dict]:
    """Named environments to time our call under, for M rows."""
    if m <= 16:
        gemv = {"gemv": {"LOWTUNE_CUDA_PATH": "gemv"}} if m == 1 else {}
        regs = {"regs": {"LOWTUNE_CUDA_PATH": "regs"}} if kernel == "forward" else {}
        return {**gemv, **regs, "staged": {"LOWTUNE_CUDA_PATH": "staged"}, "direct": {"LOWTUNE_CUDA_PATH": "direct"}}
    if m <= 32 and kernel == "forward":
        return {"direct": {"LOWTUNE_CUDA_PATH": "direct"}, "cublas": {"LOWTUNE_CUDA_PATH": "cublas"}}
    return dict(LARGE_VARIANTS)


def run_cuda(args) -> int:
    if not (torch.cuda.is_available() and _C.cuda_available()):
        print("no CUDA device, or lowtune built without CUDA", file=sys.stderr)
        return 2
    out = open(args.out, "a") if args.out else None

    def emit(rec: dict) -> None:
        if out:
            out.write(json.dumps(rec) + "\n")
            out.flush()

    timer = GraphTimer(args.target_ms, args.reps)
    ceil = measure_ceilings(timer, args.warmup_s)
    bw, peak = ceil["read_bw"], ceil["peak_flops"]
    info = {"kind": "machine", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "l2_bytes": l2_bytes(),
            "sms": torch.cuda.get_device_properties(0).multi_processor_count, **ceil,
            "build": {k: str(v) for k, v in _C.build_info().items()}}
    emit(info)
    print(f"{info['gpu']}, torch {info['torch']}; read bandwidth {bw / 1e12:.2f} TB/s, copy "
          f"{ceil['copy_bw'] / 1e12:.2f} TB/s (read + write), "
          f"bf16 peak {peak / 1e12:.0f} TFLOP/s; L2 {info['l2_bytes'] >> 20} MiB", flush=True)
    if args.decode:
        bench_decode(args, bw, emit)
        return 0

    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    ms = [int(v) for v in args.ms.split(",")] if args.ms else MS
    types = parse_types(args.types)
    kernels = [k for k in args.kernels.split(",") if k in ("forward", "input_grad")]
    peers = set(args.peers.split(",")) if args.peers else set()
    paths = set(args.paths.split(",")) if args.paths else set()
    act = torch.bfloat16
    print("| kernel | type | N×K | M | impl | µs | %BW | %peak |", flush=True)
    print("|---|---|---|---|---|---|---|---|", flush=True)

    def record(kernel, name, n, k, m, impl, us, nbytes, path=None, error=None):
        flops = 2 * m * n * k
        rec = {"kind": "entry", "kernel": kernel, "type": name, "n": n, "k": k, "m": m, "impl": impl,
               "path": path, "us": us, "bytes": nbytes, "flops": flops,
               "pct_bw": None if us is None else 100 * nbytes / (us * 1e-6) / bw,
               "pct_peak": None if us is None else 100 * flops / (us * 1e-6) / peak, "error": error}
        emit(rec)
        if us is None:
            print(f"| {kernel} | {name} | {n}×{k} | {m} | {impl} | error: {error} | | |", flush=True)
        else:
            print(f"| {kernel} | {name} | {n}×{k} | {m} | {impl} | {us:.1f} | {rec['pct_bw']:.0f} | "
                  f"{rec['pct_peak']:.1f} |", flush=True)

    for n, k in shapes:
        dense = None
        if "cublas_bf16" in peers:
            dense = [(torch.randn(n, k, device="cuda") * 0.02).to(act) for _ in range(copies_for(n * k * 2))]
        tiny = tinygemm_peer(n, k) if "tinygemm" in peers else None
        bnb = bnb_peer(n, k) if "bnb_nf4" in peers else None
        for m in ms:
            x = torch.randn(m, k, device="cuda").to(act)
            dy = torch.randn(m, n, device="cuda").to(act)
            nonzero(x, dy)
            for kernel in kernels:
                fwd = kernel == "forward"
                io = (m * k + m * n) * 2
                if dense is not None:
                    fn = (lambda i: torch.mm(x, dense[i % len(dense)].t())) if fwd else \
                        (lambda i: torch.mm(dy, dense[i % len(dense)]))
                    record(kernel, "BF16", n, k, m, "cublas_bf16", timer(fn), n * k * 2 + io)
                if fwd and m <= 16 and tiny is not None:
                    record(kernel, "INT4-tinygemm-g64", n, k, m, "tinygemm", timer(lambda i: tiny[0](x)),
                           tiny[1] + io)
                if fwd and m <= 16 and bnb is not None:
                    record(kernel, "NF4-bnb", n, k, m, "bnb_nf4", timer(lambda i: bnb[0](x)), bnb[1] + io)
            del x, dy
        del dense
        for name in types:
            try:
                one = random_qtensor(name, n, k)
            except ValueError as e:  # K not a multiple of this type's block
                print(f"skip {name} at {n}×{k}: {e}", flush=True)
                continue
            qts = [one] + [random_qtensor(name, n, k) for _ in range(copies_for(one.nbytes) - 1)]
            wbytes = one.nbytes
            for m in ms:
                x = torch.randn(m, k, device="cuda").to(act)
                dy = torch.randn(m, n, device="cuda").to(act)
                for kernel in kernels:
                    fwd = kernel == "forward"
                    io = (m * k + m * n) * 2
                    ours = (lambda i: lowtune.qmatmul(x, qts[i % len(qts)])) if fwd else \
                        (lambda i: lowtune.qmatmul_input_grad(dy, qts[i % len(qts)]))
                    tid = get_format(name).type_id
                    default = _C.cuda_path(kernel, m, 2, True, n, k, tid)
                    for impl, variant in our_variants(m, kernel).items():
                        if paths and impl not in paths:
                            continue
                        with env(variant):
                            path = _C.cuda_path(kernel, m, 2, True, n, k, tid)
                            if impl == "gemv" and path != "gemv":
                                continue  # no M = 1 CUDA-core kernel for this type
                            try:
                                us = timer(ours)
                                record(kernel, name, n, k, m, impl, us, wbytes + io, path=path)
                            except RuntimeError as e:
                                record(kernel, name, n, k, m, impl, None, wbytes + io, path=path, error=str(e)[:200])
                    emit({"kind": "default", "kernel": kernel, "type": name, "n": n, "k": k, "m": m, "path": default})
                    if "deq_mm" in peers:
                        deq = (lambda i: torch.mm(x, lowtune.dequantize(qts[i % len(qts)], act).t())) if fwd else \
                            (lambda i: torch.mm(dy, lowtune.dequantize(qts[i % len(qts)], act)))
                        record(kernel, name, n, k, m, "deq_mm", timer(deq), wbytes + io)
                del x, dy
            del qts, one
            torch.cuda.empty_cache()
    if out:
        out.close()
    return 0


# ---- decoding ------------------------------------------------------------------------------------

def decode_model(n_layers: int, qtype: str = "Q4_K") -> tuple[Model, int]:
    """A random Llama-2-7B-shaped model (every matrix `qtype`, random blocks) with n_layers layers on
    the GPU, and the bytes one decode step reads of its matrices (all but the token embedding)."""
    c = ModelConfig(vocab_size=32000, dim=4096, n_layers=n_layers, n_heads=32, n_kv_heads=32,
                    ffn_dim=11008, head_dim=128, rope_dim=128, context_length=4096)
    qt = lambda n, k: random_qtensor(qtype, n, k)  # noqa: E731
    w = {"token_embd.weight": qt(c.vocab_size, c.dim), "output.weight": qt(c.vocab_size, c.dim),
         "output_norm.weight": torch.ones(c.dim, device="cuda")}
    for i in range(c.n_layers):
        p = f"blk.{i}."
        hd = c.n_heads * c.head_dim
        kv = c.n_kv_heads * c.head_dim
        for name, (n, k) in {"attn_q": (hd, c.dim), "attn_k": (kv, c.dim), "attn_v": (kv, c.dim),
                             "attn_output": (c.dim, hd), "ffn_gate": (c.ffn_dim, c.dim),
                             "ffn_up": (c.ffn_dim, c.dim), "ffn_down": (c.dim, c.ffn_dim)}.items():
            w[p + name + ".weight"] = qt(n, k)
        w[p + "attn_norm.weight"] = torch.ones(c.dim, device="cuda")
        w[p + "ffn_norm.weight"] = torch.ones(c.dim, device="cuda")
    model = Model(c, w, torch.bfloat16).eval()
    weight_bytes = sum(t.nbytes for name, t in model.packed_tensors().items() if name != "token_embd.weight")
    return model, weight_bytes


# Decode variants, in the order they run (grouping is kept once done, so ungrouped comes first):
# name -> (CUDA graphs, grouped q/k/v and gate/up products, greedy steps chained on the device).
# "generate" is what lowtune.generate runs for greedy decoding on a GPU.
DECODE_VARIANTS = {"graphs_separate_steps": (True, False, False),
                   "graphs_grouped_steps": (True, True, False),
                   "generate": (True, True, True),
                   "eager_grouped_chained": (False, True, True)}


def bench_decode(args, bw: float, emit) -> None:
    """tokens/s of greedy decoding of decode_model(), batch 1, in the DECODE_VARIANTS, against the
    roofline: read bandwidth / bytes per token (every matrix but the embedding, plus the filled
    part of the KV cache)."""
    model, weight_bytes = decode_model(args.decode_layers, args.decode_type)
    c = model.config
    prompt = list(range(1, args.decode_prompt + 1))
    n_new = args.decode_tokens
    for name, (graphs, grouped, chained) in DECODE_VARIANTS.items():
        if args.decode_variants and name not in args.decode_variants.split(","):
            continue
        # Greedy steps (argmax read back every token, or chained on the device as generate() runs
        # them), timed on a second pass over the same positions, so that the graph captures of the
        # first pass are not counted.
        dec = StepDecoder(model, len(prompt) + n_new + 1, graphs=graphs, group_products=grouped)

        def run(tok: int) -> None:
            if chained:
                dec.greedy(tok, n_new)
                return
            for _ in range(n_new):
                tok = int(dec.step(tok).argmax())

        with torch.no_grad():
            t = time.perf_counter()
            tok = int(dec.prefill(prompt).argmax())
            prompt_s = time.perf_counter() - t
            run(tok)
            dec.cache.length = len(prompt)
            torch.cuda.synchronize()
            t = time.perf_counter()
            run(tok)
            torch.cuda.synchronize()
            decode_s = time.perf_counter() - t
        mean_pos = len(prompt) + n_new / 2
        kv_bytes = 2 * c.n_layers * c.n_kv_heads * c.head_dim * 2 * mean_pos  # k and v, bf16, filled part
        per_token = weight_bytes + kv_bytes
        tps = n_new / decode_s
        roof = bw / per_token
        rec = {"kind": "decode", "type": args.decode_type, "variant": name, "graphs": graphs,
               "grouped": grouped, "chained": chained, "layers": c.n_layers, "tokens": n_new,
               "prompt_tokens": len(prompt), "prompt_s": prompt_s, "decode_s": decode_s,
               "tokens_per_s": tps, "bytes_per_token": per_token, "roofline_tokens_per_s": roof,
               "pct_roofline": 100 * tps / roof}
        emit(rec)
        print(f"decode ({name}): {tps:.1f} tokens/s over {n_new} tokens, "
              f"{per_token / 1e9:.2f} GB/token, roofline {roof:.0f} tokens/s -> {rec['pct_roofline']:.0f}%; "
              f"prompt {len(prompt)} tokens in {prompt_s * 1e3:.0f} ms", flush=True)
        del dec
        torch.cuda.empty_cache()


# ---- summary ---------------------------------------------------------------------------------------

def summarize(paths: list[str], brief: bool = False) -> int:
    """Tables and missed targets from result files. brief: the small-M table lists only the 4-bit
    types of TYPES; every other type gets one line of its staged %BW at M = 1."""
    recs = [json.loads(line) for p in paths if os.path.exists(p) for line in open(p) if line.strip()]
    ent = [r for r in recs if r.get("kind") == "entry" and r.get("us") is not None]
    if not ent and not any(r.get("kind") == "decode" for r in recs):
        print("no results")
        return 1
    best: dict = {}
    for r in ent:
        key = (r["kernel"], r["type"], r["n"], r["k"], r["m"], r["impl"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r

    def get(kernel, name, n, k, m, impl):
        r = best.get((kernel, name, n, k, m, impl))
        return None if r is None else r

    ours_impls = ("gemv", "regs", "staged", "direct", "cublas", "overlap", "serial", "chunk64", "whole")
    fails = []
    rows = sorted({(r["type"], r["n"], r["k"], r["m"]) for r in ent if r["impl"] in ours_impls})
    small = [t for t in rows if t[3] <= 16]
    big = [t for t in rows if t[3] > 32]
    if small:
        print("\nsmall M: µs (the fastest of staged, regs and, at M = 1 where the type has one, gemv / direct), its "
              "%BW; ×cuBLAS bf16 and ×tinygemm = their time / ours; input grad / forward time")
        print("| type | N×K | M | fwd staged/gemv | fwd direct | %BW | ×cuBLAS | ×tinygemm | ig staged/gemv | ig direct | %BW "
              "| ig/fwd |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        others: dict = {}
        for name, n, k, m in small:
            f_s, f_d = get("forward", name, n, k, m, "staged"), get("forward", name, n, k, m, "direct")
            for f_x in (get("forward", name, n, k, m, "gemv"), get("forward", name, n, k, m, "regs")):
                f_s = f_x if f_x and (not f_s or f_x["us"] < f_s["us"]) else f_s
            if brief and name not in TYPES:
                if m == 1:
                    i_s = get("input_grad", name, n, k, m, "staged")
                    others.setdefault(name, []).append(
                        f"{n}×{k} {f_s['pct_bw']:.0f}/{i_s['pct_bw']:.0f}" if f_s and i_s else f"{n}×{k} —")
            i_s, i_d = get("input_grad", name, n, k, m, "staged"), get("input_grad", name, n, k, m, "direct")
            i_g = get("input_grad", name, n, k, m, "gemv")
            i_s = i_g if i_g and (not i_s or i_g["us"] < i_s["us"]) else i_s
            cub = get("forward", "BF16", n, k, m, "cublas_bf16")
            tg = get("forward", "INT4-tinygemm-g64", n, k, m, "tinygemm")
            us = lambda r: f"{r['us']:.1f}" if r else "—"  # noqa: E731
            pct = lambda r: f"{r['pct_bw']:.0f}" if r else "—"  # noqa: E731
            ratio = lambda a, b: f"{a['us'] / b['us']:.2f}" if a and b else "—"  # noqa: E731
            if not brief or name in TYPES:
                print(f"| {name} | {n}×{k} | {m} | {us(f_s)} | {us(f_d)} | {pct(f_s)} | {ratio(cub, f_s)} | "
                      f"{ratio(tg, f_s)} | {us(i_s)} | {us(i_d)} | {pct(i_s)} | {ratio(i_s, f_s)} |")
            four = name in ("Q4_0", "Q4_1", "Q4_K", "INT4-g64")
            mlp = (n, k) in ((14336, 4096), (4096, 14336))
            if f_s and four and m == 1 and mlp and (f_s["pct_bw"] < 75 or (tg and tg["us"] < f_s["us"])):
                fails.append(f"{name} {n}×{k} M=1 forward: {f_s['pct_bw']:.0f}% BW, ×tinygemm {ratio(tg, f_s)} "
                             "(target >= 75%, >= 1)")
            if f_s and four and m == 1 and (n, k) == (4096, 4096) and cub and cub["us"] < 2 * f_s["us"]:
                fails.append(f"{name} 4096×4096 M=1 forward: ×cuBLAS {ratio(cub, f_s)} (target >= 2)")
            if f_s and four and m == 16 and (f_s["pct_bw"] < 60 or (tg and tg["us"] < 1.5 * f_s["us"])):
                fails.append(f"{name} {n}×{k} M=16 forward: {f_s['pct_bw']:.0f}% BW, ×tinygemm {ratio(tg, f_s)} "
                             "(target >= 60%, >= 1.5)")
            if f_s and not four and m == 1 and mlp and f_s["pct_bw"] < 60:
                fails.append(f"{name} {n}×{k} M=1 forward: {f_s['pct_bw']:.0f}% BW (target >= 60%)")
            if f_s and i_s and i_s["us"] > 1.3 * f_s["us"]:
                fails.append(f"{name} {n}×{k} M={m} input grad: {i_s['us'] / f_s['us']:.2f}× forward (target <= 1.3)")
        if others:
            print("\nother types, staged at M = 1, %BW forward/input grad: " +
                  "; ".join(f"{t} " + ", ".join(v) for t, v in sorted(others.items())))
    if big:
        print("\nlarge M: µs of each chunked variant; ×cuBLAS = cuBLAS bf16 time / best variant's")
        print("| kernel | type | N×K | M | overlap | serial | chunk64 | whole | deq_mm | cuBLAS | ×cuBLAS |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for kernel in ("forward", "input_grad"):
            for name, n, k, m in big:
                rs = {v: get(kernel, name, n, k, m, v) for v in LARGE_VARIANTS}
                if not any(rs.values()):
                    continue
                cub = get(kernel, "BF16", n, k, m, "cublas_bf16")
                deq = get(kernel, name, n, k, m, "deq_mm")
                b = min((r for r in rs.values() if r), key=lambda r: r["us"])
                x = cub["us"] / b["us"] if cub else None
                cells = [f"{rs[v]['us']:.0f}" if rs[v] else "—" for v in LARGE_VARIANTS]
                cells += [f"{deq['us']:.0f}" if deq else "—", f"{cub['us']:.0f}" if cub else "—",
                          f"{x:.2f}" if x is not None else "—"]
                print(f"| {kernel} | {name} | {n}×{k} | {m} | " + " | ".join(cells) + " |")
                if x is not None and x < 0.95:
                    fails.append(f"{name} {n}×{k} M={m} {kernel}: {x:.2f}× cuBLAS (target >= 0.95)")
    for r in recs:
        if r.get("kind") == "decode":
            variant = r.get("variant", "CUDA graphs" if r["graphs"] else "eager")  # older files: no variant
            print(f"\ndecode, {r['layers']} layers, {variant}: "
                  f"{r['tokens_per_s']:.1f} tokens/s = {r['pct_roofline']:.0f}% of the {r['roofline_tokens_per_s']:.0f} "
                  f"tokens/s roofline ({r['bytes_per_token'] / 1e9:.2f} GB/token)")
            if variant in ("generate", "CUDA graphs") and r["pct_roofline"] < 60:
                fails.append(f"decode: {r['pct_roofline']:.0f}% of the roofline (target >= 60%)")
    errors = [r for r in recs if r.get("kind") == "entry" and r.get("error")]
    print(f"\ntargets missed: {len(fails)}; errors: {len(errors)}")
    for f in fails[:40]:
        print("  " + f)
    for r in errors[:10]:
        print(f"  error: {r['kernel']} {r['type']} {r['n']}×{r['k']} M={r['m']} {r['impl']}: {r['error']}")
    return 0


# ---- CPU (synchronous timing) ------------------------------------------------------------------

def make_weight(name: str, n: int, k: int, rng: np.random.Generator) -> tuple[lowtune.QTensor, bool]:
    """A QTensor of Gaussian weights quantized by lowtune (True), or, for a type this build
    cannot quantize, random code bytes with fp16 scales of sane magnitude (False)."""
    w = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32) * 0.02)
    try:
        return lowtune.quantize(w, name), True
    except (RuntimeError, NotImplementedError, ValueError):  # ValueError: needs an importance matrix
        fmt = get_format(name)
        raw = rng.integers(0, 256, size=(n * k // fmt.block_elems, fmt.block_bytes), dtype=np.uint8)
        for off in HALF_FIELDS.get(fmt.name, (0,)):
            halves = (rng.uniform(1e-4, 2e-3, size=raw.shape[0])).astype("<f2")
            raw[:, off:off + 2] = halves.view(np.uint8).reshape(-1, 2)
        if fmt.name in SPLIT_HALF_FIELDS:
            off = SPLIT_HALF_FIELDS[fmt.name]
            d = rng.uniform(1e-4, 2e-3, size=(raw.shape[0], 1)).astype("<f2").view(np.uint16)
            words = np.ascontiguousarray(raw[:, off:off + 8]).view("<u2")
            words = (words & 0x0FFF) | (((d >> (4 * np.arange(4, dtype=np.uint16))) & 0xF) << 12)
            raw[:, off:off + 8] = words.astype("<u2").view(np.uint8)
        return lowtune.QTensor.from_raw(torch.from_numpy(raw.reshape(n, -1)), name, (n, k)), False


def fmt_ms(v) -> str:
    if v is None:
        return "—"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def machine_line() -> str:
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
    return "; ".join(parts)


def run_cpu(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
        _C.set_num_threads(args.threads)
    shapes = ([tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")] if args.shapes
              else QUICK_SHAPES if args.quick else SHAPES)
    ms = [int(v) for v in args.ms.split(",")] if args.ms else QUICK_MS if args.quick else [1, 16, 512, 2048]
    types = parse_types(args.types) if args.types != ",".join(TYPES) else CPU_TYPES
    kernels = args.kernels.split(",")
    timer = Timer(args.min_time, args.max_reps)
    rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
    n_bw = (256 << 20) // 4
    src = torch.randn(n_bw)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / (timer(lambda: dst.copy_(src)) * 1e-3)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    peak = 2 * 2048 ** 3 / (timer(lambda: torch.mm(a, b)) * 1e-3)
    print(machine_line())
    print(f"measured: copy bandwidth {bandwidth / 1e9:.1f} GB/s, dense float32 matmul {peak / 1e9:.0f} GFLOP/s; "
          "times are medians in ms\n")
    print("| kernel | type | N×K | M | ms | GB/s | GFLOP/s | floor ms | ×floor | torch fp32 ms | ours/torch |")
    print("|" + "---|" * 11)

    def row(kernel, name, n, k, m, t, nbytes, flops, peers):
        floor = max(nbytes / bandwidth, flops / peak) * 1e3
        cells = [kernel, name, f"{n}×{k}", "—" if m is None else str(m), fmt_ms(t), f"{nbytes / t / 1e6:.1f}",
                 f"{flops / t / 1e6:.1f}" if flops else "—", fmt_ms(floor), f"{t / floor:.2f}"]
        print("| " + " | ".join(cells + peers) + " |", flush=True)

    for n, k in shapes:
        w_dense = torch.randn(n, k) * 0.02
        for name in types:
            fmt = get_format(name)
            qt, quantizable = make_weight(name, n, k, rng)
            wbytes = qt.nbytes
            if "quantize" in kernels and quantizable:
                raw = torch.empty(n, fmt.row_bytes(k), dtype=torch.uint8)
                t = timer(lambda: _C.quantize(fmt.type_id, w_dense.data_ptr(), raw.data_ptr(), n, k))
                row("quantize", name, n, k, None, t, n * k * 4 + wbytes, 0, ["—", "—"])
            if "dequantize" in kernels:
                out = torch.empty(n, k)
                t = timer(lambda: _C.dequantize(fmt.type_id, qt.raw.data_ptr(), out.data_ptr(), 0, n, k))
                row("dequantize", name, n, k, None, t, wbytes + n * k * 4, 0, ["—", "—"])
            if not ({"forward", "input_grad"} & set(kernels)):
                continue
            w_peer = lowtune.dequantize(qt, torch.float32)
            for m in ms:
                x, dy = torch.randn(m, k), torch.randn(m, n)
                for kernel in ("forward", "input_grad"):
                    if kernel not in kernels:
                        continue
                    if kernel == "forward":
                        ours, dense = (lambda: lowtune.qmatmul(x, qt)), (lambda: torch.mm(x, w_peer.t()))
                    else:
                        ours, dense = (lambda: lowtune.qmatmul_input_grad(dy, qt)), (lambda: torch.mm(dy, w_peer))
                    t, t_dense = timer(ours), timer(dense)
                    row(kernel, name, n, k, m, t, wbytes + (m * k + m * n) * 4, 2 * m * n * k,
                        [fmt_ms(t_dense), f"{t / t_dense:.2f}"])
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true", help=f"CPU: shapes {QUICK_SHAPES}, M in {QUICK_MS}")
    ap.add_argument("--types", default=",".join(TYPES), help="comma-separated, e.g. Q4_K,Q4_1,INT4-g64, or all")
    ap.add_argument("--shapes", help="comma-separated NxK, e.g. 4096x4096,11008x4096")
    ap.add_argument("--ms", help="comma-separated batch rows M, e.g. 1,16,2048")
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--peers", default=",".join(PEERS), help="CUDA: peers to time (empty: none)")
    ap.add_argument("--paths", help="CUDA: only these of our paths, e.g. staged,gemv (default: every one)")
    ap.add_argument("--out", help="CUDA: append JSON lines here")
    ap.add_argument("--target-ms", type=float, default=2.0, help="CUDA: graph length per replay")
    ap.add_argument("--reps", type=int, default=5, help="CUDA: replays per entry (median)")
    ap.add_argument("--warmup-s", type=float, default=2.0, help="CUDA: seconds of matmuls before measuring")
    ap.add_argument("--decode", action="store_true", help="CUDA: decoding benchmark instead of kernels")
    ap.add_argument("--decode-layers", type=int, default=32)
    ap.add_argument("--decode-type", default="Q4_K", help="the decode model's matrices' type")
    ap.add_argument("--decode-prompt", type=int, default=16)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--decode-variants", default="", help="comma-separated DECODE_VARIANTS to run (default: all)")
    ap.add_argument("--summary", nargs="+", metavar="JSONL", help="print tables and targets from result files")
    ap.add_argument("--brief", action="store_true", help="--summary: the short form")
    ap.add_argument("--min-time", type=float, default=0.5, help="CPU: seconds of repetitions per measurement")
    ap.add_argument("--max-reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch and lowtune (0: default)")
    args = ap.parse_args(argv)
    if args.summary:
        return summarize(args.summary, args.brief)
    return run_cuda(args) if args.device == "cuda" else run_cpu(args)


if __name__ == "__main__":
    sys.exit(main())
