"""The lifelong trainer: owns the loop over experiences, epochs and batches.

It asks strategies (see `strategies.base` for the hooks and their
precedence), records one matrix per evaluator, and emits records to
tracking sinks. It knows nothing about configs, MLflow or the CLI.
"""
from __future__ import annotations

import copy
import hashlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from evaluation.evaluators import Evaluator, default_evaluators
from strategies.base import SINGLE_OWNER_HOOKS, Strategy, overrides
from strategies.context import Batch, Context, eval_mode, model_call
from streams.experience import Stream, TensorData

HOOKS = ("configure_optimizer", "before_experience", "training_data", "before_iteration", "adapt_batch",
         "extra_loss", "after_backward", "after_step", "after_experience")
BOUNDARY_HOOKS = ("before_experience", "training_data", "after_experience")
DEFAULT_LOSS = "ce"
# Off the CPU a finiteness check is a host sync: there losses are checked this many steps at a time.
DEFERRED_CHECK_EVERY = 50


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the experience and iteration."""


class Sink(Protocol):
    """Where the trainer sends records; must not block the training path for long.

    `kind` says what a record is: "evaluation" (a matrix row; step = row),
    "curve" (a periodic evaluation; step = iteration), "lr" (learning rates;
    step = iteration)."""

    def log_metrics(self, metrics: dict[str, float], step: int, kind: str = "evaluation") -> None: ...


@dataclass
class RunRecord:
    """What a run produced, from which every metric is computed.

    `matrices[key][k, j]` is the score of evaluator `key` on task j's test set at
    the k-th evaluation (row 0: the untrained model); `higher_is_better[key]`
    its direction. `loss_terms[name]` is each named loss term's mean per
    experience (NaN where it was not used); `main_loss` names the main term.
    `curve` holds the evaluations taken every `eval_every` iterations, and
    `lr_curve` (iteration, LR of every parameter group) every `lr_log_every`.
    """

    matrices: dict[str, np.ndarray]
    higher_is_better: dict[str, bool]
    loss_terms: dict[str, list[float]] = field(default_factory=dict)
    main_loss: str = DEFAULT_LOSS
    completed: int = 0
    train_time_s: float = 0.0
    eval_time_s: float = 0.0
    skipped_steps: int = 0  # steps dropped for a non-finite loss (training.nonfinite: skip)
    anneal_steps: int = 0  # steps trained on annealed copies (an infinite LR schedule's kept models)
    rows_trained: int = 0  # incoming rows trained on (sequences, for a language model); replayed rows not counted
    experience_ends: list[int] = field(default_factory=list)  # the iteration each experience ended at
    experience_time_s: list[float] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)
    lr_curve: list[list] = field(default_factory=list)
    iteration: int = 0

    @property
    def accuracy_matrix(self) -> np.ndarray:
        return self.matrices["acc"]

    @property
    def task_aware_matrix(self) -> np.ndarray | None:
        return self.matrices.get("task_aware_acc")

    @property
    def train_loss(self) -> list[float]:
        return self.loss_terms.get(self.main_loss, [float("nan")] * self.completed)

    def add_loss_terms(self, means: dict[str, float]) -> None:
        """Append one experience's term means, keeping every term's list aligned with experiences."""
        for name in set(self.loss_terms) | set(means):
            history = self.loss_terms.setdefault(name, [float("nan")] * (self.completed - 1))
            history.append(means.get(name, float("nan")))

    def state_dict(self) -> dict:
        return {"matrices": {k: torch.from_numpy(v.copy()) for k, v in self.matrices.items()},
                "higher_is_better": dict(self.higher_is_better), "loss_terms": copy.deepcopy(self.loss_terms),
                "main_loss": self.main_loss, "completed": self.completed, "train_time_s": self.train_time_s,
                "eval_time_s": self.eval_time_s, "experience_time_s": list(self.experience_time_s),
                "curve": copy.deepcopy(self.curve), "lr_curve": copy.deepcopy(self.lr_curve),
                "iteration": self.iteration, "skipped_steps": self.skipped_steps, "anneal_steps": self.anneal_steps,
                "rows_trained": self.rows_trained,
                "experience_ends": list(self.experience_ends)}

    def load_state_dict(self, state: dict) -> None:
        for key, matrix in state["matrices"].items():
            if key not in self.matrices or tuple(matrix.shape) != self.matrices[key].shape:
                have = {k: v.shape for k, v in self.matrices.items()}
                raise ValueError(f"checkpoint's {key} matrix has shape {tuple(matrix.shape)}; this run has {have}")
            self.matrices[key][:] = matrix.numpy()
        for name in ("loss_terms", "main_loss", "completed", "train_time_s", "eval_time_s", "experience_time_s",
                     "curve", "lr_curve", "iteration"):
            setattr(self, name, copy.deepcopy(state[name]))
        self.skipped_steps = state.get("skipped_steps", 0)
        self.anneal_steps = state.get("anneal_steps", 0)
        self.rows_trained = state.get("rows_trained", 0)
        self.experience_ends = list(state.get("experience_ends", []))


def classification_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over classes; for sequence outputs (N, L, V) over every position."""
    if logits.dim() > 2:
        return F.cross_entropy(logits.flatten(0, -2), y.flatten())
    return F.cross_entropy(logits, y)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' was asked for but CUDA is not available here; use 'cpu' or 'auto'")
    return device


def derive_seed(seed: int, name: str) -> int:
    """A 63-bit seed for the part of a run called `name`, independent of every other name."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def strategy_seeds(seed: int, strategies: Sequence[Strategy]) -> dict[int, int]:
    """A seed per strategy from the run seed, its class and how many of that class came
    before it, so adding or reordering other strategies leaves its draws unchanged."""
    seen: dict[str, int] = {}
    out = {}
    for s in strategies:
        name = f"{type(s).__module__}.{type(s).__qualname__}"
        k = seen[name] = seen.get(name, -1) + 1
        out[id(s)] = derive_seed(seed, f"{name}#{k}")
    return out


def _fits_on_device(data, device: torch.device) -> bool:
    if device.type != "cuda" or not isinstance(data, TensorData):
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return sum(v.numel() * v.element_size() for v in (data.x, data.y, data.t)) < free // 4


class LifelongTrainer:
    """Trains one model through a stream of experiences.

    For each experience: strategy hooks, `epochs` passes over the (possibly
    strategy-replaced) training data in shuffled batches of `batch_size`, then
    evaluation of every evaluator on every task's test set, seen or not. The
    untrained model is evaluated once first (row 0 of every matrix).

    `scheduler` is an LR scheduler, or a factory `(optimizer, steps) -> scheduler`;
    with `scheduler_scope="experience"` the factory is called at every experience,
    from the LR the run started with, with the number of scheduler steps the
    experience takes. `checkpoint_path` is written after every experience and,
    with `checkpoint_every`, every that many iterations. With `eval_every`, the
    model is also evaluated every that many iterations (the curve of continual
    evaluation), on the tasks seen so far plus the next experience's
    (`curve_tasks="seen_and_next"`) or on every task (`"all"`).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, strategies: Sequence[Strategy],
                 *, epochs: int = 1, batch_size: int = 32, eval_batch_size: int = 1024,
                 device: str | torch.device = "cpu", seed: int = 0, scheduler=None,
                 scheduler_interval: str = "epoch", scheduler_scope: str = "run",
                 evaluators: Sequence[Evaluator] | None = None, sinks: Sequence[Sink] = (), progress: bool = False,
                 checkpoint_path: str | None = None, checkpoint_every: int | None = None,
                 eval_every: int | None = None, curve_tasks: str = "seen_and_next", lr_log_every: int = 50,
                 nonfinite: str = "stop"):
        for name, value in (("epochs", epochs), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                            ("eval_every", eval_every), ("checkpoint_every", checkpoint_every),
                            ("lr_log_every", lr_log_every)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got '{scheduler_interval}'")
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got '{nonfinite}'")
        if scheduler_scope not in ("run", "experience"):
            raise ValueError(f"scheduler_scope must be 'run' or 'experience', got '{scheduler_scope}'")
        is_instance = isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
        if is_instance and scheduler_scope == "experience":
            raise ValueError("scheduler_scope='experience' rebuilds the scheduler: give a factory "
                             "(optimizer, steps) -> scheduler, not a scheduler")
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.scheduler = scheduler if is_instance else None
        self._scheduler_factory: Callable | None = None if is_instance else scheduler
        self.scheduler_interval, self.scheduler_scope = scheduler_interval, scheduler_scope
        self.strategies = list(strategies)
        self.epochs, self.batch_size, self.eval_batch_size = epochs, batch_size, eval_batch_size
        self.seed = seed
        self.evaluators = list(evaluators) if evaluators is not None else None
        self.sinks = list(sinks)
        self.progress = progress
        # Checkpoints inside an experience only where checkpoints are written at all.
        self.checkpoint_path = checkpoint_path
        self.checkpoint_every = checkpoint_every if checkpoint_path else None
        if curve_tasks not in ("seen_and_next", "all"):
            raise ValueError(f"curve_tasks must be 'seen_and_next' or 'all', got '{curve_tasks}'")
        self.eval_every, self.curve_tasks, self.lr_log_every = eval_every, curve_tasks, lr_log_every
        # What a NaN or infinite loss does: 'stop' raises NonFiniteLossError, 'skip' drops that
        # step (no backward, no optimizer step, no after_step) and counts it.
        self.nonfinite = nonfinite
        # On the CPU reading the loss costs nothing, and 'skip' must know before the step;
        # otherwise losses are checked DEFERRED_CHECK_EVERY steps at a time.
        self._check_each_step = self.device.type == "cpu" or nonfinite == "skip"
        self._unchecked: list[tuple[int, torch.Tensor]] = []
        # Called when a checkpoint is written; its dict is saved beside the state.
        self.checkpoint_meta: Callable[[], dict] = dict

        # Separate generators for data order, augmentation of the incoming rows, of appended
        # (replayed) rows, and of strategies' own `ctx.prepare(augment=True)`: adding a
        # strategy that samples or appends never changes what the others draw.
        self.data_rng = torch.Generator().manual_seed(seed)
        self.aug_rng = torch.Generator().manual_seed(seed + 1)
        self.aug_appended_rng = torch.Generator().manual_seed(derive_seed(seed, "augment appended rows"))
        aux = torch.Generator().manual_seed(derive_seed(seed, "strategy augmentation"))

        self.hooks = {h: [s for s in self.strategies if overrides(s, h) and not (s.task_free and h in BOUNDARY_HOOKS)]
                      for h in HOOKS}
        self.owner: dict[str, Strategy | None] = {h: self._single_owner(h) for h in SINGLE_OWNER_HOOKS}
        lr_owners = [type(s).__name__ for s in self.strategies if s.owns_lr]
        if len(lr_owners) > 1 or (lr_owners and scheduler is not None):
            owners = lr_owners + (["training.scheduler"] if scheduler is not None else [])
            raise ValueError(f"the learning rate has more than one owner: {', '.join(owners)}; keep one")
        self.needs_features = any(s.needs_features for s in self.strategies)
        self.lr_owner = next((s for s in self.strategies if s.owns_lr), None)
        self._trained_on = None  # the last experience's training data (an anneal draws from it)
        self._test_subset = None

        self.ctx = Context(self.model, optimizer, self.device, aux_generator=aux)
        self.ctx.scheduler = self.scheduler
        self.ctx.forward_owner = self.owner["forward"]
        self.ctx._seeds = strategy_seeds(seed, self.strategies)
        self.record: RunRecord | None = None
        self._pending_state: dict | None = None
        self._start_state: dict | None = None
        self._test_on_device: tuple[int, TensorData] | None = None

    def _single_owner(self, hook: str) -> Strategy | None:
        owners = [s for s in self.strategies if overrides(s, hook)]
        if len(owners) > 1:
            names = ", ".join(type(s).__name__ for s in owners)
            raise ValueError(f"hook '{hook}' has one owner per run, but {names} all implement it")
        return owners[0] if owners else None

    # ------------------------------------------------------------------ run
    def fit(self, stream: Stream, stop_after: int | None = None) -> RunRecord:
        """Train through `stream` (from where a loaded checkpoint left off) and return the record.

        `stop_after=k` stops once k experiences are done, as an interrupted run would."""
        resume = None
        if self.record is None:
            resume = self._start(stream)
        rows = {exp: k + 1 for k, exp in enumerate(stream.eval_after)}
        for experience in stream.experiences[self.record.completed:]:
            if stop_after is not None and self.record.completed >= stop_after:
                break
            self._train_experience(stream, experience, resume)
            resume = None
            annealed = self._anneal_copy()
            if experience.index in rows:
                self._evaluate_row(stream, rows[experience.index], experience.index, annealed)
            if self.checkpoint_path:
                self._save_checkpoint()
        return self.record

    def _start(self, stream: Stream) -> dict | None:
        """Set up strategies and the optimizer for `stream`, then restore a pending checkpoint
        or evaluate the untrained model. Returns a mid-experience position to resume from."""
        self._setup(stream)
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            progress = state["in_progress"]
            self._load_state(progress["start"] if progress else state)
            return None if progress is None else {**progress, "current": state}
        values = self.evaluate(stream)
        for key, row in values.items():
            self.record.matrices[key][0] = row
        self._emit({f"{key}_task{j}": float(v) for key, row in values.items() for j, v in enumerate(row)}, 0)
        return None

    def _setup(self, stream: Stream) -> None:
        """The run's record, the strategies' setup, the optimizer's parameter groups and a
        run-long scheduler, for `stream`."""
        ctx = self.ctx
        ctx.stream, ctx.transform = stream, stream.transform
        ctx.planned_steps = [-(-len(e.train) // self.batch_size) * self.epochs for e in stream.experiences]
        if self.evaluators is None:
            self.evaluators = default_evaluators(stream.task_classes, stream.n_classes, stream.is_sequence)
        shape = (len(stream.eval_after) + 1, stream.n_tasks)
        self.record = RunRecord({e.key: np.full(shape, np.nan) for e in self.evaluators},
                                {e.key: e.higher_is_better for e in self.evaluators},
                                main_loss=getattr(self.owner["loss"], "loss_name", None) or DEFAULT_LOSS)
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
        if self._scheduler_factory is not None and self.scheduler_scope == "run":
            self.scheduler = ctx.scheduler = self._scheduler_factory(self.optimizer, None)

    def _experience_data(self, experience) -> TensorData:
        """What the current experience trains on: its data, as the strategies replace it."""
        data = experience.train
        for s in self.hooks["training_data"]:
            replaced = s.training_data(self.ctx, data)
            data = data if replaced is None else replaced
        return data

    def _restart_scheduler(self) -> None:
        """An experience-scoped scheduler starts again from the first LR, over this experience."""
        if self._scheduler_factory is not None and self.scheduler_scope == "experience":
            for group in self.optimizer.param_groups:
                group["lr"] = group["initial_lr"]
            steps = self.ctx.steps_in_experience if self.scheduler_interval == "step" else self.epochs
            self.scheduler = self.ctx.scheduler = self._scheduler_factory(self.optimizer, steps)

    def planned_lrs(self, stream: Stream) -> tuple[list[list], list[dict], list[int]]:
        """The LR of every parameter group at every iteration a run over `stream` would take,
        without training (`cl schedules`): the LR owner's hook or the scheduler, stepped as
        `fit` steps them. Returns [[iteration, lrs], ...] and the anneals on copies
        ({"after_experience", "iteration", "lrs"}) and the iteration each experience ends at.
        A fresh trainer only: its optimizer's LR is left where the plan ends."""
        import warnings

        self._setup(stream)
        ctx, owner, curve, anneals, ends = self.ctx, self.lr_owner, [], [], []
        for experience in stream.experiences:
            ctx.experience = experience
            steps_per_epoch = -(-len(self._experience_data(experience)) // self.batch_size)
            ctx.step, ctx.steps_in_experience = 0, steps_per_epoch * self.epochs
            self._restart_scheduler()
            with warnings.catch_warnings():  # scheduler steps with no optimizer step: intended here
                warnings.simplefilter("ignore", UserWarning)
                for epoch in range(self.epochs):
                    ctx.epoch = epoch
                    for _ in range(steps_per_epoch):
                        if owner is not None:
                            owner.before_iteration(ctx)
                        curve.append([ctx.iteration, ctx.lrs])
                        if self.scheduler is not None and self.scheduler_interval == "step":
                            self.scheduler.step()
                        ctx.iteration += 1
                        ctx.step += 1
                    if self.scheduler is not None and self.scheduler_interval == "epoch":
                        self.scheduler.step()
            ends.append(ctx.iteration)
            n = owner.anneal_steps(ctx) if owner is not None else 0
            if n:
                lrs = []
                for a in range(n):
                    ctx.anneal_step = a
                    owner.before_iteration(ctx)
                    lrs.append(ctx.lrs)
                ctx.anneal_step = None
                anneals.append({"after_experience": experience.index, "iteration": ctx.iteration, "lrs": lrs})
        return curve, anneals, ends

    def _train_experience(self, stream: Stream, experience, resume: dict | None = None) -> None:
        ctx, hooks, model = self.ctx, self.hooks, self.model
        start = time.perf_counter()
        if self.checkpoint_every and resume is None:
            self._start_state = copy.deepcopy(self.state_dict())
        ctx.experience, ctx.training, ctx.iteration = experience, True, self.record.iteration
        data = self._experience_data(experience)
        if _fits_on_device(data, self.device):
            data = data.to(self.device)
        self._trained_on = data
        steps_per_epoch = -(-len(data) // self.batch_size)
        ctx.step, ctx.epoch, ctx.steps_in_experience = 0, 0, steps_per_epoch * self.epochs
        model.train()
        for s in hooks["before_experience"]:
            s.before_experience(ctx)
        self._restart_scheduler()

        sums: dict[str, torch.Tensor] = {}
        n_steps, first_epoch, first_batch, spent_before = 0, 0, 0, 0.0
        if resume is not None:  # the preamble above was replayed from the experience's start
            self._start_state = resume["start"]
            self._load_state(resume["current"])
            sums = {k: torch.tensor(v, device=self.device) for k, v in resume["loss_sums"].items()}
            n_steps, first_epoch, first_batch = resume["steps"], resume["epoch"], resume["batch"]
            spent_before = resume["elapsed"]
            self.data_rng.set_state(resume["epoch_rng"])
            start = time.perf_counter()
        if self.progress and not len(data):  # e.g. Joint after its first experience: say so, draw no bar
            giver = ", ".join(type(s).__name__ for s in hooks["training_data"]) or "the stream"
            tqdm.write(f"experience {experience.index + 1}/{len(stream)}: nothing to train ({giver} gave no "
                       f"training data here); evaluation only", file=sys.stderr)
        bar = tqdm(total=ctx.steps_in_experience, initial=first_epoch * steps_per_epoch + first_batch,
                   disable=not self.progress or not len(data), leave=False, file=sys.stderr, mininterval=0.5,
                   desc=f"experience {experience.index + 1}/{len(stream)}")
        eval_s = 0.0  # periodic evaluations inside the loop are not training time
        for epoch in range(first_epoch, self.epochs):
            ctx.epoch = epoch
            skip = first_batch if epoch == first_epoch else 0
            epoch_rng = self.data_rng.get_state() if self.checkpoint_every else None
            ctx.step = epoch * steps_per_epoch + skip
            for b, (x, y, t) in enumerate(data.batches(self.batch_size, True, self.data_rng, skip), start=skip):
                ctx.iteration = self.record.iteration
                losses = self._train_batch(x, y, t)
                if losses is not None:
                    for name, value in losses.items():
                        if name in sums:
                            sums[name].add_(value.detach())  # in place: no new tensor per step
                        else:
                            sums[name] = value.detach().clone()
                    n_steps += 1
                    self.record.rows_trained += len(y)
                elif self.nonfinite == "skip":
                    self.record.skipped_steps += 1
                self.record.iteration += 1
                ctx.step += 1
                bar.update()
                it = self.record.iteration
                if self.eval_every and it % self.eval_every == 0:
                    eval_start = time.perf_counter()
                    self._evaluate_periodically(stream, experience.index)
                    eval_s += time.perf_counter() - eval_start
                if self.checkpoint_every and it % self.checkpoint_every == 0 and ctx.step < ctx.steps_in_experience:
                    spent = spent_before + time.perf_counter() - start - eval_s
                    self._save_checkpoint({"epoch": epoch, "batch": b + 1, "epoch_rng": epoch_rng, "steps": n_steps,
                                           "loss_sums": {k: float(v) for k, v in sums.items()}, "elapsed": spent})
            if self.scheduler is not None and self.scheduler_interval == "epoch":
                self.scheduler.step()
        bar.close()
        self._check_unchecked()
        for s in hooks["after_experience"]:
            s.after_experience(ctx, data)
        elapsed = spent_before + time.perf_counter() - start - eval_s
        self.record.train_time_s += elapsed
        self.record.experience_time_s.append(elapsed)
        self.record.completed += 1
        self.record.experience_ends.append(self.record.iteration)
        # One host sync for every term: the means over the experience's batches.
        names = list(sums)
        means = torch.stack([sums[k] for k in names]).div(n_steps).tolist() if names and n_steps else []
        self.record.add_loss_terms(dict(zip(names, means)))

    def _train_batch(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """One iteration: hooks, prepare, forward, named losses, backward, step. Returns the
        terms, or None for a step skipped for a non-finite loss."""
        ctx, hooks = self.ctx, self.hooks
        for s in hooks["before_iteration"]:
            s.before_iteration(ctx)
        if ctx.iteration % self.lr_log_every == 0 and ctx.anneal_step is None:
            self._log_lrs(ctx.iteration)
        batch = Batch(x, y, t, len(y))
        for s in hooks["adapt_batch"]:
            s.adapt_batch(ctx, batch)
        self._prepare(batch)
        self._forward(batch)
        owner = self.owner["loss"]
        main = owner.loss(ctx, batch) if owner is not None else classification_loss(batch.logits, batch.y)
        batch.losses = {self.record.main_loss: main, **batch.losses}
        for s in hooks["extra_loss"]:
            extra = s.extra_loss(ctx, batch)
            if extra is None:
                continue
            for name, term in (extra.items() if isinstance(extra, dict) else [(type(s).__name__.lower(), extra)]):
                if name in batch.losses:
                    raise ValueError(f"two loss terms are named '{name}' (the second from {type(s).__name__})")
                batch.losses[name] = term
        loss = sum(batch.losses.values()) if len(batch.losses) > 1 else main
        if self._check_each_step:
            if not math.isfinite(loss.item()):
                if self.nonfinite == "stop":
                    raise self._nonfinite_error(ctx.iteration, loss.item())
                return None
        else:
            self._unchecked.append((ctx.iteration, loss.detach()))
            if len(self._unchecked) >= DEFERRED_CHECK_EVERY:
                self._check_unchecked()
        if loss.requires_grad:  # a frozen model (nearest-mean on fixed features) has nothing to step
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for s in hooks["after_backward"]:
                s.after_backward(ctx, batch)
            self.optimizer.step()
        if self.scheduler is not None and self.scheduler_interval == "step":
            self.scheduler.step()
        for s in hooks["after_step"]:
            s.after_step(ctx, batch)
        return batch.losses

    def _check_unchecked(self) -> None:
        """The deferred check: one host sync for the losses of the last steps."""
        if not self._unchecked:
            return
        pending, self._unchecked = self._unchecked, []
        finite = torch.isfinite(torch.stack([loss for _, loss in pending])).tolist()
        if not all(finite):
            iteration, loss = pending[finite.index(False)]
            raise self._nonfinite_error(iteration, loss.item())

    def _nonfinite_error(self, iteration: int, value: float) -> NonFiniteLossError:
        experience = self.ctx.experience
        first = self.record.iteration - self.ctx.step  # the experience's first iteration
        return NonFiniteLossError(
            f"non-finite training loss ({value}) in experience {experience.index + 1} of "
            f"{len(self.ctx.stream)}, at iteration {iteration} (step {iteration - first + 1} of that "
            f"experience); the learning rate may be too high. Set training.nonfinite: skip to skip such steps")

    def _prepare(self, batch: Batch) -> None:
        """Move the batch to the device and transform it. Appended rows are augmented with a
        generator of their own, so what the incoming rows draw does not depend on replay."""
        device, transform = self.device, self.ctx.transform
        on_cpu = device.type == "cpu"  # then every tensor is already there: skip the moves
        x = batch.x_raw if on_cpu else batch.x_raw.to(device, non_blocking=True)
        n = batch.n_incoming
        if batch.n_appended and getattr(transform, "augments", False):
            batch.x = torch.cat([transform(x[:n], train=True, generator=self.aug_rng),
                                 transform(x[n:], train=True, generator=self.aug_appended_rng)])
        else:
            batch.x = transform(x, train=True, generator=self.aug_rng)
        if on_cpu:
            return
        batch.y = batch.y.to(device, non_blocking=True)
        batch.t = batch.t.to(device, non_blocking=True)
        for key, fields in batch.fields.items():
            batch.fields[key] = {k: v.to(device, non_blocking=True) for k, v in fields.items()}

    def _forward(self, batch: Batch) -> None:
        owner, model = self.owner["forward"], self.model
        if owner is not None:
            owner.forward(self.ctx, batch)
        elif self.needs_features:
            raw = model.forward_features(batch.x)
            batch.features = model.forward_head(raw, pre_logits=True)
            batch.logits = (model.forward_head(raw, t=batch.t) if getattr(model, "uses_task_labels", False)
                            else model.forward_head(raw))
        else:
            batch.logits = model_call(model, batch.x, batch.t)

    def _log_lrs(self, iteration: int) -> None:
        lrs = self.ctx.lrs
        self.record.lr_curve.append([iteration, lrs])
        metrics = {"lr": lrs[0]} if len(lrs) == 1 else {f"lr_group{k}": lr for k, lr in enumerate(lrs)}
        self._emit(metrics, iteration, kind="lr")

    # ------------------------------------------------------------ evaluate
    @torch.no_grad()
    def evaluate(self, stream: Stream, tasks: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """Every evaluator's score on each task's test set, in one pass over all of them:
        per-sample values are summed per task on the device and read back once. With
        `tasks`, only those tasks' test sets are evaluated; the others' scores are NaN."""
        start = time.perf_counter()
        ctx, train_model = self.ctx, self.model
        owner = self.owner["eval_model"]
        model = (owner.eval_model(ctx) if owner is not None else None) or train_model
        ctx.model, ctx.training = model, False
        data, task_ids = self._test_data(stream, tasks)
        try:
            with eval_mode(model):  # then each module back in its own mode: a frozen BatchNorm stays frozen
                totals = self._evaluation_pass(data, task_ids, stream.n_tasks)
        finally:
            ctx.model, ctx.training = train_model, True
        sizes = np.array([len(d) for d in stream.test_sets], dtype=float)
        if tasks is not None:
            sizes[[j for j in range(stream.n_tasks) if j not in set(tasks)]] = np.nan
        with np.errstate(invalid="ignore", divide="ignore"):
            values = {e.key: totals[i] / sizes for i, e in enumerate(self.evaluators)}
        self.record.eval_time_s += time.perf_counter() - start
        return values

    def _evaluation_pass(self, data, task_ids: torch.Tensor, n_tasks: int) -> np.ndarray:
        """Each evaluator's per-sample values summed per task over `data`, read back once."""
        ctx, predictor, offset = self.ctx, self.owner["predict"], 0
        sums = torch.zeros(len(self.evaluators), n_tasks, device=self.device)
        for x, y, t in data.batches(self.eval_batch_size, shuffle=False):
            ids = task_ids[offset:offset + len(y)]
            offset += len(y)
            x, y, t = ctx.transform(x.to(self.device)), y.to(self.device), t.to(self.device)
            scores = predictor.predict(ctx, x, t) if predictor is not None else ctx.forward(x, t)
            for i, evaluator in enumerate(self.evaluators):
                sums[i].index_add_(0, ids, evaluator.per_sample(scores, y, ids).to(sums.dtype))
        return np.array(sums.tolist())  # the one host sync of the pass

    def _test_data(self, stream: Stream, tasks: Sequence[int] | None = None) -> tuple:
        """The concatenated test sets (of `tasks` only, if given) and their task ids, on the
        device when it holds them."""
        data, ids = stream.test_all, stream.test_task_ids
        if tasks is not None and len(tasks) < stream.n_tasks:
            key = (id(stream), tuple(tasks))
            if self._test_subset is None or self._test_subset[0] != key:  # the same tasks all experience long
                rows = torch.isin(ids, torch.tensor(list(tasks))).nonzero().squeeze(1)
                self._test_subset = (key, data.subset(rows), ids[rows])
            data, ids = self._test_subset[1], self._test_subset[2]
            if self.device.type != "cpu":
                return data, ids.to(self.device)
        if self.device.type == "cpu":
            return data, ids
        if self._test_on_device is None or self._test_on_device[0] != id(stream):
            on = data.to(self.device) if _fits_on_device(data, self.device) else data
            self._test_on_device = (id(stream), on)
        return self._test_on_device[1], ids.to(self.device)

    def _anneal_copy(self) -> dict | None:
        """If the LR owner asks (`anneal_steps`), train that many more steps on the experience's
        data from a copy of the whole run state, keep the weights, and put the run back as it
        was: the next experience continues as if nothing happened. Returns the weights."""
        steps = self.lr_owner.anneal_steps(self.ctx) if self.lr_owner is not None else 0
        data = self._trained_on
        if not steps or data is None or not len(data):
            return None
        start, ctx, saved = time.perf_counter(), self.ctx, copy.deepcopy(self.state_dict())
        self.model.train()
        batches = iter(())
        try:
            for a in range(steps):
                batch = next(batches, None)
                if batch is None:  # as many passes over the data as the anneal needs
                    batches = data.batches(self.batch_size, True, self.data_rng)
                    batch = next(batches)
                ctx.anneal_step = a
                self._train_batch(*batch)
            self._check_unchecked()
            annealed = copy.deepcopy(self.model.state_dict())
        finally:
            ctx.anneal_step = None
            self._load_state(saved)
        self.record.anneal_steps += steps
        self.record.train_time_s += time.perf_counter() - start  # compute spent training, if on a copy
        return annealed

    def _evaluate_row(self, stream: Stream, k: int, experience_index: int, weights: dict | None = None) -> None:
        if weights is not None:  # evaluate the annealed copy, then go back to the run's weights
            live = copy.deepcopy(self.model.state_dict())
            self.model.load_state_dict(weights)
            try:
                values = self.evaluate(stream)
            finally:
                self.model.load_state_dict(live)
        else:
            values = self.evaluate(stream)
        for key, row in values.items():
            self.record.matrices[key][k] = row
        seen = stream.seen_tasks(experience_index)
        metrics = {}
        for key, row in values.items():
            metrics.update({f"{key}_task{j}": float(v) for j, v in enumerate(row)})
            metrics[f"{key}_seen"] = float(row[seen].mean()) if seen else float("nan")
        metrics["train_loss"] = self.record.train_loss[-1]
        for name, history in self.record.loss_terms.items():
            if name != self.record.main_loss:
                metrics[f"train_loss_{name}"] = history[-1]
        metrics["experience_train_time_s"] = self.record.experience_time_s[-1]
        self._emit(metrics, k)

    def _evaluate_periodically(self, stream: Stream, experience_index: int) -> None:
        seen = stream.seen_tasks(experience_index)
        tasks = None
        if self.curve_tasks == "seen_and_next":  # what continual evaluation needs, and no more
            upcoming = stream.seen_tasks(min(experience_index + 1, len(stream) - 1))
            tasks = sorted(set(seen) | set(upcoming))
        values = self.evaluate(stream, tasks)
        point = {"iteration": self.record.iteration, "experience": experience_index}
        metrics = {}
        for key, row in values.items():
            point[key] = row.tolist()
            point[f"{key}_seen"] = float(row[seen].mean()) if seen else float("nan")
            metrics.update({f"curve_{key}_task{j}": float(v) for j, v in enumerate(row)})
            metrics[f"curve_{key}_seen"] = point[f"{key}_seen"]
        self.record.curve.append(point)
        self._emit(metrics, self.record.iteration, kind="curve")

    def _emit(self, metrics: dict[str, float], step: int, kind: str = "evaluation") -> None:
        for sink in self.sinks:
            sink.log_metrics(metrics, step, kind)

    # ---------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        """The run's state at an experience boundary (plain tensors, numbers, lists and dicts)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "strategies": [s.state_dict() for s in self.strategies],
            "rng": {"data": self.data_rng.get_state(), "aug": self.aug_rng.get_state(),
                    "aug_appended": self.aug_appended_rng.get_state(), "aux": self.ctx.aux_generator.get_state(),
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
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
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        self.data_rng.set_state(rng["data"])
        self.aug_rng.set_state(rng["aug"])
        self.aug_appended_rng.set_state(rng["aug_appended"])
        self.ctx.aux_generator.set_state(rng["aux"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        for s, s_state in zip(self.strategies, state["strategies"]):
            s.load_state_dict(s_state)
        if state["record"] is not None:
            self.record.load_state_dict(state["record"])

    def _save_checkpoint(self, in_progress: dict | None = None) -> None:
        from cl.training.checkpoint import check_plain, save_checkpoint

        state = self.state_dict()
        for i, (s, s_state) in enumerate(zip(self.strategies, state["strategies"])):
            check_plain(s_state, f"strategy {i} ({type(s).__name__}) state")
        if in_progress is not None:
            state["in_progress"] = {**in_progress, "start": self._start_state}
        save_checkpoint(self.checkpoint_path, state, self.checkpoint_meta())
