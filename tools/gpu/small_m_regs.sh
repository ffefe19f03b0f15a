#!/usr/bin/env bash
# One GPU call for the M <= 16 forward with W decoded straight into tensor-core fragments
# (csrc/cuda/small_m_regs.cuh, LOWTUNE_CUDA_PATH=regs): build, its tests and the policy's, the
# staged kernels' tests (the decode it shares), compute-sanitizer on its tests for four types, then
# M = 1, 4, 16 forward of six types at a 7B layer's shapes by graph replay against the staged
# kernel, the one-row gemv, cuBLAS bf16 and tinygemm, every path timed in one process; then the
# regs kernel without its load pipeline (LOWTUNE_CUDA_REGS_PIPE=0) on four types.
# Usage, from the repository root: OUT=dir bash tools/gpu/small_m_regs.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
begin_call small_m_regs 560 || exit 1
stage tests 40 120 $py -m pytest -q -p no:cacheprovider -n 4 tests/test_cuda.py tests/test_cuda_policy.py \
  -k "regs or staged_kernels or policy"
grep -E "^(FAILED|ERROR)|passed|failed" "$out/tests.log" | tail -12 > "$out/tests_summary.txt"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
stage sanitizer 30 90 "$SAN" --tool memcheck --error-exitcode 9 $py -m pytest -q -p no:cacheprovider -x \
  tests/test_cuda.py -k "regs_forward and (Q4_0 or Q4_K or Q6_K or INT4-g64)"
stage kernels 40 180 $py tools/bench_kernels.py --device cuda --types Q4_0,Q4_1,Q4_K,INT4-g64,Q6_K,Q8_0 --ms 1,4,16 \
  --kernels forward --shapes 4096x4096,14336x4096,4096x14336 --peers cublas_bf16,tinygemm --warmup-s 0.5 --reps 3 \
  --out "$out/kernels.jsonl"
LOWTUNE_CUDA_REGS_PIPE=0 stage kernels_nopipe 30 90 $py tools/bench_kernels.py --device cuda \
  --types Q4_0,Q4_K,INT4-g64,Q8_0 --ms 1,16 --kernels forward --shapes 4096x4096,14336x4096,4096x14336 --peers none \
  --warmup-s 0.5 --reps 3 --out "$out/kernels_nopipe.jsonl"
$py tools/bench_kernels.py --summary "$out/kernels.jsonl" > "$out/kernels_summary.txt" 2>&1
grep -E "\| (regs|staged|gemv) \|" "$out/kernels.log"
# at most 8 files come back: everything in one archive beside the folder, which goes
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
