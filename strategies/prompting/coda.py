"""CODA-Prompt: attention-weighted sums of prompt components."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from strategies.context import Batch, Context
from strategies.prompting.base import PromptStrategy
from strategies.prompting.vit import frozen_query, prompted_tokens
from strategies.registry import register_strategy


def gram_schmidt(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Rows of `new` made orthonormal to each other and to the span of the rows of `old`
    (Gram-Schmidt, each projection done twice for numerical safety). Trained old rows need
    not be orthogonal to each other any more, so an orthonormal basis of their span is
    built first; `old` itself is unchanged."""
    if len(new) + len(old) > new.shape[1]:
        raise ValueError(f"cannot make {len(new) + len(old)} vectors of width {new.shape[1]} orthogonal: "
                         f"use fewer components (n_components) or a wider ViT")
    basis: list[torch.Tensor] = []

    def residual(v: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            for b in basis:
                v = v - (v @ b) * b
        return v

    for v in old:
        r = residual(v)
        if r.norm() > 1e-6 * max(v.norm().item(), 1e-12):  # skip rows already in the span
            basis.append(r / r.norm())
    out = []
    for v in new:
        v = F.normalize(residual(v), dim=0)
        basis.append(v)
        out.append(v)
    return torch.stack(out)


@register_strategy("coda_prompt")
class CODAPrompt(PromptStrategy):
    """CODA-Prompt (Smith, Karlinsky, Gutta, Cascante-Bonilla, Kim, Arbelle, Panda, Feris and
    Kira 2023, "CODA-Prompt: COntinual Decomposed Attention-based Prompting for
    Rehearsal-Free Continual Learning", CVPR).

    At each of the blocks `layers` (0-4) a set of `n_components` prompt components
    P_m (`prompt_length` tokens each), keys K_m and attention vectors A_m, split evenly
    across the stream's tasks. With q the frozen ViT's class feature,

        alpha_m = cos(q * A_m, K_m),      p = sum_m alpha_m P_m,

    over the components of the tasks so far; p's first half gives the block's prefix keys
    and its second half the prefix values (prefix tuning). When task t starts, its
    components are initialised orthonormal to all earlier ones (Gram-Schmidt, for P, K
    and A alike); earlier components are detached, so only the current task's components
    and the classifier learn. Defaults are the paper's: 100 components, length 8, layers
    0-4. The optional orthogonality penalty ||B B^T - I||^2 on each of P, K and A has
    weight `ortho_weight`, 0 by default as in the authors' released configuration (the
    initialisation alone keeps new components orthogonal to old ones).
    """

    def __init__(self, n_components: int = 100, prompt_length: int = 8, layers: tuple[int, ...] = (0, 1, 2, 3, 4),
                 ortho_weight: float = 0.0, mask_other_classes: bool = True):
        super().__init__(mask_other_classes)
        if prompt_length % 2:
            raise ValueError(f"CODAPrompt: prompt_length must be even (half keys, half values), got {prompt_length}")
        self.n_components, self.prompt_length = n_components, prompt_length
        self.layers, self.ortho_weight = tuple(layers), ortho_weight
        self.task = 0
        self.per_task = 0  # components per task, known once the stream is (in `build`)

    def build(self, ctx: Context, dim: int, depth: int) -> nn.Module:
        bad = [i for i in self.layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"CODAPrompt: layers {bad} are not blocks of a ViT with {depth} blocks")
        n_tasks = self.n_tasks(ctx)
        if self.n_components < n_tasks:
            raise ValueError(f"CODAPrompt: {self.n_components} components cannot be split over {n_tasks} tasks")
        self.per_task = self.n_components // n_tasks
        L, M = len(self.layers), self.per_task * n_tasks
        params = nn.Module()
        params.P = nn.Parameter(torch.zeros(L, M, self.prompt_length, dim))
        params.K = nn.Parameter(torch.zeros(L, M, dim))
        params.A = nn.Parameter(torch.zeros(L, M, dim))
        return params

    def _span(self, task: int) -> tuple[int, int]:
        return task * self.per_task, (task + 1) * self.per_task

    @torch.no_grad()
    def before_experience(self, ctx: Context) -> None:
        super().before_experience(ctx)
        self.task = ctx.experience.index
        start, end = self._span(self.task)
        for name in ("P", "K", "A"):
            param = getattr(self.params, name)
            for layer in range(len(self.layers)):
                flat = param[layer].flatten(1)  # (M, width)
                new = torch.randn(end - start, flat.shape[1], generator=self.rng).to(flat)
                flat[start:end] = gram_schmidt(new, flat[:start])

    def components(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """P, K, A of one layer over the tasks so far, earlier tasks' detached (frozen)."""
        start, end = self._span(self.task)
        out = []
        for name in ("P", "K", "A"):
            param = getattr(self.params, name)[layer]
            out.append(torch.cat([param[:start].detach(), param[start:end]]))
        return tuple(out)

    def forward(self, ctx: Context, batch: Batch) -> None:
        if not self.started:  # no component is initialised yet
            return self.plain_forward(ctx, batch)
        vit = ctx.model
        query = frozen_query(vit, batch.x)
        half = self.prompt_length // 2
        prefixes = {}
        for j, layer in enumerate(self.layers):
            P, K, A = self.components(j)
            # alpha[b, m] = cos(q_b * A_m, K_m)
            alpha = torch.einsum("bmd,md->bm", F.normalize(query.unsqueeze(1) * A, dim=-1), F.normalize(K, dim=-1))
            p = torch.einsum("bm,mld->bld", alpha, P)
            prefixes[layer] = (p[:, :half], p[:, half:])
        tokens = prompted_tokens(vit, batch.x, prefixes=prefixes)
        batch.features = vit.forward_head(tokens, pre_logits=True)  # timm's pooling (the class token)
        batch.logits = self.eval_logits(ctx, vit.head(batch.features))
        if ctx.training and self.ortho_weight:
            batch.losses["coda_ortho"] = self.ortho_weight * sum(
                self._ortho(t.flatten(1)) for j in range(len(self.layers)) for t in self.components(j))

    @staticmethod
    def _ortho(B: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(len(B), device=B.device, dtype=B.dtype)
        return ((B @ B.T - eye) ** 2).mean()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "task": self.task}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.task = state["task"]
