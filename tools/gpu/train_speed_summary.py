#!/usr/bin/env python
"""The summary of tools/gpu/train_speed.sh: each target of the training-speed work against what
the run measured, from the files it wrote (argument: its output directory). Markdown on stdout."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def runs(out: Path, model: str) -> dict:
    data = load(out / f"train_{model}" / "results.json") or {}
    return {r["run"]: r for r in data.get("results", [])}


def ok(r) -> bool:
    return bool(r) and "error" not in r and "skipped" not in r


def ratio(a, b):
    return a["tokens_per_s"] / b["tokens_per_s"] if ok(a) and ok(b) else None


def fmt(v, spec=".2f", suffix="") -> str:
    return "—" if v is None else f"{v:{spec}}{suffix}"


def verdict(v, target, higher=True) -> str:
    if v is None:
        return "not measured"
    return "met" if (v >= target if higher else v <= target) else "missed"


def main() -> None:
    out = Path(sys.argv[1])
    rows = []
    for model, name, need in (("1b", "Llama-3.2-1B", 2.5), ("7b", "Llama-2-7B", 2.0)):
        r = runs(out, model)
        x = ratio(r.get("resident"), r.get("qlora"))
        rows.append((f"{name}: resident / QLoRA peer tokens/s", f">= {need}", fmt(x, ".2f", "x"), verdict(x, need)))
        if model == "7b":
            f = r.get("resident", {}).get("floor_fraction") if ok(r.get("resident")) else None
            rows.append((f"{name}: resident, share of the GPU floor", ">= 50%", fmt(f and f * 100, ".0f", "%"),
                         verdict(f, 0.5)))
            s = ratio(r.get("streamed:3GiB"), r.get("resident"))
            rows.append((f"{name}: streamed at 3 GiB / resident", ">= 0.9", fmt(s, ".2f", "x"), verdict(s, 0.9)))
        gaps = [v.get("loss_gap_vs_eager") for k, v in r.items() if ok(v) and k not in ("qlora", "resident-eager")]
        gaps = [g for g in gaps if g is not None]
        worst = max(gaps) if gaps else None
        rows.append((f"{name}: losses over the steps vs eager (largest)", "<= 0.5%",
                     fmt(worst and worst * 100, ".3f", "%"), verdict(worst, 0.005, higher=False)))
    ad = load(out / "adapters.json")
    if ad and ad.get("rows") and "fused_graph_x" in ad["rows"][0]:
        for row in ad["rows"]:
            rows.append((f"adapted / bare layer, {row['method']} (r=64, M=2048, graph replay)", "<= 1.15",
                         fmt(row["fused_graph_x"], ".2f", "x"), verdict(row["fused_graph_x"], 1.15, higher=False)))
    else:
        rows.append(("adapted / bare layer (graph replay)", "<= 1.15", "—", "not measured"))
    log = (out / "tests.log").read_text() if (out / "tests.log").exists() else ""
    m = re.findall(r"(\d+ (?:passed|failed|skipped|errors?|deselected))", log)
    rows.append(("CUDA tests (custom ops, compile, graphs, streaming, adapters)", "all pass",
                 ", ".join(m) or "—", "met" if m and not re.search(r"\d+ (failed|error)", log) else "missed"))
    el = load(out / "elementwise.json")
    for row in (el or {}).get("rows", []):
        rows.append((f"{row['model']} {row['chain']} compiled / memory floor (fwd+bwd)", "near 1: no fused kernel needed",
                     fmt(row["compiled_over_floor"], ".2f", "x"), "—"))

    print("| target | wanted | measured | |")
    print("|---|---|---|---|")
    for name, want, got, v in rows:
        print(f"| {name} | {want} | {got} | {v} |")
    for model in ("1b", "7b"):
        table = out / f"train_{model}" / "table.md"
        if table.exists():
            print()
            print(table.read_text().rstrip())


if __name__ == "__main__":
    main()
