"""Whole-model quantization: `lowtune quantize SRC --type T -o OUT.gguf`.

    quantize_model("SmolLM2.Q4_1.gguf", "smol-f32.gguf", "F32")       # a float teacher
    quantize_model("SmolLM2.Q4_1.gguf", "smol-int2.gguf", "INT2-g32")  # an INT2.1-style student
    quantize_model("Llama-3.2-1B/", "llama-q4km.gguf", "Q4_K_M")       # HF safetensors -> GGUF

SRC is a GGUF file or a Hugging Face safetensors directory (read through lowtune.loading).
Tensors are handled one at a time: read, dequantized to float32 when they are quantized (so a
re-quantization starts from the source's F32 dequantization, the very weights an F32 teacher
made from the same file holds), given their new type, quantized and written. A tensor that
already has its new type is copied byte for byte, as llama-quantize does. 1-D tensors (norms,
rope_freqs) are written as F32. Every metadata KV (tokenizer included) is carried over;
general.file_type is set from the recipe (gguf_io.write_gguf names the most common type instead
when no tensor has the recipe's main type, e.g. SmolLM2 "Q2_K", whose 576-wide rows all fall back).

--type takes (lowtune.recipes chooses each tensor's type):
- llama.cpp's recipes (llama-quantize's ftypes), with its per-tensor choices
  (llama_tensor_get_type): F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q2_K_S Q3_K_S Q3_K_M
  Q3_K_L Q4_K_S Q4_K_M Q5_K_S Q5_K_M Q6_K, and llama-quantize's aliases Q3_K, Q4_K, Q5_K for the
  _M recipes. E.g. Q4_K_M: Q4_K, with Q6_K for the LM head and for attn_v/ffn_down in the layers
  `use_more_bits` picks (the first and last eighth, every third between); Q2_K: Q2_K, with Q3_K
  for ffn_down/attn_output and attn_v (Q4_K when n_head/n_head_kv >= 4), Q6_K for the head.
  A tied model's token_embd is its LM head and is typed as one (Q8_0 when its rows do not fit
  the recipe's blocks). The I-quant recipes (IQ4_XS, IQ4_NL, IQ3_M, IQ3_S, IQ3_XS) follow
  llama.cpp's choices without an importance matrix; those that need IQ2_*/IQ1_* tensors are
  refused (see lowtune.recipes).
- the papers' INTb-gG (b in 2,3,4,5,6,8; G in 32,64,128): every decoder linear becomes INTb-gG;
  token_embd and output stay F16, as INT2.1 keeps embeddings and LM head in fp16 (see
  --token-embedding-type / --output-type). In the file they are stored in the llama.cpp type that
  holds them exactly (Q4_1, Q5_1, or F32 for INT6/INT8; recipes.to_storage), with their INTb-gG
  type recorded in `lowtune.logical_types`; model_bits() counts their bits as INTb-gG.
  `lowtune.quantize.type` records the --type asked for.
With `pure=True` (--pure) every 2-D weight gets the type itself, as llama-quantize --pure.
Rows that a block does not divide fall back as llama-quantize does (recipes.fallback).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from gguf.constants import GGUFValueType

from . import ops
from .dtypes import torch_dtype
from .formats import Format, get_format
from .gguf_io import write_gguf
from .gguf_split import open_gguf
from .loading import open_source
from .model import ADAPTER_TARGETS
from .qtensor import QTensor
from .recipes import (LOGICAL_TYPES_KEY, QUANTIZE_TYPE_KEY, TypePlan, logical_types, storage_format,
                      to_storage)

# ---------------------------------------------------------------------------------------------
# Quantizing a model


@dataclass
class QuantizeResult:
    path: Path
    qtype: str
    types: dict[str, str]            # tensor -> lowtune type (INTb-gG where logical)
    stored: dict[str, str]           # tensor -> the ggml type in the file
    bits: "ModelBits"
    seconds: float

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for t in self.types.values():
            counts[t] = counts.get(t, 0) + 1
        mix = ", ".join(f"{n}x {t}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        return (f"{self.path}: {len(self.types)} tensors ({mix}); {self.bits.describe()}; "
                f"{self.seconds:.1f} s")


def quantize_model(src, out, qtype: str, *, pure: bool = False, output_type: str | None = None,
                   token_embedding_type: str | None = None,
                   progress: Callable[[str], None] | None = None) -> QuantizeResult:
    """Quantize the model at `src` (GGUF file or HF safetensors directory) to `qtype` and write
    the GGUF file `out` (atomically, one tensor at a time). See the module doc for the types."""
    t0 = time.perf_counter()
    with open_source(src) as source:
        infos = source.tensor_infos
        names = list(infos)
        plan = TypePlan.for_source(qtype, source.metadata, names, pure=pure, output_type=output_type,
                                   token_embedding_type=token_embedding_type)
        chosen: dict[str, Format] = {n: plan.choose_quantizable(n, ti.shape) for n, ti in infos.items()}
        have_logical = {n: get_format(t) for n, t in logical_types(source.metadata).items()}
        md = {k: v for k, v in source.metadata.items()
              if not k.startswith("split.") and k not in (LOGICAL_TYPES_KEY, QUANTIZE_TYPE_KEY)}
        mtypes = {k: v for k, v in source.metadata_types.items() if k in md}
        if plan.ftype is not None:
            md["general.file_type"] = plan.ftype
            mtypes["general.file_type"] = GGUFValueType.UINT32
        logical = [f"{n}={f.name}" for n, f in chosen.items() if storage_format(f) is not f]
        md[QUANTIZE_TYPE_KEY] = plan.recipe or plan.default.name
        mtypes[QUANTIZE_TYPE_KEY] = GGUFValueType.STRING
        if logical:
            md[LOGICAL_TYPES_KEY] = logical
            mtypes[LOGICAL_TYPES_KEY] = (GGUFValueType.ARRAY, GGUFValueType.STRING)
        stored: dict[str, str] = {}

        def tensors() -> Iterator[tuple[str, object]]:
            for i, (name, ti) in enumerate(infos.items()):
                fmt, shape = chosen[name], ti.shape
                if fmt.quantized and have_logical.get(name, ti.type) is fmt:
                    qt = source.qtensor(name)           # same type: copied byte for byte
                else:
                    w = ops.dequantize(source.qtensor(name), torch.float32)
                    if not fmt.quantized:
                        stored[name] = fmt.name
                        yield name, w.to(torch_dtype(fmt.name)).reshape(shape).contiguous()
                        continue
                    qt = to_storage(ops.quantize(w, fmt))
                    del w
                stored[name] = qt.format.name
                if progress:
                    progress(f"[{i + 1}/{len(infos)}] {name} {fmt.name}")
                yield name, (qt, shape) if len(shape) != 2 else qt

        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_gguf(out, md, tensors(), metadata_types=mtypes)
    bits = model_bits(out)
    return QuantizeResult(out, md[QUANTIZE_TYPE_KEY], {n: f.name for n, f in chosen.items()}, stored,
                          bits, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# Bits per weight


_LINEAR_RE = re.compile(r"blk\.\d+\.(%s|ffn_gate_exps|ffn_up_exps|ffn_gate_up_exps|ffn_down_exps)\.weight$"
                        % "|".join(ADAPTER_TARGETS))


@dataclass
class ModelBits:
    """Parameters and bits of a model file, by group. Bits count each tensor's own type (INTb-gG
    where the file records it), scales and mins included: bits = elements x bits_per_weight."""
    linear_params: int = 0
    linear_bits: float = 0.0
    embedding_params: int = 0      # token_embd and output
    embedding_bits: float = 0.0
    other_params: int = 0          # norms, rope_freqs
    other_bits: float = 0.0

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params + self.other_params

    @property
    def bits(self) -> float:
        return self.linear_bits + self.embedding_bits + self.other_bits

    @property
    def linear_bpw(self) -> float:
        return self.linear_bits / max(self.linear_params, 1)

    @property
    def bpw(self) -> float:
        return self.bits / max(self.params, 1)

    def with_adapter(self, adapter_params: int, bits_per_param: float = 16.0) -> dict:
        """INT2.1's arithmetic: the adapter's parameters in fp16 are added to the quantized
        linears' bits (and to the whole model's); the parameter counts stay the base's."""
        extra = adapter_params * bits_per_param
        return {"linear_bpw": (self.linear_bits + extra) / max(self.linear_params, 1),
                "bpw": (self.bits + extra) / max(self.params, 1),
                "adapter_params": adapter_params, "adapter_bits": extra}

    def describe(self) -> str:
        return (f"decoder linears {self.linear_bpw:.3f} bits/weight, whole model {self.bpw:.3f} "
                f"({self.bits / 8 / 2**20:.1f} MiB of weights)")

    def to_dict(self) -> dict:
        return {"linear_params": self.linear_params, "linear_bpw": self.linear_bpw,
                "embedding_params": self.embedding_params,
                "embedding_bpw": self.embedding_bits / max(self.embedding_params, 1),
                "params": self.params, "bpw": self.bpw, "mib": self.bits / 8 / 2**20}


def holds_logical(qt: QTensor, fmt: Format) -> bool:
    """Whether the stored tensor `qt` is exactly an INTb-gG tensor `fmt` in storage form: its
    codes fit b bits and every group of G repeats one d and m (Q4_1/Q5_1), or its values
    re-quantize to themselves (F32). A file whose tensors were changed after quantize_model
    (e.g. an adapter merged and re-quantized as plain Q4_1) fails this check."""
    n, k = qt.shape
    if storage_format(fmt) is not qt.format or k % fmt.group:
        return False
    if qt.format.name == "F32":
        values = ops.dequantize(qt, torch.float32)
        return torch.equal(ops.dequantize(ops.quantize(values, fmt), torch.float32), values)
    blocks = qt.raw.to("cpu").numpy().reshape(-1, qt.format.block_bytes)
    dm = blocks[:, :4].reshape(-1, fmt.group // 32, 4)
    if not (dm == dm[:, :1]).all():
        return False
    qs = blocks[:, -16:]
    codes = np.maximum(qs & 15, qs >> 4)
    if qt.format.name == "Q5_1" or fmt.bits >= 4:
        return True  # every 4/5-bit code is in range
    return int(codes.max(initial=0)) <= fmt.maxq


def model_bits(path) -> ModelBits:
    """Bits per weight of a GGUF model file (see ModelBits)."""
    mb = ModelBits()
    with open_gguf(path) as f:
        logical = logical_types(f.metadata)
        for name, info in f.tensor_infos.items():
            n = int(info.n_elements)
            if name in logical and info.type is not None and holds_logical(f.qtensor(name), get_format(logical[name])):
                bpw = get_format(logical[name]).bits_per_weight
            elif info.type is not None:
                bpw = info.type.bits_per_weight
            else:
                bpw = 8.0 * info.nbytes / max(n, 1)
            if _LINEAR_RE.search(name):
                mb.linear_params += n
                mb.linear_bits += n * bpw
            elif name in ("token_embd.weight", "output.weight"):
                mb.embedding_params += n
                mb.embedding_bits += n * bpw
            else:
                mb.other_params += n
                mb.other_bits += n * bpw
    return mb


__all__ = ["ModelBits", "QuantizeResult", "holds_logical", "model_bits", "quantize_model"]
