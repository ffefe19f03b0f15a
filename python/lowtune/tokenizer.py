"""Tokenizers built from a GGUF file's own metadata, so a GGUF file alone is enough to train.

    tok = load_tokenizer(gguf_file.metadata)     # tokenizer.ggml.model "gpt2", "gemma4", "llama" or "rwkv"
    ids = tok.encode("Hello")                    # [..] (BOS added when the metadata says so)
    tok.decode(ids)                               # "Hello"
    tok.apply_chat_template([{"role": "user", "content": "Hi"}])

Tokenization follows llama.cpp (llama-vocab.cpp), which is what runs the exported files:
  * Special tokens are cut out of the text first, longest token first (control and unknown tokens
    only when `special=True`; user-defined tokens always), and the pieces between them are tokenized
    one by one.
  * "gpt2" (byte-level BPE): the `pre` value picks llama.cpp's list of pre-tokenizer regexes, each
    splitting the pieces of the previous one; then byte-level BPE with the GGUF's merges. The
    `tokenizers` package does the regex splits and the merges.
  * "gemma4" (and "gpt2" with the pre-tokenizers llama.cpp runs the same way: RawBPETokenizer): BPE
    over raw UTF-8 (no byte symbols) of the text with its spaces as "▁", split into lines and runs of
    newlines; what no token covers becomes <0xNN> byte tokens.
  * "llama" (SentencePiece BPE by scores, byte fallback): every text piece gets a leading space when
    add_space_prefix is set and it starts the text or follows a special token; spaces become "▁".
    `sentencepiece` does the merges, from a model built out of tokens/scores/token_type.
  * "rwkv" (RWKV's world vocabulary): each token's bytes are its text unescaped as llama.cpp unescapes it
    (\\t, \\n, \\r, \\xNN, \\<char>); the text's bytes are taken greedily, the longest token that starts
    each position first.
Decoding joins each token's bytes (byte-level BPE unmapped, "▁" back to space, <0xNN> byte tokens) and
decodes UTF-8 once, so multi-byte characters split over tokens come out whole.
"""
from __future__ import annotations

import json
import os
import re
import struct
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

# tokenizer.ggml.token_type values (same numbers as sentencepiece's piece types)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_BLOOM = r" ?[^(\s|.,!?…。，、।۔،)]+"
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_CASED_WORDS = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS + "?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS + "?")
_CJK_KANA = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
_DEEPSEEK3_WORDS = (r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
                    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek LLM's letters: the cased scripts' letters as one class (its tokenizer.json's ranges)
_DEEPSEEK_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
    "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481"
    "\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b"
    "\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b"
    "\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb"
    "\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4"
    "\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
    "\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943")
# runs of digits in threes from the right (1234567: 1, 234, 567), as llama.cpp splits them
_DIGITS_BY_THREES = r"\p{N}{1,3}(?=(?:\p{N}{3})*(?!\p{N}))"

# llama.cpp's pre-tokenizers (llama-vocab.cpp): name -> (regexes applied in turn, ignore_merges, add_bos
# default). The names that share a list are llama.cpp's groups; _REFUSED_PRE are the others.
_PRE = {}
for _names, _spec in [
    (("default",), ([r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"], False, False)),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"),
     ([_LLAMA3], True, True)),
    (("dbrx", "smaug-bpe"), ([_LLAMA3], False, False)),
    (("chatglm-bpe",), ([_LLAMA3], False, False)),
    (("glm4", "glm5"), ([_LLAMA3], True, False)),
    (("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"),
     ([r"\p{N}", _GPT2], False, False)),
    (("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v1-en", "jina-v2-es", "jina-v2-de",
      "jina-v2-code", "roberta-bpe", "mpt", "olmo", "jais", "exaone4", "a.x-4.0", "mellum", "modern-bert",
      "trillion", "granite-docling"), ([_GPT2], False, False)),
    (("qwen2", "stablelm2", "megrez", "deepseek-r1-qwen", "kormo", "f2llmv2", "hunyuan", "solar-open", "grok-2"),
     ([_QWEN2], False, False)),
    (("qwen35",), ([_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+"], False, False)),
    (("falcon",), ([r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"], False, False)),
    (("poro-chat", "bloom", "gpt3-finnish"), ([_BLOOM], False, False)),
    (("viking",), ([_BLOOM, r"\p{N}"], False, False)),
    (("deepseek-coder",), ([r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"], False, False)),
    (("deepseek-llm",), ([r"[\r\n]", r"\s?[" + _DEEPSEEK_LETTERS + "]+",
                          "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+", r"\s+$",
                          r"[一-龥ࠀ-一가-퟿]+", r"\p{N}+"], False, False)),
    (("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"),
     ([r"\p{N}{1,3}", _CJK_KANA, _DEEPSEEK3_WORDS], False, False)),
    (("spark2_5",), ([r"\p{N}{1,3}", _CJK_KANA, _DEEPSEEK3_WORDS.replace(r"[\r\n]*|\s*[\r\n]+", r"|[\r\n]"),
                      r"\p{N}"], False, False)),
    (("youtu",), (["[\uac00-\ud7a3\u3131-\u318e]+|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b\uff0c"
                   "\u3001-\u303f\ufe30-\ufe4f]+|[\u3105-\u312f]+|" + _CJK_KANA,
                   _CASED_WORDS + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"], True, False)),
    (("jais-2",), ([_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                    r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)"
                    r"|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}"], False, False)),
    (("tekken",), ([_TEKKEN], True, True)),
    (("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), ([_GPT4O], False, False)),  # (o200k: gpt-oss)
    (("tiny_aya", "cohere2moe"), ([_DIGITS_BY_THREES, _CASED_WORDS + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
                                   r"|\s*[\r\n]+|\s+(?!\S)|\s+"], False, False)),
    (("bailingmoe", "bailingmoe2", "llada-moe"),
     ([r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
       r"|\s*[\r\n]|\s+(?!\S)|\s+"], False, False)),
    (("seed-coder",), ([_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
                        r"|\s+(?!\S)|\s+"], False, False)),
    (("ufakzeka",), ([r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
                     False, False)),
    (("laguna",), ([r"[^\n]+|[\n]+", _QWEN2], False, False)),
    (("exaone-moe",), ([_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
                        r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"], False, False)),
    (("minicpm5",), ([r"\p{N}{1,3}", _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*"
                      r"|\s*[\r\n]+|\s+(?!\S)|\s+"], True, False)),
]:
    for _n in _names:
        _PRE[_n] = _spec

# llama.cpp's BPE over raw UTF-8 (SentencePiece-style vocabularies: spaces as "▁", <0xNN> byte tokens; RawBPETokenizer):
# name -> llama.cpp's pre-tokenizer type: "gemma4" takes a run of newlines that is a token whole, before merges,
# and always adds BOS; "sarvam-moe" does neither
_RAW_PRE = {"gemma4": "gemma4", "granite-embed-multi-311m": "gemma4", "sarvam-moe": "sarvam-moe"}
_LINES = re.compile(r"[^\n]+|\n+")  # (their one split: lines and runs of newlines)

_BY_HAND = "a split that llama.cpp codes by hand rather than by regex, which lowtune does not reproduce"
_REFUSED_PRE = {"whitespace": "BPE over raw UTF-8 without escaped spaces, split at whitespace, which lowtune does "
                "not run", "kimi-k2": _BY_HAND, "afmoe": _BY_HAND, "superbpe": _BY_HAND,
                "chameleon": "image tokens in the text", "granite-embed-multi-97m": "an embedding model's"}

# pre-tokenizers whose vocabularies llama.cpp gives no BOS token, whatever the file says (GLM's)
_NO_BOS = ("chatglm-bpe", "glm4", "glm5")

# llama.cpp picks the end-of-turn token by its text when the metadata does not say
_EOT_TEXTS = ["<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>",
              "<｜end▁of▁sentence｜>"]
_EOG_TEXTS = ["<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>",
              "<eos>", "<turn|>", "<|tool_response>"]  # (the last three Gemma 4's)
# llama.cpp's built-in templates that a file names in place of a Jinja one (tokenizer.chat_template), as Jinja:
# "rwkv-world", which RWKV's converter writes where the checkpoint has no template (llama-chat.cpp's format)
_NAMED_TEMPLATES = {"rwkv-world": (
    "{% for m in messages %}{% if m['role'] == 'system' %}System: {{ m['content'] | trim }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] | trim }}\n\n{% if loop.last %}Assistant:{% endif %}"
    "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] | trim }}\n\n{% endif %}{% endfor %}")}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


class Tokenizer:
    """Common interface: encode/decode, special ids, chat template. Built by load_tokenizer()."""

    model: str = ""

    def __init__(self, tokens: list[str], token_types: list[int], bos_id, eos_id, eot_id, add_bos: bool,
                 add_eos: bool, chat_template: str | None):
        self.tokens = tokens
        self.token_types = token_types
        self.vocab_size = len(tokens)
        self.bos_id, self.eos_id, self.eot_id = bos_id, eos_id, eot_id
        self.add_bos, self.add_eos = add_bos, add_eos
        self.chat_template = chat_template
        self.token_to_id = {t: i for i, t in enumerate(tokens)}
        # cut out of the text before tokenizing; longest first (llama.cpp's cache_special_tokens order)
        special = [i for i, t in enumerate(token_types) if t in (CONTROL, USER_DEFINED, UNKNOWN) and tokens[i]]
        special.sort(key=lambda i: -len(tokens[i].encode("utf-8", errors="surrogateescape")))
        self._special = special
        self.eog_ids = {i for i in (eos_id, eot_id) if i is not None}
        self.eog_ids |= {self.token_to_id[t] for t in _EOG_TEXTS if t in self.token_to_id}
        self._pieces: list[bytes] | None = None

    # ---- encoding --------------------------------------------------------------------------------
    def _partition(self, text: str, special: bool) -> list[str | int]:
        """Text -> fragments: strings to tokenize and ids of special tokens found in the text."""
        frags: list[str | int] = [text] if text else []
        for tid in self._special:
            if not special and self.token_types[tid] in (CONTROL, UNKNOWN):
                continue
            t = self.tokens[tid]
            if not any(isinstance(f, str) and t in f for f in frags):
                continue
            out: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or t not in f:
                    out.append(f)
                    continue
                parts = f.split(t)
                for j, p in enumerate(parts):
                    if j:
                        out.append(tid)
                    if p:
                        out.append(p)
            frags = out
        return frags

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None,
               special: bool = True) -> list[int]:
        """Token ids of `text`. add_bos/add_eos None: as the metadata says. special: recognise control
        tokens written in the text (e.g. "<|im_start|>" from a chat template); False treats them as
        plain text (llama.cpp's parse_special=false)."""
        if not isinstance(text, str):
            raise ValueError(f"encode() takes a str, got {type(text).__name__}")
        ids: list[int] = []
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise ValueError("this tokenizer has no BOS token; call encode(..., add_bos=False)")
            ids.append(self.bos_id)
        ids += self._encode_fragments(self._partition(text, special))
        if self.add_eos if add_eos is None else add_eos:
            if self.eos_id is None:
                raise ValueError("this tokenizer has no EOS token; call encode(..., add_eos=False)")
            ids.append(self.eos_id)
        return ids

    def _encode_fragments(self, frags: list[str | int]) -> list[int]:
        raise NotImplementedError

    # ---- decoding --------------------------------------------------------------------------------
    def _piece(self, i: int) -> bytes:
        raise NotImplementedError

    def token_bytes(self, i: int) -> bytes:
        """The bytes token i stands for (a control token's own text)."""
        if self._pieces is None:
            self._pieces = [self._piece(j) for j in range(self.vocab_size)]
        return self._pieces[i]

    def decode_bytes(self, ids: Sequence[int], skip_special: bool = False) -> bytes:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            if skip_special and self.token_types[i] in (CONTROL, UNKNOWN):
                continue
            out.append(self.token_bytes(i))
        return b"".join(out)

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def id_to_token(self, i: int) -> str:
        return self.tokens[i]

    def __len__(self) -> int:
        return self.vocab_size

    # ---- chat ------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            chat_template: str | None = None, **kwargs) -> str:
        """Render a conversation with the model's Jinja chat template (sandboxed, as transformers
        does). The result still holds the special tokens as text: encode() recognises them."""
        template = chat_template or self.chat_template
        if not template:
            raise ValueError("this model has no chat template (tokenizer.chat_template); pass chat_template=")
        return render_chat_template(template, messages, add_generation_prompt,
                                    bos_token=self._text(self.bos_id), eos_token=self._text(self.eos_id),
                                    **kwargs)

    def _text(self, i) -> str:
        return self.tokens[i] if i is not None and 0 <= i < self.vocab_size else ""

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.model} vocab={self.vocab_size} bos={self.bos_id} "
                f"eos={self.eos_id} eot={self.eot_id} add_bos={self.add_bos}>")


class BPETokenizer(Tokenizer):
    """Byte-level BPE ("gpt2" in GGUF) with llama.cpp's pre-tokenizer for `pre`."""

    model = "gpt2"

    def __init__(self, tokens, token_types, merges: list[str], pre: str, **kw):
        from tokenizers import Regex, Tokenizer as HFTokenizer, pre_tokenizers

        super().__init__(tokens, token_types, **kw)
        if pre in _REFUSED_PRE:
            raise ValueError(f"the file's pre-tokenizer {pre!r} (tokenizer.ggml.pre) is {_REFUSED_PRE[pre]}; "
                             f"lowtune tokenizes with {sorted(_PRE)}")
        if pre not in _PRE:
            raise ValueError(f"unknown pre-tokenizer {pre!r} (tokenizer.ggml.pre); known: {sorted(_PRE)}")
        self.pre = pre
        regexes, ignore_merges, _ = _PRE[pre]
        hf = HFTokenizer(_bpe_model(self.token_to_id, merges, ignore_merges=ignore_merges))
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        self._hf = hf

    def _encode_fragments(self, frags):
        texts = [f for f in frags if isinstance(f, str)]
        encoded = iter(self._hf.encode_batch(texts, add_special_tokens=False) if texts else [])
        ids: list[int] = []
        for f in frags:
            ids += next(encoded).ids if isinstance(f, str) else [f]
        return ids

    def _piece(self, i):
        t = self.tokens[i]
        if self.token_types[i] not in (CONTROL, USER_DEFINED, UNKNOWN):
            try:
                return bytes(_BYTE_DECODER[c] for c in t)
            except KeyError:
                pass  # not byte-level text: use the raw text
        return t.encode("utf-8", errors="surrogateescape")


def _bpe_model(vocab: dict[str, int], merges: list, **options):
    """tokenizers' BPE model of a GGUF's vocabulary and merges (tokenizer.ggml.merges)."""
    from tokenizers import models
    pairs = []
    for m in merges:
        if not isinstance(m, str):
            raise ValueError(f"tokenizer.ggml.merges must hold strings, got {type(m).__name__}")
        # llama.cpp splits at the first space after the first character
        k = m.find(" ", 1)
        if k < 0:
            raise ValueError(f"malformed BPE merge {m!r} in tokenizer.ggml.merges")
        a, b = m[:k], m[k + 1:]
        # a merge whose parts or result are not tokens can never fire in llama.cpp either
        if a in vocab and b in vocab and a + b in vocab:
            pairs.append((a, b))
    try:
        return models.BPE(vocab=vocab, merges=pairs, **options)
    except Exception as e:  # tokenizers raises plain Exception
        raise ValueError(f"cannot build the BPE tokenizer from the GGUF metadata: {e}") from e


def _sentencepiece_piece(t: str, tt: int) -> bytes:
    """A piece's bytes in SentencePiece's spelling (Gemma 4's raw BPE spells its pieces so too): <0xNN>
    byte tokens as that byte, special pieces as written, U+2581 as a space."""
    if tt == BYTE and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
        return bytes([int(t[3:5], 16)])
    if tt in (CONTROL, UNKNOWN, USER_DEFINED):
        return t.encode("utf-8", errors="surrogateescape")
    return t.replace("\u2581", " ").encode("utf-8", errors="surrogateescape")


class RawBPETokenizer(Tokenizer):
    """BPE over raw UTF-8 ("gemma4" in GGUF, or "gpt2" with a pre-tokenizer of _RAW_PRE), as llama.cpp runs it:
    spaces become "▁", the text is split into lines and runs of newlines (for Gemma 4 a run that is a token
    is that token), merges by rank over each piece's UTF-8 characters, and what no token covers becomes its
    <0xNN> byte tokens (dropped where the vocabulary has none, as llama.cpp drops them)."""

    model = "gemma4"

    def __init__(self, tokens, token_types, merges: list[str], pre: str, **kw):
        from tokenizers import Tokenizer as HFTokenizer

        super().__init__(tokens, token_types, **kw)
        self.pre = pre
        self.whole_newlines = _RAW_PRE[pre] == "gemma4"
        self._hf = HFTokenizer(_bpe_model(self.token_to_id, merges, byte_fallback=True))

    def _taken_whole(self, piece: str) -> bool:
        return self.whole_newlines and piece[0] == "\n" and piece in self.token_to_id

    def _encode_fragments(self, frags):
        pieces = [p for f in frags for p in ([f] if isinstance(f, int) else _LINES.findall(f.replace(" ", "\u2581")))]
        merged = [p for p in pieces if isinstance(p, str) and not self._taken_whole(p)]
        encoded = iter(self._hf.encode_batch(merged, add_special_tokens=False) if merged else [])
        ids: list[int] = []
        for p in pieces:
            if isinstance(p, int):
                ids.append(p)
            elif self._taken_whole(p):
                ids.append(self.token_to_id[p])
            else:
                ids += next(encoded).ids
        return ids

    def _piece(self, i):
        return _sentencepiece_piece(self.tokens[i], self.token_types[i])


class SPMTokenizer(Tokenizer):
    """SentencePiece-style BPE by scores ("llama" in GGUF), byte fallback, llama.cpp's space rules."""

    model = "llama"

    def __init__(self, tokens, token_types, scores: list[float], add_space_prefix: bool, unk_id, **kw):
        import sentencepiece as spm

        super().__init__(tokens, token_types, **kw)
        self.add_space_prefix = add_space_prefix
        types = list(token_types)
        unk = unk_id if unk_id is not None else (types.index(UNKNOWN) if UNKNOWN in types else 0)
        # sentencepiece needs exactly one unknown piece (llama.cpp's default unk is 0); other
        # UNKNOWN-typed pieces (Phi-3's padding) never come out of merges, like control pieces
        types = [CONTROL if t == UNKNOWN else t for t in types]
        types[unk] = UNKNOWN
        proto = sentencepiece_model_proto(
            tokens, scores, types, model_type="bpe", byte_fallback=BYTE in types,
            add_dummy_prefix=False, remove_extra_whitespaces=False)
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
        except Exception as e:  # sentencepiece raises RuntimeError on a vocabulary it rejects
            raise ValueError(f"sentencepiece rejected the vocabulary built from the GGUF metadata: {e}") from e
        if self._sp.get_piece_size() != len(tokens):
            raise ValueError("sentencepiece rejected the vocabulary built from the GGUF metadata")

    def _encode_fragments(self, frags):
        ids: list[int] = []
        prev_special = True
        for f in frags:
            if isinstance(f, int):
                ids.append(f)
                prev_special = True
                continue
            if self.add_space_prefix and prev_special:
                f = " " + f
            ids += self._sp.encode(f)
            prev_special = False
        return ids

    def _piece(self, i):
        return _sentencepiece_piece(self.tokens[i], self.token_types[i])

    def decode_bytes(self, ids, skip_special=False):
        """Mirror of encoding: the space put in front of a text run (at the start, or after a
        special token) is not part of the text and is dropped. To stream generated text, decode the
        whole sequence and take the new suffix (decoding new tokens alone would drop their space)."""
        if not self.add_space_prefix:
            return super().decode_bytes(ids, skip_special)
        out = []
        run_start = True
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            tt = self.token_types[i]
            if tt in (CONTROL, UNKNOWN):
                run_start = True
                if not skip_special:
                    out.append(self.token_bytes(i))
                continue
            piece = self.token_bytes(i)
            if run_start and piece.startswith(b" "):
                piece = piece[1:]
            run_start = False
            out.append(piece)
        return b"".join(out)


class RWKVTokenizer(Tokenizer):
    """RWKV's world vocabulary ("rwkv" in GGUF), as llama.cpp's llm_tokenizer_rwkv runs it: the longest token
    whose bytes start the text at each position, over every token of the vocabulary (a later token of the
    same bytes taking the place of an earlier one, as llama.cpp's trie does)."""

    model = "rwkv"

    def __init__(self, tokens, token_types, **kw):
        super().__init__(tokens, token_types, **kw)
        self._ids = {rwkv_unescape(t): i for i, t in enumerate(tokens)}
        self._longest = max(map(len, self._ids))

    def _encode_fragments(self, frags):
        ids: list[int] = []
        for f in frags:
            if isinstance(f, int):
                ids.append(f)
                continue
            data, pos = f.encode("utf-8"), 0
            while pos < len(data):
                for end in range(min(len(data), pos + self._longest), pos, -1):
                    tid = self._ids.get(data[pos:end])
                    if tid is not None:
                        break
                else:
                    raise ValueError(f"byte {data[pos]:#04x} of the text is no token of this RWKV vocabulary")
                ids.append(tid)
                pos = end
        return ids

    def _piece(self, i):
        return rwkv_unescape(self.tokens[i])


def rwkv_unescape(text: str) -> bytes:
    """The bytes of an RWKV token's text as the converter escapes them (Python's repr of the bytes) and
    llama.cpp's llama_unescape_rwkv_token reads them back."""
    out, it = bytearray(), iter(text.encode("utf-8"))
    for c in it:
        if c != 0x5C:  # (a backslash)
            out.append(c)
            continue
        e = next(it, None)
        if e is None:
            break
        if e == ord("x"):
            digits = bytes((next(it, 0x30), next(it, 0x30)))
            out.append(int(digits, 16))
        else:
            out.append({ord("t"): 9, ord("n"): 10, ord("r"): 13}.get(e, e))
    return bytes(out)


# ---- building -----------------------------------------------------------------------------------

def load_tokenizer(metadata: dict) -> Tokenizer:
    """A tokenizer from GGUF metadata (GGUFFile.metadata, or an HFCheckpoint's)."""
    model = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise ValueError("the metadata has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens); "
                         "load the tokenizer from the model's HF directory with load_tokenizer_dir()")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ValueError("tokenizer.ggml.tokens must be a list of strings")
    n = len(tokens)
    # llama.cpp renames empty tokens rather than failing
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    if len(set(tokens)) != n:
        dup = next(t for t, c in _count(tokens).items() if c > 1)
        raise ValueError(f"tokenizer.ggml.tokens holds {dup!r} more than once")
    types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * n
    if not isinstance(types, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in types):
        raise ValueError("tokenizer.ggml.token_type must be a list of integers")
    types = list(types)
    if len(types) != n:
        raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")

    def tid(key, default):
        v = metadata.get(f"tokenizer.ggml.{key}", default)
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n:
            return v
        # llama.cpp ignores an out-of-range id and keeps its default
        return default if default is not None and 0 <= default < n else None

    pre = "gemma4" if model == "gemma4" else _str_or_none(metadata.get("tokenizer.ggml.pre")) or "default"
    if model == "gpt2":
        add_bos_default = _PRE.get(pre, (None, False, False))[2]
        bos, eos, unk = tid("bos_token_id", 11), tid("eos_token_id", 11), tid("unknown_token_id", None)
        if pre in _NO_BOS:
            bos, add_bos_default = None, False
    elif model == "gemma4":  # (llama.cpp: BPE with the gemma4 pre-tokenizer whatever the file says, no default ids)
        add_bos_default = True
        bos, eos, unk = tid("bos_token_id", None), tid("eos_token_id", None), tid("unknown_token_id", None)
    elif model == "llama":
        add_bos_default = True
        bos, eos, unk = tid("bos_token_id", 1), tid("eos_token_id", 2), tid("unknown_token_id", 0)
    elif model == "rwkv":  # (llama.cpp: no default ids, no BOS added unless the file says)
        add_bos_default = False
        bos, eos, unk = tid("bos_token_id", None), tid("eos_token_id", None), tid("unknown_token_id", None)
    else:
        raise ValueError(f"tokenizer.ggml.model {model!r} is not supported (lowtune reads 'gpt2', 'gemma4', "
                         "'llama' and 'rwkv')")
    eot = tid("eot_token_id", None)
    if eot is None:
        index = {t: i for i, t in enumerate(tokens)}
        eot = next((index[t] for t in _EOT_TEXTS if t in index), None)
    for i in (eot,):   # llama.cpp makes the end-of-turn token a control token whatever the file says
        if i is not None:
            types[i] = CONTROL
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default))
    if _RAW_PRE.get(pre) == "gemma4":  # (llama.cpp adds BOS to Gemma 4's vocabulary whatever the file says)
        add_bos = True
    template = _str_or_none(metadata.get("tokenizer.chat_template"))
    common = dict(bos_id=bos, eos_id=eos, eot_id=eot, add_bos=bos is not None and add_bos,
                  add_eos=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
                  chat_template=_NAMED_TEMPLATES.get(template, template))
    if model in ("gpt2", "gemma4"):
        merges = metadata.get("tokenizer.ggml.merges")
        if not isinstance(merges, list):
            raise ValueError(f"a {model!r} tokenizer needs tokenizer.ggml.merges (a list of strings)")
        return (RawBPETokenizer if pre in _RAW_PRE else BPETokenizer)(tokens, types, merges, pre, **common)
    if model == "rwkv":
        return RWKVTokenizer(tokens, types, **common)
    scores = metadata.get("tokenizer.ggml.scores") or [0.0] * n
    if not isinstance(scores, list) or not all(isinstance(x, (int, float)) for x in scores):
        raise ValueError("tokenizer.ggml.scores must be a list of numbers")
    scores = [float(x) for x in scores]
    if len(scores) != n:
        raise ValueError(f"tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
    return SPMTokenizer(tokens, types, scores, bool(metadata.get("tokenizer.ggml.add_space_prefix", True)),
                        unk, **common)


def _str_or_none(v):
    return v if isinstance(v, str) else None


def _count(items) -> dict:
    out: dict = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def load_tokenizer_dir(path) -> Tokenizer:
    """A tokenizer from a Hugging Face model directory (tokenizer.json or tokenizer.model, plus
    tokenizer_config.json for the chat template and BOS/EOS), built through the same GGUF metadata
    that an export would write."""
    return load_tokenizer(tokenizer_metadata_from_dir(path))


def tokenizer_metadata_from_dir(path, arch: str = "") -> dict[str, Any]:
    """GGUF tokenizer.* metadata for a HF directory (of a model of architecture `arch`). tokenizer.model
    (SentencePiece) gives a 'llama' tokenizer; tokenizer.json with a byte-level BPE model gives 'gpt2' with
    `pre` guessed from its pre-tokenizer regex; a gemma4 model's BPE with byte fallback 'gemma4', as llama.cpp's
    converter writes it (_gemma4_metadata)."""
    d = Path(path)
    cfg = _read_json(d / "tokenizer_config.json") or {}
    meta: dict[str, Any] = {}
    tj = _read_json(d / "tokenizer.json")
    if arch == "gemma4" and tj is not None and tj.get("model", {}).get("byte_fallback"):
        meta.update(_gemma4_metadata(tj, cfg))
    elif tj is not None and tj.get("model", {}).get("type") == "BPE" and _is_byte_level(tj):
        meta.update(_bpe_metadata(tj))
    elif (d / "tokenizer.model").exists():
        meta.update(spm_metadata((d / "tokenizer.model").read_bytes()))
        if tj is not None:
            _add_hf_added_tokens(meta, tj)
    elif tj is not None:
        raise ValueError(f"{d / 'tokenizer.json'}: only byte-level BPE tokenizer.json files are supported "
                         f"(model {tj.get('model', {}).get('type')!r}); a tokenizer.model would do too")
    else:
        raise ValueError(f"{d}: no tokenizer.json or tokenizer.model")
    index = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    for key, name in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token"),
                      ("unknown_token_id", "unk_token"), ("padding_token_id", "pad_token")):
        tok = cfg.get(name)
        if isinstance(tok, dict):
            tok = tok.get("content")
        if isinstance(tok, str) and tok in index:
            meta[f"tokenizer.ggml.{key}"] = index[tok]
    if "add_bos_token" in cfg:
        meta["tokenizer.ggml.add_bos_token"] = bool(cfg["add_bos_token"])
    elif meta["tokenizer.ggml.model"] == "gpt2" and tj is not None:
        meta["tokenizer.ggml.add_bos_token"] = _post_processor_adds_bos(tj, meta)
    if meta["tokenizer.ggml.model"] == "gemma4":  # (whatever the config says, as the converter writes it)
        meta["tokenizer.ggml.add_bos_token"] = True
    if "add_eos_token" in cfg:
        meta["tokenizer.ggml.add_eos_token"] = bool(cfg["add_eos_token"])
    template = cfg.get("chat_template")
    if template is None and (d / "chat_template.jinja").exists():
        template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):   # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template:
        meta["tokenizer.chat_template"] = template
    return meta


def _read_json(p: Path):
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else None


def _is_byte_level(tj: dict) -> bool:
    def walk(x):
        if isinstance(x, dict):
            return x.get("type") == "ByteLevel" or any(walk(v) for v in x.values())
        if isinstance(x, list):
            return any(walk(v) for v in x)
        return False
    return walk(tj.get("pre_tokenizer")) or walk(tj.get("decoder"))


def _bpe_metadata(tj: dict) -> dict:
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    for a in tj.get("added_tokens", []):
        vocab[a["content"]] = a["id"]
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [UNUSED] * n
    for t, i in vocab.items():
        tokens[i], types[i] = t, NORMAL
    for a in tj.get("added_tokens", []):
        types[a["id"]] = CONTROL if a.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": _guess_pre(tj),
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": merges}


# Gemma 4's markers that llama.cpp's converter types USER_DEFINED (always rendered, for its chat parser)
_GEMMA4_VISIBLE = ("<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
                   "<|\"|>")
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _gemma4_metadata(tj: dict, cfg: dict) -> dict:
    """Gemma 4's tokenizer.json (BPE with byte fallback) as llama.cpp's converter writes it (LlamaHfVocab): the
    tokens by id, scores of -1000, <0xNN> BYTE, transformers' special tokens CONTROL, _GEMMA4_VISIBLE and other
    added tokens past the vocabulary USER_DEFINED, the merges; no space prefix, BOS always added."""
    meta = _bpe_metadata(tj)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    base = len(tj["model"]["vocab"])
    named = [cfg.get(k) for k in _SPECIAL_KEYS]
    extra = cfg.get("additional_special_tokens") or cfg.get("extra_special_tokens") or []
    named += list(extra.values()) if isinstance(extra, dict) else list(extra)
    special = {t.get("content") if isinstance(t, dict) else t for t in named}
    for i, t in enumerate(tokens):
        types[i] = (USER_DEFINED if t in _GEMMA4_VISIBLE else BYTE if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t)
                    else CONTROL if t in special else USER_DEFINED if i >= base else NORMAL)
    meta.update({"tokenizer.ggml.model": "gemma4", "tokenizer.ggml.scores": [-1000.0] * len(tokens),
                 "tokenizer.ggml.add_space_prefix": False})
    del meta["tokenizer.ggml.pre"]
    return meta


def _guess_pre(tj: dict) -> str:
    """Map the pre-tokenizer's regexes to llama.cpp's `pre` name (convert_hf_to_gguf.py hashes a test
    string instead): a name whose regexes they are, else 'default'."""
    pats = []

    def walk(x):
        if isinstance(x, dict):
            if x.get("type") == "Split":
                p = x.get("pattern", {})
                pats.append(p.get("Regex") or p.get("String"))
            elif x.get("type") == "ByteLevel" and x.get("use_regex", True):
                pats.append(_GPT2)
            elif x.get("type") == "Digits":
                pats.append(r"\p{N}" if x.get("individual_digits") else r"\p{N}+")
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    walk(tj.get("pre_tokenizer"))
    norm = [p.replace("\\\\", "\\") if p else p for p in pats]  # (some files escape their regexes twice)
    if norm and norm[0] == _LLAMA3:
        return "llama-bpe"
    # the commonest names first where names share regexes (smollm's are starcoder's), then the table's order
    for name in ("qwen2", "smollm", "gpt-2", *_PRE):
        if _PRE[name][0] in (pats, norm) and name != "default":
            return name
    return "default"


def _post_processor_adds_bos(tj: dict, meta: dict) -> bool:
    pp = tj.get("post_processor") or {}
    bos = meta.get("tokenizer.ggml.bos_token_id")
    text = json.dumps(pp)
    return bos is not None and pp.get("type") in ("TemplateProcessing", "Sequence") and \
        json.dumps(meta["tokenizer.ggml.tokens"][bos]) in text


def _add_hf_added_tokens(meta: dict, tj: dict) -> None:
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    scores = meta["tokenizer.ggml.scores"]
    for a in tj.get("added_tokens", []):
        i = a["id"]
        while i >= len(tokens):
            tokens.append(f"[PAD{len(tokens)}]")
            types.append(UNUSED)
            scores.append(-1000.0)
        tokens[i] = a["content"]
        types[i] = CONTROL if a.get("special") else USER_DEFINED


# ---- sentencepiece model files, without the protobuf package -------------------------------------
# ModelProto fields used here (sentencepiece_model.proto): pieces=1 {piece=1, score=2, type=3},
# trainer_spec=2 {model_type=3, byte_fallback=35, unk_id=40, bos_id=41, eos_id=42, pad_id=43},
# normalizer_spec=3 {name=1, add_dummy_prefix=3, remove_extra_whitespaces=4, escape_whitespaces=5}.

def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1   # negative int32 values are sign-extended to 10 bytes, as protobuf does
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    return _varint(num << 3 | wire) + payload


def _len_field(num: int, data: bytes) -> bytes:
    return _field(num, 2, _varint(len(data)) + data)


def sentencepiece_model_proto(tokens, scores, types, model_type="bpe", byte_fallback=True,
                              add_dummy_prefix=True, remove_extra_whitespaces=False) -> bytes:
    """A serialized sentencepiece ModelProto for a vocabulary (identity normalizer, spaces as '▁')."""
    out = bytearray()
    for t, s, ty in zip(tokens, scores, types):
        piece = _len_field(1, t.encode("utf-8", errors="surrogateescape")) + _field(2, 5, struct.pack("<f", s))
        piece += _field(3, 0, _varint(ty if ty in (1, 2, 3, 4, 5, 6) else NORMAL))
        out += _len_field(1, piece)

    def idx(kind):
        return next((i for i, ty in enumerate(types) if ty == kind), -1)
    unk = idx(UNKNOWN)
    trainer = _field(3, 0, _varint({"unigram": 1, "bpe": 2}[model_type]))
    trainer += _field(35, 0, _varint(int(byte_fallback)))
    trainer += _field(40, 0, _varint(unk)) + _field(41, 0, _varint(-1)) + _field(42, 0, _varint(-1))
    trainer += _field(43, 0, _varint(-1))
    out += _len_field(2, trainer)
    norm = _len_field(1, b"identity") + _field(3, 0, _varint(int(add_dummy_prefix)))
    norm += _field(4, 0, _varint(int(remove_extra_whitespaces))) + _field(5, 0, _varint(1))
    out += _len_field(3, norm)
    return bytes(out)


def _parse_proto(data: bytes) -> list[tuple[int, int, Any]]:
    out, i, n = [], 0, len(data)

    def varint():
        nonlocal i
        r = sh = 0
        while True:
            if i >= n:
                raise ValueError("truncated sentencepiece model")
            c = data[i]
            i += 1
            r |= (c & 0x7F) << sh
            sh += 7
            if c < 0x80:
                return r
    while i < n:
        key = varint()
        num, wire = key >> 3, key & 7
        if wire == 0:
            v = varint()
        elif wire == 1:
            v, i = data[i:i + 8], i + 8
        elif wire == 2:
            ln = varint()
            v, i = data[i:i + ln], i + ln
        elif wire == 5:
            v, i = data[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} in sentencepiece model")
        out.append((num, wire, v))
    return out


def spm_metadata(model_bytes: bytes) -> dict[str, Any]:
    """GGUF tokenizer.* metadata ('llama' model) from a sentencepiece tokenizer.model."""
    tokens, scores, types = [], [], []
    add_dummy_prefix, model_type = True, 1
    for num, wire, v in _parse_proto(model_bytes):
        if num == 1 and wire == 2:
            piece, score, ty = "", 0.0, NORMAL
            for f, w, x in _parse_proto(v):
                if f == 1:
                    piece = x.decode("utf-8", errors="surrogateescape")
                elif f == 2 and w == 5:
                    score = struct.unpack("<f", x)[0]
                elif f == 3:
                    ty = x
            tokens.append(piece)
            scores.append(score)
            types.append(ty)
        elif num == 2 and wire == 2:
            for f, w, x in _parse_proto(v):
                if f == 3:
                    model_type = x
        elif num == 3 and wire == 2:
            for f, w, x in _parse_proto(v):
                if f == 3:
                    add_dummy_prefix = bool(x)
    if model_type != 2:
        # llama.cpp's "llama" tokenizer merges by scores like SentencePiece BPE; unigram models differ
        raise ValueError("only SentencePiece BPE models are supported (this one is "
                         f"{ {1: 'unigram', 3: 'word', 4: 'char'}.get(model_type, model_type) })")
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.add_space_prefix": add_dummy_prefix}
    for key, text in (("bos_token_id", "<s>"), ("eos_token_id", "</s>")):
        if text in tokens:
            meta[f"tokenizer.ggml.{key}"] = tokens.index(text)
    if UNKNOWN in types:
        meta["tokenizer.ggml.unknown_token_id"] = types.index(UNKNOWN)
    return meta


# ---- chat templates -------------------------------------------------------------------------------

def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         **kwargs) -> str:
    """Render a HF-style chat template in a Jinja sandbox (as transformers does: trim_blocks,
    lstrip_blocks, loop controls, tojson, raise_exception, strftime_now)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template error: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **kwargs)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template failed: {e}") from e


__all__ = ["Tokenizer", "BPETokenizer", "SPMTokenizer", "load_tokenizer", "load_tokenizer_dir",
           "tokenizer_metadata_from_dir", "spm_metadata", "sentencepiece_model_proto",
           "render_chat_template"]
