"""End to end: `cl run` on an experiment file, then the MLflow run read back with MlflowClient."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from cl.cli.main import main
from conftest import tiny_experiment


def experiment(tmp_path, file, **changes):
    """Split-Digits at seed 1, an MLP of 64, two epochs in batches of 32 by SGD with momentum; then `changes`."""
    return tiny_experiment(tmp_path, file, **{"name": "cli-test", "seed": 1, "hidden": (64,), "epochs": 2,
                                              "batch_size": 32, "momentum": 0.9, **changes})


def run_cli(capsys, *args) -> dict:
    assert main(["run", *args, "--json", "--no-progress"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


@pytest.fixture
def compare_file(tmp_path):
    return experiment(tmp_path, "compare.yaml", strategies=None, runs={
        "naive": ["naive"],
        "replay": [{"name": "replay", "memory_size": 100, "replay_batch_size": 16, "policy": "class_balanced"}]})


def test_compare_file_makes_one_complete_mlflow_run_each(compare_file, tracking_uri, capsys):
    result = run_cli(capsys, str(compare_file), "--tracking-uri", tracking_uri)
    assert [r["name"] for r in result["runs"]] == ["naive", "replay"]
    client = MlflowClient(tracking_uri)
    for r in result["runs"]:
        for key in ("acc", "bwt", "fwt", "forgetting", "train_time_s", "wall_time_s", "mlflow_run_id"):
            assert key in r
        R = r["accuracy_matrix"]
        assert len(R) == 6 and all(len(row) == 5 and all(0 <= v <= 1 for v in row) for row in R)

        run = client.get_run(r["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert client.get_experiment(run.info.experiment_id).name == "cli-test"
        assert run.data.tags["strategy"] == r["name"] and run.data.tags["seed"] == "1"
        assert run.data.tags["stream"] == "split-digits" and "lab_version" in run.data.tags
        assert run.data.params["training.batch_size"] == "32"
        assert run.data.params["model.hidden"] == "[64]"
        assert run.data.params["strategies.0.name"] == r["name"]
        assert run.data.metrics["acc"] == pytest.approx(r["acc"])
        assert run.data.metrics["bwt"] == pytest.approx(r["bwt"])
        history = client.get_metric_history(run.info.run_id, "acc_task0")
        assert sorted(m.step for m in history) == [0, 1, 2, 3, 4, 5]
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([row[0] for row in R])
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")) == [1, 2, 3, 4, 5]
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "acc_seen")) == [1, 2, 3, 4, 5]
        lr = client.get_metric_history(run.info.run_id, "lr")  # every 50 iterations, step = iteration
        assert [m.step for m in lr][:2] == [0, 50] and {m.value for m in lr} == {0.05}
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert artifacts == {"config.yaml", "accuracy_matrix.csv", "accuracy_matrix.json", "accuracy_matrix.png",
                             "matrices.json", "task_curves.png"}
        every = json.load(open(client.download_artifacts(run.info.run_id, "matrices.json")))
        assert set(every) == {"acc", "task_aware_acc"} and np.allclose(every["acc"]["matrix"], R)
        local = client.download_artifacts(run.info.run_id, "accuracy_matrix.json")
        assert np.allclose(json.load(open(local))["accuracy_matrix"], R)
    naive, replay = result["runs"]
    assert replay["acc"] > naive["acc"] + 0.3
    assert naive["forgetting"] > 0.8


def test_single_run_json_and_set_overrides(tmp_path, tracking_uri, capsys):
    path = experiment(tmp_path, "one.yaml")
    result = run_cli(capsys, str(path), "--tracking-uri", tracking_uri, "--set", "seed=4",
                     "--set", "training.epochs=1")
    assert result["seed"] == 4 and "runs" not in result
    run = MlflowClient(tracking_uri).get_run(result["mlflow_run_id"])
    assert run.data.tags["seed"] == "4" and run.data.params["training.epochs"] == "1"


def test_user_strategy_by_module_path(tmp_path, tracking_uri, capsys, monkeypatch):
    (tmp_path / "my_strategies.py").write_text(textwrap.dedent("""
        import torch
        from strategies import Strategy

        class CountSteps(Strategy):
            '''A user's strategy: counts optimizer steps.'''
            def __init__(self, scale: float = 1.0):
                self.scale, self.steps = scale, 0
            def after_step(self, ctx, batch):
                self.steps += 1
            def state_dict(self):
                return {**super().state_dict(), "steps": self.steps}
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_strategies", raising=False)  # another test's module of that name
    path = experiment(tmp_path, "plug.yaml", strategies=[{"name": "my_strategies:CountSteps", "scale": 2.0}])
    result = run_cli(capsys, str(path), "--no-track")
    assert result["mlflow_run_id"] is None and len(result["accuracy_matrix"]) == 6
    experiment(tmp_path, "plug.yaml", strategies=[{"name": "my_strategies:CountSteps", "scal": 2}])
    assert main(["run", str(path), "--no-track", "--no-progress"]) == 2
    assert "strategies.0.scal: unknown key (expected one of: scale)" in capsys.readouterr().err


def test_bad_input_exits_2_with_a_message(tmp_path, capsys):
    path = experiment(tmp_path, "bad.yaml", learning_rate=3)
    assert main(["run", str(path), "--no-track"]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "learning_rate: unknown key" in err
    experiment(tmp_path, "bad.yaml", dataset={"name": "mnist", "download": False}, data_dir=str(tmp_path))
    assert main(["run", str(path), "--no-track"]) == 2
    assert "dataset 'mnist' not found; looked in" in capsys.readouterr().err


def test_interrupted_run_resumes_into_the_same_mlflow_run(tmp_path, tracking_uri, capsys):
    path = experiment(tmp_path, "one.yaml", strategies=[{"name": "replay", "memory_size": 50}])
    full = run_cli(capsys, str(path), "--tracking-uri", tracking_uri)
    ckpt = tmp_path / "ckpt"
    # A first attempt that dies after 2 experiences: a strategy raises in experience 3.
    crash = tmp_path / "crash.yaml"
    crash.write_text(path.read_text())
    from cl.config.files import load_experiment
    from cl.runner.invocation import run_experiment
    import strategies.replay as replay_module

    original = replay_module.Replay.before_experience

    def die_at_third(self, ctx):
        if ctx.experience.index == 2:
            raise KeyboardInterrupt
        return original(self, ctx)

    replay_module.Replay.before_experience = die_at_third
    try:
        with pytest.raises(KeyboardInterrupt):
            run_experiment(load_experiment(crash), tracking_uri=tracking_uri, checkpoint_dir=str(ckpt))
    finally:
        replay_module.Replay.before_experience = original
    client = MlflowClient(tracking_uri)
    everything = client.search_runs([client.get_experiment_by_name("cli-test").experiment_id])
    killed = [r for r in everything if r.info.status == "KILLED" and r.data.tags.get("cl.role") != "parent"]
    parent = [r for r in everything if r.info.status == "KILLED" and r.data.tags.get("cl.role") == "parent"]
    assert len(killed) == 1 and len(parent) == 1
    assert len(client.get_metric_history(killed[0].info.run_id, "acc_seen")) == 2  # nothing logged was lost

    resumed = run_cli(capsys, str(path), "--tracking-uri", tracking_uri, "--checkpoint-dir", str(ckpt), "--resume")
    assert resumed["mlflow_run_id"] == killed[0].info.run_id
    assert resumed["mlflow_parent_run_id"] == parent[0].info.run_id  # the same parent, finished this time
    assert client.get_run(parent[0].info.run_id).info.status == "FINISHED"
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    run = client.get_run(resumed["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "acc_seen")) == [1, 2, 3, 4, 5]


def test_python_dash_m_cl_lists_strategies():
    out = subprocess.run([sys.executable, "-m", "cl", "strategies"], capture_output=True, text=True, check=True).stdout
    for name in ("naive", "joint", "cumulative", "replay"):
        assert name in out


def test_unusable_tracking_store_fails_before_training(tmp_path, capsys):
    path = experiment(tmp_path, "one.yaml")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store's folder should be")
    assert main(["run", str(path), "--tracking-uri", f"sqlite:///{blocker}/mlflow.db", "--no-progress"]) == 2
    assert "could not be opened" in capsys.readouterr().err


def test_a_store_that_fails_mid_run_loses_nothing(tmp_path, tracking_uri, capsys, monkeypatch):
    """Artifacts cannot be written (a full disk): the run's results stand, the user is told
    within the sink's (tiny) timeout what waits and where, and `cl sync` delivers it later."""
    def broken_log_artifact(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("mlflow.tracking.MlflowClient.log_artifact", broken_log_artifact)
    monkeypatch.setenv("CL_JOURNAL_DIR", str(tmp_path / "journal"))
    path = experiment(tmp_path, "one.yaml")
    result = run_cli(capsys, str(path), "--tracking-uri", tracking_uri, "--tracking-timeout", "0.2")
    assert len(result["accuracy_matrix"]) == 6
    assert "disk full" in result["tracking_error"] and "cl sync" in result["tracking_error"]
    journal = next((tmp_path / "journal").rglob("naive.journal"))
    assert str(journal) in result["tracking_error"]
    client = MlflowClient(tracking_uri)
    run = client.get_run(result["mlflow_run_id"])  # created, its metrics in, its artifacts waiting
    assert run.info.status == "RUNNING" and run.data.metrics["acc"] == pytest.approx(result["acc"])
    assert not client.list_artifacts(run.info.run_id)

    monkeypatch.undo()  # the disk has room again
    assert main(["sync", str(tmp_path / "journal"), "--tracking-uri", tracking_uri]) == 0  # the store the user names
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"accuracy_matrix.png", "config.yaml"}
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED" and "comparison.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert not (tmp_path / "journal").exists()  # delivered journals are removed
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "acc_seen")) == [1, 2, 3, 4, 5]


def test_a_terminated_run_is_marked_killed_not_left_running(tmp_path, tracking_uri):
    import signal
    import time

    path = experiment(tmp_path, "long.yaml", epochs=40, threads=1)
    ckpt = tmp_path / "ckpt"
    command = [sys.executable, "-m", "cl", "run", str(path), "--no-progress", "--tracking-uri", tracking_uri,
               "--checkpoint-dir", str(ckpt)]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (ckpt / "naive.pt").exists() and time.time() < deadline:  # written after experience 1
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("cli-test").experiment_id])
    assert sorted((r.data.tags.get("cl.role", "child"), r.info.status) for r in runs) == \
        [("child", "KILLED"), ("parent", "KILLED")]


def test_two_processes_can_open_one_fresh_store_together(tmp_path):
    """Seeds started together on one fresh SQLite store race to create its schema; without
    the lock beside the store, one of them fails ("online migration expected to match...")."""
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    code = f"from cl.tracking.store import StoreWarmup; StoreWarmup({uri!r}).wait()"
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err


def test_a_strategy_logs_its_defaults_as_parameters(tmp_path, tracking_uri, capsys):
    """A run is reproducible from MLflow alone: replay's arguments the file left out are logged
    with the defaults they took, next to the one it set."""
    import inspect

    from strategies import Replay

    path = experiment(tmp_path, "defaults.yaml", epochs=1, strategies=[{"name": "replay", "memory_size": 60}])
    result = run_cli(capsys, str(path), "--tracking-uri", tracking_uri)
    params = MlflowClient(tracking_uri).get_run(result["mlflow_run_id"]).data.params
    defaults = inspect.signature(Replay).parameters
    assert params["strategies.0.memory_size"] == "60"
    assert params["strategies.0.replay_batch_size"] == str(defaults["replay_batch_size"].default)
    assert params["strategies.0.policy"] == str(defaults["policy"].default)
