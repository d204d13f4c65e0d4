"""Metric formulas against matrices worked out by hand."""
import numpy as np
import pytest

from evaluation import metrics

# Three tasks. Row 0: untrained model; row i: after experience i.
R = np.array([
    [0.10, 0.20, 0.30],   # b = (0.1, 0.2, 0.3)
    [0.90, 0.25, 0.35],
    [0.70, 0.80, 0.40],
    [0.60, 0.50, 0.90],
])


def test_acc_is_mean_of_last_row():
    assert metrics.average_accuracy(R) == pytest.approx((0.6 + 0.5 + 0.9) / 3)


def test_bwt_by_hand():
    # R[3,1]-R[1,1] = 0.6-0.9 = -0.3 ; R[3,2]-R[2,2] = 0.5-0.8 = -0.3 (1-based tasks)
    assert metrics.backward_transfer(R) == pytest.approx(-0.3)


def test_fwt_by_hand():
    # R[1,2]-b2 = 0.25-0.2 = 0.05 ; R[2,3]-b3 = 0.40-0.30 = 0.10
    assert metrics.forward_transfer(R) == pytest.approx(0.075)


def test_forgetting_uses_best_earlier_accuracy():
    # task1: max(0.9, 0.7) - 0.6 = 0.3 ; task2: max(0.8) - 0.5 = 0.3
    assert metrics.forgetting(R) == pytest.approx(0.3)
    # A task that improved after it was learned then dropped: the peak counts, not the first value.
    R2 = np.array([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.9, 0.7, 0.0], [0.4, 0.7, 1.0]])
    assert metrics.forgetting(R2) == pytest.approx(((0.9 - 0.4) + (0.7 - 0.7)) / 2)
    # BWT on the same matrix compares with the value right after learning instead.
    assert metrics.backward_transfer(R2) == pytest.approx(((0.4 - 0.5) + (0.7 - 0.7)) / 2)


def test_average_incremental_accuracy_by_hand():
    # seen accuracies: 0.9 ; (0.7+0.8)/2 = 0.75 ; (0.6+0.5+0.9)/3 = 0.6667
    expected = (0.9 + 0.75 + 2.0 / 3) / 3
    assert metrics.average_incremental_accuracy(R) == pytest.approx(expected)
    assert metrics.seen_accuracy(R, 2) == pytest.approx(0.75)


def test_no_forgetting_gives_zero_bwt_and_forgetting():
    perfect = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    assert metrics.backward_transfer(perfect) == 0.0
    assert metrics.forgetting(perfect) == 0.0
    assert metrics.average_accuracy(perfect) == 1.0


def test_single_task_transfer_metrics_are_zero():
    one = np.array([[0.1], [0.9]])
    assert metrics.backward_transfer(one) == 0.0
    assert metrics.forward_transfer(one) == 0.0
    assert metrics.forgetting(one) == 0.0
    assert metrics.average_accuracy(one) == pytest.approx(0.9)


@pytest.mark.parametrize("bad", [np.zeros((3, 3)), np.zeros(4), np.zeros((1, 0))])
def test_wrong_shape_is_rejected(bad):
    with pytest.raises(ValueError, match="shape"):
        metrics.average_accuracy(bad)


def test_summary_keys():
    assert set(metrics.summary(R)) == {"acc", "bwt", "fwt", "forgetting", "avg_incremental_acc"}


# A loss matrix (lower is better), three tasks; row 0 untrained.
L = np.array([
    [5.0, 5.0, 5.0],
    [1.0, 4.0, 4.5],
    [2.0, 1.5, 4.0],
    [2.5, 1.0, 0.5],
])


def test_loss_bwt_by_hand_improvement_is_positive():
    # R[3,1]-R[1,1] = 2.5-1.0 = +1.5 ; R[3,2]-R[2,2] = 1.0-1.5 = -0.5 ; mean +0.5 of loss, negated
    assert metrics.backward_transfer(L, higher_is_better=False) == pytest.approx(-0.5)


def test_loss_fwt_by_hand():
    # R[1,2]-b2 = 4.0-5.0 = -1.0 ; R[2,3]-b3 = 4.0-5.0 = -1.0 ; loss fell before training: +1.0
    assert metrics.forward_transfer(L, higher_is_better=False) == pytest.approx(1.0)


def test_loss_forgetting_is_the_rise_above_the_best():
    # task1: 2.5 - min(1.0, 2.0) = 1.5 ; task2: 1.0 - min(1.5) = -0.5
    assert metrics.forgetting(L, higher_is_better=False) == pytest.approx(0.5)


def test_summary_names_and_applicability():
    loss = metrics.summary(L, "loss", higher_is_better=False, applicable={"bwt", "forgetting"})
    assert loss == {"loss": pytest.approx(4.0 / 3), "loss_bwt": pytest.approx(-0.5), "loss_fwt": None,
                    "loss_forgetting": pytest.approx(0.5),
                    "loss_avg_incremental": pytest.approx((1.0 + 1.75 + 4.0 / 3) / 3)}
    assert set(metrics.summary(R)) == {"acc", "bwt", "fwt", "forgetting", "avg_incremental_acc"}


def test_applicable_metrics_by_layout():
    tasks_in_order = [[0], [0, 1], [0, 1, 2]]
    assert metrics.applicable_metrics(True, tasks_in_order) == {"bwt", "fwt", "forgetting"}
    # Task 2 had samples in the first experience (blurry hand-off): no forward transfer.
    assert metrics.applicable_metrics(True, [[0, 2], [0, 1, 2], [0, 1, 2]]) == {"bwt", "forgetting"}
    assert metrics.applicable_metrics(False, tasks_in_order) == set()
    # New classes with no task label, or a run that trained on later tasks early (Joint): no FWT.
    assert metrics.applicable_metrics(True, tasks_in_order, class_incremental=True) == {"bwt", "forgetting"}
    assert metrics.applicable_metrics(True, tasks_in_order, learned_ahead=True) == {"bwt", "forgetting"}


def test_average_incremental_accuracy_with_seen_sets():
    # Rows seen as (task 0 and 2), (all): mean((0.9 + 0.35)/2, (0.7+0.8+0.4)/3, (0.6+0.5+0.9)/3)
    seen = [[0, 2], [0, 1, 2], [0, 1, 2]]
    expected = np.mean([(0.9 + 0.35) / 2, (0.7 + 0.8 + 0.4) / 3, (0.6 + 0.5 + 0.9) / 3])
    assert metrics.average_incremental_accuracy(R, seen) == pytest.approx(expected)
