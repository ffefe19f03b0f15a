"""Text generation with the KV cache: greedy, or temperature / top-k / top-p sampling.

    ids = generate(model, prompt_ids, max_new_tokens=32)                  # greedy
    ids = generate(model, prompt_ids, 64, temperature=0.8, top_p=0.95, seed=0, stop_ids={2})
    text = generate_text(model, tokenizer, "Hi!", chat=True)              # chat template applied
    stats = GenerationStats(); generate(model, ids, 32, stats=stats)      # prompt and decode speed

The prompt is run once (prefill), then one token per step against the cached keys/values. On a
GPU (layers not streamed, no sliding-window layers) each step replays a captured CUDA graph
(StepDecoder): the per-token host work of launching a few hundred kernels is paid once per
attention window, not per token; greedy steps also pass their token on the device, so the GPU
never waits for the host between them. On the CPU every family decodes through one compiled call
per token (lowtune._C.CpuDecoder, see cpu_decoder); anything else (adapters, streaming, bf16, LFM2's
short convolutions, Mamba2 layers and Qwen3.5's Gated DeltaNets, whose states neither the decoder nor
the captured steps keep) decodes through the model's forward.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from . import _C, glue_ops
from .model import (NO_ROPE, DecoderLayer, KVCache, LayerNorm, Model, ModelConfig, NoNorm, QEmbedding, QLinear,
                    RMSNorm, alibi_bias, alibi_slopes)


@dataclass
class GenerationStats:
    """What one generate() call did: the prompt's forward pass (prefill) and the one-token steps
    after it (each step's forward pass and sampling)."""
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    compiled_decoder: bool = False  # the steps ran through lowtune._C.CpuDecoder

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


# ModelConfig fields the compiled decoder implements; a field added to ModelConfig must hold its
# default until csrc/decode_kernels.h does it too (DeepSeek's latent attention and routing do not). (RoPE's
# variants reach the decoder as model.rope_rotation's tables, for a context of the cache's length, as the
# model's own steps pick LongRoPE's factors.)
_DECODER_CONFIG = {"vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim",
                   "rope_dim", "norm_eps", "rope_theta", "rope_linear_scale", "rope_yarn_factor",
                   "rope_yarn_beta_fast", "rope_yarn_beta_slow",
                   "rope_attn_factor", "rope_orig_context", "context_length", "arch", "attn_scale",
                   "embedding_scale", "residual_scale", "logit_scale", "sliding_window", "swa_layers",
                   "rope_theta_swa", "rope_linear_scale_swa", "attn_softcap", "final_softcap",
                   "attn_temperature",  # (only where 1 up to the cache's length: cpu_decoder)
                   "n_experts", "n_experts_used", "expert_ffn_dim", "shared_expert_ffn_dim", "expert_gating",
                   "moe_layers", "xielu", "sequential",  # (sequential: ModelConfig.parallel, which the decoder takes)
                   "expert_renorm"}  # (ModelConfig.renorms_experts, which the decoder takes)
# the gated MLP's activations the decoder computes, by their index there (csrc/decode_kernels.h: Activation)
_ACTIVATIONS = ("silu", "gelu_tanh", "swiglu_oai", "relu2", "xielu")
_UNGATED_GELU = 5  # cpu::Activation::kGeluTanhUngated: gelu_tanh of an MLP without a gate (Phi-2, GPT-NeoX, Falcon)
_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_NORMS = ("attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm")  # where a family has them


def _linears(layer: DecoderLayer) -> list[QLinear | None]:
    """The decoder's seven matrices of a layer (ffn_gate None in an MLP without a gate); a mixture
    of experts' gate, up and down are its experts', followed by its shared expert's where it has
    one (its router goes apart)."""
    moe = layer.ffn_moe
    if moe is None:
        return [getattr(layer, n, None) for n in _LINEARS]
    shared = [] if moe.ffn_gate_shexp is None else [moe.ffn_gate_shexp, moe.ffn_up_shexp, moe.ffn_down_shexp]
    return [getattr(layer, n) for n in _LINEARS[:4]] + [moe.gate_exps, moe.up_exps, moe.down_exps] + shared


def _norm_biases(layer: DecoderLayer) -> list[torch.Tensor | None]:
    """The biases of a layer's attn_norm and ffn_norm (LayerNorm's, where the file has them: Nemotron)."""
    return [getattr(getattr(layer, n, None), "bias", None) for n in ("attn_norm", "ffn_norm")]


def _positions_unscaled(c: ModelConfig, max_len: int) -> bool:
    """Whether no query is scaled by its position up to max_len (Ministral 3's attention
    temperature starts beyond the original context): captured steps and the compiled decoder
    compute the same at every position only then."""
    return not c.attn_temperature or max_len <= c.original_context


class _CompiledSteps:
    """model(token, cache) for one token at a time, through lowtune._C.CpuDecoder."""

    def __init__(self, model: Model, cache: KVCache):
        c, fam = model.config, model.config.family
        mat = lambda qt: (qt.format.type_id, qt.raw.data_ptr(), qt.shape[0], qt.shape[1])  # noqa: E731
        ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
        weight = lambda layer, name: getattr(layer, name).weight if hasattr(layer, name) else None  # noqa: E731

        def moe(layer) -> list[torch.Tensor | None]:  # router, shared gate, router bias, expert and selection biases
            m = layer.ffn_moe
            if m is None:
                return [None] * 7
            return [m.router.raw, m.shared_gate, m.router.bias, m.ffn_gate_exps_bias, m.ffn_up_exps_bias,
                    m.ffn_down_exps_bias, m.selection_bias]

        layers = [([mat(lin.weight) if lin is not None else (0, 0, 0, 0) for lin in _linears(layer)],
                   [ptr(layer.attn_norm.weight), ptr(getattr(layer, "ffn_norm", NoNorm()).weight),
                    cache.k[i].data_ptr(), cache.v[i].data_ptr(),
                    *(ptr(lin.bias if lin is not None else None) for lin in _linears(layer)[:7]),
                    *(ptr(weight(layer, n)) for n in _NORMS), *(ptr(t) for t in moe(layer)), ptr(layer.attn_sinks),
                    *(ptr(b) for b in _norm_biases(layer)), ptr(layer.xielu)],
                   -1 if layer.rope_kind == NO_ROPE else layer.rope_kind, layer.window)
                  for i, layer in enumerate(model.layers)]
        # (cos, sin) [kinds, max_len, rope_dim/2, 2] of every cache position, from
        # model.rope_rotation's tables (adjacent pairs: cosines at even places of C, sines at odd
        # places of S; halves: cosines in the first half of C, sines in the second of S)
        table, half = model.rope_rotation(0, cache.max_len), c.rope_dim // 2
        neox = fam.rope == "neox"
        if neox:
            cos, sin = table[:, 0, :, :half], table[:, 1, :, half:]
        else:
            cos, sin = table[:, 0, :, 0::2], table[:, 1, :, 1::2]
        self.rope = torch.stack((cos, sin), -1).contiguous()
        self.logits = torch.empty(c.vocab_size)
        self.model, self.cache = model, cache  # the decoder reads their tensors in place
        self.decoder = _C.CpuDecoder(
            (c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.rope_dim, c.ffn_dim, c.vocab_size,
             cache.max_len, float(c.norm_eps)),
            (neox, float(c.query_scale), float(model.tok_embd.scale), float(c.residual_scale), float(c.logit_scale),
             _UNGATED_GELU if not fam.gated and fam.activation == "gelu_tanh" else _ACTIVATIONS.index(fam.activation),
             float(c.attn_softcap), float(c.final_softcap), self.rope.shape[0],
             fam.qk_norm == "whole", fam.norm == "layer", c.parallel, fam.qk_norm_after_rope),
            (c.n_experts, c.n_experts_used, c.expert_width if c.n_experts else 0, c.shared_expert_ffn_dim,
             c.renorms_experts, c.expert_gating),
            layers, mat(model.tok_embd.weight), mat(model.head_weight()),
            model.output_norm.weight.data_ptr(), self.rope.data_ptr(), ptr(getattr(model.output_norm, "bias", None)))

    def __call__(self, token: int) -> torch.Tensor:
        pos = self.cache.length
        if pos >= self.cache.max_len:
            raise ValueError(f"KV cache holds {self.cache.max_len} positions; {pos + 1} were asked for")
        self.decoder.step(int(token), pos, self.logits.data_ptr())
        self.cache.length = pos + 1
        return self.logits


def cpu_decoder(model, cache) -> Callable[[int], torch.Tensor] | None:
    """A one-token step `step(token) -> logits [V]` that runs the whole model in one compiled call
    and extends `cache`, or None where it does not apply. It applies to every family exactly as
    lowtune.model runs it (no adapters or streaming, no config feature beyond those
    csrc/decode_kernels.h lists) on the CPU, in fp32, at batch 1, with every matrix in a quantized
    block format."""
    if type(model) is not Model or model.streamer is not None or model.dtype != torch.float32:
        return None  # (Gemma 3n's Gemma3nModel and Gemma 4's Gemma4Model among them: AltUp's copies, Laurel, layers
        #              of two widths and per-layer inputs are not csrc/decode_kernels.h's; their own steps decode them)
    c = model.config
    # the decoder's MLPs without a gate are relu²'s (Arcee, Nemotron), xIELU's (Apertus) and GELU's (StarCoder2,
    # GPT-NeoX, Falcon)
    other_ungated = not c.family.gated and c.family.activation not in ("relu2", "xielu", "gelu_tanh")
    if type(c) is not ModelConfig or c.family.activation not in _ACTIVATIONS or other_ungated or any(
            getattr(c, f.name) != f.default for f in dataclasses.fields(c) if f.name not in _DECODER_CONFIG):
        return None
    if model.device.type != "cpu" or not isinstance(cache, KVCache) or cache.k[0].shape[0] != 1:
        return None
    if c.kv_lora_rank:
        return None  # (DeepSeek's latent attention, keys and values of two widths: the model's own steps)
    if c.layer_widths:
        return None  # (Deci's layers of their own KV heads and FFN widths, without attention or an FFN, with a
        #             linear in attention's place: the model's own steps)
    if c.family.sub_norms:
        return None  # (BitNet's norms inside the attention and the MLP: the model's own steps)
    if c.family.moe_residual or c.experts_per_group:
        return None  # (Arctic's experts beside the layer, on its input; Grove MoE's adjugate experts: the model's own
        #             steps)
    if c.family.attn_gate:
        return None  # (AFMoE's output gate, its own product: the model's own steps)
    if not _positions_unscaled(c, cache.max_len):
        return None
    if model.position_embd is not None or model.token_embd_norm is not None:
        return None  # (GPT-2's learned positions, BLOOM's embedding norm: the model's own steps)
    if c.stateful_layers or c.expert_gating == 2 or c.family.chunked_attention:
        return None  # (LFM2's short convolutions, Mamba2 layers and Qwen3.5's DeltaNets, whose states the
        #             decoder does not keep; sigmoid routing: LFM2-MoE's, GLM-4.5 MoE's; Llama 4's chunks,
        #             L2-normed q/k and experts weighed on their input)
    if not all(t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu" for t in cache.k + cache.v):
        return None
    if type(model.tok_embd) is not QEmbedding or model.output is not None and (
            type(model.output) is not QLinear or model.output.bias is not None):
        return None
    mats = [model.tok_embd.weight, model.head_weight()]
    norms = (RMSNorm, NoNorm, LayerNorm)  # (PhiMoE's BiasedRMSNorm: the model's own steps)
    for layer in model.layers:
        if type(layer) is not DecoderLayer or type(layer.attn_norm) not in norms \
                or type(getattr(layer, "ffn_norm", NoNorm())) not in norms:
            return None
        linears = [lin for lin in _linears(layer) if lin is not None or c.family.gated]  # (Arcee: no gate)
        if not all(type(lin) is QLinear for lin in linears):
            return None  # adapters
        router = layer.ffn_moe.router if layer.ffn_moe is not None else None
        if router is not None and (router.format.name != "F32" or not router.raw.is_contiguous()):
            return None  # (a router in another format: the model's steps)
        if not all(type(getattr(layer, n)) is RMSNorm for n in _NORMS if hasattr(layer, n)):
            return None
        vectors = [lin.bias for lin in linears] + [layer.attn_sinks, layer.xielu] + _norm_biases(layer)
        if layer.ffn_moe is not None:
            m = layer.ffn_moe
            vectors += [m.router.bias, m.ffn_gate_exps_bias, m.ffn_up_exps_bias, m.ffn_down_exps_bias,
                        m.selection_bias]
            if (m.ffn_gate_exps_bias is None) != (m.ffn_up_exps_bias is None) \
                    or (m.ffn_gate_exps_bias is None) != (m.ffn_down_exps_bias is None):
                return None  # (the decoder takes the experts' three biases or none)
        if not all(b is None or (b.dtype == torch.float32 and b.is_contiguous() and b.device.type == "cpu")
                   for b in vectors):
            return None
        mats += [lin.weight for lin in linears]
    if not all(qt.format.quantized and qt.raw.is_contiguous() for qt in mats):
        return None
    return _CompiledSteps(model, cache)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> int:
    """One token id from logits [V]. temperature <= 0 is greedy (argmax). top_k > 0 keeps the k most
    likely tokens; top_p < 1 keeps the smallest set whose probability reaches top_p."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens strictly before it already reach top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


class StaticKVCache(KVCache):
    """A fixed-length KV cache (batch 1) whose one-token steps keep their shapes and addresses:
    the position written is the device tensor `pos`, and attention reads the first `window`
    positions under an additive mask of the filled ones (attn_mask: 0 where filled, -inf after).
    So one captured CUDA graph serves every step inside a window. The prompt (any number of
    tokens) goes through KVCache.store."""

    def __init__(self, config, max_len: int, device, dtype: torch.dtype):
        super().__init__(config, 1, max_len, device, dtype)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.window = max_len
        self.positions = torch.arange(max_len, device=device)
        # additive, in the activations' dtype: SDPA would turn a bool mask into this in every layer; under
        # ALiBi one a head [H, 1, max_len], each head's slope × (key pos - pos) where filled
        slopes = alibi_slopes(config)
        self.alibi = None if slopes is None else slopes.to(device).view(-1, 1, 1)
        self.bias = torch.zeros(max_len if slopes is None else (config.n_heads, 1, max_len), dtype=dtype,
                                device=device)
        self._open = torch.zeros((), dtype=dtype, device=device)
        self._shut = torch.full((), float("-inf"), dtype=dtype, device=device)

    def set_window(self, window: int) -> None:
        """Steps from now on attend over positions [0, window) (pos must stay below window)."""
        self.window = window
        # [1, window] (attention wants 2-D), or ALiBi's [H, 1, window]
        self.attn_mask = self.bias[:window].unsqueeze(0) if self.alibi is None else self.bias[..., :window]

    def store(self, layer: int, start: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              rot: torch.Tensor, style: str):
        if self.attn_mask is None or k.shape[2] != 1:
            return super().store(layer, start, q, k, v, rot, style)
        if layer == 0 and self.alibi is not None:  # the mask of this step, once for every layer
            filled = self.positions[:self.window] <= self.pos
            self.bias[..., :self.window].copy_(
                alibi_bias(self.alibi, filled, self.pos, self.positions[:self.window], self.bias.dtype))
        elif layer == 0:  # positions 0..pos
            torch.where(self.positions[:self.window] <= self.pos, self._open, self._shut,
                        out=self.bias[:self.window])
        q = glue_ops.rope_store(q, k, v, rot, style, self.k[layer], self.v[layer], self.pos)
        return q, self.k[layer][:, :, :self.window], self.v[layer][:, :, :self.window]

    def attend_step(self, layer, q, scale, cap):
        # where glue_ops' CUDA kernels take it, attention over the filled positions 0..pos only
        # (SDPA takes the whole window and the mask); soft-capped scores, head sizes the kernels
        # lack and the CPU keep the masked attention
        k, v = self.k[layer], self.v[layer]
        if self.attn_mask is None or cap or not glue_ops.decode_attention_fused(q, k, v, self.pos):
            return None
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        return glue_ops.decode_attention(q, k, v, self.pos, scale)


class StepDecoder:
    """Decodes one sequence: prefill(prompt) -> logits, then step(token) -> logits of the next
    position, or greedy(token, n) -> the next n greedy tokens, against a StaticKVCache. With
    graphs=True (CUDA only) each step replays a CUDA graph captured for its attention window (64,
    128, 256, ... positions, capped at max_len); the first step of a window runs eagerly (so
    one-time set-up stays outside the capture) and is then captured. The token and position go in
    through static device tensors. On CUDA the layers' q/k/v and gate/up products are grouped
    (DecoderLayer.group_products) unless group_products=False."""

    MIN_WINDOW = 64

    @staticmethod
    def refusal(model, max_len: int) -> str | None:
        """Why StepDecoder cannot decode `model` up to max_len positions, or None where it can."""
        c = model.config
        if getattr(model, "streamer", None) is not None:
            return "StepDecoder needs the model's layers resident (not streamed)"
        if c.family.altup:
            return ("StepDecoder's captured steps run lowtune.model's decoder layer, not Gemma 3n's (AltUp's copies, "
                    "Laurel, per-layer inputs, shared K/V); the model's own steps decode it")
        if c.family.layer_widths:
            return ("StepDecoder's captured steps run lowtune.model's decoder layer, not Gemma 4's (layers of two "
                    "widths, per-layer inputs, shared K/V); the model's own steps decode it")
        if c.family.rwkv:
            return ("StepDecoder's captured steps run lowtune.model's decoder layer, not RWKV's (token shifts and "
                    "wkv states); the model's own steps decode it")
        if any(c.is_sliding(i) for i in range(c.n_layers)):
            return "StepDecoder's one mask per step cannot express sliding-window or chunked (Llama 4) layers"
        if not _positions_unscaled(c, max_len):
            return ("StepDecoder's captured steps cannot scale queries by position (the attention temperature "
                    "beyond the original context)")
        if c.family.qk_norm_after_rope:
            return "StepDecoder's fused RoPE and cache write cannot norm k after RoPE (Hunyuan)"
        if c.kv_lora_rank:
            return ("StepDecoder's fused RoPE, cache write and attention take keys and values of one width, not "
                    "latent attention's (DeepSeek): decode with graphs=False, the model's steps")
        if c.stateful_layers:
            mamba2 = ("Mamba state (Mamba's selective scans, PLaMo 2's in heads)" if c.family.mamba1 else
                      "Mamba2 state (Granite 4's, Nemotron-H's, Mamba-2's and Falcon-H1's Mamba2 layers)")
            kind = ("short-convolution state (LFM2's convolution layers)" if c.conv_layers else
                    mamba2 if c.ssm_layers else "Gated DeltaNet state (Qwen3.5's recurrent layers)")
            return f"StepDecoder's captured steps keep no {kind}; decode with graphs=False"
        return None

    def __init__(self, model, max_len: int, graphs: bool = True, group_products: bool = True):
        why = self.refusal(model, max_len)
        if why is not None:
            raise ValueError(why)
        model.check_positions(max_len)  # (GPT-2's learned positions: its steps read their rows unchecked)
        dev = model.device
        self.model, self.max_len = model, max_len
        if group_products and dev.type == "cuda":
            for layer in model.layers:
                if isinstance(layer, DecoderLayer):
                    layer.group_products()
        self.cache = StaticKVCache(model.config, max_len, dev, model.dtype)
        self.ids = torch.zeros((1, 1), dtype=torch.long, device=dev)
        self.rot = model.rope_rotation(0, max_len).to(dev)  # [kinds, 2, max_len, rope_dim]
        self.graphs = graphs and dev.type == "cuda"
        # (window, greedy) -> (graph, its output)
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def prefill(self, prompt: Sequence[int]) -> torch.Tensor:
        """Logits [V] (float32) after the prompt."""
        ids = torch.tensor([list(prompt)], dtype=torch.long)
        return self.model(ids, self.cache)[0, -1]

    def _run(self, greedy: bool) -> torch.Tensor:
        """One step at the static token and position (the body a graph captures): its logits [V],
        or (greedy) its argmax, which also becomes the static token of the next step."""
        m, c = self.model, self.cache
        x = m.embed(self.ids, c.pos)
        rot = self.rot.index_select(2, c.pos)
        logits = m.lm_head(m.normed_layers(x, rot, c, 0)).float()[0, -1]
        if not greedy:
            return logits
        best = logits.argmax().view(1, 1)
        self.ids.copy_(best)
        return best

    def _advance(self, greedy: bool) -> torch.Tensor:
        """Run the step at position cache.length (graph replay where one is captured) and count it."""
        c = self.cache
        pos = c.length
        if pos >= self.max_len:
            raise ValueError(f"the decode cache holds {self.max_len} positions")
        window = self.MIN_WINDOW
        while window <= pos:
            window *= 2
        window = min(window, self.max_len)
        c.pos.fill_(pos)
        c.set_window(window)
        captured = self._graphs.get((window, greedy))
        if captured is not None:
            captured[0].replay()
            out = captured[1]
        else:
            out = self._run(greedy)
            if self.graphs:
                try:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self._pool):
                        captured_out = self._run(greedy)
                except RuntimeError as e:  # an operation that cannot be captured: stay eager
                    warnings.warn(f"decoding without CUDA graphs: the step could not be captured ({e})")
                    self.graphs = False
                else:
                    self._graphs[(window, greedy)] = (graph, captured_out)
                    self._pool = graph.pool()
        c.length = pos + 1
        return out

    def step(self, token: int) -> torch.Tensor:
        """Logits [V] of the position after `token`, which is appended at position cache.length.
        The tensor is overwritten by the next step."""
        self.ids.fill_(int(token))
        return self._advance(greedy=False)

    def greedy(self, token: int, n: int, stop_ids: Iterable[int] = (),
               on_token: Callable[[int], None] | None = None) -> list[int]:
        """The next n greedy tokens after `token` (appended at position cache.length), stopping
        after one in stop_ids. Each step's argmax becomes the next step's token on the device, so
        the host queues step i+1 before it reads token i back and the GPU does not wait for the
        host between steps. A stop token therefore costs one step run ahead (its position is
        written into the cache, which then holds one position more than the tokens returned)."""
        stop = set(int(t) for t in stop_ids)
        c = self.cache
        if c.length + n > self.max_len:
            raise ValueError(f"the decode cache holds {self.max_len} positions; "
                             f"{c.length + n} were asked for")
        self.ids.fill_(int(token))
        cuda = self.ids.is_cuda
        host = torch.empty(max(n, 1), dtype=torch.long, pin_memory=cuda)
        done: list[torch.cuda.Event | None] = []

        def queue(i: int) -> None:
            best = self._advance(greedy=True)
            host[i:i + 1].copy_(best.view(1), non_blocking=cuda)
            ev = None
            if cuda:
                ev = torch.cuda.Event()
                ev.record()
            done.append(ev)

        out: list[int] = []
        if n > 0:
            queue(0)
        for i in range(n):
            if i + 1 < n:
                queue(i + 1)
            if done[i] is not None:
                done[i].synchronize()
            tok = int(host[i])
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            if tok in stop:
                break
        return out


@torch.no_grad()
def generate(model, prompt_ids: Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             stop_ids: Iterable[int] = (), on_token: Callable[[int], None] | None = None,
             graphs: bool | None = None, stats: GenerationStats | None = None) -> list[int]:
    """New token ids after `prompt_ids` (the prompt is not included). Stops after max_new_tokens,
    at the model's context length, or after emitting a token in stop_ids (which is included).
    on_token(id) is called for every new token (for streaming).

    graphs: decode through StepDecoder with CUDA graphs (None: wherever the model is on a GPU, not
    streamed and has no sliding-window layers; False: plain steps). `stats`, when given, receives
    the prompt's and the decoding steps' token counts and seconds."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("the prompt is empty; give at least one token (e.g. BOS)")
    limit = model.config.context_length
    if len(prompt) >= limit:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the model's context is {limit}")
    max_new_tokens = min(max_new_tokens, limit - len(prompt))
    stop = set(int(t) for t in stop_ids)
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    stats = stats if stats is not None else GenerationStats()
    was_training = model.training
    model.eval()
    max_len = len(prompt) + max_new_tokens
    if graphs is None:
        # (and shapes that do not follow the data: a mixture of experts routes tokens by it)
        graphs = (model.device.type == "cuda" and not model.config.n_experts
                  and StepDecoder.refusal(model, max_len) is None)
    if graphs:
        decoder = StepDecoder(model, max_len)
        prefill, step = decoder.prefill, decoder.step
    else:
        cache = model.new_cache(1, max_len)
        prefill = lambda ids: model(torch.tensor([ids], dtype=torch.long), cache)[0, -1]  # noqa: E731
        step = cpu_decoder(model, cache)
        if step is None:
            step = lambda tok: model(torch.tensor([[tok]], dtype=torch.long), cache)[0, -1]  # noqa: E731
    stats.compiled_decoder = isinstance(step, _CompiledSteps)
    out: list[int] = []
    try:
        t0 = time.perf_counter()
        logits = prefill(prompt)
        stats.prompt_tokens, stats.prompt_seconds = len(prompt), time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(max_new_tokens):
            tok = sample_next(logits, temperature, top_k, top_p, generator)
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            if tok in stop or i == max_new_tokens - 1:
                break
            if graphs and temperature <= 0:  # greedy: the steps chain on the device
                rest = decoder.greedy(tok, max_new_tokens - 1 - i, stop, on_token)
                out += rest
                stats.decode_tokens += len(rest)
                break
            logits = step(tok)
            stats.decode_tokens += 1
        stats.decode_seconds = time.perf_counter() - t0
    finally:
        model.train(was_training)
    return out


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, chat: bool = False,
                  system: str | None = None, on_text: Callable[[str], None] | None = None,
                  **sampling) -> str:
    """Generate from a text prompt; returns only the new text. chat=True renders the prompt as a
    user turn with the tokenizer's chat template. Stops at end-of-generation tokens (EOS, EOT).
    on_text(piece) receives the new text as it becomes decodable (for streaming to a terminal)."""
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": prompt}]
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                               add_bos=False)
    else:
        ids = tokenizer.encode(prompt)
    stop = set(getattr(tokenizer, "eog_ids", ())) | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set())
    new: list[int] = []
    shown = 0

    def emit(tok: int) -> None:
        nonlocal shown
        new.append(tok)
        if on_text is None:
            return
        text = tokenizer.decode([t for t in new if t not in stop])
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            on_text(text[shown:])
            shown = len(text)

    generate(model, ids, max_new_tokens, stop_ids=stop, on_token=emit, **sampling)
    return tokenizer.decode([t for t in new if t not in stop])
