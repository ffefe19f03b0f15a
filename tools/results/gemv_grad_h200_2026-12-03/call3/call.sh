source tools/gpu/common.sh; OUT=$OUT/r3 begin_call x 400 || exit 1
stage tests 40 100 $py -m pytest -q -p no:cacheprovider -n 4 tests/test_cuda.py tests/test_cuda_policy.py -k "input_grad or policy or gemv"
grep -E "^(FAILED|ERROR)|passed|failed" "$out/tests.log" | tail -20
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
stage sanitizer 30 80 "$SAN" --tool memcheck --error-exitcode 9 $py -m pytest -q -p no:cacheprovider -x \
  tests/test_cuda.py -k "gemv_input_grad"
stage kernels 40 120 $py tools/bench_kernels.py --device cuda --types Q4_0,Q4_1,Q4_K,INT4-g64,Q6_K,Q2_K,Q3_K,Q5_K,Q8_0,INT2-g64,Q5_0,INT8-g32 --ms 1 \
  --kernels forward,input_grad --shapes 4096x4096,14336x4096,4096x14336 --peers cublas_bf16 --warmup-s 0.5 --reps 3 \
  --out "$out/kernels.jsonl"
$py tools/bench_kernels.py --summary "$out/kernels.jsonl" > "$out/kernels_summary.txt" 2>&1
grep input_grad $out/kernels.log | grep -v direct | grep -v cublas
tar czf $OUT/r3.tgz -C $OUT r3 && rm -rf $out
