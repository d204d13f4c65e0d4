"""The built-in strategies by name: each class registers itself where it is defined.

    @register_strategy("replay")
    class Replay(Strategy): ...

Importing the `strategies` package imports every module in it (subpackages included), so a
module dropped into the folder is registered without editing `__init__`. The lab's registry
(`cl.config.registry.STRATEGIES`) starts from `STRATEGIES` and adds plugins: entry points,
`module:Class` paths and its own `register(name)`. Nothing here imports `cl`.
"""
from __future__ import annotations

from typing import Callable, TypeVar

from strategies.base import Strategy

S = TypeVar("S", bound=type)

#: name -> strategy class, in the order the modules were imported.
STRATEGIES: dict[str, type] = {}


def _same_definition(a: type, b: type) -> bool:
    # A reloaded module defines a new class object of the same name: it replaces the old one.
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def register_strategy(name: str) -> Callable[[S], S]:
    """A class decorator that registers a `Strategy` subclass under `name` and returns it
    unchanged. A name already taken by another class is an error naming both."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"a strategy name is a non-empty string without ':' (that marks a module:Class path), "
                         f"got {name!r}")

    def add(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise TypeError(f"register_strategy('{name}') decorates a strategies.Strategy subclass, got {cls!r}")
        taken = STRATEGIES.get(name)
        if taken is not None and not _same_definition(taken, cls):
            raise ValueError(f"strategy '{name}' is registered twice: by {taken.__module__}.{taken.__qualname__} "
                             f"and by {cls.__module__}.{cls.__qualname__}; give one of them another name")
        STRATEGIES[name] = cls
        return cls

    return add
