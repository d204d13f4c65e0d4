"""Datasets too big for memory: read through a DataLoader with workers, batch by batch.

`LazyData` stands where `TensorData` does. Its labels are held in memory (a
scenario needs them to split classes); its inputs stay in the wrapped
`torch.utils.data.Dataset` and are read by a DataLoader during training and
evaluation. Indexing `lazy.x[index]` reads just those items, so a replay
memory can copy a few samples out of it.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import ConcatDataset, DataLoader, Subset


def _declared_item(dataset) -> tuple[tuple[int, ...], torch.dtype] | None:
    """The shape and dtype of every item where the dataset (under any Subset or ConcatDataset)
    declares them (`item_shape`, `item_dtype`: images decoded to a fixed size), so that
    building a stream decodes no image."""
    while isinstance(dataset, (Subset, ConcatDataset)):
        dataset = dataset.dataset if isinstance(dataset, Subset) else dataset.datasets[0]
    shape = getattr(dataset, "item_shape", None)
    return None if shape is None else (tuple(shape), getattr(dataset, "item_dtype", torch.uint8))


class LazyInputs:
    """The inputs of a lazy dataset: indexable by a tensor of positions, read on demand."""

    def __init__(self, dataset):
        self.dataset = dataset
        declared = _declared_item(dataset)
        if declared is None:  # read the first item for its shape
            first = torch.as_tensor(dataset[0][0])
            declared = tuple(first.shape), first.dtype
        self.shape = (len(dataset),) + declared[0]
        self.dtype = declared[1]

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def device(self) -> torch.device:
        """Where items come from: the host (a strategy moves what it keeps to its own device)."""
        return torch.device("cpu")

    def __getitem__(self, index) -> torch.Tensor:
        positions = range(len(self))[index] if isinstance(index, slice) else torch.as_tensor(index).tolist()
        if isinstance(positions, int):
            positions = [positions]
        if len(positions) == 0:
            return torch.empty((0,) + self.shape[1:], dtype=self.dtype)
        return torch.stack([torch.as_tensor(self.dataset[i][0]) for i in positions])


class LazyData:
    """A dataset read lazily: `dataset` yields (input, label, ...) items; `y` holds every label."""

    def __init__(self, dataset, y: torch.Tensor, t: torch.Tensor | None = None, num_workers: int = 2):
        if len(dataset) != len(y):
            raise ValueError(f"LazyData: dataset has {len(dataset)} items but {len(y)} labels")
        self.dataset = dataset
        self.y = y.long()
        self.t = torch.zeros(len(y), dtype=torch.long) if t is None else t
        self.num_workers = num_workers
        self.pin_memory = False  # `pinned`: batches in page-locked memory, for a GPU
        self.x = LazyInputs(dataset) if len(dataset) else None

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index) -> "LazyData":
        positions = torch.arange(len(self))[index]
        return LazyData(Subset(self.dataset, positions.tolist()), self.y[positions], self.t[positions],
                        self.num_workers)

    def with_task(self, task: int) -> "LazyData":
        return LazyData(self.dataset, self.y, torch.full_like(self.y, task), self.num_workers)

    @property
    def classes(self) -> list[int]:
        return torch.unique(self.y).tolist()

    @staticmethod
    def concat(parts: Sequence["LazyData"]) -> "LazyData":
        parts = [p for p in parts if len(p)]
        return LazyData(ConcatDataset([p.dataset for p in parts]), torch.cat([p.y for p in parts]),
                        torch.cat([p.t for p in parts]), parts[0].num_workers)

    def to(self, device) -> "LazyData":
        """Inputs stay where the dataset reads them; batches move to the device as they come."""
        return self

    def pinned(self) -> "LazyData":
        """The same data, its batches read into pinned (page-locked) memory, so that their copy
        to a GPU runs without blocking the host (`non_blocking=True`)."""
        copy = LazyData(self.dataset, self.y, self.t, self.num_workers)
        copy.pin_memory = True
        return copy

    def batches(self, batch_size: int, shuffle: bool, generator: torch.Generator | None = None,
                start_batch: int = 0, part: tuple[int, int] = (0, 1)):
        """(x, y, t) batches in shuffled (by `generator`) or stored order. The permutation is
        drawn here, as the tensor path draws it, so both paths see the same batches;
        `start_batch` skips batches without reading them (a run resumed mid-epoch), and
        `part=(r, n)` reads only the batches r, r+n, ... (one process's share)."""
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        sampler = list(torch.utils.data.BatchSampler(order.tolist(), batch_size, drop_last=False))
        sampler = sampler[start_batch + part[0]::part[1]]
        # A DataLoader draws its workers' base seed from the global RNG unless given a
        # generator: a private one keeps evaluation and training from moving the run's RNG.
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            persistent_workers=False, generator=torch.Generator().manual_seed(0))
        for batch_index, batch in zip(sampler, loader):
            index = torch.tensor(batch_index)
            yield torch.as_tensor(batch[0]), self.y[index], self.t[index]
