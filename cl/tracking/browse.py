"""Reading results back from an MLflow store: `cl compare` and `cl ui`.

Runs are read by experiment name, by parent run, or by an MLflow filter string, and
grouped by their `strategy` tag over their `seed` tags, so runs logged by earlier
versions of the lab (flat runs, no parent) compare the same way.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from cl.tracking.store import TrackingError, quiet_mlflow, sqlite_store_lock


def _client(tracking_uri: str | None):
    """A client of the store; a local SQLite store that does not exist yet is created whole,
    under its lock, as every other opener of the lab creates it (`sqlite_store_lock`)."""
    from mlflow.tracking import MlflowClient

    quiet_mlflow()
    with sqlite_store_lock(tracking_uri):
        return MlflowClient(tracking_uri)


def find_runs(tracking_uri: str | None, experiment: str | None = None, parent: str | None = None,
              filter_string: str = "", statuses: tuple[str, ...] = ("FINISHED",)):
    """The child runs (never a parent) of `experiment`, or of the parent run `parent`, that
    match `filter_string`, in the store at `tracking_uri`."""
    if experiment is None and parent is None:
        raise ValueError("name an experiment, or give --parent RUN_ID")
    client = _client(tracking_uri)
    where = tracking_uri or "(default store)"
    filters = [f for f in (filter_string,) if f]
    if parent is not None:
        try:
            experiment_ids = [client.get_run(parent).info.experiment_id]
        except Exception as err:  # MLflow raises its own exception type for a missing run
            raise ValueError(f"no run {parent} in {where}: {err}") from None
        filters.append(f"tags.mlflow.parentRunId = '{parent}'")
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = [e.name for e in client.search_experiments(max_results=50)]
            raise ValueError(f"no experiment '{experiment}' in {where}; experiments: {', '.join(names) or 'none'}")
        experiment_ids = [exp.experiment_id]
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, " and ".join(filters), max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    runs = [r for r in runs if r.data.tags.get("cl.role") != "parent" and r.info.status in statuses]
    if parent is None:  # a sweep's trials (validation scores, other hyperparameters) only with --parent
        runs = [r for r in runs if "cl.trial" not in r.data.tags]
    return sorted(runs, key=lambda r: r.info.start_time or 0)  # the order they ran: the file's order


def entries(runs, with_artifacts: bool = False, tracking_uri: str | None = None) -> list[dict]:
    """Runs as `evaluation.compare` takes them. With artifacts, each run's matrices and
    periodic-evaluation curve are read too (for the plots)."""
    client = _client(tracking_uri) if with_artifacts else None
    out = []
    for r in runs:
        entry = {"strategy": r.data.tags.get("strategy") or r.info.run_name, "seed": _int(r.data.tags.get("seed")),
                 "metrics": dict(r.data.metrics), "run_id": r.info.run_id}
        if with_artifacts:
            entry.update(_artifacts(client, r.info.run_id))
        out.append(entry)
    return out


def _int(text):
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def _artifacts(client, run_id: str) -> dict:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file drowns the table
    with tempfile.TemporaryDirectory() as tmp:
        names = {a.path for a in client.list_artifacts(run_id)}
        out = {}
        if "matrices.json" in names:
            blob = json.loads(Path(client.download_artifacts(run_id, "matrices.json", tmp)).read_text())
            out["matrices"] = {k: v["matrix"] for k, v in blob.items()}
        elif "accuracy_matrix.json" in names:  # runs of the lab's first versions
            blob = json.loads(Path(client.download_artifacts(run_id, "accuracy_matrix.json", tmp)).read_text())
            out["matrices"] = {"acc": blob["accuracy_matrix"]}
        if "curve.json" in names and out.get("matrices"):
            curve = json.loads(Path(client.download_artifacts(run_id, "curve.json", tmp)).read_text())
            key = next(iter(out["matrices"]))
            out["curve"] = [[p["iteration"], p.get(f"{key}_seen", math.nan)] for p in curve]
    return out


def serve_ui(tracking_uri: str | None, port: int, experiment: str | None = None) -> int:
    """Start the MLflow UI on the store and print each experiment's link, opened on its
    training view; returns when the UI is stopped (Ctrl-C)."""
    import mlflow

    from cl.tracking import views
    from cl.tracking.store import run_link

    uri = tracking_uri or mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        raise ValueError(f"{uri} is a tracking server already: open it in a browser")
    client = _client(uri)
    try:
        experiments = client.search_experiments(max_results=100)
    except Exception as err:
        raise TrackingError(f"MLflow store {uri} could not be opened: {type(err).__name__}: {err}") from None
    if experiment is not None:
        experiments = [e for e in experiments if e.name == experiment]
        if not experiments:
            raise ValueError(f"no experiment '{experiment}' in {uri}")
    base = f"http://127.0.0.1:{port}"
    for e in experiments:
        if e.name != "Default" or experiment is not None:
            # The newest `cl run`'s view of the runs list (its children, best first, the comparison's
            # columns shown), where there is one; else the experiment's runs list as MLflow opens it.
            newest = views.lab_views(e.tags or {})
            link = views.link(base, e.experiment_id, newest[0]) if newest else run_link(base, e.experiment_id, None)
            print(f"{e.name}: {link}")
    sys.stdout.flush()
    # One worker and no job runner: browsing needs neither four workers nor the GenAI job
    # queue (eight more processes). Its own process group, so stopping `cl ui` stops them all.
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    server = subprocess.Popen(cmd, env=env, start_new_session=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


def _interrupt(signum, frame):
    raise KeyboardInterrupt
