#!/usr/bin/env bash
# One GPU call on the M <= 8 forward split over thread-block clusters (sm_90): build, the CUDA
# kernel and glue tests, graph-replay timings of N = 4096 shapes (and one control) under
# LOWTUNE_CUDA_STAGED_CLUSTER=1|2|4 and the automatic choice, the decode benchmark, and the small-M
# table of tools/bench_kernels.py with its peers on the N = 4096 shapes.
#   OUT=dir bash tools/gpu/cluster_split.sh
cd "$(dirname "$0")/../.."
set -uo pipefail
source tools/gpu/common.sh
begin_call cluster_split 520 || exit 1
stage tests 30 100 $py -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_cuda_policy.py tests/test_glue_cuda.py
{
for e in Q4_K:4096x4096:1 Q4_K:4096x4096:8 Q4_1:4096x4096:1 Q4_K:4096x14336:1 INT4-g64:4096x14336:1 Q4_K:14336x4096:1; do
  IFS=: read -r ty sh m <<<"$e"
  for c in 1 2 4; do echo -n "cluster=$c "; LOWTUNE_CUDA_STAGED_CLUSTER=$c timeout 30 $py tools/gpu/profile_small_m.py --type $ty --shape $sh --m $m --time; done
  echo -n "cluster=auto "; timeout 30 $py tools/gpu/profile_small_m.py --type $ty --shape $sh --m $m --time
done
} > $out/cluster_times.log 2>&1
cat $out/cluster_times.log
stage decode 40 60 $py tools/bench_kernels.py --device cuda --decode --warmup-s 1 --out $out/decode.jsonl
stage bench 60 $(( $(left) - 5 )) $py tools/bench_kernels.py --device cuda --types Q4_0,Q4_1,Q4_K,INT4-g64 --ms 1,8 --shapes 4096x4096,4096x14336,4096x11008 --peers tinygemm,cublas_bf16 --kernels forward --warmup-s 0.5 --reps 3 --out $out/bench.jsonl
