"""What the prompt methods share: a frozen timm ViT, learnable prompts owned by the strategy,
a trainable classifier, and training logits masked to the current experience's classes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from strategies.base import Strategy
from strategies.context import Batch, Context
from strategies.prompting.vit import check_vit


#: Subtracted at evaluation from the logits of classes no experience has trained yet: they
#: cannot win against a trained class, yet keep their order among themselves (a task-aware
#: reading of a task not trained yet sees the untrained head, as before any training).
UNTRAINED_OFFSET = 1e4


class PromptStrategy(Strategy):
    """Base of L2P, DualPrompt and CODA-Prompt (and the prompt generators).

    The run's model must be a timm `VisionTransformer`. At setup the whole backbone is
    frozen except its classifier; the strategy's own parameters (`self.params`, a
    module made by `build`) join the optimizer as a group of their own. The strategy owns
    the forward pass and the training loss.

    `mask_other_classes`: the training loss is cross-entropy over the current experience's
    classes only (rows appended by other strategies, e.g. replayed ones, over every class
    trained so far), so the shared head is not pushed away from classes a sample cannot
    belong to. The papers leave it unsaid; the authors' code of all three methods trains
    that way (its `train_mask` option, on by default), and their reported numbers depend on
    it. The mask is applied in the loss only: `batch.logits` stay finite for strategies that
    read them (DER's stored logits, LwF's distillation).

    At evaluation, classes that no experience has trained yet are pushed down by
    `UNTRAINED_OFFSET` (as CODA-Prompt's code keeps only the outputs seen so far): their head
    rows are untrained, and with training masked they would otherwise win whenever the
    trained logits are negative. Neither uses anything from the test data.

    On several processes the strategy's parameters train beside the model's (the trainer's
    data-parallel wrapper averages their gradients too); its terms are means over the rows,
    which the trainer weights, and what it computes at an experience's end (APG's class
    library, OVOR's regularised epochs) every process computes whole, from the same data
    and generators, so each holds the same.

    Each experience starts with fresh optimizer state for the prompts and the classifier,
    as the authors' code builds a new optimizer per task: with Adam, the moments of an
    earlier task would otherwise keep moving prompts and head rows that no longer get
    gradient (an earlier task's E-prompt, CODA's frozen components).
    """

    data_parallel = True

    def __init__(self, mask_other_classes: bool = True):
        self.mask_other_classes = mask_other_classes
        self.params: nn.Module | None = None
        self._current: torch.Tensor | None = None  # bool per class: in the current experience
        self._trained: torch.Tensor | None = None  # bool per class: in an experience trained so far

    # ---------------------------------------------------------------- set-up
    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        vit = ctx.model
        check_vit(vit)
        head = {id(p) for p in vit.get_classifier().parameters()}
        for p in vit.parameters():
            p.requires_grad_(id(p) in head)
        # The prompts' draws leave the run's RNG alone (manual_seed reseeds CUDA too: fork it).
        cuda = [] if ctx.device.type != "cuda" else [ctx.device.index if ctx.device.index is not None
                                                      else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=cuda):
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
        self._current = torch.zeros(n, dtype=torch.bool, device=ctx.device)
        self._current[list(ctx.experience.classes)] = True
        self._trained = torch.zeros(n, dtype=torch.bool, device=ctx.device)
        for e in ctx.stream.experiences[:ctx.experience.index + 1]:
            self._trained[list(e.classes)] = True
        for p in [*self.params.parameters(), *ctx.model.get_classifier().parameters()]:
            ctx.optimizer.state.pop(p, None)

    @property
    def started(self) -> bool:
        """Whether an experience has begun (before that, the prompts are as initialised)."""
        return self._trained is not None

    # --------------------------------------------------------------- forward
    def eval_logits(self, ctx: Context, logits: torch.Tensor) -> torch.Tensor:
        """At evaluation, classes not trained yet pushed below every trained one."""
        if ctx.training or self._trained is None:
            return logits
        return logits - UNTRAINED_OFFSET * (~self._trained).to(logits.dtype)

    def forward(self, ctx: Context, batch: Batch) -> None:
        raise NotImplementedError

    @staticmethod
    def plain_forward(ctx: Context, batch: Batch) -> None:
        """The ViT as it is, without prompts: what is evaluated before any experience (the
        prompts are then only initialised, CODA's components not even that)."""
        vit = ctx.model
        batch.features = vit.forward_head(vit.forward_features(batch.x), pre_logits=True)
        batch.logits = vit.head(batch.features)

    def loss(self, ctx: Context, batch: Batch) -> torch.Tensor:
        if not self.mask_other_classes:
            return F.cross_entropy(batch.logits, batch.y)
        allowed = self._trained.expand(len(batch.y), -1).clone()
        allowed[batch.incoming] = self._current
        return F.cross_entropy(batch.logits.masked_fill(~allowed, float("-inf")), batch.y)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {**super().state_dict(), "params": {k: v.detach().cpu() for k, v in self.params.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.params.load_state_dict(state["params"])

    @staticmethod
    def n_tasks(ctx: Context) -> int:
        return len(ctx.stream.experiences)
