"""Every scenario on real MNIST: sizes, class sets and the invariants each one promises."""
import pytest
import torch

from streams.power_law import fit_exponent
from streams import (blur, class_incremental, mnist, online, permuted, power_law, power_law_schedule,
                     recurrence_rates, rotated)


@pytest.fixture(scope="module")
def data(mnist_root_module):
    return mnist(data_dir=str(mnist_root_module), download=False)


@pytest.fixture(scope="module")
def mnist_root_module():
    from conftest import need_real_data

    return need_real_data("MNIST/raw/train-images-idx3-ubyte")


def test_permuted_mnist_permutes_pixels_and_keeps_labels(data):
    stream = permuted(data, n_experiences=3, seed=5)
    assert len(stream) == 3 and stream.n_tasks == 3
    flat = data.train.x[:100].reshape(100, -1)
    perms = []
    for e in stream:
        assert e.classes == list(range(10)) and e.n_train == 60_000 and e.n_test == 10_000
        assert torch.equal(e.train.y, data.train.y)
        px = e.train.x[:100].reshape(100, -1)
        # The same pixel multiset per image, moved by one permutation shared by all images.
        assert torch.equal(px.sort(1).values, flat.sort(1).values)
        perms.append(px)
    assert not torch.equal(perms[0], perms[1])
    # Permutations are fixed by the seed.
    assert torch.equal(permuted(data, n_experiences=3, seed=5)[2].train.x[:10], stream[2].train.x[:10])
    assert not torch.equal(permuted(data, n_experiences=3, seed=6)[2].train.x[:10], stream[2].train.x[:10])


def test_permutation_is_consistent_across_images_and_splits(data):
    from streams.domain import pixel_permutations

    stream = permuted(data, n_experiences=2, seed=1)
    perm = pixel_permutations(2, 784, 1)[1]
    assert torch.equal(stream[1].train.x.reshape(60_000, -1), data.train.x.reshape(60_000, -1)[:, perm])
    assert torch.equal(stream[1].test.x.reshape(10_000, -1), data.test.x.reshape(10_000, -1)[:, perm])


def test_rotated_mnist_rotates_by_the_given_angles(data):
    stream = rotated(data, angles=[0, 90, 180])
    assert torch.equal(stream[0].train.x, data.train.x)
    assert torch.equal(stream[1].test.x, torch.rot90(data.test.x, 1, (2, 3)))
    assert torch.equal(stream[2].test.x, torch.rot90(data.test.x, 2, (2, 3)))
    assert all(e.classes == list(range(10)) for e in stream)
    # Rotation keeps the ink: total intensity changes little for an arbitrary angle.
    s45 = rotated(data, angles=[45])[0].test.x[:500].float().sum((1, 2, 3))
    s0 = data.test.x[:500].float().sum((1, 2, 3))
    assert ((s45 - s0).abs() / s0).mean() < 0.05


def test_task_incremental_labels(data):
    stream = class_incremental(data, n_experiences=5, task_labels=True)
    assert [e.task_label for e in stream] == [0, 1, 2, 3, 4]
    assert [d.t.unique().tolist() for d in stream.test_sets] == [[0], [1], [2], [3], [4]]
    assert stream.task_classes == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


@pytest.mark.parametrize("overlap", [0.1, 0.3])
def test_blurry_boundaries_share_the_configured_fraction(data, overlap):
    base = class_incremental(data, n_experiences=5)
    stream = blur(base, overlap, seed=0)
    assert sum(e.n_train for e in stream) == 60_000
    for i, e in enumerate(stream):
        own = torch.isin(e.train.y, torch.tensor(base[i].classes))
        foreign_share = 1 - own.float().mean().item()
        assert foreign_share == pytest.approx(overlap, abs=0.02)
        # Foreign samples come from the neighbouring (previous) experience only.
        assert set(e.train.y[~own].tolist()) == set(base[i - 1].classes)
    assert stream.test_sets == base.test_sets


def test_online_stream_pieces_and_evaluation_points(data):
    base = class_incremental(data, n_experiences=5)
    stream = online(base, experience_size=100)
    sizes = [e.n_train for e in stream]
    assert sum(sizes) == 60_000 and max(sizes) == 100
    assert len(stream) == sum(-(-e.n_train // 100) for e in base)
    assert len(stream.eval_after) == 5 and stream.eval_after[-1] == len(stream) - 1
    # Each piece belongs to one task and holds only that task's classes.
    for e in stream.experiences[:: 97]:
        assert set(e.classes) <= set(base[e.task_index].classes)
    assert not stream.one_experience_per_task


@pytest.mark.parametrize("exponent", [0.5, 1.0, 1.5])
def test_power_law_recurrence_follows_the_exponent(exponent):
    schedule = power_law_schedule(n_tasks=10, n_phases=3000, exponent=exponent, p0=0.5, seed=0)
    rates = recurrence_rates(schedule)
    # The share of opportunities at time-since-last-seen dt that recur, against dt: the fitted
    # exponent of p0 * dt^-exponent recovers the configured one.
    assert fit_exponent(rates, 0.5) == pytest.approx(exponent, abs=0.1)
    k1, n1 = rates[1]
    assert k1 / n1 == pytest.approx(0.5, abs=3 * (0.25 / n1) ** 0.5)  # three binomial sds
    far = [(k, n) for dt, (k, n) in rates.items() if dt >= 20]
    assert sum(k for k, _ in far) / sum(n for _, n in far) < 0.5 * 20 ** (-exponent) * 1.5


def test_uniform_control_has_the_same_budget_and_no_power_law():
    pl = power_law_schedule(10, 3000, 1.0, 0.5, seed=3)
    uni = power_law_schedule(10, 3000, 1.0, 0.5, seed=3, control="uniform")
    assert len(uni["recurrences"]) == len(pl["recurrences"])
    assert uni["focus"] == pl["focus"]
    # Recurrence no longer depends on the time since last seen: just after a meeting a task
    # is no likelier to come back than on average.
    rates = recurrence_rates(uni)
    overall = sum(k for k, _ in rates.values()) / sum(n for _, n in rates.values())
    k1, n1 = rates[1]
    assert k1 / n1 == pytest.approx(overall, rel=0.3)
    assert recurrence_rates(pl)[1][0] / recurrence_rates(pl)[1][1] > 3 * overall


def test_power_law_stream_on_mnist(data):
    stream = power_law(data, n_tasks=5, n_phases=20, exponent=1.0, p0=0.8, phase_size=200, recurrence_size=20,
                       seed=0)
    again = power_law(data, n_tasks=5, n_phases=20, exponent=1.0, p0=0.8, phase_size=200, recurrence_size=20,
                      seed=0)
    assert stream.schedule == again.schedule  # deterministic by seed
    assert torch.equal(stream[7].train.x, again[7].train.x)
    assert len(stream) == 20 and stream.n_tasks == 5 and len(stream.eval_after) == 20
    by_phase = {}
    for p, j, _ in stream.schedule["recurrences"]:
        by_phase.setdefault(p, []).append(j)
    for e in stream:
        focus = stream.schedule["focus"][e.index]
        assert e.n_train == 200 + 20 * len(by_phase.get(e.index, []))
        expected = {c for j in [focus] + by_phase.get(e.index, []) for c in stream.task_classes[j]}
        assert set(e.classes) == expected
        assert all(j < focus for j in by_phase.get(e.index, []))  # only earlier tasks recur


def test_bad_scenario_arguments(data):
    with pytest.raises(ValueError, match="overlap"):
        blur(class_incremental(data, n_experiences=5), 1.0)
    with pytest.raises(ValueError, match="experience_size"):
        online(class_incremental(data, n_experiences=5), 0)
    with pytest.raises(ValueError, match="n_phases"):
        power_law_schedule(5, 3, 1.0, 0.5, 0)
