"""`cl sweep`: points from a grid or random draws, each trial scored on a validation split of
the training data (never a test set), one parent over the trials, the chosen point run on the
whole stream; on Ray Tune with the same results as one after another."""
import json
import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from cl.cli.main import main
from cl.config.errors import ConfigError
from cl.config.files import experiment_from_dict
from cl.runner.sweep import expand
from streams import class_incremental, digits
from streams.holdout import first_experiences, validation_split

from conftest import tiny_config, tiny_experiment

GRID = {"seed": [0, 1], "training.optimizer.lr": [0.01, 0.05, 0.1]}


def sweep_settings(**sweep):
    """Replay on Split-Digits (an MLP of 32, batches of 32 by SGD with momentum), swept over `GRID`;
    `sweep` replaces keys of the sweep section."""
    return dict(name="sweep-test", threads=1, hidden=(32,), batch_size=32, momentum=0.9,
                strategies=[{"name": "replay", "memory_size": 60, "replay_batch_size": 16}],
                sweep={"parameters": GRID, **sweep})


def sweep_file(tmp_path, **sweep):
    return tiny_experiment(tmp_path, "sweep.yaml", **sweep_settings(**sweep))


def sweep_cli(capsys, *args) -> dict:
    code = main(["sweep", *args, "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    return json.loads(out[-1])


def test_grid_and_random_points():
    cfg = experiment_from_dict(tiny_config(**sweep_settings()))
    assert expand(cfg.sweep) == [{"seed": s, "training.optimizer.lr": lr} for s in (0, 1) for lr in (0.01, 0.05, 0.1)]
    raw = tiny_config(**sweep_settings(method="random", samples=50, seed=3, parameters={
        "training.optimizer.lr": {"low": 1e-4, "high": 1e-1, "log": True},
        "strategies.0.memory_size": {"low": 10, "high": 200, "integer": True},
        "seed": [0, 1, 2]}))
    points = expand(experiment_from_dict(raw).sweep)
    assert points == expand(experiment_from_dict(raw).sweep)  # the draws follow sweep.seed
    lrs = [p["training.optimizer.lr"] for p in points]
    assert all(1e-4 <= lr <= 1e-1 for lr in lrs)
    assert sum(lr < 1e-2 for lr in lrs) > 25  # log-uniform: two thirds of the draws below 1e-2
    assert all(isinstance(p["strategies.0.memory_size"], int) and 10 <= p["strategies.0.memory_size"] <= 200
               for p in points)
    assert {p["seed"] for p in points} == {0, 1, 2}
    raw["sweep"]["method"] = "grid"
    with pytest.raises(ConfigError, match="ranges are for method: random"):
        experiment_from_dict(raw)


def test_validation_split_holds_out_training_data_not_test_data():
    stream = class_incremental(digits(), n_experiences=5, seed=0)
    val = validation_split(stream, 0.2, seed=0)
    for e, v in zip(stream.experiences, val.experiences):
        assert len(v.train) + len(val.test_sets[e.index]) == len(e.train)
        assert len(val.test_sets[e.index]) == round(0.2 * len(e.train))
        # held-out rows and kept rows are disjoint and together are the experience's training data
        rows = {tuple(x.flatten().tolist()) + (int(y),) for x, y in zip(e.train.x, e.train.y)}
        kept = [tuple(x.flatten().tolist()) + (int(y),) for x, y in zip(v.train.x, v.train.y)]
        held = [tuple(x.flatten().tolist()) + (int(y),) for x, y in zip(val.test_sets[e.index].x, val.test_sets[e.index].y)]
        assert set(kept) | set(held) <= rows and len(kept) + len(held) == len(e.train)
        assert set(torch.unique(val.test_sets[e.index].y).tolist()) <= set(e.classes)
    first = first_experiences(stream, 2)
    assert len(first) == 2 and first.n_tasks == 2 and first.n_classes == stream.n_classes


def test_sweep_one_after_another_chooses_on_validation_and_runs_the_choice_on_the_test_sets(tmp_path, capsys):
    path = sweep_file(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = sweep_cli(capsys, str(path), "--no-ray", "--tracking-uri", uri)
    assert out["ray"] is False and len(out["trials"]) == 6
    rows = {r["point"]["training.optimizer.lr"]: r for r in out["rows"]}
    for lr, row in rows.items():
        accs = [t["results"][0]["acc"] for t in out["trials"] if t["point"]["training.optimizer.lr"] == lr]
        assert row["mean"] == pytest.approx(sum(accs) / 2) and row["seeds"] == [0, 1]
    assert out["best"]["mean"] == max(r["mean"] for r in out["rows"])
    assert [r["seed"] for r in out["final"]] == [0, 1]

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id])
    parent = [r for r in runs if r.data.tags.get("cl.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("cl.role") != "parent"]
    assert len(parent) == 1 and len(children) == 8
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent[0].info.run_id}
    trials = [r for r in children if "cl.trial" in r.data.tags]
    assert len(trials) == 6 and all(r.data.params["stream.validation"] == "0.1" for r in trials)  # on validation
    finals = [r for r in children if r.data.tags.get("cl.sweep_final") == "true"]
    assert len(finals) == 2
    assert all("stream.validation" not in r.data.params for r in finals)  # the choice, on the test sets
    assert {r.data.params["training.optimizer.lr"] for r in finals} == {str(out["best"]["point"]["training.optimizer.lr"])}
    assert json.loads(parent[0].data.tags["best_point"]) == out["best"]["point"]


def test_first_experiences_protocol_never_trains_on_later_tasks(tmp_path, capsys):
    path = sweep_file(tmp_path, parameters={"training.optimizer.lr": [0.01, 0.05, 0.1]},
                      protocol="first_experiences", first_experiences=2, final_run=False)
    out = sweep_cli(capsys, str(path), "--no-ray", "--no-track")
    for t in out["trials"]:
        assert len(t["results"][0]["accuracy_matrix"]) == 3  # untrained + two experiences
    assert out["final"] is None


def test_a_failed_trial_is_reported_and_the_others_go_on(tmp_path, capsys):
    path = sweep_file(tmp_path, parameters={"seed": [0], "training.optimizer.lr": [0.01, -1.0]})
    assert main(["sweep", str(path), "--no-ray", "--no-track"]) == 1
    captured = capsys.readouterr()
    assert "trial 1" in captured.err and "failed" in captured.err
    assert "| replay | 0.01 |" in captured.out


def test_on_ray_equals_one_after_another(tmp_path, capsys):
    pytest.importorskip("ray", reason='Ray is the optional extra: pip install "cl-lab[ray]"')
    path = sweep_file(tmp_path, final_run=False)
    on_ray = sweep_cli(capsys, str(path), "--workers", "2", "--no-track")
    here = sweep_cli(capsys, str(path), "--no-ray", "--no-track")
    assert on_ray["ray"] is True and here["ray"] is False
    for a, b in zip(on_ray["trials"], here["trials"]):
        assert a["point"] == b["point"]
        assert a["results"][0]["accuracy_matrix"] == b["results"][0]["accuracy_matrix"]
    assert [r["mean"] for r in on_ray["rows"]] == [r["mean"] for r in here["rows"]]
    assert all(math.isfinite(r["mean"]) for r in here["rows"])
