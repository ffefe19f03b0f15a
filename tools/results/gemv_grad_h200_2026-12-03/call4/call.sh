#!/usr/bin/env bash
# One GPU call for the one-row input gradient (csrc/cuda/gemv_grad.cuh): build, the CUDA kernel and
# policy tests (tests/test_cuda*.py), compute-sanitizer on its tests, then the M = 1 forward and input gradient (gemv, staged,
# direct) of twelve types at a 7B layer's shapes by graph replay (tools/bench_kernels.py), every
# path timed in one process.
# Usage, from the repository root: OUT=dir bash tools/gpu/gemv_grad.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
begin_call gemv_grad 210 || exit 1
stage tests 30 60 $py -m pytest -q -p no:cacheprovider -n 4 tests/test_cuda.py tests/test_cuda_policy.py
grep -E "^(FAILED|ERROR)|passed|failed" "$out/tests.log" | tail -12 > "$out/tests_summary.txt"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
stage sanitizer 20 40 "$SAN" --tool memcheck --error-exitcode 9 $py -m pytest -q -p no:cacheprovider -x \
  tests/test_cuda.py -k "gemv_input_grad"
stage kernels 15 40 $py tools/bench_kernels.py --device cuda \
  --types Q4_0,Q4_1,Q4_K,INT4-g64,Q6_K,Q2_K,Q3_K,Q5_K,Q8_0,INT2-g64,Q5_0,INT8-g32 --ms 1 \
  --kernels forward,input_grad --shapes 4096x4096,14336x4096,4096x14336 --peers cublas_bf16 --warmup-s 0.5 --reps 3 \
  --out "$out/kernels.jsonl"
$py tools/bench_kernels.py --summary "$out/kernels.jsonl" > "$out/kernels_summary.txt" 2>&1
grep input_grad "$out/kernels.log" | grep -v direct
# at most 8 files come back: everything in one archive beside the folder, which goes
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
