#!/usr/bin/env bash
# call 2: the stack reservation lowered at measure(); 7B at 3, 2 and 1.5 GiB against resident
cd "$(dirname "$0")/.."
export OUT_ROOT=$OUT
STAGES="build tests train_7b summary" BUDGET_S=560 OUT=$OUT/c2 bash tools/gpu/vram.sh
cp .whl/s2.sh "$OUT/c2/call.sh"; tar czf "$OUT/c2.tgz" -C "$OUT" c2 && rm -rf "$OUT/c2"
