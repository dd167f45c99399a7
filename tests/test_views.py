"""Augmented views in the cache: keyed view sets, determinism across kills, incremental K,
heads that train on views while val/test never see one (issue 18)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest

from featurecache import extract, open_cache
from featurecache.cache.shards import file_sha256
from featurecache.cache.views import choose_view_set, load_views, parse_policy, view_sets
from featurecache.errors import UsageError
from featurecache.extract.views import augmented_view, view_generator

from helpers import flip_feature_byte, write_image, stderr_lines
from processes import run_cli, tiny_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TRAIN = 10  # the image_folder fixture: train 2 x 5, val 2 x 3


@pytest.fixture
def tiny():
    with tiny_backbone():
        yield


def _spec(tiny_spec, folder, **overrides):
    return tiny_spec(folder, model="tiny", **overrides)


def _shard_bytes(directory: Path) -> dict[str, str]:
    return {f.name: file_sha256(f) for f in sorted((directory / "shards").glob("*.h5"))}


def _views(entry: Path, count: int, which: str | None = None) -> np.ndarray:
    cache = open_cache(entry)
    directory, manifest = choose_view_set(entry, cache.key, which)
    return load_views(cache, directory, manifest, "pool", count)


# ------------------------------------------------------------------ extract: keys, determinism, incremental K


def test_views_are_a_keyed_set_beside_the_plain_features(image_folder, tiny_spec, tiny):
    plain = extract(_spec(tiny_spec, image_folder))
    plain_bytes = _shard_bytes(plain.path)
    runs = {}
    for augment, seed in (("crop-flip", 0), ("flip", 0), ("crop-flip:0.5-1", 0), ("crop-flip", 1)):
        result = extract(_spec(tiny_spec, image_folder, views=2, augment=augment, view_seed=seed))
        assert result.cache_hit and result.computed == 0  # adding views never recomputes the plain features
        assert result.views.computed == 2 * TRAIN and result.views.views == 2
        runs[(augment, seed)] = result.views
    assert len({r.key for r in runs.values()}) == 4  # policy, its scale range and the seed are in the view key
    assert len({r.path for r in runs.values()}) == 4
    assert _shard_bytes(plain.path) == plain_bytes
    cache = open_cache(plain.path)
    train = cache.features("train")
    sets = {key: load_views(cache, directory, manifest, "pool", 2)
            for directory, manifest, _ in view_sets(plain.path)
            for key in [(manifest["augment"], manifest["seed"])]}
    assert set(sets) == set(runs)
    for key, values in sets.items():
        assert values.shape == (TRAIN, 2, *train.shape[1:])
        assert not np.array_equal(values[:, 0], train), key  # a view is not the centre crop
    keys = list(sets)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not np.array_equal(sets[a], sets[b]), (a, b)
    # Val and test hold the plain view only: no view set row is a val row.
    manifest = view_sets(plain.path)[0][1]
    assert manifest["rows"] == TRAIN and all(s["rows"] <= 4 for s in manifest["shards"])
    # The same request again: nothing computed.
    again = extract(_spec(tiny_spec, image_folder, views=2))
    assert again.views.computed == 0 and again.views.key == runs[("crop-flip", 0)].key


def test_more_views_later_compute_only_the_new_ones(image_folder, tiny_spec, tiny, tmp_path):
    first = extract(_spec(tiny_spec, image_folder, views=2))
    before = _shard_bytes(first.views.path)
    assert len(before) == 2 * 3  # 2 views x blocks of 4, 4, 2 rows
    more = extract(_spec(tiny_spec, image_folder, views=4))
    assert more.views.key == first.views.key and more.views.views == 4
    assert more.views.computed == 2 * TRAIN  # views 2 and 3 only
    after = _shard_bytes(more.views.path)
    assert {k: after[k] for k in before} == before  # views 0 and 1 untouched, byte for byte
    fewer = extract(_spec(tiny_spec, image_folder, views=1))
    assert fewer.views.computed == 0 and fewer.views.views == 4
    # All four at once, elsewhere: the same bytes (a view depends on seed, image and index only).
    at_once = extract(_spec(tiny_spec, image_folder, views=4, root=str(tmp_path / "other")))
    assert _shard_bytes(at_once.views.path) == after


def test_a_view_depends_on_seed_image_and_index_only():
    from PIL import Image

    from featurecache.backbones.registry import Preprocessing

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    prep = Preprocessing(resize_size=32, crop_size=32, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)
    policy = parse_policy("crop-flip")

    def view(seed, fingerprint, index):
        return augmented_view(image, policy, prep, view_generator(seed, fingerprint, index)).numpy()

    reference = view(0, "abc", 1)
    np.random.seed(123)  # global RNGs play no part
    import torch
    torch.manual_seed(5)
    assert np.array_equal(view(0, "abc", 1), reference)
    assert not np.array_equal(view(1, "abc", 1), reference)
    assert not np.array_equal(view(0, "abd", 1), reference)
    assert not np.array_equal(view(0, "abc", 2), reference)
    assert reference.shape == (3, 32, 32) and reference.dtype == np.uint8


def _invoke(argv: list[str]) -> tuple[int, str]:
    """Run the CLI in this process: (exit code, its one line on stderr, checked to be one `error:` line)."""
    from typer.testing import CliRunner

    from featurecache.cli import app

    result = CliRunner().invoke(app, argv)
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return result.exit_code, lines[0]


def _cli(folder: Path, root: Path, *extra: str) -> list[str]:
    return ["extract", str(folder), "--model", "tiny", "--weights", "random", "--image-size", "32", "--precision",
            "fp32", "--dtype", "float32", "--workers", "0", "--shard-size", "4", "--batch-size", "3", "--root",
            str(root), *extra]


@pytest.fixture(scope="module")
def kill_setup(tmp_path_factory):
    """A folder, an uninterrupted run with 3 views, and the plain entry alone (copied per test)."""
    base = tmp_path_factory.mktemp("views-kill")
    folder = base / "photos"
    for i in range(8):
        write_image(folder / "train" / ("ants" if i % 2 else "bees") / f"{i}.png", 300 + i)
    write_image(folder / "val" / "ants" / "v.png", 400)
    write_image(folder / "val" / "bees" / "v.png", 401)
    assert run_cli(_cli(folder, base / "reference", "--views", "3"), base / "reference.log") == 0
    assert run_cli(_cli(folder, base / "plain"), base / "plain.log") == 0  # plain first: faults hit views only
    return folder, base


@pytest.mark.parametrize("fault", ["after_manifest:2", "after_append:3"])
def test_killed_and_resumed_views_equal_an_uninterrupted_run(kill_setup, tmp_path, fault):
    import shutil

    folder, base = kill_setup
    root = tmp_path / "killed"
    shutil.copytree(base / "plain", root)
    killed = run_cli(_cli(folder, root, "--views", "3"), tmp_path / "killed.log", fault=fault)
    assert killed == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    log = tmp_path / "rerun.log"
    assert run_cli(_cli(folder, root, "--views", "3", "--workers", "1"), log) == 0, log.read_text()
    (entry,) = [p for p in root.iterdir() if p.name != "_weights"]
    (reference,) = [p for p in (base / "reference").iterdir() if p.name != "_weights"]
    (directory,) = (entry / "views").iterdir()
    assert not [f for f in directory.rglob("*") if ".tmp-" in f.name]
    assert _shard_bytes(directory) == _shard_bytes(next((reference / "views").iterdir()))
    assert _views(entry, 3).tobytes() == _views(reference, 3).tobytes()


# ------------------------------------------------------------------ damage and bad input


def test_a_damaged_view_shard_is_found_by_verify_and_refused_on_read(image_folder, tiny_spec, tiny, tmp_path):
    from featurecache.maintain.verify import repair_entry, verify_entry

    result = extract(_spec(tiny_spec, image_folder, views=2))
    good = _views(result.path, 2)
    assert verify_entry(result.path).ok
    shard = result.views.path / "shards" / "train-v0001-00001.h5"
    flip_feature_byte(shard, "pool", 5)
    report = verify_entry(result.path)
    assert [p.file for p in report.problems] == [f"views/{result.views.path.name}/shards/train-v0001-00001.h5"]
    code, line = _invoke(["fit-head", str(result.path), "--head", "logistic", "--views", "2"])
    assert code == 1 and "train-v0001-00001" in line, line
    before, after = repair_entry(result.path)
    assert not before.ok and after.ok
    assert _views(result.path, 2).tobytes() == good.tobytes()  # recomputed, the same bytes


@pytest.mark.parametrize("args, words", [
    (["--views", "-1"], "--views"),
    (["--views", "2", "--augment", "blur"], "unknown --augment"),
    (["--views", "2", "--augment", "crop-flip:0.9-0.2"], "scale range"),
    (["--views", "2", "--augment", "flip:0.5-1"], "no scale"),
    (["--views", "2", "--augment", "crop-flip:a-b"], "scale range"),
])
def test_bad_views_or_policy_is_one_error_line(image_folder, tmp_path, tiny, args, words):
    code, line = _invoke(_cli(image_folder, tmp_path / "cache", *args))
    assert code == 2 and words in line, line
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("views"))


def test_policy_parsing():
    assert parse_policy("crop-flip").scale == (0.25, 1.0) and parse_policy("crop-flip").hflip
    assert parse_policy("crop-flip:0.5-1").scale == (0.5, 1.0)
    assert parse_policy("crop:0.5-1").hflip is False
    assert parse_policy("flip").scale is None
    assert parse_policy("crop-flip:0.5-1").text == "crop-flip:0.5-1"
    with pytest.raises(UsageError):
        parse_policy("crop-flip:0-1")


# ------------------------------------------------------------------ heads on views


@pytest.fixture(scope="module")
def with_views(tmp_path_factory):
    """An entry with 12 train rows per class (3 classes), val and test, and 3 crop-flip views."""
    from featurecache.extract.stage import ExtractSpec

    base = tmp_path_factory.mktemp("views")
    folder = base / "photos"
    seed = 100
    for split, count in (("train", 12), ("val", 4), ("test", 4)):
        for label in ("a", "b", "c"):
            for i in range(count):
                seed += 1
                write_image(folder / split / label / f"{label}{i}.png", seed)
    with tiny_backbone():
        return extract(ExtractSpec(source=str(folder), model="tiny", weights="random", image_size=32,
                                   precision="fp32", dtype="float32", batch_size=8, workers=0, shard_size=16,
                                   views=3, root=str(base / "cache"))).path


def _fit(entry, head, **settings):
    from featurecache.fit.stage import FitSpec, fit_head

    params = settings.pop("params", {})
    if head == "mlp":
        params = {"hidden_sizes": [16], "epochs": 5, "lr": 0.01, "weight_decay": 0.0, **params}
    return fit_head(entry, FitSpec(head=head, name=settings.pop("name", head), params=params, overwrite=True,
                                   **settings))


def _spy(monkeypatch, cls, method="fit"):
    calls = []
    original = getattr(cls, method)

    def spy(self, *args, **kwargs):
        calls.append((args, kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, spy)
    return calls


def test_logistic_stacks_the_views_and_validates_on_plain_val(with_views, monkeypatch):
    from featurecache.heads.logistic import LogisticHead

    cache = open_cache(with_views)
    X, views = cache.features("train").reshape(36, -1), _views(with_views, 3).reshape(36, 3, -1)
    calls = _spy(monkeypatch, LogisticHead)
    plain = _fit(with_views, "logistic", name="plain")
    stacked = _fit(with_views, "logistic", views=3, view_mode="stack")
    (X_plain, y_plain, val_plain, _), _ = calls[0]
    (X_stacked, y_stacked, val_stacked, y_val), _ = calls[1]
    assert np.array_equal(X_plain, X) and len(X_stacked) == 4 * 36
    assert np.array_equal(X_stacked[:36], X) and np.array_equal(X_stacked[36:72], views[:, 0])
    assert np.array_equal(X_stacked[108:], views[:, 2]) and np.array_equal(y_stacked, np.tile(y_plain, 4))
    val = cache.features("val").reshape(12, -1)
    assert np.array_equal(val_plain, val) and np.array_equal(val_stacked, val)  # selection on plain val
    assert stacked.record["views"] == {"views": 3, "view_set": stacked.record["views"]["view_set"],
                                       "augment": "crop-flip", "view_seed": 0, "mode": "stack"}
    assert plain.record["views"] is None
    assert not np.allclose(stacked.head.predict_proba(val), plain.head.predict_proba(val))
    mean = _fit(with_views, "logistic", name="mean", views=2)  # the default: the mean of the versions
    (X_mean, *_), _ = calls[2]
    assert np.allclose(X_mean, (X + views[:, 0] + views[:, 1]) / 3, atol=1e-5)
    assert mean.record["views"]["mode"] == "mean" and mean.record["views"]["views"] == 2
    from featurecache.fit.headstore import leaderboard

    labels = {row["name"]: row["views"] for row in leaderboard(cache)}
    assert labels == {"plain": "-", "logistic": "3 crop-flip (stacked)", "mean": "2 crop-flip (mean)"}


def test_mlp_draws_one_version_per_image_per_epoch(with_views, monkeypatch):
    from featurecache.heads.mlp import MLPHead

    X, views = open_cache(with_views).features("train").reshape(36, -1), _views(with_views, 3).reshape(36, 3, -1)
    seen = []
    original = MLPHead._loss

    def spy(self, network, x, y, generator):
        seen.append(x.detach().numpy().copy())
        return original(self, network, x, y, generator)

    monkeypatch.setattr(MLPHead, "_loss", spy)
    plain = _fit(with_views, "mlp", name="plain")
    plain_rows = np.concatenate(seen)
    seen.clear()
    augmented = _fit(with_views, "mlp", views=3)
    rows = np.concatenate(seen)
    versions = np.concatenate([X[:, None], views], axis=1)  # 36 x 4 x D: plain, then the views
    assert len(rows) == len(plain_rows) == 5 * 36  # one version of each image per epoch
    which = [next(v for v in range(4) if any(np.array_equal(row, versions[i, v]) for i in range(36))) for row in rows]
    counts = np.bincount(which, minlength=4)
    assert counts.min() > 0 and counts[0] < 0.5 * len(rows), counts  # plain and every view, drawn
    for epoch in range(5):  # each image once per epoch
        block = rows[epoch * 36 : (epoch + 1) * 36]
        owners = sorted(next(i for i in range(36) if any(np.array_equal(r, versions[i, v]) for v in range(4)))
                        for r in block)
        assert owners == list(range(36))
    val = open_cache(with_views).features("val").reshape(12, -1)
    assert not np.allclose(augmented.head.predict_proba(val), plain.head.predict_proba(val))
    assert augmented.record["views"]["mode"] == "sample"


def test_views_of_validation_rows_never_reach_training(with_views, monkeypatch):
    """With validation carved from train, poisoning the views of the carved rows changes nothing;
    poisoning the views of training rows does: views are looked up by training row."""
    from featurecache.fit import views as fit_views
    from featurecache.fit.carve import carve

    _, val_rows = carve(open_cache(with_views), 0.25, 0)  # the rows fit-head carves: by path
    original = fit_views.load_views

    def poisoned(rows):
        def load(*args):
            values = original(*args).copy()
            values[rows] = 1e4
            return values
        return load

    reference = _fit(with_views, "mlp", views=3, val_fraction=0.25)
    monkeypatch.setattr(fit_views, "load_views", poisoned(val_rows))
    same = _fit(with_views, "mlp", views=3, val_fraction=0.25)
    assert set(reference.record["metrics"]) == {"val (from train)", "test"}
    for split in reference.record["metrics"]:
        assert same.record["metrics"][split] == reference.record["metrics"][split], split
    val = open_cache(with_views).features("test").reshape(12, -1)
    assert np.array_equal(same.head.predict_proba(val), reference.head.predict_proba(val))
    train_rows = np.setdiff1d(np.arange(36), val_rows)[:5]
    monkeypatch.setattr(fit_views, "load_views", poisoned(train_rows))
    changed = _fit(with_views, "mlp", views=3, val_fraction=0.25)
    assert not np.array_equal(changed.head.predict_proba(val), reference.head.predict_proba(val))


def test_knn_keeps_plain_features(with_views):
    plain = _fit(with_views, "knn", name="plain")
    with_set = _fit(with_views, "knn", views=3)
    val = open_cache(with_views).features("test").reshape(12, -1)
    assert np.array_equal(plain.head.predict_proba(val), with_set.head.predict_proba(val))
    assert with_set.record["views"]["views"] == 0


def test_feature_space_augmentation_changes_the_mlp(with_views):
    val = open_cache(with_views).features("test").reshape(12, -1)
    plain = _fit(with_views, "mlp", name="plain").head.predict_proba(val)
    for params in ({"feature_noise": 0.5}, {"feature_mixup": 0.4}):
        head = _fit(with_views, "mlp", name="aug", params=params).head
        assert not np.allclose(head.predict_proba(val), plain), params
        assert head.get_params()[next(iter(params))] == next(iter(params.values()))


@pytest.mark.parametrize("args, words", [
    (["--views", "x"], "--views"), (["--views", "0"], "--views"), (["--views", "9"], "holds 3 complete views"),
    (["--views", "2", "--view-set", "flip"], "no view set"), (["--views", "2", "--view-mode", "median"], "view mode"),
    (["--head", "mlp", "--param", "feature_noise=-1"], "feature_noise"),
])
def test_bad_fit_views_is_one_error_line(with_views, args, words):
    code, line = _invoke(["fit-head", str(with_views), "--name", "bad", *args])
    assert code == 2 and words in line, line
