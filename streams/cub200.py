"""CUB-200-2011 (Wah et al. 2011, Caltech-UCSD Birds), read lazily from the layout it is
distributed in (`CUB_200_2011.tgz`, unpacked under the data root):

    CUB_200_2011/images.txt               <image id> <path under images/>
    CUB_200_2011/image_class_labels.txt   <image id> <class id, 1..200>
    CUB_200_2011/train_test_split.txt     <image id> <1: training, 0: test>
    CUB_200_2011/classes.txt              <class id> <name>
    CUB_200_2011/images/<class folder>/*.jpg

5,994 training and 5,794 test images of 200 bird species, of every size: each is resized to
`size` x `size`. Labels and the split come from the index files, so building a stream
decodes no image. The prompt-method papers (SLCA, APG) split its classes into 10 tasks.
"""
from __future__ import annotations

from pathlib import Path

from streams.experience import BatchTransform, Dataset
from streams.image_files import IMAGENET_MEAN, IMAGENET_STD, lazy_images
from streams.validation import DataError

URL = "https://data.caltech.edu/records/65de6-vp158"
LAYOUT = "CUB_200_2011/ with images.txt, image_class_labels.txt, train_test_split.txt, classes.txt and images/"


def cub200(data_dir: str | None = None, size: int = 224, augment: bool = False, num_workers: int = 2,
           mean: list[float] | None = None, std: list[float] | None = None) -> Dataset:
    """CUB-200-2011: the official train/test split of 200 classes (numbered from 0 in the
    order of classes.txt), images resized to `size` and read batch by batch by a
    DataLoader with `num_workers` workers; normalised with ImageNet's statistics unless
    `mean` and `std` are given. `augment` adds a random crop and a horizontal flip."""
    from streams.sources import _not_found, data_root

    root = data_root(data_dir) / "CUB_200_2011"
    if not (root / "images.txt").is_file():
        raise _not_found("cub200", [root], f"Expected {LAYOUT}; it has no torchvision download: "
                                           f"unpack CUB_200_2011.tgz ({URL}) under the data root.")
    paths = _table(root / "images.txt")
    labels = {k: int(v) - 1 for k, v in _table(root / "image_class_labels.txt").items()}
    training = {k: v == "1" for k, v in _table(root / "train_test_split.txt").items()}
    images = (root / "images").resolve()
    splits = {True: ([], []), False: ([], [])}
    for image_id, relative in paths.items():
        if image_id not in labels or image_id not in training:
            raise DataError(f"cub200: image {image_id} ({relative}) has no class or no split in {root}")
        path = (images / relative).resolve()
        if not path.is_relative_to(images):  # an index line names a file, never a place outside images/
            raise DataError(f"cub200: images.txt names {relative!r}, outside {images}")
        files, ys = splits[training[image_id]]
        files.append(path)
        ys.append(labels[image_id])
    names = [name.split(".", 1)[-1].replace("_", " ") for _, name in sorted(
        ((int(k), v) for k, v in _table(root / "classes.txt").items()))]
    train = lazy_images(*splits[True], size, 3, num_workers)
    test = lazy_images(*splits[False], size, 3, num_workers)
    padding = max(1, size // 8) if augment else 0
    transform = BatchTransform(mean or IMAGENET_MEAN, std or IMAGENET_STD, crop_padding=padding, flip=augment)
    return Dataset("cub200", train, test, transform, class_names=names)


def _table(path: Path) -> dict[str, str]:
    """An index file of `<id> <value>` lines, as a dict."""
    if not path.is_file():
        raise DataError(f"cub200: {path} is missing (expected {LAYOUT})")
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        key, _, value = line.strip().partition(" ")
        if not value:
            raise DataError(f"cub200: {path} line {n} is not `<id> <value>`: {line[:80]!r}")
        out[key] = value.strip()
    return out
