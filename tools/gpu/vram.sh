#!/usr/bin/env bash
# GPU budgets in the driver's terms, on one H100/H200 (issue: a budget the driver keeps, and a 70B
# fine-tune in 6 GiB). Stages, in order (STAGES picks some; each prints its elapsed time):
#   build      lowtune with the CUDA kernels in place (LOWTUNE_CUDA=ON, sm_90), ~3 min fresh
#   tests      the CUDA tests of the budget, the extension's scratch and workspaces, the disk ring,
#              host AdamW, streaming and compiled/captured layers
#   train_7b   tools/bench_train.py, Llama-2-7B shapes: resident (compiled + CUDA graphs, the
#              reference), --max-vram 3GiB, 2GiB, 1536MiB (a refusal gives its minimum), 10 steps
#   train_70b  Llama-2-70B shapes: --max-vram 8GiB (the reference) and 6GiB, eager layers, 10 steps
#   disk       Llama-2-7B shapes from a GGUF on disk: --max-vram 3GiB --host-ram 2GiB, 10 steps
#   llama3     Llama-3-70B shapes (vocab 128256): --max-vram 8GiB and 6GiB (not in the default set)
#   graph_exec tools/gpu/graph_exec_memory.py: the driver's memory per instantiated CUDA graph
#   context    tools/gpu/context_memory.py at the driver's stack limit and at 0: what the CUDA
#              context holds, stage by stage (not in the default set)
#   summary    tools/gpu/vram_summary.py: every budgeted run against the targets
# PROFILE=1 profiles one step of every bench_train run (GPU busy time, and per CUDA stream its
# busy time and copy bandwidth: whether a streamed step waits on PCIe or on compute).
# Everything shares a time budget (BUDGET_S, default 530 s): a stage that no longer fits is skipped
# and says so. Fresh machine, everything: two calls,
#   STAGES="build tests train_7b summary" OUT=... tools/gpu/vram.sh       (~8 min)
#   STAGES="build train_70b disk summary" OUT=... tools/gpu/vram.sh       (~7 min; build is incremental
#                                                                          on a warm machine)
# Results: $OUT/<stage>.json (bench_train's raw results), $OUT/summary.md, $OUT/gpu.txt, and
# every log in $OUT/logs.tgz.
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
out=${OUT:-gpu_vram}
logs=$out/logs
mkdir -p "$logs"
budget_from "${BUDGET_S:-530}"
tmp=${TMPDIR:-/tmp}
weights=$tmp/lowtune-bench-weights
stages=" ${STAGES:-build tests train_7b train_70b disk summary} "
want() { [[ $stages == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader | tee "$out/gpu.txt"
free -g | head -2 | tee -a "$out/gpu.txt"
df -h "$tmp" | tail -1 | tee -a "$out/gpu.txt"
carried_wheels "$logs/pip.log"

if want build; then
  build_cuda "$logs/build.log" 330 | tee -a "$out/gpu.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "nothing else can run"; tar czf "$out/logs.tgz" -C "$out" logs; exit 1; }
fi

if want tests; then
  stage tests 60 180 $py -m pytest -q -p no:cacheprovider -m "cuda and not smollm2 and not llamacpp and not gemma3" \
    tests/test_memory_budget.py tests/test_disk_ring.py tests/test_host_adamw.py tests/test_streaming.py \
    tests/test_compile.py
fi

bench() {  # stage name, seconds it needs at least, bench_train arguments...
  local name=$1 need=$2; shift 2
  local limit=$(( $(left) - 5 ))
  stage "$name" "$need" "$limit" $py tools/bench_train.py --steps 10 --unique-layers 2 --weights-cache "$weights" \
    ${PROFILE:+--profile} \
    --peaks "$out/peaks.json" --deadline $(( limit - 10 )) --min-run 30 --out "$tmp/vram-$name" "$@"
  [ -f "$tmp/vram-$name/results.json" ] && cp "$tmp/vram-$name/results.json" "$out/$name.json"
  [ -f "$tmp/vram-$name/table.md" ] && cp "$tmp/vram-$name/table.md" "$out/logs/$name.table.md"
}

if want graph_exec; then
  stage graph_exec 20 60 $py tools/gpu/graph_exec_memory.py && cp "$out/logs/graph_exec.log" "$out/graph_exec.json"
fi
if want context; then
  for s in keep 0; do
    stage "context_$s" 40 90 $py tools/gpu/context_memory.py --stack $s --out "$out/context_stack_$s.json"
  done
fi
want train_7b && bench train_7b 120 --model llama2-7b --reference resident \
  --runs resident,streamed:2GiB,streamed:3GiB,streamed:1536MiB
want train_70b && bench train_70b 150 --model llama2-70b --compile off --cuda-graphs off \
  --reference streamed:8GiB --runs streamed:8GiB,streamed:6GiB
want disk && bench disk 90 --model llama2-7b --gguf-dir "$tmp" --runs streamed:3GiB:2GiB
want llama3 && bench llama3 150 --model llama3-70b --compile off --cuda-graphs off \
  --reference streamed:8GiB --runs streamed:8GiB,streamed:6GiB

if want summary; then
  $py tools/gpu/vram_summary.py "$out" | tee "$out/summary.md"
fi
tar czf "$out/logs.tgz" -C "$out" logs && rm -rf "$out/logs"
echo "== total $((SECONDS - budget_start)) s"
