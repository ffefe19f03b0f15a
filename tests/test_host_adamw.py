"""AdamW with its moments in host memory (lowtune.host_adamw) against torch's fused AdamW: the same
parameters and state bit for bit, chunk boundaries and missing gradients included; checkpoints
in either direction."""
from __future__ import annotations

import pytest
import torch

import lowtune.host_adamw as host_adamw
from lowtune.host_adamw import HostAdamW, chunk_sizes, make_adamw, staging_bytes

from conftest import devices


def params(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(device) for shape in ((3, 5), (100, 7), (50,), (1,), (400, 3))]


def run(opt, ps, steps, seed=1, skip=None):
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for i, p in enumerate(ps):
            p.grad = None if (step, i) == skip else torch.randn(p.shape, generator=g).to(p.device)
        opt.step()


@pytest.mark.parametrize("device", devices())
def test_steps_equal_fused_adamw_bit_for_bit(device, monkeypatch):
    monkeypatch.setattr(host_adamw, "CHUNK_BYTES", 1024)     # several chunks, one parameter over
    ref, mine = params(device), params(device)
    a = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95), fused=True)
    b = HostAdamW(mine, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95))
    run(a, ref, 5, skip=(2, 1))
    run(b, mine, 5, skip=(2, 1))
    assert len(b._chunks[0]) >= 3
    for p, q in zip(ref, mine):
        assert torch.equal(p, q)
    sa, sb = a.state_dict(), b.state_dict()
    for i, s in sa["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(s[key].cpu(), sb["state"][i][key])
            assert sb["state"][i][key].device.type == "cpu"
        assert float(s["step"]) == float(sb["state"][i]["step"])
    # the moments live in host memory, pinned where the parameters are on a GPU
    state = b.state[mine[0]]
    assert state["exp_avg"].device.type == "cpu"
    assert state["exp_avg"].is_pinned() == (device == "cuda")


def test_checkpoints_load_either_way(monkeypatch):
    monkeypatch.setattr(host_adamw, "CHUNK_BYTES", 2048)
    ref, mine = params("cpu"), params("cpu")
    a = torch.optim.AdamW(ref, lr=1e-2, fused=True)
    b = HostAdamW(mine, lr=1e-2)
    run(a, ref, 3)
    run(b, mine, 3)
    # torch's state into a fresh HostAdamW (before its first step), and the other way round
    c_params = [p.clone() for p in ref]
    c = HostAdamW(c_params, lr=1e-2)
    c.load_state_dict(a.state_dict())
    d_params = [p.clone() for p in mine]
    d = torch.optim.AdamW(d_params, lr=1e-2, fused=True)
    d.load_state_dict(b.state_dict())
    run(a, ref, 2, seed=5)
    run(c, c_params, 2, seed=5)
    run(d, d_params, 2, seed=5)
    for p, q, r in zip(ref, c_params, d_params):
        assert torch.equal(p, q) and torch.equal(p, r)
    # into one that has stepped already: the host buffers take the values
    run(b, mine, 1, seed=9)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.state[mine[1]]["exp_avg"], a.state[ref[1]]["exp_avg"])
    with pytest.raises(ValueError, match="other parameters"):
        HostAdamW(params("cpu")[:2]).load_state_dict(a.state_dict())


def test_chunks_staging_and_the_factory():
    assert chunk_sizes([10, 20, 30]) == [60]
    big = host_adamw.CHUNK_BYTES
    assert chunk_sizes([big // 2, big // 2, 1, 3 * big, 5]) == [big, 1, 3 * big, 5]
    assert staging_bytes([big // 2, big // 2, 1, 3 * big, 5]) == 4 * 3 * big
    assert staging_bytes([]) == 0
    ps = params("cpu")
    assert isinstance(make_adamw(ps, True, lr=1e-3, fused=True), HostAdamW)
    assert type(make_adamw(ps, False, lr=1e-3)) is torch.optim.AdamW
    with pytest.raises(ValueError, match="fp32"):
        HostAdamW([torch.zeros(3, dtype=torch.bfloat16)]).step()
