"""Plugin code is what the user put beside the experiment file, not what Python put there
(issue 24, in part): a package of a virtual environment or the standard library under the
experiment's folder is not plugin code, and `cl describe` builds the stream from what is on
disk only. Driven through the `cl` command, as a user runs it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from conftest import tiny_experiment

PY = f"python{sys.version_info.major}.{sys.version_info.minor}"

EVIL = textwrap.dedent("""
    from pathlib import Path

    Path({imported!r}).write_text("imported")  # import-time code: must not run either


    def fn(data_dir=None):
        Path({ran!r}).write_text("ran")
        raise SystemExit("evilpkg ran")
""")


def cl(*args: str, python: str = sys.executable, pythonpath: list[Path] = (), env: dict | None = None,
       cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m cl ARGS` in a fresh process; `pythonpath` goes before the inherited PYTHONPATH."""
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([python, "-m", "cl", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


def one_line_exit_2(proc: subprocess.CompletedProcess, *words: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("cl: error: "), proc.stderr
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def fake_venv(project: Path, packages: str) -> Path:
    """A virtual environment in `project/.venv` (its `pyvenv.cfg`), with `evilpkg` installed in
    `.venv/<packages>`; the folder that holds the packages is returned (put on the path, as
    the venv's python has it)."""
    venv = project / ".venv"
    venv.mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text(f"home = {Path(sys.executable).parent}\nversion = {PY[6:]}\n")
    where = venv / packages
    (where / "evilpkg").mkdir(parents=True)
    marks = project.parent / "marks"
    marks.mkdir(exist_ok=True)
    (where / "evilpkg" / "__init__.py").write_text(EVIL.format(imported=str(marks / "imported"),
                                                               ran=str(marks / "ran")))
    return where


@pytest.mark.parametrize("packages", [f"lib/{PY}/site-packages", "vendor"],
                         ids=["site-packages", "venv-without-site-packages"])
def test_a_package_of_a_venv_beside_the_file_is_refused_by_describe_and_run(tmp_path, packages):
    """The project's root holds the experiment file and the `.venv` the README creates: a
    package installed there is not the user's plugin code, wherever in the venv it lies
    ('vendor': only the venv's `pyvenv.cfg` says so). Refused before it is imported."""
    project = tmp_path / "project"
    installed = fake_venv(project, packages)
    path = tiny_experiment(project, dataset={"name": "evilpkg:fn"})
    for command in (["describe", str(path)], ["run", str(path), "--no-track", "--no-progress"]):
        proc = cl(*command, pythonpath=[installed], cwd=tmp_path)
        one_line_exit_2(proc, "stream.dataset", "evilpkg:fn", "from your plugin code")
        assert not (tmp_path / "marks" / "imported").exists() and not (tmp_path / "marks" / "ran").exists()


def _python_under(home: Path) -> Path:
    """A copy of this Python's standard library in `home/lib/pythonX.Y` (hard links where the
    file system allows), as when Python is installed in the user's home folder; its
    site-packages are left out (the lab's packages come through PYTHONPATH)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(stdlib, home / "lib" / PY, copy_function=link, symlinks=True,
                    ignore=lambda folder, names: {"site-packages", "test"} & set(names))
    return home / "lib" / PY


def test_the_standard_library_under_the_experiment_folder_is_refused(tmp_path):
    """Python lives in the home folder (PYTHONHOME) and the experiment file lies there too: its
    standard library is under the experiment's folder, yet not plugin code. `stdmarker` is a
    module of that standard library's folder that writes a file when it is called."""
    home = tmp_path / "home"
    stdlib = _python_under(home)
    (stdlib / "stdmarker.py").write_text(f"def make(data_dir=None):\n    open({str(tmp_path / 'ran')!r}, 'w')\n")
    lab_root = Path(__import__("cl").__file__).resolve().parents[1]
    env = {"PYTHONHOME": str(home), "PYTHONNOUSERSITE": "1"}
    python = getattr(sys, "_base_executable", sys.executable)
    where = [lab_root, *(Path(p) for p in sysconfig.get_paths()["purelib"].split(os.pathsep))]
    check = subprocess.run([python, "-c", "import shutil, sysconfig; print(shutil.__file__)"], capture_output=True,
                           text=True, env={**os.environ, **env})
    assert check.stdout.strip() == str(stdlib / "shutil.py"), check  # the copy is the Python that runs
    for dataset in ("stdmarker:make", "shutil:rmtree"):
        path = tiny_experiment(home, dataset={"name": dataset})
        for command in (["describe", str(path)], ["run", str(path), "--no-track", "--no-progress"]):
            proc = cl(*command, python=python, pythonpath=where, env=env, cwd=tmp_path)
            one_line_exit_2(proc, "stream.dataset", dataset, "from your plugin code")
    assert not (tmp_path / "ran").exists()


def test_is_plugin_code_refuses_the_standard_library_from_a_folder_above_it():
    """The same rule in-process, on this Python's own standard library."""
    from cl.config.registry import is_plugin_code, plugins_from

    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    for folder in (stdlib.parent, stdlib.parent.parent, Path(stdlib.anchor)):
        with plugins_from(folder):
            assert not is_plugin_code(shutil.rmtree) and not is_plugin_code(textwrap.dedent), folder
            assert not is_plugin_code(pytest.fail), folder  # an installed package


def test_the_users_module_beside_the_file_is_accepted_a_link_to_installed_code_is_not(tmp_path):
    """A module the user wrote beside the experiment file is plugin code, in a folder that
    also holds a venv; a link beside the file counts where it points (into the venv)."""
    project = tmp_path / "project"
    installed = fake_venv(project, f"lib/{PY}/site-packages")
    (project / "mydata.py").write_text(textwrap.dedent("""
        import torch

        def make(data_dir=None):
            x = torch.randint(0, 255, (40, 1, 4, 4), dtype=torch.uint8)
            data = torch.utils.data.TensorDataset(x, torch.arange(40) % 2)
            return data, data
    """))
    path = tiny_experiment(project, dataset={"name": "torch_dataset", "factory": "mydata:make"}, n_experiences=2)
    proc = cl("describe", str(path), pythonpath=[installed], cwd=tmp_path)
    assert proc.returncode == 0 and "2 experiences" in proc.stdout, proc.stderr
    proc = cl("run", str(path), "--no-track", "--no-progress", pythonpath=[installed], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr

    (project / "linked.py").symlink_to(installed / "evilpkg" / "__init__.py")
    path = tiny_experiment(project, dataset={"name": "linked:fn"})
    one_line_exit_2(cl("describe", str(path), pythonpath=[installed], cwd=tmp_path), "linked:fn")
    assert not (tmp_path / "marks" / "imported").exists() and not (tmp_path / "marks" / "ran").exists()


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_describe_with_the_data_missing_is_one_line_and_makes_no_file_nor_folder(tmp_path, dataset):
    """`cl describe` shows what is on disk: a dataset that is not there is the lab's one line
    naming where it looked, with no download tried and no empty `MNIST/raw` left behind."""
    path = tiny_experiment(tmp_path, dataset={"name": dataset}, data_dir=str(tmp_path / "nodata"))
    before = _tree(tmp_path)
    proc = cl("describe", str(path), cwd=tmp_path)
    one_line_exit_2(proc, f"dataset '{dataset}' not found", str(tmp_path / "nodata"), "downloads nothing")
    assert _tree(tmp_path) == before
