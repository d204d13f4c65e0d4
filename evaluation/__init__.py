"""Metrics computed from recorded accuracy matrices, and reports of them."""
from evaluation.metrics import (
    average_accuracy,
    average_incremental_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    seen_accuracy,
    summary,
)

__all__ = [
    "average_accuracy", "average_incremental_accuracy", "backward_transfer", "forgetting",
    "forward_transfer", "seen_accuracy", "summary",
]
