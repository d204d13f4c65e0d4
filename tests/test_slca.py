"""SLCA (Zhang et al. 2023): the slow learner's parameter groups, the class statistics, the Gaussian
sampler, alignment of the classifier alone, state and exact resumption, and runs end to end."""
import copy
import io
import math

import numpy as np
import pytest
import torch

from cl.training.checkpoint import load_checkpoint
from strategies import SLCA, ConstantLR, Naive, Strategy
from streams.experience import BatchTransform, Experience, Stream, TensorData
from conftest import trainer_for


def image_stream(n_experiences=2, per_class=24, test_per_class=8, flip=False, seed=0):
    """1x8x8 float images, two classes per experience: a fixed random pattern per class plus noise."""
    g = torch.Generator().manual_seed(seed)
    n_classes = 2 * n_experiences
    patterns = torch.rand(n_classes, 1, 8, 8, generator=g)

    def draw(classes, k):
        x = torch.cat([patterns[c] + 0.3 * torch.randn(k, 1, 8, 8, generator=g) for c in classes])
        return TensorData(x, torch.tensor(classes).repeat_interleave(k))

    experiences = [Experience(e, 0, [2 * e, 2 * e + 1], draw([2 * e, 2 * e + 1], per_class),
                              draw([2 * e, 2 * e + 1], test_per_class), e) for e in range(n_experiences)]
    return Stream("patterns", experiences, BatchTransform(scale=1.0, flip=flip), (1, 8, 8), n_classes,
                  list(range(n_classes)))


def tiny_vit(n_classes):
    import timm

    return timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, in_chans=1, depth=2, embed_dim=32,
                             num_heads=2, num_classes=n_classes)


def vit_trainer(stream, strategies, seed=0, **kw):
    """The 2-block ViT in batches of 16, by SGD at 0.1 with momentum."""
    return trainer_for(stream, strategies, seed, 16, model=lambda s: tiny_vit(s.n_classes), lr=0.1, **kw)


def mlp_trainer(stream, strategies, seed=0, **kw):
    """An MLP of 32 in batches of 16, by SGD at 0.1 with momentum."""
    return trainer_for(stream, strategies, seed, 16, hidden=(32,), lr=0.1, **kw)


def test_the_backbone_learns_at_a_hundredth_of_the_head_rate_whoever_sets_the_lr():
    stream = image_stream()
    trainer = vit_trainer(stream, [SLCA(), ConstantLR(lr=0.2, warmup_steps=2)], lr_log_every=1)
    trainer.fit(stream, stop_after=1)
    model = trainer.model
    slow, head = trainer.optimizer.param_groups
    head_ids = {id(p) for p in model.head.parameters()}
    assert {id(p) for p in head["params"]} == head_ids
    assert {id(p) for p in slow["params"]} == {id(p) for p in model.parameters()} - head_ids
    assert slow["lr_scale"] == pytest.approx(0.01) and head.get("lr_scale", 1.0) == 1.0
    lrs = [lr for _, lr in trainer.record.lr_curve]
    assert lrs[0][1] == pytest.approx(0.1) and lrs[-1][1] == pytest.approx(0.2)  # the warmup set both
    assert all(b == pytest.approx(0.01 * h) for b, h in lrs)
    trainer.ctx.set_lr(1.0)
    assert trainer.ctx.lrs == pytest.approx([0.01, 1.0])


def test_the_ratio_holds_under_the_experiments_scheduler_and_zero_freezes_the_backbone():
    stream = image_stream()
    step = lambda opt, steps: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)  # noqa: E731
    trainer = mlp_trainer(stream, [SLCA(lr_ratio=0.05)], scheduler=step, scheduler_interval="step", lr_log_every=1)
    trainer.fit(stream, stop_after=1)
    lrs = [lr for _, lr in trainer.record.lr_curve]
    assert lrs[0] == pytest.approx([0.005, 0.1]) and lrs[2] == pytest.approx([0.00125, 0.025])
    frozen = mlp_trainer(stream, [SLCA(lr_ratio=0.0)])
    before = copy.deepcopy(frozen.model.features.state_dict())
    frozen.fit(stream, stop_after=1)
    assert len(frozen.optimizer.param_groups) == 1
    for k, v in frozen.model.features.state_dict().items():
        assert torch.equal(v, before[k])


def test_statistics_are_the_mean_and_covariance_of_the_unaugmented_features():
    stream = image_stream(flip=True)  # training batches are flipped; the statistics must not be
    slca = SLCA()
    trainer = vit_trainer(stream, [slca])
    trainer.fit(stream, stop_after=1)  # no alignment after the first experience: the model is as summarised
    model = trainer.model.eval()
    data = stream[0].train
    with torch.no_grad():
        phi = model.forward_head(model.forward_features(stream.transform(data.x)), pre_logits=True).double()
    assert phi.shape[1] == 32
    for c in (0, 1):
        r = phi[data.y == c]
        mu = r.sum(0) / len(r)
        cov = (r - mu).T @ (r - mu) / (len(r) - 1)
        torch.testing.assert_close(slca.means[c], mu.float())
        torch.testing.assert_close(slca.covs[c], cov.float())
    assert slca.stat_experience.tolist() == [0, 0, -1, -1]
    assert not slca.means[2:].any() and not slca.covs[2:].any()


def _stats(d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(3, d, d, generator=g)
    covs = a @ a.transpose(1, 2) / d + 0.1 * torch.eye(d)
    means = 3 * torch.randn(3, d, generator=g)
    return means, covs


def test_sampled_features_follow_the_stored_gaussians_and_the_strategys_generator():
    slca = SLCA(cov_jitter=1e-3)
    means, covs = _stats()
    slca.means, slca.covs = means.clone(), covs.clone()
    slca.stat_experience = torch.tensor([0, 1, -1])
    slca.rng = torch.Generator().manual_seed(7)
    classes = torch.tensor([0, 1])
    x, y = slca.sample_features(classes, 40000)
    assert x.shape == (80000, 4) and y.tolist() == [0] * 40000 + [1] * 40000
    for c in (0, 1):
        r = x[y == c].double()
        torch.testing.assert_close(r.mean(0), means[c].double(), atol=0.03, rtol=0)
        torch.testing.assert_close(torch.cov(r.T), (covs[c] + 1e-3 * torch.eye(4)).double(), atol=0.05, rtol=0.05)
    # The draws come from the strategy's generator: the same seed, the same features.
    slca.rng = torch.Generator().manual_seed(7)
    again, _ = slca.sample_features(classes, 40000)
    assert torch.equal(again, x)
    # The reference's scaling of older means, 0.9 + 0.1 (k + 1)/(t + 1): at t = 1, 0.95 and 1.
    slca.old_mean_shrink = 0.1
    scales = slca.mean_scales(classes, experience=1)
    assert scales.tolist() == pytest.approx([0.95, 1.0])
    x, y = slca.sample_features(classes, 40000, scales)
    torch.testing.assert_close(x[y == 0].double().mean(0), 0.95 * means[0].double(), atol=0.03, rtol=0)
    slca.old_mean_shrink = 0.0  # the paper: no scaling
    assert slca.mean_scales(classes, experience=1).tolist() == [1.0, 1.0]


def test_a_singular_covariance_is_still_sampled():
    slca = SLCA(cov_jitter=0.0)
    v = torch.tensor([[1.0, 2.0, 0.0]])
    slca.means, slca.covs = torch.zeros(1, 3), (v.T @ v).unsqueeze(0)  # rank one
    slca.stat_experience, slca.rng = torch.tensor([0]), torch.Generator().manual_seed(0)
    x, _ = slca.sample_features(torch.tensor([0]), 5000)
    assert torch.isfinite(x).all()
    torch.testing.assert_close(torch.cov(x.T.double()), (v.T @ v).double(), atol=0.1, rtol=0.1)


def test_logit_normalisation_of_the_paper_and_of_the_reference_code():
    logits = torch.tensor([[3.0, 4.0, 0.0, 12.0]])
    groups = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    paper = SLCA(temperature=0.1).normalised_logits(logits, groups)
    torch.testing.assert_close(paper, logits / (13.0 * 0.1))  # ||h|| = 13
    code = SLCA(temperature=0.1, logit_norm="task_mean").normalised_logits(logits, groups)
    torch.testing.assert_close(code, logits / (8.5 * 0.1))  # the mean of the blocks' norms 5 and 12
    assert torch.equal(SLCA(temperature=None).normalised_logits(logits, groups), logits)


class Snapshots(Strategy):
    """Copies of the model's state at every experience boundary, tagged."""

    def __init__(self, tag, log):
        self.tag, self.log = tag, log

    def before_experience(self, ctx):
        self.log[(self.tag, "before", ctx.experience.index)] = copy.deepcopy(ctx.model.state_dict())

    def after_experience(self, ctx, data):
        self.log[(self.tag, "after", ctx.experience.index)] = copy.deepcopy(ctx.model.state_dict())


def test_alignment_trains_the_classifier_alone_and_the_slow_learner_goes_on_from_the_unaligned_head():
    stream = image_stream(n_experiences=3)
    log = {}
    trainer = vit_trainer(stream, [Snapshots("pre", log), SLCA(), Snapshots("post", log)])
    trainer.fit(stream)
    head = {"head.weight", "head.bias"}

    def same(a, b, keys):
        return all(torch.equal(a[k], b[k]) for k in keys)

    keys = set(log[("pre", "after", 0)])
    backbone = keys - head
    assert same(log[("pre", "after", 0)], log[("post", "after", 0)], keys)  # no alignment after the first
    for e in (1, 2):
        unaligned, aligned = log[("pre", "after", e)], log[("post", "after", e)]
        assert same(unaligned, aligned, backbone)  # bitwise: the backbone is untouched by alignment
        assert not torch.equal(unaligned["head.weight"], aligned["head.weight"])
        assert not torch.equal(unaligned["head.bias"], aligned["head.bias"])
    # The next experience starts from the classifier before alignment, the backbone as trained.
    assert same(log[("post", "before", 2)], log[("pre", "after", 1)], keys)
    assert same(log[("pre", "before", 2)], log[("post", "after", 1)], keys)
    # Unseen classes are never predicted; old ones are.
    x = stream.transform(stream.test_sets[0].x)
    scores = trainer.owner["predict"].predict(trainer.ctx, x, torch.zeros(len(x), dtype=torch.long))
    assert torch.isfinite(scores).all()


def test_unseen_classes_are_ruled_out_and_old_rows_are_ignored_by_the_masked_loss():
    from strategies.context import Batch

    stream = image_stream(n_experiences=3)
    slca = SLCA()
    trainer = mlp_trainer(stream, [slca])
    trainer.fit(stream, stop_after=2)
    x = stream.transform(stream.test_sets[2].x)
    scores = slca.predict(trainer.ctx, x, torch.zeros(len(x), dtype=torch.long))
    assert torch.isinf(scores[:, 4:]).all() and torch.isfinite(scores[:, :4]).all()
    # The loss of experience 1 (classes 2, 3): cross-entropy among them; a row of class 0 counts for nothing.
    logits = torch.tensor([[5.0, -1.0, 0.5, 2.0, 9.0, 9.0], [7.0, 0.0, 1.0, 1.0, 0.0, 0.0]])
    batch = Batch(x[:2], torch.tensor([3, 0]), torch.zeros(2, dtype=torch.long), 2)
    batch.x, batch.logits = x[:2], logits
    expected = -torch.log_softmax(torch.tensor([0.5, 2.0]), 0)[1]
    assert slca.loss(trainer.ctx, batch).item() == pytest.approx(expected.item(), rel=1e-6)


def test_state_round_trips_through_weights_only_loading():
    stream = image_stream(n_experiences=2)
    slca = SLCA()
    mlp_trainer(stream, [slca]).fit(stream)
    state = slca.state_dict()
    assert state["head_backup"] is not None  # the classifier before the alignment after experience 1
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    other = SLCA()
    mlp_trainer(stream, [other], seed=5).fit(stream, stop_after=0)  # set up for the stream, nothing trained
    other.load_state_dict(loaded)
    for key in ("means", "covs", "stat_experience"):
        assert torch.equal(getattr(other, key), getattr(slca, key))
    assert other.seen == slca.seen == [0, 1, 2, 3]
    assert all(torch.equal(other.head_backup[k], v) for k, v in slca.head_backup.items())
    assert torch.equal(other.rng.get_state(), slca.rng.get_state())


class Interrupt(Strategy):
    def __init__(self, at):
        self.at = at

    def before_iteration(self, ctx):
        if ctx.iteration == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["boundary", "inside"])
def test_a_resumed_run_equals_an_uninterrupted_one(where, tmp_path):
    """Interrupted after experience 1 (the aligned head in the model, the unaligned one in the
    strategy's state) or inside experience 2 (whose start restored the unaligned head)."""
    stream = image_stream(n_experiences=3)
    steps = math.ceil(len(stream[0].train) / 16)

    def run(path=None, stop_at=None, resume=False, stop_after=None, seed=0):
        trainer = mlp_trainer(stream, [SLCA(), Interrupt(stop_at)], seed=seed, checkpoint_path=path,
                              checkpoint_every=1 if where == "inside" else None)
        if resume:
            trainer.load_state_dict(load_checkpoint(path)[0])
        record = trainer.fit(stream, stop_after=stop_after)
        return record, trainer.model.state_dict()

    full, weights = run()
    path = str(tmp_path / "run.pt")
    if where == "boundary":
        run(path, stop_after=2)
    else:
        with pytest.raises(KeyboardInterrupt):
            run(path, stop_at=2 * steps + 2)
        assert load_checkpoint(path)[0]["in_progress"] is not None
    torch.manual_seed(123)
    resumed, resumed_weights = run(path, resume=True, seed=0)
    np.testing.assert_array_equal(resumed.accuracy_matrix, full.accuracy_matrix)
    assert all(torch.equal(resumed_weights[k], v) for k, v in weights.items())


def test_alignment_rebalances_old_and_new_classes_on_split_digits(stream):
    """Split-Digits through the lab's trainer: the same slow learner with and without alignment
    (identical until alignment first runs, after the second experience), and naive fine-tuning."""
    aligned = trainer_for(stream, [SLCA()])
    with_ca = aligned.fit(stream).accuracy_matrix
    without_ca = trainer_for(stream, [SLCA(align_epochs=0)]).fit(stream).accuracy_matrix
    naive = trainer_for(stream, [Naive()]).fit(stream).accuracy_matrix
    np.testing.assert_array_equal(with_ca[:2], without_ca[:2])
    seen = lambda m, k: m[k, :k].mean()  # noqa: E731  (row k: after experience k; tasks 0..k-1 seen)
    for k in range(2, 6):
        assert seen(with_ca, k) > seen(without_ca, k) + 0.1
    assert with_ca[-1].mean() > naive[-1].mean() + 0.4
    # Alignment changed the old classes' logits (the model evaluated is the aligned one).
    x = stream.transform(stream.test_sets[0].x)
    old = aligned.model(x)[:, :2]
    aligned.model.head.load_state_dict(aligned.strategies[0].head_backup)
    assert not torch.allclose(aligned.model(x)[:, :2], old)
