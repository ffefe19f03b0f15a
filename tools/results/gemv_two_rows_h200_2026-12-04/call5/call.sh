#!/usr/bin/env bash
# call 5: the landed tree: test_compile (CPU stand-ins and CUDA) and the trainer's CUDA tests
cd "$(dirname "$0")/.."
source tools/gpu/common.sh
OUT=$OUT/u5 begin_call u5 280 || { tar czf "$OUT/u5.tgz" -C "$OUT" u5; exit 1; }
stage tests 20 $(( $(left) - 5 )) $py -m pytest -q -p no:cacheprovider tests/test_compile.py tests/test_cuda_policy.py -n 8 -rfE --tb=line
cp .whl/u5.sh "$out/call.sh"; tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
