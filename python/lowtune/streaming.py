"""Layer streaming: the EMEF memory scheme with decoder layers kept in host memory.

A frozen packed model trains in little GPU memory when (EMEF) its weights stay packed and are
dequantized only inside the kernels, no weight gradient or dense copy exists, every decoder layer
is checkpointed (only its input is kept; the layer is recomputed in backward), the LM head and
loss run in row chunks, and the embedding gathers packed rows. lowtune's model already does all
of that; this module adds the part EMEF lacked, so that GPU memory no longer grows with depth:

    plan = stream_model(model, "cuda", max_vram=3 * 2**30, tokens=2048)   # before the optimizer
    print(plan.summary())       # which layers stay resident, which stream, the memory estimate

- Streamed layers' packed blocks live in one pinned host buffer per layer. A layer is copied
  into one of two GPU slots on a side stream while the previous layer computes: in forward order
  (0, 1, ...) in the forward pass, in reverse order in the backward pass, where each layer is
  recomputed from its checkpointed input (_StreamedLayer). A slot is overwritten only after the
  compute stream has finished with the layer it held (CUDA events), so copies and compute overlap
  without a host synchronisation.
- The planner keeps as many layers resident as the budget allows (the last ones: they run at the
  turn from forward to backward), and moves the checkpointed layer inputs to host memory when
  even they do not fit. When everything fits, nothing streams. A budget below the minimum (two
  slots, the non-layer weights, the adapters with their gradients and AdamW state, one layer's
  working set) is a ValueError that gives the minimum.
- Adapters, their gradients and optimizer state, norms, the embedding and the LM head stay on the
  GPU. Gradients of adapter parameters come back through autograd (the layer function returns
  them), so DistributedDataParallel's hooks see them as for any module.

Numerics are those of the resident model with gradient checkpointing: the same kernels on the same
inputs in the same order (tests/test_streaming.py holds losses and gradients equal).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .model import Model, QLinear

_ALIGN = 256          # byte alignment of each tensor inside a layer's pack (kernels load 16 B vectors)
_N_SLOTS = 2          # GPU copies of streamed layers: the one computing and the one arriving


# ----------------------------------------------------------------------------------------------
# Host packs and GPU slots


def _packed_linears(layer: nn.Module) -> list[QLinear]:
    """Every packed (QLinear) matrix inside a decoder layer, adapters' bases included."""
    return [m for m in layer.modules() if isinstance(m, QLinear)]


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _pack_bytes(layer: nn.Module) -> int:
    """Bytes of a layer's host pack (and of the slot it needs): its matrices, each aligned."""
    return sum(_aligned(lin.raw.numel()) for lin in _packed_linears(layer))


class _HostPack:
    """One decoder layer's packed blocks in one host buffer (pinned when `pin`), with the place of
    each QLinear's bytes in it. After construction each QLinear's `raw` is a view of the buffer."""

    def __init__(self, layer: nn.Module, pin: bool):
        self.linears = _packed_linears(layer)
        self.offsets, offset = [], 0
        for lin in self.linears:
            self.offsets.append(offset)
            offset += _aligned(lin.raw.numel())
        self.nbytes = offset
        self.buffer = torch.empty(offset, dtype=torch.uint8, pin_memory=pin)
        self.host_views = []
        for lin, off in zip(self.linears, self.offsets):
            view = self.buffer[off:off + lin.raw.numel()].view(lin.raw.shape)
            view.copy_(lin.raw)
            self.host_views.append(view)
            lin._buffers["raw"] = view

    def bind(self, slot: torch.Tensor | None) -> None:
        """Point each QLinear at its bytes in a device slot, or back at the host pack (None)."""
        for lin, off, host in zip(self.linears, self.offsets, self.host_views):
            lin._buffers["raw"] = host if slot is None else slot[off:off + host.numel()].view(host.shape)


@dataclass
class _Slot:
    buffer: torch.Tensor
    layer: int | None = None                # which layer's bytes it holds (or is receiving)
    ready: object = None                    # event: the copy into it has finished
    free: object = None                     # event: compute has finished with its last layer
    last_use: int = -1


class LayerStreamer:
    """Moves streamed layers' packed bytes host -> device just in time; see the module docstring.

    model.hidden() calls run(layer, x, rot, cache, start) for every layer once a streamer is
    installed (stream_model)."""

    def __init__(self, model: Model, device: torch.device, streamed: list[int],
                 offload_activations: bool = False):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.n_layers = len(model.layers)
        self.streamed = sorted(streamed)
        self.offload_activations = offload_activations and self.cuda
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.packs = {i: _HostPack(model.layers[i], pin=self.cuda) for i in self.streamed}
        slot_bytes = max((p.nbytes for p in self.packs.values()), default=0)
        n_slots = min(_N_SLOTS, len(self.streamed))
        self.slots = [_Slot(torch.empty(slot_bytes, dtype=torch.uint8, device=self.device))
                      for _ in range(n_slots)]
        self.clock = 0
        self.bytes_copied = 0
        # lowtune.compile.LayerGraphs, when the layers' work is replayed from CUDA graphs: the
        # slots keep their addresses, so a graph captured over a slot replays over any layer
        # copied into it later
        self.graphs = None
        self.trace: list | None = None      # set to [] to record (event, layer, bytes allocated)

    # -- slots ---------------------------------------------------------------------------------

    def _record(self, what: str, layer: int) -> None:
        if self.trace is not None:
            mem = torch.cuda.memory_allocated(self.device) if self.cuda else 0
            self.trace.append((what, layer, mem))

    def _fetch(self, i: int, keep: int | None = None) -> _Slot:
        """The slot that holds (or is receiving) layer i; starts the copy if needed. `keep`: a
        layer whose slot must not be taken."""
        for s in self.slots:
            if s.layer == i:
                return s
        free = [s for s in self.slots if s.layer is None or s.layer != keep]
        slot = min(free, key=lambda s: s.last_use)
        pack = self.packs[i]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                if slot.free is not None:
                    self.copy_stream.wait_event(slot.free)   # compute is done with its old layer
                slot.buffer[:pack.nbytes].copy_(pack.buffer, non_blocking=True)
                slot.ready = torch.cuda.Event()
                slot.ready.record(self.copy_stream)
        else:
            slot.buffer[:pack.nbytes].copy_(pack.buffer)
        slot.layer = i
        self.bytes_copied += pack.nbytes
        self._record("copy", i)
        return slot

    def _next_streamed(self, i: int, direction: int) -> int | None:
        j = i + direction
        while 0 <= j < self.n_layers:
            if j in self.packs:
                return j
            j += direction
        return None

    def acquire(self, i: int, direction: int) -> None:
        """Make layer i's weights usable on the compute stream, and start copying the next
        streamed layer in `direction` (+1 forward, -1 backward)."""
        if i in self.packs:
            slot = self._fetch(i)
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(slot.ready)
            self.clock += 1
            slot.last_use = self.clock
            self.packs[i].bind(slot.buffer)
        nxt = self._next_streamed(i, direction)
        if nxt is not None and self.slots:
            self._fetch(nxt, keep=i)
        self._record("run", i)

    def release(self, i: int) -> None:
        """Compute on layer i has been queued: its slot may be refilled once that has run."""
        if i not in self.packs:
            return
        for s in self.slots:
            if s.layer == i:
                if self.cuda:
                    s.free = torch.cuda.Event()
                    s.free.record(torch.cuda.current_stream(self.device))
                self.clock += 1
                s.last_use = self.clock
        self.packs[i].bind(None)

    @contextmanager
    def packs_aside(self):
        """Streamed layers' QLinears hold empty placeholders inside the block, so that a
        model.to(...) moves everything but the host packs."""
        for pack in self.packs.values():
            for lin in pack.linears:
                lin._buffers["raw"] = torch.empty(0, dtype=torch.uint8)
        try:
            yield
        finally:
            for pack in self.packs.values():
                pack.bind(None)

    # -- checkpointed inputs ---------------------------------------------------------------------

    def stash(self, x: torch.Tensor):
        """Keep a layer's input for its recomputation: as is, or copied to pinned host memory."""
        if not self.offload_activations:
            return x
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        compute = torch.cuda.current_stream(self.device)
        self.copy_stream.wait_stream(compute)
        with torch.cuda.stream(self.copy_stream):
            host.copy_(x, non_blocking=True)
        x.record_stream(self.copy_stream)
        done = torch.cuda.Event()
        done.record(self.copy_stream)
        return (host, done)

    def unstash(self, saved) -> torch.Tensor:
        if not isinstance(saved, tuple):
            return saved
        host, done = saved
        torch.cuda.current_stream(self.device).wait_event(done)
        return host.to(self.device, non_blocking=True)

    # -- running a layer ---------------------------------------------------------------------------

    def run(self, layer: nn.Module, x: torch.Tensor, rot: torch.Tensor, cache=None,
            start: int = 0) -> torch.Tensor:
        """layer(x, rot, cache, start), with its weights streamed in; under autograd the layer is
        checkpointed (recomputed in backward, weights streamed again in reverse order)."""
        params = [p for p in layer.parameters() if p.requires_grad]
        if cache is None and torch.is_grad_enabled() and (x.requires_grad or params):
            return _StreamedLayer.apply(self, layer, x, rot, *params)
        self.acquire(layer.index, +1)
        try:
            return layer(x, rot, cache, start)
        finally:
            self.release(layer.index)


def _autocast_state(device_type: str):
    if device_type == "cuda":
        return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    return torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")


class _StreamedLayer(torch.autograd.Function):
    """y = layer(x, rot), keeping only x (or its host copy); backward streams the layer in again,
    recomputes it under the forward's autocast and RNG state, and returns dx and the gradients of
    the layer's trainable parameters."""

    @staticmethod
    def forward(ctx, streamer: LayerStreamer, layer, x, rot, *params):
        ctx.streamer, ctx.layer = streamer, layer
        ctx.device_type = x.device.type
        ctx.autocast = _autocast_state(x.device.type)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        graphs = streamer.graphs if streamer.graphs is not None and streamer.graphs.handles(layer) else None
        ctx.graphs = graphs
        with torch.no_grad():
            streamer.acquire(layer.index, +1)
            y = None if graphs is None else graphs.forward(layer, x, rot)
            if y is None:
                y = layer(x, rot)
            streamer.release(layer.index)
        ctx.saved = streamer.stash(x.detach())
        ctx.save_for_backward(rot, *params)
        return y

    @staticmethod
    def backward(ctx, dy):
        streamer, layer = ctx.streamer, ctx.layer
        rot, *params = ctx.saved_tensors
        x = streamer.unstash(ctx.saved).detach()
        ctx.saved = None
        x.requires_grad_(ctx.needs_input_grad[2])
        streamer.acquire(layer.index, -1)
        replayed = None if ctx.graphs is None else ctx.graphs.backward(layer, x, rot, dy, params,
                                                                     ctx.needs_input_grad[2])
        if replayed is not None:
            dx, dparams = replayed
            streamer.release(layer.index)
            return (None, None, dx, None, *dparams)
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            enabled, dtype = ctx.autocast
            with torch.enable_grad(), torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled):
                y = layer(x, rot)
        wanted = ([x] if x.requires_grad else []) + [p for p in params if p.requires_grad]
        grads = list(torch.autograd.grad(y, wanted, dy, allow_unused=True))
        streamer.release(layer.index)
        dx = grads.pop(0) if x.requires_grad else None
        dparams = [grads.pop(0) if p.requires_grad else None for p in params]
        return (None, None, dx, None, *dparams)


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass
class StreamPlan:
    """What stream_model decided. Sizes in bytes; `estimate` itemises the peak it planned for."""
    device: str
    budget: int | None
    n_layers: int
    resident: list[int]
    streamed: list[int]
    offload_activations: bool
    layer_bytes: int                         # the largest layer's packed bytes
    loss_chunk_tokens: int
    estimate: dict = field(default_factory=dict)

    @property
    def streaming(self) -> bool:
        return bool(self.streamed)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        gib = _size
        if not self.streaming:
            return (f"memory budget {gib(self.budget)}: all {self.n_layers} layers fit on "
                    f"{self.device} (planned peak {gib(self.estimate['total'])}); nothing streams")
        where = "host memory" if self.offload_activations else self.device
        return (f"memory budget {gib(self.budget)}: {len(self.resident)} of {self.n_layers} layers "
                f"resident, {len(self.streamed)} streamed from pinned host memory "
                f"({self.layer_bytes / 2**20:.1f} MiB each, {_N_SLOTS} slots); checkpointed "
                f"activations in {where}; planned peak {gib(self.estimate['total'])}")


def _size(b: int) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def estimate_memory(model: Model, tokens: int, chunk: int) -> dict:
    """Bytes of each part of a training step's peak, from the model's sizes (see plan_streaming)."""
    c = model.config
    act = torch.tensor([], dtype=model.dtype).element_size()
    packs = [_pack_bytes(layer) for layer in model.layers]
    in_layers = {id(l.raw) for layer in model.layers for l in _packed_linears(layer)}
    trainable = sum(_tensor_bytes(p) for p in model.parameters() if p.requires_grad)
    frozen = sum(_tensor_bytes(p) for p in model.parameters() if not p.requires_grad)
    other = sum(_tensor_bytes(b) for b in model.buffers() if id(b) not in in_layers)
    qkv = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
    return {
        "layers": packs,
        # non-layer weights, frozen adapters, trainable adapters with gradient and AdamW m, v
        "fixed": other + frozen + 4 * trainable,
        # one checkpointed input [tokens, D] per layer
        "checkpoint": tokens * c.dim * act,
        # one layer recomputed with autograd and its backward: q/k/v, attention, residuals and
        # norms (fp32 inside RMSNorm and RoPE), the SwiGLU intermediates and their gradients
        "working": tokens * ((qkv + 10 * c.dim) * act + 6 * c.dim * 4 + 6 * c.ffn_dim * act),
        # one chunk of fp32 logits with its softmax and gradient, and dh [tokens, D]
        "head": 3 * chunk * c.vocab_size * 4 + tokens * c.dim * 4,
        # allocator rounding, cuBLAS workspace, kernel scratch (less for a toy model)
        "reserve": min(64 << 20, (sum(packs) + other) // 8),
    }


def plan_streaming(model: Model, device, budget: int, tokens: int) -> StreamPlan:
    """Decide, for a step of `tokens` tokens (batch x seq_len), which layers stay on `device`.

    Peak = fixed + resident layers + slots + checkpoints (unless offloaded) + working + head. The
    last layers stay resident first; checkpointed inputs go to host memory only when they are
    what does not fit."""
    n = len(model.layers)
    vocab = model.config.vocab_size
    # logits chunk: at most ~1/16 of the budget, between 64 and 1024 rows
    chunk = int(max(64, min(1024, (budget // 16) // (12 * vocab) // 64 * 64)))
    e = estimate_memory(model, tokens, chunk)
    layers, big = e["layers"], max(e["layers"])
    base = e["fixed"] + e["working"] + e["head"] + e["reserve"]
    ckpts = n * e["checkpoint"]
    dev = str(torch.device(device))

    def plan(resident, offload, total):
        streamed = [i for i in range(n) if i not in resident]
        est = {k: v for k, v in e.items() if k != "layers"}
        est.update(resident_layers=sum(layers[i] for i in resident),
                   slots=min(_N_SLOTS, len(streamed)) * big, checkpoints=0 if offload else ckpts,
                   total=total)
        return StreamPlan(dev, budget, n, sorted(resident), streamed, offload, big, chunk, est)

    everything = base + sum(layers) + ckpts
    if everything <= budget:
        return plan(list(range(n)), False, everything)
    slots = _N_SLOTS * big
    minimum = base + slots
    if minimum > budget:
        raise ValueError(
            f"a memory budget of {_size(budget)} is below the {_size(minimum)} "
            f"this model needs with every layer streamed ({_N_SLOTS} layer slots of "
            f"{big / 2**20:.0f} MiB, {e['fixed'] / 2**20:.0f} MiB of embedding, head and adapters "
            f"with their optimizer state, {(e['working'] + e['head']) / 2**20:.0f} MiB for one "
            f"layer's activations at {tokens} tokens). Give --max-vram at least "
            f"{math.ceil(minimum / 2**20)}MB, or lower --seq-len/--batch or the adapter rank")
    def fill(room):
        resident: list[int] = []
        for i in reversed(range(n)):           # the last layers first
            if layers[i] > room or len(resident) == n - 1:
                break
            resident.append(i)
            room -= layers[i]
        return resident, room

    # Checkpointed inputs go to host memory when that keeps more layers resident (a layer's
    # input is a fraction of its weights' bytes); a tie keeps them on the device.
    kept, kept_room = fill(budget - base - slots - ckpts) if base + slots + ckpts <= budget else (None, 0)
    moved, moved_room = fill(budget - base - slots)
    if kept is not None and len(kept) >= len(moved):
        return plan(kept, False, budget - kept_room)
    return plan(moved, True, budget - moved_room)


def stream_model(model: Model, device, max_vram: int | None = None, tokens: int = 2048,
                 streamed: list[int] | None = None, offload_activations: bool = False) -> StreamPlan:
    """Place `model` (its packed weights on the CPU, adapters applied) on `device` within
    `max_vram` bytes, streaming the layers that do not fit; returns the plan.

    `streamed` (a list of layer indices) bypasses the planner: those layers stream, whatever the
    budget (tests use it, also with device="cpu", where "host" and "device" are both the CPU)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if streamed is None:
        if max_vram is None:
            raise ValueError("stream_model needs max_vram (bytes) or an explicit list of streamed layers")
        plan = plan_streaming(model, device, int(max_vram), tokens)
    else:
        bad = [i for i in streamed if not 0 <= i < len(model.layers)]
        if bad:
            raise ValueError(f"streamed layers {bad} do not exist (the model has {len(model.layers)})")
        n = len(model.layers)
        plan = StreamPlan(str(device), max_vram, n, [i for i in range(n) if i not in streamed],
                          sorted(set(streamed)), offload_activations,
                          max(_pack_bytes(layer) for layer in model.layers), model.loss_chunk_tokens)
    model.loss_chunk_tokens = plan.loss_chunk_tokens
    if not plan.streaming:
        model.to(device)
        model.gradient_checkpointing = True
        return plan
    if device.type == "cuda" and any(l.raw.is_cuda for i in plan.streamed
                                     for l in _packed_linears(model.layers[i])):
        raise ValueError("stream_model needs the model's packed weights in host memory: load it "
                         "with device='cpu' (lowtune.load_model(path, device='cpu'))")
    # Host packs first (each QLinear then views its pack), then everything else to the device
    # without the streamed bytes passing through it.
    model.streamer = LayerStreamer(model, device, plan.streamed, plan.offload_activations)
    model.to(device)                            # all but the streamed packs (Model._apply)
    model.gradient_checkpointing = True
    return plan
