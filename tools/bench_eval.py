"""Evaluation and decoding speed on the CPU: lowtune against llama.cpp on the same model, text,
machine and thread count.

    python tools/bench_eval.py                       # SmolLM2-135M-Instruct Q4_1, 4 windows of 512
    python tools/bench_eval.py --model M.gguf --ctx 512 --chunks 8 --threads 2 --json out.json

Prompt evaluation: both sides score the same windows of the bundled Botchan text (llama.cpp's
tokenization), one window at a time from a fresh context. lowtune's time is its whole
perplexity pass (forward and loss); llama.cpp's is its `eval` of the window (forward and all
logits), its log-softmax being computed afterwards, untimed. Both report the perplexity they
computed (a check that they did the same work).

--llamacpp-activations scores the windows once more in lowtune with every product's activations
rounded to 8 bits as llama.cpp's CPU rounds them (lowtune.llamacpp_activations): what is left of
the perplexity gap then is not that rounding.

Decoding: both continue the same prompt (the first --prompt-tokens of the text) greedily for
--new-tokens tokens, one token per forward pass against the KV cache. Timed: the steps after the
prompt (each forward pass and the argmax), reported as tokens/s; the prompt's forward pass is
timed apart. The number of leading tokens both sides generated alike is shown as a check.

--model-steps also decodes in lowtune with its compiled CPU decoder switched off (each step the
model's forward pass: what a family the decoder does not take runs), as a third row.

The two sides alternate per repeat, so load from other jobs on a shared machine hits both alike;
the table shows the median over repeats. The machine's load average before and after is recorded.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from smollm2 import smollm2_path  # noqa: E402

import lowtune  # noqa: E402
from lowtune.evaluate import perplexity, windows  # noqa: E402
from lowtune.generate import GenerationStats, generate  # noqa: E402
from lowtune.llamacpp_activations import rounded_like_llamacpp  # noqa: E402
from lowtune.loading import load_model  # noqa: E402




def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The vector extensions of /proc/cpuinfo that matter to the kernels."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                                    "avx_vnni", "amx_tile") if f in have]
    except OSError:
        pass
    return []


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def llamacpp_eval(llm, w: np.ndarray) -> tuple[float, float]:
    """(seconds in eval, perplexity) of llama.cpp over windows w [W, ctx]."""
    nll, scored, seconds = 0.0, 0, 0.0
    for window in w.tolist():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(window)
        seconds += time.perf_counter() - t0
        z = np.asarray(llm.scores[:len(window)], dtype=np.float64)[:-1]
        z -= z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        nll -= logp[np.arange(len(window) - 1), window[1:]].sum()
        scored += len(window) - 1
    return seconds, math.exp(nll / scored)


def llamacpp_decode(llm, prompt: list[int], new_tokens: int) -> dict:
    """Greedy continuation by llama.cpp: the prompt's eval, then one eval per token."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prompt_s = time.perf_counter() - t0
    out = [int(np.argmax(llm.scores[llm.n_tokens - 1]))]
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([out[-1]])
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    decode_s = time.perf_counter() - t0
    return {"tokens": out, "prompt_seconds": prompt_s, "decode_seconds": decode_s, "decode_steps": new_tokens - 1}


def lowtune_decode(model, prompt: list[int], new_tokens: int, compiled: bool = True) -> dict:
    stats = GenerationStats()
    with contextlib.ExitStack() as stack:
        if not compiled:
            stack.enter_context(mock.patch("lowtune.generate.cpu_decoder", lambda model, cache: None))
        out = generate(model, prompt, new_tokens, stats=stats)
    return {"tokens": out, "prompt_seconds": stats.prompt_seconds, "decode_seconds": stats.decode_seconds,
            "decode_steps": stats.decode_tokens, "compiled_decoder": stats.compiled_decoder}


def same_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=64, help="prompt length for decoding")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens to decode")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--llamacpp-activations", action="store_true",
                    help="also score the windows in lowtune with each product's activations rounded to 8 bits "
                         "as llama.cpp's CPU does (lowtune.llamacpp_activations): the perplexity gap that is left")
    ap.add_argument("--model-steps", action="store_true",
                    help="also decode with lowtune's compiled CPU decoder off (the model's forward each step)")
    args = ap.parse_args()
    from llama_cpp import Llama

    path = args.model or smollm2_path()
    torch.set_num_threads(args.threads)
    lowtune._C.set_num_threads(args.threads)
    load_before = load_average()
    llm = Llama(model_path=str(path), n_ctx=max(args.ctx, args.prompt_tokens + args.new_tokens), n_batch=args.ctx,
                n_threads=args.threads, logits_all=True, verbose=False)
    text = (Path(lowtune.__file__).parent / "data" / "botchan.txt").read_text(encoding="utf-8")
    ids = llm.tokenize(text.encode(), add_bos=False)
    w = windows(ids, args.ctx, args.chunks).numpy()
    prompt = [int(t) for t in ids[:args.prompt_tokens]]
    model = load_model(path, dtype=torch.float32)

    evals = {"lowtune": [], "llama.cpp": []}
    decodes = {"lowtune": [], "llama.cpp": []}
    steps = []  # --model-steps
    for _ in range(args.repeats):
        r = perplexity(model, torch.from_numpy(w).reshape(-1), ctx=args.ctx)
        evals["lowtune"].append((r["seconds"], r["perplexity"]))
        evals["llama.cpp"].append(llamacpp_eval(llm, w))
        decodes["lowtune"].append(lowtune_decode(model, prompt, args.new_tokens))
        decodes["llama.cpp"].append(llamacpp_decode(llm, prompt, args.new_tokens))
        if args.model_steps:
            steps.append(lowtune_decode(model, prompt, args.new_tokens, compiled=False))
    load_after = load_average()

    n = w.size
    info = lowtune.build_info()
    head = (f"# {date.today()}  {path.name}  {cpu_name()} ({', '.join(cpu_flags())}), {os.cpu_count()} CPUs, "
            f"{args.threads} threads  torch {torch.__version__}  lowtune {info['cpu_isa']} kernels, "
            f"{info.get('cpu_threading', 'threads')} threading  load average {load_before} -> {load_after}")
    print(head)
    print(f"# prompt evaluation: {w.shape[0]} windows x {args.ctx} tokens; decoding: {args.new_tokens} tokens "
          f"after a {len(prompt)}-token prompt; median of {args.repeats}")
    print("| engine | prompt eval tokens/s | decode tokens/s | perplexity |\n|---|---|---|---|")
    out = {"header": head, "model": path.name, "threads": args.threads, "ctx": args.ctx, "windows": int(w.shape[0]),
           "prompt_tokens": len(prompt), "new_tokens": args.new_tokens, "cpu": cpu_name(), "cpu_flags": cpu_flags(),
           "cpus": os.cpu_count(), "lowtune_build": info, "torch": torch.__version__,
           "load_average_before": load_before, "load_average_after": load_after}
    for name in evals:
        s = statistics.median(t for t, _ in evals[name])
        d = decodes[name]
        dec = statistics.median(r["decode_steps"] / r["decode_seconds"] for r in d)
        pre = statistics.median(len(prompt) / r["prompt_seconds"] for r in d)
        out[name] = {"eval_tokens_per_second": n / s, "eval_seconds": s, "perplexity": evals[name][0][1],
                     "decode_tokens_per_second": dec, "decode_prompt_tokens_per_second": pre,
                     "eval_seconds_all": [t for t, _ in evals[name]],
                     "decode_seconds_all": [r["decode_seconds"] for r in d], "tokens": d[0]["tokens"]}
        if "compiled_decoder" in d[0]:
            out[name]["compiled_decoder"] = d[0]["compiled_decoder"]
        print(f"| {name} | {n / s:.1f} | {dec:.1f} | {evals[name][0][1]:.4f} |")
    if steps:
        dec = statistics.median(r["decode_steps"] / r["decode_seconds"] for r in steps)
        out["lowtune_model_steps"] = {"decode_tokens_per_second": dec, "tokens": steps[0]["tokens"],
                                      "decode_seconds_all": [r["decode_seconds"] for r in steps]}
        print(f"| lowtune, model steps (no compiled decoder) | | {dec:.1f} | |")
    agree = same_prefix(out["lowtune"]["tokens"], out["llama.cpp"]["tokens"])
    out["greedy_tokens_alike"] = agree
    ev = out["lowtune"]["eval_tokens_per_second"] / out["llama.cpp"]["eval_tokens_per_second"]
    de = out["lowtune"]["decode_tokens_per_second"] / out["llama.cpp"]["decode_tokens_per_second"]
    print(f"lowtune / llama.cpp speed: prompt eval {ev:.2f}, decode {de:.2f}; "
          f"greedy tokens alike: first {agree} of {args.new_tokens}")
    if args.llamacpp_activations:
        with rounded_like_llamacpp():
            r = perplexity(model, torch.from_numpy(w).reshape(-1), ctx=args.ctx)
        gap = out["llama.cpp"]["perplexity"] / r["perplexity"] - 1
        out["lowtune_llamacpp_activations"] = {"perplexity": r["perplexity"], "eval_seconds": r["seconds"],
                                               "llamacpp_over_it": gap}
        print(f"lowtune with llama.cpp's rounding of activations: perplexity {r['perplexity']:.4f} "
              f"(llama.cpp {out['llama.cpp']['perplexity']:.4f}, {100 * gap:+.2f}%; with float activations "
              f"{100 * (out['llama.cpp']['perplexity'] / out['lowtune']['perplexity'] - 1):+.2f}%)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
