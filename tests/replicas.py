"""Miniature replicas of real datasets, in their exact on-disk layout, built at test time.

Each image is a class colour plus noise, so a head on random-weight features separates
the classes and accuracies are meaningful. Every builder returns what it wrote, so
tests can check that each image got its official label and split.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = [(220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 200, 40), (160, 60, 200), (40, 210, 210)]


def class_image(path: Path, label: int, seed: int, size: int = 64, fmt: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(COLOURS[label % len(COLOURS)], dtype=np.int16)
                     + rng.integers(-40, 41, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


# Real wnids and the first lines of their words.txt entries.
TINY_WNIDS = {"n01443537": "goldfish, Carassius auratus",
              "n01629819": "European fire salamander, Salamandra salamandra",
              "n01641577": "bullfrog, Rana catesbeiana"}


def tiny_imagenet(parent: Path, *, train: int = 6, val: int = 3, test: int = 4) -> dict:
    """parent/tiny-imagenet-200/ as the official zip unpacks. Returns {relpath: (split, wnid or None)}."""
    base = parent / "tiny-imagenet-200"
    base.mkdir(parents=True)
    order = ["n01641577", "n01443537", "n01629819"]  # wnids.txt is not sorted in the real file
    (base / "wnids.txt").write_text("".join(f"{w}\n" for w in order))
    words = {"n00001740": "entity", **TINY_WNIDS, "n15102894": "driftwood"}
    (base / "words.txt").write_text("".join(f"{w}\t{t}\n" for w, t in words.items()))
    truth: dict[str, tuple[str, str | None]] = {}
    wnids = sorted(order)
    seed = 0
    for wnid in order:
        label = wnids.index(wnid)
        boxes = []
        for i in range(train):
            name = f"{wnid}_{i}.JPEG"
            class_image(base / "train" / wnid / "images" / name, label, seed := seed + 1, fmt="JPEG")
            boxes.append(f"{name}\t0\t0\t63\t63\n")
            truth[f"train/{wnid}/images/{name}"] = ("train", wnid)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))
    annotations = []
    for i in range(val * len(order)):
        wnid = order[(i * 2 + 1) % len(order)]  # interleaved, as in the real file
        name = f"val_{i}.JPEG"
        class_image(base / "val" / "images" / name, wnids.index(wnid), seed := seed + 1, fmt="JPEG")
        annotations.append(f"{name}\t{wnid}\t{i % 7}\t{i % 5}\t{40 + i % 9}\t{50 + i % 3}\n")
        truth[f"val/images/{name}"] = ("val", wnid)
    (base / "val" / "val_annotations.txt").write_text("".join(annotations))
    for i in range(test):
        name = f"test_{i}.JPEG"
        class_image(base / "test" / "images" / name, i % len(order), seed := seed + 1, fmt="JPEG")
        truth[f"test/images/{name}"] = ("test", None)
    return truth


FOOD_CLASSES = ["apple_pie", "baby_back_ribs", "baklava"]


def food101(parent: Path, *, train: int = 5, test: int = 3) -> dict:
    """parent/food-101/ as the official archive unpacks. Returns {relpath: (split, class)}."""
    base = parent / "food-101"
    (base / "meta").mkdir(parents=True)
    (base / "meta" / "classes.txt").write_text("".join(f"{c}\n" for c in FOOD_CLASSES))
    (base / "meta" / "labels.txt").write_text("Apple pie\nBaby back ribs\nBaklava\n")
    truth: dict[str, tuple[str, str]] = {}
    lines: dict[str, list[str]] = {"train": [], "test": []}
    seed = 1000
    for label, name in enumerate(FOOD_CLASSES):
        ids = [str(100000 + 7919 * (label + 1) * (i + 3) % 899999) for i in range(train + test)]
        for i, image_id in enumerate(ids):
            split = "train" if i % (train + test) < train else "test"
            class_image(base / "images" / name / f"{image_id}.jpg", label, seed := seed + 1, fmt="JPEG")
            lines[split].append(f"{name}/{image_id}")
            truth[f"images/{name}/{image_id}.jpg"] = (split, name)
    for split, listed in lines.items():
        (base / "meta" / f"{split}.txt").write_text("".join(f"{line}\n" for line in listed))
    return truth


def cifar10(parent: Path, *, per_batch: int = 3, string_names: bool = False) -> Path:
    """parent/cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta, as the
    python version's pickles hold them (bytes keys, filenames, labels)."""
    base = parent / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        labels = [(b + i) % 3 for i in range(per_batch)]
        data = np.stack([np.clip(np.array(COLOURS[label], dtype=np.int16)[:, None, None]
                                 + rng.integers(-30, 31, (3, 32, 32)), 0, 255).astype(np.uint8).reshape(-1)
                         for label in labels])
        batch = {b"batch_label": f"{name}".encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{b}_{i}.png".encode() for i in range(per_batch)]}
        (base / name).write_bytes(pickle.dumps(batch))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    meta = {"label_names": names} if string_names else {b"label_names": [n.encode() for n in names]}
    (base / "batches.meta").write_bytes(pickle.dumps({**meta, b"num_cases_per_batch": per_batch}))
    return base
