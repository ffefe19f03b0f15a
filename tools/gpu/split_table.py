"""Best forced split of the staged kernels' reduction against the default policy, from one
tools/gpu/staged_splits.sh call: per entry the staged path's time under the default split
(kernels.jsonl) and under each LOWTUNE_CUDA_STAGED_SPLITS value (splits_S.jsonl).

    python3 tools/gpu/split_table.py DIR
"""
import glob
import os
import re
import sys

from ab_kernels import entries  # (this folder: the script's own, first on sys.path)


def staged(path: str) -> dict:
    return {key[:5]: us for key, us in entries(path).items() if key[5] == "staged" and us}


def main(d: str) -> None:
    base = staged(os.path.join(d, "kernels.jsonl"))
    forced = {int(re.search(r"splits_(\d+)", p).group(1)): staged(p)
              for p in glob.glob(os.path.join(d, "splits_*.jsonl"))}
    ss = sorted(forced)
    cols = " | ".join(f"s={s}" for s in ss)
    print(f"| kernel | type | N×K | M | default µs | {cols} | best | best / default |")
    print("|---" * (len(ss) + 7) + "|")
    for key in sorted(set().union(*forced.values()), key=lambda t: (t[0], t[4], t[2], t[3], t[1])):
        times = {s: forced[s].get(key) for s in ss}
        best = min((t, s) for s, t in times.items() if t)
        dflt = base.get(key)
        ratio = f"{best[0] / dflt:.2f}" if dflt else ""
        cells = " | ".join(f"{times[s]:.1f}" if times[s] else "" for s in ss)
        kern, name, n, k, m = key
        print(f"| {kern} | {name} | {n}×{k} | {m} | {dflt or float('nan'):.1f} | {cells} | {best[1]} | {ratio} |")


if __name__ == "__main__":
    main(sys.argv[1])
