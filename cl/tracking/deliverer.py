"""Delivering a journal to the store: `Deliverer` sends a journal's records to MLflow in
order, once each; `deliver_loop` retries it with backoff; `ThreadDelivery` runs that loop
on a thread of this process (the delivery child, `cl.tracking.delivery`, runs it in its own).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Protocol

from cl.tracking.journal import SKIPPED, Journal
from cl.tracking.store import (TrackingError, artifacts_beside, one_line, quiet_mlflow, sqlite_store_lock,
                              storage_notice, storage_problem, unanswered)

log = logging.getLogger(__name__)

MAX_PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch call

class DeliveryWorker(Protocol):
    """What a sink asks of whoever delivers its journal: `ThreadDelivery` here, or
    `cl.tracking.delivery.ChildDelivery` (the delivery child)."""

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
                    log.warning(f"system metrics: {err}")
                monitor = None
            with journal.changed:
                journal.changed.notify_all()
            continue
        if stopped():
            break
        failing = deliverer.failing_for() or 0.0
        patience = timeout * (1 if deliverer.outage else 10)
        if not told and failing >= patience:  # said once per outage, within the timeout
            log.warning(f"{deliverer.pending_notice()}; training goes on")
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
        self.refused: list[str] = []  # what of the journal was refused (an artifact outside its folder), one line each

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
        """The store does not answer at all (a server down) or cannot take records until someone
        acts (its disk full, read-only), as against answering slowly or with a lock held by
        another process (a busy SQLite store): an outage is retried with backoff and ends a
        run's wait for delivery after the timeout; contention is waited out (up to 10 times it)."""
        return self.error is not None and (unanswered(self.error) or self._store_storage() is not None)

    def _store_storage(self) -> str | None:
        """The store's disk full or read-only (`storage_problem`), but not the journal's own: a
        journal whose folder cannot be written is the run's error to report, not the store's."""
        err = self.error
        filename = getattr(err, "filename", None)
        if filename and Path(filename).resolve().is_relative_to(self.journal.folder.resolve()):
            return None
        return storage_problem(err)

    def pending_notice(self) -> str:
        """What waits, where, and the command that delivers it to this store, in one line."""
        err = self.error
        if isinstance(err, ParentNotCreated) and self.parent_deliverer is not None and self.parent_deliverer.error:
            err = self.parent_deliverer.error  # the reason the parent is not there
        full = storage_notice(self.tracking_uri, err, self.journal.pending, self.journal.folder) \
            if self._store_storage() is not None else None
        if full is not None:
            return full
        target = f" --tracking-uri {self.tracking_uri}" if self.tracking_uri else ""
        return (f"MLflow store {self.tracking_uri or '(default)'} is not answering "
                f"({type(err).__name__}: {one_line(err)}); {self.journal.pending} record(s) wait in "
                f"{self.journal.folder}, delivered when it answers, or by `cl sync {self.journal.folder}{target}`")

    def deliver(self) -> bool:
        """Deliver everything pending; True if nothing is left. A record the store refuses
        for good (a changed parameter value, say) is reported and passed over."""
        try:
            if self._client is None:
                from mlflow.tracking import MlflowClient

                quiet_mlflow()
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
        if op == SKIPPED:  # a line that is not a record (copied to records.corrupt.jsonl)
            journal.mark_delivered(i + 1)
            return
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
                if self._refuse(i, record, _unsafe_name(record["name"])) is not None:  # a safe name
                    client.log_table(run_id, data=record["data"], artifact_file=record["name"])
            elif op == "artifact":
                path = self._refuse(i, record, _outside(journal.folder, record["path"]))
                if path is None:
                    pass
                elif path.is_dir():
                    client.log_artifacts(run_id, str(path), path.name)
                else:
                    client.log_artifact(run_id, str(path))
            elif op == "view":
                self._view(i, record, run_id)
            elif op == "end":
                client.set_terminated(run_id, record["status"], end_time=record["time"])
        except Exception as err:
            if not _refused(err):
                raise
            log.warning(f"MLflow refused a '{op}' record of {journal.folder}: {err}")
        journal.mark_delivered(i + 1)

    def _refuse(self, i: int, record: dict, problem: "str | Path"):
        """A journal names its files: `problem` (a reason) refuses record `i`, with a warning, and
        delivery goes on; else `problem` is the path to read, returned."""
        if isinstance(problem, Path):
            return problem
        what = record.get("path", record.get("name"))
        line = f"{self.journal.folder}: refused the '{record['op']}' record at line {i + 1} ({shown(what)}): {problem}"
        self.refused.append(line)
        log.warning(line)
        return None

    def _view(self, i: int, record: dict, run_id: str) -> None:
        """A saved view of the run's children (`cl.tracking.views`), set on the experiment the
        run is in, under a tag the lab names from the run: the record gives only the view's
        name and state. Then the lab's views of that experiment beyond the newest
        `views.KEEP` are deleted (never a tag of any other name)."""
        from cl.tracking import views

        client = self._client
        try:
            tag, value = views.seal(run_id, record["name"], record["state"], now_ms=record["time"])
        except ValueError as err:
            self._refuse(i, record, str(err))
            return
        experiment_id = client.get_run(run_id).info.experiment_id  # the run's own, whatever the journal says
        client.set_experiment_tag(experiment_id, tag, value)
        for old in views.beyond_kept(client.get_experiment(experiment_id).tags):
            client.delete_experiment_tag(experiment_id, old)

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


def _outside(folder: Path, name: str) -> "Path | str":
    """The file or folder an artifact record names, if it lies inside the journal's `folder`
    (links followed, every file of a folder too) and holds only plain files; else why not."""
    root = folder.resolve()
    if Path(name).is_absolute() or "\0" in name:
        return "an absolute path: an artifact is read only from inside the journal's folder"
    path = (folder / name).resolve()
    if not path.is_relative_to(root) or path == root:
        return "a path outside the journal's folder (through '..' or a link)"
    if not path.exists():
        return "no such file in the journal's folder"
    if path.is_dir():
        for parent, dirs, files in os.walk(path, followlinks=False):
            for entry in dirs + files:
                inner = Path(parent, entry)
                if not inner.resolve().is_relative_to(root):
                    return f"{inner.relative_to(folder)} links outside the journal's folder"
                if entry in files and not inner.resolve().is_file():
                    return f"{inner.relative_to(folder)} is not a plain file"
    elif not path.is_file():
        return "not a plain file"
    return path


def _unsafe_name(name: str) -> "Path | str":
    """A table's artifact name is a path inside the run's artifacts: no absolute path, no '..'."""
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or "\\" in name or ".." in parts or "\0" in name:
        return "a table's name must be a relative path inside the run's artifacts"
    return Path(name)


def shown(value, limit: int = 120) -> str:
    """A journal's text as shown to the user: on one line, not too long."""
    text = repr(value) if not isinstance(value, str) else value.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."


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
        log.warning(f"no system metrics: {err} (pip install psutil)")
        return None


def save_model(model, path: Path) -> None:
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
