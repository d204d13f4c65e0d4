"""Continual-learning metrics as pure functions of the accuracy matrix.

The accuracy matrix R has T + 1 rows and T columns for a stream of T
experiences: R[0, j] is the accuracy of the untrained model on task j (the
b_j of GEM), R[i, j] the accuracy on task j after training on experience i
(1 <= i <= T). Columns are tasks in stream order (0-based here; the papers
count tasks from 1).
"""
from __future__ import annotations

import numpy as np


def _check(R) -> np.ndarray:
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1] + 1 or R.shape[1] < 1:
        raise ValueError(f"accuracy matrix must have shape (T + 1, T), got {R.shape}")
    return R


def average_accuracy(R) -> float:
    """ACC (Lopez-Paz and Ranzato 2017): mean accuracy over all tasks after the last experience,
    ACC = 1/T sum_j R[T, j]."""
    R = _check(R)
    return float(R[-1].mean())


def average_accuracy_of_row(row) -> float:
    """Mean accuracy over every task's test set in one evaluation (ACC for any stream)."""
    return float(np.mean(np.asarray(row, dtype=float)))


def backward_transfer(R) -> float:
    """BWT (Lopez-Paz and Ranzato 2017): how learning later tasks changed earlier ones,
    BWT = 1/(T-1) sum_{j<T} (R[T, j] - R[j, j]) in 1-based tasks. Negative is forgetting.
    Zero for a single task."""
    R = _check(R)
    T = R.shape[1]
    if T < 2:
        return 0.0
    return float(np.mean([R[T, j] - R[j + 1, j] for j in range(T - 1)]))


def forward_transfer(R) -> float:
    """FWT (Lopez-Paz and Ranzato 2017): accuracy on a task just before learning it,
    against the untrained model, FWT = 1/(T-1) sum_{j>=2} (R[j-1, j] - b_j) in 1-based tasks.
    Zero for a single task."""
    R = _check(R)
    T = R.shape[1]
    if T < 2:
        return 0.0
    return float(np.mean([R[j, j] - R[0, j] for j in range(1, T)]))


def forgetting(R) -> float:
    """Average forgetting (Chaudhry et al. 2018, RWalk): for each task but the last, its best
    accuracy after being learned and before the last experience, minus its final accuracy,
    f_j = max_{l in j..T-1} R[l, j] - R[T, j] (1-based), averaged. Zero for a single task."""
    R = _check(R)
    T = R.shape[1]
    if T < 2:
        return 0.0
    return float(np.mean([R[j + 1:T, j].max() - R[T, j] for j in range(T - 1)]))


def seen_accuracy(R, i: int) -> float:
    """Mean accuracy over the tasks seen after experience i (1 <= i <= T): 1/i sum_{j<i} R[i, j]."""
    R = _check(R)
    if not 1 <= i <= R.shape[1]:
        raise ValueError(f"experience {i} is outside 1..{R.shape[1]}")
    return float(R[i, :i].mean())


def average_incremental_accuracy(R) -> float:
    """Average incremental accuracy (Rebuffi et al. 2017, iCaRL): the mean, over every
    experience, of the accuracy on the tasks seen so far, 1/T sum_i seen_accuracy(R, i)."""
    R = _check(R)
    return float(np.mean([seen_accuracy(R, i) for i in range(1, R.shape[1] + 1)]))


def anytime_accuracy(seen_accuracies) -> float:
    """Anytime average accuracy: the mean accuracy on the tasks seen so far over
    evaluations taken at regular intervals during training, the normalised area
    under the accuracy curve (A_AUC, Koh et al. 2022)."""
    values = np.asarray(seen_accuracies, dtype=float)
    if values.size == 0:
        raise ValueError("anytime accuracy needs at least one periodic evaluation")
    return float(np.nanmean(values))


def summary(R) -> dict[str, float]:
    """Every scalar metric of the matrix, under the keys the lab logs them with."""
    return {
        "acc": average_accuracy(R),
        "bwt": backward_transfer(R),
        "fwt": forward_transfer(R),
        "forgetting": forgetting(R),
        "avg_incremental_acc": average_incremental_accuracy(R),
    }
