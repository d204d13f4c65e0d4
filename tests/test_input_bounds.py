"""Bounds on what an experiment file and the command line may ask for, driven through `cl`:
an alias bomb, an oversized file, a key given twice, a number that is not finite, and a
sweep of more points than allowed or with an objective no trial reports are each refused
at once, in one line on standard error with exit code 2, before anything runs."""
import time

import pytest

import cl.runner.sweep as sweep_module
from cl.cli.main import main

from conftest import tiny_experiment


def refused(capsys, argv, *fragments) -> str:
    """`cl argv` ends in one line `cl: error: ...` holding every fragment, with exit code 2."""
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("cl: error: "), err
    for fragment in fragments:
        assert fragment in err[0], err[0]
    return err[0]


def experiment_text(tmp_path, **settings) -> str:
    return tiny_experiment(tmp_path, "base.yaml", **settings).read_text()


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture
def no_trials(monkeypatch):
    """Trials that would run fail the test instead; the points they were given are kept."""
    given = []

    def run_points(specs, *args, **kwargs):
        given.append(specs)
        if len(specs) > 100:
            raise AssertionError(f"{len(specs)} points were built and run")
        return []

    monkeypatch.setattr(sweep_module, "run_points", run_points)
    return given


def test_alias_bomb_is_refused_not_expanded(tmp_path, capsys):
    """Aliases nested nine deep in an argument of a timm model (which takes any keyword): 10^9
    values once expanded, in a file of 400 bytes."""
    levels = "".join(f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 9))
    text = experiment_text(tmp_path).replace(
        "  name: mlp\n  hidden: [16]\n", "  name: resnet18\n  bomb:\n  - &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + levels)
    path = write(tmp_path, "bomb.yaml", text)
    started = time.perf_counter()
    refused(capsys, ["describe", path], path, "aliases expand to over")
    assert time.perf_counter() - started < 2.0


def test_recursive_alias_is_refused(tmp_path, capsys):
    path = write(tmp_path, "loop.yaml", experiment_text(tmp_path).replace("hidden: [16]", "hidden: &h [16, *h]"))
    refused(capsys, ["describe", path], path, "holds itself")


def test_oversized_file_is_refused_before_it_is_read(tmp_path, capsys):
    text = experiment_text(tmp_path) + "".join(f"# padding {i:08d} {'x' * 100}\n" for i in range(10_000))
    path = write(tmp_path, "big.yaml", text)
    refused(capsys, ["describe", path], path, "larger than 1 MiB")


def test_duplicate_key_names_the_key_the_file_and_the_line(tmp_path, capsys):
    text = experiment_text(tmp_path)
    assert text.splitlines()[11] == "  batch_size: 64"
    path = write(tmp_path, "dup.yaml", text.replace("  batch_size: 64\n", "  batch_size: 64\n  batch_size: 8\n"))
    refused(capsys, ["describe", path], path, "line 13", "'batch_size'", "first on line 12")
    # in a flow mapping, and in a --set value
    path = write(tmp_path, "dup_flow.yaml", text.replace("{name: sgd, lr: 0.05}", "{name: sgd, lr: 0.05, lr: 0.5}"))
    refused(capsys, ["describe", path], path, "'lr'")
    path = write(tmp_path, "ok.yaml", text)
    refused(capsys, ["describe", path, "--set", "training.optimizer={name: sgd, lr: 0.1, lr: 9}"], "--set", "'lr'")


def test_merge_keys_may_still_be_overridden(tmp_path, capsys):
    text = experiment_text(tmp_path).replace("  optimizer: {name: sgd, lr: 0.05}\n",
                                             "  optimizer:\n    <<: {name: sgd, lr: 0.5}\n    lr: 0.05\n")
    assert main(["describe", write(tmp_path, "merge.yaml", text)]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("value", [".nan", "-.inf", "1.0e+400", "1e400"])
def test_a_number_that_is_not_finite_is_refused_at_load_naming_its_key(tmp_path, capsys, value):
    path = write(tmp_path, "nan.yaml", experiment_text(tmp_path).replace("lr: 0.05", f"lr: {value}"))
    refused(capsys, ["run", path, "--no-track"], path, "training.optimizer.lr:", "finite")


@pytest.mark.parametrize("override", ["training.optimizer.lr=.nan", "training.optimizer.lr=1e400",
                                      "training.optimizer={name: sgd, lr: .inf}"])
def test_a_number_that_is_not_finite_is_refused_in_overrides(tmp_path, capsys, override):
    path = write(tmp_path, "ok.yaml", experiment_text(tmp_path))
    refused(capsys, ["run", path, "--no-track", "--set", override], "--set training.optimizer.lr:", "finite")


def test_a_float_of_epochs_fails_validation(tmp_path, capsys):
    """`epochs: 1e9` is the string '1e9' to YAML, which is not an integer: refused already."""
    path = write(tmp_path, "epochs.yaml", experiment_text(tmp_path).replace("epochs: 1", "epochs: 1e9"))
    assert main(["describe", path]) == 2
    assert "training.epochs" in capsys.readouterr().err


def sweep_file(tmp_path, **sweep) -> str:
    return str(tiny_experiment(tmp_path, "sweep.yaml", name="bounds-sweep", sweep=sweep))


def test_a_sweep_of_too_many_points_is_refused_before_any_is_built(tmp_path, capsys, no_trials):
    values = [round(0.001 * (i + 1), 3) for i in range(100)]
    path = sweep_file(tmp_path, parameters={"training.optimizer.lr": values, "seed": list(range(100)),
                                            "training.batch_size": list(range(1, 101))})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    refused(capsys, ["sweep", path, "--no-ray", "--tracking-uri", uri], "1,000,000 points", "limit of 1,000",
            "--max-points 1000000")
    assert not no_trials and not (tmp_path / "mlflow.db").exists()  # no parent run was opened
    journals = tmp_path / "cl-journal"
    assert not journals.exists() or not any(journals.rglob("*"))
    path = sweep_file(tmp_path, method="random", samples=5000,
                      parameters={"training.optimizer.lr": {"low": 0.001, "high": 0.1}})
    refused(capsys, ["sweep", path, "--no-ray", "--no-track"], "5,000 points", "--max-points")


def test_max_points_raises_the_limit(tmp_path, capsys, no_trials):
    path = sweep_file(tmp_path, parameters={"seed": [0, 1, 2], "training.optimizer.lr": [0.01, 0.05]})
    refused(capsys, ["sweep", path, "--no-ray", "--no-track", "--max-points", "5"], "6 points", "limit of 5")
    assert not no_trials
    assert main(["sweep", path, "--no-ray", "--no-track", "--max-points", "6"]) == 0
    assert len(no_trials) == 1 and len(no_trials[0]) == 6
    capsys.readouterr()


def test_an_unknown_objective_is_refused_before_any_trial_runs(tmp_path, capsys, no_trials):
    path = sweep_file(tmp_path, parameters={"training.optimizer.lr": [0.01, 0.05]}, objective="accuracy")
    refused(capsys, ["sweep", path, "--no-ray", "--no-track"], "sweep.objective", "'accuracy'", "acc,")
    assert not no_trials
