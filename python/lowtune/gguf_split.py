"""Split GGUF files: one model in several files, as llama.cpp's gguf-split writes and loads them.

    model-00001-of-00003.gguf   every metadata KV, and the first share of the tensors
    model-00002-of-00003.gguf   more tensors; of the metadata only the split keys
    model-00003-of-00003.gguf
    every part: split.no (u16, 0-based), split.count (u16), split.tensors.count (i32, all parts)

    with open_gguf("model-00001-of-00003.gguf") as f:  # SplitGGUF: one model over the parts
        f.metadata, f.tensor_infos, f.qtensor(name)    # as GGUFFile; each tensor from its part
    open_gguf("model.gguf")                            # a single file: gguf_io.GGUFFile
    write_gguf_split("merged.gguf", md, tensors, max_bytes=2 << 30)   # merged-0000i-of-0000N.gguf

A split model is opened from its first part: the names of the others follow from its name and
split.count. Every part is checked before any tensor is read: it exists, says it is part i of the
same count, holds as many tensors as the first part promises in total, and no tensor twice. The
model's metadata is the first part's without the split keys, so a split model written back as one
file is an ordinary GGUF. Parts are memory-mapped like single files, so a model is read tensor by
tensor, whichever part holds the tensor.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Iterator

from gguf.constants import GGUFValueType

from .gguf_io import (DEFAULT_ALIGNMENT, GGUFError, GGUFFile, TensorInfo, TensorTable, check_write_args,
                      header_kv, write_file)
from .paths import failed_write
from .qtensor import QTensor

SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"
SPLIT_KEYS = (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS)
MAX_PARTS = 65535  # split.count is a u16
_PART_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def part_path(stem, no: int, count: int) -> Path:
    """The file name of part `no` (0-based) of `count` (llama_split_path): <stem>-0000i-of-0000N.gguf."""
    return Path(f"{os.fspath(stem)}-{no + 1:05d}-of-{count:05d}.gguf")


def split_stem(path) -> Path | None:
    """'dir/model' for 'dir/model-00001-of-00003.gguf'; None for a name outside the convention."""
    p = Path(path)
    m = _PART_NAME.match(p.name)
    return p.with_name(m.group("stem")) if m else None


def open_gguf(path) -> GGUFFile | "SplitGGUF":
    """A GGUF file, or the whole of a split model from its first part (SplitGGUF)."""
    first = GGUFFile(path)
    if SPLIT_COUNT not in first.metadata and SPLIT_NO not in first.metadata:
        return first
    try:
        return SplitGGUF(first)
    except BaseException:
        first.close()
        raise


def gguf_parts(path) -> list[Path]:
    """The files a GGUF model is made of: [path], or every part of a split model (checked)."""
    with open_gguf(path) as f:
        return [Path(p.path) for p in f.parts] if isinstance(f, SplitGGUF) else [Path(path)]


def _split_int(f: GGUFFile, key: str, lo: int, hi: int) -> int:
    v = f.metadata.get(key)
    if v is None:
        raise GGUFError(f"{f.path}: a part of a split GGUF lacks {key}")
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise GGUFError(f"{f.path}: {key} is {v!r}; a split GGUF needs an integer in {lo}..{hi}")
    return v


class SplitGGUF:
    """The parts of a split model as one GGUF-like source (module doc). Shaped like GGUFFile:
    path (the first part), metadata and metadata_types (the first part's, split keys removed),
    tensor_infos in part order (offsets within the tensor's own part), alignment, version,
    qtensor(name), tensor(name), raw(name), close(); parts: the GGUFFile of every part."""

    def __init__(self, first: GGUFFile):
        self.path = first.path
        count = _split_int(first, SPLIT_COUNT, 1, MAX_PARTS)
        no = _split_int(first, SPLIT_NO, 0, MAX_PARTS - 1)
        total = _split_int(first, SPLIT_TENSORS, 0, 2 ** 31 - 1)
        stem = split_stem(first.path)
        if no != 0:
            named = f"; open {part_path(stem, 0, count).name}" if stem is not None else ""
            raise GGUFError(f"{first.path} is part {no + 1} of {count} of a split GGUF; a split model is "
                            f"opened from its first part{named}")
        if count > 1 and (stem is None or Path(first.path).name != part_path(stem, 0, count).name):
            raise GGUFError(f"{first.path} is the first of {count} parts of a split GGUF, but its name does "
                            f"not say where the others are: the parts must be named "
                            f"<name>-00001-of-{count:05d}.gguf, <name>-00002-of-{count:05d}.gguf, ...")
        self.parts: list[GGUFFile] = [first]
        try:
            for i in range(1, count):
                self.parts.append(self._open_part(part_path(stem, i, count), i, count, total, first))
            self._index(total)
        except BaseException:
            for p in self.parts[1:]:
                p.close()
            raise
        self.metadata = {k: v for k, v in first.metadata.items() if k not in SPLIT_KEYS}
        self.metadata_types = {k: v for k, v in first.metadata_types.items() if k not in SPLIT_KEYS}
        self.alignment, self.version = first.alignment, first.version
        self.size = sum(p.size for p in self.parts)

    @staticmethod
    def _open_part(path: Path, i: int, count: int, total: int, first: GGUFFile) -> GGUFFile:
        if not path.is_file():
            present = sorted(q.name for q in path.parent.glob(f"{split_stem(path).name}-*-of-*.gguf"))
            raise GGUFError(f"{first.path} is part 1 of {count} of a split GGUF, but part {i + 1}, {path}, "
                            f"is missing (found: {', '.join(present) or 'no other part'}); put every part "
                            f"in the same directory under its own name")
        part = GGUFFile(path)
        try:
            if _split_int(part, SPLIT_COUNT, 1, MAX_PARTS) != count:
                raise GGUFError(f"{path}: split.count is {part.metadata[SPLIT_COUNT]}, but {first.path} says "
                                f"{count}: the parts belong to different splits")
            if _split_int(part, SPLIT_NO, 0, MAX_PARTS - 1) != i:
                raise GGUFError(f"{path}: split.no says it is part {part.metadata[SPLIT_NO] + 1}, but its "
                                f"name makes it part {i + 1}; rename the parts back to the names they were "
                                f"written with")
            if _split_int(part, SPLIT_TENSORS, 0, 2 ** 31 - 1) != total:
                raise GGUFError(f"{path}: split.tensors.count is {part.metadata[SPLIT_TENSORS]}, but "
                                f"{first.path} says {total}: the parts belong to different models")
            for key in ("general.architecture", "general.name"):
                if key in part.metadata and part.metadata[key] != first.metadata.get(key):
                    raise GGUFError(f"{path}: {key} is {part.metadata[key]!r}, but {first.path} has "
                                    f"{first.metadata.get(key)!r}: the parts belong to different models")
        except BaseException:
            part.close()
            raise
        return part

    def _index(self, total: int) -> None:
        self.tensor_infos: dict[str, TensorInfo] = {}
        self._part_of: dict[str, GGUFFile] = {}
        for part in self.parts:
            for name, ti in part.tensor_infos.items():
                if name in self.tensor_infos:
                    raise GGUFError(f"{part.path}: tensor {name!r} is also in {self._part_of[name].path}; "
                                    f"the parts belong to different splits")
                self.tensor_infos[name] = ti
                self._part_of[name] = part
        if len(self.tensor_infos) != total:
            raise GGUFError(f"{self.path}: the {len(self.parts)} parts hold {len(self.tensor_infos)} tensors, "
                            f"but split.tensors.count says {total}; a part is truncated or from another split")

    # ---- access, as GGUFFile -----------------------------------------------------------------
    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def part(self, name: str) -> GGUFFile:
        """The part that holds tensor `name`."""
        try:
            return self._part_of[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def raw(self, name: str):
        return self.part(name).raw(name)

    def tensor(self, name: str):
        return self.part(name).tensor(name)

    def qtensor(self, name: str) -> QTensor:
        return self.part(name).qtensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensor_infos)

    def __len__(self) -> int:
        return len(self.tensor_infos)

    def close(self) -> None:
        for p in self.parts:
            p.close()

    def __enter__(self) -> "SplitGGUF":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"SplitGGUF({self.path!r}, {len(self.parts)} parts, {self.architecture}, "
                f"{len(self.tensor_infos)} tensors)")


# ---- writing -----------------------------------------------------------------------------------

def write_gguf_split(path, metadata: dict, tensors: Iterable, metadata_types: dict | None = None,
                     alignment: int = DEFAULT_ALIGNMENT, *, max_bytes: int | None = None,
                     max_tensors: int | None = None) -> list[Path]:
    """Write a model as split GGUF parts, as gguf-split does: `path` "out.gguf" (or
    "out-00001-of-00002.gguf") gives out-00001-of-0000N.gguf, ... A new part starts where the next tensor's data (padded to the
    alignment) would take the part past max_bytes, or where the part already holds max_tensors
    tensors; a part holds at least one tensor, so a tensor larger than max_bytes has a part of its
    own. The first part holds all metadata (general.file_type and quantization_version over every
    part, as write_gguf sets them), the others only the split keys (and general.alignment where it
    is not the default). Tensors are consumed one at a time into side files (peak memory about
    one tensor); the parts are written under temporary names and renamed once all are complete.
    Returns the paths of the parts."""
    path = os.fspath(path)
    if max_bytes is None and max_tensors is None:
        raise ValueError("a split needs max_bytes or max_tensors")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"the largest part must be at least 1 byte, got {max_bytes}")
    if max_tensors is not None and max_tensors < 1:
        raise ValueError(f"a part holds at least one tensor, got max_tensors={max_tensors}")
    arch = check_write_args(path, metadata, alignment)
    for key in SPLIT_KEYS:
        if key in metadata:
            raise GGUFError(f"{path}: metadata already holds {key}; pass the model's metadata without "
                            f"the split keys (SplitGGUF.metadata has none)")
    named = split_stem(path)  # "out-00001-of-00002.gguf" names the stem "out" too
    stem = os.fspath(named) if named is not None else path[:-5] if path.endswith(".gguf") else path
    table = TensorTable(path)
    parts: list[dict] = []   # {"spill": side file, "infos": slice of table.infos, "bytes": data size}
    done: list[tuple[str, Path]] = []
    try:
        fh = None
        for name, value in tensors:
            data = table.take(name, value)
            size = -(-data.nbytes // alignment) * alignment
            part = parts[-1] if parts else None
            if part is None or part["n"] == max_tensors or \
                    (max_bytes is not None and part["n"] and part["bytes"] + size > max_bytes):
                if len(parts) == MAX_PARTS:
                    raise GGUFError(f"{path}: more than {MAX_PARTS} parts; raise the part size")
                if fh is not None:
                    fh.close()
                part = {"spill": f"{stem}.part{len(parts)}.tmp.data", "start": len(table.infos) - 1,
                        "n": 0, "bytes": 0}
                parts.append(part)
                fh = open(part["spill"], "wb")
            table.spill(fh, data, alignment)
            part["n"] += 1
            part["bytes"] += size
            del data
        if fh is not None:
            fh.close()
        if not parts:
            raise GGUFError(f"{path}: no tensors to write; a split model needs at least one")
        count = len(parts)
        split_types = {SPLIT_NO: GGUFValueType.UINT16, SPLIT_COUNT: GGUFValueType.UINT16,
                       SPLIT_TENSORS: GGUFValueType.INT32}
        model_kv = header_kv(metadata, metadata_types, table.infos, alignment)
        for i, part in enumerate(parts):
            split = {SPLIT_NO: i, SPLIT_COUNT: count, SPLIT_TENSORS: len(table.infos)}
            kv = dict(model_kv) if i == 0 else \
                {k: model_kv[k] for k in ("general.alignment",) if alignment != DEFAULT_ALIGNMENT}
            kv.update({k: (v, split_types[k]) for k, v in split.items()})
            out = part_path(stem, i, count)
            tmp = os.fspath(out) + ".tmp"
            done.append((tmp, out))
            write_file(tmp, arch, kv, table.infos[part["start"]:part["start"] + part["n"]], alignment,
                       spill=part["spill"])
            os.remove(part["spill"])
        for tmp, out in done:
            os.replace(tmp, out)
        return [out for _, out in done]
    except BaseException as e:
        raise failed_write(e, path, [tmp for tmp, _ in done])
    finally:
        if fh is not None and not fh.closed:
            fh.close()
        for part in parts:
            if os.path.exists(part["spill"]):
                os.remove(part["spill"])


__all__ = ["MAX_PARTS", "SPLIT_COUNT", "SPLIT_KEYS", "SPLIT_NO", "SPLIT_TENSORS", "SplitGGUF", "gguf_parts",
           "open_gguf", "part_path", "split_stem", "write_gguf_split"]
