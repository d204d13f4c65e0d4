"""The lifelong trainer: the loop, hook order, composition, and exact resumption."""
import numpy as np
import pytest
import torch

from cl.config.schema import TrainingConfig
from cl.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cl.models import MLP
from conftest import trainer_for
from strategies import Cumulative, Joint, Naive, Replay, Strategy
from streams import class_incremental, digits


def make_trainer(stream, strategies, seed=0, epochs=3, batch_size=16, **kw):
    """Three epochs over an MLP with dropout, its LR stepped down every 4 epochs."""
    torch.manual_seed(seed)
    model = MLP(stream.input_shape, stream.n_classes, hidden=(128,), dropout=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.8)
    return trainer_for(stream, strategies, seed, batch_size, model=model, optimizer=opt, scheduler=sched,
                       epochs=epochs, **kw)


def test_accuracy_matrix_shape_and_untrained_row(stream):
    record = make_trainer(stream, [Naive()]).fit(stream)
    R = record.accuracy_matrix
    assert R.shape == (6, 5) and not np.isnan(R).any()
    assert ((R >= 0) & (R <= 1)).all()
    # Fine-tuning on disjoint classes: each new experience is learned, the old ones are lost.
    assert all(R[i, i - 1] > 0.9 for i in range(1, 6))
    assert R[5, :4].max() < 0.1
    assert len(record.train_loss) == 5 and record.train_time_s > 0


def test_replay_beats_naive(stream):
    naive = make_trainer(stream, [Naive()]).fit(stream).accuracy_matrix[-1].mean()
    replay = make_trainer(stream, [Replay(200, 16, "class_balanced")]).fit(stream).accuracy_matrix[-1].mean()
    assert replay > naive + 0.4


def test_joint_trains_once_on_everything(stream):
    record = make_trainer(stream, [Joint()]).fit(stream)
    R = record.accuracy_matrix
    assert R[1].min() > 0.85  # every task learned in the first experience
    assert np.allclose(R[1:], R[1])  # later experiences change nothing
    assert all(np.isnan(loss) for loss in record.train_loss[1:])  # no batch was trained on


def test_cumulative_trains_on_all_seen(stream):
    seen_sizes = []

    class Spy(Strategy):
        def after_experience(self, ctx, data):
            seen_sizes.append(len(data))

    make_trainer(stream, [Cumulative(), Spy()]).fit(stream)
    assert seen_sizes == list(np.cumsum([e.n_train for e in stream]))


class Recorder(Strategy):
    def __init__(self, log, tag):
        self.log, self.tag = log, tag

    def before_experience(self, ctx):
        assert ctx.model.training  # hooks run after the model is put in train mode
        self.log.append((self.tag, "before_experience"))

    def adapt_batch(self, ctx, batch):
        self.log.append((self.tag, "adapt_batch"))
        batch.append(self, batch.x_raw[:1], batch.y[:1], batch.t[:1])

    def extra_loss(self, ctx, batch):
        self.log.append((self.tag, "extra_loss", len(batch.y)))
        return None

    def after_backward(self, ctx, batch):
        assert all(p.grad is not None for p in ctx.model.parameters())
        self.log.append((self.tag, "after_backward"))

    def after_step(self, ctx, batch):
        self.log.append((self.tag, "after_step", batch.n_incoming, len(batch.logits)))

    def after_experience(self, ctx, data):
        self.log.append((self.tag, "after_experience"))


def test_hooks_run_in_order_and_compose(stream):
    log = []
    short = class_incremental(digits(), n_experiences=5)
    trainer = make_trainer(short, [Recorder(log, "a"), Recorder(log, "b")], epochs=1,
                           batch_size=1000)  # one batch per experience
    trainer.fit(short, stop_after=1)
    n = short[0].n_train
    assert log == [
        ("a", "before_experience"), ("b", "before_experience"),
        ("a", "adapt_batch"), ("b", "adapt_batch"),
        ("a", "extra_loss", n + 2), ("b", "extra_loss", n + 2),  # both adaptations reached the loss
        ("a", "after_backward"), ("b", "after_backward"),
        ("a", "after_step", n, n + 2), ("b", "after_step", n, n + 2),  # and the logits of every row
        ("a", "after_experience"), ("b", "after_experience"),
    ]


def test_extra_loss_changes_training(stream):
    class PullToZero(Strategy):
        def extra_loss(self, ctx, batch):
            return 10.0 * sum((p ** 2).sum() for p in ctx.model.parameters())

    plain = make_trainer(stream, [Naive()])
    plain.fit(stream, stop_after=1)
    pulled = make_trainer(stream, [PullToZero()])
    pulled.fit(stream, stop_after=1)
    norm = lambda m: sum((p ** 2).sum() for p in m.parameters()).item()  # noqa: E731
    assert norm(pulled.model) < 0.5 * norm(plain.model)


def test_predict_hook_replaces_the_head(stream):
    class AlwaysSeven(Strategy):
        def predict(self, ctx, x, t):
            scores = torch.zeros(len(x), 10)
            scores[:, 7] = 1
            return scores

    R = make_trainer(stream, [AlwaysSeven()]).fit(stream, stop_after=1).accuracy_matrix
    sevens = (stream[3].test.y == 7).float().mean().item()  # task 3 holds classes 6 and 7
    assert R[1].tolist() == [0.0, 0.0, 0.0, sevens, 0.0]


def test_resumed_run_equals_uninterrupted_run(stream, tmp_path):
    def strategies():
        return [Replay(100, 8, "reservoir"), Replay(60, 4, "class_balanced")]

    full = make_trainer(stream, strategies(), seed=3).fit(stream).accuracy_matrix

    first = make_trainer(stream, strategies(), seed=3)
    first.fit(stream, stop_after=2)
    path = save_checkpoint(tmp_path / "run.pt", first.state_dict(), {"note": "after 2"})
    torch.manual_seed(12345)  # the resumed process starts from some other global RNG state

    state, meta = load_checkpoint(path)
    resumed = make_trainer(stream, strategies(), seed=99)  # fresh objects, different init
    resumed.seed = 3
    resumed.load_state_dict(state)
    record = resumed.fit(stream)
    assert meta == {"note": "after 2"}
    assert record.completed == 5
    np.testing.assert_array_equal(record.accuracy_matrix, full)


def test_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="not written by this version of the lab"):
        load_checkpoint(other)


def test_checkpoint_from_another_experiment_is_rejected(stream):
    a = make_trainer(stream, [Naive(), Replay(10, 2)])
    a.fit(stream, stop_after=1)
    b = make_trainer(stream, [Naive()])
    with pytest.raises(ValueError, match="different experiment"):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("field, value", [("epochs", 0), ("batch_size", 0), ("eval_batch_size", -1),
                                          ("eval_every", 0), ("checkpoint_every", 0), ("lr_log_every", 0),
                                          ("scheduler_interval", "batch"), ("scheduler_scope", "epoch"),
                                          ("curve_tasks", "some"), ("nonfinite", "ignore")])
def test_bad_loop_settings_are_refused_naming_the_setting(field, value):
    """The trainer takes its loop settings validated: a TrainingConfig refuses a bad one."""
    with pytest.raises(ValueError, match=field):
        TrainingConfig(**{field: value})


def test_data_stays_on_the_host_for_a_cpu_run_and_off_an_accelerator_when_told():
    """`training.data_on_device` (the GPU half is tests/test_cuda.py): on the CPU nothing moves
    nor is pinned; `false` keeps data off an accelerator; `true` moves it whole; `auto` moves it
    only where the device says it fits (a CUDA device's free memory)."""
    from cl.training.scoring import place_data
    from streams.experience import TensorData

    data = TensorData(torch.zeros(4, 3), torch.arange(4))
    for setting in ("auto", True, False):
        assert place_data(data, torch.device("cpu"), setting) is data
    meta = torch.device("meta")  # an accelerator without a free-memory query
    assert place_data(data, meta, False) is data and place_data(data, meta, "auto") is data
    assert place_data(data, meta, True).x.device.type == "meta"
    assert TrainingConfig(data_on_device=False).data_on_device is False
    with pytest.raises(ValueError, match="data_on_device"):
        TrainingConfig(data_on_device="sometimes")
