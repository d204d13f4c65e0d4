"""Scenarios: functions from a `Dataset` to a `Stream`."""
from __future__ import annotations

import torch

from streams.experience import Dataset, Experience, Stream


#: Published class orders by name: the permutation a codebase draws, so a run's experiences
#: hold the classes the paper's did. PyCIL (Zhou et al. 2023) shuffles with numpy's legacy
#: generator seeded 1993 for every dataset (its configs' `seed: [1993]`, `shuffle: true`)
#: and takes the permutation as the sequence of classes. Mammoth (Boschini et al. 2022)
#: keeps the natural order unless `--permute_classes 1` (its default is 0).
PRESET_ORDERS = {"pycil": 1993}


def named_order(n_classes: int, name: str) -> list[int]:
    """The sequence of classes a name gives: `natural` (0..K-1); `seed:N` (numpy's legacy
    generator seeded N, its permutation taken as the sequence, as PyCIL and the iCaRL family
    draw it); `pycil` (that with PyCIL's seed 1993); `mammoth` (Mammoth's default: natural);
    `mammoth:N` (Mammoth with `--permute_classes 1 --seed N`: it draws the same permutation
    but uses it as a relabelling, class c becoming label perm[c], so its sequence of classes
    is the inverse permutation)."""
    import numpy as np

    if name in ("natural", "mammoth"):
        return list(range(n_classes))
    if name in PRESET_ORDERS:
        return np.random.RandomState(PRESET_ORDERS[name]).permutation(n_classes).tolist()
    kind, _, value = name.partition(":")
    if kind in ("seed", "mammoth") and value.strip().isdigit():
        perm = np.random.RandomState(int(value)).permutation(n_classes)
        return (np.argsort(perm) if kind == "mammoth" else perm).tolist()
    raise ValueError(f"class_order {name!r}: expected a list of classes, 'natural', 'seed:N', 'mammoth:N' or one of "
                     f"{sorted(PRESET_ORDERS) + ['mammoth']}")


def _class_order(n_classes: int, class_order: list[int] | str | None, shuffle_classes: bool, seed: int) -> list[int]:
    if isinstance(class_order, str):
        return named_order(n_classes, class_order)
    if class_order is not None:
        if sorted(class_order) != list(range(n_classes)):
            raise ValueError(f"class_order must be a permutation of 0..{n_classes - 1}, got {class_order}")
        return list(class_order)
    if shuffle_classes:
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(n_classes, generator=g).tolist()
    return list(range(n_classes))


def _split_sizes(n_classes: int, n_experiences: int | None, classes_per_experience: int | list[int] | None) -> list[int]:
    if (n_experiences is None) == (classes_per_experience is None):
        raise ValueError("give exactly one of n_experiences or classes_per_experience")
    if isinstance(classes_per_experience, list):
        sizes = list(classes_per_experience)
    elif classes_per_experience is not None:
        if n_classes % classes_per_experience:
            raise ValueError(f"{n_classes} classes do not split into experiences of {classes_per_experience}")
        sizes = [classes_per_experience] * (n_classes // classes_per_experience)
    else:
        if n_experiences < 1 or n_classes % n_experiences:
            raise ValueError(f"{n_classes} classes do not split evenly into {n_experiences} experiences")
        sizes = [n_classes // n_experiences] * n_experiences
    if sum(sizes) != n_classes or min(sizes) < 1:
        raise ValueError(f"experience sizes {sizes} must be positive and add up to {n_classes} classes")
    return sizes


def class_incremental(data: Dataset, n_experiences: int | None = None,
                      classes_per_experience: int | list[int] | None = None,
                      class_order: list[int] | str | None = None, shuffle_classes: bool = False,
                      task_labels: bool = False, seed: int = 0) -> Stream:
    """Split a dataset's classes into disjoint experiences (class-incremental learning,
    van de Ven and Tolias 2019). The class order is given (a list, `natural`, `seed:N` or a
    published preset such as `pycil`: see `named_order`), or shuffled by `seed`.

    With `task_labels`, experience i carries task label i (task-incremental);
    otherwise every experience has task label 0.
    """
    order = _class_order(data.n_classes, class_order, shuffle_classes, seed)
    sizes = _split_sizes(data.n_classes, n_experiences, classes_per_experience)
    experiences, start = [], 0
    for i, size in enumerate(sizes):
        classes = order[start:start + size]
        start += size
        wanted = torch.tensor(classes)
        task = i if task_labels else 0
        train = data.train.subset(torch.isin(data.train.y, wanted).nonzero().squeeze(1)).with_task(task)
        test = data.test.subset(torch.isin(data.test.y, wanted).nonzero().squeeze(1)).with_task(task)
        experiences.append(Experience(i, task, sorted(classes), train, test, task_index=i))
    return Stream(f"split-{data.name}", experiences, data.transform, data.input_shape, data.n_classes, order)
