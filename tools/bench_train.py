#!/usr/bin/env python
"""Fine-tuning speed and GPU memory: lowtune resident, lowtune streamed under budgets, and the
PEFT + bitsandbytes QLoRA peer, on the same Llama shapes, weights, data and seed, in one run.

    PYTHONPATH=python python tools/bench_train.py --out runs/bench_train          # H100/H200
    PYTHONPATH=python python tools/bench_train.py --model llama32-1b \
        --runs resident-eager,resident,streamed:3GiB,streamed:2GiB,qlora --out runs/train_1b
    PYTHONPATH=python python tools/bench_train.py --device cpu --out runs/bench_cpu   # CPU: see below
    PYTHONPATH=python python tools/bench_train.py --model tiny --device cpu --runs resident,streamed --steps 3
    PYTHONPATH=python python tools/bench_train.py --model llama2-70b --runs streamed:8GiB,streamed:6GiB \
        --compile off --cuda-graphs off --steps 10 --unique-layers 2 --out runs/train_70b   # 70B in 6 GiB
    PYTHONPATH=python python tools/bench_train.py --runs resident,streamed:3GiB:2GiB --out runs/disk  # from disk

Models: Llama-2-7B shapes (32 layers, 4096 wide, FFN 11008, vocab 32000), Llama-3.2-1B shapes
(16 layers, 2048 wide, GQA 32/8, FFN 8192, vocab 128256, tied embeddings), and Llama-2-70B and
Llama-3-70B shapes (80 layers, 8192 wide, GQA 64/8, FFN 28672, vocab 32000 / 128256), random
Gaussian weights (std 0.02) quantized by lowtune to Q4_K. Quantizing billions of weights on the
CPU would take longer than the benchmark itself, so `--unique-layers` distinct layers are
quantized and repeated cyclically (each layer still gets its own copy of the bytes where it is
used: on the GPU, or in its own pinned host pack, which is what streaming moves);
--weights-cache keeps them on disk for the next run. The peer gets the very same weights:
lowtune's Q4_K blocks dequantized to bf16, then quantized by bitsandbytes to NF4 with double
quantization, in transformers' LlamaForCausalLM (SDPA attention, gradient checkpointing,
prepare_model_for_kbit_training), LoRA from PEFT.

Runs (--runs, comma-separated): resident (compiled as --compile says, CUDA graphs per
--cuda-graphs), resident-eager (no compile, no graphs: the reference the losses are held to),
resident-graphs (eager layers replayed from CUDA graphs, nothing compiled), streamed (at
--max-vram) or streamed:<budget> (e.g. streamed:2GiB, streamed:auto), streamed:<budget>:<host RAM>
(e.g. streamed:3GiB:2GiB: the model written as a GGUF file, out of the page cache, and the
streamed layers beyond 2 GiB of host memory read from it as they are needed), qlora (the peer).
A budget below the planner's minimum is reported as refused, with the minimum it gives.

Budgets are the driver's count (lowtune.memory_budget): every lowtune run prepares its process
as `lowtune finetune --max-vram` does (cuBLAS workspaces, growable allocator segments), and
streamed runs follow their plan: AdamW's state in host memory and CUDA graphs only where it says
so. Reported for them besides the columns below: the driver's peak over the whole run (NVML's
count of this process, sampled every 2 ms from before CUDA starts) and over the steps, whether it
held, torch's peak allocated and reserved, the planned tensors and driver total, the layers
resident / streamed / read from disk, the host -> GPU rate streaming needed against the pinned
rate measured in the peaks run, the disk's read rate, the host's peak RSS, and the losses'
largest relative difference from the reference run (--reference).

Training: LoRA r=16, alpha 16 on all seven linears of every layer, AdamW lr 1e-4 (fused on CUDA,
for every run), batch 1 x seq 2048 of UTF-8 bytes of the bundled Botchan text as token ids (so
the loss falls), bf16 autocast. Each run is its own process (clean memory statistics). Reported:
tokens/s over steps 3..N (the first two warm up: compilation and CUDA graph capture happen there)
but the profiled one, peak `torch.cuda.max_memory_allocated`, the driver's peak of used GPU memory
(NVML, sampled every 5 ms, minus the reading before the process touched the GPU), the losses of
every step and their largest relative difference from resident-eager's, and from one profiled
step (--profile-step): the GPU's busy time (the union of its kernels and copies) against the
step's wall time, the host's operator calls and kernel/graph launches. The step's GPU floor is
its model FLOPs at the bf16 matmul rate and its packed-weight bytes at the HBM bandwidth, both
measured in the same invocation (the larger of the two); "of floor" is floor / step time.

Training: LoRA r=16, alpha 16 on all seven linears of every layer, AdamW lr 1e-4 (no warmup),
batch 1 x seq 2048 of UTF-8 bytes of the bundled Botchan text as token ids (so the loss falls),
bf16 autocast. Each run is its own process (clean memory statistics). Reported: tokens/s over
steps 3..N (the first two warm up), peak `torch.cuda.max_memory_allocated`, the driver's peak of
used GPU memory (NVML, sampled every 5 ms, minus the reading before the process touched the GPU),
and the loss after N steps. One step's memory over time is sampled too and plotted (--out).

On the CPU (--device cpu) the default runs compare lowtune with Hugging Face PEFT on the real
SmolLM2-135M-Instruct (Q4_1 GGUF): `lowtune` trains on the packed Q4_1 blocks (fp32 activations,
the CPU defaults of lowtune's trainer: no gradient checkpointing), `lowtune-bf16` the same with
bf16 activations (`lowtune finetune --dtype bf16`: fp32 adapters and AdamW state); `peft-fp32` and
`peft-bf16` train transformers' LlamaForCausalLM holding the same weights dequantized to dense fp32 / bf16
(SDPA attention, no checkpointing), LoRA from PEFT. Same LoRA (r=16, alpha 16, all seven linears
of every layer), optimizer, data and seed; default seq 256 x batch 2, 8 steps. Reported per run,
each in its own process: tokens/s over steps 3..N and the peak resident memory during training
(RSS sampled every 5 ms) beside the process's peak (getrusage, loading included).
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from smollm2 import smollm2_path

RUNS = ("resident", "streamed", "qlora")
CPU_RUNS = ("lowtune", "lowtune-bf16", "peft-fp32", "peft-bf16")
# What a run takes unless told otherwise: the GPU benchmark is a 7B at seq 2048, the CPU one
# SmolLM2-135M at seq 256 x batch 2.
DEFAULTS = {"cuda": dict(model="llama2-7b", runs=",".join(RUNS), steps=20, seq=2048, batch=1),
            "cpu": dict(model="smollm2", runs=",".join(CPU_RUNS), steps=8, seq=256, batch=2)}
CONFIGS = {
    "llama2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                      ffn_dim=11008, head_dim=128, tied=False),
    "llama32-1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                       ffn_dim=8192, head_dim=64, tied=True),
    "llama2-70b": dict(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                       ffn_dim=28672, head_dim=128, tied=False),
    "llama3-70b": dict(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                       ffn_dim=28672, head_dim=128, tied=False),
    "tiny": dict(vocab_size=512, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=512,
                 head_dim=64, tied=False),
}
TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
HF_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---- memory probes ---------------------------------------------------------------------------

class DriverMemory:
    """The driver's count of this process's GPU memory (NVML through lowtune.memory_budget: what
    nvidia-smi shows, what --max-vram bounds), sampled every 2 ms in a thread from the start of
    the run, so placement, compilation and capture count as much as the steps. Where NVML never
    counts this process (no per-process accounting, or a container's PID namespace), the device's
    used memory above its reading at the start stands in (other processes' memory too)."""

    def __init__(self):
        from lowtune.memory_budget import NVML
        self.nvml = NVML.open()
        self.base = self.nvml.device_memory(0)[2] if self.nvml is not None else None
        self.peak = self.peak_steps = None            # this process, once NVML lists it
        self.peak_device = self.peak_device_steps = 0
        self.in_steps = False
        self._stop = threading.Event()

    def start(self):
        if self.nvml is None:
            return self

        def loop():
            while not self._stop.is_set():
                process, device = self.nvml.process_used(), self.nvml.device_memory(0)[2] - self.base
                self.peak_device = max(self.peak_device, device)
                if process is not None:
                    self.peak = max(self.peak or 0, process)
                if self.in_steps:
                    self.peak_device_steps = max(self.peak_device_steps, device)
                    if process is not None:
                        self.peak_steps = max(self.peak_steps or 0, process)
                time.sleep(0.002)
        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def stop(self) -> dict:
        if self.nvml is None:
            return {}
        self._stop.set()
        self._t.join()
        if self.peak is not None:
            return {"driver_peak": self.peak, "driver_peak_steps": self.peak_steps,
                    "driver_peak_device": self.peak_device, "driver_count": "NVML, this process"}
        return {"driver_peak": self.peak_device, "driver_peak_steps": self.peak_device_steps,
                "driver_peak_device": self.peak_device,
                "driver_count": "NVML, the device's used memory less its reading at the start"}


class AllocatedTrace:
    """torch.cuda.memory_allocated() over time, sampled in a thread during one step."""

    def __init__(self):
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()

    def __enter__(self):
        t0 = time.perf_counter()

        def loop():
            while not self._stop.is_set():
                self.samples.append((time.perf_counter() - t0, torch.cuda.memory_allocated()))
                time.sleep(0.0005)
        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self._stop.set()
        self._t.join()


# ---- shared inputs -------------------------------------------------------------------------------

def token_batch(seq: int, batch: int, vocab: int, step: int) -> torch.Tensor:
    """[batch, seq] ids: UTF-8 bytes of Botchan (+3, below any vocab here), step by step."""
    import lowtune
    text = (Path(lowtune.__file__).parent / "data" / "botchan.txt").read_bytes()
    need = seq * batch
    start = (step * need) % (len(text) - need)
    ids = torch.tensor(list(text[start:start + need]), dtype=torch.long) + 3
    return ids.clamp_(max=vocab - 1).view(batch, seq)


def make_weights(cfg: dict, qtype: str, unique: int, seed: int, device: str, cache: str | None = None):
    """GGUF-named weights: matrices as QTensors (CPU), norms as fp32 tensors. `cache`: a
    directory where the quantized unique layers are kept for the next run (the same seed gives
    the same bytes)."""
    import lowtune
    d, f, v = cfg["dim"], cfg["ffn_dim"], cfg["vocab_size"]
    q, kv = cfg["n_heads"] * cfg["head_dim"], cfg["n_kv_heads"] * cfg["head_dim"]
    shapes = {"attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, q),
              "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}
    n_unique = min(unique, cfg["n_layers"])
    path = None
    if cache:
        tag = "-".join(str(cfg[k]) for k in ("vocab_size", "dim", "n_heads", "n_kv_heads", "ffn_dim", "head_dim"))
        path = Path(cache) / f"weights-{tag}-{int(cfg['tied'])}-{qtype}-{n_unique}-{seed}.pt"
    if path is not None and path.exists():
        saved = torch.load(path)
        unpack = lambda t: lowtune.QTensor.from_raw(t[0], t[1], t[2])  # noqa: E731
        top = {n: unpack(t) for n, t in saved["top"].items()}
        layers = [{n: unpack(t) for n, t in layer.items()} for layer in saved["layers"]]
    else:
        g = torch.Generator(device=device).manual_seed(seed)
        gen = lambda *shape: (torch.randn(*shape, generator=g, device=device) * 0.02).cpu()  # noqa: E731
        top = {"token_embd.weight": lowtune.quantize(gen(v, d), qtype)}
        if not cfg["tied"]:
            top["output.weight"] = lowtune.quantize(gen(v, d), qtype)
        layers = [{n: lowtune.quantize(gen(*s), qtype) for n, s in shapes.items()} for _ in range(n_unique)]
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            pack = lambda qt: (qt.raw, qt.type, qt.shape)  # noqa: E731
            torch.save({"top": {n: pack(t) for n, t in top.items()},
                        "layers": [{n: pack(t) for n, t in layer.items()} for layer in layers]}, path)
    w = dict(top, **{"output_norm.weight": torch.ones(d)})
    for i in range(cfg["n_layers"]):
        # repeated layers share the unique layers' host bytes: each still gets a copy of its own
        # where it is used (the GPU for resident layers, its own pinned pack for streamed ones)
        src = layers[i % len(layers)]
        for n in shapes:
            w[f"blk.{i}.{n}.weight"] = src[n]
        w[f"blk.{i}.attn_norm.weight"] = torch.ones(d)
        w[f"blk.{i}.ffn_norm.weight"] = torch.ones(d)
    return w


def add_lora(args, model):
    from lowtune import adapters
    adapters.apply_adapters(model, adapters.AdapterConfig(method="lora", rank=args.rank,
                                                          alpha=args.rank, seed=args.seed))
    adapters.mark_only_adapters_trainable(model)
    return model


def lowtune_model(args, cfg, weights):
    from lowtune.model import Model, ModelConfig
    shape = {k: v for k, v in cfg.items() if k != "tied"}
    c = ModelConfig(**shape, rope_dim=cfg["head_dim"], norm_eps=1e-5, context_length=4096)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    return add_lora(args, Model(c, weights, dtype))


def gguf_model(args, cfg, weights) -> Path:
    """The weights as a GGUF file (written once per shape, seed and type under --gguf-dir), out of
    the page cache, so that what is read from it comes from the disk."""
    from lowtune.gguf_io import write_gguf
    d = Path(args.gguf_dir or tempfile.gettempdir()) / "lowtune-bench-gguf"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{args.model}-{args.qtype}-{args.unique_layers}-{args.seed}.gguf"
    if not path.exists():
        md = {"general.architecture": "llama", "general.name": args.model, "llama.context_length": 4096,
              "llama.embedding_length": cfg["dim"], "llama.block_count": cfg["n_layers"],
              "llama.feed_forward_length": cfg["ffn_dim"], "llama.attention.head_count": cfg["n_heads"],
              "llama.attention.head_count_kv": cfg["n_kv_heads"], "llama.rope.dimension_count": cfg["head_dim"],
              "llama.rope.freq_base": 10000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5,
              "llama.vocab_size": cfg["vocab_size"]}
        tmp = path.with_suffix(".tmp")
        write_gguf(tmp, md, list(weights.items()))
        os.replace(tmp, path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return path


def hf_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """GGUF's interleaved q/k row order back to Hugging Face's rotate-half order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def linear4bit(bnb, k: int, n: int):
    """An empty NF4 linear: on the meta device (no initialisation of a weight that is replaced
    at once), or on the CPU where this bitsandbytes version cannot."""
    kw = dict(bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
    try:
        return bnb.nn.Linear4bit(k, n, device="meta", **kw)
    except (RuntimeError, TypeError, NotImplementedError):
        return bnb.nn.Linear4bit(k, n, device="cpu", **kw)


def qlora_model(args, cfg, weights):
    """transformers Llama with the same weights, NF4 double-quantized linears, PEFT LoRA."""
    import bitsandbytes as bnb
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    import lowtune
    hc = transformers.LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["dim"], intermediate_size=cfg["ffn_dim"],
        num_hidden_layers=cfg["n_layers"], num_attention_heads=cfg["n_heads"],
        num_key_value_heads=cfg["n_kv_heads"], max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=cfg["tied"], head_dim=cfg["head_dim"],
        attn_implementation="sdpa")
    deq = lambda name: lowtune.dequantize(weights[name].to("cuda"), torch.bfloat16)  # noqa: E731
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hc)
    model.model.embed_tokens = torch.nn.Embedding.from_pretrained(deq("token_embd.weight"), freeze=True)
    model.lm_head = torch.nn.Linear(cfg["dim"], cfg["vocab_size"], bias=False, device="cuda",
                                    dtype=torch.bfloat16)
    if cfg["tied"]:
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        model.lm_head.weight.data.copy_(deq("output.weight"))
    model.model.norm.weight = torch.nn.Parameter(torch.ones(cfg["dim"], device="cuda", dtype=torch.bfloat16))
    names = dict(q_proj="attn_q", k_proj="attn_k", v_proj="attn_v", o_proj="attn_output",
                 gate_proj="ffn_gate", up_proj="ffn_up", down_proj="ffn_down")
    for i, layer in enumerate(model.model.layers):
        for parent in (layer.self_attn, layer.mlp):
            for hf, ours in names.items():
                if not hasattr(parent, hf):
                    continue
                w = deq(f"blk.{i}.{ours}.weight")
                if ours in ("attn_q", "attn_k"):
                    w = hf_rows(w, cfg["n_heads"] if ours == "attn_q" else cfg["n_kv_heads"])
                lin = linear4bit(bnb, w.shape[1], w.shape[0])
                lin.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True,
                                               quant_type="nf4")
                setattr(parent, hf, lin.to("cuda"))  # bitsandbytes quantizes here
                del w
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight = torch.nn.Parameter(torch.ones(cfg["dim"], device="cuda", dtype=torch.bfloat16))
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=hc, device="cuda")
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"peer model tensors left on the meta device: {left[:5]}")
    model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) would set
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lc = LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, bias="none",
                    target_modules=list(HF_TARGETS), task_type="CAUSAL_LM")
    torch.manual_seed(args.seed)
    return get_peft_model(model, lc)


# ---- one run (in its own process) ------------------------------------------------------------------

def parse_run(run: str, args) -> tuple[str, str | None, str | None]:
    """'streamed:2GiB' -> ('streamed', '2GiB', None); 'streamed:3GiB:2GiB' -> ('streamed', '3GiB',
    '2GiB'): at most 2 GiB of host memory, the other layers read from a GGUF file on disk;
    'streamed' -> ('streamed', --max-vram, None)."""
    kind, _, rest = run.partition(":")
    if kind not in ("resident", "resident-eager", "resident-graphs", "streamed", "qlora"):
        raise SystemExit(f"unknown run {run!r}: resident, resident-eager, resident-graphs, "
                         "streamed[:budget[:host_ram]], qlora")
    if kind != "streamed":
        return kind, None, None
    budget, _, host = rest.partition(":")
    return kind, budget or args.max_vram, host or None


def measure_peaks() -> dict:
    """The GPU's bf16 matmul rate (8192^3, cuBLAS) and HBM bandwidth (a 2 GiB copy: read + write),
    best of several timed repetitions."""
    def best(fn, reps=10):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        return min(times)

    n = 8192
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm = best(lambda: torch.mm(x, y))
    x = y = None  # frees them before the copies are timed
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    cp = best(lambda: dst.copy_(src))
    dst = None
    host = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    h2d = best(lambda: src[:host.numel()].copy_(host, non_blocking=True), reps=5)
    return {"bf16_flops": 2 * n ** 3 / mm, "hbm_bytes_per_s": 2 * src.numel() / cp,
            "h2d_bytes_per_s": host.numel() / h2d, "device": torch.cuda.get_device_name()}


def step_work(cfg: dict, tokens: int, seq: int, rank: int, layer_bytes: int, head_bytes: int) -> dict:
    """Model FLOPs and packed-weight bytes of one checkpointed training step: every frozen
    matmul runs forward, again in the recomputation and once for the input gradient; attention
    (causal) forward twice and backward (2.5x forward); the LM head forward and input gradient;
    LoRA on the seven linears forward twice and four backward products."""
    d, f, L = cfg["dim"], cfg["ffn_dim"], cfg["n_layers"]
    q, kv = cfg["n_heads"] * cfg["head_dim"], cfg["n_kv_heads"] * cfg["head_dim"]
    shapes = [(q, d), (kv, d), (kv, d), (d, q), (f, d), (f, d), (d, f)]
    base = sum(n * k for n, k in shapes) * 2 * tokens * 3
    attention = 2 * tokens * seq * q * 4.5           # QK^T and PV over the causal half: 2*T*S*q
    head = 4 * tokens * d * cfg["vocab_size"]
    lora = sum(n + k for n, k in shapes) * 2 * tokens * rank * 4
    return {"flops": L * (base + attention + lora) + head,
            "bytes": 3 * layer_bytes + 2 * head_bytes}


def profile_metrics(prof) -> dict:
    """From one profiled step: GPU busy time (union of device activity), host operator calls,
    kernel and CUDA-graph launches."""
    events = prof.events()
    spans = [(e.time_range.start, e.time_range.end) for e in events
             if e.device_type == torch.autograd.DeviceType.CUDA]
    names = [e.name for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    return {"gpu_busy_ms": _union_ms(spans), "device_events": len(spans),
            "host_ops": sum(n.startswith(("aten::", "lowtune::")) for n in names),
            "kernel_launches": sum(n in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                         "cuLaunchKernelEx") for n in names),
            "graph_launches": sum(n in ("cudaGraphLaunch", "cuGraphLaunch") for n in names)}


def _union_ms(spans) -> float:
    """Milliseconds covered by (start, end) spans in µs, overlaps counted once."""
    busy, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy / 1e3


def stream_metrics(trace_path: str) -> dict:
    """Per CUDA stream of one profiled step (its chrome trace): busy ms, and for copies their
    direction, bytes and GB/s while copying. Says whether a streamed step waits on PCIe or on
    compute."""
    with open(trace_path) as f:
        events = json.load(f).get("traceEvents", [])
    streams: dict = {}
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        a = float(e["ts"])
        b = a + float(e.get("dur", 0))
        s = streams.setdefault(str(e.get("tid")), {"spans": [], "copies": {}})
        s["spans"].append((a, b))
        if e["cat"] == "gpu_memcpy":
            kind = e.get("name", "").replace("Memcpy ", "").split(" ")[0]
            c = s["copies"].setdefault(kind, {"bytes": 0, "spans": []})
            c["bytes"] += int((e.get("args") or {}).get("bytes", 0))
            c["spans"].append((a, b))
    out = {}
    for tid, s in streams.items():
        row = {"busy_ms": _union_ms(s["spans"]), "events": len(s["spans"])}
        for kind, c in s["copies"].items():
            ms = _union_ms(c["spans"])
            row[kind] = {"gb": c["bytes"] / 1e9, "ms": ms, "gb_per_s": c["bytes"] / 1e6 / ms if ms else None}
        out[tid] = row
    return out


def run_one(args) -> dict:
    cfg = CONFIGS[args.model]
    dev = args.device
    if args.run == "peaks":
        return measure_peaks()
    kind, budget, host_ram = parse_run(args.run, args)
    if dev == "cuda" and kind != "qlora":
        from lowtune.memory_budget import prepare_process
        prepare_process()            # before CUDA starts, as `lowtune finetune --max-vram` does
    driver = DriverMemory().start() if dev == "cuda" else None
    rss = PeakRSS().__enter__()
    torch.manual_seed(args.seed)
    t_build = time.perf_counter()
    weights = make_weights(cfg, args.qtype, args.unique_layers, args.seed, dev, args.weights_cache)
    if dev == "cuda":
        torch.cuda.empty_cache()     # the random weights were drawn on the GPU
    plan = setup = None
    layer_bytes = sum(t.nbytes for n, t in weights.items() if n.startswith("blk.") and hasattr(t, "raw"))
    head_bytes = weights["token_embd.weight"].nbytes if cfg["tied"] else weights["output.weight"].nbytes
    mode = "off" if kind in ("resident-eager", "resident-graphs") else args.compile
    graphs = kind != "resident-eager" and dev == "cuda" and args.cuda_graphs == "on"
    out = {"run": args.run, "kind": kind, "model": args.model}
    if kind == "qlora":
        model = qlora_model(args, cfg, weights)
        loss_fn = lambda ids: model(input_ids=ids, labels=ids).loss  # noqa: E731
    else:
        source = None
        if host_ram is not None:                 # the model as a file on disk, read as needed
            from lowtune import load_model
            source = gguf_model(args, cfg, weights)
            del weights
            model = add_lora(args, load_model(source, device="cpu",
                                              dtype=torch.bfloat16 if dev == "cuda" else torch.float32))
        else:
            model = lowtune_model(args, cfg, weights)
        if kind == "streamed":
            from lowtune.streaming import stream_model
            from lowtune.train_config import parse_size, parse_vram
            try:
                plan = stream_model(model, dev, parse_vram(budget), tokens=args.seq * args.batch,
                                    cuda_graphs=graphs, host_ram=parse_size(host_ram), source=source)
            except ValueError as e:      # below the minimum: the refusal is the result
                out.update(budget=budget, host_ram=host_ram, refused=str(e), **(driver.stop() if driver else {}))
                return out
            print(plan.summary(), flush=True)
            graphs = graphs and plan.cuda_graphs
        else:
            model.to(dev)
            model.gradient_checkpointing = True
        if mode != "off" or graphs:
            from lowtune.compile import compile_model
            setup = compile_model(model, mode, cuda_graphs=graphs,
                                  on_event=lambda line: print(f"{args.run}: {line}", flush=True))
        loss_fn = lambda ids: model.loss(ids)  # noqa: E731
    weights = None
    params = [p for p in model.parameters() if p.requires_grad]
    from lowtune.host_adamw import make_adamw
    on_host = plan is not None and plan.optimizer_on_host
    opt = make_adamw(params, on_host, lr=args.lr, fused=dev == "cuda")
    build_s = time.perf_counter() - t_build
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        driver.in_steps = True
    model.train()
    losses, times, phases, trace, prof_out, untimed = [], [], [], None, None, set()
    for step in range(args.steps):
        ids = token_batch(args.seq, args.batch, cfg["vocab_size"], step).to(dev)
        t0 = time.perf_counter()
        ctx = AllocatedTrace() if dev == "cuda" and step == args.trace_step else None
        if args.profile and step == args.profile_step:
            ctx = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] +
                                         ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else []))
        # phase marks: the GPU's time at each boundary (events, no extra synchronization) beside
        # the host's, so a phase whose GPU span ends just after the host queued it was host-bound
        marks = [torch.cuda.Event(enable_timing=True) for _ in PHASES + ("start",)] if dev == "cuda" else None
        host = [0.0]

        def mark(i):
            if marks:
                marks[i].record()
            if i:
                host.append(time.perf_counter() - t0)

        with (ctx or _null()), torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            mark(0)
            loss = loss_fn(ids)
            mark(1)
            loss.backward()
            mark(2)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            mark(3)
            opt.step()
            mark(4)
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if dev == "cuda":
                torch.cuda.synchronize()
                phases.append({"gpu_ms": [marks[0].elapsed_time(m) for m in marks[1:]],
                               "host_ms": [h * 1e3 for h in host[1:]]})
        times.append(time.perf_counter() - t0)
        if ctx is not None:
            untimed.add(step)  # a sampling thread or the profiler slows this step down
        if isinstance(ctx, AllocatedTrace):
            trace = ctx.samples
        elif ctx is not None:
            prof_out = profile_metrics(ctx)
            prof_out["wall_ms"] = times[-1] * 1e3
            if dev == "cuda":
                with tempfile.TemporaryDirectory() as tmp:
                    ctx.export_chrome_trace(os.path.join(tmp, "trace.json"))
                    prof_out["streams"] = stream_metrics(os.path.join(tmp, "trace.json"))
                    if args.profile_trace:
                        with open(os.path.join(tmp, "trace.json"), "rb") as f, \
                                gzip.open(f"{args.profile_trace}.{args.run}.json.gz", "wb") as g:
                            shutil.copyfileobj(f, g)
                print("profile streams: " + json.dumps(prof_out["streams"]), flush=True)
            print_profile(ctx, prof_out, dev)
        print(f"{args.run} step {step + 1}: loss {losses[-1]:.4f} {times[-1] * 1e3:.0f} ms", flush=True)
        if step == 0 and setup is not None:
            print(f"{args.run}: {setup.summary()}", flush=True)
    timed = [t for i, t in enumerate(times) if i >= 2 and i not in untimed] or times
    step_s = sorted(timed)[len(timed) // 2]
    steady = phases[2:] or phases  # the phase marks after the first two steps
    out.update({"steps": args.steps, "seq": args.seq, "batch": args.batch, "rank": args.rank, "qtype": args.qtype,
                "tokens_per_s": args.seq * args.batch * len(timed) / sum(timed),
                "step_ms_median": step_s * 1e3, "step_s": times,
                "optimizer_ms_median": _median([p["gpu_ms"][3] - p["gpu_ms"][2] for p in steady]),
                "phases": phase_summary(steady), "phase_steps": phases,
                "loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
                "trainable": sum(p.numel() for p in params), "build_s": round(build_s, 1),
                "optimizer_on_host": on_host,
                "work": step_work(cfg, args.seq * args.batch, args.seq, args.rank, layer_bytes, head_bytes)})
    if out["phases"]:
        print(f"{args.run}: phase ends (ms from step start, host queued / GPU reached): " + ", ".join(
            f"{k} {v['host_end_ms']:.1f} / {v['gpu_end_ms']:.1f}" for k, v in out["phases"].items()), flush=True)
    if kind != "qlora":
        out["compile"] = "off" if setup is None else setup.mode
        out["cuda_graphs"] = bool(setup is not None and setup.graphs is not None)
        if setup is not None:
            out["compile_summary"] = setup.summary()
            out["compile_s"] = setup.compile_s
            if setup.graphs is not None:
                out["graphs_captured"] = len(setup.graphs.graphs)
                out["capture_s"] = setup.graphs.capture_s
    if prof_out is not None:
        out["profile"] = prof_out
    rss.__exit__(None, None, None)
    out["host_peak_rss"] = rss.peak
    if dev == "cuda":
        from lowtune import _C
        out["max_allocated"] = torch.cuda.max_memory_allocated()
        out["max_reserved"] = torch.cuda.max_memory_reserved()
        out["extension"] = _C.cuda_memory_stats()
        out.update(driver.stop())
        out["trace"] = trace
    if plan is not None:
        out["budget"] = budget
        out["budget_bytes"] = plan.budget
        out["host_ram"] = host_ram
        out["plan"] = {k: v for k, v in plan.to_dict().items() if k not in ("estimate", "terms")}
        out["plan_estimate"] = plan.estimate
        out["plan_terms"] = plan.terms
        out["plan_total"] = plan.estimate.get("total")
        out["plan_summary"] = plan.summary()
        s = model.streamer
        per_step = s.bytes_copied / args.steps if s else 0.0
        out["streamed_gb_per_step"] = per_step / 1e9
        out["pcie_gb_per_s"] = per_step / step_s / 1e9    # the host -> GPU rate the step needed
        if s is not None and s.ring is not None:
            ring = s.ring.stats()
            out["disk"] = ring
            out["disk_gb_per_step"] = ring["bytes_read"] / args.steps / 1e9
    return out


def _median(values: list) -> float | None:
    return sorted(values)[len(values) // 2] if values else None


PHASES = ("forward", "backward", "clip", "optimizer")


def phase_summary(steps: list[dict]) -> dict | None:
    """Per phase, the median time (ms from the step's start) at which the host had queued its
    end and the GPU reached it: GPU end minus host end near zero means the GPU waited on the host."""
    if not steps:
        return None
    return {name: {"host_end_ms": _median([s["host_ms"][i] for s in steps]),
                   "gpu_end_ms": _median([s["gpu_ms"][i] for s in steps])}
            for i, name in enumerate(PHASES)}


def print_profile(prof, metrics: dict, dev: str) -> None:
    """Where one step's time goes: GPU busy time against the step's wall time, top kernels and
    the number of operator calls (host dispatch)."""
    events = prof.key_averages()
    key = "device_time_total" if dev == "cuda" else "cpu_time_total"
    m = metrics
    if dev == "cuda":
        print(f"profile: step {m['wall_ms']:.0f} ms wall, GPU busy {m['gpu_busy_ms']:.0f} ms "
              f"({m['device_events']} kernels and copies), {m['host_ops']} host operator calls, "
              f"{m['kernel_launches']} kernel launches, {m['graph_launches']} CUDA graph launches", flush=True)
    else:
        print(f"profile: step {m['wall_ms']:.0f} ms wall, {m['host_ops']} operator calls", flush=True)
    print(events.table(sort_by=key, row_limit=25, max_name_column_width=60), flush=True)
    print(events.table(sort_by="count", row_limit=20, max_name_column_width=60), flush=True)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---- CPU runs: lowtune on the packed GGUF against PEFT on dense weights ------------------------------



class PeakRSS:
    """Peak resident memory of this process (from /proc/self/statm), sampled in a thread."""

    def __init__(self):
        self.peak = 0
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()

    def read(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self):
        self.peak = self.read()

        def loop():
            while not self._stop.is_set():
                self.peak = max(self.peak, self.read())
                time.sleep(0.005)
        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.read())


def peft_dense_model(args, path: Path, dtype: torch.dtype):
    """transformers' Llama holding the GGUF's weights dequantized to dense `dtype`, PEFT LoRA."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from lowtune.gguf_io import GGUFFile
    from lowtune.model import ModelConfig
    import lowtune
    with GGUFFile(path) as f:
        c = ModelConfig.from_gguf_metadata(dict(f.metadata))
        w = {name: lowtune.dequantize(f.qtensor(name), torch.float32) for name in f.tensor_infos}
    hc = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.context_length, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        tie_word_embeddings="output.weight" not in w, attn_implementation="sdpa")
    names = dict(q_proj="attn_q", k_proj="attn_k", v_proj="attn_v", o_proj="attn_output",
                 gate_proj="ffn_gate", up_proj="ffn_up", down_proj="ffn_down")
    sd = {"model.embed_tokens.weight": w["token_embd.weight"], "model.norm.weight": w["output_norm.weight"].reshape(-1)}
    if "output.weight" in w:
        sd["lm_head.weight"] = w["output.weight"]
    for i in range(c.n_layers):
        p, q = f"model.layers.{i}.", f"blk.{i}."
        for hf, ours in names.items():
            t = w[f"{q}{ours}.weight"]
            if ours in ("attn_q", "attn_k"):
                t = hf_rows(t, c.n_heads if ours == "attn_q" else c.n_kv_heads)
            sd[f"{p}{'self_attn' if hf[0] in 'qkvo' else 'mlp'}.{hf}.weight"] = t
        sd[p + "input_layernorm.weight"] = w[q + "attn_norm.weight"].reshape(-1)
        sd[p + "post_attention_layernorm.weight"] = w[q + "ffn_norm.weight"].reshape(-1)
    del w
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(hc)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"peer model weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    del sd
    model = model.to(dtype)
    lc = LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, bias="none",
                    target_modules=list(names), task_type="CAUSAL_LM")
    torch.manual_seed(args.seed)
    return get_peft_model(model, lc)


def run_one_cpu(args) -> dict:
    """One CPU run (lowtune, lowtune-bf16, peft-fp32 or peft-bf16) in this process."""
    import resource

    import lowtune
    torch.set_num_threads(args.threads)
    lowtune._C.set_num_threads(args.threads)
    path = smollm2_path()
    torch.manual_seed(args.seed)
    t_build = time.perf_counter()
    if args.run.startswith("lowtune"):
        from lowtune import adapters
        from lowtune.loading import load_model
        # the activations in the run's dtype, as finetune --dtype loads them; the adapters stay fp32
        model = load_model(path, dtype=torch.bfloat16 if args.run == "lowtune-bf16" else torch.float32)
        adapters.apply_adapters(model, adapters.AdapterConfig(method="lora", rank=args.rank, alpha=args.rank,
                                                              seed=args.seed))
        adapters.mark_only_adapters_trainable(model)
        vocab = model.config.vocab_size
        loss_fn = lambda ids: model.loss(ids)  # noqa: E731
    else:
        model = peft_dense_model(args, path, torch.bfloat16 if args.run == "peft-bf16" else torch.float32)
        vocab = model.config.vocab_size
        loss_fn = lambda ids: model(input_ids=ids, labels=ids).loss  # noqa: E731
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    build_s = time.perf_counter() - t_build
    model.train()
    losses, times = [], []
    with PeakRSS() as rss:
        for step in range(args.steps):
            ids = token_batch(args.seq, args.batch, vocab, step)
            t0 = time.perf_counter()
            ctx = None
            if args.profile and step == args.profile_step:
                ctx = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            with ctx or _null():
                loss = loss_fn(ids)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            times.append(time.perf_counter() - t0)
            if ctx is not None:
                print_profile(ctx, {"wall_ms": times[-1] * 1e3, "host_ops": sum(e.count for e in ctx.key_averages())},
                              "cpu")
            print(f"{args.run} step {step + 1}: loss {losses[-1]:.4f} {times[-1] * 1e3:.0f} ms", flush=True)
    timed = times[2:] if len(times) > 2 else times
    return {"run": args.run, "model": path.name, "steps": args.steps, "seq": args.seq, "batch": args.batch,
            "rank": args.rank, "threads": args.threads,
            "tokens_per_s": args.seq * args.batch * len(timed) / sum(timed),
            "step_ms_median": sorted(timed)[len(timed) // 2] * 1e3, "step_s": times,
            "loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
            "trainable": sum(p.numel() for p in params), "build_s": round(build_s, 1),
            "train_peak_rss": rss.peak, "process_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def cpu_header(args) -> str:
    import platform

    import lowtune
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    info = lowtune.build_info()
    omp = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "KMP_"))}
    load = [round(v, 2) for v in os.getloadavg()]
    return (f"date {datetime.date.today().isoformat()}; {cpu} ({', '.join(isa)}), {os.cpu_count()} CPUs, "
            f"{args.threads} threads; torch {torch.__version__}; lowtune {info['cpu_isa']} kernels, "
            f"{info.get('cpu_threading', 'threads')} threading; env {omp or '-'}; load average at start {load}; "
            f"{args.model}, seq {args.seq} x batch {args.batch}, LoRA r={args.rank} on all seven linears, "
            f"{args.steps} steps")


def report_cpu(results: list[dict], args) -> str:
    names = {"lowtune": "lowtune, packed Q4_1 (fp32 activations)",
             "lowtune-bf16": "lowtune, packed Q4_1 (bf16 activations)",
             "peft-fp32": "PEFT LoRA, dense fp32", "peft-bf16": "PEFT LoRA, dense bf16"}
    base = next((r for r in results if r["run"] == "peft-fp32" and "error" not in r), None)
    lines = ["| run | tokens/s | × PEFT fp32 | peak RSS in training GiB | process peak RSS GiB | "
             f"loss step 1 | loss step {args.steps} |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {names.get(r['run'], r['run'])} | failed: {r['error'][:120]} | | | | | |")
            continue
        x = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "—"
        lines.append(f"| {names.get(r['run'], r['run'])} | {r['tokens_per_s']:.1f} | {x} | {gib(r['train_peak_rss'])} | "
                     f"{gib(r['process_peak_rss'])} | {r['loss_first']:.4f} | {r['loss_last']:.4f} |")
    return "\n".join(lines)


# ---- the table -------------------------------------------------------------------------------------

def gib(b):
    return "—" if b is None else f"{b / 2**30:.2f}"


def label(run: str) -> str:
    kind, _, rest = run.partition(":")
    budget, _, host = rest.partition(":")
    streamed = f"lowtune, --max-vram {budget}" if budget else "lowtune, streamed"
    if host:
        streamed += f" --host-ram {host}"
    return {"resident": "lowtune, resident", "resident-eager": "lowtune, resident, eager",
            "resident-graphs": "lowtune, resident, CUDA graphs of eager layers",
            "streamed": streamed, "qlora": "PEFT + bitsandbytes QLoRA (NF4, double quant)"}.get(kind, run)


def ok(r: dict | None) -> bool:
    return r is not None and not any(k in r for k in ("error", "skipped", "refused"))


def loss_gap(r: dict, ref: dict | None) -> float | None:
    """Largest relative difference of r's per-step losses from ref's."""
    if not ok(ref) or len(ref["losses"]) != len(r["losses"]):
        return None
    return max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"]))


def analyse(results: list[dict], peaks: dict | None, reference: str | None = None) -> None:
    """Adds to each run: its GPU floor (model FLOPs at the measured matmul rate, or its bytes
    at the measured bandwidth, whichever is larger), the floor's share of its step, its losses'
    largest relative difference from resident-eager's and from the reference run's (--reference;
    default resident-eager, else the first run that trained), and the share of the measured
    pinned host -> GPU rate its streaming needed."""
    eager = next((r for r in results if r.get("run") == "resident-eager" and ok(r)), None)
    ref = next((r for r in results if r.get("run") == reference and ok(r)), None) if reference else \
        eager or next((r for r in results if ok(r)), None)
    for r in results:
        if not ok(r):
            continue
        r["loss_gap_vs_eager"] = loss_gap(r, eager)
        if ref is not None and ref is not r:
            r["reference"] = ref["run"]
            r["loss_gap_vs_reference"] = loss_gap(r, ref)
        if peaks and "work" in r:
            floor = max(r["work"]["flops"] / peaks["bf16_flops"], r["work"]["bytes"] / peaks["hbm_bytes_per_s"])
            r["floor_ms"] = floor * 1e3
            r["floor_fraction"] = floor * 1e3 / r["step_ms_median"]
        if peaks and peaks.get("h2d_bytes_per_s") and r.get("pcie_gb_per_s"):
            r["pcie_share"] = r["pcie_gb_per_s"] * 1e9 / peaks["h2d_bytes_per_s"]


def report(results: list[dict], args) -> str:
    base = next((r for r in results if r["run"] == "qlora"), None)
    res = next((r for r in results if r["run"] == "resident"), None)
    lines = ["| run | tokens/s | × QLoRA | × resident | step ms | optimizer ms | of GPU floor | GPU busy / "
             "wall (profiled step) | host ops | launches (graphs) | peak allocated GiB | driver peak GiB "
             f"| loss step {args.steps} | loss Δ vs eager |", "|---|" + "---|" * 13]
    for r in results:
        if not ok(r):
            why = r.get("error") or r.get("skipped") or "refused: " + r["refused"]
            lines.append(f"| {label(r['run'])} | {why[:160]} |" + " |" * 12)
            continue
        opt = r.get("optimizer_ms_median")
        opt = "—" if opt is None else f"{opt:.1f}"
        x_q = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if ok(base) else "—"
        x_r = f"{r['tokens_per_s'] / res['tokens_per_s']:.2f}" if ok(res) else "—"
        pr = r.get("profile")
        busy = f"{pr['gpu_busy_ms']:.0f} / {pr['wall_ms']:.0f} ms" if pr else "—"
        ops = f"{pr['host_ops']}" if pr else "—"
        launches = f"{pr['kernel_launches']} ({pr['graph_launches']})" if pr else "—"
        floor = f"{r['floor_fraction'] * 100:.0f}%" if "floor_fraction" in r else "—"
        gap = r.get("loss_gap_vs_eager")
        gap = "—" if gap is None else f"{gap * 100:.2f}%"
        lines.append(f"| {label(r['run'])} | {r['tokens_per_s']:.0f} | {x_q} | {x_r} | "
                     f"{r['step_ms_median']:.0f} | {opt} | {floor} | {busy} | {ops} | {launches} | "
                     f"{gib(r.get('max_allocated'))} | {gib(r.get('driver_peak'))} | "
                     f"{r['loss_last']:.4f} | {gap} |")
    return "\n".join(lines)


def budget_report(results: list[dict], args) -> str:
    """The budgeted runs: the budget against the driver's peak (the whole run, and its steps),
    what torch allocated and reserved, what the plan decided, streaming's traffic against the
    measured host -> GPU rate, the disk's rate, the share of the GPU floor and the losses against
    the reference run."""
    res = next((r for r in results if r["run"] == "resident" and ok(r)), None)
    lines = ["| run | budget | driver peak GiB (steps) | holds | allocated / reserved GiB | planned GiB "
             "(driver) | resident / streamed / from disk | AdamW state | graphs | tokens/s | × resident "
             "| of GPU floor | PCIe GB/s (share) | disk GB/s | host RSS GiB | loss Δ vs reference |",
             "|---|" + "---|" * 15]
    for r in results:
        if r.get("kind") != "streamed" and "budget" not in r:
            continue
        if not ok(r):
            why = r.get("error") or r.get("skipped") or "refused: " + r.get("refused", "")
            lines.append(f"| {label(r['run'])} | {r.get('budget') or '—'} | {why[:200]} |" + " |" * 13)
            continue
        plan = r.get("plan", {})
        budget = r.get("budget_bytes")
        peak = r.get("driver_peak")
        holds = "—" if peak is None or budget is None else ("yes" if peak <= budget else f"NO (+{(peak - budget) / 2**20:.0f} MiB)")
        n_disk = len(plan.get("disk_layers", []))
        layers = f"{len(plan.get('resident', []))} / {len(plan.get('streamed', [])) - n_disk} / {n_disk}"
        pcie = r.get("pcie_gb_per_s")
        pcie = "—" if not pcie else f"{pcie:.1f}" + (f" ({r['pcie_share'] * 100:.0f}%)" if r.get("pcie_share") else "")
        disk = r.get("disk", {}).get("read_gb_per_s")
        gap = r.get("loss_gap_vs_reference")
        gap = "—" if gap is None else f"{gap * 100:.3f}% ({r.get('reference')})"
        x_r = f"{r['tokens_per_s'] / res['tokens_per_s']:.2f}" if res else "—"
        floor = f"{r['floor_fraction'] * 100:.0f}%" if "floor_fraction" in r else "—"
        lines.append(
            f"| {label(r['run'])} | {r.get('budget')} | {gib(peak)} ({gib(r.get('driver_peak_steps'))}) | {holds} | "
            f"{gib(r.get('max_allocated'))} / {gib(r.get('max_reserved'))} | {gib(r.get('plan_total'))} "
            f"({gib(plan.get('driver', {}).get('total'))}) | {layers} | {'host' if r.get('optimizer_on_host') else 'GPU'} | "
            f"{'yes' if r.get('cuda_graphs') else 'no'} | {r['tokens_per_s']:.0f} | {x_r} | {floor} | {pcie} | "
            f"{'—' if disk is None else f'{disk:.2f}'} | {gib(r.get('host_peak_rss'))} | {gap} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path, title: str) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return
    fig = Figure(figsize=(8, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for r in results:
        if r.get("trace"):
            t, m = zip(*r["trace"])
            ax.plot([v * 1e3 for v in t], [v / 2**30 for v in m], lw=1.2, label=r["run"])
    ax.set_xlabel("time in one training step (ms)")
    ax.set_ylabel("torch.cuda.memory_allocated (GiB)")
    ax.set_title(f"GPU memory over one step ({title})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(CONFIGS) + ["smollm2"], default=None,
                    help="llama2-7b on CUDA, smollm2 (the real GGUF) on the CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--runs", default=None,
                    help=f"comma-separated: resident, resident-eager, resident-graphs, streamed[:budget], qlora on "
                    f"CUDA (default {', '.join(RUNS)}); {', '.join(CPU_RUNS)} on the CPU (the default there)")
    ap.add_argument("--steps", type=int, default=None, help="20 on CUDA, 8 on the CPU")
    ap.add_argument("--seq", type=int, default=None, help="2048 on CUDA, 256 on the CPU")
    ap.add_argument("--batch", type=int, default=None, help="1 on CUDA, 2 on the CPU")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (CPU runs)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--qtype", default="Q4_K")
    ap.add_argument("--max-vram", default="3GiB", help="streamed runs without a budget of their own")
    ap.add_argument("--gguf-dir", help="where runs with a host-RAM limit write the model as a GGUF file "
                    "(default: the temporary directory)")
    ap.add_argument("--reference", help="the run the others' losses are compared with (default: "
                    "resident-eager, else the first run that trained)")
    ap.add_argument("--unique-layers", type=int, default=4)
    ap.add_argument("--weights-cache", help="directory keeping the quantized weights between runs")
    ap.add_argument("--compile", choices=("off", "layer", "model"), default="layer",
                    help="lowtune runs but resident-eager: lowtune.compile mode")
    ap.add_argument("--cuda-graphs", choices=("on", "off"), default="on",
                    help="lowtune runs but resident-eager, on CUDA: replay layers from CUDA graphs")
    ap.add_argument("--deadline", type=float, help="seconds for the whole invocation: later runs "
                    "get what is left, and are skipped when under --min-run seconds remain")
    ap.add_argument("--min-run", type=float, default=45.0)
    ap.add_argument("--peaks", help="JSON file of measured peaks: read when it exists, else measured and written")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trace-step", type=int, default=5, help="step (0-based) whose memory is traced")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step")
    ap.add_argument("--profile-step", type=int, default=3)
    ap.add_argument("--profile-trace", help="keep the profiled step's chrome trace as PREFIX.RUN.json.gz")
    ap.add_argument("--alloc-conf", help="PYTORCH_CUDA_ALLOC_CONF for every run, e.g. expandable_segments:True")
    ap.add_argument("--out", help="directory for results.json, table.md, memory.png")
    ap.add_argument("--run", help=argparse.SUPPRESS)        # internal: one run, JSON on stdout
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    runs = (args.runs or DEFAULTS["cpu" if args.device == "cpu" else "cuda"]["runs"]).split(",")
    cpu_runs = runs[0] in CPU_RUNS
    for key, value in DEFAULTS["cpu" if cpu_runs else "cuda"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if any((r in CPU_RUNS) != cpu_runs for r in runs) or (args.model == "smollm2") != cpu_runs:
        ap.error(f"runs {', '.join(CPU_RUNS)} compare on --model smollm2 (the CPU benchmark); "
                 f"{', '.join(RUNS)} on the random models; do not mix them")

    if args.run:
        result = run_one_cpu(args) if args.run in CPU_RUNS else run_one(args)
        Path(args.json_out).write_text(json.dumps(result))
        return 0

    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    head = (f"date {datetime.date.today().isoformat()}; {gpu}; torch {torch.__version__}; "
            f"{args.model}, {args.qtype}, seq {args.seq} x batch {args.batch}, LoRA r={args.rank} on "
            f"all seven linears, {args.steps} steps")
    if cpu_runs:
        head = cpu_header(args)
    print(head, flush=True)
    results, peaks, started = [], None, time.perf_counter()
    scratch = tempfile.mkdtemp(prefix="bench_train-")

    def launch(run: str) -> dict:
        left = None if args.deadline is None else args.deadline - (time.perf_counter() - started)
        if left is not None and left < args.min_run:
            return {"run": run, "skipped": f"skipped: {left:.0f} s left of the time budget"}
        # each run's result, beside the others when --out is given, else in a scratch directory
        tmp = Path(out or scratch) / f"run-{run.replace(':', '-')}.json"
        cmd = [sys.executable, __file__, "--run", run, "--json-out", str(tmp)] + \
              [a for a in (argv if argv is not None else sys.argv[1:])]
        t0 = time.perf_counter()
        env = dict(os.environ)
        if args.alloc_conf:
            env["PYTORCH_CUDA_ALLOC_CONF"] = args.alloc_conf
        try:
            p = subprocess.run(cmd, timeout=min(args.timeout, left or args.timeout), env=env)
            if p.returncode != 0:
                raise RuntimeError(f"exit {p.returncode}")
            return json.loads(tmp.read_text())
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            return {"run": run, "error": f"failed: {e}"}
        finally:
            print(f"== {run}: {time.perf_counter() - t0:.0f} s", flush=True)

    if args.device == "cuda" and args.peaks and Path(args.peaks).exists():
        peaks = json.loads(Path(args.peaks).read_text())
    elif args.device == "cuda":
        peaks = launch("peaks")
        if "error" in peaks or "skipped" in peaks:
            peaks = None
        else:
            if args.peaks:
                Path(args.peaks).write_text(json.dumps(peaks))
            print(f"peaks: bf16 matmul {peaks['bf16_flops'] / 1e12:.0f} TFLOP/s, HBM "
                  f"{peaks['hbm_bytes_per_s'] / 1e12:.2f} TB/s", flush=True)
    for run in args.runs.split(","):
        if not cpu_runs:
            parse_run(run, args)
        results.append(launch(run))
    if cpu_runs:
        table = report_cpu(results, args)
    else:
        analyse(results, peaks, args.reference)
        table = report(results, args)
        if any(r.get("kind") == "streamed" or "budget" in r for r in results):
            table += "\n\nBudgets (--max-vram as the driver counts it; peaks are NVML's):\n\n" + budget_report(results, args)
    if peaks:
        head += (f"; measured peaks: bf16 matmul {peaks['bf16_flops'] / 1e12:.0f} TFLOP/s, "
                 f"HBM {peaks['hbm_bytes_per_s'] / 1e12:.2f} TB/s"
                 + (f", pinned host -> GPU {peaks['h2d_bytes_per_s'] / 1e9:.1f} GB/s" if peaks.get("h2d_bytes_per_s") else ""))
    print("\n" + head + "\n\n" + table)
    if out:
        (out / "results.json").write_text(json.dumps({"header": head, "peaks": peaks, "results": results}, indent=1))
        (out / "table.md").write_text(head + "\n\n" + table + "\n")
        if not cpu_runs:
            plot(results, out / "memory.png", f"{args.model} shapes, {args.qtype}, seq {args.seq}, r={args.rank}")
    return 0 if all("error" not in r for r in results) else 1

if __name__ == "__main__":
    sys.exit(main())
