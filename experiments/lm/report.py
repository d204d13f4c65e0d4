"""The table of experiments/RESULTS.md for the rewarming experiment, from `cl run --json` outputs.

    cl run experiments/lm/rewarming.yaml --set seed=S --json --no-progress > seedS.json   (S = 0, 1, 2)
    python experiments/lm/report.py seed0.json seed1.json seed2.json
    python experiments/lm/report.py --key loss_per_byte bpe0.json bpe1.json bpe2.json   (rewarming_bpe.yaml)

Per recipe, mean +/- std over the files: the final validation loss on each domain (nats
per byte on the byte stream; `--key loss_per_byte` reads a tokenized stream's loss per byte, so
the two compare) and their mean, forgetting and the stability gap on loss (its rise right after
each boundary), and the tokens trained on (anneals on copies included), also relative to
re-training on the union: training FLOPs are 6 * parameters * tokens (Kaplan et al.
2020) for every recipe alike, so their ratio is the tokens' ratio.
"""
from __future__ import annotations

import json
import sys

import numpy as np

DOMAINS = ["Shakespeare", "Wonderland", "French wiki", "ABC tunes"]
BLOCK_SIZE = 128  # experiments/lm/rewarming.yaml: every row is one sequence of this many bytes


def load(paths: list[str]) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for path in paths:
        lines = [line for line in open(path).read().splitlines() if line.startswith("{")]
        for run in json.loads(lines[-1])["runs"]:
            runs.setdefault(run["name"], []).append(run)
    return runs


def tokens(run: dict, batch_size: int = 32) -> int:
    """Tokens of new data trained on, plus the anneals' (whole batches of it)."""
    return (run["rows_trained"] + run["anneal_steps"] * batch_size) * BLOCK_SIZE


def fmt(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}" if len(values) > 1 else f"{values.mean():.3f}"


def main(paths: list[str], key: str = "loss") -> None:
    runs = load(paths)
    union = np.mean([tokens(r) for r in runs["joint"]]) if "joint" in runs else None
    print(f"seeds: {len(next(iter(runs.values())))}\n")
    print("| recipe | " + " | ".join(DOMAINS) + " | mean loss | forgetting | stability gap | tokens | compute vs union |")
    print("|" + " --- |" * (len(DOMAINS) + 6))
    for name, rs in runs.items():
        final = np.array([r["matrices"][key][-1] for r in rs])
        cells = [fmt(final[:, j]) for j in range(final.shape[1])]
        cells += [fmt(final.mean(1)), fmt([r[f"{key}_forgetting"] for r in rs]),
                  fmt([r[f"{key}_stability_gap"] for r in rs if r.get(f"{key}_stability_gap") is not None] or [np.nan])]
        t = np.mean([tokens(r) for r in rs])
        cells += [f"{t / 1e6:.2f}M", f"{t / union:.2f}x" if union else "-"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if "joint" in runs:
        base = np.mean([np.mean(r["matrices"][key][-1]) for r in runs["joint"]])
        print(f"\nre-training on the union (joint), mean final loss {base:.3f}:")
        for name, rs in runs.items():
            mean = np.mean([np.mean(r["matrices"][key][-1]) for r in rs])
            print(f"  {name:<18} {100 * (mean - base) / base:+6.1f}%  "
                  f"({'within' if abs(mean - base) <= 0.02 * base else 'not within'} 2%)")
    print("\nstability gap at each boundary b (the rise of the earlier domains' mean loss right after it, nats;"
          " in brackets the runs whose loss came back within 10% of the rise before the next boundary):")
    for name, rs in runs.items():
        gaps = [r.get(f"{key}_stability_gaps", []) for r in rs]
        if gaps and gaps[0]:
            per = np.array([[g["gap"] for g in gs] for gs in gaps])
            back = [sum(gs[k]["recovery"] is not None for gs in gaps) for k in range(per.shape[1])]
            print(f"  {name:<18} " + "  ".join(f"b{k + 1}: {fmt(per[:, k])} [{back[k]}/{len(rs)}]"
                                                for k in range(per.shape[1])))


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--key"]:
        main(args[2:], args[1])
    else:
        main(args)
