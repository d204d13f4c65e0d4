"""Compute-equivalent replay: a fixed fraction of every batch comes from earlier experiences."""
from __future__ import annotations

import math

import torch

from strategies.base import Strategy
from strategies.context import Batch, Context
from strategies.registry import register_strategy
from streams.experience import TensorData


@register_strategy("mixed_replay")
class MixedReplay(Strategy):
    """Compute-equivalent replay (Ibrahim et al. 2024, "Simple and Scalable Strategies to
    Continually Pre-train Large Language Models", Sec. 4.2): a fraction `fraction` of every
    batch's rows is drawn from a memory of earlier experiences and replaces as many incoming
    rows, so the batch size and the compute stay those of training without replay and the
    new data seen shrinks by that fraction. With a batch of B rows, floor(fraction * B) rows
    are replayed, plus one more with probability frac(fraction * B), so the share is exact
    in expectation at any batch size (1% of 32 rows: one replayed row in about every third
    batch). Ibrahim et al. replay 5% for a weak shift and 25% for a new language.

    The memory holds `memory_size` rows (for a token stream a row is one sequence of
    `block_size` tokens) split equally between the experiences seen, each share a uniform
    random sample of its experience's training data, on the training device.

    On several processes nothing is split here: the rows are drawn from generators every
    process shares, so each holds the same batch, and the loss over it is the trainer's.

    It reports (`metrics`) what it actually mixed, counted on the host as it draws: the
    share of replayed rows among the rows trained once the memory held something
    (`replay_fraction`, against the `fraction` asked for; the first experience has nothing
    to replay and is left out), and per task (a token stream's domain) the tokens trained as new data
    (`new_tokens_task{j}`) and replayed from its memory share (`replayed_tokens_task{j}`);
    a row of a token stream is one sequence, and of any other stream it counts as one."""

    data_parallel = True

    def __init__(self, fraction: float = 0.05, memory_size: int = 2000):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"fraction must be in [0, 1), got {fraction}")
        if memory_size < 1:
            raise ValueError(f"memory_size must be positive, got {memory_size}")
        self.fraction, self.memory_size = fraction, int(memory_size)
        self.memory: list[dict[str, torch.Tensor]] = []  # one {x, y, t} per experience seen
        self._pool: dict[str, torch.Tensor] | None = None  # the shares concatenated, for sampling
        self.origins: list[int] = []  # the task of each memory share
        self.new_tokens: dict[int, int] = {}  # task -> tokens trained as new data
        self.replayed_tokens: dict[int, int] = {}  # task -> tokens replayed from its share
        self.tokens_with_memory = 0  # tokens trained while the memory held something to replay

    def n_replayed(self, batch_rows: int) -> int:
        """How many of a batch's rows to replay: fraction * rows, stochastically rounded."""
        expected = self.fraction * batch_rows
        whole = math.floor(expected)
        extra = torch.rand((), generator=self.rng).item() < expected - whole
        return min(whole + int(extra), batch_rows - 1)  # always keep one incoming row

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        self.device = ctx.device

    def adapt_batch(self, ctx: Context, batch: Batch) -> None:
        k = self.n_replayed(len(batch.y)) if self.memory and self.fraction > 0 else 0
        row = batch.x_raw[0].numel() if batch.y.dim() > 1 else 1  # the tokens a row holds
        task = _task_of(ctx)
        self.new_tokens[task] = self.new_tokens.get(task, 0) + (len(batch.y) - k) * row
        self.tokens_with_memory += len(batch.y) * row if self.memory else 0
        if k == 0:
            return
        batch.drop_incoming(k)
        pool = self._pool
        drawn = torch.randint(len(pool["y"]), (k,), generator=self.rng)
        origins, counts = torch.unique(self._origin[drawn], return_counts=True)  # on the host: no sync
        for origin, n in zip(origins.tolist(), counts.tolist()):
            self.replayed_tokens[origin] = self.replayed_tokens.get(origin, 0) + n * row
        idx = drawn.to(pool["y"].device)
        batch.append(self, pool["x"][idx], pool["y"][idx], pool["t"][idx])

    def metrics(self) -> dict[str, float]:
        out = {"replay_fraction": sum(self.replayed_tokens.values()) / max(self.tokens_with_memory, 1)}
        out.update({f"new_tokens_task{j}": float(n) for j, n in sorted(self.new_tokens.items())})
        out.update({f"replayed_tokens_task{j}": float(n) for j, n in sorted(self.replayed_tokens.items())})
        return out

    def after_experience(self, ctx: Context, data: TensorData) -> None:
        seen = len(self.memory) + 1
        quota = self.memory_size // seen
        if quota < 1:
            raise ValueError(f"memory_size {self.memory_size} cannot hold a row for each of {seen} experiences")
        take = torch.randperm(len(data), generator=self.rng)[:quota]
        rows = {k: v[take.to(v.device)].to(ctx.device) for k, v in (("x", data.x), ("y", data.y), ("t", data.t))}
        # Earlier shares shrink to the new quota; they were random samples, so a prefix is one too.
        self.memory = [{k: v[:quota] for k, v in share.items()} for share in self.memory] + [rows]
        self.origins.append(_task_of(ctx))
        self._build_pool()

    def _build_pool(self) -> None:
        self._pool = {k: torch.cat([share[k] for share in self.memory]) for k in ("x", "y", "t")}
        # The task each pooled row came from, on the host, so that counting the draws needs no sync.
        self._origin = torch.cat([torch.full((len(share["y"]),), origin, dtype=torch.long)
                                  for share, origin in zip(self.memory, self.origins)])

    def state_dict(self) -> dict:
        return {**super().state_dict(), "memory": [{k: v.clone() for k, v in s.items()} for s in self.memory],
                "origins": list(self.origins), "new_tokens": sorted(self.new_tokens.items()),
                "replayed_tokens": sorted(self.replayed_tokens.items()), "tokens_with_memory": self.tokens_with_memory}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.memory = [{k: v.to(self.device) for k, v in share.items()} for share in state["memory"]]
        self.origins = list(state.get("origins", range(len(self.memory))))
        self.new_tokens = {int(j): int(n) for j, n in state.get("new_tokens", [])}
        self.replayed_tokens = {int(j): int(n) for j, n in state.get("replayed_tokens", [])}
        self.tokens_with_memory = int(state.get("tokens_with_memory", 0))
        if self.memory:
            self._build_pool()


def _task_of(ctx: Context) -> int:
    """The task the current experience trains (its index where it mixes several)."""
    e = ctx.experience
    return e.task_index if e.task_index is not None else e.index
