"""The `Strategy` base class: optional hooks that change what the trainer does.

A strategy overrides only the hooks it needs; the trainer calls each hook on
every strategy of the run in list order, and skips hooks a strategy does not
override (so an unused hook costs nothing per batch). Strategies get what
they need as arguments and keep their own state; nothing is shared through
attributes of the trainer.

Hook order for one experience::

    before_experience -> training_data ->
        [per batch: adapt_batch -> forward -> extra_loss -> backward ->
         after_backward -> optimizer step -> after_step] ->
    after_experience -> evaluation (predict)
"""
from __future__ import annotations

import torch

from streams.experience import Experience, Stream, TensorData


class Strategy:
    """Base class of every continual-learning strategy.

    `self.rng` is a CPU generator seeded per run and per strategy, so sampling
    (replay draws, buffer updates) is reproducible and survives a checkpoint.
    """

    #: Task-free strategies are never told where experiences begin or end.
    task_free: bool = False

    def setup(self, stream: Stream, device: torch.device, seed: int) -> None:
        """Called once per run before training; on resume, before the saved state is loaded."""
        self.rng = torch.Generator().manual_seed(seed)
        self.device = device

    def before_experience(self, experience: Experience, model: torch.nn.Module) -> None:
        """Before training on `experience`."""

    def training_data(self, experience: Experience, stream: Stream, data: TensorData) -> TensorData | None:
        """Return the data to train on for `experience` instead of `data`, or None to keep it."""
        return None

    def adapt_batch(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor):
        """Change a raw training batch (e.g. append replayed samples); return (x, y, t)."""
        return x, y, t

    def extra_loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                   logits: torch.Tensor) -> torch.Tensor | None:
        """A loss term added to the cross-entropy of the (adapted, preprocessed) batch, or None."""
        return None

    def after_backward(self, model: torch.nn.Module) -> None:
        """After gradients are computed, before the optimizer step (e.g. project gradients)."""

    def after_step(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        """After the optimizer step; x, y, t is the incoming raw batch before adaptation."""

    def after_experience(self, experience: Experience, model: torch.nn.Module, data: TensorData) -> None:
        """After training on `experience`; `data` is what was trained on."""

    def predict(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """Class scores for a preprocessed batch, for classifiers that are not the linear head; None to use it."""
        return None

    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])

    def describe(self) -> str:
        return type(self).__name__


def overrides(strategy: Strategy, hook: str) -> bool:
    """Whether `strategy` implements `hook` itself rather than inheriting the no-op."""
    return getattr(type(strategy), hook) is not getattr(Strategy, hook)
