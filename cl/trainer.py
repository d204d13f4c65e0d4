"""The lifelong trainer: owns the loop over experiences, epochs and batches.

It asks strategies (see `strategies.base.Strategy` for the hooks), records the
accuracy matrix, and emits per-experience records to tracking sinks. It knows
nothing about configs, MLflow or the CLI.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from strategies.base import Strategy, overrides
from streams.experience import Stream, TensorData

HOOKS = ("before_experience", "training_data", "adapt_batch", "extra_loss", "after_backward", "after_step",
         "after_experience", "predict")
BOUNDARY_HOOKS = ("before_experience", "training_data", "after_experience")


class Sink(Protocol):
    """Where the trainer sends records; must not block the training path for long."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


@dataclass
class RunRecord:
    """What a run produced, from which every metric is computed.

    `accuracy_matrix[k]` is the accuracy on every task's test set at the k-th
    evaluation point (row 0: the untrained model); `task_aware_matrix` the
    same with predictions restricted to each test set's own classes (the
    task-incremental reading). `curve` holds the periodic evaluations taken
    every `eval_every` iterations, if asked for.
    """

    accuracy_matrix: np.ndarray
    task_aware_matrix: np.ndarray
    train_loss: list[float] = field(default_factory=list)
    train_time_s: float = 0.0
    experience_time_s: list[float] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)
    iteration: int = 0

    @property
    def completed(self) -> int:
        return len(self.train_loss)


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


class LifelongTrainer:
    """Trains one model through a stream of experiences.

    For each experience: strategy hooks, `epochs` passes over the (possibly
    strategy-replaced) training data in shuffled batches of `batch_size`, then
    evaluation on every task's test set, seen or not. The untrained model is
    evaluated once first (row 0 of the accuracy matrix).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, strategies: Sequence[Strategy],
                 *, epochs: int = 1, batch_size: int = 32, eval_batch_size: int = 1024,
                 device: str | torch.device = "cpu", seed: int = 0,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, scheduler_interval: str = "epoch",
                 sinks: Sequence[Sink] = (), progress: bool = False, checkpoint_path: str | None = None,
                 eval_every: int | None = None):
        if epochs < 1 or batch_size < 1 or eval_batch_size < 1 or (eval_every is not None and eval_every < 1):
            raise ValueError("epochs, batch_size, eval_batch_size and eval_every must be positive")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got '{scheduler_interval}'")
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scheduler_interval = scheduler_interval
        self.strategies = list(strategies)
        self.epochs, self.batch_size, self.eval_batch_size = epochs, batch_size, eval_batch_size
        self.seed = seed
        self.sinks = list(sinks)
        self.progress = progress
        self.checkpoint_path = checkpoint_path
        self.eval_every = eval_every
        # Called when a checkpoint is written; its dict is saved beside the state.
        self.checkpoint_meta: Callable[[], dict] = dict
        # Separate generators for data order and augmentation, so adding a strategy
        # that samples does not change which batches the others see.
        self.data_rng = torch.Generator().manual_seed(seed)
        self.aug_rng = torch.Generator().manual_seed(seed + 1)
        # Task-free strategies never see experience boundaries.
        self.hooks = {h: [s for s in self.strategies if overrides(s, h) and not (s.task_free and h in BOUNDARY_HOOKS)]
                      for h in HOOKS}
        # Multi-head models take each sample's task label.
        self.model_takes_tasks = getattr(model, "uses_task_labels", False)
        self.record: RunRecord | None = None
        self._pending_state: dict | None = None

    # ------------------------------------------------------------------ run
    def fit(self, stream: Stream, stop_after: int | None = None) -> RunRecord:
        """Train through `stream` (from where a loaded checkpoint left off) and return the record.

        `stop_after=k` stops once k experiences are done, as an interrupted run would.
        """
        if self.record is None:
            self._start(stream)
        rows = {exp: k + 1 for k, exp in enumerate(stream.eval_after)}
        for experience in stream.experiences[self.record.completed:]:
            if stop_after is not None and self.record.completed >= stop_after:
                break
            self._train_experience(stream, experience)
            if experience.index in rows:
                k = rows[experience.index]
                acc, aware = self.evaluate(stream)
                self.record.accuracy_matrix[k], self.record.task_aware_matrix[k] = acc, aware
                self._emit_evaluation(k, acc, aware, stream.seen_tasks(experience.index))
                if self.checkpoint_path:
                    from cl.checkpoint import save_checkpoint

                    save_checkpoint(self.checkpoint_path, self.state_dict(), self.checkpoint_meta())
        return self.record

    def _start(self, stream: Stream) -> None:
        shape = (len(stream.eval_after) + 1, stream.n_tasks)
        for i, s in enumerate(self.strategies):
            s.setup(stream, self.device, self.seed * 1000 + 17 * (i + 1))
        self.record = RunRecord(np.full(shape, np.nan), np.full(shape, np.nan))
        if self._pending_state is not None:
            self._load_pending()
            return
        acc, aware = self.evaluate(stream)
        self.record.accuracy_matrix[0], self.record.task_aware_matrix[0] = acc, aware
        self._emit({f"acc_task{j}": float(v) for j, v in enumerate(acc)}, 0)

    def _train_experience(self, stream: Stream, experience) -> None:
        model, opt, device = self.model, self.optimizer, self.device
        transform = stream.transform
        hooks = self.hooks
        start = time.perf_counter()
        for s in hooks["before_experience"]:
            s.before_experience(experience, model)
        data: TensorData = experience.train
        for s in hooks["training_data"]:
            replaced = s.training_data(experience, stream, data)
            data = data if replaced is None else replaced
        model.train()
        n = len(data)
        steps_per_epoch = -(-n // self.batch_size)
        bar = tqdm(total=steps_per_epoch * self.epochs, disable=not self.progress, leave=False, file=sys.stderr,
                   desc=f"experience {experience.index + 1}/{len(stream)}", mininterval=0.5)
        losses: list[torch.Tensor] = []
        eval_s = 0.0  # periodic evaluations inside the loop are not training time
        for _ in range(self.epochs):
            for x_in, y_in, t_in in data.batches(self.batch_size, shuffle=True, generator=self.data_rng):
                x, y, t = x_in, y_in, t_in
                for s in hooks["adapt_batch"]:
                    x, y, t = s.adapt_batch(x, y, t)
                x = transform(x.to(device, non_blocking=True), train=True, generator=self.aug_rng)
                y = y.to(device, non_blocking=True)
                logits = model(x, t.to(device)) if self.model_takes_tasks else model(x)
                loss = classification_loss(logits, y)
                for s in hooks["extra_loss"]:
                    extra = s.extra_loss(model, x, y, t, logits)
                    if extra is not None:
                        loss = loss + extra
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for s in hooks["after_backward"]:
                    s.after_backward(model)
                opt.step()
                if self.scheduler is not None and self.scheduler_interval == "step":
                    self.scheduler.step()
                for s in hooks["after_step"]:
                    s.after_step(model, x_in, y_in, t_in)
                # Kept on the device: reading it every step would synchronise a GPU.
                losses.append(loss.detach())
                if self.progress:
                    bar.update()
                self.record.iteration += 1
                if self.eval_every and self.record.iteration % self.eval_every == 0:
                    eval_start = time.perf_counter()
                    self._evaluate_periodically(stream, experience.index)
                    model.train()
                    eval_s += time.perf_counter() - eval_start
            if self.scheduler is not None and self.scheduler_interval == "epoch":
                self.scheduler.step()
        bar.close()
        for s in hooks["after_experience"]:
            s.after_experience(experience, model, data)
        elapsed = time.perf_counter() - start - eval_s
        self.record.train_time_s += elapsed
        self.record.experience_time_s.append(elapsed)
        # The mean over batches of the (adapted) batch loss.
        self.record.train_loss.append(torch.stack(losses).mean().item() if losses else float("nan"))

    # ------------------------------------------------------------ evaluate
    @torch.no_grad()
    def predict(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Class scores for a preprocessed batch: the first strategy that predicts, else the model."""
        for s in self.hooks["predict"]:
            scores = s.predict(self.model, x)
            if scores is not None:
                return scores
        return self.model(x, t) if self.model_takes_tasks else self.model(x)

    @torch.no_grad()
    def evaluate(self, stream: Stream) -> tuple[np.ndarray, np.ndarray]:
        """Accuracy on each task's test set of `stream`, in [0, 1]: over all classes
        (class-incremental), and over the test set's own classes (task-aware)."""
        transform = stream.transform
        was_training = self.model.training
        self.model.eval()
        accs, aware = [], []
        for data, classes in zip(stream.test_sets, stream.task_classes):
            mask = torch.full((stream.n_classes,), float("-inf"), device=self.device)
            mask[torch.tensor(classes, device=self.device)] = 0.0
            correct = torch.zeros((), dtype=torch.long, device=self.device)
            correct_aware = torch.zeros((), dtype=torch.long, device=self.device)
            for x, y, t in data.batches(self.eval_batch_size, shuffle=False):
                x, y = transform(x.to(self.device)), y.to(self.device)
                scores = self.predict(x, t.to(self.device))
                # [..., :n] and argmax(-1) serve both one label per sample and one per token.
                correct += (scores.argmax(-1) == y).sum()
                correct_aware += ((scores[..., : stream.n_classes] + mask).argmax(-1) == y).sum()
            n = max(data.y.numel(), 1)
            accs.append(correct.item() / n)
            aware.append(correct_aware.item() / n)
        self.model.train(was_training)
        return np.array(accs), np.array(aware)

    def _evaluate_periodically(self, stream: Stream, experience_index: int) -> None:
        acc, _ = self.evaluate(stream)
        seen = stream.seen_tasks(experience_index)
        point = {"iteration": self.record.iteration, "experience": experience_index, "acc": acc.tolist(),
                 "acc_seen": float(acc[seen].mean()) if seen else float("nan")}
        self.record.curve.append(point)
        metrics = {f"curve_acc_task{j}": float(v) for j, v in enumerate(acc)}
        metrics["curve_acc_seen"] = point["acc_seen"]
        self._emit(metrics, self.record.iteration)

    # ------------------------------------------------------------- records
    def _emit(self, metrics: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log_metrics(metrics, step)

    def _emit_evaluation(self, k: int, acc: np.ndarray, aware: np.ndarray, seen: list[int]) -> None:
        metrics = {f"acc_task{j}": float(v) for j, v in enumerate(acc)}
        metrics["acc_seen"] = float(acc[seen].mean()) if seen else float("nan")
        metrics["task_aware_acc_seen"] = float(aware[seen].mean()) if seen else float("nan")
        metrics["train_loss"] = self.record.train_loss[-1]
        metrics["experience_train_time_s"] = self.record.experience_time_s[-1]
        self._emit(metrics, k)

    # ---------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        rec = self.record
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "strategies": [s.state_dict() for s in self.strategies],
            "rng": {"data": self.data_rng.get_state(), "aug": self.aug_rng.get_state(),
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "record": None if rec is None else {
                "accuracy_matrix": torch.from_numpy(rec.accuracy_matrix.copy()),
                "task_aware_matrix": torch.from_numpy(rec.task_aware_matrix.copy()),
                "train_loss": list(rec.train_loss), "train_time_s": rec.train_time_s,
                "experience_time_s": list(rec.experience_time_s), "curve": list(rec.curve),
                "iteration": rec.iteration},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint; strategies are restored when `fit` sets them up for the stream."""
        if len(state["strategies"]) != len(self.strategies):
            raise ValueError(f"checkpoint has {len(state['strategies'])} strategies, this run has "
                             f"{len(self.strategies)}: it was saved by a different experiment")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.data_rng.set_state(state["rng"]["data"])
        self.aug_rng.set_state(state["rng"]["aug"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self._pending_state = state
        self.record = None

    def _load_pending(self) -> None:
        state, self._pending_state = self._pending_state, None
        for s, s_state in zip(self.strategies, state["strategies"]):
            s.load_state_dict(s_state)
        rec = state["record"]
        if rec is not None:
            matrix = rec["accuracy_matrix"].numpy()
            if matrix.shape != self.record.accuracy_matrix.shape:
                raise ValueError(f"checkpoint's accuracy matrix has shape {matrix.shape}, this stream needs "
                                 f"{self.record.accuracy_matrix.shape}")
            self.record.accuracy_matrix[:] = matrix
            self.record.task_aware_matrix[:] = rec["task_aware_matrix"].numpy()
            self.record.curve = list(rec["curve"])
            self.record.iteration = int(rec["iteration"])
            self.record.train_loss = list(rec["train_loss"])
            self.record.train_time_s = float(rec["train_time_s"])
            self.record.experience_time_s = list(rec["experience_time_s"])
