"""AdamW whose moments live in host memory: the GPU holds the parameters and their gradients.

    opt = HostAdamW(params, lr=1e-4)        # params on the GPU; exp_avg, exp_avg_sq in pinned host memory
    loss.backward(); opt.step()             # moments copied in, stepped, copied back

lowtune.streaming's planner moves the optimizer state to the host when that is what lets a model
train within its GPU budget (StreamPlan.optimizer_on_host); make_adamw picks this class then.

A step streams the moments through two GPU staging buffers, chunk by chunk (the next chunk's copy
in overlaps this chunk's update, its copy out the next update; copies in and out go on two streams,
so that both directions of the bus carry at once), and updates each chunk with
torch's fused AdamW kernel, after the same step-count increment: the arithmetic of
torch.optim.AdamW(fused=True), element for element. The moments of a chunk share one pinned
buffer ([exp_avg | exp_avg_sq]), so a chunk crosses the bus in one copy each way; state_dict()
holds compact copies, and load_state_dict() takes the state of any AdamW.
"""
from __future__ import annotations

import torch

# Parameters are grouped into chunks of about this many bytes of moments (a parameter larger than
# this is a chunk of its own); the GPU holds two chunks at a time.
CHUNK_BYTES = 8 << 20


def chunk_sizes(params_bytes: list[int]) -> list[int]:
    """Bytes of parameters in each chunk, for parameters of these byte sizes in order: consecutive
    parameters up to CHUNK_BYTES together (a larger one alone)."""
    chunks, current = [], 0
    for b in params_bytes:
        if current and current + b > CHUNK_BYTES:
            chunks.append(current)
            current = 0
        current += b
    return chunks + ([current] if current else [])


def staging_bytes(params_bytes: list[int]) -> int:
    """GPU bytes a step stages, for fp32 trainable parameters of these byte sizes: two buffers,
    each for the moments (exp_avg and exp_avg_sq) of the largest chunk."""
    return 2 * 2 * max(chunk_sizes(params_bytes), default=0)


# torch.optim.AdamW's settings for the arithmetic this class does: its checkpoints load into
# torch's AdamW as a fused AdamW.
_ARITHMETIC = dict(amsgrad=False, maximize=False, foreach=None, capturable=False, differentiable=False,
                   fused=True, decoupled_weight_decay=True)


class HostAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW(fused=True) with exp_avg and exp_avg_sq in pinned host memory (see the
    module docstring), for fp32 parameters on one device. No amsgrad, maximize or differentiable."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        if not lr >= 0 or not eps >= 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1:
            raise ValueError(f"invalid AdamW settings: lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **_ARITHMETIC))
        self._chunks: list[list[_Chunk]] | None = None
        self._staging: list[torch.Tensor] = []
        self._copy_stream = None     # host -> GPU copies of the moments
        self._out_stream = None      # GPU -> host: on a stream of its own, so both directions run at once

    # -- layout -----------------------------------------------------------------------------------

    def _layout(self) -> list[list["_Chunk"]]:
        """Chunks of every group's parameters (in order), each with its pinned [m | v] buffer; the
        state of each parameter: a step count on its device and views of its chunk's buffer."""
        if self._chunks is not None:
            return self._chunks
        chunks = []
        for group in self.param_groups:
            params = group["params"]
            if any(p.dtype != torch.float32 for p in params):
                raise ValueError(f"HostAdamW keeps fp32 parameters, got {sorted({str(p.dtype) for p in params})}")
            group_chunks, start = [], 0
            for nbytes in chunk_sizes([4 * p.numel() for p in params]):
                end, acc = start, 0
                while acc < nbytes:
                    acc += 4 * params[end].numel()
                    end += 1
                group_chunks.append(_Chunk(params[start:end]))
                start = end
            chunks.append(group_chunks)
        for chunk in (c for g in chunks for c in g):
            for p, m, v in chunk.views(chunk.host):
                state = self.state[p]
                old_m, old_v = state.get("exp_avg"), state.get("exp_avg_sq")
                if old_m is not None:    # loaded before the first step
                    m.copy_(old_m)
                    v.copy_(old_v)
                state["exp_avg"], state["exp_avg_sq"] = m, v
                step = state.get("step")
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                if step is not None:
                    state["step"].fill_(float(step))
        biggest = max((c.numel for g in chunks for c in g), default=0)
        devices = {c.params[0].device for g in chunks for c in g}
        if len(devices) > 1:
            raise ValueError(f"HostAdamW needs every parameter on one device, got {sorted(map(str, devices))}")
        if devices:
            device = devices.pop()
            self._staging = [torch.empty(2 * biggest, dtype=torch.float32, device=device) for _ in range(2)]
            if device.type == "cuda":
                self._copy_stream = torch.cuda.Stream(device)
                self._out_stream = torch.cuda.Stream(device)
        self._chunks = chunks
        return chunks

    # -- the step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        chunks = self._layout()
        work = [(group, chunk) for group, group_chunks in zip(self.param_groups, chunks)
                for chunk in group_chunks if any(p.grad is not None for p in chunk.params)]
        if not work:
            return loss
        cuda = self._copy_stream is not None
        compute = torch.cuda.current_stream(self._staging[0].device) if cuda else None
        loaded, updated = [None, None], [None, None]

        def load(i):
            slot = i % 2
            chunk = work[i][1]
            dst = self._staging[slot][:2 * chunk.numel]
            if cuda:
                with torch.cuda.stream(self._copy_stream):
                    if updated[slot] is not None:   # the copy out of this slot's last chunk
                        self._copy_stream.wait_event(updated[slot])
                    dst.copy_(chunk.host, non_blocking=True)
                    loaded[slot] = torch.cuda.Event()
                    loaded[slot].record(self._copy_stream)
            else:
                dst.copy_(chunk.host)

        load(0)
        for i, (group, chunk) in enumerate(work):
            slot = i % 2
            if i + 1 < len(work):
                load(i + 1)
            if cuda:
                compute.wait_event(loaded[slot])
            staged = self._staging[slot][:2 * chunk.numel]
            ps, ms, vs, steps = chunk.staged(slot, staged, self.state)
            gs = [p.grad for p in ps]
            if any(g is None for g in gs):           # some parameters had no gradient this step
                keep = [j for j, g in enumerate(gs) if g is not None]
                ps, gs, ms, vs, steps = ([xs[j] for j in keep] for xs in (ps, gs, ms, vs, steps))
            if any(g.is_sparse for g in gs):
                raise RuntimeError("HostAdamW does not take sparse gradients")
            beta1, beta2 = group["betas"]
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(ps, gs, ms, vs, [], steps, amsgrad=False, lr=group["lr"], beta1=beta1,
                                beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                                maximize=False, grad_scale=None, found_inf=None)
            if cuda:
                done = torch.cuda.Event()
                done.record(compute)
                with torch.cuda.stream(self._out_stream):
                    self._out_stream.wait_event(done)
                    chunk.host.copy_(staged, non_blocking=True)
                    updated[slot] = torch.cuda.Event()
                    updated[slot].record(self._out_stream)
            else:
                chunk.host.copy_(staged)
        if cuda:
            self._out_stream.synchronize()    # the host's moments are this step's when step returns
        return loss

    # -- saving and loading -------------------------------------------------------------------------

    def state_dict(self):
        sd = super().state_dict()
        # compact copies in new dicts (the packed state shares this optimizer's dicts), not views
        # of the chunk buffers
        sd["state"] = {i: {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in s.items()}
                       for i, s in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict) -> None:
        """Any AdamW's state (torch's, or this class's), kept in host memory."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(g["params"]) != len(mine["params"]) for g, mine in zip(groups, self.param_groups)):
            raise ValueError("the optimizer state was saved for other parameters (groups or sizes differ)")
        saved = state_dict["state"]
        for g, mine in zip(groups, self.param_groups):
            for key, value in g.items():
                if key != "params" and key not in _ARITHMETIC:
                    mine[key] = value
            for index, p in zip(g["params"], mine["params"]):
                s = saved.get(index)
                if not s:
                    continue
                state = self.state[p]
                if "exp_avg" in state:        # laid out already: into the host buffers
                    state["exp_avg"].copy_(s["exp_avg"])
                    state["exp_avg_sq"].copy_(s["exp_avg_sq"])
                    state["step"].fill_(float(s["step"]))
                else:                         # taken into the buffers at the first step
                    state.update({k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in s.items()})


class _Chunk:
    """Consecutive parameters whose moments share one pinned host buffer [exp_avg | exp_avg_sq]."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.numel = sum(p.numel() for p in params)
        pin = params[0].device.type == "cuda"
        self.host = torch.zeros(2 * self.numel, dtype=torch.float32, pin_memory=pin)
        self._staged: dict[int, tuple] = {}    # slot -> (buffer, its lists)

    def staged(self, slot: int, flat: torch.Tensor, state) -> tuple[list, list, list, list]:
        """(parameters, exp_avg views, exp_avg_sq views, step tensors) with the moments in staging
        buffer `slot` (`flat`), made once: the buffers and step tensors stay, and a 7B's ~1300 LoRA
        factors would otherwise cost thousands of slicing calls and lookups a step."""
        key = (flat.data_ptr(), flat.numel())
        got = self._staged.get(slot)
        if got is None or got[0] != key:
            ps, ms, vs = (list(xs) for xs in zip(*self.views(flat)))
            got = self._staged[slot] = (key, (ps, ms, vs, [state[p]["step"] for p in ps]))
        return got[1]

    def views(self, flat: torch.Tensor):
        """(param, exp_avg view, exp_avg_sq view) of each parameter inside `flat` ([m | v])."""
        off = 0
        for p in self.params:
            n = p.numel()
            yield p, flat[off:off + n].view(p.shape), flat[self.numel + off:self.numel + off + n].view(p.shape)
            off += n


def make_adamw(params, on_host: bool, **kwargs) -> torch.optim.Optimizer:
    """AdamW for `params`: HostAdamW when the optimizer state is to live in host memory (the
    streaming plan says so), else torch's (fused on CUDA when `fused` is given so)."""
    if on_host:
        kwargs.pop("fused", None)
        kwargs.pop("foreach", None)
        return HostAdamW(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


__all__ = ["CHUNK_BYTES", "HostAdamW", "chunk_sizes", "make_adamw", "staging_bytes"]
