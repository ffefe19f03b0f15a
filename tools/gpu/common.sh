# What the tools/gpu/*.sh scripts share. Source it from the repository root, after `cd`:
#   source tools/gpu/common.sh
# It sets py (PYTHON or python3), PYTHONPATH (the in-place build first) and PYTHONUNBUFFERED, and
# defines:
#   carried_wheels LOG      installs .whl/*.whl (gguf, bitsandbytes: the GPU machine has no network)
#                           where either is missing; pip's output in LOG
#   build_cuda LOG [LIMIT]  lowtune._C in place with the CUDA kernels, for sm_90 unless
#                           LOWTUNE_CUDA_ARCHITECTURES says otherwise (incremental on a warm machine)
#   budget_from SECONDS     starts the clock of a time budget: `left` then prints the seconds left
#   begin_call NAME SECONDS the start of a one-call script: out=${OUT:-NAME} created, the budget
#                           (BUDGET_S overrides SECONDS) started, the carried wheels installed and
#                           lowtune._C built (unless BUILD=0); returns non-zero if the build failed
#   stage NAME NEED LIMIT CMD...
#                           runs CMD with at most LIMIT seconds (and no more than are left), its
#                           output in $logs/NAME.log (logs defaults to $out), the tail shown; skipped
#                           when fewer than NEED seconds are left; returns CMD's exit status
#   cuda_tests [PREFIX...]  stage "tests": the CUDA test files (those matching TEST_K where set), run
#                           through PREFIX (e.g. env VAR=1)
#   sanitizer_tests K [PREFIX...]
#                           stage "sanitizer": compute-sanitizer memcheck over SAN_FILE (default
#                           tests/test_cuda.py) -k K
#   start_base_build SCRIPT JOBS
#                           an A/B script's base build: $out made absolute, a copy of this tree with the
#                           files under BASE_DIR laid over it in $base (their list in $out/base_files.txt),
#                           built in the background with JOBS parallel jobs (its pid in $base_build, to
#                           wait for); returns 1 after end_call SCRIPT when BASE_DIR is missing
#   m1_rows NAME ROOT KERNELS
#                           stage NAME: bench_kernels.py's M = 1 rows (graph replay) of KTYPES (KPATHS where set)
#                           at 4096x4096, 14336x4096 and 4096x14336, KERNELS (forward,input_grad), ROOT's build
#   decode_generate NAME ROOT
#                           stage NAME: the greedy 7B Q4_K decode (bench_kernels.py --decode, variant generate)
#                           with ROOT's build
#   ab_settings             the machine into $out/gpu.txt and the environments A, B (and C, D where set)
#                           of an A/B script into $out/settings.txt; sets names: "a b", "a b c", ...
#   setting NAME            the environment of setting a, b, c or d
#   end_call SCRIPT         SCRIPT kept as $out/call.sh, then $out packed into $out/NAME.tgz (NAME its
#                           last part) and every other file there removed: at most 8 files come back
#                           from a call, and the archive comes back whether OUT names a folder under
#                           the run's output folder or that folder itself
export PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

carried_wheels() {
  if ! $py -c "import gguf" 2>/dev/null || ! $py -c "import bitsandbytes" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
      $py -m pip install -q --no-index --no-deps .whl/*.whl >"$1" 2>&1 || echo "carried wheels did not install ($1)"
    fi
    $py -c "import bitsandbytes" 2>/dev/null || echo "NOTE: bitsandbytes is missing: QLoRA peer runs will fail"
  fi
}

build_cuda() {
  local t=$SECONDS
  env LOWTUNE_CUDA=ON LOWTUNE_CUDA_ARCHITECTURES="${LOWTUNE_CUDA_ARCHITECTURES:-90}" \
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    timeout "${2:-420}" tools/dev_build.sh >"$1" 2>&1 \
    || { tail -30 "$1"; echo "build failed"; return 1; }
  echo "== built in $((SECONDS - t)) s: $($py -c "import lowtune; print(lowtune.build_info())")"
}

budget_from() { budget=$1; budget_start=$SECONDS; }

begin_call() {
  out=${OUT:-$1}
  mkdir -p "$out"
  budget_from "${BUDGET_S:-$2}"
  carried_wheels "$out/wheels.log"
  if [ "${BUILD:-1}" = 1 ]; then build_cuda "$out/build.log" || return 1; fi
}
left() { echo $((budget - (SECONDS - budget_start))); }

stage() {
  local name=$1 need=$2 limit=$3; shift 3
  local dir=${logs:-$out}
  if [ "$(left)" -lt "$need" ]; then
    echo "== $name: skipped, $(left) s left of $budget (needs ~$need)"; echo skipped >"$dir/$name.log"; return 1
  fi
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  local t0=$SECONDS
  echo "== $name (limit $limit s)"
  timeout "$limit" "$@" >"$dir/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$dir/$name.log"
  echo "== $name: exit $rc after $((SECONDS - t0)) s, $(left) s left"
  return $rc
}

cuda_tests() {
  stage tests 40 "${TEST_LIMIT_S:-150}" "$@" $py -m pytest -q -p no:cacheprovider -n 8 -rf tests/test_cuda.py \
    tests/test_cuda_policy.py tests/test_glue_cuda.py ${TEST_K:+-k "$TEST_K"}
}

sanitizer_tests() {
  local k=$1; shift
  local san
  san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  stage sanitizer 30 90 "$@" "$san" --tool memcheck --error-exitcode 9 $py -m pytest -q -p no:cacheprovider -x \
    ${SAN_FILE:-tests/test_cuda.py} -k "$k"
}

start_base_build() {
  out=$(cd "$out" && pwd)  # absolute: the base builds from another folder
  if [ ! -d "${BASE_DIR:-}" ]; then echo "BASE_DIR (the base's files) is missing"; end_call "$1"; return 1; fi
  base=$(mktemp -d)
  tar cf - --exclude=./build --exclude=./.whl --exclude=./.carry . | tar xf - -C "$base"
  cp -r "$BASE_DIR"/. "$base"/
  rm -f "$base"/python/lowtune/_C*.so  # a failed base build must not time B's library as A
  (find "$BASE_DIR" -type f | sed "s|^$BASE_DIR/||") > "$out/base_files.txt"
  (cd "$base" && CMAKE_BUILD_PARALLEL_LEVEL=$2 build_cuda "$out/build_base.log") > "$out/build_base.out" 2>&1 &
  base_build=$!
}

m1_rows() {
  stage "$1" 30 90 env PYTHONPATH="$2/python" $py tools/bench_kernels.py --device cuda --types "$KTYPES" --ms 1 \
    --kernels "$3" --shapes 4096x4096,14336x4096,4096x14336 ${KPATHS:+--paths "$KPATHS"} --peers "" \
    --warmup-s 0.5 --reps 3 --out "$out/$1.jsonl"
}

decode_generate() {
  stage "$1" 40 90 env PYTHONPATH="$2/python" $py tools/bench_kernels.py --device cuda --decode --warmup-s 1 \
    --decode-variants generate --out "$out/$1.jsonl"
}

ab_settings() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt"
  echo "A: ${A:-}" > "$out/settings.txt"; echo "B: ${B:-}" >> "$out/settings.txt"
  names="a b"
  if [ -n "${C:-}" ]; then names="a b c"; echo "C: $C" >> "$out/settings.txt"; fi
  if [ -n "${D:-}" ]; then names="$names d"; echo "D: $D" >> "$out/settings.txt"; fi
}
setting() { case $1 in a) echo "${A:-}" ;; b) echo "${B:-}" ;; c) echo "${C:-}" ;; d) echo "${D:-}" ;; esac; }

end_call() {
  cp "$1" "$out/call.sh"
  local name tmp
  name=$(basename "$out") tmp=$(mktemp -d)
  tar czf "$tmp/$name.tgz" -C "$(dirname "$out")" "$name" && find "$out" -mindepth 1 -delete \
    && mv "$tmp/$name.tgz" "$out/"
  rmdir "$tmp" 2>/dev/null
}
