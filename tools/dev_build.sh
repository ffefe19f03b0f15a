#!/usr/bin/env bash
# Build lowtune._C in place (python/lowtune/_C*.so) for development without installing:
#   tools/dev_build.sh            # CPU only (fast)
#   LOWTUNE_CUDA=ON tools/dev_build.sh
# then run with PYTHONPATH=python (e.g. PYTHONPATH=python pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
cuda=${LOWTUNE_CUDA:-OFF}
build=build/dev-cuda-$cuda
# LOWTUNE_CUDA_ARCHITECTURES (e.g. 90) limits the CUDA targets, for a faster build (CMakeLists.txt
# reads it from the environment, as `pip install .` does).
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLOWTUNE_CUDA="$cuda" \
  -DPython_EXECUTABLE="$(command -v python3)" -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" >/dev/null
cmake --build "$build"
cp "$build"/_C*.so python/lowtune/
echo "built $(ls python/lowtune/_C*.so)"
