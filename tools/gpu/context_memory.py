"""What the driver holds for a training process beyond torch's tensors, stage by stage, and how much
of it is the local-memory (stack) reservation that the stack limit sizes.

The driver reserves local memory for every thread the GPU can hold: the per-thread stack limit x
the resident threads per SM x the SMs (1 KiB x 2048 x 132 = 264 MiB on an H200 at CUDA's default
limit). This tool sets the limit right after the context is created (--stack; "keep" leaves the
default), then reads NVML's count for this process after each stage of a 7B-shaped step: the bare
context, cuBLAS, one decoder layer forward and backward (eager), compiled layers replayed from
CUDA graphs; and times the captured steps. One process per limit: lowering the limit under
instantiated CUDA graphs made their next replay fail on an H200 ("unspecified launch failure").

    for s in keep 0; do python3 tools/gpu/context_memory.py --stack $s --out ctx-$s.json; done

Random weights quantized to Q4_K (one unique layer, repeated), LoRA r=16 on all seven linears.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # tools/, for bench_train


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--stack", default="keep", help="per-thread stack limit in bytes, set before any "
                    "kernel runs, or 'keep' (the driver's default)")
    args = ap.parse_args(argv)

    from lowtune.memory_budget import (MIB, NVML, extension_bytes, prepare_process, set_stack_limit,
                                       stack_limit)
    prepare_process()
    import torch
    nvml = NVML.open()
    rows = []

    def record(stage: str, **extra):
        torch.cuda.synchronize()
        used = nvml.process_used() if nvml is not None else None
        reserved = torch.cuda.memory_reserved()
        ext = extension_bytes()
        row = {"stage": stage, "nvml_used_mib": None if used is None else used / MIB,
               "torch_reserved_mib": reserved / MIB, "extension_mib": ext / MIB,
               "outside_torch_mib": None if used is None else (used - reserved - ext) / MIB,
               "stack_limit": stack_limit(), **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)

    torch.cuda.init()
    torch.empty(1, device="cuda")             # the context, and one fill kernel
    default_stack = stack_limit()
    if args.stack != "keep" and set_stack_limit(int(args.stack)) is None:
        raise SystemExit("cuCtxSetLimit failed: no CUDA driver library or no current context")
    p = torch.cuda.get_device_properties(0)
    machine = {"gpu": p.name, "sms": p.multi_processor_count,
               "threads_per_sm": p.max_threads_per_multi_processor, "torch": torch.__version__,
               "module_loading": os.environ.get("CUDA_MODULE_LOADING", "(default)"),
               "stack_default": default_stack, "stack_asked": args.stack}
    print(json.dumps(machine), flush=True)
    record("context")
    a = torch.ones(256, 256, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()
    record("cublas")

    import bench_train
    from lowtune.compile import compile_model
    from lowtune.streaming import measure_working
    cfg = dict(bench_train.CONFIGS["llama2-7b"], n_layers=args.layers)
    ns = argparse.Namespace(rank=16, seed=0, device="cuda")
    weights = bench_train.make_weights(cfg, "Q4_K", 1, 0, "cuda")
    model = bench_train.lowtune_model(ns, cfg, weights)
    del weights
    torch.cuda.empty_cache()
    record("weights built")
    working = measure_working(model, "cuda", args.seq, mlp_chunks=(1,))
    record("one layer forward+backward (eager)", working_mib=working[1] / MIB)

    model.to("cuda")
    model.gradient_checkpointing = True
    setup = compile_model(model, "layer", cuda_graphs=True)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = bench_train.token_batch(args.seq, 1, cfg["vocab_size"], 0).cuda()

    def step() -> tuple[float, float]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(ids)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        torch.cuda.synchronize()
        return value, (time.perf_counter() - t0) * 1e3

    for _ in range(3):                    # compile, capture, replay
        loss, ms = step()
    torch.cuda.empty_cache()
    record("compiled layers, CUDA graphs, 3 steps", loss=loss, step_ms=ms,
           graphs=None if setup.graphs is None else len(setup.graphs.graphs))

    times = []
    for _ in range(5):
        loss, ms = step()
        times.append(ms)
    record("5 more steps", loss=loss, step_ms_median=sorted(times)[2], step_ms=times)

    Path(args.out).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
