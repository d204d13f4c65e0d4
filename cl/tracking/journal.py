"""The tracking journal: every record of an MLflow run, on local disk first.

Training never waits for the store. Each record a run emits (its creation, metrics,
tags, datasets, artifacts, its end) is appended to `records.jsonl` in the run's
journal folder before anything talks to MLflow; a deliverer (`cl.tracking.deliverer.Deliverer`)
delivers the records in order and notes how far it got in `state.json`. A store that
is down loses nothing: the records wait here and are delivered when it answers,
later in the same run or by `cl sync`.

A record is written with its timestamp, so delivering it twice (a process killed
between delivering and noting it) stores nothing twice: MLflow keeps one metric per
(key, step, timestamp, value), tags and parameters are set to the same values again,
artifacts are overwritten. A resumed run emits again what it had emitted after its
checkpoint; the journal keeps the first of each metric point (key, step), so the
store gets one value per step.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

RECORDS, STATE, BLOBS = "records.jsonl", "state.json", "blobs"


class Journal:
    """The journal of one MLflow run, in `folder`. Appends are thread-safe and return at once."""

    def __init__(self, folder: str | os.PathLike, owner: bool = True, follow: bool = False):
        """`follow`: the view of the process that delivers a journal another process writes
        (`cl.tracking.delivery`): it reads, `refresh` adds the records written since, and it never
        touches the records file (a line being written is not a torn one)."""
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._owner = self._own() if owner else None  # one process writes and delivers a journal at a time
        self._lock = threading.Lock()
        self._offset = 0  # bytes of the records file read so far
        self.records: list[dict] = []
        self._read_new(repair=not follow)
        self.state: dict = self._read_state()
        if not (self.folder / STATE).exists():  # the run key is on disk before any run carries it
            self.mark_delivered(0)
        self._points = {(k, r["step"]) for r in self.records if r["op"] == "metrics" for k in r["metrics"]}
        self._file = None if follow else open(self.folder / RECORDS, "a", encoding="utf-8")
        self.changed = threading.Condition(self._lock)  # notified on every append

    def _own(self):
        """An exclusive lock on the journal for this process's lifetime (or until `close`);
        `JournalBusy` if another process holds it (a live run, or a `cl sync`)."""
        try:
            import fcntl
        except ImportError:  # Windows: no lock
            return None
        handle = open(self.folder / ".owner", "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise JournalBusy(f"{self.folder} is in use by another process (a running `cl run` or `cl sync`)") \
                from None
        return handle

    # ------------------------------------------------------------ reading
    def _read_new(self, repair: bool) -> int:
        """Add the whole records written past what was read; returns how many. `repair`: cut
        off a torn last line (what a killed process was writing) and what follows it."""
        path = self.folder / RECORDS
        if not path.exists():
            return 0
        added = 0
        with open(path, "rb") as f:
            f.seek(self._offset)
            for line in f:
                if not line.endswith(b"\n"):  # still being written (or torn)
                    break
                try:
                    record = json.loads(line)
                except ValueError:
                    break
                self.records.append(record)
                self._offset += len(line)
                added += 1
        if repair and self._offset != path.stat().st_size:
            with open(path, "r+b") as f:
                f.truncate(self._offset)
        return added

    def refresh(self) -> int:
        """(`follow`) Take in the records written since the last look; wakes the waiters."""
        with self._lock:
            added = self._read_new(repair=False)
            if added:
                self.changed.notify_all()
        return added

    def _read_state(self) -> dict:
        path = self.folder / STATE
        state = json.loads(path.read_text()) if path.exists() else {}
        state.setdefault("delivered", 0)
        state.setdefault("key", uuid.uuid4().hex)  # tags the MLflow run: a run created but not noted is found again
        return state

    @property
    def created(self) -> bool:
        return any(r["op"] == "create" for r in self.records)

    @property
    def ended(self) -> dict | None:
        """The last record if it ends the run, else None."""
        return self.records[-1] if self.records and self.records[-1]["op"] == "end" else None

    @property
    def pending(self) -> int:
        return len(self.records) - self.state["delivered"]

    @property
    def complete(self) -> bool:
        """Every record delivered, the run's end included."""
        return self.ended is not None and self.pending == 0

    # ------------------------------------------------------------ writing
    def append(self, op: str, **fields) -> None:
        """Add a record. Metric points this journal already holds (a resumed run emitting
        again what it emitted before its checkpoint) are left out; a record left empty by
        that is not written."""
        with self._lock:
            if op == "metrics":
                step = fields["step"]
                fields["metrics"] = {k: v for k, v in fields["metrics"].items() if (k, step) not in self._points}
                if not fields["metrics"]:
                    return
                self._points.update((k, step) for k in fields["metrics"])
            record = {"op": op, "time": int(time.time() * 1000), **fields}
            self._file.write(json.dumps(record, allow_nan=True) + "\n")
            self._file.flush()  # in the OS's hands: a killed process loses nothing, a lost machine may
            self.records.append(record)
            self.changed.notify_all()

    def blob(self, name: str, data: bytes | str) -> str:
        """Keep an artifact's bytes beside the records; returns the path its record names."""
        folder = self.folder / BLOBS / uuid.uuid4().hex[:12]
        folder.mkdir(parents=True)
        path = folder / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return str(path.relative_to(self.folder))

    def sync(self) -> None:
        """Force the records to disk (before a checkpoint counts as written)."""
        with self._lock:
            self._file.flush()
            os.fsync(self._file.fileno())

    def mark_delivered(self, upto: int, **state) -> None:
        """Note that records [0, upto) are in the store (atomically: a rename)."""
        self.state.update(state, delivered=upto)
        tmp = self.folder / (STATE + ".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.folder / STATE)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
        if self._owner is not None:
            self._owner.close()  # releases the lock
            self._owner = None

    def remove(self) -> None:
        """Delete the folder (a run whose every record was delivered, outside a checkpoint folder)."""
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        for folder in (self.folder.parent, self.folder.parent.parent):  # the invocation's, then the root
            try:
                folder.rmdir()  # only when empty
            except OSError:
                break


class JournalBusy(ValueError):
    """Another process owns this journal (reported like bad input: exit 2, one line)."""


def journal_root() -> Path:
    """Where runs without a checkpoint folder keep their journals until delivered:
    `CL_JOURNAL_DIR`, else ./cl-journal."""
    return Path(os.environ.get("CL_JOURNAL_DIR") or "cl-journal")


def find_journals(*roots: str | os.PathLike) -> list[Path]:
    """Journal folders (those holding records) under `roots`."""
    out = []
    for root in roots:
        root = Path(root)
        if (root / RECORDS).exists():
            out.append(root)
        elif root.is_dir():
            out.extend(sorted(p.parent for p in root.rglob(RECORDS)))
    return out
