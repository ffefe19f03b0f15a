"""Whole-model quantization: `lowtune quantize SRC --type T -o OUT.gguf`.

    quantize_model("SmolLM2.Q4_1.gguf", "smol-f32.gguf", "F32")       # a float teacher
    quantize_model("SmolLM2.Q4_1.gguf", "smol-int2.gguf", "INT2-g32")  # an INT2.1-style student
    quantize_model("Llama-3.2-1B/", "llama-q4km.gguf", "Q4_K_M")       # HF safetensors -> GGUF

SRC is a GGUF file or a Hugging Face safetensors directory. Tensors are handled one at a time:
read, dequantized to float32 when they are quantized (so a re-quantization starts from the
source's F32 dequantization, the very weights an F32 teacher made from the same file holds),
given their new type, quantized and written. A tensor that already has its new type is copied
byte for byte, as llama-quantize does. 1-D tensors (norms, rope_freqs) are written as F32. Every
metadata KV (tokenizer included) is carried over; general.file_type is set from the recipe
(gguf_io.write_gguf names the most common type instead when no tensor has the recipe's main
type, e.g. SmolLM2 "Q2_K", whose 576-wide rows all fall back).

--type takes:
- llama.cpp's recipes (llama-quantize's ftypes), with its per-tensor choices
  (llama_tensor_get_type): F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q2_K_S Q3_K_S Q3_K_M
  Q3_K_L Q4_K_S Q4_K_M Q5_K_S Q5_K_M Q6_K, and llama-quantize's aliases Q3_K, Q4_K, Q5_K for the
  _M recipes. E.g. Q4_K_M: Q4_K, with Q6_K for the LM head and for attn_v/ffn_down in the layers
  `use_more_bits` picks (the first and last eighth, every third between); Q2_K: Q2_K, with Q3_K
  for ffn_down/attn_output and attn_v (Q4_K when n_head/n_head_kv >= 4), Q6_K for the head.
  A tied model's token_embd is its LM head and is typed as one (Q8_0 when its rows do not fit
  the recipe's blocks). The I-quant recipes IQ4_XS, IQ4_NL, IQ3_M, IQ3_S and IQ3_XS (IQ3_XXS for
  attn_q/attn_k and the middle ffn_gate/ffn_up) follow llama.cpp's choices without an importance
  matrix, e.g. IQ4_XS: Q5_K for the first eighth of ffn_down; IQ3_M: Q4_K for attn_v, attn_output
  and the first eighth of ffn_down. Recipes that need IQ2_*/IQ1_* tensors (IQ2_XXS, IQ2_XS,
  IQ2_S, IQ2_M, IQ1_S, IQ1_M, IQ3_XXS) are refused: ggml quantizes those types only with an
  importance matrix, which lowtune does not compute.
- the papers' INTb-gG (b in 2,3,4,5,6,8; G in 32,64,128): every decoder linear becomes INTb-gG;
  token_embd and output stay F16, as INT2.1 keeps embeddings and LM head in fp16 (see
  --token-embedding-type / --output-type).
With `pure=True` (--pure) every 2-D weight gets the type itself, as llama-quantize --pure.

Rows that a block does not divide fall back as llama-quantize does: Q2_K/Q3_K -> Q4_0,
Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, the 256-wide I-quants -> IQ4_NL; INTb-gG halves G down
to 32; then F16. SmolLM2's 576-wide rows take these fallbacks for every K- and I-quant.

INTb-gG in a GGUF file: INTb-gG is not a ggml type, so tensors are stored in the llama.cpp type
that holds them exactly and the file stays loadable by llama.cpp:
    INT2/3/4-gG -> Q4_1 blocks (codes 0..2^b-1 fit Q4_1's 0..15; for G = 64/128 the group's
                   d and m are repeated in each 32-block); INT4-g32 is Q4_1 byte for byte
    INT5-gG     -> Q5_1 blocks, the same way
    INT6/8-gG   -> F32 values (no llama.cpp block type holds them exactly)
The metadata KV `lowtune.logical_types` (an array of "tensor=INTb-gG" strings) records the
intended type; load_model() re-packs those tensors into INTb-gG blocks (checking that every
value comes back bit for bit, otherwise the stored type is kept), and model_bits() counts their
bits as INTb-gG. `lowtune.quantize.type` records the --type asked for.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import ops
from .formats import Format, get_format
from .qtensor import QTensor

LOGICAL_TYPES_KEY = "lowtune.logical_types"
QUANTIZE_TYPE_KEY = "lowtune.quantize.type"

# llama.cpp's LLAMA_FTYPE ids and each recipe's default tensor type.
RECIPES: dict[str, tuple[int, str]] = {
    "F32": (0, "F32"), "F16": (1, "F16"), "BF16": (32, "BF16"),
    "Q4_0": (2, "Q4_0"), "Q4_1": (3, "Q4_1"), "Q8_0": (7, "Q8_0"), "Q5_0": (8, "Q5_0"), "Q5_1": (9, "Q5_1"),
    "Q2_K": (10, "Q2_K"), "Q2_K_S": (21, "Q2_K"),
    "Q3_K_S": (11, "Q3_K"), "Q3_K_M": (12, "Q3_K"), "Q3_K_L": (13, "Q3_K"),
    "Q4_K_S": (14, "Q4_K"), "Q4_K_M": (15, "Q4_K"),
    "Q5_K_S": (16, "Q5_K"), "Q5_K_M": (17, "Q5_K"), "Q6_K": (18, "Q6_K"),
    "IQ2_XXS": (19, "IQ2_XXS"), "IQ2_XS": (20, "IQ2_XS"), "IQ3_XS": (22, "IQ3_S"), "IQ3_XXS": (23, "IQ3_XXS"),
    "IQ1_S": (24, "IQ1_S"), "IQ4_NL": (25, "IQ4_NL"), "IQ3_S": (26, "IQ3_S"), "IQ3_M": (27, "IQ3_S"),
    "IQ2_S": (28, "IQ2_XS"), "IQ2_M": (29, "IQ2_S"), "IQ4_XS": (30, "IQ4_XS"), "IQ1_M": (31, "IQ1_M"),
}
# The recipes llama.cpp built around its 1- and 2-bit I-quants (their own branch of
# llama_tensor_get_type).
_IQ12_RECIPES = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M")
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # as llama-quantize

# Row-length fallbacks (llama.cpp's tensor_type_fallback).
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
             **{t: "IQ4_NL" for t in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS")}}
_INT = re.compile(r"INT(\d)-G(\d+)")


def is_int_group(fmt: Format) -> bool:
    return _INT.fullmatch(fmt.name.upper()) is not None


def storage_format(fmt: Format) -> Format:
    """The GGUF type that stores an INTb-gG tensor exactly (module doc); other types store as themselves."""
    m = _INT.fullmatch(fmt.name.upper())
    if m is None:
        return fmt
    bits = int(m.group(1))
    return get_format("Q4_1" if bits <= 4 else "Q5_1" if bits == 5 else "F32")


def to_storage(qt: QTensor) -> QTensor:
    """An INTb-gG QTensor re-blocked as its storage type (exact: the same values); others as is.

    Q4_1/Q5_1 blocks are built from the INT blocks' codes and their d, m, which stay fp16, so
    every dequantized value is unchanged."""
    fmt = qt.format
    store = storage_format(fmt)
    if store is fmt:
        return qt
    if store.name == "F32":
        return ops.quantize(ops.dequantize(qt, torch.float32), "F32")
    import numpy as np

    n, k = qt.shape
    group, bits = fmt.group, fmt.bits
    blocks = qt.raw.to("cpu").numpy().reshape(-1, fmt.block_bytes)
    dm = blocks[:, :4]                                     # fp16 d, fp16 m
    codes = fmt._unpack_codes(blocks[:, 4:])               # int32 [n*k/G, G]
    sub = codes.reshape(-1, 32)                            # one row per 32-block
    dm32 = np.repeat(dm, group // 32, axis=0)              # each 32-block repeats its group's d, m
    if store.name == "Q4_1":
        qs = sub[:, :16] | (sub[:, 16:] << 4)
        out = np.concatenate([dm32, qs.astype(np.uint8)], axis=1)
    else:  # Q5_1: d, m, qh (bit j = 5th bit of element j), then the low nibbles
        high = (sub >> 4) & 1
        qh = (high.astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum(axis=1).astype("<u4")
        low = sub & 15
        qs = (low[:, :16] | (low[:, 16:] << 4)).astype(np.uint8)
        out = np.concatenate([dm32, qh.view(np.uint8).reshape(-1, 4), qs], axis=1)
    raw = torch.from_numpy(np.ascontiguousarray(out).reshape(n, store.row_bytes(k)))
    return QTensor(raw.to(qt.device), store, (n, k))


# ---------------------------------------------------------------------------------------------
# Per-tensor type choice


def llama_cpp_order(names) -> list[str]:
    """Tensor names in the order llama-quantize visits them (weight_name_comparer): by layer
    number (non-layer tensors first), then by name. Its attn_v/ffn_down counters follow it."""
    def key(n):
        m = re.match(r"blk\.(\d+)\.", n)
        return (int(m.group(1)) if m else -1, n)
    return sorted(names, key=key)


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every
    third layer in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Whether llama-quantize would quantize this tensor: a 2-D (or larger) `*weight` that is no
    norm and no MoE router."""
    return (name.endswith("weight") and len(shape) >= 2 and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


def fallback(fmt: Format, k: int) -> Format:
    """The first type in the fallback chain whose blocks divide a row of k."""
    while k % fmt.block_elems:
        m = _INT.fullmatch(fmt.name.upper())
        if fmt.name in _FALLBACK:
            fmt = get_format(_FALLBACK[fmt.name])
        elif m and int(m.group(2)) > 32:
            fmt = get_format(f"INT{m.group(1)}-g{int(m.group(2)) // 2}")
        else:
            return get_format("F16")
    return fmt


@dataclass
class TypePlan:
    """Chooses each tensor's type for one --type (see the module doc). `index` numbers the
    attn_v and ffn_down tensors as llama-quantize's counters do; `counts` holds their totals."""
    qtype: str
    n_gqa: int = 1
    n_layers: int = 0
    has_output: bool = True
    pure: bool = False
    output_type: str | None = None
    token_embedding_type: str | None = None
    index: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        name = str(self.qtype).upper()
        name = ALIASES.get(name, name)
        if name in RECIPES:
            self.recipe: str | None = name
            self.ftype, default = RECIPES[name]
            self.default = get_format(default)
        else:
            try:
                fmt = get_format(self.qtype)
            except ValueError:
                raise ValueError(f"unknown --type {self.qtype!r}: use a llama.cpp recipe "
                                 f"({', '.join(RECIPES)}, aliases {', '.join(ALIASES)}) or INTb-gG "
                                 f"(b in 2,3,4,5,6,8; G in 32,64,128)") from None
            if not is_int_group(fmt):
                raise ValueError(f"--type {fmt.name} is a block type without a recipe; llama.cpp "
                                 f"names its recipes {', '.join(RECIPES)} (or pass pure=True / --pure)")
            self.recipe, self.ftype, self.default = None, None, fmt
        for opt in (self.output_type, self.token_embedding_type):
            if opt is not None:
                get_format(opt)

    @classmethod
    def for_source(cls, qtype: str, metadata: dict, names: list[str], **kw) -> "TypePlan":
        arch = metadata.get("general.architecture", "llama")
        heads = int(metadata.get(f"{arch}.attention.head_count", 1) or 1)
        kv = int(metadata.get(f"{arch}.attention.head_count_kv", heads) or heads)
        plan = cls(qtype, n_gqa=max(1, heads // max(kv, 1)),
                   n_layers=int(metadata.get(f"{arch}.block_count", 0) or 0),
                   has_output="output.weight" in names, **kw)
        for kind in ("attn_v.weight", "ffn_down", "ffn_gate", "ffn_up"):
            ordered = [n for n in llama_cpp_order(names) if kind in n]
            plan.index.update({n: i for i, n in enumerate(ordered)})
            plan.counts[kind] = len(ordered)
        return plan

    def choose(self, name: str, shape: tuple[int, ...]) -> Format:
        """The type of tensor `name` (PyTorch shape)."""
        if not is_quantizable(name, shape):
            return get_format("F32")
        k = int(shape[-1])
        is_head = name == "output.weight" or (not self.has_output and name == "token_embd.weight")
        if is_head and self.output_type:
            return fallback(get_format(self.output_type), k)
        if name == "token_embd.weight" and self.token_embedding_type:
            return fallback(get_format(self.token_embedding_type), k)
        if self.pure or not self.default.quantized:
            return fallback(self.default, k)
        if self.recipe is None:  # INTb-gG: decoder linears only (INT2.1 keeps the rest in fp16)
            if is_head or name == "token_embd.weight":
                return get_format("F16")
            return fallback(self.default, k)
        return fallback(self._llama_cpp_type(name, k, is_head), k)

    def choose_quantizable(self, name: str, shape: tuple[int, ...]) -> Format:
        """choose(), refusing a type lowtune cannot write (IQ2_*, IQ1_*: ggml quantizes them only
        with an importance matrix, which lowtune does not compute)."""
        fmt = self.choose(name, shape)
        if fmt.needs_imatrix:
            raise ValueError(f"--type {self.qtype} gives {name} the type {fmt.name}, which needs an importance "
                             f"matrix (llama.cpp's llama-imatrix) that lowtune does not compute; use IQ3_M, IQ3_S, "
                             f"IQ4_XS, Q3_K_M or Q2_K, or llama-quantize with --imatrix")
        return fmt

    def _llama_cpp_type(self, name: str, k: int, is_head: bool) -> Format:
        """llama_tensor_get_type for dense Llama-family models (no MoE), without an importance
        matrix (lowtune computes none; llama.cpp's choices for IQ3_XXS, IQ4_NL and IQ4_XS depend on it)."""
        r = self.recipe
        t = self.default.name
        i = self.index.get(name, 0)
        if is_head:
            if k % self.default.block_elems:
                return get_format("Q8_0")
            if r in _IQ12_RECIPES or r == "IQ3_XXS":
                return get_format("Q5_K")
            return get_format(t if t == "Q8_0" else "Q6_K")
        if name == "token_embd.weight":
            if r in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
                return get_format("Q2_K")
            if r in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
                return get_format("IQ3_S")
            return self.default
        if r in _IQ12_RECIPES:
            return get_format(self._iq12_type(name, r, t, i))
        if "attn_v.weight" in name:
            if r == "Q2_K":
                t = "Q4_K" if self.n_gqa >= 4 else "Q3_K"
            elif r == "Q2_K_S" and self.n_gqa >= 4:
                t = "Q4_K"
            elif r == "Q3_K_M":
                t = "Q5_K" if i < 2 else "Q4_K"
            elif r == "Q3_K_L":
                t = "Q5_K"
            elif r in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, self.counts["attn_v.weight"]):
                t = "Q6_K"
            elif r == "Q4_K_S" and i < 4:
                t = "Q5_K"
            elif r == "IQ3_XXS":
                t = "Q4_K" if self.n_gqa >= 4 else "IQ3_S"
            elif (r in ("IQ3_XS", "IQ3_S") and self.n_gqa >= 4) or r == "IQ3_M":
                t = "Q4_K"
            elif r in ("IQ4_NL", "IQ4_XS") and self.n_gqa >= 4:
                t = "Q5_K"
            if self.n_layers == 80 and t in ("Q3_K", "Q4_K"):  # llama.cpp's 70B rule (8x smaller attn_v)
                t = "Q5_K"
        elif "ffn_down" in name:
            n = self.counts["ffn_down"]
            if r == "Q2_K":
                t = "Q3_K"
            elif r == "Q2_K_S" and i < n // 8:
                t = "Q4_K"
            elif r == "Q3_K_M":
                t = "Q5_K" if i < n // 16 else "Q4_K"
            elif r == "Q3_K_L":
                t = "Q5_K"
            elif r in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
                t = "Q6_K"
            elif r == "Q4_K_S" and i < n // 8:
                t = "Q5_K"
            elif r == "IQ3_XXS":
                t = "Q4_K" if i < n // 8 else "Q3_K"
            elif r == "IQ3_M" and i < n // 8:
                t = "Q4_K"
            elif r in ("IQ4_NL", "IQ4_XS") and i < n // 8:
                t = "Q5_K"
        elif "attn_output.weight" in name:
            t = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_XXS": "IQ3_S", "IQ3_M": "Q4_K"}.get(r, t)
        elif "attn_qkv.weight" in name:
            t = {"Q3_K_M": "Q4_K", "Q3_K_L": "Q4_K", "Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K", "IQ3_M": "Q4_K"}.get(r, t)
        elif "attn_k.weight" in name or "attn_q.weight" in name:
            t = {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(r, t)
        elif ("ffn_gate" in name or "ffn_up" in name) and r == "IQ3_XS":
            n = self.counts["ffn_gate" if "ffn_gate" in name else "ffn_up"]
            if n // 8 <= i < 7 * n // 8:
                t = "IQ3_XXS"
        return get_format(t)

    def _iq12_type(self, name: str, r: str, t: str, i: int) -> str:
        """llama.cpp's branch for the 1- and 2-bit I-quant recipes (dense models)."""
        wide = r in ("IQ2_S", "IQ2_M")  # these keep IQ3_S where the others drop to Q2_K
        if "attn_v.weight" in name:
            return "Q4_K" if self.n_gqa >= 4 else "IQ3_S" if wide else "Q2_K"
        if "ffn_down" in name:
            return ("IQ3_S" if wide else "Q2_K") if i < self.counts["ffn_down"] // 8 else t
        if "attn_output.weight" in name:
            return "IQ2_XXS" if r in ("IQ1_S", "IQ1_M") else "IQ3_S" if wide else t
        return t


# ---------------------------------------------------------------------------------------------
# Sources: GGUF files and HF safetensors directories, read lazily


@dataclass
class SourceTensor:
    name: str
    shape: tuple[int, ...]           # PyTorch order
    stored: Format | None            # stored type (None: not a lowtune type, or a safetensors dtype)
    logical: Format | None           # INTb-gG type recorded in lowtune.logical_types, if any
    load_qtensor: Callable[[], QTensor] | None   # the stored blocks as [N, K] (GGUF sources)
    load_float: Callable[[], torch.Tensor]       # float32 values in `shape`


@dataclass
class Source:
    path: str
    metadata: dict
    metadata_types: dict
    tensors: list[SourceTensor]
    close: Callable[[], None] = lambda: None


def logical_types(metadata: dict) -> dict[str, str]:
    """{tensor name: INTb-gG} from a lowtune GGUF's metadata (empty for other files)."""
    out = {}
    for entry in metadata.get(LOGICAL_TYPES_KEY) or []:
        name, _, t = str(entry).partition("=")
        if name and t:
            out[name] = t
    return out


def open_source(path) -> Source:
    """A GGUF file or an HF Llama safetensors directory, as lazily loaded tensors."""
    p = Path(path)
    if p.is_dir() or p.suffix == ".safetensors":
        return _open_safetensors(p.parent if p.is_file() else p)
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist (a .gguf file or a Hugging Face safetensors "
                                "directory is expected)")
    return _open_gguf(p)


def _open_gguf(p: Path) -> Source:
    from .gguf_io import GGUFFile

    f = GGUFFile(p)
    md = dict(f.metadata)
    logical = logical_types(md)
    tensors = []
    for name, info in f.tensor_infos.items():
        shape = tuple(int(d) for d in info.shape)

        def load_q(name=name):
            return f.qtensor(name)

        def load_f(name=name, shape=shape):
            return ops.dequantize(f.qtensor(name), torch.float32).reshape(shape)

        lt = get_format(logical[name]) if name in logical else None
        tensors.append(SourceTensor(name, shape, info.type, lt, load_q if info.type else None, load_f))
    return Source(str(p), md, dict(f.metadata_types), tensors, close=f.close)


def _open_safetensors(d: Path) -> Source:
    """Like safetensors_io.load_hf_checkpoint, but each tensor is read only when asked for."""
    from safetensors import safe_open

    from .safetensors_io import (_safetensors_files, hf_to_gguf_name, llama3_rope_factors,
                                 llama_metadata_from_config, permute_qk_hf_to_gguf)

    cfg_path = d / "config.json"
    if not cfg_path.exists():
        raise ValueError(f"{d}: no config.json; pass a Hugging Face model directory or a GGUF file")
    config = json.loads(cfg_path.read_text())
    md, types = llama_metadata_from_config(config, d.name)
    n_head, n_head_kv = md["llama.attention.head_count"], md["llama.attention.head_count_kv"]
    tied = bool(config.get("tie_word_embeddings", False))
    entries: dict[str, SourceTensor] = {}
    for f in _safetensors_files(d):
        with safe_open(str(f), framework="pt") as st:
            for hf_name in st.keys():
                name = hf_to_gguf_name(hf_name)
                if name is None or (tied and name == "output.weight"):
                    continue
                if name in entries:
                    raise ValueError(f"{f}: tensor {hf_name!r} appears twice in the checkpoint")
                shape = tuple(st.get_slice(hf_name).get_shape())

                def load_f(f=f, hf_name=hf_name, name=name):
                    with safe_open(str(f), framework="pt") as s:
                        w = s.get_tensor(hf_name)
                    if not w.is_floating_point():
                        raise ValueError(f"{f}: tensor {hf_name!r} is {w.dtype}; expected a float type")
                    if name.startswith("blk.") and (".attn_q." in name or ".attn_k." in name):
                        w = permute_qk_hf_to_gguf(w, n_head if ".attn_q." in name else n_head_kv)
                    return w.to(torch.float32)

                entries[name] = SourceTensor(name, shape, None, None, None, load_f)
    rs = config.get("rope_scaling") or {}
    if rs.get("rope_type", rs.get("type")) == "llama3":
        factors = llama3_rope_factors(config)
        entries["rope_freqs.weight"] = SourceTensor("rope_freqs.weight", tuple(factors.shape), None,
                                                    None, None, lambda: factors)
    for need in ("token_embd.weight", "output_norm.weight"):
        if need not in entries:
            raise ValueError(f"{d}: the checkpoint lacks {need}")

    def key(n):  # GGUF order: embeddings, blocks in order, then the rest
        m = re.match(r"blk\.(\d+)\.", n)
        return (1, int(m.group(1)), n) if m else ((0, 0, n) if n == "token_embd.weight" else (2, 0, n))

    if (d / "tokenizer.json").exists() or (d / "tokenizer.model").exists():
        from .tokenizer import tokenizer_metadata_from_dir
        md.update(tokenizer_metadata_from_dir(d))
    return Source(str(d), md, types, [entries[n] for n in sorted(entries, key=key)])


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
    from gguf.constants import GGUFValueType

    from .gguf_io import write_gguf

    t0 = time.perf_counter()
    source = open_source(src)
    try:
        names = [t.name for t in source.tensors]
        plan = TypePlan.for_source(qtype, source.metadata, names, pure=pure, output_type=output_type,
                                   token_embedding_type=token_embedding_type)
        chosen: dict[str, Format] = {t.name: plan.choose_quantizable(t.name, t.shape) for t in source.tensors}
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
            for i, t in enumerate(source.tensors):
                fmt = chosen[t.name]
                have = t.logical or t.stored
                if have is not None and have is fmt and t.load_qtensor is not None and fmt.quantized:
                    qt = t.load_qtensor()               # same type: copied byte for byte
                    if t.logical is not None:           # already in storage form in the source
                        stored[t.name] = qt.format.name
                        yield t.name, (qt, t.shape) if len(t.shape) != 2 else qt
                        continue
                else:
                    w = t.load_float()
                    if not fmt.quantized:
                        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[fmt.name]
                        stored[t.name] = fmt.name
                        yield t.name, w.to(dtype).contiguous()
                        del w
                        continue
                    qt = ops.quantize(w.reshape(-1, w.shape[-1]), fmt)
                    del w
                qt = to_storage(qt)
                stored[t.name] = qt.format.name
                if progress:
                    progress(f"[{i + 1}/{len(source.tensors)}] {t.name} {fmt.name}")
                yield t.name, (qt, t.shape) if len(t.shape) != 2 else qt

        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_gguf(out, md, tensors(), metadata_types=mtypes)
    finally:
        source.close()
    bits = model_bits(out)
    return QuantizeResult(out, md[QUANTIZE_TYPE_KEY], {n: f.name for n, f in chosen.items()}, stored,
                          bits, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# Bits per weight


DECODER_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_LINEAR_RE = re.compile(r"blk\.\d+\.(%s)\.weight$" % "|".join(DECODER_LINEARS))


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
    import numpy as np

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
    from .gguf_io import GGUFFile

    mb = ModelBits()
    with GGUFFile(path) as f:
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


# ---------------------------------------------------------------------------------------------
# Loading a lowtune GGUF with its INTb-gG tensors re-packed


def restore_logical_types(model, metadata: dict | None = None) -> dict[str, str]:
    """Re-pack the packed matrices of a LlamaModel that the file records as INTb-gG
    (lowtune.logical_types) into INTb-gG blocks, in place. A tensor is re-packed only when
    quantizing its values as INTb-gG gives them back bit for bit (it does for files written by
    quantize_model); otherwise it keeps its stored type. Returns {tensor: type now used}."""
    from .model import QEmbedding, QLinear

    logical = logical_types(metadata if metadata is not None else getattr(model, "metadata", {}))
    done = {}
    if not logical:
        return done
    for mod in model.modules():
        if not isinstance(mod, (QLinear, QEmbedding)) or mod.name not in logical:
            continue
        fmt = get_format(logical[mod.name])
        qt = mod.weight
        values = ops.dequantize(qt, torch.float32)
        if values.shape[1] % fmt.block_elems:
            continue
        packed = ops.quantize(values, fmt)
        if torch.equal(ops.dequantize(packed, torch.float32), values):
            mod.raw = packed.raw
            mod.format = fmt
            done[mod.name] = fmt.name
        else:
            done[mod.name] = qt.format.name
        del values
    if hasattr(model, "tensor_types"):
        model.tensor_types.update(done)
    return done


def load_model(path, device="cpu", dtype: torch.dtype = torch.float32, restore: bool = True, **kw):
    """LlamaModel.from_gguf, then restore_logical_types (INTb-gG tensors in their own blocks)."""
    from .model import LlamaModel

    model = LlamaModel.from_gguf(path, device, dtype, **kw)
    if restore:
        restore_logical_types(model)
    return model


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="GGUF file or Hugging Face safetensors directory")
    p.add_argument("--type", required=True, dest="qtype",
                   help="llama.cpp recipe (F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K_M "
                   "Q4_K_M Q5_K_M Q6_K IQ4_XS IQ4_NL IQ3_M IQ3_S IQ3_XS ...) or INTb-gG (e.g. INT2-g32, INT3-g64)")
    p.add_argument("-o", "--output", required=True, help="GGUF file to write")
    p.add_argument("--pure", action="store_true",
                   help="every 2-D weight gets --type (no recipe mixture), as llama-quantize --pure")
    p.add_argument("--output-type", help="type of the LM head (output.weight, or a tied token_embd)")
    p.add_argument("--token-embedding-type", help="type of token_embd.weight")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-tensor lines")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("quantize", help="quantize a GGUF or safetensors model to a type or recipe",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    say = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    try:
        res = quantize_model(args.source, args.output, args.qtype, pure=args.pure,
                             output_type=args.output_type,
                             token_embedding_type=args.token_embedding_type, progress=say)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"lowtune quantize: error: {e}", file=sys.stderr)
        return 1
    print(res.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lowtune quantize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


__all__ = ["ALIASES", "LOGICAL_TYPES_KEY", "ModelBits", "QuantizeResult", "RECIPES", "TypePlan",
           "load_model", "logical_types", "model_bits", "open_source", "quantize_model",
           "holds_logical", "llama_cpp_order", "restore_logical_types", "storage_format", "to_storage", "use_more_bits"]

if __name__ == "__main__":
    sys.exit(main())
