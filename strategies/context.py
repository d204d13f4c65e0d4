"""What a strategy's hooks receive: the run's `Context` and the training `Batch`.

The trainer owns both and keeps them current; a strategy reads them and uses
their helpers instead of copying plumbing (moving a batch to the device,
normalising it, calling a multi-head model, pooling features).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from strategies.base import Strategy
    from streams.experience import Experience, Stream


def model_call(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    """Logits of `model` on prepared inputs; a multi-head model (`uses_task_labels`) also takes
    each sample's task label."""
    if getattr(model, "uses_task_labels", False):
        if t is None:
            raise ValueError(f"{type(model).__name__} is multi-head: it needs the task labels of the batch")
        return model(x, t)
    return model(x)


@contextmanager
def eval_mode(model: torch.nn.Module):
    """The model in eval mode for the block, then every module back in the mode it had (a
    strategy's frozen BatchNorm stays frozen; `model.train()` would undo it)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def pooled_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled pre-logit features, through timm's feature API, which the lab's models share:
    `forward_head(forward_features(x), pre_logits=True)`."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise TypeError(f"{type(model).__name__} has no forward_features/forward_head (timm's feature API), "
                        f"so its features cannot be taken")
    return model.forward_head(model.forward_features(x), pre_logits=True)


class Context:
    """The run as a strategy sees it; one object for the whole run, kept current by the trainer.

    Attributes: `model`, `optimizer`, `scheduler` (the experiment's LR scheduler,
    or None), `device`, `stream`, `experience` (the current one, an `Experience`
    whose `index` counts from 0 in stream order; None before the first; progress
    lines and MLflow steps number experiences from 1, so print `index + 1`; a
    task-free strategy must not read it),
    `transform` (raw batch -> model input), `iteration` (optimizer steps so far in
    the run), `epoch` and `step` (within the experience), `steps_in_experience`,
    `planned_steps` (the steps of every experience as the stream gives them, before
    any strategy replaces the training data: a run-long schedule's horizon),
    `anneal_step` (the step on a copy of the run while `train_on_copy` trains it,
    else None) and `training` (False while evaluating). During evaluation `model`
    is the evaluation model (see `Strategy.eval_model`).

    Services beyond the helpers below: `train_on_copy(steps)` trains a copy of the
    whole run and returns its weights, and `evaluate_with(weights)` has the coming
    boundary evaluation score them (an "infinite" LR schedule's annealed model).

    Data parallel (`cl run --devices N`, torchrun): `rank` and `world` say which of how
    many processes this is (0 and 1 alone). Every process holds the same strategy state
    and the same global batch (`batch`); the trainer trains each on its share of the rows.
    A strategy keeps the run the one-process computation, split, with `shard` (its share of
    rows it computes a statistic over), `all_reduce` (the sum over processes) and
    `share_mean` (a loss term averaged over rows every process holds a share of).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 transform: Callable | None = None, aux_generator: torch.Generator | None = None,
                 scheduler=None, forward_owner: "Strategy | None" = None, seeds: dict[int, int] | None = None,
                 train_on_copy: Callable[[int], dict | None] | None = None):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        self.stream: Stream | None = None
        self.experience: Experience | None = None
        self.transform = transform
        self.iteration = 0
        self.epoch = 0
        self.step = 0
        self.steps_in_experience = 0
        self.planned_steps: list[int] = []  # steps each experience takes as the stream gives it
        self.anneal_step: int | None = None  # the step on a copy of the run (`train_on_copy`), else None
        self.training = True
        self.forward_owner = forward_owner  # the strategy that owns the forward pass, if any
        self.aux_generator = aux_generator if aux_generator is not None else torch.Generator()
        self.evaluation_weights: dict | None = None  # what `evaluate_with` asked the next evaluation to score
        self._seeds = dict(seeds or {})
        self._train_on_copy = train_on_copy
        self.rank, self.world = 0, 1  # this process among `world` training the run together
        self.loss_weight = 1.0  # what the trainer multiplies this process's loss by this step
        self.batch: Batch | None = None  # the step's whole batch, every process's rows

    # -------------------------------------------------------- data parallel
    def shard(self, rows):
        """This process's share of `rows` (a count, a range or a tensor of rows): every
        `world`-th from `rank`, as the trainer splits a batch. All of them on one process."""
        if isinstance(rows, int):
            rows = range(rows)
        return rows if self.world == 1 else rows[self.rank::self.world]

    def all_reduce(self, *tensors: torch.Tensor) -> None:
        """Sum each tensor over the processes, in place (nothing on one process). Every
        process must call it, with tensors of the same shapes, at the same point."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for t in tensors:
            dist.all_reduce(t)

    def share_mean(self, values: torch.Tensor, total: int) -> torch.Tensor:
        """A loss term averaged over `total` elements of which this process holds `values`
        (its share, e.g. of replayed rows taken with `shard`): on one process `values.sum() /
        total`, the mean; on several, scaled so that the step's averaged gradient is the
        gradient of that mean over every process's elements, however unevenly they split."""
        if not total:
            return values.sum() * 0.0
        if self.world == 1:
            return values.sum() / total
        return values.sum() * (self.world / (total * self.loss_weight)) if self.loss_weight else values.sum() * 0.0

    # -------------------------------------------------------------- helpers
    def prepare(self, x: torch.Tensor, augment: bool = False) -> torch.Tensor:
        """Raw inputs (as a stream stores them) -> model inputs on the device; with `augment`,
        the stream's training augmentation too (drawn from a generator of its own)."""
        x = x.to(self.device, non_blocking=True)
        if self.transform is None:
            return x
        return self.transform(x, train=augment, generator=self.aux_generator)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Logits on prepared inputs, through the strategy that owns the forward pass if any."""
        if self.forward_owner is not None:
            batch = Batch.of_inputs(x, t)
            self.forward_owner.forward(self, batch)
            return batch.logits
        return model_call(self.model, x, t)

    def features(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled pre-logit features on prepared inputs: those the forward owner reports, else
        the model's (`pooled_features`)."""
        if self.forward_owner is not None:
            batch = Batch.of_inputs(x, t)
            self.forward_owner.forward(self, batch)
            if batch.features is not None:
                return batch.features
        return pooled_features(self.model, x)

    @torch.no_grad()
    def embed(self, x: torch.Tensor, t: torch.Tensor | None = None, batch_size: int = 512) -> torch.Tensor:
        """Features of raw rows (`prepare` then `features`) in eval mode, without gradients and
        in batches, leaving every module's mode as it was: for choosing or summarising samples."""
        return self._in_batches(self.features, x, t, batch_size)

    @torch.no_grad()
    def logits(self, x: torch.Tensor, t: torch.Tensor | None = None, batch_size: int = 512) -> torch.Tensor:
        """Logits of raw rows (`prepare` then `forward`), as `embed` takes features."""
        return self._in_batches(self.forward, x, t, batch_size)

    def _in_batches(self, fn, x: torch.Tensor, t: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        with eval_mode(self.model):
            return torch.cat([fn(self.prepare(x[i:i + batch_size]),
                                 None if t is None else t[i:i + batch_size].to(self.device))
                              for i in range(0, len(x), batch_size)])

    def forward_batch(self, batch: "Batch", features: bool = False) -> None:
        """Set `batch.logits` from the prepared `batch.x` (through the forward owner if any);
        with `features` (a strategy `needs_features`), also `batch.features`, the pooled
        pre-logits, from the same pass through the backbone."""
        model = self.model
        if self.forward_owner is not None:
            self.forward_owner.forward(self, batch)
        elif features:
            raw = model.forward_features(batch.x)
            batch.features = model.forward_head(raw, pre_logits=True)
            batch.logits = (model.forward_head(raw, t=batch.t) if getattr(model, "uses_task_labels", False)
                            else model.forward_head(raw))
        else:
            batch.logits = model_call(model, batch.x, batch.t)

    def train_on_copy(self, steps: int) -> dict[str, torch.Tensor] | None:
        """Train `steps` more steps on the experience's training data from a copy of the whole
        run (model, optimizer, strategies' states, generators) and return the copy's weights;
        the run then goes on exactly as if this had not happened. While it trains,
        `anneal_step` counts its steps (the LR owner sets the LR from it). None when there is
        nothing to train on. Call it from `before_evaluation`, once the experience is over."""
        if self._train_on_copy is None:
            raise RuntimeError("train_on_copy is given by the trainer; this context has no trainer")
        return self._train_on_copy(steps)

    def evaluate_with(self, weights: dict[str, torch.Tensor] | None) -> None:
        """Have the coming boundary evaluation score `weights` instead of the model's own
        (which are back for training afterwards). One strategy per boundary."""
        if weights is not None and self.evaluation_weights is not None:
            raise ValueError("two strategies asked the same evaluation to score weights of their own")
        if weights is not None:
            self.evaluation_weights = weights

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every parameter group, times the group's `lr_scale` (default 1).
        Only the strategy that owns the LR (`owns_lr = True`) may call this."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    @property
    def lrs(self) -> list[float]:
        """The learning rate of every parameter group, in group order."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def strategy_seed(self, strategy: "Strategy") -> int:
        """The seed of `strategy`'s generator in this run (stable under reordering the list)."""
        return self._seeds[id(strategy)]


@dataclass(slots=True)  # one per training step: slots make it cheap to build
class Batch:
    """One training batch as it moves through the hooks.

    Rows 0..`n_incoming`-1 are the incoming batch from the stream; strategies
    append rows after them (`append`, e.g. replayed samples), each group under a
    key (the appending strategy itself, usually) with optional per-row `fields`
    (e.g. the logits stored with them): `parts[key]` is its rows and
    `fields[key]` its fields.
    `x_raw`, `y` and `t` hold every row; the trainer then fills `x` (prepared
    inputs on the device; `y`, `t` and fields move there too), `logits`,
    `features` (only when a strategy `needs_features`), and `losses`, the named
    loss terms summed into the training loss.
    """

    x_raw: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor
    n_incoming: int
    x: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    features: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    parts: dict[object, slice] = field(default_factory=dict)
    fields: dict[object, dict[str, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def of_inputs(cls, x: torch.Tensor, t: torch.Tensor | None) -> "Batch":
        """A batch of prepared inputs only, for a forward pass outside training."""
        t = t if t is not None else torch.zeros(len(x), dtype=torch.long, device=x.device)
        return cls(x_raw=x, y=None, t=t, n_incoming=len(x), x=x)

    def append(self, key: object, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
               **fields: torch.Tensor) -> slice:
        """Append rows (raw inputs, labels, task labels) under `key`, with per-row `fields`;
        returns their rows. Only before the batch is prepared (in `adapt_batch`)."""
        if self.x is not None:
            raise RuntimeError("rows can only be appended before the batch is prepared (in adapt_batch)")
        if key in self.parts:
            raise ValueError(f"rows under {key!r} were already appended to this batch")
        start = len(self.y)
        self.x_raw = torch.cat([self.x_raw, x.to(self.x_raw.device)])
        self.y = torch.cat([self.y, y.to(self.y.device)])
        self.t = torch.cat([self.t, t.to(self.t.device)])
        self.parts[key] = slice(start, len(self.y))
        if fields:
            self.fields[key] = dict(fields)
        return self.parts[key]

    def drop_incoming(self, k: int) -> None:
        """Drop the last `k` incoming rows, before anything is appended: room for replayed
        rows at the same batch size (compute-equivalent replay)."""
        if self.x is not None or self.parts:
            raise RuntimeError("incoming rows can only be dropped in adapt_batch, before rows are appended")
        if not 0 <= k < self.n_incoming:
            raise ValueError(f"cannot drop {k} of {self.n_incoming} incoming rows")
        n = self.n_incoming - k
        self.x_raw, self.y, self.t, self.n_incoming = self.x_raw[:n], self.y[:n], self.t[:n], n

    def prepare(self, device: torch.device, transform: Callable, generator: torch.Generator,
                appended_generator: torch.Generator) -> None:
        """Set `x` (the rows moved to `device` and transformed for training) and move every
        other field there. Appended rows are augmented with a generator of their own, so what
        the incoming rows draw does not depend on replay."""
        on_cpu = device.type == "cpu"  # then every tensor is already there: skip the moves
        x = self.x_raw if on_cpu else self.x_raw.to(device, non_blocking=True)
        n = self.n_incoming
        if self.n_appended and getattr(transform, "augments", False):
            self.x = torch.cat([transform(x[:n], train=True, generator=generator),
                                transform(x[n:], train=True, generator=appended_generator)])
        else:
            self.x = transform(x, train=True, generator=generator)
        if on_cpu:
            return
        self.y = self.y.to(device, non_blocking=True)
        self.t = self.t.to(device, non_blocking=True)
        for key, fields in self.fields.items():
            self.fields[key] = {k: v.to(device, non_blocking=True) for k, v in fields.items()}

    @property
    def incoming(self) -> slice:
        return slice(0, self.n_incoming)

    @property
    def n_appended(self) -> int:
        return len(self.y) - self.n_incoming
