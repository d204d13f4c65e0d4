"""Progress across an invocation: which run of how many, and once one run has finished, an
estimate of the time left (issue 25)."""
from __future__ import annotations

import pytest

from cl.cli.main import main
from cl.runner import progress
from conftest import tiny_experiment


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_estimate_is_the_mean_run_time_for_what_is_left(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    where = progress.InvocationProgress(total=4)
    where.start("naive", 0, several_seeds=True)
    assert where.label() == "run 1/4 (naive, seed 0) · "  # nothing finished: no estimate yet
    clock.now = 10.0
    where.end()
    where.start("replay", 0, several_seeds=True)
    clock.now = 14.0
    # mean run 10 s: two runs not started (20 s) and 6 s of this one
    assert where.left_s() == pytest.approx(26.0)
    assert where.label() == "run 2/4 (replay, seed 0) · ~26s left · "
    clock.now = 40.0
    where.end()  # 30 s: the mean is now 20 s
    where.start("naive", 1, several_seeds=True)
    assert where.left_s() == pytest.approx(20.0 + 20.0)
    where.end(trained=False)  # finished before a resume: not a run time
    where.start("replay", 1, several_seeds=True)
    clock.now = 100.0  # longer than the mean already: only the runs not started count
    assert where.left_s() == pytest.approx(0.0) and where.label().startswith("run 4/4 (replay, seed 1) · ~0s left")


def test_one_run_has_no_prefix_and_long_estimates_read_as_hours():
    assert progress.InvocationProgress(total=1).label() == ""
    assert progress._duration(3 * 3600 + 125) == "3h02m" and progress._duration(95) == "1m35s"


def test_the_bars_of_cl_run_say_which_run_of_how_many(tmp_path, capsys):
    path = tiny_experiment(tmp_path, "exp.yaml", epochs=1, hidden=(16,), strategies=None,
                           runs={"naive": ["naive"], "replay": [{"name": "replay", "memory_size": 40}]})
    assert main(["run", str(path), "--no-track", "--seeds", "0,1"]) == 0
    err = capsys.readouterr().err
    assert "run 1/4 (naive, seed 0) · experience 1/" in err
    assert "run 4/4 (replay, seed 1) · ~" in err and " left · experience" in err
