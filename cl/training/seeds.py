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
    state, with torch's global ones, is part of every checkpoint."""

    def __init__(self, seed: int):
        self.data = torch.Generator().manual_seed(seed)
        self.aug = torch.Generator().manual_seed(seed + 1)
        self.aug_appended = torch.Generator().manual_seed(derive_seed(seed, "augment appended rows"))
        self.aux = torch.Generator().manual_seed(derive_seed(seed, "strategy augmentation"))

    def state_dict(self) -> dict:
        return {"data": self.data.get_state(), "aug": self.aug.get_state(),
                "aug_appended": self.aug_appended.get_state(), "aux": self.aux.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def load_state_dict(self, state: dict) -> None:
        for name in ("data", "aug", "aug_appended", "aux"):
            getattr(self, name).set_state(state[name])
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
