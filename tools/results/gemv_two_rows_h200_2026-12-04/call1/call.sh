#!/usr/bin/env bash
# call 1: gemv with 2 and 4 rows a warp (LOWTUNE_CUDA_GEMV_ROWS): tests under each, graph-replay
# timings of every setting, decode with each
cd "$(dirname "$0")/.."
source tools/gpu/common.sh
OUT=$OUT/u1 begin_call u1 560 || { tar czf "$OUT/u1.tgz" -C "$OUT" u1; exit 1; }
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,driver_version --format=csv > "$out/gpu.txt"
for r in 2 4; do
  LOWTUNE_CUDA_GEMV_ROWS=$r stage test_rows$r 30 90 $py -m pytest -q -x -p no:cacheprovider tests/test_cuda.py -k "gemv and not input_grad" -rf
done
stage gemv 60 200 $py tools/gpu/gemv.py --settings gemv,gemv_rows2,gemv_rows4 --out "$out/gemv.jsonl"
for r in 1 2 4; do
  LOWTUNE_CUDA_GEMV_ROWS=$r stage decode_rows$r 40 70 $py tools/bench_kernels.py --device cuda --decode --warmup-s 1 --out "$out/decode_rows$r.jsonl"
done
cp .whl/u1.sh "$out/call.sh"; tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
