"""`cl sync`: deliver what waits in tracking journals (a store that was down, a process
killed before it delivered everything) to the MLflow store the user names.

A journal is data: the store a run was meant for is shown, never used (`--tracking-uri`,
else MLFLOW_TRACKING_URI, else MLflow's default); lines that are not records are passed
over and kept in `records.corrupt.jsonl`; an artifact is read only from inside the
journal's folder. A journal that cannot be read is named, with why, and left as it is."""
from __future__ import annotations

import sys
from pathlib import Path

from cl.tracking.journal import CORRUPT, RECORDS, SKIPPED, Journal, JournalBusy, JournalUnreadable, find_journals, \
    journal_root
from cl.tracking.deliverer import Deliverer, shown
from cl.tracking.store import default_tracking_uri


def sync(folders: list[str], tracking_uri: str | None = None) -> int:
    """Deliver every journal under `folders` (default: the journal root) to `tracking_uri`
    (else the default store); parents before their children. Delivered journals outside
    checkpoint folders are removed, unless they held lines that are not records. Returns 0
    when every record reached the store, 1 otherwise (records waiting, lines passed over,
    artifacts refused, journals unreadable)."""
    uri = tracking_uri or default_tracking_uri()  # never the store a journal names
    roots = folders or [str(journal_root())]
    found = find_journals(*roots)
    # A parent's run must exist before its children can name it.
    found.sort(key=lambda p: (p.name != "parent.journal", str(p)))
    if not found:
        print(f"cl: no journals in {', '.join(roots)}", file=sys.stderr)
        return 0
    left = 0
    for folder in found:
        journal = _open(folder)
        if journal is None or isinstance(journal, int):
            left += journal or 0
            continue
        if journal.skipped:
            left += 1
            print(f"cl: {folder}: {journal.skipped} line(s) that are not records passed over; they are kept in "
                  f"{folder / CORRUPT}, and the journal with them", file=sys.stderr)
        if not journal.pending:
            journal.close()
            continue
        left += _deliver(folder, journal, uri)
    return 1 if left else 0


def _open(folder: Path) -> Journal | int | None:
    """The journal, or what not opening it counts: None for one a live run delivers itself,
    1 for one that cannot be read (named, with why, and left as it is)."""
    try:
        return Journal(folder)
    except JournalBusy as err:  # a live run delivers it itself
        print(f"cl: skipped: {err}", file=sys.stderr)
        return None
    except (JournalUnreadable, OSError) as err:
        print(f"cl: skipped: {err if isinstance(err, JournalUnreadable) else f'{folder} cannot be opened ({err})'}",
              file=sys.stderr)
        return 1


def _deliver(folder: Path, journal: Journal, uri: str | None) -> int:
    """Deliver one journal to `uri`, after its parent's; 1 if anything did not reach the store."""
    create = next((r for r in journal.records if r["op"] == "create"), {})
    named = create.get("tracking_uri")
    parent = folder.parent / "parent.journal"
    parent_journal = None
    if create.get("tags", {}).get("cl.role") != "parent" and (parent / RECORDS).exists():
        try:
            parent_journal = Journal(parent, owner=False)
        except (JournalUnreadable, OSError) as err:  # the child waits for it, and says so
            print(f"cl: {err}", file=sys.stderr)
    deliverer = Deliverer(journal, uri, parent_journal)
    pending = sum(1 for r in journal.records[journal.state["delivered"]:] if r["op"] != SKIPPED)
    delivered = deliverer.deliver()
    if parent_journal is not None:
        parent_journal.close()
    left = int(bool(deliverer.refused))
    if not delivered:
        print(f"cl: {' '.join(deliverer.pending_notice().split())}", file=sys.stderr)  # on one line
        journal.close()
        return 1
    elsewhere = f"; the run named {shown(named)}, not used" if named and named != uri else ""
    run_id = journal.state.get("run_id")
    print(f"{folder}: {pending} record(s) delivered to {uri or '(default store)'}"
          f" ({f'run {run_id}' if run_id else 'it holds no run'}){elsewhere}")
    if journal.complete and not journal.skipped and not _beside_checkpoints(folder):
        journal.remove()
        _remove_if_empty(folder.parent)
        return left
    journal.close()
    return left


def _beside_checkpoints(folder: Path) -> bool:
    return any(folder.parent.glob("*.pt"))


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
