#!/usr/bin/env bash
# Nsight Compute profiles of the small-M CUDA kernels (M <= 16; at M = 1 the gemv kernel where the
# policy takes it), with their graph-replay timings:
#   OUT=dir [ENTRIES="Q4_K:14336x4096:1:forward ..."] [SECTIONS="..."] [NCU_EXTRA="--print-details all"] \
#     tools/gpu/ncu_small_m.sh
# (NCU_EXTRA: more ncu arguments, e.g. the stall reasons of WarpStateStats and SourceCounters' top stall
# locations, which the summary view leaves out; the build has -lineinfo). SOURCE=1 also writes
# $OUT/sass_<entry>.csv: every SASS instruction of the profiled kernels with its executed count and stall
# samples (ncu's source page).
# Builds lowtune._C for sm_90 unless BUILD=0, then for each entry TYPE:NxK:M:KERNEL writes
# $OUT/time_<entry>.log (tools/gpu/profile_small_m.py --time) and $OUT/ncu_<entry>.log (ncu's text
# report, clocks left alone). The register and shared-memory use of every staged and gemv kernel go to
# $OUT/res_usage.txt; everything is packed into $OUT/<name of OUT>.tgz at the end (end_call).
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
begin_call ncu_small_m 480 || { end_call tools/gpu/ncu_small_m.sh; exit 1; }
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
entries=${ENTRIES:-"Q4_K:14336x4096:1:forward Q4_1:14336x4096:1:forward INT4-g64:14336x4096:1:forward Q4_K:4096x4096:1:forward Q4_K:14336x4096:16:forward Q4_K:14336x4096:1:input_grad"}
sections=${SECTIONS:-"SpeedOfLight Occupancy LaunchStats WarpStateStats SchedulerStats MemoryWorkloadAnalysis InstructionStats"}
sec_args=(); for s in $sections; do sec_args+=(--section "$s"); done
so=$(ls python/lowtune/_C*.so | head -n 1)
cuobjdump -res-usage "$so" 2>/dev/null | grep -A1 -E "staged_(forward|input_grad)_kernel|gemv_kernel" \
  | head -400 >"$out/res_usage.txt" || true
for e in $entries; do
  IFS=: read -r ty shape m kern <<<"$e"
  tag="${kern}_${ty}_${shape}_m${m}"
  args=(--type "$ty" --shape "$shape" --m "$m" --kernel "$kern")
  stage "time_$tag" 20 60 $py tools/gpu/profile_small_m.py "${args[@]}" --time
  [ -n "$ncu" ] || { echo "no ncu found"; continue; }
  rep=(); [ "${SOURCE:-0}" = 1 ] && rep=(--export "$out/rep_$tag")
  stage "ncu_$tag" 30 120 "$ncu" --clock-control none ${NCU_EXTRA:-} "${rep[@]}" \
    --kernel-name regex:"gemv|staged|direct|reduce|grad_kernel|finish_kernel" --launch-skip 1 --launch-count 2 \
    "${sec_args[@]}" $py tools/gpu/profile_small_m.py "${args[@]}"
  if [ "${SOURCE:-0}" = 1 ] && [ -f "$out/rep_$tag.ncu-rep" ]; then
    "$ncu" --import "$out/rep_$tag.ncu-rep" --page details >>"$out/ncu_$tag.log" 2>&1
    "$ncu" --import "$out/rep_$tag.ncu-rep" --page source --csv --print-source sass >"$out/sass_$tag.csv" 2>&1
    rm -f "$out/rep_$tag.ncu-rep"
  fi
done
end_call tools/gpu/ncu_small_m.sh
