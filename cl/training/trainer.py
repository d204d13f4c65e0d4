"""The lifelong trainer: owns the loop over experiences, epochs and batches.

It asks strategies (see `strategies.base` for the hooks and their
precedence), records one matrix per evaluator, and emits records to
tracking sinks. It knows nothing about MLflow or the CLI; its settings are
the experiment file's `training:` section.

One experience, as `fit` runs it::

    begin (hooks, scheduler)  ->  for each batch: step, then after-iteration
    (counters, progress, periodic evaluation, checkpoint)  ->  end (hooks,
    timing, loss means)  ->  before_evaluation hooks  ->  evaluation row
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cl.config.schema import TrainingConfig
from cl.training.checkpoint import model_state, save_run_checkpoint, unwrapped
from cl.training.devices import resolve_device
from cl.training.scoring import TaskEvaluation, place_data
from cl.training.hooks import hook_table, lr_owner, single_owners
from cl.training.nonfinite import LossCheck
from cl.training.precision import GraphBreakReport, Precision, compile_model
from cl.training.position import Position, TrainingClock, progress_bar
from cl.training.record import DEFAULT_LOSS, RunRecord, Sink
from cl.training.seeds import RunGenerators, strategy_seeds
from cl.training.sync_batchnorm import convert_sync_batchnorm, has_batchnorm
from evaluation.evaluators import Evaluator, default_evaluators
from strategies.base import Strategy
from strategies.context import Batch, Context
from streams.experience import Stream, TensorData

log = logging.getLogger(__name__)


def process_group() -> tuple[int, int]:
    """(rank, world size) where torch.distributed joins several processes
    (`cl.runner.distributed`); (0, 1) otherwise."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def batchnorm_for_processes(model: torch.nn.Module, sync: bool, device: torch.device) -> torch.nn.Module:
    """With `sync_batchnorm`, the model's BatchNorms synchronised over the processes; without,
    a warning where the model has BatchNorm (each process then normalises its own share)."""
    if sync:
        return convert_sync_batchnorm(model, device)[0]
    if has_batchnorm(model):
        log.warning("the model has BatchNorm and several processes train it: each normalises with its own share "
                    "of the batch, which one process would not; set training.sync_batchnorm: true for the "
                    "whole batch's statistics")
    return model


class TrainingStep(torch.nn.Module):
    """What DistributedDataParallel wraps on several processes: the model and the parameters
    strategies train beside it (prompts, keys, generators: the optimizer's groups), so that
    every gradient is averaged; its forward runs the trainer's whole forward pass (a forward
    owner's, the features a strategy needs) on the plain model, handed in as `run`."""

    def __init__(self, model: torch.nn.Module, extra: list[torch.nn.Parameter]):
        super().__init__()
        self.model = model
        self.extra = torch.nn.ParameterList(extra)

    def forward(self, run):
        return run()


def data_parallel(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
    """DistributedDataParallel over the process group, of the model and the optimizer's
    other trainable parameters, or None where nothing trains. Built at every experience,
    after the strategies' `before_experience`: DDP reduces the gradients of the parameters
    that train then (a prompt method freezes its backbone; SLCA changes rates)."""
    from torch.nn.parallel import DistributedDataParallel

    own = {id(p) for p in model.parameters()}
    extra = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad and id(p) not in own]
    if not extra and not any(p.requires_grad for p in model.parameters()):
        return None
    ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(TrainingStep(model, extra), device_ids=ids)


def _shares(parts: dict, rank: int, world: int) -> dict:
    """The appended row groups of a batch (`Batch.parts`) as they fall in the rows rank::world."""
    out = {}
    for key, part in parts.items():
        first = -(-(part.start - rank) // world)  # the first local row at or after part.start
        out[key] = slice(first, -(-(part.stop - rank) // world))
    return out


def gather_rows(local: torch.Tensor, n: int, rank: int, world: int) -> torch.Tensor:
    """Every process's rows r::world of an n-row tensor, put back in order (padded to the
    longest share for all_gather, which needs equal sizes)."""
    longest = -(-n // world)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    out = torch.empty((n, *local.shape[1:]), dtype=local.dtype, device=local.device)
    for r, part in enumerate(parts):
        out[r::world] = part[:len(range(r, n, world))]
    return out


def classification_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over classes; for sequence outputs (N, L, V) over every position."""
    if logits.dim() > 2:
        return F.cross_entropy(logits.flatten(0, -2), y.flatten())
    return F.cross_entropy(logits, y)


class LifelongTrainer:
    """Trains one model through a stream of experiences.

    For each experience: strategy hooks, `settings.epochs` passes over the (possibly
    strategy-replaced) training data in shuffled batches of `settings.batch_size`,
    then evaluation of every evaluator on every task's test set, seen or not. The
    untrained model is evaluated once first (row 0 of every matrix). `settings` is
    the experiment file's `training:` section (`cl.config.schema.TrainingConfig`).

    `scheduler` is an LR scheduler, or a factory `(optimizer, steps) -> scheduler`;
    with `scheduler_scope="experience"` the factory is called at every experience,
    from the LR the run started with, with the number of scheduler steps the
    experience takes. `checkpoint_path` is written after every experience and,
    with `checkpoint_every`, every that many iterations, with `checkpoint_meta()`
    saved beside the state. With `eval_every`, the model is also
    evaluated every that many iterations (the curve of continual evaluation), on
    the tasks seen so far plus the next experience's (`curve_tasks="seen_and_next"`)
    or on every task (`"all"`).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, strategies: Sequence[Strategy],
                 settings: TrainingConfig | None = None, *, device: str | torch.device = "cpu", seed: int = 0,
                 scheduler=None, evaluators: Sequence[Evaluator] | None = None, sinks: Sequence[Sink] = (),
                 progress: bool = False, progress_label: Callable[[], str] = str,
                 checkpoint_path: str | None = None, checkpoint_meta: Callable[[], dict] = dict):
        # The loop's settings are the experiment file's `training:` section, validated there
        # (its optimizer and scheduler specs are built by the caller: `optimizer`, `scheduler`).
        settings = self.settings = settings if settings is not None else TrainingConfig()
        is_instance = isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
        if is_instance and settings.scheduler_scope == "experience":
            raise ValueError("scheduler_scope='experience' rebuilds the scheduler: give a factory "
                             "(optimizer, steps) -> scheduler, not a scheduler")
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.rank, self.world = process_group()
        model = model.to(self.device)
        if self.world > 1:
            model = batchnorm_for_processes(model, settings.sync_batchnorm, self.device)
        self.model, self.optimizer = model, optimizer
        # Decided once: at precision 32 the step runs exactly as it did without these settings.
        self.precision = Precision(settings.precision, self.device)
        compile_model(self.model, settings.compile)
        self.graph_breaks = GraphBreakReport(bool(settings.compile))
        self.scheduler = scheduler if is_instance else None
        self._scheduler_factory: Callable | None = None if is_instance else scheduler
        self.strategies, self.seed = list(strategies), seed
        self.evaluators = list(evaluators) if evaluators is not None else None
        self.sinks, self.progress = list(sinks), progress
        self.progress_label = progress_label  # where the invocation stands, before each experience's bar
        # Checkpoints inside an experience only where checkpoints are written at all.
        self.checkpoint_path, self.checkpoint_meta = checkpoint_path, checkpoint_meta
        self.checkpoint_every = settings.checkpoint_every if checkpoint_path else None
        self.loss_check = LossCheck(self.device.type == "cpu" or settings.nonfinite == "skip",
                                    settings.nonfinite == "stop", self._where,
                                    lambda: [n for s in self.strategies if (n := s.diagnose(self.ctx))])

        self.rng = RunGenerators(seed, self.rank, self.world)

        self.hooks, self.owner = hook_table(self.strategies), single_owners(self.strategies)
        self.lr_owner = lr_owner(self.strategies, scheduler)
        self.needs_features = any(s.needs_features for s in self.strategies)
        self._trained_on: TensorData | None = None  # the experience's training data (a copy trains on it)
        self.ctx = Context(self.model, optimizer, self.device, aux_generator=self.rng.aux, scheduler=self.scheduler,
                           forward_owner=self.owner["forward"], seeds=strategy_seeds(seed, self.strategies),
                           train_on_copy=self._train_on_copy)
        # Data parallel (`cl.runner.distributed`): set only where the process group holds several
        # processes, so one process steps exactly as before.
        self.ddp = None  # DistributedDataParallel over the model, built at each experience
        self.ctx.rank, self.ctx.world = self.rank, self.world
        # Strategies that read the step's logits or features after it (`after_step`) get them
        # for the whole batch, gathered from every process.
        self._gather_outputs = self.world > 1 and any(s.reads_step_outputs for s in self.hooks["after_step"])
        self.tests: TaskEvaluation | None = None
        self.record: RunRecord | None = None
        self._pending_state: dict | None = None
        self._start_state: dict | None = None

    def _after_backward(self, batch: Batch) -> None:
        for s in self.hooks["after_backward"]:
            s.after_backward(self.ctx, batch)

    def _scaled_step(self, loss: torch.Tensor, batch: Batch) -> bool:
        """float16's backward and step through the loss scaler; gradients are unscaled before
        the `after_backward` hooks, so they see (and project) true gradients. False when
        the scaler skipped the step."""
        self.precision.backward(loss)
        self.precision.unscale(self.optimizer)
        self._after_backward(batch)
        return self.precision.step(self.optimizer)

    # ------------------------------------------------------------------ run
    def fit(self, stream: Stream, stop_after: int | None = None) -> RunRecord:
        """Train through `stream` (from where a loaded checkpoint left off) and return the record.

        `stop_after=k` stops once k experiences are done, as an interrupted run would."""
        resume = self._start(stream) if self.record is None else None
        rows = {exp: k + 1 for k, exp in enumerate(stream.eval_after)}
        for experience in stream.experiences[self.record.completed:]:
            if stop_after is not None and self.record.completed >= stop_after:
                break
            self._train_experience(stream, experience, resume)
            resume = None
            weights, self.ctx.evaluation_weights = self.ctx.evaluation_weights, None  # `ctx.evaluate_with`
            if experience.index in rows:
                with self.precision.autocast():
                    self.tests.row(stream, rows[experience.index], experience.index, weights)
                if reported := self.strategy_metrics():
                    self._emit(reported, rows[experience.index])
                self.graph_breaks.check()  # once training and evaluation have both been compiled
            if self.checkpoint_path:
                self._save_checkpoint()
        return self.record

    def _start(self, stream: Stream) -> Position | None:
        """Set up strategies and the optimizer for `stream`, then restore a pending checkpoint
        or evaluate the untrained model. Returns a mid-experience position to resume from."""
        self._setup(stream)
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            progress = state["in_progress"]
            self._load_state(progress["start"] if progress else state)
            return None if progress is None else Position.restored(progress, state, self.device)
        with self.precision.autocast():
            self.tests.untrained(stream)
        self.rng.split_global()  # everything built alike on every process; dropout's masks from here on are its own
        return None

    def _setup(self, stream: Stream) -> None:
        """The run's record, the strategies' setup, the optimizer's parameter groups and a
        run-long scheduler, for `stream`."""
        ctx, settings = self.ctx, self.settings
        ctx.stream, ctx.transform = stream, stream.transform
        ctx.planned_steps = [-(-len(e.train) // settings.batch_size) * settings.epochs for e in stream.experiences]
        if self.evaluators is None:
            self.evaluators = default_evaluators(stream.task_classes, stream.n_classes, stream.is_sequence,
                                                 stream.schedule.get("bytes_per_token"))
        shape = (len(stream.eval_after) + 1, stream.n_tasks)
        self.record = RunRecord({e.key: np.full(shape, np.nan) for e in self.evaluators},
                                {e.key: e.higher_is_better for e in self.evaluators},
                                main_loss=getattr(self.owner["loss"], "loss_name", None) or DEFAULT_LOSS)
        self.tests = TaskEvaluation(ctx, self.evaluators, settings, self.record, self._emit,
                                    self.owner["eval_model"], self.owner["predict"])
        for s in self.strategies:
            s.setup(ctx)
        if self.hooks["configure_optimizer"]:
            groups = [dict(g) for g in self.optimizer.param_groups]
            for s in self.hooks["configure_optimizer"]:
                groups = s.configure_optimizer(ctx, groups)
            # The same optimizer, its settings filling what a new group leaves out, over the
            # strategies' parameter groups (refilled in place rather than rebuilt: `defaults`
            # can hold more than the constructor takes, e.g. AdamW's `decoupled_weight_decay`).
            self.optimizer.param_groups.clear()
            self.optimizer.state.clear()
            for group in groups:
                self.optimizer.add_param_group(group)
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        if self._scheduler_factory is not None and settings.scheduler_scope == "run":
            self.scheduler = ctx.scheduler = self._scheduler_factory(self.optimizer, None)

    # ---------------------------------------------------------- one experience
    def _train_experience(self, stream: Stream, experience, resume: Position | None = None) -> None:
        clock = TrainingClock()
        data = self._begin_experience(experience, resume is None)
        steps_per_epoch = -(-len(data) // self.settings.batch_size)
        at = resume or Position()
        if resume is not None:  # the beginning above was replayed from the experience's start
            self._start_state = resume.start
            self._load_state(resume.current)
            self.rng.data.set_state(resume.epoch_rng)
            clock = TrainingClock(before=resume.elapsed)
        givers = [type(s).__name__ for s in self.hooks["training_data"]]
        bar = progress_bar(self.progress, stream, experience, data, self.ctx.steps_in_experience, givers,
                           done=at.epoch * steps_per_epoch + at.batch, prefix=self.progress_label())
        for epoch in range(at.epoch, self.settings.epochs):
            skip = at.batch if epoch == at.epoch else 0
            at.epoch, at.batch = epoch, skip
            at.epoch_rng = self.rng.data.get_state() if self.checkpoint_every else None
            self.ctx.epoch, self.ctx.step = epoch, epoch * steps_per_epoch + skip
            for x, y, t in self._batches(data, skip):
                self.ctx.iteration = self.record.iteration
                losses = self._train_batch(x, y, t)
                # A float16 step the scaler skipped counts as skipped, whatever `nonfinite` says.
                at.count(losses, len(y), self.record, "skip" if self.precision.skipped else self.settings.nonfinite)
                self._after_iteration(stream, experience, at, clock, bar)
            self._step_scheduler("epoch")
        bar.close()
        self._end_experience(data, at, clock)

    def _begin_experience(self, experience, fresh: bool) -> TensorData:
        """The experience's training data, as the strategies replace it, with the context,
        the model's mode, `before_experience` hooks and an experience-scoped scheduler set."""
        ctx = self.ctx
        if self.checkpoint_every and fresh:
            self._start_state = copy.deepcopy(self.state_dict())
        ctx.experience, ctx.training, ctx.iteration = experience, True, self.record.iteration
        data = experience.train
        for s in self.hooks["training_data"]:
            replaced = s.training_data(ctx, data)
            data = data if replaced is None else replaced
        data = place_data(data, self.device, self.settings.data_on_device)
        self._trained_on = data
        ctx.step, ctx.epoch = 0, 0
        ctx.steps_in_experience = -(-len(data) // self.settings.batch_size) * self.settings.epochs
        self.model.train()
        for s in self.hooks["before_experience"]:
            s.before_experience(ctx)
        if self.world > 1:
            self.ddp = data_parallel(self.model, self.optimizer, self.device)
        self._restart_scheduler()
        return data

    def _batches(self, data: TensorData, skip: int):
        """The epoch's shuffled batches from `skip` on (a resume inside the epoch)."""
        return data.batches(self.settings.batch_size, True, self.rng.data, skip)

    def _after_iteration(self, stream: Stream, experience, at: Position, clock: TrainingClock, bar) -> None:
        """Counters, progress, the periodic evaluation and the checkpoint due at this iteration."""
        self.record.iteration += 1
        self.ctx.step += 1
        at.batch += 1
        bar.update()
        it = self.record.iteration
        if self.settings.eval_every and it % self.settings.eval_every == 0:
            with clock.paused(), self.precision.autocast():  # periodic evaluations are not training time
                self.tests.periodic(stream, experience.index)
        if self.checkpoint_every and it % self.checkpoint_every == 0 and self.ctx.step < self.ctx.steps_in_experience:
            self._save_checkpoint(at.saved(clock.elapsed()))

    def _end_experience(self, data: TensorData, at: Position, clock: TrainingClock) -> None:
        self.loss_check.flush()
        for s in self.hooks["after_experience"]:
            s.after_experience(self.ctx, data)
        elapsed = clock.elapsed()
        record = self.record
        record.train_time_s += elapsed
        record.experience_time_s.append(elapsed)
        record.completed += 1
        record.experience_ends.append(record.iteration)
        record.experience_rows.append(record.rows_trained)
        record.add_loss_terms(at.loss_means())
        for s in self.hooks["before_evaluation"]:
            s.before_evaluation(self.ctx)

    def _step_scheduler(self, interval: str) -> None:
        """The experiment's scheduler steps every `training.scheduler_interval` ('step' or 'epoch')."""
        if self.scheduler is not None and self.settings.scheduler_interval == interval:
            self.scheduler.step()

    def _restart_scheduler(self) -> None:
        """An experience-scoped scheduler starts again from the first LR, over this experience."""
        if self._scheduler_factory is not None and self.settings.scheduler_scope == "experience":
            for group in self.optimizer.param_groups:
                group["lr"] = group["initial_lr"]
            steps = self.ctx.steps_in_experience if self.settings.scheduler_interval == "step" else self.settings.epochs
            self.scheduler = self.ctx.scheduler = self._scheduler_factory(self.optimizer, steps)

    # ------------------------------------------------------------ one batch
    def _train_batch(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """One iteration: hooks, prepare, forward, named losses, backward, step. Returns the
        terms, or None for a step skipped for a non-finite loss."""
        ctx, hooks = self.ctx, self.hooks
        for s in hooks["before_iteration"]:
            s.before_iteration(ctx)
        if ctx.iteration % self.settings.lr_log_every == 0 and ctx.anneal_step is None:
            self._log_lrs(ctx.iteration)
        batch = Batch(x, y, t, len(y))
        for s in hooks["adapt_batch"]:
            s.adapt_batch(ctx, batch)
        batch.prepare(self.device, ctx.transform, self.rng.aug, self.rng.aug_appended)
        ctx.batch = batch
        if self.world > 1:
            return self._train_share(batch)
        with self.precision.autocast():  # nullcontext at precision 32
            ctx.forward_batch(batch, self.needs_features)
            loss = self._loss(batch)
        if not self.loss_check.step_is_finite(ctx.iteration, loss):
            return None
        return batch.losses if self._step(loss, batch, batch) else None

    def _step(self, loss: torch.Tensor, trained: Batch, batch: Batch) -> bool:
        """Backward, the `after_backward` hooks (on the rows `trained`), the optimizer's and the
        scheduler's step, then `after_step` (on the whole `batch`). False where float16's loss
        scaler skipped the step (inf/NaN gradients): no scheduler step, no `after_step`."""
        if loss.requires_grad:  # a frozen model (nearest-mean on fixed features) has nothing to step
            self.optimizer.zero_grad(set_to_none=True)
            if self.precision.scaler is None:
                loss.backward()
                self._after_backward(trained)
                self.optimizer.step()
            elif not self._scaled_step(loss, trained):
                return False
        self._step_scheduler("step")
        for s in self.hooks["after_step"]:
            s.after_step(self.ctx, batch)
        return True

    def _train_share(self, batch: Batch) -> dict[str, torch.Tensor] | None:
        """`_train_batch` on one of several processes: every rank holds the same global batch
        (incoming and replayed rows, drawn by generators all ranks share, augmented alike) and
        trains on its rows r::N through DistributedDataParallel. Each local loss, a mean over
        its n_r rows, is weighted n_r * N / G (G the global rows) so that DDP's average of the
        gradients is the gradient of the mean over all G rows, as one process takes it, also
        where a last batch does not split evenly (a term over rows of its own scales itself
        with `ctx.share_mean`). The `after_step` hooks see the whole batch: replay memories are
        updated from every incoming row, identically on every rank."""
        ctx, rows = self.ctx, slice(self.rank, None, self.world)
        n_global = len(batch.y)
        local = Batch(batch.x_raw[rows], batch.y[rows], batch.t[rows], len(range(batch.n_incoming)[rows]),
                      x=batch.x[rows], parts=_shares(batch.parts, self.rank, self.world),
                      fields={k: {n: v[rows] for n, v in f.items()} for k, f in batch.fields.items()})
        n_local = len(local.y)
        weight = n_local * self.world / n_global
        ctx.loss_weight = weight
        try:  # the training forward through DDP, which syncs the backward
            with self.precision.autocast():
                if self.ddp is None:
                    ctx.forward_batch(local, self.needs_features)
                else:
                    self.ddp(lambda: ctx.forward_batch(local, self.needs_features))
                loss = self._loss(local)
                if not n_local:  # more ranks than rows: nothing to learn here, but DDP needs this rank's zeros
                    loss = local.logits.sum() * 0.0
                    local.losses = {k: torch.zeros((), device=loss.device) for k in local.losses}
        finally:
            ctx.loss_weight = 1.0
        # The step's terms as one process has them (sum over ranks of weight * local mean, / N):
        # every rank sees the same values, so all skip a non-finite step together.
        names = list(local.losses)
        terms = torch.stack([local.losses[k].detach().float() * weight for k in names])
        torch.distributed.all_reduce(terms)
        terms /= self.world
        losses = dict(zip(names, terms.unbind()))
        if not self.loss_check.step_is_finite(ctx.iteration, terms.sum()):
            return None
        batch.losses = losses
        if self._gather_outputs:
            batch.logits = gather_rows(local.logits.detach(), n_global, self.rank, self.world)
            if local.features is not None:
                batch.features = gather_rows(local.features.detach(), n_global, self.rank, self.world)
        return losses if self._step(loss * weight, local, batch) else None

    def _loss(self, batch: Batch) -> torch.Tensor:
        """The main term (the loss owner's, else cross-entropy) and every strategy's named
        extra terms, into `batch.losses`; returns their sum."""
        ctx, owner = self.ctx, self.owner["loss"]
        main = owner.loss(ctx, batch) if owner is not None else classification_loss(batch.logits, batch.y)
        batch.losses = {self.record.main_loss: main, **batch.losses}
        for s in self.hooks["extra_loss"]:
            extra = s.extra_loss(ctx, batch)
            if extra is None:
                continue
            for name, term in (extra.items() if isinstance(extra, dict) else [(type(s).__name__.lower(), extra)]):
                if name in batch.losses:
                    raise ValueError(f"two loss terms are named '{name}' (the second from {type(s).__name__})")
                batch.losses[name] = term
        return sum(batch.losses.values()) if len(batch.losses) > 1 else main

    def _where(self, iteration: int) -> str:
        """An iteration as the user counts it: which experience, which step of it."""
        first = self.record.iteration - self.ctx.step  # the experience's first iteration
        return (f"experience {self.ctx.experience.index + 1} of {len(self.ctx.stream)}, at iteration {iteration} "
                f"(step {iteration - first + 1} of that experience)")

    def _log_lrs(self, iteration: int) -> None:
        lrs = self.ctx.lrs
        self.record.lr_curve.append([iteration, lrs])
        metrics = {"lr": lrs[0]} if len(lrs) == 1 else {f"lr_group{k}": lr for k, lr in enumerate(lrs)}
        self._emit(metrics, iteration, kind="lr")

    # ------------------------------------------------------- a copy of the run
    def _train_on_copy(self, steps: int) -> dict[str, torch.Tensor] | None:
        """`ctx.train_on_copy`: train `steps` more steps on the experience's data from a copy
        of the whole run state, keep the weights, and put the run back as it was."""
        data = self._trained_on
        if not steps or data is None or not len(data):
            return None
        start, ctx, saved = time.perf_counter(), self.ctx, copy.deepcopy(self.state_dict())
        self.model.train()
        batches = iter(())
        try:
            for a in range(steps):
                batch = next(batches, None)
                if batch is None:  # as many passes over the data as the copy needs
                    batches = data.batches(self.settings.batch_size, True, self.rng.data)
                    batch = next(batches)
                ctx.anneal_step = a
                self._train_batch(*batch)
            self.loss_check.flush()
            weights = copy.deepcopy(model_state(self.model))
        finally:
            ctx.anneal_step = None
            self._load_state(saved)
        self.record.anneal_steps += steps
        self.record.train_time_s += time.perf_counter() - start  # compute spent training, if on a copy
        return weights

    # ------------------------------------------------------------ evaluate
    def evaluate(self, stream: Stream, tasks: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """Every evaluator's score on each task's test set (only `tasks`', the others NaN)."""
        with self.precision.autocast():
            return self.tests.evaluate(stream, tasks)

    def strategy_metrics(self) -> dict[str, float]:
        """What the run's strategies report of their own work (`Strategy.metrics`)."""
        out: dict[str, float] = {}
        for strategy in self.strategies:
            out.update(strategy.metrics())
        return out

    def _emit(self, metrics: dict[str, float], step: int, kind: str = "evaluation") -> None:
        for sink in self.sinks:
            sink.log_metrics(metrics, step, kind)

    # ---------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        """The run's state at an experience boundary (plain tensors, numbers, lists and dicts)."""
        return {
            "model": model_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "precision": self.precision.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "strategies": [s.state_dict() for s in self.strategies],
            "rng": self.rng.state_dict(),
            "record": None if self.record is None else self.record.state_dict(),
            "in_progress": None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint; it is applied when `fit` has set the run up for its stream."""
        if len(state["strategies"]) != len(self.strategies):
            raise ValueError(f"checkpoint has {len(state['strategies'])} strategies, this run has "
                             f"{len(self.strategies)}: it was saved by a different experiment")
        self._pending_state = state
        self.record = None

    def _load_state(self, state: dict) -> None:
        unwrapped(self.model).load_state_dict(model_state(state["model"]))
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.load_state_dict(state.get("precision"))
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        for s, s_state in zip(self.strategies, state["strategies"]):
            s.load_state_dict(s_state)
        if state["record"] is not None:
            self.record.load_state_dict(state["record"])
        self.rng.load_state_dict(state["rng"], self.record.iteration)

    def _save_checkpoint(self, in_progress: dict | None = None) -> None:
        state = self.state_dict()  # on every process: it gathers their generators
        if self.rank != 0:  # every rank holds the same state otherwise: rank 0 writes it, every rank reads it on resume
            return
        if in_progress is not None:
            state["in_progress"] = {**in_progress, "start": self._start_state}
        save_run_checkpoint(self.checkpoint_path, state, self.strategies, self.checkpoint_meta())
