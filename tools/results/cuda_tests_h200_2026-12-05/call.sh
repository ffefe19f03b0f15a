#!/usr/bin/env bash
# w1: main's CUDA tests (every family, MoE, compile) and finetune on CUDA in fp32/bf16, compile auto/off
cd "$(dirname "$0")/.."
source tools/gpu/common.sh
OUT=$OUT/w1 begin_call w1 570 || { tar czf "$OUT/w1.tgz" -C "$OUT" w1; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader > "$out/gpu.txt"
git log --oneline -1 > "$out/commit.txt"
stage tests 60 330 $py -m pytest -q -p no:cacheprovider -m "cuda and not smollm2 and not llamacpp and not gemma3" \
  -n 4 --dist loadfile -rf --durations=25 tests
grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -40
stage finetune 30 120 $py finetune_cuda.py "$out/ft"
rm -f "$out"/ft/*.gguf "$out"/ft/run_*/merged.gguf; find "$out/ft" -name "*.pt" -o -name "*.safetensors" | xargs rm -f
cp .whl/w1.sh "$out/call.sh"; tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
