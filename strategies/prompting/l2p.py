"""L2P: Learning to Prompt for continual learning."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from strategies.context import Batch, Context
from strategies.prompting.base import PromptStrategy
from strategies.prompting.vit import classify, frozen_query, prompted_tokens
from strategies.registry import register_strategy


@register_strategy("l2p")
class L2P(PromptStrategy):
    """L2P (Wang, Zhang, Lee, Zhang, Sun, Ren, Su, Perot, Dy and Pfister 2022, "Learning to
    Prompt for Continual Learning", CVPR).

    A pool of `pool_size` prompts P_j (each `prompt_length` tokens of the ViT's width) with
    keys k_j. The query q(x) is the class feature of the frozen pre-trained ViT without
    prompts; the `top_k` prompts whose keys are nearest by cosine distance
    gamma(q, k) = 1 - cos(q, k) are inserted into the embedded sequence (prompt tuning), the
    prompted sequence runs through the frozen ViT, and the classifier reads the average of
    the `top_k * prompt_length` prompt positions at the output. The loss is

        L = CE(g(f_avg(x_p)), y) + lambda * sum over the selected j of gamma(q(x), k_j)

    (the surrogate loss of the paper's eq. 5, averaged over the batch), with the pull
    constraint `match_weight` lambda = 0.1. All prompts and keys stay trainable (the pool is
    shared across tasks). Defaults are the paper's: pool 10, length 5, top 5.

    At test time each sample picks its own prompts. The reference code's batch-wise prompt
    voting, which picks the prompts most chosen across the test batch, lets a sample's
    prediction depend on the other test samples; it is not done here. The paper's optional
    frequency-based diversity penalty is not implemented. Prompt tokens are inserted after
    the class token and take no position embedding.
    """

    def __init__(self, pool_size: int = 10, prompt_length: int = 5, top_k: int = 5, match_weight: float = 0.1,
                 mask_other_classes: bool = True):
        super().__init__(mask_other_classes)
        if not 1 <= top_k <= pool_size:
            raise ValueError(f"L2P: top_k must be between 1 and pool_size ({pool_size}), got {top_k}")
        self.pool_size, self.prompt_length, self.top_k = pool_size, prompt_length, top_k
        self.match_weight = match_weight

    def build(self, ctx: Context, dim: int, depth: int) -> nn.Module:
        params = nn.Module()
        # The reference initialises both uniformly on [-1, 1].
        params.prompts = nn.Parameter(torch.empty(self.pool_size, self.prompt_length, dim).uniform_(-1, 1))
        params.keys = nn.Parameter(torch.empty(self.pool_size, dim).uniform_(-1, 1))
        return params

    def select(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The indices (B, top_k) of each query's nearest keys by cosine, and those cosines."""
        cos = F.normalize(query, dim=-1) @ F.normalize(self.params.keys, dim=-1).T
        sims, idx = cos.topk(self.top_k, dim=1)
        return idx, sims

    def forward(self, ctx: Context, batch: Batch) -> None:
        if not self.started:
            return self.plain_forward(ctx, batch)
        vit = ctx.model
        idx, sims = self.select(frozen_query(vit, batch.x))
        prompt = self.params.prompts[idx].flatten(1, 2)  # (B, top_k * length, D)
        tokens = prompted_tokens(vit, batch.x, prompt=prompt)
        n = vit.num_prefix_tokens
        pooled = tokens[:, n:n + prompt.shape[1]].mean(dim=1)
        batch.features = pooled
        batch.logits = self.eval_logits(ctx, classify(vit, pooled))
        if ctx.training:
            batch.losses["l2p_match"] = self.match_weight * (1 - sims).sum(dim=1).mean()
