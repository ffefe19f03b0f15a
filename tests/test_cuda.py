"""CUDA kernels against their twins: the CPU kernels (dequantize, bit for bit), the reference
CUDA kernels, and a float64 matmul of the exactly dequantized weight.

Weights are random block bytes (every code, every scale byte) with random finite fp16
scales and mins written over the fp16 fields, so no quantizer is involved. Every run draws
fresh inputs. Outputs are poisoned with NaN before each launch, so an element the kernel
never wrote fails the test. Shapes cover M = 1, the small-M kernels (staged for M <= 16,
direct up to 32; split and unsplit reductions), the chunked cuBLAS path (M > 32, many chunks,
with and without the side stream), CUDA-graph capture, and tails in M, N, K.
Runtime on an H100: about 15 s (skipped where no GPU is present).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lowtune
from lowtune import _C
from lowtune.formats import FORMATS, get_format

import helpers
from helpers import norm_rel_err as rel_err

pytestmark = pytest.mark.cuda

QUANT_TYPES = sorted(f.name for f in FORMATS.values() if f.quantized)
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
# ‖out − ref‖ / ‖ref‖ allowed, by activation dtype: fp32 accumulation of exact products for
# fp32; for 16-bit activations the weight is rounded to that dtype (as cuBLAS on a dequantized
# copy would) and so is the output.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

def random_blocks(name: str, n: int, k: int, gen: np.random.Generator) -> torch.Tensor:
    """uint8 [n, row_bytes(k)] of random `name` blocks (helpers.random_blocks)."""
    return torch.from_numpy(helpers.random_blocks(get_format(name), n, k, gen, scale=0.01))


def dequant_cpu(raw: torch.Tensor, name: str, n: int, k: int) -> torch.Tensor:
    out = torch.empty((n, k), dtype=torch.float32)
    _C.dequantize(get_format(name).type_id, raw.data_ptr(), out.data_ptr(), 0, n, k)
    return out


def nan_like(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


@pytest.fixture
def gen() -> np.random.Generator:
    return np.random.default_rng()  # fresh inputs every run


@pytest.mark.parametrize("name", QUANT_TYPES)
def test_dequantize_bit_exact(name, gen):
    fmt = get_format(name)
    n, k = 19, fmt.block_elems * (3 if fmt.block_elems < 256 else 2)
    raw = random_blocks(name, n, k, gen)
    want = dequant_cpu(raw, name, n, k)
    raw_gpu = raw.cuda()
    for dtype, code in DTYPES.items():
        cpu = torch.empty((n, k), dtype=dtype)
        _C.dequantize(fmt.type_id, raw.data_ptr(), cpu.data_ptr(), code, n, k)
        for fn in (_C.cuda_dequantize, _C.cuda_ref_dequantize):
            out = nan_like((n, k), dtype)
            fn(fmt.type_id, raw_gpu.data_ptr(), out.data_ptr(), code, n, k, stream())
            torch.cuda.synchronize()
            assert torch.equal(out.cpu().view(INT_VIEW[dtype]), cpu.view(INT_VIEW[dtype])), (fn.__name__, dtype)
    assert torch.isfinite(want).all()


# (M, N, K in blocks of 32 elements; K is rounded up to whole blocks of the type).
SHAPES = [(1, 37, 3), (5, 130, 32), (16, 130, 33), (16, 300, 8), (24, 72, 40), (32, 129, 9),
          (33, 72, 16), (65, 257, 16), (300, 40, 24)]


def k_for(name: str, k32: int) -> int:
    e = get_format(name).block_elems
    return -(-k32 * 32 // e) * e


def check_matmul(name, dtype, gen, direction, shapes=SHAPES, ref_kernel=False):
    fmt = get_format(name)
    for m, n, k32 in shapes:
        k = k_for(name, k32)
        raw = random_blocks(name, n, k, gen)
        w64 = dequant_cpu(raw, name, n, k).double()
        raw_gpu = raw.cuda()
        if direction == "forward":
            a = torch.randn(m, k).to(dtype)
            ref = a.double() @ w64.t()
            fns = [_C.cuda_qmatmul_forward] + ([_C.cuda_ref_qmatmul_forward] if ref_kernel else [])
            out_shape = (m, n)
        else:
            a = torch.randn(m, n).to(dtype)
            ref = a.double() @ w64
            fns = [_C.cuda_qmatmul_input_grad] + ([_C.cuda_ref_qmatmul_input_grad] if ref_kernel else [])
            out_shape = (m, k)
        a_gpu = a.cuda()
        for fn in fns:
            out = nan_like(out_shape, dtype)
            fn(fmt.type_id, a_gpu.data_ptr(), DTYPES[dtype], raw_gpu.data_ptr(), out.data_ptr(), m, n, k, stream())
            torch.cuda.synchronize()
            assert torch.isfinite(out).all(), f"{fn.__name__} left unwritten/NaN outputs at M={m} N={n} K={k}"
            err = rel_err(out, ref)
            assert err < TOLERANCE[dtype], f"{fn.__name__} M={m} N={n} K={k}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("name", QUANT_TYPES)
def test_forward(name, dtype, gen):
    check_matmul(name, dtype, gen, "forward")


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("name", QUANT_TYPES)
def test_input_grad(name, dtype, gen):
    check_matmul(name, dtype, gen, "input_grad")


@pytest.mark.parametrize("direction", ["forward", "input_grad"])
@pytest.mark.parametrize("name", ["Q4_0", "Q5_1", "Q3_K", "Q6_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ2_S", "IQ1_M",
                                  "MXFP4", "NVFP4", "TQ1_0", "TQ2_0", "Q1_0", "Q2_0", "INT3-g128", "INT6-g32"])
def test_reference_kernels_agree(name, direction, gen):
    """The slow reference CUDA kernels on the same shapes and tolerance (small shapes: they are slow)."""
    check_matmul(name, torch.bfloat16, gen, direction, shapes=[(1, 37, 3), (20, 70, 16)], ref_kernel=True)


@pytest.mark.parametrize("direction", ["forward", "input_grad"])
def test_small_m_on_a_model_sized_weight(direction, gen):
    """A Llama-8B-sized weight: the fused kernels at their largest shared-memory slices and splits."""
    check_matmul("Q4_K", torch.bfloat16, gen, direction, shapes=[(1, 14336, 128), (32, 14336, 128)])


@pytest.mark.parametrize("overlap", ["0", "1"])
@pytest.mark.parametrize("direction", ["forward", "input_grad"])
def test_chunked_path_many_chunks(direction, overlap, gen, monkeypatch):
    """1 MiB chunks of at least 128 rows/columns force several chunks, with a ragged last one; with
    overlap the two buffers alternate between the side stream's dequantization and cuBLAS."""
    monkeypatch.setenv("LOWTUNE_CUDA_CHUNK_MB", "1")
    monkeypatch.setenv("LOWTUNE_CUDA_CHUNK_MIN", "128")
    monkeypatch.setenv("LOWTUNE_CUDA_OVERLAP", overlap)
    for dtype in DTYPES:
        check_matmul("Q4_K", dtype, gen, direction, shapes=[(100, 600, 64), (40, 1000, 40)])


@pytest.mark.parametrize("overlap", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("direction", ["forward", "input_grad"])
def test_chunked_path_with_a_low_rank_update(direction, dtype, overlap, gen, monkeypatch):
    """W' = deq(W) + s·Bx·Atᵀ formed in the dequantization kernel (dequant_lowrank_kernel) against a
    float64 product of the exactly dequantized weight plus the update: several 1 MiB chunks with a
    ragged last one, tiles with ragged rows and columns, rank 40 (padded to 48 by lowtune.ops: three
    MMA steps). The update is as large as W, so a lost or misplaced one fails the tolerance."""
    from lowtune import ops
    from lowtune.qtensor import QTensor
    monkeypatch.setenv("LOWTUNE_CUDA_CHUNK_MB", "1")
    monkeypatch.setenv("LOWTUNE_CUDA_CHUNK_MIN", "128")
    monkeypatch.setenv("LOWTUNE_CUDA_OVERLAP", overlap)
    rank, scale = 40, 0.7
    for name in ["Q4_K", "Q4_0", "Q6_K", "IQ4_XS"]:
        for m, n, k32 in [(100, 600, 64), (40, 1000, 40), (3, 70, 16)]:
            k = k_for(name, k32)
            raw = random_blocks(name, n, k, gen)
            w64 = dequant_cpu(raw, name, n, k).double()
            c = (w64.norm().item() / (n * k) ** 0.5 / (scale * rank ** 0.5)) ** 0.5  # update ~ W in size
            bx = (torch.randn(n, rank) * c).to(dtype)
            at = (torch.randn(k, rank) * c).to(dtype)
            wp = w64 + scale * (bx.double() @ at.double().t())
            assert (wp - w64).norm() > 0.5 * w64.norm()
            qt = QTensor(raw.cuda(), get_format(name), (n, k))
            if direction == "forward":
                a = torch.randn(m, k).to(dtype)
                ref = a.double() @ wp.t()
                out = ops.qmatmul_lowrank(a.cuda(), qt, bx.cuda(), at.cuda(), scale)
            else:
                a = torch.randn(m, n).to(dtype)
                ref = a.double() @ wp
                out = ops.qmatmul_input_grad_lowrank(a.cuda(), qt, bx.cuda(), at.cuda(), scale)
            torch.cuda.synchronize()
            assert torch.isfinite(out).all(), f"{name} M={m} N={n} K={k}: non-finite outputs"
            err = rel_err(out, ref)
            assert err < TOLERANCE[dtype], f"{name} {direction} M={m} N={n} K={k}: relative error {err:.2e}"


@pytest.mark.parametrize("overlap", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("direction", ["forward", "input_grad"])
def test_chunked_path_with_an_expanded_update(direction, dtype, overlap, gen, monkeypatch):
    """W' = deq(W) + s/p·a[i/q][j/p] (QA-HiRA's update) formed in the dequantization kernel
    (dequant_expand_kernel) against float64: several 1 MiB chunks with a ragged last one (so the rows of a
    start at each chunk's first row), an odd number of rows (the kernel takes rows in pairs), pools that are
    and are not a multiple of a thread's 16 elements, and repeats over rows."""
    from lowtune import ops
    monkeypatch.setenv("LOWTUNE_CUDA_CHUNK_MB", "1")
    monkeypatch.setenv("LOWTUNE_CUDA_CHUNK_MIN", "128")
    monkeypatch.setenv("LOWTUNE_CUDA_OVERLAP", overlap)
    scale = 0.7
    for name, n, k32, pool, repeat in [("Q4_K", 1001, 40, 32, 1), ("Q4_0", 600, 64, 8, 3), ("Q6_K", 130, 16, 64, 2),
                                       ("IQ4_XS", 70, 16, 2, 7)]:
        k = k_for(name, k32)
        raw = random_blocks(name, n, k, gen)
        w64 = dequant_cpu(raw, name, n, k).double()
        a = torch.randn(n // repeat, k // pool) * (w64.norm().item() / (n * k) ** 0.5 / scale * pool)
        wp = w64 + scale / pool * a.double().repeat_interleave(repeat, 0).repeat_interleave(pool, 1)
        assert (wp - w64).norm() > 0.5 * w64.norm()
        m = 37
        if direction == "forward":
            t = torch.randn(m, k).to(dtype)
            ref = t.double() @ wp.t()
            out = ops._forward_expanded_kernel(t.cuda(), raw.cuda(), get_format(name).type_id, n, k, a.cuda(), pool,
                                               repeat, scale)
        else:
            t = torch.randn(m, n).to(dtype)
            ref = t.double() @ wp
            out = ops._input_grad_expanded_kernel(t.cuda(), raw.cuda(), get_format(name).type_id, n, k, a.cuda(),
                                                  pool, repeat, scale)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), f"{name} N={n} K={k}: non-finite outputs"
        err = rel_err(out, ref)
        assert err < TOLERANCE[dtype], f"{name} {direction} N={n} K={k} pool={pool} repeat={repeat}: error {err:.2e}"


@pytest.mark.parametrize("first", ["0", "1"], ids=["after", "before"])
@pytest.mark.parametrize("overlap", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("direction", ["forward", "input_grad"])
def test_chunked_path_with_an_update_after_each_gemm(direction, dtype, overlap, first, gen, monkeypatch):
    """y = x·deq(W)ᵀ + s·left·rightᵀ (or dx = dy·deq(W) + s·left·rightᵀ) with the update multiplied into each
    chunk's slice of the output after the chunk's GEMM, or before it (LOWTUNE_CUDA_UPDATE_FIRST; the GEMM then
    adds into it), through ops._forward_epilogue_kernel, against float64: several 1 MiB chunks with a ragged
    last one (a misplaced slice of right or of the output fails), an odd rank and M. The update is as large as
    the product, so a lost one fails the tolerance."""
    from lowtune import ops
    monkeypatch.setenv("LOWTUNE_CUDA_CHUNK_MB", "1")
    monkeypatch.setenv("LOWTUNE_CUDA_CHUNK_MIN", "128")
    monkeypatch.setenv("LOWTUNE_CUDA_OVERLAP", overlap)
    monkeypatch.setenv("LOWTUNE_CUDA_UPDATE_FIRST", first)
    scale, rank, m = 0.7, 37, 45
    for name, n, k32 in [("Q4_K", 1001, 40), ("Q4_0", 600, 64), ("Q6_K", 130, 16), ("IQ4_XS", 70, 16)]:
        k = k_for(name, k32)
        raw = random_blocks(name, n, k, gen)
        w64 = dequant_cpu(raw, name, n, k).double()
        rows, cols = (k, n) if direction == "forward" else (n, k)
        t = torch.randn(m, rows).to(dtype)
        base = t.double() @ (w64.t() if direction == "forward" else w64)
        c = base.norm().item() / (m * cols) ** 0.5 / (scale * rank ** 0.5)  # update ~ the product in size
        left, right = torch.randn(m, rank).to(dtype), (torch.randn(cols, rank) * c).to(dtype)
        ref = base + scale * left.double() @ right.double().t()
        assert (ref - base).norm() > 0.5 * base.norm()
        kernel = ops._forward_epilogue_kernel if direction == "forward" else ops._input_grad_epilogue_kernel
        out = kernel(t.cuda(), raw.cuda(), get_format(name).type_id, n, k, left.cuda(), right.cuda(), scale)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), f"{name} N={n} K={k}: non-finite outputs"
        err = rel_err(out, ref)
        assert err < TOLERANCE[dtype], f"{name} {direction} N={n} K={k}: relative error {err:.2e}"


@pytest.mark.parametrize("direction", ["forward", "input_grad"])
def test_cublas_path_for_small_m(direction, gen, monkeypatch):
    """With the fused kernels switched off, small M takes the chunked cuBLAS path."""
    monkeypatch.setenv("LOWTUNE_CUDA_SMALL_M", "0")
    check_matmul("INT4-g64", torch.bfloat16, gen, direction, shapes=[(1, 37, 4), (16, 130, 8)])


def test_ops_autograd_on_a_side_stream(gen):
    name, m, n, k = "Q4_K", 24, 96, 512
    raw = random_blocks(name, n, k, gen)
    w64 = dequant_cpu(raw, name, n, k).double()
    qt = lowtune.QTensor.from_raw(raw, name, (n, k)).to("cuda")
    x = torch.randn(2, m // 2, k, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    g = torch.randn(2, m // 2, n, dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = lowtune.qmatmul(x, qt)
        y.backward(g)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert rel_err(y, x.detach().double().cpu() @ w64.t()) < TOLERANCE[torch.bfloat16]
    assert rel_err(x.grad, g.double().cpu() @ w64) < TOLERANCE[torch.bfloat16]
    assert torch.equal(lowtune.dequantize(qt, torch.float32).cpu(), w64.float())


def test_misaligned_pointers_fall_back(gen):
    """Views that start off a 16-byte boundary take the reference kernels and stay correct."""
    name, m, n, k = "Q4_1", 3, 40, 128
    fmt = get_format(name)
    raw = random_blocks(name, n, k, gen)
    w64 = dequant_cpu(raw, name, n, k).double()
    big = torch.zeros(raw.numel() + 1, dtype=torch.uint8)
    big[1:] = raw.reshape(-1)
    qt = lowtune.QTensor.from_raw(big.cuda()[1:], name, (n, k))
    x_big = torch.randn(m * k + 1, dtype=torch.float16)
    x = x_big.cuda()[1:].view(m, k)
    assert x.data_ptr() % 16 and qt.raw.data_ptr() % 16
    y = lowtune.qmatmul(x, qt)
    assert rel_err(y, x.double().cpu() @ w64.t()) < TOLERANCE[torch.float16]
    out = lowtune.dequantize(qt, torch.float32)
    assert torch.equal(out.cpu(), w64.float())
    assert fmt.type_id > 0


def test_bad_type_is_an_error():
    x = torch.zeros(1, 32, dtype=torch.bfloat16, device="cuda")
    with pytest.raises((ValueError, RuntimeError)):
        _C.cuda_qmatmul_forward(12345, x.data_ptr(), 2, x.data_ptr(), x.data_ptr(), 1, 1, 32, stream())


# ---- the staged small-M kernels (csrc/cuda/staged_gemv.cuh) ----------------------------------------
# (M, N, K in blocks of 32): one and two 8-column B tiles, odd N, K that is not a whole number of
# 256-element stages for the 32..128-element types, split and unsplit reductions.
STAGED_SHAPES = [(1, 37, 3), (2, 131, 9), (3, 64, 40), (5, 77, 24), (8, 200, 17), (9, 64, 40), (13, 300, 8),
                 (16, 129, 11)]


def run_path(fn, name, a, raw_gpu, dtype, m, n, k, out_shape, path, monkeypatch):
    monkeypatch.setenv("LOWTUNE_CUDA_PATH", path)
    out = nan_like(out_shape, dtype)
    fn(get_format(name).type_id, a.data_ptr(), DTYPES[dtype], raw_gpu.data_ptr(), out.data_ptr(), m, n, k, stream())
    torch.cuda.synchronize()
    monkeypatch.delenv("LOWTUNE_CUDA_PATH")
    assert torch.isfinite(out).all(), f"{path} left unwritten/NaN outputs at M={m} N={n} K={k}"
    return out


@pytest.mark.parametrize("direction", ["forward", "input_grad"])
@pytest.mark.parametrize("name", QUANT_TYPES)
def test_staged_kernels_every_type(name, direction, gen, monkeypatch):
    """The staged kernels against float64 and against the direct kernels, every type, M = 1..16,
    bf16 and fp16 (the magic-byte decode and the decode_fast fallback)."""
    fwd = direction == "forward"
    fn = _C.cuda_qmatmul_forward if fwd else _C.cuda_qmatmul_input_grad
    for dtype in (torch.bfloat16, torch.float16):
        for m, n, k32 in STAGED_SHAPES:
            assert _C.cuda_path(direction, m, DTYPES[dtype], True) == "staged"
            k = k_for(name, k32)
            raw = random_blocks(name, n, k, gen)
            w64 = dequant_cpu(raw, name, n, k).double()
            a = torch.randn(m, k if fwd else n).to(dtype)
            ref = a.double() @ (w64.t() if fwd else w64)
            a_gpu, raw_gpu = a.cuda(), raw.cuda()
            shape = (m, n) if fwd else (m, k)
            staged = run_path(fn, name, a_gpu, raw_gpu, dtype, m, n, k, shape, "staged", monkeypatch)
            direct = run_path(fn, name, a_gpu, raw_gpu, dtype, m, n, k, shape, "direct", monkeypatch)
            err, err_direct = rel_err(staged, ref), rel_err(direct, ref)
            assert err < TOLERANCE[dtype], f"staged {direction} {dtype} M={m} N={n} K={k}: {err:.2e}"
            assert rel_err(staged, direct) < 2 * TOLERANCE[dtype], (err, err_direct)


@pytest.mark.parametrize("direction", ["forward", "input_grad"])
@pytest.mark.parametrize("name", ["Q4_K", "Q8_0", "INT4-g64", "Q6_K"])
def test_staged_kernels_on_model_sized_weights(name, direction, gen, monkeypatch):
    """7B-sized weights: many CTAs, long reductions split over many CTAs, both B tiles."""
    monkeypatch.setenv("LOWTUNE_CUDA_PATH", "staged")
    shapes = [(1, 4096, 128), (16, 4096, 128), (1, 1024, 448), (4, 11008, 128)]
    check_matmul(name, torch.bfloat16, gen, direction, shapes=shapes)


def test_staged_split_heuristic_knob(gen, monkeypatch):
    """Fewer resident CTAs per multiprocessor, more waves of them, or the splits rounded up (the rule
    before whole waves) change the splits, not the result."""
    for ctas, waves in (("1", "1"), ("2", "1"), ("2", "0"), ("", "0"), ("", "4")):
        monkeypatch.setenv("LOWTUNE_CUDA_STAGED_CTAS_PER_SM", ctas)
        monkeypatch.setenv("LOWTUNE_CUDA_STAGED_WAVES", waves)
        check_matmul("Q4_0", torch.bfloat16, gen, "forward", shapes=[(1, 300, 96), (16, 64, 200)])
        check_matmul("Q4_0", torch.bfloat16, gen, "input_grad", shapes=[(1, 300, 96), (16, 1000, 24)])


def test_staged_forced_splits_knob(gen, monkeypatch):
    """Any number of splits of the reduction (LOWTUNE_CUDA_STAGED_SPLITS, more than the stages too)
    gives the same products: uneven last splits, one stage a split, no split."""
    monkeypatch.setenv("LOWTUNE_CUDA_PATH", "staged")
    for s in ("1", "3", "7", "64"):
        monkeypatch.setenv("LOWTUNE_CUDA_STAGED_SPLITS", s)
        check_matmul("Q4_K", torch.bfloat16, gen, "forward", shapes=[(16, 300, 40), (9, 64, 28)])
        check_matmul("Q4_K", torch.bfloat16, gen, "input_grad", shapes=[(1, 1000, 24), (16, 300, 8)])


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q8_0", "IQ4_XS", "INT3-g128"])
def test_staged_two_tile_layout_below_m9_knob(name, gen, monkeypatch):
    """The staged forward's 128-row, two-B-tile layout taken below M = 9 (LOWTUNE_CUDA_STAGED_TWO_TILES),
    its second tile's rows all past M: the same products as the 16-row layout, against float64."""
    monkeypatch.setenv("LOWTUNE_CUDA_PATH", "staged")
    shapes = [(1, 300, 96), (5, 4096, 24), (8, 130, 9), (7, 1024, 128)]
    for v in ("1", "5", "9"):
        monkeypatch.setenv("LOWTUNE_CUDA_STAGED_TWO_TILES", v)
        check_matmul(name, torch.bfloat16, gen, "forward", shapes=shapes)
    check_matmul(name, torch.float16, gen, "forward", shapes=shapes[:2])


def test_staged_cluster_split_knob(gen, monkeypatch):
    """M <= 8 tiles split over a cluster of 1, 2 or 4 CTAs (sm_90; elsewhere the knob is ignored)
    give the same products: reductions of 1..9 stages, so some ranks of a cluster get none."""
    for c in ("1", "2", "4"):
        monkeypatch.setenv("LOWTUNE_CUDA_STAGED_CLUSTER", c)
        check_matmul("Q4_K", torch.bfloat16, gen, "forward", shapes=[(1, 4096, 96), (8, 300, 40), (3, 64, 8)])
        check_matmul("INT4-g64", torch.float16, gen, "forward", shapes=[(1, 77, 288), (5, 4096, 24)])


# ---- the M = 1 forward on CUDA cores (csrc/cuda/gemv.cuh) ------------------------------------------
# (N, K in super-blocks of 256): odd N (a CTA's last warps without rows), K of 1..112 super-blocks
# (a partly used last round of units, and 112: shared memory above 48 KiB), N beyond one wave.
GEMV_SHAPES = [(37, 1), (37, 3), (301, 17), (4096, 16), (11008, 16), (64, 43), (65, 112), (12000, 1)]
GEMV_TYPES = [name for name in QUANT_TYPES if _C.cuda_has_gemv(get_format(name).type_id)]


def check_gemv(name, dtype, shapes, gen, monkeypatch):
    """Plain activations, activations spread over six orders of magnitude with zeros among them, and
    tiny ones (the per-span int16 scaling), against float64 and the staged kernel's result."""
    rng = torch.Generator().manual_seed(5)
    for n, nsb in shapes:
        k = 256 * nsb
        monkeypatch.setenv("LOWTUNE_CUDA_PATH", "gemv")
        assert _C.cuda_path("forward", 1, DTYPES[dtype], True, n, k, get_format(name).type_id) == "gemv"
        raw = random_blocks(name, n, k, gen)
        w64 = dequant_cpu(raw, name, n, k).double()
        raw_gpu = raw.cuda()
        for kind in ("plain", "wide", "tiny") if dtype == torch.bfloat16 else ("plain", "wide"):
            a = torch.randn(1, k, generator=rng)
            if kind == "wide":
                a = a * torch.exp(2 * torch.randn(1, k, generator=rng))
                a[0, ::7] = 0
            if kind == "tiny":  # spans below 2^-100 (bf16 only: fp16 has no such values)
                a = a * 1e-33
            big = float((a.double() @ w64.t()).abs().max())
            if dtype == torch.float16 and big > 1e4:  # results within fp16's range (wide codes, long rows)
                a = a * (1e4 / big)
            a = a.to(dtype)
            ref = a.double() @ w64.t()
            by_rows = {}
            # rows a warp and K's split: gemv_kernel, gemv_rows_kernel, the same over clusters of two
            # CTAs (sm_90; elsewhere, or where it does not fit, the unsplit kernel)
            for rows, split in (("1", "1"), ("2", "1"), ("2", "2")):
                monkeypatch.setenv("LOWTUNE_CUDA_GEMV_ROWS", rows)
                monkeypatch.setenv("LOWTUNE_CUDA_GEMV_SPLIT", split)
                by_rows[rows + split] = run_path(_C.cuda_qmatmul_forward, name, a.cuda(), raw_gpu, dtype, 1, n, k,
                                                 (1, n), "gemv", monkeypatch)
            # the streamed kernel (sm_90; elsewhere, or where its rows are not 16-byte aligned, the
            # unsplit register kernels): one to three CTAs an SM
            monkeypatch.setenv("LOWTUNE_CUDA_GEMV_SPLIT", "1")
            for ctas in ("1", "2", "3"):
                monkeypatch.setenv("LOWTUNE_CUDA_GEMV_STREAM", ctas)
                by_rows["stream" + ctas] = run_path(_C.cuda_qmatmul_forward, name, a.cuda(), raw_gpu, dtype, 1, n,
                                                    k, (1, n), "gemv", monkeypatch)
            monkeypatch.delenv("LOWTUNE_CUDA_GEMV_STREAM")
            monkeypatch.delenv("LOWTUNE_CUDA_GEMV_ROWS")
            monkeypatch.delenv("LOWTUNE_CUDA_GEMV_SPLIT")
            gemv = by_rows["11"]
            staged = run_path(_C.cuda_qmatmul_forward, name, a.cuda(), raw_gpu, dtype, 1, n, k, (1, n), "staged",
                              monkeypatch)
            err, err_staged = rel_err(gemv, ref), rel_err(staged, ref)
            assert err < TOLERANCE[dtype], f"gemv {name} {dtype} N={n} K={k} {kind}: {err:.2e}"
            assert rel_err(gemv, staged) < 2 * TOLERANCE[dtype], (err, err_staged)
            # a lane adds its units in the same order in both kernels
            assert torch.equal(by_rows["21"], gemv), f"two rows a warp {name} N={n} K={k} {kind}"
            for ctas in ("1", "2", "3"):
                assert torch.equal(by_rows["stream" + ctas], gemv), f"streamed ({ctas}) {name} N={n} K={k} {kind}"
            err_split = rel_err(by_rows["22"], ref)  # the split adds the halves' sums
            assert err_split < TOLERANCE[dtype], f"split K {name} {dtype} N={n} K={k} {kind}: {err_split:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", GEMV_TYPES)
def test_gemv_against_float64_and_the_staged_kernel(name, dtype, gen, monkeypatch):
    # (12000, 1): more rows than one wave of warps, the persistent loop (fewer: one row a warp)
    # (203, 24): rows whose bytes are 16-byte aligned for every type (the streamed kernel's bulk copies)
    shapes = GEMV_SHAPES if name == "Q4_K" else [(37, 1), (301, 17), (65, 112), (12000, 1), (203, 24)]
    check_gemv(name, dtype, shapes, gen, monkeypatch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", GEMV_TYPES)
def test_gemv_input_grad_against_float64_and_the_staged_kernel(name, dtype, gen, monkeypatch):
    """The one-row input gradient (gemv_grad.cuh): dx = dy deq(W) against float64 and the staged
    kernel, on shapes with a partial last slice of units (K / 32 not a multiple of 32), one row
    group and many, and more rows than a round of the CTA's warps."""
    rng = torch.Generator().manual_seed(6)
    for n, nsb in [(37, 1), (301, 5), (4096, 16), (65, 112), (5000, 3)]:
        k = 256 * nsb
        raw = random_blocks(name, n, k, gen)
        w64 = dequant_cpu(raw, name, n, k).double()
        raw_gpu = raw.cuda()
        dy = torch.randn(1, n, generator=rng)
        big = float((dy.double() @ w64).abs().max())
        if dtype == torch.float16 and big > 1e4:
            dy = dy * (1e4 / big)
        dy = dy.to(dtype)
        ref = dy.double() @ w64
        gemv = run_path(_C.cuda_qmatmul_input_grad, name, dy.cuda(), raw_gpu, dtype, 1, n, k, (1, k), "gemv",
                        monkeypatch)
        staged = run_path(_C.cuda_qmatmul_input_grad, name, dy.cuda(), raw_gpu, dtype, 1, n, k, (1, k), "staged",
                          monkeypatch)
        err = rel_err(gemv, ref)
        assert err < TOLERANCE[dtype], f"gemv input grad {name} {dtype} N={n} K={k}: {err:.2e}"
        assert rel_err(gemv, staged) < 2 * TOLERANCE[dtype], (err, rel_err(staged, ref))
        again = run_path(_C.cuda_qmatmul_input_grad, name, dy.cuda(), raw_gpu, dtype, 1, n, k, (1, k), "gemv",
                         monkeypatch)
        assert torch.equal(gemv, again), "the row groups' sums are added in a fixed order"


@pytest.mark.parametrize("name", GEMV_TYPES)
def test_gemv_input_grad_through_shared_memory_against_float64_and_the_register_kernel(name, gen, monkeypatch):
    """grad_staged_kernel (W's rows through a shared-memory ring, LOWTUNE_CUDA_GEMV_GRAD_STAGED=1) against
    float64 and grad_kernel, and the same bits when run again: rows not a multiple of the 32-row stage, one
    stage and many, a partial last slice of units (K / 32 not a multiple of 32), and for the 32-element
    types rows at every address mod 16 (K = 96, 160: odd numbers of blocks)."""
    rng = torch.Generator().manual_seed(9)
    shapes = [(37, 256), (301, 1280), (4096, 4096), (5000, 768), (70, 256 * 57)]
    if get_format(name).block_elems == 32:
        shapes += [(37, 96), (301, 160), (64, 4192)]
    for n, k in shapes:
        raw = random_blocks(name, n, k, gen)
        w64 = dequant_cpu(raw, name, n, k).double()
        raw_gpu = raw.cuda()
        dy = torch.randn(1, n, generator=rng).bfloat16()
        out = {}
        for ring in ("0", "1", "again"):
            monkeypatch.setenv("LOWTUNE_CUDA_GEMV_GRAD_STAGED", "0" if ring == "0" else "1")
            out[ring] = run_path(_C.cuda_qmatmul_input_grad, name, dy.cuda(), raw_gpu, torch.bfloat16, 1, n, k, (1, k),
                                 "gemv", monkeypatch)
        err = rel_err(out["1"], dy.double() @ w64)
        assert err < TOLERANCE[torch.bfloat16], f"{name} N={n} K={k}: {err:.2e}"
        assert rel_err(out["1"], out["0"]) < 2 * TOLERANCE[torch.bfloat16], f"{name} N={n} K={k}"
        assert torch.equal(out["1"], out["again"]), f"{name} N={n} K={k}: the ring's sums depend on timing"


@pytest.mark.parametrize("name", ["IQ4_NL", "MXFP4"])
def test_table_types_blocks_read_as_the_aligned_words_around_them(name, gen, monkeypatch):
    """IQ4_NL's 18-byte and MXFP4's 17-byte blocks, which the one-row kernels read as the aligned words
    around them (legacy_words, mxfp4_words): blocks at every address mod 4 (rows of an odd number of
    blocks), the tensor's last block ending inside a word (N odd, K = 96); the gemv forward, its
    transpose and the regs forward against float64."""
    rng = torch.Generator().manual_seed(8)
    for n, k in [(37, 96), (5, 32), (301, 160), (64, 4192), (3, 224)]:
        raw = random_blocks(name, n, k, gen)
        w64 = dequant_cpu(raw, name, n, k).double()
        raw_gpu = raw.cuda()
        x, dy = torch.randn(3, k, generator=rng).bfloat16(), torch.randn(1, n, generator=rng).bfloat16()
        y = run_path(_C.cuda_qmatmul_forward, name, x[:1].cuda(), raw_gpu, torch.bfloat16, 1, n, k, (1, n), "gemv",
                     monkeypatch)
        assert rel_err(y, x[:1].double() @ w64.t()) < TOLERANCE[torch.bfloat16], f"gemv {name} N={n} K={k}"
        dx = run_path(_C.cuda_qmatmul_input_grad, name, dy.cuda(), raw_gpu, torch.bfloat16, 1, n, k, (1, k), "gemv",
                      monkeypatch)
        assert rel_err(dx, dy.double() @ w64) < TOLERANCE[torch.bfloat16], f"gemv_grad {name} N={n} K={k}"
        y3 = run_path(_C.cuda_qmatmul_forward, name, x.cuda(), raw_gpu, torch.bfloat16, 3, n, k, (3, n), "regs",
                      monkeypatch)
        assert rel_err(y3, x.double() @ w64.t()) < TOLERANCE[torch.bfloat16], f"regs {name} N={n} K={k}"


# the forward (Q4_K, Q8_0) and gemv_grad's integer path (Q4_1) and fp32 path (Q6_K, Q8_0)
@pytest.mark.parametrize("product, name", [("forward", "Q4_K"), ("forward", "Q8_0"), ("input_grad", "Q4_1"),
                                           ("input_grad", "Q6_K"), ("input_grad", "Q8_0")])
def test_gemv_gives_no_finite_output_from_a_nan_or_an_infinity_in_its_input(product, name, gen, monkeypatch):
    """A non-finite x (dy) reaches every y (dx). In the input gradient each span's dy z sum carries
    it, also where the integer path's rounding on the step's largest |dy s| would drop it."""
    n, k = 40, 512
    fn, width, out, at = ((_C.cuda_qmatmul_forward, k, n, 300) if product == "forward"
                          else (_C.cuda_qmatmul_input_grad, n, k, 17))
    raw_gpu = random_blocks(name, n, k, gen).cuda()
    for bad in (float("nan"), float("inf")):
        a = torch.randn(1, width, dtype=torch.bfloat16, device="cuda")
        a[0, at] = bad
        monkeypatch.setenv("LOWTUNE_CUDA_PATH", "gemv")
        y = nan_like((1, out), torch.bfloat16).zero_()
        fn(get_format(name).type_id, a.data_ptr(), DTYPES[torch.bfloat16], raw_gpu.data_ptr(), y.data_ptr(), 1, n, k,
           stream())
        torch.cuda.synchronize()
        assert not torch.isfinite(y).any(), (product, name, bad, y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", GEMV_TYPES)
def test_regs_forward_against_float64_and_the_staged_kernel(name, dtype, gen, monkeypatch):
    """The M <= 16 forward with W decoded into tensor-core fragments (small_m_regs.cuh) against
    float64 and the staged kernel: M of 1, 5 and 16 (fragment rows past M), rows past the last
    16-row warp and 128-row CTA, K with a partial step of units (legacy types), several splits."""
    rng = torch.Generator().manual_seed(7)
    fmt = get_format(name)
    shapes = [(37, 256), (301, 1280), (200, 256 * 40)] + ([(130, 160)] if fmt.block_elems == 32 else [])
    for n, k in shapes:
        raw = random_blocks(name, n, k, gen)
        w64 = dequant_cpu(raw, name, n, k).double()
        raw_gpu = raw.cuda()
        for m in (1, 5, 16):
            x = torch.randn(m, k, generator=rng)
            big = float((x.double() @ w64.T).abs().max())
            if dtype == torch.float16 and big > 1e4:
                x = x * (1e4 / big)
            x = x.to(dtype)
            ref = x.double() @ w64.T
            regs = run_path(_C.cuda_qmatmul_forward, name, x.cuda(), raw_gpu, dtype, m, n, k, (m, n), "regs",
                            monkeypatch)
            staged = run_path(_C.cuda_qmatmul_forward, name, x.cuda(), raw_gpu, dtype, m, n, k, (m, n), "staged",
                              monkeypatch)
            err = rel_err(regs, ref)
            assert err < TOLERANCE[dtype], f"regs forward {name} {dtype} M={m} N={n} K={k}: {err:.2e}"
            assert rel_err(regs, staged) < 2 * TOLERANCE[dtype], (err, rel_err(staged, ref))
            if n == 301:  # without the load pipeline: the same sums in the same order
                monkeypatch.setenv("LOWTUNE_CUDA_REGS_PIPE", "0")
                plain = run_path(_C.cuda_qmatmul_forward, name, x.cuda(), raw_gpu, dtype, m, n, k, (m, n), "regs",
                                 monkeypatch)
                monkeypatch.delenv("LOWTUNE_CUDA_REGS_PIPE")
                assert torch.equal(plain, regs)


def test_staged_and_chunked_paths_in_a_cuda_graph(gen, monkeypatch):
    """qmatmul and its input gradient captured into one CUDA graph (staged at M = 1 and 16, the
    chunked cuBLAS path with the side stream at M = 100) and replayed on fresh inputs."""
    monkeypatch.setenv("LOWTUNE_CUDA_CHUNK_MB", "1")
    monkeypatch.setenv("LOWTUNE_CUDA_CHUNK_MIN", "128")
    name, n, k = "Q4_K", 640, 1024
    raw = random_blocks(name, n, k, gen)
    w64 = dequant_cpu(raw, name, n, k).double()
    qt = lowtune.QTensor.from_raw(raw, name, (n, k)).to("cuda")
    for m in (1, 16, 100):
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        dy = torch.randn(m, n, dtype=torch.bfloat16, device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (one-time set-up)
            lowtune.qmatmul(x, qt)
            lowtune.qmatmul_input_grad(dy, qt)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = lowtune.qmatmul(x, qt)
            dx = lowtune.qmatmul_input_grad(dy, qt)
        for _ in range(2):
            x.copy_(torch.randn(m, k))
            dy.copy_(torch.randn(m, n))
            y.fill_(float("nan"))
            dx.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert rel_err(y, x.double().cpu() @ w64.t()) < TOLERANCE[torch.bfloat16], m
            assert rel_err(dx, dy.double().cpu() @ w64) < TOLERANCE[torch.bfloat16], m


@pytest.mark.parametrize("path", ["staged", "gemv"])
def test_products_back_to_back_in_a_cuda_graph(path, gen, monkeypatch):
    """A chain of products, each reading the output of the one before (forward and input gradient
    in turn), captured into one CUDA graph. The small-M kernels launch with programmatic dependent
    launch: each may start while its predecessor ends, and must wait for that output before reading
    it (and before writing its split-K partial sums). Replayed on fresh inputs, the chain equals the
    same calls made one at a time with the GPU synchronized between them, bit for bit."""
    monkeypatch.setenv("LOWTUNE_CUDA_PATH", path)
    k = 2048
    for name in ("Q4_K", "Q4_0", "Q6_K"):
        torch.manual_seed(0)
        qts = [helpers.quantized(torch.randn(k, k) / k**0.5, name).to("cuda") for _ in range(2)]

        def chain(x, sync):
            for i in range(8):
                x = lowtune.qmatmul(x, qts[i % 2]) if i % 2 == 0 else lowtune.qmatmul_input_grad(x, qts[i % 2])
                if sync:
                    torch.cuda.synchronize()
            return x

        for m in (1,) if path == "gemv" else (1, 5, 16):
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture (one-time set-up)
                chain(x, False)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = chain(x, False)
            for _ in range(3):
                x.copy_(torch.randn(m, k))
                graph.replay()
                want = chain(x.clone(), True)
                assert torch.isfinite(want).all() and want.abs().max() > 0, (name, m)
                assert torch.equal(y, want), f"{name} M={m} {path}: {(y.float() - want.float()).abs().max()}"
