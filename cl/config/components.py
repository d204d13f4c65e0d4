"""Build the objects of a run from validated config specs.

Every constructor gets its arguments as `coerce_arguments` converted them
(the same check `cl.config.validation` ran when the file was loaded), so what was
validated is what is used.
"""
from __future__ import annotations

import inspect

import torch

from cl.config.errors import ConfigError
from cl.config.arguments import SCENARIO_INJECTED, coerce_arguments
from cl.config.schema import ComponentSpec, ExperimentConfig
from cl.models import MultiHeadClassifier
from cl.config.models import build_model, pretrained_data_config
from cl.config.registry import (DATASETS, SCENARIOS, STRATEGIES, optimizer_class, plugins_from, scenario_takes_data,
                         scheduler_class)
from strategies.base import Strategy
from streams.experience import BatchTransform, Dataset, Stream
from streams.holdout import first_experiences, validation_split
from streams.online import blur, online


def build_dataset(spec: ComponentSpec | dict, data_dir: str | None, source: str = "experiment",
                  size: int | None = None) -> Dataset:
    """The dataset `spec` names; `size`, where given, is the image size to decode at, for a
    dataset that takes one and whose spec does not name it (`stream.preprocessing: model`)."""
    spec = spec if isinstance(spec, ComponentSpec) else ComponentSpec.model_validate(spec)
    make = DATASETS.get(spec.name)
    args = coerce_arguments(make, spec.args, "stream.dataset", source, {"data_dir"})
    if size is not None and "size" in inspect.signature(make).parameters:
        args.setdefault("size", size)
    return make(data_dir=data_dir, **args)


def build_stream(cfg: ExperimentConfig, source: str = "experiment") -> Stream:
    """The stream of the file, with its own seed (`stream.seed`, default the run's)."""
    with plugins_from(cfg.source_dir):
        return _build_stream(cfg, source)


def _build_stream(cfg: ExperimentConfig, source: str) -> Stream:
    scenario = SCENARIOS.get(cfg.stream.scenario.name)
    args = coerce_arguments(scenario, cfg.stream.scenario.args, "stream.scenario", source, SCENARIO_INJECTED)
    seed = cfg.stream_seed
    expects = None
    if cfg.stream.preprocessing != "dataset":
        try:
            expects = pretrained_data_config(cfg.model.name, cfg.model.args)
        except ValueError as err:
            raise ConfigError(f"{cfg.source_file or source}: {err}") from None
        if cfg.stream.preprocessing == "model_size":
            expects.update(mean=None, std=None)
    if scenario_takes_data(scenario):
        data = build_dataset(cfg.stream.dataset, cfg.data_dir, source, expects and expects["size"])
        stream = scenario(data, seed=seed, **args)
    else:  # a scenario that builds its own datasets (multi_dataset, token_stream, avalanche, core50, ...)
        if "load_dataset" in inspect.signature(scenario).parameters:
            args["load_dataset"] = lambda spec: build_dataset(spec, cfg.data_dir, source)
        if expects and "size" in inspect.signature(scenario).parameters:
            args.setdefault("size", expects["size"])
        stream = scenario(data_dir=cfg.data_dir, seed=seed, **args)
    if expects:
        stream = as_the_model_expects(stream, expects)
    if cfg.stream.first_experiences is not None:
        stream = first_experiences(stream, cfg.stream.first_experiences)
    if cfg.stream.validation is not None:
        stream = validation_split(stream, cfg.stream.validation, seed=seed)
    if cfg.stream.blurry:
        stream = blur(stream, cfg.stream.blurry, seed=seed)
    if cfg.stream.online is not None:
        stream = online(stream, cfg.stream.online.experience_size, seed=seed)
    return stream


def as_the_model_expects(stream: Stream, expects: dict) -> Stream:
    """The stream with the normalisation of the model's pretrained config (or its own, where
    `expects` has no mean: `model_size`), its images brought
    to the model's size on the batch where the dataset did not decode them at that size
    (tensors held in memory, such as CIFAR's 32 x 32: resizing them all up front would hold
    every image at 224 x 224). Augmentation (crop, flip) runs before the resize."""
    import dataclasses

    if len(stream.input_shape) != 3:
        raise ConfigError(f"stream.preprocessing: model applies to images; stream {stream.name} has inputs of "
                          f"shape {list(stream.input_shape)}")
    old = stream.transform
    size = expects["size"]
    own = old.describe()
    mean, std = (expects["mean"], expects["std"]) if expects["mean"] is not None else (own["mean"], own["std"])
    transform = BatchTransform(mean, std, scale=old.scale, crop_padding=old.crop_padding,
                               flip=old.flip, size=size, interpolation=expects["interpolation"])
    channels = stream.input_shape[0] if mean is None else len(mean)
    return dataclasses.replace(stream, transform=transform, input_shape=(channels, size, size))


def build_strategies(specs: list[ComponentSpec], source: str = "experiment") -> list[Strategy]:
    built = []
    for i, spec in enumerate(specs):
        cls = STRATEGIES.get(spec.name)
        strategy = cls(**coerce_arguments(cls, spec.args, f"strategies.{i}", source))
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy '{spec.name}' built a {type(strategy).__name__}, not a strategies.Strategy")
        built.append(strategy)
    return built


def build_model_from(cfg: ExperimentConfig, stream: Stream) -> torch.nn.Module:
    """The configured model; `multihead: true` gives it one head per task of the stream."""
    args = dict(cfg.model.args)
    multihead = args.pop("multihead", False)
    with plugins_from(cfg.source_dir):
        try:
            model = build_model(cfg.model.name, stream.input_shape, stream.n_classes, **args)
        except TypeError as err:  # a timm model given an argument it does not take (not checked at load)
            raise ConfigError(f"{cfg.source_file or 'experiment'}: model: {err}") from None
    if multihead:
        model = MultiHeadClassifier(model, stream.task_classes, stream.n_classes)
    return model


def build_optimizer(cfg: ExperimentConfig, model: torch.nn.Module, source: str = "experiment"):
    """The optimizer over the model's parameters, and a scheduler factory `(optimizer, steps) ->
    scheduler` (None without a scheduler), where `steps` replaces arguments given as 'steps'."""
    with plugins_from(cfg.source_dir):
        opt_cls = optimizer_class(cfg.training.optimizer.name)
        sched_cls = None if cfg.training.scheduler is None else scheduler_class(cfg.training.scheduler.name)
    opt_args = coerce_arguments(opt_cls, cfg.training.optimizer.args, "training.optimizer", source, {"params"})
    optimizer = opt_cls(model.parameters(), **opt_args)
    spec = cfg.training.scheduler
    if spec is None:
        return optimizer, None

    def make_scheduler(opt: torch.optim.Optimizer, steps: int | None = None):
        args = {k: steps if v == "steps" else v for k, v in spec.args.items()}
        return sched_cls(opt, **coerce_arguments(sched_cls, args, "training.scheduler", source, {"optimizer"}))

    return optimizer, make_scheduler
