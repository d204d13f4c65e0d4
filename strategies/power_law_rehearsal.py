"""Rehearsal of earlier tasks whose amount falls as a power of their age."""
from __future__ import annotations

from typing import Literal

import torch

from strategies.base import Strategy
from strategies.context import Context
from strategies.registry import register_strategy
from streams.experience import TensorData, concat_data
from streams.power_law import power_law_schedule


def apportion(total: int, weights: list[float]) -> list[int]:
    """Split `total` into integers proportional to `weights` (largest remainders), summing to total."""
    if not weights:
        return []
    s = sum(weights)
    exact = [total * w / s for w in weights]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))[: total - sum(counts)]:
        counts[i] += 1
    return counts


@register_strategy("power_law_rehearsal")
class PowerLawRehearsal(Strategy):
    """Power-law rehearsal (Gandhi et al. 2024, "Catastrophic Interference is Mitigated in
    Naturalistic Power-Law Learning Environments"; later version "Natural Mitigation of
    Catastrophic Interference...", arXiv 2401.10393): people meet old knowledge again with a
    probability that falls as a power of the time since (Anderson and Schooler 1991), and
    rehearsing on that schedule mitigates forgetting.

    After each experience the task it taught is stored (`memory_per_task` random samples,
    or all of them); each later experience trains on its own data plus rehearsal samples of
    every earlier task j, drawn from its store. With dt_j = experiences since task j's own
    experience (rehearsal does not reset it, or every task would get the same share):

    - `mode: share`: a budget of `budget` samples per experience split in proportion to
      w_j = dt_j^-alpha (`schedule: power_law`), or, as controls at the same budget,
      w_j = 1 (`uniform`) or w_j = decay^dt_j (`exponential`);
    - `mode: sampled`: task j recurs in an experience with probability p0 * dt^-alpha, dt
      counted from its last recurrence as in the lab's power-law environment, rehearsing
      `recurrence_size` samples; `schedule: uniform` places the same number of recurrences
      uniformly over the same (experience, task) pairs. Needs one experience per task.

    The paper's exact schedule constants are not in what we could read: they are arguments.
    `amounts` records, per experience, how many samples of each task were rehearsed.

    On several processes each draws the same rehearsal (a shared generator): only the
    training data changes, which the trainer splits."""

    data_parallel = True

    def __init__(self, budget: int = 1000, alpha: float = 1.0,
                 schedule: Literal["power_law", "uniform", "exponential"] = "power_law", decay: float = 0.5,
                 mode: Literal["share", "sampled"] = "share", p0: float = 0.5, recurrence_size: int = 256,
                 memory_per_task: int | None = None):
        if schedule not in ("power_law", "uniform", "exponential"):
            raise ValueError(f"schedule must be 'power_law', 'uniform' or 'exponential', got '{schedule}'")
        if mode not in ("share", "sampled"):
            raise ValueError(f"mode must be 'share' or 'sampled', got '{mode}'")
        if mode == "sampled" and schedule == "exponential":
            raise ValueError("the exponential control is a share schedule: use mode: share")
        if budget < 0 or alpha < 0 or not 0 < decay < 1 or not 0 < p0 <= 1:
            raise ValueError("budget and alpha must be non-negative, decay in (0, 1) and p0 in (0, 1]")
        self.budget, self.alpha, self.schedule, self.decay = budget, alpha, schedule, decay
        self.mode, self.p0, self.recurrence_size = mode, p0, recurrence_size
        self.memory_per_task = memory_per_task
        self.store: dict[int, TensorData] = {}
        self.first_seen: dict[int, int] = {}
        self.amounts: list[dict[int, int]] = []

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        self.recurrences: dict[int, list[int]] = {}
        if self.mode == "sampled":
            if not ctx.stream.one_experience_per_task:
                raise ValueError("power-law rehearsal in sampled mode needs one experience per task")
            n = len(ctx.stream)
            plan = power_law_schedule(n, n, self.alpha, self.p0, ctx.strategy_seed(self) % 2**31, self.schedule)
            for p, j, _ in plan["recurrences"]:
                self.recurrences.setdefault(p, []).append(j)

    def weights(self, ages: list[int]) -> list[float]:
        if self.schedule == "power_law":
            return [float(dt) ** -self.alpha for dt in ages]
        if self.schedule == "exponential":
            return [self.decay ** dt for dt in ages]
        return [1.0] * len(ages)

    def plan(self, index: int) -> dict[int, int]:
        """Samples of each stored task rehearsed in experience `index`."""
        tasks = sorted(self.store)
        if self.mode == "sampled":
            return {j: self.recurrence_size for j in self.recurrences.get(index, []) if j in self.store}
        ages = [index - self.first_seen[j] for j in tasks]
        return dict(zip(tasks, apportion(self.budget, self.weights(ages))))

    def training_data(self, ctx: Context, data: TensorData) -> TensorData:
        amounts = {j: n for j, n in self.plan(ctx.experience.index).items() if n > 0}
        self.amounts.append(amounts)
        parts = [data]
        for j, n in amounts.items():
            stored = self.store[j]
            pick = (torch.randperm(len(stored), generator=self.rng)[:n] if n <= len(stored)
                    else torch.randint(len(stored), (n,), generator=self.rng))
            parts.append(stored.subset(pick))
        return concat_data(parts)

    def after_experience(self, ctx: Context, data: TensorData) -> None:
        e = ctx.experience
        task = e.task_index if e.task_index is not None else e.tasks[0]
        self.first_seen.setdefault(task, e.index)
        own = e.train  # the experience's own samples, not what was rehearsed with them
        if task in self.store:
            own = concat_data([self.store[task], own])
        if self.memory_per_task is not None and len(own) > self.memory_per_task:
            own = own.subset(torch.randperm(len(own), generator=self.rng)[: self.memory_per_task])
        self.store[task] = own

    def state_dict(self) -> dict:
        return {**super().state_dict(),
                "store": {j: {"x": d.x, "y": d.y, "t": d.t} for j, d in self.store.items()},
                "first_seen": dict(self.first_seen), "amounts": [dict(a) for a in self.amounts]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.store = {int(j): TensorData(d["x"], d["y"], d["t"]) for j, d in state["store"].items()}
        self.first_seen = {int(j): int(i) for j, i in state["first_seen"].items()}
        self.amounts = [{int(j): int(n) for j, n in a.items()} for a in state["amounts"]]
