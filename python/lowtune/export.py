"""Exports of a trained adapter: merged GGUF, GGUF LoRA, PEFT adapter, merged HF safetensors.

    export_merged_gguf("model.gguf", "runs/a", "merged.gguf")        # each tensor in its own type
    export_merged_gguf("model.gguf", "runs/a", "merged.gguf", qtype="Q5_K")   # re-targeted
    export_lora_gguf("model.gguf", "runs/a", "lora.gguf")            # llama.cpp --lora
    export_peft("model.gguf", "runs/a", "peft/")                     # adapter_model.safetensors
    export_hf("model.gguf", "runs/a", "hf/", dtype="bf16")           # e.g. a Qwen2ForCausalLM directory

The base is read tensor by tensor from its memory-mapped GGUF (or a Hugging Face directory,
quantized on the fly as training did) and every output is written one tensor at a time to a
temporary name, then renamed: peak host memory is about one dense tensor.

How each method merges (lowtune.merge does the per-tensor math):
  QA-LoRA, QA-HiRA   the update is constant on every quantization group, so on Q4_1, Q5_1 and
                     INTb-gG bases it moves only the fp16 mins: exact bit for bit when the adapter
                     was trained in merge-exact mode (through those fp16 roundings), else exact up
                     to them; on Q2_K/Q4_K/Q5_K the quantized mins are refitted; elsewhere
                     re-quantized.
  LoRA, Q-BaRA, QDyLoRA   deq(W) + ΔW re-quantized once into the tensor's own type.
After writing, the merged GGUF is read back and every adapted weight compared with the weight the
trained model computes with (check_merged_gguf); the report says "exact" or how far off, and why.
Every method is also a standard LoRA (AdaptedLinear.as_lora: pooling folded into A', the scale
and the output repeat into B'), which is what the GGUF LoRA and PEFT exports hold.

GGUF stores q/k rows permuted for ggml's RoPE (Llama) and Gemma's norms as 1 + w; the HF exports
(PEFT, safetensors) undo that, and name tensors and modules as the family's HF class does
(lowtune.hf_names). A fused GGUF tensor (Phi-3's attn_qkv, its gate+up ffn_up) takes its parts'
adapters on their row ranges: merged part by part into its blocks, and exported as one LoRA
pair per fused tensor (the parts' A stacked, their B block-diagonal), as llama.cpp and Phi-3's
HF modules (qkv_proj, gate_up_proj) hold them.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from gguf.constants import GGUFValueType
from torch import nn

from . import hf_names
from .adapters import ADAPTER_WEIGHTS, AdaptedLinear, AdapterConfig, read_adapter_config
from .checkpoint import atomic_write, atomic_write_text
from .dtypes import hf_name as hf_dtype_name, torch_dtype, type_of
from .formats import get_format
from .gguf_io import write_gguf
from .families import FAMILIES
from .gguf_split import open_gguf, write_gguf_split
from .loading import ModelConfig, adapter_rank, check_base, find_adapter_dir, hf_qtype, open_base
from .merge import KQUANT_MINS, MergeInfo, WeightCheck, check_weight, dense, describe_merge, merge_weight
from .model import MLA_LINEAR_NAMES, fused_splits
from .methods import GROUP_CONSTANT
from .progress import tracked
from .qtensor import QTensor
from .recipes import LOGICAL_TYPES_KEY, choose_type, logical_types, storage_format
from .safetensors_io import safetensors_files, write_safetensors, write_safetensors_dict
from .tokenizer import CONTROL, USER_DEFINED, load_tokenizer, sentencepiece_model_proto

log = logging.getLogger("lowtune")
_MODULE_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:ffn_moe\.)?([\w.]+)$")


def gguf_name_of_module(module: str) -> str:
    """'layers.3.attn_q' (a model's module path) -> 'blk.3.attn_q.weight' (LFM2's
    'layers.0.shortconv.in_proj' -> 'blk.0.shortconv.in_proj.weight', a shared expert's
    'layers.3.ffn_moe.ffn_up_shexp' -> 'blk.3.ffn_up_shexp.weight')."""
    m = _MODULE_RE.search(module)
    if m is None:
        raise ValueError(f"adapter module {module!r} is not a decoder-layer linear (layers.N.<name>)")
    return f"blk.{m.group(1)}.{m.group(2)}.weight"


class _FrozenWeight(nn.Module):
    """Stands in for the base linear: AdaptedLinear only reads its QTensor `weight`."""
    lowtune_fusable = False

    def __init__(self, qt: QTensor):
        super().__init__()
        self._qt = qt

    @property
    def weight(self) -> QTensor:
        return self._qt


def fused_parts(base) -> dict[str, tuple[tuple[str, int, int], ...]]:
    """The fused tensors of a base (opened source) -> their logical parts (GGUF name, first row,
    end row), as lowtune.model cuts them."""
    config = ModelConfig.from_gguf_metadata(dict(base.metadata))
    out = {}
    for i in range(config.n_layers):
        out.update(fused_splits(config.at_layer(i), i, base.tensor_infos))
    return out


class SavedAdapter:
    """A saved adapter, applied one base tensor at a time (no model needed).

        ad = SavedAdapter("runs/a", rank=None)
        ad.method, ad.config, ad.rank          # rank: QDyLoRA's b in use (None otherwise)
        for name in ad.tensor_names: ...        # GGUF names of the adapted (logical) weights
        lin = ad.adapted(name, qt)              # AdaptedLinear on that weight, weights loaded
        ad.check(path, base)                    # then per base tensor: its logical parts and their LoRA pairs
        ad.split(name, qt); ad.lora_pairs(base)
    """

    def __init__(self, directory, rank: int | None = None):
        from safetensors import safe_open

        self.directory = find_adapter_dir(directory)
        self.meta = read_adapter_config(self.directory)
        self.config = AdapterConfig.from_dict(self.meta["config"])
        self.method = self.config.method
        self.rank = adapter_rank(self.meta, rank)
        self.modules = {gguf_name_of_module(m): (m, spec) for m, spec in self.meta["modules"].items()}
        self._st = safe_open(str(self.directory / ADAPTER_WEIGHTS), framework="pt")
        self.parts: dict[str, tuple[tuple[str, int, int], ...]] = {}  # the base's fused tensors (check)

    @property
    def tensor_names(self) -> list[str]:
        return list(self.modules)

    def check(self, base_path, base, force: bool = False) -> None:
        """loading.check_base against the base file or directory, then every adapted tensor
        present in the base (`base`, the opened source)."""
        check_base(self.directory, self.meta, base_path, force)
        self.parts = fused_parts(base)
        logical = set(base.tensor_infos) | {p for parts in self.parts.values() for p, _, _ in parts}
        missing = [n for n in self.tensor_names if n not in logical]
        if missing:
            raise ValueError(f"the adapter targets tensors this base lacks ({', '.join(missing[:3])}…); "
                             f"pass the base it was trained on")

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
        if lin.method in GROUP_CONSTANT:
            return {"delta_groups": lin.block_offsets(), "group": lin.pool}
        return {"delta": lin.delta_weight()}

    def lora(self, name: str, qt: QTensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A' [r', K], B' [N, r']) fp32, the scale folded into B', or None."""
        lin = self.adapted(name, qt)
        return None if lin is None else lin.as_lora()

    def split(self, name: str, qt: QTensor) -> list[tuple[str, int, int]]:
        """The logical parts of base tensor `name` (after check): (name, first row, end row) each;
        a tensor that is not fused is its one part."""
        return list(self.parts.get(name, ((name, 0, qt.shape[0]),)))

    def lora_pairs(self, base) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{base tensor name: (A' [r', K], B' [N, r'])} for every adapted tensor of the base
        (after check), the scale folded into B'; a fused tensor's parts stacked into one pair:
        A' rows and B' columns one block per part, B' zero outside each part's rows."""
        pairs = {}
        for name in base.tensor_infos:
            if not any(part in self.modules for part, _, _ in self.parts.get(name, ((name, 0, 0),))):
                continue
            qt = base.qtensor(name)
            got = [(a, b, self.lora(part, qt.rows(a, b))) for part, a, b in self.split(name, qt)]
            got = [(a, b, pair) for a, b, pair in got if pair is not None]
            big_a = torch.cat([pa for _, _, (pa, _) in got])
            big_b = torch.zeros(qt.shape[0], big_a.shape[0])
            col = 0
            for a, b, (pa, pb) in got:
                big_b[a:b, col:col + pa.shape[0]] = pb
                col += pa.shape[0]
            pairs[name] = (big_a.contiguous(), big_b)
        return pairs


def _open(model, adapter, rank, base_type, force):
    """(SavedAdapter or None, the base opened as training saw it), the adapter checked against it."""
    ad = SavedAdapter(adapter, rank) if adapter is not None else None
    base = open_base(model, hf_qtype(model, adapter, base_type))
    try:
        if ad is not None:
            ad.check(model, base, force)
    except BaseException:
        base.close()
        raise
    return ad, base


# ---- reports -------------------------------------------------------------------------------------

@dataclass
class ExportReport:
    """What an export wrote. tensors: {name: MergeInfo} (merged GGUF); notes: fallbacks taken;
    checks: {name: WeightCheck}, the merged file's adapted weights against the trained model's
    (None when not checked); perplexity: compare_perplexity's result, when asked for."""
    path: str
    kind: str
    method: str | None = None
    rank: int | None = None
    tensors: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    checks: dict | None = None
    perplexity: dict | None = None  # compare_perplexity's result, when asked for

    @property
    def exact(self) -> bool | None:
        """Whether every adapted weight of the merged file equals the trained model's (None: unchecked)."""
        return None if self.checks is None else all(c.exact for c in self.checks.values())

    def paths(self) -> Counter:
        return Counter(i.path for i in self.tensors.values())

    def summary(self) -> list[str]:
        """Human-readable lines: what was written, how each tensor was merged, fallbacks."""
        lines = [f"wrote {self.path} ({self.bytes / 1e6:.1f} MB, {self.seconds:.1f} s)"]
        if self.tensors:
            by = Counter((i.path, i.base_type, i.out_type) for i in self.tensors.values())
            for (path, bt, ot), c in sorted(by.items()):
                lines.append(f"  {c:4d} x {bt} -> {ot}: {path}")
            if self.checks is not None:
                lines.append(f"  {describe_merge(self.checks)}")
            else:
                merged = [i for i in self.tensors.values() if i.delta_rms]
                rel = [i.err_rms / i.delta_rms for i in merged if i.err_rms is not None]
                if rel:
                    lines.append(f"  merged minus (base + update), RMS relative to the update's: mean "
                                 f"{np.mean(rel):.3g}, max {np.max(rel):.3g} (not checked against the file)")
        lines += [f"  note: {n}" for n in self.notes]
        return lines

    def as_dict(self) -> dict:
        d = {"path": self.path, "kind": self.kind, "method": self.method, "rank": self.rank,
             "bytes": self.bytes, "seconds": self.seconds, "paths": dict(self.paths()),
             "notes": list(self.notes), "tensors": {k: v.as_dict() for k, v in self.tensors.items()}}
        if self.perplexity is not None:
            d["perplexity"] = dict(self.perplexity)
        if self.checks is not None:
            d["merge"] = {"exact": self.exact, "summary": describe_merge(self.checks),
                          "tensors": {k: v.as_dict() for k, v in self.checks.items()}}
        return d


def _collect_notes(infos: dict[str, MergeInfo]) -> list[str]:
    notes = Counter(i.note for i in infos.values() if i.note)
    return [f"{c} tensor(s): {n}" for n, c in notes.items()]


# ---- merged GGUF ---------------------------------------------------------------------------------

def export_merged_gguf(model, adapter, out, qtype=None, rank: int | None = None,
                       kquant_mins: str = "best", base_type=None, force: bool = False,
                       measure: bool = True, check: bool = True, split_max_bytes: int | None = None,
                       split_max_tensors: int | None = None) -> ExportReport:
    """Write `out`: the base with the adapter merged into every adapted weight, each tensor in
    its own quantization type (qtype: re-target every quantized tensor, with llama-quantize's
    fallbacks where the row length does not fit the blocks). adapter None converts only
    (INTb-gG -> its GGUF storage type, or --type). Every metadata KV of the base is carried over
    with its original type; INTb-gG tensors written in their storage type are recorded in
    lowtune.logical_types. See lowtune.merge.merge_weight for the per-tensor paths. base_type:
    the type an HF directory was quantized to for training (default: the run's). force: merge an
    adapter trained on another base (loading.check_base). check: read the written file back and
    compare every adapted weight with the trained model's (report.checks, report.exact).
    split_max_bytes / split_max_tensors: write split GGUF parts (gguf_split.write_gguf_split;
    the report's path is the first part)."""
    t0 = time.perf_counter()
    if qtype is not None and get_format(qtype).needs_imatrix:  # also fails early on a bad name
        raise ValueError(f"--type {get_format(qtype).name}: {_NEEDS_IMATRIX}; use IQ4_XS, IQ4_NL, IQ3_S, "
                         f"Q4_K or another type lowtune writes")
    ad, base = _open(model, adapter, rank, base_type, force)
    infos: dict[str, MergeInfo] = {}
    try:
        if qtype is None and ad is not None:
            _check_own_types_writable(base, ad)
        def target_of(name, ti):  # None: the tensor's own type
            if qtype is not None and ti.type is not None and ti.type.quantized:
                return choose_type(qtype, name, tuple(ti.shape))
            return None

        def tensors() -> Iterator:
            for name, ti in base.tensor_infos.items():
                if ti.type is None or not (ti.type.quantized or len(ti.shape) >= 2):
                    yield name, (base.tensor(name), ti.shape)   # norms, rope_freqs, integer tensors
                    continue
                qt = base.qtensor(name)
                target = target_of(name, ti)
                parts = ad.split(name, qt) if ad is not None else [(name, 0, qt.shape[0])]
                merged = []
                for part, a, b in parts:  # a fused tensor: each part's update on its rows
                    view = qt if len(parts) == 1 else qt.rows(a, b)
                    upd = ad.update(part, view) if ad is not None else {}
                    out_qt, info = merge_weight(view, target=target, kquant_mins=kquant_mins, measure=measure, **upd)
                    if target is not None and target.name != get_format(qtype).name:
                        info.note = (info.note + "; " if info.note else "") + \
                            f"rows of {qt.shape[1]} do not fit {get_format(qtype).name} blocks: {target.name}"
                    infos[part] = info
                    merged.append(out_qt)
                if len(merged) > 1:
                    if len({m.format.name for m in merged}) > 1:
                        raise ValueError(f"{name}: its parts merged into different types "
                                         f"({', '.join(m.format.name for m in merged)}); pass --type")
                    out_qt = QTensor(torch.cat([m.raw for m in merged]), merged[0].format, qt.shape)
                yield name, (out_qt, ti.shape)

        md, types = dict(base.metadata), dict(base.metadata_types)
        # INTb-gG tensors are written in their GGUF storage type: the file records which they are
        logical = {n: t for n, t in logical_types(md).items() if n in base.tensor_infos
                   and target_of(n, base.tensor_infos[n]) is None}
        for n, ti in base.tensor_infos.items():
            fmt = target_of(n, ti) or ti.type
            if fmt is not None and storage_format(fmt) is not fmt:
                logical[n] = fmt.name
        md.pop(LOGICAL_TYPES_KEY, None)
        if logical:
            md[LOGICAL_TYPES_KEY] = [f"{n}={t}" for n, t in logical.items()]
            types[LOGICAL_TYPES_KEY] = (GGUFValueType.ARRAY, GGUFValueType.STRING)
        if split_max_bytes is None and split_max_tensors is None:
            write_gguf(out, md, tracked(tensors(), len(base.tensor_infos), f"writing {out}", "tensor"), types,
                       alignment=base.alignment)
            files = [Path(out)]
        else:
            files = write_gguf_split(out, md, tracked(tensors(), len(base.tensor_infos), f"writing {out}", "tensor"),
                                     types, alignment=base.alignment, max_bytes=split_max_bytes,
                                     max_tensors=split_max_tensors)
        checks = _check_merged(files[0], ad, base, infos) if check and ad is not None else None
    finally:
        base.close()
    rep = ExportReport(str(files[0]), "merged-gguf", ad.method if ad else None, ad.rank if ad else None, infos,
                       _collect_notes(infos), sum(os.path.getsize(f) for f in files), time.perf_counter() - t0,
                       checks)
    for n in rep.notes:
        log.warning("%s", n)
    if len(files) > 1:  # said in the summary, not a warning
        rep.notes.append(f"{len(files)} parts: {files[0].name} ... {files[-1].name} (open the first)")
    return rep


_NEEDS_IMATRIX = ("ggml quantizes that type only with an importance matrix (llama-imatrix), which lowtune "
                  "does not compute")


def _check_own_types_writable(base, ad: SavedAdapter) -> None:
    """A merge without --type re-quantizes each adapted tensor into its own type: refuse, before
    anything is written, a base whose adapted tensors lowtune cannot quantize (IQ2_*, IQ1_*)."""
    stuck = Counter(ti.type.name for n, ti in base.tensor_infos.items()
                    if n in ad.modules and ti.type is not None and ti.type.needs_imatrix)
    if stuck:
        kinds = ", ".join(f"{c} x {t}" for t, c in stuck.items())
        raise ValueError(f"merging needs --type here: the adapted tensors ({kinds}) would be re-quantized "
                         f"into their own type, and {_NEEDS_IMATRIX}; give --type IQ4_XS (or IQ3_S, Q4_K, "
                         f"...) to write every quantized tensor in that type, or export the adapter "
                         f"unmerged (--lora-gguf)")


def _check_merged(path, ad: SavedAdapter, base, infos: dict[str, MergeInfo] | None = None) -> dict[str, WeightCheck]:
    """Every adapted weight of the merged GGUF at `path` (a split one from its first part), read
    back, against the trained model's: {logical weight name: WeightCheck} (a fused tensor's parts
    on their rows)."""
    checks = {}
    with open_gguf(path) as merged:
        for name in base.tensor_infos:
            if not any(part in ad.modules for part, _, _ in ad.parts.get(name, ((name, 0, 0),))):
                continue
            if name not in merged.tensor_infos:
                raise ValueError(f"{path} lacks {name}, which the adapter adapts: not a merge of this adapter")
            qt, got = base.qtensor(name), merged.qtensor(name)
            for part, a, b in ad.split(name, qt):
                lin = ad.adapted(part, qt.rows(a, b))
                if lin is None:
                    continue
                got_part = got.rows(a, b)
                info = infos[part] if infos is not None else _merge_info_of(lin, got_part)
                checks[part] = check_weight(got_part, lin.effective_weight(), lin.delta_weight(), info,
                                            lin.merge_exact)
    return checks


def _merge_info_of(lin: AdaptedLinear, merged: QTensor) -> MergeInfo:
    """How a merged weight was most likely made, from its type, for a file merged elsewhere."""
    base = get_format(lin.base_type)
    path = "float" if not merged.format.quantized else "requantize"
    if lin.method in GROUP_CONSTANT and storage_format(base) is merged.format:
        path = "min" if base.float_min else "min-refit" if base.name in KQUANT_MINS else path
    return MergeInfo(path, base.name, merged.type, False)


def check_merged_gguf(merged, model, adapter, rank: int | None = None, base_type=None,
                      force: bool = False) -> dict[str, WeightCheck]:
    """Read the merged GGUF `merged` and compare each adapted weight with the weight the base
    `model` plus `adapter` computes with: {tensor name: WeightCheck}; merge.describe_merge(checks)
    says it in words. export_merged_gguf does this after writing."""
    ad, base = _open(model, adapter, rank, base_type, force)
    try:
        return _check_merged(merged, ad, base)
    finally:
        base.close()


def compare_perplexity(model, adapter, merged, text: str, ctx: int = 512, chunks: int | None = None,
                       rank: int | None = None, base_type=None, force: bool = False, device="cpu") -> dict:
    """Perplexity of `text` under the base plus the adapter (unmerged) and under the merged GGUF,
    fp32 activations on `device`, windows of min(ctx, the model's context) tokens (at most
    `chunks`): {"unmerged", "merged", "relative" (merged / unmerged − 1), "tokens", "ctx"}."""
    from .evaluate import perplexity
    from .loading import load, load_model

    plain, tok = load(model, device=device, qtype=hf_qtype(model, adapter, base_type), adapter=adapter,
                      rank=rank, force=force)
    ctx = min(int(ctx), plain.config.context_length)
    ids = tok.encode(text, add_bos=False)
    unmerged = perplexity(plain, ids, ctx=ctx, chunks=chunks)
    del plain
    got = perplexity(load_model(merged, device=device), ids, ctx=ctx, chunks=chunks)
    return {"unmerged": unmerged["perplexity"], "merged": got["perplexity"],
            "relative": got["perplexity"] / unmerged["perplexity"] - 1.0, "tokens": got["tokens"], "ctx": ctx}


def describe_perplexity(r: dict) -> str:
    """compare_perplexity's result in one line."""
    diff = "identical" if r["merged"] == r["unmerged"] else f"{r['relative']:+.4%}"
    return (f"perplexity over {r['tokens']:,} tokens: base + adapter {r['unmerged']:.6g}, merged "
            f"{r['merged']:.6g} ({diff})")


# ---- GGUF LoRA -------------------------------------------------------------------------------------

def export_lora_gguf(model, adapter, out, dtype: str = "F32", rank: int | None = None,
                     base_type=None, force: bool = False) -> ExportReport:
    """Write a GGUF LoRA adapter for llama.cpp (`--lora`, llama_cpp.Llama(lora_path=...)):
    general.type = adapter, adapter.type = lora, tensors `<base>.lora_a` (ne [in, r]) and
    `<base>.lora_b` (ne [r, out]) in F32 or F16, every method through its equivalent standard
    LoRA. llama.cpp scales by alpha / r with r = lora_b's ne[0]; the scale is already folded in,
    so alpha is set to the largest rank and each B' is multiplied by r'/alpha (exactly 1 where
    all ranks agree; QA-HiRA's rank min(N, K/G) differs between q and ffn_down)."""
    t0 = time.perf_counter()
    tag = type_of(dtype)
    if tag not in ("F32", "F16"):
        raise ValueError(f"LoRA tensors are written as F32 or F16, not {dtype!r}")
    dt = torch_dtype(tag)
    ad, base = _open(model, adapter, rank, base_type, force)
    try:
        pairs = ad.lora_pairs(base)
        arch = base.metadata["general.architecture"]
        base_name = base.metadata.get("general.name", "model")
        kda = ModelConfig.from_gguf_metadata(base.metadata).delta_layers if FAMILIES[arch].kda else ()
    finally:
        base.close()
    # llama.cpp's deepseek2 and minicpm3 graphs multiply q, the latents, k_b and v_b (or kv_b) without its LoRA
    # (attn_output and the FFN take it), kimi-linear's also every linear of its KDA layers: such adapters would
    # be dropped without a word
    latent = sorted(n for n in pairs if FAMILIES[arch].mla and n.split(".")[2] in MLA_LINEAR_NAMES[:-1]
                    or int(n.split(".")[1]) in kda and not n.split(".")[2].startswith("ffn_"))
    if latent:
        raise ValueError(f"llama.cpp applies no GGUF LoRA to {latent[0]} (...): its {arch} graph multiplies q, the "
                         "latents, attn_k_b/attn_v_b (or attn_kv_b)"
                         + (" and its Kimi Delta Attention layers' linears" if kda else "")
                         + " without one, only attn_output and the FFN take it. "
                         "Export the merged GGUF, or train with --targets " + ("" if kda else "attn_output,")
                         + "ffn_gate,ffn_up,ffn_down,ffn_gate_shexp,ffn_up_shexp,ffn_down_shexp")
    alpha = max(a.shape[0] for a, _ in pairs.values())
    tensors = []
    for name, (a, b) in pairs.items():
        tensors.append((f"{name}.lora_a", a.to(dt).contiguous()))
        tensors.append((f"{name}.lora_b", (b * (a.shape[0] / alpha)).to(dt).contiguous()))
    md = {"general.architecture": arch, "general.type": "adapter", "general.name": f"{base_name} {ad.method} LoRA",
          "adapter.type": "lora", "adapter.lora.alpha": float(alpha)}
    V = GGUFValueType
    types = {"general.type": V.STRING, "general.name": V.STRING, "adapter.type": V.STRING,
             "adapter.lora.alpha": V.FLOAT32}
    write_gguf(out, md, tensors, types)
    ranks = sorted({a.shape[0] for a, _ in pairs.values()})
    notes = [] if len(ranks) == 1 else [f"ranks {ranks}: alpha = {alpha}, B' rescaled by r'/alpha"]
    return ExportReport(str(out), "lora-gguf", ad.method, ad.rank, {}, notes, os.path.getsize(out),
                        time.perf_counter() - t0)


# ---- PEFT adapter ------------------------------------------------------------------------------------

def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def export_peft(model, adapter, out_dir, rank: int | None = None, base_type=None,
                force: bool = False, base_model_name: str | None = None) -> ExportReport:
    """Write a PEFT LoRA adapter directory: adapter_model.safetensors (keys
    base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight, ...; q/k rows in HF order)
    and adapter_config.json (peft_type LORA, lora_alpha = r so the scale is 1: the scale is
    folded into B; rank_pattern/alpha_pattern for modules of another rank)."""
    t0 = time.perf_counter()
    ad, base = _open(model, adapter, rank, base_type, force)
    try:
        md = dict(base.metadata)
        tensors, ranks = {}, {}
        pairs = ad.lora_pairs(base)
        arch = md["general.architecture"]
        split = sorted(n for n in pairs if n.split(".")[2] in ("attn_k_b", "attn_v_b"))
        if split:
            raise ValueError(f"this adapter has latent attention adapters on attn_k_b/attn_v_b ({split[0]}, ...): "
                             "transformers keeps them as one kv_b_proj, whose key rows are attn_k_b's heads "
                             "transposed, so they are no LoRA of kv_b_proj. Export it as GGUF (merged), or train "
                             "with --targets attn_q,attn_q_a,attn_q_b,attn_kv_a_mqa,attn_output for a PEFT adapter")
        ffn = sorted(n for n in pairs if ".ffn_" in n)
        # (Gemma 4's dense FFN beside its experts keeps its own gate_proj/up_proj/down_proj)
        dense_beside = arch in FAMILIES and FAMILIES[arch].moe_beside_ffn
        experts = int(md.get(f"{arch}.expert_count", 0) or 0)
        if ffn and experts and not dense_beside:
            raise ValueError(f"this mixture-of-experts adapter has FFN adapters ({ffn[0]}, ...): transformers' "
                             "PEFT loading takes gate_proj/up_proj/down_proj in such models for the experts' "
                             "parameters, so it would not apply them. Export it as GGUF (merged, or --lora-gguf), "
                             "or train with --targets attn_q,attn_k,attn_v,attn_output for a PEFT adapter")
        # (AFMoE's attention gate is self_attn.gate_proj: a name that PEFT's loading takes for the experts' too)
        gates = sorted(n for n in pairs if ".ffn_" not in n and experts
                       and (hf_names.hf_name(n, arch) or "").endswith(".gate_proj.weight"))
        if gates:
            raise ValueError(f"this mixture-of-experts adapter has adapters on the attention's output gate "
                             f"({gates[0]}, ...): transformers' PEFT loading takes every gate_proj of such models for "
                             "the experts' gate, so it would not apply them. Export it as GGUF (merged, or "
                             "--lora-gguf), or train with --targets attn_q,attn_k,attn_v,attn_output for a PEFT "
                             "adapter")
        language_model = hf_names.in_language_model(arch, _checkpoint_config(base))
        for module, (a, b) in _module_pairs(pairs, base, md, language_model).items():
            tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
            tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
            ranks[module] = a.shape[0]
    finally:
        base.close()
    r = Counter(ranks.values()).most_common(1)[0][0]
    other = {m: rr for m, rr in ranks.items() if rr != r}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "auto_mapping": None,
        "base_model_name_or_path": base_model_name or md.get("general.name") or str(model), "revision": None,
        "inference_mode": True, "r": r, "lora_alpha": r, "lora_dropout": 0.0, "use_rslora": False,
        "fan_in_fan_out": hf_names.peft_fan_in_fan_out(arch), "bias": "none", "init_lora_weights": True,
        "modules_to_save": None,
        "target_modules": hf_names.peft_target_modules(ranks, arch, language_model),
        "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": other, "alpha_pattern": dict(other), "use_dora": False,
    }
    # Where the pair came from travels in the safetensors header: PEFT warns on unknown config keys.
    provenance = {"format": "pt", "lowtune.method": ad.method, "lowtune.dylora_rank": str(ad.rank),
                  "lowtune.note": "scale folded into lora_B (lora_alpha = r); pooling folded into lora_A"}
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    write_safetensors_dict(d / "adapter_model.safetensors", tensors, provenance)
    _write_json(d / "adapter_config.json", config)
    size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
    notes = [f"{len(other)} module(s) of another rank in rank_pattern"] if other else []
    return ExportReport(str(d), "peft", ad.method, ad.rank, {}, notes, size, time.perf_counter() - t0)


# ---- merged HF safetensors ---------------------------------------------------------------------------

def write_hf_tokenizer(md: dict, out_dir: Path) -> list[str]:
    """Tokenizer files for transformers from GGUF tokenizer metadata: tokenizer.json (byte-level
    BPE, or Gemma 4's BPE over raw UTF-8, built from lowtune's tokenizers object) or tokenizer.model
    (SentencePiece), plus tokenizer_config.json and special_tokens_map.json. Returns the names written."""
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
    if tok.model == "gemma4":  # (its markers, which transformers and llama.cpp's converter then take as special)
        named = {cfg["bos_token"], cfg["eos_token"], cfg.get("pad_token"), cfg.get("unk_token")}
        cfg["additional_special_tokens"] = [t for t, ty in zip(tokens, types) if ty == CONTROL and t not in named]
    if tok.model in ("gpt2", "gemma4"):
        from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers import processors

        hf = HFTokenizer.from_str(tok._hf.to_str())
        hf.decoder = decoders.ByteLevel()
        if tok.model == "gemma4":  # (Gemma 4's tokenizer.json: spaces as "▁", lines and runs of newlines apart)
            hf.normalizer = normalizers.Replace(" ", "\u2581")
            hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^\n]+|\n+"), "isolated")
            hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        special = [i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)]
        hf.add_special_tokens([AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
                               for i in special])
        if tok.add_bos and tok.bos_id is not None:
            b = tokens[tok.bos_id]
            hf.post_processor = processors.TemplateProcessing(single=f"{b} $A", pair=f"{b} $A {b} $B",
                                                              special_tokens=[(b, tok.bos_id)])
        atomic_write_text(out_dir / "tokenizer.json", hf.to_str())
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        names.append("tokenizer.json")
    else:
        proto = sentencepiece_model_proto(
            tokens, list(md.get("tokenizer.ggml.scores") or [0.0] * len(tokens)), types, model_type="bpe",
            byte_fallback=6 in types, add_dummy_prefix=bool(md.get("tokenizer.ggml.add_space_prefix", True)),
            remove_extra_whitespaces=False)
        atomic_write(out_dir / "tokenizer.model", lambda f: f.write(proto))
        cfg["tokenizer_class"] = "LlamaTokenizer"
        cfg["legacy"] = False
        names.append("tokenizer.model")
    _write_json(out_dir / "tokenizer_config.json", cfg)
    _write_json(out_dir / "special_tokens_map.json",
                {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if cfg.get(k)})
    return names + ["tokenizer_config.json", "special_tokens_map.json"]


_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _checkpoint_config(base) -> dict | None:
    """The config.json of the HF directory `base` was read from, None for a GGUF file."""
    path = Path(base.path) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _vision_language_original(directory: Path, arch: str, torch_dtype_name: str):
    """(config.json, {HF name: (open file, GGUF name or None, shape)}, the other files) of the original
    directory of a vision-language class: its config with the new dtype, every tensor in its own
    name (None: the vision tower's and projector's, which lowtune's model does not hold), and the
    files beside the weights (processor, tokenizer, chat template) to copy."""
    from safetensors import safe_open
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update({k: torch_dtype_name for k in ("torch_dtype", "dtype") if k in cfg} or {"dtype": torch_dtype_name})
    tensors = {}
    for f in safetensors_files(directory):
        st = safe_open(str(f), framework="pt")  # kept open: the vision tower's tensors are read from it one by one
        for h in st.keys():
            tensors[h] = (st, hf_names.gguf_name(h, arch), tuple(st.get_slice(h).get_shape()))
    beside = [f for f in sorted(directory.iterdir()) if f.is_file() and f.suffix not in _WEIGHT_FILES
              and f.name not in ("config.json", "model.safetensors.index.json")]
    return cfg, tensors, beside


def _module_pairs(pairs: dict, base, md: dict, language_model: bool = False
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """HF module -> (A, B in HF's rows) of GGUF LoRA pairs: a module that holds several GGUF tensors'
    rows (Granite 4's dense gate and up, hf_names.fused_parts) takes their A stacked and their B on the
    diagonal (zero rows for a part without an adapter), one LoRA of their ranks' sum. language_model: the
    modules under model.language_model (hf_names.in_language_model)."""
    arch = md["general.architecture"]
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (a, b) in pairs.items():
        module = hf_names.hf_module(name, arch, language_model)
        parts = hf_names.fused_parts(module + ".weight", arch)
        if parts is None:
            out[module] = (hf_names.to_hf_columns(name, a, md), hf_names.to_hf_rows(name, b, md))
            continue
        if module in out:
            continue
        done = [(p, *pairs[p]) if p in pairs else None for p in parts]
        rows = [base.tensor_infos[p].shape[0] for p in parts]
        rank = sum(d[1].shape[0] for d in done if d is not None)
        a_all = torch.cat([d[1] for d in done if d is not None])
        b_all = a_all.new_zeros(sum(rows), rank)
        row = col = 0
        for d, n in zip(done, rows):
            if d is not None:
                p, pa, pb = d
                b_all[row:row + n, col:col + pa.shape[0]] = hf_names.to_hf_rows(p, pb, md)
                col += pa.shape[0]
            row += n
        out[module] = (a_all, b_all)
    return out


def export_hf(model, adapter, out_dir, dtype: str = "bf16", rank: int | None = None, base_type=None,
              force: bool = False) -> ExportReport:
    """Write a Hugging Face directory of the family's class (LlamaForCausalLM, Qwen2ForCausalLM,
    Phi3ForCausalLM, Gemma3ForCausalLM, ...): model.safetensors (deq(W) + ΔW in bf16, fp16 or
    fp32, in HF's layout, written tensor by tensor), config.json, generation_config.json and the
    tokenizer. adapter None exports the base alone. A vision-language model read from its HF
    directory (or Gemma4ForConditionalGeneration's) is written as that directory: its class and config, its
    language model merged, the vision (and audio) tower's tensors and the processor's files as they were (in
    the chosen dtype); from a GGUF (no vision tower) it is refused (Gemma 4's written as Gemma4ForCausalLM)."""
    t0 = time.perf_counter()
    try:
        tag = type_of(dtype)
    except ValueError:
        raise ValueError(f"--dtype must be bf16, fp16 or fp32, got {dtype!r}") from None
    tdt = torch_dtype(tag)
    ad, base = _open(model, adapter, rank, base_type, force)
    try:
        md = dict(base.metadata)
        arch = md["general.architecture"]
        mc = ModelConfig.from_gguf_metadata(md)
        # config.json first: it refuses what HF cannot hold before anything is written
        original, beside, mats = {}, [], {}
        checkpoint = _checkpoint_config(base)
        if checkpoint is not None and hf_names.in_language_model(arch, checkpoint):
            cfg, original, beside = _vision_language_original(Path(base.path), arch, hf_dtype_name(tdt))
            specs = [(h, tag, shape) for h, (_, _, shape) in original.items()]
            by_hf = {h: g for h, (_, g, _) in original.items() if g in base.tensor_infos}
            fused = {}
        else:
            tensors = {n: (base.tensor(n).reshape(-1).tolist() if n in hf_names.GGUF_ONLY else None)
                       for n in base.tensor_infos}
            tied = "output.weight" not in base.tensor_infos
            cfg = hf_names.hf_config(mc, md, tied, hf_dtype_name(tdt), tensors)
            # biases the HF class has and the GGUF lacks are zeros
            _, zero_biases = hf_names.hf_biases(arch, base.tensor_infos, mc.n_layers)
            shapes = {n: tuple(ti.shape) for n, ti in base.tensor_infos.items()}
            shapes.update({n: (base.tensor_infos[n[:-len("bias")] + "weight"].shape[0],) for n in zero_biases})
            # (Gemma 3n's AltUp projections: a GGUF tensor that stacks several HF matrices)
            stacked = {n: hf_names.stacked_names(n, arch, shapes[n][0]) for n in shapes}
            mats = {h: (g, i) for g, hs in stacked.items() for i, h in enumerate(hs or ())}
            names = {n: hf_names.hf_name(n, arch, shapes) for n in shapes if stacked[n] is None}
            by_hf = {**{h: g for g, h in names.items() if h is not None}, **{h: g for h, (g, _) in mats.items()}}
            fused = {h: hf_names.fused_parts(h, arch) for h in by_hf}  # (Granite 4's dense gate and up)
            fused = {h: parts for h, parts in fused.items() if parts is not None}
            specs = [(h, tag, hf_names.hf_shape(g, shapes[g] if h not in fused else (
                sum(shapes[p][0] for p in fused[h]), *shapes[g][1:]), md)) for h, g in by_hf.items()]
            specs = [(h, t, shape[1:] if h in mats else shape) for h, t, shape in specs]  # (one stacked matrix)
        scalars = hf_names.layer_scalar_tensors(md)  # (Apertus's xIELU scalars: metadata in GGUF)
        specs += [(h, tag, shape) for h, (shape, _) in scalars.items()]

        def produce(hf_name: str) -> torch.Tensor:
            if hf_name in scalars:
                shape, value = scalars[hf_name]
                return torch.full(shape, value, dtype=tdt)
            if hf_name not in by_hf:  # (the vision tower's, as the original holds it)
                return original[hf_name][0].get_tensor(hf_name).to(tdt)
            if hf_name in fused:
                return torch.cat([gguf_tensor(name) for name in fused[hf_name]])
            if hf_name in mats:
                name, i = mats[hf_name]
                return gguf_tensor(name)[i].contiguous()
            return gguf_tensor(by_hf[hf_name])

        def gguf_tensor(name: str) -> torch.Tensor:
            """GGUF tensor `name`, merged with its adapter, as HF holds it."""
            if name not in base.tensor_infos:
                return torch.zeros(shapes[name], dtype=tdt)
            ti = base.tensor_infos[name]
            if len(ti.shape) < 2:
                w = base.tensor(name).to(torch.float32).reshape(ti.shape)
                return hf_names.to_hf_values(name, w, md).to(tdt)
            qt = base.qtensor(name)
            w = dense(qt)
            if ad is not None:  # the weight each adapted part computes with (merge-exact: its stored mins)
                for part, a, b in ad.split(name, qt):
                    lin = ad.adapted(part, qt.rows(a, b))
                    if lin is not None:
                        w[a:b] = lin.effective_weight()
            return hf_names.to_hf_values(name, w, md).reshape(hf_names.hf_shape(name, ti.shape, md)).to(tdt)

        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        write_safetensors(d / "model.safetensors", specs, produce, {"format": "pt"},
                          progress=f"writing {d / 'model.safetensors'}")
        _write_json(d / "config.json", cfg)
        notes = []
        if original:  # the original's generation config, tokenizer and processor
            for f in beside:
                shutil.copyfile(f, d / f.name)
        else:
            gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
            _write_json(d / "generation_config.json", gen)
            if "tokenizer.ggml.tokens" in md:
                write_hf_tokenizer(md, d)
            else:
                notes.append("the base has no tokenizer metadata: no tokenizer files written")
    finally:
        base.close()
    size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
    return ExportReport(str(d), "hf", ad.method if ad else None, ad.rank if ad else None, {}, notes, size,
                        time.perf_counter() - t0)


__all__ = ["ExportReport", "SavedAdapter", "check_merged_gguf", "compare_perplexity", "describe_perplexity",
           "export_hf", "export_lora_gguf", "export_merged_gguf", "export_peft", "gguf_name_of_module",
           "write_hf_tokenizer"]
