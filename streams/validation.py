"""Checks on user data where it is loaded: every failure is a `DataError` whose one-line
message names the file (or factory) and the rows or keys at fault, so a bad label or a
NaN pixel is found before training rather than as a puzzling score after it."""
from __future__ import annotations

import numpy as np
import torch


class DataError(ValueError):
    """The data exist but are not usable; the message says what is wrong and where."""


def _rows(mask: np.ndarray, limit: int = 5) -> str:
    rows = np.flatnonzero(mask)
    shown = ", ".join(map(str, rows[:limit].tolist()))
    return f"{len(rows)} row{'s' if len(rows) > 1 else ''} ({shown}{', ...' if len(rows) > limit else ''})"


def labels(y, where: str, key: str = "labels") -> torch.Tensor:
    """Class labels as int64: whole, non-negative numbers (0..K-1). Floats that are whole
    numbers are accepted; 1.5, NaN or -1 are not (truncating them would mislabel samples)."""
    y = np.asarray(y.numpy() if isinstance(y, torch.Tensor) else y)
    if y.ndim != 1:
        raise DataError(f"{where}: {key} must be one label per row, got shape {y.shape}")
    if y.dtype == bool or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise DataError(f"{where}: {key} must be integers 0..K-1, got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating):
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(y) | (y != np.floor(y))
        if bad.any():
            raise DataError(f"{where}: {key} must be whole numbers 0..K-1; {_rows(bad)} are not "
                            f"(e.g. {y[bad][0]!r})")
    negative = y < 0
    if negative.any():
        raise DataError(f"{where}: {key} must be 0..K-1; {_rows(negative)} are negative (e.g. {y[negative][0]!r})")
    return torch.from_numpy(y.astype(np.int64))


def finite_inputs(x: torch.Tensor, where: str, key: str = "inputs") -> None:
    """Floating-point inputs hold no NaN or infinity (integer images cannot)."""
    if not torch.is_floating_point(x) or len(x) == 0:
        return
    bad = ~torch.isfinite(x.reshape(len(x), -1)).all(1)
    if bool(bad.any()):
        raise DataError(f"{where}: {key} hold NaN or infinite values in {_rows(bad.numpy())}")


def same_rows(x, y, where: str, x_key: str, y_key: str) -> None:
    if len(x) != len(y):
        raise DataError(f"{where}: {x_key} has {len(x)} rows but {y_key} has {len(y)}")


def same_input_shape(train_x, test_x, where: str, train_key: str = "train inputs",
                     test_key: str = "test inputs") -> None:
    if tuple(train_x.shape[1:]) != tuple(test_x.shape[1:]):
        raise DataError(f"{where}: {train_key} have shape {tuple(train_x.shape[1:])} per row but {test_key} "
                        f"{tuple(test_x.shape[1:])}")
