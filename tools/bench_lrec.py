"""LREC on SmolLM2-135M: does the correction bring quantized students back to their teacher?

    python tools/bench_lrec.py                       # CPU, packed students (hours on a 2-core CPU)
    python tools/bench_lrec.py --device cuda --dense # GPU without lowtune's CUDA kernels (below):
                                                     # about 2 minutes a student on one H100

Teacher: the model's weights dequantized to F32 (`lowtune quantize SRC --type F32`). Students:
re-quantizations of that teacher (default INT2-g32, INT3-g64 and llama.cpp's Q2_K recipe).
Each student gets an LREC adapter (lowtune.correct) trained on the first 90% of Botchan; perplexity
of teacher, student and corrected student is measured on the last 10% of Botchan (same source)
and on A Midsummer Night's Dream (a different source, bundled in lowtune/data).

--dense: the students' packed matrices are expanded once to F32 files holding exactly their
dequantized values, so the run needs no lowtune CUDA kernels (a CPU-only build of lowtune plus
PyTorch on the GPU). It computes the same functions as the packed students (summation order
aside); bits per weight are always those of the packed student files.

Writes OUT/results.json, OUT/results.md (the table) and OUT/lrec.png.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import torch  # noqa: E402
from smollm2 import smollm2_path  # noqa: E402

import lowtune  # noqa: E402
from lowtune.correct import correct  # noqa: E402
from lowtune.quantize_model import model_bits, quantize_model  # noqa: E402

DATA = Path(lowtune.__file__).parent / "data"




def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="source GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--students", default="INT2-g32,INT3-g64,Q2_K")
    p.add_argument("--out", type=Path, default=Path("runs/bench_lrec"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dense", action="store_true", help="train on F32 expansions of the students")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--alpha", type=float, default=64.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ce-weight", type=float, default=0.1)
    p.add_argument("--targets", default=None, help="comma-separated linears (default all seven)")
    p.add_argument("--eval-tokens", type=int, default=16384, help="tokens of the second text scored")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="held-out end of Botchan")
    p.add_argument("--dtype", default="float32")
    a = p.parse_args(argv)

    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    src = a.model or smollm2_path()
    t0 = time.perf_counter()
    teacher = out / "teacher-F32.gguf"
    if not teacher.exists():
        quantize_model(src, teacher, "F32")
    rows = []
    for qtype in [s for s in a.students.split(",") if s]:
        student = out / f"student-{qtype}.gguf"
        if not student.exists():
            quantize_model(teacher, student, qtype)
        trained_on = student
        if a.dense:
            trained_on = out / f"student-{qtype}-as-F32.gguf"
            if not trained_on.exists():
                quantize_model(student, trained_on, "F32")
        t1 = time.perf_counter()
        res = correct(trained_on, teacher, DATA / "botchan.txt", out / f"lrec-{qtype}", rank=a.rank,
                      alpha=a.alpha, lr=a.lr, ce_weight=a.ce_weight, steps=a.steps, seq_len=a.seq_len,
                      batch=a.batch, eval_every=0, eval_fraction=a.eval_fraction, eval_texts=[str(DATA / "midsummer.txt")],
                      eval_tokens=a.eval_tokens, device=a.device, dtype=a.dtype,
                      targets=a.targets.split(",") if a.targets else None, log=lambda s: print(s, flush=True))
        bits = model_bits(student)
        n_ad = res.report["bits"]["adapter_params"]
        corr = bits.with_adapter(n_ad)
        rows.append({"student": qtype, "linear_bpw": bits.linear_bpw, "linear_bpw_lrec": corr["linear_bpw"],
                     "bpw": bits.bpw, "bpw_lrec": corr["bpw"], "adapter_params": n_ad,
                     "eval": res.report["eval"], "seconds": time.perf_counter() - t1})
        print(f"{qtype}: {rows[-1]['seconds']:.0f} s", flush=True)
        write_results(out, rows, a, src, t0)
    write_results(out, rows, a, src, t0, final=True)
    return 0


def write_results(out: Path, rows, a, src, t0, final: bool = False) -> None:
    """results.json and results.md (after every student, so a cut-off run keeps what it has),
    and the plot at the end."""
    meta = {"date": date.today().isoformat(), "machine": platform.node(), "device": a.device,
            "gpu": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else None,
            "python": platform.python_version(), "torch": torch.__version__, "lowtune": lowtune.__version__,
            "source": src.name, "dense": a.dense, "settings": {k: v for k, v in vars(a).items()
                                                                if k not in ("out", "model")},
            "wall_s": round(time.perf_counter() - t0, 1)}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    table = markdown(rows, meta)
    (out / "results.md").write_text(table)
    if final:
        print(table)
        plot(rows, out / "lrec.png")


def markdown(rows, meta) -> str:
    s = meta["settings"]
    lines = [f"LREC on {meta['source']} ({meta['date']}, {meta['gpu'] or meta['device']}, torch {meta['torch']}"
             f"{', students run as dense F32 expansions' if meta['dense'] else ''}): rank {s['rank']}, "
             f"alpha {s['alpha']:g}, {s['steps']} steps of {s['batch']}x{s['seq_len']} tokens of Botchan "
             f"(first {100 * (1 - s['eval_fraction']):.0f}%), lr {s['lr']:g} cosine, ce_weight {s['ce_weight']:g}, targets "
             f"{s['targets'] or 'all seven linears'}; {meta['wall_s']:.0f} s in all.",
             "",
             "| student | bpw linears (+LREC) | bpw model (+LREC) | text | ppl teacher | ppl student | "
             "ppl corrected | gap closed | KL student | KL corrected |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for i, (name, e) in enumerate(r["eval"].items()):
            gap = e["student_ppl"] - e["teacher_ppl"]
            closed = 100 * (e["student_ppl"] - e["corrected_ppl"]) / gap if gap > 0 else float("nan")
            head = (f"| {r['student']} | {r['linear_bpw']:.3f} ({r['linear_bpw_lrec']:.3f}) | "
                    f"{r['bpw']:.3f} ({r['bpw_lrec']:.3f}) ") if i == 0 else "| | | "
            lines.append(f"{head}| {name} | {e['teacher_ppl']:.2f} | {e['student_ppl']:.2f} | "
                         f"{e['corrected_ppl']:.2f} | {closed:.0f}% | {e['student_kl']:.4f} | {e['corrected_kl']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(rows, path: Path) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib missing: no plot")
        return
    texts = list(rows[0]["eval"]) if rows else []
    fig = Figure(figsize=(4.5 * max(len(texts), 1), 4), dpi=110)
    FigureCanvasAgg(fig)
    for j, text in enumerate(texts):
        ax = fig.add_subplot(1, len(texts), j + 1)
        x = range(len(rows))
        w = 0.27
        vals = [[r["eval"][text][k] for r in rows] for k in ("teacher_ppl", "student_ppl", "corrected_ppl")]
        for i, (label, v) in enumerate(zip(("teacher (F32)", "student", "student + LREC"), vals)):
            ax.bar([xi + (i - 1) * w for xi in x], v, w, label=label)
        ax.set_xticks(list(x))
        ax.set_xticklabels([f"{r['student']}\n{r['linear_bpw']:.2f}->{r['linear_bpw_lrec']:.2f} bpw" for r in rows],
                           fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("perplexity")
        ax.set_title(text, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if j == 0:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    sys.exit(main())
