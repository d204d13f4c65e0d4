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

A journal is data: a line that is not a whole record of a known kind (a corrupt line, a
list or a number, a record missing its fields) is passed over, counted and copied to
`records.corrupt.jsonl`, and never the reason a record after it is dropped; only a torn
last line (what a killed process was writing) is cut off, after being copied there too.
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
CORRUPT = "records.corrupt.jsonl"  # the lines passed over, each with where it was and why
SKIPPED = "(corrupt)"  # the op of the place a passed-over line keeps in `records` (record i is line i)


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
        try:
            self._read_new(repair=not follow)
            self.state: dict = self._read_state()
        except (OSError, ValueError) as err:
            self.close()
            raise JournalUnreadable(f"{self.folder} cannot be read ({_reason(err)}); it is left as it is") from None
        if not (self.folder / STATE).exists():  # the run key is on disk before any run carries it
            self.mark_delivered(0)
        # (key, step) -> the value last written there: a point is written once, or again with a new value.
        self._points = {(k, r["step"]): v for r in self.records if r["op"] == "metrics" for k, v in r["metrics"].items()}
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
        """Add the whole lines written past what was read; returns how many. A line that is
        not a record keeps its place as a `SKIPPED` one (passed over by delivery). `repair`
        (the owner): copy such lines to `records.corrupt.jsonl`, and complete or cut off a
        torn last line (what a killed process was writing), copied there first."""
        path = self.folder / RECORDS
        if not path.exists():
            return 0
        added = 0
        with open(path, "rb") as f:
            f.seek(self._offset)
            for line in f:
                if not line.endswith(b"\n"):  # still being written (or torn)
                    if repair:
                        self._repair_last(path, line)
                    break
                self._take(line, repair)
                added += 1
        return added

    def _take(self, line: bytes, repair: bool) -> None:
        try:
            record = json.loads(line)
        except ValueError as err:
            record, problem = None, f"not JSON ({err.__class__.__name__})"
        else:
            problem = record_problem(record)
        if problem is not None:
            if repair:
                self._quarantine(line, problem)
            record = {"op": SKIPPED, "line": len(self.records) + 1, "reason": problem}
        self.records.append(record)
        self._offset += len(line)

    def _repair_last(self, path: Path, line: bytes) -> None:
        """A last line without its newline, in a journal nobody writes now: kept (newline added)
        if it is a whole record, else copied aside and cut off."""
        try:
            whole = record_problem(json.loads(line)) is None
        except ValueError:
            whole = False
        if whole:
            with open(path, "ab") as f:
                f.write(b"\n")
            self._take(line + b"\n", repair=True)
            return
        self._quarantine(line, "torn last line (a process killed while writing it), cut off")
        with open(path, "r+b") as f:
            f.truncate(self._offset)

    def _quarantine(self, line: bytes, problem: str) -> None:
        """Copy a passed-over line to `records.corrupt.jsonl`, once (a journal is read again
        by every process that opens it)."""
        entry = {"line": len(self.records) + 1, "offset": self._offset, "reason": problem,
                 "text": line.decode("utf-8", "backslashreplace")}
        side = self.folder / CORRUPT
        if side.exists():
            for kept in side.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    old = json.loads(kept)
                except ValueError:
                    continue
                if isinstance(old, dict) and (old.get("offset"), old.get("text")) == (entry["offset"], entry["text"]):
                    return
        with open(side, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    @property
    def skipped(self) -> int:
        """Lines passed over (copied to `records.corrupt.jsonl` by the owner)."""
        return sum(1 for r in self.records if r["op"] == SKIPPED)

    def refresh(self) -> int:
        """(`follow`) Take in the records written since the last look; wakes the waiters."""
        with self._lock:
            added = self._read_new(repair=False)
            if added:
                self.changed.notify_all()
        return added

    def _read_state(self) -> dict:
        path = self.folder / STATE
        try:
            state = json.loads(path.read_text()) if path.exists() else {}
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{STATE} is not JSON: {err}") from None
        if not isinstance(state, dict):
            raise ValueError(f"{STATE} is not a JSON object")
        state.setdefault("delivered", 0)
        delivered = state["delivered"]
        if type(delivered) is not int or not 0 <= delivered <= len(self.records):
            raise ValueError(f"{STATE} says {delivered!r} record(s) delivered, of {len(self.records)}")
        for field in ("key", "run_id", "experiment_id"):
            if field in state and not isinstance(state[field], str):
                raise ValueError(f"{STATE}: its {field} is not a string")
        if "key" in state and not _key(state["key"]):
            raise ValueError(f"{STATE}: its key is not a run key")
        state.setdefault("key", uuid.uuid4().hex)  # tags the MLflow run: a run created but not noted is found again
        return state

    @property
    def created(self) -> bool:
        return any(r["op"] == "create" for r in self.records)

    @property
    def ended(self) -> dict | None:
        """The last record if it ends the run, else None (lines passed over aside)."""
        last = next((r for r in reversed(self.records) if r["op"] != SKIPPED), None)
        return last if last is not None and last["op"] == "end" else None

    @property
    def pending(self) -> int:
        return len(self.records) - self.state["delivered"]

    @property
    def complete(self) -> bool:
        """Every record delivered, the run's end included."""
        return self.ended is not None and self.pending == 0

    # ------------------------------------------------------------ writing
    def append(self, op: str, *, again: bool = False, **fields) -> None:
        """Add a record. Metric points this journal already holds (a resumed run emitting
        again what it emitted before its checkpoint) are left out; a record left empty by
        that is not written. `again`: such points are written even so where their value
        changed (a summary at step 0, whose newer value must win: MLflow shows the point with
        the latest timestamp), and only there (a resume that ends as it would have writes no
        point twice)."""
        with self._lock:
            if op == "metrics":
                step = fields["step"]
                held = self._points
                fields["metrics"] = {k: v for k, v in fields["metrics"].items() if (k, step) not in held or again
                                     and not _same(held[(k, step)], v)}
                if not fields["metrics"]:
                    return
                held.update(((k, step), v) for k, v in fields["metrics"].items())
            record = {"op": op, "time": int(time.time() * 1000), **fields}
            try:
                self._file.write(json.dumps(record, allow_nan=True) + "\n")
                self._file.flush()  # in the OS's hands: a killed process loses nothing, a lost machine may
            except OSError as err:
                raise self._cannot_write(err) from None
            self.records.append(record)
            self.changed.notify_all()

    def blob(self, name: str, data: bytes | str) -> str:
        """Keep an artifact's bytes beside the records; returns the path its record names."""
        folder = self.folder / BLOBS / uuid.uuid4().hex[:12]
        path = folder / name
        try:
            folder.mkdir(parents=True)
            path.write_bytes(data if isinstance(data, bytes) else data.encode())
        except OSError as err:
            shutil.rmtree(folder, ignore_errors=True)  # no half an artifact for `cl sync` to deliver
            raise OSError(err.errno, err.strerror, str(path)) from None
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
        try:
            tmp.write_text(json.dumps(self.state))
            os.replace(tmp, self.folder / STATE)
        except BaseException as err:
            tmp.unlink(missing_ok=True)  # the old state stands; no .tmp left beside it
            if isinstance(err, OSError):
                raise OSError(err.errno, err.strerror, str(self.folder / STATE)) from None
            raise

    def _cannot_write(self, err: OSError) -> OSError:
        """The records file could not take a record (a full disk): what is buffered is dropped,
        so that closing the file does not fail again, and the error names the file."""
        path = self.folder / RECORDS
        try:
            self._file.close()
        except OSError:
            pass
        _cut_torn_line(path)  # the next record starts a line of its own
        self._file = open(path, "a", encoding="utf-8")
        return OSError(err.errno, err.strerror, str(path))

    def close(self) -> None:
        with self._lock:
            if getattr(self, "_file", None) is not None:
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


def _cut_torn_line(path: Path) -> None:
    """Cut what follows the last newline of `path` (part of a record a full disk cut short)."""
    try:
        with open(path, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - (1 << 20))  # a record is far shorter than a megabyte
            f.seek(start)
            newline = f.read().rfind(b"\n")
            if newline >= 0 or start == 0:
                f.truncate(start + newline + 1)
    except OSError:
        pass  # left for the repair on reading (`Journal._repair_last`)


class JournalBusy(ValueError):
    """Another process owns this journal (reported like bad input: exit 2, one line)."""


class JournalUnreadable(ValueError):
    """A journal that cannot be read at all (its records file or state unreadable)."""


def _reason(err: BaseException) -> str:
    return f"{err.strerror}: {err.filename}" if isinstance(err, OSError) and err.strerror else str(err)


def _same(a, b) -> bool:
    """Two metric values that are one (NaN is NaN)."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_SCALAR = (str, int, float, bool)


def _strings(d) -> bool:
    """Names to values MLflow takes as text (a tag's, a parameter's)."""
    return isinstance(d, dict) and all(isinstance(k, str) and isinstance(v, _SCALAR) for k, v in d.items())


def _key(v) -> bool:
    """A run key (`Journal.state["key"]`, hex): a store is searched by it."""
    return isinstance(v, str) and v.isascii() and v.isalnum()


# What each kind of record must hold: field -> test (`Journal.append`'s callers, `cl.tracking.sink`).
_FIELDS = {
    "create": {"experiment": lambda v: isinstance(v, str), "name": lambda v: isinstance(v, str),
               "params": _strings, "tags": lambda v: _strings(v) and _key(v.get("cl.run_key"))},
    "metrics": {"metrics": lambda v: isinstance(v, dict) and all(isinstance(k, str) and _number(x) for k, x in v.items()),
                "step": lambda v: type(v) is int},
    "tags": {"tags": _strings},
    "status": {"status": lambda v: isinstance(v, str)},
    "inputs": {"inputs": lambda v: isinstance(v, list) and all(
        isinstance(d, dict) and all(isinstance(d.get(k), _SCALAR) for k in ("name", "digest", "source", "context"))
        for d in v)},
    "table": {"name": lambda v: isinstance(v, str), "data": lambda v: isinstance(v, dict)},
    "artifact": {"path": lambda v: isinstance(v, str)},
    "end": {"status": lambda v: isinstance(v, str)},
    # A saved view of the runs list (`cl.tracking.views`): the deliverer makes its tag's name and
    # its filter from the run it delivers, so a journal cannot name another tag or experiment.
    "view": {"name": lambda v: isinstance(v, str) and len(v) <= 200, "state": lambda v: isinstance(v, dict)},
}
# Records whose every field is named: anything else in them (a tag's name, an experiment) is refused.
_ONLY = {"view": {"op", "time", "name", "state"}}
_OPTIONAL = {"tracking_uri": lambda v: v is None or isinstance(v, str),  # shown, never used (`cl sync`)
             "parent_key": lambda v: v is None or _key(v)}


def record_problem(record) -> str | None:
    """Why `record` (a line's JSON) is not a record a journal holds, or None if it is."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    op = record.get("op")
    if not isinstance(op, str) or op not in _FIELDS:
        return f"no known 'op' ({op!r})"[:120]
    if not _number(record.get("time")):
        return f"a '{op}' record without its time"
    for field, test in _FIELDS[op].items():
        if not test(record.get(field)):
            return f"a '{op}' record whose '{field}' is missing or of the wrong type"
    extra = sorted(set(record) - _ONLY[op]) if op in _ONLY else []
    if extra:
        return f"a '{op}' record with fields it may not have ({', '.join(map(str, extra))})"[:160]
    for field, test in _OPTIONAL.items():
        if field in record and not test(record[field]):
            return f"a '{op}' record whose '{field}' is of the wrong type"
    return None


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
