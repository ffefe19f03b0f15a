"""Mixture-of-experts models (lowtune.model.MoE): Qwen3-MoE (qwen3moe), Mixtral (the llama
architecture with experts), OLMoE (olmoe), Qwen2-MoE (qwen2moe, a gated shared expert), Granite
MoE (granitemoe, an ungated shared expert, Granite's scales), Qwen3-VL MoE's language model
(qwen3vlmoe, Qwen3-MoE's decoder), gpt-oss (attention sinks, biases on the router and experts, the
softmax of the top k logits, swiglu_oai), ERNIE 4.5 MoE, LFM2-MoE (short convolutions, sigmoid
routing) and DeepSeek (deepseek2: latent attention, with and without q's latent; V2's softmax
routing, V3's sigmoid routing in expert groups with a selection bias) and GLM-4.5 MoE (glm4moe:
DeepSeek's sigmoid routing after attention with biases, q/k norms and partial RoPE; its file's
multi-token-prediction layer left out of the model and kept in merged files), DeepSeek-V3.2 (deepseek32: V3's
layer with the lightning indexer picking the keys each query attends to) and GLM-5 (glm-dsa: its indexer in some
layers, the others reusing their choice), Llama 4, PhiMoE (phimoe:
Phi-3's LongRoPE and biases, RMSNorms with biases as llama.cpp runs them), dots.llm1 (dots1: Qwen3's
attention before DeepSeek-V3's routing without groups), Mistral Small 4 (mistral4: DeepSeek's latent
attention, softmax routing in groups), Hunyuan MoE (hunyuan-moe: q/k norms after RoPE, a gated shared expert),
MiniMax-M2 (minimax-m2: q/k norms over all heads, partial RoPE, sigmoid routing
with a selection bias), EXAONE MoE (exaone-moe: GLM-4.5 MoE's routing after EXAONE's attention, every 4th
layer global without RoPE), Nemotron-H MoE (nemotron_h_moe: Nemotron-H's layers of one part, its MLPs
experts without a gate) and Cohere2 MoE (cohere2moe: Command R7B's layer, a rotated dense first layer,
experts averaged with a shared expert), Gemma 4's experts (gemma4moe: 26B-A4B's layer, the experts beside the
dense FFN, a scaled router on the normed residual stream, a scale for each expert), DBRX (dbrx: LayerNorms without
biases, q/k/v fused and clipped), AFMoE (afmoe: Trinity's norms before and after each branch, gated attention, every
4th layer global without RoPE, sigmoid routing with a selection bias), MiMo-V2-Flash (mimo2: sliding layers with KV
heads of their own count and sinks, values narrower than keys and scaled), Laguna (laguna: a softplus output gate
one a head, the first of every 4 layers global, a shared expert of its own width) and Mellum (mellum: Qwen3-MoE's
layer with sliding layers rotating with the global base), as tiny random models built by transformers and converted
by llama.cpp's converter (tests/family_models.py); and DeepSeek-MoE (deepseek: Llama's attention, a dense first
layer, experts not renormalized beside a shared expert), Grok-1 (grok: its multipliers, soft-capped scores, norms
after attention and after the experts), Snowflake Arctic (arctic: experts on the layer's input beside a dense FFN
after attention), Ling (bailingmoe: fused q/k/v, a shared expert), Ling 2.0 (bailingmoe2: q/k norms, DeepSeek-V3's
routing in expert groups) and Grove MoE (grovemoe: an adjugate expert for each pair of experts), whose checkpoints
ship their own code, as config.json and random safetensors under their own names, compared with llama.cpp's logits:
* logits equal transformers' (fp32), and the routing matters (routing every token to all experts,
  or to one, renormalizing OLMoE's and Qwen2-MoE's weights, dropping a shared expert or its gate,
  moves them);
* perplexity equals llama.cpp's in F32 and in llama.cpp's own Q8_0 quantization, and greedy
  decoding follows llama.cpp's;
* the KV cache gives the full forward's logits, and the compiled CPU decoder the model's, step by
  step;
* adapters (on the attention, dense FFNs and shared experts; the routed experts are frozen) train:
  every adapted linear gets a gradient, the gradient reaching the first layer through the later
  layers' experts; `lowtune finetune` runs on the GGUF; a streamed model trains as the resident one;
* exports: the merged GGUF reloads as the adapted model and llama.cpp runs it, and applies the GGUF
  LoRA, at lowtune's perplexity; the PEFT adapter on transformers' model gives lowtune's logits;
* what is refused says why: shared experts, other gating, a merged HF export, compile and capture.
"""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import lowtune
from lowtune import adapters
from lowtune.compile import compile_model, default_mode
from lowtune.evaluate import perplexity, windows
from lowtune.export import export_hf, export_lora_gguf, export_merged_gguf, export_peft
from lowtune.families import family_of_hf
from lowtune.generate import GenerationStats, StepDecoder, generate
from lowtune.gguf_io import GGUFFile, write_gguf
from lowtune.model import (DELTA_LINEAR_NAMES, KDA_LINEAR_NAMES, MAMBA_LINEAR_NAMES, NO_ROPE, SHARED_EXPERT_NAMES,
                           DecoderLayer, LightningIndexer, Model, ModelConfig)
from lowtune.recipes import choose_type
from lowtune.tokenizer import load_tokenizer

from family_models import (DBRX_CLIP_QKV, DSA_TOP_K, EXPERTS, EXPERTS_USED, MOE_NAMES, NEMOTRON_H_MOE_PATTERN,
                           REMOTE_CODE_MOE_NAMES, SEQ, WINDOW, deepseek2_kv_b_whole, gguf_of, hf_model, llamacpp,
                           llamacpp_perplexity, rand_ids, rel_err)
from helpers import compiled_decoder_steps, llamacpp_greedy, resident_and_streamed, with_filled_lora
from test_export import make_adapter
from test_families_train_export import adapted_steps, nll_ppl
from test_streaming import assert_trains_alike

pytestmark = pytest.mark.usefixtures("one_thread")

DEEPSEEK = ("deepseek2", "deepseek2-lite", "deepseek3")  # (the deepseek2 architecture)
LATENT = DEEPSEEK + ("mistral4", "deepseek32", "glm-dsa")  # (latent attention: llama.cpp's deepseek2 graph, and
#                                                             V3's layer in deepseek32, glm-dsa)
# (leading_dense_block_count: the first layer's FFN is dense)
DENSE_FIRST = ("ernie4_5-moe", "lfm2moe", "glm4moe", "dots1", "exaone-moe", "cohere2moe", "kimi-linear",
               "afmoe", "mimo2", "laguna", "hy_v3") + LATENT
TOP_1 = ("llama4",)  # (one expert a token, as Llama 4's checkpoints route)
# (experts in every other layer, dense MLPs between: interleave_moe_layer_step)
INTERLEAVED = {"llama4": [False, True, False, True], "jamba": [False, True, False, True],
               "nemotron_h_moe": [k == "E" for k in NEMOTRON_H_MOE_PATTERN]}  # (Nemotron-H's layers of one part)


@pytest.fixture(scope="module")
def moe(family_models):
    return {n: family_models[n] for n in MOE_NAMES + REMOTE_CODE_MOE_NAMES}


@pytest.fixture(scope="module")
def text_ids(moe, botchan_text):
    """Tokens of part of Botchan in the tiny models' shared vocabulary."""
    return load_tokenizer(Model.from_gguf(moe["qwen3moe"].gguf).metadata).encode(botchan_text[20000:40000],
                                                                                 add_bos=False)


def hf_chunks(model):
    """Llama 4's chunked layers attend in chunks of the tiny transformers model's attention_chunk_size
    (WINDOW, shorter than the test sequences) in place of llama.cpp's 8192, which the file cannot change."""
    for layer in model.layers:
        layer.window = layer.window and WINDOW


@pytest.mark.transformers
@pytest.mark.parametrize("name", MOE_NAMES)
def test_logits_match_transformers(moe, name):
    ids = rand_ids(2, SEQ)
    model = Model.from_gguf(moe[name].gguf)
    used = 1 if name in TOP_1 else EXPERTS_USED
    assert (model.config.n_experts, model.config.n_experts_used) == (EXPERTS, used)
    archs = {"mixtral": "llama", "granitehybridmoe": "granitehybrid", "gemma4moe": "gemma4",
             **{n: "deepseek2" for n in DEEPSEEK}}
    assert model.config.arch == archs.get(name, name)
    shared = ("qwen2moe", "granitemoe", "ernie4_5-moe", "granitehybridmoe", "qwen35moe", "qwen3next",
              "glm4moe", "llama4", "dots1", "hunyuan-moe", "exaone-moe", "nemotron_h_moe",
              "cohere2moe", "kimi-linear", "afmoe", "laguna", "hy_v3") + LATENT
    assert bool(model.config.shared_expert_ffn_dim) == (name in shared)
    assert [layer.ffn_moe is not None for layer in model.layers] == INTERLEAVED.get(name, [
        name not in DENSE_FIRST] + [True] * (model.config.n_layers - 1))
    chunked = [layer for layer in model.layers if layer.window]
    if name == "llama4":
        assert [layer.window for layer in model.layers] == [8192, 8192, 8192, 0]
        hf_chunks(model)
    with torch.no_grad():
        want = hf_model(name)(ids).logits
        got = model(ids)
        print(f"{name}: logits vs transformers, relative error {rel_err(got, want):.2e}")
        assert rel_err(got, want) < 1e-4
        moes = [layer.ffn_moe for layer in model.layers if layer.ffn_moe is not None]

        def matters(mods, what, value):  # model's logits move away from transformers' with mods' `what` = value
            kept = [getattr(m, what) for m in mods]
            for m in mods:
                setattr(m, what, value)
            moved = rel_err(model(ids), want)
            for m, k in zip(mods, kept):
                setattr(m, what, k)
            assert moved > 1e-3, (what, value)

        for used in sorted({1, EXPERTS} - {used}):  # the routing matters: other expert counts give other logits
            matters(moes, "n_used", used)
        # OLMoE's and Qwen2 MoE's chosen weights are not renormalized (gpt-oss's sum to 1 already)
        if not moes[0].renorm and model.config.expert_gating == 1:
            matters(moes, "renorm", True)
        if model.config.shared_expert_ffn_dim:  # the shared expert, and Qwen2 MoE's gate on it, matter
            for what in ("shared_gate", "ffn_up_shexp", "selection_bias"):  # (and ERNIE's selection bias)
                if getattr(moes[0], what) is not None:
                    matters(moes, what, None)
        if name == "lfm2moe":  # its sigmoid routing and its selection bias matter
            for what, off in (("gating", 1), ("selection_bias", None)):
                matters(moes, what, off)
        if name == "gpt-oss":  # its sinks, its routing (the softmax of the top k logits) and biases matter
            matters(list(model.layers), "attn_sinks", None)
            for what, off in (("gating", 1), ("ffn_down_exps_bias", None), ("ffn_up_exps_bias", None)):
                matters(moes, what, off)
        # the weights' scale, and V3's (and V3.2's) sigmoid, renorm and groups, and Mistral 4's softmax's in groups
        if name in ("deepseek2", "deepseek3", "deepseek32", "mistral4"):
            matters(moes, "weights_scale", 1.0)
        if name == "mistral4":
            for what, off in (("gating", 2), ("renorm", False), ("groups", 0)):
                matters(moes, what, off)
        if name in ("deepseek3", "deepseek32"):
            for what, off in (("gating", 1), ("renorm", False), ("groups", 0)):
                matters(moes, what, off)
        if name in ("deepseek32", "glm-dsa"):  # the indexer's choice matters (keeping every key)
            matters([layer.indexer for layer in model.layers if layer.indexer is not None], "top_k", SEQ)
        if name == "glm-dsa":  # its routing, and its shared layers' reuse of the layer before's choice, matter
            for what, off in (("gating", 1), ("selection_bias", None), ("renorm", False), ("weights_scale", 1.0)):
                matters(moes, what, off)
            matters([layer for layer in model.layers if layer.indexer is None], "indexer_source", None)
        # their sigmoid routing, selection bias, renorm and scale matter
        if name in ("glm4moe", "dots1", "exaone-moe", "nemotron_h_moe", "kimi-linear", "afmoe", "laguna"):
            for what, off in (("gating", 1), ("selection_bias", None), ("renorm", False), ("weights_scale", 1.0)):
                matters(moes, what, off)
        if name in ("minimax-m2", "mimo2"):  # their sigmoid routing, selection bias and renorm matter
            for what, off in (("gating", 1), ("selection_bias", None), ("renorm", False)):
                matters(moes, what, off)
        if name in ("exaone-moe", "afmoe", "mimo2", "laguna"):  # their windows (and the global layers' RoPE) matter
            matters(list(model.layers), "window", 0)
            matters(list(model.layers), "rope_kind", 0)
        if name == "mellum":  # its windows matter
            matters(list(model.layers), "window", 0)
        if name == "cohere2moe":  # its sigmoid routing, renorm, averaged shared expert, windows and RoPE matter
            for what, off in (("gating", 1), ("renorm", False), ("shared_average", False)):
                matters(moes, what, off)
            matters(list(model.layers), "window", 0)
            matters(list(model.layers[:1]), "rope_kind", NO_ROPE)  # (the dense first layer's, global)
            matters(list(model.layers[-1:]), "rope_kind", 0)  # (the last one's, global without it)
        if name == "gemma4moe":  # the router's scale (on its normed input) and each expert's matter
            for what in ("router_scale", "expert_scales"):
                matters(moes, what, None)
        if name == "llama4":  # the chunks, the L2 norms of q and k, and the weights on the experts' input matter
            matters(chunked, "window", SEQ)
            matters(chunked, "l2_normed", False)
            for what, off in (("weight_before", False), ("gating", 1)):
                matters(moes, what, off)
        assert rel_err(model(ids), want) < 1e-4  # (everything put back)


def _set_all(mods, what, value):
    for m in mods:
        setattr(m, what, value)


# what sets each remote-code mixture apart at this size (switched off, its logits leave llama.cpp's)
REMOTE_CODE_SWITCH_OFF = {
    "deepseek": [("weights not renormalized", lambda m: _set_all(_moes(m), "renorm", True)),
                 ("the shared expert", lambda m: _set_all(_moes(m), "ffn_up_shexp", None))],
    "grok": [("the attention's soft-cap", lambda m: setattr(m.config, "attn_softcap", 0.0)),
             ("the scores' scale", lambda m: setattr(m.config, "attn_scale", 0.0)),
             ("the embeddings' scale", lambda m: setattr(m.tok_embd, "scale", 1.0)),
             ("the logits' scale", lambda m: setattr(m.config, "logit_scale", 1.0)),
             ("the norm after attention", lambda m: _set_all(m.layers, "post_attention_norm", torch.nn.Identity())),
             ("the norm after the experts", lambda m: _set_all(m.layers, "post_ffw_norm", torch.nn.Identity()))],
    "bailingmoe": [("weights renormalized", lambda m: _set_all(_moes(m), "renorm", False)),
                   ("the shared expert", lambda m: _set_all(_moes(m), "ffn_up_shexp", None))],
    "bailingmoe2": [(what, lambda m, what=what, off=off: _set_all(_moes(m), what, off)) for what, off in (
        ("gating", 1), ("selection_bias", None), ("renorm", False), ("weights_scale", 1.0), ("groups", 0),
        ("ffn_up_shexp", None))],
    "grovemoe": [("the adjugate experts", lambda m: _set_all(_moes(m), "group_scale", 0.0)),
                 ("weights not renormalized", lambda m: _set_all(_moes(m), "renorm", False))],
    "arctic": [("the experts' own norm", lambda m: _set_all(m.layers, "ffn_norm_exps", torch.nn.Identity())),
               ("the dense FFN", lambda m: _set_all(m.layers, "mlp", torch.zeros_like))],
}
# (Grok: llama.cpp's GELU reads a table of fp16 values, 2e-4 here; lowtune's with its input and output so rounded
# is within 3e-5)
REMOTE_CODE_TOL = {"grok": 5e-4}


def _moes(model):
    return [layer.ffn_moe for layer in model.layers if layer.ffn_moe is not None]


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", REMOTE_CODE_MOE_NAMES)
def test_remote_code_logits_match_llamacpp(moe, name):
    """Mixtures without a transformers class: llama.cpp's logits of the converted F32 file (its K/V cache in F32
    too) are lowtune's, and the routing matters (other expert counts, and what sets the family apart, move them);
    routed to all experts (a bf16 router flips near ties), bf16 activations follow fp32."""
    from llama_cpp import Llama
    ids = rand_ids(1, SEQ)
    llm = Llama(model_path=str(moe[name].gguf), n_ctx=SEQ, n_batch=SEQ, logits_all=True, verbose=False, seed=0,
                type_k=0, type_v=0)  # (GGML_TYPE_F32)
    llm.eval(ids[0].tolist())
    want = torch.tensor(np.array(llm.scores[:SEQ]))[None]
    model = Model.from_gguf(moe[name].gguf)
    assert (model.config.n_experts, model.config.n_experts_used) == (EXPERTS, EXPERTS_USED)
    tol = REMOTE_CODE_TOL.get(name, 1e-4)
    with torch.no_grad():
        got = model(ids)
        print(f"{name}: logits vs llama.cpp, relative error {rel_err(got, want):.2e}")
        assert rel_err(got, want) < tol
        switches = [(f"{n} experts a token", lambda m, n=n: _set_all(_moes(m), "n_used", n)) for n in (1, EXPERTS)]
        for what, switch_off in switches + REMOTE_CODE_SWITCH_OFF.get(name, []):
            changed = Model.from_gguf(moe[name].gguf)
            switch_off(changed)
            assert rel_err(changed(ids), want) > 10 * tol, f"{what} does not matter at this size"
        bf16 = Model.from_gguf(moe[name].gguf, dtype=torch.bfloat16)
        _set_all(_moes(model) + _moes(bf16), "n_used", EXPERTS)
        low, fp32 = bf16(ids), model(ids)
    print(f"{name}: bf16 vs fp32 routed to all experts, relative error {rel_err(low, fp32):.2e}")
    assert rel_err(low, fp32) < 2e-2


@pytest.mark.llamacpp
# (LFM2-MoE, Qwen3.5-MoE and Kimi Linear: their convolutions' and DeltaNets' activations lose more to llama.cpp's
# rounding of them, as LFM2's and Qwen3.5's do: test_families.py's QUANTIZED_TOL and
# test_lfm2_quantized_perplexity_is_llamacpps_rounding)
# (GLM-5: its indexer's choice flips near ties on llama.cpp's F16 rounding of its keys, 0.6 % here)
@pytest.mark.parametrize("name,qtype,tol", [(n, "F32", 1e-2 if n == "glm-dsa" else 2e-3)
                                            for n in MOE_NAMES + REMOTE_CODE_MOE_NAMES]
                         # (GLM-4.5 MoE: two of four experts by sigmoid scores with a selection bias; llama.cpp's
                         # rounding of the router's input flips near ties, 0.5 % here, 0.15 % routed to all four)
                         + [(n, "Q8_0", 1e-2 if n in ("lfm2moe", "qwen35moe", "qwen3next", "glm4moe", "exaone-moe",
                                                      "nemotron_h_moe", "cohere2moe", "kimi-linear",
                                                      "gemma4moe", "mistral4", "hy_v3")
                                                      else 3e-2 if n in ("deepseek32", "glm-dsa") else 5e-3)
                            for n in MOE_NAMES + REMOTE_CODE_MOE_NAMES]
                         + [("gpt-oss", "MXFP4", 5e-3)]  # (gpt-oss's files keep their experts in MXFP4)
                         + [("deepseek2", "Q4_0", 5e-3), ("deepseek2-lite", "Q4_0", 5e-3), ("glm4moe", "Q4_0", 1e-2),
                            ("llama4", "Q4_0", 5e-3), ("phimoe", "Q4_0", 5e-3), ("dots1", "Q4_0", 5e-3),
                            ("dbrx", "Q4_0", 5e-3), ("deepseek", "Q4_0", 5e-3),
                            ("grok", "Q4_0", 5e-3), ("arctic", "Q4_0", 5e-3),
                            ("bailingmoe", "Q4_0", 5e-3), ("afmoe", "Q4_0", 5e-3), ("mimo2", "Q4_0", 5e-3),
                            ("mellum", "Q4_0", 5e-3), ("bailingmoe2", "Q4_0", 5e-3),
                            ("grovemoe", "Q4_0", 5e-3)]
                         # (Hunyuan MoE, MiniMax-M2, EXAONE MoE, Nemotron-H MoE, Cohere2
                         # MoE: llama.cpp's 8-bit rounding of the
                         # router's input flips near ties with Q4_0's weights, 0.7 % and 0.4 % here for the first two,
                         # 0.01 % routed to all four experts)
                         + [("hunyuan-moe", "Q4_0", 1e-2), ("minimax-m2", "Q4_0", 1e-2), ("exaone-moe", "Q4_0", 1e-2),
                            ("nemotron_h_moe", "Q4_0", 1e-2), ("cohere2moe", "Q4_0", 1e-2),
                            ("kimi-linear", "Q4_0", 1e-2), ("gemma4moe", "Q4_0", 1e-2), ("hy_v3", "Q4_0", 1e-2)]
                         # (llama.cpp rounds each product's input to 8 bits: with Q4_0's coarser weights
                         # DeepSeek-V3's tiny model, one of two groups of two experts, flips its group
                         # for a few tokens, which moves 2 of the 8 windows by 2-5%; Mistral Small 4's groups
                         # flip so in Q8_0 too, 0.5 % here; Laguna's sigmoid routing with its selection bias, 1 %
                         # here, 0.9 % with lowtune's activations rounded as llama.cpp's: llamacpp_activations)
                         + [("deepseek3", "Q4_0", 1.5e-2), ("mistral4", "Q4_0", 1.5e-2), ("laguna", "Q4_0", 1.5e-2)]
                         # (DeepSeek-V3.2, GLM-5: llama.cpp's 8-bit rounding of the products' inputs moves the
                         # indexer's scores enough to flip its top 16 near ties, up to 2.5 % here; their perplexity
                         # without the selection within 5e-3: test_without_the_selection_the_indexed_are_llamacpps)
                         + [("deepseek32", "Q4_0", 3e-2), ("glm-dsa", "Q4_0", 3e-2)])
def test_perplexity_and_greedy_decoding_match_llamacpp(moe, text_ids, name, qtype, tol):
    path = gguf_of(moe[name], qtype)
    model = Model.from_gguf(path)
    if qtype != "F32":  # the experts in llama.cpp's blocks, the router kept in F32 as llama.cpp keeps it
        p = f"blk.{model.config.moe_layers[0] if model.config.moe_layers else 0}."
        assert model.tensor_types[p + "ffn_down_exps.weight"] == qtype
        assert model.tensor_types[p + "ffn_gate_inp.weight"] == "F32"
    llm = llamacpp(path)
    want = llamacpp_perplexity(llm, windows(text_ids, SEQ, chunks=8))
    got = perplexity(model, text_ids, SEQ, chunks=8)["perplexity"]
    print(f"{name} {qtype}: perplexity lowtune {got:.4f}, llama.cpp {want:.4f} ({(got - want) / want:+.4%})")
    # (llama.cpp keeps its KV cache in F16: a router's near tie may pick another expert for a token)
    assert abs(got - want) / want < tol
    if qtype == "F32":  # (in Q8_0 llama.cpp rounds the activations too: a random model's near ties differ)
        prompt = text_ids[:12]
        assert generate(model, prompt, max_new_tokens=8) == llamacpp_greedy(llm, prompt, 8)


@pytest.mark.parametrize("name", DEEPSEEK + ("mistral4",))  # (deepseek32's and glm-dsa's: their own tests)
def test_deepseek_latent_attention(moe, name):
    """DeepSeek's attention (and Mistral Small 4's, llama.cpp's deepseek2 graph under its own name) as
    llama.cpp reads the file: q through its latent where the file gives q_lora_rank, keys of key_length_mla
    dims (RoPE on the last rope.dimension_count), values of value_length_mla, and YaRN's mscale² on the
    scores (rope.scaling.yarn_log_multiplier, kept as 0.1 · mscale_all_dim: the rotation keeps magnitude 1);
    bf16 activations follow fp32."""
    model = Model.from_gguf(moe[name].gguf)
    c, layer = model.config, model.layers[1]
    arch = c.arch
    assert (c.head_dim, c.rope_dim, c.v_dim, c.kv_lora_rank, c.n_kv_heads) == (48, 16, 32, 32, c.n_heads)
    assert c.q_lora_rank == (0 if name == "deepseek2-lite" else 32)
    assert hasattr(layer, "attn_q") == (name == "deepseek2-lite") and not hasattr(layer, "attn_k")
    if name == "deepseek3":  # YaRN ×4 with mscale_all_dim 0.707
        assert c.rope_attn_factor == 1.0
        assert c.query_scale == pytest.approx((1 + 0.1 * 0.707 * math.log(4)) ** 2 / math.sqrt(48), rel=1e-6)
        md = {k: v for k, v in model.metadata.items() if k != f"{arch}.rope.scaling.yarn_log_multiplier"}
        plain = ModelConfig.from_gguf_metadata(md)  # (without it: YaRN's magnitude on the rotation and the scores)
        assert plain.rope_attn_factor == pytest.approx(1 + 0.1 * math.log(4))
        assert plain.query_scale == pytest.approx((1 + 0.1 * math.log(4)) ** 2 / math.sqrt(48))
    elif name == "mistral4":  # YaRN ×4 with mscale and mscale_all_dim 1; llama.cpp's mscale 1 beside another
        m = lambda s: 1 + 0.1 * s * math.log(4)  # noqa: E731   mscale_all_dim: the rotation at m(1) / m(0.707)
        assert c.rope_attn_factor == pytest.approx(1.0) and c.query_scale == pytest.approx(m(1) ** 2 / math.sqrt(48))
        other = ModelConfig.from_gguf_metadata({**model.metadata, "mistral4.rope.scaling.yarn_log_multiplier": 0.0707})
        assert other.rope_attn_factor == pytest.approx(m(1) / m(0.707))
        assert other.query_scale == pytest.approx(m(1) ** 2 / math.sqrt(48))
    else:
        assert c.rope_yarn_factor == 0.0 and c.query_scale == pytest.approx(1 / math.sqrt(48))
    ids = rand_ids(2, 40, seed=6)
    with torch.no_grad():
        fp32 = model(ids)
        # (a bf16 router picks other experts for a few tokens: the 27 layers of the lite model)
        assert rel_err(Model.from_gguf(moe[name].gguf, dtype=torch.bfloat16)(ids), fp32) < 1e-1
    with pytest.raises(ValueError, match="latent attention's"):  # (captured steps: one width of keys and values)
        StepDecoder(model, 16)
    with pytest.raises(ValueError, match="scales queries by position"):
        ModelConfig.from_gguf_metadata({**model.metadata, f"{arch}.attention.temperature_scale": 0.1})
    # without expert_gating_func: softmax (DeepSeek-V2's files), but sigmoid at GLM-4.7 Flash's layers and vocabulary
    md = {k: v for k, v in model.metadata.items() if k != f"{arch}.expert_gating_func"}
    assert ModelConfig.from_gguf_metadata(md).expert_gating == 1
    glm = {**md, f"{arch}.block_count": 47, f"{arch}.vocab_size": 154880}
    assert ModelConfig.from_gguf_metadata(glm).expert_gating == 2


@pytest.mark.llamacpp
def test_mistral4_yarn_mscale_as_llamacpp(moe, tmp_path):
    """Mistral Small 4's file with an mscale_all_dim other than 1 (yarn_log_multiplier 0.0707): llama.cpp takes
    YaRN's mscale as 1 beside it (not as mscale_all_dim, as for deepseek2), the rotation at m(1) / m(0.707), and
    lowtune gives its perplexity (DeepSeek's rule misses it by 0.3 %)."""
    with GGUFFile(moe["mistral4"].gguf) as f:
        md, types = dict(f.metadata), dict(f.metadata_types)
        tensors = [(n, f.tensor(n)) for n in f.tensor_infos]
    write_gguf(tmp_path / "mscale.gguf", {**md, "mistral4.rope.scaling.yarn_log_multiplier": 0.0707}, tensors,
               metadata_types=types)
    model = Model.from_gguf(tmp_path / "mscale.gguf")
    assert model.config.rope_attn_factor == pytest.approx((1 + 0.1 * math.log(4)) / (1 + 0.0707 * math.log(4)))
    w = rand_ids(4, SEQ, seed=9)
    ppl, cpp = nll_ppl(model, w), llamacpp_perplexity(llamacpp(tmp_path / "mscale.gguf"), w)
    print(f"mistral4 with mscale_all_dim 0.707: perplexity lowtune {ppl:.3f}, llama.cpp {cpp:.3f}")
    assert abs(cpp - ppl) / ppl < 2e-3


@pytest.mark.llamacpp
@pytest.mark.transformers
def test_deepseek_older_conversion_keeps_kv_b_whole(moe, tmp_path):
    """A deepseek2 file as older converters wrote it (attn_kv_b whole, key_length a head's, no _mla
    keys) computes what the split layout does, and llama.cpp's perplexity; adapters on attn_kv_b merge
    into a GGUF that llama.cpp runs, and export as a PEFT adapter of kv_b_proj that transformers applies."""
    import peft
    split = moe["deepseek2"].gguf
    whole = deepseek2_kv_b_whole(split, tmp_path / "whole.gguf")
    model = Model.from_gguf(whole)
    layer = model.layers[1]
    assert model.config.kv_b_whole and hasattr(layer, "attn_kv_b") and not hasattr(layer, "attn_k_b")
    ids, w = rand_ids(2, 40, seed=7), rand_ids(4, SEQ, seed=9)
    with torch.no_grad():
        assert rel_err(model(ids), Model.from_gguf(split)(ids)) < 1e-6
    ppl, cpp = nll_ppl(model, w), llamacpp_perplexity(llamacpp(whole), w)
    print(f"deepseek2 with attn_kv_b whole: perplexity lowtune {ppl:.3f}, llama.cpp {cpp:.3f}")
    assert abs(cpp - ppl) / ppl < 2e-3
    adapted = make_adapter(whole, tmp_path / "run" / "adapter", "lora", rel=0.2, rank=4,
                           targets=("attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_kv_b", "attn_output"))
    assert "layers.1.attn_kv_b" in adapters.adapters_of(adapted)
    with torch.no_grad():
        want = adapted(ids)
    export_merged_gguf(whole, tmp_path / "run", tmp_path / "merged.gguf")
    merged = Model.from_gguf(tmp_path / "merged.gguf")
    with torch.no_grad():
        assert rel_err(merged(ids), want) < 1e-5
    ppl, cpp = nll_ppl(merged, w), llamacpp_perplexity(llamacpp(tmp_path / "merged.gguf"), w)
    assert abs(cpp - ppl) / ppl < 2e-3
    export_peft(whole, tmp_path / "run", tmp_path / "peft")
    hf = peft.PeftModel.from_pretrained(hf_model("deepseek2"), tmp_path / "peft").eval()
    with torch.no_grad():
        assert rel_err(hf(input_ids=ids).logits, want) < 1e-4


@pytest.mark.llamacpp
def test_deepseek_without_experts(moe, tmp_path):
    """A deepseek2 file whose layers are all dense (leading_dense_block_count the block count, no
    experts: Youtu-LLM's layout) gives llama.cpp's perplexity, and its steps decode as the full forward."""
    g = torch.Generator().manual_seed(0)
    with GGUFFile(moe["deepseek2"].gguf) as f:
        md, types = dict(f.metadata), dict(f.metadata_types)
        tensors = [(n, f.tensor(n)) for n in f.tensor_infos if not any(s in n for s in ("_exps", "shexp", "gate_inp"))]
    n_layers, d, ff = md["deepseek2.block_count"], md["deepseek2.embedding_length"], md["deepseek2.feed_forward_length"]
    for i in range(md["deepseek2.leading_dense_block_count"], n_layers):
        tensors += [(f"blk.{i}.{n}.weight", torch.randn(rows, cols, generator=g) / math.sqrt(cols))
                    for n, rows, cols in (("ffn_gate", ff, d), ("ffn_up", ff, d), ("ffn_down", d, ff))]
    for key in ("expert_count", "expert_used_count", "expert_weights_scale"):
        del md[f"deepseek2.{key}"]
    md.update({"deepseek2.leading_dense_block_count": n_layers, "deepseek2.expert_shared_count": 0})  # (as converted)
    write_gguf(tmp_path / "dense.gguf", md, tensors, metadata_types=types)
    model = Model.from_gguf(tmp_path / "dense.gguf")
    assert model.config.n_experts == 0 and all(layer.ffn_moe is None for layer in model.layers)
    w = rand_ids(4, SEQ, seed=9)
    ppl, cpp = nll_ppl(model, w), llamacpp_perplexity(llamacpp(tmp_path / "dense.gguf"), w)
    print(f"deepseek2 without experts: perplexity lowtune {ppl:.3f}, llama.cpp {cpp:.3f}")
    assert abs(cpp - ppl) / ppl < 2e-3
    ids = rand_ids(1, 20, seed=3)
    with torch.no_grad():
        full, cache = model(ids), model.new_cache(1, 20)
        steps = [model(ids[:, :8], cache)] + [model(ids[:, t:t + 1], cache) for t in range(8, 20)]
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5


@pytest.mark.transformers
def test_deepseek32_lightning_indexer(moe, monkeypatch):
    """DeepSeek-V3.2's lightning indexer in every layer (its file's indexer head count, width and top k): a
    query sees every key up to position top_k, then the top_k its indexer scores best (active from position 16 of
    the 64 the logits tests run), causal. Where the file's YaRN mscale_all_dim is not 1, llama.cpp's deepseek32
    takes mscale 1 (deepseek2 takes it equal). Its scores are held a chunk of queries at a time, to the same choice.
    bf16 follows fp32 (the indexer computes in fp32); its HF directory is refused, pointing at the converter, and a
    file without the indexer's keys or with heads narrower than the RoPE dims by name."""
    model = Model.from_gguf(moe["deepseek32"].gguf)
    c = model.config
    assert (c.arch, c.indexer_heads, c.indexer_head_dim, c.indexer_top_k) == ("deepseek32", 32, 64, DSA_TOP_K)
    assert all(layer.indexer is not None for layer in model.layers) and c.rope_attn_factor == pytest.approx(1.0)
    assert model.layers[0].indexer.style == "neox" and c.family.rope == "norm"  # (relaid: neox_pairing)
    ids = rand_ids(2, SEQ)
    kept = []
    model.layers[0].indexer.register_forward_hook(lambda mod, args, out: kept.append(out))
    with torch.no_grad():
        fp32 = model(ids)
    seen = kept[0][:, 0].sum(-1)  # [B, T]: the keys each query sees
    pos = torch.arange(SEQ)
    assert torch.equal(seen, torch.minimum(pos + 1, torch.tensor(DSA_TOP_K)).expand(2, -1))
    assert not kept[0][:, 0].triu(1).any()  # (causal)
    monkeypatch.setattr(LightningIndexer, "SCORES", 2 * c.indexer_heads * SEQ * 5)  # (chunks of 5 queries)
    with torch.no_grad():
        assert torch.equal(model(ids), fp32) and torch.equal(kept[1], kept[0])
    monkeypatch.undo()
    del kept[1]
    # bf16: the first layer's choice (of inputs equal up to bf16's rounding) is fp32's but for near ties, and with
    # every key kept the logits follow (the later layers' choices flip on bf16's drift, which moves them by 25 %)
    bf16 = Model.from_gguf(moe["deepseek32"].gguf, dtype=torch.bfloat16)
    bf16.layers[0].indexer.register_forward_hook(lambda mod, args, out: kept.append(out))
    with torch.no_grad():
        bf16(ids)
        assert (kept[1] & kept[0]).sum() > 0.99 * kept[0].sum()
        for layer in model.layers + bf16.layers:
            layer.indexer.top_k = SEQ
        assert rel_err(bf16(ids), model(ids)) < 5e-2
    md = dict(model.metadata)
    yarn = {"rope.scaling.yarn_log_multiplier": 0.0707}  # (the converter's 0.1 · mscale_all_dim)
    m = lambda s: 1 + 0.1 * s * math.log(4)  # noqa: E731 (YaRN's m(s) at the file's factor 4)
    v32 = ModelConfig.from_gguf_metadata({**md, **{f"deepseek32.{k}": v for k, v in yarn.items()}})
    assert v32.rope_attn_factor == pytest.approx(m(1) / m(0.707), rel=1e-5)
    assert v32.query_scale == pytest.approx(m(1) ** 2 / math.sqrt(48), rel=1e-5)
    with GGUFFile(moe["deepseek3"].gguf) as f:  # (deepseek2: mscale = mscale_all_dim = 0.707)
        v3 = ModelConfig.from_gguf_metadata(f.metadata)
    assert v3.rope_attn_factor == 1.0 and v3.query_scale == pytest.approx(m(0.707) ** 2 / math.sqrt(48), rel=1e-5)
    with pytest.raises(ValueError, match="lacks deepseek32.attention.indexer.top_k"):
        ModelConfig.from_gguf_metadata({k: v for k, v in md.items() if k != "deepseek32.attention.indexer.top_k"})
    with pytest.raises(ValueError, match="lightning indexer of 32 heads of 8 dims"):
        ModelConfig.from_gguf_metadata({**md, "deepseek32.attention.indexer.key_length": 8}).check()
    with pytest.raises(ValueError, match="latent attention's"):  # (captured steps: one width of keys and values)
        StepDecoder(model, 16)
    with pytest.raises(ValueError, match="DeepseekV32ForCausalLM.*convert_hf_to_gguf"):
        lowtune.load_model(moe["deepseek32"].hf_dir)


@pytest.mark.llamacpp
@pytest.mark.parametrize("name,qtype,tol", [("deepseek32", "F32", 2e-3), ("deepseek32", "Q8_0", 5e-3),
                                            ("glm-dsa", "F32", 2e-3), ("glm-dsa", "Q8_0", 5e-3)])
def test_without_the_selection_the_indexed_are_llamacpps(moe, text_ids, tmp_path, name, qtype, tol):
    """DeepSeek-V3.2's and GLM-5's files with an indexer top k no sequence reaches (every key kept) give llama.cpp's
    perplexity as the other mixtures do: what moves them with the selection (GLM-5's by 0.6 % in F32, both by up
    to 2.5 % in Q8_0) is llama.cpp's rounding of the indexer's keys to F16 and of its inputs to 8 bits, which flips
    its top 16 near ties (test_perplexity_and_greedy_decoding_match_llamacpp)."""
    import ggml_ref
    with GGUFFile(moe[name].gguf) as f:
        md, types = dict(f.metadata), dict(f.metadata_types)
        tensors = [(n, f.tensor(n)) for n in f.tensor_infos]
    path = tmp_path / "all-keys.gguf"
    write_gguf(path, {**md, f"{name}.attention.indexer.top_k": 4 * SEQ}, tensors, metadata_types=types)
    if qtype != "F32":
        ggml_ref.quantize_model(path, tmp_path / f"all-keys-{qtype}.gguf", qtype)
        path = tmp_path / f"all-keys-{qtype}.gguf"
    model = Model.from_gguf(path)
    w = windows(text_ids, SEQ, chunks=8)
    want = llamacpp_perplexity(llamacpp(path), w)
    got = perplexity(model, text_ids, SEQ, chunks=8)["perplexity"]
    print(f"{name} {qtype} keeping every key: perplexity lowtune {got:.4f}, llama.cpp {want:.4f}")
    assert abs(got - want) / want < tol


def test_glm_dsa_shared_indexers(moe):
    """GLM-5's indexer only in the layers its file's attention.indexer.types marks (the first and third here), the
    others reusing the choice of the last layer before them with one; without the key every layer has its own
    below a context of 1048576 (GLM-5, 5.1), GLM-5.2's pattern from there (the first two, then every fourth), as
    llama.cpp reads it. Its indexer rotates adjacent pairs, as its attention; a file with YaRN is refused by name."""
    model = Model.from_gguf(moe["glm-dsa"].gguf)
    c, md = model.config, model.metadata
    assert c.indexer_shared == (1, 3) and [c.indexer_source(i) for i in range(4)] == [0, 0, 2, 2]
    assert [layer.indexer is not None for layer in model.layers] == [True, False, True, False]
    assert model.layers[0].indexer.style == "norm" and not model.layers[0].indexer.relaid
    assert model.layers[0].indexer.k_norm.eps == 0.0 and c.expert_gating == 2
    ids = rand_ids(1, SEQ, seed=2)
    with torch.no_grad():
        model(ids)
    assert model.layers[1].indexer_choices[0].shape == (1, 1, SEQ, SEQ)  # (layer 0's, which layer 1 read)
    plain = {k: v for k, v in md.items() if k != "glm-dsa.attention.indexer.types"}
    assert ModelConfig.from_gguf_metadata(plain).indexer_shared == ()
    glm52 = ModelConfig.from_gguf_metadata({**plain, "glm-dsa.context_length": 1048576})
    assert glm52.indexer_shared == (3,)
    with pytest.raises(ValueError, match="scales RoPE by YaRN"):
        ModelConfig.from_gguf_metadata({**md, "glm-dsa.rope.scaling.type": "yarn", "glm-dsa.rope.scaling.factor": 4.0})
    with pytest.raises(ValueError, match="the first layer must have its own"):
        ModelConfig.from_gguf_metadata({**md, "glm-dsa.attention.indexer.types": [False, True, True, True]}).check()
    with pytest.raises(ValueError, match="GlmMoeDsaForCausalLM.*convert_hf_to_gguf"):
        lowtune.load_model(moe["glm-dsa"].hf_dir)


def _tensors_of(f: GGUFFile, keep) -> list:
    """The tensors of an open GGUF whose names `keep` takes, as write_gguf takes them (blocks as stored)."""
    return [(n, (f.qtensor(n) if ti.type.quantized or len(ti.shape) >= 2 else f.tensor(n), ti.shape))
            for n, ti in f.tensor_infos.items() if keep(n)]


def test_glm4moe_nextn_layer_is_kept_out_of_the_model(moe, tmp_path):
    """GLM-4.5 MoE's multi-token-prediction layer (the tiny file's blk.3 of 4 blocks, nextn_predict_layers
    1): llama.cpp loads its tensors and its graph skips it, so lowtune's model ends before it, its
    adapters and training leave it alone, and a merged GGUF keeps its tensors bit for bit; a file
    converted without it gives the same logits. Another family's file with such layers is refused."""
    base = gguf_of(moe["glm4moe"], "Q8_0")
    model = make_adapter(base, tmp_path / "run" / "adapter", "lora", rel=0.2, rank=4)
    with GGUFFile(base) as f:
        md, types = dict(f.metadata), dict(f.metadata_types)
        nextn = {n: f.raw(n).clone() for n in f.tensor_infos if n.startswith("blk.3.")}
        kept = _tensors_of(f, lambda n: n not in nextn)
    assert (md["glm4moe.block_count"], md["glm4moe.nextn_predict_layers"], model.config.n_layers) == (4, 1, 3)
    assert {"blk.3.nextn.eh_proj.weight", "blk.3.ffn_gate_exps.weight", "blk.3.attn_q.weight"} <= set(nextn)
    trained = Model.from_gguf(base)
    losses = adapted_steps(trained, "lora", rand_ids(2, 24, seed=2))
    assert losses[-1] < losses[0]
    for m in (model, trained):
        assert len(m.layers) == 3 and not any(name.startswith("layers.3.") for name in adapters.adapters_of(m))
    export_merged_gguf(base, tmp_path / "run", tmp_path / "merged.gguf")
    with GGUFFile(tmp_path / "merged.gguf") as f:
        assert f.metadata["glm4moe.nextn_predict_layers"] == 1
        assert all(torch.equal(f.raw(n), t) for n, t in nextn.items())
        assert not torch.equal(f.raw("blk.2.attn_q.weight"), Model.from_gguf(base).layers[2].attn_q.weight.raw)
    md.update({"glm4moe.block_count": 3})
    del md["glm4moe.nextn_predict_layers"]
    write_gguf(tmp_path / "trunk.gguf", md, kept, metadata_types=types)
    ids = rand_ids(1, 20, seed=4)
    with torch.no_grad():
        assert torch.equal(Model.from_gguf(tmp_path / "trunk.gguf")(ids), Model.from_gguf(base)(ids))
    with GGUFFile(base) as f:  # a file of the NextN layer alone (the converter's --mtp-only)
        mtp = _tensors_of(f, lambda n: n in nextn or not n.startswith("blk."))
    write_gguf(tmp_path / "mtp.gguf", {**md, "glm4moe.block_count": 4, "glm4moe.nextn_predict_layers": 1}, mtp,
               metadata_types=types)
    with pytest.raises(ValueError, match="only its multi-token-prediction layers"):
        Model.from_gguf(tmp_path / "mtp.gguf")
    with GGUFFile(moe["deepseek3"].gguf) as f:
        other = {**f.metadata, "deepseek2.nextn_predict_layers": 1}
    with pytest.raises(ValueError, match="multi-token-prediction"):
        ModelConfig.from_gguf_metadata(other)


@pytest.mark.llamacpp
def test_glm4moe_without_qk_norms(moe, text_ids, tmp_path):
    """GLM-4.5 MoE's per-head q/k norms are the file's choice (llama.cpp loads them where present):
    a file without them runs as llama.cpp runs it, and not as the file with them."""
    base = moe["glm4moe"].gguf
    with GGUFFile(base) as f:
        md, types = dict(f.metadata), dict(f.metadata_types)
        tensors = [(n, f.tensor(n)) for n in f.tensor_infos if not n.endswith(("attn_q_norm.weight",
                                                                                "attn_k_norm.weight"))]
    write_gguf(tmp_path / "plain.gguf", md, tensors, metadata_types=types)
    model = Model.from_gguf(tmp_path / "plain.gguf")
    assert not any(hasattr(layer, "attn_q_norm") for layer in model.layers)
    w = windows(text_ids, SEQ, chunks=4)
    want = llamacpp_perplexity(llamacpp(tmp_path / "plain.gguf"), w)
    got, normed = (perplexity(m, text_ids, SEQ, chunks=4)["perplexity"] for m in (model, Model.from_gguf(base)))
    print(f"glm4moe without q/k norms: perplexity lowtune {got:.3f}, llama.cpp {want:.3f}; with them {normed:.3f}")
    assert abs(got - want) / want < 2e-3 and abs(normed - got) / got > 1e-2


@pytest.mark.parametrize("name", MOE_NAMES + REMOTE_CODE_MOE_NAMES)
def test_kv_cache_matches_the_full_forward(moe, name):
    model = Model.from_gguf(moe[name].gguf)
    if name == "llama4":  # (chunks shorter than the sequence: the steps cross them)
        hf_chunks(model)
    ids = rand_ids(1, 30, seed=3)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, ids.shape[1])
        parts = [model(ids[:, :12], cache)] + [model(ids[:, t:t + 1], cache) for t in range(12, 30)]
    assert rel_err(torch.cat(parts, dim=1), full) < 1e-5


@pytest.mark.parametrize("name", MOE_NAMES + REMOTE_CODE_MOE_NAMES)
def test_compiled_cpu_decoder_follows_the_model(moe, name):
    """lowtune._C.CpuDecoder routes each token to its experts (and shared expert) as the model
    does, step by step (gpt-oss: the softmax of the top k logits, biased router and experts,
    swiglu_oai, sinks in the attention; 30 tokens pass its window of 16). LFM2-MoE's short
    convolutions and sigmoid routing, GLM-4.5 MoE's, dots.llm1's, HY V3's, MiniMax-M2's, EXAONE MoE's, Cohere2 MoE's,
    AFMoE's, MiMo-V2-Flash's, Laguna's and Ling 2.0's sigmoid routing, Granite 4's and Nemotron-H MoE's Mamba2 layers,
    Qwen3.5's DeltaNets, DeepSeek's latent attention, Llama 4's chunked attention, PhiMoE's norm and head biases,
    Jamba's Mamba layers, DBRX's clipped q/k/v, Arctic's experts on the layer's input and Grove MoE's adjugate experts
    are left to the model's own steps."""
    model = Model.from_gguf(gguf_of(moe[name], "Q8_0"))
    steps, _, _ = compiled_decoder_steps(model, rand_ids(1, 30, seed=5), 8)
    if name in LATENT + ("lfm2moe", "granitehybridmoe", "qwen35moe", "qwen3next", "glm4moe", "llama4", "phimoe",
                           "dots1", "minimax-m2", "exaone-moe", "nemotron_h_moe", "jamba",
                           "cohere2moe", "kimi-linear", "gemma4moe", "hy_v3", "afmoe", "mimo2", "laguna", "dbrx",
                           "arctic", "bailingmoe2", "grovemoe"):
        assert steps is None
        stats = GenerationStats()
        generate(model, rand_ids(1, 8, seed=5)[0].tolist(), max_new_tokens=4, stats=stats)
        assert stats.decode_tokens == 3 and not stats.compiled_decoder
        return
    assert steps is not None
    for t, (got, want) in enumerate(steps):
        assert rel_err(got, want) < 1e-5, t


@pytest.mark.parametrize("name", MOE_NAMES + REMOTE_CODE_MOE_NAMES)
def test_adapters_train_through_the_experts(moe, name):
    model = Model.from_gguf(gguf_of(moe[name], "Q8_0"))
    losses = adapted_steps(model, "lora", rand_ids(2, 32, seed=11))  # every adapter gets a gradient
    assert losses[-1] < losses[0], losses
    ads = adapters.adapters_of(model)
    # DeepSeek's latent attention: q (or q's latent and q_b), the keys' and values' latent, k_b, v_b, the output
    attention = {"attn_q", "attn_k", "attn_v", "attn_output"}
    if name in LATENT + ("kimi-linear",):
        attention = {"attn_kv_a_mqa", "attn_k_b", "attn_v_b", "attn_output"} | (
            {"attn_q"} if name in ("deepseek2-lite", "kimi-linear") else {"attn_q_a", "attn_q_b"})
    c = model.config
    for i, layer in enumerate(model.layers):  # (the FFN of a dense first layer is adapted too, and shared experts)
        names = {k.rsplit(".", 1)[-1] for k in ads if k.startswith(f"layers.{i}.")}
        attention_i = attention if c.has_mixer(i) else set()  # (Nemotron-H MoE: a mixer or experts a layer)
        if layer.shortconv is not None:  # (LFM2-MoE's convolutions)
            attention_i = {"in_proj", "out_proj"}
        elif layer.mamba is not None:  # (Mamba2 layers; Jamba's Mamba layers)
            attention_i = set(MAMBA_LINEAR_NAMES) if name == "jamba" else {"ssm_in", "ssm_out"}
        elif layer.delta_net and name == "kimi-linear":  # (Kimi Delta Attention's)
            attention_i = set(KDA_LINEAR_NAMES)
        elif layer.delta_net:  # (Qwen3.5-MoE's DeltaNets; Qwen3-Next's b and a in one)
            attention_i = set(DELTA_LINEAR_NAMES) - ({"ssm_alpha", "ssm_beta"} if name == "qwen3next" else {"ssm_ba"})
        if c.family.attn_gate:  # (AFMoE's output gate, its own projection)
            attention_i = attention_i | {"attn_gate"}
        if c.family.values_from_keys and not hasattr(layer, "attn_v"):  # (Gemma 4's global layers: attn_k's values)
            attention_i = attention_i - {"attn_v"}
        m = layer.ffn_moe
        # (shared experts without a gate: Nemotron-H MoE's; Gemma 4's dense FFN beside its experts)
        ffn = {"ffn_gate", "ffn_up", "ffn_down"} if m is None or c.family.moe_beside_ffn else {
            n for n in SHARED_EXPERT_NAMES if getattr(m, n)}
        assert names == attention_i | (ffn if c.has_ffn(i) else set())
        if m is not None:  # the router and the routed experts stay frozen
            frozen = [e for e in (m.router, m.gate_exps, m.up_exps, m.gate_up_exps, m.down_exps) if e is not None]
            assert not any(p.requires_grad for lin in frozen for p in lin.parameters())
        if layer.indexer is not None:  # DeepSeek-V3.2's indexer too (its selection takes no gradient)
            assert not any(p.requires_grad for p in layer.indexer.parameters())


@pytest.mark.parametrize("name,method,lr", [("qwen3moe", "qa-lora", 5e-3), ("deepseek3", "lora", 1e-2),
                                            ("glm4moe", "lora", 1e-2), ("exaone-moe", "q-bara", 1e-2),
                                            ("nemotron_h_moe", "qa-lora", 1e-2), ("kimi-linear", "lora", 2e-2),
                                            ("afmoe", "lora", 1e-2), ("mimo2", "lora", 1e-2),
                                            ("deepseek32", "lora", 5e-3)])
def test_finetune_and_streaming_on_a_moe_gguf(moe, tmp_path, botchan_text, name, method, lr):
    text = tmp_path / "text.txt"
    text.write_text(botchan_text[30000:34000], encoding="utf-8")
    base = gguf_of(moe[name], "Q8_0")
    result = lowtune.finetune(base, text, tmp_path / "run", method=method, rank=4, steps=3, seq_len=32,
                              batch=2, lr=lr, warmup=0, eval_every=0, eval_fraction=0.1, device="cpu", seed=0)
    assert result.eval_after["eval_loss"] < result.eval_before["eval_loss"]

    def adapted():
        return with_filled_lora(Model.from_gguf(base))

    resident, streaming, plan = resident_and_streamed(adapted, "cpu")
    assert plan.streamed == list(range(resident.config.n_layers))
    assert_trains_alike(resident, streaming, rand_ids(2, 24, seed=4))


@pytest.mark.llamacpp
@pytest.mark.transformers
@pytest.mark.parametrize("name", MOE_NAMES + REMOTE_CODE_MOE_NAMES)
def test_exports(moe, tmp_path, name):
    import peft
    base = moe[name].gguf
    model = make_adapter(base, tmp_path / "run" / "adapter", "lora", rel=0.2, rank=4)
    peft_run, peft_model = tmp_path / "run", model
    lora_run, lora_model = tmp_path / "run", model
    attention = ("attn_q", "attn_k", "attn_v", "attn_output")
    if name in LATENT + ("kimi-linear",):  # llama.cpp's deepseek2 graph takes a GGUF LoRA on attn_output and the
        #                                      FFN only (kimi-linear's on the FFN and its latent attention's output)
        with pytest.raises(ValueError, match="llama.cpp applies no GGUF LoRA"):
            export_lora_gguf(base, lora_run, tmp_path / "lora.gguf")
        with pytest.raises(ValueError, match="kv_b_proj"):  # (attn_k_b's heads are kv_b_proj's rows transposed)
            export_peft(base, peft_run, tmp_path / "peft")
        lora_run = tmp_path / "ffn"
        lora_model = make_adapter(base, lora_run / "adapter", "lora", rel=0.2, rank=4,
                                  targets=("ffn_gate", "ffn_up", "ffn_down", *SHARED_EXPERT_NAMES)
                                  + (() if name == "kimi-linear" else ("attn_output",)))
        attention = ("attn_q", "attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_output")
    # (a dense first layer's FFN, or shared experts; Gemma 4's dense FFN beside its experts is transformers' mlp)
    if any(".ffn_" in k for k in adapters.adapters_of(model)) and not model.config.family.moe_beside_ffn:
        with pytest.raises(ValueError, match="FFN adapters"):  # (transformers would take them for the experts')
            export_peft(base, lora_run, tmp_path / "peft")
        peft_run = tmp_path / "attn"
        peft_model = make_adapter(base, peft_run / "adapter", "lora", rel=0.2, rank=4, targets=attention)
    ids = rand_ids(2, 40, seed=7)
    with torch.no_grad():
        want, plain = model(ids), Model.from_gguf(base)(ids)
    assert rel_err(plain, want) > 1e-2
    export_merged_gguf(base, tmp_path / "run", tmp_path / "merged.gguf")
    merged = Model.from_gguf(tmp_path / "merged.gguf")
    with torch.no_grad():
        assert rel_err(merged(ids), want) < 1e-5
    export_lora_gguf(base, lora_run, tmp_path / "lora.gguf")
    w = rand_ids(4, SEQ, seed=9)
    ppl, lora_ppl = nll_ppl(merged, w), nll_ppl(lora_model, w)
    cpp_merged = llamacpp_perplexity(llamacpp(tmp_path / "merged.gguf"), w)
    cpp_lora = llamacpp_perplexity(llamacpp(base, lora=tmp_path / "lora.gguf"), w)
    print(f"{name}: perplexity merged lowtune {ppl:.3f}, llama.cpp {cpp_merged:.3f}; with the GGUF LoRA lowtune "
          f"{lora_ppl:.3f}, llama.cpp {cpp_lora:.3f}")
    tol = 1e-2 if name == "glm-dsa" else 2e-3  # (GLM-5's indexer flips near ties on llama.cpp's F16 keys)
    assert abs(cpp_merged - ppl) / ppl < tol and abs(cpp_lora - lora_ppl) / lora_ppl < tol
    if name == "qwen3next":  # (its HF modules fuse the DeltaNet's projections head by head)
        with pytest.raises(ValueError, match="in_proj_qkvz.*export it as GGUF"):
            export_peft(base, peft_run, tmp_path / "peft")
        return
    # (lowtune has no Hugging Face names for their tensors; transformers has no class for the remote-code ones)
    if name in ("kimi-linear",) + REMOTE_CODE_MOE_NAMES:
        with pytest.raises(ValueError, match=f"no Hugging Face names for architecture '{name}'"):
            export_peft(base, peft_run, tmp_path / "peft")
        return
    export_peft(base, peft_run, tmp_path / "peft")
    if name == "llama4":
        hf_chunks(peft_model)
    hf = peft.PeftModel.from_pretrained(hf_model(name), tmp_path / "peft").eval()
    with torch.no_grad():
        got, want = hf(input_ids=ids).logits, peft_model(ids)
    print(f"{name}: PEFT adapter on transformers' model vs lowtune, relative error {rel_err(got, want):.2e}")
    assert rel_err(got, want) < 1e-4
    if name == "gemma4moe":  # (its experts as its checkpoints hold them: stacked gate_up_proj and down_proj)
        import transformers
        export_hf(base, tmp_path / "run", tmp_path / "hf", dtype="fp32")
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                                   attn_implementation="eager").eval()
        with torch.no_grad():
            got = merged(input_ids=ids).logits
        print(f"{name}: merged HF directory vs lowtune, relative error {rel_err(got, model(ids)):.2e}")
        assert rel_err(got, model(ids)) < 1e-4
        return
    with pytest.raises(ValueError, match="mixture-of-experts models export as GGUF"):
        export_hf(base, tmp_path / "run", tmp_path / "hf")


# the mixtures whose HF directories lowtune reads: the PEFT adapter's targets, a linear whose LoRA is refused and
# why, and a config.json change refused and why
HF_MIXTURES = {
    "jamba": (("attn_q", "attn_k", "attn_v", "attn_output", "ssm_in", "ssm_x", "ssm_out"), "ssm_dt",
              "transformers reads dt_proj's weight", {"expert_layer_period": 1, "expert_layer_offset": 0},
              "expert_layer_period, expert_layer_offset.*llama.cpp's jamba"),
    "nemotron_h_moe": (("attn_q", "attn_k", "attn_v", "attn_output", "ssm_in"), "ssm_out",
                       "PEFT refuses a LoRA on out_proj", {"moe_latent_size": 16}, "moe_latent_size")}


@pytest.mark.transformers
@pytest.mark.parametrize("name", HF_MIXTURES)
def test_hf_directory_of_a_mixture(moe, tmp_path, name):
    """Jamba's and Nemotron-H MoE's directories read as the converted GGUF: the same tensors (each expert's up, down
    and Jamba's gate stacked as the converter stacks them), transformers' logits in fp32 and the converted file's
    in bf16; they train quantized on load. A PEFT adapter on their attention and Mamba linears gives lowtune's
    adapted logits on transformers' model (Jamba's dt_proj and Nemotron-H's out_proj refused by name);
    config.json's variants that llama.cpp does not run are refused by name."""
    import peft
    from lowtune import hf_names
    from lowtune.safetensors_io import HFCheckpoint
    targets, refused, why, change, change_why = HF_MIXTURES[name]
    hf_dir, gguf, ids = moe[name].hf_dir, moe[name].gguf, rand_ids(2, SEQ)
    with torch.no_grad():
        got, want = lowtune.load_model(hf_dir, qtype="F32")(ids), hf_model(name)(ids).logits
        assert rel_err(got, want) < 1e-4 and torch.equal(got, Model.from_gguf(gguf)(ids))
        low = lowtune.load_model(hf_dir, qtype="F32", dtype=torch.bfloat16)(ids)
        assert torch.equal(low, Model.from_gguf(gguf, dtype=torch.bfloat16)(ids))
    with HFCheckpoint(hf_dir) as src, GGUFFile(gguf) as f:
        assert set(src.tensor_infos) == set(f.tensor_infos) and "blk.1.ffn_up_exps.weight" in f.tensor_infos, \
            set(src.tensor_infos) ^ set(f.tensor_infos)
        for n in f.tensor_infos:
            assert torch.equal(src.tensor(n), f.tensor(n)), n
    losses = adapted_steps(lowtune.load_model(hf_dir), "lora", rand_ids(2, 32, seed=11))
    assert losses[-1] < losses[0], losses
    model = make_adapter(gguf, tmp_path / "run" / "adapter", "lora", rel=0.2, rank=4, targets=targets + (refused,))
    with pytest.raises(ValueError, match=f"on blk.\\d+.{refused}.weight would not apply in .*: {why}"):
        export_peft(gguf, tmp_path / "run", tmp_path / "peft")
    model = make_adapter(gguf, tmp_path / "run" / "adapter", "lora", rel=0.2, rank=4, targets=targets)
    export_peft(gguf, tmp_path / "run", tmp_path / "peft")
    with torch.no_grad():
        want = model(ids)
        got = peft.PeftModel.from_pretrained(hf_model(name), tmp_path / "peft").eval()(input_ids=ids).logits
    print(f"{name}: PEFT adapter on transformers' model vs lowtune, relative error {rel_err(got, want):.2e}")
    assert rel_err(got, want) < 1e-4 and rel_err(Model.from_gguf(gguf)(ids), want) > 1e-2
    cfg = json.loads((hf_dir / "config.json").read_text())
    with pytest.raises(ValueError, match=change_why):
        hf_names.metadata_from_hf_config({**cfg, **change})


def test_jamba_mamba_layers_attention_and_experts(moe):
    """Jamba's file gives its Mamba layers no KV heads (Mamba's mixer, dt, B and C RMS-normed with the file's
    weights, which matter), its attention layers no RoPE, and experts every other layer from the second, as its
    converted files are laid out; a file with experts elsewhere is refused, saying so."""
    model, hf = Model.from_gguf(moe["jamba"].gguf), hf_model("jamba")
    c = model.config
    assert (c.ssm_layers, c.moe_layers, c.no_rope, c.n_kv_heads) == ((0, 2), (1, 3), True, 2)
    assert [layer.mamba is not None and layer.mamba.norms is not None for layer in model.layers] == [
        True, False, True, False]
    ids = rand_ids(2, SEQ)
    with torch.no_grad():
        want = hf(ids).logits
        assert rel_err(model(ids), want) < 1e-4
        for layer in model.layers[::2]:
            layer.mamba.norms = None
        assert rel_err(model(ids), want) > 1e-3
    with GGUFFile(moe["jamba"].gguf) as f:
        md = dict(f.metadata)
        w = {n: f.qtensor(n) if len(info.shape) > 1 else f.tensor(n) for n, info in f.tensor_infos.items()}
    with pytest.raises(ValueError, match="lacks tensor 'blk.0.ffn_gate_inp.weight', which this jamba"):
        Model(ModelConfig.from_gguf_metadata({**md, "jamba.interleave_moe_layer_step": 1}), w)


def test_what_is_refused(moe):
    md = {"general.architecture": "qwen3moe", "qwen3moe.embedding_length": 64, "qwen3moe.block_count": 2,
          "qwen3moe.feed_forward_length": 128, "qwen3moe.attention.head_count": 4, "qwen3moe.vocab_size": 9,
          "qwen3moe.attention.layer_norm_rms_epsilon": 1e-6, "qwen3moe.expert_count": 8,
          "qwen3moe.expert_used_count": 2}
    assert ModelConfig.from_gguf_metadata(md).n_experts == 8
    with pytest.raises(ValueError, match="shared experts"):
        ModelConfig.from_gguf_metadata({**md, "qwen3moe.expert_shared_count": 1})
    assert ModelConfig.from_gguf_metadata({**md, "qwen3moe.expert_gating_func": 2}).expert_gating == 2  # sigmoid
    with pytest.raises(ValueError, match="gating function 4"):  # (llama.cpp's square root of softplus)
        ModelConfig.from_gguf_metadata({**md, "qwen3moe.expert_gating_func": 4})
    with pytest.raises(ValueError, match="groups must divide the experts"):
        ModelConfig.from_gguf_metadata({**md, "qwen3moe.expert_group_count": 3,
                                        "qwen3moe.expert_group_used_count": 1}).check()
    with pytest.raises(ValueError, match="9 experts used of 8"):
        ModelConfig.from_gguf_metadata({**md, "qwen3moe.expert_used_count": 9}).check()
    # other routers, and experts in a family that has none
    for arch in ("llada-moe", "qwen3"):
        with pytest.raises(ValueError, match=f"'{arch}' is a mixture-of-experts model"):
            ModelConfig.from_gguf_metadata({k.replace("qwen3moe", arch): v.replace("qwen3moe", arch)
                                            if isinstance(v, str) else v for k, v in md.items()})
    with pytest.raises(ValueError, match="mixtures of experts among them.*convert_hf_to_gguf"):  # (read as GGUF)
        family_of_hf(["Glm4MoeForCausalLM"])
    for read_as_gguf in ("Llama4ForCausalLM", "Llama4ForConditionalGeneration", "PhiMoEForCausalLM",
                         "PhimoeForCausalLM", "Dots1ForCausalLM", "HunYuanMoEV1ForCausalLM", "MiniMaxM2ForCausalLM",
                         "ExaoneMoeForCausalLM", "Cohere2MoeForCausalLM",
                         "KimiLinearForCausalLM", "DeepseekV32ForCausalLM", "GlmMoeDsaForCausalLM", "AfmoeForCausalLM",
                         "Mistral4ForCausalLM", "MiMoV2FlashForCausalLM", "LagunaForCausalLM", "MellumForCausalLM",
                         "DbrxForCausalLM", "DeepseekForCausalLM", "Grok1ForCausalLM", "ArcticForCausalLM",
                         "BailingMoeForCausalLM", "BailingMoeV2ForCausalLM", "GroveMoeForCausalLM"):
        with pytest.raises(ValueError, match="mixtures of experts among them.*convert_hf_to_gguf"):
            family_of_hf([read_as_gguf])
    with pytest.raises(ValueError, match="routed experts, which stay frozen"):
        adapters.AdapterConfig(targets=("attn_output", "ffn_up_exps"))
    model = Model.from_gguf(moe["mixtral"].gguf)
    assert default_mode("cuda", model) == "off"
    with pytest.raises(ValueError, match="neither compiled nor captured"):
        compile_model(model, "layer", cuda_graphs=False, backend="aot_eager")


def test_nemotron_h_moe_layers_and_variants(moe):
    """Nemotron-H MoE's layers of one part: Mamba2 mixers, attention without RoPE, or experts without a gate
    beside a shared expert of the file's own width (expert_shared_feed_forward_length, not expert_shared_count
    × the expert width); Nemotron 3 Super's experts behind a latent and Puzzle's per-layer expert widths are
    refused by name."""
    model = Model.from_gguf(moe["nemotron_h_moe"].gguf)
    c, md = model.config, model.metadata
    assert (c.ssm_layers, c.mlp_layers, c.moe_layers, c.no_rope) == ((0, 4), (1, 3, 5), (1, 3, 5), True)
    assert (c.expert_width, c.shared_expert_ffn_dim, md["nemotron_h_moe.expert_shared_count"]) == (32, 64, 1)
    m = model.layers[1].ffn_moe
    assert m.gate_exps is None and m.ffn_gate_shexp is None and m.ffn_up_shexp.out_features == 64
    assert all(layer.ffn_moe is None for layer in model.layers if not c.has_ffn(layer.index))
    with pytest.raises(ValueError, match="moe_latent_size: Nemotron 3 Super"):
        ModelConfig.from_gguf_metadata({**md, "nemotron_h_moe.moe_latent_size": 16})
    widths = [0, 32, 0, 48, 0, 32]
    with pytest.raises(ValueError, match="different nemotron_h_moe.expert_feed_forward_length \\[32, 48\\]"):
        ModelConfig.from_gguf_metadata({**md, "nemotron_h_moe.expert_feed_forward_length": widths})
    same = ModelConfig.from_gguf_metadata({**md, "nemotron_h_moe.expert_used_count": [0, 2, 0, 2, 0, 2]})
    assert same.n_experts_used == EXPERTS_USED


@pytest.mark.llamacpp
def test_gemma4moe_layers_and_split_gate_up(moe, tmp_path):
    """Gemma 4's expert layers as llama.cpp reads them: the dense FFN kept beside the experts, gate and up in one
    ffn_gate_up_exps; a file with them apart (ffn_gate_exps, ffn_up_exps, which llama.cpp reads too) gives the
    same logits and llama.cpp's perplexity (its merged HF directory refused: the class holds gate and up in one
    tensor). bf16 activations follow fp32."""
    from lowtune.gemma4 import Gemma4Model
    path = moe["gemma4moe"].gguf
    model = Model.from_gguf(path)
    assert type(model) is Gemma4Model and model.config.expert_width == 32
    for layer in model.layers:
        m = layer.ffn_moe
        assert m is not None and layer.ffn_gate.out_features == layer.ffn_up.out_features == model.config.ffn_dim
        assert m.gate_exps is None and m.up_exps is None and m.gate_up_exps.out_features == 2 * 32 * EXPERTS
        assert m.router_scale.shape == (model.config.dim,) and m.expert_scales.shape == (EXPERTS,)
    ids = rand_ids(2, SEQ)
    with torch.no_grad():
        want = model(ids)
        bf16 = Model.from_gguf(path, dtype=torch.bfloat16)(ids)
    print(f"gemma4moe: bf16 vs fp32, relative error {rel_err(bf16, want):.2e}")
    assert rel_err(bf16, want) < 5e-2
    with GGUFFile(path) as f:
        md, types = dict(f.metadata), dict(f.metadata_types)
        tensors = []
        for n in f.tensor_infos:
            t = f.tensor(n)
            if n.endswith("ffn_gate_up_exps.weight"):  # [E, 2F, D]: each expert's gate rows, then its up rows
                gate, up = torch.as_tensor(t).chunk(2, dim=1)
                tensors += [(n.replace("gate_up", "gate"), gate.contiguous()), (n.replace("gate_up", "up"),
                                                                                 up.contiguous())]
            else:
                tensors.append((n, t))
    write_gguf(tmp_path / "split.gguf", md, tensors, metadata_types=types)
    split = Model.from_gguf(tmp_path / "split.gguf")
    assert split.layers[0].ffn_moe.gate_up_exps is None and split.layers[0].ffn_moe.gate_exps is not None
    with torch.no_grad():
        assert rel_err(split(ids), want) < 1e-6
    w = rand_ids(4, SEQ, seed=9)
    ppl, cpp = nll_ppl(split, w), llamacpp_perplexity(llamacpp(tmp_path / "split.gguf"), w)
    print(f"gemma4moe, gate and up apart: perplexity lowtune {ppl:.3f}, llama.cpp {cpp:.3f}")
    assert abs(cpp - ppl) / ppl < 2e-3
    with pytest.raises(ValueError, match="gate and up apart .ffn_gate_exps, ffn_up_exps.*gate_up_proj.*GGUF"):
        export_hf(tmp_path / "split.gguf", None, tmp_path / "hf")


@pytest.mark.transformers
def test_gemma4moe_hf_directory_reads_as_the_converted_gguf(moe, tmp_path):
    """Gemma 4 26B-A4B's HF directory (the router's proj, scale and per_expert_scale, the experts' stacked
    gate_up_proj and down_proj, the norms beside them) reads as llama.cpp's converter's GGUF: every tensor equal,
    transformers' logits in fp32, bf16 following; adapters train on it (Q4_1 on load); its merged HF directory
    holds every tensor as it was."""
    from lowtune.safetensors_io import HFCheckpoint
    hf_dir, gguf = moe["gemma4moe"].hf_dir, moe["gemma4moe"].gguf
    with HFCheckpoint(hf_dir) as src, GGUFFile(gguf) as f:
        assert set(src.tensor_infos) == set(f.tensor_infos)
        for n in f.tensor_infos:
            assert torch.equal(src.tensor(n).float(), f.tensor(n).float()), n
    ids = rand_ids(2, SEQ)
    with torch.no_grad():
        got, want = lowtune.load_model(hf_dir, qtype="F32")(ids), hf_model("gemma4moe")(ids).logits
        bf16 = lowtune.load_model(hf_dir, qtype="F32", dtype=torch.bfloat16)(ids)
        assert rel_err(got, Model.from_gguf(gguf)(ids)) < 1e-6
    print(f"gemma4moe: the HF directory vs transformers {rel_err(got, want):.2e}, bf16 vs fp32 "
          f"{rel_err(bf16, got):.2e}")
    assert rel_err(got, want) < 1e-4 and rel_err(bf16, got) < 5e-2
    model = lowtune.load_model(hf_dir)  # (Q4_1 on load)
    assert adapters.apply_adapters(model, adapters.AdapterConfig(method="lora", rank=4, alpha=8, seed=0))
    loss = model.loss(ids)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in adapters.adapter_parameters(model))
    export_hf(hf_dir, None, tmp_path / "hf", dtype="fp32", base_type="F32")  # (the experts as the checkpoint has)
    with HFCheckpoint(tmp_path / "hf") as written, HFCheckpoint(hf_dir) as src:
        assert all(torch.equal(written.tensor(n), src.tensor(n)) for n in src.tensor_infos)


@pytest.mark.transformers
def test_afmoe_gate_positions_and_peft_refusal(moe, tmp_path):
    """AFMoE as llama.cpp reads its file: every 4th layer global and without RoPE, and without RoPE still where
    the file gives no window (llama.cpp's fixed step, as transformers' layer types); embeddings × √D and each
    head's output gate from attn_gate move transformers' logits. bf16 activations follow fp32. A PEFT adapter on the
    gate (self_attn.gate_proj, which PEFT's loading takes for the experts') is refused by name."""
    path = moe["afmoe"].gguf
    model = Model.from_gguf(path)
    c = model.config
    assert [c.window(i) for i in range(c.n_layers)] == [WINDOW] * 3 + [0]
    assert [c.rope_kind(i) for i in range(c.n_layers)] == [0, 0, 0, NO_ROPE]
    md = {k: v for k, v in model.metadata.items() if k != "afmoe.attention.sliding_window"}
    windowless = ModelConfig.from_gguf_metadata(md)
    assert [windowless.window(i) for i in range(4)] == [0] * 4 and windowless.rope_kind(3) == NO_ROPE
    assert model.tok_embd.scale == math.sqrt(c.dim)
    assert all(layer.attn_gate.out_features == c.n_heads * c.head_dim for layer in model.layers)
    ids = rand_ids(2, SEQ)
    with torch.no_grad():
        want = hf_model("afmoe")(ids).logits
        assert rel_err(model(ids), want) < 1e-4
        for layer in model.layers:  # (q, k and v without the gate's product: no gate)
            layer.PRODUCT_GROUPS = DecoderLayer.PRODUCT_GROUPS
        assert rel_err(model(ids), want) > 1e-3
        model = Model.from_gguf(path)
        model.tok_embd.scale = 1.0
        assert rel_err(model(ids), want) > 1e-3
        bf16 = Model.from_gguf(path, dtype=torch.bfloat16)(ids)
    assert rel_err(bf16, want) < 5e-2
    make_adapter(path, tmp_path / "run" / "adapter", "lora", rel=0.2, rank=4, targets=("attn_q", "attn_gate"))
    with pytest.raises(ValueError, match="output gate .blk.0.attn_gate.*takes every gate_proj"):
        export_peft(path, tmp_path / "run", tmp_path / "peft")


@pytest.mark.transformers
def test_mimo2_layers_of_their_own_widths(moe):
    """MiMo-V2-Flash as llama.cpp reads its file: the sliding layers' own KV head count (twice the global ones'),
    sinks and RoPE base, values half a head wide, the attention's output × the value scale (which moves
    transformers' logits), the layers with a router (not the first) experts. bf16 activations follow fp32."""
    model = Model.from_gguf(moe["mimo2"].gguf)
    c = model.config
    assert [c.at_layer(i).n_kv_heads for i in range(c.n_layers)] == [1, 2, 2, 1]
    assert (c.head_dim, c.v_dim, c.rope_dim, c.moe_layers) == (16, 8, 8, (1, 2, 3))
    assert c.attn_value_scale == pytest.approx(0.7) and c.rope_theta_swa == 1e4
    assert [layer.attn_sinks is not None for layer in model.layers] == [False, True, True, False]
    assert [layer.attn_v.out_features for layer in model.layers] == [8, 16, 16, 8]
    ids = rand_ids(2, SEQ)
    with torch.no_grad():
        want = hf_model("mimo2")(ids).logits
        assert rel_err(model(ids), want) < 1e-4
        model.config = dataclasses.replace(c, attn_value_scale=1.0)
        for layer in model.layers:
            layer.config = dataclasses.replace(layer.config, attn_value_scale=1.0)
        assert rel_err(model(ids), want) > 1e-3
        bf16 = Model.from_gguf(moe["mimo2"].gguf, dtype=torch.bfloat16)(ids)
    assert rel_err(bf16, want) < 5e-2


@pytest.mark.transformers
def test_laguna_gate_and_variants(moe, tmp_path):
    """Laguna as llama.cpp reads its file: the first of every 4 layers global, the sliding ones with their own RoPE
    base; the softplus output gate one a head (XS.2's: attn_gate a row a head) moves transformers' logits, and one
    an element (M.1's) computes the same where each head's rows repeat its one. A file whose layers have query head
    counts of their own, or whose sliding layers rotate other dims, is refused by name."""
    path = moe["laguna"].gguf
    model = Model.from_gguf(path)
    c = model.config
    assert [c.window(i) for i in range(c.n_layers)] == [0] + [WINDOW] * 3 and c.rope_theta_swa == 1e4
    assert all(layer.attn_gate.out_features == c.n_heads for layer in model.layers)
    ids = rand_ids(2, SEQ)
    with torch.no_grad():
        want = hf_model("laguna")(ids).logits
        got = model(ids)
        assert rel_err(got, want) < 1e-4
        for layer in model.layers:  # (q, k and v without the gate's product: no gate)
            layer.PRODUCT_GROUPS = DecoderLayer.PRODUCT_GROUPS
        assert rel_err(model(ids), want) > 1e-3
    with GGUFFile(path) as f:
        md, types = dict(f.metadata), dict(f.metadata_types)
        tensors = [(n, torch.as_tensor(f.tensor(n)).repeat_interleave(c.head_dim, 0) if n.endswith("attn_gate.weight")
                    else f.tensor(n)) for n in f.tensor_infos]
    write_gguf(tmp_path / "per-element.gguf", md, tensors, metadata_types=types)
    element = Model.from_gguf(tmp_path / "per-element.gguf")
    assert element.layers[0].attn_gate.out_features == c.n_heads * c.head_dim
    with torch.no_grad():
        assert rel_err(element(ids), got) < 1e-6
    with pytest.raises(ValueError, match="different laguna.attention.head_count \\[4, 8\\]"):
        ModelConfig.from_gguf_metadata({**md, "laguna.attention.head_count": [4, 8, 8, 8]})
    with pytest.raises(ValueError, match="rotates its sliding layers over 16 dims.*the others over 8"):
        ModelConfig.from_gguf_metadata({**md, "laguna.rope.dimension_count_swa": 16})


@pytest.mark.llamacpp
def test_mellum_sliding_layers_rotate_with_the_global_base(moe, tmp_path):
    """Mellum's file may give its sliding layers a RoPE base of their own (freq_base_swa, its converter's from
    transformers' sliding_attention parameters), which llama.cpp's mellum graph does not read: they rotate with the
    global base, and lowtune gives llama.cpp's perplexity so."""
    with GGUFFile(moe["mellum"].gguf) as f:
        md, types = dict(f.metadata), dict(f.metadata_types)
        tensors = [(n, f.tensor(n)) for n in f.tensor_infos]
    write_gguf(tmp_path / "swa-base.gguf", {**md, "mellum.rope.freq_base": 5e5}, tensors, metadata_types=types)
    model = Model.from_gguf(tmp_path / "swa-base.gguf")
    assert model.metadata["mellum.rope.freq_base_swa"] == 1e4 and model.config.rope_theta_swa is None
    assert [model.config.rope_kind(i) for i in range(model.config.n_layers)] == [0] * 4
    assert [model.config.window(i) for i in range(model.config.n_layers)] == [WINDOW, 0] * 2  # (the file's pattern)
    w = rand_ids(4, SEQ, seed=9)
    ppl, cpp = nll_ppl(model, w), llamacpp_perplexity(llamacpp(tmp_path / "swa-base.gguf"), w)
    print(f"mellum with freq_base_swa 1e4 under freq_base 5e5: perplexity lowtune {ppl:.3f}, llama.cpp {cpp:.3f}")
    assert abs(cpp - ppl) / ppl < 2e-3


def test_cohere2moe_layers_and_norm_variant(moe):
    """Cohere2 MoE as llama.cpp reads its file: the dense first layer global and rotated, then the file's
    windows (every 4th layer global, without RoPE); a file that gives layer_norm_rms_epsilon (llama.cpp then
    norms with RMSNorm) is refused by name."""
    model = Model.from_gguf(moe["cohere2moe"].gguf)
    c = model.config
    assert [c.window(i) for i in range(c.n_layers)] == [0, WINDOW, WINDOW, WINDOW, 0]
    assert [c.rope_kind(i) for i in range(c.n_layers)] == [0, 0, 0, 0, NO_ROPE]
    assert c.logit_scale == pytest.approx(1 / 0.75) and model.output is None  # (logits × 0.75, a tied head)
    with pytest.raises(ValueError, match="norms with RMSNorm .attention.layer_norm_rms_epsilon"):
        ModelConfig.from_gguf_metadata({**model.metadata, "cohere2moe.attention.layer_norm_rms_epsilon": 1e-5})


@pytest.mark.transformers
def test_llama4_past_its_first_chunk(moe, monkeypatch):
    """Past 8192 positions, llama.cpp's chunk: the chunked layers start a new chunk and the NoPE
    layer's queries are scaled by 1 + 0.1 ln 2, as transformers' at attention_chunk_size 8192."""
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(moe["llama4"].hf_dir, attention_chunk_size=8192,
                                                           attn_implementation="sdpa").eval()
    model = Model.from_gguf(moe["llama4"].gguf)
    ids = rand_ids(1, 8200, seed=11)
    with torch.no_grad():
        want = hf(input_ids=ids).logits[:, -16:]
        assert rel_err(model(ids)[:, -16:], want) < 1e-4
        monkeypatch.setattr(lowtune.model, "NOPE_TEMPERATURE", 0.0)  # (without the temperature they differ,
        assert rel_err(model(ids)[:, -16:], want) > 1e-3              # and without the chunks)
        monkeypatch.undo()
        for layer in model.layers:
            layer.window = 0
        assert rel_err(model(ids)[:, -16:], want) > 1e-3


def test_llama4_variants(moe):
    """Maverick's files (128 experts) norm no q/k, as llama.cpp's use_kq_norm; a file that turns
    chunked attention off (MobileLLM's, attention.sliding_window = 0) is refused."""
    md = Model.from_gguf(moe["llama4"].gguf).metadata
    scout = ModelConfig.from_gguf_metadata(md)
    assert [scout.l2_normed(i) for i in range(4)] == [True, True, True, False]
    maverick = ModelConfig.from_gguf_metadata({**md, "llama4.expert_count": 128})
    assert not any(maverick.l2_normed(i) for i in range(4))
    with pytest.raises(ValueError, match="turns chunked attention off.*MobileLLM"):
        ModelConfig.from_gguf_metadata({**md, "llama4.attention.sliding_window": 0})


@pytest.mark.transformers
def test_phimoe_as_llamacpp_runs_it(moe):
    """PhiMoE as llama.cpp's phi3 graph runs it, where transformers' PhimoeForCausalLM differs
    (tests/family_models.phimoe_as_llamacpp makes the tiny model llama.cpp's): RMSNorms plus the
    file's biases in place of LayerNorms, Mixtral's routing (the softmax's top 2, renormalized) in
    place of sparsemixer's, LongRoPE's long factors beyond the original context, and no window;
    each of the three moves transformers' logits. bf16 activations follow fp32."""
    model = Model.from_gguf(moe["phimoe"].gguf)
    assert type(model.layers[0].attn_norm).__name__ == "BiasedRMSNorm" and model.output.bias is not None
    assert ModelConfig.from_gguf_metadata({**model.metadata, "phimoe.attention.sliding_window": 16}).sliding_window == 0
    ids = rand_ids(2, SEQ)
    hf = hf_model("phimoe")
    with torch.no_grad():
        got = model(ids)
        assert rel_err(got, hf(input_ids=ids).logits) < 1e-4
        patched = {m: m.__dict__.pop("forward") for m in hf.modules() if "forward" in m.__dict__}
        kinds = {"norm": lambda m: isinstance(m, torch.nn.LayerNorm), "rope": lambda m: m is hf.model.rotary_emb,
                 "routing": lambda m: type(m).__name__ == "PhimoeTopKRouter"}
        for kind, of_kind in kinds.items():  # transformers' own of each kind, the others llama.cpp's
            for m, f in patched.items():
                m.forward = m.forward if of_kind(m) else f
            moved = rel_err(got, hf(input_ids=ids).logits)
            print(f"phimoe: lowtune vs transformers with its own {kind}: relative error {moved:.2e}")
            assert moved > 1e-2, kind
            for m in patched:
                m.__dict__.pop("forward", None)
        bf16 = Model.from_gguf(moe["phimoe"].gguf, dtype=torch.bfloat16)(ids)
    assert rel_err(bf16, got) < 5e-2


def test_hy_v3_expert_layers_are_the_routed_ones(moe):
    """HY V3's converted file marks its dense first layer only by giving it no router (no
    leading_dense_block_count): its expert layers are the ones with ffn_gate_inp, as llama.cpp finds them, and
    its selection bias is read from exp_probs_b, named without .bias."""
    with GGUFFile(moe["hy_v3"].gguf) as f:
        md, names = dict(f.metadata), set(f.tensor_infos)
    assert "hy_v3.leading_dense_block_count" not in md and "blk.1.exp_probs_b" in names
    assert ModelConfig.from_gguf_metadata(md, names).moe_layers == (1, 2)
    assert ModelConfig.from_gguf_metadata(md).moe_layers is None  # (without the tensors: every layer's experts)
    model = Model.from_gguf(moe["hy_v3"].gguf)
    assert [layer.ffn_moe is None for layer in model.layers] == [True, False, False]
    assert model.layers[1].ffn_moe.selection_bias is not None


@pytest.mark.parametrize("name", ["dots1", "minimax-m2"])
def test_sigmoid_routing_unless_the_file_says(moe, name):
    """dots.llm1's and MiniMax-M2's converters write expert_gating_func from the config's scoring_func; a
    file without it routes by sigmoid, their Hugging Face routers' only scoring (llama.cpp needs the key)."""
    md, key = Model.from_gguf(moe[name].gguf).metadata, f"{name}.expert_gating_func"
    assert md[key] == 2
    assert ModelConfig.from_gguf_metadata({k: v for k, v in md.items() if k != key}).expert_gating == 2
    assert ModelConfig.from_gguf_metadata({**md, key: 1}).expert_gating == 1


def test_hunyuan_moe_shared_expert_width(moe):
    """Hunyuan MoE's shared expert is expert_shared_feed_forward_length wide, or (a file without the key)
    feed_forward_length wide, as llama.cpp reads it."""
    md = Model.from_gguf(moe["hunyuan-moe"].gguf).metadata
    width = md["hunyuan-moe.expert_shared_feed_forward_length"]
    assert ModelConfig.from_gguf_metadata(md).shared_expert_ffn_dim == width
    md = {**md, "hunyuan-moe.feed_forward_length": 48}
    del md["hunyuan-moe.expert_shared_feed_forward_length"]
    assert ModelConfig.from_gguf_metadata(md).shared_expert_ffn_dim == 48


@pytest.mark.transformers
def test_kimi_linear_layers_and_variants(moe, tmp_path):
    """Kimi Linear: Kimi Delta Attention where the file gives no KV heads (q, k and v convolved apart, a decay
    for each key channel, the sigmoid-gated output norm), latent attention without RoPE (q straight from x),
    the experts' weights renormalized though the file has no expert_weights_norm (llama.cpp's graph); the
    decay's bias for each key channel moves transformers' logits. A KDA layer's bf16 activations follow fp32.
    A file without kda.head_dim, with KDA q/k heads other than its value heads, or with q, k and v fused into
    attn_qkv, is refused by name."""
    model = Model.from_gguf(moe["kimi-linear"].gguf)
    c, md = model.config, model.metadata
    assert (c.delta_layers, c.moe_layers, c.no_rope) == ((0, 1, 2), (1, 2, 3), True)
    assert (c.q_lora_rank, c.kv_lora_rank) == (0, 32)
    assert (c.ssm_k_heads, c.ssm_head_dim, c.ssm_conv_kernel, c.renorms_experts) == (4, 32, 4, True)
    assert "kimi-linear.expert_weights_norm" not in md
    kda = [layer for layer in model.layers if layer.delta_net]
    assert kda[0].ssm_conv1d.shape == (3 * c.ssm_inner, 4) and not hasattr(kda[0], "attn_qkv")
    ids = rand_ids(2, SEQ)
    with torch.no_grad():
        want = hf_model("kimi-linear")(ids).logits
        got = model(ids)
        assert rel_err(got, want) < 1e-4
        kept = [layer.ssm_dt for layer in kda]
        for layer in kda:  # dt's bias one a head in place of one for each key channel
            layer.ssm_dt = layer.ssm_dt.view(c.ssm_k_heads, -1).mean(-1, keepdim=True).expand(-1, c.ssm_head_dim)
        assert rel_err(model(ids), want) > 1e-3
        for layer, dt in zip(kda, kept):
            layer.ssm_dt = dt
        assert rel_err(model(ids), want) < 1e-4
        # (the logits move by 10 % in bf16: its router flips experts near ties, as test_cuda's bound allows)
        bf16 = Model.from_gguf(moe["kimi-linear"].gguf, dtype=torch.bfloat16)
        inputs = []
        model.layers[0].register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
        model(ids)
        h = model.layers[0].attn_norm(inputs[0])
        kda_bf16 = bf16.layers[0].delta_net_branch(h.bfloat16()).float()
    assert rel_err(kda_bf16, model.layers[0].delta_net_branch(h)) < 2e-2
    with pytest.raises(ValueError, match="lacks.*kda.head_dim"):
        ModelConfig.from_gguf_metadata({k: v for k, v in md.items() if k != "kimi-linear.kda.head_dim"})
    with pytest.raises(ValueError, match="as many of each"):
        dataclasses.replace(c, ssm_v_heads=8).check()
    # its convolution kernels stay in F32 whatever the type, as llama-quantize keeps them
    assert [choose_type("Q4_0", f"blk.0.ssm_conv1d_{x}.weight", (128, 32)).name for x in "qkv"] == ["F32"] * 3
    with GGUFFile(moe["kimi-linear"].gguf) as f:
        types = dict(f.metadata_types)
        tensors = {n: f.tensor(n) for n in f.tensor_infos}
    qkv = [tensors.pop(f"blk.0.attn_{x}.weight") for x in "qkv"]
    tensors["blk.0.attn_qkv.weight"] = torch.cat([torch.as_tensor(t) for t in qkv])
    write_gguf(tmp_path / "fused.gguf", md, list(tensors.items()), metadata_types=types)
    with pytest.raises(ValueError, match="fuses the Kimi Delta Attention layers' q, k and v into attn_qkv"):
        Model.from_gguf(tmp_path / "fused.gguf")


@pytest.mark.transformers
def test_dbrx_clipped_qkv_and_layer_norms(moe):
    """DBRX as llama.cpp reads its file: LayerNorms without biases (the FFN's attn_output_norm), q, k and v row views
    of the fused attn_qkv, clipped to ± clip_qkv, which moves transformers' logits when left out; bf16 activations
    follow fp32; its HF directory is refused by class, saying to convert it."""
    model = Model.from_gguf(moe["dbrx"].gguf)
    c = model.config
    assert (c.clamp_qkv, c.expert_width, c.shared_expert_ffn_dim) == (DBRX_CLIP_QKV, 32, 0)
    for i, layer in enumerate(model.layers):
        assert all(type(n).__name__ == "LayerNorm" and n.bias is None for n in (layer.attn_norm, layer.ffn_norm))
        assert [getattr(layer, n).fused_from for n in ("attn_q", "attn_k", "attn_v")] == [
            (f"blk.{i}.attn_qkv.weight", a, b) for a, b in ((0, 64), (64, 96), (96, 128))]
    assert "blk.0.attn_output_norm.weight" in model.tensor_types
    ids = rand_ids(2, SEQ)
    with torch.no_grad():
        want = hf_model("dbrx")(ids).logits
        assert rel_err(model(ids), want) < 1e-4
        model.config.clamp_qkv = 0.0
        assert rel_err(model(ids), want) > 1e-3
        model.config.clamp_qkv = DBRX_CLIP_QKV
        bf16 = Model.from_gguf(moe["dbrx"].gguf, dtype=torch.bfloat16)
        fp32, low = model(ids), bf16(ids)
        # (a bf16 router picks other experts for a few tokens; routed to all of them, bf16 follows closely)
        assert rel_err(low, fp32) < 1e-1
        for layer in model.layers + bf16.layers:
            layer.ffn_moe.n_used = EXPERTS
        fp32, low = model(ids), bf16(ids)
    print(f"dbrx: bf16 vs fp32 routed to all experts, relative error {rel_err(low, fp32):.2e}")
    assert rel_err(low, fp32) < 2e-2
    with pytest.raises(ValueError, match="DbrxForCausalLM.*mixtures of experts among them.*convert_hf_to_gguf"):
        lowtune.load_model(moe["dbrx"].hf_dir)


def test_grok_scales_and_variants(moe):
    """Grok-1 as llama.cpp reads its file: the embeddings × embedding_scale, the scores × attention.output_scale (in
    place of 1/sqrt(head_dim)) and soft-capped, the logits × logit_scale, RMSNorms after attention
    (attn_output_norm) and after the experts (layer_output_norm); a file without one of the scales (an older
    conversion, which llama.cpp runs with Grok-1's) or with Grok 2's dense FFN beside the experts is refused."""
    model = Model.from_gguf(moe["grok"].gguf)
    c, md = model.config, model.metadata
    assert (c.embedding_scale, c.attn_scale, c.attn_softcap, c.logit_scale) == pytest.approx((4.0, 0.2, 3.0, 2.0))
    assert model.output is None and c.expert_width == c.ffn_dim == 32
    assert model.layers[0].norm_files == {"ffn_norm": "ffn_norm", "post_attention_norm": "attn_output_norm",
                                          "post_ffw_norm": "layer_output_norm"}
    assert {"blk.1.attn_output_norm.weight", "blk.1.layer_output_norm.weight"} <= set(model.tensor_types)
    for key in ("embedding_scale", "attention.output_scale", "logit_scale"):
        with pytest.raises(ValueError, match=f"lacks grok.{key} .an older conversion.*convert_hf_to_gguf"):
            ModelConfig.from_gguf_metadata({k: v for k, v in md.items() if k != f"grok.{key}"})
    with pytest.raises(ValueError, match="Grok 2's layout"):
        ModelConfig.from_gguf_metadata({**md, "grok.expert_feed_forward_length": 32})


def test_arctic_experts_on_the_layer_input_train_and_stream(moe, tmp_path, botchan_text):
    """Snowflake Arctic's experts read the layer's input (normed by ffn_norm_exps) and join the layer's output
    beside the dense FFN (D wide) after attention: the layer's steps, its deferred residual (the next norm's)
    and a checkpointed backward agree; `lowtune finetune` runs on its GGUF and a streamed model trains as the
    resident one (its tiny random model's held-out loss does not fall in three steps of any method, so the
    finetune is checked to run, not to improve it)."""
    base = gguf_of(moe["arctic"], "Q8_0")
    model = Model.from_gguf(base)
    c = model.config
    assert (c.ffn_dim, c.expert_width) == (c.dim, 32) and all(layer.residual_moe for layer in model.layers)
    layer = model.layers[1]
    assert layer.ffn_up.out_features == c.dim and layer.ffn_norm_exps.weight.shape == (c.dim,)
    x = torch.randn(1, 20, c.dim, generator=torch.Generator().manual_seed(2))
    rot = model.rope_rotation(0, 20)
    with torch.no_grad():
        y = layer(x, rot)
        plain = x + layer.attention_branch(x, rot)
        plain = plain + layer.norm_mlp(plain)
        assert rel_err(y, plain + layer.residual_experts(x)) < 1e-6 and rel_err(y, plain) > 1e-2
        a, m = layer.forward_deferred(x * 0.5, x * 0.5, rot)
        assert rel_err(a + m, y) < 1e-6
    result = lowtune.finetune(base, _text_file(tmp_path, botchan_text), tmp_path / "run", method="lora", rank=4,
                              steps=3, seq_len=32, batch=2, lr=1e-2, warmup=0, eval_every=0, eval_fraction=0.1,
                              device="cpu", seed=0)
    assert math.isfinite(result.eval_after["eval_loss"]) and (tmp_path / "run" / "adapter").is_dir()
    resident, streaming, plan = resident_and_streamed(lambda: with_filled_lora(Model.from_gguf(base)), "cpu")
    assert plan.streamed == list(range(c.n_layers))
    assert_trains_alike(resident, streaming, rand_ids(2, 24, seed=4))
    with torch.enable_grad():  # (a checkpointed layer's backward recomputes the experts on its input too)
        xs = x.clone().requires_grad_()
        dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
        want = torch.autograd.grad(layer(xs, rot), xs, dy)[0]
        layer.mlp_chunks = 2
        got = layer.checkpoint_backward(xs, rot, dy, [xs])[0]
    assert rel_err(got, want) < 1e-5


def _text_file(tmp_path, botchan_text):
    text = tmp_path / "text.txt"
    text.write_text(botchan_text[30000:34000], encoding="utf-8")
    return text


def test_bailingmoe2_nextn_layer_is_kept_out_of_the_model(moe, tmp_path):
    """Ling 2.0's multi-token-prediction layer (the tiny file's blk.2 of 3 blocks, nextn_predict_layers 1), as
    GLM-4.5 MoE's: llama.cpp loads its tensors and its graph skips it, so lowtune's model ends before it, its
    adapters leave it alone and a merged GGUF keeps its tensors bit for bit."""
    base = moe["bailingmoe2"].gguf
    model = make_adapter(base, tmp_path / "run" / "adapter", "lora", rel=0.2, rank=4)
    with GGUFFile(base) as f:
        md = dict(f.metadata)
        nextn = {n: f.raw(n).clone() for n in f.tensor_infos if n.startswith("blk.2.")}
    assert (md["bailingmoe2.block_count"], md["bailingmoe2.nextn_predict_layers"], model.config.n_layers) == (3, 1, 2)
    assert {"blk.2.nextn.eh_proj.weight", "blk.2.layer_output_norm.weight", "blk.2.ffn_gate_exps.weight"} <= set(nextn)
    assert not any(name.startswith("layers.2.") for name in adapters.adapters_of(model))
    export_merged_gguf(base, tmp_path / "run", tmp_path / "merged.gguf")
    with GGUFFile(tmp_path / "merged.gguf") as f:
        assert f.metadata["bailingmoe2.nextn_predict_layers"] == 1
        assert all(torch.equal(f.raw(n), t) for n, t in nextn.items())
