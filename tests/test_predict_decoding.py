"""predict on image files decodes them as the entry's extract did: its `--draft` (libjpeg draft
scale), its `--decode torch` (torchvision decode and tensor resize), per member of a vote across
entries; export records both; a folder is listed as extract lists one.

JPEGs of 160x120 at a 32 px image size (resize 36): draft decodes them at 1/2 scale, so the
features differ from a full decode (the reviewer measured 0.02 in probability at 480x360).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from featurecache.backbones.preprocess import prepare_image
from featurecache.cache.store import open_cache
from featurecache.data.images import load_rgb
from featurecache.extract.stage import ExtractSpec, extract
from featurecache.fit.stage import FitSpec, fit_head, make_ensemble
from featurecache.serve.export import METADATA_FILE, export_model
from featurecache.serve.predict import load_predictor, predict, predict_split

pytestmark = pytest.mark.usefixtures("one_torch_thread")
COLOURS = {"red": (200, 60, 50), "green": (60, 180, 70), "blue": (50, 70, 200)}


def _folder(root):
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:120, 0:160]
    for split, count in (("train", 4), ("test", 2)):
        for c, (label, colour) in enumerate(COLOURS.items()):
            for i in range(count):
                stripes = 60 * np.sin(xs / (3 + i + c)) * np.cos(ys / (2 + c))  # detail a draft decode loses
                pixels = np.asarray(colour)[None, None] + stripes[..., None] + rng.normal(0, 20, (120, 160, 3))
                path = root / split / label / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=92)
    return root


@pytest.fixture(scope="module")
def entries(tmp_path_factory):
    base = tmp_path_factory.mktemp("decoding")
    folder = _folder(base / "photos")
    made = {}
    settings = dict(model="resnet18", weights="random", image_size=32, precision="fp32", dtype="float32",
                    batch_size=8, workers=0, root=str(base / "cache"))
    for name, options in (("draft", {"draft": True}), ("torch", {"decode": "torch"})):
        made[name] = open_cache(extract(ExtractSpec(source=str(folder), **settings, **options)).path)
    # A list of paths from Python, read through PIL without draft. Extract recorded --draft for it
    # all the same until 551fce2; entries made then keep the record (here put back in memory).
    pairs = [(str(path), path.parent.name, path.parts[-3]) for path in sorted(folder.rglob("*.jpg"))]
    made["paths"] = open_cache(extract(source=pairs, name="paths", **settings).path)
    made["paths"].manifest["config"]["preprocessing"]["jpeg_draft"] = True
    for cache in made.values():
        fit_head(cache, FitSpec(head="logistic"))
    make_ensemble(made["draft"], ["logistic", (made["torch"].path.name, "logistic")], name="vote", weights=[1.0, 3.0])
    return made, folder


def _probabilities(results, classes):
    assert not any(r.error for r in results), [r.error for r in results]
    return np.array([[dict(r.top)[name] for name in classes] for r in results])


@pytest.mark.parametrize("kind", ["draft", "torch", "paths"])
def test_predict_on_files_computes_the_cached_features_of_the_same_files(entries, kind):
    made, folder = entries
    cache = made[kind]
    assert cache.manifest["config"]["preprocessing"].get("jpeg_draft", False) == (kind != "torch")
    files = [folder / p for p in cache.paths("test")]
    predictor = load_predictor(cache, "logistic")
    features = predictor.features(torch.stack([predictor.prepare_file(f) for f in files])).numpy()
    cached = cache.features("test")
    scale = np.abs(cached).max(axis=1, keepdims=True)
    assert (np.abs(features - cached) <= 1e-5 * scale).all()  # float32 noise (BatchNorm folded at extract)
    got = _probabilities(predict(predictor, files, top_k=3), cache.classes)
    expected = _probabilities(predict_split(cache, "logistic", "test", top_k=3), cache.classes)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_a_vote_across_entries_decodes_each_members_files_as_its_entry_did(entries):
    made, folder = entries
    cache = made["draft"]
    files = [folder / p for p in cache.paths("test")]
    got = _probabilities(predict(load_predictor(cache, "vote"), files, top_k=3), cache.classes)
    expected = _probabilities(predict_split(cache, "vote", "test", top_k=3), cache.classes)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_export_records_how_the_files_were_decoded(entries, tmp_path):
    made, folder = entries
    files = [folder / p for p in made["draft"].paths("test")]
    metadata = {}
    for kind, cache in ((kind, made[kind]) for kind in ("draft", "torch")):
        extra = {METADATA_FILE: ""}
        model = torch.jit.load(str(export_model(load_predictor(cache, "logistic"), tmp_path / f"{kind}.pt")),
                               _extra_files=extra)
        metadata[kind] = json.loads(extra[METADATA_FILE])["preprocessing"]
    assert metadata["draft"]["jpeg_draft"] is True and metadata["draft"]["decode"] == "pil"
    assert metadata["torch"]["jpeg_draft"] is False and metadata["torch"]["decode"] == "torch"
    assert "torchvision" in metadata["torch"]["decoding"]
    # Following the record reproduces predict: PIL with the recorded draft size.
    predictor = load_predictor(made["draft"], "logistic")
    draft_size = tuple(metadata["draft"]["draft_size"])
    images = torch.stack([prepare_image(load_rgb(f, draft_size=draft_size), predictor.preprocessing) for f in files])
    with torch.no_grad():
        exported = torch.jit.load(str(tmp_path / "draft.pt"))(images).numpy()
    expected = _probabilities(predict_split(made["draft"], "logistic", "test", top_k=3), made["draft"].classes)
    np.testing.assert_allclose(exported, expected, rtol=0, atol=1e-5)


def test_a_folder_is_listed_as_extract_lists_one_and_a_broken_link_is_reported(entries, tmp_path):
    made, folder = entries
    predictor = load_predictor(made["torch"], "logistic")
    target = tmp_path / "new"
    for name in ("a.jpg", "sub/b.jpg", ".ipynb_checkpoints/a-checkpoint.jpg", ".hidden.jpg"):
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes((folder / "test" / "red" / "0.jpg").read_bytes())
    os.symlink(tmp_path / "gone.jpg", target / "gone.jpg")
    results = predict(predictor, [target], top_k=1)
    assert [r.path for r in results] == [str(target / name) for name in ("a.jpg", "gone.jpg", "sub/b.jpg")]
    assert results[1].top == [] and results[1].error.startswith("unreadable: ")
    assert not results[0].error and not results[2].error


def _subclasses(cls):
    return {cls} | {sub for direct in cls.__subclasses__() for sub in _subclasses(direct)}


def test_the_sources_predict_drafts_for_are_the_ones_extract_drafts(tmp_path):
    """extract drafts a FileSource's files only; predict tells them by the manifest's source kind,
    so every FileSource kind must be in FILE_SOURCE_KINDS and no other kind."""
    import replicas
    from helpers import write_photo_folder

    from featurecache.data import csv_source, named  # noqa: F401  every FileSource subclass defined
    from featurecache.data.python_objects import from_python
    from featurecache.data.sources import FileSource, open_source
    from featurecache.serve.predict import FILE_SOURCE_KINDS

    folder = write_photo_folder(tmp_path / "photos")
    listing = tmp_path / "photos" / "listing.csv"
    listing.write_text("path,label,split\n" + "".join(f"{p.relative_to(folder).as_posix()},{p.parent.name},train\n"
                                                      for p in sorted(folder.rglob("*.png"))))
    replicas.tiny_imagenet(tmp_path / "tiny")
    replicas.food101(tmp_path / "food")
    sources = [open_source(str(folder)), open_source(str(listing)), open_source(f"tinyimagenet:{tmp_path / 'tiny'}"),
               open_source(f"food101:{tmp_path / 'food'}"),
               from_python([(str(p), p.parent.name) for p in sorted(folder.rglob("*.png"))]),
               from_python((np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 1])))]
    assert {type(s).__name__ for s in sources if isinstance(s, FileSource)} == {
        cls.__name__ for cls in _subclasses(FileSource) if cls is not FileSource}  # a new kind joins this test
    for source in sources:
        assert (source.kind in FILE_SOURCE_KINDS) == isinstance(source, FileSource), source.kind
    assert FILE_SOURCE_KINDS == {s.kind for s in sources if isinstance(s, FileSource)}


def test_a_from_cache_finetune_predicts_on_files_decoded_as_its_activations_were(entries):
    """A --from-cache run trains on the entry's cached activations (here decoded with --draft), yet
    its predictor decoded files at full size with PIL; a run on images decodes as it trained (PIL)."""
    from featurecache.finetune.stage import FinetuneSpec, finetune, load_finetuned_predictor

    made, folder = entries
    cache = open_cache(extract(ExtractSpec(source=str(folder), model="resnet18", weights="random", image_size=32,
                                           precision="fp32", dtype="float32", batch_size=8, workers=0, draft=True,
                                           taps=("pool", "layer3"), root=str(made["draft"].path.parent))).path)
    fit_head(cache, FitSpec(head="logistic"))
    files = [folder / p for p in cache.paths("test")]
    entry_predictor = load_predictor(cache, "logistic")
    base = dict(epochs=1, batch_size=8, workers=0, precision="fp32", device="cpu", hflip=False, head="logistic")
    for from_cache in (True, False):
        name = f"run-{from_cache}"
        finetune(cache, FinetuneSpec(name=name, from_cache=from_cache, **base))
        predictor = load_finetuned_predictor(cache, name)
        expected = (entry_predictor.prepare_file if from_cache
                    else lambda f: predictor.prepare(load_rgb(f)))  # the image path trained on PIL, full size
        for file in files:
            assert torch.equal(predictor.prepare_file(file), expected(file)), (from_cache, file)
        assert (predictor.draft_size is not None) == from_cache
