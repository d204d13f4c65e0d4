"""MAS on Split-MNIST, the lab against avalanche-lib: importance and penalty on the SAME weights.

The lab's MAS (`strategies/regularization.py`, `catalogue/split_mnist.yaml`: lambda 1,
`importance_batch_size: 32`, `decay: 0.5`) diverged on 4 of seeds 0-6 (1, 3, 5, 6),
avalanche-lib's (`MASPlugin`, lambda 1, alpha 0.5, the bench
`../shared/bench/avalanche_split_mnist.py`) on 1 (seed 3). Importances measured before came from different trained weights. This script
separates the two possible causes:

1. The computation. Both sides are trained through the first experience(s) of a seed, each as
   its own run does it (the lab through its trainer with the catalogue's `mas` run,
   avalanche-lib as the bench does it), and the weights after each experience kept. On every
   one of these weight sets, and on the same experience data, the importance is computed
   (a) the lab's way (`MAS._per_group`: eval mode, in-order whole groups of 32, the last
   partial group dropped, mean over groups) and (b) avalanche-lib's way, by calling
   `MASPlugin._get_importance` itself (model.train(), in-order unshuffled DataLoader batches
   of train_mb_size 32, the last partial batch included, sum over batches / number of
   batches), on avalanche-lib's own experience dataset. Printed: the ratio lab / avalanche
   (of the largest importance per layer and of the sum), and whether the data are the same
   (the same samples; avalanche-lib's sorted by class, the lab's in MNIST's file order, so
   the groups differ in composition: that moves the first layer's summed importance, not the
   head's largest one).
2. The bookkeeping. The importance each side holds after experience 0 is compared with a
   fresh computation on that side's weights (does avalanche-lib halve the first one by
   averaging it with zeros? it does not if the ratio is 1), and the two penalties (values and
   gradients) are evaluated on the same importance, anchor and perturbed weights.
3. The trained weights. Per side, after each experience: the largest importance per layer,
   2 lambda Omega_max lr against heavy-ball SGD's stability limit 2 (1 + momentum) = 3.8, the
   mean squared logit norm on the experience's data, and the weights' norms.

Run (one core, one thread; about 1 min per seed and experience):

    export CL_DATA_DIR=/work/shared/data
    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/mas_importance_compare.py --seed 1
    ... --seed 3 --experiences 2     # through the second experience (where the lab diverges, if it does)

Measured 2026-12-05 (seeds 0-26, one experience; seeds 0-6 also two): on the same weights
the two computations agree to 0.04-0.07% on the head's largest importance, 0.13% at most on
any layer's (the lab's slightly larger: about half from the last partial batch of 25 samples,
which the lab drops and avalanche-lib averages in, half from the groups' composition); both
sides keep the first experience's importance as computed (ratio 1.0000: avalanche-lib does
not halve it); the two penalties agree to 1e-6. What differs is the trained weights: the
head's largest importance after experience 0 ranges 138-246 on both sides (lab 190 +- 27,
avalanche-lib 182 +- 28 over 27 seeds; Welch p = 0.29), following the logit scale, and
2 lambda Omega_max lr > 3.8 (Omega_max > 190) tells which of seeds 0-6 diverge in the second
experience (index 1), on both sides: lab 1, 3, 5, 6 (3.87-4.38), avalanche-lib 3 (4.30).
"""
from __future__ import annotations

import argparse
import copy
import os
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

warnings.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "experiments" / "catalogue" / "split_mnist.yaml"
LR, MOMENTUM, LAMBDA = 0.01, 0.9, 1.0


def lab_run(seed: int, n_exp: int, data_dir: str | None):
    """The catalogue's `mas` run through the lab's trainer, stopped after `n_exp` experiences:
    the stream, the weights and MAS's importance after each experience, and the trainer."""
    from cl.config.components import build_model_from, build_optimizer, build_stream, build_strategies
    from cl.config.files import load_experiment
    from cl.training.seeds import seed_everything
    from cl.training.trainer import LifelongTrainer
    from cl.training.nonfinite import NonFiniteLossError
    from strategies.base import Strategy
    from strategies.regularization import MAS

    if data_dir:
        os.environ.setdefault("CL_DATA_DIR", data_dir)
    overrides = [f"seed={seed}", "threads=1"]
    cfg = load_experiment(YAML, overrides)
    specs = cfg.run_specs()["mas"]
    stream = build_stream(cfg)
    seed_everything(cfg.seed)  # as `cl.runner.one_run.prepare_run`: the same initial weights as `cl run`
    model = build_model_from(cfg, stream)
    optimizer, scheduler = build_optimizer(cfg, model)
    strategies = build_strategies(specs)
    mas = strategies[0]
    assert isinstance(mas, MAS), type(mas)
    snaps = []

    class Snapshot(Strategy):  # after MAS's own after_experience (list order)
        def after_experience(self, ctx, data):
            snaps.append({"weights": copy.deepcopy(ctx.model.state_dict()),
                          "importance": {n: v.clone() for n, v in mas.importance.items()}})

    trainer = LifelongTrainer(model, optimizer, strategies + [Snapshot()], cfg.training, seed=cfg.seed, scheduler=scheduler)
    try:
        trainer.fit(stream, stop_after=n_exp)
    except NonFiniteLossError as err:  # what was kept before it still compares
        print(f"lab: {err}")
    return stream, snaps, trainer, mas


def avalanche_run(seed: int, n_exp: int, root: str):
    """avalanche-lib's MAS as the bench runs it, stopped after `n_exp` experiences: its
    experiences, and the weights and the plugin's importance after each."""
    from avalanche.benchmarks.classic import SplitMNIST
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.models import SimpleMLP
    from avalanche.training import MAS as AvaMAS
    from avalanche.training.plugins import EvaluationPlugin, MASPlugin

    torch.manual_seed(seed)
    bench = SplitMNIST(n_experiences=5, seed=seed, dataset_root=root, fixed_class_order=list(range(10)))
    model = SimpleMLP(num_classes=10, hidden_size=400, hidden_layers=2, drop_rate=0)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    strategy = AvaMAS(model=model, optimizer=opt, criterion=torch.nn.CrossEntropyLoss(), train_mb_size=32,
                      train_epochs=1, eval_mb_size=1024, device="cpu",
                      evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]),
                      lambda_reg=LAMBDA, alpha=0.5)
    plugin = next(p for p in strategy.plugins if isinstance(p, MASPlugin))
    snaps = []
    for exp in list(bench.train_stream)[:n_exp]:
        strategy.train(exp)
        snaps.append({"weights": [p.detach().clone() for p in model.parameters()],
                      "importance": [plugin.importance[n].data.clone() for n, _ in model.named_parameters()]})
    return bench, snaps, plugin


def load_ordered(model: torch.nn.Module, tensors: list[torch.Tensor]) -> None:
    """Copy parameters given in `named_parameters` order (the lab's MLP and avalanche-lib's
    SimpleMLP have the same layers: 784-400-400-10)."""
    with torch.no_grad():
        for p, v in zip(model.parameters(), tensors, strict=True):
            p.copy_(v)


def avalanche_importance(model, dataset):
    """avalanche-lib's own `MASPlugin._get_importance` on `model` and `dataset` (a stand-in for
    the strategy object holding what it reads); the model's modes are restored afterwards."""
    from avalanche.training.plugins import MASPlugin
    modes = [(m, m.training) for m in model.modules()]
    shim = SimpleNamespace(model=model, experience=SimpleNamespace(dataset=dataset), train_mb_size=32,
                           optimizer=torch.optim.SGD(model.parameters(), lr=0.0), device="cpu")
    try:
        imp = MASPlugin(lambda_reg=LAMBDA, alpha=0.5)._get_importance(shim)
    finally:
        model.zero_grad(set_to_none=True)
        for m, mode in modes:
            m.training = mode
    return [imp[n].data.clone() for n, _ in model.named_parameters()]


def dataset_tensors(dataset):
    xs, ys = zip(*[(s[0], s[1]) for s in dataset])
    return torch.stack(xs), torch.tensor(ys)


def layer_stats(names, imp):
    return {n: (float(v.max()), float(v.sum())) for n, v in zip(names, imp)}


def penalty_check(mas_cls, model, importance, anchor):
    """Both penalties on one importance and anchor, at perturbed weights: (lab value, avalanche
    value, largest relative gradient difference)."""
    from avalanche.training.plugins import MASPlugin
    from strategies.context import Context
    names = [n for n, _ in model.named_parameters()]
    lab = mas_cls(strength=LAMBDA, importance_batch_size=32, decay=0.5)
    lab.set_anchor(dict(zip(names, importance)), dict(zip(names, anchor)))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p, a in zip(model.parameters(), anchor):
            p.copy_(a + 0.01 * torch.randn(a.shape, generator=gen))
    ctx = Context(model, torch.optim.SGD(model.parameters(), lr=0.0), torch.device("cpu"))
    model.zero_grad(set_to_none=True)
    v_lab = lab.extra_loss(ctx, None)["mas"]
    v_lab.backward()
    g_lab = [p.grad.clone() for p in model.parameters()]

    plugin = MASPlugin(lambda_reg=LAMBDA, alpha=0.5)
    plugin.importance = dict(zip(names, importance))
    plugin.params = {n: a for n, a in zip(names, anchor)}
    # loss: truthy and negligible (the plugin refuses a zero loss)
    shim = SimpleNamespace(model=model, loss=torch.tensor(1e-30), clock=SimpleNamespace(train_exp_counter=1))
    model.zero_grad(set_to_none=True)
    plugin.before_backward(shim)
    v_ava = shim.loss - 1e-30
    v_ava.backward()
    g_ava = [p.grad.clone() for p in model.parameters()]
    gdiff = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(g_lab, g_ava))
    return float(v_lab), float(v_ava), gdiff


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--experiences", type=int, default=1,
                        help="train through this many experiences (the lab's seed 1 diverges in the second)")
    parser.add_argument("--data", default=os.environ.get("CL_DATA_DIR", "/work/shared/data"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    from cl.models import MLP
    from strategies.regularization import MAS

    t0 = time.perf_counter()
    stream, lab_snaps, trainer, mas = lab_run(args.seed, args.experiences, args.data)
    t1 = time.perf_counter()
    bench, ava_snaps, plugin = avalanche_run(args.seed, args.experiences, args.data)
    t2 = time.perf_counter()
    print(f"seed {args.seed}: lab trained {args.experiences} experiences in {t1 - t0:.0f} s, "
          f"avalanche-lib in {t2 - t1:.0f} s")

    ctx = trainer.ctx
    model = ctx.model  # the lab's MLP, reloaded with each weight set below
    names = [n for n, _ in model.named_parameters()]
    short = {n: n.replace("features.", "fc").replace(".weight", ".W").replace(".bias", ".b") for n in names}
    lab_weights = [[s["weights"][n] for n in names] for s in lab_snaps]
    lab_imps = [[s["importance"][n] for n in names] for s in lab_snaps]
    ava_weights = [s["weights"] for s in ava_snaps]
    ava_imps = [s["importance"] for s in ava_snaps]

    for e in range(min(len(lab_snaps), len(ava_snaps))):
        lab_exp = stream.experiences[e]
        ava_ds = bench.train_stream[e].dataset
        ax, ay = dataset_tensors(ava_ds)
        lx = ctx.prepare(lab_exp.train.x)
        same_order = len(ax) == len(lx) and torch.equal(ay, lab_exp.train.y) and torch.allclose(ax, lx, atol=1e-6)
        same_set = len(ax) == len(lx) and torch.equal(ay.bincount(), lab_exp.train.y.bincount()) and torch.allclose(
            lx.flatten(1).sum(1).sort().values, ax.flatten(1).sum(1).sort().values, atol=1e-3)
        changes = int((ay[1:] != ay[:-1]).sum())
        print(f"\n=== experience {e} (classes {lab_exp.classes}): {len(lx)} samples in the lab, {len(ax)} in "
              f"avalanche-lib; same samples: {same_set}, in the same order: {same_order} "
              f"(avalanche-lib's label changes {changes} times along its order, the lab's "
              f"{int((lab_exp.train.y[1:] != lab_exp.train.y[:-1]).sum())})")
        ctx.experience = lab_exp
        rows = []
        for label, weights in (("lab weights", lab_weights[e]), ("avalanche weights", ava_weights[e])):
            load_ordered(model, weights)
            lab_way = mas._per_group(ctx)
            lab_way = [lab_way[n] for n in names]
            ava_way = avalanche_importance(model, ava_ds)
            rows.append((label, lab_way, ava_way))
            print(f"  {label}: importance of experience {e}, lab's computation / avalanche-lib's "
                  f"(max ratio, sum ratio, largest elementwise |rel diff|):")
            for n, a, b in zip(names, lab_way, ava_way):
                rel = float(((a - b).abs() / b.abs().clamp_min(1e-12 * float(b.abs().max()))).max())
                print(f"    {short[n]:8s} max {float(a.max()):9.3f} / {float(b.max()):9.3f} = "
                      f"{float(a.max() / b.max()):.4f}   sum {float(a.sum() / b.sum()):.4f}   rel {rel:.3g}")
        # bookkeeping: what each side holds after experience e against a fresh computation
        lab_held, ava_held = lab_imps[e], ava_imps[e]
        if e == 0:
            lab_fresh, ava_fresh = rows[0][1], rows[1][2]
            print("  importance held after experience 0 / fresh computation on that side's own weights "
                  "(1: not halved, 0.5: averaged with zeros):")
        else:
            lab_fresh = [0.5 * p + 0.5 * c for p, c in zip(lab_imps[e - 1], rows[0][1])]
            ava_fresh = [0.5 * p + 0.5 * c for p, c in zip(ava_imps[e - 1], rows[1][2])]
            print(f"  importance held after experience {e} / (0.5 held before + 0.5 fresh):")
        for n, a, fa, b, fb in zip(names, lab_held, lab_fresh, ava_held, ava_fresh):
            print(f"    {short[n]:8s} lab {float(a.sum() / fa.sum()):.4f}   avalanche-lib {float(b.sum() / fb.sum()):.4f}")

        print(f"  trained weights after experience {e}, lab | avalanche-lib:")
        for label, weights, held in (("lab", lab_weights[e], lab_held), ("avalanche", ava_weights[e], ava_held)):
            load_ordered(model, weights)
            with torch.no_grad(), torch.inference_mode():
                logits = model(lx)
            head_max = float(held[names.index("head.weight")].max())
            all_max = max(float(v.max()) for v in held)
            print(f"    {label:9s} mean ||F(x)||^2 {float(logits.pow(2).sum(-1).mean()):8.2f}  "
                  f"max |logit| {float(logits.abs().max()):6.2f}  "
                  f"||W|| " + " ".join(f"{short[n]} {float(w.norm()):.2f}" for n, w in zip(names, weights)
                                       if n.endswith("weight")))
            print(f"    {'':9s} held Omega max: head.W {head_max:.1f}, any {all_max:.1f};  2 lambda Omega_max lr = "
                  f"{2 * LAMBDA * all_max * LR:.2f} (heavy-ball limit {2 * (1 + MOMENTUM):.2f})")

    # the penalties on one importance and anchor (the lab's after the last experience)
    v_lab, v_ava, gdiff = penalty_check(MAS, MLP((1, 28, 28), 10), lab_imps[-1], lab_weights[-1])
    print(f"\npenalty on the same importance, anchor and weights: lab {v_lab:.6g}, avalanche-lib {v_ava:.6g} "
          f"(ratio {v_lab / v_ava:.6f}); largest gradient difference / largest gradient {gdiff:.2g}")


if __name__ == "__main__":
    main()
