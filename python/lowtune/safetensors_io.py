"""Hugging Face Llama checkpoints (config.json + *.safetensors) in GGUF's names and order.

    ckpt = load_hf_checkpoint("SmolLM2-135M/", qtype="Q4_K")
    ckpt.metadata["llama.block_count"]        # the same keys a GGUF file of this model would hold
    ckpt.tensor("blk.0.attn_q.weight")        # QTensor [out, in], rows in GGUF's RoPE order
    write_gguf("model.gguf", ckpt.metadata, ckpt.items(), ckpt.metadata_types)

Tensors are read one at a time (safetensors memory-maps the files), converted to float32,
q/k rows permuted from HF's rotate-half RoPE layout to ggml's interleaved one, quantized, and the
float copy dropped: peak host memory is about one float32 tensor plus the quantized model.

The permutation (convert_hf_to_gguf.py's LlamaModel.permute): HF keeps the two halves of each head's
rotary pairs apart (dims i and i + d/2 rotate together); ggml rotates adjacent dims (2i, 2i + 1). So row
h·d + j of the GGUF weight is HF row h·d + (j // 2) + (j % 2)·d/2. k uses the KV head count.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from gguf.constants import GGUFValueType

from .formats import Format, get_format
from .gguf_io import TensorInfo, _MAIN_FTYPE
from .qtensor import QTensor

_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_SKIP = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")

# When a row length is not a multiple of a K-quant's 256-wide blocks, llama-quantize falls back
# to a legacy type; we do the same (and to smaller groups for INTb-gG).
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def permute_qk_hf_to_gguf(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of an HF q_proj/k_proj weight [n_head·d, ...] (or bias [n_head·d], or LoRA B [n_head·d, r])
    into GGUF order. Use n_head_kv for k."""
    rows = w.shape[0]
    if rows % n_head or (rows // n_head) % 2:
        raise ValueError(f"cannot permute {tuple(w.shape)}: {rows} rows are not {n_head} heads of an even size")
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_qk_gguf_to_hf(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of permute_qk_hf_to_gguf."""
    rows = w.shape[0]
    if rows % n_head or (rows // n_head) % 2:
        raise ValueError(f"cannot permute {tuple(w.shape)}: {rows} rows are not {n_head} heads of an even size")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_to_gguf_name(name: str) -> str | None:
    """GGUF name for an HF Llama tensor name; None for buffers that GGUF does not store."""
    if _SKIP.search(name):
        return None
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER:
        return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}"
    raise ValueError(f"unknown tensor {name!r} in a Llama checkpoint (not a Llama model, or an "
                     f"unsupported variant)")


def choose_type(qtype, name: str, shape: tuple[int, ...]) -> Format:
    """The format a tensor gets when the model is quantized to `qtype`: 1-D tensors (norms,
    biases) stay F32; a 2-D weight whose row length the blocks do not divide falls back as
    llama-quantize does (K-quants to legacy types, INTb-g128 to g64 to g32, last F16)."""
    if len(shape) != 2:
        return get_format("F32")
    k = shape[1]
    fmt = get_format(qtype)
    while k % fmt.block_elems:
        m = re.fullmatch(r"INT(\d)-G(\d+)", fmt.name.upper())
        if fmt.name in _FALLBACK:
            fmt = get_format(_FALLBACK[fmt.name])
        elif m and int(m.group(2)) > 32:
            fmt = get_format(f"INT{m.group(1)}-g{int(m.group(2)) // 2}")
        else:
            return get_format("F16")
    return fmt


class HFCheckpoint:
    """A converted checkpoint, shaped like GGUFFile: metadata, metadata_types, tensor_infos,
    tensor(name), qtensor(name), architecture; plus items() for write_gguf."""

    def __init__(self, path: Path, metadata: dict, metadata_types: dict, tensors: dict):
        self.path = str(path)
        self.metadata = metadata
        self.metadata_types = metadata_types
        self.tensors = tensors
        self.tensor_infos = {}
        for name, t in tensors.items():
            if isinstance(t, QTensor):
                fmt, shape = t.format, tuple(t.shape)
            else:
                fmt, shape = get_format({torch.float32: "F32", torch.float16: "F16",
                                         torch.bfloat16: "BF16"}[t.dtype]), tuple(t.shape)
            nbytes = t.nbytes if isinstance(t, QTensor) else t.numel() * t.element_size()
            self.tensor_infos[name] = TensorInfo(name=name, type=fmt, shape=shape, ne=tuple(reversed(shape)),
                                                 offset=-1, nbytes=nbytes, type_name=fmt.name,
                                                 type_id=fmt.type_id)

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    def tensor(self, name: str):
        return self.tensors[name]

    def qtensor(self, name: str) -> QTensor:
        t = self.tensors[name]
        if isinstance(t, QTensor):
            return t
        fmt = self.tensor_infos[name].type
        flat = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
        return QTensor.from_raw(flat.contiguous().view(torch.uint8).reshape(-1), fmt, tuple(flat.shape))

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(self.tensors.items())

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def close(self):
        pass


def llama_metadata_from_config(config: dict, name: str = "") -> tuple[dict, dict]:
    """GGUF llama.* and general.* metadata (and their types) from an HF config.json."""
    arch = config.get("model_type", "llama")
    if arch not in ("llama", "mistral") and "LlamaForCausalLM" not in config.get("architectures", []):
        raise ValueError(f"config.json describes a {arch!r} model; lowtune reads Llama-family checkpoints")
    n_head = config["num_attention_heads"]
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // n_head
    U32, F32, STR = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING
    md: dict[str, tuple[Any, Any]] = {
        "general.architecture": ("llama", STR),
        "general.type": ("model", STR),
        "general.name": (name or config.get("_name_or_path") or "model", STR),
        "llama.block_count": (config["num_hidden_layers"], U32),
        "llama.context_length": (config.get("max_position_embeddings", 2048), U32),
        "llama.embedding_length": (hidden, U32),
        "llama.feed_forward_length": (config["intermediate_size"], U32),
        "llama.attention.head_count": (n_head, U32),
        "llama.attention.head_count_kv": (config.get("num_key_value_heads") or n_head, U32),
        "llama.rope.freq_base": (float(config.get("rope_theta", 10000.0)), F32),
        "llama.attention.layer_norm_rms_epsilon": (float(config.get("rms_norm_eps", 1e-6)), F32),
        "llama.vocab_size": (config["vocab_size"], U32),
        "llama.rope.dimension_count": (head_dim, U32),
    }
    if head_dim != hidden // n_head:
        md["llama.attention.key_length"] = (head_dim, U32)
        md["llama.attention.value_length"] = (head_dim, U32)
    rs = config.get("rope_scaling") or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "linear":
        md["llama.rope.scaling.type"] = ("linear", STR)
        md["llama.rope.scaling.factor"] = (float(rs["factor"]), F32)
    elif kind not in (None, "default", "llama3"):
        raise ValueError(f"rope_scaling type {kind!r} is not supported")
    return {k: v for k, (v, _) in md.items()}, {k: t for k, (_, t) in md.items()}


def llama3_rope_factors(config: dict) -> torch.Tensor:
    """rope_freqs.weight [head_dim/2] for Llama-3.1 style rope scaling: per-frequency divisors that
    leave high frequencies alone, divide low ones by `factor` and blend in between."""
    rs = config["rope_scaling"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    base = float(config.get("rope_theta", 10000.0))
    factor = float(rs["factor"])
    low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old_ctx = float(rs.get("original_max_position_embeddings", 8192))
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _safetensors_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [d / f for f in files]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{d}: no *.safetensors files (a HF checkpoint directory needs config.json "
                         f"and model*.safetensors)")
    return files


def load_hf_checkpoint(path, qtype=None, dtype: torch.dtype | None = None) -> HFCheckpoint:
    """Read an HF Llama checkpoint directory and convert it to GGUF names, layout and metadata.

    qtype   None: keep each float tensor as it is stored (or as `dtype`); a type name ("Q4_K",
            "INT4-g64", "F16"...): quantize every 2-D weight (with llama-quantize's fallbacks, see
            choose_type), norms stay F32.
    Returns an HFCheckpoint (GGUFFile-like). Tokenizer metadata is added when tokenizer.json or
    tokenizer.model is present; tied embeddings give no output.weight, as in GGUF.
    """
    from safetensors import safe_open

    from .ops import quantize

    d = Path(path)
    cfg_path = d / "config.json"
    if not cfg_path.exists():
        raise ValueError(f"{d}: no config.json; pass a Hugging Face model directory")
    config = json.loads(cfg_path.read_text())
    metadata, types = llama_metadata_from_config(config, d.name)
    n_head = metadata["llama.attention.head_count"]
    n_head_kv = metadata["llama.attention.head_count_kv"]
    tied = bool(config.get("tie_word_embeddings", False))
    if qtype is not None:
        get_format(qtype)  # fail early on a bad name

    tensors: dict[str, Any] = {}
    for f in _safetensors_files(d):
        with safe_open(str(f), framework="pt") as st:
            for hf_name in st.keys():
                name = hf_to_gguf_name(hf_name)
                if name is None or (tied and name == "output.weight"):
                    continue
                if name in tensors:
                    raise ValueError(f"{f}: tensor {hf_name!r} appears twice in the checkpoint")
                w = st.get_tensor(hf_name)
                if not w.is_floating_point():
                    raise ValueError(f"{f}: tensor {hf_name!r} is {w.dtype}; expected float32/float16/bfloat16")
                if name.startswith("blk.") and (".attn_q." in name or ".attn_k." in name):
                    w = permute_qk_hf_to_gguf(w, n_head if ".attn_q." in name else n_head_kv)
                tensors[name] = _convert(w, name, qtype, dtype, quantize)
                del w
    rs = config.get("rope_scaling") or {}
    if rs.get("rope_type", rs.get("type")) == "llama3":
        tensors["rope_freqs.weight"] = llama3_rope_factors(config)
    missing = [n for n in ("token_embd.weight", "output_norm.weight") if n not in tensors]
    if missing:
        raise ValueError(f"{d}: the checkpoint lacks {missing}")
    # GGUF order: embeddings, then blocks in order, then the head (as convert_hf_to_gguf writes them)
    def key(n):
        m = re.match(r"blk\.(\d+)\.", n)
        return (1, int(m.group(1)), n) if m else ((0, 0, n) if n == "token_embd.weight" else (2, 0, n))
    tensors = {n: tensors[n] for n in sorted(tensors, key=key)}

    if qtype is not None:
        main = get_format(qtype).name
        ftype = _MAIN_FTYPE.get(main)
    else:
        dt = dtype or next((t.dtype for n, t in tensors.items() if t.dim() == 2), torch.float32)
        ftype = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 32}.get(dt)
    if ftype is not None:
        metadata["general.file_type"] = ftype
        types["general.file_type"] = GGUFValueType.UINT32

    if (d / "tokenizer.json").exists() or (d / "tokenizer.model").exists():
        from .tokenizer import tokenizer_metadata_from_dir
        for k, v in tokenizer_metadata_from_dir(d).items():
            metadata[k] = v
    return HFCheckpoint(d, metadata, types, tensors)


def _convert(w: torch.Tensor, name: str, qtype, dtype, quantize):
    if qtype is None:
        return w.to(dtype) if dtype is not None else w
    fmt = choose_type(qtype, name, tuple(w.shape))
    if not fmt.quantized:
        return w.to({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[fmt.name])
    return quantize(w.to(torch.float32), fmt)


__all__ = ["HFCheckpoint", "load_hf_checkpoint", "permute_qk_hf_to_gguf", "permute_qk_gguf_to_hf",
           "hf_to_gguf_name", "choose_type", "llama_metadata_from_config", "llama3_rope_factors"]
