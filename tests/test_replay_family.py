"""The replay family and gradient projection keep what their papers promise."""
import math

import numpy as np
import pytest
import torch

from strategies import AGEM, DER, ERACE, GEM, GDumb, PowerLawRehearsal, Replay, Strategy
from strategies.buffers import GreedyBalancedBuffer, HerdingBuffer, herding_order
from strategies.context import Batch, Context
from strategies.power_law_rehearsal import apportion
from conftest import trainer_for


def test_herding_picks_the_exemplars_whose_running_mean_tracks_the_class_mean():
    # Unit vectors at 0, 100, 200, 30 and 60 degrees; their mean is mu = (0.2505, 0.4018).
    # k=1: ||mu - phi_i||      = 0.850, 0.721, 1.404, 0.623, 0.527 -> sample 4
    # k=2: ||mu - (phi_4+phi_i)/2|| = 0.500, 0.531, 0.491, 0.516 for i = 0, 1, 2, 3 -> sample 2
    # k=3: for i = 0, 1, 3: 0.236, 0.466, 0.124 -> sample 3;  k=4: 0.180, 0.213 -> sample 0; then 1.
    angles = [0, 100, 200, 30, 60]
    phi = torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles])
    assert herding_order(phi, 5).tolist() == [4, 2, 3, 0, 1]
    # Not the same as taking the samples nearest the mean (4, 3, 1, 0, 2).
    assert herding_order(3 * phi, 2).tolist() == [4, 2]  # features are L2-normalised first


def test_herding_buffer_keeps_a_prefix_when_quotas_shrink():
    buf = HerdingBuffer(6)
    embed = lambda x: x.float()  # noqa: E731  (the raw rows are the features)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(20, 3, generator=g)
    buf.add(x0, torch.zeros(20, dtype=torch.long), torch.zeros(20, dtype=torch.long), embed)
    first = buf.x[buf.class_rows(0)].clone()
    assert torch.equal(first, x0[herding_order(x0, 6)])
    x1 = torch.randn(20, 3, generator=g)
    buf.add(x1, torch.ones(20, dtype=torch.long), torch.zeros(20, dtype=torch.long), embed)
    assert buf.class_counts() == {0: 3, 1: 3}
    assert torch.equal(buf.x[buf.class_rows(0)], first[:3])  # the first three chosen stay


def test_gdumb_greedy_sampler():
    buf, g = GreedyBalancedBuffer(4), torch.Generator().manual_seed(0)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 0, 2, 2, 2])
    buf.add(torch.arange(10).view(-1, 1), y, torch.zeros(10, dtype=torch.long), g)
    # Four 0s fill it. Classes {0, 1}: a 1 enters while it holds fewer than 4/2, evicting a 0
    # (the largest class) twice -> {0: 2, 1: 2}; the next 0 is dropped (2 is not below 2).
    # Classes {0, 1, 2}: a 2 enters while it holds fewer than 4/3: the first evicts a 0 (0 and 1
    # tie as largest; the lower label goes), the second a 1; the third is dropped.
    assert buf.class_counts() == {0: 1, 1: 1, 2: 2}
    assert sorted(buf.x[buf.y == 2, 0].tolist()) == [7, 8]
    assert set(buf.x[buf.y == 0, 0].tolist()) <= {0, 1, 2, 3} and set(buf.x[buf.y == 1, 0].tolist()) <= {4, 5}


def test_gdumb_trains_from_scratch_on_its_memory_alone(stream):
    sizes = []

    class Spy(Strategy):
        def after_experience(self, ctx, data):
            sizes.append(len(data))

    record = trainer_for(stream, [GDumb(100), Spy()], epochs=3).fit(stream)
    assert sizes == [100] * 5  # each experience trains on the (full) memory only
    assert record.accuracy_matrix[-1].mean() > 0.7


def test_gdumb_memory_is_a_random_sample_of_an_ordered_experience(stream):
    """The greedy sampler keeps the first samples it meets; GDumb feeds it an experience in
    a random order, so a dataset stored in some order (here: by row index) is not kept
    by its first rows."""
    gdumb = GDumb(40)
    trainer_for(stream, [gdumb]).fit(stream, stop_after=1)
    rows = stream[0].train.x.flatten(1)
    kept = [int((rows == x).all(1).nonzero()[0, 0]) for x in gdumb.buffer.x[:40].flatten(1)]
    per_class = {c: [i for i in kept if stream[0].train.y[i] == c] for c in (0, 1)}
    assert all(len(v) == 20 for v in per_class.values())
    n = len(rows)
    # Kept in file order, every row would come from the first ~40 + a few of the experience.
    assert max(kept) > n / 2 and sum(i > n / 2 for i in kept) >= 10


def test_der_stores_the_logits_of_the_step_that_stored_them(stream):
    seen = []

    class Spy(Strategy):
        def after_step(self, ctx, batch):
            seen.append(batch.logits[batch.incoming].detach().clone())

    der = DER(memory_size=1000, replay_batch_size=8)
    trainer_for(stream, [der, Spy()]).fit(stream, stop_after=1)
    stored = der.buffer.data["logits"][: len(der.buffer)]
    # The memory is not full: sample k of the stream sits in slot k, with its step's logits.
    np.testing.assert_array_equal(stored.numpy(), torch.cat(seen).numpy())
    assert not torch.equal(stored[:16], der.buffer.data["logits"][16:32])


def test_der_class_balanced_variant_stores_end_of_experience_logits(stream):
    """avalanche-lib's variant: filled at the experience's end, an equal share per class, with
    the logits of the model as it ended the experience (eval mode)."""
    der = DER(memory_size=60, replay_batch_size=8, memory="class_balanced")
    trainer = trainer_for(stream, [der])
    trainer.fit(stream, stop_after=2)
    n = len(der.buffer)
    x, y = der.buffer.data["x"][:n], der.buffer.data["y"][:n]
    assert n == 60 and sorted(torch.bincount(y).tolist()) == [15, 15, 15, 15]
    trainer.model.eval()
    with torch.no_grad():
        now = trainer.model(stream.transform(x))
    stored = der.buffer.data["logits"][:n]
    second = y >= 2  # stored after experience 2 with the model as it is now
    torch.testing.assert_close(stored[second], now[second])
    assert not torch.allclose(stored[~second], now[~second])  # those kept experience 1's logits
    with pytest.raises(ValueError, match="memory must be"):
        DER(memory="herding")


def test_der_loss_terms(stream):
    record = trainer_for(stream, [DER(200, 16, alpha=0.5, beta=0.5)]).fit(stream, stop_after=2)
    assert set(record.loss_terms) == {"ce", "der_mse", "der_ce"}
    assert all(v > 0 for v in record.loss_terms["der_mse"] + record.loss_terms["der_ce"])


def test_er_ace_gives_no_gradient_to_absent_classes_from_incoming_samples():
    ace = ERACE(memory_size=10)
    logits = torch.randn(6, 10, requires_grad=True)
    batch = Batch(torch.zeros(4, 1), torch.tensor([2, 3, 2, 3]), torch.zeros(4, dtype=torch.long), 4)
    batch.append(ace, torch.zeros(2, 1), torch.tensor([0, 1]), torch.zeros(2, dtype=torch.long))
    batch.logits = logits
    model = torch.nn.Linear(1, 10)
    ace.loss(Context(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu")), batch).backward()
    incoming, replayed = logits.grad[:4], logits.grad[4:]
    absent = [c for c in range(10) if c not in (2, 3)]
    assert torch.all(incoming[:, absent] == 0)  # old (and future) classes untouched by new samples
    assert torch.all(incoming[:, [2, 3]].abs().sum(1) > 0)
    assert torch.all(replayed.abs().sum(1) > 0) and torch.all(replayed[:, 2:] != 0)  # full CE on memory


def test_gem_projection_satisfies_every_memory_constraint():
    g = torch.tensor([1.0, -2.0, 0.5])
    G = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [-1.0, 0.0, 2.0]])
    assert (G @ g < 0).any()
    projected = GEM.project(g, G, margin=0.0)
    assert (G @ projected >= -1e-6).all()  # no earlier task's loss increases to first order
    # The dual QP returns the closest such vector: nothing on the segment towards g does better.
    assert torch.linalg.norm(projected - g) <= torch.linalg.norm(torch.zeros(3) - g)
    # The margin (memory_strength) asks v >= 0.5: the update moves further along every memory
    # gradient, g~ - g = G^T v with each v_k at least 0.5, and the constraints still hold.
    with_margin = GEM.project(g, G, margin=0.5)
    v = torch.linalg.lstsq(G.T.double(), (with_margin - g).double().unsqueeze(1)).solution.squeeze(1)
    assert (v >= 0.5 - 1e-6).all() and (G @ with_margin >= -1e-6).all()


def test_gem_in_training_keeps_its_constraints(stream):
    dots = []

    class Check(Strategy):
        def after_backward(self, ctx, batch):
            if gem.memories:
                g = torch.cat([p.grad.reshape(-1) for p in ctx.model.parameters()])
                grads = [gem._gradient(ctx, m["x"], m["y"], m["t"]) for m in gem.memories]
                dots.append(min(float(gk @ g) for gk in grads))
                # restore the projected gradient for the optimizer
                start = 0
                for p in ctx.model.parameters():
                    p.grad = g[start:start + p.numel()].view_as(p).clone()
                    start += p.numel()

    gem = GEM(patterns_per_experience=30, memory_strength=0.0)
    trainer_for(stream, [gem, Check()]).fit(stream, stop_after=3)
    assert dots and min(dots) > -1e-4


def test_agem_projection_never_opposes_the_reference_gradient(stream):
    checks = []

    class Check(Strategy):
        def after_backward(self, ctx, batch):
            if agem.memories:
                g = torch.cat([p.grad.reshape(-1) for p in ctx.model.parameters()]).clone()
                state = agem.rng.get_state()
                agem.rng.set_state(before["rng"])  # the reference sample A-GEM just drew
                pool = {k: torch.cat([m[k] for m in agem.memories]) for k in ("x", "y", "t")}
                pick = torch.randperm(len(pool["y"]), generator=agem.rng)[: agem.sample_size]
                g_ref = agem._gradient(ctx, pool["x"][pick], pool["y"][pick], pool["t"][pick])
                agem.rng.set_state(state)
                checks.append(float(g @ g_ref))
                start = 0
                for p in ctx.model.parameters():
                    p.grad = g[start:start + p.numel()].view_as(p).clone()
                    start += p.numel()

    class Remember(Strategy):
        def before_iteration(self, ctx):
            before["rng"] = agem.rng.get_state()

    before = {}
    agem = AGEM(patterns_per_experience=40, sample_size=20)
    trainer_for(stream, [Remember(), agem, Check()]).fit(stream, stop_after=3)
    assert checks and min(checks) > -1e-5


def test_apportion_splits_exactly():
    assert apportion(1000, [1 / 4, 1 / 3, 1 / 2, 1]) == [120, 160, 240, 480]
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    assert sum(apportion(997, [0.3, 0.2, 0.1])) == 997


def test_power_law_rehearsal_amounts_follow_the_age_of_each_task(stream):
    def amounts(schedule):
        s = PowerLawRehearsal(budget=1000, alpha=1.0, schedule=schedule)
        trainer_for(stream, [s]).fit(stream)
        return s.amounts

    power = amounts("power_law")
    assert power[0] == {} and power[1] == {0: 1000}
    # Experience 4: tasks 0..3 are 4, 3, 2 and 1 experiences old: shares 1/4 : 1/3 : 1/2 : 1.
    assert power[4] == {0: 120, 1: 160, 2: 240, 3: 480}
    uniform = amounts("uniform")
    assert uniform[4] == {0: 250, 1: 250, 2: 250, 3: 250}
    assert all(sum(p.values()) == sum(u.values()) for p, u in zip(power, uniform))  # equal budgets
    exponential = amounts("exponential")  # decay 0.5: 1/16 : 1/8 : 1/4 : 1/2
    assert exponential[4] == {0: 67, 1: 133, 2: 267, 3: 533}


def test_power_law_rehearsal_sampled_mode_and_its_uniform_control(stream):
    def recurrences(schedule):
        s = PowerLawRehearsal(mode="sampled", schedule=schedule, p0=0.9, recurrence_size=50)
        trainer_for(stream, [s]).fit(stream)
        return [sorted(a) for a in s.amounts]

    power, uniform = recurrences("power_law"), recurrences("uniform")
    assert sum(map(len, power)) == sum(map(len, uniform)) > 0  # the same number of recurrences
    assert power[1] in ([0], [])


def test_power_law_rehearsal_composes_with_lwf_and_beats_naive(stream):
    from strategies import LwF, Naive

    naive = trainer_for(stream, [Naive()]).fit(stream).accuracy_matrix[-1].mean()
    record = trainer_for(stream, [PowerLawRehearsal(budget=200), LwF()]).fit(stream)
    assert set(record.loss_terms) == {"ce", "lwf"}
    assert record.accuracy_matrix[-1].mean() > naive + 0.3


def test_replay_with_herding_memory(stream):
    """A herding memory stays class-balanced and keeps old tasks far above fine-tuning's level
    on the same seed (a margin, not an absolute figure that depends on a lucky draw)."""
    from strategies import Naive

    naive = trainer_for(stream, [Naive()]).fit(stream).accuracy_matrix[-1]
    replay = Replay(100, 16, "herding")
    record = trainer_for(stream, [replay]).fit(stream)
    assert replay.buffer.class_counts() == {c: 10 for c in range(10)}
    old = slice(0, len(stream) - 1)  # the tasks fine-tuning forgets
    assert record.accuracy_matrix[-1][old].mean() > naive[old].mean() + 0.3
