"""Learning-rate schedules as strategies: each owns the LR (one owner per run) and sets it
before every optimizer step, from the step counters the trainer keeps, so a schedule
composes with any other strategy and any model, and resumes exactly (the LR is a pure
function of the counters, which checkpoints restore).

`scope` is the horizon a schedule spans: `run` (the whole stream, as planned from its
experiences' sizes) or `experience` (restarted at every experience: LR rewarming).
Every parameter group gets the schedule's LR times its `lr_scale` (`Context.set_lr`).

Continual pre-training of language models (Gupta et al. 2023, "Continual Pre-Training
of Large Language Models: How to (re)warm your model?"; Ibrahim et al. 2024, "Simple
and Scalable Strategies to Continually Pre-train Large Language Models") re-warms the
LR and re-decays it on each new dataset (`rewarm`), or uses an "infinite" schedule
that never decays to zero and anneals only on a copy when a model is wanted
(`infinite_lr`).
"""
from __future__ import annotations

import math

from strategies.base import Strategy
from strategies.context import Context
from strategies.registry import register_strategy

SHAPES = ("cosine", "linear")


def _check(**values: float) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be non-negative, got {value}")


def warmup(step: int, steps: int, lr: float) -> float:
    """Linear warmup: lr * (step + 1) / steps for step < steps (the first step is not
    wasted at zero), then lr."""
    return lr * min(1.0, (step + 1) / steps) if steps > 0 else lr


def decay(progress: float, high: float, low: float, shape: str = "cosine") -> float:
    """From `high` at progress 0 to `low` at progress 1: by half a cosine,
    low + (high - low) * (1 + cos(pi * p)) / 2, or linearly, high - (high - low) * p."""
    p = min(max(progress, 0.0), 1.0)
    if shape == "cosine":
        return low + (high - low) * 0.5 * (1.0 + math.cos(math.pi * p))
    return high - (high - low) * p


def warmup_steps_of(warmup_steps: int | None, warmup_fraction: float, total: int) -> int:
    return int(warmup_steps) if warmup_steps is not None else int(round(warmup_fraction * total))


class LRSchedule(Strategy):
    """Base class: `lr_at(step, total)` is the LR at `step` of a horizon of `total` steps
    (the run's or the experience's, per `scope`); it is set before every step. On several
    processes every one counts the same steps, so sets the same LR."""

    owns_lr = True
    data_parallel = True

    def __init__(self, scope: str = "run"):
        if scope not in ("run", "experience"):
            raise ValueError(f"scope must be 'run' or 'experience', got '{scope}'")
        self.scope = scope

    def position(self, ctx: Context) -> tuple[int, int]:
        """(step, horizon) in this schedule's scope."""
        if self.scope == "experience":
            return ctx.step, ctx.steps_in_experience
        return ctx.iteration, sum(ctx.planned_steps)

    def lr_at(self, step: int, total: int) -> float:
        raise NotImplementedError

    def before_iteration(self, ctx: Context) -> None:
        ctx.set_lr(self.lr_at(*self.position(ctx)))


@register_strategy("constant_lr")
class ConstantLR(LRSchedule):
    """A constant LR, after an optional linear warmup of `warmup_steps` at the start of the
    run: the "no rewarming" baseline of continual pre-training (Gupta et al. 2023)."""

    def __init__(self, lr: float = 1e-3, warmup_steps: int = 0):
        super().__init__("run")
        _check(lr=lr, warmup_steps=warmup_steps)
        self.lr, self.warmup_steps = lr, int(warmup_steps)

    def lr_at(self, step: int, total: int) -> float:
        return warmup(step, self.warmup_steps, self.lr)


@register_strategy("warmup_decay")
class WarmupDecay(LRSchedule):
    """Linear warmup, then cosine or linear decay (Loshchilov and Hutter 2017, "SGDR"; the
    schedule of GPT-style pre-training). Up to `max_lr` over W steps, then down to `min_lr`
    by the end of the horizon N:

        lr(s) = max_lr * (s + 1) / W                                   s < W
        lr(s) = min_lr + (max_lr - min_lr) * (1 + cos(pi * (s - W) / (N - 1 - W))) / 2

    so the horizon's last step (s = N - 1) trains at `min_lr`.

    W is `warmup_steps`, or `warmup_fraction` of N. `min_lr` defaults to max_lr / 10."""

    def __init__(self, max_lr: float = 1e-3, min_lr: float | None = None, warmup_steps: int | None = None,
                 warmup_fraction: float = 0.01, shape: str = "cosine", scope: str = "run"):
        super().__init__(scope)
        min_lr = max_lr / 10 if min_lr is None else min_lr
        _check(max_lr=max_lr, min_lr=min_lr, warmup_fraction=warmup_fraction, warmup_steps=warmup_steps or 0)
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got '{shape}'")
        if warmup_fraction > 1:
            raise ValueError(f"warmup_fraction must be at most 1, got {warmup_fraction}")
        self.max_lr, self.min_lr, self.shape = max_lr, min_lr, shape
        self.warmup_steps, self.warmup_fraction = warmup_steps, warmup_fraction

    def lr_at(self, step: int, total: int) -> float:
        w = warmup_steps_of(self.warmup_steps, self.warmup_fraction, total)
        if step < w:
            return warmup(step, w, self.max_lr)
        return decay((step - w) / max(total - 1 - w, 1), self.max_lr, self.min_lr, self.shape)


@register_strategy("rewarm")
class Rewarm(WarmupDecay):
    """LR re-warming and re-decaying at every experience (Ibrahim et al. 2024, Sec. 5;
    Gupta et al. 2023): each new experience warms up linearly to `max_lr` over about 1%
    of its steps and decays by cosine to max_lr / 10 by its end (the `WarmupDecay`
    formula with the experience as the horizon)."""

    def __init__(self, max_lr: float = 1e-3, min_lr: float | None = None, warmup_steps: int | None = None,
                 warmup_fraction: float = 0.01, shape: str = "cosine"):
        super().__init__(max_lr, min_lr, warmup_steps, warmup_fraction, shape, scope="experience")


@register_strategy("wsd")
class WarmupStableDecay(LRSchedule):
    """Warmup-stable-decay (Hu et al. 2024, "MiniCPM"; Hägele et al. 2024, "Scaling Laws and
    Compute-Optimal Training Beyond Fixed Training Durations"): linear warmup over W steps,
    `max_lr` held, then a decay to `min_lr` over the last D = `decay_fraction` * N steps of
    the horizon N (cosine or linear, progress (s - (N - D) + 1) / D, so the last step trains
    at `min_lr`). With `scope: experience` each experience gets the whole shape."""

    def __init__(self, max_lr: float = 1e-3, min_lr: float = 0.0, warmup_steps: int | None = None,
                 warmup_fraction: float = 0.01, decay_fraction: float = 0.2, shape: str = "linear",
                 scope: str = "run"):
        super().__init__(scope)
        _check(max_lr=max_lr, min_lr=min_lr, warmup_fraction=warmup_fraction, decay_fraction=decay_fraction)
        if not 0 < decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in (0, 1], got {decay_fraction}")
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got '{shape}'")
        self.max_lr, self.min_lr, self.shape = max_lr, min_lr, shape
        self.warmup_steps, self.warmup_fraction, self.decay_fraction = warmup_steps, warmup_fraction, decay_fraction

    def lr_at(self, step: int, total: int) -> float:
        w = warmup_steps_of(self.warmup_steps, self.warmup_fraction, total)
        decay_start = total - int(round(self.decay_fraction * total))
        if step < w:
            return warmup(step, w, self.max_lr)
        if step < decay_start:
            return self.max_lr
        return decay((step - decay_start + 1) / max(total - decay_start, 1), self.max_lr, self.min_lr, self.shape)


@register_strategy("infinite_lr")
class InfiniteLR(LRSchedule):
    """An "infinite" schedule (Ibrahim et al. 2024, Sec. 7): no horizon to decay to, so data
    may keep arriving. Over the run's iterations t:

        warmup     lr = max_lr * (t + 1) / W                                   t < W
        cooldown   x = (t - W) / C,  cosine:   lr = c + (max_lr - c) * (1 + cos(pi x)) / 2
                                     inv_sqrt: lr = max_lr + (c - max_lr) * h(x) / h(1),
                                               h(x) = 1 / sqrt(1 + alpha x) - 1     W <= t < W + C
        constant   lr = c (`const_lr`)                                          afterwards

    and, whenever a model is to be kept (`anneal_at`: after every experience, after the
    last one, or never), a short exponential anneal over `anneal_steps` steps,

        lr(a) = c * (min_lr / c) ** ((a + 1) / anneal_steps),     a = 0 .. anneal_steps - 1,

    trained on a copy (`ctx.train_on_copy`, once the experience is over): the whole run state
    is branched, the evaluation scores the annealed weights (`ctx.evaluate_with`) and the run
    goes back, so the next experience continues from the constant
    phase undisturbed (a checkpoint resume never anneals). Ibrahim et al.'s 405M runs: warmup
    1% of the steps, max 3e-4, constant 1.65e-4 (0.55 max_lr, the default), min 3e-5."""

    def __init__(self, max_lr: float = 1e-3, const_lr: float | None = None, min_lr: float | None = None,
                 warmup_steps: int | None = None, warmup_fraction: float = 0.01, cooldown_steps: int = 0,
                 cooldown: str = "cosine", alpha: float = 10.0, anneal_steps: int = 0,
                 anneal_at: str = "every_experience"):
        super().__init__("run")
        const_lr = 0.55 * max_lr if const_lr is None else const_lr
        min_lr = max_lr / 10 if min_lr is None else min_lr
        _check(max_lr=max_lr, cooldown_steps=cooldown_steps, anneal_steps=anneal_steps, alpha=alpha,
               warmup_fraction=warmup_fraction, warmup_steps=warmup_steps or 0)
        if not 0 < min_lr <= const_lr <= max_lr:
            raise ValueError(f"need 0 < min_lr <= const_lr <= max_lr, got {min_lr}, {const_lr}, {max_lr}")
        if cooldown not in ("cosine", "inv_sqrt"):
            raise ValueError(f"cooldown must be 'cosine' or 'inv_sqrt', got '{cooldown}'")
        if anneal_at not in ("every_experience", "last_experience", "never"):
            raise ValueError(f"anneal_at must be every_experience, last_experience or never, got '{anneal_at}'")
        self.max_lr, self.const_lr, self.min_lr = max_lr, const_lr, min_lr
        self.warmup_steps, self.warmup_fraction = warmup_steps, warmup_fraction
        self.cooldown_steps, self.cooldown, self.alpha = int(cooldown_steps), cooldown, alpha
        self.n_anneal, self.anneal_at = int(anneal_steps), anneal_at

    def lr_at(self, step: int, total: int) -> float:
        w = warmup_steps_of(self.warmup_steps, self.warmup_fraction, total)
        if step < w:
            return warmup(step, w, self.max_lr)
        if step >= w + self.cooldown_steps:
            return self.const_lr
        x = (step - w) / self.cooldown_steps
        if self.cooldown == "cosine":
            return decay(x, self.max_lr, self.const_lr, "cosine")
        h = lambda v: 1.0 / math.sqrt(1.0 + self.alpha * v) - 1.0  # noqa: E731
        return self.max_lr + (self.const_lr - self.max_lr) * h(x) / h(1.0)

    def anneal_lr(self, a: int) -> float:
        return self.const_lr * (self.min_lr / self.const_lr) ** ((a + 1) / self.n_anneal)

    def anneal_steps(self, ctx: Context) -> int:
        """How many steps to anneal a copy after `ctx.experience` (0: none)."""
        last = ctx.experience is not None and ctx.experience.index == len(ctx.stream) - 1
        wanted = self.anneal_at == "every_experience" or (self.anneal_at == "last_experience" and last)
        return self.n_anneal if wanted else 0

    def before_evaluation(self, ctx: Context) -> None:
        steps = self.anneal_steps(ctx)
        if steps:  # the kept model: a copy annealed from the constant phase, scored at this boundary
            ctx.evaluate_with(ctx.train_on_copy(steps))

    def before_iteration(self, ctx: Context) -> None:
        if ctx.anneal_step is not None:
            ctx.set_lr(self.anneal_lr(ctx.anneal_step))
        else:
            super().before_iteration(ctx)
