"""Exports of a trained adapter: merged GGUF, GGUF LoRA, PEFT adapter, merged HF safetensors.

    export_merged_gguf("model.gguf", "runs/a", "merged.gguf")        # each tensor in its own type
    export_merged_gguf("model.gguf", "runs/a", "merged.gguf", qtype="Q5_K")   # re-targeted
    export_lora_gguf("model.gguf", "runs/a", "lora.gguf")            # llama.cpp --lora
    export_peft("model.gguf", "runs/a", "peft/")                     # adapter_model.safetensors
    export_hf("model.gguf", "runs/a", "hf/", dtype="bf16")           # LlamaForCausalLM directory
    model = load_model_with_adapter("model.gguf", "runs/a", rank=8)  # base + adapter, unmerged

The base is read tensor by tensor from its memory-mapped GGUF (or a Hugging Face directory,
quantized on the fly as training did) and every output is written one tensor at a time to a
temporary name, then renamed: peak host memory is about one dense tensor.

How each method merges (lowtune.merge does the per-tensor math):
  QA-LoRA, QA-HiRA   the update is constant on every quantization group, so on Q4_1, Q5_1 and
                     INTb-gG bases it moves only the fp16 mins (exact up to fp16 rounding); on
                     Q2_K/Q4_K/Q5_K the quantized mins are refitted; elsewhere re-quantized.
  LoRA, Q-BaRA, QDyLoRA   deq(W) + ΔW re-quantized once into the tensor's own type.
Every method is also a standard LoRA (AdaptedLinear.as_lora: pooling folded into A', the scale
and the output repeat into B'), which is what the GGUF LoRA and PEFT exports hold.

GGUF stores q/k rows permuted for ggml's RoPE; the HF exports (PEFT, safetensors) undo that.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from . import adapters as _adapters
from .adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdaptedLinear, AdapterConfig
from .formats import get_format
from .merge import MergeInfo, dense, merge_weight
from .qtensor import QTensor

log = logging.getLogger("lowtune.export")

# GGUF (blk.N.)<name> <-> HF model.layers.N.<name>
HF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
HF_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}
_HF_DTYPES = {"bf16": (torch.bfloat16, "BF16", "bfloat16"), "fp16": (torch.float16, "F16", "float16"),
              "f16": (torch.float16, "F16", "float16"), "fp32": (torch.float32, "F32", "float32"),
              "f32": (torch.float32, "F32", "float32")}
_MODULE_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(\w+)$")


def gguf_to_hf_name(name: str) -> str | None:
    """HF Llama name of a GGUF tensor; None for tensors HF does not store (rope_freqs)."""
    if name in HF_GLOBAL_NAMES:
        return HF_GLOBAL_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in HF_LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{HF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    if name == "rope_freqs.weight":
        return None
    raise ValueError(f"no Hugging Face name for GGUF tensor {name!r}")


def _is_q(name: str) -> bool:
    return name.endswith(".attn_q.weight")


def _is_k(name: str) -> bool:
    return name.endswith(".attn_k.weight")


# ---- the base model ----------------------------------------------------------------------------

def open_base(model, qtype=None):
    """The base as a GGUFFile-like object (metadata, metadata_types, tensor_infos, qtensor(),
    tensor(), alignment, path). model: a GGUF file, or a Hugging Face directory, quantized the
    way `lowtune finetune` quantizes it (to `qtype`, or per trainer.default_qtype when None), so
    the merge starts from the very blocks the adapter was trained on."""
    p = Path(model)
    if p.is_dir():
        from .trainer import _load_safetensors_dir
        ckpt = _load_safetensors_dir(p, qtype)
        ckpt.alignment = 32
        return ckpt
    if not p.is_file():
        raise ValueError(f"model file not found: {p}")
    from .gguf_io import GGUFFile
    return GGUFFile(p)


# ---- the adapter ---------------------------------------------------------------------------------

def find_adapter_dir(path) -> Path:
    """The directory holding adapter_config.json + adapter.safetensors: `path` itself, or the
    adapter inside a `lowtune finetune` run directory."""
    p = Path(path)
    if (p / ADAPTER_CONFIG).is_file():
        return p
    if not p.is_dir():
        raise ValueError(f"adapter directory not found: {p}")
    for sub in ("adapter", ADAPTER_WEIGHTS):
        if (p / sub / ADAPTER_CONFIG).is_file():
            return p / sub
    found = sorted(c.parent for c in p.glob(f"*/{ADAPTER_CONFIG}"))
    if len(found) == 1:
        return found[0]
    what = "several adapters: " + ", ".join(str(f) for f in found) if found else "no adapter_config.json"
    raise ValueError(f"{p}: {what}; pass the adapter directory itself (the one holding {ADAPTER_CONFIG})")


def gguf_name_of_module(module: str) -> str:
    """'layers.3.attn_q' (a LlamaModel module path) -> 'blk.3.attn_q.weight'."""
    m = _MODULE_RE.search(module)
    if m is None:
        raise ValueError(f"adapter module {module!r} is not a decoder-layer linear (layers.N.<name>)")
    return f"blk.{m.group(1)}.{m.group(2)}.weight"


@torch.no_grad()
def group_offsets(lin: AdaptedLinear) -> torch.Tensor:
    """QA-LoRA / QA-HiRA: the constant their update adds to each group of G inputs, [N, K/G]
    fp32 (= lin.block_offsets(), without building the dense ΔW): the pooled input is a mean,
    so ΔW[o, i] = scale · (B·A)[o, i // G] / G (QA-HiRA: M in place of B·A)."""
    g = lin.geometry()
    if lin.method == "qa-hira":
        m = lin.hira_M.float()
    else:
        m = lin.lora_B[:, :g.rank].float() @ lin.lora_A[:g.rank].float()
    return (m.repeat_interleave(g.repeat, dim=0) * (g.scale / g.pool)).contiguous()


class _FrozenWeight(nn.Module):
    """Stands in for the base linear: AdaptedLinear only reads its QTensor `weight`."""
    lowtune_fusable = False

    def __init__(self, qt: QTensor):
        super().__init__()
        self._qt = qt

    @property
    def weight(self) -> QTensor:
        return self._qt


class SavedAdapter:
    """A saved adapter, applied one base tensor at a time (no model needed).

        ad = SavedAdapter("runs/a", rank=None)
        ad.method, ad.config, ad.rank          # rank: QDyLoRA's b in use (None otherwise)
        for name in ad.tensor_names: ...        # GGUF names of the adapted weights
        lin = ad.adapted(name, qt)              # AdaptedLinear on that weight, weights loaded
    """

    def __init__(self, directory, rank: int | None = None):
        from safetensors import safe_open

        self.directory = find_adapter_dir(directory)
        self.meta = _adapters.read_adapter_config(self.directory)
        self.config = AdapterConfig.from_dict(self.meta["config"])
        self.method = self.config.method
        if rank is not None and self.method != "qdylora":
            raise ValueError(f"--rank picks a QDyLoRA rank; this adapter is {self.method} "
                             f"(rank fixed at {self.config.rank})")
        if rank is not None and not 1 <= rank <= self.config.rank:
            raise ValueError(f"QDyLoRA rank must be in 1..{self.config.rank}, got {rank}")
        self.rank = (rank or int(self.meta.get("dylora_rank") or self.config.rank)) \
            if self.method == "qdylora" else None
        self.modules = {gguf_name_of_module(m): (m, spec) for m, spec in self.meta["modules"].items()}
        self._st = safe_open(str(self.directory / ADAPTER_WEIGHTS), framework="pt")

    @property
    def tensor_names(self) -> list[str]:
        return list(self.modules)

    @property
    def base_hash(self) -> str | None:
        return self.meta.get("base_hash")

    def check_base(self, base_path, ignore: bool = False) -> None:
        """The saved base hash must match the base file (GGUF); ignore=True skips the check."""
        saved = self.base_hash
        if ignore:
            return
        if saved is None:
            log.warning("the adapter in %s records no base hash; cannot check it was trained on %s",
                        self.directory, base_path)
            return
        if not Path(base_path).is_file():
            return  # an HF directory: shapes and types are checked tensor by tensor instead
        got = _adapters.base_hash(base_path)
        if got != saved:
            raise ValueError(f"the adapter in {self.directory} was trained on base {saved[:16]}…, but "
                             f"{base_path} is {got[:16]}…; pass the training base (or "
                             f"--ignore-base-hash to merge anyway)")

    def adapted(self, name: str, qt: QTensor) -> AdaptedLinear | None:
        """The adapter of GGUF tensor `name` on base weight qt, or None if it has none."""
        if name not in self.modules:
            return None
        module, spec = self.modules[name]
        n, k = qt.shape
        if (spec["out_features"], spec["in_features"]) != (n, k) or spec["base_type"] != qt.type:
            raise ValueError(f"{name}: the adapter was trained on a {spec['base_type']} "
                             f"[{spec['out_features']}, {spec['in_features']}] weight, but this base "
                             f"holds {qt.type} [{n}, {k}]; pass the base the adapter was trained on")
        lin = AdaptedLinear(_FrozenWeight(qt), self.config)
        with torch.no_grad():
            for pname, p in lin.named_parameters(recurse=False):
                key = f"{module}.{pname}"
                if key not in self._st.keys():
                    raise ValueError(f"{self.directory / ADAPTER_WEIGHTS} lacks {key}")
                t = self._st.get_tensor(key)
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"{key}: saved shape {tuple(t.shape)}, expected {tuple(p.shape)}")
                p.copy_(t.to(p.dtype))
        if self.rank is not None:
            lin.set_rank(self.rank)
        return lin

    def update(self, name: str, qt: QTensor) -> dict:
        """merge_weight's keyword arguments for tensor `name`: {} (no adapter), {"delta": ΔW} or,
        for QA-LoRA / QA-HiRA, {"delta_groups": [N, K/G], "group": G}."""
        lin = self.adapted(name, qt)
        if lin is None:
            return {}
        if lin.method in ("qa-lora", "qa-hira"):
            return {"delta_groups": group_offsets(lin), "group": lin.pool}
        return {"delta": lin.delta_weight()}

    def lora(self, name: str, qt: QTensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A' [r', K], B' [N, r']) fp32, the scale folded into B', or None."""
        lin = self.adapted(name, qt)
        return None if lin is None else lin.as_lora()


# ---- reports -------------------------------------------------------------------------------------

@dataclass
class ExportReport:
    """What an export wrote. tensors: {name: MergeInfo} (merged GGUF); notes: fallbacks taken."""
    path: str
    kind: str
    method: str | None = None
    rank: int | None = None
    tensors: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0

    def paths(self) -> Counter:
        return Counter(i.path for i in self.tensors.values())

    def summary(self) -> list[str]:
        """Human-readable lines: what was written, how each tensor was merged, fallbacks."""
        lines = [f"wrote {self.path} ({self.bytes / 1e6:.1f} MB, {self.seconds:.1f} s)"]
        if self.tensors:
            by = Counter((i.path, i.base_type, i.out_type) for i in self.tensors.values())
            for (path, bt, ot), c in sorted(by.items()):
                lines.append(f"  {c:4d} x {bt} -> {ot}: {path}")
            merged = [i for i in self.tensors.values() if i.delta_rms]
            if merged:
                rel = [i.err_rms / i.delta_rms for i in merged if i.err_rms is not None]
                if rel:
                    lines.append(f"  merge error / update (RMS): mean {np.mean(rel):.3g}, max {np.max(rel):.3g}")
        lines += [f"  note: {n}" for n in self.notes]
        return lines

    def as_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "method": self.method, "rank": self.rank,
                "bytes": self.bytes, "seconds": self.seconds, "paths": dict(self.paths()),
                "notes": list(self.notes), "tensors": {k: v.as_dict() for k, v in self.tensors.items()}}


def _collect_notes(infos: dict[str, MergeInfo]) -> list[str]:
    notes = Counter(i.note for i in infos.values() if i.note)
    return [f"{c} tensor(s): {n}" for n, c in notes.items()]


# ---- merged GGUF ---------------------------------------------------------------------------------

def export_merged_gguf(model, adapter, out, qtype=None, rank: int | None = None,
                       kquant_mins: str = "best", base_type=None, ignore_base_hash: bool = False,
                       measure: bool = True) -> ExportReport:
    """Write `out`: the base with the adapter merged into every adapted weight, each tensor in
    its own quantization type (qtype: re-target every quantized tensor, with llama-quantize's
    fallbacks where the row length does not fit the blocks). adapter None converts only
    (INTb-gG -> Q4_1/Q5_1, or --type). Every metadata KV of the base is carried over with its
    original type. See lowtune.merge.merge_weight for the per-tensor paths."""
    from .gguf_io import write_gguf
    from .safetensors_io import choose_type

    t0 = time.perf_counter()
    ad = SavedAdapter(adapter, rank) if adapter is not None else None
    if qtype is not None:
        get_format(qtype)  # fail early on a bad name
    base = open_base(model, base_type or _run_qtype(adapter))
    infos: dict[str, MergeInfo] = {}
    try:
        if ad is not None:
            ad.check_base(model, ignore_base_hash)
            _check_all_present(ad, base)

        def tensors() -> Iterator:
            for name, ti in base.tensor_infos.items():
                if ti.type is None or not (ti.type.quantized or len(ti.shape) >= 2):
                    yield name, (base.tensor(name), ti.shape)   # norms, rope_freqs, integer tensors
                    continue
                qt = base.qtensor(name)
                upd = ad.update(name, qt) if ad is not None else {}
                target = None
                if qtype is not None and ti.type.quantized:
                    target = choose_type(qtype, name, tuple(qt.shape))
                out_qt, info = merge_weight(qt, target=target, kquant_mins=kquant_mins, measure=measure, **upd)
                if target is not None and target.name != get_format(qtype).name:
                    info.note = (info.note + "; " if info.note else "") + \
                        f"rows of {qt.shape[1]} do not fit {get_format(qtype).name} blocks: {target.name}"
                infos[name] = info
                yield name, (out_qt, ti.shape)

        write_gguf(out, base.metadata, tensors(), base.metadata_types, alignment=base.alignment)
    finally:
        base.close()
    rep = ExportReport(str(out), "merged-gguf", ad.method if ad else None, ad.rank if ad else None, infos,
                       _collect_notes(infos), os.path.getsize(out), time.perf_counter() - t0)
    for n in rep.notes:
        log.warning("%s", n)
    return rep


def _check_all_present(ad: SavedAdapter, base) -> None:
    missing = [n for n in ad.tensor_names if n not in base.tensor_infos]
    if missing:
        raise ValueError(f"the adapter targets tensors this base lacks ({', '.join(missing[:3])}…); "
                         f"pass the base it was trained on")


def _run_qtype(adapter) -> str | None:
    """The quantization type a run applied to a Hugging Face base (the run's config.json,
    train.qtype), or None."""
    if adapter is None:
        return None
    for d in (Path(adapter), Path(adapter).parent):
        cfg = d / "config.json"
        if cfg.is_file():
            try:
                c = json.loads(cfg.read_text())
                return (c.get("train") or c).get("qtype")
            except (ValueError, AttributeError):
                return None
    return None


# ---- GGUF LoRA -------------------------------------------------------------------------------------

def export_lora_gguf(model, adapter, out, dtype: str = "F32", rank: int | None = None,
                     base_type=None, ignore_base_hash: bool = False) -> ExportReport:
    """Write a GGUF LoRA adapter for llama.cpp (`--lora`, llama_cpp.Llama(lora_path=...)):
    general.type = adapter, adapter.type = lora, tensors `<base>.lora_a` (ne [in, r]) and
    `<base>.lora_b` (ne [r, out]) in F32 or F16, every method through its equivalent standard
    LoRA. llama.cpp scales by alpha / r with r = lora_b's ne[0]; the scale is already folded in,
    so alpha is set to the largest rank and each B' is multiplied by r'/alpha (exactly 1 where
    all ranks agree; QA-HiRA's rank min(N, K/G) differs between q and ffn_down)."""
    from .gguf_io import write_gguf

    t0 = time.perf_counter()
    dt = {"F32": torch.float32, "F16": torch.float16}.get(str(dtype).upper().replace("FP", "F"))
    if dt is None:
        raise ValueError(f"LoRA tensors are written as F32 or F16, not {dtype!r}")
    ad = SavedAdapter(adapter, rank)
    base = open_base(model, base_type or _run_qtype(adapter))
    try:
        ad.check_base(model, ignore_base_hash)
        _check_all_present(ad, base)
        pairs = {name: ad.lora(name, base.qtensor(name)) for name in base.tensor_infos if name in ad.modules}
        arch = base.metadata["general.architecture"]
        base_name = base.metadata.get("general.name", "model")
    finally:
        base.close()
    alpha = max(a.shape[0] for a, _ in pairs.values())
    tensors = []
    for name, (a, b) in pairs.items():
        tensors.append((f"{name}.lora_a", a.to(dt).contiguous()))
        tensors.append((f"{name}.lora_b", (b * (a.shape[0] / alpha)).to(dt).contiguous()))
    from gguf.constants import GGUFValueType as V
    md = {"general.architecture": arch, "general.type": "adapter", "general.name": f"{base_name} {ad.method} LoRA",
          "adapter.type": "lora", "adapter.lora.alpha": float(alpha)}
    types = {"general.type": V.STRING, "general.name": V.STRING, "adapter.type": V.STRING,
             "adapter.lora.alpha": V.FLOAT32}
    write_gguf(out, md, tensors, types)
    ranks = sorted({a.shape[0] for a, _ in pairs.values()})
    notes = [] if len(ranks) == 1 else [f"ranks {ranks}: alpha = {alpha}, B' rescaled by r'/alpha"]
    return ExportReport(str(out), "lora-gguf", ad.method, ad.rank, {}, notes, os.path.getsize(out),
                        time.perf_counter() - t0)


# ---- PEFT adapter ------------------------------------------------------------------------------------

def _heads(md: dict) -> tuple[int, int]:
    arch = md["general.architecture"]
    n_head = int(md[f"{arch}.attention.head_count"])
    return n_head, int(md.get(f"{arch}.attention.head_count_kv", n_head))


def _to_hf_rows(name: str, w: torch.Tensor, n_head: int, n_head_kv: int) -> torch.Tensor:
    """Undo GGUF's q/k row permutation for weights (or LoRA B) of `name`."""
    from .safetensors_io import permute_qk_gguf_to_hf
    if _is_q(name):
        return permute_qk_gguf_to_hf(w, n_head)
    if _is_k(name):
        return permute_qk_gguf_to_hf(w, n_head_kv)
    return w


def _atomic(path: Path, write) -> None:
    """write(tmp) then rename over path; the file gets the usual permissions (umask)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_json(path: Path, obj) -> None:
    _atomic(path, lambda p: p.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"))


def export_peft(model, adapter, out_dir, rank: int | None = None, base_type=None,
                ignore_base_hash: bool = False, base_model_name: str | None = None) -> ExportReport:
    """Write a PEFT LoRA adapter directory: adapter_model.safetensors (keys
    base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight, ...; q/k rows in HF order)
    and adapter_config.json (peft_type LORA, lora_alpha = r so the scale is 1: the scale is
    folded into B; rank_pattern/alpha_pattern for modules of another rank)."""
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    ad = SavedAdapter(adapter, rank)
    base = open_base(model, base_type or _run_qtype(adapter))
    try:
        ad.check_base(model, ignore_base_hash)
        _check_all_present(ad, base)
        n_head, n_head_kv = _heads(base.metadata)
        md_name = base.metadata.get("general.name")
        tensors, ranks = {}, {}
        for name in base.tensor_infos:
            pair = ad.lora(name, base.qtensor(name)) if name in ad.modules else None
            if pair is None:
                continue
            a, b = pair
            module = gguf_to_hf_name(name)[: -len(".weight")]
            tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
            tensors[f"base_model.model.{module}.lora_B.weight"] = _to_hf_rows(name, b, n_head, n_head_kv).contiguous()
            ranks[module] = a.shape[0]
    finally:
        base.close()
    r = Counter(ranks.values()).most_common(1)[0][0]
    other = {m: rr for m, rr in ranks.items() if rr != r}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "auto_mapping": None,
        "base_model_name_or_path": base_model_name or md_name or str(model), "revision": None,
        "inference_mode": True, "r": r, "lora_alpha": r, "lora_dropout": 0.0, "use_rslora": False,
        "fan_in_fan_out": False, "bias": "none", "init_lora_weights": True, "modules_to_save": None,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
        "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": other, "alpha_pattern": dict(other), "use_dora": False,
    }
    # Where the pair came from travels in the safetensors header: PEFT warns on unknown config keys.
    provenance = {"format": "pt", "lowtune.method": ad.method, "lowtune.dylora_rank": str(ad.rank),
                  "lowtune.note": "scale folded into lora_B (lora_alpha = r); pooling folded into lora_A"}
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    _atomic(d / "adapter_model.safetensors", lambda p: save_file(tensors, str(p), metadata=provenance))
    _write_json(d / "adapter_config.json", config)
    size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
    notes = [f"{len(other)} module(s) of another rank in rank_pattern"] if other else []
    return ExportReport(str(d), "peft", ad.method, ad.rank, {}, notes, size, time.perf_counter() - t0)


# ---- merged HF safetensors ---------------------------------------------------------------------------

def write_safetensors_streaming(path, specs: list[tuple[str, str, tuple[int, ...]]], produce,
                                metadata: dict | None = None) -> None:
    """Write a safetensors file one tensor at a time. specs: (name, dtype tag "BF16"/"F16"/"F32",
    shape) in file order; produce(name) -> the tensor (called once per name, in order). The
    header is built from specs first, so nothing but the current tensor is held in memory."""
    sizes = {"BF16": 2, "F16": 2, "F32": 4}
    header, offset = {}, 0
    for name, dt, shape in specs:
        nbytes = sizes[dt] * math.prod(shape)
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)

    def write(tmp: Path):
        with open(tmp, "wb") as f:
            f.write(len(hb).to_bytes(8, "little"))
            f.write(hb)
            for name, dt, shape in specs:
                t = produce(name)
                want = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[dt]
                if t.dtype != want or tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{name}: produced {t.dtype} {tuple(t.shape)}, header says {dt} {shape}")
                f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
            f.flush()
            os.fsync(f.fileno())

    _atomic(Path(path), write)


def _f32(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.9999997e-06)."""
    return float(f"{x:.7g}")


def hf_config(md: dict, tied: bool, torch_dtype: str) -> dict:
    """config.json of a transformers LlamaForCausalLM from GGUF metadata."""
    from .model import LlamaConfig
    c = LlamaConfig.from_gguf_metadata(md)
    if c.rope_dim != c.head_dim:
        raise ValueError("partial RoPE (rope.dimension_count < head_dim) has no Llama HF config")
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": c.dim, "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "hidden_act": "silu", "rms_norm_eps": _f32(c.norm_eps), "rope_theta": _f32(c.rope_theta),
        "max_position_embeddings": c.context_length, "vocab_size": c.vocab_size,
        "tie_word_embeddings": tied, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True, "torch_dtype": torch_dtype,
        "rope_scaling": None,
    }
    if c.rope_linear_scale != 1.0:
        cfg["rope_scaling"] = {"type": "linear", "rope_type": "linear", "factor": _f32(c.rope_linear_scale)}
    for key, tk in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                    ("pad_token_id", "padding_token_id")):
        v = md.get(f"tokenizer.ggml.{tk}")
        if v is not None:
            cfg[key] = int(v)
    return cfg


def write_hf_tokenizer(md: dict, out_dir: Path) -> list[str]:
    """Tokenizer files for transformers from GGUF tokenizer metadata: tokenizer.json (byte-level
    BPE, built from lowtune's tokenizers object) or tokenizer.model (SentencePiece), plus
    tokenizer_config.json and special_tokens_map.json. Returns the names written."""
    from .tokenizer import CONTROL, USER_DEFINED, load_tokenizer, sentencepiece_model_proto

    tok = load_tokenizer(md)
    names = []
    tokens = md["tokenizer.ggml.tokens"]
    types = list(md.get("tokenizer.ggml.token_type") or [1] * len(tokens))

    def text(i):
        return tokens[i] if i is not None else None

    cfg = {"add_bos_token": bool(tok.add_bos), "add_eos_token": bool(tok.add_eos),
           "bos_token": text(tok.bos_id), "eos_token": text(tok.eos_id),
           "clean_up_tokenization_spaces": False,
           "model_max_length": int(md.get(f"{md['general.architecture']}.context_length", 2048))}
    pad = md.get("tokenizer.ggml.padding_token_id")
    unk = md.get("tokenizer.ggml.unknown_token_id")
    if pad is not None and 0 <= pad < len(tokens):
        cfg["pad_token"] = tokens[pad]
    if unk is not None and 0 <= unk < len(tokens):
        cfg["unk_token"] = tokens[unk]
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    if tok.model == "gpt2":
        from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, processors

        hf = HFTokenizer.from_str(tok._hf.to_str())
        hf.decoder = decoders.ByteLevel()
        special = [i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)]
        hf.add_special_tokens([AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
                               for i in special])
        if tok.add_bos and tok.bos_id is not None:
            b = tokens[tok.bos_id]
            hf.post_processor = processors.TemplateProcessing(single=f"{b} $A", pair=f"{b} $A {b} $B",
                                                              special_tokens=[(b, tok.bos_id)])
        _atomic(out_dir / "tokenizer.json", lambda p: hf.save(str(p)))
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        names.append("tokenizer.json")
    else:
        proto = sentencepiece_model_proto(
            tokens, list(md.get("tokenizer.ggml.scores") or [0.0] * len(tokens)), types, model_type="bpe",
            byte_fallback=6 in types, add_dummy_prefix=bool(md.get("tokenizer.ggml.add_space_prefix", True)),
            remove_extra_whitespaces=False)
        _atomic(out_dir / "tokenizer.model", lambda p: p.write_bytes(proto))
        cfg["tokenizer_class"] = "LlamaTokenizer"
        cfg["legacy"] = False
        names.append("tokenizer.model")
    _write_json(out_dir / "tokenizer_config.json", cfg)
    _write_json(out_dir / "special_tokens_map.json",
                {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if cfg.get(k)})
    return names + ["tokenizer_config.json", "special_tokens_map.json"]


def export_hf(model, adapter, out_dir, dtype: str = "bf16", rank: int | None = None, base_type=None,
              ignore_base_hash: bool = False) -> ExportReport:
    """Write a Hugging Face LlamaForCausalLM directory: model.safetensors (deq(W) + ΔW in bf16 or
    fp16, q/k rows back in HF order, written tensor by tensor), config.json,
    generation_config.json and the tokenizer. adapter None exports the base alone."""
    t0 = time.perf_counter()
    if str(dtype).lower() not in _HF_DTYPES:
        raise ValueError(f"--dtype must be bf16, fp16 or fp32, got {dtype!r}")
    tdt, tag, tname = _HF_DTYPES[str(dtype).lower()]
    ad = SavedAdapter(adapter, rank) if adapter is not None else None
    base = open_base(model, base_type or _run_qtype(adapter))
    try:
        if ad is not None:
            ad.check_base(model, ignore_base_hash)
            _check_all_present(ad, base)
        md = dict(base.metadata)
        if "rope_freqs.weight" in base.tensor_infos:
            raise ValueError("this model scales RoPE with a rope_freqs tensor (Llama 3.1); its HF "
                             "rope_scaling cannot be recovered from the GGUF, so the HF export is refused")
        n_head, n_head_kv = _heads(md)
        names = {n: gguf_to_hf_name(n) for n in base.tensor_infos}
        specs = [(names[n], tag, tuple(ti.shape)) for n, ti in base.tensor_infos.items() if names[n] is not None]
        by_hf = {h: g for g, h in names.items() if h is not None}

        def produce(hf_name: str) -> torch.Tensor:
            name = by_hf[hf_name]
            ti = base.tensor_infos[name]
            if len(ti.shape) < 2:
                return base.tensor(name).to(torch.float32).reshape(ti.shape).to(tdt)
            qt = base.qtensor(name)
            w = dense(qt)
            if ad is not None and name in ad.modules:
                w += ad.adapted(name, qt).delta_weight()
            w = _to_hf_rows(name, w, n_head, n_head_kv)
            return w.reshape(ti.shape).to(tdt)

        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        write_safetensors_streaming(d / "model.safetensors", specs, produce, {"format": "pt"})
        tied = "output.weight" not in base.tensor_infos
        cfg = hf_config(md, tied, tname)
        _write_json(d / "config.json", cfg)
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
        _write_json(d / "generation_config.json", gen)
        notes = []
        if "tokenizer.ggml.tokens" in md:
            write_hf_tokenizer(md, d)
        else:
            notes.append("the base has no tokenizer metadata: no tokenizer files written")
    finally:
        base.close()
    size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
    return ExportReport(str(d), "hf", ad.method if ad else None, ad.rank if ad else None, {}, notes, size,
                        time.perf_counter() - t0)


# ---- base + adapter, unmerged (for `lowtune eval/generate --adapter`) ------------------------------

def load_model_with_adapter(model_path, adapter=None, rank: int | None = None, device="cpu",
                            dtype: torch.dtype = torch.float32, ignore_base_hash: bool = False):
    """LlamaModel.from_gguf(model_path) with the adapter saved in `adapter` (an adapter or run
    directory) applied unmerged; rank picks QDyLoRA's b (default: the one saved). The adapter's
    recorded base hash must match the file unless ignore_base_hash."""
    from .model import LlamaModel

    model = LlamaModel.from_gguf(model_path, device=device, dtype=dtype)
    if adapter is None:
        if rank is not None:
            raise ValueError("--rank needs --adapter")
        return model
    d = find_adapter_dir(adapter)
    meta = _adapters.read_adapter_config(d)
    if rank is not None and meta.get("method") != "qdylora":
        raise ValueError(f"--rank picks a QDyLoRA rank; this adapter is {meta.get('method')}")
    ignore = ignore_base_hash or meta.get("base_hash") is None
    if meta.get("base_hash") is None and not ignore_base_hash:
        log.warning("the adapter in %s records no base hash; cannot check it was trained on %s", d, model_path)
    _adapters.load_adapter(model, d, ignore_base_hash=ignore)
    if rank is not None:
        _adapters.set_rank(model, rank)
    return model.eval()


def add_parser(subparsers):
    """`lowtune export` (the CLI lives in export_cli.py)."""
    from .export_cli import add_parser as add
    return add(subparsers)


__all__ = ["ExportReport", "SavedAdapter", "export_hf", "export_lora_gguf", "export_merged_gguf", "export_peft",
           "find_adapter_dir", "gguf_name_of_module", "group_offsets", "gguf_to_hf_name", "hf_config", "load_model_with_adapter",
           "open_base", "write_hf_tokenizer", "write_safetensors_streaming"]
