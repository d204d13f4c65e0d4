"""Dependencies point one way, between the top-level packages and inside cl/.

streams/, strategies/ and evaluation/ never import cl/. Inside cl/ the
sub-packages follow the data's path: models (and console, how the lab
speaks on a terminal), then config (a file into
components), then training and tracking (peers that never import each other),
then runner, then the command line and the Python API. Imports inside
functions count too, and no two modules of cl/ import each other by any path.
The package root (`import cl`) holds only the version, and anyone may read it.
"""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOWER = ("streams", "strategies", "evaluation")
#: cl's sub-packages by layer: a module may import its own layer's package and lower layers only.
CL_LAYERS = {"console": 0, "models": 0, "config": 1, "training": 2, "tracking": 2, "runner": 3, "cli": 4, "api": 4, "__main__": 5}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at its top or inside a function (`from cl import x` counts as cl.x)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "cl":  # `from cl import api` imports cl.api
                names.update(f"cl.{a.name}" for a in node.names)
            else:
                names.add(node.module)
    return names


def python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_every_folder_is_walked():
    folders = {p.parent.relative_to(ROOT).as_posix() for p in python_files("strategies")}
    assert "strategies/prompting" in folders


def test_lower_packages_never_import_cl():
    offenders = []
    for package in LOWER:
        for path in python_files(package):
            bad = {m for m in imported_modules(path) if m == "cl" or m.startswith("cl.")}
            if bad:
                offenders.append(f"{path.relative_to(ROOT)}: {sorted(bad)}")
    assert not offenders, "\n".join(offenders)


def test_importing_them_loads_no_part_of_cl():
    code = "import sys, streams, strategies, evaluation; print(sorted(m for m in sys.modules if m.split('.')[0] == 'cl'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return CL_LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_cl_subpackages_import_downwards_only():
    offenders = []
    for path in python_files("cl"):
        here = module_name(path)
        if here == "cl":
            continue
        own, own_package = _layer(here), here.split(".")[1]
        assert own is not None, f"{here}: a module of cl/ outside the known layers {sorted(CL_LAYERS)}"
        for target in imported_modules(path):
            layer = _layer(target) if target.startswith("cl.") else None
            if layer is None or target.split(".")[1] == own_package:
                continue
            if layer >= own:
                offenders.append(f"{here} imports {target} (layer {layer} >= {own})")
    assert not offenders, "\n".join(offenders)


def test_no_import_cycles_inside_cl():
    graph = {}
    for path in python_files("cl"):
        graph[module_name(path)] = {m for m in imported_modules(path) if m.startswith("cl.")}
    # An import of a package also imports its __init__; names imported from a module are not modules.
    graph = {m: {t if t in graph else t.rpartition(".")[0] for t in targets} & set(graph) - {m}
             for m, targets in graph.items()}
    visiting, done, cycles = set(), set(), []

    def visit(node, trail):
        if node in visiting:
            cycles.append(" -> ".join(trail[trail.index(node):] + [node]))
            return
        if node in done:
            return
        visiting.add(node)
        for nxt in sorted(graph[node]):
            visit(nxt, trail + [node])
        visiting.discard(node)
        done.add(node)

    for module in sorted(graph):
        visit(module, [])
    assert not cycles, "\n".join(cycles)


def test_layer_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: an upward import in a model file is reported."""
    fake = tmp_path / "cl" / "models"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from cl.runner.invocation import run_experiment\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    try:
        test_cl_subpackages_import_downwards_only()
    except AssertionError as err:
        assert "cl.models.bad imports cl.runner.invocation" in str(err)
    else:
        raise AssertionError("an upward import went unnoticed")
