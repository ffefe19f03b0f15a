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
    assert np.array_equal(qt.dequantize(torch.float32).numpy(), ref.reshape(info.shape))


def test_round_trip_is_byte_identical(smol, smollm2_path, tmp_path):
    out = tmp_path / "copy.gguf"
    # a generator: tensors are consumed one at a time
    write_gguf(out, smol.metadata, ((n, smol.tensor(n)) for n in smol), smol.metadata_types)
    assert filecmp.cmp(smollm2_path, out, shallow=False)
    assert not (tmp_path / "copy.gguf.tmp").exists()
