#!/usr/bin/env bash
# One GPU call on the CUDA decode step: build, every CUDA test of the suite, the M = 1 products of
# a 7B decode step (tools/gpu/gemv.py per type; tools/bench_kernels.py for the 4-bit types, with
# peers), the decode benchmark
# (tools/bench_kernels.py --decode: its DECODE_VARIANTS) and tools/gpu/profile_decode.py, and, when
# PREV names a tree of an earlier commit's python/ and tools/ (e.g. from `git archive`), the same
# benchmark of that code on this build in the same call (with the staged kernels it ran).
#   OUT=dir [PREV=dir] [ALT_ENV="K=V ..."] [STAGED=0] [TEST_S=s] [GEMV_S=s] [GEMV_TYPES=a,b] bash tools/gpu/decode_step.sh
cd "$(dirname "$0")/../.."
set -uo pipefail
source tools/gpu/common.sh
begin_call decode_step 540 || exit 1
stage tests 60 ${TEST_S:-240} $py -m pytest -q -p no:cacheprovider -m "cuda and not smollm2 and not llamacpp and not gemma3" \
  -n 4 --dist loadfile tests
grep -E "^(FAILED|ERROR)|passed|failed" "$out/tests.log" | tail -20
stage gemv 60 ${GEMV_S:-150} $py tools/gpu/gemv.py ${GEMV_TYPES:+--types $GEMV_TYPES} --out $out/gemv.jsonl
stage kernels 60 150 $py tools/bench_kernels.py --device cuda --types Q4_K,Q4_0,Q4_1,INT4-g64 --ms 1 --kernels forward \
  --shapes 4096x4096,12288x4096,22016x4096,4096x11008,14336x4096,4096x14336 --peers tinygemm,cublas_bf16 \
  --warmup-s 0.5 --reps 3 --out $out/kernels.jsonl
$py tools/bench_kernels.py --summary $out/kernels.jsonl > $out/kernels_summary.txt 2>&1
stage decode 40 90 $py tools/bench_kernels.py --device cuda --decode --warmup-s 1 --out $out/decode.jsonl
stage profile 40 90 $py tools/gpu/profile_decode.py --out $out/profile.json
# the same with the staged kernels for every one-row product (what the code before gemv ran)
[ "${STAGED:-1}" = 1 ] && stage decode_staged 40 90 env LOWTUNE_CUDA_PATH=staged $py tools/bench_kernels.py --device cuda --decode --warmup-s 1 --out $out/decode_staged.jsonl
# the same under other knobs (ALT_ENV="K=V ...": e.g. a kernel variant behind a knob, in the same call)
[ -n "${ALT_ENV:-}" ] && stage decode_alt 40 90 env $ALT_ENV $py tools/bench_kernels.py --device cuda --decode --warmup-s 1 --out $out/decode_alt.jsonl
if [ -n "${PREV:-}" ]; then
  cp python/lowtune/_C*.so "$PREV/python/lowtune/"
  stage decode_prev 40 90 env LOWTUNE_CUDA_PATH=staged PYTHONPATH=$PREV/python $py $PREV/tools/bench_kernels.py --device cuda --decode --warmup-s 1 --out $out/decode_prev.jsonl
fi
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && mv "$out.tgz" "$out/all.tgz"
