#!/usr/bin/env bash
# call 5: the context's anatomy at the default stack limit and at 0 (one process each); 7B at 2 GiB again
cd "$(dirname "$0")/.."
source tools/gpu/common.sh
OUT=$OUT/c5 begin_call c5 390 || { tar czf "$OUT/c5.tgz" -C "$OUT" c5; exit 1; }
for s in keep 0; do stage ctx_$s 40 90 $py tools/gpu/context_memory.py --stack $s --out "$out/context_stack_$s.json"; done
stage train 100 $(( $(left) - 10 )) $py tools/bench_train.py --steps 12 --unique-layers 2 --weights-cache <weights-cache> \
  --peaks "$out/peaks.json" --deadline $(( $(left) - 20 )) --min-run 30 --out "$out/train" \
  --model llama2-7b --reference resident --runs resident,streamed:2GiB
cp .whl/s5.sh "$out/call.sh"; tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
