"""Datasets from users: numpy arrays, a folder of images per class, any torch Dataset.

Each is loaded once into the lab's in-memory tensors (uint8 images where the
data are 8-bit images), so training stays on the fast tensor path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from streams import validation
from streams.experience import BatchTransform, Dataset, TensorData
from streams.interop import _materialise
from streams.validation import DataError
from streams.lazy import LazyData

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _as_images(x: np.ndarray, where: str) -> torch.Tensor:
    x = np.asarray(x)
    if x.ndim == 3:  # (N, H, W): one channel
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):  # (N, H, W, C)
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 2 and x.ndim != 4:
        raise DataError(f"{where}: expected inputs of shape (N, D), (N, H, W), (N, C, H, W) or (N, H, W, C), "
                         f"got {x.shape}")
    return torch.from_numpy(np.ascontiguousarray(x))


def _transform_for(x: torch.Tensor, mean, std) -> BatchTransform:
    # uint8 images are scaled to [0, 1]; other arrays are taken as they are.
    scale = 255.0 if x.dtype == torch.uint8 else 1.0
    if mean is None and x.dtype == torch.uint8 and x.dim() == 4:
        flat = x[:10_000].float().div(255).transpose(0, 1).reshape(x.shape[1], -1)
        mean, std = flat.mean(1).tolist(), flat.std(1).clamp_min(1e-6).tolist()
    return BatchTransform(mean, std, scale=scale)


def numpy_arrays(path: str, data_dir: str | None = None, mean: list[float] | None = None,
                 std: list[float] | None = None) -> Dataset:
    """Arrays in an .npz file with keys x_train, y_train, x_test, y_test (labels 0..K-1).
    A relative `path` is taken under the data root."""
    from streams.sources import data_root

    file = Path(path) if Path(path).is_absolute() else data_root(data_dir) / path
    if not file.is_file():
        raise FileNotFoundError(f"numpy dataset: {file} does not exist")
    try:
        with np.load(file, allow_pickle=False) as z:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(z.files)
            if missing:
                raise DataError(f"numpy dataset {file}: missing arrays {sorted(missing)} (has {z.files})")
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except DataError:
        raise
    except Exception as err:  # a zip that is cut short or not a zip at all, an object array
        raise DataError(f"numpy dataset {file} is corrupt or truncated ({type(err).__name__}: {err})") from err
    where = f"numpy dataset {file}"
    for split in ("train", "test"):
        validation.same_rows(arrays[f"x_{split}"], arrays[f"y_{split}"], where, f"x_{split}", f"y_{split}")
    x_train, x_test = _as_images(arrays["x_train"], where), _as_images(arrays["x_test"], where)
    validation.same_input_shape(x_train, x_test, where, "x_train", "x_test")
    validation.finite_inputs(x_train, where, "x_train")
    validation.finite_inputs(x_test, where, "x_test")
    y_train = validation.labels(arrays["y_train"], where, "y_train")
    y_test = validation.labels(arrays["y_test"], where, "y_test")
    return Dataset(file.stem, TensorData(x_train, y_train), TensorData(x_test, y_test),
                   _transform_for(x_train, mean, std))


def _read_folder(root: Path, classes: list[str], size: int | None, channels: int) -> TensorData:
    from PIL import Image

    xs, ys = [], []
    for label, name in enumerate(classes):
        folder = root / name
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        for f in files:
            try:
                with Image.open(f) as img:
                    img = img.convert("L" if channels == 1 else "RGB")
                    if size is not None:
                        img = img.resize((size, size), Image.BILINEAR)
                    arr = np.asarray(img)
            except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for cut-short or non-image files
                raise DataError(f"image {f} is corrupt or truncated ({err})") from err
            xs.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
            ys.append(label)
    if not xs:
        raise DataError(f"image folder {root}: no images found in class folders {classes}")
    shapes = {x.shape for x in xs}
    if len(shapes) > 1:
        raise DataError(f"image folder {root}: images have different sizes {sorted(shapes)[:3]}; set `size`")
    return TensorData(torch.from_numpy(np.stack(xs)), torch.tensor(ys))


def _lazy_folder(folder: Path, size: int | None, channels: int, num_workers: int) -> LazyData:
    from torchvision import datasets, transforms

    steps = [transforms.Grayscale(1) if channels == 1 else transforms.Lambda(lambda im: im.convert("RGB"))]
    if size is not None:
        steps.append(transforms.Resize((size, size)))
    steps.append(transforms.PILToTensor())
    return _lazy(datasets.ImageFolder(str(folder), transform=transforms.Compose(steps)), num_workers)


def image_folder(root: str, data_dir: str | None = None, size: int | None = None, channels: int = 3,
                 in_memory: bool = True, num_workers: int = 2,
                 mean: list[float] | None = None, std: list[float] | None = None, augment: bool = False) -> Dataset:
    """A folder of images per class, as torchvision's ImageFolder: `root/train/<class>/*.png`
    and `root/test/<class>/*.png`; class labels follow the sorted folder names of train/.
    Images are resized to `size` x `size` when given. A relative `root` is taken under the data root.
    With `in_memory: false` images are decoded batch by batch during training by a DataLoader
    with `num_workers` workers (for folders too big for memory; give `mean` and `std`).
    `augment` adds a random crop (padding an eighth of the side) and a horizontal flip to
    training batches, on the batch's tensors (not per image in the workers)."""
    from streams.sources import data_root

    base = Path(root) if Path(root).is_absolute() else data_root(data_dir) / root
    train_dir, test_dir = base / "train", base / "test"
    for d in (train_dir, test_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"image folder dataset: {d} does not exist (expected train/ and test/ under {base})")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not in_memory:
        train, test = (_lazy_folder(d, size, channels, num_workers) for d in (train_dir, test_dir))
        transform = BatchTransform(mean, std)
    else:
        train = _read_folder(train_dir, classes, size, channels)
        test = _read_folder(test_dir, classes, size, channels)
        transform = _transform_for(train.x, mean, std)
    if augment:
        transform.crop_padding, transform.flip = max(1, train.x.shape[-1] // 8), True
    return Dataset(base.name, train, test, transform, class_names=classes)


def _labels(dataset, num_workers: int) -> torch.Tensor:
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = _materialise(dataset, num_workers=num_workers)[1]  # reads every item once, keeps the labels
    return validation.labels(targets, f"dataset {type(dataset).__name__}")


def _lazy(dataset, num_workers: int) -> LazyData:
    return LazyData(dataset, _labels(dataset, num_workers), num_workers=num_workers)


def torch_dataset(factory: Callable, data_dir: str | None = None, num_workers: int = 0, kwargs: dict | None = None,
                  in_memory: bool = True, mean: list[float] | None = None, std: list[float] | None = None) -> Dataset:
    """Any map-style `torch.utils.data.Dataset` of (input, label) items: `factory` (in an
    experiment file, a `module:callable` path) returns `(train_dataset, test_dataset)`; it gets
    `data_dir` and `kwargs`. With `in_memory` (the default) items are read once through a DataLoader
    (with `num_workers`) into tensors; otherwise they are read batch by batch during
    training by a DataLoader with `num_workers` workers (for data too big for memory;
    give `mean` and `std`, they are not estimated)."""
    from streams.sources import data_root

    splits = factory(data_dir=str(data_root(data_dir)), **(kwargs or {}))
    name = getattr(factory, "__name__", "torch_dataset")
    if not (isinstance(splits, (tuple, list)) and len(splits) == 2):
        raise ValueError(f"torch_dataset: {name} must return (train_dataset, test_dataset)")
    if not in_memory:
        train, test = (_lazy(s, num_workers) for s in splits)
        return Dataset(name, train, test, BatchTransform(mean, std, scale=255.0 if train.x.dtype == torch.uint8 else 1.0))
    (x, y), (xt, yt) = (_materialise(s, num_workers=num_workers) for s in splits)
    where = f"torch_dataset {name}"
    validation.same_input_shape(x, xt, where)
    validation.finite_inputs(x, where, "train inputs")
    validation.finite_inputs(xt, where, "test inputs")
    y, yt = validation.labels(y, where, "train labels"), validation.labels(yt, where, "test labels")
    return Dataset(name, TensorData(x, y), TensorData(xt, yt), _transform_for(x, mean, std))
