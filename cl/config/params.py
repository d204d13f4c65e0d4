"""A resolved config as flat keys, one per leaf: MLflow params (so runs are filtered and
compared key by key, `params.training.optimizer.lr = '0.1'`), and what a checkpoint's
saved config is compared with key by key on resume."""
from __future__ import annotations

from typing import Any


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists -> {'a.b.0.c': value} for MLflow params."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list) and any(isinstance(v, (dict, list)) for v in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = d
    return out


def strategy_arguments(specs: list[dict]) -> list[dict]:
    """Each strategy spec ({"name", **arguments}) with the arguments it did not set filled in
    from its constructor's defaults: what the run really used, so that a run can be
    reproduced from its logged parameters after a default changes."""
    import inspect

    from cl.config.registry import STRATEGIES

    out = []
    for spec in specs:
        cls = STRATEGIES.get(spec["name"])
        defaults = {name: p.default for name, p in inspect.signature(cls).parameters.items()
                    if p.default is not inspect.Parameter.empty
                    and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        out.append({"name": spec["name"], **{k: _plain(v) for k, v in defaults.items()},
                    **{k: v for k, v in spec.items() if k != "name"}})
    return out


def _plain(value):
    """A default as a parameter shows it: tuples as lists, anything not plain data by its repr."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str, list, dict)):
        return value
    return repr(value)
