"""A component's arguments, from an experiment file, checked against its constructor.

The signature is the specification: an unknown key, a wrong type or an unresolvable
`module:attr` for a callable argument is a ConfigError naming the file, the key and
what was expected. The values come back converted to the annotated types, so what
was validated is what the component is built with (`cl.config.components`).
"""
from __future__ import annotations

import collections.abc
import inspect
import typing
from typing import Any, Callable

from pydantic import ConfigDict, ValidationError, create_model

from cl.config.errors import ConfigError
from cl.config.registry import ForbiddenComponentError, UnknownComponentError, import_path

#: Arguments the lab passes to a scenario, a model itself; a file may not set them.
SCENARIO_INJECTED = frozenset({"data", "seed", "data_dir", "load_dataset"})
MODEL_INJECTED = frozenset({"input_shape", "n_classes", "num_classes"})


def coerce_arguments(target: Callable, args: dict, where: str, source: str,
                     injected: set[str] = frozenset()) -> dict[str, Any]:
    """Check `args` against `target`'s signature and return them converted to the annotated
    types (YAML's `1e-3` string becomes the float an optimizer needs). Unknown names, wrong
    types and unresolvable `module:attr` values for callable arguments are ConfigErrors that
    name the file, the key and what was expected."""
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return dict(args)
    params = {n: p for n, p in sig.parameters.items()
              if n not in injected and n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    unknown = [k for k in args if k not in params and k != "name"]
    if unknown and not takes_any:
        expected = ", ".join(params) or "no arguments"
        raise ConfigError(f"{source}: {where}.{unknown[0]}: unknown key (expected one of: {expected})")
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # unresolvable annotations: check names only
        hints = {}
    out = {k: v for k, v in args.items() if k != "name"}
    fields = {}
    for n, p in params.items():
        if n not in out:
            continue
        hint = hints.get(n, Any)
        if _is_callable_hint(hint) and isinstance(out[n], str):
            out[n] = _import_callable(target, n, out[n], where, source)
        default = ... if p.default is p.empty else p.default
        fields[n] = (hint, default)
    if not fields:
        return out
    out.update(_validated(fields, out, where, source))
    return out


def _is_callable_hint(hint) -> bool:
    """Whether an annotation asks for a callable (`Callable`, `Callable[...]`, `X | Callable`)."""
    if hint is typing.Callable or hint is collections.abc.Callable:
        return True
    origin = typing.get_origin(hint)
    if origin is collections.abc.Callable:
        return True
    return any(_is_callable_hint(a) for a in typing.get_args(hint)) if origin is not None else False


def _import_callable(target: Callable, name: str, path: str, where: str, source: str) -> Callable:
    """The function a callable argument's `package.module:function` path names, checked by the registry."""
    if ":" not in path:
        raise ConfigError(f"{source}: {where}.{name}: expected a 'package.module:function' path, got {path!r}")
    # A scenario may accept functions of another library for an argument (avalanche's benchmarks).
    extra = getattr(target, "trusted_callables", {}).get(name, ())
    try:
        return import_path(path, f"{where}.{name}", slot="factory", extra_modules=extra)
    except (UnknownComponentError, ForbiddenComponentError) as err:
        raise ConfigError(f"{source}: {where}.{name}: {err}") from None


def _validated(fields: dict[str, tuple], values: dict, where: str, source: str) -> dict[str, Any]:
    """`values` of the named `fields` (name -> (annotation, default)), converted by pydantic."""
    model = create_model("Args", __config__=ConfigDict(arbitrary_types_allowed=True), **fields)
    try:
        checked = model.model_validate({k: values[k] for k in fields})
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(str(p) for p in e["loc"])
        raise ConfigError(f"{source}: {where}.{key}: {e['msg']} (got {e.get('input')!r})") from None
    return {k: getattr(checked, k) for k in fields}
