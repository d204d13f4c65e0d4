"""Tiny-ImageNet-200 (Le and Yang 2015, Stanford CS231n), read lazily from the layout it is
distributed in (`tiny-imagenet-200.zip`, unpacked under the data root):

    tiny-imagenet-200/wnids.txt                      the 200 WordNet ids, one a line
    tiny-imagenet-200/words.txt                      wnid <tab> names (optional: class names)
    tiny-imagenet-200/train/<wnid>/images/*.JPEG     500 training images a class
    tiny-imagenet-200/val/images/*.JPEG              10,000 validation images, 50 a class
    tiny-imagenet-200/val/val_annotations.txt        file <tab> wnid <tab> box

The validation set, whose labels are published, is the test set of the continual-learning
papers (the official test images are unlabelled). Classes are numbered in the sorted order
of their wnids. Images are 64 x 64 RGB; labels come from the folder names and the
annotation file, so building a stream decodes no image.
"""
from __future__ import annotations

from pathlib import Path

from streams.experience import BatchTransform, Dataset
from streams.image_files import lazy_images
from streams.validation import DataError

#: The training set's per-channel statistics (as the replay literature normalises it).
TINY_IMAGENET_MEAN = [0.4802, 0.4480, 0.3975]
TINY_IMAGENET_STD = [0.2770, 0.2691, 0.2821]
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
LAYOUT = ("tiny-imagenet-200/ with wnids.txt, train/<wnid>/images/*.JPEG and val/images/*.JPEG with "
          "val/val_annotations.txt")


def tiny_imagenet(data_dir: str | None = None, size: int | None = None, augment: bool = False,
                  num_workers: int = 2) -> Dataset:
    """Tiny-ImageNet-200: 100,000 training and 10,000 test (the labelled validation) images
    of 200 classes, 64 x 64 RGB (resized to `size` when given), read batch by batch by a
    DataLoader with `num_workers` workers. `augment` adds the usual random crop (padding
    4, scaled to the size) and horizontal flip to training batches, on tensors."""
    from streams.sources import _not_found, data_root

    root = data_root(data_dir) / "tiny-imagenet-200"
    if not (root / "wnids.txt").is_file():
        raise _not_found("tiny_imagenet", [root], f"Expected {LAYOUT}; it has no torchvision download: "
                                                  f"unpack {URL} under the data root.")
    wnids = sorted(w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip())
    index = {w: i for i, w in enumerate(wnids)}
    train_paths, train_labels = [], []
    for w in wnids:
        folder = root / "train" / w / "images"
        if not folder.is_dir():
            raise DataError(f"tiny_imagenet: {folder} is missing (expected {LAYOUT})")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
        train_paths += files
        train_labels += [index[w]] * len(files)
    test_paths, test_labels = _validation(root, index)
    edge = size or 64
    train = lazy_images(train_paths, train_labels, edge, 3, num_workers)
    test = lazy_images(test_paths, test_labels, edge, 3, num_workers)
    padding = max(1, round(4 * edge / 64)) if augment else 0
    transform = BatchTransform(TINY_IMAGENET_MEAN, TINY_IMAGENET_STD, crop_padding=padding, flip=augment)
    return Dataset("tiny_imagenet", train, test, transform, class_names=_names(root, wnids))


def _validation(root: Path, index: dict[str, int]) -> tuple[list[Path], list[int]]:
    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise DataError(f"tiny_imagenet: {annotations} is missing (expected {LAYOUT})")
    paths, labels = [], []
    for n, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise DataError(f"tiny_imagenet: {annotations} line {n} is not `file<tab>wnid...` with a wnid of "
                            f"wnids.txt: {line[:80]!r}")
        name = Path(fields[0]).name  # a name, never a path: the file must be in val/images
        paths.append(root / "val" / "images" / name)
        labels.append(index[fields[1]])
    return paths, labels


def _names(root: Path, wnids: list[str]) -> list[str]:
    """Each class's first WordNet name from words.txt, else its wnid."""
    words = root / "words.txt"
    names = {}
    if words.is_file():
        for line in words.read_text().splitlines():
            wnid, _, text = line.partition("\t")
            names[wnid] = text.split(",")[0].strip()
    return [names.get(w) or w for w in wnids]
