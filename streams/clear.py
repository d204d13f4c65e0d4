"""CLEAR-10 and CLEAR-100 (Lin, Shi, Pathak and Ramanan 2021, "The CLEAR Benchmark: Continual
LEArning on Real-World Imagery", NeurIPS Datasets and Benchmarks; https://clear-benchmark.github.io),
read lazily from the layouts they are distributed in.

CLEAR orders YFCC100M's Flickr images of 2004-2014 by upload time and cuts them into 11
buckets. Bucket 0 is left unlabelled, for unsupervised pre-training; buckets 1 to 10 each have
a labelled set. The classes stay and the years move: a domain-incremental stream, experience i
training on the i-th labelled bucket. CLEAR-10 has 11 classes, its 10 concepts plus BACKGROUND
(negatives); CLEAR-100 has 100. Classes are numbered in the line order of `class_names.txt`,
which the curation script writes alphabetically sorted (Python's order: "BACKGROUND" first);
without that file, in the sorted order of the class folders, which is the same.

Two layouts are read, under `<data root>/clear10/` (or `clear100/`):

The current release (July 2022), `clear10-train.zip` (or `clear10-train-image-only.zip`) and
`clear10-test.zip` both unpacked there, as avalanche reads them (`<root>/train/...`, `<root>/test/...`;
the archives' metadata files, labeled_metadata/ and features/, are not needed):

    train/class_names.txt                          one class name a line
    train/labeled_images/<bucket>/<class>/*.jpg    the training images of buckets 1..10
    test/labeled_images/<bucket>/<class>/*.jpg     the held-out test images, same buckets

The NeurIPS'21 release (`clear10-public.zip`), unpacked there:

    class_names.txt
    labeled_images/<bucket>/<class>/*.jpg
    training_folder/bucket_indices.json                           the buckets, e.g. ["0", "1", ...]
    training_folder/filelists/<bucket>/all.txt                    `<path under clear10/> <class>` lines
    training_folder/testset_ratio_0.3/split_<k>/<bucket>/train.txt the official 70/30 split, k = 0..4
    training_folder/testset_ratio_0.3/split_<k>/<bucket>/test.txt

Protocols (the paper; avalanche's `benchmarks/classic/clear.py`):

- `iid`: train and test come from the same bucket. The test set of bucket j is, in this order
  of preference, the release's held-out `test/` images of bucket j; the official split files
  `split_<split_seed>` (followed exactly); else a split of each bucket's images drawn from
  `split_seed` (`test_fraction` of them for testing, as the official script cuts them), which
  is NOT an official split: results on it are not comparable with published ones.
- `streaming`: experience i trains on every labelled image of bucket i (the release's train/ and
  test/ images together, as avalanche reads it), and test set j is all of bucket j: the model
  after bucket i is scored on bucket i+1, the "near future", in the matrix's superdiagonal.

The lab's accuracy matrix, below its first row (the untrained model), is the paper's bucket x
bucket matrix: row i after training on the i-th bucket, column j scored on the j-th bucket's
test set. The paper's metrics read it so (avalanche's `CLEARMetric` computes them):
in-domain accuracy is the mean of the diagonal, next-domain accuracy the mean of the
superdiagonal (j = i + 1, the streaming protocol's score), backward transfer the mean below
the diagonal (j < i), forward transfer the mean above it (j > i). Under `streaming` the
diagonal and the entries below it are scored on images the model trained on.

Labels come from folder names and file lists, so building a stream decodes no image; each is
decoded, resized to `size` x `size`, in a DataLoader worker as its batch is read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from streams.experience import BatchTransform, Experience, Stream
from streams.image_files import IMAGENET_MEAN, IMAGENET_STD, lazy_images
from streams.validation import DataError

VARIANTS = ("clear10", "clear100")
PROTOCOLS = ("iid", "streaming")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
URL = "https://clear-benchmark.github.io (download page: https://linzhiqiu.gitbook.io/the-clear-benchmark)"
LAYOUT = ("{v}/train/labeled_images/<bucket>/<class>/*.jpg with {v}/train/class_names.txt and "
          "{v}/test/labeled_images/<bucket>/<class>/*.jpg ({v}-train.zip and {v}-test.zip unpacked there), "
          "or the NeurIPS'21 {v}/labeled_images/<bucket>/<class>/*.jpg with {v}/class_names.txt and "
          "{v}/training_folder/ ({v}-public.zip)")


def clear(variant: str = "clear10", protocol: str = "iid", size: int = 224, data_dir: str | None = None,
          seed: int = 0, num_workers: int = 2, augment: bool = False, buckets: list[int] | None = None,
          split_seed: int | None = None, test_fraction: float = 0.3, task_labels: bool = False,
          mean: list[float] | None = None, std: list[float] | None = None) -> Stream:
    """CLEAR-10 or CLEAR-100 (`variant`), one experience per labelled time bucket in time order,
    under the `iid` or `streaming` protocol (see the module's docstring for both, the layouts
    and how the paper's metrics read the accuracy matrix).

    `buckets` picks buckets (default: every numbered bucket from 1 on; bucket 0 is unlabelled,
    kept for pre-training). `split_seed` (default `seed`) picks the official split
    `split_<k>` under `iid` where the NeurIPS'21 split files are there, else seeds the split this
    reader draws (not the official one). `task_labels` gives experience i task label i
    (default: 0 for all, domain-incremental). Images are resized to `size`, read by DataLoaders
    with `num_workers` workers, normalised with ImageNet's statistics unless `mean` and `std`
    are given; `augment` adds a random crop and a horizontal flip to training batches."""
    from streams.sources import _not_found, data_root

    if variant not in VARIANTS:
        raise ValueError(f"clear: variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"clear: protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if not isinstance(size, int) or size < 1:  # a fixed size is what lets a stream be built without decoding
        raise ValueError(f"clear: size must be a positive whole number of pixels, got {size!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"clear: test_fraction must be between 0 and 1, got {test_fraction}")
    split_seed = seed if split_seed is None else split_seed
    root = data_root(data_dir) / variant
    layout = LAYOUT.format(v=variant)
    reader = _Reader(variant, root, layout)
    if (root / "train" / "labeled_images").is_dir():
        per_bucket, names, source = _release(reader, protocol, buckets, split_seed, test_fraction)
    elif (root / "labeled_images").is_dir():
        per_bucket, names, source = _neurips(reader, protocol, buckets, split_seed, test_fraction)
    else:
        raise _not_found(variant, [root], f"Expected {layout}; it has no torchvision download: get the "
                                          f"archives from {URL} and unpack them in {root}.")
    K = len(names)
    classes = list(range(K))
    experiences = []
    for i, (train, test) in enumerate(per_bucket.values()):
        task = i if task_labels else 0
        train_data = lazy_images(*train, size, 3, num_workers).with_task(task)
        test_data = lazy_images(*test, size, 3, num_workers).with_task(task)
        experiences.append(Experience(i, task, classes, train_data, test_data, task_index=i))
    padding = max(1, size // 8) if augment else 0
    transform = BatchTransform(mean or IMAGENET_MEAN, std or IMAGENET_STD, crop_padding=padding, flip=augment)
    return Stream(f"{variant}-{protocol}", experiences, transform, (3, size, size), K, classes,
                  schedule={"kind": "clear", "variant": variant, "protocol": protocol, "source": source,
                            "buckets": list(per_bucket), "class_names": names, "size": size,
                            "split_seed": split_seed if "split" in source else None})


class _Reader:
    """Reads one dataset folder. Every path it returns is inside it by name: class names and
    file-list entries are refused if they are absolute or climb out with `..` (links within the
    folder are its owner's: a dataset kept on another disk and linked in still reads)."""

    def __init__(self, variant: str, root: Path, layout: str):
        self.variant, self.root, self.layout = variant, root, layout

    def fail(self, what: str) -> DataError:
        return DataError(f"{self.variant}: {what} (expected {self.layout})")

    def class_names(self, folder: Path, buckets_folder: Path) -> list[str]:
        """The class names of `folder/class_names.txt`, one a line, in its order; without the
        file, the sorted class folder names of every bucket (the curation script sorts them)."""
        listed = folder / "class_names.txt"
        if listed.is_file():
            names = [line.strip() for line in listed.read_text().splitlines() if line.strip()]
            for n, name in enumerate(names, 1):
                if not _plain_name(name):  # a class name is a folder name: never a path
                    raise DataError(f"{self.variant}: {listed} line {n} names {name!r}, not a plain folder name")
        else:
            names = sorted({p.name for b in _bucket_folders(buckets_folder).values() for p in b.iterdir()
                            if p.is_dir()})
        if not names:
            raise self.fail(f"{listed} names no class and {buckets_folder} holds no class folder")
        if len(set(names)) != len(names):
            raise DataError(f"{self.variant}: {listed} names a class twice")
        return names

    def scan(self, buckets_folder: Path, bucket: int, names: list[str]) -> tuple[list[Path], list[int]]:
        """Every image of one bucket, class by class in class order, file names sorted."""
        folder = buckets_folder / str(bucket)
        if not folder.is_dir():
            raise self.fail(f"bucket folder {folder} is missing")
        paths, labels = [], []
        for label, name in enumerate(names):
            class_folder = folder / name
            if not class_folder.is_dir():
                raise self.fail(f"class folder {class_folder} is missing")
            with os.scandir(class_folder) as entries:  # file types from the listing: no stat per image
                files = sorted(e.name for e in entries if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES)
            paths += [class_folder / f for f in files]
            labels += [label] * len(files)
        return paths, labels

    def filelist(self, path: Path, n_classes: int) -> tuple[list[Path], list[int]]:
        """A caffe-style file list, `<path under the dataset folder> <class index>` a line."""
        if not path.is_file():
            raise self.fail(f"file list {path} is missing")
        paths, labels = [], []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.strip().rsplit(None, 1)
            if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
                raise DataError(f"{self.variant}: {path} line {n} is not `<path> <class>`: {line[:80]!r}")
            name, label = fields[0], int(fields[1])
            if PurePosixPath(name).is_absolute() or PureWindowsPath(name).anchor or ".." in PurePosixPath(
                    name.replace("\\", "/")).parts:  # an entry names a file of the dataset, never a place outside it
                raise DataError(f"{self.variant}: {path} line {n} names {name!r}, outside the dataset folder "
                                f"{self.root}")
            if not 0 <= label < n_classes:
                raise DataError(f"{self.variant}: {path} line {n} has class {label}, not one of the "
                                f"{n_classes} of class_names.txt")
            paths.append(self.root / name)
            labels.append(label)
        return paths, labels


def _release(reader: _Reader, protocol: str, buckets, split_seed: int, test_fraction: float):
    """The July 2022 release: train/ and test/, each labeled_images/<bucket>/<class>/."""
    root = reader.root
    train_images, test_images = root / "train" / "labeled_images", root / "test" / "labeled_images"
    names = reader.class_names(root / "train", train_images)
    if (root / "test" / "class_names.txt").is_file() and reader.class_names(root / "test", test_images) != names:
        raise DataError(f"{reader.variant}: {root / 'test' / 'class_names.txt'} and "
                        f"{root / 'train' / 'class_names.txt'} differ: the labels would not agree")
    chosen = _chosen_buckets(reader, train_images, buckets)
    has_test = test_images.is_dir()
    out = {}
    for b in chosen:
        train = reader.scan(train_images, b, names)
        test = reader.scan(test_images, b, names) if has_test else ([], [])
        if protocol == "streaming":  # every labelled image of the bucket, trained on and tested on
            whole = (train[0] + test[0], train[1] + test[1])
            out[b] = (whole, whole)
        elif has_test:  # the release's held-out test set of the same time span
            out[b] = (train, test)
        else:
            out[b] = _seeded_split(train, b, split_seed, test_fraction)
    if protocol == "streaming":
        source = "train/ and test/ images" if has_test else "train/ images"
    else:
        source = "held-out test/ images" if has_test else "train/ images, seeded split"
    return out, names, source


def _neurips(reader: _Reader, protocol: str, buckets, split_seed: int, test_fraction: float):
    """The NeurIPS'21 release: labeled_images/ with training_folder/'s file lists and splits."""
    root = reader.root
    images = root / "labeled_images"
    names = reader.class_names(root, images)
    training = root / "training_folder"
    if buckets is None and (training / "bucket_indices.json").is_file():
        listed = json.loads((training / "bucket_indices.json").read_text())
        if not isinstance(listed, list) or not all(str(b).isdigit() for b in listed):
            raise DataError(f"{reader.variant}: {training / 'bucket_indices.json'} is not a list of bucket numbers")
        buckets = sorted(int(b) for b in listed if int(b) != 0)  # bucket 0: unlabelled, for pre-training
    chosen = _chosen_buckets(reader, images, buckets)
    splits = training / f"testset_ratio_{test_fraction}"
    official = splits / f"split_{split_seed}"
    if protocol == "iid" and splits.is_dir() and not official.is_dir():
        seeds = sorted(p.name.removeprefix("split_") for p in splits.glob("split_*"))
        raise DataError(f"{reader.variant}: no official split {official}; the release has split_seed "
                        f"{', '.join(seeds)}: give one of them as split_seed")
    out = {}
    for b in chosen:
        all_list = training / "filelists" / str(b) / "all.txt"
        if protocol == "iid" and splits.is_dir():  # the official split files, followed exactly
            out[b] = (reader.filelist(official / str(b) / "train.txt", len(names)),
                      reader.filelist(official / str(b) / "test.txt", len(names)))
            continue
        whole = reader.filelist(all_list, len(names)) if training.is_dir() else reader.scan(images, b, names)
        out[b] = (whole, whole) if protocol == "streaming" else _seeded_split(whole, b, split_seed, test_fraction)
    whole = "filelists/<bucket>/all.txt" if training.is_dir() else "labeled_images"
    if protocol == "iid":
        source = f"official split_{split_seed}" if splits.is_dir() else f"{whole}, seeded split"
    else:
        source = whole
    return out, names, source


def _chosen_buckets(reader: _Reader, folder: Path, buckets) -> list[int]:
    if buckets is not None:
        chosen = [int(b) for b in buckets]
        if not chosen or len(set(chosen)) != len(chosen) or min(chosen) < 0:
            raise ValueError(f"{reader.variant}: buckets must be distinct bucket numbers, got {buckets!r}")
        return chosen
    found = sorted(b for b in _bucket_folders(folder) if b != 0)  # bucket 0 is unlabelled: pre-training only
    if not found:
        raise reader.fail(f"{folder} holds no bucket folder 1, 2, ...")
    for b in range(1, found[-1] + 1):  # buckets are consecutive time spans: a gap is a missing folder
        if b not in found:
            raise reader.fail(f"bucket folder {folder / str(b)} is missing")
    return found


def _bucket_folders(folder: Path) -> dict[int, Path]:
    return {int(p.name): p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()} if folder.is_dir() else {}


def _seeded_split(part, bucket: int, seed: int, test_fraction: float):
    """A bucket's images cut into train and test, `test_fraction` of them (rounded down, as the
    official script rounds) for testing, drawn from `seed` and the bucket (NOT the official split)."""
    paths, labels = part
    order = np.random.default_rng([seed, bucket]).permutation(len(paths))
    n_test = int(len(paths) * test_fraction)
    test, train = sorted(order[:n_test].tolist()), sorted(order[n_test:].tolist())
    return tuple(([paths[i] for i in rows], [labels[i] for i in rows]) for rows in (train, test))


def _plain_name(name: str) -> bool:
    return name not in (".", "..") and "/" not in name and "\\" not in name and not PureWindowsPath(name).anchor
