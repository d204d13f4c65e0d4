"""Where training stands inside an experience, and how long it has trained there: what a
checkpoint taken mid-experience saves and a resume starts from."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm import tqdm


@dataclass
class Position:
    """The epoch and its next batch, the data-order generator's state at the epoch's start
    (a resume replays the epoch's shuffle, then skips `batch` batches), the steps taken and
    the running sum of every named loss term. A restored position also carries the run's
    state at the experience's start (`start`) and at the checkpoint (`current`)."""

    epoch: int = 0
    batch: int = 0
    epoch_rng: torch.Tensor | None = None
    steps: int = 0  # steps taken, not counting those skipped for a non-finite loss
    loss_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    elapsed: float = 0.0  # training seconds spent before the checkpoint
    start: dict | None = None
    current: dict | None = None

    def count(self, losses: dict[str, torch.Tensor] | None, rows: int, record, nonfinite: str) -> None:
        """A step's outcome: its loss terms (None: skipped for a non-finite loss)."""
        if losses is not None:
            for name, value in losses.items():
                if name in self.loss_sums:
                    self.loss_sums[name].add_(value.detach())  # in place: no new tensor per step
                else:
                    self.loss_sums[name] = value.detach().clone()
            self.steps += 1
            record.rows_trained += rows
        elif nonfinite == "skip":
            record.skipped_steps += 1

    def loss_means(self) -> dict[str, float]:
        """Each term's mean over the experience's steps, with one host sync for all of them."""
        names = list(self.loss_sums)
        if not names or not self.steps:
            return {}
        return dict(zip(names, torch.stack([self.loss_sums[k] for k in names]).div(self.steps).tolist()))

    def saved(self, elapsed: float) -> dict:
        """The checkpoint's `in_progress` entry (plain numbers; the run state is saved beside it)."""
        return {"epoch": self.epoch, "batch": self.batch, "epoch_rng": self.epoch_rng, "steps": self.steps,
                "loss_sums": {k: float(v) for k, v in self.loss_sums.items()}, "elapsed": elapsed}

    @classmethod
    def restored(cls, progress: dict, current: dict, device: torch.device) -> "Position":
        return cls(epoch=progress["epoch"], batch=progress["batch"], epoch_rng=progress["epoch_rng"],
                   steps=progress["steps"], elapsed=progress["elapsed"], start=progress["start"], current=current,
                   loss_sums={k: torch.tensor(v, device=device) for k, v in progress["loss_sums"].items()})


class TrainingClock:
    """Seconds an experience has trained: since it started (or resumed, plus `before`),
    less the evaluations taken inside the loop."""

    def __init__(self, before: float = 0.0):
        self.started, self.before, self.excluded = time.perf_counter(), before, 0.0

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.started - self.excluded

    @contextmanager
    def paused(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t


def progress_bar(show: bool, stream, experience, data, total: int, givers: list[str], done: int = 0,
                 prefix: str = ""):
    """The experience's progress bar on standard error (drawn only with `show` and data to
    train on), after `prefix` (where the invocation stands: run k of n, time left); an
    experience with nothing to train says so and why instead."""
    where = f"{prefix}experience {experience.index + 1}/{len(stream)}"
    if show and not len(data):  # e.g. Joint after its first experience: say so, draw no bar
        tqdm.write(f"{where}: nothing to train ({', '.join(givers) or 'the stream'}"
                   f" gave no training data here); evaluation only", file=sys.stderr)
    return tqdm(total=total, initial=done, disable=not show or not len(data), leave=False, file=sys.stderr,
                mininterval=0.5, desc=where)
