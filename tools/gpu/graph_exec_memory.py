#!/usr/bin/env python
"""Device memory one instantiated CUDA graph holds beyond its memory pool, as the driver counts it
(NVML's used memory of this process): the number behind memory_budget.GRAPH_EXEC_BYTES.

    python3 tools/gpu/graph_exec_memory.py [--graphs 64] [--kernels 400]

Captures --graphs graphs of --kernels small kernels each (tensors of a few KiB, so the pool is
negligible), after a warm-up that loads the kernels, and prints the driver's growth per graph
and per kernel node. Prints one JSON line."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

import torch

from lowtune.memory_budget import NVML


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--graphs", type=int, default=64)
    ap.add_argument("--kernels", type=int, default=400)
    args = ap.parse_args()
    nvml = NVML.open()
    assert nvml is not None, "NVML is needed"
    a = torch.randn(32, 32, device="cuda")
    b = torch.randn(32, 32, device="cuda")

    def body():
        x = a
        for i in range(args.kernels // 2):
            x = torch.mm(x, b) if i % 4 == 0 else x * 0.5
            x = x + a
        return x

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            body()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    pool = torch.cuda.graph_pool_handle()
    g0 = torch.cuda.CUDAGraph()                 # one graph first: the pool's first segment
    with torch.cuda.graph(g0, pool=pool):
        body()
    g0.replay()
    torch.cuda.synchronize()
    time.sleep(0.2)
    before, reserved0 = nvml.process_used(), torch.cuda.memory_reserved()
    graphs = []
    for _ in range(args.graphs):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            body()
        g.replay()                               # instantiated and uploaded
        graphs.append(g)
    torch.cuda.synchronize()
    time.sleep(0.2)
    after, reserved1 = nvml.process_used(), torch.cuda.memory_reserved()
    grown = (after - before) - (reserved1 - reserved0)
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "graphs": args.graphs, "kernel_nodes_per_graph": args.kernels,
                      "driver_growth_bytes": after - before, "torch_reserved_growth_bytes": reserved1 - reserved0,
                      "bytes_per_graph": grown / args.graphs,
                      "bytes_per_node": grown / args.graphs / args.kernels}))


if __name__ == "__main__":
    main()
