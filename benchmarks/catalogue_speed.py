"""Training speed of every catalogue strategy against avalanche-lib's, in one sitting.

For each strategy the reference script runs (../shared/bench/avalanche_split_mnist.py), runs,
alternating within each round: the lab's run of the same name in
experiments/catalogue/<scenario>.yaml (`cl run --only NAME`) and avalanche-lib's, and prints the
median training seconds, final accuracies and avalanche/lab per strategy. `--profile NAME` runs
the lab's NAME once in this process under cProfile and prints where the training time went, to
show how much of it is the method's own arithmetic (GEM's gradients and QP, EWC's Fisher pass).

    python benchmarks/catalogue_speed.py [--scenario split|permuted] [--rounds 3] [--only gem,ewc]
    python benchmarks/catalogue_speed.py --profile gem
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT.parent / "shared" / "bench" / "avalanche_split_mnist.py"
BENCH_STRATEGIES = ["naive", "joint", "cumulative", "replay", "gdumb", "ewc", "online_ewc", "si", "mas", "lwf",
                    "gem", "agem", "der", "derpp", "er_ace"]
FILES = {"split": "experiments/catalogue/split_mnist.yaml", "permuted": "experiments/catalogue/permuted_mnist.yaml"}


def lab(name: str, scenario: str, env: dict) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "cl", "run", FILES[scenario], "--only", name, "--json", "--no-track", "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, cwd=ROOT).stdout
    res = json.loads(out.strip().splitlines()[-1])
    return res["train_time_s"], res["acc"]


def avalanche(name: str, scenario: str, data: str, env: dict) -> tuple[float, float]:
    cmd = [sys.executable, str(BENCH), name, data, "--scenario", scenario]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, cwd=ROOT).stdout
    m = re.search(r"acc=([\d.]+) train_s=([\d.]+)", out)
    return float(m.group(2)), float(m.group(1))


def profile(name: str, scenario: str) -> None:
    import cProfile
    import pstats

    from cl.config.files import load_experiment
    from cl.runner.invocation import run_experiment

    cfg = load_experiment(ROOT / FILES[scenario])
    prof = cProfile.Profile()
    prof.enable()
    result = run_experiment(cfg, track=False, only=[name])[0]
    prof.disable()
    stats = pstats.Stats(prof)
    print(f"lab {name} ({scenario}): train {result['train_time_s']:.1f} s, eval {result['eval_time_s']:.1f} s")
    stats.sort_stats("cumulative").print_stats(25)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scenario", choices=sorted(FILES), default="split")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", default=None, help="comma-separated strategies (default: all the bench runs there)")
    p.add_argument("--profile", default=None, metavar="NAME")
    args = p.parse_args()
    if args.profile:
        profile(args.profile, args.scenario)
        return
    data = os.environ.get("CL_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    env = {**os.environ, "CL_DATA_DIR": data}
    from cl.config.files import load_experiment

    in_file = load_experiment(ROOT / FILES[args.scenario]).run_specs()
    names = args.only.split(",") if args.only else [n for n in BENCH_STRATEGIES if n in in_file]
    rows = []
    for name in names:
        times = {"lab": [], "avalanche": []}
        accs = {}
        for r in range(args.rounds):
            order = ("lab", "avalanche") if r % 2 == 0 else ("avalanche", "lab")  # alternate who goes first
            for who in order:
                seconds, accs[who] = lab(name, args.scenario, env) if who == "lab" else \
                    avalanche(name, args.scenario, data, env)
                times[who].append(seconds)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((name, med["lab"], med["avalanche"], accs["lab"], accs["avalanche"]))
        print(f"{name:<11} lab {med['lab']:7.2f} s  avalanche {med['avalanche']:7.2f} s  "
              f"avalanche/lab {med['avalanche'] / med['lab']:5.2f}   acc lab {accs['lab']:.4f} "
              f"avalanche {accs['avalanche']:.4f}", flush=True)
    print(f"\n{args.scenario}, medians of {args.rounds} rounds (training seconds), one sitting:")
    print("| strategy | lab s | avalanche s | avalanche / lab |")
    print("| --- | --- | --- | --- |")
    for name, lab_s, av_s, *_ in rows:
        print(f"| {name} | {lab_s:.2f} | {av_s:.2f} | {av_s / lab_s:.2f} |")


if __name__ == "__main__":
    main()
