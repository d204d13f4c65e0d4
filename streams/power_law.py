"""Power-law environments: earlier tasks recur as a power of the time since they were last met.

People meet a piece of knowledge again with a probability that falls as a
power of the time since they last needed it (Anderson and Schooler 1991).
"Catastrophic Interference is Mitigated in Naturalistic Power-Law Learning
Environments" (2024) trains networks in environments built that way. Here a
stream is a long schedule of phases: phase p focuses on task
floor(p * T / P), and every earlier task j recurs in it with probability

    q(dt) = p0 * dt ** (-exponent),     dt = p - (last phase j was trained in),

adding `recurrence_size` of its samples to the phase. The `uniform` control
spends exactly the same number of recurrences, placed uniformly at random
over the same eligible (phase, task) pairs, so the two differ only in when
old tasks come back, not in how much.
"""
from __future__ import annotations

from typing import Literal

import torch

from streams.experience import Dataset, Experience, Stream, TensorData, concat_data
from streams.scenarios import class_incremental


def power_law_schedule(n_tasks: int, n_phases: int, exponent: float, p0: float, seed: int,
                       control: Literal["power_law", "uniform"] = "power_law") -> dict:
    """The recurrences of a schedule: focus task per phase and (phase, task, dt) triples."""
    if n_phases < n_tasks:
        raise ValueError(f"n_phases ({n_phases}) must be at least n_tasks ({n_tasks})")
    if not 0.0 < p0 <= 1.0 or exponent < 0:
        raise ValueError("p0 must be in (0, 1] and exponent non-negative")
    g = torch.Generator().manual_seed(seed)
    focus = [p * n_tasks // n_phases for p in range(n_phases)]
    last_seen: dict[int, int] = {}
    recurrences, eligible = [], []
    for p, f in enumerate(focus):
        draws = torch.rand(f, generator=g).tolist()
        back = []
        for j in range(f):
            eligible.append((p, j))
            dt = p - last_seen[j]
            if draws[j] < p0 * dt ** (-exponent):
                back.append(j)
                recurrences.append((p, j, dt))
        for j in back + [f]:
            last_seen[j] = p
    if control == "uniform":
        pick = torch.randperm(len(eligible), generator=g)[: len(recurrences)].sort().values.tolist()
        recurrences = [(eligible[i][0], eligible[i][1], None) for i in pick]
    elif control != "power_law":
        raise ValueError(f"control must be 'power_law' or 'uniform', got '{control}'")
    return {"kind": control, "n_tasks": n_tasks, "n_phases": n_phases, "exponent": exponent, "p0": p0,
            "focus": focus, "recurrences": [list(r) for r in recurrences]}


def power_law(data: Dataset, n_tasks: int = 5, n_phases: int = 50, exponent: float = 1.0, p0: float = 0.5,
              phase_size: int = 512, recurrence_size: int = 64,
              control: Literal["power_law", "uniform"] = "power_law",
              class_order: list[int] | str | None = None, shuffle_classes: bool = False, seed: int = 0) -> Stream:
    """A power-law environment over the class-incremental tasks of `data` (see the module
    docstring); `control: uniform` gives the same budget of recurrences spread uniformly.
    Every phase is an experience, evaluated on every task's test set."""
    # The tasks are those of the class-incremental split; the schedule decides when each is met.
    tasks = class_incremental(data, n_experiences=n_tasks, class_order=class_order,
                              shuffle_classes=shuffle_classes, seed=seed)
    pools = [e.train for e in tasks]
    schedule = power_law_schedule(n_tasks, n_phases, exponent, p0, seed, control)
    g = torch.Generator().manual_seed(seed + 1)
    # Each task's samples are drawn in a shuffled cycle, so a phase never repeats a sample
    # before the whole pool has been seen.
    cursors = [0] * n_tasks
    perms = [torch.randperm(len(p), generator=g) for p in pools]

    def draw(task: int, n: int) -> TensorData:
        pool, idx = pools[task], []
        while n > 0:
            if cursors[task] == len(pool):
                perms[task], cursors[task] = torch.randperm(len(pool), generator=g), 0
            take = min(n, len(pool) - cursors[task])
            idx.append(perms[task][cursors[task]:cursors[task] + take])
            cursors[task] += take
            n -= take
        return pool.subset(torch.cat(idx))

    by_phase: dict[int, list[int]] = {}
    for p, j, _ in schedule["recurrences"]:
        by_phase.setdefault(p, []).append(j)
    experiences = []
    for p, focus in enumerate(schedule["focus"]):
        back = by_phase.get(p, [])
        train = concat_data([draw(focus, phase_size)] + [draw(j, recurrence_size) for j in back])
        experiences.append(Experience(p, 0, sorted(torch.unique(train.y).tolist()), train,
                                      task_index=focus if not back else None, tasks=(focus, *back)))
    return Stream(f"{control}-{data.name}", experiences, data.transform, data.input_shape, data.n_classes,
                  tasks.class_order, test_sets=tasks.test_sets, task_classes=tasks.task_classes, schedule=schedule)


def recurrence_rates(schedule: dict) -> dict[int, tuple[int, int]]:
    """For each time-since-last-seen dt: (recurrences, opportunities) in a power-law schedule."""
    recurred = {(p, j) for p, j, _ in schedule["recurrences"]}
    last_seen: dict[int, int] = {}
    counts: dict[int, list[int]] = {}
    for p, f in enumerate(schedule["focus"]):
        for j in range(f):
            dt = p - last_seen[j]
            c = counts.setdefault(dt, [0, 0])
            c[1] += 1
            if (p, j) in recurred:
                c[0] += 1
        for j in range(f):
            if (p, j) in recurred:
                last_seen[j] = p
        last_seen[f] = p
    return {dt: (c[0], c[1]) for dt, c in sorted(counts.items())}


def fit_exponent(rates: dict[int, tuple[int, int]], p0: float) -> float:
    """Maximum-likelihood exponent of q(dt) = p0 * dt**(-exponent) from `recurrence_rates`,
    by grid search over [0, 4] in steps of 0.001 (each opportunity a Bernoulli trial)."""
    import numpy as np

    dt = np.array(list(rates), dtype=float)
    k = np.array([r[0] for r in rates.values()], dtype=float)
    n = np.array([r[1] for r in rates.values()], dtype=float)
    grid = np.arange(0.0, 4.0, 0.001)[:, None]
    q = np.clip(p0 * dt[None, :] ** (-grid), 1e-12, 1 - 1e-12)
    loglik = (k * np.log(q) + (n - k) * np.log(1 - q)).sum(1)
    return float(grid[np.argmax(loglik), 0])
