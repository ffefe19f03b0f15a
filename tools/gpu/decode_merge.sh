#!/usr/bin/env bash
# One GPU call: the decode attention's merge in the split kernel against the merge kernel, and the
# positions per split (LOWTUNE_CUDA_ATTN_COMBINE, LOWTUNE_CUDA_ATTN_POSITIONS): the glue and decode
# CUDA tests, then tools/bench_kernels.py --decode (generate's variant) in each setting, alternated,
# at a 16-token and a 1024-token prompt; then the recurrences' CUDA tests and
# tools/bench_recurrences.py --device cuda where it exists.
# Usage, from the repository root: OUT=dir bash tools/gpu/decode_merge.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
begin_call decode_merge 560 || { tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader > "$out/gpu.txt"
stage tests 60 150 $py -m pytest -q -p no:cacheprovider -n 8 -rf -m "not llamacpp and not smollm2" \
  tests/test_glue_cuda.py tests/test_generate_static.py
# (prompt:run -> settings, positions per split:merge in the split kernel)
for pr in "16:1:64:0 64:1 16:1 32:1 16:0" "16:2:64:0 64:1 16:1" "1024:1:64:0 64:1 16:1"; do
  prompt=${pr%%:*} rest=${pr#*:} run=${rest%%:*} settings=${rest#*:}
  for s in $settings; do
      pos=${s%:*} comb=${s#*:}
      stage "decode_p${prompt}_pos${pos}_comb${comb}_run$run" 25 60 env LOWTUNE_CUDA_ATTN_POSITIONS=$pos \
        LOWTUNE_CUDA_ATTN_COMBINE=$comb $py tools/bench_kernels.py --device cuda --decode --warmup-s 1 \
        --decode-variants generate --decode-prompt $prompt \
        --out "$out/decode_p${prompt}_pos${pos}_comb${comb}_run$run.jsonl"
  done
done
if [ -f tools/bench_recurrences.py ]; then
  stage recurrence_tests 40 150 $py -m pytest -q -p no:cacheprovider -n 8 -rf -m "not llamacpp and not smollm2" \
    -k "cuda and (rwkv or wkv or mamba or recurrence or falcon_h1 or granitehybrid or jamba or plamo2 or nemotron_h)" \
    tests/test_families.py tests/test_families_train_export.py
  stage recurrences 30 120 $py tools/bench_recurrences.py --device cuda --repeats 2 --json "$out/recurrences.json"
fi
cp tools/gpu/decode_merge.sh "$out/call.sh"
# at most 8 files come back: everything in one archive beside the folder, which goes
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
