source tools/gpu/common.sh; OUT=$OUT/e3 begin_call e3 250 || exit 1
stage tests 60 100 $py -m pytest -q -p no:cacheprovider -m "cuda and not smollm2 and not llamacpp and not gemma3" -n 4 --dist loadfile tests
grep -E "passed|failed|FAILED|Error" "$out/tests.log" | tail -8 > "$out/tests_summary.txt"; rm -f "$out/tests.log"; cat "$out/tests_summary.txt"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
stage sanitizer 30 50 "$SAN" --tool memcheck --error-exitcode 9 $py -m pytest -q -p no:cacheprovider -x tests/test_cuda.py -k "gemv and (Q4_0 or Q4_K or Q6_K or Q3_K or INT4 or Q8_0)"
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
