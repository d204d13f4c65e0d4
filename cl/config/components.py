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
from cl.config.models import build_model
from cl.config.registry import (DATASETS, SCENARIOS, STRATEGIES, optimizer_class, plugins_from, scenario_takes_data,
                         scheduler_class)
from strategies.base import Strategy
from streams.experience import Dataset, Stream
from streams.holdout import first_experiences, validation_split
from streams.online import blur, online


def build_dataset(spec: ComponentSpec | dict, data_dir: str | None, source: str = "experiment") -> Dataset:
    spec = spec if isinstance(spec, ComponentSpec) else ComponentSpec.model_validate(spec)
    make = DATASETS.get(spec.name)
    return make(data_dir=data_dir, **coerce_arguments(make, spec.args, "stream.dataset", source, {"data_dir"}))


def build_stream(cfg: ExperimentConfig, source: str = "experiment") -> Stream:
    """The stream of the file, with its own seed (`stream.seed`, default the run's)."""
    with plugins_from(cfg.source_dir):
        return _build_stream(cfg, source)


def _build_stream(cfg: ExperimentConfig, source: str) -> Stream:
    scenario = SCENARIOS.get(cfg.stream.scenario.name)
    args = coerce_arguments(scenario, cfg.stream.scenario.args, "stream.scenario", source, SCENARIO_INJECTED)
    seed = cfg.stream_seed
    if scenario_takes_data(scenario):
        stream = scenario(build_dataset(cfg.stream.dataset, cfg.data_dir, source), seed=seed, **args)
    else:  # a scenario that builds its own datasets (multi_dataset, token_stream, avalanche)
        if "load_dataset" in inspect.signature(scenario).parameters:
            args["load_dataset"] = lambda spec: build_dataset(spec, cfg.data_dir, source)
        stream = scenario(data_dir=cfg.data_dir, seed=seed, **args)
    if cfg.stream.first_experiences is not None:
        stream = first_experiences(stream, cfg.stream.first_experiences)
    if cfg.stream.validation is not None:
        stream = validation_split(stream, cfg.stream.validation, seed=seed)
    if cfg.stream.blurry:
        stream = blur(stream, cfg.stream.blurry, seed=seed)
    if cfg.stream.online is not None:
        stream = online(stream, cfg.stream.online.experience_size, seed=seed)
    return stream


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
