"""The tiny random models of every family that lowtune runs, shared by the family tests: each built
by Hugging Face transformers with its optional parts switched on (biases, q/k norms, soft-caps,
sliding windows shorter than the test sequences, LongRoPE with its attention factor, Phi-3's fused
tensors), saved as safetensors with a small SentencePiece tokenizer and a chat template, and
converted to GGUF F32 by llama.cpp's own convert_hf_to_gguf.py (from llama-cpp-python's sdist,
unpacked by tools/setup_env.sh). "mistral" is Mistral's sliding window on the llama architecture:
the converter drops the window, so build_family_models puts `llama.attention.sliding_window` back
into the file, as a file that asks for it would have it; the "gemma" file gets its vocabulary's
end-of-turn id in place of the converter's fixed one.

conftest.py's session fixture `family_models` builds them once: {name: Tiny(name, hf_dir, gguf)}.
Also here: llama.cpp's perplexity and greedy decoding, as the family tests compare against them.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
import types
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from lowtune.gguf_io import GGUFFile, write_gguf

NAMES = ("llama", "mistral", "smollm3", "arcee", "granite", "ernie4_5", "mistral3", "glm4", "command-r", "cohere2",
         "qwen2", "qwen3", "phi2", "starcoder2", "phi3", "phi4", "gemma", "gemma2", "gemma3", "olmo2", "olmo3",
         "exaone4", "seed_oss", "hunyuan-dense", "nemotron", "apertus", "qwen2vl", "qwen3vl", "lfm2", "gemma3n",
         "gemma4", "granitehybrid", "qwen35", "nemotron_h", "minicpm3", "olmo", "bitnet", "mamba2", "falcon-h1",
         "mamba", "gpt2", "starcoder", "bloom", "mpt", "gptneox", "gptneox-seq", "stablelm", "stablelm2-12b", "falcon",
         "falcon-40b", "jais2")
# Families whose checkpoints ship their own modeling code (transformers has no class for them; EXAONE 3's it runs
# as Llama): their tiny models are config.json and random safetensors under the checkpoints' own names
# (remote_code_checkpoint), converted by llama.cpp's converter, and llama.cpp runs their reference logits
REMOTE_CODE_NAMES = ("exaone", "internlm2", "baichuan", "qwen", "orion", "xverse", "plamo2", "pangu-embedded",
                     "plamo3", "chatglm", "deci", "openelm", "jais", "codeshell", "refact", "nanbeige", "plamo",
                     "maincoder", "plm")
# ... and their mixtures of experts (tests/test_moe.py): remote_code_moe_checkpoint (Arctic's last: its converter
# updates the class-wide tensor map for Arctic, which the conversions after it in the one process would read)
REMOTE_CODE_MOE_NAMES = ("deepseek", "grok", "bailingmoe", "bailingmoe2", "grovemoe", "arctic")
BAICHUAN_LAYERS = 32  # llama.cpp rotates Baichuan's q and k only at Baichuan 2 7B's 32 layers (13B's 40: ALiBi)
# PLaMo 2: Mamba and attention layers in turn (its mamba_step of 2), 8 Mamba heads of the attention heads' width
PLAMO2 = dict(num_hidden_layers=4, mamba_step=2, mamba_num_heads=8, mamba_d_state=16, mamba_d_conv=4)
# PLaMo 3: sliding and global layers in turn (its published pattern is 8)
PLAMO3 = dict(num_hidden_layers=4, sliding_window_pattern=2)
# RWKV: transformers has no class for RWKV-7 (its RwkvForCausalLM is RWKV-4): its tiny model is config.json and
# random safetensors under fla-hub's names (rwkv_checkpoint), with RWKV's world vocabulary, and llama.cpp runs
# its reference logits
RWKV_NAMES = ("rwkv7", "rwkv6", "arwkv7", "rwkv6qwen2")
WORLD_VOCAB_NAMES = ("rwkv7", "rwkv6")  # (ARWKV-7's and QRWKV6's are Qwen2's: the tiny models' SentencePiece one)
RWKV7 = dict(hidden_size=128, head_dim=64, num_hidden_layers=3, intermediate_size=256, decay_low_rank_dim=32,
             a_low_rank_dim=32, v_low_rank_dim=16, gate_low_rank_dim=48)  # (heads of 64: ggml's wkv7 rows)
# RWKV-6's (its converter fixes the token-shift mix's width at 32 and the decay's at 64 below 4096 channels),
# the residual stream halved after every 2nd layer
RWKV6 = dict(hidden_size=128, head_size=64, num_hidden_layers=3, intermediate_size=256, rescale_every=2)
RWKV6_MIX, RWKV6_DECAY = 32, 64
# ARWKV-7's (its converter fixes the low-rank widths: 64, 64, 32 and no gate where the checkpoint has none)
ARWKV7 = dict(hidden_size=128, head_size=64, num_hidden_layers=3, intermediate_size=256, wkv_has_gate=False,
              wkv_version=7)
ARWKV7_RANKS = (64, 64, 32, 0)
# QRWKV6's: Qwen2's heads of 64, one K/V head, RWKV-6's widths
QRWKV6 = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=3,
              intermediate_size=256)
RWKV_CHAT = ("{{ bos_token }}{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n"
             "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
# Deci's tiny model (Llama-3.1-Nemotron's block_configs): each layer's query heads per KV head (None: no attention)
# and whether a linear takes attention's place, and its FFN multiplier (None: no FFN; the converter's width is
# 2/3 of it times the width, rounded up to 256): attention of 2 KV heads, neither attention nor FFN (not last:
# llama.cpp fails on a last layer without tensors), a linear, an FFN alone, attention of 1 KV head
DECI_BLOCKS = ((2, False, 1.0), (None, False, None), (None, True, 1.0), (None, False, 7.0), (4, False, 7.0))
# OpenELM's tiny model: each layer's query heads, KV heads and FFN multiplier (its width that times D, a multiple of
# OPENELM_FFN_DIVISOR)
OPENELM_LAYERS = ((2, 1, 1.0), (4, 2, 2.0), (4, 1, 3.0))
OPENELM_FFN_DIVISOR = 64
# (llama.cpp ignores a llama window: mistral's tiny model left out)
LLAMACPP_NAMES = tuple(n for n in NAMES if n != "mistral") + REMOTE_CODE_NAMES + RWKV_NAMES
# (StableLM 2 12B's per-head q/k norms: read from GGUF, its HF directories refused)
GGUF_ONLY_NAMES = ("stablelm2-12b",)
HF_NAMES = tuple(n for n in NAMES if n not in GGUF_ONLY_NAMES)
# mixture-of-experts models, read as GGUF only (tests/test_moe.py)
MOE_NAMES = ("qwen3moe", "mixtral", "olmoe", "qwen2moe", "granitemoe", "gpt-oss", "ernie4_5-moe", "qwen3vlmoe",
             "lfm2moe", "deepseek2", "deepseek2-lite", "deepseek3", "glm4moe", "granitehybridmoe", "qwen35moe",
             "qwen3next", "llama4", "phimoe", "dots1", "hunyuan-moe", "minimax-m2", "exaone-moe", "nemotron_h_moe",
             "jamba", "cohere2moe", "kimi-linear", "gemma4moe", "hy_v3", "deepseek32", "glm-dsa", "afmoe", "mistral4",
             "mimo2", "laguna", "mellum", "dbrx")
# MiniCPM: transformers has no class for it, so its tiny model is a Granite model of the same
# function (Granite's scales set to MiniCPM's) saved with MiniCPM's config.json for the converter
MINICPM = {"scale_emb": 3.0, "scale_depth": 1.4, "dim_model_base": 16}
EXPERTS, EXPERTS_USED = 4, 2
MPT_CLIP_QKV = 1.5  # MPT's tiny model: q/k/v clamped to ± this, inside their spread
DBRX_CLIP_QKV = 1.5  # DBRX's, as MPT's
BLOOM_HEADS = 6     # BLOOM's tiny model: a head count that is not a power of two (ALiBi's slopes)
WINDOW = 16          # sliding window of the tiny models: shorter than every test sequence
SEQ = 64             # tokens of the logits comparison and of each perplexity window
PHI3_ORIG_CONTEXT = 32  # LongRoPE: SEQ > this, so the long factors are the ones in use
# LongRoPE's magnitude at 4 × PHI3_ORIG_CONTEXT, as llama.cpp's converter writes it for Phi-3 and PhiMoE
# (PhiMoE's config gives its own long_mscale and short_mscale, which llama.cpp does not read)
PHI3_ATTN_FACTOR = math.sqrt(1 + math.log(4) / math.log(PHI3_ORIG_CONTEXT))
V, D, F, H, HKV = 512, 64, 128, 4, 2
VL_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=D,
                 deepstack_visual_indexes=[0, 1])  # Qwen3-VL's tiny vision tower
LFM2_LAYERS = ("conv", "full_attention", "conv", "full_attention")  # LFM2's short convolutions among attention
CONV_KERNEL = 3
# DeepSeek's multi-head latent attention: the widths of the tiny models' latents and heads
# (the converter reads num_key_value_heads as the heads of kv_b, as DeepSeek's configs give it)
MLA = dict(kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, num_key_value_heads=H)
DSA_TOP_K = 16  # the keys DeepSeek-V3.2's lightning indexer keeps for each query (DeepSeek Sparse Attention)
GEMMA3N_LAYERS = 22  # llama.cpp's Gemma 3n shares K/V from layer 20 on
GEMMA3N_FFN = 1024   # its sparse FFN gates let 5 % through: 51 values a token, not a noisy 6
# Gemma 4: sliding and global layers in turn, the last two reusing layer 2's (sliding) and 3's (global) K/V,
# as llama.cpp takes them (the two layers before the first that reuses); the global layers' heads twice
# as wide, one KV head whose values are its keys' projection; per-layer inputs 16 wide
GEMMA4 = dict(num_hidden_layers=6, layer_types=["sliding_attention", "full_attention"] * 3, num_kv_shared_layers=2,
              head_dim=16, global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
              hidden_size_per_layer_input=16, vocab_size_per_layer_input=V, use_double_wide_mlp=True)
# Gemma 4 26B-A4B's layout: no per-layer inputs nor shared K/V, experts in every layer
GEMMA4_MOE = dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2, head_dim=16,
                  global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
                  hidden_size_per_layer_input=0, vocab_size_per_layer_input=V, num_kv_shared_layers=0,
                  enable_moe_block=True, num_experts=EXPERTS,
                  top_k_experts=EXPERTS_USED, moe_intermediate_size=32)
# Granite 4's hybrids: Mamba2 layers around an attention layer; 8 heads of 16 in two groups, a state of 16
GRANITE_HYBRID_LAYERS = ("mamba", "attention", "mamba")
# BitNet: rows of 256, which TQ1_0's and TQ2_0's blocks take
BITNET_D = 256
SSM = dict(mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=16, mamba_d_head=16, mamba_d_conv=4, mamba_expand=2)
# Falcon-H1's multipliers, none of them 1
FALCON_H1_MULTIPLIERS = dict(embedding_multiplier=2.0, lm_head_multiplier=0.5, mlp_multipliers=[0.8, 1.2],
                             key_multiplier=0.7, attention_in_multiplier=0.9, attention_out_multiplier=1.1,
                             ssm_in_multiplier=0.9, ssm_out_multiplier=1.1, ssm_multipliers=[0.5, 1.5, 0.8, 1.2, 0.6])
# Nemotron-H: each layer a Mamba2 mixer (M), an MLP (-) or attention (*), as its configs' hybrid_override_pattern;
# Nemotron-H MoE's: experts (E) in place of the MLPs
NEMOTRON_H_PATTERN = "M-*-M-"
NEMOTRON_H_MOE_PATTERN = NEMOTRON_H_PATTERN.replace("-", "E")
# Qwen3.5's Gated DeltaNets: twice as many value heads as q/k heads (the converter tiles them), a
# convolution of 4, every 4th layer attention
QWEN35_DELTA = dict(linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                    linear_num_key_heads=2, linear_num_value_heads=4)
# Kimi Linear's Kimi Delta Attention: H heads of 32 (ssm_f_b's and ssm_g_b's rows a block wide), a convolution
# of 4, every 4th layer latent attention
KIMI_KDA = dict(linear_conv_kernel_dim=4, linear_head_dim=32, linear_num_heads=H)
KIMI_LAYERS = ("linear_attention", "linear_attention", "linear_attention", "full_attention")
# Laguna: the first of every 4 layers global, the others sliding
LAGUNA_LAYERS = ("full_attention", "sliding_attention", "sliding_attention", "sliding_attention")
# MiMo-V2-Flash: global and sliding layers, the sliding ones with twice the KV heads and a sink per head
MIMO2_LAYERS = ("full_attention", "sliding_attention", "sliding_attention", "full_attention")

PHI_CHAT = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
GEMMA_CHAT = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
              "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


# ----------------------------------------------------------------------------------------------
# the tiny models: transformers -> safetensors -> llama.cpp's converter -> GGUF


def hf_model(name: str):
    """A transformers model of family `name` with random weights (fp32, eager attention)."""
    import transformers as tf
    common = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_attention_heads=H,
                  num_key_value_heads=HKV, max_position_embeddings=256, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, pad_token_id=None)
    make = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
            **common, num_hidden_layers=2, head_dim=16, attention_bias=True, mlp_bias=True,
            tie_word_embeddings=False)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(
            **common, num_hidden_layers=2, head_dim=16, sliding_window=WINDOW, tie_word_embeddings=False)),
        # an MLP without a gate (relu²), YaRN over an original context shorter than the test sequences
        "arcee": lambda: tf.ArceeForCausalLM(tf.ArceeConfig(
            **common, num_hidden_layers=2, head_dim=16, tie_word_embeddings=False, rope_parameters={
                "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32})),
        # four layers: the fourth has no RoPE
        "smollm3": lambda: tf.SmolLM3ForCausalLM(tf.SmolLM3Config(**common, num_hidden_layers=4)),
        "granite": lambda: tf.GraniteForCausalLM(tf.GraniteConfig(
            **common, num_hidden_layers=2, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
            embedding_multiplier=2.0, residual_multiplier=0.7, attention_multiplier=0.3, logits_scaling=1.5)),
        "ernie4_5": lambda: tf.Ernie4_5ForCausalLM(tf.Ernie4_5Config(**common, num_hidden_layers=2, head_dim=32)),
        # YaRN with its own betas and log multiplier, and the attention temperature, over an
        # original context shorter than the test sequences
        "mistral3": lambda: tf.Ministral3ForCausalLM(tf.Ministral3Config(
            **common, num_hidden_layers=2, head_dim=16, tie_word_embeddings=False, rope_parameters={
                "rope_type": "yarn", "type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                "original_max_position_embeddings": 16, "max_position_embeddings": 256, "beta_fast": 16.0,
                "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5, "llama_4_scaling_beta": 0.5})),
        # YaRN over an original context shorter than the test sequences
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(
            **common, num_hidden_layers=2, rope_parameters={
                "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32})),
        "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, num_hidden_layers=2, head_dim=32)),
        # LayerNorm with biases, attention and an ungated GELU MLP in parallel, RoPE on half of each head,
        # biases everywhere (the head's too); llama.cpp's converter writes an FFN of 4 · D
        "phi2": lambda: tf.PhiForCausalLM(tf.PhiConfig(
            vocab_size=V, hidden_size=D, intermediate_size=4 * D, num_hidden_layers=2, num_attention_heads=H,
            num_key_value_heads=H, max_position_embeddings=256, layer_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                        "partial_rotary_factor": 0.5})),
        # Phi-2's layer in sequence: LayerNorm with biases, a GELU MLP without a gate, biases everywhere,
        # a tied head (llama.cpp's starcoder2 keeps no window)
        "starcoder2": lambda: tf.Starcoder2ForCausalLM(tf.Starcoder2Config(
            vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=2, num_attention_heads=H,
            num_key_value_heads=HKV, max_position_embeddings=256, norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2,
            use_bias=True, sliding_window=None, tie_word_embeddings=True)),
        # learned absolute positions, LayerNorm with biases, fused q/k/v with a bias, a GELU MLP without a
        # gate (4 · D wide, as the converter writes), a tied head
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
            vocab_size=V, n_embd=D, n_layer=2, n_head=H, n_positions=256, n_ctx=256, layer_norm_epsilon=1e-5,
            bos_token_id=1, eos_token_id=2)),
        # GPT-2's layer with multi-query attention (one K/V head), as llama.cpp's converter writes it
        "starcoder": lambda: tf.GPTBigCodeForCausalLM(tf.GPTBigCodeConfig(
            vocab_size=V, n_embd=D, n_layer=2, n_head=H, n_positions=256, layer_norm_epsilon=1e-5,
            multi_query=True, bos_token_id=1, eos_token_id=2)),
        # ALiBi over 6 heads (not a power of two: the slopes of the 2 beyond 4 interleave), the embeddings'
        # LayerNorm, fused q/k/v with a bias (head by head: the converter reorders them), a GELU MLP without
        # a gate; seq_length, as the published configs give it, is the converter's context length
        "bloom": lambda: tf.BloomForCausalLM(tf.BloomConfig(
            vocab_size=V, hidden_size=BLOOM_HEADS * 16, n_layer=2, n_head=BLOOM_HEADS, layer_norm_epsilon=1e-5,
            seq_length=256, bos_token_id=1, eos_token_id=2)),
        # ALiBi (4 heads: transformers' MPT slopes are llama.cpp's for a power of two only), q/k/v clamped, no
        # biases, a GELU MLP without a gate
        "mpt": lambda: tf.MptForCausalLM(tf.MptConfig(
            vocab_size=V, d_model=D, n_heads=H, n_layers=2, expansion_ratio=4, max_seq_len=256,
            attn_config={"alibi": True, "alibi_bias_max": 8, "clip_qkv": MPT_CLIP_QKV}, bos_token_id=1,
            eos_token_id=2)),
        # Pythia: LayerNorm with biases, attention and an ungated GELU MLP in parallel, each after its own norm
        # (use_parallel_residual), or one after the other (-seq); q, k, v fused head by head, RoPE on a
        # quarter of each head, biases but the head's; llama.cpp's GELU is the tanh form
        **{n: (lambda parallel: lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
            vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=2, num_attention_heads=H,
            max_position_embeddings=256, layer_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, hidden_act="gelu_new",
            use_parallel_residual=parallel, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})))(p)
           for n, p in (("gptneox", True), ("gptneox-seq", False))},
        # StableLM 2 1.6B: Llama's layer with LayerNorm (biases), q/k/v biases, RoPE on a quarter of each head;
        # the 12B's parallel block and LayerNorms of each head's own weight on q and k
        "stablelm": lambda: tf.StableLmForCausalLM(tf.StableLmConfig(
            **{k: v for k, v in common.items() if k != "rms_norm_eps"}, num_hidden_layers=2, layer_norm_eps=1e-5,
            use_qkv_bias=True, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})),
        "stablelm2-12b": lambda: tf.StableLmForCausalLM(tf.StableLmConfig(
            **{k: v for k, v in common.items() if k != "rms_norm_eps"}, num_hidden_layers=2, layer_norm_eps=1e-5,
            qk_layernorm=True, use_parallel_residual=True, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})),
        # Falcon 7B: one KV head, attention and an ungated GELU MLP in parallel from one LayerNorm; 40B: grouped KV
        # heads, each branch after its own norm (ln_attn, ln_mlp); an FFN of 4 · D, no biases, a tied head
        "falcon": lambda: tf.FalconForCausalLM(tf.FalconConfig(
            vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=H, layer_norm_epsilon=1e-5,
            bos_token_id=1, eos_token_id=2, activation="gelu_new", tie_word_embeddings=True)),
        "falcon-40b": lambda: tf.FalconForCausalLM(tf.FalconConfig(
            vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=H, num_kv_heads=HKV,
            new_decoder_architecture=True, layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2,
            activation="gelu_new", tie_word_embeddings=True)),
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(
            **{**common, "max_position_embeddings": 4 * PHI3_ORIG_CONTEXT}, num_hidden_layers=2,
            tie_word_embeddings=False, original_max_position_embeddings=PHI3_ORIG_CONTEXT,
            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                             "long_factor": [1.0 + 0.25 * i for i in range(8)],
                             "short_factor": [1.0 + 0.05 * i for i in range(8)]})),
        # Phi-4-mini's shape of Phi-3: RoPE on 3/4 of each head (with LongRoPE), a tied head
        "phi4": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(
            **{**common, "max_position_embeddings": 4 * PHI3_ORIG_CONTEXT}, num_hidden_layers=2,
            tie_word_embeddings=True, original_max_position_embeddings=PHI3_ORIG_CONTEXT,
            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                             "long_factor": [1.0 + 0.25 * i for i in range(6)],
                             "short_factor": [1.0 + 0.05 * i for i in range(6)]})),
        "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**common, num_hidden_layers=2, head_dim=32)),
        "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(
            **common, num_hidden_layers=2, head_dim=32, query_pre_attn_scalar=32,
            sliding_window=WINDOW, attn_logit_softcapping=3.0, final_logit_softcapping=5.0)),
        # the last layers' FFNs twice as wide, a final soft-cap
        "gemma4": lambda: tf.Gemma4ForCausalLM(tf.Gemma4TextConfig(
            **common, **GEMMA4, sliding_window=WINDOW, final_logit_softcapping=5.0)),
        # Gemma 4's experts (26B-A4B's layer) beside every layer's dense FFN, the router's scales and each
        # expert's random
        "gemma4moe": lambda: tf.Gemma4ForCausalLM(tf.Gemma4TextConfig(
            **common, **GEMMA4_MOE, sliding_window=WINDOW, final_logit_softcapping=5.0)),
        # six layers: Gemma 3's pattern makes every sixth layer global
        "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            **common, num_hidden_layers=6, head_dim=32, query_pre_attn_scalar=32,
            sliding_window=WINDOW, final_logit_softcapping=5.0,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
        # 22 layers: llama.cpp fixes Gemma 3n's K/V sharing from layer 20 on (layer 18 the sliding
        # layers', 19 the global ones') and sparse FFN gates in the first 10; its AltUp, Laurel rank
        # and per-layer width are llama.cpp's fixed ones too, and so is the final soft-cap (30)
        "gemma3n": lambda: tf.Gemma3nForCausalLM(tf.Gemma3nTextConfig(
            **{**common, "intermediate_size": GEMMA3N_FFN}, vocab_size_per_layer_input=V,
            num_hidden_layers=GEMMA3N_LAYERS, head_dim=32,
            sliding_window=WINDOW, num_kv_shared_layers=GEMMA3N_LAYERS - 20, laurel_rank=64,
            hidden_size_per_layer_input=256, activation_sparsity_pattern=[0.95] * 10 + [0.0] * (GEMMA3N_LAYERS - 10),
            layer_types=["full_attention" if i % 5 == 4 or i == GEMMA3N_LAYERS - 1 else "sliding_attention"
                         for i in range(GEMMA3N_LAYERS)],
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
        # RoPE on half of each head, q/k/v biases, gate and up fused
        "glm4": lambda: tf.Glm4ForCausalLM(tf.Glm4Config(
            **common, num_hidden_layers=2, head_dim=32, attention_bias=True, partial_rotary_factor=0.5)),
        "qwen3moe": lambda: tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
            **common, num_hidden_layers=2, head_dim=32, num_experts=EXPERTS, num_experts_per_tok=EXPERTS_USED,
            moe_intermediate_size=32, norm_topk_prob=True, tie_word_embeddings=False)),
        # Mixtral converts to the llama architecture with experts
        "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(
            **common, num_hidden_layers=2, head_dim=16, num_local_experts=EXPERTS, num_experts_per_tok=EXPERTS_USED,
            tie_word_embeddings=False)),
        # shared experts: Qwen2 MoE's behind a sigmoid gate, Granite's (with Granite's scales) ungated
        "qwen2moe": lambda: tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
            **common, num_hidden_layers=2, num_experts=EXPERTS, num_experts_per_tok=EXPERTS_USED, norm_topk_prob=False,
            moe_intermediate_size=32, shared_expert_intermediate_size=64, tie_word_embeddings=False)),
        "granitemoe": lambda: tf.GraniteMoeSharedForCausalLM(tf.GraniteMoeSharedConfig(
            **common, num_hidden_layers=2, num_local_experts=EXPERTS, num_experts_per_tok=EXPERTS_USED,
            shared_intermediate_size=64, tie_word_embeddings=False, embedding_multiplier=2.0, residual_multiplier=0.7,
            attention_multiplier=0.3, logits_scaling=1.5)),
        # biases everywhere, a sink per head, every 2nd layer global, YaRN over an original context
        # shorter than the test sequences (with llama.cpp's rounding of YaRN's ramp: truncate)
        "gpt-oss": lambda: tf.GptOssForCausalLM(tf.GptOssConfig(
            **{**common, "intermediate_size": 32}, num_hidden_layers=2, head_dim=16, num_local_experts=EXPERTS,
            num_experts_per_tok=EXPERTS_USED, sliding_window=WINDOW, tie_word_embeddings=False,
            layer_types=["sliding_attention", "full_attention"], rope_parameters={
                "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": True, "original_max_position_embeddings": 32})),
        # Phi-3's LongRoPE and biases (the LM head's too) with experts in every layer, LayerNorms and
        # sparsemixer routing made llama.cpp's (phimoe_as_llamacpp)
        "phimoe": lambda: tf.PhimoeForCausalLM(tf.PhimoeConfig(
            **{**common, "intermediate_size": 32, "max_position_embeddings": 4 * PHI3_ORIG_CONTEXT},
            num_hidden_layers=2, num_local_experts=EXPERTS, num_experts_per_tok=EXPERTS_USED, attention_bias=True,
            lm_head_bias=True, tie_word_embeddings=False, rope_parameters={
                "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": PHI3_ORIG_CONTEXT,
                "long_factor": [1.0 + 0.25 * i for i in range(8)], "short_factor": [1.0 + 0.05 * i for i in range(8)],
                "long_mscale": PHI3_ATTN_FACTOR, "short_mscale": PHI3_ATTN_FACTOR})),
        # a dense first layer, then experts with a selection bias and two shared experts (the
        # converter's shared width is intermediate_size / kv heads: 2 · 32 here, as in the 21B)
        "ernie4_5-moe": lambda: tf.Ernie4_5_MoeForCausalLM(tf.Ernie4_5_MoeConfig(
            **common, num_hidden_layers=3, moe_num_experts=EXPERTS, moe_k=EXPERTS_USED, moe_intermediate_size=32,
            moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_end_index=2, moe_layer_interval=1,
            tie_word_embeddings=False)),
        # multi-head latent attention (q through its own latent), a dense first layer, softmax routing
        # weighed × 2 and two shared experts
        "deepseek2": lambda: tf.DeepseekV2ForCausalLM(tf.DeepseekV2Config(
            **{**common, **MLA}, num_hidden_layers=3, q_lora_rank=32, n_routed_experts=EXPERTS,
            num_experts_per_tok=EXPERTS_USED, moe_intermediate_size=32, n_shared_experts=2, first_k_dense_replace=1,
            routed_scaling_factor=2.0, tie_word_embeddings=False)),
        # DeepSeek-V2-Lite's layout: q straight from x, which llama.cpp reads only at its 27 layers
        "deepseek2-lite": lambda: tf.DeepseekV2ForCausalLM(tf.DeepseekV2Config(
            **{**common, **MLA}, num_hidden_layers=27, q_lora_rank=None, n_routed_experts=EXPERTS,
            num_experts_per_tok=EXPERTS_USED, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
            tie_word_embeddings=False)),
        # DeepSeek-V3's routing: sigmoid scores, a selection bias, the best of two expert groups,
        # renormalized and weighed × 2.5; YaRN with its mscale over an original context shorter than
        # the test sequences
        "deepseek3": lambda: tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(
            **{**common, **MLA}, num_hidden_layers=3, q_lora_rank=32, n_routed_experts=EXPERTS,
            num_experts_per_tok=EXPERTS_USED, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
            n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, scoring_func="sigmoid",
            tie_word_embeddings=False, rope_parameters={
                "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
                "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32.0, "beta_slow": 1.0})),
        # MiMo-V2-Flash's layout: global and sliding layers (WINDOW, their own RoPE base, twice the KV heads and a
        # sink per head), RoPE on half of each head, values narrower than keys and scaled, a dense first layer,
        # then sigmoid routing with a selection bias, renormalized (mimo2_converter_layout writes the published
        # checkpoints' config keys and experts, which the converter reads)
        "mimo2": lambda: tf.MiMoV2FlashForCausalLM(tf.MiMoV2FlashConfig(
            **{**common, "num_key_value_heads": 1}, num_hidden_layers=len(MIMO2_LAYERS), head_dim=16, v_head_dim=8,
            sliding_window=WINDOW, layer_types=list(MIMO2_LAYERS), n_routed_experts=EXPERTS,
            num_experts_per_tok=EXPERTS_USED, moe_intermediate_size=32, attention_value_scale=0.7,
            tie_word_embeddings=False, rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}})),
        # Laguna-XS.2's layout (one query head count): per-head q/k norms, a softplus output gate one a head, the
        # first of every 4 layers global (WINDOW), the sliding ones with their own RoPE base, RoPE on half of each
        # head, a dense first layer, then sigmoid routing with a selection bias, renormalized and weighed × 2,
        # beside a shared expert of its own width (converter_expert_layout writes the published checkpoints' experts)
        "laguna": lambda: tf.LagunaForCausalLM(tf.LagunaConfig(
            **common, num_hidden_layers=len(LAGUNA_LAYERS), head_dim=16, sliding_window=WINDOW,
            layer_types=list(LAGUNA_LAYERS), num_experts=EXPERTS, num_experts_per_tok=EXPERTS_USED,
            moe_intermediate_size=32, shared_expert_intermediate_size=64, gating=True, moe_routed_scaling_factor=2.0,
            tie_word_embeddings=False, rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}})),
        # Mellum2's layout: per-head q/k norms, sliding (WINDOW) and global layers in turn (the file's pattern, not
        # the default every 4th global), experts in every layer, softmax routing renormalized; one RoPE base
        # (llama.cpp's sliding layers take the global one, where transformers' take their own)
        "mellum": lambda: tf.MellumForCausalLM(tf.MellumConfig(
            **common, num_hidden_layers=4, head_dim=16, sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"] * 2, num_experts=EXPERTS,
            num_experts_per_tok=EXPERTS_USED, moe_intermediate_size=32, tie_word_embeddings=False,
            rope_parameters={t: {"rope_type": "default", "rope_theta": 1e4}
                             for t in ("full_attention", "sliding_attention")})),
        # Mistral Small 4's layout: DeepSeek-V3's latent attention (q through its latent, YaRN with mscale and
        # mscale_all_dim 1, as its config: llama.cpp takes mscale as 1 whatever the config says) and softmax routing
        # in groups, renormalized and weighed × 2, beside a shared expert after a dense first layer; its Llama 4
        # attention temperature 0 (the converter writes none, so llama.cpp runs none); build_family_models saves
        # it as the published checkpoints' class, which the converter reads
        "mistral4": lambda: tf.Mistral4ForCausalLM(tf.Mistral4Config(
            **{**common, **MLA}, num_hidden_layers=3, q_lora_rank=32, n_routed_experts=EXPERTS,
            num_experts_per_tok=EXPERTS_USED, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
            n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.0, tie_word_embeddings=False,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 32, "mscale": 1.0, "mscale_all_dim": 1.0,
                             "beta_fast": 32.0, "beta_slow": 1.0, "llama_4_scaling_beta": 0.0})),
        # DeepSeek-V3.2: DeepSeek-V3's latent attention and routing, the lightning indexer in every layer
        # keeping the DSA_TOP_K best-scored keys of each query (fewer than the test sequences: the selection
        # is active from position DSA_TOP_K on); 32 indexer heads, so that no key scores exactly 0 (every head's
        # q·k negative, through the ReLU), whose ties llama.cpp's and torch's top k break each its own way; 64 wide,
        # the smallest Hadamard rotation llama.cpp applies to the indexer's q and k. YaRN's mscale and
        # mscale_all_dim 1, as DeepSeek-V3.2's config gives them (llama.cpp's deepseek32 takes mscale as 1)
        "deepseek32": lambda: tf.DeepseekV32ForCausalLM(tf.DeepseekV32Config(
            **{**common, **MLA}, num_hidden_layers=3, q_lora_rank=32, n_routed_experts=EXPERTS,
            num_experts_per_tok=EXPERTS_USED, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
            n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, scoring_func="sigmoid",
            tie_word_embeddings=False, index_topk=DSA_TOP_K, index_head_dim=64, index_n_heads=32,
            rope_parameters={
                "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
                "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32.0, "beta_slow": 1.0})),
        # GLM-5's (glm-dsa): DeepSeek-V3.2's indexer (interleaved RoPE) in the first and third layers, the second
        # and fourth reusing their choice (GLM-5.2's "shared" layers), sigmoid routing after a dense first layer
        "glm-dsa": lambda: tf.GlmMoeDsaForCausalLM(tf.GlmMoeDsaConfig(
            **{**common, **MLA}, num_hidden_layers=4, q_lora_rank=32, n_routed_experts=EXPERTS,
            num_experts_per_tok=EXPERTS_USED, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
            norm_topk_prob=True, routed_scaling_factor=2.5, tie_word_embeddings=False, index_topk=DSA_TOP_K,
            index_head_dim=64, index_n_heads=32, indexer_types=["full", "shared", "full", "shared"])),
        # GLM-4.5's layout: q/k/v biases, per-head q/k norms, RoPE on half of each head, a dense first
        # layer, then sigmoid routing with a selection bias, renormalized and weighed × 2, and a shared
        # expert (build_family_models adds a multi-token-prediction layer to the saved directory)
        "glm4moe": lambda: tf.Glm4MoeForCausalLM(tf.Glm4MoeConfig(
            **common, num_hidden_layers=3, head_dim=32, attention_bias=True, use_qk_norm=True,
            n_routed_experts=EXPERTS, num_experts_per_tok=EXPERTS_USED, moe_intermediate_size=32, n_shared_experts=1,
            first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.0, tie_word_embeddings=False)),
        # Hunyuan-A13B's layout: per-head q/k norms after RoPE, experts in every layer as wide as the
        # shared expert beside them (llama.cpp's, whatever moe_intermediate_size says), softmax routing renormalized
        # (build_family_models adds the per-layer lists the converter reads)
        "hunyuan-moe": lambda: tf.HunYuanMoEV1ForCausalLM(tf.HunYuanMoEV1Config(
            **{**common, "intermediate_size": 32}, num_hidden_layers=2, head_dim=16, num_experts=EXPERTS,
            moe_topk=EXPERTS_USED, eod_token_id=2, tie_word_embeddings=False)),
        # MiniMax-M2's layout: q and k normed over all heads at once, RoPE on half of each head, experts in every
        # layer routed by sigmoids with a selection bias, renormalized (build_family_models adds the config's
        # rotary_dim and scoring_func, which the converter reads)
        "minimax-m2": lambda: tf.MiniMaxM2ForCausalLM(tf.MiniMaxM2Config(
            **{**common, "intermediate_size": 32}, num_hidden_layers=2, head_dim=32, num_local_experts=EXPERTS,
            num_experts_per_tok=EXPERTS_USED, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
        # dots.llm1's layout: Qwen3's per-head q/k norms, a dense first layer, then sigmoid routing with a
        # selection bias, renormalized and weighed × 2, and two shared experts (the converter's
        # gating from the config's scoring_func, which build_family_models adds; llama.cpp's dots1 takes no
        # grouped-query attention)
        "dots1": lambda: tf.Dots1ForCausalLM(tf.Dots1Config(
            **{**common, "num_key_value_heads": H}, num_hidden_layers=3, n_routed_experts=EXPERTS,
            num_experts_per_tok=EXPERTS_USED, moe_intermediate_size=32, n_shared_experts=2, first_k_dense_replace=1,
            norm_topk_prob=True, routed_scaling_factor=2.0, sliding_window=None, tie_word_embeddings=False)),
        # HY V3's layout: dots.llm1's with grouped-query attention, a dense first layer (which its converted file
        # marks only by having no router), weights renormalized and scaled by its router_scaling_factor
        "hy_v3": lambda: tf.HYV3ForCausalLM(tf.HYV3Config(
            **common, num_hidden_layers=3, head_dim=16, num_experts=EXPERTS, num_experts_per_tok=EXPERTS_USED,
            moe_intermediate_size=32, num_shared_experts=1, first_k_dense_replace=1, router_scaling_factor=2.0,
            tie_word_embeddings=False)),
        # K-EXAONE's layout: per-head q/k norms, every 4th layer global without RoPE (WINDOW), a dense first
        # layer, then sigmoid routing with a selection bias, renormalized and weighed × 2, beside a shared
        # expert (its published configs name the scoring function, which the converter writes and llama.cpp needs)
        "exaone-moe": lambda: tf.ExaoneMoeForCausalLM(tf.ExaoneMoeConfig(
            **common, num_hidden_layers=4, head_dim=32, sliding_window=WINDOW, sliding_window_pattern=4,
            first_k_dense_replace=1, num_experts=EXPERTS, num_experts_per_tok=EXPERTS_USED, moe_intermediate_size=32,
            num_shared_experts=1, norm_topk_prob=True, routed_scaling_factor=2.0, scoring_func="sigmoid",
            tie_word_embeddings=False)),
        # Trinity's layout (AFMoE): per-head q/k norms, norms before and after attention and the FFN, embeddings
        # × √D (mup_enabled, which llama.cpp's graph always does), an output gate from its own projection, every
        # 4th layer global without RoPE (WINDOW), a dense first layer, then sigmoid routing with a selection bias,
        # renormalized (route_norm, which build_family_models adds) and weighed × 2, beside a shared expert
        "afmoe": lambda: tf.AfmoeForCausalLM(tf.AfmoeConfig(
            **common, num_hidden_layers=4, head_dim=16, sliding_window=WINDOW, global_attn_every_n_layers=4,
            num_dense_layers=1, num_experts=EXPERTS, num_experts_per_tok=EXPERTS_USED, moe_intermediate_size=32,
            num_shared_experts=1, route_scale=2.0, mup_enabled=True, tie_word_embeddings=False)),
        # Command R7B's layer (LayerNorm, parallel attention and FFN, logits × 0.75, a tied head) with a dense
        # first layer, global and rotated, then windows (every 4th layer global, without RoPE) and experts by
        # sigmoid, renormalized, averaged with a shared expert
        "cohere2moe": lambda: tf.Cohere2MoeForCausalLM(tf.Cohere2MoeConfig(
            **{k: v for k, v in common.items() if k != "rms_norm_eps"}, num_hidden_layers=5, head_dim=D // H,
            layer_norm_eps=1e-5, logit_scale=0.75, tie_word_embeddings=True, sliding_window=WINDOW,
            first_k_dense_replace=1, num_experts=EXPERTS, num_experts_per_tok=EXPERTS_USED, num_shared_experts=1,
            expert_selection_fn="sigmoid", norm_topk_prob=True, prefix_dense_intermediate_size=F)),
        # Llama 4's layout: four layers, the fourth without RoPE and global, the others chunked (WINDOW) with
        # q/k L2 norms; experts in every other layer (top 1 by sigmoid, weighing the input) beside a shared
        # expert, dense MLPs of another width between them; Llama 3's RoPE scaling
        "llama4": lambda: tf.Llama4ForCausalLM(tf.Llama4TextConfig(
            **{**common, "intermediate_size": 32}, intermediate_size_mlp=F, num_hidden_layers=4, head_dim=16,
            num_local_experts=EXPERTS, num_experts_per_tok=1, interleave_moe_layer_step=2,
            attention_chunk_size=WINDOW, tie_word_embeddings=False, rope_parameters={
                "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
        # LayerNorms without biases, q/k/v fused and clipped (to 1.5, inside their spread),
        # NEOX RoPE, experts in every layer (the softmax's top k, renormalized), their gate, up and down fused
        # in one tensor each ([experts · width, D], the converter's 3-D)
        "dbrx": lambda: tf.DbrxForCausalLM(tf.DbrxConfig(
            vocab_size=V, d_model=D, n_heads=H, n_layers=2, max_seq_len=256, bos_token_id=1, eos_token_id=2,
            attn_config={"kv_n_heads": HKV, "clip_qkv": DBRX_CLIP_QKV, "rope_theta": 10000.0},
            ffn_config={"ffn_hidden_size": 32, "moe_num_experts": EXPERTS, "moe_top_k": EXPERTS_USED},
            tie_word_embeddings=False)),
        # (llama.cpp's olmoe takes no grouped-query attention: k's norm spans D)
        "olmoe": lambda: tf.OlmoeForCausalLM(tf.OlmoeConfig(
            **{**common, "num_key_value_heads": H}, num_hidden_layers=2, num_experts=EXPERTS,
            num_experts_per_tok=EXPERTS_USED, norm_topk_prob=False,
            tie_word_embeddings=False)),
        "olmo2": lambda: tf.Olmo2ForCausalLM(tf.Olmo2Config(**common, num_hidden_layers=2)),
        # LayerNorms without parameters, q/k/v clipped (to 2: a few percent of their values at this size)
        "olmo": lambda: tf.OlmoForCausalLM(tf.OlmoConfig(
            **{k: v for k, v in common.items() if k != "rms_norm_eps"}, num_hidden_layers=2, clip_qkv=2.0,
            tie_word_embeddings=False)),
        # vision-language models (a one-block vision tower; the converter writes their language models):
        # M-RoPE sections over a head's pairs (8, 16), Qwen3-VL's interleaved, with two deepstack layers
        "qwen2vl": lambda: tf.Qwen2_5_VLForConditionalGeneration(tf.Qwen2_5_VLConfig(
            text_config=dict(**common, num_hidden_layers=2, tie_word_embeddings=False, rope_parameters={
                "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=D,
                               fullatt_block_indexes=[0]), tie_word_embeddings=False)),
        "qwen3vl": lambda: tf.Qwen3VLForConditionalGeneration(tf.Qwen3VLConfig(
            text_config=dict(**common, num_hidden_layers=2, head_dim=32, tie_word_embeddings=False, rope_parameters={
                "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5], "mrope_interleaved": True}),
            vision_config=VL_VISION, tie_word_embeddings=False)),
        "qwen3vlmoe": lambda: tf.Qwen3VLMoeForConditionalGeneration(tf.Qwen3VLMoeConfig(
            text_config=dict(**common, num_hidden_layers=2, head_dim=32, num_experts=EXPERTS,
                             num_experts_per_tok=EXPERTS_USED, moe_intermediate_size=96, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [6, 5, 5], "mrope_interleaved": True}),
            vision_config=VL_VISION, tie_word_embeddings=False)),
        # per-head q/k norms after RoPE, a tied head
        "hunyuan-dense": lambda: tf.HunYuanDenseV1ForCausalLM(tf.HunYuanDenseV1Config(
            **common, num_hidden_layers=2, head_dim=16, eod_token_id=2, tie_word_embeddings=True)),
        # LayerNorm1p with biases, a relu² MLP without a gate, RoPE on half of each head with linear
        # scaling, biases everywhere
        "nemotron": lambda: tf.NemotronForCausalLM(tf.NemotronConfig(
            vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=2, num_attention_heads=H,
            num_key_value_heads=HKV, max_position_embeddings=256, norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
            attention_bias=True, mlp_bias=True, tie_word_embeddings=False, rope_parameters={
                "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0, "partial_rotary_factor": 0.5})),
        # LayerNorms with biases, a relu² MLP without a gate, biases everywhere
        "jais2": lambda: tf.Jais2ForCausalLM(tf.Jais2Config(
            **{k: v for k, v in common.items() if k != "rms_norm_eps"}, num_hidden_layers=2, head_dim=16,
            layer_norm_eps=1e-5, attention_bias=True, mlp_bias=True, tie_word_embeddings=False)),
        # per-head q/k norms, an xIELU MLP without a gate (each layer's own beta and eps below)
        "apertus": lambda: tf.ApertusForCausalLM(tf.ApertusConfig(
            **common, num_hidden_layers=2, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
        # short-convolution layers between attention layers (q/k norms), its FFN width as given, a tied head
        "lfm2": lambda: tf.Lfm2ForCausalLM(tf.Lfm2Config(
            **{k: v for k, v in common.items() if k != "rms_norm_eps"}, norm_eps=1e-5, num_hidden_layers=4,
            layer_types=list(LFM2_LAYERS), conv_L_cache=CONV_KERNEL, block_auto_adjust_ff_dim=False)),
        # LFM2 with a dense first layer, then experts routed by sigmoids with a selection bias
        "lfm2moe": lambda: tf.Lfm2MoeForCausalLM(tf.Lfm2MoeConfig(
            **{k: v for k, v in common.items() if k != "rms_norm_eps"}, norm_eps=1e-5, num_hidden_layers=4,
            layer_types=list(LFM2_LAYERS), conv_L_cache=CONV_KERNEL, num_experts=EXPERTS,
            num_experts_per_tok=EXPERTS_USED, moe_intermediate_size=32, num_dense_layers=1)),
        # Mamba2 layers (two groups of B/C, conv biases) beside NoPE attention, Granite's scales, its MLP
        # (shared_mlp) dense, or experts beside a shared expert; transformers' chunks (16) shorter than SEQ
        "granitehybrid": lambda: granite_hybrid(tf, common, experts=0),
        "nemotron_h": lambda: nemotron_h(tf, common),
        # its MLPs as experts without a gate (sigmoid routing with a selection bias, renormalized and weighed
        # × 2) beside a shared expert twice as wide
        "nemotron_h_moe": lambda: nemotron_h(tf, common, experts=EXPERTS),
        # Mamba2 layers alone (Granite 4's sizes: two groups of B/C, conv biases); transformers' chunks (16)
        # shorter than SEQ
        "mamba2": lambda: tf.Mamba2ForCausalLM(tf.Mamba2Config(
            vocab_size=V, hidden_size=D, num_hidden_layers=2, layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2,
            pad_token_id=None, tie_word_embeddings=False, num_heads=SSM["mamba_n_heads"], head_dim=SSM["mamba_d_head"],
            n_groups=SSM["mamba_n_groups"], state_size=SSM["mamba_d_state"], conv_kernel=SSM["mamba_d_conv"],
            expand=SSM["mamba_expand"], chunk_size=16)),
        # a Mamba2 mixer (Granite 4's sizes, the gated RMSNorm after the gate, as llama.cpp runs it) beside
        # attention in every layer, its many multipliers (the converter folds them into the weights)
        "falcon-h1": lambda: tf.FalconH1ForCausalLM(tf.FalconH1Config(
            **common, num_hidden_layers=2, head_dim=16, tie_word_embeddings=False, mamba_d_ssm=SSM["mamba_expand"] * D,
            mamba_n_heads=SSM["mamba_n_heads"], mamba_d_head=SSM["mamba_d_head"], mamba_n_groups=SSM["mamba_n_groups"],
            mamba_d_state=SSM["mamba_d_state"], mamba_d_conv=SSM["mamba_d_conv"], mamba_chunk_size=16,
            mamba_rms_norm=True, mamba_norm_before_gate=False, **FALCON_H1_MULTIPLIERS)),
        # Mamba 1's layers alone: a convolution with its bias, dt of rank 32 (ssm_dt's rows whole blocks); the
        # CPU runs transformers' reference scan
        "mamba": lambda: tf.MambaForCausalLM(tf.MambaConfig(
            vocab_size=V, hidden_size=D, num_hidden_layers=2, layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2,
            pad_token_id=None, tie_word_embeddings=False, state_size=SSM["mamba_d_state"], expand=2,
            conv_kernel=SSM["mamba_d_conv"], time_step_rank=32, use_conv_bias=True)),
        "granitehybridmoe": lambda: granite_hybrid(tf, common, experts=EXPERTS),
        # Mamba layers (dt, B and C normed) and attention without RoPE in turn, experts in every other layer
        "jamba": lambda: tf.JambaForCausalLM(tf.JambaConfig(
            **common, num_hidden_layers=4, tie_word_embeddings=False, attn_layer_offset=1, attn_layer_period=2,
            expert_layer_offset=1, expert_layer_period=2, num_experts=EXPERTS, num_experts_per_tok=EXPERTS_USED,
            mamba_d_state=SSM["mamba_d_state"], mamba_d_conv=SSM["mamba_d_conv"], mamba_expand=2, mamba_dt_rank=32)),
        # Gated DeltaNets in three layers of four, attention with an output gate and RoPE on a quarter of
        # each head (its M-RoPE sections over those pairs) in the fourth
        "qwen35": lambda: tf.Qwen3_5ForCausalLM(tf.Qwen3_5TextConfig(
            **common, num_hidden_layers=4, head_dim=32, tie_word_embeddings=False, **QWEN35_DELTA, rope_parameters={
                "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                "mrope_section": [2, 1, 1], "mrope_interleaved": True})),
        # Kimi Delta Attention in three layers of four, latent attention without RoPE (q straight from x) in the
        # fourth; a dense first layer, then sigmoid routing with a selection bias, renormalized and weighed × 2,
        # beside a shared expert (rms_norm_eps: transformers' l2norm of q and k takes a fixed 1e-6, llama.cpp's
        # the file's)
        "kimi-linear": lambda: tf.KimiLinearForCausalLM(tf.KimiLinearConfig(
            **{**common, **MLA, "rms_norm_eps": 1e-6}, num_hidden_layers=len(KIMI_LAYERS), q_lora_rank=None,
            layer_types=list(KIMI_LAYERS), mlp_layer_types=["dense"] + ["sparse"] * (len(KIMI_LAYERS) - 1),
            num_local_experts=EXPERTS, num_experts_per_tok=EXPERTS_USED, moe_intermediate_size=32,
            n_shared_experts=1, routed_scaling_factor=2.0, tie_word_embeddings=False, **KIMI_KDA)),
        # Qwen3.5 with experts and a gated shared expert in every layer
        "qwen35moe": lambda: tf.Qwen3_5MoeForCausalLM(tf.Qwen3_5MoeTextConfig(
            **common, num_hidden_layers=4, head_dim=32, tie_word_embeddings=False, **QWEN35_DELTA, num_experts=EXPERTS,
            num_experts_per_tok=EXPERTS_USED, moe_intermediate_size=32, shared_expert_intermediate_size=64,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                             "mrope_section": [2, 1, 1], "mrope_interleaved": True})),
        # Qwen3.5-MoE as Qwen3-Next's converter writes it: value heads grouped, b and a fused, no M-RoPE
        "qwen3next": lambda: tf.Qwen3NextForCausalLM(tf.Qwen3NextConfig(
            **common, num_hidden_layers=4, head_dim=32, tie_word_embeddings=False, **QWEN35_DELTA, num_experts=EXPERTS,
            num_experts_per_tok=EXPERTS_USED, moe_intermediate_size=32, shared_expert_intermediate_size=64,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})),
        "seed_oss": lambda: tf.SeedOssForCausalLM(tf.SeedOssConfig(
            **common, num_hidden_layers=2, head_dim=32, attention_bias=True, tie_word_embeddings=False)),
        # LayerNorm, parallel attention and FFN, logits × 0.25, a tied head; Command R7B's windows
        # (every 4th layer global, without RoPE)
        "command-r": lambda: tf.CohereForCausalLM(tf.CohereConfig(
            **common, num_hidden_layers=2, layer_norm_eps=1e-5, logit_scale=0.25, tie_word_embeddings=True)),
        "cohere2": lambda: tf.Cohere2ForCausalLM(tf.Cohere2Config(
            **common, num_hidden_layers=4, layer_norm_eps=1e-5, logit_scale=0.75, tie_word_embeddings=True,
            sliding_window=WINDOW, rotary_pct=1.0)),
        # sub-norms in both branches, a tied head, ternary matrices (randomized); SiLU, as llama.cpp runs bitnet
        "bitnet": lambda: tf.BitNetForCausalLM(tf.BitNetConfig(**{
            **common, "hidden_size": BITNET_D, "intermediate_size": 2 * BITNET_D}, num_hidden_layers=2,
            hidden_act="silu", tie_word_embeddings=True)),
        "minicpm": lambda: tf.GraniteForCausalLM(tf.GraniteConfig(
            **common, num_hidden_layers=2, tie_word_embeddings=False, embedding_multiplier=MINICPM["scale_emb"],
            residual_multiplier=MINICPM["scale_depth"] / math.sqrt(2), attention_multiplier=1 / math.sqrt(D // H),
            logits_scaling=D / MINICPM["dim_model_base"])),
        # DeepSeek's latent attention (q through its latent, attn_kv_b whole, values D / H wide as llama.cpp
        # reads them) with MiniCPM's scales at the values llama.cpp's minicpm3 fixes (logits × 4 at this width)
        "minicpm3": lambda: tf.MiniCPM3ForCausalLM(tf.MiniCPM3Config(
            **{**common, **MLA, "v_head_dim": None}, num_hidden_layers=2, q_lora_rank=32, tie_word_embeddings=False)),
        # EXAONE 4 32B's layer count, at which llama.cpp takes its windows: every 4th layer global,
        # without RoPE
        "exaone4": lambda: tf.Exaone4ForCausalLM(tf.Exaone4Config(
            **common, num_hidden_layers=64, sliding_window=WINDOW, sliding_window_pattern=4)),
        # OLMo 3: four layers, every fourth global; YaRN on the global layers only, over an original
        # context shorter than the test sequences
        "olmo3": lambda: tf.Olmo3ForCausalLM(tf.Olmo3Config(
            **common, num_hidden_layers=4, sliding_window=WINDOW, rope_parameters={
                "full_attention": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                   "original_max_position_embeddings": 32},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
    }[name]
    return randomized(make(), name)


def granite_hybrid(tf, common: dict, experts: int):
    """Granite 4's hybrid, dense (experts 0, none used, as Granite 4.0 H micro's config and llama.cpp ask) or
    with experts and a shared expert."""
    hf_types = {"mamba": "linear_attention", "attention": "full_attention"}  # (transformers' names of the kinds)
    return tf.GraniteMoeHybridForCausalLM(tf.GraniteMoeHybridConfig(
        **{**common, "intermediate_size": 32 if experts else F}, num_hidden_layers=len(GRANITE_HYBRID_LAYERS),
        layer_types=[hf_types[t] for t in GRANITE_HYBRID_LAYERS], num_local_experts=experts,
        num_experts_per_tok=EXPERTS_USED if experts else 0, shared_intermediate_size=64 if experts else F,
        tie_word_embeddings=False,
        embedding_multiplier=2.0, residual_multiplier=0.7, attention_multiplier=0.3, logits_scaling=1.5,
        mamba_chunk_size=16, position_embedding_type=None, **SSM))


def nemotron_h(tf, common: dict, experts: int = 0):
    """Nemotron-H: Mamba2 layers of Granite 4's sizes, MLPs and one attention layer (NEMOTRON_H_PATTERN), or
    with experts in place of the MLPs (NEMOTRON_H_MOE_PATTERN)."""
    kinds = {"M": "mamba", "-": "mlp", "*": "attention", "E": "moe"}
    rms = common["rms_norm_eps"]
    moe = dict(n_routed_experts=experts, num_experts_per_tok=EXPERTS_USED, moe_intermediate_size=32,
               moe_shared_expert_intermediate_size=64, n_shared_experts=1, norm_topk_prob=True,
               routed_scaling_factor=2.0, n_group=1, topk_group=1) if experts else {}
    return tf.NemotronHForCausalLM(tf.NemotronHConfig(
        **{k: v for k, v in common.items() if k != "rms_norm_eps"}, layer_norm_epsilon=rms, head_dim=D // H,
        layers_block_type=[kinds[k] for k in (NEMOTRON_H_MOE_PATTERN if experts else NEMOTRON_H_PATTERN)],
        tie_word_embeddings=False, chunk_size=16, mamba_num_heads=SSM["mamba_n_heads"], n_groups=SSM["mamba_n_groups"],
        ssm_state_size=SSM["mamba_d_state"], mamba_head_dim=SSM["mamba_d_head"], conv_kernel=SSM["mamba_d_conv"],
        **moe))


def bitnet_converter_names(d: Path, out: Path) -> Path:
    """A copy of BitNet's directory `d` at `out` whose sub-norms have the names llama.cpp's converter maps
    (the 1bitLLM checkpoints' inner_attn_ln and ffn_layernorm; it has none for transformers')."""
    from safetensors.torch import load_file, save_file
    out.mkdir()
    for f in d.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    renamed = {k.replace("self_attn.attn_sub_norm", "self_attn.inner_attn_ln").replace("mlp.ffn_sub_norm",
                                                                                       "mlp.ffn_layernorm"): v
               for k, v in load_file(d / "model.safetensors").items()}
    save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
    return out


def nemotron_h_config(d: Path) -> None:
    """The tiny Nemotron-H's config.json as the converter reads a dense model's: the published configs'
    hybrid_override_pattern and layer count, without the model_type (transformers' config class would add
    its MoE defaults, whose num_experts_per_tok makes the converter write nemotron_h_moe) or MoE keys."""
    cfg = json.loads((d / "config.json").read_text())
    moe = ("model_type", "layers_block_type", "mtp_layers_block_type", "num_experts_per_tok", "n_routed_experts",
           "n_shared_experts", "moe_intermediate_size", "moe_shared_expert_intermediate_size", "moe_latent_size",
           "moe_shared_expert_overlap", "routed_scaling_factor", "norm_topk_prob", "n_group", "topk_group")
    cfg = {k: v for k, v in cfg.items() if k not in moe}
    cfg.update(hybrid_override_pattern=NEMOTRON_H_PATTERN, num_hidden_layers=len(NEMOTRON_H_PATTERN))
    (d / "config.json").write_text(json.dumps(cfg))


def mpt_config(d: Path) -> None:
    """config.json of an MPT directory as the published checkpoints give it: MPTForCausalLM, the class
    name llama.cpp's converter reads (transformers writes MptForCausalLM)."""
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["MPTForCausalLM"]}))


def kimi_linear_converter_layout(d: Path) -> None:
    """The tiny Kimi Linear's directory as the converter reads the published checkpoints: config.json's
    linear_attn_config (its full-attention layers counted from 1), first_k_dense_replace and the router's
    sigmoid, and the dense layer's MLP under mlp. (transformers saves it under block_sparse_moe, and
    reads either)."""
    from safetensors.torch import load_file, save_file
    cfg = json.loads((d / "config.json").read_text())
    types = cfg["layer_types"]
    cfg.update(linear_attn_config={
        "full_attn_layers": [i + 1 for i, t in enumerate(types) if t == "full_attention"],
        "kda_layers": [i + 1 for i, t in enumerate(types) if t != "full_attention"],
        "short_conv_kernel_size": cfg["linear_conv_kernel_dim"], "head_dim": cfg["linear_head_dim"],
        "num_heads": cfg["linear_num_heads"]},
        first_k_dense_replace=cfg["mlp_layer_types"].index("sparse"), moe_router_activation_func="sigmoid")
    (d / "config.json").write_text(json.dumps(cfg))
    path = d / "model.safetensors"
    dense = tuple(f"block_sparse_moe.{n}_proj." for n in ("gate", "up", "down"))
    save_file({(k.replace("block_sparse_moe.", "mlp.") if any(x in k for x in dense) else k): v
               for k, v in load_file(path).items()}, path, metadata={"format": "pt"})


def mimo2_converter_layout(d: Path) -> None:
    """The tiny MiMo-V2-Flash's directory as the converter reads the published checkpoints: config.json's
    hybrid_layer_pattern (1: sliding), the sliding layers' head counts and widths, the router's topk_method
    and the norms' epsilon under layernorm_epsilon; each expert's gate, up and down apart and the sinks under
    attention_sink_bias (transformers saves the experts stacked, and reads either)."""
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(hybrid_layer_pattern=[int(t == "sliding_attention") for t in cfg["layer_types"]],
               swa_num_key_value_heads=2 * cfg["num_key_value_heads"], swa_head_dim=cfg["head_dim"],
               swa_num_attention_heads=cfg["num_attention_heads"], swa_v_head_dim=cfg["v_head_dim"],
               topk_method="noaux_tc", layernorm_epsilon=cfg["rms_norm_eps"])
    (d / "config.json").write_text(json.dumps(cfg))
    converter_expert_layout(d / "model.safetensors", {"self_attn.sinks": "self_attn.attention_sink_bias"})


def converter_expert_layout(path: Path, renamed: dict[str, str]) -> None:
    """A safetensors file of transformers' stacked experts ([E, 2F, D] gate_up_proj: each expert's gate rows,
    then its up rows; [E, D, F] down_proj) with each expert's gate, up and down apart, as the published
    checkpoints (and their converters) have them, and the tensors whose names hold a key of `renamed` under its
    value's."""
    from safetensors.torch import load_file, save_file
    out = {}
    for k, v in load_file(path).items():
        if k.endswith("experts.gate_up_proj"):
            for e, (gate, up) in enumerate(zip(*v.chunk(2, dim=1))):
                out[k.replace("gate_up_proj", f"{e}.gate_proj.weight")] = gate.contiguous()
                out[k.replace("gate_up_proj", f"{e}.up_proj.weight")] = up.contiguous()
        elif k.endswith("experts.down_proj"):
            out.update({k.replace("down_proj", f"{e}.down_proj.weight"): w.contiguous() for e, w in enumerate(v)})
        else:
            for old, new in renamed.items():
                k = k.replace(old, new)
            out[k] = v
    save_file(out, path, metadata={"format": "pt"})


def randomized(model, name: str):
    """A transformers model of family `name` with the tiny models' random weights (seeded by the
    name), in fp32 with eager attention."""
    model.config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    gemma = name.startswith("gemma") and name not in ("gemma3n", "gemma4", "gemma4moe")
    # Gemma 3n's 22 layers, kept from chaos: q and k normed small (its queries are not scaled, nor are
    # Gemma 4's), AltUp's coefficients small, the embeddings (the head too) small
    calm = name == "gemma3n"
    with torch.no_grad():
        for pname, p in model.named_parameters():
            leaf = pname.replace("norm_attn_norm.", "")  # (DBRX's blocks keep their attention under that name)
            if name in ("gemma3n", "gemma4", "gemma4moe") and ("q_norm" in pname or "k_norm" in pname):
                p.copy_(0.3 + 0.05 * torch.randn(p.shape, generator=g))
            elif "norm" in leaf or ".ln_" in pname:  # Gemma's norms are 1 + w (Gemma 3n's are w); GPT-2's ln_*
                p.copy_((0.0 if gemma else 1.0) + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "embed" in pname:
                p.copy_((0.1 if calm else 0.25) * torch.randn(p.shape, generator=g))
            elif calm and "coefs" in pname:
                p.copy_(0.1 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            elif name == "bitnet":  # ternary times one scale, without zeros: the converter's rounding keeps it
                p.copy_(torch.randn(p.shape, generator=g).sign() / math.sqrt(p.shape[-1]))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))  # (fan-in)
        for i, layer in enumerate(model.model.layers if name == "apertus" else ()):  # xIELU's buffers
            layer.mlp.act_fn.beta.fill_(0.5 + 0.1 * i)
            layer.mlp.act_fn.eps.fill_(-1e-6 * (i + 1))
        for bname, b in model.named_buffers():  # LFM2-MoE's and DeepSeek-V3's selection bias (zeros as made)
            if bname.endswith(("expert_bias", "e_score_correction_bias")):
                b.copy_(0.2 * torch.randn(b.shape, generator=g))
            if bname.endswith("layer_scalar"):  # (Gemma 4's layer output scales: ones as made)
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    if name == "mamba":  # steps of softplus(dt) near 0.1, as trained Mamba models take, not near 0.7
        for layer in model.backbone.layers:
            layer.mixer.dt_proj.bias.data -= 2.0
    if name == "mpt":
        mpt_as_llamacpp(model)
    if name == "gemma3n":
        gemma3n_as_llamacpp(model)
    if name == "phimoe":
        phimoe_as_llamacpp(model)
    return model.float().eval()


def mpt_as_llamacpp(model) -> None:
    """MPT's GELU as llama.cpp runs it, the tanh approximation (ggml_gelu); transformers' is the exact one."""
    for block in model.transformer.blocks:
        block.ffn.act = torch.nn.GELU(approximate="tanh")


def phimoe_as_llamacpp(model, norms: bool = True, routing: bool = True):
    """PhiMoE as llama.cpp runs it (its phi3 graph): RMSNorms plus the LayerNorms' biases in place of
    the LayerNorms (norms), and the softmax's top k renormalized in place of sparsemixer (routing),
    which in eval weighs each of its two experts by a softmax over the experts whose logits lie within
    2 · router_jitter_noise (relative) of its own: mostly 1 each. Its LongRoPE takes the long factors
    beyond the original context, as Phi-3's does (transformers' PhiMoE recomputes the short ones at
    every length, and only its magnitude follows the length)."""
    import torch.nn.functional as F

    def longrope(rotary, x, position_ids):
        rope, seq_len = rotary.config.rope_parameters, int(position_ids.max()) + 1
        inv_freq, _ = rotary.rope_init_fn(rotary.config, x.device, seq_len)
        mscale = rope["long_mscale" if seq_len > rope["original_max_position_embeddings"] else "short_mscale"]
        freqs = torch.cat([position_ids[..., None].float() * inv_freq] * 2, dim=-1)
        return (freqs.cos() * mscale).to(x.dtype), (freqs.sin() * mscale).to(x.dtype)

    model.model.rotary_emb.forward = types.MethodType(longrope, model.model.rotary_emb)

    def rms_bias(norm, x):
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps) + norm.bias

    def top_k(router, h):
        logits = F.linear(h, router.weight)
        weights, chosen = logits.softmax(-1).topk(router.top_k, dim=-1)
        return logits, weights / weights.sum(-1, keepdim=True), chosen

    for m in model.modules():
        if norms and isinstance(m, torch.nn.LayerNorm):
            m.forward = types.MethodType(rms_bias, m)
        if routing and type(m).__name__ == "PhimoeTopKRouter":
            m.forward = types.MethodType(top_k, m)
    return model


def gemma3n_as_llamacpp(model) -> None:
    """Gemma 3n's sparse FFN gates as llama.cpp computes them (_gaussian_topk_llamacpp)."""
    for layer in model.model.layers:
        layer.mlp._gaussian_topk = types.MethodType(_gaussian_topk_llamacpp, layer.mlp)


def _gaussian_topk_llamacpp(mlp, inputs: torch.Tensor) -> torch.Tensor:
    """Gemma 3n's sparse FFN gate as llama.cpp computes it, the variance over n - 1 (transformers
    divides by n; at the tiny model's 128 wide gates that moves its logits by 5 %, at E2B's 8192
    by nothing to see)."""
    std_mul = torch.distributions.normal.Normal(0, 1).icdf(torch.tensor(mlp.activation_sparsity)).to(inputs.dtype)
    cutoff = inputs.mean(-1, keepdim=True) + inputs.std(-1, keepdim=True, unbiased=True) * std_mul
    return torch.relu(inputs - cutoff)


def rwkv_checkpoint(name: str, d: Path, text: str) -> None:
    """The tiny model of `name` (one of RWKV_NAMES) as the published checkpoints hold it (fla-hub's RWKV-7,
    RWKV7ForCausalLM; RWKV's RWKV-6, Rwkv6ForCausalLM: their config.json keys and tensor names), random weights
    seeded by the name, and RWKV's world vocabulary (rwkv_world_vocab) of `text` with a chat template."""
    from safetensors.torch import save_file
    c = {"rwkv7": RWKV7, "rwkv6": RWKV6, "arwkv7": ARWKV7, "rwkv6qwen2": QRWKV6}[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    mat = lambda n, k: torch.randn(n, k, generator=g) / math.sqrt(k)  # noqa: E731  (fan-in)
    vec = lambda n, mean=0.0, spread=0.2: mean + spread * torch.randn(n, generator=g)  # noqa: E731
    unit = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731  (lerps: between x and x_prev)
    w = {"rwkv7": rwkv7_tensors, "rwkv6": rwkv6_tensors, "arwkv7": arwkv7_tensors,
         "rwkv6qwen2": qrwkv6_tensors}[name](c, mat, vec, unit)
    cfg = {"rwkv7": dict(architectures=["RWKV7ForCausalLM"], model_type="rwkv7", norm_eps=1e-5),
           "rwkv6": dict(architectures=["Rwkv6ForCausalLM"], model_type="rwkv6", layer_norm_epsilon=1e-5),
           "arwkv7": dict(architectures=["RwkvHybridForCausalLM"], model_type="rwkv_hybrid", rms_norm_eps=1e-5,
                          bos_token_id=1, eos_token_id=2),
           "rwkv6qwen2": dict(architectures=["RWKV6Qwen2ForCausalLM"], model_type="rwkv6qwen2", rms_norm_eps=1e-5,
                              bos_token_id=1, eos_token_id=2)}[name]
    cfg = dict(vocab_size=V, tie_word_embeddings=False, torch_dtype="float32", bos_token_id=0, eos_token_id=0,
               **c) | cfg
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    save_file({k: t.contiguous() for k, t in w.items()}, d / "model.safetensors", metadata={"format": "pt"})
    if name in WORLD_VOCAB_NAMES:
        (d / "rwkv_vocab_v20230424.txt").write_text(rwkv_world_vocab(text), encoding="utf-8")
        (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": RWKV_CHAT}))


def rwkv7_tensors(c: dict, mat, vec, unit) -> dict[str, torch.Tensor]:
    """RWKV-7's tensors of sizes `c` under fla-hub's names (rwkv_checkpoint's random makers)."""
    d_, f, heads = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["head_dim"]
    w = {"model.embeddings.weight": vec(V * d_, 0.0, 0.25).view(V, d_), "model.layers.0.pre_norm.weight":
         vec(d_, 1.0), "model.layers.0.pre_norm.bias": vec(d_), "model.norm.weight": vec(d_, 1.0),
         "model.norm.bias": vec(d_), "lm_head.weight": mat(V, d_)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w.update({p + "attn_norm.weight": vec(d_, 1.0), p + "attn_norm.bias": vec(d_),
                  p + "ffn_norm.weight": vec(d_, 1.0), p + "ffn_norm.bias": vec(d_),
                  **{p + f"attn.x_{x}": unit(1, 1, d_) for x in "rwkvag"},
                  p + "attn.k_k": vec(d_, 0.8), p + "attn.k_a": vec(d_, 1.0), p + "attn.r_k": vec(d_).view(heads, -1),
                  **{p + f"attn.{x}_proj.weight": mat(d_, d_) for x in "rkvo"},
                  p + "attn.g_norm.weight": vec(d_, 1.0), p + "attn.g_norm.bias": vec(d_),
                  p + "ffn.x_k": unit(1, 1, d_), p + "ffn.key.weight": mat(f, d_), p + "ffn.value.weight": mat(d_, f)})
        # the low-rank parts, Linear -> (tanh, -, -, sigmoid) -> Linear: lora.0, lora.2 (with the bias but the gate's)
        for x, rank in (("w", "decay"), ("a", "a"), ("v", "v"), ("g", "gate")):
            if x == "v" and i == 0:
                continue  # (the first layer has no value mix)
            r = c[f"{rank}_low_rank_dim"]
            w.update({p + f"attn.{x}_lora.lora.0.weight": mat(r, d_), p + f"attn.{x}_lora.lora.2.weight": mat(d_, r)})
            if x != "g":
                w[p + f"attn.{x}_lora.lora.2.bias"] = vec(d_, 0.5 if x == "w" else 0.0, 0.5)
    return w


def arwkv7_tensors(c: dict, mat, vec, unit) -> dict[str, torch.Tensor]:
    """ARWKV-7's tensors of sizes `c` under its checkpoints' names (rwkv_checkpoint's random makers): Qwen2's
    embeddings, RMSNorms, MLP and head around RWKV-7's time mix without a gate, its low-rank parts as x @ w."""
    d_, f, heads = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["head_size"]
    w = {"model.embed_tokens.weight": vec(V * d_, 0.0, 0.25).view(V, d_), "model.norm.weight": vec(d_, 1.0),
         "lm_head.weight": mat(V, d_)}
    for i in range(c["num_hidden_layers"]):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn.time_mixer."
        w.update({p + "input_layernorm.weight": vec(d_, 1.0), p + "post_attention_layernorm.weight": vec(d_, 1.0),
                  p + "mlp.gate_proj.weight": mat(f, d_), p + "mlp.up_proj.weight": mat(f, d_),
                  p + "mlp.down_proj.weight": mat(d_, f), **{a + f"x_{x}": unit(1, 1, d_) for x in "rwkva"},
                  a + "k_k": vec(d_, 0.8).view(1, 1, d_), a + "k_a": vec(d_, 1.0).view(1, 1, d_),
                  a + "r_k": vec(d_).view(heads, -1), **{a + f"{x}.weight": mat(d_, d_)
                                                         for x in ("receptance", "key", "value", "output")},
                  a + "ln_x.weight": vec(d_, 1.0), a + "ln_x.bias": vec(d_)})
        for x, rank in zip("wav", ARWKV7_RANKS):
            if x == "v" and i == 0:
                continue  # (the first layer has no value mix)
            w.update({a + f"{x}1": mat(rank, d_).T, a + f"{x}2": mat(d_, rank).T,
                      a + f"{x}0": vec(d_, 0.5 if x == "w" else 0.0, 0.5).view(1, 1, d_)})
    return w


def qrwkv6_tensors(c: dict, mat, vec, unit) -> dict[str, torch.Tensor]:
    """QRWKV6's tensors of sizes `c` under its checkpoints' names (rwkv_checkpoint's random makers): Qwen2's
    embeddings, RMSNorms, biased q (r), k and v of fewer heads, o, MLP and head around RWKV-6's token-shift mix,
    decay and gate."""
    d_, f = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * d_ // c["num_attention_heads"]
    w = {"model.embed_tokens.weight": vec(V * d_, 0.0, 0.25).view(V, d_), "model.norm.weight": vec(d_, 1.0),
         "lm_head.weight": mat(V, d_)}
    for i in range(c["num_hidden_layers"]):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        w.update({p + "input_layernorm.weight": vec(d_, 1.0), p + "post_attention_layernorm.weight": vec(d_, 1.0),
                  p + "mlp.gate_proj.weight": mat(f, d_), p + "mlp.up_proj.weight": mat(f, d_),
                  p + "mlp.down_proj.weight": mat(d_, f), **{a + f"time_maa_{x}": unit(1, 1, d_) for x in "xwkvrg"},
                  a + "time_maa_w1": mat(d_, 5 * RWKV6_MIX),
                  a + "time_maa_w2": torch.stack([mat(RWKV6_MIX, d_) for _ in range(5)]),
                  a + "time_decay": vec(d_, -1.0, 0.5).view(1, 1, d_), a + "time_decay_w1": mat(d_, RWKV6_DECAY),
                  a + "time_decay_w2": mat(RWKV6_DECAY, d_), a + "q_proj.weight": mat(d_, d_),
                  a + "q_proj.bias": vec(d_),
                  a + "k_proj.weight": mat(kv, d_), a + "k_proj.bias": vec(kv), a + "v_proj.weight": mat(kv, d_),
                  a + "v_proj.bias": vec(kv), a + "o_proj.weight": mat(d_, d_), a + "gate.weight": mat(d_, d_)})
    return w


def rwkv6_tensors(c: dict, mat, vec, unit) -> dict[str, torch.Tensor]:
    """RWKV-6's tensors of sizes `c` under RWKV's Hugging Face names (rwkv_checkpoint's random makers): the
    token-shift mix's w1 [D, 5·32] and w2 [5, 32, D] and the decay's w1 [D, 64], w2 [64, D] as x @ w."""
    d_, f, heads = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["head_size"]
    w = {"rwkv.embeddings.weight": vec(V * d_, 0.0, 0.25).view(V, d_), "rwkv.blocks.0.pre_ln.weight": vec(d_, 1.0),
         "rwkv.blocks.0.pre_ln.bias": vec(d_), "rwkv.ln_out.weight": vec(d_, 1.0), "rwkv.ln_out.bias": vec(d_),
         "head.weight": mat(V, d_)}
    for i in range(c["num_hidden_layers"]):
        p = f"rwkv.blocks.{i}."
        w.update({p + "ln1.weight": vec(d_, 1.0), p + "ln1.bias": vec(d_), p + "ln2.weight": vec(d_, 1.0),
                  p + "ln2.bias": vec(d_), **{p + f"attention.time_maa_{x}": unit(1, 1, d_) for x in "xwkvrg"},
                  p + "attention.time_maa_w1": mat(d_, 5 * RWKV6_MIX), p + "attention.time_maa_w2":
                  torch.stack([mat(RWKV6_MIX, d_) for _ in range(5)]),
                  p + "attention.time_decay": vec(d_, -1.0, 0.5).view(1, 1, d_),
                  p + "attention.time_decay_w1": mat(d_, RWKV6_DECAY),
                  p + "attention.time_decay_w2": mat(RWKV6_DECAY, d_),
                  p + "attention.time_faaaa": vec(d_).view(heads, -1),
                  **{p + f"attention.{x}.weight": mat(d_, d_)
                     for x in ("receptance", "key", "value", "gate", "output")},
                  p + "attention.ln_x.weight": vec(d_, 1.0), p + "attention.ln_x.bias": vec(d_),
                  p + "feed_forward.time_maa_k": unit(1, 1, d_), p + "feed_forward.time_maa_r": unit(1, 1, d_),
                  p + "feed_forward.key.weight": mat(f, d_), p + "feed_forward.value.weight": mat(d_, f),
                  p + "feed_forward.receptance.weight": mat(d_, d_)})
    return w


def rwkv_world_vocab(text: str) -> str:
    """RWKV's world vocabulary file (rwkv_vocab_v20230424.txt: "id repr(token) length" a line) of V - 1 tokens:
    the 256 bytes, then "\\n\\n" at 261 (the converter's end-of-turn) among the words and pairs of characters
    most frequent in `text`, and a few characters of other scripts (several bytes in UTF-8)."""
    from collections import Counter
    words = Counter(re.findall(r" ?[A-Za-z]+|[.,;!?]\"?|\n\n", text))
    words.update({text[j:j + 2]: 1 for j in range(len(text) - 1)})
    extra = ["é", "ü", "日本", "語", "😀", " the", "\n\n"]
    chosen = list(dict.fromkeys(extra + [t for t, _ in words.most_common() if len(t.encode("utf-8")) > 1]))
    chosen.remove("\n\n")
    tokens = [bytes([b]) for b in range(256)]
    chosen = [t.encode("utf-8") for t in chosen]
    tokens += chosen[:4] + [b"\n\n"] + chosen[4:V - 1 - 256 - 1]
    lines = []
    for i, t in enumerate(tokens, 1):
        try:
            shown = repr(t.decode("utf-8"))
        except UnicodeDecodeError:
            shown = repr(t)
        lines.append(f"{i} {shown} {len(t)}")
    assert len(tokens) == V - 1 and tokens[260] == b"\n\n"
    return "\n".join(lines) + "\n"


def remote_code_checkpoint(name: str, d: Path) -> None:
    """The tiny model of `name` (one of REMOTE_CODE_NAMES) as its published checkpoints hold it: their
    config.json keys and tensor names (fused q/k/v where theirs are fused), random weights seeded by the name."""
    if name in ("plamo2", "plamo3"):  # (PLaMo's own layout: pre- and post-norms, q/k/v and gate/up fused)
        return plamo_checkpoint(name, d)
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    mat = lambda n, k: torch.randn(n, k, generator=g) / math.sqrt(k)  # noqa: E731  (fan-in)
    vec = lambda n, mean=0.0: mean + 0.2 * torch.randn(n, generator=g)  # noqa: E731
    mha = name in ("baichuan", "qwen", "jais")  # (their checkpoints have no KV head count: every head its own)
    hkv, hd = (H if mha else HKV), D // H
    layers = BAICHUAN_LAYERS if name == "baichuan" else 2
    # the canonical parts of each layer, then named as the checkpoint names them
    ffn = 2 * F if name == "qwen" else F  # (Qwen's config counts both halves of its MLP)
    cfg = dict(vocab_size=V, hidden_size=D, intermediate_size=ffn, num_attention_heads=H, max_position_embeddings=256,
               bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, torch_dtype="float32")
    if not mha:
        cfg["num_key_value_heads"] = hkv
    w = {}
    if name in ("deci", "openelm"):
        layers = len(DECI_BLOCKS if name == "deci" else OPENELM_LAYERS)
    for i in range(layers):
        q, k, v, o = mat(D, D), mat(hkv * hd, D), mat(hkv * hd, D), mat(D, D)
        gate, up, down = mat(F, D), mat(F, D), mat(D, F)
        n1, n2 = vec(D, 1.0), vec(D, 1.0)
        if name == "exaone":
            p = f"transformer.h.{i}."
            w.update({p + "ln_1.weight": n1, p + "ln_2.weight": n2, p + "attn.attention.q_proj.weight": q,
                      p + "attn.attention.k_proj.weight": k, p + "attn.attention.v_proj.weight": v,
                      p + "attn.attention.out_proj.weight": o, p + "mlp.c_fc_0.weight": gate,
                      p + "mlp.c_fc_1.weight": up, p + "mlp.c_proj.weight": down})
        elif name == "internlm2":  # wqkv: each KV group's q heads, then its k head and v head
            p, per = f"model.layers.{i}.", H // hkv
            qkv = torch.cat([q.reshape(hkv, per, hd, D), k.reshape(hkv, 1, hd, D), v.reshape(hkv, 1, hd, D)], 1)
            w.update({p + "attention_norm.weight": n1, p + "ffn_norm.weight": n2,
                      p + "attention.wqkv.weight": qkv.reshape(-1, D), p + "attention.wo.weight": o,
                      p + "feed_forward.w1.weight": gate, p + "feed_forward.w3.weight": up,
                      p + "feed_forward.w2.weight": down})
        elif name == "chatglm":  # query_key_value with a bias; dense_h_to_4h holds the gate rows, then up's
            p = f"transformer.encoder.layers.{i}."
            w.update({p + "input_layernorm.weight": n1, p + "post_attention_layernorm.weight": n2,
                      p + "self_attention.query_key_value.weight": torch.cat([q, k, v]),
                      p + "self_attention.query_key_value.bias": vec(D + 2 * hkv * hd),
                      p + "self_attention.dense.weight": o, p + "mlp.dense_h_to_4h.weight": torch.cat([gate, up]),
                      p + "mlp.dense_4h_to_h.weight": down})
        elif name == "deci":  # Llama's names, each layer's own parts and widths
            p, (group, linear, mult) = f"model.layers.{i}.", DECI_BLOCKS[i]
            if group:
                w.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": mat(H // group * hd, D),
                          p + "self_attn.v_proj.weight": mat(H // group * hd, D), p + "self_attn.o_proj.weight": o})
            elif linear:
                w[p + "self_attn.linear_attn.weight"] = o
            if group or linear:
                w[p + "input_layernorm.weight"] = n1
            if mult:
                f = -(-int(2 * mult * D / 3) // 256) * 256
                w.update({p + "post_attention_layernorm.weight": n2, p + "mlp.gate_proj.weight": mat(f, D),
                          p + "mlp.up_proj.weight": mat(f, D), p + "mlp.down_proj.weight": mat(D, f)})
        elif name == "openelm":  # each layer's own heads and width: q/k/v in qkv_proj, gate and up in proj_1
            p, (heads, kv_heads, mult) = f"transformer.layers.{i}.", OPENELM_LAYERS[i]
            f = int(mult * D)
            w.update({p + "attn_norm.weight": n1, p + "ffn_norm.weight": n2,
                      p + "attn.qkv_proj.weight": mat((heads + 2 * kv_heads) * hd, D),
                      p + "attn.q_norm.weight": vec(hd, 1.0), p + "attn.k_norm.weight": vec(hd, 1.0),
                      p + "attn.out_proj.weight": mat(D, heads * hd), p + "ffn.proj_1.weight": mat(2 * f, D),
                      p + "ffn.proj_2.weight": mat(D, f)})
        elif name == "jais":  # GPT-2's names and transposed (Conv1D) weights, biases everywhere; c_fc2 the gate
            p = f"transformer.h.{i}."
            w.update({p + "ln_1.weight": n1, p + "ln_1.bias": vec(D), p + "ln_2.weight": n2, p + "ln_2.bias": vec(D),
                      p + "attn.c_attn.weight": torch.cat([q, k, v]).T, p + "attn.c_attn.bias": vec(D + 2 * hkv * hd),
                      p + "attn.c_proj.weight": o.T, p + "attn.c_proj.bias": vec(D), p + "mlp.c_fc.weight": up.T,
                      p + "mlp.c_fc.bias": vec(F), p + "mlp.c_fc2.weight": gate.T, p + "mlp.c_fc2.bias": vec(F),
                      p + "mlp.c_proj.weight": down.T, p + "mlp.c_proj.bias": vec(D)})
        elif name == "codeshell":  # GPT-2's names, q/k/v in c_attn, biases everywhere, an MLP 4 × D wide
            p, ffn = f"transformer.h.{i}.", 4 * D
            w.update({p + "ln_1.weight": n1, p + "ln_1.bias": vec(D), p + "ln_2.weight": n2, p + "ln_2.bias": vec(D),
                      p + "attn.c_attn.weight": torch.cat([q, k, v]), p + "attn.c_attn.bias": vec(D + 2 * hkv * hd),
                      p + "attn.c_proj.weight": o, p + "attn.c_proj.bias": vec(D), p + "mlp.c_fc.weight": mat(ffn, D),
                      p + "mlp.c_fc.bias": vec(ffn), p + "mlp.c_proj.weight": mat(D, ffn),
                      p + "mlp.c_proj.bias": vec(D)})
        elif name == "refact":  # one K/V head in attn.kv; gate and up in gate_up_proj, 4 × D × 2/3 up to 256s
            p, ffn = f"transformer.h.{i}.", 256
            w.update({p + "ln_1.weight": n1, p + "ln_2.weight": n2, p + "attn.q.weight": q,
                      p + "attn.kv.weight": mat(2 * hd, D), p + "attn.c_proj.weight": o,
                      p + "mlp.gate_up_proj.weight": mat(2 * ffn, D), p + "mlp.c_proj.weight": mat(D, ffn)})
        elif name == "plamo":  # one norm (attention and MLP in parallel); q's heads ordered KV group by KV group
            p = f"model.layers.layers.{i}."
            w.update({p + "norm.weight": n1, p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                      p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": o,
                      p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up, p + "mlp.down_proj.weight": down})
        elif name == "plm":  # DeepSeek's latent attention (q straight from x) and names, an MLP without a gate
            p, rank, nope, rope, hv = (f"model.layers.{i}.", MLA["kv_lora_rank"], MLA["qk_nope_head_dim"],
                                       MLA["qk_rope_head_dim"], MLA["v_head_dim"])
            w.update({p + "input_layernorm.weight": n1, p + "post_attention_layernorm.weight": n2,
                      p + "self_attn.q_proj.weight": mat(H * (nope + rope), D),
                      p + "self_attn.kv_a_proj_with_mqa.weight": mat(rank + rope, D),
                      p + "self_attn.kv_a_layernorm.weight": vec(rank, 1.0),
                      p + "self_attn.kv_b_proj.weight": mat(H * (nope + hv), rank),
                      p + "self_attn.o_proj.weight": mat(D, H * hv), p + "mlp.up_proj.weight": up,
                      p + "mlp.down_proj.weight": down})
        elif name == "qwen":  # c_attn with a bias; mlp.w2 is the gate, w1 the up projection
            p = f"transformer.h.{i}."
            w.update({p + "ln_1.weight": n1, p + "ln_2.weight": n2, p + "attn.c_attn.weight": torch.cat([q, k, v]),
                      p + "attn.c_attn.bias": vec(3 * D), p + "attn.c_proj.weight": o, p + "mlp.w2.weight": gate,
                      p + "mlp.w1.weight": up, p + "mlp.c_proj.weight": down})
        else:  # Llama's names (Baichuan's q, k and v in one W_pack; Orion's LayerNorms with biases; openPangu
            #    Embedded's attention biases; XVERSE's and Nanbeige's as Llama's, Maincoder's with per-head q/k norms)
            p = f"model.layers.{i}."
            attn = ({p + "self_attn.W_pack.weight": torch.cat([q, k, v])} if name == "baichuan" else
                    {p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                     p + "self_attn.v_proj.weight": v})
            w.update({p + "input_layernorm.weight": n1, p + "post_attention_layernorm.weight": n2, **attn,
                      p + "self_attn.o_proj.weight": o, p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                      p + "mlp.down_proj.weight": down})
            if name == "orion":
                w.update({p + "input_layernorm.bias": vec(D), p + "post_attention_layernorm.bias": vec(D)})
            if name == "pangu-embedded":
                w.update({p + "self_attn.q_proj.bias": vec(D), p + "self_attn.k_proj.bias": vec(hkv * hd),
                          p + "self_attn.v_proj.bias": vec(hkv * hd), p + "self_attn.o_proj.bias": vec(D)})
            if name == "maincoder":  # (per-head q/k norms)
                w.update({p + "self_attn.q_norm.weight": vec(hd, 1.0), p + "self_attn.k_norm.weight": vec(hd, 1.0)})
    embed, head, final = 0.25 * torch.randn(V, D, generator=g), mat(V, D), vec(D, 1.0)
    if name in ("exaone", "qwen", "refact"):
        w.update({"transformer.wte.weight": embed, "transformer.ln_f.weight": final, "lm_head.weight": head})
    elif name == "chatglm":  # (the rotary table, which the converter drops)
        w.update({"transformer.embedding.word_embeddings.weight": embed, "transformer.encoder.final_layernorm.weight":
                  final, "transformer.output_layer.weight": head, "transformer.rotary_pos_emb.inv_freq": vec(hd // 4)})
    elif name == "jais":  # (ALiBi's slopes of 8 over the heads, which the converter reads its max bias from)
        slopes = torch.tensor([[2.0 ** (-8.0 * (h + 1) / H)] for h in range(H)])
        w.update({"transformer.wte.weight": embed, "transformer.ln_f.weight": final, "transformer.ln_f.bias": vec(D),
                  "lm_head.weight": head, "transformer.relative_pe.slopes": slopes})
    elif name == "codeshell":
        w.update({"transformer.wte.weight": embed, "transformer.ln_f.weight": final, "transformer.ln_f.bias": vec(D),
                  "lm_head.weight": head})
    elif name == "openelm":  # (its head tied to the embeddings)
        w.update({"transformer.token_embeddings.weight": embed, "transformer.norm.weight": final})
    elif name == "plm":  # (its head tied to the embeddings)
        w.update({"model.embed_tokens.weight": embed, "model.norm.weight": final})
    elif name == "internlm2":
        w.update({"model.tok_embeddings.weight": embed, "model.norm.weight": final, "output.weight": head})
    else:
        w.update({"model.embed_tokens.weight": embed, "model.norm.weight": final, "lm_head.weight": head})
        if name == "orion":
            w["model.norm.bias"] = vec(D)
    cfg.update({
        # EXAONE 3.5's Llama 3 RoPE scaling, over an original context shorter than the test sequences
        "exaone": dict(architectures=["ExaoneForCausalLM"], model_type="exaone", num_layers=layers,
                       layer_norm_epsilon=1e-5, activation_function="silu", rope_theta=10000.0, rope_scaling={
                           "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 32}),
        # ChatGLM3's keys: RoPE on half of each head, the KV groups as multi_query_group_num
        "chatglm": dict(architectures=["ChatGLMModel"], model_type="chatglm", num_layers=layers, kv_channels=hd,
                        ffn_hidden_size=ffn, multi_query_attention=True, multi_query_group_num=hkv,
                        padded_vocab_size=V, layernorm_epsilon=1e-5, rmsnorm=True, add_qkv_bias=True,
                        add_bias_linear=False, post_layer_norm=True, seq_length=256, rope_ratio=1.0),
        # Llama-3.1-Nemotron's keys and Llama 3's RoPE scaling, over an original context shorter than the test
        # sequences
        "deci": dict(architectures=["DeciLMForCausalLM"], model_type="nemotron-nas", num_hidden_layers=layers,
                     rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", block_configs=[
                         {"attention": {"n_heads_in_group": group, "no_op": not group and not linear,
                                        "replace_with_linear": linear},
                          "ffn": {"ffn_mult": mult, "no_op": mult is None, "replace_with_linear": False}}
                         for group, linear, mult in DECI_BLOCKS], rope_scaling={
                             "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 32}),
        # OpenELM's keys (its head tied to the embeddings)
        "openelm": dict(architectures=["OpenELMForCausalLM"], model_type="openelm", num_transformer_layers=layers,
                        model_dim=D, head_dim=hd, num_query_heads=[h for h, _, _ in OPENELM_LAYERS],
                        num_kv_heads=[k for _, k, _ in OPENELM_LAYERS],
                        ffn_multipliers=[m for _, _, m in OPENELM_LAYERS], ffn_dim_divisor=OPENELM_FFN_DIVISOR,
                        ffn_with_glu=True, normalize_qk_projections=True, share_input_output_layers=True,
                        rope_freq_constant=10000, rope_max_length=256, max_context_length=256,
                        activation_fn_name="swish", tie_word_embeddings=True),
        # Jais's keys: ALiBi, SwiGLU, muP's scales (of the embeddings and the head, which the converter multiplies
        # in, and of the scores, 1 / head_dim, which llama.cpp's graph fixes)
        "jais": dict(architectures=["JAISLMHeadModel"], model_type="jais", n_layer=layers, n_embd=D, n_head=H,
                     n_inner=F, n_positions=256, layer_norm_epsilon=1e-5, activation_function="swiglu",
                     position_embedding_type="alibi", mup_embeddings_scale=2.0, mup_output_alpha=1.5,
                     mup_width_scale=0.5, mup_scale_qk_dot_by_d=True, scale_attn_weights=True),
        # CodeShell's keys (the converter fixes the MLP's width at 4 × D and RoPE's base at 10000)
        "codeshell": dict(architectures=["CodeShellForCausalLM"], model_type="codeshell", n_layer=layers, n_embd=D,
                          n_head=H, num_query_groups=hkv, group_query_attention=True, n_positions=256,
                          layer_norm_epsilon=1e-5, position_embedding_type="rope",
                          activation_function="gelu_pytorch_tanh"),
        # Refact's keys (multi-query attention, ALiBi of llama.cpp's fixed max bias)
        "refact": dict(architectures=["GPTRefactForCausalLM"], model_type="gpt_refact", n_layer=layers, n_embd=D,
                       n_head=H, multi_query=True, n_positions=256, layer_norm_epsilon=1e-5),
        # Nanbeige's keys: Llama's, its layers run once (num_loops)
        "nanbeige": dict(architectures=["NanbeigeForCausalLM"], model_type="nanbeige", num_hidden_layers=layers,
                         rms_norm_eps=1e-5, rope_theta=10000.0, num_loops=1, skip_loop_final_norm=False),
        "plamo": dict(architectures=["PlamoForCausalLM"], model_type="plamo", num_hidden_layers=layers,
                      rms_norm_eps=1e-5, rope_theta=10000.0),
        "maincoder": dict(architectures=["MaincoderForCausalLM"], model_type="maincoder", num_hidden_layers=layers,
                          head_dim=hd, rms_norm_eps=1e-5, rope_theta=10000.0),
        # PLM's keys: DeepSeek-V2's latent attention without q's latent, relu² without a gate, a tied head
        "plm": dict(architectures=["PLMForCausalLM"], model_type="plm", num_hidden_layers=layers,
                    num_key_value_heads=H, kv_lora_rank=MLA["kv_lora_rank"], qk_nope_head_dim=MLA["qk_nope_head_dim"],
                    qk_rope_head_dim=MLA["qk_rope_head_dim"], v_head_dim=MLA["v_head_dim"], rms_norm_eps=1e-5,
                    rope_theta=10000.0, hidden_act="relu2", tie_word_embeddings=True),
        "internlm2": dict(architectures=["InternLM2ForCausalLM"], model_type="internlm2", num_hidden_layers=layers,
                          rms_norm_eps=1e-5, rope_theta=10000.0, bias=False, rope_scaling=None),
        "baichuan": dict(architectures=["BaichuanForCausalLM"], model_type="baichuan", num_hidden_layers=layers,
                         rms_norm_eps=1e-5, model_max_length=256),
        "qwen": dict(architectures=["QWenLMHeadModel"], model_type="qwen", num_hidden_layers=layers,
                     kv_channels=hd, layer_norm_epsilon=1e-5, rotary_emb_base=10000.0, rotary_pct=1.0,
                     seq_length=256, no_bias=True,
                     # (the published configs give only layer_norm_epsilon, which the converter writes as
                     # LayerNorm's key, where llama.cpp's qwen graph, and lowtune as it, reads the RMSNorm's)
                     rms_norm_eps=1e-5),
        "orion": dict(architectures=["OrionForCausalLM"], model_type="orion", num_hidden_layers=layers,
                      rms_norm_eps=1e-5, rope_theta=10000.0),
        "xverse": dict(architectures=["XverseForCausalLM"], model_type="xverse", num_hidden_layers=layers,
                       rms_norm_eps=1e-5, rope_theta=10000.0),
        "pangu-embedded": dict(architectures=["PanguEmbeddedForCausalLM"], model_type="PanguEmbedded",
                               num_hidden_layers=layers, rms_norm_eps=1e-5, rope_theta=10000.0, bias=True),
    }[name])
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    save_file({k: t.contiguous() for k, t in w.items()}, d / "model.safetensors", metadata={"format": "pt"})


def remote_code_moe_checkpoint(name: str, d: Path) -> None:
    """The tiny model of `name` (one of REMOTE_CODE_MOE_NAMES) as its published checkpoints hold it, config.json
    and random weights (seeded by the name) under their own names, EXPERTS experts routed by the softmax's top
    EXPERTS_USED in every layer with experts, Llama's attention with grouped KV heads:
    * DeepSeek-MoE's (deepseek: DeepSeek-MoE 16B): a dense first layer, then the experts, not renormalized, beside
      a shared expert of their width;
    * Grok-1's (grok: its PyTorch checkpoint's names): norms after attention and after the experts (GeGLU,
      renormalized, as wide as intermediate_size), a tied head, its multipliers none of them 1 and its
      attention's soft-cap (3) within reach of the scores;
    * Snowflake Arctic's (arctic): a dense MLP D wide after attention (residual_mlp), and the experts
      (renormalized, as wide as intermediate_size) on the layer's input normed by residual_layernorm;
    * Ling's (bailingmoe: Ling-lite, Ling-plus): q, k and v in one query_key_value, the experts (renormalized)
      beside a shared expert of their width in every layer;
    * Ling 2.0's (bailingmoe2): Ling's attention with per-head q/k norms and RoPE on half of each head, a dense
      first layer, then the experts routed by sigmoid with a selection bias in the best of two groups,
      renormalized and weighed × 2.5, beside a shared expert, and a multi-token-prediction (NextN) layer;
    * Grove MoE's (grovemoe: GroveMoE-Base, -Inst): Qwen3-MoE's layer (per-head q/k norms, heads of 32, the
      experts renormalized) with an adjugate expert for each pair of experts (chunk_experts, head_dim wide)."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    mat = lambda n, k: torch.randn(n, k, generator=g) / math.sqrt(k)  # noqa: E731  (fan-in)
    vec = lambda n, mean=0.0: mean + 0.2 * torch.randn(n, generator=g)  # noqa: E731
    layers, fe, hd = 2, 32, D // H
    mlp = lambda p, f: {p + "gate_proj.weight": mat(f, D), p + "up_proj.weight": mat(f, D),  # noqa: E731
                        p + "down_proj.weight": mat(D, f)}
    embed = 0.25 * torch.randn(V, D, generator=g)
    w = {}
    nextn = int(name == "bailingmoe2")  # (Ling 2.0's multi-token-prediction layer after the others)
    for i in range(layers + nextn):
        q, k, v, o = mat(D, D), mat(HKV * hd, D), mat(HKV * hd, D), mat(D, D)
        if name == "grok":
            p = f"transformer.decoder_layer.{i}."
            w.update({p + "multi_head_attention.query.weight": q, p + "multi_head_attention.key.weight": k,
                      p + "multi_head_attention.value.weight": v, p + "multi_head_attention.linear.weight": o,
                      **{p + n + ".weight": vec(D, 1.0) for n in ("rms_norm", "rms_norm_1", "rms_norm_2",
                                                                  "rms_norm_3")},
                      p + "router.weight": mat(EXPERTS, D)})
            for e in range(EXPERTS):  # (linear: the gate, linear_v: up, linear_1: down)
                w.update({p + f"moe.{e}.linear.weight": mat(fe, D), p + f"moe.{e}.linear_v.weight": mat(fe, D),
                          p + f"moe.{e}.linear_1.weight": mat(D, fe)})
            continue
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": vec(D, 1.0), p + "post_attention_layernorm.weight": vec(D, 1.0),
                  p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
                  p + "self_attn.o_proj.weight": o})
        if name.startswith("bailingmoe"):  # (Ling's names: attention.query_key_value, attention.dense)
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                del w[p + "self_attn." + n + ".weight"]
            w.update({p + "attention.query_key_value.weight": torch.cat([q, k, v]), p + "attention.dense.weight": o})
            if name == "bailingmoe2":
                w.update({p + "attention.query_layernorm.weight": vec(hd, 1.0),
                          p + "attention.key_layernorm.weight": vec(hd, 1.0)})
            if name == "bailingmoe2" and i == 0:
                w.update(mlp(p + "mlp.", F))
                continue
            w.update({p + "mlp.gate.weight": mat(EXPERTS, D), **mlp(p + "mlp.shared_experts.", fe)})
            if name == "bailingmoe2":  # (the selection bias)
                w[p + "mlp.gate.expert_bias"] = 0.2 * torch.randn(EXPERTS, generator=g)
            if i == layers:  # (the NextN layer's own tensors)
                w.update({p + "eh_proj.weight": mat(D, 2 * D), p + "enorm.weight": vec(D, 1.0),
                          p + "hnorm.weight": vec(D, 1.0), p + "final_layernorm.weight": vec(D, 1.0)})
            for e in range(EXPERTS):
                w.update(mlp(p + f"mlp.experts.{e}.", fe))
            continue
        if name == "grovemoe":  # (Qwen3-MoE's names, heads of 32)
            w.update({p + "self_attn.q_proj.weight": mat(H * 32, D), p + "self_attn.k_proj.weight": mat(HKV * 32, D),
                      p + "self_attn.v_proj.weight": mat(HKV * 32, D), p + "self_attn.o_proj.weight": mat(D, H * 32),
                      p + "self_attn.q_norm.weight": vec(32, 1.0), p + "self_attn.k_norm.weight": vec(32, 1.0),
                      p + "mlp.gate.weight": mat(EXPERTS, D)})
            for e in range(EXPERTS):
                w.update(mlp(p + f"mlp.experts.{e}.", fe))
            for e in range(EXPERTS // 2):
                w.update(mlp(p + f"mlp.chunk_experts.{e}.", 32))
            continue
        if name == "arctic":  # (w1: the gate, w3: up, w2: down)
            w.update({p + "residual_layernorm.weight": vec(D, 1.0), p + "block_sparse_moe.gate.weight": mat(EXPERTS, D),
                      p + "residual_mlp.w1.weight": mat(D, D), p + "residual_mlp.w3.weight": mat(D, D),
                      p + "residual_mlp.w2.weight": mat(D, D)})
            for e in range(EXPERTS):
                q = p + f"block_sparse_moe.experts.{e}."
                w.update({q + "w1.weight": mat(fe, D), q + "w3.weight": mat(fe, D), q + "w2.weight": mat(D, fe)})
            continue
        if i == 0:
            w.update(mlp(p + "mlp.", F))
            continue
        w[p + "mlp.gate.weight"] = mat(EXPERTS, D)
        for e in range(EXPERTS):
            w.update(mlp(p + f"mlp.experts.{e}.", fe))
        w.update(mlp(p + "mlp.shared_experts.", fe))
    cfg = dict(vocab_size=V, hidden_size=D, num_hidden_layers=layers, num_attention_heads=H, num_key_value_heads=HKV,
               num_experts_per_tok=EXPERTS_USED, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
               bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    untied = {"model.norm.weight": vec(D, 1.0), "lm_head.weight": mat(V, D)}
    if name == "grok":
        w.update({"transformer.in_out_embed.weight": embed, "transformer.rms_norm.weight": vec(D, 1.0)})
        cfg.update(architectures=["Grok1ForCausalLM"], model_type="grok-1", intermediate_size=fe,
                   num_local_experts=EXPERTS, tie_word_embeddings=True, embedding_multiplier_scale=4.0,
                   output_multiplier_scale=0.5, attn_output_multiplier=0.2, attn_logit_softcapping=3.0)
    elif name.startswith("bailingmoe"):
        w.update({"model.word_embeddings.weight": embed, **untied})
        cfg.update(architectures=["BailingMoeForCausalLM"], model_type="bailing_moe", intermediate_size=F,
                   moe_intermediate_size=fe, num_experts=EXPERTS, num_shared_experts=1, first_k_dense_replace=0,
                   norm_topk_prob=True, norm_head=False, tie_word_embeddings=False)
        if name == "bailingmoe2":
            cfg.update(architectures=["BailingMoeV2ForCausalLM"], model_type="bailing_moe_v2", first_k_dense_replace=1,
                       use_qk_norm=True, partial_rotary_factor=0.5, score_function="sigmoid", n_group=2, topk_group=1,
                       routed_scaling_factor=2.5, num_nextn_predict_layers=nextn)
    elif name == "grovemoe":
        w.update({"model.embed_tokens.weight": embed, **untied})
        cfg.update(architectures=["GroveMoeForCausalLM"], model_type="grove_moe", intermediate_size=F,
                   moe_intermediate_size=fe, head_dim=32, num_experts=EXPERTS, norm_topk_prob=True,
                   tie_word_embeddings=False)
    elif name == "arctic":
        w.update({"model.embed_tokens.weight": embed, **untied})
        cfg.update(architectures=["ArcticForCausalLM"], model_type="arctic", intermediate_size=fe,
                   num_local_experts=EXPERTS, moe_layer_frequency=1, parallel_attn_mlp_res=True,
                   tie_word_embeddings=False)
    else:
        w.update({"model.embed_tokens.weight": embed, **untied})
        cfg.update(architectures=["DeepseekForCausalLM"], model_type="deepseek", intermediate_size=F,
                   moe_intermediate_size=fe, n_routed_experts=EXPERTS, n_shared_experts=1, first_k_dense_replace=1,
                   moe_layer_freq=1, norm_topk_prob=False, scoring_func="softmax", tie_word_embeddings=False)
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    save_file({k: t.contiguous() for k, t in w.items()}, d / "model.safetensors", metadata={"format": "pt"})


def plamo_checkpoint(name: str, d: Path) -> None:
    """PLaMo 2's or PLaMo 3's tiny model as its published checkpoints hold it (Plamo2ForCausalLM's and
    Plamo3ForCausalLM's config.json keys and tensor names). PLaMo 2: Mamba layers (in_proj's z and x
    interleaved head by head, bcdt_proj's B, C and dt, each normed by its weight, dt_proj to the heads,
    A_log, D) and attention layers (qkv_proj, a q and k norm weight for each head) in turn; PLaMo 3: attention
    layers (qkv_proj, q and k norms), sliding and global. Each followed by a SwiGLU MLP (gate_up_proj), every
    output post-normed."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(2 if name == "plamo2" else 3)
    mat = lambda n, k: torch.randn(n, k, generator=g) / math.sqrt(k)  # noqa: E731  (fan-in)
    vec = lambda n, mean=0.0: mean + 0.2 * torch.randn(n, generator=g)  # noqa: E731
    hd, heads, state, kernel = D // H, PLAMO2["mamba_num_heads"], PLAMO2["mamba_d_state"], PLAMO2["mamba_d_conv"]
    inner, dt_dim = heads * hd, max(64, D // 16)  # (llama.cpp's dt width: the checkpoints' rule)
    w = {}
    for i in range((PLAMO2 if name == "plamo2" else PLAMO3)["num_hidden_layers"]):
        p = f"model.layers.layers.{i}."
        if name == "plamo3":  # (q and k norms of one weight for every head, less the converter's 1)
            w.update({p + "mixer.qkv_proj.weight": mat((H + 2 * HKV) * hd, D), p + "mixer.q_norm.weight": vec(hd),
                      p + "mixer.k_norm.weight": vec(hd), p + "mixer.o_proj.weight": mat(D, H * hd)})
        elif i % PLAMO2["mamba_step"] != PLAMO2["mamba_step"] // 2:
            w.update({p + "mixer.in_proj.weight": mat(2 * inner, D),
                      p + "mixer.conv1d.weight": mat(inner, kernel)[:, None],
                      p + "mixer.bcdt_proj.weight": mat(2 * state + dt_dim, inner),
                      p + "mixer.dt_proj.weight": mat(heads, dt_dim), p + "mixer.dt_bias": vec(heads, -1.0),
                      p + "mixer.A_log": vec(heads), p + "mixer.D": vec(heads, 1.0),
                      p + "mixer.dt_norm_weight": vec(dt_dim, 1.0), p + "mixer.B_norm_weight": vec(state, 1.0),
                      p + "mixer.C_norm_weight": vec(state, 1.0), p + "mixer.out_proj.weight": mat(D, inner)})
        else:
            w.update({p + "mixer.qkv_proj.weight": mat((H + 2 * HKV) * hd, D), p + "mixer.q_weight": vec(H * hd, 1.0)
                      .reshape(H, hd), p + "mixer.k_weight": vec(HKV * hd, 1.0).reshape(HKV, hd),
                      p + "mixer.o_proj.weight": mat(D, H * hd)})
        # (the checkpoints keep each norm's weight less the converter's offset: 1, 1/5, 1, 1/5^1.5)
        w.update({p + "pre_mixer_norm.weight": vec(D), p + "post_mixer_norm.weight": vec(D),
                  p + "pre_mlp_norm.weight": vec(D), p + "post_mlp_norm.weight": vec(D),
                  p + "mlp.gate_up_proj.weight": mat(2 * F, D), p + "mlp.down_proj.weight": mat(D, F)})
    w.update({"model.embed_tokens.weight": 0.25 * torch.randn(V, D, generator=g), "model.norm.weight": vec(D),
              "lm_head.weight": mat(V, D)})
    cfg = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_attention_heads=H, num_key_value_heads=HKV,
               max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
               tie_word_embeddings=False, torch_dtype="float32")
    if name == "plamo2":
        cfg.update(architectures=["Plamo2ForCausalLM"], model_type="plamo2", hidden_size_per_head=hd,
                   mamba_enabled=True, **PLAMO2)
    else:
        cfg.update(architectures=["Plamo3ForCausalLM"], model_type="plamo3", head_dim=hd, sliding_window=WINDOW,
                   **PLAMO3)
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    save_file({k: t.contiguous() for k, t in w.items()}, d / "model.safetensors", metadata={"format": "pt"})


def add_reused_kv_tensors(hf_dir: Path, layers: int, seed: int = 0) -> None:
    """Gemma 3n's k, v and k norm in the layers that reuse earlier K/V, added to a directory's
    safetensors: the released checkpoints carry them and llama.cpp loads them (transformers leaves
    them out of what it saves)."""
    from safetensors.torch import load_file, save_file
    g = torch.Generator().manual_seed(seed)
    path = hf_dir / "model.safetensors"
    tensors = load_file(path)
    hd = 32
    for i in range(20, layers):
        p = f"model.layers.{i}.self_attn."
        tensors[p + "k_proj.weight"] = torch.randn(HKV * hd, D, generator=g) / math.sqrt(D)
        tensors[p + "v_proj.weight"] = torch.randn(HKV * hd, D, generator=g) / math.sqrt(D)
        tensors[p + "k_norm.weight"] = 0.3 + 0.05 * torch.randn(hd, generator=g)
    save_file(tensors, path, metadata={"format": "pt"})


def add_nextn_layer(hf_dir: Path, seed: int = 0) -> None:
    """A multi-token-prediction (NextN) layer after a GLM-4.5 MoE directory's layers, as the released
    checkpoints carry one: the last layer's tensors again (perturbed) under the next index, with its
    eh_proj, enorm, hnorm and shared_head.norm, and num_nextn_predict_layers in config.json (the
    converter writes it into the GGUF; transformers saves none of it)."""
    from safetensors.torch import load_file, save_file
    g = torch.Generator().manual_seed(seed)
    path, cfg_path = hf_dir / "model.safetensors", hf_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    last, nextn = cfg["num_hidden_layers"] - 1, cfg["num_hidden_layers"]
    tensors = load_file(path)
    for name, t in list(tensors.items()):
        if name.startswith(f"model.layers.{last}."):
            tensors[name.replace(f".{last}.", f".{nextn}.", 1)] = t + 0.1 * torch.randn(t.shape, generator=g)
    p = f"model.layers.{nextn}."
    tensors.update({p + "eh_proj.weight": torch.randn(D, 2 * D, generator=g) / math.sqrt(2 * D),
                    **{p + n + ".weight": 1.0 + 0.2 * torch.randn(D, generator=g)
                       for n in ("enorm", "hnorm", "shared_head.norm")}})
    save_file(tensors, path, metadata={"format": "pt"})
    cfg_path.write_text(json.dumps({**cfg, "num_nextn_predict_layers": 1}))


def spm_model(text: str) -> bytes:
    """A 512-piece SentencePiece BPE model of `text`, with byte fallback and the chat markers
    of the templates as control pieces (Phi-3's converter also needs <|endoftext|>)."""
    import sentencepiece as spm
    out = io.BytesIO()
    lines = [line for line in text.splitlines() if line.strip()][:2000]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=V, model_type="bpe",
        byte_fallback=True, character_coverage=0.995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        control_symbols=["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>",
                         "<start_of_turn>", "<end_of_turn>"], minloglevel=2)
    return out.getvalue()


_CONVERT = """
import runpy, sys
from conversion import (baichuan, bailingmoe, bloom, chatglm, codeshell, command_r, dbrx, deci, deepseek, exaone,
                        falcon, falcon_h1, gemma, glm, gpt2, gpt_oss, gptneox, grovemoe, hunyuan, internlm, jais,
                        kimi_linear, laguna, lfm2, llama, maincoder, mellum, mimo, minimax, mpt, nemotron, olmo, phi,
                        plamo, plm, qwen, refact, rwkv, stablelm, starcoder, xverse)
from conversion.base import TextModel
# OLMo's, OLMo 2's, OLMoE's, GLM-4's, Qwen2/3-MoE's, EXAONE 4's (and EXAONE MoE's), Cohere's (and Cohere2 MoE's),
# Seed-OSS's, gpt-oss's, Hunyuan's (dense and MoE), Phi-2's, StarCoder2's, LFM2's, DeepSeek's, GLM-4.5 MoE's, Qwen3.5's,
# Llama 4's, Nemotron-H's, MiniMax-M2's, Falcon-H1's, GPT-2's, StarCoder's, BLOOM's, MPT's, GPT-NeoX's, StableLM's,
# Falcon's, EXAONE's, Qwen's, DBRX's, Ling's (1 and 2.0) and Grove MoE's converters read only byte-level BPE
# vocabularies (Kimi Linear's also tiktoken's, MPT's falls back to SEA-LION's ids, XVERSE's reads its tokenizer.json,
# InternLM2's its SentencePiece model through protobuf, PLaMo 2's and PLaMo 3's their tokenizer.jsonl, ChatGLM's its
# tokenizer's own code, Deci's Llama's HF tokenizer, Jais's, CodeShell's, Refact's, Maincoder's and PLM's byte-level
# BPE); Gemma 4's only its own BPE one (tests/test_tokenizer.py); the tiny models share a SentencePiece one
olmo.Olmo2Model.set_vocab = olmo.OlmoeModel.set_vocab = glm.Glm4Model.set_vocab = qwen.Qwen3MoeModel.set_vocab = \
    qwen.Qwen2MoeModel.set_vocab = exaone.Exaone4Model.set_vocab = command_r.CommandR2Model.set_vocab = \
    command_r.Cohere2Model.set_vocab = olmo.SeedOssModel.set_vocab = gpt_oss.GptOssModel.set_vocab = \
    hunyuan.HunYuanModel.set_vocab = hunyuan.HunYuanMoEModel.set_vocab = phi.Phi2Model.set_vocab = \
    starcoder.StarCoder2Model.set_vocab = lfm2.LFM2Model.set_vocab = lfm2.LFM2MoeModel.set_vocab = \
    deepseek.DeepseekV2Model.set_vocab = deepseek.DeepseekV32Model.set_vocab = qwen.Qwen3_5TextModel.set_vocab = \
    qwen.Qwen3_5MoeTextModel.set_vocab = \
    qwen.Qwen3NextModel.set_vocab = glm.Glm4MoeModel.set_vocab = llama.Llama4Model.set_vocab = \
    nemotron.NemotronHModel.set_vocab = minimax.MiniMaxM2Model.set_vocab = olmo.OlmoModel.set_vocab = \
    falcon_h1.FalconH1Model.set_vocab = gpt2.GPT2Model.set_vocab = starcoder.StarCoderModel.set_vocab = \
    bloom.BloomModel.set_vocab = mpt.MPTModel.set_vocab = \
    command_r.Cohere2MoeModel.set_vocab = gptneox.GPTNeoXModel.set_vocab = stablelm.StableLMModel.set_vocab = \
    falcon.FalconModel.set_vocab = exaone.ExaoneModel.set_vocab = qwen.QwenModel.set_vocab = \
    xverse.XverseModel.set_vocab = internlm.InternLM2Model.set_vocab = \
    kimi_linear.KimiLinearModel.set_vocab = dbrx.DbrxModel.set_vocab = bailingmoe.BailingMoeModel.set_vocab = \
    mimo.MimoV2Model.set_vocab = laguna.LagunaModel.set_vocab = jais.Jais2Model.set_vocab = \
    glm.GlmMoeDsaModel.set_vocab = plamo.Plamo2Model.set_vocab = plamo.Plamo3Model.set_vocab = \
    hunyuan.HYV3Model.set_vocab = mellum.MellumModel.set_vocab = \
    bailingmoe.BailingMoeV2Model.set_vocab = grovemoe.GroveMoeModel.set_vocab = \
    chatglm.ChatGLMModel.set_vocab = deci.DeciModel.set_vocab = \
    jais.JaisModel.set_vocab = codeshell.CodeShellModel.set_vocab = refact.RefactModel.set_vocab = \
    maincoder.MaincoderModel.set_vocab = plm.PLMModel.set_vocab = \
    lambda self: self._set_vocab_sentencepiece()
gemma.Gemma4Model.set_vocab = gemma.Gemma3Model.set_vocab  # (without a space prefix, as Gemma 4's vocabulary)
# GPT-NeoX's converter reads rotary_pct, which transformers 5's config keeps as rope_parameters' partial_rotary_factor
_neox_parameters = gptneox.GPTNeoXModel.set_gguf_parameters
def _neox_rotary_pct(self):
    self.hparams.setdefault("rotary_pct", self.rope_parameters["partial_rotary_factor"])
    _neox_parameters(self)
gptneox.GPTNeoXModel.set_gguf_parameters = _neox_rotary_pct
# StableLM's converter returns, where it means to yield them, the q/k norms of each head that it stacks (StableLM 2
# 12B's): the generator it returns is run here
_stablelm_tensors = stablelm.StableLMModel.modify_tensors
def _stablelm_stacked_norms(self, data_torch, name, bid):
    stacked = yield from _stablelm_tensors(self, data_torch, name, bid)
    if stacked is not None:
        yield from stacked
stablelm.StableLMModel.modify_tensors = _stablelm_stacked_norms
# Falcon's converter reads num_kv_heads, which transformers 5's config fills with the head count where Falcon 7B's
# (multi_query, the old layout) attends with one KV head
_falcon_init = falcon.FalconModel.__init__
def _falcon_kv_heads(self, *args, **kwargs):
    _falcon_init(self, *args, **kwargs)
    if self.hparams.get("multi_query") and not self.hparams.get("new_decoder_architecture"):
        self.hparams["num_kv_heads"] = 1
falcon.FalconModel.__init__ = _falcon_kv_heads
# transformers' ExaoneConfig (which the converter reads EXAONE 3's config.json through) renames its
# activation_function to hidden_act, which the converter's assert does not look for
_exaone_parameters = exaone.ExaoneModel.set_gguf_parameters
def _exaone_activation_named(self):
    self.hparams.setdefault("activation_function", self.hparams.get("hidden_act"))
    _exaone_parameters(self)
exaone.ExaoneModel.set_gguf_parameters = _exaone_activation_named
# Baichuan's converter hands every tensor but W_pack back to its own modify_tensors under the GGUF name, which
# recurses without end; the base class's maps it once
_baichuan_tensors = baichuan.BaichuanModel.modify_tensors
def _baichuan_tensors_mapped_once(self, data_torch, name, bid):
    if name.endswith("W_pack.weight"):
        return _baichuan_tensors(self, data_torch, name, bid)
    return TextModel.modify_tensors(self, data_torch, name, bid)
baichuan.BaichuanModel.modify_tensors = _baichuan_tensors_mapped_once
# MiMo-V2-Flash's converter reads partial_rotary_factor at the top of rope_parameters, which transformers 5's
# config keeps for each layer type
_mimo2_parameters = mimo.MimoV2Model.set_gguf_parameters
def _mimo2_partial_rotary(self):
    self.rope_parameters.setdefault("partial_rotary_factor",
                                    self.rope_parameters["full_attention"]["partial_rotary_factor"])
    _mimo2_parameters(self)
mimo.MimoV2Model.set_gguf_parameters = _mimo2_partial_rotary
# PLaMo's converter fixes PLaMo-13B's shapes (40 heads of 128 in 5 KV groups, 5120 wide): the tiny model's KV heads
# and its q and output rows regrouped alike, each KV group's heads together
def _plamo_groups(self):
    kv = self.hparams["num_key_value_heads"]
    return self.hparams["num_attention_heads"] // kv, kv
def _plamo_q(self, t):
    return t.reshape(*_plamo_groups(self), -1, t.shape[1]).permute(1, 0, 2, 3).reshape(t.shape)
def _plamo_output(self, t):
    return t.reshape(t.shape[0], *_plamo_groups(self), -1).permute(0, 2, 1, 3).reshape(t.shape)
plamo.PlamoModel.shuffle_attn_q_weight, plamo.PlamoModel.shuffle_attn_output_weight = _plamo_q, _plamo_output
_plamo_parameters = plamo.PlamoModel.set_gguf_parameters
def _plamo_kv_heads(self):
    add = self.gguf_writer.add_head_count_kv
    self.gguf_writer.add_head_count_kv = lambda n: add(self.hparams["num_key_value_heads"])
    _plamo_parameters(self)
plamo.PlamoModel.set_gguf_parameters = _plamo_kv_heads
script, jobs = sys.argv[1], sys.argv[2:]
for src, dst in zip(jobs[::2], jobs[1::2]):
    # (Qwen3.5's converter counts multi-token-prediction layers the tiny models do not have)
    no_mtp = ["--no-mtp"] if src.endswith(("qwen35", "qwen35moe", "qwen3next", "mimo2")) else []
    # (Jais's converter reads ALiBi's max bias from its slopes' values, which a lazy conversion does not hold)
    no_lazy = ["--no-lazy"] if src.endswith("jais") else []
    sys.argv = [script, src, "--outfile", dst, "--outtype", "f32", *no_mtp, *no_lazy]
    # (RWKV's converters gather each layer's lerps in a dict of the class, which the next model would find full)
    rwkv.Rwkv6Model.lerp_weights, rwkv.Rwkv7Model.lerp_weights = {}, {}
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code:
            raise
"""


def convert(llamacpp_source: Path, jobs: list[tuple[Path, Path]]) -> None:
    """llama.cpp's converter on each (HF directory, GGUF F32 path) of `jobs`, in one process (the
    converter puts its own gguf-py first on sys.path)."""
    env = {**os.environ, "PYTHONPATH": str(llamacpp_source)}
    args = [str(p) for job in jobs for p in job]
    r = subprocess.run([sys.executable, "-c", _CONVERT, str(llamacpp_source / "convert_hf_to_gguf.py"), *args],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"convert_hf_to_gguf.py failed:\n{r.stderr[-3000:]}"


@dataclass
class Tiny:
    name: str
    hf_dir: Path
    gguf: Path


def build_family_models(root: Path, llamacpp_source: Path, text: str) -> dict[str, Tiny]:
    """Every family's tiny model under `root`, as a safetensors directory and as llama.cpp's GGUF F32."""
    tokenizer = spm_model(text)
    out, jobs = {}, []
    # (REMOTE_CODE_MOE_NAMES last: Arctic's converter changes the class-wide tensor map the others would read)
    for name in NAMES + MOE_NAMES + ("minicpm",) + REMOTE_CODE_NAMES + RWKV_NAMES + REMOTE_CODE_MOE_NAMES:
        d = root / name
        if name in WORLD_VOCAB_NAMES:  # (its own world vocabulary and chat template)
            rwkv_checkpoint(name, d, text)
            out[name] = Tiny(name, d, root / f"{name}-F32.gguf")
            jobs.append((d, out[name].gguf))
            continue
        if name in RWKV_NAMES:
            rwkv_checkpoint(name, d, text)
        elif name in REMOTE_CODE_NAMES:
            remote_code_checkpoint(name, d)
        elif name in REMOTE_CODE_MOE_NAMES:
            remote_code_moe_checkpoint(name, d)
        else:
            hf_model(name).save_pretrained(d)
        if name == "gemma3n":
            add_reused_kv_tensors(d, GEMMA3N_LAYERS)
        if name == "glm4moe":
            add_nextn_layer(d)
        if name == "hunyuan-moe":  # (the published configs' per-layer lists, which the converter reads)
            cfg = json.loads((d / "config.json").read_text())
            layers = cfg["num_hidden_layers"]
            cfg.update(moe_topk=[EXPERTS_USED] * layers, moe_intermediate_size=[cfg["intermediate_size"]] * layers,
                       num_shared_expert=[1] * layers)
            (d / "config.json").write_text(json.dumps(cfg))
        if name == "afmoe":  # (the published configs' route_norm, which the converter writes as expert_weights_norm)
            cfg = json.loads((d / "config.json").read_text())
            (d / "config.json").write_text(json.dumps({**cfg, "route_norm": True}))
        if name in ("dots1", "minimax-m2"):  # (the router's scoring function, which the converter writes as
            cfg = json.loads((d / "config.json").read_text())  # expert_gating_func, and MiniMax-M2's RoPE width)
            cfg.update(scoring_func="sigmoid", **({"rotary_dim": cfg["head_dim"] // 2} if name == "minimax-m2" else {}))
            (d / "config.json").write_text(json.dumps(cfg))
        if name in ("phimoe", "mistral4"):  # (the published checkpoints' class, which the converter reads)
            cfg = json.loads((d / "config.json").read_text())
            published = {"phimoe": "PhiMoEForCausalLM", "mistral4": "Mistral3ForConditionalGeneration"}[name]
            (d / "config.json").write_text(json.dumps({**cfg, "architectures": [published]}))
        if name == "minicpm":
            cfg = json.loads((d / "config.json").read_text())
            for k in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"):
                del cfg[k]
            cfg.update(MINICPM, architectures=["MiniCPMForCausalLM"], model_type="minicpm")
            (d / "config.json").write_text(json.dumps(cfg))
        if name == "qwen3vlmoe":
            hub_expert_layout(d / "model.safetensors")
        if name == "nemotron_h":
            nemotron_h_config(d)
        if name == "mpt":  # the published checkpoints' class name, which the converter reads
            mpt_config(d)
        elif name == "kimi-linear":
            kimi_linear_converter_layout(d)
        elif name == "mimo2":
            mimo2_converter_layout(d)
        elif name == "laguna":
            converter_expert_layout(d / "model.safetensors", {"mlp.gate.e_score_correction_bias":
                                                              "mlp.experts.e_score_correction_bias"})
        if name.startswith("granitehybrid"):  # the published checkpoints' names of the layer kinds, which the
            cfg = json.loads((d / "config.json").read_text())  # converter reads (transformers writes its own)
            cfg["layer_types"] = list(GRANITE_HYBRID_LAYERS)
            (d / "config.json").write_text(json.dumps(cfg))
        (d / "tokenizer.model").write_bytes(tokenizer)
        (d / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
            "add_bos_token": True, "chat_template": GEMMA_CHAT if name.startswith("gemma") else PHI_CHAT}))
        out[name] = Tiny(name, d, root / f"{name}-F32.gguf")
        source = bitnet_converter_names(d, root / "bitnet-converter") if name == "bitnet" else d
        jobs.append((source, out[name].gguf))
    convert(llamacpp_source, jobs)
    # Mistral's window, which the converter does not write for the llama architecture
    path = out["mistral"].gguf
    with GGUFFile(path) as f:
        md, types = dict(f.metadata), dict(f.metadata_types)
        tensors = [(n, f.tensor(n)) for n in f.tensor_infos]
        md["llama.attention.sliding_window"] = WINDOW
        write_gguf(root / "mistral-window.gguf", md, tensors, metadata_types=types)
    out["mistral"].gguf = root / "mistral-window.gguf"
    # Gemma's converter writes real Gemma's end-of-turn id (107: a byte piece of the tiny vocabulary);
    # the tiny model's is its own <end_of_turn>, as a real file's 107 is
    path = out["gemma"].gguf
    with GGUFFile(path) as f:
        md, types = dict(f.metadata), dict(f.metadata_types)
        tensors = [(n, f.tensor(n)) for n in f.tensor_infos]
        md["tokenizer.ggml.eot_token_id"] = md["tokenizer.ggml.tokens"].index("<end_of_turn>")
        write_gguf(root / "gemma-eot.gguf", md, tensors, metadata_types=types)
    out["gemma"].gguf = root / "gemma-eot.gguf"
    # llama.cpp's plamo2 reads RoPE's width from layer 0's heads: 0 where layer 0 is a Mamba layer, as in every
    # PLaMo 2 checkpoint, and its graph then hangs; the tiny file's layers swapped in pairs, so layer 0 attends
    # (the converter's file stays beside it)
    out["plamo2"].gguf = plamo2_attention_first(out["plamo2"].gguf, root / "plamo2-attention-first.gguf")
    return out


def plamo2_attention_first(src: Path, dst: Path) -> Path:
    """PLaMo 2's GGUF `src` with layers 2i and 2i + 1 swapped (tensors and per-layer head counts), as `dst`."""
    with GGUFFile(src) as f:
        md, types = dict(f.metadata), dict(f.metadata_types)
        swapped = lambda i: i ^ 1  # noqa: E731
        tensors = []
        for name in f.tensor_infos:
            if name.startswith("blk."):
                _, i, rest = name.split(".", 2)
                tensors.append((f"blk.{swapped(int(i))}.{rest}", f.tensor(name)))
            else:
                tensors.append((name, f.tensor(name)))
        for key in ("plamo2.attention.head_count", "plamo2.attention.head_count_kv"):
            md[key] = [md[key][swapped(i)] for i in range(len(md[key]))]
        write_gguf(dst, md, tensors, metadata_types=types)
    return dst


def hub_expert_layout(path: Path) -> None:
    """Qwen3-VL MoE's experts as its published checkpoints (and llama.cpp's converter) have them,
    [experts, in, out]: transformers saves its own [experts, out, in], and transposes either on load
    where the shapes tell which (the tiny expert's width, 96, is neither D nor D / 2, and whole
    blocks of 32 for llama.cpp's quantizer)."""
    from safetensors.torch import load_file, save_file
    w = load_file(path)
    save_file({k: v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v for k, v in w.items()}, path,
              metadata={"format": "pt"})


def deepseek2_kv_b_whole(path: Path, out: Path) -> Path:
    """The deepseek2 GGUF at `path` as an older conversion wrote it: attn_kv_b [H·(no-RoPE + value
    dims), kv_lora_rank] whole (each head's key rows, attn_k_b's transposed, then its value rows),
    key_length / value_length a head's, no _mla keys, and a key/value head for every head."""
    with GGUFFile(path) as f:
        md, types = dict(f.metadata), dict(f.metadata_types)
        tensors = []
        for n in f.tensor_infos:
            if n.endswith("attn_v_b.weight"):
                continue
            t = f.tensor(n)
            if n.endswith("attn_k_b.weight"):  # [H, rank, no-RoPE] and [H, value, rank] -> [H·(no-RoPE + value), rank]
                v = f.tensor(n.replace("attn_k_b", "attn_v_b"))
                n, t = n.replace("attn_k_b", "attn_kv_b"), torch.cat([t.transpose(1, 2), v], 1).reshape(-1, t.shape[1])
            tensors.append((n, t))
    for key in ("key_length", "value_length"):
        md[f"deepseek2.attention.{key}"] = md.pop(f"deepseek2.attention.{key}_mla")
    md["deepseek2.attention.head_count_kv"] = md["deepseek2.attention.head_count"]
    write_gguf(out, md, tensors, metadata_types=types)
    return out


_QUANTIZED: dict = {}


def gguf_of(tiny_model: Tiny, qtype: str) -> Path:
    """The tiny model's GGUF in `qtype` (F32 as converted; Q8_0/Q4_0/Q4_1 and BitNet's ternary TQ1_0/TQ2_0 by
    llama.cpp's quantizer; MXFP4: llama.cpp's MXFP4_MOE, the experts in MXFP4)."""
    if qtype == "F32":
        return tiny_model.gguf
    key = (tiny_model.name, qtype)
    if key not in _QUANTIZED:
        import ggml_ref
        dst = tiny_model.gguf.with_name(f"{tiny_model.name}-{qtype}.gguf")
        ggml_ref.quantize_model(tiny_model.gguf, dst, "MXFP4_MOE" if qtype == "MXFP4" else qtype)
        _QUANTIZED[key] = dst
    return _QUANTIZED[key]


def random_rwkv_model(arch: str, qtype: str = "Q4_1", dtype: torch.dtype = torch.float32, seed: int = 0):
    """random_family_model's RWKV-7, RWKV-6, ARWKV-7 and QRWKV6: the tiny models' sizes (RWKV7, RWKV6, ARWKV7,
    QRWKV6), their linears in `qtype`, the low-rank parts, lerps and RWKV-6's bonus in F32 as llama.cpp keeps them."""
    from lowtune import ops
    from lowtune.families import FAMILIES
    from lowtune.loading import model_class
    from lowtune.model import RWKV7_LORA_RANK_KEYS, ModelConfig
    from lowtune.rwkv import rwkv_linear_names
    fam = FAMILIES[arch]
    v7 = fam.rwkv == 7
    c = (ARWKV7 if v7 else QRWKV6) if fam.rwkv_mlp else RWKV7 if v7 else RWKV6
    d = c["hidden_size"]
    head = c.get("head_size") or c.get("head_dim") or d // c["num_attention_heads"]
    md = {"general.architecture": arch, f"{arch}.embedding_length": d, f"{arch}.block_count": c["num_hidden_layers"],
          f"{arch}.feed_forward_length": c["intermediate_size"], f"{arch}.attention.head_count": 0,
          f"{arch}.vocab_size": V, f"{arch}.{fam.eps_key}": 1e-5, f"{arch}.context_length": 1048576,
          f"{arch}.wkv.head_size": head}
    if fam.rwkv_mlp:
        md[f"{arch}.token_shift_count"] = 1
    if "num_key_value_heads" in c:  # (QRWKV6's grouped k and v)
        md[f"{arch}.attention.head_count_kv"] = c["num_key_value_heads"]
    if v7:
        ranks = ARWKV7_RANKS if fam.rwkv_mlp else [c[k] for k in ("decay_low_rank_dim", "a_low_rank_dim",
                                                                 "v_low_rank_dim", "gate_low_rank_dim")]
        md.update({f"{arch}.attention.{k}_lora_rank": r for k, r in zip(RWKV7_LORA_RANK_KEYS, ranks)})
    else:
        md.update({f"{arch}.time_mix_extra_dim": RWKV6_MIX, f"{arch}.time_decay_extra_dim": RWKV6_DECAY,
                   f"{arch}.rescale_every_n_layers": c.get("rescale_every", 0)})
    config = ModelConfig.from_gguf_metadata(md)
    cls = model_class(config)
    g = torch.Generator().manual_seed(seed)
    w = {"token_embd.weight": ops.quantize(0.25 * torch.randn(V, d, generator=g), qtype),
         "output.weight": ops.quantize(torch.randn(V, d, generator=g) / math.sqrt(d), qtype)}
    for n in ("output_norm",) if fam.rwkv_mlp else ("token_embd_norm", "output_norm"):  # (ARWKV-7's an RMSNorm)
        w[n + ".weight"] = 1.0 + 0.2 * torch.randn(d, generator=g)
        if not fam.rwkv_mlp:
            w[n + ".bias"] = 0.2 * torch.randn(d, generator=g)
    for name, shape in cls.own_tensor_shapes(config).items():
        kind = name.split(".")[2]
        if kind in rwkv_linear_names(config) and name.endswith(".bias"):  # (QRWKV6's r, k and v)
            w[name] = 0.2 * torch.randn(*shape, generator=g)
        elif kind in rwkv_linear_names(config):
            # (RWKV-6's outputs divided as its converter divides them where the stream is halved)
            halved = 0 if not config.rescale_every or kind not in ("time_mix_output", "channel_mix_value") else \
                int(name.split(".")[1]) // config.rescale_every
            w[name] = ops.quantize(torch.randn(*shape, generator=g) / (math.sqrt(shape[1]) * 2 ** halved), qtype)
        elif "lerp" in kind:  # (between x and the position before)
            t = torch.rand(*shape, generator=g)
            w[name] = ops.quantize(t, "F32") if len(shape) == 2 else t
        elif len(shape) == 2:
            w[name] = ops.quantize(torch.randn(*shape, generator=g) / math.sqrt(shape[1]), "F32")
        else:  # (norms about 1, the rest about 0)
            one = name.endswith(".weight") and ("norm" in kind or kind in ("time_mix_ln", "time_mix_k_a"))
            w[name] = float(one) + 0.2 * torch.randn(*shape, generator=g)
    model = cls(config, w, dtype)
    model.metadata = md
    return model.eval()


def random_family_model(arch: str, qtype: str = "Q4_1", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random model of architecture `arch` made straight from GGUF-named weights (matrices in
    `qtype`), with the optional parts of the tiny models above switched on: for machines without
    transformers or llama.cpp's converter (the GPU ones)."""
    from lowtune import ops
    from lowtune.families import FAMILIES
    from lowtune.loading import model_class
    from lowtune.model import ModelConfig, latent_linear_shapes, layer_norm_shapes

    fam = FAMILIES[arch]
    if fam.rwkv:
        return random_rwkv_model(arch, qtype, dtype, seed)
    text = fam.text_of or arch  # (a vision-language model's language model: its text family's parts)
    layers = (len(LFM2_LAYERS) if fam.short_conv else len(NEMOTRON_H_PATTERN) if fam.layer_parts
              else len(GRANITE_HYBRID_LAYERS) if fam.mamba2 else 4 if fam.delta_net or fam.kda
              else {"gemma3": 6, "smollm3": 4, "olmo2": 4, "gemma3n": GEMMA3N_LAYERS, "llama4": 4,
                    "exaone-moe": 4, "cohere2moe": 5, "afmoe": 4, "mimo2": len(MIMO2_LAYERS),
                    "baichuan": BAICHUAN_LAYERS, "deci": len(DECI_BLOCKS), "openelm": len(OPENELM_LAYERS),
                    "gemma4": GEMMA4["num_hidden_layers"]}.get(arch, 2))
    wide = ("ernie4_5", "qwen3", "qwen3moe", "gemma", "gemma2", "gemma3", "glm4", "gemma3n", "glm4moe", "minimax-m2",
            "gemma4")
    hd = 32 if text in wide or fam.delta_net else D // H
    ffn = GEMMA3N_FFN if arch == "gemma3n" else F
    file_ffn = 2 * ffn if fam.ffn_length_both_halves else ffn  # (Qwen's file counts both halves of its MLP)
    md = {"general.architecture": arch, f"{arch}.embedding_length": D, f"{arch}.block_count": layers,
          f"{arch}.feed_forward_length": file_ffn, f"{arch}.attention.head_count": H, f"{arch}.vocab_size": V,
          f"{arch}.attention.head_count_kv": HKV, f"{arch}.attention.key_length": hd,
          f"{arch}.{fam.eps_key}": 1e-5, f"{arch}.context_length": 256}
    if arch == "starcoder":  # multi-query attention
        md["starcoder.attention.head_count_kv"] = 1
    if arch == "mpt":  # ALiBi and q/k/v clamped, as the tiny converted model
        md.update({"mpt.attention.max_alibi_bias": 8.0, "mpt.attention.clamp_kqv": MPT_CLIP_QKV})
    if arch == "refact":  # multi-query attention, as the tiny converted model
        md["refact.attention.head_count_kv"] = 1
    if arch == "jais":  # ALiBi, every head its own K/V, as the tiny converted model
        md.update({"jais.attention.max_alibi_bias": 8.0, "jais.attention.head_count_kv": H})
    if fam.swa_period or arch == "llama":
        md[f"{arch}.attention.sliding_window"] = WINDOW
    if fam.mamba2 or fam.mamba1:  # Mamba2 layers where the file gives no KV heads (beside attention: Falcon-H1),
        #                           NoPE attention, Granite's scales; Mamba's layers
        kv = HKV if fam.parallel_ssm else [0 if t == "mamba" else HKV for t in GRANITE_HYBRID_LAYERS]
        md.update({f"{arch}.attention.head_count_kv": kv,
                   f"{arch}.rope.scaling.finetuned": False, f"{arch}.ssm.conv_kernel": SSM["mamba_d_conv"],
                   f"{arch}.ssm.state_size": SSM["mamba_d_state"], f"{arch}.ssm.group_count": SSM["mamba_n_groups"],
                   f"{arch}.ssm.inner_size": SSM["mamba_expand"] * D,
                   f"{arch}.ssm.time_step_rank": 32 if fam.mamba1 else SSM["mamba_n_heads"],  # (Mamba's dt rank)
                   f"{arch}.embedding_scale": 2.0, f"{arch}.residual_scale": 0.7, f"{arch}.attention.scale": 0.3,
                   f"{arch}.logit_scale": 1.5})
    if fam.mamba_heads:  # (PLaMo 2: Mamba's layers in heads that share one B and C; no heads in its Mamba layers)
        md.update({f"{arch}.ssm.time_step_rank": SSM["mamba_n_heads"], f"{arch}.ssm.group_count": 0,
                   f"{arch}.attention.head_count": [H * bool(k) for k in md[f"{arch}.attention.head_count_kv"]]})
    if fam.layer_parts:  # Nemotron-H's layers of one part: KV heads for attention, a width for an MLP
        md.update({f"{arch}.attention.head_count_kv": [HKV if k == "*" else 0 for k in NEMOTRON_H_PATTERN],
                   f"{arch}.feed_forward_length": [ffn if k == "-" else 0 for k in NEMOTRON_H_PATTERN]})
    if arch == "openelm":  # (its layers' own heads and widths: OPENELM_LAYERS)
        md.update({"openelm.attention.head_count": [h for h, _, _ in OPENELM_LAYERS],
                   "openelm.attention.head_count_kv": [k for _, k, _ in OPENELM_LAYERS],
                   "openelm.feed_forward_length": [int(m * D) for _, _, m in OPENELM_LAYERS]})
    if arch == "deci":  # (its layers' own parts and widths: DECI_BLOCKS)
        md.update({"deci.attention.head_count": [H if group or linear else 0 for group, linear, _ in DECI_BLOCKS],
                   "deci.attention.head_count_kv": [H // group if group else 0 for group, _, _ in DECI_BLOCKS],
                   "deci.feed_forward_length": [{None: 0, 1.0: F, 7.0: 2 * F}[mult] for _, _, mult in DECI_BLOCKS]})
    if fam.attention_free:  # (Mamba-2, Mamba: the converter's head_count and feed_forward_length of 0, no KV heads)
        md.update({f"{arch}.attention.head_count": 0, f"{arch}.feed_forward_length": 0})
        del md[f"{arch}.attention.head_count_kv"], md[f"{arch}.attention.key_length"]
    if arch == "granite":
        md.update({"granite.embedding_scale": 2.0, "granite.residual_scale": 0.7, "granite.attention.scale": 0.3,
                   "granite.logit_scale": 1.5})
    if arch == "gemma2":
        md.update({"gemma2.attn_logit_softcapping": 3.0, "gemma2.final_logit_softcapping": 5.0})
    if arch == "gemma3":
        md.update({"gemma3.final_logit_softcapping": 5.0, "gemma3.rope.freq_base": 1e6})
    if arch == "gemma3n":  # llama.cpp's fixed layout: K/V shared from layer 20 on, sparse gates in the first 10
        md.update({"gemma3n.altup.num_inputs": 4, "gemma3n.altup.active_idx": 0,
                   "gemma3n.embedding_length_per_layer_input": 256, "gemma3n.attention.shared_kv_layers": layers - 20,
                   "gemma3n.activation_sparsity_scale": [1.6448533] * 10 + [-math.inf] * (layers - 10),
                   "gemma3n.rope.freq_base": 1e6, "gemma3n.rope.freq_base_swa": 1e4})
    if arch == "gemma4":  # (tests/family_models.hf_model's gemma4)
        sliding = [t == "sliding_attention" for t in GEMMA4["layer_types"]]
        swa_hd = GEMMA4["head_dim"]
        md.update({"gemma4.attention.sliding_window": WINDOW, "gemma4.attention.sliding_window_pattern": sliding,
                   "gemma4.attention.key_length_swa": swa_hd,
                   "gemma4.attention.value_length": hd, "gemma4.attention.value_length_swa": swa_hd,
                   "gemma4.rope.dimension_count": hd, "gemma4.rope.dimension_count_swa": swa_hd,
                   "gemma4.attention.head_count_kv": [HKV if s else GEMMA4["num_global_key_value_heads"]
                                                      for s in sliding],
                   "gemma4.attention.shared_kv_layers": GEMMA4["num_kv_shared_layers"],
                   "gemma4.feed_forward_length": [F] * (layers - GEMMA4["num_kv_shared_layers"])
                   + [2 * F] * GEMMA4["num_kv_shared_layers"],
                   "gemma4.embedding_length_per_layer_input": GEMMA4["hidden_size_per_layer_input"],
                   "gemma4.rope.freq_base": 1e6, "gemma4.rope.freq_base_swa": 1e4,
                   "gemma4.final_logit_softcapping": 5.0})
    # RoPE on half a head
    if arch in ("glm4", "phi2", "nemotron", "glm4moe", "minimax-m2", "gptneox", "stablelm", "chatglm"):
        md[f"{arch}.rope.dimension_count"] = hd // 2
    if arch == "gptneox":  # (its converter writes no KV head count: as many as the heads)
        md["gptneox.attention.head_count_kv"] = H
    dk, hk, hv = QWEN35_DELTA["linear_key_head_dim"], QWEN35_DELTA["linear_num_key_heads"], \
        QWEN35_DELTA["linear_num_value_heads"]
    if fam.delta_net:  # Gated DeltaNets in every other layer (bf16 drifts less), RoPE on a quarter of each head
        md.update({f"{arch}.rope.dimension_count": hd // 4, f"{arch}.full_attention_interval": 2,
                   f"{arch}.ssm.conv_kernel": QWEN35_DELTA["linear_conv_kernel_dim"], f"{arch}.ssm.state_size": dk,
                   f"{arch}.ssm.group_count": hk, f"{arch}.ssm.time_step_rank": hv, f"{arch}.ssm.inner_size": hv * dk})
    if fam.qkv_clamp:  # OLMo's q, k and v clipped
        md[f"{arch}.attention.clamp_kqv"] = 1.0
    if arch == "apertus":  # xIELU's scalars, each layer's own
        ramp = lambda a, b: [a + b * i for i in range(layers)]  # noqa: E731
        md.update({"xielu.alpha_p": ramp(0.0, 0.2), "xielu.alpha_n": ramp(0.0, -0.1), "xielu.beta": ramp(0.5, 0.1),
                   "xielu.eps": ramp(-1e-6, 0.0)})
    if arch == "gpt-oss":  # YaRN over an original context shorter than the test sequences
        md.update({"gpt-oss.rope.scaling.type": "yarn", "gpt-oss.rope.scaling.factor": 4.0,
                   "gpt-oss.rope.scaling.original_context_length": 32})
    fe = 32  # an expert's width
    if fam.moe and arch not in ("llama", "gemma4"):  # (llama's and Gemma 4's random models stay dense)
        md.update({f"{arch}.expert_count": EXPERTS, f"{arch}.expert_used_count": EXPERTS_USED,
                   f"{arch}.expert_feed_forward_length": fe})
        if arch in ("qwen2moe", "granitemoe", "ernie4_5-moe", "granitehybrid", "qwen35moe",
                    "qwen3next", "hunyuan-moe", "nemotron_h_moe", "cohere2moe"):  # with a shared expert
            md[f"{arch}.expert_shared_feed_forward_length"] = fe
        if arch in ("ernie4_5-moe", "lfm2moe", "deepseek2", "deepseek32", "glm-dsa", "glm4moe", "dots1", "exaone-moe",
                    "cohere2moe", "afmoe", "mistral4", "deepseek"):  # a dense first layer
            md[f"{arch}.leading_dense_block_count"] = 1
        if arch in ("deepseek", "bailingmoe"):  # a shared expert as wide as a routed one (remote_code_moe_checkpoint's)
            md.update({f"{arch}.expert_shared_count": 1, f"{arch}.expert_weights_norm": arch == "bailingmoe"})
        if arch == "grovemoe":  # an adjugate expert for each pair of experts (remote_code_moe_checkpoint's)
            md.update({"grovemoe.experts_per_group": 2, "grovemoe.expert_group_scale": 0.05,
                       "grovemoe.expert_chunk_feed_forward_length": fe})
        if arch == "bailingmoe2":  # (remote_code_moe_checkpoint's: a dense first layer, DeepSeek-V3's routing)
            md.update({"bailingmoe2.expert_shared_count": 1, "bailingmoe2.expert_gating_func": 2,
                       "bailingmoe2.expert_weights_norm": True, "bailingmoe2.expert_weights_scale": 2.5,
                       "bailingmoe2.expert_group_count": 2, "bailingmoe2.expert_group_used_count": 1,
                       "bailingmoe2.leading_dense_block_count": 1, "bailingmoe2.rope.dimension_count": hd // 2})
        if arch == "grok":  # Grok-1's experts, as wide as feed_forward_length; its multipliers and soft-cap
            del md["grok.expert_feed_forward_length"]
            md.update({"grok.feed_forward_length": fe, "grok.embedding_scale": 4.0, "grok.logit_scale": 0.5,
                       "grok.attention.output_scale": 0.2, "grok.attn_logit_softcapping": 3.0})
        if arch == "llama4":  # experts in every other layer, one a token (tests/family_models.hf_model's llama4)
            md.update({"llama4.interleave_moe_layer_step": 2, "llama4.expert_used_count": 1})
    if fam.short_conv:  # the convolution layers give no KV heads
        md.update({f"{arch}.attention.head_count_kv": [0 if t == "conv" else HKV for t in LFM2_LAYERS],
                   f"{arch}.shortconv.l_cache": CONV_KERNEL})
    if arch in ("deepseek2", "deepseek32", "glm-dsa"):  # DeepSeek-V3's latent attention and routing (tests/
        #                                 family_models.hf_model's deepseek3), DeepSeek-V3.2's indexer (its deepseek32)
        rank, nope, rope, v = MLA["kv_lora_rank"], MLA["qk_nope_head_dim"], MLA["qk_rope_head_dim"], MLA["v_head_dim"]
        md.update({f"{arch}.attention.q_lora_rank": 32, f"{arch}.attention.kv_lora_rank": rank,
                   f"{arch}.attention.key_length_mla": nope + rope, f"{arch}.attention.value_length_mla": v,
                   f"{arch}.rope.dimension_count": rope, f"{arch}.expert_shared_count": 1,
                   f"{arch}.expert_gating_func": 2, f"{arch}.expert_weights_norm": True,
                   f"{arch}.expert_weights_scale": 2.5, f"{arch}.expert_group_count": 2,
                   f"{arch}.expert_group_used_count": 1})
    if fam.indexer:
        md.update({f"{arch}.attention.indexer.head_count": 32, f"{arch}.attention.indexer.key_length": 64,
                   f"{arch}.attention.indexer.top_k": DSA_TOP_K})
    if fam.indexer_types:  # (GLM-5.2's shared layers: the second reuses the first's choice)
        md[f"{arch}.attention.indexer.types"] = [True, False]
    if arch == "mistral4":  # DeepSeek's latent attention, softmax routing in groups (hf_model's mistral4)
        rank, nope, rope, v = MLA["kv_lora_rank"], MLA["qk_nope_head_dim"], MLA["qk_rope_head_dim"], MLA["v_head_dim"]
        md.update({"mistral4.attention.q_lora_rank": 32, "mistral4.attention.kv_lora_rank": rank,
                   "mistral4.attention.key_length_mla": nope + rope, "mistral4.attention.value_length_mla": v,
                   "mistral4.rope.dimension_count": rope, "mistral4.expert_shared_count": 1,
                   "mistral4.expert_weights_norm": True, "mistral4.expert_weights_scale": 2.0,
                   "mistral4.expert_group_count": 2, "mistral4.expert_group_used_count": 1})
    if fam.kda:  # Kimi Linear's KDA layers (no KV heads) and latent attention without RoPE, its routing
        #          (tests/family_models.hf_model's kimi-linear)
        rank, nope, rope, v = MLA["kv_lora_rank"], MLA["qk_nope_head_dim"], MLA["qk_rope_head_dim"], MLA["v_head_dim"]
        md.update({f"{arch}.attention.head_count_kv": [0 if t == "linear_attention" else 1 for t in KIMI_LAYERS],
                   f"{arch}.kda.head_dim": KIMI_KDA["linear_head_dim"],
                   f"{arch}.ssm.conv_kernel": KIMI_KDA["linear_conv_kernel_dim"],
                   f"{arch}.attention.kv_lora_rank": rank, f"{arch}.attention.key_length_mla": nope + rope,
                   f"{arch}.attention.value_length_mla": v, f"{arch}.rope.dimension_count": rope,
                   f"{arch}.expert_shared_count": 1, f"{arch}.expert_weights_scale": 2.0,
                   f"{arch}.leading_dense_block_count": 1})
    if arch == "minicpm3":  # its converter's latent attention: attn_kv_b whole, values D / H wide
        md.update({"minicpm3.attention.q_lora_rank": 32, "minicpm3.attention.kv_lora_rank": MLA["kv_lora_rank"],
                   "minicpm3.attention.key_length": MLA["qk_nope_head_dim"] + MLA["qk_rope_head_dim"],
                   "minicpm3.rope.dimension_count": MLA["qk_rope_head_dim"]})
    if arch == "plm":  # its converter's latent attention: q straight from x, attn_kv_b whole, values of their own
        md.update({"plm.attention.kv_lora_rank": MLA["kv_lora_rank"], "plm.attention.head_count_kv": H,
                   "plm.attention.key_length": MLA["qk_nope_head_dim"] + MLA["qk_rope_head_dim"],
                   "plm.attention.value_length": MLA["v_head_dim"],
                   "plm.rope.dimension_count": MLA["qk_rope_head_dim"]})
    if arch in ("glm4moe", "dots1", "exaone-moe", "nemotron_h_moe", "afmoe"):  # GLM-4.5's routing (hf_model's)
        md.update({f"{arch}.expert_shared_count": 1, f"{arch}.expert_gating_func": 2,
                   f"{arch}.expert_weights_norm": True, f"{arch}.expert_weights_scale": 2.0})
    if arch == "mimo2":  # (hf_model's mimo2: sliding layers with twice the KV heads, values of half a head, scaled)
        sliding = [t == "sliding_attention" for t in MIMO2_LAYERS]
        md.update({"mimo2.attention.head_count_kv": [2 * HKV if s else HKV for s in sliding],
                   "mimo2.attention.sliding_window_pattern": sliding, "mimo2.attention.value_length": hd // 2,
                   "mimo2.attention.value_scale": 0.7, "mimo2.rope.dimension_count": hd // 2,
                   "mimo2.rope.freq_base_swa": 1e4, "mimo2.rope.freq_base": 1e6})
    if arch in ("phi3", "phimoe"):
        md.update({f"{arch}.rope.scaling.original_context_length": PHI3_ORIG_CONTEXT,
                   f"{arch}.rope.scaling.attn_factor": 1.18})
    c = ModelConfig.from_gguf_metadata(md)
    if fam.moe_by_router:  # (a dense first layer, as the tiny model's: the layers with a router have experts)
        c = replace(c, moe_layers=tuple(range(1, layers)))
    g = torch.Generator().manual_seed(seed)
    mat = lambda n, k: ops.quantize(torch.randn(n, k, generator=g) / math.sqrt(k), qtype)  # noqa: E731
    vec = lambda n, base=0.0: base + 0.2 * torch.randn(n, generator=g)  # noqa: E731
    # (StarCoder and Refact: one K/V head; GPT-NeoX and Jais: as many as the heads)
    q, kv = H * hd, (1 if arch in ("starcoder", "refact") else H if arch in ("gptneox", "jais") else HKV) * hd
    w = {"token_embd.weight": ops.quantize((0.1 if arch == "gemma3n" else 0.25) * torch.randn(V, D, generator=g),
                                           qtype),
         **({fam.output_norm_tensor + ".weight": vec(D, 1.0)} if fam.norm_weights else {})}
    if arch == "gemma3n":  # AltUp's projections and the per-layer inputs, small q/k norms and AltUp coefficients
        f32 = lambda n, k, s: ops.quantize(s * torch.randn(n, k, generator=g), "F32")  # noqa: E731
        w.update({"altup_proj.weight": mat(3 * D, D), "altup_unembd_proj.weight": mat(3 * D, D),
                  "per_layer_token_embd.weight": ops.quantize(0.1 * torch.randn(V, layers * 256, generator=g), qtype),
                  "per_layer_model_proj.weight": mat(layers * 256, D), "per_layer_proj_norm.weight": vec(256, 1.0)})
        for i in range(layers):
            p = f"blk.{i}."
            w.update({p + "altup_correct_scale.weight": vec(D), p + "altup_correct_coef.weight": f32(4, 4, 0.05),
                      p + "altup_predict_coef.weight": f32(16, 4, 0.05), p + "altup_router.weight": f32(4, D, 0.1),
                      p + "altup_router_norm.weight": vec(D, 1.0), p + "laurel_l.weight": mat(64, D),
                      p + "laurel_r.weight": mat(D, 64), p + "laurel_post_norm.weight": vec(D, 1.0),
                      p + "inp_gate.weight": mat(256, D), p + "proj.weight": mat(D, 256),
                      p + "post_norm.weight": vec(D, 1.0)})
    if arch == "gemma4":  # the per-layer inputs, the global layers' RoPE on a quarter of each head
        pl = GEMMA4["hidden_size_per_layer_input"]
        w.update({"per_layer_token_embd.weight": ops.quantize(0.1 * torch.randn(V, layers * pl, generator=g), qtype),
                  "per_layer_model_proj.weight": mat(layers * pl, D), "per_layer_proj_norm.weight": vec(pl, 1.0),
                  "rope_freqs.weight": torch.tensor([1.0] * (hd // 8) + [1e30] * (hd // 2 - hd // 8))})
        for i in range(layers):
            p = f"blk.{i}."
            w.update({p + "inp_gate.weight": mat(pl, D),  # (rows of 16: F32, as llama.cpp keeps them)
                      p + "proj.weight": ops.quantize(torch.randn(D, pl, generator=g) / math.sqrt(pl), "F32"),
                      p + "post_norm.weight": vec(D, 1.0), p + "layer_output_scale.weight": vec(1, 1.0)})
    if not fam.embed_scale and not fam.short_conv and not fam.sub_norms:  # Gemma, LFM2 and BitNet tie their heads
        w["output.weight"] = mat(V, D)
    if fam.embedding_norm:
        w.update({"token_embd_norm.weight": vec(D, 1.0), "token_embd_norm.bias": vec(D)})
    if fam.learned_positions and arch != "mpt":  # a row a position of the context (MPT's random model: ALiBi)
        w["position_embd.weight"] = ops.quantize(0.25 * torch.randn(256, D, generator=g), "F32")
    # (LayerNorm, MLP, output)
    biased = ("phi2", "starcoder2", "nemotron", "gpt2", "starcoder", "bloom", "gptneox", "jais2", "jais")
    if arch in biased + ("phimoe", "stablelm", "falcon"):  # the final norm's bias, and Phi-2's and PhiMoE's heads'
        w["output_norm.bias"] = vec(D)
        if arch in ("phi2", "phimoe"):
            w["output.bias"] = vec(V)
    for i in range(layers):
        p = f"blk.{i}."
        if c.layer_widths:  # (Gemma 4: each layer's own widths)
            lc = c.at_layer(i)
            q, kv, ffn = lc.n_heads * lc.head_dim, lc.n_kv_heads * lc.head_dim, lc.ffn_dim
        w.update({p + n + ".weight": vec(shape, 0.3 if fam.query_scale == 1.0 and n in ("attn_q_norm", "attn_k_norm")
                                         else 1.0) for n, shape in layer_norm_shapes(c.at_layer(i), i).items()
                 if fam.norm_weights})
        if c.is_ssm(i) and fam.mamba_heads:  # PLaMo 2's: one dt, A and D a head, no convolution bias, dt's, B's and
            m = c.ssm  #                           C's norms
            w.update({p + "ssm_in.weight": mat(2 * m.inner, D), p + "ssm_out.weight": mat(D, m.inner),
                      p + "ssm_x.weight": mat(m.dt_rank + 2 * m.state, m.inner),
                      p + "ssm_dt.weight": mat(m.heads, m.dt_rank),
                      p + "ssm_conv1d.weight": ops.quantize(torch.randn(m.inner, m.conv_kernel, generator=g)
                                                            / math.sqrt(m.conv_kernel), "F32"),
                      p + "ssm_dt.bias": vec(m.heads, -1.0), p + "ssm_a": -torch.exp(vec(m.heads)),
                      p + "ssm_d": vec(m.heads, 1.0), p + "ssm_dt_norm.weight": vec(m.dt_rank, 1.0),
                      p + "ssm_b_norm.weight": vec(m.state, 1.0), p + "ssm_c_norm.weight": vec(m.state, 1.0)})
        elif c.is_ssm(i) and fam.mamba1:  # Mamba's layer: its kernel and A [inner, state] in F32
            m = c.ssm
            w.update({p + "ssm_in.weight": mat(2 * m.inner, D), p + "ssm_out.weight": mat(D, m.inner),
                      p + "ssm_x.weight": mat(m.dt_rank + 2 * m.state, m.inner),
                      p + "ssm_dt.weight": mat(m.inner, m.dt_rank),
                      p + "ssm_conv1d.weight": ops.quantize(torch.randn(m.inner, m.conv_kernel, generator=g)
                                                            / math.sqrt(m.conv_kernel), "F32"),
                      p + "ssm_conv1d.bias": vec(m.inner), p + "ssm_dt.bias": vec(m.inner),
                      p + "ssm_a": ops.quantize(-torch.exp(0.2 * torch.randn(m.inner, m.state, generator=g)), "F32"),
                      p + "ssm_d": vec(m.inner, 1.0)})
        elif c.is_ssm(i):  # a Mamba2 layer in place of attention (beside it: Falcon-H1); its kernel in F32, as
            m = c.ssm  #     llama.cpp keeps it
            w.update({p + "ssm_in.weight": mat(m.in_dim, D), p + "ssm_out.weight": mat(D, m.inner),
                      p + "ssm_conv1d.weight": ops.quantize(torch.randn(m.conv_dim, m.conv_kernel, generator=g)
                                                            / math.sqrt(m.conv_kernel), "F32"),
                      p + "ssm_conv1d.bias": vec(m.conv_dim), p + "ssm_dt.bias": vec(m.heads),
                      p + "ssm_a": -torch.exp(vec(m.heads)), p + "ssm_d": vec(m.heads, 1.0),
                      p + "ssm_norm.weight": vec(m.inner, 1.0)})
        if not c.has_mixer(i) or c.is_ssm(i) and not c.has_attention(i) or i in c.linear_attention_layers:
            pass  # (Nemotron-H's MLP layers; Mamba2's; Deci's linear, attn_output alone)
        elif c.is_conv(i):  # a short convolution in place of attention; its kernel in F32, as llama.cpp keeps it
            w.update({p + "shortconv.in_proj.weight": mat(3 * D, D), p + "shortconv.out_proj.weight": mat(D, D),
                      p + "shortconv.conv.weight": ops.quantize(torch.randn(D, CONV_KERNEL, generator=g)
                                                                / math.sqrt(CONV_KERNEL), "F32")})
        elif c.is_delta(i) and fam.kda:  # Kimi Delta Attention: q, k, v and their kernels (F32) apart,
            inner, dk, L = c.ssm_inner, c.ssm_head_dim, c.ssm_conv_kernel  # the decay and gate low-rank
            w.update({**{p + f"attn_{x}.weight": mat(inner, D) for x in "qkv"},
                      **{p + f"ssm_conv1d_{x}.weight": ops.quantize(torch.randn(inner, L, generator=g) / math.sqrt(L),
                                                                    "F32") for x in "qkv"},
                      p + "ssm_f_a.weight": mat(dk, D), p + "ssm_f_b.weight": mat(inner, dk),
                      p + "ssm_g_a.weight": mat(dk, D), p + "ssm_g_b.weight": mat(inner, dk),
                      p + "ssm_beta.weight": mat(H, D), p + "attn_output.weight": mat(D, inner),
                      p + "ssm_a": -vec(H, 1.0).abs(), p + "ssm_dt.bias": vec(inner),
                      p + "ssm_norm.weight": vec(dk, 1.0)})
        elif c.is_delta(i):  # a Gated DeltaNet in place of attention; its kernel in F32, as llama.cpp keeps it
            ch = c.ssm_conv_channels
            w.update({p + "attn_qkv.weight": mat(ch, D), p + "attn_gate.weight": mat(hv * dk, D),
                      **({p + "ssm_ba.weight": mat(2 * hv, D)} if fam.delta_heads_grouped else  # (Qwen3-Next's)
                         {p + "ssm_alpha.weight": mat(hv, D), p + "ssm_beta.weight": mat(hv, D)}),
                      p + "ssm_out.weight": mat(D, hv * dk), p + "ssm_a": -vec(hv, 1.0).abs(),
                      p + "ssm_dt.bias": vec(hv), p + "ssm_norm.weight": vec(dk, 1.0),
                      p + "ssm_conv1d.weight": ops.quantize(torch.randn(ch, c.ssm_conv_kernel, generator=g)
                                                                / math.sqrt(c.ssm_conv_kernel), "F32")})
        elif arch in ("phi3", "gpt2", "starcoder", "bloom", "mpt", "gptneox", "falcon", "dbrx", "bailingmoe2"):
            w[p + "attn_qkv.weight"] = mat(q + 2 * kv, D)  # fused q/k/v (GPT-2's, StarCoder's, BLOOM's and GPT-NeoX's
            #                                                with a bias)
            if arch in ("gpt2", "starcoder", "bloom", "gptneox"):
                w[p + "attn_qkv.bias"] = vec(q + 2 * kv)
        elif c.kv_lora_rank:
            w.update({p + n + ".weight": mat(*shape) for n, shape in latent_linear_shapes(c).items()
                      if n != "attn_output"})
            if c.indexer_heads and c.indexer_source(i) == i:  # the lightning indexer's (DeepSeek-V3.2)
                heads, width = c.indexer_heads, c.indexer_head_dim
                w.update({p + "indexer.attn_q_b.weight": mat(heads * width, c.q_lora_rank),
                          p + "indexer.attn_k.weight": mat(width, D), p + "indexer.proj.weight": mat(heads, D),
                          p + "indexer.k_norm.weight": vec(width, 1.0), p + "indexer.k_norm.bias": vec(width)})
            q = c.n_heads * c.v_dim  # (attn_output's input)
        elif fam.attn_output_gate:  # q and its gate, head by head
            w.update({p + "attn_q.weight": mat(2 * q, D), p + "attn_k.weight": mat(kv, D),
                      p + "attn_v.weight": mat(kv, D)})
        elif c.has_kv(i):
            w.update({p + "attn_q.weight": mat(q, D), p + "attn_k.weight": mat(kv, D), p + "attn_v.weight": mat(kv, D)})
            if fam.kv_by_layer:  # (MiMo-V2-Flash: values of their own width, a sink per head in sliding layers)
                lc = c.at_layer(i)
                w[p + "attn_v.weight"] = mat(lc.n_kv_heads * lc.v_dim, D)
                q = H * lc.v_dim  # (attn_output's input)
                if c.is_sliding(i):
                    w[p + "attn_sinks.weight"] = vec(H)
            if arch == "gemma4" and not c.is_sliding(i):  # (values from attn_k's projection)
                del w[p + "attn_v.weight"]
        else:  # (Gemma 3n's last layers: K/V reused)
            w[p + "attn_q.weight"] = mat(q, D)
        if not c.has_ffn(i):  # (Nemotron-H's mixer layers)
            pass
        elif c.has_experts(i):  # the router in F32, as llama.cpp keeps it (for sigmoid routing logits of
            # unit size: saturated sigmoids would tie; for DeltaNet models' softer routing, which bf16 flips less)
            router = torch.randn(EXPERTS, D, generator=g) / (math.sqrt(D) if c.expert_gating == 2 or c.delta_layers
                                                             else 1.0)
            w.update({p + "ffn_gate_inp.weight": ops.quantize(router, "F32"),
                      p + "ffn_gate_exps.weight": mat(EXPERTS * fe, D), p + "ffn_up_exps.weight": mat(EXPERTS * fe, D),
                      p + "ffn_down_exps.weight": mat(EXPERTS * D, fe)})
            if not fam.gated:  # (Nemotron-H MoE's experts have no gate)
                del w[p + "ffn_gate_exps.weight"]
            if arch == "gpt-oss":  # biases on the router and the experts, and a sink per head
                w.update({p + "ffn_gate_inp.bias": vec(EXPERTS), p + "attn_sinks.weight": vec(H),
                          **{p + n + ".bias": ops.quantize(0.2 * torch.randn(EXPERTS, r, generator=g), "F32")
                             for n, r in (("ffn_gate_exps", fe), ("ffn_up_exps", fe), ("ffn_down_exps", D))}})
            if c.experts_per_group:  # (Grove MoE's adjugate experts)
                n = EXPERTS // c.experts_per_group
                w.update({p + "ffn_gate_chexps.weight": mat(n * fe, D), p + "ffn_up_chexps.weight": mat(n * fe, D),
                          p + "ffn_down_chexps.weight": mat(n * D, fe)})
            if c.shared_expert_ffn_dim:
                w.update({p + "ffn_gate_shexp.weight": mat(fe, D), p + "ffn_up_shexp.weight": mat(fe, D),
                          p + "ffn_down_shexp.weight": mat(D, fe)})
                if not fam.gated:
                    del w[p + "ffn_gate_shexp.weight"]
                if fam.moe_shared_gate:
                    w[p + "ffn_gate_inp_shexp.weight"] = vec(D)
            if arch in ("ernie4_5-moe", "lfm2moe", "deepseek2", "deepseek32", "glm-dsa", "glm4moe", "dots1",
                        "minimax-m2", "exaone-moe", "nemotron_h_moe", "kimi-linear", "afmoe", "mimo2", "bailingmoe2"):
                # a bias that picks the experts (Kimi Linear's wide apart: the choice the bias's, which bf16 keeps
                # where its DeltaNets' and latent attention's drift would flip near ties)
                w[p + "exp_probs_b.bias"] = vec(EXPERTS) * (20.0 if fam.kda else 1.0)
        elif arch in ("phi3", "glm4"):  # fused gate/up
            w[p + "ffn_up.weight"] = mat(2 * F, D)
        elif not fam.gated:
            w[p + "ffn_up.weight"] = mat(F, D)
        else:
            w.update({p + "ffn_gate.weight": mat(ffn, D), p + "ffn_up.weight": mat(ffn, D)})
        if c.has_attention(i) or i in c.linear_attention_layers:
            w[p + "attn_output.weight"] = mat(D, q)
            if fam.attn_gate:  # (AFMoE's output gate, its own projection)
                w[p + "attn_gate.weight"] = mat(q, D)
        if c.has_ffn(i) and not c.has_experts(i):
            w[p + "ffn_down.weight"] = mat(D, ffn)
        if c.has_experts(i) and fam.moe_residual:  # (Arctic: the dense FFN, D wide, beside the experts)
            w.update({p + "ffn_gate.weight": mat(c.ffn_dim, D), p + "ffn_up.weight": mat(c.ffn_dim, D),
                      p + "ffn_down.weight": mat(D, c.ffn_dim)})
        if text in ("llama", "qwen2", "glm4", "gpt-oss", "phi2", "starcoder2", "nemotron", "glm4moe", "phimoe",
                    "stablelm", "jais2", "jais"):
            w.update({p + n + ".bias": vec(r) for n, r in (("attn_q", q), ("attn_k", kv), ("attn_v", kv))})
        if arch in biased:  # biases on the output, the MLP and the LayerNorms
            w.update({p + "attn_output.bias": vec(D), p + "ffn_up.bias": vec(F), p + "ffn_down.bias": vec(D),
                      **{p + n + ".bias": vec(D) for n in layer_norm_shapes(c)}})
        if arch == "phimoe":  # biases on the output and the norms
            w.update({p + "attn_output.bias": vec(D), **{p + n + ".bias": vec(D) for n in layer_norm_shapes(c)}})
        if arch == "stablelm":  # (StableLM 2 12B's parallel layer: its one LayerNorm's bias, none on q/k's norms)
            w[p + "attn_norm.bias"] = vec(D)
        if arch == "falcon":  # Falcon 40B's two LayerNorms with their biases: attention's attn_norm_2, the FFN's
            w.update({p + "attn_norm.bias": vec(D), p + "attn_norm_2.weight": vec(D, 1.0),
                      p + "attn_norm_2.bias": vec(D)})
    if arch in ("phi3", "phimoe"):
        w["rope_factors_long.weight"] = torch.tensor([1.0 + 0.25 * i for i in range(hd // 2)])
        w["rope_factors_short.weight"] = torch.tensor([1.0 + 0.05 * i for i in range(hd // 2)])
    model = model_class(c)(c, w, dtype)
    model.metadata = md
    return model.eval()


def rand_ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, V, (b, t), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# llama.cpp


def llamacpp(path, n_ctx: int = SEQ, lora=None):
    """llama.cpp on the GGUF at `path` (with the GGUF LoRA adapter `lora` applied), every logit kept."""
    from llama_cpp import Llama
    threads = os.cpu_count() or 1  # llama-cpp-python's default is half the cores
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, seed=0,
                 n_threads=threads, n_threads_batch=threads, lora_path=None if lora is None else str(lora))


def llamacpp_perplexity(llm, windows) -> float:
    """exp(mean NLL) of every token but each window's first, each window (a tensor's rows, or lists
    of ids) run alone (as lowtune.evaluate.perplexity scores them)."""
    nll, n = 0.0, 0
    for w in (windows.tolist() if isinstance(windows, torch.Tensor) else windows):
        llm.reset()
        llm.eval(w)
        logits = np.array(llm.scores[:len(w)], dtype=np.float64)
        top = logits.max(1, keepdims=True)
        lse = np.log(np.exp(logits - top).sum(1)) + top[:, 0]
        nll += float((lse[:-1] - logits[np.arange(len(w) - 1), w[1:]]).sum())
        n += len(w) - 1
    return math.exp(nll / n)


