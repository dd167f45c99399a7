import json
import math

import numpy as np
import pytest

from featurecache.errors import HeadError, MismatchError
from featurecache.heads.metrics import classification_metrics, log_loss

PROBABILITIES = np.array([
    [0.7, 0.2, 0.1],
    [0.1, 0.8, 0.1],
    [0.6, 0.3, 0.1],
    [0.2, 0.2, 0.6],
])
LABELS = np.array([0, 1, 1, 0])


def test_metrics_of_a_small_example():
    metrics = classification_metrics(PROBABILITIES, LABELS, ["cat", "dog", "fox"])
    assert metrics["n"] == 4
    assert metrics["top1"] == 0.5
    assert "top5" not in metrics
    assert metrics["per_class_accuracy"] == {"cat": 0.5, "dog": 0.5, "fox": None}
    assert metrics["confusion_matrix"] == [[1, 0, 1], [1, 1, 0], [0, 0, 0]]
    expected_loss = -np.mean(np.log([0.7, 0.8, 0.3, 0.2]))
    assert metrics["log_loss"] == pytest.approx(expected_loss)
    assert log_loss(PROBABILITIES, LABELS) == pytest.approx(expected_loss)
    json.dumps(metrics)


def test_top5_with_at_least_five_classes():
    probabilities = np.tile(np.linspace(0.3, 0.0, 6), (3, 1))  # ranks 0 > 1 > ... > 5
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    metrics = classification_metrics(probabilities, np.array([0, 4, 5]), list("abcdef"))
    assert metrics["top1"] == pytest.approx(1 / 3)
    assert metrics["top5"] == pytest.approx(2 / 3)


def test_log_loss_is_finite_for_zero_probability():
    loss = log_loss(np.array([[1.0, 0.0]]), np.array([1]))
    assert math.isfinite(loss) and loss > 20


def test_empty_input():
    metrics = classification_metrics(np.zeros((0, 2)), np.zeros(0, dtype=int), ["a", "b"])
    assert metrics["n"] == 0 and metrics["top1"] is None
    assert metrics["per_class_accuracy"] == {"a": None, "b": None}


@pytest.mark.parametrize(
    ("probabilities", "labels", "names"),
    [
        (PROBABILITIES, LABELS[:3], ["a", "b", "c"]),  # row count
        (PROBABILITIES, LABELS, ["a", "b"]),  # class names
        (PROBABILITIES, np.array([0, 1, 3, 0]), ["a", "b", "c"]),  # label out of range
        (PROBABILITIES[0], LABELS[:1], ["a", "b", "c"]),  # not 2-D
    ],
)
def test_mismatches_raise(probabilities, labels, names):
    with pytest.raises(MismatchError):
        classification_metrics(probabilities, labels, names)


@pytest.mark.parametrize("row, what", [
    ([np.nan, 0.5, 0.5], "NaN or inf"), ([np.inf, 0.0, 0.0], "NaN or inf"),
    ([1.0, 1.0, 0.0], "probabilities summing to 2"), ([1.2, -0.2, 0.0], "probabilities summing to 1"),
])
def test_rows_that_are_not_distributions_are_refused_not_scored(row, what):
    """argmax ranks NaN first: an all-NaN head scored the share of class 0 as its top-1."""
    probabilities = np.array([[0.2, 0.5, 0.3], row, [0.1, 0.1, 0.8]])
    with pytest.raises(HeadError, match=rf"no probability distribution for 1 of 3 test rows \(row 1: {what}"):
        classification_metrics(probabilities, np.array([1, 0, 2]), ["a", "b", "c"], "test rows")
    within = np.array([[0.2, 0.5, 0.3 + 9e-4]])  # float32 softmax sums: within DISTRIBUTION_TOL
    assert classification_metrics(within, np.array([1]), ["a", "b", "c"])["top1"] == 1.0
