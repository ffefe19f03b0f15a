"""tools/bench_methods.py: the smoke study end to end on a tiny Q4_1 Llama (two steps per run, one
base, two methods, the learning-rate sweep, the merge check, the report), the budget arithmetic
against the adapters' own parameter counts, and the split/rebuild of the starting file."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from lowtune.quantize_model import quantize_model

from helpers import write_tiny_llama_gguf

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_methods.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_methods", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up while being defined
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_q4_1(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_methods")
    f32 = write_tiny_llama_gguf(d / "tiny-f32.gguf", layers=3, dim=64, ffn=128, heads=4, kv_heads=2,
                          emb_scale=0.3, scale=0.12)
    return quantize_model(f32, d / "tiny-q4_1.gguf", "Q4_1").path


@pytest.fixture(scope="module")
def smoke(bench, tiny_q4_1, tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    assert bench.main(["--smoke", "--source", str(tiny_q4_1), "--out", str(out), "--device", "cpu"]) == 0
    return out, json.loads((out / bench.RESULTS).read_text())


def test_smoke_trains_every_method_and_rate(smoke):
    _, doc = smoke
    s = doc["header"]["settings"]
    runs = doc["runs"]
    assert sorted((r["method"], r["lr"]) for r in runs) == sorted((m, lr) for m in s["methods"] for lr in s["lrs"])
    for r in runs:
        assert "error" not in r, r
        assert all(math.isfinite(r[k]) and r[k] > 1 for k in ("val_ppl", "test_ppl", "forget_ppl"))
        # what the budget arithmetic predicted is what the adapters allocated
        assert r["params"] == doc["budgets"][r["budget"]][r["method"]]["params"], r
        assert "params_note" not in r


def test_smoke_chooses_the_rate_with_the_lowest_validation_perplexity(smoke):
    _, doc = smoke
    for m, lr in doc["selected_lr"]["Q4_1"].items():
        sweep = {r["lr"]: r["val_ppl"] for r in doc["runs"] if r["method"] == m}
        assert lr == min(sweep, key=sweep.get)


def test_smoke_merge_check(smoke):
    _, doc = smoke
    merges = {r["method"]: r for r in doc["merges"]}
    assert set(merges) == {"lora", "qahira"}
    adapted = 7 * len(doc["budgets"]["r8"]["qahira"]["layers"])
    # QA-HiRA moves only the Q4_1 mins; LoRA's update is re-quantized
    assert merges["qahira"]["paths"].get("min") == adapted and "requantize" not in merges["qahira"]["paths"]
    assert merges["lora"]["paths"].get("requantize") == 7 * len(doc["budgets"]["r8"]["lora"]["layers"])
    for r in merges.values():
        assert math.isfinite(r["merged_ppl"]) and math.isfinite(r["unmerged_ppl"]) and len(r["sha256"]) == 64


def test_smoke_report(bench, smoke):
    out, doc = smoke
    md = (out / "methods.md").read_text()
    for heading in ("### Bases", "### Budgets", "### Task", "### Forgetting", "### Learning-rate sweep",
                    "### Merge check", "### The papers' claims", "### Time"):
        assert heading in md
    assert "| Q4_1 |" in md
    if importlib.util.find_spec("matplotlib"):
        assert (out / "methods.png").read_bytes()[:4] == b"\x89PNG"
    (out / "methods.md").unlink()
    assert bench.main(["--report", str(out)]) == 0
    assert (out / "methods.md").read_text() == md


def test_budgets_match_lora_counts(bench):
    # SmolLM2-135M's decoder linears (N, K, quantization group of Q4_1)
    shapes = {"attn_q": (576, 576, 32), "attn_k": (192, 576, 32), "attn_v": (192, 576, 32),
              "attn_output": (576, 576, 32), "ffn_gate": (1536, 576, 32), "ffn_up": (1536, 576, 32),
              "ffn_down": (576, 1536, 32)}
    layers = list(range(30))
    for rank in (8, 16):
        pl = bench.placements(shapes, layers, rank)
        lora = pl["lora"].params
        assert lora == rank * sum(n + k for n, k, _ in shapes.values()) * 30
        assert pl["qbara"].params == pl["dylora"].params == lora
        q = pl["qalora"]  # the nearest count: one rank more or less is further from LoRA's
        for other in (q.rank - 1, q.rank + 1):
            assert abs(q.params - lora) <= abs(bench.layer_params("qalora", other, shapes) * 30 - lora)
        h = pl["qahira"]  # every linear of the last L layers
        per = sum(n * (k // g) for n, k, g in shapes.values())
        assert h.params == per * len(h.layers) and h.layers == tuple(layers[-len(h.layers):])
        if len(h.layers) < 30:
            assert abs(h.params - lora) <= per / 2
    assert bench.placements(shapes, layers, 16)["qahira"].ratio < 1  # even all 30 layers hold less


def test_parts_rebuild_the_source(bench, tiny_q4_1, tmp_path):
    m = bench.prepare_parts(tiny_q4_1, tmp_path / "carry")
    assert len(m["parts"]) == 2 and sum(p["bytes"] for p in m["parts"]) == tiny_q4_1.stat().st_size
    flat = tmp_path / "arrived"
    flat.mkdir()
    for part in ("part-1", "part-2"):
        for f in (tmp_path / "carry" / part).iterdir():
            (flat / f.name).write_bytes(f.read_bytes())
    (flat / m["parts"][1]["file"]).rename(flat / "elsewhere")
    with pytest.raises(SystemExit, match="missing"):
        bench.assemble_parts(flat, tmp_path / "bases")
    (flat / "elsewhere").rename(flat / m["parts"][1]["file"])
    rebuilt = bench.assemble_parts(flat, tmp_path / "bases")
    assert rebuilt.read_bytes() == tiny_q4_1.read_bytes()
