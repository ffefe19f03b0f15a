"""Every model family lowtune runs, against Hugging Face transformers and llama.cpp.

Tiny random models (tests/family_models.py; built once per session, as transformers builds them
and llama.cpp's converter converts them):
  * lowtune's logits from the GGUF match transformers' fp32 logits within 1e-4 relative, and
    switching off a windowed/capped/long-context feature moves them (so the length and sizes used
    exercise it); so do its logits from the safetensors directory, which, quantized on load, gives
    the converter's tensors in the same blocks;
  * the same GGUF, and llama.cpp's own Q8_0/Q4_0 quantizations of it, give the same perplexity in
    llama-cpp-python and lowtune (0.05 % in F32, 0.5 % quantized: llama.cpp rounds activations to
    8 bits in quantized matmuls), and the same greedy generation, through the KV cache, from a
    prompt rendered with the model's chat template;
  * adapters wrap the seven logical linears of every family (fused views and biased linears
    included) and equal the merged model; layer streaming packs layers with fused views.
The families' tokenizers against llama.cpp's vocab test files. The real Gemma 3 270M is in
test_gemma3_270m.py.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch

from lowtune import adapters, glue_ops, ops
from lowtune.evaluate import perplexity, windows
from lowtune.families import FAMILIES, SUPPORTED, family_of, family_of_hf
from lowtune.generate import generate, generate_text
from lowtune.gguf_io import GGUFFile, write_gguf
from lowtune.loading import open_base
from lowtune.model import (CONV_LINEAR_NAMES, DELTA_LINEAR_NAMES, LINEAR_NAMES, MAMBA_LINEAR_NAMES, NO_ROPE,
                           SSM_LINEAR_NAMES, KVCache, LayerNorm, Model, ModelConfig, NoNorm, QLinear, alibi_slopes,
                           rope_inv_freq, selective_scan)
from lowtune.recipes import is_quantizable
from lowtune.rwkv import rwkv_linear_names
from lowtune.tokenizer import load_tokenizer

from family_models import (BITNET_D, BLOOM_HEADS, CONV_KERNEL, D, F, H, HF_NAMES, HKV, LLAMACPP_NAMES, MINICPM, MLA,
                           MPT_CLIP_QKV, NAMES, PHI3_ORIG_CONTEXT, REMOTE_CODE_NAMES, RWKV_NAMES, SEQ, SSM, V, WINDOW,
                           convert, gguf_of, hf_model, llamacpp, llamacpp_perplexity, rand_ids, random_rwkv_model,
                           randomized, rel_err)
from helpers import (compiled_decoder_steps, fill_adapters, llamacpp_greedy, resident_and_streamed,
                     with_filled_lora)
from test_streaming import assert_trains_alike


@pytest.fixture(scope="session")
def tiny(family_models):
    return family_models


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (llama.cpp keeps its own threads)


# ----------------------------------------------------------------------------------------------
# against transformers


def _no_windows(m):
    for layer in m.layers:
        layer.window = 0


def _no_long_rope(m):
    m.rope_inv_freq_long = None


def _every_pair_rotated(m):
    m.rope_inv_freqs[0] = rope_inv_freq(m.config)


# Length- and magnitude-dependent features: switched off, the logits must move.
SWITCH_OFF = {
    "mistral": [("window", _no_windows)],
    "phi3": [("long RoPE factors", _no_long_rope)],
    "phi4": [("long RoPE factors", _no_long_rope)],
    "gemma2": [("windows", _no_windows), ("attention soft-cap", lambda m: setattr(m.config, "attn_softcap", 0.0)),
               ("final soft-cap", lambda m: setattr(m.config, "final_softcap", 0.0))],
    "gemma3": [("windows", _no_windows), ("final soft-cap", lambda m: setattr(m.config, "final_softcap", 0.0))],
    "gemma3n": [("windows", _no_windows), ("sparse FFN gates", lambda m: [setattr(layer, "sparsity_std", None)
                                                                       for layer in m.layers])],
    "gemma4": [("windows", _no_windows), ("final soft-cap", lambda m: setattr(m.config, "final_softcap", 0.0)),
               ("layer output scales", lambda m: [setattr(layer, "layer_output_scale", None) for layer in m.layers]),
               ("per-layer inputs", lambda m: setattr(m.config, "per_layer_dim", 0)),
               ("the global layers' RoPE on a quarter of each head (rope_freqs)", _every_pair_rotated)],
    "llama": [("biases", lambda m: [setattr(l, "bias", None) for l in m.modules() if isinstance(l, QLinear)])],
    "command-r": [("logit scale", lambda m: setattr(m.config, "logit_scale", 1.0))],
    "cohere2": [("windows", _no_windows),
                ("global layers without RoPE", lambda m: [setattr(layer, "rope_kind", 0) for layer in m.layers])],
    "exaone4": [("windows", _no_windows),
                ("global layers without RoPE", lambda m: [setattr(layer, "rope_kind", 0) for layer in m.layers])],
    "olmo3": [("windows", _no_windows),
              ("sliding layers' plain RoPE", lambda m: [setattr(layer, "rope_kind", 0) for layer in m.layers])],
    "mistral3": [("attention temperature", lambda m: setattr(m.config, "attn_temperature", 0.0))],
    "smollm3": [("NoPE layer", lambda m: [setattr(layer, "rope_kind", 0) for layer in m.layers])],
    "granite": [("residual scale", lambda m: setattr(m.config, "residual_scale", 1.0)),
                ("logit scale", lambda m: setattr(m.config, "logit_scale", 1.0)),
                ("query scale", lambda m: setattr(m.config, "attn_scale", 0.0))],
    "olmo": [("q/k/v clipping", lambda m: setattr(m.config, "clamp_qkv", 0.0))],
    "minicpm3": [("residual scale", lambda m: setattr(m.config, "residual_scale", 1.0)),
                 ("logit scale", lambda m: setattr(m.config, "logit_scale", 1.0))],
    "nemotron": [("linear RoPE scaling", lambda m: setattr(m, "rope_inv_freq", rope_inv_freq(
        dataclasses.replace(m.config, rope_linear_scale=1.0))[None]))],
    "apertus": [("each layer's own xIELU scalars",
                 lambda m: [layer.xielu.copy_(m.layers[0].xielu) for layer in m.layers])],
    "qwen2": [("biases", lambda m: [setattr(l, "bias", None) for l in m.modules() if isinstance(l, QLinear)]),
              ("YaRN's magnitude", lambda m: setattr(m.config, "rope_attn_factor", 1.0)),
              ("YaRN's speeds", lambda m: setattr(m, "rope_inv_freq", rope_inv_freq(
                  dataclasses.replace(m.config, rope_yarn_factor=0.0))[None]))],
    "bitnet": [("attention's sub-norm", lambda m: [setattr(layer, "attn_sub_norm", NoNorm()) for layer in m.layers]),
               ("the FFN's sub-norm", lambda m: [setattr(layer, "ffn_sub_norm", NoNorm()) for layer in m.layers])],
    "gpt2": [("learned positions", lambda m: setattr(m, "position_embd", None))],
    "starcoder": [("learned positions", lambda m: setattr(m, "position_embd", None))],
    "mpt": [("ALiBi", lambda m: [setattr(layer, "alibi_slopes", None) for layer in m.layers]),
            ("q/k/v clamped", lambda m: setattr(m.config, "clamp_qkv", 0.0))],
    "bloom": [("ALiBi", lambda m: [setattr(layer, "alibi_slopes", None) for layer in m.layers]),
              ("the embeddings' norm", lambda m: setattr(m, "token_embd_norm", None))],
}


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(tiny, name):
    ids = rand_ids(2, SEQ)
    with torch.no_grad():
        want = hf_model(name)(ids).logits
    assert_logits_and_what_matters(tiny[name].gguf, ids, want, SWITCH_OFF.get(name, []),
                                   f"{name}: logits vs transformers")


def assert_logits_and_what_matters(path, ids, want, switch_offs, label: str) -> None:
    """The converted file's logits on ids in lowtune are `want` (relative error under 1e-4), and leave it
    with each of switch_offs' parts switched off: each part matters at this size."""
    with torch.no_grad():
        got = Model.from_gguf(path)(ids)
        print(f"{label}, relative error {rel_err(got, want):.2e}")
        assert rel_err(got, want) < 1e-4
        for what, switch_off in switch_offs:
            model = Model.from_gguf(path)
            switch_off(model)
            assert rel_err(model(ids), want) > 1e-3, f"{what} does not matter at this size"


# what sets each remote-code family apart from Llama at this size (switched off, its logits leave llama.cpp's)
NO_QKV_BIAS = ("the q/k/v biases", lambda m: [setattr(getattr(layer, n), "bias", None) for layer in m.layers
                                              for n in ("attn_q", "attn_k", "attn_v")])
NO_QK_NORMS = ("the q/k norms", lambda m: [setattr(layer, n, NoNorm()) for layer in m.layers
                                          for n in ("attn_q_norm", "attn_k_norm")])
LLAMA3_ROPE_FREQS = ("Llama 3's rope_freqs", lambda m: setattr(m, "rope_inv_freq", rope_inv_freq(m.config)[None]))
REMOTE_CODE_SWITCH_OFF = {
    "exaone": [LLAMA3_ROPE_FREQS],
    "deci": [LLAMA3_ROPE_FREQS, ("the linear in attention's place", lambda m: [
        setattr(layer, "config", dataclasses.replace(layer.config, attentionless_layers=(layer.index,)))
        for layer in m.layers if layer.index in m.config.linear_attention_layers])],
    "qwen": [NO_QKV_BIAS],
    "chatglm": [NO_QKV_BIAS],
    "jais": [("ALiBi", lambda m: [setattr(layer, "alibi_slopes", None) for layer in m.layers]),
             ("muP's query scale", lambda m: setattr(m.config, "attn_scale", 0.0))],
    "refact": [("ALiBi", lambda m: [setattr(layer, "alibi_slopes", None) for layer in m.layers])],
    "openelm": [NO_QK_NORMS],
    "maincoder": [NO_QK_NORMS],
    "orion": [("the LayerNorms' biases", lambda m: [setattr(n, "bias", None) for n in [m.output_norm] + [
        norm for layer in m.layers for norm in (layer.attn_norm, layer.ffn_norm)]])],
    "pangu-embedded": [("the attention output's bias", lambda m: [setattr(layer.attn_output, "bias", None)
                                                                  for layer in m.layers])],
    "plamo2": [("each head's own q/k norm weight", lambda m: [setattr(n, "weight", n.weight.mean(0))
                                                             for layer in m.layers if layer.attends
                                                             for n in (layer.attn_q_norm, layer.attn_k_norm)]),
               ("the norms of dt, B and C", lambda m: [setattr(layer.mamba, "norms", None) for layer in m.layers
                                                       if layer.mamba is not None]),
               ("the post-norms", lambda m: [setattr(n, "weight", torch.ones_like(n.weight)) for layer in m.layers
                                             for n in (layer.post_attention_norm, layer.post_ffw_norm)])],
    "plamo3": [("the sliding windows", _no_windows),
               ("the q/k norms", lambda m: [setattr(n, "weight", torch.ones_like(n.weight)) for layer in m.layers
                                            for n in (layer.attn_q_norm, layer.attn_k_norm)])],
    "rwkv7": [("the first layer's values mixed into the others'", lambda m: [
        layer.v0.fill_(-1e4) for layer in m.layers[1:]]),
              ("the wkv state's bonus (time_mix_r_k)", lambda m: [layer.r_k.zero_() for layer in m.layers])],
    "rwkv6": [("the halved residual stream (rescale_every_n_layers)", lambda m: [
        setattr(layer, "halved", False) for layer in m.layers]),
              ("the wkv state's bonus (time_mix_first)", lambda m: [layer.first.zero_() for layer in m.layers])],
    "arwkv7": [("the first layer's values mixed into the others'", lambda m: [
        layer.v0.fill_(-1e4) for layer in m.layers[1:]]),
               ("the token shift", lambda m: [layer.lerp.zero_() for layer in m.layers])],
    "rwkv6qwen2": [("Qwen2's biases of r, k and v", lambda m: [setattr(getattr(layer, n), "bias", None) for layer in
                                                             m.layers for n in ("time_mix_receptance", "time_mix_key",
                                                                                "time_mix_value")])],
}


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", REMOTE_CODE_NAMES + RWKV_NAMES)
def test_remote_code_logits_match_llamacpp(tiny, name, monkeypatch):
    """Families without a transformers class (RWKV-7's RwkvForCausalLM is RWKV-4): llama.cpp's logits of the
    converted F32 file (its K/V cache in F32 too) are lowtune's, with llama.cpp's CPU GELU (its fp16 table of fp16
    inputs, 3e-4 from the exact tanh form at this size) where the family's MLP is GELU's (CodeShell)."""
    from llama_cpp import Llama
    if FAMILIES[name].activation == "gelu_tanh":
        monkeypatch.setitem(glue_ops.UNGATED, "gelu_tanh",
                            lambda x: torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().to(x.dtype))
    ids = rand_ids(1, SEQ)
    llm = Llama(model_path=str(tiny[name].gguf), n_ctx=SEQ, n_batch=SEQ, logits_all=True, verbose=False, seed=0,
                type_k=0, type_v=0)  # (GGML_TYPE_F32)
    llm.eval(ids[0].tolist())
    want = torch.tensor(np.array(llm.scores[:SEQ]))[None]
    assert_logits_and_what_matters(tiny[name].gguf, ids, want, REMOTE_CODE_SWITCH_OFF.get(name, []),
                                   f"{name}: logits vs llama.cpp")


def test_exaone_logits_match_transformers_llama(tiny):
    """transformers runs EXAONE 3's checkpoints (its names renamed on load) as Llama: its logits of the tiny
    checkpoint, Llama 3's RoPE scaling included, are the converted file's in lowtune."""
    import transformers as tf
    hf = tf.AutoModelForCausalLM.from_pretrained(tiny["exaone"].hf_dir, attn_implementation="eager").float().eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.rope_parameters["rope_type"] == "llama3"
    ids = rand_ids(2, SEQ)
    with torch.no_grad():
        want, got = hf(ids).logits, Model.from_gguf(tiny["exaone"].gguf)(ids)
    print(f"exaone: logits vs transformers' Llama, relative error {rel_err(got, want):.2e}")
    assert rel_err(got, want) < 1e-4


def test_chatglm_of_transformers_glm(tiny, llamacpp_source, tmp_path):
    """GLM-4 9B's transformers checkpoints (GlmForCausalLM: q, k and v apart, RoPE on adjacent pairs of half of
    each head) are what llama.cpp's converter writes as chatglm: transformers' logits are the converted file's,
    its directory refused by class, saying to convert it."""
    import shutil

    import transformers as tf

    import lowtune
    hf = randomized(tf.GlmForCausalLM(tf.GlmConfig(
        vocab_size=V, hidden_size=D, intermediate_size=F, num_attention_heads=H, num_key_value_heads=HKV,
        head_dim=D // H, num_hidden_layers=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
        eos_token_id=2, pad_token_id=None, tie_word_embeddings=False, attention_bias=True)), "chatglm")
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "seq_length": 256}))  # (the converter's context)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tiny["chatglm"].hf_dir / name, tmp_path / "hf" / name)
    convert(llamacpp_source, [(tmp_path / "hf", tmp_path / "glm.gguf")])
    with GGUFFile(tmp_path / "glm.gguf") as f:
        assert f.metadata["general.architecture"] == "chatglm" and "blk.0.attn_q.bias" in f.tensor_infos
    ids = rand_ids(2, SEQ)
    with torch.no_grad():
        want = hf(ids).logits
    assert_logits_and_what_matters(tmp_path / "glm.gguf", ids, want, [NO_QKV_BIAS],
                                   "chatglm: logits vs transformers' GLM")
    with pytest.raises(ValueError, match="GlmForCausalLM \\(chatglm\\) is read from GGUF only.*convert_hf_to_gguf.py"):
        lowtune.load_model(tmp_path / "hf")


def config_fields(config: ModelConfig) -> dict:
    """The config's fields, a nested one (the Mamba2 sizes) as a tuple, for pytest.approx."""
    return {k: tuple(v.values()) if isinstance(v, dict) else v for k, v in dataclasses.asdict(config).items()}


def test_exaone_config_as_published():
    """EXAONE 3.5 2.4B's config.json (its own keys, a tied head, Llama 3's RoPE scaling) reads as the converter's
    metadata would give it, rope_freqs made from it."""
    from lowtune import hf_names
    cfg = {"activation_function": "silu", "architectures": ["ExaoneForCausalLM"], "attention_dropout": 0.0,
           "bos_token_id": 1, "embed_dropout": 0.0, "eos_token_id": 361, "head_dim": 80, "hidden_size": 2560,
           "initializer_range": 0.02, "intermediate_size": 7168, "layer_norm_epsilon": 1e-05,
           "max_position_embeddings": 32768, "model_type": "exaone", "num_attention_heads": 32,
           "num_key_value_heads": 8, "num_layers": 30, "pad_token_id": 0, "rope_scaling": {
               "factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
               "original_max_position_embeddings": 8192, "rope_type": "llama3"},
           "rope_theta": 1000000.0, "tie_word_embeddings": True, "vocab_size": 102400}
    md, _ = hf_names.metadata_from_hf_config(cfg)
    c = ModelConfig.from_gguf_metadata(md)
    assert (c.arch, c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.context_length) == (
        "exaone", 30, 2560, 32, 8, 80, 7168, 32768)
    assert (c.norm_eps, c.rope_theta, c.rope_dim, c.family.rope) == (pytest.approx(1e-5), 1e6, 80, "neox")
    factors = hf_names.generated_tensors(cfg)["rope_freqs.weight"]
    assert len(factors) == 40 and factors[0] == 1.0 and factors[-1] == pytest.approx(8.0)


@pytest.mark.parametrize("name", ["exaone", "orion", "baichuan", "pangu-embedded"])
def test_remote_code_hf_directory_loads_as_the_converted_gguf(tiny, name):
    """EXAONE 3's directory (its own tensor names and config keys, which transformers renames onto Llama's),
    Orion's (Llama's names, LayerNorms with biases), openPangu Embedded's (Llama's names, attention biases) and
    Baichuan's (q, k and v in W_pack, q and k permuted as
    Llama's) read as llama.cpp's conversion: the same tensors, config and logits, EXAONE 3.5's rope_freqs made
    from its config."""
    import lowtune
    hf_dir, gguf = tiny[name].hf_dir, tiny[name].gguf
    ids = rand_ids(2, SEQ)
    with torch.no_grad():
        got, want = lowtune.load_model(hf_dir, qtype="F32")(ids), Model.from_gguf(gguf)(ids)
    assert rel_err(got, want) < 1e-5
    want_config = config_fields(Model.from_gguf(gguf).config)
    assert config_fields(lowtune.load_model(hf_dir).config) == pytest.approx(want_config)
    with open_base(hf_dir) as src, GGUFFile(gguf) as f:
        assert set(src.tensor_infos) == set(f.tensor_infos)
        assert ("rope_freqs.weight" in f.tensor_infos) == (name == "exaone")
        for n, info in f.tensor_infos.items():
            if len(info.shape) == 1:  # (norms, Orion's norm biases, rope_freqs)
                assert torch.equal(src.tensor(n), f.tensor(n)), n
    if name != "exaone":
        return
    assert json.loads((hf_dir / "config.json").read_text())["num_layers"] == 2
    from lowtune import hf_names
    with pytest.raises(ValueError, match="activation 'gelu'.*SiLU"):
        hf_names.metadata_from_hf_config({**json.loads((hf_dir / "config.json").read_text()),
                                          "activation_function": "gelu"})


@pytest.mark.parametrize("name", HF_NAMES)
def test_hf_directory_loads_as_the_converted_gguf(tiny, name, botchan_text):
    """The safetensors directory gives transformers' logits in F32 and, quantized on load, every
    tensor of llama.cpp's conversion in the same blocks; its config and tokenizer are the GGUF's."""
    import lowtune
    ids = rand_ids(2, SEQ)
    with torch.no_grad():
        want = hf_model(name)(ids).logits
        got = lowtune.load_model(tiny[name].hf_dir, qtype="F32")(ids)
    print(f"{name}: logits of the HF directory vs transformers, relative error {rel_err(got, want):.2e}")
    assert rel_err(got, want) < 1e-4
    hf, gg = lowtune.load_model(tiny[name].hf_dir), Model.from_gguf(tiny[name].gguf)
    assert config_fields(hf.config) == pytest.approx(config_fields(gg.config))
    with open_base(tiny[name].hf_dir) as src, GGUFFile(tiny[name].gguf) as f:  # the default types
        assert set(src.tensor_infos) == set(f.tensor_infos)
        for n, info in f.tensor_infos.items():
            # norms (Gemma's 1 + w), biases, LongRoPE factors, LFM2's conv kernels, Gemma 3n's stacked AltUp
            # projections
            if len(info.shape) != 2 or not is_quantizable(n, info.shape):
                assert torch.equal(src.tensor(n), f.tensor(n)), n
            else:  # rows of 64 and 128: Q4_1; of 256 (Phi-2's FFN of 4 · D): Q4_K; of 16 (Gemma 4's per-layer
                k = info.shape[-1]  # projection) and 4 (Gemma 3n's AltUp coefficients): F16, llama-quantize's fallback
                got, want_type = src.qtensor(n), "Q4_K" if k % 256 == 0 else "Q4_1" if k % 32 == 0 else "F16"
                assert got.type == want_type and torch.equal(got.raw, ops.quantize(f.tensor(n), want_type).raw), n
    text = botchan_text[1000:3000]
    tok_hf, tok_gg = load_tokenizer(hf.metadata), load_tokenizer(gg.metadata)
    chat = tok_gg.apply_chat_template([{"role": "user", "content": text[:200]}])
    assert tok_hf.apply_chat_template([{"role": "user", "content": text[:200]}]) == chat
    for t in (text, chat):
        assert tok_hf.encode(t) == tok_gg.encode(t)


@pytest.mark.parametrize("name", HF_NAMES)
def test_hf_names_and_config_round_trip(tiny, name):
    """Every GGUF tensor has an HF name that maps back to it, and the config.json written from the
    GGUF's metadata reads back as the same model config."""
    from lowtune import hf_names
    with GGUFFile(tiny[name].gguf) as f:
        md, infos = dict(f.metadata), dict(f.tensor_infos)
        tensors = {n: (f.tensor(n).tolist() if n in hf_names.GGUF_ONLY else None) for n in infos}
    arch = md["general.architecture"]
    for n in infos:
        stacked = hf_names.stacked_names(n, arch, infos[n].shape[0])  # (Gemma 3n's AltUp projections)
        if stacked is not None:
            assert [hf_names.stacked_part(h, arch) for h in stacked] == [(n, i) for i in range(len(stacked))]
            continue
        h = hf_names.hf_name(n, arch)
        fused = None if h is None else hf_names.fused_parts(h, arch)  # (Granite 4's dense gate and up)
        assert (n in hf_names.GGUF_ONLY) if h is None else n in (fused or (hf_names.gguf_name(h, arch),))
    config = ModelConfig.from_gguf_metadata(md)
    if config.family.text_of:  # (the class holds a vision tower, which the GGUF lacks)
        with pytest.raises(ValueError, match="holds the vision tower too.*merged GGUF"):
            hf_names.hf_config(config, md, "output.weight" not in infos, "float32", tensors)
        return
    cfg = hf_names.hf_config(config, md, "output.weight" not in infos, "float32", tensors)
    back, _ = hf_names.metadata_from_hf_config(cfg)
    back.update({k: md[k] for k in hf_names.LAYER_SCALARS.get(arch, ())})  # (tensors in HF: Apertus's xIELU)
    assert config_fields(ModelConfig.from_gguf_metadata(back)) == pytest.approx(config_fields(config))
    factors = {n: v for n, v in tensors.items() if v is not None}  # Phi-3's LongRoPE factors
    assert set(hf_names.generated_tensors(cfg)) == set(factors)
    for n, v in hf_names.generated_tensors(cfg).items():
        assert v == pytest.approx(factors[n])


def test_hf_configs_lowtune_refuses():
    from lowtune import hf_names
    gemma = dict(architectures=["Gemma2ForCausalLM"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=100, rms_norm_eps=1e-6,
                 query_pre_attn_scalar=32)
    hf_names.metadata_from_hf_config(gemma)
    with pytest.raises(ValueError, match="query_pre_attn_scalar 24 .* llama.cpp"):
        hf_names.metadata_from_hf_config({**gemma, "query_pre_attn_scalar": 24})
    with pytest.raises(ValueError, match="'dynamic' is not supported"):
        hf_names.metadata_from_hf_config({**gemma, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}})
    # YaRN as llama.cpp runs it: the factor and original context; other parameters are refused
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    md, _ = hf_names.metadata_from_hf_config({**gemma, "rope_scaling": yarn})
    assert ModelConfig.from_gguf_metadata(md).rope_yarn_factor == 4.0
    for odd in ({"beta_fast": 16}, {"attention_factor": 1.0}, {"truncate": False}, {"factor": None}):
        with pytest.raises(ValueError, match="YaRN"):
            hf_names.metadata_from_hf_config({**gemma, "rope_scaling": {**yarn, **odd}})
    qwen = dict(gemma, architectures=["Qwen2ForCausalLM"], sliding_window=16, use_sliding_window=False)
    del qwen["query_pre_attn_scalar"]
    md, _ = hf_names.metadata_from_hf_config(qwen)
    assert "qwen2.attention.sliding_window" not in md  # Qwen2.5's configs name a window they do not use
    md, _ = hf_names.metadata_from_hf_config({**qwen, "use_sliding_window": True, "max_window_layers": 1,
                                              "layer_types": ["full_attention", "sliding_attention"]})
    assert [ModelConfig.from_gguf_metadata(md).window(i) for i in (0, 1)] == [0, 16]
    with pytest.raises(ValueError, match="not supported; lowtune reads llama, mistral, arcee, smollm3, granite, "
                                         "granitemoehybrid, nemotron_h, mamba2, falcon_h1, mamba, jamba, minicpm3, "
                                         "ernie4_5, ministral3, qwen2"):
        hf_names.metadata_from_hf_config({**qwen, "architectures": ["GPTJForCausalLM"]})
    assert hf_names.hf_biases("qwen2", ["blk.0.attn_q.bias"], 1) == ({}, ["blk.0.attn_k.bias", "blk.0.attn_v.bias"])
    assert hf_names.hf_biases("llama", ["blk.0.ffn_up.bias"], 1) == (
        {"attention_bias": False, "mlp_bias": True}, ["blk.0.ffn_down.bias", "blk.0.ffn_gate.bias"])
    nemotron = dict(qwen, architectures=["NemotronForCausalLM"], head_dim=16, norm_eps=1e-5, partial_rotary_factor=0.5)
    md, _ = hf_names.metadata_from_hf_config(nemotron)
    assert (md["nemotron.attention.layer_norm_epsilon"], md["nemotron.rope.dimension_count"]) == (1e-5, 8)
    with pytest.raises(ValueError, match="head_dim 32 × 4 heads is not hidden_size 64; llama.cpp's nemotron"):
        hf_names.metadata_from_hf_config({**nemotron, "head_dim": 32})
    with pytest.raises(ValueError, match="blk.0.attn_qkv.bias: a phi3 model in Hugging Face's layout has no such bias"):
        hf_names.hf_biases("phi3", ["blk.0.attn_qkv.bias"], 1)
    # adapter targets: lowtune's names, or the family's HF module names (fused ones for their parts)
    assert hf_names.adapter_targets(["qkv_proj", "down_proj"], "phi3") == ("attn_q", "attn_k", "attn_v", "ffn_down")
    assert hf_names.adapter_targets(["gate_up_proj", "ffn_up"], "phi3") == ("ffn_gate", "ffn_up")
    assert hf_names.adapter_targets(["q_proj", "attn_v", "o_proj"], "gemma3") == ("attn_q", "attn_v", "attn_output")
    # SmolLM3: llama.cpp leaves RoPE out of every 4th layer and has no window; configs that differ are refused
    smol = dict(qwen, architectures=["SmolLM3ForCausalLM"], num_hidden_layers=8, use_sliding_window=False)
    md, _ = hf_names.metadata_from_hf_config({**smol, "no_rope_layers": [1, 1, 1, 0] * 2})
    assert [ModelConfig.from_gguf_metadata(md).rope_kind(i) for i in range(8)] == [0, 0, 0, NO_ROPE] * 2
    with pytest.raises(ValueError, match="no_rope_layers differ from every 4th layer"):
        hf_names.metadata_from_hf_config({**smol, "no_rope_layers": [1, 1, 0, 1] * 2})
    with pytest.raises(ValueError, match="no_rope_layers differ"):
        hf_names.metadata_from_hf_config({**smol, "no_rope_layer_interval": 3})
    with pytest.raises(ValueError, match="sliding window, which llama.cpp's smollm3 does not have"):
        hf_names.metadata_from_hf_config({**smol, "use_sliding_window": True})
    # EXAONE 4: "LLLG" slides three layers of four; llama.cpp takes windows only at 64 layers
    exaone = dict(qwen, architectures=["Exaone4ForCausalLM"], num_hidden_layers=64, sliding_window_pattern="LLLG")
    del exaone["use_sliding_window"]
    md, _ = hf_names.metadata_from_hf_config(exaone)
    c = ModelConfig.from_gguf_metadata(md)
    assert [c.window(i) for i in range(4)] == [16, 16, 16, 0] and c.rope_kind(3) == NO_ROPE
    with pytest.raises(ValueError, match="only at \\(64,\\) layers"):
        hf_names.metadata_from_hf_config({**exaone, "num_hidden_layers": 8})
    md, _ = hf_names.metadata_from_hf_config({**exaone, "num_hidden_layers": 8, "sliding_window": None})
    assert ModelConfig.from_gguf_metadata(md).window(0) == 0 and ModelConfig.from_gguf_metadata(md).rope_kind(3) == 0
    md = {**md, "exaone4.attention.sliding_window": 16}  # a file's window at 8 layers: llama.cpp ignores it
    assert ModelConfig.from_gguf_metadata(md).window(0) == 0


def test_gemma3_multimodal_checkpoint_reads_as_its_text_model(tmp_path):
    """Gemma3ForConditionalGeneration (Gemma 3 4B and up): the text config and the language model's
    tensors are read, the vision tower and projector left out, and the logits are its text logits."""
    import transformers as tf

    import lowtune
    text = tf.Gemma3TextConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_attention_heads=H,
                               num_key_value_heads=HKV, max_position_embeddings=256, rms_norm_eps=1e-5,
                               num_hidden_layers=2, head_dim=32, query_pre_attn_scalar=32, sliding_window=WINDOW,
                               bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=28, patch_size=14)
    hf = tf.Gemma3ForConditionalGeneration(tf.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=V - 1,
        boi_token_index=V - 3, eoi_token_index=V - 2)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() == 1 else p.shape[-1] ** -0.5))
    hf.save_pretrained(tmp_path)
    ids = rand_ids(1, 40)
    with torch.no_grad():
        got, want = lowtune.load_model(tmp_path, qtype="F32")(ids), hf(input_ids=ids).logits
    assert rel_err(got, want) < 1e-4


def test_gated_delta_rule_is_transformers_chunked_and_recurrent_forms():
    """lowtune.model.gated_delta_rule over 150 positions (three chunks, the last padded) gives
    transformers' chunked reference's outputs and state, and stepping it a position at a time from the
    state of a prefix gives the same; gradients reach q, k, v, the decay and beta."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    from lowtune.model import gated_delta_rule
    g = torch.Generator().manual_seed(0)
    b, t, h, dk, dv = 2, 150, 3, 8, 5
    q, k = (torch.nn.functional.normalize(torch.randn(b, t, h, dk, generator=g), dim=-1) for _ in range(2))
    v, decay, beta = (torch.randn(b, t, h, dv, generator=g), -torch.rand(b, t, h, generator=g),
                      torch.rand(b, t, h, generator=g))
    want, want_state = torch_chunk_gated_delta_rule(q, k, v, decay, beta, output_final_state=True)
    inputs = [x.clone().requires_grad_() for x in (q, k, v, decay, beta)]
    got, state = gated_delta_rule(inputs[0] * dk ** -0.5, *inputs[1:])
    assert rel_err(got, want) < 1e-5 and rel_err(state, want_state) < 1e-5
    got.square().sum().backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in inputs)
    with torch.no_grad():
        o, s = delta_rule_stepped_after(100, q * dk ** -0.5, k, v, decay, beta)
    assert rel_err(o, want) < 1e-5 and rel_err(s, want_state) < 1e-5


def test_gated_delta_rule_runs_in_fp32_under_bf16_autocast():
    """The chunked delta rule under a trainer's bf16 autocast, with a decay for each key channel (whose
    einsums autocast would take to bf16, and whose triangular solve has no bf16 kernel on CUDA): the
    same fp32 outputs and gradients as without autocast."""
    from lowtune.model import gated_delta_rule
    g = torch.Generator().manual_seed(1)
    b, t, h, dk, dv = 1, 70, 2, 8, 4
    inputs = [torch.nn.functional.normalize(torch.randn(b, t, h, dk, generator=g), dim=-1) for _ in range(2)]
    inputs += [torch.randn(b, t, h, dv, generator=g), -torch.rand(b, t, h, dk, generator=g),
               torch.rand(b, t, h, generator=g)]
    results = []
    for autocast in (False, True):
        leaves = [x.clone().requires_grad_() for x in inputs]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            o, s = gated_delta_rule(*leaves)
        (o.square().sum() + s.sum()).backward()
        results.append([o, s] + [x.grad for x in leaves])
    for got, want in zip(*results[::-1]):
        assert got.dtype == torch.float32 and torch.equal(got, want)

def _recurrences():
    """Each fp32 recurrence with inputs drawn for it: (name, function, inputs)."""
    from lowtune.model import _ssd_chunked, _ssm_step
    from lowtune.rwkv import gated_linear_attention, wkv6, wkv7
    g = torch.Generator().manual_seed(2)
    b, t, h, n, p = 1, 9, 2, 8, 4
    rand, unit = (lambda *s: torch.randn(*s, generator=g)), (lambda *s: torch.rand(*s, generator=g))
    return [("selective_scan", selective_scan, [rand(b, t, h * p), unit(b, t, h * p), -unit(h * p, n), rand(b, t, n),
                                                rand(b, t, n)]),
            ("_ssd_chunked", lambda *a: _ssd_chunked(*a, 4), [rand(b, t, h, p), unit(b, t, h), -unit(h),
                                                              rand(b, t, h, n), rand(b, t, h, n), rand(b, h, p, n)]),
            ("_ssm_step", _ssm_step, [rand(b, 1, h, p), unit(b, 1, h), -unit(h), rand(b, 1, h, n), rand(b, 1, h, n),
                                      rand(b, h, p, n)]),
            ("wkv7", wkv7, [rand(b, t, h, n), unit(b, t, h, n), rand(b, t, h, n), rand(b, t, h, n),
                            -unit(b, t, h, n) * 0.1, unit(b, t, h, n) * 0.1]),
            ("wkv6", wkv6, [rand(b, t, h, n), rand(b, t, h, n), rand(b, t, h, n), rand(h, n), unit(b, t, h, n).log()]),
            ("gated_linear_attention", gated_linear_attention,
             [rand(b, t, h, n) for _ in range(3)] + [unit(b, t, h, n).log()])]


@pytest.mark.parametrize("name", ["selective_scan", "_ssd_chunked", "_ssm_step", "wkv7", "wkv6",
                                  "gated_linear_attention"])
def test_recurrences_run_in_fp32_under_bf16_autocast(name):
    """Mamba's, Mamba2's and RWKV's recurrences under a trainer's bf16 autocast (which would take their
    einsums to bf16): the same fp32 outputs and gradients as without autocast."""
    fn, inputs = next((f, i) for n, f, i in _recurrences() if n == name)
    results = []
    for autocast in (False, True):
        leaves = [x.clone().requires_grad_() for x in inputs]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            o, s = fn(*leaves)
        (o.square().sum() + s.sum()).backward()
        results.append([o, s] + [x.grad for x in leaves])
    for got, want in zip(*results[::-1]):
        assert got.dtype == torch.float32 and torch.equal(got, want)


def _diagonal_decay_recurrences(t: int, seed: int = 4):
    """Mamba 1's scan, RWKV-6's wkv6 and gated linear attention over t positions, each with its stepped twin
    and inputs drawn for it: (name, chunked, stepped, inputs with the initial state last). The log decays
    reach from ~-1e-8 (a decay ~1, rounding to 1) to ~-1e4 (0), a channel each always near one end."""
    from lowtune.model import _selective_scan_stepped
    from lowtune.rwkv import _gla_stepped, _wkv6_stepped, gated_linear_attention, wkv6
    g = torch.Generator().manual_seed(seed)
    b, h, n, inner, state = 2, 3, 8, 12, 4
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    log_w = -torch.exp(rand(b, t, h, n) * 4)             # RWKV-6's log w = -exp(.)
    log_w[..., 0], log_w[..., 1] = -torch.exp(8 + rand(b, t, h)), -torch.exp(-18 + rand(b, t, h))
    dt = torch.nn.functional.softplus(rand(b, t, inner) * 3)
    a = -torch.exp(rand(inner, state) * 3)
    a[0], a[1] = -1e4, -1e-8
    return [("selective_scan", selective_scan, _selective_scan_stepped,
             [rand(b, t, inner), dt, a, rand(b, t, state), rand(b, t, state), rand(b, inner, state)]),
            ("wkv6", wkv6, _wkv6_stepped, [rand(b, t, h, n), rand(b, t, h, n), rand(b, t, h, n), rand(h, n), log_w,
                                          rand(b, h, n, n)]),
            ("gated_linear_attention", gated_linear_attention, _gla_stepped,
             [rand(b, t, h, n), rand(b, t, h, n), rand(b, t, h, n), log_w, rand(b, h, n, n)])]


@pytest.mark.parametrize("name", ["selective_scan", "wkv6", "gated_linear_attention"])
@pytest.mark.parametrize("t, chunk", [(100, 16), (64, 16), (7, 16)])
def test_chunked_recurrences_equal_their_stepped_twins(name, t, chunk):
    """The chunked forms of the diagonal-decay recurrences (T a multiple of the chunk, not one, and shorter
    than one; strong and weak decays; an initial state given and not) give their stepped twins' outputs,
    last states and gradients of every input, to fp32 rounding."""
    fast, slow, inputs = next((f, s, i) for n, f, s, i in _diagonal_decay_recurrences(t) if n == name)
    for given in (inputs, inputs[:-1]):
        results = []
        for fn in (lambda *a: fast(*a, chunk=chunk), slow):
            leaves = [x.clone().requires_grad_() for x in given]
            o, s = fn(*leaves)
            (o.square().sum() + (s * torch.linspace(-1, 1, s.numel()).reshape(s.shape)).sum()).backward()
            results.append([o.detach(), s.detach()] + [x.grad for x in leaves])
        for i, (got, want) in enumerate(zip(*results)):
            assert torch.isfinite(got).all() and rel_err(got, want) < 1e-5, (name, i)


@pytest.mark.parametrize("name", ["selective_scan", "wkv6", "gated_linear_attention"])
def test_chunked_recurrences_continue_one_position_at_a_time(name):
    """A chunked prefix, then one position at a time from its last state (the KV cache's path), gives the
    stepped twin's outputs and last state over the whole sequence."""
    fast, slow, inputs = next((f, s, i) for n, f, s, i in _diagonal_decay_recurrences(45) if n == name)
    fixed = {"selective_scan": 2, "wkv6": 3}.get(name)  # (the input of no position: A; u)
    part = lambda lo, hi: [x if i == fixed else x[:, lo:hi] for i, x in enumerate(inputs[:-1])]  # noqa: E731
    o, state = fast(*part(0, 37), inputs[-1], chunk=16)
    outs = [o]
    for i in range(37, 45):
        o, state = fast(*part(i, i + 1), state)
        outs.append(o)
    want, want_state = slow(*inputs)
    assert rel_err(torch.cat(outs, 1), want) < 1e-5 and rel_err(state, want_state) < 1e-5


@pytest.mark.parametrize("arch", RWKV_NAMES)
def test_rwkv_time_mix_runs_in_fp32_under_bf16_autocast(arch):
    """An RWKV layer's time mix under a trainer's bf16 autocast: its low-rank parts (decay, mixes, gate) and its
    recurrence in fp32 as without autocast, the same output bit for bit."""
    layer = random_rwkv_model(arch).layers[0]
    g = torch.Generator().manual_seed(3)
    h, prev = (torch.randn(1, 5, layer.config.dim, generator=g) for _ in range(2))
    outs = []
    for autocast in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outs.append(layer.time_mix(h, prev, None, None, 0)[0])
    assert torch.equal(*outs)


def rwkv7_recurrence_inputs(b: int, t: int, h: int, n: int, seed: int) -> list[torch.Tensor]:
    """r, w, k, v, a, b of wkv7 as RWKV-7's time mix draws them: decays w = exp(-0.606531 sigmoid(.)) in
    (0.545, 1), a = -kk and b = kk · a_gate, kk a normed key and the gate in (0, 1)."""
    from lowtune.rwkv import DECAY_SCALE
    g = torch.Generator().manual_seed(seed)
    rand = lambda: torch.randn(b, t, h, n, generator=g)  # noqa: E731
    r, k, v = rand(), rand(), rand()
    w = torch.exp(-DECAY_SCALE * torch.sigmoid(3 * rand()))
    kk = torch.nn.functional.normalize(rand(), dim=-1)
    return [r, w, k, v, -kk, kk * torch.rand(b, t, h, n, generator=g)]


@pytest.mark.parametrize("t,chunk,block,device", [(70, 16, 4, "cpu"), (70, 32, 8, "cpu"), (5, 16, 4, "cpu"),
                                                  (40, 8, 8, "cpu"),
                                                  pytest.param(70, 32, 8, "cuda", marks=pytest.mark.cuda)])
def test_wkv7_chunked_is_stepped(t, chunk, block, device):
    """RWKV-7's recurrence in chunks (T not a multiple of the chunk, or shorter than one) gives the position-by-
    position recurrence's outputs, last state and gradients (to every input and the initial state) within
    fp32 rounding."""
    from lowtune.rwkv import _wkv7_stepped, wkv7
    b, h, n = 2, 2, 64
    inputs = [x.to(device) for x in rwkv7_recurrence_inputs(b, t, h, n, seed=4) + [torch.randn(b, h, n, n)]]
    out_grad, state_grad = torch.randn(b, t, h, n, device=device), torch.randn(b, h, n, n, device=device)
    results = []
    for fn in (_wkv7_stepped, lambda *x: wkv7(*x, chunk=chunk, block=block)):
        leaves = [x.clone().requires_grad_() for x in inputs]
        out, state = fn(*leaves)
        ((out * out_grad).sum() + (state * state_grad).sum()).backward()
        results.append([out.detach(), state.detach()] + [x.grad for x in leaves])
    for got, want in zip(*results[::-1]):
        assert rel_err(got, want) < 1e-5


def test_wkv7_continues_a_chunked_prefix_one_position_at_a_time():
    """The decode steps (one position, the stepped form) from the state a chunked prompt leaves give the
    recurrence over the whole sequence, from a given state; extreme decays (w near 0 and 1) stay finite and
    equal too."""
    from lowtune.rwkv import _wkv7_stepped, wkv7
    b, t, h, n = 1, 60, 2, 64
    inputs = rwkv7_recurrence_inputs(b, t, h, n, seed=5)
    inputs[1] = torch.rand(b, t, h, n).pow(8)  # (decays from below 1e-8 to near 1)
    initial = torch.randn(b, h, n, n)
    want, want_state = _wkv7_stepped(*inputs, initial)
    o, s = wkv7(*(x[:, :37] for x in inputs), initial)
    parts = [o]
    for i in range(37, t):
        o, s = wkv7(*(x[:, i:i + 1] for x in inputs), s)
        parts.append(o)
    got = torch.cat(parts, 1)
    assert torch.isfinite(got).all() and rel_err(got, want) < 1e-5 and rel_err(s, want_state) < 1e-5


def delta_rule_stepped_after(prefix: int, *inputs):
    """gated_delta_rule's outputs and final state over inputs [B, T, ...] run on the first `prefix` positions
    at once, then one position at a time from the state (the decode steps)."""
    from lowtune.model import gated_delta_rule
    o, s = gated_delta_rule(*(x[:, :prefix] for x in inputs))
    parts = [o]
    for i in range(prefix, inputs[0].shape[1]):
        o, s = gated_delta_rule(*(x[:, i:i + 1] for x in inputs), s)
        parts.append(o)
    return torch.cat(parts, 1), s


def test_gated_delta_rule_per_channel_is_kimi_delta_attention():
    """With a decay for each key channel (Kimi Delta Attention's), lowtune.model.gated_delta_rule over 150
    positions gives transformers' chunked KDA reference's outputs and state, and stepping it from the state
    of a prefix the same; a decay the same in every channel is the Gated DeltaNet's."""
    from transformers.models.kimi_linear.modeling_kimi_linear import chunk_kimi_delta_attention

    from lowtune.model import gated_delta_rule
    g = torch.Generator().manual_seed(1)
    b, t, h, dk, dv = 2, 150, 3, 8, 5
    q, k = (torch.nn.functional.normalize(torch.randn(b, t, h, dk, generator=g), dim=-1) for _ in range(2))
    v, decay, beta = (torch.randn(b, t, h, dv, generator=g), -torch.rand(b, t, h, dk, generator=g),
                      torch.rand(b, t, h, generator=g))
    want, want_state = chunk_kimi_delta_attention(q, k, v, decay, beta, output_final_state=True)
    q = q * dk ** -0.5
    got, state = gated_delta_rule(q, k, v, decay, beta)
    assert rel_err(got, want) < 1e-5 and rel_err(state, want_state) < 1e-5
    o, s = delta_rule_stepped_after(100, q, k, v, decay, beta)
    assert rel_err(o, want) < 1e-5 and rel_err(s, want_state) < 1e-5
    head = decay[..., 0]  # (one decay a head, given per channel or not)
    per_head = gated_delta_rule(q, k, v, head, beta)
    per_channel = gated_delta_rule(q, k, v, head[..., None].expand_as(decay), beta)
    assert rel_err(per_channel[0], per_head[0]) < 1e-6 and rel_err(per_channel[1], per_head[1]) < 1e-6
    assert rel_err(per_head[0], want) > 1e-2


def test_qwen35_multimodal_checkpoint_reads_as_its_language_model(tiny, tmp_path):
    """Qwen3_5ForConditionalGeneration (the published Qwen3.5 checkpoints): the text config and the
    language model's tensors are read, the vision tower and the multi-token-prediction layers (mtp.*)
    left out, and the logits are its text logits, those of the converted GGUF."""
    import json

    import transformers as tf
    from safetensors.torch import load_file, save_file

    import lowtune
    text = json.loads((tiny["qwen35"].hf_dir / "config.json").read_text())
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=D)
    hf = tf.Qwen3_5ForConditionalGeneration(tf.Qwen3_5Config(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():
        hf.model.language_model.load_state_dict(hf_model("qwen35").model.state_dict())
        hf.lm_head.weight.copy_(hf_model("qwen35").lm_head.weight)
    hf.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    save_file({**load_file(path), "mtp.fc.weight": torch.zeros(D, 2 * D)}, path, metadata={"format": "pt"})
    ids = rand_ids(1, 40)
    with torch.no_grad():
        got, want = lowtune.load_model(tmp_path, qtype="F32")(ids), hf(input_ids=ids).logits
        gguf = Model.from_gguf(tiny["qwen35"].gguf)(ids)
    assert rel_err(got, want) < 1e-4 and rel_err(got, gguf) < 1e-4


def test_vision_language_models_are_their_text_families(tiny, tmp_path):
    """Qwen2-VL / Qwen2.5-VL (qwen2vl), Qwen3-VL (qwen3vl) and Qwen3-VL MoE (qwen3vlmoe) run their text
    families' decoders (text tokens take every M-RoPE section at their position: NEOX RoPE; the tiny
    models' sections differ from one another and their logits equal transformers'). Their directories
    give the M-RoPE sections and deepstack layer count the converter writes, so a merged GGUF keeps what
    llama.cpp needs; Qwen2-VL's class reads as Qwen2.5-VL's."""
    import transformers as tf

    import lowtune
    from lowtune import hf_names
    for vl, text in (("qwen2vl", "qwen2"), ("qwen3vl", "qwen3"), ("qwen3vlmoe", "qwen3moe")):
        fam = FAMILIES[vl]
        assert dataclasses.replace(fam, arch=text, text_of="", hf_architectures=FAMILIES[text].hf_architectures,
                                   hf_model_types=FAMILIES[text].hf_model_types) == FAMILIES[text]
    for name, sections, deepstack in (("qwen2vl", [2, 3, 3, 0], None), ("qwen3vl", [6, 5, 5, 0], 2)):
        md, _ = hf_names.metadata_from_hf_config(json.loads((tiny[name].hf_dir / "config.json").read_text()))
        with GGUFFile(tiny[name].gguf) as f:
            for key, want in (("rope.dimension_sections", sections), ("n_deepstack_layers", deepstack)):
                assert md.get(f"{name}.{key}") == f.metadata.get(f"{name}.{key}") == want, key
    # the published Qwen2.5-VL checkpoints' layout: model.layers, visual, lm_head
    from safetensors.torch import load_file, save_file
    old = tmp_path / "old-layout"
    shutil.copytree(tiny["qwen2vl"].hf_dir, old)
    w = load_file(old / "model.safetensors")
    save_file({k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
               for k, v in w.items()}, old / "model.safetensors", metadata={"format": "pt"})
    ids = rand_ids(1, 40)
    with torch.no_grad():
        assert rel_err(lowtune.load_model(old, qtype="F32")(ids), Model.from_gguf(tiny["qwen2vl"].gguf)(ids)) < 1e-6
    # Qwen2-VL: M-RoPE in sections, not interleaved; every tensor under model.language_model or model.visual
    hf = tf.Qwen2VLForConditionalGeneration(tf.Qwen2VLConfig(
        text_config=dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_attention_heads=H,
                         num_key_value_heads=HKV, num_hidden_layers=2, rms_norm_eps=1e-5, rope_parameters={
                             "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 4]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=D, num_heads=2))).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() == 1 else p.shape[-1] ** -0.5))
    hf.save_pretrained(tmp_path / "qwen2-vl")
    assert any(k.startswith("model.visual.") for k in hf.state_dict())
    model = lowtune.load_model(tmp_path / "qwen2-vl", qtype="F32")
    assert model.config.arch == "qwen2vl" and model.metadata["qwen2vl.rope.dimension_sections"] == [2, 2, 4, 0]
    with torch.no_grad():
        assert rel_err(model(ids), hf(input_ids=ids).logits) < 1e-4


def test_a_reranker_is_refused_by_name(tiny, tmp_path):
    """A Qwen3-VL reranker's file (llama.cpp's converter adds cls_out, the head's yes/no rows)."""
    with GGUFFile(tiny["qwen3vl"].gguf) as f:
        tensors = [(n, f.tensor(n)) for n in f.tensor_infos] + [("cls_out.weight", torch.zeros(2, D))]
        write_gguf(tmp_path / "rerank.gguf", dict(f.metadata), tensors, metadata_types=dict(f.metadata_types))
    with pytest.raises(ValueError, match="cls_out.*reranker's classification head.*generative model"):
        Model.from_gguf(tmp_path / "rerank.gguf")


def test_vision_language_configs_as_published():
    """The published configs' spellings: Qwen2.5-VL's text keys at the top level with rope_scaling
    {"type": "mrope"}, Qwen3-VL's under text_config with interleaved sections and the vision tower's
    deepstack indexes; the metadata is what llama.cpp's converter writes from them."""
    from lowtune import hf_names
    text = {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
            "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6}
    md, types = hf_names.metadata_from_hf_config({
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", **text,
        "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vision_config": {"depth": 32, "hidden_size": 1280, "out_hidden_size": 2048}})
    assert md["general.architecture"] == "qwen2vl" and md["qwen2vl.rope.freq_base"] == 1e6
    assert md["qwen2vl.rope.dimension_sections"] == [16, 24, 24, 0] and "qwen2vl.n_deepstack_layers" not in md
    assert types["qwen2vl.rope.dimension_sections"] == (hf_names.ARRAY, hf_names.I32)
    md, _ = hf_names.metadata_from_hf_config({
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
        "text_config": {**text, "model_type": "qwen3_vl_text", "head_dim": 128, "rope_scaling": {
            "rope_type": "default", "mrope_interleaved": True, "mrope_section": [24, 20, 20]}, "rope_theta": 5e6},
        "vision_config": {"depth": 24, "deepstack_visual_indexes": [5, 11, 17]}})
    assert md["general.architecture"] == "qwen3vl" and md["qwen3vl.rope.freq_base"] == 5e6
    assert md["qwen3vl.rope.dimension_sections"] == [24, 20, 20, 0] and md["qwen3vl.n_deepstack_layers"] == 3
    with pytest.raises(ValueError, match="Qwen3VLMoeForConditionalGeneration.. is not supported.*as the GGUF"):
        hf_names.metadata_from_hf_config({"architectures": ["Qwen3VLMoeForConditionalGeneration"], **text})


def test_config_read_from_the_converted_files(tiny):
    cfg = {n: Model.from_gguf(tiny[n].gguf).config for n in NAMES}
    # (Nemotron-H's, Mamba-2's, Mamba's, GPT-2's, StarCoder's, BLOOM's and MPT's: the default pairing, unused
    # without RoPE)
    alternating = ["norm", "neox", "norm", "neox", "norm", "neox", "norm", "neox", "norm"]
    assert [cfg[n].family.rope for n in NAMES] == (["norm"] * 10 + ["neox"] * 21 + alternating + ["norm"] * 4
                                                   + ["neox"] * 6 + ["neox"])  # (the last: jais2)
    assert [n for n in NAMES if cfg[n].no_rope] == ["granitehybrid", "nemotron_h", "gpt2", "starcoder", "bloom",
                                                    "mpt"]
    g2 = cfg["gpt2"]  # (the converter's n_ctx: as many positions as position_embd's rows)
    assert (g2.context_length, g2.ffn_dim, g2.n_kv_heads, g2.alibi_max_bias) == (256, 4 * D, H, 0.0)
    assert (cfg["starcoder"].context_length, cfg["starcoder"].n_kv_heads) == (256, 1)  # (multi-query)
    assert (cfg["bloom"].alibi_max_bias, cfg["bloom"].n_heads) == (8.0, BLOOM_HEADS)  # (llama.cpp's fixed bias)
    assert (cfg["mpt"].alibi_max_bias, cfg["mpt"].clamp_qkv) == (8.0, MPT_CLIP_QKV)  # (the file's)
    assert all(cfg[n].clamp_qkv == 0.0 for n in NAMES if n not in ("mpt", "olmo"))
    assert cfg["hunyuan-dense"].family.qk_norm_after_rope
    # GPT-NeoX: parallel or one after the other, as the file's use_parallel_residual says; RoPE on a quarter
    assert [(cfg[n].parallel, cfg[n].rope_dim, cfg[n].n_kv_heads) for n in ("gptneox", "gptneox-seq")] == [
        (True, 4, H), (False, 4, H)]
    # StableLM: StableLM 2 1.6B's layer one after the other, the 12B's parallel with per-head q/k LayerNorms
    assert [(cfg[n].parallel, cfg[n].rope_dim, cfg[n].n_kv_heads) for n in ("stablelm", "stablelm2-12b")] == [
        (False, 4, HKV), (True, 4, HKV)]
    # Falcon: 7B's one KV head and one norm, 40B's grouped KV heads and attention's own norm (attn_norm_2)
    assert [cfg[n].n_kv_heads for n in ("falcon", "falcon-40b")] == [1, HKV]
    assert [Model.from_gguf(tiny[n].gguf).layers[0].norm_files.get("attn_norm") for n in ("falcon", "falcon-40b")] \
        == [None, "attn_norm_2"]
    with GGUFFile(tiny["stablelm2-12b"].gguf) as f:
        assert f.tensor("blk.0.attn_q_norm.weight").shape == (H, D // H)
        assert "blk.0.ffn_norm.weight" not in f.tensor_infos
    ne = cfg["nemotron"]
    assert (ne.head_dim, ne.rope_dim, ne.rope_linear_scale) == (16, 8, 2.0)
    ap = cfg["apertus"]  # (alpha_p, alpha_n, beta, eps) of each layer, as transformers holds them
    acts = [layer.mlp.act_fn for layer in hf_model("apertus").model.layers]
    assert ap.xielu == pytest.approx([tuple(float(getattr(a, k)) for k in ("alpha_p", "alpha_n", "beta", "eps"))
                                      for a in acts])
    lf = cfg["lfm2"]  # (the converter writes a KV head count per layer: 0 in the convolution layers)
    assert (lf.conv_layers, lf.conv_kernel, lf.n_kv_heads) == ((0, 2), CONV_KERNEL, HKV)
    assert all(cfg[n].conv_layers == () for n in NAMES if n != "lfm2")
    from lowtune.loading import describe  # (`lowtune info`)
    conv_layers = lambda n: describe(tiny[n].gguf)["config"]["conv_layers"]  # noqa: E731
    assert (conv_layers("lfm2"), conv_layers("llama")) == ([0, 2], [])
    gh = describe(tiny["granitehybrid"].gguf)["config"]  # (Granite 4's Mamba2 layers)
    assert (gh["ssm_layers"], gh["ssm"]["heads"], gh["no_rope"]) == ([0, 2], 8, True)
    assert describe(tiny["llama"].gguf)["config"]["ssm_layers"] == []
    info = {n: describe(tiny[n].gguf)["config"] for n in ("gpt2", "bloom", "mpt", "llama")}  # (`lowtune info`)
    assert [(i["learned_positions"], i["alibi_max_bias"], i["clamp_qkv"]) for i in info.values()] == [
        (True, 0.0, 0.0), (False, 8.0, 0.0), (False, 8.0, MPT_CLIP_QKV), (False, 0.0, 0.0)]
    qw = cfg["qwen35"]  # (three DeltaNets, then attention; RoPE on a quarter of each head)
    assert (qw.delta_layers, qw.ssm_conv_kernel, qw.ssm_k_heads, qw.ssm_v_heads, qw.ssm_head_dim, qw.ssm_inner) == (
        (0, 1, 2), 4, 2, 4, 16, 64)
    assert (qw.head_dim, qw.rope_dim) == (32, 8)
    assert all(cfg[n].delta_layers == () for n in NAMES if n != "qwen35")
    assert describe(tiny["qwen35"].gguf)["config"]["delta_layers"] == [0, 1, 2]
    p4 = cfg["phi4"]
    assert (p4.head_dim, p4.rope_dim, p4.rope_orig_context) == (16, 12, PHI3_ORIG_CONTEXT)
    co = cfg["cohere2"]
    assert co.swa_layers == (0, 1, 2) and [co.rope_kind(i) for i in range(4)] == [0, 0, 0, NO_ROPE]
    assert cfg["command-r"].logit_scale == pytest.approx(4.0) and cfg["command-r"].norm_eps == pytest.approx(1e-5)
    ex = cfg["exaone4"]
    assert ex.sliding_window == WINDOW and ex.swa_layers == tuple(i for i in range(64) if i % 4 < 3)
    assert [ex.rope_kind(i) for i in range(8)] == [0, 0, 0, NO_ROPE] * 2
    g4 = cfg["glm4"]
    assert (g4.head_dim, g4.rope_dim) == (32, 16)
    m3 = cfg["mistral3"]
    assert (m3.rope_yarn_factor, m3.rope_yarn_beta_fast, m3.rope_yarn_beta_slow, m3.attn_temperature) == (4, 16, 2, 0.5)
    assert m3.rope_attn_factor == pytest.approx((1 + 0.1 * math.log(4)) / (1 + 0.05 * math.log(4)))
    gr = cfg["granite"]
    assert (gr.embedding_scale, gr.residual_scale, gr.logit_scale) == pytest.approx((2.0, 0.7, 1.5))
    assert gr.query_scale == pytest.approx(0.3)
    assert [cfg["smollm3"].rope_kind(i) for i in range(4)] == [0, 0, 0, NO_ROPE]
    assert cfg["gemma"].family.embed_scale and cfg["gemma"].head_dim == 32
    assert cfg["mistral"].sliding_window == WINDOW and cfg["mistral"].swa_layers is None
    assert cfg["gemma2"].swa_layers == (0,) and cfg["gemma2"].attn_softcap == 3.0
    assert cfg["gemma2"].final_softcap == 5.0
    g3 = cfg["gemma3"]
    assert g3.swa_layers == (0, 1, 2, 3, 4) and g3.rope_theta == 1e6 and g3.rope_theta_swa == 1e4
    assert [g3.rope_kind(i) for i in range(6)] == [1, 1, 1, 1, 1, 0] and g3.attn_softcap == 0.0
    assert g3.query_scale == 1 / math.sqrt(32) and cfg["qwen3"].head_dim == 32
    p3 = cfg["phi3"]
    assert p3.rope_orig_context == PHI3_ORIG_CONTEXT and p3.sliding_window == 0
    assert p3.rope_attn_factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(PHI3_ORIG_CONTEXT)))
    assert all(c.window(0) == 0 for n, c in cfg.items() if n in ("llama", "qwen2", "qwen3", "phi3", "olmo2"))
    o3 = cfg["olmo3"]
    assert o3.swa_layers == (0, 1, 2) and o3.sliding_window == WINDOW and o3.rope_yarn_factor == 4
    assert [o3.rope_kind(i) for i in range(4)] == [1, 1, 1, 0] and o3.swa_unscaled_yarn


def test_gemma3n_layout_as_llamacpp_runs_it(tiny):
    """Gemma 3n's file as llama.cpp reads it: the last two layers reuse layer 18's (sliding) and 19's
    (global) K/V and compute none (the file's unused k/v stay out of the model), the first 10 gate
    their FFN sparsely, queries unscaled; a file that says otherwise than llama.cpp's fixed layout is
    refused, naming what."""
    from lowtune.gemma3n import Gemma3nModel
    model = Model.from_gguf(tiny["gemma3n"].gguf)
    c = model.config
    assert type(model) is Gemma3nModel and c.query_scale == 1.0 and c.final_softcap == 30.0
    assert (c.altup_inputs, c.per_layer_dim, c.kv_layers, c.ffn_dim) == (4, 256, 20, 1024)
    assert [c.kv_source(i) for i in (17, 18, 19, 20, 21)] == [17, 18, 19, 18, 19]
    assert [layer.sparsity_std is not None for layer in model.layers] == [True] * 10 + [False] * 12
    assert not hasattr(model.layers[20], "attn_k") and not hasattr(model.layers[21], "attn_k_norm")
    with GGUFFile(tiny["gemma3n"].gguf) as f:
        md = dict(f.metadata)
        w = {n: (f.tensor(n) if len(i.shape) == 1 else f.qtensor(n)) for n, i in f.tensor_infos.items()}
    assert "blk.20.attn_k.weight" in w
    for key, value, what in [("gemma3n.attention.shared_kv_layers", 4, "K/V of their own in 18 layers"),
                             ("gemma3n.activation_sparsity_scale", [1.6448535] * 11 + [-math.inf] * 11,
                              "activation sparsity in layers"),
                             ("gemma3n.final_logit_softcapping", 5.0, "final soft-cap of 5")]:
        with pytest.raises(ValueError, match=f"{what}.*llama.cpp"):
            Gemma3nModel(ModelConfig.from_gguf_metadata({**md, key: value}), w)
    with pytest.raises(ValueError, match="FFNs of different widths"):
        ModelConfig.from_gguf_metadata({**md, "gemma3n.feed_forward_length": [1024] * 21 + [512]})
    with pytest.raises(ValueError, match="lacks tensor 'blk.3.laurel_l.weight'"):
        Gemma3nModel(c, {k: v for k, v in w.items() if k != "blk.3.laurel_l.weight"})
    from lowtune import hf_names
    cfg = json.loads((tiny["gemma3n"].hf_dir / "config.json").read_text())
    for change, what in [({"laurel_rank": 32}, "laurel_rank"), ({"altup_correct_scale": False}, "altup_correct_scale"),
                         ({"attention_bias": True}, "attention_bias")]:
        with pytest.raises(ValueError, match=f"{what}.*llama.cpp's gemma3n does not run"):
            hf_names.metadata_from_hf_config({**cfg, **change})


def test_gemma3n_multimodal_directory_reads_its_text_model(tiny, tmp_path):
    """A Gemma3nForConditionalGeneration directory (the released checkpoints) is read as llama.cpp's converter
    reads it: the language model under model.language_model, its config under text_config, the vision and audio
    towers and their embedders left out; the per-layer table, shorter than the vocabulary (its vision and audio
    tokens), padded with zero rows as the converter pads it. Its logits are the text model's; in bf16 the text
    model's directory gives the converted GGUF's bf16 logits (test_bf16_activations_follow_fp32 holds those to
    transformers' own bf16)."""
    import lowtune
    from lowtune.loading import open_source
    from safetensors.torch import load_file, save_file
    src, d = tiny["gemma3n"].hf_dir, tmp_path / "gemma3n-mm"
    d.mkdir()
    text = json.loads((src / "config.json").read_text())
    extra = 8  # (tokens past the per-layer table: the vision and audio tokens of the released models)
    w = {k.replace("model.", "model.language_model.", 1): v for k, v in load_file(src / "model.safetensors").items()}
    w["model.language_model.embed_tokens.weight"] = torch.cat([w["model.language_model.embed_tokens.weight"],
                                                                torch.randn(extra, D)])
    tower = {"model.vision_tower.timm_model.conv_stem.conv.weight": torch.randn(4, 3, 3, 3),
             "model.audio_tower.conformer.0.attention.attn.q_proj.weight": torch.randn(8, 8),
             "model.embed_vision.embedding.weight": torch.randn(4, D),
             "model.embed_audio.embedding_projection.weight": torch.randn(D, 8)}
    save_file({**w, **tower}, d / "model.safetensors")
    text.update(vocab_size=text["vocab_size"] + extra, model_type="gemma3n_text")
    (d / "config.json").write_text(json.dumps({"architectures": ["Gemma3nForConditionalGeneration"],
                                               "model_type": "gemma3n", "text_config": text,
                                               "vision_config": {"model_type": "gemma3n_vision"},
                                               "audio_config": {"model_type": "gemma3n_audio"}}))
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(src / f, d / f)
    ids = rand_ids(2, SEQ)
    with open_source(d) as mm:
        table = mm.tensor("per_layer_token_embd.weight")
        assert table.shape[0] == text["vocab_size"] and not table[-extra:].any()
        assert not any(n.startswith(("vision", "audio", "embed_")) for n in mm.tensor_infos)
    with torch.no_grad():
        got, want = lowtune.load_model(d, qtype="F32")(ids), Model.from_gguf(tiny["gemma3n"].gguf)(ids)
        assert rel_err(got[..., :V], want) < 1e-6
        bf16 = lowtune.load_model(src, qtype="F32", dtype=torch.bfloat16)(ids)
        assert torch.equal(bf16, Model.from_gguf(tiny["gemma3n"].gguf, dtype=torch.bfloat16)(ids))


def assert_recomputed_lora_gradients_equal(model):
    """LoRA on every linear of `model`, filled: every adapter gets a gradient, and recomputing the layers in
    backward (gradient checkpointing) gives the same gradients."""
    adapters.apply_adapters(model, adapters.AdapterConfig(method="lora", rank=4, alpha=8, seed=1))
    params = adapters.mark_only_adapters_trainable(model)
    fill_adapters(model, torch.Generator().manual_seed(3))
    ids, grads = rand_ids(2, 24, seed=4), []
    for recompute in (False, True):
        model.gradient_checkpointing = recompute
        for p in params:
            p.grad = None
        model.loss(ids).backward()
        grads.append([p.grad.clone() for p in params])
    assert all(g.abs().sum() > 0 for g in grads[0])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,what", [("gemma3n", "Gemma 3n"), ("gemma4", "Gemma 4"),
                                       ("gemma4moe", "Gemma 4")])
def test_gemma_refusals_and_checkpointed_training(tiny, name, what):
    """What does not run Gemma 3n's or Gemma 4's layers (with experts too) says so by name (streaming,
    compiled and captured layers, captured decode steps; the compiled CPU decoder leaves it to the model's
    steps), and their checkpointed layers, whose shared K/V cross them, give the gradients of plain ones."""
    from lowtune.compile import compile_model, default_cuda_graphs, default_mode
    from lowtune.generate import StepDecoder, cpu_decoder
    from lowtune.streaming import stream_model
    model = Model.from_gguf(gguf_of(tiny[name], "Q8_0"))
    with pytest.raises(ValueError, match=f"{what}'s layers are not streamed"):
        stream_model(model, "cpu", streamed=[0])
    assert default_mode("cuda", model) == "off" and not default_cuda_graphs("cuda", model)
    compiled = "mixture-of-experts model routes" if name == "gemma4moe" else f"{what}'s layers pass .*shared K/V"
    with pytest.raises(ValueError, match=compiled + ".*--compile off"):  # (the experts' refusal first)
        compile_model(model, "layer")
    with pytest.raises(ValueError, match=f"StepDecoder's captured steps run lowtune.model's decoder layer, not {what}"):
        StepDecoder(model, 32, graphs=False)
    assert cpu_decoder(model, model.new_cache(1, 32)) is None
    # (the first layers' adapters get gradients through the last layers' reuse of their K/V too)
    assert_recomputed_lora_gradients_equal(model)


def test_gemma4_layers_as_llamacpp_runs_them(tiny):
    """Gemma 4's file as llama.cpp reads it: sliding layers of 16-wide heads and two KV heads, global ones of
    32-wide heads, one KV head whose values are attn_k's projection and RoPE on a quarter of each head; the
    last two layers reuse layer 2's (sliding) and 3's (global) K/V with FFNs twice as wide; per-layer inputs
    and output scales; queries unscaled. Files llama.cpp cannot run are refused, naming why."""
    from lowtune.gemma4 import Gemma4Model
    model = Model.from_gguf(tiny["gemma4"].gguf)
    c = model.config
    assert type(model) is Gemma4Model and c.query_scale == 1.0 and c.final_softcap == 5.0
    assert c.layer_widths == ((16, 2, F, 16), (32, 1, F, 32)) * 2 + ((16, 2, 2 * F, 16), (32, 1, 2 * F, 32))
    assert (c.head_dim, c.n_kv_heads, c.ffn_dim, c.rope_dim, c.kv_layers, c.per_layer_dim) == (32, 1, F, 32, 4, 16)
    assert [c.kv_source(i) for i in range(6)] == [0, 1, 2, 3, 2, 3] and c.swa_layers == (0, 2, 4)
    assert [hasattr(layer, "attn_v") for layer in model.layers] == [True, False, True, False, False, False]
    from lowtune.loading import describe  # (`lowtune info`)
    assert describe(tiny["gemma4"].gguf)["config"]["layer_widths"][4] == dict(head_dim=16, kv_heads=2, ffn_dim=2 * F,
                                                                            rope_dim=16)
    assert not hasattr(model.layers[4], "attn_k") and model.layers[5].ffn_up.out_features == 2 * F
    assert [r.shape[-1] for r in model.rope_rotation(0, 3)] == [32, 16]
    assert model.rope_inv_freqs[0][4:].max() < 1e-29 < model.rope_inv_freqs[0][:4].min()  # (rope_freqs' 1e30)
    with GGUFFile(tiny["gemma4"].gguf) as f:
        md = dict(f.metadata)
        w = {n: (f.tensor(n) if len(i.shape) == 1 else f.qtensor(n)) for n, i in f.tensor_infos.items()}
    with pytest.raises(ValueError, match="layers 1 and 2, before the first that reuses K/V, are not sliding and "
                                         "global.*llama.cpp"):
        Gemma4Model(ModelConfig.from_gguf_metadata({**md, "gemma4.attention.shared_kv_layers": 3}), w)
    bare = {k: v for k, v in md.items() if k not in ("gemma4.final_logit_softcapping", "gemma4.rope.freq_base_swa")}
    assert (ModelConfig.from_gguf_metadata(bare).final_softcap, ModelConfig.from_gguf_metadata(bare).rope_theta_swa) \
        == (30.0, 1e4)  # (llama.cpp's defaults)
    with pytest.raises(ValueError, match="value_length_swa.*llama.cpp's gemma4"):
        ModelConfig.from_gguf_metadata({**md, "gemma4.attention.value_length_swa": 32})
    experts = ModelConfig.from_gguf_metadata({**md, "gemma4.expert_count": 8, "gemma4.expert_used_count": 2})
    with pytest.raises(ValueError, match="lacks tensor 'blk.0.ffn_gate_inp.scale'"):  # (a file of experts' keys)
        Gemma4Model(experts, w)
    with pytest.raises(ValueError, match="lacks tensor 'blk.3.inp_gate.weight'"):
        Gemma4Model(c, {k: v for k, v in w.items() if k != "blk.3.inp_gate.weight"})


def test_gemma4_hf_directories(tiny, tmp_path):
    """Gemma 4's HF directories as llama.cpp's converter reads them: Gemma4ForConditionalGeneration's language model
    (its vision and audio towers and their embedders left out) gives its text logits, those of the converted GGUF;
    bf16 activations follow fp32; its merged directory is the checkpoint with its language model merged and its
    towers as they were, its PEFT adapter applies to its language model; RoPE other than the converter's,
    attention biases, and layouts that Gemma4ForCausalLM cannot hold are refused by name."""
    import transformers as tf

    import lowtune
    from lowtune import hf_names
    config = json.loads((tiny["gemma4"].hf_dir / "config.json").read_text())
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16)
    audio = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    hf = tf.Gemma4ForConditionalGeneration(tf.Gemma4Config(text_config={**config, "pad_token_id": 0},
                                                           vision_config=vision, audio_config=audio)).eval()
    with torch.no_grad():
        hf.model.language_model.load_state_dict(hf_model("gemma4").model.state_dict())
    hf.save_pretrained(tmp_path / "mm")
    ids = rand_ids(2, SEQ)
    with torch.no_grad():
        got, want = lowtune.load_model(tmp_path / "mm", qtype="F32")(ids), hf(input_ids=ids).logits
        gguf = Model.from_gguf(tiny["gemma4"].gguf)(ids)
        bf16 = lowtune.load_model(tiny["gemma4"].hf_dir, qtype="F32", dtype=torch.bfloat16)(ids)
    print(f"gemma4: the multimodal checkpoint vs transformers {rel_err(got, want):.2e}, vs the GGUF "
          f"{rel_err(got, gguf):.2e}; bf16 vs fp32 {rel_err(bf16, gguf):.2e}")
    assert rel_err(got, want) < 1e-4 and rel_err(got, gguf) < 1e-6 and rel_err(bf16, gguf) < 5e-2
    # its exports: the merged directory in its own class, the towers as they were; the PEFT adapter on its
    # language model's modules
    import peft

    from lowtune.export import export_hf, export_peft
    from test_export import make_adapter
    model = make_adapter(tmp_path / "mm", tmp_path / "run" / "adapter", "lora", rel=0.2, rank=4)
    export_hf(tmp_path / "mm", tmp_path / "run", tmp_path / "merged", dtype="fp32")
    merged = tf.AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    assert type(merged).__name__ == "Gemma4ForConditionalGeneration"
    towers = {k: v for k, v in hf.state_dict().items() if "language_model" not in k and "lm_head" not in k}
    assert towers and all(torch.equal(merged.state_dict()[k], v) for k, v in towers.items())
    export_peft(tmp_path / "mm", tmp_path / "run", tmp_path / "peft")
    with torch.no_grad():
        got, want = merged(input_ids=ids).logits, model(ids)
        assert rel_err(got, want) < 1e-4 and rel_err(got, gguf) > 1e-2  # (the adapter matters)
        want = lowtune.load_model(tmp_path / "mm", qtype="F32", adapter=tmp_path / "run", force=True)(ids)
        hf = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
        got = hf(input_ids=ids).logits
    adapted = {n.rsplit(".", 2)[0] for n, _ in hf.named_modules() if n.endswith("lora_A.default")}
    # (every linear of 6 layers but the K/V-reusing layers' k and v and the global layers' v, values from k)
    assert len(adapted) == 6 * 7 - 2 * 2 - 2 and all(".language_model.layers." in n for n in adapted)
    print(f"gemma4: PEFT adapter on the multimodal checkpoint vs lowtune, relative error {rel_err(got, want):.2e}")
    assert rel_err(got, want) < 1e-4
    rope = config["rope_parameters"]
    for odd, match in (({"rope_parameters": {**rope, "full_attention": {"rope_type": "default"}}},
                        "'default' .global layers.*'proportional'"),
                       ({"attention_bias": True}, "attention_bias, which llama.cpp's gemma4"),
                       ({"per_layer_config": {}}, "no head_dim .global_head_dim or per_layer_config"),
                       ({"vocab_size_per_layer_input": 2 * V}, "vocab_size_per_layer_input 1024 differs")):
        with pytest.raises(ValueError, match=match):
            hf_names.metadata_from_hf_config({**config, **odd})
    with GGUFFile(tiny["gemma4"].gguf) as f:
        md, infos = dict(f.metadata), dict(f.tensor_infos)
        tensors = {n: (f.tensor(n).tolist() if n in hf_names.GGUF_ONLY else None) for n in infos}
    for odd, match in ((("gemma4.feed_forward_length", [F, 2 * F, F, F, 2 * F, 2 * F]), "FFN widths"),
                       (("gemma4.attention.sliding_window_pattern", [True] * 6), "last layer slides")):
        c = ModelConfig.from_gguf_metadata(dict(md, **dict([odd])))
        with pytest.raises(ValueError, match=f"{match}.*Gemma4ForCausalLM.*export it as GGUF"):
            hf_names.hf_config(c, md, True, "float32", tensors)
    c = ModelConfig.from_gguf_metadata(md)
    with pytest.raises(ValueError, match="not transformers' \"proportional\" RoPE"):
        hf_names.hf_config(c, md, True, "float32", {**tensors, "rope_freqs.weight": [1.0, 1e30] * 8})
    with pytest.raises(ValueError, match="differ in having attn_v"):
        hf_names.hf_config(c, md, True, "float32", {**tensors, "blk.1.attn_v.weight": None})


@pytest.mark.llamacpp
def test_gemma4_without_per_layer_inputs_or_shared_kv(tiny, tmp_path, llamacpp_source, botchan_ids):
    """The 31B's layout: no per-layer inputs, every layer's own K/V, values of their own in the global
    layers too; equal to transformers and to llama.cpp's perplexity; its HF directory reads as the converted GGUF
    and its config is written back."""
    import transformers as tf

    import lowtune
    d = tmp_path / "gemma4-31b-like"
    hf = tf.Gemma4ForCausalLM(tf.Gemma4TextConfig(
        vocab_size=V, hidden_size=D, intermediate_size=F, num_attention_heads=H, num_key_value_heads=HKV,
        max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=None,
        num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2, head_dim=16, global_head_dim=32,
        sliding_window=WINDOW, final_logit_softcapping=30.0, hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=V, num_kv_shared_layers=0))
    randomized(hf, "gemma4").save_pretrained(d)
    for name in ("tokenizer.model", "tokenizer_config.json"):  # (the tiny models' vocabulary)
        shutil.copy(tiny["gemma4"].hf_dir / name, d / name)
    convert(llamacpp_source, [(d, tmp_path / "g4.gguf")])
    model = Model.from_gguf(tmp_path / "g4.gguf")
    assert model.config.per_layer_dim == 0 and model.config.kv_layers == 0
    assert all(hasattr(layer, "attn_v") for layer in model.layers)
    ids = rand_ids(2, SEQ)
    with torch.no_grad():
        assert rel_err(model(ids), hf(ids).logits) < 1e-4
        assert rel_err(lowtune.load_model(d, qtype="F32")(ids), model(ids)) < 1e-6  # (its HF directory)
    from lowtune import hf_names
    with GGUFFile(tmp_path / "g4.gguf") as f:  # (written back: values of their own in the global layers)
        tensors = {n: (f.tensor(n).tolist() if n in hf_names.GGUF_ONLY else None) for n in f.tensor_infos}
        cfg = hf_names.hf_config(model.config, dict(f.metadata), True, "float32", tensors)
    assert cfg["attention_k_eq_v"] is False and cfg["hidden_size_per_layer_input"] == 0
    assert config_fields(ModelConfig.from_gguf_metadata(hf_names.metadata_from_hf_config(cfg)[0])) == \
        pytest.approx(config_fields(model.config))
    want = llamacpp_perplexity(llamacpp(tmp_path / "g4.gguf"), windows(botchan_ids, SEQ, chunks=8))
    assert perplexity(model, botchan_ids, SEQ, chunks=8)["perplexity"] == pytest.approx(want, rel=5e-4)


def test_fused_tensors_are_row_views(tiny):
    """Phi-3's attn_qkv and ffn_up are cut into q/k/v and gate/up without a copy, and the model
    records how they join."""
    model = Model.from_gguf(tiny["phi3"].gguf)
    q, kv = H * (D // H), HKV * (D // H)
    layer = model.layers[1]
    assert layer.attn_q.fused_from == ("blk.1.attn_qkv.weight", 0, q)
    assert layer.attn_v.fused_from == ("blk.1.attn_qkv.weight", q + kv, q + 2 * kv)
    assert layer.ffn_gate.fused_from == ("blk.1.ffn_up.weight", 0, F)
    assert layer.ffn_up.fused_from == ("blk.1.ffn_up.weight", F, 2 * F)
    assert (layer.attn_q.out_features, layer.attn_k.out_features, layer.ffn_up.out_features) == (q, kv, F)
    # views of the memory-mapped file's bytes, one after the other
    row = layer.attn_q.raw.shape[1]
    assert layer.attn_k.raw.data_ptr() == layer.attn_q.raw.data_ptr() + q * row
    assert layer.ffn_up.raw.data_ptr() == layer.ffn_gate.raw.data_ptr() + F * layer.ffn_gate.raw.shape[1]
    assert model.fused_views["blk.0.attn_qkv.weight"] == (
        ("blk.0.attn_q.weight", 0, q), ("blk.0.attn_k.weight", q, q + kv), ("blk.0.attn_v.weight", q + kv, q + 2 * kv))
    assert set(model.fused_views) == {f"blk.{i}.{n}.weight" for i in (0, 1) for n in ("attn_qkv", "ffn_up")}
    with GGUFFile(tiny["phi3"].gguf) as f:
        fused = f.qtensor("blk.1.attn_qkv.weight").raw
        assert torch.equal(torch.cat([layer.attn_q.raw, layer.attn_k.raw, layer.attn_v.raw]), fused)


@pytest.mark.parametrize("name", NAMES + REMOTE_CODE_NAMES + RWKV_NAMES)
def test_kv_cache_matches_the_full_forward(tiny, name):
    """Prefill, a multi-token continuation and single tokens through the cache give the logits of
    one full pass, with sequences longer than the sliding windows."""
    model = Model.from_gguf(tiny[name].gguf)
    ids = rand_ids(1, 40, seed=3)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, ids.shape[1])
        parts = [model(ids[:, :10], cache), model(ids[:, 10:30], cache)]
        parts += [model(ids[:, t:t + 1], cache) for t in range(30, 40)]
    assert rel_err(torch.cat(parts, dim=1), full) < 1e-5


def test_learned_positions_bound_the_context(tiny, tmp_path):
    """GPT-2's position_embd rows are its positions: a sequence, a cached continuation, a prompt or a
    training --seq-len beyond them is refused by name; one within them runs."""
    from lowtune.generate import StepDecoder
    from lowtune.trainer import finetune
    model = Model.from_gguf(tiny["gpt2"].gguf)
    n = model.max_positions
    assert n == model.config.context_length == 256
    with torch.no_grad():
        assert model(rand_ids(1, n)).shape == (1, n, V)
        with pytest.raises(ValueError, match=r"learned embeddings for 256 positions \(position_embd\).*--seq-len"):
            model(rand_ids(1, n + 1))
        cache = model.new_cache(1, n + 8)
        model(rand_ids(1, n - 1), cache)
        with pytest.raises(ValueError, match="257 were asked for"):
            model(rand_ids(1, 2), cache)
    with pytest.raises(ValueError, match="context is 256"):
        generate(model, list(range(n)), 4)
    with pytest.raises(ValueError, match="257 were asked for"):
        StepDecoder(model, n + 1, graphs=False)
    data = tmp_path / "train.txt"
    data.write_text("a b c d e f g\n" * 400)
    with pytest.raises(Exception, match="256 positions.*--seq-len"):
        finetune(tiny["gpt2"].gguf, data, tmp_path / "run", method="lora", seq_len=n + 1, steps=1, device="cpu")


@pytest.mark.parametrize("heads", [1, 2, 4, 6, 12, 16, 40, 112])
def test_alibi_slopes_are_blooms(heads):
    """ALiBi's slopes at llama.cpp's max bias 8 are transformers' BLOOM slopes, for head counts that are
    powers of two and that are not (BLOOM-176B's 112: 64 slopes, then 48 between them)."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    config = ModelConfig(vocab_size=9, dim=heads * 2, n_layers=1, n_heads=heads, n_kv_heads=heads, ffn_dim=4,
                         head_dim=2, rope_dim=2, arch="bloom", alibi_max_bias=8.0)
    want = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)[:, 0, 1]  # (position 1: the slopes)
    torch.testing.assert_close(alibi_slopes(config), want, rtol=1e-6, atol=0)
    assert alibi_slopes(dataclasses.replace(config, alibi_max_bias=0.0)) is None


def mpt_variant(tiny, tmp_path, variant: str):
    """The tiny MPT file with llama.cpp's other MPT layouts: learned positions in place of ALiBi
    (max_alibi_bias 0, position_embd), or LayerNorms of q and k over their whole projections (with biases)."""
    g = torch.Generator().manual_seed(4)
    with GGUFFile(tiny["mpt"].gguf) as f:
        md, types = dict(f.metadata), dict(f.metadata_types)
        tensors = [(n, f.tensor(n)) for n in f.tensor_infos]
    if variant == "learned positions":
        md["mpt.attention.max_alibi_bias"] = 0.0
        tensors.append(("position_embd.weight", 0.25 * torch.randn(md["mpt.context_length"], D, generator=g)))
    else:
        tensors += [(f"blk.{i}.attn_{x}_norm.{kind}", base + 0.2 * torch.randn(D, generator=g))
                    for i in range(md["mpt.block_count"]) for x in "qk"
                    for kind, base in (("weight", 1.0), ("bias", 0.0))]
    path = tmp_path / "mpt-variant.gguf"
    write_gguf(path, md, tensors, metadata_types=types)
    return path


@pytest.mark.llamacpp
def test_mpt_learned_positions_as_llamacpp_runs_them(tiny, botchan_ids, tmp_path):
    """MPT's layout with learned positions in place of ALiBi (transformers' MptForCausalLM has none), which
    llama.cpp runs: at llama.cpp's perplexity, not the ALiBi file's, its cache's steps equal to the full
    forward and its context bounded by the positions."""
    path = mpt_variant(tiny, tmp_path, "learned positions")
    model = Model.from_gguf(path)
    assert model.position_embd is not None and model.layers[0].alibi_slopes is None
    w = windows(botchan_ids, SEQ, chunks=8)
    want = llamacpp_perplexity(llamacpp(path), w)
    got = perplexity(model, botchan_ids, SEQ, chunks=8)["perplexity"]
    alibi = perplexity(Model.from_gguf(tiny["mpt"].gguf), botchan_ids, SEQ, chunks=8)["perplexity"]
    print(f"mpt, learned positions: perplexity lowtune {got:.4f}, llama.cpp {want:.4f}, with ALiBi {alibi:.4f}")
    assert abs(got - want) / want < 5e-4 and abs(alibi - want) / want > 1e-3
    ids = rand_ids(1, 40, seed=3)
    with torch.no_grad():
        full, cache = model(ids), model.new_cache(1, 40)
        parts = [model(ids[:, :10], cache)] + [model(ids[:, t:t + 1], cache) for t in range(10, 40)]
        assert rel_err(torch.cat(parts, dim=1), full) < 1e-5
        with pytest.raises(ValueError, match="learned embeddings for 256 positions"):
            model(rand_ids(1, 257))


def test_mpt_qk_layernorms_are_refused(tiny, tmp_path):
    """MPT files with q/k LayerNorms (qk_ln) are refused by name: llama.cpp's graph fails on them."""
    with pytest.raises(ValueError, match="attn_q_norm.*MPT's q/k LayerNorms, qk_ln.*llama.cpp"):
        Model.from_gguf(mpt_variant(tiny, tmp_path, "q/k LayerNorms"))


def test_bloom_and_mpt_hf_configs(tiny, tmp_path):
    """BLOOM's and MPT's config.json in their own keys as llama.cpp's converter reads them (BLOOM's context from
    seq_length, MPT's clip_qkv and alibi_bias_max from attn_config); what their transformers classes do not hold or
    llama.cpp does not run is refused by name, and so is a merged MptForCausalLM of MPT with learned positions."""
    from lowtune import hf_names
    from lowtune.export import export_hf
    cfg = {n: json.loads((tiny[n].hf_dir / "config.json").read_text()) for n in ("bloom", "mpt")}
    md = {n: hf_names.metadata_from_hf_config(c)[0] for n, c in cfg.items()}
    assert (md["bloom"]["bloom.context_length"], md["bloom"]["bloom.attention.head_count_kv"]) == (256, BLOOM_HEADS)
    assert (md["mpt"]["mpt.attention.max_alibi_bias"], md["mpt"]["mpt.attention.clamp_kqv"]) == (8.0, MPT_CLIP_QKV)
    assert hf_names.adapter_targets(["Wqkv", "out_proj"], "mpt") == ("attn_q", "attn_k", "attn_v", "attn_output")
    attn = cfg["mpt"]["attn_config"]
    for name, change, why in [
            ("bloom", {"apply_residual_connection_post_layernorm": True}, "residual after the norm"),
            ("mpt", {"attn_config": {**attn, "alibi": False}}, "alibi false .learned positions"),
            ("mpt", {"attn_config": {**attn, "kv_n_heads": 1}}, "kv_n_heads"),
            ("mpt", {"attn_config": {**attn, "qk_ln": True}}, "qk_ln"), ("mpt", {"no_bias": False}, "biases"),
            ("mpt", {"expansion_ratio": 2}, "expansion_ratio")]:
        with pytest.raises(ValueError, match=why):
            hf_names.metadata_from_hf_config({**cfg[name], **change})
    with pytest.raises(ValueError, match="learned positions in place of ALiBi, which MptForCausalLM does not hold"):
        export_hf(mpt_variant(tiny, tmp_path, "learned positions"), None, tmp_path / "hf", dtype="fp32")


def test_pretokenizers_of_gpt2_starcoder_bloom_and_mpt_are_known():
    """The pre-tokenizers llama.cpp's converter writes for GPT-2, StarCoder (SantaCoder's and Refact's
    vocabularies among its models), BLOOM and MPT are among those lowtune tokenizes with (the tiny models
    share a SentencePiece vocabulary)."""
    from lowtune.tokenizer import _PRE
    assert {"gpt-2", "starcoder", "refact", "bloom", "mpt"} <= set(_PRE)


def test_starcoder_without_multi_query_is_refused(tiny):
    """llama.cpp's converter writes one K/V head into every StarCoder file; a GPT-BigCode model without
    multi-query attention (K/V rows for every head) is refused, saying so."""
    with GGUFFile(tiny["starcoder"].gguf) as f:
        md = dict(f.metadata)
        w = {n: (f.tensor(n) if len(i.shape) == 1 else f.qtensor(n)) for n, i in f.tensor_infos.items()}
    config = ModelConfig.from_gguf_metadata(md)
    Model(config, w)
    w.update({"blk.0.attn_qkv.weight": ops.quantize(torch.randn(3 * D, D), "F32"),
              "blk.0.attn_qkv.bias": torch.zeros(3 * D)})
    with pytest.raises(ValueError, match="attn_qkv.*GPT-BigCode model without multi-query attention"):
        Model(config, w)


# The families the compiled CPU decoder runs here: all (Ministral 3's tiny model only up to its
# original context, 16 positions: where its queries are scaled by position the decoder is not used)
# (Ministral 3 scales queries by position; Phi-2's head has a bias; StableLM 2 12B's LayerNorms of q and k; LFM2's
# short convolutions, the Mamba2 layers of Granite 4, Nemotron-H, Mamba-2 and Falcon-H1, Mamba's layers and Qwen3.5's
# Gated DeltaNets, whose states the decoder does not keep; Gemma 3n's AltUp, Laurel and per-layer inputs; Gemma 4's
# layers of two widths; MiniCPM3's latent attention; OLMo's clipped q/k/v
# (test_olmo_norms_without_weights_and_clipped_qkv); GPT-2's and StarCoder's learned positions; BLOOM's and MPT's ALiBi,
# BLOOM's embedding norm, MPT's clamped q/k/v; BitNet's sub-norms; Deci's and OpenELM's layers of their own parts
# and widths; Jais's ALiBi and muP query scale, Refact's ALiBi; PLM's latent attention)
COMPILED_DECODER = tuple(n for n in NAMES + REMOTE_CODE_NAMES
                         if n not in ("mistral3", "phi2", "lfm2", "gemma3n", "gemma4", "granitehybrid", "qwen35",
                                      "nemotron_h", "stablelm2-12b", "minicpm3", "olmo", "bitnet", "mamba2",
                                      "falcon-h1", "mamba", "gpt2", "starcoder", "bloom", "mpt", "deci", "openelm",
                                      "jais", "refact", "plm", "plamo2"))


@pytest.mark.parametrize("name", NAMES + REMOTE_CODE_NAMES + RWKV_NAMES)
def test_compiled_cpu_decoder_follows_the_model(tiny, name):
    """Where lowtune._C.CpuDecoder applies (biases, LayerNorm's too, q/k norms, RoPE on halves, NoPE
    layers, Granite's scales, YaRN, Gemma's GeGLU, relu², xIELU and GELU without a gate, post-norms,
    parallel layers with one norm or two, soft-caps, windows and sliding layers' own RoPE base), each
    step's logits are the model's own."""
    from lowtune.generate import cpu_decoder
    model = Model.from_gguf(gguf_of(tiny[name], "Q8_0"))
    # 40 positions: past the windows, YaRN's original context and Phi-3's (LongRoPE's long factors)
    steps, _, _ = compiled_decoder_steps(model, rand_ids(1, 40, seed=5), 8)
    assert (steps is not None) == (name in COMPILED_DECODER)
    if name == "mistral3":
        assert cpu_decoder(model, model.new_cache(1, 16)) is not None
    for t, (got, want) in enumerate(steps or []):
        assert rel_err(got, want) < 1e-5, t


# Gemma 3n's tiny model runs 22 layers, whose sparse FFN gates cut at a quantile: bf16 moves its
# logits by more than 5 % in transformers too, so lowtune's bf16 is held to transformers' own
BF16_AS_TRANSFORMERS = ("gemma3n",)


@pytest.mark.parametrize("name", NAMES + REMOTE_CODE_NAMES + RWKV_NAMES)
def test_bf16_activations_follow_fp32(tiny, name):
    """The GPU activation dtype through every family's code path (soft-caps, q/k norms, neox RoPE,
    fused views), on the CPU: close to fp32, with a finite loss."""
    fp32 = Model.from_gguf(tiny[name].gguf)
    bf16 = Model.from_gguf(tiny[name].gguf, dtype=torch.bfloat16)
    ids = rand_ids(2, 40, seed=6)
    with torch.no_grad():
        bound = 5e-2
        if name in BF16_AS_TRANSFORMERS:
            hf = hf_model(name)
            want = hf(ids).logits
            bound = 1.2 * rel_err(hf.to(torch.bfloat16)(ids).logits, want)
            print(f"{name}: transformers' bf16 logits vs its fp32, relative error {bound / 1.2:.2e}")
        assert rel_err(bf16(ids), fp32(ids)) < bound
    loss = bf16.loss(ids)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ----------------------------------------------------------------------------------------------
# against llama.cpp

@pytest.fixture(scope="module")
def botchan_ids(tiny, botchan_text):
    """The tiny models' tokens of part of Botchan (lowtune's tokenizer; checked against llama.cpp's)."""
    from llama_cpp import Llama
    text = botchan_text[20000:40000]
    tok = load_tokenizer(Model.from_gguf(tiny["llama"].gguf).metadata)
    ids = tok.encode(text, add_bos=False)
    vocab = Llama(model_path=str(tiny["llama"].gguf), vocab_only=True, verbose=False)
    assert ids == vocab.tokenize(text.encode("utf-8"), add_bos=False)
    return ids


# LFM2's convolution layers multiply two products (B·x, then C by the convolution): their heavier-tailed
# activations lose more to llama.cpp's 8-bit rounding of them (0.54 % at Q4_0 on the tiny model, LFM2-MoE's
# 0.93 % at Q8_0; with lowtune rounding them as llama.cpp does, 0.26 % and 0.2 %:
# test_lfm2_quantized_perplexity_is_llamacpps_rounding)
QUANTIZED_TOL = {"lfm2": 1e-2, "qwen35": 1e-2}


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype,tol", [("F32", 5e-4), ("Q8_0", 5e-3), ("Q4_0", 5e-3)])
@pytest.mark.parametrize("name", LLAMACPP_NAMES)
def test_perplexity_matches_llamacpp(tiny, botchan_ids, name, qtype, tol):
    path = gguf_of(tiny[name], qtype)
    w = windows(botchan_ids, SEQ, chunks=8)
    want = llamacpp_perplexity(llamacpp(path), w)
    model = Model.from_gguf(path)
    if qtype != "F32":  # (Nemotron-H's first MLP is layer 1's; Mamba-2 has none; RWKV's is its channel mix)
        mlp = model.config.mlp_layers
        linear = "blk.0.ssm_out" if mlp == () else f"blk.{(mlp or (0,))[0]}.ffn_down"
        linear = "blk.0.channel_mix_value" if model.config.family.rwkv and not model.config.family.rwkv_mlp else linear
        assert model.tensor_types[linear + ".weight"] == qtype
        tol = QUANTIZED_TOL.get(name, tol)
    got = perplexity(model, botchan_ids, SEQ, chunks=8)["perplexity"]
    print(f"{name} {qtype}: perplexity lowtune {got:.4f}, llama.cpp {want:.4f} ({(got - want) / want:+.4%})")
    assert abs(got - want) / want < tol, (got, want)


@pytest.mark.llamacpp
@pytest.mark.parametrize("name,qtype", [("lfm2", "Q8_0"), ("lfm2", "Q4_0"), ("lfm2moe", "Q8_0"), ("qwen35", "Q8_0"),
                                        ("qwen35", "Q4_0")])
def test_lfm2_quantized_perplexity_is_llamacpps_rounding(tiny, botchan_ids, name, qtype):
    """LFM2's (and LFM2-MoE's, Qwen3.5's) quantized perplexity is llama.cpp's within the other families'
    0.5 % once lowtune rounds the activations of its products as llama.cpp does (the convolutions'
    kernels stay in F32)."""
    from lowtune.llamacpp_activations import rounded_like_llamacpp
    path = gguf_of(tiny[name], qtype)
    want = llamacpp_perplexity(llamacpp(path), windows(botchan_ids, SEQ, chunks=8))
    model = Model.from_gguf(path)
    linear, kernel = ("attn_qkv", "ssm_conv1d") if name == "qwen35" else ("shortconv.in_proj", "shortconv.conv")
    assert model.tensor_types[f"blk.0.{linear}.weight"] == qtype
    assert model.tensor_types[f"blk.0.{kernel}.weight"] == "F32"
    with rounded_like_llamacpp():
        got = perplexity(model, botchan_ids, SEQ, chunks=8)["perplexity"]
    print(f"{name} {qtype}, activations rounded as llama.cpp's: perplexity lowtune {got:.4f}, llama.cpp {want:.4f}")
    assert abs(got - want) / want < 5e-3, (got, want)


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", LLAMACPP_NAMES)
def test_chat_generation_matches_llamacpp(tiny, name):
    """Greedy tokens from a chat-template prompt longer than the window, through the KV cache."""
    model = Model.from_gguf(tiny[name].gguf)
    tok = load_tokenizer(model.metadata)
    question = "What did the old servant say when I left the house for the school in the country?"
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": question}]), add_bos=False)
    assert prompt[0] == tok.bos_id and len(prompt) > WINDOW and len(prompt) + 16 > PHI3_ORIG_CONTEXT
    got = generate(model, prompt, max_new_tokens=16)
    assert got == llamacpp_greedy(llamacpp(tiny[name].gguf), prompt, len(got))
    stop = set(tok.eog_ids)
    kept = [t for t in got[:next((i for i, t in enumerate(got) if t in stop), len(got))]]
    assert generate_text(model, tok, question, max_new_tokens=16, chat=True) == tok.decode(kept)


@pytest.mark.llamacpp
@pytest.mark.parametrize("vocab", ["qwen2", "phi-3", "llama-bpe"])
def test_tokenizer_matches_llamacpp_vocab_tests(llamacpp_source, vocab):
    """llama.cpp's tokenizer test cases (test-tokenizer-0): each .inp case tokenized without BOS
    gives the ids on the same line of .out."""
    base = llamacpp_source / "models" / f"ggml-vocab-{vocab}.gguf"
    with GGUFFile(base) as f:
        tok = load_tokenizer(dict(f.metadata))
    cases = base.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    want = base.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
    assert len(cases) >= 40
    for text, ids in zip(cases, want):
        assert tok.encode(text, add_bos=False, add_eos=False) == [int(i) for i in ids.split()], repr(text)


def test_jais2_layer_norms_and_no_window(tiny):
    """Jais 2's norms are LayerNorms of the file's weights and biases as they are (not Nemotron's 1 + w), and
    llama.cpp's jais2 reads no window: a file that gives one attends globally."""
    model = Model.from_gguf(tiny["jais2"].gguf)
    assert type(model.layers[0].attn_norm) is LayerNorm and model.layers[0].attn_norm.bias is not None
    assert FAMILIES["jais2"].hf_norm_offset == 0.0
    windowed = ModelConfig.from_gguf_metadata({**model.metadata, "jais2.attention.sliding_window": 16})
    assert windowed.sliding_window == 0 and not any(windowed.is_sliding(i) for i in range(windowed.n_layers))


@pytest.mark.llamacpp
def test_apertus_xielu_scalars_and_llama3_rope(tiny, llamacpp_source, tmp_path):
    """Apertus's xIELU scalars: one per layer from the file (a single value serves every layer, as
    llama.cpp reads it), refused where absent or of another length. Its own default RoPE, Llama 3's
    scaling (Apertus-8B's, here over an original context shorter than the test sequence), becomes
    the converter's rope_freqs: the converted GGUF and the directory give transformers' logits,
    llama.cpp's perplexity is lowtune's, and the HF export, which cannot recover that scaling, is
    refused."""
    import shutil

    import transformers as tf

    import lowtune
    from lowtune.export import export_hf
    with GGUFFile(tiny["apertus"].gguf) as f:
        md = dict(f.metadata)
    assert ModelConfig.from_gguf_metadata({**md, "xielu.beta": 0.25}).xielu[1][2] == 0.25
    with pytest.raises(ValueError, match="lacks xielu.eps .*llama.cpp's converter writes them"):
        ModelConfig.from_gguf_metadata({k: v for k, v in md.items() if k != "xielu.eps"})
    with pytest.raises(ValueError, match="xielu.alpha_n holds 1 values for 2 layers"):
        ModelConfig.from_gguf_metadata({**md, "xielu.alpha_n": [0.1]})
    hf = randomized(tf.ApertusForCausalLM(tf.ApertusConfig(
        vocab_size=V, hidden_size=D, intermediate_size=F, num_attention_heads=H, num_key_value_heads=HKV,
        num_hidden_layers=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        pad_token_id=None, tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 32,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0})), "apertus")
    hf.save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tiny["apertus"].hf_dir / name, tmp_path / "hf" / name)
    convert(llamacpp_source, [(tmp_path / "hf", tmp_path / "apertus.gguf")])
    ids = rand_ids(2, SEQ)
    with torch.no_grad():
        want = hf(ids).logits
        got, from_dir = Model.from_gguf(tmp_path / "apertus.gguf"), lowtune.load_model(tmp_path / "hf", qtype="F32")
        assert rel_err(got(ids), want) < 1e-4 and rel_err(from_dir(ids), want) < 1e-4
        plain = Model.from_gguf(tmp_path / "apertus.gguf")
        plain.rope_inv_freq = rope_inv_freq(plain.config)[None]  # without the factors
        assert rel_err(plain(ids), want) > 1e-3
    with GGUFFile(tmp_path / "apertus.gguf") as f:
        assert "rope_freqs.weight" in f.tensor_infos
    ppl_ids = rand_ids(4, SEQ, seed=9)
    with torch.no_grad():
        ours = math.exp(float(got.loss(ppl_ids)))
    theirs = llamacpp_perplexity(llamacpp(tmp_path / "apertus.gguf"), ppl_ids)
    assert abs(ours - theirs) / theirs < 5e-4, (ours, theirs)
    with pytest.raises(ValueError, match="rope_freqs"):
        export_hf(tmp_path / "apertus.gguf", None, tmp_path / "out")


def test_hunyuan_ntk_alpha_becomes_the_rope_base():
    """Hunyuan's config.json scales RoPE by an NTK alpha; llama.cpp's converter writes the base it
    makes, base · alpha^(d/(d-2)) (11158839.9 for Hunyuan-7B's alpha 1000 and d 128), and for
    "dynamic" a 256k context. Reading the directory does the same."""
    from lowtune.hf_names import metadata_from_hf_config
    cfg = {"architectures": ["HunYuanDenseV1ForCausalLM"], "model_type": "hunyuan_v1_dense", "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 8,
           "head_dim": 128, "vocab_size": 1000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
           "use_qk_norm": True, "rope_theta": 10000.0,
           "rope_scaling": {"type": "dynamic", "alpha": 1000.0, "factor": 1.0}}
    md, _ = metadata_from_hf_config(cfg)
    assert md["hunyuan-dense.rope.freq_base"] == pytest.approx(11158839.9251, rel=1e-6)
    assert md["hunyuan-dense.context_length"] == 256 * 1024
    with pytest.raises(ValueError, match="'dynamic' is not supported"):  # (dynamic NTK by factor alone)
        metadata_from_hf_config({**cfg, "rope_scaling": {"type": "dynamic", "factor": 2.0}})


# ----------------------------------------------------------------------------------------------
# adapters and streaming on every family


def merged_weights(model) -> dict:
    """GGUF-named weights of `model` with every adapter merged into an F32 copy of its base, fused
    tensors written as their separate parts, biases kept."""
    norm = model.config.family.output_norm_tensor  # (LFM2's token_embd_norm)
    norm_weights = model.config.family.norm_weights  # (OLMo's file holds none)
    w = {"token_embd.weight": model.tok_embd.weight, **({norm + ".weight": model.output_norm.weight} if norm_weights
                                                       else {})}
    if getattr(model.output_norm, "bias", None) is not None:  # (Phi-2)
        w[norm + ".bias"] = model.output_norm.bias
    if model.output is not None:
        w["output.weight"] = model.output.weight
        if model.output.bias is not None:
            w["output.bias"] = model.output.bias
    for i, layer in enumerate(model.layers):
        p = f"blk.{i}."
        children = list(layer.named_children())
        if getattr(layer, "shortconv", None) is not None:  # (LFM2: the convolution's linears, and its kernel)
            conv = layer.shortconv
            children = [(n, m) for n, m in children if n != "shortconv"] + [
                ("shortconv." + n, m) for n, m in conv.named_children()]
            w[p + "shortconv.conv.weight"] = ops.quantize(conv.kernel, "F32")
        if getattr(layer, "mamba", None) is not None:  # (a Mamba2 layer's frozen tensors; an RWKV layer has none)
            children = [(n, m) for n, m in children if n != "mamba"]
            w.update({p + n: ops.quantize(t, "F32") if t.dim() == 2 else t
                      for n, t in layer.mamba.frozen_tensors().items()})
        if getattr(layer, "delta_net", False):  # (Qwen3.5: the Gated DeltaNet's frozen parts)
            w.update({p + "ssm_conv1d.weight": ops.quantize(layer.ssm_conv1d, "F32"), p + "ssm_a": layer.ssm_a,
                      p + "ssm_dt.bias": layer.ssm_dt})
        for name, mod in children:
            if isinstance(mod, adapters.AdaptedLinear):
                dense = ops.dequantize(mod.base.weight) + mod.delta_weight()
                w[p + name + ".weight"] = ops.quantize(dense, "F32")
                mod = mod.base
            elif isinstance(mod, QLinear):
                w[p + name + ".weight"] = mod.weight
            else:  # norms (a NoNorm has no weight; Phi-2's LayerNorms have biases), under their file names
                file_name = layer.norm_files.get(name, name)
                if mod.weight is not None and norm_weights:
                    w[p + file_name + ".weight"] = mod.weight
                if getattr(mod, "bias", None) is not None:
                    w[p + file_name + ".bias"] = mod.bias
                continue
            if mod.bias is not None:
                w[p + name + ".bias"] = mod.bias
    return w


@pytest.mark.parametrize("name", NAMES + REMOTE_CODE_NAMES + RWKV_NAMES)
def test_adapters_wrap_every_logical_linear(tiny, name):
    model = Model.from_gguf(gguf_of(tiny[name], "F32"))
    ads = adapters.apply_adapters(model, adapters.AdapterConfig(method="lora", rank=4, alpha=8, seed=1))
    c = model.config
    targets = [t for t in LINEAR_NAMES if c.family.gated or t != "ffn_gate"]  # (Arcee: no gate)
    if c.kv_lora_rank:  # (MiniCPM3's latent attention: q through its latent, PLM's straight; attn_kv_b whole)
        q = ["attn_q_a", "attn_q_b"] if c.q_lora_rank else ["attn_q"]
        targets = q + ["attn_kv_a_mqa", "attn_kv_b", "attn_output"] + targets[4:]
    conv = ["shortconv." + t for t in CONV_LINEAR_NAMES] + targets[4:]  # (LFM2's convolution layers)
    ssm = list(MAMBA_LINEAR_NAMES if c.family.mamba1 else SSM_LINEAR_NAMES) + targets[4:]  # (Mamba2, Mamba)
    delta = [t for t in DELTA_LINEAR_NAMES if t != "ssm_ba"] + targets[4:]  # (Qwen3.5's Gated DeltaNets)
    linear = ["attn_output"] + targets[4:]  # (Deci's linear in attention's place)
    kinds = lambda i: (conv if c.is_conv(i) else targets + ssm[:2] if c.is_ssm(i) and c.has_attention(i)  # noqa: E731
                       else ssm if c.is_ssm(i) else delta if c.is_delta(i)  # (Falcon-H1: both)
                       else rwkv_linear_names(c) if c.family.rwkv
                       else linear if i in c.linear_attention_layers else targets)
    parts = lambda i: [t for t in kinds(i) if (c.has_ffn(i) if t.startswith(("ffn_", "channel_mix_"))  # noqa: E731
                                                else c.has_mixer(i))]  # (Nemotron-H: a mixer or an MLP a layer)
    # (Gemma 3n's and Gemma 4's last layers compute no K/V: theirs are earlier layers'; Gemma 4's global
    # layers without attn_v take their values from attn_k)
    with GGUFFile(tiny[name].gguf) as f:
        names = set(f.tensor_infos)
    assert set(ads) == {f"layers.{i}.{t}" for i in range(c.n_layers) for t in parts(i)
                        if (c.has_kv(i) or t not in ("attn_k", "attn_v"))
                        and (t != "attn_v" or not c.family.values_from_keys or f"blk.{i}.attn_v.weight" in names)}
    fill_adapters(model, torch.Generator().manual_seed(2))
    ids = rand_ids(2, 40, seed=5)
    with torch.no_grad():
        got = model(ids)
    # the same update merged into dense copies of the bases (a fused tensor's parts separately)
    weights = merged_weights(model)
    # the rest as the file has it: LongRoPE's factors, Gemma 3n's AltUp, GPT-2's positions (a fused tensor's bias
    # is its parts': GPT-2's and GPT-NeoX's attn_qkv.bias)
    fused = set(model.fused_views) | {n.removesuffix("weight") + "bias" for n in model.fused_views}
    with GGUFFile(tiny[name].gguf) as f:
        weights.update({n: f.qtensor(n) if len(info.shape) > 1 else f.tensor(n) for n, info in f.tensor_infos.items()
                        if n not in weights and n not in fused})
    if name in ("phi3", "phi4", "qwen"):
        assert ads["layers.0.attn_k"].base.fused_from[0] == "blk.0.attn_qkv.weight"
    if name in ("llama", "qwen2", "qwen"):  # (Qwen's a row range of its fused attn_qkv's bias)
        assert ads["layers.1.attn_v"].base.bias is not None
    merged = type(model)(model.config, weights)
    with torch.no_grad():
        want = merged(ids)
    assert rel_err(got, want) < 1e-5
    assert rel_err(got, Model.from_gguf(tiny[name].gguf)(ids).detach()) > 1e-3


@pytest.mark.parametrize("name", ["phi3", "qwen2", "gemma3", "bitnet", "gpt2", "bloom", "gptneox", "falcon-40b"])
def test_streaming_layers_with_fused_views_and_biases(tiny, name):
    """A streamed model trains as the resident one (losses and adapter gradients), with Phi-3's
    fused tensors, Qwen2's biases, Gemma 3's extra norms, BitNet's sub-norms, GPT-NeoX's fused tensor with a
    bias and Falcon 40B's two norms of a parallel layer in the streamed layers, GPT-2's learned positions and
    BLOOM's ALiBi around them."""
    def adapted():
        return with_filled_lora(Model.from_gguf(gguf_of(tiny[name], "Q8_0")))

    resident, streaming, plan = resident_and_streamed(adapted, "cpu")
    assert plan.streamed == list(range(streaming.config.n_layers))
    pack = streaming.streamer.packs[0]
    # every packed byte of the layer is in its pack once: fused parts are disjoint row ranges
    assert pack.nbytes >= sum(lin.raw.numel() for lin in pack.linears)
    assert_trains_alike(resident, streaming, rand_ids(2, 24, seed=4))


@pytest.mark.parametrize("name", ["lfm2", "qwen35", "granitehybrid", "nemotron_h", "plamo2", "deci"])
def test_hybrid_layers_of_two_kinds_stream(tiny, name):
    """The hybrids' layers differ by kind beside the same MLP (LFM2: a convolution's in_proj/out_proj;
    Qwen3.5: a Gated DeltaNet's five linears; Granite 4.0 H: a Mamba2 layer's ssm_in/ssm_out; PLaMo 2: a Mamba
    layer's ssm_in/ssm_x/ssm_dt/ssm_out; or attention's q/k/v/output; Nemotron-H: one of those mixers or an MLP a
    layer; Deci: attention, a linear, an MLP alone or nothing, MLPs of their own widths): streamed, the first two
    read from the file, the model trains as the resident one, every layer's pack holding its own kind's matrices."""
    path = gguf_of(tiny[name], "Q8_0")

    def adapted():
        return with_filled_lora(Model.from_gguf(path))

    resident, streaming, plan = resident_and_streamed(adapted, "cpu", disk_layers=[0, 1], source=path)
    c = resident.config
    assert plan.streamed == list(range(c.n_layers)) and plan.disk_layers == [0, 1]
    packs = streaming.streamer.packs
    own = {"conv": ["shortconv.in_proj", "shortconv.out_proj"],
           "ssm": list(MAMBA_LINEAR_NAMES if c.family.mamba1 else SSM_LINEAR_NAMES),
           "delta": [n for n in DELTA_LINEAR_NAMES if n != "ssm_ba"],  # (Qwen3-Next's fused b and a)
           "attention": [f"attn_{n}" for n in ("q", "k", "v", "output")], "linear": ["attn_output"], "mlp": []}
    kind = lambda i: ("mlp" if not c.has_mixer(i) else "conv" if c.is_conv(i)  # noqa: E731
                      else "ssm" if c.is_ssm(i) else "delta" if c.is_delta(i)
                      else "linear" if i in c.linear_attention_layers else "attention")
    ffn = lambda i: [n for n in ("ffn_down", "ffn_gate", "ffn_up")  # noqa: E731
                     if c.has_ffn(i) and (c.family.gated or n != "ffn_gate")]
    assert {kind(i) for i in range(c.n_layers)} > {"attention"}  # (two kinds)
    for i in range(c.n_layers):
        assert sorted(lin.name.split(".", 2)[2] for lin in packs[i].linears) == sorted(
            n + ".weight" for n in ffn(i) + own[kind(i)]), i
    attending = next(i for i in range(c.n_layers) if kind(i) == "attention")
    other = next(i for i in range(c.n_layers) if kind(i) != "attention")
    assert packs[other].nbytes != packs[attending].nbytes  # (the slots hold the larger)
    assert_trains_alike(resident, streaming, rand_ids(2, 24, seed=4))


@pytest.mark.parametrize("name", ["mamba2", "mamba"])
def test_layers_without_attention_stream(tiny, name):
    """Mamba-2's and Mamba's layers hold no attention and no FFN: streamed (the first two read from the file), each
    pack holds its mixer's linears alone, and the model trains as the resident one; its cache keeps no
    keys, only the states."""
    path = gguf_of(tiny[name], "Q8_0")

    def adapted():
        return with_filled_lora(Model.from_gguf(path))

    resident, streaming, plan = resident_and_streamed(adapted, "cpu", disk_layers=[0, 1], source=path)
    c = resident.config
    assert plan.streamed == list(range(c.n_layers)) and not any(c.has_attention(i) for i in range(c.n_layers))
    for i in range(c.n_layers):
        assert sorted(lin.name.split(".", 2)[2] for lin in streaming.streamer.packs[i].linears) == [
            n + ".weight" for n in sorted(MAMBA_LINEAR_NAMES if name == "mamba" else SSM_LINEAR_NAMES)], i
    assert_trains_alike(resident, streaming, rand_ids(2, 24, seed=4))
    cache = resident.new_cache(1, 8)
    assert all(k.numel() == 0 for k in cache.k + cache.v)


@pytest.mark.parametrize("name,state", [("lfm2", "short-convolution state .LFM2"),
                                        ("qwen35", "Gated DeltaNet state .Qwen3.5"),
                                        ("granitehybrid", "Mamba2 state .Granite 4"),
                                        ("nemotron_h", "Mamba2 state .Granite 4's, Nemotron-H"),
                                        ("mamba2", "Mamba2 state .Granite 4's, Nemotron-H's, Mamba-2"),
                                        ("falcon-h1", "Mamba2 state .Granite 4's, Nemotron-H's, Mamba-2's and "
                                                      "Falcon-H1"),
                                        ("mamba", "Mamba state .Mamba's selective scans"),
                                        ("plamo2", "Mamba state .Mamba's selective scans, PLaMo 2's in heads"),
                                        ("rwkv7", "not RWKV's .token shifts and wkv states"),
                                        ("rwkv6", "not RWKV's .token shifts and wkv states"),
                                        ("arwkv7", "not RWKV's .token shifts and wkv states"),
                                        ("rwkv6qwen2", "not RWKV's .token shifts and wkv states")])
def test_recurrent_states_decode_through_the_models_steps(tiny, name, state):
    """The compiled CPU decoder and captured decode steps keep no recurrent state (convolution inputs,
    a DeltaNet's or Mamba2's state): both refuse LFM2, Qwen3.5, Granite 4's hybrid, Nemotron-H, Mamba-2,
    Falcon-H1, Mamba and PLaMo 2 by name, and generate decodes them through the model's steps (a scan's recurrent step
    on the cached states), as the full forward does."""
    from lowtune.generate import GenerationStats, StepDecoder, cpu_decoder
    model = Model.from_gguf(gguf_of(tiny[name], "Q8_0"))
    assert cpu_decoder(model, model.new_cache(1, 16)) is None
    with pytest.raises(ValueError, match=state):
        StepDecoder(model, 16, graphs=False)
    prompt, stats = rand_ids(1, 12, seed=8)[0].tolist(), GenerationStats()
    got = generate(model, prompt, max_new_tokens=8, stats=stats)
    assert not stats.compiled_decoder and stats.decode_tokens == 7
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[len(prompt):]
    if name == "granitehybrid":  # (the scan's state [B, heads, head_dim, state], the conv's last inputs)
        cache = model.new_cache(1, 16)
        with torch.no_grad():
            model(torch.tensor([prompt]), cache)
        assert tuple(cache.recurrent_state[0].shape) == (1, 8, 16, 16)
        assert tuple(cache.conv_state[2].shape) == (1, 192, 3)
        assert cache.k[0].numel() == 0 and cache.k[1].shape[2] == 16  # (keys only where layers attend)


@pytest.mark.llamacpp
@pytest.mark.parametrize("recipe", ["Q4_K_M", "Q2_K"])
@pytest.mark.parametrize("name,kernel", [("lfm2", "shortconv.conv"), ("granitehybrid", "ssm_conv1d"),
                                         ("qwen35", "ssm_conv1d"), ("plamo2", "ssm_conv1d"),
                                         ("rwkv7", "time_mix_w1"),
                                         ("rwkv6", "time_mix_decay_w2"), ("arwkv7", "time_mix_lerp_fused"),
                                         ("rwkv6qwen2", "time_mix_w2")])
def test_lfm2_quantize_recipes_equal_llama_quantize(tiny, tmp_path, recipe, name, kernel):
    """`lowtune quantize` gives LFM2's, Granite 4's hybrid's, Qwen3.5's, PLaMo 2's and RWKV's tensors llama-quantize's
    types and bytes: the convolutions' kernels and RWKV's low-rank and lerp matrices stay F32, the recipes' attn_v
    choices read layer 0's KV heads (none: a convolution, a Mamba2 layer; PLaMo 2's heads a layer too), and a
    DeltaNet's attn_qkv takes attn_v's rules and counts among them."""
    import numpy as np

    import ggml_ref
    from lowtune.quantize_model import quantize_model
    src = tiny[name].gguf
    ours = quantize_model(src, tmp_path / "ours.gguf", recipe).path
    theirs = tmp_path / "theirs.gguf"
    ggml_ref.quantize_model(src, theirs, recipe, threads=1)
    with GGUFFile(ours) as a, GGUFFile(theirs) as b:
        assert set(a.tensor_infos) == set(b.tensor_infos)
        kernels = [n for n in b.tensor_infos if n.endswith(f".{kernel}.weight")]
        assert kernels and all(b.tensor_infos[n].type_name == "F32" for n in kernels)
        for name, info in b.tensor_infos.items():
            assert a.tensor_infos[name].type_name == info.type_name, name
            assert np.array_equal(a.raw(name).numpy(), b.raw(name).numpy()), name


def test_lfm2_metadata_and_configs_lowtune_refuses():
    """A KV head count per layer is LFM2's (0: a short convolution); other files that give one,
    counts that differ between attention layers, a missing convolution width, and a config.json
    asking for the convolutions' biases (which llama.cpp's lfm2 has none of) are refused."""
    from lowtune.hf_names import metadata_from_hf_config
    md = {"general.architecture": "lfm2", "lfm2.embedding_length": 64, "lfm2.block_count": 3,
          "lfm2.feed_forward_length": 128, "lfm2.attention.head_count": 4, "lfm2.vocab_size": 9,
          "lfm2.attention.layer_norm_rms_epsilon": 1e-5, "lfm2.attention.head_count_kv": [0, 2, 0],
          "lfm2.shortconv.l_cache": 3}
    c = ModelConfig.from_gguf_metadata(md)
    assert (c.conv_layers, c.conv_kernel, c.n_kv_heads) == ((0, 2), 3, 2) and not c.is_conv(1)
    with pytest.raises(ValueError, match="lacks lfm2.shortconv.l_cache"):
        ModelConfig.from_gguf_metadata({k: v for k, v in md.items() if k != "lfm2.shortconv.l_cache"})
    with pytest.raises(ValueError, match="KV head counts \\[2, 1, 0\\]"):
        ModelConfig.from_gguf_metadata({**md, "lfm2.attention.head_count_kv": [2, 1, 0]})
    qwen = {**{k.replace("lfm2", "qwen3"): v for k, v in md.items()}, "general.architecture": "qwen3"}
    with pytest.raises(ValueError, match="layers without attention only as LFM2's short convolutions"):
        ModelConfig.from_gguf_metadata(qwen)
    assert ModelConfig.from_gguf_metadata({**qwen, "qwen3.attention.head_count_kv": [2, 2, 2]}).n_kv_heads == 2
    cfg = {"architectures": ["Lfm2ForCausalLM"], "model_type": "lfm2", "hidden_size": 1024, "intermediate_size": 6656,
           "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 65536,
           "norm_eps": 1e-5, "conv_bias": False, "conv_L_cache": 3, "block_auto_adjust_ff_dim": True,
           "block_ffn_dim_multiplier": 1.0, "block_multiple_of": 256,
           "layer_types": ["conv", "conv", "full_attention", "conv"]}
    md, _ = metadata_from_hf_config(cfg)  # LFM2-350M's FFN width, as llama.cpp's converter makes it
    assert md["lfm2.feed_forward_length"] == 4608 and md["lfm2.attention.head_count_kv"] == [0, 0, 8, 0]
    assert md["lfm2.attention.layer_norm_rms_epsilon"] == 1e-5 and md["lfm2.shortconv.l_cache"] == 3
    with pytest.raises(ValueError, match="conv_bias"):
        metadata_from_hf_config({**cfg, "conv_bias": True})


def test_granitehybrid_mamba2_layers_and_nope(tiny):
    from lowtune import hf_names
    """Granite 4's hybrid: the file's zero KV heads are its Mamba2 layers (sizes from ssm.*), its
    attention has no RoPE (rope.scaling.finetuned = false); the SSD scan gives the same logits in
    chunks of any size (each chunk's boundaries carry the state), and its convolution's bias, its D
    skip and its gated norm's groups matter; what the file lacks, or a config.json asks for that llama.cpp's
    granitehybrid does not run, is refused."""
    from lowtune.model import Mamba2
    model = Model.from_gguf(tiny["granitehybrid"].gguf)
    c = model.config
    assert (c.ssm_layers, c.n_kv_heads, c.no_rope) == ((0, 2), HKV, True) and c.has_attention(1)
    assert (c.ssm.inner, c.ssm.heads, c.ssm.groups, c.ssm.state, c.ssm.conv_kernel) == (2 * D, 8, 2, 16, 4)
    assert [layer.rope_kind for layer in model.layers] == [NO_ROPE] * 3 and model.layers[1].mamba is None
    ids = rand_ids(2, SEQ)
    with torch.no_grad():
        want = hf_model("granitehybrid")(ids).logits
        for chunk in (7, 16, SEQ):  # (7: a last chunk of one position)
            model.layers[0].mamba.chunk = model.layers[2].mamba.chunk = chunk
            assert rel_err(model(ids), want) < 1e-4, chunk
        mixers = [layer.mamba for layer in model.layers if layer.mamba is not None]
        for what, off in (("conv_bias", None), ("D", 0.0)):
            kept = [getattr(m, what) for m in mixers]
            for m in mixers:
                setattr(m, what, off if off is None else torch.zeros_like(getattr(m, what)))
            assert rel_err(model(ids), want) > 1e-3, what
            for m, k in zip(mixers, kept):
                setattr(m, what, k)
        shape = mixers[0].shape
        for m in mixers:  # one group for the norm and B/C: other logits
            m.shape = dataclasses.replace(shape, groups=1, state=2 * shape.state)
        assert rel_err(model(ids), want) > 1e-3
    assert Mamba2.chunk == 64
    md = {"general.architecture": "granitehybrid", "granitehybrid.embedding_length": 64,
          "granitehybrid.block_count": 3, "granitehybrid.feed_forward_length": 128,
          "granitehybrid.attention.head_count": 4, "granitehybrid.vocab_size": 9,
          "granitehybrid.attention.layer_norm_rms_epsilon": 1e-5, "granitehybrid.attention.head_count_kv": [0, 2, 0],
          **{f"granitehybrid.ssm.{k}": v for k, v in (("conv_kernel", 4), ("state_size", 16), ("group_count", 2),
                                                      ("inner_size", 128), ("time_step_rank", 8))}}
    assert not ModelConfig.from_gguf_metadata(md).no_rope  # (Bamba's converter leaves RoPE on)
    cfg = json.loads((tiny["granitehybrid"].hf_dir / "config.json").read_text())
    hf_md, _ = hf_names.metadata_from_hf_config(cfg)  # (the published checkpoints' names of the layer kinds)
    assert hf_md["granitehybrid.attention.head_count_kv"] == [0, HKV, 0]
    assert hf_md["granitehybrid.ssm.inner_size"] == 128 and hf_md["granitehybrid.rope.scaling.finetuned"] is False
    for odd, why in (({"num_local_experts": 4}, "experts as the GGUF.*convert it first"),
                     ({"mamba_proj_bias": True}, "mamba_proj_bias"), ({"mamba_d_head": 32}, "mamba_d_head 32"),
                     ({"position_embedding_type": "rope"}, "RoPE in a Granite 4 hybrid")):
        with pytest.raises(ValueError, match=why):
            hf_names.metadata_from_hf_config({**cfg, **odd})
    with pytest.raises(ValueError, match="lacks \\['granitehybrid.ssm.state_size'\\]"):
        ModelConfig.from_gguf_metadata({k: v for k, v in md.items() if k != "granitehybrid.ssm.state_size"})
    with pytest.raises(ValueError, match="multiple of heads"):
        ModelConfig.from_gguf_metadata({**md, "granitehybrid.ssm.time_step_rank": 7})
    granite = {**{k.replace("granitehybrid", "granite"): v for k, v in md.items()}, "general.architecture": "granite"}
    with pytest.raises(ValueError, match="layers without attention only as LFM2's short convolutions and Granite 4"):
        ModelConfig.from_gguf_metadata(granite)
    with pytest.raises(ValueError, match="switches RoPE off"):
        ModelConfig.from_gguf_metadata({**granite, "granite.attention.head_count_kv": 2,
                                        "granite.rope.scaling.finetuned": False})


def test_nemotron_h_layers_of_one_part(tiny):
    """Nemotron-H's file says each layer's one part: KV heads for attention (without RoPE), an FFN width for
    an MLP, neither for a Mamba2 mixer, all after attn_norm with LayerNorm's epsilon key; FFN widths that
    differ (Nemotron's Puzzle models) are refused, saying what runs; its mixture-of-experts sibling is its own
    family (tests/test_moe.py)."""
    model = Model.from_gguf(tiny["nemotron_h"].gguf)
    c = model.config
    assert (c.ssm_layers, c.mlp_layers, c.no_rope, c.norm_eps) == ((0, 4), (1, 3, 5), True, pytest.approx(1e-5))
    assert [i for i in range(c.n_layers) if c.has_attention(i)] == [2] and model.layers[1].attn_norm is not None
    assert not any(hasattr(layer, "ffn_norm") or hasattr(layer, "ffn_up") for layer in model.layers[::2])
    from lowtune.loading import describe  # (`lowtune info`)
    assert describe(tiny["nemotron_h"].gguf)["config"]["mlp_layers"] == [1, 3, 5]
    md = {"general.architecture": "nemotron_h", "nemotron_h.embedding_length": 64, "nemotron_h.block_count": 3,
          "nemotron_h.feed_forward_length": [0, 128, 96], "nemotron_h.attention.head_count": 4,
          "nemotron_h.vocab_size": 9, "nemotron_h.attention.layer_norm_epsilon": 1e-5,
          "nemotron_h.attention.head_count_kv": [0, 0, 0],
          **{f"nemotron_h.ssm.{k}": v for k, v in (("conv_kernel", 4), ("state_size", 16), ("group_count", 2),
                                                   ("inner_size", 128), ("time_step_rank", 8))}}
    with pytest.raises(ValueError, match="FFNs of different widths \\[96, 128\\]"):
        ModelConfig.from_gguf_metadata(md)
    assert ModelConfig.from_gguf_metadata({**md, "nemotron_h.feed_forward_length": [0, 128, 128]}).mlp_layers == (1, 2)
    assert family_of({"general.architecture": "nemotron_h_moe"}) is FAMILIES["nemotron_h_moe"]


def test_mamba2_layers_alone(tiny):
    """Mamba-2's file gives no attention heads and no FFN width: every layer is a Mamba2 mixer after attn_norm,
    with nothing else in it; its sizes as the file's ssm.* keys say, and a file that lacks one or whose sizes do
    not divide is refused, saying what it needs."""
    model = Model.from_gguf(tiny["mamba2"].gguf)
    c = model.config
    assert (c.n_heads, c.n_kv_heads, c.ffn_dim, c.ssm_layers, c.mlp_layers) == (0, 0, 0, (0, 1), ())
    assert (c.ssm.heads, c.ssm.groups, c.ssm.state, c.ssm.inner) == (8, 2, 16, 128)
    assert not any(c.has_attention(i) or c.has_ffn(i) for i in range(c.n_layers))
    assert not any(hasattr(layer, n) for layer in model.layers for n in ("attn_q", "ffn_up", "ffn_norm"))
    from lowtune.loading import describe  # (`lowtune info`)
    assert describe(tiny["mamba2"].gguf)["config"]["ssm_layers"] == [0, 1]
    md = {"general.architecture": "mamba2", "mamba2.embedding_length": 64, "mamba2.block_count": 2,
          "mamba2.feed_forward_length": 0, "mamba2.attention.head_count": 0, "mamba2.vocab_size": 9,
          "mamba2.attention.layer_norm_rms_epsilon": 1e-5,
          **{f"mamba2.ssm.{k}": v for k, v in (("conv_kernel", 4), ("state_size", 16), ("group_count", 2),
                                               ("inner_size", 128), ("time_step_rank", 8))}}
    assert ModelConfig.from_gguf_metadata(md).ssm_layers == (0, 1)
    with pytest.raises(ValueError, match="lacks \\['mamba2.ssm.group_count'\\]"):
        ModelConfig.from_gguf_metadata({k: v for k, v in md.items() if k != "mamba2.ssm.group_count"})
    with pytest.raises(ValueError, match="inner must be a multiple of heads"):
        ModelConfig.from_gguf_metadata({**md, "mamba2.ssm.time_step_rank": 7})


def test_mamba_selective_scan_is_transformers_reference(tiny, llamacpp_source, tmp_path, capsys):
    """Mamba's layer (lowtune.model.Mamba: the convolution, ssm_x, ssm_dt, selective_scan, the D skip and the
    gate) gives transformers' MambaMixer on the converted weights (on the CPU, without the mamba_ssm kernels, its
    slow reference scan), whole and in two calls through the cache's states; Falcon-Mamba's RMS-normed dt, B
    and C (ssm.dt_b_c_rms) give FalconMambaForCausalLM's logits; a file without the scan's sizes is refused,
    saying which."""
    model, hf = Model.from_gguf(tiny["mamba"].gguf), hf_model("mamba")
    layer, mixer = model.layers[0], hf.backbone.layers[0].mixer
    from lowtune import cli  # (`lowtune info`)
    assert cli.main(["info", str(tiny["mamba"].gguf)]) == 0
    assert "mamba           layers 0, 1 (128 channels, state 16, dt rank 32, conv 4), no attention" in \
        capsys.readouterr().out
    h = torch.randn(2, 40, D, generator=torch.Generator().manual_seed(4))
    run = lambda h, cache=None, start=0: layer.ssm_out(layer.mamba(  # noqa: E731
        layer.ssm_in(h), layer.ssm_x, layer.ssm_dt, cache, start))
    with torch.no_grad():
        want = mixer(h)
        cache = model.new_cache(2, 40)
        parts = torch.cat([run(h[:, :25], cache), run(h[:, 25:], cache, 25)], 1)
        assert rel_err(run(h), want) < 1e-5 and rel_err(parts, want) < 1e-5
    assert tuple(cache.recurrent_state[0].shape) == (2, 128, 16) and tuple(cache.conv_state[0].shape) == (2, 128, 3)
    ones = torch.ones(1, 3, 2)  # (the scan alone: h_t = exp(dt A) h_{t-1} + dt x B, y = h · C)
    y, state = selective_scan(ones, ones, -torch.ones(2, 1), torch.ones(1, 3, 1), torch.ones(1, 3, 1))
    e = math.exp(-1.0)
    assert torch.allclose(y[0, :, 0], torch.tensor([1.0, 1 + e, 1 + e + e * e])) and state.shape == (1, 2, 1)
    import transformers as tf
    falcon = randomized(tf.FalconMambaForCausalLM(tf.FalconMambaConfig(**{
        k: v for k, v in hf.config.to_dict().items() if k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                                "state_size", "expand", "conv_kernel", "time_step_rank",
                                                                "layer_norm_epsilon", "tie_word_embeddings")},
        mixer_rms_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=None)), "falcon_mamba")
    falcon.save_pretrained(tmp_path / "hf")
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tiny["mamba"].hf_dir / f, tmp_path / "hf")
    convert(llamacpp_source, [(tmp_path / "hf", tmp_path / "falcon-mamba.gguf")])
    fm = Model.from_gguf(tmp_path / "falcon-mamba.gguf")
    ids = rand_ids(2, SEQ)
    assert fm.config.ssm.dt_b_c_rms and not model.config.ssm.dt_b_c_rms
    with torch.no_grad():
        assert rel_err(fm(ids), falcon(ids).logits) < 1e-4
    md = {**{k: v for k, v in model.metadata.items() if not k.startswith("tokenizer.")}, "mamba.vocab_size": V}
    with pytest.raises(ValueError, match="lacks \\['mamba.ssm.time_step_rank'\\], which a mamba model's Mamba"):
        ModelConfig.from_gguf_metadata({k: v for k, v in md.items() if k != "mamba.ssm.time_step_rank"})


def test_wkv7_is_ggmls_loop():
    """RWKV-7's recurrence (lowtune.rwkv.wkv7) is ggml's rwkv_wkv7 written out element by element, from a state,
    whole and in two calls (the second from the first's last state); its gradient reaches every input."""
    from lowtune.rwkv import wkv7
    g = torch.Generator().manual_seed(0)
    b, t, h, n = 2, 5, 2, 4
    r, k, v, a, bb = (torch.randn(b, t, h, n, generator=g) for _ in range(5))
    w, s0 = torch.rand(b, t, h, n, generator=g), torch.randn(b, h, n, n, generator=g)
    want, s = torch.zeros(b, t, h, n, dtype=torch.float64), s0.double().clone()
    for bi in range(b):
        for ti in range(t):
            for hi in range(h):
                for i in range(n):  # (row i of the state: the value channel i over the key channels j)
                    sa = sum(float(a[bi, ti, hi, j]) * float(s[bi, hi, i, j]) for j in range(n))
                    for j in range(n):
                        s[bi, hi, i, j] = (s[bi, hi, i, j] * float(w[bi, ti, hi, j]) + float(v[bi, ti, hi, i])
                                           * float(k[bi, ti, hi, j]) + sa * float(bb[bi, ti, hi, j]))
                    want[bi, ti, hi, i] = sum(float(s[bi, hi, i, j]) * float(r[bi, ti, hi, j]) for j in range(n))
    out, last = wkv7(r, w, k, v, a, bb, s0)
    assert rel_err(out, want) < 1e-6 and rel_err(last, s) < 1e-6
    first, mid = wkv7(*(x[:, :2] for x in (r, w, k, v, a, bb)), s0)
    rest, end = wkv7(*(x[:, 2:] for x in (r, w, k, v, a, bb)), mid)
    assert rel_err(torch.cat([first, rest], 1), want) < 1e-6 and rel_err(end, s) < 1e-6
    inputs = [x.clone().requires_grad_() for x in (r, w, k, v, a, bb, s0)]
    wkv7(*inputs)[0].square().sum().backward()
    assert all(x.grad is not None and bool(x.grad.abs().sum() > 0) for x in inputs)


def test_wkv6_is_ggmls_loop():
    """RWKV-6's recurrence (lowtune.rwkv.wkv6) is ggml's rwkv_wkv6 written out element by element, from a state,
    whole and in two calls; its gradient reaches every input."""
    from lowtune.rwkv import wkv6
    g = torch.Generator().manual_seed(1)
    b, t, h, n = 2, 5, 2, 4
    r, k, v = (torch.randn(b, t, h, n, generator=g) for _ in range(3))
    w, u, s0 = torch.rand(b, t, h, n, generator=g), torch.randn(h, n, generator=g), torch.randn(b, h, n, n, generator=g)
    want, s = torch.zeros(b, t, h, n, dtype=torch.float64), s0.double().clone()
    for bi in range(b):
        for ti in range(t):
            for hi in range(h):
                for i in range(n):  # (row i of the state: the key channel i over the value channels j)
                    for j in range(n):
                        kv = float(v[bi, ti, hi, j]) * float(k[bi, ti, hi, i])
                        want[bi, ti, hi, j] += (kv * float(u[hi, i]) + s[bi, hi, i, j]) * float(r[bi, ti, hi, i])
                        s[bi, hi, i, j] = s[bi, hi, i, j] * float(w[bi, ti, hi, i]) + kv
    log_w = w.log()  # (wkv6 takes the decays' logs)
    out, last = wkv6(r, k, v, u, log_w, s0)
    assert rel_err(out, want) < 1e-6 and rel_err(last, s) < 1e-6
    first, mid = wkv6(*(x[:, :2] for x in (r, k, v)), u, log_w[:, :2], s0)
    rest, end = wkv6(*(x[:, 2:] for x in (r, k, v)), u, log_w[:, 2:], mid)
    assert rel_err(torch.cat([first, rest], 1), want) < 1e-6 and rel_err(end, s) < 1e-6
    inputs = [x.clone().requires_grad_() for x in (r, k, v, u, log_w, s0)]
    wkv6(*inputs)[0].square().sum().backward()
    assert all(x.grad is not None and bool(x.grad.abs().sum() > 0) for x in inputs)


def test_qrwkv6_gated_linear_attention_of_grouped_heads(tiny):
    """QRWKV6's recurrence is ggml's gated_linear_attn written out element by element (from a state, whole and in
    two calls); its k and v have one head, read by both of r's, as llama.cpp repeats them; its file has no bonus,
    no output norm and no channel mix."""
    from lowtune.rwkv import gated_linear_attention
    g = torch.Generator().manual_seed(2)
    b, t, h, n = 2, 5, 2, 4
    q, k, v = (torch.randn(b, t, h, n, generator=g) for _ in range(3))
    w, s0 = torch.rand(b, t, h, n, generator=g), torch.randn(b, h, n, n, generator=g)
    want, s = torch.zeros(b, t, h, n, dtype=torch.float64), s0.double().clone()
    for bi in range(b):
        for ti in range(t):
            for hi in range(h):
                for i in range(n):  # (row i of the state: the key channel i over the value channels j)
                    for j in range(n):
                        s[bi, hi, i, j] = (s[bi, hi, i, j] * float(w[bi, ti, hi, i])
                                           + float(k[bi, ti, hi, i]) * float(v[bi, ti, hi, j]))
                        want[bi, ti, hi, j] += s[bi, hi, i, j] * float(q[bi, ti, hi, i])
    log_w = w.log()  # (gated_linear_attention takes the decays' logs)
    out, last = gated_linear_attention(q, k, v, log_w, s0)
    assert rel_err(out, want) < 1e-6 and rel_err(last, s) < 1e-6
    first, mid = gated_linear_attention(*(x[:, :2] for x in (q, k, v, log_w)), s0)
    rest, end = gated_linear_attention(*(x[:, 2:] for x in (q, k, v, log_w)), mid)
    assert rel_err(torch.cat([first, rest], 1), want) < 1e-6 and rel_err(end, s) < 1e-6
    model = Model.from_gguf(tiny["rwkv6qwen2"].gguf)
    c, layer = model.config, model.layers[0]
    assert (c.n_heads, c.n_kv_heads, c.head_dim, layer.time_mix_key.out_features) == (2, 1, 64, 64)
    assert not hasattr(layer, "first") and not hasattr(layer, "ln_weight") and layer.mlp
    assert layer.time_mix_receptance.bias is not None and layer.time_mix_value.bias is not None


def test_rwkv6_config_and_states(tiny, tmp_path):
    """RWKV-6's file gives its token-shift mix's and decay's widths and the layers after which the residual stream
    is halved (lowtune info shows them); its cache keeps the two token shifts and the wkv state of each layer; a
    file without its widths is refused, saying which, and one with the lerps apart (an older conversion), saying
    to convert it again."""
    from lowtune.loading import describe  # (`lowtune info`)
    model = Model.from_gguf(gguf_of(tiny["rwkv6"], "Q8_0"))
    c = model.config
    assert (c.n_heads, c.head_dim, c.wkv_lora_ranks, c.rescale_every) == (2, 64, (32, 64), 2)
    assert [layer.halved for layer in model.layers] == [False, True, False]
    assert {model.tensor_types[f"blk.0.{n}.weight"] for n in ("time_mix_w1", "time_mix_first", "time_mix_decay_w2")} \
        == {"F32"} and model.tensor_types["blk.0.time_mix_gate.weight"] == "Q8_0"
    cache = model.new_cache(1, 16)
    with torch.no_grad():
        model(rand_ids(1, 9, seed=2), cache)
    assert tuple(cache.conv_state[2].shape) == (1, 2, 128) and tuple(cache.recurrent_state[2].shape) == (1, 2, 64, 64)
    md = {k: v for k, v in model.metadata.items() if not k.startswith("tokenizer.")} | {"rwkv6.vocab_size": V}
    with pytest.raises(ValueError, match="lacks \\['rwkv6.time_decay_extra_dim'\\]"):
        ModelConfig.from_gguf_metadata({k: v for k, v in md.items() if k != "rwkv6.time_decay_extra_dim"})
    assert ModelConfig.from_gguf_metadata({k: v for k, v in md.items()
                                           if k != "rwkv6.rescale_every_n_layers"}).rescale_every == 0
    info = describe(tiny["rwkv6"].gguf)["config"]
    assert (info["rwkv"], info["rwkv_mlp"], info["wkv_lora_ranks"]) == (6, False, [32, 64])
    with GGUFFile(tiny["rwkv6"].gguf) as f:  # (an older conversion's lerps, apart)
        types, tensors = dict(f.metadata_types), []
        for n in f.tensor_infos:
            if n.endswith("time_mix_lerp_fused.weight"):
                tensors += [(n.replace("fused", x), t) for x, t in zip("wkvrg", f.tensor(n))]
            else:
                tensors.append((n, f.tensor(n)))
        write_gguf(tmp_path / "apart.gguf", dict(f.metadata), tensors, metadata_types=types)
    with pytest.raises(ValueError, match="lacks tensor 'blk.0.time_mix_lerp_fused.weight'.*lerps apart.*current "
                                         "convert_hf_to_gguf.py"):
        Model.from_gguf(tmp_path / "apart.gguf")


def test_arwkv7_time_mix_on_qwen2_layers(tiny):
    """ARWKV-7 runs RWKV-7's time mix without a gate (5 lerps) after an RMSNorm and Qwen2's gated MLP after
    another, one token shift a layer in its cache; a file that keeps two is refused, as llama.cpp's graph runs one."""
    model = Model.from_gguf(gguf_of(tiny["arwkv7"], "Q8_0"))
    c, layer = model.config, model.layers[1]
    assert (c.wkv_lora_ranks, tuple(layer.lerp.shape), layer.gated) == ((64, 64, 32, 0), (5, 128), False)
    assert type(layer.attn_norm).__name__ == type(layer.ffn_norm).__name__ == "RMSNorm"
    assert model.token_embd_norm is None
    assert model.tensor_types["blk.1.ffn_down.weight"] == "Q8_0" and model.tensor_types["blk.1.time_mix_a1.weight"] \
        == "F32"
    cache = model.new_cache(1, 16)
    with torch.no_grad():
        model(rand_ids(1, 9, seed=2), cache)
    assert tuple(cache.conv_state[0].shape) == (1, 1, 128) and tuple(cache.recurrent_state[0].shape) == (1, 2, 64, 64)
    md = {k: v for k, v in model.metadata.items() if not k.startswith("tokenizer.")} | {"arwkv7.vocab_size": V}
    with pytest.raises(ValueError, match="keeps 2 token shifts a layer; llama.cpp's arwkv7 graph runs 1"):
        ModelConfig.from_gguf_metadata({**md, "arwkv7.token_shift_count": 2})


def test_rwkv7_layers_states_and_refusals(tiny):
    """RWKV-7's cache keeps no keys, per layer its two token shifts [B, 2, D] and its wkv state [B, H, N, N]; what
    does not run its layers says so by name (streaming, compiled and captured layers; the compiled CPU decoder
    leaves it to the model's steps); its checkpointed layers, which pass the first layer's values on, give the
    gradients of plain ones; files lowtune cannot run as llama.cpp does and its HF directories are refused."""
    import lowtune
    from lowtune.compile import compile_model, default_cuda_graphs, default_mode
    from lowtune.generate import cpu_decoder
    from lowtune.streaming import stream_model
    model = Model.from_gguf(gguf_of(tiny["rwkv7"], "Q8_0"))
    c = model.config
    assert (c.n_heads, c.head_dim, c.wkv_lora_ranks) == (2, 64, (32, 32, 16, 48))
    assert model.tensor_types["blk.0.time_mix_w1.weight"] == "F32" and not is_quantizable("blk.0.time_mix_g2.weight",
                                                                                            (128, 48))
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        model(rand_ids(2, 9, seed=2), cache)
    assert all(k.numel() == 0 for k in cache.k + cache.v)
    assert [tuple(cache.conv_state[i].shape) + tuple(cache.recurrent_state[i].shape) for i in range(c.n_layers)] \
        == [(2, 2, 128, 2, 2, 64, 64)] * c.n_layers
    with pytest.raises(ValueError, match="RWKV's layers are not streamed"):
        stream_model(model, "cpu", streamed=[0])
    assert default_mode("cuda", model) == "off" and not default_cuda_graphs("cuda", model)
    with pytest.raises(ValueError, match="RWKV's layers pass RWKV-7's first layer's values.*--compile off"):
        compile_model(model, "layer")
    assert cpu_decoder(model, model.new_cache(1, 32)) is None
    assert_recomputed_lora_gradients_equal(model)
    md = {k: v for k, v in model.metadata.items() if not k.startswith("tokenizer.")} | {"rwkv7.vocab_size": V}
    assert ModelConfig.from_gguf_metadata(md).wkv_lora_ranks == c.wkv_lora_ranks
    with pytest.raises(ValueError, match="lacks \\['rwkv7.wkv.head_size'\\]"):
        ModelConfig.from_gguf_metadata({k: v for k, v in md.items() if k != "rwkv7.wkv.head_size"})
    with pytest.raises(ValueError, match="wkv.head_size 48 does not divide the width 128"):
        ModelConfig.from_gguf_metadata({**md, "rwkv7.wkv.head_size": 48})
    with pytest.raises(ValueError, match="keeps 1 token shifts a layer; llama.cpp's rwkv7 graph runs 2"):
        ModelConfig.from_gguf_metadata({**md, "rwkv7.token_shift_count": 1})
    with pytest.raises(ValueError, match="RWKV7ForCausalLM .rwkv7. is read from GGUF only.*convert_hf_to_gguf.py"):
        lowtune.load_model(tiny["rwkv7"].hf_dir)


@pytest.mark.llamacpp
def test_rwkv_world_tokenizer_matches_llamacpp(tiny):
    """RWKV's world vocabulary ("rwkv": the longest token at each position, tokens escaped as Python writes bytes)
    tokenizes mixed text (other scripts, emoji, escapes, control characters, the <s> control token) as llama.cpp
    does, and decodes it back; a file whose chat template is the name rwkv-world renders llama.cpp's."""
    from llama_cpp import Llama
    model = Model.from_gguf(tiny["rwkv7"].gguf)
    tok = load_tokenizer(model.metadata)
    vocab = Llama(model_path=str(tiny["rwkv7"].gguf), vocab_only=True, verbose=False)
    assert (type(tok).__name__, tok.bos_id, tok.eot_id, tok.add_bos) == ("RWKVTokenizer", 0, 261, False)
    texts = ["Hello world, the quick brown fox.\n\nA new paragraph\twith a tab\r\n",
             "日本語 é ü 😀 mixed ñ text \\n back\\slash 'quotes\" <s> and [PAD3]",
             "  spaces   and\n\n\n\nnewlines",
             "\x00\x01 ~\x7f end"]
    for text in texts:
        ids = tok.encode(text)
        assert ids == vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True), repr(text)
        assert tok.decode(ids) == text
    assert tok.encode("日本 the\n\n") == [259, 263, 261]  # (tokens of several bytes taken whole)
    # the template the converter names where a checkpoint has none: llama.cpp's built-in rwkv-world
    import ctypes
    import llama_cpp
    chat = [("system", " Be brief. "), ("user", "Hi there\n"), ("assistant", "Hello!"), ("user", "Who are you?")]
    messages = (llama_cpp.llama_chat_message * len(chat))(*[llama_cpp.llama_chat_message(role=r.encode(),
                                                                                         content=c.encode())
                                                            for r, c in chat])
    buf = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_chat_apply_template(b"rwkv-world", messages, len(chat), True, buf, len(buf))
    named = load_tokenizer({**model.metadata, "tokenizer.chat_template": "rwkv-world"})
    assert named.apply_chat_template([{"role": r, "content": c} for r, c in chat]) == buf.raw[:n].decode()


@pytest.mark.llamacpp
def test_mamba_and_falcon_h1_hf_configs(tiny):
    """Mamba's, Mamba-2's and Falcon-H1's config.json as llama.cpp's converter reads it: Mamba-2's heads inner /
    head_dim (not its time_step_rank), the vocabulary padded to pad_vocab_size_multiple; what llama.cpp does not
    run is refused by name."""
    from lowtune import hf_names
    cfg = {n: json.loads((tiny[n].hf_dir / "config.json").read_text()) for n in ("mamba", "mamba2", "falcon-h1")}
    md = {n: hf_names.metadata_from_hf_config(c)[0] for n, c in cfg.items()}
    assert (md["mamba"]["mamba.ssm.time_step_rank"], md["mamba2"]["mamba2.ssm.time_step_rank"]) == (
        32, SSM["mamba_n_heads"])
    assert hf_names.metadata_from_hf_config({**cfg["mamba"], "vocab_size": V - 3})[0]["mamba.vocab_size"] == V
    for name, change, why in [("mamba", {"use_bias": True}, "use_bias"), ("mamba", {"intermediate_size": 3 * D},
                                                                          "inner width 192, not expand"),
                              ("mamba2", {"rms_norm": False}, "no gated norm"),
                              ("mamba2", {"norm_before_gate": True}, "norm_before_gate"),
                              ("falcon-h1", {"mamba_norm_before_gate": True}, "mamba_norm_before_gate"),
                              ("falcon-h1", {"projectors_bias": True}, "projectors_bias")]:
        with pytest.raises(ValueError, match=why):
            hf_names.metadata_from_hf_config({**cfg[name], **change})


def test_nemotron_h_hf_directory(tiny):
    """Nemotron-H's config.json as llama.cpp's converter reads its published form (hybrid_override_pattern), and
    transformers' layers_block_type as the same layers (with experts: Nemotron-H MoE's, tests/test_moe.py); what
    llama.cpp's nemotron_h does not run (MLPs beside experts among them) is refused by name. The directory in bf16
    is the converted file in bf16."""
    import lowtune
    from lowtune import hf_names
    ids = rand_ids(2, 40, seed=6)
    with torch.no_grad():
        got = lowtune.load_model(tiny["nemotron_h"].hf_dir, qtype="F32", dtype=torch.bfloat16)(ids)
        want = Model.from_gguf(tiny["nemotron_h"].gguf, dtype=torch.bfloat16)(ids)
        assert torch.equal(got, want) and rel_err(got, Model.from_gguf(tiny["nemotron_h"].gguf)(ids)) < 5e-2
    cfg = json.loads((tiny["nemotron_h"].hf_dir / "config.json").read_text())
    md, _ = hf_names.metadata_from_hf_config(cfg)
    with GGUFFile(tiny["nemotron_h"].gguf) as f:
        for k in ("feed_forward_length", "attention.head_count_kv", "ssm.inner_size", "ssm.time_step_rank",
                  "ssm.group_count", "context_length", "rope.scaling.finetuned"):
            assert md[f"nemotron_h.{k}"] == f.metadata[f"nemotron_h.{k}"], k
    kinds = {"M": "mamba", "-": "mlp", "*": "attention"}
    listed = {k: v for k, v in cfg.items() if k not in ("hybrid_override_pattern", "num_hidden_layers")}
    listed["layers_block_type"] = [kinds[k] for k in cfg["hybrid_override_pattern"]]
    assert hf_names.metadata_from_hf_config(listed)[0] == md
    for change, why in [({"hybrid_override_pattern": "M-*E"}, "layer kinds 'M-\\*E'.*MLP .-, mlp. or experts'"),
                        ({"hybrid_override_pattern": "M*E"}, "lacks 'n_routed_experts'.*Nemotron-H MoE"),
                        ({"hybrid_override_pattern": "M*X"}, "layer kinds 'M\\*X'"),
                        ({"mlp_bias": True}, "mlp_bias"), ({"mlp_hidden_act": "silu"}, "mlp_hidden_act")]:
        with pytest.raises(ValueError, match=why):
            hf_names.metadata_from_hf_config({**cfg, **change})


def test_falcon_h1_mamba2_beside_attention(tiny, llamacpp_source, tmp_path):
    """Falcon-H1 runs a Mamba2 mixer beside attention in every layer (both on attn_norm's output), then
    ffn_norm, whose tensor its file names without .weight, and an MLP; its multipliers are in the converted
    weights. A file without the gated norm (mamba_rms_norm false, as the published configs mostly have it)
    runs without one and gives transformers' logits and llama.cpp's perplexity; per-layer KV head counts are
    refused."""
    model = Model.from_gguf(tiny["falcon-h1"].gguf)
    c = model.config
    assert c.ssm_layers == (0, 1) and all(c.has_attention(i) and c.has_ffn(i) for i in range(c.n_layers))
    assert (c.n_heads, c.n_kv_heads, c.ssm.heads, c.family.rope) == (H, HKV, 8, "neox")
    with GGUFFile(tiny["falcon-h1"].gguf) as f:
        assert "blk.0.ffn_norm" in f.tensor_infos and "blk.0.ffn_norm.weight" not in f.tensor_infos
        assert torch.equal(model.layers[0].ffn_norm.weight, f.tensor("blk.0.ffn_norm").reshape(-1))
    hf = hf_model("falcon-h1")
    hf.config.mamba_rms_norm = False
    plain = randomized(type(hf)(hf.config), "falcon-h1")
    assert not any(".mamba.norm." in n for n, _ in plain.named_parameters())
    plain.save_pretrained(tmp_path / "hf")
    shutil.copy(tiny["falcon-h1"].hf_dir / "tokenizer.model", tmp_path / "hf")
    shutil.copy(tiny["falcon-h1"].hf_dir / "tokenizer_config.json", tmp_path / "hf")
    convert(llamacpp_source, [(tmp_path / "hf", tmp_path / "plain.gguf")])
    ids, without = rand_ids(2, SEQ), Model.from_gguf(tmp_path / "plain.gguf")
    with torch.no_grad():
        got, want, normed = without(ids), plain(ids).logits, hf(ids).logits
        ppl = math.exp(float(without.loss(ids)))
    assert rel_err(got, want) < 1e-4 and rel_err(got, normed) > 1e-3
    assert ppl == pytest.approx(llamacpp_perplexity(llamacpp(tmp_path / "plain.gguf"), ids), rel=5e-4)
    md = {k: v for k, v in model.metadata.items() if not k.startswith("tokenizer.")}
    with pytest.raises(ValueError, match="KV head counts \\[2, 0\\]; falcon-h1 attends in every layer"):
        ModelConfig.from_gguf_metadata({**md, "falcon-h1.attention.head_count_kv": [2, 0]})


def test_plamo2_mamba_layers_in_heads_beside_attention(tiny):
    """PLaMo 2's converted file (layer 0 a Mamba layer, as in its checkpoints) reads as the tiny file with its layers
    swapped in pairs (which llama.cpp runs): Mamba layers of 8 heads sharing B and C, dt llama.cpp's 64 wide, the
    scan's state a head's [head_dim, state]; B/C groups in the file are refused."""
    converted = tiny["plamo2"].gguf.with_name("plamo2-F32.gguf")
    model, swapped = Model.from_gguf(converted), Model.from_gguf(tiny["plamo2"].gguf)
    c = model.config
    assert (c.ssm_layers, swapped.config.ssm_layers, c.n_heads, c.n_kv_heads) == ((0, 2), (1, 3), H, HKV)
    assert (c.ssm.heads, c.ssm.head_dim, c.ssm.dt_rank, c.ssm.state) == (8, D // H, 64, 16)
    assert tuple(model.layers[1].attn_q_norm.weight.shape) == (H, D // H)  # (a weight of each head's own)
    ids = rand_ids(1, 12, seed=4)
    cache = model.new_cache(1, 16)
    with torch.no_grad():
        model(ids, cache)
    assert tuple(cache.recurrent_state[0].shape) == (1, 8, D // H, 16)
    assert tuple(cache.conv_state[2].shape) == (1, 128, 3)
    assert cache.k[0].numel() == 0 and cache.k[1].shape[2] == 16
    with GGUFFile(converted) as f:
        md = dict(f.metadata)
    with pytest.raises(ValueError, match="B/C groups .ssm.group_count.*llama.cpp's plamo2 graph refuses"):
        ModelConfig.from_gguf_metadata({**md, "plamo2.ssm.group_count": 2})


def test_minicpm_runs_granites_decoder_with_its_scales(tiny, botchan_ids):
    """MiniCPM (a GGUF family: transformers has no class for it) against a Granite model of the
    same function in transformers, and against llama.cpp; its scales from the file, and llama.cpp's
    defaults for older files that give none."""
    from lowtune.generate import cpu_decoder
    model = Model.from_gguf(tiny["minicpm"].gguf)
    c = model.config
    assert c.arch == "minicpm" and (c.embedding_scale, c.logit_scale) == pytest.approx(
        (MINICPM["scale_emb"], D / MINICPM["dim_model_base"]))
    assert c.residual_scale == pytest.approx(MINICPM["scale_depth"] / math.sqrt(2))
    ids = rand_ids(2, SEQ)
    with torch.no_grad():
        want, got = hf_model("minicpm")(ids).logits, model(ids)
    assert rel_err(got, want) < 1e-4
    path = gguf_of(tiny["minicpm"], "Q8_0")
    w = windows(botchan_ids, SEQ, chunks=8)
    ours, theirs = perplexity(Model.from_gguf(path), botchan_ids, SEQ, chunks=8)["perplexity"], \
        llamacpp_perplexity(llamacpp(path), w)
    assert abs(ours - theirs) / theirs < 5e-3
    quantized = Model.from_gguf(path)
    assert cpu_decoder(quantized, quantized.new_cache(1, 16)) is not None
    md = {k: v for k, v in model.metadata.items() if not k.endswith(("_scale", "scale"))}
    old = ModelConfig.from_gguf_metadata(md)  # llama.cpp's defaults
    assert (old.embedding_scale, old.residual_scale, old.logit_scale) == pytest.approx(
        (12.0, 1.4 / math.sqrt(2), 256 / D))


def test_minicpm3_latent_attention_with_llamacpps_scales(tiny):
    """MiniCPM3 as llama.cpp reads its converter's file: DeepSeek's latent attention with attn_kv_b whole,
    values D / H wide (the file gives no value_length), NEOX RoPE on each head's last dims; MiniCPM's
    scales fixed as llama.cpp's graph fixes them (scale_emb 12, scale_depth 1.4, dim_model_base 256),
    whatever the file says. A config.json with other scales is refused; its own write and read keep the
    model's config."""
    from lowtune import hf_names
    model = Model.from_gguf(tiny["minicpm3"].gguf)
    c, layer = model.config, model.layers[0]
    nope, rope = MLA["qk_nope_head_dim"], MLA["qk_rope_head_dim"]
    assert (c.head_dim, c.rope_dim, c.v_dim, c.kv_lora_rank, c.q_lora_rank, c.n_kv_heads) == (
        nope + rope, rope, D // H, MLA["kv_lora_rank"], 32, H)
    assert c.kv_b_whole and hasattr(layer, "attn_kv_b") and not hasattr(layer, "attn_q")
    assert "minicpm3.attention.value_length" not in model.metadata
    assert (c.embedding_scale, c.residual_scale, c.logit_scale) == pytest.approx((12.0, 1.4 / math.sqrt(2), D / 256))
    assert c.query_scale == pytest.approx(1 / math.sqrt(nope + rope))
    scaled = ModelConfig.from_gguf_metadata({**model.metadata, "minicpm3.embedding_scale": 3.0,
                                             "minicpm3.logit_scale": 2.0})  # (llama.cpp's graph reads neither)
    assert (scaled.embedding_scale, scaled.logit_scale) == (c.embedding_scale, c.logit_scale)
    cfg = json.loads((tiny["minicpm3"].hf_dir / "config.json").read_text())
    md, _ = hf_names.metadata_from_hf_config(cfg)
    assert config_fields(ModelConfig.from_gguf_metadata(md)) == pytest.approx(config_fields(c))
    for key, value in (("scale_emb", 3.0), ("scale_depth", 1.0), ("dim_model_base", 64)):
        with pytest.raises(ValueError, match=f"llama.cpp's minicpm3 fixes them.*{key}"):
            hf_names.metadata_from_hf_config({**cfg, key: value})


def test_olmo_norms_without_weights_and_clipped_qkv(tiny):
    """OLMo's file holds no norm tensors (its LayerNorms have no parameters: lowtune's take ones) and gives
    transformers' clip_qkv as attention.clamp_kqv; the compiled CPU decoder, which clips nothing, takes a
    file without it, step by step equal to the model, and leaves the clipped one to the model's steps."""
    model = Model.from_gguf(tiny["olmo"].gguf)
    assert model.config.clamp_qkv == 2.0 and not any("norm" in n for n in model.tensor_types)
    assert all(torch.equal(n.weight, torch.ones(D)) and n.bias is None
               for n in [model.output_norm] + [layer.attn_norm for layer in model.layers])
    unclipped = {k: v for k, v in model.metadata.items() if k != "olmo.attention.clamp_kqv"}
    assert ModelConfig.from_gguf_metadata(unclipped).clamp_qkv == 0.0
    path = gguf_of(tiny["olmo"], "Q8_0")
    with GGUFFile(path) as f:
        md, types = dict(f.metadata), dict(f.metadata_types)
        tensors = [(n, (f.qtensor(n) if ti.type.quantized or len(ti.shape) >= 2 else f.tensor(n), ti.shape))
                   for n, ti in f.tensor_infos.items()]
    assert compiled_decoder_steps(Model.from_gguf(path), rand_ids(1, 20, seed=5), 4)[0] is None
    del md["olmo.attention.clamp_kqv"]
    write_gguf(tiny["olmo"].gguf.with_name("olmo-unclipped.gguf"), md, tensors, metadata_types=types)
    steps, _, _ = compiled_decoder_steps(Model.from_gguf(tiny["olmo"].gguf.with_name("olmo-unclipped.gguf")),
                                         rand_ids(1, 20, seed=5), 4)
    assert steps is not None
    for t, (got, want) in enumerate(steps):
        assert rel_err(got, want) < 1e-5, t


# ----------------------------------------------------------------------------------------------
# what lowtune refuses


def test_remote_code_variants_and_directories_refused(tiny):
    """Baichuan files of another layer count than 7B's 32 (13B's 40, which llama.cpp runs with ALiBi) and Nanbeige
    files of looped layers are refused, and so are the remote-code families' Hugging Face directories but EXAONE
    3's, Orion's, Baichuan's and openPangu Embedded's, by class, saying to convert them."""
    import lowtune
    with GGUFFile(tiny["baichuan"].gguf) as f:
        md = dict(f.metadata)
    assert ModelConfig.from_gguf_metadata(md).n_layers == 32
    for layers in (40, 2):
        with pytest.raises(ValueError, match=f"{layers} layers; llama.cpp rotates q and k only at 32 layers .*ALiBi"):
            ModelConfig.from_gguf_metadata({**md, "baichuan.block_count": layers})
    qwen = Model.from_gguf(tiny["qwen"].gguf)
    assert (qwen.config.ffn_dim, qwen.config.family.ffn_length_both_halves) == (F, True)
    nanbeige = Model.from_gguf(tiny["nanbeige"].gguf).metadata
    assert nanbeige["nanbeige.num_loops"] == 1
    with pytest.raises(ValueError, match="runs its 2 layers 3 times over .num_loops.*a file of one loop it does"):
        ModelConfig.from_gguf_metadata({**nanbeige, "nanbeige.num_loops": 3})
    # (the converter's file of a published Qwen config, which gives only layer_norm_epsilon)
    layer_eps = {k: v for k, v in qwen.metadata.items() if k != "qwen.attention.layer_norm_rms_epsilon"}
    with pytest.raises(ValueError, match="LayerNorm's key .*reads attention.layer_norm_rms_epsilon.*rms_norm_eps"):
        ModelConfig.from_gguf_metadata(layer_eps)
    for name in [n for n in REMOTE_CODE_NAMES if n not in ("exaone", "orion", "baichuan", "pangu-embedded")]:
        cls = json.loads((tiny[name].hf_dir / "config.json").read_text())["architectures"][0]
        with pytest.raises(ValueError, match=f"{cls} \\({name}\\) is read from GGUF only.*convert_hf_to_gguf.py"):
            lowtune.load_model(tiny[name].hf_dir)


def test_falcon_hf_configs_and_names(tiny):
    """Falcon's config.json as llama.cpp's converter reads it: 7B's one KV head (multi_query, whatever num_kv_heads
    transformers fills in), 40B's KV groups, a context of 2048; 40B's two norms under their own names (ln_attn before
    attention: attn_norm_2), 7B's one as input_layernorm; what llama.cpp's falcon does not run is refused by name."""
    from lowtune import hf_names
    cfg = {n: json.loads((tiny[n].hf_dir / "config.json").read_text()) for n in ("falcon", "falcon-40b")}
    assert cfg["falcon"]["multi_query"] and cfg["falcon"]["num_kv_heads"] == H
    md = {n: hf_names.metadata_from_hf_config(c)[0] for n, c in cfg.items()}
    assert [(m["falcon.attention.head_count_kv"], m["falcon.context_length"]) for m in md.values()] == [
        (1, 2048), (HKV, 2048)]
    two = ["blk.0.attn_norm.weight", "blk.0.attn_norm_2.weight"]
    assert [hf_names.hf_name(n, "falcon", two) for n in two] == ["transformer.h.0.ln_mlp.weight",
                                                                  "transformer.h.0.ln_attn.weight"]
    assert hf_names.hf_name(two[0], "falcon", two[:1]) == "transformer.h.0.input_layernorm.weight"
    assert [hf_names.gguf_name(f"transformer.h.0.{n}.bias", "falcon") for n in ("input_layernorm", "ln_mlp",
                                                                                 "ln_attn")] == [
        "blk.0.attn_norm.bias", "blk.0.attn_norm.bias", "blk.0.attn_norm_2.bias"]
    for change, why in [({"alibi": True}, "ALiBi in place of RoPE"), ({"bias": True}, "biases on the linears"),
                        ({"parallel_attn": False}, "one after the other"),
                        ({"ffn_hidden_size": 3 * D}, "ffn_hidden_size 192 is not 4 · hidden_size"),
                        ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}, "RoPE base is not 10000")]:
        with pytest.raises(ValueError, match=why):
            hf_names.metadata_from_hf_config({**cfg["falcon"], **change})


def test_gpt2_and_starcoder_hf_configs(tiny):
    """GPT-2's and GPT-BigCode's config.json in their own keys (n_embd, n_layer, ...) as llama.cpp's converter reads
    them: GPT-2's context from n_ctx, StarCoder's one KV head; GPT-2's Conv1D weights transposed, GPT-BigCode's
    nn.Linear's as they are; what llama.cpp does not run is refused by name."""
    from lowtune import hf_names
    cfg = {n: json.loads((tiny[n].hf_dir / "config.json").read_text()) for n in ("gpt2", "starcoder")}
    md = {n: hf_names.metadata_from_hf_config(c)[0] for n, c in cfg.items()}
    assert [(m[f"{n}.context_length"], m[f"{n}.attention.head_count_kv"], m[f"{n}.feed_forward_length"])
            for n, m in md.items()] == [(256, H, 4 * D), (256, 1, 4 * D)]
    assert hf_names.metadata_from_hf_config({**cfg["gpt2"], "n_ctx": 128})[0]["gpt2.context_length"] == 128
    assert [hf_names.hf_shape("blk.0.ffn_up.weight", (4 * D, D), m) for m in md.values()] == [(D, 4 * D), (4 * D, D)]
    # (--targets in the classes' names: c_attn is q, k and v; c_proj the attention's output and the MLP's down)
    assert hf_names.adapter_targets(["c_attn", "c_proj"], "gpt2") == ("attn_q", "attn_k", "attn_v", "attn_output",
                                                                      "ffn_down")
    for name, change, why in [("gpt2", {"n_inner": 3 * D}, "n_inner 192 is not 4 · n_embd"),
                              ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scales GPT-2's attention"),
                              ("starcoder", {"multi_query": False}, "multi_query false")]:
        with pytest.raises(ValueError, match=why):
            hf_names.metadata_from_hf_config({**cfg[name], **change})


def test_layers_of_their_own_heads_parts_and_widths(tiny):
    """Deci's converted file gives each layer its own heads, KV heads and FFN width: attention with 2 and with 1
    KV heads, a layer of neither attention nor FFN, a linear in attention's place, an FFN alone; only the
    attending layers keep K/V. A layer that attends (or runs its linear) without an FFN, which llama.cpp's graph
    runs without its attention's output, is refused. OpenELM's layers have their own query heads too."""
    model = Model.from_gguf(tiny["deci"].gguf)
    c = model.config
    assert [w[1:3] for w in c.layer_widths] == [(2, 2 * F), (2, 0), (2, 2 * F), (2, 4 * F), (1, 4 * F)]
    assert (c.attentionless_layers, c.linear_attention_layers, c.ffnless_layers) == ((1, 3), (2,), (1,))
    assert [c.has_attention(i) for i in range(c.n_layers)] == [True, False, False, False, True]
    cache = KVCache(c, 1, 8, "cpu", torch.float32)
    assert [tuple(k.shape) for k in cache.k] == [(1, 2, 8, 16), (0,), (0,), (0,), (1, 1, 8, 16)]
    md = model.metadata
    for layer, what in ((0, "attends"), (2, "runs a linear")):
        ffn = [w[2] for w in c.layer_widths]
        ffn[layer] = 0
        with pytest.raises(ValueError, match=f"layer {layer} of this deci file {what} without an FFN.*drops"):
            ModelConfig.from_gguf_metadata({**md, "deci.feed_forward_length": ffn})
    openelm = Model.from_gguf(tiny["openelm"].gguf).config
    assert openelm.layer_heads == (2, 4, 4) and [w[1:3] for w in openelm.layer_widths] == [(1, F // 2), (2, F),
                                                                                         (1, 3 * F // 2)]
    assert [tuple(k.shape) for k in KVCache(openelm, 1, 8, "cpu", torch.float32).k] == [
        (1, 1, 8, 16), (1, 2, 8, 16), (1, 1, 8, 16)]
    assert [lc.n_heads * lc.head_dim for lc in map(openelm.at_layer, range(3))] == [32, 64, 64]


def test_families_and_refusals():
    assert sorted(SUPPORTED) == sorted(("llama", "arcee", "smollm3", "granite", "granitemoe", "granitehybrid",
                         "nemotron_h",
                         "nemotron_h_moe", "mamba2", "falcon-h1", "mamba", "jamba", "minicpm", "minicpm3", "ernie4_5",
                         "ernie4_5-moe", "mistral3", "qwen2", "qwen3", "qwen3moe", "qwen2moe", "seed_oss", "gpt2",
                         "starcoder", "bloom", "mpt", "phi2", "gptneox", "stablelm", "falcon", "starcoder2", "phi3",
                         "phimoe", "gemma", "gemma2", "gemma3", "olmo", "olmo2", "olmoe", "exaone4", "exaone-moe",
                         "command-r", "cohere2", "cohere2moe", "glm4", "hunyuan-dense", "hunyuan-moe", "nemotron",
                         "apertus", "gpt-oss", "lfm2", "lfm2moe", "deepseek2", "deepseek32", "glm-dsa", "mistral4",
                         "llama4", "glm4moe", "dots1", "hy_v3", "minimax-m2", "gemma3n", "gemma4", "qwen35",
                         "qwen35moe", "qwen3next", "kimi-linear", "mimo2", "afmoe", "mellum", "laguna", "bitnet",
                         "exaone", "internlm2", "baichuan", "qwen", "orion", "xverse", "chatglm", "deci", "openelm",
                         "jais", "codeshell", "refact", "nanbeige", "plamo", "maincoder", "plm", "rwkv7", "rwkv6",
                         "arwkv7", "rwkv6qwen2", "pangu-embedded", "plamo2", "plamo3", "dbrx", "deepseek", "grok",
                         "arctic", "bailingmoe", "bailingmoe2", "grovemoe", "qwen2vl", "qwen3vl", "qwen3vlmoe",
                         "jais2"))
    assert family_of({"general.architecture": "gemma3"}) is FAMILIES["gemma3"]
    assert family_of_hf(["Phi3ForCausalLM"]).arch == "phi3"
    listed = ", ".join(SUPPORTED)
    for arch, why in [("llada-moe", "mixture-of-experts"), ("mixtral", "mixture-of-experts"),
                      ("mamba3", "recurrent"), ("bert", "encoder"),
                      ("t5", "encoder"), ("smallthinker", "not supported"),
                      ("gptj", "llama.cpp names but does not run")]:
        with pytest.raises(ValueError, match=why) as e:
            family_of({"general.architecture": arch})
        assert repr(arch) in str(e.value) and listed in str(e.value)
    with pytest.raises(ValueError, match="mixture-of-experts.*8 experts"):
        family_of({"general.architecture": "qwen2", "qwen2.expert_count": 8})
    assert family_of({"general.architecture": "llama", "llama.expert_count": 8}).moe  # Mixtral
    with pytest.raises(ValueError, match="no general.architecture"):
        family_of({})
    with pytest.raises(ValueError, match="vision encoder.*mmproj.*the language model's GGUF"):
        family_of({"general.architecture": "clip"})
    with pytest.raises(ValueError, match="not supported"):
        family_of_hf(["GPTJForCausalLM"])
    with pytest.raises(ValueError, match=r"InternLM2ForCausalLM \(internlm2\) is read from GGUF only.*wqkv.*load the "
                                         "GGUF"):
        family_of_hf(["InternLM2ForCausalLM"])
    md = {"general.architecture": "qwen2", "qwen2.embedding_length": 64, "qwen2.block_count": 2,
          "qwen2.feed_forward_length": 128, "qwen2.attention.head_count": 4, "qwen2.vocab_size": 9,
          "qwen2.attention.layer_norm_rms_epsilon": 1e-6}
    assert ModelConfig.from_gguf_metadata(md).n_kv_heads == 4
    with pytest.raises(ValueError, match="rope scaling 'dynamic' is not supported"):
        ModelConfig.from_gguf_metadata({**md, "qwen2.rope.scaling.type": "dynamic"})
    yarn = ModelConfig.from_gguf_metadata({**md, "qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0})
    assert yarn.rope_yarn_factor == 4.0 and yarn.rope_attn_factor == pytest.approx(1 + 0.1 * math.log(4))
    with pytest.raises(ValueError, match="lacks qwen2.block_count"):
        ModelConfig.from_gguf_metadata({k: v for k, v in md.items() if k != "qwen2.block_count"})


def test_sliding_window_metadata():
    """llama.cpp's keys: attention.sliding_window, and sliding_window_pattern as a period (0: every
    layer slides, p: every p-th layer is global, so 1: none) or one flag per layer."""
    md = {"general.architecture": "qwen3", "qwen3.embedding_length": 64, "qwen3.block_count": 4,
          "qwen3.feed_forward_length": 128, "qwen3.attention.head_count": 4, "qwen3.vocab_size": 9,
          "qwen3.attention.layer_norm_rms_epsilon": 1e-6, "qwen3.attention.sliding_window": 8}
    windows = lambda **kw: [ModelConfig.from_gguf_metadata({**md, **{
        f"qwen3.attention.{k}": v for k, v in kw.items()}}).window(i) for i in range(4)]
    assert windows() == [8, 8, 8, 8] and windows(sliding_window_pattern=0) == [8, 8, 8, 8]
    assert windows(sliding_window_pattern=1) == [0, 0, 0, 0]
    assert windows(sliding_window_pattern=2) == [8, 0, 8, 0]
    assert windows(sliding_window_pattern=[True, False, False, True]) == [8, 0, 0, 8]
    assert windows(sliding_window=0) == [0, 0, 0, 0]
    gemma2 = {k.replace("qwen3", "gemma2"): v for k, v in md.items() if "sliding" not in k}
    gemma2["general.architecture"] = "gemma2"  # no window in the file: Gemma 2's 4096
    assert [ModelConfig.from_gguf_metadata(gemma2).window(i) for i in range(4)] == [4096, 0, 4096, 0]


def test_unknown_tensors_are_refused(tiny):
    with GGUFFile(tiny["qwen3"].gguf) as f:
        md = dict(f.metadata)
        w = {n: (f.tensor(n) if len(i.shape) == 1 else f.qtensor(n)) for n, i in f.tensor_infos.items()}
    config = ModelConfig.from_gguf_metadata(md)
    Model(config, w)
    with pytest.raises(ValueError, match="ffn_gate_exps.*mixture-of-experts"):
        Model(config, {**w, "blk.0.ffn_gate_exps.weight": w["blk.0.ffn_gate.weight"]})
    with pytest.raises(ValueError, match="attn_q_norm"):
        Model(config, {k: v for k, v in w.items() if k != "blk.1.attn_q_norm.weight"})


def _with_tensor_type(src, dst, tensor: str, type_id: int) -> None:
    """A copy of GGUF `src` at `dst` whose tensor info says `tensor` (2-D) is of ggml type `type_id`."""
    data = bytearray(src.read_bytes())
    name = tensor.encode()
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name) + 4 + 2 * 8  # (n_dims, ne[0], ne[1])
    data[at:at + 4] = type_id.to_bytes(4, "little")
    dst.write_bytes(bytes(data))


def test_bitnet_variants_are_read_or_refused_by_name(tiny, tmp_path):
    """BitNet as its other checkpoints and files have it: BitNet b1.58 2B4T's relu² gate (hidden_act relu2)
    read from a BitNetForCausalLM directory equal to transformers and kept in the file's hidden_activation
    (without it, SiLU: llama.cpp's graph); per-tensor .scale tensors (an older conversion), Microsoft
    bitnet.cpp's I2_S blocks, packed (quantization_config) and untied checkpoints refused, saying what to do."""
    import lowtune
    import transformers as tf
    from lowtune import hf_names
    from lowtune.export import export_hf, export_merged_gguf
    from test_export import make_adapter
    cfg = tf.BitNetConfig(vocab_size=V, hidden_size=BITNET_D, intermediate_size=2 * BITNET_D, num_attention_heads=H,
                          num_key_value_heads=HKV, num_hidden_layers=2, rms_norm_eps=1e-5, tie_word_embeddings=True)
    assert cfg.hidden_act == "relu2"  # (the default, as BitNet b1.58 2B4T's)
    hf, d = randomized(tf.BitNetForCausalLM(cfg), "bitnet"), tmp_path / "relu2"
    hf.save_pretrained(d)
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tiny["bitnet"].hf_dir / f, d / f)
    ids = rand_ids(2, SEQ)
    model = lowtune.load_model(d, qtype="F32")
    assert model.config.mlp_activation == "relu2"
    with torch.no_grad():
        want = hf(ids).logits
        assert rel_err(model(ids), want) < 1e-4
    config = json.loads((d / "config.json").read_text())
    md, types = hf_names.metadata_from_hf_config(config)
    assert md["bitnet.hidden_activation"] == "relu2"
    make_adapter(d, tmp_path / "run" / "adapter", "lora", rel=0.2)  # (its exports keep relu²)
    export_merged_gguf(d, tmp_path / "run", tmp_path / "merged.gguf")
    export_hf(d, tmp_path / "run", tmp_path / "merged-hf")
    with GGUFFile(tmp_path / "merged.gguf") as f:
        assert f.metadata["bitnet.hidden_activation"] == "relu2"
    assert json.loads((tmp_path / "merged-hf" / "config.json").read_text())["hidden_act"] == "relu2"
    with GGUFFile(tiny["bitnet"].gguf) as f:  # the converted file read with and without the key
        md, types = dict(f.metadata), dict(f.metadata_types)
        tensors = [(n, f.tensor(n)) for n in f.tensor_infos]
    silu = Model.from_gguf(tiny["bitnet"].gguf)
    assert silu.config.mlp_activation == "" and silu.layers[0].activation == "silu"
    write_gguf(tmp_path / "relu2.gguf", {**md, "bitnet.hidden_activation": "relu2"}, tensors, metadata_types=types)
    assert Model.from_gguf(tmp_path / "relu2.gguf").layers[0].activation == "relu2"
    write_gguf(tmp_path / "gelu.gguf", {**md, "bitnet.hidden_activation": "gelu"}, tensors, metadata_types=types)
    with pytest.raises(ValueError, match="hidden_activation 'gelu' is not one lowtune runs"):
        Model.from_gguf(tmp_path / "gelu.gguf")
    scale = [("blk.0.attn_q.scale", torch.ones(1))]
    write_gguf(tmp_path / "scales.gguf", md, tensors + scale, metadata_types=types)
    with pytest.raises(ValueError, match="BitNet's per-tensor weight scales.*convert_hf_to_gguf.py.*TQ1_0 or TQ2_0"):
        Model.from_gguf(tmp_path / "scales.gguf")
    _with_tensor_type(tiny["bitnet"].gguf, tmp_path / "i2_s.gguf", "blk.0.attn_q.weight", 36)
    with pytest.raises(ValueError, match="bitnet.cpp's I2_S, which ggml .* does not have.*TQ1_0 or TQ2_0"):
        Model.from_gguf(tmp_path / "i2_s.gguf")
    for change, why in [({"quantization_config": {"quant_method": "bitnet"}}, "quantized.*convert_hf_to_gguf"),
                        ({"tie_word_embeddings": False}, "unties BitNet's head"),
                        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not one lowtune's bitnet runs")]:
        with pytest.raises(ValueError, match=why):
            hf_names.metadata_from_hf_config({**config, **change})
