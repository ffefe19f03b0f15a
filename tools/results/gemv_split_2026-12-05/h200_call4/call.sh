# run on the warm H200 right after tools/gpu/families_cuda.sh had built main with the split (no rebuild)
export PYTHONPATH=python; mkdir -p $OUT/h200
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/h200/gpu.txt
timeout 100 python3 tools/gpu/gemv.py --settings default,gemv_split1,gemv_split2 --out $OUT/h200/gemv.jsonl > $OUT/h200/gemv.log 2>&1
timeout 40 python3 tools/bench_kernels.py --device cuda --decode --warmup-s 1 --out $OUT/h200/decode_default.jsonl > $OUT/h200/decode_default.log 2>&1
LOWTUNE_CUDA_GEMV_SPLIT=1 timeout 40 python3 tools/bench_kernels.py --device cuda --decode --warmup-s 1 --out $OUT/h200/decode_split1.jsonl > $OUT/h200/decode_split1.log 2>&1
