"""Build a model from its name in an experiment file: a lab model from the registry, a
`module:Class` path, or a timm model name; `weights: FILE` loads a local weights file
into any of them (all but the classifier)."""
from __future__ import annotations

import inspect
from typing import Sequence

from torch import nn

from cl.config.registry import MODELS
from cl.models.weights import load_backbone_weights


def lab_loads_weights(name: str) -> bool:
    """Whether a model's `weights` argument is a file the lab loads (`load_backbone_weights`):
    for timm names and the lab's models, not for a class that takes `weights` itself."""
    if name in MODELS or ":" in name:
        return "weights" not in inspect.signature(MODELS.get(name)).parameters
    return True


def create_timm_model(name: str, n_classes: int, input_shape: Sequence[int], pretrained: bool = False,
                      weights: str | None = None, **kwargs) -> nn.Module:
    """A timm model with a fresh `n_classes` head. `pretrained=True` takes timm's
    hub weights (needs internet); `weights` loads a local file instead (a safetensors
    file as `cl pretrain` writes, or a torch state dict, e.g. downloaded once elsewhere),
    ignoring its classifier (`load_backbone_weights`)."""
    import timm

    if name not in timm.list_models() and name not in timm.list_pretrained():
        raise ValueError(f"model '{name}' is neither a lab model ({', '.join(MODELS.names())}) nor a timm model")
    kwargs.setdefault("in_chans", input_shape[0])
    model = timm.create_model(name, pretrained=pretrained and weights is None, num_classes=n_classes, **kwargs)
    if weights is not None:
        load_backbone_weights(model, weights, name)
    return model


def pretrained_data_config(name: str, model_args: dict) -> dict:
    """The input a pre-trained timm model expects, from its pretrained config (timm's
    `pretrained_cfg` for `name`, tag included, e.g. `vit_base_patch16_224.augreg_in21k`):
    `size` (the model's `img_size` argument where the experiment gives one), `mean`, `std`
    and `interpolation`. Read without building the model or fetching its weights."""
    from timm.models import get_pretrained_cfg

    config = get_pretrained_cfg(name) if name not in MODELS and ":" not in name else None
    if config is None or not config.mean or not config.input_size:
        raise ValueError(f"stream.preprocessing: model needs a timm model with a pretrained config; '{name}' has "
                         f"none (give the dataset's size and normalisation instead)")
    size = model_args.get("img_size") or config.input_size[-1]
    if not isinstance(size, int):
        raise ValueError(f"stream.preprocessing: model: img_size {size!r} is not one square size")
    interpolation = config.interpolation if config.interpolation in ("bilinear", "bicubic") else "bilinear"
    return {"size": size, "mean": list(config.mean), "std": list(config.std), "interpolation": interpolation}


def build_model(name: str, input_shape: Sequence[int], n_classes: int, **kwargs) -> nn.Module:
    """A lab model by registry name, a `module:Class` path, or a timm model name.

    `input_shape` and `n_classes` are passed to a model whose constructor takes
    them (under those names or timm's `num_classes`). `weights: FILE` loads a weights
    file into any of them, all but the classifier (`load_backbone_weights`)."""
    if name in MODELS or ":" in name:
        cls = MODELS.get(name)
        params = inspect.signature(cls).parameters
        # A lab model (or a class path) takes `weights` like a timm model, unless its class has its own.
        weights = kwargs.pop("weights", None) if lab_loads_weights(name) else None
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        extra = {}
        for key, value in (("input_shape", tuple(input_shape)), ("n_classes", n_classes), ("num_classes", n_classes)):
            if key in params or (accepts_any and key != "num_classes"):
                extra[key] = value
        model = cls(**extra, **kwargs)
        if weights is not None:
            load_backbone_weights(model, weights, name)
        return model
    return create_timm_model(name, n_classes, input_shape, **kwargs)
