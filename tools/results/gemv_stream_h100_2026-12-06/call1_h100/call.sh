#!/usr/bin/env bash
# One GPU call for the streamed gemv (gemv.cuh: gemv_stream_kernel, weights through bulk copies): the
# gemv tests (the streamed kernel's bits against the register kernels'), timings of the 4-bit types
# and a few others by default and streamed at one and two CTAs an SM, decoding with and without,
# compute-sanitizer on the streamed kernel.
# Usage, from the repository root: OUT=dir bash tools/gpu/gemv_stream.sh
# (TYPES, SHAPES: gemv.py's --types and --shapes; SAN=0 skips the sanitizer)
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
begin_call gemv_stream 575 || { tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader > "$out/gpu.txt"
stage tests 40 130 $py -m pytest -q -p no:cacheprovider -n 8 -rf tests/test_cuda_policy.py tests/test_cuda.py \
  -k "gemv_against or policy"
stage gemv 60 200 $py tools/gpu/gemv.py --settings default,stream1,stream2 \
  --types "${TYPES:-Q4_K,Q4_0,Q4_1,INT4-g64,Q6_K,Q8_0,Q3_K,INT2-g64}" --shapes "${SHAPES:-4096x4096,14336x4096,4096x14336}" --out "$out/gemv.jsonl"
for s in 1 0; do
  LOWTUNE_CUDA_GEMV_STREAM=$s stage decode_stream$s 30 50 $py tools/bench_kernels.py --device cuda --decode \
    --warmup-s 1 --out "$out/decode_stream$s.jsonl"
done
if [ "${SAN:-1}" = 1 ]; then
  SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  LOWTUNE_CUDA_GEMV_STREAM=1 stage sanitizer 30 100 "$SAN" --tool memcheck --error-exitcode 9 $py -m pytest -q \
    -p no:cacheprovider -x tests/test_cuda.py -k "test_gemv_against and (Q4_K or Q4_0 or Q6_K) and bfloat16"
fi
cp tools/gpu/gemv_stream.sh "$out/call.sh"
# at most 8 files come back: everything in one archive beside the folder, which goes
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
