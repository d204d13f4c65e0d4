"""Experience replay over a fixed-size memory."""
from __future__ import annotations

from typing import Literal

from strategies.base import Strategy
from strategies.buffers import ClassBalancedBuffer, HerdingBuffer, ReservoirBuffer
from strategies.context import Batch, Context
from strategies.registry import register_strategy
from streams.experience import TensorData


@register_strategy("replay")
class Replay(Strategy):
    """Experience replay (Chaudhry et al. 2019, "On Tiny Episodic Memories in
    Continual Learning"; Rolnick et al. 2019): each training batch B is extended
    with `replay_batch_size` samples M drawn uniformly from a memory of
    `memory_size` past samples, and the loss is taken over the joint batch,
    L = CE(f(B u M)).

    `policy` chooses what the memory keeps:
      - `reservoir`: reservoir sampling over every training sample seen,
        updated after each optimizer step (task-free);
      - `class_balanced`: an equal share per class seen, each class a uniform
        sample of all its samples so far, updated at the end of each experience;
      - `herding`: an equal share per class seen, each class's samples chosen by
        herding on the model's features (Rebuffi et al. 2017), at the end of each
        experience.
    """

    data_parallel = True  # memories updated alike on every process from the whole batch; the rows split

    def __init__(self, memory_size: int = 500, replay_batch_size: int = 32,
                 policy: Literal["reservoir", "class_balanced", "herding"] = "reservoir"):
        if replay_batch_size < 1:
            raise ValueError(f"replay_batch_size must be positive, got {replay_batch_size}")
        buffers = {"reservoir": ReservoirBuffer, "class_balanced": ClassBalancedBuffer, "herding": HerdingBuffer}
        if policy not in buffers:
            raise ValueError(f"policy must be one of {', '.join(buffers)}, got '{policy}'")
        self.memory_size = memory_size
        self.replay_batch_size = replay_batch_size
        self.policy = policy
        self.buffer = buffers[policy](memory_size)

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        self.buffer.to(ctx.device)

    def adapt_batch(self, ctx: Context, batch: Batch) -> None:
        if len(self.buffer):
            batch.append(self, *self.buffer.sample(self.replay_batch_size, self.rng))

    def after_step(self, ctx: Context, batch: Batch) -> None:
        if self.policy == "reservoir":
            rows = batch.incoming
            self.buffer.add(batch.x_raw[rows], batch.y[rows], batch.t[rows], self.rng)

    def after_experience(self, ctx: Context, data: TensorData) -> None:
        if self.policy == "class_balanced":
            self.buffer.add(data.x, data.y, data.t, self.rng)
        elif self.policy == "herding":
            self.buffer.add(data.x, data.y, data.t, ctx.embed)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.buffer.load_state_dict(state["buffer"])
