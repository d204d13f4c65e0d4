"""bf16-mixed against float32 for every catalogue strategy on Split-Digits, over seeds.

Each strategy trains the whole 5-experience Split-Digits stream once per seed at
`training.precision: 32` and once at `bf16-mixed` (an MLP with one hidden layer of 64
under SGD, or for the prompt methods a 5-block ViT of width 32 under Adam: the settings
tests/test_catalogue.py runs the catalogue with), and the table gives the final ACC
(mean over seeds) of both, their difference in points, and the steps skipped for a
non-finite loss. The issue's bar: every |difference| within 2 points.

    python benchmarks/precision_catalogue.py [--seeds 0,1,2] [--only ewc,der] [--precision bf16-mixed]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cl.config.components  # noqa: F401,E402  (registers the built-in components)
from cl.config.schema import TrainingConfig  # noqa: E402
from cl.models import MLP  # noqa: E402
from cl.training.trainer import LifelongTrainer  # noqa: E402
from strategies import STRATEGIES  # noqa: E402
from streams import class_incremental, digits  # noqa: E402

#: Small memories and sample counts, as the catalogue's tests use (a stiffer EWC diverges under SGD at lr 0.05).
SMALL = {"replay": {"memory_size": 50}, "der": {"memory_size": 50}, "derpp": {"memory_size": 50},
         "er_ace": {"memory_size": 50}, "gdumb": {"memory_size": 50}, "gem": {"patterns_per_experience": 20},
         "agem": {"patterns_per_experience": 20, "sample_size": 16}, "icarl": {"memory_size": 50},
         "power_law_rehearsal": {"budget": 50, "memory_per_task": 40},
         "ewc": {"fisher_samples": 64, "strength": 5.0}, "online_ewc": {"fisher_samples": 64, "strength": 5.0},
         "mas": {"importance_samples": 64},
         "l2p": {"pool_size": 4, "prompt_length": 2, "top_k": 2}, "dualprompt": {"g_length": 2, "e_length": 2},
         "coda_prompt": {"n_components": 10, "prompt_length": 2},
         "apg": {"samples_per_step": 16, "finetune_epochs": 2, "finetune_epochs_per_task": 1,
                 "finetune_samples_per_class": 16},
         "ovor": {"lengths": [2, 2, 3, 3, 3], "k": 5, "boundary_per_class": 4, "candidates": 20,
                  "outliers_per_class": 6}}
ON_A_VIT = {"l2p", "dualprompt", "coda_prompt", "apg", "ovor"}


def model_and_optimizer(name: str, stream, seed: int):
    torch.manual_seed(seed)
    if name in ON_A_VIT:
        import timm

        vit = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, in_chans=1, embed_dim=32,
                                depth=5, num_heads=2, num_classes=stream.n_classes)
        return vit, torch.optim.Adam(vit.parameters(), lr=0.01)
    mlp = MLP(stream.input_shape, stream.n_classes, hidden=(64,))
    return mlp, torch.optim.SGD(mlp.parameters(), lr=0.05, momentum=0.9)


def final_acc(name: str, stream, seed: int, precision: str) -> tuple[float, int]:
    """The run's final ACC and its steps skipped for a non-finite loss."""
    model, optimizer = model_and_optimizer(name, stream, seed)
    settings = TrainingConfig(batch_size=32, precision=precision, nonfinite="skip")
    trainer = LifelongTrainer(model, optimizer, [STRATEGIES[name](**SMALL.get(name, {}))], settings, seed=seed)
    record = trainer.fit(stream)
    return float(np.mean(record.accuracy_matrix[-1])), record.skipped_steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default="")
    parser.add_argument("--precision", default="bf16-mixed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a table, not a speed test: leave the other cores alone
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.only.split(",") if args.only else sorted(STRATEGIES)
    stream = class_incremental(digits(), n_experiences=5)
    print(f"| strategy | ACC 32 | ACC {args.precision} | diff (points) | skipped steps (32 / mixed) |")
    print("|---|---|---|---|---|")
    worst, start = 0.0, time.perf_counter()
    for name in names:
        runs = {p: [final_acc(name, stream, seed, p) for seed in seeds] for p in ("32", args.precision)}
        acc = {p: float(np.mean([a for a, _ in r])) for p, r in runs.items()}
        skipped = {p: sum(s for _, s in r) for p, r in runs.items()}
        diff = 100 * (acc[args.precision] - acc["32"])
        worst = max(worst, abs(diff))
        print(f"| {name} | {100 * acc['32']:.2f} | {100 * acc[args.precision]:.2f} | {diff:+.2f} | "
              f"{skipped['32']} / {skipped[args.precision]} |", flush=True)
    print(f"\nseeds {seeds}; largest |difference| {worst:.2f} points; {time.perf_counter() - start:.0f} s")
    return 0 if worst <= 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
