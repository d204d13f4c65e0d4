"""Hook API v2: one context for every hook, single owners, composition and exact mid-experience resumption."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cl.training.checkpoint import load_checkpoint
from cl.models import MLP
from strategies import Naive, Replay, Strategy
from streams import class_incremental, digits
import conftest


def trainer_for(stream, strategies, seed=0, batch_size=32, **kw):
    """conftest's trainer, in batches of 32."""
    return conftest.trainer_for(stream, strategies, seed, batch_size, **kw)


class AddConstantTerm(Strategy):
    """Adds a named loss term that is a constant plus a tiny weight penalty."""

    def extra_loss(self, ctx, batch):
        return {"constant": 100.0 + 1e-4 * sum((p ** 2).sum() for p in ctx.model.parameters())}


def test_unused_hooks_are_skipped(stream):
    trainer = trainer_for(stream, [Naive(), Replay(50, 8)])
    assert {h: len(v) for h, v in trainer.hooks.items() if v} == {"adapt_batch": 1, "after_step": 1,
                                                                   "after_experience": 1}
    assert all(owner is None for owner in trainer.owner.values())


def test_context_carries_the_run_to_every_hook(stream):
    seen = []

    class Probe(Strategy):
        def before_experience(self, ctx):
            seen.append(("before", ctx.experience.index, ctx.steps_in_experience, ctx.optimizer is not None,
                         ctx.stream is stream))

        def after_step(self, ctx, batch):
            if ctx.step == 0:
                x = ctx.prepare(batch.x_raw[:4])
                assert torch.equal(x, batch.x[:4])  # the helper prepares as the trainer did
                assert torch.allclose(ctx.forward(x, batch.t[:4]), ctx.model(x))
                assert ctx.features(x).shape == (4, 64)
                seen.append(("step", ctx.iteration, ctx.epoch, batch.logits.shape[0]))

    trainer_for(stream, [Probe()], epochs=2).fit(stream, stop_after=2)
    steps0 = 2 * math.ceil(stream[0].n_train / 32)
    assert seen[0] == ("before", 0, steps0, True, True)
    assert seen[1] == ("step", 0, 0, 32)
    assert seen[2][:2] == ("before", 1) and seen[3][:3] == ("step", steps0, 0)


def test_two_owners_of_a_hook_are_an_error(stream):
    class Fwd(Strategy):
        def forward(self, ctx, batch):
            batch.logits = ctx.model(batch.x)

    class Lr(Strategy):
        owns_lr = True

    with pytest.raises(ValueError, match="hook 'forward' has one owner per run, but Fwd, Fwd"):
        trainer_for(stream, [Fwd(), Fwd()])
    with pytest.raises(ValueError, match="learning rate has more than one owner: Lr, Lr"):
        trainer_for(stream, [Lr(), Lr()])
    sched = lambda opt, steps: torch.optim.lr_scheduler.StepLR(opt, 1)  # noqa: E731
    with pytest.raises(ValueError, match="Lr, training.scheduler"):
        trainer_for(stream, [Lr()], scheduler=sched)


def test_named_loss_terms_are_kept_apart(stream):
    """train_loss is the main (cross-entropy) term; other terms are logged under their own names."""
    logged = []

    class Capture:
        def log_metrics(self, metrics, step, kind="evaluation"):
            if kind == "evaluation" and step > 0:
                logged.append(metrics)

    record = trainer_for(stream, [AddConstantTerm()], sinks=[Capture()]).fit(stream, stop_after=2)
    assert set(record.loss_terms) == {"ce", "constant"}
    assert all(v < 5 for v in record.train_loss)  # cross-entropy alone, not 100 + CE
    assert all(100 < v < 101 for v in record.loss_terms["constant"])
    assert logged[0]["train_loss"] == record.train_loss[0]
    assert logged[0]["train_loss_constant"] == record.loss_terms["constant"][0]


def test_duplicate_loss_term_names_are_an_error(stream):
    with pytest.raises(ValueError, match="two loss terms are named 'constant'"):
        trainer_for(stream, [AddConstantTerm(), AddConstantTerm()]).fit(stream, stop_after=1)


def test_loss_owner_replaces_cross_entropy(stream):
    class Smoothed(Strategy):
        loss_name = "smoothed_ce"

        def loss(self, ctx, batch):
            return F.cross_entropy(batch.logits, batch.y, label_smoothing=0.5)

    record = trainer_for(stream, [Smoothed()]).fit(stream, stop_after=1)
    assert list(record.loss_terms) == ["smoothed_ce"] and record.train_loss[0] > 0.5


def test_forward_owner_is_used_for_training_and_evaluation(stream):
    from strategies.context import pooled_features

    calls = {"train": 0, "eval": 0}

    class Temperature(Strategy):
        def forward(self, ctx, batch):
            calls["train" if ctx.training else "eval"] += 1
            batch.features = pooled_features(ctx.model, batch.x)
            batch.logits = ctx.model.forward_head(batch.features) / 2.0

    trainer = trainer_for(stream, [Temperature()])
    trainer.fit(stream, stop_after=1)
    assert calls["train"] == math.ceil(stream[0].n_train / 32)
    assert calls["eval"] == 2  # the untrained row and row 1: one pass over all test sets each


def test_eval_model_and_predict_compose(stream):
    """A predictor runs on the evaluation model: nearest-mean on slow weights, say."""
    frozen = {}

    class SlowWeights(Strategy):
        def before_experience(self, ctx):
            import copy

            frozen["model"] = copy.deepcopy(ctx.model)

        def eval_model(self, ctx):
            return frozen.get("model")

    used = []

    class Predictor(Strategy):
        def predict(self, ctx, x, t):
            used.append(ctx.model)
            return ctx.forward(x, t)

    trainer = trainer_for(stream, [Predictor(), SlowWeights()])
    record = trainer.fit(stream, stop_after=1)
    assert used[0] is trainer.model and used[-1] is frozen["model"]
    # Evaluated with the weights from before the experience: nothing was learned.
    untrained = record.accuracy_matrix[0]
    np.testing.assert_allclose(record.accuracy_matrix[1], untrained)


def test_before_experience_runs_in_train_mode_and_is_not_undone(stream):
    modes = []

    class FreezeDropout(Strategy):
        def before_experience(self, ctx):
            assert ctx.model.training
            ctx.model.features.eval()

        def after_step(self, ctx, batch):
            modes.append(ctx.model.features.training)

    trainer_for(stream, [FreezeDropout()], model=lambda s: MLP(s.input_shape, s.n_classes, hidden=(64,), dropout=0.5),
                momentum=0, eval_every=5).fit(stream, stop_after=1)
    assert modes and not any(modes)  # periodic evaluation restored the strategy's mode too


def test_configure_optimizer_groups_and_lr_owner_scale(stream):
    class SlowBody(Strategy):
        owns_lr = True

        def configure_optimizer(self, ctx, groups):
            head = list(ctx.model.head.parameters())
            ids = {id(p) for p in head}
            body = [p for p in ctx.model.parameters() if id(p) not in ids]
            return [{"params": body, "lr_scale": 0.01}, {"params": head}]

        def before_iteration(self, ctx):
            ctx.set_lr(0.1 / (1 + ctx.iteration))

    trainer = trainer_for(stream, [SlowBody()], lr_log_every=3)
    record = trainer.fit(stream, stop_after=1)
    assert isinstance(trainer.optimizer, torch.optim.SGD) and trainer.optimizer.defaults["momentum"] == 0.9
    assert record.lr_curve[0] == [0, [pytest.approx(0.001), pytest.approx(0.1)]]
    assert record.lr_curve[1] == [3, [pytest.approx(0.1 / 4 * 0.01), pytest.approx(0.1 / 4)]]


def test_configure_optimizer_keeps_adamw_and_its_settings(stream):
    """torch's AdamW records `decoupled_weight_decay` in its defaults but refuses it as an
    argument: the trainer rebuilds it over the new groups all the same."""
    class TwoGroups(Strategy):
        def configure_optimizer(self, ctx, groups):
            return [{"params": list(ctx.model.head.parameters())},
                    {"params": [p for n, p in ctx.model.named_parameters() if not n.startswith("head")]}]

    trainer = trainer_for(stream, [TwoGroups()], hidden=(32,), optimizer=lambda params: torch.optim.AdamW(
        params, lr=0.002, weight_decay=0.05, betas=(0.8, 0.99)))
    trainer.fit(stream, stop_after=1)
    rebuilt = trainer.optimizer
    assert type(rebuilt) is torch.optim.AdamW and len(rebuilt.param_groups) == 2
    assert rebuilt.defaults["weight_decay"] == 0.05 and rebuilt.defaults["betas"] == (0.8, 0.99)
    assert rebuilt.defaults["lr"] == 0.002 and rebuilt.state  # it stepped
    assert all(g["weight_decay"] == 0.05 and g["betas"] == (0.8, 0.99) for g in rebuilt.param_groups)

    class Loose(torch.optim.SGD):  # an optimizer whose constructor takes **kwargs
        def __init__(self, params, lr=0.1, **kwargs):
            super().__init__(params, lr=lr, **kwargs)

    trainer = trainer_for(stream, [TwoGroups()], model=MLP(stream.input_shape, stream.n_classes, hidden=(32,)),
                          optimizer=lambda params: Loose(params, lr=0.003, momentum=0.7))
    trainer.fit(stream, stop_after=1)
    assert [(g["lr"], g["momentum"]) for g in trainer.optimizer.param_groups] == [(0.003, 0.7)] * 2


def test_experience_scoped_scheduler_rewinds_at_every_experience(stream):
    def cosine(opt, steps):
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)

    record = trainer_for(stream, [Naive()], scheduler=cosine, scheduler_interval="step",
                         scheduler_scope="experience", lr_log_every=1).fit(stream, stop_after=3)
    lrs = dict((it, lr[0]) for it, lr in record.lr_curve)
    starts = np.cumsum([0] + [math.ceil(e.n_train / 32) for e in stream][:2])
    for s, n in zip(starts, [math.ceil(e.n_train / 32) for e in stream]):
        assert lrs[s] == pytest.approx(0.05)  # rewound to the first LR
        mid = s + n // 2
        assert lrs[mid] == pytest.approx(0.05 * (1 + math.cos(math.pi * (n // 2) / n)) / 2)


def test_augmentation_of_incoming_rows_does_not_depend_on_replay():
    """Replayed rows are augmented with a generator of their own."""
    from streams.experience import BatchTransform, Dataset

    d = digits()
    augmented = Dataset("digits-aug", d.train, d.test, BatchTransform([0.3], [0.3], crop_padding=2, flip=True))
    s = class_incremental(augmented, n_experiences=5)
    inputs = {}

    class Spy(Strategy):
        def __init__(self, name):
            self.name = name

        def after_step(self, ctx, batch):
            if ctx.iteration < 5:
                inputs.setdefault(self.name, []).append(batch.x[: batch.n_incoming].clone())

    trainer_for(s, [Spy("naive")]).fit(s, stop_after=1)
    trainer_for(s, [Replay(100, 16, "reservoir"), Spy("replay")]).fit(s, stop_after=1)
    for a, b in zip(inputs["naive"], inputs["replay"]):
        assert torch.equal(a, b)


def test_strategy_seed_does_not_depend_on_its_position(stream):
    class Idle(Strategy):
        def after_experience(self, ctx, data):
            pass

    alone = trainer_for(stream, [Replay(100, 16, "reservoir")]).fit(stream, stop_after=2).accuracy_matrix
    second = trainer_for(stream, [Idle(), Replay(100, 16, "reservoir")]).fit(stream, stop_after=2).accuracy_matrix
    np.testing.assert_array_equal(alone, second)


class Interrupt(Strategy):
    """Stops the run with KeyboardInterrupt at a given iteration, as a user's Ctrl-C would."""

    def __init__(self, at: int | None):
        self.at = at

    def before_iteration(self, ctx):
        if ctx.iteration == self.at:
            raise KeyboardInterrupt


def test_mid_experience_resume_equals_an_uninterrupted_run(stream, tmp_path):
    """Replay + a per-iteration LR schedule + a named loss term, interrupted inside an
    experience and resumed from the last mid-experience checkpoint into fresh objects."""

    def run(path, stop_at=None, resume=False, seed=3):
        def cosine(opt, steps):
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.001)

        torch.manual_seed(seed)
        model = MLP(stream.input_shape, stream.n_classes, hidden=(64,), dropout=0.2)  # uses the global RNG
        strategies = [Replay(80, 8, "reservoir"), Replay(60, 8, "class_balanced"), AddConstantTerm(), Interrupt(stop_at)]
        trainer = trainer_for(stream, strategies, seed=3, batch_size=16, model=model, epochs=2, scheduler=cosine,
                              scheduler_interval="step", scheduler_scope="experience", lr_log_every=1,
                              checkpoint_path=str(path), checkpoint_every=7, eval_every=25)
        if resume:
            state, _ = load_checkpoint(path)
            trainer.load_state_dict(state)
        return trainer.fit(stream)

    full = run(tmp_path / "full.pt")
    path = tmp_path / "run.pt"
    steps0 = 2 * math.ceil(stream[0].n_train / 16)
    stop_at = steps0 + 12  # in experience 1, epoch 0
    with pytest.raises(KeyboardInterrupt):
        run(path, stop_at=stop_at)
    state, _ = load_checkpoint(path)
    last_checkpoint = stop_at // 7 * 7
    assert state["in_progress"]["steps"] == last_checkpoint - steps0 > 0 and state["record"]["completed"] == 1
    torch.manual_seed(12345)  # a new process starts from some other global RNG state
    resumed = run(path, resume=True, seed=99)
    for key in full.matrices:
        np.testing.assert_array_equal(resumed.matrices[key], full.matrices[key])
    assert resumed.lr_curve == full.lr_curve
    assert resumed.loss_terms == full.loss_terms
    # (NaN for the tasks a periodic evaluation does not cover: compared as arrays, NaN == NaN)
    np.testing.assert_array_equal([p["acc"] for p in resumed.curve], [p["acc"] for p in full.curve])
    assert resumed.iteration == full.iteration


def test_checkpoints_are_written_after_every_experience(tmp_path):
    """Also where no evaluation row follows (an online stream evaluates at task ends only)."""
    from streams import online

    s = online(class_incremental(digits(), n_experiences=5), experience_size=50)
    assert 2 not in s.eval_after
    path = tmp_path / "ckpt.pt"
    trainer_for(s, [Naive()], checkpoint_path=str(path)).fit(s, stop_after=3)
    state, _ = load_checkpoint(path)
    resumed = trainer_for(s, [Naive()])
    resumed.load_state_dict(state)
    assert resumed.fit(s).iteration == sum(-(-e.n_train // 32) for e in s)  # picked up after experience 3
    full = trainer_for(s, [Naive()]).fit(s)
    np.testing.assert_array_equal(resumed.record.accuracy_matrix, full.accuracy_matrix)
