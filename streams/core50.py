"""CORe50 (Lomonaco and Maltoni 2017, "CORe50: a New Dataset and Benchmark for Continuous Object
Recognition", CoRL, PMLR 78:17-26), read lazily from the layout it is distributed in
(https://vlomonaco.github.io/core50), unpacked under `<data root>/core50/` (or the data root):

    core50_128x128/s<1..11>/o<1..50>/C_<ss>_<oo>_<fff>.png    core50_128x128.zip: the benchmark's images
    batches_filelists/<NI|NC|NIC>_inc/run<0..9>/               batches_filelists.zip (optional): the
        train_batch_<XX>_filelist.txt, test_filelist.txt       official runs, lines `s11/o1/C_11_01_000.png 0`

50 hand-held domestic objects of 10 categories (o1-o5 plug adapters, o6-o10 mobile phones, ...,
o46-o50 remote controls: object o is category (o - 1) // 5), each filmed for 15 s at 20 fps in
each of 11 sessions (8 indoor, 3 outdoor; backgrounds and lighting differ): about 300 frames
per object and session, 164,866 RGB images of 128 x 128 in all. Sessions 3, 7 and 10 are the
test set, the other 8 train. The benchmark's three protocols split the training sessions into
batches (the lab's experiences); the test set stays the same throughout:

- NI (new instances): 8 batches, one per training session, each with all 50 objects.
- NC (new classes): 9 batches of disjoint objects, 10 in the first (one of each category), 5 in
  each of the others.
- NIC (new instances and classes): 79 batches; the first is NC's first batch in one session,
  each later one 5 objects in one session, new or already seen.

Each protocol has 10 runs (orders of its batches). Labels are the objects (50 classes) or
their categories (10). Labels, batches and the split come from folder names and filelists, so
building a stream decodes no image; each is decoded in a DataLoader worker as its batch is read.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from streams.experience import BatchTransform, Experience, Stream
from streams.image_files import IMAGENET_MEAN, IMAGENET_STD, lazy_images
from streams.sources import DatasetNotFoundError, _not_found, data_root
from streams.validation import DataError

URL = "http://bias.csr.unibo.it/maltoni/download/core50/core50_128x128.zip"
FILELISTS_URL = "https://vlomonaco.github.io/core50/data/batches_filelists.zip"
LAYOUT = ("core50/core50_128x128/s<1..11>/o<1..50>/C_<ss>_<oo>_<fff>.png, with, for the official runs, "
          "core50/batches_filelists/<NI|NC|NIC>_inc/run<0..9>/train_batch_<XX>_filelist.txt and test_filelist.txt")

SESSIONS = tuple(range(1, 12))
TEST_SESSIONS = (3, 7, 10)
TRAIN_SESSIONS = tuple(s for s in SESSIONS if s not in TEST_SESSIONS)
N_OBJECTS, OBJECTS_PER_CATEGORY = 50, 5
#: The categories in object order (the dataset page's "[o1, ..., o5] -> plug adapters", ...).
CATEGORY_NAMES = ["plug_adapter", "mobile_phone", "scissor", "light_bulb", "can", "glass", "ball", "marker", "cup",
                  "remote_control"]
#: The 50 objects' names as the CORe50 repository lists them (extras/core50_labels.txt).
OBJECT_NAMES = [f"{c}{k}" for c in CATEGORY_NAMES for k in range(1, OBJECTS_PER_CATEGORY + 1)]
#: Protocol -> (filelist folder, number of training batches of the official runs).
PROTOCOLS = {"ni": ("NI_inc", 8), "nc": ("NC_inc", 9), "nic": ("NIC_inc", 79)}
N_RUNS = 10

# A filelist entry names an image of the layout and nothing else: `s<session>/o<object>/<file>`,
# relative to core50_128x128. Matching this shape (no `..`, no leading `/`, no backslash) keeps
# every entry inside the dataset folder without a filesystem call per line (165k lines).
_ENTRY = re.compile(r"s(\d{1,2})/o(\d{1,2})/([A-Za-z0-9_][A-Za-z0-9_.-]*)")
_BATCH_FILE = re.compile(r"train_batch_(\d+)_filelist\.txt")


def core50(protocol: str = "ni", run: int = 0, labels: str = "object", size: int = 128, data_dir: str | None = None,
           seed: int = 0, num_workers: int = 2, augment: bool = False, mean: list[float] | None = None,
           std: list[float] | None = None) -> Stream:
    """CORe50 under its `protocol` (`ni`, `nc` or `nic`), run `run` (0-9) of the official
    filelists (`batches_filelists/<NI|NC|NIC>_inc/run<run>/`), one experience per training batch,
    evaluated on the test sessions 3, 7 and 10 (the run's `test_filelist.txt`).

    `labels`: `object` (50 classes, object o is class o - 1, named as the CORe50 repository
    names them, `plug_adapter1` ...) or `category` (10 classes, object o is class (o - 1) // 5).
    Classes are taken from each entry's object folder, not from the filelist's label column: NC's
    filelists renumber the objects per run in the order they arrive (the dataset page says so).

    Test sets: a task is the classes that first arrive together, with the test images of those
    classes. NI brings every class in its first batch: one task, one test set (the whole test
    set) for all 8 experiences, a domain-incremental stream whose matrix has a row per experience
    and one column. NC brings new classes in every batch: experience i is task i, evaluated on
    its classes' test images (class-incremental). NIC's batches bring new classes or new
    sessions of known ones; an experience that holds several tasks' classes has no single task.

    Without the filelists, NI and NC are built from the folders: NI one experience per training
    session (all objects), in an order drawn from `seed` and `run`; NC in batches composed as the
    official runs compose them (CORe50's `create_sII_filelist.py`: first o1, o6, ..., o46, then
    8 batches of 5 objects, the 2nd, 3rd, 4th or 5th object of categories 1-5 or of 6-10), the
    first batch first and the order of the others drawn from `seed` and `run`. Neither order is the
    official run's: use the filelists to compare with published numbers. NIC needs the filelists.
    Objects or sessions missing from the folders are left out (a partial copy reads as such).

    Images are resized to `size` (128: as distributed) and read batch by batch by a DataLoader
    with `num_workers` workers; normalised with ImageNet's statistics unless `mean` and `std` are
    given. `augment` adds a random crop and a horizontal flip to training batches."""
    protocol = str(protocol).lower()
    if protocol not in PROTOCOLS:
        raise ValueError(f"core50: protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
    if not 0 <= int(run) < N_RUNS:
        raise ValueError(f"core50: run must lie in 0..{N_RUNS - 1} (the official runs), got {run}")
    if labels not in ("object", "category"):
        raise ValueError(f"core50: labels must be 'object' (50 classes) or 'category' (10), got {labels!r}")
    if int(size) < 1:
        raise ValueError(f"core50: size must be positive, got {size}")
    base = data_root(data_dir)
    candidates = [base / "core50", base]
    root = next((c for c in candidates if (c / "core50_128x128").is_dir()), None)
    if root is None:
        raise _not_found("core50", [c / "core50_128x128" for c in candidates],
                         f"Expected {LAYOUT}; it has no torchvision download: unpack {URL} (and, for the official "
                         f"NI/NC/NIC runs, {FILELISTS_URL}) into <data root>/core50/.")
    images = root / "core50_128x128"
    folder_name, _ = PROTOCOLS[protocol]
    lists = _run_folder(root, folder_name, int(run))
    if lists is not None:
        batches, test = _read_filelists(lists, images)
        source = {"filelists": str(lists)}
    elif protocol == "nic":
        raise DatasetNotFoundError(f"core50: protocol 'nic' needs the official filelists, and "
                                   f"{root / 'batches_filelists' / folder_name / f'run{run}'} is missing: unpack "
                                   f"{FILELISTS_URL} into {root}")
    else:
        batches, test, order = _from_folders(images, protocol, seed, int(run))
        source = {"filelists": None, "order": order,
                  "note": "built from the folders: not the order of the official run"}
    per_category = labels == "category"
    n_classes = len(CATEGORY_NAMES) if per_category else N_OBJECTS

    def label(obj: int) -> int:
        return (obj - 1) // OBJECTS_PER_CATEGORY if per_category else obj - 1

    # A Stream has no field for class names: the schedule carries them (`cl describe --json`).
    schedule = {"kind": "core50", "protocol": protocol, "run": int(run), "labels": labels,
                "test_sessions": sorted({s for s, _, _ in test}), **source, "class_names": class_names(labels)}
    return _stream(f"core50-{protocol}" + ("-category" if per_category else ""), batches, test, label, n_classes,
                   int(size), num_workers, augment, mean, std, schedule)


def _run_folder(root: Path, folder_name: str, run: int) -> Path | None:
    """The run's filelist folder: `run0` as batches_filelists.zip unpacks (avalanche reads it so),
    or `Run0` as the dataset page draws the tree."""
    for name in (f"run{run}", f"Run{run}"):
        folder = root / "batches_filelists" / folder_name / name
        if folder.is_dir():
            return folder
    return None


Entry = tuple[int, int, Path]  # (session, object, image path)


def _read_filelists(folder: Path, images: Path) -> tuple[list[list[Entry]], list[Entry]]:
    numbered = {}
    for path in folder.iterdir():
        match = _BATCH_FILE.fullmatch(path.name)
        if match:
            numbered[int(match.group(1))] = path
    if not numbered:
        raise DataError(f"core50: {folder} holds no train_batch_<XX>_filelist.txt (expected {LAYOUT})")
    if sorted(numbered) != list(range(len(numbered))):
        missing = sorted(set(range(max(numbered) + 1)) - set(numbered))
        raise DataError(f"core50: {folder} lacks the training batches {missing} (batches are numbered from 00)")
    test_file = folder / "test_filelist.txt"
    if not test_file.is_file():
        raise DataError(f"core50: {test_file} is missing (expected {LAYOUT})")
    batches = [_read_filelist(numbered[i], images) for i in range(len(numbered))]
    test = _read_filelist(test_file, images)
    # One stat per (session, object) folder, not per image: a filelist for another copy of the
    # images (the 32x32 one, a partial download) is caught here rather than mid-run.
    for s, o in sorted({(s, o) for entries in batches + [test] for s, o, _ in entries}):
        if not (images / f"s{s}" / f"o{o}").is_dir():
            raise DataError(f"core50: the filelists in {folder} name images of {images / f's{s}' / f'o{o}'}, "
                            f"which is missing")
    return batches, test


def _read_filelist(path: Path, images: Path) -> list[Entry]:
    """`s<session>/o<object>/<file> <label>` lines (caffe's filelist format), as entries. The
    label column is checked to be a number and otherwise left: the class is the object's."""
    entries = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        match = _ENTRY.fullmatch(fields[0]) if len(fields) == 2 and fields[1].isdigit() else None
        session, obj = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
        if not match or session not in SESSIONS or not 1 <= obj <= N_OBJECTS or match.group(3) in (".", ".."):
            raise DataError(f"core50: {path} line {n} is not `s<1..11>/o<1..50>/<file> <label>` naming an image "
                            f"under {images}: {line[:80]!r}")
        entries.append((session, obj, images / fields[0]))
    if not entries:
        raise DataError(f"core50: {path} lists no image")
    return entries


def _scan(images: Path, sessions: tuple[int, ...], objects) -> list[Entry]:
    """The colour frames (`C_*.png`: the depth maps of the depth download are `D_*.png`) of
    these sessions and objects, in session, object and frame order."""
    entries = []
    for s in sessions:
        for o in objects:
            folder = images / f"s{s}" / f"o{o}"
            if folder.is_dir():
                entries += [(s, o, folder / name) for name in sorted(
                    p.name for p in folder.iterdir() if p.name.startswith("C_") and p.suffix.lower() == ".png")]
    return entries


def nc_batches() -> list[list[int]]:
    """NC's 9 batches of objects (1..50) as CORe50's `create_sII_filelist.py` composes them for
    every run: first o1, o6, ..., o46 (one object of each category); then batch b = 1..8 holds
    the ((b + 1) // 2 + 1)-th object of categories 1-5 (b odd) or 6-10 (b even). The script's
    Python 2 `round(b / 2.0)` rounds halves up, hence (b + 1) // 2."""
    out = [[c * OBJECTS_PER_CATEGORY + 1 for c in range(10)]]
    for b in range(1, 9):
        categories = range(5) if b % 2 else range(5, 10)
        out.append([c * OBJECTS_PER_CATEGORY + (b + 1) // 2 + 1 for c in categories])
    return out


def _from_folders(images: Path, protocol: str, seed: int, run: int) -> tuple[list[list[Entry]], list[Entry], list]:
    rng = np.random.RandomState([seed, run])  # the same stream for the same (seed, run), on any machine
    train = _scan(images, TRAIN_SESSIONS, range(1, N_OBJECTS + 1))
    test = _scan(images, TEST_SESSIONS, range(1, N_OBJECTS + 1))
    if not train or not test:
        raise DataError(f"core50: {images} has no C_*.png frame in the {'training' if not train else 'test'} "
                        f"sessions {TRAIN_SESSIONS if not train else TEST_SESSIONS} (expected {LAYOUT})")
    if protocol == "ni":
        present = [s for s in TRAIN_SESSIONS if any(e[0] == s for e in train)]
        order = [present[i] for i in rng.permutation(len(present))]
        return [[e for e in train if e[0] == s] for s in order], test, [f"s{s}" for s in order]
    official = nc_batches()
    rest = [official[0]] + [official[1 + i] for i in rng.permutation(8)]  # the first batch stays first
    present = {e[1] for e in train}
    groups = [[o for o in b if o in present] for b in rest]
    groups = [g for g in groups if g]
    return [[e for e in train if e[1] in set(g)] for g in groups], test, [[f"o{o}" for o in g] for g in groups]


def _stream(name: str, batches: list[list[Entry]], test: list[Entry], label, n_classes: int, size: int,
            num_workers: int, augment: bool, mean, std, schedule: dict) -> Stream:
    # Tasks (accuracy-matrix columns) are the classes that first arrive together; each is
    # evaluated on its classes' test images. The three protocols follow from this one rule.
    task_of: dict[int, int] = {}
    class_order: list[int] = []
    batch_classes = []
    for entries in batches:
        classes = sorted({label(o) for _, o, _ in entries})
        new = [c for c in classes if c not in task_of]
        if new:
            k = max(task_of.values(), default=-1) + 1
            task_of.update({c: k for c in new})
            class_order += new
        batch_classes.append(classes)
    n_tasks = max(task_of.values()) + 1
    test_labels = [label(o) for _, o, _ in test]
    unseen = sorted(set(test_labels) - set(task_of))
    if unseen:
        raise DataError(f"core50 ({name}): the test set holds classes {unseen} that no training batch has")
    test_data = lazy_images([p for _, _, p in test], test_labels, size, 3, num_workers)
    task_index = torch.tensor([task_of[c] for c in test_labels])
    # One task: the whole test set, shared (not copied) by every experience.
    test_sets = [test_data] if n_tasks == 1 else [
        test_data.subset((task_index == k).nonzero().squeeze(1)) for k in range(n_tasks)]
    experiences = []
    for i, (entries, classes) in enumerate(zip(batches, batch_classes)):
        train = lazy_images([p for _, _, p in entries], [label(o) for _, o, _ in entries], size, 3, num_workers)
        tasks = tuple(sorted({task_of[c] for c in classes}))
        own = tasks[0] if len(tasks) == 1 else None  # a NIC batch of several tasks' classes is about none
        experiences.append(Experience(i, 0, classes, train, None if own is None else test_sets[own],
                                      task_index=own, tasks=tasks))
    padding = max(1, size // 8) if augment else 0
    transform = BatchTransform(mean or IMAGENET_MEAN, std or IMAGENET_STD, crop_padding=padding, flip=augment)
    return Stream(name, experiences, transform, (3, size, size), n_classes, class_order, test_sets=test_sets,
                  task_classes=[sorted(c for c, k in task_of.items() if k == j) for j in range(n_tasks)],
                  schedule=schedule)


def class_names(labels: str = "object") -> list[str]:
    """The classes' names: `plug_adapter1` ... `remote_control5`, or the 10 categories."""
    return list(CATEGORY_NAMES if labels == "category" else OBJECT_NAMES)
