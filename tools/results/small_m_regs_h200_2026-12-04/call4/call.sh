#!/usr/bin/env bash
# final: CUDA kernel and policy tests on the branch, sanitizer on the new test, staged forward's layouts at M = 5..8
set -uo pipefail
source tools/gpu/common.sh
OUT=$OUT/c4 begin_call c4 255 || exit 1
stage tests 25 60 $py -m pytest -q -p no:cacheprovider -n 4 tests/test_cuda.py tests/test_cuda_policy.py
grep -E "^(FAILED|ERROR)|passed|failed" "$out/tests.log" | tail -12 > "$out/tests_summary.txt"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
stage sanitizer 25 30 "$SAN" --tool memcheck --error-exitcode 9 $py -m pytest -q -p no:cacheprovider -x \
  tests/test_cuda.py -k "two_tile and (Q4_K or IQ4_XS)"
for v in 9 5; do
  LOWTUNE_CUDA_STAGED_TWO_TILES=$v stage two_$v 15 30 $py tools/bench_kernels.py --device cuda \
    --types Q4_0,Q4_K,Q5_K,Q8_0,Q3_K,Q2_K,INT4-g64,IQ4_XS --ms 5,6,7,8 --kernels forward \
    --shapes 4096x4096,14336x4096,4096x14336 --peers none --warmup-s 0.3 --reps 3 --out "$out/two_$v.jsonl"
done
for v in 9 5; do grep -E "\| staged \|" "$out/two_$v.log" | sed "s/^/t$v /"; done | sort -t'|' -k3,6 | head -200
cp .whl/s4.sh "$out/call.sh"
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
