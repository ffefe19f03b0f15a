"""The one-row input gradient's table from an A/B call (tools/gpu/ab_env.sh with KERNELS=input_grad and
PATHS=staged,gemv) and a forward run of the same types (bench_kernels.py --kernels forward --paths gemv):
per type and shape the forward, the staged kernel, the gemv path under A and under B, the default path's
time before (A's) and with B's gemv where B's policy sends the type there, and input gradient / forward.

    python3 tools/gpu/input_grad_table.py DIR FORWARD.jsonl [--b-gemv Q3_K,Q4_K,Q5_K]

DIR holds kernels_a_*.jsonl and kernels_b_*.jsonl (medians over the rounds). --before-gemv: the types whose
one-row input gradient took the gemv path under A (cuda_policy::gemv_grad_default before); --b-gemv: those
that take it under B (default: every type, i.e. B's gemv path against A's default path).
"""
from __future__ import annotations

import argparse
import glob
import json
import statistics


def load(pattern: str) -> dict[tuple[str, str, str], list[float]]:
    out: dict[tuple[str, str, str], list[float]] = {}
    for path in sorted(glob.glob(pattern)):
        for line in open(path):
            r = json.loads(line)
            if r.get("kind") == "entry" and r.get("path"):
                out.setdefault((r["type"], f"{r['n']}x{r['k']}", r["path"]), []).append(r["us"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("forward")
    ap.add_argument("--before-gemv", default="Q2_K,Q5_K,IQ4_NL,IQ4_XS,MXFP4")
    ap.add_argument("--b-gemv", default="", help="types on the gemv path under B (default: all)")
    args = ap.parse_args()
    a, b, fwd = load(f"{args.dir}/kernels_a_*.jsonl"), load(f"{args.dir}/kernels_b_*.jsonl"), load(args.forward)
    before_gemv = set(args.before_gemv.split(","))
    b_gemv = set(args.b_gemv.split(",")) if args.b_gemv else None
    med = statistics.median
    print("| type | N×K | forward µs | staged µs | gemv µs, A | gemv µs, B | default before → with B µs | "
          "ratio | input grad / forward: before → with B |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (t, shape, path) in sorted(a):
        if path != "gemv" or (t, shape, "staged") not in a or (t, shape, "gemv") not in fwd:
            continue
        staged = med(a[(t, shape, "staged")] + b.get((t, shape, "staged"), []))
        ga, gb, f = med(a[(t, shape, "gemv")]), med(b[(t, shape, "gemv")]), med(fwd[(t, shape, "gemv")])
        before = ga if t in before_gemv else staged
        with_b = gb if b_gemv is None or t in b_gemv else (ga if t in before_gemv else staged)
        print(f"| {t} | {shape.replace('x', '×')} | {f:.1f} | {staged:.1f} | {ga:.1f} | {gb:.1f} | "
              f"{before:.1f} → {with_b:.1f} | {with_b / before:.2f} | {before / f:.2f} → {with_b / f:.2f} |")


if __name__ == "__main__":
    main()
