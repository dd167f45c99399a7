"""Classifier heads over cached features: logistic, MLP, k-NN, scikit-learn, ensembles, metrics."""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"Head": "base", "make_head": "registry", "available_heads": "registry", "register_head": "registry", "head_from_saved": "registry", "LogisticHead": "logistic", "MLPHead": "mlp", "KNNHead": "knn", "SklearnHead": "registry", "EnsembleHead": "registry"})
