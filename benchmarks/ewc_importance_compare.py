"""Online EWC on Permuted-MNIST, the lab against avalanche-lib: Fisher and penalty on the SAME
weights, then the Fisher each side holds on its own weights.

The lab's online EWC (`catalogue/permuted_mnist.yaml`: (lambda / 2) gamma = 100, gamma 0.9,
`fisher: batched`) ends 2.2 points below avalanche-lib's (`EWCPlugin`, online, lambda 100,
decay 0.9, the bench `../shared/bench/avalanche_split_mnist.py --scenario permuted`), on each of
seeds 0-2. The two penalties are the same on paper. This script looks for where they part:

1. The computation: on the lab's weights after each experience and the lab's experience data
   (prepared: normalised and permuted), the Fisher the lab's way (`_batched_fisher`: eval mode,
   in-order groups of 32, squared mini-batch mean gradients, mean over groups) against
   avalanche-lib's own `EWCPlugin.compute_importances` on the same tensors.
2. The batch order: the same comparison with the samples sorted by class, the lab's
   `fisher_batches: class` against avalanche-lib's computation on the class-sorted data, and
   the ratio of the class-order Fisher to the data-order one.
3. What each side holds: per side, after each experience, the running Fisher's largest entry
   and sum per layer (on that side's own weights and data), 2 lambda F_max lr against
   heavy-ball SGD's stability limit 2 (1 + momentum) = 3.8, and the accuracy on every
   experience seen so far.

    export CL_DATA_DIR=/work/shared/data
    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/ewc_importance_compare.py --seed 0 --experiences 3

Measured 2026-12-05 (seed 0): on the same weights and data the two computations agree
(every layer's max and sum ratio 1.0000, elementwise within 5e-7), in either batch order.
But avalanche-lib's experience datasets are sorted by class, so its Fisher pass sees
one-class batches, whose gradients add up: batched one class at a time, the Fisher is
1.3-3.6x the data-order one. With the lab's run in data order, the Fisher held after
experience 0 was 2-6x smaller than avalanche-lib's (head weights' sum 0.17 against 0.49).
With `fisher_batches: class` the held running Fisher after experience 1 matches within 4%
per layer in sum (head weights 0.794 against 0.797).
"""
from __future__ import annotations

import argparse
import copy
import os
import time
import warnings
from pathlib import Path

import torch
from mas_importance_compare import load_ordered  # beside this script (run as a script, its folder is on the path)

warnings.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "experiments" / "catalogue" / "permuted_mnist.yaml"
LR, MOMENTUM, LAMBDA, DECAY = 0.01, 0.9, 100.0, 0.9


def lab_run(seed: int, n_exp: int):
    """The catalogue's `online_ewc` run through the lab's trainer, stopped after `n_exp`
    experiences: the stream, and the weights and running Fisher after each experience."""
    from cl.config.components import build_model_from, build_optimizer, build_stream, build_strategies
    from cl.config.files import load_experiment
    from cl.training.seeds import seed_everything
    from cl.training.trainer import LifelongTrainer
    from strategies.base import Strategy
    from strategies.regularization import OnlineEWC

    cfg = load_experiment(YAML, [f"seed={seed}", "threads=1"])
    stream = build_stream(cfg)
    seed_everything(cfg.seed)
    model = build_model_from(cfg, stream)
    optimizer, scheduler = build_optimizer(cfg, model)
    strategies = build_strategies(cfg.run_specs()["online_ewc"])
    ewc = strategies[0]
    assert isinstance(ewc, OnlineEWC), type(ewc)
    snaps = []

    class Snapshot(Strategy):
        def after_experience(self, ctx, data):
            snaps.append({"weights": copy.deepcopy(ctx.model.state_dict()),
                          "fisher": {n: v.clone() for n, v in ewc.running.items()}})

    trainer = LifelongTrainer(model, optimizer, strategies + [Snapshot()], cfg.training, seed=cfg.seed, scheduler=scheduler)
    trainer.fit(stream, stop_after=n_exp)
    return stream, snaps, trainer, ewc


def avalanche_run(seed: int, n_exp: int, root: str):
    """avalanche-lib's online EWC as the bench runs it, stopped after `n_exp` experiences."""
    from avalanche.benchmarks.classic import PermutedMNIST
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.models import SimpleMLP
    from avalanche.training import EWC
    from avalanche.training.plugins import EvaluationPlugin, EWCPlugin

    torch.manual_seed(seed)
    bench = PermutedMNIST(n_experiences=10, seed=seed, dataset_root=root)
    model = SimpleMLP(num_classes=10, hidden_size=400, hidden_layers=2, drop_rate=0)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    strategy = EWC(model=model, optimizer=opt, criterion=torch.nn.CrossEntropyLoss(), train_mb_size=32,
                   train_epochs=1, eval_mb_size=1024, device="cpu",
                   evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]),
                   ewc_lambda=LAMBDA, mode="online", decay_factor=DECAY)
    plugin = next(p for p in strategy.plugins if isinstance(p, EWCPlugin))
    snaps = []
    for e, exp in enumerate(list(bench.train_stream)[:n_exp]):
        strategy.train(exp)
        held = plugin.importances[max(plugin.importances)]
        snaps.append({"weights": [p.detach().clone() for p in model.parameters()],
                      "fisher": [held[n].data.clone() for n, _ in model.named_parameters()],
                      "keys": sorted(plugin.importances)})
    return bench, snaps, strategy


def avalanche_fisher(model, x, y):
    from avalanche.training.plugins import EWCPlugin
    ds = torch.utils.data.TensorDataset(x, y, torch.zeros(len(y), dtype=torch.long))
    imp = EWCPlugin(LAMBDA, mode="online", decay_factor=DECAY).compute_importances(
        model, torch.nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.0), ds, "cpu", 32)
    model.zero_grad(set_to_none=True)
    return [imp[n].data.clone() for n, _ in model.named_parameters()]


def accuracy(model, x, y) -> float:
    with torch.inference_mode():
        return float((model(x).argmax(-1) == y).float().mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--experiences", type=int, default=3)
    parser.add_argument("--data", default=os.environ.get("CL_DATA_DIR", "/work/shared/data"))
    args = parser.parse_args()
    os.environ.setdefault("CL_DATA_DIR", args.data)
    torch.set_num_threads(1)
    from strategies.regularization import _batched_fisher

    t0 = time.perf_counter()
    stream, lab_snaps, trainer, ewc = lab_run(args.seed, args.experiences)
    t1 = time.perf_counter()
    bench, ava_snaps, strategy = avalanche_run(args.seed, args.experiences, args.data)
    print(f"seed {args.seed}: lab {t1 - t0:.0f} s, avalanche-lib {time.perf_counter() - t1:.0f} s "
          f"for {args.experiences} experiences; avalanche-lib's importance keys after each: "
          f"{[s['keys'] for s in ava_snaps]}")
    ctx = trainer.ctx
    model = ctx.model
    names = [n for n, _ in model.named_parameters()]
    ava_model = strategy.model
    for e in range(args.experiences):
        exp = stream.experiences[e]
        ctx.experience = exp
        lx, ly = ctx.prepare(exp.train.x), exp.train.y
        load_ordered(model, [lab_snaps[e]["weights"][n] for n in names])
        lab_way = _batched_fisher(ctx, exp.train, 32, None, None)
        ava_way = avalanche_fisher(model, lx, ly)
        order = torch.sort(ly, stable=True).indices  # avalanche-lib's experience datasets are sorted by class
        lab_class = _batched_fisher(ctx, exp.train, 32, None, None, "class")
        ava_class = avalanche_fisher(model, lx[order], ly[order])
        for title, a_way, b_way in (("in the data's order", lab_way, ava_way),
                                    ("one class per batch (`fisher_batches: class`; avalanche-lib's on the "
                                     "class-sorted data)", lab_class, ava_class)):
            print(f"\n=== experience {e}, {title}: on the lab's weights and data, lab's Fisher / "
                  f"avalanche-lib's (max, sum, largest elementwise rel diff):")
            for n, a, b in zip(names, [a_way[n] for n in names], b_way):
                rel = float(((a - b).abs() / b.abs().clamp_min(1e-12 * float(b.abs().max()))).max())
                print(f"    {n:18s} {float(a.max() / b.max()):.4f}  {float(a.sum() / b.sum()):.4f}  {rel:.3g}")
        print("  class order / data order, lab's weights (max, sum): " + "  ".join(
            f"{n} {float(lab_class[n].max() / lab_way[n].max()):.2f} {float(lab_class[n].sum() / lab_way[n].sum()):.2f}"
            for n in names))
        # held (running) Fisher, each side's own weights and data
        for side, held in (("lab", [lab_snaps[e]["fisher"][n] for n in names]), ("avalanche", ava_snaps[e]["fisher"])):
            fmax = max(float(v.max()) for v in held)
            print(f"  {side:9s} held F: " + "  ".join(f"{n.split('.')[-2] if '.' in n else n}.{n[-1]} max "
                                                      f"{float(v.max()):.4g} sum {float(v.sum()):.4g}"
                                                      for n, v in zip(names, held))
                  + f";  2 lambda F_max lr = {2 * LAMBDA * fmax * LR:.2f}")
        # accuracy on the experiences seen so far, each side on its own test data
        load_ordered(model, [lab_snaps[e]["weights"][n] for n in names])
        lab_acc = [accuracy(model, ctx.prepare(stream.experiences[k].test.x), stream.experiences[k].test.y)
                   for k in range(e + 1)]
        load_ordered(ava_model, ava_snaps[e]["weights"])
        ava_acc = []
        for k in range(e + 1):
            tx, ty = zip(*[(s[0], s[1]) for s in bench.test_stream[k].dataset])
            ava_acc.append(accuracy(ava_model.eval(), torch.stack(tx), torch.tensor(ty)))
        print(f"  accuracy on experiences 0..{e}: lab {[round(a, 4) for a in lab_acc]}  "
              f"avalanche-lib {[round(a, 4) for a in ava_acc]}")


if __name__ == "__main__":
    main()
