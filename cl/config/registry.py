"""Find components by name: a built-in name, a `module:attr` path, or an entry point.

Every pluggable kind (datasets, scenarios, strategies, models) has one
`Registry`. The lab's own components are listed by the package that holds
them (`streams.DATASETS`, `streams.SCENARIOS`, `strategies.STRATEGIES`,
`cl.models.MODELS`); those packages never import `cl`. A built-in strategy
registers itself where it is defined, with `@register_strategy("name")`
(`strategies/registry.py`), so `strategies.STRATEGIES` is filled by importing
the `strategies` package, and that is what `STRATEGIES` here starts from.
A user plugs their own component without editing the lab, in one of three ways:

- pass `my_package.my_module:MyStrategy` where a name is expected;
- declare an entry point in their package's metadata under the group
  `cl.<kind>` (for example `cl.strategies`), and use its name;
- call `STRATEGIES.register("name")(MyStrategy)` before building a run.

A `module:attr` in an experiment file must be what its slot expects (`SLOTS`):
a class of the expected base for strategies, models, optimizers and
schedulers; a function from the user's plugin code (a module beside the
experiment file, or a package that registers through the lab's entry points)
for datasets, scenarios and factories. Anything else, a standard-library
function that runs a shell command say, is refused before it is called. "Beside"
means under the file's folder and not where Python or a package manager put it (the
standard library, site-packages, a virtual environment), though those may lie there
too; a plugin slot's module in such a place is refused before it is even imported.
Plugin modules are looked up beside the experiment file first
(`plugins_from`), then on the installed path.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import inspect
import re
import site
import sys
import sysconfig
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class UnknownComponentError(LookupError):
    """A name that no registry, path or entry point resolves."""


class ForbiddenComponentError(LookupError):
    """A `module:attr` that resolves to something its slot does not accept."""


LAB_PACKAGES = frozenset({"cl", "streams", "strategies", "evaluation"})
_plugin_dir: contextvars.ContextVar[Path | None] = contextvars.ContextVar("plugin_dir", default=None)


@contextlib.contextmanager
def plugins_from(directory: str | Path | None):
    """Look plugin modules up in `directory` (an experiment file's folder) first, and accept
    functions defined there as the user's own plugin code."""
    token = _plugin_dir.set(None if directory is None else Path(directory).resolve())
    try:
        yield
    finally:
        _plugin_dir.reset(token)


def _entry_point_packages() -> set[str]:
    """Top-level packages of the components registered through the lab's entry points."""
    out = set()
    for group in ("cl.strategies", "cl.models", "cl.datasets", "cl.scenarios"):
        out |= {ep.value.split(":")[0].split(".")[0] for ep in entry_points(group=group)}
    return out


def is_plugin_code(obj, extra_modules: tuple[str, ...] = ()) -> bool:
    """Whether `obj` is defined in the lab, in a module beside the experiment file, in a package
    that registers through the lab's entry points, or in one of `extra_modules` (prefixes)."""
    module = getattr(obj, "__module__", None) or ""
    if _trusted_name(module, extra_modules):
        return True
    return _beside_experiment(getattr(sys.modules.get(module), "__file__", None))


def _trusted_name(module: str, extra_modules: tuple[str, ...] = ()) -> bool:
    """The lab's packages, the entry-point packages, and `extra_modules`: trusted by name."""
    top = module.split(".")[0]
    if top in LAB_PACKAGES or top in _entry_point_packages():
        return True
    return any(module == m or module.startswith(m + ".") for m in extra_modules)


def _beside_experiment(file: str | None) -> bool:
    """Whether `file` is code the user put beside the experiment file: under its folder, and not
    Python's own or installed there by a package manager (standard library, site-packages, a
    virtual environment), which may well lie under that folder too (a project's `.venv`, or a
    home folder that holds Python)."""
    directory = _plugin_dir.get()
    if directory is None or file is None:
        return False
    path = Path(file).resolve()  # a symlink counts where it points
    if not path.is_relative_to(directory):
        return False
    if any(part in ("site-packages", "dist-packages") for part in path.parts):
        return False
    if any(path.is_relative_to(folder) for folder in _python_folders(directory)):
        return False
    # A virtual environment below the experiment's folder is installed code, whatever its name
    # (the folder that holds the experiment may itself be one: its own files are the user's).
    return not any((folder / "pyvenv.cfg").is_file() for folder in path.parents
                   if folder != directory and folder.is_relative_to(directory))


def _python_folders(directory: Path) -> list[Path]:
    """Where Python and installed packages live. A prefix is broad (a Python built with
    `--prefix=$HOME` has the home folder as its prefix; a project may be its own venv), so it
    counts only when it lies below the experiment's folder; the library folders count always."""
    paths = sysconfig.get_paths()
    libraries = [paths.get(key) for key in ("stdlib", "platstdlib", "purelib", "platlib")]
    libraries += site.getsitepackages() + [site.getusersitepackages()]
    prefixes = _resolved([sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix])
    return _resolved(libraries) + [p for p in prefixes if p != directory and p.is_relative_to(directory)]


def _resolved(folders) -> list[Path]:
    return [Path(f).resolve() for f in folders if f]


def _refuse_before_import(module_name: str, extra_modules: tuple[str, ...]) -> str | None:
    """Why a plugin slot's module must not even be imported (importing runs its code), or None.
    Its top-level package is found without running it; the object itself is checked again
    once imported."""
    top = module_name.split(".")[0]
    if _trusted_name(module_name, extra_modules) or any(m.split(".")[0] == top for m in extra_modules):
        return None
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None  # the import itself says what is wrong
    if spec is None:
        return None
    # A module's file (a package's __init__.py), or the folders of a namespace package.
    places = [spec.origin] if spec.has_location else list(spec.submodule_search_locations or [])
    outside = [place for place in places if not _beside_experiment(place)]
    if not outside:
        return None
    return f"module '{top}' is not a module beside the experiment file ({outside[0]})"


def _subclass_of(base_path: str):
    def check(obj) -> bool:
        module, _, name = base_path.rpartition(".")
        base = getattr(importlib.import_module(module), name)
        return inspect.isclass(obj) and issubclass(obj, base)

    return check


_PLUGIN = ("a function or class from your plugin code (a module beside the experiment file, "
           "or a package that registers through the lab's entry points)")
#: slot -> (what it accepts, in words; the check)
SLOTS: dict[str, tuple[str, Callable]] = {
    "strategies": ("a strategies.Strategy subclass", _subclass_of("strategies.base.Strategy")),
    "models": ("a torch.nn.Module subclass", _subclass_of("torch.nn.Module")),
    "optimizer": ("a torch.optim.Optimizer subclass", _subclass_of("torch.optim.Optimizer")),
    "scheduler": ("a torch.optim.lr_scheduler.LRScheduler subclass",
                  _subclass_of("torch.optim.lr_scheduler.LRScheduler")),
    "datasets": (_PLUGIN, lambda obj: callable(obj) and is_plugin_code(obj)),
    "scenarios": (_PLUGIN, lambda obj: callable(obj) and is_plugin_code(obj)),
    "factory": (_PLUGIN, lambda obj: callable(obj) and is_plugin_code(obj)),
}


def _describe(obj) -> str:
    kind = "class" if inspect.isclass(obj) else "function" if callable(obj) else type(obj).__name__
    return f"a {kind} from {getattr(obj, '__module__', None) or 'an unknown module'}"


def _qualified(obj) -> str:
    return f"{getattr(obj, '__module__', None) or '?'}.{getattr(obj, '__qualname__', None) or repr(obj)}"


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
            taken = self._items.get(name, obj)
            if taken is not obj:
                raise ValueError(f"{self.kind} '{name}' is registered twice: by {_qualified(taken)} and by "
                                 f"{_qualified(obj)}; give one of them another name")
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
            return import_path(name, self.kind, slot=self.kind)
        for ep in self._entry_points():
            if ep.name == name:
                return ep.load()
        raise UnknownComponentError(
            f"unknown {self.kind} '{name}'; known: {', '.join(self.names())}; "
            f"or give a 'package.module:Name' path"
        )

    def __contains__(self, name: str) -> bool:
        return name in self._items or any(ep.name == name for ep in self._entry_points())


_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def import_path(path: str, kind: str, slot: str | None = None, extra_modules: tuple[str, ...] = ()):
    """The object a `module:attr` path names (attr may be dotted), imported with the plugin
    directory first on the path; with `slot`, refused unless it is what that slot accepts
    (`SLOTS`; `extra_modules` are module prefixes a plugin slot also accepts)."""
    module_name, _, attr = path.partition(":")
    # A module is named, never located: `../x`, `/tmp/x` or `.x` would reach past the plugin folder.
    if not _DOTTED.fullmatch(module_name) or not _DOTTED.fullmatch(attr):
        raise UnknownComponentError(f"{kind} '{path}': expected 'package.module:Name' (Python names separated by "
                                    f"dots; a module is found beside the experiment file or installed, not by a path)")
    directory = _plugin_dir.get()
    added = directory is not None and str(directory) not in sys.path
    if added:
        sys.path.insert(0, str(directory))
    try:
        if slot is not None and SLOTS[slot][0] == _PLUGIN and (why := _refuse_before_import(module_name, extra_modules)):
            also = f" or a function from {', '.join(extra_modules)}" if extra_modules else ""
            raise ForbiddenComponentError(f"{kind} '{path}': {why}; this slot accepts {SLOTS[slot][0]}{also}")
        module = importlib.import_module(module_name)
    except ImportError as err:
        where = f" (looked beside the experiment file, in {directory}, then on the installed path)" if directory else ""
        raise UnknownComponentError(f"{kind} '{path}': cannot import module '{module_name}'{where}: {err}") from err
    finally:
        if added:
            sys.path.remove(str(directory))
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UnknownComponentError(f"{kind} '{path}': module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if slot is not None:
        accepts, check = SLOTS[slot]
        allowed = check(obj) or (bool(extra_modules) and callable(obj) and is_plugin_code(obj, extra_modules))
        if not allowed:
            also = f" or a function from {', '.join(extra_modules)}" if extra_modules else ""
            raise ForbiddenComponentError(f"{kind} '{path}' is {_describe(obj)}; this slot accepts {accepts}{also}")
    return obj


def _streams(name: str):
    def load():
        import streams

        return getattr(streams, name)

    return load


def _strategies():
    import strategies  # imports every strategy module: each registers itself (strategies.registry)

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
        return import_path(name, kind, slot=kind)
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
