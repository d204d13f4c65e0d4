"""Classifiers that are not the head (nearest mean, iCaRL), momentum weights, and what every
strategy of the catalogue promises: state that loads with weights_only=True, composition."""
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cl.models import MLP
from strategies import STRATEGIES, ICaRL, MomentumWeights, NearestMean, Replay, Strategy
from streams import class_incremental, digits
from streams.experience import BatchTransform, Experience, Stream, TensorData
from conftest import tiny_vit, trainer_for


def toy_stream():
    """2-D points, two tasks of two classes; an MLP without hidden layers has the inputs as features."""
    x = torch.tensor([[2.0, 0.0], [4.0, 0.1], [0.0, 1.0], [0.1, 3.0], [-1.0, 0.0], [-2.0, -0.1], [0.0, -1.0],
                      [0.2, -2.0]])
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    test_x = torch.tensor([[1.0, 0.2], [-0.8, 0.3], [0.3, -1.0], [0.1, 0.9]])
    test_y = torch.tensor([0, 2, 3, 1])
    tasks = []
    for k, classes in enumerate(([0, 1], [2, 3])):
        keep = torch.isin(y, torch.tensor(classes))
        keep_t = torch.isin(test_y, torch.tensor(classes))
        tasks.append(Experience(k, 0, classes, TensorData(x[keep], y[keep]), TensorData(test_x[keep_t], test_y[keep_t]), k))
    return Stream("toy", tasks, BatchTransform(scale=1.0), (2,), 4, [0, 1, 2, 3]), x, y, test_x, test_y


def test_nearest_mean_equals_the_hand_computed_nearest_mean():
    s, x, y, test_x, test_y = toy_stream()
    torch.manual_seed(0)
    model = MLP((2,), 4, hidden=())
    untrained = {k: v.clone() for k, v in model.state_dict().items()}
    nm = NearestMean()
    trainer = trainer_for(s, [nm], batch_size=3, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    record = trainer.fit(s)
    unit = F.normalize(x, dim=1)
    means = torch.stack([unit[y == c].mean(0) for c in range(4)])
    # The running means equal the batch means, batch by batch updates notwithstanding.
    torch.testing.assert_close(nm.means, means)
    # e.g. (-0.8, 0.3) normalises to (-0.936, 0.351): 0.38 from class 2's mean (-0.999, -0.025),
    # 1.15 from class 1's (0.017, 1.0).
    hand = torch.cdist(F.normalize(test_x, dim=1), means).argmin(1)
    assert hand.tolist() == [0, 2, 3, 1]
    assert record.accuracy_matrix[-1].tolist() == [1.0, 1.0]
    # A frozen backbone trains nothing: every weight, the head's included, ends as it began
    # (the head would move under SGD if it trained: its logits get a cross-entropy every batch).
    assert all(not p.requires_grad for p in trainer.model.parameters())
    trained = trainer.model.state_dict()
    assert trained.keys() == untrained.keys()
    for key, before in untrained.items():
        assert torch.equal(trained[key].cpu(), before), f"{key} changed in training"


def test_nearest_mean_before_its_classes_arrive_never_predicts_them():
    s, *_ = toy_stream()
    torch.manual_seed(0)
    model = MLP((2,), 4, hidden=())
    record = trainer_for(s, [NearestMean()], batch_size=4, model=model,
                         optimizer=torch.optim.SGD(model.parameters(), lr=0.1)).fit(s, stop_after=1)
    assert record.accuracy_matrix[1].tolist() == [1.0, 0.0]  # task 1's classes are not known yet


def test_momentum_weights_follow_the_formula(stream):
    fast_after_step = []

    class Spy(Strategy):
        def after_step(self, ctx, batch):
            fast_after_step.append(ctx.model.head.weight.detach().clone())

    mw = MomentumWeights(tau=0.9, every=2)
    trainer = trainer_for(stream, [mw, Spy()])
    start = trainer.model.head.weight.detach().clone()
    trainer.fit(stream, stop_after=1)
    slow = start
    for i, fast in enumerate(fast_after_step, start=1):
        if i % 2 == 0:
            slow = 0.9 * slow + 0.1 * fast
    torch.testing.assert_close(mw.slow.head.weight, slow)
    assert trainer.owner["eval_model"] is mw


def test_momentum_weights_compose_with_replay_and_nearest_mean(stream):
    nm, mw = NearestMean(freeze_backbone=False), MomentumWeights(0.99)
    used = []
    original = nm.predict

    def spy(ctx, x, t):
        used.append(ctx.model)
        return original(ctx, x, t)

    nm.predict = spy
    record = trainer_for(stream, [Replay(200, 16), mw, nm]).fit(stream, stop_after=2)
    assert used[-1] is mw.slow  # the predictor reads slow features
    assert np.isfinite(record.accuracy_matrix[:3]).all()


def test_icarl_loss_by_hand():
    from strategies.context import Batch

    icarl = ICaRL(memory_size=10)
    icarl.seen_classes, icarl.old_classes = [0, 1, 2], [0]
    icarl.old_model = torch.nn.Linear(2, 4, bias=False)
    with torch.no_grad():
        icarl.old_model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]))
    x = torch.tensor([[1.0, 2.0]])
    batch = Batch(x, torch.tensor([2]), torch.zeros(1, dtype=torch.long), 1)
    batch.x, batch.logits = x, torch.tensor([[0.5, -1.0, 2.0, 9.0]])
    # Targets over the seen classes 0, 1, 2: old class 0 gets sigmoid(old logit 1.0), class 1 gets 0
    # (not the label, and not an old class), class 2 gets 1 (the label); class 3 is not seen yet.
    t = torch.tensor([torch.sigmoid(torch.tensor(1.0)).item(), 0.0, 1.0])
    z = torch.tensor([0.5, -1.0, 2.0])
    expected = -(t * F.logsigmoid(z) + (1 - t) * F.logsigmoid(-z)).sum()
    assert icarl.loss(None, batch).item() == pytest.approx(expected.item(), rel=1e-6)


def test_icarl_classifies_by_the_nearest_mean_of_exemplars(stream):
    icarl = ICaRL(memory_size=100)
    trainer = trainer_for(stream, [icarl], epochs=2)
    record = trainer.fit(stream)
    assert icarl.buffer.class_counts() == {c: 10 for c in range(10)}
    x = stream.transform(stream.test_sets[0].x[:50])
    with torch.no_grad():
        phi = F.normalize(trainer.ctx.features(x), dim=-1)
        hand = torch.cdist(phi, icarl.means).argmin(1)
        assert torch.equal(icarl.predict(trainer.ctx, x, torch.zeros(50, dtype=torch.long)).argmax(1), hand)
    naive = trainer_for(stream, [STRATEGIES["naive"]()], epochs=2).fit(stream).accuracy_matrix[-1].mean()
    assert record.accuracy_matrix[-1].mean() > naive + 0.4


SMALL = {"replay": {"memory_size": 50}, "der": {"memory_size": 50}, "derpp": {"memory_size": 50},
         "er_ace": {"memory_size": 50}, "gdumb": {"memory_size": 50}, "gem": {"patterns_per_experience": 20},
         "agem": {"patterns_per_experience": 20, "sample_size": 16}, "icarl": {"memory_size": 50},
         "power_law_rehearsal": {"budget": 50, "memory_per_task": 40}, "ewc": {"fisher_samples": 64},
         "online_ewc": {"fisher_samples": 64}, "mas": {"importance_samples": 64},
         "l2p": {"pool_size": 4, "prompt_length": 2, "top_k": 2}, "dualprompt": {"g_length": 2, "e_length": 2},
         "coda_prompt": {"n_components": 10, "prompt_length": 2},
         "apg": {"samples_per_step": 16, "finetune_epochs": 2, "finetune_epochs_per_task": 1,
                 "finetune_samples_per_class": 16},
         "ovor": {"lengths": [2, 2, 3, 3, 3], "k": 5, "boundary_per_class": 4, "candidates": 20,
                  "outliers_per_class": 6}}
#: Strategies that need a timm ViT rather than the MLP.
ON_A_VIT = {"l2p", "dualprompt", "coda_prompt", "apg", "ovor"}


def vit_trainer_for(stream, strategies, seed, batch_size, **kw):
    """A seeded LifelongTrainer over a 5-block ViT of width 32 on the 8x8 digits."""
    vit = tiny_vit(stream.n_classes, seed=seed)
    return trainer_for(stream, strategies, seed=seed, batch_size=batch_size, model=vit,
                       optimizer=torch.optim.Adam(vit.parameters(), lr=0.01), **kw)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_state_loads_with_weights_only_and_resumes_exactly(name, stream, tmp_path):
    from cl.training.checkpoint import load_checkpoint

    short = class_incremental(digits(), n_experiences=5)

    def trainer(path=None):
        build = vit_trainer_for if name in ON_A_VIT else trainer_for
        return build(short, [STRATEGIES[name](**SMALL.get(name, {}))], seed=1, batch_size=64,
                     checkpoint_path=path)

    full = trainer().fit(short, stop_after=3)
    first = trainer(str(tmp_path / "c.pt"))
    first.fit(short, stop_after=2)
    state, _ = load_checkpoint(tmp_path / "c.pt")  # weights_only=True
    buf = io.BytesIO()
    torch.save(state["strategies"][0], buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)
    resumed = trainer()
    resumed.load_state_dict(state)
    record = resumed.fit(short, stop_after=3)
    for key in full.matrices:
        np.testing.assert_array_equal(record.matrices[key], full.matrices[key])


def test_cli_shows_a_strategy_in_full(capsys):
    from cl.cli.main import main

    assert main(["strategies", "er_ace"]) == 0
    out = capsys.readouterr().out
    assert "Caccia et al. 2022" in out and "memory_size: int = 500" in out and "replay_batch_size" in out
    assert main(["strategies"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) == len(STRATEGIES) and all(not line.endswith("...") for line in listing)
