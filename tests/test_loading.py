"""loading.py, the one way in: every command opens its model through it; a 1-D tensor is read as
fp32 and a matrix stays packed; the base check refuses another base unless forced, and says why;
HF directories are quantized on load; the device and dtype choices."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from lowtune import cli, loading
from lowtune.adapters import ADAPTER_CONFIG, AdapterConfig, adapters_of, apply_adapters, save_adapter
from lowtune.gguf_io import GGUFFile, write_gguf
from lowtune.loading import (BaseMismatchError, describe, load, load_model, open_base, pick_device,
                             read_weights)
from lowtune.qtensor import QTensor
from lowtune.recipes import LOGICAL_TYPES_KEY

from helpers import TINY_VOCAB, write_tiny_llama_gguf, write_tiny_llama_hf


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("bases")
    return {"a": write_tiny_llama_gguf(d / "a.gguf", "Q4_1", seed=0),
            "b": write_tiny_llama_gguf(d / "b.gguf", "Q4_1", seed=1)}


def saved_adapter(base, out, method="lora"):
    model = load_model(base)
    ads = apply_adapters(model, AdapterConfig(method=method, rank=4))
    with torch.no_grad():
        for ad in ads.values():
            (ad.hira_M if method == "qa-hira" else ad.lora_B).normal_(0, 0.02)
    save_adapter(model, out)
    return model


def test_one_dimension_is_fp32_and_a_matrix_stays_packed(tmp_path):
    """The rule holds for every 1-D tensor, whatever it is and however it is stored."""
    src = write_tiny_llama_gguf(tmp_path / "a.gguf", "Q8_0", layers=1)
    with GGUFFile(src) as f:
        md, types = dict(f.metadata), dict(f.metadata_types)
        tensors = [(n, f.qtensor(n) if len(ti.shape) == 2 else f.tensor(n).to(torch.float16))
                   for n, ti in f.tensor_infos.items()]
    tensors.append(("blk.0.attn_q.bias", torch.linspace(-1, 1, 64).to(torch.bfloat16)))  # a bias, in BF16
    write_gguf(tmp_path / "b.gguf", md, tensors, types)
    with GGUFFile(tmp_path / "b.gguf") as f:
        assert f.tensor_infos["blk.0.attn_norm.weight"].type_name == "F16"
        weights, kinds = read_weights(f)
    for name, w in weights.items():
        if name.endswith("_norm.weight") or name.endswith(".bias"):
            assert isinstance(w, torch.Tensor) and w.dtype == torch.float32 and w.dim() == 1, name
        else:
            assert isinstance(w, QTensor) and w.type == "Q8_0", name
    assert kinds["blk.0.attn_q.bias"] == "BF16"
    torch.testing.assert_close(weights["blk.0.attn_q.bias"], torch.linspace(-1, 1, 64).to(torch.bfloat16).float())
    model = load_model(tmp_path / "b.gguf")   # a tensor the model does not use is no error
    assert model.tensor_types["token_embd.weight"] == "Q8_0"


def test_every_command_loads_through_loading(bases, tmp_path, monkeypatch, capsys, botchan_text):
    opened = []
    real = loading.open_gguf
    monkeypatch.setattr(loading, "open_gguf", lambda path: opened.append(str(path)) or real(path))
    a = str(bases["a"])
    text = tmp_path / "t.txt"
    text.write_text(botchan_text[:1500])
    saved_adapter(bases["a"], tmp_path / "run" / "adapter")
    commands = {
        "info": ["info", a],
        "eval": ["eval", a, "--text", text, "--ctx", "32", "--chunks", "1", "--quiet"],
        "generate": ["generate", a, "--prompt", "the", "-n", "2", "--adapter", tmp_path / "run"],
        "quantize": ["quantize", a, "--type", "Q8_0", "-o", tmp_path / "q.gguf", "-q"],
        "export": ["export", a, "--adapter", tmp_path / "run", "-o", tmp_path / "m.gguf", "--quiet"],
        "finetune": ["finetune", a, "--data", text, "--steps", "1", "--seq-len", "32", "--batch", "1",
                     "--eval-every", "0", "--eval-fraction", "0", "--device", "cpu", "-o", tmp_path / "ft"],
        "correct": ["correct", a, "--teacher", a, "--text", text, "--steps", "1", "--seq-len", "32",
                    "--batch", "1", "--eval-fraction", "0.2", "--eval-tokens", "32", "--rank", "2",
                    "--device", "cpu", "-o", tmp_path / "lrec"],
    }
    for name, argv in commands.items():
        opened.clear()
        assert cli.main([str(x) for x in argv]) == 0, (name, capsys.readouterr().err)
        assert a in opened, name
    capsys.readouterr()


def test_an_adapter_goes_only_on_its_own_base(bases, tmp_path, caplog):
    ids = torch.randint(0, TINY_VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    want = saved_adapter(bases["a"], tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(load_model(bases["a"], adapter=tmp_path / "ad")(ids), want(ids))
    with pytest.raises(BaseMismatchError) as e:
        load_model(bases["b"], adapter=tmp_path / "ad")
    msg = str(e.value)   # why, and what to do
    assert "trained on base" in msg and "b.gguf" in msg and "pass the model it was trained on" in msg
    assert "--force" in msg
    with caplog.at_level(logging.WARNING, logger="lowtune"):
        forced = load_model(bases["b"], adapter=tmp_path / "ad", force=True)
    assert adapters_of(forced) and "used anyway (--force)" in caplog.text
    # an adapter that records no base cannot be checked: a warning, and its shapes are checked
    meta = json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())
    meta["base_hash"] = None
    (tmp_path / "ad" / ADAPTER_CONFIG).write_text(json.dumps(meta))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowtune"):
        load_model(bases["b"], adapter=tmp_path / "ad")
    assert "records no base hash" in caplog.text


def test_cli_force_and_its_old_name(bases, tmp_path, capsys):
    saved_adapter(bases["a"], tmp_path / "ad")
    b = str(bases["b"])
    argv = ["generate", b, "--prompt", "the", "-n", "1", "--adapter", str(tmp_path / "ad")]
    assert cli.main(argv) == 1
    assert "lowtune: error: the adapter in" in capsys.readouterr().err
    assert cli.main(argv + ["--force"]) == 0
    assert cli.main(argv + ["--ignore-base-hash"]) == 0


def test_hf_directory_is_quantized_on_load(tmp_path, botchan_text):
    d = tmp_path / "hf"
    write_tiny_llama_hf(d, botchan_text[:20000], hidden=256)
    model, tok = load(d)
    assert model.tensor_types["blk.0.attn_q.weight"] == "Q4_K" and model.tensor_types["blk.0.ffn_down.weight"] == "Q4_1"
    assert model.tensor_types["blk.0.attn_norm.weight"] == "F32" and tok.vocab_size == model.config.vocab_size
    assert load_model(d, qtype="Q8_0").tensor_types["blk.0.ffn_down.weight"] == "Q8_0"
    with pytest.raises(ValueError, match="--type applies to safetensors"):
        load_model(write_tiny_llama_gguf(tmp_path / "x.gguf"), qtype="Q4_0")
    info = describe(d)
    assert info["config"]["dim"] == 256 and info["tensor_types"]["BF16"]["tensors"] == 2 * 7 + 2


def test_an_int_base_is_exported_with_its_logical_types(tmp_path, botchan_text):
    """An HF directory quantized to INT4-g64 for training: the merged export stores those tensors
    as Q4_1, records them as INT4-g64, and loads back as INT4-g64 (exactly the trained-on blocks)."""
    from lowtune.export import export_merged_gguf
    d = tmp_path / "hf"
    write_tiny_llama_hf(d, botchan_text[:20000])
    with open_base(d, "INT4-g64") as src:
        assert src.tensor_infos["blk.0.attn_q.weight"].type_name == "INT4-g64"
    model = load_model(d, qtype="INT4-g64")
    apply_adapters(model, AdapterConfig(method="qa-hira"))
    save_adapter(model, tmp_path / "ad")
    export_merged_gguf(d, tmp_path / "ad", tmp_path / "m.gguf", base_type="INT4-g64")
    with GGUFFile(tmp_path / "m.gguf") as f:
        assert f.tensor_infos["blk.0.attn_q.weight"].type_name == "Q4_1"
        logical = dict(e.split("=") for e in f.metadata[LOGICAL_TYPES_KEY])
    assert logical["blk.0.attn_q.weight"] == "INT4-g64"
    back = load_model(tmp_path / "m.gguf", restore_int_types=True)
    assert back.tensor_types["blk.0.attn_q.weight"] == "INT4-g64"


def test_devices_and_dtypes():
    assert pick_device("cpu") == torch.device("cpu") and pick_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="unknown --device 'tpu'"):
        pick_device("tpu")
    assert loading.activation_dtype(torch.device("cpu")) == torch.float32
    assert loading.activation_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    assert loading.activation_dtype(torch.device("cuda")) == torch.bfloat16
