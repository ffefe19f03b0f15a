"""Mixture-of-experts models (lowtune.model.MoE): Qwen3-MoE (qwen3moe), Mixtral (the llama
architecture with experts), OLMoE (olmoe), Qwen2-MoE (qwen2moe, a gated shared expert), Granite
MoE (granitemoe, an ungated shared expert, Granite's scales), Qwen3-VL MoE's language model
(qwen3vlmoe, Qwen3-MoE's decoder) and gpt-oss (attention sinks, biases on the router and experts,
the softmax of the top k logits, swiglu_oai), as tiny random models built by transformers and
converted by llama.cpp's converter (tests/family_models.py):

* logits equal transformers' (fp32), and the routing matters (routing every token to all experts,
  or to one, renormalizing OLMoE's and Qwen2-MoE's weights, dropping a shared expert or its gate,
  moves them);
* perplexity equals llama.cpp's in F32 and in llama.cpp's own Q8_0 quantization, and greedy
  decoding follows llama.cpp's;
* the KV cache gives the full forward's logits, and the compiled CPU decoder the model's, step by
  step;
* adapters (on the attention; the experts are frozen) train: every adapted linear gets a gradient,
  the gradient reaching the first layer through the later layers' experts; `lowtune finetune`
  runs on the GGUF; a streamed model trains as the resident one;
* exports: the merged GGUF reloads as the adapted model and llama.cpp runs it, and applies the GGUF
  LoRA, at lowtune's perplexity; the PEFT adapter on transformers' model gives lowtune's logits;
* what is refused says why: shared experts, other gating, a merged HF export, compile and capture.
"""
from __future__ import annotations

import pytest
import torch

import lowtune
from lowtune import adapters
from lowtune.compile import compile_model, default_mode
from lowtune.evaluate import perplexity, windows
from lowtune.export import export_hf, export_lora_gguf, export_merged_gguf, export_peft
from lowtune.generate import generate
from lowtune.model import DELTA_LINEAR_NAMES, Model, ModelConfig
from lowtune.tokenizer import load_tokenizer

from family_models import (EXPERTS, EXPERTS_USED, MOE_NAMES, SEQ, gguf_of, hf_model, llamacpp, llamacpp_perplexity,
                           rand_ids, rel_err)
from helpers import compiled_decoder_steps, fill_adapters, llamacpp_greedy, resident_and_streamed
from test_export import make_adapter
from test_families_train_export import adapted_steps, nll_ppl
from test_streaming import assert_trains_alike

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def moe(family_models):
    return {n: family_models[n] for n in MOE_NAMES}


@pytest.fixture(scope="module")
def text_ids(moe, botchan_text):
    """Tokens of part of Botchan in the tiny models' shared vocabulary."""
    return load_tokenizer(Model.from_gguf(moe["qwen3moe"].gguf).metadata).encode(botchan_text[20000:40000],
                                                                                 add_bos=False)


@pytest.mark.transformers
@pytest.mark.parametrize("name", MOE_NAMES)
def test_logits_match_transformers(moe, name):
    ids = rand_ids(2, SEQ)
    model = Model.from_gguf(moe[name].gguf)
    assert (model.config.n_experts, model.config.n_experts_used) == (EXPERTS, EXPERTS_USED)
    assert model.config.arch == {"mixtral": "llama"}.get(name, name)
    assert bool(model.config.shared_expert_ffn_dim) == (name in ("qwen2moe", "granitemoe", "ernie4_5-moe",
                                                                  "qwen35moe", "qwen3next"))
    # ERNIE 4.5 MoE's and LFM2-MoE's first layer is dense (leading_dense_block_count)
    assert [layer.ffn_moe is not None for layer in model.layers] == [name not in ("ernie4_5-moe", "lfm2moe")] + [
        True] * (model.config.n_layers - 1)
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

        for used in (1, EXPERTS):  # the routing matters: other expert counts give other logits
            matters(moes, "n_used", used)
        # OLMoE's and Qwen2 MoE's chosen weights are not renormalized (gpt-oss's sum to 1 already)
        if not model.config.family.moe_renorm and model.config.expert_gating == 1:
            matters(moes, "renorm", True)
        if model.config.shared_expert_ffn_dim:  # the shared expert, and Qwen2 MoE's gate on it, matter
            for what in ("shared_gate", "gate_shexp", "selection_bias"):  # (and ERNIE's selection bias)
                if getattr(moes[0], what) is not None:
                    matters(moes, what, None)
        if name == "lfm2moe":  # its sigmoid routing and its selection bias matter
            for what, off in (("gating", 1), ("selection_bias", None)):
                matters(moes, what, off)
        if name == "gpt-oss":  # its sinks, its routing (the softmax of the top k logits) and biases matter
            matters(list(model.layers), "attn_sinks", None)
            for what, off in (("gating", 1), ("ffn_down_exps_bias", None), ("ffn_up_exps_bias", None)):
                matters(moes, what, off)
        assert rel_err(model(ids), want) < 1e-4  # (everything put back)


@pytest.mark.llamacpp
# (LFM2-MoE and Qwen3.5-MoE: their convolutions' and DeltaNets' activations lose more to llama.cpp's
# rounding of them, as LFM2's and Qwen3.5's do: test_families.py's QUANTIZED_TOL and
# test_lfm2_quantized_perplexity_is_llamacpps_rounding)
@pytest.mark.parametrize("name,qtype,tol", [(n, "F32", 2e-3) for n in MOE_NAMES]
                         + [(n, "Q8_0", 1e-2 if n in ("lfm2moe", "qwen35moe", "qwen3next") else 5e-3)
                            for n in MOE_NAMES]
                         + [("gpt-oss", "MXFP4", 5e-3)])  # (gpt-oss's files keep their experts in MXFP4)
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


@pytest.mark.parametrize("name", MOE_NAMES)
def test_kv_cache_matches_the_full_forward(moe, name):
    model = Model.from_gguf(moe[name].gguf)
    ids = rand_ids(1, 30, seed=3)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, ids.shape[1])
        parts = [model(ids[:, :12], cache)] + [model(ids[:, t:t + 1], cache) for t in range(12, 30)]
    assert rel_err(torch.cat(parts, dim=1), full) < 1e-5


@pytest.mark.parametrize("name", MOE_NAMES)
def test_compiled_cpu_decoder_follows_the_model(moe, name):
    """lowtune._C.CpuDecoder routes each token to its experts (and shared expert) as the model
    does, step by step (gpt-oss: the softmax of the top k logits, biased router and experts,
    swiglu_oai, sinks in the attention; 30 tokens pass its window of 16). LFM2-MoE's short
    convolutions and sigmoid routing are the model's own steps."""
    steps, _, _ = compiled_decoder_steps(Model.from_gguf(gguf_of(moe[name], "Q8_0")), rand_ids(1, 30, seed=5), 8)
    assert (steps is not None) == (name not in ("lfm2moe", "qwen35moe", "qwen3next"))
    for t, (got, want) in enumerate(steps or []):
        assert rel_err(got, want) < 1e-5, t


@pytest.mark.parametrize("name", MOE_NAMES)
def test_adapters_train_through_the_experts(moe, name):
    model = Model.from_gguf(gguf_of(moe[name], "Q8_0"))
    losses = adapted_steps(model, "lora", rand_ids(2, 32, seed=11))  # every adapter gets a gradient
    assert losses[-1] < losses[0], losses
    ads = adapters.adapters_of(model)
    for i, layer in enumerate(model.layers):  # (the FFN of ERNIE 4.5 MoE's dense first layer is adapted too)
        names = {k.rsplit(".", 1)[-1] for k in ads if k.startswith(f"layers.{i}.")}
        attention = {"attn_q", "attn_k", "attn_v", "attn_output"}
        if layer.shortconv is not None or layer.delta_net:  # (LFM2-MoE's convolutions, Qwen3.5-MoE's DeltaNets)
            attention = {"in_proj", "out_proj"} if layer.shortconv is not None else set(DELTA_LINEAR_NAMES) - (
                {"ssm_alpha", "ssm_beta"} if name == "qwen3next" else {"ssm_ba"})  # (Qwen3-Next's b and a in one)
        assert names == (attention if layer.ffn_moe is not None else attention | {"ffn_gate", "ffn_up", "ffn_down"})
        assert layer.ffn_moe is None or not any(p.requires_grad for p in layer.ffn_moe.parameters())


def test_finetune_and_streaming_on_a_moe_gguf(moe, tmp_path, botchan_text):
    text = tmp_path / "text.txt"
    text.write_text(botchan_text[30000:34000], encoding="utf-8")
    base = gguf_of(moe["qwen3moe"], "Q8_0")
    result = lowtune.finetune(base, text, tmp_path / "run", method="qa-lora", rank=4, steps=3, seq_len=32,
                              batch=2, lr=5e-3, warmup=0, eval_every=0, eval_fraction=0.1, device="cpu", seed=0)
    assert result.eval_after["eval_loss"] < result.eval_before["eval_loss"]

    def adapted():
        model = Model.from_gguf(base)
        adapters.apply_adapters(model, adapters.AdapterConfig(method="lora", rank=4, alpha=8, seed=1))
        adapters.mark_only_adapters_trainable(model)
        fill_adapters(model, torch.Generator().manual_seed(3))
        return model

    resident, streaming, plan = resident_and_streamed(adapted, "cpu")
    assert plan.streamed == [0, 1]
    assert_trains_alike(resident, streaming, rand_ids(2, 24, seed=4))


@pytest.mark.llamacpp
@pytest.mark.transformers
@pytest.mark.parametrize("name", MOE_NAMES)
def test_exports(moe, tmp_path, name):
    import peft
    base = moe[name].gguf
    model = make_adapter(base, tmp_path / "run" / "adapter", "lora", rel=0.2, rank=4)
    peft_run, peft_model = tmp_path / "run", model
    if any(layer.ffn_moe is None for layer in model.layers):  # ERNIE 4.5 MoE's dense layer has FFN adapters
        with pytest.raises(ValueError, match="FFN adapters"):  # (transformers would take them for the experts')
            export_peft(base, peft_run, tmp_path / "peft")
        peft_run = tmp_path / "attn"
        peft_model = make_adapter(base, peft_run / "adapter", "lora", rel=0.2, rank=4,
                                  targets=("attn_q", "attn_k", "attn_v", "attn_output"))
    ids = rand_ids(2, 40, seed=7)
    with torch.no_grad():
        want, plain = model(ids), Model.from_gguf(base)(ids)
    assert rel_err(plain, want) > 1e-2
    export_merged_gguf(base, tmp_path / "run", tmp_path / "merged.gguf")
    merged = Model.from_gguf(tmp_path / "merged.gguf")
    with torch.no_grad():
        assert rel_err(merged(ids), want) < 1e-5
    export_lora_gguf(base, tmp_path / "run", tmp_path / "lora.gguf")
    w = rand_ids(4, SEQ, seed=9)
    ppl = nll_ppl(merged, w)
    cpp_merged = llamacpp_perplexity(llamacpp(tmp_path / "merged.gguf"), w)
    cpp_lora = llamacpp_perplexity(llamacpp(base, lora=tmp_path / "lora.gguf"), w)
    print(f"{name}: perplexity merged lowtune {ppl:.3f}, llama.cpp {cpp_merged:.3f}, base + GGUF LoRA {cpp_lora:.3f}")
    assert abs(cpp_merged - ppl) / ppl < 2e-3 and abs(cpp_lora - ppl) / ppl < 2e-3
    if name == "qwen3next":  # (its HF modules fuse the DeltaNet's projections head by head)
        with pytest.raises(ValueError, match="in_proj_qkvz.*export it as GGUF"):
            export_peft(base, peft_run, tmp_path / "peft")
        return
    export_peft(base, peft_run, tmp_path / "peft")
    hf = peft.PeftModel.from_pretrained(hf_model(name), tmp_path / "peft").eval()
    with torch.no_grad():
        got, want = hf(input_ids=ids).logits, peft_model(ids)
    print(f"{name}: PEFT adapter on transformers' model vs lowtune, relative error {rel_err(got, want):.2e}")
    assert rel_err(got, want) < 1e-4
    with pytest.raises(ValueError, match="mixture-of-experts models export as GGUF"):
        export_hf(base, tmp_path / "run", tmp_path / "hf")


def test_what_is_refused(moe):
    md = {"general.architecture": "qwen3moe", "qwen3moe.embedding_length": 64, "qwen3moe.block_count": 2,
          "qwen3moe.feed_forward_length": 128, "qwen3moe.attention.head_count": 4, "qwen3moe.vocab_size": 9,
          "qwen3moe.attention.layer_norm_rms_epsilon": 1e-6, "qwen3moe.expert_count": 8,
          "qwen3moe.expert_used_count": 2}
    assert ModelConfig.from_gguf_metadata(md).n_experts == 8
    with pytest.raises(ValueError, match="shared experts"):
        ModelConfig.from_gguf_metadata({**md, "qwen3moe.expert_shared_count": 1})
    assert ModelConfig.from_gguf_metadata({**md, "qwen3moe.expert_gating_func": 2}).expert_gating == 2  # sigmoid
    with pytest.raises(ValueError, match="gating function 4"):  # (llama.cpp's sqrt of softplus)
        ModelConfig.from_gguf_metadata({**md, "qwen3moe.expert_gating_func": 4})
    with pytest.raises(ValueError, match="9 experts used of 8"):
        ModelConfig.from_gguf_metadata({**md, "qwen3moe.expert_used_count": 9}).check()
    # other routers, and experts in a family that has none
    for arch in ("deepseek2", "llama4", "qwen3"):
        with pytest.raises(ValueError, match=f"'{arch}' is a mixture-of-experts model"):
            ModelConfig.from_gguf_metadata({k.replace("qwen3moe", arch): v.replace("qwen3moe", arch)
                                            if isinstance(v, str) else v for k, v in md.items()})
    model = Model.from_gguf(moe["mixtral"].gguf)
    assert default_mode("cuda", model) == "off"
    with pytest.raises(ValueError, match="neither compiled nor captured"):
        compile_model(model, "layer", cuda_graphs=False, backend="aot_eager")
