"""Which type each tensor gets, and how INTb-gG tensors are stored in a GGUF file.

    fallback(get_format("Q4_K"), 576)            # Q5_0: the first type whose blocks divide the row
    choose_type("Q4_K", "blk.0.attn_q.weight", (576, 576))   # the same, and F32 for 1-D tensors
    training_type(None, (96, 256))               # what finetune quantizes a safetensors weight to
    plan = TypePlan.for_source("Q4_K_M", metadata, names)   # llama-quantize's per-tensor recipe
    to_storage(qt)                               # an INTb-gG QTensor as the GGUF type that holds it

Row fallbacks (llama_tensor_get_type's convert_incompatible_tensor): a row length that a block
does not divide falls back Q2_K/Q3_K/TQ1_0/TQ2_0/Q2_0 -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1,
Q6_K -> Q8_0, the 256-wide I-quants -> IQ4_NL; INTb-gG halves G down to 32; then F16 (NVFP4 and Q1_0
too, which llama-quantize refuses to fall back from). SmolLM2's 576-wide rows take
these for every K- and I-quant.

The ternary and 1-/2-bit recipes (TQ1_0, TQ2_0, Q1_0, Q2_0) type every decoder matrix so, with
llama-quantize's Q6_K head and (but Q1_0) Q4_K token_embd.

I-quant recipes. IQ4_XS, IQ4_NL, IQ3_M, IQ3_S and IQ3_XS (IQ3_XXS for attn_q/attn_k and the
middle ffn_gate/ffn_up) follow llama.cpp's choices without an importance matrix, e.g. IQ4_XS:
Q5_K for the first eighth of ffn_down; IQ3_M: Q4_K for attn_v, attn_output and the first eighth
of ffn_down. Recipes that need IQ2_*/IQ1_* tensors (IQ2_XXS, IQ2_XS, IQ2_S, IQ2_M, IQ1_S, IQ1_M,
IQ3_XXS) are refused (TypePlan.choose_quantizable): ggml quantizes those types only with an
importance matrix, which lowtune does not compute.

INTb-gG in GGUF. INTb-gG is not a ggml type, so a GGUF file stores each such tensor in the
llama.cpp type that holds it exactly, and llama.cpp loads the file:
    INT2/3/4-gG -> Q4_1 blocks (codes 0..2^b-1 fit Q4_1's 0..15; for G = 64/128 the group's d and m
                   are repeated in every 32-block); INT4-g32 is Q4_1 byte for byte
    INT5-gG     -> Q5_1 blocks, the same way
    INT6/8-gG   -> F32 values: no llama.cpp block type holds 6- or 8-bit codes with a float min
                   exactly (Q8_0 has no min and rounds again). Exact beats small here: the file
                   keeps the trained-on values bit for bit; a small llama.cpp file is an explicit
                   `--type Q8_0` away.
The metadata KV `lowtune.logical_types` (an array of "tensor=INTb-gG" strings) records the
intended type (lowtune.loading can re-pack those tensors into INTb-gG blocks on load).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from . import ops
from .families import checked_number, key_number
from .formats import Format, get_format
from .formats.intgroup import IntFormat
from .formats.legacy import pack_bits, pack_nibbles
from .qtensor import QTensor
from .rwkv import LOW_RANK

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
    "TQ1_0": (36, "TQ1_0"), "TQ2_0": (37, "TQ2_0"), "Q1_0": (40, "Q1_0"), "Q2_0": (41, "Q2_0"),
}
# The recipes llama.cpp built around its 1- and 2-bit I-quants (their own branch of
# llama_tensor_get_type).
_IQ12_RECIPES = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M")
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # as llama-quantize

_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
             "TQ1_0": "Q4_0", "TQ2_0": "Q4_0", "Q2_0": "Q4_0",
             **{t: "IQ4_NL" for t in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS")}}

# matrices llama-quantize leaves in floats whatever the type (LFM2's, Mamba2's, Qwen3.5's and Kimi Linear's
# convolution kernels; Mamba2's A, D [heads, 1] and gated norm [groups, width], vectors GGUF holds as matrices;
# RWKV's small low-rank and lerp matrices)
_KEPT_FLOAT = ("shortconv.conv.weight", "ssm_conv1d.weight", "ssm_conv1d_q.weight", "ssm_conv1d_k.weight",
               "ssm_conv1d_v.weight", ".ssm_a", ".ssm_d", "ssm_norm.weight", "time_mix_first.weight",
               "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
               *(f"time_mix_{x}{i}.weight" for x in LOW_RANK for i in "12"))


def _layer0_number(metadata: dict, key: str, default: int) -> int:
    """The count at `key`, layer 0's where the file holds one a layer (families.key_number's checks)."""
    v = metadata.get(key)
    if isinstance(v, (list, tuple)):
        return checked_number(key, v[0]) if len(v) else default
    return key_number(metadata, key, default)


def fallback(fmt: Format, k: int) -> Format:
    """The first type in the fallback chain (module doc) whose blocks divide a row of k."""
    fmt = get_format(fmt)
    while k % fmt.block_elems:
        if fmt.name in _FALLBACK:
            fmt = get_format(_FALLBACK[fmt.name])
        elif isinstance(fmt, IntFormat) and fmt.group > 32:
            fmt = get_format(f"INT{fmt.bits}-g{fmt.group // 2}")
        else:
            return get_format("F16")
    return fmt


def ggml_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims of a tensor of PyTorch `shape`: its leading 1s do not count (Qwen3.5-MoE's shared
    expert gate [1, D] is a vector to llama-quantize)."""
    return len(shape) - next((i for i, d in enumerate(shape) if d != 1), max(len(shape) - 1, 0))


def choose_type(qtype, name: str, shape: tuple[int, ...]) -> Format:
    """The type a tensor gets when a model is quantized to the plain type `qtype`: 1-D tensors
    (norms, biases, rope factors) and the matrices llama.cpp keeps in floats (_KEPT_FLOAT) F32; a
    matrix `qtype`, or its fallback."""
    if len(shape) != 2 or ggml_dims(shape) < 2 or name.endswith(_KEPT_FLOAT):
        return get_format("F32")
    return fallback(get_format(qtype), int(shape[1]))


def training_type(qtype, shape: tuple[int, ...], name: str = "") -> Format:
    """The type safetensors tensor `name` gets when a model is quantized on load to train on it:
    `qtype` as choose_type, or by default Q4_K where its rows are whole 256-wide super-blocks,
    else Q4_1 (32-wide blocks with a float min, so QA-HiRA/QA-LoRA merge exactly), else its fallback (F16 for
    rows of no whole block: Gemma 4's per-layer projection of a width below 32, Gemma 3n's AltUp coefficients)."""
    if qtype is not None or len(shape) != 2 or name.endswith(_KEPT_FLOAT):
        return choose_type(qtype, name, shape)
    return fallback(get_format("Q4_K" if shape[1] % 256 == 0 else "Q4_1"), int(shape[1]))


# ---- INTb-gG in GGUF -------------------------------------------------------------------------

def storage_format(fmt: Format) -> Format:
    """The GGUF type that stores `fmt` exactly (module doc); GGUF types store as themselves."""
    fmt = get_format(fmt)
    if not isinstance(fmt, IntFormat):
        return fmt
    return get_format("Q4_1" if fmt.bits <= 4 else "Q5_1" if fmt.bits == 5 else "F32")


def to_storage(qt: QTensor) -> QTensor:
    """An INTb-gG QTensor as its storage type (storage_format), exactly: every dequantized value
    is unchanged. Q4_1/Q5_1 blocks are built from the INT blocks' codes, each group split into
    G/32 blocks that repeat its fp16 d and m; INT6/INT8 become their F32 values. Other types
    are returned as they are."""
    fmt = qt.format
    store = storage_format(fmt)
    if store is fmt:
        return qt
    if store.name == "F32":
        return ops.quantize(ops.dequantize(qt, torch.float32), store)
    n, k = qt.shape
    blocks = qt.raw.detach().to("cpu").numpy().reshape(-1, fmt.block_bytes)
    q = fmt._unpack_codes(blocks[:, 4:]).reshape(-1, 32)
    head = np.repeat(blocks[:, 0:4], fmt.group // 32, axis=0)  # d, m for every 32-block of the group
    if store.name == "Q4_1":
        out = np.concatenate([head, pack_nibbles(q)], axis=1)
    else:
        out = np.concatenate([head, pack_bits(q >> 4), pack_nibbles(q & 15)], axis=1)
    raw = torch.from_numpy(np.ascontiguousarray(out).reshape(-1))
    return QTensor.from_raw(raw, store, (n, k)).to(qt.device)


def logical_types(metadata: dict) -> dict[str, str]:
    """{tensor name: INTb-gG} from a lowtune GGUF's metadata (empty for other files)."""
    out = {}
    for entry in metadata.get(LOGICAL_TYPES_KEY) or []:
        name, _, t = str(entry).partition("=")
        if name and t:
            out[name] = t
    return out


# ---- llama-quantize's recipes ----------------------------------------------------------------

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
    norm, no MoE router and none of _KEPT_FLOAT."""
    return (name.endswith("weight") and ggml_dims(shape) >= 2 and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name and not name.endswith(_KEPT_FLOAT))


@dataclass
class TypePlan:
    """Chooses each tensor's type for one --type of `lowtune quantize`: a llama.cpp recipe with its
    per-tensor choices (llama_tensor_get_type), or INTb-gG for the decoder linears (token_embd and
    output stay F16, as INT2.1 keeps them in fp16). `index` numbers the attn_v and ffn_down
    tensors as llama-quantize's counters do; `counts` holds their totals."""
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
            if not isinstance(fmt, IntFormat):
                raise ValueError(f"--type {fmt.name} is a block type without a recipe; llama.cpp "
                                 f"names its recipes {', '.join(RECIPES)} (or pass pure=True / --pure)")
            self.recipe, self.ftype, self.default = None, None, fmt
        for opt in (self.output_type, self.token_embedding_type):
            if opt is not None:
                get_format(opt)

    @classmethod
    def for_source(cls, qtype: str, metadata: dict, names: list[str], **kw) -> "TypePlan":
        arch = metadata.get("general.architecture", "llama")
        # (a count a layer, PLaMo 2's heads or LFM2's KV heads: layer 0's, as llama.cpp's n_gqa() reads, where
        # 0 KV heads is a convolution's layer)
        heads = _layer0_number(metadata, f"{arch}.attention.head_count", 1) or 1
        kv_key = f"{arch}.attention.head_count_kv"
        if isinstance(metadata.get(kv_key), (list, tuple)):
            kv = _layer0_number(metadata, kv_key, 0)
            n_gqa = heads // kv if kv else 0
        else:
            n_gqa = max(1, heads // max(key_number(metadata, kv_key, heads) or heads, 1))
        plan = cls(qtype, n_gqa=n_gqa, n_layers=key_number(metadata, f"{arch}.block_count", 0),
                   has_output="output.weight" in names, **kw)
        for kind in ("attn_v.weight", "ffn_down", "ffn_gate", "ffn_up"):
            # (llama.cpp counts a fused attn_qkv, Phi-3's or a Qwen3.5 DeltaNet's, as an attn_v)
            ordered = [n for n in llama_cpp_order(names)
                       if kind in n or kind == "attn_v.weight" and "attn_qkv.weight" in n]
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
            if r in ("TQ1_0", "TQ2_0", "Q2_0"):
                return get_format("Q4_K")
            return self.default
        if r in _IQ12_RECIPES:
            return get_format(self._iq12_type(name, r, t, i))
        if "attn_v.weight" in name or "attn_qkv.weight" in name:  # (llama.cpp's attn_v rules take both)
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
        if "attn_v.weight" in name or "attn_qkv.weight" in name:
            return "Q4_K" if self.n_gqa >= 4 else "IQ3_S" if wide else "Q2_K"
        if "ffn_down" in name:
            return ("IQ3_S" if wide else "Q2_K") if i < self.counts["ffn_down"] // 8 else t
        if "attn_output.weight" in name:
            return "IQ2_XXS" if r in ("IQ1_S", "IQ1_M") else "IQ3_S" if wide else t
        return t
