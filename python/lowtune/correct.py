"""LREC, low-rank error correction (INT2.1 paper): a LoRA trained on a quantized student so that
its next-token distribution matches a full-precision teacher's.

    lowtune quantize SmolLM2.Q4_1.gguf --type F32 -o teacher.gguf
    lowtune quantize SmolLM2.Q4_1.gguf --type INT2-g32 -o student.gguf
    lowtune correct student.gguf --teacher teacher.gguf --text train.txt -o runs/lrec
    lowtune finetune student.gguf --base-adapter runs/lrec --data task.jsonl -o runs/task

The objective (seeds §3.3, the official lrec.py), per scored position t with teacher
distribution P_t and student distribution Q_t over the whole vocabulary:

    loss = kl_weight · mean_t KL(P_t ‖ Q_t) + ce_weight · mean_t CE(Q_t, x_{t+1})

Normalisation: both terms are means over the scored tokens (positions that have a next token).
The official code sums KL over the 2048 positions of a sequence (and averages over sequences)
but takes a mean CE; that equals T·(KL_mean + (ce_official/T)·CE_mean) with T = 2048, so its
default ce_weight 200 is our 200/2048 ≈ 0.1 (the released INT2 runs' 120 is 0.06, INT4's 10 is
0.005), and its learning rates carry over (Adam is invariant to the factor T).

Memory: teacher and student are loaded together; only their final hidden states [B, T, D] are
kept, and the LM heads run over `kl_chunk` positions at a time: per chunk the teacher's and the
student's logits [chunk, V] (fp32) give KL, CE and the student's gradient, which is pushed
through the head at once (the same trick as model.loss), so neither the [B·T, V] logits nor any
teacher output is ever stored, on disk or in memory. For larger models, `max_vram` streams the
layers of both models (lowtune.streaming: the frozen teacher streams every layer, the student
gets what is left), and `teacher_device` can keep the teacher elsewhere (e.g. on the CPU).

Training reuses lowtune.trainer (resumable checkpoints, LR schedule, held-out evaluation,
loss.png, metrics.jsonl); the held-out evaluation there reports the corrected student's own
perplexity. The adapter is a plain LoRA saved with adapters.save_adapter in RUN_DIR/adapter,
so export merges it like any other. lowtune.loading.attach_base_adapter puts it under a second,
trainable adapter (INT2.1's LREC-then-fine-tune: `lowtune finetune --base-adapter RUN_DIR`).

Report (RUN_DIR/report.json, printed as a table): bits per weight of the student with and
without the correction (INT2.1's arithmetic: the adapter's parameters in fp16 added to the
quantized linears' bits), and perplexity of teacher, student and corrected student, plus the
mean KL(teacher ‖ student) per token, on the held-out end of --text and on every --eval-text.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from . import ops
from .checkpoint import seed_everything
from .adapters import AdapterConfig, adapters_of, apply_adapters, save_adapter
from .data import collate, load_dataset, pack, tokenize_stream, wants_bos
from .failures import existing_run
from .loading import activation_dtype, load_model, pick_device
from .memory_budget import DeviceBudget
from .model import checkpoint, head_operands
from .qtensor import QTensor
from .quantize_model import model_bits
from .rundir import ADAPTER, RunDir
from .streaming import estimate_memory, stream_model
from .tokenizer import load_tokenizer
from .train_config import LREC_ALPHA, LREC_CE_WEIGHT, LREC_KL_CHUNK, LREC_LR, LREC_RANK, TrainConfig
from .trainer import Trainer

REPORT = "report.json"
IGNORE = -100


# ---------------------------------------------------------------------------------------------
# The loss: forward KL over the full vocabulary + cross-entropy, LM heads in chunks


def reference_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           targets: torch.Tensor, kl_weight: float = 1.0, ce_weight: float = 0.0):
    """Plain torch, unchunked: logits [N, V], targets [N] (IGNORE rows excluded from both terms).
    Returns (kl_weight·ΣKL + ce_weight·ΣCE, ΣKL, ΣCE), sums over the scored rows, KL(P_t ‖ Q_s)."""
    keep = targets != IGNORE
    s, t, y = student_logits[keep].float(), teacher_logits[keep].float(), targets[keep]
    log_q = F.log_softmax(s, dim=-1)
    log_p = F.log_softmax(t, dim=-1)
    kl = F.kl_div(log_q, log_p, reduction="sum", log_target=True)
    ce = F.cross_entropy(s, y, reduction="sum")
    return kl_weight * kl + ce_weight * ce, kl, ce


class _DistillHead(torch.autograd.Function):
    """Student LM head + teacher logits + KL/CE over row chunks, fused.

    The loss is a scalar, so its gradient w.r.t. the student's hidden rows is known in the
    forward: d loss / d logits_s = kl_w·(Q − P) + ce_w·(Q − onehot), pushed through the packed
    head chunk by chunk (qmatmul_input_grad). Per chunk three [chunk, V] fp32 buffers live.
    The student's logits are z = h·Wᵀ + bias, soft-capped to cap·tanh(z/cap) where the family
    says (Gemma), whose derivative 1 − (l/cap)² scales the gradient."""

    @staticmethod
    def forward(ctx, h, h_t, targets, head: QTensor, bias, cap: float, teacher_head, kl_w: float,
                ce_w: float, chunk: int, need_grad: bool):
        kl = torch.zeros((), dtype=torch.float64, device=h.device)
        ce = torch.zeros((), dtype=torch.float64, device=h.device)
        dh = torch.empty_like(h) if need_grad else None
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s:s + chunk].float().contiguous(), targets[s:s + chunk]
            log_q = ops.qmatmul(hc, head).float()
            if bias is not None:
                log_q += bias.float()
            dcap = None
            if cap:
                log_q = torch.tanh(log_q / cap) * cap
                dcap = 1.0 - (log_q / cap) ** 2 if need_grad else None
            log_q -= torch.logsumexp(log_q, dim=-1, keepdim=True)
            log_p = teacher_head(h_t[s:s + chunk]).float().to(h.device)
            log_p -= torch.logsumexp(log_p, dim=-1, keepdim=True)
            p = log_p.exp()
            log_p -= log_q                                  # now log P − log Q
            kl += torch.dot(p.reshape(-1), log_p.reshape(-1)).double()
            rows = torch.arange(hc.shape[0], device=h.device)
            ce -= log_q[rows, tc].sum().double()
            if need_grad:
                g = log_q.exp_().mul_(kl_w + ce_w).sub_(p, alpha=kl_w)   # (kl_w+ce_w)·Q − kl_w·P
                g[rows, tc] -= ce_w
                if dcap is not None:
                    g *= dcap
                dh[s:s + chunk] = ops.qmatmul_input_grad(g.to(h.dtype), head)
            del log_q, log_p, p
        ctx.save_for_backward(dh if need_grad else torch.empty(0))
        total = (kl_w * kl + ce_w * ce).float()
        kl, ce = kl.float(), ce.float()
        ctx.mark_non_differentiable(kl, ce)
        return total, kl, ce

    @staticmethod
    def backward(ctx, g_total, g_kl, g_ce):
        (dh,) = ctx.saved_tensors
        return dh * g_total.to(dh.dtype), None, None, None, None, None, None, None, None, None, None


def distill_loss(h: torch.Tensor, h_t: torch.Tensor, targets: torch.Tensor, student, teacher,
                 kl_weight: float = 1.0, ce_weight: float = 0.0, chunk: int = LREC_KL_CHUNK):
    """Sums over rows of kl_weight·KL(P_teacher ‖ Q_student) + ce_weight·CE, with the LM heads
    run `chunk` rows at a time. h [N, D] student hidden (normed), h_t [N, D_t] teacher hidden
    (no gradient), targets [N] (every row scored). Returns (total, ΣKL, ΣCE); total is
    differentiable w.r.t. h."""
    if h.shape[0] != h_t.shape[0] or targets.shape[0] != h.shape[0]:
        raise ValueError(f"h {tuple(h.shape)}, h_t {tuple(h_t.shape)} and targets {tuple(targets.shape)} "
                         "must have the same number of rows")
    if h.shape[0] == 0:
        zero = h.sum() * 0.0
        return zero, zero.detach(), zero.detach()

    def teacher_head(x):
        with torch.no_grad():
            return teacher.lm_head(x.to(teacher.device, teacher.dtype).contiguous())

    out = student.output
    if out is None or type(out).__name__ == "QLinear":
        h, weight, bias, cap = head_operands(student, h)
        need_grad = torch.is_grad_enabled() and h.requires_grad
        return _DistillHead.apply(h, h_t.detach(), targets, weight, bias, cap, teacher_head,
                                  float(kl_weight), float(ce_weight), int(chunk), need_grad)
    # A wrapped head (an adapter on `output`): recompute each chunk in backward instead.
    total = kl = ce = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        lt = teacher_head(h_t[s:s + chunk]).float()

        def part(hc, lt=lt, tc=targets[s:s + chunk]):
            return torch.stack(reference_distill_loss(student.lm_head(hc), lt, tc, kl_weight, ce_weight))
        parts = checkpoint(part, h[s:s + chunk])
        total = total + parts[0]
        kl, ce = kl + parts[1].detach(), ce + parts[2].detach()
    return total, kl, ce


class DistillationModel(nn.Module):
    """Student (with its adapters) and frozen teacher behind the trainer's `loss` interface.

    In training mode loss() is the LREC objective, summed over the scored tokens; in eval mode it
    is the student's own cross-entropy (so the trainer's held-out perplexity is the student's).
    Only the student's adapters are parameters; the teacher holds buffers only."""

    def __init__(self, student: nn.Module, teacher: nn.Module, kl_weight: float = 1.0,
                 ce_weight: float = LREC_CE_WEIGHT, kl_chunk: int = LREC_KL_CHUNK):
        super().__init__()
        if student.config.vocab_size != teacher.config.vocab_size:
            raise ValueError(f"teacher and student vocabularies differ ({teacher.config.vocab_size} vs "
                             f"{student.config.vocab_size}); LREC needs a teacher with the student's tokenizer")
        st, tt = (getattr(m, "metadata", {}).get("tokenizer.ggml.tokens") for m in (student, teacher))
        if st is not None and tt is not None and list(st) != list(tt):
            raise ValueError("teacher and student have different tokenizers (tokenizer.ggml.tokens "
                             "differ); LREC needs a teacher with the student's tokenizer")
        if kl_weight < 0 or ce_weight < 0 or kl_weight + ce_weight == 0:
            raise ValueError(f"kl_weight and ce_weight must be >= 0 and not both 0, got {kl_weight}, {ce_weight}")
        self.student, self.teacher = student, teacher
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.kl_weight, self.ce_weight, self.kl_chunk = float(kl_weight), float(ce_weight), int(kl_chunk)

    @property
    def gradient_checkpointing(self) -> bool:
        return getattr(self.student, "gradient_checkpointing", False)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.student.gradient_checkpointing = on

    def to(self, *args, **kwargs):
        """Moves the student only: the teacher stays where it was loaded (see teacher_device)."""
        self.student.to(*args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never trains (no dropout either way)
        return self

    def _rows(self, ids: torch.Tensor, labels: torch.Tensor | None):
        """(student hidden, teacher hidden, targets) of the scored positions, rows [N, ...]."""
        labels = ids if labels is None else labels
        dev = self.student.device
        h = self.student.hidden(ids.to(dev))
        with torch.no_grad():
            h_t = self.teacher.hidden(ids.to(self.teacher.device))
        targets = labels[:, 1:].to(dev).reshape(-1)
        h = h[:, :-1].reshape(-1, h.shape[-1])
        h_t = h_t[:, :-1].reshape(-1, h_t.shape[-1]).to(dev)
        keep = targets != IGNORE
        if not bool(keep.all()):
            h, h_t, targets = h[keep], h_t[keep], targets[keep]
        return h, h_t, targets

    def distill(self, ids: torch.Tensor, labels: torch.Tensor | None = None):
        """(total, ΣKL, ΣCE, scored) for a batch ids [B, T] (labels aligned with ids, IGNORE unscored)."""
        h, h_t, targets = self._rows(ids, labels)
        with torch.autocast(h.device.type, enabled=False):
            total, kl, ce = distill_loss(h, h_t, targets, self.student, self.teacher,
                                         self.kl_weight, self.ce_weight, self.kl_chunk)
        return total, kl, ce, int(targets.numel())

    def loss(self, ids: torch.Tensor, labels: torch.Tensor | None = None, reduction: str = "mean"):
        if self.student.dtype == torch.float32:  # a float32 student stays float32 under autocast
            with torch.autocast(self.student.device.type, enabled=False):
                return self._loss(ids, labels, reduction)
        return self._loss(ids, labels, reduction)

    def _loss(self, ids, labels, reduction):
        if not self.training:
            return self.student.loss(ids.to(self.student.device),
                                     None if labels is None else labels.to(self.student.device),
                                     reduction=reduction)
        total, _, _, n = self.distill(ids, labels)
        if reduction == "sum":
            return total
        if reduction != "mean":
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        return total / max(n, 1)


# ---------------------------------------------------------------------------------------------
# Evaluation


@contextmanager
def adapters_disabled(model: nn.Module):
    """Temporarily put the base linears back in place of the model's (trainable) adapters."""
    ads = adapters_of(model)
    for name, ad in ads.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, ad.base)
    try:
        yield
    finally:
        for name, ad in ads.items():
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, ad)


@torch.no_grad()
def score(dm: DistillationModel, examples, batch: int = 4, teacher: bool = True) -> dict:
    """Perplexity of the student (as it is now: adapters on or off) and of the teacher, and the
    mean KL(teacher ‖ student) per token, over data.Example windows."""
    was = dm.training
    dm.eval()
    nll = kl = nll_t = 0.0
    n = 0
    try:
        for s in range(0, len(examples), batch):
            ids, labels = collate(examples[s:s + batch], 0)
            _, kl_b, ce_b, n_b = dm.distill(ids, labels)
            if n_b == 0:
                continue
            nll += float(ce_b)
            kl += float(kl_b)
            n += n_b
            if teacher:
                nll_t += float(dm.teacher.loss(ids.to(dm.teacher.device), labels.to(dm.teacher.device),
                                               reduction="sum"))
    finally:
        dm.train(was)
    n = max(n, 1)
    out = {"ppl": math.exp(min(nll / n, 700.0)), "nll": nll / n, "kl": kl / n, "tokens": n}
    if teacher:
        out["teacher_ppl"] = math.exp(min(nll_t / n, 700.0))
    return out


def text_examples(path, tokenizer, seq_len: int, max_tokens: int | None = None):
    """A text file tokenized and cut into windows of seq_len (data.pack), at most max_tokens."""
    ids = tokenize_stream(Path(path).read_text(encoding="utf-8", errors="replace"), tokenizer)
    if max_tokens:
        ids = ids[:max_tokens]
    bos = tokenizer.bos_id if wants_bos(tokenizer) else None
    return [e for e in pack(ids, seq_len, bos) if len(e) == seq_len] or pack(ids, seq_len, bos)


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class CorrectResult:
    run_dir: Path
    adapter_dir: Path
    report: dict

    def table(self) -> str:
        return format_report(self.report)


def format_report(report: dict) -> str:
    b = report["bits"]
    lines = [f"student {report['student']}: decoder linears {b['linear_bpw']:.3f} -> "
             f"{b['corrected_linear_bpw']:.3f} bits/weight with the correction "
             f"({b['adapter_params']:,} adapter parameters in fp16); whole model {b['bpw']:.3f} -> "
             f"{b['corrected_bpw']:.3f}",
             f"{'text':<28} {'teacher':>9} {'student':>9} {'corrected':>10} {'gap closed':>10} "
             f"{'KL before':>10} {'KL after':>9}"]
    for name, r in report["eval"].items():
        gap = r["student_ppl"] - r["teacher_ppl"]
        closed = (r["student_ppl"] - r["corrected_ppl"]) / gap if gap > 0 else float("nan")
        lines.append(f"{name[:28]:<28} {r['teacher_ppl']:>9.3f} {r['student_ppl']:>9.3f} "
                     f"{r['corrected_ppl']:>10.3f} {100 * closed:>9.1f}% {r['student_kl']:>10.4f} "
                     f"{r['corrected_kl']:>9.4f}")
    return "\n".join(lines)


def _stream_pair(student, teacher, device, tdev, budget: int, tokens: int, log) -> dict:
    """Teacher and student inside one GPU budget: the frozen teacher streams every layer (it
    only runs forward, without autograd), the student gets what is left and is planned by
    lowtune.streaming like any fine-tune."""
    info = {}
    e = estimate_memory(teacher, tokens, teacher.loss_chunk_tokens)
    # non-layer weights, two layer slots, one layer's forward activations and its hidden
    need = e["fixed"] + 2 * max(e["layers"]) + e["working"] // 2 + e["checkpoint"]
    info["teacher"] = stream_model(teacher, tdev, streamed=list(range(len(teacher.layers)))).to_dict()
    if budget == "auto":   # the free memory less a margin, before the student is placed
        budget = DeviceBudget.measure(device, "auto").budget
    if tdev == device:
        budget -= need
    log(f"teacher: every layer streamed, about {need / 2**20:.0f} MiB on {tdev}")
    # (the distillation trainer keeps AdamW's state on the GPU: the plan must count it there)
    plan = stream_model(student, device, budget, tokens=tokens, host_optimizer=False)
    log("student: " + plan.summary())
    info["student"] = plan.to_dict()
    return info


def build(cfg: TrainConfig, device: torch.device, log=print):
    """(DistillationModel with the student's LoRA applied, tokenizer) for a TrainConfig whose
    extra["lrec"] holds the teacher and the loss weights. INTb-gG students train in their stored
    Q4_1/Q5_1 blocks (lowtune.loading's default), the type `lowtune finetune` and `lowtune export`
    read from the file; under a GPU budget both models load into host memory for streaming."""
    lrec = cfg.extra["lrec"]
    streams = cfg.max_vram is not None and device.type == "cuda"
    # (runs made before TrainConfig had a dtype kept the student's in lrec)
    dtype = activation_dtype(device, lrec.get("dtype") if cfg.dtype == "auto" else cfg.dtype)
    student = load_model(cfg.model, device="cpu" if streams else device, dtype=dtype)
    tdev = torch.device(lrec.get("teacher_device") or device)
    teacher = load_model(lrec["teacher"], device="cpu" if streams else tdev,
                         dtype=torch.float32)  # fp32 activations: exact targets
    kw = {"method": "lora", "rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout, "seed": cfg.seed}
    if cfg.targets:
        kw["targets"] = tuple(cfg.targets)
    apply_adapters(student, AdapterConfig(**kw))
    if streams:
        cfg.extra["streaming"] = _stream_pair(student, teacher, device, tdev, cfg.max_vram,
                                              cfg.seq_len * cfg.batch, log)
    dm = DistillationModel(student, teacher, lrec["kl_weight"], lrec["ce_weight"], lrec["kl_chunk"])
    return dm, load_tokenizer(student.metadata)


def correct(student, teacher, text, out, *, rank: int = LREC_RANK, alpha: float = LREC_ALPHA,
            kl_weight: float = 1.0, ce_weight: float = LREC_CE_WEIGHT, lr: float = LREC_LR,
            eval_texts: Sequence[str] = (), eval_tokens: int | None = 16384,
            kl_chunk: int = LREC_KL_CHUNK, teacher_device: str | None = None,
            dtype: str | None = None, log=None, **options) -> CorrectResult:
    """Train an LREC adapter on `student` (GGUF) against `teacher` (GGUF, same tokenizer) on the
    text file `text`, into run directory `out`. Options are TrainConfig fields (steps, epochs,
    seq_len, batch, grad_accum, warmup, schedule, eval_fraction, targets, seed, device, ...).
    dtype: the student's activation dtype, TrainConfig.dtype (default auto: bf16 on CUDA, fp32 on
    the CPU; the teacher always runs in fp32)."""
    if dtype is not None:
        options["dtype"] = dtype
    options.setdefault("seq_len", 512)
    cfg = TrainConfig(model=str(student), data=str(text), out=str(out), method="lora", rank=rank,
                      alpha=alpha, lr=lr, **options)
    cfg.extra["lrec"] = {"teacher": str(teacher), "kl_weight": float(kl_weight),
                         "ce_weight": float(ce_weight), "kl_chunk": int(kl_chunk),
                         "eval_texts": [str(t) for t in eval_texts], "eval_tokens": eval_tokens,
                         "teacher_device": teacher_device}
    return run_correction(cfg, log=log)


def resume_correct(run_dir, log=None, **overrides) -> CorrectResult:
    """Continue an interrupted `lowtune correct` run from its newest checkpoint."""
    cfg = TrainConfig.load(run_dir)
    if "lrec" not in cfg.extra:
        raise ValueError(f"{run_dir} is not a `lowtune correct` run (its config has no lrec section)")
    cfg.apply_overrides(overrides)
    return run_correction(cfg, resume=True, log=log)


def run_correction(cfg: TrainConfig, resume: bool = False, log=None) -> CorrectResult:
    log = log or (lambda s: print(s, flush=True))
    cfg.check()
    lrec = cfg.extra["lrec"]
    run = RunDir(cfg.out)
    newest = run.newest_step()
    if newest is not None and not resume:
        raise existing_run(run.path, newest, "correct")
    run.path.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    dm, tokenizer = build(cfg, device, log)
    log(f"student {cfg.model}, teacher {lrec['teacher']} on {device} ({time.perf_counter() - t0:.1f} s to load)")
    dataset = load_dataset(cfg.data, tokenizer, cfg.seq_len, eval_fraction=cfg.eval_fraction)
    eval_sets = {}
    if dataset.eval:
        eval_sets[f"{Path(cfg.data).name} (held-out end)"] = dataset.eval
    for t in lrec.get("eval_texts") or []:
        eval_sets[Path(t).name] = text_examples(t, tokenizer, cfg.seq_len, lrec.get("eval_tokens"))

    baseline_path = run.path / "baseline.json"
    if resume and baseline_path.is_file():
        baseline = json.loads(baseline_path.read_text())
    else:
        baseline = {}
        with adapters_disabled(dm.student):
            for name, ex in eval_sets.items():
                baseline[name] = score(dm, ex, cfg.batch)
                log(f"{name}: teacher perplexity {baseline[name]['teacher_ppl']:.3f}, student "
                    f"{baseline[name]['ppl']:.3f} (KL {baseline[name]['kl']:.4f} nats/token)")
        ckpt.atomic_write_json(baseline_path, baseline)

    def save(_model, run_dir):  # the student's adapter, tied to the student file
        return save_adapter(dm.student, Path(run_dir) / ADAPTER)

    Trainer(cfg, model=dm, tokenizer=tokenizer, dataset=dataset, save_adapter=save, log=log).run(resume=resume)

    bits = model_bits(cfg.model)
    n_adapter = sum(ad.num_adapter_parameters for ad in adapters_of(dm.student).values())
    corr = bits.with_adapter(n_adapter)
    report = {"student": str(cfg.model), "teacher": lrec["teacher"],
              "bits": {**bits.to_dict(), "adapter_params": n_adapter,
                       "corrected_linear_bpw": corr["linear_bpw"], "corrected_bpw": corr["bpw"]},
              "loss": {"kl_weight": lrec["kl_weight"], "ce_weight": lrec["ce_weight"],
                       "normalisation": "per-token means of KL and CE"},
              "eval": {}}
    for name, ex in eval_sets.items():
        after = score(dm, ex, cfg.batch, teacher=False)
        b = baseline[name]
        report["eval"][name] = {"tokens": b["tokens"], "teacher_ppl": b["teacher_ppl"],
                                "student_ppl": b["ppl"], "corrected_ppl": after["ppl"],
                                "student_kl": b["kl"], "corrected_kl": after["kl"]}
    ckpt.atomic_write_json(run.path / REPORT, report)
    result = CorrectResult(run.path, run.adapter_dir, report)
    log(result.table())
    return result


__all__ = ["CorrectResult", "DistillationModel", "adapters_disabled", "build", "correct", "distill_loss",
           "format_report", "reference_distill_loss", "resume_correct", "run_correction", "score",
           "text_examples"]
