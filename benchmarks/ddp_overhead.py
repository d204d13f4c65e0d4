"""What torch's DistributedDataParallel itself costs a small model's step, without the lab.

The lab's data-parallel step (benchmarks/scale.py) is DDP plus the lab's own work: row shares,
one all-reduce of the loss terms a step. This script times the same model in plain torch, so a
ratio in scale.py can be split into torch's part and the lab's:

  plain     one process, no process group: forward, cross-entropy, backward, SGD step
  ddp1      the same through DDP over a gloo group of one process
  ddp2      DDP over 2 gloo processes, each on its own core with half the batch
  ddp2+1    ddp2 plus one all-reduce of a 1-element tensor a step (what the lab adds)

    python benchmarks/ddp_overhead.py [--model mlp] [--batch 32] [--steps 600] [--rounds 5]

Every process runs one thread, pinned (plain and ddp1 on the first allowed core, ddp2's
ranks on the first two). Prints median and fastest milliseconds a step over the rounds.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "mlp":  # the Split-MNIST MLP of experiments/split_mnist
        return torch.nn.Sequential(torch.nn.Linear(784, 400), torch.nn.ReLU(), torch.nn.Linear(400, 400),
                                   torch.nn.ReLU(), torch.nn.Linear(400, 10))
    raise SystemExit(f"ddp_overhead.py: unknown model {name!r} (mlp)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_steps(model, params, rows: int, steps: int, extra_reduce: bool) -> float:
    """Milliseconds a step, after 50 untimed steps."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(rows, 784, generator=g), torch.randint(0, 10, (rows,), generator=g)
    optimizer = torch.optim.SGD(params, lr=0.01)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if extra_reduce:
            dist.all_reduce(loss.detach().reshape(1).clone())
        loss.backward()
        optimizer.step()

    for _ in range(50):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1e3


def one_process(variant: str, args, core: int, port: int) -> float:
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    model = build(args.model)
    if variant == "plain":
        return timed_steps(model, model.parameters(), args.batch, args.steps, False)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        return timed_steps(ddp, model.parameters(), args.batch, args.steps, False)
    finally:
        dist.destroy_process_group()


def rank_worker(rank: int, args, cores: list[int], port: int, extra: bool, out) -> None:
    os.sched_setaffinity(0, {cores[rank]})
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = build(args.model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ms = timed_steps(ddp, model.parameters(), args.batch // 2, args.steps, extra)
    dist.barrier()
    if rank == 0:
        out.put(ms)
    dist.destroy_process_group()


def two_processes(args, cores: list[int], extra: bool) -> float:
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(rank_worker, (args, cores, free_port(), extra, queue), nprocs=2)
    return queue.get()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mlp")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    variants = ["plain", "ddp1"] + (["ddp2", "ddp2+1"] if len(cores) >= 2 else [])
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            if v in ("plain", "ddp1"):
                ctx = mp.get_context("spawn")
                with ctx.Pool(1) as pool:  # a fresh process each: no group or thread setting leaks
                    times[v].append(pool.apply(one_process, (v, args, cores[0], free_port())))
            else:
                times[v].append(two_processes(args, cores, v == "ddp2+1"))
        print(f"round {r + 1}: " + ", ".join(f"{v} {times[v][-1]:.3f} ms" for v in variants), flush=True)
    base = statistics.median(times["plain"])
    print(f"\n{args.model}, global batch {args.batch}, {args.steps} steps a run, {args.rounds} rounds; ms a step")
    for v in variants:
        med = statistics.median(times[v])
        print(f"  {v:<7} median {med:7.3f}  fastest {min(times[v]):7.3f}  median / plain {med / base:5.2f}")


if __name__ == "__main__":
    main()
