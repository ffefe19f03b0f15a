#!/usr/bin/env bash
# One GPU call that builds lowtune for sm_90 and runs every CUDA-marked test of the suite (the
# tests that need the real SmolLM2 or llama.cpp are left out: neither is on the GPU machine), then
# the kernel benchmark's small-M and large-M passes (tools/gpu/kernels.sh bench).
# Usage, from the repository root: OUT=dir bash tools/gpu/check_all.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
out=${OUT:-gpu_check}; mkdir -p "$out"
t0=$SECONDS
carried_wheels "$out/pip.log"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader | tee "$out/gpu.txt"
# always through the (incremental) build: a module left by an earlier call may be stale
build_cuda "$out/build.log" || exit 1
echo "== CUDA tests"
timeout ${TEST_S:-300} $py -m pytest -q -p no:cacheprovider -m "cuda and not smollm2 and not llamacpp and not gemma3" \
  -n 4 --dist loadfile tests >"$out/tests.log" 2>&1
echo "tests exit $? after $((SECONDS - t0)) s"
grep -E "^(FAILED|ERROR)|passed|failed" "$out/tests.log" | tail -40
if [ "${BENCH:-1}" = 1 ]; then
  OUT="$out/kernels" timeout $(( 560 - (SECONDS - t0) )) bash tools/gpu/kernels.sh bench >"$out/kernels.log" 2>&1
  tail -c 5000 "$out/kernels.log"
fi
if [ -n "${TRAIN_STAGES:-}" ]; then  # then tools/gpu/train_speed.sh's stages in what is left
  OUT="$out/train" STAGES="$TRAIN_STAGES" BUDGET_S=$(( 570 - (SECONDS - t0) )) \
    bash tools/gpu/train_speed.sh >"$out/train.log" 2>&1
  tail -c 6000 "$out/train.log"
fi
echo "== total $((SECONDS - t0)) s"
# at most 8 files come back: everything in one archive, the tests' log beside it
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && mv "$out.tgz" "$out/all.tgz"
find "$out" -mindepth 1 -maxdepth 1 ! -name all.tgz ! -name tests.log -exec rm -rf {} +
