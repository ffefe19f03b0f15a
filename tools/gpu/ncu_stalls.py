"""Where a kernel's warps stall, by instruction: a summary of the SASS table that ncu_small_m.sh writes with
SOURCE=1 (sass_<entry>.csv, optionally gzipped: ncu's source page, one row per SASS instruction with its
executed count and stall samples).

    python3 tools/gpu/ncu_stalls.py sass_input_grad_Q4_K_14336x4096_m1.csv.gz [--kernel grad_staged] [--top 12]

For each profiled kernel whose name contains --kernel: the stall reasons' shares of all samples, the samples
and executed instructions by opcode, and the instructions with the most samples, each with its dominant
reason and the instructions just before it (a stall is charged to the instruction that waits, so the cause is
usually the load or barrier a few lines up).
"""
from __future__ import annotations

import argparse
import collections
import csv
import gzip
import io


def kernels(path: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """(kernel name, header, rows) for each kernel's table in the file; a kernel profiled twice appears once."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        lines = f.read().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith('"Kernel Name"')]
    out, seen = [], set()
    for a, b in zip(starts, starts[1:] + [len(lines)]):
        name = next(csv.reader([lines[a]]))[1]
        if name in seen:
            continue
        seen.add(name)
        header = next(csv.reader([lines[a + 1]]))
        out.append((name, header, list(csv.reader(io.StringIO("\n".join(lines[a + 2:b]))))))
    return out


def opcode(source: str) -> str:
    words = source.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else "?"


def summarize(name: str, header: list[str], rows: list[list[str]], top: int, before: int) -> None:
    col = {h: j for j, h in enumerate(header)}

    def num(row: list[str], h: str) -> float:
        try:
            return float(row[col[h]].replace(",", ""))
        except (KeyError, IndexError, ValueError):
            return 0.0

    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    samples = "Warp Stall Sampling (All Samples)"
    by_reason, by_op, executed = collections.Counter(), collections.Counter(), collections.Counter()
    for row in rows:
        op = opcode(row[col["Source"]])
        by_op[op] += num(row, samples)
        executed[op] += num(row, "Instructions Executed")
        for h in reasons:
            by_reason[h[len("stall_"):]] += num(row, h)
    total, total_op, total_ex = (sum(c.values()) or 1 for c in (by_reason, by_op, executed))
    print(f"{name}\n  {int(total_op)} samples, {int(total_ex)} warp instructions executed")
    print("  stall reasons: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in by_reason.most_common(10)))
    print("  samples by opcode: " + ", ".join(f"{k} {100 * v / total_op:.0f}%" for k, v in by_op.most_common(12)))
    print("  executed by opcode: " + ", ".join(f"{k} {100 * v / total_ex:.0f}%" for k, v in executed.most_common(12)))
    ranked = sorted(range(len(rows)), key=lambda i: -num(rows[i], samples))[:top]
    print(f"  the {top} instructions with the most samples (share, dominant reason, executed; lines before it):")
    for i in ranked:
        row = rows[i]
        reason = max(reasons, key=lambda h: num(row, h))[len("stall_"):] if reasons else "?"
        print(f"  {100 * num(row, samples) / total_op:5.1f}% {reason:14s} {int(num(row, 'Instructions Executed')):>9}"
              f"  {row[col['Source']]}")
        for j in range(max(0, i - before), i):
            print(f"  {'':36s}    {rows[j][col['Source']]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", help="sass_<entry>.csv or .csv.gz from ncu_small_m.sh SOURCE=1")
    ap.add_argument("--kernel", default="", help="only kernels whose name contains this")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--before", type=int, default=0, help="instructions to print before each of the top ones")
    args = ap.parse_args()
    for name, header, rows in kernels(args.csv):
        if args.kernel in name:
            summarize(name, header, rows, args.top, args.before)


if __name__ == "__main__":
    main()
