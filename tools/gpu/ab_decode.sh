#!/usr/bin/env bash
# One GPU call that times decoding under two environments, A and B (and C where set), alternated, each
# run in its own process: build; the glue and decode CUDA tests under B; compute-sanitizer memcheck over
# tests/test_glue_cuda.py -k SAN_K under B; tools/bench_kernels.py --decode (generate's variant, random
# weights in Llama-2-7B shapes, every matrix Q4_K) ROUNDS times a prompt length; then
# tools/gpu/profile_decode.py under each (the step's kernels, eager and replayed).
# Usage, from the repository root:
#   A="LOWTUNE_CUDA_PDL=0" B="" OUT=$OUT/d bash tools/gpu/ab_decode.sh
# (ROUNDS: 2; PROMPTS: "16 1024"; SAN_K: unset skips the sanitizer; PROFILE=0 skips the profiles;
# BUILD=0 on a warm machine)
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
begin_call ab_decode 560 || { end_call tools/gpu/ab_decode.sh; exit 1; }
ab_settings
stage tests 40 150 env ${B:-} $py -m pytest -q -p no:cacheprovider -n 8 -rf -m "not llamacpp and not smollm2" \
  tests/test_glue_cuda.py tests/test_generate_static.py
[ -z "${SAN_K:-}" ] || SAN_FILE=tests/test_glue_cuda.py sanitizer_tests "$SAN_K" env ${B:-}
for prompt in ${PROMPTS:-16 1024}; do
  for r in $(seq 1 "${ROUNDS:-2}"); do
    for s in $names; do
      stage decode_p${prompt}_${s}_$r 25 60 env $(setting $s) $py tools/bench_kernels.py --device cuda --decode \
        --warmup-s 1 --decode-variants generate --decode-prompt "$prompt" --out "$out/decode_p${prompt}_${s}_$r.jsonl"
    done
  done
done
if [ "${PROFILE:-1}" = 1 ]; then
  for s in $names; do
    stage profile_$s 25 60 env $(setting $s) $py tools/gpu/profile_decode.py --prompt 16 --steps 16 \
      --out "$out/profile_$s.json"
  done
fi
end_call tools/gpu/ab_decode.sh
