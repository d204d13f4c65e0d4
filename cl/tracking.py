"""Tracking sinks: the trainer emits records, sinks write them.

`MLflowSink` writes one MLflow run through its journal (`cl.journal`): records go
to local disk first and a background thread delivers them, so the training path
never waits on the tracking store and a store that is down loses nothing;
`close()` waits, bounded by the sink's timeout, until every record is in the
store. `ConsoleSink` prints a line per experience.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from cl.journal import BLOBS, Journal

MAX_PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch call
MAX_PARAM_LENGTH = 6000
# How long a store may fail before the user is told what waits, and how long a run's end
# waits for it: `--tracking-timeout`, or CL_TRACKING_TIMEOUT.
DEFAULT_TIMEOUT_S = float(os.environ.get("CL_TRACKING_TIMEOUT") or 5.0)


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
    """One MLflow run, written through its journal: calls append a record and return at
    once; a worker thread delivers the records in order, retrying with backoff while the
    store does not answer. Nothing is dropped: what cannot be delivered stays in the
    journal (`cl sync` delivers it later). `parent`: the parent run's sink, or the key of a
    parent another process opened (a sweep's trials)."""

    def __init__(self, journal: Journal, experiment_name: str, run_name: str, params: dict[str, object],
                 tags: dict[str, str], tracking_uri: str | None = None, parent: "MLflowSink | str | None" = None,
                 system_metrics_s: float | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 remove_when_delivered: bool = False):
        self.journal, self.tracking_uri, self.timeout = journal, tracking_uri, timeout
        self.blocked_s = 0.0  # time the caller spent in this sink: what tracking costs the run
        self._remove = remove_when_delivered
        self._resumed = journal.created
        if not journal.created:
            journal.append("create", experiment=experiment_name, name=run_name, tracking_uri=tracking_uri,
                           params={k: str(v)[:MAX_PARAM_LENGTH] for k, v in params.items()},
                           tags={**tags, "cl.run_key": journal.state["key"]},
                           parent_key=parent if isinstance(parent, str) or parent is None else parent.journal.state["key"])
        # A resumed run that had ended runs again from its first new record on; until then it
        # stays as it was (a resume refused before anything ran must not touch it).
        self._reopen = journal.ended is not None
        local_parent = parent if isinstance(parent, MLflowSink) else None  # else a key: another process's
        from cl import delivery

        # A child run is delivered where its parent run is (the child's creation needs the parent's id).
        if local_parent is not None:
            service = getattr(local_parent._deliverer, "service", None)
        else:
            service = delivery.service(tracking_uri, timeout)
        self._deliverer: DeliveryWorker
        if service is not None:  # MLflow is imported and the store opened in a child process
            self._deliverer = service.watch(journal, tracking_uri, local_parent.journal if local_parent else None,
                                            timeout, system_metrics_s, self._resumed)
        else:  # on a thread of this process
            self._deliverer = ThreadDelivery(journal, tracking_uri, local_parent._deliverer if local_parent else None,
                                             timeout, system_metrics_s, self._resumed)

    # ------------------------------------------------------------ caller side
    def _append(self, op: str, **fields) -> None:
        t = time.perf_counter()
        if self._reopen:
            self._reopen = False
            self.journal.append("status", status="RUNNING")
        self.journal.append(op, **fields)
        self.blocked_s += time.perf_counter() - t

    def log_metrics(self, metrics: dict[str, float], step: int, kind: str = "evaluation") -> None:
        self._append("metrics", metrics={k: float(v) for k, v in metrics.items()}, step=int(step))

    def log_artifact(self, name: str, data: bytes | str) -> None:
        t = time.perf_counter()
        path = self.journal.blob(name, data)
        self.blocked_s += time.perf_counter() - t
        self._append("artifact", path=path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._append("tags", tags={k: str(v) for k, v in tags.items()})

    def log_inputs(self, inputs: list[dict]) -> None:
        """Datasets the run trained or was tested on, each {name, digest, source, context,
        profile}: MLflow's Dataset column and the run's Datasets section."""
        self._append("inputs", inputs=inputs)

    def log_model(self, model) -> None:
        """The trained model as an MLflow model (PyTorch flavour) under the run's `model/`:
        `mlflow.pytorch.load_model("runs:/<run id>/model")` loads it back. Saved into the
        journal now, delivered like any artifact."""
        t = time.perf_counter()
        folder = self.journal.folder / BLOBS / f"model-{len(self.journal.records)}"
        _save_model(model, folder / "model")
        self.blocked_s += time.perf_counter() - t
        self._append("artifact", path=str((folder / "model").relative_to(self.journal.folder)))

    def log_table(self, name: str, data: dict[str, list]) -> None:
        """A table of columns, shown by MLflow's artifact viewer (`MlflowClient.log_table`)."""
        self._append("table", name=name, data=data)

    @property
    def untouched(self) -> bool:
        """A resumed run that ended before and has been given nothing new."""
        return self._reopen

    def abandon(self) -> None:
        """Leave the run as it was: append nothing, stop delivering (what is pending stays in the
        journal for the next resume or `cl sync`), let the journal go."""
        self._deliverer.stop()
        self.journal.close()

    def checkpointed(self) -> None:
        """Called before a checkpoint is written: every record up to it is on disk."""
        self.journal.sync()

    @property
    def run_id(self) -> str | None:
        """The MLflow run's id once it exists in the store (None before)."""
        return self.journal.state.get("run_id")

    @property
    def experiment_id(self) -> str | None:
        return self.journal.state.get("experiment_id")

    @property
    def failing(self) -> BaseException | None:
        """The store's last error while records are waiting, else None."""
        return self._deliverer.error if self.journal.pending else None

    def close(self, status: str = "FINISHED", result: dict | None = None, **fields) -> str | None:
        """End the run with `status` and wait until every record is delivered, but no longer
        than the sink's timeout once the store stops answering. Returns the run's id; raises
        `TrackingError` (what is pending, where, and why) if records are left waiting."""
        t = time.perf_counter()
        self._append("end", status=status, **({"result": result} if result is not None else {}), **fields)
        worker = self._deliverer
        with self.journal.changed:
            while not self.journal.complete and worker.alive:
                failing = worker.failing_for()
                if failing is not None and failing >= self.timeout * (1 if worker.outage else 10):
                    break
                self.journal.changed.wait(0.05)
        self.blocked_s += time.perf_counter() - t
        # Delivered or not, the worker stops: what is left waits in the journal for `cl sync`,
        # and the two never deliver one journal at once.
        worker.stop()
        if self.journal.complete:
            run_id = self.run_id
            if self._remove:
                self.journal.remove()
            else:
                self.journal.close()  # kept beside the checkpoints; no longer this process's
            return run_id
        notice = worker.pending_notice()
        self.journal.close()  # `cl sync` may own it now
        raise TrackingError(notice)


class DeliveryWorker(Protocol):
    """What a sink asks of whoever delivers its journal: `ThreadDelivery` here, or
    `cl.delivery.ChildDelivery` (the delivery child)."""

    error: BaseException | None  # the store's last error, None once a delivery succeeds

    @property
    def alive(self) -> bool: ...  # still delivering

    @property
    def outage(self) -> bool: ...  # the store does not answer (a run's end waits 1x the timeout, not 10x)

    def failing_for(self) -> float | None: ...  # seconds the store has been failing, or None

    def pending_notice(self) -> str: ...  # what waits, where, and how to deliver it

    def stop(self) -> None: ...  # stop after the attempt under way and let the journal go


class ThreadDelivery:
    """Delivers one journal from a thread of this process (the sink's worker)."""

    def __init__(self, journal: Journal, tracking_uri: str | None, parent: "ThreadDelivery | None",
                 timeout: float, system_metrics_s: float | None, resumed: bool):
        self.journal, self.timeout = journal, timeout
        self.deliverer = Deliverer(journal, tracking_uri, parent.journal if parent else None)
        self.deliverer.parent_deliverer = parent.deliverer if parent else None
        self._stopped = False
        self._thread = threading.Thread(target=deliver_loop, name="mlflow-sink", daemon=True,
                                        args=(self.deliverer, timeout, lambda: self._stopped, system_metrics_s, resumed))
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def error(self) -> BaseException | None:
        return self.deliverer.error

    @property
    def outage(self) -> bool:
        return self.deliverer.outage

    def failing_for(self) -> float | None:
        return self.deliverer.failing_for()

    def pending_notice(self) -> str:
        return self.deliverer.pending_notice()

    def stop(self) -> None:
        """Stop after the attempt under way (bounded by the store's timeout)."""
        self._stopped = True
        with self.journal.changed:
            self.journal.changed.notify_all()
        self._thread.join(timeout=self.timeout)


def deliver_loop(deliverer: "Deliverer", timeout: float, stopped, system_metrics_s: float | None = None,
                 resumed: bool = False, on_attempt=None) -> None:
    """Deliver a journal's records as they come, until `stopped()`: retries with backoff while
    the store fails, says once per outage (within `timeout`) what waits and where, and runs
    MLflow's system-metrics monitor on the run while it is open. `on_attempt()` after each
    attempt to deliver (the delivery child reports its progress there)."""
    journal = deliverer.journal
    deliverer.should_stop = stopped  # checked between records: a stop comes after the record under way
    monitor, told, backoff, parent_wait = None, False, 0.5, 0.01
    while True:
        with journal.changed:
            while not journal.pending and not stopped():
                journal.changed.wait()
            if stopped():  # closed: delivered, or left to `cl sync`
                break
        delivered = deliverer.deliver()
        if on_attempt is not None:
            on_attempt()
        if delivered:
            told, backoff, parent_wait = False, 0.5, 0.01
            run_id = journal.state.get("run_id")
            if monitor is None and system_metrics_s and run_id:
                monitor = _start_system_metrics(run_id, system_metrics_s, deliverer.tracking_uri, resume=resumed)
            if monitor is not None and journal.ended is not None:
                try:
                    monitor.finish()
                except Exception as err:  # never the reason a run's records stop
                    print(f"cl: warning: system metrics: {err}", file=sys.stderr)
                monitor = None
            with journal.changed:
                journal.changed.notify_all()
            continue
        if stopped():
            break
        failing = deliverer.failing_for() or 0.0
        patience = timeout * (1 if deliverer.outage else 10)
        if not told and failing >= patience:  # said once per outage, within the timeout
            print(f"cl: warning: {deliverer.pending_notice()}; training goes on", file=sys.stderr)
            told = True
        if isinstance(deliverer.error, ParentNotCreated):  # created any moment now, or held up
            time.sleep(parent_wait)
            parent_wait = min(parent_wait * 2, 0.2)
            continue
        if not deliverer.outage:  # a lock: try again soon
            time.sleep(0.1)
            continue
        time.sleep(min(backoff, max(timeout / 4, 0.05)) if not told else backoff)
        backoff = min(backoff * 2, 5.0)  # a server back up is found within seconds


class Deliverer:
    """Delivers a journal's pending records to the store, in order, noting progress in the
    journal; shared by the sink's worker and `cl sync`."""

    def __init__(self, journal: Journal, tracking_uri: str | None, parent: Journal | None = None):
        self.journal, self.tracking_uri, self.parent = journal, tracking_uri, parent
        self.error: BaseException | None = None
        self.parent_deliverer: Deliverer | None = None  # set by the sink: whose failure a child's wait is
        self.should_stop = lambda: False  # set by the delivery loop
        self._failing_since: float | None = None
        self._client = None

    def failing_for(self) -> float | None:
        """Seconds the store has been failing this journal's deliveries, or None. Waiting for
        the parent run to exist is not a failure of this journal's: the parent's counts."""
        if self._failing_since is None:
            return None
        if isinstance(self.error, ParentNotCreated) and self.parent_deliverer is not None:
            return self.parent_deliverer.failing_for()
        return time.monotonic() - self._failing_since

    @property
    def outage(self) -> bool:
        """The store does not answer at all (a server down), as against answering slowly or
        with a lock held by another process (a busy SQLite store): an outage ends a run's
        wait for delivery after the timeout, contention is waited out (up to 10 times it)."""
        return self.error is not None and _unanswered(self.error)

    def pending_notice(self) -> str:
        err = self.error
        if isinstance(err, ParentNotCreated) and self.parent_deliverer is not None and self.parent_deliverer.error:
            err = self.parent_deliverer.error  # the reason the parent is not there
        return (f"MLflow store {self.tracking_uri or '(default)'} is not answering "
                f"({type(err).__name__}: {err}); {self.journal.pending} record(s) wait in "
                f"{self.journal.folder}, delivered when it answers, or by `cl sync {self.journal.folder}`")

    def deliver(self) -> bool:
        """Deliver everything pending; True if nothing is left. A record the store refuses
        for good (a changed parameter value, say) is reported and passed over."""
        try:
            if self._client is None:
                from mlflow.tracking import MlflowClient

                _quiet_mlflow()
                # Opening a fresh store creates its schema: under the store's lock, or processes
                # started together (and the delivery child's warm-up) race to migrate it.
                with sqlite_store_lock(self.tracking_uri):
                    self._client = MlflowClient(self.tracking_uri)
            while self.journal.pending:
                if self.should_stop():
                    return False
                self._deliver_next()
        except Exception as err:  # the store is down, locked, or refused: try again later
            self.error = err
            if self._failing_since is None:
                self._failing_since = time.monotonic()
            return False
        self.error, self._failing_since = None, None
        return True

    def _deliver_next(self) -> None:
        from mlflow.entities import Metric, RunTag

        journal, client = self.journal, self._client
        i = journal.state["delivered"]
        record = journal.records[i]
        op, run_id = record["op"], journal.state.get("run_id")
        if op == "create":
            self._create(record)
            return
        if run_id is None:
            raise TrackingError(f"{journal.folder}: a record before the run's creation")
        try:
            if op == "metrics" and len(record["metrics"]) > 1000:  # MLflow takes 1000 per batch at most
                items = [Metric(k, v, record["time"], record["step"]) for k, v in record["metrics"].items()]
                for k in range(0, len(items), 1000):
                    client.log_batch(run_id, metrics=items[k:k + 1000])
                journal.mark_delivered(i + 1)
                return
            if op == "metrics":  # consecutive metric records go as one batch
                batch, j = [], i
                while j < len(journal.records) and journal.records[j]["op"] == "metrics" and \
                        len(batch) + len(journal.records[j]["metrics"]) <= 1000:
                    r = journal.records[j]
                    batch += [Metric(k, v, r["time"], r["step"]) for k, v in r["metrics"].items()]
                    j += 1
                client.log_batch(run_id, metrics=batch)
                journal.mark_delivered(j)
                return
            if op == "tags":
                client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
            elif op == "status":
                client.update_run(run_id, status=record["status"])
            elif op == "inputs":
                client.log_inputs(run_id, datasets=[_dataset_input(d) for d in record["inputs"]])
            elif op == "table":
                client.log_table(run_id, data=record["data"], artifact_file=record["name"])
            elif op == "artifact":
                path = journal.folder / record["path"]
                if path.is_dir():
                    client.log_artifacts(run_id, str(path), path.name)
                else:
                    client.log_artifact(run_id, str(path))
            elif op == "end":
                client.set_terminated(run_id, record["status"], end_time=record["time"])
        except Exception as err:
            if not _refused(err):
                raise
            print(f"cl: warning: MLflow refused a '{op}' record of {journal.folder}: {err}", file=sys.stderr)
        journal.mark_delivered(i + 1)

    def _parent_id(self, experiment_id: str, parent_key: str) -> str:
        """The parent's run id: from its journal, else (a journal already delivered and
        removed) from the store, by the key it was tagged with."""
        parent_id = self.parent.state.get("run_id") if self.parent is not None else None
        if parent_id is None:
            found = _find_run(self._client, experiment_id, parent_key)
            if found is None:
                raise ParentNotCreated("the parent run is not in the store yet")
            parent_id = found.info.run_id
        return parent_id

    def _create(self, record: dict) -> None:
        from mlflow.entities import Param

        journal, client = self.journal, self._client
        tags = dict(record["tags"])
        run_id = journal.state.get("run_id")
        if run_id is None:
            with sqlite_store_lock(self.tracking_uri):  # processes started together create one experiment
                exp = client.get_experiment_by_name(record["experiment"])
                exp_id = exp.experiment_id if exp else client.create_experiment(
                    record["experiment"], artifact_location=artifacts_beside(self.tracking_uri, record["experiment"]))
            if record.get("parent_key"):
                tags["mlflow.parentRunId"] = self._parent_id(exp_id, record["parent_key"])
            # A process killed between creating the run and noting it: find that run again.
            run = _find_run(client, exp_id, tags["cl.run_key"]) or client.create_run(exp_id, run_name=record["name"], tags=tags,
                                                           start_time=record["time"])
            run_id = run.info.run_id
            journal.mark_delivered(journal.state["delivered"], run_id=run_id, experiment_id=exp_id)
        items = [Param(k, v) for k, v in record["params"].items()]
        for k in range(0, len(items), MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=items[k:k + MAX_PARAMS_PER_BATCH])
        journal.mark_delivered(journal.state["delivered"] + 1)


class ParentNotCreated(RuntimeError):
    """A child's creation waits for its parent's."""


def _find_run(client, experiment_id: str, key: str):
    found = client.search_runs([experiment_id], f"tags.`cl.run_key` = '{key}'", max_results=1)
    return found[0] if found else None


def _refused(err: BaseException) -> bool:
    """The store answered and said no to this record: sending it again would not help."""
    code = getattr(err, "error_code", None)
    return code in ("INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST", "INVALID_STATE")


def _start_system_metrics(run_id: str, every_s: float, tracking_uri: str | None, resume: bool = False):
    """MLflow's system-metrics monitor on a run (system/cpu_utilization_percentage,
    system/system_memory_usage_megabytes, GPU figures where there is a GPU), or None."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # A resumed run goes on from the steps it logged before, not from step 0 again.
        monitor = SystemMetricsMonitor(run_id, sampling_interval=every_s, samples_before_logging=1,
                                       tracking_uri=tracking_uri, resume_logging=resume)
        monitor.start()
        return monitor
    except Exception as err:  # psutil missing (or the monitor failing): the run goes on without them, and says so
        print(f"cl: warning: no system metrics: {err} (pip install psutil)", file=sys.stderr)
        return None


def _save_model(model, path: Path) -> None:
    import mlflow.pytorch
    import torch

    import cl

    # Pickled, which any model allows (MLflow 3's default, a traced pt2 graph, needs an input
    # example); requirements named, not inferred: inference imports and probes for seconds.
    mlflow.pytorch.save_model(model, str(path), serialization_format="pickle",
                              pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"cl-lab=={cl.__version__}"])


def _dataset_input(d: dict):
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = Dataset(name=d["name"], digest=d["digest"], source_type=d.get("source_type", "local"),
                      source=json.dumps({"uri": d["source"]}), profile=json.dumps(d.get("profile", {})))
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, d["context"])])


def artifacts_beside(uri: str | None, experiment: str) -> str | None:
    """Where a new experiment of a SQLite store keeps its artifacts: `mlruns/<experiment>/` beside
    the database, so a store and its plots stay together wherever `cl run` was started (MLflow's
    default is ./mlruns of the working directory). Other stores choose for themselves (None)."""
    if not uri or not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", experiment)
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns" / name).as_uri()


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

            _quiet_mlflow()
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
            if is_server(self.tracking_uri) and _unanswered(self._error):
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


def _unanswered(err: BaseException) -> bool:
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


def _quiet_mlflow() -> None:
    """MLflow logs at INFO on import ("Creating initial MLflow database tables..."); a run's
    output is the lab's own lines and the result. Its warnings and errors still show."""
    import logging

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def default_tracking_uri() -> str | None:
    """`MLFLOW_TRACKING_URI` if set, else None: MLflow's own default (./mlflow.db)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or None
