#!/usr/bin/env bash
# One GPU call for the small-M kernels on programmatic dependent launch (staged_gemv.cuh's forward and
# input gradient, gemv_grad.cuh, small_m.cuh's split reduction): build; the CUDA tests, among them
# products back to back in a graph (test_products_back_to_back_in_a_cuda_graph); M = 1 and 16, forward
# and input gradient, by graph replay with LOWTUNE_CUDA_PDL=0 and with the default, alternated, each in
# its own process; compute-sanitizer on the staged and one-row input-gradient tests; decoding with either.
# Usage, from the repository root: OUT=dir bash tools/gpu/small_m_pdl.sh
# (TYPES: bench_kernels.py's --types; ROUNDS: how many off/on pairs; SAN_K: the sanitizer's tests, pytest -k)
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
begin_call small_m_pdl 570 || { end_call tools/gpu/small_m_pdl.sh; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt"
cuda_tests
types=${TYPES:-Q4_K,Q4_0,Q4_1,INT4-g64,Q6_K,Q5_K,Q8_0,Q2_K,Q3_K}
for r in $(seq 1 "${ROUNDS:-1}"); do
  for pdl in 0 1; do
    LOWTUNE_CUDA_PDL=$pdl stage kernels_pdl${pdl}_$r 40 110 $py tools/bench_kernels.py --device cuda --types "$types" \
      --ms 1,16 --kernels forward,input_grad --shapes 4096x4096,14336x4096,4096x14336 --peers tinygemm,cublas_bf16 \
      --warmup-s 0.5 --reps 3 --out "$out/kernels_pdl${pdl}_$r.jsonl"
  done
done
sanitizer_tests "${SAN_K:-back_to_back or (staged_kernels_every_type and (Q4_K or Q6_K or Q4_0)) or gemv_input_grad}"
for pdl in 0 1; do
  LOWTUNE_CUDA_PDL=$pdl stage decode_pdl$pdl 25 45 $py tools/bench_kernels.py --device cuda --decode --warmup-s 1 \
    --out "$out/decode_pdl$pdl.jsonl"
done
end_call tools/gpu/small_m_pdl.sh
