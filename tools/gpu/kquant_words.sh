#!/usr/bin/env bash
# One GPU call for Q5_K's and Q2_K's shared unit words (Unpack<T>::kSameWords = 32: the spans e and e + 32
# from one load; the gemv's register bounds for them raised to 3 and 4 CTAs): build; the CUDA tests;
# bench_kernels.py (graph replay, weights rotated past 2x L2) over the changed types and unchanged anchors
# (Q4_K, Q6_K, Q3_K), M = 1 (gemv, staged) and M = 8, 16 (staged, regs); compute-sanitizer over the two
# types' tests; decoding a 7B-shaped Q5_K model; then Nsight Compute profiles (ENTRIES, as
# tools/gpu/ncu_small_m.sh takes them) while time is left.
# Usage, from the repository root:  OUT=dir bash tools/gpu/kquant_words.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
begin_call kquant_words 560 || { end_call tools/gpu/kquant_words.sh; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt"
cuda_tests
types=${TYPES:-Q5_K,Q2_K,Q4_K,Q6_K,Q3_K}
shapes=4096x4096,14336x4096,4096x14336
bench() {  # NAME MS PATHS
  stage "$1" 30 110 $py tools/bench_kernels.py --device cuda --types "$types" --ms "$2" --kernels forward,input_grad \
    --shapes "$shapes" --paths "$3" --peers "" --warmup-s 0.5 --reps 3 --out "$out/$1.jsonl"
}
bench kernels_m1_1 1 gemv,staged
bench kernels_m8_1 8,16 staged,regs
sanitizer_tests "(Q5_K or Q2_K) and (gemv or staged or regs)"
bench kernels_m1_2 1 gemv,staged
stage decode 25 45 $py tools/bench_kernels.py --device cuda --decode --warmup-s 1 --decode-type Q5_K \
  --decode-variants generate --out "$out/decode.jsonl"
if [ "$(left)" -gt 60 ]; then
  BUILD=0 BUDGET_S=$(($(left) - 10)) OUT="$out/ncu" \
    ENTRIES=${ENTRIES:-"Q2_K:14336x4096:1:forward Q3_K:14336x4096:1:forward Q4_K:14336x4096:16:forward"} \
    bash tools/gpu/ncu_small_m.sh
fi
end_call tools/gpu/kquant_words.sh
