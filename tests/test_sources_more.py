"""Data from users, the avalanche-lib bridge, multi-dataset and token streams."""
import json
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from cl.cli.main import main
from cl.models import ByteGPT
from conftest import tiny_experiment, trainer_for
from streams import class_incremental, from_avalanche, image_folder, multi_dataset, numpy_arrays, token_stream
from streams.sources import DatasetNotFoundError


def test_numpy_arrays(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "toy.npz", x_train=rng.integers(0, 256, (40, 6, 6, 3), dtype=np.uint8),
             y_train=np.repeat(np.arange(4), 10), x_test=rng.integers(0, 256, (8, 6, 6, 3), dtype=np.uint8),
             y_test=np.repeat(np.arange(4), 2))
    data = numpy_arrays("toy.npz", data_dir=str(tmp_path))
    assert data.train.x.shape == (40, 3, 6, 6) and data.n_classes == 4  # channels moved first
    stream = class_incremental(data, n_experiences=2)
    assert [e.n_train for e in stream] == [20, 20]
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="missing arrays"):
        numpy_arrays(str(tmp_path / "bad.npz"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        numpy_arrays(str(tmp_path / "none.npz"))


def test_image_folder(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for c, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            (tmp_path / "pets" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (10 + i, 12), colour).save(tmp_path / "pets" / split / c / f"{i}.png")
    data = image_folder("pets", data_dir=str(tmp_path), size=8)
    assert data.class_names == ["cat", "dog"]
    assert data.train.x.shape == (6, 3, 8, 8) and data.train.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.train.x[0, 0].float().mean() == 255 and data.train.x[3, 2].float().mean() == 255
    lazy = image_folder("pets", data_dir=str(tmp_path), size=8, in_memory=False, num_workers=0)
    assert lazy.train.y.tolist() == data.train.y.tolist() and lazy.input_shape == (3, 8, 8)
    assert torch.equal(lazy.train.x[torch.tensor([0, 4])], data.train.x[[0, 4]])
    with pytest.raises(ValueError, match="different sizes"):
        image_folder(str(tmp_path / "pets"))
    with pytest.raises(FileNotFoundError, match="expected train/ and test/"):
        image_folder(str(tmp_path / "nothing"))


class Squares(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((1, 4, 4), i % 256, dtype=torch.uint8), i % 3


def make_squares(data_dir, n_train=30):
    return Squares(n_train), Squares(9)


def test_torch_dataset_through_a_dataloader(tmp_path):
    from streams import torch_dataset

    data = torch_dataset(make_squares, kwargs={"n_train": 12})
    assert data.train.x.shape == (12, 1, 4, 4) and data.train.x.dtype == torch.uint8
    assert data.train.y.tolist() == [i % 3 for i in range(12)] and len(data.test) == 9


def test_avalanche_benchmark_converts_to_a_matching_stream(mnist_root):
    from avalanche.benchmarks.classic import SplitMNIST

    bench = SplitMNIST(n_experiences=5, seed=1, dataset_root=str(mnist_root))
    stream = from_avalanche(bench)
    assert len(stream) == len(bench.train_stream) == 5
    for exp, av, av_test in zip(stream, bench.train_stream, bench.test_stream):
        assert exp.classes == sorted(av.classes_in_this_experience)
        assert exp.task_label == av.task_label
        assert exp.n_train == len(av.dataset) and exp.n_test == len(av_test.dataset)
        x, y, *_ = av.dataset.train()[7]
        assert torch.equal(exp.train.x[7], x) and exp.train.y[7] == y
    # avalanche's shuffled class order is kept, not re-sorted.
    assert [c for e in stream for c in e.classes] == [c for av in bench.train_stream
                                                      for c in sorted(av.classes_in_this_experience)]


def test_multi_dataset_label_spaces(mnist_root):
    from cl.config.components import build_dataset

    stream = multi_dataset(["digits", {"name": "mnist", "download": False}],
                           lambda spec: build_dataset(spec, str(mnist_root)), size=16, channels=3)
    assert stream.n_classes == 20 and stream.input_shape == (3, 16, 16)
    assert stream.task_classes == [list(range(10)), list(range(10, 20))]
    assert [e.task_label for e in stream] == [0, 1]
    assert stream[1].train.y.min() == 10 and stream[1].n_train == 60_000
    x = stream[1].train.x[:50]
    assert torch.equal(x[:, 0], x[:, 1])  # grey images repeated over colour channels


def test_token_stream_bytes_and_targets(tmp_path):
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_bytes(bytes(range(200)) * 5)
    (tmp_path / "text" / "b.txt").write_text("é" * 600)
    stream = token_stream(["a", "b"], block_size=16, val_fraction=0.2, data_dir=str(tmp_path))
    assert stream.n_classes == 256 and stream.input_shape == (16,)
    a = stream[0]
    assert torch.equal(a.train.x[0].long(), torch.arange(16)) and torch.equal(a.train.y[0], torch.arange(1, 17))
    # Targets are the inputs shifted by one byte; validation comes from the held-out tail.
    assert torch.equal(a.train.x[:, 1:].long(), a.train.y[:, :-1])
    assert a.test.x[0, 0] == 800 % 200  # byte 800 of range(200) repeated
    assert set(stream[1].train.x.unique().tolist()) == {0xC3, 0xA9}  # UTF-8 of é
    with pytest.raises(DatasetNotFoundError, match="available there: a, b"):
        token_stream(["c"], data_dir=str(tmp_path))


def test_byte_gpt_is_causal():
    torch.manual_seed(0)
    model = ByteGPT((12,), 256, n_layer=1, d_model=32).eval()
    x = torch.randint(0, 256, (2, 12))
    y = x.clone()
    y[:, 8:] = (y[:, 8:] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(y)
    assert a.shape == (2, 12, 256)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-5) and not torch.allclose(a[:, 8:], b[:, 8:])


def test_cli_describe_and_streams(tmp_path, capsys):
    path = tiny_experiment(tmp_path, "pl.yaml", name="describe-test", scenario={
        "name": "power_law", "n_tasks": 5, "n_phases": 30, "phase_size": 32, "recurrence_size": 8})
    assert main(["describe", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_experiences"] == 30 and info["n_tasks"] == 5
    assert info["schedule"]["kind"] == "power_law" and len(info["schedule"]["focus"]) == 30
    assert main(["describe", str(path), "--set", "stream.online.experience_size=10"]) == 0
    out = capsys.readouterr().out
    assert "online-power_law-digits" in out
    assert main(["streams"]) == 0
    out = capsys.readouterr().out
    for name in ("class_incremental", "permuted", "rotated", "power_law", "multi_dataset", "token_stream",
                 "online", "blurry"):
        assert name in out


def test_scenario_needing_no_dataset_rejects_one(tmp_path, capsys):
    path = tmp_path / "md.yaml"
    path.write_text("name: x\nstream: {dataset: digits, scenario: {name: multi_dataset, datasets: [digits]}}\n"
                    "model: mlp\nstrategies: [naive]\n")
    assert main(["describe", str(path)]) == 2
    assert "takes its datasets as its own argument" in capsys.readouterr().err
    path.write_text("name: x\nstream: {scenario: class_incremental}\nmodel: mlp\nstrategies: [naive]\n")
    assert main(["describe", str(path)]) == 2
    assert "stream.dataset: required key is missing" in capsys.readouterr().err


def test_avalanche_scenario_from_an_experiment_file(tmp_path, mnist_root, capsys):
    path = tmp_path / "av.yaml"
    path.write_text(textwrap.dedent(f"""
        name: av
        data_dir: {mnist_root}
        stream:
          scenario: {{name: avalanche, benchmark: "avalanche.benchmarks.classic:SplitMNIST",
                     args: {{n_experiences: 5, seed: 0, fixed_class_order: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}}}}
        model: mlp
        strategies: [naive]
    """))
    assert main(["describe", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [e["classes"] for e in info["experiences"]] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert [e["n_train"] for e in info["experiences"]] == [12665, 12089, 11263, 12183, 11800]


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's digits served item by item, as a user's on-disk dataset would be."""

    def __init__(self, data):
        self.data, self.targets = data, data.y

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data.x[i], int(self.data.y[i])


def make_digits(data_dir):
    from streams import digits

    d = digits()
    return DigitsDataset(d.train), DigitsDataset(d.test)


@pytest.mark.parametrize("strategy", ["naive", "replay", "cumulative"])
def test_dataloader_path_trains_exactly_like_the_tensor_path(strategy):
    from strategies import Cumulative, Naive, Replay
    from streams import digits, torch_dataset
    from streams.lazy import LazyData

    def run(data):
        stream = class_incremental(data, n_experiences=5)
        s = {"naive": Naive, "cumulative": Cumulative, "replay": lambda: Replay(50, 8, "class_balanced")}[strategy]()
        return trainer_for(stream, [s], batch_size=16, hidden=(32,), momentum=0).fit(stream).accuracy_matrix

    ref = digits()
    lazy = torch_dataset(make_digits, in_memory=False, num_workers=2,
                         mean=ref.transform.mean.tolist(), std=ref.transform.std.tolist())
    assert isinstance(lazy.train, LazyData) and lazy.input_shape == (1, 8, 8)
    np.testing.assert_allclose(run(lazy), run(ref), atol=1e-6)
