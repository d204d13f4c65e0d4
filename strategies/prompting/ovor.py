"""OVOR: one shared prompt, then the classifier regularised with virtual outliers.

Huang, Chen and Hsu 2024, "OVOR: OnePrompt with Virtual Outlier Regularization for
Rehearsal-Free Class-Incremental Learning", ICLR (arXiv 2402.04129). Two parts:

- OnePrompt: a single prompt shared by every task, attached by prefix tuning, that keeps
  training from task to task. With no pool there is no query, so no extra pass of the frozen
  ViT: one forward per sample.
- Virtual outlier regularisation (VOR): after the ordinary epochs of an experience, a few
  "regularised" epochs train the classifier head alone on the features of the experience's
  training rows together with virtual outliers synthesised near the class boundaries, with
  cross-entropy on the inliers plus an energy-score hinge on inliers and outliers.

The functions below (`kth_neighbour_distance`, `boundary_points`, `synthesise_outliers`,
`energy`, `energy_hinge`) are the pieces of VOR; `OVOR` puts them into the lab's hooks.

Sources: the paper's abstract and Figure 2 (a: prompt and head trained with cross-entropy;
b: prompt frozen, features of the task's inputs computed and virtual outliers generated from
them; c: the head alone updated with cross-entropy and the regularisation loss), its outlier
synthesis being NPOS's (Tao, Du, Zhu and Li 2023, "Non-Parametric Outlier Synthesis", ICLR:
boundary samples by k-NN distance on normalised embeddings, Gaussian noise around them, the
candidates farthest from the data kept), and, for the numbers, the authors' released code
(github.com/jpmorganchase/ovor: `configs/common.yaml`, `learners/ood.py`,
`experiments/*.sh`), read for facts only. Where code and paper differ the paper's
description is implemented; each such place is named in `OVOR`'s docstring.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from strategies.context import Batch, Context, eval_mode
from strategies.prompting.base import PromptStrategy
from strategies.prompting.vit import prompted_tokens
from strategies.registry import register_strategy
from streams.experience import TensorData


# ----------------------------------------------------------------------------- VOR pieces
def kth_neighbour_distance(queries: torch.Tensor, points: torch.Tensor, k: int, exclude_self: bool = False,
                           chunk: int = 4096) -> torch.Tensor:
    """Euclidean distance from each row of `queries` to its k-th nearest row of `points`
    (k = 1: the nearest). With `exclude_self`, `queries` are `points` themselves and a row is
    not its own neighbour. `k` is clamped to the number of neighbours there are."""
    available = len(points) - (1 if exclude_self else 0)
    if available < 1:
        return torch.zeros(len(queries), dtype=points.dtype, device=points.device)
    k = min(k, available)
    out = []
    for start in range(0, len(queries), chunk):
        d = torch.cdist(queries[start:start + chunk], points)
        if exclude_self:
            rows = torch.arange(d.shape[0], device=d.device)
            d[rows, rows + start] = float("inf")
        out.append(d.kthvalue(k, dim=1).values)
    return torch.cat(out)


def boundary_points(features: torch.Tensor, labels: torch.Tensor, k: int, per_class: int) -> torch.Tensor:
    """Indices of each class's boundary points, the non-parametric rule of NPOS (Tao, Du, Zhu and
    Li 2023) that OVOR adopts: features are L2-normalised, each point's distance to its k-th
    nearest neighbour among the other points of its class is taken, and the `per_class` points
    of each class with the largest such distance are its boundary points (the sparsest places of
    the class, where its decision boundary lies). Classes in increasing order; within a class,
    by decreasing distance, ties by index. A class of one point gives that point."""
    z = F.normalize(features.float(), dim=1)
    chosen = []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().squeeze(1)
        dist = kth_neighbour_distance(z[idx], z[idx], k, exclude_self=True)
        order = torch.sort(dist, descending=True, stable=True).indices
        chosen.append(idx[order[:per_class]])
    return torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long, device=features.device)


def synthesise_outliers(features: torch.Tensor, labels: torch.Tensor, boundary: torch.Tensor, per_class: int,
                        std: float, candidates: int, k: int, generator: torch.Generator,
                        chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Virtual outliers around the boundary points `features[boundary]`, and for each the index
    (into `features`) of the boundary point it was drawn around.

    In the L2-normalised space, each boundary point b^ gets `candidates` candidates
    v = b^ + std * eps, eps ~ N(0, I). NPOS's rejection step keeps the candidates farthest from
    the data (distance to their k-th nearest inlier, every normalised feature given, all
    classes): each boundary point keeps its ceil(`per_class` / boundary points of its class)
    farthest candidates, and of those the class keeps its `per_class` farthest. Ranking per
    boundary point first spreads the outliers over the whole boundary: ranked all together,
    the few most isolated boundary points would take every place. A kept candidate is returned
    at its boundary point's own scale, o = ||b|| v = b + std ||b|| eps, as the head is trained
    on unnormalised features: with `std` 0 each outlier is exactly its boundary point. The noise
    is drawn on the CPU from `generator` (the same draws on any device), class by class in
    increasing order, `chunk` boundary points at a time."""
    d = features.shape[1]
    x = features.float()
    z = F.normalize(x, dim=1)
    norms = x.norm(dim=1, keepdim=True)
    outs, sources = [], []
    for c in torch.unique(labels[boundary]).tolist():
        mine = boundary[labels[boundary] == c]
        each = min(candidates, -(-per_class // len(mine)))  # kept per boundary point
        scores, kept, srcs = [], [], []
        for start in range(0, len(mine), chunk):
            points = mine[start:start + chunk]
            src = points.repeat_interleave(candidates)
            eps = torch.randn(len(src), d, generator=generator).to(x.device)
            score = kth_neighbour_distance(z[src] + std * eps, z, k).view(len(points), candidates)
            best = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :each]  # per point
            rows = (best + candidates * torch.arange(len(points), device=x.device).unsqueeze(1)).flatten()
            scores.append(score.flatten()[rows])
            kept.append(x[src[rows]] + (std * norms[src[rows]]) * eps[rows])
            srcs.append(src[rows])
        score, out, src = torch.cat(scores), torch.cat(kept), torch.cat(srcs)
        keep = torch.sort(score, descending=True, stable=True).indices[:per_class]
        outs.append(out[keep])
        sources.append(src[keep])
    if not outs:
        return features.new_zeros(0, d), torch.zeros(0, dtype=torch.long, device=features.device)
    return torch.cat(outs).to(features.dtype), torch.cat(sources)


def energy(logits: torch.Tensor) -> torch.Tensor:
    """The energy score E(x) = -logsumexp_j f_j(x) (Liu, Wang, Owens and Li 2020): low for inliers."""
    return -torch.logsumexp(logits, dim=1)


def energy_hinge(inlier_energy: torch.Tensor, outlier_energy: torch.Tensor, inlier_margin: float,
                 outlier_margin: float, huber_delta: float | None = 1.0) -> torch.Tensor:
    """mean H(ReLU(E_in - m_in)) + mean H(ReLU(m_out - E_out)): inliers are pushed below the
    energy `inlier_margin`, outliers above `outlier_margin`; a point on its side of its margin
    costs nothing. H is the Huber loss against 0 (quadratic up to `huber_delta`, then linear),
    or the square without `huber_delta`. An empty set contributes 0."""
    def penalty(gap: torch.Tensor) -> torch.Tensor:
        if not len(gap):
            return gap.sum()
        gap = F.relu(gap)
        if huber_delta is None:
            return (gap ** 2).mean()
        return F.huber_loss(gap, torch.zeros_like(gap), delta=huber_delta)

    return penalty(inlier_energy - inlier_margin) + penalty(outlier_margin - outlier_energy)


# ---------------------------------------------------------------------------- the strategy
@register_strategy("ovor")
class OVOR(PromptStrategy):
    """OVOR (Huang, Chen and Hsu 2024, "OVOR: OnePrompt with Virtual Outlier Regularization for
    Rehearsal-Free Class-Incremental Learning", ICLR, arXiv 2402.04129).

    OnePrompt. One prompt for the whole stream, attached by prefix tuning (Li and Liang 2021):
    at block `layers[i]` it gives `lengths[i]` key tokens and as many value tokens, prepended to
    that block's attention. The paper keeps DualPrompt's prompt placement and sizes but drops
    the pool: what was the G-prompt (blocks 0-1) and a single E-prompt (blocks 2-4) become one
    prompt trained on every task. The defaults are the authors' released configuration
    (`prompt_param 10 40 10`: 5 key + 5 value tokens at blocks 0-1, 20 + 20 at blocks 2-4,
    CODA-Prompt's re-implementation of DualPrompt's sizes); the tokens are initialised
    uniformly on [0, 1) as their code does. No query: the prompted ViT runs once per sample.
    The classifier reads the ViT's own pooling (the class token). Training is cross-entropy
    over the current experience's classes (the base's mask; the authors' code masks the same
    way, and its VOR cross-entropy too). Before any experience the plain ViT is evaluated.

    Virtual outlier regularisation, after the ordinary epochs of each experience:

    1. Features. The prompt is frozen for the phase (it trains again in the next
       experience); the pooled pre-logit features of the
       experience's training rows through the prompted ViT are computed once (`ctx.embed`:
       eval mode, no augmentation) and cached for the phase. (The authors' code recomputes them
       each regularised epoch from the augmented loader; with augmentation off that is the same.)
    2. Boundary points (`boundary_points`): per class of the experience, on L2-normalised
       features, the `boundary_per_class` points whose distance to their `k`-th nearest
       neighbour within the class is largest (NPOS's rule, which selects boundary samples
       class by class; k = 50 and 50 points are the authors' `K` and `select`; their code
       ranks the whole task's features together instead of each class's).
    3. Outliers (`synthesise_outliers`): `candidates` (600, the code's `sample_from`) Gaussian
       draws of std `noise_std` (0.1, the authors' `cov: 0.1`, which multiplies unit noise, so
       it is a standard deviation) around each normalised boundary point; of each class's
       candidates the `outliers_per_class` (40, `num_per_class`) farthest from the inliers
       (k-th nearest inlier of any class, same k) are kept, at their boundary point's scale,
       at most ceil(40 / 50) = 1 per boundary point. (The code ranks all classes' candidates
       together, keeping 40 times the number of classes; ranked together, the most isolated
       boundary points take nearly every place, so the ranking is done per boundary point,
       then per class, which keeps the whole boundary represented.) Drawn afresh each
       regularised epoch from the strategy's seeded generator. Scale: the noise's length is
       about `noise_std` sqrt(d), 1.4 for a width of 192 (2.8 for ViT-B's 768) against unit
       features, so an outlier keeps only a cosine of about 0.5-0.6 with its boundary point:
       near it, in a shell, rather than on the boundary itself. That is the authors' value
       (NPOS's embeddings are of a similar width); lower `noise_std` for closer outliers.
       The released code adds its noise to nothing: its outliers are pure noise, N(0, 0.01 I),
       and the boundary points it computes are never used. The paper's description (noise
       around boundary points) is what is implemented.
    4. Loss, on batches of `vor_batch_size` (128) inliers and an equal share of the outliers:
       cross-entropy of the inliers over the experience's classes plus
           `vor_weight` * [ mean H(ReLU(E(x_in) - m_in)) + mean H(ReLU(m_out - E(o))) ],
       E(x) = -logsumexp of the logits of the experience's classes (the energy uses the
       current task's logits, as the classifier that separates this task's classes from what
       lies outside them; the authors' code slices the current task's logits for both terms;
       old classes' rows are left to their own tasks), m_in = `inlier_margin` = -15,
       m_out = `outlier_margin` = -3, `vor_weight` = 0.1, H the Huber loss (delta 1; `huber`
       False: squared hinge, the form of Liu et al. 2020's energy loss). Values are the
       authors' configuration (`thres_id`, `thres_ood`, `lmda`, `huber`).
    5. Optimiser: the head alone, by an Adam of the phase's own (fresh state, the paper's Adam
       at `vor_lr` 1e-3, betas (0.9, 0.999), constant LR). The authors continue their run's
       optimizer and cosine schedule into these epochs; a separate optimizer keeps the run's
       LR schedule and its optimizer state untouched. The prompt and backbone get no gradient
       (bitwise unchanged by the phase).

    `vor_epochs`: the authors train 40 ordinary + 10 regularised epochs per task on ImageNet-R
    and 16 + 4 on CIFAR-100 (their `--epochs 0 40 10` and `0 16 4`): a fifth of the epochs,
    a quarter as many regularised epochs as ordinary ones. The lab's experiments run one
    ordinary epoch per experience, so the default is 1 regularised epoch (that proportion,
    0.25, rounded up to the smallest whole epoch; the phase runs on cached features and is
    cheap). `vor_epochs` 0 is OnePrompt alone. `vor_batch_size` 128 is the authors' batch
    size.

    Where the paper and its code leave a point open: a class with fewer than k + 1 rows uses
    all its other rows as neighbours (k clamped); `boundary_per_class` is clamped to the class
    size; if there are fewer outliers than inlier batches, some batches carry no outlier and
    only the inlier term of the hinge.
    """

    def __init__(self, layers: tuple[int, ...] = (0, 1, 2, 3, 4), lengths: tuple[int, ...] = (5, 5, 20, 20, 20),
                 vor_epochs: int = 1, k: int = 50, boundary_per_class: int = 50, candidates: int = 600,
                 noise_std: float = 0.1, outliers_per_class: int = 40, inlier_margin: float = -15.0,
                 outlier_margin: float = -3.0, vor_weight: float = 0.1, huber: bool = True, vor_lr: float = 1e-3,
                 vor_batch_size: int = 128, mask_other_classes: bool = True):
        super().__init__(mask_other_classes)
        layers, lengths = tuple(layers), tuple(lengths)
        if len(layers) != len(lengths) or not layers:
            raise ValueError(f"OVOR: layers {list(layers)} and lengths {list(lengths)} must be non-empty and "
                             f"of equal length")
        if len(set(layers)) != len(layers):
            raise ValueError(f"OVOR: layers {list(layers)} repeat a block")
        if any(n < 1 for n in lengths):
            raise ValueError(f"OVOR: prompt lengths must be positive, got {list(lengths)}")
        for name, value in (("vor_epochs", vor_epochs), ("noise_std", noise_std), ("vor_weight", vor_weight),
                            ("vor_lr", vor_lr)):
            if value < 0:
                raise ValueError(f"OVOR: {name} must be non-negative, got {value}")
        for name, value in (("k", k), ("boundary_per_class", boundary_per_class), ("candidates", candidates),
                            ("outliers_per_class", outliers_per_class), ("vor_batch_size", vor_batch_size)):
            if value < 1:
                raise ValueError(f"OVOR: {name} must be positive, got {value}")
        if inlier_margin > outlier_margin:
            raise ValueError(f"OVOR: the inlier margin {inlier_margin} must not exceed the outlier margin "
                             f"{outlier_margin} (inliers are to have the lower energy)")
        self.layers, self.lengths = layers, lengths
        self.vor_epochs, self.k, self.boundary_per_class = vor_epochs, k, boundary_per_class
        self.candidates, self.noise_std, self.outliers_per_class = candidates, noise_std, outliers_per_class
        self.inlier_margin, self.outlier_margin = inlier_margin, outlier_margin
        self.vor_weight, self.huber, self.vor_lr, self.vor_batch_size = vor_weight, huber, vor_lr, vor_batch_size
        self.vor_log: list[dict[str, float]] = []  # per experience: the last regularised epoch's mean terms

    # ------------------------------------------------------------------ prompt
    def build(self, ctx: Context, dim: int, depth: int) -> nn.Module:
        bad = [i for i in self.layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"OVOR: layers {bad} are not blocks of a ViT with {depth} blocks")
        params = nn.Module()
        for layer, length in zip(self.layers, self.lengths):  # keys and values, uniform on [0, 1)
            setattr(params, f"p{layer}", nn.Parameter(torch.rand(2, length, dim)))
        return params

    def prefixes(self, batch_size: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Block index -> (keys, values) prefixes (B, length, D): the one prompt, the same for every row."""
        out = {}
        for layer in self.layers:
            p = getattr(self.params, f"p{layer}").unsqueeze(0).expand(batch_size, -1, -1, -1)
            out[layer] = (p[:, 0], p[:, 1])
        return out

    def forward(self, ctx: Context, batch: Batch) -> None:
        if not self.started:
            return self.plain_forward(ctx, batch)
        vit = ctx.model
        tokens = prompted_tokens(vit, batch.x, prefixes=self.prefixes(len(batch.x)))
        batch.features = vit.forward_head(tokens, pre_logits=True)  # timm's pooling (the class token)
        batch.logits = self.eval_logits(ctx, vit.head(batch.features))

    # --------------------------------------------------------------------- VOR
    def after_experience(self, ctx: Context, data: TensorData) -> None:
        if self.vor_epochs:
            train = ctx.experience.train
            self.regularise(ctx, ctx.embed(train.x, train.t), train.y.to(ctx.device))

    def _energy_terms(self, logits_in: torch.Tensor, logits_out: torch.Tensor) -> torch.Tensor:
        return energy_hinge(energy(logits_in), energy(logits_out), self.inlier_margin, self.outlier_margin,
                            1.0 if self.huber else None)

    def regularise(self, ctx: Context, features: torch.Tensor, labels: torch.Tensor) -> None:
        """The regularised epochs: the classifier head alone, on the cached `features` (with
        `labels`) of the experience's rows and virtual outliers drawn around their boundary points."""
        head = ctx.model.get_classifier()
        classes = self._current.nonzero().squeeze(1)
        keep = self._current[labels]
        features, labels = features[keep].detach(), labels[keep]
        if not len(labels):
            return
        position = torch.full((len(self._current),), -1, dtype=torch.long, device=labels.device)
        position[classes] = torch.arange(len(classes), device=labels.device)
        targets = position[labels]
        boundary = boundary_points(features, labels, self.k, self.boundary_per_class)
        params = list(head.parameters())
        optimizer = torch.optim.Adam(params, lr=self.vor_lr)
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        n_batches = math.ceil(len(labels) / self.vor_batch_size)
        log = {}
        try:
            with torch.enable_grad(), eval_mode(head):
                for _ in range(self.vor_epochs):
                    outliers, _ = synthesise_outliers(features, labels, boundary, self.outliers_per_class,
                                                      self.noise_std, self.candidates, self.k, self.rng)
                    order = torch.randperm(len(labels), generator=self.rng).to(labels.device)
                    shuffle = torch.randperm(len(outliers), generator=self.rng).to(labels.device)
                    outliers = outliers[shuffle]
                    per_batch = math.ceil(len(outliers) / n_batches)  # every outlier used once
                    sums = {"vor_ce": features.new_zeros(()), "vor_energy": features.new_zeros(())}
                    for b in range(n_batches):
                        rows = order[b * self.vor_batch_size:(b + 1) * self.vor_batch_size]
                        out = outliers[b * per_batch:(b + 1) * per_batch]
                        logits_in = head(features[rows])[:, classes]
                        logits_out = head(out)[:, classes]
                        ce = F.cross_entropy(logits_in, targets[rows])
                        reg = self.vor_weight * self._energy_terms(logits_in, logits_out)
                        optimizer.zero_grad(set_to_none=True)
                        (ce + reg).backward()
                        optimizer.step()
                        sums["vor_ce"] += ce.detach() / n_batches
                        sums["vor_energy"] += reg.detach() / n_batches
                    log = {name: float(v) for name, v in sums.items()}  # one host sync per epoch
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
                p.grad = None
        self.vor_log.append(log)

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {**super().state_dict(), "vor_log": [dict(d) for d in self.vor_log]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.vor_log = [dict(d) for d in state["vor_log"]]
