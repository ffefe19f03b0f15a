"""What the tests share: tiny models written through lowtune's own writers (one writer per model
family), random blocks of every type, error measures, and the tiny trainer with its run helpers.

A new family adds its writer beside write_tiny_llama_gguf (same arguments where they apply), so
every test that takes a writer can run on it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowtune import adapters, ops
from lowtune.adapters import adapter_parameters
from lowtune.data import DataStats, Dataset, pack
from lowtune.gguf_io import write_gguf
from lowtune.hf_names import permute_qk_hf_to_gguf
from lowtune.model import LlamaConfig, LlamaModel
from lowtune.qtensor import QTensor
from lowtune.rundir import read_metrics
from lowtune.tokenizer import _bytes_to_unicode

# ---- error measures ------------------------------------------------------------------------------


def max_rel_err(a, b) -> float:
    """max|a − b| / max|b| (float64): how far the worst element is, against the largest one."""
    a, b = a.detach().to("cpu").double(), b.detach().to("cpu").double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def norm_rel_err(a, b) -> float:
    """‖a − b‖ / ‖b‖ (float64): the error as a share of the whole."""
    a, b = a.detach().to("cpu").double(), b.detach().to("cpu").double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check_products_against_float64(qtype: str, n: int, k: int, m: int, rng: np.random.Generator) -> None:
    """lowtune's forward and input gradient on `qtype` blocks of random weights [n, k] against float64
    products of the format's NumPy dequantization, at m rows."""
    from lowtune.formats import get_format
    w = rng.standard_normal((n, k)).astype(np.float32) * np.float32(0.03)
    qt = ops.quantize(torch.from_numpy(w), qtype)
    w64 = get_format(qtype).dequantize(qt.raw.numpy(), k).astype(np.float64)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).requires_grad_()
    y = ops.qmatmul(x, qt)
    assert max_rel_err(y, torch.from_numpy(x.detach().double().numpy() @ w64.T)) < 1e-5
    dy = torch.from_numpy(rng.standard_normal((m, n)).astype(np.float32))
    y.backward(dy)
    dx64 = torch.from_numpy(dy.double().numpy() @ w64)
    assert max_rel_err(x.grad, dx64) < 1e-5
    assert max_rel_err(ops.qmatmul_input_grad(dy, qt), dx64) < 1e-5


def check_cuda_products_match_cpu(qtype: str, n: int, k: int, m: int, rng: np.random.Generator) -> None:
    """On CUDA (whichever path LOWTUNE_CUDA_PATH forces), `qtype`'s dequantization equals the CPU's and
    its forward and input gradient in fp32 and bf16 follow the CPU products on the same blocks."""
    w = rng.standard_normal((n, k)).astype(np.float32) * np.float32(0.05)
    qt = ops.quantize(torch.from_numpy(w), qtype)
    qg = qt.to("cuda")
    assert torch.equal(ops.dequantize(qg, torch.float32).cpu(), ops.dequantize(qt, torch.float32))
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 1e-2)):
        x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(dtype)
        dy = torch.from_numpy(rng.standard_normal((m, n)).astype(np.float32)).to(dtype)
        y_ref, dx_ref = ops.qmatmul(x.float(), qt), ops.qmatmul_input_grad(dy.float(), qt)
        y, dx = ops.qmatmul(x.cuda(), qg), ops.qmatmul_input_grad(dy.cuda(), qg)
        assert y.dtype == dtype and dx.dtype == dtype
        assert max_rel_err(y.float().cpu(), y_ref) < tol, (dtype, "forward")
        assert max_rel_err(dx.float().cpu(), dx_ref) < tol, (dtype, "input grad")


def assert_logits_match_llamacpp(path, tol: float) -> None:
    """lowtune's logits of a GGUF model on a few tokens within tol · max|logit| of llama.cpp's."""
    from llama_cpp import Llama
    from lowtune.loading import load_model
    ids = [5, 17, 99, 200, 33, 7, 8, 120]
    with torch.no_grad():
        ours = load_model(path)(torch.tensor([ids])).double().reshape(len(ids), -1).numpy()
    llm = Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = np.asarray(llm.scores[:len(ids)], np.float64)
    llm.close()
    assert np.abs(ours - theirs).max() < tol * np.abs(theirs).max()


# ---- random blocks -------------------------------------------------------------------------------

# Byte offsets of the fp16 fields (scales, mins) inside one block of each quantized type.
HALF_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
               "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
               "IQ4_NL": (0,), "IQ4_XS": (0,), "IQ3_XXS": (0,), "IQ3_S": (0,), "IQ2_XXS": (0,),
               "IQ2_XS": (0,), "IQ2_S": (0,), "IQ1_S": (0,), "IQ1_M": (), "MXFP4": (), "NVFP4": (),
               "TQ1_0": (52,), "TQ2_0": (64,), "Q1_0": (0,), "Q2_0": (0,)}
# IQ1_M keeps its fp16 d in the top nibbles of the four u16 scale words at this byte offset.
SPLIT_HALF_FIELDS = {"IQ1_M": 48}
# Byte offsets of the E8M0 scale bytes (level unit 2^(e - 128)) inside one block.
E8M0_FIELDS = {"MXFP4": (0,)}
# Byte offsets of the unsigned E4M3 scale bytes (half their value times the level) inside one block.
UE4M3_FIELDS = {"NVFP4": (0, 1, 2, 3)}


def random_halves(nblocks: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """fp16 bits (uint16 [nblocks]) of random sign and magnitude log-uniform in [scale/100, scale]."""
    mag = scale * 10.0 ** rng.uniform(-2, 0, size=nblocks)
    return (mag * rng.choice([-1.0, 1.0], size=nblocks)).astype("<f2").view(np.uint16)


def random_e8m0(nblocks: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """E8M0 bytes (uint8 [nblocks]) whose level unit 2^(e - 128) is a power of two in [scale/256, scale]."""
    return (128 + np.floor(np.log2(scale)) - rng.integers(0, 8, size=nblocks)).astype(np.uint8)


def random_ue4m3(nblocks: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """UE4M3 bytes (uint8 [nblocks]) whose half value is in about [scale/16, scale], random mantissas."""
    top = int(np.floor(np.log2(2 * scale))) + 7  # the exponent field of 2 * scale
    exp = np.clip(top - rng.integers(0, 4, size=nblocks), 1, 14)
    return ((exp << 3) | rng.integers(0, 8, size=nblocks)).astype(np.uint8)


def random_blocks(fmt, n: int, k: int, rng: np.random.Generator, scale: float = 0.05) -> np.ndarray:
    """uint8 [n, row_bytes] of `fmt` blocks: random code bytes, and fp16 scales/mins of random sign
    and magnitude log-uniform in [scale/100, scale] (never inf/nan; E8M0 and UE4M3 scales: about as
    large), so every code pattern of the format is exercised without depending on a
    quantizer."""
    nblocks = n * k // fmt.block_elems
    raw = rng.integers(0, 256, size=(nblocks, fmt.block_bytes), dtype=np.uint8)
    for off in HALF_FIELDS.get(fmt.name, (0, 2)):  # INTb-gG: d, m
        raw[:, off:off + 2] = random_halves(nblocks, scale, rng).view(np.uint8).reshape(-1, 2)
    for off in E8M0_FIELDS.get(fmt.name, ()):
        raw[:, off] = random_e8m0(nblocks, scale, rng)
    for off in UE4M3_FIELDS.get(fmt.name, ()):
        raw[:, off] = random_ue4m3(nblocks, scale, rng)
    if fmt.name in SPLIT_HALF_FIELDS:
        off = SPLIT_HALF_FIELDS[fmt.name]
        d = random_halves(nblocks, scale, rng)[:, None]
        words = np.ascontiguousarray(raw[:, off:off + 8]).view("<u2")
        words = (words & 0x0FFF) | (((d >> (4 * np.arange(4, dtype=np.uint16))) & 0xF) << 12)
        raw[:, off:off + 8] = words.astype("<u2").view(np.uint8)
    return raw.reshape(n, fmt.row_bytes(k))


def quantized(w: torch.Tensor, qtype: str, seed: int = 0) -> QTensor:
    """w [N, K] in `qtype`. lowtune quantizes every type but those ggml quantizes only with an
    importance matrix (IQ2_*, IQ1_*, Format.needs_imatrix): for those, random blocks of the type
    (random_blocks: every code pattern) with their scales set so that the dequantized RMS is
    w's. Checked against gguf-py's dequantization in test_formats / test_iquants."""
    from lowtune.formats import get_format
    fmt = get_format(qtype)
    if not fmt.needs_imatrix:
        return ops.quantize(w, fmt)
    n, k = w.shape

    def blocks(scale):
        return torch.from_numpy(random_blocks(fmt, n, k, np.random.default_rng(seed), scale))

    unit = ops.dequantize(QTensor.from_raw(blocks(1.0), fmt, (n, k)), torch.float32).pow(2).mean().sqrt()
    scale = float(w.pow(2).mean().sqrt() / unit)
    return QTensor.from_raw(blocks(scale), fmt, (n, k))


# ---- a tiny tokenizer ----------------------------------------------------------------------------

SPECIAL = "<|endoftext|>"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_MERGES = ["Ġ t", "h e", "Ġt he", "Ġ c", "a t"]
TINY_TOKENS = list(_bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe", "Ġc", "at", SPECIAL,
                                                    "<|im_start|>", "<|im_end|>"]
TINY_VOCAB = len(TINY_TOKENS)  # 264


def tiny_tokenizer_metadata(chat: bool = True) -> tuple[dict, dict]:
    """GGUF tokenizer metadata (and its types) of a byte-level BPE vocabulary of TINY_VOCAB tokens."""
    from gguf.constants import GGUFValueType
    n = len(TINY_TOKENS)
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": TINY_TOKENS,
          "tokenizer.ggml.token_type": [1] * (n - 3) + [3, 3, 3], "tokenizer.ggml.merges": _MERGES,
          "tokenizer.ggml.bos_token_id": n - 3, "tokenizer.ggml.eos_token_id": n - 3,
          "tokenizer.ggml.add_bos_token": False}
    if chat:
        md["tokenizer.chat_template"] = CHATML
    return md, {"tokenizer.ggml.add_bos_token": GGUFValueType.BOOL}


# ---- tiny models in memory: a Llama with its Hugging Face-layout weights ----------------------------

def tiny_config(n_heads=4, n_kv_heads=2, head_dim=16, dim=64, ffn=96, vocab=101, layers=2, **kw):
    return LlamaConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                       ffn_dim=ffn, head_dim=head_dim, rope_dim=head_dim, norm_eps=1e-5,
                       rope_theta=10000.0, context_length=128, **kw)


def tiny_weights(c: LlamaConfig, seed=0, tied=True):
    """HF-layout float weights {hf_name: tensor}."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=None: torch.randn(*s, generator=g) * (scale or s[-1] ** -0.5)
    w = {"embed": r(c.vocab_size, c.dim, scale=1.0), "norm": 1 + 0.1 * r(c.dim, scale=1.0)}
    if not tied:
        w["lm_head"] = r(c.vocab_size, c.dim)
    for i in range(c.n_layers):
        w[f"{i}.q"] = r(c.n_heads * c.head_dim, c.dim)
        w[f"{i}.k"] = r(c.n_kv_heads * c.head_dim, c.dim)
        w[f"{i}.v"] = r(c.n_kv_heads * c.head_dim, c.dim)
        w[f"{i}.o"] = r(c.dim, c.n_heads * c.head_dim)
        w[f"{i}.gate"] = r(c.ffn_dim, c.dim)
        w[f"{i}.up"] = r(c.ffn_dim, c.dim)
        w[f"{i}.down"] = r(c.dim, c.ffn_dim)
        w[f"{i}.ln1"] = 1 + 0.1 * r(c.dim, scale=1.0)
        w[f"{i}.ln2"] = 1 + 0.1 * r(c.dim, scale=1.0)
    return w


def gguf_weights(c: LlamaConfig, hf: dict, qtype="F32") -> dict:
    """The same weights under GGUF names, q/k rows permuted, matrices packed as `qtype`."""
    pack = lambda t: ops.quantize(t, qtype)
    out = {"token_embd.weight": pack(hf["embed"]), "output_norm.weight": hf["norm"]}
    if "lm_head" in hf:
        out["output.weight"] = pack(hf["lm_head"])
    for i in range(c.n_layers):
        p = f"blk.{i}."
        out[p + "attn_q.weight"] = pack(permute_qk_hf_to_gguf(hf[f"{i}.q"], c.n_heads))
        out[p + "attn_k.weight"] = pack(permute_qk_hf_to_gguf(hf[f"{i}.k"], c.n_kv_heads))
        for ours, theirs in [("attn_v", "v"), ("attn_output", "o"), ("ffn_gate", "gate"),
                             ("ffn_up", "up"), ("ffn_down", "down")]:
            out[p + ours + ".weight"] = pack(hf[f"{i}.{theirs}"])
        out[p + "attn_norm.weight"] = hf[f"{i}.ln1"]
        out[p + "ffn_norm.weight"] = hf[f"{i}.ln2"]
    return out


def tiny_model(qtype="F32", tied=True, seed=0, dtype=torch.float32, device="cpu", **cfg):
    c = tiny_config(**cfg)
    hf = tiny_weights(c, seed, tied)
    w = {k: (v.to(device) if isinstance(v, (torch.Tensor, QTensor)) else v)
         for k, v in gguf_weights(c, hf, qtype).items()}
    return LlamaModel(c, w, dtype).eval(), hf


def rand_ids(b, t, vocab=101, seed=1):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


# ---- tiny models, one writer per family ----------------------------------------------------------

def _type_of(qtype, name: str) -> str:
    return qtype(name) if callable(qtype) else qtype


def write_tiny_llama_gguf(path, qtype: str | Callable[[str], str] = "F32", *, dim: int = 64, ffn: int = 96,
                          layers: int = 2, heads: int = 4, kv_heads: int = 2, tied: bool = True, seed: int = 0,
                          scale: float = 0.08, emb_scale: float = 1.0, output_scale: float | None = None,
                          embed_type: str | None = None, output_type: str | None = None, chat: bool = True,
                          metadata: dict | None = None, metadata_types: dict | None = None) -> Path:
    """A random Llama GGUF with a byte-level BPE tokenizer (TINY_VOCAB tokens), written with
    lowtune's writer: decoder matrices in `qtype` (a type, or name -> type), token_embd in
    embed_type and the untied head in output_type (both default to qtype), norms F32. Any type
    is taken (helpers.quantized: IQ2_*/IQ1_* as random blocks of the weights' RMS)."""
    g = torch.Generator().manual_seed(seed)
    tmd, ttypes = tiny_tokenizer_metadata(chat)
    hd = dim // heads
    md = {"general.architecture": "llama", "general.name": "tiny", "llama.context_length": 256,
          "llama.embedding_length": dim, "llama.block_count": layers, "llama.feed_forward_length": ffn,
          "llama.attention.head_count": heads, "llama.attention.head_count_kv": kv_heads,
          "llama.rope.dimension_count": hd, "llama.rope.freq_base": 10000.0,
          "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": TINY_VOCAB, **tmd,
          **(metadata or {})}

    def mat(name, n, k, s=scale, qt=None):
        w = torch.randn(n, k, generator=g) * s
        t = _type_of(qt or qtype, name)
        return name, (w if t == "F32" else quantized(w, t, seed=seed + zlib.crc32(name.encode())))

    def norm(name, n):
        return name, 1.0 + 0.1 * torch.randn(n, generator=g)

    tensors = [mat("token_embd.weight", TINY_VOCAB, dim, emb_scale, embed_type)]
    for i in range(layers):
        p = f"blk.{i}."
        tensors += [norm(p + "attn_norm.weight", dim), mat(p + "attn_q.weight", heads * hd, dim),
                    mat(p + "attn_k.weight", kv_heads * hd, dim), mat(p + "attn_v.weight", kv_heads * hd, dim),
                    mat(p + "attn_output.weight", dim, heads * hd), norm(p + "ffn_norm.weight", dim),
                    mat(p + "ffn_gate.weight", ffn, dim), mat(p + "ffn_up.weight", ffn, dim),
                    mat(p + "ffn_down.weight", dim, ffn)]
    tensors.append(norm("output_norm.weight", dim))
    if not tied:
        tensors.append(mat("output.weight", TINY_VOCAB, dim, output_scale or scale, output_type))
    write_gguf(path, md, tensors, {**ttypes, **(metadata_types or {})})
    return Path(path)


def train_bpe_tokenizer(d: Path, text: str, vocab: int = 320) -> int:
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json) trained on `text`, in HF layout;
    returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                         "add_bos_token": False}))
    return tok.get_vocab_size()


def write_tiny_llama_hf(d: Path, text: str, *, hidden: int = 64, ffn: int = 96, layers: int = 2, heads: int = 4,
                        kv_heads: int = 2, tied: bool = False, shards: int = 1, seed: int = 0,
                        scale: float = 0.15) -> tuple[dict, dict]:
    """A random Llama in Hugging Face layout in directory `d`: config.json, `shards` safetensors
    files (bf16 matrices, fp32 norms, a rotary buffer GGUF does not keep) and a BPE tokenizer
    trained on `text`. Returns (config, {HF name: fp32 weight})."""
    from safetensors.torch import save_file
    d.mkdir(parents=True, exist_ok=True)
    vocab = train_bpe_tokenizer(d, text)
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden,
               intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv_heads, rms_norm_eps=1e-5, rope_theta=10000.0,
               max_position_embeddings=256, tie_word_embeddings=tied, vocab_size=vocab)
    (d / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(seed)
    hd = hidden // heads

    def w(*shape, s=scale):
        return (torch.randn(*shape, generator=g) * s).to(torch.bfloat16)

    def norm():
        return 1 + 0.1 * torch.randn(hidden, generator=g)

    parts = [{} for _ in range(shards)]
    parts[0].update({"model.embed_tokens.weight": w(vocab, hidden, s=1.0), "model.norm.weight": norm()})
    if not tied:
        parts[0]["lm_head.weight"] = w(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        parts[i % shards].update({
            p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
            p + "self_attn.q_proj.weight": w(hidden, hidden), p + "self_attn.k_proj.weight": w(kv_heads * hd, hidden),
            p + "self_attn.v_proj.weight": w(kv_heads * hd, hidden), p + "self_attn.o_proj.weight": w(hidden, hidden),
            p + "mlp.gate_proj.weight": w(ffn, hidden), p + "mlp.up_proj.weight": w(ffn, hidden),
            p + "mlp.down_proj.weight": w(hidden, ffn), p + "self_attn.rotary_emb.inv_freq": torch.ones(hd // 2)})
    for j, part in enumerate(parts):
        name = "model.safetensors" if shards == 1 else f"model-{j + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(d / name))
    return cfg, {k: v.float() for part in parts for k, v in part.items()}


# ---- the tiny trainer and its runs -------------------------------------------------------------

VOCAB = 48


class TinyLM(nn.Module):
    """A bigram language model with a frozen base and a trainable low-rank adapter (with
    dropout, so that training consumes random numbers like the real adapters do)."""

    def __init__(self, dim: int = 24, rank: int = 4, dropout: float = 0.1, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Parameter(torch.randn(VOCAB, dim, generator=g), requires_grad=False)
        self.head = nn.Parameter(torch.randn(VOCAB, dim, generator=g) / dim**0.5, requires_grad=False)
        self.lora_a = nn.Parameter(torch.randn(rank, dim, generator=g) / dim**0.5)
        self.lora_b = nn.Parameter(torch.zeros(dim, rank))
        self.drop = nn.Dropout(dropout)

    def loss(self, ids, labels=None, reduction="mean"):
        labels = ids if labels is None else labels
        h = self.emb[ids]
        h = h + self.drop(h) @ self.lora_a.T @ self.lora_b.T * 2.0
        logits = (h @ self.head.T)[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                               ignore_index=-100, reduction=reduction)


def markov_dataset(n_tokens: int = 4000, seq_len: int = 32, seed: int = 0) -> Dataset:
    """A learnable stream: each token mostly follows from the previous one."""
    rng = np.random.default_rng(seed)
    ids = [1]
    for _ in range(n_tokens - 1):
        ids.append(int((ids[-1] * 7 + 3) % VOCAB) if rng.random() < 0.8 else int(rng.integers(VOCAB)))
    cut = int(n_tokens * 0.9)
    return Dataset(pack(ids[:cut], seq_len), pack(ids[cut:], seq_len), DataStats("text"))


def save_tiny_adapter(model, run_dir: Path) -> Path:
    from lowtune import checkpoint as ckpt
    path = Path(run_dir) / "adapter.pt"
    ckpt.atomic_torch_save({n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, path)
    return path


CURVE_KEYS = ("step", "loss", "lr", "grad_norm", "tokens", "eval_loss", "eval_ppl", "eval_tokens")


def curve(rows_or_run, keys=CURVE_KEYS) -> list[dict]:
    """The comparable part of a run's metrics: rows, or a run directory's metrics.jsonl."""
    rows = rows_or_run
    if isinstance(rows_or_run, (str, os.PathLike)):
        p = Path(rows_or_run)
        rows = read_metrics(p / "metrics.jsonl" if p.is_dir() or not p.suffix else p)
    return [{k: r[k] for k in keys if k in r} for r in rows]


def kill_after_step(p: subprocess.Popen, metrics: Path, step: int, timeout: float = 120,
                    kill: Callable[[subprocess.Popen], object] | None = None) -> None:
    """Kill a training process (`kill`: default SIGKILL to it alone) once it has logged `step`,
    wherever it then is: training, evaluating or writing a checkpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            err = p.stderr.read().decode(errors="replace")[-3000:] if p.stderr else ""
            pytest.fail(f"the run ended (rc {p.returncode}) before step {step}: {err}")
        if any(r.get("step", -1) >= step for r in read_metrics(metrics)):
            (kill or _sigkill)(p)
            return
        time.sleep(0.005)
    (kill or _sigkill)(p)
    pytest.fail(f"the run did not reach step {step} in {timeout} s")


def _sigkill(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    p.communicate()


def llamacpp_greedy(llm, prompt_ids, n: int) -> list[int]:
    """llama.cpp's first n greedy tokens after prompt_ids (llama_cpp.Llama `llm`)."""
    llm.reset()
    out = []
    for tok in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


def compiled_decoder_steps(model, ids: torch.Tensor, prefill: int, max_len: int | None = None):
    """(steps, the decoder's cache, the model's cache): steps [(the compiled CPU decoder's logits,
    the model's own step's)] for each token of ids [1, T] after the first `prefill`, each side
    continuing its cache of max_len (default T) positions that took the prefill; steps is None
    where lowtune.generate.cpu_decoder does not apply."""
    from lowtune.generate import cpu_decoder
    max_len = ids.shape[1] if max_len is None else max_len
    ours, theirs = model.new_cache(1, max_len), model.new_cache(1, max_len)
    with torch.no_grad():
        model(ids[:, :prefill], ours)
        model(ids[:, :prefill], theirs)
        step = cpu_decoder(model, ours)
        if step is None:
            return None, ours, theirs
        return [(step(int(ids[0, t])).clone(), model(ids[:, t:t + 1], theirs)[0, -1])
                for t in range(prefill, ids.shape[1])], ours, theirs


def resident_and_streamed(make: Callable[[], nn.Module], device, streamed: list[int] | None = None, **stream_kw):
    """(resident, streaming, plan): two models from make(), one whole on `device` with its layers
    checkpointed (as streamed layers run), the other streaming layers `streamed` (default: every
    layer) to `device`."""
    from lowtune.streaming import stream_model
    resident = make().to(device)
    resident.gradient_checkpointing = True
    streaming = make()
    if streamed is None:
        streamed = list(range(streaming.config.n_layers))
    plan = stream_model(streaming, device, streamed=streamed, **stream_kw)
    return resident, streaming, plan


def fill_adapters(model, generator: torch.Generator, std: float = 0.05) -> None:
    """Every adapter matrix of `model` drawn from N(0, std²) with `generator`, so that every
    gradient path carries signal (fresh adapters have B = 0)."""
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=generator) * std)


def with_filled_lora(model):
    """`model` with LoRA (rank 4) on its default targets, only the adapters trainable, and their
    matrices filled (fill_adapters), as the streamed-against-resident tests compare it."""
    adapters.apply_adapters(model, adapters.AdapterConfig(method="lora", rank=4, alpha=8, seed=1))
    adapters.mark_only_adapters_trainable(model)
    fill_adapters(model, torch.Generator().manual_seed(3))
    return model
