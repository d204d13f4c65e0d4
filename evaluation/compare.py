"""Comparing runs: mean and standard deviation over seeds per strategy, as a table and plots.

A run enters as a plain dict: {"strategy": label, "seed": int, "metrics": {name: value},
"matrices": {score: matrix} (optional), "curve": [[iteration, value], ...] (optional)}.
`cl run` builds these from its results and logs the comparison to the parent MLflow run;
`cl compare` builds them from runs read back from any MLflow store.
"""
from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# The columns shown by default, in this order, where the runs have them.
# What a run cost (`cl.training.cost`), so methods are set side by side at equal compute and memory;
# the other costs (params_total, params_trainable, eval_flops_per_sample, samples_per_s) by --metrics.
COST_COLUMNS = ["train_flops_per_sample", "train_flops", "strategy_state_bytes", "peak_memory_bytes"]
ACCURACY_COLUMNS = ["acc", "bwt", "fwt", "forgetting", "avg_incremental_acc", "anytime_acc", "min_acc", "wc_acc",
                    "stability_gap", "train_time_s", *COST_COLUMNS]
LOSS_COLUMNS = ["loss", "loss_bwt", "loss_fwt", "loss_forgetting", "perplexity", "loss_wc", "loss_stability_gap",
                "tokens_per_s", "train_time_s", *COST_COLUMNS]


def default_columns(runs: Sequence[dict]) -> list[str]:
    present = {k for run in runs for k, v in run["metrics"].items() if _finite(v)}
    columns = ACCURACY_COLUMNS if "acc" in present else LOSS_COLUMNS
    return [c for c in columns if c in present]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the std is NaN for fewer than two values."""
    x = np.asarray([v for v in values if _finite(v)], dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan


def group(runs: Sequence[dict]) -> dict[str, list[dict]]:
    """Runs by strategy label, in the order labels first appear; each group sorted by seed."""
    out: dict[str, list[dict]] = {}
    for run in runs:
        out.setdefault(run["strategy"], []).append(run)
    return {k: sorted(v, key=lambda r: (r.get("seed") is None, r.get("seed"))) for k, v in out.items()}


def comparison(runs: Sequence[dict], columns: Sequence[str] | None = None) -> list[dict]:
    """One row per strategy, best first: {"strategy", "n", "seeds", "rank", "vs_best",
    "<column>": (mean, std), ...}. Strategies are ranked by the mean of the primary metric
    (`ranking_metric`); "vs_best" is each one's `Difference` to the best (None for the best,
    and where no run has the metric the rows keep the order the strategies first appear)."""
    columns = list(columns) if columns is not None else default_columns(runs)
    groups = group(runs)
    metric, higher = ranking_metric(runs)
    if metric is not None and metric not in columns:
        columns.insert(0, metric)
    rows = []
    for label, members in groups.items():
        row = {"strategy": label, "n": len(members), "seeds": [m.get("seed") for m in members],
               "rank": None, "vs_best": None}
        for c in columns:
            row[c] = mean_std([m["metrics"].get(c, math.nan) for m in members])
        rows.append(row)
    if metric is None:
        return rows
    # Best first; a strategy without the metric last, in the order it appeared.
    rows.sort(key=lambda r: (not math.isfinite(r[metric][0]), -r[metric][0] if higher else r[metric][0]))
    best = rows[0]
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank if math.isfinite(row[metric][0]) else None
        if row is not best and row["rank"] is not None:
            row["vs_best"] = difference(groups[best["strategy"]], groups[row["strategy"]], metric)
    return rows


ROW_FACTS = ("strategy", "n", "seeds", "rank", "vs_best")


def columns_of(rows: Sequence[dict]) -> list[str]:
    return [k for k in (rows[0] if rows else {}) if k not in ROW_FACTS]


# ---------------------------------------------------------------- ranking
def ranking_metric(runs: Sequence[dict]) -> tuple[str | None, bool]:
    """The metric strategies are ranked by, and whether higher is better: the final accuracy
    (ACC) where the runs have it, else the final loss (language streams)."""
    present = {k for run in runs for k, v in run["metrics"].items() if _finite(v)}
    if "acc" in present:
        return "acc", True
    if "loss" in present:
        return "loss", False
    return None, True


@dataclass(frozen=True)
class Difference:
    """A strategy's mean difference to the best one in the ranking metric (this minus the
    best), with a `level` confidence interval over seeds (None with fewer than two seeds on
    either side). `paired`: computed from per-seed differences, because both ran the same
    seeds; otherwise Welch's interval for two independent means."""
    mean: float
    low: float | None
    high: float | None
    paired: bool
    level: float = 0.95

    @property
    def distinguishable(self) -> bool | None:
        """Whether the seeds tell this strategy from the best: the interval excludes zero."""
        if self.low is None:
            return None
        return self.low > 0 or self.high < 0


def difference(best: Sequence[dict], other: Sequence[dict], metric: str, level: float = 0.95) -> Difference:
    """`other`'s difference to `best` in `metric` over seeds (runs as `comparison` takes them).

    Paired where both ran the same seeds (each seed once): a seed's runs share their data
    order and initial weights, so the per-seed difference removes that shared noise, and the
    interval is Student's t on those differences. Otherwise Welch's t interval on the two
    means, with the Welch-Satterthwaite degrees of freedom."""
    from scipy import stats

    a = {m.get("seed"): m["metrics"].get(metric, math.nan) for m in best}
    b = {m.get("seed"): m["metrics"].get(metric, math.nan) for m in other}
    same_seeds = (None not in a and a.keys() == b.keys() and len(a) == len(best) == len(other)
                  and all(_finite(a[s]) and _finite(b[s]) for s in a))
    if same_seeds:
        d = np.array([b[s] - a[s] for s in sorted(a)], dtype=float)
        if d.size < 2:
            return Difference(float(d.mean()), None, None, True, level)
        half = stats.t.ppf(0.5 + level / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
        return Difference(float(d.mean()), float(d.mean() - half), float(d.mean() + half), True, level)
    x = np.array([v for v in a.values() if _finite(v)], dtype=float)
    y = np.array([v for v in b.values() if _finite(v)], dtype=float)
    mean = float(y.mean() - x.mean())
    if x.size < 2 or y.size < 2:
        return Difference(mean, None, None, False, level)
    vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se = math.sqrt(vx + vy)
    if se == 0:  # both constant over seeds: the difference is exact
        return Difference(mean, mean, mean, False, level)
    df = (vx + vy) ** 2 / (vx ** 2 / (x.size - 1) + vy ** 2 / (y.size - 1))
    half = stats.t.ppf(0.5 + level / 2, df) * se
    return Difference(mean, mean - half, mean + half, False, level)


def _difference_cell(row: dict) -> str:
    if row["rank"] == 1:
        return "best"
    d = row["vs_best"]
    if d is None:
        return "-"
    text = f"{d.mean:+.4f}"
    if d.low is not None:
        text += f" [{d.low:+.4f}, {d.high:+.4f}]" + ("" if d.distinguishable else " ≈")
    return text


def ranking_note(rows: Sequence[dict], runs: Sequence[dict]) -> str:
    """The line under a ranked table that says what its difference column is."""
    metric, higher = ranking_metric(runs)
    if metric is None or len(rows) < 2:
        return ""
    return (f"ranked by {metric} ({'higher' if higher else 'lower'} is better); vs best: difference to the best "
            f"with a 95% interval over seeds (paired by seed where the seeds match); "
            f"≈: the seeds cannot tell it from the best")


def _cell(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "-"
    if abs(mean) >= 1e5:  # FLOPs, bytes, parameters: four significant digits, not a row of them
        return f"{mean:.4g}" + (f" ± {std:.2g}" if math.isfinite(std) else "")
    digits = 2 if abs(mean) >= 100 else 4
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if math.isfinite(std) else "")


def _ranked(rows: Sequence[dict]) -> bool:
    return len(rows) > 1 and any(r.get("rank") for r in rows)


def _head_cells(rows: Sequence[dict]) -> list[str]:
    return (["rank"] if _ranked(rows) else []) + ["strategy", "runs", "seeds"]


def _row_cells(rows: Sequence[dict], row: dict) -> list[str]:
    rank = [str(row["rank"] or "-")] if _ranked(rows) else []
    return rank + [row["strategy"], str(row["n"]), _seeds(row["seeds"])]


def _metric_cells(rows: Sequence[dict], row: dict) -> list[str]:
    """The metric columns, with the difference to the best right after the first (the
    ranking metric) when the rows are ranked."""
    cells = [_cell(*row[c]) for c in columns_of(rows)]
    return cells[:1] + [_difference_cell(row)] + cells[1:] if _ranked(rows) else cells


def _metric_heads(rows: Sequence[dict]) -> list[str]:
    columns = columns_of(rows)
    return columns[:1] + ["vs best"] + columns[1:] if _ranked(rows) else columns


def text_table(rows: Sequence[dict]) -> str:
    """Aligned columns for a terminal: best first, mean ± std over seeds, how many runs, and
    each strategy's difference to the best (`ranking_note` says how to read it)."""
    cells = [_head_cells(rows) + _metric_heads(rows)]
    cells += [_row_cells(rows, row) + _metric_cells(rows, row) for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    first = 1 if _ranked(rows) else 0  # the strategy column, left-aligned
    return "\n".join("  ".join(c.ljust(w) if i == first else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in cells)


def markdown_table(rows: Sequence[dict]) -> str:
    heads = _head_cells(rows) + _metric_heads(rows)
    out = ["| " + " | ".join(heads) + " |", "| " + " | ".join("---" for _ in heads) + " |"]
    for row in rows:
        out.append("| " + " | ".join(_row_cells(rows, row) + _metric_cells(rows, row)) + " |")
    return "\n".join(out)


def table_columns(rows: Sequence[dict]) -> dict[str, list]:
    """The comparison as columns ({name: values}): CSV and MLflow's `log_table`. NaN is None."""
    columns = columns_of(rows)
    out: dict[str, list] = {}
    if _ranked(rows):
        out["rank"] = [r["rank"] for r in rows]
    out.update({"strategy": [r["strategy"] for r in rows], "runs": [r["n"] for r in rows],
                "seeds": [_seeds(r["seeds"]) for r in rows]})
    for c in columns:
        out[f"{c}_mean"] = [_none(r[c][0]) for r in rows]
        out[f"{c}_std"] = [_none(r[c][1]) for r in rows]
    if _ranked(rows):
        diffs = [r["vs_best"] for r in rows]
        out["vs_best_mean"] = [None if d is None else d.mean for d in diffs]
        out["vs_best_low"] = [None if d is None else d.low for d in diffs]
        out["vs_best_high"] = [None if d is None else d.high for d in diffs]
        out["vs_best_paired"] = [None if d is None else d.paired for d in diffs]
    return out


def csv_table(rows: Sequence[dict]) -> str:
    data = table_columns(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(data))
    writer.writerows(zip(*data.values()))
    return buf.getvalue()


def _none(v: float):
    return v if math.isfinite(v) else None


def _seeds(seeds: Sequence) -> str:
    return ",".join("?" if s is None else str(s) for s in seeds)


def metric_key(label: str) -> str:
    """A strategy label as MLflow allows in a metric name (letters, digits, _ - . / and space),
    kept readable: a `+` is spelt `p` (`der++` -> `derpp`, as the field writes DER++), any
    other character MLflow refuses becomes `_`."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", label.replace("+", "p"))


def parent_metrics(rows: Sequence[dict]) -> dict[str, float]:
    """The comparison as the parent run's metrics: `<strategy>/<metric>_mean` and `_std`."""
    out = {}
    for row in rows:
        for c in columns_of([row]):
            mean, std = row[c]
            if math.isfinite(mean):
                out[f"{metric_key(row['strategy'])}/{c}_mean"] = mean
            if math.isfinite(std):
                out[f"{metric_key(row['strategy'])}/{c}_std"] = std
    return out


# ---------------------------------------------------------------- plots
def mean_matrices(runs: Sequence[dict], score: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per strategy, the element-wise mean and std over seeds of its `score` matrix (runs
    without one, or of another shape than the group's first, are left out)."""
    out = {}
    for label, members in group(runs).items():
        mats = [np.asarray(m["matrices"][score], dtype=float) for m in members if score in (m.get("matrices") or {})]
        mats = [M for M in mats if M.shape == mats[0].shape]
        if mats:
            stack = np.stack(mats)
            std = stack.std(axis=0, ddof=1) if len(mats) > 1 else np.full(stack.shape[1:], np.nan)
            out[label] = (stack.mean(axis=0), std)
    return out


def primary_score(runs: Sequence[dict]) -> str:
    scores = [s for run in runs for s in (run.get("matrices") or {})]
    return "acc" if "acc" in scores or not scores else scores[0]


def comparison_plots(runs: Sequence[dict], title: str) -> dict[str, bytes]:
    """The plots a researcher looks at instead of reading the table, as {file name: PNG}:
    each strategy's per-task scores over the stream (mean over seeds, std as error bars),
    the final score and forgetting per strategy with error bars, the mean matrices side by
    side, and the score on the seen tasks over iterations where runs evaluated periodically.
    A single run gets its per-task and seen-task curves only: there is nothing to compare."""
    from evaluation.charts import bar_chart_png, line_chart_png, panels_png
    from evaluation.metrics import metric_names
    from evaluation.report import heatmap_png, task_curves_png

    single = len(runs) == 1  # one run: no bars or mean matrices to compare, the per-task curves stay
    score = primary_score(runs)
    name = "accuracy" if score == "acc" else score
    plots: dict[str, bytes] = {}
    matrices = mean_matrices(runs, score)
    groups = group(runs)
    if matrices:
        plots["comparison_tasks.png"] = panels_png(
            [task_curves_png(M, f"{label} (mean of {len(groups[label])} run(s))", name,
                             errors=None if np.isnan(S).all() else np.nan_to_num(S))
             for label, (M, S) in matrices.items()], columns=2)
    if matrices and not single:
        plots["comparison_matrices.png"] = panels_png(
            [heatmap_png(M, f"{label}: mean of {len(groups[label])} run(s)", name) for label, (M, _) in matrices.items()],
            columns=3)
    names = metric_names(score)
    rows = comparison(runs, [names["final"], names["forgetting"]])
    bars = {c: ([r[c][0] for r in rows], [r[c][1] for r in rows]) for c in (names["final"], names["forgetting"])}
    if not single and any(math.isfinite(v) for means, _ in bars.values() for v in means):
        plots["comparison_bars.png"] = bar_chart_png([r["strategy"] for r in rows], bars,
                                                       f"{title}: mean ± std over seeds", name)
    curves = {label: [m["curve"] for m in members if m.get("curve")] for label, members in groups.items()}
    curves = {k: v for k, v in curves.items() if v}
    if curves:
        series = {}
        for label, members in curves.items():
            xs = [p[0] for p in members[0]]
            same = [c for c in members if [p[0] for p in c] == xs]  # seeds evaluated at the same iterations
            values = np.array([[p[1] for p in c] for c in same], dtype=float)
            std = values.std(axis=0, ddof=1) if len(same) > 1 else None
            series[label] = (xs, values.mean(axis=0).tolist(), None if std is None else std.tolist())
        ends = next((m["experience_ends"] for ms in groups.values() for m in ms if m.get("experience_ends")), [])
        plots["comparison_stability.png"] = line_chart_png(
            series, f"{title}: {name} on the tasks seen so far", "iteration", f"{name} (seen tasks)",
            ylim=(0.0, 1.0) if score == "acc" else (None, None), vlines=ends[:-1])
    return plots
