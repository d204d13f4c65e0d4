"""Where an invocation stands, for the progress bar: which run of how many, and once a run has
finished, about how long the rest will take (`run 2/6 (derpp, seed 1) · ~1m40s left ·`)."""
from __future__ import annotations

import time


class InvocationProgress:
    """Counts the runs of one `cl run` (every run label once per seed) as they start and end."""

    def __init__(self, total: int):
        self.total = total
        self.index = 0  # the run under way, from 1
        self.current = ""
        self._started: float | None = None
        self._durations: list[float] = []

    def start(self, label: str, seed: int, several_seeds: bool) -> None:
        self.index += 1
        self.current = f"{label}, seed {seed}" if several_seeds else label
        self._started = time.perf_counter()

    def end(self, trained: bool = True) -> None:
        """The run under way ended; one that did not train (finished before a resume) does not
        count towards the estimate."""
        if self._started is not None and trained:
            self._durations.append(time.perf_counter() - self._started)
        self._started = None

    def left_s(self) -> float | None:
        """Seconds the remaining runs should take: the mean finished run's time for each run not
        yet started, and what the mean leaves of the current one. None before a run finished."""
        if not self._durations:
            return None
        mean = sum(self._durations) / len(self._durations)
        in_run = time.perf_counter() - self._started if self._started is not None else mean
        return mean * (self.total - self.index) + max(mean - in_run, 0.0)

    def label(self) -> str:
        """The bar's prefix; empty for an invocation of one run (its bar says all there is)."""
        if self.total <= 1:
            return ""
        left = self.left_s()
        eta = "" if left is None else f" · ~{_duration(left)} left"
        return f"run {self.index}/{self.total} ({self.current}){eta} · "


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
