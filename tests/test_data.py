"""data.py: formats, loss masks, held-out split, bad records, batching."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lowtune import data
from lowtune.data import IGNORE, DataError, load_dataset


class CharTokenizer:
    """One token per character (id = code point + 3); 1 = BOS, 2 = EOS. ChatML-like template."""
    bos_id, eos_id = 1, 2

    def __init__(self, add_bos: bool = False, prefix_consistent: bool = True):
        self.add_bos = add_bos
        self.prefix_consistent = prefix_consistent

    def encode(self, text: str, add_bos=None, add_eos=None) -> list[int]:
        add_bos = self.add_bos if add_bos is None else add_bos
        return [1] * add_bos + [ord(c) + 3 for c in text] + [2] * bool(add_eos)

    def encode_plain(self, text: str) -> list[int]:
        return self.encode(text, add_bos=False)

    def decode(self, ids) -> str:
        return "".join(chr(i - 3) for i in ids if i > 2)

    def apply_chat_template(self, messages, add_generation_prompt=False) -> str:
        msgs = messages
        if not self.prefix_consistent:  # like templates that drop all but the last system turn
            msgs = [m for i, m in enumerate(messages) if m["role"] != "assistant" or i == len(messages) - 1]
        out = "".join(f"<{m['role']}>{m['content']}</>\n" for m in msgs)
        return out + ("<assistant>" if add_generation_prompt else "")


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def labelled_text(tok, ex) -> str:
    return tok.decode([t for t in ex.labels.tolist() if t != IGNORE])


def test_plain_text_is_packed_and_the_tail_held_out(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    p = tmp_path / "book.txt"
    p.write_text(text)
    ds = load_dataset(p, CharTokenizer(), seq_len=64, eval_fraction=0.1)
    train = np.concatenate([e.input_ids for e in ds.train])
    held = np.concatenate([e.input_ids for e in ds.eval])
    assert len(train) == 900 and len(held) == 100
    assert CharTokenizer().decode(train.tolist()) == text[:900]
    assert CharTokenizer().decode(held.tolist()) == text[900:]
    assert [len(e) for e in ds.train] == [64] * 14 + [4]
    assert all((e.labels == e.input_ids).all() for e in ds.train)
    assert ds.stats.train_tokens == 900 and ds.stats.eval_tokens == 100


def test_plain_text_with_bos_starts_every_sequence_with_it(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("x" * 100)
    ds = load_dataset(p, CharTokenizer(add_bos=True), seq_len=10, eval_fraction=0.0)
    assert all(e.input_ids[0] == 1 and e.labels[0] == IGNORE for e in ds.train)
    assert sum(len(e) - 1 for e in ds.train) == 100 and not ds.eval


def test_long_text_is_tokenized_in_pieces_at_blank_lines():
    tok = CharTokenizer()
    text = "\n\n".join("para%d " % i * 50 for i in range(200))
    assert data.tokenize_stream(text, tok, piece_chars=1000) == tok.encode_plain(text)


def test_text_records_are_packed_with_eos(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "abc"}, {"text": "de"}])
    ds = load_dataset(p, CharTokenizer(), seq_len=100, eval_fraction=0.0)
    (ex,) = ds.train
    assert ex.input_ids.tolist() == CharTokenizer().encode_plain("abc") + [2] + CharTokenizer().encode_plain("de") + [2]
    assert (ex.labels == ex.input_ids).all()


@pytest.mark.parametrize("with_input", [False, True])
def test_alpaca_loss_only_on_response(tmp_path, with_input):
    rec = {"instruction": "Add the numbers.", "output": "5"}
    if with_input:
        rec["input"] = "2 and 3"
    p = write_jsonl(tmp_path / "a.jsonl", [rec])
    tok = CharTokenizer(add_bos=True)
    (ex,) = load_dataset(p, tok, seq_len=1000, eval_fraction=0.0).train
    template = data.ALPACA_PROMPT_INPUT if with_input else data.ALPACA_PROMPT
    prompt = template.format(instruction=rec["instruction"], input=rec.get("input", ""))
    assert ex.input_ids.tolist() == [1] + tok.encode_plain(prompt + "5") + [2]
    assert ex.labels.tolist() == [IGNORE] * (1 + len(prompt)) + tok.encode_plain("5") + [2]
    assert ("### Input:\n2 and 3" in prompt) == with_input

    (ex2,) = load_dataset(p, tok, seq_len=1000, eval_fraction=0.0, train_on_prompt=True).train
    assert ex2.labels.tolist() == [IGNORE] + ex2.input_ids.tolist()[1:]


def test_chat_loss_only_on_assistant_turns(tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye?"},
            {"role": "assistant", "content": "Bye"}]
    p = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    tok = CharTokenizer()
    (ex,) = load_dataset(p, tok, seq_len=1000, eval_fraction=0.0).train
    assert tok.decode(ex.input_ids.tolist()) == tok.apply_chat_template(msgs)
    # Each assistant reply with its end-of-turn marker, nothing of the system/user turns.
    assert labelled_text(tok, ex) == "Hello</>\nBye</>\n"


def test_chat_template_that_is_not_prefix_consistent_trains_on_last_turn(tmp_path):
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    p = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    tok = CharTokenizer(prefix_consistent=False)
    (ex,) = load_dataset(p, tok, seq_len=1000, eval_fraction=0.0).train
    assert labelled_text(tok, ex) == "d</>\n"


BAD_ROWS = [
    {"instruction": "ok", "output": "fine"},
    "{not json",
    {"instruction": "no output"},
    [1, 2],
    {"messages": [{"role": "user", "content": "only a question"}]},
    {"prompt": "unknown keys"},
    {"instruction": "ok", "output": 3},
    {"text": "plain record"},
]


def test_bad_records_are_skipped_and_reported(tmp_path):
    p = write_jsonl(tmp_path / "mixed.jsonl", BAD_ROWS)
    with pytest.warns(UserWarning, match=r"skipped 6 bad record") as rec:
        ds = load_dataset(p, CharTokenizer(), seq_len=1000, eval_fraction=0.0)
    msg = str(rec[0].message)
    assert "line 2: invalid JSON" in msg and "line 3: 'output'" in msg and "--strict" in msg
    assert ds.stats.skipped == 6 and ds.stats.records == 8
    assert ds.stats.skipped_lines[0].startswith("line 2")
    assert len(ds.stats.skipped_lines) == 5  # the first five are listed
    assert len(ds.train) == 2


def test_strict_stops_at_the_first_bad_record_with_its_line(tmp_path):
    p = write_jsonl(tmp_path / "mixed.jsonl", BAD_ROWS)
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: invalid JSON"):
        load_dataset(p, CharTokenizer(), seq_len=1000, strict=True)


def test_blank_lines_are_not_bad_records(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('\n{"text": "a b"}\n\n{"text": "c d"}\n\n')
    ds = load_dataset(p, CharTokenizer(), seq_len=100, eval_fraction=0.0)
    assert ds.stats.skipped == 0 and ds.stats.records == 2


def test_json_array_is_accepted(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"instruction": "i", "output": "o"}] * 3))
    assert len(load_dataset(p, CharTokenizer(), seq_len=400, eval_fraction=0.0).train) == 3


def test_held_out_split_is_deterministic_and_disjoint(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"answer {i}"} for i in range(50)]
    p = write_jsonl(tmp_path / "a.jsonl", rows)
    tok = CharTokenizer()
    a = load_dataset(p, tok, seq_len=200, eval_fraction=0.2)
    b = load_dataset(p, tok, seq_len=200, eval_fraction=0.2)
    assert len(a.eval) == 10 and len(a.train) == 40
    key = lambda ds: sorted(labelled_text(tok, e) for e in ds.eval)
    assert key(a) == key(b)
    assert not set(key(a)) & {labelled_text(tok, e) for e in a.train}
    capped = load_dataset(p, tok, seq_len=200, eval_fraction=0.5, max_eval_records=3)
    assert len(capped.eval) == 3


def test_truncation_and_examples_without_targets(tmp_path):
    rows = [{"instruction": "x" * 20, "output": "long answer"},   # cut inside the response
            {"instruction": "y" * 100, "output": "lost"}]         # no response token left
    p = write_jsonl(tmp_path / "a.jsonl", rows)
    ds = load_dataset(p, CharTokenizer(), seq_len=len(data.ALPACA_PROMPT) + 12, eval_fraction=0.0)
    assert ds.stats.truncated == 2 and ds.stats.dropped_no_target == 1
    (ex,) = ds.train
    assert len(ex) == len(data.ALPACA_PROMPT) + 12 and ex.n_targets == 5  # "long "


def test_empty_and_missing_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found: .*nope.txt"):
        load_dataset(tmp_path / "nope.txt", CharTokenizer(), seq_len=16)
    with pytest.raises(ValueError, match="is a directory"):
        load_dataset(tmp_path, CharTokenizer(), seq_len=16)
    p = write_jsonl(tmp_path / "bad.jsonl", ["{oops"])
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no training examples"):
        load_dataset(p, CharTokenizer(), seq_len=16)


def test_non_utf8_text(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("café au lait ".encode("latin-1") * 10)
    with pytest.raises(DataError, match="not UTF-8"):
        load_dataset(p, CharTokenizer(), seq_len=16, strict=True)
    with pytest.warns(UserWarning, match="not valid UTF-8"):
        load_dataset(p, CharTokenizer(), seq_len=16)


def test_binary_data_is_refused_unless_allowed(tmp_path):
    p = tmp_path / "noise.txt"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match=r"does not look like text: \d+% .*--allow-binary"):
        load_dataset(p, CharTokenizer(), seq_len=16)
    with pytest.warns(UserWarning, match="not valid UTF-8"):
        assert load_dataset(p, CharTokenizer(), seq_len=16, allow_binary=True).train
    # valid UTF-8 that is mostly control characters (UTF-16 text read as bytes, say) is no text either
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes(("plain words " * 50).encode("utf-16-le"))
    with pytest.raises(DataError, match="does not look like text"):
        load_dataset(utf16, CharTokenizer(), seq_len=16)
    assert data.not_text_share("tabs\tand\nnewlines\r\n are text") == 0.0


def test_text_too_short_for_one_sequence_is_refused(tmp_path):
    p = tmp_path / "tiny.txt"
    p.write_text("hello world")                       # 11 tokens, 1 of them held out
    with pytest.raises(DataError, match=r"11 tokens \(1 of them held out\), too few to fill one "
                                        r"training sequence of 16; .*--seq-len"):
        load_dataset(p, CharTokenizer(), seq_len=16)
    assert len(load_dataset(p, CharTokenizer(), seq_len=10).train) == 1   # 10 training tokens fill one
    with pytest.raises(DataError, match="0 tokens, too few"):
        (tmp_path / "empty.txt").write_text("")
        load_dataset(tmp_path / "empty.txt", CharTokenizer(), seq_len=4)


def test_epoch_order_and_micro_batches():
    a = data.epoch_order(10, seed=3, epoch=0)
    assert sorted(a.tolist()) == list(range(10))
    assert (a == data.epoch_order(10, 3, 0)).all() and not (a == data.epoch_order(10, 3, 1)).all()
    assert data.micro_batches_per_epoch(10, 4) == 3
    epoch, idx = data.micro_batch_indices(10, 4, seed=3, index=2)
    assert epoch == 0 and idx.tolist() == a[8:10].tolist()
    epoch, idx = data.micro_batch_indices(10, 4, seed=3, index=3)
    assert epoch == 1 and idx.tolist() == data.epoch_order(10, 3, 1)[:4].tolist()


def test_collate_right_pads_with_ignored_labels():
    ex = [data.Example(np.array([5, 6, 7]), np.array([IGNORE, 6, 7])),
          data.Example(np.array([8]), np.array([8]))]
    ids, labels = data.collate(ex, pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert labels.tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert data.count_targets(labels) == 2
    assert ids.dtype == torch.long


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path):
    from lowtune.gguf_io import GGUFFile
    from lowtune.tokenizer import load_tokenizer
    with GGUFFile(smollm2_path) as f:
        return load_tokenizer(dict(f.metadata))


def test_chat_records_with_the_real_chat_template(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    msgs = [{"role": "user", "content": "Who wrote Botchan?"},
            {"role": "assistant", "content": "Natsume Soseki."},
            {"role": "user", "content": "When?"}, {"role": "assistant", "content": "In 1906."}]
    p = write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}])
    (ex,) = load_dataset(p, tok, seq_len=512, eval_fraction=0.0).train
    whole = tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert ex.input_ids.tolist() == tok.encode(whole, add_bos=False)
    assert tok.decode([t for t in ex.labels.tolist() if t != IGNORE]) == \
        "Natsume Soseki.<|im_end|>\nIn 1906.<|im_end|>\n"


def test_botchan_split_with_the_real_tokenizer(tmp_path, smollm2_tokenizer, botchan_text):
    p = tmp_path / "botchan.txt"
    p.write_text(botchan_text)
    ds = load_dataset(p, smollm2_tokenizer, seq_len=256, eval_fraction=0.1)
    n = ds.stats.train_tokens + ds.stats.eval_tokens
    assert ds.stats.eval_tokens == round(0.1 * n)
    held = smollm2_tokenizer.decode(np.concatenate([e.input_ids for e in ds.eval]).tolist())
    assert botchan_text.endswith(held) and len(held) > 0.08 * len(botchan_text)
