# One GPU call: the one-row gemv (first round loaded before pdl_wait where every warp has at most
# one row) against the previous main (prev, built beside it): tests, sanitizer, gemv, decode, and
# the M = 1 forward against cuBLAS and tinygemm.
source tools/gpu/common.sh; OUT=$OUT/e2 begin_call e2 470 || exit 1
prev=.whl/main_src
( cd "$prev" && env LOWTUNE_CUDA=ON LOWTUNE_CUDA_ARCHITECTURES=90 CMAKE_BUILD_PARALLEL_LEVEL=8 tools/dev_build.sh \
    >"$out/prev_build.log" 2>&1; echo "prev build rc $?" >>"$out/prev_build.log" ) &
stage tests 60 110 $py -m pytest -q -p no:cacheprovider -m "cuda and not smollm2 and not llamacpp and not gemma3" -n 4 --dist loadfile tests
grep -E "passed|failed|FAILED|Error" "$out/tests.log" | tail -8 > "$out/tests_summary.txt"; rm -f "$out/tests.log"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
stage sanitizer 30 60 "$SAN" --tool memcheck --error-exitcode 9 $py -m pytest -q -p no:cacheprovider -x tests/test_cuda.py -k "gemv and (Q4_0 or Q4_K or Q6_K or Q3_K or INT4 or Q8_0)"
wait; tail -1 "$out/prev_build.log"
for run in prev this prev this; do
  pp=python; [ $run = prev ] && pp=$prev/python
  PYTHONPATH=$pp stage decode_${run}_$SECONDS 20 35 $py tools/bench_kernels.py --device cuda --decode --warmup-s 1 --out "$out/decode_$run.jsonl"
done
grep -H "decode (generate)" "$out"/decode_*.log
PYTHONPATH=$prev/python stage gemv_prev 25 45 $py tools/gpu/gemv.py --types Q4_0,Q4_K,Q4_1,INT4-g64,Q6_K,Q8_0,Q5_0,Q3_K --out "$out/gemv_prev.jsonl"
stage gemv 25 45 $py tools/gpu/gemv.py --types Q4_0,Q4_K,Q4_1,INT4-g64,Q6_K,Q8_0,Q5_0,Q3_K --out "$out/gemv.jsonl"
stage kernels 30 60 $py tools/bench_kernels.py --device cuda --types Q4_0,Q4_1,Q4_K,INT4-g64 --ms 1 --kernels forward \
  --shapes 4096x4096,14336x4096,4096x14336 --peers tinygemm,cublas_bf16 --warmup-s 0.5 --reps 3 --out "$out/kernels.jsonl"
$py tools/bench_kernels.py --summary "$out/kernels.jsonl" > "$out/kernels_summary.txt" 2>&1; grep -E "^\| Q4|^\| INT4" "$out/kernels_summary.txt" | head -12
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
