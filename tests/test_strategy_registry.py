"""Strategies register where they are defined (`@register_strategy`), and the lab's registry
finds them, plus plugins by entry point, `module:Class` path or `register(name)`."""
import importlib
import inspect
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest

import strategies
from cl.config import registry as lab
from strategies import ERACE, Replay, Strategy
from strategies.registry import STRATEGIES, register_strategy

ROOT = Path(strategies.__file__).resolve().parent
#: Classes other strategies derive from, never run on their own (as are `_private` ones).
BASES = {"strategies.base.Strategy", "strategies.schedules.LRSchedule", "strategies.prompting.base.PromptStrategy"}
#: The names experiment files use; renaming one breaks them.
NAMES_IN_USE = {
    "naive", "cumulative", "joint", "replay", "der", "derpp", "er_ace", "gdumb", "gem", "agem", "ewc", "online_ewc",
    "si", "mas", "l2", "lwf", "icarl", "nearest_mean", "slca", "l2p", "dualprompt", "coda_prompt", "apg", "ovor",
    "power_law_rehearsal", "momentum_weights", "mixed_replay", "constant_lr", "warmup_decay", "rewarm", "wsd",
    "infinite_lr",
}


@pytest.fixture
def registry():
    """The strategies' registry, put back as it was after the test."""
    before = dict(STRATEGIES)
    yield STRATEGIES
    STRATEGIES.clear()
    STRATEGIES.update(before)


def package_modules() -> list[str]:
    """Every module of the strategies package, found from its files (not by the package's own discovery)."""
    names = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def strategy_classes() -> dict[str, type]:
    """Every Strategy subclass defined in the package, by qualified name."""
    found = {}
    for module_name in package_modules():
        module = importlib.import_module(module_name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module_name and issubclass(cls, Strategy):
                found[f"{module_name}.{cls.__qualname__}"] = cls
    return found


def test_the_walk_covers_the_subpackages():
    assert "strategies.prompting.l2p" in package_modules()
    assert "strategies.prompting.ovor.OVOR" in strategy_classes()


def test_every_strategy_class_is_registered_under_exactly_one_name():
    names_of = defaultdict(list)
    for name, cls in STRATEGIES.items():
        names_of[cls].append(name)
    runnable = {q: c for q, c in strategy_classes().items() if q not in BASES and not c.__name__.startswith("_")}
    unregistered = sorted(q for q, c in runnable.items() if not names_of[c])
    several = sorted(f"{q}: {names_of[c]}" for q, c in runnable.items() if len(names_of[c]) > 1)
    assert not unregistered, f"add @register_strategy(name) above: {unregistered}"
    assert not several, several
    assert set(STRATEGIES.values()) == set(runnable.values())  # nothing from outside the package, no base


def test_the_names_experiments_use_are_kept():
    assert NAMES_IN_USE <= set(STRATEGIES)
    assert STRATEGIES["er_ace"] is ERACE and STRATEGIES["replay"] is Replay
    assert strategies.STRATEGIES is STRATEGIES  # the package exports the registry itself


def test_a_name_taken_by_another_class_is_refused(registry):
    @register_strategy("registry_test_dup")
    class First(Strategy):
        pass

    with pytest.raises(ValueError, match=r"'registry_test_dup' is registered twice: by .*First and by .*Second"):
        @register_strategy("registry_test_dup")
        class Second(Strategy):
            pass

    assert registry["registry_test_dup"] is First
    assert register_strategy("registry_test_dup")(First) is First  # the same class again is no clash
    with pytest.raises(ValueError, match="'replay' is registered twice"):
        register_strategy("replay")(First)
    assert registry["replay"] is Replay


def test_the_decorator_returns_the_class_unchanged_and_refuses_what_is_no_strategy(registry):
    class Mine(Strategy):
        """Mine."""

    before = dict(vars(Mine))
    assert register_strategy("registry_test_mine")(Mine) is Mine
    assert dict(vars(Mine)) == before
    with pytest.raises(TypeError, match="Strategy subclass"):
        register_strategy("registry_test_not")(dict)
    with pytest.raises(ValueError, match="without ':'"):
        register_strategy("pkg.mod:Mine")


PLUGIN = '''
from strategies import Strategy, register_strategy


@register_strategy("{name}")
class {cls}(Strategy):
    """A strategy registered by its own module."""

    def __init__(self, strength: float = 1.0):
        self.strength = strength
'''


def test_a_new_module_with_a_decorated_strategy_is_registered_on_import(registry, tmp_path, monkeypatch):
    package = tmp_path / "registry_test_plugins"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "anchors.py").write_text(PLUGIN.format(name="registry_test_anchor", cls="Anchor"))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("registry_test_plugins", "registry_test_plugins.anchors"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert "registry_test_anchor" not in registry
    module = importlib.import_module("registry_test_plugins.anchors")
    assert registry["registry_test_anchor"] is module.Anchor
    # The lab's registry reads the same dict: the plugin is listed, found by name and built.
    assert "registry_test_anchor" in lab.STRATEGIES.names()
    assert lab.STRATEGIES.get("registry_test_anchor") is module.Anchor
    monkeypatch.delitem(sys.modules, "registry_test_plugins.anchors")
    monkeypatch.delitem(sys.modules, "registry_test_plugins")


def test_a_module_dropped_into_the_package_is_found_without_editing_init(registry, tmp_path, monkeypatch):
    # The package's folder is shared; the dropped module lives in a second folder of the package's path.
    (tmp_path / "registry_test_dropped.py").write_text(PLUGIN.format(name="registry_test_dropped", cls="Dropped"))
    monkeypatch.setattr(strategies, "__path__", [*strategies.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "strategies.registry_test_dropped", raising=False)
    strategies._import_every_module()
    dropped = sys.modules["strategies.registry_test_dropped"]
    assert registry["registry_test_dropped"] is dropped.Dropped
    monkeypatch.delitem(sys.modules, "strategies.registry_test_dropped")


def test_the_lab_registry_returns_the_decorated_classes():
    for name, cls in STRATEGIES.items():
        assert lab.STRATEGIES.get(name) is cls
        assert name in lab.STRATEGIES
    assert lab.STRATEGIES.get("er_ace") is ERACE
    assert set(STRATEGIES) <= set(lab.STRATEGIES.names())


def test_a_module_class_path_still_resolves():
    assert lab.STRATEGIES.get("strategies.er_ace:ERACE") is ERACE
    with pytest.raises(lab.ForbiddenComponentError, match="strategies.Strategy subclass"):
        lab.STRATEGIES.get("strategies.buffers:ReservoirBuffer")


def test_register_on_the_lab_registry_still_works(monkeypatch):
    monkeypatch.setattr(lab.STRATEGIES, "_extra", {})

    class Mine(Strategy):
        pass

    assert lab.STRATEGIES.register("registry_test_lab")(Mine) is Mine
    assert lab.STRATEGIES.get("registry_test_lab") is Mine and "registry_test_lab" in lab.STRATEGIES.names()
    assert "registry_test_lab" not in STRATEGIES  # a plugin, not a built-in
    with pytest.raises(ValueError, match=r"'replay' is registered twice: by strategies\.replay\.Replay and by .*Mine"):
        lab.STRATEGIES.register("replay")(Mine)


def test_an_entry_point_still_resolves(registry, tmp_path, monkeypatch):
    # An installed distribution, as pip leaves it: its metadata names the entry point.
    (tmp_path / "registry_test_ep.py").write_text(PLUGIN.format(name="registry_test_ep_self", cls="FromEntryPoint"))
    info = tmp_path / "registry_test_ep-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: registry-test-ep\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[cl.strategies]\nregistry_test_ep = registry_test_ep:FromEntryPoint\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "registry_test_ep", raising=False)
    assert "registry_test_ep" in lab.STRATEGIES.names() and "registry_test_ep" in lab.STRATEGIES
    cls = lab.STRATEGIES.get("registry_test_ep")
    assert cls.__name__ == "FromEntryPoint" and issubclass(cls, Strategy)
    monkeypatch.delitem(sys.modules, "registry_test_ep")
