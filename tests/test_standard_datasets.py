"""The standard benchmarks read from the layouts they are distributed in (issue 27): each test
writes a miniature of the real on-disk layout, a few tiny images a class, and reads it the
way a run does."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from streams import cifar100, class_incremental, tiny_imagenet
from streams.scenarios import named_order
from streams.sources import DatasetNotFoundError
from streams.validation import DataError

# The first classes of PyCIL's CIFAR-100 order (numpy's legacy generator seeded 1993, as its
# experiment configs shuffle them).
PYCIL_CIFAR100_START = [68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89]


def write_cifar100(root, per_class=3, test_per_class=2, classes=100):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    g = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", test_per_class)):
        labels = [c for c in range(classes) for _ in range(n)]
        data = g.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(folder / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * len(labels)}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{c}" for c in range(classes)]}, f)
    return folder


def test_cifar100_reads_the_pickles_and_takes_the_published_class_order(tmp_path):
    write_cifar100(tmp_path)
    data = cifar100(data_dir=str(tmp_path), download=False)
    assert data.train.x.shape == (300, 3, 32, 32) and data.train.x.dtype == torch.uint8
    assert len(data.test.y) == 200 and data.n_classes == 100 and data.class_names[7] == "class7"
    assert torch.bincount(data.train.y).tolist() == [3] * 100
    stream = class_incremental(data, n_experiences=10, class_order="pycil")
    assert stream.class_order[:12] == PYCIL_CIFAR100_START
    assert stream.experiences[0].classes == sorted(PYCIL_CIFAR100_START[:10])
    assert named_order(100, "seed:1993") == stream.class_order
    assert named_order(5, "natural") == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="'natural', 'seed:N'"):
        named_order(5, "mammoth-ish")


def test_mammoth_s_orders_relabel_where_pycil_s_sequence():
    # numpy's RandomState(0).permutation(10) is [2, 8, 4, 9, 1, 6, 7, 3, 0, 5]. PyCIL trains those
    # classes in that sequence; Mammoth (--permute_classes 1 --seed 0) gives class c the label
    # perm[c] and trains labels 0, 1, ... in turn, so its first task holds classes 8 (perm[8] = 0)
    # and 4 (perm[4] = 1).
    assert named_order(10, "seed:0") == [2, 8, 4, 9, 1, 6, 7, 3, 0, 5]
    assert named_order(10, "mammoth:0") == [8, 4, 0, 7, 2, 9, 5, 6, 1, 3]
    assert named_order(10, "mammoth") == list(range(10))  # its default, --permute_classes 0


def test_cifar100_refuses_a_pickle_that_would_run_code(tmp_path):
    folder = write_cifar100(tmp_path)

    class Planted:
        def __reduce__(self):
            return (print, ("ran",))

    with open(folder / "train", "wb") as f:
        pickle.dump({"data": Planted(), "fine_labels": []}, f)
    with pytest.raises(DataError, match="not allowed in a dataset file"):
        cifar100(data_dir=str(tmp_path), download=False)


def test_a_missing_cifar100_names_where_it_looked(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python"):
        cifar100(data_dir=str(tmp_path), download=False)


def write_tiny_imagenet(root, wnids=("n01443537", "n01629819", "n01641577", "n01644900"), train=3, val=2):
    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")  # as shipped: not sorted
    (base / "words.txt").write_text("".join(f"{w}\tthing {i}, other name\n" for i, w in enumerate(wnids)))
    g = np.random.default_rng(0)

    def image(path, colour):
        pixels = np.clip(g.normal(colour, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, "JPEG")

    annotations = []
    for i, w in enumerate(wnids):
        folder = base / "train" / w / "images"
        folder.mkdir(parents=True)
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
        for k in range(train):
            image(folder / f"{w}_{k}.JPEG", 60 * i)
        for k in range(val):
            name = f"val_{i * val + k}.JPEG"
            image(base / "val" / "images" / name, 60 * i)
            annotations.append(f"{name}\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    return base


def test_tiny_imagenet_labels_come_from_the_index_without_decoding_an_image(tmp_path, decoded):
    write_tiny_imagenet(tmp_path)
    data = tiny_imagenet(data_dir=str(tmp_path), num_workers=0)
    stream = class_incremental(data, n_experiences=2)
    assert not decoded  # dataset, labels, class split: no image read
    assert data.input_shape == (3, 64, 64) and data.n_classes == 4
    assert torch.bincount(data.train.y).tolist() == [3] * 4 and torch.bincount(data.test.y).tolist() == [2] * 4
    assert data.class_names == ["thing 0", "thing 1", "thing 2", "thing 3"]  # sorted wnids, words.txt names
    x, y, _ = next(stream.experiences[1].test.batches(8, shuffle=False))
    assert len(decoded) == len(y) == 4 and set(y.tolist()) == {2, 3}
    # Each class's images were drawn around its own colour: the labels belong to the pixels.
    assert x[y == 2].float().mean() < x[y == 3].float().mean()


def test_tiny_imagenet_errors_name_the_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="wnids.txt.*tiny-imagenet-200.zip"):
        tiny_imagenet(data_dir=str(tmp_path))
    base = write_tiny_imagenet(tmp_path)
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="line 1 .*wnids.txt"):
        tiny_imagenet(data_dir=str(tmp_path))


def test_a_run_trains_on_tiny_imagenet_read_lazily(tmp_path):
    from cl.api import run

    write_tiny_imagenet(tmp_path, train=6)
    result, = run({"name": "tiny", "seed": 0, "device": "cpu", "data_dir": str(tmp_path),
                  "stream": {"dataset": {"name": "tiny_imagenet", "size": 16, "num_workers": 0},
                             "scenario": {"name": "class_incremental", "n_experiences": 2,
                                          "class_order": "seed:3"}},
                  "model": {"name": "mlp", "hidden": [16]},
                  "training": {"epochs": 2, "batch_size": 4, "optimizer": {"name": "sgd", "lr": 0.05}},
                  "strategies": [{"name": "replay", "memory_size": 4, "replay_batch_size": 2}]}, track=False)
    matrix = np.asarray(result["accuracy_matrix"], dtype=float)
    assert matrix.shape == (3, 2) and np.isfinite(matrix).all()  # the untrained model, then each experience
    assert matrix[1, 0] == 1.0 and matrix[2, 1] == 1.0  # colour-coded classes: each experience is learned


def jpeg(path, colour, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), colour, dtype=np.uint8)).save(path, "JPEG")


def write_cub(root, classes=3, per_class=4):
    """CUB's index files and images; the first half of each class's images train."""
    base = root / "CUB_200_2011"
    images, labels, split, names = [], [], [], []
    k = 0
    for c in range(1, classes + 1):
        folder = f"{c:03d}.Bird_{c}"
        names.append(f"{c} {folder}")
        for i in range(per_class):
            k += 1
            relative = f"{folder}/Bird_{c}_{i}.jpg"
            jpeg(base / "images" / relative, 70 * c, size=(40 + 7 * i, 30 + 3 * c))  # every size differs
            images.append(f"{k} {relative}")
            labels.append(f"{k} {c}")
            split.append(f"{k} {1 if i < per_class // 2 else 0}")
    for name, lines in (("images", images), ("image_class_labels", labels), ("train_test_split", split),
                        ("classes", names)):
        (base / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return base


def test_cub200_takes_its_split_and_classes_from_the_index_files(tmp_path, decoded):
    from streams import cub200

    write_cub(tmp_path)
    data = cub200(data_dir=str(tmp_path), size=16, num_workers=0)
    stream = class_incremental(data, n_experiences=3)
    assert not decoded and data.input_shape == (3, 16, 16)
    assert torch.bincount(data.train.y).tolist() == [2, 2, 2] and torch.bincount(data.test.y).tolist() == [2, 2, 2]
    assert data.class_names == ["Bird 1", "Bird 2", "Bird 3"]
    x, y, _ = next(stream.experiences[2].train.batches(8, shuffle=False))
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [2, 2] and len(decoded) == 2  # resized from 54x39
    assert (x.float().mean() - 210).abs() < 3  # class 3's colour: the file its label names


def test_cub200_refuses_an_index_that_points_outside_its_images(tmp_path):
    from streams import cub200

    base = write_cub(tmp_path)
    text = (base / "images.txt").read_text().replace("001.Bird_1/Bird_1_0.jpg", "../../secret.jpg")
    (base / "images.txt").write_text(text)
    with pytest.raises(DataError, match="outside"):
        cub200(data_dir=str(tmp_path))


def test_an_imagenet_subset_reads_the_listed_classes_in_the_list_order(tmp_path):
    from streams import imagenet_subset

    wnids = ["n01440764", "n01443537", "n01484850"]
    for split, n in (("train", 3), ("val", 1)):
        for i, w in enumerate(wnids):
            for k in range(n):
                jpeg(tmp_path / "imagenet" / split / w / f"{w}_{k}.JPEG", 80 * i)
    (tmp_path / "subset.txt").write_text(f"{wnids[2]}\n{wnids[0]}\n")
    data = imagenet_subset("subset.txt", data_dir=str(tmp_path), size=8, num_workers=0)
    assert data.class_names == [wnids[2], wnids[0]] and len(data.train) == 6 and len(data.test) == 2
    x, y, _ = next(data.test.batches(2, shuffle=False))
    assert y.tolist() == [0, 1] and x[0].float().mean() > x[1].float().mean()  # class 0 is the list's first
    with pytest.raises(DataError, match="not WordNet ids"):
        imagenet_subset(["../n01440764"], data_dir=str(tmp_path))


def test_the_feature_cache_works_on_lazily_read_images(tmp_path, decoded):
    """Nearest-mean on a frozen backbone passes each image through it once, read lazily, over
    two epochs and every evaluation (lazy inputs are not hashed to a file on disk: that would
    read them all, which is what the cache saves; see `cl.training.feature_cache`)."""
    from cl.api import run

    write_tiny_imagenet(tmp_path, train=6)
    result, = run({"name": "tiny", "seed": 0, "device": "cpu", "data_dir": str(tmp_path),
                   "stream": {"dataset": {"name": "tiny_imagenet", "size": 16, "num_workers": 0},
                              "scenario": {"name": "class_incremental", "n_experiences": 2}},
                   "model": {"name": "mlp", "hidden": [16]},
                   "training": {"epochs": 2, "batch_size": 4, "optimizer": {"name": "sgd", "lr": 0.05}},
                   "strategies": [{"name": "nearest_mean", "freeze_backbone": True}]})
    assert result["status"] == "FINISHED"
    assert sorted(map(str, decoded)) == sorted(set(map(str, decoded))) and len(decoded) == 32  # 24 + 8, once each
