"""The GPU budget in the driver's terms (lowtune.memory_budget) and the streaming planner on top of
it: what a process sets before CUDA starts, the arithmetic of the terms, and plans that keep the
driver's total within the budget, move AdamW's state to the host or drop CUDA graphs only when
that is what fits, and refuse with a minimum that is itself a budget that works."""
from __future__ import annotations

import dataclasses
import os
import re

import pytest
import torch

from lowtune import adapters
from lowtune import memory_budget
from lowtune.memory_budget import (GRAPH_EXEC_BYTES, MIB, STACK_BYTES, DeviceBudget, attention_workspace,
                                   prepare_process, set_stack_limit, stack_bytes_setting, stack_limit,
                                   workspace_per_stream)
from lowtune.model import LlamaModel
from lowtune.streaming import WORKING_MARGIN, plan_streaming, stream_model

from helpers import gguf_weights, tiny_config, tiny_weights


def model(layers=6, tied=True):
    c = tiny_config(layers=layers)
    m = LlamaModel(c, gguf_weights(c, tiny_weights(c, 0, tied=tied), "Q4_1"), torch.bfloat16)
    adapters.apply_adapters(m, adapters.AdapterConfig(method="lora", rank=4, alpha=8, seed=0))
    adapters.mark_only_adapters_trainable(m)
    return m


def budget_for(total: int, **kw) -> DeviceBudget:
    """A CUDA budget with small made-up terms, in proportion to the tiny model."""
    terms = dict(context=300_000, workspaces={"torch_cublas": 20_000, "torch_cublaslt": 20_000,
                                              "lowtune_cublas": 10_000},
                 slack_share=0.03, slack_fixed=30_000, slack_per_stream=5_000, margin=20_000, device="cuda:0")
    terms.update(kw)
    return DeviceBudget(budget=int(total), **terms)


def test_prepare_process_sets_workspaces_and_allocator_but_keeps_what_is_set():
    env = {"LOWTUNE_CUBLAS_WORKSPACE_MB": "4"}
    got = prepare_process(env)
    assert env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:1" and env["CUBLASLT_WORKSPACE_SIZE"] == "4096"
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True" and got == {k: env[k] for k in got}
    ws = workspace_per_stream(env)
    assert ws == {"torch_cublas": 4 * MIB, "torch_cublaslt": 4 * MIB, "lowtune_cublas": 4 * MIB}
    mine = {"CUBLAS_WORKSPACE_CONFIG": ":4096:2:16:8", "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}
    prepare_process(mine)
    assert mine["CUBLAS_WORKSPACE_CONFIG"] == ":4096:2:16:8"           # the user's, as torch parses it
    assert workspace_per_stream(mine)["torch_cublas"] == 4096 * 1024 * 2 + 16 * 1024 * 8
    assert mine["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:64"
    # an unprepared process is counted at torch's largest defaults
    assert workspace_per_stream({})["torch_cublas"] == 32 * MIB
    with pytest.raises(ValueError, match="LOWTUNE_CUBLAS_WORKSPACE_MB"):
        prepare_process({"LOWTUNE_CUBLAS_WORKSPACE_MB": "lots"})


def test_driver_total_is_the_sum_of_its_terms_and_tensor_room_its_inverse():
    db = budget_for(10_000_000)
    one = db.total(4_000_000, scratch=100_000, graphs=False)
    assert one["total"] == (4_000_000 + 300_000 + 50_000 + 100_000 + 30_000 + 5_000 + 20_000
                            + round(0.03 * 4_000_000))
    graphs = db.total(4_000_000, scratch=100_000, graphs=True)
    # graphs: workspaces and slack tails of two streams, the capture arena beside the pool
    assert graphs["total"] - one["total"] == 50_000 + 100_000 + 5_000
    for g in (False, True):
        room = db.tensor_room(scratch=100_000, graphs=g)
        assert db.total(room, 100_000, g)["fits"]
        assert not db.total(room + 1000, 100_000, g)["fits"]
    # on the CPU the budget bounds the tensors alone
    cpu = DeviceBudget.unmetered(5000)
    assert cpu.total(4000)["total"] == 4000 and cpu.tensor_room() == 5000
    assert attention_workspace(2048, 32, 128) == 2048 * 32 * (128 * 4 + 8)
    with pytest.raises(ValueError, match="CUDA"):
        DeviceBudget.measure("cpu", "auto")


def test_plans_stay_within_the_driver_budget_and_grow_with_it():
    m = model()
    full = plan_streaming(m, "cuda", 1 << 40, tokens=256, device_budget=budget_for(1 << 40))
    need = full.driver["total"]
    assert not full.streaming and not full.optimizer_on_host
    counts = []
    for b in range(need // 5, need + need // 10, need // 40):
        try:
            p = plan_streaming(m, "cuda", b, tokens=256, device_budget=budget_for(b))
        except ValueError:
            assert not counts, "a larger budget was refused after a smaller one was accepted"
            continue
        assert p.driver["total"] <= b and p.driver["fits"]
        assert p.estimate["total"] == p.driver["tensors"]
        counts.append((-p.mlp_chunks, len(p.resident), not p.optimizer_on_host))
    assert len(counts) > 5 and counts == sorted(counts) and counts[0] < counts[-1]


def test_refusal_gives_a_minimum_in_driver_terms_that_is_accepted():
    m = model()
    with pytest.raises(ValueError, match=r"at least \d+MB") as err:
        plan_streaming(m, "cuda", 500_000, tokens=256, device_budget=budget_for(500_000))
    msg = str(err.value)
    assert "context" in msg and "on the driver" in msg
    minimum = int(re.search(r"at least (\d+)MB", msg).group(1)) * MIB
    ok = plan_streaming(m, "cuda", minimum, tokens=256, device_budget=budget_for(minimum))
    # (rounded up to whole MB, the minimum of this tiny model may even hold every layer)
    assert ok.driver["fits"] and ok.driver["total"] <= minimum


def test_optimizer_state_moves_to_host_only_when_that_is_what_fits(monkeypatch):
    import lowtune.host_adamw
    # staging chunks small against the adapters, as 32 MiB is against a 7B's 160 MB of them
    monkeypatch.setattr(lowtune.host_adamw, "CHUNK_BYTES", 16 << 10)
    m = model()
    b = 1 << 40
    lean = None
    for b in range(2_000_000, 200_000, -20_000):
        try:
            p = plan_streaming(m, "cuda", b, tokens=256, device_budget=budget_for(b))
        except ValueError:
            break
        if p.optimizer_on_host:
            lean = (b, p)
            break
    assert lean is not None, "no budget made the planner move AdamW's state to the host"
    b, p = lean
    assert p.streaming and p.driver["total"] <= b
    # the host state is what made it fit: with the state kept on the GPU this budget is refused,
    # or needs what costs more speed (narrower scratch chunks, the MLP in more token chunks)
    try:
        gpu = plan_streaming(m, "cuda", b, tokens=256, host_optimizer=False, device_budget=budget_for(b))
    except ValueError as e:
        assert "at least" in str(e)
    else:
        assert (gpu.mlp_chunks, gpu.small_scratch) > (p.mlp_chunks, p.small_scratch)
    # the CPU has no host to move it to
    cpu = plan_streaming(m, "cpu", 1 << 30, tokens=256, host_optimizer=True)
    assert not cpu.optimizer_on_host


def test_cuda_graphs_are_kept_where_their_pool_fits_and_dropped_where_not():
    m = model()
    big = plan_streaming(m, "cuda", 1 << 40, tokens=256, cuda_graphs=True, device_budget=budget_for(1 << 40))
    assert big.cuda_graphs and big.estimate["graph_pool"] > 0
    small = None
    for b in range(big.driver["total"], 200_000, -20_000):
        try:
            p = plan_streaming(m, "cuda", b, tokens=256, cuda_graphs=True, device_budget=budget_for(b))
        except ValueError:
            break
        if not p.cuda_graphs:
            small = p
            break
    assert small is not None and small.estimate["graph_pool"] == 0 and small.driver["fits"]


def test_the_graph_pool_holds_the_working_set_only_once_when_every_layer_is_captured():
    m = model()
    full = plan_streaming(m, "cuda", 1 << 40, tokens=256, cuda_graphs=True, device_budget=budget_for(1 << 40))
    e = full.estimate
    assert e["every_layer_capturable"]
    rest = e["graph_pool"]                         # static buffers, gradients, the graphs
    # two static [tokens, dim] buffers shared by both passes, one RoPE table, one layer's flat
    # gradients; a forward and a backward graph per layer (lowtune.compile.LayerGraphs)
    c, act = m.config, torch.tensor([], dtype=m.dtype).element_size()
    assert e["rotation"] == 2 * 256 * c.rope_dim * 4
    assert e["layer_graphs"] == 2 * GRAPH_EXEC_BYTES            # the MLP whole
    assert rest == 2 * 256 * c.dim * act + e["rotation"] + e["layer_adapters"] + len(m.layers) * e["layer_graphs"]
    # a layer with adapter dropout runs outside the graphs in training: its eager working set
    # comes on top, also when the plan is made while the model is in eval mode
    ad = next(mod for mod in m.modules() if isinstance(mod, adapters.AdaptedLinear))
    ad.config = dataclasses.replace(ad.config, dropout=0.1)
    m.eval()
    mixed = plan_streaming(m, "cuda", 1 << 40, tokens=256, cuda_graphs=True, device_budget=budget_for(1 << 40))
    assert not mixed.estimate["every_layer_capturable"]
    assert mixed.estimate["graph_pool"] == rest + e["working"]


def test_a_measured_working_set_replaces_the_estimate():
    m = model()
    a = plan_streaming(m, "cuda", 1 << 40, tokens=256, device_budget=budget_for(1 << 40))
    b = plan_streaming(m, "cuda", 1 << 40, tokens=256, device_budget=budget_for(1 << 40), working=12345)
    assert b.estimate["working"] == 12345 and a.estimate["working"] != 12345
    # a measured working set holds SDPA's workspace already; an estimated one adds it
    assert b.estimate["working_measured"] and b.estimate["attention"] == 0 < a.estimate["attention"]
    def peak(p):
        return p.estimate["working"] + p.estimate["attention"] + p.estimate["head"]
    assert a.estimate["total"] - b.estimate["total"] == peak(a) - peak(b)


def test_the_lm_head_chunk_and_a_layer_working_set_are_not_counted_together():
    m = model()
    huge = 1 << 40
    head = plan_streaming(m, "cuda", huge, tokens=256, device_budget=budget_for(huge), working=1).estimate["head"]
    assert head > 0                          # a working set of 1 byte: the head counts in full, less it
    big = plan_streaming(m, "cuda", huge, tokens=256, device_budget=budget_for(huge), working=10 * head)
    assert big.estimate["head"] == 0         # the loss's chunk fits where the backward's layer was
    # CUDA graphs keep the working set in their pool for good: the head comes on top then
    pooled = plan_streaming(m, "cuda", huge, tokens=256, cuda_graphs=True, device_budget=budget_for(huge),
                            working=10 * head)
    assert pooled.cuda_graphs and pooled.estimate["head"] == head + 1


def test_an_untied_embedding_stays_in_host_memory_when_layers_stream():
    m = model(tied=False)
    huge = 1 << 40
    resident = plan_streaming(m, "cuda", huge, tokens=256, device_budget=budget_for(huge))
    e = resident.estimate
    assert not resident.streaming and not resident.embedding_on_host and e["embedding"] > 0
    for b in range(resident.driver["total"], 0, -20_000):   # the largest budget that streams
        tight = plan_streaming(m, "cuda", b, tokens=256, device_budget=budget_for(b))
        if tight.streaming:
            break
    assert tight.streaming and tight.embedding_on_host and tight.estimate["embedding"] == 0
    assert tight.estimate["weights"] == e["weights"]       # the embedding was never in weights
    # a tied embedding is the LM head's matrix: it stays on the device
    t = model()
    tied = plan_streaming(t, "cuda", b, tokens=256, device_budget=budget_for(b))
    assert tied.streaming and not tied.embedding_on_host and tied.estimate["embedding"] == 0
    assert tied.estimate["weights"] >= t.tok_embd.raw.numel()        # counted with the weights


def llama2_7b():
    """Llama-2-7B's shapes (tools/bench_train.py's llama2-7b: Q4_K, LoRA r=16 on all seven
    linears), every layer viewing one layer's zero blocks: the planner reads sizes only."""
    from lowtune import QTensor
    from lowtune.model import Model, ModelConfig
    d, f, v, layers = 4096, 11008, 32000, 32
    c = ModelConfig(vocab_size=v, dim=d, n_layers=layers, n_heads=32, n_kv_heads=32, ffn_dim=f, head_dim=128,
                    rope_dim=128, norm_eps=1e-5, context_length=4096)
    q4k = lambda n, k: QTensor.from_raw(torch.zeros(n * k // 256 * 144, dtype=torch.uint8), "Q4_K", (n, k))
    shapes = {"attn_q": (d, d), "attn_k": (d, d), "attn_v": (d, d), "attn_output": (d, d),
              "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}
    one = {n: q4k(*s) for n, s in shapes.items()}
    w = {"token_embd.weight": q4k(v, d), "output.weight": q4k(v, d), "output_norm.weight": torch.ones(d)}
    for i in range(layers):
        w.update({f"blk.{i}.{n}.weight": t for n, t in one.items()})
        w[f"blk.{i}.attn_norm.weight"] = w[f"blk.{i}.ffn_norm.weight"] = torch.ones(d)
    m = Model(c, w, torch.bfloat16)
    adapters.apply_adapters(m, adapters.AdapterConfig(method="lora", rank=16, alpha=16, seed=0))
    adapters.mark_only_adapters_trainable(m)
    return m


def h200(total: int) -> DeviceBudget:
    """The terms measured on an H200 (BENCHMARKS.md, 7B under 2 GiB, 2026-12-03)."""
    return DeviceBudget(budget=int(total), context=685768704, workspaces={"torch_cublas": 8 * MIB,
                        "torch_cublaslt": 8 * MIB, "lowtune_cublas": 8 * MIB}, slack_share=0.03,
                        slack_fixed=48 * MIB, slack_per_stream=16 * MIB, margin=64 * MIB, device="cuda:0")


def test_7b_plans_at_2_and_3_gib_with_graphs_only_for_a_whole_mlp():
    m = llama2_7b()
    tokens = 2048

    def plan(mib):
        return plan_streaming(m, "cuda", mib * MIB, tokens, cuda_graphs=True, device_budget=h200(mib * MIB))

    for mib in (2048, 3072):
        p = plan(mib)
        assert p.streaming and p.driver["fits"] and p.driver["total"] <= mib * MIB
    # 3 GiB keeps CUDA graphs with the MLP whole
    p = plan(3072)
    assert p.cuda_graphs and p.mlp_chunks == 1
    # 2 GiB: eager layers, the MLP in two chunks (what fits with the extension's full-width scratch)
    p = plan(2048)
    assert not p.cuda_graphs and p.mlp_chunks == 2 and not p.small_scratch and p.optimizer_on_host
    # graphs never come with a chunked MLP (measured above its plan); the smallest budget that
    # keeps them holds the whole MLP's working set
    with_graphs = [(mib, plan(mib)) for mib in range(2048, 3072, 64)]
    with_graphs = [(mib, p) for mib, p in with_graphs if p.cuda_graphs]
    assert with_graphs and all(p.mlp_chunks == 1 for _, p in with_graphs)
    assert 2048 < with_graphs[0][0] <= 2560 and with_graphs[0][1].driver["total"] <= with_graphs[0][0] * MIB
    # eager plans still chunk the MLP where that is what fits
    assert any(not p.cuda_graphs and p.mlp_chunks > 1 for p in (plan(mib) for mib in (2048, 2112)))


def test_stream_model_on_cpu_plans_the_tensors_alone_and_says_auto_needs_cuda():
    m = model(layers=4)
    plan = stream_model(m, "cpu", 1 << 30, tokens=64)
    assert not plan.streaming and plan.driver["total"] == plan.estimate["total"]
    assert m.stream_plan is plan
    with pytest.raises(ValueError, match="auto"):
        stream_model(model(layers=4), "cpu", "auto", tokens=64)


def test_the_extension_says_how_much_scratch_a_product_takes(monkeypatch):
    from lowtune import _C
    bf16 = 2
    # forward of a [4096, 11008] weight at 2048 rows: chunks of 1024 rows (16 MiB asks for 640,
    # the floor is 1024), two buffers alternating
    assert _C.cuda_scratch_bytes("forward", 2048, 4096, 11008, bf16) == 2 * 1024 * 11008 * 2
    assert _C.cuda_scratch_bytes("input_grad", 2048, 11008, 4096, bf16) == 2 * 1024 * 11008 * 2
    assert _C.cuda_scratch_bytes("forward", 8, 4096, 11008, bf16) == 0          # small M: no scratch
    # the planner's last resort: the floor at SMALL_CHUNK_MIN for what it estimates, then unset
    from lowtune.streaming import SMALL_CHUNK_MIN, _chunk_min
    with _chunk_min(True):
        assert _C.cuda_scratch_bytes("forward", 2048, 4096, 11008, bf16) == 2 * 640 * 11008 * 2
        assert _C.cuda_scratch_bytes("input_grad", 2048, 32000, 4096, bf16) == 2 * SMALL_CHUNK_MIN * 32000 * 2
    assert "LOWTUNE_CUDA_CHUNK_MIN" not in os.environ
    monkeypatch.setenv("LOWTUNE_CUDA_CHUNK_MIN", "256")
    assert _C.cuda_scratch_bytes("forward", 2048, 4096, 11008, bf16) == 2 * 640 * 11008 * 2
    monkeypatch.setenv("LOWTUNE_CUDA_OVERLAP", "0")
    assert _C.cuda_scratch_bytes("forward", 2048, 4096, 11008, bf16) == 640 * 11008 * 2   # one buffer
    stats = _C.cuda_memory_stats()
    assert set(stats) >= {"scratch_pool_reserved", "capture_arena_reserved", "cublas_workspace_bytes"}


@pytest.mark.cuda
def test_captured_graphs_share_the_extensions_scratch_and_workspace():
    """Capturing many graphs of a product on the cublas path holds one arena and one workspace per
    stream, not memory per graph (what made a streamed 7B's driver peak 17.55 GiB)."""
    from lowtune import _C, ops
    w = ops.quantize(torch.randn(4096, 4096) * 0.02, "Q4_K").to("cuda")
    x = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)
    ops.qmatmul(x, w)                       # warm up outside capture
    torch.cuda.synchronize()
    graphs, free = [], []
    pool = torch.cuda.graph_pool_handle()     # torch's side shared too, as lowtune.compile does
    for i in range(12):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            ops.qmatmul(x, w)
        graphs.append(g)
        torch.cuda.synchronize()
        free.append(torch.cuda.mem_get_info()[0])
    stats = _C.cuda_memory_stats()
    scratch = _C.cuda_scratch_bytes("forward", 2048, 4096, 4096, 2)
    assert 0 < stats["capture_arena_reserved"] <= max(scratch, 32 << 20)
    assert stats["cublas_workspaces"] <= 3
    # the last ten captures took (almost) nothing more from the device
    assert free[2] - free[-1] < 64 << 20
    for g in graphs:
        g.replay()
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_the_minimum_a_refusal_gives_holds_on_the_drivers_count():
    """The minimum budget a refusal names, measured on this GPU, is one under which two training
    steps keep NVML's count of this process (or the device's used memory where NVML cannot count
    per process) within the budget."""
    import gc
    import threading
    import time

    from lowtune.host_adamw import make_adamw
    from lowtune.memory_budget import NVML
    gc.collect()
    torch.cuda.empty_cache()
    tokens = 2048
    with pytest.raises(ValueError, match=r"at least \d+MB") as err:
        stream_model(model(), "cuda", 1 << 20, tokens=tokens)
    # (a second measurement may find a few more kernels loaded)
    minimum = (int(re.search(r"at least (\d+)MB", str(err.value)).group(1)) + 16) << 20
    m = model()
    plan = stream_model(m, "cuda", minimum, tokens=tokens)
    assert plan.driver["fits"]
    nvml = NVML.open()
    if nvml is not None and nvml.process_used() is not None:
        read = nvml.process_used
    else:
        read = lambda: (lambda f, t: t - f)(*torch.cuda.mem_get_info())  # noqa: E731
    peak, stop = [read()], threading.Event()

    def sample():
        while not stop.is_set():
            peak.append(read())
            time.sleep(0.002)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        params = [p for p in m.parameters() if p.requires_grad]
        opt = make_adamw(params, plan.optimizer_on_host, lr=1e-3)
        ids = torch.randint(0, m.config.vocab_size, (1, tokens), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(2):
                m.loss(ids).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    finally:
        stop.set()
        t.join()
    assert max(peak) <= plan.budget, (max(peak), plan.budget, plan.driver)


def test_the_stack_limit_setting_and_a_machine_without_a_driver(monkeypatch):
    assert stack_bytes_setting({}) == STACK_BYTES
    assert stack_bytes_setting({"LOWTUNE_CUDA_STACK_BYTES": "keep"}) is None
    assert stack_bytes_setting({"LOWTUNE_CUDA_STACK_BYTES": " 2048 "}) == 2048
    for bad in ("-1", "lots", "1KiB"):
        with pytest.raises(ValueError, match="LOWTUNE_CUDA_STACK_BYTES"):
            stack_bytes_setting({"LOWTUNE_CUDA_STACK_BYTES": bad})
    monkeypatch.setattr(memory_budget, "_cuda_driver", lambda: None)
    assert stack_limit() is None and set_stack_limit(0) is None


_STACK_PROBE = r"""
import json, torch
from lowtune import ops
from lowtune.memory_budget import NVML, DeviceBudget, prepare_process, stack_limit
prepare_process()
w = ops.quantize(torch.randn(4096, 4096) * 0.02, "Q4_K").to("cuda")
x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
db = DeviceBudget.measure("cuda", 1 << 34, warmup=lambda: ops.qmatmul(x, w))
eager = ops.qmatmul(x, w)
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    y = ops.qmatmul(x, w)
for _ in range(3):
    g.replay()
torch.cuda.synchronize()
nvml = NVML.open()
print(json.dumps({"stack": db.measured["stack_limit"], "now": stack_limit(), "context": db.context,
                  "same": bool(torch.equal(y, eager)), "per_process": nvml is not None and
                  nvml.process_used() is not None}))
"""


@pytest.mark.cuda
def test_a_budgeted_process_lowers_the_stack_reservation_and_its_graphs_still_replay():
    """DeviceBudget.measure lowers the context's stack limit before the warm-up: the driver's count
    of the context falls by the reservation (264 MiB at the default 1 KiB on an H200), products
    and captured graphs run as before. Each case in a fresh process (the limit is per context)."""
    import json
    import subprocess
    import sys

    def probe(setting: str) -> dict:
        env = dict(os.environ, LOWTUNE_CUDA_STACK_BYTES=setting)
        out = subprocess.run([sys.executable, "-c", _STACK_PROBE], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    kept, lowered = probe("keep"), probe("0")
    assert kept["same"] and lowered["same"]
    assert "set" not in kept["stack"] and kept["now"] == kept["stack"]["before"]
    assert lowered["stack"]["set"] < lowered["stack"]["before"]
    assert lowered["now"] < kept["now"]
    if kept["per_process"] and lowered["per_process"]:
        props = torch.cuda.get_device_properties(0)
        reservation = (kept["now"] - lowered["now"]) * props.max_threads_per_multi_processor \
            * props.multi_processor_count
        assert kept["context"] - lowered["context"] >= reservation // 2, (kept, lowered, reservation)


def test_budgets_on_the_command_line():
    from lowtune.cli import build_parser
    from lowtune.finetune_cli import config_from_args
    from lowtune.train_config import TrainConfig
    args = build_parser().parse_args(["finetune", "m.gguf", "--data", "d.txt", "-o", "runs/x",
                                      "--max-vram", "auto", "--host-ram", "2GiB"])
    cfg = config_from_args(args)
    assert cfg.max_vram == "auto" and cfg.host_ram == 2 << 30
    cfg.apply_overrides({"max_vram": "6GB", "host_ram": "512MB"})
    assert cfg.max_vram == 6 << 30 and cfg.host_ram == 512 << 20
    assert TrainConfig.from_dict(cfg.to_dict()).max_vram == 6 << 30
    with pytest.raises(ValueError, match="6GB"):
        TrainConfig(max_vram="lots")


def test_7b_keeps_graphs_at_2_gib_once_the_context_gives_back_its_stack():
    """With the context the H200 measured after the driver's stack reservation was lowered (402 MiB
    on 2026-12-04, against 654 MiB before: the test above), 2 GiB plans CUDA graphs with the MLP
    whole and AdamW's state in host memory, as the H200 runs did; 1.5 GiB is refused with a
    minimum that is itself a budget that plans. The layer's working set is the one the H200
    measured (475.6 MiB; stream_model adds WORKING_MARGIN), as stream_model passes it."""
    m = llama2_7b()
    tokens = 2048
    working = {1: int(475.5634765625 * MIB * (1 + WORKING_MARGIN))}

    def plan(mib):
        db = dataclasses.replace(h200(mib * MIB), context=421527552)
        return plan_streaming(m, "cuda", mib * MIB, tokens, cuda_graphs=True, device_budget=db, working=working)

    p = plan(2048)
    assert p.cuda_graphs and p.mlp_chunks == 1 and p.optimizer_on_host and p.streaming
    assert p.driver["fits"] and p.driver["total"] <= 2048 * MIB and p.driver["context"] == 421527552
    with pytest.raises(ValueError, match=r"at least \d+MB") as err:
        plan(1536)
    minimum = int(re.search(r"at least (\d+)MB", str(err.value)).group(1))
    assert 1536 < minimum < 2048
    p = plan(minimum)
    assert p.driver["fits"] and not p.cuda_graphs
