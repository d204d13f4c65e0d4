"""Build the objects of a run from validated config specs."""
from __future__ import annotations

import inspect

import torch

import strategies as _builtin_strategies  # noqa: F401  (registers the built-in strategies)
import streams as _builtin_streams  # noqa: F401  (registers datasets and scenarios)
from cl.config import ComponentSpec, ExperimentConfig
from cl.models import MultiHeadClassifier, build_model
from cl.registry import DATASETS, SCENARIOS, STRATEGIES, import_path
from strategies.base import Strategy
from streams.experience import Stream
from streams.online import blur, online


def _torch_class(module, name: str, kind: str):
    if ":" in name:
        return import_path(name, kind)
    by_lower = {n.lower(): getattr(module, n) for n in dir(module) if isinstance(getattr(module, n), type)}
    if name.lower() not in by_lower:
        raise LookupError(f"unknown {kind} '{name}' (not in {module.__name__}; or give a 'module:Class' path)")
    return by_lower[name.lower()]


def optimizer_class(name: str):
    """A torch.optim class by case-insensitive name ('sgd', 'adamw') or a `module:Class` path."""
    return _torch_class(torch.optim, name, "optimizer")


def scheduler_class(name: str):
    """A torch.optim.lr_scheduler class by case-insensitive name or a `module:Class` path."""
    return _torch_class(torch.optim.lr_scheduler, name, "scheduler")


def build_stream(cfg: ExperimentConfig) -> Stream:
    scenario = SCENARIOS.get(cfg.stream.scenario.name)
    if scenario_takes_data(scenario):
        dataset = DATASETS.get(cfg.stream.dataset.name)(data_dir=cfg.data_dir, **cfg.stream.dataset.args)
        stream = scenario(dataset, seed=cfg.seed, **cfg.stream.scenario.args)
    else:  # a scenario that builds its own datasets (multi_dataset)
        stream = scenario(data_dir=cfg.data_dir, seed=cfg.seed, **cfg.stream.scenario.args)
    if cfg.stream.blurry:
        stream = blur(stream, cfg.stream.blurry, seed=cfg.seed)
    if cfg.stream.online is not None:
        stream = online(stream, cfg.stream.online.experience_size, seed=cfg.seed)
    return stream


def scenario_takes_data(scenario) -> bool:
    """Whether a scenario is a function of one dataset (its first parameter is `data`)."""
    params = list(inspect.signature(scenario).parameters)
    return bool(params) and params[0] == "data"


def build_strategies(specs: list[ComponentSpec]) -> list[Strategy]:
    built = []
    for spec in specs:
        strategy = STRATEGIES.get(spec.name)(**spec.args)
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy '{spec.name}' built a {type(strategy).__name__}, not a strategies.Strategy")
        built.append(strategy)
    return built


def build_model_from(cfg: ExperimentConfig, stream: Stream) -> torch.nn.Module:
    """The configured model; `multihead: true` gives it one head per task of the stream."""
    args = cfg.model.args
    multihead = args.pop("multihead", False)
    model = build_model(cfg.model.name, stream.input_shape, stream.n_classes, **args)
    if multihead:
        model = MultiHeadClassifier(model, stream.task_classes, stream.n_classes)
    return model


def build_optimizer(cfg: ExperimentConfig, model: torch.nn.Module):
    opt = optimizer_class(cfg.training.optimizer.name)(model.parameters(), **cfg.training.optimizer.args)
    sched = None
    if cfg.training.scheduler is not None:
        sched = scheduler_class(cfg.training.scheduler.name)(opt, **cfg.training.scheduler.args)
    return opt, sched
