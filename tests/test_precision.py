"""Mixed precision (`training.precision`): every strategy trains under bf16-mixed with its state in
the precision it needs, accuracy stays that of float32, float16's skipped steps are not counted,
and float32 runs as it did (no autocast, no scaler)."""
import contextlib
import math

import numpy as np
import pytest
import torch

from cl.config.schema import TrainingConfig
from strategies import STRATEGIES, MomentumWeights, Strategy
from test_catalogue import ON_A_VIT, SMALL, vit_trainer_for
from conftest import trainer_for

HALF = (torch.bfloat16, torch.float16)


def half_tensors(tree, where="state") -> list[str]:
    """Where in a state dict a tensor is held in bfloat16 or float16."""
    if isinstance(tree, torch.Tensor):
        return [where] if tree.dtype in HALF else []
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in half_tensors(v, f"{where}.{k}")]
    if isinstance(tree, (list, tuple)):
        return [p for i, v in enumerate(tree) for p in half_tensors(v, f"{where}[{i}]")]
    return []


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_trains_under_bf16_with_its_state_in_full_precision(name, small_stream):
    build = vit_trainer_for if name in ON_A_VIT else trainer_for
    trainer = build(small_stream, [STRATEGIES[name](**SMALL.get(name, {}))], seed=1, batch_size=64,
                    precision="bf16-mixed")
    record = trainer.fit(small_stream, stop_after=3)  # nonfinite: stop, so a NaN or inf loss fails here
    assert record.skipped_steps == 0
    assert all(math.isfinite(v) for v in record.train_loss if not math.isnan(v))  # NaN: nothing trained (Joint)
    assert half_tensors(trainer.strategies[0].state_dict()) == []
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


@pytest.mark.parametrize("name, kw", [("replay", {"memory_size": 200}), ("der", {"memory_size": 200}),
                                      ("nearest_mean", {})])
def test_bf16_accuracy_is_float32s_on_split_digits(name, kw, stream):
    acc = {p: trainer_for(stream, [STRATEGIES[name](**kw)], batch_size=32, precision=p).fit(stream)
           .accuracy_matrix[-1].mean() for p in ("32", "bf16-mixed")}
    assert abs(acc["bf16-mixed"] - acc["32"]) <= 0.02, acc


def test_float32_has_no_autocast_and_no_scaler(small_stream):
    precision = trainer_for(small_stream, []).precision
    assert precision.autocast is contextlib.nullcontext and precision.scaler is None


def test_evaluation_runs_under_the_same_autocast(small_stream):
    dtypes = []

    class Spy(Strategy):
        def predict(self, ctx, x, t):
            logits = ctx.forward(x, t)
            dtypes.append(logits.dtype)
            return logits.float()

    trainer_for(small_stream, [Spy()], precision="bf16-mixed").fit(small_stream, stop_after=1)
    assert dtypes and set(dtypes) == {torch.bfloat16}


class InfGradient(torch.autograd.Function):
    """The identity, whose gradient is infinite."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, math.inf)


class InfAt(Strategy):
    """A loss term worth 0 whose gradient is infinite, at the iterations `at`; counts the steps
    it is told of (`after_step`) and keeps the weights before each iteration."""

    def __init__(self, at):
        self.at, self.steps, self.before = set(at), 0, {}

    def before_iteration(self, ctx):
        self.before[ctx.iteration] = [p.detach().clone() for p in ctx.model.parameters()]

    def extra_loss(self, ctx, batch):
        if ctx.iteration in self.at:
            return {"inf_gradient": 0 * InfGradient.apply(batch.logits).sum()}
        return None

    def after_step(self, ctx, batch):
        self.steps += 1


def test_a_float16_step_with_inf_gradients_is_skipped_and_not_counted(small_stream):
    spy, momentum = InfAt(at=[2, 5]), MomentumWeights(tau=0.9, every=1)  # MomentumWeights counts its steps
    trainer = trainer_for(small_stream, [spy, momentum], batch_size=16, precision="16-mixed")
    record = trainer.fit(small_stream, stop_after=1)  # 120 rows: 8 batches, 2 of them skipped
    assert record.skipped_steps == 2
    assert spy.steps == momentum.steps == 6
    assert record.rows_trained == 120 - 2 * 16
    after = dict(zip(range(8), list(spy.before.values())[1:] + [list(trainer.model.parameters())]))
    for it in (2, 5):  # the weights after a skipped iteration are those before it
        assert all(torch.equal(a, b) for a, b in zip(spy.before[it], after[it]))
    assert not all(torch.equal(a, b) for a, b in zip(spy.before[3], after[3]))
    assert trainer.precision.scaler.get_scale() == 2.0 ** 16 / 4  # halved at each skip


def test_a_float16_run_trains_on_the_cpu(small_stream):
    # torch 2.14 autocasts to float16 on the CPU and its GradScaler runs there: 16-mixed is not refused.
    record = trainer_for(small_stream, [], precision="16-mixed").fit(small_stream, stop_after=2)
    assert np.isfinite(record.accuracy_matrix[:3]).all() and record.accuracy_matrix[2, 1] > 0.5


def test_precision_settings_as_an_experiment_file_writes_them():
    assert TrainingConfig(precision=32).precision == "32"  # YAML reads `32` as a number
    assert TrainingConfig(precision="bf16").precision == "bf16-mixed"
    assert TrainingConfig(precision=16).precision == "16-mixed"
    with pytest.raises(ValueError):
        TrainingConfig(precision="64")
