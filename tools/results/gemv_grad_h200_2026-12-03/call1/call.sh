source tools/gpu/common.sh; OUT=$OUT/r1 begin_call x 570 || exit 1
prev=.whl/main_src
( cd "$prev" && env LOWTUNE_CUDA=ON LOWTUNE_CUDA_ARCHITECTURES=90 CMAKE_BUILD_PARALLEL_LEVEL=12 tools/dev_build.sh \
    >"$out/prev_build.log" 2>&1; echo "prev build rc $?" >>"$out/prev_build.log" ) &
stage tests 60 120 $py -m pytest -q -p no:cacheprovider -m "cuda and not smollm2 and not llamacpp and not gemma3" -n 4 --dist loadfile tests
grep -E "^(FAILED|ERROR)|passed|failed" "$out/tests.log" | tail -20
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
stage sanitizer 30 80 "$SAN" --tool memcheck --error-exitcode 9 $py -m pytest -q -p no:cacheprovider -x \
  tests/test_cuda.py -k "(gemv_input_grad and (Q4_0 or Q4_K or Q6_K or Q3_K or INT4 or Q8_0 or Q2_K)) or (gemv and Q4_K)"
wait; tail -1 "$out/prev_build.log"
stage kernels 40 150 $py tools/bench_kernels.py --device cuda --types Q4_0,Q4_1,Q4_K,INT4-g64,Q6_K --ms 1,16 \
  --kernels forward,input_grad --shapes 4096x4096,14336x4096,4096x14336 --peers cublas_bf16 --warmup-s 0.5 --reps 3 \
  --out "$out/kernels.jsonl"
$py tools/bench_kernels.py --summary "$out/kernels.jsonl" > "$out/kernels_summary.txt" 2>&1
grep -E "^\| (Q4|INT4|Q6)" "$out/kernels_summary.txt"
PYTHONPATH=$prev/python stage kernels_prev 40 80 $py tools/bench_kernels.py --device cuda --types Q4_0,Q4_K,Q6_K --ms 1 \
  --kernels forward,input_grad --shapes 4096x4096,14336x4096,4096x14336 --peers none --warmup-s 0.5 --reps 3 \
  --out "$out/kernels_prev.jsonl"
for run in prev this prev this; do
  pp=python; [ $run = prev ] && pp=$prev/python
  PYTHONPATH=$pp stage "gemv_${run}_$SECONDS" 20 40 $py tools/gpu/gemv.py --types Q4_K --out "$out/gemv_$run.jsonl"
  PYTHONPATH=$pp stage "decode_${run}_$SECONDS" 20 40 $py tools/bench_kernels.py --device cuda --decode --warmup-s 1 \
    --out "$out/decode_$run.jsonl"
done
grep -h "decode (generate)" "$out"/decode_*.log
stage kernels_more 30 90 $py tools/bench_kernels.py --device cuda --types Q2_K,Q3_K,Q5_K,Q8_0,INT2-g64 --ms 1 \
  --kernels forward,input_grad --shapes 4096x4096,14336x4096,4096x14336 --peers none --warmup-s 0.3 --reps 3 \
  --out "$out/kernels_more.jsonl"
tar czf $OUT/r1.tgz -C $OUT r1 && rm -rf $out
