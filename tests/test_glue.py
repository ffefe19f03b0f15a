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


def test_rope_store_writes_the_rotated_keys_and_the_values_at_pos():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 4, 1, 8, generator=g), torch.randn(1, 2, 1, 8, generator=g), torch.randn(1, 2, 1, 8, generator=g)
    rot = torch.randn(2, 1, 8, generator=g)
    kc, vc = torch.zeros(1, 2, 6, 8), torch.zeros(1, 2, 6, 8)
    with torch.no_grad():
        got = glue_ops.rope_store(q, k, v, rot, "neox", kc, vc, torch.tensor([3]))
    assert torch.equal(got, glue_ops.rope(q, rot, "neox"))
    assert torch.equal(kc[:, :, 3:4], glue_ops.rope(k, rot, "neox")) and torch.equal(vc[:, :, 3:4], v)
    assert kc[:, :, [0, 1, 2, 4, 5]].abs().sum() == 0 and vc[:, :, [0, 1, 2, 4, 5]].abs().sum() == 0


def test_add_rms_norm_is_the_add_then_the_norm():
    g = torch.Generator().manual_seed(2)
    x, r = torch.randn(3, 16, generator=g).to(torch.bfloat16), torch.randn(3, 16, generator=g).to(torch.bfloat16)
    w = torch.rand(16, generator=g) + 0.5
    with torch.no_grad():
        s, y = glue_ops.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(s, x + r) and torch.equal(y, glue_ops.rms_norm(x + r, w, 1e-6))


@pytest.mark.parametrize("h,hkv", [(4, 4), (6, 2)])
def test_decode_attention_formula_is_sdpa_over_the_filled_positions(h, hkv):
    g = torch.Generator().manual_seed(h + hkv)
    length, pos, hd = 12, 7, 16
    q = torch.randn(1, h, 1, hd, generator=g)
    kc, vc = (torch.randn(1, hkv, length, hd, generator=g) for _ in range(2))
    assert not glue_ops.decode_attention_fused(q, kc, vc, torch.tensor([pos]))  # the CPU: the formula
    got = glue_ops.decode_attention(q, kc, vc, torch.tensor([pos]), 0.3)
    k, v = (c[:, :, :pos + 1].repeat_interleave(h // hkv, dim=1) for c in (kc, vc))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
