#!/usr/bin/env bash
# call 3: CUDA tests (test_model's device cases, the budget/streaming suite) and the 7B budgets: resident, 2, 3, 1.5 GiB
cd "$(dirname "$0")/.."
source tools/gpu/common.sh
OUT=$OUT/c3 begin_call c3 500 || { tar czf "$OUT/c3.tgz" -C "$OUT" c3; exit 1; }
stage model_tests 40 90 $py -m pytest -q -p no:cacheprovider -m "not smollm2 and not llamacpp" -k cuda tests/test_model.py
STAGES="tests train_7b summary" OUT=$out/vram BUDGET_S=$(( $(left) - 10 )) tools/gpu/vram.sh > "$out/vram.log" 2>&1
tail -40 "$out/vram.log"
cp .whl/t3.sh "$out/call.sh"; tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
