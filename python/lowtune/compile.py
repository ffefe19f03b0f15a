"""Compiled and captured training: few launches per decoder layer.

    setup = compile_model(model, "layer", cuda_graphs=True, on_event=print)
    loss = model.loss(ids, labels); loss.backward()      # as before; the first step warms up
    print(setup.summary())
    compile_model(model, "off")                          # back to eager

Modes (default_mode(device) picks one):
  off    eager, the reference path.
  layer  every decoder layer's forward compiled (torch.compile, fullgraph): RMSNorm, RoPE, the
         attention call, SwiGLU, residuals and the adapter glue fuse into a few kernels around the
         lowtune custom ops. The packed weights and the adapters are graph inputs, so the layers
         of one model share one compiled graph per shape, and a streamed layer runs with
         whatever weights the streamer bound. Works with gradient checkpointing and streaming.
         QDyLoRA adapters (a new rank every step) run eagerly between the compiled pieces.
  model  the model's forward and loss compiled whole (embedding, layers with their checkpoints,
         norm, LM head and loss). Not with streaming (the streamer works between layers).

cuda_graphs (CUDA, modes off and layer): every layer's forward and its recomputation with
backward are captured in CUDA graphs and replayed (LayerGraphs), which removes the host's
per-operator cost. Layers then always run checkpointed, through lowtune.streaming's layer
function, also when nothing streams. In mode model, cuda_graphs uses torch.compile's
"reduce-overhead" mode (CUDA graph trees) instead.

Compilation and capture happen in the first step of every new shape; on_event(line) is told
when each starts and ends, and summary() totals them.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from .adapters import AdaptedLinear
from .model import Model
from .streaming import LayerStreamer
from .train_config import COMPILE_MODES

MODES = tuple(m for m in COMPILE_MODES if m != "auto")  # "auto" is default_mode's choice

# Layers whose packed types differ (Q4_K_M mixes Q6_K into some) compile once per combination.
_RECOMPILE_LIMIT = 64

_APPLIED: "weakref.WeakKeyDictionary[Model, CompileSetup]" = weakref.WeakKeyDictionary()


def default_cuda_graphs(device, model: Model) -> bool:
    """Whether layers are captured in CUDA graphs unless asked otherwise: on CUDA, except a mixture of
    experts (its shapes follow the routing), Gemma 3n, Gemma 4 and RWKV (compile_model says
    why)."""
    return torch.device(device).type == "cuda" and not model.config.n_experts and not model.config.family.own_model


def default_mode(device, model: Model | None = None) -> str:
    """The mode `--compile auto` means: layer on CUDA, off on the CPU (inductor's CPU code gains
    little there against the time it takes to compile) and for mixture-of-experts models, Gemma 3n and Gemma 4."""
    if model is not None and (model.config.n_experts or model.config.family.own_model):
        return "off"
    return "layer" if torch.device(device).type == "cuda" else "off"


@dataclass
class CompileSetup:
    """What compile_model did, and the warm-up it has seen so far."""
    mode: str
    cuda_graphs: bool
    compiles: int = 0
    compile_s: float = 0.0
    graphs: "LayerGraphs | None" = None
    installed_streamer: bool = False      # the resident model got a streamer for the graphs
    _callbacks: list = field(default_factory=list, repr=False)

    def summary(self) -> str:
        parts = [f"compile {self.mode}"]
        if self.mode != "off":
            parts.append(f"{self.compiles} compilation(s), {self.compile_s:.1f} s")
        if self.graphs is not None:
            parts.append(self.graphs.summary())
        elif self.cuda_graphs:
            parts.append("CUDA graphs through torch.compile (reduce-overhead)")
        return "; ".join(parts)

    def close(self) -> None:
        """Stop reporting compilations (the compiled code stays in place)."""
        from torch._dynamo.callback import callback_handler  # dynamo loads only where something compiles
        for start, end in self._callbacks:
            callback_handler.remove_start_callback(start)
            callback_handler.remove_end_callback(end)
        self._callbacks.clear()


def compile_model(model: Model, mode: str = "layer", *, cuda_graphs: bool | None = None,
                  on_event: Callable[[str], None] | None = None, backend: str = "inductor") -> CompileSetup:
    """Apply `mode` (off | layer | model) to `model` in place, replacing what an earlier call
    applied. cuda_graphs: None = on where the model is on CUDA. Call it after adapters are
    applied and the model is on its device (after stream_model, when streaming). backend: the
    torch.compile backend (tests use "aot_eager", which traces the same graph without codegen)."""
    if mode not in MODES:
        raise ValueError(f"compile mode must be one of {', '.join(MODES)}, got {mode!r}")
    _undo(model)
    on_cuda = model.device.type == "cuda"
    if cuda_graphs is None:
        cuda_graphs = default_cuda_graphs(model.device, model)
    if model.config.n_experts and (mode != "off" or cuda_graphs):
        raise ValueError("a mixture-of-experts model routes each token to its experts, so its shapes follow "
                         "the data and its layers can be neither compiled nor captured; use --compile off "
                         "and --cuda-graphs off")
    if model.config.family.altup and (mode != "off" or cuda_graphs):
        raise ValueError("Gemma 3n's layers pass AltUp's copies of the residual stream, their per-layer inputs and "
                         "shared K/V from layer to layer, which the compiled and captured layers do not take; use "
                         "--compile off and --cuda-graphs off")
    if model.config.family.layer_widths and (mode != "off" or cuda_graphs):
        raise ValueError("Gemma 4's layers pass their per-layer inputs and shared K/V from layer to layer, which the "
                         "compiled and captured layers do not take; use --compile off and --cuda-graphs off")
    if model.config.family.rwkv and (mode != "off" or cuda_graphs):
        raise ValueError("RWKV's layers pass RWKV-7's first layer's values from layer to layer and run their own "
                         "recurrences, which the compiled and captured layers do not take; use --compile off and "
                         "--cuda-graphs off")
    if cuda_graphs and not on_cuda:
        raise ValueError(f"CUDA graphs need the model on a GPU; it is on {model.device} "
                         "(use cuda_graphs=False)")
    streaming = model.streamer is not None and bool(model.streamer.streamed)
    if mode == "model" and streaming:
        raise ValueError("compile mode 'model' cannot stream layers (the streamer copies weights "
                         "between layers, outside any graph); use mode 'layer'")
    setup = CompileSetup(mode, bool(cuda_graphs))
    if mode != "off":
        _raise_recompile_limit()
        _report_compilations(setup, on_event)
        # QDyLoRA samples a new rank every step, and every rank would be a new graph: those
        # adapters run eagerly between the compiled pieces of their layer
        dynamic_rank = [m for m in model.modules() if isinstance(m, AdaptedLinear) and m.method == "qdylora"]
        for ad in dynamic_rank:
            ad.forward = torch.compiler.disable(ad.forward)
        if dynamic_rank and on_event is not None:
            on_event("QDyLoRA adapters run outside the compiled graphs (their rank changes every step)")
    if mode == "layer":
        for layer in model.layers:
            layer.compile(fullgraph=not dynamic_rank, dynamic=False, backend=backend)
            # a checkpointed layer with its MLP in token chunks recomputes in these two pieces
            # (DecoderLayer.checkpoint_backward); compiled on first use
            layer.compiled_parts = tuple(torch.compile(f, fullgraph=not dynamic_rank, dynamic=False, backend=backend)
                                         for f in (layer.attention_branch, layer.norm_mlp))
    elif mode == "model":
        kw = dict(dynamic=False, backend=backend)
        if cuda_graphs:
            kw["mode"] = "reduce-overhead"
        # the RoPE table is looked up outside the graph (one break, at the start)
        model.forward = torch.compile(model.forward, **kw)
        model.loss = torch.compile(model.loss, **kw)
    if cuda_graphs and mode != "model":
        if model.streamer is None:  # resident: the streamer's layer function, with nothing to copy
            model.streamer = LayerStreamer(model, model.device, [])
            setup.installed_streamer = True
        setup.graphs = model.streamer.graphs = LayerGraphs(model.device, on_event)
    _APPLIED[model] = setup
    return setup


def applied(model: Model) -> CompileSetup | None:
    """What compile_model last applied to `model` (None: never called)."""
    return _APPLIED.get(model)


def _undo(model: Model) -> None:
    old = _APPLIED.pop(model, None)
    if old is None:
        return
    old.close()
    for layer in model.layers:
        layer._compiled_call_impl = None
        layer.compiled_parts = None
    for m in model.modules():
        if isinstance(m, AdaptedLinear):
            m.__dict__.pop("forward", None)
    for name in ("forward", "loss"):
        model.__dict__.pop(name, None)
    if model.streamer is not None:
        model.streamer.graphs = None
        if old.installed_streamer:
            model.streamer = None


def _raise_recompile_limit() -> None:
    import torch._dynamo
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    if getattr(cfg, name) < _RECOMPILE_LIMIT:
        setattr(cfg, name, _RECOMPILE_LIMIT)


def _report_compilations(setup: CompileSetup, on_event) -> None:
    """Count (and tell on_event about) every compilation torch.compile runs from now on."""
    started: list[float] = []

    def what(args) -> str:
        trigger = getattr(args, "callback_trigger", None)
        return {"LAZY_BACKWARD": "backward", "TRITON_AUTOTUNING": "autotuning",
                "CUDAGRAPH_RECORDING": "CUDA graph recording"}.get(getattr(trigger, "name", ""), "forward")

    def start(args=None):
        started.append(time.perf_counter())
        if on_event is not None:
            on_event(f"compiling ({what(args)}; the first step of a new shape waits for it)")

    def end(args=None):
        dt = time.perf_counter() - started.pop() if started else 0.0
        setup.compiles += 1
        setup.compile_s += dt
        if on_event is not None:
            on_event(f"compiled ({what(args)}) in {dt:.1f} s")

    from torch._dynamo.callback import callback_handler
    callback_handler.register_start_callback(start)
    callback_handler.register_end_callback(end)
    setup._callbacks.append((start, end))


# ---- CUDA graphs of decoder layers ----------------------------------------------------------------

@dataclass
class _Static:
    """Static inputs and outputs shared by the graphs of every layer with these shapes, forward
    and backward alike (the graphs read and write them; callers copy in before a replay and out
    after it). Two [tokens, dim] buffers serve both passes: a forward reads x and writes its
    output over it, a backward reads x and dy and writes dx over dy. Each output is the last
    thing its graph writes, after every read of the input it replaces, and the caller copies it
    out before the next replay (lowtune.memory_budget.graph_pool counts these two)."""
    x: torch.Tensor                       # the layer's input; a forward's output
    rot: torch.Tensor
    dy: torch.Tensor                      # a backward's output gradient in, its dx out
    grads: dict = field(default_factory=dict)   # (numel, dtype) -> flat parameter gradients


class LayerGraphs:
    """CUDA graphs of decoder layers: per layer, its forward (no autograd) and its recomputation
    with backward (the two halves of a checkpointed layer), captured on first use and replayed.

    A graph is keyed by the layer, the addresses of its weights and adapter parameters, the
    shapes and the autocast state: a streamed layer bound to one of the streamer's two slots
    (fixed addresses) replays the graph captured for that slot, which reads whatever bytes were
    copied there. All graphs share one memory pool, so the memory for intermediates is one
    layer's, not one per graph: every graph copies its outputs into static buffers that live
    outside the pool, and the caller copies them out before the next replay.

    Not captured (run as before): layers with dropout in training mode (the replayed graph would
    reuse the captured random masks) and QDyLoRA layers (their rank changes every step). Should a
    capture fail (a kernel that cannot be captured), every layer runs without graphs from then
    on, and summary() says why."""

    def __init__(self, device, on_event: Callable[[str], None] | None = None):
        self.device = torch.device(device)
        self.on_event = on_event
        self.pool = None                    # the memory pool every graph shares (first capture)
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.static: dict[tuple, _Static] = {}
        self.capture_s = 0.0
        self.replays = 0
        self.uncaptured: set[str] = set()
        self.parts: dict[int, _LayerParts] = {}
        self.failed: str | None = None      # why capture failed, when it did
        # one side stream for every warm-up and capture: each stream that multiplies holds cuBLAS
        # workspaces for good (lowtune.memory_budget counts two: compute, and this one)
        self.warmup_stream = None

    def summary(self) -> str:
        s = f"CUDA graphs: {len(self.graphs)} captured in {self.capture_s:.1f} s, {self.replays} replays"
        if self.uncaptured:
            s += f"; not captured: {', '.join(sorted(self.uncaptured))}"
        return s

    def _parts(self, layer: nn.Module) -> "_LayerParts":
        parts = self.parts.get(id(layer))
        if parts is None:
            parts = self.parts[id(layer)] = _LayerParts(layer)
        return parts

    def handles(self, layer: nn.Module) -> bool:
        """Whether this layer's work may be replayed from a graph."""
        if self.failed:
            return False
        for m in self._parts(layer).adapters:
            why = m.uncapturable()
            if why is not None:
                self.uncaptured.add(why)
                return False
        return True

    # -- keys and static buffers ---------------------------------------------------------------

    def _key(self, kind: str, layer, x, rot, extra=()) -> tuple:
        """Everything a captured graph depends on: the layer, the addresses of its weights
        (a streamed layer's are those of its slot) and parameters, shapes, modes."""
        parts = self._parts(layer)
        return (kind, id(layer), parts.addresses(), tuple(x.shape), x.dtype, tuple(rot.shape),
                layer.training, _autocast(), *extra)

    def _static(self, x, rot) -> _Static:
        key = (tuple(x.shape), x.dtype, tuple(rot.shape))
        st = self.static.get(key)
        if st is None:
            st = self.static[key] = _Static(torch.empty_like(x), torch.empty_like(rot), torch.empty_like(x))
        return st

    @staticmethod
    def _grads(st: _Static, numel: int, dtype) -> torch.Tensor:
        flat = st.grads.get((numel, dtype))
        if flat is None:
            flat = st.grads[(numel, dtype)] = torch.empty(numel, dtype=dtype, device=st.x.device)
        return flat

    def _capture(self, key, work: Callable[[], None]):
        """The graph of `work`, captured now; None when capture failed (then no layer is
        captured any more, and they all run as without graphs)."""
        t0 = time.perf_counter()
        if self.on_event is not None and not self.graphs:
            self.on_event("capturing CUDA graphs of the decoder layers (first step)")
        try:
            graph = self.graphs[key] = self._record(work)
        except RuntimeError as e:
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self._end_failed_capture()
            self.uncaptured.add(f"every layer, capture failed ({self.failed})")
            if self.on_event is not None:
                self.on_event(f"CUDA graph capture failed, layers run without graphs: {self.failed}")
            return None
        self.capture_s += time.perf_counter() - t0
        return graph

    def _record(self, work: Callable[[], None]) -> torch.cuda.CUDAGraph:
        """Warm `work` up on a side stream (torch.compile compiles there, cuBLAS and the kernels
        initialise), then capture it into the shared pool."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        enabled, dtype = _autocast()
        cur = torch.cuda.current_stream(self.device)
        if self.warmup_stream is None:
            self.warmup_stream = torch.cuda.Stream(self.device)
        side = self.warmup_stream
        side.wait_stream(cur)
        graph = torch.cuda.CUDAGraph()
        with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
            with torch.cuda.stream(side):
                work()
                # captured on the stream the warm-up ran on (what it initialised per stream is
                # there); begin/end by hand so that a failed capture still leaves this stream
                torch.cuda.synchronize(self.device)
                # the warm-up's intermediates, freed, go back to the driver: the capture lays out
                # the same working set again in the graphs' pool, and the memory budget counts
                # one of the two (lowtune.memory_budget.graph_pool)
                torch.cuda.empty_cache()
                graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
                try:
                    work()
                finally:
                    graph.capture_end()
            cur.wait_stream(side)
        return graph

    def _end_failed_capture(self) -> None:
        """After a failed capture the CUDA generator can be left in capture mode (its epilogue did
        not run), which fails every later random op; an empty capture runs it once more."""
        if torch.device(self.device).type != "cuda":  # (the CPU stand-ins of the tests)
            return
        try:
            with torch.cuda.stream(torch.cuda.Stream(self.device)):
                g = torch.cuda.CUDAGraph()
                g.capture_begin()
                g.capture_end()
        except RuntimeError:
            pass

    # -- the two halves of a checkpointed layer ------------------------------------------------

    def forward(self, layer: nn.Module, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor | None:
        """layer(x, rot) without autograd, replayed (None: capture failed, run it yourself)."""
        if self.failed:
            return None
        key = self._key("forward", layer, x, rot)
        st = self._static(x, rot)

        def fill():
            st.x.copy_(x)
            st.rot.copy_(rot)
        graph = self.graphs.get(key)
        if graph is None:
            def work():
                with torch.no_grad():
                    st.x.copy_(layer(st.x, st.rot))
            fill()                            # the warm-up runs on the real input
            graph = self._capture(key, work)
            if graph is None:
                return None
        fill()                                # after a capture too: the warm-up wrote its output there
        graph.replay()
        self.replays += 1
        return st.x.clone()

    def backward(self, layer: nn.Module, x: torch.Tensor, rot: torch.Tensor, dy: torch.Tensor,
                 params: list[torch.Tensor], need_dx: bool):
        """Recompute layer(x, rot) with autograd and backpropagate dy: (dx or None, [gradient of
        each of `params`, or None where it needs none]), replayed. None: capture failed."""
        if self.failed:
            return None
        wanted = [p for p in params if p.requires_grad]
        dtypes = {p.dtype for p in wanted}
        if len(dtypes) > 1:
            raise ValueError(f"CUDA graphs need the trainable parameters of a layer in one dtype, "
                             f"got {sorted(str(d) for d in dtypes)}")
        numel = sum(p.numel() for p in wanted)
        key = self._key("backward", layer, x, rot, (need_dx, tuple(p.requires_grad for p in params)))
        st = self._static(x, rot)
        flat_grads = self._grads(st, numel, dtypes.pop() if wanted else None)

        def fill():
            st.x.copy_(x)
            st.rot.copy_(rot)
            st.dy.copy_(dy)
        graph = self.graphs.get(key)
        if graph is None:
            # The recomputation differentiates fresh leaves over the parameters' storage: the
            # parameters' own gradient accumulators belong to the outer step's graph, made on
            # the default stream, and autograd would make that stream wait on the capture.
            names = {(p.data_ptr(), p.shape): name for name, p in layer.named_parameters()}
            leaves = {name: p.detach().requires_grad_(p.requires_grad) for name, p in layer.named_parameters()}
            wanted_leaves = [leaves[names[(p.data_ptr(), p.shape)]] for p in wanted]

            def work():
                xi = st.x.detach().requires_grad_(need_dx)
                with _reparametrize_module(layer, leaves):
                    grads = layer.checkpoint_backward(xi, st.rot, st.dy, ([xi] if need_dx else []) + wanted_leaves)
                if need_dx:                   # over dy: checkpoint_backward has done reading it
                    st.dy.copy_(grads[0])
                off = 0
                for p, g in zip(wanted, grads[int(need_dx):]):
                    view = flat_grads[off:off + p.numel()].view(p.shape)
                    view.copy_(g) if g is not None else view.zero_()
                    off += p.numel()
            fill()                            # the warm-up runs on the real inputs
            graph = self._capture(key, work)
            if graph is None:
                return None
        fill()                                # after a capture too: the warm-up wrote dx over dy
        graph.replay()
        self.replays += 1
        dx = st.dy.clone() if need_dx else None
        flat = flat_grads.clone()  # one copy; each gradient is a view of it (as DDP's buckets are)
        out, off = [], 0
        for p in params:
            if p.requires_grad:
                out.append(flat[off:off + p.numel()].view(p.shape))
                off += p.numel()
            else:
                out.append(None)
        return dx, out


class _LayerParts:
    """A layer's adapters, and where its buffers and parameters live (looked up once; the
    addresses are read at every call, since the streamer re-binds the packed weights)."""

    def __init__(self, layer: nn.Module):
        mods = list(layer.modules())
        self.adapters = [m for m in mods if isinstance(m, AdaptedLinear)]
        self.buffers = [(m._buffers, name) for m in mods for name in m._buffers]
        self.params = [p for p in layer.parameters()]

    def addresses(self) -> tuple:
        return (tuple(d[name].data_ptr() for d, name in self.buffers if d[name] is not None) +
                tuple(p.data_ptr() for p in self.params))


def _autocast() -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")


__all__ = ["MODES", "CompileSetup", "LayerGraphs", "applied", "compile_model", "default_cuda_graphs", "default_mode"]
