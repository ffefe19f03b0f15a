#!/usr/bin/env bash
# Merge-exact training (QA-HiRA / QA-LoRA through the fp16 rounding of the merged mins) on one H200.
#
#   OUT=dir bash tools/gpu/merge_exact.sh            # one call, ~5 min (+ the build when not incremental)
#     builds lowtune for sm_90 (incremental: quick right after tools/gpu/check_all.sh on the same
#     machine), runs the CUDA cases of tests/test_merge_exact.py (offsets and merged bytes equal the
#     CPU's; trained on the GPU, the merged file gives the adapted model's logits bit for bit) and of
#     the compiled/streamed training tests (their models hold merge-exact layers), then the step
#     overhead of merge_exact on against off (tools/quality_merge_exact.py --random): QA-HiRA and
#     QA-LoRA on Q4_1 and INT4-g64, random weights of SmolLM2-135M's and Llama-2-7B's shapes,
#     adapters on every layer, eager as the trainer runs. In $OUT: tests.log, overhead.json/.md.
#
#   OUT=dir bash tools/gpu/merge_exact.sh study      # the SmolLM2 study (three seeds), after
#     `bash tools/gpu/methods.sh install` on the same machine (which installs lowtune and keeps part 1
#     of the SmolLM2 file); send .carry/methods/part-2 with this command (see tools/gpu/methods.sh).
#     In $OUT: study.json/.md (exactness, held-out perplexity, step overhead on the real model); results
#     are written after every run, so a run cut by the time limit keeps what it did (BASES=INT4-g64
#     runs the second base alone in another call).
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
out=${OUT:-gpu_merge_exact}; mkdir -p "$out"
t0=$SECONDS

if [ "${1:-}" = study ]; then
  STASH=${STASH:-$HOME/lowtune-methods}
  [ -f "$STASH/manifest.json" ] || { echo "part 1 is not in $STASH: run 'bash tools/gpu/methods.sh install' first"; exit 3; }
  cp .carry/methods/part-2/* "$STASH/"
  (cd /tmp && $py -c "import lowtune, sys; sys.exit(0 if lowtune.build_info()['cuda'] else 1)") || {
    echo "lowtune with CUDA is not installed here: run 'bash tools/gpu/methods.sh install' first"; exit 3; }
  # the installed lowtune (methods.sh install), not the source tree's python/
  timeout 560 env -u PYTHONPATH $py tools/quality_merge_exact.py --device cuda --model "$STASH" --work "$STASH/me-work" --bases ${BASES:-Q4_1 INT4-g64} \
    --out "$out/study.json" 2>&1 | tail -60
  echo "== total $((SECONDS - t0)) s"
  exit 0
fi

carried_wheels "$out/pip.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
build_cuda "$out/build.log" || exit 1
echo "== CUDA tests"
timeout 180 $py -m pytest -q -p no:cacheprovider -m "cuda and not smollm2 and not llamacpp and not gemma3" \
  tests/test_merge_exact.py tests/test_compile.py tests/test_streaming.py >"$out/tests.log" 2>&1
echo "tests exit $? after $((SECONDS - t0)) s"
grep -E "^(FAILED|ERROR)|passed|failed" "$out/tests.log" | tail -20
echo "== step overhead"
timeout $(( 580 - (SECONDS - t0) )) $py tools/quality_merge_exact.py --device cuda --random smollm2 llama2-7b \
  --all-layers --out "$out/overhead.json" 2>&1 | tail -30
echo "== total $((SECONDS - t0)) s"
