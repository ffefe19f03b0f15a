#!/usr/bin/env bash
# One GPU call for the gemv's K split over a cluster of two CTAs (gemv.cuh: gemv_rows_kernel<..., 2>):
# the gemv tests (every setting against float64), every type's timings with the split off, forced
# and by default (cuda_policy::gemv_split_k), decoding with and without, compute-sanitizer on the
# split.
# Usage, from the repository root: OUT=dir bash tools/gpu/gemv_split.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
begin_call gemv_split 575 || { tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader > "$out/gpu.txt"
stage tests 40 110 $py -m pytest -q -p no:cacheprovider -n 8 -rf tests/test_cuda_policy.py tests/test_cuda.py \
  tests/test_glue_cuda.py -k "gemv or inside_the_product or policy or split"
stage gemv 60 170 $py tools/gpu/gemv.py --settings default,gemv_split1,gemv_split2 --out "$out/gemv.jsonl"
for s in 1 0; do
  LOWTUNE_CUDA_GEMV_SPLIT=$s stage decode_split$s 30 50 $py tools/bench_kernels.py --device cuda --decode --warmup-s 1 \
    --out "$out/decode_split$s.jsonl"
done
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
LOWTUNE_CUDA_GEMV_SPLIT=2 stage sanitizer 30 100 "$SAN" --tool memcheck --error-exitcode 9 $py -m pytest -q \
  -p no:cacheprovider -x tests/test_cuda.py -k "test_gemv_against and (Q4_K or Q4_0) and bfloat16"
cp tools/gpu/gemv_split.sh "$out/call.sh"
# at most 8 files come back: everything in one archive beside the folder, which goes
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
