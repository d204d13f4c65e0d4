"""Evaluation: one pass over every test set, pluggable evaluators, and which metrics each stream supports."""
import math

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from cl.models import ByteGPT
from conftest import trainer_for
from strategies import Naive
from streams import blur, class_incremental, digits, online, permuted, power_law, token_stream

HOST_SYNCS = {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"}


class CountHostSyncs(TorchFunctionMode):
    """Counts the tensor calls that copy a value to the host (and wait for the device)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_SYNCS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def naive_trainer(stream, **kw):
    """Fine-tuning an MLP (32 hidden units) by plain SGD."""
    return trainer_for(stream, [Naive()], batch_size=32, hidden=(32,), momentum=0, **kw)


def test_one_pass_over_all_test_sets_with_one_host_sync():
    stream = permuted(digits(), n_experiences=6)
    trainer = naive_trainer(stream, eval_batch_size=200)
    trainer.fit(stream, stop_after=1)
    calls = []
    trainer.model.register_forward_hook(lambda *a: calls.append(1))
    with CountHostSyncs() as syncs:
        values = trainer.evaluate(stream)
    total = sum(len(d) for d in stream.test_sets)
    assert len(calls) == math.ceil(total / 200)  # not one partial batch per test set
    assert syncs.count == 1
    # Per-task results by segment equal evaluating each test set on its own.
    for j, test in enumerate(stream.test_sets):
        x = stream.transform(test.x)
        with torch.no_grad():
            acc = (trainer.model.eval()(x).argmax(1) == test.y).float().mean().item()
        assert values["acc"][j] == pytest.approx(acc, abs=1e-6)
    assert trainer.record.eval_time_s > 0


def test_task_aware_score_only_where_it_means_something():
    from evaluation.evaluators import default_evaluators

    split = class_incremental(digits(), n_experiences=5)
    assert [e.key for e in default_evaluators(split.task_classes, split.n_classes, split.is_sequence)] == \
        ["acc", "task_aware_acc"]
    perm = permuted(digits(), n_experiences=3)  # every task has every class: it would equal accuracy
    assert [e.key for e in default_evaluators(perm.task_classes, perm.n_classes, perm.is_sequence)] == ["acc"]


def test_task_aware_accuracy_by_hand():
    from evaluation.evaluators import Accuracy, TaskAwareAccuracy

    ev = TaskAwareAccuracy([[0, 1], [2, 3]], 4)
    scores = torch.tensor([[0.0, 1.0, 5.0, 0.0], [9.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 2.0]])
    y = torch.tensor([1, 3, 2])
    task = torch.tensor([0, 1, 1])
    # Row 0: among {0, 1} class 1 wins (right); row 1: among {2, 3} class 3 (right); row 2: 3 (wrong).
    assert ev.per_sample(scores, y, task).tolist() == [1.0, 1.0, 0.0]
    assert Accuracy().per_sample(scores, y, task).tolist() == [0.0, 0.0, 0.0]


def test_cross_entropy_per_token_by_hand():
    from evaluation.evaluators import CrossEntropy

    scores = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75]]]))  # one sequence of two positions
    y = torch.tensor([[0, 1]])
    value = CrossEntropy().per_sample(scores, y, torch.tensor([0]))
    assert value.item() == pytest.approx((math.log(2) + math.log(4 / 3)) / 2)
    assert not CrossEntropy.higher_is_better


def test_token_stream_is_judged_by_loss_and_next_byte_accuracy(two_texts):
    from evaluation.summaries import summarise

    stream = token_stream(["abc", "xyz"], block_size=16, stride=4, data_dir=str(two_texts))
    torch.manual_seed(0)
    model = ByteGPT(stream.input_shape, stream.n_classes, n_layer=1, d_model=32)
    trainer = trainer_for(stream, [Naive()], batch_size=16, model=model,
                          optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3))
    record = trainer.fit(stream)
    assert list(record.matrices) == ["loss", "acc", "loss_per_byte"] and record.task_aware_matrix is None
    L = record.matrices["loss"]
    assert np.array_equal(record.matrices["loss_per_byte"], L)  # a byte-level token is one byte
    assert L[0, 0] == pytest.approx(math.log(256), rel=0.1)  # untrained: about uniform over bytes
    assert L[1, 0] < 0.5 and L[2, 1] < 0.5  # each text learned in turn
    assert L[2, 0] > L[1, 0]  # and the first one forgotten: its loss rose
    summary = summarise(record, stream)
    assert summary["loss"] == pytest.approx(L[-1].mean())
    assert summary["bits_per_byte"] == pytest.approx(L[-1].mean() / math.log(2))
    assert summary["perplexity_task1"] == pytest.approx(math.exp(L[-1, 1]))  # each domain's own
    assert summary["loss_forgetting"] == pytest.approx(L[2, 0] - L[1, 0])  # a rise in loss is forgetting
    assert summary["loss_bwt"] == pytest.approx(-(L[2, 0] - L[1, 0]))
    assert summary["perplexity"] == pytest.approx(math.exp(L[-1].mean()))


def test_seen_tasks_follow_the_task_index_not_shared_classes():
    stream = permuted(digits(), n_experiences=4)
    assert [stream.seen_tasks(i) for i in range(4)] == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]
    logged = []

    class Capture:
        def log_metrics(self, metrics, step, kind="evaluation"):
            if kind == "evaluation" and step == 1:
                logged.append(metrics)

    naive_trainer(stream, sinks=[Capture()]).fit(stream, stop_after=1)
    assert logged[0]["acc_seen"] == pytest.approx(logged[0]["acc_task0"])  # not the mean over unseen tasks


def test_which_metrics_apply_follows_the_stream():
    from evaluation.summaries import summarise

    base = class_incremental(digits(), n_experiences=5)
    runs = {
        "classic": base,
        "online": online(base, experience_size=100),
        "blurry": blur(base, 0.2),
        "power_law": power_law(digits(), n_tasks=5, n_phases=10, phase_size=64, recurrence_size=16),
        "task_labelled": class_incremental(digits(), n_experiences=5, task_labels=True),
        "permuted": permuted(digits(), n_experiences=3),
    }
    found = {}
    for name, stream in runs.items():
        record = naive_trainer(stream).fit(stream)
        summary = summarise(record, stream)
        found[name] = {k for k in ("bwt", "fwt", "forgetting") if summary[k] is not None}
        assert summary["acc"] == pytest.approx(record.accuracy_matrix[-1].mean())
    # Class-incremental without task labels: a task's classes are never predicted before their
    # turn, so FWT would be minus the random model's score for every strategy; left out.
    assert found == {"classic": {"bwt", "forgetting"}, "online": {"bwt", "forgetting"},
                     "blurry": {"bwt", "forgetting"}, "power_law": set(),
                     "task_labelled": {"bwt", "fwt", "forgetting"}, "permuted": {"bwt", "fwt", "forgetting"}}


def test_the_loss_per_byte_divides_each_task_s_loss_by_its_bytes_per_token():
    from evaluation.evaluators import LossPerByte

    # Hand-worked: task 0's tokens stand for 4 bytes, task 1's for 2.5 (a BPE on two domains).
    per_byte = LossPerByte([4.0, 2.5])
    assert per_byte.derived_from == "loss" and not per_byte.higher_is_better
    assert per_byte.derive(np.array([2.0, 5.0])).tolist() == [0.5, 2.0]


def test_a_cut_stream_keeps_one_bytes_per_token_a_task(two_texts):
    from streams.holdout import first_experiences

    stream = token_stream(["abc", "xyz"], block_size=16, data_dir=str(two_texts))
    assert first_experiences(stream, 1).schedule["bytes_per_token"] == [1.0]
    from evaluation.evaluators import LossPerByte

    with pytest.raises(ValueError, match="2 tasks but bytes per token of 1"):
        LossPerByte([1.0]).derive(np.array([0.5, 0.7]))
