"""Continual-learning metrics as pure functions of a recorded matrix.

A matrix R has one column per task and one row per evaluation: R[0, j] is the
untrained model on task j (the b_j of GEM), R[k, j] the score on task j at
the k-th evaluation. In the classic setting there are T + 1 rows for T
tasks and row i comes after training on task i (1 <= i <= T); columns are
tasks in stream order (0-based here; the papers count tasks from 1).

Scores are accuracies by default. For a score where lower is better (a
validation loss) pass `higher_is_better=False`: transfer then keeps its
meaning, positive BWT/FWT is improvement and positive forgetting is a loss
of quality (for a loss: how far it rose above its best).

Which metrics a stream supports is decided here too (`applicable_metrics`),
from how its rows relate to its tasks, not by the runner.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

TRANSFER_METRICS = ("bwt", "fwt", "forgetting")


def _check(R) -> np.ndarray:
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1] + 1 or R.shape[1] < 1:
        raise ValueError(f"matrix must have shape (T + 1, T), got {R.shape}")
    return R


def _sign(higher_is_better: bool) -> float:
    return 1.0 if higher_is_better else -1.0


def average_accuracy(R) -> float:
    """ACC (Lopez-Paz and Ranzato 2017): mean score over all tasks after the last experience,
    ACC = 1/T sum_j R[T, j]."""
    R = _check(R)
    return float(R[-1].mean())


def average_accuracy_of_row(row) -> float:
    """Mean score over every task's test set in one evaluation (ACC for any stream)."""
    return float(np.mean(np.asarray(row, dtype=float)))


def backward_transfer(R, higher_is_better: bool = True) -> float:
    """BWT (Lopez-Paz and Ranzato 2017): how learning later tasks changed earlier ones,
    BWT = 1/(T-1) sum_{j<T} (R[T, j] - R[j, j]) in 1-based tasks, negated for a score
    where lower is better. Negative is forgetting. Zero for a single task."""
    R = _check(R)
    T = R.shape[1]
    if T < 2:
        return 0.0
    return _sign(higher_is_better) * float(np.mean([R[T, j] - R[j + 1, j] for j in range(T - 1)]))


def forward_transfer(R, higher_is_better: bool = True) -> float:
    """FWT (Lopez-Paz and Ranzato 2017): a task's score just before learning it, against
    the untrained model, FWT = 1/(T-1) sum_{j>=2} (R[j-1, j] - b_j) in 1-based tasks,
    negated for a score where lower is better. Zero for a single task."""
    R = _check(R)
    T = R.shape[1]
    if T < 2:
        return 0.0
    return _sign(higher_is_better) * float(np.mean([R[j, j] - R[0, j] for j in range(1, T)]))


def forgetting(R, higher_is_better: bool = True) -> float:
    """Average forgetting (Chaudhry et al. 2018, RWalk): for each task but the last, its best
    score after being learned and before the last experience, minus its final score,
    f_j = max_{l in j..T-1} R[l, j] - R[T, j] (1-based), averaged. For a score where lower
    is better, the best is the minimum and f_j = R[T, j] - min_l R[l, j]. Zero for one task."""
    R = _check(R)
    T = R.shape[1]
    if T < 2:
        return 0.0
    best = np.max if higher_is_better else np.min
    return _sign(higher_is_better) * float(np.mean([best(R[j + 1:T, j]) - R[T, j] for j in range(T - 1)]))


def seen_accuracy(R, i: int) -> float:
    """Mean score over the tasks seen after experience i (1 <= i <= T): 1/i sum_{j<i} R[i, j]."""
    R = _check(R)
    if not 1 <= i <= R.shape[1]:
        raise ValueError(f"experience {i} is outside 1..{R.shape[1]}")
    return float(R[i, :i].mean())


def average_incremental_accuracy(R, seen_at_rows: Sequence[Sequence[int]] | None = None) -> float:
    """Average incremental accuracy (Rebuffi et al. 2017, iCaRL): the mean, over every
    evaluation after the first experience, of the mean score on the tasks seen by then.
    `seen_at_rows[k-1]` lists the tasks seen at row k; by default row i has seen tasks
    0..i-1, the classic setting, where this is 1/T sum_i seen_accuracy(R, i)."""
    R = np.asarray(R, dtype=float)
    if seen_at_rows is None:
        R = _check(R)
        seen_at_rows = [list(range(i)) for i in range(1, R.shape[0])]
    if len(seen_at_rows) != R.shape[0] - 1:
        raise ValueError(f"{len(seen_at_rows)} seen-task lists for {R.shape[0] - 1} evaluation rows")
    values = [R[k, list(seen)].mean() for k, seen in enumerate(seen_at_rows, start=1) if len(seen)]
    return float(np.mean(values)) if values else float("nan")


def anytime_accuracy(seen_accuracies) -> float:
    """Anytime average accuracy: the mean accuracy on the tasks seen so far over
    evaluations taken at regular intervals during training, the normalised area
    under the accuracy curve (A_AUC, Koh et al. 2022)."""
    values = np.asarray(seen_accuracies, dtype=float)
    if values.size == 0:
        raise ValueError("anytime accuracy needs at least one periodic evaluation")
    return float(np.nanmean(values))


def applicable_metrics(rows_follow_tasks: bool, seen_at_rows: Sequence[Sequence[int]], *,
                       class_incremental: bool = False, learned_ahead: bool = False) -> set[str]:
    """Which of BWT, FWT and forgetting mean something for a stream.

    All three compare a task's score at the row where it was learned with
    other rows, so rows must follow tasks: row k comes right after task k-1
    was trained (one experience per task, or an online stream evaluated at
    the end of each task). FWT also needs every task j >= 1 unseen before its
    own turn (`seen_at_rows[j-1]`, the tasks seen at row j, must not hold j):
    a blurry stream whose first experience holds part of the last task fails
    that. A power-law environment, whose rows are phases, gets none of them.

    FWT is left out in two more cases, where it is a number that says nothing
    about the strategy. `class_incremental` (a task brings classes no earlier
    task had, and no task label tells the model which): before its turn a
    task's classes were never a training target, so every strategy scores about
    0 on them and FWT is minus the random model's score, the same for all.
    `learned_ahead` (the run trained on later tasks before their turn, as Joint
    does): there is no score "before its own training" to measure."""
    if not rows_follow_tasks:
        return set()
    out = {"bwt", "forgetting"}
    unseen_before = all(j not in seen_at_rows[j - 1] for j in range(1, len(seen_at_rows)))
    if unseen_before and not class_incremental and not learned_ahead:
        out.add("fwt")
    return out


def metric_names(key: str) -> dict[str, str]:
    """Logged names of a score's metrics. Accuracy keeps the lab's historical names
    (acc, bwt, fwt, forgetting, avg_incremental_acc); any other score `k` gets
    k, k_bwt, k_fwt, k_forgetting, k_avg_incremental."""
    if key == "acc":
        return {"final": "acc", "bwt": "bwt", "fwt": "fwt", "forgetting": "forgetting",
                "avg_incremental": "avg_incremental_acc"}
    return {"final": key, "bwt": f"{key}_bwt", "fwt": f"{key}_fwt", "forgetting": f"{key}_forgetting",
            "avg_incremental": f"{key}_avg_incremental"}


def summary(R, key: str = "acc", higher_is_better: bool = True, seen_at_rows=None,
            applicable: set[str] | None = None) -> dict[str, float | None]:
    """Every scalar metric of a matrix under the names it is logged with (`metric_names`).

    The final score is the mean of the last row, for any stream. BWT, FWT and
    forgetting are computed where `applicable` (default: all, which needs the
    classic (T + 1, T) shape) and None elsewhere."""
    R = np.asarray(R, dtype=float)
    if applicable is None:
        applicable = set(TRANSFER_METRICS)
    names = metric_names(key)
    out: dict[str, float | None] = {names["final"]: average_accuracy_of_row(R[-1])}
    functions = {"bwt": backward_transfer, "fwt": forward_transfer, "forgetting": forgetting}
    for name in TRANSFER_METRICS:
        out[names[name]] = functions[name](R, higher_is_better) if name in applicable else None
    out[names["avg_incremental"]] = average_incremental_accuracy(R, seen_at_rows)
    return out
