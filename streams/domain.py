"""Domain-incremental scenarios: every experience has all classes, the input distribution moves."""
from __future__ import annotations

import torch

from streams.experience import Dataset, Experience, Stream, TensorData


def _domain_stream(name: str, data: Dataset, transforms: list, task_labels: bool, schedule: dict) -> Stream:
    classes = list(range(data.n_classes))
    experiences = []
    for i, apply in enumerate(transforms):
        task = i if task_labels else 0
        train = TensorData(apply(data.train.x), data.train.y, torch.full_like(data.train.y, task))
        test = TensorData(apply(data.test.x), data.test.y, torch.full_like(data.test.y, task))
        experiences.append(Experience(i, task, classes, train, test, task_index=i))
    return Stream(name, experiences, data.transform, data.input_shape, data.n_classes, classes, schedule=schedule)


def pixel_permutations(n: int, n_pixels: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n_pixels, generator=g) for _ in range(n)]


def permuted(data: Dataset, n_experiences: int = 10, task_labels: bool = False, seed: int = 0) -> Stream:
    """Permuted MNIST (Goodfellow et al. 2013; Kirkpatrick et al. 2017): experience i applies
    its own fixed random permutation of the pixels, drawn from `seed`, to every image."""
    if n_experiences < 1:
        raise ValueError(f"n_experiences must be positive, got {n_experiences}")
    n_pixels = int(torch.tensor(data.input_shape).prod())
    perms = pixel_permutations(n_experiences, n_pixels, seed)

    def permute(perm):
        return lambda x: x.reshape(len(x), -1)[:, perm].reshape(x.shape)

    return _domain_stream(f"permuted-{data.name}", data, [permute(p) for p in perms], task_labels,
                          {"kind": "permuted", "n_experiences": n_experiences, "seed": seed})


def rotated(data: Dataset, angles: list[float] = (0.0, 45.0, 90.0, 135.0, 180.0), task_labels: bool = False,
            seed: int = 0) -> Stream:
    """Rotated MNIST (Lopez-Paz and Ranzato 2017): experience i shows every image rotated by
    `angles[i]` degrees (counter-clockwise, about the centre, bilinear, zero fill)."""
    from torchvision.transforms.functional import InterpolationMode, rotate

    angles = [float(a) for a in angles]
    if not angles:
        raise ValueError("rotated needs at least one angle")

    def turn(angle):
        return lambda x: x if angle == 0 else rotate(x, angle, interpolation=InterpolationMode.BILINEAR)

    return _domain_stream(f"rotated-{data.name}", data, [turn(a) for a in angles], task_labels,
                          {"kind": "rotated", "angles": angles})
