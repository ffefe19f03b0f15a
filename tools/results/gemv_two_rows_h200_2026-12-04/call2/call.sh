#!/usr/bin/env bash
# call 2: the rows-a-warp gemv with its first round loaded before the wait, and balanced grids;
# an N sweep of Q4_K at K = 4096 (fixed cost against streaming); decode; ncu of r1 and rows2
cd "$(dirname "$0")/.."
source tools/gpu/common.sh
OUT=$OUT/u2 begin_call u2 570 || { tar czf "$OUT/u2.tgz" -C "$OUT" u2; exit 1; }
for r in 2 4; do
  LOWTUNE_CUDA_GEMV_ROWS=$r stage test_rows$r 30 90 $py -m pytest -q -x -p no:cacheprovider tests/test_cuda.py -k "gemv and not input_grad" -rf
done
LOWTUNE_CUDA_GEMV_ROWS=2 LOWTUNE_CUDA_GEMV_BALANCE=1 stage test_rows2_bal 30 90 $py -m pytest -q -x -p no:cacheprovider tests/test_cuda.py -k "gemv and not input_grad" -rf
stage gemv 60 200 $py tools/gpu/gemv.py --settings gemv,rows2,rows2_late,rows2_balanced,rows4,rows4_balanced --out "$out/gemv.jsonl"
stage sweep 30 100 $py tools/gpu/gemv.py --types Q4_K,INT4-g64,INT2-g64 --shapes 2048x4096,4096x4096,8192x4096,16384x4096,32768x4096,65536x4096,4096x8192,4096x16384,4096x32768 --settings gemv,rows2,rows2_balanced --out "$out/sweep.jsonl"
for r in 1 2; do
  LOWTUNE_CUDA_GEMV_ROWS=$r stage decode_rows$r 40 70 $py tools/bench_kernels.py --device cuda --decode --warmup-s 1 --out "$out/decode_rows$r.jsonl"
done
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
for r in 1 2; do
  LOWTUNE_CUDA_GEMV_ROWS=$r stage ncu_rows$r 40 110 "$ncu" --clock-control none --kernel-name regex:"gemv" --launch-skip 1 --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats \
    $py tools/gpu/profile_small_m.py --type Q4_K --shape 14336x4096 --m 1 --kernel forward
done
cp .whl/u2.sh "$out/call.sh"; tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
