"""Tracking sinks: the trainer emits records, sinks write them.

`MLflowSink` writes one MLflow run from a background thread, in batches, so
the training path never waits on the tracking store; `close()` waits for the
queue to drain and marks the run FINISHED or FAILED. `ConsoleSink` prints a
line per experience.
"""
from __future__ import annotations

import json
import math
import os
import queue
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

MAX_PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch call
MAX_PARAM_LENGTH = 6000


class TrackingError(RuntimeError):
    """The tracking store could not be written; the message names the store and the cause."""


class ConsoleSink:
    """One line per evaluated experience on stderr (the scores on the tasks seen so far and
    the training loss), written through tqdm so progress bars stay intact."""

    def __init__(self, label: str):
        self.label = label

    def log_metrics(self, metrics: dict[str, float], step: int, kind: str = "evaluation") -> None:
        if kind != "evaluation" or step == 0:
            return
        shown = {k: v for k, v in metrics.items() if (k.endswith("_seen") or k == "train_loss") and math.isfinite(v)}
        line = f"[{self.label}] experience {step}: " + " ".join(f"{k}={v:.4f}" for k, v in shown.items())
        if "train_loss" in metrics and not math.isfinite(metrics["train_loss"]):
            line += " (nothing trained in this experience)"
        tqdm.write(line, file=sys.stderr)


class MLflowSink:
    """Writes one MLflow run. Calls enqueue and return at once; a worker thread talks to the store."""

    def __init__(self, experiment_name: str, run_name: str, params: dict[str, object], tags: dict[str, str],
                 tracking_uri: str | None = None, resume_run_id: str | None = None,
                 parent: "MLflowSink | None" = None, system_metrics_s: float | None = None):
        self.tracking_uri = tracking_uri
        self._system_metrics_s = system_metrics_s  # sample CPU/GPU use and memory this often (needs psutil)
        self.experiment_id: str | None = None
        self._parent = parent  # this run is nested under the parent's in the MLflow UI
        self.blocked_s = 0.0  # time the caller spent in this sink: what tracking costs the run
        self._queue: queue.Queue = queue.Queue()
        self._run_id: str | None = resume_run_id
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="mlflow-sink", daemon=True,
                                        args=(experiment_name, run_name, params, tags))
        self._thread.start()

    # ------------------------------------------------------------ caller side
    def _put(self, item) -> None:
        t = time.perf_counter()
        self._queue.put(item)
        self.blocked_s += time.perf_counter() - t

    def log_metrics(self, metrics: dict[str, float], step: int, kind: str = "evaluation") -> None:
        self._put(("metrics", metrics, step))

    def log_artifact(self, name: str, data: bytes | str) -> None:
        self._put(("artifact", name, data))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._put(("tags", tags))

    def log_inputs(self, inputs: list[dict]) -> None:
        """Datasets the run trained or was tested on, each {name, digest, source, context,
        profile}: MLflow's Dataset column and the run's Datasets section."""
        self._put(("inputs", inputs))

    def log_model(self, model) -> None:
        """The trained model as an MLflow model (PyTorch flavour) under the run's `model/`:
        `mlflow.pytorch.load_model("runs:/<run id>/model")` loads it back."""
        self._put(("model", model))

    def log_table(self, name: str, data: dict[str, list]) -> None:
        """A table of columns, shown by MLflow's artifact viewer (`MlflowClient.log_table`)."""
        self._put(("table", name, data))

    @property
    def failed(self) -> bool:
        return self._error is not None

    @property
    def run_id(self) -> str:
        t = time.perf_counter()
        self._ready.wait()
        self.blocked_s += time.perf_counter() - t
        if self._error is not None:
            raise self._failure()
        return self._run_id

    def close(self, status: str = "FINISHED") -> str:
        """Flush everything, end the run with `status`, and return its id."""
        t = time.perf_counter()
        if not self._closed:
            self._closed = True
            self._queue.put(("end", status))
            self._thread.join()
        self.blocked_s += time.perf_counter() - t
        if self._error is not None:
            raise self._failure()
        return self._run_id

    def _failure(self) -> TrackingError:
        return TrackingError(f"MLflow store {self.tracking_uri or '(default)'} could not be written: "
                             f"{type(self._error).__name__}: {self._error}")

    # ------------------------------------------------------------ worker side
    def _work(self, experiment_name, run_name, params, tags) -> None:
        try:
            from mlflow.entities import Metric, Param, RunTag
            from mlflow.tracking import MlflowClient

            _quiet_mlflow()
            client = MlflowClient(self.tracking_uri)
            if self._parent is not None:
                tags = {**tags, "mlflow.parentRunId": self._parent.run_id}
            if self._run_id is None:
                with sqlite_store_lock(self.tracking_uri):  # sweeps started together create one experiment
                    exp = client.get_experiment_by_name(experiment_name)
                    exp_id = exp.experiment_id if exp else client.create_experiment(experiment_name)
                run = client.create_run(exp_id, run_name=run_name, tags=tags)
                self._run_id, self.experiment_id = run.info.run_id, exp_id
                items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
                for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
                    client.log_batch(self._run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])
            else:
                client.update_run(self._run_id, status="RUNNING")
                self.experiment_id = client.get_run(self._run_id).info.experiment_id
        except BaseException as err:  # reported to the caller at run_id/close
            self._error = err
            self._ready.set()
            self._drain()
            return
        monitor = self._start_system_metrics()
        self._ready.set()
        while True:
            item = self._queue.get()
            try:
                kind = item[0]
                if kind == "end":
                    if monitor is not None:
                        monitor.finish()
                    client.set_terminated(self._run_id, item[1])
                    return
                if kind == "metrics":
                    _, metrics, step = item
                    now = int(time.time() * 1000)
                    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
                    client.log_batch(self._run_id, metrics=batch)
                elif kind == "tags":
                    client.log_batch(self._run_id, tags=[RunTag(k, str(v)) for k, v in item[1].items()])
                elif kind == "inputs":
                    client.log_inputs(self._run_id, datasets=[_dataset_input(d) for d in item[1]])
                elif kind == "model":
                    _log_model(client, self._run_id, item[1])
                elif kind == "table":
                    client.log_table(self._run_id, data=item[2], artifact_file=item[1])
                elif kind == "artifact":
                    _, name, data = item
                    with tempfile.TemporaryDirectory() as tmp:
                        path = Path(tmp) / name
                        path.write_bytes(data if isinstance(data, bytes) else data.encode())
                        client.log_artifact(self._run_id, str(path))
            except BaseException as err:
                self._error = err
                self._drain()
                return

    def _start_system_metrics(self):
        """MLflow's system-metrics monitor on this run (system/cpu_utilization_percentage,
        system/system_memory_usage_megabytes, GPU figures where there is a GPU), or None."""
        if not self._system_metrics_s:
            return None
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(self._run_id, sampling_interval=self._system_metrics_s,
                                           samples_before_logging=1, tracking_uri=self.tracking_uri)
            monitor.start()
            return monitor
        except ImportError as err:  # psutil missing: the run goes on without them, and says so
            print(f"cl: warning: no system metrics: {err} (pip install psutil)", file=sys.stderr)
            return None

    def _drain(self) -> None:
        # After a failure keep accepting items so callers never block, until the end marker.
        while True:
            if self._queue.get()[0] == "end":
                return


def _log_model(client, run_id: str, model) -> None:
    import mlflow.pytorch
    import torch

    import cl

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        # Requirements named, not inferred: inference imports and probes for seconds.
        # Pickled, which any model allows: MLflow 3's default, a traced pt2 graph, needs an input example.
        mlflow.pytorch.save_model(model, str(path), serialization_format="pickle",
                                  pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"cl-lab=={cl.__version__}"])
        client.log_artifacts(run_id, str(path), "model")


def _dataset_input(d: dict):
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = Dataset(name=d["name"], digest=d["digest"], source_type=d.get("source_type", "local"),
                      source=json.dumps({"uri": d["source"]}), profile=json.dumps(d.get("profile", {})))
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, d["context"])])


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
    with open(path + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class StoreWarmup:
    """Imports MLflow and opens (creating if needed) the tracking store on a thread,
    so the seconds this takes the first time overlap with loading the data."""

    def __init__(self, tracking_uri: str | None):
        self.tracking_uri = tracking_uri
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="mlflow-warmup", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            from mlflow.tracking import MlflowClient

            _quiet_mlflow()
            with sqlite_store_lock(self.tracking_uri):
                MlflowClient(self.tracking_uri).search_experiments(max_results=1)
        except BaseException as err:
            self._error = err

    def wait(self) -> float:
        """Block until the store is ready; return the seconds spent waiting."""
        t = time.perf_counter()
        self._thread.join()
        if self._error is not None:
            raise TrackingError(f"MLflow store {self.tracking_uri or '(default)'} could not be opened: "
                                f"{type(self._error).__name__}: {self._error}")
        return time.perf_counter() - t


UI_PORT = 5000  # where `cl ui` serves a local store


def run_link(tracking_uri: str | None, experiment_id: str | None, run_id: str | None) -> str:
    """The MLflow UI's page of a run, opened on its training view (`workflowType=machine_learning`:
    MLflow 3 otherwise opens an experiment on an empty GenAI overview). A local store is shown by
    `cl ui`, on its default address."""
    base = tracking_uri.rstrip("/") if tracking_uri and tracking_uri.startswith(("http://", "https://")) \
        else f"http://127.0.0.1:{UI_PORT}"
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/{page}?workflowType=machine_learning"


def _quiet_mlflow() -> None:
    """MLflow logs at INFO on import ("Creating initial MLflow database tables..."); a run's
    output is the lab's own lines and the result. Its warnings and errors still show."""
    import logging

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def default_tracking_uri() -> str | None:
    """`MLFLOW_TRACKING_URI` if set, else None: MLflow's own default (./mlflow.db)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or None
