"""GPU memory in the driver's terms: what a `--max-vram` budget bounds.

The driver's count of a process's GPU memory (NVML's used memory, what nvidia-smi shows) is more
than what PyTorch allocates. A budget holds when

    context      CUDA context, loaded kernels, library handles: measured on the machine at start,
                 after one decoder layer has run (so the kernels a step loads are in), with the
                 driver's per-thread stack reservation first lowered to what those kernels need
  + workspaces   cuBLAS and cuBLASLt workspaces of torch and of lowtune's extension, one set per
                 stream that multiplies (sizes set here, before CUDA starts: prepare_process)
  + scratch      the extension's dequantization scratch: its pool, and the arena captured graphs
                 share (the largest product's chunk buffers, from lowtune._C.cuda_scratch_bytes)
  + tensors      what torch allocates at its peak: lowtune.streaming's plan (weights, adapters,
                 optimizer state, activations, the SDPA workspace and CUDA-graph pool below)
  + slack        the caching allocator's reserve beyond what it hands out
  + margin       kernels loaded after the measurement (compiled ones), small stray allocations
  <= budget.

This module owns every term but the tensors, and the two tensor terms that come from libraries
(attention_workspace, graph_pool). lowtune.streaming asks DeviceBudget whether a plan fits and,
when none does, for the smallest budget that would, in the same terms:

    prepare_process()                                # before CUDA starts (the CLI does this)
    db = DeviceBudget.measure("cuda", "auto")        # auto: free memory less a margin
    db.total(tensors, scratch=..., graphs=False)     # {"context": ..., ..., "total": ...}
    db.tensor_room(scratch=..., graphs=False)        # what torch may allocate within the budget

NVML (the driver's library) is read through ctypes; where there is none (or it cannot see this
process's memory) the device's used memory stands in, which overstates: the budget then errs on
the safe side.
"""
from __future__ import annotations

import ctypes
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, MutableMapping

MIB = 1 << 20

# Workspace of each cuBLAS/cuBLASLt handle and stream, in MiB, unless the environment says
# otherwise (LOWTUNE_CUBLAS_WORKSPACE_MB sets all three). Large training GEMMs need little; the
# 32 MiB cuBLAS defaults to on Hopper buy nothing here but memory.
DEFAULT_WORKSPACE_MB = 8
# Where CUBLAS_WORKSPACE_CONFIG / CUBLASLT_WORKSPACE_SIZE are unset, torch's largest defaults
# (Hopper), so that an unprepared process is not undercounted.
TORCH_DEFAULT_CUBLAS_MB = 32
TORCH_DEFAULT_CUBLASLT_MB = 32

# The caching allocator's reserve beyond what it hands out: a share of the peak, plus segment
# tails per stream that allocates. Growable segments (expandable_segments, set by
# prepare_process) map memory in 2 MiB pages and keep the share small.
SLACK_EXPANDABLE, SLACK_DEFAULT = 0.03, 0.10
SLACK_FIXED = 48 * MIB
SLACK_PER_STREAM = 16 * MIB
# Kernels loaded after the measurement (torch.compile's, the loss and the optimizer's) and small
# allocations of libraries.
MARGIN = 64 * MIB
# --max-vram auto: the driver's free memory (and what this process already holds) less this.
AUTO_MARGIN_MIN, AUTO_MARGIN_SHARE = 256 * MIB, 0.03


# ---- the process environment --------------------------------------------------------------------

def workspace_mb(environ: MutableMapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    text = env.get("LOWTUNE_CUBLAS_WORKSPACE_MB", "")
    try:
        return max(int(text), 0) if text.strip() else DEFAULT_WORKSPACE_MB
    except ValueError:
        raise ValueError(f"LOWTUNE_CUBLAS_WORKSPACE_MB must be a whole number of MiB, got {text!r}") from None


def prepare_process(environ: MutableMapping[str, str] | None = None) -> dict:
    """Settings a budgeted process needs before CUDA starts (torch reads them once): growable
    allocator segments, and the cuBLAS/cuBLASLt workspaces of torch and of lowtune's extension at
    LOWTUNE_CUBLAS_WORKSPACE_MB each. What the user has set is left alone. Returns the settings."""
    env = os.environ if environ is None else environ
    mb = workspace_mb(env)
    if "PYTORCH_CUDA_ALLOC_CONF" not in env:
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        torch = sys.modules.get("torch")
        if environ is None and torch is not None and torch.cuda.is_initialized():
            # the allocator has read the environment already: tell it directly (torch 2.11 names
            # the setter _accelerator_setAllocatorSettings and warns on the older one)
            setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) \
                or torch.cuda.memory._set_allocator_settings
            try:
                setter("expandable_segments:True")
            except (AttributeError, RuntimeError, TypeError):
                pass
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", f":{mb * 1024}:1" if mb else ":0:0")
    env.setdefault("CUBLASLT_WORKSPACE_SIZE", str(mb * 1024))
    env.setdefault("LOWTUNE_CUBLAS_WORKSPACE_MB", str(mb))
    return {k: env[k] for k in ("PYTORCH_CUDA_ALLOC_CONF", "CUBLAS_WORKSPACE_CONFIG",
                                "CUBLASLT_WORKSPACE_SIZE", "LOWTUNE_CUBLAS_WORKSPACE_MB")}


def workspace_per_stream(environ: MutableMapping[str, str] | None = None) -> dict:
    """Bytes of workspace each stream that multiplies gets, as torch and the extension read the
    environment: torch's cuBLAS (CUBLAS_WORKSPACE_CONFIG, ":KiB:count" pairs), torch's cuBLASLt
    (CUBLASLT_WORKSPACE_SIZE, KiB) and the extension's cuBLAS (LOWTUNE_CUBLAS_WORKSPACE_MB)."""
    env = os.environ if environ is None else environ
    config = env.get("CUBLAS_WORKSPACE_CONFIG")
    if config is None:
        cublas = TORCH_DEFAULT_CUBLAS_MB * MIB
    else:
        pairs = re.findall(r":([0-9]+):([0-9]+)", config)
        cublas = sum(int(kib) * 1024 * int(n) for kib, n in pairs) if pairs else TORCH_DEFAULT_CUBLAS_MB * MIB
    lt = env.get("CUBLASLT_WORKSPACE_SIZE")
    try:
        cublaslt = int(lt) * 1024 if lt is not None else TORCH_DEFAULT_CUBLASLT_MB * MIB
    except ValueError:
        cublaslt = TORCH_DEFAULT_CUBLASLT_MB * MIB
    return {"torch_cublas": cublas, "torch_cublaslt": cublaslt, "lowtune_cublas": workspace_mb(env) * MIB}


def slack_share(environ: MutableMapping[str, str] | None = None) -> float:
    env = os.environ if environ is None else environ
    conf = env.get("PYTORCH_CUDA_ALLOC_CONF", "") + "," + env.get("PYTORCH_ALLOC_CONF", "")
    return SLACK_EXPANDABLE if re.search(r"expandable_segments\s*:\s*true", conf, re.I) else SLACK_DEFAULT


# ---- tensor terms that come from libraries ---------------------------------------------------------

def attention_workspace(tokens: int, n_heads: int, head_dim: int) -> int:
    """Bytes SDPA's flash backward allocates besides its inputs and outputs: an fp32 accumulator
    for dq [tokens, heads, head_dim] and fp32 row statistics (logsumexp, dO·O) per head."""
    return tokens * n_heads * (head_dim * 4 + 8)


# Device memory of one instantiated CUDA graph of a decoder layer (its uploaded launch
# descriptors). Measured 3.4 KiB per kernel node on an H200 (tools/gpu/graph_exec_memory.py,
# 2026-12-03): 1 MiB holds ~300 nodes, more than an eager layer's backward launches (a compiled
# layer's graphs have tens).
GRAPH_EXEC_BYTES = 1 * MIB


def graph_pool(working: int, tokens: int, dim: int, act_bytes: int, layer_grads: int, n_layers: int,
               every_layer_captured: bool = False, rot_bytes: int = 0,
               layer_graphs: int = 2 * GRAPH_EXEC_BYTES) -> int:
    """Bytes CUDA graphs of the decoder layers hold for good (lowtune.compile.LayerGraphs): one
    layer's intermediates in the pool the graphs share, the static inputs and outputs (two
    [tokens, dim] buffers that forward and backward share, the RoPE table `rot_bytes`, the
    layer's flat adapter gradients), and the graphs themselves: forward and backward of every
    layer (`layer_graphs` bytes for both). A streamed layer is captured over one GPU
    slot only: the streamer's two slots take the streamed layers in turn, forward and backward
    alike, so each lands in the same slot every step (the 7B runs at 3 GiB captured 64 graphs for
    32 streamed layers).
    every_layer_captured: no layer runs outside the graphs, so the working set the plan already
    counts for eager layers is the pool's (the capture returns its warm-up's cache first) and is
    not counted twice."""
    intermediates = 0 if every_layer_captured else working
    return intermediates + 2 * tokens * dim * act_bytes + rot_bytes + layer_grads + n_layers * layer_graphs


# ---- the context's stack reservation -----------------------------------------------------------------

# The driver reserves local memory for every thread the GPU can hold: the per-thread stack limit x
# the resident threads per SM x the SMs, 264 MiB on an H200 at CUDA's default limit of 1 KiB (the
# limit at 512 freed 132 MiB in NVML's count: tools/gpu/context_memory.py). A training step's
# kernels need little or none of it, and the driver raises the limit at the launch of one that
# needs more, so a budgeted process starts from this (LOWTUNE_CUDA_STACK_BYTES overrides; "keep"
# leaves the driver's default).
STACK_BYTES = 0
_CU_LIMIT_STACK_SIZE = 0
_stack_lowered: set[int] = set()       # devices whose limit this process lowered (once: see set_stack_limit)


def stack_bytes_setting(environ: MutableMapping[str, str] | None = None) -> int | None:
    """The per-thread stack limit a budgeted process sets (None: keep the driver's)."""
    env = os.environ if environ is None else environ
    text = env.get("LOWTUNE_CUDA_STACK_BYTES", "").strip()
    if not text:
        return STACK_BYTES
    if text == "keep":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"LOWTUNE_CUDA_STACK_BYTES must be bytes per thread (>= 0) or 'keep', got {text!r}")
    return value


def _cuda_driver():
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


def stack_limit() -> int | None:
    """The current CUDA context's per-thread stack limit in bytes (None without a driver or a
    current context)."""
    lib = _cuda_driver()
    value = ctypes.c_size_t(0)
    if lib is None or lib.cuCtxGetLimit(ctypes.byref(value), ctypes.c_int(_CU_LIMIT_STACK_SIZE)) != 0:
        return None
    return value.value


def set_stack_limit(nbytes: int) -> int | None:
    """Set the current CUDA context's per-thread stack limit (cuCtxSetLimit; the driver rounds it)
    and return the limit it took, or None where there is no driver or context. Only before any
    CUDA graph is instantiated: lowered under instantiated graphs, their next replay failed on an
    H200 ("unspecified launch failure"); raised by the driver for a kernel, it broke nothing."""
    lib = _cuda_driver()
    if lib is None or lib.cuCtxSetLimit(ctypes.c_int(_CU_LIMIT_STACK_SIZE), ctypes.c_size_t(nbytes)) != 0:
        return None
    return stack_limit()


# ---- NVML ------------------------------------------------------------------------------------------

class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class _ProcessV1(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong)]


class _ProcessV2(ctypes.Structure):  # the layout of nvmlProcessInfo_t in the _v2 and _v3 calls
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong),
                ("gpuInstanceId", ctypes.c_uint), ("computeInstanceId", ctypes.c_uint)]


_NOT_AVAILABLE = (1 << 64) - 1
_INSUFFICIENT_SIZE = 7


class NVML:
    """The driver's own view of GPU memory (libnvidia-ml, installed with the driver), through
    ctypes. NVML.open() is None where the library or a device is missing."""

    def __init__(self, lib):
        self._lib = lib
        count = ctypes.c_uint(0)
        self._check(lib.nvmlDeviceGetCount_v2(ctypes.byref(count)))
        self.handles = []
        for i in range(count.value):
            h = ctypes.c_void_p()
            self._check(lib.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(h)))
            self.handles.append(h)
        self._procs = []
        for name, struct in (("nvmlDeviceGetComputeRunningProcesses_v3", _ProcessV2),
                             ("nvmlDeviceGetComputeRunningProcesses_v2", _ProcessV2),
                             ("nvmlDeviceGetComputeRunningProcesses", _ProcessV1)):
            fn = getattr(lib, name, None)
            if fn is not None:
                self._procs = [(fn, struct)]
                break

    @staticmethod
    def _check(ret: int) -> None:
        if ret != 0:
            raise OSError(f"NVML call failed with status {ret}")

    @classmethod
    def open(cls) -> "NVML | None":
        try:
            lib = ctypes.CDLL("libnvidia-ml.so.1")
            if lib.nvmlInit_v2() != 0:
                return None
            nvml = cls(lib)
        except (OSError, AttributeError):
            return None
        return nvml if nvml.handles else None

    def device_memory(self, index: int = 0) -> tuple[int, int, int]:
        """(total, free, used) bytes of device `index` in NVML's order."""
        m = _Memory()
        self._check(self._lib.nvmlDeviceGetMemoryInfo(self.handles[index], ctypes.byref(m)))
        return m.total, m.free, m.used

    def process_used(self, pid: int | None = None) -> int | None:
        """Bytes the driver counts for process `pid` (default: this one) on all devices; None
        where NVML cannot tell (no per-process accounting, or the process is not in this PID
        namespace: a container sees the host's PIDs)."""
        if not self._procs:
            return None
        fn, struct = self._procs[0]
        pid = os.getpid() if pid is None else pid
        total, seen = 0, False
        for h in self.handles:
            n = ctypes.c_uint(0)
            ret = fn(h, ctypes.byref(n), None)
            if ret not in (0, _INSUFFICIENT_SIZE):
                return None
            if n.value == 0:
                continue
            n = ctypes.c_uint(n.value + 8)  # room for processes starting meanwhile
            infos = (struct * n.value)()
            if fn(h, ctypes.byref(n), infos) != 0:
                return None
            for info in infos[:n.value]:
                if info.pid == pid:
                    if info.usedGpuMemory == _NOT_AVAILABLE:
                        return None
                    total += info.usedGpuMemory
                    seen = True
        return total if seen else None


# ---- the budget ----------------------------------------------------------------------------------

@dataclass
class DeviceBudget:
    """The terms of a GPU budget besides the tensors (module docstring), in bytes. On the CPU every
    term is 0 and the budget bounds the tensors alone."""
    budget: int
    context: int = 0
    workspaces: dict = field(default_factory=dict)   # bytes per stream, by holder
    slack_share: float = 0.0
    slack_fixed: int = 0
    slack_per_stream: int = 0
    margin: int = 0
    device: str = "cpu"
    measured: dict = field(default_factory=dict)     # how the context was measured, what was seen

    @property
    def driver_terms(self) -> bool:
        return self.device.startswith("cuda")

    def streams(self, graphs: bool) -> int:
        """Streams that run products: the compute stream; with CUDA graphs also the one side
        stream lowtune.compile.LayerGraphs warms up and captures on (the 7B runs with graphs
        saw the extension hold two cuBLAS workspaces)."""
        return 2 if graphs else 1

    def overheads(self, scratch: int, graphs: bool) -> dict:
        """Every term but the tensors and their share of slack, itemised."""
        if not self.driver_terms:
            return {}
        n = self.streams(graphs)
        return {"context": self.context,
                "workspaces": n * sum(self.workspaces.values()),
                # the scratch pool holds one reservation of the largest product's buffers; the
                # graphs' arena the same again
                "scratch": scratch * (2 if graphs else 1),
                "slack_fixed": self.slack_fixed + n * self.slack_per_stream,
                "margin": self.margin}

    def total(self, tensors: int, scratch: int = 0, graphs: bool = False) -> dict:
        """The driver's peak for a step whose torch tensors peak at `tensors` bytes, itemised, with
        "total" (and "fits": total <= budget)."""
        items = {"tensors": int(tensors)}
        items.update(self.overheads(scratch, graphs))
        if self.driver_terms:
            items["slack"] = math.ceil(tensors * self.slack_share)
        items["total"] = sum(items.values())
        items["fits"] = items["total"] <= self.budget
        return items

    def tensor_room(self, scratch: int = 0, graphs: bool = False, budget: int | None = None) -> int:
        """The most torch may allocate at its peak within `budget` (default: this budget): the
        inverse of total()."""
        budget = self.budget if budget is None else budget
        fixed = sum(self.overheads(scratch, graphs).values())
        room = (budget - fixed) / (1.0 + (self.slack_share if self.driver_terms else 0.0))
        return max(int(room), 0)

    def describe(self, items: dict) -> str:
        """'context 510 MiB + workspaces 24 MiB + ... = 1.93 GiB' for total()'s items."""
        parts = [f"{k.replace('_', ' ')} {size(v)}" for k, v in items.items()
                 if k not in ("total", "fits") and v]
        return " + ".join(parts) + f" = {size(items['total'])}"

    def to_dict(self) -> dict:
        return asdict(self)

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def unmetered(cls, budget: int, device: str = "cpu") -> "DeviceBudget":
        """A budget on the tensors alone (the CPU, and tests)."""
        return cls(budget=int(budget), device=device)

    @classmethod
    def measure(cls, device, budget, warmup: Callable[[], object] | None = None,
                environ: MutableMapping[str, str] | None = None) -> "DeviceBudget":
        """The terms on this machine. On CUDA: initialise the device, lower the context's stack
        reservation (STACK_BYTES), run `warmup` (lowtune.streaming runs one decoder layer forward
        and backward, so that the kernels of a step are loaded) and measure the context as the
        driver's count for this process less what torch and the extension hold. `budget`: bytes,
        or "auto" (the driver's free memory and what this process already holds, less a margin)."""
        import torch
        dev = torch.device(device)
        if dev.type != "cuda":
            if budget == "auto":
                raise ValueError("--max-vram auto needs a CUDA device; on the CPU nothing streams")
            return cls.unmetered(budget, str(dev))
        env = os.environ if environ is None else environ
        nvml = NVML.open()
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        free, total = torch.cuda.mem_get_info(dev)   # creates the context
        with torch.cuda.device(dev):                 # the driver calls act on the current context
            torch.cuda.synchronize(dev)
            stack = {"before": stack_limit()}
            wanted = stack_bytes_setting(env)
            # once per process and device: graphs captured since would not survive a second lowering
            if wanted is not None and stack["before"] is not None and dev.index not in _stack_lowered:
                stack["set"] = set_stack_limit(wanted)
                _stack_lowered.add(dev.index)
            if warmup is not None:
                warmup()
            stack["after_warmup"] = stack_limit()    # what the step's kernels raised it to
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        held = torch.cuda.memory_reserved(dev) + extension_bytes(dev)
        used = nvml.process_used() if nvml is not None else None
        how = "NVML, this process"
        if used is None:
            # the device's used memory: other processes' too, so the context is overstated
            used, how = total - free, "the device's used memory (no per-process count)"
        context = max(used - held, 0)
        if budget == "auto":
            margin = max(AUTO_MARGIN_MIN, int(AUTO_MARGIN_SHARE * total))
            budget = free + used - margin
            if budget <= 0:
                raise ValueError(f"--max-vram auto: only {size(free)} of {size(total)} is free on {dev}")
        db = cls(budget=int(budget), context=context, workspaces=workspace_per_stream(env),
                 slack_share=slack_share(env), slack_fixed=SLACK_FIXED, slack_per_stream=SLACK_PER_STREAM,
                 margin=MARGIN, device=str(dev),
                 measured={"how": how, "process_used": used, "torch_reserved": torch.cuda.memory_reserved(dev),
                           "extension": extension_bytes(dev), "free": free, "total": total,
                           "stack_limit": stack})
        return db


def extension_bytes(device=None) -> int:
    """GPU memory lowtune's extension holds outside torch's allocator on `device` (0 without CUDA)."""
    import torch

    from . import _C
    if device is not None and torch.device(device).type != "cuda":
        return 0
    with torch.cuda.device(device):
        s = _C.cuda_memory_stats()
    return s["scratch_pool_reserved"] + s["capture_arena_reserved"] + s["cublas_workspace_bytes"]


def size(b: int) -> str:
    """Bytes for people: '2.50 GiB', '108.6 MiB'."""
    return f"{b / 2**30:.2f} GiB" if abs(b) >= 2**30 else f"{b / 2**20:.1f} MiB"


__all__ = ["DeviceBudget", "NVML", "attention_workspace", "extension_bytes", "graph_pool", "prepare_process", "size",
           "workspace_per_stream"]
