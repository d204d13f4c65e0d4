"""GDumb: a greedy class-balanced memory, and a model trained from scratch on it alone."""
from __future__ import annotations

import torch

from strategies.base import Strategy
from strategies.buffers import GreedyBalancedBuffer
from strategies.context import Context
from strategies.registry import register_strategy
from streams.experience import TensorData


@register_strategy("gdumb")
class GDumb(Strategy):
    """GDumb (Prabhu, Torr and Dokania 2020, "GDumb: A Simple Approach that Questions Our
    Progress in Continual Learning"). A greedy sampler keeps a class-balanced memory of
    `memory_size` samples from the stream (a sample enters while there is room, or when its
    class holds fewer samples than the largest class, evicting a random sample of that
    class; an experience's samples arrive in a random order); at each experience the model
    is re-initialised and trained from scratch on the memory alone, never on the stream
    itself. The paper trains for many epochs with an SGDR schedule and cutmix; here the
    experiment's `training` block sets epochs and schedule. The optimizer's state
    (momentum) is reset with the model.

    On several processes every one fills the same memory (its generator is shared) and
    re-initialises alike; the data-parallel wrapper then starts each experience from rank 0's
    weights."""

    data_parallel = True

    def __init__(self, memory_size: int = 500):
        self.buffer = GreedyBalancedBuffer(memory_size)

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        self.buffer.to(ctx.device)

    def training_data(self, ctx: Context, data: TensorData) -> TensorData:
        # The greedy sampler keeps the first samples of each class it meets, so they must
        # arrive in a random order, as a stream's samples do: a dataset file's order need not
        # be random, and a memory of its first rows would be a biased sample.
        order = torch.randperm(len(data), generator=self.rng)
        self.buffer.add(data.x, data.y, data.t, self.rng, order=order)
        n = len(self.buffer)
        return TensorData(self.buffer.x[:n].clone(), self.buffer.y[:n].clone(), self.buffer.t[:n].clone())

    def before_experience(self, ctx: Context) -> None:
        for module in ctx.model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        ctx.optimizer.state.clear()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.buffer.load_state_dict(state["buffer"])
