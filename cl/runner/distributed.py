"""Data-parallel runs: `cl run FILE --devices N` on one machine, or the same command under
`torchrun --nproc-per-node N -m cl run FILE`.

The design rule: a run on N processes is the same computation as on one, split. Every rank
builds the same stream, model and strategies from the same seed and draws the same global
batches; the trainer (`cl.training.trainer`) gives each rank its share of the rows of every
batch and DistributedDataParallel averages the gradients. Only rank 0 tracks, checkpoints
and prints; the other ranks train silently beside it.

This slice supports Naive and Replay; any other strategy is refused before anything runs.
Evaluation is not split: every rank evaluates the whole test sets (the same numbers), rank 0
reports them. `--resume` is not yet supported on several processes.

Processes are started by torch's own `torch.multiprocessing.start_processes`; the
rendezvous is `torch.distributed`'s env:// (the variables torchrun sets, which the start
here sets the same way).
"""
from __future__ import annotations

import logging
import os
import socket
import sys

#: Strategies whose data-parallel run is the one-process computation, split (registry names).
DATA_PARALLEL = ("naive", "replay", "der", "derpp")


def launched_world() -> int:
    """The number of processes this one is part of, as torchrun (or `spawn`) said in WORLD_SIZE; 1 alone."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a whole number") from None


def check_data_parallel(cfg, only: list[str] | None, devices: int, resume: bool) -> None:
    """Refuse, before anything runs, what this slice cannot split exactly: one line naming it."""
    runs = cfg.run_specs()
    labels = only or list(runs)
    for label in labels:
        for spec in runs.get(label, ()):
            if spec.name not in DATA_PARALLEL:
                raise ValueError(f"strategy {spec.name} (run {label}) is not yet data-parallel: --devices {devices} "
                                 f"supports {' and '.join(DATA_PARALLEL)}; run it with --devices 1")
    if resume:
        raise ValueError(f"--resume is not yet data-parallel: resume with --devices 1")


def free_port() -> int:
    """A TCP port free on this machine now, for the rendezvous of the processes started here."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args, devices: int, command) -> int:
    """Run `command(args)` (the `cl run` command, handed down by the CLI, which this layer may
    not import) on `devices` processes started by torch's multiprocessing, and return the
    command's exit code (rank 0's, or the first failing rank's)."""
    import torch.multiprocessing as mp

    port = free_port()
    try:
        mp.start_processes(_worker, args=(devices, port, args, command), nprocs=devices, join=True,
                           start_method="spawn")
    except mp.ProcessExitedException as err:
        return err.exit_code if err.exit_code and err.exit_code > 0 else 1
    except mp.ProcessRaisedException as err:
        print(f"cl: error: rank {err.error_index} failed: {str(err).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    return 0


def _worker(local_rank: int, world: int, port: int, args, command) -> None:
    """One process of `spawn`: the variables torchrun would set, then the command itself."""
    os.environ.update({"RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    _share_cores(local_rank, world)
    from cl import console

    console.install()  # a spawned process starts bare: the lab's lines are printed as `cl run` prints them
    code = command(args)
    sys.stdout.flush()
    if code:
        raise SystemExit(code)


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
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    if rank != 0:
        args.no_track, args.no_progress, args.json, args.checkpoint_dir = True, True, False, None
        sys.stdout = open(os.devnull, "w")
        logging.getLogger("cl").setLevel(logging.ERROR)
    return rank, world


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
