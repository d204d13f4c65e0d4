"""The tracking store: where MLflow keeps runs, how it is opened, checked and linked to.

Nothing here imports MLflow at module level: `cl run` checks a store's URI before it
imports anything heavy, and opens it on a thread (`StoreWarmup`) or in the delivery
child (`cl.tracking.delivery`) while the data loads.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from cl.config.names import file_name

# How long a store may fail before the user is told what waits, and how long a run's end
# waits for it: `--tracking-timeout`, or CL_TRACKING_TIMEOUT.
DEFAULT_TIMEOUT_S = float(os.environ.get("CL_TRACKING_TIMEOUT") or 5.0)


class TrackingError(RuntimeError):
    """The tracking store could not be written; the message names the store and the cause."""



def artifacts_beside(uri: str | None, experiment: str) -> str | None:
    """Where a new experiment of a SQLite store keeps its artifacts: `mlruns/<experiment>/` beside
    the database, so a store and its plots stay together wherever `cl run` was started (MLflow's
    default is ./mlruns of the working directory). Other stores choose for themselves (None)."""
    if not uri or not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    # A name is data: its folder is a safe, distinct file name (`..` or `a/b` never reach past mlruns/).
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns" / file_name(experiment)).as_uri()


@contextmanager
def sqlite_store_lock(uri: str | None):
    """Hold an exclusive lock on `<store>.lock` beside a local SQLite store while opening it.

    Processes started together on one fresh store (a seed sweep) would otherwise race to
    create and migrate its schema, and all but one fail ("table ... already exists", "online
    migration expected to match one row"). Other stores, and systems without `fcntl`, need
    no lock."""
    if uri is None:  # MLflow's own default, ./mlflow.db unless configured otherwise
        import mlflow

        uri = mlflow.get_tracking_uri()
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None
    if path is None or fcntl is None or path in ("", ":memory:"):
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # a store in a folder yet to be made
    with open(path + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class StoreWarmup:
    """Imports MLflow and opens (creating if needed) the tracking store on a thread,
    so the seconds this takes the first time overlap with loading the data."""

    def __init__(self, tracking_uri: str | None, timeout: float = DEFAULT_TIMEOUT_S):
        self.tracking_uri = tracking_uri
        self.unreachable: BaseException | None = None  # a server that does not answer (yet)
        self._error: BaseException | None = None
        if is_server(tracking_uri):
            bound_http_requests(timeout)
        self._thread = threading.Thread(target=self._work, name="mlflow-warmup", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            from mlflow.tracking import MlflowClient

            quiet_mlflow()
            with sqlite_store_lock(self.tracking_uri):
                MlflowClient(self.tracking_uri).search_experiments(max_results=1)
        except BaseException as err:
            self._error = err

    def wait(self) -> float:
        """Block until the store is ready; return the seconds spent waiting. A store that can
        never work (a malformed URI, a path that cannot be written) raises `TrackingError`
        naming it; a tracking server that does not answer is noted in `unreachable`, and the
        runs go on, their records waiting in their journals."""
        t = time.perf_counter()
        self._thread.join()
        if self._error is not None:
            if is_server(self.tracking_uri) and unanswered(self._error):
                self.unreachable = self._error
            else:
                raise TrackingError(f"MLflow store {self.tracking_uri or '(default)'} could not be opened: "
                                    f"{type(self._error).__name__}: {self._error}")
        return time.perf_counter() - t


# The schemes of the stores MLflow itself opens; plugins add theirs as `mlflow.tracking_store` entry points.
MLFLOW_SCHEMES = {"", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks",
                  "databricks-uc", "uc"}


def check_store_location(uri: str | None) -> None:
    """Refuse, without importing MLflow, a store URI no MLflow store has the scheme of, and a
    local SQLite store whose folder cannot be made or is not one: what would otherwise be found
    only once MLflow is imported in the delivery process, after training started."""
    if not uri:
        return
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme not in MLFLOW_SCHEMES:
        from importlib.metadata import entry_points

        plugins = {e.name for e in entry_points(group="mlflow.tracking_store")}
        if scheme not in plugins:
            raise TrackingError(f"MLflow store {uri} could not be opened: no MLflow store has the scheme "
                                f"'{scheme}' (known: {', '.join(sorted(MLFLOW_SCHEMES - {''} | plugins))})")
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return
    path = Path(uri[len("sqlite:///"):])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder")
    except OSError as err:
        raise TrackingError(f"MLflow store {uri} could not be opened: {type(err).__name__}: {err}") from None


def is_server(tracking_uri: str | None) -> bool:
    return bool(tracking_uri) and tracking_uri.startswith(("http://", "https://"))


def unanswered(err: BaseException) -> bool:
    """A server that is down or overloaded, not one that refuses: worth waiting for."""
    import requests

    if isinstance(err, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return True
    text = str(err)
    return any(s in text for s in ("Max retries exceeded", "Connection refused", "timed out", "503", "502"))


def bound_http_requests(timeout: float) -> None:
    """MLflow's REST client retries a dead server for minutes (7 retries with backoff) before
    it says anything; the sink retries on its own, so each request gets one try of at most
    `timeout` seconds. A user's own settings win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(timeout))))


UI_PORT = 5000  # where `cl ui` serves a local store


def run_link(tracking_uri: str | None, experiment_id: str | None, run_id: str | None) -> str:
    """The MLflow UI's page of a run, opened on its training view (`workflowType=machine_learning`:
    MLflow 3 otherwise opens an experiment on an empty GenAI overview). A local store is shown by
    `cl ui`, on its default address."""
    base = tracking_uri.rstrip("/") if tracking_uri and tracking_uri.startswith(("http://", "https://")) \
        else f"http://127.0.0.1:{UI_PORT}"
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/{page}?workflowType=machine_learning"


def quiet_mlflow() -> None:
    """MLflow logs at INFO on import ("Creating initial MLflow database tables..."); a run's
    output is the lab's own lines and the result. Its warnings and errors still show."""
    import logging

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def default_tracking_uri() -> str | None:
    """`MLFLOW_TRACKING_URI` if set, else None: MLflow's own default (./mlflow.db)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or None
