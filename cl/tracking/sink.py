"""Tracking sinks: the trainer emits records, sinks write them.

`MLflowSink` writes one MLflow run through its journal (`cl.tracking.journal`): records go
to local disk first and a background worker delivers them, so the training path never
waits on the tracking store and a store that is down loses nothing; `close()` waits,
bounded by the sink's timeout, until every record is in the store. `ConsoleSink` prints
a line per experience.
"""
from __future__ import annotations

import math
import shutil
import sys
import threading
import time
from pathlib import Path

from tqdm import tqdm

from cl.tracking import delivery
from cl.tracking.deliverer import DeliveryWorker, ThreadDelivery, save_model
from cl.tracking.journal import BLOBS, Journal
from cl.tracking.store import DEFAULT_TIMEOUT_S, TrackingError

MAX_PARAM_LENGTH = 6000


class Interrupts:
    """The interrupts of this command (`cl.cli.main` counts them) and the journals they left
    undelivered. After the first, a run's end is still written and delivered (waited for as
    usual); after a second, nobody waits: the journals that still hold records are noted, for
    the command's last line to name."""

    def __init__(self):
        self._count = 0
        self._waiting: list[tuple[Path, int, str | None]] = []
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._count, self._waiting = 0, []

    def note(self) -> bool:
        """Count an interrupt; True for the first (which interrupts), False for later ones."""
        self._count += 1
        return self._count == 1

    @property
    def interrupted(self) -> bool:
        return self._count > 0

    @property
    def hurried(self) -> bool:
        """Interrupted again: stop waiting for delivery."""
        return self._count > 1

    def left(self, folder: Path, pending: int, uri: str | None) -> None:
        with self._lock:
            self._waiting.append((folder, pending, uri))

    def waiting(self) -> list[tuple[Path, int, str | None]]:
        """(journal folder, records pending, store URI) of every journal an interrupt left waiting."""
        with self._lock:
            return list(self._waiting)


interrupts = Interrupts()

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
        self.closed = False  # its end is written (`close`): nothing more is appended
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

    def log_metrics(self, metrics: dict[str, float], step: int, kind: str = "evaluation", again: bool = False) -> None:
        """`again`: written even where the journal holds these points (a resumed run's summary
        at step 0: the newer value is the one MLflow shows)."""
        self._append("metrics", metrics={k: float(v) for k, v in metrics.items()}, step=int(step), again=again)

    def save_view(self, name: str, state: dict) -> None:
        """A saved view of this run's children in the runs list (`cl.tracking.views`)."""
        self._append("view", name=name, state=state)

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
        save_model(model, folder / "model")
        self.blocked_s += time.perf_counter() - t
        self._append("artifact", path=str((folder / "model").relative_to(self.journal.folder)))

    def log_file(self, path: Path, folder: str) -> None:
        """A file of the run's own (a pre-training's weights) under `folder/`, copied into the
        journal now, delivered like any artifact."""
        t = time.perf_counter()
        target = self.journal.folder / BLOBS / f"file-{len(self.journal.records)}" / folder
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / Path(path).name)
        self.blocked_s += time.perf_counter() - t
        self._append("artifact", path=str(target.relative_to(self.journal.folder)))

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
        self.closed = True
        worker = self._deliverer
        caught = self._wait(worker)
        self.blocked_s += time.perf_counter() - t
        try:
            return self._let_go(worker)
        finally:
            if caught is not None:
                raise caught

    def _wait(self, worker) -> KeyboardInterrupt | None:
        """Wait until the journal is delivered, the worker stops, the store has failed for the
        timeout, or a second interrupt says stop. The first interrupt, arriving here, is held
        until the wait is over (the run's end is written: its delivery is what it waits for)."""
        caught = None
        with self.journal.changed:
            while not self.journal.complete and worker.alive and not interrupts.hurried:
                failing = worker.failing_for()
                if failing is not None and failing >= self.timeout * (1 if worker.outage else 10):
                    break
                try:
                    self.journal.changed.wait(0.05)
                except KeyboardInterrupt as err:
                    if caught is not None:  # a second one where nobody counts them (`cl.cli.main` does)
                        break
                    caught = err
        return caught

    def _let_go(self, worker) -> str | None:
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
        if interrupts.interrupted:  # the command's last line names what waits, once for every journal
            interrupts.left(self.journal.folder, self.journal.pending, self.tracking_uri)
            return self.run_id
        raise TrackingError(notice)

