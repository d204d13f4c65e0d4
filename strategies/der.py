"""Dark Experience Replay: replay the logits a sample had when it was stored."""
from __future__ import annotations

import torch.nn.functional as F

from strategies.base import Strategy
from strategies.buffers import ClassBalancedBuffer, ReservoirBuffer
from strategies.context import Batch, Context
from strategies.registry import register_strategy
from streams.experience import TensorData


@register_strategy("der")
class DER(Strategy):
    """Dark Experience Replay (Buzzega et al. 2020, "Dark Experience for General Continual
    Learning: a Strong, Simple Baseline"). A reservoir memory keeps incoming samples with the
    logits z the network gave them when they were stored; the loss is

        L = CE(f(x), y) + alpha * || f(x') - z' ||^2 + beta * CE(f(x''), y''),

    with (x', z') and (x'', y'') two independent draws of `replay_batch_size` from the memory
    (the squared error averaged over logits, as in the paper's code). `beta = 0` is DER,
    `beta > 0` DER++. Memory samples are augmented like the stream's training batches.
    Defaults: the paper's Seq-MNIST setting for DER++ with a 500-sample memory.

    `memory: class_balanced` is avalanche-lib's variant, not the paper's: at the end of
    each experience an equal share per class is sampled from the experience's data, stored
    with the logits the model gives it then (in eval mode, without augmentation), instead
    of reservoir sampling with the logits of the step that stored a sample.

    On several processes each takes its share of the replayed rows (`ctx.shard`) and the
    terms stay means over all of them (`ctx.share_mean`); the memory is the same on every
    process, filled from the whole batch's logits, which the trainer gathers."""

    reads_step_outputs = True
    data_parallel = True

    def __init__(self, memory_size: int = 500, replay_batch_size: int = 32, alpha: float = 0.3,
                 beta: float = 0.0, memory: str = "reservoir"):
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be non-negative, got {alpha} and {beta}")
        if memory not in ("reservoir", "class_balanced"):
            raise ValueError(f"memory must be 'reservoir' (the paper's) or 'class_balanced', got '{memory}'")
        self.replay_batch_size, self.alpha, self.beta, self.memory = replay_batch_size, alpha, beta, memory
        self.buffer = ReservoirBuffer(memory_size) if memory == "reservoir" else ClassBalancedBuffer(memory_size)

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        self.buffer.to(ctx.device)

    def extra_loss(self, ctx: Context, batch: Batch):
        if not len(self.buffer):
            return None
        x, t, z = self.buffer.sample(self.replay_batch_size, self.rng, fields=("x", "t", "logits"))
        # Drawn and augmented whole on every process (the same generators, so the same draws as
        # one process makes); each forwards its share of the rows.
        x = ctx.prepare(x, augment=True)
        if ctx.world == 1:
            terms = {"der_mse": self.alpha * F.mse_loss(ctx.forward(x, t), z)}
        else:
            out = ctx.forward(ctx.shard(x), ctx.shard(t))
            terms = {"der_mse": self.alpha * ctx.share_mean((out - ctx.shard(z)) ** 2, z.numel())}
        if self.beta:
            x, y, t = self.buffer.sample(self.replay_batch_size, self.rng)
            x = ctx.prepare(x, augment=True)
            if ctx.world == 1:
                terms["der_ce"] = self.beta * F.cross_entropy(ctx.forward(x, t), y)
            else:
                out = ctx.forward(ctx.shard(x), ctx.shard(t))
                terms["der_ce"] = self.beta * ctx.share_mean(F.cross_entropy(out, ctx.shard(y), reduction="none"),
                                                             len(y))
        return terms

    def after_step(self, ctx: Context, batch: Batch) -> None:
        if self.memory == "reservoir":
            rows = batch.incoming
            self.buffer.add(batch.x_raw[rows], batch.y[rows], batch.t[rows], self.rng,
                            logits=batch.logits[rows].detach().float())  # float32 under mixed precision too

    def after_experience(self, ctx: Context, data: TensorData) -> None:
        if self.memory == "class_balanced":
            self.buffer.add(data.x, data.y, data.t, self.rng, logits=ctx.logits(data.x, data.t))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.buffer.load_state_dict(state["buffer"])


@register_strategy("derpp")
class DERpp(DER):
    """DER++ (Buzzega et al. 2020): DER with the replayed samples' labels too,
    L = CE(f(x), y) + alpha * ||f(x') - z'||^2 + beta * CE(f(x''), y''); defaults alpha 0.1,
    beta 0.5 (both in the paper's grid for sequential MNIST and CIFAR-10)."""

    def __init__(self, memory_size: int = 500, replay_batch_size: int = 32, alpha: float = 0.1,
                 beta: float = 0.5, memory: str = "reservoir"):
        super().__init__(memory_size, replay_batch_size, alpha, beta, memory)
