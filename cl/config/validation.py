"""Every component an experiment names, resolved and its arguments checked, before any
data is loaded: a typo in a strategy's argument fails in a second, not after an epoch."""
from __future__ import annotations

from cl.config.arguments import MODEL_INJECTED, SCENARIO_INJECTED, coerce_arguments
from cl.config.errors import ConfigError
from cl.config.registry import (DATASETS, MODELS, SCENARIOS, STRATEGIES, ForbiddenComponentError,
                                UnknownComponentError, optimizer_class, plugins_from, scenario_takes_data,
                                scheduler_class)
from cl.config.schema import ComponentSpec, ExperimentConfig


def validate_components(cfg: ExperimentConfig, source: str) -> None:
    """Resolve every component name and check its arguments, before any data is loaded."""
    with plugins_from(cfg.source_dir):
        _check_stream(cfg, source)
        _check_model(cfg, source)
        _check_strategies(cfg, source)
        _check_training(cfg, source)


def _resolve(registry, spec: ComponentSpec, where: str, source: str):
    try:
        return registry.get(spec.name)
    except (UnknownComponentError, ForbiddenComponentError) as err:
        raise ConfigError(f"{source}: {where}.name: {err}") from None


def _check_stream(cfg: ExperimentConfig, source: str) -> None:
    scenario = _resolve(SCENARIOS, cfg.stream.scenario, "stream.scenario", source)
    coerce_arguments(scenario, cfg.stream.scenario.args, "stream.scenario", source, SCENARIO_INJECTED)
    if scenario_takes_data(scenario):
        if cfg.stream.dataset is None:
            raise ConfigError(f"{source}: stream.dataset: required key is missing "
                              f"(scenario '{cfg.stream.scenario.name}' splits one dataset)")
        coerce_arguments(_resolve(DATASETS, cfg.stream.dataset, "stream.dataset", source), cfg.stream.dataset.args,
                         "stream.dataset", source, {"data_dir"})
    elif cfg.stream.dataset is not None:
        raise ConfigError(f"{source}: stream.dataset: scenario '{cfg.stream.scenario.name}' takes its datasets "
                          f"as its own argument; remove stream.dataset")


def _check_model(cfg: ExperimentConfig, source: str) -> None:
    # Imported when a file is checked, not with this module: cl.config.models imports torch.
    from cl.config.models import lab_loads_weights

    # `weights` is a file the lab loads into the built model (cl.models.load_backbone_weights),
    # unless the model's class takes a `weights` argument itself. A timm name is checked by timm, when built.
    if cfg.model.name in MODELS or ":" in cfg.model.name:
        cls = _resolve(MODELS, cfg.model, "model", source)
        lab_args = {"multihead"} | ({"weights"} if lab_loads_weights(cfg.model.name) else set())
        args = {k: v for k, v in cfg.model.args.items() if k not in lab_args}
        coerce_arguments(cls, args, "model", source, MODEL_INJECTED)
    weights = cfg.model.args.get("weights")
    if weights is not None and not isinstance(weights, str) and lab_loads_weights(cfg.model.name):
        raise ConfigError(f"{source}: model.weights: expected the path of a weights file, got {weights!r}")


def _check_strategies(cfg: ExperimentConfig, source: str) -> None:
    for label, specs in cfg.run_specs().items():
        for i, spec in enumerate(specs):
            where = f"runs.{label}.{i}" if cfg.runs is not None else f"strategies.{i}"
            coerce_arguments(_resolve(STRATEGIES, spec, where, source), spec.args, where, source)


def _check_training(cfg: ExperimentConfig, source: str) -> None:
    try:
        coerce_arguments(optimizer_class(cfg.training.optimizer.name), cfg.training.optimizer.args,
                         "training.optimizer", source, {"params"})
        if cfg.training.scheduler is not None:
            # 'steps' is filled in per experience; check the rest with a stand-in number.
            args = {k: 1 if v == "steps" else v for k, v in cfg.training.scheduler.args.items()}
            coerce_arguments(scheduler_class(cfg.training.scheduler.name), args, "training.scheduler", source,
                             {"optimizer"})
    except LookupError as err:
        raise ConfigError(f"{source}: training: {err}") from None

