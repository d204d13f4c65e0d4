"""Continual-learning strategies: one module per family, each a `Strategy` with hooks.

`STRATEGIES` names the built-in ones; the lab's registry (`cl.config.registry`) starts
from it and adds plugins. Nothing here imports `cl`.
"""
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
from strategies.regularization import EWC, L2, MAS, SI, OnlineEWC
from strategies.mixed_replay import MixedReplay
from strategies.replay import Replay
from strategies.slca import SLCA
from strategies.schedules import ConstantLR, InfiniteLR, LRSchedule, Rewarm, WarmupDecay, WarmupStableDecay

STRATEGIES = {
    "naive": Naive, "cumulative": Cumulative, "joint": Joint,
    "replay": Replay, "der": DER, "derpp": DERpp, "er_ace": ERACE, "gdumb": GDumb,
    "gem": GEM, "agem": AGEM,
    "ewc": EWC, "online_ewc": OnlineEWC, "si": SI, "mas": MAS, "l2": L2, "lwf": LwF,
    "icarl": ICaRL, "nearest_mean": NearestMean, "slca": SLCA,
    "l2p": L2P, "dualprompt": DualPrompt, "coda_prompt": CODAPrompt, "apg": APG, "ovor": OVOR,
    "power_law_rehearsal": PowerLawRehearsal,
    "momentum_weights": MomentumWeights,
    "mixed_replay": MixedReplay,
    "constant_lr": ConstantLR, "warmup_decay": WarmupDecay, "rewarm": Rewarm, "wsd": WarmupStableDecay,
    "infinite_lr": InfiniteLR,
}

__all__ = [
    "AGEM", "APG", "Batch", "CODAPrompt", "DualPrompt", "L2P", "EWC", "L2", "LwF", "MAS", "OnlineEWC", "SI", "ClassBalancedBuffer", "Context", "Cumulative", "DER", "DERpp", "ERACE", "GDumb", "GEM",
    "GreedyBalancedBuffer", "HerdingBuffer", "ICaRL", "InfiniteLR", "Joint", "LRSchedule", "MixedReplay", "MomentumWeights", "Naive", "NearestMean", "OVOR",
    "PowerLawRehearsal", "ConstantLR", "Replay", "Rewarm", "WarmupDecay", "WarmupStableDecay", "ReplayBuffer", "ReservoirBuffer", "SLCA", "STRATEGIES", "Strategy",
    "balanced_quotas", "herding_order",
]
