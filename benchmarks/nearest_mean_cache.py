"""Nearest-mean on a frozen backbone costs one forward pass over the data.

With the feature cache (`cl.training.feature_cache`), a nearest-mean run (Janson et al. 2022) on a
frozen backbone should cost little more than the backbone's forward pass over the training
and test images, whatever the epochs and however many times it evaluates. This script
times, from a cold cache (a fresh CL_CACHE_DIR each round):

  run      `run_experiment` of a one-run file, nearest_mean with freeze_backbone, tracking off:
           the stream built, the model built (weights loaded), the features computed, hashed
           and written, the means taken and every evaluation row;
  forward  the same backbone's pooled features of the same training and test images, in
           eval mode, in batches of the same size, prepared by the same transform;

alternating the two for a few rounds, and prints the medians and their ratio (target: at
most 1.2). The data is a class-balanced subset of CIFAR-10 (`--train-per-class`,
`--test-per-class`), the stream B4-Inc2 (classes 0-3, then 4-5, 6-7, 8-9), the model the
ViT of experiments/cifar10_b4inc2.yaml, with its pre-trained weights when they are found
(`--weights`, default cifar10_vit_base4.safetensors in CL_WEIGHTS_DIR), else random ones.

    export CL_DATA_DIR=../shared/data
    taskset -c 0 python benchmarks/nearest_mean_cache.py --rounds 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cl.config.files import experiment_from_dict  # noqa: E402
from cl.config.models import build_model
from cl.models import resolve_weights  # noqa: E402
from cl.runner.invocation import run_experiment  # noqa: E402
from strategies.context import eval_mode, pooled_features  # noqa: E402
from streams.sources import CIFAR10_MEAN, CIFAR10_STD, cifar10  # noqa: E402

VIT = {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 6, "embed_dim": 192,
       "num_heads": 3}


def subset_npz(folder: Path, train_per_class: int, test_per_class: int) -> Path:
    """The first images of every class of CIFAR-10, as a numpy dataset file."""
    data = cifar10()
    arrays = {}
    for split, split_data, n in (("train", data.train, train_per_class), ("test", data.test, test_per_class)):
        rows = torch.cat([(split_data.y == c).nonzero().squeeze(1)[:n] for c in range(10)])
        arrays[f"x_{split}"] = split_data.x[rows].numpy()
        arrays[f"y_{split}"] = split_data.y[rows].numpy()
    path = folder / "cifar10_subset.npz"
    np.savez(path, **arrays)
    return path


def experiment(npz: Path, weights: str | None, batch_size: int) -> dict:
    model = {**VIT, **({"weights": weights} if weights else {})}
    return {"name": "bench-nearest-mean-cache", "seed": 0, "device": "cpu", "threads": 1, "progress": False,
            "stream": {"dataset": {"name": "numpy", "path": str(npz), "mean": list(CIFAR10_MEAN),
                                   "std": list(CIFAR10_STD)},
                       "scenario": {"name": "class_incremental", "classes_per_experience": [4, 2, 2, 2],
                                    "class_order": list(range(10))}},
            "model": model,
            "training": {"epochs": 1, "batch_size": 64, "eval_batch_size": batch_size,
                         "optimizer": {"name": "sgd", "lr": 0.01}},
            "strategies": [{"name": "nearest_mean", "freeze_backbone": True}]}


def time_run(raw: dict, cache: Path) -> tuple[float, float, dict]:
    """Wall and CPU seconds of one run, and its result."""
    import os

    os.environ["CL_CACHE_DIR"] = str(cache)  # cold: a folder no run has written
    start, cpu = time.perf_counter(), time.process_time()
    result = run_experiment(experiment_from_dict(raw), track=False)[0]
    return time.perf_counter() - start, time.process_time() - cpu, result


@torch.no_grad()
def time_forward(raw: dict, npz: Path, batch_size: int) -> tuple[float, float]:
    """Wall and CPU seconds of the forward pass."""
    from streams.user_data import numpy_arrays

    args = {k: v for k, v in raw["model"].items() if k != "name"}
    data = numpy_arrays(str(npz), mean=list(CIFAR10_MEAN), std=list(CIFAR10_STD))
    torch.manual_seed(0)
    model = build_model(raw["model"]["name"], data.input_shape, 10, **args)
    start, cpu = time.perf_counter(), time.process_time()
    with eval_mode(model):
        for split in (data.train, data.test):
            for x, _, _ in split.batches(batch_size, shuffle=False):
                pooled_features(model, data.transform(x))
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-per-class", type=int, default=500)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=512, help="forward-pass batch (the run's eval_batch_size)")
    p.add_argument("--weights", default="cifar10_vit_base4.safetensors",
                   help="backbone weights (relative: CL_WEIGHTS_DIR); random weights when not found")
    args = p.parse_args()
    torch.set_num_threads(1)
    try:
        weights = str(resolve_weights(args.weights))
    except FileNotFoundError:
        weights = None
        print(f"no weights file {args.weights}: random backbone weights", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        npz = subset_npz(Path(tmp), args.train_per_class, args.test_per_class)
        raw = experiment(npz, weights, args.batch_size)
        time_forward(raw, npz, args.batch_size)  # warm-up: first-call costs of both paths, once
        runs, forwards, result = [], [], None  # (wall, cpu) pairs
        for r in range(args.rounds):
            *seconds, result = time_run(raw, Path(tmp) / f"cache{r}")
            runs.append(seconds)
            forwards.append(time_forward(raw, npz, args.batch_size))
            print(f"round {r + 1}: run {runs[-1][0]:.2f} s (CPU {runs[-1][1]:.2f} s), forward {forwards[-1][0]:.2f} s "
                  f"(CPU {forwards[-1][1]:.2f} s)", file=sys.stderr)
        warm, _, _ = time_run(raw, Path(tmp) / "cache0")  # the first cold round's files: a warm cache
    n = 10 * (args.train_per_class + args.test_per_class)
    out = {"images": n, "weights": weights, "rounds": args.rounds, "threads": torch.get_num_threads(),
           "acc": result["acc"], "feature_rows_computed": result["feature_rows_computed"], "warm_cache_run_s": warm}
    # Wall time is what a user waits; CPU time (one thread) is the work, unmoved by other processes on the core.
    for k, kind in enumerate(("wall", "cpu")):
        run, forward = statistics.median(r[k] for r in runs), statistics.median(f[k] for f in forwards)
        out.update({f"run_{kind}_s": [r[k] for r in runs], f"forward_{kind}_s": [f[k] for f in forwards],
                    f"run_{kind}_median_s": run, f"forward_{kind}_median_s": forward, f"ratio_{kind}": run / forward})
    print(f"nearest-mean run from a cold cache: {out['run_wall_median_s']:.2f} s wall, {out['run_cpu_median_s']:.2f} s "
          f"CPU (medians of {args.rounds}); one forward pass over the {n} train and test images: "
          f"{out['forward_wall_median_s']:.2f} s wall, {out['forward_cpu_median_s']:.2f} s CPU; ratio "
          f"{out['ratio_wall']:.3f} wall, {out['ratio_cpu']:.3f} CPU (target <= 1.2); warm cache: {warm:.2f} s; "
          f"ACC {out['acc']:.4f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
