"""GGUF reader/writer: the real SmolLM2 file, round trips, and hostile headers."""
from __future__ import annotations

import filecmp
import struct
from collections import Counter

import gguf
import numpy as np
import pytest
import torch

import lowtune
from lowtune.gguf_io import GGUFError, GGUFFile, write_gguf


@pytest.fixture(scope="module")
def smol(smollm2_path):
    with GGUFFile(smollm2_path) as f:
        yield f


def test_smollm2_metadata(smol):
    assert smol.version == 3 and smol.alignment == 32 and smol.architecture == "llama"
    m = smol.metadata
    assert m["llama.block_count"] == 30 and m["llama.embedding_length"] == 576
    assert m["llama.attention.head_count"] == 9 and m["llama.attention.head_count_kv"] == 3
    assert m["tokenizer.ggml.model"] == "gpt2" and m["tokenizer.ggml.pre"] == "smollm"
    assert len(m["tokenizer.ggml.tokens"]) == 49152 and len(m["tokenizer.ggml.merges"]) == 48900
    assert smol.metadata_types["llama.block_count"] == gguf.GGUFValueType.UINT32
    assert smol.metadata_types["tokenizer.ggml.token_type"] == (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)


def test_smollm2_tensors(smol):
    assert len(smol.tensor_infos) == 272
    assert Counter(i.type_name for i in smol.tensor_infos.values()) == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    q = smol.tensor_infos["blk.0.attn_k.weight"]
    assert q.type is lowtune.get_format("Q4_1") and q.shape == (192, 576) and q.ne == (576, 192)
    emb = smol.tensor("token_embd.weight")
    assert isinstance(emb, lowtune.QTensor) and emb.type == "Q8_0" and emb.shape == (49152, 576)
    norm = smol.tensor("output_norm.weight")
    assert isinstance(norm, torch.Tensor) and norm.dtype == torch.float32 and norm.shape == (576,)
    assert smol.qtensor("output_norm.weight").type == "F32"


def test_agrees_with_gguf_py_reader(smol, smollm2_path):
    r = gguf.GGUFReader(smollm2_path)
    for t in r.tensors:
        info = smol.tensor_infos[t.name]
        assert info.ne == tuple(int(x) for x in t.shape) and info.offset == t.data_offset
        assert info.type_id == int(t.tensor_type) and info.nbytes == t.n_bytes
    for key, field in r.fields.items():
        if not key.startswith("GGUF."):
            assert smol.metadata[key] == field.contents(), key


def test_tensor_is_zero_copy_and_dequantizes_like_gguf_py(smol):
    name = "blk.3.ffn_down.weight"
    qt = smol.tensor(name)
    info = smol.tensor_infos[name]
    base = np.frombuffer(smol._mm, dtype=np.uint8)
    assert qt.raw.data_ptr() == base.ctypes.data + info.offset  # a view of the mapping, no copy
    ref = gguf.quants.dequantize(qt.raw.numpy(), gguf.GGMLQuantizationType.Q4_1)
    assert np.array_equal(lowtune.dequantize(qt, torch.float32).numpy(), ref.reshape(info.shape))


def test_round_trip_is_byte_identical(smol, smollm2_path, tmp_path):
    out = tmp_path / "copy.gguf"
    # a generator: tensors are consumed one at a time
    write_gguf(out, smol.metadata, ((n, smol.tensor(n)) for n in smol), smol.metadata_types)
    assert filecmp.cmp(smollm2_path, out, shallow=False)
    assert not (tmp_path / "copy.gguf.tmp").exists()


# ---- hostile and broken files ------------------------------------------------------------------
V = gguf.GGUFValueType
T = gguf.GGMLQuantizationType


def _s(b: bytes | str) -> bytes:
    b = b.encode() if isinstance(b, str) else b
    return struct.pack("<Q", len(b)) + b


def build(kvs=(), tensors=(), data=b"", version=3, magic=b"GGUF", n_tensors=None, n_kv=None, align=32):
    """GGUF bytes by hand. kvs: (key, type, value bytes); tensors: (name, ne, type id, offset)."""
    out = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                              len(kvs) if n_kv is None else n_kv)
    for key, vtype, val in kvs:
        out += _s(key) + struct.pack("<I", vtype) + val
    for name, ne, tid, off in tensors:
        out += _s(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne) + struct.pack("<IQ", tid, off)
    out += b"\0" * (-len(out) % align)
    return out + data


ARCH = ("general.architecture", V.STRING, _s("llama"))
F32_ROW = (("w", (4,), T.F32, 0),)


def load(tmp_path, blob: bytes):
    p = tmp_path / "x.gguf"
    p.write_bytes(blob)
    with GGUFFile(p) as f:
        for n in f:
            f.tensor(n)
        return f


def test_minimal_valid_file_loads(tmp_path):
    f = load(tmp_path, build([ARCH], F32_ROW, data=struct.pack("<4f", 1, 2, 3, 4)))
    assert f.metadata == {"general.architecture": "llama"} and f.tensor_infos["w"].shape == (4,)


BROKEN = [
    (b"", "truncated"),
    (b"GGUF\x03\x00", "truncated"),
    (build([ARCH], magic=b"GGML"), "bad magic|not a GGUF"),
    (build([ARCH], version=1), "unsupported GGUF version 1"),
    (build([ARCH], version=7), "unsupported GGUF version 7"),
    (build([ARCH], version=0x03000000), "big-endian"),
    (build([ARCH])[:30], "truncated|more than the file"),
    (build([ARCH], n_kv=2, align=1), "truncated|more than the file"),
    (build([ARCH], n_kv=2 ** 62), "more than the file can hold"),
    (build([ARCH], n_tensors=2 ** 40), "more than the file can hold"),
    (build([ARCH, ARCH]), "duplicate metadata key"),
    (build([("k", 13, b"")]), "unknown value type 13"),
    (build([("k", V.STRING, struct.pack("<Q", 2 ** 63))]), "truncated"),
    (build([("k" * 70000, V.UINT8, b"\0")]), "limit"),
    (build([("k", V.ARRAY, struct.pack("<IQ", V.UINT32, 2 ** 61))]), "needs at least"),
    (build([("k", V.ARRAY, struct.pack("<IQ", V.STRING, 2 ** 40))]), "needs at least"),
    (build([("k", V.ARRAY, struct.pack("<IQ", V.STRING, 3) + _s("a") + struct.pack("<Q", 2 ** 50))]), "truncated"),
    (build([("k", V.ARRAY, struct.pack("<IQ", V.ARRAY, 1) * 8 + struct.pack("<IQ", V.UINT8, 0))]), "nested"),
    (build([ARCH, ("general.alignment", V.UINT32, struct.pack("<I", 48))]), "not a power of two"),
    (build([ARCH, ("general.alignment", V.UINT32, struct.pack("<I", 0))]), "not a power of two"),
    (build([ARCH, ("general.alignment", V.UINT64, struct.pack("<Q", 32))]), "must be a uint32"),
    (build([ARCH], (("w", (4,), 99, 0),), data=bytes(16)), "unknown tensor type id 99"),
    (build([ARCH], (("w", (4,), 4, 0),), data=bytes(16)), "unknown tensor type id 4"),
    (build([ARCH], (("w", (4,), T.F32, 32),), data=bytes(16)), "beyond the end"),
    (build([ARCH], (("w", (4,), T.F32, 2 ** 63),), data=bytes(16)), "beyond the end"),
    (build([ARCH], (("w", (4,), T.F32, 8),), data=bytes(64)), "not a multiple of the alignment"),
    (build([ARCH], F32_ROW, data=bytes(8)), "beyond the end"),
    (build([ARCH], (("w", (2 ** 20, 2 ** 20), T.F32, 0),), data=bytes(16)), "beyond the end"),
    (build([ARCH], (("w", (2 ** 62, 2 ** 62), T.F32, 0),), data=bytes(16)), "overflow"),
    (build([ARCH], (("w", (2 ** 64 - 1,), T.F32, 0),), data=bytes(16)), "overflow"),
    (build([ARCH], (("w", (1, 1, 1, 1, 4), T.F32, 0),), data=bytes(16)), "5 dimensions"),
    (build([ARCH], (("w", (), T.F32, 0),), data=bytes(16)), "0 dimensions"),
    (build([ARCH], (("w", (4,), T.F32, 0), ("w", (4,), T.F32, 32)), data=bytes(64)), "duplicate tensor name"),
    (build([ARCH], (("x" * 64, (4,), T.F32, 0),), data=bytes(16)), "longer than 63 bytes"),
    (build([ARCH], (("w", (48, 2), T.Q4_K, 0),), data=bytes(1024)), "not a multiple of the Q4_K block size 256"),
    (build([ARCH], (("w", (33,), T.Q8_0, 0),), data=bytes(64)), "block size 32"),
]


@pytest.mark.parametrize("blob, message", BROKEN, ids=[f"{i}:{m}" for i, (_, m) in enumerate(BROKEN)])
def test_broken_files_raise_gguf_error(tmp_path, blob, message):
    with pytest.raises(GGUFError, match=message) as e:
        load(tmp_path, blob)
    assert "x.gguf" in str(e.value)   # the message names the file
    assert isinstance(e.value, ValueError)


def test_missing_file_is_gguf_error(tmp_path):
    with pytest.raises(GGUFError, match="cannot open"):
        GGUFFile(tmp_path / "nope.gguf")


def test_unsupported_ggml_type_loads_but_tensor_says_what_to_do(tmp_path):
    p = tmp_path / "q8k.gguf"  # Q8_K: ggml's activation type, which no weight is stored in
    p.write_bytes(build([ARCH], (("w", (256,), T.Q8_K, 0),), data=bytes(292)))
    with GGUFFile(p) as f:
        assert f.tensor_infos["w"].type is None and f.tensor_infos["w"].type_name == "Q8_K"
        with pytest.raises(GGUFError, match="requantize"):
            f.tensor("w")
    p = tmp_path / "iq.gguf"  # the I-quants are lowtune types
    p.write_bytes(build([ARCH], (("w", (256,), T.IQ4_XS, 0),), data=bytes(136)))
    with GGUFFile(p) as f:
        assert f.tensor_infos["w"].type.name == "IQ4_XS" and f.tensor("w").shape == (1, 256)


def test_tensor_views_survive_close(tmp_path):
    p = tmp_path / "v.gguf"
    p.write_bytes(build([ARCH], F32_ROW, data=struct.pack("<4f", 1, 2, 3, 4)))
    f = GGUFFile(p)
    w = f.tensor("w")
    f.close()
    assert w.tolist() == [1, 2, 3, 4]          # the mapping lives as long as the view
    w += 1                                       # copy-on-write: the file is untouched
    with GGUFFile(p) as g:
        assert g.tensor("w").tolist() == [1, 2, 3, 4]


def test_regression_inputs_never_break_the_reader(tmp_path):
    """Every input that ever broke a reader (tools/fuzz_gguf.py keeps them; so far only gguf-py's
    GGUFReader broke: IndexError/KeyError crashes, minutes-long reads, files llama.cpp refuses that it
    accepts). Ours must load each or raise GGUFError."""
    import pathlib
    folder = pathlib.Path(__file__).parent / "data" / "gguf_regressions"
    files = sorted(folder.glob("*.gguf"))
    assert files and sum(p.stat().st_size for p in files) < 1 << 20
    outcomes = set()
    for p in files:
        try:
            with GGUFFile(p) as f:
                for n in f:
                    try:
                        t = f.tensor(n)
                    except GGUFError:
                        continue
                    lowtune.dequantize(t) if isinstance(t, lowtune.QTensor) else t.sum()
            outcomes.add("loaded")
        except GGUFError:
            outcomes.add("rejected")
    assert "rejected" in outcomes


# ---- writer ----------------------------------------------------------------------------------------

def test_writer_types_layout_and_flags(tmp_path):
    w = torch.randn(64, 96)
    tensors = [("token_embd.weight", lowtune.quantize(w, "Q4_0")),
               ("blk.0.attn_q.weight", lowtune.quantize(w, "Q8_0")),
               ("blk.0.ffn_up.weight", lowtune.quantize(w, "Q4_0")),
               ("norm.weight", torch.ones(96)),
               ("half.weight", w.to(torch.bfloat16)),
               ("cube.weight", (torch.arange(24, dtype=torch.float32).reshape(2, 3, 4))),
               ("ints", torch.arange(5, dtype=torch.int32))]
    meta = {"general.architecture": "llama", "llama.block_count": 1, "llama.rope.freq_base": 10000.0,
            "some.flag": True, "some.list": [1, 2, 3], "some.names": ["a", "b"], "some.big": 2 ** 40,
            "tokenizer.ggml.token_type": [1, 3], "general.file_type": 0}
    out = tmp_path / "w.gguf"
    write_gguf(out, meta, tensors, alignment=64)
    with GGUFFile(out) as f:
        assert f.alignment == 64 and f.metadata["general.alignment"] == 64
        assert f.metadata["general.quantization_version"] == 2
        assert f.metadata["general.file_type"] == 2       # most elements are Q4_0 (F32 did not fit)
        t = f.metadata_types
        assert t["llama.block_count"] == V.UINT32 and t["llama.rope.freq_base"] == V.FLOAT32
        assert t["some.flag"] == V.BOOL and t["some.big"] == V.INT64
        assert t["some.list"] == (V.ARRAY, V.INT32) and t["some.names"] == (V.ARRAY, V.STRING)
        assert all(i.offset % 64 == 0 for i in f.tensor_infos.values())
        assert f.tensor_infos["cube.weight"].ne == (4, 3, 2)
        assert torch.equal(f.tensor("cube.weight"), tensors[5][1])
        assert torch.equal(f.tensor("half.weight"), tensors[4][1])
        assert torch.equal(f.tensor("ints"), tensors[6][1])
        assert torch.equal(f.tensor("blk.0.attn_q.weight").raw, tensors[1][1].raw)
    # gguf-py reads what we wrote
    r = gguf.GGUFReader(out)
    assert [t.name for t in r.tensors] == [n for n, _ in tensors]


def test_writer_keeps_given_types_and_exact_values(tmp_path):
    types = {"general.architecture": V.STRING, "a.u8": V.UINT8, "a.i16": V.INT16, "a.f64": V.FLOAT64,
             "a.empty": (V.ARRAY, V.FLOAT32), "a.nested": (V.ARRAY, (V.ARRAY, V.UINT16)),
             "a.bytes": V.STRING}
    meta = {"general.architecture": "llama", "a.u8": 200, "a.i16": -5, "a.f64": 0.1, "a.empty": [],
            "a.nested": [[1, 2], [3]], "a.bytes": "caf\udce9"}   # an invalid UTF-8 byte survives
    out = tmp_path / "t.gguf"
    write_gguf(out, meta, [], metadata_types=types)
    with GGUFFile(out) as f:
        assert f.metadata == meta
        assert {k: f.metadata_types[k] for k in types} == types
    with pytest.raises(GGUFError, match="does not fit"):
        write_gguf(out, {"general.architecture": "llama", "x": 300}, [], metadata_types={"x": V.UINT8})


def test_writer_refuses_bad_input_and_leaves_no_files(tmp_path):
    out = tmp_path / "bad.gguf"
    w = torch.randn(4, 64)
    arch = {"general.architecture": "llama"}
    with pytest.raises(GGUFError, match="convert"):
        write_gguf(out, arch, [("w", lowtune.quantize(w, "INT4-g64"))])
    with pytest.raises(GGUFError, match="duplicate"):
        write_gguf(out, arch, iter([("w", w), ("w", w)]))
    with pytest.raises(GGUFError, match="longer than 63"):
        write_gguf(out, arch, [("x" * 64, w)])
    with pytest.raises(GGUFError, match="general.architecture"):
        write_gguf(out, {}, [("w", w)])
    with pytest.raises(GGUFError, match="power of two"):
        write_gguf(out, arch, [("w", w)], alignment=24)

    def failing():
        yield "a", w
        raise RuntimeError("producer failed")
    with pytest.raises(RuntimeError, match="producer failed"):
        write_gguf(out, arch, failing())
    assert list(tmp_path.iterdir()) == []   # no .tmp, no spill file, no partial output


def test_writer_replaces_atomically(tmp_path):
    out = tmp_path / "m.gguf"
    write_gguf(out, {"general.architecture": "llama", "v": 1}, [("w", torch.zeros(32))])
    with GGUFFile(out) as f:
        old = f.tensor("w")
        write_gguf(out, {"general.architecture": "llama", "v": 2}, [("w", torch.ones(32))])
        assert old.sum() == 0            # the old mapping is untouched by the replacement
    with GGUFFile(out) as f:
        assert f.metadata["v"] == 2 and f.tensor("w").sum() == 32
