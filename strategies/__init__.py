"""Continual-learning strategies: one module per family, each a `Strategy` with hooks.

`STRATEGIES` names the built-in ones: each class registers itself where it is defined
(`@register_strategy("name")`, `strategies/registry.py`), and importing this package
imports every module in it, subpackages included, so a module dropped into the folder is
registered without editing this file. The lab's registry (`cl.config.registry`) starts
from `STRATEGIES` and adds plugins. Nothing here imports `cl`.
"""
import importlib
import pkgutil

from strategies.base import Strategy
from strategies.buffers import (ClassBalancedBuffer, GreedyBalancedBuffer, HerdingBuffer, ReplayBuffer,
                                ReservoirBuffer, balanced_quotas, herding_order)
from strategies.context import Batch, Context
from strategies.der import DER, DERpp
from strategies.er_ace import ERACE
from strategies.gdumb import GDumb
from strategies.gem import AGEM, GEM
from strategies.icarl import ICaRL
from strategies.lwf import LwF
from strategies.momentum import MomentumWeights
from strategies.naive import Cumulative, Joint, Naive
from strategies.nearest_mean import NearestMean
from strategies.power_law_rehearsal import PowerLawRehearsal
from strategies.prompting import APG, OVOR, CODAPrompt, DualPrompt, L2P
from strategies.registry import STRATEGIES, register_strategy
from strategies.regularization import EWC, L2, MAS, SI, OnlineEWC
from strategies.mixed_replay import MixedReplay
from strategies.replay import Replay
from strategies.slca import SLCA
from strategies.schedules import ConstantLR, InfiniteLR, LRSchedule, Rewarm, WarmupDecay, WarmupStableDecay


def _import_every_module() -> None:
    """Import each module of the package (recursively) once, so that its strategies register."""
    for module in pkgutil.walk_packages(__path__, prefix=f"{__name__}."):
        importlib.import_module(module.name)


_import_every_module()

__all__ = [
    "AGEM", "APG", "Batch", "CODAPrompt", "DualPrompt", "L2P", "EWC", "L2", "LwF", "MAS", "OnlineEWC", "SI", "ClassBalancedBuffer", "Context", "Cumulative", "DER", "DERpp", "ERACE", "GDumb", "GEM",
    "GreedyBalancedBuffer", "HerdingBuffer", "ICaRL", "InfiniteLR", "Joint", "LRSchedule", "MixedReplay", "MomentumWeights", "Naive", "NearestMean", "OVOR",
    "PowerLawRehearsal", "ConstantLR", "Replay", "Rewarm", "WarmupDecay", "WarmupStableDecay", "ReplayBuffer", "ReservoirBuffer", "SLCA", "STRATEGIES", "Strategy",
    "balanced_quotas", "herding_order", "register_strategy",
]
