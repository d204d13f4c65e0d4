"""DualPrompt: complementary general and expert prompts."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from strategies.context import Batch, Context
from strategies.prompting.base import PromptStrategy
from strategies.prompting.vit import frozen_query, prompted_tokens
from strategies.registry import register_strategy


@register_strategy("dualprompt")
class DualPrompt(PromptStrategy):
    """DualPrompt (Wang, Zhang, Ebrahimi, Sun, Zhang, Lee, Ren, Su, Perot, Dy and Pfister
    2022, "DualPrompt: Complementary Prompting for Rehearsal-free Continual Learning", ECCV).

    A G(eneral)-prompt shared by every task at blocks `g_layers` (the paper's first two,
    0-1) and one E(xpert)-prompt per task at blocks `e_layers` (2-4), both attached by
    prefix tuning: at each such block a prompt gives `length` key and `length` value
    tokens prepended to that block's attention. Each E-prompt e_t has a key k_t. While
    training task t its own E-prompt is used and its key is pulled toward the queries,

        L = CE(g(f(x; g, e_t)), y) + lambda * (1 - cos(q(x), k_t)),   lambda = `match_weight` = 1,

    with q(x) the class feature of the frozen ViT without prompts. At test time a sample
    uses the E-prompt whose key is nearest to its query among the tasks trained so far
    (keys of tasks not yet trained are random). The classifier reads the ViT's own pooling
    (the class token). Layers and the pull weight are the paper's; the lengths (5 and 5) are
    those of the widely used PyTorch port's configuration (CODA-Prompt's re-implementation
    uses 20 for the E-prompt).
    Earlier tasks' E-prompts receive no gradient: training uses only the current one.
    """

    def __init__(self, g_length: int = 5, g_layers: tuple[int, ...] = (0, 1), e_length: int = 5,
                 e_layers: tuple[int, ...] = (2, 3, 4), match_weight: float = 1.0, mask_other_classes: bool = True):
        super().__init__(mask_other_classes)
        if set(g_layers) & set(e_layers):
            raise ValueError(f"DualPrompt: g_layers {list(g_layers)} and e_layers {list(e_layers)} overlap")
        self.g_length, self.g_layers = g_length, tuple(g_layers)
        self.e_length, self.e_layers = e_length, tuple(e_layers)
        self.match_weight = match_weight
        self.task = 0

    def build(self, ctx: Context, dim: int, depth: int) -> nn.Module:
        bad = [i for i in self.g_layers + self.e_layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"DualPrompt: layers {bad} are not blocks of a ViT with {depth} blocks")
        params = nn.Module()
        n_tasks = self.n_tasks(ctx)
        # Per layer, key and value prefixes of `length` tokens (the reference: uniform on [-1, 1]).
        params.g = nn.Parameter(torch.empty(len(self.g_layers), 2, self.g_length, dim).uniform_(-1, 1))
        params.e = nn.Parameter(torch.empty(n_tasks, len(self.e_layers), 2, self.e_length, dim).uniform_(-1, 1))
        params.keys = nn.Parameter(torch.empty(n_tasks, dim).uniform_(-1, 1))
        return params

    def before_experience(self, ctx: Context) -> None:
        super().before_experience(ctx)
        self.task = ctx.experience.index

    def prefixes(self, expert: torch.Tensor, batch_size: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Block index -> (keys, values) prefixes (B, length, D); `expert` (B,) picks each row's E-prompt."""
        out = {}
        for j, layer in enumerate(self.g_layers):
            g = self.params.g[j].unsqueeze(0).expand(batch_size, -1, -1, -1)
            out[layer] = (g[:, 0], g[:, 1])
        for j, layer in enumerate(self.e_layers):
            e = self.params.e[expert, j]  # (B, 2, length, D)
            out[layer] = (e[:, 0], e[:, 1])
        return out

    def forward(self, ctx: Context, batch: Batch) -> None:
        if not self.started:
            return self.plain_forward(ctx, batch)
        vit, B = ctx.model, len(batch.x)
        query = frozen_query(vit, batch.x)
        cos = F.normalize(query, dim=-1) @ F.normalize(self.params.keys, dim=-1).T  # (B, tasks)
        if ctx.training:
            expert = torch.full((B,), self.task, dtype=torch.long, device=batch.x.device)
            batch.losses["dualprompt_match"] = self.match_weight * (1 - cos[:, self.task]).mean()
        else:
            expert = cos[:, :self.task + 1].argmax(dim=1)
        tokens = prompted_tokens(vit, batch.x, prefixes=self.prefixes(expert, B))
        batch.features = vit.forward_head(tokens, pre_logits=True)  # timm's pooling (the class token)
        batch.logits = self.eval_logits(ctx, vit.head(batch.features))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "task": self.task}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.task = state["task"]
