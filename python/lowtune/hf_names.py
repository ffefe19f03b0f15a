"""What Hugging Face calls things, per architecture, in both directions: tensor names, config.json
keys, tensor values, and the q/k row order. One table each; reading (safetensors_io) and writing
(export) use the same one, so a name or key cannot differ between the two.

    gguf_name("model.layers.3.self_attn.q_proj.weight")    # "blk.3.attn_q.weight"
    hf_name("blk.3.attn_qkv.weight", "phi3")                # "model.layers.3.self_attn.qkv_proj.weight"
    md, types = metadata_from_hf_config(config)             # GGUF `<arch>.*` keys from config.json
    extra = generated_tensors(config)                       # rope_freqs / rope_factors_* values
    config = hf_config(model_config, md, tied, "bfloat16", tensors)  # config.json from GGUF metadata
    w = from_hf_values(gguf_name, w, md)                    # an HF tensor as GGUF holds it

The families (lowtune.families says which architecture is which HF class) differ here in:
  * names: Qwen3, Gemma 3 and OLMo 2 add q/k norms; Gemma 2/3 and GLM-4 have norms before and
    after attention and FFN, OLMo 2 only after; Phi-3 keeps q/k/v fused (qkv_proj = attn_qkv) and
    gate/up fused (gate_up_proj = ffn_up, gate rows first), which GGUF keeps too, as GLM-4 keeps
    gate/up; a vision-language class (Qwen2.5-VL, Qwen3-VL) has its text family's names, its layers
    under model.language_model beside the vision tower (which lowtune leaves out); LFM2's
    convolution layers hold conv.in_proj/out_proj/conv (blk.N.shortconv.*), its
    kernel [D, 1, L] in HF and [D, L] in GGUF (hf_shape); BitNet's sub-norms are transformers'
    self_attn.attn_sub_norm and mlp.ffn_sub_norm (llama.cpp's converter maps only the 1bitLLM
    checkpoints' inner_attn_ln and ffn_layernorm); EXAONE 3's checkpoints (transformer.h.N.attn.attention.*,
    ln_1, mlp.c_fc_0, ...) and config keys (num_layers, layer_norm_epsilon) are read as transformers renames
    them onto Llama's (_CHECKPOINT_NAMES, _CONFIG_ALIASES) and written under Llama's names, as transformers
    holds and saves them; GPT-NeoX keeps its layers under gpt_neox.layers and q, k, v in one tensor,
    head by head (each head's q, k, v rows), where GGUF has all q rows, then k, then v; Falcon keeps its
    layers under transformer.h and q, k, v grouped by KV head (each group's q heads, then its k and v), 40B's
    two norms as ln_attn (attn_norm_2) and ln_mlp (attn_norm), 7B's one as input_layernorm; GPT-2 and
    GPT-BigCode (StarCoder) keep theirs under transformer.h, their learned positions as wpe and q, k, v in one
    c_attn as GGUF does (StarCoder's one K/V head after the q rows); BLOOM keeps its layers under
    transformer.h and q, k, v head by head as GPT-NeoX; MPT its layers under transformer.blocks, q, k, v in one
    Wqkv as GGUF does; Mamba and Mamba-2 theirs under backbone.layers, a mixer each (A as A_log, D, Mamba-2's
    dt_bias), their conv1d kernels [C, 1, L]; Nemotron-H its layers under backbone.layers too, each one mixer.*
    (Mamba2's, an MLP's, experts' or attention's), which its class holds under model.layers (PEFT's module
    names); Falcon-H1 its mixer as mamba.* beside Llama's attention and feed_forward.*, the FFN's norm
    (pre_ff_layernorm) as the converter's blk.N.ffn_norm; Jamba Mamba's mixer (mamba.*, its dt, B and C norms)
    or attention in each layer, then an MLP or experts (feed_forward.*); experts' tensors each expert's apart
    (stacked in GGUF: stacked_part); Gemma 4 has Gemma 3's names beside its per-layer inputs', its layer_scalar
    and the 26B-A4B's router and stacked experts, and its config keeps the global layers' widths in
    per_layer_config (_gemma4_keys, _gemma4_config); Gemma 3n its AltUp (altup.*), Laurel (laurel.*) and
    per-layer input (per_layer_*) beside Gemma 3's names, the embeddings' AltUp projections one matrix a copy
    where GGUF stacks them (stacked_names), its multimodal class's towers left out;
  * values: Llama's q/k rows are permuted (below); Gemma's RMSNorm weights are stored as w in HF
    and 1 + w in GGUF (Family.hf_norm_offset), as llama.cpp's converter writes them; GPT-2's linears are
    Conv1D's, their weights [in, out] transposed in GGUF (_CONV1D); Falcon-H1's multipliers are folded into
    its weights (fold_multipliers) and written back as 1; Gemma 3n's per-layer embedding table is padded with
    zero rows to the vocabulary (_VOCAB_PADDED), as the converter pads it;
  * config: RoPE (linear, Llama 3's rope_freqs, Phi-3's LongRoPE factors and attention factor,
    Gemma 3's base for sliding layers, SmolLM3's layers without it), sliding windows and which
    layers slide (layer_types), soft-caps, Gemma's query scale, which biases the HF class can
    hold, and LFM2's convolution layers (layer_types "conv": no KV heads) and FFN width.

The q/k permutation (convert_hf_to_gguf.py's LlamaModel.permute): HF keeps the two halves of each
head's rotary pairs apart (dims i and i + d/2 rotate together); ggml rotates adjacent dims (2i,
2i + 1). So row h·d + j of the GGUF weight is HF row h·d + (j // 2) + (j % 2)·d/2. k uses the KV
head count. The other families rotate halves in ggml too (NEOX), so their rows are not permuted.
"""
from __future__ import annotations

import math
import re
from typing import Any, Collection, Mapping

import torch
from gguf.constants import GGUFValueType

from .families import FAMILIES, XIELU_KEYS, Family, family_of_hf, yarn_magnitude
from .gemma3n import LAUREL_RANK

U32, I32, F32, STR, BOOL = (GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.FLOAT32, GGUFValueType.STRING,
                            GGUFValueType.BOOL)
ARRAY = GGUFValueType.ARRAY

# GGUF blk.N.<layer name>.{weight,bias} <-> HF model.layers.N.<hf name>.{weight,bias} ("layer"), and the
# tensors outside the layers by full name ("global"); where a family has them, layer tensors named whole,
# without a .weight or .bias (Mamba2's and the Gated DeltaNet's A_log, D, dt_bias: "exact"), HF
# tensors that hold several GGUF tensors' rows ("fused": fused_parts), and GGUF tensors that stack an HF
# tensor of each expert ("experts": stacked_part; read only, as mixtures of experts write no HF directory).
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight", "output.bias": "lm_head.bias"}
_ATTN = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj"}
_MLP = {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_LLAMA = {"attn_norm": "input_layernorm", **_ATTN, "ffn_norm": "post_attention_layernorm", **_MLP}
_POST_NORMED = {**_ATTN, **_QK_NORMS, "post_attention_norm": "post_attention_layernorm", **_MLP,
                "post_ffw_norm": "post_feedforward_layernorm"}  # OLMo 2, EXAONE 4: no norms before
_PARALLEL = {"attn_norm": "input_layernorm", **_ATTN, **_MLP}  # Command-R: one norm feeds both
_MOE_ATTN = {"attn_norm": "input_layernorm", **_ATTN, **_QK_NORMS, "ffn_norm": "post_attention_layernorm"}
_GEMMA = {"attn_norm": "input_layernorm", **_ATTN, "post_attention_norm": "post_attention_layernorm",
          "ffn_norm": "pre_feedforward_layernorm", **_MLP, "post_ffw_norm": "post_feedforward_layernorm"}
# LFM2: attention layers and short-convolution layers (shortconv.*) share the norms and the MLP
_LFM2 = {"layer": {"attn_norm": "operator_norm", **_ATTN, "attn_output": "self_attn.out_proj",
                   "attn_q_norm": "self_attn.q_layernorm", "attn_k_norm": "self_attn.k_layernorm",
                   "shortconv.in_proj": "conv.in_proj", "shortconv.out_proj": "conv.out_proj",
                   "shortconv.conv": "conv.conv", "ffn_norm": "ffn_norm", "ffn_gate": "feed_forward.w1",
                   "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2"},
         "global": {"token_embd.weight": "model.embed_tokens.weight",
                    "token_embd_norm.weight": "model.embedding_norm.weight", "output.weight": "lm_head.weight"}}
# Qwen3.5: attention layers (q_proj gives q and its gate) and Gated DeltaNet layers (linear_attn.*) share
# the norms and the MLP; a DeltaNet's A_log and dt_bias are tensors of no linear ("exact")
_QWEN35 = {"layer": {"attn_norm": "input_layernorm", **_ATTN, **_QK_NORMS,
                     "post_attention_norm": "post_attention_layernorm", **_MLP, "attn_qkv": "linear_attn.in_proj_qkv",
                     "attn_gate": "linear_attn.in_proj_z", "ssm_alpha": "linear_attn.in_proj_a",
                     "ssm_beta": "linear_attn.in_proj_b", "ssm_out": "linear_attn.out_proj",
                     "ssm_conv1d": "linear_attn.conv1d", "ssm_norm": "linear_attn.norm"},
           "exact": {"ssm_a": "linear_attn.A_log", "ssm_dt.bias": "linear_attn.dt_bias"}, "global": _GLOBAL}
# multi-head latent attention (DeepSeek, MiniCPM3) and a dense MLP
_MLA = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_q_a": "self_attn.q_a_proj",
        "attn_q_a_norm": "self_attn.q_a_layernorm", "attn_q_b": "self_attn.q_b_proj",
        "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_kv_a_norm": "self_attn.kv_a_layernorm",
        "attn_kv_b": "self_attn.kv_b_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
        **_MLP}
# GPT-2's and GPT-BigCode's names, their layers under transformer.h (_LAYERS)
_GPT2 = {"layer": {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
                   "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
         "global": {"token_embd.weight": "transformer.wte.weight", "position_embd.weight": "transformer.wpe.weight",
                    "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias",
                    "output.weight": "lm_head.weight"}}
# Mamba's and Mamba-2's tensors outside the layers
_BACKBONE = {"token_embd.weight": "backbone.embeddings.weight", "output_norm.weight": "backbone.norm_f.weight",
             "output.weight": "lm_head.weight"}
# Nemotron-H: its layers under backbone.layers (_LAYERS), one part each after its one norm: a Mamba2 mixer, an MLP
# without a gate or attention without RoPE, all named mixer.*; A (as A_log), D and dt's bias without a suffix
_NEMOTRON_H = {"layer": {"attn_norm": "norm", "attn_q": "mixer.q_proj", "attn_k": "mixer.k_proj",
                         "attn_v": "mixer.v_proj", "attn_output": "mixer.o_proj", "ffn_up": "mixer.up_proj",
                         "ffn_down": "mixer.down_proj", "ssm_in": "mixer.in_proj", "ssm_conv1d": "mixer.conv1d",
                         "ssm_norm": "mixer.norm", "ssm_out": "mixer.out_proj"},
               "exact": {"ssm_a": "mixer.A_log", "ssm_d": "mixer.D", "ssm_dt.bias": "mixer.dt_bias"},
               "global": _BACKBONE}
TENSOR_NAMES: dict[str, dict[str, dict[str, str]]] = {
    "llama": {"layer": _LLAMA, "global": _GLOBAL},
    "smollm3": {"layer": _LLAMA, "global": _GLOBAL},
    "arcee": {"layer": {k: v for k, v in _LLAMA.items() if k != "ffn_gate"}, "global": _GLOBAL},
    "granite": {"layer": _LLAMA, "global": _GLOBAL},
    "ernie4_5": {"layer": _LLAMA, "global": _GLOBAL},
    "mistral3": {"layer": _LLAMA, "global": _GLOBAL},
    "qwen2": {"layer": _LLAMA, "global": _GLOBAL},
    "bitnet": {"layer": {**_LLAMA, "attn_sub_norm": "self_attn.attn_sub_norm", "ffn_sub_norm": "mlp.ffn_sub_norm"},
               "global": _GLOBAL},
    "qwen3": {"layer": {**_LLAMA, **_QK_NORMS}, "global": _GLOBAL},
    # the attention's names only (PEFT adapters): experts are not read or written in HF's layout
    "qwen3moe": {"layer": _MOE_ATTN, "global": _GLOBAL},
    "olmoe": {"layer": _MOE_ATTN, "global": _GLOBAL},
    "olmo": {"layer": _LLAMA, "global": _GLOBAL},  # (its LayerNorms hold no tensors)
    # (EXAONE 3's checkpoints read through _CHECKPOINT_NAMES: transformers holds them as Llama)
    "exaone": {"layer": _LLAMA, "global": _GLOBAL},
    # (read only: Family.hf_writable)
    "orion": {"layer": _LLAMA, "global": {**_GLOBAL, "output_norm.bias": "model.norm.bias"}},
    "pangu-embedded": {"layer": _LLAMA, "global": _GLOBAL},
    "baichuan": {"layer": {k: v for k, v in _LLAMA.items() if k not in ("attn_q", "attn_k", "attn_v")},
                 "fused": {"self_attn.W_pack.weight": ("attn_q.weight", "attn_k.weight", "attn_v.weight")},
                 "global": _GLOBAL},
    "qwen2moe": {"layer": _MOE_ATTN, "global": _GLOBAL},
    "granitemoe": {"layer": _MOE_ATTN, "global": _GLOBAL},
    # Granite 4's hybrids: the Mamba2 layers' tensors (mamba.*; A, D and dt's bias without a suffix) beside
    # the attention's; the dense MLP's gate and up rows in one tensor (shared_mlp.input_linear, gate first)
    "granitehybrid": {"layer": {**_MOE_ATTN, "ssm_in": "mamba.in_proj", "ssm_out": "mamba.out_proj",
                                "ssm_conv1d": "mamba.conv1d", "ssm_norm": "mamba.norm",
                                "ffn_down": "shared_mlp.output_linear"},
                      "exact": {"ssm_a": "mamba.A_log", "ssm_d": "mamba.D", "ssm_dt.bias": "mamba.dt_bias"},
                      "fused": {"shared_mlp.input_linear.weight": ("ffn_gate.weight", "ffn_up.weight")},
                      "global": _GLOBAL},
    "ernie4_5-moe": {"layer": _LLAMA, "global": _GLOBAL},  # (dense layers' MLP names; experts not mapped)
    # DeepSeek's latent attention (kv_b_proj: attn_kv_b of older conversions; split into attn_k_b and attn_v_b,
    # not mapped) and dense layers' MLP
    "deepseek2": {"layer": _MLA, "global": _GLOBAL},
    "mistral4": {"layer": _MLA, "global": _GLOBAL},  # (Mistral Small 4: DeepSeek's names)
    "deepseek32": {"layer": _MLA, "global": _GLOBAL},  # (their indexers' linears frozen: not mapped)
    "glm-dsa": {"layer": _MLA, "global": _GLOBAL},
    "minicpm3": {"layer": _MLA, "global": _GLOBAL},  # (kv_b_proj whole: attn_kv_b, as its converter keeps it)
    # GLM-4.5 MoE: the FFN's norm under post_attention_norm, as GGUF names it (dense layers' MLP; experts not mapped)
    "glm4moe": {"layer": {"attn_norm": "input_layernorm", **_ATTN, **_QK_NORMS,
                          "post_attention_norm": "post_attention_layernorm", **_MLP}, "global": _GLOBAL},
    "exaone-moe": {"layer": {**_MOE_ATTN, **_MLP}, "global": _GLOBAL},  # (dense layers' MLP; experts not mapped)
    "cohere2moe": {"layer": _PARALLEL, "global": _GLOBAL},  # (dense layers' MLP; experts not mapped)
    # Llama 4: the attention's names and the norms (PEFT adapters; feed_forward.* not mapped)
    "llama4": {"layer": {"attn_norm": "input_layernorm", **_ATTN, "ffn_norm": "post_attention_layernorm"},
               "global": _GLOBAL},
    # dots.llm1: Qwen3's attention names (dense layers' MLP; experts not mapped)
    "dots1": {"layer": {**_MOE_ATTN, **_MLP}, "global": _GLOBAL},
    # DBRX: its layers under transformer.blocks (_LAYERS), q, k and v in one Wqkv, the norms (PEFT adapters; experts
    # not mapped)
    "dbrx": {"layer": {"attn_norm": "norm_attn_norm.norm_1", "attn_qkv": "norm_attn_norm.attn.Wqkv",
                       "attn_output": "norm_attn_norm.attn.out_proj", "attn_output_norm": "norm_attn_norm.norm_2"},
             "global": {"token_embd.weight": "transformer.wte.weight", "output.weight": "lm_head.weight",
                        "output_norm.weight": "transformer.norm_f.weight"}},
    # AFMoE: its attention's output gate, norms before and after attention and the MLP (dense layers' MLP; experts
    # not mapped)
    "afmoe": {"layer": {"attn_norm": "input_layernorm", **_ATTN, "attn_gate": "self_attn.gate_proj", **_QK_NORMS,
                        "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_mlp_layernorm", **_MLP,
                        "post_ffw_norm": "post_mlp_layernorm"}, "global": _GLOBAL},
    # Mellum: the attention's names and the norms (PEFT adapters; experts not mapped)
    "mellum": {"layer": _MOE_ATTN, "global": _GLOBAL},
    # Laguna: its attention's output gate (g_proj), q/k norms (dense layers' MLP; experts not mapped)
    "laguna": {"layer": {**_MOE_ATTN, "attn_gate": "self_attn.g_proj", **_MLP}, "global": _GLOBAL},
    # MiMo-V2-Flash: Llama's names (dense layers' MLP; experts and sinks not mapped)
    "mimo2": {"layer": _LLAMA, "global": _GLOBAL},
    "hy_v3": {"layer": {**_MOE_ATTN, **_MLP}, "global": _GLOBAL},  # (dense layers' MLP; experts not mapped)
    # MiniMax-M2: the attention's names and the norms (PEFT adapters; experts not mapped)
    "minimax-m2": {"layer": _MOE_ATTN, "global": _GLOBAL},
    # PhiMoE: the attention's names and the norms with their biases (PEFT adapters; experts not mapped)
    "phimoe": {"layer": {"attn_norm": "input_layernorm", **_ATTN, "ffn_norm": "post_attention_layernorm"},
               "global": {**_GLOBAL, "output_norm.bias": "model.norm.bias"}},
    "gpt-oss": {"layer": {"attn_norm": "input_layernorm", **_ATTN, "post_attention_norm": "post_attention_layernorm"},
                "global": _GLOBAL},
    "starcoder2": {"layer": {"attn_norm": "input_layernorm", **_ATTN, "ffn_norm": "post_attention_layernorm",
                             "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
                   "global": {**_GLOBAL, "output_norm.bias": "model.norm.bias"}},
    "phi2": {"layer": {"attn_norm": "input_layernorm", **{k: v for k, v in _ATTN.items() if k != "attn_output"},
                       "attn_output": "self_attn.dense", "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"},
             "global": {**_GLOBAL, "output_norm.weight": "model.final_layernorm.weight",
                        "output_norm.bias": "model.final_layernorm.bias"}},
    "phi3": {"layer": {"attn_norm": "input_layernorm", "attn_qkv": "self_attn.qkv_proj",
                       "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                       "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"},
             "global": _GLOBAL},
    "gemma": {"layer": _LLAMA, "global": _GLOBAL},
    "gemma2": {"layer": _GEMMA, "global": _GLOBAL},
    "gemma3": {"layer": {**_GEMMA, **_QK_NORMS}, "global": _GLOBAL},
    # Gemma 3n: Gemma 3's layer with AltUp (altup.*), Laurel (laurel.*) and the per-layer input's gate, projection
    # and norm; AltUp's scale named without .weight ("exact"); the embeddings' AltUp projections one HF matrix a
    # copy, stacked in GGUF ("stacked": stacked_part)
    "gemma3n": {"layer": {**_GEMMA, **_QK_NORMS, "inp_gate": "per_layer_input_gate", "proj": "per_layer_projection",
                          "post_norm": "post_per_layer_input_norm", "altup_correct_coef": "altup.correction_coefs",
                          "altup_predict_coef": "altup.prediction_coefs", "altup_router": "altup.modality_router",
                          "altup_router_norm": "altup.router_norm", "laurel_l": "laurel.linear_left",
                          "laurel_r": "laurel.linear_right", "laurel_post_norm": "laurel.post_laurel_norm"},
                "exact": {"altup_correct_scale.weight": "altup.correct_output_scale"},
                "stacked": {"altup_proj.weight": "model.altup_projections",
                            "altup_unembd_proj.weight": "model.altup_unembed_projections"},
                "global": {**_GLOBAL, "per_layer_token_embd.weight": "model.embed_tokens_per_layer.weight",
                           "per_layer_model_proj.weight": "model.per_layer_model_projection.weight",
                           "per_layer_proj_norm.weight": "model.per_layer_projection_norm.weight"}},
    # Gemma 4: Gemma 3's names, the per-layer inputs', the 26B-A4B's router and experts beside the dense MLP; the
    # scalars and stacked experts named without a suffix ("exact")
    "gemma4": {"layer": {**_GEMMA, **_QK_NORMS, "inp_gate": "per_layer_input_gate", "proj": "per_layer_projection",
                         "post_norm": "post_per_layer_input_norm", "ffn_gate_inp": "router.proj",
                         "post_ffw_norm_1": "post_feedforward_layernorm_1",
                         "pre_ffw_norm_2": "pre_feedforward_layernorm_2",
                         "post_ffw_norm_2": "post_feedforward_layernorm_2"},
               "exact": {"layer_output_scale.weight": "layer_scalar", "ffn_gate_inp.scale": "router.scale",
                         "ffn_down_exps.scale": "router.per_expert_scale",
                         "ffn_gate_up_exps.weight": "experts.gate_up_proj",
                         "ffn_down_exps.weight": "experts.down_proj"},
               "global": {**_GLOBAL, "per_layer_token_embd.weight": "model.embed_tokens_per_layer.weight",
                          "per_layer_model_proj.weight": "model.per_layer_model_projection.weight",
                          "per_layer_proj_norm.weight": "model.per_layer_projection_norm.weight"}},
    "olmo2": {"layer": _POST_NORMED, "global": _GLOBAL},
    "exaone4": {"layer": _POST_NORMED, "global": _GLOBAL},
    "command-r": {"layer": _PARALLEL, "global": _GLOBAL},
    "seed_oss": {"layer": {"attn_norm": "input_layernorm", **_ATTN, "post_attention_norm": "post_attention_layernorm",
                           **_MLP}, "global": _GLOBAL},
    "cohere2": {"layer": _PARALLEL, "global": _GLOBAL},
    "hunyuan-dense": {"layer": {**_LLAMA, "attn_q_norm": "self_attn.query_layernorm",
                                "attn_k_norm": "self_attn.key_layernorm"}, "global": _GLOBAL},
    # Hunyuan MoE: the attention's names and the norms (PEFT adapters; experts and the shared MLP not mapped)
    "hunyuan-moe": {"layer": {"attn_norm": "input_layernorm", **_ATTN, "attn_q_norm": "self_attn.query_layernorm",
                              "attn_k_norm": "self_attn.key_layernorm", "ffn_norm": "post_attention_layernorm"},
                    "global": _GLOBAL},
    "nemotron": {"layer": {k: v for k, v in _LLAMA.items() if k != "ffn_gate"},
                 "global": {**_GLOBAL, "output_norm.bias": "model.norm.bias"}},
    "jais2": {"layer": {k: v for k, v in _LLAMA.items() if k != "ffn_gate"},
              "global": {**_GLOBAL, "output_norm.bias": "model.norm.bias"}},
    # GPT-NeoX: its layers under gpt_neox.layers (_LAYERS); q, k and v rows in one tensor, head by head (_qkv_groups)
    "gptneox": {"layer": {"attn_norm": "input_layernorm", "attn_qkv": "attention.query_key_value",
                          "attn_output": "attention.dense", "ffn_norm": "post_attention_layernorm",
                          "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"},
                "global": {"token_embd.weight": "gpt_neox.embed_in.weight", "output.weight": "embed_out.weight",
                           "output_norm.weight": "gpt_neox.final_layer_norm.weight",
                           "output_norm.bias": "gpt_neox.final_layer_norm.bias"}},
    # GPT-2 and GPT-BigCode (StarCoder): learned positions (wpe); GPT-2's linears are Conv1D's [in, out] (_CONV1D),
    # GPT-BigCode's nn.Linear's; one K/V head's rows after the q rows in StarCoder's c_attn, as GGUF has them
    "gpt2": _GPT2,
    "starcoder": _GPT2,
    # BLOOM: its layers under transformer.h (_LAYERS), the embeddings' LayerNorm; q, k and v rows in one tensor,
    # head by head (_qkv_groups)
    "bloom": {"layer": {"attn_norm": "input_layernorm", "attn_qkv": "self_attention.query_key_value",
                        "attn_output": "self_attention.dense", "ffn_norm": "post_attention_layernorm",
                        "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"},
              "global": {"token_embd.weight": "transformer.word_embeddings.weight",
                         "token_embd_norm.weight": "transformer.word_embeddings_layernorm.weight",
                         "token_embd_norm.bias": "transformer.word_embeddings_layernorm.bias",
                         "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias",
                         "output.weight": "lm_head.weight"}},
    # MPT: its layers under transformer.blocks (_LAYERS), no biases; q, k and v rows in one Wqkv, as GGUF has them
    "mpt": {"layer": {"attn_norm": "norm_1", "attn_qkv": "attn.Wqkv", "attn_output": "attn.out_proj",
                      "ffn_norm": "norm_2", "ffn_up": "ffn.up_proj", "ffn_down": "ffn.down_proj"},
            "global": {"token_embd.weight": "transformer.wte.weight", "output_norm.weight": "transformer.norm_f.weight",
                       "output.weight": "lm_head.weight"}},
    # Mamba and Mamba-2: their layers under backbone.layers (_LAYERS), a mixer each; A (as A_log), D and Mamba-2's
    # dt bias without a suffix
    "mamba": {"layer": {"attn_norm": "norm", "ssm_in": "mixer.in_proj", "ssm_conv1d": "mixer.conv1d",
                        "ssm_x": "mixer.x_proj", "ssm_dt": "mixer.dt_proj", "ssm_out": "mixer.out_proj"},
              "exact": {"ssm_a": "mixer.A_log", "ssm_d": "mixer.D"}, "global": _BACKBONE},
    "mamba2": {"layer": {"attn_norm": "norm", "ssm_in": "mixer.in_proj", "ssm_conv1d": "mixer.conv1d",
                         "ssm_norm": "mixer.norm", "ssm_out": "mixer.out_proj"},
               "exact": {"ssm_a": "mixer.A_log", "ssm_d": "mixer.D", "ssm_dt.bias": "mixer.dt_bias"},
               "global": _BACKBONE},
    "nemotron_h": _NEMOTRON_H,
    # Nemotron-H MoE: experts in place of the MLPs, each expert's up and down apart ("experts": stacked_part), the
    # router (gate) and its selection bias, a shared expert
    "nemotron_h_moe": {"layer": {**_NEMOTRON_H["layer"], "ffn_gate_inp": "mixer.gate",
                                 "ffn_up_shexp": "mixer.shared_experts.up_proj",
                                 "ffn_down_shexp": "mixer.shared_experts.down_proj"},
                       "exact": {**_NEMOTRON_H["exact"], "exp_probs_b.bias": "mixer.gate.e_score_correction_bias"},
                       "experts": {f"ffn_{p}_exps.weight": f"mixer.experts.{{}}.{p}_proj.weight"
                                   for p in ("up", "down")},
                       "global": _BACKBONE},
    # Jamba: Mamba's mixer (mamba.*; its dt, B and C norms) or attention, then an MLP (feed_forward.*) or experts,
    # each expert's gate, up and down tensors of its own, which GGUF stacks ("experts": stacked_part)
    "jamba": {"layer": {"attn_norm": "input_layernorm", **_ATTN, "ffn_norm": "pre_ff_layernorm",
                        "ffn_gate": "feed_forward.gate_proj", "ffn_up": "feed_forward.up_proj",
                        "ffn_down": "feed_forward.down_proj", "ffn_gate_inp": "feed_forward.router",
                        "ssm_in": "mamba.in_proj", "ssm_conv1d": "mamba.conv1d", "ssm_x": "mamba.x_proj",
                        "ssm_dt": "mamba.dt_proj", "ssm_dt_norm": "mamba.dt_layernorm",
                        "ssm_b_norm": "mamba.b_layernorm", "ssm_c_norm": "mamba.c_layernorm",
                        "ssm_out": "mamba.out_proj"},
              "exact": {"ssm_a": "mamba.A_log", "ssm_d": "mamba.D"},
              "experts": {f"ffn_{p}_exps.weight": f"feed_forward.experts.{{}}.{p}_proj.weight"
                          for p in ("gate", "up", "down")},
              "global": {"token_embd.weight": "model.embed_tokens.weight",
                         "output_norm.weight": "model.final_layernorm.weight", "output.weight": "lm_head.weight"}},
    # Falcon-H1: a Mamba2 mixer (mamba.*) beside Llama's attention and MLP (feed_forward.*); the FFN's norm the
    # converter names blk.N.ffn_norm, without a suffix; values with the multipliers folded in (fold_multipliers)
    "falcon-h1": {"layer": {"attn_norm": "input_layernorm", **_ATTN, "ffn_gate": "feed_forward.gate_proj",
                            "ffn_up": "feed_forward.up_proj", "ffn_down": "feed_forward.down_proj",
                            "ssm_in": "mamba.in_proj", "ssm_conv1d": "mamba.conv1d", "ssm_norm": "mamba.norm",
                            "ssm_out": "mamba.out_proj"},
                  "exact": {"ssm_a": "mamba.A_log", "ssm_d": "mamba.D", "ssm_dt.bias": "mamba.dt_bias",
                            "ffn_norm": "pre_ff_layernorm.weight"},
                  "global": {**_GLOBAL, "output_norm.weight": "model.final_layernorm.weight"}},
    # Falcon: its layers under transformer.h (_LAYERS), 40B's two norms under their own names (_TWO_NORMS); q, k
    # and v rows in one tensor, grouped by KV head (_qkv_groups)
    "falcon": {"layer": {"attn_norm": "input_layernorm", "attn_qkv": "self_attention.query_key_value",
                         "attn_output": "self_attention.dense", "ffn_up": "mlp.dense_h_to_4h",
                         "ffn_down": "mlp.dense_4h_to_h"},
               "global": {"token_embd.weight": "transformer.word_embeddings.weight", "output.weight": "lm_head.weight",
                          "output_norm.weight": "transformer.ln_f.weight",
                          "output_norm.bias": "transformer.ln_f.bias"}},
    # (StableLM 2 12B's q/k LayerNorms, a module of each head's own, are not mapped: hf_config, _parallel_keys)
    "stablelm": {"layer": _LLAMA, "global": {**_GLOBAL, "output_norm.bias": "model.norm.bias"}},
    "apertus": {"layer": {"attn_norm": "attention_layernorm", **_ATTN, **_QK_NORMS,
                          "ffn_norm": "feedforward_layernorm", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"},
                "global": _GLOBAL},
    "glm4": {"layer": {"attn_norm": "input_layernorm", **_ATTN, "post_attention_norm": "post_self_attn_layernorm",
                       "ffn_norm": "post_attention_layernorm", "ffn_up": "mlp.gate_up_proj",
                       "ffn_down": "mlp.down_proj", "post_ffw_norm": "post_mlp_layernorm"}, "global": _GLOBAL},
    "lfm2": _LFM2,
    "lfm2moe": _LFM2,  # (the dense layers' MLP names; experts not mapped)
    "qwen35": _QWEN35,
    "qwen35moe": _QWEN35,  # (the attention's and DeltaNets' names; experts not mapped)
}
# GGUF tensors HF does not store (rebuilt from config.json: generated_tensors), and HF buffers GGUF
# does not store. A multimodal checkpoint (Gemma3ForConditionalGeneration, the Qwen VL models, Qwen3.5) keeps
# its language model under a prefix; its vision tower is not part of the text model, nor are Qwen3.5's
# multi-token-prediction layers (mtp.*, which llama.cpp's converter leaves out with --no-mtp), nor Gemma 3n's and
# Gemma 4's audio towers and vision and audio embedders.
GGUF_ONLY = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
_HF_ONLY = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias|\.attention\.bias)$"
                      r"|^(model\.)?(vision_tower|vision_model|multi_modal_projector|visual|mtp|audio_tower"
                      r"|embed_vision|embed_audio)\.")
_LANGUAGE_MODEL = ((re.compile(r"^(language_model\.model|model\.language_model)\."), "model."),
                   (re.compile(r"^language_model\.lm_head\."), "lm_head."))
# Checkpoints that name their tensors otherwise, read under the names transformers renames them to on load
# (EXAONE 3's: its conversion mapping onto Llama's)
_CHECKPOINT_NAMES = {"exaone": tuple((re.compile(a), b) for a, b in (
    (r"^transformer\.wte\.", "model.embed_tokens."), (r"^transformer\.h\.", "model.layers."),
    (r"^transformer\.ln_f\.", "model.norm."), (r"\.attn\.attention\.", ".self_attn."),
    (r"\.self_attn\.out_proj\.", ".self_attn.o_proj."), (r"\.ln_1\.", ".input_layernorm."),
    (r"\.ln_2\.", ".post_attention_layernorm."), (r"\.mlp\.c_fc_0\.", ".mlp.gate_proj."),
    (r"\.mlp\.c_fc_1\.", ".mlp.up_proj."), (r"\.mlp\.c_proj\.", ".mlp.down_proj.")))}
# config.json keys a family's checkpoints spell otherwise: theirs -> the common key (EXAONE 3's, as transformers'
# ExaoneConfig maps them)
_CONFIG_ALIASES = {"exaone": {"num_layers": "num_hidden_layers", "layer_norm_epsilon": "rms_norm_eps",
                              "activation_function": "hidden_act"},
                   **dict.fromkeys(("gpt2", "starcoder"), {
                       "n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
                       "n_positions": "max_position_embeddings"}),
                   "bloom": {"n_embed": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads"},
                   "mpt": {"d_model": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                           "max_seq_len": "max_position_embeddings"}}

# GGUF metadata arrays of a value per layer that HF keeps as tensors of each layer (Apertus's
# xIELU scalars: alpha_p and alpha_n [1], beta and eps []): GGUF key -> (HF layer tensor, shape)
LAYER_SCALARS: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {
    "apertus": {f"xielu.{k}": (f"mlp.act_fn.{k}", (1,) if k.startswith("alpha") else ()) for k in XIELU_KEYS}}

# GGUF `<arch>.<key>` <-> config.json key, the ModelConfig field holding the resolved value, the
# GGUF type, and config.json's default (None: required; a string: that key's value). Every family
# has these; what else a family's config says is read and written by the functions below.
CONFIG_KEYS: list[tuple[str, str, str, Any, Any]] = [
    ("block_count", "num_hidden_layers", "n_layers", U32, None),
    ("context_length", "max_position_embeddings", "context_length", U32, 2048),
    ("embedding_length", "hidden_size", "dim", U32, None),
    ("feed_forward_length", "intermediate_size", "ffn_dim", U32, None),
    ("attention.head_count", "num_attention_heads", "n_heads", U32, None),
    ("attention.head_count_kv", "num_key_value_heads", "n_kv_heads", U32, "num_attention_heads"),
    ("attention.layer_norm_rms_epsilon", "rms_norm_eps", "norm_eps", F32, 1e-6),
    ("vocab_size", "vocab_size", "vocab_size", U32, None),
]
# config.json's key of a LayerNorm family's epsilon (in place of rms_norm_eps), where it is not layer_norm_eps
_LAYER_NORM_EPS = {"starcoder2": "norm_epsilon", "nemotron": "norm_eps", "orion": "rms_norm_eps",
                   "nemotron_h": "layer_norm_epsilon",
                   **dict.fromkeys(("falcon", "gpt2", "starcoder", "bloom", "mpt"), "layer_norm_epsilon")}


# where a class holds its layers, where not under model.layers
_LAYERS = {"gptneox": "gpt_neox.layers.", **dict.fromkeys(("falcon", "gpt2", "starcoder", "bloom"), "transformer.h."),
           **dict.fromkeys(("mpt", "dbrx"), "transformer.blocks."),
           **dict.fromkeys(("mamba", "mamba2", "nemotron_h", "nemotron_h_moe"), "backbone.layers.")}
# the names of a layer's norms where it has two (attn_norm_2: Falcon 40B's new_decoder_architecture, ln_attn before
# attention and ln_mlp before the FFN), in place of the one norm's
_TWO_NORMS = {"falcon": {"attn_norm": "ln_mlp", "attn_norm_2": "ln_attn"}}


def _layers(arch: str) -> str:
    """The prefix of layer N's tensors (before N) in the family's HF class."""
    return _LAYERS.get(FAMILIES[arch].text_of or arch if arch in FAMILIES else arch, "model.layers.")


def _table(arch: str) -> dict[str, dict[str, str]]:
    if arch in FAMILIES and FAMILIES[arch].text_of:  # a vision-language model's text decoder
        arch = FAMILIES[arch].text_of
    if arch in FAMILIES and FAMILIES[arch].delta_heads_grouped:
        raise ValueError(f"{arch}'s Hugging Face modules fuse q, k, v and z (in_proj_qkvz) and b and a (in_proj_ba) "
                         "head by head, which lowtune does not write; export it as GGUF (merged, or a GGUF LoRA)")
    if arch not in TENSOR_NAMES:
        raise ValueError(f"no Hugging Face names for architecture {arch!r} (known: {', '.join(TENSOR_NAMES)})")
    return TENSOR_NAMES[arch]


def hf_name(name: str, arch: str = "llama", tensors: Collection[str] = ()) -> str | None:
    """The HF name of a GGUF tensor of a model with `tensors` (which tell Falcon's layouts apart: _TWO_NORMS);
    None for tensors HF does not store (GGUF_ONLY)."""
    t = _table(arch)
    if name in t["global"]:
        return t["global"][name]
    m, layers = re.fullmatch(r"blk\.(\d+)\.(.+)", name), _layers(arch)
    two = re.fullmatch(r"blk\.(\d+)\.(attn_norm|attn_norm_2)\.(weight|bias)", name)
    if two and arch in _TWO_NORMS and (two.group(2) == "attn_norm_2" or f"blk.{two.group(1)}.attn_norm_2.weight"
                                       in tensors):
        return f"{layers}{two.group(1)}.{_TWO_NORMS[arch][two.group(2)]}.{two.group(3)}"
    if m and m.group(2) in t.get("exact", {}):
        return f"{layers}{m.group(1)}.{t['exact'][m.group(2)]}"
    for fused, parts in t.get("fused", {}).items():  # (a part of a fused HF tensor: fused_parts)
        if m and m.group(2) in parts:
            return f"{layers}{m.group(1)}.{fused}"
    m = re.fullmatch(r"blk\.(\d+)\.(.+)\.(weight|bias)", name)
    if m and m.group(2) in t["layer"]:
        return f"{layers}{m.group(1)}.{t['layer'][m.group(2)]}.{m.group(3)}"
    if name in GGUF_ONLY:
        return None
    if name in t.get("stacked", {}):
        raise ValueError(f"GGUF tensor {name!r} of a {arch} model stacks several Hugging Face tensors "
                         f"({t['stacked'][name]}.N.weight): stacked_names")
    raise ValueError(f"no Hugging Face name for GGUF tensor {name!r} of a {arch} model")


def stacked_names(name: str, arch: str, count: int) -> tuple[str, ...] | None:
    """The HF matrices GGUF tensor `name` stacks, `count` of them (Gemma 3n's AltUp projections, one a copy), or
    None for a tensor that is one HF tensor."""
    prefix = _table(arch).get("stacked", {}).get(name)
    return None if prefix is None else tuple(f"{prefix}.{i}.weight" for i in range(count))


def stacked_part(name: str, arch: str) -> tuple[str, int] | None:
    """(GGUF tensor, index) where HF tensor `name` is one matrix of a GGUF tensor that stacks several on its first
    dimension: Gemma 3n's AltUp projections, one a copy (stacked_names), or one expert's part (Jamba's
    feed_forward.experts.E.up_proj.weight: blk.N.ffn_up_exps.weight); else None."""
    name, t = _checkpoint_name(name, arch), _table(arch)
    for g, prefix in t.get("stacked", {}).items():
        m = re.fullmatch(re.escape(prefix) + r"\.(\d+)\.weight", name)
        if m:
            return g, int(m.group(1))
    m = re.fullmatch(re.escape(_layers(arch)) + r"(\d+)\.(.+)", name)
    for g, h in t.get("experts", {}).items() if m else ():
        e = re.fullmatch(re.escape(h).replace(r"\{\}", r"(\d+)"), m.group(2))
        if e:
            return f"blk.{m.group(1)}.{g}", int(e.group(1))
    return None


def fused_parts(name: str, arch: str) -> tuple[str, ...] | None:
    """The GGUF tensors whose rows HF tensor `name` holds one after another, in equal parts (Granite 4's
    dense MLP: gate, then up), or None for a tensor of its own."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    parts = _table(arch).get("fused", {}).get(m.group(2)) if m else None
    return None if parts is None else tuple(f"blk.{m.group(1)}.{p}" for p in parts)


def gguf_name(name: str, arch: str = "llama") -> str | None:
    """The GGUF name of an HF tensor; None for buffers GGUF does not store and for the scalars
    it keeps as metadata (layer_scalar)."""
    if _HF_ONLY.search(name) or layer_scalar(name, arch) is not None:
        return None
    name, t = _checkpoint_name(name, arch), _table(arch)
    for g, h in t["global"].items():
        if h == name:
            return g
    layers = re.escape(_layers(arch))
    m = re.fullmatch(layers + r"(\d+)\.(.+)", name)
    for g, h in t.get("exact", {}).items():
        if m and h == m.group(2):
            return f"blk.{m.group(1)}.{g}"
    m = re.fullmatch(layers + r"(\d+)\.(.+)\.(weight|bias)", name)
    if m:
        for g, h in (*_TWO_NORMS.get(arch, {}).items(), *t["layer"].items()):
            if h == m.group(2):
                return f"blk.{m.group(1)}.{g}.{m.group(3)}"
    raise ValueError(f"unknown tensor {name!r} in a {arch} checkpoint (not a {arch} model, or an "
                     "unsupported variant)")


def _checkpoint_name(name: str, arch: str) -> str:
    """HF tensor `name` as the family's causal-LM class holds it: a multimodal class's language model out of its
    prefix, a checkpoint's own names as transformers renames them (_CHECKPOINT_NAMES)."""
    for prefix, repl in _LANGUAGE_MODEL + _CHECKPOINT_NAMES.get(arch, ()):
        name = prefix.sub(repl, name)
    return name


# A vision-language class (Qwen2_5_VLForConditionalGeneration, ...) holds its language model's layers here
_VL_LAYERS = "model.language_model.layers."
# linears of a family whose PEFT LoRA would not apply in its class, and why (Mamba's kernels read them whole)
_PEFT_REFUSED = {"mamba": {"ssm_dt": "transformers reads dt_proj's weight past the LoRA",
                           "ssm_out": "PEFT refuses a LoRA on out_proj"},
                 "jamba": {"ssm_dt": "transformers reads dt_proj's weight past the LoRA"},
                 **dict.fromkeys(("mamba2", "nemotron_h", "nemotron_h_moe"),
                                 {"ssm_out": "PEFT refuses a LoRA on out_proj"})}
# classes that hold their checkpoints' layers under another prefix (Nemotron-H's backbone.*, which transformers
# renames on load): the names of their modules, which PEFT adapters take
_CLASS_PREFIX = dict.fromkeys(("nemotron_h", "nemotron_h_moe"), ("backbone.", "model."))


def in_language_model(arch: str, config: Mapping | None) -> bool:
    """Whether a model of `arch` read from a checkpoint of config.json `config` (None: a GGUF file) has its layers
    under model.language_model in its class: a vision-language family's, or Gemma4ForConditionalGeneration's
    (whose language model is the gemma4 of Gemma4ForCausalLM)."""
    return bool(FAMILIES[arch].text_of) or (config or {}).get("architectures", [""])[0] == \
        "Gemma4ForConditionalGeneration"


def hf_module(name: str, arch: str, language_model: bool = False) -> str:
    """The HF module of GGUF layer linear `name` (blk.N.attn_q.weight) where the family's class holds
    it, as PEFT names it: model.layers.N.self_attn.q_proj, model.language_model.layers.N... in a
    vision-language class (language_model: in_language_model)."""
    fam = FAMILIES[arch]
    if not fam.hf_writable:
        raise ValueError(f"PEFT adapters name the modules of {fam.hf_architectures[0]}, which transformers cannot "
                         f"build ({arch}'s checkpoints ship their own modeling code); export it as GGUF (merged, or "
                         "as a GGUF LoRA)")
    module = hf_name(name, arch).removesuffix(".weight")
    if arch == "falcon-h1":
        raise ValueError("a PEFT adapter of falcon-h1 would apply to the weights that llama.cpp's converter folds "
                         "Falcon-H1's multipliers into, not to a checkpoint's; export a merged Hugging Face directory "
                         "(its multipliers 1) or GGUF (merged, or as a GGUF LoRA)")
    part, refused = name.split(".")[2] if name.startswith("blk.") else "", _PEFT_REFUSED.get(arch, {})
    if part in refused:
        raise ValueError(f"a PEFT adapter on {name} would not apply in {fam.hf_architectures[0]}: {refused[part]}; "
                         f"train without {', '.join(refused)} in --targets for a PEFT adapter, or export a merged "
                         "Hugging Face directory or GGUF (merged, or as a GGUF LoRA)")
    if arch in _CLASS_PREFIX:
        module = module.replace(*_CLASS_PREFIX[arch], 1)
    return module.replace("model.layers.", _VL_LAYERS, 1) if fam.text_of or language_model else module


def peft_target_modules(modules, arch: str, language_model: bool = False) -> list[str] | str:
    """PEFT's target_modules for adapters on these HF modules: their short names, or in a
    vision-language class (language_model: in_language_model) a pattern of the language model's (the vision
    tower has gate_proj too)."""
    names = sorted({m.rsplit(".", 1)[-1] for m in modules})
    if not FAMILIES[arch].text_of and not language_model:
        return names
    return re.escape(_VL_LAYERS) + r"\d+\..*\.(" + "|".join(names) + ")"


def layer_scalar(name: str, arch: str) -> tuple[str, int] | None:
    """(GGUF metadata key, layer) of an HF tensor that GGUF keeps as one value of a per-layer array
    (LAYER_SCALARS), else None."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m is None:
        return None
    for key, (hf, _) in LAYER_SCALARS.get(arch, {}).items():
        if m.group(2) == hf:
            return key, int(m.group(1))
    return None


def layer_scalar_tensors(metadata: Mapping) -> dict[str, tuple[tuple[int, ...], float]]:
    """The HF tensors of the metadata's per-layer scalars (LAYER_SCALARS): HF name -> (shape, value)."""
    arch, out = metadata.get("general.architecture", "llama"), {}
    n_layers = int(metadata.get(f"{arch}.block_count", 0))
    for key, (hf, shape) in LAYER_SCALARS.get(arch, {}).items():
        values = metadata[key]
        values = list(values) if isinstance(values, (list, tuple)) else [values] * n_layers
        out.update({f"model.layers.{i}.{hf}": (shape, float(v)) for i, v in enumerate(values)})
    return out


# Phi-3's fused HF modules stand for lowtune's logical linears (the model cuts them into views).
_FUSED_HF = {"qkv_proj": ("attn_q", "attn_k", "attn_v"), "query_key_value": ("attn_q", "attn_k", "attn_v"),
             "c_attn": ("attn_q", "attn_k", "attn_v"), "Wqkv": ("attn_q", "attn_k", "attn_v"),
             "gate_up_proj": ("ffn_gate", "ffn_up")}


def adapter_targets(targets, arch: str) -> tuple[str, ...]:
    """Adapter targets as lowtune's model names its linears (attn_q ... ffn_down, the same in
    every family; LFM2's convolutions' in_proj and out_proj), from those names or the family's HF
    module names (q_proj, o_proj, ...; Phi-3's qkv_proj is q, k and v, its gate_up_proj gate and
    up; LFM2's out_proj both its attention's and its convolutions'). Other names are kept as they are."""
    hf: dict[str, tuple[str, ...]] = {}
    for g, h in _table(arch)["layer"].items():
        leaf = h.rsplit(".", 1)[-1]
        hf[leaf] = hf.get(leaf, ()) + (g.rsplit(".", 1)[-1],)
    out: list[str] = []
    for t in targets:
        for name in _FUSED_HF.get(t, hf.get(t, (t,))):
            if name not in out:
                out.append(name)
    return tuple(out)


# ---- values: q/k rows, Gemma's norms -------------------------------------------------------------

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


def _family(metadata: Mapping) -> Family:
    arch = metadata.get("general.architecture", "llama")
    if arch not in FAMILIES:
        raise ValueError(f"no Hugging Face layout for architecture {arch!r}")
    return FAMILIES[arch]


def rope_heads(name: str, metadata: Mapping) -> int | None:
    """How many heads the rows of GGUF tensor `name` are permuted over (q: heads, k: KV heads),
    or None for tensors in the same row order in both layouts (every tensor of a NEOX family)."""
    m = re.fullmatch(r"blk\.(\d+)\.(attn_q|attn_k)\.(weight|bias)", name)
    if m is None or not _family(metadata).hf_permute_qk:
        return None
    arch = metadata.get("general.architecture", "llama")
    n_head = int(metadata[f"{arch}.attention.head_count"])
    kv = metadata.get(f"{arch}.attention.head_count_kv", n_head)  # (one a layer in hybrids: this layer's)
    return n_head if m.group(2) == "attn_q" else int(kv[int(m.group(1))] if isinstance(kv, (list, tuple)) else kv)


def _norm_offset(name: str, metadata: Mapping) -> float:
    # (Qwen3.5's DeltaNet output norm is not zero-centred: the converter adds nothing to it)
    return _family(metadata).hf_norm_offset if name.endswith("norm.weight") and "ssm_norm" not in name else 0.0


_CONV_KERNELS = ("shortconv.conv.weight", "ssm_conv1d.weight")  # nn.Conv1d's [D, 1, L] in HF, [D, L] in GGUF
_SSM_VECTORS = ("ssm_a", "ssm_d")  # Mamba2's A and D: [H] in HF, [H, 1] in GGUF


# GPT-2's linears, Conv1D modules whose weight is [in, out]: transposed in GGUF, as the converter writes them
_CONV1D = {"gpt2": ("attn_qkv", "attn_output", "ffn_up", "ffn_down")}


def _conv1d(name: str, metadata: Mapping | None) -> bool:
    """Whether GGUF weight `name` is a Conv1D's in HF, its matrix transposed (_CONV1D)."""
    m = re.fullmatch(r"blk\.\d+\.(.+)\.weight", name)
    arch = metadata.get("general.architecture") if metadata is not None else None
    return m is not None and m.group(1) in _CONV1D.get(arch, ())


def peft_fan_in_fan_out(arch: str) -> bool:
    """PEFT's fan_in_fan_out: whether the family's adapted modules are Conv1D's, their weight [in, out] (_CONV1D)."""
    return arch in _CONV1D


def hf_shape(name: str, shape, metadata: Mapping | None = None) -> tuple[int, ...]:
    """The shape HF gives GGUF tensor `name` of `shape` (of a model of `metadata`): LFM2's, Mamba2's and
    Qwen3.5's convolution kernels [C, L] are nn.Conv1d's weight [C, 1, L] (the converter drops the 1),
    Mamba2's A and D [H, 1] and gated norm [groups, inner / groups] are vectors, GPT-2's Conv1D weights
    transposed; every other tensor its own."""
    shape = tuple(shape)
    if _conv1d(name, metadata):
        return shape[::-1]
    if name.endswith(_CONV_KERNELS) and len(shape) == 2:
        return (shape[0], 1, *shape[1:])
    arch = metadata.get("general.architecture") if metadata is not None else None
    if name.endswith(_SSM_VECTORS + ("ssm_norm.weight",)) and not (arch in FAMILIES and FAMILIES[arch].mamba1):
        return (math.prod(shape),)  # (Mamba 1's A is [inner, state] in both)
    return shape


# the embedding tables that llama.cpp's converter pads with zero rows to vocab_size (Gemma 3n's per-layer table
# holds vocab_size_per_layer_input rows: the vision and audio tokens get zeros)
_VOCAB_PADDED = {"gemma3n": ("token_embd.weight", "per_layer_token_embd.weight")}


def _padded_vocab(name: str, w, metadata: Mapping):
    """HF tensor w of GGUF tensor `name` with the zero rows the converter adds up to the vocabulary (_VOCAB_PADDED)."""
    arch = metadata.get("general.architecture")
    rows = int(metadata[f"{arch}.vocab_size"]) if name in _VOCAB_PADDED.get(arch, ()) else 0
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])]) if rows > w.shape[0] else w


def gguf_shape(name: str, shape, metadata: Mapping | None = None) -> tuple[int, ...]:
    """The inverse of hf_shape: the GGUF shape of tensor `name` (its GGUF name) held in HF's `shape`
    (Mamba2's gated norm's groups from `metadata`, an embedding table padded to the vocabulary: _VOCAB_PADDED)."""
    shape = tuple(shape)
    if metadata is not None and name in _VOCAB_PADDED.get(metadata.get("general.architecture"), ()):
        return tuple(_padded_vocab(name, torch.empty(shape, device="meta"), metadata).shape)
    if name.endswith(_CONV_KERNELS) and len(shape) == 3:
        return (shape[0], *shape[2:])
    if _conv1d(name, metadata):
        return shape[::-1]
    arch = metadata.get("general.architecture") if metadata is not None else None
    if arch not in FAMILIES or not FAMILIES[arch].mamba2:  # (Qwen3.5's A and gated norm are GGUF vectors too)
        return shape
    if name.endswith(_SSM_VECTORS) and len(shape) == 1:
        return (shape[0], 1)
    if name.endswith("ssm_norm.weight") and len(shape) == 1:
        groups = int(metadata[f"{arch}.ssm.group_count"])
        return (groups, shape[0] // groups)
    return shape


# Qwen3.5's DeltaNet tensors whose value-head rows (or, ssm_out, columns) the converter reorders, with
# the width of a head there (0: the value heads' width) and the rows before them (attn_qkv's q and k)
_V_HEAD_ROWS = {"attn_qkv.weight": 0, "ssm_conv1d.weight": 0, "attn_gate.weight": 0, "ssm_alpha.weight": 1,
                "ssm_beta.weight": 1, "ssm_a": 1, "ssm_dt.bias": 1}


def _v_heads(name: str, metadata: Mapping) -> tuple[int, int, int, int] | None:
    """(q/k heads, value heads per q/k head, head width, rows before) where `name` holds Qwen3.5's value
    heads in the converter's tiled order (head j reads q/k head j mod q/k heads; HF groups them by q/k
    head), else None."""
    arch = metadata.get("general.architecture", "llama")
    if arch not in FAMILIES or not FAMILIES[arch].delta_net:
        return None
    m = re.fullmatch(r"blk\.\d+\.(.+)", name)
    part = m.group(1) if m else ""
    if part not in _V_HEAD_ROWS and part != "ssm_out.weight":
        return None
    hk, hv = int(metadata[f"{arch}.ssm.group_count"]), int(metadata[f"{arch}.ssm.time_step_rank"])
    if hk == hv:
        return None
    width = _V_HEAD_ROWS.get(part, 0) or int(metadata[f"{arch}.ssm.inner_size"]) // hv
    before = 2 * hk * int(metadata[f"{arch}.ssm.state_size"]) if part in ("attn_qkv.weight", "ssm_conv1d.weight") else 0
    return hk, hv // hk, width, before


def _regroup(w, v_heads: tuple[int, int, int, int], to_hf: bool, dim: int = 0):
    """w with the value heads along `dim` (after `before` others) from tiled to grouped order
    (to_hf) or back."""
    hk, per, width, before = v_heads
    w = w.movedim(dim, 0)
    head, v = w[:before], w[before:]
    order = (per, hk) if to_hf else (hk, per)
    v = v.reshape(*order, width, *v.shape[1:]).transpose(0, 1).reshape(v.shape)
    return torch.cat([head, v]).movedim(0, dim)


# the families whose HF class keeps q, k and v rows in one tensor grouped by KV head (each group's q heads, its k
# head, its v head; GPT-NeoX's and BLOOM's a group a head), where the converter writes all q rows, then k, then v
_QKV_GROUPED = ("gptneox", "bloom", "falcon")


def _qkv_groups(name: str, metadata: Mapping) -> tuple[int, int] | None:
    """(KV heads, q heads of each) where `name` is fused q/k/v in groups of KV heads in HF (_QKV_GROUPED);
    else None."""
    arch = metadata.get("general.architecture")
    if arch not in _QKV_GROUPED or not re.fullmatch(r"blk\.\d+\.attn_qkv\.(weight|bias)", name):
        return None
    n_head = int(metadata[f"{arch}.attention.head_count"])
    kv = int(metadata.get(f"{arch}.attention.head_count_kv", n_head))
    return kv, n_head // kv


def _regroup_qkv(w, groups: tuple[int, int], to_hf: bool):
    """Fused q/k/v rows from all q, all k, all v to [KV heads, q heads of each + 2, d] (to_hf) or back."""
    kv, per = groups
    d, rest = w.shape[0] // (kv * (per + 2)), w.shape[1:]
    if to_hf:
        q, k, v = w.split([kv * per * d, kv * d, kv * d])
        return torch.cat([x.reshape(kv, -1, *rest) for x in (q, k, v)], 1).reshape(w.shape)
    q, k, v = w.reshape(kv, (per + 2) * d, *rest).split([per * d, d, d], 1)
    return torch.cat([x.reshape(-1, *rest) for x in (q, k, v)])


def to_hf_rows(name: str, w, metadata: Mapping):
    """A GGUF tensor's rows (a LoRA B's too) in HF's order: q/k rows of a Llama, GPT-NeoX's and Falcon's q/k/v,
    Qwen3.5's value heads; Gemma's norms as w, Qwen3.5's ssm_a as A_log."""
    heads = rope_heads(name, metadata)
    if heads is not None:
        w = permute_qk_gguf_to_hf(w, heads)
    groups = _qkv_groups(name, metadata)
    if groups is not None:
        w = _regroup_qkv(w, groups, True)
    v_heads = _v_heads(name, metadata)
    if v_heads is not None and not name.endswith("ssm_out.weight"):
        w = _regroup(w, v_heads, True)
    off = _norm_offset(name, metadata)
    w = w - off if off else w
    return torch.log(-w) if name.endswith(".ssm_a") else w  # (the converter stores -exp(A_log))


def to_hf_columns(name: str, a, metadata: Mapping):
    """A GGUF matrix's columns (a LoRA A's) in HF's order: Qwen3.5's ssm_out reads value heads."""
    v_heads = _v_heads(name, metadata) if name.endswith("ssm_out.weight") else None
    return a if v_heads is None else _regroup(a, v_heads, True, dim=-1)


def to_hf_values(name: str, w, metadata: Mapping):
    """A GGUF tensor as HF holds it (to_hf_rows and to_hf_columns), in hf_shape (a Conv1D's transposed)."""
    w = to_hf_columns(name, to_hf_rows(name, w, metadata), metadata)
    return w.t().contiguous() if _conv1d(name, metadata) else w.reshape(hf_shape(name, w.shape, metadata))


def from_hf_values(name: str, w, metadata: Mapping):
    """An HF tensor as GGUF holds it (the inverse of to_hf_values); `name` is its GGUF name."""
    w = _padded_vocab(name, w, metadata)
    heads = rope_heads(name, metadata)
    if heads is not None:
        w = permute_qk_hf_to_gguf(w, heads)
    groups = _qkv_groups(name, metadata)
    if groups is not None:
        w = _regroup_qkv(w, groups, False)
    w = w.t() if _conv1d(name, metadata) else w.reshape(gguf_shape(name, w.shape, metadata))
    v_heads = _v_heads(name, metadata)
    if v_heads is not None:
        w = _regroup(w, v_heads, False, dim=-1 if name.endswith("ssm_out.weight") else 0)
    off = _norm_offset(name, metadata)
    w = w + off if off else w
    if name.endswith(".ssm_a"):  # (GGUF holds A = -exp(A_log), as the converter writes it)
        w = -w.float().exp()
    return w


from_hf_rows = from_hf_values  # the name before other families came


# Falcon-H1's scalar multipliers, which llama.cpp's converter folds into the weights (its mlp_multipliers and
# ssm_multipliers: lists)
_FALCON_H1_MULTIPLIERS = ("embedding_multiplier", "lm_head_multiplier", "key_multiplier", "attention_in_multiplier",
                          "attention_out_multiplier", "ssm_in_multiplier", "ssm_out_multiplier")


def fold_multipliers(name: str, w, config: Mapping):
    """GGUF tensor `name` of an HF checkpoint of `config` (config.json) with the multipliers that llama.cpp's
    converter folds into it (Falcon-H1's, in the converter's order of products); every other tensor as it is."""
    if config.get("model_type") != "falcon_h1":
        return w
    get = lambda k: config.get(k, 1.0)  # noqa: E731
    part = re.sub(r"^blk\.\d+\.", "", name).removesuffix(".weight")
    mlp, attn_in = config.get("mlp_multipliers") or (1.0, 1.0), get("attention_in_multiplier")
    scales = {"ffn_gate": (mlp[0],), "ffn_down": (mlp[1],), "attn_k": (get("key_multiplier"), attn_in),
              "attn_q": (attn_in,), "attn_v": (attn_in,), "attn_output": (get("attention_out_multiplier"),),
              "ssm_in": (get("ssm_in_multiplier"),), "ssm_out": (get("ssm_out_multiplier"),),
              "output": (get("lm_head_multiplier"),), "token_embd": (get("embedding_multiplier"),)}
    for s in scales.get(part, ()):
        w = w * s
    if part == "ssm_in":  # (z, x, B, C and dt rows, each by its own of ssm_multipliers)
        inner, bc = int(config["mamba_d_ssm"]), int(config["mamba_n_groups"]) * int(config["mamba_d_state"])
        ends = (inner, 2 * inner, 2 * inner + bc, 2 * inner + 2 * bc, w.shape[0])
        for start, end, s in zip((0,) + ends[:-1], ends, config.get("ssm_multipliers") or (1.0,) * 5):
            w[start:end] *= s
    return w


# ---- config.json -> GGUF metadata ----------------------------------------------------------------

def _text_config(config: dict) -> dict:
    """A multimodal config's text part at the top level (as llama.cpp's converter reads it)."""
    return {**config, **config["text_config"]} if isinstance(config.get("text_config"), dict) else config


def _rope(config: dict) -> tuple[dict, dict | None]:
    """(global, sliding) RoPE parameters of a config in either spelling: transformers 5's
    rope_parameters (flat, or per layer type) or the older rope_theta / rope_scaling /
    rope_local_base_freq keys. Each dict: rope_theta, rope_type and the type's own keys; sliding
    is None when the config gives sliding layers nothing of their own."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full = dict(params.get("full_attention") or {})
        return full, (dict(params["sliding_attention"]) if params.get("sliding_attention") else None)
    full = dict(params or config.get("rope_scaling") or {})
    full.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    if "type" in full:
        full.setdefault("rope_type", full["type"])
    for key in ("partial_rotary_factor", "original_max_position_embeddings"):
        if key in config:
            full.setdefault(key, config[key])
    if "rotary_pct" in config:  # (GPT-NeoX's names)
        full.setdefault("partial_rotary_factor", config["rotary_pct"])
    if "rotary_emb_base" in config and "rope_theta" not in config:
        full["rope_theta"] = config["rotary_emb_base"]
    local = config.get("rope_local_base_freq")
    return full, ({"rope_type": "default", "rope_theta": local} if local is not None else None)


def _layer_types(config: dict, fam: Family, n_layers: int) -> list[bool] | None:
    """Which layers slide (a flag per layer) when config.json says so, else None (no window)."""
    window = config.get("sliding_window") or 0
    if not window or (config.get("use_sliding_window") is False):  # Qwen2/3 keep it switched off
        return None
    types = config.get("layer_types")
    if types is not None:
        flags = [t == "sliding_attention" for t in types[:n_layers]]
        return flags if any(flags) else None
    period = config.get("sliding_window_pattern", config.get("_sliding_window_pattern", fam.swa_period))
    if isinstance(period, str):  # EXAONE 4's "LLLG": L slides, G is global, repeated
        return [period[i % len(period)] == "L" for i in range(n_layers)]
    if not period:
        return [True] * n_layers
    return [i % int(period) < int(period) - 1 for i in range(n_layers)]


def _family_windows(fam: Family, n_layers: int) -> list[bool]:
    """The layers a file with a window and no pattern slides (ModelConfig's rule)."""
    p = fam.swa_period
    return [True] * n_layers if not p else [i % p < p - 1 for i in range(n_layers)]


def _longrope_attn_factor(rope: dict, config: dict) -> float:
    """LongRoPE's magnitude on q and k: the config's attention_factor, else sqrt(1 + ln s / ln L)
    for s = max positions / original positions > 1 (L the original), as transformers and
    llama.cpp's converter compute it."""
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    orig = float(rope["original_max_position_embeddings"])
    scale = float(rope.get("factor") or config["max_position_embeddings"] / orig)
    return math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0


def metadata_from_hf_config(config: dict, name: str = "") -> tuple[dict, dict]:
    """GGUF `general.*` and `<arch>.*` metadata (and their GGUF types) from an HF config.json, as
    llama.cpp's converter would write them (plus Mistral's window, which lowtune reads from
    `llama.attention.sliding_window`)."""
    fam = family_of_hf(config.get("architectures"), config.get("model_type", "llama"))
    config = _text_config(config)
    config = {**config, **{common: config[own] for own, common in _CONFIG_ALIASES.get(fam.arch, {}).items()
                           if own in config}}
    if fam.arch == "nemotron_h" and "E" in _nemotron_h_layers(config):  # (its MoE: experts in place of the MLPs)
        fam = FAMILIES["nemotron_h_moe"]
    arch = fam.arch
    if "hidden_act" in _CONFIG_ALIASES.get(arch, {}).values() and config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json's activation {config['hidden_act']!r}: llama.cpp's {arch} runs SiLU")
    md: dict[str, tuple[Any, Any]] = {
        "general.architecture": (arch, STR), "general.type": ("model", STR),
        "general.name": (name or config.get("_name_or_path") or "model", STR)}
    key = lambda k, v, t: md.__setitem__(f"{arch}.{k}", (v, t))
    # (classes whose config.json has keys of its own: in the common keys, as the converter reads them)
    if arch == "falcon":
        config = _falcon_config(config)
    elif arch in ("gpt2", "starcoder"):
        config = _gpt2_config(config, arch)
    elif arch == "bloom":
        config = _bloom_config(config)
    elif arch == "mpt":
        config = _mpt_config(config)
        key("attention.max_alibi_bias", float(config["alibi_bias_max"]), F32)
    elif arch in _NEMOTRON_H_ARCHS:
        config = _nemotron_h_common(config)
    if fam.attention_free:  # (Mamba, Mamba-2: no attention, no FFN)
        _ssm_keys(config, fam, key)
        return {k: v for k, (v, _) in md.items()}, {k: t for k, (_, t) in md.items()}
    for gguf_key, hf, _, gtype, default in CONFIG_KEYS:
        value = config.get(hf)
        if value is None:
            value = config.get(default) if isinstance(default, str) else default
        if value is None:
            raise ValueError(f"config.json lacks {hf!r}, which a {arch} model needs")
        if isinstance(value, list):  # (one a layer: Gemma 3n's FFN widths)
            key(gguf_key, [int(v) for v in value], (ARRAY, I32))
            continue
        key(gguf_key, float(value) if gtype == F32 else int(value), gtype)
    if fam.eps_key != "attention.layer_norm_rms_epsilon":  # LayerNorm's epsilon (Nemotron-H's), under its own keys
        del md[f"{arch}.attention.layer_norm_rms_epsilon"]
        key(fam.eps_key, float(config.get(_LAYER_NORM_EPS.get(arch, "layer_norm_eps"), 1e-5)), F32)
    if fam.logit_multiplier:
        key("logit_scale", float(config.get("logit_scale", 1.0)), F32)
    if fam.qkv_clamp and config.get("clip_qkv"):
        key("attention.clamp_kqv", float(config["clip_qkv"]), F32)
    if fam.short_conv:
        _short_conv_keys(config, key)
    if fam.altup:
        _gemma3n_keys(config, key)
    if arch == "falcon-h1":
        _falcon_h1_keys(config, key)
    elif arch in _NEMOTRON_H_ARCHS:
        _nemotron_h_keys(config, key)
    elif arch == "jamba":
        _jamba_keys(config, key)
    elif fam.mamba2:
        _mamba2_keys(config, key)
    if fam.delta_net:
        _delta_net_keys(config, key)
    if fam.activation_key:
        _bitnet_keys(config, fam, key)
    if config.get("use_qk_norm") and not fam.qk_norm:
        raise ValueError(f"config.json asks for q/k norms, which lowtune's {arch} does not run")
    if fam.parallel_key:
        _parallel_keys(config, key, arch)
    if fam.layer_widths:  # (Gemma 4: layers of two widths, RoPE of its own; none of the rest below applies)
        _gemma4_keys(config, key)
        return {k: v for k, (v, _) in md.items()}, {k: t for k, (_, t) in md.items()}
    hidden, n_head = int(config["hidden_size"]), int(config["num_attention_heads"])
    n_layers = int(config["num_hidden_layers"])
    head_dim = int(config.get("head_dim") or hidden // n_head)
    rope, rope_swa = _rope(config)
    rope_dim = int(head_dim * float(rope.get("partial_rotary_factor") or 1.0))
    key("rope.dimension_count", rope_dim, U32)
    if head_dim != hidden // n_head:
        key("attention.key_length", head_dim, U32)
        key("attention.value_length", head_dim, U32)
    key("rope.freq_base", float(rope.get("rope_theta", 10000.0)), F32)
    if rope_swa is not None:
        if rope_swa.get("rope_type", "default") != "default":
            raise ValueError(f"RoPE scaling on sliding layers ({rope_swa['rope_type']!r}) is not supported")
        if fam.swa_rope_theta is not None or rope_swa.get("rope_theta") != rope.get("rope_theta"):
            key("rope.freq_base_swa", float(rope_swa.get("rope_theta", 10000.0)), F32)
    kind = rope.get("rope_type", rope.get("type"))
    if kind == "linear":
        key("rope.scaling.type", "linear", STR)
        key("rope.scaling.factor", float(rope["factor"]), F32)
    elif kind in ("longrope", "su"):
        key("rope.scaling.original_context_length", int(rope["original_max_position_embeddings"]), U32)
        key("rope.scaling.attn_factor", _longrope_attn_factor(rope, config), F32)
    elif kind == "yarn":
        _check_yarn(rope, fam)
        key("rope.scaling.type", "yarn", STR)
        key("rope.scaling.factor", float(rope["factor"]), F32)
        key("rope.scaling.original_context_length", int(rope["original_max_position_embeddings"]), U32)
        if fam.yarn_keys:  # as llama.cpp's converter writes Ministral 3's
            for gguf_key, hf in _YARN_KEYS:
                if rope.get(hf) is not None:
                    key(gguf_key, float(rope[hf]), F32)
    elif kind in ("dynamic", "xdrope") and rope.get("alpha") is not None:
        # NTK alpha (Hunyuan): a larger base, base · alpha^(d / (d - 2)), as llama.cpp's converter
        # writes it (and, for "dynamic", the 256k context it assumes)
        alpha, base = float(rope["alpha"]), float(rope.get("rope_theta", 10000.0))
        key("rope.freq_base", base * alpha ** (head_dim / (head_dim - 2)), F32)
        if kind == "dynamic":
            key("context_length", 256 * 1024, U32)
    elif kind not in (None, "default", "llama3", "mrope"):  # llama3: the rope_freqs tensor (generated_tensors)
        raise ValueError(f"rope_scaling type {kind!r} is not supported (linear, yarn, llama3 and longrope are)")
    sections = [int(x) for x in rope.get("mrope_section") or ()][:4]
    if sections:  # M-RoPE's (Qwen VL), which llama.cpp needs, as its converter writes them
        key("rope.dimension_sections", sections + [0] * (4 - len(sections)), (ARRAY, I32))
    deepstack = (config.get("vision_config") or {}).get("deepstack_visual_indexes")
    if fam.text_of and deepstack is not None:  # (Qwen3-VL's: image features added to the first layers)
        key("n_deepstack_layers", len(deepstack), U32)

    if fam.nope_period:
        _check_nope_layers(config, fam, n_layers)
    if arch == "ernie4_5" and config.get("use_bias"):
        raise ValueError("config.json asks for biases on every ernie4_5 linear; llama.cpp uses only q/k/v's "
                         "(and so lowtune, which follows it), so this checkpoint is not supported")
    if fam.multipliers:  # Granite's, under llama.cpp's names (written only where set, as its converter does)
        if "head_dim" in config and int(config["head_dim"]) != hidden // n_head:
            raise ValueError(f"head_dim {config['head_dim']} is not hidden_size / num_attention_heads; "
                             f"llama.cpp's {arch} ignores it (and so lowtune, which follows it)")
        for gguf_key, hf in _MULTIPLIERS:
            if config.get(hf):
                key(gguf_key, float(config[hf]), F32)
    if fam.mla:
        _latent_attention_keys(config, key, fam)
    if arch == "nemotron" and head_dim * n_head != hidden:  # (llama.cpp's q and output are [hidden, hidden])
        raise ValueError(f"head_dim {head_dim} × {n_head} heads is not hidden_size {hidden}; llama.cpp's nemotron "
                         "runs attention only as wide as the model (and so lowtune, which follows it)")
    flags = _layer_types(config, fam, n_layers)
    if flags is not None and fam.window_block_counts and n_layers not in fam.window_block_counts:
        raise ValueError(f"config.json slides layers of a {n_layers}-layer {arch} model; llama.cpp runs {arch}'s "
                         f"windows only at {fam.window_block_counts} layers (and so lowtune, which follows it)")
    if flags is not None:
        key("attention.sliding_window", int(config["sliding_window"]), U32)
        if flags != _family_windows(fam, n_layers):
            key("attention.sliding_window_pattern", flags, (ARRAY, BOOL))
    elif fam.default_window:
        key("attention.sliding_window", 0, U32)  # the family's default window does not apply
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        has_cap = (fam.attn_softcap if cap.startswith("attn") else fam.final_softcap) is not None
        if has_cap:
            key(cap, float(config.get(cap) or 0.0), F32)
        elif config.get(cap):
            raise ValueError(f"config.json asks for {cap}, which a {arch} model does not have")
    if "query_pre_attn_scalar" in config:
        _check_query_scale(config, fam, head_dim)
    return {k: v for k, (v, _) in md.items()}, {k: t for k, (_, t) in md.items()}


def _gemma4_global(config: dict, key: str):
    """A Gemma 4 config's value of `key` for its global layers: global_<key>, else per_layer_config's of the first
    full_attention layer, as llama.cpp's converter finds head_dim and num_key_value_heads (None: neither)."""
    if config.get(f"global_{key}") is not None:
        return config[f"global_{key}"]
    types = config.get("layer_types") or []
    for i, layer in (config.get("per_layer_config") or {}).items():
        if int(i) < len(types) and types[int(i)] == "full_attention" and key in layer:
            return layer[key]
    return None


def _gemma4_keys(config: dict, key) -> None:
    """Gemma 4's layers of two widths as llama.cpp's converter writes them: the global layers' head and KV heads
    (global_head_dim, num_global_key_value_heads or per_layer_config's) beside the sliding ones', which layers
    slide, the FFN twice as wide from the first layer that reuses K/V (use_double_wide_mlp), RoPE on all of a
    global head ("proportional": rope_freqs, generated_tensors) and on partial_rotary_factor of a sliding one,
    the per-layer inputs' width, the experts'; the rest of the config is refused where llama.cpp's gemma4 would
    not run it as transformers does."""
    n_layers, head_dim = int(config["num_hidden_layers"]), int(config.get("head_dim") or 256)
    types = config.get("layer_types")
    if not types or len(types) < n_layers:
        raise ValueError("config.json lacks layer_types for every layer, which llama.cpp's converter reads for gemma4")
    swa = [t == "sliding_attention" for t in types[:n_layers]]
    full_dim, full_kv = _gemma4_global(config, "head_dim"), _gemma4_global(config, "num_key_value_heads")
    if full_dim is None:
        raise ValueError("config.json gives the global layers no head_dim (global_head_dim or per_layer_config), "
                         "which llama.cpp's converter needs for gemma4")
    full, sliding = _rope(config)
    if full.get("rope_type") != "proportional" or (sliding or {}).get("rope_type", "default") != "default":
        raise ValueError(f"gemma4's RoPE {full.get('rope_type')!r} (global layers) and "
                         f"{(sliding or {}).get('rope_type')!r} (sliding layers): llama.cpp's converter writes only "
                         "'proportional' and 'default' (and so lowtune, which follows it)")
    for unsupported in ("attention_bias", "use_bidirectional_attention"):
        if config.get(unsupported):
            raise ValueError(f"config.json asks for {unsupported}, which llama.cpp's gemma4 does not run (and so "
                             "lowtune, which follows it)")
    if config.get("attn_logit_softcapping"):
        raise ValueError("config.json asks for attn_logit_softcapping, which a gemma4 model does not have")
    per_layer_vocab = config.get("vocab_size_per_layer_input", config["vocab_size"])
    if config.get("hidden_size_per_layer_input") and per_layer_vocab != config["vocab_size"]:
        raise ValueError(f"config.json's vocab_size_per_layer_input {per_layer_vocab} differs from vocab_size "
                         f"{config['vocab_size']}; llama.cpp's gemma4 reads the per-layer embeddings by the "
                         "vocabulary's ids (and so lowtune, which follows it)")
    shared = int(config.get("num_kv_shared_layers") or 0)
    ffn = int(config["intermediate_size"])
    if config.get("use_double_wide_mlp"):
        key("feed_forward_length", [ffn if i < n_layers - shared else 2 * ffn for i in range(n_layers)], (ARRAY, U32))
    kv = int(config.get("num_key_value_heads") or 4)
    key("attention.head_count_kv", kv if full_kv is None else [kv if s else int(full_kv) for s in swa],
        U32 if full_kv is None else (ARRAY, U32))
    key("context_length", int(config.get("max_position_embeddings") or 131072), U32)
    key("rope.freq_base", float(full.get("rope_theta", 1e6)), F32)
    key("rope.freq_base_swa", float((sliding or {}).get("rope_theta", 10000.0)), F32)
    key("attention.key_length", int(full_dim), U32)
    key("attention.value_length", int(full_dim), U32)
    key("attention.key_length_swa", head_dim, U32)
    key("attention.value_length_swa", head_dim, U32)
    key("rope.dimension_count", int(full_dim), U32)
    key("rope.dimension_count_swa", int(head_dim * float((sliding or {}).get("partial_rotary_factor") or 1.0)), U32)
    if config.get("final_logit_softcapping"):
        key("final_logit_softcapping", float(config["final_logit_softcapping"]), F32)
    if config.get("sliding_window_pattern") != 1:
        key("attention.sliding_window", int(config["sliding_window"]), U32)
    key("attention.sliding_window_pattern", swa, (ARRAY, BOOL))
    key("attention.shared_kv_layers", shared, U32)
    key("embedding_length_per_layer_input", int(config.get("hidden_size_per_layer_input") or 0), U32)
    if config.get("enable_moe_block"):
        key("expert_count", int(config["num_experts"]), U32)
        key("expert_used_count", int(config["top_k_experts"]), U32)
        key("expert_feed_forward_length", int(config["moe_intermediate_size"]), U32)


def _gemma4_rope_freqs(config: dict) -> list[float]:
    """Gemma 4's rope_freqs, as llama.cpp's converter builds them: its global layers' "proportional" RoPE
    rotates partial_rotary_factor of each head's pairs at the speeds of the whole head, which ggml's NEOX RoPE on
    the whole head runs with the other pairs' speeds divided by 1e30 (left unrotated)."""
    full, _ = _rope(config)
    head_dim = int(_gemma4_global(config, "head_dim"))
    rotated = int(head_dim * float(full["partial_rotary_factor"]) / 2)
    return [1.0] * rotated + [1e30] * (head_dim // 2 - rotated)


def _latent_attention_keys(config: dict, key, fam: Family) -> None:
    """MiniCPM3's latent attention as llama.cpp's converter writes it: the latents' widths, a head's key
    (no-RoPE and RoPE dims) and its RoPE dims, and the values' width (which llama.cpp reads as hidden /
    heads where the file gives none). Its scales are the ones llama.cpp's graph fixes, or refused."""
    nope, rope = int(config["qk_nope_head_dim"]), int(config["qk_rope_head_dim"])
    hidden, n_layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
    key("attention.kv_lora_rank", int(config["kv_lora_rank"]), U32)
    if config.get("q_lora_rank"):
        key("attention.q_lora_rank", int(config["q_lora_rank"]), U32)
    key("attention.key_length", nope + rope, U32)
    key("attention.value_length", int(config.get("v_head_dim") or hidden // int(config["num_attention_heads"])), U32)
    key("rope.dimension_count", rope, U32)
    depth = config.get("scale_depth") or math.sqrt(n_layers)  # (None: no scaling, as transformers reads it)
    scales = {"embedding_scale": float(config.get("scale_emb", 1.0)), "residual_scale": depth / math.sqrt(n_layers),
              "logit_scale": hidden / float(config.get("dim_model_base") or hidden)}
    fixed = fam.scale_defaults(n_layers, hidden)
    if any(abs(scales[k] - fixed[k]) > 1e-6 * fixed[k] for k in fixed):
        raise ValueError(f"config.json's scales (scale_emb, scale_depth, dim_model_base) give {scales}; llama.cpp's "
                         f"{fam.arch} fixes them to {fixed} (scale_emb 12, scale_depth 1.4, dim_model_base 256), and "
                         "so lowtune, which follows it")


def _bitnet_keys(config: dict, fam: Family, key) -> None:
    """BitNet's config.json: its gate's activation where it is not llama.cpp's (relu², BitNet b1.58 2B4T's,
    kept in the hidden_activation key that llama.cpp's bitnet graph does not read); its matrices plain, and
    its head tied to the embeddings (llama.cpp's bitnet has no output matrix)."""
    act = config.get("hidden_act", "relu2")  # (BitNetConfig's default)
    if act not in (fam.activation, "relu2"):
        raise ValueError(f"config.json's hidden_act {act!r} is not one lowtune's bitnet runs ({fam.activation} or "
                         "relu2)")
    if act != fam.activation:
        key("hidden_activation", act, STR)
    if config.get("quantization_config"):
        raise ValueError("this BitNet checkpoint is quantized (quantization_config: packed ternary weights or "
                         "online quantization), which lowtune does not read from safetensors; convert it with "
                         "llama.cpp's convert_hf_to_gguf.py (which unpacks it) and load the GGUF")
    if not config.get("tie_word_embeddings", False):
        raise ValueError("config.json unties BitNet's head (tie_word_embeddings false); llama.cpp's bitnet has no "
                         "output matrix and runs the embeddings as the head, so lowtune does too: save the "
                         "checkpoint with tied embeddings")


def _parallel_keys(config: dict, key, arch: str) -> None:
    """use_parallel_residual (transformers' default: GPT-NeoX's true, StableLM's false), and StableLM's q/k
    LayerNorms refused: StableLM 2 12B keeps a module of each head's own (q_layernorm.norms.N), which lowtune
    does not name."""
    if config.get("qk_layernorm"):
        raise ValueError("this StableLM checkpoint norms q and k with a LayerNorm of each head's own (qk_layernorm: "
                         "StableLM 2 12B), which lowtune reads from GGUF only; convert it with llama.cpp's "
                         "convert_hf_to_gguf.py and load the GGUF")
    key("use_parallel_residual", bool(config.get("use_parallel_residual", arch == "gptneox")), BOOL)


def _falcon_config(config: dict) -> dict:
    """Falcon's config.json in the common keys, as llama.cpp's converter reads it: one KV head in 7B's layout
    (multi_query), 40B's num_kv_heads, an FFN 4 · hidden_size wide and a context of 2048 (which it writes
    whatever the file says); RoPE at the base llama.cpp takes without a key (10000). What llama.cpp's falcon
    does not run is refused: ALiBi, attention and FFN one after the other, biases on the linears."""
    for flag, what in (("alibi", "ALiBi in place of RoPE"), ("bias", "biases on the linears")):
        if config.get(flag):
            raise ValueError(f"config.json asks for {what} ({flag}), which llama.cpp's falcon does not run (and "
                             "so lowtune, which follows it)")
    if not config.get("parallel_attn", True):
        raise ValueError("config.json runs Falcon's attention and FFN one after the other (parallel_attn false), "
                         "which llama.cpp's falcon does not (and so lowtune, which follows it)")
    hidden, n_head = int(config["hidden_size"]), int(config["num_attention_heads"])
    if int(config.get("ffn_hidden_size") or 4 * hidden) != 4 * hidden:
        raise ValueError(f"config.json's ffn_hidden_size {config['ffn_hidden_size']} is not 4 · hidden_size, the "
                         "width llama.cpp's converter writes for falcon (and so lowtune, which follows it)")
    if float(_rope(config)[0].get("rope_theta", 10000.0)) != 10000.0:
        raise ValueError("config.json's RoPE base is not 10000, the one llama.cpp's falcon takes (its converter "
                         "writes none), and so lowtune, which follows it")
    grouped = config.get("new_decoder_architecture") or not config.get("multi_query", True)
    return {**config, "num_key_value_heads": int(config.get("num_kv_heads") or n_head) if grouped else 1,
            "intermediate_size": 4 * hidden, "max_position_embeddings": 2048}


def _gpt2_config(config: dict, arch: str) -> dict:
    """GPT-2's and GPT-BigCode's config.json in the common keys (their own names: _CONFIG_ALIASES), as llama.cpp's
    converter reads it: GPT-2's context from n_ctx where the file gives it, an FFN 4 · n_embd wide, StarCoder's one
    KV head. What llama.cpp's gpt2 and starcoder do not run is refused: another FFN width, GPT-2's attention scaled
    otherwise, GPT-BigCode's K/V heads of their own."""
    hidden = int(config["hidden_size"])
    if int(config.get("n_inner") or 4 * hidden) != 4 * hidden:
        raise ValueError(f"config.json's n_inner {config['n_inner']} is not 4 · n_embd, the width llama.cpp's "
                         f"converter writes for {arch} (and so lowtune, which follows it)")
    if arch == "gpt2" and (not config.get("scale_attn_weights", True) or config.get("scale_attn_by_inverse_layer_idx")):
        raise ValueError("config.json scales GPT-2's attention otherwise than by 1/sqrt(head size) "
                         "(scale_attn_weights, scale_attn_by_inverse_layer_idx), which llama.cpp's gpt2 does not (and "
                         "so lowtune, which follows it)")
    if arch == "starcoder" and not config.get("multi_query", True):
        raise ValueError("config.json gives GPT-BigCode a K/V head of each head's own (multi_query false); llama.cpp's "
                         "converter writes starcoder with one (and so lowtune, which follows it)")
    out = {**config, "intermediate_size": 4 * hidden}
    if arch == "starcoder":
        out["num_key_value_heads"] = 1
    if arch == "gpt2" and config.get("n_ctx"):
        out["max_position_embeddings"] = config["n_ctx"]
    return out


def _bloom_config(config: dict) -> dict:
    """BLOOM's config.json in the common keys (its own names: _CONFIG_ALIASES), as llama.cpp's converter reads it:
    a K/V head of each head's own, an FFN 4 · hidden_size wide, the context of seq_length (else hidden_size).
    The residual taken after the norm (apply_residual_connection_post_layernorm), which llama.cpp's bloom does not
    run, is refused."""
    if config.get("apply_residual_connection_post_layernorm"):
        raise ValueError("config.json adds BLOOM's residual after the norm (apply_residual_connection_post_layernorm), "
                         "which llama.cpp's bloom does not (and so lowtune, which follows it)")
    hidden = int(config["hidden_size"])
    return {**config, "intermediate_size": 4 * hidden, "num_key_value_heads": config["num_attention_heads"],
            "max_position_embeddings": config.get("seq_length") or hidden}


def _mpt_config(config: dict) -> dict:
    """MPT's config.json in the common keys (its own names: _CONFIG_ALIASES; attn_config's clip_qkv and
    alibi_bias_max), as llama.cpp's converter reads it: an FFN 4 · d_model wide, LayerNorm's epsilon 1e-5.
    What transformers' MptForCausalLM does not hold is refused: learned positions in place of ALiBi, grouped K/V
    heads, q/k LayerNorms, biases, another FFN width."""
    attn = config.get("attn_config") or {}
    refused = {"alibi false (learned positions)": not attn.get("alibi", True),
               "kv_n_heads (grouped K/V heads)": attn.get("kv_n_heads") not in (None, config["num_attention_heads"]),
               "qk_ln (q/k LayerNorms)": attn.get("qk_ln"), "no_bias false (biases)": not config.get("no_bias", True),
               "expansion_ratio other than 4": config.get("expansion_ratio", 4) != 4}
    what = [k for k, v in refused.items() if v]
    if what:
        raise ValueError(f"config.json asks for {what[0]}, which transformers' MptForCausalLM does not hold; convert "
                         "the checkpoint with llama.cpp's convert_hf_to_gguf.py and load the GGUF")
    return {**config, "intermediate_size": 4 * int(config["hidden_size"]), "layer_norm_epsilon": 1e-5,
            "clip_qkv": attn.get("clip_qkv"), "alibi_bias_max": attn.get("alibi_bias_max", 8)}


def _ssm_keys(config: dict, fam: Family, key) -> None:
    """Mamba's and Mamba-2's config.json as llama.cpp's converter writes it: the mixers' sizes (Mamba-2's heads:
    inner / head_dim), no attention nor FFN, an unbounded context and the vocabulary padded to a multiple of
    pad_vocab_size_multiple. What llama.cpp's mamba and mamba2 do not run is refused: biases on the mixers'
    linears, a width other than expand · hidden_size, Mamba-2 without its gated norm or normed before the gate."""
    hidden, mamba2 = int(config["hidden_size"]), fam.mamba2
    inner = int(config.get("intermediate_size") or int(config.get("expand", 2)) * hidden)
    refused = {"use_bias (biases on in_proj and out_proj)": config.get("use_bias"),
               f"an inner width {inner}, not expand · hidden_size": inner != int(config.get("expand", 2)) * hidden,
               "rms_norm false (no gated norm)": mamba2 and not config.get("rms_norm", True),
               "norm_before_gate": mamba2 and config.get("norm_before_gate")}
    what = [k for k, v in refused.items() if v]
    if what:
        raise ValueError(f"config.json asks for {what[0]}, which llama.cpp's {fam.arch} does not run (and so lowtune, "
                         "which follows it)")
    pad = int(config.get("pad_vocab_size_multiple", 16 if mamba2 else 8))
    for gguf_key, value in (("context_length", 2 ** 20), ("embedding_length", hidden), ("feed_forward_length", 0),
                            ("attention.head_count", 0), ("block_count", int(config["num_hidden_layers"])),
                            ("vocab_size", -(int(config["vocab_size"]) // -pad) * pad),
                            ("ssm.conv_kernel", int(config.get("conv_kernel", 4))), ("ssm.inner_size", inner),
                            ("ssm.state_size", int(config.get("state_size", 128 if mamba2 else 16))),
                            ("ssm.time_step_rank", inner // int(config.get("head_dim", 64)) if mamba2 else
                             int(config.get("time_step_rank") or -(hidden // -16)))):
        key(gguf_key, value, U32)
    if mamba2:
        key("ssm.group_count", int(config.get("n_groups", 1)), U32)
    key("attention.layer_norm_rms_epsilon", float(config.get("layer_norm_epsilon", 1e-5)), F32)
    if not mamba2:
        key("ssm.dt_b_c_rms", False, BOOL)


def _gemma3n_keys(config: dict, key) -> None:
    """Gemma 3n's AltUp, per-layer inputs, shared K/V and sparse FFN gates as llama.cpp's converter writes them
    (each layer's sparsity as the standard normal's quantile, in fp32 as the converter computes it). What
    llama.cpp's gemma3n does not run is refused: a Laurel rank other than its fixed 64, AltUp's output
    unscaled, biases, another activation (the rest of its fixed layout: lowtune.gemma3n)."""
    refused = {k: config.get(k) for k, ours in (("laurel_rank", LAUREL_RANK), ("altup_correct_scale", True),
                                                 ("attention_bias", False), ("hidden_activation", "gelu_pytorch_tanh"))
               if config.get(k, ours) != ours}
    if refused:
        raise ValueError(f"config.json asks for {refused}, which llama.cpp's gemma3n does not run (and so lowtune, "
                         "which follows it)")
    normal = torch.distributions.normal.Normal(0, 1)
    sparsity = [normal.icdf(torch.tensor(p, dtype=torch.float32)).item()
                for p in config["activation_sparsity_pattern"]]
    key("altup.active_idx", int(config["altup_active_idx"]), U32)
    key("altup.num_inputs", int(config["altup_num_inputs"]), U32)
    key("embedding_length_per_layer_input", int(config["hidden_size_per_layer_input"]), U32)
    key("attention.shared_kv_layers", int(config["num_kv_shared_layers"]), U32)
    key("activation_sparsity_scale", sparsity, (ARRAY, F32))


def _gemma3n_config(c, cfg: dict) -> None:
    """Gemma 3n's config.json keys of model config `c` (the inverse of _gemma3n_keys), into cfg: the per-layer
    table as long as the vocabulary (GGUF's, padded: _VOCAB_PADDED), each layer's sparsity as the quantile's
    probability (0 where the gate is dense)."""
    normal = torch.distributions.normal.Normal(0, 1)
    sparsity = [_f32(normal.cdf(torch.tensor(s)).item()) if math.isfinite(s) else 0.0
                for s in (c.sparsity_std + (-math.inf,) * c.n_layers)[:c.n_layers]]
    shared = c.n_layers - c.kv_layers if c.kv_layers else 0  # (the layers that reuse earlier K/V)
    cfg.update({"altup_num_inputs": c.altup_inputs, "altup_active_idx": c.altup_active, "altup_correct_scale": True,
                "laurel_rank": LAUREL_RANK, "hidden_size_per_layer_input": c.per_layer_dim,
                "vocab_size_per_layer_input": c.vocab_size, "num_kv_shared_layers": shared,
                "activation_sparsity_pattern": sparsity, "attention_bias": False,
                "intermediate_size": [c.ffn_dim] * c.n_layers,
                "final_logit_softcapping": _f32(c.final_softcap) if c.final_softcap else None})


def _falcon_h1_keys(config: dict, key) -> None:
    """Falcon-H1's Mamba2 mixers as llama.cpp's converter writes them (mamba_* keys; heads mamba_d_ssm /
    mamba_d_head). What llama.cpp's falcon-h1 does not run is refused: biases on the linears, the gated norm
    before the gate, another activation."""
    refused = {k: config.get(k) for k in ("mamba_proj_bias", "projectors_bias", "attention_bias", "mlp_bias",
                                          "mamba_norm_before_gate") if config.get(k)}
    if config.get("hidden_act", "silu") != "silu":
        refused["hidden_act"] = config["hidden_act"]
    if refused:
        raise ValueError(f"config.json asks for {refused}, which llama.cpp's falcon-h1 does not run (and so lowtune, "
                         "which follows it)")
    inner = int(config["mamba_d_ssm"])
    for gguf_key, value in (("conv_kernel", config.get("mamba_d_conv", 4)), ("inner_size", inner),
                            ("state_size", config["mamba_d_state"]), ("group_count", config.get("mamba_n_groups", 1)),
                            ("time_step_rank", inner // int(config["mamba_d_head"]))):
        key(f"ssm.{gguf_key}", int(value), U32)


def _falcon_h1_config(c, cfg: dict, tensors: Collection[str]) -> None:
    """Falcon-H1's config.json keys of model config `c` (the inverse of _falcon_h1_keys), into cfg: its multipliers
    1, as the converter has folded them into the weights (_fold_multipliers)."""
    m = c.ssm
    cfg.update({"mamba_d_ssm": m.inner, "mamba_n_heads": m.heads, "mamba_d_head": m.head_dim,
                "mamba_n_groups": m.groups, "mamba_d_state": m.state, "mamba_d_conv": m.conv_kernel,
                "mamba_expand": m.inner // c.dim, "mamba_chunk_size": 256, "mamba_proj_bias": False,
                "projectors_bias": False, "mamba_norm_before_gate": False,
                "mamba_rms_norm": any(n.endswith("ssm_norm.weight") for n in tensors),
                "mamba_conv_bias": any(n.endswith("ssm_conv1d.bias") for n in tensors),
                **dict.fromkeys(_FALCON_H1_MULTIPLIERS, 1.0), "mlp_multipliers": [1.0, 1.0],
                "ssm_multipliers": [1.0] * 5})


# Nemotron-H and its MoE, one HF class
_NEMOTRON_H_ARCHS = ("nemotron_h", "nemotron_h_moe")
# Nemotron-H's layer kinds as its published configs' hybrid_override_pattern spells them, from transformers'
# layers_block_type (and the converter's other names of them)
_NEMOTRON_H_KINDS = {"mamba": "M", "linear_attention": "M", "mlp": "-", "attention": "*", "full_attention": "*",
                     "moe": "E"}


def _nemotron_h_layers(config: dict) -> str:
    """Nemotron-H's layer kinds, one character a layer (M: a Mamba2 mixer, -: an MLP, *: attention, E: experts,
    Nemotron-H MoE's), from config.json's hybrid_override_pattern or transformers' layers_block_type. MLPs beside
    experts are refused: the converter writes a MoE file's FFN widths in its experts' layers only."""
    pattern = config.get("hybrid_override_pattern") or config.get("layers_block_type")
    if not pattern:
        raise ValueError("config.json gives Nemotron-H no layer kinds (hybrid_override_pattern or layers_block_type)")
    kinds = pattern if isinstance(pattern, str) else "".join(_NEMOTRON_H_KINDS.get(t, "?") for t in pattern)
    if set(kinds) - set("M-*E") or {"-", "E"} <= set(kinds):
        raise ValueError(f"config.json's Nemotron-H layer kinds {pattern!r} are not Mamba2 (M, mamba), MLP (-, mlp) "
                         "or experts' (E, moe) and attention (*, attention) layers, the ones llama.cpp's nemotron_h "
                         "and nemotron_h_moe run")
    return kinds


def _nemotron_h_common(config: dict) -> dict:
    """Nemotron-H's config.json in the common keys, as llama.cpp's converter reads it: a layer for each of its
    kinds, the vocabulary padded to a multiple of 8, an unbounded context where Mamba2 layers switch RoPE off.
    What llama.cpp's nemotron_h does not run is refused: biases on the linears, other activations, a window."""
    refused = {k: config[k] for k in ("use_bias", "mamba_proj_bias", "attention_bias", "mlp_bias", "sliding_window")
               if config.get(k)}
    refused.update({k: config[k] for k, act in (("mamba_hidden_act", "silu"), ("mlp_hidden_act", "relu2"))
                    if config.get(k, act) != act})
    if refused:
        raise ValueError(f"config.json asks for {refused}, which llama.cpp's nemotron_h does not run (and so lowtune, "
                         "which follows it)")
    kinds, vocab = _nemotron_h_layers(config), int(config["vocab_size"])
    return {**config, "num_hidden_layers": len(kinds), "vocab_size": -(vocab // -8) * 8,
            "max_position_embeddings": 2 ** 20 if "M" in kinds else config.get("max_position_embeddings", 4096)}


def _nemotron_h_keys(config: dict, key) -> None:
    """Nemotron-H's layers as llama.cpp's converter writes them: an FFN width in the MLP layers and KV heads in
    the attention layers (0 in the others), the Mamba2 sizes (inner: mamba_num_heads · mamba_head_dim), RoPE off
    with Mamba2 layers."""
    kinds = _nemotron_h_layers(config)
    if "E" in kinds:
        _nemotron_h_moe_keys(config, key)
    kv = int(config.get("num_key_value_heads") or config["num_attention_heads"])
    ffn = int(config["moe_intermediate_size" if "E" in kinds else "intermediate_size"])
    key("feed_forward_length", [ffn if k in "-E" else 0 for k in kinds], (ARRAY, I32))
    key("attention.head_count_kv", [kv if k == "*" else 0 for k in kinds], (ARRAY, I32))
    heads = int(config["mamba_num_heads"])
    for gguf_key, value in (("conv_kernel", config.get("conv_kernel", config.get("mamba_d_conv", 4))),
                            ("state_size", config["ssm_state_size"]),
                            ("group_count", config.get("n_groups", config.get("mamba_n_groups", 8))),
                            ("inner_size", heads * int(config["mamba_head_dim"])), ("time_step_rank", heads)):
        key(f"ssm.{gguf_key}", int(value), U32)
    if "M" in kinds:
        key("rope.scaling.finetuned", False, BOOL)


def _nemotron_h_moe_keys(config: dict, key) -> None:
    """Nemotron-H MoE's experts as llama.cpp's converter writes them: their count, width, routing (the chosen
    weights renormalized and scaled as the config says, in groups) and the shared expert. A latent of the
    experts' input (moe_latent_size), which lowtune does not run, is refused."""
    if config.get("moe_latent_size"):
        raise ValueError(f"config.json asks for experts on a latent {config['moe_latent_size']} wide "
                         "(moe_latent_size), which lowtune does not run")
    for gguf_key, hf, gtype, default in (
            ("expert_count", "n_routed_experts", U32, None), ("expert_used_count", "num_experts_per_tok", U32, None),
            ("expert_feed_forward_length", "moe_intermediate_size", U32, None),
            ("expert_shared_feed_forward_length", "moe_shared_expert_intermediate_size", U32, None),
            ("expert_shared_count", "n_shared_experts", U32, 1), ("expert_weights_norm", "norm_topk_prob", BOOL, True),
            ("expert_weights_scale", "routed_scaling_factor", F32, 1.0), ("expert_group_count", "n_group", U32, 1),
            ("expert_group_used_count", "topk_group", U32, 1)):
        value = config.get(hf, default)
        if value is None:
            raise ValueError(f"config.json lacks {hf!r}, which a Nemotron-H MoE model needs")
        key(gguf_key, {U32: int, BOOL: bool, F32: float}[gtype](value), gtype)


def _nemotron_h_config(c, cfg: dict, tensors: Collection[str]) -> None:
    """Nemotron-H's config.json keys of model config `c` (the inverse of _nemotron_h_keys), into cfg: its layer
    kinds as the published configs' hybrid_override_pattern (which the converter reads too), no experts."""
    m = c.ssm
    kinds = "".join("M" if c.is_ssm(i) else "-" if c.has_ffn(i) else "*" for i in range(c.n_layers))
    if m is None:
        raise ValueError(f"a {c.arch} model without Mamba2 layers has no NemotronHForCausalLM config "
                         "(its converter would switch RoPE on); export it as GGUF (merged, or as a GGUF LoRA)")
    for k in ("rope_theta", "rope_scaling", "sliding_window", "hidden_act"):
        cfg.pop(k, None)
    cfg.update({"hybrid_override_pattern": kinds, "mamba_num_heads": m.heads, "mamba_head_dim": m.head_dim,
                "n_groups": m.groups, "ssm_state_size": m.state, "conv_kernel": m.conv_kernel,
                "expand": m.inner // c.dim, "chunk_size": 256, "use_bias": False, "mamba_proj_bias": False,
                "attention_bias": False, "mlp_bias": False, "mlp_hidden_act": "relu2", "mamba_hidden_act": "silu",
                "use_conv_bias": any(n.endswith("ssm_conv1d.bias") for n in tensors)})


def _jamba_keys(config: dict, key) -> None:
    """Jamba's config.json as llama.cpp's converter writes it: KV heads in the attention layers (every
    attn_layer_period-th from attn_layer_offset; 0 in the Mamba layers), Mamba's sizes, the experts. What
    llama.cpp's jamba does not run is refused: experts in other layers than every other one from the second (the
    layout its graph takes from the converted files), biases on the Mamba linears, a window, another activation."""
    n_layers, hidden = int(config["num_hidden_layers"]), int(config["hidden_size"])
    period, offset = int(config.get("expert_layer_period", 2)), int(config.get("expert_layer_offset", 1))
    refused = {k: config[k] for k in ("mamba_proj_bias", "sliding_window") if config.get(k)}
    if (period, offset) != (2, 1):
        refused["expert_layer_period, expert_layer_offset"] = (period, offset)
    if config.get("hidden_act", "silu") != "silu":
        refused["hidden_act"] = config["hidden_act"]
    if refused:
        raise ValueError(f"config.json asks for {refused}, which llama.cpp's jamba does not run (and so lowtune, "
                         "which follows it: experts every other layer from the second)")
    kv = int(config.get("num_key_value_heads") or config["num_attention_heads"])
    attn_period, attn_offset = int(config.get("attn_layer_period", 8)), int(config.get("attn_layer_offset", 4))
    key("attention.head_count_kv", [kv if i >= attn_offset and (i - attn_offset) % attn_period == 0 else 0
                                    for i in range(n_layers)], (ARRAY, I32))
    for gguf_key, value in (("conv_kernel", config.get("mamba_d_conv") or 4),
                            ("inner_size", int(config.get("mamba_expand", 2)) * hidden),
                            ("state_size", config.get("mamba_d_state") or 16),
                            ("time_step_rank", -(hidden // -16) if config.get("mamba_dt_rank", "auto") == "auto"
                             else config["mamba_dt_rank"])):
        key(f"ssm.{gguf_key}", int(value), U32)
    key("expert_count", int(config.get("num_experts", config.get("num_local_experts", 16))), U32)
    key("expert_used_count", int(config.get("num_experts_per_tok", 2)), U32)


def _mamba2_keys(config: dict, key) -> None:
    """Granite 4's hybrid's config.json as llama.cpp's converter writes it: a KV head count per layer (0
    in the Mamba2 layers: layer_types "mamba", transformers' "linear_attention"), the Mamba2 sizes, the
    shared MLP's width and, with Mamba2 layers, RoPE off (and the context it leaves unbounded). What
    llama.cpp's granitehybrid does not run is refused: experts (their checkpoints are read as the GGUF
    the converter writes), biases on the Mamba2 linears, heads of another width than inner / heads."""
    if int(config.get("num_local_experts") or 0):
        raise ValueError("lowtune reads a GraniteMoeHybrid checkpoint with experts as the GGUF that llama.cpp's "
                         "convert_hf_to_gguf.py writes, not as a Hugging Face directory; convert it first")
    if config.get("mamba_proj_bias"):
        raise ValueError("config.json asks for biases on the Mamba2 linears (mamba_proj_bias), which llama.cpp's "
                         "granitehybrid does not run (and so lowtune, which follows it)")
    n_layers, hidden, kv = int(config["num_hidden_layers"]), int(config["hidden_size"]), int(
        config.get("num_key_value_heads") or config["num_attention_heads"])
    types = config.get("layer_types") or config.get("layers_block_type") or ["mamba"] * n_layers
    mamba = [t in ("mamba", "linear_attention") for t in types[:n_layers]]
    inner, heads = int(config.get("mamba_expand", 2)) * hidden, int(config["mamba_n_heads"])
    if config.get("mamba_d_head", "auto") not in ("auto", inner // heads):
        raise ValueError(f"config.json's mamba_d_head {config['mamba_d_head']} is not the Mamba2 width {inner} "
                         f"over {heads} heads, which llama.cpp's granitehybrid takes")
    key("attention.head_count_kv", [0 if m else kv for m in mamba], (ARRAY, I32))
    for gguf_key, value in (("conv_kernel", config.get("mamba_d_conv", 4)), ("state_size", config["mamba_d_state"]),
                            ("group_count", config.get("mamba_n_groups", 1)), ("inner_size", inner),
                            ("time_step_rank", heads)):
        key(f"ssm.{gguf_key}", int(value), U32)
    if config.get("shared_intermediate_size"):
        key("expert_shared_feed_forward_length", int(config["shared_intermediate_size"]), U32)
    if any(mamba):
        if config.get("position_embedding_type") == "rope":
            raise ValueError("config.json asks for RoPE in a Granite 4 hybrid with Mamba2 layers; llama.cpp's "
                             "converter switches it off there (and so lowtune, which follows it)")
        key("rope.scaling.finetuned", False, BOOL)
        key("context_length", 2 ** 20, U32)


def _mamba2_config(c, cfg: dict, tensors: Collection[str]) -> None:
    """The GraniteMoeHybrid config.json keys of model config `c` (the inverse of _mamba2_keys), into cfg."""
    m = c.ssm
    if m is None or m.inner % c.dim or c.ssm_layers and not c.no_rope:
        raise ValueError(f"{c.arch} without Mamba2 layers, with RoPE beside them or a Mamba2 width that is no "
                         "multiple of the model's has no GraniteMoeHybrid config")
    cfg.update({"layer_types": ["linear_attention" if c.is_ssm(i) else "full_attention" for i in range(c.n_layers)],
                "mamba_n_heads": m.heads, "mamba_n_groups": m.groups, "mamba_d_state": m.state,
                "mamba_d_head": m.head_dim, "mamba_d_conv": m.conv_kernel, "mamba_expand": m.inner // c.dim,
                "mamba_chunk_size": 256, "mamba_proj_bias": False,
                "mamba_conv_bias": any(n.endswith("ssm_conv1d.bias") for n in tensors),
                "position_embedding_type": None if c.no_rope else "rope", "num_local_experts": 0,
                "num_experts_per_tok": 0, "shared_intermediate_size": c.ffn_dim})


def _delta_net_keys(config: dict, key) -> None:
    """Qwen3.5's Gated DeltaNet keys as llama.cpp's converter writes them: the convolution's width, the
    q/k heads and their width, the value heads and their total width, and which layers are DeltaNets
    (layer_types "linear_attention", else all but every full_attention_interval-th)."""
    n_layers, every = int(config["num_hidden_layers"]), int(config.get("full_attention_interval", 4))
    types = config.get("layer_types") or ["full_attention" if (i + 1) % every == 0 else "linear_attention"
                                          for i in range(n_layers)]
    key("ssm.conv_kernel", int(config["linear_conv_kernel_dim"]), U32)
    key("ssm.state_size", int(config["linear_key_head_dim"]), U32)
    key("ssm.group_count", int(config["linear_num_key_heads"]), U32)
    key("ssm.time_step_rank", int(config["linear_num_value_heads"]), U32)
    key("ssm.inner_size", int(config["linear_value_head_dim"]) * int(config["linear_num_value_heads"]), U32)
    key("attention.recurrent_layers", [t == "linear_attention" for t in types[:n_layers]], (ARRAY, BOOL))
    key("full_attention_interval", every, U32)


def _short_conv_keys(config: dict, key) -> None:
    """LFM2's config.json as llama.cpp's converter writes it: the norms' epsilon (norm_eps), the FFN
    width its block_* keys make of intermediate_size, a KV head count per layer (0 in the
    convolution layers: layer_types "conv") and the convolution's width (conv_L_cache). Biases on
    the convolution's linears and kernel (conv_bias) are refused: llama.cpp's lfm2 has none."""
    if config.get("conv_bias"):
        raise ValueError("config.json asks for biases in the short convolutions (conv_bias), which llama.cpp's "
                         "lfm2 does not run (and so lowtune, which follows it)")
    key("attention.layer_norm_rms_epsilon", float(config.get("norm_eps", 1e-5)), F32)
    ffn = int(config.get("block_ff_dim") or config["intermediate_size"])
    if config.get("block_auto_adjust_ff_dim", True):
        ffn = int(2 * ffn / 3)
        if config.get("block_ffn_dim_multiplier") is not None:
            ffn = int(float(config["block_ffn_dim_multiplier"]) * ffn)
        multiple = int(config.get("block_multiple_of", 256))
        ffn = multiple * ((ffn + multiple - 1) // multiple)
    key("feed_forward_length", ffn, U32)
    n_layers, kv = int(config["num_hidden_layers"]), int(config.get("num_key_value_heads") or 0)
    types = config.get("layer_types")
    if types is None:
        attention = config.get("full_attn_idxs")
        types = ["full_attention" if attention is None or i in attention else "conv" for i in range(n_layers)]
    key("attention.head_count_kv", [0 if t == "conv" else kv for t in types[:n_layers]], (ARRAY, I32))
    key("shortconv.l_cache", int(config.get("conv_L_cache", 3)), U32)


# Granite's scales: GGUF key, config.json key (ModelConfig: attn_scale, embedding_scale,
# residual_scale, logit_scale)
_MULTIPLIERS = (("attention.scale", "attention_multiplier"), ("embedding_scale", "embedding_multiplier"),
                ("residual_scale", "residual_multiplier"), ("logit_scale", "logits_scaling"))


# YaRN's parameters llama.cpp reads from a mistral3 file: GGUF key, rope_parameters key
_YARN_KEYS = (("rope.scaling.yarn_beta_fast", "beta_fast"), ("rope.scaling.yarn_beta_slow", "beta_slow"),
              ("rope.scaling.yarn_log_multiplier", "mscale_all_dim"), ("attention.temperature_scale",
                                                                       "llama_4_scaling_beta"))


def _check_yarn(rope: dict, fam: Family) -> None:
    """YaRN as llama.cpp runs it: the factor, the original context, and for most families the
    defaults for the rest (its beta_fast 32, beta_slow 1, magnitude 1 + 0.1 ln factor, truncated
    correction range); Ministral 3's file also gives the betas, the log multiplier (mscale_all_dim,
    with mscale 1) and the attention temperature. A config that sets others is refused."""
    if not rope.get("factor") or not rope.get("original_max_position_embeddings"):
        raise ValueError("YaRN rope_scaling without a factor and original_max_position_embeddings is not "
                         "supported (llama.cpp's converter needs both)")
    fixed = (("mscale", 1.0), ("truncate", True)) if fam.yarn_keys else \
        (("beta_fast", 32), ("beta_slow", 1), ("mscale", None), ("mscale_all_dim", None), ("truncate", True))
    odd = {k: rope[k] for k, default in fixed if rope.get(k) is not None and rope[k] != default}
    log_mul = float(rope.get("mscale_all_dim") or 0.0) if fam.yarn_keys else 0.0
    attn = rope.get("attention_factor")
    if attn is not None and abs(float(attn) - yarn_magnitude(float(rope["factor"]), log_mul)) > 1e-6:
        odd["attention_factor"] = attn
    if odd:
        takes = ("the betas, mscale_all_dim and llama_4_scaling_beta, with mscale 1" if fam.yarn_keys
                 else "beta_fast 32, beta_slow 1 and 1 + 0.1 ln factor")
        raise ValueError(f"YaRN with {odd} differs from what llama.cpp runs for {fam.arch} ({takes}), so "
                         "lowtune, which follows it, refuses this checkpoint")


def _check_nope_layers(config: dict, fam: Family, n_layers: int) -> None:
    """SmolLM3 leaves RoPE out of every nope_period-th layer, as llama.cpp fixes it for the
    architecture (the file cannot say otherwise), with no sliding window; a config that asks for
    other layers, or for windows, is refused."""
    want = [int(fam.rotates(i)) for i in range(n_layers)]
    got = config.get("no_rope_layers")
    if got is None and config.get("no_rope_layer_interval", fam.nope_period) != fam.nope_period:
        got = [int((i + 1) % int(config["no_rope_layer_interval"]) != 0) for i in range(n_layers)]
    if got is not None and [int(x) for x in got[:n_layers]] != want:
        raise ValueError(f"config.json's no_rope_layers differ from every {fam.nope_period}th layer without "
                         f"RoPE, the only {fam.arch} pattern llama.cpp runs (and so lowtune, which follows it)")
    if config.get("use_sliding_window") and config.get("sliding_window"):
        raise ValueError(f"config.json asks for a sliding window, which llama.cpp's {fam.arch} does not have "
                         "(and so lowtune, which follows it)")


def _check_query_scale(config: dict, fam: Family, head_dim: int) -> None:
    """Gemma scales queries by query_pre_attn_scalar^-1/2; llama.cpp (and so lowtune) by
    1/sqrt(head_dim), or 1/sqrt(D/H) for the 27B models. A config that asks otherwise is refused."""
    n_layers, hidden, n_head = (int(config[k]) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads"))
    ours = hidden // n_head if fam.wide_query_scale_layers and n_layers == fam.wide_query_scale_layers else head_dim
    if float(config["query_pre_attn_scalar"]) != float(ours):
        raise ValueError(f"query_pre_attn_scalar {config['query_pre_attn_scalar']} differs from the "
                         f"{ours} that llama.cpp's {fam.arch} uses for this model size; lowtune follows "
                         "llama.cpp (which runs its exports), so this checkpoint is not supported")


def generated_tensors(config: dict) -> dict[str, list[float]]:
    """The GGUF tensors llama.cpp's converter builds from config.json: rope_freqs (Llama 3.1's
    rope scaling), rope_factors_long/short (LongRoPE). {} when the config asks for neither."""
    config = _text_config(config)
    rope, _ = _rope(config)
    kind = rope.get("rope_type", rope.get("type"))
    if kind == "proportional":  # (Gemma 4's global layers)
        return {"rope_freqs.weight": _gemma4_rope_freqs(config)}
    if kind in ("longrope", "su") and rope.get("long_factor"):
        return {"rope_factors_long.weight": [float(x) for x in rope["long_factor"]],
                "rope_factors_short.weight": [float(x) for x in rope["short_factor"]]}
    factors = llama3_rope_factors(config)
    return {} if factors is None else {"rope_freqs.weight": factors}


def llama3_rope_factors(config: dict) -> list[float] | None:
    """rope_freqs.weight values [head_dim/2] for Llama-3.1 style rope scaling (per-frequency
    divisors that leave high frequencies alone, divide low ones by `factor` and blend in
    between), or None when config.json asks for no such scaling."""
    rs, _ = _rope(_text_config(config))
    if rs.get("rope_type", rs.get("type")) != "llama3":
        return None
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    base = float(rs.get("rope_theta", 10000.0))
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


# ---- GGUF metadata -> config.json ----------------------------------------------------------------

def _f32(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.9999997e-06)."""
    return float(f"{x:.7g}")


# Biases each HF class can hold: config flag -> the layer tensors it switches on together (the
# HF module then has all of them: the ones GGUF lacks are written as zeros). "" : always there.
_ATTN_BIASES = {"attention_bias": ("attn_q", "attn_k", "attn_v", "attn_output")}
_LLAMA_BIASES = {**_ATTN_BIASES, "mlp_bias": ("ffn_gate", "ffn_up", "ffn_down")}
_HF_BIASES: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": _LLAMA_BIASES, "smollm3": _LLAMA_BIASES, "granite": _LLAMA_BIASES, "exaone": _LLAMA_BIASES,
    "arcee": {**_ATTN_BIASES, "mlp_bias": ("ffn_up", "ffn_down")},
    "phi2": {"": ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_up",
                  "ffn_down")},
    "starcoder2": {"use_bias": ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_up",
                                "ffn_down")}, "ernie4_5": {}, "mistral3": {},
    "qwen2": {"": ("attn_q", "attn_k", "attn_v")}, "qwen3": _ATTN_BIASES, "phi3": {},
    "gemma": _ATTN_BIASES, "gemma2": _ATTN_BIASES, "gemma3": _ATTN_BIASES, "gemma3n": {}, "gemma4": {},
    "olmo2": _ATTN_BIASES,
    "glm4": {"attention_bias": ("attn_q", "attn_k", "attn_v")}, "exaone4": {}, "command-r": _ATTN_BIASES,
    "cohere2": {}, "seed_oss": {"attention_bias": ("attn_q", "attn_k", "attn_v"),
                                "attention_out_bias": ("attn_output",)}, "hunyuan-dense": _ATTN_BIASES,
    "nemotron": {"": ("attn_norm", "ffn_norm"), **_ATTN_BIASES, "mlp_bias": ("ffn_up", "ffn_down")},
    "jais2": {"": ("attn_norm", "ffn_norm"), **_ATTN_BIASES, "mlp_bias": ("ffn_up", "ffn_down")},
    "apertus": _ATTN_BIASES, "lfm2": {}, "granitehybrid": {}, "qwen35": {}, "minicpm3": {}, "olmo": {}, "bitnet": {},
    "nemotron_h": {},
    "stablelm": {"use_qkv_bias": ("attn_q", "attn_k", "attn_v")},
    "gptneox": {"": ("attn_norm", "ffn_norm", "ffn_up", "ffn_down"), "attention_bias": ("attn_qkv", "attn_output")},
    "falcon": {},
    **dict.fromkeys(("gpt2", "starcoder", "bloom"), {"": ("attn_norm", "attn_qkv", "attn_output", "ffn_norm",
                                                          "ffn_up", "ffn_down")}),
    "mpt": {},
    **dict.fromkeys(("mamba", "mamba2"), {"use_conv_bias": ("ssm_conv1d",)}),
    "falcon-h1": {"attention_bias": ("attn_q", "attn_k", "attn_v", "attn_output"),
                  "mlp_bias": ("ffn_gate", "ffn_up", "ffn_down")},
}
# LayerNorms whose bias the HF class holds wherever the model has the norm (a parallel StableLM has no ffn_norm)
_HF_NORM_BIASES = {"stablelm": ("attn_norm", "ffn_norm"), "falcon": ("attn_norm", "attn_norm_2")}


# the HF classes with RoPE on part of each head (config.json's partial_rotary_factor)
_PARTIAL_ROTARY = ("phi2", "phi3", "glm4", "nemotron", "stablelm", "gptneox")

# biases outside the layers that the HF class holds (the others' lm_head has none)
_HF_GLOBAL_BIASES = {"phi2": ("output.bias", "output_norm.bias"), "starcoder2": ("output_norm.bias",),
                     **dict.fromkeys(("nemotron", "jais2", "stablelm", "gptneox", "falcon", "gpt2", "starcoder"),
                                     ("output_norm.bias",)),
                     "bloom": ("output_norm.bias", "token_embd_norm.bias")}


_MAMBA2_BIASES = ("ssm_dt.bias", "ssm_conv1d.bias")


def hf_biases(arch: str, names: Collection[str], n_layers: int) -> tuple[dict[str, bool], list[str]]:
    """(config.json bias flags, GGUF names of the biases to write as zeros) for a model whose
    GGUF tensors are `names`; a ValueError for a bias the HF class has no place for."""
    groups = _HF_BIASES[arch]
    present = {n for n in names if n.endswith(".bias") and not n.endswith("ssm_dt.bias")}  # (not a linear's:
    # Qwen3.5's DeltaNet time-step bias, a tensor of its own)
    flags, zeros, placed = {}, [], set(_HF_GLOBAL_BIASES.get(arch, ()))
    for flag, parts in groups.items():
        want = {f"blk.{i}.{p}.bias" for i in range(n_layers) for p in parts}
        on = flag == "" or bool(want & present)
        if flag:
            flags[flag] = on
        if on:
            zeros += sorted(want - present)
            placed |= want
    placed |= {n for n in present if n.endswith(_MAMBA2_BIASES)}  # (in the Mamba2 layers only: _mamba2_config)
    placed |= {n for n in present if n.endswith(tuple(f".{p}.bias" for p in _HF_NORM_BIASES.get(arch, ())))}
    stray = sorted(present - placed)
    if stray:
        raise ValueError(f"{stray[0]}: a {arch} model in Hugging Face's layout has no such bias, so "
                         "this model cannot be exported as a Hugging Face directory")
    return flags, zeros


def hf_config(model_config, metadata: Mapping, tied: bool, torch_dtype: str,
              tensors: Mapping[str, Any] | None = None) -> dict:
    """config.json of a transformers model from GGUF metadata; model_config is the resolved
    ModelConfig of that metadata (defaults filled in). tensors: the GGUF's tensor names, with the
    values of its 1-D GGUF-only tensors (rope_factors_long/short) where it has them."""
    c = model_config
    arch, fam = c.arch, c.family
    tensors = tensors or {}
    if fam.layer_widths:  # (Gemma 4's experts too: the checkpoint's names and layout, TENSOR_NAMES)
        return _gemma4_config(c, metadata, tied, torch_dtype, tensors)
    if c.n_experts:
        raise ValueError("mixture-of-experts models export as GGUF (merged, or as a GGUF LoRA) and as PEFT "
                         "adapters; a merged Hugging Face directory of one is not written")
    if fam.text_of:
        raise ValueError(f"a Hugging Face directory of {arch} ({', '.join(fam.hf_architectures)}) "
                         "holds the vision tower too, which a GGUF language model does not have; export from "
                         "the original Hugging Face directory (its vision tower is kept), or export a merged "
                         "GGUF (llama.cpp runs it with the model's mmproj file) or a PEFT adapter")
    if not fam.hf_architectures:
        raise ValueError(f"lowtune writes no Hugging Face directory of a {arch} model (no Hugging Face names for "
                         "its tensors); export it as GGUF (merged, or as a GGUF LoRA)")
    if not fam.hf_writable:
        raise ValueError(f"lowtune writes no Hugging Face directory of a {arch} model ({fam.hf_architectures[0]}: its "
                         "checkpoints' own modeling code, of which transformers has no class); export it as GGUF "
                         "(merged, or as a GGUF LoRA)")
    if fam.attention_free:
        return _ssm_config(c, metadata, tied, torch_dtype, tensors)
    if "rope_freqs.weight" in tensors:
        raise ValueError("this model scales RoPE with a rope_freqs tensor (Llama 3.1); its HF "
                         "rope_scaling cannot be recovered from the GGUF, so the HF export is refused")
    if c.rope_dim != c.head_dim and arch not in _PARTIAL_ROTARY and not fam.delta_net and not fam.mla:
        raise ValueError(f"partial RoPE (rope.dimension_count < head_dim) has no {arch} HF config")
    windows = [c.is_sliding(i) for i in range(c.n_layers)]
    cls, model_type = fam.hf_architectures[0], fam.hf_model_types[0]
    if arch == "llama" and c.sliding_window:
        cls, model_type = "MistralForCausalLM", "mistral"  # Llama has no window; Mistral is Llama with one
        if not all(windows):
            raise ValueError("a llama model with sliding and global layers has no HF config")
    if arch == "olmo2" and c.sliding_window:
        cls, model_type = fam.hf_architectures[1], fam.hf_model_types[1]  # OLMo 3 is OLMo 2 with windows
    cfg: dict[str, Any] = {"architectures": [cls], "model_type": model_type}
    for _, hf, attr, gtype, _ in CONFIG_KEYS:
        v = getattr(c, attr)
        cfg[hf] = _f32(v) if gtype == F32 else int(v)
    cfg.update({"head_dim": c.head_dim, "tie_word_embeddings": tied, "attention_dropout": 0.0,
                "initializer_range": 0.02, "use_cache": True, "torch_dtype": torch_dtype,
                "rope_theta": _f32(c.rope_theta), "rope_scaling": None})
    if fam.activation == "gelu_tanh":
        cfg["hidden_activation"] = cfg["hidden_act"] = "gelu_pytorch_tanh"
    else:
        act = c.mlp_activation or fam.activation
        cfg["hidden_act"] = act if act in ("relu2", "xielu") else "silu"
    if arch == "llama" and cls == "LlamaForCausalLM":
        cfg["pretraining_tp"] = 1
    flags, _ = hf_biases(arch, tensors, c.n_layers)
    if model_type == "mistral":
        if any(flags.values()):
            raise ValueError("a llama model with a sliding window and biases has no HF config (Mistral has no biases)")
        flags = {}
    cfg.update(flags)
    if "attention_bias" in _HF_BIASES[arch] and "attention_bias" not in cfg:  # (Mistral's flags are dropped)
        cfg["attention_bias"] = False
    if c.rope_linear_scale != 1.0:
        cfg["rope_scaling"] = {"type": "linear", "rope_type": "linear", "factor": _f32(c.rope_linear_scale)}
    if c.rope_yarn_factor:
        cfg["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", "factor": _f32(c.rope_yarn_factor),
                               "original_max_position_embeddings": c.original_context}
        if fam.yarn_keys:  # Ministral 3's: the magnitude as m(1) / m(mscale_all_dim), mscale 1
            m1, log_f = yarn_magnitude(c.rope_yarn_factor), math.log(max(c.rope_yarn_factor, 1.0))
            all_dim = (m1 / c.rope_attn_factor - 1.0) / (0.1 * log_f) if log_f else 1.0
            cfg["rope_scaling"].update({"beta_fast": _f32(c.rope_yarn_beta_fast), "mscale": 1.0,
                                        "beta_slow": _f32(c.rope_yarn_beta_slow), "mscale_all_dim": _f32(all_dim),
                                        "llama_4_scaling_beta": _f32(c.attn_temperature)})
            cfg["rope_parameters"] = {**cfg.pop("rope_scaling"), "rope_theta": _f32(c.rope_theta)}
        elif abs(c.rope_attn_factor - yarn_magnitude(c.rope_yarn_factor)) > 1e-6:
            cfg["rope_scaling"]["attention_factor"] = _f32(c.rope_attn_factor)
    elif fam.yarn_keys:  # (without rope_parameters Ministral3Config takes YaRN x16 by default)
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": _f32(c.rope_theta)}
    elif "rope_factors_long.weight" in tensors:
        orig = c.original_context
        cfg["original_max_position_embeddings"] = orig
        cfg["rope_scaling"] = {
            "type": "longrope", "rope_type": "longrope",
            "long_factor": [_f32(x) for x in tensors["rope_factors_long.weight"]],
            "short_factor": [_f32(x) for x in tensors["rope_factors_short.weight"]],
            "original_max_position_embeddings": orig}
        derived = _longrope_attn_factor({"original_max_position_embeddings": orig}, cfg)
        if abs(derived - c.rope_attn_factor) > 1e-6:
            cfg["rope_scaling"]["attention_factor"] = _f32(c.rope_attn_factor)
    elif c.rope_attn_factor != 1.0:
        raise ValueError("a RoPE attention factor without LongRoPE factors has no HF config")
    if arch in _PARTIAL_ROTARY:
        cfg["partial_rotary_factor"] = c.rope_dim / c.head_dim
    if arch == "apertus":  # (without rope_parameters ApertusConfig takes Llama 3's scaling and base by default)
        scaling = cfg.pop("rope_scaling") or {"rope_type": "default"}
        cfg["rope_parameters"] = {**scaling, "rope_theta": _f32(c.rope_theta)}
    if model_type == "olmo3" or fam.altup:  # RoPE per layer type; the sliding layers' plain, maybe of its own base
        full = cfg.pop("rope_scaling") or {"rope_type": "default"}
        cfg["rope_parameters"] = {
            "full_attention": {**full, "rope_theta": _f32(c.rope_theta)},
            "sliding_attention": {"rope_type": "default", "rope_theta": _f32(c.rope_theta_swa or c.rope_theta)}}
    elif c.rope_theta_swa is not None and c.rope_theta_swa != c.rope_theta:
        if arch != "gemma3":
            raise ValueError(f"a separate RoPE base for sliding layers has no {arch} HF config")
        cfg["rope_local_base_freq"] = _f32(c.rope_theta_swa)
    # windows: every family spells them as a window and a type per layer
    if any(windows):
        cfg["sliding_window"] = int(c.sliding_window)
        if model_type != "mistral":  # Mistral's every layer slides (with layer_types, transformers reads Ministral)
            cfg["layer_types"] = ["sliding_attention" if w else "full_attention" for w in windows]
        if arch in ("qwen2", "qwen3"):
            cfg["use_sliding_window"] = True
            cfg["max_window_layers"] = windows.index(True)
            if windows != [i >= windows.index(True) for i in range(c.n_layers)]:
                raise ValueError(f"{arch}'s HF config slides the layers from one on; this model's differ")
        if arch == "gemma3" and windows == _family_windows(fam, c.n_layers):
            cfg["sliding_window_pattern"] = fam.swa_period
    else:
        cfg["sliding_window"] = None
        if arch in ("qwen2", "qwen3"):
            cfg["use_sliding_window"] = False
        if arch in ("gemma2", "gemma3", "exaone4"):
            cfg["layer_types"] = ["full_attention"] * c.n_layers
    if fam.eps_key != "attention.layer_norm_rms_epsilon":
        cfg[_LAYER_NORM_EPS.get(arch, "layer_norm_eps")] = cfg.pop("rms_norm_eps")
    if fam.altup:
        _gemma3n_config(c, cfg)
    if arch == "falcon-h1":
        _falcon_h1_config(c, cfg, tensors)
    elif arch == "nemotron_h":
        _nemotron_h_config(c, cfg, tensors)
    elif fam.mamba2:
        _mamba2_config(c, cfg, tensors)
    if fam.short_conv:  # (the inverse of _short_conv_keys; the FFN width as it is)
        if any(windows):
            raise ValueError(f"a sliding window has no {arch} HF config")
        cfg.update({"norm_eps": cfg.pop("rms_norm_eps"), "conv_bias": False, "conv_L_cache": c.conv_kernel or 3,
                    "block_auto_adjust_ff_dim": False, "sliding_window": None,
                    "layer_types": ["conv" if c.is_conv(i) else "full_attention" for i in range(c.n_layers)]})
    if fam.delta_net:  # (the inverse of _delta_net_keys; RoPE's part and M-RoPE's sections in rope_parameters)
        if any(windows):
            raise ValueError(f"a sliding window has no {arch} HF config")
        sections = [int(x) for x in metadata.get(f"{arch}.rope.dimension_sections", [])][:3]
        cfg.update({"linear_conv_kernel_dim": c.ssm_conv_kernel, "linear_key_head_dim": c.ssm_head_dim,
                    "linear_num_key_heads": c.ssm_k_heads, "linear_num_value_heads": c.ssm_v_heads,
                    "linear_value_head_dim": c.ssm_inner // c.ssm_v_heads, "sliding_window": None,
                    "layer_types": ["linear_attention" if c.is_delta(i) else "full_attention"
                                    for i in range(c.n_layers)],
                    "rope_parameters": {"rope_type": "default", "rope_theta": _f32(c.rope_theta),
                                        "partial_rotary_factor": c.rope_dim / c.head_dim,
                                        **({"mrope_section": sections, "mrope_interleaved": True} if sections
                                           else {})}})
        del cfg["rope_scaling"], cfg["rope_theta"]
    if fam.mla:  # (the inverse of _latent_attention_keys; transformers' head_dim is the RoPE part's)
        cfg.update({"q_lora_rank": c.q_lora_rank or None, "kv_lora_rank": c.kv_lora_rank,
                    "qk_nope_head_dim": c.head_dim - c.rope_dim, "qk_rope_head_dim": c.rope_dim,
                    "head_dim": c.rope_dim, "v_head_dim": c.v_dim, "scale_emb": _f32(c.embedding_scale),
                    "scale_depth": _f32(c.residual_scale * math.sqrt(c.n_layers)),
                    "dim_model_base": round(c.dim / c.logit_scale)})
    if fam.logit_multiplier:
        cfg["logit_scale"] = _f32(1.0 / c.logit_scale)
    if fam.qkv_clamp:
        cfg["clip_qkv"] = _f32(c.clamp_qkv) if c.clamp_qkv else None
    if fam.multipliers:
        cfg.update({"attention_multiplier": _f32(c.query_scale), "embedding_multiplier": _f32(c.embedding_scale),
                    "residual_multiplier": _f32(c.residual_scale), "logits_scaling": _f32(c.logit_scale)})
    if arch == "ernie4_5":
        cfg["use_bias"] = False
    if fam.parallel_key:  # (GPT-NeoX, StableLM: the inverse of _parallel_keys)
        if any(n.endswith("attn_q_norm.weight") for n in tensors):
            raise ValueError(f"this {arch} model norms q and k with a LayerNorm of each head's own (StableLM 2 12B), "
                             "which lowtune writes to GGUF only; export it as GGUF (merged, or as a GGUF LoRA)")
        cfg.update(use_parallel_residual=c.parallel, qk_layernorm=False)
    if arch == "falcon":  # (the inverse of _falcon_config: 40B's layout where a layer has two norms or KV groups)
        two_norms = any(n.endswith("attn_norm_2.weight") for n in tensors)
        grouped = two_norms or c.n_kv_heads not in (1, c.n_heads)
        cfg.update(new_decoder_architecture=grouped, num_ln_in_parallel_attn=(2 if two_norms else 1) if grouped
                   else None, multi_query=c.n_kv_heads == 1, num_kv_heads=c.n_kv_heads, parallel_attn=True,
                   bias=False, alibi=False, ffn_hidden_size=c.ffn_dim, activation=cfg["hidden_act"])
        del cfg["head_dim"]  # (FalconConfig's is hidden_size / heads, a property)
    if arch in ("gpt2", "starcoder"):  # (the inverse of _gpt2_config, in the classes' own keys)
        cfg.update(n_embd=c.dim, n_layer=c.n_layers, n_head=c.n_heads, n_positions=c.context_length, n_inner=c.ffn_dim,
                   activation_function=cfg["hidden_act"], scale_attn_weights=True)
        if arch == "gpt2":
            cfg.update(n_ctx=c.context_length, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False)
        else:
            cfg["multi_query"] = True
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
                  "intermediate_size", "num_key_value_heads", "head_dim"):
            del cfg[k]
    if arch == "bloom":  # (the inverse of _bloom_config)
        cfg.update(n_layer=c.n_layers, n_head=c.n_heads, seq_length=c.context_length,
                   apply_residual_connection_post_layernorm=False, pretraining_tp=1, slow_but_exact=False)
    if arch == "mpt":  # (the inverse of _mpt_config, in MPT's own keys)
        if not c.alibi_max_bias or c.alibi_max_bias != round(c.alibi_max_bias):
            what = "learned positions in place of ALiBi" if not c.alibi_max_bias else \
                f"ALiBi's maximum bias {c.alibi_max_bias}, no whole number as alibi_bias_max is"
            raise ValueError(f"this mpt model has {what}, which MptForCausalLM does not hold; export it as GGUF "
                             "(merged, or as a GGUF LoRA)")
        cfg.update(d_model=c.dim, n_layers=c.n_layers, n_heads=c.n_heads, max_seq_len=c.context_length,
                   expansion_ratio=c.ffn_dim // c.dim, no_bias=True, attn_config={
                       "alibi": True, "alibi_bias_max": round(c.alibi_max_bias), "clip_qkv": _f32(c.clamp_qkv) or None,
                       "qk_ln": False, "softmax_scale": None})
    if fam.nope_period:  # SmolLM3: 1 where a layer rotates
        cfg["no_rope_layer_interval"] = fam.nope_period
        cfg["no_rope_layers"] = [int(fam.rotates(i)) for i in range(c.n_layers)]
        cfg["use_sliding_window"] = False
    if arch in ("gemma2", "gemma3"):
        cfg["query_pre_attn_scalar"] = round(1.0 / c.query_scale ** 2)
        cfg["final_logit_softcapping"] = _f32(c.final_softcap) if c.final_softcap else None
        cfg["attn_logit_softcapping"] = _f32(c.attn_softcap) if c.attn_softcap else None
    return {**cfg, **_token_ids(metadata, c.vocab_size)}


def _token_ids(metadata: Mapping, vocab_size: int) -> dict:
    """config.json's bos, eos and pad ids from the GGUF's tokenizer keys (pad None where it has none)."""
    ids = {"pad_token_id": None}  # not the class default (Phi-3's is 32000, past a small vocab)
    for key, tk in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                    ("pad_token_id", "padding_token_id")):
        v = metadata.get(f"tokenizer.ggml.{tk}")
        if v is not None and 0 <= int(v) < vocab_size:  # Phi-3's converter writes a pad id past the vocab
            ids[key] = int(v)
    return ids


def _gemma4_config(c, metadata: Mapping, tied: bool, torch_dtype: str, tensors: Mapping[str, Any]) -> dict:
    """Gemma4ForCausalLM's config.json of a gemma4 model (the inverse of _gemma4_keys): the sliding layers' head,
    KV heads and RoPE part, the global layers' in per_layer_config, their "proportional" RoPE's part from
    rope_freqs (the pairs it rotates), values from k_proj where the global layers have no v_proj, the 26B-A4B's
    experts; a model transformers' class cannot hold is refused."""
    n, refuse = c.n_layers, "; export it as GGUF (merged, or as a GGUF LoRA)"
    swa = [c.is_sliding(i) for i in range(n)]
    layers = [c.at_layer(i) for i in range(n)]
    widths = {s: {(w.head_dim, w.n_kv_heads, w.rope_dim) for w, ws in zip(layers, swa) if ws == s}
              for s in (True, False)}
    if any(len(w) > 1 for w in widths.values()) or swa[-1]:
        raise ValueError("this gemma4 model's sliding or global layers differ in their widths, or its last layer "
                         f"slides, which Gemma4ForCausalLM does not hold{refuse}")
    (swa_dim, swa_kv, swa_rot), = widths[True] or {(c.head_dim, c.n_kv_heads, c.head_dim)}
    (full_dim, full_kv, full_rot), = widths[False]
    ffn = [w.ffn_dim for w in layers]
    shared = n - c.kv_layers if c.kv_layers else 0
    double = ffn != [ffn[0]] * n
    if double and ffn != [ffn[0] if i < n - shared else 2 * ffn[0] for i in range(n)]:
        raise ValueError(f"this gemma4 model's FFN widths {ffn} are not one width, twice as wide in the layers that "
                         f"reuse K/V (use_double_wide_mlp), which Gemma4ForCausalLM holds{refuse}")
    factors = tensors.get("rope_freqs.weight") or [1.0] * (full_dim // 2)
    rotated = next((i for i, f in enumerate(factors) if f != 1.0), len(factors))  # (the rest left unrotated: 1e30)
    if full_rot != full_dim or len(factors) != full_dim // 2 or any(f < 1e29 for f in factors[rotated:]):
        raise ValueError("this gemma4 model's global layers' RoPE (rope_freqs, rope.dimension_count) is not "
                         f"transformers' \"proportional\" RoPE on a part of each head{refuse}")
    if any(t.endswith("ffn_gate_exps.weight") for t in tensors):
        raise ValueError("this gemma4 model keeps its experts' gate and up apart (ffn_gate_exps, ffn_up_exps), which "
                         f"Gemma4ForCausalLM holds in one gate_up_proj{refuse}")
    own_kv = [i for i in range(n - shared) if not swa[i]]
    k_eq_v = {f"blk.{i}.attn_v.weight" not in tensors for i in own_kv}
    if len(k_eq_v) > 1 or any(f"blk.{i}.attn_v.weight" not in tensors for i in range(n - shared) if swa[i]):
        raise ValueError("this gemma4 model's layers of one kind differ in having attn_v, which Gemma4ForCausalLM "
                         f"holds for all of them or for none of its global layers{refuse}")
    sliding = {"rope_type": "default", "rope_theta": _f32(c.rope_theta_swa or c.rope_theta)}
    if swa_rot != swa_dim:
        sliding["partial_rotary_factor"] = swa_rot / swa_dim
    cfg = {"architectures": [c.family.hf_architectures[0]], "model_type": c.family.hf_model_types[0],
           "vocab_size": c.vocab_size, "hidden_size": c.dim, "intermediate_size": ffn[0], "num_hidden_layers": n,
           "num_attention_heads": c.n_heads, "num_key_value_heads": swa_kv, "head_dim": swa_dim,
           "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": c.context_length,
           "rms_norm_eps": _f32(c.norm_eps), "tie_word_embeddings": tied, "torch_dtype": torch_dtype,
           "initializer_range": 0.02, "use_cache": True, "attention_bias": False, "attention_dropout": 0.0,
           "sliding_window": int(c.sliding_window) or None,
           "layer_types": ["sliding_attention" if s else "full_attention" for s in swa],
           "per_layer_config": {str(i): {"head_dim": full_dim, "num_key_value_heads": full_kv}
                                for i in range(n) if not swa[i]},
           "rope_parameters": {"sliding_attention": sliding, "full_attention": {
               "rope_type": "proportional", "rope_theta": _f32(c.rope_theta),
               "partial_rotary_factor": 2 * rotated / full_dim}},
           "final_logit_softcapping": _f32(c.final_softcap) if c.final_softcap else None,
           "vocab_size_per_layer_input": c.vocab_size, "hidden_size_per_layer_input": c.per_layer_dim,
           "num_kv_shared_layers": shared, "use_double_wide_mlp": double, "attention_k_eq_v": k_eq_v == {True},
           "enable_moe_block": bool(c.n_experts), "num_experts": c.n_experts or None,
           "top_k_experts": c.n_experts_used or None, "moe_intermediate_size": c.expert_ffn_dim or None}
    return {**cfg, **_token_ids(metadata, c.vocab_size)}


def _ssm_config(c, metadata: Mapping, tied: bool, torch_dtype: str, tensors: Collection[str]) -> dict:
    """config.json of Mamba or Mamba-2 (the inverse of _ssm_keys)."""
    fam, m = c.family, c.ssm
    if m.inner % c.dim:
        raise ValueError(f"a {c.arch} mixer {m.inner} wide, no multiple of the model's {c.dim}, has no "
                         f"{fam.hf_architectures[0]} config")
    cfg = {"architectures": [fam.hf_architectures[0]], "model_type": fam.hf_model_types[0], "hidden_size": c.dim,
           "num_hidden_layers": c.n_layers, "vocab_size": c.vocab_size, "pad_vocab_size_multiple": 1,
           "layer_norm_epsilon": _f32(c.norm_eps), "tie_word_embeddings": tied, "torch_dtype": torch_dtype,
           "state_size": m.state, "conv_kernel": m.conv_kernel, "expand": m.inner // c.dim,
           "intermediate_size": m.inner, "use_bias": False, "hidden_act": "silu", "use_cache": True,
           "use_conv_bias": any(n.endswith("ssm_conv1d.bias") for n in tensors)}
    if fam.mamba2:
        cfg.update(num_heads=m.heads, head_dim=m.head_dim, n_groups=m.groups, rms_norm=True, norm_before_gate=False,
                   chunk_size=256)
    elif m.dt_b_c_rms:
        raise ValueError("a Mamba model whose dt, B and C are RMS-normed (Falcon-Mamba) has no MambaForCausalLM "
                         "config; export it as GGUF (merged, or as a GGUF LoRA)")
    else:
        cfg["time_step_rank"] = m.dt_rank
    return {**cfg, **_token_ids(metadata, c.vocab_size)}
