#!/usr/bin/env bash
# w2: MXFP4 and gpt-oss on CUDA: the CUDA-marked tests, test_compile whole, compute-sanitizer on the
# MXFP4 tests, MXFP4's kernels timed beside IQ4_NL and Q4_0 (M = 1, 16, 2048)
cd "$(dirname "$0")/.."
source tools/gpu/common.sh
OUT=$OUT/w2 begin_call w2 540 || { tar czf "$OUT/w2.tgz" -C "$OUT" w2; exit 1; }
git log --oneline -1 > "$out/commit.txt"
stage tests 60 240 $py -m pytest -q -p no:cacheprovider -m "cuda and not smollm2 and not llamacpp and not gemma3" \
  -n 4 --dist loadfile -rf tests
grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -40
stage compile 30 90 $py -m pytest -q -p no:cacheprovider -rf -n 4 -m "not llamacpp and not smollm2 and not transformers" tests/test_compile.py tests/test_mxfp4.py
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
stage sanitizer 30 120 "$SAN" --tool memcheck --error-exitcode 9 $py -m pytest -q -p no:cacheprovider -x \
  -m cuda tests/test_mxfp4.py
stage kernels 30 120 $py tools/bench_kernels.py --device cuda --types MXFP4,IQ4_NL,Q4_0 --ms 1,16,2048 \
  --shapes 4096x4096,14336x4096 --warmup-s 1 --out "$out/kernels.jsonl"
cp .whl/w2.sh "$out/call.sh"; tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
