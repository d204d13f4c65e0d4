"""LR schedules as strategies, compute-equivalent replay, continual evaluation (min-ACC,
WC-ACC, stability gap) and loss-based metrics of a language model."""
import json
import math

import numpy as np
import pytest
import torch

from cl.training.checkpoint import load_checkpoint
from cl.cli.main import main
from cl.models import ByteGPT
from evaluation import continual, metrics
from strategies import ConstantLR, InfiniteLR, MixedReplay, Rewarm, Strategy, WarmupDecay, WarmupStableDecay
from streams import token_stream
from conftest import tiny_experiment, trainer_for, write_experiment


# ------------------------------------------------------------------ formulas
def test_warmup_then_cosine_or_linear_decay():
    cosine = WarmupDecay(max_lr=1.0, min_lr=0.1, warmup_steps=2)
    # N = 11: warmup at steps 0, 1; decay progress (s - 2) / (11 - 1 - 2).
    assert [cosine.lr_at(s, 11) for s in (0, 1, 2)] == pytest.approx([0.5, 1.0, 1.0])
    assert cosine.lr_at(6, 11) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi / 2) = 0
    assert cosine.lr_at(10, 11) == pytest.approx(0.1)  # the last step trains at min_lr
    linear = WarmupDecay(max_lr=1.0, min_lr=0.1, warmup_steps=2, shape="linear")
    assert linear.lr_at(4, 11) == pytest.approx(1.0 - 0.9 * 2 / 8)
    assert WarmupDecay(max_lr=2.0).min_lr == pytest.approx(0.2)  # max / 10 by default
    with pytest.raises(ValueError, match="shape"):
        WarmupDecay(shape="step")


def test_warmup_stable_decay():
    wsd = WarmupStableDecay(max_lr=1.0, min_lr=0.0, warmup_steps=0, decay_fraction=0.25)
    # N = 8: stable for steps 0..5, linear decay over the last 2 steps to 0 at step 7.
    assert [wsd.lr_at(s, 8) for s in range(8)] == pytest.approx([1, 1, 1, 1, 1, 1, 0.5, 0.0])


def test_infinite_schedule_phases_and_anneal():
    s = InfiniteLR(max_lr=1.0, const_lr=0.5, min_lr=0.1, warmup_steps=2, cooldown_steps=4, anneal_steps=4)
    assert [s.lr_at(t, 10**6) for t in (0, 1, 2)] == pytest.approx([0.5, 1.0, 1.0])
    assert s.lr_at(4, 10**6) == pytest.approx(0.5 + 0.5 * 0.5)  # cosine cooldown halfway
    assert [s.lr_at(t, 10**6) for t in (6, 100, 10**5)] == pytest.approx([0.5] * 3)  # constant, for ever
    assert [s.anneal_lr(a) for a in range(4)] == pytest.approx([0.5 * 0.2 ** ((a + 1) / 4) for a in range(4)])
    assert s.anneal_lr(3) == pytest.approx(0.1)
    inv = InfiniteLR(max_lr=1.0, const_lr=0.5, min_lr=0.1, warmup_steps=2, cooldown_steps=4, cooldown="inv_sqrt",
                     alpha=3.0)
    h = lambda x: 1 / math.sqrt(1 + 3 * x) - 1  # noqa: E731
    assert inv.lr_at(3, 10**6) == pytest.approx(1.0 + (0.5 - 1.0) * h(0.25) / h(1.0))
    assert inv.lr_at(6, 10**6) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="min_lr <= const_lr <= max_lr"):
        InfiniteLR(max_lr=1.0, const_lr=2.0)


# ------------------------------------------------------------ in a real run
def test_rewarming_restarts_at_every_experience(stream):
    record = trainer_for(stream, [Rewarm(max_lr=0.1, warmup_steps=2)], lr_log_every=1).fit(stream)
    lrs = {it: lr[0] for it, lr in record.lr_curve}
    start = 0
    for end in record.experience_ends:
        n = end - start
        assert lrs[start] == pytest.approx(0.05) and lrs[start + 1] == pytest.approx(0.1)  # warmup again
        assert lrs[end - 1] == pytest.approx(0.01)  # re-decayed to max / 10
        mid = start + 2 + (n - 3) // 2
        expected = 0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * (mid - start - 2) / (n - 3)))
        assert lrs[mid] == pytest.approx(expected)
        start = end


def test_a_run_long_schedule_spans_the_stream(stream):
    record = trainer_for(stream, [WarmupDecay(max_lr=0.1, min_lr=0.0, warmup_steps=0)], lr_log_every=1).fit(stream)
    lrs = [lr[0] for _, lr in record.lr_curve]
    assert len(lrs) == record.experience_ends[-1]
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # one decay, no restarts at boundaries


class SlowerHead(Strategy):
    """Gives the last layer its own parameter group, at a tenth of the LR."""

    def configure_optimizer(self, ctx, groups):
        head = list(ctx.model.parameters())[-2:]
        rest = [p for p in ctx.model.parameters() if all(p is not h for h in head)]
        return [{**groups[0], "params": rest}, {**groups[0], "params": head, "lr_scale": 0.1}]


def test_schedules_set_every_group_at_its_scale(stream):
    record = trainer_for(stream, [SlowerHead(), Rewarm(max_lr=0.1, warmup_steps=2)], lr_log_every=1).fit(stream)
    for _, (body, head) in record.lr_curve:
        assert head == pytest.approx(0.1 * body)
    assert record.lr_curve[1][1] == pytest.approx([0.1, 0.01])


def test_two_lr_owners_are_refused(stream):
    with pytest.raises(ValueError, match="more than one owner: Rewarm, ConstantLR"):
        trainer_for(stream, [Rewarm(), ConstantLR()])


class AnnealProbe(Strategy):
    """Records the LR of every annealing step it sees."""

    def __init__(self):
        self.anneal_lrs = []

    def before_iteration(self, ctx):
        if ctx.anneal_step is not None:
            self.anneal_lrs.append(ctx.lrs[0])


def _infinite_run(stream, anneal_steps, probe=None, **kw):
    strategies = [InfiniteLR(max_lr=0.1, const_lr=0.05, min_lr=0.005, warmup_steps=3, cooldown_steps=20,
                             anneal_steps=anneal_steps), MixedReplay(fraction=0.25, memory_size=120)]
    trainer = trainer_for(stream, strategies + ([probe] if probe else []), lr_log_every=1, **kw)
    return trainer, trainer.fit(stream)


def test_the_anneal_is_taken_on_a_copy(stream):
    """The infinite schedule's anneal gives the evaluated model; training goes on from the
    constant phase exactly as if no anneal had happened (weights, LR curve, RNG draws)."""
    probe = AnnealProbe()
    plain_trainer, plain = _infinite_run(stream, anneal_steps=0)
    annealed_trainer, annealed = _infinite_run(stream, anneal_steps=6, probe=probe)
    assert annealed.lr_curve == plain.lr_curve
    assert annealed.loss_terms == plain.loss_terms
    for (k, a), b in zip(annealed_trainer.model.state_dict().items(), plain_trainer.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert annealed.anneal_steps == 6 * len(stream) and plain.anneal_steps == 0
    schedule = annealed_trainer.lr_owner
    assert probe.anneal_lrs == pytest.approx([schedule.anneal_lr(a) for a in range(6)] * len(stream))
    # What was evaluated after each experience is the annealed copy, not the trained model.
    assert not np.array_equal(annealed.matrices["acc"][1:], plain.matrices["acc"][1:])
    np.testing.assert_array_equal(annealed.matrices["acc"][0], plain.matrices["acc"][0])


def test_infinite_schedule_resumed_mid_experience_equals_an_uninterrupted_run(stream, tmp_path):
    class Interrupt(Strategy):
        def __init__(self, at):
            self.at = at

        def before_iteration(self, ctx):
            if ctx.iteration == self.at and ctx.anneal_step is None:
                raise KeyboardInterrupt

    def run(path, stop_at=None, resume=False):
        strategies = [InfiniteLR(max_lr=0.1, warmup_steps=3, cooldown_steps=40, anneal_steps=5),
                      MixedReplay(fraction=0.2, memory_size=100), Interrupt(stop_at)]
        trainer = trainer_for(stream, strategies, seed=3, batch_size=16, hidden=(32,), lr=0.1, momentum=0,
                              lr_log_every=1, checkpoint_path=str(path), checkpoint_every=5)
        if resume:
            trainer.load_state_dict(load_checkpoint(path)[0])
        return trainer.fit(stream)

    full = run(tmp_path / "full.pt")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run.pt", stop_at=full.experience_ends[1] + 13)
    resumed = run(tmp_path / "run.pt", resume=True)
    assert resumed.lr_curve == full.lr_curve
    assert resumed.anneal_steps == full.anneal_steps == 5 * len(stream)
    for key in full.matrices:
        np.testing.assert_array_equal(resumed.matrices[key], full.matrices[key])


# ------------------------------------------------------- compute-equivalent replay
class MixProbe(Strategy):
    """Placed before and after MixedReplay: the batch sizes it sees and the replayed rows."""

    def __init__(self, replay=None):
        self.replay, self.sizes, self.replayed, self.replayed_labels = replay, [], [], []

    def adapt_batch(self, ctx, batch):
        self.sizes.append((ctx.experience.index, len(batch.y)))
        if self.replay is not None:
            rows = batch.parts.get(self.replay)
            self.replayed.append(0 if rows is None else rows.stop - rows.start)
            if rows is not None:
                self.replayed_labels.append((ctx.experience.index, set(batch.y[rows].tolist())))


@pytest.mark.parametrize("fraction", [0.25, 0.1])
def test_replay_fraction_within_batches(stream, fraction):
    replay = MixedReplay(fraction=fraction, memory_size=200)
    before, after = MixProbe(), MixProbe(replay)
    trainer_for(stream, [before, replay, after], batch_size=16).fit(stream)
    # Compute-equivalent: replayed rows replace incoming ones, every batch keeps its size.
    assert after.sizes == before.sizes
    counts = np.array([k for (exp, n), k in zip(after.sizes, after.replayed) if exp > 0 and n == 16])
    expected = fraction * 16  # 4 rows, or 1.6: one or two
    assert set(counts.tolist()) <= {math.floor(expected), math.ceil(expected)}
    assert abs(counts.mean() - expected) < 0.1 * expected  # the share, in expectation
    assert not any(k for (exp, _), k in zip(after.sizes, after.replayed) if exp == 0)  # nothing to replay yet
    for exp, labels in after.replayed_labels:  # only earlier experiences' classes come back
        assert max(labels) < 2 * exp


def test_mixed_replay_memory_holds_equal_shares(stream):
    replay = MixedReplay(fraction=0.1, memory_size=90)
    trainer_for(stream, [replay]).fit(stream, stop_after=3)
    assert [len(share["y"]) for share in replay.memory] == [30, 30, 30]
    assert [set(share["y"].tolist()) for share in replay.memory] == [{0, 1}, {2, 3}, {4, 5}]
    with pytest.raises(ValueError, match="fraction"):
        MixedReplay(fraction=1.0)


# ------------------------------------------------------------ continual evaluation
# A hand-written curve over 3 experiences ending at iterations 10, 20, 30.
ITERATIONS = [5, 10, 15, 20, 25, 30]
CURVE = np.array([[0.5, np.nan, np.nan],
                  [0.9, 0.1, np.nan],
                  [0.6, 0.5, 0.1],
                  [0.8, 0.9, 0.1],
                  [0.7, 0.6, 0.5],
                  [0.75, 0.7, 0.9]])
ENDS = [10, 20, 30]


def test_min_acc_and_wc_acc_on_a_hand_written_curve():
    # Task 0 after iteration 10: min(0.6, 0.8, 0.7, 0.75) = 0.6; task 1 after 20: min(0.6, 0.7) = 0.6.
    assert continual.min_acc(ITERATIONS, CURVE, ENDS) == pytest.approx(0.6)
    # WC-ACC = 1/3 * 0.9 + 2/3 * 0.6
    assert continual.wc_acc(ITERATIONS, CURVE, ENDS) == pytest.approx(0.7)
    assert continual.wc_acc(ITERATIONS[:2], CURVE[:2], ENDS[:1]) == pytest.approx(0.9)  # one task: its accuracy
    # A loss curve (lower is better) mirrors it: the worst is the highest.
    assert continual.min_acc(ITERATIONS, 1 - CURVE, ENDS, higher_is_better=False) == pytest.approx(0.4)


def test_stability_gap_on_a_hand_written_curve():
    gaps = continual.stability_gaps(ITERATIONS, CURVE, ENDS, recovered_within=0.5)
    # Boundary 1: task 0 falls from 0.9 to 0.6 at iteration 15, back to 0.8 (within half the gap) at 20.
    assert gaps[0] == {"boundary": 1, "iteration": 10, "before": pytest.approx(0.9), "gap": pytest.approx(0.3),
                       "worst_iteration": 15, "recovery": 10}
    # Boundary 2: tasks 0-1 fall from 0.85 to 0.65 at 25; 0.725 at 30 is not within 0.1: no recovery.
    assert gaps[1]["gap"] == pytest.approx(0.2) and gaps[1]["worst_iteration"] == 25 and gaps[1]["recovery"] is None
    as_loss = continual.stability_gaps(ITERATIONS, 1 - CURVE, ENDS, higher_is_better=False, recovered_within=0.5)
    assert [g["gap"] for g in as_loss] == pytest.approx([0.3, 0.2])  # a rise in loss
    summary = continual.continual_summary(ITERATIONS, CURVE, ENDS)
    assert summary["stability_gap"] == pytest.approx(0.25) and summary["min_acc"] == pytest.approx(0.6)


def test_periodic_evaluation_covers_the_seen_tasks_and_the_next(stream):
    record = trainer_for(stream, [], eval_every=20).fit(stream)
    for point in record.curve:
        k = point["experience"]
        evaluated = [j for j, v in enumerate(point["acc"]) if not math.isnan(v)]
        assert evaluated == list(range(min(k + 2, len(stream))))
    every = trainer_for(stream, [], eval_every=20, curve_tasks="all").fit(stream)
    assert not np.isnan(np.array([p["acc"] for p in every.curve])).any()


def test_a_run_with_a_curve_reports_continual_metrics(tmp_path, capsys):
    path = tiny_experiment(tmp_path, name="curve", hidden=(32,), batch_size=16, eval_every=10)
    assert main(["run", str(path), "--no-track", "--no-progress", "--json"]) == 0
    run = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # a one-run file: the run itself
    assert 0 <= run["min_acc"] <= run["wc_acc"] <= 1 and run["stability_gap"] > 0


# ------------------------------------------------------------ language models
def test_loss_forgetting_and_transfer_on_a_byte_gpt_loss_matrix(two_texts):
    s = token_stream(["abc", "xyz"], block_size=16, data_dir=str(two_texts))
    record = trainer_for(s, [], batch_size=16, epochs=3,
                         model=lambda s: ByteGPT(s.input_shape, s.n_classes, n_layer=1, d_model=32),
                         optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3)).fit(s)
    L = record.matrices["loss"]
    assert record.higher_is_better["loss"] is False
    # Hand-worked from the matrix: forgetting is the rise of task 0's loss after task 1,
    # BWT its opposite, FWT the fall of task 1's loss before training on it.
    assert metrics.forgetting(L, higher_is_better=False) == pytest.approx(L[2, 0] - L[1, 0])
    assert metrics.backward_transfer(L, higher_is_better=False) == pytest.approx(L[1, 0] - L[2, 0])
    assert metrics.forward_transfer(L, higher_is_better=False) == pytest.approx(L[0, 1] - L[1, 1])
    assert L[2, 0] > L[1, 0]  # learning xyz did make abc worse: the test is not vacuous


# ------------------------------------------------------------------ cl schedules
def test_cl_schedules_prints_the_curve_the_run_follows(tmp_path, capsys):
    path = tiny_experiment(tmp_path, name="sched", epochs=2, batch_size=32, lr_log_every=1, strategies=None, runs={
        "rewarm": [{"name": "rewarm", "max_lr": 0.1, "warmup_steps": 3}],
        "infinite": [{"name": "infinite_lr", "max_lr": 0.1, "warmup_steps": 2, "cooldown_steps": 30,
                      "anneal_steps": 4}]})
    assert main(["schedules", str(path), "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)
    assert main(["run", str(path), "--no-track", "--no-progress", "--json"]) == 0
    runs = {r["name"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"]}
    for label, plan in plans.items():
        assert plan["curve"] == runs[label]["lr_curve"]  # the preview is what the run did
    assert [a["after_experience"] for a in plans["infinite"]["anneals"]] == [0, 1, 2, 3, 4]
    png = tmp_path / "lr.png"
    assert main(["schedules", str(path), "--plot", str(png), "--only", "rewarm"]) == 0
    out = capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "rewarm: " in out and "infinite" not in out


def test_token_stream_caps_each_domains_text(two_texts):
    s = token_stream(["abc", "xyz"], block_size=16, max_train_bytes=800, max_val_bytes=64, data_dir=str(two_texts))
    # 3200 bytes per domain: training 800 of its first 2880, validation its next 64 (4 sequences of 16 + 1).
    assert [len(e.train) for e in s] == [(800 - 17) // 16 + 1] * 2
    assert [len(d) for d in s.test_sets] == [(64 - 17) // 16 + 1] * 2


def test_a_language_model_run_reports_loss_and_tokens_per_second(two_texts, tmp_path, capsys):
    path = write_experiment(tmp_path, f"""
        name: lm
        seed: 0
        device: cpu
        data_dir: {two_texts}
        stream: {{scenario: {{name: token_stream, domains: [abc, xyz], block_size: 16, max_train_bytes: 640}}}}
        model: {{name: byte_gpt, n_layer: 1, d_model: 32}}
        training: {{epochs: 1, batch_size: 8, optimizer: {{name: adamw, lr: 0.003}}}}
        strategies: [{{name: rewarm, max_lr: 0.003}}, {{name: mixed_replay, fraction: 0.25, memory_size: 16}}]
    """)
    assert main(["run", str(path), "--no-track", "--no-progress", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    run = json.loads(out[-1])
    assert run["tokens_trained"] == run["rows_trained"] * 16 > 0 and run["tokens_per_s"] > 0
    assert run["rows_trained"] < 2 * 40  # replayed rows took the place of some new ones
    # What mixed_replay actually mixed: every row a batch held was new (domain 0 in experience 1,
    # domain 1 in experience 2) or replayed from domain 0's share, the only one in memory.
    new, replayed = run["new_tokens_task0"] + run["new_tokens_task1"], run["replayed_tokens_task0"]
    assert new + replayed == run["tokens_trained"] and "replayed_tokens_task1" not in run
    # The trainer's own count per domain: the tokens of each experience's batches, new and replayed.
    assert run["tokens_trained_task0"] == run["new_tokens_task0"]
    assert run["tokens_trained_task1"] == run["new_tokens_task1"] + replayed
    assert run["new_tokens_task0"] == 39 * 16  # (640 - 17) // 16 + 1 sequences, none replayed in experience 1
    # Among the rows of experience 2, the first one with something in memory to replay.
    assert run["replay_fraction"] == pytest.approx(replayed / run["tokens_trained_task1"])
    assert 0.4 * 0.25 * 39 * 16 < replayed < 1.6 * 0.25 * 39 * 16  # about a quarter of experience 2's rows
    # Byte-level: a token is a byte, so the loss per byte is the loss per token.
    assert run["loss_per_byte"] == pytest.approx(run["loss"]) and run["bits_per_byte"] == pytest.approx(
        run["loss"] / math.log(2))
    header = next(line for line in out if line.startswith("run "))
    assert header.split()[-5:] == ["loss", "BWT", "FWT", "Forget", "train_s"]  # the table reads the loss
