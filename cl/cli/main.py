"""The `cl` command: parse the arguments (`cl.cli.parser`), call the command, and end a
failure the user can cause in one line on standard error and an exit code (2 for an
error, 130 for an interrupt); `--debug` shows the traceback instead.

The commands live by what they do: `run_commands` (run, pretrain), `sweep_command`,
`preview` (describe, schedules), `browse` (compare, ui, sync) and `catalogue` (strategies,
models, datasets, scenarios, streams)."""
from __future__ import annotations

import os
import signal
import sys
import threading

from cl.cli.browse import compare_command, sync_command, ui_command
from cl.cli.catalogue import list_command, streams_command
from cl import console
from cl.cli.parser import build_parser
from cl.cli.preview import describe_command, schedules_command
from cl.cli.run_commands import pretrain_command, run_command
from cl.cli.sweep_command import sweep_command

#: Every command by name; `strategies`, `models`, `datasets` and `scenarios` list their registry.
COMMANDS = {"run": run_command, "describe": describe_command, "schedules": schedules_command,
            "compare": compare_command, "ui": ui_command, "sync": sync_command, "sweep": sweep_command,
            "pretrain": pretrain_command, "streams": streams_command}


def entry() -> None:
    """The `cl` command (and `python -m cl`): `main`, then the process's end made cheap. The
    interpreter's last collections walk every object PyTorch's import made (0.8 s after
    torch._dynamo on 2 cores, longer than a short run trains); frozen out of the collector
    they are skipped. Exit handlers and finalizers still run; the memory goes with the process."""
    import gc

    code = main()
    gc.freeze()
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.install()  # the lab logs what it has to say; the command prints it
    if args.command == "run" and not args.no_track:
        # Before torch is imported: the child that delivers to MLflow imports it and opens the
        # store meanwhile, on the other core (`cl.tracking.delivery`).
        from cl.tracking import delivery

        try:
            delivery.prestart(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None,
                              args.tracking_timeout)
        except ValueError as err:  # CL_TRACKING_DELIVERY set to nonsense
            print(f"cl: error: {err}", file=sys.stderr)
            return 2
    if args.command != "run" or threading.current_thread() is not threading.main_thread():
        return _dispatch(args)
    previous = signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        return _dispatch(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # a terminated run ends as an interrupted one: KILLED in MLflow, checkpoint kept


def _dispatch(args) -> int:
    from cl.training.checkpoint import CheckpointError
    from cl.config.errors import ConfigError
    from cl.config.registry import UnknownComponentError
    from cl.tracking.store import TrackingError
    from streams.sources import DatasetNotFoundError

    try:
        return COMMANDS.get(args.command, list_command)(args)
    except (ConfigError, DatasetNotFoundError, CheckpointError, TrackingError, UnknownComponentError,
            ValueError, FileNotFoundError) as err:
        if args.debug:
            raise
        print(f"cl: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cl: interrupted; results logged so far are kept in MLflow", file=sys.stderr)
        return 130
