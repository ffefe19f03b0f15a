#!/usr/bin/env bash
# One GPU call for the streamed gemv (gemv.cuh: gemv_stream_kernel, weights through bulk copies): the
# gemv tests (the streamed kernel's bits against the register kernels'), every type's timings by
# default and streamed at one to three CTAs an SM, decoding at each, compute-sanitizer on the
# streamed kernel.
# Usage, from the repository root: OUT=dir bash tools/gpu/gemv_stream.sh
# (TYPES, SHAPES, SETTINGS: gemv.py's --types, --shapes and --settings; DECODE: the settings of
# LOWTUNE_CUDA_GEMV_STREAM decoded, d for the default policy (" ": none); SAN=0 skips the sanitizer,
# SAN_STREAM is its setting; TESTS_ALL=1 runs all of test_cuda.py and test_glue_cuda.py, TESTS_LIMIT
# their seconds)
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
begin_call gemv_stream 575 || { tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader > "$out/gpu.txt"
sel=(-k "gemv_against or policy")
[ -n "${TESTS_ALL:-}" ] && sel=(tests/test_glue_cuda.py)
stage tests 40 "${TESTS_LIMIT:-130}" $py -m pytest -q -p no:cacheprovider -n 8 -rf tests/test_cuda_policy.py \
  tests/test_cuda.py "${sel[@]}"
stage gemv 60 200 $py tools/gpu/gemv.py --settings "${SETTINGS:-default,stream1,stream2,stream3}" \
  ${TYPES:+--types $TYPES} ${SHAPES:+--shapes $SHAPES} --out "$out/gemv.jsonl"
for s in ${DECODE:-0 1 2 3}; do
  LOWTUNE_CUDA_GEMV_STREAM=${s#d} stage decode_stream$s 30 50 $py tools/bench_kernels.py --device cuda --decode \
    --warmup-s 1 --out "$out/decode_stream$s.jsonl"
done
if [ "${SAN:-1}" = 1 ]; then
  SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  LOWTUNE_CUDA_GEMV_STREAM=${SAN_STREAM:-2} stage sanitizer 30 100 "$SAN" --tool memcheck --error-exitcode 9 \
    $py -m pytest -q -p no:cacheprovider -x tests/test_cuda.py \
    -k "test_gemv_against and (Q4_K or Q4_0 or Q6_K) and bfloat16"
fi
cp tools/gpu/gemv_stream.sh "$out/call.sh"
# at most 8 files come back: everything in one archive beside the folder, which goes
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
