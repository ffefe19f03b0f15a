#!/usr/bin/env bash
# One GPU call for the families' CUDA paths: every CUDA test (marked, or a cuda case of devices()) of
# the family, MoE, block-type and decode files (random models from GGUF-named weights: no converter or
# downloads needed), then test_compile and the rest of the suite's CUDA tests as time allows.
# Usage, from the repository root: OUT=dir bash tools/gpu/families_cuda.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
begin_call families_cuda 575 || { tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader > "$out/gpu.txt"
sel="not llamacpp and not smollm2"  # with -k cuda: the cuda-marked tests and the cuda cases of devices()
family_files="tests/test_families.py tests/test_families_train_export.py tests/test_moe.py tests/test_mxfp4.py
  tests/test_nvfp4.py tests/test_iquants.py tests/test_iquant_bases.py tests/test_lowbit.py tests/test_generate_static.py"
stage families 60 260 $py -m pytest -q -p no:cacheprovider -n 8 -rf --durations=15 -m "$sel" -k cuda $family_files
stage compile 40 120 $py -m pytest -q -p no:cacheprovider -n 8 -rf -m "not llamacpp and not smollm2 and not transformers" \
  tests/test_compile.py
stage rest 40 200 $py -m pytest -q -p no:cacheprovider -n 8 -rf -m "$sel" -k cuda tests \
  $(for f in $family_files tests/test_compile.py; do echo --ignore "$f"; done)
cp tools/gpu/families_cuda.sh "$out/call.sh"
# at most 8 files come back: everything in one archive beside the folder, which goes
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
