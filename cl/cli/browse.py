"""`cl compare`, `cl ui` and `cl sync`: reading runs back from an MLflow store, and
delivering the records that still wait in journals to it."""
from __future__ import annotations

import sys
from pathlib import Path


def compare_command(args) -> int:
    from cl.tracking.browse import entries, find_runs
    from cl.tracking.store import default_tracking_uri
    from evaluation import compare

    uri = args.tracking_uri or default_tracking_uri()
    runs = find_runs(uri, args.experiment, args.parent, args.filter)
    if not runs:
        print("cl: no finished runs match", file=sys.stderr)
        return 1
    found = entries(runs, with_artifacts=bool(args.plots), tracking_uri=uri)
    rows = compare.comparison(found, args.metrics.split(",") if args.metrics else None)
    print({"text": compare.text_table, "markdown": compare.markdown_table, "csv": compare.csv_table}[args.format](rows)
          .rstrip("\n"))
    note = compare.ranking_note(rows, found)
    if note and args.format == "text":  # markdown and CSV stay a clean table for files
        print(note)
    if args.plots:
        folder = Path(args.plots)
        folder.mkdir(parents=True, exist_ok=True)
        for name, png in compare.comparison_plots(found, args.experiment or f"children of {args.parent}").items():
            (folder / name).write_bytes(png)
            print(f"plot: {folder / name}", file=sys.stderr)
    return 0


def ui_command(args) -> int:
    from cl.tracking.browse import serve_ui
    from cl.tracking.store import default_tracking_uri

    return serve_ui(args.tracking_uri or default_tracking_uri(), args.port, args.experiment)


def sync_command(args) -> int:
    from cl.tracking.sync import sync

    return sync(args.folders, args.tracking_uri)
