"""ImageNet-R and ImageNet-A, read lazily from the layouts they are distributed in.

ImageNet-R(endition) (Hendrycks et al. 2021, "The Many Faces of Robustness: A Critical
Analysis of Out-of-Distribution Generalization"): 30,000 renditions (art, cartoons, sketches,
toys, ...) of 200 ImageNet classes. ImageNet-A (Hendrycks et al. 2021, "Natural Adversarial
Examples"): 7,500 real photos of 200 ImageNet classes that ResNet-50s misclassify. Both ship
as one tar, unpacked under the data root:

    imagenet-r/README.txt            a header, then `<wnid> <name>` lines (class names)
    imagenet-r/<wnid>/*.jpg          the 200 class folders (imagenet-a/ alike)

Neither ships a train/test split; the continual-learning papers made their own, and `split`
chooses which (classes are numbered in the sorted order of their wnids throughout, which is
also DualPrompt's numbering: its label map sends ImageNet-1k's sorted indices to 0..199 in
order):

* `"folders"`: `imagenet-r/train/<wnid>/*` and `imagenet-r/test/<wnid>/*` (or `val/`, as SLCA
  names it) as they are. This
  is the layout of the pre-split copies that ADAM/APER (Zhou et al. 2023, repo
  zhoudw-zdw/RevisitingCIL), RanPAC (McDonnell et al. 2023), SLCA and the PyCIL-family code
  (LAMDA-PILOT) read with torchvision's ImageFolder, for ImageNet-R and ImageNet-A alike; it
  is also what dualprompt-pytorch's `Imagenet_R` leaves behind after moving the files. Their
  authors distribute those copies (Google Drive links in the RevisitingCIL README) without the
  procedure that drew them, so this split is followed exactly but cannot be redrawn here.
* `"lists"` (alias `"coda-prompt"`): the files named by `lists` (default CODA-Prompt's
  `imagenet-r_train.yaml` and `imagenet-r_test.yaml`, copied into the dataset folder), each
  either CODA-Prompt's YAML (`data:` then `- data/imagenet-r/<wnid>/<file>` lines, `targets:`
  then `- <int>` lines) or text with one `<wnid>/<file> [label]` a line. CODA-Prompt (Smith
  et al. 2023, GT-RIPL/CODA-Prompt, dataloaders/splits/) released its 24,000 / 6,000 split
  this way, so this reproduces it exactly. Its own target numbers follow an unsorted folder
  listing; here the wnid folder gives the class (a list whose targets disagree with its
  folders is refused), so CODA's class order is a matter of the scenario's class order.
* `"random:<fraction>"`: a global draw, `torch.randperm(n)` from a generator seeded `seed`
  over the ImageFolder order (sorted wnids, file names sorted within each), its first
  `int(fraction * n)` images training, as `torch.utils.data.random_split` cuts it. This is
  the draw dualprompt-pytorch (JH-LEE-KR, the PyTorch port that SLCA points to) makes with
  `random_split(dataset, [int(0.8 n), n - int(0.8 n)])` right after `torch.manual_seed(42)`,
  so `random:0.8` with `seed: 42` should give its membership; that is read from its code, not
  checked against its files. DualPrompt itself (Wang et al. 2022, google-research/l2p) takes
  TFDS's `imagenet_r:0.2.0` `test[:80%]` / `test[80%:]`, a cut of TFDS's build-time record
  order: same proportion, membership not reproducible from the files.
* `"stratified:<fraction>"`: the same, drawn within each class (`round(fraction * n_c)` of
  class c train), for an 80/20 ratio in every class.

Labels come from folder names and lists, so building a stream decodes no image. No list line
or folder name reaches outside the dataset folder.
"""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import torch

from streams.experience import BatchTransform, Dataset
from streams.image_files import IMAGENET_MEAN, IMAGENET_STD, lazy_images
from streams.validation import DataError

#: Image suffixes torchvision's ImageFolder takes (the pre-split copies are read with it).
SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
WNID = re.compile(r"^n\d{8}$")
SOURCES = {
    "imagenet_r": ("imagenet-r", "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar", 30000),
    "imagenet_a": ("imagenet-a", "https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar", 7500),
}
CODA_LISTS = ("imagenet-r_train.yaml", "imagenet-r_test.yaml")


def imagenet_r(data_dir: str | None = None, split: str = "random:0.8", size: int = 224, augment: bool = False,
               num_workers: int = 2, mean: list[float] | None = None, std: list[float] | None = None,
               seed: int = 0, lists: list[str] | None = None) -> Dataset:
    """ImageNet-R (Hendrycks et al. 2021): 200 classes, 30,000 images, split by `split`
    (`"folders"`, `"lists"` / `"coda-prompt"`, `"random:<fraction>"` or
    `"stratified:<fraction>"`, drawn from `seed`; see the module's docstring for which paper
    each reproduces), resized to `size` and read batch by batch by a DataLoader with
    `num_workers` workers; normalised with ImageNet's statistics unless `mean` and `std` are
    given. `augment` adds a random crop and a horizontal flip. `lists` names the train and test
    list files of `split: lists` (relative to the dataset folder; default CODA-Prompt's)."""
    return _renditions("imagenet_r", data_dir, split, size, augment, num_workers, mean, std, seed, lists)


def imagenet_a(data_dir: str | None = None, split: str = "random:0.8", size: int = 224, augment: bool = False,
               num_workers: int = 2, mean: list[float] | None = None, std: list[float] | None = None,
               seed: int = 0, lists: list[str] | None = None) -> Dataset:
    """ImageNet-A (Hendrycks et al. 2021): 200 classes, 7,500 images (unevenly spread), read
    as `imagenet_r` reads ImageNet-R. The pre-trained-model CIL papers (ADAM/APER, RanPAC)
    train and test on the pre-split copy of ADAM's authors: `split: folders` on it."""
    return _renditions("imagenet_a", data_dir, split, size, augment, num_workers, mean, std, seed, lists)


def _renditions(name, data_dir, split, size, augment, num_workers, mean, std, seed, lists) -> Dataset:
    from streams.sources import _not_found, data_root

    folder, url, total = SOURCES[name]
    root = data_root(data_dir) / folder
    if not root.is_dir():
        raise _not_found(name, [root], f"Expected {folder}/<wnid>/*.jpg (200 wnid folders, {total:,} images; "
                                       f"or {folder}/train/<wnid>/ and {folder}/test/<wnid>/ for `split: folders`); "
                                       f"it has no torchvision download: unpack {url} under the data root.")
    kind, _, arg = split.partition(":")
    if kind == "folders":
        wnids, train, test = _folders(name, root)
    elif kind in ("lists", "coda-prompt"):
        wnids, train, test = _from_lists(name, root, lists or list(CODA_LISTS))
    elif kind in ("random", "stratified"):
        fraction = _fraction(name, split, arg)
        wnids, files, labels = _class_folders(name, root, root)
        train, test = _draw(files, labels, fraction, seed, per_class=kind == "stratified")
    else:
        raise ValueError(f"{name}: split must be 'folders', 'lists', 'coda-prompt', 'random:<fraction>' or "
                         f"'stratified:<fraction>', got {split!r}")
    transform = BatchTransform(mean or IMAGENET_MEAN, std or IMAGENET_STD,
                               crop_padding=max(1, size // 8) if augment else 0, flip=augment)
    return Dataset(name, lazy_images(*train, size, 3, num_workers), lazy_images(*test, size, 3, num_workers),
                   transform, class_names=_names(root, wnids))


def _fraction(name: str, split: str, arg: str) -> float:
    try:
        fraction = float(arg)
    except ValueError:
        fraction = -1.0
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"{name}: split {split!r} needs a training fraction strictly between 0 and 1, "
                         f"e.g. 'random:0.8'")
    return fraction


def _images(folder: Path) -> list[Path]:
    # Sorted by name, as ImageFolder sorts them: the order a seeded draw permutes.
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file()),
                  key=lambda p: p.name)


def _class_folders(name: str, root: Path, where: Path) -> tuple[list[str], list[Path], list[int]]:
    """The wnid folders directly under `where` (others, such as train/ or README.txt, are not
    classes), their images in ImageFolder's order and their labels (sorted wnid order)."""
    wnids = sorted(p.name for p in where.iterdir() if p.is_dir() and WNID.match(p.name))
    if not wnids:
        hint = " (it has train/ and test/: `split: folders` reads them)" if (where / "train").is_dir() else ""
        raise DataError(f"{name}: {where} has no <wnid>/ class folders (expected {root.name}/<wnid>/*.jpg){hint}")
    files, labels = [], []
    for label, wnid in enumerate(wnids):
        found = _images(where / wnid)
        files += found
        labels += [label] * len(found)
    return wnids, files, labels


def _folders(name: str, root: Path):
    # ADAM/RanPAC/PILOT name the held-out folder test/, SLCA names it val/.
    held_out = root / "test" if (root / "test").is_dir() else root / "val"
    if not ((root / "train").is_dir() and held_out.is_dir()):
        raise DataError(f"{name}: `split: folders` needs {root}/train/<wnid>/ and {root}/test/<wnid>/ (or val/: "
                        f"the pre-split copies of ADAM/RanPAC/SLCA); {root} has no train/ and test/ folders")
    wnids, *train = _class_folders(name, root, root / "train")
    test_wnids, *test = _class_folders(name, root, held_out)
    if wnids != test_wnids:  # ImageFolder numbers each folder's classes on its own: they must agree
        raise DataError(f"{name}: {root}/train and {held_out} hold different classes "
                        f"({sorted(set(wnids) ^ set(test_wnids))[:5]}...)")
    return wnids, tuple(train), tuple(test)


def _draw(files: list[Path], labels: list[int], fraction: float, seed: int, per_class: bool):
    g = torch.Generator().manual_seed(seed)
    if per_class:
        y = torch.tensor(labels)
        train = []
        for c in torch.unique(y).tolist():
            members = torch.nonzero(y == c).flatten()
            train += members[torch.randperm(len(members), generator=g)[:round(fraction * len(members))]].tolist()
    else:  # random_split's cut: the first int(fraction * n) of one permutation train
        train = torch.randperm(len(files), generator=g)[:int(fraction * len(files))].tolist()
    chosen = set(train)
    train = sorted(chosen)  # kept in file order: the membership is what the seed decides
    test = [i for i in range(len(files)) if i not in chosen]
    return tuple(([files[i] for i in index], [labels[i] for i in index]) for index in (train, test))


def relative_path(text: str, list_file: Path, line: int, dataset: str) -> PurePosixPath:
    """A path named by an index line, refused unless it stays inside the dataset folder: no
    absolute path, drive or `..` (a list is data, never a way to read other files)."""
    path = PurePosixPath(text.replace("\\", "/"))
    if not path.parts or path.is_absolute() or ".." in path.parts or ":" in path.parts[0]:
        raise DataError(f"{dataset}: {list_file} line {line} names {text[:80]!r}, outside the dataset folder "
                        f"(list paths are relative, without '..')")
    return path


def read_list(list_file: Path, dataset: str) -> list[tuple[int, str, int | None]]:
    """(line number, path, label or None) of a list: CODA-Prompt's YAML (`data:` / `targets:`
    sections of `- item` lines, read without a YAML loader) or `<path> [label]` text lines."""
    if not list_file.is_file():
        raise DataError(f"{dataset}: list {list_file} is missing")
    lines = list_file.read_text().splitlines()
    if any(line.strip() == "data:" for line in lines):
        sections: dict[str, list[tuple[int, str]]] = {}
        current = None
        for n, line in enumerate(lines, 1):
            text = line.strip()
            if not text:
                continue
            if text.endswith(":") and not text.startswith("-"):
                current = sections.setdefault(text[:-1], [])
            elif text.startswith("- ") and current is not None:
                current.append((n, text[2:].strip().strip("'\"")))
            else:
                raise DataError(f"{dataset}: {list_file} line {n} is not a `data:` / `targets:` list item: "
                                f"{text[:80]!r}")
        data, targets = sections.get("data", []), sections.get("targets", [])
        if len(data) != len(targets):
            raise DataError(f"{dataset}: {list_file} lists {len(data)} images but {len(targets)} targets")
        return [(n, path, _int(t, list_file, m, dataset)) for (n, path), (m, t) in zip(data, targets)]
    out = []
    for n, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) > 2:
            raise DataError(f"{dataset}: {list_file} line {n} is not `<path> [label]`: {line[:80]!r}")
        out.append((n, fields[0], _int(fields[1], list_file, n, dataset) if len(fields) == 2 else None))
    return out


def _int(text: str, list_file: Path, line: int, dataset: str) -> int:
    if not re.fullmatch(r"\d+", text):
        raise DataError(f"{dataset}: {list_file} line {line}: label {text[:20]!r} is not a non-negative integer")
    return int(text)


def _from_lists(name: str, root: Path, lists: list[str]):
    if len(lists) != 2:
        raise ValueError(f"{name}: `lists` names two files, the training list then the test list; got {lists}")
    read = []
    for entry in lists:
        list_file = Path(entry) if Path(entry).is_absolute() else root / entry
        rows = []
        for n, text, target in read_list(list_file, name):
            parts = relative_path(text, list_file, n, name).parts
            if len(parts) > 2 and parts[0] == "data" and parts[1] == root.name:
                parts = parts[2:]  # CODA-Prompt's paths start at its repository: data/imagenet-r/...
            if len(parts) != 2 or not WNID.match(parts[0]):
                raise DataError(f"{name}: {list_file} line {n} names {text[:80]!r}, not <wnid>/<file>")
            rows.append((n, parts[0], parts[1], target, list_file))
        read.append(rows)
    wnids = sorted({wnid for rows in read for _, wnid, *_ in rows})
    index = {w: i for i, w in enumerate(wnids)}
    by_target: dict[int, str] = {}
    splits = []
    for rows in read:
        files, labels = [], []
        for n, wnid, file, target, list_file in rows:
            if target is not None and by_target.setdefault(target, wnid) != wnid:
                raise DataError(f"{name}: {list_file} line {n}: target {target} is given to {wnid} and to "
                                f"{by_target[target]}; a list's targets must follow its class folders")
            files.append(root / wnid / file)
            labels.append(index[wnid])
        splits.append((files, labels))
    overlap = set(splits[0][0]) & set(splits[1][0])
    if overlap:
        raise DataError(f"{name}: {len(overlap)} images are in both lists, e.g. {sorted(overlap)[0]}")
    return wnids, splits[0], splits[1]


def _names(root: Path, wnids: list[str]) -> list[str]:
    """Each class's name from README.txt (`<wnid> <name>` lines after a header), else its wnid."""
    names = {}
    readme = root / "README.txt"
    if readme.is_file():
        for line in readme.read_text(errors="replace").splitlines():
            fields = line.split(None, 1)
            if len(fields) == 2 and WNID.match(fields[0]):
                names[fields[0]] = fields[1].strip().replace("_", " ")
    return [names.get(w) or w for w in wnids]
