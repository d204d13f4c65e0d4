"""A stream of whole datasets, each with its own label space, in the style of NEVIS'22
(Bornschein et al. 2023): experience k is dataset k, its classes offset past those of
the datasets before it, and its task label k names its label space, so a multi-head
model (`model: {..., multihead: true}`) gives every label space its own head.

Images are brought to one shape (`channels` x `size` x `size`, bilinear resizing,
grey images repeated over the colour channels) so one backbone reads them all.
"""
from __future__ import annotations

from typing import Callable

import torch

from streams.experience import BatchTransform, Experience, Stream, TensorData, reshape_images


def multi_dataset(datasets: list[str | dict], load_dataset: Callable, size: int = 32, channels: int = 3,
                  data_dir: str | None = None, seed: int = 0) -> Stream:
    """One experience per dataset, in the given order, each its own label space (NEVIS'22 style).

    `datasets` lists dataset names or `{name: ..., <arguments>}` mappings, e.g.
    `[digits, mnist, cifar10]`; `load_dataset(spec)` turns one into a `Dataset` (the lab
    passes its own loader, which knows every registered dataset)."""
    if not datasets:
        raise ValueError("multi_dataset needs at least one dataset")
    experiences, offset, names = [], 0, []
    for k, spec in enumerate(datasets):
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        name = spec["name"]
        data = load_dataset(spec)
        if data.train.x.dtype != torch.uint8 or data.train.x.dim() != 4:
            raise ValueError(f"multi_dataset: '{name}' is not a dataset of uint8 images")
        K = data.n_classes
        train = TensorData(reshape_images(data.train.x, size, channels), data.train.y + offset,
                           torch.full_like(data.train.y, k))
        test = TensorData(reshape_images(data.test.x, size, channels), data.test.y + offset,
                          torch.full_like(data.test.y, k))
        experiences.append(Experience(k, k, list(range(offset, offset + K)), train, test, task_index=k))
        names.append(name)
        offset += K
    # One normalisation for all: per-channel statistics of a sample of every training set.
    sample = torch.cat([e.train.x[:5000] for e in experiences]).float().div_(255)
    mean = sample.mean((0, 2, 3)).tolist()
    std = sample.std((0, 2, 3)).clamp_min(1e-6).tolist()
    return Stream("multi-" + "-".join(names), experiences, BatchTransform(mean, std), (channels, size, size),
                  offset, list(range(offset)),
                  schedule={"kind": "multi_dataset", "datasets": names, "size": size, "channels": channels})
