#!/usr/bin/env bash
# regs forward with A hoisted: tests, regs vs staged at M = 2, 4, 8, 16 for eight types, ncu of regs and staged at M = 16
set -uo pipefail
source tools/gpu/common.sh
OUT=$OUT/c3 begin_call c3 400 || exit 1
stage tests 30 90 $py -m pytest -q -p no:cacheprovider -n 4 tests/test_cuda.py tests/test_cuda_policy.py -k "regs or policy"
stage kernels 30 120 $py tools/bench_kernels.py --device cuda --types Q4_0,Q4_K,Q6_K,Q8_0,Q5_K,Q3_K,Q2_K,Q5_0,INT4-g64 \
  --ms 2,4,8,16 --kernels forward --shapes 4096x4096,14336x4096,4096x14336 --peers none --warmup-s 0.5 --reps 3 \
  --out "$out/kernels.jsonl"
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
sec=(--section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section LaunchStats)
LOWTUNE_CUDA_PATH=regs stage ncu_regs 20 60 "$ncu" --clock-control none --kernel-name regex:regs \
    --launch-skip 1 --launch-count 1 "${sec[@]}" $py tools/gpu/profile_small_m.py --type Q4_0 --shape 4096x14336 --m 16 --kernel forward
LOWTUNE_CUDA_PATH=staged stage ncu_staged 20 60 "$ncu" --clock-control none --kernel-name regex:staged \
    --launch-skip 1 --launch-count 1 "${sec[@]}" $py tools/gpu/profile_small_m.py --type Q4_0 --shape 4096x14336 --m 16 --kernel forward
grep -E "\| (regs|staged) \|" "$out/kernels.log" | sort -t'|' -k3,6
cp .whl/s3.sh "$out/call.sh"
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
