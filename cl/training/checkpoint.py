"""Checkpoints: a run's state dicts in one torch file, written atomically.

Only state dicts are saved (tensors, numbers, strings, lists, dicts), never
pickled objects, so files load with `weights_only=True` across torch
versions; state that is not plain is refused when it is saved, naming where
it is, rather than found "corrupt" at resume. The resolved configuration and
its hash are saved beside the state, so a resume with a changed
configuration is refused with the keys that differ.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import torch

from cl.config.identity import ConfigChangedError, config_differences, config_hash


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, not one of the lab's, or not for this run."""


FORMAT = "cl-lab-checkpoint/2"
_PLAIN = (torch.Tensor, int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def check_plain(obj, where: str) -> None:
    """Raise CheckpointError if `obj` holds anything `torch.load(weights_only=True)` cannot read back."""
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise CheckpointError(f"{where}: key {k!r} is a {type(k).__name__}; use strings or numbers")
            check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise CheckpointError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which a checkpoint "
                          f"cannot hold (it loads with weights_only=True): keep state as tensors, numbers, "
                          f"strings, lists and dicts")


def save_checkpoint(path: str | os.PathLike, state: dict, meta: dict | None = None) -> Path:
    """Write `state` to `path` via a temporary file of its own and a rename, so a crash never
    leaves half a file; a file at `path` that is not a checkpoint of the lab is refused
    (`check_replaceable`), never replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if str(path.absolute()) not in _WRITTEN:
        check_replaceable(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # a new file, never one there
    os.close(fd)
    try:
        torch.save({"format": FORMAT, "meta": meta or {}, "state": state}, tmp)
        os.replace(tmp, path)
    except BaseException as err:
        cause = None if isinstance(err, KeyboardInterrupt) else write_failure(err, Path(tmp))
        Path(tmp).unlink(missing_ok=True)  # never a half-written .tmp left behind
        if cause is not None:
            raise cause from err  # names the checkpoint (not its .tmp) and the reason
        raise
    _WRITTEN.add(str(path.absolute()))
    return path


def write_failure(err: BaseException, tmp: Path) -> OSError | None:
    """Why writing `tmp` failed, as an OSError naming the checkpoint it was for, or None if it
    was not the file system. torch's writer reports a full disk only as "unexpected pos",
    so the disk and the file-size limit are looked at."""
    path = tmp.with_name(tmp.name[1:].rsplit(".", 2)[0])  # .NAME.XXXX.tmp -> NAME
    if isinstance(err, OSError) and err.errno is not None:
        return OSError(err.errno, err.strerror, str(path))
    if not isinstance(err, RuntimeError):
        return None
    try:
        written, free = tmp.stat().st_size, shutil.disk_usage(tmp.parent).free
    except OSError:
        return None
    if free < max(written // 100, 1 << 16):  # nearly nothing left beside what was written
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    if _at_file_size_limit(written):
        return OSError(errno.EFBIG, os.strerror(errno.EFBIG), str(path))
    return None


def _at_file_size_limit(size: int) -> bool:
    try:
        import resource
    except ImportError:  # Windows
        return False
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return limit != resource.RLIM_INFINITY and size >= limit


#: Checkpoints this process wrote: replacing them needs no second look.
_WRITTEN: set[str] = set()


def is_lab_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a checkpoint the lab wrote (any version of its format); its tensors are
    not read."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return isinstance(blob, dict) and str(blob.get("format", "")).startswith(FORMAT.split("/")[0] + "/")


def check_replaceable(path: str | os.PathLike) -> None:
    """Refuse, naming it, a file at `path` that a checkpoint would replace and that is not a
    checkpoint of the lab (a file the lab did not write is never replaced)."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not (path.is_file() and is_lab_checkpoint(path))):
        raise CheckpointError(f"{path} exists and is not a checkpoint the lab wrote: move it away or give another "
                              f"--checkpoint-dir")


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
        found = blob.get("format") if isinstance(blob, dict) else None
        raise CheckpointError(f"checkpoint {path} was not written by this version of the lab "
                              f"(expected format {FORMAT}, found {found or 'none'})")
    return blob["state"], blob["meta"]


def check_same_config(path: str | os.PathLike, meta: dict, config: dict) -> None:
    """Refuse to resume from a checkpoint written under another configuration."""
    if "config_hash" not in meta:  # an older lab's, or another tool's: its weights may not even fit this model
        raise CheckpointError(f"checkpoint {path} does not record the configuration it was written for, so resuming "
                              f"from it is refused: start afresh without --resume, or move it out of the "
                              f"--checkpoint-dir")
    if meta["config_hash"] == config_hash(config):
        return
    diffs = config_differences(meta.get("config", {}), config)
    raise ConfigChangedError(f"checkpoint {path} was written with a different configuration; changed: "
                          f"{'; '.join(diffs) or '(unknown keys)'}. Resume with the original settings, "
                          f"or start afresh without --resume")


#: What `torch.compile(model)` puts before every key of the wrapped model's state dict.
COMPILED_PREFIX = "_orig_mod."


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module a `torch.compile` wrapper holds (the model itself when it is not wrapped)."""
    return getattr(model, "_orig_mod", model) if isinstance(model, torch.nn.Module) else model


def model_state(source) -> dict:
    """A model's state dict (from a module, or a state dict) with the keys of an uncompiled
    model: checkpoints hold no `_orig_mod.` prefix, so a compiled run's loads into an eager
    model and the other way round. (The trainer compiles in place, which adds no prefix; a
    model the caller compiled with `torch.compile` does.)"""
    state = unwrapped(source).state_dict() if isinstance(source, torch.nn.Module) else source
    if not any(COMPILED_PREFIX in k for k in state):
        return state
    return type(state)((k.replace(COMPILED_PREFIX, ""), v) for k, v in state.items())


def save_run_checkpoint(path: str | os.PathLike, state: dict, strategies, meta: dict) -> Path:
    """A trainer's state, once every strategy's state is checked plain (it must load with
    `weights_only=True`): the strategy whose state is not is named."""
    for i, (s, s_state) in enumerate(zip(strategies, state["strategies"])):
        check_plain(s_state, f"strategy {i} ({type(s).__name__}) state")
    return save_checkpoint(path, state, meta)
