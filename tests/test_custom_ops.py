"""The kernels as PyTorch custom ops (torch.ops.lowtune.*), checked by torch.library.opcheck:
schema (no undeclared mutation or aliasing), the fake implementation against the real one
(shapes, dtypes, strides), the autograd registration, and AOT dispatch with dynamic shapes
(forward and backward traced through the fake implementations, then run, equal to eager).

The ops' numerics are tested elsewhere (test_ops_cpu.py, test_adapters.py); here the point is
that torch.compile and CUDA graphs can see through them.
"""
from __future__ import annotations

import pytest
import torch

import lowtune
from lowtune import adapter_ops, ops
from lowtune.adapter_ops import AdapterGeometry
from lowtune.formats import get_format

from conftest import devices


def qtensor(qtype: str, n: int, k: int, rng, random_blocks) -> lowtune.QTensor:
    return lowtune.QTensor.from_raw(torch.from_numpy(random_blocks(get_format(qtype), n, k, rng)), qtype, (n, k))


def graph_nodes(fn) -> list[str]:
    """Names of the autograd nodes behind a grad_fn."""
    names, todo = [], [fn]
    while todo:
        f = todo.pop()
        if f is not None:
            names.append(f.name())
            todo.extend(g for g, _ in f.next_functions)
    return names


def opcheck(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qmatmul_ops(device, dtype, rng, random_blocks):
    qt = qtensor("Q4_K", 24, 256, rng, random_blocks).to(device)
    x = torch.randn(5, 256, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(5, 24, dtype=dtype, device=device, requires_grad=True)
    w = (qt.raw, qt.format.type_id, 24, 256)
    opcheck(torch.ops.lowtune.qmatmul.default, (x, *w))
    opcheck(torch.ops.lowtune.qmatmul_input_grad.default, (dy, *w))
    opcheck(torch.ops.lowtune.dequantize.default, (*w, dtype))


@pytest.mark.parametrize("device", devices())
def test_qmatmul_op_equals_its_eager_twin(device, rng, random_blocks):
    """Eager calls skip the dispatcher (an autograd.Function with the op's formula); the op,
    as torch.compile calls it, gives the same values and gradients."""
    qt = qtensor("Q5_1", 8, 64, rng, random_blocks).to(device)
    x = torch.randn(3, 64, device=device, requires_grad=True)
    y = lowtune.qmatmul(x, qt)
    assert "_QMatmulBackward" in graph_nodes(y.grad_fn)
    x2 = x.detach().clone().requires_grad_()
    y2 = ops.qmatmul_op(x2, qt.raw, qt.format.type_id, 8, 64)
    assert "GeneratedBackwardFor_lowtune_qmatmul_defaultBackward" in graph_nodes(y2.grad_fn)
    assert torch.equal(y, y2)
    dy = torch.randn_like(y)
    y.backward(dy)
    y2.backward(dy)
    assert torch.equal(x.grad, x2.grad)
    assert torch.equal(x.grad, lowtune.qmatmul_input_grad(dy, qt))
    with torch.no_grad():                           # no autograd: the kernel alone
        assert torch.equal(lowtune.qmatmul(x, qt), y)


# (method, k, n, pool, repeat, rank, rows of A, has_b, grad_from): one geometry per adapter method
GEOMETRIES = {
    "lora": (64, 48, 1, 1, 4, 4, True, 0),
    "qa-lora": (64, 48, 32, 1, 4, 4, True, 0),
    "q-bara": (64, 48, 2, 2, 8, 8, True, 0),
    "qa-hira": (64, 48, 32, 1, 48, 48, False, 0),
    "qdylora": (64, 48, 1, 1, 3, 6, True, 2),   # rank 3 of 6, DyLoRA's frozen mode
}


def adapter_args(method, device, dtype, m=5):
    k, n, pool, repeat, rank, rows, has_b, grad_from = GEOMETRIES[method]
    geom = AdapterGeometry(k, n, pool, repeat, rank, has_b, 0.5, grad_from)
    A = (torch.randn(rows, k // pool, device=device) * 0.1).requires_grad_()
    B = (torch.randn(n // repeat, rows, device=device) * 0.1).requires_grad_() if has_b else None
    x = torch.randn(m, k, dtype=dtype, device=device, requires_grad=True)
    return geom, x, A, B


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("method", sorted(GEOMETRIES))
@pytest.mark.parametrize("separate", [False, True], ids=["pooled-in-op", "dropout-input"])
def test_adapted_qmatmul_op(device, method, separate, rng, random_blocks):
    geom, x, A, B = adapter_args(method, device, torch.float32)
    qt = qtensor("Q4_1", geom.n, geom.k, rng, random_blocks).to(device)
    xa = torch.randn(x.shape[0], geom.k_pooled, device=device, requires_grad=True) if separate else None
    ints = adapter_ops._geom_ints(geom)
    opcheck(torch.ops.lowtune.adapted_qmatmul.default, (x, xa, A, B, qt.raw, qt.format.type_id, *ints))
    # its backward, called as autograd calls it (nothing requires grad there)
    with torch.no_grad():
        _, xs, u = adapter_ops.adapted_qmatmul_op(x, xa, A, B, qt.raw, qt.format.type_id, *ints)
    saved = xs if geom.pool > 1 and not separate else (xa if separate else x)
    dy = torch.randn(x.shape[0], geom.n, device=device)
    opcheck(torch.ops.lowtune.adapted_qmatmul_backward.default,
            (dy, saved.detach(), u, A.detach(), None if B is None else B.detach(), qt.raw,
             qt.format.type_id, *ints, separate, True, separate))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("method", sorted(GEOMETRIES))
def test_adapter_ops_equal_their_eager_twins(device, method, rng, random_blocks):
    geom, x, A, B = adapter_args(method, device, torch.float32)
    qt = qtensor("Q4_1", geom.n, geom.k, rng, random_blocks).to(device)
    ints = adapter_ops._geom_ints(geom)
    y = adapter_ops.adapted_qmatmul(x, qt, A, B, geom)        # eager: the autograd.Function twin
    leaves = [t.detach().clone().requires_grad_() for t in (x, A) + ((B,) if B is not None else ())]
    x2, A2, B2 = leaves[0], leaves[1], leaves[2] if B is not None else None
    y2, _, _ = adapter_ops.adapted_qmatmul_op(x2, None, A2, B2, qt.raw, qt.format.type_id, *ints)
    assert torch.equal(y, y2)
    dy = torch.randn_like(y)
    y.backward(dy)
    y2.backward(dy)
    for a, b in zip([t for t in (x, A, B) if t is not None], leaves):
        assert torch.equal(a.grad, b.grad)
    base = torch.randn(x.shape[0], geom.n, device=device, requires_grad=True)
    z = adapter_ops.adapter_accumulate(base, x, A, B, geom)
    z2, _, _ = adapter_ops.adapter_accumulate_op(base, x2, A2, B2, *ints, False)
    assert torch.equal(z, z2)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("method", sorted(GEOMETRIES))
def test_adapter_accumulate_op(device, method):
    geom, x, A, B = adapter_args(method, device, torch.bfloat16)
    y = torch.randn(x.shape[0], geom.n, dtype=x.dtype, device=device, requires_grad=True)
    ints = adapter_ops._geom_ints(geom)
    opcheck(torch.ops.lowtune.adapter_accumulate.default, (y, x, A, B, *ints, False))
    with torch.no_grad():
        _, xs, u = adapter_ops.adapter_accumulate_op(y, x, A, B, *ints, False)
    saved = xs if geom.pool > 1 else x
    opcheck(torch.ops.lowtune.adapter_backward.default,
            (y.detach().clone(), saved.detach(), u, A.detach(), None if B is None else B.detach(),
             *ints, False, True))


@pytest.mark.parametrize("device", devices())
def test_ops_use_the_fused_and_cublas_paths_alike(device, rng, random_blocks):
    """From the row count where the CUDA policy picks cuBLAS, the adapter products are cuBLAS GEMMs
    and u is kept in the activation dtype: the fake implementation must say so (on the CPU both
    sizes run the kernels)."""
    m = next(m for m in range(1, 4097) if lowtune._C.cuda_path("adapter", m, 2, True) == "cublas")
    geom, x, A, B = adapter_args("lora", device, torch.bfloat16, m=m)
    qt = qtensor("Q4_K", geom.n, 256, rng, random_blocks).to(device)
    geom = AdapterGeometry(256, geom.n, 1, 1, 4, True, 0.5)
    x = torch.randn(m, 256, dtype=torch.bfloat16, device=device, requires_grad=True)
    A = torch.randn(4, 256, device=device, requires_grad=True)
    opcheck(torch.ops.lowtune.adapted_qmatmul.default,
            (x, None, A, B, qt.raw, qt.format.type_id, *adapter_ops._geom_ints(geom)))


def test_ops_are_registered_in_the_lowtune_namespace():
    names = {"dequantize", "qmatmul", "qmatmul_input_grad", "adapted_qmatmul",
             "adapted_qmatmul_backward", "adapter_accumulate", "adapter_backward",
             "min_shifted_qmatmul", "min_shifted_qmatmul_backward"}
    for name in names:
        schema = getattr(torch.ops.lowtune, name).default._schema
        assert not schema.is_mutable, name
        assert all(a.alias_info is None for a in schema.arguments), name
    assert ops.qmatmul_op._opoverload is torch.ops.lowtune.qmatmul.default


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("qtype", ["Q4_1", "INT4-g64"])
def test_min_shifted_qmatmul_ops(device, qtype, rng, random_blocks):
    """lowtune.merge_exact's matmul on the merged blocks: the op and its backward, and the eager twin
    equal to the op."""
    from lowtune import merge_exact
    qt = qtensor(qtype, 16, 128, rng, random_blocks).to(device)
    g = qt.format.block_elems
    x = torch.randn(5, 128, device=device, requires_grad=True)
    delta = (torch.randn(16, 128 // g, device=device) * 0.01).requires_grad_(True)
    args = (qt.raw, qt.format.type_id, 16, 128, g, qt.format.block_bytes)
    opcheck(torch.ops.lowtune.min_shifted_qmatmul.default, (x, delta, *args))
    dy = torch.randn(5, 16, device=device)
    xsum = merge_exact.block_sums(x.detach(), g)
    opcheck(torch.ops.lowtune.min_shifted_qmatmul_backward.default, (dy, xsum, delta.detach(), *args, True))
    y = merge_exact.min_shifted_qmatmul(x, qt, delta)
    assert "_MinShiftedQMatmulBackward" in graph_nodes(y.grad_fn)
    y.backward(dy)
    x2, d2 = x.detach().clone().requires_grad_(True), delta.detach().clone().requires_grad_(True)
    y2, _ = torch.ops.lowtune.min_shifted_qmatmul(x2, d2, *args)
    y2.backward(dy)
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad) and torch.equal(delta.grad, d2.grad)
