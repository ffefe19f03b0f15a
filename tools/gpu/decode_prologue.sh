#!/usr/bin/env bash
# One GPU call for the glue inside the one-row product (GemvPrologue): build this tree and, in the
# background, PREV_SRC (the commit before it, e.g. `git archive main csrc python CMakeLists.txt
# pyproject.toml tools | tar -x -C prev`); the whole CUDA test set and the joined-step tests (the
# new ones assert bit equality with the separate kernels); compute-sanitizer on the fused-prologue
# tests; then, on both builds, the decode benchmark
# and the gemv timings of the types whose min_ctas changed (Q2_K, Q5_1).
# Usage, from the repository root: OUT=dir PREV_SRC=prev bash tools/gpu/decode_prologue.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
begin_call decode_prologue 570 || exit 1
prev=${PREV_SRC:?PREV_SRC: the source tree of the previous commit}
( cd "$prev" && env LOWTUNE_CUDA=ON LOWTUNE_CUDA_ARCHITECTURES=90 CMAKE_BUILD_PARALLEL_LEVEL=8 tools/dev_build.sh \
    >"$out/prev_build.log" 2>&1; echo "prev build rc $?" >>"$out/prev_build.log" ) &
stage tests 60 150 $py -m pytest -q -p no:cacheprovider -m "cuda and not smollm2 and not llamacpp and not gemma3" \
  -n 4 --dist loadfile tests
stage tests_join 20 60 $py -m pytest -q -p no:cacheprovider tests/test_families_train_export.py -k joins_each
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
stage sanitizer 30 90 "$SAN" --tool memcheck --error-exitcode 9 $py -m pytest -q -p no:cacheprovider -x \
  tests/test_glue_cuda.py -k "inside_the_product or decline"
wait; tail -1 "$out/prev_build.log"
for run in prev this prev2 this2; do
  pp=python; [ "${run#prev}" != "$run" ] && pp="$prev/python"
  PYTHONPATH=$pp stage "decode_$run" 25 45 $py tools/bench_kernels.py --device cuda --decode --warmup-s 1 \
    --out "$out/decode_$run.jsonl"
done
grep -h "decode (generate)" "$out"/decode_*.log
PYTHONPATH="$prev/python" stage gemv_prev 20 40 $py tools/gpu/gemv.py --types Q2_K,Q5_1 --out "$out/gemv_prev.jsonl"
stage gemv 20 40 $py tools/gpu/gemv.py --types Q2_K,Q5_1 --out "$out/gemv.jsonl"
# at most 8 files come back: everything in one archive beside the folder, which goes
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
