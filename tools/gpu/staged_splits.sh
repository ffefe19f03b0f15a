#!/usr/bin/env bash
# One GPU call for how the staged kernels (staged_gemv.cuh) split their reduction over CTAs: build; the
# CUDA tests; compute-sanitizer on the split and cluster tests; bench_kernels.py under the default
# policy (every path, the peers: the targets table); then the staged path alone at M = 1 and 16,
# forward and input gradient, with LOWTUNE_CUDA_STAGED_SPLITS forced to each of SPLITS, each in its own
# process; decoding. tools/gpu/split_table.py turns the JSONL files into a table of the best split.
# Usage, from the repository root: OUT=dir bash tools/gpu/staged_splits.sh
# (TYPES: the sweep's types; SPLITS: the forced splits; BUILD=0 on a warm machine)
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
begin_call staged_splits 570 || { end_call tools/gpu/staged_splits.sh; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt"
cuda_tests
sanitizer_tests "forced_splits or cluster_split or back_to_back"
shapes=4096x4096,14336x4096,4096x14336
stage kernels 40 110 $py tools/bench_kernels.py --device cuda --types Q4_K,Q4_0,Q4_1,INT4-g64,Q6_K,Q5_K,Q8_0,Q2_K,Q3_K \
  --ms 1,16 --kernels forward,input_grad --shapes $shapes --peers tinygemm,cublas_bf16 --warmup-s 0.5 --reps 3 \
  --out "$out/kernels.jsonl"
for s in ${SPLITS:-1 2 3 4 6 8 12 16 24 32}; do
  LOWTUNE_CUDA_STAGED_SPLITS=$s stage splits_$s 25 60 $py tools/bench_kernels.py --device cuda --paths staged \
    --types "${TYPES:-Q4_K,Q4_0,Q8_0,Q2_K,Q6_K}" --ms 1,16 --kernels forward,input_grad --shapes $shapes --peers "" \
    --warmup-s 0.5 --reps 3 --out "$out/splits_$s.jsonl"
done
stage decode 25 45 $py tools/bench_kernels.py --device cuda --decode --warmup-s 1 --out "$out/decode.jsonl"
end_call tools/gpu/staged_splits.sh
