"""A run's scalar metrics, computed from what it recorded: every evaluator's matrix, the
periodic evaluations (the curve) and where each experience ended.

`record` is anything with `matrices`, `higher_is_better`, `curve` and `experience_ends`
(the trainer's `RunRecord`); `stream` gives the facts the metrics depend on.
"""
from __future__ import annotations

import math

from evaluation import continual, metrics
from evaluation.evaluators import perplexity


def summarise(record, stream, learned_ahead: bool = False) -> dict[str, float | None]:
    """The scalar metrics of every matrix the run recorded, each where the stream supports it
    (`evaluation.metrics.applicable_metrics`; `learned_ahead`: the run trained on later tasks
    early, as Joint does): final score, BWT, FWT, forgetting, average incremental score, and
    anytime accuracy when the run evaluated periodically. A loss matrix also gives the
    perplexity of its final row."""
    seen = stream.seen_at_rows
    applicable = metrics.applicable_metrics(stream.rows_follow_tasks, seen, class_incremental=stream.class_incremental,
                                            learned_ahead=learned_ahead)
    out: dict[str, float | None] = {}
    for key, matrix in record.matrices.items():
        out.update(metrics.summary(matrix, key, record.higher_is_better[key], seen, applicable))
    if "loss" in record.matrices:
        out["perplexity"] = float(perplexity(record.matrices["loss"][-1].mean()))
        # Each domain's own, at the end (its loss per token, the matrix's last row, is logged per row).
        out.update({f"perplexity_task{j}": float(v) for j, v in enumerate(perplexity(record.matrices["loss"][-1]))})
    if "loss_per_byte" in record.matrices:
        out["bits_per_byte"] = float(record.matrices["loss_per_byte"][-1].mean() / math.log(2))
    if record.curve and "acc_seen" in record.curve[0]:
        out["anytime_acc"] = metrics.anytime_accuracy([p["acc_seen"] for p in record.curve])
    for key, curve in continual_curves(record, stream).items():
        out.update(continual.continual_summary(*curve, key=key, higher_is_better=record.higher_is_better[key]))
    return out


def continual_curves(record, stream) -> dict[str, tuple]:
    """Per score, the curve continual evaluation reads (iterations, values, experience ends):
    the periodic evaluations plus the rows taken at each experience's end. Only where the run
    evaluated periodically and each experience trains its own task."""
    if not record.curve or not stream.one_experience_per_task or len(record.experience_ends) != len(stream):
        return {}
    out = {}
    for key, matrix in record.matrices.items():
        points = [(p["iteration"], p[key]) for p in record.curve]
        points += [(end, matrix[k + 1].tolist()) for k, end in enumerate(record.experience_ends)]
        points.sort(key=lambda p: p[0])  # stable: at an experience's end the row comes last
        out[key] = ([p[0] for p in points], [p[1] for p in points], list(record.experience_ends))
    return out


def scalar_metrics(result: dict) -> dict[str, float]:
    """A run's final scalar metrics (what its summary logs to MLflow), without the None ones."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k not in ("seed", "iterations", "threads", "rows_trained", "anneal_steps", "wall_time_s",
                          "tracking_time_s", "tracking_setup_s", "comparison_time_s", "fit_start_unix")}


def comparison_entry(result: dict) -> dict:
    """A finished run's result as `evaluation.compare` takes it."""
    return {"strategy": result["name"], "seed": result["seed"], "metrics": scalar_metrics(result),
            "matrices": result.get("matrices", {}), "curve": result.get("seen_curve"),
            "experience_ends": result.get("experience_ends")}
