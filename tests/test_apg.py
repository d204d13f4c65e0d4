"""APG on a tiny timm ViT: the generator, the frozen pool, where the prompt enters, the statistics library."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_vit as _tiny_vit, trainer_for, vit_trainer_for
from strategies import Strategy
from strategies.context import Batch
from strategies.prompting.apg import APG, PromptGenerator
from strategies.prompting.vit import tokens_from, tokens_through

timm = pytest.importorskip("timm")

M = 1  # the query block in these tests (of 4)


def tiny_vit(n_classes=10, depth=4, seed=0):
    return _tiny_vit(n_classes, depth, seed)


def make(**kw):
    return APG(**{"query_block": M, "prompt_length": 2, "heads": 4, "samples_per_step": 32, "finetune_epochs": 2,
                  "finetune_epochs_per_task": 1, "finetune_samples_per_class": 40, "finetune_batch_size": 64, **kw})


def run(stream, strategy, experiences=2, extra=(), opt=None, epochs=1, seed=0):
    trainer = vit_trainer_for(stream, [strategy, *extra], seed, depth=4, optimizer=opt, epochs=epochs)
    trainer.fit(stream, stop_after=experiences)
    return trainer


@pytest.fixture(scope="module")
def two_experiences(small_stream):
    """APG trained on two experiences (classes 0-3), with the backbone as it started."""
    apg = make()
    trainer = run(small_stream, apg, epochs=3)
    return trainer, apg, tiny_vit(small_stream.n_classes)


def test_the_prompt_follows_the_pool_tokens_and_the_query():
    torch.manual_seed(0)
    gen = PromptGenerator(32, length=2, heads=4, hidden=32, dropout=0.0, residual=True).eval()
    q, pool = torch.randn(3, 32), torch.randn(5, 32)
    p, logits = gen(q, pool)
    assert p.shape == (3, 2, 32) and logits.shape == (3, 4, 2, 5)  # logits over the pool only
    other = pool.clone()
    other[2] += 1.0  # one knowledge token changes: every sample's prompt changes
    p2, _ = gen(q, other)
    assert (p2 - p).abs().amax(dim=(1, 2)).min() > 1e-6
    q2 = q.clone()
    q2[0] += 1.0  # one query changes: only its own prompt changes
    p3, _ = gen(q2, pool)
    assert (p3[0] - p[0]).abs().max() > 1e-6 and torch.equal(p3[1:], p[1:])


def test_old_pool_tokens_get_no_gradient_and_stay_bitwise_put(small_stream):
    class Snapshot(Strategy):
        def __init__(self):
            self.seen = []

        def before_experience(self, ctx):
            self.seen.append(torch.stack([t.detach().clone() for t in apg.params.tokens]))

    apg, snap = make(), Snapshot()
    adam_wd = lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.05)  # weight decay would move any token it holds
    trainer = run(small_stream, apg, experiences=3, extra=[snap], opt=adam_wd, epochs=2)
    end = torch.stack([t.detach() for t in apg.params.tokens])
    assert not torch.equal(snap.seen[0][:2], snap.seen[1][:2])  # classes 0-1 learnt in experience 0
    assert torch.equal(snap.seen[1][:2], end[:2])  # and stayed bitwise put through experiences 1 and 2
    assert torch.equal(snap.seen[2][2:4], end[2:4])  # classes 2-3 likewise through experience 2
    assert not torch.equal(snap.seen[2][4:6], end[4:6])
    assert torch.equal(end[6:], torch.zeros_like(end[6:]))  # classes not met yet: no token
    # A training step of experience 2: only the tokens of its classes (4, 5) get gradient.
    ctx = trainer.ctx
    x, y = small_stream[2].train.x[:8], small_stream[2].train.y[:8]
    batch = Batch(x, y, torch.zeros(8, dtype=torch.long), 8)
    batch.x, ctx.training = ctx.prepare(x), True
    apg.params.zero_grad(set_to_none=True)
    apg.forward(ctx, batch)
    assert {"apg_attn", "apg_prompt", "apg_replay"} <= set(batch.losses)
    (apg.loss(ctx, batch) + sum(batch.losses.values())).backward()
    grads = [t.grad for t in apg.params.tokens]
    assert all(g is None or not g.any() for g in grads[:4] + grads[6:])
    assert grads[4].abs().sum() > 0 and grads[5].abs().sum() > 0
    # The classification loss alone reaches the generator's every stage (the prompt is used).
    apg.params.zero_grad(set_to_none=True)
    apg.forward(ctx, batch)
    apg.loss(ctx, batch).backward()
    gen = apg.params.generator
    for p in (gen.mlp_in.fc1.weight, gen.q.weight, gen.k.weight, gen.v.weight, gen.mlp_out.fc2.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert apg.params.tokens[4].grad.abs().sum() > 0


def test_the_prompt_enters_only_the_blocks_after_the_query_block(two_experiences, small_stream):
    trainer, apg, _ = two_experiences
    vit, ctx = trainer.model, trainer.ctx
    x = ctx.prepare(small_stream[1].test.x[:4])
    seen = {}
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, (i[0].detach(), o.detach())))
             for k, b in enumerate(vit.blocks)]
    try:
        ctx.training = False
        ctx.forward(x)
        prompted = dict(seen)
        seen.clear()
        vit.eval()
        vit.forward_features(x)
        plain = dict(seen)
    finally:
        for h in hooks:
            h.remove()
    n_patches = 4
    for k in range(M + 1):  # blocks up to the query block: the plain ViT, unprompted
        assert prompted[k][0].shape[1] == 1 + n_patches
        assert torch.equal(prompted[k][1], plain[k][1]), k
    with torch.no_grad():
        prompt, _ = apg.generate(plain[M][1][:, 0])
    for k in range(M + 1, len(vit.blocks)):  # later blocks: class token, the prompt, then the patches
        inp = prompted[k][0]
        assert inp.shape[1] == 1 + 2 + n_patches
    first = prompted[M + 1][0]
    assert torch.equal(first[:, 1:3], prompt) and torch.equal(first[:, :1], plain[M][1][:, :1])
    assert torch.equal(first[:, 3:], plain[M][1][:, 1:])
    # Continuing from block m without a prompt is the plain ViT.
    with torch.no_grad():
        assert torch.allclose(tokens_from(vit, tokens_through(vit, x, M), M), vit.forward_features(x), atol=1e-6)


def test_the_library_holds_each_classs_statistics_and_mean_prompt(two_experiences, small_stream):
    trainer, apg, vit0 = two_experiences
    s, ctx = apg.stats, trainer.ctx
    assert s["has"].tolist() == [True] * 4 + [False] * 6
    assert s["mid_cov"].shape == (10, 32, 32) and s["prompt_mean"].shape == (10, 2, 32)
    data = small_stream[1].train
    x = ctx.prepare(data.x)
    with torch.no_grad():
        vit0.eval()
        h = vit0.pos_drop(vit0._pos_embed(vit0.patch_embed(x)))  # the plain ViT by hand, to block m
        for b in vit0.blocks[:M + 1]:
            h = b(h)
        q = h[:, 0]
        apg.params.eval()
        prompt, _ = apg.generate(q)
    f = ctx.embed(data.x)  # the prompted run's pre-logit features
    for c in (2, 3):
        rows = data.y == c
        assert torch.allclose(s["mid_mean"][c], q[rows].mean(0), atol=1e-5)
        assert torch.allclose(s["mid_cov"][c], torch.cov(q[rows].T.double()).float(), atol=1e-5)
        assert torch.allclose(s["feat_mean"][c], f[rows].mean(0), atol=1e-5)
        assert torch.allclose(s["feat_cov"][c], torch.cov(f[rows].T.double()).float(), atol=1e-5)
        assert torch.allclose(s["prompt_mean"][c], prompt[rows].mean(0), atol=1e-5)
    assert s["feat_cov"][0].abs().sum() > 0 and s["mid_cov"][9].abs().sum() == 0


def test_sampled_features_match_the_stored_statistics(two_experiences):
    _, apg, _ = two_experiences
    saved = {k: v.clone() for k, v in apg.stats.items()}
    state = apg.rng.get_state()
    try:
        g = torch.Generator().manual_seed(1)
        a = torch.randn(32, 32, generator=g)
        cov = a @ a.T / 32 + 0.1 * torch.eye(32)
        mean = torch.randn(32, generator=g) * 3
        apg.stats["mid_mean"][1], apg.stats["mid_cov"][1] = mean, cov
        apg._factors = None
        n = 40000
        draws = apg.sample("mid", torch.tensor([1] * n + [3] * 10))
        x = draws[:n].double()
        assert torch.allclose(x.mean(0), mean.double(), atol=0.05)
        assert torch.allclose(torch.cov(x.T), cov.double(), atol=0.05)
        other = apg.sample("feat", torch.full((n,), 2))  # the final features of another class
        scale = apg.stats["feat_cov"][2].diag().max() ** 0.5
        assert torch.allclose(other.mean(0), apg.stats["feat_mean"][2], atol=0.05 * scale + 1e-3)
        assert torch.allclose(torch.cov(other.double().T).float(), apg.stats["feat_cov"][2],
                              atol=0.05 * apg.stats["feat_cov"][2].abs().max().item() + 1e-4)
    finally:
        apg.stats, apg._factors = saved, None
        apg.rng.set_state(state)


def test_an_end_to_end_run_learns_with_every_term_and_leaves_the_backbone_alone(two_experiences):
    trainer, apg, vit0 = two_experiences
    for (name, p0), p1 in zip(vit0.named_parameters(), trainer.model.parameters()):
        assert torch.equal(p0, p1) != name.startswith("head."), name
    terms = trainer.record.loss_terms
    assert {"apg_attn", "apg_norm", "apg_prompt", "apg_replay"} <= set(terms)
    assert np.isnan(terms["apg_prompt"][0]) and np.isnan(terms["apg_replay"][0])  # no library in experience 0
    assert np.isfinite(terms["apg_prompt"][1]) and np.isfinite(terms["apg_replay"][1]) and terms["apg_replay"][1] > 0
    acc = trainer.record.matrices["acc"]
    assert np.isfinite(acc[:3]).all() and acc[1, 0] > 0.6
    assert acc[2, 0] > 0.6 and acc[2, 1] > 0.6  # class-incremental: both tasks among 4 classes


def test_after_each_experience_but_the_first_the_library_tunes_generator_and_classifier(small_stream, monkeypatch):
    calls = []
    real = APG.finetune

    def spy(self, ctx, epochs):
        head = ctx.model.get_classifier()
        labels = self.stats["has"].nonzero().squeeze(1).repeat_interleave(100)
        g = self.rng.get_state()
        q, f = self.sample("mid", labels), self.sample("feat", labels)
        self.rng.set_state(g)

        def losses():
            with torch.no_grad():
                self.params.eval()
                ce = F.cross_entropy(head(f).masked_fill(~self._trained, float("-inf")), labels)
                l1 = F.l1_loss(self.generate(q)[0], self.stats["prompt_mean"][labels])
            return ce.item(), l1.item()

        before = losses()
        real(self, ctx, epochs)
        calls.append((ctx.experience.index, epochs, before, losses()))

    monkeypatch.setattr(APG, "finetune", spy)
    run(small_stream, make(finetune_epochs=6, finetune_epochs_per_task=2, prompt_weight=10.0), experiences=3)
    assert [(i, e) for i, e, _, _ in calls] == [(1, 8), (2, 10)]  # 6 + 2 t epochs, none after experience 0
    for _, _, (ce0, l10), (ce1, l11) in calls:  # both terms fall on the library's own samples
        assert ce1 < ce0 and l11 < l10, calls


def test_before_any_experience_the_plain_vit_is_evaluated(small_stream):
    apg = make()
    trainer = vit_trainer_for(small_stream, [apg], depth=4)
    vit = trainer.model.eval()
    trainer.fit(small_stream, stop_after=0)
    x = torch.randn(3, 1, 8, 8)
    trainer.ctx.training = False
    with torch.no_grad():
        assert not apg.started and torch.equal(trainer.ctx.forward(x), vit(x))


def test_a_bad_query_block_is_refused_and_the_default_keeps_the_papers_relative_depth(small_stream):
    with pytest.raises(ValueError, match="query_block"):
        run(small_stream, make(query_block=4), experiences=1)
    with pytest.raises(ValueError, match="block after it"):  # the last block: no block left to prompt
        run(small_stream, make(query_block=3), experiences=1)
    # Block 5 of 12 in the reference's ViT-B; block 2 of a 6-block ViT, block 1 of these 4-block ones.
    assert [APG().block_of(depth) for depth in (12, 6, 4)] == [5, 2, 1]
    avg = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, in_chans=1, embed_dim=32, depth=4,
                            num_heads=2, num_classes=10, global_pool="avg", class_token=False)
    with pytest.raises(ValueError, match="class token"):
        trainer_for(small_stream, [make()], batch_size=32, model=avg,
                    optimizer=lambda params: torch.optim.Adam(params)).fit(small_stream, stop_after=1)
    trained = make()
    run(small_stream, trained, experiences=1)
    other = make(query_block=2)
    run(small_stream, other, experiences=1)
    with pytest.raises(ValueError, match="same query_block"):
        other.load_state_dict(trained.state_dict())
    assert run(small_stream, APG(samples_per_step=8, finetune_epochs=0, finetune_epochs_per_task=0),
               experiences=1).strategies[0].query_index == 1


def test_a_resumed_apg_run_equals_an_uninterrupted_one(small_stream, tmp_path):
    """Interrupted inside the third experience (library filled, tokens frozen), resumed into fresh objects."""
    from cl.training.checkpoint import load_checkpoint
    from test_hooks import Interrupt

    def go(path, stop_at=None, resume=False):
        trainer = trainer_for(small_stream, [make(), Interrupt(stop_at)], seed=1, batch_size=32,
                              model=tiny_vit(small_stream.n_classes),  # initialised at seed 0
                              optimizer=lambda params: torch.optim.Adam(params, lr=0.01),
                              checkpoint_path=str(path), checkpoint_every=3)
        if resume:
            trainer.load_state_dict(load_checkpoint(path)[0])
        return trainer.fit(small_stream, stop_after=3)

    full = go(tmp_path / "full.pt")
    with pytest.raises(KeyboardInterrupt):
        go(tmp_path / "run.pt", stop_at=4 + 4 + 2)  # 4 steps per experience: inside the third
    torch.manual_seed(123)
    resumed = go(tmp_path / "run.pt", resume=True)
    np.testing.assert_array_equal(resumed.matrices["acc"], full.matrices["acc"])
    assert resumed.loss_terms.keys() == full.loss_terms.keys()
    for name, values in full.loss_terms.items():  # (NaN: a term not used in that experience)
        np.testing.assert_array_equal(resumed.loss_terms[name], values, err_msg=name)
