#!/usr/bin/env python
"""What CUDA graphs of Llama-2-7B-shaped decoder layers hold on the GPU, per count of MLP token
chunks: the numbers behind memory_budget.graph_pool and the streaming planner's working set.

    python3 tools/gpu/layer_graphs_memory.py [--layers 4] [--chunks 1,2,4,8] [--floors 1024,256] [--tokens 2048]

For each chunk count (and each of the extension's chunk floors, 1024 and 256 rows), in a fresh process:
--layers resident layers (zero Q4_K blocks, LoRA r=16 on the seven linears, bf16), compiled
(mode layer) and captured by lowtune.compile.LayerGraphs over one training step, then replayed
once. Prints one JSON line per case: the eager working set as the planner measures it
(streaming.measure_working), the graphs' private pool (its segments in torch's snapshot), the
kernel nodes per forward and backward graph, and the driver's growth beyond torch's and the
extension's memory per graph (NVML: the graphs' uploaded launch descriptors)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))


def build(layers: int):
    import torch

    from lowtune import QTensor, adapters
    from lowtune.model import Model, ModelConfig
    d, f, v = 4096, 11008, 32000
    c = ModelConfig(vocab_size=v, dim=d, n_layers=layers, n_heads=32, n_kv_heads=32, ffn_dim=f, head_dim=128,
                    rope_dim=128, norm_eps=1e-5, context_length=4096)
    q4k = lambda n, k: QTensor.from_raw(torch.zeros(n * k // 256 * 144, dtype=torch.uint8), "Q4_K", (n, k))  # noqa: E731
    shapes = {"attn_q": (d, d), "attn_k": (d, d), "attn_v": (d, d), "attn_output": (d, d),
              "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}
    w = {"token_embd.weight": q4k(v, d), "output.weight": q4k(v, d), "output_norm.weight": torch.ones(d)}
    for i in range(layers):
        w.update({f"blk.{i}.{n}.weight": q4k(*s) for n, s in shapes.items()})
        w[f"blk.{i}.attn_norm.weight"] = torch.ones(d)
        w[f"blk.{i}.ffn_norm.weight"] = torch.ones(d)
    m = Model(c, w, torch.bfloat16)
    adapters.apply_adapters(m, adapters.AdapterConfig(method="lora", rank=16, alpha=16, seed=0))
    adapters.mark_only_adapters_trainable(m)
    return m


def pools() -> dict:
    import torch
    out: dict = {}
    for seg in torch.cuda.memory._snapshot()["segments"]:
        key = str(tuple(seg.get("segment_pool_id", (0, 0))))
        out[key] = out.get(key, 0) + seg["total_size"]
    return out


def count_nodes(graph) -> int | None:
    """Kernel and other nodes of a captured graph kept with keep_graph (driver API), or None."""
    import ctypes
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        n = ctypes.c_size_t(0)
        raw = ctypes.c_void_p(graph.raw_cuda_graph())
        if lib.cuGraphGetNodes(raw, None, ctypes.byref(n)) != 0:
            return None
        return int(n.value)
    except Exception:  # noqa: BLE001 (a probe: no node count is an answer too)
        return None


def case(layers: int, chunks: int, tokens: int) -> dict:
    from lowtune.memory_budget import NVML, extension_bytes, prepare_process
    prepare_process()
    import torch

    from lowtune import compile as lc
    from lowtune.streaming import measure_working
    nvml = NVML.open()
    m = build(layers)
    working = measure_working(m, "cuda", tokens, (chunks,))[chunks]
    m.to("cuda")
    for layer in m.layers:
        layer.mlp_chunks = chunks
    nodes: list = []
    made = torch.cuda.CUDAGraph

    def keeping(*a, **k):                     # keep each graph's template to count its nodes
        try:
            g = made(*a, keep_graph=True, **k)
        except TypeError:
            g = made(*a, **k)
        nodes.append(g)
        return g
    lc.torch.cuda.CUDAGraph = keeping
    lc.compile_model(m, "layer", cuda_graphs=True)
    graphs = m.streamer.graphs
    rot = m.rope_rotation(0, tokens).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)

    def step():
        x = torch.randn(1, tokens, 4096, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
        h = x
        with torch.autocast("cuda", dtype=torch.bfloat16):
            for layer in m.layers:
                h = m.streamer.run(layer, h, rot)
        h.float().sum().backward()
        torch.cuda.synchronize()

    def driver_outside():
        return nvml.process_used() - torch.cuda.memory_reserved() - extension_bytes("cuda")
    t0 = time.perf_counter()
    step()                                    # compiles, warms up and captures
    capture_s = time.perf_counter() - t0
    torch.cuda.empty_cache()
    time.sleep(0.2)
    outside1 = driver_outside()
    step()                                    # replays
    torch.cuda.synchronize()
    lc.torch.cuda.CUDAGraph = made
    counts = [count_nodes(g) for g in nodes]
    by_pool = pools()
    pool = by_pool.get(str(tuple(graphs.pool)), 0) if graphs.pool is not None else 0
    # the graphs' own memory: against the baseline process's count (the same step, no graphs)
    return {"layers": layers, "mlp_chunks": chunks, "tokens": tokens,
            "chunk_min": os.environ.get("LOWTUNE_CUDA_CHUNK_MIN", "1024"),
            "working_eager": working, "graph_pool_segments": pool, "pools": by_pool,
            "graphs": len(graphs.graphs), "replays": graphs.replays, "summary": graphs.summary(),
            "nodes": counts, "driver_outside_torch_after_capture": outside1,
            "driver_outside_torch_after_replay": driver_outside(), "capture_s": capture_s,
            "max_allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.memory_reserved()}


def baseline(layers: int, tokens: int) -> dict:
    """The driver's count outside torch and the extension after the same eager step (no graphs)."""
    from lowtune.memory_budget import NVML, extension_bytes, prepare_process
    prepare_process()
    import torch

    from lowtune import compile as lc
    nvml = NVML.open()
    m = build(layers).to("cuda")
    lc.compile_model(m, "layer", cuda_graphs=False)
    m.gradient_checkpointing = True
    rot = m.rope_rotation(0, tokens).cuda()
    for _ in range(2):
        x = torch.randn(1, tokens, 4096, device="cuda", dtype=torch.bfloat16).requires_grad_()
        h = x
        with torch.autocast("cuda", dtype=torch.bfloat16):
            for layer in m.layers:
                h = torch.utils.checkpoint.checkpoint(layer, h, rot, use_reentrant=False)
        h.float().sum().backward()
        torch.cuda.synchronize()
    torch.cuda.empty_cache()
    time.sleep(0.2)
    return {"baseline": True, "layers": layers, "tokens": tokens,
            "driver_outside_torch": nvml.process_used() - torch.cuda.memory_reserved() - extension_bytes("cuda")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--chunks", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--floors", default="1024,256",
                    help="the extension's chunk floors (LOWTUNE_CUDA_CHUNK_MIN) per case")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        res = baseline(args.layers, args.tokens) if args.one == "base" else case(args.layers, int(args.one), args.tokens)
        print("RESULT " + json.dumps(res), flush=True)
        return
    cases = [("base", None)] + [(c, cm) for c in args.chunks.split(",") for cm in args.floors.split(",")]
    for one, chunk_min in cases:
        env = dict(os.environ)
        if chunk_min is not None:
            env["LOWTUNE_CUDA_CHUNK_MIN"] = chunk_min
        p = subprocess.run([sys.executable, __file__, "--one", one, "--layers", str(args.layers),
                            "--tokens", str(args.tokens)], env=env, capture_output=True, text=True)
        lines = [ln[7:] for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        print(lines[0] if lines else json.dumps({"case": one, "chunk_min": chunk_min, "rc": p.returncode,
                                                 "error": p.stderr[-1500:]}), flush=True)


if __name__ == "__main__":
    main()
