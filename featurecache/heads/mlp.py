"""The MLP head: a ReLU MLP on standardised features, trained with AdamW, a cosine
schedule and early stopping, its lr x weight-decay grid chosen on validation data."""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import HeadError
from ..device import cuda_devices, resolve_device
from .base import NetworkHead, Standardize, parameter_grid


logger = logging.getLogger("featurecache")


def _evaluate(network: nn.Module, features: Tensor, labels: Tensor,
              batch_size: int) -> tuple[float, float]:
    """(mean cross-entropy, top-1) of `network` in eval mode."""
    network.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            logits = network(features[start : start + batch_size])
            chunk_labels = labels[start : start + batch_size]
            loss += F.cross_entropy(logits, chunk_labels, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == chunk_labels).sum())
    return loss / len(labels), correct / len(labels)


class EarlyStopping:
    """Keeps the state of the best epoch by (val top-1, -val loss) and says when to stop:
    after `patience` epochs without a better one."""

    def __init__(self, patience: int, epochs: int) -> None:
        self.patience = patience
        self.state: dict | None = None
        self.epoch, self.score, self.stale = epochs, None, 0

    def update(self, network: nn.Module, epoch: int, score: tuple[float, float]) -> bool:
        """Record one epoch's validation score; True when training should stop."""
        if self.score is None or score > self.score:
            self.state = copy.deepcopy(network.state_dict())
            self.epoch, self.score, self.stale = epoch, score, 0
            return False
        self.stale += 1
        return self.stale >= self.patience


class MLPHead(NetworkHead):
    """ReLU MLP on standardised features: AdamW, cosine schedule, early stopping.

    `lr` and `weight_decay` are values or lists; their grid is searched on validation
    data and the best epoch's weights of the best setting are kept. Seeded by `seed`
    without touching the caller's global RNG; deterministic on CPU.

    Augmentation: `fit(..., views=V)` with V (N x K x D), K cached augmented views of each
    training row, draws one of the K + 1 versions of each row (the plain one counts) per
    epoch. In feature space, `feature_noise` adds Gaussian noise of that many standard
    deviations (of each feature, over the training rows) to every training input, and
    `feature_mixup=ALPHA` trains on mixup of pairs of rows (lambda ~ Beta(ALPHA, ALPHA)).
    Validation rows are never augmented.
    """

    name = "mlp"
    _saved_attributes = ("best_params_", "sweep_", "history_")

    def __init__(self, *, hidden_sizes: Sequence[int] = (512,), dropout: float = 0.1,
                 lr: float | Sequence[float] = (1e-3, 3e-3),
                 weight_decay: float | Sequence[float] = (1e-4, 1e-2), epochs: int = 100,
                 batch_size: int = 256, patience: int = 10, seed: int = 0, device: str = "auto",
                 n_classes: int | None = None, feature_noise: float = 0.0, feature_mixup: float = 0.0) -> None:
        self.hidden_sizes = hidden_sizes
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.patience = patience
        self.seed = seed
        self.device = device
        self.n_classes = n_classes
        self.feature_noise = feature_noise
        self.feature_mixup = feature_mixup
        self._views = None

    def fit(self, X, y, X_val=None, y_val=None, *, n_classes: int | None = None, views=None) -> MLPHead:
        """As every head's `fit`; `views` (N x K x D): augmented views of the rows of X, one of
        the K + 1 versions of each row drawn per epoch."""
        if views is not None:
            views = np.asarray(views, dtype=np.float32)
            if views.ndim != 3 or len(views) != len(X) or views.shape[2] != np.shape(X)[1]:
                raise HeadError(f"views must be (rows, views, features) matching X {np.shape(X)}, got {views.shape}")
        self._views = views
        try:
            return super().fit(X, y, X_val, y_val, n_classes=n_classes)
        finally:
            self._views = None

    streams = "fit_streaming_mlp"

    def _settings(self) -> list[tuple[float, float]]:
        weight_decays = parameter_grid(self.weight_decay, "weight_decay", allow_zero=True)
        return list(itertools.product(parameter_grid(self.lr, "lr"), weight_decays))

    def _check_params(self) -> None:
        self._settings()
        if not isinstance(self.hidden_sizes, (list, tuple)) or not all(
                isinstance(size, int) and not isinstance(size, bool) and 0 < size <= 1 << 16
                for size in self.hidden_sizes):
            raise HeadError(f"hidden_sizes must be a list of positive integers (e.g. [512]), got {self.hidden_sizes!r}")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0 <= self.dropout < 1:
            raise HeadError(f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("epochs", "batch_size", "patience"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise HeadError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("feature_noise", "feature_mixup"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 100:
                raise HeadError(f"{name} must be a number from 0 to 100 (0: off), got {value!r}")
        resolve_device(self.device)

    def _build_network(self, n_features: int, n_classes: int) -> nn.Sequential:
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            standardize=Standardize(torch.zeros(n_features), torch.ones(n_features)))
        width = n_features
        for index, size in enumerate(self.hidden_sizes):
            layers[f"fc{index}"] = nn.Linear(width, size)
            layers[f"relu{index}"] = nn.ReLU()
            layers[f"dropout{index}"] = nn.Dropout(self.dropout)
            width = size
        layers["classifier"] = nn.Linear(width, n_classes)
        return nn.Sequential(layers)

    def _train(self, network: nn.Module, data: tuple, lr: float, weight_decay: float) -> tuple:
        """Train one setting: (best state, history, best epoch, (val top-1, -val loss) or None)."""
        features, labels, features_val, labels_val, views = data
        optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=weight_decay)
        steps = self.epochs * math.ceil(len(features) / self.batch_size)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        generator = torch.Generator().manual_seed(self.seed)
        history: list[dict] = []
        stopping = EarlyStopping(self.patience, self.epochs)
        rows = torch.arange(len(features), device=features.device)
        for epoch in range(1, self.epochs + 1):
            network.train()
            total = torch.zeros((), device=features.device)
            epoch_features = features
            if views is not None:  # one version of each row this epoch: 0 the plain one, k view k - 1
                pick = torch.randint(views.shape[1] + 1, (len(features),), generator=generator).to(features.device)
                epoch_features = torch.where((pick == 0)[:, None], features, views[rows, (pick - 1).clamp(min=0)])
            for batch in torch.randperm(len(features), generator=generator).split(self.batch_size):
                batch = batch.to(features.device)
                loss = self._loss(network, epoch_features[batch], labels[batch], generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.detach() * len(batch)
            record = {"epoch": epoch, "train_loss": total.item() / len(features),
                      "val_loss": None, "val_top1": None}
            history.append(record)
            if features_val is None:
                continue
            record["val_loss"], record["val_top1"] = _evaluate(
                network, features_val, labels_val, 4 * self.batch_size)
            if stopping.update(network, epoch, (record["val_top1"], -record["val_loss"])):
                break
        return stopping.state or network.state_dict(), history, stopping.epoch, stopping.score

    def _loss(self, network: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        """Cross-entropy of one training batch, after the feature-space augmentation asked for."""
        if self.feature_noise:
            noise = torch.randn(x.shape, generator=generator).to(x.device)
            x = x + self.feature_noise * network.standardize.scale * noise
        if self.feature_mixup:
            lam = float(np.random.default_rng(int(torch.randint(2**31, (1,), generator=generator))).beta(
                self.feature_mixup, self.feature_mixup))
            partner = torch.randperm(len(x), generator=generator).to(x.device)
            logits = network(lam * x + (1 - lam) * x[partner])
            return lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[partner])
        return F.cross_entropy(network(x), y)

    def _fit(self, X, y, X_val, y_val, n_classes: int) -> None:
        settings = self._settings()
        if len(settings) > 1 and X_val is None:
            raise HeadError("mlp grid over lr/weight_decay needs validation data "
                            "(or pass single values)")
        device = resolve_device(self.device)
        data = tuple(None if array is None else torch.from_numpy(array).to(device)
                     for array in (X, y, X_val, y_val, self._views))
        trials = []
        for lr, weight_decay in settings:
            # fork_rng seeds weight init and dropout but leaves the caller's RNG as it was.
            with torch.random.fork_rng(devices=cuda_devices(device)):
                torch.manual_seed(self.seed)
                network = self._standardized_network(X, n_classes).to(device)
                state, history, epoch, score = self._train(network, data, lr, weight_decay)
            trials.append((lr, weight_decay, state, history, epoch, score))
        self.keep_best(trials, X.shape[1], n_classes)

    def keep_best(self, trials: list[tuple], n_features: int, n_classes: int) -> None:
        """Set the fitted state from the grid's (lr, weight_decay, best state, history,
        best epoch, (val top-1, -val loss) or None), in grid order: the best score wins."""
        best, self.sweep_ = None, []
        for lr, weight_decay, state, history, epoch, score in trials:
            entry = {"lr": lr, "weight_decay": weight_decay, "epoch": epoch,
                     "val_top1": score and score[0], "val_log_loss": score and -score[1]}
            self.sweep_.append(entry)
            if best is None or (score is not None and score > best[0]):
                best = (score, entry, state, history)
        _, entry, state, self.history_ = best
        network = self._build_network(n_features, n_classes)
        network.load_state_dict(state)
        self.network_ = network.eval()
        self.best_params_ = {key: entry[key] for key in ("lr", "weight_decay", "epoch")}
        logger.info("mlp: chose %s", self.best_params_)
