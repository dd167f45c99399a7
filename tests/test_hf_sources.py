"""Hugging Face datasets, from Python and as hf:PATH (save_to_disk and Hub-like parquet
folders): each row its own label and split, the same pixels give the same features as
an image folder, content fingerprints, unlabelled splits, and one error line per mistake."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import featurecache
from featurecache import open_cache
from featurecache.cli import app
from featurecache.errors import SourceError, UsageError
from featurecache.data.hf import from_huggingface
from featurecache.data.sources import UNLABELED, open_source

import replicas

datasets = pytest.importorskip("datasets")

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()
SETTINGS = dict(model="resnet18", weights="random", image_size=32, precision="fp32", dtype="float32",
                batch_size=4, workers=0, shard_size=4)
CLASSES = ["red", "green", "blue"]
# Rows out of class order, so that a label read from the wrong row shows.
TRAIN = [2, 0, 1, 1, 2, 0, 0, 1, 2]
VAL = [1, 2, 0]
TEST = [0, 2]


def _folder(tmp_path) -> dict[str, list]:
    """The images as an image folder (train/, val/, test/<class>/), and per split the
    (file, label) of each row of the Hugging Face dataset made from the same files."""
    rows, seed = {}, 0
    for split, labels in (("train", TRAIN), ("val", VAL), ("test", TEST)):
        rows[split] = []
        for i, label in enumerate(labels):
            seed += 1
            file = replicas.class_image(tmp_path / "folder" / split / CLASSES[label] / f"{split}{i}.png", label,
                                        seed, size=16)
            rows[split].append((file, label))
    return rows


def _dataset(rows, *, embed: bool = True, labels: bool = True, image="img", label="fine", extra=None):
    """A Dataset of `rows`: an Image column (encoded bytes, or paths only), a ClassLabel and an id column."""
    images = [{"bytes": file.read_bytes(), "path": None} if embed else str(file) for file, _ in rows]
    columns = {image: images, "id": list(range(100, 100 + len(rows)))}
    features = {image: datasets.Image(), "id": datasets.Value("int64")}
    if labels:
        columns[label] = [value for _, value in rows]
        features[label] = datasets.ClassLabel(names=CLASSES)
    for name, (values, feature) in (extra or {}).items():
        columns[name], features[name] = values, feature
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def _dict(rows, **options):
    """HF's split names: validation, and a test split without the label column."""
    return datasets.DatasetDict({"train": _dataset(rows["train"], **options),
                                 "validation": _dataset(rows["val"], **options),
                                 "test": _dataset(rows["test"], labels=False, **options)})


def _by_split(source) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for sample in source.samples:
        found.setdefault(sample.split, []).append(sample.label)
    return found


def _one_error(arguments) -> str:
    result = runner.invoke(app, ["extract", *arguments, "--weights", "random", "--model", "resnet18"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_dataset_dict_from_python_matches_the_image_folder(tmp_path):
    rows = _folder(tmp_path)
    settings = {**SETTINGS, "batch_size": 1}  # one image a batch: bitwise comparable with the folder's rows
    result = featurecache.extract(source=_dict(rows), name="hfcolours", root=str(tmp_path / "cache"), **settings)
    cache = open_cache(result.path)
    assert result.path.name.startswith("hfcolours-")
    assert cache.splits == {"train": 9, "val": 3, "test": 2} and cache.unlabeled_splits == ["test"]
    assert cache.classes == CLASSES
    assert list(cache.labels("train")) == TRAIN and list(cache.labels("val")) == VAL
    assert list(cache.labels("test")) == [UNLABELED] * 2
    assert cache.paths("val") == ["val/000000", "val/000001", "val/000002"] and list(cache.index("val")) == [0, 1, 2]
    assert cache.manifest["fingerprints"] == "content"
    assert "encoded image bytes" in runner.invoke(app, ["info", str(result.path)]).output
    # Same pixels, same features: the image folder of the same files, row by row.
    # allow_layout: test/ holds class folders, whose labels --unlabeled drops on purpose here (HF's test has none)
    folder = open_cache(featurecache.extract(source=str(tmp_path / "folder"), root=str(tmp_path / "cache"),
                                             unlabeled=("test",), allow_layout=True, **settings).path)
    for split in ("train", "val", "test"):
        by_path = dict(zip(folder.paths(split), folder.features(split)))
        expected = np.stack([by_path[file.relative_to(tmp_path / "folder").as_posix()] for file, _ in rows[split]])
        assert cache.features(split).tobytes() == expected.tobytes()
    assert featurecache.extract(source=_dict(rows), name="hfcolours", root=str(tmp_path / "cache"),
                                **settings).cache_hit


def test_content_fingerprints_follow_the_bytes_and_files_are_stated(tmp_path):
    rows = _folder(tmp_path)
    embedded = from_huggingface(_dataset(rows["train"]))
    assert embedded.fingerprint_kind == "content"
    changed = list(rows["train"])
    changed[4] = (replicas.class_image(tmp_path / "other.png", changed[4][1], 999, size=16), changed[4][1])
    other = from_huggingface(_dataset(changed))
    differs = [a.fingerprint != b.fingerprint for a, b in zip(embedded.samples, other.samples)]
    assert differs == [i == 4 for i in range(9)]  # one image's bytes changed: that row alone
    files = from_huggingface(_dataset(rows["train"], embed=False))
    assert files.fingerprint_kind == "stat"
    assert np.asarray(files.load(files.samples[2])).tolist() == np.asarray(embedded.load(embedded.samples[2])).tolist()


@pytest.mark.parametrize("layout", ["save_to_disk dict", "save_to_disk dataset", "parquet data/",
                                    "parquet top level", "parquet split folders"])
def test_hf_path_reads_each_local_layout(tmp_path, layout):
    rows = _folder(tmp_path)
    whole, root = _dict(rows), tmp_path / "ds"
    if layout == "save_to_disk dict":
        whole.save_to_disk(str(root))
    elif layout == "save_to_disk dataset":
        whole["train"].save_to_disk(str(root))
    else:
        for split, dataset in whole.items():
            name = {"parquet data/": f"data/{split}-00000-of-00001.parquet", "parquet top level": f"{split}-0.parquet",
                    "parquet split folders": f"data/{split}/0000.parquet"}[layout]
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            dataset.to_parquet(str(root / name))
    source = open_source(f"hf:{root}")
    assert source.classes == CLASSES and source.kind == "hf" and source.root == str(root.resolve())
    expected = {"train": TRAIN} if layout == "save_to_disk dataset" else \
        {"train": TRAIN, "val": VAL, "test": [UNLABELED] * 2}
    assert _by_split(source) == expected and source.unlabeled_splits == (["test"] if len(expected) > 1 else [])
    first = [s for s in source.samples if s.split == "train"][0]
    assert np.asarray(source.load(first)).tolist() == np.asarray(Image.open(rows["train"][0][0])).tolist()


def test_hf_path_end_to_end_from_the_command_line(tmp_path):
    rows = _folder(tmp_path)
    _dict(rows).save_to_disk(str(tmp_path / "ds"))
    result = runner.invoke(app, ["extract", f"hf:{tmp_path / 'ds'}", "--weights", "random", "--model", "resnet18",
                                 "--image-size", "32", "--workers", "0", "--root", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert "train 9, val 3, test 2 (unlabelled)" in result.output
    cache = open_cache(next((tmp_path / "cache").glob("ds-resnet18-*")))
    assert list(cache.labels("train")) == TRAIN and cache.manifest["spec"]["source"] == f"hf:{tmp_path / 'ds'}"
    again = runner.invoke(app, ["extract", f"hf:{tmp_path / 'ds'}", "--weights", "random", "--model", "resnet18",
                                "--image-size", "32", "--workers", "0", "--root", str(tmp_path / "cache")])
    assert "cache hit" in again.output


def test_two_classlabel_columns_are_chosen_by_name(tmp_path):
    rows = _folder(tmp_path)
    coarse = datasets.ClassLabel(names=["warm", "cold"])
    dataset = _dataset(rows["train"], label="fine_label",
                       extra={"coarse_label": ([0 if v == 0 else 1 for v in TRAIN], coarse)})
    dataset.save_to_disk(str(tmp_path / "cifar100"))
    assert "several ClassLabel columns (coarse_label, fine_label)" in _one_error([f"hf:{tmp_path / 'cifar100'}"])
    fine = open_source(f"hf:{tmp_path / 'cifar100'}?label=fine_label")
    wide = open_source(f"hf:{tmp_path / 'cifar100'}?image=img&label=coarse_label")
    assert fine.classes == CLASSES and [s.label for s in fine.samples] == TRAIN
    assert wide.classes == ["warm", "cold"] and [s.label for s in wide.samples] == [0 if v == 0 else 1 for v in TRAIN]
    assert fine.identity() != wide.identity()
    named = from_huggingface(dataset, label="coarse_label")
    assert named.classes == ["warm", "cold"]


def test_integer_labels_and_unlabelled_splits(tmp_path):
    rows = _folder(tmp_path)
    plain = datasets.Dataset.from_dict({"image": [str(f) for f, _ in rows["train"]], "label": TRAIN},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "label": datasets.Value("int32")}))
    source = from_huggingface({"train": plain, "test": plain.map(lambda r: {"label": -1})})
    assert source.classes == ["0", "1", "2"] and _by_split(source) == {"train": TRAIN, "test": [UNLABELED] * 9}
    assert source.unlabeled_splits == ["test"]
    mixed = plain.map(lambda r, i: {"label": -1 if i == 3 else r["label"]}, with_indices=True)
    with pytest.raises(SourceError, match="mixes labelled and unlabelled rows"):
        from_huggingface(mixed)
    with pytest.raises(SourceError, match="train split .* has no labels"):
        from_huggingface(plain.map(lambda r: {"label": -1}))


def test_python_column_names_and_what_is_refused(tmp_path):
    rows = _folder(tmp_path)
    dataset = _dataset(rows["train"], image="picture", label="kind")
    result = featurecache.extract(source=dataset, image_column="picture", label_column="kind",
                                  root=str(tmp_path / "cache"), **SETTINGS)
    assert list(open_cache(result.path).labels("train")) == TRAIN
    with pytest.raises(SourceError, match="no column 'nope'"):
        featurecache.extract(source=dataset, label_column="nope", root=str(tmp_path / "cache"), **SETTINGS)
    with pytest.raises(UsageError, match=r"hf:PATH\?image=COLUMN"):
        featurecache.extract(source="hf:/x", image_column="img", root=str(tmp_path / "cache"), **SETTINGS)
    with pytest.raises(SourceError, match="name the columns of a Hugging Face dataset"):
        featurecache.extract(source=[(str(rows["train"][0][0]), 0)], label_column="x", **SETTINGS)
    with pytest.raises(SourceError, match="streaming"):
        featurecache.extract(source=dataset.to_iterable_dataset(), **SETTINGS)


def _saved(tmp_path, make) -> str:
    rows = _folder(tmp_path)
    make(rows).save_to_disk(str(tmp_path / "bad"))
    return f"hf:{tmp_path / 'bad'}"


def _strings(rows):
    return _dataset(rows["train"], labels=False, extra={"label": (["a", "b", "c"] * 3, datasets.Value("string"))})


@pytest.mark.parametrize("make, suffix, fragment", [
    (lambda rows: _dataset(rows["train"]).remove_columns("img"), "", "no image column"),
    (lambda rows: _dataset(rows["train"], extra={"thumb": ([{"bytes": f.read_bytes(), "path": None}
                                                            for f, _ in rows["train"]], datasets.Image())}),
     "", "several image columns (img, thumb); choose one with image=COLUMN"),
    (_strings, "", "dataset.class_encode_column('label')"),
    (lambda rows: _dataset(rows["train"], labels=False, extra={"label": ([0.5] * 9, datasets.Value("float32"))}),
     "", "holds float32 values, not class ids; name a ClassLabel or integer column with label=COLUMN"),
    (lambda rows: _dataset(rows["train"], labels=False), "", "no label column"),
    (lambda rows: _dataset(rows["train"]), "?image=id", "column 'id' holds int64 values, not images"),
    (lambda rows: _dataset(rows["train"]), "?colour=red", "unknown option 'colour'"),
    (lambda rows: datasets.Dataset.from_dict(
        {"img": [b"not an image"] + [f.read_bytes() for f, _ in rows["train"][1:]], "label": TRAIN},
        features=datasets.Features({"img": datasets.Value("binary"), "label": datasets.ClassLabel(names=CLASSES)})),
     "?image=img", "train row 0 of 'img' is not an image Pillow can read"),
])
def test_each_mistake_is_one_error_line(tmp_path, make, suffix, fragment):
    assert fragment in _one_error([_saved(tmp_path, make) + suffix])


def test_undecodable_bytes_in_an_image_column_and_bad_paths(tmp_path):
    rows = _folder(tmp_path)
    broken = _dataset(rows["train"]).cast_column("img", datasets.Image(decode=False))
    broken = broken.map(lambda r, i: {"img": {"bytes": b"\x89PNG garbage" if i == 5 else r["img"]["bytes"],
                                              "path": None}}, with_indices=True)
    broken.cast_column("img", datasets.Image()).save_to_disk(str(tmp_path / "broken"))
    assert "train row 5 of 'img' is not an image" in _one_error([f"hf:{tmp_path / 'broken'}"])
    assert "no such folder; expected a dataset saved with save_to_disk" in _one_error([f"hf:{tmp_path / 'nowhere'}"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("hi")
    assert "neither a dataset saved with save_to_disk" in _one_error([f"hf:{tmp_path / 'empty'}"])
    for config in ("cifar10", "cifar100"):
        (tmp_path / "configs" / config).mkdir(parents=True)
        _dataset(rows["train"]).to_parquet(str(tmp_path / "configs" / config / "train-0.parquet"))
    assert "several configurations? point hf: at one" in _one_error([f"hf:{tmp_path / 'configs'}"])
    assert open_source(f"hf:{tmp_path / 'configs' / 'cifar10'}").split_counts() == {"train": 9}
    assert "--unlabeled applies to an image folder" in _one_error([f"hf:{tmp_path / 'configs'}", "--unlabeled",
                                                                   "test"])


def test_relative_image_paths_of_an_hf_folder_are_refused(tmp_path, monkeypatch):
    """Relative paths were read from the current folder: from elsewhere every row was skipped, and
    from a folder holding other files of those names they would have been read silently."""
    rows = _folder(tmp_path)
    monkeypatch.chdir(tmp_path / "folder")
    relative = [(file.relative_to(tmp_path / "folder"), label) for file, label in rows["train"]]
    (tmp_path / "rel" / "data").mkdir(parents=True)
    _dataset(relative, embed=False).to_parquet(str(tmp_path / "rel" / "data" / "train-0.parquet"))
    assert "train row 0 names its image by the relative path 'train/" in _one_error([f"hf:{tmp_path / 'rel'}"])
    absolute = tmp_path / "abs" / "data"
    absolute.mkdir(parents=True)
    _dataset(rows["train"], embed=False).to_parquet(str(absolute / "train-0.parquet"))
    assert open_source(f"hf:{tmp_path / 'abs'}").split_counts() == {"train": 9}


def test_sources_lists_hf():
    result = runner.invoke(app, ["sources"])
    assert result.exit_code == 0 and "hf:PATH" in result.output


def test_datasets_is_imported_only_for_hf_sources(image_folder):
    code = ("import sys; from featurecache.data.sources import open_source; from featurecache.data import python_objects; "
            f"open_source({str(image_folder)!r}); print('datasets' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False"], done.stdout + done.stderr


def test_an_hf_cache_reopens_from_its_manifest(tmp_path):
    rows = _folder(tmp_path)
    _dict(rows).save_to_disk(str(tmp_path / "ds"))
    spec = f"hf:{tmp_path / 'ds'}?label=fine"
    cache = open_cache(featurecache.extract(source=spec, root=str(tmp_path / "cache"), **SETTINGS).path)
    from featurecache.data.sources import reopen_source

    again = reopen_source(cache.manifest["spec"])
    assert again.identity() == cache.manifest["config"]["source"]
    shutil.rmtree(tmp_path / "ds")
    with pytest.raises(SourceError, match="no such folder"):
        reopen_source(cache.manifest["spec"])


def test_datasets_is_offline_while_featurecache_reads_and_restored_after(tmp_path, monkeypatch):
    rows = _folder(tmp_path)
    _dataset(rows["train"]).to_parquet(str(tmp_path / "pq" / "train-0.parquet"))
    seen = []
    read = datasets.Dataset.from_parquet

    def spy(*args, **kwargs):
        seen.append(datasets.config.HF_HUB_OFFLINE)
        return read(*args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "from_parquet", spy)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    assert open_source(f"hf:{tmp_path / 'pq'}").split_counts() == {"train": 9}
    assert seen == [True] and datasets.config.HF_HUB_OFFLINE is False


@pytest.mark.parametrize("embed", [True, False])
def test_copies_across_splits_are_found_in_bytes_and_in_files(tmp_path, embed):
    from featurecache.data.copies import find_copies

    rows = _folder(tmp_path)
    rows["val"][1] = rows["train"][3]  # a val row that is a train image
    source = from_huggingface({"train": _dataset(rows["train"], embed=embed), "val": _dataset(rows["val"],
                                                                                              embed=embed)})
    found = [(pair.copy.split, pair.original.split) for pair in find_copies(source.samples, source.content)]
    assert found == [("val", "train")]


def test_hf_path_gets_the_class_checks_unless_allow_layout(tmp_path):
    """hf:PATH whose val held a class train never had extracted with exit 0 (folders and CSVs refuse it)."""
    rows = _folder(tmp_path)
    rows["train"] = [row for row in rows["train"] if row[1] != 2]  # no blue in train
    datasets.DatasetDict({"train": _dataset(rows["train"]), "validation": _dataset(rows["val"])}).save_to_disk(
        str(tmp_path / "saved"))
    with pytest.raises(SourceError, match=r"blue appear in val but not in train.*--allow-layout"):
        open_source(f"hf:{tmp_path / 'saved'}")
    assert open_source(f"hf:{tmp_path / 'saved'}", allow_layout=True).split_counts() == {"train": 6, "val": 3}
