#!/usr/bin/env bash
# The M <= 8 staged forward with 4 warps per 16-row tile (1024-element stages, the default) against
# 2 warps (512-element stages: twice the stages per row, so the copies run ahead of the decoding
# inside a CTA, and twice the resident CTAs): build, the staged tests under both, then the forward
# at M = 1 under both, by graph replay (tools/bench_kernels.py). One short call (~3 minutes).
# Usage, from the repository root: OUT=dir bash tools/gpu/staged_k_warps.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-gpu_staged_k_warps}; mkdir -p "$out"
export PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
$py -c "import gguf" 2>/dev/null || $py -m pip install -q --no-index --no-deps .whl/gguf-*.whl >/dev/null 2>&1
env LOWTUNE_CUDA=ON LOWTUNE_CUDA_ARCHITECTURES=90 CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  tools/dev_build.sh >"$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
for wk in 2 4; do
  LOWTUNE_CUDA_STAGED_K_WARPS=$wk timeout 60 $py -m pytest -q -x -p no:cacheprovider tests/test_cuda.py \
    -k "staged" >"$out/test_wk$wk.log" 2>&1
  echo "tests, $wk warps: exit $? ($(tail -n 1 "$out/test_wk$wk.log"))"
done
for wk in 2 4; do
  LOWTUNE_CUDA_STAGED_K_WARPS=$wk timeout 40 $py tools/bench_kernels.py --device cuda --types Q4_K,Q4_1,INT4-g64 \
    --ms 1 --shapes 4096x4096,14336x4096,4096x14336 --kernels forward --peers "" --warmup-s 0.5 \
    --out "$out/bench_wk$wk.jsonl" >"$out/bench_wk$wk.log" 2>&1
  echo "bench, $wk warps: exit $?"; grep -E "^\| forward .*\| staged \|" "$out/bench_wk$wk.log"
done
LOWTUNE_CUDA_STAGED_K_WARPS=2 timeout 40 $py tools/bench_kernels.py --device cuda --decode --warmup-s 0.5 \
  --out "$out/decode_wk2.jsonl" >"$out/decode_wk2.log" 2>&1; grep -E "^decode" "$out/decode_wk2.log"
