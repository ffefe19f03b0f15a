"""The adapter methods' names: one canonical set, and the other spellings accepted at the door.

    canonical_method("qahira")   # "qa-hira"

The canonical names are the papers' (QA-LoRA, Q-BaRA, QA-HiRA, QDyLoRA) in lower case; they are
what adapter files, run configs, reports and exports record. The short spellings (`qahira`, the
command line's historical names) are accepted wherever a user names a method — the command line,
TrainConfig, AdapterConfig — and turned into the canonical name here, so nothing past the door
ever compares two spellings. No torch here: the command line builds its parser from this.
"""
from __future__ import annotations

METHODS = ("lora", "qa-lora", "q-bara", "qa-hira", "qdylora")
ALIASES = {"qlora": "lora", "qalora": "qa-lora", "qbara": "q-bara", "qahira": "qa-hira",
           "dylora": "qdylora", "q-dylora": "qdylora"}
GROUP_CONSTANT = ("qa-lora", "qa-hira")  # updates constant on every quantization group


def canonical_method(name: str) -> str:
    """The canonical name of an adapter method, whichever spelling is given."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in METHODS:
        raise ValueError(f"unknown adapter method {name!r}; choose one of {', '.join(METHODS)} "
                         f"(also accepted: {', '.join(ALIASES)})")
    return key
