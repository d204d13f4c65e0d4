"""What a run costs: parameters, FLOPs per training and evaluation sample, total training
FLOPs, peak memory, the bytes its strategies hold, and samples per second.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode`, which counts the matrix
products (linear layers, convolutions, attention) of forward and backward passes: a Linear
layer of `in` x `out` costs 2·in·out per row forward and 4·in·out backward, except where
its input needs no gradient (the model's first layer: 2·in·out, the weight gradient only).
Elementwise work (activations, normalisation, losses, the optimizer's update) and work
outside torch (GEM's quadratic programme) is not counted.

`StepCost` counts one real training step per experience, halfway through it, so that step
holds everything a strategy adds at that point of training: replayed rows and DER's replay
forwards (the memory filled by then), LwF's old model, GEM's memory gradients, a prompt
method's generator. Counting does not change what the step computes, so the run goes on
exactly as it would have. `CL_COUNT_FLOPS=0` skips the counting (the other costs are free).
"""
from __future__ import annotations

import bisect
import os
import resource
import sys
from typing import Sequence

import torch

from strategies.context import eval_mode

#: Experiences whose step is counted at most, evenly spread (a long online stream has
#: thousands of experiences; the others take the cost of the last counted one before them).
MAX_COUNTED_EXPERIENCES = 16


def counting_flops() -> bool:
    """Whether FLOPs are counted: unless the environment sets CL_COUNT_FLOPS=0."""
    return os.environ.get("CL_COUNT_FLOPS", "1").strip().lower() not in ("0", "false", "no", "off")


def flop_counter():
    """A counter that only counts: no table printed when it closes."""
    from torch.utils.flop_counter import FlopCounterMode  # imported when counting, not at start-up

    return FlopCounterMode(display=False)


def counted_experiences(n: int, most: int = MAX_COUNTED_EXPERIENCES) -> set[int]:
    """The experiences (of `n`) whose step is counted: all of them, or `most` evenly spread,
    the first and the last among them."""
    if n <= most:
        return set(range(n))
    return {round(k * (n - 1) / (most - 1)) for k in range(most)}


class StepCost:
    """Counts the FLOPs of one training step halfway through each counted experience.

    It is no strategy (it holds no state a checkpoint keeps, and takes no part in the hook
    precedence): it answers the trainer's hooks as an observer, put last in the boundary
    hooks so it sees the experience as the strategies set it up, and, for the one step it
    counts, first in `before_iteration` and last in `after_step` so the count covers the
    whole step. A step dropped for a non-finite loss is not counted; the next one is."""

    def __init__(self, trainer):
        # The counter's module is imported now, before the training clock runs: it pulls in
        # triton where installed (about 0.3 s), the cost of measuring, not of a training step.
        flop_counter()
        self.hooks = trainer.hooks
        self.counter = None
        self.target: int | None = None
        self.experience: int | None = None
        self.step_flops: dict[int, int] = {}  # experience index -> FLOPs of its counted step
        self.step_rows: dict[int, int] = {}  # experience index -> incoming rows of that step
        self.hooks["before_experience"].append(self)
        self.hooks["after_experience"].append(self)

    # ----------------------------------------------------------- the trainer's hooks
    def before_experience(self, ctx) -> None:
        index = ctx.experience.index
        if index not in counted_experiences(len(ctx.stream)) or self in self.hooks["after_step"]:
            return
        self.experience, self.target = index, ctx.steps_in_experience // 2
        self.hooks["before_iteration"].insert(0, self)
        self.hooks["after_step"].append(self)

    def before_iteration(self, ctx) -> None:
        self._drop_counter()  # still open: the step it counted was dropped (a non-finite loss)
        if ctx.anneal_step is None and ctx.step >= self.target:  # past it, on a resume: the next one
            self.counter = flop_counter()
            self.counter.__enter__()

    def after_step(self, ctx, batch) -> None:
        if self.counter is None:
            return
        self.counter.__exit__(None, None, None)
        self.step_flops[self.experience] = self.counter.get_total_flops()
        self.step_rows[self.experience] = batch.n_incoming
        self.counter = None
        self._unlisten()

    def after_experience(self, ctx, data) -> None:
        self._drop_counter()
        self._unlisten()

    # ------------------------------------------------------------------ helpers
    def _drop_counter(self) -> None:
        if self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.counter = None

    def _unlisten(self) -> None:
        """Out of the per-step hooks: the experience's other steps run without it. (Taken out of
        `after_step` while the trainer walks that list: it is last there, so nothing is skipped.)"""
        for hook in ("before_iteration", "after_step"):
            if self in self.hooks[hook]:
                self.hooks[hook].remove(self)

    def close(self) -> None:
        """Out of every hook, the counter closed: the run is over (or failed mid-step)."""
        self._drop_counter()
        self._unlisten()
        for hook in ("before_experience", "after_experience"):
            if self in self.hooks[hook]:
                self.hooks[hook].remove(self)

    # ------------------------------------------------------------------ summary
    def per_experience(self, n: int) -> list[tuple[int, int]]:
        """(step FLOPs, incoming rows) of each of `n` experiences: its own count, else the last
        counted one before it, else the first after it (experiences trained before a resume)."""
        counted = sorted(self.step_flops)
        out = []
        for k in range(n):
            at = bisect.bisect_right(counted, k) - 1
            source = counted[at] if at >= 0 else counted[0]
            out.append((self.step_flops[source], self.step_rows[source]))
        return out

    def summary(self, record) -> dict:
        """Training FLOPs of the run: per incoming sample (each experience's counted step over its
        incoming rows, weighted by the experience's steps) and in total (each experience's step
        FLOPs times its steps, plus the steps trained on copies at the mean step's cost)."""
        if not self.step_flops:
            return {}
        steps = [b - a for a, b in zip([0] + record.experience_ends[:-1], record.experience_ends)]
        costs = self.per_experience(len(steps))
        trained = sum(s * flops for s, (flops, _) in zip(steps, costs))
        per_sample = sum(s * flops / max(rows, 1) for s, (flops, rows) in zip(steps, costs))
        n_steps = max(sum(steps), 1)
        return {"train_flops_per_sample": per_sample / n_steps,
                "train_flops": trained + record.anneal_steps * trained / n_steps,
                "train_step_flops": [flops for flops, _ in costs]}


# ------------------------------------------------------------------ evaluation
@torch.no_grad()
def eval_flops_per_sample(trainer, stream, most_rows: int = 256) -> float | None:
    """FLOPs of one forward of test rows through what the evaluation calls (the strategies'
    evaluation model and predictor), per row; None without test rows."""
    tests, ctx = trainer.tests, trainer.ctx
    data = stream.test_all
    if tests is None or not len(data):
        return None
    x, _, t = next(data.batches(min(tests.batch_size, most_rows), shuffle=False))
    owner, predictor = tests.eval_model_owner, tests.predict_owner
    train_model = ctx.model
    model = (owner.eval_model(ctx) if owner is not None else None) or train_model
    ctx.model, ctx.training = model, False
    try:
        with eval_mode(model), flop_counter() as counter:
            x, t = ctx.transform(x.to(ctx.device)), t.to(ctx.device)
            predictor.predict(ctx, x, t) if predictor is not None else ctx.forward(x, t)
    finally:
        ctx.model, ctx.training = train_model, True
    return counter.get_total_flops() / len(t)


# --------------------------------------------------------------- parameters, memory
def parameter_counts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Parameters of the model and of what strategies add to the optimizer (prompts, extra
    heads): all of them, and the trainable ones (in the optimizer and requiring gradients)."""
    trained = {id(p): p for g in optimizer.param_groups for p in g["params"]}
    every = {**{id(p): p for p in model.parameters()}, **trained}
    return {"params_total": sum(p.numel() for p in every.values()),
            "params_trainable": sum(p.numel() for p in trained.values() if p.requires_grad)}


def start_peak_memory(device: torch.device) -> None:
    """On a GPU, the allocator's peak starts again with the run (runs of one invocation share
    the process); a process's peak RSS cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """The run's peak memory: CUDA's allocator on a GPU, else the process's peak resident set."""
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_of": "cuda_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_bytes": rss if sys.platform == "darwin" else rss * 1024,  # Linux gives KiB
            "peak_memory_of": "process_rss"}


def strategy_bytes(strategies: Sequence) -> dict:
    """What each strategy holds (`Strategy.state_bytes`), by name, and their sum."""
    by = {}
    for s in strategies:
        name = s.describe() if s.describe() not in by else f"{s.describe()}#{len(by)}"
        by[name] = s.state_bytes()
    return {"strategy_state_bytes": sum(by.values()), "strategy_state_bytes_by": by}


def run_cost(trainer, stream, model: torch.nn.Module, steps: StepCost | None) -> dict:
    """Every cost of a finished run, as the flat result's fields (`cl.runner.one_run`)."""
    record = trainer.record
    out = {**parameter_counts(model, trainer.optimizer), **strategy_bytes(trainer.strategies),
           **peak_memory(trainer.device),
           "samples_per_s": record.rows_trained / record.train_time_s if record.train_time_s > 0 else None}
    if steps is not None:
        out.update(steps.summary(record))
        flops = eval_flops_per_sample(trainer, stream)
        if flops is not None:
            out["eval_flops_per_sample"] = flops
    return out
