"""The `lowtune` command line: info, eval, generate, errors, a help that loads no torch, progress bar.

Fast tests run a tiny random Llama written to a GGUF file here (byte-level tokenizer, chat
template); the smollm2 ones use the real SmolLM2 with small windows.
"""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lowtune import cli
from lowtune.progress import Progress

from helpers import write_tiny_llama_gguf


def write_tiny_gguf(path: Path, chat: bool = True) -> Path:
    """A 2-layer random Llama (Q8_0 matrices, Q4_1 MLP, GQA) with a byte-level BPE vocabulary."""
    return write_tiny_llama_gguf(path, lambda name: "Q4_1" if ".ffn_" in name else "Q8_0", chat=chat,
                                 scale=0.125)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("cli") / "tiny.gguf")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cli") / "text.txt"
    p.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    return p


def run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------------------------
# commands on the tiny model


def test_info(tiny_gguf, capsys):
    rc, out, _ = run(["info", tiny_gguf], capsys)
    assert rc == 0
    assert "architecture    llama" in out and "layers          2" in out and "kv 2" in out
    assert "Q8_0 x" in out and "Q4_1 x6" in out and "tied embeddings yes" in out
    rc, out, _ = run(["info", tiny_gguf, "--json"], capsys)
    info = json.loads(out)
    assert info["tensor_types"]["Q4_1"]["tensors"] == 6 and info["config"]["heads"] == 4
    n = info["params"]
    assert 4 < info["bits_per_weight"] < 32 and n == sum(v["params"] for v in info["tensor_types"].values())


def test_eval_json_is_the_last_line(tiny_gguf, text_file, capsys):
    rc, out, err = run(["eval", tiny_gguf, "--text", text_file, "--ctx", 64, "--chunks", 3, "--json",
                        "--device", "cpu", "--dtype", "fp32"], capsys)
    assert rc == 0
    r = json.loads(out.strip().splitlines()[-1])
    assert r["tokens"] == 3 * 63 and r["perplexity"] > 1
    assert "eval" in err  # the progress bar goes to stderr
    # the same number as the Python API on the same tokens
    from lowtune.evaluate import perplexity
    from lowtune.model import LlamaModel
    from lowtune.tokenizer import load_tokenizer
    model = LlamaModel.from_gguf(tiny_gguf)
    ids = load_tokenizer(model.metadata).encode(text_file.read_text(), add_bos=False)
    assert perplexity(model, ids, 64, 3)["perplexity"] == pytest.approx(r["perplexity"], rel=1e-6)


def test_generate_greedy_is_deterministic(tiny_gguf, capsys):
    args = ["generate", tiny_gguf, "--prompt", "the fox", "-n", 12]
    rc, out1, _ = run(args, capsys)
    rc2, out2, _ = run(args, capsys)
    assert rc == rc2 == 0 and out1 == out2 and out1.startswith("the fox")
    rc, out, _ = run(args + ["--temperature", 0.9, "--top-k", 20, "--seed", 3], capsys)
    assert rc == 0 and out.startswith("the fox")
    rc, out, _ = run(["generate", tiny_gguf, "--prompt", "hi", "-n", 4, "--chat"], capsys)
    assert rc == 0 and not out.startswith("hi")  # chat prints only the reply


def test_generate_reports_prompt_and_decode_speed_apart(tiny_gguf, capsys):
    rc, out, err = run(["generate", tiny_gguf, "--prompt", "the fox", "-n", 5], capsys)
    speeds = re.search(r"prompt: (\d+) tokens, ([\d.]+) tokens/s; decode: (\d+) tokens, ([\d.]+) tokens/s", err)
    assert rc == 0 and speeds and "tokens/s" not in out  # stdout keeps only the text
    assert int(speeds[1]) >= 1 and 0 <= int(speeds[3]) <= 4 and float(speeds[2]) > 0


# ----------------------------------------------------------------------------------------------
# errors: one line, non-zero status, no traceback


def test_errors_are_one_line(tmp_path, tiny_gguf, text_file, capsys):
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello, not a model")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[:3000])
    no_chat = write_tiny_gguf(tmp_path / "nochat.gguf", chat=False)
    cases = [
        (["info", tmp_path / "missing.gguf"], "not found"),
        (["info", not_gguf], "GGUF"),
        (["info", truncated], "cut.gguf"),
        (["eval", tiny_gguf, "--text", tmp_path / "missing.txt"], "not found"),
        (["eval", truncated, "--text", text_file], "cut.gguf"),
        (["eval", tiny_gguf, "--text", text_file, "--ctx", 100000], "fewer than one window"),
        (["generate", no_chat, "--prompt", "x", "--chat"], "chat template"),
        (["generate", tiny_gguf, "--prompt", "x", "--device", "tpu"], "--device"),
    ]
    for argv, want in cases:
        rc, out, err = run(argv, capsys)
        assert rc == 1, argv
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lowtune: error:") and want in lines[0], (argv, err)
        assert "Traceback" not in err


def test_python_dash_m_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lowtune", "info", str(tmp_path / "nope.gguf")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("lowtune: error:") and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "lowtune", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "generate" in r.stdout and "eval" in r.stdout


def test_help_and_argument_errors_load_no_torch():
    """The parser needs only the *_cli modules: `lowtune --help` answers without importing torch."""
    code = "import sys; from lowtune import cli; cli.build_parser().format_help(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
    r = subprocess.run([sys.executable, "-c", "import sys; from lowtune import cli; cli.main(['finetune', '--help'])"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--base-adapter" in r.stdout and "--force" in r.stdout


# ----------------------------------------------------------------------------------------------
# progress bar


def test_progress_bar_reports_loss_tokens_and_memory():
    s = io.StringIO()
    with Progress(total=3, desc="train", stream=s, log_every=0) as bar:
        for i in range(3):
            bar.update(1, tokens=100, loss=2.0 - i * 0.5)
    lines = s.getvalue().strip().splitlines()
    assert len(lines) == 3  # one line per update when not a terminal and log_every=0; none repeated
    assert lines[-1].startswith("train | 3/3 [") and "loss 1" in lines[-1] and "tok/s" in lines[-1]
    assert "rss" in lines[-1] or "vram" in lines[-1]
    quiet = io.StringIO()
    with Progress(total=2, stream=quiet, enabled=False) as bar:
        bar.update(2)
    assert quiet.getvalue() == ""


# ----------------------------------------------------------------------------------------------
# the real model (slow): small windows keep it cheap


def test_smollm2_info_and_eval(smollm2_path, botchan_text, tmp_path, capsys):
    rc, out, _ = run(["info", smollm2_path, "--json"], capsys)
    info = json.loads(out)
    assert rc == 0 and info["params"] == 134_515_008 and info["tensor_types"]["Q4_1"]["tensors"] == 210
    assert info["tensor_types"]["Q8_0"]["tensors"] == 1 and info["config"]["kv_heads"] == 3
    text = tmp_path / "botchan.txt"
    text.write_text(botchan_text[:20000], encoding="utf-8")
    rc, out, _ = run(["eval", smollm2_path, "--text", text, "--ctx", 128, "--chunks", 2, "--json"], capsys)
    r = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and r["tokens"] == 254 and 10 < r["perplexity"] < 100
    rc, out, _ = run(["generate", smollm2_path, "--prompt", "The capital of France is", "-n", 3], capsys)
    assert rc == 0 and out.startswith("The capital of France is Paris")
