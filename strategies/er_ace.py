"""ER-ACE: experience replay with an asymmetric cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from strategies.context import Batch, Context
from strategies.registry import register_strategy
from strategies.replay import Replay


@register_strategy("er_ace")
class ERACE(Replay):
    """ER-ACE (Caccia et al. 2022, "New Insights on Reducing Abrupt Representation Change
    in Online Continual Learning"). The incoming batch's cross-entropy only competes among
    the classes present in that batch, so its gradient never pushes down the logits of
    classes it does not hold (old classes); replayed samples use the full cross-entropy:

        L = CE_{C_in}(f(x), y) + CE(f(x_m), y_m),

    where CE_{C_in} masks every logit outside C_in, the classes of the incoming batch, and
    (x_m, y_m) are `replay_batch_size` samples drawn from a reservoir memory, which is
    updated with every incoming batch.

    On several processes C_in is the classes of the whole step's incoming rows (`ctx.batch`),
    not of this process's share, and each term stays a mean over all of its rows, incoming or
    replayed (`ctx.share_mean`)."""

    loss_name = "ace"
    data_parallel = True

    def __init__(self, memory_size: int = 500, replay_batch_size: int = 32):
        # Replay's reservoir memory, sampling and appending; only the loss differs.
        super().__init__(memory_size, replay_batch_size, policy="reservoir")

    def loss(self, ctx: Context, batch: Batch) -> torch.Tensor:
        if ctx.world > 1:
            return self._share_of_loss(ctx, batch)
        rows = batch.incoming
        logits, y = batch.logits[rows], batch.y[rows]
        present = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        present[y] = True
        loss = F.cross_entropy(logits.masked_fill(~present, float("-inf")), y)
        if self in batch.parts:
            replayed = batch.parts[self]
            loss = loss + F.cross_entropy(batch.logits[replayed], batch.y[replayed])
        return loss

    def _share_of_loss(self, ctx: Context, batch: Batch) -> torch.Tensor:
        """This process's part of the loss: `batch` is its share of the step's rows, `ctx.batch`
        the whole step."""
        whole, rows = ctx.batch, batch.incoming
        logits, y = batch.logits[rows], batch.y[rows]
        present = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        present[whole.y[whole.incoming]] = True
        ce = F.cross_entropy(logits.masked_fill(~present, float("-inf")), y, reduction="none")
        loss = ctx.share_mean(ce, whole.n_incoming)
        if self in whole.parts:
            mine, every = batch.parts[self], whole.parts[self]
            ce = F.cross_entropy(batch.logits[mine], batch.y[mine], reduction="none")
            loss = loss + ctx.share_mean(ce, every.stop - every.start)
        return loss
