"""Training data: files -> tokenized examples with loss masks, a held-out split, batches.

Accepted files (chosen by extension; `.jsonl`/`.json` are records, anything else is plain text):
- plain text: tokenized as one stream and packed into sequences of `seq_len` tokens; the last
  `eval_fraction` of the tokens is the held-out split. Loss on every token.
- JSONL (or a JSON array) of records, each one of
  - `{"text": ...}`: concatenated (EOS between records) and packed like plain text;
  - Alpaca `{"instruction", "input" (optional), "output"}`: the standard Alpaca prompt;
  - chat `{"messages": [{"role", "content"}, ...]}`: rendered with the model's chat template.
  Instruction and chat records are one example each (truncated to `seq_len`), with loss only on
  the responses unless `train_on_prompt`. The held-out split is a fixed-seed random
  `eval_fraction` of the records (at most `max_eval_records`), the same for every training seed.
Bad records are skipped and counted (the first line numbers are reported); `strict=True` stops
at the first one with its line number instead. A file that is not text (more than
MAX_NOT_TEXT of its characters undecodable or control bytes) is refused unless `allow_binary`;
a plain text too short to fill one training sequence is refused.

An example is `input_ids[T]` with `labels[T]` (-100 where no loss is taken); the model shifts
labels itself (labels[t] is the target of the prediction made at position t-1).
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch

from .paths import check_input_file
from .progress import plural

IGNORE = -100
RECORD_SUFFIXES = (".jsonl", ".json")
SPLIT_SEED = 1234  # the held-out split does not depend on the training seed
# Share of undecodable bytes and control characters above which a file is not taken for text:
# random bytes give about 60%, Latin-1 prose read as UTF-8 a few percent.
MAX_NOT_TEXT = 0.10
_NOT_TEXT = "".join(chr(c) for c in range(32) if chr(c) not in "\t\n\r\f\v") + "\x7f\ufffd"
_KEEP_TEXT = str.maketrans("", "", _NOT_TEXT)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


class Tokenizer(Protocol):
    """What data.py needs from a tokenizer (lowtune.tokenizer provides it)."""
    eos_id: int
    bos_id: int | None

    add_bos: bool  # the model expects BOS at the start of a sequence

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str: ...


class DataError(ValueError):
    """The training data cannot be used as given; the message says where and why."""


@dataclass
class Example:
    input_ids: np.ndarray  # int64 [T]
    labels: np.ndarray     # int64 [T], IGNORE where no loss

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        """Tokens that carry loss (the first position predicts nothing)."""
        return int((self.labels[1:] != IGNORE).sum())


@dataclass
class DataStats:
    kind: str = "text"           # "text" or "records"
    records: int = 0             # records read (records files only)
    skipped: int = 0             # bad records skipped
    skipped_lines: list[str] = field(default_factory=list)  # "line 7: why", the first few
    truncated: int = 0           # examples cut at seq_len
    dropped_no_target: int = 0   # examples with no response token left within seq_len
    train_tokens: int = 0
    eval_tokens: int = 0

    def summary(self) -> str:
        parts = [f"{self.train_tokens} training tokens, {self.eval_tokens} held-out tokens"]
        if self.kind == "records":
            parts.insert(0, f"{self.records} records")
        if self.truncated:
            parts.append(f"{self.truncated} examples truncated to --seq-len")
        if self.dropped_no_target:
            parts.append(f"{self.dropped_no_target} dropped (no response token within --seq-len)")
        if self.skipped:
            parts.append(f"{self.skipped} bad records skipped ({'; '.join(self.skipped_lines)}"
                         f"{'; ...' if self.skipped > len(self.skipped_lines) else ''})")
        return ", ".join(parts)


@dataclass
class Dataset:
    train: list[Example]
    eval: list[Example]
    stats: DataStats


# ---------------------------------------------------------------------------------------------
# Loading

def load_dataset(path: str | Path, tokenizer: Tokenizer, seq_len: int, *,
                 train_on_prompt: bool = False, eval_fraction: float = 0.1,
                 max_eval_records: int = 1000, strict: bool = False,
                 allow_binary: bool = False) -> Dataset:
    """Read `path` and return its tokenized train and held-out examples (see the module doc)."""
    path = Path(path)
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    check_input_file(path, "data file")
    text = _read_text(path, strict, allow_binary)
    if path.suffix.lower() in RECORD_SUFFIXES:
        ds = _load_records(path, text, tokenizer, seq_len, train_on_prompt, eval_fraction,
                           max_eval_records, strict)
    else:
        ds = _load_text(path, text, tokenizer, seq_len, eval_fraction)
    if not ds.train:
        raise DataError(f"{path} gave no training examples ({ds.stats.summary()})")
    ds.stats.train_tokens = sum(len(e) for e in ds.train)
    ds.stats.eval_tokens = sum(len(e) for e in ds.eval)
    return ds


def not_text_share(text: str) -> float:
    """The share of `text` that is control characters (other than whitespace) or U+FFFD (what
    undecodable bytes became)."""
    return 1.0 - len(text.translate(_KEEP_TEXT)) / len(text) if text else 0.0


def _read_text(path: Path, strict: bool, allow_binary: bool) -> str:
    raw = path.read_bytes()
    try:
        text, undecodable = raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        if strict:
            raise DataError(f"{path} is not UTF-8 (byte {e.start}): re-encode it as UTF-8") from e
        text, undecodable = raw.decode("utf-8", errors="replace"), e
    share = not_text_share(text)
    if share > MAX_NOT_TEXT and not allow_binary:
        raise DataError(f"{path} does not look like text: {share:.0%} of it is undecodable bytes or control "
                        "characters; give UTF-8 text, JSONL or JSON (re-encode text in another encoding, "
                        "e.g. with iconv), or pass --allow-binary to train on it as it is")
    if undecodable is not None:
        warnings.warn(f"{path} is not valid UTF-8; undecodable bytes were replaced", stacklevel=3)
    return text


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of `text` alone: data.py places BOS and EOS itself."""
    return list(tokenizer.encode(text, add_bos=False, add_eos=False))


def wants_bos(tokenizer) -> bool:
    """Whether sequences start with the tokenizer's BOS (it asks for one and has one)."""
    return bool(getattr(tokenizer, "add_bos", False)) and getattr(tokenizer, "bos_id", None) is not None


def tokenize_stream(text: str, tokenizer: Tokenizer, piece_chars: int = 1 << 20) -> list[int]:
    """Tokenize a long text in pieces of about `piece_chars`, cut after a blank line so that no
    token straddles a cut."""
    ids: list[int] = []
    start = 0
    while start < len(text):
        end = len(text) if len(text) - start <= piece_chars else text.find("\n\n", start + piece_chars)
        end = len(text) if end < 0 else end + 2
        ids.extend(encode(tokenizer, text[start:end]))
        start = end
    return ids


def pack(ids: Sequence[int], seq_len: int, bos_id: int | None = None) -> list[Example]:
    """Cut a token stream into examples of `seq_len` tokens (the last may be shorter), each
    starting with `bos_id` when given. Loss on every token."""
    body = seq_len - (bos_id is not None)
    out = []
    for start in range(0, len(ids), body):
        chunk = list(ids[start:start + body])
        if bos_id is not None:
            chunk = [bos_id] + chunk
        if len(chunk) < 2:
            continue
        arr = np.asarray(chunk, dtype=np.int64)
        labels = arr.copy()
        if bos_id is not None:
            labels[0] = IGNORE
        out.append(Example(arr, labels))
    return out


def _load_text(path: Path, text: str, tokenizer, seq_len: int, eval_fraction: float) -> Dataset:
    ids = tokenize_stream(text, tokenizer)
    cut = len(ids) - int(round(len(ids) * eval_fraction))
    bos = tokenizer.bos_id if wants_bos(tokenizer) else None
    if cut < seq_len - (bos is not None):
        held = f" ({len(ids) - cut} of them held out)" if cut < len(ids) else ""
        raise DataError(f"{path} has {plural(len(ids), 'token')}{held}, too few to fill one training "
                        f"sequence of {seq_len}; give more text or a smaller --seq-len")
    return Dataset(pack(ids[:cut], seq_len, bos), pack(ids[cut:], seq_len, bos), DataStats("text"))


def _iter_records(path: Path, text: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every record of a JSONL file or JSON array (`text`, the
    file's); undecodable lines come back as (line, DataError) so the caller counts them with the
    other bad records."""
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
        for i, v in enumerate(values):
            yield i + 1, v  # for a JSON array the "line" is the record's index, 1-based
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, DataError(f"invalid JSON ({e.msg})")


def _check_str(rec: dict, key: str, required: bool = True) -> str:
    v = rec.get(key)
    if v is None and not required:
        return ""
    if not isinstance(v, str):
        raise DataError(f"'{key}' must be a string, got {type(v).__name__}")
    if required and not v.strip():
        raise DataError(f"'{key}' is empty")
    return v


def alpaca_segments(rec: dict) -> list[tuple[str, bool]]:
    """[(prompt, False), (response, True)] for an Alpaca record (EOS is added by the caller)."""
    instruction = _check_str(rec, "instruction")
    output = _check_str(rec, "output")
    inp = _check_str(rec, "input", required=False)
    template = ALPACA_PROMPT_INPUT if inp.strip() else ALPACA_PROMPT
    return [(template.format(instruction=instruction, input=inp), False), (output, True)]


def chat_segments(messages: object, tokenizer: Tokenizer) -> list[tuple[str, bool]]:
    """Render a conversation with the model's chat template and split the text into
    [(text, is_response)] pieces: each assistant turn (with its end-of-turn marker) is a response.
    Works by rendering growing prefixes; a template whose renderings are not prefixes of each
    other (some hide earlier turns) falls back to training on the last assistant turn only."""
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise DataError(f"messages[{i}] must be an object with string 'role' and 'content'")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m["content"].strip()]
    if not turns:
        raise DataError("the conversation has no non-empty assistant message")
    render = tokenizer.apply_chat_template

    segments: list[tuple[str, bool]] = []
    done = ""
    for i in turns:
        prompt = render(messages[:i], add_generation_prompt=True)
        full = render(messages[:i + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            break
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    else:
        whole = render(messages, add_generation_prompt=False)
        if whole.startswith(done):
            segments.append((whole[len(done):], False))
            return [s for s in segments if s[0]]
    # Fallback: the last assistant turn only.
    last = turns[-1]
    prompt = render(messages[:last], add_generation_prompt=True)
    full = render(messages[:last + 1], add_generation_prompt=False)
    if not full.startswith(prompt):
        raise DataError("the model's chat template does not render the conversation so that the "
                        "assistant's reply can be located; use Alpaca or text records instead")
    return [(prompt, False), (full[len(prompt):], True)]


def encode_segments(segments: Iterable[tuple[str, bool]], tokenizer: Tokenizer, *, bos: bool,
                    eos: bool, train_on_prompt: bool) -> Example:
    """Tokenize each piece separately and concatenate; labels are IGNORE on prompt pieces."""
    ids: list[int] = []
    mask: list[bool] = []
    if bos:
        ids.append(tokenizer.bos_id)
        mask.append(False)
    for text, is_response in segments:
        t = encode(tokenizer, text)
        ids += t
        mask += [is_response or train_on_prompt] * len(t)
    if eos:
        ids.append(tokenizer.eos_id)
        mask.append(True)
    arr = np.asarray(ids, dtype=np.int64)
    return Example(arr, np.where(np.asarray(mask, dtype=bool), arr, IGNORE))


def _load_records(path: Path, text: str, tokenizer, seq_len: int, train_on_prompt: bool, eval_fraction: float,
                  max_eval_records: int, strict: bool) -> Dataset:
    stats = DataStats("records")
    texts: list[str] = []            # {"text"} records, packed afterwards
    examples: list[Example] = []     # one per instruction/chat record
    kinds: list[str] = []            # per kept record, to split each kind the same way
    order: list[int] = []            # index into texts or examples, by record
    bad_limit = 5

    def bad(lineno: int, why: str) -> None:
        if strict:
            raise DataError(f"{path}:{lineno}: {why} (without --strict such records are skipped)")
        stats.skipped += 1
        if len(stats.skipped_lines) < bad_limit:
            stats.skipped_lines.append(f"line {lineno}: {why}")

    bos = wants_bos(tokenizer)
    for lineno, rec in _iter_records(path, text):
        stats.records += 1
        if isinstance(rec, DataError):
            bad(lineno, str(rec))
            continue
        if not isinstance(rec, dict):
            bad(lineno, f"a record must be a JSON object, got {type(rec).__name__}")
            continue
        try:
            if "messages" in rec:
                ex = encode_segments(chat_segments(rec["messages"], tokenizer), tokenizer,
                                     bos=False, eos=False, train_on_prompt=train_on_prompt)
            elif "instruction" in rec or "output" in rec:
                ex = encode_segments(alpaca_segments(rec), tokenizer, bos=bos, eos=True,
                                     train_on_prompt=train_on_prompt)
            elif "text" in rec:
                texts.append(_check_str(rec, "text"))
                kinds.append("text")
                order.append(len(texts) - 1)
                continue
            else:
                raise DataError("a record needs 'text', 'instruction'+'output' or 'messages' "
                                f"(found keys: {', '.join(sorted(rec)) or 'none'})")
        except DataError as e:
            bad(lineno, str(e))
            continue
        if len(ex) > seq_len:
            stats.truncated += 1
            ex = Example(ex.input_ids[:seq_len], ex.labels[:seq_len])
        if ex.n_targets == 0:
            stats.dropped_no_target += 1
            continue
        examples.append(ex)
        kinds.append("example")
        order.append(len(examples) - 1)

    if stats.skipped:
        warnings.warn(f"{path}: skipped {stats.skipped} bad record(s): "
                      f"{'; '.join(stats.skipped_lines)}"
                      f"{'; ...' if stats.skipped > bad_limit else ''}. "
                      "Pass --strict to stop at the first bad record instead.", stacklevel=3)

    n = len(order)
    n_eval = min(max_eval_records, int(round(n * eval_fraction))) if n >= 2 else 0
    if eval_fraction > 0 and n >= 2:
        n_eval = max(1, n_eval)
    held_out = set(np.random.default_rng(SPLIT_SEED).permutation(n)[:n_eval].tolist())
    train_ex, eval_ex, train_txt, eval_txt = [], [], [], []
    for r, (kind, idx) in enumerate(zip(kinds, order)):
        if kind == "text":
            (eval_txt if r in held_out else train_txt).append(texts[idx])
        else:
            (eval_ex if r in held_out else train_ex).append(examples[idx])

    bos_id = tokenizer.bos_id if bos else None
    for txts, dest in ((train_txt, train_ex), (eval_txt, eval_ex)):
        if txts:
            stream: list[int] = []
            for t in txts:
                stream += encode(tokenizer, t) + [tokenizer.eos_id]
            dest += pack(stream, seq_len, bos_id)
    return Dataset(train_ex, eval_ex, stats)


# ---------------------------------------------------------------------------------------------
# Batching

def micro_batches_per_epoch(n_examples: int, batch: int) -> int:
    return math.ceil(n_examples / batch)


def epoch_order(n_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled example order of one epoch: a function of (seed, epoch) only, so a resumed
    run sees exactly the batches the interrupted one would have."""
    return np.random.default_rng([seed, epoch]).permutation(n_examples)


def micro_batch_indices(n_examples: int, batch: int, seed: int, index: int) -> tuple[int, np.ndarray]:
    """(epoch, example indices) of global micro-batch number `index` (0-based)."""
    per_epoch = micro_batches_per_epoch(n_examples, batch)
    epoch, j = divmod(index, per_epoch)
    return epoch, epoch_order(n_examples, seed, epoch)[j * batch:(j + 1) * batch]


def first_tokens(examples: list, n: int) -> list:
    """The leading examples holding at most n tokens in all (the last one cut to fit)."""
    out, left = [], n
    for e in examples:
        if left < 2:
            break
        if len(e) > left:
            e = type(e)(e.input_ids[:left], e.labels[:left])
        out.append(e)
        left -= len(e)
    return out


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: input_ids [B, T] (pad_id) and labels [B, T] (IGNORE).
    Causal attention never lets real tokens see the padding after them."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e)] = torch.from_numpy(e.input_ids)
        labels[i, :len(e)] = torch.from_numpy(e.labels)
    return ids, labels


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that carry loss in a batch of labels [B, T] (labels are shifted by the model)."""
    return int((labels[:, 1:] != IGNORE).sum())
