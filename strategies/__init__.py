"""Continual-learning strategies: one module per family, each a `Strategy` with hooks.

Importing this package registers every built-in strategy in `cl.registry.STRATEGIES`.
"""
from strategies.base import Strategy
from strategies.buffers import ClassBalancedBuffer, ReplayBuffer, ReservoirBuffer, balanced_quotas
from strategies.naive import Cumulative, Joint, Naive
from strategies.replay import Replay

__all__ = [
    "ClassBalancedBuffer", "Cumulative", "Joint", "Naive", "Replay", "ReplayBuffer", "ReservoirBuffer",
    "Strategy", "balanced_quotas",
]
