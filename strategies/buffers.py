"""Replay memories over preallocated tensors.

A memory stores rows of named tensors: the raw input `x`, the label `y`, the
task label `t`, and any extra per-row fields a strategy gives (the logits of
DER, the features of iCaRL). Storage is allocated once, at the first
insertion, with room for `capacity` rows, on the memory's device (the
training device, when it fits there); inserting and sampling index into it,
so a memory never grows, copies itself, or runs Python per sample.
"""
from __future__ import annotations

import math

import torch


def _fits_on(device: torch.device, n_bytes: int) -> bool:
    """Whether `n_bytes` more fit comfortably (half of what is free) on a CUDA device."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return n_bytes < free // 2


class ReplayBuffer:
    """Fixed-capacity storage of rows with uniform sampling; subclasses choose what to keep."""

    def __init__(self, capacity: int, device: torch.device | str = "cpu"):
        if capacity < 1:
            raise ValueError(f"buffer capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.device = torch.device(device)
        self.size = 0
        self.data: dict[str, torch.Tensor] = {}

    def to(self, device: torch.device | str) -> "ReplayBuffer":
        """Keep the memory on `device` (before anything is stored, or moving what is)."""
        self.device = torch.device(device)
        self.data = {k: v.to(self.device) for k, v in self.data.items()}
        return self

    def _allocate(self, rows: dict[str, torch.Tensor]) -> None:
        if self.data:
            missing = set(self.data) ^ set(rows)
            if missing:
                raise ValueError(f"rows must carry the fields the memory stores ({sorted(self.data)}); "
                                 f"mismatch: {sorted(missing)}")
            return
        # Rows may be lazily read inputs (streams.lazy.LazyInputs): only shape and dtype are used here.
        n_bytes = sum(self.capacity * math.prod(v.shape[1:]) * torch.empty((), dtype=v.dtype).element_size()
                      for v in rows.values())
        if not _fits_on(self.device, n_bytes):
            self.device = torch.device("cpu")
        self.data = {k: torch.empty((self.capacity,) + tuple(v.shape[1:]), dtype=v.dtype, device=self.device)
                     for k, v in rows.items()}

    def _write(self, dst: torch.Tensor, rows: dict[str, torch.Tensor], src: torch.Tensor | None = None) -> None:
        for k, v in rows.items():
            picked = v if src is None else v[src.to(getattr(v, "device", "cpu"))]
            self.data[k][dst.to(self.device)] = picked.to(self.device)

    def __len__(self) -> int:
        return self.size

    @property
    def x(self) -> torch.Tensor | None:
        return self.data.get("x")

    @property
    def y(self) -> torch.Tensor | None:
        return self.data.get("y")

    @property
    def t(self) -> torch.Tensor | None:
        return self.data.get("t")

    def sample(self, n: int, generator: torch.Generator, fields: tuple[str, ...] = ("x", "y", "t")):
        """Draw n stored rows uniformly with replacement; returns the tensors of `fields`."""
        idx = torch.randint(self.size, (n,), generator=generator).to(self.device)
        return tuple(self.data[f][idx] for f in fields)

    def class_counts(self) -> dict[int, int]:
        if not self.size:
            return {}
        labels, counts = torch.unique(self.data["y"][: self.size], return_counts=True)
        return dict(zip(labels.tolist(), counts.tolist()))

    def state_dict(self) -> dict:
        return {"size": self.size, "data": {k: v[: self.size].clone() for k, v in self.data.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.data = {}
        self.size = int(state["size"])
        if state["data"]:
            self._allocate(state["data"])
            for k, v in state["data"].items():
                self.data[k][: self.size] = v.to(self.device)


class ReservoirBuffer(ReplayBuffer):
    """Reservoir sampling (Vitter 1985), as used by experience replay (Chaudhry et al. 2019):
    after n samples were offered, each of them is in memory with probability capacity / n.

    A batch is inserted with the result of inserting its samples one by one:
    sample k of the stream (0-based) goes to slot k while the memory fills, then
    replaces slot j ~ U{0..k} if j < capacity; when two samples of a batch hit
    the same slot the later one wins, as it would sequentially.
    """

    def __init__(self, capacity: int, device: torch.device | str = "cpu"):
        super().__init__(capacity, device)
        self.seen = 0

    def add(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, generator: torch.Generator,
            **fields: torch.Tensor) -> None:
        rows = {"x": x, "y": y, "t": t, **fields}
        self._allocate(rows)
        n = len(y)
        k = torch.arange(self.seen, self.seen + n, dtype=torch.float64)
        draws = (torch.rand(n, generator=generator, dtype=torch.float64) * (k + 1)).long()
        slots = torch.where(k < self.capacity, k.long(), draws)
        src = (slots < self.capacity).nonzero().squeeze(1)
        slot = slots[src]
        # The last sample of the batch that hits a slot is the one that stays: sort by
        # (slot, position) and keep the final entry of each run of equal slots.
        order = torch.argsort(slot * n + src)
        slot, src = slot[order], src[order]
        last = torch.ones_like(slot, dtype=torch.bool)
        last[:-1] = slot[1:] != slot[:-1]
        self._write(slot[last], rows, src[last])
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
    """Equal memory per class seen so far, the fixed budget split evenly over classes as in
    iCaRL (Rebuffi et al. 2017) and GDumb (Prabhu et al. 2020), with random selection.

    Within its quota each class is a uniform random sample of all the samples of
    that class ever offered (reservoir sampling per class, as in class-balanced
    reservoir sampling, Chrysakis and Moens 2020). So a class seen again in a
    later experience (domain-incremental, blurry and power-law streams) admits
    its new samples in proportion, and after k permuted-MNIST tasks each class
    holds about 1/k of its quota from each. A class whose quota shrinks drops a
    random subset of what it holds.
    """

    def __init__(self, capacity: int, device: torch.device | str = "cpu"):
        super().__init__(capacity, device)
        self.class_seen: dict[int, int] = {}

    def add(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, generator: torch.Generator,
            **fields: torch.Tensor) -> None:
        rows = {"x": x, "y": y, "t": t, **fields}
        self._allocate(rows)
        stored_y = self.data["y"][: self.size].cpu()
        new_y = y.cpu()
        offered = dict(zip(*(v.tolist() for v in torch.unique(new_y, return_counts=True))))
        before = dict(self.class_seen)
        for c, n in offered.items():
            self.class_seen[c] = self.class_seen.get(c, 0) + n
        quotas = balanced_quotas(self.class_seen, self.capacity)

        keep_old, take_new = [], []
        for c in sorted(quotas):
            have = (stored_y == c).nonzero().squeeze(1)
            cand = (new_y == c).nonzero().squeeze(1)
            # How many of a uniform sample of `quota` among all the class's samples fall on the
            # new ones: draw it, then take that many new samples and the rest from the stored.
            n_old_seen, quota = before.get(c, 0), quotas[c]
            n_new = int((torch.randperm(n_old_seen + len(cand), generator=generator)[:quota] >= n_old_seen).sum())
            n_new = min(max(n_new, quota - len(have)), len(cand))  # a class short of stored samples refills
            n_old = quota - n_new
            keep_old.append(have[torch.randperm(len(have), generator=generator)[:n_old]])
            take_new.append(cand[torch.randperm(len(cand), generator=generator)[:n_new]])
        old_idx, new_idx = torch.cat(keep_old), torch.cat(take_new)
        kept = {k: v[old_idx.to(self.device)] for k, v in self.data.items()}
        n_old = len(old_idx)
        self.size = n_old + len(new_idx)
        for k, v in kept.items():
            self.data[k][:n_old] = v
        self._write(torch.arange(n_old, self.size), rows, new_idx)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "class_seen": {int(c): int(n) for c, n in self.class_seen.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.class_seen = {int(c): int(n) for c, n in state["class_seen"].items()}
