"""Whole-process time of a short `cl run`, beside `python -c "import torch"`, in one sitting.

For small streams the process, not the training, is what a researcher waits for. Each
round runs, alternating: `python -c "import torch"`, `cl strategies`, then `cl run benchmarks/startup.yaml`
(Split-Digits, 2 experiences, a small MLP, Naive) tracked into a fresh SQLite store, timed
until the command returns, by which point the parent and child runs are FINISHED in the
store (checked after each round). Prints the medians, the ratio, the time until training
starts, and where the imports go (`-X importtime`, one extra run).

    python benchmarks/startup.py [--rounds 5] [--file benchmarks/startup.yaml] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torch._dynamo", "mlflow", "mlflow.tracking", "sklearn", "scipy", "pandas", "timm",
         "torchvision", "pydantic", "yaml", "PIL", "numpy", "cl.runner.invocation", "cl.config.schema", "streams", "evaluation")


def timed(command: list[str], env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    start = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr}")
    return wall, proc


def lab_round(file: str, folder: Path) -> dict:
    store = folder / "mlflow.db"
    command = [sys.executable, "-m", "cl", "run", file, "--no-progress", "--json", "--tracking-uri",
               f"sqlite:///{store}"]
    env = dict(os.environ, CL_JOURNAL_DIR=str(folder / "journal"))
    start = time.time()
    wall, proc = timed(command, env)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall": wall, "to_fit": result["fit_start_unix"] - start, "train_s": result["train_time_s"],
            "store": str(store), "run_id": result["mlflow_run_id"], "parent_id": result["mlflow_parent_run_id"]}


def finished_in_store(store: str, run_ids: list[str]) -> bool:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    return all(client.get_run(r).info.status == "FINISHED" for r in run_ids)


def import_breakdown(file: str, folder: Path, top: int = 12) -> list[tuple[str, float]]:
    """Cumulative import seconds of the heaviest modules (the ones named in HEAVY) in the lab's
    process, from one `-X importtime` run."""
    command = [sys.executable, "-X", "importtime", "-m", "cl", "run", file, "--no-progress", "--tracking-uri",
               f"sqlite:///{folder / 'importtime.db'}"]
    env = dict(os.environ, CL_JOURNAL_DIR=str(folder / "journal"))
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    cumulative: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)(\S+)", line)
        if m and m.group(3) in HEAVY:
            cumulative[m.group(3)] = max(cumulative.get(m.group(3), 0.0), int(m.group(1)) / 1e6)
    return sorted(cumulative.items(), key=lambda kv: -kv[1])[:top]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--file", default="benchmarks/startup.yaml")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch_s, listing_s, lab = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds + 1):  # round 0 warms the disk cache and is not counted
            wall, _ = timed([sys.executable, "-c", "import torch"])
            listing, _ = timed([sys.executable, "-m", "cl", "strategies"])
            folder = Path(tmp) / f"round{k}"
            folder.mkdir()
            run = lab_round(args.file, folder)
            if not finished_in_store(run["store"], [run["run_id"], run["parent_id"]]):
                raise SystemExit(f"round {k}: the runs are not FINISHED in the store when the command returned")
            if k:
                torch_s.append(wall)
                listing_s.append(listing)
                lab.append(run)
            print(f"round {k}{' (warm-up)' if not k else ''}: import torch {wall:.2f} s, cl strategies {listing:.2f} s, "
                  f"cl run {run['wall']:.2f} s "
                  f"(training starts at {run['to_fit']:.2f} s, trains {run['train_s']:.3f} s)", file=sys.stderr)
        imports = import_breakdown(args.file, Path(tmp))
    out = {"import_torch_s": statistics.median(torch_s), "cl_run_s": statistics.median(r["wall"] for r in lab),
           "to_training_s": statistics.median(r["to_fit"] for r in lab),
           "train_s": statistics.median(r["train_s"] for r in lab), "rounds": args.rounds}
    out["ratio"] = out["cl_run_s"] / out["import_torch_s"]
    out["cl_strategies_s"] = statistics.median(listing_s)
    out["strategies_ratio"] = out["cl_strategies_s"] / out["import_torch_s"]
    print(f"python -c 'import torch'   {out['import_torch_s']:.2f} s (median of {args.rounds})")
    print(f"cl strategies   {out['cl_strategies_s']:.2f} s = {out['strategies_ratio']:.2f}x")
    print(f"cl run {args.file}   {out['cl_run_s']:.2f} s = {out['ratio']:.2f}x; training starts at "
          f"{out['to_training_s']:.2f} s and takes {out['train_s']:.3f} s")
    print("imports in the lab's process (cumulative s, one -X importtime run, which inflates them):")
    for name, seconds in imports:
        print(f"  {name:<16} {seconds:.2f}")
    out["imports_s"] = dict(imports)
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
