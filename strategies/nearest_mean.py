"""Nearest-mean classification on (pre-trained) features."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from strategies.base import Strategy
from strategies.context import Batch, Context
from strategies.registry import register_strategy


@register_strategy("nearest_mean")
class NearestMean(Strategy):
    """Nearest class mean on L2-normalised features (Janson, Zhang, Aljundi and Elhoseiny
    2022, "A Simple Baseline that Questions the Use of Pretrained-Models in Continual
    Learning"). With phi the model's pooled pre-logit features normalised to unit length,

        mu_c = mean of phi(x) over the training samples of class c,
        y_hat = argmin_c || phi(x) - mu_c ||_2,

    the means updated after every batch from running sums (so it runs task-free, and the
    incremental means equal the batch means). With `freeze_backbone` (the paper's setting,
    a pre-trained extractor) nothing is trained: the model only serves features, in eval
    mode throughout (a frozen extractor's BatchNorm keeps its statistics and dropout is
    off, so a sample's features are the same in training and evaluation). Otherwise
    the model trains as the rest of the run says, and each mean is of the features each
    sample had when it was seen. Classes never seen are never predicted.

    With a frozen backbone the strategy says so (`frozen_features`): a runner may then
    compute every sample's features once, keep them, and hand this strategy a model whose
    inputs are those features, making the whole run one forward pass over the data.

    On several processes the class sums are taken from the whole batch's features, which the
    trainer gathers from every process's rows (`reads_step_outputs`): every process holds
    the means one process would."""

    task_free = True
    needs_features = True
    reads_step_outputs = True
    data_parallel = True

    def __init__(self, freeze_backbone: bool = True):
        self.freeze_backbone = freeze_backbone
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    @property
    def frozen_features(self) -> bool:
        """The model's pooled features of an input never change during the run."""
        return self.freeze_backbone

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        n = ctx.stream.n_classes
        width = self._width(ctx)
        self.sums = torch.zeros(n, width, device=ctx.device)
        self.counts = torch.zeros(n, device=ctx.device)
        if self.freeze_backbone:
            for p in ctx.model.parameters():
                p.requires_grad_(False)

    @staticmethod
    def _width(ctx: Context) -> int:
        x = ctx.stream.experiences[0].train.x[:1]
        return ctx.embed(x).shape[-1]

    def before_iteration(self, ctx: Context) -> None:
        # The trainer puts the model in train mode at every experience (a task-free strategy
        # hears of no boundary); a frozen extractor is used in eval mode.
        if self.freeze_backbone and ctx.model.training:
            ctx.model.eval()

    def after_step(self, ctx: Context, batch: Batch) -> None:
        rows = batch.incoming
        # Features are bfloat16/float16 under mixed precision: the class sums stay in their own dtype.
        phi = F.normalize(batch.features[rows].detach().to(self.sums.dtype), dim=-1)
        self.sums.index_add_(0, batch.y[rows], phi)
        self.counts.index_add_(0, batch.y[rows], torch.ones_like(batch.y[rows], dtype=self.counts.dtype))

    @property
    def means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp_min(1).unsqueeze(1)

    def predict(self, ctx: Context, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        phi = F.normalize(ctx.features(x, t), dim=-1)
        scores = -torch.cdist(phi, self.means).pow(2)
        return scores.masked_fill(self.counts == 0, float("-inf"))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "sums": self.sums.cpu(), "counts": self.counts.cpu()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.sums = state["sums"].to(self.sums.device)
        self.counts = state["counts"].to(self.counts.device)
