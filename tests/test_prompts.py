"""Prompt methods on a tiny timm ViT: insertion points, frozen parts, selection, orthogonality."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_vit, trainer_for, vit_trainer_for
from strategies import CODAPrompt, DualPrompt, L2P, Strategy
from strategies.context import Batch
from strategies.prompting.coda import gram_schmidt
from strategies.prompting.vit import block_forward, prompted_tokens, split_heads

timm = pytest.importorskip("timm")


def run(stream, strategy, experiences=2, seed=0, lr=0.01, epochs=1):
    trainer = vit_trainer_for(stream, [strategy], seed, lr=lr, epochs=epochs)
    trainer.fit(stream, stop_after=experiences)
    return trainer


def test_prefix_attention_gives_each_head_its_own_slice_of_the_prefix():
    vit = tiny_vit()
    block = vit.blocks[0]
    h = torch.randn(3, 5, 32)
    assert torch.equal(block_forward(block, h, None), block(h))
    pk, pv = torch.randn(3, 4, 32), torch.randn(3, 4, 32)
    # By hand, head by head: head i sees width slice i of the prefix tokens, all of them.
    attn, x = block.attn, block.norm1(h)
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    heads = []
    for i in range(2):
        s = slice(16 * i, 16 * (i + 1))
        keys = torch.cat([pk[..., s], k[..., s]], dim=1)
        values = torch.cat([pv[..., s], v[..., s]], dim=1)
        w = torch.softmax(q[..., s] @ keys.transpose(1, 2) / 4.0, dim=-1)
        heads.append(w @ values)
    expected = h + attn.proj(torch.cat(heads, dim=-1))
    expected = expected + block.mlp(block.norm2(expected))
    assert torch.allclose(block_forward(block, h, (pk, pv)), expected, atol=1e-5)
    # A reshape instead of the permute would give head 0 the first tokens' whole width.
    assert split_heads(pk, 2)[:, 0].shape == (3, 4, 16) and torch.equal(split_heads(pk, 2)[:, 1], pk[..., 16:])


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True}, {"init_values": 0.1}])
def test_without_a_prefix_the_repeated_forward_equals_timms_own(kw):
    from strategies.prompting.vit import prefix_attention

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, in_chans=1, embed_dim=32, depth=2,
                            num_heads=2, num_classes=3, **kw)
    block, h = vit.blocks[1], torch.randn(2, 5, 32)
    assert torch.allclose(prefix_attention(block.attn, h, None), block.attn(h), atol=1e-6)
    empty = (torch.zeros(2, 0, 32), torch.zeros(2, 0, 32))
    assert torch.allclose(block_forward(block, h, empty), block(h), atol=1e-6)


def test_prompted_tokens_without_prompts_is_the_vits_own_forward():
    vit = tiny_vit().eval()
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(prompted_tokens(vit, x), vit.forward_features(x), atol=1e-6)
    prompt = torch.randn(2, 7, 32)
    assert prompted_tokens(vit, x, prompt=prompt).shape == (2, 1 + 7 + 4, 32)


def test_l2p_inserts_top_k_prompts_and_its_selection_follows_the_query(small_stream, monkeypatch):
    trainer = run(small_stream, L2P(pool_size=6, prompt_length=3, top_k=2), experiences=1)
    l2p = trainer.strategies[0]
    assert l2p.params.prompts.shape == (6, 3, 32) and l2p.params.keys.shape == (6, 32)
    keys = F.normalize(l2p.params.keys.detach(), dim=-1)
    for j in (0, 4):  # a query equal to key j selects j first
        idx, sims = l2p.select(keys[j:j + 1] * 3.0)
        assert idx[0, 0] == j and sims[0, 0].item() == pytest.approx(1.0, abs=1e-5)
    import strategies.prompting.l2p as mod

    seen = {}

    def spy(vit, x, prefixes=None, prompt=None):
        seen["prompt"], seen["prefixes"] = prompt, prefixes
        return prompted_tokens(vit, x, prefixes, prompt)

    monkeypatch.setattr(mod, "prompted_tokens", spy)
    trainer.ctx.forward(torch.randn(4, 1, 8, 8))
    assert seen["prompt"].shape == (4, 2 * 3, 32) and not seen["prefixes"]  # prompt tuning at the input only


def test_l2p_trains_only_prompts_keys_and_head(small_stream):
    vit0 = tiny_vit(small_stream.n_classes)
    trainer = run(small_stream, L2P(pool_size=4, prompt_length=2, top_k=2))
    head = {n for n, _ in trainer.model.named_parameters() if n.startswith("head.")}
    for (name, p0), p1 in zip(vit0.named_parameters(), trainer.model.parameters()):
        assert torch.equal(p0, p1) != (name in head), name
    match = trainer.record.loss_terms["l2p_match"]
    assert 0 < match[0] <= 0.1 * 2 * 2  # weight 0.1 times top 2 distances, each at most 2


def test_dualprompt_prefixes_sit_at_g_and_e_layers_and_old_experts_get_no_gradient(small_stream):
    dp = DualPrompt(g_length=3, e_length=2)
    trainer = run(small_stream, dp, experiences=2)
    assert dp.params.g.shape == (2, 2, 3, 32) and dp.params.e.shape == (5, 3, 2, 2, 32)
    prefixes = dp.prefixes(torch.tensor([0, 1]), 2)
    assert sorted(prefixes) == [0, 1, 2, 3, 4]
    assert prefixes[0][0].shape == (2, 3, 32) and prefixes[3][1].shape == (2, 2, 32)
    assert torch.equal(prefixes[3][0][1], dp.params.e[1, 1, 0])
    # A training step on task 1: expert 0 (trained before) gets no gradient, expert 1 does.
    batch = Batch(small_stream[1].train.x[:8], small_stream[1].train.y[:8], small_stream[1].train.t[:8], 8)
    batch.x = trainer.ctx.prepare(batch.x_raw)
    trainer.ctx.training = True
    dp.params.zero_grad(set_to_none=True)
    dp.forward(trainer.ctx, batch)
    (F.cross_entropy(batch.logits, batch.y) + sum(batch.losses.values())).backward()
    grad = dp.params.e.grad
    assert grad[0].abs().sum() == 0 and grad[1].abs().sum() > 0 and dp.params.keys.grad[0].abs().sum() == 0


def test_coda_components_of_a_new_task_are_orthogonal_to_the_old_and_old_ones_are_frozen(small_stream):
    coda = CODAPrompt(n_components=10, prompt_length=4, layers=(0, 1, 2))
    trainer = run(small_stream, coda, experiences=1)
    assert coda.per_task == 2 and coda.params.P.shape == (3, 10, 4, 32)
    trained = coda.params.K.detach()[:, :2].clone()
    ctx = trainer.ctx
    ctx.experience, ctx.training = small_stream[1], True
    coda.before_experience(ctx)  # task 1 starts: its components are initialised
    for name in ("P", "K", "A"):
        for layer in range(3):
            flat = getattr(coda.params, name).detach()[layer].flatten(1)
            new, old = flat[2:4], flat[0:2]
            assert old.norm(dim=1).min() > 0.1  # the old ones were trained, not zero
            assert torch.allclose(new @ old.T, torch.zeros(2, 2), atol=1e-5), name
            assert torch.allclose(new @ new.T, torch.eye(2), atol=1e-5), name
    assert torch.equal(coda.params.K.detach()[:, :2], trained)  # initialising the new ones left the old alone
    batch = Batch(small_stream[1].train.x[:8], small_stream[1].train.y[:8], small_stream[1].train.t[:8], 8)
    batch.x = ctx.prepare(batch.x_raw)
    coda.params.zero_grad(set_to_none=True)  # the last training step's gradients are still there
    coda.forward(ctx, batch)
    F.cross_entropy(batch.logits, batch.y).backward()
    for name in ("P", "K", "A"):
        g = getattr(coda.params, name).grad
        assert g[:, :2].abs().sum() == 0 and g[:, 2:4].abs().sum() > 0, name
        assert g[:, 4:].abs().sum() == 0, name  # future tasks' components are not used yet


def test_gram_schmidt_refuses_more_vectors_than_dimensions():
    q = gram_schmidt(torch.randn(3, 4), torch.zeros(0, 4))
    assert torch.allclose(q @ q.T, torch.eye(3), atol=1e-5)
    with pytest.raises(ValueError, match="orthogonal"):
        gram_schmidt(torch.randn(3, 4), torch.randn(2, 4))


class FrozenGroups(Strategy):
    """Sets the learning rate of the optimizer's parameter groups `groups` to zero."""

    def __init__(self, *groups):
        self.groups = groups

    def before_experience(self, ctx):
        for i in self.groups:
            ctx.optimizer.param_groups[i]["lr"] = 0.0


@pytest.mark.parametrize("make", [lambda: L2P(pool_size=4, prompt_length=2, top_k=2),
                                  lambda: DualPrompt(g_length=2, e_length=2),
                                  lambda: CODAPrompt(n_components=10, prompt_length=2)])
def test_prompts_learn_and_the_backbone_never_changes(small_stream, backbone_5_to_9, make):
    """On a backbone pre-trained on other classes, learnt prompts must lower the training
    loss of the first experience below the same run with the prompts frozen (a prompt that
    never reached the ViT, or never got gradient, would give the frozen run's loss exactly)."""
    vit0 = tiny_vit(small_stream.n_classes)
    vit0.load_state_dict(backbone_5_to_9, strict=False)

    def go(extra):
        trainer = vit_trainer_for(small_stream, [make(), *extra], weights=backbone_5_to_9, lr=0.02, epochs=3)
        trainer.fit(small_stream, stop_after=2)
        return trainer

    learnt, frozen = go([]), go([FrozenGroups(1)])  # group 1: the prompts
    for name, p in learnt.model.named_parameters():
        if not name.startswith("head."):
            assert torch.equal(p, dict(vit0.named_parameters())[name]), name
    ce_learnt, ce_frozen = learnt.record.loss_terms["ce"], frozen.record.loss_terms["ce"]
    assert ce_learnt[0] < ce_frozen[0], (ce_learnt, ce_frozen)


def test_the_loss_is_over_the_current_classes_and_evaluation_ranks_untrained_classes_last(small_stream):
    l2p = L2P(pool_size=4, prompt_length=2, top_k=2)
    trainer = run(small_stream, l2p, experiences=2)
    ctx = trainer.ctx
    x, y = small_stream[1].train.x[:3], small_stream[1].train.y[:3]
    batch = Batch(x, y, torch.zeros(3, dtype=torch.long), 3)
    batch.x = ctx.prepare(x)
    ctx.training = True
    l2p.forward(ctx, batch)
    assert torch.isfinite(batch.logits).all()  # other strategies read them (DER, LwF)
    by_hand = F.cross_entropy(batch.logits[:, [2, 3]], y - 2)  # experience 1: classes 2 and 3
    assert l2p.loss(ctx, batch).item() == pytest.approx(by_hand.item(), rel=1e-5)
    ctx.training = False  # evaluation: classes 4-9 are not trained yet and rank below 0-3
    logits = ctx.forward(ctx.prepare(x))
    assert (logits[:, 4:].max(1).values < logits[:, :4].min(1).values).all()
    raw = logits[:, 4:] + 1e4  # among themselves they keep the untrained head's order
    assert torch.allclose(raw.argsort(1), (batch.logits[:, 4:]).argsort(1))


@pytest.mark.parametrize("other", ["der", "lwf"])
def test_prompt_methods_compose_with_strategies_that_read_the_logits(small_stream, other):
    from strategies import DER, LwF

    partner = DER(memory_size=60, replay_batch_size=8) if other == "der" else LwF()
    trainer = vit_trainer_for(small_stream, [L2P(pool_size=4, prompt_length=2, top_k=2), partner])
    record = trainer.fit(small_stream, stop_after=3)  # a non-finite loss would raise
    assert np.isfinite(record.loss_terms["ce"]).all() and len(record.loss_terms) == 3
    assert not any(np.isinf(v).any() for v in record.loss_terms.values())  # (NaN: a term not used yet)


def test_an_earlier_tasks_prompt_and_components_stay_put_while_later_tasks_train(small_stream):
    """The optimizer's state is dropped at each experience: Adam's moments from an earlier
    task must not keep moving an E-prompt or a component that no longer gets gradient."""
    class Snapshot(Strategy):
        def __init__(self, target):
            self.target, self.seen = target, []

        def before_experience(self, ctx):
            self.seen.append(self.target().detach().clone())

    for strategy, first in ((DualPrompt(g_length=2, e_length=2), lambda s: s.params.e[0]),
                            (CODAPrompt(n_components=10, prompt_length=2), lambda s: s.params.K[:, :2])):
        snap = Snapshot(lambda: first(strategy))
        vit_trainer_for(small_stream, [strategy, snap], epochs=2).fit(small_stream, stop_after=3)
        end = first(strategy).detach()
        assert not torch.equal(snap.seen[0], snap.seen[1])  # trained during task 0
        assert torch.equal(snap.seen[1], end), type(strategy).__name__  # untouched by tasks 1 and 2


def test_a_non_vit_model_is_refused(small_stream):
    from cl.models import MLP

    model = MLP(small_stream.input_shape, small_stream.n_classes, hidden=(8,))
    trainer = trainer_for(small_stream, [L2P()], batch_size=32, model=model, lr=0.1, momentum=0)
    with pytest.raises(TypeError, match="VisionTransformer"):
        trainer.fit(small_stream, stop_after=1)


def test_a_resumed_coda_run_equals_an_uninterrupted_one(small_stream, tmp_path):
    """Interrupted inside the second experience, resumed into fresh objects: the components
    initialised at that experience's start and the prompt optimizer's state come back."""
    from cl.training.checkpoint import load_checkpoint
    from test_hooks import Interrupt

    def go(path, stop_at=None, resume=False):
        strategies = [CODAPrompt(n_components=10, prompt_length=2, layers=(0, 1)), Interrupt(stop_at)]
        trainer = trainer_for(small_stream, strategies, seed=1, batch_size=32,
                              model=tiny_vit(small_stream.n_classes),  # initialised at seed 0
                              optimizer=lambda params: torch.optim.Adam(params, lr=0.01),
                              checkpoint_path=str(path), checkpoint_every=3)
        if resume:
            trainer.load_state_dict(load_checkpoint(path)[0])
        return trainer.fit(small_stream, stop_after=3)

    full = go(tmp_path / "full.pt")
    with pytest.raises(KeyboardInterrupt):
        go(tmp_path / "run.pt", stop_at=4 + 3 + 1)  # 4 steps per experience: inside the second
    torch.manual_seed(123)
    resumed = go(tmp_path / "run.pt", resume=True)
    np.testing.assert_array_equal(resumed.matrices["acc"], full.matrices["acc"])
    assert resumed.loss_terms == full.loss_terms
