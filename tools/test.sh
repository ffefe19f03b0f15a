#!/usr/bin/env bash
# The test command: sets up everything on a fresh machine, then runs the test suite.
# Extra arguments go to pytest (e.g. tools/test.sh -k formats).
set -euo pipefail
cd "$(dirname "$0")/.."
# The CUDA kernels take long to compile on a small CPU: build them only where a GPU can run them
# (LOWTUNE_CUDA=ON forces them; they compile without a GPU).
if [ -z "${LOWTUNE_CUDA:-}" ] && ! nvidia-smi -L >/dev/null 2>&1; then export LOWTUNE_CUDA=OFF; fi
bash tools/setup_env.sh
# The package lives in python/lowtune, so the installed build (with its compiled module) is tested.
# Two workers (LOWTUNE_TEST_WORKERS) share the cores; each test file runs on one worker, so the
# models a file builds once are built once.
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider -n "${LOWTUNE_TEST_WORKERS:-2}" --dist loadfile \
  tests "$@"
