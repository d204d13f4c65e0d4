"""Evaluation: evaluators that score each task's test set, metrics as pure functions of the
recorded matrices, and reports of them (tables, CSV/JSON, heatmaps)."""
from evaluation.evaluators import Accuracy, CrossEntropy, Evaluator, TaskAwareAccuracy, default_evaluators
from evaluation.metrics import (
    applicable_metrics,
    average_accuracy,
    average_incremental_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    metric_names,
    seen_accuracy,
    summary,
)

__all__ = [
    "Accuracy", "CrossEntropy", "Evaluator", "TaskAwareAccuracy", "applicable_metrics", "average_accuracy",
    "average_incremental_accuracy", "backward_transfer", "default_evaluators", "forgetting",
    "forward_transfer", "metric_names", "seen_accuracy", "summary",
]
