"""Compiled and captured training (lowtune.compile) against eager.

torch.compile(fullgraph=True) must trace a decoder layer with adapters of every method (the
custom ops, real-arithmetic RoPE, no host syncs or data-dependent branches); compiled losses and
gradients equal eager's, resident, checkpointed and streamed. Most cases use the "aot_eager"
backend: the same Dynamo graph and AOT-autograd forward/backward split as inductor, without
code generation (which takes minutes on a small CPU); one case runs inductor itself. CUDA graphs
(LayerGraphs) need a GPU: those cases are marked cuda.
"""
from __future__ import annotations

import pytest
import torch

from lowtune import adapters
from lowtune.adapters import AdaptedLinear, AdapterConfig
from lowtune.compile import LayerGraphs, applied, compile_model, default_mode
from lowtune.model import LINEAR_NAMES, LlamaModel
from lowtune.streaming import LayerStreamer, stream_model

from conftest import cuda_available
from helpers import fill_adapters
from test_model import gguf_weights, rand_ids, tiny_config, tiny_weights

# one method per linear, so that one layer holds every adapter geometry
MIXED = {"attn_q": "lora", "attn_k": "qa-lora", "attn_v": "q-bara", "attn_output": "qa-hira",
         "ffn_gate": "qdylora", "ffn_up": "lora", "ffn_down": "q-bara"}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def mixed_model(device="cpu", dtype=torch.float32, layers=2, methods=MIXED, seed=0, qtype="Q4_1"):
    """A tiny packed Llama with non-zero adapters of every method (QDyLoRA at rank 3 of 4)."""
    c = tiny_config(layers=layers, ffn=128)
    model = LlamaModel(c, gguf_weights(c, tiny_weights(c, seed), qtype), dtype).eval()
    return with_mixed_adapters(model, methods, torch.Generator().manual_seed(seed + 1)).to(device)


def with_mixed_adapters(model, methods, g: torch.Generator):
    """`model` with an adapter of methods[name] on each linear its layers have (QDyLoRA at rank 3 of 4),
    only the adapters trainable, their matrices drawn from g."""
    for layer in model.layers:
        for name in (n for n in LINEAR_NAMES if hasattr(layer, n)):
            ad = AdaptedLinear(getattr(layer, name), AdapterConfig(method=methods[name], rank=4, alpha=8), g)
            if ad.method == "qdylora":
                ad.set_rank(3)
            setattr(layer, name, ad)
    adapters.mark_only_adapters_trainable(model)
    fill_adapters(model, g)
    return model


def grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(got: dict, want: dict, **tol) -> None:
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name, **tol)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_decoder_layer_compiles_whole_and_equals_eager(backend):
    model = mixed_model().train()
    layer = model.layers[0]
    rot = model.rope_rotation(0, 12)
    x = torch.randn(2, 12, model.config.dim, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False, backend=backend)
    dy = torch.randn(2, 12, model.config.dim)
    y = compiled(x, rot)
    y.backward(dy)
    got, got_dx = grads(layer), x.grad.clone()
    layer.zero_grad(set_to_none=True)
    x.grad = None
    want_y = layer(x, rot)
    want_y.backward(dy)
    tol = dict(rtol=0, atol=0) if backend == "aot_eager" else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y, want_y, **tol)
    torch.testing.assert_close(got_dx, x.grad, **tol)
    assert_same(got, grads(layer), **tol)


def train_steps(model, ids, labels, steps=2):
    """Losses of `steps` AdamW steps and the gradients of the first."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses, first = [], None
    for _ in range(steps):
        loss = model.loss(ids, labels)
        loss.backward()
        losses.append(loss.detach())
        first = first or grads(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return torch.stack(losses), first


@pytest.mark.parametrize("mode,checkpointing,streamed,mlp_chunks", [
    ("layer", True, None, 1),
    ("layer", False, None, 1),
    ("layer", True, [0, 2], 1),     # streamed layers: the compiled layer runs over the slots' bytes
    ("layer", True, [0, 2], 3),     # and recomputed in compiled pieces, the MLP in token chunks
    ("model", True, None, 1),
])
def test_compiled_training_equals_eager(mode, checkpointing, streamed, mlp_chunks):
    ids = rand_ids(2, 16)
    labels = ids.clone()
    labels[0, :5] = -100         # unscored rows stay in place under compile (no data-dependent shape)
    eager = mixed_model(layers=3)
    eager.gradient_checkpointing = checkpointing
    want, want_g = train_steps(eager, ids, labels)

    model = mixed_model(layers=3)
    model.gradient_checkpointing = checkpointing
    if streamed is not None:
        stream_model(model, "cpu", streamed=streamed, mlp_chunks=mlp_chunks)
    events = []
    setup = compile_model(model, mode, on_event=events.append, backend="aot_eager")
    got, got_g = train_steps(model, ids, labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_same(got_g, want_g, rtol=1e-4, atol=1e-6)
    assert setup.compiles >= 1 and any(e.startswith("compiled") for e in events)
    assert "compilation" in setup.summary()
    if mode == "layer":
        assert all(layer._compiled_call_impl is not None for layer in model.layers)
    setup.close()


@pytest.mark.parametrize("mode", ["layer", "model"])
@pytest.mark.parametrize("arch", ["gpt2", "bloom", "mpt"])
def test_learned_positions_and_alibi_compile_as_eager(arch, mode):
    """GPT-2's learned positions, BLOOM's ALiBi and embedding norm and MPT's ALiBi and clamped q/k/v train
    compiled (the layers, or the whole forward and loss) as they do eagerly, with adapters of every method."""
    from family_models import random_family_model

    def adapted():
        methods = {**MIXED, "ffn_up": MIXED["ffn_gate"]}  # (no gate: its method on ffn_up)
        return with_mixed_adapters(random_family_model(arch), methods, torch.Generator().manual_seed(1))

    ids = rand_ids(2, 16)
    want, want_g = train_steps(adapted(), ids, ids)
    model = adapted()
    setup = compile_model(model, mode, backend="aot_eager")
    got, got_g = train_steps(model, ids, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_same(got_g, want_g, rtol=1e-4, atol=1e-6)
    assert setup.compiles >= 1
    setup.close()


def test_off_restores_eager_and_modes_are_checked():
    model = mixed_model()
    compile_model(model, "model", backend="aot_eager")
    assert "loss" in model.__dict__
    compile_model(model, "layer", backend="aot_eager")
    assert "loss" not in model.__dict__ and model.layers[0]._compiled_call_impl is not None
    compile_model(model, "off")
    assert model.layers[0]._compiled_call_impl is None and applied(model).mode == "off"
    with pytest.raises(ValueError, match="compile mode must be one of off, layer, model"):
        compile_model(model, "fast")
    with pytest.raises(ValueError, match="CUDA graphs need the model on a GPU"):
        compile_model(model, "layer", cuda_graphs=True)
    streamed = mixed_model(layers=3)
    stream_model(streamed, "cpu", streamed=[1])
    with pytest.raises(ValueError, match="use mode 'layer'"):
        compile_model(streamed, "model")
    assert default_mode("cpu") == "off" and default_mode("cuda") == "layer"


def test_eval_and_generation_paths_compile():
    """The no-grad forward (eval, and the KV-cache path of generation) runs through the compiled
    layers too, with the same logits."""
    model = mixed_model()
    ids = rand_ids(1, 10)
    with torch.no_grad():
        want = model(ids)
        cache = model.new_cache(1, 16)
        want_step = torch.cat([model(ids[:, :6], cache)[:, -1:], model(ids[:, 6:7], cache)], 1)
    compile_model(model, "layer", backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(model(ids), want, rtol=1e-5, atol=1e-5)
        cache = model.new_cache(1, 16)
        got_step = torch.cat([model(ids[:, :6], cache)[:, -1:], model(ids[:, 6:7], cache)], 1)
    torch.testing.assert_close(got_step, want_step, rtol=1e-5, atol=1e-5)


def test_layers_share_their_compiled_graphs():
    """Layers of one shape compile once, however many there are (the weights are graph inputs,
    nothing specialises on a layer): a per-layer recompile would multiply the warm-up by the
    depth. Streamed layers, bound to slot views, share them too."""
    methods = {**MIXED, "ffn_gate": "lora"}
    counts = []
    for layers, streamed in ((2, False), (4, False), (4, True)):
        torch._dynamo.reset()
        model = mixed_model(layers=layers, methods=methods)
        model.gradient_checkpointing = True
        if streamed:
            stream_model(model, "cpu", streamed=[1, 2, 3])
        setup = compile_model(model, "layer", backend="aot_eager")
        model.train()
        for _ in range(2):
            model.loss(rand_ids(2, 12)).backward()
        counts.append(setup.compiles)
    # forward and backward, with and without a gradient for the input (the first layer's comes
    # from the frozen embedding); the streamer's no-grad forward adds its own graph
    assert counts[0] == counts[1] == 4 and counts[2] == 6


def test_qdylora_rank_changes_do_not_recompile():
    """QDyLoRA adapters run outside the compiled layers: a new rank per step compiles nothing."""
    model = mixed_model()
    ids = rand_ids(2, 12)
    setup = compile_model(model, "layer", backend="aot_eager")
    model.train()
    model.loss(ids).backward()
    compiles = setup.compiles
    for b in (1, 2, 4):
        for ad in adapters.adapters_of(model).values():
            if ad.method == "qdylora":
                ad.set_rank(b)
        model.loss(ids).backward()
    assert setup.compiles == compiles > 0


class ReplayedWork:
    """Stands in for a CUDA graph on the CPU: replay() runs the recorded work again."""

    def __init__(self, work):
        self.work = work

    def replay(self):
        self.work()


class CPUGraphs(LayerGraphs):
    """LayerGraphs with its recorder swapped for ReplayedWork: everything around the capture
    (keys, static buffers, copies in and out, the gradients' flat buffer) runs as on a GPU."""

    def _record(self, work):
        work()  # the warm-up
        return ReplayedWork(work)


@pytest.mark.parametrize("compiled,streamed,mlp_chunks", [(False, None, 1), (False, [0, 1, 2], 1), (True, [1], 1),
                                                        (False, [0, 1, 2], 3), (True, [1], 2)],
                         ids=["resident", "streamed", "compiled-some-streamed", "streamed-chunked",
                              "compiled-chunked"])
def test_layer_graph_bookkeeping_equals_eager(compiled, streamed, mlp_chunks):
    """Resident and streamed: one graph per layer and pass (a streamed layer lands in the same
    slot every step), replayed every step, their static inputs and outputs two [tokens, dim]
    buffers in all, and training equal to eager."""
    methods = {**MIXED, "ffn_gate": "lora"}
    ids = rand_ids(2, 16)
    eager = mixed_model(layers=3, methods=methods)
    eager.gradient_checkpointing = True
    want, want_g = train_steps(eager, ids, ids, steps=3)
    model = mixed_model(layers=3, methods=methods)
    if streamed is None:
        model.streamer = LayerStreamer(model, "cpu", [])
        for layer in model.layers:
            layer.mlp_chunks = mlp_chunks
    else:
        stream_model(model, "cpu", streamed=streamed, mlp_chunks=mlp_chunks)
    if compiled:
        compile_model(model, "layer", cuda_graphs=False, backend="aot_eager")
    model.streamer.graphs = graphs = CPUGraphs("cpu")
    got, got_g = train_steps(model, ids, ids, steps=3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_same(got_g, want_g, rtol=1e-4, atol=1e-6)
    assert graphs.replays == 3 * 2 * 3
    # memory_budget.graph_pool counts two graphs per layer and two [tokens, dim] static buffers
    assert len(graphs.graphs) == 2 * 3
    (st,) = graphs.static.values()
    assert st.x.shape == st.dy.shape == (2, 16, model.config.dim) and len(st.grads) == 1
    before = len(graphs.graphs)
    train_steps(model, ids, ids, steps=1)           # steady state: nothing new to capture
    assert len(graphs.graphs) == before and graphs.replays == 4 * 2 * 3


class FailingGraphs(CPUGraphs):
    """Capture fails after `good` graphs, as a kernel that cannot be captured would."""

    def __init__(self, good: int):
        super().__init__("cpu")
        self.good = good

    def _record(self, work):
        if len(self.graphs) >= self.good:
            raise RuntimeError("operation not permitted when stream is capturing")
        return super()._record(work)


@pytest.mark.parametrize("good", [0, 3, 4])
def test_failed_capture_falls_back_to_running_the_layers(good):
    """A capture that fails (in the forward or the backward pass) leaves every layer to run
    without graphs, with the same training, and says so."""
    methods = {**MIXED, "ffn_gate": "lora"}
    ids = rand_ids(2, 16)
    eager = mixed_model(layers=3, methods=methods)
    eager.gradient_checkpointing = True
    want, want_g = train_steps(eager, ids, ids, steps=2)
    model = mixed_model(layers=3, methods=methods)
    model.streamer = LayerStreamer(model, "cpu", [])
    events = []
    model.streamer.graphs = graphs = FailingGraphs(good)
    graphs.on_event = events.append
    got, got_g = train_steps(model, ids, ids, steps=2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_same(got_g, want_g, rtol=1e-4, atol=1e-6)
    assert graphs.failed and "capture failed" in graphs.summary()
    assert any("capture failed" in e for e in events)


def test_layer_graphs_leave_dropout_and_qdylora_layers_alone():
    graphs = CPUGraphs("cpu")
    model = mixed_model()                           # has QDyLoRA adapters
    assert not graphs.handles(model.layers[0])
    plain = mixed_model(methods={**MIXED, "ffn_gate": "lora"})
    assert graphs.handles(plain.layers[0])
    dropped = mixed_model(methods={n: "lora" for n in MIXED})
    for ad in adapters.adapters_of(dropped).values():
        object.__setattr__(ad.config, "dropout", 0.1)
    dropped.train()
    assert not graphs.handles(dropped.layers[0])
    assert "QDyLoRA" in graphs.summary() and "dropout" in graphs.summary()


# ---- CUDA graphs ----------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("compiled,streamed", [(False, None), (False, [0, 1, 2]), (True, None), (True, [1])])
def test_cuda_graph_training_equals_eager(compiled, streamed):
    """Layers replayed from CUDA graphs (resident, and streamed through the two slots) train as
    the same layers without graphs: same losses over several steps, same first gradients (the
    same kernels run; compiled against eager is tested on the CPU). QDyLoRA is left out of the
    graphs (its rank changes per step), so the methods here are the other four."""
    methods = {**MIXED, "ffn_gate": "lora"}
    mode = "layer" if compiled else "off"
    ids = rand_ids(2, 32).cuda()
    reference = mixed_model(layers=3, methods=methods, dtype=torch.bfloat16).cuda()
    reference.gradient_checkpointing = True
    compile_model(reference, mode, cuda_graphs=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want, want_g = train_steps(reference, ids, ids, steps=3)
    model = mixed_model(layers=3, methods=methods, dtype=torch.bfloat16)
    if streamed is None:
        model.cuda()
        model.gradient_checkpointing = True
    else:
        stream_model(model, "cuda", streamed=streamed)
    setup = compile_model(model, mode, cuda_graphs=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, got_g = train_steps(model, ids, ids, steps=3)
    assert setup.graphs.failed is None, setup.summary()
    # eager layers replay the very kernels; a compiled layer is traced again for the capture
    # (its parameters become inputs), and Inductor's other fusion rounds bf16 differently
    torch.testing.assert_close(got, want, rtol=5e-3 if compiled else 1e-3, atol=1e-5)
    if compiled:  # bf16 roundings differ element by element (2% of a gradient's norm measured
        # on the H200); a wrong or missing gradient is off by its whole size
        assert set(got_g) == set(want_g)
        for name in want_g:
            err = float((got_g[name] - want_g[name]).norm() / want_g[name].norm())
            assert err < 5e-2, f"{name}: relative error {err:.3g}"
    else:
        assert_same(got_g, want_g, rtol=1e-2, atol=1e-5)
    graphs = setup.graphs
    # every layer: one forward and one backward graph per slot it ran in, replayed every step
    assert len(graphs.graphs) >= 2 * 3 and graphs.replays == 3 * 2 * 3
    compile_model(model, "off", cuda_graphs=False)
    assert model.streamer is None if streamed is None else model.streamer.graphs is None


@pytest.mark.cuda
def test_compiled_layer_captures_in_a_cuda_graph():
    """torch.cuda.graph captures a compiled decoder layer's forward and backward (no host sync,
    no CPU tensor inside); the replay over new inputs equals eager."""
    model = mixed_model(methods={**MIXED, "ffn_gate": "lora"}, dtype=torch.bfloat16).cuda().train()
    layer = model.layers[0]
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    rot = model.rope_rotation(0, 64).cuda()
    x = torch.randn(2, 64, model.config.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    params = [p for p in layer.parameters() if p.requires_grad]

    def step():
        y = compiled(x, rot)
        return (y, *torch.autograd.grad(y, [x, *params], dy))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
        dy.copy_(torch.randn_like(dy))
    graph.replay()
    want = step()
    for got, ref in zip(outs, want):
        torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-3)


@pytest.mark.skipif(cuda_available(), reason="checks the CPU-only message")
def test_cuda_graphs_default_off_on_cpu():
    model = mixed_model()
    assert compile_model(model, "off").graphs is None


def test_finetune_compile_flags_reach_compile_model(tmp_path, monkeypatch, capsys):
    """`finetune --compile/--cuda-graphs` go through TrainConfig to compile_model (and are kept in
    config.json); auto on the CPU leaves the model eager; CUDA graphs on the CPU are refused."""
    import json

    from lowtune import cli
    from lowtune import compile as compiling

    from helpers import write_tiny_llama_gguf

    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf", "Q4_1")
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 30)
    calls, real = [], compiling.compile_model

    def recording(model, mode, *, cuda_graphs=None, on_event=None, backend="inductor"):
        calls.append((mode, cuda_graphs))   # traced without code generation, as the other CPU cases
        return real(model, mode, cuda_graphs=cuda_graphs, on_event=on_event, backend="aot_eager")

    monkeypatch.setattr(compiling, "compile_model", recording)

    def finetune(out, *flags):
        return cli.main([str(a) for a in ["finetune", model, "--data", text, "--steps", 1, "--seq-len", 32,
                                          "--batch", 1, "--eval-fraction", 0, "--device", "cpu", "-o",
                                          tmp_path / out, *flags]])

    assert finetune("layer", "--compile", "layer", "--cuda-graphs", "off") == 0
    assert calls == [("layer", False)]
    saved = json.loads((tmp_path / "layer" / "config.json").read_text())["train"]
    assert saved["compile"] == "layer" and saved["cuda_graphs"] is False
    assert saved["extra"]["compile"] == {"mode": "layer", "cuda_graphs": False}
    assert "compiled (forward)" in capsys.readouterr().out   # compile_model's events reach the log
    assert finetune("auto") == 0 and len(calls) == 1          # auto on the CPU: eager, nothing applied
    assert finetune("graphs", "--cuda-graphs", "on") == 1
    assert "--cuda-graphs on needs a CUDA device" in capsys.readouterr().err


def test_checkpointed_layers_keep_the_cpu_random_state_where_cuda_exists(monkeypatch):
    """On a machine with CUDA, torch's checkpoint keeps CUDA's random state even for CPU inputs, and
    fails when the forward initializes CUDA, as the first torch.compile of a layer does (it reads
    CUDA's random state). lowtune.model.checkpoint keeps the CPU's for CPU inputs. Simulated here:
    the default device type CUDA, and a forward that marks CUDA initialized."""
    from torch.utils import checkpoint as torch_checkpoint

    from lowtune.model import checkpoint
    monkeypatch.setattr(torch_checkpoint.DefaultDeviceType, "_default_device_type", "cuda")
    monkeypatch.setattr(torch.cuda, "_initialized", False)

    def forward(x):
        torch.cuda._initialized = True  # (what the compile does on a GPU machine)
        return (x * 2).sin()

    x = torch.ones(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="initialized in the forward pass of a Checkpoint"):
        torch_checkpoint.checkpoint(forward, x, use_reentrant=False)
    torch.cuda._initialized = False
    checkpoint(forward, x).sum().backward()
    torch.testing.assert_close(x.grad, 2 * torch.cos(2 * x.detach()))
    assert torch_checkpoint.DefaultDeviceType.get_device_type() == "cuda"  # (put back)
