#!/usr/bin/env bash
# The adapter-method study (tools/bench_methods.py) on one H200. The 98 MB starting file
# (SmolLM2-135M-Instruct Q4_1) is more than one transfer to the GPU machine holds (64 MiB with the
# tree), so it travels as two halves, sent with two commands run one after the other on the same
# machine:
#
#   here, once (/.carry/ and /.whl/ are git-ignored):
#     python3 tools/bench_methods.py --prepare .carry/methods         # part-1, part-2: ~47 MiB each
#     python3 -m pip download --no-deps gguf==0.19.0 -d .whl          # the lowtune dependency the image lacks
#   command 1, sending the ignored paths .whl/gguf-0.19.0-py3-none-any.whl and .carry/methods/part-1:
#     bash tools/gpu/methods.sh install
#   command 2, sending .carry/methods/part-2, right after command 1:
#     bash tools/gpu/methods.sh study
#
# install: builds and installs lowtune with the sm_90 CUDA kernels (pip, no build isolation) and
#          keeps part 1 in $STASH.
# stash:   keeps part 1 in $STASH only (lowtune built in place by another command, e.g.
#          tools/gpu/check_all.sh; then run study with PYTHONPATH=python).
# study:   adds part 2, rebuilds the file (sha256 checked), runs the study with a deadline so the
#          command ends inside its 10 minutes, and leaves methods.json, methods.md, methods.png and
#          the Q4_1 adapters (adapter-q41-<method>.tar, for the llama.cpp column on a CPU:
#          `python3 tools/bench_methods.py --llamacpp DIR --out DIR2`) in $OUT.
# The machine keeps what command 1 did only while it is held (the GPU runner here keeps an idle
# machine about 30 s); if it was released in between, `study` says so and both commands run again.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
STASH=${STASH:-$HOME/lowtune-methods}
OUT=${OUT:-runs/methods-gpu}
mkdir -p "$STASH" "$OUT"

case "${1:-}" in
  install)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    python3 -m pip install -q --no-index --no-deps .whl/gguf-0.19.0-py3-none-any.whl
    t0=$SECONDS
    LOWTUNE_CUDA=ON LOWTUNE_CUDA_ARCHITECTURES=${LOWTUNE_CUDA_ARCHITECTURES:-90} \
      CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) python3 -m pip install -q --no-build-isolation --no-index .
    echo "lowtune built and installed in $((SECONDS - t0)) s"
    (cd /tmp && python3 -c "import lowtune; print(lowtune.build_info())")
    cp .carry/methods/part-1/* "$STASH/"
    echo "part 1 kept in $STASH: now run 'bash tools/gpu/methods.sh study', sending .carry/methods/part-2" ;;
  stash)  # part 1 only, for a machine where lowtune is built in place (tools/gpu/check_all.sh)
    cp .carry/methods/part-1/* "$STASH/"
    echo "part 1 kept in $STASH" ;;
  study)
    # the installed lowtune, or the in-place build when PYTHONPATH=python
    if ! python3 -c "import lowtune, sys; sys.exit(0 if lowtune.build_info()['cuda'] else 1)" 2>/dev/null; then
      echo "lowtune with CUDA is not installed on this machine (was it released after 'install'?):"
      echo "run 'methods.sh install' (sending the gguf wheel and .carry/methods/part-1), then 'methods.sh study' at once"
      exit 3
    fi
    [ -f "$STASH/manifest.json" ] || { echo "part 1 is not in $STASH: run 'methods.sh install' first"; exit 3; }
    cp .carry/methods/part-2/* "$STASH/"
    python3 tools/bench_methods.py --source "$STASH" --work "$STASH/work" --out "$OUT" \
      --deadline-s "${DEADLINE_S:-480}" --grace-s 45 "${@:2}"
    ls -la "$OUT" ;;
  *)
    echo "usage: tools/gpu/methods.sh install|stash|study [extra bench_methods.py arguments]"; exit 2 ;;
esac
