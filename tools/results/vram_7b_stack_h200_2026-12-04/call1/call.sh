#!/usr/bin/env bash
# call 1: the driver's context anatomy (stack reservation) on the H200
cd "$(dirname "$0")/.."
source tools/gpu/common.sh
OUT=$OUT/c1 begin_call c1 560 || { tar czf "$OUT/c1.tgz" -C "$OUT" c1; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt"
stage ctx 60 200 $py tools/gpu/context_memory.py --out "$out/context.json"
stage ctx_eager_only 60 150 env CUDA_MODULE_LOADING=EAGER $py tools/gpu/context_memory.py --layers 1 --limits 0 --out "$out/context_eager_loading.json"
cp .whl/s1.sh "$out/call.sh"; tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
