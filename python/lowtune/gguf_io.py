"""GGUF files in and out.

    with GGUFFile("model.gguf") as f:        # memory-mapped, read-only
        f.metadata["llama.block_count"]      # 30
        f.tensor_infos["blk.0.attn_q.weight"] # TensorInfo(type=Q4_1, shape=[576, 576], ...)
        qt = f.tensor("blk.0.attn_q.weight") # QTensor whose raw bytes are a view of the file
    write_gguf("out.gguf", f.metadata, tensors, metadata_types=f.metadata_types)

The header is parsed here, not by gguf-py's GGUFReader: every length, count, offset and size is
checked against the file before it is used, so a truncated or hostile file raises GGUFError (a
ValueError that names the file and the problem) instead of crashing, hanging or allocating
gigabytes. All work is bounded by the file's size. gguf-py supplies the constants (type ids, block
sizes) and writes files (GGUFWriter).

Layout (ggml docs/gguf.md): magic "GGUF", u32 version, u64 tensor_count, u64 kv_count, the KV
pairs, the tensor infos (name, n_dims, ne[n_dims], type, offset), padding to the alignment, then the
data section. ne[0] is the fastest-varying dimension, i.e. the PyTorch shape reversed.
"""
from __future__ import annotations

import mmap
import os
import shutil
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .formats import Format, FORMATS, get_format
from .paths import failed_write
from .qtensor import QTensor

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                 # GGML_MAX_DIMS
MAX_NAME_BYTES = 63          # GGML_MAX_NAME is 64 including the terminating NUL
MAX_KEY_BYTES = 65535
MAX_ARRAY_NESTING = 4
QUANTIZATION_VERSION = 2     # GGML_QNT_VERSION

_SCALAR = {  # value type -> (struct code, size)
    GGUFValueType.UINT8: ("<B", 1), GGUFValueType.INT8: ("<b", 1),
    GGUFValueType.UINT16: ("<H", 2), GGUFValueType.INT16: ("<h", 2),
    GGUFValueType.UINT32: ("<I", 4), GGUFValueType.INT32: ("<i", 4),
    GGUFValueType.FLOAT32: ("<f", 4), GGUFValueType.BOOL: ("<B", 1),
    GGUFValueType.UINT64: ("<Q", 8), GGUFValueType.INT64: ("<q", 8),
    GGUFValueType.FLOAT64: ("<d", 8),
}
_NUMPY = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "<u1", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}
# ggml types stored as plain torch dtypes
_TORCH_DTYPES = {
    GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16, GGMLQuantizationType.F64: torch.float64,
    GGMLQuantizationType.I8: torch.int8, GGMLQuantizationType.I16: torch.int16,
    GGMLQuantizationType.I32: torch.int32, GGMLQuantizationType.I64: torch.int64,
}


class GGUFError(ValueError):
    """A GGUF file that cannot be read (or written) as asked; the message names file and problem."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file.

    type       the lowtune Format, or None for a ggml type lowtune has no kernels for (type_name says which)
    shape      PyTorch order, e.g. [out, in] for a linear weight
    ne         GGUF order (shape reversed): ne[0] is the row length
    offset     absolute byte offset of the tensor's data in the file
    nbytes     bytes of data
    """
    name: str
    type: Format | None
    shape: tuple[int, ...]
    ne: tuple[int, ...]
    offset: int
    nbytes: int
    type_name: str
    type_id: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.ne:
            n *= d
        return n


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; every failure names the file and the field."""

    def __init__(self, buf, size: int, path: str):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, msg: str) -> GGUFError:
        return GGUFError(f"{self.path}: {msg}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"file is truncated: {what} needs {n} bytes at offset {self.pos}, "
                            f"but the file has {self.size} bytes")

    def scalar(self, vtype: GGUFValueType, what: str):
        code, n = _SCALAR[vtype]
        self.need(n, what)
        (v,) = struct.unpack_from(code, self.buf, self.pos)
        self.pos += n
        return bool(v) if vtype == GGUFValueType.BOOL else v

    def u32(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT64, what)

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.u64(f"{what} length")
        if limit is not None and n > limit:
            raise self.fail(f"{what} is {n} bytes long; the limit is {limit}")
        self.need(n, what)
        b = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        # surrogateescape: invalid UTF-8 survives a read/write round trip byte for byte
        return b.decode("utf-8", errors="surrogateescape")

    def value_type(self, what: str) -> GGUFValueType:
        t = self.u32(f"{what} type")
        try:
            return GGUFValueType(t)
        except ValueError:
            raise self.fail(f"{what} has unknown value type {t}") from None

    def value(self, vtype: GGUFValueType, what: str, depth: int = 0):
        """Read one value; returns (python value, type descriptor)."""
        if vtype in _SCALAR:
            return self.scalar(vtype, what), vtype
        if vtype == GGUFValueType.STRING:
            return self.string(what), vtype
        # array: u32 element type, u64 count, elements
        if depth >= MAX_ARRAY_NESTING:
            raise self.fail(f"{what}: arrays nested more than {MAX_ARRAY_NESTING} deep")
        etype = self.value_type(f"{what} element")
        count = self.u64(f"{what} count")
        # smallest possible element: the count can never promise more bytes than the file has
        min_size = _SCALAR[etype][1] if etype in _SCALAR else (8 if etype == GGUFValueType.STRING else 12)
        if count * min_size > self.size - self.pos:
            raise self.fail(f"{what}: array of {count} {etype.name} elements needs at least "
                            f"{count * min_size} bytes but only {self.size - self.pos} remain")
        if etype in _NUMPY:
            arr = np.frombuffer(self.buf, dtype=_NUMPY[etype], count=count, offset=self.pos)
            self.pos += count * min_size
            vals = arr.tolist()
            if etype == GGUFValueType.BOOL:
                vals = [bool(v) for v in vals]
            return vals, (GGUFValueType.ARRAY, etype)
        if etype == GGUFValueType.STRING:
            vals = []
            buf, size, pos = self.buf, self.size, self.pos
            for i in range(count):
                if pos + 8 > size:
                    self.pos = pos
                    self.need(8, f"{what}[{i}] length")
                (n,) = struct.unpack_from("<Q", buf, pos)
                pos += 8
                if pos + n > size:
                    self.pos = pos
                    self.need(n, f"{what}[{i}]")
                vals.append(bytes(buf[pos:pos + n]).decode("utf-8", errors="surrogateescape"))
                pos += n
            self.pos = pos
            return vals, (GGUFValueType.ARRAY, GGUFValueType.STRING)
        # nested arrays: each element carries its own element type and count
        vals, inner = [], (GGUFValueType.ARRAY, GGUFValueType.UINT8)
        for i in range(count):
            v, desc = self.value(GGUFValueType.ARRAY, f"{what}[{i}]", depth + 1)
            vals.append(v)
            inner = desc if i == 0 else inner
        return vals, (GGUFValueType.ARRAY, inner)


# tensor types of Microsoft bitnet.cpp's ggml fork at ids that upstream ggml leaves unused (its removed
# IQ4_NL repacks); its TL2 (39) is upstream's MXFP4, which the file's id cannot tell apart
_BITNET_CPP_TYPES = {36: "I2_S", 37: "I8_S", 38: "TL1"}


def _ggml_type_name(type_id: int) -> str:
    geometry = _type_geometry(type_id)
    return f"type {type_id}" if geometry is None else geometry[0]


def _type_geometry(type_id: int) -> tuple[str, int, int] | None:
    """(name, block elements, block bytes) of a ggml type id from gguf-py's table, or from lowtune's
    formats for a type newer than the installed gguf-py (gguf 0.19 has no Q2_0); None when unknown."""
    try:
        gtype = GGMLQuantizationType(type_id)
        return (gtype.name, *GGML_QUANT_SIZES[gtype])
    except (ValueError, KeyError):
        fmt = _lowtune_format(type_id)
        return None if fmt is None else (fmt.name, fmt.block_elems, fmt.block_bytes)


def _ggml_type(type_id: int) -> GGMLQuantizationType | int:
    """gguf-py's enum member for a type id, or the id itself where gguf-py lacks it (its writer packs
    either as the u32 the file stores)."""
    try:
        return GGMLQuantizationType(type_id)
    except ValueError:
        return type_id


def _lowtune_format(type_id: int) -> Format | None:
    for f in FORMATS.values():
        if f.gguf and f.type_id == type_id:
            return f
    return None


class GGUFFile:
    """A GGUF file, memory-mapped. Tensors are views of the mapping (copy-on-write, so writing to
    one never touches the file). Use as a context manager or call close(); tensors handed out stay
    valid after close() (the mapping lives until the last view is gone).

    version, alignment, architecture
    metadata        {key: value}: strings decoded, arrays as lists
    metadata_types  {key: GGUFValueType, or (GGUFValueType.ARRAY, element type) for arrays}
    tensor_infos    {name: TensorInfo} in file order
    data_offset     where the data section starts
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._mm = None
        try:
            with open(self.path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < 24:
                    if size >= 4 and _peek(fh, 4) != GGUF_MAGIC:
                        raise GGUFError(f"{self.path}: not a GGUF file (bad magic)")
                    raise GGUFError(f"{self.path}: file is truncated ({size} bytes; a GGUF header needs 24)")
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot open: {e}") from e
        self.size = size
        try:
            self._parse()
        except GGUFError:
            self.close()
            raise
        except (struct.error, OverflowError, MemoryError, ValueError) as e:  # defence in depth
            self.close()
            raise GGUFError(f"{self.path}: malformed GGUF header ({type(e).__name__}: {e})") from e

    # ---- parsing -----------------------------------------------------------------------------
    def _parse(self) -> None:
        c = _Cursor(self._mm, self.size, self.path)
        magic = bytes(self._mm[0:4])
        if magic != GGUF_MAGIC:
            raise c.fail(f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
        c.pos = 4
        version = c.u32("version")
        if version not in SUPPORTED_VERSIONS:
            if version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
                raise c.fail("big-endian GGUF files are not supported")
            raise c.fail(f"unsupported GGUF version {version} (lowtune reads versions 2 and 3)")
        self.version = version
        n_tensors = c.u64("tensor count")
        n_kv = c.u64("metadata count")
        # each KV takes at least 8 (key len) + 4 (type) + 1 bytes; each tensor info at least 8+4+8+4+8
        if n_kv * 13 > self.size - c.pos:
            raise c.fail(f"header claims {n_kv} metadata entries, more than the file can hold")
        if n_tensors * 32 > self.size - c.pos:
            raise c.fail(f"header claims {n_tensors} tensors, more than the file can hold")

        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, Any] = {}
        for i in range(n_kv):
            key = c.string(f"metadata key #{i}", limit=MAX_KEY_BYTES)
            if key in self.metadata:
                raise c.fail(f"duplicate metadata key {key!r}")
            vtype = c.value_type(f"metadata {key!r}")
            val, desc = c.value(vtype, f"metadata {key!r}")
            self.metadata[key] = val
            self.metadata_types[key] = desc

        self.alignment = DEFAULT_ALIGNMENT
        if "general.alignment" in self.metadata:
            a = self.metadata["general.alignment"]
            if self.metadata_types["general.alignment"] != GGUFValueType.UINT32:
                raise c.fail("general.alignment must be a uint32")
            if a == 0 or a & (a - 1):
                raise c.fail(f"general.alignment {a} is not a power of two")
            self.alignment = a

        raw_infos = []
        names = set()
        for i in range(n_tensors):
            name = c.string(f"tensor #{i} name")
            if len(name.encode("utf-8", errors="surrogateescape")) > MAX_NAME_BYTES:
                raise c.fail(f"tensor name {name[:80]!r} is longer than {MAX_NAME_BYTES} bytes")
            if name in names:
                raise c.fail(f"duplicate tensor name {name!r}")
            names.add(name)
            n_dims = c.u32(f"tensor {name!r} n_dims")
            if not 1 <= n_dims <= MAX_DIMS:
                raise c.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            ne = tuple(c.u64(f"tensor {name!r} ne[{j}]") for j in range(n_dims))
            type_id = c.u32(f"tensor {name!r} type")
            offset = c.u64(f"tensor {name!r} offset")
            raw_infos.append((name, ne, type_id, offset))
        self.data_offset = _pad(c.pos, self.alignment)

        self.tensor_infos: dict[str, TensorInfo] = {}
        for name, ne, type_id, offset in raw_infos:
            self.tensor_infos[name] = self._check_tensor(c, name, ne, type_id, offset)

    def _check_tensor(self, c: _Cursor, name, ne, type_id, offset) -> TensorInfo:
        geometry = _type_geometry(type_id)
        if geometry is None and type_id in _BITNET_CPP_TYPES:
            raise c.fail(f"tensor {name!r} has type id {type_id}, Microsoft bitnet.cpp's {_BITNET_CPP_TYPES[type_id]}, "
                         "which ggml (and so llama.cpp and lowtune) does not have; convert the model's Hugging Face "
                         "checkpoint with llama.cpp's convert_hf_to_gguf.py and quantize it with llama-quantize to "
                         "TQ1_0 or TQ2_0 (llama.cpp's ternary types), which lowtune reads")
        if geometry is None:
            raise c.fail(f"tensor {name!r} has unknown tensor type id {type_id}")
        type_name, block, type_size = geometry
        n_elements = 1
        for d in ne:
            n_elements *= d
        if n_elements >= 2 ** 63 or any(d >= 2 ** 63 for d in ne):
            raise c.fail(f"tensor {name!r}: dimensions {list(ne)} overflow 64 bits")
        if ne[0] % block:
            raise c.fail(f"tensor {name!r}: row length ne[0]={ne[0]} is not a multiple of the "
                         f"{type_name} block size {block}")
        nbytes = n_elements // block * type_size
        if offset % self.alignment:
            raise c.fail(f"tensor {name!r}: offset {offset} is not a multiple of the alignment {self.alignment}")
        start = self.data_offset + offset
        if start + nbytes > self.size:
            raise c.fail(f"tensor {name!r}: data [{start}, {start + nbytes}) lies beyond the end of "
                         f"the file ({self.size} bytes); the file is truncated or the offset is wrong")
        return TensorInfo(name=name, type=_lowtune_format(type_id), shape=tuple(reversed(ne)), ne=ne,
                          offset=start, nbytes=nbytes, type_name=type_name, type_id=type_id)

    # ---- access ------------------------------------------------------------------------------
    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def _info(self, name: str) -> TensorInfo:
        if self._mm is None:
            raise GGUFError(f"{self.path}: file is closed")
        try:
            return self.tensor_infos[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def _bytes(self, info: TensorInfo) -> np.ndarray:
        # np.frombuffer holds an export of the mmap, so the mapping outlives close() while used
        return np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes, a zero-copy uint8 view of the file."""
        return torch.from_numpy(self._bytes(self._info(name)))

    def tensor(self, name: str):
        """A QTensor for quantized tensors (zero-copy view; no dequantize), a torch.Tensor in its own
        dtype (shape in PyTorch order) for F32/F16/BF16 and the integer types."""
        info = self._info(name)
        if info.type is not None and info.type.quantized:
            return self.qtensor(name)
        dtype = _TORCH_DTYPES.get(GGMLQuantizationType(info.type_id))
        if dtype is None:
            raise GGUFError(f"{self.path}: tensor {name!r} has type {info.type_name}, which lowtune "
                            f"cannot use; requantize the file (e.g. llama-quantize to Q4_K_M or Q8_0)")
        b = self._bytes(info)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if info.offset % itemsize:  # only with alignments below the element size
            b = b.copy()
        return torch.from_numpy(b).view(dtype).reshape(info.shape)

    def qtensor(self, name: str) -> QTensor:
        """Always a QTensor [N, K] (K = ne[0], N = product of the other dims); F32/F16/BF16 as those formats."""
        info = self._info(name)
        if info.type is None:
            raise GGUFError(f"{self.path}: tensor {name!r} has type {info.type_name}, which lowtune "
                            f"has no kernels for; requantize the file (e.g. llama-quantize to Q4_K_M or Q8_0)")
        k = info.ne[0]
        n = info.n_elements // k if k else 0
        return QTensor.from_raw(torch.from_numpy(self._bytes(info)), info.type, (n, k))

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensor_infos)

    def __len__(self) -> int:
        return len(self.tensor_infos)

    def close(self) -> None:
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # tensors still view it; it is unmapped when the last one is freed

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GGUFFile({self.path!r}, v{self.version}, {self.architecture}, "
                f"{len(self.tensor_infos)} tensors, {len(self.metadata)} keys)")


def _peek(fh, n: int) -> bytes:
    pos = fh.tell()
    b = fh.read(n)
    fh.seek(pos)
    return b


def _pad(x: int, n: int) -> int:
    return (x + n - 1) // n * n


# ---- writing ---------------------------------------------------------------------------------

# Types of well-known keys, used when no metadata_types are given (llama.cpp checks key types).
_KNOWN_KEY_TYPES = {
    "general.alignment": GGUFValueType.UINT32,
    "general.quantization_version": GGUFValueType.UINT32,
    "general.file_type": GGUFValueType.UINT32,
    "tokenizer.ggml.scores": (GGUFValueType.ARRAY, GGUFValueType.FLOAT32),
    "tokenizer.ggml.token_type": (GGUFValueType.ARRAY, GGUFValueType.INT32),
    "adapter.lora.alpha": GGUFValueType.FLOAT32,
}
_KNOWN_SUFFIX_TYPES = {  # "<arch>.<suffix>"
    "context_length": GGUFValueType.UINT32, "embedding_length": GGUFValueType.UINT32,
    "block_count": GGUFValueType.UINT32, "feed_forward_length": GGUFValueType.UINT32,
    "vocab_size": GGUFValueType.UINT32, "rope.dimension_count": GGUFValueType.UINT32,
    "attention.head_count": GGUFValueType.UINT32, "attention.head_count_kv": GGUFValueType.UINT32,
    "attention.layer_norm_rms_epsilon": GGUFValueType.FLOAT32, "rope.freq_base": GGUFValueType.FLOAT32,
    "attention.layer_norm_epsilon": GGUFValueType.FLOAT32,
    "rope.scaling.factor": GGUFValueType.FLOAT32,
    "rope.scaling.original_context_length": GGUFValueType.UINT32,
}

# general.file_type (LLAMA_FTYPE) -> the main tensor type of such a file, and back
_FTYPE_MAIN = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
               10: "Q2_K", 21: "Q2_K", 11: "Q3_K", 12: "Q3_K", 13: "Q3_K", 14: "Q4_K", 15: "Q4_K",
               16: "Q5_K", 17: "Q5_K", 18: "Q6_K", 32: "BF16",
               19: "IQ2_XXS", 20: "IQ2_XS", 22: "IQ3_S", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
               26: "IQ3_S", 27: "IQ3_S", 28: "IQ2_XS", 29: "IQ2_S", 30: "IQ4_XS", 31: "IQ1_M",
               36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4", 39: "NVFP4", 40: "Q1_0", 41: "Q2_0"}
# (38 is MOSTLY_MXFP4_MOE: gpt-oss's experts MXFP4, the rest wider)
_MAIN_FTYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
               "Q2_K": 10, "Q3_K": 12, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18, "BF16": 32,
               "IQ2_XXS": 19, "IQ2_XS": 20, "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26,
               "IQ2_S": 29, "IQ4_XS": 30, "IQ1_M": 31, "TQ1_0": 36, "TQ2_0": 37, "MXFP4": 38, "NVFP4": 39,
               "Q1_0": 40, "Q2_0": 41}


def main_file_type(counts: dict[str, int]) -> int | None:
    """general.file_type (llama.cpp's ftype) of weights holding {type name: elements}: that of the
    type with the most elements, or None when llama.cpp names no ftype after it."""
    return _MAIN_FTYPE.get(max(counts, key=counts.get)) if counts else None


def _infer_type(key: str, val):
    if key in _KNOWN_KEY_TYPES:
        return _KNOWN_KEY_TYPES[key]
    if key.endswith("_token_id"):
        return GGUFValueType.UINT32
    suffix = key.split(".", 1)[1] if "." in key else key
    if suffix in _KNOWN_SUFFIX_TYPES:
        return _KNOWN_SUFFIX_TYPES[suffix]
    return _type_of_value(val, key)


def _type_of_value(val, key: str):
    if isinstance(val, bool):
        return GGUFValueType.BOOL
    if isinstance(val, (int, np.integer)):
        if 0 <= val < 2 ** 32:
            return GGUFValueType.UINT32
        if -2 ** 31 <= val < 0:
            return GGUFValueType.INT32
        return GGUFValueType.UINT64 if val >= 2 ** 63 else GGUFValueType.INT64
    if isinstance(val, (float, np.floating)):
        return GGUFValueType.FLOAT32
    if isinstance(val, (str, bytes)):
        return GGUFValueType.STRING
    if isinstance(val, (list, tuple)):
        if not val:
            raise GGUFError(f"metadata {key!r}: cannot infer the element type of an empty array; "
                            f"pass metadata_types")
        first = val[0]
        if isinstance(first, (int, np.integer)) and not isinstance(first, bool):
            return (GGUFValueType.ARRAY, GGUFValueType.INT32 if all(-2**31 <= v < 2**31 for v in val)
                    else GGUFValueType.INT64)
        return (GGUFValueType.ARRAY, _type_of_value(first, key))
    raise GGUFError(f"metadata {key!r}: cannot store a {type(val).__name__} in GGUF")


def _pack_value(key: str, val, desc) -> bytes:
    """value -> GGUF bytes (type tag excluded) for a type descriptor; strings keep invalid bytes
    (surrogateescape) so a read/write round trip is exact."""
    if isinstance(desc, tuple):
        etype = desc[1]
        if not isinstance(val, (list, tuple)):
            raise GGUFError(f"metadata {key!r}: expected a list for an array, got {type(val).__name__}")
        head = etype[0] if isinstance(etype, tuple) else etype
        out = bytearray(struct.pack("<IQ", int(head), len(val)))
        if head in _NUMPY and not isinstance(etype, tuple):
            try:
                out += np.asarray(val, dtype=_NUMPY[head]).tobytes() if val else b""
            except (OverflowError, ValueError, TypeError) as e:
                raise GGUFError(f"metadata {key!r}: values do not fit {head.name}: {e}") from e
            return bytes(out)
        for v in val:
            out += _pack_value(key, v, etype)
        return bytes(out)
    desc = GGUFValueType(desc)
    if desc == GGUFValueType.STRING:
        b = val if isinstance(val, bytes) else str(val).encode("utf-8", errors="surrogateescape")
        return struct.pack("<Q", len(b)) + b
    if desc == GGUFValueType.ARRAY:
        raise GGUFError(f"metadata {key!r}: an array type needs its element type")
    code = _SCALAR[desc][0]
    try:
        return struct.pack(code, bool(val) if desc == GGUFValueType.BOOL else val)
    except struct.error as e:
        raise GGUFError(f"metadata {key!r}: value {val!r} does not fit {desc.name}: {e}") from e


def _tensor_bytes(name: str, value) -> tuple[np.ndarray, GGMLQuantizationType | int, tuple[int, ...]]:
    """(uint8 bytes, ggml type, ne) for a QTensor, a torch.Tensor or (either, torch_shape)."""
    shape = None
    if isinstance(value, tuple) and len(value) == 2:
        value, shape = value
    if isinstance(value, QTensor):
        fmt = value.format
        if not fmt.gguf:
            raise GGUFError(f"tensor {name!r} is {fmt.name}, which GGUF cannot store; convert it first "
                            f"(lowtune.export writes INTb-gG as Q4_1/Q5_1 or another GGUF type)")
        n, k = value.shape
        raw = value.raw.detach().to("cpu").contiguous()
        ne = (k, n) if shape is None else tuple(reversed([int(d) for d in shape]))
        if shape is not None and (int(np.prod(ne)) != n * k or ne[0] != k):
            raise GGUFError(f"tensor {name!r}: shape {tuple(shape)} does not match the QTensor's rows "
                            f"of {k} (its last dimension must be {k} and it must hold {n}x{k} elements)")
        return raw.reshape(-1).numpy(), _ggml_type(fmt.type_id), ne
    if isinstance(value, torch.Tensor):
        inv = {v: k for k, v in _TORCH_DTYPES.items()}
        if value.dtype not in inv:
            raise GGUFError(f"tensor {name!r}: dtype {value.dtype} cannot be stored in GGUF "
                            f"(use float32, float16, bfloat16 or a QTensor)")
        t = value.detach().to("cpu").contiguous()
        dims = list(t.shape) if shape is None else [int(d) for d in shape]
        if not dims:
            dims = [1]
        if len(dims) > MAX_DIMS:
            raise GGUFError(f"tensor {name!r} has {len(dims)} dimensions; GGUF allows at most {MAX_DIMS}")
        return t.reshape(-1).view(torch.uint8).numpy(), inv[value.dtype], tuple(reversed(dims))
    raise GGUFError(f"tensor {name!r}: expected a QTensor or torch.Tensor, got {type(value).__name__}")


def write_gguf(path, metadata: dict, tensors: Iterable, metadata_types: dict | None = None,
               alignment: int = DEFAULT_ALIGNMENT) -> None:
    """Write a GGUF file atomically (to `path + ".tmp"`, then renamed over `path`).

    metadata       {key: value}; must hold general.architecture
    tensors        iterable of (name, QTensor | torch.Tensor) or (name, (tensor, torch_shape)),
                   written in this order. A list is written straight from memory; any other iterable
                   (e.g. a generator that builds each tensor) is consumed one tensor at a time into a
                   side file, so peak memory stays about one tensor.
    metadata_types {key: type descriptor} as GGUFFile.metadata_types; keys missing from it get the
                   llama.cpp type for well-known keys, else one inferred from the value.
    general.quantization_version is set when any tensor is quantized; general.file_type is kept
    when it names a type present in the file, else set from the most common quantized type.
    (gguf_split.write_gguf_split writes the same in parts.)
    """
    path = os.fspath(path)
    arch = check_write_args(path, metadata, alignment)
    tmp, spill = path + ".tmp", path + ".tmp.data"
    try:
        table = TensorTable(path)
        materialised: list[np.ndarray] | None = None
        if isinstance(tensors, (list, tuple)):
            materialised = [table.take(n, v) for n, v in tensors]
        else:
            with open(spill, "wb") as sf:
                for n, v in tensors:
                    table.spill(sf, table.take(n, v), alignment)
        kv = header_kv(metadata, metadata_types, table.infos, alignment)
        write_file(tmp, arch, kv, table.infos, alignment, materialised=materialised, spill=spill)
        os.replace(tmp, path)
    except BaseException as e:
        raise failed_write(e, path, [tmp])
    finally:
        if os.path.exists(spill):
            os.remove(spill)


# The writer's pieces, shared with gguf_split (which writes one model as several files).

def check_write_args(path: str, metadata: dict, alignment: int) -> str:
    """The architecture to write; raises GGUFError for a bad alignment or no architecture."""
    if alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: alignment {alignment} is not a power of two")
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise GGUFError(f"{path}: metadata must contain general.architecture (e.g. 'llama')")
    return arch


class TensorTable:
    """The tensors given to a writer: names checked, (name, ggml type, ne, bytes) in order."""

    def __init__(self, path: str):
        self.path = path
        self.infos: list[tuple[str, GGMLQuantizationType | int, tuple[int, ...], int]] = []
        self._names: set[str] = set()

    def take(self, name, value) -> np.ndarray:
        """Check and record one tensor; returns its bytes."""
        if not isinstance(name, str) or not name:
            raise GGUFError(f"{self.path}: tensor names must be non-empty strings, got {name!r}")
        if len(name.encode("utf-8")) > MAX_NAME_BYTES:
            raise GGUFError(f"{self.path}: tensor name {name!r} is longer than {MAX_NAME_BYTES} bytes")
        if name in self._names:
            raise GGUFError(f"{self.path}: duplicate tensor name {name!r}")
        self._names.add(name)
        data, gtype, ne = _tensor_bytes(name, value)
        self.infos.append((name, gtype, ne, data.nbytes))
        return data

    @staticmethod
    def spill(fh, data: np.ndarray, alignment: int) -> None:
        """Append one tensor's bytes, padded to the alignment, to a side file."""
        data.tofile(fh)
        fh.write(b"\0" * (_pad(data.nbytes, alignment) - data.nbytes))


def header_kv(metadata: dict, metadata_types: dict | None, infos: list, alignment: int) -> dict:
    """{key: (value, type descriptor)} to write for `metadata` over tensors `infos` (TensorTable):
    general.architecture left out (the writer puts it first), general.alignment where it is not
    the default, general.quantization_version and general.file_type as write_gguf says."""
    metadata_types = dict(metadata_types or {})
    kv: dict[str, tuple[Any, Any]] = {}
    for key, val in metadata.items():
        if key == "general.architecture":
            continue
        kv[key] = (val, metadata_types[key] if key in metadata_types else _infer_type(key, val))
    if alignment != DEFAULT_ALIGNMENT or "general.alignment" in kv:
        kv["general.alignment"] = (alignment, GGUFValueType.UINT32)
    quantized = [(gt, int(np.prod(ne))) for _, gt, ne, _ in infos if gt not in _TORCH_DTYPES]
    if quantized:
        kv["general.quantization_version"] = (QUANTIZATION_VERSION, GGUFValueType.UINT32)
    # general.file_type names the main type; keep the given one while it is a type the file
    # holds (quantized types win over float ones), else take the type with the most elements
    weights = quantized or [(gt, int(np.prod(ne))) for _, gt, ne, _ in infos if len(ne) >= 2]
    present = {_ggml_type_name(gt) for gt, _ in weights}
    ftype = metadata.get("general.file_type")
    if present and _FTYPE_MAIN.get(ftype) not in present:
        counts: dict[str, int] = {}
        for gt, n in weights:
            counts[_ggml_type_name(gt)] = counts.get(_ggml_type_name(gt), 0) + n
        main = main_file_type(counts)
        if main is not None:
            kv["general.file_type"] = (main, GGUFValueType.UINT32)
        else:
            kv.pop("general.file_type", None)
    return kv


def write_file(tmp: str, arch: str, kv: dict, infos: list, alignment: int,
               materialised: list[np.ndarray] | None = None, spill: str | None = None) -> None:
    """Write header (kv from header_kv, infos from TensorTable) and data to `tmp`, flushed to
    disk: the data from memory (materialised) or from a side file of padded tensors (spill)."""
    writer = _RawKVWriter(tmp, arch)
    try:
        writer.data_alignment = alignment
        for key, (val, desc) in kv.items():
            writer.add_key_value(key, _PackedValue(_pack_value(key, val, desc)), _desc_head(desc))
        for name, gtype, ne, nbytes in infos:
            writer.add_tensor_info(name, tuple(reversed(ne)), np.dtype(np.float32), nbytes, raw_dtype=gtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        if materialised is not None:
            for data in materialised:
                writer.write_tensor_data(data)   # pads before and after to the alignment
        else:
            fout = writer.fout[0]
            writer.write_padding(fout, fout.tell())
            with open(spill, "rb") as sf:
                shutil.copyfileobj(sf, fout, 16 << 20)
        writer.flush()
        os.fsync(writer.fout[0].fileno())
    finally:
        writer.close()


class _PackedValue(bytes):
    """A KV value already packed by _pack_value (lets us keep exact types, nesting, empty arrays)."""


def _desc_head(desc) -> GGUFValueType:
    return GGUFValueType.ARRAY if isinstance(desc, tuple) else GGUFValueType(desc)


class _RawKVWriter(GGUFWriter):
    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if isinstance(val, _PackedValue):
            return (struct.pack("<I", int(vtype)) if add_vtype else b"") + bytes(val)
        return super()._pack_val(val, vtype, add_vtype, sub_type)
