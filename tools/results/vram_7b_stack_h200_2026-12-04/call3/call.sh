#!/usr/bin/env bash
# call 3: HostAdamW copies in and out on two streams; 7B at 2 GiB (profiled) against resident
cd "$(dirname "$0")/.."
source tools/gpu/common.sh
OUT=$OUT/c3 begin_call c3 560 || { tar czf "$OUT/c3.tgz" -C "$OUT" c3; exit 1; }
stage tests 30 120 $py -m pytest -q -p no:cacheprovider -m "cuda and not smollm2 and not llamacpp and not gemma3" \
  tests/test_host_adamw.py tests/test_memory_budget.py
stage train 120 $(( $(left) - 10 )) $py tools/bench_train.py --steps 12 --unique-layers 2 --weights-cache <weights-cache> \
  --profile --profile-step 10 --peaks "$out/peaks.json" --deadline $(( $(left) - 30 )) --min-run 30 --out "$out/train" \
  --model llama2-7b --reference resident --runs resident,streamed:2GiB
cp .whl/s3.sh "$out/call.sh"; tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
