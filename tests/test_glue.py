"""lowtune.glue_ops on the CPU: the formulas run with or without autograd (the fused kernels are
CUDA-only), and bad arguments say what is wrong. The kernels are tested in test_glue_cuda.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowtune import glue_ops


def test_cpu_runs_the_formulas_with_and_without_autograd():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g).to(torch.bfloat16)
    w = torch.rand(8, generator=g) + 0.5
    want = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5) * w).to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(glue_ops.rms_norm(x, w, 1e-5), want)
    torch.testing.assert_close(glue_ops.rms_norm(x, w, 1e-5), want)
    a, u = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    with torch.no_grad():
        assert torch.equal(glue_ops.gated("silu", a, u), F.silu(a) * u)
        assert torch.equal(glue_ops.gated("gelu_tanh", a, u), F.gelu(a, approximate="tanh") * u)


def test_rope_rotates_pairs_and_keeps_the_unrotated_dims():
    x = torch.arange(16.0).reshape(1, 1, 2, 8)
    rot = torch.zeros(2, 2, 4)
    rot[1] = torch.tensor([-1.0, 1.0, -1.0, 1.0])  # 90 degrees: (a, b) -> (-b, a)
    with torch.no_grad():
        y = glue_ops.rope(x, rot, "norm")
    assert y[0, 0, 0].tolist() == [-1.0, 0.0, -3.0, 2.0, 4.0, 5.0, 6.0, 7.0]
    with pytest.raises(ValueError, match="unknown rope style"):
        glue_ops.rope(x, rot, "gptj")
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        glue_ops.gated("relu", x, x)
