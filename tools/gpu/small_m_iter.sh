#!/usr/bin/env bash
# One iteration on the small-M kernels, in one GPU call: build, the CUDA kernel tests, graph-replay
# timings of the forward at M = 1 and 8 (tools/gpu/profile_small_m.py, one process per entry: ~6 s
# each, so keep the lists short), Nsight Compute's
# instruction and stall statistics of the Q4_K M = 1 forward, its SASS, and (BENCH=1) the small-M
# table of tools/bench_kernels.py with its peers.
#   OUT=dir [BENCH=1] tools/gpu/small_m_iter.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
begin_call small_m_iter 540 || exit 1
# ENV_VARIANTS: environments to time each entry under (e.g. "LOWTUNE_CUDA_PATH=staged LOWTUNE_CUDA_PATH=direct"),
# for comparing kernel variants built side by side; the tests run under each.
variants=${ENV_VARIANTS:-"LOWTUNE_CUDA_PATH=staged"}
for v in $variants; do
  stage "tests_${v##*=}" 30 120 env "$v" $py -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_cuda_policy.py
done
t=tools/gpu/profile_small_m.py
{
  for e in ${TIME_ENTRIES:-Q4_K:14336x4096 Q4_1:14336x4096 INT4-g64:14336x4096 Q4_K:4096x14336 Q4_K:4096x4096}; do
    IFS=: read -r ty sh <<<"$e"
    for m in ${TIME_MS:-1 8}; do
      for v in $variants; do echo -n "$v "; env "$v" $py $t --type "$ty" --shape "$sh" --m "$m" --time; done
    done
  done
} >"$out/times.log" 2>&1
cat "$out/times.log"
# Nsight Compute on the Q4_K M = 1 forward, and every staged kernel's registers (ncu_small_m.sh).
BUILD=0 OUT="$out" ENTRIES="Q4_K:14336x4096:1:forward" BUDGET_S="$(left)" bash tools/gpu/ncu_small_m.sh
so=$(ls python/lowtune/_C*.so | head -n 1)
cuobjdump -sass "$so" 2>/dev/null | awk '/Function : .*staged_forward_kernelILi12E13__nv_bfloat16Li1E/{p=1} /Function : /{if(!($0 ~ /staged_forward_kernelILi12E13__nv_bfloat16Li1E/))p=0} p' \
  >"$out/sass_fwd_q4k.txt" || true
if [ "${BENCH:-0}" = 1 ]; then
  stage bench_small 100 150 $py tools/bench_kernels.py --device cuda --types Q4_0,Q4_1,Q4_K,INT4-g64 --ms 1,16 \
    --out "$out/bench_small.jsonl"
fi
