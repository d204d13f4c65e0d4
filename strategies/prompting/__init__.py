"""Prompt methods on a frozen pre-trained timm ViT: L2P, DualPrompt and CODA-Prompt (prompt
pools), APG (a prompt generator) and OVOR (one prompt, outlier-regularised head).

`vit.py` runs timm's own ViT modules with prompt tokens or prefix keys and values;
`base.py` is what the methods share (frozen backbone, the strategy's own parameters,
training logits masked to the current classes); one module per method.
"""
from strategies.prompting.apg import APG
from strategies.prompting.base import PromptStrategy
from strategies.prompting.coda import CODAPrompt
from strategies.prompting.dualprompt import DualPrompt
from strategies.prompting.l2p import L2P
from strategies.prompting.ovor import OVOR

__all__ = ["APG", "CODAPrompt", "DualPrompt", "L2P", "OVOR", "PromptStrategy"]
