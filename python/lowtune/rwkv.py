"""RWKV-7 ("Goose": rwkv7) and RWKV-6 ("Finch": rwkv6), after llama.cpp's src/models/rwkv7.cpp, rwkv6.cpp
and their -base.cpp, which run the exported files, and ggml's rwkv_wkv7 and rwkv_wkv6 (the recurrences).
lowtune.model's embeddings (normed by token_embd_norm), final LayerNorm and head around layers of D channels
in H heads of N = wkv.head_size, each with its own LayerNorms (with biases) before the time mix (attn_norm)
and the channel mix (attn_norm_2). RWKV-7's, R the low-rank widths (ModelConfig.wkv_lora_ranks):

    token shift             each mix reads its normed input x and the one of the position before, x_prev
                            (zeros before the sequence; with a cache, the last position of the call before)
    time_mix_lerp_fused [6, D]   x + (x_prev - x) · lerp_i: the inputs of r, w, k, v, a and g
    time_mix_receptance, _key, _value [D, D]   r, k, v
    time_mix_w0, w1 [R, D], w2 [D, R]          decay w = exp(-0.606531 · sigmoid(w2 tanh(w1 x) + w0))
    time_mix_a0, a1, a2                        in-context learning rate a = sigmoid(a2 a1 x + a0)
    time_mix_v0, v1, v2                        after the first layer v += (v_first - v) · sigmoid(v2 v1 x + v0),
                                               v_first the first layer's v (the first layer's own are unused)
    time_mix_g1, g2                            gate g = g2 sigmoid(g1 x)
    time_mix_k_k, _k_a [D]                     kk = L2-normed k · k_k per head; k · (1 + (a - 1) · k_a)
    wkv7                                       the state S [N, N] per head: S ← S diag(w) + v kᵀ + (S (-kk))
                                               (kk · a)ᵀ, out = S r
    time_mix_ln [D] (+ bias)                   out LayerNormed per head (eps 64e-5, llama.cpp's), scaled
    time_mix_r_k [D]                           plus v · Σ (k · r · r_k) per head, times g
    time_mix_output [D, D]
    channel_mix_lerp_k [D]; _key [F, D], _value [D, F]   value(relu(key(x + (x_prev - x) · lerp_k))²)

ARWKV-7 (arwkv7: RWKV-7's time mix on Qwen2's layers) norms with RMSNorms (attn_norm, ffn_norm; the final one too,
without an embedding norm), runs Qwen2's gated MLP (ffn_gate, ffn_up, ffn_down) in place of the channel mix,
keeps one token shift (the time mix's), and may go without the gate (5 lerps, no g1/g2); lowtune reads its
files with time_mix_ln (llama.cpp also runs them without).

RWKV-6's, E and Ed its token-shift mix's and decay's widths (ModelConfig.wkv_lora_ranks):

    time_mix_lerp_x [D], w1 [5E, D], w2 [5, D, E], lerp_fused [5, D]   the inputs of w, k, v, r and g:
                            x + (x_prev - x) · (lerp_i + w2_i tanh(w1 (x + (x_prev - x) · lerp_x))_i)
    time_mix_receptance, _key, _value, _gate [D, D]   r, k, v, g = silu(gate(.))
    time_mix_decay [D], decay_w1 [Ed, D], decay_w2 [D, Ed]   w = exp(-exp(decay_w2 tanh(decay_w1 x) + decay))
    wkv6, time_mix_first u [H, N]   the state S [N (key), N (value)] per head: out = rᵀ (S + u k vᵀ),
                            S ← diag(w) S + k vᵀ
    time_mix_ln [D] (+ bias), × g, time_mix_output [D, D]
    channel_mix_lerp_k, _lerp_r [D]; _key [F, D], _value [D, F], _receptance [D, D]
                            sigmoid(receptance(x_r)) · value(relu(key(x_k))²)
    rescale_every_n_layers  the residual stream halved after every n-th layer (the converter divides
                            time_mix_output and channel_mix_value to match)

QRWKV6 (rwkv6qwen2: RWKV-6's time mix on Qwen2's layers) is RWKV-6's time mix after an RMSNorm with Qwen2's
biases on r, k and v, k and v of head_count_kv heads (each read by a group of r's heads), no bonus: gated linear
attention (S ← diag(w) S + k (1 - w) vᵀ, out = Sᵀ r / √N), a sigmoid gate and no time_mix_ln; then Qwen2's
RMSNorm and gated MLP as ARWKV-7's, one token shift a layer.

The KV cache keeps no keys: per layer its conv_state [B, 2, D] (the last normed inputs of the two mixes;
[B, 1, D] with an MLP) and recurrent_state [B, H, N, N] (the wkv state, fp32). Adapters go on the linears
llama.cpp multiplies with their LoRA (rwkv_linear_names); the low-rank parts, the lerps and the norms stay
frozen, the gradient going through them.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import glue_ops, ops
from .model import (RWKV6_LINEAR_NAMES, RWKV7_LINEAR_NAMES, KVCache, Model, ModelConfig, QLinear, _table, _vector,
                    carried_states, checkpoint, make_norm)

DECAY_SCALE = 0.606531   # w = exp(-DECAY_SCALE · sigmoid(.)): llama.cpp's rounding of exp(-1/2)
GROUP_NORM_EPS = 64e-5   # the per-head norm of the wkv output, fixed in llama.cpp's graph
LOW_RANK = "wavg"        # the low-rank parts: decay, learning rate, value residual mix, gate (wkv_lora_ranks' order)
MIXES6 = "wkvrg"         # the rows of RWKV-6's time_mix_lerp_fused and its w2: the inputs of w, k, v, r and g


@ops.without_autocast  # (the trainer's bf16 autocast would run its products in bf16)
def wkv7(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
         state: torch.Tensor | None = None, chunk: int = 32, block: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-7's recurrence in fp32, as ggml's rwkv_wkv7: per head the state S [N (value), N (key)] becomes
    S diag(w_t) + v_t k_tᵀ + (S a_t) b_tᵀ and the output S r_t. r, w, k, v, a, b [B, T, H, N]; state [B, H, N, N]
    (None: zeros) -> (out [B, T, H, N], the last state). One position is the step the cache runs; more run the
    chunked form (_wkv7_chunked: chunks of `chunk` positions in blocks of `block`, which divides it; the fastest
    on a CPU of those measured by tools/bench_recurrences.py); differentiable throughout."""
    if r.shape[1] == 1:
        return _wkv7_stepped(r, w, k, v, a, b, state)
    return _wkv7_chunked(r, w, k, v, a, b, state, chunk, block)


@ops.without_autocast  # (the trainer's bf16 autocast would run its products in bf16)
def _wkv7_stepped(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                  b: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """wkv7 position by position (its decode step, and the reference its chunked form is tested against)."""
    s = r.new_zeros(*r.shape[:1], *r.shape[2:], r.shape[-1]) if state is None else state
    outs = []
    for t in range(r.shape[1]):
        sa = torch.einsum("bhij,bhj->bhi", s, a[:, t])
        s = s * w[:, t, :, None] + v[:, t, :, :, None] * k[:, t, :, None] + sa[..., None] * b[:, t, :, None]
        outs.append(torch.einsum("bhij,bhj->bhi", s, r[:, t]))
    return torch.stack(outs, 1), s


def _wkv7_chunked(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                  b: torch.Tensor, state: torch.Tensor | None, chunk: int,
                  block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """wkv7 over chunks of `chunk` positions: the transition diag(w) + a bᵀ is diagonal plus rank one, so within
    a chunk the values S_{t-1} a_t that the rank-one parts read solve one unit-lower-triangular system (the
    generalized delta rule's WY form), and each chunk maps the state entering it linearly to the one leaving it.
    In the transposed state S' = Sᵀ [key, value], D_t = w_1 ⋯ w_t within the chunk and u_t = S'_{t-1}ᵀ a_t:
        u_t = S'_0ᵀ (a_t D_{t-1}) + Σ_{j<t} (u_j b_j + v_j k_j)ᵀ (a_t D_{t-1} / D_j)
        out_t = S'_0ᵀ (r_t D_t) + Σ_{j<=t} (u_j b_j + v_j k_j)ᵀ (r_t D_t / D_j)
        S'_C = diag(D_C) S'_0 + Σ_j (b_j D_C / D_j) u_jᵀ + (k_j D_C / D_j) v_jᵀ
    Every decay is exp of a difference of log decays that is never above 0 (_decayed_inner), so none overflows."""
    if chunk % block:
        raise ValueError(f"wkv7's chunk ({chunk}) must be a multiple of its block ({block})")
    r, w, k, v, a, b = (x.transpose(1, 2).float() for x in (r, w, k, v, a, b))  # heads first
    bs, h, t, n = r.shape
    s = r.new_zeros(bs, h, n, n) if state is None else state.float().transpose(-1, -2)
    pad = (chunk - t % chunk) % chunk  # (positions of w = 1 and zeros elsewhere: the state passes unchanged)
    r, k, v, a, b = (F.pad(x, (0, 0, 0, pad)).reshape(bs, h, -1, chunk, n) for x in (r, k, v, a, b))
    # (a decay of 0 would give log decays of -inf, whose differences are NaN)
    log_w = F.pad(w.clamp(min=torch.finfo(torch.float32).tiny).log(), (0, 0, 0, pad)).reshape(r.shape)
    decay = log_w.cumsum(-2)                                   # log D_t [.., chunk, n]
    before = F.pad(decay[..., :-1, :], (0, 0, 1, 0))           # log D_{t-1}
    a_next = F.pad(a[..., 1:, :], (0, 0, 0, 1))
    # rows a_{i+1} (the rank-one parts' reads, shifted down a row below) and r_i; columns b_j and k_j
    inner = _decayed_inner(torch.stack([a_next, r], -3), torch.stack([b, k], -3), decay, block)
    (ab, ak), (rb, rk) = (x.unbind(-3) for x in inner.unbind(-4))
    ab, ak = (F.pad(x[..., :-1, :], (0, 0, 1, 0)) for x in (ab, ak))  # strictly lower: j < t
    # u_t = (the part from the chunk's values) + (the part from S'_0) S'_0, at once for every chunk
    solved = torch.linalg.solve_triangular(-ab, torch.cat([ak @ v, a * before.exp()], -1), upper=False,
                                           unitriangular=True)
    u_values, u_state = solved.split(n, -1)
    leave = (decay[..., -1:, :] - decay).exp()                 # D_C / D_j
    b_leave, k_leave = (b * leave).transpose(-1, -2), (k * leave).transpose(-1, -2)
    transition = torch.diag_embed(decay[..., -1, :].exp()) + b_leave @ u_state  # S'_C = transition S'_0 + added
    added = b_leave @ u_values + k_leave @ v
    entering = []
    # (unbound once, chunks first: one backward for all chunks, and contiguous matrices for the matmuls)
    for transition_i, added_i in zip(*(x.movedim(2, 0).contiguous().unbind() for x in (transition, added))):
        entering.append(s)
        s = transition_i @ s + added_i
    out = (r * decay.exp() + rb @ u_state) @ torch.stack(entering, 2) + rb @ u_values + rk @ v
    return out.reshape(bs, h, -1, n)[:, :, :t].transpose(1, 2), s.transpose(-1, -2)


def _decayed_inner(x: torch.Tensor, y: torch.Tensor, decay: torch.Tensor, block: int) -> torch.Tensor:
    """Σ_c x_ic y_jc exp(decay_ic - decay_jc) for j <= i, zero above, of rows x [.., X, C, N] and columns
    y [.., Y, C, N] under log decays [.., C, N] -> [.., X, Y, C, C]. In blocks of `block` positions: within a
    block through the pairwise differences, between blocks as matmuls of factors through the log decay before the
    row's block, exp(decay_i - before) · exp(before - decay_j), neither above 1."""
    (rows, c), cols = x.shape[-3:-1], y.shape[-3]
    blocks = c // block

    def by_block(z: torch.Tensor) -> torch.Tensor:  # [.., X | Y, C, N] -> [.., blocks, block, X | Y, N]
        return z.unflatten(-2, (blocks, block)).movedim(-4, -2)
    before = F.pad(decay[..., :-1, :], (0, 0, 1, 0))[..., ::block, :]  # [.., blocks, N]
    earlier = torch.arange(c, device=decay.device) < torch.arange(0, c, block, device=decay.device)[:, None]
    to_before = (before[..., :, None, :] - decay[..., None, :, :]).masked_fill(~earlier[..., None], float("-inf"))
    x_rows = by_block(x * (decay - before.repeat_interleave(block, -2)).exp()[..., None, :, :])
    y_cols = y.movedim(-3, -2)[..., None, :, :, :] * to_before.exp()[..., :, :, None, :]  # [.., blocks, C, Y, N]
    between = x_rows.flatten(-3, -2) @ y_cols.flatten(-3, -2).transpose(-1, -2)
    between = between.unflatten(-1, (c, cols)).unflatten(-3, (block, rows))  # [.., blocks, block, X, C, Y]
    within_decay = decay.unflatten(-2, (blocks, block))
    upper = torch.ones(block, block, dtype=torch.bool, device=decay.device).triu(1)
    pair = (within_decay[..., :, None, :] - within_decay[..., None, :, :]).masked_fill(upper[..., None], float("-inf"))
    y_pair = pair.exp()[..., None, :] * by_block(y)[..., None, :, :, :]  # [.., blocks, block (i), block (j), Y, N]
    within = by_block(x) @ y_pair.flatten(-3, -2).transpose(-1, -2)
    within = within.unflatten(-1, (block, cols))  # [.., blocks, block (i), X, block (j), Y]
    diagonal = torch.eye(blocks, dtype=decay.dtype, device=decay.device)[:, None, None, :, None, None]
    inner = between.unflatten(-2, (blocks, block)) + within[..., None, :, :] * diagonal
    return inner.permute(*range(inner.dim() - 6), -4, -1, -6, -5, -3, -2).reshape(*x.shape[:-3], rows, cols, c, c)


# positions a chunk of wkv6 and gated_linear_attention: their pairwise decays hold C·N numbers a position, a quarter
# of the N·N state a position that the stepped form keeps for its backward (N = 64); 16 ran fastest on a CPU
DIAG_DECAY_CHUNK = 16


@ops.without_autocast  # (the trainer's bf16 autocast would run its products in bf16)
def wkv6(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor, log_w: torch.Tensor,
         state: torch.Tensor | None = None, chunk: int = DIAG_DECAY_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-6's recurrence in fp32, as ggml's rwkv_wkv6: per head the output rᵀ (S + diag(u) k vᵀ) and the state
    S [N (key), N (value)] becoming diag(w_t) S + k_t v_tᵀ. r, k, v [B, T, H, N], u [H, N], log_w = log w_t
    [B, T, H, N] (the log: a decay near 0 is ~-1e4 there, and its gradient stays finite); state [B, H, N, N]
    (None: zeros) -> (out [B, T, H, N], the last state). One position is the step the cache runs; more run
    chunked (_diag_decay_chunked), differentiable throughout."""
    if r.shape[1] == 1:
        return _wkv6_stepped(r, k, v, u, log_w, state)
    return _diag_decay_chunked(r, k, v, log_w, state, chunk, bonus=u)


@ops.without_autocast  # (the trainer's bf16 autocast would run its products in bf16)
def _wkv6_stepped(r, k, v, u, log_w, state=None):
    """wkv6 position by position (its one-position step, and the reference of its chunked form)."""
    s = r.new_zeros(*r.shape[:1], *r.shape[2:], r.shape[-1]) if state is None else state
    w = log_w.exp()
    outs = []
    for t in range(r.shape[1]):
        kv = k[:, t, :, :, None] * v[:, t, :, None]
        outs.append(torch.einsum("bhi,bhij->bhj", r[:, t], s + u[..., None] * kv))
        s = s * w[:, t, :, :, None] + kv
    return torch.stack(outs, 1), s


@ops.without_autocast  # (the trainer's bf16 autocast would run its products in bf16)
def gated_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_g: torch.Tensor,
                           state: torch.Tensor | None = None,
                           chunk: int = DIAG_DECAY_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated linear attention in fp32, as ggml's gated_linear_attn (its scale already in q): per head the state
    S [N (key), N (value)] becoming diag(g_t) S + k_t v_tᵀ and the output S ᵀ q_t. q, k, v [B, T, H, N],
    log_g = log g_t [B, T, H, N]; state [B, H, N, N] (None: zeros) -> (out [B, T, H, N], the last state).
    One position is the step the cache runs; more run chunked (_diag_decay_chunked), differentiable
    throughout."""
    if q.shape[1] == 1:
        return _gla_stepped(q, k, v, log_g, state)
    return _diag_decay_chunked(q, k, v, log_g, state, chunk)


@ops.without_autocast  # (the trainer's bf16 autocast would run its products in bf16)
def _gla_stepped(q, k, v, log_g, state=None):
    """gated_linear_attention position by position (its one-position step, and the reference of its chunked
    form)."""
    s = q.new_zeros(*q.shape[:1], *q.shape[2:], q.shape[-1]) if state is None else state
    g = log_g.exp()
    outs = []
    for t in range(q.shape[1]):
        s = s * g[:, t, :, :, None] + k[:, t, :, :, None] * v[:, t, :, None]
        outs.append(torch.einsum("bhi,bhij->bhj", q[:, t], s))
    return torch.stack(outs, 1), s


@ops.without_autocast  # (the trainer's bf16 autocast would run its products in bf16)
def _diag_decay_chunked(q, k, v, log_w, state, chunk: int, bonus: torch.Tensor | None = None):
    """The recurrence S_t = diag(w_t) S_{t-1} + k_t v_tᵀ per head over T positions in chunks of `chunk`:
    within a chunk one masked product over its pairs of positions (i reads j <= i through the decays of
    the positions between), across chunks the state at each chunk's start, carried by the chunk's total
    decay. Without `bonus` out_t = S_tᵀ q_t (gated linear attention); with it (RWKV-6's u [H, N])
    out_t = (S_{t-1} + diag(bonus) k_t v_tᵀ)ᵀ q_t. Shapes as wkv6's; positions past T (padding to whole
    chunks) have k = v = 0 and w = 1."""
    bsz, t, h, n_k = k.shape
    chunk = min(chunk, t)
    pad = (-t) % chunk
    q, k, v, log_w = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, log_w))
    n = (t + pad) // chunk
    q, k, v, log_w = (x.reshape(bsz, n, chunk, h, -1).permute(0, 3, 1, 2, 4) for x in (q, k, v, log_w))
    # spans[i, j] = sum of log w_r over j < r <= i: sums of terms of one sign, never differences of cumulative
    # sums (which lose a weak decay's digits after a strong one), and never exp(+sum) (which overflows)
    later = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril(-1)[..., None]  # [r, j, 1]: r > j
    spans = log_w[..., :, None, :].expand(*log_w.shape[:-1], chunk, n_k).masked_fill(~later, 0).cumsum(-3)
    to_end = spans[..., -1, :, :]                                  # [B, H, n, C, N]: after j to the chunk's end
    since_start = log_w.cumsum(-2)                                 # the chunk's start to i, i included
    total = since_start[..., -1, :].exp()                          # [B, H, n, N]
    reads = later | torch.eye(chunk, dtype=torch.bool, device=q.device)[..., None]          # j <= i
    if bonus is not None:  # (position i reads the state before its own update: the decays strictly before i)
        spans = F.pad(spans[..., :-1, :, :], (0, 0, 0, 0, 1, 0))
        since_start = F.pad(since_start[..., :-1, :], (0, 0, 1, 0))
        reads = later
    pair = spans.masked_fill(~reads, float("-inf")).exp()
    scores = torch.einsum("...ix,...jx,...ijx->...ij", q, k, pair)
    if bonus is not None:
        scores = scores + torch.diag_embed((q * k * bonus[:, None, None]).sum(-1))
    ends = torch.einsum("...jx,...jy->...xy", k * to_end.exp(), v)      # each chunk's own part of its last state
    s = q.new_zeros(bsz, h, n_k, v.shape[-1]) if state is None else state
    starts, s = carried_states(s, total[..., None].unbind(2), ends.unbind(2))
    out = scores @ v + (q * since_start.exp()) @ torch.stack(starts, 2)
    return out.permute(0, 2, 3, 1, 4).reshape(bsz, n * chunk, h, -1)[:, :t], s


def shifted(x: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    """x [B, T, D] one position later: each position's predecessor, `last` [B, D] (None: zeros) first."""
    first = x.new_zeros(x.shape[0], 1, x.shape[2]) if last is None else last[:, None].to(x.dtype)
    return torch.cat([first, x[:, :-1]], 1)


def rwkv_linear_names(config: ModelConfig) -> tuple[str, ...]:
    """The linears of an RWKV layer of config's family: the time mix's and the channel mix's (ARWKV-7's and
    QRWKV6's gated MLP's)."""
    fam = config.family
    names = RWKV7_LINEAR_NAMES if fam.rwkv == 7 else RWKV6_LINEAR_NAMES
    if fam.rwkv_mlp:
        return tuple(n for n in names if not n.startswith("channel_mix_")) + ("ffn_gate", "ffn_up", "ffn_down")
    return names


class RwkvLayer(nn.Module):
    """One RWKV layer: the time mix, then the channel mix (ARWKV-7's and QRWKV6's: the gated MLP), each after its
    norm, on its input and the position before, and added to the residual stream (the module's docstring);
    RWKV-6's and RWKV-7's (their subclasses) differ in the mixes."""

    def __init__(self, config: ModelConfig, index: int, w: Mapping[str, object]):
        super().__init__()
        c, p = config, f"blk.{index}."
        self.config, self.index = c, index
        self.heads, self.head_size = c.n_heads, c.head_dim
        self.mlp = c.family.rwkv_mlp  # (ARWKV-7: the gated MLP without a token shift)
        ffn_norm = "ffn_norm" if self.mlp else "attn_norm_2"
        self.attn_norm = make_norm(c.family, w, p + "attn_norm", c.norm_eps, c.dim)
        self.ffn_norm = make_norm(c.family, w, p + ffn_norm, c.norm_eps, c.dim)
        self.norm_files = {"ffn_norm": ffn_norm}  # (the GGUF layer name of each norm whose attribute differs)
        # (RWKV-6: the residual stream halved after every rescale_every-th layer)
        self.halved = bool(c.rescale_every) and (index + 1) % c.rescale_every == 0
        for name in rwkv_linear_names(c):  # (QRWKV6's r, k and v with Qwen2's biases)
            setattr(self, name, QLinear(w[p + name + ".weight"], p + name + ".weight", w.get(p + name + ".bias")))
        if p + "time_mix_ln.weight" in w:  # (QRWKV6 has no norm of the wkv output)
            self.register_buffer("ln_weight", _vector(w[p + "time_mix_ln.weight"]), persistent=False)
            self.register_buffer("ln_bias", _vector(w[p + "time_mix_ln.bias"]), persistent=False)

    def forward(self, x: torch.Tensor, v_first: torch.Tensor | None, cache: KVCache | None = None,
                start: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, D] at positions start..start+T, v_first the first layer's values (RWKV-7's; None in the
        first layer) -> (x after both mixes, v_first)."""
        last = cache.conv_state.get(self.index) if cache is not None and start else None
        h = self.attn_norm(x)
        mixed, v_first = self.time_mix(h, shifted(h, None if last is None else last[:, 0]), v_first, cache, start)
        x = x + mixed
        f = self.ffn_norm(x)
        if cache is not None:
            cache.conv_state[self.index] = torch.stack([h[:, -1]] if self.mlp else [h[:, -1], f[:, -1]], 1)
        if self.mlp:
            x = x + self.ffn_down(glue_ops.gated("silu", self.ffn_gate(f), self.ffn_up(f)))
        else:
            x = x + self.channel_mix(f, shifted(f, None if last is None else last[:, 1]))
        return (x * 0.5 if self.halved else x), v_first

    def heads_of(self, y: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, T, H, N]."""
        return y.reshape(*y.shape[:2], self.heads, self.head_size)

    def wkv_state(self, cache: KVCache | None, start: int) -> torch.Tensor | None:
        return cache.recurrent_state.get(self.index) if cache is not None and start else None

    def normed_heads(self, out: torch.Tensor) -> torch.Tensor:
        """The wkv output [B, T, H, N] LayerNormed per head (llama.cpp's eps), scaled by time_mix_ln -> [B, T, D]."""
        normed = F.layer_norm(out, (self.head_size,), eps=GROUP_NORM_EPS).reshape(*out.shape[:2], -1)
        return normed * self.ln_weight + self.ln_bias

    def extra_repr(self) -> str:
        return f"{self.heads} heads of {self.head_size}, low ranks {self.config.wkv_lora_ranks}"


class Rwkv7Layer(RwkvLayer):
    """RWKV-7's layer (the module's docstring)."""

    def __init__(self, config: ModelConfig, index: int, w: Mapping[str, object]):
        super().__init__(config, index, w)
        c, p = config, f"blk.{index}."
        self.gated = bool(c.wkv_lora_ranks[3])  # (ARWKV-7 may have no gate, and then 5 lerps)
        frozen = {"lerp": _table(w[p + "time_mix_lerp_fused.weight"]).reshape(-1, c.dim)}
        if not self.mlp:
            frozen["lerp_k"] = _vector(w[p + "channel_mix_lerp_k.weight"])
        for x in LOW_RANK if self.gated else LOW_RANK[:-1]:
            if x != "g":  # (the gate has no bias)
                frozen[x + "0"] = _vector(w[f"{p}time_mix_{x}0.weight"])
            frozen[x + "1"], frozen[x + "2"] = (_table(w[f"{p}time_mix_{x}{j}.weight"]) for j in (1, 2))
        for x in ("k_k", "k_a", "r_k"):
            frozen[x] = _vector(w[f"{p}time_mix_{x}.weight"])
        for name, t in frozen.items():
            self.register_buffer(name, t, persistent=False)

    def channel_mix(self, f: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        k = self.channel_mix_key(f + (prev - f) * self.lerp_k.to(f.dtype))
        return self.channel_mix_value(torch.relu(k).square())

    def time_mix(self, h: torch.Tensor, prev: torch.Tensor, v_first: torch.Tensor | None, cache: KVCache | None,
                 start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """h [B, T, D] (normed) and its predecessors -> (what the time mix adds to the residual stream,
        v_first). The low-rank parts and the recurrence run in fp32, the linears in the activation dtype."""
        heads = self.heads_of
        hf = h.float()
        xr, xw, xk, xv, xa, *xg = hf + (prev.float() - hf) * self.lerp[:, None, None]
        r = self.time_mix_receptance(xr.to(h.dtype)).float()
        k = self.time_mix_key(xk.to(h.dtype)).float()
        v = self.time_mix_value(xv.to(h.dtype)).float()
        with torch.autocast(h.device.type, enabled=False):  # (fp32 under a trainer's bf16 autocast too)
            w = torch.exp(-DECAY_SCALE * torch.sigmoid(F.linear(torch.tanh(F.linear(xw, self.w1)), self.w2) + self.w0))
            if v_first is None:
                v_first = v
            else:
                v = v + (v_first - v) * torch.sigmoid(F.linear(F.linear(xv, self.v1), self.v2) + self.v0)
            a = torch.sigmoid(F.linear(F.linear(xa, self.a1), self.a2) + self.a0)
            g = F.linear(torch.sigmoid(F.linear(xg[0], self.g1)), self.g2) if self.gated else 1.0
        kk = F.normalize(heads(k * self.k_k), dim=-1, eps=1e-12)
        ka = k * self.k_a
        k = k + (a * ka - ka)
        out, state = wkv7(heads(r), heads(w), heads(k), heads(v), -kk, kk * heads(a), self.wkv_state(cache, start))
        if cache is not None:
            cache.recurrent_state[self.index] = state
        bonus = (heads(k) * heads(r) * self.r_k.reshape(self.heads, self.head_size)).sum(-1, keepdim=True)
        out = (self.normed_heads(out) + (heads(v) * bonus).flatten(2)) * g
        return self.time_mix_output(out.to(h.dtype)), v_first


class Rwkv6Layer(RwkvLayer):
    """RWKV-6's layer (the module's docstring)."""

    def __init__(self, config: ModelConfig, index: int, w: Mapping[str, object]):
        super().__init__(config, index, w)
        c, p = config, f"blk.{index}."
        mix_rank = c.wkv_lora_ranks[0]
        self.kv_heads = c.n_kv_heads  # (QRWKV6: k and v of fewer heads, each read by a group of r's)
        frozen = {"lerp_x": _vector(w[p + "time_mix_lerp_x.weight"]),
                  "lerp": _table(w[p + "time_mix_lerp_fused.weight"]).reshape(len(MIXES6), c.dim),
                  "w1": _table(w[p + "time_mix_w1.weight"]),
                  "w2": _table(w[p + "time_mix_w2.weight"]).reshape(len(MIXES6), c.dim, mix_rank),
                  "decay": _vector(w[p + "time_mix_decay.weight"]),
                  "decay_w1": _table(w[p + "time_mix_decay_w1.weight"]),
                  "decay_w2": _table(w[p + "time_mix_decay_w2.weight"])}
        if not self.mlp:  # (QRWKV6 has no bonus and no channel mix)
            frozen.update({"first": _table(w[p + "time_mix_first.weight"]).reshape(self.heads, self.head_size),
                           "lerp_k": _vector(w[p + "channel_mix_lerp_k.weight"]),
                           "lerp_r": _vector(w[p + "channel_mix_lerp_r.weight"])})
        for name, t in frozen.items():
            self.register_buffer(name, t, persistent=False)

    def channel_mix(self, f: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        k = self.channel_mix_key(f + (prev - f) * self.lerp_k.to(f.dtype))
        r = self.channel_mix_receptance(f + (prev - f) * self.lerp_r.to(f.dtype))
        return torch.sigmoid(r) * self.channel_mix_value(torch.relu(k).square())

    def time_mix(self, h: torch.Tensor, prev: torch.Tensor, v_first: None, cache: KVCache | None,
                 start: int) -> tuple[torch.Tensor, None]:
        """h [B, T, D] (normed) and its predecessors -> (what the time mix adds to the residual stream, None).
        The token-shift mix, the decay and the recurrence run in fp32, the linears in the activation dtype."""
        heads = self.heads_of
        hf = h.float()
        sx = prev.float() - hf
        with torch.autocast(h.device.type, enabled=False):  # (fp32 under a trainer's bf16 autocast too)
            mix = torch.tanh(F.linear(hf + sx * self.lerp_x, self.w1)).unflatten(-1, (len(MIXES6), -1))
            mix = torch.einsum("btje,jde->jbtd", mix, self.w2) + self.lerp[:, None, None]
        xw, xk, xv, xr, xg = hf + sx * mix
        r, k, v = (lin(x.to(h.dtype)).float() for lin, x in ((self.time_mix_receptance, xr), (self.time_mix_key, xk),
                                                              (self.time_mix_value, xv)))
        gate = self.time_mix_gate(xg.to(h.dtype)).float()
        with torch.autocast(h.device.type, enabled=False):  # (the decay w = exp(log_w), passed as its log)
            log_w = heads(-torch.exp(F.linear(torch.tanh(F.linear(xw, self.decay_w1)), self.decay_w2) + self.decay))
        if self.mlp:  # (QRWKV6: gated linear attention of k · (1 - w), r scaled, a sigmoid gate, no output norm)
            group = self.heads // self.kv_heads
            k, v = (y.unflatten(-1, (self.kv_heads, self.head_size)).repeat_interleave(group, 2) for y in (k, v))
            out, state = gated_linear_attention(heads(r) * self.head_size ** -0.5, k * (1 - log_w.exp()), v, log_w,
                                                self.wkv_state(cache, start))
            out = out.flatten(2) * torch.sigmoid(gate)
        else:
            out, state = wkv6(heads(r), heads(k), heads(v), self.first, log_w, self.wkv_state(cache, start))
            out = self.normed_heads(out) * F.silu(gate)
        if cache is not None:
            cache.recurrent_state[self.index] = state
        return self.time_mix_output(out.to(h.dtype)), None


class RwkvModel(Model):
    """lowtune.model.Model with RWKV's layers, RWKV-7's first layer's values passed on to the others."""

    def normed_layers(self, x: torch.Tensor, rot: torch.Tensor, cache: KVCache | None = None,
                      start: int = 0) -> torch.Tensor:
        recompute = self.gradient_checkpointing and torch.is_grad_enabled() and cache is None
        v_first = None
        for layer in self.layers:
            if recompute:
                x, v_first = checkpoint(lambda x, v, layer=layer: layer(x, v), x, v_first)
            else:
                x, v_first = layer(x, v_first, cache, start)
        return self.output_norm(x)


class Rwkv7Model(RwkvModel):
    """RWKV-7 (rwkv7) and ARWKV-7 (arwkv7)."""

    layer_class = Rwkv7Layer

    @staticmethod
    def own_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
        c = config
        d, f, mlp = c.dim, c.ffn_dim, c.family.rwkv_mlp
        low_rank = LOW_RANK if c.wkv_lora_ranks[3] else LOW_RANK[:-1]  # (ARWKV-7 without the gate)
        out = {}
        for i in range(c.n_layers):
            p = f"blk.{i}."
            # (the first layer's value mix is unused: the converter gives it the learning rate's shapes)
            ranks = dict(zip(LOW_RANK, c.wkv_lora_ranks))
            ranks["v"] = ranks["a"] if i == 0 else ranks["v"]
            for x in low_rank:
                if x != "g":
                    out[f"{p}time_mix_{x}0.weight"] = (d,)
                out[f"{p}time_mix_{x}1.weight"], out[f"{p}time_mix_{x}2.weight"] = (ranks[x], d), (d, ranks[x])
            out.update({p + n + ".weight": (d, d) for n in RWKV7_LINEAR_NAMES[:4]})
            out.update({p + n: (d,) for n in ("time_mix_k_k.weight", "time_mix_k_a.weight", "time_mix_r_k.weight",
                                              "time_mix_ln.weight", "time_mix_ln.bias", "attn_norm.weight")})
            out[p + "time_mix_lerp_fused.weight"] = (len(low_rank) + 2, d)  # (the inputs of r, w, k, v, a, g)
            if mlp:  # (Qwen2's RMSNorm and gated MLP)
                out.update({p + "ffn_norm.weight": (d,), p + "ffn_gate.weight": (f, d), p + "ffn_up.weight": (f, d),
                            p + "ffn_down.weight": (d, f)})
            else:
                out.update({p + n: (d,) for n in ("attn_norm.bias", "attn_norm_2.weight", "attn_norm_2.bias",
                                                  "channel_mix_lerp_k.weight")})
                out.update({p + "channel_mix_key.weight": (f, d), p + "channel_mix_value.weight": (d, f)})
        return out


class Rwkv6Model(RwkvModel):
    """RWKV-6 (rwkv6) and QRWKV6 (rwkv6qwen2)."""

    layer_class = Rwkv6Layer

    @staticmethod
    def own_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
        c = config
        d, f, (mix, decay), mlp = c.dim, c.ffn_dim, c.wkv_lora_ranks, c.family.rwkv_mlp
        kv = c.n_kv_heads * c.head_dim  # (QRWKV6's k and v)
        out = {}
        for i in range(c.n_layers):
            p = f"blk.{i}."
            out.update({p + n + ".weight": (d, d) for n in ("time_mix_receptance", "time_mix_gate", "time_mix_output")})
            out.update({p + "time_mix_key.weight": (kv, d), p + "time_mix_value.weight": (kv, d)})
            out.update({p + n: (d,) for n in ("time_mix_lerp_x.weight", "time_mix_decay.weight", "attn_norm.weight")})
            out.update({p + "time_mix_lerp_fused.weight": (len(MIXES6), d),
                        p + "time_mix_w1.weight": (len(MIXES6) * mix, d),
                        p + "time_mix_w2.weight": (len(MIXES6) * d, mix),
                        p + "time_mix_decay_w1.weight": (decay, d), p + "time_mix_decay_w2.weight": (d, decay)})
            if mlp:  # (Qwen2's biases of r, k and v, its RMSNorm and gated MLP)
                out.update({p + "time_mix_receptance.bias": (d,), p + "time_mix_key.bias": (kv,),
                            p + "time_mix_value.bias": (kv,), p + "ffn_norm.weight": (d,),
                            p + "ffn_gate.weight": (f, d), p + "ffn_up.weight": (f, d), p + "ffn_down.weight": (d, f)})
                continue
            out.update({p + n: (d,) for n in ("time_mix_ln.weight", "time_mix_ln.bias", "channel_mix_lerp_k.weight",
                                              "channel_mix_lerp_r.weight", "attn_norm.bias", "attn_norm_2.weight",
                                              "attn_norm_2.bias")})
            out.update({p + "time_mix_first.weight": (c.n_heads, c.head_dim), p + "channel_mix_key.weight": (f, d),
                        p + "channel_mix_value.weight": (d, f), p + "channel_mix_receptance.weight": (d, d)})
        return out
