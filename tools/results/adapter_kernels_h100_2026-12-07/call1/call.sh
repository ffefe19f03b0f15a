#!/usr/bin/env bash
# The short form of adapter_route_ab.sh for a call with little device time: this tree only (no base build).
# TEST_K: its CUDA and adapter tests matching it; SAN_K: compute-sanitizer over SAN_FILE (default
# tests/test_cuda.py) matching it; then the adapters' graph replay (tools/bench_adapters.py, METHODS or all) in
# settings A (the tree's defaults), B (B_ENV: VAR=VALUE ...) and C (C_ENV), tools/gpu/adapter_merge_cost.py, and
# A and the last of B and C once more.
#   OUT=dir [BUDGET_S=400] [TEST_K=...] [SAN_K=...] [METHODS=lora,q-bara] [B_ENV="LOWTUNE_CUDA_POOL_VECS=4"] \
#     [C_ENV=...] bash tools/gpu/adapter_route_quick.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
begin_call adapter_route_quick 400 || { end_call tools/gpu/adapter_route_quick.sh; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt"
[ -n "${TEST_K:-}" ] && stage tests 30 70 $py -m pytest -q -p no:cacheprovider -n 8 -rf tests/test_cuda.py \
  tests/test_adapters.py -k "$TEST_K"
[ -z "${SAN_K:-}" ] || sanitizer_tests "$SAN_K"
round() {  # NAME [VAR=VALUE...]
  stage "adapters_$1" 25 60 env "${@:2}" $py tools/bench_adapters.py ${METHODS:+--methods "$METHODS"} \
    --json "$out/adapters_$1.json"
}
round a
[ -n "${B_ENV:-}" ] && round b $B_ENV
[ -n "${C_ENV:-}" ] && round c $C_ENV
stage cost 30 90 $py tools/gpu/adapter_merge_cost.py --json "$out/cost.json"
round a_2
if [ -n "${C_ENV:-}" ]; then round c_2 $C_ENV; elif [ -n "${B_ENV:-}" ]; then round b_2 $B_ENV; fi
end_call tools/gpu/adapter_route_quick.sh
