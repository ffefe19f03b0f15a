"""Layer streaming (lowtune.streaming) against the resident model: the same losses, adapter
gradients, logits and generations; the planner's decisions and its error below the minimum."""
from __future__ import annotations

import pytest
import torch

from lowtune import adapters
from lowtune.model import LlamaModel
from lowtune.streaming import estimate_memory, plan_streaming, stream_model

from conftest import devices
from helpers import fill_adapters, gguf_weights, rand_ids, resident_and_streamed, tiny_config, tiny_weights


def adapted_model(method="lora", device="cpu", dtype=torch.float32, layers=4, dropout=0.0,
                  qtype="Q4_1", seed=0, tied=True):
    """A tiny packed Llama (on the CPU, as loaded for streaming) with adapters whose every matrix
    is non-zero, so every gradient path carries signal."""
    c = tiny_config(layers=layers)
    model = LlamaModel(c, gguf_weights(c, tiny_weights(c, seed, tied=tied), qtype), dtype).eval()
    adapters.apply_adapters(model, adapters.AdapterConfig(method=method, rank=4, alpha=8,
                                                          dropout=dropout, seed=seed))
    adapters.mark_only_adapters_trainable(model)
    fill_adapters(model, torch.Generator().manual_seed(seed + 1))
    return model


def step_losses(model, ids, steps=3, lr=1e-2):
    """Losses of `steps` AdamW steps and the adapter gradients of the first one."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses, first = [], None
    torch.manual_seed(7)
    for _ in range(steps):
        loss = model.loss(ids)
        loss.backward()
        losses.append(float(loss.detach()))
        if first is None:
            first = {n: p.grad.detach().float().cpu().clone()
                     for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, first


def assert_trains_alike(resident, streaming, ids) -> None:
    """The streamed model's losses and first adapter gradients are the resident one's (step_losses)."""
    want, want_g = step_losses(resident, ids)
    got, got_g = step_losses(streaming, ids)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
    for key in want_g:
        torch.testing.assert_close(got_g[key], want_g[key], rtol=1e-5, atol=1e-6, msg=key)


def pair(method, device, streamed, dropout=0.0, offload=False, dtype=torch.float32, tied=True):
    return resident_and_streamed(lambda: adapted_model(method, dropout=dropout, dtype=dtype, tied=tied), device, streamed,
                                 offload_activations=offload)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("method,streamed,dropout", [
    ("lora", [0, 1, 2, 3], 0.0),      # every layer streams through the two slots
    ("qa-hira", [0, 1], 0.0),         # first layers stream, last ones resident
    ("q-bara", [1, 3], 0.1),          # interleaved, with dropout (RNG replayed in recompute)
    ("qdylora", [0, 2, 3], 0.0),
])
def test_streamed_training_equals_resident(device, method, streamed, dropout):
    # half the cases with an untied embedding, which stays in host memory on a GPU
    tied = method in ("lora", "q-bara")
    resident, streaming, plan = pair(method, device, streamed, dropout, tied=tied)
    assert plan.streamed == sorted(streamed)
    ids = rand_ids(2, 24).to(device)
    want, want_g = step_losses(resident, ids)
    got, got_g = step_losses(streaming, ids)
    tol = dict(rtol=1e-5, atol=1e-6) if device == "cpu" else dict(rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), **tol)
    assert set(got_g) == set(want_g)
    for name in want_g:
        torch.testing.assert_close(got_g[name], want_g[name], **tol, msg=name)
    s = streaming.streamer
    # each step copies every streamed layer in for forward and again for backward, at most;
    # layers that fit in the slots together are copied once and stay
    per_step = sum(s.packs[i].nbytes for i in streamed)
    if len(streamed) > len(s.slots):
        assert per_step < s.bytes_copied <= 3 * 2 * per_step
    else:
        assert s.bytes_copied == per_step
    # between steps the streamed layers' blocks are back in host memory, resident ones on device;
    # the (untied) token embedding stays in host memory on a GPU
    assert plan.embedding_on_host == (device != "cpu" and not tied)
    assert streaming.device.type == torch.device(device).type
    assert streaming.tok_embd.raw.device.type == ("cpu" if plan.embedding_on_host else streaming.device.type)
    for i, layer in enumerate(streaming.layers):
        for lin in (layer.attn_q.base, layer.ffn_down.base):
            assert lin.raw.device.type == ("cpu" if i in streamed else torch.device(device).type)


@pytest.mark.parametrize("device", devices())
def test_streamed_logits_and_generation_equal_resident(device):
    resident, streaming, _ = pair("lora", device, [0, 1, 3])
    ids = rand_ids(2, 16).to(device)
    with torch.no_grad():
        torch.testing.assert_close(streaming(ids), resident(ids), rtol=1e-5, atol=1e-5)
        # with a KV cache: prompt, then token by token
        outs = []
        for m in (resident, streaming):
            cache = m.new_cache(batch=2, max_len=32)
            logits = [m(ids[:, :10], cache)[:, -1]]
            for t in range(10, 16):
                logits.append(m(ids[:, t:t + 1], cache)[:, -1])
            outs.append(torch.stack(logits))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_offloaded_activations_equal_resident_on_gpu():
    resident, streaming, plan = pair("lora", "cuda", [0, 1, 2, 3], offload=True,
                                     dtype=torch.bfloat16)
    assert plan.offload_activations and streaming.streamer.offload_activations
    ids = rand_ids(2, 24).to("cuda")
    want, want_g = step_losses(resident, ids)
    got, got_g = step_losses(streaming, ids)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-3, atol=1e-4)
    for name in want_g:
        torch.testing.assert_close(got_g[name], want_g[name], rtol=2e-2, atol=1e-4, msg=name)


def test_planner_budgets():
    model = adapted_model(layers=6)
    est = plan_streaming(model, "cpu", 1 << 40, tokens=256)
    assert not est.streaming and est.resident == list(range(6))
    need_all = est.estimate["total"]
    # less than everything: some layers stream, the last ones stay resident
    budget = need_all - est.estimate["resident_layers"] // 2
    some = plan_streaming(model, "cpu", budget, tokens=256)
    assert some.streaming and some.estimate["total"] <= budget
    assert 0 < len(some.resident) < 6 and some.resident == list(range(6 - len(some.resident), 6))
    # more budget never chunks the MLP more, nor (at as many chunks) keeps fewer layers resident
    counts = []
    for b in range(need_all // 4, need_all, need_all // 40):
        try:
            p = plan_streaming(model, "cpu", b, tokens=256)
        except ValueError:
            assert not counts, "a larger budget was refused after a smaller one was accepted"
            continue
        counts.append((-p.mlp_chunks, len(p.resident)))
    assert len(counts) > 5 and counts == sorted(counts) and counts[0] < counts[-1]
    # below the minimum: a clear error that gives it
    with pytest.raises(ValueError, match=r"at least \d+MB"):
        plan_streaming(model, "cpu", 1 << 20, tokens=256)


def test_stream_model_refuses_weights_already_on_gpu_or_bad_layers():
    model = adapted_model()
    with pytest.raises(ValueError, match="do not exist"):
        stream_model(model, "cpu", streamed=[7])
    with pytest.raises(ValueError, match="max_vram"):
        stream_model(model, "cpu")


def test_lrec_teacher_and_student_streamed_in_one_budget():
    """lowtune correct --max-vram: the teacher streams every layer, the student is planned in
    what is left; the distillation loss and its adapter gradients are unchanged."""
    from lowtune.correct import DistillationModel, _stream_pair
    c = tiny_config(layers=4)
    hf = tiny_weights(c, 3)

    def pair_models():
        teacher = LlamaModel(c, gguf_weights(c, hf, "F32"), torch.float32).eval()
        student = adapted_model(layers=4, seed=3)
        return DistillationModel(student, teacher, kl_weight=1.0, ce_weight=0.25, kl_chunk=7)

    ids = rand_ids(2, 20)
    plain, streamed = pair_models(), pair_models()
    plain.student.gradient_checkpointing = True
    # a budget one byte short of the teacher's share and the whole student (at the LM-head chunk
    # a budget of this size gets)
    e = estimate_memory(streamed.teacher, 40, streamed.teacher.loss_chunk_tokens)
    teacher_need = e["fixed"] + 2 * max(e["layers"]) + e["working"] // 2 + e["checkpoint"]
    student_all = plan_streaming(streamed.student, "cpu", 1 << 20, tokens=40)
    assert not student_all.streaming
    info = _stream_pair(streamed.student, streamed.teacher, torch.device("cpu"), torch.device("cpu"),
                        teacher_need + student_all.estimate["total"] - 1, tokens=40, log=lambda s: None)
    assert info["teacher"]["streamed"] == [0, 1, 2, 3]
    assert streamed.student.streamer is not None  # the teacher's share pushed the student below all
    results = []
    for dm in (plain, streamed):
        dm.train()
        loss = dm.loss(ids, reduction="sum")
        loss.backward()
        results.append((float(loss.detach()), {n: p.grad.clone() for n, p in dm.named_parameters()
                                               if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert l1 == pytest.approx(l0, rel=1e-6) and set(g0) == set(g1) and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)
    assert streamed.teacher.streamer.bytes_copied > 0


@pytest.mark.parametrize("streamed,chunks", [([0, 1, 2, 3], 4), ([], 3), ([1, 2], 2)])
def test_mlp_in_token_chunks_trains_as_the_whole_mlp(streamed, chunks):
    # 2 x 33 rows in 4 or 3 chunks: uneven chunks too; [] streams nothing, the layers resident
    ids = rand_ids(2, 33)
    whole = adapted_model()
    stream_model(whole, "cpu", streamed=streamed)
    want, want_g = step_losses(whole, ids)
    chunked = adapted_model()
    plan = stream_model(chunked, "cpu", streamed=streamed, mlp_chunks=chunks)
    assert plan.mlp_chunks == chunks and all(layer.mlp_chunks == chunks for layer in chunked.layers)
    got, got_g = step_losses(chunked, ids)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-6, atol=1e-6)
    for name in want_g:
        torch.testing.assert_close(got_g[name], want_g[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_chunked_layer_backward_equals_autograd_through_the_whole_layer():
    model = adapted_model().train()
    layer = model.layers[1]
    x = torch.randn(2, 9, model.config.dim, generator=torch.Generator().manual_seed(3))
    rot = model.rope_rotation(0, 9)
    dy = torch.randn_like(x)
    params = [p for p in layer.parameters() if p.requires_grad]
    xg = x.clone().requires_grad_()
    want = torch.autograd.grad(layer(xg, rot), [xg] + params, dy)
    with torch.no_grad():
        y = layer(x, rot)
    layer.mlp_chunks = 4
    with torch.no_grad():                      # the forward without autograd runs in chunks
        torch.testing.assert_close(layer(x, rot), y, rtol=1e-6, atol=1e-6)
    xg = x.clone().requires_grad_()
    got = layer.checkpoint_backward(xg, rot, dy, [xg] + params)
    # the chunks' weight gradients are sums of 4 partial products: fp32 rounding in another order
    # (torch 2.13's CPU GEMM: 1.7e-6 off on a gradient of 0.02), where a lost chunk would be 25% off
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    # only the MLP's adapters and x get gradients from the chunks; a frozen input gets None
    got = layer.checkpoint_backward(x, rot, dy, params)
    for g, w in zip(got, want[1:]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_a_chunked_layer_backward_keeps_the_norms_fp32_inputs_one_chunk_at_a_time():
    model = adapted_model(dtype=torch.bfloat16).train()
    layer, t = model.layers[1], 12
    x = torch.randn(2, t, model.config.dim, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(4))
    rot, dy = model.rope_rotation(0, t), torch.randn_like(x)
    params = [p for p in layer.parameters() if p.requires_grad]
    fp32_rows = []

    def pack(saved):
        if saved.dtype == torch.float32 and saved.dim() >= 2 and saved.shape[-1] == model.config.dim:
            fp32_rows.append(saved.numel() // saved.shape[-1])
        return saved

    grads = {}
    for chunks in (1, 3):
        layer.mlp_chunks = chunks
        xg = x.clone().requires_grad_()
        fp32_rows.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
            grads[chunks] = layer.checkpoint_backward(xg, rot, dy, [xg] + params)
        # unchunked, both norms keep their fp32 input of all 2 x 12 rows; in 3 chunks, of 8 rows
        assert max(fp32_rows) == (2 * t if chunks == 1 else 2 * t // 3)
    for g, w in zip(grads[3], grads[1]):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


def test_estimated_working_set_shrinks_with_mlp_chunks_and_a_measured_one_is_not_extrapolated():
    model = adapted_model()
    e = {n: estimate_memory(model, 256, 64, mlp_chunks=n)["working"] for n in (1, 2, 4)}
    c = model.config
    # the MLP's seven [rows, F] tensors shrink with the rows, and so do ffn_norm's fp32 input and
    # normed output [rows, D] and attn_norm's fp32 input; the gathered [T, D] gradient comes on top
    assert e[1] - e[2] == 128 * 4 * 7 * c.ffn_dim + 128 * c.dim * (4 + 4 + 4) - 256 * c.dim * 4
    assert e[1] > e[2] > e[4]
    assert estimate_memory(model, 256, 64, working={1: 10, 4: 7}, mlp_chunks=4)["working"] == 7
    with pytest.raises(ValueError, match="chunk"):
        estimate_memory(model, 256, 64, working=10, mlp_chunks=2)
    # a measured working set without chunked ones leaves the MLP whole
    p = plan_streaming(model, "cpu", 1 << 30, tokens=256, working=12345)
    assert p.mlp_chunks == 1
