"""DomainNet (Peng et al. 2019, "Moment Matching for Multi-Source Domain Adaptation", ICCV),
read lazily from the layout it is distributed in (http://ai.bu.edu/M3SDA/, the "cleaned
version": one zip per domain and the official split lists, from
http://csr.bu.edu/ftp/visda/2019/multi-source/), unpacked into one folder under the data root:

    domainnet/<domain>/<class>/<file>.jpg    clipart, infograph, painting, quickdraw, real, sketch
    domainnet/<domain>_train.txt             official lists, lines `<domain>/<class>/<file> <label>`,
    domainnet/<domain>_test.txt              e.g. `clipart/aircraft_carrier/clipart_001_000001.jpg 0`

(`DomainNet/` is read too: CODA-Prompt and RanPAC spell it so, S-Prompts `domainnet/`.) About
0.6M images of 345 classes, numbered by the lists (0..344, in the sorted order of the class
names); the class of a label is the folder its lines name. Note: the official
painting_train.txt has no image of class 327 (t-shirt), so painting's training set has 344.

Two uses in the prompt-method papers:

* class-incremental, all domains mixed (`domainnet` + `class_incremental`): CODA-Prompt (Smith
  et al. 2023, configs/domainnet_prompt.yaml) trains 5 tasks of 69 classes on DomainNet. Its
  split comes from its own `dataloaders/splits/domainnet_{train,test}.yaml`, which (issue
  GT-RIPL/CODA-Prompt#19) hold no quickdraw image; those files were not readable here, so
  whether they follow the official lists is not verified: `domains` without quickdraw is the
  closest this reader comes, on the official lists.
* domain-incremental, one domain per experience with all 345 classes in each
  (`domainnet_domains`): S-Prompts (Wang et al. 2022, iamwangyabin/S-Prompts utils/data.py)
  takes the official lists in the order clipart, infograph, painting, quickdraw, real, sketch
  (the default here; RanPAC's order is real, quickdraw, painting, sketch, infograph, clipart).
  S-Prompts offsets labels by 345 per domain inside its own code; here every domain shares the
  345 classes, as domain-incremental learning has it.

Labels come from the lists, so building a stream decodes no image; no list line reaches
outside the dataset folder.
"""
from __future__ import annotations

from streams.experience import BatchTransform, Dataset, Experience, Stream
from streams.image_files import IMAGENET_MEAN, IMAGENET_STD, lazy_images
from streams.imagenet_r import read_list, relative_path
from streams.validation import DataError

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
URL = "http://ai.bu.edu/M3SDA/"
FOLDERS = ("domainnet", "DomainNet")
LAYOUT = ("domainnet/<domain>/<class>/*.jpg with the official lists domainnet/<domain>_train.txt and "
          "domainnet/<domain>_test.txt (`<domain>/<class>/<file> <label>` lines)")


def domainnet(domains: list[str] = DOMAINS, data_dir: str | None = None, size: int = 224, augment: bool = False,
              num_workers: int = 2, mean: list[float] | None = None, std: list[float] | None = None) -> Dataset:
    """DomainNet's chosen `domains` mixed into one dataset: the official training lists of
    every domain train, their test lists test (class-incremental use, as CODA-Prompt), images
    resized to `size`, normalised with ImageNet's statistics unless `mean` and `std` are given;
    `augment` adds a random crop and a horizontal flip."""
    _, splits, names = _read(domains, data_dir)
    train = [splits[d]["train"] for d in splits]
    test = [splits[d]["test"] for d in splits]
    name = "domainnet" if len(splits) == len(DOMAINS) else "domainnet-" + "-".join(splits)
    return Dataset(name, lazy_images(*_joined(train), size, 3, num_workers),
                   lazy_images(*_joined(test), size, 3, num_workers), _transform(size, augment, mean, std),
                   class_names=names)


def domainnet_domains(domains: list[str] = DOMAINS, data_dir: str | None = None, seed: int = 0, size: int = 224,
                      augment: bool = False, num_workers: int = 2, mean: list[float] | None = None,
                      std: list[float] | None = None, task_labels: bool = False) -> Stream:
    """Domain-incremental DomainNet (as S-Prompts, Wang et al. 2022): experience i trains on
    domain `domains[i]`'s official training list with every class, and test set i is that
    domain's test list. `task_labels` gives experience i task label i (task-aware use);
    `seed` is taken for the lab's sake and unused: the lists fix the split and the order."""
    _, splits, names = _read(domains, data_dir)
    n_classes = len(names)
    classes = list(range(n_classes))
    experiences = []
    for i, d in enumerate(splits):
        task = i if task_labels else 0
        train = lazy_images(*splits[d]["train"], size, 3, num_workers).with_task(task)
        test = lazy_images(*splits[d]["test"], size, 3, num_workers).with_task(task)
        experiences.append(Experience(i, task, classes, train, test, task_index=i))
    # Every domain is a task over all classes, though one may lack a class (painting's
    # training list has no t-shirt): the declared class sets say so.
    return Stream("domainnet-domains", experiences, _transform(size, augment, mean, std), (3, size, size), n_classes,
                  classes, task_classes=[classes] * len(experiences),
                  schedule={"kind": "domainnet_domains", "domains": list(splits), "task_labels": task_labels})


def _transform(size: int, augment: bool, mean, std) -> BatchTransform:
    return BatchTransform(mean or IMAGENET_MEAN, std or IMAGENET_STD,
                          crop_padding=max(1, size // 8) if augment else 0, flip=augment)


def _joined(parts):
    return [f for files, _ in parts for f in files], [y for _, labels in parts for y in labels]


def _read(domains, data_dir):
    """The dataset folder, each domain's {"train", "test"}: (files, labels), and the class names."""
    from streams.sources import _not_found, data_root

    if isinstance(domains, str):
        domains = [domains]
    domains = list(domains)
    unknown = [d for d in domains if d not in DOMAINS]
    if not domains or unknown or len(set(domains)) != len(domains):
        raise ValueError(f"domainnet: domains must be distinct names among {list(DOMAINS)}, got {domains}")
    base = data_root(data_dir)
    looked = [base / f for f in FOLDERS]
    root = next((p for p in looked if p.is_dir()), None)
    if root is None:
        raise _not_found("domainnet", looked, f"Expected {LAYOUT}; it has no torchvision download: get the domain "
                                              f"zips and the lists from {URL} and unpack them into one folder.")
    splits, by_label, by_name = {}, {}, {}
    for d in domains:
        splits[d] = {}
        for split in ("train", "test"):
            list_file = root / f"{d}_{split}.txt"
            if not list_file.is_file():
                raise DataError(f"domainnet: {list_file} is missing (expected {LAYOUT})")
            files, labels = [], []
            for n, text, label in read_list(list_file, "domainnet"):
                parts = relative_path(text, list_file, n, "domainnet").parts
                if len(parts) != 3 or parts[0] != d or label is None:
                    raise DataError(f"domainnet: {list_file} line {n} is not `{d}/<class>/<file> <label>`: "
                                    f"{text[:80]!r}")
                # One class name per label and one label per name, across every list read.
                if by_label.setdefault(label, parts[1]) != parts[1] or by_name.setdefault(parts[1], label) != label:
                    raise DataError(f"domainnet: {list_file} line {n} gives label {label} to {parts[1]!r}; another "
                                    f"line gives it to {by_label[label]!r} (or that class label {by_name[parts[1]]})")
                files.append(root.joinpath(*parts))
                labels.append(label)
            splits[d][split] = (files, labels)
    if not by_label:
        raise DataError(f"domainnet: the lists of {domains} in {root} name no image")
    n_classes = max(by_label) + 1
    return root, splits, [by_label.get(k, f"class {k}").replace("_", " ") for k in range(n_classes)]
