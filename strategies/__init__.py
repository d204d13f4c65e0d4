"""Continual-learning strategies: one module per family, each a `Strategy` with hooks.

`STRATEGIES` names the built-in ones; the lab's registry (`cl.registry`) starts
from it and adds plugins. Nothing here imports `cl`.
"""
from strategies.base import Strategy
from strategies.buffers import ClassBalancedBuffer, ReplayBuffer, ReservoirBuffer, balanced_quotas
from strategies.context import Batch, Context
from strategies.naive import Cumulative, Joint, Naive
from strategies.replay import Replay

STRATEGIES = {"naive": Naive, "cumulative": Cumulative, "joint": Joint, "replay": Replay}

__all__ = [
    "Batch", "ClassBalancedBuffer", "Context", "Cumulative", "Joint", "Naive", "Replay", "ReplayBuffer",
    "ReservoirBuffer", "STRATEGIES", "Strategy", "balanced_quotas",
]
