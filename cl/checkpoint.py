"""Checkpoints: a run's state dicts in one torch file, written atomically.

Only state dicts are saved (tensors, numbers, lists, dicts), never pickled
objects, so files load with `weights_only=True` across torch versions.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or not one of the lab's."""


FORMAT = "cl-lab-checkpoint/1"


def save_checkpoint(path: str | os.PathLike, state: dict, meta: dict | None = None) -> Path:
    """Write `state` to `path` via a temporary file and a rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, "meta": meta or {}, "state": state}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """Return (state, meta) from a file written by `save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file: {type(err).__name__}: {err}") from err
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} was not written by this lab (expected format {FORMAT})")
    return blob["state"], blob["meta"]
