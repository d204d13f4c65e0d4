"""Data parallel (`cl run FILE --devices N`, issue 26): a run on 2 gloo processes is the run on
one, split. Each run is a `cl run` subprocess, as a user starts it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_experiment

ROOT = Path(__file__).resolve().parents[1]


def cl_run(file: Path, devices: int, checkpoints: Path | None = None, *more: str,
           tracking_uri: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CL_DIST_TIMEOUT": "60"}
    env.pop("WORLD_SIZE", None)
    track = ["--tracking-uri", tracking_uri] if tracking_uri else ["--no-track"]
    command = [sys.executable, "-m", "cl", "run", str(file), "--devices", str(devices), *track,
               "--no-progress", "--json", *more]
    if checkpoints is not None:
        command += ["--checkpoint-dir", str(checkpoints)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=file.parent, timeout=180)


# batch 50 with 15 replayed rows: 65 rows a step, which 2 ranks share 33/32, and a last
# incoming batch smaller than the rest: the unequal shares must be weighted exactly.
RUNS = {"naive": ["naive"], "replay": [{"name": "replay", "memory_size": 60, "replay_batch_size": 15}],
        "derpp": [{"name": "derpp", "memory_size": 60, "replay_batch_size": 15}]}


def test_two_processes_end_as_one(tmp_path):
    file = tiny_experiment(tmp_path, n_experiences=2, batch_size=50, strategies=None, runs=RUNS)
    results = {}
    for devices in (1, 2):
        done = cl_run(file, devices, tmp_path / f"ckpt{devices}")
        assert done.returncode == 0, done.stderr
        results[devices] = {r["name"]: r for r in json.loads(done.stdout.strip().splitlines()[-1])["runs"]}
    for label in RUNS:
        states = [torch.load(tmp_path / f"ckpt{d}" / f"{label}.pt", weights_only=True)["state"]["model"]
                  for d in (1, 2)]
        assert states[0].keys() == states[1].keys()
        for name, one in states[0].items():
            two = states[1][name]
            assert torch.linalg.vector_norm(one - two) <= 1e-4 * torch.linalg.vector_norm(one), (label, name)
        one, two = (torch.tensor(results[d][label]["accuracy_matrix"]) for d in (1, 2))
        assert torch.allclose(one, two, atol=0.005, equal_nan=True), (label, one, two)
        assert results[1][label]["iterations"] == results[2][label]["iterations"]
        assert results[2][label]["train_loss"] == pytest.approx(results[1][label]["train_loss"], rel=1e-4)


def test_strategy_not_data_parallel_is_refused(tmp_path):
    (tmp_path / "mine.py").write_text(
        "from strategies.base import Strategy\n\nclass Counts(Strategy):\n    pass\n")
    file = tiny_experiment(tmp_path, n_experiences=2, strategies=["naive", "mine:Counts"])
    done = cl_run(file, 2)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "mine:Counts" in lines[0] and "is not data-parallel" in lines[0] and "data_parallel = True" in lines[0], done.stderr
    assert not (tmp_path / "cl-journal").exists() or not any((tmp_path / "cl-journal").iterdir())


# A plugin beside the experiment that kills rank 1 (SIGKILL, as the OOM killer would) once,
# in the middle of the first experience, two steps after a checkpoint; a second attempt
# finds its marker and lets the run go on.
DIES_ONCE = """
import os, signal
from pathlib import Path
from strategies.base import Strategy

class DiesOnce(Strategy):
    data_parallel = True

    def after_step(self, ctx, batch):
        marker = Path(__file__).with_name("died")
        if ctx.rank == 1 and ctx.iteration == 6 and not marker.exists():
            marker.write_text("rank 1")
            os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_rank_ends_the_job_in_one_line_and_the_run_resumes(tmp_path, tracking_uri):
    from mlflow.tracking import MlflowClient

    (tmp_path / "dies.py").write_text(DIES_ONCE)
    strategies = [{"name": "replay", "memory_size": 60, "replay_batch_size": 15}, "dies:DiesOnce"]
    # Dropout: each process draws its own masks, which the checkpoint keeps for each.
    file = tiny_experiment(tmp_path, n_experiences=2, batch_size=50, checkpoint_every=4, strategies=strategies,
                           model={"name": "mlp", "hidden": [16], "dropout": 0.3})
    killed = cl_run(file, 2, tmp_path / "ckpt", tracking_uri=tracking_uri)
    assert killed.returncode == 1 and (tmp_path / "died").exists()
    lines = killed.stderr.strip().splitlines()
    assert len(lines) == 1, killed.stderr
    assert "rank 1 of 2 was killed (SIGKILL)" in lines[0] and "--resume" in lines[0] and "ckpt" in lines[0]
    (checkpoint,) = (tmp_path / "ckpt").glob("*.pt")
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["state"]["in_progress"] is not None  # a checkpoint inside the experience to go on from

    resumed = cl_run(file, 2, tmp_path / "ckpt", "--resume", tracking_uri=tracking_uri)
    assert resumed.returncode == 0, resumed.stderr
    whole = cl_run(file, 2, tmp_path / "whole")  # the same run, never interrupted (the marker is there)
    assert whole.returncode == 0, whole.stderr
    after, uninterrupted = (json.loads(d.stdout.strip().splitlines()[-1]) for d in (resumed, whole))
    assert after["accuracy_matrix"] == uninterrupted["accuracy_matrix"]
    assert after["iterations"] == uninterrupted["iterations"]
    one = torch.load(checkpoint, weights_only=True)["state"]["model"]
    two = torch.load(tmp_path / "whole" / checkpoint.name, weights_only=True)["state"]["model"]
    for name in one:
        assert torch.equal(one[name], two[name]), name

    # One MLflow child run for the (run, seed), failed by the kill and finished by the resume.
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    children = [r for r in runs if r.data.tags.get("cl.role") != "parent"]
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    assert after["mlflow_run_id"] == children[0].info.run_id
    history = client.get_metric_history(children[0].info.run_id, "acc_seen")
    assert sorted(m.step for m in history) == [1, 2]


def test_synchronised_batchnorm_is_one_process_batchnorm(tmp_path):
    """A BatchNorm model on 2 processes with `sync_batchnorm`: the whole batch's statistics
    (the gloo all-reduce on the CPU), so the weights and running statistics are one process's.
    Without it, each process normalises its own share, and the run says so. At a small
    learning rate: a reduced ResNet at lr 0.01 is chaotic enough on digits that two
    one-process runs at different thread counts already part."""
    model = {"name": "reduced_resnet18", "nf": 4}
    file = tiny_experiment(tmp_path, n_experiences=2, batch_size=50, model=model, sync_batchnorm=True, lr=0.001)
    states = []
    for devices in (1, 2):
        done = cl_run(file, devices, tmp_path / f"ckpt{devices}")
        assert done.returncode == 0, done.stderr
        states.append(torch.load(tmp_path / f"ckpt{devices}" / "naive.pt", weights_only=True)["state"]["model"])
    assert any("running_var" in name for name in states[0])
    for name, one in states[0].items():
        if one.is_floating_point():
            assert gap(one, states[1][name]) <= 1e-4, name
        else:
            assert torch.equal(one, states[1][name]), name

    # Without it each process normalises its own 25 rows: the same tolerance tells the runs apart.
    unsynced = tiny_experiment(tmp_path, "unsynced.yaml", n_experiences=2, batch_size=50, model=model, lr=0.001)
    done = cl_run(unsynced, 2, tmp_path / "unsynced")
    assert done.returncode == 0 and "training.sync_batchnorm: true" in done.stderr, done.stderr
    apart = torch.load(tmp_path / "unsynced" / "naive.pt", weights_only=True)["state"]["model"]
    assert max(gap(one, apart[name]) for name, one in states[0].items() if "running_var" in name) > 1e-3


def gap(one: torch.Tensor, two: torch.Tensor) -> float:
    """The relative distance of `two` from `one`."""
    return float(torch.linalg.vector_norm(one - two) / torch.linalg.vector_norm(one).clamp_min(1e-12))


def test_each_process_draws_its_own_dropout_masks_from_where_training_starts():
    """Two processes holding rows r and r + 1 must not share masks; the data order and the
    augmentations (the run's own generators) stay the same on both, and process 0 draws what
    one process would (a model GDumb re-initialises)."""
    from cl.training.seeds import RunGenerators

    draws = {}
    for rank in (0, 1, 0):
        torch.manual_seed(0)
        rng = RunGenerators(7, rank, 2)
        rng.split_global()
        draws.setdefault(rank, []).append((torch.rand(4), torch.rand(4, generator=rng.data)))
    (zero, zero_again), (one,) = draws[0], draws[1]
    assert torch.equal(zero[0], zero_again[0]) and not torch.equal(zero[0], one[0])
    assert torch.equal(zero[1], one[1])
    torch.manual_seed(0)
    assert torch.equal(torch.rand(4), zero[0])  # process 0 goes on with the run's own stream
    torch.manual_seed(0)
    alone = RunGenerators(7)
    before = torch.get_rng_state()
    alone.split_global()  # one process: the global generator as seeded
    assert torch.equal(torch.get_rng_state(), before)
