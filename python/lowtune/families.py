"""Model families: what differs between the decoders lowtune runs, as data.

    family = family_of(metadata)      # the Family of a GGUF's general.architecture, or a ValueError
    family.rope, family.activation    # read by lowtune.model's one decoder
    key_number(metadata, key, 0)      # a metadata number, or a ValueError naming the key (the one reader)

Every family is the same decoder (RMSNorm, RoPE, GQA attention, gated MLP); a Family says
what its architecture changes. The numbers follow llama.cpp (src/models/<arch>.cpp), which runs
the exported files, and its converter (convert_hf_to_gguf.py), which writes them:

    arch          rope  act        post-norms  q/k norm  embed ×√D  soft-caps (attn, final)  windows
    llama         norm  silu       -           -         -          -                        if the file gives one
    smollm3       norm  silu       -           -         -          -                        if the file gives one
    arcee         norm  relu2      -           -         -          -                        if the file gives one
    granite       norm  silu       -           -         from file  -                        if the file gives one
    granitemoe    norm  silu       -           -         from file  -                        if the file gives one
    granitehybrid norm  silu       -           -         from file  -                        if the file gives one
    nemotron_h    none  relu2      -           -         -          -                        if the file gives one
    nemotron_h_moe none relu2      -           -         -          -                        if the file gives one
    mamba2        -     -          -           -         -          -                        -
    falcon-h1     neox  silu       -           -         -          -                        if the file gives one
    mamba         -     -          -           -         -          -                        -
    jamba         none  silu       -           -         -          -                        -
    minicpm       norm  silu       -           -         from file  -                        if the file gives one
    minicpm3      neox  silu       -           -         fixed      -                        if the file gives one
    ernie4_5      norm  silu       -           -         -          -                        if the file gives one
    ernie4_5-moe  norm  silu       -           -         -          -                        if the file gives one
    mistral3      norm  silu       -           -         -          -                        if the file gives one
    qwen2         neox  silu       -           -         -          -                        if the file gives one
    qwen3         neox  silu       -           yes       -          -                        if the file gives one
    qwen3moe      neox  silu       -           yes       -          -                        if the file gives one
    qwen2moe      neox  silu       -           -         -          -                        if the file gives one
    phi2          neox  gelu_tanh  -           -         -          -                        if the file gives one
    gptneox       neox  gelu_tanh  -           -         -          -                        if the file gives one
    stablelm      neox  silu       -           if given  -          -                        if the file gives one
    falcon        neox  gelu_tanh  -           -         -          -                        if the file gives one
    starcoder2    neox  gelu_tanh  -           -         -          -                        if the file gives one
    gpt2          none  gelu_tanh  -           -         -          -                        -
    starcoder     none  gelu_tanh  -           -         -          -                        -
    bloom         none  gelu_tanh  -           -         -          -                        -
    mpt           none  gelu_tanh  -           -         -          -                        -
    phi3          neox  silu       -           -         -          -                        if the file gives one
    phimoe        neox  silu       -           -         -          -                        never (as llama.cpp)
    seed_oss      neox  silu       -           -         -          -                        if the file gives one
    gemma         neox  gelu_tanh  -           -         yes        -                        if the file gives one
    gemma2        neox  gelu_tanh  yes         -         yes        50, 30 by default        every 2nd layer global
    gemma3        neox  gelu_tanh  yes         yes       yes        -, from the file         every 6th layer global
    olmo          norm  silu       -           -         -          -                        if the file gives one
    olmo2         neox  silu       only        whole     -          -                        if the file gives one
    olmoe         neox  silu       -           whole     -          -                        if the file gives one
    exaone4       neox  silu       only        yes       -          -                        64 layers: every 4th global
    exaone-moe    neox  silu       -           yes       -          -                        every 4th global (128)
    glm4          norm  silu       yes         -         -          -                        if the file gives one
    command-r     norm  silu       -           -         -          -                        if the file gives one
    cohere2       norm  silu       -           -         -          -                        every 4th layer global
    cohere2moe    norm  silu       -           -         -          -                        from the file
    hunyuan-dense neox  silu       -           post-RoPE -          -                        if the file gives one
    hunyuan-moe   neox  silu       -           post-RoPE -          -                        if the file gives one
    qwen2vl       neox  silu       -           -         -          -                        if the file gives one
    qwen3vl       neox  silu       -           yes       -          -                        if the file gives one
    qwen3vlmoe    neox  silu       -           yes       -          -                        if the file gives one
    nemotron      neox  relu2      -           -         -          -                        if the file gives one
    jais2         neox  relu2      -           -         -          -                        -
    apertus       neox  xielu      -           yes       -          -                        if the file gives one
    gpt-oss       neox  swiglu_oai -           -         -          -                        every 2nd layer global
    lfm2          neox  silu       -           yes       -          -                        if the file gives one
    lfm2moe       neox  silu       -           yes       -          -                        if the file gives one
    deepseek2     norm  silu       -           -         -          -                        if the file gives one
    mistral4      norm  silu       -           -         -          -                        if the file gives one
    deepseek32    norm  silu       -           -         -          -                        if the file gives one
    glm-dsa       norm  silu       -           -         -          -                        if the file gives one
    llama4        norm  silu       -           L2, roped -          -                        every 4th layer global
    glm4moe       neox  silu       -           if given  -          -                        if the file gives one
    dots1         neox  silu       -           yes       -          -                        if the file gives one
    hy_v3         neox  silu       -           yes       -          -                        if the file gives one
    minimax-m2    neox  silu       -           whole     -          -                        if the file gives one
    gemma3n       neox  gelu_tanh  yes         yes       yes        -, 30 by default         from the file
    gemma4        neox  gelu_tanh  yes         yes       yes        -, 30 by default         from the file
    qwen35        neox  silu       -           yes       -          -                        if the file gives one
    qwen35moe     neox  silu       -           yes       -          -                        if the file gives one
    qwen3next     neox  silu       -           yes       -          -                        if the file gives one
    bitnet        neox  silu       sub-norms   -         -          -                        if the file gives one
    exaone        neox  silu       -           -         -          -                        if the file gives one
    internlm2     norm  silu       -           -         -          -                        if the file gives one
    baichuan      norm  silu       -           -         -          -                        if the file gives one
    qwen          neox  silu       -           -         -          -                        if the file gives one
    orion         neox  silu       -           -         -          -                        if the file gives one
    xverse        norm  silu       -           -         -          -                        if the file gives one
    chatglm       norm  silu       -           -         -          -                        if the file gives one
    deci          norm  silu       -           -         -          -                        if the file gives one
    openelm       neox  silu       -           yes       -          -                        if the file gives one
    jais          none  silu       -           -         -          -                        -
    codeshell     neox  gelu_tanh  -           -         -          -                        if the file gives one
    refact        none  silu       -           -         -          -                        -
    nanbeige      norm  silu       -           -         -          -                        if the file gives one
    plamo         neox  silu       -           -         -          -                        if the file gives one
    maincoder     norm  silu       -           post-RoPE -          -                        if the file gives one
    plm           norm  relu2      -           -         -          -                        if the file gives one
    kimi-linear   none  silu       -           -         -          -                        -
    dbrx          neox  silu       -           -         -          -                        if the file gives one
    deepseek      norm  silu       -           -         -          -                        if the file gives one
    grok          neox  gelu_tanh  yes         -         from file  30 by default, -         if the file gives one
    arctic        norm  silu       -           -         -          -                        if the file gives one
    bailingmoe    norm  silu       -           -         -          -                        if the file gives one
    mimo2         neox  silu       -           -         -          -                        from the file
    afmoe         neox  silu       yes         yes       yes        -                        every 4th global, no RoPE
    laguna        neox  silu       -           yes       -          -                        the first of every 4 global
    plamo2        neox  silu       yes         yes       -          -                        never (as llama.cpp)
    pangu-embedded neox silu       -           -         -          -                        if the file gives one
    plamo3        neox  silu       yes         yes       -          -                        every 8th layer global
    rwkv7         -     -          -           -         -          -                        -
    rwkv6         -     -          -           -         -          -                        -
    arwkv7        -     silu       -           -         -          -                        -
    rwkv6qwen2    -     silu       -           -         -          -                        -
    mellum        neox  silu       -           yes       -          -                        from the file
    bailingmoe2   neox  silu       -           yes       -          -                        if the file gives one
    grovemoe      neox  silu       -           yes       -          -                        if the file gives one

  Command-R (command-r: Command-R, Aya 23, Aya Expanse) and Command R7B (cohere2) norm with
  LayerNorm (no bias), run attention and FFN in parallel on the same normed input, multiply the
  logits by the file's logit_scale and tie the head to the embeddings; cohere2's global layers
  have no RoPE. Cohere2 MoE (cohere2moe) is Command R7B's layer with experts after dense first layers
  (which rotate though global: Family.rope_dense_lead; without the file's pattern the first of every
  4 layers is global), routed by the file's gating (sigmoid unless it says), renormalized and scaled
  as it says, and a shared expert whose output and the experts' are averaged (Family.moe_shared_average);
  llama.cpp norms its files that give layer_norm_rms_epsilon with RMSNorm, which lowtune refuses
  (Family.norm_switch).

  OLMo (olmo: OLMo 1B/7B, OLMo 1.7) is Llama whose norms are LayerNorms without a weight or bias (the
  file holds none: Family.norm_weights) and whose q, k and v are clipped to ± the file's
  attention.clamp_kqv (transformers' clip_qkv) where it gives one (Family.qkv_clamp).
  OLMo 2 and 3 (olmo2) have no norms before attention and FFN, only after ("only"), and norm q and k
  over the whole projection, all heads at once ("whole"); OLMo 3's files give a window (every 4th
  layer global), and its sliding layers take no RoPE scaling (llama.cpp and transformers run them
  with plain RoPE).
  EXAONE 4 (exaone4) is OLMo 2's layer with per-head q/k norms; llama.cpp gives it windows only at
  64 layers (the 32B: 4096 unless the file says, every 4th layer global), and its global layers
  then have no RoPE, as transformers runs any EXAONE 4 with a window.
  EXAONE MoE (exaone-moe: K-EXAONE) norms before attention and FFN (not after, as EXAONE 4), with
  EXAONE 4's per-head q/k norms and global layers without RoPE, and windows at every layer count (128
  unless the file says, every 4th layer global); its experts (a shared one beside them) and NextN layers
  are GLM-4.5 MoE's (below).
  Seed-OSS (seed_oss) is Qwen2's decoder whose FFN norm the file names post_attention_norm.
  Hunyuan dense (hunyuan-dense: Hunyuan 0.5B-7B) norms each head of q and k after RoPE, not before;
  its files carry the RoPE base that its NTK alpha scaling makes (the converter computes it). Hunyuan
  MoE (hunyuan-moe: Hunyuan-A13B) is its attention with experts in every layer (the softmax's top k,
  renormalized) beside a gated shared expert (expert_shared_feed_forward_length wide, else
  feed_forward_length, as llama.cpp reads it).
  GLM-4 (glm4) rotates adjacent pairs of the first rope_dim (half) of each head's dims, as its
  Hugging Face code does (no rows permuted), and keeps gate and up fused in ffn_up as Phi-3 does.

  Granite is Llama with four scales from the file: embeddings × embedding_scale, each attention and
  FFN output × residual_scale before its residual add, queries × attention.scale, logits ÷
  logit_scale. MiniCPM runs Granite's decoder (in llama.cpp too) with its own scales: scale_emb,
  scale_depth / √layers and width / dim_model_base, or llama.cpp's 12, 1.4 / √layers and 256 / width
  where an older file gives none. MiniCPM3 (minicpm3: MiniCPM3-4B) is DeepSeek's latent attention
  (Family.mla; attn_kv_b whole, values hidden / heads wide as llama.cpp reads them, NEOX RoPE on rows as
  Hugging Face keeps them) in MiniCPM's decoder, with the scales llama.cpp's graph fixes whatever the
  file says: embeddings × 12, residuals × 1.4 / √layers, logits × 256 / width.
  Ministral 3 (mistral3) is Llama with YaRN whose beta_fast, beta_slow and log multiplier the file
  gives, and Llama 4's attention temperature: queries beyond the original context × 1 + t ln(1 +
  floor(pos / original context)).
  Mixture-of-experts FFNs (Family.moe), softmax routing: Qwen3-MoE (qwen3moe, Qwen3's attention),
  OLMoE (olmoe, OLMo 2's whole-projection q/k norms with pre-norms; its chosen experts' weights
  not renormalized), Qwen2-MoE (qwen2moe, Qwen2's attention; weights not renormalized, and a
  shared expert scaled by a sigmoid gate), Granite MoE (granitemoe, Granite's scales; a shared
  expert, ungated, where the file has one) in every layer, and llama files that give expert_count
  (Mixtral); ERNIE 4.5 MoE (ernie4_5-moe: ERNIE 4.5's attention, dense first layers, a bias on the
  routing probabilities that picks the experts but does not weigh them, shared experts).
  gpt-oss (gpt-oss) is a mixture of experts in every layer with biases everywhere (q/k/v/output, the
  router, each expert's gate, up and down), a learned sink logit per head that joins each query's
  softmax and takes no value, and llama.cpp's "softmax weight" routing: the top k of the router's
  logits, then the softmax of those k. Its experts' activation is swiglu_oai: g' = min(g, 7),
  u' = clamp(u, -7, 7), g' · sigmoid(1.702 g') · (u' + 1). The FFN norm is post_attention_norm.
  The language models of vision-language files (llama.cpp's converter writes the vision tower to a
  separate mmproj file) are text families' decoders (Family.text_of): Qwen2-VL and Qwen2.5-VL
  (qwen2vl) Qwen2's, Qwen3-VL (qwen3vl) Qwen3's, Qwen3-VL MoE (qwen3vlmoe) Qwen3-MoE's. Their M-RoPE
  (rope.dimension_sections) gives each section of a head's pairs its own position component (time,
  height, width), which llama.cpp sets to the token's position for text tokens: NEOX RoPE. Qwen3-VL's
  deepstack layers add image features to the first layers' outputs; for text tokens llama.cpp adds
  zeros (the padded part of the input embedding), so text runs without them.
  LFM2 (lfm2: LFM2-350M to 2.6B) is a hybrid: the layers whose file gives no KV heads (a head
  count per layer, 0 there) run a short convolution in place of attention (Family.short_conv,
  lowtune.model.ShortConv: in_proj into B, C and x, B·x through a depthwise causal convolution over
  the last shortconv.l_cache positions, C times that, out_proj); the others Qwen3's attention. Its
  final norm is the file's token_embd_norm (llama.cpp reads the output norm under that name), and
  its head is tied to the embeddings. LFM2-MoE (lfm2moe: LFM2-8B-A1B) is LFM2 with experts after its
  dense first layers, routed by llama.cpp's sigmoid gating (2): the top k of sigmoid(logits) plus
  a selection bias that picks but does not weigh, those k sigmoids divided by their sum.
  DeepSeek (deepseek2: DeepSeek-V2/V2-Lite, V3, R1, Moonlight, Kimi K2 and the other models
  llama.cpp's converter writes as deepseek2) attends through latents (Family.mla): q is attn_q(x),
  or attn_q_b(norm(attn_q_a(x))) where the file gives q_lora_rank; attn_kv_a_mqa(x) is a latent c
  of kv_lora_rank (normed by attn_kv_a_norm) and one RoPE key part k_pe that every head shares;
  each head's key is (c · attn_k_b[h], k_pe) and its value attn_v_b[h] · c (older conversions keep
  both in attn_kv_b, and key_length / value_length in place of the _mla keys). Each head of q and
  k is (no-RoPE part, rope.dimension_count RoPE part) of key_length_mla dims, its value
  value_length_mla. The scores are scaled by mscale² / √key_length_mla, mscale the YaRN magnitude
  of the file's yarn_log_multiplier (which it keeps as 0.1 · mscale_all_dim). Its MoE (dense first
  layers, shared experts counted by expert_shared_count) routes by softmax or sigmoid (the file's
  expert_gating_func), picks with the selection bias exp_probs_b, in the best expert groups where
  the file gives them, and renormalizes and scales the weights as expert_weights_norm and
  expert_weights_scale say. Mistral Small 4 (mistral4) is this decoder under its own name (llama.cpp's
  deepseek2 graph: latent attention, softmax routing in expert groups, renormalized and scaled as the file
  says, a shared expert after dense first layers) but for YaRN's mscale, which llama.cpp takes as 1 beside the
  file's mscale_all_dim (deepseek2 alone takes it equal: Family.mla_yarn_mscale); its converter writes no
  attention temperature (llama_4_scaling_beta), and a file that gives one is refused as DeepSeek's.
  DeepSeek-V3.2 (deepseek32: DeepSeek-V3.2-Exp, V3.2) is DeepSeek-V3 with its lightning indexer in every
  layer (Family.indexer, DeepSeek Sparse Attention): each query attends only to the attention.indexer.top_k
  keys the indexer scores best, Σ_h w_h · relu(q_h · k) with q_h = indexer.attn_q_b(q's normed latent)
  (indexer.head_count heads of indexer.key_length), one key indexer.k_norm(indexer.attn_k(x)) (a LayerNorm
  with a bias, ε 1e-6), both NEOX-rotated on their first rope.dimension_count dims, and w =
  indexer.proj(x) / √(heads · key_length); a query with no more than top_k keys before it sees them all,
  as llama.cpp's graph. The selection takes no gradient (transformers runs the indexer without one too):
  the indexer's linears stay frozen. Its NextN layers are GLM-4.5 MoE's (below). Where YaRN's mscale_all_dim
  is not 1, llama.cpp's deepseek32 takes mscale as 1 (deepseek2 alone takes it equal: Family.mla_yarn_mscale),
  the rotation m(1) / m(mscale_all_dim) and the scores m(1)², as lowtune does; transformers (mscale from the
  config) agrees where both are 1, as DeepSeek-V3.2's config gives them.
  GLM-5 (glm-dsa: GLM-5, GLM-5.1, GLM-5.2) is DeepSeek-V3.2's layer with the indexer's RoPE on adjacent pairs
  (as attention's), sigmoid routing unless the file says, and the indexer only in the layers the file's
  attention.indexer.types marks (Family.indexer_types): the others reuse the keys of the last layer before them
  that has one. Without the key, every layer has its own below a context of 1048576 (GLM-5, 5.1), GLM-5.2's
  pattern from there (the first two layers, then every fourth), as llama.cpp reads it. llama.cpp's glm-dsa
  reads no yarn_log_multiplier and norms the indexer's key with ε 0 (f_norm_eps, which it does not read); lowtune
  refuses a glm-dsa file with YaRN (GLM-5's checkpoints have none) and takes ε 0 too (transformers' 1e-6).
  Granite 4.0's hybrids (granitehybrid: Granite 4.0 H micro, tiny, small) are Granite (its scales,
  granitemoe's experts and shared expert where the file has experts) whose layers without KV heads
  (0 in the file's per-layer count) are Mamba2 layers (Family.mamba2, lowtune.model.Mamba2:
  ssm_in into z, xBC and dt; a causal depthwise convolution with a bias and SiLU on xBC; the SSD
  scan of x with A = -exp(A_log), dt = softplus(dt + dt_bias), B and C shared by the heads of a
  group, the D skip; RMSNorm of y · silu(z) over each group; ssm_out). Their converter switches
  RoPE off (rope.scaling.finetuned = false): the attention layers run without positions. Their HF
  class (GraniteMoeHybridForCausalLM) is read and written for the dense models; with experts, as GGUF.
  Nemotron-H (nemotron_h: Nemotron-H, Nemotron Nano 2 9B/12B) puts one part in each layer after its one
  norm (attn_norm; Family.layer_parts, ModelConfig.mlp_layers): a Mamba2 mixer (no KV heads and no FFN
  width in the file's per-layer arrays: Granite 4's Mamba2), attention without RoPE (KV heads), or an MLP
  without a gate, down(relu(up(x))²) (an FFN width); the part's output joins the residual stream. Its HF
  class (NemotronHForCausalLM) is read and written for the dense models; with experts (its config's layer
  kinds say so: nemotron_h_moe) read, each expert's tensors stacked as the converter stacks them, and written
  as GGUF and PEFT adapters.
  Nemotron-H MoE (nemotron_h_moe: Nemotron 3 Nano 30B-A3B) is Nemotron-H whose MLP layers are experts
  without a gate (relu², as its MLP) beside a shared expert (as wide as the file's
  expert_shared_feed_forward_length), routed as GLM-4.5 MoE's (sigmoid, the selection bias, the file's
  renormalization and scale, expert groups where the file gives them); its NextN layers are left out
  as GLM-4.5 MoE's.
  Mamba-2 (mamba2: Mamba-Codestral, the state-spaces Mamba2 models) has no attention and no FFN: each
  layer is Granite 4's Mamba2 mixer alone after attn_norm (Family.attention_free), its output joining
  the residual stream; the file's head_count and feed_forward_length are 0.
  Mamba (mamba: the state-spaces Mamba models, Falcon-Mamba) is Mamba-2's layout with Mamba 1's mixer
  (Family.mamba1, lowtune.model.Mamba: ssm_in gives x and z; x through a causal depthwise convolution with
  its bias and SiLU; ssm_x gives dt, B and C, which Falcon-Mamba's files (ssm.dt_b_c_rms) RMS-norm; dt =
  softplus(ssm_dt(dt)); the selective scan, one row of A [inner, state] a channel; the D skip; y · silu(z)
  into ssm_out).
  Jamba (jamba: Jamba v0.1, Jamba 1.5/1.6/1.7 Mini and Large) runs Mamba's mixer, its dt, B and C
  RMS-normed with the file's weights (ssm_dt_norm, ssm_b_norm, ssm_c_norm), in the layers its file gives
  no KV heads, attention without RoPE in the others, each followed by ffn_norm and an MLP: experts in every
  other layer from the second (Family.moe_step; softmax routing, the chosen weights not renormalized). Its HF
  class (JambaForCausalLM) is read, each expert's tensors stacked as the converter stacks them; as a mixture of
  experts it is written as GGUF and PEFT adapters (on attention and the Mamba linears but dt_proj).
  PLaMo 2 (plamo2: PLaMo 2 1B, 2B, 8B; its checkpoints ship their own modeling code, read as the converted
  GGUF) runs a Mamba mixer in the layers its file gives no heads and attention (q, k and v fused in attn_qkv,
  q and k normed by a weight of each head's own, NEOX RoPE) in the others, each followed by a SwiGLU MLP
  (gate and up fused in ffn_up), both outputs post-normed (post_attention_norm, post_ffw_norm) before the
  residual add. Its mixer is Mamba's layout in heads (Family.mamba_heads): ssm_in gives each head's z and x;
  x through a causal depthwise convolution without a bias and SiLU; ssm_x gives B, C and dt, each RMS-normed
  with its weight; dt = softplus(ssm_dt(dt)), one a head; Mamba2's scan, each head with one A and D, all
  sharing B and C; y · silu(z) into ssm_out. Its post-norms and the dt, B and C norms are tensors without
  .weight (Family.bare_tensors). RoPE turns the whole of each head (key_length): llama.cpp reads RoPE's width
  from layer 0's heads, none where layer 0 is a Mamba layer (as in every PLaMo 2 checkpoint), and its graph
  then does not finish; it runs files whose layer 0 attends as lowtune does.
  PLaMo 3 (plamo3: PLaMo 3 2B and its merges) is PLaMo 2's attention layer in every layer, its q and k norms
  one weight for every head, sliding windows in all but every 8th layer (the file's pattern where it gives
  one), the sliding layers' RoPE base the file's freq_base_swa.
  Falcon-H1 (falcon-h1: Falcon-H1 0.5B to 34B) runs a Mamba2 mixer beside attention in every layer
  (Family.parallel_ssm), both on attn_norm's output and their sum joining the residual stream, then
  ffn_norm and a SwiGLU MLP; its many multipliers are in the weights (the converter folds them in), its
  gated norm of the Mamba2 output is there where the file has ssm_norm, and its FFN norm's tensor is
  blk.N.ffn_norm, without .weight (read as the others' blk.N.ffn_norm.weight).
  Qwen3.5 (qwen35) is a hybrid too: the layers the file marks recurrent (attention.recurrent_layers, or
  all but every full_attention_interval-th) run a Gated DeltaNet (Family.delta_net, lowtune.model's
  gated_delta_rule: a causal depthwise convolution with SiLU over q, k, v, L2-normed q and k, the
  decay g = ssm_a · softplus(alpha + dt) and beta = sigmoid(b), the state [heads, d_k, d_v] updated by
  the delta rule, the output RMS-normed and gated by silu(z)); the others attention whose q projection
  also gives a per-head gate (Family.attn_output_gate: sigmoid(gate) · attention before attn_output),
  per-head q/k norms and RoPE on part of each head. The converter adds the 1 of its zero-centred norms
  (not the gated one) and stores -exp(A_log) as ssm_a. Its FFN norm is post_attention_norm. Qwen3.5-MoE
  (qwen35moe) is Qwen3.5 with Qwen2-MoE's experts in every layer (softmax routing, the chosen weights
  renormalized, a shared expert scaled by a sigmoid gate). Qwen3-Next (qwen3next: Qwen3-Next-80B-A3B)
  is Qwen3.5-MoE as its converter writes it: value heads grouped by q/k head (not tiled), b and a in
  one tensor (ssm_ba, each q/k head's b then its a), plain NEOX RoPE without M-RoPE sections.
  Kimi Linear (kimi-linear: Kimi-Linear-48B-A3B) interleaves Kimi Delta Attention (Family.kda) with
  DeepSeek's latent attention without RoPE: the layers whose head_count_kv is 0 run the Gated DeltaNet
  with attn_q, attn_k and attn_v each through its own causal convolution (ssm_conv1d_q/k/v), a decay for
  each key channel ssm_a · softplus(ssm_f_b(ssm_f_a(x)) + dt), beta = sigmoid(ssm_beta(x)), and each
  head's output RMS-normed (ssm_norm) times sigmoid(ssm_g_b(ssm_g_a(x))) into attn_output; the others
  attend through latents (q straight from x). Its first leading_dense_block_count layers are dense, the
  others DeepSeek-V3's experts (sigmoid routing, the selection bias, renormalized, weighed by
  expert_weights_scale) beside shared experts.
  GLM-4.5 MoE (glm4moe: GLM-4.5, GLM-4.5-Air, GLM-4.6, GLM-4.7) is DeepSeek's routing (sigmoid, the
  selection bias, the file's expert_weights_norm and expert_weights_scale, dense first layers, shared
  experts) after attention with q/k/v biases, RoPE on part of each head and per-head q/k norms where
  the file has them; its FFN norm is post_attention_norm. Its files may end in multi-token-prediction
  (NextN) layers, counted in block_count and by nextn_predict_layers: llama.cpp loads their tensors
  and its graph skips them, so lowtune runs the layers before them, trains nothing of theirs and
  writes their tensors into merged files as they were (Family.nextn_layers).
  PhiMoE (phimoe: Phi-3.5-MoE) is Phi-3's attention (LongRoPE, q/k/v and output biases, an LM head
  with a bias) with experts in every layer, routed as Mixtral's (the softmax's top 2, renormalized), as
  llama.cpp runs it: its norms are RMSNorms plus the file's biases (norm "rms_bias"; the Hugging Face
  model's are LayerNorms), and it reads no window. Transformers' sparsemixer routes otherwise in eval
  (each of the two experts weighed by a softmax over the experts near its own logit).
  dots.llm1 (dots1) is Qwen3's attention (per-head q/k norms) before DeepSeek-V3's routing without
  groups (sigmoid unless the file's expert_gating_func says otherwise, the selection bias, the file's
  expert_weights_norm and expert_weights_scale, dense first layers, shared experts counted by
  expert_shared_count).
  HY V3 (hy_v3: Tencent Hy3) is dots.llm1's layer (per-head q/k norms before NEOX RoPE, sigmoid routing with
  the selection bias, renormalized and scaled as the file says, a shared expert) whose dense layers are the
  ones its file gives no router (Family.moe_by_router, as llama.cpp finds them: its converter writes no
  leading_dense_block_count); its selection bias is exp_probs_b without .bias (Family.bare_tensors).
  MiniMax-M2 (minimax-m2: MiniMax-M2, M2.1) norms q and k over the whole projection (all heads at once,
  OLMo 2's "whole"), rotates part of each head, and routes experts in every layer by sigmoid (unless the
  file's expert_gating_func says otherwise) with the selection bias, the chosen weights renormalized.
  DBRX (dbrx: DBRX Base and Instruct) is MPT's attention with NEOX RoPE: LayerNorms without biases, q, k and v
  fused in attn_qkv and clipped to ± the file's attention.clamp_kqv (Family.qkv_clamp); its FFN norm is
  attn_output_norm, before experts in every layer (the softmax's top k, renormalized).
  DeepSeek-MoE (deepseek: DeepSeek-MoE 16B, DeepSeek LLM's mixtures; not deepseek2's latent attention) is Llama's
  attention before dense first layers (leading_dense_block_count), then experts routed by the softmax's top k,
  not renormalized, weighed by expert_weights_scale, beside expert_shared_count shared experts of their width;
  its checkpoints ship their own code, so it is read as the converter's GGUF.
  Grok-1 (grok) multiplies the embeddings by the file's embedding_scale, the scores by attention.output_scale (in
  place of 1/sqrt(head_dim)) before soft-capping them (attn_logit_softcapping, 30 unless the file says) and the
  logits by logit_scale (Family.file_scales); RMSNorms follow attention (attn_output_norm) and the experts
  (layer_output_norm: Family.post_norm_tensors), which are GeGLU MLPs as wide as feed_forward_length, routed by the
  softmax's top k, renormalized (llama.cpp applies no router soft-cap, whatever the file says). Grok 2's files
  (a dense FFN beside the experts, expert_feed_forward_length) are refused. Its checkpoints ship their own code.
  Snowflake Arctic (arctic: Arctic Base and Instruct) is Llama's layer whose dense FFN is D wide, beside experts in
  every layer (the softmax's top k, renormalized, feed_forward_length wide) that read the layer's input normed by
  ffn_norm_exps, their output joining the layer's (Family.moe_residual). Its checkpoints ship their own code.
  Ling (bailingmoe: Ling-lite, Ling-plus; its converter splits their fused query_key_value) is Llama's attention
  before experts in every layer, routed by the softmax's top k, renormalized as expert_weights_norm says, beside
  expert_shared_count shared experts of their width (DeepSeek's keys). Its checkpoints ship their own code.
  Ling 2.0 (bailingmoe2: Ling-mini-2.0, Ling-flash-2.0, Ring 2.0) fuses q, k and v in attn_qkv, norms each head
  of q and k before RoPE on part of each head, and routes DeepSeek-V3's way after dense first layers (the file's
  gating, the selection bias, expert groups, expert_weights_norm and expert_weights_scale) beside a shared expert
  of expert_shared_feed_forward_length; its NextN layers are left out as GLM-4.5 MoE's.
  Grove MoE (grovemoe: GroveMoE-Base, GroveMoE-Inst) is Qwen3-MoE's layer with an adjugate expert for each group
  of experts_per_group experts (ffn_*_chexps, expert_chunk_feed_forward_length wide: Family.moe_adjugate), run as
  llama.cpp's grovemoe runs them: on the routed experts' output, each of the top min(k, adjugates) experts e
  picking adjugate e // group, weighed by expert e // group's probability (renormalized), their sum × the file's
  expert_group_scale added to the experts' output (lowtune.model.MoE.adjugate_experts).
  Arcee (arcee: AFM-4.5B) is Llama whose MLP has no gate: down(relu(up(x))²).
  MiMo-V2-Flash (mimo2: MiMo-V2-Flash, MiMo-V2.5) attends globally or within the file's window by its per-layer
  pattern, the sliding layers with their own RoPE base, their own KV head count (head_count_kv one a layer:
  Family.kv_by_layer, ModelConfig.at_layer) and gpt-oss's sinks; values are value_length wide (narrower than the
  keys) and the attention's output is scaled by attention.value_scale; RoPE on part of each head. Its layers with
  a router in the file route by sigmoid with the selection bias, the chosen weights renormalized (llama.cpp's fixed
  rule), the others are dense (Family.moe_by_router); its multi-token-prediction layers are GLM-4.5 MoE's.
  AFMoE (afmoe: Arcee's Trinity Mini, Nano, Large) norms before and after attention and the FFN, per-head
  q/k norms, embeddings × √D, each head's output times sigmoid(attn_gate(x)) before attn_output (its own
  projection of the normed input: Family.attn_gate), and leaves RoPE out of every 4th layer (llama.cpp's fixed
  n_no_rope_layer_step, as SmolLM3), the global one where the file gives a window; its experts are DeepSeek-V3's
  routing without groups (sigmoid unless the file says, the selection bias, the file's expert_weights_norm and
  expert_weights_scale, dense first layers, shared experts counted by expert_shared_count).
  Laguna (laguna: poolside's Laguna) is AFMoE's attention without its post-norms, embedding scale and NoPE layers,
  its output gate softplus(attn_gate(x)), one a head where attn_gate has a row a head (XS.2), else one an element
  (M.1); the first of every 4 layers is global where the file gives a window (llama.cpp's dense_first), the
  sliding ones with their own RoPE base and without the global layers' YaRN; its experts are AFMoE's (a shared
  expert expert_shared_feed_forward_length wide). A file whose layers have query head counts of their own (XS.2's
  48 and 64) or rotate the sliding layers over other dims (rope.dimension_count_swa) is refused.
  Mellum (mellum: JetBrains' Mellum2 12B-A2.5B) is Qwen3-MoE (per-head q/k norms, softmax routing renormalized,
  experts in every layer) with the file's sliding layers (every 4th global where it gives no pattern), which rotate
  with the global RoPE base (whatever the file's freq_base_swa: llama.cpp's graph, Family.swa_rope_global_base;
  transformers takes the sliding layers' own) and without the global layers' scaling.
  Llama's decoder from checkpoints that ship their own modeling code, read as the GGUF that llama.cpp's
  converter writes: EXAONE 3 (exaone: EXAONE 3.0 7.8B, EXAONE 3.5 2.4B-32B) with NEOX RoPE (Llama 3's
  rope_freqs in 3.5); InternLM2 (internlm2: InternLM2, InternLM2.5), whose fused wqkv the converter splits;
  Baichuan (baichuan: Baichuan 7B, Baichuan 2 7B), whose W_pack it splits, rotated only at 7B's 32 layers
  (Family.rope_block_counts: llama.cpp gives the 13B's 40 ALiBi, and other counts no positions; lowtune
  refuses both), its head as the file holds it (neither the converter nor llama.cpp normalizes the rows of
  Baichuan 2's NormHead); Qwen (qwen: Qwen-1.8B to 72B, Qwen 1) with NEOX RoPE, q/k/v fused in attn_qkv with
  a bias, and a feed_forward_length of twice the MLP's width (Family.ffn_length_both_halves: the config's
  intermediate_size counts gate and up); Orion (orion: Orion-14B) with NEOX RoPE and LayerNorms with biases;
  XVERSE (xverse: XVERSE-7B to 65B) as Llama; ChatGLM (chatglm: ChatGLM2, ChatGLM3, GLM-4 9B's first
  checkpoints) with RoPE on adjacent pairs of the first half of each head (GLM-4's), q/k/v fused in attn_qkv with
  a bias and gate and up fused in ffn_up (Phi-3's); Deci (deci: DeciLM, Llama-3.1-Nemotron Nano, Super and Ultra)
  as Llama whose layers have their own KV heads and FFN widths (Family.per_layer_blocks: the file's per-layer
  head_count, head_count_kv and feed_forward_length), no attention where the layer has no heads, attn_output
  alone on the normed input in attention's place where it has no KV heads, no FFN where its width is 0 (a layer
  that attends without an FFN is refused: llama.cpp's graph drops its attention's output); OpenELM (openelm:
  OpenELM 270M to 3B) with NEOX RoPE, per-head q/k norms, q/k/v fused in attn_qkv, a tied head, and each layer's
  own query heads, KV heads and FFN width (Family.per_layer_blocks); Jais (jais: Jais 590M to 30B) as GPT-2's
  layer (LayerNorms, q/k/v fused, biases everywhere) with SwiGLU, ALiBi of the file's max bias (Family.alibi
  "file") and muP's scales: of the embeddings and the head, which the converter multiplies in, and of the
  scores, 1 / head_dim (Family.mup_query_scale); CodeShell (codeshell: CodeShell-7B) as StarCoder2's layer with
  q/k/v fused in attn_qkv; Refact (refact: Refact-1.6B) as Llama without RoPE, with one K/V head and ALiBi of
  llama.cpp's fixed max bias 8 (Family.alibi "fixed", as BLOOM's); Nanbeige (nanbeige: Nanbeige 4.x) as Llama,
  where its file runs the layers once (num_loops 1: looped layers are refused); PLaMo (plamo: PLaMo-13B) as
  Llama with NEOX RoPE whose attention and MLP read one norm's output in parallel (Command-R's block with
  RMSNorm); Maincoder (maincoder: Maincoder-1B) as Llama with per-head q/k norms after RoPE (Hunyuan's) on q
  and k rows as its checkpoints keep them (the converter permutes none); PLM (plm: PLM-1.8B) as DeepSeek-V2's
  latent attention (Family.mla; q straight from x, attn_kv_b whole) with an MLP without a gate, relu², and a
  tied head; openPangu Embedded (pangu-embedded: openPangu-Embedded-1B and 7B) with NEOX RoPE and biases on q,
  k, v and the attention's output. Their Hugging Face directories are refused, saying to convert them, but EXAONE
  3's, which transformers reads (and writes) as Llama, and Orion's and openPangu Embedded's (Llama's names) and
  Baichuan's (Llama's, q, k and v in W_pack), which lowtune reads and does not write (Family.hf_writable).
  BitNet (bitnet: BitNet b1.58 2B4T and the 1bitLLM models) is Qwen2's NEOX RoPE without biases, a head
  tied to the embeddings, and RMSNorms inside both branches (Family.sub_norms): attn_sub_norm on the
  attention heads' output before attn_output, ffn_sub_norm on act(gate) · up before ffn_down. Its
  matrices are ternary times one scale per tensor: the converter writes them multiplied out (F32/F16,
  for llama-quantize's TQ1_0/TQ2_0, whose blocks carry the scale), and llama.cpp's graph runs the gate
  with SiLU, whatever the config's hidden_act (BitNet b1.58 2B4T's is relu²; lowtune reads such
  Hugging Face directories with relu² and keeps it in the file's hidden_activation key, which
  llama.cpp's bitnet graph does not read). A file with per-tensor `.scale` tensors (an older
  converter's; lowtune.model) or Microsoft bitnet.cpp's I2_S type (lowtune.gguf_io) is refused with
  what to do.
  StarCoder2 (starcoder2) is Phi-2's layer, not parallel: LayerNorm with biases before attention and
  FFN, an MLP without a gate, biases everywhere.
  GPT-2 (gpt2: GPT-2, DistilGPT2 and their fine-tunes) is StarCoder2's layer without RoPE: the token
  embeddings plus the file's learned absolute position embeddings (position_embd, one row a position,
  which bound the context: Family.learned_positions), LayerNorm with biases, q/k/v fused in attn_qkv
  with its bias, a GELU MLP without a gate, biases everywhere, the head tied where the file has none.
  StarCoder (starcoder: StarCoder 1, StarCoderBase, SantaCoder-style GPT-BigCode, TinyStarCoder) is GPT-2's
  decoder with multi-query attention: one K/V head for every query head.
  BLOOM (bloom: BLOOM, BLOOMZ) is GPT-2's layer without learned positions: the token embeddings normed by
  a LayerNorm with a bias (token_embd_norm), then ALiBi (Family.alibi): each head h adds slope_h × (key
  position - query position) to its scores, the slopes of llama.cpp's max bias 8 (lowtune.model.alibi_slopes,
  for a head count that is not a power of two too).
  MPT (mpt: MPT-7B, MPT-30B) is GPT-2's layer with ALiBi where the file's attention.max_alibi_bias is not 0
  (Family.alibi "file"; learned positions where the file has position_embd), no biases unless the file has
  them, and q, k and v clamped to ± the file's attention.clamp_kqv (clip_qkv). Its GELU is llama.cpp's tanh
  approximation (transformers' MptForCausalLM computes the exact one). Files with q/k LayerNorms (qk_ln) are
  refused: llama.cpp's graph fails on them.
  Phi-2 (phi2) is Command-R's parallel block with LayerNorm biases, an MLP without a gate
  (down(gelu(up(x))), biases everywhere, an untied head with a bias) and RoPE on part of each head.
  GPT-NeoX (gptneox: Pythia, GPT-NeoX-20B and their fine-tunes) is Phi-2's layer whose parallel FFN
  norms x with its own LayerNorm (ffn_norm), as the file's use_parallel_residual says (false: one
  after the other, StarCoder2's layer); q, k and v in one fused attn_qkv (the converter regroups HF's
  rows head by head into q, k, v), no head bias. Its GELU is llama.cpp's tanh form, where Pythia's
  config names the exact one.
  StableLM (stablelm: StableLM 2 1.6B/12B, StableLM-3B-4E1T, StableCode) is Llama's layer with LayerNorm
  (biases on it, q/k/v biases where the file has them), RoPE on part of each head, and, as the file's
  use_parallel_residual says, Command-R's parallel block (StableLM 2 12B); the 12B's q and k are normed
  by a LayerNorm of each head's own weight (attn_q_norm [heads, head_dim], no bias), where the file has them.
  Falcon (falcon: Falcon 7B/40B/180B, Falcon2 11B; Falcon 3 is llama) is GPT-NeoX's parallel layer without
  biases but its LayerNorms', q/k/v fused (one KV head: 7B), RoPE on the whole head, a head that may be tied;
  where the file has a layer's attn_norm_2 (40B, 180B: new_decoder_architecture's ln_attn), attention reads
  that norm of x and the FFN attn_norm's (ln_mlp); without it both read attn_norm's.
  Nemotron (nemotron: Nemotron-3/4, Minitron, Nemotron-Mini) is StarCoder2's layer with a relu²
  MLP and RoPE on part of each head; its LayerNorm1p (x normed · (1 + w) + b) is a LayerNorm whose
  stored weight has the 1 added (the converter adds it, as Gemma's).
  Jais 2 (jais2: Jais-2 8B, 70B) is Nemotron's layer with plain LayerNorms (weights as they are, biases) and RoPE on
  the whole head; llama.cpp reads no window for it.
  Apertus (apertus) is Llama with per-head q/k norms and an MLP without a gate whose activation is
  xIELU, with four scalars per layer from the file's xielu.* arrays (ModelConfig.xielu; the
  alphas before their softplus, glue_ops.xielu).
  Gemma 3n (gemma3n: E2B, E4B) runs Gemma 3's attention and GeGLU inside AltUp: four copies of the
  residual stream (the embedding and three projections of it), predicted from each other before
  each layer and corrected after it; the layer reads the first. Beside attention a low-rank
  residual branch (Laurel); after the FFN a per-layer input (a second embedding table plus a
  projection of the embedding, gated by the layer's output) joins the other copies. Its queries
  are not scaled, v is normed without a weight, the first layers' FFN gates keep only what lies a
  Gaussian quantile above their mean, and the last layers reuse the K/V of the last layer of their
  kind that has its own. lowtune.gemma3n says how, after llama.cpp's gemma3n.
  Gemma 4 (gemma4: E2B, E4B, 31B; the language model) is Gemma 3's layer whose global layers have
  heads of their own width (key_length; the sliding ones' key_length_swa), KV heads of their own
  and RoPE on a quarter of each head (the file's rope_freqs), v normed without a weight, unscaled
  queries; the global layers may take their values from attn_k (no attn_v), the last layers may
  reuse earlier K/V and have wider FFNs (Gemma 3n's rule), a per-layer input may follow the FFN
  (Gemma 3n's, without AltUp) and each layer's output is scaled by its layer_output_scale.
  Its mixture of experts (26B-A4B) runs the experts beside the dense FFN, each with its own norms,
  the router reading the residual stream normed without a weight and scaled (ffn_gate_inp.scale),
  each expert's output scaled by its ffn_down_exps.scale. lowtune.gemma4 says how.
  SmolLM3 is Llama with every 4th layer's RoPE left out (NoPE: q and k unrotated), a rule llama.cpp
  fixes for the architecture (its n_no_rope_layer_step) and the file does not carry.
  Llama 4 (llama4: Scout 17B-16E, Maverick 17B-128E; the language model) leaves RoPE out of every
  4th layer, which attends globally with its queries scaled by 1 + 0.1 ln(1 + floor((pos + 1) / 8192));
  the other layers attend within chunks of 8192 positions (llama.cpp's fixed chunk) and L2-norm q and
  k after RoPE (without a weight; not Maverick, as llama.cpp's use_kq_norm). Every
  interleave_moe_layer_step-th layer routes each token to its top expert by sigmoid, the weight
  multiplying the expert's input (Family.moe_weight_before), beside a shared expert.

  rope "norm" rotates adjacent pairs of each head (the converter permutes Llama's q/k rows into
  that order); "neox" rotates dimension i with i + rope_dim/2, on rows as Hugging Face keeps them.
  Biases (q/k/v/output, FFN, LM head) are used wherever the file has them; fused attn_qkv and
  Phi-3's ffn_up (gate rows, then up rows) are recognised by their tensors.
  RWKV-7 (rwkv7: the RWKV-7 "Goose" world models) has no attention and no gated MLP: each layer runs RWKV-7's
  time mix (its wkv recurrence per head, the token shift, the value residual from the first layer) and its
  channel mix, each after its own LayerNorm (attn_norm, attn_norm_2), in its own model class around
  lowtune.model's embeddings (normed by token_embd_norm) and head (Family.rwkv: lowtune.rwkv says how).
  RWKV-6 (rwkv6: the RWKV-6 "Finch" world models) is RWKV-7's layout with RWKV-6's mixes (a data-dependent
  token shift, the wkv6 recurrence with its bonus u, a gated channel mix) and the residual stream halved
  after every rescale_every_n_layers-th layer. ARWKV-7 (arwkv7: RWKV-7's time mix distilled into Qwen2 7B) runs
  RWKV-7's time mix after an RMSNorm and Qwen2's SwiGLU MLP in place of the channel mix (Family.rwkv_mlp);
  QRWKV6 (rwkv6qwen2: RWKV-6's time mix distilled into Qwen2.5 32B) the same with RWKV-6's time mix, as gated
  linear attention over grouped k and v heads with Qwen2's biases.
  Gemma's RMSNorm weights are stored with the +1 already added (the converter adds it), so every
  family computes x / rms(x) · w from the file's w.

The hf_* fields are the Hugging Face side of the same facts, for loading safetensors directories.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Callable, Mapping


@dataclass(frozen=True)
class Family:
    arch: str                          # general.architecture
    rope: str = "norm"                 # "norm" (adjacent pairs) or "neox" (i and i + rope_dim/2)
    activation: str = "silu"           # of the gate: "silu" (SwiGLU), "gelu_tanh" (GeGLU) or "swiglu_oai"
    #                                    (gpt-oss: clamped, glue_ops.ACTIVATIONS); of ffn_up's output where
    #                                    the MLP has no gate: "relu2" (Arcee, Nemotron), "gelu_tanh"
    #                                    (Phi-2, StarCoder2), glue_ops.UNGATED, or "xielu" (Apertus: its
    #                                    layer's scalars, glue_ops.xielu)
    gated: bool = True                 # the MLP is down(act(gate) · up); False: down(act(up)), no ffn_gate
    ffn_length_both_halves: bool = False  # the file's feed_forward_length counts gate's and up's rows, twice the
    #                                    MLP's width (Qwen: llama.cpp's n_ff / 2)
    norm: str = "rms"                  # "rms": RMSNorm; "layer": LayerNorm without a bias (Command-R);
    #                                    "rms_bias": RMSNorm plus the file's bias (PhiMoE, as llama.cpp runs it)
    norm_weights: bool = True          # the norms' weights (and biases) are the file's; False: none, the file
    #                                    holds no norm tensor (OLMo's LayerNorm without parameters)
    qkv_clamp: bool = False            # q, k and v are clipped to ± the file's attention.clamp_kqv (OLMo, MPT, DBRX)
    norm_switch: bool = False          # llama.cpp norms with RMSNorm where the file gives layer_norm_rms_epsilon
    #                                    (Cohere2 MoE), which lowtune refuses
    parallel: bool = False             # the FFN reads the attention's normed input, and both outputs are
    #                                    added to x at once (Command-R: no ffn_norm)
    parallel_ffn_norm: bool = False    # a parallel FFN norms x with its own ffn_norm (GPT-NeoX)
    attn_norm_2: bool = False          # where the file has a layer's attn_norm_2, attention reads it and the parallel
    #                                    FFN attn_norm (Falcon 40B; DecoderLayer.norm_files)
    parallel_key: bool = False         # the file's use_parallel_residual says whether the layers are
    #                                    parallel (GPT-NeoX; ModelConfig.sequential)
    post_norms: bool = False           # RMSNorm on the attention and FFN outputs before the residual add
    post_norm_tensors: tuple[str, str] = ("post_attention_norm", "post_ffw_norm")  # their GGUF layer names
    #                                    (Grok: attn_output_norm, layer_output_norm)
    pre_norms: bool = True             # RMSNorm on the attention and FFN inputs (OLMo 2 has none)
    ffn_norm_tensor: str = "ffn_norm"  # the GGUF layer name of the FFN's input norm (Seed-OSS:
    #                                    post_attention_norm)
    qk_norm: str = ""                  # RMSNorm on q and k before RoPE: "head" (each head's, Qwen3,
    #                                    Gemma 3) or "whole" (the whole projection's, OLMo 2); "": none
    qk_norm_after_rope: bool = False   # those norms come after RoPE (Hunyuan)
    qk_norm_optional: bool = False     # the per-head q/k norms are there where the file has them (GLM-4.5 MoE)
    qk_norm_per_head: bool = False     # each head has its own q/k norm weight, [heads, head_dim] (StableLM 2 12B)
    short_conv: bool = False           # layers with no KV heads in the file are short convolutions (LFM2)
    mamba2: bool = False               # layers with no KV heads in the file are Mamba2 layers (Granite 4's hybrids)
    rope_switch: bool = False          # rope.scaling.finetuned = false leaves RoPE out of every layer (Granite 4's
    #                                    hybrids, which attend without positions: NoPE)
    nope: bool = False                 # no layer applies RoPE, whatever the file says (Nemotron-H)
    learned_positions: bool = False    # the file's position_embd rows are added to the token embeddings, one a
    #                                    position; their count bounds the context (GPT-2; MPT where the file has
    #                                    them)
    alibi: str = ""                    # ALiBi's biases on the scores: "fixed", llama.cpp's max bias of 8 for the
    #                                    architecture (BLOOM); "file", the file's attention.max_alibi_bias (MPT;
    #                                    0: none); "": none
    embedding_norm: bool = False       # the token embeddings are normed by token_embd_norm (BLOOM's LayerNorm)
    per_layer_blocks: bool = False     # the file's per-layer head_count, head_count_kv and feed_forward_length give
    #                                    each layer's heads, parts and widths (OpenELM): no heads, no attention;
    #                                    no KV heads, a linear in its place; no width, no FFN (Deci;
    #                                    ModelConfig.layer_widths, layer_heads)
    layer_parts: bool = False          # each layer holds one part after its one norm (attn_norm): a Mamba2 or an
    #                                    attention mixer, or an MLP, as the file's per-layer head_count_kv and
    #                                    feed_forward_length say (Nemotron-H; ModelConfig.mlp_layers)
    attention_free: bool = False       # no layer attends and none has an FFN: each is a Mamba2 (or Mamba 1) mixer
    #                                    alone after attn_norm (Mamba-2, Mamba; ModelConfig.mlp_layers empty)
    mamba1: bool = False               # the Mamba layers run Mamba 1's selective scan (lowtune.model.Mamba), not
    #                                    Mamba2's (Mamba, Falcon-Mamba); with attention, the layers without KV
    #                                    heads in the file (Jamba)
    moe_step: int = 1                  # experts in every moe_step-th layer where the file gives no
    #                                    interleave_moe_layer_step (Jamba: 2, as its converted files are laid out)
    parallel_ssm: bool = False         # every layer runs a Mamba2 mixer beside its attention, on the same normed
    #                                    input, the two outputs summed (Falcon-H1); its ssm_norm where the file
    #                                    has one
    mamba_heads: bool = False          # the Mamba 1 layers' (mamba1) channels run in the file's time_step_rank
    #                                    heads, z and x interleaved head by head, B, C and dt from ssm_x (dt of
    #                                    llama.cpp's width max(64, D / 16)), Mamba2's scan (PLaMo 2: MambaShape)
    bare_tensors: tuple[str, ...] = ()  # the layer tensors the file names without .weight (norms: Falcon-H1's
    #                                    ffn_norm; PLaMo 2's post-norms, dt's, B's and C's) or, for the selection
    #                                    bias exp_probs_b, without .bias (HY V3), read under the full name
    output_norm_tensor: str = "output_norm"  # the GGUF name of the final norm (LFM2: token_embd_norm)
    delta_net: bool = False            # the layers the file marks recurrent are Gated DeltaNets (Qwen3.5)
    attn_output_gate: bool = False     # attn_q gives each head's q and a gate, sigmoid(gate) · attention (Qwen3.5)
    attn_gate: str = ""                # the activation of attn_gate(h), the heads' output gate from its own projection
    #                                    of the normed input: "sigmoid" (AFMoE) or "softplus" (Laguna); one value a
    #                                    head where attn_gate has a row a head, else one an element; "": none
    kv_by_layer: bool = False          # head_count_kv one a layer as the file gives it (ModelConfig.at_layer),
    #                                    values value_length wide, the attention's output × attention.value_scale
    #                                    (MiMo-V2-Flash)
    delta_heads_grouped: bool = False  # a DeltaNet's value head i reads q/k head i // (value heads per q/k head)
    #                                    (Qwen3-Next); False: i mod (q/k heads), Qwen3.5's converter's tiling
    kda: bool = False                  # the layers with no KV heads in the file run Kimi Delta Attention: the
    #                                    Gated DeltaNet with a decay for each key channel (Kimi Linear)
    embed_scale: bool = False          # token embeddings multiplied by sqrt(D) (fp32)
    nope_period: int = 0               # every nope_period-th layer has no RoPE (0: every layer rotates)
    nope_global: bool = False          # in a model with sliding layers the global ones have no RoPE
    rope_dense_lead: bool = False      # ... but the dense first layers rotate (Cohere2 MoE)
    window_block_counts: tuple[int, ...] = ()  # llama.cpp reads windows only at these layer counts (EXAONE 4)
    windowless: bool = False           # llama.cpp reads no window from the file (PhiMoE: every layer global)
    rope_block_counts: tuple[int, ...] = ()  # llama.cpp rotates q and k only at these layer counts, ALiBi or no
    #                                    positions at the others, which lowtune refuses (Baichuan: 7B's 32)
    multipliers: bool = False          # Granite's embedding, residual, attention and logit scales (file keys)
    scale_defaults: Callable[[int, int], dict[str, float]] | None = None  # those scales (by layers, width)
    #                                    where the file gives none (older MiniCPM files); without
    #                                    multipliers, the scales whatever the file says (MiniCPM3)
    moe: bool = False                  # the file may route the FFN to experts (expert_count > 0: Mixtral's
    #                                    llama, Qwen3-MoE, OLMoE), as lowtune.model.MoE runs them
    moe_renorm: bool = True            # the chosen experts' weights are divided by their sum (OLMoE: not)
    moe_shared_gate: bool = False      # a shared expert is scaled by sigmoid(x · ffn_gate_inp_shexp) (Qwen2 MoE)
    moe_gating: int = 1                # llama.cpp's expert_gating_func when the file gives none: 1, softmax over
    #                                    every expert, then the top k; 2, the sigmoid of each, then the top k
    #                                    (LFM2-MoE, DeepSeek-V3); 3, the top k logits, then their softmax (gpt-oss)
    moe_weight_keys: bool = False      # the file's expert_weights_norm and expert_weights_scale weigh the
    #                                    chosen experts, and expert_shared_count × the expert width is the
    #                                    shared experts' where the file gives no width of theirs (DeepSeek)
    moe_shared_expert: bool = False    # every expert layer has a shared expert as wide as a routed one (Llama 4)
    moe_weight_before: bool = False    # the chosen experts' weights multiply their input, not their output (Llama 4)
    moe_shared_ffn_width: bool = False  # every expert layer has a shared expert, as wide as feed_forward_length
    #                                    where the file gives no expert_shared_feed_forward_length (Hunyuan MoE)
    moe_shared_average: bool = False   # the experts' output and the shared expert's are averaged (Cohere2 MoE)
    moe_by_router: bool = False        # experts in the layers the file gives a router (ffn_gate_inp), a dense FFN in
    #                                    the others, as llama.cpp finds them (MiMo-V2-Flash's files count no dense
    #                                    layers, HY V3's write no leading_dense_block_count): ModelConfig.routed
    moe_beside_ffn: bool = False       # an expert layer keeps its dense FFN (ffn_gate/up/down), which its model's
    #                                    layer runs beside the experts (Gemma 4: lowtune.gemma4)
    moe_adjugate: bool = False         # each group of experts_per_group experts has an adjugate expert (ffn_*_chexps),
    #                                    run on the experts' output (Grove MoE: lowtune.model.MoE.adjugate_experts)
    moe_residual: bool = False         # with moe_beside_ffn: the experts read the layer's input normed by
    #                                    ffn_norm_exps and their output joins the layer's, the dense FFN D wide
    #                                    after attention (feed_forward_length the experts' width: Arctic)
    nextn_layers: bool = False         # the file's last nextn_predict_layers blocks are multi-token-prediction
    #                                    layers that llama.cpp's graph skips: left out of the model, their
    #                                    tensors kept as they are (GLM-4.5 MoE)
    sub_norms: bool = False            # RMSNorms on the attention heads' output before attn_output (attn_sub_norm)
    #                                    and on act(gate) · up before ffn_down (ffn_sub_norm) (BitNet)
    activation_key: bool = False       # the file's hidden_activation may name the gated MLP's activation
    #                                    ("relu2"; absent: `activation`, as llama.cpp's graph runs it) (BitNet)
    mla_yarn_mscale: bool = False      # YaRN's mscale is the file's mscale_all_dim, so the rotation keeps magnitude 1
    #                                    (llama.cpp's deepseek2 alone; the other latent-attention graphs take mscale
    #                                    1, so m(1) / m(mscale_all_dim) on the rotation, m(1)² on the scores)
    indexer: str = ""                  # DeepSeek's lightning indexer picks the keys each query attends to, its
    #                                    RoPE's pairing ("neox": DeepSeek-V3.2; "norm": GLM-5; "": no indexer)
    indexer_norm_eps: float = 1e-6     # ... its key's LayerNorm ε (llama.cpp's f_norm_eps: GLM-5's 0, unread)
    indexer_types: bool = False        # ... only in the layers attention.indexer.types marks, the others reusing
    #                                    the keys of the last layer before them with one (GLM-5.2)
    mla: bool = False                  # multi-head latent attention (DeepSeek, MiniCPM3): q, k and v from
    #                                    latents, RoPE on the last rope.dimension_count dims of each head,
    #                                    values of their own width
    yarn_keys: bool = False            # YaRN's betas and log multiplier, and the attention temperature,
    #                                    from the file (llama.cpp's mistral3)
    chunked_attention: bool = False    # sliding layers attend within chunks of the window, aligned at 0 (Llama 4)
    l2_qk_norm: bool = False           # q and k of the RoPE layers are RMS-normed without a weight after RoPE,
    #                                    except in 128-expert files (llama.cpp's use_kq_norm: Llama 4)
    nope_temperature: bool = False     # NoPE layers scale queries by position (Llama 4's attn_temperature_tuning)
    swa_period: int = 0                # with a window and no pattern in the file: every swa_period-th layer
    #                                    is global (0: every layer slides), llama.cpp's n_pattern
    swa_global_first: bool = False     # with a period (swa_period or the file's), the first layer of each period
    #                                    is the global one, not the last (llama.cpp's dense_first: Cohere2 MoE)
    default_window: int = 0            # window when the file gives none (0: no sliding window)
    swa_rope_theta: float | None = None  # RoPE base of sliding layers when the file has no freq_base_swa
    #                                      (None: the global base)
    swa_rope_scaled: bool = True       # sliding layers take the global RoPE scaling (linear, YaRN) too
    swa_rope_global_base: bool = False  # sliding layers rotate with the global RoPE base whatever the file's
    #                                    freq_base_swa (llama.cpp's mellum graph)
    attn_softcap: float | None = None  # default attention-score soft-cap (None: the family has none)
    final_softcap: float | None = None  # default final-logit soft-cap (None: the family has none)
    logit_multiplier: bool = False     # the file's logit_scale multiplies the logits (Command-R; Granite's divides)
    file_scales: bool = False          # the file's embedding_scale multiplies the embeddings, attention.output_scale
    #                                    the scores (in place of 1/sqrt(head_dim)) and logit_scale the logits; the
    #                                    file must give all three (Grok)
    wide_query_scale_layers: int = 0   # block count of the 27B model, whose queries llama.cpp scales by
    #                                    1/sqrt(D/H) instead of 1/sqrt(head_dim)
    query_scale: float = 0.0           # queries are multiplied by this (0: 1/sqrt(head_dim); Gemma 3n: 1)
    mup_query_scale: bool = False      # queries are multiplied by 1/head_dim, muP's (Jais, as llama.cpp fixes it)
    altup: bool = False                # AltUp's copies of the residual stream, Laurel and per-layer inputs
    #                                    around each layer, v normed, K/V shared by the last layers
    #                                    (Gemma 3n: lowtune.gemma3n)
    layer_widths: bool = False         # heads, KV heads, RoPE and FFN widths of each layer's own (ModelConfig.
    #                                    at_layer), v normed, K/V shared by the last layers, per-layer inputs
    #                                    and output scales (Gemma 4: lowtune.gemma4)
    rwkv: int = 0                      # RWKV's time mix and channel mix in place of attention and the MLP, in its
    #                                    own model class (7: RWKV-7, 6: RWKV-6; lowtune.rwkv); 0: none
    rwkv_mlp: bool = False             # RWKV's layers run Qwen2's RMSNorms and gated MLP in place of the channel mix,
    #                                    one token shift a layer (ARWKV-7, QRWKV6)
    values_from_keys: bool = False     # a layer without attn_v takes attn_k's projection as its values (Gemma 4)
    hf_architectures: tuple[str, ...] = ()  # config.json "architectures" (the first is written)
    hf_model_types: tuple[str, ...] = ()    # config.json "model_type" (the first is written)
    hf_writable: bool = True           # lowtune writes the HF class's directories and PEFT adapters; False: read
    #                                    only, the class being its checkpoints' own code, which transformers
    #                                    cannot build (Orion, Baichuan)
    hf_norm_offset: float = 0.0        # added to HF norm weights to get GGUF's (Gemma, Nemotron's LayerNorm1p: 1)
    hf_permute_qk: bool = False        # HF q/k rows are permuted into GGUF's pair order (Llama)
    spm_space_prefix: bool | None = None  # tokenizer.ggml.add_space_prefix the converter writes for a
    #                                       SentencePiece vocabulary (None: as tokenizer.model says)
    text_of: str = ""                  # a vision-language model's language model: the text family whose
    #                                    decoder and tensor names it has ("": a text model)

    @property
    def own_model(self) -> bool:
        """Whether the family runs its own Model class around lowtune.model's layers (lowtune.gemma3n,
        lowtune.gemma4, lowtune.rwkv), which streaming, compiled and captured layers and the compiled CPU decoder
        refuse."""
        return self.altup or self.layer_widths or bool(self.rwkv)

    @property
    def eps_key(self) -> str:
        """The metadata key (after `<arch>.`) of the norms' epsilon."""
        # (Nemotron-H's converter writes LayerNorm's key for its RMSNorms, which llama.cpp reads so)
        layer_key = self.norm == "layer" or self.layer_parts
        return "attention.layer_norm_epsilon" if layer_key else "attention.layer_norm_rms_epsilon"

    def rotates(self, layer: int) -> bool:
        """Whether layer `layer` applies RoPE (not one of SmolLM3's NoPE layers)."""
        return not self.nope_period or (layer + 1) % self.nope_period != 0


def _minicpm_scales(layers: int) -> dict[str, float]:
    """MiniCPM's embedding and residual scales as llama.cpp fixes them (scale_emb 12, scale_depth 1.4)."""
    return {"embedding_scale": 12.0, "residual_scale": 1.4 / math.sqrt(layers)}


FAMILIES: dict[str, Family] = {f.arch: f for f in (
    Family("llama", moe=True, hf_architectures=("LlamaForCausalLM", "MistralForCausalLM"),
           hf_model_types=("llama", "mistral"), hf_permute_qk=True),
    Family("arcee", activation="relu2", gated=False, hf_architectures=("ArceeForCausalLM",),
           hf_model_types=("arcee",), hf_permute_qk=True),
    Family("smollm3", nope_period=4, hf_architectures=("SmolLM3ForCausalLM",), hf_model_types=("smollm3",),
           hf_permute_qk=True),
    Family("granite", multipliers=True, hf_architectures=("GraniteForCausalLM",), hf_model_types=("granite",),
           hf_permute_qk=True),
    Family("granitemoe", multipliers=True, moe=True, hf_permute_qk=True),
    Family("granitehybrid", multipliers=True, moe=True, mamba2=True, rope_switch=True, hf_permute_qk=True,
           hf_architectures=("GraniteMoeHybridForCausalLM",), hf_model_types=("granitemoehybrid",)),
    Family("nemotron_h", activation="relu2", gated=False, mamba2=True, nope=True, layer_parts=True,
           hf_architectures=("NemotronHForCausalLM",), hf_model_types=("nemotron_h",),
           hf_permute_qk=True),  # (its converter permutes q and k as Llama's, though no layer rotates them)
    # (its class is Nemotron-H's, read as nemotron_h_moe where its layer kinds hold experts)
    Family("nemotron_h_moe", activation="relu2", gated=False, mamba2=True, nope=True, layer_parts=True, moe=True,
           moe_gating=2, moe_weight_keys=True, nextn_layers=True, hf_architectures=("NemotronHForCausalLM",),
           hf_permute_qk=True),
    Family("mamba2", mamba2=True, attention_free=True, hf_architectures=("Mamba2ForCausalLM",),
           hf_model_types=("mamba2",)),
    Family("falcon-h1", rope="neox", mamba2=True, parallel_ssm=True, bare_tensors=("ffn_norm",),
           hf_architectures=("FalconH1ForCausalLM",), hf_model_types=("falcon_h1",)),
    Family("mamba", attention_free=True, mamba1=True, hf_architectures=("MambaForCausalLM",),
           hf_model_types=("mamba",)),
    Family("jamba", mamba1=True, nope=True, moe=True, moe_renorm=False, moe_step=2,
           hf_architectures=("JambaForCausalLM",), hf_model_types=("jamba",)),
    Family("minicpm", multipliers=True, scale_defaults=lambda layers, dim: {
        **_minicpm_scales(layers), "logit_scale": 256.0 / dim}),
    # (llama.cpp's minicpm3 multiplies the logits by 256 / width, where minicpm divides by it)
    Family("minicpm3", rope="neox", mla=True, scale_defaults=lambda layers, dim: {
        **_minicpm_scales(layers), "logit_scale": dim / 256.0}, hf_architectures=("MiniCPM3ForCausalLM",),
           hf_model_types=("minicpm3",)),
    Family("ernie4_5", hf_architectures=("Ernie4_5ForCausalLM",), hf_model_types=("ernie4_5",)),
    Family("ernie4_5-moe", moe=True),
    Family("mistral3", yarn_keys=True, hf_architectures=("Ministral3ForCausalLM",), hf_model_types=("ministral3",),
           hf_permute_qk=True),
    Family("qwen2", rope="neox", hf_architectures=("Qwen2ForCausalLM",), hf_model_types=("qwen2",)),
    Family("qwen3", rope="neox", qk_norm="head", hf_architectures=("Qwen3ForCausalLM",),
           hf_model_types=("qwen3",)),
    Family("qwen3moe", rope="neox", qk_norm="head", moe=True),
    Family("qwen2moe", rope="neox", moe=True, moe_renorm=False, moe_shared_gate=True),
    Family("seed_oss", rope="neox", ffn_norm_tensor="post_attention_norm", hf_architectures=("SeedOssForCausalLM",),
           hf_model_types=("seed_oss",)),
    Family("gpt2", activation="gelu_tanh", gated=False, norm="layer", nope=True, learned_positions=True,
           hf_architectures=("GPT2LMHeadModel",), hf_model_types=("gpt2",)),
    Family("starcoder", activation="gelu_tanh", gated=False, norm="layer", nope=True, learned_positions=True,
           hf_architectures=("GPTBigCodeForCausalLM",), hf_model_types=("gpt_bigcode",)),
    Family("bloom", activation="gelu_tanh", gated=False, norm="layer", nope=True, alibi="fixed", embedding_norm=True,
           hf_architectures=("BloomForCausalLM",), hf_model_types=("bloom",)),
    Family("mpt", activation="gelu_tanh", gated=False, norm="layer", nope=True, learned_positions=True, alibi="file",
           qkv_clamp=True, hf_architectures=("MptForCausalLM", "MPTForCausalLM"), hf_model_types=("mpt",)),
    Family("phi2", rope="neox", activation="gelu_tanh", gated=False, norm="layer", parallel=True,
           hf_architectures=("PhiForCausalLM",), hf_model_types=("phi",)),
    Family("gptneox", rope="neox", activation="gelu_tanh", gated=False, norm="layer", parallel=True,
           parallel_ffn_norm=True, parallel_key=True, hf_architectures=("GPTNeoXForCausalLM",),
           hf_model_types=("gpt_neox",)),
    Family("stablelm", rope="neox", norm="layer", parallel=True, parallel_key=True, qk_norm="head",
           qk_norm_optional=True, qk_norm_per_head=True, hf_architectures=("StableLmForCausalLM",),
           hf_model_types=("stablelm",)),
    Family("falcon", rope="neox", activation="gelu_tanh", gated=False, norm="layer", parallel=True, attn_norm_2=True,
           hf_architectures=("FalconForCausalLM",), hf_model_types=("falcon",)),
    Family("starcoder2", rope="neox", activation="gelu_tanh", gated=False, norm="layer",
           hf_architectures=("Starcoder2ForCausalLM",), hf_model_types=("starcoder2",)),
    Family("phi3", rope="neox", hf_architectures=("Phi3ForCausalLM",), hf_model_types=("phi3",)),
    Family("phimoe", rope="neox", norm="rms_bias", moe=True, windowless=True),
    Family("gemma", rope="neox", activation="gelu_tanh", embed_scale=True, hf_architectures=("GemmaForCausalLM",),
           hf_model_types=("gemma",), hf_norm_offset=1.0, spm_space_prefix=False),
    Family("gemma2", rope="neox", activation="gelu_tanh", post_norms=True, embed_scale=True,
           swa_period=2, default_window=4096, attn_softcap=50.0, final_softcap=30.0,
           wide_query_scale_layers=46, hf_architectures=("Gemma2ForCausalLM",),
           hf_model_types=("gemma2",), hf_norm_offset=1.0, spm_space_prefix=False),
    Family("gemma3", rope="neox", activation="gelu_tanh", post_norms=True, qk_norm="head",
           embed_scale=True, swa_period=6, swa_rope_theta=10000.0, swa_rope_scaled=False,
           final_softcap=0.0, wide_query_scale_layers=62,
           hf_architectures=("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
           hf_model_types=("gemma3_text", "gemma3"), hf_norm_offset=1.0, spm_space_prefix=False),
    Family("olmo", norm="layer", norm_weights=False, qkv_clamp=True, hf_architectures=("OlmoForCausalLM",),
           hf_model_types=("olmo",), hf_permute_qk=True),
    Family("olmo2", rope="neox", pre_norms=False, post_norms=True, qk_norm="whole", swa_period=4,
           swa_rope_scaled=False, hf_architectures=("Olmo2ForCausalLM", "Olmo3ForCausalLM"),
           hf_model_types=("olmo2", "olmo3")),
    Family("olmoe", rope="neox", qk_norm="whole", moe=True, moe_renorm=False),
    Family("exaone4", rope="neox", pre_norms=False, post_norms=True, qk_norm="head", nope_global=True,
           swa_period=4, default_window=4096, window_block_counts=(64,), hf_architectures=("Exaone4ForCausalLM",),
           hf_model_types=("exaone4",)),
    Family("exaone-moe", rope="neox", qk_norm="head", nope_global=True, swa_period=4, default_window=128, moe=True,
           moe_gating=2, moe_weight_keys=True, nextn_layers=True),
    Family("command-r", norm="layer", parallel=True, logit_multiplier=True, hf_architectures=("CohereForCausalLM",),
           hf_model_types=("cohere",)),
    Family("cohere2", norm="layer", parallel=True, logit_multiplier=True, nope_global=True, swa_period=4,
           default_window=4096, hf_architectures=("Cohere2ForCausalLM",), hf_model_types=("cohere2",)),
    Family("cohere2moe", norm="layer", parallel=True, logit_multiplier=True, nope_global=True, rope_dense_lead=True,
           swa_period=4, swa_global_first=True, default_window=4096, norm_switch=True, moe=True, moe_gating=2,
           moe_weight_keys=True, moe_shared_average=True, nextn_layers=True),
    Family("glm4", post_norms=True, hf_architectures=("Glm4ForCausalLM",), hf_model_types=("glm4",)),
    Family("hunyuan-dense", rope="neox", qk_norm="head", qk_norm_after_rope=True,
           hf_architectures=("HunYuanDenseV1ForCausalLM",), hf_model_types=("hunyuan_v1_dense",)),
    Family("hunyuan-moe", rope="neox", qk_norm="head", qk_norm_after_rope=True, moe=True, moe_shared_ffn_width=True),
    Family("nemotron", rope="neox", activation="relu2", gated=False, norm="layer",
           hf_architectures=("NemotronForCausalLM",), hf_model_types=("nemotron",), hf_norm_offset=1.0),
    Family("jais2", rope="neox", activation="relu2", gated=False, norm="layer", windowless=True,
           hf_architectures=("Jais2ForCausalLM",), hf_model_types=("jais2",)),
    Family("apertus", rope="neox", activation="xielu", gated=False, qk_norm="head",
           hf_architectures=("ApertusForCausalLM",), hf_model_types=("apertus",)),
    Family("gpt-oss", rope="neox", activation="swiglu_oai", moe=True, moe_renorm=False, moe_gating=3, swa_period=2,
           ffn_norm_tensor="post_attention_norm"),
    Family("lfm2", rope="neox", qk_norm="head", short_conv=True, output_norm_tensor="token_embd_norm",
           hf_architectures=("Lfm2ForCausalLM",), hf_model_types=("lfm2",)),
    Family("lfm2moe", rope="neox", qk_norm="head", short_conv=True, output_norm_tensor="token_embd_norm", moe=True,
           moe_gating=2),
    Family("deepseek2", moe=True, moe_renorm=False, moe_weight_keys=True, mla=True, mla_yarn_mscale=True),
    Family("mistral4", moe=True, moe_renorm=False, moe_weight_keys=True, mla=True),
    Family("deepseek32", moe=True, moe_renorm=False, moe_weight_keys=True, mla=True, nextn_layers=True,
           indexer="neox"),
    Family("glm-dsa", moe=True, moe_gating=2, moe_renorm=False, moe_weight_keys=True, mla=True, nextn_layers=True,
           indexer="norm", indexer_norm_eps=0.0, indexer_types=True),
    Family("llama4", moe=True, moe_gating=2, moe_renorm=False, moe_shared_expert=True, moe_weight_before=True,
           nope_period=4, swa_period=4, default_window=8192, chunked_attention=True, l2_qk_norm=True,
           nope_temperature=True),
    Family("glm4moe", rope="neox", qk_norm="head", qk_norm_optional=True, ffn_norm_tensor="post_attention_norm",
           moe=True, moe_gating=2, moe_weight_keys=True, nextn_layers=True),
    Family("dots1", rope="neox", qk_norm="head", moe=True, moe_gating=2, moe_weight_keys=True),
    Family("hy_v3", rope="neox", qk_norm="head", moe=True, moe_gating=2, moe_weight_keys=True, moe_by_router=True,
           bare_tensors=("exp_probs_b",)),
    Family("minimax-m2", rope="neox", qk_norm="whole", moe=True, moe_gating=2),
    Family("gemma3n", rope="neox", activation="gelu_tanh", post_norms=True, qk_norm="head", embed_scale=True,
           swa_period=5, final_softcap=30.0, query_scale=1.0, altup=True,
           hf_architectures=("Gemma3nForCausalLM", "Gemma3nForConditionalGeneration"),
           hf_model_types=("gemma3n_text", "gemma3n"), spm_space_prefix=False),
    Family("gemma4", rope="neox", activation="gelu_tanh", post_norms=True, qk_norm="head", embed_scale=True,
           swa_rope_theta=10000.0, final_softcap=30.0, query_scale=1.0, layer_widths=True, values_from_keys=True,
           moe=True, moe_beside_ffn=True, hf_architectures=("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration"),
           hf_model_types=("gemma4_text", "gemma4"), spm_space_prefix=False),
    Family("qwen35", rope="neox", qk_norm="head", ffn_norm_tensor="post_attention_norm", delta_net=True,
           attn_output_gate=True, hf_architectures=("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration"),
           hf_model_types=("qwen3_5_text", "qwen3_5"), hf_norm_offset=1.0),
    Family("qwen35moe", rope="neox", qk_norm="head", ffn_norm_tensor="post_attention_norm", delta_net=True,
           attn_output_gate=True, moe=True, moe_shared_gate=True),
    Family("qwen3next", rope="neox", qk_norm="head", ffn_norm_tensor="post_attention_norm", delta_net=True,
           attn_output_gate=True, delta_heads_grouped=True, moe=True, moe_shared_gate=True),
    # (llama.cpp's kimi-linear renormalizes the chosen experts' weights whatever the file says: moe_renorm)
    Family("kimi-linear", moe=True, moe_gating=2, moe_weight_keys=True, mla=True, nope=True, kda=True),
    Family("mimo2", rope="neox", kv_by_layer=True, moe=True, moe_gating=2, moe_by_router=True, nextn_layers=True),
    Family("afmoe", rope="neox", post_norms=True, qk_norm="head", embed_scale=True, attn_gate="sigmoid",
           nope_period=4, swa_period=4, moe=True, moe_gating=2, moe_weight_keys=True),
    Family("mellum", rope="neox", qk_norm="head", swa_period=4, swa_rope_scaled=False, swa_rope_global_base=True,
           moe=True),
    Family("laguna", rope="neox", qk_norm="head", attn_gate="softplus", swa_period=4, swa_global_first=True,
           swa_rope_scaled=False, moe=True, moe_gating=2, moe_weight_keys=True),
    Family("bitnet", rope="neox", sub_norms=True, activation_key=True,
           hf_architectures=("BitNetForCausalLM", "BitnetForCausalLM"), hf_model_types=("bitnet",)),
    # Llama's decoder from checkpoints that ship their own modeling code (their HF classes: the module doc)
    Family("exaone", rope="neox", hf_architectures=("ExaoneForCausalLM",), hf_model_types=("exaone",)),
    Family("internlm2"),
    Family("baichuan", rope_block_counts=(32,), hf_architectures=("BaichuanForCausalLM", "BaiChuanForCausalLM"),
           hf_model_types=("baichuan",), hf_permute_qk=True, hf_writable=False),
    Family("qwen", rope="neox", ffn_length_both_halves=True),
    Family("orion", rope="neox", norm="layer", hf_architectures=("OrionForCausalLM",), hf_model_types=("orion",),
           hf_writable=False),
    Family("xverse"),
    Family("dbrx", rope="neox", norm="layer", qkv_clamp=True, ffn_norm_tensor="attn_output_norm", moe=True),
    Family("deepseek", moe=True, moe_renorm=False, moe_weight_keys=True),
    Family("grok", rope="neox", activation="gelu_tanh", post_norms=True,
           post_norm_tensors=("attn_output_norm", "layer_output_norm"), attn_softcap=30.0, final_softcap=0.0,
           logit_multiplier=True, file_scales=True, moe=True),
    Family("arctic", moe=True, moe_beside_ffn=True, moe_residual=True),
    Family("bailingmoe", moe=True, moe_weight_keys=True),
    Family("pangu-embedded", rope="neox", hf_architectures=("PanguEmbeddedForCausalLM",),
           hf_model_types=("PanguEmbedded",), hf_writable=False),
    Family("plamo2", rope="neox", qk_norm="head", qk_norm_per_head=True, post_norms=True, windowless=True,
           mamba1=True, mamba_heads=True,
           bare_tensors=("post_attention_norm", "post_ffw_norm", "ssm_dt_norm", "ssm_b_norm", "ssm_c_norm")),
    Family("plamo3", rope="neox", qk_norm="head", post_norms=True, swa_period=8,
           bare_tensors=("post_attention_norm", "post_ffw_norm")),
    Family("rwkv7", norm="layer", embedding_norm=True, rwkv=7),
    Family("rwkv6", norm="layer", embedding_norm=True, rwkv=6),
    Family("arwkv7", rwkv=7, rwkv_mlp=True),
    Family("rwkv6qwen2", rwkv=6, rwkv_mlp=True),
    Family("bailingmoe2", rope="neox", qk_norm="head", moe=True, moe_weight_keys=True, nextn_layers=True),
    Family("grovemoe", rope="neox", qk_norm="head", moe=True, moe_adjugate=True),
    Family("chatglm"),
    Family("deci", per_layer_blocks=True),
    Family("openelm", rope="neox", qk_norm="head", per_layer_blocks=True),
    Family("jais", norm="layer", nope=True, alibi="file", mup_query_scale=True),
    Family("codeshell", rope="neox", activation="gelu_tanh", gated=False, norm="layer"),
    Family("refact", nope=True, alibi="fixed"),
    Family("nanbeige"),
    Family("plamo", rope="neox", parallel=True),
    Family("maincoder", qk_norm="head", qk_norm_after_rope=True),
    Family("plm", activation="relu2", gated=False, mla=True),
)}
# Vision-language architectures: the text family's rules under their own name and Hugging Face classes
# (a MoE one, as its text family, is read from GGUF only)
FAMILIES.update({f.arch: f for f in (
    replace(FAMILIES[text], arch=arch, text_of=text, hf_architectures=classes, hf_model_types=types)
    for arch, text, classes, types in (
        ("qwen2vl", "qwen2", ("Qwen2_5_VLForConditionalGeneration", "Qwen2VLForConditionalGeneration"),
         ("qwen2_5_vl", "qwen2_vl")),
        ("qwen3vl", "qwen3", ("Qwen3VLForConditionalGeneration",), ("qwen3_vl",)),
        ("qwen3vlmoe", "qwen3moe", (), ())))})

SUPPORTED = tuple(FAMILIES)

# xIELU's scalars (Apertus) in the order of ModelConfig.xielu, by the names of their GGUF keys
# (xielu.<name>, without the architecture) and of their HF tensors (mlp.act_fn.<name>)
XIELU_KEYS = ("alpha_p", "alpha_n", "beta", "eps")

# Architectures llama.cpp runs that lowtune refuses, grouped by why.
_MOE = {"mixtral"}
# llama.cpp names these architectures but builds no graph for them, and its converter writes no such file
_NO_GRAPH = {"gptj": "GPT-J"}
_ENCODERS = {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "modern-bert",
             "neo-bert", "eurobert", "t5", "t5encoder", "gemma-embedding", "llama-embed", "wavtokenizer-dec"}


# Hugging Face classes of families lowtune runs from GGUF files only: class -> (architecture, the tensors
# lowtune has no Hugging Face names for)
_GGUF_ONLY_HF = {  # (checkpoints that ship their own modeling code)
                 "InternLM2ForCausalLM": ("internlm2", "InternLM2's wqkv, q/k/v grouped by KV head"),
                 "QWenLMHeadModel": ("qwen", "Qwen's fused c_attn and its tiktoken vocabulary"),
                 "XverseForCausalLM": ("xverse", "XVERSE's tokenizer.json, which the converter rebuilds"),
                 **dict.fromkeys(("Plamo2ForCausalLM", "PLaMo2ForCausalLM"),
                                 ("plamo2", "PLaMo 2's Mamba layers, its norms less their offsets and its vocabulary")),
                 **dict.fromkeys(("Plamo3ForCausalLM", "PLaMo3ForCausalLM"),
                                 ("plamo3", "PLaMo 3's fused q/k/v, its norms less their offsets and its vocabulary")),
                 "RWKV7ForCausalLM": ("rwkv7", "RWKV-7's time mix and channel mix"),
                 "Rwkv7ForCausalLM": ("rwkv7", "RWKV-7's time mix and channel mix"),
                 "Rwkv6ForCausalLM": ("rwkv6", "RWKV-6's time mix and channel mix"),
                 "RwkvHybridForCausalLM": ("arwkv7", "ARWKV-7's time mix"),
                 "RWKV6Qwen2ForCausalLM": ("rwkv6qwen2", "QRWKV6's time mix"),
                 "ChatGLMModel": ("chatglm", "ChatGLM's fused query_key_value and dense_h_to_4h"),
                 "ChatGLMForConditionalGeneration": ("chatglm", "ChatGLM's fused query_key_value and dense_h_to_4h"),
                 "GlmForCausalLM": ("chatglm", "GLM's layers, which the converter writes as ChatGLM's"),
                 "DeciLMForCausalLM": ("deci", "Deci's layers of their own parts and widths (block_configs)"),
                 "OpenELMForCausalLM": ("openelm", "OpenELM's layers of their own heads and widths"),
                 "JAISLMHeadModel": ("jais", "Jais's transposed (Conv1D) weights and muP's scales, which the "
                                     "converter multiplies in"),
                 "CodeShellForCausalLM": ("codeshell", "CodeShell's fused c_attn"),
                 "GPTRefactForCausalLM": ("refact", "Refact's fused kv and gate_up_proj"),
                 "NanbeigeForCausalLM": ("nanbeige", "Nanbeige's looped layers"),
                 "PlamoForCausalLM": ("plamo", "PLaMo's q heads, which the converter regroups by KV head"),
                 "MaincoderForCausalLM": ("maincoder", "Maincoder's layers and their q/k norms after RoPE"),
                 "PLMForCausalLM": ("plm", "PLM's latent attention")}


# llama.cpp's bound on block_count (LLAMA_MAX_LAYERS): a file with more layers is damaged
MAX_LAYERS = 512
RECONVERT = "convert the checkpoint again with llama.cpp's convert_hf_to_gguf.py"
ABSENT = object()


def key_number(md: Mapping, key: str, default=ABSENT, kind: type = int, low: int | None = None):
    """The number GGUF metadata `key` holds, `default` where the file lacks it: a whole one, not negative (at
    least `low` where given), for kind int. The one reader of a metadata number: a file that lacks the key
    without a default or holds a string, an array, a fraction or a size out of range there is refused with a
    ValueError that names the key."""
    v = md.get(key)
    if v is None:
        if default is ABSENT:
            raise ValueError(f"GGUF metadata lacks {key}, which this model needs; {RECONVERT}")
        return default
    return checked_number(key, v, kind, low)


def checked_number(key: str, v, kind: type = int, low: int | None = None):
    """key_number's check of a value (of `key`, or of one of its array's elements)."""
    if not isinstance(v, numbers.Real):  # (numpy's scalars are; strings, arrays and None are not)
        raise ValueError(f"GGUF metadata {key} is {v!r}, where a number belongs: the file is damaged or was not "
                         f"written by llama.cpp's converter; {RECONVERT}")
    if kind is float:
        return float(v)
    if not float(v).is_integer() or v < (low or 0):  # (inf and nan are no whole numbers either)
        what = f"at least {low}" if low else "a whole number, not negative"
        raise ValueError(f"GGUF metadata {key} is {v!r}, where a count or size ({what}) belongs: the file is "
                         f"damaged or was not written by llama.cpp's converter; {RECONVERT}")
    return int(v)


def yarn_magnitude(factor: float, log_multiplier: float = 0.0) -> float:
    """YaRN's scaling of q and k (so of the scores, squared) for a context extended `factor` times:
    m(1) with m(s) = 1 + 0.1 s ln(factor) (1 for factor <= 1), or m(1) / m(log_multiplier) where
    the file gives one (transformers' mscale / mscale_all_dim with mscale 1, as llama.cpp reads it)."""
    m = lambda s: yarn_mscale(factor, s)  # noqa: E731
    return m(1.0) / m(log_multiplier) if log_multiplier else m(1.0)


def yarn_mscale(factor: float, s: float = 1.0) -> float:
    """YaRN's m(s) = 1 + 0.1 s ln(factor) for a context extended `factor` times (1 for factor <= 1)."""
    return 1.0 + 0.1 * s * math.log(factor) if factor > 1.0 else 1.0



def _supported() -> str:
    return "lowtune runs " + ", ".join(SUPPORTED)


def family_of(metadata: Mapping) -> Family:
    """The Family of a GGUF's metadata (general.architecture), or a ValueError naming the
    architecture, why it is refused and what is supported."""
    arch = metadata.get("general.architecture")
    if arch is None:
        raise ValueError(f"the file has no general.architecture; {_supported()}")
    arch = str(arch)
    experts = key_number(metadata, f"{arch}.expert_count", 0)
    if arch in FAMILIES and (FAMILIES[arch].moe or experts == 0):
        return FAMILIES[arch]
    if experts > 0 or arch in _MOE or "moe" in arch:
        raise ValueError(f"{arch!r} is a mixture-of-experts model"
                         + (f" ({experts} experts)" if experts else "")
                         + f", which lowtune does not run; {_supported()} (of mixture-of-experts models: "
                         "Mixtral's llama, " + ", ".join(a for a, fam in FAMILIES.items() if fam.moe and a != "llama")
                         + ")")
    if "mamba" in arch or "rwkv" in arch:
        raise ValueError(f"{arch!r} is a recurrent/state-space model, which lowtune does not run; "
                         f"{_supported()} (attention decoders, Mamba, Mamba-2, their hybrids, RWKV-6, RWKV-7, "
                         "ARWKV-7 and QRWKV6)")
    if arch == "clip":  # (llama.cpp's mmproj files)
        raise ValueError("this is a vision encoder (a multimodal projector, mmproj) file, which lowtune does not "
                         "fine-tune; pass the language model's GGUF, which llama.cpp runs with this file beside it")
    if arch in _NO_GRAPH:
        raise ValueError(f"{arch!r} ({_NO_GRAPH[arch]}) is an architecture llama.cpp names but does not run (it has no "
                         f"graph for it, and its converter writes no {arch} file), so lowtune has nothing to match "
                         f"it against and does not run it either; {_supported()}")
    if arch in _ENCODERS or "bert" in arch or arch.startswith("t5"):
        raise ValueError(f"{arch!r} is an encoder model, which lowtune does not fine-tune; "
                         f"{_supported()} (decoder-only language models)")
    if arch not in FAMILIES:
        raise ValueError(f"architecture {arch!r} is not supported: lowtune does not fine-tune it (llama.cpp may run "
                         f"the file as it is); fine-tune a model of another architecture: {_supported()}")
    return FAMILIES[arch]


def family_of_hf(architectures, model_type: str | None = None) -> Family:
    """The Family of a Hugging Face config's `architectures` list (or, without one, its
    `model_type`), or a ValueError naming what is supported."""
    for name in architectures or ():
        for f in FAMILIES.values():
            if name in f.hf_architectures:
                return f
    if not architectures and model_type is not None:
        for f in FAMILIES.values():
            if model_type in f.hf_model_types:
                return f
    for name in architectures or ():
        if name in _GGUF_ONLY_HF:
            arch, tensors = _GGUF_ONLY_HF[name]
            raise ValueError(f"Hugging Face architecture {name} ({arch}) is read from GGUF only: lowtune has no "
                             f"Hugging Face names for {tensors}; convert the directory with llama.cpp's "
                             "convert_hf_to_gguf.py and load the GGUF")
    what = list(architectures or []) or repr(model_type)
    types = ", ".join(t for f in FAMILIES.values() for t in f.hf_model_types)
    # (each class once: Nemotron-H's is its MoE's too)
    classes = ", ".join(dict.fromkeys(a for f in FAMILIES.values() for a in f.hf_architectures))
    raise ValueError(f"Hugging Face architecture {what} is not supported; lowtune reads {types} "
                     f"checkpoints ({classes}), and the others it runs (mixtures of experts among them) as the "
                     "GGUF that llama.cpp's convert_hf_to_gguf.py writes")
