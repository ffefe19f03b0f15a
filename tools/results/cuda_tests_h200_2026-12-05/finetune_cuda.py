# finetune on CUDA from a tiny GGUF: fp32 and bf16, compile auto and off, then export merged
import subprocess, sys, json, os, time
from pathlib import Path
sys.path.insert(0, "tests")
from helpers import write_tiny_llama_gguf
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
g = write_tiny_llama_gguf(out / "tiny.gguf", lambda n: "Q4_K" if ".ffn_" in n else "Q8_0", dim=256, ffn=512, heads=4,
                          kv_heads=2, layers=4, scale=0.02, emb_scale=0.3)
text = out / "text.txt"
text.write_text(" ".join(f"the quick brown fox {i % 13} jumps over the lazy dog {i % 7}." for i in range(3000)))
for dtype in ("fp32", "bf16"):
    for comp in ("auto", "off"):
        run = out / f"run_{dtype}_{comp}"
        t = time.time()
        p = subprocess.run([sys.executable, "-m", "lowtune", "finetune", str(g), "--data", str(text), "--device", os.environ.get("DEV", "cuda"),
                            "--dtype", dtype, "--compile", comp, "--steps", "12", "--seq-len", "64", "--batch", "4",
                            "--method", "qa-hira", "-o", str(run)], capture_output=True, text=True)
        print(f"== finetune {dtype} compile={comp}: rc {p.returncode} in {time.time()-t:.1f}s")
        print(p.stdout[-1500:]); print(p.stderr[-2500:])
        if p.returncode == 0:
            e = subprocess.run([sys.executable, "-m", "lowtune", "export", str(g), "--adapter", str(run),
                                "-o", str(run / "merged.gguf"), "--eval-text", str(text), "--eval-chunks", "4"], capture_output=True, text=True)
            print(f"   export rc {e.returncode}", e.stdout[-500:], e.stderr[-800:])
