"""Split GGUFs (lowtune.gguf_split, llama.cpp's gguf-split convention): written in parts, opened from
the first part as one model, every part checked; a split model loads, trains, evaluates and exports
as the single file does. On SmolLM2: lowtune's split export evaluates identically to the single
file in lowtune and in llama.cpp, which loads the parts from the first one.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf.constants import GGUFValueType

from lowtune import cli
from lowtune.adapters import base_hash
from lowtune.export import export_merged_gguf
from lowtune.gguf_io import GGUFError, GGUFFile
from lowtune.gguf_split import SPLIT_KEYS, SplitGGUF, gguf_parts, open_gguf, part_path, write_gguf_split
from lowtune.loading import describe, load_model

from helpers import rand_ids, write_tiny_llama_gguf
from test_export import make_adapter, make_tiny_gguf


def split_copy(src, out, **limits) -> list[Path]:
    """The model at `src` written again as split parts (tensor by tensor, through open_gguf)."""
    with open_gguf(src) as f:
        gen = ((n, (f.tensor(n), ti.shape)) for n, ti in f.tensor_infos.items())
        return write_gguf_split(out, f.metadata, gen, f.metadata_types, f.alignment, **limits)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("split")
    single = write_tiny_llama_gguf(d / "tiny.gguf", "Q4_0")
    return single, split_copy(single, d / "tiny.gguf", max_tensors=7)


def test_parts_follow_the_convention_and_hold_the_model(tiny):
    single, parts = tiny
    assert [p.name for p in parts] == [f"tiny-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    with GGUFFile(single) as f:
        n = len(f.tensor_infos)
        order = list(f.tensor_infos)
        md, types = f.metadata, f.metadata_types
    seen = []
    for i, p in enumerate(parts):
        with GGUFFile(p) as g:
            # the keys and types llama.cpp's loader reads (u16, u16, i32), in every part
            assert [g.metadata[k] for k in SPLIT_KEYS] == [i, 3, n]
            assert [g.metadata_types[k] for k in SPLIT_KEYS] == [GGUFValueType.UINT16, GGUFValueType.UINT16,
                                                                   GGUFValueType.INT32]
            if i == 0:  # all metadata in the first part, with its types
                assert all(g.metadata[k] == v and g.metadata_types[k] == types[k] for k, v in md.items())
            else:
                assert set(g.metadata) == {"general.architecture", *SPLIT_KEYS}
            assert 1 <= len(g.tensor_infos) <= 7
            seen += list(g.tensor_infos)
    assert seen == order


def test_opened_from_the_first_part_as_one_model(tiny):
    single, parts = tiny
    with open_gguf(single) as f, open_gguf(parts[0]) as s:
        assert isinstance(s, SplitGGUF) and isinstance(f, GGUFFile)
        assert s.metadata == f.metadata and s.metadata_types == f.metadata_types  # no split keys
        assert list(s.tensor_infos) == list(f.tensor_infos) and len(s) == len(f)
        for name, ti in f.tensor_infos.items():
            assert s.tensor_infos[name].shape == ti.shape and s.tensor_infos[name].type == ti.type
            assert torch.equal(s.raw(name), f.raw(name)), name
        assert s.part("output_norm.weight").path == str(parts[2])
    assert gguf_parts(parts[0]) == parts and gguf_parts(single) == [single]
    info = describe(parts[0])
    assert info["parts"] == 3 and info["file_bytes"] == sum(p.stat().st_size for p in parts)
    assert info["tensor_types"] == describe(single)["tensor_types"]


def test_split_model_loads_and_computes_as_the_single_file(tiny):
    single, parts = tiny
    ids = rand_ids(2, 12, vocab=200)
    with torch.no_grad():
        assert torch.equal(load_model(parts[0])(ids), load_model(single)(ids))


def test_size_limit_packs_parts_as_gguf_split(tmp_path, tiny):
    single, _ = tiny
    with GGUFFile(single) as f:
        sizes = [-(-ti.nbytes // f.alignment) * f.alignment for ti in f.tensor_infos.values()]
    limit = 3 * max(sizes) // 2
    parts = split_copy(single, tmp_path / "m.gguf", max_bytes=limit)
    # gguf-split's rule: a new part where the next tensor would take this one past the limit
    expected, cur = [], None
    for s in sizes:
        if cur is None or (cur and sum(cur) + s > limit):
            cur = []
            expected.append(cur)
        cur.append(s)
    assert len(parts) == len(expected) > 1
    for p, want in zip(parts, expected):
        with GGUFFile(p) as g:
            assert len(g.tensor_infos) == len(want)
    # a tensor larger than the limit gets a part of its own
    tiny_parts = split_copy(single, tmp_path / "one.gguf", max_bytes=1)
    assert len(tiny_parts) == len(sizes)
    # one part only: still the convention's name and keys, and llama.cpp's n_split = 1 reads as one file
    whole = split_copy(single, tmp_path / "whole.gguf", max_tensors=1000)
    assert [p.name for p in whole] == ["whole-00001-of-00001.gguf"]
    with open_gguf(whole[0]) as s:
        assert "split.count" not in s.metadata and len(s) == len(sizes)


def test_every_part_is_checked(tmp_path, tiny):
    _, parts = tiny
    d = tmp_path / "bad"
    d.mkdir()
    for p in parts:
        shutil.copy(p, d / p.name)
    first, second, third = (d / p.name for p in parts)
    with pytest.raises(GGUFError, match=r"tiny-00002-of-00003\.gguf is part 2 of 3.*open tiny-00001-of-00003\.gguf"):
        open_gguf(second)
    # parts in the wrong order: split.no disagrees with the name
    second.rename(d / "x")
    third.rename(second)
    (d / "x").rename(third)
    with pytest.raises(GGUFError, match=r"tiny-00002-of-00003\.gguf: split\.no says it is part 3"):
        open_gguf(first)
    # a missing part is named, with what is there
    second.unlink()
    with pytest.raises(GGUFError, match=r"part 2, .*tiny-00002-of-00003\.gguf, is missing \(found: "
                                        r"tiny-00001-of-00003\.gguf, tiny-00003-of-00003\.gguf\)"):
        open_gguf(first)
    # a part of another split of the same name (another model: other tensors and count)
    other = write_tiny_llama_gguf(tmp_path / "other.gguf", "Q4_0", layers=3)
    (tmp_path / "o").mkdir()
    shutil.copy(split_copy(other, tmp_path / "o" / "tiny.gguf", max_tensors=11)[1], second)
    with pytest.raises(GGUFError, match=r"tiny-00002-of-00003\.gguf: split.tensors.count is 29, but .* says 20"):
        open_gguf(first)
    # a first part renamed: the others cannot be found
    shutil.copy(parts[0], d / "renamed.gguf")
    with pytest.raises(GGUFError, match=r"renamed\.gguf is the first of 3 parts.*<name>-00001-of-00003\.gguf"):
        open_gguf(d / "renamed.gguf")
    # the same tensor in two parts: x = [a | b], y = [b | a], x's second part replaced by y's
    with GGUFFile(parts[0]) as f:
        md = {k: v for k, v in f.metadata.items() if k not in SPLIT_KEYS}
    a, b = torch.ones(4), torch.zeros(4)
    x = write_gguf_split(tmp_path / "x.gguf", md, [("a", a), ("b", b)], max_tensors=1)
    y = write_gguf_split(tmp_path / "y.gguf", md, [("b", b), ("a", a)], max_tensors=1)
    shutil.copy(y[1], x[1])
    with pytest.raises(GGUFError, match=r"x-00002-of-00002\.gguf: tensor 'a' is also in .*x-00001-of-00002\.gguf"):
        open_gguf(x[0])


def test_writer_refusals(tmp_path, tiny):
    single, _ = tiny
    with GGUFFile(single) as f:
        md, t = dict(f.metadata), f.tensor("output_norm.weight")
    with pytest.raises(ValueError, match="max_bytes or max_tensors"):
        write_gguf_split(tmp_path / "a.gguf", md, [("a", t)])
    with pytest.raises(GGUFError, match="already holds split.count"):
        write_gguf_split(tmp_path / "a.gguf", {**md, "split.count": 2}, [("a", t)], max_tensors=1)
    with pytest.raises(GGUFError, match="no tensors"):
        write_gguf_split(tmp_path / "a.gguf", md, [], max_tensors=1)
    with pytest.raises(GGUFError, match="duplicate tensor name"):
        write_gguf_split(tmp_path / "a.gguf", md, [("a", t), ("a", t)], max_tensors=1)
    assert not list(tmp_path.iterdir()), "nothing is left behind by a failed write"


def test_split_export_of_an_adapter_trained_on_a_split_base(tmp_path, capsys):
    # A base given as split parts: the adapter records the hash of all parts, export checks it,
    # merges tensor by tensor and writes split again; the result equals the single-file route.
    single = make_tiny_gguf(tmp_path / "base.gguf", "Q4_1", dim=128, ffn=256)
    (tmp_path / "split").mkdir()
    parts = split_copy(single, tmp_path / "split" / "base.gguf", max_tensors=6)
    assert base_hash(parts[0]) == base_hash(parts[0]) != base_hash(single)
    with pytest.raises(GGUFError, match="opened from its first part"):
        base_hash(parts[1])
    make_adapter(parts[0], tmp_path / "ad", "lora", rel=0.05)
    assert cli.main(["export", str(parts[0]), "--adapter", str(tmp_path / "ad"), "-o", str(tmp_path / "m.gguf"),
                     "--split-max-size", "40K"]) == 0
    out = capsys.readouterr().out
    merged = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert len(merged) > 1 and f"{len(merged)} parts" in out
    one = tmp_path / "one.gguf"
    export_merged_gguf(parts[0], tmp_path / "ad", one)
    with open_gguf(merged[0]) as s, GGUFFile(one) as f:
        assert s.metadata == f.metadata and list(s.tensor_infos) == list(f.tensor_infos)
        assert all(torch.equal(s.raw(n), f.raw(n)) for n in f.tensor_infos)
    for ti_part in merged:
        with GGUFFile(ti_part) as g:
            data = sum(-(-ti.nbytes // g.alignment) * g.alignment for ti in g.tensor_infos.values())
            assert data <= 40 * 1024 or len(g.tensor_infos) == 1
    assert cli.main(["export", str(single), "--peft", str(tmp_path / "p"), "--split-max-size", "1G",
                     "--adapter", str(tmp_path / "ad"), "--force"]) == 1
    assert "split the merged GGUF" in capsys.readouterr().err


# ---- SmolLM2: lowtune and llama.cpp on lowtune's split export --------------------------------------

@pytest.fixture(scope="module")
def smol_split(smollm2_path, tmp_path_factory):
    """SmolLM2 exported (no adapter: every tensor copied) as parts of at most 40 MB."""
    out = tmp_path_factory.mktemp("smol_split") / "smol.gguf"
    rep = export_merged_gguf(smollm2_path, None, out, split_max_bytes=40_000_000)
    return sorted(out.parent.glob("smol-*-of-*.gguf")), rep


@pytest.fixture(scope="module")
def smol_tokens(smollm2_path, botchan_text):
    from lowtune.tokenizer import load_tokenizer
    with GGUFFile(smollm2_path) as f:
        tok = load_tokenizer(f.metadata)
    return tok.encode(botchan_text[4000:6000], add_bos=False)[:128]


def test_smollm2_split_evaluates_identically(smollm2_path, smol_split, smol_tokens):
    from lowtune.evaluate import perplexity
    parts, rep = smol_split
    assert len(parts) >= 3 and rep.path == str(parts[0])
    ppl = [perplexity(load_model(p), smol_tokens, ctx=128)["perplexity"] for p in (smollm2_path, parts[0])]
    assert ppl[0] == ppl[1]


@pytest.mark.llamacpp
def test_llamacpp_loads_the_split_export_from_its_first_part(smollm2_path, smol_split, smol_tokens):
    from llama_cpp import Llama
    parts, _ = smol_split
    logits = []
    for path in (smollm2_path, parts[0]):
        llm = Llama(model_path=str(path), n_ctx=128, n_batch=128, n_threads=2, logits_all=True, verbose=False)
        llm.eval(smol_tokens)
        logits.append(np.array(llm.scores[:len(smol_tokens)], dtype=np.float32))
        llm.close()
    assert np.array_equal(logits[0], logits[1])


@pytest.mark.llamacpp
def test_lowtune_reads_the_parts_llamacpp_writes(smol_split, tmp_path):
    # llama.cpp's own split writer (llama-quantize --keep-split, tensors copied) over lowtune's parts:
    # lowtune opens its parts as the same model
    import ggml_ref
    parts, _ = smol_split
    ggml_ref.rewrite_split(parts[0], tmp_path / "lc")
    theirs = sorted(tmp_path.glob("lc-*-of-*.gguf"))
    assert [p.name for p in theirs] == [p.name.replace("smol", "lc") for p in parts]
    with open_gguf(theirs[0]) as t, open_gguf(parts[0]) as o:
        assert t.metadata == o.metadata and list(t.tensor_infos) == list(o.tensor_infos)
        assert [len(p.tensor_infos) for p in t.parts] == [len(p.tensor_infos) for p in o.parts]
        assert all(torch.equal(t.raw(n), o.raw(n)) for n in o.tensor_infos)
