"""APG: an adaptive prompt generator queried by an intermediate class token, with a class-statistics library."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from strategies.context import Batch, Context, eval_mode
from strategies.gaussians import cholesky_factors
from strategies.prompting.base import PromptStrategy
from strategies.prompting.vit import tokens_from, tokens_through
from strategies.registry import register_strategy
from strategies.schedules import decay
from streams.experience import TensorData


class ResidualMLP(nn.Module):
    """x + fc2(drop(act(fc1(x)))), hidden width = `hidden`, dropout after both layers."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PromptGenerator(nn.Module):
    """MLP -> LayerNorm -> multi-head cross-attention (+ residual) -> MLP.

    The query q (B, D) becomes `length` attention queries (one linear map to length * D);
    keys and values are the normalised query itself followed by the knowledge pool (K, D).
    Returns the prompt (B, length, D) and the attention logits over the pool tokens only
    (B, heads, length, K), before the softmax."""

    def __init__(self, dim: int, length: int, heads: int, hidden: int, dropout: float, residual: bool):
        super().__init__()
        if dim % heads:
            raise ValueError(f"APG: the ViT width {dim} is not divisible by {heads} heads")
        self.length, self.heads, self.residual = length, heads, residual
        self.mlp_in = ResidualMLP(dim, hidden, dropout)
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim * length)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp_out = ResidualMLP(dim, hidden, dropout)
        for m in self.modules():  # ViT-style initialisation (timm's, as the reference's generator)
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, query: torch.Tensor, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, D = query.shape
        H, L, dh = self.heads, self.length, D // self.heads
        q = self.norm(self.mlp_in(query))
        kv = torch.cat([q.unsqueeze(1), pool.unsqueeze(0).expand(B, -1, -1)], dim=1)  # (B, 1 + K, D)
        Q = self.q(q).view(B, L, H, dh).transpose(1, 2)  # (B, H, L, dh)
        K = self.k(kv).view(B, -1, H, dh).transpose(1, 2)  # (B, H, 1 + K, dh)
        V = self.v(kv).view(B, -1, H, dh).transpose(1, 2)
        logits = Q @ K.transpose(-2, -1) * dh ** -0.5  # (B, H, L, 1 + K)
        out = (logits.softmax(-1) @ V).transpose(1, 2).reshape(B, L, D)
        out = self.proj(out)
        if self.residual:
            out = out + q.unsqueeze(1)
        return self.mlp_out(out), logits[..., 1:]


@register_strategy("apg")
class APG(PromptStrategy):
    """APG (Tang, Peng and Zheng 2023, "When Prompt-based Incremental Learning Does Not Meet Strong
    Pretraining", ICCV, arXiv 2308.10445; code github.com/TOM-tym/APG).

    Forward. The frozen ViT runs to block `query_block` (m); that block's class token q (not
    normalised) feeds the adaptive prompt generator, which returns `prompt_length` tokens
    inserted after the class token, with no position embedding, for blocks m+1.. only (the
    earlier blocks see the plain sequence). The classifier reads timm's pooled pre-logits of
    the prompted sequence (the class token). The generator (`PromptGenerator`) is

        a = LN(MLP_in(q)),   p = MLP_out(a + CrossAttn(a; [a, k_1 .. k_K]))

    with `heads` heads, both MLPs residual with hidden width = the ViT's width and dropout
    `mlp_dropout` (0.1, the reference's), keys/values the generator's query followed by the
    knowledge pool: one learnable token k_c of the ViT's width per class trained so far
    (the reference's `class_n_prompts` default 1). A class's token is initialised N(0, 0.02^2)
    when its class is first met and learns only during experiences that hold its class: other
    tokens enter the attention detached ("old ones frozen"), so they get no gradient, and being
    parameters of their own (one per class) no optimizer state or weight decay moves them.
    The rest of the generator is shared and trains in every experience.

    Losses of a training step (the reference's `train_one_epoch_adaptive_prompt_generator`):

    - cross-entropy of the new data over every class trained so far (the reference's head
      grows by the task's classes and its loss is over all of them: with old classes' sampled
      features in the same step, the new data must push old classes down, or new classes
      never win). `mask_other_classes` (off by default, unlike the other prompt methods)
      restricts incoming rows to the experience's classes, as `PromptStrategy` does;
    - `apg_attn` (`attn_weight`, 1): per head and prompt token, cross-entropy of the attention
      logits over the pool with the sample's own class token as target (the knowledge pool
      is class-wise: the generator learns to retrieve its class's knowledge);
    - `apg_prompt` (`prompt_weight`, 1): mean absolute difference (L1) between the prompt the
      generator makes from intermediate class features sampled from the library and the stored
      mean prompt of the sampled class, so the generator keeps producing old classes' prompts;
    - `apg_replay` (`replay_weight`, 1): cross-entropy of the classifier on final features
      sampled from the library, over every class trained so far;
    - `apg_norm` (`norm_weight` 0.01, `norm_scale` 100): relu(mean ||p||_1 - norm_scale *
      mean ||h_m||_1), h_m every token of block m: a bound on the prompts' size.

    The sampled terms use `samples_per_step` (128) draws per step, classes drawn uniformly
    from those in the library (which holds the classes of earlier experiences: it is updated
    after each experience, so the first experience has none).

    Post-experience fine-tuning (the reference's `fine_tune_adaptive_prompt_generator`, run
    after every task but the first in all its configurations): once the library holds the
    experience's classes, the generator and the whole classifier train on the library alone
    (`finetune`) for `finetune_epochs` + `finetune_epochs_per_task` x (experience index)
    epochs (20 + 5 t, the reference's), each of `finetune_samples_per_class` draws per class
    (the reference: 150 for ImageNet-R and the satellite sets, 500 for CIFAR-100) in batches
    of `finetune_batch_size` (128), by AdamW at `finetune_lr` 1e-3 cosine-annealed to
    `finetune_min_lr` 1e-4 with weight decay 0.05 (the reference's, without its 5 warm-up
    epochs and LR noise); loss: the L1 prompt constraint plus cross-entropy on the sampled
    final features. The experience's classes are then summarised again with the tuned
    generator (the reference rebuilds its library after fine-tuning too). Set both epoch
    arguments to 0 to skip it. Old pool tokens stay frozen there too.

    Class-statistics library, after each experience, for each of its classes, on its raw
    training rows (no augmentation), in eval mode with the generator as just trained: the
    mean and covariance (float64, kept float32) of the intermediate class token q and of the
    final pre-logit feature f, and the mean generated prompt. Sampling draws
    N(mu, Sigma + `cov_jitter` I) (1e-5, the reference's), the noise from the strategy's
    seeded generator on the CPU (so draws do not depend on the device); q and f samples are
    drawn independently, as the reference does. A class met again is summarised again.
    Size: two d x d covariances per class (and their Cholesky factors on the device): 4.7 MB
    per class at ViT-B's d = 768 in float32, about 0.9 GB in a checkpoint for 200 classes.

    The ViT must have a class token that its head reads (timm's `global_pool='token'`): the
    query is block m's class token, and a pooled head would average the prompt in.

    Defaults and choices. The stored text of the paper was not available here; the defaults
    are those of the authors' released configurations for a pre-trained ViT-B/16
    (options/continual_trans/pretrained/*.yaml): query block 5 (0-indexed, of 12: the prompt
    enters blocks 6-11; its configurations without pre-training use block 9; `query_block`
    None, the default, takes the same relative depth, depth // 2 - 1, so block 2 of a
    6-block ViT), one prompt
    token, 4 heads, one pool token per class, L1 constraint weight 1, replay CE weight 1,
    attention CE, norm bound 0.01 x scale 100, no prompt triplet (weight 0 there). Where they
    differ or are silent, this implementation chooses:

    - `attn_residual` (default on): the residual around the cross-attention, as the issue and
      the reference's default have it (its pretrained configurations turn it off).
    - The reference multiplies the softmaxed attention by the scale a second time; not done.
    - The reference's attention loss adds a soft triplet loss on KL divergences between
      attention rows, and it can add a triplet loss on prompts (off in its configurations):
      neither is implemented.
    - New tokens: the reference draws the first task's N(0, 0.02^2) and later tasks' from
      U[0, 1); here every new token is N(0, 0.02^2).
    - `prompt_length` > 1 (the reference's `more_prompts`) gets length separate attention
      queries from one linear map over shared keys and values.
    - The reference's final features for the classifier are those of augmented images;
      here they are of raw rows, like the intermediate ones.
    """

    def __init__(self, query_block: int | None = None, prompt_length: int = 1, heads: int = 4, mlp_dropout: float = 0.1,
                 attn_residual: bool = True, attn_weight: float = 1.0, prompt_weight: float = 1.0,
                 replay_weight: float = 1.0, norm_weight: float = 0.01, norm_scale: float = 100.0,
                 samples_per_step: int = 128, cov_jitter: float = 1e-5, finetune_epochs: int = 20,
                 finetune_epochs_per_task: int = 5, finetune_samples_per_class: int = 150,
                 finetune_batch_size: int = 128, finetune_lr: float = 1e-3, finetune_min_lr: float = 1e-4,
                 finetune_weight_decay: float = 0.05, mask_other_classes: bool = False):
        super().__init__(mask_other_classes)
        if min(finetune_epochs, finetune_epochs_per_task, finetune_samples_per_class) < 0 or finetune_batch_size < 1:
            raise ValueError("APG: fine-tuning epochs and samples must be non-negative, its batch size positive")
        if prompt_length < 1 or heads < 1 or samples_per_step < 0:
            raise ValueError("APG: prompt_length and heads must be positive, samples_per_step non-negative")
        for name, value in (("attn_weight", attn_weight), ("prompt_weight", prompt_weight),
                            ("replay_weight", replay_weight), ("norm_weight", norm_weight),
                            ("cov_jitter", cov_jitter), ("mlp_dropout", mlp_dropout)):
            if value < 0:
                raise ValueError(f"APG: {name} must be non-negative, got {value}")
        self.query_block, self.prompt_length, self.heads = query_block, prompt_length, heads
        self.query_index: int | None = None  # the query block of the run's ViT, set by `build`
        self._pool_index = None  # (pool classes, their position per class), per experience
        self.mlp_dropout, self.attn_residual = mlp_dropout, attn_residual
        self.attn_weight, self.prompt_weight, self.replay_weight = attn_weight, prompt_weight, replay_weight
        self.norm_weight, self.norm_scale = norm_weight, norm_scale
        self.samples_per_step, self.cov_jitter = samples_per_step, cov_jitter
        self.finetune_epochs, self.finetune_epochs_per_task = finetune_epochs, finetune_epochs_per_task
        self.finetune_samples_per_class, self.finetune_batch_size = finetune_samples_per_class, finetune_batch_size
        self.finetune_lr, self.finetune_min_lr = finetune_lr, finetune_min_lr
        self.finetune_weight_decay = finetune_weight_decay
        self.stats: dict[str, torch.Tensor] = {}
        self._factors: dict[str, torch.Tensor] | None = None  # Cholesky factors, rebuilt when stats change

    # ---------------------------------------------------------------- set-up
    def block_of(self, depth: int) -> int:
        """The query block for a ViT of `depth` blocks: `query_block`, or by default the block
        at the reference's relative depth, block 5 of 12 (0-indexed): depth // 2 - 1."""
        return depth // 2 - 1 if self.query_block is None else self.query_block

    def build(self, ctx: Context, dim: int, depth: int) -> nn.Module:
        vit = ctx.model
        if vit.cls_token is None or vit.global_pool != "token" or getattr(vit, "attn_pool", None) is not None:
            raise ValueError(f"APG needs a ViT with a class token that its head reads (global_pool 'token'); "
                             f"this one has class_token={vit.cls_token is not None}, "
                             f"global_pool={vit.global_pool!r}: the query is the class token, and pooling over "
                             f"the sequence would mix the prompt into the features")
        self.query_index = self.block_of(depth)
        if not 0 <= self.query_index < depth - 1:
            raise ValueError(f"APG: query_block {self.query_index} must be a block of the ViT's {depth} with a "
                             f"block after it (the prompt enters the blocks after the query block only)")
        n = ctx.stream.n_classes
        params = nn.Module()
        params.generator = PromptGenerator(dim, self.prompt_length, self.heads, dim, self.mlp_dropout,
                                           self.attn_residual)
        params.tokens = nn.ParameterList([nn.Parameter(torch.zeros(dim)) for _ in range(n)])
        self.stats = {"mid_mean": torch.zeros(n, dim), "mid_cov": torch.zeros(n, dim, dim),
                      "feat_mean": torch.zeros(n, dim), "feat_cov": torch.zeros(n, dim, dim),
                      "prompt_mean": torch.zeros(n, self.prompt_length, dim),
                      "has": torch.zeros(n, dtype=torch.bool)}
        self.stats = {k: v.to(ctx.device) for k, v in self.stats.items()}
        self._factors = None
        return params

    @torch.no_grad()
    def before_experience(self, ctx: Context) -> None:
        super().before_experience(ctx)
        earlier = {c for e in ctx.stream.experiences[:ctx.experience.index] for c in e.classes}
        for c in ctx.experience.classes:  # a class met for the first time gets its token
            if c not in earlier:
                token = self.params.tokens[c]
                token.copy_((0.02 * torch.randn(token.shape, generator=self.rng)).to(token))
        self._pool_index = None
        current = set(ctx.experience.classes)
        for c, token in enumerate(self.params.tokens):  # old tokens enter detached; this too keeps
            token.requires_grad_(c in current)           # them still under any zero_grad setting

    # --------------------------------------------------------------- forward
    def pool_index(self) -> tuple[list[tuple[int, bool]], torch.Tensor]:
        """The pool's classes (those trained so far, each with whether it is in the current
        experience) and each class's position in the pool (-1: not in it); worked out once
        per experience, as they change only there."""
        if self._pool_index is None:
            trained, current = self._trained.tolist(), self._current.tolist()
            classes = [c for c, t in enumerate(trained) if t]
            position = torch.full((len(trained),), -1, dtype=torch.long, device=self._trained.device)
            position[classes] = torch.arange(len(classes), device=position.device)
            self._pool_index = ([(c, current[c]) for c in classes], position)
        return self._pool_index

    def pool(self) -> torch.Tensor:
        """The knowledge pool (K, D): tokens of the classes trained so far, those not in the
        current experience detached."""
        classes, _ = self.pool_index()
        return torch.stack([self.params.tokens[c] if now else self.params.tokens[c].detach() for c, now in classes])

    def generate(self, query: torch.Tensor, pool: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt (B, length, D) for intermediate class tokens `query` (B, D), and the
        attention logits over the pool (B, heads, length, K); `pool` if already built."""
        return self.params.generator(query, self.pool() if pool is None else pool)

    def run(self, vit: nn.Module, x: torch.Tensor, pool: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block-m tokens h, the prompt, the attention logits, and the final token sequence."""
        with torch.no_grad():  # the backbone is frozen and nothing before block m is prompted
            h = tokens_through(vit, x, self.query_index)
        prompt, logits = self.generate(h[:, 0], pool)
        return h, prompt, logits, tokens_from(vit, h, self.query_index, prompt)

    def forward(self, ctx: Context, batch: Batch) -> None:
        if not self.started:
            return self.plain_forward(ctx, batch)
        vit = ctx.model
        training = ctx.training and torch.is_grad_enabled()
        self.params.train(training and vit.training)  # the generator's dropout only while training
        pool = self.pool()  # one pool for the batch's prompts and the sampled ones
        h, prompt, logits, tokens = self.run(vit, batch.x, pool)
        batch.features = vit.forward_head(tokens, pre_logits=True)
        batch.logits = self.eval_logits(ctx, vit.head(batch.features))
        if training and batch.y is not None:
            self._losses(ctx, batch, h, prompt, logits, pool)

    def _losses(self, ctx: Context, batch: Batch, h: torch.Tensor, prompt: torch.Tensor,
                logits: torch.Tensor, pool: torch.Tensor) -> None:
        if self.attn_weight:
            _, position = self.pool_index()
            B, H, L, K = logits.shape
            target = position[batch.y].view(B, 1, 1).expand(B, H, L)
            batch.losses["apg_attn"] = self.attn_weight * F.cross_entropy(logits.reshape(-1, K), target.reshape(-1))
        if self.norm_weight:
            batch.losses["apg_norm"] = self.norm_weight * self._norm_excess(ctx, prompt, h)
        have = self.library_classes()
        if not len(have) or not self.samples_per_step or not (self.prompt_weight or self.replay_weight):
            return
        classes = have[torch.randint(len(have), (self.samples_per_step,), generator=self.rng).to(have.device)]
        q, f = self.sample("mid", classes), self.sample("feat", classes)
        dtype = batch.features.dtype
        if self.prompt_weight:
            generated, _ = self.generate(q.to(dtype), pool)
            batch.losses["apg_prompt"] = self.prompt_weight * F.l1_loss(generated, self.stats["prompt_mean"][classes])
        if self.replay_weight:
            out = ctx.model.head(f.to(dtype)).masked_fill(~self._trained, float("-inf"))
            batch.losses["apg_replay"] = self.replay_weight * F.cross_entropy(out, classes)

    def _norm_excess(self, ctx: Context, prompt: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """ReLU(mean |prompt|_1 - norm_scale * mean |h|_1), the means over the step's rows. On
        several processes the ReLU is of the whole step's difference (its sign all-reduced), of
        which this process holds its rows' share (`ctx.share_mean`)."""
        if ctx.world == 1:
            return F.relu(prompt.abs().sum(-1).mean() - self.norm_scale * h.abs().sum(-1).mean())
        rows = len(ctx.batch.y)
        share = (ctx.share_mean(prompt.abs().sum(-1).mean(-1), rows)
                 - self.norm_scale * ctx.share_mean(h.abs().sum(-1).mean(-1), rows))
        whole = (share * ctx.loss_weight / ctx.world).detach().reshape(1)  # this process's part of the mean
        ctx.all_reduce(whole)
        return share * (whole > 0).to(share.dtype).squeeze(0)

    def loss(self, ctx: Context, batch: Batch) -> torch.Tensor:
        """Cross-entropy over every class trained so far (the reference's growing head), or
        with `mask_other_classes` over the current experience's classes for incoming rows."""
        if self.mask_other_classes:
            return super().loss(ctx, batch)
        return F.cross_entropy(batch.logits.masked_fill(~self._trained, float("-inf")), batch.y)

    # ------------------------------------------------------------ statistics
    @torch.no_grad()
    def extract(self, ctx: Context, x: torch.Tensor, batch_size: int = 256):
        """Intermediate class tokens, final pre-logit features and prompts of raw rows `x`,
        in eval mode (generator included)."""
        vit = ctx.model
        mode = self.params.training
        self.params.eval()
        out = []
        try:
            with eval_mode(vit):
                for i in range(0, len(x), batch_size):
                    h, prompt, _, tokens = self.run(vit, ctx.prepare(x[i:i + batch_size]))
                    out.append((h[:, 0], vit.forward_head(tokens, pre_logits=True), prompt))
        finally:
            self.params.train(mode)
        return tuple(torch.cat(parts) for parts in zip(*out))

    def after_experience(self, ctx: Context, data: TensorData) -> None:
        experience = ctx.experience
        self.store_statistics(ctx, experience.train, experience.classes)
        epochs = self.finetune_epochs + self.finetune_epochs_per_task * experience.index
        if experience.index > 0 and epochs and self.finetune_samples_per_class:
            self.finetune(ctx, epochs)
            self.store_statistics(ctx, experience.train, experience.classes)  # with the tuned generator

    def finetune(self, ctx: Context, epochs: int) -> None:
        """Generator and classifier trained on the library alone: per epoch
        `finetune_samples_per_class` draws of every class in it (intermediate and final
        features, drawn independently), shuffled into batches; the loss is the L1 prompt
        constraint plus cross-entropy of the classifier over the classes trained so far.
        AdamW of its own (weight decay `finetune_weight_decay`), its LR cosine-annealed per
        epoch from `finetune_lr` to `finetune_min_lr`."""
        head = ctx.model.get_classifier()
        params = [*self.params.parameters(), *head.parameters()]
        optimizer = torch.optim.AdamW(params, lr=self.finetune_lr, weight_decay=self.finetune_weight_decay)
        classes = self.library_classes()
        n = self.finetune_samples_per_class
        labels = classes.repeat_interleave(n)
        mode = self.params.training
        self.params.train()
        try:
            with torch.enable_grad(), eval_mode(head):
                for epoch in range(epochs):
                    for group in optimizer.param_groups:
                        group["lr"] = decay(epoch / epochs, self.finetune_lr, self.finetune_min_lr)
                    q, f = self.sample("mid", labels), self.sample("feat", labels)
                    order = torch.randperm(len(labels), generator=self.rng).to(labels.device)
                    for idx in order.split(self.finetune_batch_size):
                        y = labels[idx]
                        loss = F.cross_entropy(head(f[idx]).masked_fill(~self._trained, float("-inf")), y)
                        if self.prompt_weight:
                            generated, _ = self.generate(q[idx])
                            loss = loss + self.prompt_weight * F.l1_loss(generated, self.stats["prompt_mean"][y])
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
        finally:
            self.params.train(mode)
            for p in params:
                p.grad = None

    @torch.no_grad()
    def store_statistics(self, ctx: Context, data: TensorData, classes) -> None:
        q, f, p = self.extract(ctx, data.x)
        y = data.y.to(q.device)
        s = self.stats
        for c in classes:
            rows = y == c
            if not rows.any():
                continue
            for name, value in (("mid", q[rows].double()), ("feat", f[rows].double())):
                s[f"{name}_mean"][c] = value.mean(0).to(s[f"{name}_mean"])
                s[f"{name}_cov"][c] = torch.cov(value.T).to(s[f"{name}_cov"]) if len(value) > 1 else 0.0
            s["prompt_mean"][c] = p[rows].double().mean(0).to(s["prompt_mean"])
            s["has"][c] = True
        self._factors = None

    def library_classes(self) -> torch.Tensor:
        """The classes the library holds, kept with the Cholesky factors (both change only when
        statistics are stored): no device sync per training step."""
        if self._factors is None:
            self._factors_for_library()
        return self._factors["classes"]

    def _factors_for_library(self) -> None:
        have = self.stats["has"]
        self._factors = {"classes": have.nonzero().squeeze(1)}
        for name in ("mid", "feat"):
            factors = torch.zeros_like(self.stats[f"{name}_cov"])  # computed in float64, kept in float32
            if have.any():
                factors[have] = cholesky_factors(self.stats[f"{name}_cov"][have], self.cov_jitter, "APG").float()
            self._factors[name] = factors

    def sample(self, kind: str, classes: torch.Tensor) -> torch.Tensor:
        """One draw of the `kind` features ("mid": intermediate class tokens, "feat": final
        features) of each of `classes` from N(mu_c, Sigma_c + cov_jitter I); noise from the
        strategy's generator on the CPU."""
        if self._factors is None:
            self._factors_for_library()
        mean, factors = self.stats[f"{kind}_mean"], self._factors[kind]
        z = torch.randn(len(classes), mean.shape[-1], generator=self.rng, dtype=torch.float64).to(mean.device)
        out = torch.empty(len(classes), mean.shape[-1], dtype=torch.float64, device=mean.device)
        for c in torch.unique(classes).tolist():  # one product per class present
            rows = classes == c
            out[rows] = mean[c].double() + z[rows] @ factors[c].double().T  # covariance L L^T
        return out.float()

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {**super().state_dict(), "query_index": self.query_index,
                "stats": {k: v.cpu() for k, v in self.stats.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("query_index", self.query_index) != self.query_index:
            raise ValueError(f"APG: the checkpoint's prompt enters after block {state['query_index']}, this run's "
                             f"after block {self.query_index}: resume with the same query_block")
        super().load_state_dict(state)
        device = self.stats["has"].device
        self.stats = {k: v.to(device) for k, v in state["stats"].items()}
        self._factors = None
