#!/usr/bin/env bash
# One GPU call: `lowtune finetune` end to end on CUDA with each --compile / --cuda-graphs choice
# (auto = layer + graphs), on a small random Llama GGUF (the real models are not on the GPU
# machine) and the bundled text. Prints per choice: the first and last losses, the held-out loss,
# the median step time after warm-up and the compile lines of the log; the losses of every choice
# must agree with eager's (bf16 rounding apart). Then the trainer's CUDA tests.
# Usage, from the repository root: OUT=dir bash tools/gpu/finetune_flags.sh   (about 5 minutes)
# (DEVICE=cpu STEPS=2 FLAGS="--compile off" runs the same steps on the CPU, to try the script.)
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/common.sh
out=${OUT:-gpu_flags}; mkdir -p "$out"
t0=$SECONDS
device=${DEVICE:-cuda}
if [ "$device" = cuda ]; then
  build_cuda "$out/build.log" || exit 1
fi
$py - "$out" <<'EOF'
import sys
sys.path.insert(0, "tests")
from helpers import write_tiny_llama_gguf
write_tiny_llama_gguf(f"{sys.argv[1]}/small.gguf", "Q4_1", dim=512, ffn=1536, layers=8, heads=8, kv_heads=4)
EOF
text=python/lowtune/data/botchan.txt
choices=("--compile off --cuda-graphs off" "--compile off --cuda-graphs on" "--compile layer --cuda-graphs off"
         "--compile auto" "--compile model --cuda-graphs off")
[ -n "${FLAGS:-}" ] && choices=("$FLAGS")
for flags in "${choices[@]}"; do
  name=$(echo "$flags" | tr -d '-' | tr ' ' '_')
  timeout 150 $py -m lowtune finetune "$out/small.gguf" --data "$text" --method qa-lora --rank 8 --steps "${STEPS:-30}" \
    --seq-len 512 --batch 4 --lr 1e-3 --eval-tokens 4096 --eval-every 0 --seed 0 \
    --device "$device" $flags -o "$out/run_$name" >"$out/$name.log" 2>&1
  echo "$flags: exit $?"
done
$py - "$out" <<'EOF'
import json, pathlib, statistics, sys
out = pathlib.Path(sys.argv[1])
def losses_of(run):
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]

eager = out / "run_compile_off_cudagraphs_off"
ref = losses_of(eager) if (eager / "metrics.jsonl").exists() else None
for run in sorted(out.glob("run_*")):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    if not steps or not evals:
        print(f"{run.name}: did not finish (see {run.name[4:]}.log)")
        continue
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps, steps[1:])][5:] or [steps[-1]["elapsed_s"]]
    losses = [r["loss"] for r in steps]
    log = (out / (run.name[4:] + ".log")).read_text().splitlines()
    compiled = [l for l in log if "compil" in l or "CUDA graph" in l][:4]
    print(f"{run.name}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, held-out {evals[-1]['eval_loss']:.4f}, "
          f"median step {1e3 * statistics.median(times):.1f} ms; " + " | ".join(compiled))
    cfg = json.loads((run / "config.json").read_text())["train"]["extra"].get("compile")
    print(f"   config.json compile: {cfg}")
    if ref is not None and run != eager:
        worst = max(abs(a - b) for a, b in zip(ref, losses))
        print(f"   largest loss difference from eager: {worst:.2e} ({'ok' if worst < 5e-2 else 'TOO LARGE'})")
EOF
echo "== trainer CUDA tests"
timeout 200 $py -m pytest -q -p no:cacheprovider -m "cuda and not smollm2" tests/test_trainer.py tests/test_compile.py \
  >"$out/tests.log" 2>&1
echo "tests exit $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$out/tests.log" | tail -20
echo "== total $((SECONDS - t0)) s"
rm -rf "$out"/run_* "$out/small.gguf"
