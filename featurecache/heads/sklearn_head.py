"""`sklearn:<module>.<Estimator>` heads: any scikit-learn classifier on standardised features,
saved as tensors plus JSON (never pickle), exported as a torch module where it is linear.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from sklearn.base import ClassifierMixin
from sklearn.utils.validation import check_is_fitted
from torch import Tensor, nn

from ..errors import HeadError, MismatchError
from .base import Head, Standardize, jsonable, standardization

logger = logging.getLogger("featurecache")


@contextlib.contextmanager
def _warnings_in_one_line(name: str, say: bool = True) -> Iterator[None]:
    """scikit-learn's warnings (ConvergenceWarning: a dozen lines with links and a source line)
    as one `warning:` line each (the message's first paragraph), once per message, naming the
    head; `say=False` (a probe fit) keeps them quiet."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:  # a fit that raises still says what it warned of
            seen = set()
            for warning in caught:
                if issubclass(warning.category, (DeprecationWarning, PendingDeprecationWarning)):
                    continue  # for library authors: Python hides them from users
                text = " ".join(str(warning.message).strip().split("\n\n")[0].split())
                if say and text not in seen:
                    seen.add(text)
                    logger.warning("%s: %s: %s", name, warning.category.__name__, text[:300])

SKLEARN_PREFIX = "sklearn:"


def _sklearn_class(path: str) -> type:
    """The sklearn classifier named "<module>.<Estimator>", e.g. "svm.LinearSVC"."""
    module_name, _, class_name = path.rpartition(".")
    if not module_name or not class_name:
        raise HeadError(f"expected sklearn:<module>.<Estimator> (e.g. sklearn:svm.LinearSVC), "
                        f"got sklearn:{path}")
    try:
        module = importlib.import_module(f"sklearn.{module_name}")
    except ImportError as error:
        raise HeadError(f"sklearn has no module {module_name!r} (in sklearn:{path})") from error
    cls = getattr(module, class_name, None)
    if not inspect.isclass(cls):
        raise HeadError(f"sklearn.{module_name} has no estimator {class_name!r}")
    if not issubclass(cls, ClassifierMixin):
        raise HeadError(f"sklearn.{module_name}.{class_name} is not a classifier")
    return cls


def _softmax(scores: np.ndarray) -> np.ndarray:
    exponentials = np.exp(scores - scores.max(axis=1, keepdims=True))
    return exponentials / exponentials.sum(axis=1, keepdims=True)


class LinearSoftmax(nn.Module):
    """softmax(W standardise(x) + b) over the classes an sklearn linear model was fitted
    on; classes absent from its training data get probability 0."""

    def __init__(self, mean: Tensor, scale: Tensor, weight: Tensor, bias: Tensor,
                 columns: Tensor, n_classes: int) -> None:
        super().__init__()
        self.standardize = Standardize(mean, scale)
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)
        self.register_buffer("columns", columns)
        self.n_classes = n_classes
        self.binary = weight.shape[0] == 1  # sklearn keeps one score row for two classes

    def forward(self, x: Tensor) -> Tensor:
        logits = self.linear(self.standardize(x))
        if self.binary:
            logits = torch.cat([torch.zeros_like(logits), logits], dim=1)
        full = torch.full((x.shape[0], self.n_classes), float("-inf"), device=x.device)
        return torch.softmax(full.index_copy(1, self.columns, logits), dim=1)


def _estimator_state(estimator: Any, label: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The fitted state of an sklearn estimator as (JSON values, numeric arrays).

    Takes every attribute that is not a constructor parameter, private ones included,
    since some estimators predict from them; refuses any that is an object."""
    params = estimator.get_params(deep=False)
    values, arrays = {}, {}
    for key, value in vars(estimator).items():
        if key in params:
            continue
        if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
            arrays[key] = value
            continue
        try:
            values[key] = jsonable(value)
        except HeadError:
            raise HeadError(
                f"{label} cannot be saved safely: its attribute {key!r} holds a "
                f"{type(value).__name__}, not arrays or plain values, and featurecache never "
                "pickles. Use a linear estimator (sklearn:linear_model.LogisticRegression, "
                "sklearn:svm.LinearSVC) or the logistic head."
            ) from None
    return values, arrays


class SklearnHead(Head):
    """An sklearn classifier (`estimator` "<module>.<Estimator>", built with `params`)
    fitted on standardised features. Probabilities come from its `predict_proba`, or
    else the softmax of its `decision_function`."""

    _saved_attributes = ("exportable_",)

    def __init__(self, *, estimator: str = "linear_model.LogisticRegression",
                 params: dict | None = None, n_classes: int | None = None) -> None:
        self.estimator = estimator
        self.params = params
        self.n_classes = n_classes

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{SKLEARN_PREFIX}{self.estimator}"

    def _new_estimator(self) -> Any:
        if self.params is not None and not isinstance(self.params, dict):
            raise HeadError(f"parameters of {self.name} must be a table of name = value, got {self.params!r}")
        try:
            return _sklearn_class(self.estimator)(**(self.params or {}))
        except (TypeError, ValueError) as error:
            raise HeadError(f"bad parameters for {self.name}: {error}") from None

    def _check_params(self) -> None:
        estimator = self._new_estimator()
        validate = getattr(estimator, "_validate_params", None)  # scikit-learn >= 1.2 checks types and ranges
        if validate is not None:
            try:
                validate()
            except (TypeError, ValueError) as error:
                raise HeadError(f"bad parameters for {self.name}: {error}") from None

    def check_saveable(self, X: np.ndarray, y: np.ndarray, n_classes: int) -> None:
        """Fit a copy on a small sample, save it and load it back: refuses, before the real fit,
        an estimator whose fitted state featurecache cannot store exactly (it never pickles)."""
        rng = np.random.default_rng(0)  # enough rows that size-dependent choices (kd-trees) happen here too
        per_class = max(3, min(40, 400 // max(len(np.unique(y)), 1)))
        picked = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)])
        sample, labels = X[np.sort(picked)], y[np.sort(picked)]
        probe = SklearnHead(estimator=self.estimator, params=self.params, n_classes=n_classes)
        probe._probe = True  # its warnings are the real fit's to give
        try:
            probe.fit(sample, labels, n_classes=n_classes)
        except Exception:  # noqa: BLE001 - the sample was too small for it: the real fit decides
            return
        try:
            expected = probe.predict_proba(sample)
            loaded = SklearnHead.from_saved(json.loads(json.dumps(probe.to_config())),
                                            {k: v.clone() for k, v in probe.to_tensors().items()})
            same = np.allclose(loaded.predict_proba(sample), expected, atol=1e-6)
        except HeadError:
            raise
        except Exception as error:  # noqa: BLE001 - whatever breaks on reload means: cannot be saved
            same, reason = False, f"{type(error).__name__}: {str(error)[:120]}"
        else:
            reason = "its predictions change when saved and loaded back"
        if not same:
            raise HeadError(f"{self.name} cannot be saved and loaded back exactly ({reason}); featurecache never "
                            "pickles. Use a linear estimator (sklearn:linear_model.LogisticRegression, "
                            "sklearn:svm.LinearSVC) or the logistic, mlp or knn heads")

    def _probabilities(self, standardized: np.ndarray, n_classes: int) -> np.ndarray:
        estimator = self.estimator_
        if hasattr(estimator, "predict_proba"):
            seen = estimator.predict_proba(standardized)
        else:
            scores = estimator.decision_function(standardized)
            if scores.ndim == 1:
                scores = np.stack([np.zeros_like(scores), scores], axis=1)
            seen = _softmax(scores)
        probabilities = np.zeros((len(standardized), n_classes))
        probabilities[:, estimator.classes_.astype(np.int64)] = seen
        return probabilities

    def _is_linear_softmax(self, standardized: np.ndarray) -> bool:
        """Whether probabilities are softmax(coef_ x + intercept_): not so for one-vs-rest,
        pairwise or calibrated models, whatever their `coef_`."""
        coef, intercept = (getattr(self.estimator_, name, None) for name in ("coef_", "intercept_"))
        if not isinstance(coef, np.ndarray) or coef.ndim != 2 or intercept is None:
            return False
        logits = standardized @ coef.T + intercept
        if logits.shape[1] == 1:
            logits = np.concatenate([np.zeros_like(logits), logits], axis=1)
        seen = self.estimator_.classes_.astype(np.int64)
        if logits.shape[1] != len(seen):
            return False
        expected = self._probabilities(standardized, int(seen.max()) + 1)[:, seen]
        return bool(np.allclose(_softmax(logits), expected, atol=1e-5))

    def _standardized(self, X: np.ndarray) -> np.ndarray:
        # float64: scikit-learn computes in the input's precision, and GaussianNB's joint
        # log-likelihood (about -3e18 on standardised features) cancelled in float32 into
        # "probabilities" summing to 2-5
        return (np.asarray(X, dtype=np.float64) - self.mean_) / self.scale_

    def _fit(self, X, y, X_val, y_val, n_classes: int) -> None:
        self.mean_, self.scale_ = (statistic.numpy() for statistic in standardization(X))
        standardized = self._standardized(X)
        self.estimator_ = self._new_estimator()
        try:
            with _warnings_in_one_line(self.name, say=not getattr(self, "_probe", False)):
                self.estimator_.fit(standardized, y)
        except (ValueError, TypeError) as error:  # sklearn's own validation of parameters and data
            raise HeadError(f"{self.name} could not be fitted: {str(error).splitlines()[0][:300]}") from None
        self.exportable_ = self._is_linear_softmax(standardized[:256])

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        try:
            return self._probabilities(self._standardized(X), len(self.classes_))
        except (TypeError, ValueError, AttributeError, IndexError) as error:
            # e.g. QuadraticDiscriminantAnalysis saved and loaded: its lists of arrays come
            # back as nested lists (fit-head's check_saveable refuses it only when its probe fits)
            raise HeadError(f"{self.name} cannot predict ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                            "if it was saved and loaded, its state does not survive featurecache's pickle-free "
                            "format: fit it again, or use a linear estimator or the logistic, mlp or knn heads") from None

    def to_config(self) -> dict:
        check_is_fitted(self)
        state = _estimator_state(self.estimator_, self.name)[0]
        return {**super().to_config(), "estimator_state": state}

    def to_tensors(self) -> dict[str, Tensor]:
        check_is_fitted(self)
        arrays = _estimator_state(self.estimator_, self.name)[1]
        # copies: an estimator may hold arrays that share memory (views of one another), which
        # safetensors refuses to store
        tensors = {f"estimator.{key}": torch.from_numpy(np.array(value, copy=True, order="C"))
                   for key, value in arrays.items()}
        return {"mean": torch.from_numpy(self.mean_.copy()), "scale": torch.from_numpy(self.scale_.copy()),
                **tensors}

    def _load_tensors(self, tensors: dict[str, Tensor], config: dict) -> None:
        self.mean_, self.scale_ = tensors["mean"].numpy().copy(), tensors["scale"].numpy().copy()
        if self.mean_.shape != (self.n_features_in_,) or self.scale_.shape != (self.n_features_in_,) \
                or (self.scale_ <= 0).any():
            raise MismatchError(f"saved standardisation has shapes {self.mean_.shape} and {self.scale_.shape} "
                                f"(positive scales expected), the config says {self.n_features_in_} features")
        self.estimator_ = self._new_estimator()
        for key, value in config["estimator_state"].items():
            setattr(self.estimator_, key, value)
        for key, tensor in tensors.items():
            if key.startswith("estimator."):
                setattr(self.estimator_, key.removeprefix("estimator."), tensor.numpy().copy())

    def as_module(self) -> nn.Module:
        check_is_fitted(self)
        if not self.exportable_:
            raise HeadError(
                f"{self.name} is not a softmax of a linear map, so it has no torch module; use "
                "sklearn:linear_model.LogisticRegression, sklearn:svm.LinearSVC or logistic")
        coef = np.asarray(self.estimator_.coef_, dtype=np.float32)
        intercept = np.broadcast_to(np.asarray(self.estimator_.intercept_, np.float32), len(coef))
        columns = torch.from_numpy(self.estimator_.classes_.astype(np.int64))
        return LinearSoftmax(torch.from_numpy(self.mean_), torch.from_numpy(self.scale_),
                             torch.from_numpy(coef), torch.from_numpy(intercept.copy()),
                             columns, len(self.classes_)).eval()


# ----------------------------------------------------------------------------- ensemble
