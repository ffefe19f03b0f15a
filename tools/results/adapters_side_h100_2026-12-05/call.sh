#!/usr/bin/env bash
# One GPU call: the adapters' products beside the frozen product on a side stream, against in turn
# (LOWTUNE_CUDA_ADAPTER_SIDE=0): the adapter tests on CUDA, then tools/bench_adapters.py both ways,
# alternated. Usage, from the repository root: OUT=dir bash tools/gpu/adapters_side.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
begin_call adapters_side 500 || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader > "$out/gpu.txt"
stage tests 60 200 $py -m pytest -q -p no:cacheprovider -n 8 -rf -m "not llamacpp and not smollm2" -k cuda \
  tests/test_adapters.py tests/test_custom_ops.py tests/test_compile.py tests/test_trainer.py
for run in 1 2; do
  for side in 0 1; do
    stage "bench_side${side}_run$run" 30 120 env LOWTUNE_CUDA_ADAPTER_SIDE=$side \
      $py tools/bench_adapters.py --json "$out/bench_side${side}_run$run.json"
  done
done
cp tools/gpu/adapters_side.sh "$out/call.sh"
