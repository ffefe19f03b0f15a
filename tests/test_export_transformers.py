"""Hugging Face clients read what lowtune exports (SmolLM2-135M-Instruct, random adapters):

* transformers loads the merged safetensors directory (`lowtune export --hf`) and its logits equal
  lowtune's base + adapter: within fp32 rounding for an fp32 export, within bf16 tolerance for bf16;
* PEFT applies the exported adapter (`lowtune export --peft`) to the exported base, and the logits
  equal lowtune's unmerged base + adapter.

Both sides see the same weights (the Q4_1 blocks dequantized), so only the model code differs:
q/k row order, RoPE layout, tied head, RMSNorm eps.
"""
from __future__ import annotations

import pytest
import torch
import transformers  # installed by tools/setup_env.sh, as peft

from lowtune.export import export_hf, export_peft

from test_export import ids_for, make_adapter, rel_err

pytestmark = pytest.mark.transformers

def hf_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def adapted(smollm2_path, tmp_path_factory):
    """(run dir, lowtune logits of base + adapter in fp32, token ids) for a Q-BaRA adapter on all
    linears of SmolLM2 (Q-BaRA: pooled inputs and repeated outputs, the least LoRA-like shape)."""
    d = tmp_path_factory.mktemp("hf")
    model = make_adapter(smollm2_path, d / "run" / "adapter", "q-bara", rel=0.05)
    ids = ids_for(model.config.vocab_size, t=48)
    with torch.no_grad():
        want = model(ids).float()
    return d / "run", want, ids


def test_transformers_loads_merged_safetensors(smollm2_path, adapted, tmp_path):
    run, want, ids = adapted
    export_hf(smollm2_path, run, tmp_path / "fp32", dtype="fp32")
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", torch_dtype=torch.float32,
                                                          attn_implementation="sdpa").eval()
    assert rel_err(hf_logits(m, ids), want) < 1e-4
    export_hf(smollm2_path, run, tmp_path / "bf16", dtype="bf16")
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", torch_dtype=torch.bfloat16,
                                                          attn_implementation="sdpa").eval()
    got = hf_logits(m, ids)
    # bf16 weights and activations over 30 layers: a few percent of the largest logit at worst
    # (how much depends on the CPU's bf16 kernels: ~1.4 logits here on AVX2). On random token ids
    # many positions have near-ties; wherever lowtune's top token leads by more than 2% of the
    # largest logit, bf16 transformers must pick it too.
    assert rel_err(got, want) < 0.05
    top2 = want.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.02 * want.abs().max()
    assert clear.float().mean() > 0.25, "too few positions with a clear top token to compare"
    assert bool((got.argmax(-1) == want.argmax(-1))[clear].all())
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "bf16")
    assert tok("Hello world")["input_ids"], "the exported tokenizer loads and encodes"


def test_peft_applies_the_exported_adapter(smollm2_path, adapted, tmp_path):
    import peft
    run, want, ids = adapted
    export_hf(smollm2_path, None, tmp_path / "base", dtype="fp32")
    export_peft(smollm2_path, run, tmp_path / "peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32,
                                                             attn_implementation="sdpa")
    plain = hf_logits(base.eval(), ids)
    m = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    got = hf_logits(m, ids)
    assert rel_err(got, want) < 1e-4
    assert rel_err(plain, want) > 1e-3, "the adapter must matter for this check to mean anything"
