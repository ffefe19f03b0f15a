#!/usr/bin/env bash
# call 4: Llama-2-70B shapes at 8 and 6 GiB, 7B from the GGUF on disk (--host-ram 2GiB); then 7B
# resident and --max-vram 2GiB over 20 steps (call 3's 2 GiB run had slow steps 3-7)
cd "$(dirname "$0")/.."
source tools/gpu/common.sh
OUT=$OUT/c4 begin_call c4 530 || { tar czf "$OUT/c4.tgz" -C "$OUT" c4; exit 1; }
STAGES="train_70b disk summary" OUT=$out/vram BUDGET_S=$(( $(left) - 130 )) tools/gpu/vram.sh > "$out/vram.log" 2>&1
tail -30 "$out/vram.log"
stage train_7b_20 60 $(( $(left) - 5 )) $py tools/bench_train.py --steps 20 --unique-layers 2 \
  --weights-cache "${TMPDIR:-/tmp}/lowtune-bench-weights" --peaks "$out/vram/peaks.json" \
  --deadline $(( $(left) - 12 )) --min-run 25 --out "$out/train_7b_20" \
  --model llama2-7b --reference resident --runs streamed:2GiB,resident
cp .whl/t4.sh "$out/call.sh"; tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
