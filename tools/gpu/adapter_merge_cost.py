"""What a LoRA-type adapter would cost inside the chunked frozen product, measured before it is built.

The adapted layer's step is the bare layer's (W dequantized chunk by chunk into bf16 scratch, each
chunk multiplied by cuBLAS) plus the adapter's separate products. A rank-r adapter whose update is
s·B·A (LoRA, QA-LoRA, Q-BaRA, QDyLoRA, with A and B expanded over pool and repeat) could instead be
added to each scratch chunk while it is still in L2, so that y and dx come out of the frozen GEMMs
and their extra passes go; u = x·Aᵀ and g = dy·B could ride along as r more rows of the frozen
GEMMs' W. This times, by CUDA-graph replay of many calls, the pieces of both
routes at one layer's shape:

    python3 tools/gpu/adapter_merge_cost.py [--m 2048 --k 4096 --n 4096 --r 64 --chunk 1024 --type Q4_K] [--json F]

Rows: the passes the adapter costs now (y += s·u·Bᵀ and dx += s·g·A, reading and writing [M, N] /
[M, K] from memory; the four skinny products) and those of the merged route (the chunk update with
the chunk in L2 and, for comparison, from memory; the frozen GEMMs with r more rows), and, where lowtune
has CUDA, the update inside the dequantization kernel (lowtune.ops.qmatmul_lowrank and its input gradient)
and after each chunk's GEMM (the epilogue kind) against the frozen products alone; then the skinny
products in two layouts each, their large operand rotated past 2x L2 (layout_rows), and last g and dB from one
read of dy by lowtune's kernel against cuBLAS's two calls (dual_rows) and the rank-r updates of y and dx by
lowtune's kernel (rank_rows).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_kernels import GraphTimer, copies_for  # noqa: E402


@contextlib.contextmanager
def restored_env(name: str):
    """The environment variable `name` (read by the kernels on every call) put back as it was, or unset, when the
    block ends."""
    saved = os.environ.get(name)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def fused_rows(a, timer, x, dy, A, B, row, rest_us: float, summary) -> None:
    """The chunk update inside the dequantization kernel (lowtune.ops.qmatmul_lowrank and
    qmatmul_input_grad_lowrank) against the frozen products alone, on a random weight of --type (copies
    rotated past 2x L2), where lowtune was built with CUDA; the route's sum: the fused products' extra
    time and rest_us (u = x·Aᵀ, dB and dA), against 15% of the frozen products."""
    import lowtune
    from lowtune import ops
    if not lowtune.build_info().get("cuda"):
        print("lowtune was built without CUDA: no fused rows")
        return
    from bench_kernels import random_qtensor
    w = random_qtensor(a.type, a.n, a.k)
    qts = [w] + [random_qtensor(a.type, a.n, a.k) for _ in range(copies_for(w.nbytes) - 1)]
    nq, at = len(qts), A.t().contiguous()
    fwd = row(f"{a.type} forward x·deq(W)^T", timer(lambda i: ops.qmatmul(x, qts[i % nq])))
    fwd_u = row(f"{a.type} forward x·(deq(W) + s B A)^T, fused",
                timer(lambda i: ops.qmatmul_lowrank(x, qts[i % nq], B, at, 0.5)))
    bwd = row(f"{a.type} input grad dy·deq(W)", timer(lambda i: ops.qmatmul_input_grad(dy, qts[i % nq])))
    bwd_u = row(f"{a.type} input grad dy·(deq(W) + s B A), fused",
                timer(lambda i: ops.qmatmul_input_grad_lowrank(dy, qts[i % nq], B, at, 0.5)))
    # the update's kernel nearly alone: at M = 16 each chunk's GEMM is small (the plain dequantization for scale)
    row(f"{a.type} dequantize W to bf16 (one kernel)", timer(lambda i: ops.dequantize(qts[i % nq], torch.bfloat16)))
    row(f"{a.type} forward at M = 16, fused", timer(lambda i: ops.qmatmul_lowrank(x[:16], qts[i % nq], B, at, 0.5)))
    bare, extra = fwd + bwd, fwd_u + bwd_u - fwd - bwd
    summary.update({"bare_layer_us": bare, "fused_update_extra_us": extra, "fused_route_us": extra + rest_us,
                    "budget_15pct_of_bare_us": 0.15 * bare})
    # the update multiplied into each chunk's output (the epilogue merge kind), after the chunk's GEMM or before
    # it (LOWTUNE_CUDA_UPDATE_FIRST, read on every call): u or du [M, r] against B or Aᵀ
    left = (x @ A.t()).contiguous()
    with restored_env("LOWTUNE_CUDA_UPDATE_FIRST"):
        for first, where in (("0", "after"), ("1", "before")):
            os.environ["LOWTUNE_CUDA_UPDATE_FIRST"] = first
            fwd_e = row(f"{a.type} forward x·deq(W)^T + s u B^T, update {where} each chunk's GEMM",
                        timer(lambda i: ops._forward_epilogue_kernel(x, qts[i % nq].raw, qts[i % nq].format.type_id,
                                                                     a.n, a.k, left, B, 0.5)))
            bwd_e = row(f"{a.type} input grad dy·deq(W) + du A, update {where} each chunk's GEMM",
                        timer(lambda i: ops._input_grad_epilogue_kernel(dy, qts[i % nq].raw, qts[i % nq].format.type_id,
                                                                        a.n, a.k, left, at, 1.0)))
            summary[f"epilogue_{where}_extra_us"] = fwd_e + bwd_e - fwd - bwd


def dual_rows(timer, dy, B, u, row) -> None:
    """g = s·dy·B and dB = s·dyᵀ·u from one read of dy (lowtune's kernel, LOWTUNE_CUDA_DUAL_PRODUCTS), dy in L2
    and rotated past 2x L2, against cuBLAS's two calls as adapter_ops makes them (the kernel's zeroed fp32
    outputs included), where lowtune has CUDA."""
    import lowtune
    from lowtune import adapter_ops
    if not lowtune.build_info().get("cuda"):
        return
    dys = [dy] + [torch.randn_like(dy) for _ in range(copies_for(dy.numel() * 2) - 1)]
    nd = len(dys)
    with restored_env("LOWTUNE_CUDA_DUAL_STAGES"):
        for stages in ("1", "2"):  # tile buffers: copy then products, or the next tile's copies in flight
            os.environ["LOWTUNE_CUDA_DUAL_STAGES"] = stages
            row(f"g and dB from one read of dy (lowtune's kernel, {stages} stages)",
                timer(lambda i: adapter_ops._dual_products(dy, B, u, 0.5)))
            row(f"rotated: g and dB from one read of dy (lowtune's kernel, {stages} stages)",
                timer(lambda i: adapter_ops._dual_products(dys[i % nd], B, u, 0.5)))
    row("rotated: g = s dy B, then dB = s dy^T u (cuBLAS)",
        timer(lambda i: (adapter_ops._mm_scaled(dys[i % nd], B, 0.5), adapter_ops._mm_f32(dys[i % nd].t(), u, 0.5))))


def rank_rows(timer, ys, u, B, dxs, gg, A, row) -> None:
    """y += s·u·Bᵀ and dx += s·g·A by lowtune's kernel in one pass over y or dx (LOWTUNE_CUDA_RANK_UPDATE), y and
    dx rotated past 2x L2 as in the rows of the passes now (cuBLAS's addmm), where lowtune has CUDA."""
    import lowtune
    from lowtune import adapter_ops
    if not lowtune.build_info().get("cuda"):
        return
    setting, adapter_ops._RANK_UPDATE = adapter_ops._RANK_UPDATE, True
    try:
        row("y += s u B^T (y from memory, lowtune's kernel)",
            timer(lambda i: adapter_ops._rank_update(ys[i % len(ys)], u, B, False, 0.5)))
        row("dx += s g A (dx from memory, lowtune's kernel)",
            timer(lambda i: adapter_ops._rank_update(dxs[i % len(dxs)], gg, A, True, 0.5)))
    finally:
        adapter_ops._RANK_UPDATE = setting


def layout_rows(timer, rnd, m: int, k: int, n: int, r: int, pool: int, row) -> None:
    """The skinny products of the adapter's step (u, g, dB, dA, and QA-HiRA's dA = s·dyᵀ·xs with xs the
    pooled x) with their large operand (x or dy, [M, 4096] bf16) rotated past 2x L2, each as adapter_ops
    asks cuBLAS for it and as the transposed product (cuBLAS picks its kernels by layout and shape, so
    one of the two may read the large operand fewer times)."""
    f32 = torch.float32
    xs_ = [rnd(m, k) for _ in range(copies_for(m * k * 2))]
    dys = [rnd(m, n) for _ in range(copies_for(m * n * 2))]
    nx, nd = len(xs_), len(dys)
    A, B, u, gg, xp = rnd(r, k), rnd(n, r), rnd(m, r), rnd(m, r), rnd(m, k // pool)
    c_db, c_da = torch.empty(n, r, device="cuda", dtype=f32), torch.empty(n, k // pool, device="cuda", dtype=f32)
    row("rotated: u = x A^T", timer(lambda i: torch.matmul(xs_[i % nx], A.t())))
    row("rotated: u as (A x^T)^T", timer(lambda i: torch.mm(A, xs_[i % nx].t()).t()))
    row("rotated: g = dy B", timer(lambda i: torch.matmul(dys[i % nd], B)))
    row("rotated: g as (B^T dy^T)^T", timer(lambda i: torch.mm(B.t(), dys[i % nd].t()).t()))
    row("rotated: dB = s dy^T u (fp32, addmm alpha)",
        timer(lambda i: torch.addmm(c_db, dys[i % nd].t(), u, out_dtype=f32, beta=0, alpha=0.5)))
    row("rotated: dB as (s u^T dy)^T (fp32)", timer(lambda i: torch.mm(u.t(), dys[i % nd], out_dtype=f32).t()))
    row("rotated: dA = g^T x (fp32)", timer(lambda i: torch.mm(gg.t(), xs_[i % nx], out_dtype=f32)))
    row("rotated: dA as (x^T g)^T (fp32)", timer(lambda i: torch.mm(xs_[i % nx].t(), gg, out_dtype=f32).t()))
    row(f"rotated: QA-HiRA dA = s dy^T xs, xs [M, K/{pool}] (fp32, addmm alpha)",
        timer(lambda i: torch.addmm(c_da, dys[i % nd].t(), xp, out_dtype=f32, beta=0, alpha=0.5)))
    row("rotated: QA-HiRA dA as (xs^T dy)^T (fp32)", timer(lambda i: torch.mm(xp.t(), dys[i % nd], out_dtype=f32).t()))
    row("rotated: QA-HiRA dA in bf16, then cast", timer(lambda i: torch.mm(dys[i % nd].t(), xp).float()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=1024, help="rows of W per scratch chunk")
    ap.add_argument("--type", default="Q4_K", help="the frozen weight's type for the fused rows")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    m, k, n, r, c = a.m, a.k, a.n, a.r, a.chunk
    dev, bf = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device=dev, dtype=bf, generator=g) * 0.02

    for _ in range(20):  # clocks up
        torch.matmul(rnd(8192, 8192), rnd(8192, 8192))
    timer = GraphTimer(target_ms=4.0, reps=7)
    x, dy, A, B, u, gg = rnd(m, k), rnd(m, n), rnd(r, k), rnd(n, r), rnd(m, r), rnd(m, r)
    rows = []

    def row(name, us):  # recorded, printed, and returned for the sums below
        rows.append({"name": name, "us": us})
        print(f"{name:<44} {us:8.2f} us", flush=True)
        return us

    # the adapter's passes now
    ys = [rnd(m, n) for _ in range(copies_for(m * n * 2))]
    y_add = row("y += s u B^T (y from memory)", timer(lambda i: ys[i % len(ys)].addmm_(u, B.t(), alpha=0.5)))
    row("y += s u B^T (y in L2)", timer(lambda i: ys[0].addmm_(u, B.t(), alpha=0.5)))
    dxs = [rnd(m, k) for _ in range(copies_for(m * k * 2))]
    dx_add = row("dx += s g A (dx from memory)", timer(lambda i: dxs[i % len(dxs)].addmm_(gg, A, alpha=0.5)))
    u_mm = row("u = x A^T", timer(lambda i: torch.matmul(x, A.t())))
    g_mm = row("g = dy B", timer(lambda i: torch.matmul(dy, B)))
    db_mm = row("dB = s dy^T u (fp32 out)", timer(lambda i: torch.mm(dy.t(), u, out_dtype=torch.float32)))
    da_mm = row("dA = s g^T x (fp32 out)", timer(lambda i: torch.mm(gg.t(), x, out_dtype=torch.float32)))

    # the merged route: each chunk of scratch += s B_c A while in L2 (four chunks rotated: a layer's
    # W), and from memory for comparison
    chunks = n // c
    hot = [rnd(c, k) for _ in range(chunks)]
    bc = [B[i * c:(i + 1) * c] for i in range(chunks)]
    per = row(f"chunk += s B_c A, {chunks} chunks in L2 (per chunk)",
              timer(lambda i: hot[i % chunks].addmm_(bc[i % chunks], A, alpha=0.5)))
    cold = [rnd(c, k) for _ in range(copies_for(c * k * 2))]
    row("chunk += s B_c A, chunk from memory", timer(lambda i: cold[i % len(cold)].addmm_(bc[0], A, alpha=0.5)))

    # the frozen GEMMs as the chunked path runs them (one chunk of W rows at a time, in L2), and with
    # r more rows of W (u or g as extra output columns)
    wc = [rnd(c, k) for _ in range(chunks)]
    wce = [rnd(c + r, k) for _ in range(chunks)]
    fwd = row("forward chunk: x W_c^T", timer(lambda i: torch.matmul(x, wc[i % chunks].t())))
    fwd_r = row("forward chunk + r rows: x [W_c; A]^T", timer(lambda i: torch.matmul(x, wce[i % chunks].t())))
    dyc = [dy[:, i * c:(i + 1) * c] for i in range(chunks)]
    wcb = [rnd(c, k + r) for _ in range(chunks)]
    dxo = torch.empty(m, k, device=dev, dtype=bf)
    dxe = torch.empty(m, k + r, device=dev, dtype=bf)
    bwd = row("input-grad chunk: dx += dy_c W_c", timer(lambda i: dxo.addmm_(dyc[i % chunks], wc[i % chunks])))
    bwd_r = row("input-grad chunk + r cols: [dx|g] += dy_c [W_c|B_c]",
                timer(lambda i: dxe.addmm_(dyc[i % chunks], wcb[i % chunks])))
    now = y_add + dx_add + u_mm + g_mm + db_mm + da_mm
    merged = 2 * chunks * per + chunks * (fwd_r - fwd) + chunks * (bwd_r - bwd) + db_mm + da_mm
    frozen = chunks * (fwd + bwd)
    summary = {"adapter_now_us": now, "adapter_merged_us": merged, "frozen_gemms_us": frozen,
               "budget_15pct_of_frozen_gemms_us": 0.15 * frozen}
    fused_rows(a, timer, x, dy, A, B, row, u_mm + db_mm + da_mm, summary)
    print(json.dumps(summary, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "args": vars(a), "rows": rows, "summary": summary}, f,
                      indent=1)
    layout_rows(timer, rnd, m, k, n, r, 32, row)  # printed only: not part of the summary
    dual_rows(timer, dy, B, u, row)  # printed only, last: a new kernel's fault loses no row above
    rank_rows(timer, ys, u, B, dxs, gg, A, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
