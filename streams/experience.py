"""The data side of the lab: tensors in memory, experiences and streams.

A stream knows nothing of training. `TensorData` is a dataset held as tensors
(images as uint8, labels as int64) and batched by indexing; `BatchTransform`
turns a raw uint8 batch into model input on whole batches, so no per-sample
Python runs on the training hot path. An `Experience` is data plus facts about
it; a `Stream` is the ordered experiences and every task's test set.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TensorData:
    """A dataset held in memory: `x` (N, ...) raw inputs, `y` (N,) int64 labels.

    `t` holds the task label of every sample; it matters for task-incremental
    settings and for replayed samples that come from earlier tasks.
    """

    x: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor | None = None

    def __post_init__(self):
        if len(self.x) != len(self.y):
            raise ValueError(f"TensorData: {len(self.x)} inputs but {len(self.y)} labels")
        if self.y.dtype != torch.long:
            object.__setattr__(self, "y", self.y.long())
        if self.t is None:
            object.__setattr__(self, "t", torch.zeros(len(self.y), dtype=torch.long))

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: torch.Tensor) -> "TensorData":
        return TensorData(self.x[index], self.y[index], self.t[index])

    def with_task(self, task: int) -> "TensorData":
        return TensorData(self.x, self.y, torch.full_like(self.y, task))

    def to(self, device: torch.device | str) -> "TensorData":
        return TensorData(self.x.to(device), self.y.to(device), self.t.to(device))

    def pinned(self) -> "TensorData":
        """A copy in pinned (page-locked) host memory, for data kept off a GPU: its batches are
        then copied to the device without blocking the host (`non_blocking=True`)."""
        return TensorData(self.x.pin_memory(), self.y.pin_memory(), self.t.pin_memory())

    @property
    def classes(self) -> list[int]:
        return torch.unique(self.y).tolist()

    def batches(self, batch_size: int, shuffle: bool, generator: torch.Generator | None = None,
                start_batch: int = 0, part: tuple[int, int] = (0, 1)):
        """(x, y, t) batches by indexing, in an order drawn from `generator` or as stored.

        `start_batch` skips that many batches of the same order (a run resumed
        mid-epoch); the order is drawn all the same, so the generator ends in
        the state it would have. `part=(r, n)` yields only the batches r, r+n, r+2n, ...
        (one process's share of an evaluation pass)."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else None
        if order is not None and order.device != self.x.device:
            order = order.to(self.x.device)
        for b in range((start_batch + part[0]) * batch_size, n, batch_size * part[1]):
            if order is None:
                yield self.x[b:b + batch_size], self.y[b:b + batch_size], self.t[b:b + batch_size]
            else:  # index_select: a fifth of advanced indexing's cost on batch-sized gathers
                idx = order[b:b + batch_size]
                yield self.x.index_select(0, idx), self.y.index_select(0, idx), self.t.index_select(0, idx)

    @staticmethod
    def concat(parts: Sequence["TensorData"]) -> "TensorData":
        parts = [p for p in parts if len(p)]
        if not parts:
            raise ValueError("TensorData.concat needs at least one non-empty part")
        if len(parts) == 1:
            return parts[0]
        return TensorData(
            torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]), torch.cat([p.t for p in parts])
        )


def concat_data(parts):
    """Concatenate TensorData (or LazyData) parts, whichever kind they are."""
    parts = [p for p in parts if len(p)]
    if not parts:
        raise ValueError("concat_data needs at least one non-empty part")
    return type(parts[0]).concat(parts)


class BatchTransform:
    """Raw batch -> model input, applied to a whole batch at once on its device.

    Casts uint8 images to float in [0, 1], optionally augments (random crop
    with zero padding and horizontal flip, as is standard for CIFAR), resizes to
    `size` x `size` when given (the input a pre-trained backbone expects: CIFAR's
    32 x 32 images read by a ViT at 224), then normalises per channel (grey images
    repeated over the channels when `mean` has three).
    Augmentation runs only when `train=True`.
    """

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 scale: float = 255.0, crop_padding: int = 0, flip: bool = False, size: int | None = None,
                 interpolation: str = "bilinear"):
        self.scale = scale
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32)
        self.crop_padding = crop_padding
        self.flip = flip
        self.size = size
        self.interpolation = interpolation
        self._grey_to_colour = self.mean is not None and len(self.mean) == 3  # decided once, not per batch
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def augments(self) -> bool:
        """Whether training batches draw random augmentations."""
        return bool(self.crop_padding or self.flip)

    def _affine(self, x: torch.Tensor, raw: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # (x / scale - mean) / std folded into x * a - b; one pair per device, dtype and rank.
        key = (x.device, raw, x.dim())
        if key not in self._cache:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            mean = self.mean if self.mean is not None else torch.zeros(1)
            std = self.std if self.std is not None else torch.ones(1)
            a = 1.0 / (std * (self.scale if raw else 1.0))
            self._cache[key] = (a.to(x.device).view(shape), (mean / std).to(x.device).view(shape))
        return self._cache[key]

    def __call__(self, x: torch.Tensor, train: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        raw = x.dtype == torch.uint8
        if train and (self.crop_padding or self.flip):
            x = self._augment(x.float().div_(self.scale) if raw else x.float(), generator)
            raw = False
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            # On the batch, on its device: one call, not a per-image PIL resize in a worker.
            x = torch.nn.functional.interpolate(x.float().div_(self.scale) if raw else x.float(),
                                                size=(self.size, self.size), mode=self.interpolation,
                                                align_corners=False, antialias=True)
            raw = False
        if self._grey_to_colour and x.dim() == 4 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # a grey image read by a colour backbone
        a, b = self._affine(x, raw)
        return x.float().mul_(a).sub_(b) if raw else x.float() * a - b

    def _augment(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        n, _, h, w = x.shape
        # Random numbers are drawn on the CPU generator so a run is reproducible on any device.
        if self.crop_padding:
            p = self.crop_padding
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
            dx = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
            rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
            batch = torch.arange(n, device=x.device)[:, None, None, None]
            chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
            x = padded[batch, chans, rows, cols]
        if self.flip:
            flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)[:, None, None, None]
            x = torch.where(flip, x.flip(3), x)
        return x

    def describe(self) -> dict:
        return {
            "mean": None if self.mean is None else self.mean.tolist(),
            "std": None if self.std is None else self.std.tolist(),
            "crop_padding": self.crop_padding,
            "flip": self.flip,
            "size": self.size,
            "interpolation": self.interpolation if self.size is not None else None,
        }


@dataclass(frozen=True)
class Dataset:
    """A source's output: train and test splits plus how to turn a batch into input."""

    name: str
    train: TensorData
    test: TensorData
    transform: BatchTransform
    class_names: list[str] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    @property
    def n_classes(self) -> int:
        return int(max(self.train.y.max(), self.test.y.max()).item()) + 1


@dataclass(frozen=True)
class Experience:
    """One step of a stream: its index, task label, classes and data.

    `task_index` is the task (accuracy-matrix column) this experience is
    about, or None when it mixes several (a power-law phase with
    recurrences). `tasks` lists every task some of whose training samples
    it holds (default: just `task_index`): a blurry experience also holds a
    share of its neighbour's, a power-law phase its recurring tasks'.
    """

    index: int
    task_label: int
    classes: list[int]
    train: TensorData
    test: TensorData | None = None
    task_index: int | None = None
    tasks: tuple[int, ...] = None

    def __post_init__(self):
        if self.tasks is None:
            object.__setattr__(self, "tasks", () if self.task_index is None else (self.task_index,))

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def n_test(self) -> int:
        return 0 if self.test is None else len(self.test)


@dataclass(frozen=True)
class Stream:
    """The ordered experiences of a scenario, with every task's test set.

    `test_sets[j]` is task j's test set, a column of the accuracy matrix; the
    trainer evaluates on all of them, seen or not (forward transfer needs the
    unseen ones). By default experience i trains task i. `eval_after` lists
    the experiences after which the matrix gets a row (default: every one; an
    online stream evaluates at the end of each task). `schedule` describes how
    the stream was generated, for `cl describe`.
    """

    name: str
    experiences: list[Experience]
    transform: BatchTransform
    input_shape: tuple[int, ...]
    n_classes: int
    class_order: list[int]
    test_sets: list[TensorData] = None
    task_classes: list[list[int]] = None
    eval_after: list[int] = None
    schedule: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.test_sets is None:
            object.__setattr__(self, "test_sets", [e.test for e in self.experiences])
        for j, data in enumerate(self.test_sets):
            if data is None or len(data) == 0:
                from streams.validation import DataError

                classes = self.experiences[j].classes if j < len(self.experiences) else "?"
                raise DataError(f"stream {self.name}: task {j} (classes {classes}) has no test samples; "
                                f"every task needs some to be evaluated (does the test split hold these classes?)")
        if self.task_classes is None:
            object.__setattr__(self, "task_classes", [sorted(torch.unique(d.y).tolist()) for d in self.test_sets])
        if self.eval_after is None:
            object.__setattr__(self, "eval_after", list(range(len(self.experiences))))
        if len(self.task_classes) != len(self.test_sets):
            raise ValueError("a stream needs the classes of every test set")

    def __len__(self) -> int:
        return len(self.experiences)

    def __iter__(self):
        return iter(self.experiences)

    def __getitem__(self, i: int) -> Experience:
        return self.experiences[i]

    @property
    def n_tasks(self) -> int:
        return len(self.test_sets)

    def seen_tasks(self, last_experience: int) -> list[int]:
        """Tasks some of whose training samples experiences 0..`last_experience` held.

        Decided by task index, not by shared classes: on permuted, rotated and
        token streams every task has every class, yet task j is unseen until
        an experience holding it comes."""
        return self._seen_tasks_by_experience[last_experience]

    @cached_property
    def _seen_tasks_by_experience(self) -> list[list[int]]:
        # One pass over the stream instead of one per evaluation (online streams have thousands).
        out, seen = [], set()
        for e in self.experiences:
            seen.update(e.tasks)
            out.append(sorted(seen))
        return out

    @property
    def seen_at_rows(self) -> list[list[int]]:
        """For each evaluation row k >= 1 (after experience eval_after[k-1]): the tasks seen by then."""
        return [self.seen_tasks(e) for e in self.eval_after]

    @property
    def rows_follow_tasks(self) -> bool:
        """Row k of the matrix (k >= 1) comes right after task k-1's own training, and every
        experience since the previous row is about task k-1: the setting of the GEM metrics
        (one experience per task, or an online stream cut into pieces per task)."""
        if len(self.eval_after) != self.n_tasks:
            return False
        start = 0
        for k, end in enumerate(self.eval_after):
            if end < start or any(e.task_index != k for e in self.experiences[start:end + 1]):
                return False
            start = end + 1
        return start == len(self.experiences)

    @property
    def class_incremental(self) -> bool:
        """Some task brings classes that no earlier task had, and the experiences carry no task
        labels that would tell the model which task it faces (a single-head, class-incremental
        stream; domain-incremental streams repeat their classes, task-incremental ones label)."""
        if self.is_sequence:  # next-token prediction: "classes" are the vocabulary, shared by every domain
            return False
        seen: set[int] = set()
        new_classes = False
        for j, classes in enumerate(self.task_classes):
            new_classes |= j > 0 and not set(classes) <= seen
            seen |= set(classes)
        return new_classes and len({e.task_label for e in self.experiences}) == 1

    @property
    def one_experience_per_task(self) -> bool:
        """Experience i trains task i and is evaluated after: the classic setting."""
        return len(self.experiences) == self.n_tasks and self.rows_follow_tasks

    @cached_property
    def test_all(self):
        """Every task's test set in one, in task order, so that evaluation is one pass over
        it; `test_task_ids` says which task each of its samples belongs to."""
        return concat_data(self.test_sets)

    @cached_property
    def test_task_ids(self) -> torch.Tensor:
        sizes = torch.tensor([len(d) for d in self.test_sets])
        return torch.repeat_interleave(torch.arange(len(sizes)), sizes)

    @property
    def is_sequence(self) -> bool:
        """Targets are sequences (next-token prediction), not one label per sample."""
        return self.test_sets[0].y.dim() > 1

    def describe(self) -> dict:
        return {
            "name": self.name,
            "n_experiences": len(self),
            "n_tasks": self.n_tasks,
            "n_classes": self.n_classes,
            "input_shape": list(self.input_shape),
            "class_order": self.class_order,
            "test_sets": [{"task": j, "classes": c, "n_test": len(d)}
                          for j, (c, d) in enumerate(zip(self.task_classes, self.test_sets))],
            "experiences": [
                {"index": e.index, "task_label": e.task_label, "task_index": e.task_index, "tasks": list(e.tasks),
                 "classes": e.classes, "n_train": e.n_train}
                for e in self.experiences
            ],
            "eval_after": self.eval_after,
            "schedule": self.schedule,
            "preprocessing": self.transform.describe() if hasattr(self.transform, "describe") else {},
        }


def reshape_images(x: torch.Tensor, size: int, channels: int, chunk: int = 4096) -> torch.Tensor:
    """uint8 images (N, C, H, W) brought to (N, channels, size, size): bilinear resizing with
    antialiasing, grey images repeated over the colour channels (colour ones averaged to grey)."""
    out = torch.empty((len(x), channels, size, size), dtype=torch.uint8)
    for b in range(0, len(x), chunk):
        part = x[b:b + chunk].float()
        if part.shape[1] != channels:
            if channels != 1 and part.shape[1] != 1:
                raise ValueError(f"cannot bring images of {part.shape[1]} channels to {channels}: "
                                 f"only grey to colour (repeated) or colour to grey (averaged)")
            part = part.mean(1, keepdim=True) if channels == 1 else part.repeat(1, channels, 1, 1)
        if part.shape[-2:] != (size, size):
            part = F.interpolate(part, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[b:b + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out
