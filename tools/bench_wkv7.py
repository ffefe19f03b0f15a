"""RWKV-7's recurrence (lowtune.rwkv.wkv7) forward and backward, position by position against chunked:

    python tools/bench_wkv7.py                          # CPU, B=1, H=4 heads of 64, T = 512 and 2048
    python tools/bench_wkv7.py --threads 1
    python tools/bench_wkv7.py --device cuda --chunks 16/4,32/8,64/16

Inputs are drawn as RWKV-7's time mix makes them (w = exp(-0.606531 sigmoid(.)), a = -kk, b = kk · a with kk
normed); each row is the best of --repeats runs of out.sum() + state.sum() backward, in seconds, with the chunked
form's largest relative difference from the stepped one over the output, the state and the gradients.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lowtune.rwkv import DECAY_SCALE, _wkv7_stepped, wkv7  # noqa: E402


def inputs(b: int, t: int, h: int, n: int, device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    rand = lambda: torch.randn(b, t, h, n, generator=g)  # noqa: E731
    r, k, v = rand(), rand(), rand()
    w = torch.exp(-DECAY_SCALE * torch.sigmoid(rand()))
    kk = F.normalize(rand(), dim=-1)
    a = torch.rand(b, t, h, n, generator=g)
    return [x.to(device) for x in (r, w, k, v, -kk, kk * a)]


def forward_backward(fn, xs: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    leaves = [x.clone().requires_grad_() for x in xs]
    if xs[0].is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out, state = fn(*leaves)
    (out.sum() + state.sum()).backward()
    if xs[0].is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, [out, state] + [x.grad for x in leaves]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach().double()).norm() / want.detach().double().norm())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--lengths", default="512,2048")
    p.add_argument("--chunks", default="32/8,16/4,64/16",
                   help="the chunked form's chunk/block sizes, comma-separated")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"wkv7 forward+backward on {args.device} ({torch.get_num_threads()} threads), B={args.batch}, "
          f"H={args.heads} heads of {args.head_size}")
    print(f"{'T':>6} {'form':>14} {'seconds':>9} {'speed-up':>9} {'rel. diff':>10}")
    for t in map(int, args.lengths.split(",")):
        xs = inputs(args.batch, t, args.heads, args.head_size, args.device)
        forms = [("stepped", _wkv7_stepped)]
        for spec in args.chunks.split(","):
            chunk, block = map(int, spec.split("/"))
            forms.append((f"chunked {spec}", lambda *a, chunk=chunk, block=block: wkv7(*a, chunk=chunk, block=block)))
        base, want = None, None
        for name, fn in forms:
            runs = [forward_backward(fn, xs) for _ in range(args.repeats)]
            seconds, got = min(s for s, _ in runs), runs[0][1]
            base, want = (seconds, got) if base is None else (base, want)
            diff = max(rel_err(x, y) for x, y in zip(got, want))
            print(f"{t:>6} {name:>14} {seconds:>9.3f} {base / seconds:>8.1f}x {diff:>10.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
