#!/usr/bin/env bash
# call 4: the CUDA tests; 7B resident, at 3, 2 and 1.5 GiB (HostAdamW views made once, two copy streams)
cd "$(dirname "$0")/.."
source tools/gpu/common.sh
OUT=$OUT/c4 begin_call c4 570 || { tar czf "$OUT/c4.tgz" -C "$OUT" c4; exit 1; }
stage tests 60 150 $py -m pytest -q -p no:cacheprovider -m "cuda and not smollm2 and not llamacpp and not gemma3" \
  -n 4 --dist loadfile tests
stage train 120 $(( $(left) - 10 )) $py tools/bench_train.py --steps 12 --unique-layers 2 --weights-cache <weights-cache> \
  --peaks "$out/peaks.json" --deadline $(( $(left) - 30 )) --min-run 30 --out "$out/train" \
  --model llama2-7b --reference resident --runs resident,streamed:2GiB,streamed:3GiB,streamed:1536MiB
cp "$out/train/results.json" "$out/train_7b.json"; $py tools/gpu/vram_summary.py "$out" > "$out/summary.md" 2>&1
cp .whl/s4.sh "$out/call.sh"; tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
