#!/usr/bin/env bash
# The one call that timed Q2_K's and Q3_K's one-row units summed as one (branch k-unit-sums, since
# merged) against main's (tools/gpu/ab_build.sh, base = BASE_DIR: main's gemv.cuh then), then with what
# is left: on an H200 the 4-bit types at M = 1 beside their peers (the kernel targets are set on an H200)
# and Q4_K's decode in the A/B; Nsight profiles of the one-row input gradient (Q4_K staged, Q2_K
# gemv_grad) and Q2_K's forward; the cost model of an adapter merged into the frozen product's chunks
# (tools/gpu/adapter_merge_cost.py).
#   OUT=dir BASE_DIR=.carry/base bash tools/gpu/unit_sums_call.sh     (carry .whl and .carry)
set -uo pipefail
cd "$(dirname "$0")/../.."
root=${OUT:-unit_sums}
mkdir -p "$root"
h200=0; nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && h200=1
dt="Q2_K Q3_K"; ab_s=320; extra=45
[ $h200 = 1 ] && { dt="Q4_K Q2_K Q3_K"; ab_s=300; extra=90; }
BUDGET_S=$ab_s TYPES=Q2_K,Q3_K,Q4_K,Q4_0 MS=1 PATHS=gemv SAN_K="gemv and (Q2_K or Q3_K)" DECODE_TYPES="$dt" \
  OUT=$root/p bash tools/gpu/ab_build.sh
(
  source tools/gpu/common.sh
  out=$root/n; mkdir -p "$out"; budget_from ${EXTRA_S:-$extra}
  if [ $h200 = 1 ]; then  # the peers, else the merge cost model, then profiles as time allows
    stage peers 60 100 $py tools/bench_kernels.py --device cuda --types Q4_0,Q4_1,Q4_K,INT4-g64 --ms 1 \
      --kernels forward --shapes 4096x4096,14336x4096,4096x14336 --paths gemv --peers cublas_bf16,tinygemm \
      --warmup-s 0.5 --reps 3 --out "$out/peers.jsonl"
  else
    stage merge_cost 20 45 $py tools/gpu/adapter_merge_cost.py --json "$out/merge.json"
  fi
  BUILD=0 BUDGET_S=$(left) ENTRIES="Q4_K:14336x4096:1:input_grad Q2_K:14336x4096:1:input_grad \
Q2_K:14336x4096:1:forward" OUT=$out/ncu bash tools/gpu/ncu_small_m.sh
  end_call tools/gpu/unit_sums_call.sh
)
