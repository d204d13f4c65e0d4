"""Prompt methods on a frozen pre-trained timm ViT: L2P, DualPrompt and CODA-Prompt.

`vit.py` runs timm's own ViT modules with prompt tokens or prefix keys and values;
`base.py` is what the methods share (frozen backbone, the strategy's own parameters,
training logits masked to the current classes); one module per method.
"""
from strategies.prompting.base import PromptStrategy
from strategies.prompting.coda import CODAPrompt
from strategies.prompting.dualprompt import DualPrompt
from strategies.prompting.l2p import L2P

__all__ = ["CODAPrompt", "DualPrompt", "L2P", "PromptStrategy"]
