#!/usr/bin/env bash
# One short GPU call of one build, for when device time is short: each stage runs only where its setting
# is given.
#   TEST_K="Q2_K"                the CUDA tests (tests/test_cuda.py) matching it
#   PROFILE_METHODS=qa-hira,lora one profiled adapted step per method (tools/bench_adapters.py --profile,
#                                LOWTUNE_CUDA_ADAPTER_MERGE=${MERGE:-auto})
#   TIME_ENTRIES="Q2_K:14336x4096:1:forward ..."
#                                tools/gpu/profile_small_m.py --time of each (graph replay)
#   KTYPES=Q2_K [KPATHS=gemv]    bench_kernels.py's M = 1 forward rows of those types (graph replay)
#   DECODE=1                     the greedy 7B Q4_K decode (bench_kernels.py --decode, variant generate)
#   OUT=dir [BUDGET_S=330] bash tools/gpu/quick_checks.sh          (carry .whl)
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
begin_call quick_checks 330 || { end_call tools/gpu/quick_checks.sh; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt"
[ -n "${TEST_K:-}" ] && stage tests 30 90 $py -m pytest -q -p no:cacheprovider -n 8 -rf tests/test_cuda.py -k "$TEST_K"
[ -n "${PROFILE_METHODS:-}" ] && stage profile 30 90 env LOWTUNE_CUDA_ADAPTER_MERGE="${MERGE:-auto}" \
  $py tools/bench_adapters.py --profile --iters 3 --graph-steps 5 --methods "$PROFILE_METHODS"
for e in ${TIME_ENTRIES:-}; do
  IFS=: read -r ty shape m kern <<<"$e"
  stage "time_${kern}_${ty}_${shape}_m$m" 20 60 $py tools/gpu/profile_small_m.py --type "$ty" --shape "$shape" \
    --m "$m" --kernel "$kern" --time
done
[ -n "${KTYPES:-}" ] && m1_rows kernels "$PWD" forward
[ "${DECODE:-0}" = 1 ] && decode_generate decode "$PWD"
end_call tools/gpu/quick_checks.sh
