"""Float dtypes by name: GGUF/safetensors type names (F32, F16, BF16) and the spellings users type
(fp32, bf16, float16, ...), each to one torch dtype.

    torch_dtype("bf16")            # torch.bfloat16
    torch_dtype("F16")             # torch.float16
    type_name(torch.bfloat16)      # "BF16" (the GGUF and safetensors name)
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_SPELLINGS = {"F32": ("f32", "fp32", "float32", "float"), "F16": ("f16", "fp16", "float16", "half"),
              "BF16": ("bf16", "bfloat16")}
_BY_SPELLING = {s: t for t, names in _SPELLINGS.items() for s in (t.lower(), *names)}


@functools.cache
def float_types() -> dict[str, torch.dtype]:
    """{"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}"""
    import torch  # here: the names need no torch (the command line checks them before torch loads)
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def type_of(name: str) -> str:
    """The type name (F32, F16, BF16) of any accepted spelling."""
    key = str(name).strip().lower()
    if key not in _BY_SPELLING:
        raise ValueError(f"unknown float type {name!r}: use fp32, fp16 or bf16")
    return _BY_SPELLING[key]


def torch_dtype(name: str) -> torch.dtype:
    return float_types()[type_of(name)]


def type_name(dtype: torch.dtype) -> str:
    """F32 / F16 / BF16 for a float torch dtype."""
    for name, dt in float_types().items():
        if dt == dtype:
            return name
    raise ValueError(f"{dtype} is not a float type GGUF or safetensors store (float32, float16, bfloat16)")


def hf_name(dtype: torch.dtype) -> str:
    """transformers' name of a dtype in config.json (torch_dtype): float32, float16, bfloat16."""
    return str(dtype).removeprefix("torch.")
