"""Evaluators: what one evaluation pass computes on each task's test set.

An evaluator turns a batch of model outputs into one value per sample
(`per_sample`); the trainer sums those per task in one pass over every test
set and divides by the task's size, so every evaluator yields one matrix
(rows: evaluations, columns: tasks). `higher_is_better` tells the metrics
which way is improvement. For sequence outputs (N, L, V) a sample's value is
its mean over positions; all sequences of a stream have the same length, so
the task mean is the mean per token.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


class Evaluator:
    """Base class: `key` names the matrix and its metrics (`acc_task0`, `acc`, `bwt`, ...).

    An evaluator `derived_from` another one's key computes its per-task values from that
    one's (`derive`) instead of per sample, so the pass over the test sets is not repeated."""

    key: str = ""
    higher_is_better: bool = True
    description: str = ""
    derived_from: str | None = None

    def per_sample(self, scores: torch.Tensor, y: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def derive(self, values: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def _per_sample_mean(values: torch.Tensor) -> torch.Tensor:
    return values.float().flatten(1).mean(1) if values.dim() > 1 else values.float()


class Accuracy(Evaluator):
    """Top-1 accuracy over every class the model outputs (class-incremental reading);
    for a language model, next-token accuracy."""

    key, higher_is_better, description = "acc", True, "accuracy"

    def per_sample(self, scores, y, task_ids):
        return _per_sample_mean(scores.argmax(-1) == y)


class TaskAwareAccuracy(Evaluator):
    """Accuracy with the prediction restricted to the classes of the sample's own task
    (the task-incremental reading, van de Ven and Tolias 2019)."""

    key, higher_is_better, description = "task_aware_acc", True, "accuracy among the task's own classes"

    def __init__(self, task_classes: Sequence[Sequence[int]], n_classes: int):
        self.n_classes = n_classes
        self.mask = torch.full((len(task_classes), n_classes), float("-inf"))
        for j, classes in enumerate(task_classes):
            self.mask[j, list(classes)] = 0.0
        self._on: dict[torch.device, torch.Tensor] = {}

    def per_sample(self, scores, y, task_ids):
        if scores.device not in self._on:
            self._on[scores.device] = self.mask.to(scores.device)
        mask = self._on[scores.device][task_ids]
        if scores.dim() > 2:  # one mask per sample, the same at every position
            mask = mask.unsqueeze(1)
        return _per_sample_mean((scores[..., : self.n_classes] + mask).argmax(-1) == y)


class CrossEntropy(Evaluator):
    """Mean cross-entropy of the targets in nats (per token for a language model:
    nats per byte on a byte-level stream); exp of it is the perplexity."""

    key, higher_is_better, description = "loss", False, "validation loss (nats per token)"

    def per_sample(self, scores, y, task_ids):
        if scores.dim() > 2:
            loss = F.cross_entropy(scores.flatten(0, -2), y.flatten(), reduction="none")
            return loss.view(y.shape).mean(1)
        return F.cross_entropy(scores, y, reduction="none")


class LossPerByte(Evaluator):
    """The validation loss in nats per byte of source text: each task's loss per token divided
    by its bytes per token (1 for a byte-level stream; from the shard manifest for a tokenized
    one), so runs with different tokenizers compare (bits per byte = this / ln 2). Every
    sample of a task has the same bytes per token, so the task's mean divides exactly."""

    key, higher_is_better, description = "loss_per_byte", False, "validation loss (nats per byte)"
    derived_from = "loss"

    def __init__(self, bytes_per_token: Sequence[float]):
        self.bytes_per_token = np.asarray(bytes_per_token, dtype=float)

    def derive(self, values: np.ndarray) -> np.ndarray:
        if len(values) != len(self.bytes_per_token):
            raise ValueError(f"loss_per_byte: {len(values)} tasks but bytes per token of "
                             f"{len(self.bytes_per_token)} (the stream's schedule must give one per task)")
        return values / self.bytes_per_token


def perplexity(loss_matrix):
    """Perplexity of each entry of a loss matrix in nats: exp(loss)."""
    import numpy as np

    return np.exp(np.asarray(loss_matrix, dtype=float))


def default_evaluators(task_classes: Sequence[Sequence[int]], n_classes: int, sequence: bool,
                       bytes_per_token: Sequence[float] | None = None) -> list[Evaluator]:
    """What a stream is judged by when the experiment does not say.

    Language models (sequence targets): validation loss first (the primary
    matrix), then next-token accuracy, then the loss per byte where the stream says
    how many bytes its tokens stand for. Classifiers: accuracy, plus task-aware
    accuracy where it differs from it, i.e. where some task does not have
    every class (it means nothing on permuted or rotated streams)."""
    if sequence:
        return [CrossEntropy(), Accuracy()] + ([LossPerByte(bytes_per_token)] if bytes_per_token else [])
    evaluators: list[Evaluator] = [Accuracy()]
    if any(len(set(c)) < n_classes for c in task_classes):
        evaluators.append(TaskAwareAccuracy(task_classes, n_classes))
    return evaluators
