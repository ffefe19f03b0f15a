"""The one way in: a model file or directory becomes a model (and a tokenizer, and adapters), checked.
Every command and the Python API load through here.

    model = load_model("model.gguf")                                # eval mode, CPU, fp32 activations
    model, tok = load("model.gguf", adapter="runs/a", device="cuda") # base + trained adapter, unmerged
    model = load_model("Llama-3.2-1B/", qtype="Q4_K")               # HF directory, quantized on load
    with open_base("model.gguf") as src: ...                        # tensor by tensor (export)

Sources. open_source(path) gives the model as stored, as a GGUF-like object (metadata,
metadata_types, tensor_infos, qtensor(name), tensor(name), alignment, close()): a GGUF file
(gguf_io.GGUFFile, or gguf_split.SplitGGUF over the parts of a split one) or a Hugging Face
checkpoint directory (safetensors_io.HFCheckpoint, float tensors). open_base(path, qtype) gives it
as lowtune trains on it: a GGUF file in its own blocks, an HF directory with every tensor in the
type recipes.training_type picks (qtype, by default Q4_K or Q4_1), converted as it is read.

Weights. A tensor with one dimension (norms, biases, rope factors) is read as fp32; every matrix
stays packed in its own blocks (memory-mapped on the CPU, copied as blocks to a GPU). The config
comes from the metadata (ModelConfig.from_gguf_metadata) and the model checks every weight it
needs against it. INTb-gG tensors of a `lowtune quantize` file are used in their stored Q4_1/Q5_1/
F32 blocks (the same values), which is what finetune trains on and export merges into;
restore_int_types=True re-packs them into INTb-gG blocks.

Adapters and the base. An adapter directory holds adapter_config.json and adapter.safetensors;
a run directory holds one in adapter/ (find_adapter_dir). Every adapter records the hash of the
base it was trained on (adapters.base_hash), and check_base is the one policy for it: a different
base is refused, with the reason and the fix, unless force=True (`--force`); an adapter or base
without a hash cannot be checked, which is said in a warning (shapes and types are always checked).
"""
from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from . import _C, gguf_split, ops
from .adapters import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdaptedLinear, AdapterConfig, apply_adapters,
                       base_hash, load_adapter, mark_only_adapters_trainable, merge_exact_summary,
                       model_base_hash, no_min_note, read_adapter_config, set_rank)
from .dtypes import torch_dtype
from .formats import get_format
from .gemma3n import Gemma3nModel
from .gemma4 import Gemma4Model
from .frozen_adapter import FrozenAdaptedLinear, freeze_adapter
from .gguf_io import DEFAULT_ALIGNMENT, GGUFFile, TensorInfo
from .gguf_split import SplitGGUF
from .hf_names import adapter_targets
from .model import QEmbedding, QLinear
from .model import Model, ModelConfig  # the model families' classes
from .paths import missing_model
from .progress import tracked
from .qtensor import QTensor
from .recipes import logical_types, training_type
from .rundir import ADAPTER
from .rwkv import Rwkv6Model, Rwkv7Model
from .safetensors_io import HFCheckpoint, Source, set_file_type
from .streaming import stream_model
from .tokenizer import Tokenizer, load_tokenizer
from .train_config import TrainConfig, read_run_config

log = logging.getLogger("lowtune")


class BaseMismatchError(ValueError):
    """An adapter given a base other than the one it was trained on (check_base)."""


# ---- sources -------------------------------------------------------------------------------------

def open_gguf(path) -> GGUFFile | SplitGGUF:
    """A GGUF file as a source; a split GGUF (model-00001-of-0000N.gguf) as one GGUF-like object
    over all its parts, opened from the first (gguf_split)."""
    return gguf_split.open_gguf(path)


def _is_hf(path) -> bool:
    p = Path(path)
    return p.is_dir() or (p.suffix == ".safetensors" and p.is_file())


def open_source(path):
    """The model at `path` as stored: a GGUF file, or a Hugging Face directory (or one of its
    .safetensors files) with its float tensors. GGUF-like (module doc); close it when done."""
    p = Path(path)
    if _is_hf(p):
        return HFCheckpoint(p if p.is_dir() else p.parent)
    if not p.is_file():
        raise missing_model(p)
    return open_gguf(p)


class TypedSource(Source):
    """A GGUF-like view of a float source (an HF checkpoint) in which every tensor has the type
    `choose(name, shape)` gives it, converted when it is read: peak memory is one float tensor."""

    def __init__(self, source, choose: Callable[[str, tuple], object]):
        self.source, self.path = source, source.path
        self.metadata, self.metadata_types = dict(source.metadata), dict(source.metadata_types)
        self.alignment = DEFAULT_ALIGNMENT
        self.tensor_infos = {}
        for name, ti in source.tensor_infos.items():
            fmt = get_format(choose(name, ti.shape))
            rows = ti.n_elements // ti.shape[-1]
            self.tensor_infos[name] = TensorInfo(name, fmt, ti.shape, ti.ne, -1, rows * fmt.row_bytes(ti.shape[-1]),
                                                 fmt.name, fmt.type_id)
        set_file_type(self.metadata, self.metadata_types, self.tensor_infos)

    def qtensor(self, name: str) -> QTensor:
        ti = self.tensor_infos[name]
        w = ops.dequantize(self.source.qtensor(name), torch.float32)
        return ops.quantize(w, ti.type)

    def tensor(self, name: str):
        """A QTensor for quantized types, else the values in their float dtype and shape."""
        qt = self.qtensor(name)
        if qt.format.quantized:
            return qt
        return qt.raw.view(torch_dtype(qt.type)).reshape(self.tensor_infos[name].shape)

    def close(self) -> None:
        self.source.close()


def hf_qtype(path, adapter=None, qtype: str | None = None) -> str | None:
    """The type an HF directory at `path` is quantized to on load: `qtype`; else, with an
    adapter, the one its run quantized with (the run's config.json); else None
    (recipes.training_type's default). None for a GGUF file, which keeps its own types."""
    if not _is_hf(path):
        return None
    if qtype is None and adapter is not None:
        for d in (Path(adapter), Path(adapter).parent):
            run = read_run_config(d)
            if run is not None:
                return (run.get("train") or {}).get("qtype")
    return qtype


def open_base(path, qtype: str | None = None):
    """The model at `path` as lowtune trains on it (module doc): GGUF-like, read tensor by
    tensor. qtype: the type an HF directory is quantized to (see hf_qtype)."""
    src = open_source(path)
    if isinstance(src, HFCheckpoint):
        return TypedSource(src, lambda name, shape: training_type(qtype, shape, name))
    return src


# ---- the model -----------------------------------------------------------------------------------

def read_weights(source, device="cpu") -> tuple[dict, dict[str, str]]:
    """({name: weight}, {name: type name}) of a source: fp32 for every tensor with one
    dimension, the packed QTensor for every matrix."""
    weights, types = {}, {}
    what = "quantizing" if isinstance(source, TypedSource) else "loading"
    # a bar only where reading takes a while (a large model, or one quantized as it is read)
    infos = tracked(source.tensor_infos.items(), len(source.tensor_infos), f"{what} {source.path}", "tensor")
    for name, info in infos:
        qt = source.qtensor(name)
        types[name] = qt.type
        if len(info.shape) == 1:
            weights[name] = ops.dequantize(qt, torch.float32).reshape(-1).to(device)
        else:
            weights[name] = qt.to(device)
    return weights, types


def model_class(config: ModelConfig) -> type[Model]:
    """The class of a family's model: lowtune.model's, or Gemma 3n's, Gemma 4's or RWKV's around it."""
    if config.family.rwkv:
        return Rwkv7Model if config.family.rwkv == 7 else Rwkv6Model
    if config.family.layer_widths:
        return Gemma4Model
    return Gemma3nModel if config.family.altup else Model


def build_model(source, device="cpu", dtype: torch.dtype = torch.float32) -> Model:
    """The model a source holds (ModelConfig from its metadata, then Model, which checks every
    weight against it), in eval mode. It knows its metadata, tensor types and source path."""
    md = dict(source.metadata)
    weights, types = read_weights(source, device)
    config = ModelConfig.from_gguf_metadata(md, weights)
    model = model_class(config)(config, weights, dtype)
    model.metadata, model.tensor_types, model.source_path = md, types, str(source.path)
    return model.eval()


def restore_logical_types(model: Model) -> dict[str, str]:
    """Re-pack, in place, the packed matrices that the file records as INTb-gG
    (lowtune.logical_types) into INTb-gG blocks. A tensor is re-packed only when quantizing its
    values as INTb-gG gives them back bit for bit (it does for files written by
    quantize_model); otherwise it keeps its stored type. Returns {tensor: type now used}."""
    logical = logical_types(model.metadata)
    done = {}
    for mod in model.modules():
        if not isinstance(mod, (QLinear, QEmbedding)) or mod.name not in logical:
            continue
        fmt = get_format(logical[mod.name])
        values = ops.dequantize(mod.weight, torch.float32)
        if values.shape[1] % fmt.block_elems:
            continue
        packed = ops.quantize(values, fmt)
        if torch.equal(ops.dequantize(packed, torch.float32), values):
            mod.raw, mod.format = packed.raw.to(mod.raw.device), fmt
        done[mod.name] = mod.format.name
    model.tensor_types.update(done)
    return done


def pick_device(name: str = "auto") -> torch.device:
    """`auto` (CUDA where a GPU is visible and lowtune was built with CUDA), cpu, cuda, cuda:N."""
    cuda_ok = torch.cuda.is_available() and bool(_C.build_info()["cuda"])
    if name == "auto":
        return torch.device("cuda" if cuda_ok else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown --device {name!r}: use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda" and not cuda_ok:
        raise ValueError("--device cuda asked for, but no CUDA GPU is visible or lowtune was built without CUDA")
    return dev


def activation_dtype(device: torch.device, name: str | None = None) -> torch.dtype:
    """The dtype activations run in: `name` (fp32, bf16, fp16, ...), else bf16 on a GPU, fp32 on the CPU."""
    if name not in (None, "auto"):
        return torch_dtype(name)
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_model(path, *, device="cpu", dtype: torch.dtype = torch.float32, qtype: str | None = None,
               adapter=None, rank: int | None = None, base_adapter=None, force: bool = False,
               restore_int_types: bool = False) -> Model:
    """The model at `path` (GGUF file or HF directory) on `device` with `dtype` activations, in
    eval mode. qtype: an HF directory's type (hf_qtype). base_adapter: a run directory whose
    adapter is applied frozen (LREC, then fine-tune). adapter: a run or adapter directory applied
    unmerged on top; rank picks QDyLoRA's b. force: use adapters trained on another base."""
    if rank is not None and adapter is None:
        raise ValueError("--rank needs --adapter")
    if qtype is not None and not _is_hf(path):
        raise ValueError("--type applies to safetensors models; a GGUF file is used in its own "
                         "quantization (re-quantize it with `lowtune quantize` first)")
    with open_base(path, hf_qtype(path, adapter, qtype)) as src:
        model = build_model(src, device, dtype)
    if restore_int_types:
        restore_logical_types(model)
    if base_adapter is not None:
        attach_base_adapter(model, base_adapter, force)
    if adapter is not None:
        attach_adapter(model, adapter, rank, force)
    return model.eval()


def load(path, **options) -> tuple[Model, Tokenizer]:
    """(load_model(path, **options), its tokenizer, built from the model's own metadata)."""
    model = load_model(path, **options)
    return model, load_tokenizer(model.metadata)


# ---- adapters ------------------------------------------------------------------------------------

def find_adapter_dir(path) -> Path:
    """The directory holding a saved adapter (adapter_config.json and adapter.safetensors): `path`
    itself, or `path`/adapter (a `lowtune finetune` or `lowtune correct` run directory)."""
    p = Path(path)
    for d in (p, p / ADAPTER):
        if (d / ADAPTER_CONFIG).is_file() and (d / ADAPTER_WEIGHTS).is_file():
            return d
    raise FileNotFoundError(f"no adapter in {p}: looked for {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} in {p} "
                            f"and in {p / ADAPTER}; pass a `lowtune finetune` or `lowtune correct` run "
                            "directory, or the adapter directory itself")


def adapter_rank(meta: dict, rank: int | None) -> int | None:
    """The QDyLoRA rank to use for a saved adapter (meta: its adapter_config.json): `rank`, else
    the saved one; None for the other methods, which refuse a rank."""
    method, r_max = meta["method"], int(meta["rank"])
    if method != "qdylora":
        if rank is not None:
            raise ValueError(f"--rank picks a QDyLoRA rank; this adapter is {method} (rank fixed at {r_max})")
        return None
    if rank is not None and not 1 <= rank <= r_max:
        raise ValueError(f"QDyLoRA rank must be in 1..{r_max}, got {rank}")
    return int(rank or meta.get("dylora_rank") or r_max)


def check_base(directory, meta: dict, base, force: bool = False) -> None:
    """The base check (module doc). base: the model the adapter goes onto, or its file/directory."""
    saved = meta.get("base_hash")
    is_model = isinstance(base, torch.nn.Module)
    what = (getattr(base, "source_path", None) or "this model") if is_model else base
    got = model_base_hash(base) if is_model else base_hash(base)
    if saved is None or got is None:
        log.warning("cannot check that the adapter in %s was trained on %s (%s); its shapes and "
                    "types are checked instead", directory, what,
                    "the adapter records no base hash" if saved is None else "the model has no file")
        return
    if saved == got:
        return
    if force:
        log.warning("the adapter in %s was trained on base %s…, not on %s (%s…); used anyway (--force)",
                    directory, saved[:16], what, got[:16])
        return
    raise BaseMismatchError(
        f"the adapter in {directory} was trained on base {saved[:16]}…, not on {what} ({got[:16]}…): "
        "pass the model it was trained on, or --force to use it anyway (its shapes and types must "
        "still match)")


def attach_adapter(model: Model, path, rank: int | None = None, force: bool = False) -> dict[str, AdaptedLinear]:
    """Apply the adapter saved in `path` (a run or adapter directory) to `model`, unmerged, after
    check_base; rank picks QDyLoRA's b (default: the saved one)."""
    d = find_adapter_dir(path)
    meta = read_adapter_config(d)
    b = adapter_rank(meta, rank)
    check_base(d, meta, model, force)
    ads = load_adapter(model, d)
    if b is not None:
        set_rank(ads, b)
    model.eval()
    return ads


def attach_base_adapter(model: Model, path, force: bool = False) -> dict[str, FrozenAdaptedLinear]:
    """Apply the adapter saved in `path` frozen (frozen_adapter), after check_base, so that a
    trainable adapter can go on top of it."""
    d = find_adapter_dir(path)
    check_base(d, read_adapter_config(d), model, force)
    return freeze_adapter(model, d)


# ---- a model to train ----------------------------------------------------------------------------

def apply_train_adapter(model, cfg: TrainConfig) -> dict:
    """Wrap the model's linears with cfg.method adapters and freeze everything else; returns the
    resolved adapter config."""
    kw = dict(method=cfg.method, dropout=cfg.dropout, seed=cfg.seed, merge_exact=cfg.merge_exact)
    if cfg.rank is not None:
        kw["rank"] = cfg.rank
    if cfg.alpha is not None:
        kw["alpha"] = cfg.alpha
    if cfg.targets is not None:  # lowtune's names, or the family's HF module names
        kw["targets"] = adapter_targets(cfg.targets, model.config.arch)
    if cfg.layers is not None:
        kw["layers"] = tuple(cfg.layers)
    acfg = AdapterConfig(**kw)
    ads = apply_adapters(model, acfg)
    note = no_min_note(acfg.method, {ad.base_type for ad in ads.values()})
    if note:
        log.warning("%s", note)
    mark_only_adapters_trainable(model)
    return acfg.to_dict()


def load_for_training(cfg: TrainConfig, device: torch.device, say=print) -> tuple[Model, Tokenizer]:
    """The model and tokenizer a TrainConfig trains: cfg.model loaded with cfg.dtype activations
    (an HF directory quantized per cfg.qtype), cfg.base_adapter frozen under a new trainable
    cfg.method adapter, and under a --max-vram budget placed by lowtune.streaming. Records
    cfg.extra["adapter"] (and ["streaming"])."""
    streams = cfg.max_vram is not None and device.type == "cuda"
    if cfg.max_vram is not None and not streams:
        say("--max-vram is a GPU memory budget; on the CPU nothing streams")
    # Under a memory budget the packed weights stay in host memory until streaming places them.
    model = load_model(cfg.model, device="cpu" if streams else device,
                       dtype=activation_dtype(device, cfg.dtype), qtype=cfg.qtype,
                       base_adapter=cfg.base_adapter, force=cfg.force)
    cfg.extra["adapter"] = apply_train_adapter(model, cfg)
    exact = merge_exact_summary(model)
    if exact:
        say(exact)
    if streams:
        gguf = Path(cfg.model).is_file() and not _is_hf(cfg.model)
        # the trainer captures layers in CUDA graphs unless told not to: the plan makes room for
        # their pool, or says there is none (plan.cuda_graphs), and the trainer follows it
        plan = stream_model(model, device, cfg.max_vram, tokens=cfg.seq_len * cfg.batch,
                            cuda_graphs=cfg.cuda_graphs is not False,
                            host_ram=cfg.host_ram, source=cfg.model if gguf else None)
        cfg.extra["streaming"] = plan.to_dict()
        say(plan.summary())
    return model, load_tokenizer(model.metadata)


# ---- what a file holds ---------------------------------------------------------------------------

def describe(path) -> dict:
    """Architecture, sizes and tensor types of a model, from its header only."""
    with open_source(path) as src:
        md = dict(src.metadata)
        infos = list(src.tensor_infos.values())
        parts = [Path(f.path) for f in src.parts] if isinstance(src, SplitGGUF) else None
    p = Path(path)
    types: Counter = Counter()
    params: Counter = Counter()
    for ti in infos:
        types[ti.type_name] += 1
        params[ti.type_name] += ti.n_elements
    total_bytes, total_params = sum(ti.nbytes for ti in infos), sum(params.values())
    names = {ti.name for ti in infos}
    info = {
        "file": str(path),
        "file_bytes": sum(f.stat().st_size for f in (parts or (p.iterdir() if p.is_dir() else [p])) if f.is_file()),
        "parts": len(parts) if parts else 1,
        "architecture": md.get("general.architecture"), "name": md.get("general.name"),
        "params": total_params, "tensor_bytes": total_bytes,
        "bits_per_weight": 8.0 * total_bytes / total_params if total_params else 0.0,
        "tensor_types": {t: {"tensors": types[t], "params": params[t]} for t in sorted(types, key=lambda t: -params[t])},
        "tied_embeddings": "output.weight" not in names,
        "tokenizer": md.get("tokenizer.ggml.model"), "chat_template": "tokenizer.chat_template" in md,
    }
    try:
        c = ModelConfig.from_gguf_metadata(md)
        info["config"] = {"layers": c.n_layers, "dim": c.dim, "ffn_dim": c.ffn_dim, "heads": c.n_heads,
                          "kv_heads": c.n_kv_heads, "head_dim": c.head_dim, "vocab": c.vocab_size,
                          "context": c.context_length, "rope_theta": c.rope_theta,
                          "rope_linear_scale": c.rope_linear_scale, "rope_yarn_factor": c.rope_yarn_factor,
                          "rope_orig_context": c.original_context,
                          "rope_freqs": "rope_freqs.weight" in names, "rms_eps": c.norm_eps,
                          "experts": c.n_experts, "experts_used": c.n_experts_used, "expert_ffn_dim": c.expert_width,
                          "conv_layers": list(c.conv_layers), "conv_kernel": c.conv_kernel,
                          "ssm_layers": list(c.ssm_layers), "ssm": None if c.ssm is None else dataclasses.asdict(c.ssm),
                          "no_rope": c.no_rope, "delta_layers": list(c.delta_layers),
                          "mlp_layers": None if c.mlp_layers is None else list(c.mlp_layers),
                          "layer_widths": [dict(zip(("head_dim", "kv_heads", "ffn_dim", "rope_dim"), w))
                                           for w in c.layer_widths],
                          "learned_positions": "position_embd.weight" in names, "alibi_max_bias": c.alibi_max_bias,
                          "clamp_qkv": c.clamp_qkv, "rwkv": c.family.rwkv, "rwkv_mlp": c.family.rwkv_mlp,
                          "wkv_lora_ranks": list(c.wkv_lora_ranks)}
    except ValueError as e:
        info["unsupported"] = str(e)
    return info
