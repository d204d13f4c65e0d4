"""Online (task-free) streams and blurry task boundaries.

`online(stream, experience_size)` cuts every experience of a stream into
small consecutive experiences seen once each, in the spirit of online
continual learning (Aljundi et al. 2019; Mai et al. 2022). The accuracy
matrix still gets one row per original task (evaluated after its last
piece); periodic evaluation (`training.eval_every`) gives the anytime curve.

`blur(stream, overlap)` makes neighbouring experiences share classes: each
experience hands a fraction `overlap` of its training samples to the next one
(the last to the first), so about that fraction of every experience comes
from another task, as in blurry class-incremental learning (Aljundi et al.
2019; Bang et al. 2021, "Rainbow Memory").
"""
from __future__ import annotations

import torch

from streams.experience import Experience, Stream, concat_data


def online(stream: Stream, experience_size: int, seed: int = 0) -> Stream:
    if experience_size < 1:
        raise ValueError(f"experience_size must be positive, got {experience_size}")
    g = torch.Generator().manual_seed(seed)
    pieces, eval_after = [], []
    for e in stream.experiences:
        order = torch.randperm(e.n_train, generator=g)
        for start in range(0, e.n_train, experience_size):
            part = e.train.subset(order[start:start + experience_size])
            pieces.append(Experience(len(pieces), e.task_label, sorted(torch.unique(part.y).tolist()), part,
                                     e.test, task_index=e.task_index, tasks=e.tasks))
        eval_after.append(len(pieces) - 1)
    schedule = {**stream.schedule, "online": {"experience_size": experience_size}}
    return Stream(f"online-{stream.name}", pieces, stream.transform, stream.input_shape, stream.n_classes,
                  stream.class_order, test_sets=stream.test_sets, task_classes=stream.task_classes,
                  eval_after=eval_after, schedule=schedule)


def blur(stream: Stream, overlap: float, seed: int = 0) -> Stream:
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if overlap == 0.0 or len(stream) < 2:
        return stream
    g = torch.Generator().manual_seed(seed + 7919)
    kept, moved = [], []
    for e in stream.experiences:
        order = torch.randperm(e.n_train, generator=g)
        n_move = int(round(overlap * e.n_train))
        moved.append(e.train.subset(order[:n_move]))
        kept.append(e.train.subset(order[n_move:]))
    experiences = []
    for i, e in enumerate(stream.experiences):
        incoming = moved[i - 1]  # moved[-1] is the last experience's share, given to the first
        train = concat_data([kept[i], incoming])
        tasks = tuple(dict.fromkeys(e.tasks + (stream.experiences[i - 1].tasks if len(incoming) else ())))
        experiences.append(Experience(i, e.task_label, sorted(torch.unique(train.y).tolist()), train, e.test,
                                      task_index=e.task_index, tasks=tasks))
    schedule = {**stream.schedule, "blurry": {"overlap": overlap}}
    return Stream(f"blurry-{stream.name}", experiences, stream.transform, stream.input_shape, stream.n_classes,
                  stream.class_order, test_sets=stream.test_sets, task_classes=stream.task_classes,
                  eval_after=stream.eval_after, schedule=schedule)
