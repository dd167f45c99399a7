"""The CPU logistic solver (NumPy L-BFGS) and the subsample-selected sweep.

Exactness first: at a given C the solver must reach scikit-learn's optimum, whatever
was done to choose C; speed comes from choosing C cheaply, never from stopping early.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from featurecache.heads.registry import make_head
from featurecache.heads.lbfgs import lbfgs
from featurecache.heads.logistic_path import fit_logistic_path, fit_logistic_path_cpu

FEATURES, LABELS = load_digits(return_X_y=True)
MEAN, STD = FEATURES[:1200].mean(axis=0), np.maximum(FEATURES[:1200].std(axis=0), 1e-6)
STANDARDIZED = ((FEATURES - MEAN) / STD).astype(np.float32)


def _probabilities(weight: torch.Tensor, bias: torch.Tensor, X: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(X) @ weight.T + bias, dim=1).numpy()


def _reference(C: float) -> LogisticRegression:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(STANDARDIZED[:1200].astype(np.float64),
                                                                      LABELS[:1200])


@pytest.mark.parametrize("C", [0.001, 0.1, 10.0])
def test_cpu_path_reaches_sklearns_optimum_at_each_C(C):
    weights, biases = fit_logistic_path_cpu(STANDARDIZED[:1200], LABELS[:1200], 10, [C], max_iter=2000, tol=1e-6)
    ours = _probabilities(weights[0], biases[0], STANDARDIZED[1200:])
    reference = _reference(C).predict_proba(STANDARDIZED[1200:])
    assert np.abs(ours - reference).max() < {0.001: 1e-4, 0.1: 1e-3, 10.0: 2e-2}[C]


def test_warm_started_path_matches_independent_solves():
    Cs = [0.01, 0.1, 1.0]
    path_w, path_b = fit_logistic_path_cpu(STANDARDIZED[:1200], LABELS[:1200], 10, Cs, max_iter=2000, tol=1e-6)
    for index, C in enumerate(Cs):
        alone_w, alone_b = fit_logistic_path_cpu(STANDARDIZED[:1200], LABELS[:1200], 10, [C], max_iter=2000, tol=1e-6)
        # both stop at the same gradient tolerance; weaker penalties leave flatter optima
        np.testing.assert_allclose(_probabilities(path_w[index], path_b[index], STANDARDIZED[1200:]),
                                   _probabilities(alone_w[0], alone_b[0], STANDARDIZED[1200:]),
                                   atol={0.01: 1e-4, 0.1: 1e-3, 1.0: 1e-2}[C])


def test_torch_path_agrees_with_the_cpu_path_on_cpu_tensors():
    """The GPU solver, run here on CPU tensors: same optimum as the NumPy one."""
    X, y = torch.from_numpy(STANDARDIZED[:600]), torch.from_numpy(LABELS[:600])
    torch_w, torch_b = fit_logistic_path(X, y, 10, [0.05], max_iter=500, tol=1e-6)
    numpy_w, numpy_b = fit_logistic_path_cpu(STANDARDIZED[:600], LABELS[:600], 10, [0.05], max_iter=500, tol=1e-6)
    np.testing.assert_allclose(_probabilities(torch_w[0], torch_b[0], STANDARDIZED[1200:]),
                               _probabilities(numpy_w[0], numpy_b[0], STANDARDIZED[1200:]), atol=3e-3)


def test_lbfgs_minimises_a_quadratic_to_tolerance():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((30, 30))
    A = A @ A.T + np.eye(30)
    b = rng.standard_normal(30)
    x, _, gradient, _, iterations = lbfgs(lambda x: (0.5 * x @ A @ x - b @ x, A @ x - b), np.zeros(30),
                                          max_iter=500, gtol=1e-9)
    np.testing.assert_allclose(x, np.linalg.solve(A, b), atol=1e-7)
    assert np.abs(gradient).max() <= 1e-9 and iterations < 200


def test_sweep_selects_on_a_subsample_then_solves_the_chosen_C_on_every_row():
    train, val = slice(0, 1000), slice(1000, 1400)
    raw = FEATURES.astype(np.float32)
    sampled = make_head("logistic", device="cpu", sweep_rows=400, tol=1e-6, max_iter=2000)
    sampled.fit(raw[train], LABELS[train], raw[val], LABELS[val])
    assert sampled.sweep_rows_ == 400
    chosen = sampled.best_params_["C"]
    single = make_head("logistic", device="cpu", C=chosen, tol=1e-6, max_iter=2000).fit(raw[train], LABELS[train])
    # the chosen C's solution is the full-data optimum, not the subsample's
    np.testing.assert_allclose(sampled.predict_proba(raw[1400:]), single.predict_proba(raw[1400:]), atol=2e-3)
    every_row = make_head("logistic", device="cpu", sweep_rows=None).fit(raw[train], LABELS[train], raw[val], LABELS[val])
    assert every_row.sweep_rows_ == 1000
    assert abs(sampled.score(raw[1400:], LABELS[1400:]) - every_row.score(raw[1400:], LABELS[1400:])) < 0.03


@pytest.mark.parametrize("value", [0, -5, "all", 1.5])
def test_bad_sweep_rows_is_refused(value):
    from featurecache.errors import HeadError

    with pytest.raises(HeadError, match="sweep_rows"):
        make_head("logistic", sweep_rows=value).fit(FEATURES[:100], LABELS[:100], FEATURES[100:200], LABELS[100:200])


def test_loose_selection_tolerance_chooses_the_exact_paths_C_and_the_same_head():
    """The selection path stops at sweep_tol (default 10 x tol): on digits, where the best
    C leads the others by 3 validation rows or more, it chooses the C that
    the path run to tol chooses, and the chosen C is still solved to tol on every row.
    (Between C=1 and C=10, one validation row apart at tol, the loose path can swap them.)"""
    train, val = slice(0, 1000), slice(1000, 1400)
    raw = FEATURES.astype(np.float32)
    Cs = [0.0003, 0.003, 0.03, 0.3]
    common = dict(device="cpu", Cs=Cs, sweep_rows=None, patience=None, tol=1e-6, max_iter=4000, sweep_max_iter=4000)
    exact = make_head("logistic", sweep_tol=1e-6, **common).fit(raw[train], LABELS[train], raw[val], LABELS[val])
    loose = make_head("logistic", **common).fit(raw[train], LABELS[train], raw[val], LABELS[val])
    assert loose.best_params_ == exact.best_params_
    best = Cs.index(exact.best_params_["C"])
    assert abs(loose.sweep_[best]["val_top1"] - exact.sweep_[best]["val_top1"]) <= 0.005
    np.testing.assert_allclose(loose.predict_proba(raw[1400:]), exact.predict_proba(raw[1400:]), atol=2e-3)


def test_sweep_tol_is_checked():
    from featurecache.errors import HeadError

    with pytest.raises(HeadError, match="sweep_tol"):
        make_head("logistic", sweep_tol=0).fit(FEATURES[:100], LABELS[:100], FEATURES[100:200], LABELS[100:200])


def test_standardization_statistics_match_float64_whatever_the_row_order():
    """One float32 pass, shifted: rows sorted by value, far from zero, and a constant column."""
    from featurecache.heads.base import STD_FLOOR, standardization

    rng = np.random.default_rng(1)
    X = np.sort(rng.gamma(0.6, 3.0, (5000, 6)), axis=0).astype(np.float32) + 100
    X[:, 5] = 7.0
    mean, std = standardization(X)
    X64 = X.astype(np.float64)
    np.testing.assert_allclose(mean.numpy(), X64.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(std.numpy()[:5], X64.std(axis=0)[:5], rtol=1e-4)
    assert std[5] == np.float32(STD_FLOOR)


@pytest.mark.parametrize("C", [0.01, 1.0])
def test_solution_meets_the_tolerance_in_weights_and_bias(C):
    """The bias is solved inside each evaluation, out of L-BFGS's sight: the returned
    (W, b) must still have the whole objective's gradient, recomputed here in float64
    by autograd, at most `tol` in every weight and every bias."""
    X, y, tol = STANDARDIZED[:1200], LABELS[:1200], 1e-4
    weights, biases = fit_logistic_path_cpu(X, y, 10, [C], max_iter=2000, tol=tol)
    weight = weights[0].double().requires_grad_()
    bias = biases[0].double().requires_grad_()
    logits = torch.from_numpy(X).double() @ weight.T + bias
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)) + 0.5 / (C * len(y)) * weight.square().sum()
    loss.backward()
    assert weight.grad.abs().max() <= 1.05 * tol  # float32 products in the solver
    assert bias.grad.abs().max() <= 0.1 * tol  # solved to a tenth of tol


@pytest.mark.parametrize("newton_steps", [1, 50])
def test_the_value_returned_is_the_objective_at_the_bias_kept(monkeypatch, newton_steps):
    """Also when the bias solve stops at its step limit: the value and gradient describe
    (W, the bias the objective keeps), which is the bias the path returns."""
    from featurecache.heads.logistic_path import SoftmaxObjective

    monkeypatch.setattr(SoftmaxObjective, "NEWTON_STEPS", newton_steps)
    X, y = STANDARDIZED[:600], LABELS[:600]
    objective = SoftmaxObjective(X, y, 10)
    objective.strength, objective.bias_tol = 1e-3, 1e-12
    point = np.random.default_rng(0).normal(0, 0.1, X.shape[1] * 10)
    value, gradient = objective(point)
    weight = torch.from_numpy(point.reshape(X.shape[1], 10)).requires_grad_()
    logits = torch.from_numpy(X).double() @ weight + torch.from_numpy(objective.bias)
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)) + 0.5e-3 * weight.square().sum()
    loss.backward()
    assert value == pytest.approx(loss.item(), rel=1e-6)
    np.testing.assert_allclose(gradient, weight.grad.numpy().ravel(), atol=1e-6)


class _Parabola:
    """A line whose value is (t - minimum)^2: the search must find its minimum."""

    def __init__(self, minimum: float) -> None:
        self.minimum, self.priced = minimum, []

    def __call__(self, step: float) -> tuple[float, float]:
        self.priced.append(step)
        return (step - self.minimum) ** 2, 2.0 * (step - self.minimum)

    def gradient(self, step: float) -> np.ndarray:
        raise AssertionError("search_step only prices steps")


@pytest.mark.parametrize("minimum, steps", [(0.6, [1.0, 0.6]), (0.9, [1.0]), (3.0, [1.0, 3.0])])
def test_the_step_search_refines_a_unit_step_far_from_the_lines_minimum(minimum, steps):
    """A unit step whose slope is still over half the starting slope (either sign) is
    refined by a secant step on the slope, exact on a parabola; one near the minimum is
    taken as it is, costing one pricing."""
    from featurecache.heads.lbfgs import search_step

    line = _Parabola(minimum)
    step, value = search_step(line, minimum**2, -2.0 * minimum)
    assert line.priced == pytest.approx(steps)
    assert step == pytest.approx(steps[-1]) and value == pytest.approx((steps[-1] - minimum) ** 2)


def _objectives(newton_steps: int = 50):
    """The same objective on standardised features and on raw ones with the standardisation folded in."""
    from featurecache.heads.logistic_path import SoftmaxObjective, Standardization

    noise = np.random.default_rng(2).normal(0, 0.5, (600, 64))  # no constant column: its mean / scale is 3e6
    raw = (FEATURES[:600] + noise + 3.0).astype(np.float32)
    mean, std = raw.mean(axis=0, dtype=np.float64), np.maximum(raw.std(axis=0, dtype=np.float64), 1e-6)
    standardized = ((raw - mean) / std).astype(np.float32)
    objectives = (SoftmaxObjective(standardized, LABELS[:600], 10),
                  SoftmaxObjective(raw, LABELS[:600], 10, Standardization(mean, 1.0 / std)))
    for objective in objectives:
        objective.strength, objective.bias_tol, objective.NEWTON_STEPS = 1e-3, 1e-12, newton_steps
    return objectives


def test_folded_standardisation_gives_the_objective_of_the_standardised_features():
    """Value, gradient, bias and curvature estimate, also when the bias solve stops early
    (one Newton step), where the residuals' column sums enter the folded gradient."""
    point = np.random.default_rng(0).normal(0, 0.1, 64 * 10)
    for newton_steps in (1, 50):
        copy, folded = _objectives(newton_steps)
        (value, gradient), (folded_value, folded_gradient) = copy(point), folded(point)
        assert folded_value == pytest.approx(value, rel=1e-6)
        np.testing.assert_allclose(folded_gradient, gradient, atol=1e-6)
        # the biases up to a common shift, to which the softmax is blind
        np.testing.assert_allclose(folded.bias - folded.bias.mean(), copy.bias - copy.bias.mean(), atol=1e-5)
        np.testing.assert_allclose(folded.diagonal(), copy.diagonal(), rtol=1e-5)


@pytest.mark.parametrize("which", [0, 1], ids=["standardised", "folded"])
def test_a_line_prices_steps_as_the_objective_evaluates_their_points(which):
    """Value and slope at point + t d from the line (one product for d) equal the objective
    evaluated there; the gradient of the step taken, and the bias kept, too."""
    rng = np.random.default_rng(1)
    point, direction = rng.normal(0, 0.1, 640), rng.normal(0, 0.05, 640)
    for step in (0.3, 1.7):
        objective, fresh = _objectives()[which], _objectives()[which]
        objective(point)
        line = objective.line(point, direction)
        value, slope = line(step)
        fresh_value, fresh_gradient = fresh(point + step * direction)
        assert value == pytest.approx(fresh_value, rel=1e-6)
        assert slope == pytest.approx(float(fresh_gradient @ direction), rel=1e-4, abs=1e-7)
        np.testing.assert_allclose(line.gradient(step), fresh_gradient, atol=1e-6)
        np.testing.assert_allclose(objective.bias - objective.bias.mean(), fresh.bias - fresh.bias.mean(), atol=1e-5)
        np.testing.assert_allclose(objective.scores, fresh.scores, atol=1e-5)


def test_features_far_from_zero_are_standardised_before_the_products():
    """Folding the standardisation into raw float32 products loses digits to the mean: with
    features 10,000 away from zero (mean 3,000 times their spread) the head still meets
    scikit-learn's float64 optimum, because it standardises a copy first."""
    noisy = FEATURES + np.random.default_rng(0).normal(0, 0.5, FEATURES.shape)
    raw = (noisy + 1e4).astype(np.float32)
    mean, std = raw[:1200].astype(np.float64).mean(axis=0), raw[:1200].astype(np.float64).std(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit((raw[:1200] - mean) / std, LABELS[:1200])
    head = make_head("logistic", C=1.0, device="cpu", tol=1e-6, max_iter=2000).fit(raw[:1200], LABELS[:1200])
    expected = reference.predict_proba((raw[1200:] - mean) / std)
    assert np.abs(head.predict_proba(raw[1200:]) - expected).max() < 1e-3


def test_the_sweep_scores_each_model_once_and_records_its_score(monkeypatch, caplog):
    """A C where the path does not move (already within sweep_tol) keeps the previous model;
    its validation score is that model's, reused, not computed again, and the sweep's
    record and log say whose model it is rather than passing it off as its own fit."""
    from featurecache.heads import logistic

    models, calls = [], []
    solve, validate = logistic.LogisticHead._solve, logistic.validate_linear

    def watched_solve(self, *args, stop=None, **options):
        def watched_stop(index, weight, bias):
            models.append((index, weight.clone(), bias.clone()))
            return stop(index, weight, bias)
        return solve(self, *args, stop=None if stop is None else watched_stop, **options)

    def counted_validate(*args):
        calls.append(args)
        return validate(*args)

    monkeypatch.setattr(logistic.LogisticHead, "_solve", watched_solve)
    monkeypatch.setattr(logistic, "validate_linear", counted_validate)
    raw = FEATURES.astype(np.float32)
    Cs = [1e-4, 1e-3, 1e-2, 1e4, 1e5]
    with caplog.at_level(logging.INFO, logger="featurecache"):
        head = make_head("logistic", device="cpu", Cs=Cs, sweep_tol=5e-3, patience=None,
                         sweep_rows=None).fit(raw[:1000], LABELS[:1000], raw[1000:1400], LABELS[1000:1400])
    moved = [0] + [i for i in range(1, 5) if not (torch.equal(models[i - 1][1], models[i][1])
                                                  and torch.equal(models[i - 1][2], models[i][2]))]
    assert len(models) == 5 and 1 < len(moved) < 5 and len(calls) == len(moved)
    for index, weight, bias in models:
        top1, loss = validate(*calls[0][:2], weight[None], bias[None], calls[0][4])[0]
        assert (head.sweep_[index]["val_top1"], head.sweep_[index]["val_log_loss"]) == (top1, loss)
        owner = max(i for i in moved if i <= index)  # the C whose model this one kept
        assert head.sweep_[index]["same_model_as"] == (None if owner == index else Cs[owner])
    assert f"{5 - len(moved)} kept the previous C's model" in caplog.text


def _objective_gradient(weight: torch.Tensor, bias: torch.Tensor, X: np.ndarray, y: np.ndarray, C: float) -> float:
    """The largest entry of the whole objective's gradient (weights and bias), in float64."""
    weight, bias = weight.double().requires_grad_(), bias.double().requires_grad_()
    logits = torch.from_numpy(X).double() @ weight.T + bias
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)) + 0.5 / (C * len(y)) * weight.square().sum()
    loss.backward()
    return max(float(weight.grad.abs().max()), float(bias.grad.abs().max()))


def test_biases_do_not_drift_together_at_a_tight_tolerance():
    """53 rows, 3 features, 47 classes (many absent or with one row), C=235, tol 1e-6: a
    reviewer's case. Raising every bias alike changes nothing, and float32 rounding walked
    them together to about 4,000, where float32 scores + bias lose the digits the solve
    needs: it stopped at 90x tol after 19 s. Kept at max 0, it reaches tol in about a second."""
    rng = np.random.default_rng(262960)
    C, classes = 235.26360296892136, 47
    centers = rng.normal(size=(classes, 3))
    y = rng.integers(0, classes, 53)
    X = np.maximum(centers[y] + rng.normal(size=(53, 3)) - 0.7, 0).astype(np.float32)
    X = ((X - X.mean(axis=0)) / X.std(axis=0)).astype(np.float32)
    weights, biases = fit_logistic_path_cpu(X, y, classes, [C], max_iter=400, tol=1e-6)
    present = np.unique(y)
    assert _objective_gradient(weights[0], biases[0], X, y, C) <= 1.5e-6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(X.astype(np.float64), y)
    ours = _probabilities(weights[0], biases[0], X)[:, present]
    assert np.abs(ours - reference.predict_proba(X)).max() < 1e-3  # measured 1.9e-5
    assert float(biases[0].max()) == 0.0  # kept there: no drift (it reached +16 and -84 without)


def test_a_solve_stopped_above_tol_says_so(caplog):
    """max_iter reached with the gradient above tol is a warning (scikit-learn's
    ConvergenceWarning), naming C and the gradient; a converged solve and a selection path
    (bounded per C on purpose) say nothing."""
    X, y = STANDARDIZED[:600], LABELS[:600]
    with caplog.at_level("WARNING", logger="featurecache"):
        weights, biases = fit_logistic_path_cpu(X, y, 10, [10.0], max_iter=3, tol=1e-6)
    gradient = _objective_gradient(weights[0], biases[0], X, y, 10.0)
    assert gradient > 1e-6
    (record,) = caplog.records
    assert record.levelname == "WARNING" and "logistic C=10: stopped after 3 iterations (max_iter=3 reached)" in record.message
    assert float(record.message.split("with a gradient of ")[1].split(",")[0]) == pytest.approx(gradient, rel=0.05)
    caplog.clear()
    with caplog.at_level("WARNING", logger="featurecache"):
        fit_logistic_path_cpu(X, y, 10, [10.0], max_iter=2000, tol=1e-4)
        fit_logistic_path_cpu(X, y, 10, [0.1, 10.0], max_iter=3, tol=1e-6, stop=lambda *_: False)
    assert caplog.records == []
    with caplog.at_level("WARNING", logger="featurecache"):  # the torch (GPU) solver, on CPU tensors
        fit_logistic_path(torch.from_numpy(X), torch.from_numpy(y), 10, [10.0], max_iter=3, tol=1e-6)
    assert [r.message.split(":")[0] for r in caplog.records] == ["logistic C=10"]


@pytest.mark.parametrize("scale", [1e19, 1e30])
def test_features_whose_squares_overflow_float32_are_standardised_in_float64(scale):
    """From |x| of about 1e18 the float32 pass's squares overflow: an inf std divided those
    features to 0 and the head predicted the class priors, silently. The statistics scale
    with the features, and so the head is the same as on the unscaled features."""
    from featurecache.heads.base import standardization

    X = STANDARDIZED[:600] * np.float32(2.0) + np.float32(1.0)
    mean, std = standardization(X)
    big_mean, big_std = standardization(X * np.float32(scale))
    np.testing.assert_allclose(big_mean.numpy(), mean.numpy() * scale, rtol=1e-5)
    np.testing.assert_allclose(big_std.numpy()[std.numpy() > 1e-3], std.numpy()[std.numpy() > 1e-3] * scale, rtol=1e-4)
    head = make_head("logistic", C=0.1, device="cpu").fit(X, LABELS[:600])
    big = make_head("logistic", C=0.1, device="cpu").fit(X * np.float32(scale), LABELS[:600])
    np.testing.assert_allclose(big.predict_proba(STANDARDIZED[600:700] * np.float32(2 * scale) + np.float32(scale)),
                               head.predict_proba(STANDARDIZED[600:700] * np.float32(2.0) + np.float32(1.0)), atol=1e-4)


def test_the_loss_counts_true_classes_whose_probability_float32_cannot_hold():
    """The bias solve's softmax gives probabilities in float32, where p below about 1e-38
    rounds to 0 (log: -inf) or loses digits; those rows' losses come from log_softmax."""
    from featurecache.heads.logistic_path import SoftmaxObjective

    scores = np.array([[0.0, 1.0, 2.0], [0.0, -120.0, 0.0], [0.0, 30.0, -80.0], [5.0, 0.0, 0.0]], np.float32)
    labels = np.array([2, 1, 2, 0])
    objective = SoftmaxObjective(np.zeros((4, 1), np.float32), labels, 3)
    objective.NEWTON_STEPS = 0  # the loss at bias 0, as given
    _, loss = objective._solve_bias(scores)
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(scores).double(), torch.from_numpy(labels))
    assert loss == pytest.approx(expected.item(), rel=1e-6)  # 57.8 rather than inf


@pytest.mark.parametrize("favoured", [0.0, 120.0])
def test_the_bias_solve_gives_softmax_at_the_bias_it_keeps(favoured):
    """The Newton steps price a bias change d through P e^d / (P e^d) rather than a softmax
    pass; what they return must still be softmax(scores + bias) at the bias kept, solved to
    bias_tol, with its cross-entropy. With every row's scores favouring class 0 by 120, its
    bias must fall by about that much, beyond what float32 e^d can carry (e^-88 underflows):
    the probabilities are recomputed before d spreads that far."""
    from featurecache.heads.logistic_path import SoftmaxObjective

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 900)
    scores = rng.normal(0, 2, (900, 7)).astype(np.float32)
    scores[:, 0] += np.float32(favoured)
    objective = SoftmaxObjective(np.zeros((900, 1), np.float32), labels, 7)
    objective.bias_tol = 1e-6
    probabilities, loss = objective._solve_bias(scores.copy())
    shifted = torch.from_numpy(scores).double() + torch.from_numpy(objective.bias)
    exact = torch.softmax(shifted, dim=1)
    np.testing.assert_allclose(probabilities.numpy(), exact.numpy(), atol=2e-6)
    frequencies = np.bincount(labels, minlength=7) / len(labels)
    assert np.abs(frequencies - exact.mean(0).numpy()).max() <= 1.5e-6  # the bias gradient, to bias_tol
    np.testing.assert_allclose(objective.residual, frequencies - exact.mean(0).numpy(), atol=1e-6)
    expected = torch.nn.functional.cross_entropy(shifted, torch.from_numpy(labels))
    assert loss == pytest.approx(expected.item(), rel=1e-6)
    assert objective.bias.max() == 0.0 and objective.bias[0] < -favoured + 10


def test_the_cpu_solver_runs_torch_on_one_thread_on_two_cores_and_gives_them_back():
    """On two cores torch's second thread waits on OpenBLAS's spinning worker; the solver
    runs torch on one thread and restores the count, also when it raises."""
    X, y = STANDARDIZED[:300], LABELS[:300]
    before = torch.get_num_threads()
    seen = []

    def stop(index, weight, bias):
        seen.append(torch.get_num_threads())
        raise RuntimeError("stopped")

    try:
        for threads, inside in [(2, 1), (3, 3)]:
            torch.set_num_threads(threads)
            seen.clear()
            with pytest.raises(RuntimeError, match="stopped"):
                fit_logistic_path_cpu(X, y, 10, [1.0], max_iter=5, tol=1e-4, stop=stop)
            assert seen == [inside] and torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kind", ["numpy", "numpy-folded", "tensor"])
def test_validation_scores_match_a_float64_reference(kind):
    """Top-1 and mean log-loss of each model, from NumPy products (raw features with the
    standardisation folded in, or standardised ones) or torch, against float64."""
    from featurecache.heads.logistic_path import Standardization, validate_linear

    rng = np.random.default_rng(1)
    weights = torch.from_numpy(rng.normal(0, 0.3, (3, 10, 64)).astype(np.float32))
    biases = torch.from_numpy(rng.normal(0, 1, (3, 10)).astype(np.float32))
    X, y = STANDARDIZED[1200:], LABELS[1200:]
    if kind == "numpy-folded":
        fold = Standardization(MEAN, 1.0 / STD)
        scored = validate_linear(FEATURES[1200:].astype(np.float32), y, weights, biases, fold)
    elif kind == "numpy":
        scored = validate_linear(X, y, weights, biases)
    else:
        scored = validate_linear(torch.from_numpy(X), torch.from_numpy(y), weights, biases)
    for (top1, loss), weight, bias in zip(scored, weights.double(), biases.double()):
        logits = torch.from_numpy(X).double() @ weight.T + bias
        assert top1 == pytest.approx(float((logits.argmax(1).numpy() == y).mean()), abs=1e-12)
        reference = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)).item()
        assert loss == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize("rebase", [None, 0.01])
def test_near_its_solution_the_bias_solve_steps_without_softmax_passes(monkeypatch, rebase):
    """From the last bias, for scores moved a little (a line's next step), the Newton steps
    cost matrix-vector products only: one softmax pass in all, whatever the steps. A bias
    change spread beyond REBASE (made tiny here) is priced by a pass of its own instead."""
    from featurecache.heads.logistic_path import SoftmaxObjective

    rng = np.random.default_rng(2)
    labels = rng.integers(0, 7, 900)
    scores = rng.normal(0, 2, (900, 7)).astype(np.float32)
    objective = SoftmaxObjective(np.zeros((900, 1), np.float32), labels, 7)
    objective.bias_tol = 1e-6
    objective._solve_bias(scores.copy())
    if rebase is not None:
        monkeypatch.setattr(SoftmaxObjective, "REBASE", rebase)
    moved = scores + rng.normal(0, 1.0, scores.shape).astype(np.float32)
    passes, steps = objective.softmax_passes, objective.bias_steps
    probabilities, _ = objective._solve_bias(moved)
    passes, steps = objective.softmax_passes - passes, objective.bias_steps - steps
    assert steps >= 2 and (passes == 1 if rebase is None else passes > 1)
    exact = torch.softmax(torch.from_numpy(moved).double() + torch.from_numpy(objective.bias), dim=1)
    np.testing.assert_allclose(probabilities.numpy(), exact.numpy(), atol=2e-6)
    assert np.abs(np.bincount(labels, minlength=7) / 900 - exact.mean(0).numpy()).max() <= 1.5e-6
