"""`cl sync`: deliver what waits in tracking journals (a store that was down, a process
killed before it delivered everything) to the MLflow store each run names."""
from __future__ import annotations

import sys
from pathlib import Path

from cl.tracking.journal import Journal, JournalBusy, find_journals, journal_root
from cl.tracking.deliverer import Deliverer


def sync(folders: list[str], tracking_uri: str | None = None) -> int:
    """Deliver every journal under `folders` (default: the journal root); parents before their
    children. Delivered journals outside checkpoint folders are removed. Returns 0 when
    nothing is left waiting, 1 otherwise."""
    roots = folders or [str(journal_root())]
    found = find_journals(*roots)
    # A parent's run must exist before its children can name it.
    found.sort(key=lambda p: (p.name != "parent.journal", str(p)))
    if not found:
        print(f"cl: no journals in {', '.join(roots)}", file=sys.stderr)
        return 0
    left = 0
    for folder in found:
        try:
            journal = Journal(folder)
        except JournalBusy as err:  # a live run delivers it itself
            print(f"cl: skipped: {err}", file=sys.stderr)
            continue
        if not journal.pending:
            journal.close()
            continue
        create = next((r for r in journal.records if r["op"] == "create"), {})
        uri = tracking_uri or create.get("tracking_uri")
        parent = folder.parent / "parent.journal"
        parent_journal = Journal(parent, owner=False) if create.get("tags", {}).get("cl.role") != "parent" and \
            (parent / "records.jsonl").exists() else None
        deliverer = Deliverer(journal, uri, parent_journal)
        pending = journal.pending
        if deliverer.deliver():
            print(f"{folder}: {pending} record(s) delivered to {uri or '(default store)'}"
                  f" (run {journal.state.get('run_id')})")
            if journal.complete and not _beside_checkpoints(folder):
                journal.remove()
                _remove_if_empty(folder.parent)
                continue
        else:
            left += 1
            print(f"cl: {deliverer.pending_notice()}", file=sys.stderr)
        journal.close()
    return 1 if left else 0


def _beside_checkpoints(folder: Path) -> bool:
    return any(folder.parent.glob("*.pt"))


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
