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
        return tuple(self.data[f].index_select(0, idx) for f in fields)  # cheaper than [idx] per step

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


def herding_order(features: torch.Tensor, m: int) -> torch.Tensor:
    """Herding exemplar selection (Rebuffi et al. 2017, iCaRL, Algorithm 4): with mu the mean
    of the L2-normalised features phi, the k-th exemplar is

        p_k = argmin_x || mu - (phi(x) + sum_{j<k} phi(p_j)) / k ||,

    over samples not chosen yet. Returns the indices of the first `m` in order of choice,
    so a shrinking quota keeps a prefix (iCaRL's ReduceExemplarSet)."""
    phi = torch.nn.functional.normalize(features.float(), dim=1)
    mu = phi.mean(0)
    chosen: list[int] = []
    running = torch.zeros_like(mu)
    available = torch.ones(len(phi), dtype=torch.bool, device=phi.device)
    for k in range(1, min(m, len(phi)) + 1):
        dist = (mu - (running + phi) / k).norm(dim=1)
        dist[~available] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        running += phi[i]
        available[i] = False
    return torch.tensor(chosen, dtype=torch.long)


class HerdingBuffer(ReplayBuffer):
    """Equal memory per class seen so far, each class's exemplars chosen by herding on the
    model's features (Rebuffi et al. 2017) and kept in order of choice: a class whose quota
    shrinks keeps its first exemplars. A class offered again (domain-incremental streams)
    is re-herded over what it holds and the new samples, with the features of now.

    `embed(x)` maps raw rows to features; the strategy passes the model's (`ctx.features`)."""

    def __init__(self, capacity: int, device: torch.device | str = "cpu"):
        super().__init__(capacity, device)
        self.class_seen: dict[int, int] = {}

    def add(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, embed, **fields: torch.Tensor) -> None:
        rows = {"x": x, "y": y, "t": t, **fields}
        self._allocate(rows)
        new_y = y.cpu()
        offered = dict(zip(*(v.tolist() for v in torch.unique(new_y, return_counts=True))))
        for c, n in offered.items():
            self.class_seen[c] = self.class_seen.get(c, 0) + n
        quotas = balanced_quotas(self.class_seen, self.capacity)
        stored_y = self.data["y"][: self.size].cpu()
        parts: list[dict[str, torch.Tensor]] = []
        for c in sorted(quotas):
            have = (stored_y == c).nonzero().squeeze(1)  # in order of choice
            old = {k: v[have.to(self.device)] for k, v in self.data.items()}
            if c not in offered:
                parts.append({k: v[: quotas[c]] for k, v in old.items()})
                continue
            cand = (new_y == c).nonzero().squeeze(1)
            pool = {k: torch.cat([old[k], v[cand.to(getattr(v, "device", "cpu"))].to(self.device)])
                    for k, v in rows.items()}
            order = herding_order(embed(pool["x"]), quotas[c]).to(self.device)
            parts.append({k: v[order] for k, v in pool.items()})
        self.size = sum(len(p["y"]) for p in parts)
        for k in self.data:
            self.data[k][: self.size] = torch.cat([p[k] for p in parts])

    def class_rows(self, c: int) -> torch.Tensor:
        """Rows holding class `c`, in order of choice."""
        return (self.data["y"][: self.size] == c).nonzero().squeeze(1)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "class_seen": {int(c): int(n) for c, n in self.class_seen.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.class_seen = {int(c): int(n) for c, n in state["class_seen"].items()}


class GreedyBalancedBuffer(ReplayBuffer):
    """GDumb's greedy class-balancing sampler (Prabhu et al. 2020): a sample (x, y) is stored
    if the memory has room; otherwise, if its class holds fewer than k / |Y| samples (k the
    capacity, Y the classes seen so far, y included), it replaces a random sample of a
    largest class (ties: the lowest label); otherwise it is dropped. Samples are taken in
    the order they arrive (or in `order`); the decision runs on labels only and the rows
    are copied once."""

    def __init__(self, capacity: int, device: torch.device | str = "cpu"):
        super().__init__(capacity, device)
        self.classes: set[int] = set()

    def add(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, generator: torch.Generator,
            order: torch.Tensor | None = None, **fields: torch.Tensor) -> None:
        """Offer the rows in `order` (a permutation of their indices; default: as given)."""
        rows = {"x": x, "y": y, "t": t, **fields}
        self._allocate(rows)
        slot_label = self.data["y"][: self.size].tolist() + [-1] * (self.capacity - self.size)
        counts: dict[int, int] = {}
        for c in slot_label[: self.size]:
            counts[c] = counts.get(c, 0) + 1
        by_class: dict[int, list[int]] = {}
        for slot, c in enumerate(slot_label[: self.size]):
            by_class.setdefault(c, []).append(slot)
        size, writes, labels = self.size, {}, y.tolist()
        for i in (range(len(labels)) if order is None else order.tolist()):
            c = labels[i]
            self.classes.add(c)
            if size < self.capacity:
                slot, size = size, size + 1
            else:
                if counts.get(c, 0) >= self.capacity / len(self.classes):
                    continue
                largest = max(counts.values())
                victim = min(k for k, n in counts.items() if n == largest)  # ties: the lowest label
                slots = by_class[victim]
                slot = slots.pop(int(torch.randint(len(slots), (1,), generator=generator)))
                counts[victim] -= 1
            counts[c] = counts.get(c, 0) + 1
            by_class.setdefault(c, []).append(slot)
            writes[slot] = i
        if writes:
            self._write(torch.tensor(list(writes.keys())), rows, torch.tensor(list(writes.values())))
        self.size = size

    def state_dict(self) -> dict:
        return {**super().state_dict(), "classes": sorted(self.classes)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.classes = set(state["classes"])
