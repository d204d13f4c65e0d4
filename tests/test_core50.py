"""CORe50 read from the layout it is distributed in: each test writes a miniature of
`core50_128x128/s<session>/o<object>/C_<ss>_<oo>_<fff>.png` (11 sessions, objects o1-o10, i.e.
the first two categories, 2 frames each) and, where a test needs them, filelists in the
official `batches_filelists/<NI|NC|NIC>_inc/run<r>/` layout and line format."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from streams.core50 import OBJECT_NAMES, TEST_SESSIONS, TRAIN_SESSIONS, core50, nc_batches
from streams.sources import DatasetNotFoundError
from streams.validation import DataError

OBJECTS = range(1, 11)  # categories 0 (plug adapters) and 1 (mobile phones)
FRAMES = 2
EDGE = 8


def colour(session: int, obj: int) -> tuple[int, int, int]:
    """Every frame of (session, object) is one flat colour, so a decoded pixel says where it came from."""
    return 20 * session, 20 * obj, 7


def entry(session: int, obj: int, frame: int) -> str:
    return f"s{session}/o{obj}/C_{session:02d}_{obj:02d}_{frame:03d}.png"


def write_core50(root, objects=OBJECTS):
    images = root / "core50" / "core50_128x128"
    for s in range(1, 12):
        for o in objects:
            (images / f"s{s}" / f"o{o}").mkdir(parents=True)
            for f in range(FRAMES):
                Image.fromarray(np.full((EDGE, EDGE, 3), colour(s, o), dtype=np.uint8)).save(images / entry(s, o, f))
    return root / "core50"


def write_filelists(base, protocol: str, batches: list[list[tuple[int, int]]], label=lambda o: o - 1, run=0,
                    test_objects=OBJECTS):
    """Filelists of (session, object) units per batch, in the official line format, and the test list."""
    folder = base / "batches_filelists" / f"{protocol}_inc" / f"run{run}"
    folder.mkdir(parents=True)
    for i, units in enumerate(batches):
        lines = [f"{entry(s, o, f)} {label(o)}" for s, o in units for f in range(FRAMES)]
        (folder / f"train_batch_{i:02d}_filelist.txt").write_text("\n".join(lines) + "\n")
    test = [f"{entry(s, o, f)} {label(o)}" for s in TEST_SESSIONS for o in test_objects for f in range(FRAMES)]
    (folder / "test_filelist.txt").write_text("\n".join(test) + "\n")
    return folder


def labels_of(data) -> list[int]:
    return sorted(torch.unique(data.y).tolist())


def test_ni_from_the_folders_is_one_experience_per_training_session_tested_on_3_7_10(tmp_path, decoded):
    write_core50(tmp_path)
    stream = core50("ni", data_dir=str(tmp_path), size=EDGE, num_workers=0, seed=3)
    assert not decoded  # building the stream read folder names only
    assert len(stream) == 8 and stream.n_classes == 50 and stream.input_shape == (3, EDGE, EDGE)
    sessions = [int(s[1:]) for s in stream.schedule["order"]]
    assert sorted(sessions) == list(TRAIN_SESSIONS) and stream.schedule["filelists"] is None
    assert "not the order of the official run" in stream.schedule["note"]
    assert sessions != list(TRAIN_SESSIONS)  # drawn from the seed, as the official runs shuffle them
    assert core50("ni", data_dir=str(tmp_path), size=EDGE, num_workers=0, seed=3).schedule["order"] == \
        stream.schedule["order"]
    for e, s in zip(stream, sessions):
        assert e.classes == list(range(10)) and e.n_train == 10 * FRAMES and e.task_index == 0 and e.tasks == (0,)
        assert {p.split("/")[-3] for p in e.train.dataset.paths} == {f"s{s}"}
    # Domain-incremental: one test set, the whole of sessions 3, 7 and 10, shared by every experience.
    assert stream.n_tasks == 1 and all(e.test is stream.test_sets[0] for e in stream)
    test = stream.test_sets[0]
    assert len(test) == 3 * 10 * FRAMES and labels_of(test) == list(range(10))
    assert {p.split("/")[-3] for p in test.dataset.paths} == {"s3", "s7", "s10"}
    assert not stream.rows_follow_tasks and not stream.class_incremental and stream.eval_after == list(range(8))
    assert stream.seen_at_rows == [[0]] * 8
    info = stream.describe()
    assert info["n_experiences"] == 8 and info["n_tasks"] == 1 and info["test_sets"][0]["n_test"] == 60
    assert info["schedule"]["test_sessions"] == [3, 7, 10] and info["schedule"]["class_names"][5] == "mobile_phone1"
    assert not decoded
    # Reading a batch decodes its rows and no more; the pixels belong to the session and label.
    x, y, _ = next(stream[0].train.batches(3, shuffle=False))
    assert len(decoded) == 3 and x.shape == (3, 3, EDGE, EDGE) and x.dtype == torch.uint8
    for image, label in zip(x, y.tolist()):
        assert tuple(image[:, 0, 0].tolist()) == colour(sessions[0], label + 1)
    normalised = stream.transform(x)
    assert normalised.dtype == torch.float32
    assert stream.transform.describe()["mean"] == pytest.approx([0.485, 0.456, 0.406])  # ImageNet's


def test_nc_from_the_folders_follows_the_official_composition_in_a_seeded_order(tmp_path):
    write_core50(tmp_path)
    stream = core50("nc", data_dir=str(tmp_path), size=EDGE, num_workers=0, seed=0)
    # The official 9 batches (10 objects, then 8 of 5) restricted to o1-o10: o1+o6 first, then
    # the k-th object of categories 1-5, i.e. o(k)+o(5+k) here; the 4 batches of categories 6-10 are empty.
    assert [len(b) for b in nc_batches()] == [10] + [5] * 8
    assert sorted(o for b in nc_batches() for o in b) == list(range(1, 51))
    assert len(stream) == 5 and stream[0].classes == [0, 5]
    assert sorted(tuple(e.classes) for e in stream) == [(0, 5), (1, 6), (2, 7), (3, 8), (4, 9)]
    seen = set()
    for i, e in enumerate(stream):
        assert not seen & set(e.classes) and e.n_train == 2 * 8 * FRAMES  # 2 objects x 8 sessions
        seen |= set(e.classes)
        assert e.task_index == i and e.test is stream.test_sets[i] and labels_of(e.test) == e.classes
        assert len(e.test) == 2 * 3 * FRAMES and labels_of(e.train) == e.classes
    assert stream.class_order == [c for e in stream for c in e.classes]
    assert stream.one_experience_per_task and stream.class_incremental
    orders = {tuple(tuple(e.classes) for e in core50("nc", data_dir=str(tmp_path), size=EDGE, num_workers=0,
                                                     seed=seed)) for seed in range(6)}
    assert len(orders) > 1 and all(o[0] == (0, 5) for o in orders)  # the seed moves all but the first batch
    category = core50("nc", labels="category", data_dir=str(tmp_path), size=EDGE, num_workers=0)
    # The first NC batch holds one object of every category: by category it is new instances only.
    assert category.n_classes == 10 and category.n_tasks == 1 and all(e.classes == [0, 1] for e in category)


def test_the_official_filelists_set_the_batches_and_the_test_set(tmp_path, decoded):
    base = write_core50(tmp_path)
    order = [8, 1, 11, 4, 6, 2, 9, 5]
    write_filelists(base, "NI", [[(s, o) for o in OBJECTS] for s in order])
    # NC's filelists renumber the objects per run in the order they arrive (the CORe50 page says
    # so); classes come from the object folders all the same.
    nc = [[(s, o) for s in TRAIN_SESSIONS for o in group] for group in ([1, 6], [3, 8], [2, 7])]
    arrival = {o: i for i, o in enumerate([1, 6, 3, 8, 2, 7])}
    write_filelists(base, "NC", nc, label=arrival.get, test_objects=list(arrival))
    stream = core50("ni", data_dir=str(tmp_path), size=EDGE, num_workers=0)
    assert [int(p.split("/")[-3][1:]) for e in stream for p in e.train.dataset.paths[:1]] == order
    assert stream.schedule["filelists"].endswith("NI_inc/run0") and stream.n_tasks == 1
    nc_stream = core50("nc", data_dir=str(tmp_path), size=EDGE, num_workers=0)
    assert [e.classes for e in nc_stream] == [[0, 5], [2, 7], [1, 6]] and nc_stream.class_order == [0, 5, 2, 7, 1, 6]
    assert [labels_of(d) for d in nc_stream.test_sets] == [[0, 5], [2, 7], [1, 6]]
    # An official run's filelists are used as given, whatever the seed.
    assert [e.classes for e in core50("nc", data_dir=str(tmp_path), size=EDGE, num_workers=0, seed=9)] == \
        [[0, 5], [2, 7], [1, 6]]
    with pytest.raises(ValueError, match="run must lie in 0..9"):
        core50("ni", run=10, data_dir=str(tmp_path))
    assert not decoded


def test_nic_follows_its_filelists_exactly(tmp_path):
    base = write_core50(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"batches_filelists/NIC_inc/run0 is missing"):
        core50("nic", data_dir=str(tmp_path), num_workers=0)
    batches = [[(1, 1), (1, 6)], [(2, 2), (2, 3)], [(4, 1), (4, 6)], [(5, 2), (5, 7)], [(6, o) for o in OBJECTS]]
    folder = write_filelists(base, "NIC", batches, run=2)
    stream = core50("nic", run=2, data_dir=str(tmp_path), size=EDGE, num_workers=0)
    assert len(stream) == 5
    for e, name in zip(stream, sorted(folder.glob("train_batch_*"))):
        listed = [line.split()[0] for line in name.read_text().splitlines()]
        assert [p.split("core50_128x128/")[1] for p in e.train.dataset.paths] == listed  # same images, same order
        assert e.train.y.tolist() == [int(p.split("/")[1][1:]) - 1 for p in listed]
    assert [e.classes for e in stream] == [[0, 5], [1, 2], [0, 5], [1, 6], list(range(10))]
    # Tasks are the classes that arrive together: {0, 5}, {1, 2}, {6}, {3, 4, 7, 8, 9}.
    assert stream.task_classes == [[0, 5], [1, 2], [6], [3, 4, 7, 8, 9]]
    assert [e.tasks for e in stream] == [(0,), (1,), (0,), (1, 2), (0, 1, 2, 3)]
    assert [e.task_index for e in stream] == [0, 1, 0, None, None] and stream[3].test is None
    assert sum(len(d) for d in stream.test_sets) == 3 * 10 * FRAMES and stream.class_incremental
    assert not stream.rows_follow_tasks and stream.seen_at_rows[2] == [0, 1]


def test_category_labels(tmp_path):
    write_core50(tmp_path, objects=[1, 5, 6, 12])  # o12: scissors, category 2
    stream = core50("ni", labels="category", data_dir=str(tmp_path), size=EDGE, num_workers=0)
    assert stream.n_classes == 10 and stream.name == "core50-ni-category"
    assert stream[0].classes == [0, 1, 2] and labels_of(stream.test_sets[0]) == [0, 1, 2]
    assert sorted(stream[0].train.y.tolist()) == [0] * 4 + [1] * 2 + [2] * 2  # o1, o5 -> 0; o6 -> 1; o12 -> 2
    assert stream.schedule["class_names"][:3] == ["plug_adapter", "mobile_phone", "scissor"]
    assert OBJECT_NAMES[11] == "scissor2" and len(OBJECT_NAMES) == 50
    with pytest.raises(ValueError, match="'object'.*'category'"):
        core50("ni", labels="instance", data_dir=str(tmp_path))


@pytest.mark.parametrize("line", ["../../etc/passwd 0", "/etc/passwd 0", "s1/o1/../../../../etc/passwd 0",
                                  "s1/../../o1/C_01_01_000.png 0", "s12/o1/C_12_01_000.png 0",
                                  "s1/o51/C_01_51_000.png 0", "s1\\o1\\C_01_01_000.png 0", "s1/o1/C_01_01_000.png"])
def test_a_filelist_line_that_leaves_the_layout_is_refused(tmp_path, line):
    base = write_core50(tmp_path)
    folder = write_filelists(base, "NI", [[(s, 1)] for s in TRAIN_SESSIONS])
    batch = folder / "train_batch_03_filelist.txt"
    batch.write_text(batch.read_text() + line + "\n")
    with pytest.raises(DataError, match=r"train_batch_03_filelist.txt line 3 "):
        core50("ni", data_dir=str(tmp_path), num_workers=0)


def test_a_missing_dataset_names_the_layout_and_the_download(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"core50_128x128/s<1..11>.*core50_128x128\.zip"):
        core50("ni", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="protocol"):
        core50("nicv2", data_dir=str(tmp_path))


def test_the_experiment_file_path_describes_and_runs_core50(tmp_path, capsys):
    from cl.api import run
    from cl.cli.main import main

    write_core50(tmp_path)
    scenario = {"name": "core50", "protocol": "nc", "size": EDGE, "num_workers": 0}
    experiment = {"name": "core50-mini", "seed": 0, "device": "cpu", "data_dir": str(tmp_path),
                  "stream": {"scenario": scenario}, "model": {"name": "mlp", "hidden": [16]},
                  "training": {"epochs": 1, "batch_size": 8, "optimizer": {"name": "sgd", "lr": 0.05}},
                  "strategies": ["naive"]}
    path = tmp_path / "core50.yaml"
    path.write_text(json.dumps(experiment))  # JSON is YAML
    assert main(["describe", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("core50-nc: 5 experiences, 5 test sets, 50 classes, input (3, 8, 8)")
    assert "[0, 5]" in out and '"kind": "core50"' in out
    result, = run(experiment, track=False)
    matrix = np.asarray(result["accuracy_matrix"], dtype=float)
    assert matrix.shape == (6, 5) and np.isfinite(matrix).all()


def test_filelists_that_do_not_fit_the_images_are_refused(tmp_path):
    base = write_core50(tmp_path, objects=[1, 6])
    folder = write_filelists(base, "NI", [[(s, 1), (s, 6)] for s in TRAIN_SESSIONS], test_objects=[1, 6, 7])
    with pytest.raises(DataError, match=r"s3/o7, which is missing"):  # a filelist for another copy of the images
        core50("ni", data_dir=str(tmp_path), num_workers=0)
    (folder / "test_filelist.txt").write_text(f"{entry(3, 1, 0)} 0\n{entry(3, 1, 1)} 0\n")
    (folder / "train_batch_05_filelist.txt").unlink()
    with pytest.raises(DataError, match=r"lacks the training batches \[5\]"):
        core50("ni", data_dir=str(tmp_path), num_workers=0)
    (folder / "train_batch_05_filelist.txt").write_text(f"{entry(8, 1, 0)} 0\n")
    (folder / "test_filelist.txt").write_text(f"{entry(3, 1, 0)} 0\n{entry(3, 6, 0)} 5\n")
    for batch in folder.glob("train_batch_*"):
        batch.write_text(f"{entry(1, 1, 0)} 0\n")
    with pytest.raises(DataError, match=r"test set holds classes \[5\] that no training batch has"):
        core50("ni", data_dir=str(tmp_path), num_workers=0)
