import os, sys, time, torch
sys.path.insert(0, "tools")
import lowtune
from bench_kernels import random_qtensor
x = torch.randn(1, 4096, device="cuda").to(torch.bfloat16)
w = random_qtensor("Q4_K", 4096, 4096)
for pdl in ("1", "0"):
    for path in ("gemv", "staged"):
        os.environ["LOWTUNE_CUDA_PATH"], os.environ["LOWTUNE_CUDA_PDL"] = path, pdl
        for _ in range(200):
            lowtune.qmatmul(x, w)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3000):
            lowtune.qmatmul(x, w)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        print(f"eager Q4_K 4096x4096 M=1 path={path} pdl={pdl}: host {(t1 - t0) / 3e3 * 1e6:.1f} us/call, "
              f"wall {(t2 - t0) / 3e3 * 1e6:.1f} us/call", flush=True)
