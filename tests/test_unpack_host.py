"""The CUDA decoders (csrc/cuda/unpack.cuh) without a GPU: tests/cuda_host/unpack_host.cpp compiles them with the
host C++ compiler through stand-ins for the few CUDA intrinsics they use (tests/cuda_host/shim/), and each type's
random blocks (every code, random finite scales) go through load + decode and decode_fast at spans of 16 and 8,
codes and codes2 at 16, and decode_pairs (csrc/cuda/decode_pairs.cuh: the tensor-core kernels' bf16 and fp16 pairs,
through the magic-exponent path where the codes fit), against the CPU dequantization:

    decode: bit for bit (unpack.cuh's contract with block_math.h)
    decode_fast, codes (the one-row kernels' path) and codes2: within a few fp32 roundings of the block's
        largest value (one FMA where the CPU rounds a product and a sum), and every code below 2^kCodeBits
    decode_pairs: within a few roundings of the 16-bit type (of s, z and u*s + z) of the block's largest value

So a change to a decoder is checked here, on every machine, before the CUDA tests see it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from lowtune import _C
from lowtune.formats import FORMATS, get_format

import helpers

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent / "cuda_host"
QUANT_TYPES = sorted(f.name for f in FORMATS.values() if f.quantized)
MODES = ("decode<16>", "decode_fast<16>", "decode<8>", "decode_fast<8>", "codes<16>", "codes2", "pairs<bf16>",
         "pairs<fp16>")
NEEDS = {"codes<16>": 1, "codes2": 2}  # the flag bit unpack_host sets where the type has them


@pytest.fixture(scope="module")
def unpack_host(tmp_path_factory) -> Path:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    assert cxx, "no C++ compiler on PATH (set CXX): the extension's build needs one too"
    exe = tmp_path_factory.mktemp("unpack_host") / "unpack_host"
    build = subprocess.run([cxx, "-std=c++20", "-O1", "-ffp-contract=off", "-fno-strict-aliasing",
                            f"-I{HERE / 'shim'}", f"-I{ROOT / 'csrc'}", "-o", str(exe), str(HERE / "unpack_host.cpp")],
                           capture_output=True, text=True)
    assert build.returncode == 0, f"unpack_host did not compile (an intrinsic the shim lacks?):\n{build.stderr[-4000:]}"
    return exe


@pytest.mark.parametrize("name", QUANT_TYPES)
def test_cuda_decoders_match_cpu(name, unpack_host):
    fmt = get_format(name)
    rng = np.random.default_rng(sum(map(ord, name)))
    n, k = 8, 4 * fmt.block_elems
    raw = helpers.random_blocks(fmt, n, k, rng)
    ref = torch.empty((n, k), dtype=torch.float32)
    _C.dequantize(fmt.type_id, raw.ctypes.data, ref.data_ptr(), 0, n, k)
    ref = ref.numpy().reshape(-1, fmt.block_elems)
    run = subprocess.run([str(unpack_host), str(fmt.type_id)], input=raw.tobytes(), capture_output=True)
    assert run.returncode == 0, f"{name}: a code at or above 2^kCodeBits (exit {run.returncode}) {run.stderr!r}"
    flags = int(np.frombuffer(run.stdout[:4], np.int32)[0])
    out = np.frombuffer(run.stdout[4:], np.float32).reshape(ref.shape[0], len(MODES), fmt.block_elems)
    amax = np.abs(ref).max(axis=1, keepdims=True)
    bound = {"pairs<bf16>": 4 * 2.0**-7 * amax, "pairs<fp16>": 4 * 2.0**-10 * amax + 2.0**-24}
    for i, mode in enumerate(MODES):
        got = out[:, i]
        if mode in NEEDS and not flags & NEEDS[mode]:
            continue
        if mode.startswith("decode<"):
            bad = np.flatnonzero((got.view(np.uint32) != ref.view(np.uint32)).any(axis=1))
        else:
            tol = bound.get(mode, 8 * np.finfo(np.float32).eps * amax)
            bad = np.flatnonzero((np.abs(got - ref) > tol).any(axis=1))
        assert bad.size == 0, f"{name} {mode}: block {bad[0]} differs from the CPU's dequantization"
