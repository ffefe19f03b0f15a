"""Instruction counts of a kernel's loops, read from its SASS: a check of a kernel change on a machine with
no GPU (nvcc compiles for sm_90; cuobjdump disassembles: `pip install nvidia-cuda-cuobjdump`, whose wheel
holds the binary under nvidia/cu13/bin).

    nvcc -std=c++20 --expt-relaxed-constexpr -arch=sm_90 -O3 -cubin -Icsrc -o build/k.cubin probe.cu
    python3 tools/gpu/sass_loops.py build/k.cubin grad_staged_kernelILi12E13__nv_bfloat16
    python3 tools/gpu/sass_loops.py build/k.cubin "" --same-as build/k_before.cubin

(probe.cu: includes the kernel's header and instantiates its launcher for the types wanted; csrc/cuda/inst_*.cu
are such files for a group of types, every launcher.) For every function whose mangled name contains the
pattern: its instruction count, registers and stack bytes (spills: whether a __launch_bounds__ fits), and for
each loop (a backward branch) the instructions between its target and the branch by opcode. A loop's body
holds every path through it (cold branches too), so compare two builds of the same code, not the count with a
profile's.
--same-as: instead, whether each function's instructions equal those of the other build's function of the
same name (branch targets and other hex literals masked), the check that a refactor left the SASS alone;
exits 1 where one differs or is missing.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys

LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?);")


def cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import nvidia  # the nvidia-cuda-cuobjdump wheel's namespace package
        for root in nvidia.__path__:
            for sub in ("cu13/bin", "cuda_cuobjdump/bin"):
                path = os.path.join(root, sub, "cuobjdump")
                if os.path.exists(path):
                    return path
    except ImportError:
        pass
    sys.exit("cuobjdump not found: pip install nvidia-cuda-cuobjdump, or put CUDA's bin on PATH")


def functions(cubin: str) -> dict[str, list[tuple[int, str, str]]]:
    text = subprocess.run([cuobjdump(), "-sass", cubin], check=True, capture_output=True, text=True).stdout
    out: dict[str, list[tuple[int, str, str]]] = {}
    name = None
    for line in text.splitlines():
        m = re.match(r"\s+Function : (\S+)", line)
        if m:
            name = m.group(1)
            out[name] = []
            continue
        m = LINE.match(line)
        if m and name:
            out[name].append((int(m.group(1), 16), m.group(3).split(".")[0], m.group(4)))
    return out


def usage(cubin: str) -> dict[str, str]:
    """Each function's registers and stack bytes (a stack frame in these kernels is spills), as ptxas set them."""
    text = subprocess.run([cuobjdump(), "-res-usage", cubin], check=True, capture_output=True, text=True).stdout
    out, name = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+)", line)
        if m and name:
            out[name] = f"{m.group(1)} registers, {m.group(2)} bytes of stack"
    return out


def loops(ins: list[tuple[int, str, str]]):
    for addr, op, args in ins:
        target = re.search(r"0x([0-9a-f]+)", args) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            lo = int(target.group(1), 16)
            yield lo, addr, collections.Counter(o for a, o, _ in ins if lo <= a <= addr)


def same_as(ours: dict, theirs: dict, pattern: str) -> int:
    masked = lambda ins: [(op, re.sub(r"0x[0-9a-f]+", "X", args)) for _, op, args in ins]  # noqa: E731
    names = [n for n in ours if pattern in n]
    if not names:
        print(f"no function's name contains {pattern!r}")
        return 1
    differ = [n for n in names if n not in theirs or masked(ours[n]) != masked(theirs[n])]
    for n in differ:
        print(f"differs: {n} ({len(ours[n])} against {len(theirs.get(n, []))} instructions)")
    print(f"{len(names) - len(differ)} of {len(names)} functions the same")
    return 1 if differ else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cubin")
    ap.add_argument("pattern", help="a part of the kernels' mangled names")
    ap.add_argument("--top", type=int, default=20, help="opcodes shown a loop")
    ap.add_argument("--same-as", metavar="CUBIN", help="compare every matching function with this build's")
    a = ap.parse_args(argv)
    if a.same_as:
        return same_as(functions(a.cubin), functions(a.same_as), a.pattern)
    res = usage(a.cubin)
    for name, ins in functions(a.cubin).items():
        if a.pattern not in name:
            continue
        print(f"{name}: {len(ins)} instructions, {res.get(name, 'usage unknown')}")
        for lo, hi, hist in loops(ins):
            top = ", ".join(f"{k} {v}" for k, v in hist.most_common(a.top))
            print(f"  loop {lo:#06x}-{hi:#06x}: {sum(hist.values())} ({top})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
