"""`cl compare` ranks strategies, gives each one's difference to the best with a 95% interval
over seeds (paired where the seeds match, Welch's otherwise), and marks the differences the
seeds cannot tell apart. Every number here is worked by hand below; the t quantiles are
the table's: t(0.975, 2) = 4.302653, t(0.975, 4) = 2.776445."""
from __future__ import annotations

import math

import pytest

from evaluation import compare

T2, T4 = 4.302653, 2.776445


def runs_of(label, values, metric="acc", seeds=None):
    seeds = range(len(values)) if seeds is None else seeds
    return [{"strategy": label, "seed": s, "metrics": {metric: v}} for s, v in zip(seeds, values)]


HAND_MADE = (runs_of("a", [0.80, 0.82, 0.79]) + runs_of("b", [0.85, 0.86, 0.86])
             + runs_of("z", [0.85, 0.84, 0.87]) + runs_of("s", [0.50]))


def test_strategies_are_ranked_best_first_by_final_accuracy():
    rows = compare.comparison(HAND_MADE)
    # means: b 0.856667, z 0.853333, a 0.803333, s 0.5
    assert [(r["rank"], r["strategy"]) for r in rows] == [(1, "b"), (2, "z"), (3, "a"), (4, "s")]
    assert rows[0]["vs_best"] is None


def test_paired_difference_and_interval_by_hand():
    rows = {r["strategy"]: r for r in compare.comparison(HAND_MADE)}
    a = rows["a"]["vs_best"]
    # per seed a - b: -0.05, -0.04, -0.07; mean -0.053333; sd 0.0152753
    half = T2 * 0.0152753 / math.sqrt(3)
    assert a.paired and a.mean == pytest.approx(-0.053333, abs=1e-6)
    assert (a.low, a.high) == pytest.approx((-0.053333 - half, -0.053333 + half), abs=1e-5)
    assert a.distinguishable is True  # [-0.0913, -0.0154] excludes zero
    z = rows["z"]["vs_best"]
    # per seed z - b: 0, -0.02, +0.01; mean -0.003333; sd 0.0152753: the interval holds zero
    assert z.mean == pytest.approx(-0.003333, abs=1e-6)
    assert (z.low, z.high) == pytest.approx((-0.003333 - half, -0.003333 + half), abs=1e-5)
    assert z.distinguishable is False


def test_one_seed_gives_a_difference_without_an_interval():
    s = {r["strategy"]: r for r in compare.comparison(HAND_MADE)}["s"]["vs_best"]
    assert s.mean == pytest.approx(0.5 - 0.856667, abs=1e-6) and s.low is None and s.distinguishable is None


def test_welch_interval_where_the_seeds_differ():
    runs = runs_of("x", [0.70, 0.72, 0.74]) + runs_of("y", [0.60, 0.62, 0.64], seeds=[3, 4, 5])
    y = compare.comparison(runs)[1]["vs_best"]
    # both variances 0.0004 over 3 seeds: se = sqrt(2 * 0.0004 / 3); Welch's df = 2 (n - 1) = 4
    half = T4 * math.sqrt(2 * 0.0004 / 3)
    assert not y.paired and y.mean == pytest.approx(-0.10)
    assert (y.low, y.high) == pytest.approx((-0.10 - half, -0.10 + half), abs=1e-6)


def test_a_loss_is_ranked_lower_first():
    runs = runs_of("p", [2.0, 2.2], metric="loss") + runs_of("q", [1.5, 1.7], metric="loss")
    rows = compare.comparison(runs)
    assert [r["strategy"] for r in rows] == ["q", "p"]
    p = rows[1]["vs_best"]  # per seed +0.5, +0.5: no spread, an exact difference
    assert p.paired and (p.mean, p.low, p.high) == pytest.approx((0.5, 0.5, 0.5)) and p.distinguishable


def test_tables_show_rank_difference_and_the_mark_for_a_tie():
    rows = compare.comparison(HAND_MADE)
    text = compare.text_table(rows)
    assert text.splitlines()[0].split()[:2] == ["rank", "strategy"]
    assert "best" in text.splitlines()[1]
    assert "-0.0033 [-0.0413, +0.0346] ≈" in text  # z: the seeds cannot tell it from b
    assert "-0.0533 [-0.0913, -0.0154]" in text and "-0.0533 [-0.0913, -0.0154] ≈" not in text
    md = compare.markdown_table(rows)
    assert md.splitlines()[2].startswith("| 1 | b | 3 | 0,1,2 | 0.8567 ± 0.0058 | best |")
    columns = compare.table_columns(rows)
    assert columns["rank"] == [1, 2, 3, 4] and columns["vs_best_paired"] == [None, True, True, False]
    assert "≈: the seeds cannot tell it from the best" in compare.ranking_note(rows, HAND_MADE)


def test_parent_metric_keys_keep_the_label_readable():
    rows = compare.comparison(runs_of("der++", [0.8, 0.9]) + runs_of("ewc (λ=10)", [0.5, 0.6]))
    keys = set(compare.parent_metrics(rows))
    assert {"derpp/acc_mean", "derpp/acc_std", "ewc ___10_/acc_mean"} <= keys
