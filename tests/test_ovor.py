"""OVOR on tiny timm ViTs: boundary points, outliers around them, the energy hinge, a VOR
phase that trains only the head, one prompt with no query pass, and resuming."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import vit_trainer_for
from strategies import DualPrompt, Strategy
from strategies.context import Batch
from strategies.prompting.ovor import (OVOR, boundary_points, energy, energy_hinge, kth_neighbour_distance,
                                       synthesise_outliers)
from strategies.prompting.vit import prompted_tokens
from test_prompts import FrozenGroups

pytest.importorskip("timm")


def small_ovor(**kw):
    args = dict(lengths=(2, 2, 3, 3, 3), k=5, boundary_per_class=4, candidates=20, outliers_per_class=6,
                vor_batch_size=32)
    return OVOR(**{**args, **kw})


# --------------------------------------------------------------------- the toy set
def polar(degrees, norms):
    a = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    r = torch.tensor(norms, dtype=torch.float64)
    return torch.stack([r * torch.cos(a), r * torch.sin(a)], 1).float()


# Class 0 at angles 0, 10, 20, 35, 90 degrees with norms 5, 1, 3, 0.5, 2; class 1 at 180, 188,
# 200, 215 with norm 1. After L2 normalisation all lie on the unit circle, where distance grows
# with the angle between two points (chord 2 sin(delta / 2)), so by hand, with k = 2 (the
# second-nearest other point of the same class):
#   class 0:  0 -> {10, 20} -> 20 deg;  10 -> {10, 10} -> 10;  20 -> {10, 15} -> 15;
#             35 -> {15, 25} -> 25;  90 -> {55, 70} -> 70.      Top two: 90 (row 4), 35 (row 3).
#   class 1:  180 -> {8, 20} -> 20;  188 -> {8, 12} -> 12;  200 -> {12, 15} -> 15;
#             215 -> {15, 27} -> 27.                          Top two: 215 (row 8), 180 (row 5).
# Without normalisation class 0 would give rows 0 (at (5, 0)) and 2 instead: second-nearest
# distances 4.02 (row 0), 2.06, 2.41 (row 2), 1.76, 2.07.
TOY_X = torch.cat([polar([0, 10, 20, 35, 90], [5, 1, 3, 0.5, 2]), polar([180, 188, 200, 215], [1, 1, 1, 1])])
TOY_Y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1])
TOY_BOUNDARY = [4, 3, 8, 5]


def test_boundary_points_follow_the_knn_rule_on_normalised_features():
    assert boundary_points(TOY_X, TOY_Y, k=2, per_class=2).tolist() == TOY_BOUNDARY
    # The k-th distance itself, for the 90-degree point: its second-nearest is 20 degrees, 70 apart.
    z = F.normalize(TOY_X[:5], dim=1)
    d = kth_neighbour_distance(z, z, 2, exclude_self=True)
    assert d[4].item() == pytest.approx(2 * math.sin(math.radians(35)), abs=1e-5)
    # k = 1 (the nearest): class 0 -> 90 (55 deg), 35 (15); class 1: 180 -> 8, 188 -> 8, 200 -> 12,
    # 215 -> 15, so 215 (row 8) and 200 (row 7).
    assert boundary_points(TOY_X, TOY_Y, k=1, per_class=2).tolist() == [4, 3, 8, 7]
    # More than a class holds: the whole class; k beyond the class: clamped (the farthest other point).
    every = boundary_points(TOY_X, TOY_Y, k=10, per_class=9).tolist()
    assert set(every[:5]) == {0, 1, 2, 3, 4} and set(every[5:]) == {5, 6, 7, 8}


def test_outliers_start_from_the_boundary_points():
    boundary = torch.tensor(TOY_BOUNDARY)
    g = torch.Generator().manual_seed(0)
    out, src = synthesise_outliers(TOY_X, TOY_Y, boundary, per_class=3, std=0.0, candidates=3, k=2, generator=g)
    assert out.shape == (6, 2) and set(src.tolist()) <= set(TOY_BOUNDARY)
    assert torch.equal(out, TOY_X[src])  # no noise: exactly the boundary points
    std = 0.05
    out, src = synthesise_outliers(TOY_X, TOY_Y, boundary, per_class=20, std=std, candidates=200, k=2,
                                   generator=torch.Generator().manual_seed(1))
    assert out.shape == (40, 2) and set(src[:20].tolist()) <= {4, 3} and set(src[20:].tolist()) <= {8, 5}
    b = TOY_X[src]
    offset = (out - b).norm(dim=1) / b.norm(dim=1)  # the noise, in the normalised space
    assert (offset > 0).all() and (offset < 5 * std).all()  # within a few std of where they started
    # The rejection step keeps the candidates farthest from the inliers (k-th nearest, normalised).
    z = F.normalize(TOY_X, dim=1)
    kept = kth_neighbour_distance(F.normalize(b, dim=1) + (out - b) / b.norm(dim=1, keepdim=True), z, 2)
    for point in TOY_BOUNDARY:  # each point's kept candidates are among its farthest
        noise = torch.randn(200, 2, generator=torch.Generator().manual_seed(2))
        fresh = z[point] + std * noise
        assert kept[src == point].min() >= kth_neighbour_distance(fresh, z, 2).median()


def test_outliers_spread_over_every_boundary_point():
    """Each boundary point keeps its own farthest candidates before the class ranks them: the
    isolated point at 90 degrees (row 4) would otherwise take every place of class 0."""
    boundary = torch.tensor(TOY_BOUNDARY)
    out, src = synthesise_outliers(TOY_X, TOY_Y, boundary, per_class=4, std=0.05, candidates=50, k=2,
                                   generator=torch.Generator().manual_seed(3))
    assert sorted(src.tolist()) == sorted(TOY_BOUNDARY * 2)  # two from each boundary point
    one_each, src = synthesise_outliers(TOY_X, TOY_Y, boundary, per_class=1, std=0.05, candidates=50, k=2,
                                        generator=torch.Generator().manual_seed(3))
    assert len(one_each) == 2 and TOY_Y[src].tolist() == [0, 1]


def test_the_energy_hinge_is_zero_on_the_right_side_of_each_margin():
    def logits_with_energy(e):  # two equal logits l: E = -(l + log 2)
        return torch.full((1, 2), -e - math.log(2))

    assert energy(logits_with_energy(-7.0)).item() == pytest.approx(-7.0)
    z = torch.zeros(0)
    assert energy_hinge(torch.tensor([-20.0, -15.0]), z, -15, -3).item() == 0  # inliers inside the margin
    assert energy_hinge(z, torch.tensor([-1.0, -3.0, 4.0]), -15, -3).item() == 0  # outliers beyond theirs
    # Huber (delta 1) of the gap: 5 -> 4.5 for an inlier at -10; 2 -> 1.5 for an outlier at -5.
    assert energy_hinge(torch.tensor([-10.0]), z, -15, -3).item() == pytest.approx(4.5)
    assert energy_hinge(z, torch.tensor([-5.0]), -15, -3).item() == pytest.approx(1.5)
    assert energy_hinge(torch.tensor([-14.5]), z, -15, -3).item() == pytest.approx(0.125)
    assert energy_hinge(z, torch.tensor([-5.0]), -15, -3, huber_delta=None).item() == pytest.approx(4.0)
    # Both together: each set's mean, summed.
    both = energy_hinge(torch.tensor([-10.0, -20.0]), torch.tensor([-5.0, 0.0]), -15, -3)
    assert both.item() == pytest.approx(4.5 / 2 + 1.5 / 2)
    ovor = OVOR()
    assert ovor._energy_terms(logits_with_energy(-20.0), logits_with_energy(-1.0)).item() == 0
    assert ovor._energy_terms(logits_with_energy(-10.0), logits_with_energy(-1.0)).item() == pytest.approx(4.5)


class Snapshot(Strategy):
    """Copies the model and the given strategy's prompt after each experience (its place in the
    strategy list decides whether before or after the strategies that follow it)."""

    def __init__(self, target):
        self.target, self.seen = target, []

    def after_experience(self, ctx, data):
        self.seen.append(({k: v.detach().clone() for k, v in ctx.model.state_dict().items()},
                          {k: v.detach().clone() for k, v in self.target.params.state_dict().items()}))


def test_vor_trains_only_the_head_and_the_prompt_keeps_training_across_tasks(small_stream):
    ovor = small_ovor(vor_epochs=2)
    before, after = Snapshot(ovor), Snapshot(ovor)
    trainer = vit_trainer_for(small_stream, [before, ovor, after])
    record = trainer.fit(small_stream, stop_after=2)
    assert np.isfinite(record.loss_terms["ce"]).all()
    for (m0, p0), (m1, p1) in zip(before.seen, after.seen):
        for name, v in m0.items():
            assert torch.equal(v, m1[name]) != name.startswith("head."), name  # only the head moved
        assert all(torch.equal(v, p1[k]) for k, v in p0.items())  # the prompt did not
    # The energy is over the current experience's classes: VOR moves only their rows of the head.
    for e, (m0, _), (m1, _) in zip((0, 1), before.seen, after.seen):
        changed = (m0["head.weight"] != m1["head.weight"]).any(1) | (m0["head.bias"] != m1["head.bias"])
        assert changed.nonzero().squeeze(1).tolist() == small_stream[e].classes
    # The shared prompt trained in both experiences (it is not frozen after the first).
    p_first, p_second = after.seen[0][1], after.seen[1][1]
    assert all(not torch.equal(v, p_second[k]) for k, v in p_first.items())
    assert len(ovor.vor_log) == 2 and all(math.isfinite(v) for log in ovor.vor_log for v in log.values())


def test_one_prompt_one_pass_and_the_prompt_enters_the_chosen_layers(small_stream, monkeypatch):
    ovor = small_ovor(vor_epochs=0)
    trainer = vit_trainer_for(small_stream, [ovor])
    trainer.fit(small_stream, stop_after=1)
    vit, ctx = trainer.model, trainer.ctx

    def mlp_calls(forward):
        counts = [0] * len(vit.blocks)
        hooks = [b.mlp.register_forward_hook(lambda *a, i=i: counts.__setitem__(i, counts[i] + 1))
                 for i, b in enumerate(vit.blocks)]
        try:
            forward()
        finally:
            for h in hooks:
                h.remove()
        return counts

    x = ctx.prepare(small_stream[0].train.x[:4])
    assert mlp_calls(lambda: ctx.forward(x)) == [1] * 5  # every block once: no query pass
    dual = DualPrompt(g_length=2, e_length=2)  # a pool method runs the frozen ViT twice
    dual_trainer = vit_trainer_for(small_stream, [dual])
    dual_trainer.fit(small_stream, stop_after=1)
    vit = dual_trainer.model
    assert mlp_calls(lambda: dual_trainer.ctx.forward(x)) == [2] * 5
    vit = trainer.model

    import strategies.prompting.ovor as mod

    seen = {}

    def spy(vit, x, prefixes=None, prompt=None):
        seen["prefixes"], seen["prompt"] = prefixes, prompt
        return prompted_tokens(vit, x, prefixes, prompt)

    monkeypatch.setattr(mod, "prompted_tokens", spy)
    ctx.training = True
    batch = Batch(small_stream[0].train.x[:4], small_stream[0].train.y[:4], small_stream[0].train.t[:4], 4)
    batch.x = ctx.prepare(batch.x_raw)
    ovor.params.zero_grad(set_to_none=True)
    ovor.forward(ctx, batch)
    assert seen["prompt"] is None and sorted(seen["prefixes"]) == [0, 1, 2, 3, 4]
    for layer, length in zip(ovor.layers, ovor.lengths):
        keys, values = seen["prefixes"][layer]
        p = getattr(ovor.params, f"p{layer}")
        assert keys.shape == values.shape == (4, length, 32)
        assert all(torch.equal(keys[i], p[0]) and torch.equal(values[i], p[1]) for i in range(4))  # one prompt
    ovor.loss(ctx, batch).backward()
    assert all(getattr(ovor.params, f"p{layer}").grad.abs().sum() > 0 for layer in ovor.layers)
    with pytest.raises(ValueError, match="not blocks"):
        vit_trainer_for(small_stream, [OVOR(layers=(0, 7), lengths=(2, 2))]).fit(small_stream, stop_after=1)


def test_vor_lowers_its_objective_and_draws_from_the_seeded_generator(small_stream):
    """End to end on digits: the regularised epochs lower CE + energy hinge on the experience's
    cached features with a fixed set of outliers; the outliers depend only on the strategy's seed."""
    ovor = small_ovor(vor_epochs=1)
    trainer = vit_trainer_for(small_stream, [ovor])
    record = trainer.fit(small_stream, stop_after=2)
    assert np.isfinite(record.matrices["acc"][1:3]).all() and np.isfinite(record.loss_terms["ce"]).all()
    ctx, head = trainer.ctx, trainer.model.get_classifier()
    train = small_stream[1].train
    feats, labels = ctx.embed(train.x, train.t), train.y
    classes = torch.tensor(small_stream[1].classes)
    boundary = boundary_points(feats, labels, ovor.k, ovor.boundary_per_class)
    outliers, _ = synthesise_outliers(feats, labels, boundary, 6, ovor.noise_std, ovor.candidates, ovor.k,
                                      torch.Generator().manual_seed(5))

    def objective():
        with torch.no_grad():
            li, lo = head(feats)[:, classes], head(outliers)[:, classes]
            target = (labels == classes[1]).long()
            return F.cross_entropy(li, target).item(), ovor._energy_terms(li, lo).item()

    ce0, reg0 = objective()
    ovor.vor_epochs, ovor.vor_weight, ovor.vor_lr = 20, 1.0, 0.05
    ovor.regularise(ctx, feats, labels)
    ce1, reg1 = objective()
    assert reg0 > 0 and ce1 + reg1 < ce0 + reg0 and reg1 < reg0
    # Same seed, same outliers; the draws come from the generator passed.
    a, _ = synthesise_outliers(feats, labels, boundary, 6, 0.1, 20, 5, torch.Generator().manual_seed(3))
    b, _ = synthesise_outliers(feats, labels, boundary, 6, 0.1, 20, 5, torch.Generator().manual_seed(3))
    c, _ = synthesise_outliers(feats, labels, boundary, 6, 0.1, 20, 5, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_a_resumed_ovor_run_equals_an_uninterrupted_one(small_stream, tmp_path):
    """Interrupted inside the second experience, resumed into fresh objects: the prompt, the head,
    the optimizer and the generator the outliers are drawn from come back."""
    from cl.training.checkpoint import load_checkpoint
    from test_hooks import Interrupt

    def go(path, stop_at=None, resume=False):
        ovor = small_ovor(vor_epochs=1)
        trainer = vit_trainer_for(small_stream, [ovor, Interrupt(stop_at)], seed=1, checkpoint_path=str(path),
                                  checkpoint_every=3)
        if resume:
            trainer.load_state_dict(load_checkpoint(path)[0])
        return trainer.fit(small_stream, stop_after=3), ovor, trainer.model

    full, ovor_full, model_full = go(tmp_path / "full.pt")
    with pytest.raises(KeyboardInterrupt):
        go(tmp_path / "run.pt", stop_at=4 + 3 + 1)  # 4 steps per experience: inside the second
    torch.manual_seed(123)
    resumed, ovor_resumed, model_resumed = go(tmp_path / "run.pt", resume=True)
    np.testing.assert_array_equal(resumed.matrices["acc"], full.matrices["acc"])
    assert resumed.loss_terms == full.loss_terms
    assert all(torch.equal(v, model_resumed.state_dict()[k]) for k, v in model_full.state_dict().items())
    assert ovor_resumed.vor_log == ovor_full.vor_log and len(ovor_full.vor_log) == 3


def test_the_one_prompt_learns_on_a_pretrained_backbone(small_stream, backbone_5_to_9):
    """On a backbone pre-trained on digits 5-9, the learnt prompt lowers the first experience's
    training loss below the same run with the prompt frozen (group 1: the prompt); a prompt that
    never reached the ViT, or never got gradient, would give the frozen run's loss exactly."""
    weights = backbone_5_to_9

    def go(extra):
        trainer = vit_trainer_for(small_stream, [small_ovor(lengths=(5, 5, 20, 20, 20)), *extra], weights=weights,
                                  lr=0.02, epochs=3)
        return trainer.fit(small_stream, stop_after=1)

    learnt, frozen = go([]), go([FrozenGroups(1)])
    assert learnt.loss_terms["ce"][0] < frozen.loss_terms["ce"][0], (learnt.loss_terms, frozen.loss_terms)
    assert np.isfinite(learnt.matrices["acc"][1]).all()
