#!/usr/bin/env bash
# call 4: the per-type rows policy as landed: gemv and policy tests, every type's default against
# both forced settings, decode; then the whole suite (CPU tests too) with its failures listed
cd "$(dirname "$0")/.."
source tools/gpu/common.sh
OUT=$OUT/u4 begin_call u4 570 || { tar czf "$OUT/u4.tgz" -C "$OUT" u4; exit 1; }
stage tests 30 120 $py -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_cuda_policy.py -k "gemv" -n 8 -rf
stage gemv 40 90 $py tools/gpu/gemv.py --settings default,gemv_rows1,gemv_rows2 --out "$out/gemv.jsonl"
for r in 0 1; do
  LOWTUNE_CUDA_GEMV_ROWS=$r stage decode_rows$r 40 60 $py tools/bench_kernels.py --device cuda --decode --warmup-s 1 --out "$out/decode_rows$r.jsonl"
done
stage suite 60 $(( $(left) - 10 )) $py -m pytest -q -p no:cacheprovider -m "not smollm2 and not llamacpp and not gemma3" -n 8 tests -rfE --tb=line
cp .whl/u4.sh "$out/call.sh"; tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
