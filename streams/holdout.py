"""Streams for choosing hyperparameters without looking at the test sets.

`validation_split` carves a validation set out of each experience's training data and
makes it that task's evaluation set: what a sweep scores, so selection never sees a test
sample. `first_experiences` keeps the first k experiences only: tuning on them, then
running the whole stream with the chosen point, does not peek at the tasks to come.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from streams.experience import Stream


def validation_split(stream: Stream, fraction: float, seed: int = 0) -> Stream:
    """Each experience keeps a random (1 - `fraction`) of its training samples; the rest,
    at least one, becomes its task's evaluation set in place of the test set. Needs one
    experience per task (the classic setting)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"stream.validation must lie in (0, 1), got {fraction}")
    if not stream.one_experience_per_task:
        raise ValueError(f"stream {stream.name}: a validation split needs one experience per task "
                         f"(set it before blurring or cutting the stream online)")
    g = torch.Generator().manual_seed(seed + 7919)  # apart from the stream's own draws
    experiences, held_out = [], []
    for e in stream.experiences:
        order = torch.randperm(e.n_train, generator=g)
        n_val = max(1, round(fraction * e.n_train))
        if n_val >= e.n_train:
            raise ValueError(f"experience {e.index + 1} has {e.n_train} training samples: too few to hold "
                             f"{fraction:.0%} out for validation")
        val, train = e.train.subset(order[:n_val].sort().values), e.train.subset(order[n_val:].sort().values)
        experiences.append(replace(e, train=train, test=val))
        held_out.append(val)
    return replace(stream, name=f"{stream.name}/validation", experiences=experiences, test_sets=held_out,
                   task_classes=[sorted(torch.unique(v.y).tolist()) for v in held_out])


def first_experiences(stream: Stream, k: int) -> Stream:
    """The stream's first `k` experiences and their tasks' evaluation sets. The number of
    classes (the model's output size) stays the whole stream's, so a point chosen here runs
    unchanged on the whole stream."""
    if not 1 <= k <= len(stream):
        raise ValueError(f"stream.first_experiences must lie in 1..{len(stream)}, got {k}")
    if not stream.one_experience_per_task:
        raise ValueError(f"stream {stream.name}: first_experiences needs one experience per task")
    schedule = dict(stream.schedule)
    if "bytes_per_token" in schedule:  # one per task, like the test sets
        schedule["bytes_per_token"] = schedule["bytes_per_token"][:k]
    return replace(stream, name=f"{stream.name}/first{k}", experiences=stream.experiences[:k],
                   test_sets=stream.test_sets[:k], task_classes=stream.task_classes[:k],
                   eval_after=[i for i in stream.eval_after if i < k], schedule=schedule)
