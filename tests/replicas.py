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


# ----------------------------------------------------------------------------- torchvision's layouts
# Each builder writes ROOT as torchvision's `root=` expects it and returns
# {split: [(file name or None, class name), ...]} in torchvision's item order.


def _jpeg(path: Path, label: int, seed: int, size: int = 32) -> Path:
    return class_image(path, label, seed, size=size, fmt="JPEG")


def _idx(path: Path, array: np.ndarray) -> None:
    import struct

    path.parent.mkdir(parents=True, exist_ok=True)
    code = 0x08  # unsigned byte
    header = struct.pack(">HBB", 0, code, array.ndim) + b"".join(struct.pack(">I", n) for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def mnist(root: Path, folder: str = "MNIST") -> dict:
    classes = (["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                "Ankle boot"] if folder == "FashionMNIST" else
               ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven",
                "8 - eight", "9 - nine"])
    truth = {}
    rng = np.random.default_rng(0)
    for split, prefix, count in (("train", "train", 6), ("test", "t10k", 4)):
        labels = np.array([(i * 3 + (split == "test")) % 10 for i in range(count)])
        images = (labels[:, None, None] * 25 + rng.integers(0, 5, (count, 28, 28))).astype(np.uint8)
        _idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", images)
        _idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", labels)
        truth[split] = [(None, classes[label]) for label in labels]
    return truth


def svhn(root: Path) -> dict:
    from scipy.io import savemat

    truth = {}
    rng = np.random.default_rng(0)
    for split, count in (("train", 5), ("test", 3)):
        digits = np.array([(i * 7 + (split == "test")) % 10 for i in range(count)])
        y = np.where(digits == 0, 10, digits).reshape(-1, 1)  # SVHN stores the digit 0 as 10
        X = rng.integers(0, 256, (32, 32, 3, count), dtype=np.uint8)
        root.mkdir(parents=True, exist_ok=True)
        savemat(root / f"{split}_32x32.mat", {"X": X, "y": y})
        truth[split] = [(None, str(d)) for d in digits]
    return truth


def stl10(root: Path) -> dict:
    base = root / "stl10_binary"
    base.mkdir(parents=True)
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (base / "class_names.txt").write_text("\n".join(names) + "\n")
    rng = np.random.default_rng(0)
    truth = {}
    for split, count in (("train", 4), ("test", 3)):
        labels = np.array([(i * 3 + (split == "test")) % 10 + 1 for i in range(count)], dtype=np.uint8)  # 1-based
        (base / f"{split}_X.bin").write_bytes(rng.integers(0, 256, count * 3 * 96 * 96, dtype=np.uint8).tobytes())
        (base / f"{split}_y.bin").write_bytes(labels.tobytes())
        truth[split] = [(None, names[label - 1]) for label in labels]
    return truth


def flowers102(root: Path) -> dict:
    from scipy.io import savemat

    base = root / "flowers-102"
    labels = [1, 2, 3, 1, 2, 3, 3, 2, 1]  # 1-based, per image_00001.. image_00009
    for i, label in enumerate(labels, start=1):
        _jpeg(base / "jpg" / f"image_{i:05d}.jpg", label - 1, i)
    savemat(base / "imagelabels.mat", {"labels": np.array([labels])})
    savemat(base / "setid.mat", {"trnid": np.array([[1, 5, 9]]), "valid": np.array([[2, 6]]),
                                 "tstid": np.array([[3, 4, 7, 8]])})
    import torchvision.datasets as d

    names = d.Flowers102.classes
    ids = {"train": [1, 5, 9], "val": [2, 6], "test": [3, 4, 7, 8]}
    return {split: [(f"image_{i:05d}.jpg", names[labels[i - 1] - 1]) for i in chosen] for split, chosen in ids.items()}


def oxford_pet(root: Path) -> dict:
    base = root / "oxford-iiit-pet"
    breeds = [("Abyssinian", 1, 1), ("american_bulldog", 2, 2), ("american_pit_bull_terrier", 3, 2)]
    names = ["Abyssinian", "American Bulldog", "American Pit Bull Terrier"]
    truth = {}
    (base / "annotations" / "trimaps").mkdir(parents=True)
    for split, listing, count in (("train", "trainval", 2), ("test", "test", 1)):
        lines, truth[split] = [], []
        for breed, class_id, species in breeds:
            for i in range(count):
                image_id = f"{breed}_{i + (10 if split == 'test' else 1)}"
                _jpeg(base / "images" / f"{image_id}.jpg", class_id - 1, class_id * 100 + i + 10 * (split == "test"))
                lines.append(f"{image_id} {class_id} {species} {i + 1}\n")
                truth[split].append((f"{image_id}.jpg", names[class_id - 1]))
        (base / "annotations" / f"{listing}.txt").write_text("".join(lines))
    return truth


def dtd(root: Path) -> dict:
    data = root / "dtd" / "dtd"
    classes = ["banded", "blotchy", "braided"]
    truth = {}
    number = 0
    for split in ("train", "val", "test"):
        lines, truth[split] = [], []
        for label, name in enumerate(classes):
            number += 1
            file = f"{name}_{number:04d}.jpg"
            _jpeg(data / "images" / name / file, label, number)
            lines.append(f"{name}/{file}\n")
            truth[split].append((file, name))
        (data / "labels").mkdir(parents=True, exist_ok=True)
        (data / "labels" / f"{split}1.txt").write_text("".join(lines))
    return truth


def fgvc_aircraft(root: Path) -> dict:
    data = root / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "727-200", "737-200"]
    (data / "images").mkdir(parents=True)
    (data / "variants.txt").write_text("".join(f"{v}\n" for v in variants))
    truth, number = {}, 1000000
    for split in ("train", "val", "test"):
        lines, truth[split] = [], []
        for label, variant in enumerate(variants):
            number += 17
            _jpeg(data / "images" / f"{number}.jpg", label, number)
            lines.append(f"{number} {variant}\n")
            truth[split].append((f"{number}.jpg", variant))
        (data / f"images_variant_{split}.txt").write_text("".join(lines))
    return truth


def eurosat(root: Path) -> dict:
    classes = ["AnnualCrop", "Forest", "HerbaceousVegetation"]
    truth = []
    for label, name in enumerate(classes):
        for i in range(1, 4):
            _jpeg(root / "eurosat" / "2750" / name / f"{name}_{i}.jpg", label, label * 10 + i, size=64)
            truth.append((f"{name}_{i}.jpg", name))
    return {"train": truth}


def caltech101(root: Path) -> dict:
    base = root / "caltech101" / "101_ObjectCategories"
    truth = []
    for label, name in enumerate(["BACKGROUND_Google", "Faces", "accordion", "airplanes"]):
        for i in range(1, 3 + (name == "Faces")):
            _jpeg(base / name / f"image_{i:04d}.jpg", label, label * 10 + i)
            if name != "BACKGROUND_Google":  # torchvision leaves the background class out
                truth.append((f"image_{i:04d}.jpg", name))
    return {"train": truth}


def sun397(root: Path) -> dict:
    base = root / "SUN397"
    classes = ["/a/abbey", "/a/airplane_cabin", "/b/bakery/shop"]
    base.mkdir(parents=True)
    (base / "ClassName.txt").write_text("".join(f"{c}\n" for c in classes))
    truth = {}
    for label, name in enumerate(classes):
        for i in range(2):
            file = f"sun_{'abcdefgh'[label * 2 + i]}{label}{i}.jpg"
            _jpeg(base / name.strip("/") / file, label, label * 10 + i)
            truth[file] = name[3:]
    return {"train": truth}  # rglob order is the file system's: checked by name


def stanford_cars(root: Path) -> dict:
    from scipy.io import savemat

    base = root / "stanford_cars"
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"]
    (base / "devkit").mkdir(parents=True)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array([names], dtype=object)})
    truth = {}
    for split, folder, annos in (("train", "cars_train", base / "devkit" / "cars_train_annos.mat"),
                                 ("test", "cars_test", base / "cars_test_annos_withlabels.mat")):
        records, truth[split] = [], []
        for i, label in enumerate([1, 2, 3, 2] if split == "train" else [3, 1, 2]):
            fname = f"{i + 1:05d}.jpg"
            _jpeg(base / folder / fname, label - 1, label * 10 + i + 50 * (split == "test"))
            records.append((1, 2, 30, 30, label, fname))
            truth[split].append((fname, names[label - 1]))
        dtype = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
        savemat(annos, {"annotations": np.array([records], dtype=dtype)})
    return truth


def imagenet(root: Path) -> dict:
    import torch

    wnid_to_classes = {"n01440764": ("tench", "Tinca tinca"), "n01443537": ("goldfish", "Carassius auratus"),
                       "n01484850": ("great white shark", "white shark", "man-eater")}
    wnids = sorted(wnid_to_classes)
    root.mkdir(parents=True, exist_ok=True)
    truth = {}
    for split, count in (("train", 3), ("val", 2)):
        truth[split] = []
        for label, wnid in enumerate(wnids):
            for i in range(count):
                file = f"{wnid}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{label * 10 + i + 1:08d}.JPEG"
                _jpeg(root / split / wnid / file, label, label * 10 + i + 100 * (split == "val"))
                truth[split].append((file, wnid_to_classes[wnid][0]))
    val_wnids = [w for w in wnids for _ in range(2)]
    torch.save((wnid_to_classes, val_wnids), root / "meta.bin")
    return truth
