"""HF Llama checkpoints -> GGUF names, q/k permutation, quantization on load, metadata; end to end
against llama.cpp. The checkpoint is a tiny random Llama written on the fly (no transformers needed)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import lowtune
from lowtune import hf_names
from lowtune.gguf_io import GGUFFile, write_gguf
from lowtune.hf_names import permute_qk_gguf_to_hf, permute_qk_hf_to_gguf
from lowtune.loading import open_base
from lowtune.recipes import choose_type, training_type
from lowtune.safetensors_io import HFCheckpoint

from helpers import write_tiny_llama_hf


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, botchan_text):
    """config.json + two safetensors shards (bf16 linears, fp32 norms) + tokenizer.json."""
    d = tmp_path_factory.mktemp("tiny_llama")
    cfg, weights = write_tiny_llama_hf(d, botchan_text[:40000], shards=2)
    return d, cfg, weights


def test_names_and_config_keys_round_trip():
    """One table each: every GGUF name and config key maps to HF and back to itself."""
    for name in ("token_embd.weight", "output.weight", "output_norm.weight", "blk.7.attn_q.weight",
                 "blk.0.attn_q.bias", "blk.3.ffn_down.weight", "blk.1.ffn_norm.weight"):
        assert hf_names.gguf_name(hf_names.hf_name(name)) == name
    assert hf_names.hf_name("blk.2.attn_output.weight") == "model.layers.2.self_attn.o_proj.weight"
    assert hf_names.hf_name("rope_freqs.weight") is None
    assert hf_names.gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    with pytest.raises(ValueError, match="unknown tensor"):
        hf_names.gguf_name("transformer.h.0.attn.c_attn.weight")
    from lowtune.model import LlamaConfig
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                  rope_theta=500000.0, max_position_embeddings=128, vocab_size=300)
    md, _ = hf_names.metadata_from_hf_config(config)
    back = hf_names.hf_config(LlamaConfig.from_gguf_metadata(md), md, tied=False, torch_dtype="bfloat16")
    assert {k: back[k] for k in config} == config


# ---- permutation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, n_head", [((64, 48), 4), ((32, 48), 2), ((64,), 4), ((64, 8), 8), ((576, 576), 9)])
def test_permute_round_trip(shape, n_head):
    w = torch.randn(*shape)
    p = permute_qk_hf_to_gguf(w, n_head)
    assert not torch.equal(p, w)
    assert torch.equal(permute_qk_gguf_to_hf(p, n_head), w)
    assert torch.equal(permute_qk_hf_to_gguf(permute_qk_gguf_to_hf(w, n_head), n_head), w)
    d = shape[0] // n_head
    # GGUF row h*d + j is HF row h*d + j//2 + (j%2)*d/2
    for h in range(n_head):
        for j in range(d):
            assert torch.equal(p[h * d + j], w[h * d + j // 2 + (j % 2) * (d // 2)])
    with pytest.raises(ValueError, match="heads"):
        permute_qk_hf_to_gguf(torch.randn(30, 4), 4)


def _rope_hf(x, pos, theta=10000.0):           # rotate-half: dims i and i + d/2 rotate together
    d = x.shape[-1]
    ang = pos[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    return x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * sin


def _rope_ggml(x, pos, theta=10000.0):         # ggml "NORM": dims 2i and 2i+1 rotate together
    d = x.shape[-1]
    ang = pos[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)[None]
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * ang.cos() - b * ang.sin()
    out[..., 1::2] = a * ang.sin() + b * ang.cos()
    return out


def test_permutation_turns_hf_rope_into_ggml_rope():
    n_head, d, k = 3, 16, 24
    wq = torch.randn(n_head * d, k, dtype=torch.float64)
    x = torch.randn(5, k, dtype=torch.float64)
    pos = torch.arange(5, dtype=torch.float64)
    q_hf = _rope_hf((x @ wq.T).reshape(5, n_head, d).transpose(0, 1), pos)
    q_gg = _rope_ggml((x @ permute_qk_hf_to_gguf(wq, n_head).T).reshape(5, n_head, d).transpose(0, 1), pos)
    # the same rotated vectors, only with their dims in GGUF order
    assert torch.allclose(permute_qk_gguf_to_hf(q_gg.transpose(0, 1).reshape(5, -1).T, n_head).T,
                          q_hf.transpose(0, 1).reshape(5, -1), atol=1e-12)


# ---- loading -------------------------------------------------------------------------------------

def test_load_float_checkpoint(hf_dir):
    d, cfg, ref = hf_dir
    ck = HFCheckpoint(d)
    m = ck.metadata
    assert ck.architecture == "llama" and m["general.file_type"] == 32  # bf16 linears
    assert (m["llama.block_count"], m["llama.embedding_length"], m["llama.feed_forward_length"]) == (2, 64, 96)
    assert (m["llama.attention.head_count"], m["llama.attention.head_count_kv"]) == (4, 2)
    assert m["llama.rope.dimension_count"] == 16 and m["llama.vocab_size"] == cfg["vocab_size"]
    assert abs(m["llama.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-12
    assert m["tokenizer.ggml.model"] == "gpt2" and len(m["tokenizer.ggml.tokens"]) == cfg["vocab_size"]
    assert len(ck.tensor_infos) == 2 * 9 + 3
    assert list(ck.tensor_infos)[0] == "token_embd.weight"
    q = ck.tensor("blk.1.attn_q.weight")
    assert q.dtype == torch.bfloat16 and q.shape == (64, 64)
    assert torch.equal(q.float(), permute_qk_hf_to_gguf(ref["model.layers.1.self_attn.q_proj.weight"], 4))
    k = ck.tensor("blk.0.attn_k.weight")
    assert torch.equal(k.float(), permute_qk_hf_to_gguf(ref["model.layers.0.self_attn.k_proj.weight"], 2))
    assert torch.equal(ck.tensor("blk.0.attn_v.weight").float(), ref["model.layers.0.self_attn.v_proj.weight"])
    assert ck.tensor("output_norm.weight").dtype == torch.float32
    assert ck.qtensor("blk.0.ffn_up.weight").type == "BF16"


@pytest.mark.parametrize("qtype, expect", [("Q8_0", {"Q8_0"}), ("Q4_K", {"Q5_0"}), ("INT4-g128", {"INT4-g64", "INT4-g32"}),
                                           (None, {"Q4_1"})])
def test_load_quantized_checkpoint(hf_dir, qtype, expect):
    d, cfg, ref = hf_dir
    ck = open_base(d, qtype)   # quantized on load, as finetune trains on it
    quant = {i.type_name for i in ck.tensor_infos.values() if len(i.shape) == 2}
    assert quant == expect
    assert {i.type_name for i in ck.tensor_infos.values() if len(i.shape) == 1} == {"F32"}
    q = ck.tensor("blk.0.attn_q.weight")
    assert isinstance(q, lowtune.QTensor)
    want = permute_qk_hf_to_gguf(ref["model.layers.0.self_attn.q_proj.weight"], 4)
    assert torch.equal(q.raw, lowtune.quantize(want, q.type).raw)


def test_choose_type_fallbacks():
    assert training_type(None, (8, 1536)).name == "Q4_K" and training_type(None, (8, 96)).name == "Q4_1"
    assert training_type("Q4_K", (8, 96)).name == "Q5_0" and training_type(None, (96,)).name == "F32"
    assert training_type(None, (8, 16)).name == "F16"  # (rows of no whole block: Gemma 4's per-layer projection)
    assert choose_type("Q4_K", "w", (8, 1536)).name == "Q4_K"
    assert choose_type("Q4_K", "w", (8, 576)).name == "Q5_0"
    assert choose_type("Q6_K", "w", (8, 576)).name == "Q8_0"
    assert choose_type("INT3-g128", "w", (8, 576)).name == "INT3-g64"
    assert [choose_type(t, "w", (8, 544)).name for t in ("TQ1_0", "TQ2_0", "Q2_0", "NVFP4", "Q1_0")] == \
        ["Q4_0", "Q4_0", "Q4_0", "F16", "F16"]
    assert choose_type("Q4_0", "w", (8, 20)).name == "F16"
    assert choose_type("Q4_0", "norm", (576,)).name == "F32"


def test_tied_embeddings_and_bad_dirs(hf_dir, tmp_path):
    d, cfg, _ = hf_dir
    tied = tmp_path / "tied"
    tied.mkdir()
    for f in d.iterdir():
        (tied / f.name).write_bytes(f.read_bytes())
    (tied / "config.json").write_text(json.dumps(dict(cfg, tie_word_embeddings=True)))
    assert "output.weight" not in HFCheckpoint(tied).tensor_infos
    with pytest.raises(ValueError, match="config.json"):
        HFCheckpoint(tmp_path / "nowhere")
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gptj"}))
    with pytest.raises(ValueError, match="llama"):
        HFCheckpoint(tmp_path / "gpt")


def test_write_gguf_and_read_back(hf_dir, tmp_path):
    d, _, _ = hf_dir
    ck = open_base(d, "Q8_0")
    out = tmp_path / "tiny.gguf"
    write_gguf(out, ck.metadata, ((n, ck.tensor(n)) for n in ck.tensor_infos), ck.metadata_types)
    with GGUFFile(out) as f:
        assert f.metadata["general.file_type"] == 7 and f.metadata["general.quantization_version"] == 2
        assert f.metadata_types["llama.block_count"] == ck.metadata_types["llama.block_count"]
        for k, v in ck.metadata.items():
            assert f.metadata[k] == (pytest.approx(v) if isinstance(v, float) else v), k
        assert list(f.tensor_infos) == list(ck.tensor_infos)
        for n in f:
            a, b = f.tensor(n), ck.tensor(n)
            assert torch.equal(a.raw, b.raw) if isinstance(a, lowtune.QTensor) else torch.equal(a, b)


def _hf_forward(W: dict, cfg: dict, ids: list[int]) -> torch.Tensor:
    """The HF Llama forward (rotate-half RoPE, GQA, SwiGLU) in float64 on the original weights."""
    W = {k: v.double() for k, v in W.items()}
    nh, nkv, h = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    hd, T, eps = h // nh, len(ids), cfg["rms_norm_eps"]

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    x = W["model.embed_tokens.weight"][ids]
    pos = torch.arange(T, dtype=torch.float64)
    mask = torch.full((T, T), -math.inf, dtype=torch.float64).triu(1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = norm(x, W[p + "input_layernorm.weight"])
        q = _rope_hf((a @ W[p + "self_attn.q_proj.weight"].T).reshape(T, nh, hd).transpose(0, 1), pos)
        k = _rope_hf((a @ W[p + "self_attn.k_proj.weight"].T).reshape(T, nkv, hd).transpose(0, 1), pos)
        v = (a @ W[p + "self_attn.v_proj.weight"].T).reshape(T, nkv, hd).transpose(0, 1)
        k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd) + mask, -1) @ v
        x = x + att.transpose(0, 1).reshape(T, h) @ W[p + "self_attn.o_proj.weight"].T
        a = norm(x, W[p + "post_attention_layernorm.weight"])
        x = x + (torch.nn.functional.silu(a @ W[p + "mlp.gate_proj.weight"].T) * (a @ W[p + "mlp.up_proj.weight"].T)) \
            @ W[p + "mlp.down_proj.weight"].T
    return norm(x, W["model.norm.weight"]) @ W["lm_head.weight"].T


@pytest.mark.llamacpp
def test_llama_cpp_runs_the_converted_checkpoint_like_hf(hf_dir, tmp_path):
    """llama.cpp's logits on our F32 GGUF equal the HF-convention forward on the original weights:
    names, metadata, q/k permutation and tokenizer metadata all have to be right."""
    import llama_cpp
    d, cfg, ref = hf_dir
    ck = open_base(d, "F32")
    out = tmp_path / "tiny-f32.gguf"
    write_gguf(out, ck.metadata, ((n, ck.tensor(n)) for n in ck.tensor_infos), ck.metadata_types)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=2)
    ids = llm.tokenize(b"It was a fine day, and I was a boy of", add_bos=False)
    assert len(ids) >= 5
    llm.eval(ids)
    got = torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float64))
    want = _hf_forward(ref, cfg, ids)
    assert (got - want).abs().max() < 1e-3 * want.abs().max()
