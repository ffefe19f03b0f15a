#!/usr/bin/env bash
# call 2: host embedding decoded on the GPU, LM head in vocabulary chunks: CUDA tests, then 2 GiB, 3 GiB, resident
cd "$(dirname "$0")/.."
source tools/gpu/common.sh
OUT=$OUT/c2 begin_call c2 440 || { tar czf "$OUT/c2.tgz" -C "$OUT" c2; exit 1; }
stage tests 60 100 $py -m pytest -q -x tests/test_model.py tests/test_streaming.py $($py -c "import xdist" 2>/dev/null && echo "-n 4")
stage train 60 $(( $(left) - 5 )) $py tools/bench_train.py --steps 10 --unique-layers 2 \
  --peaks "$out/peaks.json" --deadline $(( $(left) - 15 )) --min-run 25 --out "$out/train" \
  --profile --profile-step 7 --profile-trace "$out/trace" \
  --model llama2-7b --reference resident --runs streamed:2GiB,resident,streamed:3GiB
cp .whl/t2.sh "$out/call.sh"; tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
