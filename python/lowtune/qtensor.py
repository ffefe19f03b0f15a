"""QTensor: a weight kept in its own block format.

    qt.format   the Format (qt.type is its name, e.g. "Q4_K")
    qt.shape    logical shape (N, K): N output rows of K inputs
    qt.raw      uint8 tensor [N, row_bytes]: GGUF-layout block bytes, on CPU or GPU

A QTensor is a plain container: it is never expanded to floats except inside kernels or by an
explicit lowtune.dequantize(qt, dtype). The kernels (lowtune.ops) take its raw bytes, the type id
and the shape, so nothing here depends on them.
"""
from __future__ import annotations

import numpy as np
import torch

from .formats import Format, get_format


class QTensor:
    __slots__ = ("format", "shape", "raw")

    def __init__(self, raw: torch.Tensor, fmt: Format, shape: tuple[int, int]):
        self.format = fmt
        self.shape = (int(shape[0]), int(shape[1]))
        self.raw = raw

    @classmethod
    def from_raw(cls, raw, qtype, shape) -> "QTensor":
        """Wrap block bytes (uint8 tensor or NumPy array, any shape with the right byte count)."""
        fmt = get_format(qtype)
        if len(shape) != 2:
            raise ValueError(f"QTensor shape must be (N, K), got {tuple(shape)}")
        n, k = int(shape[0]), int(shape[1])
        if n < 0 or k < 0:
            raise ValueError(f"QTensor shape must be non-negative, got {tuple(shape)}")
        row_bytes = fmt.row_bytes(k)
        if isinstance(raw, np.ndarray):
            raw = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(-1))
        if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
            raise ValueError(f"raw must be a uint8 tensor, got {getattr(raw, 'dtype', type(raw))}")
        if raw.numel() != n * row_bytes:
            raise ValueError(
                f"raw holds {raw.numel()} bytes but a {fmt.name} tensor of shape ({n}, {k}) needs "
                f"{n} x {row_bytes} = {n * row_bytes} bytes")
        return cls(raw.reshape(n, row_bytes), fmt, (n, k))

    @property
    def type(self) -> str:
        return self.format.name

    @property
    def device(self) -> torch.device:
        return self.raw.device

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    @property
    def bits_per_weight(self) -> float:
        return self.format.bits_per_weight

    def rows(self, start: int, stop: int) -> "QTensor":
        """Rows start:stop, sharing the bytes (packed rows are independent)."""
        return QTensor(self.raw[start:stop], self.format, (stop - start, self.shape[1]))

    def to(self, device, non_blocking: bool = False) -> "QTensor":
        return QTensor(self.raw.to(device, non_blocking=non_blocking), self.format, self.shape)

    def pin_memory(self) -> "QTensor":
        return QTensor(self.raw.pin_memory(), self.format, self.shape)

    def clone(self) -> "QTensor":
        return QTensor(self.raw.clone(), self.format, self.shape)

    def __repr__(self) -> str:
        return f"QTensor({self.type}, shape={self.shape}, device={self.device})"
