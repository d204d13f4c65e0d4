"""Weight regularisation and distillation: importances by hand, penalties that do what they claim."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import conftest
from cl.models import MLP
from strategies import EWC, L2, MAS, SI, LwF, Naive, OnlineEWC
from strategies.context import Context
from strategies.regularization import fisher_diagonal
from streams import digits, permuted
from streams.experience import BatchTransform, Experience, Stream, TensorData


class Linear2(torch.nn.Module):
    """A 2 -> 2 linear map without bias: importances can be worked out by hand."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))

    def forward(self, x):
        return x @ self.w.T


def toy_context(model, x, y):
    data = TensorData(torch.tensor(x), torch.tensor(y))
    stream = Stream("toy", [Experience(0, 0, [0, 1], data, data, 0)], BatchTransform(scale=1.0), (2,), 2, [0, 1])
    ctx = Context(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"),
                  transform=stream.transform)
    ctx.stream, ctx.experience = stream, stream[0]
    return ctx, data


def test_mas_importance_by_hand():
    # F(x) = W x, ||F(x)||^2 = sum_i (W x)_i^2, d/dW_ij = 2 (W x)_i x_j.
    W = [[1.0, 2.0], [0.0, -1.0]]
    x = [[1.0, 0.0], [1.0, 1.0]]
    ctx, data = toy_context(Linear2(W), x, [0, 1])
    mas = MAS(strength=1.0)
    mas.rng = torch.Generator().manual_seed(0)
    mas.after_experience(ctx, data)
    # x1 = (1, 0): Wx = (1, 0) -> grad = 2 * [[1, 0], [0, 0]]
    # x2 = (1, 1): Wx = (3, -1) -> grad = 2 * [[3, 3], [-1, -1]]
    expected = (torch.tensor([[2.0, 0.0], [0.0, 0.0]]).abs() + torch.tensor([[6.0, 6.0], [-2.0, -2.0]]).abs()) / 2
    torch.testing.assert_close(mas.importance["w"], expected)
    # The authors' code takes |mean gradient| over a batch: |(2+6)/2|, |(0+6)/2|, |(0-2)/2|, |(0-2)/2|.
    batched = MAS(strength=1.0, importance_batch_size=2)
    batched.rng = torch.Generator().manual_seed(0)
    batched.after_experience(ctx, data)
    torch.testing.assert_close(batched.importance["w"], torch.tensor([[4.0, 3.0], [1.0, 1.0]]))
    # A second task: the paper sums importances; `decay` keeps avalanche-lib's running average.
    summed, averaged = MAS(importance_batch_size=2), MAS(importance_batch_size=2, decay=0.25)
    for m in (summed, averaged):
        m.rng = torch.Generator().manual_seed(0)
        m.importance = {"w": torch.ones(2, 2)}  # as if a first task had left ones
        m.after_experience(ctx, data)
    new = torch.tensor([[4.0, 3.0], [1.0, 1.0]])
    torch.testing.assert_close(summed.importance["w"], 1 + new)
    torch.testing.assert_close(averaged.importance["w"], 0.25 + 0.75 * new)
    with pytest.raises(ValueError, match="decay"):
        MAS(decay=1.0)


def test_empirical_fisher_by_hand():
    # Softmax regression p = softmax(W x); d log p_y / dW = (onehot(y) - p) x^T.
    W = [[0.5, -0.5], [0.0, 1.0]]
    x, y = [[1.0, 2.0], [0.0, 1.0]], [0, 1]
    ctx, data = toy_context(Linear2(W), x, y)
    expected = torch.zeros(2, 2)
    for xi, yi in zip(torch.tensor(x), y):
        p = F.softmax(torch.tensor(W) @ xi, 0)
        g = torch.outer(F.one_hot(torch.tensor(yi), 2) - p, xi)
        expected += g ** 2 / 2
    torch.testing.assert_close(fisher_diagonal(ctx, data, "empirical")["w"], expected)
    # The exact Fisher weighs every label by its predicted probability.
    exact = torch.zeros(2, 2)
    for xi in torch.tensor(x):
        p = F.softmax(torch.tensor(W) @ xi, 0)
        for c in range(2):
            exact += p[c] * torch.outer(F.one_hot(torch.tensor(c), 2) - p, xi) ** 2 / 2
    torch.testing.assert_close(fisher_diagonal(ctx, data, "exact")["w"], exact)


def test_batched_fisher_by_hand_in_data_and_class_order():
    """Squared mini-batch mean gradients of the cross-entropy, averaged over batches: in the data's
    order, or with each batch holding one class (avalanche-lib's class-sorted datasets)."""
    W = [[0.5, -0.5], [0.0, 1.0]]
    x, y = [[1.0, 2.0], [0.0, 1.0], [2.0, 0.0], [1.0, -1.0]], [0, 1, 0, 1]
    ctx, data = toy_context(Linear2(W), x, y)
    xs, Wt = torch.tensor(x), torch.tensor(W)

    def grad_of(rows):  # d/dW of the mean cross-entropy over `rows`: mean of (p - onehot(y)) x^T
        return sum(torch.outer(F.softmax(Wt @ xs[i], 0) - F.one_hot(torch.tensor(y[i]), 2), xs[i])
                   for i in rows) / len(rows)

    in_order = (grad_of([0, 1]) ** 2 + grad_of([2, 3]) ** 2) / 2
    by_class = (grad_of([0, 2]) ** 2 + grad_of([1, 3]) ** 2) / 2
    torch.testing.assert_close(fisher_diagonal(ctx, data, "batched", batch_size=2)["w"], in_order)
    torch.testing.assert_close(fisher_diagonal(ctx, data, "batched", batch_size=2, batches="class")["w"], by_class)
    assert not torch.allclose(in_order, by_class)
    ewc = EWC(fisher="batched", fisher_batch_size=2, fisher_batches="class")
    ewc.rng = torch.Generator().manual_seed(0)
    torch.testing.assert_close(ewc.fisher_of(ctx)["w"], by_class)
    with pytest.raises(ValueError, match="fisher_batches"):
        EWC(fisher="batched", fisher_batches="shuffled")
    with pytest.raises(ValueError, match="fisher_batches orders the batches of fisher: batched only"):
        EWC(fisher="empirical", fisher_batches="class")


def test_si_importance_by_hand():
    """Two plain SGD steps on one weight: omega = -sum g * dtheta, Omega = omega / (Delta^2 + xi)."""

    class Scalar(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(1.0))

        def forward(self, x):
            return torch.stack([self.w * x[:, 0], torch.zeros(len(x))], 1)

    model = Scalar()
    x = torch.tensor([[1.0, 0.0]])
    y = torch.tensor([0])
    data = TensorData(x, y)
    stream = Stream("one", [Experience(0, 0, [0, 1], data, data, 0)], BatchTransform(scale=1.0), (2,), 2, [0, 1])
    si = SI(strength=1.0, xi=0.5)
    conftest.trainer_for(stream, [si], batch_size=1, model=model, lr=1.0, momentum=0, epochs=2).fit(stream)
    # loss(w) = -log softmax([w, 0])_0 = log(1 + e^-w); g(w) = -1 / (1 + e^w); w <- w - g.
    w0 = 1.0
    g0 = -1 / (1 + np.exp(w0)); w1 = w0 - g0
    g1 = -1 / (1 + np.exp(w1)); w2 = w1 - g1
    omega = -(g0 * (w1 - w0) + g1 * (w2 - w1))
    assert si.importance["w"].item() == pytest.approx(omega / ((w2 - w0) ** 2 + 0.5), rel=1e-5)


def trainer_for(stream, strategies, optimizer="sgd", **kw):
    """Three epochs in batches of 16 over an MLP of 64, by SGD at 0.01 with momentum (or Adam at 1e-3)."""
    adam = (lambda params: torch.optim.Adam(params, lr=1e-3)) if optimizer == "adam" else None
    return conftest.trainer_for(stream, strategies, batch_size=16, epochs=3, lr=0.01, optimizer=adam, **kw)


@pytest.fixture(scope="module")
def perm():
    return permuted(digits(), n_experiences=3)


def test_ewc_with_a_huge_lambda_keeps_the_first_task(perm):
    naive = trainer_for(perm, [Naive()], "adam").fit(perm).accuracy_matrix
    held = trainer_for(perm, [EWC(strength=1e6)], "adam").fit(perm).accuracy_matrix
    assert naive[3, 0] < naive[1, 0] - 0.1  # fine-tuning forgets task 0
    assert held[3, 0] > held[1, 0] - 0.03  # EWC keeps it


@pytest.fixture(scope="module")
def naive_acc(perm):
    return trainer_for(perm, [Naive()]).fit(perm).accuracy_matrix[-1].mean()


@pytest.mark.parametrize("make", [lambda: EWC(), lambda: EWC(1000.0, fisher="batched"), lambda: OnlineEWC(),
                                  lambda: SI(1.0), lambda: L2(0.1)], ids=["ewc", "ewc-batched", "online", "si", "l2"])
def test_regularisers_beat_fine_tuning_on_permuted_digits(perm, naive_acc, make):
    record = trainer_for(perm, [make()]).fit(perm)
    assert record.accuracy_matrix[-1].mean() > naive_acc + 0.03
    assert len(record.loss_terms) == 2


def test_ewc_keeps_one_penalty_per_task(perm):
    """The summed form equals the sum of the per-task penalties (lambda/2) F_k (theta - theta*_k)^2."""
    ewc = EWC(strength=10.0)
    pairs = []
    original = ewc.add_anchor

    def record(importance, anchor):
        pairs.append((importance, anchor))
        original(importance, anchor)

    ewc.add_anchor = record
    trainer = trainer_for(perm, [ewc])
    trainer.fit(perm)
    assert len(pairs) == 3
    params = dict(trainer.model.named_parameters())
    direct = sum(0.5 * 10.0 * (f[n] * (params[n] - a[n]) ** 2).sum() for f, a in pairs for n in f)
    assert ewc.extra_loss(trainer.ctx, None)["ewc"].item() == pytest.approx(direct.item(), rel=1e-4)


def test_online_ewc_decays_the_running_fisher(perm):
    online = OnlineEWC(strength=1.0, gamma=0.5)
    trainer = trainer_for(perm, [online])
    fishers = []
    original = online.fisher_of

    def spy(ctx):
        f = original(ctx)
        fishers.append(f)
        return f

    online.fisher_of = spy
    trainer.fit(perm)
    for n in fishers[0]:
        expected = 0.5 * (0.5 * (0.5 * fishers[0][n] + fishers[1][n]) + fishers[2][n])
        torch.testing.assert_close(online.sums[n]["a"], expected)


def test_lwf_distillation_is_zero_for_an_unchanged_model_and_positive_after_a_step(perm):
    from strategies.context import Batch

    lwf = LwF(alpha=1.0, temperature=2.0)
    trainer = trainer_for(perm, [lwf])
    trainer.fit(perm, stop_after=1)
    ctx = trainer.ctx
    ctx.experience = perm[1]
    lwf.before_experience(ctx)  # copies the model: old and new are the same
    data = perm[1].train

    def term():
        batch = Batch(data.x[:64], data.y[:64], data.t[:64], 64)
        batch.x = ctx.prepare(batch.x_raw)
        batch.logits = ctx.model(batch.x)
        return lwf.extra_loss(ctx, batch)["lwf"]

    assert term().item() == pytest.approx(0.0, abs=1e-7)
    opt = torch.optim.SGD(ctx.model.parameters(), lr=0.5)
    F.cross_entropy(ctx.model(ctx.prepare(data.x[:64])), data.y[:64]).backward()
    opt.step()
    assert term().item() > 1e-4


def test_fused_penalty_equals_the_plain_expression():
    """The foreach penalty's value and gradient equal those of lambda' sum(a p^2 - 2 b p + c)."""
    torch.manual_seed(0)
    model = MLP((1, 4, 4), 3, hidden=(5,))
    names = [n for n, _ in model.named_parameters()]
    importance = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    anchor = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in model.named_parameters()}
    ewc = EWC(strength=3.0)
    ewc.set_anchor(importance, anchor)
    ewc.add_anchor({n: 2 * v for n, v in importance.items()}, {n: -v for n, v in anchor.items()})  # two anchors
    ctx = Context(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"))
    fused = ewc.extra_loss(ctx, None)["ewc"]
    fused.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    plain = 0.5 * 3.0 * sum((ewc.sums[n]["a"] * p * p - 2 * ewc.sums[n]["b"] * p + ewc.sums[n]["c"]).sum()
                            for n, p in model.named_parameters())
    plain.backward()
    assert fused.item() == pytest.approx(plain.item(), rel=1e-5)
    for n, g, p in zip(names, got, model.parameters()):
        torch.testing.assert_close(g, p.grad, msg=n)
        closed_form = 2 * 0.5 * 3.0 * (ewc.sums[n]["a"] * p.detach() - ewc.sums[n]["b"])  # 2 lambda' (A theta - B)
        torch.testing.assert_close(g, closed_form, msg=n)


class PlainSI(SI):
    """SI's path integral written out with dicts, one parameter at a time: the reference the
    buffered, foreach version must equal."""

    def after_backward(self, ctx, batch):
        params = {n: p for n, p in ctx.model.named_parameters() if p.requires_grad}
        self.ref_grad = {n: p.grad.detach().clone() for n, p in params.items()}
        if self.sums is not None and self.strength:  # the task loss's gradient alone
            for n, p in params.items():
                self.ref_grad[n] -= 2 * self.strength * (self.sums[n]["a"] * p.detach() - self.sums[n]["b"])
        self.ref_before = {n: p.detach().clone() for n, p in params.items()}

    def after_step(self, ctx, batch):
        for n, p in ctx.model.named_parameters():
            self.omega[n] -= self.ref_grad[n] * (p.detach() - self.ref_before[n])


@pytest.mark.parametrize("nesterov", [False, True], ids=["sgd", "foreach-nesterov"])
def test_si_path_integral_equals_the_plain_computation(perm, nesterov):
    """Also under foreach SGD with Nesterov momentum, whose step changes .grad in place."""
    def fit(si):
        def sgd(params):
            return torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=nesterov, foreach=nesterov)

        conftest.trainer_for(perm, [si], batch_size=16, epochs=3, optimizer=sgd).fit(perm, stop_after=2)

    fast, plain = SI(strength=1.0, xi=0.1), PlainSI(strength=1.0, xi=0.1)
    fit(fast)
    fit(plain)  # the penalty is on in the second experience
    for n in fast.importance:
        torch.testing.assert_close(fast.importance[n], plain.importance[n], rtol=1e-4, atol=1e-7)
    assert any(float(v.abs().sum()) > 0 for v in fast.importance.values())


def test_state_loaded_from_a_checkpoint_goes_to_the_training_device(perm):
    """Checkpoints load on the CPU; importances, anchors and memories must go back to the device
    the strategy trains on (set by `setup`), or a resumed CUDA run mixes devices. The meta
    device stands in for CUDA here."""
    from strategies.gem import GEM
    for make in (lambda: OnlineEWC(fisher="batched"), lambda: SI(1.0), lambda: MAS(importance_batch_size=32),
                 lambda: GEM(patterns_per_experience=10)):
        trained = make()
        trainer = trainer_for(perm, [trained])
        trainer.fit(perm, stop_after=1)
        state = trained.state_dict()
        fresh = make()
        trainer.ctx._seeds[id(fresh)] = 0  # a strategy the trainer was not built with
        fresh.setup(trainer.ctx)
        assert fresh.device == torch.device("cpu")
        fresh.device = torch.device("meta")
        fresh.load_state_dict(state)
        held = {k: v for k, v in vars(fresh).items() if k in ("sums", "running", "omega", "importance", "start",
                                                              "memories")}
        tensors = [t for v in held.values() for t in torch.utils._pytree.tree_leaves(v) if isinstance(t, torch.Tensor)]
        assert tensors and all(t.device.type == "meta" for t in tensors), type(fresh).__name__
