#!/usr/bin/env bash
# call 1: where the 2 GiB step's time goes: phase ends (host queued / GPU reached) and a kept chrome trace
cd "$(dirname "$0")/.."
source tools/gpu/common.sh
OUT=$OUT/c1 begin_call c1 330 || { tar czf "$OUT/c1.tgz" -C "$OUT" c1; exit 1; }
stage train 60 $(( $(left) - 5 )) $py tools/bench_train.py --steps 9 --unique-layers 2 \
  --peaks "$out/peaks.json" --deadline $(( $(left) - 15 )) --min-run 25 --out "$out/train" \
  --profile --profile-step 6 --profile-trace "$out/trace" \
  --model llama2-7b --reference resident --runs streamed:2GiB,resident
cp .whl/t1.sh "$out/call.sh"; tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
