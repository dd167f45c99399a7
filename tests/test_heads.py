import functools
import json
import re
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression

from featurecache.errors import HeadError, MismatchError, UsageError
from featurecache.heads.registry import (
    EnsembleHead,
    Head,
    KNNHead,
    available_heads,
    head_from_saved,
    make_head,
    register_head,
    unregister_head,
)

N_CLASSES, N_FEATURES = 4, 64

# Quick settings for every kind of head that can be saved and exported.
FAST = {
    "logistic": ("logistic", {"C": 1.0}),
    "logistic-sweep": ("logistic", {}),
    "mlp": ("mlp", {"hidden_sizes": (32,), "epochs": 15, "lr": [3e-3], "weight_decay": 1e-4}),
    "knn": ("knn", {}),
    "knn-uniform": ("knn", {"k": 5, "weighting": "uniform"}),
    "linear-svc": ("sklearn:svm.LinearSVC", {}),
    "sklearn-logistic": ("sklearn:linear_model.LogisticRegression", {}),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tensors here are tiny; on a shared 2-core machine thread hand-offs cost more than they save.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blobs(n: int, seed: int, n_classes: int = N_CLASSES, dtype=np.float32):
    """Gaussian clusters, separable enough for ~95% accuracy, non-negative like ReLU features."""
    centers = np.random.default_rng(1).normal(size=(n_classes, N_FEATURES)) * 0.6 + 2.0
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    return (centers[labels] + rng.normal(size=(n, N_FEATURES))).astype(dtype), labels


TRAIN, VAL, TEST = blobs(400, 10), blobs(100, 11), blobs(200, 12)


@functools.cache
def fitted(key: str) -> Head:
    name, params = FAST[key]
    return make_head(name, **params).fit(*TRAIN, *VAL)


def roundtrip(head: Head, tmp_path) -> Head:
    """Save like the caller does (safetensors + head.json) and load back."""
    save_file(head.to_tensors(), tmp_path / "head.safetensors")
    (tmp_path / "head.json").write_text(json.dumps(head.to_config()))
    config = json.loads((tmp_path / "head.json").read_text())
    return head_from_saved(config, load_file(tmp_path / "head.safetensors"))


@pytest.mark.parametrize("key", list(FAST))
def test_head_beats_chance_and_follows_the_contract(key):
    head = fitted(key)
    assert head.score(*TEST) > 0.85  # chance is 0.25
    probabilities = head.predict_proba(TEST[0])
    assert probabilities.shape == (len(TEST[0]), N_CLASSES)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(head.predict(TEST[0]), probabilities.argmax(axis=1))
    np.testing.assert_array_equal(head.classes_, np.arange(N_CLASSES))
    assert head.n_features_in_ == N_FEATURES
    assert clone(head).get_params() == head.get_params()


@pytest.mark.parametrize("key", list(FAST))
def test_saved_head_predicts_identically(key, tmp_path):
    head = fitted(key)
    loaded = roundtrip(head, tmp_path)
    np.testing.assert_array_equal(loaded.predict_proba(TEST[0]), head.predict_proba(TEST[0]))
    assert loaded.to_config() == json.loads(json.dumps(head.to_config()))


@pytest.mark.parametrize("key", list(FAST))
def test_module_matches_predict_proba_and_scripts(key):
    head = fitted(key)
    features = torch.from_numpy(TEST[0])
    expected = head.predict_proba(TEST[0])
    module = head.as_module()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still works
        np.testing.assert_allclose(module(features).numpy(), expected, atol=1e-5)
        np.testing.assert_allclose(torch.jit.script(module)(features).numpy(), expected, atol=1e-5)
        traced = torch.jit.trace(module, features[:8])
        np.testing.assert_allclose(traced(features).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("key", ["logistic", "mlp"])
def test_logits_module_softmax_is_predict_proba(key):
    head = fitted(key)
    with torch.no_grad():
        logits = head.as_logits_module()(torch.from_numpy(TEST[0]))
    probabilities = torch.softmax(logits, dim=1).numpy()
    np.testing.assert_allclose(probabilities, head.predict_proba(TEST[0]), atol=1e-5)


@pytest.mark.parametrize("C", [0.05, 1.0])
def test_logistic_agrees_with_sklearn(C):
    features, labels = load_digits(return_X_y=True)
    train, test = slice(0, 1200), slice(1200, None)
    mean, std = features[train].mean(axis=0), np.maximum(features[train].std(axis=0), 1e-6)
    standardized = (features - mean) / std
    reference = LogisticRegression(C=C, max_iter=2000).fit(standardized[train], labels[train])
    head = make_head("logistic", C=C, device="cpu")
    head.fit(features[train].astype(np.float32), labels[train])
    reference_accuracy = reference.score(standardized[test], labels[test])
    assert abs(head.score(features[test], labels[test]) - reference_accuracy) <= 0.01
    assert head.best_params_ == {"C": C}


def _few_noisy_samples(seed: int = 0):
    """90 training rows of 120 features, 3 unbalanced classes (60/30/10%, so that the unpenalised
    bias matters), 15% of labels flipped: C changes the answer."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, 120)) * 0.3
    y = rng.choice(3, size=90, p=[0.6, 0.3, 0.1])
    X = (centers[y] + rng.normal(size=(90, 120))).astype(np.float32)
    flipped = rng.random(90) < 0.15
    y[flipped] = rng.integers(0, 3, flipped.sum())
    X_test = (centers[rng.integers(0, 3, 200)] + rng.normal(size=(200, 120))).astype(np.float32)
    return X, y, X_test


# Largest difference in predicted probability from the optimum (scikit-learn run to
# convergence), measured on the data above (2026-12-01), over C = 1e-3 .. 10: the head run
# to convergence 1.4e-3 (float32 features against sklearn's float64); the torch path
# (float32 L-BFGS, used on GPUs) 1.4e-3. At their default tolerances both stop early at
# weak regularisation, by about the same amount: at C = 1e-3 .. 10 the head stops
# 0.0000, 0.0001, 0.0015, 0.0097, 0.0653 from the optimum, scikit-learn 0.0000, 0.0001,
# 0.0010, 0.0141, 0.0689 (2026-12-02, the solver with the bias solved inside). A default
# fit counts as close if it is within 1.1x scikit-learn's distance or within the bound
# the converged head itself is held to. Neighbouring Cs differ by 0.18 to 0.42.
CONVERGED_BOUND, TORCH_BOUND = 2e-3, 3e-3


def test_logistic_follows_C_like_sklearn():
    X, y, X_test = _few_noisy_samples()
    mean, std = X.mean(axis=0, dtype=np.float64), np.maximum(X.std(axis=0, dtype=np.float64), 1e-6)
    train, test = (X - mean) / std, (X_test - mean) / std
    previous = None
    for C in (1e-3, 1e-2, 1e-1, 1.0, 10.0):
        optimum = LogisticRegression(C=C, tol=1e-12, max_iter=100_000).fit(train, y).predict_proba(test)
        tight = make_head("logistic", C=C, device="cpu", tol=1e-6, max_iter=2000).fit(X, y)
        assert np.abs(tight.predict_proba(X_test) - optimum).max() < CONVERGED_BOUND, C
        # At the defaults, as close to the optimum as scikit-learn at its defaults.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn's ConvergenceWarning at its default max_iter
            default = LogisticRegression(C=C).fit(train, y).predict_proba(test)
        head = make_head("logistic", C=C, device="cpu").fit(X, y)
        distance = np.abs(head.predict_proba(X_test) - optimum).max()
        assert distance <= max(1.1 * np.abs(default - optimum).max(), CONVERGED_BOUND), C
        if previous is not None:  # the data is such that C matters
            assert np.abs(optimum - previous).max() > 0.1
        previous = optimum


@pytest.mark.parametrize("C", [1e-3, 1e-1, 10.0])
def test_torch_logistic_path_reaches_sklearns_optimum(C):
    """The path solver used on GPUs, run here on CPU tensors."""
    from featurecache.heads.logistic_path import fit_logistic_path

    X, y, X_test = _few_noisy_samples()
    mean, std = X.mean(axis=0, dtype=np.float64), np.maximum(X.std(axis=0, dtype=np.float64), 1e-6)
    train, test = ((X - mean) / std).astype(np.float32), ((X_test - mean) / std).astype(np.float32)
    converged = LogisticRegression(C=C, tol=1e-12, max_iter=100_000).fit(train, y).predict_proba(test)
    weights, biases = fit_logistic_path(torch.from_numpy(train), torch.from_numpy(y), 3, [C],
                                        max_iter=1000, tol=1e-6)
    probabilities = torch.softmax(torch.from_numpy(test) @ weights[0].T + biases[0], dim=1).numpy()
    assert np.abs(probabilities - converged).max() < TORCH_BOUND


def test_logistic_sweep_chooses_on_validation_and_refits():
    head = fitted("logistic-sweep")
    assert len(head.sweep_) >= 10
    fitted_entries = [entry for entry in head.sweep_ if entry["fitted"]]
    best = max(fitted_entries, key=lambda entry: (entry["val_top1"], -entry["val_log_loss"]))
    assert head.best_params_ == {"C": best["C"]}
    # Early stopping only skips Cs weaker than the best one.
    assert all(entry["C"] > best["C"] for entry in head.sweep_ if not entry["fitted"])
    full = make_head("logistic", patience=None, device="cpu").fit(*TRAIN, *VAL)
    assert all(entry["fitted"] for entry in full.sweep_)
    refit = make_head("logistic", Cs=[0.01, 0.1, 1.0], refit=True).fit(*TRAIN, *VAL)
    assert refit.best_params_["C"] in (0.01, 0.1, 1.0)
    assert refit.score(*TEST) > 0.85
    with pytest.raises(HeadError, match="logistic sweep needs validation data"):
        make_head("logistic").fit(*TRAIN)


def test_other_grids_need_validation_data():
    with pytest.raises(HeadError, match="validation"):
        make_head("knn").fit(*TRAIN)
    with pytest.raises(HeadError, match="validation"):
        make_head("mlp", epochs=1).fit(*TRAIN)


def test_mlp_is_seeded_deterministic_and_records_history():
    params = {"hidden_sizes": (16,), "epochs": 30, "lr": 3e-3, "weight_decay": 1e-4, "patience": 3}
    first = make_head("mlp", **params).fit(*TRAIN, *VAL)
    second = make_head("mlp", **params).fit(*TRAIN, *VAL)
    np.testing.assert_array_equal(first.predict_proba(TEST[0]), second.predict_proba(TEST[0]))
    assert {"train_loss", "val_loss", "val_top1"} <= set(first.history_[0])
    assert 1 <= first.best_params_["epoch"] <= len(first.history_) <= 30
    grid = make_head("mlp", hidden_sizes=(16,), epochs=3, lr=[1e-3, 3e-3],
                     weight_decay=[1e-4, 1e-2])
    assert len(grid.fit(*TRAIN, *VAL).sweep_) == 4


def test_knn_chooses_k_within_the_training_size():
    head = make_head("knn", k=[1, 5, 1000]).fit(TRAIN[0][:50], TRAIN[1][:50], *VAL)
    assert [entry["k"] for entry in head.sweep_] == [1, 5, 50]
    assert head.best_params_["k"] in (1, 5, 50)
    assert set(head.to_tensors()) == {"bank", "bank_labels"}


def test_float16_features_and_absent_classes():
    features, labels = TRAIN[0].astype(np.float16), TRAIN[1]
    test_features = TEST[0].astype(np.float16)
    keep = labels != 3  # class 3 never seen in training
    for name in ("logistic", "sklearn:svm.LinearSVC"):
        head = make_head(name, C=1.0, n_classes=5).fit(features[keep], labels[keep])
        probabilities = head.predict_proba(test_features)
        assert probabilities.shape == (len(TEST[0]), 5)
        with torch.no_grad():
            exported = head.as_module()(torch.from_numpy(test_features.astype(np.float32))).numpy()
        np.testing.assert_allclose(exported, probabilities, atol=1e-5)
    assert probabilities[:, 3:].max() == 0  # sklearn columns for unseen classes


def test_binary_linear_svc_exports_two_columns():
    keep = TRAIN[1] < 2
    head = make_head("sklearn:svm.LinearSVC").fit(TRAIN[0][keep], TRAIN[1][keep])
    probabilities = head.predict_proba(TEST[0])
    assert probabilities.shape == (len(TEST[0]), 2)
    with torch.no_grad():
        exported = head.as_module()(torch.from_numpy(TEST[0])).numpy()
    np.testing.assert_allclose(exported, probabilities, atol=1e-5)


def test_random_forest_fits_but_cannot_be_saved_or_exported():
    head = make_head("sklearn:ensemble.RandomForestClassifier", n_estimators=10, random_state=0)
    head.fit(*TRAIN)
    assert head.score(*TEST) > 0.6
    with pytest.raises(HeadError, match="cannot be saved safely"):
        head.to_tensors()
    with pytest.raises(HeadError, match="torch module"):
        head.as_module()


def test_ensemble_of_one_head_equals_the_head(tmp_path):
    head = fitted("logistic")
    ensemble = make_head("ensemble", heads=[head], members=["logistic"]).fit(*TRAIN)
    np.testing.assert_array_equal(ensemble.predict_proba(TEST[0]), head.predict_proba(TEST[0]))
    save_file(ensemble.to_tensors(), tmp_path / "weights.safetensors")
    config = json.loads(json.dumps(ensemble.to_config()))
    loaded = head_from_saved(config, load_file(tmp_path / "weights.safetensors"), members=[head])
    np.testing.assert_array_equal(loaded.predict_proba(TEST[0]), head.predict_proba(TEST[0]))


def test_weighted_ensemble_averages_and_exports():
    members = [fitted("logistic"), fitted("knn"), fitted("linear-svc")]
    ensemble = EnsembleHead.from_members(members, [2, 1, 1], ["a", "b", "c"])
    expected = sum(w * m.predict_proba(TEST[0]) for w, m in zip([0.5, 0.25, 0.25], members))
    np.testing.assert_allclose(ensemble.predict_proba(TEST[0]), expected, atol=1e-12)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(ensemble.as_module())
        np.testing.assert_allclose(scripted(torch.from_numpy(TEST[0])).numpy(), expected, atol=1e-5)
    with pytest.raises(HeadError, match="members"):
        head_from_saved(ensemble.to_config(), ensemble.to_tensors())


def test_mismatches_raise():
    head = fitted("logistic")
    with pytest.raises(MismatchError, match="head expects 64 features, got 32"):
        head.predict(TEST[0][:, :32])
    with pytest.raises(MismatchError, match="out of range"):
        make_head("logistic", C=1.0, n_classes=2).fit(*TRAIN)
    with pytest.raises(MismatchError):
        make_head("logistic", C=1.0).fit(TRAIN[0], TRAIN[1][:10])
    narrow = make_head("logistic", C=1.0).fit(TRAIN[0][:, :32], TRAIN[1])
    with pytest.raises(MismatchError, match="features"):
        EnsembleHead([head, narrow]).fit()
    three_classes = make_head("logistic", C=1.0).fit(TRAIN[0][TRAIN[1] < 3], TRAIN[1][TRAIN[1] < 3])
    with pytest.raises(MismatchError, match="classes"):
        EnsembleHead([head, three_classes]).fit()


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("nope", {}, "unknown head 'nope'; available: ensemble, knn, logistic, mlp"),
        ("logistic", {"lambda_": 1}, "no parameter lambda_"),
        ("logistic", {"C": -1}, "C must be"),
        ("logistic", {"C": 1e-320}, "C must be between 1e-30 and 1e+30, got 1e-320"),  # 1 / C overflowed: NaN
        ("logistic", {"Cs": [1.0, 5e-324]}, "Cs must be between 1e-30 and 1e+30, got 5e-324"),
        ("logistic", {"C": 1e308}, "C must be between 1e-30 and 1e+30, got 1e+308"),  # was a traceback
        ("mlp", {"hidden_sizes": (0,)}, "hidden_sizes"),
        ("sklearn:LinearSVC", {}, "sklearn:<module>.<Estimator>"),
        ("sklearn:nonexistent.Thing", {}, "no module 'nonexistent'"),
        ("sklearn:svm.Nope", {}, "no estimator 'Nope'"),
        ("sklearn:preprocessing.StandardScaler", {}, "not a classifier"),
        ("sklearn:svm.LinearSVC", {"bogus": 1}, "bad parameters"),
    ],
)
def test_bad_names_and_params_raise(name, params, message):
    with pytest.raises(HeadError, match=re.escape(message)):
        make_head(name, **params)


def test_registry_refuses_duplicates_and_unregisters():
    class Constant(KNNHead):
        name = "constant"

    register_head("constant", Constant)
    try:
        assert "constant" in available_heads()
        with pytest.raises(ValueError, match="already registered"):
            register_head("constant", Constant)
        assert isinstance(make_head("constant", k=1), Constant)
    finally:
        unregister_head("constant")
    assert "constant" not in available_heads()
    with pytest.raises(ValueError):
        register_head("logistic", Constant)


@pytest.mark.parametrize("key", list(FAST) + ["ensemble"])
def test_predict_before_fit_raises(key):
    if key == "ensemble":
        head = EnsembleHead([fitted("logistic")])
    else:
        name, params = FAST[key]
        head = make_head(name, **params)
    with pytest.raises((NotFittedError, HeadError)):
        head.predict(TEST[0])
    with pytest.raises((NotFittedError, HeadError)):
        head.to_tensors()


@pytest.mark.parametrize("key", list(FAST) + ["ensemble"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 1e39])  # 1e39: inf once made float32
def test_non_finite_features_are_refused_not_predicted_as_class_0(key, value):
    """Fitted on, or scoring, NaN features a head returns NaN probabilities, and predict's
    argmax calls them class 0: both ways are refused, naming the rows."""
    head = EnsembleHead([fitted("logistic"), fitted("knn")]).fit() if key == "ensemble" else fitted(key)
    bad = TEST[0].astype(np.float64)
    bad[[3, 17], 5] = value
    with pytest.raises(UsageError, match=r"^features hold NaN or inf in 2 of 200 rows \(first: row 3\)"):
        head.predict_proba(bad)
    with pytest.raises(UsageError, match="NaN or inf in 2 of 200 rows"):
        head.predict(bad)
    assert np.isfinite(head.predict_proba(TEST[0])).all()  # the check itself passes finite rows
    if key == "ensemble":
        return
    name, params = FAST[key]
    train = TRAIN[0].astype(np.float64)
    train[250, 0] = value
    with pytest.raises(UsageError, match=r"^features hold NaN or inf in 1 of 400 rows \(first: row 250\)"):
        make_head(name, **params).fit(train, TRAIN[1], *VAL)
    val = VAL[0].astype(np.float64)
    val[99, 63] = value
    with pytest.raises(UsageError, match=r"^validation features hold NaN or inf in 1 of 100 rows"):
        make_head(name, **params).fit(*TRAIN, val, VAL[1])


@pytest.mark.parametrize("n_classes", [2.5, 0, -3, "4", True])
def test_n_classes_must_be_a_positive_integer(n_classes):
    """Not a torch TypeError from deep inside, and 0 is not read as 'from the labels'."""
    with pytest.raises(HeadError, match=f"n_classes must be a positive integer, got {n_classes!r}"):
        make_head("logistic", C=1.0).fit(*TRAIN, n_classes=n_classes)
    with pytest.raises(HeadError, match="n_classes must be a positive integer"):
        make_head("logistic", C=1.0, n_classes=n_classes).fit(*TRAIN)
    assert len(make_head("logistic", C=1.0).fit(*TRAIN, n_classes=np.int64(6)).classes_) == 6


@pytest.mark.parametrize("weighting", ["uniform", "similarity"])
def test_knn_predicts_what_its_k_was_chosen_by_when_neighbours_tie(weighting, tmp_path):
    """Duplicate training rows tie in similarity; topk(k) and the first k of topk(max k)
    cut the tie differently, so the head must search as its grid did: its validation
    probabilities (in memory, saved and loaded, as a module) are the sweep's, to the bit."""
    rng = np.random.default_rng(2)
    prototypes = rng.standard_normal((4, 16)).astype(np.float32)
    X, X_val = np.repeat(prototypes, 40, axis=0), np.repeat(prototypes, 25, axis=0)
    y, y_val = rng.integers(0, 3, len(X)), rng.integers(0, 3, len(X_val))
    head = make_head("knn", k=[1, 3, 5, 20], weighting=weighting).fit(X, y, X_val, y_val)
    chosen = next(entry for entry in head.sweep_ if entry["k"] == head.best_params_["k"])
    for model in (head, roundtrip(head, tmp_path)):
        probabilities = model.predict_proba(X_val)
        assert (probabilities.argmax(axis=1) == y_val).mean() == chosen["val_top1"]
        assert -np.log(probabilities[np.arange(len(y_val)), y_val]).mean() == pytest.approx(chosen["val_log_loss"],
                                                                                          rel=1e-6)
        with torch.no_grad():
            np.testing.assert_array_equal(model.as_module()(torch.from_numpy(X_val)).numpy(), probabilities)
    assert chosen == max(head.sweep_, key=lambda entry: (entry["val_top1"], -entry["val_log_loss"]))


def test_knn_refuses_rows_without_a_direction():
    """An all-zero row has cosine 0 to every row: as a query it got a confident class, as a
    training row it outvoted real neighbours of negative similarity."""
    zero_train = TRAIN[0].copy()
    zero_train[[7, 9]] = 0
    with pytest.raises(UsageError, match=r"2 training row\(s\) have none: their features are all zero \(first: row 7\)"):
        make_head("knn", k=3).fit(zero_train, TRAIN[1])
    queries = TEST[0].copy()
    queries[4] = 0
    head = fitted("knn")
    with pytest.raises(UsageError, match=r"1 query row\(s\) have none.*\(first: row 4\)"):
        head.predict_proba(queries)
    # a module (what export traces and predict runs) cannot raise per row: NaN marks the row
    module = head.as_module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's deprecation notice
        traced = torch.jit.trace(module, torch.from_numpy(queries[:6]))
    kept = np.delete(queries, 4, axis=0)
    with torch.no_grad():
        for run in (module, traced):
            out = run(torch.from_numpy(queries)).numpy()
            assert np.isnan(out[4]).all() and not np.isnan(np.delete(out, 4, axis=0)).any()
            np.testing.assert_allclose(np.delete(out, 4, axis=0), head.predict_proba(kept), atol=1e-6)


def test_a_saved_knn_head_with_k_beyond_its_bank_is_refused(tmp_path):
    head = make_head("knn", k=3).fit(TRAIN[0][:5], TRAIN[1][:5])
    save_file(head.to_tensors(), tmp_path / "head.safetensors")
    for field, value, message in (("best_params_", {"k": 9}, "exceeds its bank of 5 rows"),
                                  ("search_k_", 2, "search_k_ 2 is not an integer of at least k"),
                                  ("search_k_", 6, "exceeds its bank of 5 rows")):
        config = {**head.to_config(), field: value}
        if field == "best_params_":
            config["search_k_"] = None
        with pytest.raises(MismatchError, match=message):
            head_from_saved(config, load_file(tmp_path / "head.safetensors"))


def test_an_estimator_whose_state_does_not_survive_saving_is_an_error_not_a_traceback(tmp_path):
    """QuadraticDiscriminantAnalysis keeps lists of arrays, which come back as nested lists:
    a loaded one that cannot predict says so in a HeadError, not numpy's TypeError."""
    name = "sklearn:discriminant_analysis.QuadraticDiscriminantAnalysis"
    head = make_head(name, reg_param=0.1).fit(*TRAIN)
    assert np.isfinite(head.predict_proba(TEST[0])).all()
    with pytest.raises(HeadError, match="cannot predict .*TypeError.*fit it again"):
        roundtrip(head, tmp_path).predict_proba(TEST[0])


@pytest.mark.parametrize("weights", [{"a": 1}, [True, False], [1, "2"], [1.0, -1.0], [0, 0], [1.0, float("nan")], [1.0],
                                     [1.0, float("inf")]])
def test_ensemble_weights_must_be_non_negative_numbers(weights):
    """A dict gave numpy's TypeError, and booleans passed as 1 and 0."""
    with pytest.raises(HeadError, match="ensemble weights must be 2 non-negative numbers, not all zero; got"):
        EnsembleHead([fitted("logistic"), fitted("knn")], weights).fit()
    np.testing.assert_allclose(EnsembleHead([fitted("logistic"), fitted("knn")], [3, np.float32(1.0)]).fit()
                               .predict_proba(TEST[0]),
                               0.75 * fitted("logistic").predict_proba(TEST[0]) + 0.25 * fitted("knn").predict_proba(TEST[0]),
                               atol=1e-7)


def test_huge_ensemble_weights_are_relative_weights():
    """1e308 twice summed to inf: a NumPy overflow warning, then a refusal that said the weights
    were not non-negative numbers."""
    import warnings

    from featurecache.heads.ensemble import normalized_weights

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(normalized_weights([1e308, 1e308], 2), [0.5, 0.5])
        np.testing.assert_allclose(normalized_weights([1e308, 1e307], 2), [1 / 1.1, 0.1 / 1.1])


def test_scikit_learn_heads_compute_in_float64():
    """GaussianNB on standardised float32 features: its joint log-likelihood (about -1e18 on sparse
    columns) cancelled, and its 'probabilities' summed to 5; an ensemble scored them."""
    from sklearn.naive_bayes import GaussianNB

    rng = np.random.default_rng(0)
    y = np.arange(50) % 5
    X = np.maximum(rng.normal(0, 1, (50, 512)) + y[:, None] * 0.1, 0)
    X[:, :100] = (rng.random((50, 100)) < 0.05) * rng.random((50, 100)) * 5  # sparse columns
    test = np.maximum(rng.normal(0, 1, (30, 512)), 0)
    test[:, :100] = (rng.random((30, 100)) < 0.05) * 5
    X, test = X.astype(np.float32), test.astype(np.float32)  # as the cache holds them
    mean, scale = X.mean(0), X.std(0) + 1e-6
    in_float32 = GaussianNB().fit((X - mean) / scale, y).predict_proba((test - mean) / scale)
    assert np.abs(in_float32.sum(1) - 1).max() > 1  # the data bites: float32 breaks here
    head = make_head("sklearn:naive_bayes.GaussianNB").fit(X, y, n_classes=5)
    np.testing.assert_allclose(head.predict_proba(test).sum(1), 1.0, atol=1e-6)


def test_scikit_learns_warnings_are_one_line_each_and_the_probe_keeps_quiet(caplog):
    """A ConvergenceWarning printed a dozen lines (links, a source line) on stderr, twice."""
    import logging
    import warnings

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 8)).astype(np.float32), np.arange(60) % 3
    head = make_head("sklearn:linear_model.LogisticRegression", max_iter=1)
    with warnings.catch_warnings(record=True) as escaped, caplog.at_level(logging.WARNING, "featurecache"):
        warnings.simplefilter("always")
        head.check_saveable(X, y, 3)
        assert caplog.messages == []  # the probe's warnings are the real fit's to give
        head.fit(X, y, n_classes=3)
    assert [w for w in escaped if "converge" in str(w.message)] == []
    assert caplog.messages == ["sklearn:linear_model.LogisticRegression: ConvergenceWarning: lbfgs failed to converge "
                               "after 1 iteration(s) (status=1): STOP: TOTAL NO. OF ITERATIONS REACHED LIMIT"]


def test_a_knn_k_beyond_the_training_rows_is_said(caplog):
    """k=1000 on 50 rows silently became k=50: a vote of every training row."""
    import logging

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(50, 8)).astype(np.float32), np.arange(50) % 2
    with caplog.at_level(logging.WARNING, "featurecache"):
        head = make_head("knn", k=[5, 1000, 2000]).fit(X, y, X[:10], y[:10], n_classes=2)
    assert caplog.messages == ["knn: k=1000, 2000 exceeds the 50 training rows; k=50 (every row) is used instead"]
    assert head.best_params_["k"] in (5, 50)
    caplog.clear()
    with caplog.at_level(logging.WARNING, "featurecache"):
        make_head("knn", k=[5, 50]).fit(X, y, X[:10], y[:10], n_classes=2)
    assert caplog.messages == []


def test_deprecation_warnings_stay_hidden_and_a_failed_fit_still_says_its_warnings(caplog, monkeypatch):
    import logging
    import warnings

    from sklearn.linear_model import LogisticRegression

    def noisy_fit(self, X, y):
        warnings.warn("internal API moved", DeprecationWarning)
        warnings.warn("this will change", FutureWarning)
        raise ValueError("could not fit")

    monkeypatch.setattr(LogisticRegression, "fit", noisy_fit)
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(30, 4)).astype(np.float32), np.arange(30) % 3
    with caplog.at_level(logging.WARNING, "featurecache"), pytest.raises(HeadError, match="could not fit"):
        make_head("sklearn:linear_model.LogisticRegression").fit(X, y, n_classes=3)
    assert caplog.messages == ["sklearn:linear_model.LogisticRegression: FutureWarning: this will change"]
