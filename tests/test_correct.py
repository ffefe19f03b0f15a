"""correct.py (LREC): the chunked KL + CE head against plain torch, the distillation gradient,
a short correction on a tiny random Llama that lowers KL(teacher ‖ student) on held-out text,
the report, resume, and the frozen base adapter under a second trainable one
(`lowtune finetune --base-adapter`)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lowtune import cli, ops
from lowtune.adapters import AdapterConfig, adapter_parameters, adapters_of, apply_adapters, save_adapter
from lowtune.correct import DistillationModel, distill_loss, reference_distill_loss
from lowtune.frozen_adapter import FrozenAdaptedLinear, frozen_adapters_of
from lowtune.loading import BaseMismatchError, attach_base_adapter, load_model
from lowtune.quantize_model import quantize_model
from lowtune.rundir import read_metrics

from helpers import TINY_VOCAB, write_tiny_llama_gguf


def tiny_llama_gguf(path, layers: int = 2, seed: int = 0, **kw):
    """An F32 teacher: rows of 64 (no K-quant fits) and 256 (ffn)."""
    return write_tiny_llama_gguf(path, "F32", layers=layers, ffn=256, seed=seed, **kw)


class _Head:
    """A stand-in model for distill_loss: a packed LM head (logits divided by `scale`, as
    Granite's, and soft-capped by `cap`, as Gemma's) and nothing else."""

    def __init__(self, qt, cap: float = 0.0, scale: float = 1.0):
        self.qt, self.output = qt, None
        self.device, self.dtype = qt.device, torch.float32
        self.config = SimpleNamespace(final_softcap=cap, logit_scale=scale)

    def head_weight(self):
        return self.qt

    def lm_head(self, h):
        z = ops.qmatmul(h.contiguous(), self.qt) / self.config.logit_scale
        return torch.tanh(z / self.config.final_softcap) * self.config.final_softcap if self.config.final_softcap else z


@pytest.mark.parametrize("head_type,cap,scale", [("F32", 0.0, 1.0), ("Q4_1", 0.0, 1.0), ("Q8_0", 0.0, 1.0),
                                                 ("Q4_1", 2.0, 1.0), ("Q4_1", 0.0, 4.0)])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_kl_equals_unchunked(head_type, cap, scale, chunk, rng):
    n, d, v = 23, 64, 96
    w_s = torch.from_numpy(rng.standard_normal((v, d)).astype(np.float32)) * 0.3
    w_t = w_s + 0.1 * torch.from_numpy(rng.standard_normal((v, d)).astype(np.float32))
    student, teacher = _Head(ops.quantize(w_s, head_type), cap, scale), _Head(ops.quantize(w_t, "F32"), cap, scale)
    h0 = torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32))
    h_t = h0 + 0.2 * torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, v, n))
    kw, cw = 1.0, 0.3

    h = h0.clone().requires_grad_(True)
    total, kl, ce = distill_loss(h, h_t, y, student, teacher, kw, cw, chunk=chunk)
    total.backward()

    h_ref = h0.clone().requires_grad_(True)
    ls, lt = h_ref @ ops.dequantize(student.qt, torch.float32).t() / scale, h_t @ w_t.t() / scale
    if cap:  # logits beyond the cap: the cap's derivative matters
        assert ls.abs().max() > cap
        ls, lt = torch.tanh(ls / cap) * cap, torch.tanh(lt / cap) * cap
    ref_total, ref_kl, ref_ce = reference_distill_loss(ls, lt, y, kw, cw)
    ref_total.backward()
    assert kl.item() > 0
    torch.testing.assert_close(kl, ref_kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-4, atol=1e-6)


def test_kl_of_a_model_with_itself_is_zero(rng):
    w = torch.from_numpy(rng.standard_normal((50, 32)).astype(np.float32))
    head = _Head(ops.quantize(w, "F32"))
    h = torch.from_numpy(rng.standard_normal((9, 32)).astype(np.float32))
    _, kl, ce = distill_loss(h, h, torch.zeros(9, dtype=torch.long), head, head, 1.0, 1.0, chunk=4)
    assert abs(kl.item()) < 1e-4 and ce.item() > 0


# ---- tiny models -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory, botchan_text):
    """Teacher (F32), INT2-g32 student, a training text and a held-out text of another part."""
    d = tmp_path_factory.mktemp("lrec")
    teacher = tiny_llama_gguf(d / "teacher.gguf", layers=2, emb_scale=0.3, scale=0.12)
    student = quantize_model(teacher, d / "student.gguf", "INT2-g32").path
    (d / "train.txt").write_text(botchan_text[:12000], encoding="utf-8")
    (d / "other.txt").write_text(botchan_text[-6000:], encoding="utf-8")
    return d, teacher, student


def test_distillation_gradient_matches_autograd(tiny):
    d, teacher, student = tiny
    s, t = load_model(student, restore_int_types=True), load_model(teacher, restore_int_types=True)
    apply_adapters(s, AdapterConfig(rank=4, alpha=8, seed=3))
    with torch.no_grad():
        for ad in adapters_of(s).values():
            ad.lora_B.normal_(0, 0.05)
    dm = DistillationModel(s, t, kl_weight=1.0, ce_weight=0.25, kl_chunk=5)
    dm.train()
    ids = torch.randint(0, TINY_VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[1, 6:] = -100
    dm.loss(ids, labels, reduction="sum").backward()
    got = [p.grad.clone() for p in adapter_parameters(s)]
    for p in adapter_parameters(s):
        p.grad = None
    ls, lt = s(ids)[:, :-1], t(ids)[:, :-1].detach()
    ref, _, _ = reference_distill_loss(ls.reshape(-1, TINY_VOCAB), lt.reshape(-1, TINY_VOCAB), labels[:, 1:].reshape(-1), 1.0, 0.25)
    ref.backward()
    for g, p in zip(got, adapter_parameters(s)):  # fp32 sums in another order: error relative to the scale
        torch.testing.assert_close(g, p.grad, rtol=1e-3, atol=1e-4 * p.grad.abs().max().item())
    dm.eval()  # eval mode: the student's own cross-entropy, as the trainer's held-out perplexity
    assert dm.loss(ids, labels, reduction="sum").item() == pytest.approx(s.loss(ids, labels, reduction="sum").item())


def test_teacher_with_another_vocabulary_is_refused(tiny, tmp_path):
    d, teacher, student = tiny
    other = tiny_llama_gguf(tmp_path / "other.gguf", layers=1)
    s, t = load_model(student, restore_int_types=True), load_model(other, restore_int_types=True)
    t.config.vocab_size += 1
    with pytest.raises(ValueError, match="vocabularies differ"):
        DistillationModel(s, t)


@pytest.fixture(scope="module")
def corrected(tiny):
    d, teacher, student = tiny
    run = d / "run"
    rc = cli.main(["correct", str(student), "--teacher", str(teacher), "--text", str(d / "train.txt"), "--eval-text",
               str(d / "other.txt"), "--rank", "8", "--alpha", "16", "--steps", "16", "--seq-len", "32",
               "--batch", "4", "--lr", "5e-3", "--ce-weight", "0.1", "--device", "cpu", "--eval-every", "0",
               "--eval-tokens", "512", "-o", str(run)])
    assert rc == 0
    return run


def test_correction_lowers_kl_on_held_out_text(corrected):
    report = json.loads((corrected / "report.json").read_text())
    assert set(report["eval"]) == {"train.txt (held-out end)", "other.txt"}
    for name, r in report["eval"].items():
        assert r["corrected_kl"] < 0.8 * r["student_kl"], name
        assert all(np.isfinite(r[k]) for k in ("teacher_ppl", "student_ppl", "corrected_ppl"))
    b = report["bits"]
    assert b["linear_bpw"] == pytest.approx(3.0)
    assert b["corrected_linear_bpw"] == pytest.approx(3.0 + 16 * b["adapter_params"] / b["linear_params"])
    assert (corrected / "adapter" / "adapter_config.json").is_file() and (corrected / "loss.png").is_file()
    cfg = json.loads((corrected / "config.json").read_text())["train"]
    assert cfg["extra"]["lrec"]["ce_weight"] == 0.1 and cfg["method"] == "lora"


def test_a_second_run_into_the_same_directory_is_refused(tiny, corrected):
    from lowtune.correct import correct
    from lowtune.failures import TrainingError
    d, teacher, student = tiny
    with pytest.raises(TrainingError, match="--resume"):
        correct(student, teacher, d / "train.txt", corrected, steps=2, seq_len=32, device="cpu")


def test_resume_continues_the_run(corrected, tmp_path):
    import shutil

    from lowtune.correct import resume_correct
    run = tmp_path / "run"
    shutil.copytree(corrected, run)
    res = resume_correct(run, steps=18, log=lambda s: None)
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 19))
    assert res.report["eval"]["other.txt"]["student_kl"] == \
        json.loads((corrected / "report.json").read_text())["eval"]["other.txt"]["student_kl"]


def test_frozen_base_adapter_under_a_second_adapter(tiny, corrected, tmp_path):
    d, teacher, student = tiny
    ids = torch.randint(0, TINY_VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    plain = load_model(student, adapter=corrected)
    frozen_model = load_model(student)
    frozen = attach_base_adapter(frozen_model, corrected)
    assert len(frozen) == 2 * 7 and not list(frozen_model.parameters())
    with torch.no_grad():
        want = plain(ids)
        torch.testing.assert_close(frozen_model(ids), want, rtol=1e-5, atol=1e-5)
        ref = frozen_model.layers[0].attn_q
        x = torch.randn(3, 64)
        torch.testing.assert_close(ref(x), ref.base(x) + x @ ref.delta_weight().t(), rtol=1e-4, atol=1e-5)

    apply_adapters(frozen_model, AdapterConfig(method="qa-hira", rank=4, alpha=4, hira_init="kaiming"))
    params = adapter_parameters(frozen_model)
    assert [n for n, _ in frozen_model.named_parameters()] and all(p.requires_grad for p in params)
    assert isinstance(frozen_model.layers[0].attn_q.base, FrozenAdaptedLinear)
    before = {n: m.frozen_A.clone() for n, m in frozen_adapters_of(frozen_model).items()}
    opt = torch.optim.SGD(params, lr=0.1)
    frozen_model.train()
    frozen_model.loss(ids).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    opt.step()
    for n, m in frozen_adapters_of(frozen_model).items():
        assert torch.equal(m.frozen_A, before[n])
    saved = save_adapter(frozen_model, tmp_path / "task")
    meta = json.loads((saved / "adapter_config.json").read_text())
    assert meta["method"] == "qa-hira" and len(meta["modules"]) == 2 * 7
    with pytest.raises(ValueError, match="before any trainable adapter"):
        attach_base_adapter(frozen_model, corrected)
    with pytest.raises(FileNotFoundError, match="no adapter"):
        attach_base_adapter(load_model(student), tmp_path)


def test_finetune_with_base_adapter(tiny, corrected, tmp_path):
    d, teacher, student = tiny
    run = tmp_path / "task"
    rc = cli.main(["finetune", str(student), "--data", str(d / "train.txt"), "--base-adapter", str(corrected),
                            "--method", "lora", "--rank", "4", "--steps", "2", "--seq-len", "32",
                            "--batch", "2", "--device", "cpu", "--eval-every", "0", "-o", str(run)])
    assert rc == 0
    cfg = json.loads((run / "config.json").read_text())["train"]
    assert cfg["base_adapter"] == str(corrected)
    other = tiny_llama_gguf(tmp_path / "different.gguf", layers=2, seed=5)
    with pytest.raises(BaseMismatchError, match="trained on base .*--force"):  # it belongs to `student`
        attach_base_adapter(load_model(other), corrected)


def test_the_student_dtype_is_the_train_configs(tiny, corrected, tmp_path, capsys):
    """--dtype takes the trainer's settings (any spelling of fp32/bf16; fp16 refused before
    anything loads), and runs made before TrainConfig had a dtype keep lrec's."""
    from lowtune.correct import build
    from lowtune.train_config import TrainConfig
    d, teacher, student = tiny
    rc = cli.main(["correct", str(student), "--teacher", str(teacher), "--text", str(d / "train.txt"),
                   "--dtype", "float16", "--device", "cpu", "-o", str(tmp_path / "run")])
    assert rc == 1 and "fp16 gradients would need loss scaling" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    cfg = TrainConfig.load(corrected)
    assert cfg.dtype == "auto" and "dtype" not in cfg.extra["lrec"]
    cfg.dtype = "bfloat16"
    cfg.check()
    student_dtype = lambda: build(cfg, torch.device("cpu"), log=lambda s: None)[0].student.dtype  # noqa: E731
    assert cfg.dtype == "bf16" and student_dtype() == torch.bfloat16
    cfg.dtype, cfg.extra["lrec"]["dtype"] = "auto", "bfloat16"  # an older run's record
    assert student_dtype() == torch.bfloat16
    cfg.dtype = "fp32"  # the run's own setting wins
    assert student_dtype() == torch.float32
