"""iCaRL: herding exemplars, nearest-mean-of-exemplars classification, distillation by sigmoids."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from strategies.base import Strategy
from strategies.buffers import HerdingBuffer
from strategies.context import Batch, Context, model_call
from strategies.registry import register_strategy
from streams.experience import TensorData, concat_data


@register_strategy("icarl")
class ICaRL(Strategy):
    """iCaRL (Rebuffi, Kolesnikov, Sperl and Lampert 2017, "iCaRL: Incremental Classifier and
    Representation Learning").

    - Exemplars: `memory_size` samples split evenly over the classes seen, each class's
      chosen by herding on L2-normalised features (`buffers.herding_order`) and trained on
      with the new experience's data.
    - Loss: binary cross-entropy on the sigmoid of every output of the classes seen so far,
      summed over classes, with the labels as targets for the new classes and the previous
      model's sigmoid outputs as targets for the old ones (distillation):
      L = - sum_y [ t_y log s(g_y(x)) + (1 - t_y) log(1 - s(g_y(x))) ].
    - Classification: nearest mean of exemplars, y* = argmin_y || phi(x) - mu_y || with phi
      the L2-normalised features and mu_y the normalised mean of class y's exemplars,
      recomputed after each experience. Before the first experience ends, the head decides.

    On several processes the loss is a mean over rows, which the trainer splits; exemplars and
    class means are computed whole by every process from the same model and data (herding is
    a sequence of argmax choices, which a split into rounded partial sums could flip).
    """

    loss_name = "icarl_bce"
    data_parallel = True

    def __init__(self, memory_size: int = 2000):
        self.buffer = HerdingBuffer(memory_size)
        self.old_model: torch.nn.Module | None = None
        self.old_classes: list[int] = []
        self.seen_classes: list[int] = []
        self.means: torch.Tensor | None = None
        self._indices: dict[tuple, torch.Tensor] = {}

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        self.buffer.to(ctx.device)

    def training_data(self, ctx: Context, data: TensorData) -> TensorData:
        n = len(self.buffer)
        if not n:
            return data
        exemplars = TensorData(self.buffer.x[:n], self.buffer.y[:n], self.buffer.t[:n]).to(data.x.device)
        return concat_data([data, exemplars])

    def _index(self, classes: list[int], device) -> torch.Tensor:
        """`classes` as an index tensor on `device`, made once rather than at every batch."""
        key = (tuple(classes), str(device))
        if key not in self._indices:
            self._indices[key] = torch.tensor(classes, device=device)
        return self._indices[key]

    def before_experience(self, ctx: Context) -> None:
        self._indices = {}  # the class lists change at experience boundaries only
        self.old_classes = list(self.seen_classes)
        self.seen_classes = sorted(set(self.seen_classes) | set(ctx.experience.classes))
        self.old_model = None
        if self.old_classes:
            self.old_model = copy.deepcopy(ctx.model).eval()
            for p in self.old_model.parameters():
                p.requires_grad_(False)

    def loss(self, ctx: Context, batch: Batch) -> torch.Tensor:
        seen = self._index(self.seen_classes, batch.logits.device)
        targets = F.one_hot(batch.y, batch.logits.shape[-1]).float()
        if self.old_model is not None:
            old = self._index(self.old_classes, batch.logits.device)
            with torch.no_grad():
                # The old model's logits are bfloat16/float16 under mixed precision; the targets stay float32.
                targets[:, old] = torch.sigmoid(model_call(self.old_model, batch.x, batch.t)[:, old]).to(targets.dtype)
        bce = F.binary_cross_entropy_with_logits(batch.logits[:, seen], targets[:, seen], reduction="none")
        return bce.sum(1).mean()

    def after_experience(self, ctx: Context, data: TensorData) -> None:
        new = ctx.experience.train
        self.buffer.add(new.x, new.y, new.t, ctx.embed)
        n = len(self.buffer)
        phi = F.normalize(ctx.embed(self.buffer.x[:n], self.buffer.t[:n]), dim=-1)
        means = torch.zeros(ctx.stream.n_classes, phi.shape[-1], device=phi.device)
        means.index_add_(0, self.buffer.y[:n], phi)
        self.means = F.normalize(means, dim=-1)  # classes without exemplars stay at zero
        self.old_model = None

    def predict(self, ctx: Context, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.means is None:
            return ctx.forward(x, t)
        phi = F.normalize(ctx.features(x, t), dim=-1)
        scores = -torch.cdist(phi, self.means)
        unseen = torch.ones(len(self.means), dtype=torch.bool, device=scores.device)
        unseen[self._index(self.seen_classes, scores.device)] = False
        return scores.masked_fill(unseen, float("-inf"))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "buffer": self.buffer.state_dict(), "seen_classes": list(self.seen_classes),
                "means": None if self.means is None else self.means.cpu()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.buffer.load_state_dict(state["buffer"])
        self.seen_classes = list(state["seen_classes"])
        self.means = None if state["means"] is None else state["means"].to(self.buffer.device)
