"""Find components by name: a built-in name, a `module:attr` path, or an entry point.

Every pluggable kind (datasets, scenarios, strategies, models) has one
`Registry`. The lab's own components are listed by the package that holds
them (`streams.DATASETS`, `streams.SCENARIOS`, `strategies.STRATEGIES`,
`cl.models.MODELS`); those packages never import `cl`. A user plugs their own
component without editing the lab, in one of three ways:

- pass `my_package.my_module:MyStrategy` where a name is expected;
- declare an entry point in their package's metadata under the group
  `cl.<kind>` (for example `cl.strategies`), and use its name;
- call `STRATEGIES.register("name")(MyStrategy)` before building a run.
"""
from __future__ import annotations

import importlib
import inspect
from importlib.metadata import entry_points
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class UnknownComponentError(LookupError):
    """A name that no registry, path or entry point resolves."""


class Registry(Generic[T]):
    def __init__(self, kind: str, builtin: Callable[[], dict[str, T]]):
        self.kind = kind
        self._builtin = builtin  # imported on first use, so listing one kind loads only that
        self._extra: dict[str, T] = {}

    @property
    def _items(self) -> dict[str, T]:
        return {**self._builtin(), **self._extra}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if self._items.get(name, obj) is not obj:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._extra[name] = obj
            return obj

        return add

    def names(self) -> list[str]:
        return sorted(set(self._items) | {ep.name for ep in self._entry_points()})

    def items(self) -> dict[str, T]:
        return {name: self.get(name) for name in self.names()}

    def _entry_points(self):
        return entry_points(group=f"cl.{self.kind}")

    def get(self, name: str) -> T:
        items = self._items
        if name in items:
            return items[name]
        if ":" in name:
            return import_path(name, self.kind)
        for ep in self._entry_points():
            if ep.name == name:
                return ep.load()
        raise UnknownComponentError(
            f"unknown {self.kind} '{name}'; known: {', '.join(self.names())}; "
            f"or give a 'package.module:Name' path"
        )

    def __contains__(self, name: str) -> bool:
        return name in self._items or any(ep.name == name for ep in self._entry_points())


def import_path(path: str, kind: str):
    """The object a `module:attr` path names (attr may be dotted)."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UnknownComponentError(f"{kind} '{path}': cannot import module '{module_name}' ({err})") from err
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UnknownComponentError(f"{kind} '{path}': module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj


def _streams(name: str):
    def load():
        import streams

        return getattr(streams, name)

    return load


def _strategies():
    import strategies

    return strategies.STRATEGIES


def _models():
    from cl import models

    return models.MODELS


DATASETS: Registry = Registry("datasets", _streams("DATASETS"))
SCENARIOS: Registry = Registry("scenarios", _streams("SCENARIOS"))
STRATEGIES: Registry = Registry("strategies", _strategies)
MODELS: Registry = Registry("models", _models)


# ------------------------------------------------------- torch components
def _torch_class(module, name: str, kind: str):
    if ":" in name:
        return import_path(name, kind)
    by_lower = {n.lower(): getattr(module, n) for n in dir(module) if isinstance(getattr(module, n), type)}
    if name.lower() not in by_lower:
        raise LookupError(f"unknown {kind} '{name}' (not in {module.__name__}; or give a 'module:Class' path)")
    return by_lower[name.lower()]


def optimizer_class(name: str):
    """A torch.optim class by case-insensitive name ('sgd', 'adamw') or a `module:Class` path."""
    import torch.optim

    return _torch_class(torch.optim, name, "optimizer")


def scheduler_class(name: str):
    """A torch.optim.lr_scheduler class by case-insensitive name or a `module:Class` path."""
    import torch.optim.lr_scheduler

    return _torch_class(torch.optim.lr_scheduler, name, "scheduler")


def scenario_takes_data(scenario) -> bool:
    """Whether a scenario is a function of one dataset (its first parameter is `data`)."""
    params = list(inspect.signature(scenario).parameters)
    return bool(params) and params[0] == "data"
