"""Data-parallel runs: `cl run FILE --devices N` on one machine, or the same command under
`torchrun --nproc-per-node N -m cl run FILE`.

The design rule: a run on N processes is the same computation as on one, split. Every rank
builds the same stream, model and strategies from the same seed and draws the same global
batches; the trainer (`cl.training.trainer`) gives each rank its share of the rows of every
batch and DistributedDataParallel averages the gradients. Only rank 0 tracks, checkpoints
and prints; the other ranks train silently beside it.

A strategy says it keeps this rule with `Strategy.data_parallel = True` (its statistics
reduced over the processes, see `strategies.context.Context`); any other is refused before
anything runs. Evaluation is split too: each rank scores its share of the test batches and
the sums are added. Checkpoints are written by rank 0 and read by every rank on `--resume`.

If a rank dies, the others fail out of their next collective (or after `CL_DIST_TIMEOUT`
seconds, 600 by default, where a rank hangs); rank 0 ends its MLflow runs FAILED, keeping
what they logged, and `--devices N` says in one line which rank died and how to resume.

Processes are started by torch's own `torch.multiprocessing.start_processes`; the
rendezvous is `torch.distributed`'s env:// (the variables torchrun sets, which the start
here sets the same way).
"""
from __future__ import annotations

import datetime
import logging
import os
import signal
import socket
import sys

#: Seconds a collective waits for the other ranks before it fails (a hung rank), unless
#: CL_DIST_TIMEOUT says otherwise.
DEFAULT_TIMEOUT_S = 600


def launched_world() -> int:
    """The number of processes this one is part of, as torchrun (or `spawn`) said in WORLD_SIZE; 1 alone."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a whole number") from None


def check_data_parallel(cfg, only: list[str] | None, devices: int) -> None:
    """Refuse, before anything runs, a strategy that does not say it splits exactly
    (`Strategy.data_parallel`): one line naming it."""
    from cl.config.registry import STRATEGIES, plugins_from

    runs = cfg.run_specs()
    with plugins_from(cfg.source_dir):
        for label in only or list(runs):
            for spec in runs.get(label, ()):
                if not getattr(STRATEGIES.get(spec.name), "data_parallel", False):
                    raise ValueError(f"strategy {spec.name} (run {label}) is not data-parallel: --devices {devices} "
                                     f"needs strategies whose statistics are reduced over the processes, which say "
                                     f"so with `data_parallel = True` (docs/guide/context.md); run it with --devices 1")


def agree(value):
    """Rank 0's `value` on every rank (a decision only rank 0 can make, e.g. from its journal);
    `value` itself on one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def free_port() -> int:
    """A TCP port free on this machine now, for the rendezvous of the processes started here."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: The exit code of a rank that stopped because another rank's failure broke a collective.
PEER_FAILED = 75


def spawn(args, devices: int, command) -> int:
    """Run `command(args, rank, world, PEER_FAILED)` (the CLI's `rank_main`, handed down: this
    layer may not import the CLI) on `devices` processes started by torch's multiprocessing,
    and return the run's exit code. Where a rank fails, one line names the rank that failed
    first (not those that stopped because of it) and how the run resumes."""
    import torch.multiprocessing as mp

    port = free_port()
    _quiet_resource_tracker()
    quiet = logging.getLogger("torch.multiprocessing.spawn")
    level, quiet.level = quiet.level, logging.ERROR  # torch's "Terminating process" warnings: ours says it
    context = mp.start_processes(_worker, args=(devices, port, args, command), nprocs=devices, join=False,
                                 start_method="spawn")
    try:
        while not context.join(grace_period=30):
            pass
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as err:
        codes = [p.exitcode for p in context.processes]
        return _report_failure(args, devices, codes, err)
    finally:
        quiet.level = level
    return 0


def _quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker told to ignore the semaphores of a rank that
    was killed: its warning at the end would say, in a traceback-like line, what the one
    line of `_report_failure` says. It takes the interpreter's -W options when started."""
    from multiprocessing import resource_tracker

    flag = "ignore:resource_tracker:UserWarning"
    added = flag not in sys.warnoptions
    if added:
        sys.warnoptions.append(flag)
    try:
        resource_tracker.ensure_running()
    finally:
        if added:
            sys.warnoptions.remove(flag)


def resume_hint(args) -> str:
    """How a data-parallel run that ended early goes on."""
    if not args.checkpoint_dir:
        return "nothing to resume from (the run had no --checkpoint-dir)"
    return f"the same command with --resume goes on from the last checkpoint in {args.checkpoint_dir}"


def collective_broke(err: BaseException) -> bool:
    """Whether `err` is a collective failing because another rank is gone or hung (gloo's
    closed connections and timeouts, NCCL's aborts): this rank did nothing wrong."""
    import torch.distributed as dist

    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        k in text for k in ("Connection closed by peer", "Connection reset by peer", "Timed out waiting",
                            "timed out", "gloo", "NCCL", "Broken pipe"))


def _report_failure(args, devices: int, codes: list[int | None], err) -> int:
    """The exit code of a data-parallel run that ended early and, for a rank that died
    without a word (a signal, the OOM killer), the one line that says so."""
    failed = [(r, c) for r, c in enumerate(codes) if c not in (0, PEER_FAILED, None)]
    rank, code = failed[0] if failed else (err.error_index, codes[err.error_index] or 1)
    if code in (130, -signal.SIGINT):  # an interrupt: rank 0 said so and closed its runs KILLED
        return 130
    if code > 0:  # the rank said what failed, in its own line (bad input: rank 0's)
        return code
    try:
        what = signal.Signals(-code).name
    except ValueError:
        what = f"signal {-code}"
    print(f"cl: error: rank {rank} of {devices} was killed ({what}); the other ranks stopped; {resume_hint(args)}",
          file=sys.stderr)
    return 1


def _worker(local_rank: int, world: int, port: int, args, command) -> None:
    """One process of `spawn`: the variables torchrun would set, then the command, through
    `command` (the CLI's `rank_main`, handed down: this layer may not import the CLI)."""
    os.environ.update({"RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    _share_cores(local_rank, world)
    from cl import console

    console.install()  # a spawned process starts bare: the lab's lines are printed as `cl run` prints them
    code = command(args, local_rank, world, PEER_FAILED)
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        raise SystemExit(code)  # the exit code as is: the launcher tells a failed rank from one that stopped


def _share_cores(rank: int, world: int) -> None:
    """Each process started here on the CPU gets its own share of the cores, so N processes
    do not each start as many threads as the machine has (the run's thread count follows)."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux: torch's default threads
        return
    if len(cores) >= world:
        os.sched_setaffinity(0, cores[rank::world])


def setup(args, cfg_device: str) -> tuple[int, int]:
    """Join the process group (gloo on the CPU, NCCL on GPUs) and quiet every rank but 0: no
    tracking, no checkpoints, no progress, nothing on standard output. Returns (rank, world)."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", "0")), launched_world()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = cfg_device != "cpu" and torch.cuda.is_available()
    if cuda:
        # One GPU per process: the run's `device` names this rank's (a `--set device=` says otherwise).
        torch.cuda.set_device(local_rank)
        if not any(o.startswith("device=") for o in args.overrides):
            args.overrides = [*args.overrides, f"device=cuda:{local_rank}"]
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("CL_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timeout)
    if rank != 0:  # checkpoints are read by every rank on --resume, written by rank 0 alone (the trainer)
        args.no_track, args.no_progress, args.json = True, True, False
        sys.stdout = open(os.devnull, "w")
        logging.getLogger("cl").setLevel(logging.ERROR)
    return rank, world


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
