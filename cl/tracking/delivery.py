"""Delivery of tracking journals from a child process.

Importing MLflow and opening its store (creating and migrating the schema of a fresh
SQLite store) takes longer than importing PyTorch. Imports hold the GIL, so a thread
cannot overlap them with loading data and training; a child process can, on the other
core. `cl run` starts this process first thing (`prestart`), before it imports torch:
the child imports MLflow and opens the store while the parent loads the data and
trains, and the parent's sinks only append records to their journals (`cl.tracking.journal`).

The child follows each journal it is told to watch (`Journal(follow=True)`: it reads the records, and notes its progress in `state.json`), delivers
its records with the same `Deliverer` and retry loop as a sink's thread, and reports
each journal's progress (records delivered, run id, the store's error) on its standard
output; the parent's sink waits on those reports when the run ends, exactly as it
waits on its own thread otherwise. The parent's journal lock stays with the parent,
so `cl sync` never delivers a journal the child is delivering. If the parent dies,
the child stops: what it had not delivered waits in the journals, as it would have. A
store it is opening is finished first (a SQLite store is built beside its place and linked
in whole, `cl.tracking.store.create_sqlite_store`, so even a kill of the child leaves
none or a complete one).

Protocol, one JSON object per line. Parent to child: `{"op": "open", "uri", "timeout"}`,
`{"op": "watch", "folder", "uri", "parent", "timeout", "system_metrics_s", "resumed"}`,
`{"op": "stop", "folder"}`. Child to parent: `{"store": uri, "error", "unreachable"}`,
`{"folder", "delivered", "run_id", "experiment_id", "failing_since", "outage",
"notice"}`, `{"folder", "stopped": true}`.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time

# `CL_TRACKING_DELIVERY`: `process` (a child process), `thread` (a thread of this process),
# or unset: a child process unless MLflow is already imported here (then a child would only
# import it a second time).
MODE_ENV = "CL_TRACKING_DELIVERY"
log = logging.getLogger("cl.tracking.delivery")  # by name: the child runs this module as __main__

_service: "DeliveryProcess | None" = None
_lock = threading.Lock()


_auto: bool | None = None  # the automatic choice, made once per process


def wanted() -> bool:
    """Whether this process delivers through a child. Set by `CL_TRACKING_DELIVERY`; else chosen
    once, on first use (MLflow imported later in the run, by `--log-model` say, changes nothing)."""
    global _auto
    mode = os.environ.get(MODE_ENV, "").strip().lower()
    if mode not in ("", "process", "thread"):
        raise ValueError(f"{MODE_ENV}={mode!r}: expected 'process' or 'thread'")
    if mode:
        return mode == "process"
    if _auto is None:
        _auto = "mlflow" not in sys.modules
    return _auto


def prestart(tracking_uri: str | None = None, timeout: float | None = None) -> None:
    """Start the child now (and let it open `tracking_uri`), if this process will deliver
    through one: called by `cl run` before its heavy imports."""
    if wanted():
        service(tracking_uri, timeout)


def service(tracking_uri: str | None = None, timeout: float | None = None) -> "DeliveryProcess | None":
    """This process's delivery child (started on first use, restarted if it died), or None
    where records are delivered on threads of this process."""
    global _service
    if not wanted():
        return None
    with _lock:
        # A forked process (a worker pool's) shares the pipes of its parent's child: it starts its own.
        if _service is None or not _service.alive or _service.pid != os.getpid():
            _service = DeliveryProcess()
    _service.open(tracking_uri, timeout)
    return _service


class DeliveryProcess:
    """The parent's handle on the child: sends commands, keeps its reports."""

    def __init__(self):
        import atexit

        self.pid = os.getpid()
        # The child imports `cl` as this process does, wherever that came from (a notebook's sys.path).
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen([sys.executable, "-m", "cl.tracking.delivery"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1, env=env)
        atexit.register(self.close)
        self.stores: dict[str, dict] = {}  # uri -> the child's report on opening it
        self.on_store = None  # called with (uri, report) when the child has tried a store
        self._watching: dict[str, ChildDelivery] = {}
        self._send_lock = threading.Lock()
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="mlflow-delivery-reports", daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        """Let the child go (it ends once its deliveries have stopped)."""
        try:
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass

    def send(self, **command) -> None:
        with self._send_lock:
            try:
                self.proc.stdin.write(json.dumps(command) + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                pass  # the child is gone: the waits below see it

    def open(self, uri: str | None, timeout: float | None) -> None:
        key = uri or ""
        if key not in self.stores:
            self.stores[key] = {}
            self.send(op="open", uri=uri, timeout=timeout)

    def store_report(self, uri: str | None, wait: float = 0.0) -> dict | None:
        """The child's report on opening `uri` ({} while it is at it), waiting up to `wait` s."""
        key, deadline = uri or "", time.monotonic() + wait
        with self._changed:
            while not self.stores.get(key) and self.alive and time.monotonic() < deadline:
                self._changed.wait(deadline - time.monotonic())
        return self.stores.get(key)

    def watch(self, journal, uri, parent_journal, timeout, system_metrics_s, resumed) -> "ChildDelivery":
        worker = ChildDelivery(self, journal, uri, timeout)
        self._watching[str(journal.folder)] = worker
        self.send(op="watch", folder=str(journal.folder), uri=uri, timeout=timeout, system_metrics_s=system_metrics_s,
                  resumed=resumed, parent=str(parent_journal.folder) if parent_journal is not None else None)
        return worker

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                report = json.loads(line)
            except ValueError:
                continue
            if "store" in report:
                self.stores[report["store"] or ""] = report
                if self.on_store is not None:
                    self.on_store(report["store"], report)
                with self._changed:
                    self._changed.notify_all()
                continue
            worker = self._watching.get(report.get("folder"))
            if worker is not None:
                worker.update(report)
        for worker in list(self._watching.values()):  # the child ended: wake whoever waits on it
            worker.update({})
        with self._changed:
            self._changed.notify_all()


class ChildDelivery:
    """One journal delivered by the child, seen from the parent: a `cl.tracking.DeliveryWorker`."""

    def __init__(self, service: DeliveryProcess, journal, uri: str | None, timeout: float):
        self.service, self.journal, self.tracking_uri, self.timeout = service, journal, uri, timeout
        self.error: BaseException | None = None
        self._outage = False
        self._failing_since: float | None = None
        self._notice = ""
        self._stopped = threading.Event()

    @property
    def alive(self) -> bool:
        return self.service.alive and not self._stopped.is_set()

    def update(self, report: dict) -> None:
        journal = self.journal
        with journal.changed:
            if report.get("stopped"):
                self._stopped.set()
            if "delivered" in report:
                journal.state.update({k: report[k] for k in ("delivered", "run_id", "experiment_id")
                                      if report.get(k) is not None})
                self.error = RuntimeError(report["error"]) if report.get("error") else None
                self._outage = bool(report.get("outage"))
                self._failing_since, self._notice = report.get("failing_since"), report.get("notice") or ""
            journal.changed.notify_all()

    @property
    def outage(self) -> bool:
        """The store does not answer, or could not be opened at all: the run's end waits for it
        no longer than the timeout."""
        store = self.service.stores.get(self.tracking_uri or "") or {}
        return self._outage or store.get("ok") is False

    def failing_for(self) -> float | None:
        if not self.service.alive:
            return float("inf")
        return None if self._failing_since is None else time.time() - self._failing_since

    def pending_notice(self) -> str:
        if not self.service.alive and not self._notice:
            return (f"the process delivering to MLflow store {self.tracking_uri or '(default)'} ended "
                    f"(exit code {self.service.proc.returncode}); {self.journal.pending} record(s) wait in "
                    f"{self.journal.folder}, delivered by `cl sync {self.journal.folder}{self._to_store()}`")
        return self._notice

    def _to_store(self) -> str:
        # `cl sync` delivers to the store it is told, never the one a journal names: this one.
        return f" --tracking-uri {self.tracking_uri}" if self.tracking_uri else ""

    def stop(self) -> None:
        """The child stops delivering this journal (after the attempt under way, waited for as
        long as a thread's would be) and lets it go."""
        self.service.send(op="stop", folder=str(self.journal.folder))
        deadline = time.monotonic() + self.timeout
        while self.service.alive and not self._stopped.wait(0.05) and time.monotonic() < deadline:
            pass
        self.service._watching.pop(str(self.journal.folder), None)


# ---------------------------------------------------------------- the child
# How long a child whose parent is gone still waits for a store it is opening (a fresh SQLite
# store takes about a second to create; a busy machine, many).
OPEN_GRACE_S = 60.0


class _Child:
    """`python -m cl.tracking.delivery`: commands on standard input, reports on standard output."""

    def __init__(self):
        self._out = threading.Lock()
        self.journals: dict[str, object] = {}  # folder -> Journal(follow=True)
        self.deliverers: dict[str, object] = {}
        self.stopped: set[str] = set()
        self.parent_gone = False
        self.opening: list[threading.Thread] = []  # the stores being opened (created, for a fresh one)

    def report(self, **fields) -> None:
        if self.parent_gone:
            return
        with self._out:
            try:
                self._reports.write(json.dumps(fields, default=str) + "\n")
                self._reports.flush()
            except (BrokenPipeError, OSError, ValueError):  # the parent is gone: nobody to tell
                self.parent_gone = True
                self._reports = open(os.devnull, "w")

    def main(self) -> int:
        import signal

        # Ctrl-C reaches the whole process group; the parent handles it (it ends its runs as
        # KILLED, and those records still need delivering). The child ends when the parent does.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # The reports get standard output to themselves: what libraries print (MLflow's "View run
        # ..." lines) goes to standard error, where the user sees it.
        self._reports = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        threading.Thread(target=self._follow, name="journal-follower", daemon=True).start()
        for line in sys.stdin:
            try:
                command = json.loads(line)
                op = command.pop("op", None)
                if op == "open":
                    thread = threading.Thread(target=self._open, kwargs=command, daemon=True)
                    self.opening = [t for t in self.opening if t.is_alive()] + [thread]
                    thread.start()
                elif op == "watch":
                    self._watch(**command)
                elif op == "stop":
                    self._stop(command["folder"])
            except Exception as err:  # one bad command never stops the others' deliveries
                log.warning(f"delivery: {type(err).__name__}: {err}")
                if isinstance(command, dict) and command.get("folder"):
                    self.report(folder=command["folder"], stopped=True)
        # The parent closed its end (it ended, or died): stop every delivery where it stands,
        # but finish opening the stores first. Returning would end those threads mid-way:
        # harmless to a SQLite store (built aside and linked in whole), but the next run would
        # pay for its creation again. Bounded, as a server that never answers must not keep
        # the process (the thread's own requests time out).
        self.parent_gone = True
        deadline = time.monotonic() + OPEN_GRACE_S
        for thread in self.opening:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for folder in list(self.journals):
            self._stop(folder, join=True)
        return 0

    def _open(self, uri: str | None, timeout: float | None) -> None:
        from cl.tracking.store import StoreWarmup, TrackingError

        warmup = StoreWarmup(uri, timeout) if timeout is not None else StoreWarmup(uri)
        try:
            warmup.wait()
            unreachable = warmup.unreachable
            self.report(store=uri, ok=unreachable is None, unreachable=unreachable is not None,
                        error=None if unreachable is None else f"{type(unreachable).__name__}: {unreachable}",
                        error_type=None if unreachable is None else type(unreachable).__name__)
        except TrackingError as err:
            self.report(store=uri, ok=False, unreachable=False, error=str(err))

    def _watch(self, folder: str, uri: str | None, parent: str | None, timeout: float,
               system_metrics_s: float | None, resumed: bool) -> None:
        from cl.tracking.journal import Journal
        from cl.tracking.deliverer import Deliverer, deliver_loop
        from cl.tracking.store import bound_http_requests, is_server

        if is_server(uri):
            bound_http_requests(timeout)
        journal = Journal(folder, owner=False, follow=True)
        deliverer = Deliverer(journal, uri, self.journals.get(parent))
        deliverer.parent_deliverer = self.deliverers.get(parent)
        self.journals[folder], self.deliverers[folder] = journal, deliverer
        self.stopped.discard(folder)

        def progress():
            self._progress(folder, deliverer)

        def run():
            try:
                deliver_loop(deliverer, timeout, lambda: folder in self.stopped or self.parent_gone,
                             system_metrics_s, resumed, on_attempt=progress)
                progress()
            except Exception as err:  # reported, never a silent end the parent would wait on
                log.warning(f"delivering {folder}: {type(err).__name__}: {err}")
            finally:
                journal.close()
                # Forgotten once stopped (a long-lived process watches many); the child runs of a
                # parent still hold its journal.
                if self.journals.get(folder) is journal:
                    del self.journals[folder], self.deliverers[folder]
                self.report(folder=folder, stopped=True)

        thread = threading.Thread(target=run, name=f"deliver-{os.path.basename(folder)}", daemon=True)
        deliverer.thread = thread
        thread.start()

    def _progress(self, folder: str, deliverer) -> None:
        journal, failing = deliverer.journal, deliverer.failing_for()
        self.report(folder=folder, delivered=journal.state["delivered"], run_id=journal.state.get("run_id"),
                    experiment_id=journal.state.get("experiment_id"), outage=deliverer.outage,
                    failing_since=None if failing is None else time.time() - failing,
                    error=None if deliverer.error is None else f"{type(deliverer.error).__name__}: {deliverer.error}",
                    notice=deliverer.pending_notice() if deliverer.error is not None else None)

    def _stop(self, folder: str, join: bool = False) -> None:
        self.stopped.add(folder)
        journal, deliverer = self.journals.get(folder), self.deliverers.get(folder)
        if journal is None:
            self.report(folder=folder, stopped=True)
            return
        with journal.changed:
            journal.changed.notify_all()
        if join and deliverer is not None:
            deliverer.thread.join(timeout=5)

    def _follow(self) -> None:
        """Take in what the parent appends to the journals (a look every 20 ms is cheap: a stat)."""
        sizes: dict[str, int] = {}
        while True:
            for folder, journal in list(self.journals.items()):
                if folder in self.stopped:
                    continue
                try:
                    size = os.stat(os.path.join(folder, "records.jsonl")).st_size
                except OSError:
                    continue
                if sizes.get(folder) != size:
                    try:
                        journal.refresh()
                        sizes[folder] = size
                    except Exception as err:  # tried again at the next look
                        log.warning(f"reading {folder}: {err}")
            time.sleep(0.02)


if __name__ == "__main__":
    from cl import console

    console.install()  # what it has to say goes to the parent's standard error, as the parent's does
    raise SystemExit(_Child().main())
