"""Which strategies of a run answer which hook (`strategies.base` gives the rules): every
hook's strategies in list order, the one owner of each single-owner hook, and the one
owner of the learning rate. Two owners are an error when the trainer is built."""
from __future__ import annotations

from typing import Sequence

from strategies.base import SINGLE_OWNER_HOOKS, Strategy, overrides

HOOKS = ("configure_optimizer", "before_experience", "training_data", "before_iteration", "adapt_batch",
         "extra_loss", "after_backward", "after_step", "after_experience", "before_evaluation")
BOUNDARY_HOOKS = ("before_experience", "training_data", "after_experience", "before_evaluation")


def hook_table(strategies: Sequence[Strategy]) -> dict[str, list[Strategy]]:
    """Each hook's strategies, in list order; a hook a strategy does not override costs nothing,
    and a task-free strategy is never told of boundaries."""
    return {h: [s for s in strategies if overrides(s, h) and not (s.task_free and h in BOUNDARY_HOOKS)]
            for h in HOOKS}


def single_owners(strategies: Sequence[Strategy]) -> dict[str, Strategy | None]:
    out = {}
    for hook in SINGLE_OWNER_HOOKS:
        owners = [s for s in strategies if overrides(s, hook)]
        if len(owners) > 1:
            names = ", ".join(type(s).__name__ for s in owners)
            raise ValueError(f"hook '{hook}' has one owner per run, but {names} all implement it")
        out[hook] = owners[0] if owners else None
    return out


def lr_owner(strategies: Sequence[Strategy], scheduler) -> Strategy | None:
    """The strategy that sets the LR (`owns_lr`), if any; with an experiment's scheduler too, an error."""
    owners = [s for s in strategies if s.owns_lr]
    if len(owners) > 1 or (owners and scheduler is not None):
        names = [type(s).__name__ for s in owners] + (["training.scheduler"] if scheduler is not None else [])
        raise ValueError(f"the learning rate has more than one owner: {', '.join(names)}; keep one")
    return owners[0] if owners else None
