#!/usr/bin/env bash
# call 6: the optimizer's span in the 2 GiB step (bench_train's new column), resident beside it
cd "$(dirname "$0")/.."
source tools/gpu/common.sh
OUT=$OUT/c6 begin_call c6 255 || { tar czf "$OUT/c6.tgz" -C "$OUT" c6; exit 1; }
stage train 60 $(( $(left) - 5 )) $py tools/bench_train.py --steps 10 --unique-layers 2 \
  --peaks "$out/peaks.json" --deadline $(( $(left) - 15 )) --min-run 25 --out "$out/train" \
  --model llama2-7b --reference resident --runs streamed:2GiB,resident
cp .whl/s6.sh "$out/call.sh"; tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
