"""CLEAR-10/-100 (streams/clear.py) read from miniatures of the layouts it is distributed in: a few
buckets of a few classes of tiny JPEGs, each bucket and class drawn around its own colour so that
a batch's pixels say where it came from."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from streams.clear import clear
from streams.sources import DatasetNotFoundError
from streams.validation import DataError

CLASSES = ["BACKGROUND", "baseball", "bus"]  # as class_names.txt lists them: sorted, BACKGROUND first


def _jpeg(path, bucket, label):
    g = np.random.default_rng(bucket * 10 + label)
    # Bucket in red, class in green: a decoded pixel tells which bucket and class it is.
    pixels = np.empty((12, 10, 3), dtype=np.uint8)
    pixels[..., 0], pixels[..., 1] = 40 * bucket, 80 * label
    pixels[..., 2] = g.integers(0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, "JPEG", quality=95)


def _images(folder, buckets, per_class, prefix=""):
    for b in buckets:
        for c, name in enumerate(CLASSES):
            for k in range(per_class):
                _jpeg(folder / str(b) / name / f"{prefix}{b}{c}{k}.jpg", b, c)


def write_release(root, buckets=(0, 1, 2, 3), train=4, test=2, variant="clear10"):
    """The July 2022 release: clear10-train.zip and clear10-test.zip unpacked in clear10/."""
    base = root / variant
    for split, n in (("train", train), ("test", test)):
        (base / split).mkdir(parents=True)
        (base / split / "class_names.txt").write_text("\n".join(CLASSES))  # as written: no final newline
        _images(base / split / "labeled_images", [b for b in buckets if b or split == "train"], n, split[:2])
    return base


def write_neurips(root, buckets=(0, 1, 2, 3), per_class=5, splits=(0, 1)):
    """The NeurIPS'21 release (clear10-public.zip): labeled_images/ and training_folder/."""
    base = root / "clear10"
    base.mkdir(parents=True)
    (base / "class_names.txt").write_text("\n".join(CLASSES))
    _images(base / "labeled_images", buckets, per_class)
    training = base / "training_folder"
    training.mkdir()
    (training / "bucket_indices.json").write_text(json.dumps([str(b) for b in buckets]))
    for b in buckets:
        lines = [f"labeled_images/{b}/{name}/{b}{c}{k}.jpg {c}" for c, name in enumerate(CLASSES)
                 for k in range(per_class)]
        (training / "filelists" / str(b)).mkdir(parents=True)
        (training / "filelists" / str(b) / "all.txt").write_text("\n".join(lines))
        for s in splits:  # an official-looking split: every third line tested, rotated by split and bucket
            folder = training / "testset_ratio_0.3" / f"split_{s}" / str(b)
            folder.mkdir(parents=True)
            test = [x for i, x in enumerate(lines) if (i + s + b) % 3 == 0]
            (folder / "test.txt").write_text("\n".join(test))
            (folder / "train.txt").write_text("\n".join(x for x in lines if x not in test))
    return base


def _names(data):
    return sorted(str(p).rsplit("/", 1)[-1] for p in _paths(data))


def _paths(data):
    """The files of a lazily read dataset (through its Subset / ImageFiles) without decoding them."""
    return list(data.dataset.paths)


def test_one_experience_per_bucket_in_time_order_without_decoding(tmp_path, decoded):
    write_release(tmp_path)
    stream = clear(data_dir=str(tmp_path), size=8, num_workers=0)
    assert not decoded  # buckets, classes, labels: from folder names alone
    assert stream.name == "clear10-iid" and len(stream) == 3 and stream.n_tasks == 3  # bucket 0 left out
    assert stream.schedule["buckets"] == [1, 2, 3] and stream.schedule["class_names"] == CLASSES
    assert stream.input_shape == (3, 8, 8) and stream.n_classes == 3 and not stream.class_incremental
    assert stream.one_experience_per_task
    for i, e in enumerate(stream.experiences):
        assert e.classes == [0, 1, 2] and e.task_label == 0 and e.task_index == i
        assert e.n_train == 12 and torch.bincount(e.train.y).tolist() == [4, 4, 4]
        assert all(f"/train/labeled_images/{i + 1}/" in str(p) for p in _paths(e.train))
    for j, test in enumerate(stream.test_sets):  # test set j: bucket j's held-out test/ images only
        assert len(test) == 6 and all(f"/test/labeled_images/{j + 1}/" in str(p) for p in _paths(test))
    x, y, t = next(stream.test_sets[1].batches(4, shuffle=False))
    assert len(decoded) == len(y) == 4 and x.shape == (4, 3, 8, 8) and x.dtype == torch.uint8
    red, green = x[:, 0].float().mean((1, 2)), x[:, 1].float().mean((1, 2))
    assert torch.allclose(red, torch.full((4,), 80.0), atol=6)  # bucket 2's colour
    assert torch.allclose(green, 80.0 * y.float(), atol=6)  # each label belongs to its pixels


def test_streaming_trains_on_a_whole_bucket_and_tests_on_every_bucket(tmp_path, decoded):
    write_release(tmp_path)
    stream = clear(protocol="streaming", data_dir=str(tmp_path), size=8, num_workers=0, task_labels=True)
    assert not decoded and stream.name == "clear10-streaming"
    for i, e in enumerate(stream.experiences):  # train/ and test/ images of bucket i together
        assert e.n_train == 18 and _names(e.train) == _names(stream.test_sets[i])
        assert {str(p).split("/labeled_images/")[1].split("/")[0] for p in _paths(e.train)} == {str(i + 1)}
        assert e.task_label == i and set(e.train.t.tolist()) == {i}
    assert stream.schedule["source"] == "train/ and test/ images"


def test_without_test_images_the_seeded_split_is_disjoint_and_follows_the_seed(tmp_path):
    base = write_release(tmp_path, train=10)
    import shutil

    shutil.rmtree(base / "test")
    a = clear(data_dir=str(tmp_path), size=8, num_workers=0, seed=3)
    again = clear(data_dir=str(tmp_path), size=8, num_workers=0, seed=3)
    other = clear(data_dir=str(tmp_path), size=8, num_workers=0, seed=4)
    assert a.schedule["source"] == "train/ images, seeded split" and a.schedule["split_seed"] == 3
    for j in range(3):
        train, test = set(_names(a.experiences[j].train)), set(_names(a.test_sets[j]))
        assert len(test) == 9 and len(train) == 21 and not train & test  # int(30 * 0.3) tested
        assert all(n.startswith(f"tr{j + 1}") for n in train | test)  # only bucket j's images
        assert _names(again.test_sets[j]) == _names(a.test_sets[j])
    assert any(_names(other.test_sets[j]) != _names(a.test_sets[j]) for j in range(3))
    assert clear(data_dir=str(tmp_path), size=8, num_workers=0, seed=9, split_seed=3).schedule["split_seed"] == 3


def test_the_official_split_files_are_followed_exactly(tmp_path, decoded):
    base = write_neurips(tmp_path)
    stream = clear(data_dir=str(tmp_path), size=8, num_workers=0, seed=1)
    assert not decoded and stream.schedule["source"] == "official split_1" and len(stream) == 3
    for j, b in enumerate((1, 2, 3)):
        folder = base / "training_folder" / "testset_ratio_0.3" / "split_1" / str(b)
        for data, file in ((stream.experiences[j].train, "train.txt"), (stream.test_sets[j], "test.txt")):
            lines = (folder / file).read_text().splitlines()
            assert [str(p) for p in _paths(data)] == [str(base / x.split()[0]) for x in lines]  # same order
            assert data.y.tolist() == [int(x.split()[1]) for x in lines]
    with pytest.raises(DataError, match="split_7.*split_seed 0, 1"):
        clear(data_dir=str(tmp_path), size=8, num_workers=0, seed=7)
    assert clear(data_dir=str(tmp_path), size=8, num_workers=0, seed=7, split_seed=0).schedule["source"] == \
        "official split_0"
    streaming = clear(protocol="streaming", data_dir=str(tmp_path), size=8, num_workers=0)
    assert streaming.schedule["source"] == "filelists/<bucket>/all.txt"
    assert [len(d) for d in streaming.test_sets] == [15, 15, 15]


@pytest.mark.parametrize("entry", ["../../outside.jpg 0", "/etc/passwd 0", "labeled_images/1/../../../x.jpg 1",
                                   "C:\\data\\x.jpg 0"])
def test_a_file_list_line_that_leaves_the_dataset_folder_is_refused(tmp_path, entry):
    base = write_neurips(tmp_path, splits=())
    all_txt = base / "training_folder" / "filelists" / "2" / "all.txt"
    all_txt.write_text(all_txt.read_text() + "\n" + entry)
    with pytest.raises(DataError, match=r"2/all\.txt line 16 names .*outside the dataset folder"):
        clear(protocol="streaming", data_dir=str(tmp_path), size=8, num_workers=0)


def test_bad_lines_and_class_names_are_refused(tmp_path):
    base = write_neurips(tmp_path, splits=())
    all_txt = base / "training_folder" / "filelists" / "1" / "all.txt"
    all_txt.write_text("labeled_images/1/bus/100.jpg 7\n")
    with pytest.raises(DataError, match="1/all.txt line 1 has class 7"):
        clear(protocol="streaming", data_dir=str(tmp_path), size=8, num_workers=0)
    all_txt.write_text("labeled_images/1/bus/100.jpg\n")
    with pytest.raises(DataError, match=r"1/all.txt line 1 is not `<path> <class>`"):
        clear(protocol="streaming", data_dir=str(tmp_path), size=8, num_workers=0)
    (base / "class_names.txt").write_text("BACKGROUND\n../../etc\nbus\n")
    with pytest.raises(DataError, match=r"class_names.txt line 2 names '../../etc'"):
        clear(protocol="streaming", data_dir=str(tmp_path), size=8, num_workers=0)


def test_missing_buckets_classes_and_dataset_are_named(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"clear10/train/labeled_images/<bucket>/<class>.*"
                                                   r"clear10-train.zip.*clear-benchmark.github.io"):
        clear(data_dir=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="clear100"):
        clear(variant="clear100", data_dir=str(tmp_path))
    base = write_release(tmp_path)
    import shutil

    shutil.rmtree(base / "test" / "labeled_images" / "2" / "bus")
    with pytest.raises(DataError, match=r"class folder .*test/labeled_images/2/bus is missing"):
        clear(data_dir=str(tmp_path), size=8)
    shutil.rmtree(base / "test" / "labeled_images" / "3")
    with pytest.raises(DataError, match=r"bucket folder .*test/labeled_images/3 is missing"):
        clear(data_dir=str(tmp_path), size=8, buckets=[1, 3])
    shutil.rmtree(base / "train" / "labeled_images" / "2")
    with pytest.raises(DataError, match=r"bucket folder .*train/labeled_images/2 is missing"):
        clear(data_dir=str(tmp_path), size=8)
    with pytest.raises(ValueError, match="protocol must be one of iid, streaming"):
        clear(protocol="future", data_dir=str(tmp_path))


def test_class_order_without_class_names_txt_and_chosen_buckets(tmp_path):
    base = write_release(tmp_path, buckets=(0, 1, 2, 3, 4))
    (base / "train" / "class_names.txt").unlink()
    (base / "test" / "class_names.txt").unlink()
    stream = clear(data_dir=str(tmp_path), size=8, num_workers=0, buckets=[4, 2], augment=True)
    assert stream.schedule["class_names"] == CLASSES  # sorted folder names: the curation script's order
    assert stream.schedule["buckets"] == [4, 2]
    assert all("/labeled_images/4/" in str(p) for p in _paths(stream.test_sets[0]))
    assert stream.transform.flip and stream.transform.crop_padding == 1
    assert stream.transform.describe()["mean"] == pytest.approx([0.485, 0.456, 0.406])
    described = stream.describe()
    assert described["n_experiences"] == 2 and [t["n_test"] for t in described["test_sets"]] == [6, 6]


def test_a_run_trains_on_clear_built_by_the_lab(tmp_path):
    """The scenario builds its own data: the lab calls it as `clear(data_dir=..., seed=..., **args)`."""
    import inspect

    from cl.api import run

    assert next(iter(inspect.signature(clear).parameters)) != "data"
    write_release(tmp_path, train=6)
    result, = run({"name": "clear", "seed": 0, "device": "cpu", "data_dir": str(tmp_path),
                  "stream": {"scenario": {"name": "clear", "size": 8, "num_workers": 0}},
                  "model": {"name": "mlp", "hidden": [16]},
                  "training": {"epochs": 3, "batch_size": 6, "optimizer": {"name": "sgd", "lr": 0.05}},
                  "strategies": [{"name": "replay", "memory_size": 6, "replay_batch_size": 3}]}, track=False)
    matrix = np.asarray(result["accuracy_matrix"], dtype=float)
    assert matrix.shape == (4, 3) and np.isfinite(matrix).all()  # the untrained model, then each bucket
    assert matrix[1, 0] == 1.0 and matrix[2, 1] == 1.0  # colour-coded classes: the buckets are learned
