"""Bridges from other libraries' data into lab streams."""
from __future__ import annotations

from typing import Callable

import torch

from streams.experience import BatchTransform, Experience, Stream, TensorData


def _materialise(dataset, batch_size: int = 1024, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (x, y, ...) item of a map-style dataset, stacked into two tensors by a DataLoader."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    xs, ys = [], []
    for batch in loader:
        xs.append(torch.as_tensor(batch[0]))
        ys.append(torch.as_tensor(batch[1]))  # as they are: the caller checks and converts labels
    if not xs:
        raise ValueError("dataset is empty")
    return torch.cat(xs), torch.cat(ys)


def from_avalanche(benchmark, num_workers: int = 0) -> Stream:
    """Convert an avalanche-lib benchmark (e.g. `avalanche.benchmarks.classic.SplitMNIST`) into a
    lab `Stream`, keeping its experience order, classes, task labels and sizes.

    Each experience's samples are read once through avalanche's own transforms (train
    transforms for training data, eval transforms for test data) and kept as float tensors,
    so the lab applies no further normalisation. Random augmentations in avalanche's train
    transforms are thereby frozen to one draw; give the lab's `BatchTransform` augmentation
    instead if you need it per epoch.
    """
    train_stream, test_stream = benchmark.train_stream, benchmark.test_stream
    if len(train_stream) != len(test_stream):
        raise ValueError(f"avalanche benchmark has {len(train_stream)} train but {len(test_stream)} test experiences")
    experiences, test_sets, task_classes = [], [], []
    for i, (tr, te) in enumerate(zip(train_stream, test_stream)):
        task = int(tr.task_label)
        x, y = _materialise(tr.dataset.train(), num_workers=num_workers)
        xt, yt = _materialise(te.dataset.eval(), num_workers=num_workers)
        train = TensorData(x, y, torch.full_like(y, task))
        test = TensorData(xt, yt, torch.full_like(yt, task))
        classes = sorted(int(c) for c in tr.classes_in_this_experience)
        experiences.append(Experience(i, task, classes, train, test, task_index=i))
        test_sets.append(test)
        task_classes.append(sorted(int(c) for c in te.classes_in_this_experience))
    order = [c for e in experiences for c in e.classes]
    n_classes = int(getattr(benchmark, "n_classes", max(order) + 1))
    first = experiences[0].train.x
    name = f"avalanche-{type(benchmark).__name__}".lower()
    return Stream(name, experiences, BatchTransform(scale=1.0), tuple(first.shape[1:]), n_classes,
                  list(dict.fromkeys(order)), test_sets=test_sets, task_classes=task_classes,
                  schedule={"kind": "avalanche", "benchmark": type(benchmark).__name__})


def avalanche(benchmark: Callable, args: dict | None = None, root_argument: str | None = "dataset_root",
              num_workers: int = 0, data_dir: str | None = None, seed: int = 0) -> Stream:
    """An avalanche-lib benchmark: `benchmark` builds it (in an experiment file, a
    `module:callable` path such as `avalanche.benchmarks.classic:SplitMNIST`), called
    with `args`, and with the lab's data root as `root_argument` unless that is null or
    given in `args`."""
    from streams.sources import data_root

    kwargs = dict(args or {})
    if root_argument and root_argument not in kwargs:
        kwargs[root_argument] = str(data_root(data_dir))
    return from_avalanche(benchmark(**kwargs), num_workers=num_workers)


# An experiment file may name avalanche-lib's own benchmark builders here, beside plugin code.
avalanche.trusted_callables = {"benchmark": ("avalanche.benchmarks",)}
