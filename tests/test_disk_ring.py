"""Layers read from the model file through a ring of buffers (lowtune.disk_ring): the right bytes
in any order, reads ahead in the bounce order a training step asks for, never more buffers than
the ring has, a clear error for a truncated file; and training with layers streamed from a GGUF
on disk equals resident training, within a host-memory limit the planner keeps."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from lowtune import adapters, load_model
from lowtune.disk_ring import DiskLayers, DiskRing
from lowtune.streaming import plan_host, plan_streaming

from helpers import fill_adapters, rand_ids, resident_and_streamed, write_tiny_llama_gguf

N_LAYERS, LAYER = 6, 3000


@pytest.fixture
def layer_file(tmp_path):
    """A file of random bytes and, for each layer, two ranges of it packed at offsets 0 and 1536."""
    data = np.random.default_rng(0).integers(0, 256, size=N_LAYERS * LAYER + 100, dtype=np.uint8)
    path = tmp_path / "layers.bin"
    path.write_bytes(data.tobytes())
    ranges = {i: [(100 + i * LAYER, 1500, 0), (100 + i * LAYER + 1500, LAYER - 1500, 1536)]
              for i in range(N_LAYERS)}

    def same(buf, i):
        """Whether a layer's pack holds its bytes (the alignment gap between ranges is free)."""
        got = buf.numpy()
        return len(got) == 1536 + LAYER - 1500 and all(
            np.array_equal(got[dst:dst + n], data[off:off + n]) for off, n, dst in ranges[i])
    return path, ranges, same


def bounce(layers, steps):
    """(layer, direction) in the order a training step streams them: forward, then backward."""
    out = []
    for _ in range(steps):
        out += [(i, 1) for i in layers] + [(i, -1) for i in reversed(layers)]
    return out


def test_reads_every_layer_in_the_bounce_order_ahead_and_within_its_buffers(layer_file):
    path, ranges, same = layer_file
    ring = DiskRing(path, ranges, n_buffers=3)
    try:
        for layer, direction in bounce(list(range(N_LAYERS)), 2):
            buf = ring.get(layer, direction)
            assert same(buf, layer)
            ring.release(layer)
        s = ring.stats()
        # twice per step, and reads ahead stop at the ring's size
        assert s["reads"] >= 2 * 2 * N_LAYERS and s["reads"] <= 2 * 2 * N_LAYERS + 3
        assert s["mispredictions"] == 0 and s["max_busy"] <= 3
        assert s["bytes_read"] == s["reads"] * (1536 + LAYER - 1500)
        # a consumer that holds its buffer stops the reads ahead at the ring's size
        ring.get(2, 1)
        time.sleep(0.2)
        assert ring.stats()["max_busy"] <= 3
        ring.release(2)
    finally:
        ring.close()


def test_turns_skip_what_the_gpu_slots_still_hold(layer_file):
    path, ranges, same = layer_file
    disk = DiskLayers(str(path), [0, 1, 2, 3], ranges)
    # streamed 0..5, the last two from host memory: the turn to backward finds 4, 5 in the slots
    # (not read from disk), the turn to the next forward finds 0 and 1 there
    ring = disk.ring(list(range(N_LAYERS)), pin=False)
    try:
        asks = [(0, 1), (1, 1), (2, 1), (3, 1), (3, -1), (2, -1), (1, -1), (0, -1), (2, 1), (3, 1)]
        for layer, direction in asks:
            assert same(ring.get(layer, direction), layer)
            ring.release(layer)
        assert ring.stats()["mispredictions"] == 0
    finally:
        ring.close()


def test_any_order_gets_the_right_bytes(layer_file):
    path, ranges, same = layer_file
    ring = DiskRing(path, ranges, n_buffers=2)
    try:
        order = np.random.default_rng(1).integers(0, N_LAYERS, size=25)
        for layer in order:
            buf = ring.get(int(layer), 1)
            assert same(buf, int(layer))
            ring.release(int(layer))
        assert ring.stats()["mispredictions"] > 0
        with pytest.raises(KeyError):
            ring.get(N_LAYERS + 1)
    finally:
        ring.close()


def test_a_truncated_file_is_an_error_that_says_so(layer_file):
    path, ranges, _ = layer_file
    with pytest.raises(ValueError, match="truncated"):
        DiskRing(path, {0: [(os.path.getsize(path) - 10, 20, 0)]})
    ring = DiskRing(path, ranges, n_buffers=2)
    try:
        os.truncate(path, 100 + 2 * LAYER)        # layers 2.. are gone now
        with pytest.raises(OSError, match="truncated"):
            for layer in range(N_LAYERS):
                ring.get(layer, 1)
                ring.release(layer)
    finally:
        ring.close()


def tiny_gguf_model(path, layers=4):
    model = load_model(path, device="cpu", dtype=torch.float32)
    adapters.apply_adapters(model, adapters.AdapterConfig(method="lora", rank=4, alpha=8, seed=0))
    adapters.mark_only_adapters_trainable(model)
    fill_adapters(model, torch.Generator().manual_seed(1))
    return model


def losses(model, ids, steps=2):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    out = []
    for _ in range(steps):
        loss = model.loss(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(float(loss.detach()))
    return out


def test_training_from_the_file_equals_resident(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", "Q4_1", layers=4)
    resident, streamed, _ = resident_and_streamed(lambda: tiny_gguf_model(path), "cpu", [0, 1, 2, 3],
                                                  disk_layers=[0, 1, 2], source=path)
    ids = rand_ids(2, 20, vocab=resident.config.vocab_size)
    assert losses(streamed, ids) == pytest.approx(losses(resident, ids), rel=1e-6)
    s = streamed.streamer
    assert s.packs[3].buffer is not None and s.packs[0].buffer is None
    stats = s.ring.stats()
    # step 1: 0, 1, 2 forward, 1, 0 backward (2 and 3 are still in the slots); step 2: 2 forward
    # (0 and 1 are), 1, 0 backward; the reads ahead follow the turns without a miss
    assert stats["reads"] >= 8 and stats["bytes_read"] > 0 and stats["mispredictions"] == 0
    # between steps a disk layer's blocks are the file's again (views of the mapping)
    lin = streamed.layers[0].attn_q.base
    assert lin.raw.data_ptr() == s.packs[0].home[s.packs[0].linears.index(lin)].data_ptr()


def test_host_ram_plan_keeps_the_latest_streamed_layers_and_gives_its_minimum(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", "Q4_1", layers=6)
    model = tiny_gguf_model(path)
    plan = plan_streaming(model, "cpu", 1 << 30, tokens=32)
    plan.streamed, plan.resident = [0, 1, 2, 3, 4], [5]
    layer = plan.layer_bytes
    plan_host(plan, model, 5 * layer)
    assert plan.disk_layers == [] and plan.host["ring"] == 0
    plan_host(plan, model, int(4.5 * layer))       # the ring takes three layers' room, one pack fits
    assert plan.disk_layers == [0, 1, 2, 3] and plan.host["ring_buffers"] == 3
    assert plan.host["total"] == 4 * layer <= 4.5 * layer
    with pytest.raises(ValueError, match=r"at least \d+MB"):
        plan_host(plan, model, 2 * layer)


@pytest.mark.cuda
def test_training_from_the_file_on_the_gpu_equals_resident(tmp_path):
    """Pinned ring buffers, copies on the streamer's side stream, refills after their events."""
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", "Q4_K", layers=6, dim=256, ffn=512, heads=4,
                                 kv_heads=2)
    resident, streamed, _ = resident_and_streamed(lambda: tiny_gguf_model(path), "cuda", [0, 1, 2, 3, 4],
                                                  disk_layers=[0, 1, 2, 3], source=path)
    assert streamed.streamer.ring.buffers[0].is_pinned()
    ids = rand_ids(2, 32, vocab=resident.config.vocab_size).to("cuda")
    got, want = losses(streamed, ids, steps=3), losses(resident, ids, steps=3)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
    assert streamed.streamer.ring.stats()["mispredictions"] == 0
