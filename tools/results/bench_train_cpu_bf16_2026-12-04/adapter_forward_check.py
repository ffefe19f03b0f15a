"""The bf16/fp32 loss gap of the CPU training benchmark split into training and forward: SmolLM2
LoRA adapters trained 8 steps as tools/bench_train.py trains them (fp32 and bf16 activations), then
each evaluated on the batch of step 9 with fp32 and with bf16 activations. Output:
adapter_forward_check.log. Run from the repository root:

    PYTHONPATH=python python3 tools/results/bench_train_cpu_bf16_2026-12-04/adapter_forward_check.py
"""
import sys, torch
sys.path.insert(0, "tools")
from bench_train import token_batch
from smollm2 import smollm2_path
import lowtune
from lowtune import adapters
from lowtune.loading import load_model
torch.set_num_threads(2); lowtune._C.set_num_threads(2)
path = smollm2_path()
def build(dtype):
    torch.manual_seed(0)
    m = load_model(path, dtype=dtype)
    adapters.apply_adapters(m, adapters.AdapterConfig(method="lora", rank=16, alpha=16, seed=0))
    adapters.mark_only_adapters_trainable(m)
    return m
def train(m, steps=8):
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    m.train()
    for s in range(steps):
        loss = m.loss(token_batch(256, 2, m.config.vocab_size, s)); loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); opt.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
@torch.no_grad()
def ev(m, state, step=8):
    for n, p in m.named_parameters():
        if n in state: p.copy_(state[n])
    m.eval()
    return float(m.loss(token_batch(256, 2, m.config.vocab_size, step)))
f32, b16 = build(torch.float32), build(torch.bfloat16)
zero = {n: p.detach().clone() for n, p in f32.named_parameters() if p.requires_grad}
print("untrained   fwd fp32 %.4f fwd bf16 %.4f" % (ev(f32, zero), ev(b16, zero)))
s32 = train(build(torch.float32)); s16 = train(build(torch.bfloat16))
print("fp32-trained fwd fp32 %.4f fwd bf16 %.4f" % (ev(f32, s32), ev(b16, s32)))
print("bf16-trained fwd fp32 %.4f fwd bf16 %.4f" % (ev(f32, s16), ev(b16, s16)))
