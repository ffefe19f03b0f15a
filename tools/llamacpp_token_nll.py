#!/usr/bin/env python3
"""Per-token check of the merge-exact gain comparison: lowtune and llama.cpp score the same positions of the same windows;
how far apart are their per-token NLLs on the base SmolLM2 Q4_1 file?

    PYTHONPATH=python python3 tools/llamacpp_token_nll.py --ctx 128 --windows 4
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_methods import DATA, default_smollm2, split_text  # noqa: E402
from quality_merge_exact import test_tokens  # noqa: E402
from lowtune import _C  # noqa: E402
from lowtune.evaluate import perplexity  # noqa: E402
from lowtune.llamacpp_activations import rounded_like_llamacpp  # noqa: E402
from lowtune.loading import load_model  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--ctx", type=int, default=128)
ap.add_argument("--windows", type=int, default=4)
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
_C.set_num_threads(a.threads)
smol = default_smollm2()
_, test = split_text((DATA / "botchan.txt").read_text(encoding="utf-8"), 0.1)
ids = test_tokens(test, smol, a.ctx, a.windows)
from llama_cpp import Llama  # noqa: E402
llm = Llama(model_path=str(smol), n_ctx=a.ctx, n_batch=a.ctx, n_threads=a.threads, logits_all=True, verbose=False)
print("llama.cpp n_ctx", llm.n_ctx(), "add_bos metadata", llm.metadata.get("tokenizer.ggml.add_bos_token"),
      "bos", llm.token_bos())
m = load_model(smol, device="cpu").eval()
nll = {"llamacpp": [], "lowtune": [], "lowtune_q8": []}
for s in range(0, len(ids), a.ctx):
    w = ids[s:s + a.ctx]
    llm.reset()
    llm.eval(w)
    z = torch.tensor(np.asarray(llm.scores[:a.ctx - 1]), dtype=torch.float64)
    nll["llamacpp"].append(F.cross_entropy(z, torch.tensor(w[1:]), reduction="none"))
    x = torch.tensor([w])
    with torch.no_grad():
        for key, ctxm in (("lowtune", None), ("lowtune_q8", rounded_like_llamacpp)):
            if ctxm is None:
                lg = m(x)
            else:
                with ctxm():
                    lg = m(x)
            lg = lg.logits if hasattr(lg, "logits") else lg
            lg = lg[0, :-1].double()
            nll[key].append(F.cross_entropy(lg, torch.tensor(w[1:]), reduction="none"))
    print("window", s // a.ctx, "max |logit diff| llama.cpp vs lowtune:", float((z - lg).abs().max()))
nll = {k: torch.cat(v).numpy() for k, v in nll.items()}
n = len(nll["lowtune"])
print("scored tokens", n)
ref = perplexity(m, ids, ctx=a.ctx)["perplexity"]
print("lowtune perplexity() ", ref, " per-token here", math.exp(nll["lowtune"].mean()))
for k in nll:
    print(f"{k:11s} ppl {math.exp(nll[k].mean()):.4f}")
for k1, k2 in (("llamacpp", "lowtune"), ("llamacpp", "lowtune_q8"), ("lowtune_q8", "lowtune")):
    d = nll[k1] - nll[k2]
    print(f"{k1} - {k2}: per-token NLL diff mean {d.mean():+.5f} std {d.std():.5f} max|.| {np.abs(d).max():.4f}; "
          f"corr {np.corrcoef(nll[k1], nll[k2])[0, 1]:.6f}; std/sqrt(n) {d.std() / math.sqrt(n):.5f}")
