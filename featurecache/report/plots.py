"""The report's figures, drawn with matplotlib (Agg backend, no display needed).

Each function takes plain data (numpy arrays, lists of dicts) and returns PNG bytes,
so the report can both embed a figure and write it next to the page. Styling is kept
in one place: readable fonts, no chart junk, a colour-blind-safe palette.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # before pyplot: never needs a display, safe in threads and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

DPI = 100
STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "axes.spines.top": False,
    "axes.spines.right": False, "axes.grid": False, "legend.frameon": False, "figure.dpi": DPI,
}


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(figure)
    return buffer.getvalue()


def _palette(count: int) -> list:
    """Distinct colours: tab10 up to ten classes, then a continuous map."""
    cmap = plt.get_cmap("tab10" if count <= 10 else "turbo")
    return [cmap(i if count <= 10 else i / max(count - 1, 1)) for i in range(count)]


#: Above this many classes a chart shows only the classes that matter most, so labels stay readable.
MAX_LABELLED_CLASSES = 40
#: How many of the most confused classes the confusion matrix keeps when there are too many.
CONFUSED_CLASSES = 30


def most_confused_classes(matrix: np.ndarray, count: int = CONFUSED_CLASSES) -> np.ndarray:
    """Indices (ascending) of the `count` classes with the most errors, as true or predicted class."""
    errors = np.asarray(matrix, dtype=float).copy()
    np.fill_diagonal(errors, 0)
    involvement = errors.sum(axis=0) + errors.sum(axis=1)
    order = np.lexsort((np.arange(len(involvement)), -involvement))
    return np.sort(order[:count])


def confused_pairs(matrix: np.ndarray, classes: list[str], count: int = 15) -> list[tuple[str, str, int, float]]:
    """The most frequent mistakes: (true class, predicted class, count, share of the true class)."""
    matrix = np.asarray(matrix, dtype=np.int64)
    totals = matrix.sum(axis=1)
    errors = matrix.copy()
    np.fill_diagonal(errors, 0)
    flat = np.argsort(-errors, axis=None, kind="stable")[:count]
    pairs = []
    for index in flat:
        true, predicted = divmod(int(index), len(classes))
        if errors[true, predicted] == 0:
            break
        pairs.append((classes[true], classes[predicted], int(errors[true, predicted]),
                      float(errors[true, predicted] / max(totals[true], 1))))
    return pairs


def confusion_figure(matrix: np.ndarray, classes: list[str], title: str):
    """Row-normalised confusion matrix (true class down, predicted across), counts annotated.

    Above MAX_LABELLED_CLASSES classes, only the CONFUSED_CLASSES classes involved in the
    most mistakes are drawn (shares still of each whole true class), labelled, and the
    title says so."""
    matrix = np.asarray(matrix, dtype=float)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    if len(classes) > MAX_LABELLED_CLASSES:
        kept = most_confused_classes(matrix)
        title = f"{title}\n(the {len(kept)} most confused of {len(classes)} classes)"
        matrix, share = matrix[np.ix_(kept, kept)], share[np.ix_(kept, kept)]
        classes = [classes[i] for i in kept]
    n = len(classes)
    side = min(max(3.2, 0.4 * n + 1.4), 11.0)
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(figsize=(side + 0.8, side))
        image = axes.imshow(share, cmap="Blues", vmin=0, vmax=1)
        ticks = np.arange(n)
        axes.set_xticks(ticks, classes, rotation=90 if max(map(len, classes), default=0) > 3 else 0,
                        fontsize=7 if n > 20 else None)
        axes.set_yticks(ticks, classes, fontsize=7 if n > 20 else None)
        axes.set_xlabel("predicted class")
        axes.set_ylabel("true class")
        axes.set_title(title)
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    if matrix[i, j]:
                        axes.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center", fontsize=7,
                                  color="white" if share[i, j] > 0.55 else "#333333")
        figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    return figure


def confusion_heatmap(matrix: np.ndarray, classes: list[str], title: str) -> bytes:
    return _png(confusion_figure(matrix, classes, title))


def per_class_figure(accuracy: dict[str, float | None], title: str):
    """Horizontal bars of per-class accuracy, the lowest at the top.

    Above MAX_LABELLED_CLASSES classes only the lowest MAX_LABELLED_CLASSES are drawn,
    each labelled, and the title says so."""
    items = sorted(((name, value) for name, value in accuracy.items() if value is not None), key=lambda kv: kv[1])
    if len(items) > MAX_LABELLED_CLASSES:
        title = f"{title}\n(the {MAX_LABELLED_CLASSES} lowest of {len(items)} classes)"
        items = items[:MAX_LABELLED_CLASSES]
    height = min(max(2.0, 0.22 * len(items) + 0.8), 12.0)
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(figsize=(4.4, height))
        names = [name for name, _ in items]
        values = [100 * value for _, value in items]
        axes.barh(range(len(items)), values, color="#4c78a8", height=0.7)
        axes.set_yticks(range(len(items)), names, fontsize=7 if len(items) > 30 else None)
        axes.invert_yaxis()  # the first item, the lowest accuracy, at the top
        axes.set_xlim(0, 100)
        axes.set_xlabel("accuracy (%)")
        axes.set_title(title)
        for index, value in enumerate(values):
            axes.text(min(value + 1, 88), index, f"{value:.0f}", va="center", fontsize=7)
    return figure


def per_class_bars(accuracy: dict[str, float | None], title: str) -> bytes:
    return _png(per_class_figure(accuracy, title))


def learning_curves(runs: list[dict]) -> bytes:
    """Loss and validation top-1 per epoch, one colour per run.

    `runs`: [{"label": str, "history": [{"epoch", "train_loss"?, "val_loss"?, "val_top1"?}, ...]}]
    """
    colours = _palette(len(runs))
    with plt.rc_context(STYLE):
        figure, (loss_axes, top1_axes) = plt.subplots(1, 2, figsize=(9.0, 3.2))
        for colour, run in zip(colours, runs):
            history = run["history"]

            def series(key):
                points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
                return ([e for e, _ in points], [v for _, v in points])

            epochs, values = series("train_loss")
            if epochs:
                loss_axes.plot(epochs, values, color=colour, linestyle="--", linewidth=1.2,
                               label=f"{run['label']} (train)")
            epochs, values = series("val_loss")
            if epochs:
                loss_axes.plot(epochs, values, color=colour, linewidth=1.6, label=f"{run['label']} (val)")
            epochs, values = series("val_top1")
            if epochs:
                top1_axes.plot(epochs, [100 * v for v in values], color=colour, linewidth=1.6, marker="o",
                               markersize=2.5, label=run["label"])
        losses = [y for line in loss_axes.lines for y in line.get_ydata() if y > 0]
        if losses and max(losses) > 20 * min(losses):  # one early spike would flatten every other curve
            loss_axes.set_yscale("log")
        loss_axes.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
        top1_axes.set(xlabel="epoch", ylabel="top-1 (%)", title="validation top-1")
        for axes in (loss_axes, top1_axes):
            if axes.lines:
                axes.legend(fontsize=7)
        return _png(figure)


def scatter_2d(points: np.ndarray, labels: np.ndarray, classes: list[str], title: str,
               axis_labels: tuple[str, str] = ("component 1", "component 2")) -> bytes:
    """A 2-D projection coloured by class, with a legend when the classes are few."""
    colours = _palette(len(classes))
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(figsize=(5.2, 4.4))
        for index, name in enumerate(classes):
            chosen = labels == index
            if chosen.any():
                axes.scatter(points[chosen, 0], points[chosen, 1], s=8 if len(points) > 400 else 24, alpha=0.75, color=colours[index],
                             label=name, linewidths=0)
        axes.set_xlabel(axis_labels[0])
        axes.set_ylabel(axis_labels[1])
        axes.set_title(title)
        axes.set_xticks([])
        axes.set_yticks([])
        if len(classes) <= 20:
            axes.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=2, fontsize=8, title="class")
        return _png(figure)


MARKERS = "osD^vP*Xph"


def cost_accuracy(points: list[dict], title: str) -> bytes:
    """Top-1 against extraction cost (seconds per image, log scale): one colour per backbone,
    one marker per head. `points`: [{"backbone", "head", "seconds_per_image", "top1"}, ...]."""
    backbones = list(dict.fromkeys(p["backbone"] for p in points))
    heads = list(dict.fromkeys(p["head"] for p in points))
    colours = dict(zip(backbones, _palette(len(backbones))))
    markers = {head: MARKERS[i % len(MARKERS)] for i, head in enumerate(heads)}
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(figsize=(6.4, 4.0))
        for point in points:
            # Hollow markers: two heads with the same top-1 on one backbone stay both visible.
            axes.scatter(point["seconds_per_image"], 100 * point["top1"], s=52, facecolors="none",
                         edgecolors=[colours[point["backbone"]]], marker=markers[point["head"]], linewidths=1.6)
        axes.set_xscale("log")
        axes.set_xlabel("extraction cost (seconds per image, log scale)")
        axes.set_ylabel("top-1 (%)")
        axes.set_title(title)
        handles = [plt.Line2D([], [], color=colours[b], marker="o", linestyle="", label=b) for b in backbones]
        handles += [plt.Line2D([], [], color="#52606d", marker=markers[h], markerfacecolor="none", linestyle="",
                               label=h) for h in heads]
        axes.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
        return _png(figure)


def thumbnail(image: Image.Image, size: int = 96) -> bytes:
    """A small PNG of one image; tiny images are enlarged with nearest-neighbour so pixels stay crisp."""
    image = image.convert("RGB")
    scale = size / max(image.size)
    resample = Image.Resampling.NEAREST if scale > 2 else Image.Resampling.BICUBIC
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
