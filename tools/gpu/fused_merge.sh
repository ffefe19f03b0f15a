#!/usr/bin/env bash
# One call for the rank-r update inside the dequantization kernel (lowtune.ops.qmatmul_lowrank, its
# input gradient; dequant_lowrank_kernel in csrc/cuda/dequant_tile.cuh): build, the CUDA tests of the
# chunked path with and without the update, compute-sanitizer on the update's tests, then
# tools/gpu/adapter_merge_cost.py (the adapter's passes now, the cuBLAS merge, the fused rows and the
# route's sum against 15% of the bare layer).
#   OUT=dir bash tools/gpu/fused_merge.sh          (carry .whl)
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
begin_call fused_merge 420 || { end_call tools/gpu/fused_merge.sh; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt"
stage tests 40 150 $py -m pytest -q -p no:cacheprovider -n 8 -rf tests/test_cuda.py tests/test_cuda_policy.py \
  tests/test_adapters.py
SAN_K="low_rank" sanitizer_tests "low_rank"
stage merge_cost 30 90 $py tools/gpu/adapter_merge_cost.py --json "$out/merge.json"
stage merge_cost_q4_0 30 90 $py tools/gpu/adapter_merge_cost.py --type Q4_0 --json "$out/merge_q4_0.json"
end_call tools/gpu/fused_merge.sh
