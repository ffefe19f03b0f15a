"""Where a CUDA decode step's time goes: the kernels of one step of `StepDecoder` on the random
Llama-2-7B-shaped model of tools/bench_kernels.py (every matrix Q4_K), by torch.profiler, grouped
into the quantized products, attention and the rest, beside the step's wall time with and
without CUDA graphs.

    python3 tools/gpu/profile_decode.py [--layers 32] [--prompt 512] [--steps 16] [--out decode.json]

Kernels are profiled over graph replays (what generate() runs) and over eager steps; a step's
kernel time against its wall time shows what the host or the gaps between kernels cost.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_kernels import decode_model  # noqa: E402
from lowtune.generate import StepDecoder  # noqa: E402


def group_of(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("rms_norm", "rope", "silu_mul")):
        return "other"  # lowtune's fused glue (csrc/glue_kernels.h), every variant of its kernels
    if "lowtune::" in n:
        return "quantized products"
    if "sdpa" in n or "attention" in n or "fmha" in n or "flash" in n or "lean_reduction" in n:
        return "attention"
    return "other"


def kernel_table(prof, steps: int) -> list[dict]:
    rows = collections.defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            r = rows[ev.name]
            r[0] += ev.device_time
            r[1] += 1
    out = [{"kernel": k, "group": group_of(k), "us_per_step": t / steps, "calls_per_step": c / steps}
           for k, (t, c) in rows.items()]
    return sorted(out, key=lambda r: -r["us_per_step"])


def profile_steps(dec: StepDecoder, tok: int, steps: int) -> tuple[list[dict], float]:
    """Kernels of `steps` decode steps and their mean wall time (ms), one synchronized step at a time."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            tok = int(dec.step(tok).argmax())
        torch.cuda.synchronize()
    return kernel_table(prof, steps), tok


def wall_ms(dec: StepDecoder, tok: int, steps: int) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        tok = int(dec.step(tok).argmax())
    return (time.perf_counter() - t) / steps * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    model, weight_bytes = decode_model(a.layers)
    prompt = list(range(1, a.prompt + 1))
    report = {"layers": a.layers, "prompt": a.prompt, "steps": a.steps, "weight_bytes": weight_bytes}
    for graphs in (True, False):
        dec = StepDecoder(model, a.prompt + 4 * a.steps + 8, graphs=graphs)
        with torch.no_grad():
            tok = int(dec.prefill(prompt).argmax())
            for _ in range(2):  # captures (and warm-up) outside what is measured
                tok = int(dec.step(tok).argmax())
            ms = wall_ms(dec, tok, a.steps)
            table, tok = profile_steps(dec, tok, a.steps)
        groups = collections.Counter()
        for r in table:
            groups[r["group"]] += r["us_per_step"]
        key = "graphs" if graphs else "eager"
        report[key] = {"wall_ms_per_step": ms, "kernel_us_per_step": sum(groups.values()),
                       "groups_us_per_step": dict(groups), "kernels": table[:40]}
        print(f"== {key}: {ms:.3f} ms per step wall, {sum(groups.values()) / 1e3:.3f} ms of kernels "
              f"({', '.join(f'{g} {t / 1e3:.3f}' for g, t in groups.most_common())})")
        for r in table[:25]:
            print(f"  {r['us_per_step']:9.1f} us {r['calls_per_step']:6.1f}x  [{r['group']}] {r['kernel'][:110]}")
        del dec
        torch.cuda.empty_cache()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
