"""The `cl` command: parse the arguments (`cl.cli.parser`), call the command, and end a
failure the user can cause in one line on standard error, naming the thing and what to do,
and an exit code; `--debug` shows the traceback instead. The exit codes:

- 2: bad input, a file, setting or path the user gave that cannot be used (a folder that
  is a file, read-only or not ours to write; a checkpoint that is not for this run);
- 1: the work was tried and did not complete: a run failed, or the machine failed it, a
  full disk (`no space left`) or another I/O error; the input was fine, the same command
  succeeds once there is room;
- 130: interrupted (Ctrl-C, SIGTERM). The first interrupt ends the runs as KILLED and waits
  for their delivery to MLflow; a second one stops that wait, and the line says which
  journals wait and the `cl sync` that delivers them.

The commands live by what they do: `run_commands` (run, pretrain), `sweep_command`,
`preview` (describe, schedules), `browse` (compare, ui, sync) and `catalogue` (strategies,
models, datasets, scenarios, streams)."""
from __future__ import annotations

import errno
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
from cl.cli.tokenize_command import tokenize_command

#: Every command by name; `strategies`, `models`, `datasets` and `scenarios` list their registry.
COMMANDS = {"run": lambda args: run_command(args, rank_main), "describe": describe_command,
            "schedules": schedules_command, "compare": compare_command, "ui": ui_command, "sync": sync_command, "sweep": sweep_command,
            "pretrain": pretrain_command, "streams": streams_command, "tokenize": tokenize_command}


def entry() -> None:
    """The `cl` command (and `python -m cl`): `main`, then the process's end made cheap. The
    interpreter's last collections walk every object PyTorch's import made (0.8 s after
    torch._dynamo on 2 cores, longer than a short run trains); frozen out of the collector
    they are skipped. Exit handlers and finalizers still run; the memory goes with the process."""
    import gc

    global _PROCESS_ENDS
    _PROCESS_ENDS = True
    code = main()
    gc.freeze()
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.install()  # the lab logs what it has to say; the command prints it
    # Delivery starts where records are written: not in the process that only starts `--devices`
    # processes, nor on a torchrun rank other than 0 (rank 0 alone tracks).
    launcher = (getattr(args, "devices", None) or 1) > 1 and "WORLD_SIZE" not in os.environ
    tracks_here = not launcher and os.environ.get("RANK", "0") == "0"
    if args.command == "run" and not args.no_track and tracks_here:
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
    from cl.tracking import sink

    sink.interrupts.clear()
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _dispatch(args)
    finally:
        sink.interrupts.clear()  # a caller's later runs, in this process, start uninterrupted
        for s, handler in previous.items():
            # The `cl` process ends now, everything written and closed: a later interrupt is
            # ignored, as a traceback or a death by SIGINT (not the exit code) would say nothing true.
            signal.signal(s, signal.SIG_IGN if _PROCESS_ENDS else handler)


#: Set by `entry`: `main` is the whole process (not a call from Python, which gets its handlers back).
_PROCESS_ENDS = False


def rank_main(args, rank: int, world: int, peer_failed: int) -> int:
    """`cl run` in one of the processes `--devices N` started (`cl.runner.distributed.spawn`):
    the command as `main` runs it (interrupts end the runs KILLED, bad input is one line from
    rank 0), and an exit code the launcher reads. A collective that broke because another
    rank failed is `peer_failed`, silently; any other failure is one line naming this rank."""
    from cl.runner.distributed import collective_broke, resume_hint
    from cl.tracking import sink

    sink.interrupts.clear()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _interrupt)
    if rank != 0:  # the same bad input fails every rank alike: rank 0 says it
        sys.stderr = open(os.devnull, "w")
    try:
        return _dispatch(args)
    except BaseException as err:
        if collective_broke(err):
            return peer_failed
        if args.debug:
            raise
        sys.stderr = sys.__stderr__
        print(f"cl: error: rank {rank} of {world} failed: {type(err).__name__}: {err}; {resume_hint(args)}",
              file=sys.stderr)
        return 1


def _interrupt(signum, frame):
    """The first Ctrl-C (or SIGTERM) interrupts the run: KILLED in MLflow, checkpoint kept, its
    records delivered before the command ends. A later one raises nothing, so the runs' ends
    are still written to their journals; it only cuts the wait for delivery short."""
    from cl.tracking import sink

    if sink.interrupts.note():
        raise KeyboardInterrupt


def _dispatch(args) -> int:
    """The command, its failures as one line each (`_failures`), an interrupt as 130."""
    from cl.tracking import sink

    try:
        return _failures(args)
    except KeyboardInterrupt:
        print(f"cl: {_interrupted_line()}", file=sys.stderr)
        return 130
    except Exception:
        # An interrupt that landed inside an import can leave a module half made (numpy's
        # lazy submodules then recurse without end): what fails after it is the interrupt's doing.
        if not sink.interrupts.interrupted or args.debug:
            raise
        print(f"cl: {_interrupted_line()}", file=sys.stderr)
        return 130


def _failures(args) -> int:
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
    except OSError as err:
        if args.debug:
            raise
        line, code = os_error_line(err)
        print(f"cl: error: {line}", file=sys.stderr)
        return code


#: What a path the user gave may fail with: bad input (exit 2), and what to do about it.
_BAD_PATH = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
             errno.EPERM: "permission denied", errno.ENOTDIR: "a part of it is a file, not a folder",
             errno.EISDIR: "it is a folder", errno.ENAMETOOLONG: "the name is too long"}
#: What the machine may fail a run with (exit 1): the input was fine; and what to do.
_ROOM = ("free some space (or give another --checkpoint-dir, CL_JOURNAL_DIR or CL_CACHE_DIR) and run again "
         "(--resume goes on from the last checkpoint)")
_NO_ROOM = {errno.ENOSPC: f"no space left on the device; {_ROOM}", errno.EDQUOT: f"disk quota exceeded; {_ROOM}",
            errno.EFBIG: "the file is larger than this process may write (ulimit -f): raise the limit and run "
                         "again (--resume goes on from the last checkpoint)"}


def os_error_line(err: OSError) -> tuple[str, int]:
    """One line for a failed file operation, naming the file, and its exit code."""
    name = err.filename if err.filename is not None else "a file"
    if err.errno in _NO_ROOM:
        return f"{name}: {_NO_ROOM[err.errno]}", 1
    if err.errno in _BAD_PATH:
        return f"{name} cannot be written: {_BAD_PATH[err.errno]}; give a folder you can write", 2
    return f"{name}: {err.strerror or err}", 1


def _interrupted_line() -> str:
    """What an interrupt leaves: everything delivered, or the journals that wait and how to deliver them."""
    from cl.tracking import sink

    waiting = sink.interrupts.waiting()
    if not waiting:
        return "interrupted; unfinished runs end KILLED in MLflow, their checkpoints kept"
    records = sum(n for _, n, _ in waiting)
    folders = [str(folder) for folder, _, _ in waiting]
    where = folders[0] if len(folders) == 1 else os.path.commonpath(folders)
    uris = {uri for _, _, uri in waiting}
    store = f" --tracking-uri {uris.pop()}" if len(uris) == 1 and None not in uris else ""
    return (f"interrupted; {records} record(s) wait undelivered in {where}: deliver them with "
            f"`cl sync {where}{store}`")
