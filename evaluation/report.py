"""Reports of recorded results: text tables, CSV/JSON of the matrix, a heatmap."""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np


def row_labels(T: int) -> list[str]:
    return ["untrained"] + [f"after_exp{i}" for i in range(1, T + 1)]


def matrix_csv(R) -> str:
    R = np.asarray(R)
    T = R.shape[1]
    lines = ["row," + ",".join(f"task{j}" for j in range(T))]
    for label, row in zip(row_labels(T), R):
        lines.append(label + "," + ",".join(f"{v:.6f}" for v in row))
    return "\n".join(lines) + "\n"


def matrix_json(R) -> str:
    R = np.asarray(R)
    return json.dumps({"rows": row_labels(R.shape[1]), "columns": [f"task{j}" for j in range(R.shape[1])],
                       "accuracy_matrix": R.tolist()}, indent=1)


def heatmap_png(R, title: str = "accuracy matrix", score: str = "accuracy") -> bytes:
    """The matrix as a heatmap: rows are the model after each experience (the first, before
    any training), columns the test sets, values in the cells, a colorbar. A loss matrix
    is shaded over its own range."""
    from evaluation.charts import heatmap_png as draw

    R = np.asarray(R, dtype=float)
    n_rows, T = R.shape
    rows = row_labels(T) if n_rows == T + 1 else [f"row{i}" for i in range(n_rows)]
    finite = R[np.isfinite(R)]
    lo, hi = (0.0, 1.0) if score == "accuracy" or finite.size == 0 else (float(finite.min()), float(finite.max()))
    return draw(R, title, row_labels=rows, col_labels=[f"task{j}" for j in range(T)],
                ylabel="model trained through", xlabel=f"{score} on the test set of", vmin=lo, vmax=max(hi, lo + 1e-9))


def task_curves_png(R, title: str, score: str = "accuracy", errors=None) -> bytes:
    """Each task's score over the stream, one line per task: row i of the matrix is the
    model after experience i (0: before training). `errors`, a matrix of the same shape,
    draws error bars (the std over seeds)."""
    from evaluation.charts import line_chart_png

    R = np.asarray(R, dtype=float)
    xs = list(range(R.shape[0]))
    series = {f"task{j}": (xs, R[:, j].tolist(), None if errors is None else np.asarray(errors)[:, j].tolist())
              for j in range(R.shape[1])}
    ylim = (0.0, 1.0) if score == "accuracy" else (None, None)
    return line_chart_png(series, title, "experiences trained (0: untrained)", f"{score} on the task's test set",
                          ylim=ylim, integer_x=True)


def _score(run: dict) -> str:
    """A run's primary score: its first matrix (accuracy; validation loss for a language model)."""
    return next(iter(run.get("matrices") or {"acc": None}))


def results_table(runs: Sequence[dict], show_seed: bool = False) -> str:
    """One line per run: each task's final score, then the score's ACC/BWT/FWT/forgetting,
    for the run's primary score (accuracy; validation loss for a language model)."""
    from evaluation.metrics import metric_names

    out = []
    seed_head = f"{'seed':>5}" if show_seed else ""
    failed = [run for run in runs if run.get("status") == "FAILED"]
    finished = [run for run in runs if run not in failed]
    # A metric no run reports (FWT in class-incremental learning) gets no column at all.
    shown = [k for k in ("final", "bwt", "fwt", "forgetting")
             if any(run.get(metric_names(_score(run))[k]) is not None for run in finished)] or ["final"]
    heads = {"bwt": "BWT", "fwt": "FWT", "forgetting": "Forget"}
    for run in finished:
        key = _score(run)
        R = np.asarray(run["matrices"][key] if run.get("matrices") else run["accuracy_matrix"])
        names = metric_names(key)
        T = R.shape[1]
        if not out:
            heads["final"] = "ACC" if key == "acc" else key
            head = f"{'run':<14}{seed_head}" + "".join(f"{'task' + str(j):>8}" for j in range(T))
            out.append(head + "".join(f"{heads[k]:>8}" for k in shown) + f"{'train_s':>9}")
        seed = f"{run.get('seed', ''):>5}" if show_seed else ""
        row = f"{run['name'][:14]:<14}{seed}" + "".join(f"{v:>8.3f}" for v in R[-1])
        row += "".join(f"{run[names[k]]:>8.3f}" if run.get(names[k]) is not None else f"{'-':>8}" for k in shown)
        row += f"{run['train_time_s']:>9.2f}"
        out.append(row)
    for run in failed:
        seed = f" seed {run.get('seed')}" if show_seed else ""
        out.append(f"{run['name'][:14]:<14}{seed} FAILED: {run['error']}")
    return "\n".join(out)
