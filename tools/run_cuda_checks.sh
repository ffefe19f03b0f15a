#!/usr/bin/env bash
# Everything to check the CUDA kernels on a GPU machine, in one command:
#   build     in-place build with CUDA (LOWTUNE_CUDA_ARCHITECTURES, default 90 = H100/H200)
#   test      tests/test_cuda.py
#   sanitize  the same tests under compute-sanitizer memcheck (caching allocator off, so every
#             tensor is its own allocation and an out-of-bounds access is seen)
#   bench     the kernel benchmark (tools/bench_kernels.py --device cuda when present)
# Usage: tools/run_cuda_checks.sh [build] [test] [sanitize] [bench]   (default: all, in order)
# Logs and results go to $OUT (default ./cuda_checks). Exit status: non-zero if a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-cuda_checks}
mkdir -p "$out"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build test sanitize bench)
export LOWTUNE_CUDA_ARCHITECTURES=${LOWTUNE_CUDA_ARCHITECTURES:-90}
export PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
failed=()

run_step() {  # name, command...: runs, logs to $out/<name>.log, records failure
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*"
  "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 30 "$out/$name.log"
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || failed+=("$name")
  return $rc
}

for step in "${steps[@]}"; do
  case $step in
    build)
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
      CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) run_step build env LOWTUNE_CUDA=ON tools/dev_build.sh || break ;;
    test)
      run_step test "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_streaming.py tests/test_adapters.py -m cuda ;;
    sanitize)
      run_step sanitize env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        compute-sanitizer --tool memcheck --error-exitcode 7 --print-limit 20 \
        "$py" -m pytest -q -x -p no:cacheprovider tests/test_cuda.py ;;
    bench)
      if [ -f tools/bench_kernels.py ]; then
        run_step bench "$py" tools/bench_kernels.py --device cuda
      elif [ -f tools/bench_cuda_scratch.py ]; then  # a developer's local benchmark, if present
        run_step bench "$py" tools/bench_cuda_scratch.py --json "$out/bench.json"
      else
        echo "== bench: no benchmark script (tools/bench_kernels.py) yet; skipped"
      fi ;;
    *) echo "unknown step $step (build, test, sanitize, bench)"; failed+=("$step") ;;
  esac
done

[ ${#failed[@]} -eq 0 ] && { echo "all steps passed"; exit 0; }
echo "failed: ${failed[*]}"
exit 1
