"""Results a researcher browses: one parent MLflow run per invocation with a child per run and
seed, the comparison (mean ± std over seeds) in the parent, datasets and source on every
child, `cl compare` reading any store back."""
import contextlib
import csv
import io
import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from cl.cli.main import main
from conftest import tiny_experiment
from evaluation import compare

COMPARED = {"naive": ["naive"], "replay": [{"name": "replay", "memory_size": 60, "replay_batch_size": 16}]}


def experiment(folder, file, **changes):
    """Naive and replay compared on Split-Digits: an MLP of 32, batches of 32 by SGD with momentum,
    evaluated every 10 iterations; then `changes`."""
    return tiny_experiment(folder, file, **{"name": "browse-test", "threads": 1, "hidden": (32,), "batch_size": 32,
                                            "eval_every": 10, "momentum": 0.9, "strategies": None, "runs": COMPARED,
                                            **changes})


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """`cl run FILE --seeds 0,1,2` on a fresh store: (result, stderr, tracking URI)."""
    tmp = tmp_path_factory.mktemp("browse")
    path = experiment(tmp, "browse.yaml")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    out, err = io.StringIO(), io.StringIO()  # captured by hand: a module-scoped fixture cannot take capsys
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.MonkeyPatch.context() as env:
        env.setenv("CL_JOURNAL_DIR", str(tmp / "cl-journal"))
        code = main(["run", str(path), "--seeds", "0,1,2", "--tracking-uri", uri, "--json", "--no-progress"])
    assert code == 0, err.getvalue()
    return json.loads(out.getvalue().strip().splitlines()[-1]), err.getvalue(), uri


def test_seeds_make_one_parent_with_a_child_per_run_and_seed(seeded):
    result, err, uri = seeded
    assert result["seeds"] == [0, 1, 2] and len(result["runs"]) == 6
    assert [(r["name"], r["seed"]) for r in result["runs"]] == [(n, s) for s in (0, 1, 2) for n in ("naive", "replay")]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("browse-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("cl.role") == "parent"]
    assert len(parents) == 1 and len(runs) == 7
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r is not parent]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert {r.info.run_id for r in children} == {r["mlflow_run_id"] for r in result["runs"]}
    assert len({r.info.run_name for r in runs}) == 7  # names tell runs and reruns apart
    assert {r.data.tags["cl.invocation"] for r in runs} == {parent.data.tags["cl.invocation"]}
    # The link to the parent, on its training view, ends the standard error.
    assert f"/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}?workflowType=machine_learning" in err


def test_the_parents_comparison_equals_the_childrens_metrics_read_back(seeded):
    result, _, uri = seeded
    client = MlflowClient(uri)
    parent = client.get_run(result["runs"][0]["mlflow_parent_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    for label in ("naive", "replay"):
        accs = [r.data.metrics["acc"] for r in children if r.data.tags["strategy"] == label]
        forgetting = [r.data.metrics["forgetting"] for r in children if r.data.tags["strategy"] == label]
        assert len(accs) == 3
        assert parent.data.metrics[f"{label}/acc_mean"] == pytest.approx(np.mean(accs))
        assert parent.data.metrics[f"{label}/acc_std"] == pytest.approx(np.std(accs, ddof=1))
        assert parent.data.metrics[f"{label}/forgetting_mean"] == pytest.approx(np.mean(forgetting))
    table = json.load(open(client.download_artifacts(parent.info.run_id, "comparison.json")))
    frame = dict(zip(table["columns"], zip(*table["data"])))  # MLflow stores a table split by columns
    # Best first: replay keeps the early tasks, fine-tuning forgets them.
    assert list(frame["strategy"]) == ["replay", "naive"] and list(frame["runs"]) == [3, 3]
    assert list(frame["rank"]) == [1, 2]
    naive_accs = [r.data.metrics["acc"] for r in children if r.data.tags["strategy"] == "naive"]
    assert frame["acc_mean"][1] == pytest.approx(np.mean(naive_accs))
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.json", "comparison.md", "comparison.csv", "comparison_tasks.png", "comparison_matrices.png",
            "comparison_bars.png", "comparison_stability.png"} <= artifacts
    assert result["comparison"]["acc_mean"][1] == pytest.approx(frame["acc_mean"][1])


def test_children_carry_datasets_source_and_filterable_tags(seeded):
    result, _, uri = seeded
    client = MlflowClient(uri)
    run = client.get_run(result["runs"][1]["mlflow_run_id"])
    tags = run.data.tags
    assert tags["strategy"] == "replay" and tags["seed"] == "0"
    assert tags["dataset"] == "digits" and tags["scenario"] == "class_incremental" and tags["model"] == "mlp"
    assert tags["mlflow.source.name"].endswith("browse.yaml") and tags["mlflow.source.type"] == "LOCAL"
    assert "strategies" not in tags  # the strategy is named once among the tags
    inputs = run.inputs.dataset_inputs
    contexts = [(i.dataset.name, [t.value for t in i.tags]) for i in inputs]
    assert contexts == [(f"digits-exp{k}-train", ["train"]) for k in range(1, 6)] + \
        [(f"digits-task{j}-test", ["test"]) for j in range(5)]
    profiles = [json.loads(i.dataset.profile) for i in inputs]
    train_classes = [p["classes"] for p in profiles[:5]]
    assert sorted(c for cs in train_classes for c in cs) == list(range(10))
    assert [p["classes"] for p in profiles[5:]] == train_classes  # task j is tested on experience j's classes
    assert all(p["n"] > 0 for p in profiles) and [p["experience"] for p in profiles[:5]] == [1, 2, 3, 4, 5]
    assert json.loads(inputs[0].dataset.source) == {"uri": "sklearn.datasets.load_digits"}
    # The digest is the data's: another experience differs, the same one under another seed
    # (the class order is fixed) does not.
    assert len({i.dataset.digest for i in inputs}) == 10
    other = client.get_run(result["runs"][3]["mlflow_run_id"]).inputs.dataset_inputs
    assert [i.dataset.digest for i in other] == [i.dataset.digest for i in inputs]


def test_child_plots_are_drawn_at_a_size_that_reads_at_one_to_one(seeded):
    result, _, uri = seeded
    client = MlflowClient(uri)
    run_id = result["runs"][0]["mlflow_run_id"]
    img = Image.open(client.download_artifacts(run_id, "accuracy_matrix.png"))
    assert img.width >= 500 and img.height >= 250
    curves = Image.open(client.download_artifacts(run_id, "task_curves.png"))
    assert curves.width >= 600


def test_compare_reads_the_store_back(seeded, capsys, tmp_path):
    result, _, uri = seeded
    assert main(["compare", "browse-test", "--tracking-uri", uri, "--format", "csv", "--plots", str(tmp_path)]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["strategy"], r["runs"], r["seeds"]) for r in rows] == [("replay", "3", "0,1,2"), ("naive", "3", "0,1,2")]
    accs = [r["acc"] for r in result["runs"] if r["name"] == "replay"]
    assert float(rows[0]["acc_mean"]) == pytest.approx(np.mean(accs))
    assert float(rows[0]["acc_std"]) == pytest.approx(np.std(accs, ddof=1))
    assert float(rows[1]["vs_best_mean"]) < 0 and rows[1]["vs_best_paired"] == "True"  # same seeds: paired
    assert {p.name for p in tmp_path.iterdir()} >= {"comparison_tasks.png", "comparison_bars.png"}
    parent = result["runs"][0]["mlflow_parent_run_id"]
    assert main(["compare", "--parent", parent, "--tracking-uri", uri, "--metrics", "acc"]) == 0
    out = capsys.readouterr().out
    assert "± " in out and out.splitlines()[1].split()[:2] == ["1", "replay"] and "ranked by acc" in out
    assert main(["compare", "no-such-experiment", "--tracking-uri", uri]) == 2
    assert "no experiment 'no-such-experiment'" in capsys.readouterr().err


def test_compare_reads_flat_runs_of_earlier_versions(tmp_path, capsys):
    """Runs logged before parents existed: flat, tagged strategy and seed, an accuracy_matrix.json."""
    uri = f"sqlite:///{tmp_path / 'old.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("old-runs", artifact_location=(tmp_path / "artifacts").as_uri())
    for label, seed, acc in [("naive", 0, 0.2), ("naive", 1, 0.3), ("replay", 0, 0.8)]:
        run = client.create_run(exp, run_name=f"{label}-seed{seed}", tags={"strategy": label, "seed": str(seed)})
        client.log_metric(run.info.run_id, "acc", acc)
        matrix = tmp_path / "accuracy_matrix.json"
        matrix.write_text(json.dumps({"accuracy_matrix": [[0.1, 0.1], [acc, 0.0], [acc, acc]]}))
        client.log_artifact(run.info.run_id, str(matrix))
        client.set_terminated(run.info.run_id)
    assert main(["compare", "old-runs", "--tracking-uri", uri, "--format", "csv", "--plots", str(tmp_path / "p")]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["strategy"], r["runs"], float(r["acc_mean"])) for r in rows] == [("replay", "1", 0.8), ("naive", "2", 0.25)]
    assert (tmp_path / "p" / "comparison_matrices.png").exists()


def test_comparison_mean_and_sample_std_by_hand():
    runs = [{"strategy": "a", "seed": s, "metrics": {"acc": v, "bwt": -v}} for s, v in enumerate([0.5, 0.7, 0.9])]
    runs.append({"strategy": "b", "seed": 0, "metrics": {"acc": 0.4}})
    rows = compare.comparison(runs, ["acc", "bwt"])
    assert rows[0]["strategy"] == "a" and rows[0]["n"] == 3 and rows[0]["seeds"] == [0, 1, 2]
    assert rows[0]["acc"] == pytest.approx((0.7, 0.2))  # sqrt(((-.2)^2 + 0 + .2^2) / 2) = 0.2
    assert rows[1]["n"] == 1 and rows[1]["acc"][0] == 0.4 and np.isnan(rows[1]["acc"][1])
    assert np.isnan(rows[1]["bwt"][0])  # b never logged it
    assert compare.parent_metrics(rows) == pytest.approx({"a/acc_mean": 0.7, "a/acc_std": 0.2, "a/bwt_mean": -0.7,
                                                          "a/bwt_std": 0.2, "b/acc_mean": 0.4})
    assert "0.7000 ± 0.2000" in compare.text_table(rows) and "| 2 | b | 1 | 0 | 0.4000 | -0.3000 | - |" in compare.markdown_table(rows)


def test_bad_seeds_are_refused(tmp_path, capsys):
    path = experiment(tmp_path, "e.yaml")
    assert main(["run", str(path), "--seeds", "0,x", "--no-track"]) == 2
    assert "--seeds 0,x" in capsys.readouterr().err
    assert main(["run", str(path), "--set", "seeds=[1, 1]", "--no-track"]) == 2
    assert "distinct" in capsys.readouterr().err


def test_log_model_and_system_metrics(tmp_path, capsys):
    import mlflow.pytorch
    import torch

    path = experiment(tmp_path, "one.yaml", strategies=["naive"], runs=None)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["run", str(path), "--tracking-uri", uri, "--json", "--no-progress", "--log-model",
                 "--system-metrics", "0.2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = MlflowClient(uri).get_run(result["mlflow_run_id"])
    assert "system/cpu_utilization_percentage" in run.data.metrics  # sampled while it trained
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pytorch.load_model(f"runs:/{result['mlflow_run_id']}/model")
    finally:
        mlflow.set_tracking_uri(None)
    assert isinstance(model, torch.nn.Module)
    with torch.no_grad():
        assert model(torch.zeros(4, 1, 8, 8)).shape == (4, 10)


def test_cl_ui_serves_the_store_and_prints_the_training_view_link(seeded):
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from cl.tracking import views

    _, _, uri = seeded
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cl", "ui", "--tracking-uri", uri, "--port", str(port),
                             "--experiment", "browse-test"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        exp_id = MlflowClient(uri).get_experiment_by_name("browse-test").experiment_id
        # The newest cl run's saved view: its children, best first, with the comparison's columns.
        key = views.lab_views(MlflowClient(uri).get_experiment(exp_id).tags)[0]
        assert line.strip() == (f"browse-test: http://127.0.0.1:{port}/#/experiments/{exp_id}/runs?"
                                f"viewStateShareKey={key}&workflowType=machine_learning")
        deadline, status = time.time() + 90, None
        while time.time() < deadline and status is None:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).status
            except OSError:
                time.sleep(0.5)
        assert status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cl_ui_refuses_a_tracking_server(capsys):
    assert main(["ui", "--tracking-uri", "http://127.0.0.1:1"]) == 2
    assert "is a tracking server already" in capsys.readouterr().err
