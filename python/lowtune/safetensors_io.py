"""safetensors in and out: a Hugging Face checkpoint read as the GGUF file of the same model, and
safetensors files written one tensor at a time.

    ckpt = HFCheckpoint("SmolLM2-135M/")     # config.json + *.safetensors (+ tokenizer files)
    ckpt.metadata["llama.block_count"]        # the keys a GGUF file of this model would hold
    ckpt.tensor_infos["blk.0.attn_q.weight"]  # TensorInfo: BF16 [576, 576] (GGUF names and order)
    ckpt.tensor("blk.0.attn_q.weight")        # the stored floats as GGUF holds them (RoPE row order,
                                              # Gemma's 1 + w norms)
    write_gguf("model.gguf", ckpt.metadata, ckpt.items(), ckpt.metadata_types)

HFCheckpoint is GGUFFile-shaped (metadata, metadata_types, tensor_infos, tensor(), qtensor(),
alignment, close()), so everything that reads a GGUF file reads a checkpoint the same way;
lowtune.loading quantizes it on the way in. Nothing is read until a tensor is asked for:
safetensors memory-maps the files, and peak memory is one tensor. Names, config keys, the q/k
row order and the tensors built from config.json (RoPE factors) come from lowtune.hf_names.
"""
from __future__ import annotations

import json
import math
import mmap
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from gguf.constants import GGUFValueType

from . import hf_names
from .checkpoint import atomic_write
from .progress import tracked
from .dtypes import float_types, type_name
from .families import FAMILIES
from .formats import get_format
from .gguf_io import DEFAULT_ALIGNMENT, TensorInfo, main_file_type
from .qtensor import QTensor
from .tokenizer import tokenizer_metadata_from_dir

_SAFETENSORS_FLOATS = {"F32": "F32", "F16": "F16", "BF16": "BF16"}


def safetensors_files(d: Path) -> list[Path]:
    """The weight files of an HF checkpoint directory, in the order of its index (or by name)."""
    index = d / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [d / f for f in files]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{d}: no *.safetensors files (a Hugging Face checkpoint directory needs "
                         "config.json and model*.safetensors)")
    return files


def _gguf_order(name: str):
    """GGUF order: embeddings, the blocks in order, then the rest (as convert_hf_to_gguf writes)."""
    m = re.match(r"blk\.(\d+)\.", name)
    return (1, int(m.group(1)), name) if m else ((0, 0, name) if name == "token_embd.weight" else (2, 0, name))


class Source:
    """What GGUF-like sources share besides their tensors: iteration over names, `with`."""
    tensor_infos: dict

    def __iter__(self):
        return iter(self.tensor_infos)

    def __len__(self):
        return len(self.tensor_infos)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        pass


class HFCheckpoint(Source):
    """A Hugging Face checkpoint directory, shaped like GGUFFile (module doc)."""

    def __init__(self, path):
        from safetensors import safe_open

        d = Path(path)
        if not (d / "config.json").is_file():
            raise ValueError(f"{d}: no config.json; pass a Hugging Face model directory or a GGUF file")
        self.path = str(d)
        self.config = json.loads((d / "config.json").read_text())
        self.metadata, self.metadata_types = hf_names.metadata_from_hf_config(self.config, d.name)
        self.arch = self.metadata["general.architecture"]
        self.alignment = DEFAULT_ALIGNMENT
        tied = bool(self.config.get("tie_word_embeddings", False))
        self._files: dict[str, Any] = {}
        self._where: dict[str, tuple] = {}  # GGUF name -> (file, HF name[, part, parts of a fused tensor])
        # GGUF name -> {i: (file, HF name, dtype, shape)} of the matrices it stacks on its first dimension
        stacked: dict[str, dict[int, tuple]] = {}
        infos: dict[str, TensorInfo] = {}
        scalars: dict[str, dict[int, float]] = {}  # per-layer scalars GGUF keeps as metadata (Apertus's xIELU)
        for f in safetensors_files(d):
            st = self._files[str(f)] = safe_open(str(f), framework="pt")
            for hf in st.keys():
                at = hf_names.layer_scalar(hf, self.arch)
                if at is not None:
                    scalars.setdefault(at[0], {})[at[1]] = float(st.get_tensor(hf).float().reshape(-1)[0])
                    continue
                part = hf_names.stacked_part(hf, self.arch)
                if part is not None:  # (one matrix of a stacked GGUF tensor: an expert's, Gemma 3n's AltUp's)
                    sl = st.get_slice(hf)
                    stacked.setdefault(part[0], {})[part[1]] = (f, hf, sl.get_dtype(), tuple(sl.get_shape()))
                    continue
                parts = hf_names.fused_parts(hf, self.arch)
                name = hf_names.gguf_name(hf, self.arch) if parts is None else parts[0]
                if name is None or (tied and name == "output.weight"):
                    continue
                if name in infos:
                    raise ValueError(f"{f}: tensor {hf!r} appears twice in the checkpoint")
                sl = st.get_slice(hf)
                dt = _SAFETENSORS_FLOATS.get(sl.get_dtype())
                if dt is None:
                    raise ValueError(f"{f}: tensor {hf!r} is {sl.get_dtype()}; expected F32, F16 or BF16")
                if parts is not None:  # (rows of several GGUF tensors, in equal parts: Granite 4's gate and up)
                    shape = sl.get_shape()
                    for i, name in enumerate(parts):
                        infos[name] = _info(name, get_format(dt), (shape[0] // len(parts), *shape[1:]))
                        self._where[name] = (f, hf, i, len(parts))
                    continue
                infos[name] = _info(name, get_format(dt), hf_names.gguf_shape(name, sl.get_shape(), self.metadata))
                self._where[name] = (f, hf)
        self._stacked = {}
        for name, each in stacked.items():
            n = len(each)
            if sorted(each) != list(range(n)) or len({(dt, shape) for _, _, dt, shape in each.values()}) != 1:
                raise ValueError(f"{d}: the checkpoint's matrices of {name} are not matrices 0 to {n - 1} of one "
                                 "shape and type")
            self._stacked[name] = [each[i][:2] for i in range(n)]
            _, _, dt, shape = each[0]
            if dt not in _SAFETENSORS_FLOATS:
                raise ValueError(f"{d}: tensor {each[0][1]!r} is {dt}; expected F32, F16 or BF16")
            infos[name] = _info(name, get_format(_SAFETENSORS_FLOATS[dt]), (n, *shape))
        n_layers = int(self.metadata[f"{self.arch}.block_count"])
        for key in hf_names.LAYER_SCALARS.get(self.arch, {}):
            if sorted(scalars.get(key, {})) != list(range(n_layers)):
                raise ValueError(f"{d}: the checkpoint lacks {key} (its layers' tensors) for some of its {n_layers} "
                                 "layers")
            self.metadata[key] = [scalars[key][i] for i in range(n_layers)]
            self.metadata_types[key] = (GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
        self._extra = {}
        for name, values in hf_names.generated_tensors(self.config).items():
            self._extra[name] = torch.tensor(values, dtype=torch.float32)
            infos[name] = _info(name, get_format("F32"), (len(values),))
        norm = FAMILIES[self.arch].output_norm_tensor + ".weight"
        needed = ("token_embd.weight", norm) if FAMILIES[self.arch].norm_weights else ("token_embd.weight",)
        missing = [n for n in needed if n not in infos]
        if missing:
            raise ValueError(f"{d}: the checkpoint lacks {missing}")
        self.tensor_infos = {n: infos[n] for n in sorted(infos, key=_gguf_order)}
        set_file_type(self.metadata, self.metadata_types, self.tensor_infos)
        if (d / "tokenizer.json").exists() or (d / "tokenizer.model").exists():
            self.metadata.update(tokenizer_metadata_from_dir(d, self.arch))
            prefix = FAMILIES[self.arch].spm_space_prefix
            if prefix is not None and self.metadata.get("tokenizer.ggml.model") == "llama":
                self.metadata["tokenizer.ggml.add_space_prefix"] = prefix
                self.metadata_types["tokenizer.ggml.add_space_prefix"] = GGUFValueType.BOOL

    @property
    def architecture(self) -> str:
        return self.arch

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor as stored (its float dtype), in GGUF's name and row order."""
        if name in self._extra:
            return self._extra[name]
        if name in self._stacked:  # (its matrices stacked on the first dimension, as GGUF holds them)
            w = torch.stack([self._files[str(f)].get_tensor(hf) for f, hf in self._stacked[name]])
        elif name not in self._where:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        else:
            f, hf, *part = self._where[name]
            w = self._files[str(f)].get_tensor(hf)
            if part:  # (part i of n of a fused HF tensor's rows)
                i, n = part
                w = w.chunk(n)[i]
        return hf_names.fold_multipliers(name, hf_names.from_hf_values(name, w, self.metadata), self.config)

    def qtensor(self, name: str) -> QTensor:
        """The tensor as an F32/F16/BF16 QTensor [N, K] (1-D tensors as [1, K])."""
        t = self.tensor(name)
        flat = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
        return QTensor.from_raw(flat.contiguous().view(torch.uint8).reshape(-1),
                                type_name(t.dtype), tuple(flat.shape))

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in GGUF order, one read at a time (for write_gguf)."""
        return ((n, self.tensor(n)) for n in self.tensor_infos)

    def close(self) -> None:
        self._files = {}


def set_file_type(metadata: dict, metadata_types: dict, tensor_infos: dict) -> None:
    """general.file_type after the type that most matrix elements have (gguf_io.main_file_type)."""
    counts: dict[str, int] = {}
    for ti in tensor_infos.values():
        if len(ti.shape) == 2:
            counts[ti.type_name] = counts.get(ti.type_name, 0) + ti.n_elements
    ftype = main_file_type(counts)
    if ftype is not None:
        metadata["general.file_type"] = ftype
        metadata_types["general.file_type"] = GGUFValueType.UINT32


def _info(name: str, fmt, shape: tuple[int, ...]) -> TensorInfo:
    n = math.prod(shape)
    return TensorInfo(name=name, type=fmt, shape=shape, ne=tuple(reversed(shape)), offset=-1,
                      nbytes=n // fmt.block_elems * fmt.block_bytes, type_name=fmt.name, type_id=fmt.type_id)


# ---- the header, for a file's identity (adapters.base_hash) --------------------------------------

def safetensors_table(path) -> tuple[bytes, list[tuple[int, int]]]:
    """The tensor table of a safetensors file (its header as canonical JSON, without
    __metadata__) and the (absolute offset, bytes) of every tensor, in name order."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        size = len(mm)
        n = int.from_bytes(mm[:8], "little") if size >= 8 else -1
        try:
            if not 0 < n <= size - 8:
                raise ValueError
            header = json.loads(bytes(mm[8:8 + n]))
            spans = [(8 + n + int(v["data_offsets"][0]), int(v["data_offsets"][1]) - int(v["data_offsets"][0]))
                     for k, v in sorted(header.items()) if k != "__metadata__"]
        except (ValueError, UnicodeDecodeError, TypeError, KeyError, IndexError, AttributeError):
            raise ValueError(f"{path} is neither a GGUF nor a safetensors file") from None
    if any(start + size_ > size or size_ < 0 for start, size_ in spans):
        raise ValueError(f"{path}: a tensor lies beyond the end of the file (truncated?)")
    table = json.dumps({k: v for k, v in header.items() if k != "__metadata__"}, sort_keys=True).encode()
    return table, spans


# ---- writing ---------------------------------------------------------------------------------------

def write_safetensors(path, specs: list[tuple[str, str, tuple[int, ...]]],
                      produce: Callable[[str], torch.Tensor], metadata: dict | None = None,
                      progress: str | None = None) -> None:
    """Write a safetensors file one tensor at a time, atomically. specs: (name, type "BF16"/"F16"/
    "F32", shape) in file order; produce(name) -> the tensor (called once per name, in order). The
    header is built from specs first, so nothing but the current tensor is held in memory.
    progress: the label of a bar over the tensors (shown when writing takes a while)."""
    header, offset = {}, 0
    for name, dt, shape in specs:
        nbytes = float_types()[dt].itemsize * math.prod(shape)
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)

    def write(f):
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for name, dt, shape in (specs if progress is None else tracked(specs, len(specs), progress, "tensor")):
            t = produce(name)
            if t.dtype != float_types()[dt] or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: produced {t.dtype} {tuple(t.shape)}, header says {dt} {shape}")
            f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))

    atomic_write(path, write)


def write_safetensors_dict(path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write {name: tensor} as a safetensors file (with the safetensors library), atomically."""
    from safetensors.torch import save

    data = save({n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


__all__ = ["HFCheckpoint", "Source", "safetensors_files", "safetensors_table", "write_safetensors", "write_safetensors_dict"]
