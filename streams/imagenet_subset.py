"""ImageNet subsets (ImageNet-100 and the like: Rebuffi et al. 2017, Hou et al. 2019, Douillard
et al. 2020 train on 100 of ImageNet's classes), read lazily from an ImageNet folder:

    <root>/train/<wnid>/*.JPEG    the ILSVRC-2012 training images of each class
    <root>/val/<wnid>/*.JPEG      its validation images, sorted into class folders
                                  (as torchvision's ImageNet and most codebases prepare them)

The subset is a list of WordNet ids, given in the experiment or as a file of one wnid a
line (the lists the papers published); classes are numbered in the list's order. Labels
come from the folder names, so building a stream decodes no image.
"""
from __future__ import annotations

import re
from pathlib import Path

from streams.experience import BatchTransform, Dataset
from streams.image_files import IMAGENET_MEAN, IMAGENET_STD, lazy_images
from streams.validation import DataError

WNID = re.compile(r"^n\d{8}$")
SUFFIXES = (".jpeg", ".jpg", ".png")


def imagenet_subset(classes: list[str] | str, root: str = "imagenet", data_dir: str | None = None, size: int = 224,
                    augment: bool = False, num_workers: int = 2, mean: list[float] | None = None,
                    std: list[float] | None = None) -> Dataset:
    """The classes `classes` (wnids, or a file of one wnid a line, under the data root when
    relative) of the ImageNet folder `root` (under the data root when relative): their
    training images, and their validation images as the test set, resized to `size`."""
    from streams.sources import _not_found, data_root

    base = data_root(data_dir)
    folder = Path(root) if Path(root).is_absolute() else base / root
    wnids = _wnids(classes, base)
    if not (folder / "train").is_dir():
        raise _not_found("imagenet_subset", [folder], "Expected <root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG "
                                                      "(ImageNet has no download: get ILSVRC-2012 from image-net.org).")
    splits = []
    for split in ("train", "val"):
        files, labels = [], []
        for label, wnid in enumerate(wnids):
            class_dir = folder / split / wnid
            if not class_dir.is_dir():
                raise DataError(f"imagenet_subset: {class_dir} is missing (class {label} of the subset)")
            found = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in SUFFIXES)
            files += found
            labels += [label] * len(found)
        splits.append(lazy_images(files, labels, size, 3, num_workers))
    padding = max(1, size // 8) if augment else 0
    transform = BatchTransform(mean or IMAGENET_MEAN, std or IMAGENET_STD, crop_padding=padding, flip=augment)
    return Dataset(f"imagenet{len(wnids)}", splits[0], splits[1], transform, class_names=list(wnids))


def _wnids(classes: list[str] | str, base: Path) -> list[str]:
    if isinstance(classes, str):
        path = Path(classes) if Path(classes).is_absolute() else base / classes
        if not path.is_file():
            raise FileNotFoundError(f"imagenet_subset: class list {path} does not exist (one wnid a line)")
        classes = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    bad = [c for c in classes if not WNID.match(str(c))]
    if bad:  # a class is a name, never a path
        raise DataError(f"imagenet_subset: {bad[:3]} are not WordNet ids (n followed by 8 digits)")
    if len(set(classes)) != len(classes) or not classes:
        raise DataError("imagenet_subset: the class list is empty or names a class twice")
    return list(classes)
