"""Data-parallel, mixed-precision and compiled training against the plain run, on the CPU, in one sitting.

Three workloads, each written as an experiment file to a temporary folder and run through
`cl run FILE --json --no-track`:

  mlp     Split-MNIST, the MLP 784-400-400-10 of experiments/split_mnist/naive.yaml (5 experiences,
          batch 32, SGD), the whole 60,000 images
  resnet  the reduced ResNet-18 (`reduced_resnet18`, nf=20) on a class-balanced subset of CIFAR-10
          (--cifar-per-class training images per class, read from CL_DATA_DIR and handed to the lab
          as a `numpy` dataset, so each process neither decodes 60,000 JPEGs nor trains for an hour),
          5 experiences of 2 classes, batch 32, SGD lr 0.03, no augmentation
  gpt     the byte-level GPT of experiments/lm/rewarming.yaml (4 layers, width 128) on its first
          two text domains, --gpt-bytes training bytes each, one pass, batch 32 x 128 bytes

and five ways to run each, alternating inside every round (each round starts one place further on):

  1x1       one process pinned to one core, one thread: the baseline
  2x1       `cl run FILE --devices 2`: two processes of one thread each (the lab gives each rank its own
            core), the same global batch split between them
  torchrun1 `torchrun --nproc-per-node 1 -m cl run FILE`: what a user gets asking for data parallel
            on one process (the lab then builds no DDP: one process steps as it always does)
  ddp1      one pinned process whose trainer takes its data-parallel step over a process group of one
            (DistributedDataParallel, the row shares, the all-reduced loss terms): what DDP costs where
            it buys nothing. The trainer skips DDP on one process, so `--ddp-of-one` (below) joins a
            gloo group of one and lets the trainer's `world > 1` tests pass; it fails if DDP was not built
  bf16      1x1 at `training.precision: bf16-mixed`
  compiled  1x1 at `training.compile: true` (inductor; its cache, in the sitting's temporary folder,
            is warmed by one untimed run first, whose time is reported as the cold compile)

The time compared is the training time the lab records (`train_time_s` of `--json`: the training
loop, without start-up, data loading or evaluation); each process's whole wall time (start-up
included) is reported beside it. Every ratio is variant / 1x1 of training seconds (above 1: slower),
on the medians and on each variant's fastest round.

    python benchmarks/scale.py [--rounds 3] [--quick] [--workloads mlp,resnet,gpt]
                               [--variants 1x1,2x1,ddp1,bf16,compiled] [--out scale.json] [--cpu N]

`--quick` shrinks every workload to a few steps (a check that the script works, not a measurement).
The ResNet's runs set `training.sync_batchnorm`, so two processes normalise over the whole batch as
one does. Needs MNIST, CIFAR-10 and the text corpora under CL_DATA_DIR (default ../shared/data),
and at least two cores for 2x1.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("1x1", "2x1", "torchrun1", "ddp1", "bf16", "compiled")
WORKLOADS = ("mlp", "resnet", "gpt")
CIFAR10_MEAN, CIFAR10_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]  # streams.sources' own


# ------------------------------------------------------------------ the workloads
def mlp_experiment(quick: bool) -> dict:
    cfg = yaml.safe_load((ROOT / "experiments" / "split_mnist" / "naive.yaml").read_text())
    cfg.update(name="scale-mlp", device="cpu")
    if quick:
        cfg["stream"]["first_experiences"] = 1
    return cfg


def cifar_subset(path: Path, data_dir: str, per_class: int, test_per_class: int) -> None:
    """The first `per_class` training and `test_per_class` test images of each CIFAR-10 class, as
    the .npz the lab's `numpy` dataset reads (uint8 images, labels 0..9)."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from streams.sources import cifar10

    data = cifar10(data_dir=data_dir, download=False)

    def take(split, n):
        keep = torch.cat([(split.y == c).nonzero().squeeze(1)[:n] for c in range(10)]).sort().values
        return split.x[keep].numpy(), split.y[keep].numpy().astype(np.int64)

    (xtr, ytr), (xte, yte) = take(data.train, per_class), take(data.test, test_per_class)
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)


def resnet_experiment(npz: Path) -> dict:
    cfg = {"name": "scale-resnet", "seed": 0, "device": "cpu",
           "stream": {"dataset": {"name": "numpy", "path": str(npz), "mean": CIFAR10_MEAN, "std": CIFAR10_STD},
                      "scenario": {"name": "class_incremental", "n_experiences": 5,
                                   "class_order": list(range(10))}},
           "model": {"name": "reduced_resnet18"},
           "training": {"epochs": 1, "batch_size": 32, "eval_batch_size": 256,
                        "optimizer": {"name": "sgd", "lr": 0.03}},
           "strategies": ["naive"]}
    cfg["training"]["sync_batchnorm"] = True  # one process: plain BatchNorm; several: the whole batch's
    return cfg


def gpt_experiment(train_bytes: int, quick: bool) -> dict:
    cfg = yaml.safe_load((ROOT / "experiments" / "lm" / "rewarming.yaml").read_text())
    scenario = cfg["stream"]["scenario"]
    scenario.update(domains=scenario["domains"][:2], max_train_bytes=train_bytes, max_val_bytes=4096)
    cfg["training"].update(epochs=1, eval_every=None)
    cfg.pop("runs")
    cfg.update(name="scale-gpt", device="cpu", strategies=["naive"])
    if quick:
        cfg["model"].update(n_layer=1)
    return cfg


def describe(name: str, args) -> str:
    if name == "mlp":
        return ("Split-MNIST MLP 784-400-400-10, " + ("first experience" if args.quick else "5 experiences")
                + ", batch 32, SGD")
    if name == "resnet":
        return (f"reduced ResNet-18 (nf 20), CIFAR-10 subset {args.cifar_per_class}/class train, "
                f"{args.cifar_test_per_class}/class test, 5 experiences, batch 32, SGD; sync BatchNorm")
    return (f"byte-level GPT ({'1 layer' if args.quick else '4 layers'}, width 128), 2 domains x {args.gpt_bytes} "
            f"bytes, one pass, batch 32 x 128, AdamW")


# ------------------------------------------------------------------ one measured process
def command(variant: str, file: Path) -> list[str]:
    lab = [sys.executable, "-m", "cl", "run", str(file), "--json", "--no-track", "--no-progress"]
    return {"1x1": lab, "2x1": lab + ["--devices", "2"],
            "torchrun1": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", *lab[2:]],
            "ddp1": [sys.executable, str(Path(__file__).resolve()), "--ddp-of-one", str(file)],
            "bf16": lab + ["--set", "training.precision=bf16-mixed"],
            "compiled": lab + ["--set", "training.compile=true"]}[variant]


def measure(variant: str, file: Path, env: dict, core: int | None) -> dict:
    """One process of `variant` on `file`: the lab's timings from its --json line, and the
    process's wall seconds. Every variant but 2x1 is pinned to `core` (one thread)."""
    pin = None if variant == "2x1" or core is None else (lambda: os.sched_setaffinity(0, {core}))
    start = time.perf_counter()
    proc = subprocess.run(command(variant, file), capture_output=True, text=True, env=env, cwd=ROOT,
                          preexec_fn=pin)
    process_s = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise SystemExit(f"scale.py: {variant} on {file.name} failed (exit {proc.returncode}):\n{tail}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    metric = "perplexity" if "perplexity" in res else "acc"  # a language model's validation perplexity
    return {"train_time_s": res["train_time_s"], "samples_per_s": res.get("samples_per_s"),
            "tokens_per_s": res.get("tokens_per_s"), "wall_time_s": res.get("wall_time_s"),
            "process_s": process_s, "iterations": res["iterations"], "threads": res.get("threads"),
            "metric": metric, "final": res.get(metric)}


# ------------------------------------------------------------------ DDP over a process group of one
class _OneProcessGroup(int):
    """A world size of 1 that the trainer's `world > 1` tests take for several processes, so it
    steps through its data-parallel path (row shares r::1, DDP, all-reduced terms) over a group of one."""

    def __gt__(self, other):
        return True if other == 1 else int(self) > other


def ddp_of_one(file: str, overrides: list[str]) -> int:
    """`cl run FILE --json --no-track` in this process, joined to a process group of one
    (gloo, or NCCL on a GPU), with the trainer's data-parallel step forced. Fails where the
    trainer built no DistributedDataParallel (its data-parallel test changed)."""
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.distributed as dist

    from cl.cli.main import main
    from cl.runner.distributed import free_port
    from cl.training import trainer

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    cuda = torch.cuda.is_available() and not any(o.startswith("device=cpu") for o in overrides)
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    built, wrap = [], trainer.data_parallel
    trainer.process_group = lambda: (0, _OneProcessGroup(1))
    trainer.data_parallel = lambda model, optimizer, device: built.append(str(device)) or wrap(model, optimizer, device)
    try:
        code = main(["run", file, "--json", "--no-track", "--no-progress", *sum((["--set", o] for o in overrides), [])])
    finally:
        dist.destroy_process_group()
    if code == 0 and not built:
        print("scale.py --ddp-of-one: the trainer built no DistributedDataParallel (its data-parallel test "
              "changed?): nothing was measured", file=sys.stderr)
        return 1
    return code


# ------------------------------------------------------------------ the sitting
def summary(runs: list[dict]) -> dict:
    times = [r["train_time_s"] for r in runs]
    rates = [r["samples_per_s"] for r in runs if r["samples_per_s"] is not None]
    return {"train_time_s": times, "median_train_s": statistics.median(times), "fastest_train_s": min(times),
            "median_samples_per_s": statistics.median(rates) if rates else None,
            "median_tokens_per_s": statistics.median([r["tokens_per_s"] for r in runs])
            if runs[0]["tokens_per_s"] is not None else None,
            "median_lab_wall_s": statistics.median([r["wall_time_s"] for r in runs]),
            "median_process_s": statistics.median([r["process_s"] for r in runs]),
            "process_s": [r["process_s"] for r in runs], "iterations": runs[-1]["iterations"],
            "threads": runs[-1]["threads"], "metric": runs[-1]["metric"], "final": runs[-1]["final"]}


def ratios(stats: dict) -> dict:
    base = stats.get("1x1")
    if base is None:
        return {}
    return {v: {"median": s["median_train_s"] / base["median_train_s"],
                "fastest": s["fastest_train_s"] / base["fastest_train_s"],
                "process_median": s["median_process_s"] / base["median_process_s"]}
            for v, s in stats.items() if v != "1x1"}


TARGETS = {"ddp1": "  (issue: at most 1.03)", "torchrun1": "  (issue: at most 1.03)"}


def table(name: str, about: str, stats: dict, rel: dict, cold: float | None) -> str:
    lines = [f"\n{name}: {about}",
             f"  {'variant':<9} {'train s med':>11} {'fastest':>8} {'samples/s':>10} {'process s':>9}"
             f" {'ratio med':>9} {'fastest':>8} {'process':>8}  final"]
    for v, s in stats.items():
        r = rel.get(v, {"median": 1.0, "fastest": 1.0, "process_median": 1.0})
        rate = f"{s['median_samples_per_s']:,.0f}" if s["median_samples_per_s"] is not None else "-"
        lines.append(f"  {v:<9} {s['median_train_s']:11.2f} {s['fastest_train_s']:8.2f} {rate:>10}"
                     f" {s['median_process_s']:9.1f} {r['median']:9.3f} {r['fastest']:8.3f}"
                     f" {r['process_median']:8.3f}  {s['metric']} {s['final']:.4f}{TARGETS.get(v, '')}")
    if "2x1" in rel:
        lines.append(f"  2 processes against 1: {1 / rel['2x1']['median']:.2f}x the speed (medians), "
                     f"{1 / rel['2x1']['fastest']:.2f}x (fastest rounds)")
    if cold is not None:
        lines.append(f"  compiled, cold inductor cache (untimed warm-up run): {cold:.2f} s training")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="a few steps per workload: checks the script, measures little")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--cifar-per-class", type=int, default=None, help="training images per class (default 128)")
    p.add_argument("--cifar-test-per-class", type=int, default=None, help="test images per class (default 20)")
    p.add_argument("--gpt-bytes", type=int, default=None, help="training bytes per text domain (default 49152)")
    p.add_argument("--cpu", type=int, default=None, metavar="N", help="the core single-process runs are pinned to "
                   "(default: the first this process may use)")
    p.add_argument("--out", type=Path, default=None, help="write the numbers here as JSON")
    p.add_argument("--ddp-of-one", default=None, metavar="FILE", help=argparse.SUPPRESS)  # internal: one ddp1 process
    p.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ddp_of_one:
        raise SystemExit(ddp_of_one(args.ddp_of_one, args.set))
    args.cifar_per_class = args.cifar_per_class or (8 if args.quick else 128)
    args.cifar_test_per_class = args.cifar_test_per_class or (4 if args.quick else 20)
    args.gpt_bytes = args.gpt_bytes or (4096 if args.quick else 49152)
    workloads = [w for w in args.workloads.split(",") if w]
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(workloads) - set(WORKLOADS)) + sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"scale.py: unknown {', '.join(unknown)}; workloads: {', '.join(WORKLOADS)}; "
                         f"variants: {', '.join(VARIANTS)}")
    cores = sorted(os.sched_getaffinity(0))
    notes = []
    if "2x1" in variants and len(cores) < 2:
        variants.remove("2x1")
        notes.append(f"2x1 left out: this process may use {len(cores)} core")
    core = args.cpu if args.cpu is not None else cores[0]
    data = os.environ.get("CL_DATA_DIR", str(ROOT.parent / "shared" / "data"))

    with tempfile.TemporaryDirectory(prefix="cl-scale-") as tmp:
        tmp = Path(tmp)
        # One thread per process (the lab also takes its thread count from the affinity); the
        # compiled variant's inductor cache belongs to this sitting.
        env = {**os.environ, "CL_DATA_DIR": data, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor"), "MPLBACKEND": "Agg"}
        files = {}
        for w in workloads:
            if w == "mlp":
                cfg = mlp_experiment(args.quick)
            elif w == "resnet":
                npz = tmp / "cifar10_subset.npz"
                cifar_subset(npz, data, args.cifar_per_class, args.cifar_test_per_class)
                cfg = resnet_experiment(npz)
            else:
                cfg = gpt_experiment(args.gpt_bytes, args.quick)
            files[w] = tmp / f"scale_{w}.yaml"
            files[w].write_text(yaml.safe_dump(cfg, sort_keys=False))

        cold = {}
        if "compiled" in variants:
            for w in workloads:
                cold[w] = measure("compiled", files[w], env, core)["train_time_s"]
                print(f"warm-up: {w} compiled with a cold cache, {cold[w]:.2f} s training", flush=True)

        runs: dict[str, dict[str, list[dict]]] = {w: {v: [] for v in variants} for w in workloads}
        contenders = [(w, v) for w in workloads for v in variants]
        for r in range(args.rounds):
            # Each round starts one place further along: no contender always follows the same other.
            k = r % len(contenders)
            for w, v in contenders[k:] + contenders[:k]:
                runs[w][v].append(measure(v, files[w], env, core))
            print(f"round {r + 1}: " + "; ".join(
                f"{w} " + ", ".join(f"{v}={runs[w][v][-1]['train_time_s']:.2f}s" for v in variants)
                for w in workloads), flush=True)

    out = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "rounds": args.rounds, "quick": args.quick,
           "machine": {"cores": len(cores), "single_process_core": core, "python": platform.python_version(),
                       "processor": platform.processor() or platform.machine()},
           "notes": notes, "workloads": {}}
    print(f"\n{args.rounds} round(s); training seconds as the lab records them (train_time_s); process s: the "
          f"whole process, start-up included; ratio: variant / 1x1 (above 1 is slower); single processes on core "
          f"{core}, one thread" + ("".join(f"\nnote: {n}" for n in notes)))
    for w in workloads:
        stats = {v: summary(runs[w][v]) for v in variants}
        rel = ratios(stats)
        about = describe(w, args)
        print(table(w, about, stats, rel, cold.get(w)))
        out["workloads"][w] = {"about": about, "variants": stats, "ratios_to_1x1": rel,
                               "compiled_cold_cache_train_s": cold.get(w)}
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
        print(f"\nnumbers: {args.out}")


if __name__ == "__main__":
    main()
