"""Where one profiled training step's time went, from its chrome trace (bench_train.py
--profile --profile-trace PREFIX writes PREFIX.RUN.json.gz).

    python tools/gpu/trace_timeline.py trace.streamed:2GiB.json.gz

Prints, in ms from the trace's first event:
  - per operator of interest (the streamed layers' forward and backward, the LM head's loss,
    the optimizer): calls, host time, and the GPU span and kernel time of what they launched
    (kernels matched to their launch by correlation id);
  - the host-to-device copies of 50 MB or more (streamed layers): when the first began and the
    last ended, and their mean length;
  - the device's first activity, and what the host was doing before it (its longest operators).
The profiler slows the host several times over, so host-bound gaps here are larger than in an
unprofiled step; bench_train's phase ends (host queued / GPU reached) are the unprofiled view."""
from __future__ import annotations

import argparse
import collections
import gzip
import json

OPS = ("_StreamedLayer", "_StreamedLayerBackward", "_HeadCrossEntropy", "Optimizer.step")
BIG_COPY = 50e6


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [e for e in json.load(f).get("traceEvents", []) if e.get("ph") == "X"]


def timeline(events: list[dict]) -> dict:
    t0 = min(e["ts"] for e in events)
    ms = lambda ts: (ts - t0) / 1e3  # noqa: E731
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    launches = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    by_corr = collections.defaultdict(list)
    for e in gpu:
        by_corr[e["args"].get("correlation")].append(e)
    ops = [e for e in events if e.get("cat") == "cpu_op" and e["name"].startswith(OPS)]
    launch_by_tid = collections.defaultdict(list)
    for e in launches:
        launch_by_tid[e["tid"]].append(e)
    out = {}
    for name in OPS:
        mine = [e for e in ops if e["name"] == name or (name == "Optimizer.step" and e["name"].startswith(name))]
        if not mine:
            continue
        launched = []
        for op in mine:
            for r in launch_by_tid[op["tid"]]:
                if op["ts"] <= r["ts"] <= op["ts"] + op["dur"]:
                    launched += by_corr.get(r["args"].get("correlation"), [])
        row = {"calls": len(mine), "host_ms": sum(e["dur"] for e in mine) / 1e3,
               "host_first_ms": ms(min(e["ts"] for e in mine))}
        if launched:
            row.update(gpu_start_ms=ms(min(e["ts"] for e in launched)),
                       gpu_end_ms=ms(max(e["ts"] + e["dur"] for e in launched)),
                       gpu_kernel_ms=sum(e["dur"] for e in launched) / 1e3)
        out[name] = row
    copies = sorted((e for e in gpu if e.get("cat") == "gpu_memcpy" and "HtoD" in e["name"]
                     and e["args"].get("bytes", 0) >= BIG_COPY), key=lambda e: e["ts"])
    if copies:
        out["layer_copies"] = {"n": len(copies), "first_start_ms": ms(copies[0]["ts"]),
                               "last_end_ms": ms(copies[-1]["ts"] + copies[-1]["dur"]),
                               "mean_ms": sum(e["dur"] for e in copies) / len(copies) / 1e3,
                               "gb_per_s": sum(e["args"]["bytes"] for e in copies)
                               / sum(e["dur"] for e in copies) / 1e3}
    first = min(gpu, key=lambda e: e["ts"]) if gpu else None
    if first is not None:
        before = sorted((e for e in events if e.get("cat") == "cpu_op" and e["ts"] < first["ts"] + 5e3),
                        key=lambda e: -e["dur"])[:5]
        out["start"] = {"first_gpu_ms": ms(first["ts"]), "first_gpu": first["name"][:60],
                        "host_ops_before": [(e["name"][:60], round(ms(e["ts"]), 2), round(e["dur"] / 1e3, 2))
                                            for e in before]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="+")
    ap.add_argument("--json", action="store_true", help="print JSON instead of lines")
    args = ap.parse_args(argv)
    for path in args.traces:
        t = timeline(load(path))
        if args.json:
            print(json.dumps({"trace": path, **t}))
            continue
        print(f"== {path}")
        for name in OPS:
            r = t.get(name)
            if r is None:
                continue
            gpu = (f"; GPU {r['gpu_start_ms']:.1f}-{r['gpu_end_ms']:.1f} ms, kernels {r['gpu_kernel_ms']:.1f} ms"
                   if "gpu_start_ms" in r else "")
            print(f"{name}: {r['calls']} call(s), host {r['host_ms']:.1f} ms from {r['host_first_ms']:.1f}{gpu}")
        c = t.get("layer_copies")
        if c:
            print(f"layer copies: {c['n']}, {c['first_start_ms']:.1f}-{c['last_end_ms']:.1f} ms, "
                  f"{c['mean_ms']:.2f} ms each, {c['gb_per_s']:.1f} GB/s")
        s = t.get("start")
        if s:
            print(f"first GPU activity at {s['first_gpu_ms']:.2f} ms ({s['first_gpu']}); longest host "
                  f"operators until 5 ms after: {s['host_ops_before']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
