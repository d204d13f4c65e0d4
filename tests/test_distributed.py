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


def cl_run(file: Path, devices: int, checkpoints: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "cl", "run", str(file), "--devices", str(devices), "--no-track",
               "--no-progress", "--json"]
    if checkpoints is not None:
        command += ["--checkpoint-dir", str(checkpoints)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=file.parent, timeout=120)


# batch 50 with 15 replayed rows: 65 rows a step, which 2 ranks share 33/32, and a last
# incoming batch smaller than the rest: the unequal shares must be weighted exactly.
@pytest.mark.parametrize("strategy", ["naive", {"name": "replay", "memory_size": 60, "replay_batch_size": 15},
                                      {"name": "derpp", "memory_size": 60, "replay_batch_size": 15}],
                         ids=["naive", "replay", "derpp"])
def test_two_processes_end_as_one(tmp_path, strategy):
    file = tiny_experiment(tmp_path, n_experiences=2, batch_size=50, strategies=[strategy])
    label = strategy if isinstance(strategy, str) else strategy["name"]
    results, states = {}, {}
    for devices in (1, 2):
        done = cl_run(file, devices, tmp_path / f"ckpt{devices}")
        assert done.returncode == 0, done.stderr
        results[devices] = json.loads(done.stdout.strip().splitlines()[-1])
        saved = torch.load(tmp_path / f"ckpt{devices}" / f"{label}.pt", weights_only=True)
        states[devices] = saved["state"]["model"]
    assert states[1].keys() == states[2].keys()
    for name, one in states[1].items():
        two = states[2][name]
        assert torch.linalg.vector_norm(one - two) <= 1e-4 * torch.linalg.vector_norm(one), name
    one, two = torch.tensor(results[1]["accuracy_matrix"]), torch.tensor(results[2]["accuracy_matrix"])
    assert torch.allclose(one, two, atol=0.005, equal_nan=True), (one, two)
    assert results[1]["iterations"] == results[2]["iterations"]
    assert results[2]["train_loss"] == pytest.approx(results[1]["train_loss"], rel=1e-4)


def test_strategy_not_yet_data_parallel_is_refused(tmp_path):
    file = tiny_experiment(tmp_path, n_experiences=2, strategies=["ewc"])
    done = cl_run(file, 2)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "ewc" in lines[0] and "not yet data-parallel" in lines[0], done.stderr
    assert not (tmp_path / "cl-journal").exists() or not any((tmp_path / "cl-journal").iterdir())
