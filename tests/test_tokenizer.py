"""Tokenizers from GGUF metadata: byte-level BPE (SmolLM2) and SentencePiece (Mistral v1) against
llama.cpp and sentencepiece on the whole Botchan text."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lowtune.gguf_io import GGUFFile, write_gguf
from lowtune.tokenizer import (load_tokenizer, load_tokenizer_dir, render_chat_template,
                               sentencepiece_model_proto, spm_metadata, tokenizer_metadata_from_dir)

MISTRAL_COMMON = "mistral-common==1.13.1"
MISTRAL_MODEL = "mistral_common/data/tokenizer.model.v1"


@pytest.fixture(scope="module")
def smol_meta(smollm2_path):
    with GGUFFile(smollm2_path) as f:
        return f.metadata


@pytest.fixture(scope="module")
def smol_tok(smol_meta):
    return load_tokenizer(smol_meta)


@pytest.fixture(scope="session")
def mistral_model_path(tmp_path_factory) -> Path:
    """Mistral-7B v0.1's tokenizer.model, from the mistral-common wheel on PyPI (cached)."""
    env = os.environ.get("LOWTUNE_MISTRAL_TOKENIZER")
    if env:
        return Path(env)
    cache = Path(os.environ.get("LOWTUNE_TEST_CACHE", Path.home() / ".cache" / "lowtune-tests"))
    target = cache / "tokenizer.model.v1"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache),
                            MISTRAL_COMMON], capture_output=True, text=True, timeout=300)
        wheels = glob.glob(str(cache / "mistral_common-1.13.1-*.whl"))
        if r.returncode != 0 or not wheels:
            pytest.fail(f"could not download {MISTRAL_COMMON} for its tokenizer.model "
                        f"(set LOWTUNE_MISTRAL_TOKENIZER to a local copy): {r.stderr[-500:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(z.read(MISTRAL_MODEL))
            tmp.replace(target)
    return target


def spm_reference_metadata(sp) -> dict:
    """GGUF 'llama' tokenizer metadata built with sentencepiece's own API (independent of our parser)."""
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else
             5 if sp.is_unused(i) else 1 for i in range(n)]
    return {"tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
            "tokenizer.ggml.unknown_token_id": sp.unk_id()}


@pytest.fixture(scope="module")
def mistral(mistral_model_path):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(mistral_model_path))
    meta = spm_reference_metadata(sp)
    return sp, meta, load_tokenizer(meta)


# ---- byte-level BPE (SmolLM2) --------------------------------------------------------------------

def test_smollm2_special_ids(smol_tok):
    assert smol_tok.model == "gpt2" and smol_tok.vocab_size == 49152
    assert (smol_tok.bos_id, smol_tok.eos_id, smol_tok.eot_id) == (1, 2, 2)
    assert smol_tok.add_bos is False
    assert smol_tok.tokens[2] == "<|im_end|>" and 0 in smol_tok.eog_ids
    assert smol_tok.encode("x", add_bos=True)[0] == 1


def test_smollm2_round_trip_and_known_ids(smol_tok, botchan_text):
    ids = smol_tok.encode("Hello world, 1234!")
    # digits are split one by one by the "smollm" pre-tokenizer
    assert [smol_tok.tokens[i] for i in ids] == ["Hello", "Ġworld", ",", "Ġ", "1", "2", "3", "4", "!"]
    assert smol_tok.decode(smol_tok.encode(botchan_text)) == botchan_text
    s = "naïve café 中文 🙂  two  spaces\n\n\ttab"
    assert smol_tok.decode(smol_tok.encode(s)) == s


def test_special_tokens_in_text(smol_tok):
    text = "<|im_start|>user\nHi<|im_end|>"
    ids = smol_tok.encode(text)
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 1
    plain = smol_tok.encode(text, special=False)
    assert 1 not in plain and 2 not in plain
    assert smol_tok.decode(plain) == text
    assert smol_tok.decode(ids, skip_special=True) == "user\nHi"


def test_chat_template(smol_tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    s = smol_tok.apply_chat_template(msgs)
    assert s == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert not smol_tok.apply_chat_template(msgs, add_generation_prompt=False).endswith("assistant\n")


def test_chat_template_is_sandboxed():
    with pytest.raises(ValueError, match="chat template"):
        render_chat_template("{{ messages.__class__.__mro__[1].__subclasses__() }}", [])
    with pytest.raises(ValueError, match="nope"):
        render_chat_template("{{ raise_exception('nope') }}", [])
    assert render_chat_template("{{ messages | tojson }}", [{"a": "é"}]) == '[{"a": "é"}]'


@pytest.mark.llamacpp
def test_smollm2_botchan_equals_llama_cpp(smollm2_path, smol_tok, botchan_text):
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(smollm2_path), vocab_only=True, verbose=False)
    ref = llm.tokenize(botchan_text.encode(), add_bos=False, special=False)
    ours = smol_tok.encode(botchan_text, special=False)
    assert len(ours) == len(ref)
    assert ours == ref
    chat = smol_tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert smol_tok.encode(chat) == llm.tokenize(chat.encode(), add_bos=False, special=True)


# ---- SentencePiece (Mistral v1) ------------------------------------------------------------------

def test_spm_botchan_equals_sentencepiece(mistral, botchan_text):
    sp, _, tok = mistral
    assert tok.model == "llama" and tok.vocab_size == 32000 and tok.add_bos
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    ids = tok.encode(botchan_text, add_bos=False)
    assert ids == sp.encode(botchan_text)
    assert tok.decode(ids) == botchan_text
    for s in ["Hello world", " leading", "  two", "a\nb", "é中文🙂", "\x00\x01"]:
        assert tok.encode(s, add_bos=False) == sp.encode(s), s
        assert tok.decode(tok.encode(s), skip_special=True) == s
    assert tok.decode(tok.encode("Hi")) == "<s>Hi"


def test_spm_special_tokens_follow_llama_cpp(mistral):
    _, _, tok = mistral
    # a text piece after a special token gets its own leading space (llama.cpp's SPM rule)
    assert tok.encode("<s>Hi") == [1, 1] + tok.encode("Hi", add_bos=False)
    assert tok.encode("<s>Hi", add_bos=False, special=False)[0] != 1
    assert tok.decode(tok.encode("a</s>b", add_bos=False)) == "a</s>b"


def test_spm_metadata_parser_matches_sentencepiece(mistral, mistral_model_path):
    _, ref, _ = mistral
    ours = spm_metadata(mistral_model_path.read_bytes())
    for key, val in ref.items():
        assert ours[key] == val, key
    assert ours["tokenizer.ggml.add_space_prefix"] is True


def test_sentencepiece_model_proto_round_trips(mistral):
    import sentencepiece as spm
    sp, meta, _ = mistral
    proto = sentencepiece_model_proto(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"],
                                      meta["tokenizer.ggml.token_type"], add_dummy_prefix=True)
    sp2 = spm.SentencePieceProcessor(model_file=None, model_proto=proto)
    s = "The quick brown fox, 12 jumps; naïve"
    assert sp2.encode(s) == sp.encode(s)
    assert spm_metadata(proto)["tokenizer.ggml.tokens"] == meta["tokenizer.ggml.tokens"]


@pytest.mark.llamacpp
def test_spm_botchan_equals_llama_cpp(mistral, botchan_text, tmp_path):
    import llama_cpp
    _, meta, tok = mistral
    md = {"general.architecture": "llama", "llama.block_count": 1, "llama.context_length": 128,
          "llama.embedding_length": 64, "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
          "llama.rope.dimension_count": 16, "llama.attention.layer_norm_rms_epsilon": 1e-5, **meta}
    write_gguf(tmp_path / "vocab.gguf", md, [])      # a vocabulary-only GGUF from our writer
    llm = llama_cpp.Llama(model_path=str(tmp_path / "vocab.gguf"), vocab_only=True, verbose=False)
    assert tok.encode(botchan_text, add_bos=False) == llm.tokenize(botchan_text.encode(), add_bos=False,
                                                                   special=False)


# ---- HF directories ------------------------------------------------------------------------------

def test_load_tokenizer_dir_spm(mistral, mistral_model_path, tmp_path, botchan_text):
    sp, _, _ = mistral
    (tmp_path / "tokenizer.model").write_bytes(mistral_model_path.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
         "chat_template": "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"}))
    tok = load_tokenizer_dir(tmp_path)
    assert tok.encode(botchan_text[:5000]) == [1] + sp.encode(botchan_text[:5000])
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"


def test_load_tokenizer_dir_byte_level_bpe(smol_tok, smol_meta, tmp_path, botchan_text):
    """A tokenizer.json written from the GGUF's vocabulary, as HF would ship it, gives the same ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    tokens = smol_meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in smol_meta["tokenizer.ggml.merges"]]
    hf = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([tokens[i] for i in range(17)])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
         "chat_template": smol_meta["tokenizer.chat_template"]}))
    tok = load_tokenizer_dir(tmp_path)
    assert tok.model == "gpt2" and tok.pre == "smollm"
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
    assert tok.encode(botchan_text) == smol_tok.encode(botchan_text)


def test_unknown_tokenizer_models_are_refused():
    with pytest.raises(ValueError, match="not supported"):
        load_tokenizer({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ValueError, match="pre-tokenizer"):
        load_tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"],
                        "tokenizer.ggml.merges": [], "tokenizer.ggml.pre": "martian"})
    # llama.cpp's pre-tokenizers that lowtune leaves out say why
    for pre, why in (("whitespace", "raw UTF-8 without escaped spaces"), ("kimi-k2", "by hand")):
        with pytest.raises(ValueError, match=why):
            load_tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"],
                            "tokenizer.ggml.merges": [], "tokenizer.ggml.pre": pre})
    with pytest.raises(ValueError, match="no tokenizer"):
        load_tokenizer({"general.architecture": "llama"})


def _distinct_pre_tokenizers() -> list[str]:
    """One name for each distinct (regexes, ignore_merges) of lowtune's pre-tokenizer table."""
    from lowtune.tokenizer import _PRE
    seen, names = set(), []
    for name, (regexes, ignore_merges, _) in _PRE.items():
        if (tuple(regexes), ignore_merges) not in seen:
            seen.add((tuple(regexes), ignore_merges))
            names.append(name)
    return names


# what the pre-tokenizers split differently: digit runs, cases, contractions, CJK and kana, Hangul,
# fullwidth and CJK punctuation, combining marks, runs of spaces and newlines, trailing spaces
_PRE_CASES = ["HelloWorld CamelCase ABCdef 1234567 12 they'RE don'T I'll", "a/b/c\n\n  x//y\r\n",
              "ÉCOLE école Ünïcödé naïve e\u0301te\u0301", "深度求索 日本語のテキスト カタカナ 한국어 문장",
              "全角！＂（テスト）：；「引用」…“quote”——end。", "price: $1,234.56 (12%) #tag @user 3.14159",
              "tabs\tand    many        spaces   \n\n\n", "trailing spaces   ", "x" * 3 + " " * 40 + "y",
              "ΑΒΓ αβγ Ωmega Привет мир Ꭰ ᏸ ﬁ", "wow!!\n\n\nnext .\n\n(ok)\r\n\r\n a//\n\nb"]


def _relabelled(llamacpp_source, tmp_path, pre: str):
    """Llama 3's byte-level vocabulary (llama.cpp's test file) relabelled with pre-tokenizer `pre`: its
    metadata, llama.cpp's vocabulary-only model of it, and llama.cpp's tokenizer test cases."""
    import llama_cpp
    base = llamacpp_source / "models" / "ggml-vocab-llama-bpe.gguf"
    with GGUFFile(base) as f:
        md, types = dict(f.metadata), dict(f.metadata_types)
        tensors = [(n, f.tensor(n)) for n in f.tensor_infos]
    md["tokenizer.ggml.pre"] = pre
    write_gguf(tmp_path / "vocab.gguf", md, tensors, metadata_types=types)
    llm = llama_cpp.Llama(str(tmp_path / "vocab.gguf"), vocab_only=True, verbose=False)
    return md, llm, base.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")


@pytest.mark.llamacpp
@pytest.mark.parametrize("pre", _distinct_pre_tokenizers())
def test_every_pre_tokenizer_splits_as_llamacpp(llamacpp_source, tmp_path, pre):
    """Each of llama.cpp's pre-tokenizers that lowtune knows: a real byte-level vocabulary (Llama
    3's) relabelled with that `pre` tokenizes llama.cpp's tokenizer test cases and text that each
    regex treats its own way exactly as llama.cpp tokenizes it."""
    md, llm, cases = _relabelled(llamacpp_source, tmp_path, pre)
    tok = load_tokenizer(md)
    for text in cases + _PRE_CASES:
        assert tok.encode(text, add_bos=False, add_eos=False) == llm.tokenize(text.encode(), add_bos=False,
                                                                              special=False), repr(text)


@pytest.mark.llamacpp
@pytest.mark.parametrize("pre", ["glm4", "chatglm-bpe"])
def test_glm_pre_tokenizers_match_llamacpp(llamacpp_source, tmp_path, pre):
    """GLM's vocabularies (Llama 3's regex; no BOS token in llama.cpp whatever the file says): a
    real byte-level vocabulary relabelled with GLM's `pre` tokenizes as llama.cpp tokenizes it,
    with the special tokens each adds by default."""
    md, llm, cases = _relabelled(llamacpp_source, tmp_path, pre)
    tok = load_tokenizer(md)
    assert tok.bos_id is None and not tok.add_bos
    for text in cases:
        assert tok.encode(text) == llm.tokenize(text.encode(), add_bos=True, special=False), repr(text)


@pytest.mark.parametrize("pre", ["deepseek-v3", "qwen35", "seed-coder", "tiny_aya", "youtu"])
def test_hf_pre_tokenizer_regexes_name_llamacpps_pre(pre):
    """A tokenizer.json whose pre-tokenizer splits by one of llama.cpp's regex lists (Split steps,
    then byte-level without its own regex) is given that list's llama.cpp name, which picks the same
    splits when the GGUF is written and read."""
    from lowtune.tokenizer import _PRE, _guess_pre
    steps = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False}
             for r in _PRE[pre][0]]
    steps.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False})
    got = _guess_pre({"pre_tokenizer": {"type": "Sequence", "pretokenizers": steps}})
    assert _PRE[got] == _PRE[pre]
    steps[0]["pattern"]["Regex"] += "|x"  # a list llama.cpp does not know
    assert _guess_pre({"pre_tokenizer": {"type": "Sequence", "pretokenizers": steps}}) == "default"


# ----------------------------------------------------------------------------------------------
# BPE over raw UTF-8: Gemma 4's vocabulary ("gemma4"), and the pre-tokenizers llama.cpp runs the same way

# spaces and their runs, newlines and their runs, digits, CJK, emoji (four-byte, joined by a modifier),
# combining marks, bytes no token covers, chat markers
_RAW_CASES = ["Hello world", " leading and trailing  ", "a\nb\n\nc\n\n\n\nd\r\n", "digits 1234567 3.14 0042",
              "深度求索 日本語のテキスト 한국어", "emoji 😀🎉👍🏽 ok 🧑‍💻", "\x00\x01 bytes \x7f\x1b[0m",
              "<|turn>user\nHi there<turn|>\n<|turn>model\n", "\n", "\n\n\n\n\n", "  ", "\n \n", *_PRE_CASES]


@pytest.fixture(scope="module")
def gemma4_vocab(tmp_path_factory, llamacpp_source, botchan_text) -> Path:
    """A Gemma 4 vocabulary as llama.cpp's converter writes it (tokenizer.ggml.model "gemma4"), from a
    tokenizer.json shaped as Gemma 4's: BPE with byte fallback over text whose spaces are "▁", learnt
    from Botchan with CJK and emoji, its chat markers special; the directory beside it."""
    import transformers as tf
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from family_models import D, F, GEMMA4, H, HKV
    d = tmp_path_factory.mktemp("gemma4-vocab")
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^\n]+|\n+"), "isolated")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    markers = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"]
    tok.train_from_iterator([botchan_text[:100000], "深度求索 日本語のテキスト 😀🎉 12345\n\n\n"], trainers.BpeTrainer(
        vocab_size=1000, special_tokens=markers + [f"<0x{b:02X}>" for b in range(256)], show_progress=False))
    tj = json.loads(tok.to_str())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] in markers]  # (byte tokens: vocabulary)
    (d / "tokenizer.json").write_text(json.dumps(tj))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
        "pad_token": "<pad>", "additional_special_tokens": ["<|turn>", "<turn|>"], "add_bos_token": True}))
    n = tok.get_vocab_size()
    tf.Gemma4TextConfig(**{**GEMMA4, "vocab_size_per_layer_input": n}, vocab_size=n, hidden_size=D,
                        intermediate_size=F, num_attention_heads=H, num_key_value_heads=HKV).save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["Gemma4ForCausalLM"]}))
    r = subprocess.run([sys.executable, str(llamacpp_source / "convert_hf_to_gguf.py"), str(d), "--outfile",
                        str(d / "vocab.gguf"), "--vocab-only"], env={**os.environ, "PYTHONPATH": str(llamacpp_source)},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return d


def _vocab_metadata(path: Path) -> tuple[dict, dict]:
    with GGUFFile(path) as f:
        return dict(f.metadata), dict(f.metadata_types)


@pytest.mark.llamacpp
def test_gemma4_vocabulary_tokenizes_as_llamacpp(gemma4_vocab, botchan_text):
    """Gemma 4's vocabulary (raw UTF-8 BPE, spaces as "▁", <0xNN> byte fallback, BOS always added) gives
    llama.cpp's tokens and the tokenizer.json's on text of every kind, and decodes back to the text."""
    import llama_cpp
    from tokenizers import Tokenizer
    md, _ = _vocab_metadata(gemma4_vocab / "vocab.gguf")
    assert md["tokenizer.ggml.model"] == "gemma4" and "tokenizer.ggml.pre" not in md
    tok = load_tokenizer(md)
    assert (tok.model, tok.bos_id, tok.eos_id, tok.add_bos) == ("gemma4", 2, 1, True)
    assert tok.eog_ids == {1, tok.token_to_id["<turn|>"]}  # (llama.cpp's end-of-generation texts)
    llm = llama_cpp.Llama(str(gemma4_vocab / "vocab.gguf"), vocab_only=True, verbose=False)
    hf = Tokenizer.from_file(str(gemma4_vocab / "tokenizer.json"))
    byte_tokens = 0
    for text in _RAW_CASES + [botchan_text[50000:60000]]:
        ids = tok.encode(text)
        assert ids == llm.tokenize(text.encode(), add_bos=True, special=True), repr(text)
        assert ids[1:] == hf.encode(text, add_special_tokens=False).ids, repr(text)
        assert tok.decode(ids, skip_special=True) == text.replace("<|turn>", "").replace("<turn|>", "")
        byte_tokens += sum(tok.token_types[i] == 6 for i in ids)
    assert byte_tokens > 20  # (the bytes, CJK and emoji that no token covers)
    assert tok.encode("<|turn>", special=False, add_bos=False) != [tok.token_to_id["<|turn>"]]


def test_gemma4_hf_directory_vocabulary_is_the_converters(gemma4_vocab, tmp_path, llamacpp_source):
    """A Gemma 4 directory's tokenizer.json reads as the vocabulary llama.cpp's converter writes from it (every
    tokenizer key equal): its markers CONTROL, the converter's visible markers (<|channel>) USER_DEFINED though
    special, added tokens past the vocabulary USER_DEFINED, BOS added whatever tokenizer_config.json says."""
    import shutil
    d = tmp_path / "vocab"
    shutil.copytree(gemma4_vocab, d, ignore=shutil.ignore_patterns("*.gguf"))
    tj = json.loads((d / "tokenizer.json").read_text())
    n = len(tj["model"]["vocab"])
    tj["added_tokens"] += [{"id": n, "content": "<|channel>", "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True},
                           {"id": n + 1, "content": "<tool>", "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": False}]
    (d / "tokenizer.json").write_text(json.dumps(tj))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(additional_special_tokens=cfg["additional_special_tokens"] + ["<|channel>"], add_bos_token=False)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, str(llamacpp_source / "convert_hf_to_gguf.py"), str(d), "--outfile",
                        str(d / "vocab.gguf"), "--vocab-only"], env={**os.environ, "PYTHONPATH": str(llamacpp_source)},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    md, _ = _vocab_metadata(d / "vocab.gguf")
    want = {k: v for k, v in md.items() if k.startswith("tokenizer.")}
    got = tokenizer_metadata_from_dir(d, "gemma4")
    assert got == want
    types = dict(zip(got["tokenizer.ggml.tokens"], got["tokenizer.ggml.token_type"]))
    assert (types["<|turn>"], types["<|channel>"], types["<tool>"], types["<0x41>"]) == (3, 4, 4, 6)


@pytest.mark.transformers
def test_gemma4_vocabulary_writes_as_its_tokenizer_json(gemma4_vocab, tmp_path, botchan_text):
    """Gemma 4's vocabulary written for a Hugging Face directory (tokenizer.json: BPE over raw UTF-8 with byte
    fallback, spaces as "▁", its markers special) gives lowtune's tokens in transformers, and reads back as the
    vocabulary it was written from."""
    import transformers

    from lowtune.export import write_hf_tokenizer
    md, _ = _vocab_metadata(gemma4_vocab / "vocab.gguf")
    assert "tokenizer.json" in write_hf_tokenizer(md, tmp_path)
    tok, hf = load_tokenizer(md), transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in _RAW_CASES + [botchan_text[50000:53000]]:
        assert hf(text)["input_ids"] == tok.encode(text), repr(text)
    back = tokenizer_metadata_from_dir(tmp_path, "gemma4")
    back.pop("tokenizer.ggml.add_eos_token")  # (tokenizer_config.json's, which the converter's file lacks)
    assert back == {k: v for k, v in md.items() if k.startswith("tokenizer.")}


@pytest.mark.llamacpp
@pytest.mark.parametrize("model,pre", [("gemma4", "gemma4"), ("gpt2", "gemma4"), ("gpt2", "granite-embed-multi-311m"),
                                       ("gpt2", "sarvam-moe")])
def test_raw_utf8_pre_tokenizers_as_llamacpp(gemma4_vocab, tmp_path, model, pre):
    """llama.cpp's pre-tokenizers of BPE over raw UTF-8, on Gemma 4's vocabulary relabelled, with a run of
    five newlines added as a token that no merge makes: Gemma 4's (and granite-embed-multi-311m's) take it
    whole, Sarvam-MoE's merge the newlines; each tokenizes every case as llama.cpp does."""
    import llama_cpp
    md, types = _vocab_metadata(gemma4_vocab / "vocab.gguf")
    md = {**md, "tokenizer.ggml.model": model, "tokenizer.ggml.pre": pre,
          "tokenizer.ggml.tokens": md["tokenizer.ggml.tokens"] + ["\n" * 5],
          "tokenizer.ggml.scores": md["tokenizer.ggml.scores"] + [0.0],
          "tokenizer.ggml.token_type": md["tokenizer.ggml.token_type"] + [1]}
    write_gguf(tmp_path / "vocab.gguf", md, [], metadata_types=types)
    llm = llama_cpp.Llama(str(tmp_path / "vocab.gguf"), vocab_only=True, verbose=False)
    tok = load_tokenizer(md)
    five = len(md["tokenizer.ggml.tokens"]) - 1
    assert (five in tok.encode("a\n\n\n\n\nb")) == (pre != "sarvam-moe")
    for text in _RAW_CASES:
        assert tok.encode(text) == llm.tokenize(text.encode(), add_bos=True, special=True), repr(text)
