"""Classification metrics over predicted probabilities, as JSON-able values."""

from __future__ import annotations

import numpy as np

from featurecache.errors import HeadError, MismatchError

_EPSILON = 1e-12
DISTRIBUTION_TOL = 1e-3  # |sum - 1| allowed: float32 softmax over 1,000 classes sums within about 1e-5


def not_distributions(probabilities: np.ndarray) -> np.ndarray:
    """Which rows are not probability distributions: NaN or inf, negative, or not summing to 1."""
    finite = np.isfinite(probabilities).all(axis=1)
    with np.errstate(invalid="ignore"):
        sums = probabilities.sum(axis=1, dtype=np.float64)
        bad = (probabilities < 0).any(axis=1) | (np.abs(sums - 1.0) > DISTRIBUTION_TOL)
    return ~finite | bad


def _check_distributions(probabilities: np.ndarray, where: str) -> None:
    """Scores of rows that are not distributions would be argmax's guesses (NaN ranks class 0
    first): refuse them, as predict refuses to rank such a row."""
    bad = np.flatnonzero(not_distributions(probabilities))
    if bad.size:
        row = probabilities[bad[0]]
        what = ("NaN or inf" if not np.isfinite(row).all()
                else f"probabilities summing to {float(row.sum(dtype=np.float64)):.4g}")
        raise HeadError(f"the head gives no probability distribution for {bad.size} of {len(probabilities)} {where} "
                        f"(row {bad[0]}: {what}), so its scores would be guesses: it diverged or a parameter breaks "
                        "it (a tiny knn temperature, a huge mlp lr); change the parameters and fit it again")


def _check(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    if probabilities.ndim != 2:
        raise MismatchError(f"probabilities must be (N, C), got shape {probabilities.shape}")
    if labels.shape != (probabilities.shape[0],):
        raise MismatchError(
            f"{probabilities.shape[0]} rows of probabilities but labels have shape {labels.shape}"
        )
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= probabilities.shape[1]):
        raise MismatchError(
            f"labels must lie in 0..{probabilities.shape[1] - 1}, "
            f"got {labels.min()}..{labels.max()}"
        )
    return probabilities, labels


def log_loss(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-probability of the true class (clipped at 1e-12)."""
    probabilities, labels = _check(probabilities, labels)
    if labels.size == 0:
        return float("nan")
    true_class = probabilities[np.arange(labels.size), labels]
    return float(-np.log(np.clip(true_class, _EPSILON, 1.0)).mean())


def classification_metrics(
    probabilities: np.ndarray, labels: np.ndarray, class_names: list[str], where: str = "rows"
) -> dict:
    """Top-1 (and top-5 when there are at least 5 classes), per-class accuracy,
    confusion matrix (rows: true class, columns: predicted), log-loss and count."""
    probabilities, labels = _check(probabilities, labels)
    n, n_classes = probabilities.shape
    _check_distributions(probabilities, where)
    if len(class_names) != n_classes:
        raise MismatchError(f"{len(class_names)} class names for {n_classes} probability columns")
    predicted = probabilities.argmax(axis=1)
    confusion = np.bincount(
        labels * n_classes + predicted, minlength=n_classes * n_classes
    ).reshape(n_classes, n_classes)
    per_class_count = confusion.sum(axis=1)
    metrics: dict = {
        "n": int(n),
        "top1": float((predicted == labels).mean()) if n else None,
    }
    if n_classes >= 5:
        top5 = np.argpartition(-probabilities, 4, axis=1)[:, :5]
        metrics["top5"] = float((top5 == labels[:, None]).any(axis=1).mean()) if n else None
    metrics["log_loss"] = log_loss(probabilities, labels) if n else None
    metrics["per_class_accuracy"] = {
        name: float(confusion[index, index] / per_class_count[index])
        if per_class_count[index]
        else None
        for index, name in enumerate(class_names)
    }
    metrics["confusion_matrix"] = confusion.tolist()
    return metrics
