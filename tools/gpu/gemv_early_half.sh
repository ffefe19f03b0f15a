#!/usr/bin/env bash
# One GPU call for Q4_K's one-row gemv with half its first round loaded early (kEarlyUnits): build
# this tree and, in the background, PREV_SRC (main before it, e.g. `git archive main csrc python
# CMakeLists.txt pyproject.toml tools | tar -x -C prev`); the gemv tests and compute-sanitizer on
# Q4_K's; then, alternating the builds, Q4_K's gemv timings and the decode benchmark.
# Usage, from the repository root: OUT=dir PREV_SRC=prev bash tools/gpu/gemv_early_half.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
begin_call gemv_early_half 450 || exit 1
prev=${PREV_SRC:?PREV_SRC: the source tree of main before this change}
( cd "$prev" && env LOWTUNE_CUDA=ON LOWTUNE_CUDA_ARCHITECTURES=90 CMAKE_BUILD_PARALLEL_LEVEL=8 tools/dev_build.sh \
    >"$out/prev_build.log" 2>&1; echo "prev build rc $?" >>"$out/prev_build.log" ) &
stage tests 40 90 $py -m pytest -q -p no:cacheprovider -n 4 tests/test_cuda.py tests/test_glue_cuda.py -k "gemv or product"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
stage sanitizer 30 60 "$SAN" --tool memcheck --error-exitcode 9 $py -m pytest -q -p no:cacheprovider -x \
  tests/test_cuda.py -k "gemv and Q4_K"
wait; tail -1 "$out/prev_build.log"
for run in prev this prev this; do
  pp=python; [ $run = prev ] && pp=$prev/python
  PYTHONPATH=$pp stage "gemv_${run}_$SECONDS" 20 40 $py tools/gpu/gemv.py --types Q4_K --out "$out/gemv_$run.jsonl"
  PYTHONPATH=$pp stage "decode_${run}_$SECONDS" 20 40 $py tools/bench_kernels.py --device cuda --decode --warmup-s 1 \
    --out "$out/decode_$run.jsonl"
done
grep -h "decode (generate)" "$out"/decode_*.log
# at most 8 files come back: everything in one archive beside the folder, which goes
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
