"""Per-experience cost along a long online stream: is the overhead flat?

Split-MNIST (5 tasks, classes 0..9 in order) cut into online experiences of
`--experience-size` samples (60 gives 1,000 experiences), trained once each in
batches of 10 with experience replay (reservoir, 500 samples, 10 replayed per
batch), evaluated at the end of each task. Prints the mean seconds per
experience over the first and the last 100 experiences, and their ratio.

    python benchmarks/online_overhead.py [--experience-size 60] [--strategy replay|naive]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import cl.config.components  # noqa: F401
from cl.config.schema import TrainingConfig
from cl.models import MLP
from cl.training.trainer import LifelongTrainer
from strategies import Naive, Replay
from streams import class_incremental, mnist, online


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--experience-size", type=int, default=60)
    p.add_argument("--strategy", default="replay", choices=["replay", "naive"])
    args = p.parse_args()
    root = os.environ.get("CL_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    stream = online(class_incremental(mnist(data_dir=root, download=False), n_experiences=5,
                                      class_order=list(range(10))), args.experience_size)
    torch.manual_seed(0)
    model = MLP(stream.input_shape, stream.n_classes, hidden=(400, 400))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    strategy = Replay(500, 10, "reservoir") if args.strategy == "replay" else Naive()
    trainer = LifelongTrainer(model, opt, [strategy], TrainingConfig(batch_size=10))
    start = time.perf_counter()
    record = trainer.fit(stream)
    wall = time.perf_counter() - start
    times = record.experience_time_s
    first, last = statistics.mean(times[:100]), statistics.mean(times[-100:])
    print(f"online Split-MNIST, {len(stream)} experiences of {args.experience_size} samples, {args.strategy}")
    print(f"  mean time per experience: first 100 = {first * 1e3:.2f} ms, last 100 = {last * 1e3:.2f} ms, "
          f"last/first = {last / first:.2f}")
    med_first, med_last = statistics.median(times[:100]), statistics.median(times[-100:])
    print(f"  median time per experience: first 100 = {med_first * 1e3:.2f} ms, last 100 = {med_last * 1e3:.2f} ms, "
          f"last/first = {med_last / med_first:.2f}")
    print(f"  median over all = {statistics.median(times) * 1e3:.2f} ms; training {record.train_time_s:.1f} s, "
          f"wall {wall:.1f} s; final ACC {record.accuracy_matrix[-1].mean():.4f}")


if __name__ == "__main__":
    main()
