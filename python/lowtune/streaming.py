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
- The budget is the driver's count of the process's GPU memory: lowtune.memory_budget measures
  and counts what lives beside torch's tensors (context, workspaces, the extension's scratch,
  allocator slack), and on CUDA one layer's working set is measured too (measure_working). The
  planner keeps as many layers resident as the budget allows (the last ones: they run at the
  turn from forward to backward), and moves the checkpointed layer inputs to host memory when
  even they do not fit. Where the budget is tight, it keeps AdamW's moments in host memory
  (lowtune.host_adamw) and leaves no room for CUDA graphs of the layers (plan.optimizer_on_host,
  plan.cuda_graphs say so). When everything fits, nothing streams. A budget below the minimum
  (two slots, the non-layer weights, the adapters with their gradients, one layer's working set,
  the driver's terms) is a ValueError that gives the minimum, in the same terms.
- With a host-memory limit (plan_host), the streamed layers beyond it stay in the GGUF file and
  are read into a ring of pinned buffers ahead of their use (lowtune.disk_ring).
- An untied token embedding stays in host memory while layers stream (plan.embedding_on_host):
  a step gathers and decodes its rows there and copies those alone. Adapters, their gradients,
  norms and the LM head (with a tied embedding) stay on the GPU. Gradients of
  adapter parameters come back through autograd (the layer function returns them), so
  DistributedDataParallel's hooks see them as for any module.

Numerics are those of the resident model with gradient checkpointing: the same kernels on the same
inputs in the same order (tests/test_streaming.py holds losses and gradients equal).
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import _C
from .adapters import AdaptedLinear
from .disk_ring import DiskLayers, read_ranges
from .gguf_io import GGUFFile
from .host_adamw import staging_bytes
from .memory_budget import GRAPH_EXEC_BYTES, DeviceBudget, attention_workspace, graph_pool, prepare_process
from .memory_budget import size as _size
from .model import Model, QLinear
from .ops import ACT_DTYPES

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


def pack_layout(layer: nn.Module) -> list[tuple[QLinear, int]]:
    """(QLinear, offset of its bytes) in a layer's pack, host buffer and GPU slot alike."""
    out, offset = [], 0
    for lin in _packed_linears(layer):
        out.append((lin, offset))
        offset += _aligned(lin.raw.numel())
    return out


def file_ranges(model: Model, path, layers) -> dict[int, list[tuple[int, int, int]]]:
    """Where each of `layers`' packed matrices is in the GGUF file `path` the model was loaded
    from: {layer: [(file offset, bytes, offset in the layer's pack)]}."""
    with GGUFFile(path) as f:
        infos = dict(f.tensor_infos)
    out = {}
    for i in layers:
        ranges = []
        for lin, pack_offset in pack_layout(model.layers[i]):
            name, first = (lin.fused_from[0], lin.fused_from[1]) if lin.fused_from is not None else (lin.name, 0)
            info = infos.get(name)
            if info is None:
                raise ValueError(f"{path} has no tensor {name!r}: the model was not loaded from this file")
            row = info.nbytes // max(info.n_elements // info.ne[0], 1)
            if info.nbytes < (first * row) + lin.raw.numel():
                raise ValueError(f"{path}: tensor {name!r} is smaller than layer {i}'s {lin.name}")
            ranges.append((info.offset + first * row, lin.raw.numel(), pack_offset))
        out[i] = ranges
    return out


class _Pack:
    """Where each QLinear's bytes go in a layer's pack, and their home between uses: the host
    pack (a pinned buffer of the layer's blocks: `buffer`; read from `source` when given, a
    (file descriptor, ranges) pair, else copied from the QLinears) or, for a layer read from disk
    (`buffer` None), the tensors the QLinears held (views of the memory-mapped file)."""

    def __init__(self, layer: nn.Module, pin: bool, in_host: bool = True, source=None):
        layout = pack_layout(layer)
        self.linears = [lin for lin, _ in layout]
        self.offsets = [off for _, off in layout]
        self.nbytes = _pack_bytes(layer)
        self.buffer = None
        self.home = [lin.raw for lin in self.linears]
        if in_host:
            self.buffer = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pin)
            views = [self.buffer[off:off + lin.raw.numel()].view(lin.raw.shape)
                     for lin, off in zip(self.linears, self.offsets)]
            if source is not None:
                read_ranges(source[0], source[1], self.buffer.numpy())
            else:
                for view, lin in zip(views, self.linears):
                    view.copy_(lin.raw)
            self.home = views
        self.bind(None)

    def bind(self, slot: torch.Tensor | None) -> None:
        """Point each QLinear at its bytes in a device slot, or back at its home (None)."""
        for lin, off, home in zip(self.linears, self.offsets, self.home):
            lin._buffers["raw"] = home if slot is None else slot[off:off + home.numel()].view(home.shape)


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
                 offload_activations: bool = False, disk: DiskLayers | None = None,
                 host_embedding: bool = False):
        self.device = torch.device(device)
        # the token embedding's blocks stay where they are (host memory): model.hidden gathers
        # a step's rows there and moves only those
        self.embedding = model.tok_embd if host_embedding else None
        self.cuda = self.device.type == "cuda"
        self.n_layers = len(model.layers)
        self.streamed = sorted(streamed)
        self.offload_activations = offload_activations and self.cuda
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        # offloaded checkpoints go out on a stream of their own: device-to-host copies then run
        # beside the host-to-device weight copies (PCIe is duplex) instead of queueing behind them
        self.offload_stream = torch.cuda.Stream(self.device) if self.offload_activations else None
        self._host_inputs: dict[int, tuple] = {}     # layer -> its offloaded input (stash)
        self._prefetched: dict[int, tuple] = {}      # layer -> its input copied back ahead (prefetch)
        on_disk = set(disk.layers) if disk is not None else set()
        if not on_disk <= set(self.streamed):
            raise ValueError(f"layers {sorted(on_disk - set(self.streamed))} are to be read from disk "
                             "but do not stream")
        fd = os.open(disk.path, os.O_RDONLY) if disk is not None else None
        try:
            self.packs = {i: _Pack(model.layers[i], pin=self.cuda, in_host=i not in on_disk,
                                   source=None if fd is None else (fd, disk.ranges[i]))
                          for i in self.streamed}
        finally:
            if fd is not None:
                os.close(fd)
        # the layers read from disk come through a ring of pinned buffers (lowtune.disk_ring)
        self.ring = disk.ring(self.streamed, pin=self.cuda, n_slots=_N_SLOTS) if on_disk else None
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

    def _fetch(self, i: int, direction: int = 1, keep: int | None = None) -> _Slot:
        """The slot that holds (or is receiving) layer i; starts the copy if needed. `keep`: a
        layer whose slot must not be taken; `direction`: where the pass goes next (the disk ring
        reads ahead that way)."""
        for s in self.slots:
            if s.layer == i:
                return s
        free = [s for s in self.slots if s.layer is None or s.layer != keep]
        slot = min(free, key=lambda s: s.last_use)
        pack = self.packs[i]
        source = pack.buffer if pack.buffer is not None else self.ring.get(i, direction)
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                if slot.free is not None:
                    self.copy_stream.wait_event(slot.free)   # compute is done with its old layer
                slot.buffer[:pack.nbytes].copy_(source, non_blocking=True)
                slot.ready = torch.cuda.Event()
                slot.ready.record(self.copy_stream)
        else:
            slot.buffer[:pack.nbytes].copy_(source)
        if pack.buffer is None:
            self.ring.release(i, slot.ready)       # the ring may refill it once copied
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
            slot = self._fetch(i, direction)
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(slot.ready)
            self.clock += 1
            slot.last_use = self.clock
            self.packs[i].bind(slot.buffer)
        nxt = self._next_streamed(i, direction)
        if nxt is not None and self.slots:
            self._fetch(nxt, direction, keep=i)
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
        embedding = None if self.embedding is None else self.embedding._buffers["raw"]
        if embedding is not None:
            self.embedding._buffers["raw"] = torch.empty(0, dtype=torch.uint8)
        try:
            yield
        finally:
            for pack in self.packs.values():
                pack.bind(None)
            if embedding is not None:
                self.embedding._buffers["raw"] = embedding

    # -- checkpointed inputs ---------------------------------------------------------------------

    def stash(self, x: torch.Tensor, layer: int):
        """Keep a layer's input for its recomputation: as is, or copied to pinned host memory.
        Called before the layer's forward is queued, so the copy out overlaps that compute."""
        if not self.offload_activations:
            return x
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        self.offload_stream.wait_stream(torch.cuda.current_stream(self.device))   # x is written
        with torch.cuda.stream(self.offload_stream):
            host.copy_(x, non_blocking=True)
        x.record_stream(self.offload_stream)
        done = torch.cuda.Event()
        done.record(self.offload_stream)
        self._host_inputs[layer] = (host, done)
        self._prefetched.pop(layer, None)     # a copy left by a backward that did not finish
        return (host, done)

    def prefetch(self, layer: int) -> None:
        """Start copying `layer`'s offloaded input back on the copy stream (the backward pass
        calls this for the layer it runs next), so that unstash finds it on the device."""
        saved = self._host_inputs.pop(layer, None)
        if saved is None:                     # not offloaded, or already on its way
            return
        host, done = saved
        compute = torch.cuda.current_stream(self.device)
        # allocated on the compute stream, whose queued work may still use the block's last
        # tenant: the copy waits for that work (queued so far, not what comes next)
        dev = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        self.copy_stream.wait_stream(compute)
        self.copy_stream.wait_event(done)
        with torch.cuda.stream(self.copy_stream):
            dev.copy_(host, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(self.copy_stream)
        self._prefetched[layer] = (dev, ready)

    def unstash(self, saved, layer: int) -> torch.Tensor:
        if not isinstance(saved, tuple):
            return saved
        self._host_inputs.pop(layer, None)
        compute = torch.cuda.current_stream(self.device)
        ahead = self._prefetched.pop(layer, None)
        if ahead is not None:
            dev, ready = ahead
            compute.wait_event(ready)
            return dev
        host, done = saved
        compute.wait_event(done)
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
        ctx.saved = streamer.stash(x.detach(), layer.index)
        with torch.no_grad():
            streamer.acquire(layer.index, +1)
            y = None if graphs is None else graphs.forward(layer, x, rot)
            if y is None:
                y = layer(x, rot)
            streamer.release(layer.index)
        ctx.save_for_backward(rot, *params)
        return y

    @staticmethod
    def backward(ctx, dy):
        streamer, layer = ctx.streamer, ctx.layer
        rot, *params = ctx.saved_tensors
        x = streamer.unstash(ctx.saved, layer.index).detach()
        ctx.saved = None
        streamer.prefetch(layer.index - 1)            # the input of the layer backward runs next
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
            wanted = ([x] if x.requires_grad else []) + [p for p in params if p.requires_grad]
            grads = layer.checkpoint_backward(x, rot, dy, wanted, lambda: torch.autocast(
                ctx.device_type, dtype=dtype, enabled=enabled))
        streamer.release(layer.index)
        dx = grads.pop(0) if x.requires_grad else None
        dparams = [grads.pop(0) if p.requires_grad else None for p in params]
        return (None, None, dx, None, *dparams)


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass
class StreamPlan:
    """What stream_model decided. Sizes in bytes; `estimate` itemises the tensors' peak it planned
    for ("total"), `driver` the driver's peak around it (lowtune.memory_budget, "total")."""
    device: str
    budget: int | None
    n_layers: int
    resident: list[int]
    streamed: list[int]
    offload_activations: bool
    layer_bytes: int                         # the largest layer's packed bytes
    loss_chunk_tokens: int
    estimate: dict = field(default_factory=dict)
    cuda_graphs: bool = False                # the budget leaves room for CUDA graphs of the layers
    optimizer_on_host: bool = False          # AdamW's moments in host memory (lowtune.host_adamw)
    driver: dict = field(default_factory=dict)
    terms: dict = field(default_factory=dict)  # the budget's measured terms (DeviceBudget)
    small_scratch: bool = False              # the extension's chunks at SMALL_CHUNK_MIN (tight budgets)
    mlp_chunks: int = 1                      # token chunks of each layer's MLP (DecoderLayer.mlp_chunks)
    disk_layers: list[int] = field(default_factory=list)  # streamed from the model file (--host-ram)
    host: dict = field(default_factory=dict)   # host memory the plan holds, itemised (--host-ram)
    embedding_on_host: bool = False          # the token embedding's blocks stay in host memory

    @property
    def streaming(self) -> bool:
        return bool(self.streamed)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        gib = _size
        peak = f"planned peak {gib(self.estimate.get('total', 0))} allocated"
        if "context" in self.driver:
            peak += f", {gib(self.driver['total'])} on the driver's count"
        extras = []
        if self.optimizer_on_host:
            extras.append("AdamW state in host memory")
        if self.cuda_graphs:
            extras.append("room for CUDA graphs")
        if self.small_scratch:
            extras.append(f"dequantization chunks of {SMALL_CHUNK_MIN} rows")
        if self.mlp_chunks > 1:
            extras.append(f"MLP in {self.mlp_chunks} token chunks")
        if self.embedding_on_host:
            extras.append("token embedding in host memory")
        extra = "".join(f"; {e}" for e in extras)
        if not self.streaming:
            return (f"memory budget {gib(self.budget)}: all {self.n_layers} layers fit on "
                    f"{self.device} ({peak}){extra}; nothing streams")
        where = "host memory" if self.offload_activations else self.device
        source = "pinned host memory"
        if self.disk_layers:
            source = (f"pinned host memory ({len(self.streamed) - len(self.disk_layers)}) and the model "
                      f"file ({len(self.disk_layers)}, through {self.host.get('ring_buffers', 0)} pinned "
                      f"buffers; host memory {gib(self.host.get('total', 0))} of {gib(self.host.get('budget', 0))})")
        return (f"memory budget {gib(self.budget)}: {len(self.resident)} of {self.n_layers} layers "
                f"resident, {len(self.streamed)} streamed from {source} "
                f"({self.layer_bytes / 2**20:.1f} MiB each, {_N_SLOTS} slots); checkpointed "
                f"activations in {where}{extra}; {peak}")


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# LOWTUNE_CUDA_CHUNK_MIN where the budget needs the extension's scratch small: chunks of W as
# narrow as 256 rows or columns (the default's 1024 keep more of the GPU busy per cuBLAS call).
SMALL_CHUNK_MIN = 256


@contextmanager
def _chunk_min(small: bool):
    """The extension's chunk floor for what runs inside (it reads the variable on every call);
    a floor the user set stays."""
    if not small or "LOWTUNE_CUDA_CHUNK_MIN" in os.environ:
        yield
        return
    os.environ["LOWTUNE_CUDA_CHUNK_MIN"] = str(SMALL_CHUNK_MIN)
    try:
        yield
    finally:
        del os.environ["LOWTUNE_CUDA_CHUNK_MIN"]


def scratch_bytes(model: Model, tokens: int, chunk: int, small: bool = False) -> int:
    """The largest scratch one quantized product of a training step takes in lowtune's CUDA
    extension (its chunk buffers, outside torch's allocator): every decoder linear's forward and
    input gradient at `tokens` rows, the LM head's at `chunk` rows; `small`: with the chunk floor
    SMALL_CHUNK_MIN."""
    dtype = ACT_DTYPES.get(model.dtype, 0)
    shapes = {(lin.out_features, lin.in_features) for layer in model.layers for lin in _packed_linears(layer)}
    products = [(tokens, n, k) for n, k in shapes]
    head = model.head_weight()
    products.append((chunk, head.shape[0], head.shape[1]))
    with _chunk_min(small):
        return max((_C.cuda_scratch_bytes(p, m, n, k, dtype) for m, n, k in products
                    for p in ("forward", "input_grad")), default=0)


# Token chunks the planner may run each layer's MLP in (DecoderLayer.mlp_chunks), fewest first:
# every chunk dequantizes the MLP's weights again, and its products are narrower.
MLP_CHUNKS = (1, 2, 4, 8)


def estimate_memory(model: Model, tokens: int, chunk: int, working: int | dict | None = None,
                    small_scratch: bool = False, mlp_chunks: int = 1) -> dict:
    """Bytes of each part of a training step's peak, from the model's sizes (see plan_streaming).
    `working`: one layer's working set as measured (measure_working: {MLP chunks: bytes}; a
    number is the unchunked one); None: from the shapes. small_scratch: the extension's scratch
    with its chunk floor at SMALL_CHUNK_MIN. mlp_chunks: the token chunks of the layers' MLP."""
    c = model.config
    act = torch.tensor([], dtype=model.dtype).element_size()
    packs = [_pack_bytes(layer) for layer in model.layers]
    in_layers = {id(l.raw) for layer in model.layers for l in _packed_linears(layer)}
    trainable = [_tensor_bytes(p) for p in model.parameters() if p.requires_grad]
    frozen = sum(_tensor_bytes(p) for p in model.parameters() if not p.requires_grad)
    other = sum(_tensor_bytes(b) for b in model.buffers() if id(b) not in in_layers)
    layer_trainable = max((sum(_tensor_bytes(p) for p in layer.parameters() if p.requires_grad)
                           for layer in model.layers), default=0)
    embedding = _untied_embedding_bytes(model)
    if isinstance(working, dict):
        working = working[mlp_chunks]
    elif working is not None and mlp_chunks != 1:
        raise ValueError("a working set measured without MLP chunks cannot stand for a chunked one")
    measured = working is not None
    q = c.n_heads * c.head_dim
    if working is None:
        # one layer recomputed with autograd and its backward, as saved and produced: the fp32
        # inputs RMSNorm keeps (2), the normed inputs, x, y, dy and dx (6); q, k and v repeated to
        # every head, the attention output and the output projection's input (5); for one MLP
        # chunk's rows, the SwiGLU gate, activation, up and product, and the gradients of three
        # of them (7); chunked, ffn_norm's fp32 input and normed output are one chunk's too
        # (DecoderLayer.norm_mlp), and so is attn_norm's fp32 input (checkpoint_backward takes
        # its gradient a chunk at a time; its normed output stays whole, the attention's
        # products read it whole), and the residual's gradient is gathered chunk by chunk
        rows = -(-tokens // mlp_chunks)
        working = tokens * (2 * 4 * c.dim + act * (6 * c.dim + 5 * q)) + rows * act * 7 * c.ffn_dim
        if mlp_chunks > 1:
            working += tokens * c.dim * act - (tokens - rows) * c.dim * (2 * 4 + act)
    return {
        "layers": packs,
        # non-layer weights and frozen adapters, but for the host-side embedding
        "weights": other + frozen - embedding,
        "embedding": embedding,
        # trainable adapters: their parameters (fp32)
        "adapters": sum(trainable),
        "adapter_sizes": trainable,
        "layer_adapters": layer_trainable,
        # non-layer weights, frozen adapters, trainable adapters with gradient and AdamW m, v
        "fixed": other + frozen + 4 * sum(trainable),
        # one checkpointed input [tokens, D] per layer
        "checkpoint": tokens * c.dim * act,
        "working": int(working),
        # a measured working set holds SDPA's workspace already
        "working_measured": measured,
        # whether CUDA graphs can replay every layer of a training step (then their pool holds
        # the working set), whatever mode the model is in while the plan is made
        "every_layer_capturable": all(m.uncapturable(training=True) is None for m in model.modules()
                                      if isinstance(m, AdaptedLinear)),
        # SDPA's flash backward: its fp32 accumulators
        "attention": attention_workspace(tokens, c.n_heads, c.head_dim),
        # one layer's two CUDA graphs (forward, backward), with the MLP whole: the only way the
        # planner captures layers (_options)
        "layer_graphs": 2 * GRAPH_EXEC_BYTES,
        # the RoPE tables of a step (Model.rope_rotation): the graphs' static copy
        "rotation": model.rope_inv_freq.shape[0] * 2 * tokens * c.rope_dim * 4,
        # one chunk of fp32 logits with its softmax and gradient, and dh [tokens, D]
        "head": 3 * chunk * c.vocab_size * 4 + tokens * c.dim * 4,
        # the extension's dequantization scratch (driver-level: lowtune.memory_budget)
        "scratch": scratch_bytes(model, tokens, chunk, small_scratch),
    }


def _base(e: dict, tokens: int, dim: int, act: int, graphs: bool, on_host: bool) -> dict:
    """Everything but the layers, the checkpoints and the device-side embedding, in tensors:
    weights, adapters (with gradients, and AdamW's moments unless they live in host memory, where
    a step stages them in chunks), one layer's working set and the attention workspace, the LM
    head's chunk, and the pool of the CUDA graphs.

    The head's chunk (in the loss) and a layer's working set (in the backward) are never alive at
    once, so the head counts only beyond the working set; unless CUDA graphs keep the working set
    in their pool for good, and the head then comes on top."""
    adapters = e["adapters"] * (2 if on_host else 4)
    attention = 0 if e.get("working_measured") else e["attention"]
    pooled = graphs and e["every_layer_capturable"]
    layer = e["working"] + attention
    parts = {"weights": e["weights"], "adapters": adapters,
             "optimizer_staging": staging_bytes(e["adapter_sizes"]) if on_host else 0,
             "working": e["working"], "attention": attention,
             "head": e["head"] if pooled else max(0, e["head"] - layer),
             "graph_pool": graph_pool(e["working"], tokens, dim, act, e["layer_adapters"], len(e["layers"]),
                                      e["every_layer_capturable"], e["rotation"], e["layer_graphs"]) if graphs else 0}
    return parts


def _options(cuda_graphs: bool, host_optimizer: bool | None,
             mlp_chunks=MLP_CHUNKS) -> list[tuple[bool, bool, bool, int]]:
    """(graphs, optimizer on host, small scratch, MLP chunks) in the order the planner tries
    them: what costs least speed first. Giving up CUDA graphs costs the host's dispatch of every
    operator (several times any of the others: it is given up last); moving AdamW's state to the
    host costs a copy of it each way per step; narrower scratch chunks cost the large products
    some of the GPU's width; every MLP chunk dequantizes the MLP's weights once more.
    Graphs go with the MLP whole only: captured with the MLP in 4 chunks (7B, seq 2048, a 2112 MiB
    budget) they peaked 166 MiB above the plan in NVML's count, and ran at 0.60x resident
    (BENCHMARKS.md, "The MLP in token chunks"); until the planner counts that case, it is not
    offered."""
    hosts = [False, True] if host_optimizer is None else [bool(host_optimizer)]
    graphs = [True, False] if cuda_graphs else [False]
    return [(g, h, small, m) for g in graphs for m in mlp_chunks for small in (False, True) for h in hosts
            if not (g and m > 1)]


def plan_streaming(model: Model, device, budget: int, tokens: int, *, cuda_graphs: bool = False,
                   host_optimizer: bool | None = None, device_budget: DeviceBudget | None = None,
                   working: int | dict | None = None) -> StreamPlan:
    """Decide, for a step of `tokens` tokens (batch x seq_len), which layers stay on `device`.

    The tensors' peak = base (_base) + resident layers + slots + checkpoints (unless offloaded);
    `device_budget` (lowtune.memory_budget; default: the budget bounds the tensors alone) adds the
    driver's terms and says what fits. The planner takes the first of _options that fits with
    every layer streamed, with the largest LM-head chunk that does; then the last layers stay
    resident first, and checkpointed inputs go to host memory only when they are what does not
    fit. cuda_graphs: the caller would capture the layers in CUDA graphs (their pool is counted,
    and dropped when it does not fit); host_optimizer: None lets the planner move AdamW's state
    to host memory when that is what fits, True/False decides. working: one layer's working set
    as measured (measure_working: {MLP chunks: bytes}, the chunk counts it may choose; a number:
    unchunked only); None: estimated from the shapes, for every count in MLP_CHUNKS."""
    db = device_budget if device_budget is not None else DeviceBudget.unmetered(budget, str(device))
    if torch.device(device).type != "cuda":
        host_optimizer = False                 # the host is the device
    budget = db.budget
    n = len(model.layers)
    c = model.config
    act = torch.tensor([], dtype=model.dtype).element_size()
    # logits chunk: at most ~1/16 of the budget, between 64 and 1024 rows; smaller where needed
    first = int(max(64, min(1024, (budget // 16) // (12 * c.vocab_size) // 64 * 64)))
    chunks = [first] + [k for k in (512, 256, 128, 64) if k < first]
    estimates: dict[tuple, dict] = {}
    dev = str(torch.device(device))
    smallest = None                            # (driver total, items, option) of the leanest plan
    measured = sorted(working) if isinstance(working, dict) else [1] if working is not None else MLP_CHUNKS
    for graphs, on_host, small, mlp in _options(cuda_graphs, host_optimizer, measured):
        for chunk in chunks:
            e = estimates.get((chunk, small, mlp)) or estimates.setdefault(
                (chunk, small, mlp), estimate_memory(model, tokens, chunk, working, small, mlp))
            layers, big = e["layers"], max(e["layers"])
            parts = _base(e, tokens, c.dim, act, graphs, on_host)
            base = sum(parts.values())
            ckpts = n * e["checkpoint"]
            room = db.tensor_room(e["scratch"], graphs)
            slots = _N_SLOTS * big
            everything = base + sum(layers) + ckpts + e["embedding"]
            need = min(everything, base + slots + e["checkpoint"])
            if need > room:
                items = db.total(need, e["scratch"], graphs)
                if smallest is None or items["total"] < smallest[0]:
                    smallest = (items["total"], items, parts, e)
                continue
            plan = _fill(model, dev, db, e, parts, chunk, graphs, on_host, room)
            plan.small_scratch = small
            plan.mlp_chunks = mlp
            return plan
    total, items, parts, e = smallest
    what = ", ".join(f"{k.replace('_', ' ')} {_size(v)}" for k, v in parts.items() if v)
    raise ValueError(
        f"a memory budget of {_size(budget)} is below the {_size(total)} this model needs with "
        f"every layer streamed ({_N_SLOTS} layer slots of {_size(max(e['layers']))}; {what}"
        f"{'' if items.get('context') is None else '; on the driver: ' + db.describe(items)}; "
        f"at {tokens} tokens). Give --max-vram at least {math.ceil(total / 2**20)}MB, or lower "
        f"--seq-len/--batch or the adapter rank")


def _untied_embedding_bytes(model: Model) -> int:
    """The token embedding's bytes when it is not tied to the LM head (else 0): what may stay in
    host memory while layers stream (a step gathers its rows there); tied, the LM head reads it
    on the device."""
    return _tensor_bytes(model.tok_embd.raw) if model.output is not None else 0


def embedding_stays_on_host(model: Model, streaming: bool, device) -> bool:
    """Whether the token embedding's blocks stay in host memory: when layers stream to a CUDA
    device and the embedding is untied."""
    return streaming and _untied_embedding_bytes(model) > 0 and torch.device(device).type == "cuda"


def _fill(model: Model, dev: str, db: DeviceBudget, e: dict, parts: dict, chunk: int, graphs: bool,
          on_host: bool, room: int) -> StreamPlan:
    """The plan for one option that fits: as many layers resident as `room` allows."""
    n = len(model.layers)
    layers, big = e["layers"], max(e["layers"])
    base = sum(parts.values())
    ckpts = n * e["checkpoint"]

    def plan(resident, offload, total):
        streamed = [i for i in range(n) if i not in resident]
        host_embedding = embedding_stays_on_host(model, bool(streamed), dev)
        est = {k: v for k, v in e.items() if k not in ("layers", "adapter_sizes")}
        est.update(parts)
        est.update(resident_layers=sum(layers[i] for i in resident),
                   slots=min(_N_SLOTS, len(streamed)) * big,
                   checkpoints=e["checkpoint"] if offload else ckpts,
                   embedding=0 if host_embedding else e["embedding"], total=total)
        return StreamPlan(dev, db.budget, n, sorted(resident), streamed, offload, big, chunk, est,
                          cuda_graphs=graphs, optimizer_on_host=on_host,
                          driver=db.total(total, e["scratch"], graphs), terms=db.to_dict(),
                          embedding_on_host=host_embedding)

    everything = base + sum(layers) + ckpts + e["embedding"]
    if everything <= room:
        return plan(list(range(n)), False, everything)
    slots = _N_SLOTS * big

    def fill(space):
        resident: list[int] = []
        for i in reversed(range(n)):           # the last layers first
            if layers[i] > space or len(resident) == n - 1:
                break
            resident.append(i)
            space -= layers[i]
        return resident, space

    # Checkpointed inputs go to host memory when that keeps more layers resident (a layer's
    # input is a fraction of its weights' bytes); a tie keeps them on the device.
    kept, kept_room = fill(room - base - slots - ckpts) if base + slots + ckpts <= room else (None, 0)
    # offloaded, one layer's input is on the device ahead of its backward (LayerStreamer.prefetch)
    moved, moved_room = fill(room - base - slots - e["checkpoint"])
    if kept is not None and len(kept) >= len(moved):
        return plan(kept, False, room - kept_room)
    return plan(moved, True, room - moved_room)


RING_BUFFERS = 3      # pinned buffers of the disk ring: one copying to the GPU, two reading ahead


def plan_host(plan: StreamPlan, model: Model, host_ram: int) -> StreamPlan:
    """Which streamed layers keep a pinned pack in host memory within `host_ram` bytes, the
    others read from the model file through the disk ring (lowtune.disk_ring): the latest
    streamed layers stay in memory first. Host memory also holds the offloaded checkpoints and
    AdamW's state when the plan puts them there. Fills plan.disk_layers and plan.host."""
    e = plan.estimate
    layers = [_pack_bytes(layer) for layer in model.layers]
    host = {"budget": int(host_ram),
            # offloaded checkpoints are pinned host copies (on a CUDA device; on the CPU they stay)
            "checkpoints": len(layers) * e["checkpoint"] if plan.offload_activations and plan.device.startswith("cuda") else 0,
            "optimizer_state": 2 * e["adapters"] if plan.optimizer_on_host else 0,
            "embedding": _untied_embedding_bytes(model) if plan.embedding_on_host else 0,
            "packs": sum(layers[i] for i in plan.streamed), "ring": 0, "ring_buffers": 0}
    fixed = host["checkpoints"] + host["optimizer_state"] + host["embedding"]
    disk: list[int] = []
    if fixed + host["packs"] > host_ram:
        host["ring_buffers"] = RING_BUFFERS
        host["ring"] = RING_BUFFERS * plan.layer_bytes
        room = host_ram - fixed - host["ring"]
        if room < 0:
            need = fixed + host["ring"]
            raise ValueError(f"--host-ram {_size(host_ram)} is below the {_size(need)} this plan holds in "
                             f"host memory with every streamed layer read from disk ({RING_BUFFERS} "
                             f"ring buffers of {_size(plan.layer_bytes)}"
                             + (f", checkpoints {_size(host['checkpoints'])}" if host["checkpoints"] else "")
                             + (f", AdamW state {_size(host['optimizer_state'])}" if host["optimizer_state"] else "")
                             + (f", token embedding {_size(host['embedding'])}" if host["embedding"] else "")
                             + f"). Give --host-ram at least {math.ceil(need / 2**20)}MB")
        kept = []
        for i in reversed(plan.streamed):
            if layers[i] > room:
                break
            kept.append(i)
            room -= layers[i]
        disk = [i for i in plan.streamed if i not in kept]
        host["packs"] = sum(layers[i] for i in kept)
    host["total"] = fixed + host["packs"] + host["ring"]
    plan.disk_layers = disk
    plan.host = host
    return plan


def measure_working(model: Model, device, tokens: int, mlp_chunks=MLP_CHUNKS) -> dict[int, int]:
    """Bytes torch allocates at its peak to run the largest decoder layer forward, then recompute
    it with autograd and backpropagate, as a checkpointed step does (DecoderLayer.
    checkpoint_backward), measured on `device` (CUDA) with a temporary copy of the layer, for each
    count of MLP token chunks: {chunks: bytes}. The kernels a step uses are loaded on the way. The
    layer's input counts too."""
    device = torch.device(device)
    i = max(range(len(model.layers)), key=lambda j: _pack_bytes(model.layers[j]))
    layer = model.layers[i]
    moved, chunks = [], layer.mlp_chunks
    try:
        for m in layer.modules():
            for name, b in m._buffers.items():
                if b is not None:
                    moved.append((m._buffers, name, b))
                    m._buffers[name] = b.to(device)
            for p in m._parameters.values():
                if p is not None:
                    moved.append((p, None, p.data))
                    p.data = p.data.to(device)
        c = model.config
        rot = model.rope_rotation(0, tokens).to(device)
        x = torch.randn(1, tokens, c.dim, device=device, dtype=model.dtype)
        # torch's cuBLAS workspaces of this stream come first: the budget counts them apart
        torch.ones(64, 64, device=device, dtype=model.dtype) @ torch.ones(64, 64, device=device, dtype=model.dtype)
        dy = torch.randn_like(x)
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        half = model.dtype != torch.float32
        autocast = lambda: torch.autocast("cuda", dtype=model.dtype if half else torch.bfloat16,  # noqa: E731
                                          enabled=half)
        params = [p for p in layer.parameters() if p.requires_grad]
        peaks = {}
        for n in mlp_chunks:
            layer.mlp_chunks = n
            torch.cuda.reset_peak_memory_stats(device)
            with torch.no_grad(), autocast():
                del_y = layer(x, rot)
                del del_y
            xg = x.detach().requires_grad_()
            grads = layer.checkpoint_backward(xg, rot, dy, [xg] + params, autocast)
            del grads, xg
            torch.cuda.synchronize(device)
            # x and dy: the layer's input and its output's gradient
            peaks[n] = torch.cuda.max_memory_allocated(device) - base + 2 * _tensor_bytes(x)
        del x, dy, rot
    except torch.cuda.OutOfMemoryError as e:
        raise ValueError(f"one decoder layer's training step at {tokens} tokens does not fit in the "
                         f"GPU's free memory: lower --seq-len/--batch ({e})") from None
    finally:
        layer.mlp_chunks = chunks
        for holder, name, original in moved:
            if name is None:
                holder.data = original
            else:
                holder[name] = original
    torch.cuda.empty_cache()
    return peaks


# Measured working sets get this share on top: compiled layers and CUDA graphs lay their
# intermediates out differently from the eager layer measured.
WORKING_MARGIN = 0.10


def stream_model(model: Model, device, max_vram: int | str | None = None, tokens: int = 2048,
                 streamed: list[int] | None = None, offload_activations: bool = False, *,
                 cuda_graphs: bool = False, host_optimizer: bool | None = None,
                 host_ram: int | None = None, source=None, disk_layers: list[int] | None = None,
                 mlp_chunks: int = 1) -> StreamPlan:
    """Place `model` (its packed weights on the CPU, adapters applied) on `device` within
    `max_vram` bytes ("auto": the GPU's free memory less a margin) as the driver counts them,
    streaming the layers that do not fit; returns the plan (also kept as model.stream_plan).
    On CUDA the budget's terms are measured first (lowtune.memory_budget: the context after one
    layer has run, which also measures that layer's working set).

    `streamed` (a list of layer indices) bypasses the planner: those layers stream, whatever the
    budget (tests use it, also with device="cpu", where "host" and "device" are both the CPU),
    their MLPs in `mlp_chunks` token chunks.
    cuda_graphs, host_optimizer: as plan_streaming; the plan says what the caller should do
    (plan.cuda_graphs, plan.optimizer_on_host: lowtune.host_adamw.make_adamw).
    host_ram: bytes of host memory the streamed layers (and what else the plan keeps there) may
    hold; the layers beyond it are read from `source`, the GGUF file the model was loaded from,
    whenever they are needed (plan_host; `disk_layers` names them instead, with `streamed`)."""
    if model.config.family.altup:
        raise ValueError("Gemma 3n's layers are not streamed: AltUp's copies, the per-layer inputs and the shared "
                         "K/V cross its layers, outside what a streamed layer takes; load it resident")
    if model.config.family.layer_widths:
        raise ValueError("Gemma 4's layers are not streamed: the per-layer inputs and the shared K/V cross its layers, "
                         "outside what a streamed layer takes; load it resident")
    if model.config.family.rwkv:
        raise ValueError("RWKV's layers are not streamed: their token shifts and RWKV-7's first layer's values cross "
                         "its layers, outside what a streamed layer takes; load it resident")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if streamed is None:
        if max_vram is None:
            raise ValueError("stream_model needs max_vram (bytes or 'auto') or an explicit list of streamed layers")
        working = None
        if device.type == "cuda":
            if any(l.raw.is_cuda for layer in model.layers for l in _packed_linears(layer)):
                raise ValueError("stream_model needs the model's packed weights in host memory: load it "
                                 "with device='cpu' (lowtune.load_model(path, device='cpu'))")
            prepare_process()                 # effective where CUDA has not multiplied yet
            measured = {}
            db = DeviceBudget.measure(device, max_vram, warmup=lambda: measured.setdefault(
                "working", measure_working(model, device, tokens)))
            working = {n: int(w * (1 + WORKING_MARGIN)) for n, w in measured["working"].items()}
        else:
            db = DeviceBudget.measure(device, max_vram)
        plan = plan_streaming(model, device, db.budget, tokens, cuda_graphs=cuda_graphs,
                              host_optimizer=host_optimizer, device_budget=db, working=working)
    else:
        bad = [i for i in streamed if not 0 <= i < len(model.layers)]
        if bad:
            raise ValueError(f"streamed layers {bad} do not exist (the model has {len(model.layers)})")
        n = len(model.layers)
        plan = StreamPlan(str(device), max_vram, n, [i for i in range(n) if i not in streamed],
                          sorted(set(streamed)), offload_activations,
                          max(_pack_bytes(layer) for layer in model.layers), model.loss_chunk_tokens,
                          cuda_graphs=cuda_graphs, optimizer_on_host=bool(host_optimizer),
                          mlp_chunks=mlp_chunks)
        plan.embedding_on_host = embedding_stays_on_host(model, plan.streaming, device)
    if disk_layers is not None:
        plan.disk_layers = sorted(set(disk_layers))
    elif host_ram is not None:
        plan_host(plan, model, host_ram)
    disk = None
    if plan.disk_layers:
        if source is None:
            raise ValueError("--host-ram smaller than the streamed layers needs the model as a GGUF file "
                             "to read them from (a Hugging Face directory is quantized in memory)")
        disk = DiskLayers(os.fspath(source), plan.disk_layers, file_ranges(model, source, plan.streamed),
                          RING_BUFFERS)
    if plan.small_scratch and "LOWTUNE_CUDA_CHUNK_MIN" not in os.environ:
        os.environ["LOWTUNE_CUDA_CHUNK_MIN"] = str(SMALL_CHUNK_MIN)   # for the process: the plan counts it
    model.loss_chunk_tokens = plan.loss_chunk_tokens
    model.stream_plan = plan
    for layer in model.layers:
        layer.mlp_chunks = plan.mlp_chunks
    if not plan.streaming and plan.mlp_chunks == 1:
        model.to(device)
    else:
        # chunked MLPs need the streamer's layer function (DecoderLayer.checkpoint_backward) also
        # where every layer is resident
        if device.type == "cuda" and any(l.raw.is_cuda for i in plan.streamed
                                         for l in _packed_linears(model.layers[i])):
            raise ValueError("stream_model needs the model's packed weights in host memory: load it "
                             "with device='cpu' (lowtune.load_model(path, device='cpu'))")
        # Host packs first (each QLinear then views its pack), then everything else to the device
        # without the streamed bytes passing through it.
        model.streamer = LayerStreamer(model, device, plan.streamed, plan.offload_activations, disk,
                                       host_embedding=plan.embedding_on_host)
        model.to(device)                        # all but the streamed packs (Model._apply)
    model.gradient_checkpointing = True
    if device.type == "cuda" and plan.estimate.get("scratch"):
        # one reservation of the largest product's scratch, which every product then reuses
        _C.cuda_scratch_reserve(plan.estimate["scratch"], torch.cuda.current_stream(device).cuda_stream)
    return plan


def optimizer_on_host(model) -> bool:
    """Whether model's streaming plan keeps AdamW's state in host memory."""
    plan = getattr(model, "stream_plan", None)
    return bool(plan is not None and plan.optimizer_on_host)
