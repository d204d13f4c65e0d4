"""Find components by name: a registry name, a `module:attr` path, or an entry point.

Every pluggable kind (datasets, scenarios, strategies, models) has one
`Registry`. A user plugs their own component without editing the lab, in
one of three ways:

- pass `my_package.my_module:MyStrategy` where a name is expected;
- declare an entry point in their package's metadata under the group
  `cl.<kind>` (for example `cl.strategies`), and use its name;
- call `STRATEGIES.register("name")(MyStrategy)` before building a run.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class UnknownComponentError(LookupError):
    """A name that no registry, path or entry point resolves."""


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return add

    def names(self) -> list[str]:
        return sorted(set(self._items) | {ep.name for ep in self._entry_points()})

    def items(self) -> dict[str, T]:
        return {name: self.get(name) for name in self.names()}

    def _entry_points(self):
        return entry_points(group=f"cl.{self.kind}")

    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
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


DATASETS: Registry = Registry("datasets")
SCENARIOS: Registry = Registry("scenarios")
STRATEGIES: Registry = Registry("strategies")
MODELS: Registry = Registry("models")
