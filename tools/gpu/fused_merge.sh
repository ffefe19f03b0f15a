#!/usr/bin/env bash
# One call for the rank-r update inside the dequantization kernel (lowtune.ops.qmatmul_lowrank, its
# input gradient; dequant_lowrank_kernel in csrc/cuda/dequant_tile.cuh) and the adapter route on it
# (adapter_ops._MERGE_KINDS): build, the CUDA tests (kernels, policy, adapters: the update's and the
# route's against float64), compute-sanitizer on the update's tests, then
# tools/gpu/adapter_merge_cost.py (the adapter's passes now, the cuBLAS merge, the fused rows and the
# route's sum against 15% of the bare layer); then tools/bench_adapters.py (graph replay of whole
# adapted-layer steps, every method) with the merged route off and on (LOWTUNE_CUDA_ADAPTER_MERGE), each
# in its own process, twice alternated.
#   OUT=dir [QUICK=1] bash tools/gpu/fused_merge.sh          (carry .whl)
# QUICK=1: only the update's and the route's tests, and one round of the adapters (for a short call).
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
begin_call fused_merge 540 || { end_call tools/gpu/fused_merge.sh; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt"
quick=${QUICK:-0}
if [ "$quick" = 1 ]; then
  stage tests 20 60 $py -m pytest -q -p no:cacheprovider -n 8 -rf tests/test_cuda.py tests/test_adapters.py \
    tests/test_ops_cpu.py -k "low_rank or merged or merge_setting"
else
  stage tests 40 150 $py -m pytest -q -p no:cacheprovider -n 8 -rf tests/test_cuda.py tests/test_cuda_policy.py \
    tests/test_adapters.py -k "not smollm2"
  sanitizer_tests "low_rank"
fi
stage merge_cost 30 90 $py tools/gpu/adapter_merge_cost.py --json "$out/merge.json"
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
if [ -n "$ncu" ]; then  # the update's kernel beside the plain dequantization, one forward each
  stage ncu 30 90 "$ncu" --clock-control none --kernel-name regex:"dequant_(lowrank|tile)" --launch-count 10 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
    --section WarpStateStats $py -c "
import sys, torch
sys.path.insert(0, 'tools')
from lowtune import ops
from bench_kernels import random_qtensor
w = random_qtensor('Q4_K', 4096, 4096)
x = torch.randn(2048, 4096, device='cuda', dtype=torch.bfloat16)
b, a = torch.randn(4096, 64, device='cuda') * 0.02, torch.randn(4096, 64, device='cuda') * 0.02
ops.qmatmul(x, w); ops.qmatmul_lowrank(x, w, b, a, 0.5); torch.cuda.synchronize()"
fi
for round in $(seq 1 $((2 - quick))); do
  for merge in 0 1; do  # 1: this update (=1 itself now names the epilogue kind)
    kinds=$([ $merge = 1 ] && echo lowrank,expanded || echo 0)
    stage "adapters_${merge}_$round" 30 60 env LOWTUNE_CUDA_ADAPTER_MERGE=$kinds $py tools/bench_adapters.py \
      --json "$out/adapters_${merge}_$round.json"
  done
done
end_call tools/gpu/fused_merge.sh
