#!/usr/bin/env bash
# call 3: the landed policy (two rows a warp but at long one-row shapes): every CUDA test,
# compute-sanitizer on the gemv tests, the gemv timings per setting, M = 1 against the peers, decode
cd "$(dirname "$0")/.."
source tools/gpu/common.sh
OUT=$OUT/u3 begin_call u3 575 || { tar czf "$OUT/u3.tgz" -C "$OUT" u3; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > "$out/gpu.txt"
stage tests 60 200 $py -m pytest -q -p no:cacheprovider -m "cuda and not smollm2 and not llamacpp and not gemma3" -n 8 --dist loadfile tests -rf
stage tests_model 20 60 $py -m pytest -q -p no:cacheprovider tests/test_model.py -k cuda -rf
san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
PYTORCH_NO_CUDA_MEMORY_CACHING=1 stage sanitizer 40 100 "$san" --tool memcheck --error-exitcode 3 $py -m pytest -q -x -p no:cacheprovider tests/test_cuda.py -k "test_gemv_against and (Q4_K or Q8_0 or Q6_K or INT2 or Q3_K)"
stage gemv 40 90 $py tools/gpu/gemv.py --settings default,gemv_rows1,gemv_rows2 --out "$out/gemv.jsonl"
stage peers 40 120 $py tools/bench_kernels.py --device cuda --ms 1 --kernels forward --types Q4_K,Q4_0,Q4_1,INT4-g64 \
  --shapes 4096x4096,14336x4096,4096x14336 --peers tinygemm,cublas_bf16,bnb_nf4 --warmup-s 1 --out "$out/peers.jsonl"
for r in 0 1; do
  LOWTUNE_CUDA_GEMV_ROWS=$r stage decode_rows$r 40 60 $py tools/bench_kernels.py --device cuda --decode --warmup-s 1 --out "$out/decode_rows$r.jsonl"
done
cp .whl/u3.sh "$out/call.sh"; tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
