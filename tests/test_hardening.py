"""Wrong numbers and wrong data stop a run with one clear line; threads, progress and the
Python API behave as documented."""
import json
import re
import textwrap

import numpy as np
import pytest
import torch

from cl.cli.main import main
from cl.config.schema import TrainingConfig
from cl.training.nonfinite import NonFiniteLossError
from cl.training.trainer import LifelongTrainer
from strategies import Strategy
from streams import class_incremental, digits

from conftest import tiny_config, tiny_experiment, trainer_for, write_experiment as write


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, which are not JSON."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)




# ------------------------------------------------------------------ non-finite loss
def test_too_high_a_learning_rate_fails_the_run_with_valid_json(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    path = tiny_experiment(tmp_path, lr=1.0e12)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code = main(["run", str(path), "--json", "--no-progress", "--tracking-uri", uri])
    out, err = capsys.readouterr()
    assert code == 1
    result = strict_json(out.strip().splitlines()[-1])
    assert result["status"] == "FAILED" and "non-finite training loss" in result["error"]
    assert "in experience 1 of 5, at iteration" in result["error"] and "Traceback" not in err
    run = MlflowClient(uri).get_run(result["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert "non-finite training loss" in run.data.tags["failure_reason"]


def test_other_runs_of_a_file_go_on_after_one_fails(tmp_path, capsys):
    (tmp_path / "poison.py").write_text(textwrap.dedent(POISON))
    path = tiny_experiment(tmp_path, strategies=None,
                           runs={"ok": ["naive"], "bad": [{"name": "poison:NaNAt", "iteration": 3}]})
    assert main(["run", str(path), "--json", "--no-track", "--no-progress"]) == 1
    out = strict_json(capsys.readouterr().out.strip().splitlines()[-1])
    status = {r["name"]: r["status"] for r in out["runs"]}
    assert status == {"ok": "FINISHED", "bad": "FAILED"}
    assert "at iteration 3 (step 4 of that experience)" in out["runs"][1]["error"]


POISON = """
import torch
from strategies import Strategy


class NaNAt(Strategy):
    '''Adds a NaN loss term at one iteration.'''

    def __init__(self, iteration: int = 3):
        self.iteration = iteration

    def extra_loss(self, ctx, batch):
        if ctx.iteration == self.iteration:
            return {"poison": batch.logits.sum() * float("nan")}
        return None
"""


class NaNAt(Strategy):
    def __init__(self, iterations):
        self.iterations = set(iterations)

    def extra_loss(self, ctx, batch):
        if ctx.iteration in self.iterations:
            return {"poison": batch.logits.sum() * float("inf") - batch.logits.sum() * float("inf")}
        return None


def _trainer(stream, nonfinite, iterations):
    """A linear model by plain SGD, its loss made NaN at `iterations`."""
    trainer = trainer_for(stream, [NaNAt(iterations)], batch_size=64, nonfinite=nonfinite, momentum=0,
                          model=lambda s: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)))
    return trainer, trainer.model


def test_stop_names_the_experience_and_iteration_and_leaves_the_weights_finite():
    stream = class_incremental(digits(), n_experiences=5)
    first = -(-len(stream[0].train) // 64)  # iterations of the first experience
    trainer, model = _trainer(stream, "stop", [first + 2])
    with pytest.raises(NonFiniteLossError,
                       match=rf"experience 2 of 5, at iteration {first + 2} \(step 3 of that experience\)"):
        trainer.fit(stream)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_drops_exactly_the_bad_steps():
    stream = class_incremental(digits(), n_experiences=5)
    trainer, model = _trainer(stream, "skip", [2, 5, 14])
    record = trainer.fit(stream)
    assert record.skipped_steps == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert np.isfinite(record.train_loss).all() and record.accuracy_matrix[-1].mean() > 0.1


# ------------------------------------------------------------------ bad data
def npz(tmp_path, name="data.npz", **changes):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 255, (40, 6, 6), dtype=np.uint8), "y_train": np.arange(40) % 4,
              "x_test": rng.integers(0, 255, (20, 6, 6), dtype=np.uint8), "y_test": np.arange(20) % 4}
    arrays.update(changes)
    np.savez(tmp_path / name, **arrays)
    return tmp_path / name


NUMPY_EXP = """
name: bad-data
device: cpu
stream: {dataset: {name: numpy, path: PATH}, scenario: {name: class_incremental, n_experiences: 2}}
model: {name: mlp, hidden: [8]}
strategies: [naive]
"""


def one_line_error(tmp_path, capsys, data_path, *expected, text=NUMPY_EXP):
    from mlflow.tracking import MlflowClient

    path = write(tmp_path, text.replace("PATH", str(data_path)), "bad.yaml")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["run", str(path), "--no-progress", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for part in expected:
        assert part in err, err
    client = MlflowClient(uri)
    running = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
               if r.info.status == "RUNNING"]
    assert not running
    return err


def test_float_labels_are_refused_not_truncated(tmp_path, capsys):
    y = (np.arange(40) % 4).astype(float)
    y[[3, 7]] = 1.5
    one_line_error(tmp_path, capsys, npz(tmp_path, y_train=y), "data.npz", "y_train", "2 rows (3, 7)", "whole numbers")


def test_whole_float_labels_are_accepted(tmp_path, capsys):
    path = write(tmp_path, NUMPY_EXP.replace("PATH", str(npz(tmp_path, y_train=(np.arange(40) % 4).astype(float)))))
    assert main(["run", str(path), "--no-track", "--no-progress"]) == 0


def test_negative_labels_are_named(tmp_path, capsys):
    y = np.arange(20) % 4
    y[5] = -1
    one_line_error(tmp_path, capsys, npz(tmp_path, y_test=y), "y_test", "1 row (5)", "negative")


def test_nan_inputs_are_named(tmp_path, capsys):
    x = np.random.default_rng(0).random((40, 6, 6)).astype(np.float32)
    x[12, 2, 2] = np.nan
    x[30, 0, 0] = np.inf
    one_line_error(tmp_path, capsys, npz(tmp_path, x_train=x, x_test=np.zeros((20, 6, 6), np.float32)),
                   "x_train", "NaN or infinite", "2 rows (12, 30)")


def test_train_and_test_of_different_shapes(tmp_path, capsys):
    one_line_error(tmp_path, capsys, npz(tmp_path, x_test=np.zeros((20, 7, 7), np.uint8)),
                   "x_train", "(1, 6, 6)", "(1, 7, 7)")


def test_rows_and_labels_of_different_lengths(tmp_path, capsys):
    one_line_error(tmp_path, capsys, npz(tmp_path, y_train=np.arange(39) % 4), "x_train has 40 rows but y_train has 39")


def test_an_experience_without_test_samples(tmp_path, capsys):
    one_line_error(tmp_path, capsys, npz(tmp_path, y_test=np.arange(20) % 2),
                   "task 1 (classes [2, 3]) has no test samples")


def test_a_corrupt_npz_is_not_reported_missing(tmp_path, capsys):
    path = npz(tmp_path)
    path.write_bytes(path.read_bytes()[:300])
    err = one_line_error(tmp_path, capsys, path, "data.npz", "corrupt or truncated")
    assert "not found" not in err and "does not exist" not in err


def test_a_truncated_mnist_file_is_not_reported_missing(tmp_path, capsys):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    # Well-formed headers (IDX magic numbers and sizes) over data that is cut short.
    (raw / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + (60000).to_bytes(4, "big")
                                                  + (28).to_bytes(4, "big") * 2 + bytes(1000))
    (raw / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + (60000).to_bytes(4, "big") + bytes(60000))
    (raw / "t10k-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big")
                                                 + (28).to_bytes(4, "big") * 2 + bytes(10 * 28 * 28))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(10))
    path = tiny_experiment(tmp_path, "mnist.yaml", dataset={"name": "mnist", "download": False},
                           data_dir=str(tmp_path))
    assert main(["run", str(path), "--no-track", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "corrupt or truncated" in err and "train-images-idx3-ubyte" in err
    assert "not found" not in err


def test_a_truncated_image_is_named(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "test"):
        for c in ("a", "b"):
            folder = tmp_path / "imgs" / split / c
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
    bad = tmp_path / "imgs" / "train" / "b" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])
    text = NUMPY_EXP.replace("{name: numpy, path: PATH}", f"{{name: image_folder, root: {tmp_path / 'imgs'}}}")
    one_line_error(tmp_path, capsys, None, str(bad), "corrupt or truncated", text=text)


def test_debug_shows_the_traceback(tmp_path):
    path = write(tmp_path, NUMPY_EXP.replace("PATH", str(npz(tmp_path, y_train=np.arange(40) % 4 - 1))))
    from streams.validation import DataError

    with pytest.raises(DataError):
        main(["run", str(path), "--no-track", "--no-progress", "--debug"])


# ------------------------------------------------------------------ threads, progress
def test_thread_count_is_set_from_the_file_and_logged(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    before = torch.get_num_threads()
    path = tiny_experiment(tmp_path, threads=1)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["run", str(path), "--json", "--no-progress", "--tracking-uri", uri]) == 0
    result = strict_json(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["threads"] == 1
    run = MlflowClient(uri).get_run(result["mlflow_run_id"])
    assert run.data.params["torch_threads"] == "1" and run.data.params["threads"] == "1"
    assert torch.get_num_threads() == before  # restored after the run


def test_default_thread_count_is_the_usable_cores():
    import os

    from cl.training.devices import usable_cores

    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))


def test_progress_false_prints_only_the_final_result(tmp_path, capfd):
    path = tiny_experiment(tmp_path, progress=False, strategies=["joint"])
    assert main(["run", str(path), "--no-track"]) == 0
    out, err = capfd.readouterr()
    assert err == ""
    assert out.splitlines()[0].startswith("tiny (seed 0, 1 run)") and "joint" in out


def test_joint_says_it_has_nothing_to_train(tmp_path, capfd):
    path = tiny_experiment(tmp_path, strategies=["joint"])
    assert main(["run", str(path), "--no-track"]) == 0
    err = capfd.readouterr().err
    assert "experience 2/5: nothing to train (Joint gave no training data here)" in err
    assert not re.search(r"\b0it\b|=nan", err), err


def test_describe_numbers_experiences_from_one(tmp_path, capsys):
    path = tiny_experiment(tmp_path)
    assert main(["describe", str(path)]) == 0
    out = capsys.readouterr().out
    assert "evaluated after experiences: 1, 2, 3, 4, 5" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2", "3", "4", "5"]


# ------------------------------------------------------------------ Python API
def test_python_api_runs_a_file_and_a_dict_to_the_same_result(tmp_path):
    import cl

    path = tiny_experiment(tmp_path)
    from_file = cl.run(str(path), overrides=["seed=1"])
    from_dict = cl.run(tiny_config(seed=1))
    assert from_file[0]["accuracy_matrix"] == from_dict[0]["accuracy_matrix"]
    assert 0.1 < from_file[0]["acc"] <= 1 and from_file[0]["mlflow_run_id"] is None
    with pytest.raises(ValueError, match="strategies.0.name"):
        cl.run(tiny_config(strategies=["no_such_strategy"]))


def test_python_api_objects_assembled_by_hand():
    from cl.models import MLP
    from strategies import Replay
    from streams import digits

    stream = class_incremental(digits(), n_experiences=5)
    torch.manual_seed(0)
    model = MLP(input_shape=stream.input_shape, n_classes=stream.n_classes, hidden=[32])
    trainer = LifelongTrainer(model, torch.optim.SGD(model.parameters(), lr=0.05), [Replay(memory_size=100)],
                              TrainingConfig(batch_size=32))
    record = trainer.fit(stream)
    assert record.accuracy_matrix.shape == (6, 5) and record.accuracy_matrix[-1].mean() > 0.3


def test_list_views_show_whole_one_line_summaries(capsys):
    for kind in ("strategies", "models", "datasets", "scenarios"):
        assert main([kind]) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("<timm")]
        assert lines and all(line.rstrip().endswith(".") for line in lines), (kind, lines)
