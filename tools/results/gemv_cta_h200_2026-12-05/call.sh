#!/usr/bin/env bash
# One GPU call for the two-row gemv's CTA shapes (LOWTUNE_CUDA_GEMV_CTA, gemv.cuh's RowsCta):
# kSmall (the default: 8-warp CTAs, each copying prepare_kernel's form of x), kBig (one CTA a
# multiprocessor, x's form copied once there) and kBigFused (kBig CTAs preparing x themselves, no
# prepare_kernel). The gemv and fused-prologue tests under both new shapes; the fixed cost (small
# N); every type's timings (the big shapes force two rows a warp); decode and its kernel profile.
# Usage, from the repository root: OUT=dir bash tools/gpu/gemv_cta.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
begin_call gemv_cta 560 || { tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")"; exit 1; }
for c in 1 2; do
  LOWTUNE_CUDA_GEMV_CTA=$c stage tests_cta$c 30 90 $py -m pytest -q -p no:cacheprovider -n 8 -rf \
    tests/test_cuda.py tests/test_glue_cuda.py -k "gemv or inside_the_product"
done
stage fixed 20 60 $py tools/gpu/gemv.py --types Q4_K,Q4_0,Q2_K --shapes 256x4096,2048x4096,256x14336,2048x14336 \
  --settings default,cta_big,cta_fused --out "$out/fixed.jsonl"
stage gemv 40 150 $py tools/gpu/gemv.py --settings default,cta_big,cta_fused --out "$out/gemv.jsonl"
for c in 0 1 2; do
  LOWTUNE_CUDA_GEMV_CTA=$c stage decode_cta$c 40 60 $py tools/bench_kernels.py --device cuda --decode --warmup-s 1 \
    --out "$out/decode_cta$c.jsonl"
done
for c in 0 2; do
  LOWTUNE_CUDA_GEMV_CTA=$c stage profile_cta$c 40 60 $py tools/gpu/profile_decode.py --prompt 16 --steps 16 \
    --out "$out/profile_cta$c.json"
done
# at most 8 files come back: everything in one archive beside the folder, which goes
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
