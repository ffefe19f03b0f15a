"""Two settings of tools/bench_kernels.py's graph-replay timings side by side: the runs of setting A
(--a, JSONL files) against those of setting B (--b), per entry (kernel, type, N×K, M, path) the best
time of each setting's runs and B / A, then the median and range of B / A per kernel, path and M.

    python3 tools/gpu/ab_kernels.py --a off_1.jsonl off_2.jsonl --b on_1.jsonl on_2.jsonl [--paths staged,gemv]
"""
from __future__ import annotations

import argparse
import json
import statistics


def entries(path: str) -> dict[tuple, float]:
    out = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "entry":
                out[(r["kernel"], r["type"], r["n"], r["k"], r["m"], r["impl"])] = r["us"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", nargs="+", required=True, help="setting A's JSONL files")
    ap.add_argument("--b", nargs="+", required=True, help="setting B's JSONL files")
    ap.add_argument("--paths", default="staged,gemv", help="paths (bench_kernels' impl) to compare")
    ap.add_argument("--rows", action="store_true", help="also every entry, not only the summary")
    a = ap.parse_args(argv)
    runs_a, runs_b = [entries(p) for p in a.a], [entries(p) for p in a.b]
    keys = sorted(set().union(*runs_a) & set().union(*runs_b))
    paths = set(a.paths.split(","))
    groups: dict[tuple, list[float]] = {}
    if a.rows:
        print("| kernel | type | N×K | M | path | A µs | B µs | B / A |\n|---|---|---|---|---|---|---|---|")
    for key in keys:
        kernel, qtype, n, k, m, impl = key
        if impl not in paths:
            continue
        ta = [r[key] for r in runs_a if key in r]
        tb = [r[key] for r in runs_b if key in r]
        ratio = min(tb) / min(ta)
        groups.setdefault((kernel, impl, m), []).append(ratio)
        if a.rows:
            print(f"| {kernel} | {qtype} | {n}×{k} | {m} | {impl} | {' / '.join(f'{t:.1f}' for t in ta)} | "
                  f"{' / '.join(f'{t:.1f}' for t in tb)} | {ratio:.3f} |")
    print("\n| kernel | path | M | entries | B / A median | min | max |\n|---|---|---|---|---|---|---|")
    for (kernel, impl, m), ratios in sorted(groups.items()):
        print(f"| {kernel} | {impl} | {m} | {len(ratios)} | {statistics.median(ratios):.3f} | {min(ratios):.3f} | "
              f"{max(ratios):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
