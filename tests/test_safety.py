"""An experiment file must not run code its reader cannot see: `module:attr` paths resolve only
to what their slot expects, and plugin modules are found beside the experiment file."""
import sys
import textwrap

import pytest

from cl.cli.main import main

from conftest import TINY_EXPERIMENT

BASE = TINY_EXPERIMENT


def refused(tmp_path, capsys, text, key, accepts):
    path = tmp_path / "shared.yaml"
    path.write_text(textwrap.dedent(text))
    for command in (["run", str(path), "--no-track", "--no-progress"], ["describe", str(path)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert key in err and accepts in err, err
        assert "Traceback" not in err


@pytest.fixture
def sentinel(tmp_path):
    path = tmp_path / "sentinel"
    path.write_text("still here")
    return path


def test_standard_library_functions_are_refused_without_being_called(tmp_path, capsys, sentinel):
    flag = tmp_path / "ran"
    cases = [
        (BASE.replace("strategies: [naive]", "strategies: [{name: 'os:system'}]"),
         "strategies.0.name", "a strategies.Strategy subclass"),
        (BASE.replace("model: {name: mlp, hidden: [16]}", f"model: {{name: 'subprocess:Popen', args: [touch, {flag}]}}"),
         "model.name", "a torch.nn.Module subclass"),
        (BASE.replace("{name: sgd, lr: 0.05}", "{name: 'builtins:eval', lr: 0.05}"),
         "training", "a torch.optim.Optimizer subclass"),
        (BASE.replace("training: {epochs: 1,", f"training: {{scheduler: {{name: 'shutil:rmtree', path: {tmp_path}}}, "
                                             f"epochs: 1,"), "training", "LRScheduler subclass"),
        (BASE.replace("dataset: digits", f"dataset: {{name: torch_dataset, factory: 'os:remove', "
                                         f"kwargs: {{path: {sentinel}}}}}"),
         "stream.dataset.factory", "from your plugin code"),
        (BASE.replace("stream: {dataset: digits, scenario: {name: class_incremental, n_experiences: 5}}",
                      f"stream: {{scenario: {{name: avalanche, benchmark: 'subprocess:run', "
                      f"args: {{args: [touch, {flag}]}}}}}}"),
         "stream.scenario.benchmark", "or a function from avalanche.benchmarks"),
        (BASE.replace("dataset: digits", "dataset: {name: 'shutil:rmtree'}"), "stream.dataset.name",
         "from your plugin code"),
    ]
    for text, key, accepts in cases:
        refused(tmp_path, capsys, text, key, accepts)
    assert sentinel.read_text() == "still here" and not flag.exists()


def test_plugin_modules_are_found_beside_the_experiment_file(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "my_data.py").write_text(textwrap.dedent("""
        import torch

        def make(data_dir):
            x = torch.randint(0, 255, (40, 1, 4, 4), dtype=torch.uint8)
            data = torch.utils.data.TensorDataset(x, torch.arange(40) % 2)
            return data, data
    """))
    text = BASE.replace("dataset: digits", "dataset: {name: torch_dataset, factory: 'my_data:make'}")
    text = text.replace("n_experiences: 5", "n_experiences: 2")
    (folder / "exp.yaml").write_text(textwrap.dedent(text))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delitem(sys.modules, "my_data", raising=False)
    assert main(["describe", str(folder / "exp.yaml")]) == 0
    capsys.readouterr()
    # The same module in the working directory, but not beside the file, is not found.
    monkeypatch.delitem(sys.modules, "my_data", raising=False)
    (elsewhere / "my_data.py").write_text((folder / "my_data.py").read_text())
    (elsewhere / "exp.yaml").write_text(textwrap.dedent(text))
    other = tmp_path / "other"
    other.mkdir()
    (other / "exp.yaml").write_text(textwrap.dedent(text))
    assert main(["describe", str(other / "exp.yaml")]) == 2
    assert "cannot import module 'my_data' (looked beside the experiment file" in capsys.readouterr().err
