"""Images listed by file, decoded only when a batch asks for them.

The standard benchmarks (Tiny-ImageNet, CUB-200, ImageNet-R, DomainNet, ...) ship as image
files plus index files that give each image's class and split. Their readers build an
`ImageFiles` from those lists, so the labels a scenario needs come from the index alone
and every image is decoded in a DataLoader worker as its batch is read (`streams.lazy`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from streams.lazy import LazyData
from streams.validation import DataError

#: ImageNet's per-channel statistics: the benchmarks read by backbones pre-trained on ImageNet
#: (CUB, ImageNet-R, DomainNet, CORe50, CLEAR, ImageNet subsets) are normalised by them.
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def decode_image(path: Path, size: int | None, channels: int) -> np.ndarray:
    """One image file as a (C, H, W) uint8 array, resized to `size` x `size` when given."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            arr = np.asarray(img)
    except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for cut-short or non-image files
        raise DataError(f"image {path} is corrupt or truncated ({err})") from err
    return np.ascontiguousarray(arr[None] if channels == 1 else arr.transpose(2, 0, 1))  # its own, writable memory


class ImageFiles(torch.utils.data.Dataset):
    """(image, label) items from a list of files and their labels: `targets` without decoding
    anything, an image decoded per item. With `size` every item is `channels` x `size` x
    `size` uint8 (declared as `item_shape`, so a stream is built without decoding)."""

    def __init__(self, paths: Sequence[Path], targets: Sequence[int], size: int | None, channels: int = 3):
        if len(paths) != len(targets):
            raise ValueError(f"ImageFiles: {len(paths)} files but {len(targets)} labels")
        self.paths = [str(p) for p in paths]
        self.targets = torch.as_tensor(list(targets), dtype=torch.long)
        self.size, self.channels = size, channels
        self.item_shape = None if size is None else (channels, size, size)
        self.item_dtype = torch.uint8

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return torch.from_numpy(decode_image(Path(self.paths[i]), self.size, self.channels)), int(self.targets[i])


def lazy_images(paths: Sequence[Path], targets: Sequence[int], size: int | None, channels: int = 3,
                num_workers: int = 2) -> LazyData:
    files = ImageFiles(paths, targets, size, channels)
    return LazyData(files, files.targets, num_workers=num_workers)
