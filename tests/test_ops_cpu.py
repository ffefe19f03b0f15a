"""CPU qmatmul forward and input gradient against a float64 reference on the dequantized weight.

Weights are random block bytes with sane fp16 scales (every code pattern, no quantizer needed,
so K-types are covered too). The reference is computed in float64 from exactly the values the
kernel sees: the dequantized weight (bit-exact, tests/test_formats.py) and x already rounded to
its dtype. So the only error is the kernel's float32 accumulation plus the final rounding to the
output dtype, and any summation order of K products obeys (Higham, Accuracy and Stability of
Numerical Algorithms, §3.1)

    |y - y64| <= gamma_K * sum_k |x_k w_k| + u_out * |y64|,   gamma_K = K u / (1 - K u), u = 2^-24,

with u_out = 2^-11 for float16 (plus 2^-25 absolute for its subnormals), 2^-8 for bfloat16 and
0 for float32 (its final rounding is inside gamma_K). For the input gradient K becomes N.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lowtune
from lowtune import _C
from lowtune.formats import FORMATS, get_format

QUANTIZED = [f.name for f in FORMATS.values() if f.quantized]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
U = 2.0 ** -24
OUT_ROUNDING = {torch.float32: (0.0, 0.0), torch.float16: (2.0 ** -11, 2.0 ** -25), torch.bfloat16: (2.0 ** -8, 0.0)}


def error_bound(a64: np.ndarray, b64: np.ndarray, y64: np.ndarray, depth: int, dtype) -> np.ndarray:
    """Per-element bound on |y - a·b| for a float32-accumulated product of inner size `depth`."""
    gamma = depth * U / (1 - depth * U)
    rel, absolute = OUT_ROUNDING[dtype]
    return gamma * (np.abs(a64) @ np.abs(b64)) + rel * np.abs(y64) + absolute


def assert_within(y: torch.Tensor, y64: np.ndarray, bound: np.ndarray, what: str) -> None:
    err = np.abs(y.double().numpy() - y64)
    i = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), f"{what}: error {err[i]:.3g} > bound {bound[i]:.3g} at {i} (y64 {y64[i]:.6g})"


def random_qtensor(name: str, n: int, k: int, rng, random_blocks) -> lowtune.QTensor:
    return lowtune.QTensor.from_raw(torch.from_numpy(random_blocks(get_format(name), n, k, rng)), name, (n, k))


def activations(rng, shape, dtype) -> torch.Tensor:
    # Values and their dtype rounding both vary; a few exact zeros and larger entries mixed in.
    x = rng.standard_normal(shape) * np.where(rng.random(shape) < 0.05, 8.0, 1.0)
    x[rng.random(shape) < 0.02] = 0.0
    return torch.from_numpy(x.astype(np.float32)).to(dtype)


def k_for(name: str, blocks: int) -> int:
    return blocks * get_format(name).block_elems


# M = 1 (the fused small-M path), a small M, and M with tails around the GEMM path's register
# tiles; N with tails around 32-column panels; K of one block, a few blocks, and many. Many rows
# (70, 300) also through the dense path, with N spanning several of its panels (1100 rows of 1536).
SHAPES = [(1, 1, 1), (1, 37, 3), (3, 64, 9), (2, 1100, 3), (7, 33, 2), (29, 70, 5), (70, 45, 17), (40, 300, 9),
          (300, 1100, 3)]


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("m,n,blocks", SHAPES)
def test_forward_and_input_grad_match_float64(name, m, n, blocks, rng, random_blocks, monkeypatch):
    k = k_for(name, blocks)
    if k * max(m, n) > 2_000_000:
        k = k_for(name, max(1, blocks // 4))
    qt = random_qtensor(name, n, k, rng, random_blocks)
    w64 = lowtune.dequantize(qt).double().numpy()
    x = activations(rng, (m, k), torch.float32)
    y64 = x.double().numpy() @ w64.T
    dy = activations(rng, (m, n), torch.float32)
    dx64 = dy.double().numpy() @ w64
    # many rows run either in the packed GEMM or as dequantized panels through torch's GEMM
    for mode in ("packed", "dense") if m >= lowtune.ops._CPU_DENSE_MIN_ROWS else ("packed",):
        monkeypatch.setattr(lowtune.ops, "_cpu_gemm_mode", lambda: mode)
        monkeypatch.setattr(lowtune.ops, "_CPU_PANEL_FLOATS", 40 * k)  # several panels where N > 40
        y = lowtune.qmatmul(x, qt)
        assert y.shape == (m, n) and y.dtype == torch.float32
        assert_within(y, y64, error_bound(x.double().numpy(), w64.T, y64, k, torch.float32), f"forward {mode}")
        dx = lowtune.qmatmul_input_grad(dy, qt)
        assert dx.shape == (m, k) and dx.dtype == torch.float32
        assert_within(dx, dx64, error_bound(dy.double().numpy(), w64, dx64, n, torch.float32), f"input grad {mode}")


@pytest.mark.parametrize("name", ["Q4_0", "Q5_1", "Q8_0", "Q3_K", "Q4_K", "Q6_K", "INT2-g64", "INT6-g128"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 37])
def test_half_activations(name, dtype, m, rng, random_blocks):
    n, k = 40, k_for(name, 3)
    qt = random_qtensor(name, n, k, rng, random_blocks)
    w64 = lowtune.dequantize(qt).double().numpy()
    x = activations(rng, (m, k), dtype)
    y = lowtune.qmatmul(x, qt)
    assert y.dtype == dtype
    y64 = x.double().numpy() @ w64.T
    assert_within(y, y64, error_bound(x.double().numpy(), w64.T, y64, k, dtype), f"forward {dtype}")
    dy = activations(rng, (m, n), dtype)
    dx = lowtune.qmatmul_input_grad(dy, qt)
    assert dx.dtype == dtype
    dx64 = dy.double().numpy() @ w64
    assert_within(dx, dx64, error_bound(dy.double().numpy(), w64, dx64, n, dtype), f"input grad {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_io_is_exact_conversion_of_the_f32_kernel(dtype, rng, random_blocks):
    # Half activations are widened exactly and the fp32 result is rounded to nearest even once:
    # the same bits as running the fp32 kernel on the widened input and casting with torch.
    qt = random_qtensor("Q4_K", 70, 512, rng, random_blocks)
    for m in (1, 8, 40):
        x = activations(rng, (m, 512), dtype)
        assert torch.equal(lowtune.qmatmul(x, qt), lowtune.qmatmul(x.float(), qt).to(dtype))
        dy = activations(rng, (m, 70), dtype)
        assert torch.equal(lowtune.qmatmul_input_grad(dy, qt), lowtune.qmatmul_input_grad(dy.float(), qt).to(dtype))


@pytest.mark.parametrize("name", ["Q4_1", "Q4_K", "INT3-g32", "IQ4_NL", "MXFP4", "NVFP4", "TQ1_0"])
def test_fast_kernels_match_reference_kernels(name, rng, random_blocks, monkeypatch):
    # The fast paths (fused small-M, panel GEMM) against the simple loops kept as *_reference
    # (IQ4_NL and MXFP4: the register decoding of table levels at small M).
    monkeypatch.setattr(lowtune.ops, "_cpu_gemm_mode", lambda: "packed")
    for m, n, blocks in [(1, 50, 6), (4, 33, 3), (45, 67, 9)]:
        k = k_for(name, blocks)
        qt = random_qtensor(name, n, k, rng, random_blocks)
        w64 = lowtune.dequantize(qt).double().numpy()
        x = activations(rng, (m, k), torch.float32)
        y_ref = torch.empty(m, n)
        _C.qmatmul_forward_reference(qt.format.type_id, x.data_ptr(), 0, qt.raw.data_ptr(), y_ref.data_ptr(), m, n, k)
        bound = error_bound(x.double().numpy(), w64.T, x.double().numpy() @ w64.T, k, torch.float32)
        np.testing.assert_array_less((lowtune.qmatmul(x, qt) - y_ref).abs().double().numpy(), 2 * bound + 1e-30)
        dy = activations(rng, (m, n), torch.float32)
        dx_ref = torch.empty(m, k)
        _C.qmatmul_input_grad_reference(qt.format.type_id, dy.data_ptr(), 0, qt.raw.data_ptr(), dx_ref.data_ptr(), m, n, k)
        bound = error_bound(dy.double().numpy(), w64, dy.double().numpy() @ w64, n, torch.float32)
        np.testing.assert_array_less((lowtune.qmatmul_input_grad(dy, qt) - dx_ref).abs().double().numpy(), 2 * bound + 1e-30)


def test_thread_count_does_not_change_results(rng, random_blocks, monkeypatch):
    # Threads split output rows/columns; each output's summation order must not depend on them.
    # N and K span several panels of every path (small M, dot-product tiles, transposed tiles);
    # a narrow N makes the GEMM split rows across threads too. (The packed kernels: many rows
    # may otherwise go through torch's GEMM, whose threads lowtune does not set.)
    monkeypatch.setattr(lowtune.ops, "_cpu_gemm_mode", lambda: "packed")
    before = _C.num_threads()
    try:
        for name, n, k, ms in [("Q4_K", 600, 1024, (2, 8, 33)), ("Q4_1", 40, 96, (300,))]:
            qt = random_qtensor(name, n, k, rng, random_blocks)
            for m in ms:
                x = activations(rng, (m, k), torch.float32)
                dy = activations(rng, (m, n), torch.float32)
                results = []
                for threads in (1, 2, 3):
                    _C.set_num_threads(threads)
                    results.append((lowtune.qmatmul(x, qt), lowtune.qmatmul_input_grad(dy, qt)))
                for other in results[1:]:
                    assert torch.equal(results[0][0], other[0]) and torch.equal(results[0][1], other[1]), (name, m)
    finally:
        _C.set_num_threads(before)


def test_kernel_errors_reach_python_from_any_thread():
    # quantize() checks each row on the thread pool: the error of a row handled by a worker
    # thread must come back as the Python exception, and the pool must stay usable after it.
    before = _C.num_threads()
    try:
        _C.set_num_threads(2)
        w = torch.randn(64, 32)
        w[60, 3] = float("nan")  # a row of the second chunk, which the worker runs when it is awake in time
        raw = torch.empty(64, 20, dtype=torch.uint8)
        with pytest.raises(ValueError, match="row 60"):
            _C.quantize(get_format("Q4_1").type_id, w.data_ptr(), raw.data_ptr(), 64, 32)
        w[60, 3] = 0.0
        _C.quantize(get_format("Q4_1").type_id, w.data_ptr(), raw.data_ptr(), 64, 32)
    finally:
        _C.set_num_threads(before)


# ---- autograd ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "INT3-g64"])
def test_autograd_matches_dense_float64(name, rng, random_blocks):
    n, k = 24, k_for(name, 2)
    qt = random_qtensor(name, n, k, rng, random_blocks)
    w64 = lowtune.dequantize(qt).double()
    x = activations(rng, (2, 3, k), torch.float32).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    g = activations(rng, (2, 3, n), torch.float32)
    y = lowtune.qmatmul(x, qt)
    assert y.shape == (2, 3, n) and y.requires_grad
    (y * g).sum().backward()
    (x64 @ w64.T * g.double()).sum().backward()
    bound = error_bound(g.double().reshape(-1, n).numpy(), w64.abs().numpy(), x64.grad.reshape(-1, k).numpy(), n,
                        torch.float32)
    assert_within(x.grad.reshape(-1, k), x64.grad.reshape(-1, k).numpy(), bound, "x.grad")


@pytest.mark.parametrize("name", ["Q5_0", "Q6_K", "INT5-g128"])
def test_gradcheck(name, rng, random_blocks):
    # torch.autograd.gradcheck: the analytic Jacobian (our input-gradient kernel) against central
    # differences of the float32 forward. The op is linear, so a large step (eps = 1) has no
    # truncation error; what remains is the forward's float32 rounding at x +- eps, at most
    # gamma_K * sum_k (|x_k| + eps) |w_jk| per output, divided by the step 2 eps, twice.
    n, k, eps = 5, k_for(name, 1), 1.0
    qt = random_qtensor(name, n, k, rng, random_blocks)
    x = torch.from_numpy(rng.standard_normal((2, k))).requires_grad_(True)
    w64 = lowtune.dequantize(qt).double().numpy()
    gamma = k * U / (1 - k * U)
    atol = gamma * ((np.abs(x.detach().numpy()) + eps) @ np.abs(w64).T).max() / eps

    def f(x64):
        return lowtune.qmatmul(x64.float(), qt).double()

    assert torch.autograd.gradcheck(f, (x,), eps=eps, atol=atol, rtol=0)


def test_no_grad_when_not_required(rng, random_blocks):
    qt = random_qtensor("Q8_0", 8, 64, rng, random_blocks)
    x = activations(rng, (3, 64), torch.float32)
    assert not lowtune.qmatmul(x, qt).requires_grad


def test_empty_batch(rng, random_blocks):
    qt = random_qtensor("Q4_K", 8, 256, rng, random_blocks)
    assert lowtune.qmatmul(torch.zeros(0, 256), qt).shape == (0, 8)
    assert lowtune.qmatmul_input_grad(torch.zeros(0, 8), qt).shape == (0, 256)


# ---- validation: bad input is a ValueError that names the tensor -------------------------------------

@pytest.fixture
def q4k(rng, random_blocks):
    return random_qtensor("Q4_K", 16, 256, rng, random_blocks)


def test_wrong_shape_names_the_tensor(q4k):
    with pytest.raises(ValueError, match=r"^x must have shape \[\.\.\., K=256\]"):
        lowtune.qmatmul(torch.zeros(2, 255), q4k)
    with pytest.raises(ValueError, match=r"^dy must have shape \[\.\.\., N=16\]"):
        lowtune.qmatmul_input_grad(torch.zeros(2, 17), q4k)
    with pytest.raises(ValueError, match=r"^x must have shape"):
        lowtune.qmatmul(torch.tensor(1.0), q4k)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8])
def test_wrong_dtype_names_the_tensor(q4k, dtype):
    with pytest.raises(ValueError, match=r"^x must be float32, float16 or bfloat16"):
        lowtune.qmatmul(torch.zeros(2, 256, dtype=dtype), q4k)
    with pytest.raises(ValueError, match=r"^dy must be float32, float16 or bfloat16"):
        lowtune.qmatmul_input_grad(torch.zeros(2, 16, dtype=dtype), q4k)
    with pytest.raises(ValueError, match=r"^dtype must be"):
        lowtune.dequantize(q4k, dtype)


def test_wrong_device_names_the_tensor(q4k):
    # The meta device stands in for "another device" on a machine without a GPU.
    with pytest.raises(ValueError, match=r"^x is on meta but the weight is on cpu"):
        lowtune.qmatmul(torch.zeros(2, 256, device="meta"), q4k)
    with pytest.raises(ValueError, match=r"^dy is on meta"):
        lowtune.qmatmul_input_grad(torch.zeros(2, 16, device="meta"), q4k)


def test_low_rank_update_arguments_are_checked(q4k):
    """ops.qmatmul_lowrank / qmatmul_input_grad_lowrank (CUDA kernels, tested in test_cuda.py) name the
    bad argument before anything runs, and on a CPU weight say that they are CUDA's."""
    from lowtune import ops
    x, dy = torch.zeros(2, 256, dtype=torch.bfloat16), torch.zeros(2, 16, dtype=torch.bfloat16)
    bx, at = torch.zeros(16, 8), torch.zeros(256, 8)
    with pytest.raises(ValueError, match=r"^x must be float16 or bfloat16"):
        ops.qmatmul_lowrank(x.float(), q4k, bx, at, 1.0)
    with pytest.raises(ValueError, match=r"^bx must be a \[16, rank\] tensor"):
        ops.qmatmul_lowrank(x, q4k, bx[:15], at, 1.0)
    with pytest.raises(ValueError, match=r"^at must be a \[256, rank\] tensor"):
        ops.qmatmul_input_grad_lowrank(dy, q4k, bx, at.t(), 1.0)
    with pytest.raises(ValueError, match=r"^bx and at must share a positive rank, got 8 and 4"):
        ops.qmatmul_lowrank(x, q4k, bx, at[:, :4], 1.0)
    with pytest.raises(ValueError, match=r"^dy must have shape"):
        ops.qmatmul_input_grad_lowrank(x, q4k, bx, at, 1.0)
    with pytest.raises(ValueError, match=r"runs on CUDA only"):
        ops.qmatmul_lowrank(x, q4k, bx, at, 1.0)
    with pytest.raises(ValueError, match=r"runs on CUDA only"):
        ops.qmatmul_input_grad_lowrank(dy, q4k, bx, at, 1.0)


@pytest.mark.parametrize("n,k,r,at_transposed", [(16, 64, 16, False), (16, 64, 16, True), (40, 96, 5, False),
                                                  (200, 320, 37, True)])
def test_low_rank_fragments_are_where_the_kernel_reads_them(n, k, r, at_transposed):
    """ops.lowrank_ready's layout against dequant_lowrank_kernel's reads, written out element by element:
    lane 4 g + c of row tile R reads Bx's ranks 16 s + 4 c .. + 3 of rows 16 R + g and 16 R + g + 8 as one
    16-byte load at ((R S + s) 32 + lane) 8 (registers a0..a3: row g low pair, row g + 8 low pair, row g high
    pair, row g + 8 high pair); of 8-column tile j in column tile T, At's ranks 16 s + 4 c .. + 3 of column
    64 T + 16 (g / 2) + 2 j + g % 2 as one 8-byte load at ((T S + s) 8 + j) 128 + 4 lane. Padding reads zero."""
    from lowtune import ops
    bx, at = torch.randn(n, r, dtype=torch.float64), torch.randn(k, r, dtype=torch.float64)
    if at_transposed:  # as the adapter's merged route hands it over: A[:r].t(), a view
        at = at.t().contiguous().t()
    f = ops.lowrank_ready(bx, at, torch.float64)
    S = f.rank // 16
    assert f.rank % 16 == 0 and f.rank >= r and f.bx.is_contiguous() and f.at.is_contiguous()
    i, t = torch.meshgrid(torch.arange(n), torch.arange(r), indexing="ij")
    s, c, q = t // 16, t % 16 // 4, t % 4
    g, h = i % 8, i % 16 // 8
    at_b = (((i // 16) * S + s) * 32 + 4 * g + c) * 8 + (q // 2 * 2 + h) * 2 + q % 2
    assert torch.equal(f.bx.flatten()[at_b], bx)
    i, t = torch.meshgrid(torch.arange(k), torch.arange(r), indexing="ij")
    s, c, q = t // 16, t % 16 // 4, t % 4
    gh, j, gl = i % 64 // 16, i % 16 // 2, i % 2
    at_a = (((i // 64) * S + s) * 8 + j) * 128 + 4 * (4 * (2 * gh + gl) + c) + q
    assert torch.equal(f.at.flatten()[at_a], at)
    assert f.bx.count_nonzero() == bx.numel() and f.at.count_nonzero() == at.numel()  # the rest is zero
    assert f.bx.numel() == -(-n // 16) * 16 * f.rank and f.at.numel() == -(-k // 64) * 64 * f.rank


def test_non_contiguous_input_names_the_tensor(q4k):
    with pytest.raises(ValueError, match=r"^x must be contiguous"):
        lowtune.qmatmul(torch.zeros(256, 4).t(), q4k)
    with pytest.raises(ValueError, match=r"^dy must be contiguous"):
        lowtune.qmatmul_input_grad(torch.zeros(16, 4).t(), q4k)


def test_broken_weight_names_the_tensor(q4k):
    bad = lowtune.QTensor(q4k.raw[:, :100], q4k.format, q4k.shape)
    with pytest.raises(ValueError, match=r"^weight.raw must be uint8 of shape \(16, 144\)"):
        lowtune.qmatmul(torch.zeros(2, 256), bad)
    strided = lowtune.QTensor(torch.zeros(144, 16, dtype=torch.uint8).t(), q4k.format, q4k.shape)
    with pytest.raises(ValueError, match=r"^weight.raw must be contiguous"):
        lowtune.qmatmul(torch.zeros(2, 256), strided)
    with pytest.raises(ValueError, match=r"^weight must be a lowtune.QTensor"):
        lowtune.qmatmul(torch.zeros(2, 256), torch.zeros(16, 256))


@pytest.mark.parametrize("name", ["Q4_K", "Q4_0", "INT4-g128"])
def test_row_length_not_a_multiple_of_the_block(name):
    block = get_format(name).block_elems
    with pytest.raises(ValueError, match=f"row length {block + 16} is not a multiple of the block size {block}"):
        lowtune.quantize(torch.zeros(4, block + 16), name)
    with pytest.raises(ValueError, match="not a multiple of the block size"):
        lowtune.QTensor.from_raw(torch.zeros(4 * 144, dtype=torch.uint8), name, (4, block + 16))


def test_unknown_type():
    with pytest.raises(ValueError, match=r"unknown quantization type 'Q7_X'"):
        lowtune.quantize(torch.zeros(4, 256), "Q7_X")
    with pytest.raises(ValueError, match=r"unknown quantization type id 99"):
        lowtune.QTensor.from_raw(torch.zeros(16, dtype=torch.uint8), 99, (1, 32))
    with pytest.raises(ValueError, match=r"unknown quantization type 'INT7-g32'"):
        lowtune.get_format("INT7-g32")
    with pytest.raises(ValueError, match=r"unknown quantization type id 12345"):
        _C.block_info(12345)  # the C++ side refuses unknown ids too, as ValueError


def test_build_info_names_the_cpu_kernels_isa():
    assert lowtune.build_info()["cpu_isa"] in {"avx512", "avx2", "generic"}


def test_bench_tool_prints_a_row_per_kernel(capsys):
    # tools/bench_kernels.py on a tiny shape: it runs and prints its table (timings unchecked).
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "tools" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--types", "Q4_K,INT3-g64", "--shapes", "64x256", "--ms", "1,5", "--min-time", "0",
                       "--max-reps", "3"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    kernels = [r.split("|")[1].strip() for r in rows[1:]]
    assert kernels.count("quantize") == 2 and kernels.count("dequantize") == 2
    assert kernels.count("forward") == 4 and kernels.count("input_grad") == 4


def test_cpu_gemm_choice(monkeypatch):
    """Many fp32 rows may take the dense path; many bf16 rows take it where the CPU multiplies
    bf16 natively, unless LOWTUNE_CPU_GEMM=packed; fp16 and few rows never do; an unknown
    LOWTUNE_CPU_GEMM is refused by name."""
    ops = lowtune.ops

    def clear():
        ops._cpu_gemm_mode.cache_clear()
        ops._cpu_gemm_setting.cache_clear()

    try:
        for native in (True, False):
            monkeypatch.setattr(ops, "_cpu_bf16_gemm", lambda: native)
            for mode, want in (("dense", True), ("packed", False)):
                monkeypatch.setenv("LOWTUNE_CPU_GEMM", mode)
                clear()
                assert ops.cpu_dense_gemm(512, torch.float32) is want
                assert ops.cpu_dense_gemm(512, torch.bfloat16) is (native and mode == "dense")
                assert not ops.cpu_dense_gemm(512, torch.float16)
                assert not ops.cpu_dense_gemm(ops._CPU_DENSE_MIN_ROWS - 1, torch.float32)
                assert not ops.cpu_dense_gemm(ops._CPU_DENSE_MIN_ROWS - 1, torch.bfloat16)
            monkeypatch.setenv("LOWTUNE_CPU_GEMM", "auto")
            clear()
            assert ops.cpu_dense_gemm(512, torch.bfloat16) is native
        monkeypatch.setenv("LOWTUNE_CPU_GEMM", "fast")
        clear()
        with pytest.raises(ValueError, match="LOWTUNE_CPU_GEMM must be auto, packed or dense"):
            ops.cpu_dense_gemm(512, torch.float32)
    finally:
        monkeypatch.delenv("LOWTUNE_CPU_GEMM")
        clear()


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q6_K", "INT4-g64"])
def test_bf16_many_rows_through_bf16_panels(name, rng, random_blocks, monkeypatch):
    """Many bf16 rows, where the CPU multiplies bf16 natively: W dequantized to bf16 panels (one
    rounding of W, as the CUDA path's scratch), torch's bf16 GEMM (fp32 accumulation), each
    panel's part of dx added in bf16. Within (panels + 2) bf16 units of |x|·|W| of the exact
    product, and so near the packed path's result."""
    ops = lowtune.ops
    m, n, k = 70, 100, k_for(name, 3)
    monkeypatch.setattr(ops, "_cpu_bf16_gemm", lambda: True)
    monkeypatch.setattr(ops, "_cpu_gemm_setting", lambda: "auto")
    monkeypatch.setattr(ops, "_CPU_PANEL_FLOATS", 40 * k)           # panels of 40 rows: 3 of them
    assert ops.cpu_dense_gemm(m, torch.bfloat16)
    qt = random_qtensor(name, n, k, rng, random_blocks)
    w64 = lowtune.dequantize(qt).double().numpy()
    u = 2.0 ** -8
    x = activations(rng, (m, k), torch.bfloat16)
    y = lowtune.qmatmul(x, qt)
    assert y.dtype == torch.bfloat16
    xa = x.double().numpy()
    assert_within(y, xa @ w64.T, 2 * u * (np.abs(xa) @ np.abs(w64.T)) + 1e-30, "forward bf16 panels")
    dy = activations(rng, (m, n), torch.bfloat16)
    dx = lowtune.qmatmul_input_grad(dy, qt)
    assert dx.dtype == torch.bfloat16
    da = dy.double().numpy()
    assert_within(dx, da @ w64, (3 + 2) * u * (np.abs(da) @ np.abs(w64)) + 1e-30, "input grad bf16 panels")
