"""Replay memories keep what their policy promises."""
import pytest
import torch

from strategies.buffers import ClassBalancedBuffer, ReservoirBuffer, balanced_quotas


def _items(n, start=0):
    ids = torch.arange(start, start + n)
    return ids.view(-1, 1).float(), ids % 10, torch.zeros(n, dtype=torch.long)


def sequential_reservoir(capacity, n_total, batch, seed):
    """The textbook one-sample-at-a-time algorithm fed the same random numbers."""
    g = torch.Generator().manual_seed(seed)
    memory, seen = [None] * capacity, 0
    for b in range(0, n_total, batch):
        n = min(batch, n_total - b)
        k = torch.arange(seen, seen + n, dtype=torch.float64)
        draws = (torch.rand(n, generator=g, dtype=torch.float64) * (k + 1)).long().tolist()
        for i in range(n):
            item = b + i
            if seen < capacity:
                memory[seen] = item
            elif draws[i] < capacity:
                memory[draws[i]] = item
            seen += 1
    return memory


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_reservoir_batched_insert_equals_sequential(batch):
    buf, g = ReservoirBuffer(50), torch.Generator().manual_seed(3)
    for b in range(0, 1000, batch):
        x, y, t = _items(min(batch, 1000 - b), b)
        buf.add(x, y, t, g)
    assert buf.x[:, 0].long().tolist() == sequential_reservoir(50, 1000, batch, 3)
    assert len(buf) == 50 and buf.seen == 1000


def test_reservoir_fills_in_order_then_stays_full():
    buf, g = ReservoirBuffer(10), torch.Generator().manual_seed(0)
    buf.add(*_items(6), g)
    assert len(buf) == 6 and buf.x[:6, 0].tolist() == list(range(6))
    buf.add(*_items(100, 6), g)
    assert len(buf) == 10


def test_reservoir_keeps_every_sample_with_equal_probability():
    # Each of 200 items should be kept with probability 20/200 = 0.1.
    counts = torch.zeros(200)
    for seed in range(400):
        buf, g = ReservoirBuffer(20), torch.Generator().manual_seed(seed)
        for b in range(0, 200, 16):
            buf.add(*_items(min(16, 200 - b), b), g)
        counts[buf.x[:, 0].long()] += 1
    rate = counts / 400
    assert rate.mean() == pytest.approx(0.1)
    # Early and late items alike: compare first and last quarters (binomial sd of a quarter mean ~0.0034).
    assert abs(rate[:50].mean() - rate[-50:].mean()) < 0.02
    assert rate.min() > 0.03 and rate.max() < 0.2


def test_balanced_quotas_water_filling():
    assert balanced_quotas({0: 100, 1: 100}, 10) == {0: 5, 1: 5}
    assert balanced_quotas({0: 100, 1: 100, 2: 100}, 10) == {0: 4, 1: 3, 2: 3}
    # A short class keeps all it has; its spare slots go to the others.
    assert balanced_quotas({0: 2, 1: 100, 2: 100}, 10) == {0: 2, 1: 4, 2: 4}
    assert balanced_quotas({0: 1, 1: 1}, 10) == {0: 1, 1: 1}


def test_class_balanced_buffer_stays_balanced_across_experiences():
    buf, g = ClassBalancedBuffer(100), torch.Generator().manual_seed(0)
    first_kept = None
    for exp, classes in enumerate([(0, 1), (2, 3), (4, 5), (6, 7, 8)]):
        y = torch.tensor(classes).repeat_interleave(300)
        x = torch.arange(len(y)).view(-1, 1) + 10_000 * exp
        buf.add(x, y, torch.full_like(y, exp), g)
        counts = buf.class_counts()
        assert sorted(counts) == list(range(max(classes) + 1))
        assert max(counts.values()) - min(counts.values()) <= 1
        assert sum(counts.values()) == 100
        if first_kept is None:
            first_kept = set(buf.x[buf.y[:len(buf)] == 0, 0].tolist())
    # Old classes shrink by dropping samples, never by swapping in new ones.
    assert set(buf.x[buf.y[:len(buf)] == 0, 0].tolist()) <= first_kept


def test_buffer_state_dict_round_trip():
    buf, g = ReservoirBuffer(30), torch.Generator().manual_seed(0)
    buf.add(*_items(100), g)
    clone = ReservoirBuffer(30)
    clone.load_state_dict(buf.state_dict())
    assert torch.equal(clone.x[:30], buf.x[:30]) and torch.equal(clone.y[:30], buf.y[:30]) and clone.seen == 100
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    buf.add(*_items(50, 100), a)
    clone.add(*_items(50, 100), b)
    assert torch.equal(clone.x, buf.x)


def test_sample_draws_only_stored_items():
    buf, g = ReservoirBuffer(100), torch.Generator().manual_seed(0)
    buf.add(*_items(7), g)
    x, y, t = buf.sample(64, g)
    assert set(x[:, 0].long().tolist()) <= set(range(7)) and len(y) == 64


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity"):
        ReservoirBuffer(0)


def test_replay_rejects_bad_arguments():
    from strategies import Replay

    with pytest.raises(ValueError, match="policy"):
        Replay(policy="fifo")
    with pytest.raises(ValueError, match="replay_batch_size"):
        Replay(replay_batch_size=0)
    with pytest.raises(ValueError, match="capacity"):
        Replay(memory_size=0)


def test_buffers_store_extra_fields_row_by_row():
    """DER keeps the logits a sample had when it was stored; they travel with the sample."""
    buf, g = ReservoirBuffer(40), torch.Generator().manual_seed(0)
    for b in range(0, 200, 16):
        x, y, t = _items(min(16, 200 - b), b)
        buf.add(x, y, t, g, logits=x.repeat(1, 3) * 2)  # a field derived from the sample
    assert buf.data["logits"].shape == (40, 3)
    assert torch.equal(buf.data["logits"][:, 0], buf.x[:, 0] * 2)
    x, logits = buf.sample(64, g, fields=("x", "logits"))
    assert torch.equal(logits[:, 2], x[:, 0] * 2)
    with pytest.raises(ValueError, match="fields the memory stores"):
        buf.add(*_items(4), g)  # without the logits
    clone = ReservoirBuffer(40)
    clone.load_state_dict(buf.state_dict())
    assert torch.equal(clone.data["logits"], buf.data["logits"])


def test_class_balanced_memory_admits_every_permuted_mnist_task(mnist_root):
    """Every task has every class: new samples of a class share its quota with the old ones."""
    from streams import mnist, permuted

    stream = permuted(mnist(data_dir=str(mnist_root), download=False), n_experiences=10, task_labels=True)
    buf, g = ClassBalancedBuffer(500), torch.Generator().manual_seed(0)
    for k, exp in enumerate(stream):
        buf.add(exp.train.x, exp.train.y, exp.train.t, g)
        tasks, per_task = torch.unique(buf.t[:len(buf)], return_counts=True)
        assert tasks.tolist() == list(range(k + 1))  # every task so far is in memory
        # ... in about equal shares (a hypergeometric draw per class: 500/(k+1) each, give or take).
        share = 500 / (k + 1)
        assert per_task.min() > 0.6 * share and per_task.max() < 1.4 * share
        assert set(buf.class_counts().values()) == {50}


def test_class_balanced_memory_is_uniform_within_a_class():
    """After offering a class in several batches, every sample of it is kept with equal chance."""
    counts = torch.zeros(300)
    for seed in range(300):
        buf, g = ClassBalancedBuffer(30), torch.Generator().manual_seed(seed)
        for part in range(3):  # three experiences of 100 samples of one class
            ids = torch.arange(100 * part, 100 * (part + 1))
            buf.add(ids.view(-1, 1).float(), torch.zeros(100, dtype=torch.long), torch.zeros(100, dtype=torch.long), g)
        counts[buf.x[:, 0].long()] += 1
    rate = counts / 300  # each of 300 samples kept with probability 30/300 = 0.1
    for third in rate.view(3, 100):
        assert third.mean() == pytest.approx(0.1, abs=0.01)
