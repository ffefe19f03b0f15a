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
out=${OUT:-gpu_train_speed}
mkdir -p "$out"
budget=${BUDGET_S:-525}
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }
export PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export LOWTUNE_CUDA_ARCHITECTURES=${LOWTUNE_CUDA_ARCHITECTURES:-90}
py=${PYTHON:-python3}
weights=${TMPDIR:-/tmp}/lowtune-bench-weights

stage() {  # name, timeout seconds, command...: runs with output in $out/<name>.log, tail shown
  local name=$1 limit=$2; shift 2
  if [ "$limit" -lt 20 ]; then echo "== $name: skipped ($(left) s left)"; echo skipped >"$out/$name.log"; return 1; fi
  local t0=$SECONDS
  echo "== $name (limit $limit s): $*"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.log"
  echo "== $name: exit $rc after $((SECONDS - t0)) s, $(left) s left"
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
if ! $py -c "import bitsandbytes" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    $py -m pip install --no-index .whl/*.whl >"$out/pip.log" 2>&1 || echo "bitsandbytes wheel did not install (see pip.log)"
  fi
  $py -c "import bitsandbytes" 2>/dev/null || echo "NOTE: bitsandbytes is missing: the QLoRA peer runs will fail; the rest runs"
fi

export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
stage build 300 env LOWTUNE_CUDA=ON tools/dev_build.sh \
  || { echo "build failed: nothing else can run"; exit 1; }
$py -c "import lowtune; print(lowtune.build_info())" | tee "$out/build_info.txt"

stages=" ${STAGES:-tests adapters train_1b train_7b elementwise} "
want() { [[ $stages == *" $1 "* ]]; }

want tests && stage tests 120 $py -m pytest -q -p no:cacheprovider -k "cuda or gpu" \
  tests/test_custom_ops.py tests/test_compile.py tests/test_streaming.py tests/test_adapters.py
want adapters && stage adapters 60 $py tools/bench_adapters.py --json "$out/adapters.json"

# Each bench_train run is its own process; runs are listed by priority and the ones that no
# longer fit are reported as skipped. The 1B runs get what is left but the elementwise stage's
# share, half of it when the 7B runs are wanted too; the 7B runs get the rest.
reserve=0; want elementwise && reserve=45
t1b=$(( $(left) - reserve - 12 )); want train_7b && t1b=$(( t1b / 2 ))
want train_1b && stage train_1b $((t1b + 10)) $py tools/bench_train.py --model llama32-1b \
  --runs resident,qlora,resident-eager,streamed:3GiB,resident-graphs,streamed:2GiB --unique-layers 2 \
  --profile --weights-cache "$weights" --peaks "$out/peaks.json" --deadline "$t1b" --min-run 25 \
  --out "$out/train_1b"
t7b=$(( $(left) - reserve - 12 ))
want train_7b && stage train_7b $((t7b + 10)) $py tools/bench_train.py --model llama2-7b \
  --runs resident,streamed:3GiB,resident-eager,qlora --unique-layers 2 \
  --profile --weights-cache "$weights" --peaks "$out/peaks.json" --deadline "$t7b" --min-run 40 \
  --out "$out/train_7b"
want elementwise && stage elementwise $(( $(left) - 10 )) $py tools/bench_elementwise.py --json "$out/elementwise.json"

$py tools/gpu/train_speed_summary.py "$out" | tee "$out/summary.md"
echo "total $((SECONDS - start)) s"
