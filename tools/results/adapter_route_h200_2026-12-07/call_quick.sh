#!/usr/bin/env bash
# The short form of adapter_route_ab.sh for a call with little device time: this tree only (no base build).
# TEST_K: its CUDA and adapter tests matching it; SAN_K: compute-sanitizer over tests/test_cuda.py matching it;
# then tools/gpu/adapter_merge_cost.py and the adapters' graph replay with the merged route on
# (LOWTUNE_CUDA_ADAPTER_MERGE=1), off (=0), and on under B_ENV (VAR=VALUE ...).
#   OUT=dir [BUDGET_S=400] [TEST_K=...] [SAN_K=...] [B_ENV="LOWTUNE_CUDA_POOL_VECS=4"] \
#     bash tools/gpu/adapter_route_quick.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
begin_call adapter_route_quick 400 || { end_call tools/gpu/adapter_route_quick.sh; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt"
[ -n "${TEST_K:-}" ] && stage tests 30 70 $py -m pytest -q -p no:cacheprovider -n 8 -rf tests/test_cuda.py \
  tests/test_adapters.py -k "$TEST_K"
[ -z "${SAN_K:-}" ] || sanitizer_tests "$SAN_K"
round() {  # NAME MERGE [VAR=VALUE...]
  stage "adapters_$1" 25 60 env LOWTUNE_CUDA_ADAPTER_MERGE=$2 "${@:3}" $py tools/bench_adapters.py \
    --json "$out/adapters_$1.json"
}
round merged 1
round separate 0
[ -n "${B_ENV:-}" ] && round env 1 $B_ENV
stage cost 30 90 $py tools/gpu/adapter_merge_cost.py --json "$out/cost.json"
round merged_2 1
end_call tools/gpu/adapter_route_quick.sh
