"""Every family's metadata reader under broken metadata: a file whose `<arch>.*` keys are deleted, 0, negative,
absurdly large, a string where a number belongs or an array one layer short either loads (what the format allows:
then a few tokens run through it) or is refused with a ValueError that names the key or the tensor that disagrees
with it; never another exception, a hang or a huge allocation.

Each family's file is random_family_model's (its GGUF metadata and its weights as build_model reads them), loaded
the way build_model loads a file (ModelConfig.from_gguf_metadata, then the family's class, which checks every
weight against the config), in memory; one test writes the file and reads it with load_model. Every mutation of
every key of every family runs (about 7000 loads, seconds in all).
"""
from __future__ import annotations

import contextlib
import functools
import signal
from unittest import mock

import pytest
import torch
from gguf.constants import GGUFValueType

from family_models import rand_ids, random_family_model
from lowtune import loading
from lowtune.families import FAMILIES
from lowtune.gguf_io import write_gguf
from lowtune.loading import load_model
from lowtune.model import ModelConfig

ARCHS = tuple(FAMILIES)
HUGE = 2 ** 40  # (a size no file holds: an allocation of it fails at once, a loop over it never ends)
MUTATIONS = ("delete", "zero", "negative", "huge", "string", "short")
SECONDS = 20  # a load and a forward of the tiny model take well under a second


@functools.lru_cache(maxsize=None)
def family_file(arch: str) -> tuple[dict, dict]:
    """(metadata, weights) of random_family_model(arch): the weights its class was given, as a file's."""
    seen = {}
    real = loading.model_class

    def recording(config):
        cls = real(config)

        class Recorded(cls):
            def __init__(self, config, weights, dtype):
                seen["weights"] = dict(weights)
                super().__init__(config, weights, dtype)
        return Recorded

    with mock.patch.object(loading, "model_class", recording):
        model = random_family_model(arch)
    return dict(model.metadata), seen["weights"]


def load(md: dict, weights: dict):
    """The model a file of this metadata and these weights holds, as build_model makes it."""
    config = ModelConfig.from_gguf_metadata(md, weights)
    return loading.model_class(config)(config, dict(weights), torch.float32).eval()


def mutated(md: dict, key: str, mutation: str) -> dict | None:
    """md with `key` broken by `mutation`, or None where the mutation does not apply to its value."""
    value, out = md[key], dict(md)
    if mutation == "delete":
        del out[key]
    elif mutation == "short":
        if not isinstance(value, (list, tuple)) or not value:
            return None
        out[key] = list(value)[:-1]
    elif isinstance(value, str) and mutation != "string":
        return None  # (a number where a string belongs reads as the string it is not: rope.scaling.type)
    else:
        out[key] = {"zero": 0, "negative": -1, "huge": HUGE, "string": "x"}[mutation]
    return out


def cases(arch: str) -> list[tuple[str, str]]:
    """(key, mutation) pairs run for `arch`: every mutation of every key the family's file holds (its own, and
    xIELU's, which carry no architecture prefix)."""
    md, _ = family_file(arch)
    return [(key, m) for key in md if key.startswith((f"{arch}.", "xielu.")) for m in MUTATIONS]


@contextlib.contextmanager
def deadline(seconds: int, what: str):
    """TimeoutError where the body runs longer than `seconds` (a loop over an absurd size)."""
    def expire(*_):
        raise TimeoutError(f"{what} ran past {seconds} s")
    before = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def names_the_problem(message: str, key: str) -> bool:
    """Whether a refusal names the broken key (whole, or its last part as a message about related keys names
    them: `head_count_kv`) or a tensor whose shape or presence disagrees with the metadata (the loader's check of
    each size against the tensors)."""
    return key.rsplit(".", 1)[-1] in message or "tensor" in message


@pytest.mark.parametrize("arch", ARCHS)
def test_broken_metadata_loads_or_is_refused_clearly(arch):
    md, weights = family_file(arch)
    ids = rand_ids(1, 4)
    with torch.no_grad():  # (the file as written loads: each refusal below is the broken key's)
        assert load(md, weights)(ids).shape[:2] == ids.shape
    unclear, raw, ran = [], [], 0
    for key, mutation in cases(arch):
        broken = mutated(md, key, mutation)
        if broken is None:
            continue
        ran += 1
        try:
            with deadline(SECONDS, f"{arch} {key} {mutation}"), torch.no_grad():
                logits = load(broken, weights)(ids)
            assert logits.shape[:2] == ids.shape
        except ValueError as e:
            if not names_the_problem(str(e), key):
                unclear.append(f"{key} {mutation}: {e}")
        except Exception as e:  # noqa: BLE001 (the failure this test looks for)
            raw.append(f"{key} {mutation}: {type(e).__name__}: {e}")
    assert ran >= 2
    assert not raw, f"{arch}: raw exceptions under broken metadata:\n" + "\n".join(raw)
    assert not unclear, f"{arch}: refusals that name neither the key nor a tensor:\n" + "\n".join(unclear)


def test_every_core_size_of_zero_or_text_is_refused_by_name():
    """A count of 0 where the model needs one, and a string where a number belongs, are refused naming the key
    (not found later as a tensor of the wrong shape)."""
    md, weights = family_file("llama")
    for key in ("llama.block_count", "llama.embedding_length", "llama.attention.head_count",
                "llama.attention.head_count_kv", "llama.attention.key_length", "llama.vocab_size"):
        for value in (0, "x", -1, 1.5):
            with pytest.raises(ValueError, match=key.replace(".", r"\.")):
                load({**md, key: value}, weights)
    with pytest.raises(ValueError, match=r"llama\.block_count is 513"):
        load({**md, "llama.block_count": 513}, weights)


def test_a_file_of_broken_metadata_is_refused_by_name_through_load_model(tmp_path):
    """The same refusals through the one way in: a GGUF file written with a string for a count, or a count of
    layers no file holds, read by load_model."""
    md, weights = family_file("llama")
    path = tmp_path / "llama.gguf"
    write_gguf(path, md, list(weights.items()))
    assert load_model(path)(rand_ids(1, 4)).shape[:2] == (1, 4)
    for key, value, value_type in (("llama.attention.head_count", "x", GGUFValueType.STRING),
                                   ("llama.block_count", HUGE, GGUFValueType.UINT64),
                                   ("llama.attention.head_count_kv", 0, GGUFValueType.UINT32)):
        write_gguf(path, {**md, key: value}, list(weights.items()), metadata_types={key: value_type})
        with deadline(SECONDS, f"load_model with {key} = {value!r}"), \
                pytest.raises(ValueError, match=key.replace(".", r"\.") + ".*convert_hf_to_gguf"):
            load_model(path)
