"""The trainer in each setting: online/task-free, periodic evaluation, task-incremental multi-head."""
import numpy as np
import pytest
import torch

import conftest
from cl.models import MLP, MultiHeadClassifier
from evaluation.metrics import anytime_accuracy
from strategies import Naive, Replay, Strategy
from streams import blur, class_incremental, digits, online


@pytest.fixture(scope="module")
def base():
    return class_incremental(digits(), n_experiences=5)


def trainer_for(stream, strategies, **kw):
    """conftest's trainer (an MLP of 64 by SGD with momentum, or `model`), in batches of 10."""
    return conftest.trainer_for(stream, strategies, batch_size=10, **kw)


class BoundaryCounter(Strategy):
    def __init__(self, task_free):
        self.task_free = task_free
        self.boundaries = 0
        self.steps = 0

    def before_experience(self, ctx):
        self.boundaries += 1

    def after_experience(self, ctx, data):
        self.boundaries += 1

    def after_step(self, ctx, batch):
        self.steps += 1


def test_online_stream_trains_once_and_evaluates_per_task(base):
    stream = online(base, experience_size=10)
    free, aware = BoundaryCounter(task_free=True), BoundaryCounter(task_free=False)
    record = trainer_for(stream, [Replay(100, 10), free, aware]).fit(stream)
    assert record.accuracy_matrix.shape == (6, 5) and not np.isnan(record.accuracy_matrix).any()
    assert free.boundaries == 0  # a task-free strategy never sees a boundary
    assert aware.boundaries == 2 * len(stream)
    assert free.steps == len(stream)  # one batch of 10 per experience, one pass
    assert record.completed == len(stream)


def test_periodic_evaluation_gives_the_anytime_curve(base):
    record = trainer_for(base, [Naive()], eval_every=20).fit(base)
    n_steps = sum(-(-e.n_train // 10) for e in base)
    assert len(record.curve) == n_steps // 20
    assert [p["iteration"] for p in record.curve] == list(range(20, n_steps + 1, 20))
    first = record.curve[0]
    assert first["experience"] == 0 and first["acc_seen"] == pytest.approx(first["acc"][0])
    value = anytime_accuracy([p["acc_seen"] for p in record.curve])
    assert 0 < value < 1


def test_multihead_task_incremental(base):
    stream = class_incremental(digits(), n_experiences=5, task_labels=True)
    backbone = MLP(stream.input_shape, stream.n_classes, hidden=(64,))
    model = MultiHeadClassifier(backbone, stream.task_classes, stream.n_classes)
    record = trainer_for(stream, [Naive()], model=model).fit(stream)
    # With task labels every head answers only among its task's classes: little is forgotten.
    assert record.task_aware_matrix[-1].mean() > 0.9
    # The multi-head output is already task-restricted, so both readings agree.
    np.testing.assert_allclose(record.accuracy_matrix, record.task_aware_matrix)
    out = model(torch.zeros(3, 1, 8, 8), torch.tensor([0, 2, 4]))
    assert torch.isfinite(out[0, :2]).all() and torch.isinf(out[0, 2:]).all()
    assert torch.isfinite(out[1, 4:6]).all() and torch.isinf(out[1, :4]).all()


def test_task_aware_accuracy_beats_class_incremental_for_naive(base):
    record = trainer_for(base, [Naive()]).fit(base)
    assert record.task_aware_matrix[-1].mean() > record.accuracy_matrix[-1].mean() + 0.2


def test_blurry_boundaries_keep_the_previous_task_alive(base):
    plain = trainer_for(base, [Naive()]).fit(base).accuracy_matrix
    stream = blur(base, 0.2)
    blurred = trainer_for(stream, [Naive()]).fit(stream).accuracy_matrix
    assert blurred.shape == (6, 5)
    # The last experience also holds 20% of task 3's samples, so naive fine-tuning keeps task 3.
    assert plain[-1, 3] < 0.1 and blurred[-1, 3] > 0.5


def test_language_model_on_a_token_stream(two_texts):
    from cl.models import ByteGPT
    from streams import token_stream

    stream = token_stream(["abc", "xyz"], block_size=16, stride=4, data_dir=str(two_texts))
    record = conftest.trainer_for(stream, [Naive()], batch_size=16, epochs=2,
                                  model=lambda s: ByteGPT(s.input_shape, s.n_classes, n_layer=1, d_model=32),
                                  optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3)).fit(stream)
    R = record.accuracy_matrix
    assert R[0].max() < 0.1  # untrained: chance is 1/256
    assert R[1, 0] > 0.9 and R[2, 1] > 0.9  # each periodic text is learned byte by byte
    assert np.isfinite(record.train_loss).all()
