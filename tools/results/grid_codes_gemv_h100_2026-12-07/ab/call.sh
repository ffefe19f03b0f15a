#!/usr/bin/env bash
# One GPU call that times the small-M kernels of this tree (B) against a base build (A): a copy of the
# tree with the files under BASE_DIR laid over it (e.g. the changed csrc files as they were before the
# change). B is built first; A builds beside B's CUDA tests, compute-sanitizer pass (SAN_K) and first
# timing run; then bench_kernels.py (graph replay, weights rotated past 2x L2) under A, decoding each of
# DECODE_TYPES under A and B, and a second round B, A while time is left; tools/gpu/ab_kernels.py's
# per-entry table of B / A in ab.md.
# Usage, from the repository root:
#   OUT=dir BASE_DIR=.carry/base TYPES=Q5_K,Q4_K [MS=1,4] [SHAPES=...] [PATHS=gemv,staged] [SAN_K=...] \
#     [DECODE_TYPES="Q5_K IQ4_XS"] bash tools/gpu/ab_build.sh
# SETS="1:input_grad:gemv:Q4_K,Q5_K 16:forward:staged:Q4_0" times each set (M:KERNELS:PATHS:TYPES[:ENV], ENV
# comma-separated assignments for that set's processes, e.g. LOWTUNE_CUDA_GEMV_GRAD_STAGED=1) instead of
# TYPES x MS x both kernels. On a fresh machine the two builds take ~150 and ~200 s (the base's beside B's tests):
# with BUDGET_S below ~450 the base's rounds may not run.
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
begin_call ab_build 585 || { end_call tools/gpu/ab_build.sh; exit 1; }
start_base_build tools/gpu/ab_build.sh 10 || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt"
cuda_tests
[ -z "${SAN_K:-}" ] || sanitizer_tests "$SAN_K"
bench() {  # NAME ROOT: bench_kernels.py with ROOT's build, once for each of SETS (M:KERNELS:PATHS:TYPES[:ENV])
  local sets=${SETS:-"${MS:-1,4}:forward,input_grad:${PATHS:-}:${TYPES:-}"} i=0 s ms kernels paths types envs rc=0
  for s in $sets; do
    IFS=: read -r ms kernels paths types envs <<<"$s"
    stage "$1_s$i" 30 120 env ${envs//,/ } PYTHONPATH="$2/python" $py tools/bench_kernels.py --device cuda \
      --types "$types" --ms "$ms" --kernels "$kernels" --shapes "${SHAPES:-4096x4096,14336x4096,4096x14336}" \
      ${paths:+--paths "$paths"} --peers "" --warmup-s 0.5 --reps 3 --out "$out/$1_s$i.jsonl" || rc=$?
    i=$((i + 1))
  done
  return $rc
}
bench kernels_b_1 "$PWD"
wait "$base_build"; cat "$out/build_base.out"
bench kernels_a_1 "$base"
for t in ${DECODE_TYPES:-}; do
  for s in a b; do
    root=$base; [ "$s" = b ] && root=$PWD
    stage "decode_${s}_$t" 25 45 env PYTHONPATH="$root/python" $py tools/bench_kernels.py --device cuda --decode \
      --warmup-s 1 --decode-type "$t" --decode-variants generate --out "$out/decode_${s}_$t.jsonl"
  done
done
bench kernels_b_2 "$PWD" && bench kernels_a_2 "$base"
$py tools/gpu/ab_kernels.py --a "$out"/kernels_a_*.jsonl --b "$out"/kernels_b_*.jsonl \
  --paths "${PATHS:-staged,gemv,regs}" --rows > "$out/ab.md" 2>&1; tail -n 12 "$out/ab.md"
end_call tools/gpu/ab_build.sh
