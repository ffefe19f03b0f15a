#!/usr/bin/env bash
# small-m-regs + gemv-grad-fp32-order merged with main: whole CUDA test set, sanitizer, regs bench, gemv_grad bench
set -uo pipefail
source tools/gpu/common.sh
OUT=$OUT/c1 begin_call c1 560 || exit 1
stage tests 40 130 $py -m pytest -q -p no:cacheprovider -m "cuda and not smollm2 and not llamacpp and not gemma3" -n 4 --dist loadfile tests
grep -E "^(FAILED|ERROR)|passed|failed" "$out/tests.log" | tail -12 > "$out/tests_summary.txt"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
stage sanitizer 30 100 "$SAN" --tool memcheck --error-exitcode 9 $py -m pytest -q -p no:cacheprovider -x \
  tests/test_cuda.py -k "(regs_forward and (Q4_0 or Q4_K or Q6_K or INT4-g64)) or gemv_input_grad"
stage kernels 40 150 $py tools/bench_kernels.py --device cuda --types Q4_0,Q4_1,Q4_K,INT4-g64,Q6_K,Q8_0 --ms 1,4,16 \
  --kernels forward --shapes 4096x4096,14336x4096,4096x14336 --peers cublas_bf16,tinygemm --warmup-s 0.5 --reps 3 \
  --out "$out/kernels.jsonl"
$py tools/bench_kernels.py --summary "$out/kernels.jsonl" > "$out/kernels_summary.txt" 2>&1
stage grad 15 50 $py tools/bench_kernels.py --device cuda \
  --types Q4_0,Q4_1,Q4_K,INT4-g64,Q6_K,Q2_K,Q3_K,Q5_K,Q8_0,INT2-g64,Q5_0,INT8-g32 --ms 1 \
  --kernels forward,input_grad --shapes 4096x4096,14336x4096,4096x14336 --peers cublas_bf16 --warmup-s 0.5 --reps 3 \
  --out "$out/grad.jsonl"
$py tools/bench_kernels.py --summary "$out/grad.jsonl" > "$out/grad_summary.txt" 2>&1
LOWTUNE_CUDA_REGS_PIPE=0 stage kernels_nopipe 30 70 $py tools/bench_kernels.py --device cuda \
  --types Q4_0,Q4_K,INT4-g64,Q8_0 --ms 1,16 --kernels forward --shapes 4096x4096,14336x4096,4096x14336 --peers none \
  --warmup-s 0.5 --reps 3 --out "$out/kernels_nopipe.jsonl"
grep -E "\| (regs|staged|gemv) \|" "$out/kernels.log" | head -80
cp .whl/s1.sh "$out/call.sh"
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
