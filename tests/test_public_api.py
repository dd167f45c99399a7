"""The public API (layout issue, item 6): a notebook drives every stage through `featurecache.*`."""

from __future__ import annotations

import importlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import featurecache as fc

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_every_public_name_is_the_object_its_stage_defines():
    definitions = {
        "extract": ("extract.stage", "extract"), "finetune": ("finetune.stage", "finetune"),
        "fit_head": ("fit.stage", "fit_head"), "make_ensemble": ("fit.stage", "make_ensemble"),
        "predict": ("serve.predict", "predict"), "load_predictor": ("serve.predict", "load_predictor"),
        "export": ("serve.export", "export_model"), "export_features": ("serve.export_features", "export_features"),
        "verify": ("maintain.verify", "verify_entry"), "repair": ("maintain.verify", "repair_entry"),
        "build_report": ("report.page", "build_report"), "run_pipeline": ("pipeline.runner", "run_pipeline"),
        "open_cache": ("cache.store", "open_cache"),
    }
    for name, (module, attribute) in definitions.items():
        assert name in fc.__all__
        assert getattr(fc, name) is getattr(importlib.import_module(f"featurecache.{module}"), attribute), name
    for name in fc.__all__:
        assert getattr(fc, name) is not None
    with pytest.raises(AttributeError):
        fc.no_such_name  # noqa: B018


def test_stage_packages_named_like_their_functions_do_not_replace_them():
    # In a fresh interpreter, import the packages first, as `from featurecache.finetune import ...` does.
    code = ("from featurecache.extract import ExtractSpec; from featurecache.finetune import FinetuneSpec; "
            "import featurecache, types; "
            "print(isinstance(featurecache.extract, types.FunctionType), "
            "isinstance(featurecache.finetune, types.FunctionType))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]


def test_a_notebook_runs_every_stage_from_the_top_level(image_folder, tiny_spec, tmp_path):
    cache = fc.open_cache(fc.extract(tiny_spec(image_folder, taps=("layer3", "pool"))).path)
    fc.fit_head(cache, fc.FitSpec(head="logistic"))
    fc.fit_head(cache, fc.FitSpec(head="knn", params={"k": 3}))
    ensemble = fc.make_ensemble(cache, ["logistic", "knn"], name="both")
    assert [row["name"] for row in fc.leaderboard(cache)] and ensemble.name == "both"

    # Predicting the val images from their files gives the head's probabilities on the cached rows.
    head, _record = fc.load_head(cache, "logistic")
    files = [image_folder / path for path in cache.paths("val")]
    cached = head.predict_proba(cache.features("val"))
    predicted = fc.predict(fc.load_predictor(cache, "logistic"), files, top_k=2)
    order = {name: i for i, name in enumerate(cache.classes)}
    for row, prediction in zip(cached, predicted):
        for name, probability in prediction.top:
            assert probability == pytest.approx(row[order[name]], abs=1e-4)

    model = torch.jit.load(str(fc.export(fc.load_predictor(cache, "logistic"), tmp_path / "model.pt")))
    assert isinstance(model, torch.jit.ScriptModule)
    exported = fc.export_features(cache, tmp_path / "features", format="npy")
    assert np.array_equal(np.load(exported / "val" / "features.npy"), cache.features("val"))

    run = fc.finetune(cache, fc.FinetuneSpec(head="logistic", unfreeze="layer4", epochs=1, from_cache=True,
                                             batch_size=5, workers=0))
    assert run.path.is_dir()
    assert fc.verify(cache.path).ok
    report = fc.build_report(cache, fc.ReportSpec(output=str(tmp_path / "report.html"), worst=0))
    assert "logistic" in report.path.read_text()
