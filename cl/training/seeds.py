"""Seeds of a run's parts, derived from the run seed and a name, so that adding one part
(a strategy, an augmentation stream) never changes what another draws."""
from __future__ import annotations

import hashlib
import random
from typing import Sequence

import numpy as np
import torch

from strategies.base import Strategy


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators, as a run starts building its parts."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def derive_seed(seed: int, name: str) -> int:
    """A 63-bit seed for the part of a run called `name`, independent of every other name."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def strategy_seeds(seed: int, strategies: Sequence[Strategy]) -> dict[int, int]:
    """A seed per strategy from the run seed, its class and how many of that class came
    before it, so adding or reordering other strategies leaves its draws unchanged."""
    seen: dict[str, int] = {}
    out = {}
    for s in strategies:
        name = f"{type(s).__module__}.{type(s).__qualname__}"
        k = seen[name] = seen.get(name, -1) + 1
        out[id(s)] = derive_seed(seed, f"{name}#{k}")
    return out


class RunGenerators:
    """The run's random generators, one per use: data order, augmentation of the incoming
    rows, of appended (replayed) rows, and of strategies' own `ctx.prepare(augment=True)`;
    adding a strategy that samples or appends never changes what the others draw. Their
    state, with torch's global ones, is part of every checkpoint.

    On several processes these are the same on every one (each holds the whole batch, drawn
    alike), but torch's global generators, which dropout draws its masks from, are each
    process's own once training starts (`split_global`): with one stream for all, the rows
    r and r + 1 that two processes hold would get the same masks. Process 0 keeps the run's
    own stream, so what it draws for every process (a model re-initialised, as GDumb does,
    which DistributedDataParallel then copies from it) is what one process draws. A
    checkpoint keeps every process's; resumed on another number of processes, the others
    are seeded afresh."""

    def __init__(self, seed: int, rank: int = 0, world: int = 1):
        self.seed, self.rank, self.world = seed, rank, world
        self.data = torch.Generator().manual_seed(seed)
        self.aug = torch.Generator().manual_seed(seed + 1)
        self.aug_appended = torch.Generator().manual_seed(derive_seed(seed, "augment appended rows"))
        self.aux = torch.Generator().manual_seed(derive_seed(seed, "strategy augmentation"))

    def split_global(self, iteration: int = 0) -> None:
        """Seed torch's global generators for this process alone (nothing on one process, nor
        on process 0, which goes on with the run's)."""
        if self.rank > 0:
            torch.manual_seed(derive_seed(self.seed, f"process {self.rank} of {self.world} at {iteration}"))

    def state_dict(self) -> dict:
        """On several processes every one must call it, at the same point (it gathers their
        global generators' states)."""
        own = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        if self.world > 1:
            import torch.distributed as dist

            every = [None] * self.world
            dist.all_gather_object(every, own)
            own = {"torch": [s["torch"] for s in every], "cuda": [s["cuda"] for s in every]}
        return {"data": self.data.get_state(), "aug": self.aug.get_state(),
                "aug_appended": self.aug_appended.get_state(), "aux": self.aux.get_state(), **own}

    def load_state_dict(self, state: dict, iteration: int = 0) -> None:
        for name in ("data", "aug", "aug_appended", "aux"):
            getattr(self, name).set_state(state[name])
        saved, cuda = state["torch"], state["cuda"]
        own = isinstance(saved, list) and len(saved) == self.world  # saved by as many processes: each its own
        if isinstance(saved, list):
            saved, cuda = saved[self.rank if own else 0], cuda[self.rank if own else 0]
        torch.set_rng_state(saved)
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        if not own:  # saved by one process, or by another number: the others are seeded afresh
            self.split_global(iteration)
