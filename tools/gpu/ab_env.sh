#!/usr/bin/env bash
# One GPU call that times the small-M kernels under two environments, A and B (and C, D where set),
# alternated, each run in its own process: build; the CUDA tests under B; bench_kernels.py (graph replay,
# weights rotated past 2x L2) ROUNDS times under each; tools/gpu/ab_kernels.py's per-entry table of B / A
# (ab.md; C / A in ac.md, D / A in ad.md); decoding under each.
# Usage, from the repository root:
#   A="LOWTUNE_CUDA_STAGED_ONE_WAVE=0" B="" OUT=dir bash tools/gpu/ab_env.sh
# (ROUNDS: 2; TYPES, MS, SHAPES, PATHS, KERNELS, PEERS: bench_kernels.py's --types, --ms, --shapes, --paths,
# --kernels, --peers (default tinygemm,cublas_bf16; empty: none); TEST_K: only the CUDA tests matching it
# (TEST_LIMIT_S: their time limit, default 150 s); SAN_K: compute-sanitizer over tests/test_cuda.py -k SAN_K
# under B; FORWARD=1: the one-row forward of TYPES once and
# tools/gpu/input_grad_table.py's table (B_GEMV: its --b-gemv); DECODE=0 skips decoding, DECODE_TYPE and
# DECODE_VARIANTS: its --decode-type and --decode-variants; BUILD=0 on a warm machine)
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
begin_call ab_env 570 || { end_call tools/gpu/ab_env.sh; exit 1; }
ab_settings
cuda_tests env ${B:-}
[ -z "${SAN_K:-}" ] || sanitizer_tests "$SAN_K" env ${B:-}
types=${TYPES:-Q4_K,Q4_0,Q4_1,INT4-g64,Q6_K,Q5_K,Q8_0,Q2_K,Q3_K}
for r in $(seq 1 "${ROUNDS:-2}"); do
  for s in $names; do
    stage kernels_${s}_$r 30 110 env $(setting $s) $py tools/bench_kernels.py --device cuda --types "$types" \
      --ms "${MS:-1,16}" --kernels "${KERNELS:-forward,input_grad}" \
      --shapes "${SHAPES:-4096x4096,14336x4096,4096x14336}" \
      --paths "${PATHS:-staged,gemv,regs}" --peers "${PEERS-tinygemm,cublas_bf16}" --warmup-s 0.5 --reps 3 \
      --out "$out/kernels_${s}_$r.jsonl"
  done
done
for s in ${names#a }; do  # each setting against A
  md="$out/ab.md"; [ "$s" = b ] || md="$out/a$s.md"
  $py tools/gpu/ab_kernels.py --a "$out"/kernels_a_*.jsonl --b "$out"/kernels_${s}_*.jsonl \
    --paths "${PATHS:-staged,gemv,regs}" --rows > "$md" 2>&1; tail -n 12 "$md"
done
if [ "${FORWARD:-0}" = 1 ]; then  # the one-row forward once (under A), and the input gradient's table against it
  stage forward 20 60 env $(setting a) $py tools/bench_kernels.py --device cuda --types "$types" --ms 1 \
    --kernels forward --shapes "${SHAPES:-4096x4096,14336x4096,4096x14336}" --paths gemv --peers "" --warmup-s 0.5 \
    --reps 3 --out "$out/forward.jsonl"
  $py tools/gpu/input_grad_table.py "$out" "$out/forward.jsonl" ${B_GEMV:+--b-gemv "$B_GEMV"} > "$out/table.md" 2>&1
  cat "$out/table.md"
fi
if [ "${DECODE:-1}" = 1 ]; then
  for s in $names; do
    stage decode_$s 25 45 env $(setting $s) $py tools/bench_kernels.py --device cuda --decode --warmup-s 1 \
      --decode-type "${DECODE_TYPE:-Q4_K}" --decode-variants "${DECODE_VARIANTS:-}" --out "$out/decode_$s.jsonl"
  done
fi
end_call tools/gpu/ab_env.sh
