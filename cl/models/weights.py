"""Weights files: where they are looked up, how they are read (safetensors or a torch
state dict), and loading a backbone's weights into a model while keeping its own head."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

DEFAULT_WEIGHTS_DIR = Path.home() / ".cache" / "cl-lab" / "weights"


def weights_root() -> Path:
    """The folder that holds pre-trained weights files: `CL_WEIGHTS_DIR`, else
    ~/.cache/cl-lab/weights. `cl pretrain` writes a relative `output` there, and a relative
    `weights:` not found in the working directory is looked up there, so an experiment file
    names its weights the same way on every machine."""
    env = os.environ.get("CL_WEIGHTS_DIR")
    return Path(env).expanduser() if env else DEFAULT_WEIGHTS_DIR


def resolve_weights(weights: str | os.PathLike, model_name: str = "") -> Path:
    """The weights file `weights` names: an absolute (or ~) path as it is; a relative one in
    the working directory, else in `weights_root()`."""
    path = Path(weights).expanduser()
    if path.is_absolute() or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"weights file for '{model_name}' not found: {path}")
        return path
    in_root = weights_root() / path
    if in_root.is_file():
        return in_root
    raise FileNotFoundError(f"weights file for '{model_name}' not found: {weights} (looked in the working "
                            f"directory {Path.cwd()} and in the weights folder {weights_root()}, set by "
                            f"CL_WEIGHTS_DIR)")


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with the length of its JSON header (8 bytes, little-endian),
    then the header itself; a torch file is a zip (or a pickle)."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a weights file and its metadata (empty for a torch file): a safetensors
    file (what `cl pretrain` writes; safe to read from anyone) or a torch state dict, read
    with `weights_only=True` (possibly under a 'state_dict' or 'model' key)."""
    if _is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as err:  # SafetensorError, or an OSError on a header that lies about sizes
            raise ValueError(f"weights file {path} is not a readable safetensors file "
                             f"(corrupt or truncated?): {err}") from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"weights file {path} is not a readable torch state dict: {err}") from err
    state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {path} holds no state dict of tensors")
    return state, {}


def classifier_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the model's classifier (`get_classifier()`; none for a model
    without timm's API, whose every tensor then has to fit)."""
    if not hasattr(model, "get_classifier"):
        return set()
    head = model.get_classifier()
    prefixes = [f"{name}." for name, m in model.named_modules() if m is head]
    return {k for k in model.state_dict() if any(k.startswith(p) for p in prefixes)}


def load_backbone_weights(model: nn.Module, weights: str | os.PathLike, model_name: str = "") -> Path:
    """Load a weights file into `model`, all but its classifier: the stored one was trained
    for other classes, so the model keeps its fresh head. Every other tensor must be there
    with the model's shape; otherwise a ValueError names the file (and the architecture its
    metadata says it holds). Returns the file's path."""
    path = resolve_weights(weights, model_name)
    state, meta = read_weights(path)
    holds = f" (it holds {meta['architecture']})" if "architecture" in meta else ""
    head = classifier_keys(model)
    state = {k: v for k, v in state.items() if k not in head}
    own = model.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in head and k not in state)
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    for what, keys in (("keys model '%s' lacks" % model_name, unexpected), ("no values for", missing),
                       ("tensors of other shapes than the model's", wrong)):
        if keys:
            raise ValueError(f"weights file {path} does not fit model '{model_name}'{holds}: {what}: {keys[:5]}")
    model.load_state_dict(state, strict=False)
    return path


