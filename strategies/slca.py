"""SLCA: a slow-learning backbone, then the classifier aligned on features drawn from class Gaussians."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from strategies.base import Strategy
from strategies.context import Batch, Context, eval_mode
from strategies.gaussians import cholesky_factors
from strategies.registry import register_strategy
from strategies.schedules import decay
from streams.experience import TensorData

LogitNorm = Literal["global", "task_mean"]


@register_strategy("slca")
class SLCA(Strategy):
    """SLCA, Slow Learner with Classifier Alignment (Zhang, Wang, Kang, Chen and Wei 2023, "SLCA:
    Slow Learner with Classifier Alignment for Continual Learning on a Pre-trained Model", ICCV,
    arXiv 2303.05118): sequential fine-tuning of a (pre-trained) model, with two changes.

    - Slow learner: the backbone learns at `lr_ratio` (1/100) of the classifier's learning rate
      (the paper's 1e-4 against 1e-2). Its parameter group carries `lr_scale = lr_ratio`, so an
      LR owner's `ctx.set_lr`, or the experiment's scheduler (which scales each group from its own
      initial LR), keeps the ratio. `lr_ratio = 0` freezes the backbone. The classifier is
      `model.get_classifier()` (timm's API); every other parameter of the model is the backbone.
    - Class statistics: after each experience, for each class c of it, the mean and covariance of
      the pooled pre-logit features r_i = phi(x_i) (`ctx.embed`) of its raw training rows (no
      augmentation),
          mu_c = (1/N_c) sum_i r_i,    Sigma_c = sum_i (r_i - mu_c)(r_i - mu_c)^T / (N_c - 1),
      taken in float64 and kept in float32, as the reference code keeps them. A class met again
      in a later experience is summarised again, from the backbone of then.
    - Classifier alignment: then, from the second experience on, `samples_per_class` (256)
      features per class seen are drawn from N(mu_c, Sigma_c + cov_jitter I), afresh each
      epoch, and the classifier alone is trained on them for `align_epochs` (5) epochs with
      logit normalisation at temperature tau = 0.1,
          L = CE(h / (tau ||h||), y),   h = the classifier's logits of the classes seen,
      by an SGD of its own: `align_lr` 0.01, momentum 0.9, weight decay 5e-4, cosine-annealed to
      zero over the epochs (stepped per epoch), batches of 256. The paper gives the 256 samples,
      the 5 epochs and tau; the optimizer is the reference code's (its stage-2 SGD uses the
      head's LR, 0.01, and `CosineAnnealingLR(T_max=epochs)`; a batch is one class's worth of
      samples). Draws come from the strategy's seeded generator: a run is reproducible.

    Where the paper is silent, or the reference code (github.com/GengDavid/SLCA) differs from it,
    the paper's description is the default and the code's variant one argument away:

    - `mask_old_classes` (default on, as both do): while the slow learner trains, the
      cross-entropy is over the current experience's classes only, and rows of other classes
      (replayed ones included) are ignored. The reference grows one head per task and trains
      on that head's logits alone (the paper's Figure 6 trains on H_t, "the logit of predicting
      the current training data"), so old classes are never pushed down; off, the loss is over
      every class seen.
      Classes not seen yet are never predicted (the reference's classifier has no outputs for
      them), which is why this strategy owns `loss` and `predict`.
    - `restore_head` (default on, as the code does): the aligned classifier serves the
      evaluations that follow; at the next experience the slow learner goes on from the
      classifier as it was before alignment (the reference backs the head up before alignment
      and restores it once the task is evaluated; the paper aligns the classifier "in a
      post-hoc fashion").
    - `align_first_experience` (default off, as the code does): the reference aligns only when
      the task index is above zero; a single task's classes have been trained together already.
    - `logit_norm`: "global" (default) is the paper's formula, the L2 norm of the whole logit
      vector of the classes seen (Wei et al. 2022's LogitNorm). "task_mean" is the code's: the
      mean over tasks of the norm of each task's block of logits (a task here: the classes whose
      statistics one experience gave). For T tasks the code's norm is between 1/T and
      1/sqrt(T) of the paper's, so its normalised logits are that much sharper. `temperature`
      None trains with plain cross-entropy (the code without `ca_with_logit_norm`).
    - `old_mean_shrink` (default 0, the paper): the reference also multiplies the mean of each
      class from task k by 0.9 + 0.1 (k + 1)/(t + 1) at task t before sampling, which the paper
      does not mention and does not motivate; 0.1 reproduces it (the scale is
      (1 - s) + s (k + 1)/(t + 1)). To reproduce the published numbers, set
      `logit_norm: task_mean` and `old_mean_shrink: 0.1`.
    - `cov_jitter` (1e-4, the code's): added to the diagonal when sampling (the stored
    covariance is the plain sample covariance); if a covariance is still not positive
    definite in float64 its jitter grows tenfold until it is. A class with one sample has a
    zero covariance.

    On several processes each embeds its share of the experience's rows; the class sums, then
    the scatter about the means they give, are added over the processes, so every process
    holds the statistics (and so draws the features and aligns the classifier) as one does.
    The masked loss stays a mean over the whole step's rows of the classes trained on.
    """

    data_parallel = True

    def __init__(self, lr_ratio: float = 0.01, samples_per_class: int = 256, align_epochs: int = 5,
                 temperature: float | None = 0.1, align_lr: float = 0.01, align_momentum: float = 0.9,
                 align_weight_decay: float = 5e-4, align_batch_size: int = 256, cov_jitter: float = 1e-4,
                 logit_norm: LogitNorm = "global", old_mean_shrink: float = 0.0, mask_old_classes: bool = True,
                 restore_head: bool = True, align_first_experience: bool = False):
        for name, value in (("lr_ratio", lr_ratio), ("align_lr", align_lr), ("align_momentum", align_momentum),
                            ("align_weight_decay", align_weight_decay), ("cov_jitter", cov_jitter),
                            ("align_epochs", align_epochs)):
            if value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}")
        if samples_per_class < 1 or align_batch_size < 1:
            raise ValueError("samples_per_class and align_batch_size must be positive")
        if temperature is not None and temperature <= 0:
            raise ValueError(f"temperature must be positive (or None: no logit normalisation), got {temperature}")
        if logit_norm not in ("global", "task_mean"):
            raise ValueError(f"logit_norm must be 'global' (the paper's) or 'task_mean' (the reference code's), "
                             f"got {logit_norm!r}")
        if not 0.0 <= old_mean_shrink <= 1.0:
            raise ValueError(f"old_mean_shrink must be in [0, 1], got {old_mean_shrink}")
        self.lr_ratio, self.samples_per_class, self.align_epochs = lr_ratio, samples_per_class, align_epochs
        self.temperature, self.logit_norm, self.old_mean_shrink = temperature, logit_norm, old_mean_shrink
        self.align_lr, self.align_momentum, self.align_weight_decay = align_lr, align_momentum, align_weight_decay
        self.align_batch_size, self.cov_jitter = align_batch_size, cov_jitter
        self.mask_old_classes, self.restore_head = mask_old_classes, restore_head
        self.align_first_experience = align_first_experience
        self.means: torch.Tensor | None = None  # (classes, d)
        self.covs: torch.Tensor | None = None  # (classes, d, d)
        self.stat_experience: torch.Tensor | None = None  # the experience each class's statistics are from; -1: none
        self.seen: list[int] = []
        self.head_backup: dict[str, torch.Tensor] | None = None  # the classifier before the last alignment
        self._unseen: torch.Tensor | None = None
        self._cols: torch.Tensor | None = None
        self._target: torch.Tensor | None = None

    # ------------------------------------------------------------- once per run
    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        if ctx.stream.is_sequence:
            raise ValueError("SLCA aligns a classifier on per-sample features; a sequence stream has none")
        self._classifier(ctx.model)
        n = ctx.stream.n_classes
        d = ctx.embed(ctx.stream.experiences[0].train.x[:1]).shape[-1]
        self.means = torch.zeros(n, d, device=ctx.device)
        self.covs = torch.zeros(n, d, d, device=ctx.device)
        self.stat_experience = torch.full((n,), -1, dtype=torch.long, device=ctx.device)
        self.seen, self.head_backup = [], None
        self._update_seen(ctx.device, n)
        if self.lr_ratio == 0:
            for p in self._backbone(ctx.model):
                p.requires_grad_(False)

    @staticmethod
    def _classifier(model: torch.nn.Module) -> torch.nn.Module:
        if not hasattr(model, "get_classifier"):
            raise TypeError(f"SLCA needs the classifier of the model (timm's get_classifier()); "
                            f"{type(model).__name__} has none")
        classifier = model.get_classifier()
        if not isinstance(classifier, torch.nn.Module) or not list(classifier.parameters()):
            raise TypeError(f"{type(model).__name__}.get_classifier() has no parameters to align")
        return classifier

    def _backbone(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        head = {id(p) for p in self._classifier(model).parameters()}
        return [p for p in model.parameters() if id(p) not in head]

    def configure_optimizer(self, ctx: Context, param_groups: list[dict]) -> list[dict]:
        """Each group's backbone parameters become a group of their own at `lr_ratio` times its LR
        (and `lr_scale`); the classifier, and parameters that are not the model's, keep theirs."""
        slow = {id(p) for p in self._backbone(ctx.model)}
        groups = []
        for group in param_groups:
            backbone = [p for p in group["params"] if id(p) in slow]
            rest = [p for p in group["params"] if id(p) not in slow]
            if backbone and self.lr_ratio > 0:
                scaled = {**group, "params": backbone, "lr": group["lr"] * self.lr_ratio,
                          "lr_scale": group.get("lr_scale", 1.0) * self.lr_ratio}
                if "initial_lr" in group:
                    scaled["initial_lr"] = group["initial_lr"] * self.lr_ratio
                groups.append(scaled)
            if rest:
                groups.append({**group, "params": rest})
        return groups

    # ------------------------------------------------------- per experience
    def before_experience(self, ctx: Context) -> None:
        if self.head_backup is not None:  # the slow learner goes on from the classifier before alignment
            self._classifier(ctx.model).load_state_dict(self.head_backup)
            self.head_backup = None
        n = ctx.stream.n_classes
        self.seen = sorted(set(self.seen) | set(ctx.experience.classes))
        self._update_seen(ctx.device, n)
        trained = sorted(ctx.experience.classes) if self.mask_old_classes else self.seen
        self._cols = torch.tensor(trained, device=ctx.device)
        self._target = torch.full((n,), -100, dtype=torch.long, device=ctx.device)  # -100: ignored
        self._target[self._cols] = torch.arange(len(trained), device=ctx.device)

    def loss(self, ctx: Context, batch: Batch) -> torch.Tensor:
        """Cross-entropy among the classes trained on (the experience's, with `mask_old_classes`);
        rows of other classes are ignored."""
        target = self._target[batch.y]
        if ctx.world > 1:  # this process's rows of the mean over the whole step's rows trained on
            ce = F.cross_entropy(batch.logits[:, self._cols], target, ignore_index=-100, reduction="none")
            return ctx.share_mean(ce, int((self._target[ctx.batch.y] >= 0).sum()))
        total = F.cross_entropy(batch.logits[:, self._cols], target, ignore_index=-100, reduction="sum")
        return total / (target >= 0).sum().clamp_min(1)  # no host sync, and 0 for a batch without such rows

    def after_experience(self, ctx: Context, data: TensorData) -> None:
        experience = ctx.experience
        self.store_statistics(ctx, experience.train, experience.classes, experience.index)
        if self.align_epochs and (experience.index > 0 or self.align_first_experience):
            self.align(ctx)

    # ------------------------------------------------------------ statistics
    @torch.no_grad()
    def store_statistics(self, ctx: Context, data: TensorData, classes: list[int], experience: int) -> None:
        """Mean and covariance of the features of `data`'s rows of each of `classes`."""
        if ctx.world > 1:
            return self._store_split(ctx, data, classes, experience)
        phi = ctx.embed(data.x, data.t).double()
        y = data.y.to(phi.device)
        for c in classes:
            r = phi[y == c]
            if not len(r):
                continue
            mu = r.mean(0)
            self.means[c] = mu.to(self.means)
            self.covs[c] = torch.cov(r.T).to(self.covs) if len(r) > 1 else 0.0
            self.stat_experience[c] = experience

    def _store_split(self, ctx: Context, data: TensorData, classes: list[int], experience: int) -> None:
        """`store_statistics` from this process's share of the rows: per-class counts and sums,
        added over the processes, give the means; the scatter about them, added likewise, the
        covariances (the two passes torch.cov makes, split)."""
        x, t, y = ctx.shard(data.x), ctx.shard(data.t), ctx.shard(data.y)
        d = self.means.shape[-1]
        phi = (ctx.embed(x, t).double() if len(y)
               else torch.zeros(0, d, dtype=torch.float64, device=self.means.device))
        y = y.to(phi.device)
        mine = [phi[y == c] for c in classes]
        counts = torch.tensor([float(len(r)) for r in mine], dtype=torch.float64, device=phi.device)
        sums = torch.stack([r.sum(0) for r in mine])
        ctx.all_reduce(counts, sums)
        mu = sums / counts.clamp_min(1).unsqueeze(1)
        scatter = torch.stack([(r - m).T @ (r - m) for r, m in zip(mine, mu)])
        ctx.all_reduce(scatter)
        for i, c in enumerate(classes):
            n = int(counts[i])
            if not n:
                continue
            self.means[c] = mu[i].to(self.means)
            self.covs[c] = (scatter[i] / (n - 1)).to(self.covs) if n > 1 else 0.0
            self.stat_experience[c] = experience

    def _cholesky(self, classes: torch.Tensor) -> torch.Tensor:
        """Lower Cholesky factors of Sigma_c + cov_jitter I, in float64."""
        return cholesky_factors(self.covs[classes], self.cov_jitter, "SLCA")

    def mean_scales(self, classes: torch.Tensor, experience: int) -> torch.Tensor:
        """(1 - s) + s (k_c + 1)/(t + 1) for the class means at experience t, k_c the experience a
        class's statistics are from, s = `old_mean_shrink` (0: all ones, the paper)."""
        k = self.stat_experience[classes].double()
        s = self.old_mean_shrink
        return (1.0 - s) + s * (k + 1.0) / (experience + 1.0)

    def sample_features(self, classes: torch.Tensor, n: int, scales: torch.Tensor | None = None,
                        factors: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` features of each of `classes` from N(scale_c mu_c, Sigma_c + jitter I), class by class,
        and their labels; the noise is drawn from the strategy's generator (on the CPU, so the
        draws do not depend on the device)."""
        classes = classes.to(self.means.device)
        factors = self._cholesky(classes) if factors is None else factors
        d = self.means.shape[-1]
        mu = self.means[classes].double()
        if scales is not None:
            mu = mu * scales.to(mu).unsqueeze(1)
        z = torch.randn(len(classes), n, d, generator=self.rng, dtype=torch.float64).to(mu.device)
        x = mu.unsqueeze(1) + z @ factors.transpose(1, 2)  # x = mu + L z: covariance L L^T
        return x.reshape(-1, d).float(), classes.repeat_interleave(n)

    # -------------------------------------------------------------- alignment
    def normalised_logits(self, logits: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
        """h / (tau ||h||): ||h|| over every column (`global`) or the mean of the norms of the
        column `groups` (`task_mean`); h itself without a temperature."""
        if self.temperature is None:
            return logits
        if self.logit_norm == "global":
            norm = logits.norm(dim=-1, keepdim=True) + 1e-7
        else:
            norm = torch.stack([logits[:, g].norm(dim=-1) + 1e-7 for g in groups], -1).mean(-1, keepdim=True)
        return logits / (norm * self.temperature)

    def align(self, ctx: Context) -> None:
        """Train the classifier alone on features sampled for every class with statistics."""
        classifier = self._classifier(ctx.model)
        if self.restore_head:
            self.head_backup = {k: v.detach().clone() for k, v in classifier.state_dict().items()}
        device = self.means.device
        classes = (self.stat_experience >= 0).nonzero().squeeze(1)
        position = torch.full_like(self.stat_experience, -1)
        position[classes] = torch.arange(len(classes), device=device)
        source = self.stat_experience[classes]
        groups = [(source == k).nonzero().squeeze(1) for k in torch.unique(source).tolist()]
        scales = self.mean_scales(classes, ctx.experience.index)
        factors = self._cholesky(classes)
        params = list(classifier.parameters())
        dtype = params[0].dtype
        optimizer = torch.optim.SGD(params, lr=self.align_lr, momentum=self.align_momentum,
                                    weight_decay=self.align_weight_decay)
        trainable = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        try:
            with torch.enable_grad(), eval_mode(classifier):
                for epoch in range(self.align_epochs):
                    for group in optimizer.param_groups:
                        group["lr"] = decay(epoch / self.align_epochs, self.align_lr, 0.0)
                    x, y = self.sample_features(classes, self.samples_per_class, scales, factors)
                    order = torch.randperm(len(y), generator=self.rng).to(device)
                    x, y = x[order].to(dtype), position[y[order]]
                    for i in range(0, len(y), self.align_batch_size):
                        logits = classifier(x[i:i + self.align_batch_size])[:, classes]
                        loss = F.cross_entropy(self.normalised_logits(logits, groups), y[i:i + self.align_batch_size])
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
        finally:
            for p, flag in zip(params, trainable):
                p.requires_grad_(flag)
                p.grad = None

    # ------------------------------------------------------------ evaluation
    def _update_seen(self, device, n: int) -> None:
        self._unseen = torch.ones(n, dtype=torch.bool, device=device)
        self._unseen[self.seen] = False

    def predict(self, ctx: Context, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's logits, with classes not seen yet ruled out (none before training)."""
        scores = ctx.forward(x, t)
        return scores.masked_fill(self._unseen, float("-inf")) if self.seen else scores

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {**super().state_dict(), "seen": list(self.seen), "means": self.means.cpu(), "covs": self.covs.cpu(),
                "stat_experience": self.stat_experience.cpu(),
                "head_backup": None if self.head_backup is None else {k: v.cpu() for k, v in self.head_backup.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        device = self.means.device
        self.seen = list(state["seen"])
        self.means = state["means"].to(device)
        self.covs = state["covs"].to(device)
        self.stat_experience = state["stat_experience"].to(device)
        backup = state["head_backup"]
        self.head_backup = None if backup is None else {k: v.to(device) for k, v in backup.items()}
        self._update_seen(device, len(self.stat_experience))
