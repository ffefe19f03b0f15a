#!/usr/bin/env bash
# lowtune's CUDA kernels on one GPU (built for sm_90: H100/H200), checked and timed in one call:
#   build     in-place build with CUDA for sm_90 only (all cores)
#   test      the CUDA kernel tests (tests/test_cuda.py: staged, direct, chunked and reference paths
#             against float64 and each other; the policy; graph decoding; the adapters' CUDA cases)
#   bench     tools/bench_kernels.py --device cuda: small M (4-bit types, all five 7B/8B shapes, peers
#             cuBLAS bf16, dequantize+matmul, tinygemm, bitsandbytes where installed), every type at
#             M = 1 on the two MLP shapes, large M (chunked-path variants against cuBLAS bf16)
#   decode    CUDA-graph decoding of a random 7B-shaped Q4_K Llama against its roofline
#   sanitize  compute-sanitizer memcheck (and racecheck) on a subset of the kernel tests, if time is left
# and prints a short table last (the full one is $OUT/summary.md).
# Usage, from the repository root: OUT=dir tools/gpu/kernels.sh [build] [test] [bench] [decode] [sanitize]
# (default: all, in this order). Raw files under $OUT: build.log, test.log, bench_*.jsonl and .log,
# decode.jsonl, sanitize.log, racecheck.log, summary.md, nvidia_smi*.txt. Exit status: non-zero if a
# step failed. Budget: about 9 minutes in all (each step has its own time limit).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-gpu_kernels}
mkdir -p "$out"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build test bench decode sanitize)
export PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
t0=$SECONDS
failed=()

# gguf (imported by lowtune) from a carried wheel when the machine has none (pure Python: a zip
# on the path imports).
if ! "$py" -c "import gguf" 2>/dev/null; then
  for whl in .whl/gguf-*.whl; do [ -f "$whl" ] && export PYTHONPATH=$PYTHONPATH:$PWD/$whl; done
fi

run_step() {  # name, time limit (s), command...: logs to $out/<name>.log, records a failure
  local name=$1 limit=$2; shift 2
  local s=$SECONDS
  echo "== $name (limit ${limit}s, at $((SECONDS - t0))s): $*"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 8 "$out/$name.log"
  echo "== $name: exit $rc after $((SECONDS - s))s"
  [ $rc -eq 0 ] || failed+=("$name")
  return $rc
}
left() { echo $((540 - (SECONDS - t0))); }  # seconds left of a 9-minute budget

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw,temperature.gpu \
  --format=csv >"$out/nvidia_smi_start.txt" 2>&1 || true  # (clocks read, never set)
cat "$out/nvidia_smi_start.txt"

bench=(tools/bench_kernels.py --device cuda)
for step in "${steps[@]}"; do
  case $step in
    build)
      run_step build 360 env LOWTUNE_CUDA=ON LOWTUNE_CUDA_ARCHITECTURES=90 CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        tools/dev_build.sh || break
      "$py" -c "import lowtune; print(lowtune.build_info())" | tee -a "$out/build.log" ;;
    test)
      run_step test 150 "$py" -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_cuda_policy.py \
        tests/test_generate_static.py ;
      run_step test_adapters 60 "$py" -m pytest -q -p no:cacheprovider tests/test_adapters.py -m cuda ;;
    bench)
      rm -f "$out"/bench_*.jsonl
      run_step bench_small 120 "$py" "${bench[@]}" --types Q4_0,Q4_1,Q4_K,INT4-g64 --ms 1,16 \
        --out "$out/bench_small.jsonl"
      run_step bench_types 100 "$py" "${bench[@]}" --types all --ms 1 --shapes 14336x4096,4096x14336 \
        --peers "" --warmup-s 0.5 --out "$out/bench_types.jsonl"
      run_step bench_large 100 "$py" "${bench[@]}" --types Q4_K,Q4_0,Q8_0,INT4-g64 --ms 2048 \
        --peers cublas_bf16,deq_mm --warmup-s 0.5 --reps 3 --out "$out/bench_large.jsonl" ;;
    decode)
      rm -f "$out/decode.jsonl"
      run_step decode 90 "$py" "${bench[@]}" --decode --warmup-s 0.5 --out "$out/decode.jsonl" ;;
    sanitize)
      if [ "$(left)" -lt 60 ]; then echo "== sanitize: skipped ($(left)s left)"; continue; fi
      san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer \
        /usr/local/cuda*/compute-sanitizer/compute-sanitizer 2>/dev/null | head -n 1)
      if [ -z "$san" ]; then echo "== sanitize: no compute-sanitizer found"; failed+=(sanitize); continue; fi
      # Caching allocator off: every tensor is its own allocation, so an out-of-bounds access shows.
      # (Without the caching allocator nothing can be captured in a CUDA graph, so the graph tests
      # stay out of this run.)
      run_step sanitize $(( $(left) - 30 )) env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$san" --tool memcheck --error-exitcode 7 --print-limit 20 \
        "$py" -m pytest -q -x -p no:cacheprovider tests/test_cuda.py \
        -k "staged_kernels_every_type and (Q4_K or Q3_K or Q6_K or Q5_0 or INT3-g128 or Q8_0) or many_chunks"
      if [ "$(left)" -ge 40 ]; then
        run_step racecheck $(( $(left) - 20 )) "$san" --tool racecheck --error-exitcode 7 --print-limit 20 \
          "$py" -m pytest -q -x -p no:cacheprovider tests/test_cuda.py -k "staged_kernels_every_type and (Q4_K or Q3_K)"
      fi ;;
    *) echo "unknown step $step (build, test, bench, decode, sanitize)"; failed+=("$step") ;;
  esac
done

nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv \
  >"$out/nvidia_smi_end.txt" 2>&1 || true
results=("$out"/bench_*.jsonl "$out"/decode.jsonl)
"$py" tools/bench_kernels.py --summary "${results[@]}" >"$out/summary.md" 2>&1 || true
echo "== total $((SECONDS - t0))s; failed: ${failed[*]:-none}"
"$py" tools/bench_kernels.py --summary "${results[@]}" --brief 2>&1 | tail -c 11000
[ ${#failed[@]} -eq 0 ]
