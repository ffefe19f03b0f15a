# One GPU call: the gemv's first round loaded before pdl_wait (LOWTUNE_GEMV_EARLY=1) against not
# (=0), same build, and against the previous main (prev, built beside it); tests, sanitizer, gemv
# timings, decode, and the M <= 16 forward / input-gradient table.
source tools/gpu/common.sh; OUT=$OUT/e1 begin_call e1 580 || exit 1
prev=.whl/main_src
( cd "$prev" && env LOWTUNE_CUDA=ON LOWTUNE_CUDA_ARCHITECTURES=90 CMAKE_BUILD_PARALLEL_LEVEL=8 tools/dev_build.sh \
    >"$out/prev_build.log" 2>&1; echo "prev build rc $?" >>"$out/prev_build.log" ) &
stage tests 60 110 $py -m pytest -q -p no:cacheprovider -m "cuda and not smollm2 and not llamacpp and not gemma3" -n 4 --dist loadfile tests
grep -E "passed|failed|FAILED|Error" "$out/tests.log" | tail -8 > "$out/tests_summary.txt"; rm -f "$out/tests.log"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
stage sanitizer 30 60 "$SAN" --tool memcheck --error-exitcode 9 $py -m pytest -q -p no:cacheprovider -x tests/test_cuda.py -k "gemv and (Q4_0 or Q4_K or Q6_K or Q3_K or INT4)"
wait; tail -1 "$out/prev_build.log"
for run in prev e0 e1 prev e0 e1; do
  if [ $run = prev ]; then PYTHONPATH=$prev/python stage decode_${run}_$SECONDS 20 35 $py tools/bench_kernels.py --device cuda --decode --warmup-s 1 --out "$out/decode_$run.jsonl"
  else LOWTUNE_GEMV_EARLY=${run#e} stage decode_${run}_$SECONDS 20 35 $py tools/bench_kernels.py --device cuda --decode --warmup-s 1 --out "$out/decode_$run.jsonl"; fi
done
grep -H "decode (generate)" "$out"/decode_*.log
PYTHONPATH=$prev/python stage gemv_prev 25 50 $py tools/gpu/gemv.py --types Q4_0,Q4_K,Q4_1,INT4-g64,Q6_K --out "$out/gemv_prev.jsonl"
for e in 0 1; do
  LOWTUNE_GEMV_EARLY=$e stage gemv_e$e 25 50 $py tools/gpu/gemv.py --types Q4_0,Q4_K,Q4_1,INT4-g64,Q6_K --out "$out/gemv_e$e.jsonl"
done
stage kernels 40 100 $py tools/bench_kernels.py --device cuda --types Q4_0,Q4_K --ms 1,16 --kernels forward,input_grad \
  --shapes 4096x4096,14336x4096,4096x14336 --peers cublas_bf16 --warmup-s 0.5 --reps 3 --out "$out/kernels.jsonl"
$py tools/bench_kernels.py --summary "$out/kernels.jsonl" > "$out/kernels_summary.txt" 2>&1
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
