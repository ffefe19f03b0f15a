#!/usr/bin/env bash
# Training at the GPU's speed, on one H100/H200, in one go (about 9 minutes, the build included):
#   0. bitsandbytes from .whl/ when it is not installed (the QLoRA peer; without it the peer runs
#      are reported as failed and everything else still runs)
#   1. build lowtune with the CUDA kernels in place (LOWTUNE_CUDA=ON, sm_90)
#   2. the CUDA tests of the custom ops, compiled/captured layers, streaming and adapters
#   3. tools/bench_adapters.py: adapted layer / bare layer as GPU work (CUDA-graph replay)
#   4. tools/bench_train.py, Llama-3.2-1B shapes: resident (compiled + CUDA graphs), the QLoRA
#      peer, resident eager (the losses' reference), streamed at 3 GiB and at 2 GiB, and eager
#      layers replayed from CUDA graphs (no compile: what graphs alone give)
#   5. tools/bench_train.py, Llama-2-7B shapes: resident, streamed at 3 GiB, eager, the peer
#   6. tools/bench_elementwise.py: RMSNorm / RoPE / SwiGLU compiled against their memory floor
#   7. the summary table (targets against results), printed last
# Stages 3-6 get what is left of the time budget (BUDGET_S, default 525 s) and are skipped or cut
# short when it runs out; STAGES picks stages 2-6 (default "tests adapters train_1b train_7b
# elementwise"), e.g. STAGES="train_7b" to spend a second run on the 7B shapes alone.
# Usage: OUT=<dir> tools/gpu/train_speed.sh    (default OUT=gpu_train_speed)
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
out=${OUT:-gpu_train_speed}
mkdir -p "$out"
budget_from "${BUDGET_S:-525}"
weights=${TMPDIR:-/tmp}/lowtune-bench-weights

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
carried_wheels "$out/pip.log"
build_cuda "$out/build.log" 300 | tee "$out/build_info.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "nothing else can run"; exit 1; }

stages=" ${STAGES:-tests adapters train_1b train_7b elementwise} "
want() { [[ $stages == *" $1 "* ]]; }

want tests && stage tests 20 120 $py -m pytest -q -p no:cacheprovider -k "cuda or gpu" \
  tests/test_custom_ops.py tests/test_compile.py tests/test_streaming.py tests/test_adapters.py
want adapters && stage adapters 20 60 $py tools/bench_adapters.py --json "$out/adapters.json"

# Each bench_train run is its own process; runs are listed by priority and the ones that no
# longer fit are reported as skipped. The 1B runs get what is left but the elementwise stage's
# share, half of it when the 7B runs are wanted too; the 7B runs get the rest.
reserve=0; want elementwise && reserve=45
t1b=$(( $(left) - reserve - 12 )); want train_7b && t1b=$(( t1b / 2 ))
want train_1b && stage train_1b 20 $((t1b + 10)) $py tools/bench_train.py --model llama32-1b \
  --runs resident,qlora,resident-eager,streamed:3GiB,resident-graphs,streamed:2GiB --unique-layers 2 \
  --profile --weights-cache "$weights" --peaks "$out/peaks.json" --deadline "$t1b" --min-run 25 \
  --out "$out/train_1b"
t7b=$(( $(left) - reserve - 12 ))
want train_7b && stage train_7b 20 $((t7b + 10)) $py tools/bench_train.py --model llama2-7b \
  --runs resident,streamed:3GiB,resident-eager,qlora --unique-layers 2 \
  --profile --weights-cache "$weights" --peaks "$out/peaks.json" --deadline "$t7b" --min-run 40 \
  --out "$out/train_7b"
want elementwise && stage elementwise 20 $(( $(left) - 10 )) $py tools/bench_elementwise.py --json "$out/elementwise.json"

$py tools/gpu/train_speed_summary.py "$out" | tee "$out/summary.md"
# at most 8 files come back from the GPU machine: each run directory as one archive
for d in train_1b train_7b; do
  [ -d "$out/$d" ] && tar czf "$out/$d.tgz" -C "$out" "$d" && rm -rf "${out:?}/$d"
done
echo "total $((SECONDS - budget_start)) s"
