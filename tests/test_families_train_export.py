"""Fine-tuning, LREC and every export on every model family (the tiny random models of
tests/family_models.py, built by transformers and converted by llama.cpp's converter):

* every adapter method trains on every family: a few optimizer steps on one batch lower its loss
  and every adapted linear (Phi-3's fused views, biased linears included) gets a gradient;
  `lowtune finetune` runs from each family's safetensors directory (quantized on load), and an
  exact QA-LoRA/QA-HiRA merge from that directory gives the adapted model's logits;
* exports of a random adapter, its method changing from family to family so that every method is
  exported: the merged GGUF reloads as the adapted model; transformers loads the merged HF
  directory, and with PEFT the exported adapter on the exported base, each as the family's own
  class with the family's module names, and both give lowtune's adapted logits (fp32, 1e-4
  relative); llama.cpp runs the merged GGUF, and applies the GGUF LoRA to the base, at lowtune's
  perplexity (0.05 % in F32);
* Phi-3's fused attn_qkv and gate+up take a QA-HiRA merge in their own Q4_1 blocks: the codes
  stay, every part's mins move, and llama.cpp runs the result;
* LREC corrects an INT2 Gemma 3 (soft-capped logits, tied head) towards its F32 teacher;
* on a GPU (marker cuda), every family (random models made from GGUF-named weights, as the GPU
  machine has neither transformers nor llama.cpp's converter) gives the CPU's logits in fp32 and
  bf16, trains with every method in bf16, and trains streamed as it does resident; Nemotron and
  Apertus decode through replayed graphs as eagerly.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import lowtune
from lowtune import adapters, merge
from lowtune.export import export_hf, export_lora_gguf, export_merged_gguf, export_peft
from lowtune.families import FAMILIES, family_of
from lowtune.gguf_io import GGUFFile
from lowtune.model import (CONV_LINEAR_NAMES, DELTA_LINEAR_NAMES, LINEAR_NAMES, MAMBA_LINEAR_NAMES, SSM_LINEAR_NAMES,
                           Model)

from family_models import (HF_NAMES, LLAMACPP_NAMES, NAMES, REMOTE_CODE_NAMES, RWKV_NAMES, SEQ, gemma3n_as_llamacpp,
                           gguf_of, hf_model, llamacpp, llamacpp_perplexity, mpt_as_llamacpp, rand_ids,
                           random_family_model, rel_err)
from conftest import devices
from helpers import resident_and_streamed, with_filled_lora
from test_export import make_adapter
from test_streaming import step_losses

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (llama.cpp keeps its own threads)

METHODS = ("lora", "qa-lora", "q-bara", "qa-hira", "qdylora")
# The method each family's exports are checked with (every method on some family), and the one it
# is fine-tuned with through the trainer (another one; not QA-HiRA/QA-LoRA, whose merge into Q4_K's super-blocks is
# refit, where its HF directory's rows load as Q4_K: Phi-2's FFN, Gemma 3n's ffn_down).
EXPORT_METHOD = {"llama": "qa-hira", "mistral": "lora", "smollm3": "q-bara", "granite": "qa-lora",
                 "ernie4_5": "lora", "mistral3": "qa-hira", "qwen2": "qa-lora", "qwen3": "qdylora", "phi3": "q-bara",
                 "gemma": "qdylora", "gemma2": "lora", "gemma3": "qa-hira", "olmo2": "qa-lora", "olmo3": "q-bara",
                 "glm4": "qdylora", "exaone4": "qa-hira", "command-r": "q-bara", "cohere2": "q-bara",
                 "phi4": "qa-lora", "seed_oss": "qa-hira", "hunyuan-dense": "q-bara",
                 "arcee": "q-bara", "phi2": "qa-lora", "starcoder2": "lora", "qwen2vl": "qdylora",
                 "qwen3vl": "qa-lora", "nemotron": "qa-hira", "apertus": "qdylora",
                 "lfm2": "qa-lora", "gemma3n": "qa-lora", "gemma4": "q-bara", "granitehybrid": "q-bara",
                 "qwen35": "q-bara", "nemotron_h": "qa-hira", "minicpm3": "lora", "olmo": "qdylora",
                 "bitnet": "qdylora", "mamba2": "qa-lora",
                 "falcon-h1": "qdylora", "mamba": "qa-hira",
                 "gpt2": "qa-lora", "starcoder": "qdylora", "bloom": "q-bara", "mpt": "lora",
                 "gptneox": "q-bara", "gptneox-seq": "qdylora", "stablelm": "qa-lora", "stablelm2-12b": "lora",
                 "falcon": "qa-hira", "falcon-40b": "qa-lora",
                 "exaone": "qa-hira", "internlm2": "q-bara", "baichuan": "lora", "qwen": "qa-lora", "orion": "qdylora",
                 "xverse": "qa-hira", "jais2": "qdylora", "plamo2": "q-bara", "pangu-embedded": "qdylora",
                 "plamo3": "qa-lora", "rwkv7": "q-bara", "rwkv6": "q-bara",
                 "arwkv7": "qa-hira", "rwkv6qwen2": "qdylora",
                 "chatglm": "q-bara", "deci": "qa-lora",
                 "openelm": "lora", "jais": "qdylora", "codeshell": "qa-hira",
                 "refact": "q-bara", "nanbeige": "qa-lora", "plamo": "lora",
                 "maincoder": "qa-hira", "plm": "lora"}
FINETUNE_METHOD = {"llama": "lora", "mistral": "qa-hira", "smollm3": "qdylora", "granite": "qa-hira",
                   "ernie4_5": "q-bara", "mistral3": "lora", "qwen2": "q-bara", "qwen3": "qa-lora", "phi3": "qa-hira",
                   "gemma": "lora", "gemma2": "qdylora", "gemma3": "qa-lora", "olmo2": "qa-hira", "olmo3": "lora",
                   "glm4": "q-bara", "exaone4": "lora", "command-r": "qa-lora", "cohere2": "qdylora",
                   "phi4": "lora", "seed_oss": "qdylora", "hunyuan-dense": "qa-hira",
                   "arcee": "lora", "phi2": "qdylora", "starcoder2": "qa-hira", "qwen2vl": "qa-hira",
                   "qwen3vl": "lora", "nemotron": "q-bara", "apertus": "qa-lora",
                   "lfm2": "qa-hira", "gemma3n": "lora", "gemma4": "qdylora", "granitehybrid": "qdylora",
                   "qwen35": "lora", "nemotron_h": "qa-lora", "minicpm3": "qa-hira", "olmo": "q-bara",
                   "bitnet": "q-bara", "mamba2": "qa-hira",
                   "falcon-h1": "q-bara", "mamba": "q-bara",
                   "gpt2": "q-bara", "starcoder": "lora", "bloom": "qa-lora", "mpt": "qdylora",
                   "gptneox": "qa-hira", "gptneox-seq": "lora", "stablelm": "q-bara", "stablelm2-12b": "qdylora",
                   "falcon": "qdylora", "falcon-40b": "q-bara",
                   "exaone": "lora", "internlm2": "qa-hira", "baichuan": "q-bara", "qwen": "q-bara", "orion": "lora",
                   "xverse": "qdylora", "jais2": "qa-lora", "plamo2": "qa-lora", "pangu-embedded": "lora",
                   "plamo3": "qa-hira",
                   "chatglm": "lora", "deci": "qa-hira",
                   "openelm": "q-bara", "jais": "qa-hira", "codeshell": "lora",
                   "refact": "q-bara", "nanbeige": "lora", "plamo": "qdylora",
                   "maincoder": "q-bara", "plm": "qa-lora"}
HF_MODULES = {"phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
              "phi4": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
              "glm4": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"},
              "arcee": {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"},
              "phi2": {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"},
              **dict.fromkeys(("gptneox", "gptneox-seq", "falcon", "falcon-40b", "bloom"),
                              {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
              "starcoder2": {"q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"},
              # (c_proj: the attention's and the MLP's)
              **dict.fromkeys(("gpt2", "starcoder"), {"c_attn", "c_proj", "c_fc"}),
              "mpt": {"Wqkv", "out_proj", "up_proj", "down_proj"},
              "mamba": {"in_proj", "x_proj", "dt_proj", "out_proj"}, "mamba2": {"in_proj", "out_proj"},
              # (Nemotron-H's mixers: Mamba2's, the MLP's and attention's)
              "nemotron_h": {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "in_proj", "out_proj"},
              **dict.fromkeys(("nemotron", "jais2"), {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}),
              "apertus": {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"},
              # (out_proj: the attention's and the convolutions')
              "lfm2": {"q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w3", "w2"},
              # (the MLP's gate and up: one module, input_linear)
              "granitehybrid": {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "input_linear",
                                "output_linear"},
              # (out_proj: the DeltaNets')
              "qwen35": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj_qkv",
                         "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"},
              "minicpm3": {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"}}
LLAMA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
VISION_LANGUAGE = ("qwen2vl", "qwen3vl")  # (their HF classes hold a vision tower too)
MAMBA = ("mamba", "mamba2", "nemotron_h")  # (PEFT refuses a LoRA on their mixers' out_proj)
# the families whose PEFT adapters of every linear lowtune refuses, saying why
PEFT_REFUSED = {**dict.fromkeys(MAMBA, "would not apply in (Mamba|NemotronH).*without (ssm_dt, )?ssm_out in "
                                "--targets"),
                "falcon-h1": "folds Falcon-H1's multipliers into, not to a checkpoint's"}


def hf_class(name: str) -> str:
    # the windowed variants' classes; Phi-4-mini is Phi-3's; GPT-NeoX one layer after the other is GPT-NeoX's;
    # Falcon 40B's layout is Falcon's
    own = {"mistral": "MistralForCausalLM", "olmo3": "Olmo3ForCausalLM", "phi4": "Phi3ForCausalLM",
           "gptneox-seq": "GPTNeoXForCausalLM", "falcon-40b": "FalconForCausalLM"}
    return own[name] if name in own else FAMILIES[name].hf_architectures[0]


def nll_ppl(model, windows: torch.Tensor) -> float:
    """exp(mean NLL) of every token but each window's first, as llamacpp_perplexity scores them."""
    with torch.no_grad():
        return math.exp(float(model.loss(windows)))


# ----------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", NAMES + REMOTE_CODE_NAMES + RWKV_NAMES)
def test_every_method_trains_on_every_family(family_models, name, method):
    model = lowtune.load_model(training_source(family_models[name]))
    losses = adapted_steps(model, method, rand_ids(2, 32, seed=11))
    assert losses[-1] < losses[0], losses


def training_source(tiny) -> Path:
    """A family's Q4_1 model: its safetensors directory, quantized on load, or llama.cpp's Q4_1
    quantization of its GGUF where lowtune reads no HF directory of it (Gemma 3n)."""
    return tiny.hf_dir if tiny.name in HF_NAMES else gguf_of(tiny, "Q4_1")


def adapted_steps(model, method: str, ids: torch.Tensor, steps: int = 4) -> list[float]:
    """Losses of `steps` AdamW steps of a fresh `method` adapter on one batch; the first step's
    gradients are checked: finite everywhere, and not all zero for any adapted linear."""
    ads = adapters.apply_adapters(model, adapters.AdapterConfig(method=method, rank=4, alpha=8, seed=0))
    params = adapters.mark_only_adapters_trainable(model)
    model.gradient_checkpointing = True
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    cuda = ids.device.type == "cuda"
    for step in range(steps):
        opt.zero_grad()
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=cuda):  # as the trainer runs
            loss = model.loss(ids)
        loss.backward()
        if step == 0:
            for where, ad in ads.items():
                grads = [p.grad for p in ad.parameters() if p.requires_grad]
                assert all(g is not None and torch.isfinite(g).all() for g in grads), where
                assert any(bool(g.abs().sum() > 0) for g in grads), where
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def train_text(tmp_path_factory, botchan_text) -> Path:
    p = tmp_path_factory.mktemp("text") / "botchan.txt"
    p.write_text(botchan_text[30000:34000], encoding="utf-8")
    return p


@pytest.mark.parametrize("name", NAMES + REMOTE_CODE_NAMES)
def test_finetune_from_the_hf_directory(family_models, train_text, tmp_path, name):
    hf_dir, method = training_source(family_models[name]), FINETUNE_METHOD[name]
    # every linear, Phi-3's named as its HF modules (fused ones stand for their parts)
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if name == "phi3" else None
    result = lowtune.finetune(hf_dir, train_text, tmp_path / "run", method=method, rank=4, steps=3, seq_len=32,
                              batch=2, lr=5e-3, warmup=0, eval_every=0, eval_fraction=0.1, device="cpu", seed=0,
                              targets=targets)
    modules = adapters.read_adapter_config(tmp_path / "run" / "adapter")["modules"]
    with GGUFFile(family_models[name].gguf) as f:
        gated = family_of(f.metadata).gated  # (olmo3's and phi4's families are named otherwise)
    absent = {"ffn_gate"} if not gated else set()  # (no gate)
    present = set(LINEAR_NAMES) | (set(CONV_LINEAR_NAMES) if name == "lfm2" else set())  # (LFM2's convolutions)
    if name == "minicpm3":  # (latent attention: q through its latent, attn_kv_b whole)
        present = present - {"attn_q", "attn_k", "attn_v"} | {"attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_kv_b"}
    if name == "plm":  # (latent attention with q straight from x)
        present = present - {"attn_k", "attn_v"} | {"attn_kv_a_mqa", "attn_kv_b"}
    present = set(SSM_LINEAR_NAMES) if name == "mamba2" else present  # (Mamba2 layers alone)
    present = set(MAMBA_LINEAR_NAMES) if name == "mamba" else present  # (Mamba's)
    present |= set(MAMBA_LINEAR_NAMES) if name == "plamo2" else set()  # (PLaMo 2's Mamba layers beside attention)
    present |= set(SSM_LINEAR_NAMES) if name in ("granitehybrid", "nemotron_h", "falcon-h1") else set()  # (Mamba2)
    present |= set(DELTA_LINEAR_NAMES) - {"ssm_ba"} if name == "qwen35" else set()  # (Qwen3.5's Gated DeltaNets)
    assert {m.rsplit(".", 1)[-1] for m in modules} == present - absent
    before, after = result.eval_before["eval_loss"], result.eval_after["eval_loss"]
    print(f"{name} {method}: held-out loss {before:.4f} -> {after:.4f}")
    assert after < before
    adapted = lowtune.load_model(hf_dir, adapter=tmp_path / "run")
    ids = rand_ids(2, 24, seed=3)
    with torch.no_grad():
        want, plain = adapted(ids), lowtune.load_model(hf_dir)(ids)
    assert rel_err(plain, want) > 1e-4
    if method in ("qa-hira", "qa-lora"):  # the update moves only the Q4_1 mins: an exact merge
        report = export_merged_gguf(hf_dir, tmp_path / "run", tmp_path / "merged.gguf")
        assert all(info.exact for info in report.tensors.values()), report.summary()
        merged = Model.from_gguf(tmp_path / "merged.gguf")
        with torch.no_grad():  # the mins are fp16: a small update is rounded by a few percent
            assert rel_err(merged(ids), want) < 0.1 * rel_err(plain, want)


def test_lrec_corrects_a_quantized_gemma3(family_models, train_text, tmp_path):
    from lowtune.correct import correct
    from lowtune.quantize_model import quantize_model
    teacher = family_models["gemma3"].gguf
    student = quantize_model(teacher, tmp_path / "student.gguf", "INT2-g32").path
    result = correct(student, teacher, train_text, tmp_path / "lrec", rank=4, alpha=8, steps=8, seq_len=32,
                     batch=2, lr=5e-3, eval_every=0, eval_tokens=256, device="cpu", log=lambda s: None)
    for what, r in result.report["eval"].items():
        print(f"Gemma 3 LREC, {what}: KL {r['student_kl']:.4f} -> {r['corrected_kl']:.4f}")
        assert r["corrected_kl"] < 0.9 * r["student_kl"], what


# ----------------------------------------------------------------------------------------------
# exports


@dataclass
class Adapted:
    """A family's F32 GGUF with a random adapter saved in run/, and logits on ids: `want` of the
    base with the adapter, `plain` of the base alone."""
    dir: Path
    base: Path
    run: Path
    ids: torch.Tensor
    want: torch.Tensor
    plain: torch.Tensor
    merged: Path | None = None


@pytest.fixture(scope="module")
def adapted(family_models, tmp_path_factory):
    made: dict[str, Adapted] = {}

    def get(name: str) -> Adapted:
        if name not in made:
            d = tmp_path_factory.mktemp(f"export-{name}")
            base, method = family_models[name].gguf, EXPORT_METHOD[name]
            extra = {"group": 32} if method in ("qa-hira", "qa-lora") else {}  # an F32 base has no blocks
            model = make_adapter(base, d / "run" / "adapter", method, rel=0.2, rank=4, **extra)
            ids = rand_ids(2, 40, seed=7)
            with torch.no_grad():
                want, plain = model(ids), Model.from_gguf(base)(ids)
            made[name] = a = Adapted(d, base, d / "run", ids, want, plain)
            export_merged_gguf(base, a.run, d / "merged.gguf")
            a.merged = d / "merged.gguf"
        return made[name]
    return get


@pytest.mark.transformers
@pytest.mark.parametrize("name", [n for n in HF_NAMES if n not in VISION_LANGUAGE])
def test_exports_load_in_transformers_and_peft(adapted, name):
    import peft
    import transformers

    a = adapted(name)
    assert rel_err(a.plain, a.want) > 1e-2, "the adapter must matter for the checks to mean anything"
    with torch.no_grad():
        assert rel_err(Model.from_gguf(a.merged)(a.ids), a.want) < 1e-5

    def hf(path):
        m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
        assert type(m).__name__ == hf_class(name)
        if name == "mpt":
            mpt_as_llamacpp(m)
        if name == "gemma3n":
            gemma3n_as_llamacpp(m)
        return m

    def logits(m):
        with torch.no_grad():
            return m(input_ids=a.ids).logits.float()

    export_hf(a.base, a.run, a.dir / "hf", dtype="fp32")
    got = logits(hf(a.dir / "hf"))
    print(f"{name}: merged HF directory vs lowtune, relative error {rel_err(got, a.want):.2e}")
    assert rel_err(got, a.want) < 1e-4
    export_hf(a.base, None, a.dir / "hf-base", dtype="fp32")
    if name in PEFT_REFUSED:  # (Mamba's without out_proj: test_mamba_peft_adapter_without_out_proj)
        with pytest.raises(ValueError, match=PEFT_REFUSED[name]):
            export_peft(a.base, a.run, a.dir / "peft")
        return
    export_peft(a.base, a.run, a.dir / "peft")
    config = json.loads((a.dir / "peft" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == HF_MODULES.get(name, LLAMA_MODULES)
    assert config["fan_in_fan_out"] == (name == "gpt2")  # (GPT-2's Conv1D modules)
    base = hf(a.dir / "hf-base")
    assert rel_err(logits(base), a.plain) < 1e-4
    got = logits(peft.PeftModel.from_pretrained(base, a.dir / "peft").eval())
    print(f"{name}: PEFT adapter on the HF base vs lowtune, relative error {rel_err(got, a.want):.2e}")
    assert rel_err(got, a.want) < 1e-4


@pytest.mark.transformers
@pytest.mark.parametrize("name", MAMBA)
def test_mamba_peft_adapter_without_out_proj(family_models, tmp_path, name):
    """PEFT refuses a LoRA on Mamba's, Mamba-2's and Nemotron-H's out_proj, and transformers' Mamba reads dt_proj's
    weight past one (test_exports_load_in_transformers_and_peft: refused by name); an adapter on their other linears
    exports as PEFT's, which on the class transformers loads from the directory gives lowtune's adapted logits
    (Nemotron-H's under model.layers, where its class holds the checkpoint's backbone.layers)."""
    import peft
    import transformers
    tiny, ids = family_models[name], rand_ids(2, 40, seed=7)
    targets = {"mamba": ("ssm_in", "ssm_x"), "mamba2": ("ssm_in",),
               "nemotron_h": ("ssm_in", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_down")}[name]
    model = make_adapter(tiny.gguf, tmp_path / "run" / "adapter", "lora", rel=0.2, rank=4, targets=targets)
    export_peft(tiny.gguf, tmp_path / "run", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == HF_MODULES[name] - {"dt_proj", "out_proj"}
    # (the tiny Nemotron-H's config.json is the published one, without a model_type: its class by name)
    cls = getattr(transformers, hf_class(name)) if name == "nemotron_h" else transformers.AutoModelForCausalLM
    base = cls.from_pretrained(tiny.hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want, plain = model(ids), base(input_ids=ids).logits
        got = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()(input_ids=ids).logits
    assert rel_err(plain, want) > 1e-2  # (the adapter matters)
    print(f"{name}: PEFT adapter without out_proj vs lowtune, relative error {rel_err(got, want):.2e}")
    assert rel_err(got, want) < 1e-4


@pytest.mark.transformers
@pytest.mark.parametrize("name", VISION_LANGUAGE)
def test_vision_language_exports(family_models, adapted, tmp_path, name):
    """The merged GGUF keeps the file's `<arch>.*` keys (M-RoPE's sections, deepstack layers), so that
    llama.cpp runs it with the model's mmproj file. A merged HF directory from the GGUF (no vision
    tower) is refused, saying what to export instead; from the original directory it is that
    directory in transformers' class, the language model merged (lowtune's adapted logits) and the
    vision tower as it was. The PEFT adapter, on the language model's modules only, applies to the
    original checkpoint and gives lowtune's adapted logits."""
    import peft
    import transformers

    def hf(path):
        m = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32,
                                                                     attn_implementation="eager").eval()
        assert type(m).__name__ == FAMILIES[name].hf_architectures[0]
        return m

    a = adapted(name)
    with GGUFFile(a.base) as b, GGUFFile(a.merged) as m:
        keys = [k for k in b.metadata if k.startswith(f"{name}.")]
        assert f"{name}.rope.dimension_sections" in keys
        assert {k: m.metadata[k] for k in keys} == {k: b.metadata[k] for k in keys}
    with pytest.raises(ValueError, match="vision tower.*original Hugging Face directory.*merged GGUF.*PEFT"):
        export_hf(a.base, a.run, a.dir / "hf")
    hf_dir = family_models[name].hf_dir
    model = make_adapter(hf_dir, tmp_path / "run" / "adapter", EXPORT_METHOD[name], rel=0.2, rank=4)
    export_hf(hf_dir, tmp_path / "run", tmp_path / "hf", dtype="fp32")
    merged, original = hf(tmp_path / "hf"), hf(hf_dir)
    with torch.no_grad():
        want, got = model(a.ids), merged(input_ids=a.ids).logits.float()
        assert rel_err(original(input_ids=a.ids).logits, want) > 1e-2  # (the adapter matters)
    print(f"{name}: merged HF directory vs lowtune, relative error {rel_err(got, want):.2e}")
    assert rel_err(got, want) < 1e-4
    vision = {k: v for k, v in original.state_dict().items() if ".visual." in k or k.startswith("visual.")}
    assert vision and all(torch.equal(merged.state_dict()[k], v) for k, v in vision.items())
    assert {f.name for f in hf_dir.iterdir()} <= {f.name for f in (tmp_path / "hf").iterdir()}
    export_peft(a.base, a.run, a.dir / "peft")
    model = peft.PeftModel.from_pretrained(original, a.dir / "peft").eval()
    adapted_modules = {n.rsplit(".", 2)[0] for n, _ in model.named_modules() if n.endswith("lora_A.default")}
    assert len(adapted_modules) == 2 * 7 and all(".language_model.layers." in n for n in adapted_modules)
    with torch.no_grad():
        got = model(input_ids=a.ids).logits.float()
    print(f"{name}: PEFT adapter on the original checkpoint vs lowtune, relative error {rel_err(got, a.want):.2e}")
    assert rel_err(got, a.want) < 1e-4


@pytest.mark.parametrize("name", ["gemma3n", "gemma4"])
def test_gemma_peft_adapter_on_transformers_model(adapted, tmp_path, name):
    """Gemma 3n's and Gemma 4's adapters as PEFT's on transformers' Gemma3nForCausalLM (the tiny model, its
    sparse gates' variance as llama.cpp's) and Gemma4ForCausalLM give lowtune's adapted logits (their merged HF
    directories: test_exports_load_in_transformers_and_peft)."""
    import peft

    a = adapted(name)
    export_peft(a.base, a.run, a.dir / "peft")
    config = json.loads((a.dir / "peft" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == LLAMA_MODULES
    base = hf_model(name)
    with torch.no_grad():
        assert rel_err(base(input_ids=a.ids).logits, a.plain) < 1e-4
        got = peft.PeftModel.from_pretrained(base, a.dir / "peft").eval()(input_ids=a.ids).logits
    print(f"{name}: PEFT adapter on transformers' model vs lowtune, relative error {rel_err(got, a.want):.2e}")
    assert rel_err(got, a.want) < 1e-4


@pytest.mark.parametrize("name", [n for n in REMOTE_CODE_NAMES if n != "exaone"])
def test_remote_code_hf_exports_are_refused(adapted, tmp_path, name):
    """The remote-code families but EXAONE 3 (test_exaone_hf_export_and_peft_adapter) have no transformers class:
    their merged HF directories are refused, saying to export GGUF, and so are their PEFT adapters, which name
    its modules."""
    a = adapted(name)
    with pytest.raises(ValueError, match=f"no Hugging Face directory of a {name} model.*GGUF"):
        export_hf(a.base, a.run, tmp_path / "hf", dtype="fp32")
    with pytest.raises(ValueError, match=f"no Hugging Face names for architecture '{name}'|"
                                         f"PEFT adapters name the modules of .*which transformers cannot build"):
        export_peft(a.base, a.run, tmp_path / "peft")


@pytest.mark.transformers
def test_exaone_hf_export_loads_in_transformers(family_models, adapted, tmp_path):
    """EXAONE 3.0's directory (no RoPE scaling) exports merged as ExaoneForCausalLM under the Llama names
    transformers holds it by, which transformers loads as lowtune's adapted model; EXAONE 3.5's Llama 3 scaling
    (the file's rope_freqs) is refused there, as Llama 3.1's."""
    import transformers as tf
    with pytest.raises(ValueError, match="rope_freqs"):
        export_hf(adapted("exaone").base, adapted("exaone").run, tmp_path / "scaled", dtype="fp32")
    d = tmp_path / "exaone-3.0"
    shutil.copytree(family_models["exaone"].hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["rope_scaling"]
    (d / "config.json").write_text(json.dumps(cfg))
    ids = rand_ids(2, 40, seed=7)
    model = make_adapter(d, tmp_path / "run" / "adapter", "lora", rel=0.2, rank=4)
    with torch.no_grad():
        want = model(ids)
    export_hf(d, tmp_path / "run", tmp_path / "hf", dtype="fp32")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["ExaoneForCausalLM"]
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").float().eval()
    with torch.no_grad():
        got = hf(ids).logits
    print(f"exaone: merged HF directory in transformers vs lowtune, relative error {rel_err(got, want):.2e}")
    assert rel_err(got, want) < 1e-4


@pytest.mark.transformers
def test_exaone_peft_adapter_on_transformers_llama(family_models, adapted):
    """transformers holds EXAONE 3's checkpoints as Llama: lowtune's PEFT adapter of the converted file names
    its modules, and on the checkpoint transformers loads gives lowtune's adapted logits."""
    import peft
    import transformers as tf
    a = adapted("exaone")
    export_peft(a.base, a.run, a.dir / "peft")
    config = json.loads((a.dir / "peft" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == LLAMA_MODULES
    base = tf.AutoModelForCausalLM.from_pretrained(family_models["exaone"].hf_dir, attn_implementation="eager")
    base = base.float().eval()
    with torch.no_grad():
        assert rel_err(base(input_ids=a.ids).logits, a.plain) < 1e-4
        got = peft.PeftModel.from_pretrained(base, a.dir / "peft").eval()(input_ids=a.ids).logits
    print(f"exaone: PEFT adapter on transformers' Llama vs lowtune, relative error {rel_err(got, a.want):.2e}")
    assert rel_err(got, a.want) < 1e-4


@pytest.mark.parametrize("name,hf_class", [("rwkv7", "RWKV7ForCausalLM"),
                                           ("rwkv6", "Rwkv6ForCausalLM"), ("arwkv7", "RwkvHybridForCausalLM"),
                                           ("rwkv6qwen2", "RWKV6Qwen2ForCausalLM")])
def test_gguf_only_hf_exports_and_directories_are_refused(family_models, adapted, tmp_path, name, hf_class):
    """lowtune has no Hugging Face names for RWKV's tensors: their merged
    HF directories and PEFT adapters are refused, saying to export GGUF, and a directory of their classes by name,
    saying to load the converter's GGUF."""
    a = adapted(name)
    with pytest.raises(ValueError, match=f"no Hugging Face directory of a {name} model.*GGUF"):
        export_hf(a.base, a.run, tmp_path / "hf", dtype="fp32")
    with pytest.raises(ValueError, match=name):
        export_peft(a.base, a.run, tmp_path / "peft")
    with pytest.raises(ValueError, match=f"{hf_class} .{name}. is read from GGUF only.*load the GGUF"):
        lowtune.load_model(family_models[name].hf_dir)


def test_stablelm_per_head_qk_norms_are_gguf_only(family_models, adapted, tmp_path):
    """StableLM 2 12B's q/k LayerNorms (a module of each head's own in Hugging Face's class) are read and written
    as GGUF only: its merged HF directory is refused, saying to export GGUF, and its HF directory, saying to
    convert it; its PEFT adapter (linears only) is written."""
    a = adapted("stablelm2-12b")
    with pytest.raises(ValueError, match="LayerNorm of each head's own.*export it as GGUF"):
        export_hf(a.base, a.run, tmp_path / "hf", dtype="fp32")
    with pytest.raises(ValueError, match="qk_layernorm.*convert_hf_to_gguf.py"):
        lowtune.load_model(family_models["stablelm2-12b"].hf_dir)
    export_peft(a.base, a.run, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == LLAMA_MODULES


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", LLAMACPP_NAMES)
def test_llamacpp_runs_the_merged_gguf_and_the_lora(adapted, name):
    a = adapted(name)
    lora_run = a.run
    if name in ("minicpm3", "plm"):  # llama.cpp's minicpm3 and plm graphs take a GGUF LoRA on attn_output and
        #                              the MLP only
        with pytest.raises(ValueError, match="llama.cpp applies no GGUF LoRA to blk.0.attn_kv_a_mqa"):
            export_lora_gguf(a.base, a.run, a.dir / "lora.gguf")
        lora_run = a.dir / "outer"
        make_adapter(a.base, lora_run / "adapter", EXPORT_METHOD[name], rel=0.2, rank=4,
                     targets=("attn_output", "ffn_gate", "ffn_up", "ffn_down"))
    export_lora_gguf(a.base, lora_run, a.dir / "lora.gguf")
    windows = rand_ids(4, SEQ, seed=9)
    adapted_ppl, plain_ppl = nll_ppl(lowtune.load_model(a.base, adapter=a.run), windows), \
        nll_ppl(Model.from_gguf(a.base), windows)
    lora_ppl = nll_ppl(lowtune.load_model(a.base, adapter=lora_run), windows)
    merged_ppl = nll_ppl(Model.from_gguf(a.merged), windows)
    cpp_merged = llamacpp_perplexity(llamacpp(a.merged), windows)
    cpp_lora = llamacpp_perplexity(llamacpp(a.base, lora=a.dir / "lora.gguf"), windows)
    print(f"{name}: perplexity base {plain_ppl:.3f}, adapted {adapted_ppl:.3f}; merged: lowtune {merged_ppl:.3f}, "
          f"llama.cpp {cpp_merged:.3f}; with the GGUF LoRA lowtune {lora_ppl:.3f}, llama.cpp {cpp_lora:.3f}")
    assert abs(adapted_ppl - plain_ppl) / plain_ppl > 1e-2 and abs(lora_ppl - plain_ppl) / plain_ppl > 1e-2
    assert abs(cpp_merged - merged_ppl) / merged_ppl < 5e-4
    assert abs(cpp_lora - lora_ppl) / lora_ppl < 5e-4


@pytest.mark.llamacpp
def test_phi3_fused_tensors_merge_in_their_own_blocks(family_models, tmp_path):
    base = gguf_of(family_models["phi3"], "Q4_1")
    model = make_adapter(base, tmp_path / "run" / "adapter", "qa-hira", rel=0.2)
    report = export_merged_gguf(base, tmp_path / "run", tmp_path / "merged.gguf")
    parts = model.fused_views
    assert set(parts) == {f"blk.{i}.{n}.weight" for i in (0, 1) for n in ("attn_qkv", "ffn_up")}
    assert {p for ps in parts.values() for p, _, _ in ps} <= set(report.tensors)
    assert all(info.exact for info in report.tensors.values()), report.summary()
    with GGUFFile(base) as b, GGUFFile(tmp_path / "merged.gguf") as m:
        for fused, ps in parts.items():
            qb, qm = b.qtensor(fused), m.qtensor(fused)
            assert qb.type == qm.type == "Q4_1"
            blocks_b, blocks_m = qb.raw.view(qb.shape[0], -1, 20), qm.raw.view(qm.shape[0], -1, 20)  # d, m, codes
            assert torch.equal(blocks_b[..., :2], blocks_m[..., :2]) and torch.equal(blocks_b[..., 4:], blocks_m[..., 4:])
            for part, r0, r1 in ps:  # every part's rows moved their mins
                assert not torch.equal(blocks_b[r0:r1, :, 2:4], blocks_m[r0:r1, :, 2:4]), part
    merged = Model.from_gguf(tmp_path / "merged.gguf")
    ids = rand_ids(2, 40, seed=7)
    with torch.no_grad():
        want, got, plain = model(ids), merged(ids), Model.from_gguf(base)(ids)
    assert rel_err(got, want) < 2e-2 * rel_err(plain, want)  # fp16 mins
    windows = rand_ids(4, SEQ, seed=9)
    ppl, cpp = nll_ppl(merged, windows), llamacpp_perplexity(llamacpp(tmp_path / "merged.gguf"), windows)
    print(f"phi3 Q4_1 QA-HiRA merged: perplexity lowtune {ppl:.3f}, llama.cpp {cpp:.3f}")
    assert abs(cpp - ppl) / ppl < 5e-3


# ----------------------------------------------------------------------------------------------
# CUDA

ARCHS = tuple(FAMILIES)


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_runs_and_trains_on_cuda(arch, device="cuda"):
    ids = rand_ids(2, 40, seed=5)

    def every_key(model):  # (DeepSeek-V3.2's and GLM-5's indexers flip their top k near ties on bf16's drift)
        for layer in model.layers:
            if getattr(layer, "indexer", None) is not None:
                layer.indexer.top_k = ids.shape[1]
        return model

    with torch.no_grad():
        cpu = every_key(random_family_model(arch))
        want = cpu(ids)
        fp32 = every_key(random_family_model(arch)).to(device)(ids.to(device)).cpu()
        bf16 = every_key(random_family_model(arch, dtype=torch.bfloat16)).to(device)(ids.to(device)).cpu()
    print(f"{arch} on {device}: logits vs the CPU, relative error fp32 {rel_err(fp32, want):.2e}, "
          f"bf16 {rel_err(bf16, want):.2e}")
    # (a bf16 router picks other experts for a few tokens; Gemma 3n's 22 layers of sparse FFN gates move by 8 %
    # in bf16 on the CPU too, as transformers' tiny model does)
    loose = cpu.config.n_experts or cpu.config.family.altup
    assert rel_err(fp32, want) < 1e-2 and rel_err(bf16, want) < (1e-1 if loose else 5e-2)
    for method in METHODS:
        model = random_family_model(arch, dtype=torch.bfloat16).to(device)
        losses = adapted_steps(model, method, ids.to(device))
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], (method, losses)


@pytest.mark.cuda
@torch.no_grad()
@pytest.mark.parametrize("arch", ["nemotron", "apertus"])
def test_captured_steps_of_mlps_without_a_gate_on_cuda(arch, device="cuda"):
    """Nemotron's LayerNorm biases and relu², Apertus's per-head q/k norms and xIELU with each layer's
    scalars, through replayed decode graphs (grouped products): the eager steps' bf16 logits."""
    from lowtune.generate import StepDecoder
    model = random_family_model(arch, dtype=torch.bfloat16).to(device)
    prompt, tokens = [3, 1, 4, 1, 5], rand_ids(1, 40, seed=2)[0].tolist()
    eager, graph = StepDecoder(model, 48, graphs=False), StepDecoder(model, 48, graphs=True)
    assert torch.equal(eager.prefill(prompt), graph.prefill(prompt))
    for i, t in enumerate(tokens):
        torch.testing.assert_close(graph.step(t), eager.step(t), rtol=2e-2, atol=2e-2, msg=f"step {i}")
    assert graph._graphs


@pytest.mark.cuda
@torch.no_grad()
@pytest.mark.parametrize("arch", ["gpt2", "starcoder", "bloom", "mpt", "jais", "refact"])
def test_captured_steps_of_positions_and_alibi_on_cuda(arch, device="cuda"):
    """GPT-2's and StarCoder's learned positions (StarCoder's one K/V head), read at the step's position on the
    device, and BLOOM's, MPT's, Jais's and Refact's ALiBi, each head's bias in the step's mask (no fused decode
    attention), through replayed decode graphs across windows (64 positions and past them): the eager steps'
    bf16 logits, and the model's own steps' through a plain cache."""
    from lowtune.generate import StepDecoder
    model = random_family_model(arch, dtype=torch.bfloat16).to(device)
    prompt, tokens = [3, 1, 4, 1, 5], rand_ids(1, 80, seed=2)[0].tolist()
    eager, graph = StepDecoder(model, 96, graphs=False), StepDecoder(model, 96, graphs=True)
    cache = model.new_cache(1, 96)
    assert torch.equal(eager.prefill(prompt), graph.prefill(prompt))
    model(torch.tensor([prompt], device=device), cache)
    for i, t in enumerate(tokens):
        want = model(torch.tensor([[t]], device=device), cache)[0, -1]
        torch.testing.assert_close(eager.step(t), want, rtol=2e-2, atol=2e-2, msg=f"step {i}")
        torch.testing.assert_close(graph.step(t), want, rtol=2e-2, atol=2e-2, msg=f"step {i}")
    assert len(graph._graphs) == 2  # (windows of 64 and 96 positions)


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["phi3", "qwen2", "gemma3", "lfm2", "granitehybrid", "qwen35", "nemotron_h",
                                  "bitnet", "mamba2", "falcon-h1", "mamba", "jamba", "gpt2",
                                  "bloom", "gptneox", "kimi-linear", "deci", "openelm", "arctic", "plamo2",
                                  "deepseek32", "glm-dsa", "afmoe"])
def test_streamed_family_trains_as_resident_on_cuda(arch, device="cuda"):
    """Streamed layers with Phi-3's fused views, Qwen2's biases, Gemma 3's extra norms, LFM2's
    convolution and attention layers (packs of two kinds and sizes), Granite 4's Mamba2 and attention
    layers, Qwen3.5's Gated DeltaNets and gated attention, Nemotron-H's layers of one part each, BitNet's
    sub-norms, Mamba-2's layers without attention, Falcon-H1's Mamba2 mixers beside attention, Mamba's
    selective scans, Jamba's Mamba and attention layers with experts, Kimi Linear's Kimi Delta Attention beside
    latent attention and experts, AFMoE's gated attention, DeepSeek-V3.2's lightning indexer (its frozen linears in
    the packs) and GLM-5's layers that reuse an earlier one's choice, PLaMo 2's Mamba layers in heads beside
    attention, Arctic's experts on the layer's input, Deci's layers of their own parts and widths and OpenELM's of
    their own heads, GPT-2's learned positions and BLOOM's ALiBi and embedding norm around the streamed layers."""
    def adapted():
        return with_filled_lora(random_family_model(arch, dtype=torch.bfloat16))

    resident, streaming, _ = resident_and_streamed(adapted, device)
    ids = rand_ids(2, 24, seed=4).to(device)
    want, want_g = step_losses(resident, ids)
    got, got_g = step_losses(streaming, ids)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-3, atol=1e-4)
    for key in want_g:
        torch.testing.assert_close(got_g[key], want_g[key], rtol=2e-2, atol=1e-4, msg=key)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("arch", ("llama", "qwen3", "gemma2", "lfm2", "granitehybrid", "qwen35", "nemotron_h",
                                  "bitnet", "mamba2", "falcon-h1", "mamba", "jamba", "phimoe", "gpt2",
                                  "bloom", "gptneox", "stablelm", "falcon",
                                  "kimi-linear", "grok", "arctic", "plamo2", "deepseek32", "glm-dsa", "afmoe"))
@pytest.mark.parametrize("tokens", (9, 1))
def test_inference_joins_each_residual_add_to_the_next_norm_bit_for_bit(arch, device, tokens):
    """Without autograd, Model.normed_layers passes each layer's closing residual add to the next
    norm (DecoderLayer.forward_deferred); the hidden states equal the layer-by-layer forward's bit
    for bit (fp32 on the CPU; bf16 through the fused glue kernels on CUDA, where for one token the
    norms and SwiGLU's product also run inside the grouped products), post-norms (Grok's under its own names)
    and PhiMoE's biased RMSNorms, GPT-2's learned positions, BLOOM's embedding norm and ALiBi, AFMoE's attention
    gate (its product beside q, k and v) and Arctic's experts on the layer's input included."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = random_family_model(arch, dtype=dtype).to(device)
    if device == "cuda":
        for layer in model.layers:
            layer.group_products()
    ids = rand_ids(1, tokens, seed=3).to(device)
    calls = []
    for layer in model.layers:
        layer.forward_deferred = lambda *a, _f=layer.forward_deferred: calls.append(1) or _f(*a)
    with torch.no_grad():
        got = model.hidden(ids)
        assert len(calls) == len(model.layers)  # the joined path ran
        x, rot = model.embed(ids), model._rotation_on_device(0, ids.shape[1])
        for layer in model.layers:
            x = layer(x, rot)
        want = model.output_norm(x)
    assert torch.equal(got, want)


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", ("TQ1_0", "TQ2_0"))
def test_bitnet_ternary_base_merges_into_its_own_type(family_models, botchan_text, tmp_path, qtype):
    """BitNet in llama.cpp's ternary types (its converter's ternary-times-scale matrices, each block
    holding the scale): lowtune reads the blocks as llama.cpp runs them, and its adapters as llama.cpp
    runs them in a GGUF LoRA beside them; adapters merged back are rounded into the base's own type
    (ternary blocks have no min to absorb an update), and the tensors without one keep the base's
    ternary codes byte for byte; llama.cpp runs the merged file as lowtune (each with its activations
    rounded as llama.cpp's products round them: Q8_K's 8 bits for TQ blocks)."""
    from lowtune.evaluate import windows
    from lowtune.llamacpp_activations import rounded_like_llamacpp
    from lowtune.tokenizer import load_tokenizer
    base = gguf_of(family_models["bitnet"], qtype)
    f32 = Model.from_gguf(family_models["bitnet"].gguf)
    plain = Model.from_gguf(base)
    assert plain.tensor_types["blk.0.ffn_down.weight"] == qtype  # (the scale: its fp16 in every block)
    assert rel_err(merge.dense(plain.layers[0].ffn_down.weight), merge.dense(f32.layers[0].ffn_down.weight)) < 1e-3
    w = windows(torch.tensor(load_tokenizer(plain.metadata).encode(botchan_text[20000:30000])), SEQ, chunks=8)
    with rounded_like_llamacpp():
        ppl = nll_ppl(plain, w)
    cpp = llamacpp_perplexity(llamacpp(base), w)
    assert abs(cpp - ppl) / ppl < 5e-3, (ppl, cpp)
    trained = ("attn_q", "ffn_down")
    model = make_adapter(base, tmp_path / "run" / "adapter", "lora", rel=0.2, targets=trained)
    export_lora_gguf(base, tmp_path / "run", tmp_path / "lora.gguf")  # (llama.cpp adds it to the ternary products)
    with rounded_like_llamacpp():
        ppl = nll_ppl(model, w)
    cpp = llamacpp_perplexity(llamacpp(base, lora=tmp_path / "lora.gguf"), w)
    assert abs(cpp - ppl) / ppl < 5e-3, (ppl, cpp)
    report = export_merged_gguf(base, tmp_path / "run", tmp_path / "merged.gguf")
    adapted = {f"blk.{i}.{n}.weight" for i in range(2) for n in trained}
    assert {n for n, info in report.tensors.items() if info.path != "copy"} == adapted
    assert all(report.tensors[n].out_type == qtype for n in adapted)
    with GGUFFile(base) as b, GGUFFile(tmp_path / "merged.gguf") as m:
        for n in b.tensor_infos:
            assert m.tensor_infos[n].type == b.tensor_infos[n].type, n
            assert torch.equal(m.raw(n), b.raw(n)) != (n in adapted), n
    merged = Model.from_gguf(tmp_path / "merged.gguf")
    with rounded_like_llamacpp():
        ppl = nll_ppl(merged, w)
    cpp = llamacpp_perplexity(llamacpp(tmp_path / "merged.gguf"), w)
    print(f"bitnet {qtype} LoRA merged: perplexity lowtune {ppl:.3f}, llama.cpp {cpp:.3f}")
    assert abs(cpp - ppl) / ppl < 5e-3
