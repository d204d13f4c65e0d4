"""Fast start: what a command imports, the delivery child that keeps MLflow off the critical
path, and the digits loader that needs no scikit-learn import."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from cl.cli.main import main
from conftest import tiny_experiment
from streams.sources import _digits_arrays, digits

HEAVY = ("mlflow", "torch._dynamo", "sklearn")

# Runs the CLI in a fresh interpreter and prints, last, which heavy modules it imported.
PROBE = textwrap.dedent("""
    import json, sys
    from cl.cli.main import main
    code = main(sys.argv[1:])
    print(json.dumps({"code": code, "imported": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,))


def probe(*argv, env=None, cwd=None) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def small(tmp_path, **changes):
    """Two experiences of Split-Digits, batches of 32, on the default device."""
    return tiny_experiment(tmp_path, **{"name": "fast-start", "device": None, "n_experiences": 2, "batch_size": 32,
                                        **changes})


@pytest.mark.parametrize("argv", [["strategies"], ["strategies", "ewc"], ["models"], ["describe", "{file}"]])
def test_listing_and_describing_import_neither_mlflow_nor_dynamo(argv, tmp_path):
    path = small(tmp_path)
    out = probe(*[a.format(file=path) for a in argv])
    assert out == {"code": 0, "imported": []}


def test_a_tracked_run_never_imports_mlflow_in_its_own_process(tmp_path, journal_dir):
    """The delivery child imports MLflow and opens the store; the run's process only writes its
    journals, and returns once the child has delivered them: the runs are FINISHED in the store."""
    import os

    path = small(tmp_path)
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"  # a fresh store, in a folder yet to be made
    out = probe("run", str(path), "--tracking-uri", uri, "--no-progress", env=dict(os.environ))
    assert out["code"] == 0 and "mlflow" not in out["imported"] and "sklearn" not in out["imported"]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("fast-start").experiment_id])
    assert sorted((r.data.tags.get("cl.role", "child"), r.info.status) for r in runs) == \
        [("child", "FINISHED"), ("parent", "FINISHED")]
    child = next(r for r in runs if r.data.tags.get("cl.role") != "parent")
    assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "acc_seen")) == [1, 2]
    assert {a.path for a in client.list_artifacts(child.info.run_id)} >= {"accuracy_matrix.png", "config.yaml"}
    assert not journal_dir.exists()  # every journal delivered, and removed


def test_delivery_from_the_child_stores_what_a_thread_stores(tmp_path, monkeypatch, capsys):
    """In one process, forcing each mode: the same metrics, steps and artifacts reach the store."""
    path = small(tmp_path)
    stores = {}
    for mode in ("thread", "process"):
        monkeypatch.setenv("CL_TRACKING_DELIVERY", mode)
        uri = f"sqlite:///{tmp_path / mode / 'mlflow.db'}"
        assert main(["run", str(path), "--tracking-uri", uri, "--no-progress", "--json"]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        client = MlflowClient(uri)
        run = client.get_run(result["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        # Times, speed and the process's memory are measurements of this run, not what was delivered.
        measured = ("samples_per_s", "peak_memory_bytes")
        history = {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)]
                   for k in run.data.metrics if not k.endswith("time_s") and k not in measured}
        stores[mode] = (history, sorted(a.path for a in client.list_artifacts(run.info.run_id)),
                        {k: v for k, v in run.data.params.items()})
    assert stores["thread"] == stores["process"]


def test_an_unknown_store_scheme_is_refused_before_anything_trains(tmp_path, capsys):
    path = small(tmp_path)
    assert main(["run", str(path), "--tracking-uri", "mlfow://typo", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "could not be opened" in err and "'mlfow'" in err


def test_a_bad_delivery_mode_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CL_TRACKING_DELIVERY", "fork")
    path = small(tmp_path)
    assert main(["run", str(path), "--no-progress", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    assert "CL_TRACKING_DELIVERY" in capsys.readouterr().err


def test_digits_are_scikit_learns_bundled_digits_split_stratified_and_fixed():
    from sklearn.datasets import load_digits

    images, target = _digits_arrays()
    bunch = load_digits()
    assert np.array_equal(images, bunch.images) and np.array_equal(target, bunch.target)
    first, again = digits(), digits()
    assert len(first.train) == 1347 and len(first.test) == 450
    assert np.array_equal(first.test.y.numpy(), again.test.y.numpy())
    assert np.array_equal(first.test.x.numpy(), again.test.x.numpy())
    counts = np.bincount(first.test.y.numpy(), minlength=10)
    per_class = np.bincount(target, minlength=10)
    assert np.array_equal(counts, np.round(per_class * 0.25).astype(int))  # a quarter of each class


def test_mlflow_imported_mid_invocation_keeps_every_run_with_the_delivery_child(tmp_path, journal_dir):
    """`--log-model` imports MLflow into the run's process after the first run started with the
    delivery child; the second run (and the parent) must still be delivered by that child."""
    import os

    path = small(tmp_path, strategies=None, runs={"a": ["naive"], "b": ["naive"]})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "CL_TRACKING_DELIVERY"}
    out = probe("run", str(path), "--tracking-uri", uri, "--no-progress", "--log-model", env=env)
    assert out["code"] == 0
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("fast-start").experiment_id])
    assert sorted((r.data.tags.get("cl.role", "child"), r.info.status) for r in runs) == \
        [("child", "FINISHED"), ("child", "FINISHED"), ("parent", "FINISHED")]
    for run in runs:
        if run.data.tags.get("cl.role") != "parent":
            assert "model" in {a.path for a in client.list_artifacts(run.info.run_id)}
