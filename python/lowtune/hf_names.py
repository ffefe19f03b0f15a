"""What Hugging Face calls things, per architecture, in both directions: tensor names, config.json
keys, and the q/k row order. One table each; reading (safetensors_io) and writing (export) use the
same one, so a name or key cannot differ between the two.

    gguf_name("model.layers.3.self_attn.q_proj.weight")   # "blk.3.attn_q.weight"
    hf_name("blk.3.attn_q.weight")                         # "model.layers.3.self_attn.q_proj.weight"
    md, types = metadata_from_hf_config(config)            # GGUF `llama.*` keys from config.json
    config = hf_config(model_config, md, tied, "bfloat16") # config.json from GGUF metadata

A new family adds its entry to TENSOR_NAMES and CONFIG_KEYS (and its own special cases in the two
config functions); `llama` is the one filled today.

The q/k permutation (convert_hf_to_gguf.py's LlamaModel.permute): HF keeps the two halves of each
head's rotary pairs apart (dims i and i + d/2 rotate together); ggml rotates adjacent dims (2i,
2i + 1). So row h·d + j of the GGUF weight is HF row h·d + (j // 2) + (j % 2)·d/2. k uses the KV
head count.
"""
from __future__ import annotations

import math
import re
from typing import Any

from gguf.constants import GGUFValueType

U32, F32, STR = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING

# GGUF blk.N.<layer name>.{weight,bias} <-> HF model.layers.N.<hf name>.{weight,bias}, and the
# tensors outside the layers by full name.
TENSOR_NAMES: dict[str, dict[str, dict[str, str]]] = {
    "llama": {
        "layer": {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
                  "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                  "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                  "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"},
        "global": {"token_embd.weight": "model.embed_tokens.weight",
                   "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"},
    },
}
# GGUF tensors HF does not store (rebuilt from config.json), and HF buffers GGUF does not store.
GGUF_ONLY = ("rope_freqs.weight",)
_HF_ONLY = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")

# GGUF `<arch>.<key>` <-> config.json key, the ModelConfig field holding the resolved value, the
# GGUF type, and config.json's default (None: required).
CONFIG_KEYS: dict[str, list[tuple[str, str, str, Any, Any]]] = {
    "llama": [
        ("block_count", "num_hidden_layers", "n_layers", U32, None),
        ("context_length", "max_position_embeddings", "context_length", U32, 2048),
        ("embedding_length", "hidden_size", "dim", U32, None),
        ("feed_forward_length", "intermediate_size", "ffn_dim", U32, None),
        ("attention.head_count", "num_attention_heads", "n_heads", U32, None),
        ("attention.head_count_kv", "num_key_value_heads", "n_kv_heads", U32, "num_attention_heads"),
        ("rope.freq_base", "rope_theta", "rope_theta", F32, 10000.0),
        ("attention.layer_norm_rms_epsilon", "rms_norm_eps", "norm_eps", F32, 1e-6),
        ("vocab_size", "vocab_size", "vocab_size", U32, None),
    ],
}
_HF_ARCHITECTURES = {"llama": ("LlamaForCausalLM", ("llama", "mistral"))}


def _table(arch: str) -> dict[str, dict[str, str]]:
    if arch not in TENSOR_NAMES:
        raise ValueError(f"no Hugging Face names for architecture {arch!r} (known: {', '.join(TENSOR_NAMES)})")
    return TENSOR_NAMES[arch]


def hf_name(name: str, arch: str = "llama") -> str | None:
    """The HF name of a GGUF tensor; None for tensors HF does not store (rope_freqs)."""
    t = _table(arch)
    if name in t["global"]:
        return t["global"][name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in t["layer"]:
        return f"model.layers.{m.group(1)}.{t['layer'][m.group(2)]}.{m.group(3)}"
    if name in GGUF_ONLY:
        return None
    raise ValueError(f"no Hugging Face name for GGUF tensor {name!r}")


def gguf_name(name: str, arch: str = "llama") -> str | None:
    """The GGUF name of an HF tensor; None for buffers GGUF does not store."""
    if _HF_ONLY.search(name):
        return None
    t = _table(arch)
    for g, h in t["global"].items():
        if h == name:
            return g
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m:
        for g, h in t["layer"].items():
            if h == m.group(2):
                return f"blk.{m.group(1)}.{g}.{m.group(3)}"
    raise ValueError(f"unknown tensor {name!r} in a {arch} checkpoint (not a {arch} model, or an "
                     "unsupported variant)")


# ---- q/k rows ------------------------------------------------------------------------------------

def _check_heads(w, n_head: int) -> int:
    rows = w.shape[0]
    if rows % n_head or (rows // n_head) % 2:
        raise ValueError(f"cannot permute {tuple(w.shape)}: {rows} rows are not {n_head} heads of an even size")
    return rows // n_head // 2


def permute_qk_hf_to_gguf(w, n_head: int):
    """Rows of an HF q_proj/k_proj weight [n_head·d, ...] (or bias [n_head·d], or LoRA B [n_head·d, r])
    into GGUF order. Use n_head_kv for k."""
    half = _check_heads(w, n_head)
    return w.reshape(n_head, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_qk_gguf_to_hf(w, n_head: int):
    """The inverse of permute_qk_hf_to_gguf."""
    half = _check_heads(w, n_head)
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_heads(name: str, metadata: dict) -> int | None:
    """How many heads the rows of GGUF tensor `name` are permuted over (q: heads, k: KV heads),
    or None for tensors in the same row order in both layouts."""
    m = re.fullmatch(r"blk\.\d+\.(attn_q|attn_k)\.(weight|bias)", name)
    if m is None:
        return None
    arch = metadata.get("general.architecture", "llama")
    n_head = int(metadata[f"{arch}.attention.head_count"])
    return n_head if m.group(1) == "attn_q" else int(metadata.get(f"{arch}.attention.head_count_kv", n_head))


def to_hf_rows(name: str, w, metadata: dict):
    """A GGUF tensor's rows (or its LoRA B's) in HF order."""
    heads = rope_heads(name, metadata)
    return w if heads is None else permute_qk_gguf_to_hf(w, heads)


def from_hf_rows(name: str, w, metadata: dict):
    """An HF tensor's rows in GGUF order; `name` is its GGUF name."""
    heads = rope_heads(name, metadata)
    return w if heads is None else permute_qk_hf_to_gguf(w, heads)


# ---- config.json <-> GGUF metadata ---------------------------------------------------------------

def metadata_from_hf_config(config: dict, name: str = "") -> tuple[dict, dict]:
    """GGUF `general.*` and `<arch>.*` metadata (and their GGUF types) from an HF config.json."""
    arch = next((a for a, (cls, types) in _HF_ARCHITECTURES.items()
                 if config.get("model_type", "llama") in types or cls in config.get("architectures", [])), None)
    if arch is None:
        raise ValueError(f"config.json describes a {config.get('model_type')!r} model; lowtune reads "
                         f"{', '.join(t for _, ts in _HF_ARCHITECTURES.values() for t in ts)} checkpoints")
    md: dict[str, tuple[Any, Any]] = {
        "general.architecture": (arch, STR), "general.type": ("model", STR),
        "general.name": (name or config.get("_name_or_path") or "model", STR)}
    for key, hf, _, gtype, default in CONFIG_KEYS[arch]:
        value = config.get(hf)
        if value is None:
            value = config.get(default) if isinstance(default, str) else default
        if value is None:
            raise ValueError(f"config.json lacks {hf!r}, which a {arch} model needs")
        md[f"{arch}.{key}"] = (float(value) if gtype == F32 else int(value), gtype)
    hidden, n_head = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // n_head)
    md[f"{arch}.rope.dimension_count"] = (head_dim, U32)
    if head_dim != hidden // n_head:
        md[f"{arch}.attention.key_length"] = (head_dim, U32)
        md[f"{arch}.attention.value_length"] = (head_dim, U32)
    rs = config.get("rope_scaling") or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "linear":
        md[f"{arch}.rope.scaling.type"] = ("linear", STR)
        md[f"{arch}.rope.scaling.factor"] = (float(rs["factor"]), F32)
    elif kind not in (None, "default", "llama3"):
        raise ValueError(f"rope_scaling type {kind!r} is not supported")
    return {k: v for k, (v, _) in md.items()}, {k: t for k, (_, t) in md.items()}


def _f32(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.9999997e-06)."""
    return float(f"{x:.7g}")


def hf_config(model_config, metadata: dict, tied: bool, torch_dtype: str) -> dict:
    """config.json of a transformers model from GGUF metadata; model_config is the resolved
    ModelConfig of that metadata (defaults filled in)."""
    arch = metadata["general.architecture"]
    c = model_config
    if c.rope_dim != c.head_dim:
        raise ValueError("partial RoPE (rope.dimension_count < head_dim) has no Llama HF config")
    cls, (model_type, *_) = _HF_ARCHITECTURES[arch]
    cfg: dict[str, Any] = {"architectures": [cls], "model_type": model_type}
    for _, hf, attr, gtype, _ in CONFIG_KEYS[arch]:
        v = getattr(c, attr)
        cfg[hf] = _f32(v) if gtype == F32 else int(v)
    cfg.update({
        "head_dim": c.head_dim, "hidden_act": "silu", "tie_word_embeddings": tied, "attention_bias": False,
        "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": 0.02, "pretraining_tp": 1,
        "use_cache": True, "torch_dtype": torch_dtype, "rope_scaling": None})
    if c.rope_linear_scale != 1.0:
        cfg["rope_scaling"] = {"type": "linear", "rope_type": "linear", "factor": _f32(c.rope_linear_scale)}
    for key, tk in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                    ("pad_token_id", "padding_token_id")):
        v = metadata.get(f"tokenizer.ggml.{tk}")
        if v is not None:
            cfg[key] = int(v)
    return cfg


def llama3_rope_factors(config: dict) -> list[float] | None:
    """rope_freqs.weight values [head_dim/2] for Llama-3.1 style rope scaling (per-frequency
    divisors that leave high frequencies alone, divide low ones by `factor` and blend in
    between), or None when config.json asks for no such scaling."""
    rs = config.get("rope_scaling") or {}
    if rs.get("rope_type", rs.get("type")) != "llama3":
        return None
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
    return out
