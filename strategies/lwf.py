"""Learning without Forgetting: distil the previous model's outputs on the new data."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from strategies.base import Strategy
from strategies.context import Batch, Context, model_call
from strategies.registry import register_strategy


@register_strategy("lwf")
class LwF(Strategy):
    """Learning without Forgetting (Li and Hoiem 2016, "Learning without Forgetting"). Before
    each experience the model is copied; while learning it, the outputs the copy gives the
    incoming samples for the classes seen before are kept by knowledge distillation,

        L = L_new + lambda_o * L_old,   L_old = sum_i y'_o(i) (log y'_o(i) - log y^'_o(i)),
        y'_o = softmax(z_old / T),  y^'_o = softmax(z / T)   over the previously seen classes,

    the paper's temperature T = 2 and lambda_o = 1, without Hinton's T^2 factor (as in the
    paper). L_old is written as the KL divergence: the paper's cross-entropy minus the
    entropy of the fixed targets, so the same gradient, and zero when nothing changed. In a single-head stream the old outputs are the logits of the classes seen in
    earlier experiences (all classes in a domain-incremental stream), the usual reading of
    LwF outside the multi-head setting of the paper.

    On several processes each distils its share of the incoming rows; the term stays the mean
    over all of the step's incoming rows (`ctx.share_mean`), the old model a copy made alike
    on every process."""

    data_parallel = True

    def __init__(self, alpha: float = 1.0, temperature: float = 2.0):
        if alpha < 0 or temperature <= 0:
            raise ValueError("alpha must be non-negative and temperature positive")
        self.alpha, self.temperature = alpha, temperature
        self.seen: list[int] = []
        self.old_model: torch.nn.Module | None = None
        self.old_classes: torch.Tensor | None = None

    def before_experience(self, ctx: Context) -> None:
        self.old_model = None
        if self.seen:
            self.old_model = copy.deepcopy(ctx.model).eval()
            for p in self.old_model.parameters():
                p.requires_grad_(False)
            self.old_classes = torch.tensor(self.seen, device=ctx.device)
        self.seen = sorted(set(self.seen) | set(ctx.experience.classes))

    def extra_loss(self, ctx: Context, batch: Batch):
        if self.old_model is None:
            return None
        rows, T = batch.incoming, self.temperature
        with torch.no_grad():
            old = model_call(self.old_model, batch.x[rows], batch.t[rows])[..., self.old_classes]
        new = batch.logits[rows][..., self.old_classes]
        target = F.log_softmax(old / T, -1)
        kd = (target.exp() * (target - F.log_softmax(new / T, -1))).sum(-1)
        if ctx.world > 1:  # this process's rows of the mean over every incoming row of the step
            return {"lwf": self.alpha * ctx.share_mean(kd, ctx.batch.n_incoming)}
        return {"lwf": self.alpha * kd.mean()}

    def after_experience(self, ctx: Context, data) -> None:
        self.old_model = None

    def state_dict(self) -> dict:
        return {**super().state_dict(), "seen": list(self.seen)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.seen = list(state["seen"])
