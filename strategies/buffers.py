"""Replay memories over preallocated tensors.

Storage is allocated once, at the first insertion, with room for `capacity`
samples; inserting and sampling index into it, so a buffer never grows,
copies itself, or runs per-sample Python.
"""
from __future__ import annotations

import torch


class ReplayBuffer:
    """Fixed-capacity storage of (x, y, t) with uniform sampling; subclasses choose what to keep."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"buffer capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.size = 0
        self.x: torch.Tensor | None = None
        self.y = torch.empty(capacity, dtype=torch.long)
        self.t = torch.empty(capacity, dtype=torch.long)

    def _allocate(self, x: torch.Tensor) -> None:
        if self.x is None:
            self.x = torch.empty((self.capacity,) + tuple(x.shape[1:]), dtype=x.dtype)

    def __len__(self) -> int:
        return self.size

    def sample(self, n: int, generator: torch.Generator):
        """Draw n stored samples uniformly with replacement."""
        idx = torch.randint(self.size, (n,), generator=generator)
        return self.x[idx], self.y[idx], self.t[idx]

    def class_counts(self) -> dict[int, int]:
        labels, counts = torch.unique(self.y[: self.size], return_counts=True)
        return dict(zip(labels.tolist(), counts.tolist()))

    def state_dict(self) -> dict:
        return {"size": self.size, "x": None if self.x is None else self.x[: self.size].clone(),
                "y": self.y[: self.size].clone(), "t": self.t[: self.size].clone()}

    def load_state_dict(self, state: dict) -> None:
        self.size = int(state["size"])
        if state["x"] is not None:
            self._allocate(state["x"])
            self.x[: self.size] = state["x"]
        self.y[: self.size] = state["y"]
        self.t[: self.size] = state["t"]


class ReservoirBuffer(ReplayBuffer):
    """Reservoir sampling (Vitter 1985), as used by experience replay (Chaudhry et al. 2019):
    after n samples were offered, each of them is in memory with probability capacity / n.

    A batch is inserted with the result of inserting its samples one by one:
    sample k of the stream (0-based) goes to slot k while the memory fills, then
    replaces slot j ~ U{0..k} if j < capacity; when two samples of a batch hit
    the same slot the later one wins, as it would sequentially.
    """

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.seen = 0

    def add(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> None:
        self._allocate(x)
        n = len(y)
        k = torch.arange(self.seen, self.seen + n, dtype=torch.float64)
        draws = (torch.rand(n, generator=generator, dtype=torch.float64) * (k + 1)).long().tolist()
        # Once full, only about capacity/seen of a batch is kept: decide on the few ints in
        # Python and touch the tensors once, instead of a dozen tensor ops per batch.
        winners: dict[int, int] = {}
        for i, j in enumerate(draws):
            slot = self.seen + i if self.seen + i < self.capacity else j
            if slot < self.capacity:
                winners[slot] = i  # a later sample that hits the same slot replaces the earlier one
        if winners:
            dst = torch.tensor(list(winners.keys()))
            src = torch.tensor(list(winners.values()))
            self.x[dst] = x[src]
            self.y[dst] = y[src]
            self.t[dst] = t[src]
        self.seen += n
        self.size = min(self.capacity, self.seen)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.seen = int(state["seen"])


def balanced_quotas(available: dict[int, int], capacity: int) -> dict[int, int]:
    """Split `capacity` slots as evenly as possible over classes, never giving a
    class more than it has: classes short of the even share keep all they
    have and their unused slots go to the others (water-filling)."""
    quotas: dict[int, int] = {}
    remaining = capacity
    pending = sorted(available, key=lambda c: (available[c], c))
    while pending:
        share, extra = divmod(remaining, len(pending))
        c = pending[0]
        if available[c] <= share:
            quotas[c] = available[c]
            remaining -= available[c]
            pending.pop(0)
            continue
        # Every pending class can fill the even share: hand it out, remainder to the lowest labels.
        for i, c in enumerate(sorted(pending)):
            quotas[c] = share + (1 if i < extra else 0)
        break
    return quotas


class ClassBalancedBuffer(ReplayBuffer):
    """Equal memory per class seen so far: the fixed budget split evenly over
    classes of iCaRL (Rebuffi et al. 2017) and GDumb (Prabhu et al. 2020), with
    random rather than herding selection.

    On each `add` of an experience's data, old classes shrink to their new
    quota by dropping their most recently kept samples, and each new class
    fills its quota with a random subset of its samples.
    """

    def add(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> None:
        self._allocate(x)
        stored = self.class_counts()
        new_labels, new_counts = torch.unique(y, return_counts=True)
        available = dict(stored)
        for c, n in zip(new_labels.tolist(), new_counts.tolist()):
            available[c] = available.get(c, 0) + n
        quotas = balanced_quotas(available, self.capacity)

        keep_x, keep_y, keep_t = [], [], []
        old_y = self.y[: self.size]
        for c in sorted(quotas):
            have = (old_y == c).nonzero().squeeze(1)
            from_old = have[: quotas[c]]
            keep_x.append(self.x[from_old]); keep_y.append(self.y[from_old]); keep_t.append(self.t[from_old])
            need = quotas[c] - len(from_old)
            if need > 0:
                cand = (y == c).nonzero().squeeze(1)
                pick = cand[torch.randperm(len(cand), generator=generator)[:need]]
                keep_x.append(x[pick]); keep_y.append(y[pick]); keep_t.append(t[pick])
        new_x, new_y, new_t = torch.cat(keep_x), torch.cat(keep_y), torch.cat(keep_t)
        self.size = len(new_y)
        self.x[: self.size] = new_x
        self.y[: self.size] = new_y
        self.t[: self.size] = new_t
