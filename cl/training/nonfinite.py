"""Checking that the training loss is finite, without a host sync per step off the CPU."""
from __future__ import annotations

import math

import torch

# Off the CPU a finiteness check is a host sync: there losses are checked this many steps at a time.
DEFERRED_CHECK_EVERY = 50


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the experience and iteration."""


class LossCheck:
    """Each step's loss is checked at once on the CPU, where reading it costs nothing, and
    where `nonfinite: skip` must know before the step; elsewhere `DEFERRED_CHECK_EVERY`
    steps at a time. `where(iteration)` describes an iteration for the error message, and
    `diagnose()`, asked only when that error is built, what the strategies know of the
    cause (their `Strategy.diagnose` notes: a penalty past SGD's stability limit)."""

    def __init__(self, each_step: bool, stop: bool, where, diagnose=lambda: ()):
        self.each_step, self.stop, self.where, self.diagnose = each_step, stop, where, diagnose
        self._unchecked: list[tuple[int, torch.Tensor]] = []

    def step_is_finite(self, iteration: int, loss: torch.Tensor) -> bool:
        """False for a step to skip; raises `NonFiniteLossError` where non-finite losses stop the run."""
        if self.each_step:
            value = loss.item()
            if math.isfinite(value):
                return True
            if self.stop:
                raise self.error(iteration, value)
            return False
        self._unchecked.append((iteration, loss.detach()))
        if len(self._unchecked) >= DEFERRED_CHECK_EVERY:
            self.flush()
        return True

    def flush(self) -> None:
        """The deferred check: one host sync for the losses of the last steps."""
        if not self._unchecked:
            return
        pending, self._unchecked = self._unchecked, []
        finite = torch.isfinite(torch.stack([loss for _, loss in pending])).tolist()
        if not all(finite):
            iteration, loss = pending[finite.index(False)]
            raise self.error(iteration, loss.item())

    def error(self, iteration: int, value: float) -> NonFiniteLossError:
        cause = "; ".join(self.diagnose()) or "the learning rate may be too high"
        return NonFiniteLossError(f"non-finite training loss ({value}) in {self.where(iteration)}; {cause}. "
                                  f"Set training.nonfinite: skip to skip such steps")
