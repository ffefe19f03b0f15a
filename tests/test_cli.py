"""The `lowtune` command line: info, eval, generate, errors, a help that loads no torch, progress bar.

Fast tests run a tiny random Llama written to a GGUF file here (byte-level tokenizer, chat
template); the smollm2 ones use the real SmolLM2 with small windows.
"""
from __future__ import annotations

import errno
import io
import json
import os
import re
import stat
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


def test_eval_with_llamacpp_activations_rounds_them(tiny_gguf, text_file, capsys):
    args = ["eval", tiny_gguf, "--text", text_file, "--ctx", 64, "--chunks", 3, "--json", "--quiet",
            "--device", "cpu", "--dtype", "fp32"]
    ppl = {}
    for mode in ("float", "llama.cpp"):
        rc, out, _ = run(args + ["--activations", mode], capsys)
        assert rc == 0
        ppl[mode] = json.loads(out.strip().splitlines()[-1])["perplexity"]
    assert "activations rounded as llama.cpp does" in out
    # 8-bit activations move the tiny model's perplexity a little, not a lot
    assert ppl["llama.cpp"] != ppl["float"]
    assert ppl["llama.cpp"] == pytest.approx(ppl["float"], rel=0.05)


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


def test_a_missing_model_is_worded_the_same_by_every_command(tmp_path, text_file, capsys):
    gone = tmp_path / "gone.gguf"
    argvs = [["info", gone], ["eval", gone, "--text", text_file], ["generate", gone, "--prompt", "x"],
             ["quantize", gone, "--type", "Q8_0", "-o", tmp_path / "q.gguf"],
             ["finetune", gone, "--data", text_file, "-o", tmp_path / "run"],
             ["export", gone, "-o", tmp_path / "m.gguf"],
             ["correct", gone, "--teacher", gone, "--text", text_file, "-o", tmp_path / "lrec"]]
    lines = set()
    for argv in argvs:
        rc, _, err = run(argv, capsys)
        assert rc == 1, argv
        lines.add(err.strip())
    assert lines == {f"lowtune: error: model file not found: {gone} (a .gguf file or a Hugging Face "
                     "safetensors directory is expected)"}


def finetune_args(model, data, out, *extra):
    return ["finetune", model, "--data", data, "--steps", 2, "--seq-len", 32, "--batch", 1,
            "--eval-tokens", 64, "--device", "cpu", "-o", out, *extra]


def test_finetune_refuses_unusable_inputs_in_one_line(tmp_path, tiny_gguf, text_file, capsys):
    noise = tmp_path / "noise.txt"
    noise.write_bytes(bytes(range(256)) * 8)
    short = tmp_path / "short.txt"
    short.write_text("hello world")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    old_run = tmp_path / "old"
    (old_run / "checkpoints").mkdir(parents=True)
    (old_run / "checkpoints" / "step-00000004.pt").write_bytes(b"")
    cases = [
        (finetune_args(tiny_gguf, noise, tmp_path / "r1"), "does not look like text"),
        (finetune_args(tiny_gguf, short, tmp_path / "r2"), "too few to fill one training sequence of 32"),
        (finetune_args(tiny_gguf, tmp_path / "none.txt", tmp_path / "r3"), "data file not found"),
        (finetune_args(tiny_gguf, text_file, a_file), f"the run directory {a_file} is a file"),
        (finetune_args(tiny_gguf, text_file, a_file / "run"), f"{a_file} is a file, not a directory"),
        (finetune_args(tiny_gguf, text_file, old_run), "already holds a run (checkpoints up to step 4)"),
    ]
    for argv, want in cases:
        rc, _, err = run(argv, capsys)
        lines = err.strip().splitlines()
        assert rc == 1 and len(lines) == 1 and want in lines[0], (argv, err)
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()
    # with --allow-binary the same bytes train
    with pytest.warns(UserWarning, match="not valid UTF-8"):
        rc, _, err = run(finetune_args(tiny_gguf, noise, tmp_path / "r4", "--allow-binary"), capsys)
    assert rc == 0, err


def test_unwritable_places_are_named(tmp_path, monkeypatch, capsys, tiny_gguf, text_file):
    from lowtune import paths
    monkeypatch.setattr(paths.os, "access", lambda path, mode: str(path) != str(tmp_path))  # as for a user
    rc, _, err = run(finetune_args(tiny_gguf, text_file, tmp_path / "runs" / "a"), capsys)
    assert rc == 1 and err.strip() == (f"lowtune: error: cannot create the run directory {tmp_path}/runs/a: "
                                       f"{tmp_path} is not writable; choose another place")
    rc, _, err = run(["export", tiny_gguf, "-o", tmp_path / "m.gguf"], capsys)
    assert rc == 1 and f"the directory {tmp_path} is not writable" in err


def test_output_paths_fail_before_torch_loads(tmp_path, tiny_gguf, text_file):
    """-o is checked before the library (and torch) is imported: the error comes at once."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    code = ("import sys; from lowtune import cli; "
            f"rc = cli.main(['finetune', {str(tiny_gguf)!r}, '--data', {str(text_file)!r}, '-o', "
            f"{str(a_file)!r}]); print(rc, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["1", "False"] and "is a file" in r.stderr, r.stderr


def test_finetune_and_export_say_what_they_wrote(tmp_path, tiny_gguf, text_file, capsys, monkeypatch):
    out = tmp_path / "run"
    rc, stdout, err = run(finetune_args(tiny_gguf, text_file, out), capsys)
    assert rc == 0, err
    assert "2 steps of 1 sequence of up to 32 tokens" in stdout
    closing = stdout.strip().splitlines()[-1]
    assert closing.startswith(f"wrote {out}: ")
    for name in ("config.json", "metrics.jsonl", "summary.json", "adapter/ (adapter.safetensors, "
                 "adapter_config.json)", "checkpoints/"):
        assert name in closing
    # every file gets the mode a new file gets here (0644 under umask 022), the adapter's too
    umask = os.umask(0)
    os.umask(umask)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert out / "adapter" / "adapter.safetensors" in files
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o666 & ~umask for p in files}

    merged = tmp_path / "merged.gguf"
    rc, stdout, err = run(["export", tiny_gguf, "--adapter", out, "-o", merged], capsys)
    assert rc == 0 and f"wrote {merged}" in stdout, err
    # a write that fails names the user's file, not the temporary ones, and keeps the old one
    from lowtune import gguf_io

    def full_disk(src, dst, *a):
        raise OSError(errno.ENOSPC, "No space left on device", str(merged) + ".tmp.data")

    monkeypatch.setattr(gguf_io.shutil, "copyfileobj", full_disk)
    before = merged.read_bytes()
    rc, _, err = run(["export", tiny_gguf, "--adapter", out, "-o", merged], capsys)
    assert rc == 1 and err.strip() == (f"lowtune: error: could not write {merged}: the disk is full (the "
                                       "previous version is intact); free some space or choose another place")
    assert merged.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()
                                                    if p.name.startswith("merged")) == ["merged.gguf"]


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
    assert all(", eta " in line for line in lines[:-1]) and ", eta " not in lines[-1]
    quiet = io.StringIO()
    with Progress(total=2, stream=quiet, enabled=False) as bar:
        bar.update(2)
    assert quiet.getvalue() == ""
    brief = io.StringIO()  # work shorter than `delay` shows nothing
    with Progress(total=2, stream=brief, log_every=0, delay=60) as bar:
        bar.update(2)
    assert brief.getvalue() == ""


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_eta_and_log_lines_above_the_bar(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("lowtune.progress.time.perf_counter", lambda: clock[0])
    tty, logged = Terminal(), []
    with Progress(total=10, desc="finetune", stream=tty) as bar:
        clock[0] += 30.0             # a slow first step (compilation)
        bar.update(1)
        assert bar.eta() == pytest.approx(9 * 30.0)
        clock[0] += 2.0              # then 2 s a step: the pace after the first update
        bar.update(1)
        assert bar.eta() == pytest.approx(8 * 2.0)
        assert bar.line().endswith("32s, eta 16s")
        bar.write("step 2: held-out loss 1.5", logged.append)
    assert logged == ["step 2: held-out loss 1.5"]
    # on a terminal the bar's line is cleared before the log line and drawn again after it
    out = tty.getvalue()
    assert out.count("\r\x1b[2K") >= 3 and out.endswith("\n")
    assert "finetune | 2/10" in out.split("\r\x1b[2K")[-1]


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
