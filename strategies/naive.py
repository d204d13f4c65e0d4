"""Fine-tuning baselines: Naive (the lower bound), Cumulative and Joint (upper bounds)."""
from __future__ import annotations

from strategies.base import Strategy
from strategies.context import Context
from strategies.registry import register_strategy
from streams.experience import TensorData, concat_data


@register_strategy("naive")
class Naive(Strategy):
    """Plain fine-tuning on each experience in turn, with no defence against
    catastrophic forgetting (McCloskey and Cohen 1989): the lower bound."""

    data_parallel = True  # nothing beyond the trainer's loss, which it splits


@register_strategy("cumulative")
class Cumulative(Strategy):
    """Retrain on the union of every experience seen so far at each experience:
    an upper bound that ignores the memory constraint."""

    data_parallel = True  # only the training data changes, which the trainer splits

    def training_data(self, ctx: Context, data: TensorData) -> TensorData:
        return concat_data([e.train for e in ctx.stream.experiences[: ctx.experience.index]] + [data])


@register_strategy("joint")
class Joint(Strategy):
    """Joint training (the i.i.d. upper bound): the whole stream's training data,
    shuffled together, is learned at the first experience; later experiences
    add nothing, so the last row of the accuracy matrix is the joint model."""

    learned_ahead = True
    data_parallel = True  # only the training data changes, which the trainer splits

    def training_data(self, ctx: Context, data: TensorData) -> TensorData:
        if ctx.experience.index == 0:
            return concat_data([e.train for e in ctx.stream.experiences])
        return data.subset(slice(0, 0))
