"""What a run records: one matrix per evaluator, the loss terms, the curves and counters.

Every metric of the lab is computed from a `RunRecord` (`evaluation.summaries`), and
the trainer emits the same records, as they are taken, to `Sink`s.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

DEFAULT_LOSS = "ce"


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
    experience_rows: list[int] = field(default_factory=list)  # rows_trained at each experience's end
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
                "experience_ends": list(self.experience_ends), "experience_rows": list(self.experience_rows)}

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
        self.experience_rows = list(state.get("experience_rows", []))
