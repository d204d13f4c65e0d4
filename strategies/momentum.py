"""Momentum weight interpolation: evaluate a slow moving average of the trained weights."""
from __future__ import annotations

import copy

import torch

from strategies.base import Strategy
from strategies.context import Batch, Context
from strategies.registry import register_strategy


@register_strategy("momentum_weights")
class MomentumWeights(Strategy):
    """Momentum-based weight interpolation (Stojanovski, Roth and Akata 2022, "Momentum-based
    Weight Interpolation of Strong Zero-Shot Models for Continual Learning"). A slow copy of
    the model follows the trained (fast) one,

        theta_slow <- tau * theta_slow + (1 - tau) * theta_fast      every `every` steps,

    and evaluation uses the slow weights (`eval_model`), so a composed nearest-mean
    predictor reads slow features too. Floating-point buffers (BatchNorm statistics) are
    interpolated alike; integer buffers are copied. Task-free: it never needs a boundary.
    On several processes every one follows the same trained weights, so holds the same slow ones."""

    data_parallel = True

    task_free = True

    def __init__(self, tau: float = 0.99, every: int = 1):
        if not 0.0 <= tau < 1.0:
            raise ValueError(f"tau must be in [0, 1), got {tau}")
        if every < 1:
            raise ValueError(f"every must be positive, got {every}")
        self.tau, self.every = tau, every
        self.slow: torch.nn.Module | None = None
        self.steps = 0

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        self.slow = copy.deepcopy(ctx.model)
        for p in self.slow.parameters():
            p.requires_grad_(False)
        self.slow.train(False)

    def after_step(self, ctx: Context, batch: Batch) -> None:
        self.steps += 1
        if self.steps % self.every:
            return
        slow, fast = self.slow.state_dict(), ctx.model.state_dict()
        floats = [k for k, v in slow.items() if v.is_floating_point()]
        with torch.no_grad():
            torch._foreach_lerp_([slow[k] for k in floats], [fast[k] for k in floats], 1.0 - self.tau)
            for k, v in slow.items():
                if not v.is_floating_point():
                    v.copy_(fast[k])

    def eval_model(self, ctx: Context) -> torch.nn.Module:
        return self.slow

    def state_dict(self) -> dict:
        return {**super().state_dict(), "slow": self.slow.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.slow.load_state_dict(state["slow"])
        self.steps = int(state["steps"])
