"""Experience replay over a fixed-size memory."""
from __future__ import annotations

from typing import Literal

import torch

from cl.registry import STRATEGIES
from strategies.base import Strategy
from strategies.buffers import ClassBalancedBuffer, ReservoirBuffer
from streams.experience import Experience, TensorData


@STRATEGIES.register("replay")
class Replay(Strategy):
    """Experience replay (Chaudhry et al. 2019, "On Tiny Episodic Memories in
    Continual Learning"; Rolnick et al. 2019): each training batch is extended
    with `replay_batch_size` samples drawn uniformly from a memory of
    `memory_size` past samples, and the loss is taken over the joint batch.

    `policy` chooses what the memory keeps:
      - `reservoir`: reservoir sampling over every training sample seen,
        updated after each optimizer step (task-free);
      - `class_balanced`: an equal share per class seen, updated at the end
        of each experience.
    """

    def __init__(self, memory_size: int = 500, replay_batch_size: int = 32,
                 policy: Literal["reservoir", "class_balanced"] = "reservoir"):
        if replay_batch_size < 1:
            raise ValueError(f"replay_batch_size must be positive, got {replay_batch_size}")
        if policy not in ("reservoir", "class_balanced"):
            raise ValueError(f"policy must be 'reservoir' or 'class_balanced', got '{policy}'")
        self.memory_size = memory_size
        self.replay_batch_size = replay_batch_size
        self.policy = policy
        self.buffer = ReservoirBuffer(memory_size) if policy == "reservoir" else ClassBalancedBuffer(memory_size)

    def adapt_batch(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor):
        if not len(self.buffer):
            return x, y, t
        mx, my, mt = self.buffer.sample(self.replay_batch_size, self.rng)
        return torch.cat([x, mx]), torch.cat([y, my]), torch.cat([t, mt])

    def after_step(self, model, x, y, t) -> None:
        if self.policy == "reservoir":
            self.buffer.add(x, y, t, self.rng)

    def after_experience(self, experience: Experience, model, data: TensorData) -> None:
        if self.policy == "class_balanced":
            self.buffer.add(data.x, data.y, data.t, self.rng)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.buffer.load_state_dict(state["buffer"])
