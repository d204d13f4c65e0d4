"""Dependencies point one way: streams/, strategies/ and evaluation/ never import cl/."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_lower_packages_never_import_cl():
    offenders = []
    for package in ("streams", "strategies", "evaluation"):
        for path in sorted((ROOT / package).glob("*.py")):
            bad = {m for m in imported_modules(path) if m == "cl" or m.startswith("cl.")}
            if bad:
                offenders.append(f"{path.relative_to(ROOT)}: {sorted(bad)}")
    assert not offenders, "\n".join(offenders)


def test_importing_them_loads_no_part_of_cl():
    code = "import sys, streams, strategies, evaluation; print(sorted(m for m in sys.modules if m.split('.')[0] == 'cl'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


def test_config_and_components_do_not_import_each_other():
    assert "cl.components" not in imported_modules(ROOT / "cl" / "config.py")
