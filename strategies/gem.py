"""Gradient projection with an episodic memory: GEM and A-GEM."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from strategies.base import Strategy, on_device
from strategies.context import Batch, Context
from strategies.registry import register_strategy
from streams.experience import TensorData


class _EpisodicMemory(Strategy):
    """`patterns_per_experience` samples drawn at random from each experience, kept per
    experience; both GEM and A-GEM take gradients on them.

    On several processes the memory (drawn from generators every process shares) is the same
    on each; each takes the gradient of its share of a memory's rows, and the gradients are
    added over the processes (`_gradient`), so every process projects the step's gradient
    (already averaged over them) onto the same constraints as one process does."""

    data_parallel = True

    def __init__(self, patterns_per_experience: int):
        if patterns_per_experience < 1:
            raise ValueError(f"patterns_per_experience must be positive, got {patterns_per_experience}")
        self.patterns_per_experience = patterns_per_experience
        self.memories: list[dict[str, torch.Tensor]] = []

    def after_experience(self, ctx: Context, data: TensorData) -> None:
        pick = torch.randperm(len(data), generator=self.rng)[: self.patterns_per_experience]
        sample = data.subset(pick)
        self.memories.append({"x": sample.x.to(ctx.device), "y": sample.y.to(ctx.device),
                              "t": sample.t.to(ctx.device)})

    def _gradient(self, ctx: Context, x, y, t) -> torch.Tensor:
        """The flat gradient of the cross-entropy on (raw) memory samples (the mean over them)."""
        ctx.model.zero_grad(set_to_none=True)
        if ctx.world == 1:
            F.cross_entropy(ctx.forward(ctx.prepare(x), t), y).backward()
            return _flat_grad(self._params)
        # This process's rows' part of the mean, then the sum over the processes.
        mine = ctx.shard(torch.arange(len(y), device=y.device))
        if len(mine):
            out = ctx.forward(ctx.prepare(x[mine]), t[mine])
            (F.cross_entropy(out, y[mine], reduction="sum") / len(y)).backward()
        flat = _flat_grad(self._params)
        ctx.all_reduce(flat)
        return flat

    def before_experience(self, ctx: Context) -> None:
        self._params = [p for p in ctx.model.parameters() if p.requires_grad]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "memories": [{k: v.cpu() for k, v in m.items()} for m in self.memories]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.memories = on_device(list(state["memories"]), getattr(self, "device", None))


def _flat_grad(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def _set_grad(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    start = 0
    for p in params:
        n = p.numel()
        p.grad = flat[start:start + n].view_as(p).clone()
        start += n


@register_strategy("gem")
class GEM(_EpisodicMemory):
    """Gradient Episodic Memory (Lopez-Paz and Ranzato 2017). With g the gradient on the
    incoming batch and G the matrix of gradients on the memory of each earlier task, when
    any <g, G_k> < 0 the update is the projection of g onto {g~ : G g~ >= 0}, found through
    the dual quadratic programme of the paper's eqs. 10-11,

        min_v  1/2 v^T G G^T v + g^T G^T v   s.t.  v >= gamma,      g~ = G^T v + g,

    solved with `quadprog`. gamma (`memory_strength`, the margin of the paper's code, 0.5)
    biases the update towards gradients that also lower old tasks' losses. Memory:
    `patterns_per_experience` random samples of each experience (the paper's 256 per task
    for MNIST; 100 in the reference workload)."""

    def __init__(self, patterns_per_experience: int = 256, memory_strength: float = 0.5):
        super().__init__(patterns_per_experience)
        self.memory_strength = memory_strength

    def after_backward(self, ctx: Context, batch: Batch) -> None:
        if not self.memories:
            return
        g = _flat_grad(self._params)
        G = torch.stack([self._gradient(ctx, m["x"], m["y"], m["t"]) for m in self.memories])
        if (G @ g < 0).any():
            g = self.project(g, G, self.memory_strength)
        _set_grad(self._params, g)

    @staticmethod
    def project(g: torch.Tensor, G: torch.Tensor, margin: float, ridge: float = 1e-8) -> torch.Tensor:
        """g~ = G^T v + g with v solving the dual QP above (quadprog: min 1/2 v'Pv - q'v, C'v >= b)."""
        import quadprog

        memories = G.double().cpu().numpy()
        P = memories @ memories.T
        # Symmetric and strictly positive definite for quadprog. The ridge relaxes each
        # constraint by ridge * v, so it is kept relative to P's scale (the paper's code adds
        # an absolute 1e-3, which lets the projected gradient oppose a task by up to that).
        P = 0.5 * (P + P.T) + ridge * max(float(np.trace(P)) / len(P), 1e-30) * np.eye(len(P))
        q = -(memories @ g.double().cpu().numpy())
        v = quadprog.solve_qp(P, q, np.eye(len(P)), np.full(len(P), margin))[0]
        return (torch.from_numpy(v @ memories) + g.double().cpu()).to(g.dtype).to(g.device)


@register_strategy("agem")
class AGEM(_EpisodicMemory):
    """Averaged GEM (Chaudhry et al. 2019, "Efficient Lifelong Learning with A-GEM"): one
    reference gradient from a random sample of the memory replaces GEM's per-task constraints.

    g_ref is taken on `sample_size` samples drawn at random from the memory of every
    earlier experience; when g^T g_ref < 0,

        g~ = g - (g^T g_ref / g_ref^T g_ref) g_ref,

    so the update never increases the loss on the reference sample to first order.
    Defaults: 256 samples per experience and a reference sample of 256, as in the paper
    for MNIST (the reference workload uses 100 and 64)."""

    def __init__(self, patterns_per_experience: int = 256, sample_size: int = 256):
        super().__init__(patterns_per_experience)
        if sample_size < 1:
            raise ValueError(f"sample_size must be positive, got {sample_size}")
        self.sample_size = sample_size
        self._pool: dict[str, torch.Tensor] | None = None  # every memory in one tensor, rebuilt when they change

    def after_experience(self, ctx: Context, data: TensorData) -> None:
        super().after_experience(ctx, data)
        self._pool = None

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._pool = None

    def after_backward(self, ctx: Context, batch: Batch) -> None:
        if not self.memories:
            return
        g = _flat_grad(self._params)
        if self._pool is None:
            self._pool = {k: torch.cat([m[k] for m in self.memories]) for k in ("x", "y", "t")}
        pool = self._pool
        pick = torch.randperm(len(pool["y"]), generator=self.rng)[: self.sample_size].to(pool["y"].device)
        g_ref = self._gradient(ctx, pool["x"][pick], pool["y"][pick], pool["t"][pick])
        # Projected only when the dot product is negative; written without a branch so the
        # device never has to report the sign back to the host.
        g = g - torch.clamp(g @ g_ref, max=0.0) / (g_ref @ g_ref).clamp_min(1e-12) * g_ref
        _set_grad(self._params, g)
