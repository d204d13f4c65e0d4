"""What the prompt methods share: a frozen timm ViT, learnable prompts owned by the strategy,
a trainable classifier, and training logits masked to the current experience's classes."""
from __future__ import annotations

import torch
from torch import nn

from strategies.base import Strategy
from strategies.context import Batch, Context
from strategies.prompting.vit import check_vit


class PromptStrategy(Strategy):
    """Base of L2P, DualPrompt and CODA-Prompt (and the prompt generators).

    The run's model must be a timm `VisionTransformer`. At setup the whole backbone is
    frozen except its classifier; the strategy's own parameters (`self.params`, a
    module made by `build`) join the optimizer as a group of their own. The strategy owns
    the forward pass.

    `mask_past_classes`: while training, logits of classes outside the current experience
    are set to -inf, so the shared head is not pushed away from old classes by samples
    that cannot belong to them. The papers leave it unsaid; the authors' code of all three
    methods trains that way (its `train_mask` option, on by default), and their reported
    numbers depend on it. At evaluation, classes that no experience has trained yet get
    -inf as well (as CODA-Prompt's code keeps only the outputs seen so far): their head
    rows are untrained, and with training masked they would otherwise win whenever the
    trained logits are negative. Neither uses anything from the test data.
    """

    def __init__(self, mask_past_classes: bool = True):
        self.mask_past_classes = mask_past_classes
        self.params: nn.Module | None = None
        self._train_mask: torch.Tensor | None = None  # additive: 0 for allowed classes, -inf for the rest
        self._eval_mask: torch.Tensor | None = None

    # ---------------------------------------------------------------- set-up
    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        vit = ctx.model
        check_vit(vit)
        head = {id(p) for p in vit.get_classifier().parameters()}
        for p in vit.parameters():
            p.requires_grad_(id(p) in head)
        with torch.random.fork_rng(devices=[]):  # the prompts' draws leave the run's RNG alone
            torch.manual_seed(ctx.strategy_seed(self))
            self.params = self.build(ctx, vit.embed_dim, len(vit.blocks)).to(ctx.device)

    def build(self, ctx: Context, dim: int, depth: int) -> nn.Module:
        """The strategy's learnable parameters for a ViT of width `dim` and `depth` blocks."""
        raise NotImplementedError

    def configure_optimizer(self, ctx: Context, param_groups: list[dict]) -> list[dict]:
        groups = []
        for group in param_groups:  # the frozen backbone leaves the optimizer
            params = [p for p in group["params"] if p.requires_grad]
            if params:
                groups.append({**group, "params": params})
        return groups + [{"params": list(self.params.parameters())}]

    def before_experience(self, ctx: Context) -> None:
        n = ctx.stream.n_classes
        self._train_mask = torch.full((n,), float("-inf"), device=ctx.device)
        self._train_mask[list(ctx.experience.classes)] = 0.0
        self._eval_mask = torch.full((n,), float("-inf"), device=ctx.device)
        for e in ctx.stream.experiences[:ctx.experience.index + 1]:
            self._eval_mask[list(e.classes)] = 0.0

    # --------------------------------------------------------------- forward
    def mask_logits(self, ctx: Context, logits: torch.Tensor) -> torch.Tensor:
        """Training: only the current experience's classes (`mask_past_classes`); evaluation:
        only the classes trained so far (before any training, all of them)."""
        if not ctx.training:
            return logits if self._eval_mask is None else logits + self._eval_mask
        return logits + self._train_mask if self.mask_past_classes and self._train_mask is not None else logits

    def forward(self, ctx: Context, batch: Batch) -> None:
        raise NotImplementedError

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {**super().state_dict(), "params": {k: v.detach().cpu() for k, v in self.params.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.params.load_state_dict(state["params"])

    @staticmethod
    def n_tasks(ctx: Context) -> int:
        return len(ctx.stream.experiences)
