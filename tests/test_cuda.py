"""CUDA kernels against their twins: the CPU kernels (dequantize, bit for bit), the reference
CUDA kernels, and a float64 matmul of the exactly dequantized weight.

Weights are random block bytes (every code, every scale byte) with random finite fp16
scales and mins written over the fp16 fields, so no quantizer is involved. Every run draws
fresh inputs. Outputs are poisoned with NaN before each launch, so an element the kernel
never wrote fails the test. Shapes cover M = 1, the fused small-M kernels (M <= 32, split and
unsplit reductions), the chunked cuBLAS path (M > 32, and many chunks), and tails in M, N, K.
Runtime on an H100: about 15 s (skipped where no GPU is present).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lowtune
from lowtune import _C
from lowtune.formats import FORMATS, get_format

pytestmark = pytest.mark.cuda

QUANT_TYPES = sorted(f.name for f in FORMATS.values() if f.quantized)
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
# ‖out − ref‖ / ‖ref‖ allowed, by activation dtype: fp32 accumulation of exact products for
# fp32; for 16-bit activations the weight is rounded to that dtype (as cuBLAS on a dequantized
# copy would) and so is the output.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# Byte offsets of the fp16 fields (scales and mins) inside one block.
HALF_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
               "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
               "IQ4_NL": (0,), "IQ4_XS": (0,), "IQ3_XXS": (0,), "IQ3_S": (0,), "IQ2_XXS": (0,),
               "IQ2_XS": (0,), "IQ2_S": (0,), "IQ1_S": (0,), "IQ1_M": ()}
# IQ1_M keeps its fp16 d in the top nibbles of the four u16 scale words at this byte offset.
SPLIT_HALF_FIELDS = {"IQ1_M": 48}


def random_blocks(name: str, n: int, k: int, gen: np.random.Generator) -> torch.Tensor:
    """uint8 [n, row_bytes(k)]: random codes and scale bytes, finite random fp16 scales/mins."""
    fmt = get_format(name)
    nb = k // fmt.block_elems
    raw = gen.integers(0, 256, size=(n, nb, fmt.block_bytes), dtype=np.uint8)
    for off in HALF_FIELDS.get(fmt.name, (0, 2)):
        vals = (gen.standard_normal((n, nb)) * 0.01).astype(np.float16)
        raw[:, :, off:off + 2] = vals.view(np.uint8).reshape(n, nb, 2)
    if fmt.name in SPLIT_HALF_FIELDS:
        off = SPLIT_HALF_FIELDS[fmt.name]
        d = (gen.standard_normal((n, nb, 1)) * 0.01).astype(np.float16).view(np.uint16)
        words = np.ascontiguousarray(raw[:, :, off:off + 8]).view("<u2")
        words = (words & 0x0FFF) | (((d >> (4 * np.arange(4, dtype=np.uint16))) & 0xF) << 12)
        raw[:, :, off:off + 8] = words.astype("<u2").view(np.uint8)
    return torch.from_numpy(raw.reshape(n, nb * fmt.block_bytes))


def dequant_cpu(raw: torch.Tensor, name: str, n: int, k: int) -> torch.Tensor:
    out = torch.empty((n, k), dtype=torch.float32)
    _C.dequantize(get_format(name).type_id, raw.data_ptr(), out.data_ptr(), 0, n, k)
    return out


def nan_like(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    return float((out64 - ref64).norm() / ref64.norm())


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
                                  "INT3-g128", "INT6-g32"])
def test_reference_kernels_agree(name, direction, gen):
    """The slow reference CUDA kernels on the same shapes and tolerance (small shapes: they are slow)."""
    check_matmul(name, torch.bfloat16, gen, direction, shapes=[(1, 37, 3), (20, 70, 16)], ref_kernel=True)


@pytest.mark.parametrize("direction", ["forward", "input_grad"])
def test_small_m_on_a_model_sized_weight(direction, gen):
    """A Llama-8B-sized weight: the fused kernels at their largest shared-memory slices and splits."""
    check_matmul("Q4_K", torch.bfloat16, gen, direction, shapes=[(1, 14336, 128), (32, 14336, 128)])


@pytest.mark.parametrize("direction", ["forward", "input_grad"])
def test_chunked_path_many_chunks(direction, gen, monkeypatch):
    """A 1 MiB scratch budget forces several row/column chunks, with a ragged last one."""
    monkeypatch.setenv("LOWTUNE_CUDA_SCRATCH_MB", "1")
    for dtype in DTYPES:
        check_matmul("Q4_K", dtype, gen, direction, shapes=[(100, 600, 64)])


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
