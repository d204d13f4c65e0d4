"""What a run costs (`cl.training.cost`): FLOPs per sample against the hand count, what a
strategy adds to a step, the bytes a memory holds, and the cost columns reaching `--json`,
the MLflow child run and `cl compare`."""
import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from cl.cli.main import main
from cl.training.cost import StepCost, counted_experiences, run_cost
from conftest import tiny_experiment, trainer_for
from strategies.der import DER
from strategies.naive import Naive
from strategies.replay import Replay

COST_KEYS = ("params_total", "params_trainable", "train_flops_per_sample", "train_flops", "eval_flops_per_sample",
             "strategy_state_bytes", "peak_memory_bytes", "samples_per_s")


def forward_flops(widths):
    """FlopCounterMode's count of one row through Linear layers of these widths: 2·in·out each."""
    return sum(2 * a * b for a, b in zip(widths, widths[1:]))


def train_flops(widths):
    """Forward, then backward at twice the forward (input and weight gradients), except the first
    layer, whose input needs no gradient: its weight gradient only."""
    return 3 * forward_flops(widths) - 2 * widths[0] * widths[1]


def fit_counted(stream, strategies, **kw):
    trainer = trainer_for(stream, strategies, **kw)
    steps = StepCost(trainer)
    trainer.fit(stream)
    steps.close()
    return trainer, steps, run_cost(trainer, stream, trainer.model, steps)


def test_mlp_flops_per_sample_equal_the_hand_count(stream):
    widths = [64, 32, 16, 10]  # 8x8 digits, two hidden layers, ten classes
    trainer, steps, cost = fit_counted(stream, [Naive()], hidden=(32, 16), batch_size=32)
    assert cost["eval_flops_per_sample"] == forward_flops(widths)
    assert cost["train_flops_per_sample"] == train_flops(widths)
    assert set(steps.step_flops) == set(range(5))  # one step counted per experience
    assert cost["train_flops"] == train_flops(widths) * 32 * trainer.record.iteration  # every step counted at a full batch
    assert cost["params_total"] == cost["params_trainable"] == sum(p.numel() for p in trainer.model.parameters())


def test_counting_leaves_the_run_as_it_was(stream):
    counted, _, _ = fit_counted(stream, [DER(memory_size=50, replay_batch_size=8)], batch_size=32)
    plain = trainer_for(stream, [DER(memory_size=50, replay_batch_size=8)], batch_size=32)
    plain.fit(stream)
    assert (counted.record.accuracy_matrix == plain.record.accuracy_matrix).all()
    for a, b in zip(counted.model.state_dict().values(), plain.model.state_dict().values()):
        assert torch.equal(a, b)
    assert not any(isinstance(s, StepCost) for hook in counted.hooks.values() for s in hook)  # gone once closed


def test_der_step_exceeds_naive_by_its_replay_forwards(stream):
    widths, replayed = [64, 16, 10], 8
    _, naive, _ = fit_counted(stream, [Naive()], hidden=(16,), batch_size=32)
    _, der, _ = fit_counted(stream, [DER(memory_size=50, replay_batch_size=replayed)], hidden=(16,), batch_size=32)
    # Halfway through each experience, the first included, the memory is filled: every counted
    # step replays `replayed` rows, forward and backward, on top of Naive's.
    for k in range(5):
        assert der.step_flops[k] - naive.step_flops[k] == replayed * train_flops(widths)


def test_a_replay_memory_holds_its_tensors_bytes(stream):
    replay = Replay(memory_size=40, replay_batch_size=8)
    trainer, _, cost = fit_counted(stream, [replay], hidden=(16,), batch_size=32)
    stored = replay.buffer.data
    assert replay.buffer.size == 40 and {"x", "y", "t"} <= set(stored)
    held = sum(v[:40].numel() * v.element_size() for v in stored.values())
    assert replay.state_bytes() == held == cost["strategy_state_bytes"] > 0
    assert cost["strategy_state_bytes_by"] == {"Replay": held}


def test_long_streams_count_few_experiences():
    assert counted_experiences(5) == set(range(5))
    chosen = counted_experiences(1000)
    assert len(chosen) == 16 and {0, 999} <= chosen


def test_cost_reaches_json_mlflow_and_compare(tmp_path, tracking_uri, capsys):
    file = tiny_experiment(tmp_path, "cost.yaml", name="cost-test", hidden=(16,), batch_size=32, strategies=None,
                           runs={"naive": ["naive"], "der": [{"name": "der", "memory_size": 50,
                                                             "replay_batch_size": 8}]})
    assert main(["run", str(file), "--json", "--no-progress", "--tracking-uri", tracking_uri]) == 0
    runs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"]
    client = MlflowClient(tracking_uri)
    for r in runs:
        assert all(isinstance(r[k], (int, float)) and r[k] > 0 for k in COST_KEYS if k != "strategy_state_bytes")
        assert r["peak_memory_of"] == "process_rss"
        metrics = client.get_run(r["mlflow_run_id"]).data.metrics
        for key in COST_KEYS:
            assert metrics[key] == pytest.approx(r[key])
    naive, der = runs
    assert der["train_flops_per_sample"] > naive["train_flops_per_sample"]
    assert der["strategy_state_bytes"] > naive["strategy_state_bytes"] == 0

    assert main(["compare", "cost-test", "--tracking-uri", tracking_uri, "--format", "csv"]) == 0
    head = capsys.readouterr().out.splitlines()[0].split(",")
    for column in ("train_flops_per_sample", "train_flops", "strategy_state_bytes", "peak_memory_bytes"):
        assert f"{column}_mean" in head


def test_flop_counting_can_be_skipped(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CL_COUNT_FLOPS", "0")
    file = tiny_experiment(tmp_path, "skip.yaml", hidden=(16,), n_experiences=2)
    assert main(["run", str(file), "--json", "--no-progress", "--no-track"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = result["runs"][0] if "runs" in result else result
    assert "train_flops" not in result and "eval_flops_per_sample" not in result
    assert result["params_total"] > 0 and result["peak_memory_bytes"] > 0
