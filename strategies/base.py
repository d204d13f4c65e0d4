"""The `Strategy` base class: optional hooks that change what the trainer does.

A strategy overrides only the hooks it needs; hooks it does not override are
never called, so an unused hook costs nothing per batch. Every hook gets the
run's `Context` (model, optimizer, device, stream, experience, counters, and
helpers: `ctx.prepare`, `ctx.forward`, `ctx.features`, `ctx.set_lr`); batch
hooks also get the mutable `Batch`. Strategies keep their own state and
receive everything else as arguments.

Call order for one experience::

    training_data -> before_experience ->
      per batch: before_iteration -> adapt_batch -> [prepare] -> forward -> loss ->
                 extra_loss -> backward -> after_backward -> optimizer step ->
                 [per-iteration LR scheduler step] -> after_step
    -> after_experience -> before_evaluation -> evaluation (eval_model, predict)

`setup` and `configure_optimizer` run once, before the first experience.
`before_experience` runs once the training data is decided (so
`ctx.steps_in_experience` is known) and the model is in train mode, so a
strategy may put parts of it back in eval mode (frozen BatchNorm, a frozen
query network): the trainer will not undo it, evaluation included.

Precedence when several strategies of a run answer the same hook:

- In list order, each seeing what the earlier ones did: `training_data`
  (each gets the data the previous one returned), `before_experience`,
  `before_iteration`, `adapt_batch` (rows appended earlier are in the batch),
  `extra_loss` (all terms are added; two terms of the same name are an error),
  `after_backward` (gradient projections apply in order), `after_step`,
  `after_experience`.
- One owner only; a second is an error when the trainer is built: `forward`,
  `loss`, `eval_model`, `predict`, and the learning rate (a strategy with
  `owns_lr = True`, or the experiment's `training.scheduler`). They compose
  with each other: `predict` and `ctx.features` run on the evaluation model,
  so a nearest-mean predictor uses slow weights when both are in the run.

State: `state_dict()` must return plain tensors, numbers, strings, lists and
dicts, because checkpoints load with `torch.load(weights_only=True)`;
anything else is refused when the checkpoint is written. `self.rng` is a CPU
generator seeded from the run seed and the strategy's class (not its
position in the list); it is saved and restored by the base class.

Task-free strategies (`task_free = True`) are never called at boundaries
(`before_experience`, `training_data`, `after_experience`,
`before_evaluation`) and must not read
`ctx.experience`: on an online stream they see only batches.
"""
from __future__ import annotations

import torch

from strategies.context import Batch, Context
from streams.experience import TensorData


class Strategy:
    """Base class of every continual-learning strategy (see the module docstring for the rules)."""

    #: Never told where experiences begin or end.
    task_free: bool = False
    #: Sets the learning rate itself (`ctx.set_lr`); excludes `training.scheduler` and other owners.
    owns_lr: bool = False
    #: The trainer fills `batch.features` (pooled pre-logits) for the training batch.
    needs_features: bool = False
    #: The backbone stays frozen for the whole run, so a runner may compute its features once
    #: and train on them (`cl.training.feature_cache`); nearest-mean on a frozen backbone says so.
    frozen_features: bool = False
    #: Trains on later tasks before their turn (Joint): the run reports no forward transfer,
    #: which needs each task's score before its own training (`evaluation.metrics`).
    learned_ahead: bool = False
    #: When this strategy owns `loss`: the name its term is logged under (default "ce" otherwise).
    loss_name: str | None = None
    #: Keeps a run on several processes the one-process computation, split (its statistics
    #: reduced over the processes, `Context.shard`/`all_reduce`/`share_mean`): `--devices N`
    #: and torchrun accept it. A plugin strategy says so here.
    data_parallel: bool = False
    #: Reads `batch.logits` (or `batch.features`) in `after_step`: on several processes the
    #: trainer then gathers every process's rows of them into the whole batch's.
    reads_step_outputs: bool = False

    # ------------------------------------------------------------- once per run
    def setup(self, ctx: Context) -> None:
        """Before training; on resume, before the saved state is loaded. Create parameters here."""
        self.rng = torch.Generator().manual_seed(ctx.strategy_seed(self))
        self.device = ctx.device  # where `on_device` puts state loaded from a checkpoint

    def configure_optimizer(self, ctx: Context, param_groups: list[dict]) -> list[dict]:
        """Return the optimizer's parameter groups: add groups (prompts, extra heads), split
        the model's, or give a group its own `lr` or an `lr_scale` that LR owners respect."""
        return param_groups

    # ------------------------------------------------------- per experience
    def training_data(self, ctx: Context, data: TensorData) -> TensorData | None:
        """The data to train on for `ctx.experience` instead of `data`, or None to keep it.
        Must depend only on the experience, the stream and this strategy's state."""
        return None

    def before_experience(self, ctx: Context) -> None:
        """Before training on `ctx.experience`, with the model in train mode and
        `ctx.steps_in_experience` known."""

    def after_experience(self, ctx: Context, data: TensorData) -> None:
        """After training on `ctx.experience`; `data` is what was trained on."""

    def before_evaluation(self, ctx: Context) -> None:
        """After every experience, once every strategy's `after_experience` has run and before
        the experience's evaluation (also where the stream takes no evaluation row): e.g.
        train a copy of the run and have the evaluation score it (`ctx.train_on_copy`,
        `ctx.evaluate_with`), as an "infinite" LR schedule's anneal does."""

    # ------------------------------------------------------------ per batch
    def before_iteration(self, ctx: Context) -> None:
        """At the start of every iteration (e.g. set the LR for `ctx.iteration`)."""

    def adapt_batch(self, ctx: Context, batch: Batch) -> None:
        """Change the raw batch before it is prepared, e.g. `batch.append(...)` replayed rows."""

    def forward(self, ctx: Context, batch: Batch) -> None:
        """Owner only: set `batch.logits` (and `batch.features`, if known) from `batch.x` and
        `batch.t`, replacing the model's own forward pass (prompting a frozen backbone).
        Called for training batches, evaluation and `ctx.forward`; loss terms it adds to
        `batch.losses` count only for training batches."""
        raise NotImplementedError

    def loss(self, ctx: Context, batch: Batch) -> torch.Tensor:
        """Owner only: the main training loss of the batch, replacing cross-entropy."""
        raise NotImplementedError

    def extra_loss(self, ctx: Context, batch: Batch) -> torch.Tensor | dict[str, torch.Tensor] | None:
        """Loss terms added to the main one: a dict of named terms, or one tensor (named after
        the class), or None. Each term is logged by its name."""
        return None

    def after_backward(self, ctx: Context, batch: Batch) -> None:
        """After gradients are computed, before the optimizer step (e.g. project gradients)."""

    def after_step(self, ctx: Context, batch: Batch) -> None:
        """After the optimizer step; `batch.logits` are those the step was taken on."""

    # ------------------------------------------------------------ evaluation
    def eval_model(self, ctx: Context) -> torch.nn.Module | None:
        """Owner only: the model to evaluate instead of the trained one (e.g. slow weights)."""
        return None

    def predict(self, ctx: Context, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Owner only: class scores for prepared inputs, for a classifier that is not the
        model's head (nearest-mean). `ctx.model` is the evaluation model."""
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])

    def describe(self) -> str:
        return type(self).__name__

    def metrics(self) -> dict[str, float]:
        """What the strategy reports of its own work so far (e.g. the share of rows it replayed),
        logged with every evaluation row and among the run's final metrics. Names must not
        collide with the evaluators' (`acc_*`, `loss_*`)."""
        return {}

    def diagnose(self, ctx: Context) -> str | None:
        """What this strategy knows about an unstable step, or None: asked only when the
        training loss turns non-finite, and added to that error (e.g. a weight penalty too
        stiff for the learning rate says so, and what strength would be stable)."""
        return None

    def state_bytes(self) -> int:
        """Bytes of the tensors this strategy holds (memories, stored logits, importances,
        prompts, class statistics): those of its `state_dict()`, which holds everything a
        checkpoint needs to go on, less the generator's state (the base class's "rng").
        A strategy holding more than it saves (a copy rebuilt at each experience) may say so."""
        def tensors(tree):
            if isinstance(tree, torch.Tensor):
                yield tree
            elif isinstance(tree, dict):
                for v in tree.values():
                    yield from tensors(v)
            elif isinstance(tree, (list, tuple)):
                for v in tree:
                    yield from tensors(v)

        state = {k: v for k, v in self.state_dict().items() if k != "rng"}
        return sum(t.numel() * t.element_size() for t in tensors(state))


#: Hooks of which a run may have one implementation only.
SINGLE_OWNER_HOOKS = ("forward", "loss", "eval_model", "predict")


def overrides(strategy: Strategy, hook: str) -> bool:
    """Whether `strategy` implements `hook` itself rather than inheriting the base's."""
    return getattr(type(strategy), hook) is not getattr(Strategy, hook)


def on_device(tree, device: torch.device | None):
    """`tree` (tensors in dicts, lists and tuples) with its tensors on `device`, or unchanged
    when `device` is None. Checkpoints load on the CPU: state a strategy computes with on the
    training device (importances, anchors, memories) goes back there in `load_state_dict`."""
    if device is None:
        return tree
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: on_device(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(on_device(v, device) for v in tree)
    return tree
