"""Weight regularisation: quadratic penalties that hold important weights near earlier values.

Every method here adds, for each earlier anchor theta*, a penalty
lambda * sum_i Omega_i (theta_i - theta*_i)^2 (times 1/2 where the paper has it) and
differs in the importance Omega it estimates: the Fisher information (EWC, online EWC),
the path integral of the loss decrease (SI), the sensitivity of the output (MAS), or
none at all (L2). Importances are computed with the model's own helpers (`ctx.prepare`,
`ctx.forward`) on the experience's data.

A penalty too stiff for the optimizer makes the step diverge, whatever the learning rate
alone would do: see `_QuadraticPenalty.stability_note`, which says so (a warning on the
`strategies.regularization` logger) as soon as the importances are computed.
"""
from __future__ import annotations

import logging
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.func import functional_call, grad, vmap

from strategies.base import Strategy, on_device
from strategies.context import Batch, Context, eval_mode
from strategies.registry import register_strategy
from streams.experience import TensorData

log = logging.getLogger(__name__)


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def per_sample_importance(ctx: Context, data: TensorData, score, batch_size: int = 64,
                          max_samples: int | None = None, generator: torch.Generator | None = None,
                          relabel=None) -> dict[str, torch.Tensor]:
    """The mean over `data`'s samples of a per-sample importance. `score(params, buffers, x, t, y)`
    returns, for a batch of prepared inputs, {parameter name: one importance tensor per sample}
    (from per-sample gradients, torch.func). `relabel(x, t, y)`, if given, replaces each batch's
    labels first, on the whole batch (labels drawn from the model's prediction). Computed in
    eval mode, so train-mode noise (dropout) stays out of the estimate.

    On several processes each scores its share of every batch's rows (`ctx.shard`); the sums
    are added over the processes (`ctx.all_reduce`) and divided by the global count, so every
    process holds the mean one process computes, at 1/N of the per-sample gradients each."""
    model = ctx.model
    params = {n: p.detach() for n, p in _trainable(model).items()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    index = _subset_index(len(data), max_samples, generator)
    scored = 0
    with eval_mode(model):
        for start in range(0, len(index), batch_size):
            rows = index[start:start + batch_size]
            if relabel is None and ctx.world > 1:  # prepare only this process's rows
                rows = ctx.shard(rows)
                if not len(rows):
                    continue
            x = ctx.prepare(data.x[rows])
            t, y = data.t[rows].to(ctx.device), data.y[rows].to(ctx.device)
            if relabel is not None:
                y = relabel(x, t, y)  # on the whole batch, the same draws as one process makes
                if ctx.world > 1:
                    x, t, y = ctx.shard(x), ctx.shard(t), ctx.shard(y)
                    if not len(y):
                        continue
            per_sample = score(params, buffers, x, t, y)
            for n in total:
                total[n] += per_sample[n].sum(0)
            scored += len(next(iter(per_sample.values())))
    if ctx.world > 1:
        ctx.all_reduce(*total.values())
        scored = len(index)
    return {n: v / max(scored, 1) for n, v in total.items()}


def _call(model, params, buffers, x, t):
    """Logits of one sample (batched to one) through `functional_call`, multi-head included."""
    args = (x.unsqueeze(0), t.unsqueeze(0)) if getattr(model, "uses_task_labels", False) else (x.unsqueeze(0),)
    return functional_call(model, (params, buffers), args)[0]


FisherKind = Literal["empirical", "sample", "exact", "batched"]


def fisher_diagonal(ctx: Context, data: TensorData, labels: FisherKind = "empirical",
                    max_samples: int | None = None, generator: torch.Generator | None = None,
                    batch_size: int = 32, batches: str = "data"):
    """Diagonal Fisher information F_i = E_x E_{y ~ q} [(d log p(y|x) / d theta_i)^2], one gradient
    per sample. `labels` says where y comes from: the data's labels (`empirical`, the usual
    choice), one draw from the model's prediction (`sample`), or every class weighted by its
    predicted probability (`exact`, the true Fisher; a gradient per class). `batched` is the
    cruder estimate many libraries use (avalanche-lib among them): the square of each
    mini-batch's mean gradient, averaged over batches of `batch_size`; it is smaller than
    the per-sample Fisher by about the batch size, so a strength tuned for one is not for
    the other (van de Ven 2025 compares the variants). Its batches follow the data's order
    (`batches: data`) or the samples stably sorted by label (`class`, as avalanche-lib's
    class-sorted experience datasets give it), so that each batch holds one class except
    where it straddles two at a class boundary. A one-class batch's gradients add up rather
    than cancel: on Permuted-MNIST, on the same weights, `class` gives each
    layer a largest entry and a sum 1.3 to 3.6 times those of `data`."""
    if labels == "batched":
        return _batched_fisher(ctx, data, batch_size, max_samples, generator, batches)

    model = ctx.model

    def log_likelihood(params, buffers, x, t, y):
        return F.log_softmax(_call(model, params, buffers, x, t), -1).gather(-1, y.view(1)).squeeze(-1)

    squared_grads = vmap(grad(log_likelihood), in_dims=(None, None, 0, 0, 0))

    def draw(x, t, y):  # `sample`: one label per row from the model's prediction, on the whole batch
        with torch.no_grad():
            probs = ctx.forward(x, t).softmax(-1)
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(x.device)

    def score(params, buffers, x, t, y):
        if labels in ("empirical", "sample"):  # `sample`: y was drawn by `draw`
            return {n: v ** 2 for n, v in squared_grads(params, buffers, x, t, y).items()}
        with torch.no_grad():
            probs = ctx.forward(x, t).softmax(-1)
        out = None  # exact: every class, weighted by its predicted probability
        for c in range(probs.shape[-1]):
            w = probs[:, c]
            g = squared_grads(params, buffers, x, t, torch.full_like(y, c))
            part = {n: w.view(-1, *[1] * (v.dim() - 1)) * v ** 2 for n, v in g.items()}
            out = part if out is None else {n: out[n] + part[n] for n in out}
        return out

    if labels not in ("empirical", "sample", "exact"):
        raise ValueError(f"fisher must be 'empirical', 'sample', 'exact' or 'batched', got '{labels}'")
    return per_sample_importance(ctx, data, score, max_samples=max_samples, generator=generator,
                                 relabel=draw if labels == "sample" else None)


def _subset_index(n: int, max_samples: int | None, generator) -> torch.Tensor:
    return torch.arange(n) if max_samples is None or max_samples >= n else torch.randperm(n, generator=generator)[:max_samples]


def _batched_fisher(ctx: Context, data: TensorData, batch_size: int, max_samples, generator, batches: str = "data"):
    index = _subset_index(len(data), max_samples, generator)
    if batches == "class":
        index = index[torch.sort(data.y[index], stable=True).indices]
    return _grouped_gradients(ctx, data, index, batch_size, F.cross_entropy, "square")


def _grouped_gradients(ctx: Context, data: TensorData, index: torch.Tensor, group: int, loss,
                       reduce: Literal["square", "abs"]) -> dict[str, torch.Tensor]:
    """The mean over groups of `group` rows of the squared or absolute gradient of
    loss(logits, y): one ordinary backward pass per group, in eval mode (no dropout noise in
    the estimate), accumulated by foreach kernels (squares fused into one addcmul).

    On several processes each takes its share of a group's rows and the gradient of its
    part of the group's mean (the local mean times n_local / n_group); those gradients are
    added over the processes before the square or absolute value, so that each is of the
    whole group's gradient, as on one process."""
    params = _trainable(ctx.model)
    names, plist = list(params), list(params.values())
    total = [torch.zeros_like(p) for p in plist]
    n_groups = 0
    with eval_mode(ctx.model):
        try:
            for start in range(0, len(index), group):
                rows = index[start:start + group]
                ctx.model.zero_grad(set_to_none=True)
                if ctx.world > 1:
                    grads = _group_gradient(ctx, data, rows, loss, plist)
                    have = range(len(plist))
                else:
                    logits = ctx.forward(ctx.prepare(data.x[rows]), data.t[rows].to(ctx.device))
                    loss(logits, data.y[rows].to(ctx.device)).backward()
                    have = [i for i, p in enumerate(plist) if p.grad is not None]
                    grads = [plist[i].grad.detach() for i in have]
                acc = [total[i] for i in have]
                if reduce == "square":
                    torch._foreach_addcmul_(acc, grads, grads)
                else:
                    torch._foreach_add_(acc, torch._foreach_abs(grads))
                n_groups += 1
        finally:
            ctx.model.zero_grad(set_to_none=True)
    return {n: v / max(n_groups, 1) for n, v in zip(names, total)}


def _group_gradient(ctx: Context, data: TensorData, rows: torch.Tensor, loss,
                    plist: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The gradient of loss(logits, y) (a mean) over the group `rows`, from this process's
    share of them: the local mean's gradient times n_local / n_group, summed over the
    processes in one all-reduce (a process without rows adds zeros)."""
    mine = ctx.shard(rows)
    if len(mine):
        logits = ctx.forward(ctx.prepare(data.x[mine]), data.t[mine].to(ctx.device))
        (loss(logits, data.y[mine].to(ctx.device)) * (len(mine) / len(rows))).backward()
    flat = torch.cat([(p.grad.detach() if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in plist])
    ctx.all_reduce(flat)
    return [g.view_as(p) for g, p in zip(flat.split([p.numel() for p in plist]), plist)]


class _QuadraticForm(torch.autograd.Function):
    """weight * (sum_i p_i . (u_i - b_i) + c_total) over parameters p_i, given u = a p - b
    (computed outside, without a graph): that is weight * sum(a p^2 - 2 b p + c), and its
    gradient is 2 weight u. With foreach kernels this takes four passes over the weights
    forward and one backward, where autograd of the plain expression takes about fourteen
    (on Split-MNIST's MLP the penalty cost as much as the model's own step)."""

    @staticmethod
    def forward(fctx, weight: float, c_total: torch.Tensor, n: int, *tensors: torch.Tensor) -> torch.Tensor:
        p, u, b = tensors[:n], tensors[n:2 * n], tensors[2 * n:]
        w = torch._foreach_sub(u, b)
        value = torch.stack([torch.dot(wi.reshape(-1), pi.reshape(-1)) for wi, pi in zip(w, p)]).sum()
        fctx.save_for_backward(*u)
        fctx.weight, fctx.n = weight, n
        return (value + c_total) * weight

    @staticmethod
    @once_differentiable  # first order only: a second derivative through it is refused, not zero
    def backward(fctx, grad: torch.Tensor):
        grads = torch._foreach_mul(list(fctx.saved_tensors), grad * (2 * fctx.weight))
        return (None, None, None, *grads, *[None] * (2 * fctx.n))


class _Terms(NamedTuple):
    key: tuple  # (model, experience, anchor sums) the lists below were built for
    names: list[str]  # every trainable parameter's name ...
    params: list[torch.nn.Parameter]  # ... and the parameter
    held: list[torch.nn.Parameter]  # those the penalty covers, and for them:
    a: list[torch.Tensor]  # sum_k A_k
    b: list[torch.Tensor]  # sum_k A_k theta*_k
    c_total: torch.Tensor | None  # sum of sum_k A_k theta*_k^2 over every element


class _QuadraticPenalty(Strategy):
    """sum over anchors k of sum_i A_ik (theta_i - theta*_ik)^2, kept as the three sums
    sum_k A_k, sum_k A_k theta*_k and sum_k A_k theta*_k^2, so that the cost per step does not
    grow with the number of anchors: sum_k A_k (theta - theta*_k)^2 =
    theta^2 sum A_k - 2 theta sum A_k theta*_k + sum A_k theta*_k^2."""

    term = "penalty"
    scale = 1.0  # multiplies lambda: 1/2 where the paper has it
    # The penalty is the same on every process (it does not depend on the rows) and the
    # importances are reduced over the processes (`per_sample_importance`, `_grouped_gradients`).
    data_parallel = True

    def __init__(self, strength: float):
        if strength < 0:
            raise ValueError(f"strength must be non-negative, got {strength}")
        self.strength = strength
        self.sums: dict[str, dict[str, torch.Tensor]] | None = None
        self._cached: _Terms | None = None  # see `_terms`
        self._u: list[torch.Tensor] | None = None
        self._u_iteration: int | None = None  # the iteration `_u` was computed in
        self._first_unstable: str | None = None  # `stability_note` where the limit was first passed

    def add_anchor(self, importance: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor]) -> None:
        parts = {n: (importance[n], importance[n] * anchor[n], importance[n] * anchor[n] ** 2) for n in importance}
        if self.sums is None:
            self.sums = {n: {"a": a, "b": b, "c": c} for n, (a, b, c) in parts.items()}
        else:
            for n, (a, b, c) in parts.items():
                s = self.sums[n]
                s["a"], s["b"], s["c"] = s["a"] + a, s["b"] + b, s["c"] + c
        self._cached = None

    def set_anchor(self, importance: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor]) -> None:
        self.sums = None
        self.add_anchor(importance, anchor)

    def stability_note(self, ctx: Context) -> str | None:
        """Why this penalty makes plain SGD diverge, or None where it does not (or the optimizer
        is not `torch.optim.SGD`). The penalty scale * lambda * sum_i Omega_i (theta_i - theta*_i)^2
        has the curvature h_i = 2 scale lambda Omega_i (Omega summed over the anchors), and
        heavy-ball SGD on a quadratic of curvature h is stable iff lr h < 2 (1 + momentum)
        (lr (1 - dampening) with dampening; 2 (1 + m) / (1 + 2 m) with Nesterov momentum).
        A loss of positive curvature only adds to h, so past that limit the step is unstable.
        The lab's MAS study (experiments/RESULTS.md, Split-MNIST's MAS;
        benchmarks/mas_importance_compare.py) found 2 lambda Omega_max lr > 3.8 (momentum 0.9)
        to predict every divergence of seeds 0-6, in the lab and in avalanche-lib. The learning
        rate used is the larger of the group's current one and its scheduler's base
        (`initial_lr`); the stable strength offered is 0.9 times the limit's."""
        if self.sums is None or not self.strength or not isinstance(ctx.optimizer, torch.optim.SGD):
            return None
        names = {id(p): n for n, p in _trainable(ctx.model).items()}
        worst = None  # (lr h / limit, lr, limit, how the limit reads, largest importance)
        for group in ctx.optimizer.param_groups:
            held = [self.sums[names[id(p)]]["a"] for p in group["params"] if names.get(id(p)) in self.sums]
            if not held:
                continue
            largest = max(float(a.max()) for a in held)
            m, damped = float(group.get("momentum", 0.0)), float(group.get("dampening", 0.0))
            lr = float(max(group["lr"], group.get("initial_lr", 0.0))) * (1 - damped if m else 1.0)
            nesterov = bool(group.get("nesterov"))
            limit = 2 * (1 + m) / (1 + 2 * m) if nesterov else 2 * (1 + m)
            rule = f"2 (1 + momentum {m:g})" + (f" / (1 + 2 x {m:g}) (Nesterov)" if nesterov else "")
            ratio = lr * 2 * self.scale * self.strength * largest / limit
            if worst is None or ratio > worst[0]:
                worst = (ratio, lr, limit, rule, largest)
        if worst is None or not worst[0] >= 1:
            return None
        ratio, lr, limit, rule, largest = worst
        curvature = 2 * self.scale * self.strength * largest
        stable = 0.9 * limit / (lr * 2 * self.scale * largest)
        return (f"{type(self).__name__}'s penalty at strength {self.strength:g} is past SGD's stability limit, "
                f"so training may diverge: its largest importance {largest:.4g} gives the curvature "
                f"{curvature:.4g}, and lr {lr:g} x {curvature:.4g} = {lr * curvature:.3g} passes {rule} = "
                f"{limit:.3g}; a strength of {float(f'{stable:.2g}'):g} or less is stable (or a learning rate "
                f"below {limit / curvature:.3g})")

    def check_stability(self, ctx: Context) -> None:
        """Warn, right after the importances are computed, where the penalty is past the
        stability limit (`stability_note`), and keep the first such note for `diagnose`."""
        note = self.stability_note(ctx)
        if note:
            note = f"after experience {ctx.experience.index + 1} of {len(ctx.stream)}, {note}"
            log.warning(note)
            self._first_unstable = self._first_unstable or note

    def diagnose(self, ctx: Context) -> str | None:
        """The note of the experience where the penalty first passed the stability limit: the
        cause (importances computed later, on weights already swinging, are inflated by the
        instability itself); where none was kept (a resumed run), the limit on the weights now."""
        return self._first_unstable or self.stability_note(ctx)

    def _terms(self, ctx: Context) -> "_Terms":
        """The trainable parameters and the penalty's tensors for them, looked up once per
        model, experience and anchor, not per step."""
        key = (id(ctx.model), id(ctx.experience), id(self.sums))
        if self._cached is None or self._cached.key != key:
            named = list(_trainable(ctx.model).items())
            held = [(n, p) for n, p in named if self.sums is not None and n in self.sums]
            self._cached = _Terms(
                key, [n for n, _ in named], [p for _, p in named], [p for _, p in held],
                [self.sums[n]["a"] for n, _ in held], [self.sums[n]["b"] for n, _ in held],
                torch.stack([self.sums[n]["c"].sum() for n, _ in held]).sum() if held else None)
        return self._cached

    def extra_loss(self, ctx: Context, batch: Batch):
        if self.sums is None or not self.strength:
            return None
        terms = self._terms(ctx)
        if not terms.held:
            return None
        with torch.no_grad():
            u = torch._foreach_mul(terms.a, [p.detach() for p in terms.held])
            torch._foreach_sub_(u, terms.b)
        self._u = u  # A theta - B at this step's weights: SI takes its penalty's gradient from it
        self._u_iteration = ctx.iteration
        value = _QuadraticForm.apply(self.scale * self.strength, terms.c_total, len(terms.held), *terms.held, *u,
                                     *terms.b)
        return {self.term: value}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "sums": self.sums}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.sums = on_device(state["sums"], getattr(self, "device", None))
        self._cached = None


def _weights(ctx: Context) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in _trainable(ctx.model).items()}


@register_strategy("ewc")
class EWC(_QuadraticPenalty):
    """Elastic Weight Consolidation (Kirkpatrick et al. 2017, "Overcoming catastrophic
    forgetting in neural networks"): a quadratic pull towards each earlier task's weights,
    weighted by their Fisher information.

    Eq. 3, one penalty per earlier task k:

        L = L_new + sum_k (lambda / 2) sum_i F_k,i (theta_i - theta*_k,i)^2,

    F_k the diagonal Fisher information at theta*_k, the weights after task k, from
    per-sample gradients of log p(y|x) on task k's training data (`fisher`: the labels'
    (empirical), one draw from the model, the exact expectation over classes, or the cruder
    `batched` estimate of squared mini-batch gradients; the paper does not say which, and
    van de Ven 2025 finds the exact one best; `fisher_batches` orders the batched estimate's
    batches: `data` or one `class` at a time, see `fisher_diagonal`). `fisher_samples` caps
    the samples used (None: all). The paper's lambda is not recoverable from its text; the
    default 100 keeps plain SGD stable with the per-sample Fisher (a step becomes unstable
    once lr * lambda * F passes 2 (1 + momentum), see `stability_note`, which warns of it;
    avalanche-lib's 1000 goes with its batched Fisher)."""

    term = "ewc"
    scale = 0.5

    def __init__(self, strength: float = 100.0, fisher: FisherKind = "empirical", fisher_samples: int | None = None,
                 fisher_batch_size: int = 32, fisher_batches: Literal["data", "class"] = "data"):
        super().__init__(strength)
        if fisher not in ("empirical", "sample", "exact", "batched"):
            raise ValueError(f"fisher must be 'empirical', 'sample', 'exact' or 'batched', got '{fisher}'")
        if fisher_batches not in ("data", "class"):
            raise ValueError(f"fisher_batches must be 'data' or 'class', got '{fisher_batches}'")
        if fisher_batches != "data" and fisher != "batched":
            raise ValueError(f"fisher_batches orders the batches of fisher: batched only; fisher is '{fisher}'")
        self.fisher, self.fisher_samples, self.fisher_batch_size = fisher, fisher_samples, fisher_batch_size
        self.fisher_batches = fisher_batches

    def fisher_of(self, ctx: Context) -> dict[str, torch.Tensor]:
        return fisher_diagonal(ctx, ctx.experience.train, self.fisher, self.fisher_samples, self.rng,
                               self.fisher_batch_size, self.fisher_batches)

    def after_experience(self, ctx: Context, data: TensorData) -> None:
        self.add_anchor(self.fisher_of(ctx), _weights(ctx))
        self.check_stability(ctx)


@register_strategy("online_ewc")
class OnlineEWC(EWC):
    """Online EWC (Schwarz et al. 2018, "Progress & Compress"): EWC with one running Fisher
    and one anchor instead of one penalty per task.

    F* <- gamma F* + F_t after each task t, and the anchor is the latest weights theta*_{t-1}:

        L = L_new + (lambda / 2) sum_i gamma F*_i (theta_i - theta*_{t-1,i})^2.

    gamma < 1 lets old tasks fade. Defaults as EWC's, gamma 0.9."""

    def __init__(self, strength: float = 100.0, gamma: float = 0.9, fisher: FisherKind = "empirical",
                 fisher_samples: int | None = None, fisher_batch_size: int = 32,
                 fisher_batches: Literal["data", "class"] = "data"):
        super().__init__(strength, fisher, fisher_samples, fisher_batch_size, fisher_batches)
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        self.gamma = gamma
        self.running: dict[str, torch.Tensor] | None = None

    def after_experience(self, ctx: Context, data: TensorData) -> None:
        fisher = self.fisher_of(ctx)
        self.running = fisher if self.running is None else {
            n: self.gamma * self.running[n] + fisher[n] for n in fisher}
        self.set_anchor({n: self.gamma * f for n, f in self.running.items()}, _weights(ctx))
        self.check_stability(ctx)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "running": self.running}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.running = on_device(state["running"], getattr(self, "device", None))


@register_strategy("si")
class SI(_QuadraticPenalty):
    """Synaptic Intelligence (Zenke, Poole and Ganguli 2017, "Continual Learning Through
    Synaptic Intelligence"). Each weight's contribution to the decrease of the loss along
    the training path of task mu, omega^mu_k = - sum_steps g_k * Delta theta_k (g the gradient
    of the loss without this penalty, Delta theta the step actually taken), gives

        Omega_k = sum_{nu < mu} omega^nu_k / ((Delta^nu_k)^2 + xi),     L = L_mu + c sum_k Omega_k (theta~_k - theta_k)^2,

    Delta^nu_k the weight's total change over task nu and theta~ the weights at the end of
    the previous task. As in the authors' code, Omega is clamped at zero (a step that raised
    the loss must not make a weight cheap to move). Defaults: the paper's Permuted-MNIST
    values c = 0.1, xi = 0.1 (Split MNIST: c = 1, xi = 1e-3).

    On several processes nothing is split: the gradient `after_backward` reads is the step's,
    already averaged over the processes (the one-process gradient, the same on each), and
    the step and the penalty are the same on each, so every process sums the same path."""

    term = "si"

    def __init__(self, strength: float = 0.1, xi: float = 0.1):
        super().__init__(strength)
        if xi <= 0:
            raise ValueError(f"xi must be positive, got {xi}")
        self.xi = xi
        self.omega: dict[str, torch.Tensor] | None = None
        self.importance: dict[str, torch.Tensor] | None = None
        self.start: dict[str, torch.Tensor] | None = None
        self._grad: list[torch.Tensor] | None = None  # per-step buffers, see `after_backward`
        self._before: list[torch.Tensor] | None = None

    def setup(self, ctx: Context) -> None:
        super().setup(ctx)
        self.start = _weights(ctx)
        self.omega = {n: torch.zeros_like(p) for n, p in self.start.items()}

    def after_backward(self, ctx: Context, batch: Batch) -> None:
        # The gradient as this hook sees it and the weights before the step, copied into
        # buffers kept across steps (the step may change .grad in place: foreach SGD with
        # Nesterov momentum does).
        terms = self._terms(ctx)
        names, params = terms.names, terms.params
        if self._before is None or len(self._before) != len(params):
            self._grad = [torch.zeros_like(p) for p in params]
            self._before = [torch.zeros_like(p) for p in params]
        if all(p.grad is not None for p in params):
            torch._foreach_copy_(self._grad, [p.grad for p in params])
        else:
            for buf, p in zip(self._grad, params):
                buf.copy_(p.grad) if p.grad is not None else buf.zero_()
        torch._foreach_copy_(self._before, [p.detach() for p in params])

    def after_step(self, ctx: Context, batch: Batch) -> None:
        # omega -= g * Delta theta with g the task loss's gradient alone: the gradient copied
        # above less this strategy's own penalty gradient 2 lambda (A theta - B), known in
        # closed form (u = A theta - B from this step's penalty). Written as
        # omega += (grad - 2 lambda u) * (before - after), by foreach kernels.
        terms = self._terms(ctx)
        names, params = terms.names, terms.params
        torch._foreach_sub_(self._before, [p.detach() for p in params])  # now before - after
        omega = [self.omega[n] for n in names]
        torch._foreach_addcmul_(omega, self._grad, self._before)
        if self.sums is not None and self.strength and self._u_iteration == ctx.iteration:
            held = [i for i, n in enumerate(names) if n in self.sums]  # the parameters `_u` is for
            torch._foreach_addcmul_([omega[i] for i in held], self._u, [self._before[i] for i in held],
                                    value=-2 * self.scale * self.strength)

    def after_experience(self, ctx: Context, data: TensorData) -> None:
        now = _weights(ctx)
        new = {n: self.omega[n] / ((now[n] - self.start[n]) ** 2 + self.xi) for n in now}
        self.importance = new if self.importance is None else {n: self.importance[n] + new[n] for n in new}
        self.importance = {n: v.clamp_min(0.0) for n, v in self.importance.items()}
        self.set_anchor(self.importance, now)
        self.check_stability(ctx)
        self.start = now
        self.omega = {n: torch.zeros_like(p) for n, p in now.items()}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "omega": self.omega, "importance": self.importance, "start": self.start}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        device = getattr(self, "device", None)
        self.omega, self.importance, self.start = (on_device(state[k], device)
                                                   for k in ("omega", "importance", "start"))


@register_strategy("mas")
class MAS(_QuadraticPenalty):
    """Memory Aware Synapses (Aljundi et al. 2018, "Memory Aware Synapses: Learning What
    (not) to Forget"). A weight's importance is how much the squared L2 norm of the network's
    output moves with it, averaged over the task's samples (no labels needed),

        Omega_ij = 1/N sum_k | d ||F(x_k)||^2 / d theta_ij |,      L = L_new + lambda sum Omega (theta - theta*)^2,

    with F the logits, importances summed over tasks and the anchor at the latest weights.
    With `importance_batch_size: 1` the gradient is per sample, as in the paper's equation;
    the authors' code (and avalanche-lib's) takes the absolute value of each mini-batch's
    mean gradient instead, which `importance_batch_size: 32` reproduces and which gives
    smaller importances. Default lambda = 1 (the paper's object recognition setting).
    `importance_samples` caps the samples used.

    Importances are summed over tasks, as the paper accumulates them; `decay: a` keeps a
    running average instead, Omega <- a Omega_old + (1 - a) Omega_new (avalanche-lib's MAS,
    a = 0.5). Summed importances grow with the number of tasks, and so does the penalty's
    curvature 2 lambda Omega: with SGD at lr 0.01 and momentum 0.9 on Split-MNIST the summed
    form diverges by the third experience at lambda = 1, where the running average does not."""

    term = "mas"

    def __init__(self, strength: float = 1.0, importance_batch_size: int = 1, importance_samples: int | None = None,
                 decay: float | None = None):
        super().__init__(strength)
        if importance_batch_size < 1:
            raise ValueError(f"importance_batch_size must be positive, got {importance_batch_size}")
        if decay is not None and not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1) (or null: sum over tasks), got {decay}")
        self.importance_batch_size, self.importance_samples = importance_batch_size, importance_samples
        self.decay = decay
        self.importance: dict[str, torch.Tensor] | None = None

    def after_experience(self, ctx: Context, data: TensorData) -> None:
        new = self._per_sample(ctx) if self.importance_batch_size == 1 else self._per_group(ctx)
        if self.importance is None:
            self.importance = new
        elif self.decay is None:
            self.importance = {n: self.importance[n] + new[n] for n in new}
        else:
            a = self.decay
            self.importance = {n: a * self.importance[n] + (1 - a) * new[n] for n in new}
        self.set_anchor(self.importance, _weights(ctx))
        self.check_stability(ctx)

    def _per_group(self, ctx: Context) -> dict[str, torch.Tensor]:
        """|gradient of a group's mean ||F(x)||^2|, averaged over the whole groups of b samples:
        one ordinary backward pass per group (what a per-sample vmap would do b times over)."""
        data, b = ctx.experience.train, self.importance_batch_size
        index = _subset_index(len(data), self.importance_samples, self.rng)
        index = index[: len(index) // b * b]  # whole groups; the remainder is dropped
        return _grouped_gradients(ctx, data, index, b, lambda logits, y: logits.pow(2).sum(-1).mean(),
                                  "abs")

    def _per_sample(self, ctx: Context) -> dict[str, torch.Tensor]:
        """The paper's equation: the mean over samples of |d ||F(x_k)||^2 / d theta|."""
        model = ctx.model

        def sq_norm(params, buffers, x, t):
            return _call(model, params, buffers, x, t).pow(2).sum()

        per_sample = vmap(grad(sq_norm), in_dims=(None, None, 0, 0))

        def score(params, buffers, x, t, y):
            return {k: v.abs() for k, v in per_sample(params, buffers, x, t).items()}

        return per_sample_importance(ctx, ctx.experience.train, score, max_samples=self.importance_samples,
                                     generator=self.rng)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "importance": self.importance}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.importance = on_device(state["importance"], getattr(self, "device", None))


@register_strategy("l2")
class L2(_QuadraticPenalty):
    """L2 pull towards the weights held after the previous experience, every weight equally
    important: L = L_new + (lambda / 2) ||theta - theta*||^2, the uniform-importance baseline
    beside EWC in Kirkpatrick et al. 2017."""

    term = "l2"
    scale = 0.5

    def __init__(self, strength: float = 1.0):
        super().__init__(strength)

    def after_experience(self, ctx: Context, data: TensorData) -> None:
        now = _weights(ctx)
        self.set_anchor({n: torch.ones_like(p) for n, p in now.items()}, now)
        self.check_stability(ctx)
