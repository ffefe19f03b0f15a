#!/usr/bin/env bash
# One GPU call that compares the adapter's merged route of this tree (B) with a base build (A: the tree
# with the files under BASE_DIR laid over it, e.g. the dequantization kernels as they were before a
# change). B is built first; A builds beside B's profile of one adapted step per method
# (tools/bench_adapters.py --profile, the merged route on) and B's tools/gpu/adapter_merge_cost.py; then
# the cost model and the adapters' graph replay (LOWTUNE_CUDA_ADAPTER_MERGE=1; =0 once under each for the
# separate route) alternate A, B, A, B while time is left; with DECODE=1, B's greedy 7B Q4_K decode; with
# KTYPES (e.g. Q2_K), B's CUDA tests of those types' products and bench_kernels.py's M = 1 rows of them
# (graph replay, KPATHS, forward and input gradient) under A and B, for a kernel change in the same trees;
# TEST_K: B's CUDA and adapter tests matching it (default: KTYPES's types), and SAN_K: compute-sanitizer over
# B's tests/test_cuda.py matching it, both beside A's build.
# B_ENV (VAR=VALUE ...): one more merged round of B under those settings (a knob of the route).
#   OUT=dir BASE_DIR=.carry/base [METHODS=qa-hira,lora] [PROFILE=0] [DECODE=1] [KTYPES=Q2_K [KPATHS=gemv]] \
#     [TEST_K=...] [SAN_K=...] [B_ENV="LOWTUNE_CUDA_UPDATE_FIRST=1"] bash tools/gpu/adapter_route_ab.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
begin_call adapter_route_ab 585 || { end_call tools/gpu/adapter_route_ab.sh; exit 1; }
start_base_build tools/gpu/adapter_route_ab.sh 12 || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt"
[ "${PROFILE:-1}" = 1 ] && stage profile_b 30 90 env LOWTUNE_CUDA_ADAPTER_MERGE=1 $py tools/bench_adapters.py \
  --profile --iters 3 --graph-steps 5 --methods "${METHODS:-qa-hira,lora}"
stage cost_b_1 30 90 $py tools/gpu/adapter_merge_cost.py --json "$out/cost_b_1.json"
test_k=${TEST_K:-$(echo "${KTYPES:-}" | sed 's/,/ or /g')}
[ -n "$test_k" ] && stage tests_b 30 90 $py -m pytest -q -p no:cacheprovider -n 8 -rf tests/test_cuda.py \
  tests/test_adapters.py -k "$test_k"
[ -z "${SAN_K:-}" ] || sanitizer_tests "$SAN_K"
wait "$base_build"; cat "$out/build_base.out"
kernels() {  # NAME ROOT
  [ -z "${KTYPES:-}" ] || m1_rows "kernels_$1" "$2" forward,input_grad
}
kernels a1 "$base"
kernels b1 "$PWD"
round() {  # NAME ROOT MERGE [VAR=VALUE...]
  stage "adapters_$1" 25 60 env PYTHONPATH="$2/python" LOWTUNE_CUDA_ADAPTER_MERGE=$3 "${@:4}" $py \
    tools/bench_adapters.py --json "$out/adapters_$1.json"
}
stage cost_a_1 30 90 env PYTHONPATH="$base/python" $py tools/gpu/adapter_merge_cost.py --json "$out/cost_a_1.json"
round a1_merged "$base" 1
round b1_merged "$PWD" 1
round b1_separate "$PWD" 0
round a1_separate "$base" 0
[ -n "${B_ENV:-}" ] && round b1_env "$PWD" 1 $B_ENV
[ "${DECODE:-0}" = 1 ] && decode_generate decode_b "$PWD"
round a2_merged "$base" 1
round b2_merged "$PWD" 1
stage cost_a_2 30 90 env PYTHONPATH="$base/python" $py tools/gpu/adapter_merge_cost.py --json "$out/cost_a_2.json"
stage cost_b_2 30 90 $py tools/gpu/adapter_merge_cost.py --json "$out/cost_b_2.json"
kernels b2 "$PWD"
kernels a2 "$base"
end_call tools/gpu/adapter_route_ab.sh
