"""An experiment file must not run code its reader cannot see: `module:attr` paths resolve only
to what their slot expects, and plugin modules are found beside the experiment file."""
import sys
import textwrap

import pytest

from cl.cli.main import main

from conftest import tiny_experiment


def refused(tmp_path, capsys, settings, key, accepts):
    path = tiny_experiment(tmp_path, "shared.yaml", **settings)
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
        (dict(strategies=[{"name": "os:system"}]), "strategies.0.name", "a strategies.Strategy subclass"),
        (dict(model={"name": "subprocess:Popen", "args": ["touch", str(flag)]}),
         "model.name", "a torch.nn.Module subclass"),
        (dict(optimizer={"name": "builtins:eval", "lr": 0.05}), "training", "a torch.optim.Optimizer subclass"),
        (dict(scheduler={"name": "shutil:rmtree", "path": str(tmp_path)}), "training", "LRScheduler subclass"),
        (dict(dataset={"name": "torch_dataset", "factory": "os:remove", "kwargs": {"path": str(sentinel)}}),
         "stream.dataset.factory", "from your plugin code"),
        (dict(dataset=None, scenario={"name": "avalanche", "benchmark": "subprocess:run",
                                      "args": {"args": ["touch", str(flag)]}}),
         "stream.scenario.benchmark", "or a function from avalanche.benchmarks"),
        (dict(dataset={"name": "shutil:rmtree"}), "stream.dataset.name", "from your plugin code"),
    ]
    for settings, key, accepts in cases:
        refused(tmp_path, capsys, settings, key, accepts)
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
    text = tiny_experiment(folder, dataset={"name": "torch_dataset", "factory": "my_data:make"},
                           n_experiences=2).read_text()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delitem(sys.modules, "my_data", raising=False)
    assert main(["describe", str(folder / "exp.yaml")]) == 0
    capsys.readouterr()
    # The same module in the working directory, but not beside the file, is not found.
    monkeypatch.delitem(sys.modules, "my_data", raising=False)
    (elsewhere / "my_data.py").write_text((folder / "my_data.py").read_text())
    (elsewhere / "exp.yaml").write_text(text)
    other = tmp_path / "other"
    other.mkdir()
    (other / "exp.yaml").write_text(text)
    assert main(["describe", str(other / "exp.yaml")]) == 2
    assert "cannot import module 'my_data' (looked beside the experiment file" in capsys.readouterr().err
