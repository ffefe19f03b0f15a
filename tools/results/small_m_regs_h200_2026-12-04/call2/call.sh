#!/usr/bin/env bash
# L2 prefetch (LOWTUNE_CUDA_PREFETCH=steps ahead) in the regs forward and gemv_grad: tests and sanitizer with it on,
# bench at 0/2/4/8, ncu of both kernels at 0 and 4
set -uo pipefail
source tools/gpu/common.sh
OUT=$OUT/c2 begin_call c2 540 || exit 1
LOWTUNE_CUDA_PREFETCH=4 stage tests 30 90 $py -m pytest -q -p no:cacheprovider -n 4 tests/test_cuda.py -k "regs or input_grad"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
LOWTUNE_CUDA_PREFETCH=4 stage sanitizer 30 90 "$SAN" --tool memcheck --error-exitcode 9 $py -m pytest -q -p no:cacheprovider -x \
  tests/test_cuda.py -k "(regs_forward and (Q4_0 or Q4_K or Q6_K or INT4-g64)) or gemv_input_grad"
for pf in 0 2 4 8; do
  LOWTUNE_CUDA_PREFETCH=$pf stage k_pf$pf 20 50 $py tools/bench_kernels.py --device cuda --types Q4_0,Q4_K,Q6_K,INT4-g64,Q8_0 \
    --ms 1,16 --kernels forward,input_grad --shapes 4096x4096,14336x4096,4096x14336 --peers none --warmup-s 0.5 --reps 3 \
    --out "$out/k_pf$pf.jsonl"
done
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
sec=(--section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section LaunchStats)
for pf in 0 4; do
  LOWTUNE_CUDA_PREFETCH=$pf LOWTUNE_CUDA_PATH=regs stage ncu_regs_pf$pf 20 60 "$ncu" --clock-control none --kernel-name regex:regs \
    --launch-skip 1 --launch-count 1 "${sec[@]}" $py tools/gpu/profile_small_m.py --type Q4_0 --shape 4096x14336 --m 16 --kernel forward
  LOWTUNE_CUDA_PREFETCH=$pf LOWTUNE_CUDA_PATH=gemv stage ncu_grad_pf$pf 20 60 "$ncu" --clock-control none --kernel-name regex:grad_kernel \
    --launch-skip 1 --launch-count 1 "${sec[@]}" $py tools/gpu/profile_small_m.py --type Q4_0 --shape 14336x4096 --m 1 --kernel input_grad
done
for pf in 0 2 4 8; do grep -E "\| (regs|gemv) \|" "$out/k_pf$pf.log" | sed "s/^/pf$pf /"; done | sort -t'|' -k3,6 | head -150
cp .whl/s2.sh "$out/call.sh"
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
