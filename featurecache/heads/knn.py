"""The k-NN head: cosine similarity to the training features, votes weighted by
similarity. Its bank is in memory, or, for a head fitted out of core, the cache's
train split read shard by shard at each call."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.validation import check_is_fitted
from torch import Tensor, nn

from ..errors import HeadError, MismatchError, UsageError
from ..device import resolve_device
from .base import BLOCK_ELEMENTS, Head
from .probabilities_module import ProbabilitiesModule


logger = logging.getLogger("featurecache")

STREAMED_BLOCK_ELEMENTS = 2**22  # a streamed k-NN head's (queries, shard) products: 16 MiB


def knn_vote(similarities: Tensor, neighbor_labels: Tensor, n_classes: int,
             temperature: float, uniform: bool) -> Tensor:
    """Class probabilities from the (B, k) similarities and labels of the nearest neighbours,
    mixed with 1e-4 of the uniform distribution so that log-loss stays finite."""
    if uniform:
        weights = torch.ones_like(similarities)
    else:  # exp(s / T) as in DINOv2's k-NN; subtracting the top similarity avoids overflow
        weights = torch.exp((similarities - similarities[:, :1]) / temperature)
    votes = torch.zeros(similarities.shape[0], n_classes, device=similarities.device)
    votes.scatter_add_(1, neighbor_labels, weights)
    return votes / votes.sum(dim=1, keepdim=True) * (1.0 - 1e-4) + 1e-4 / n_classes


def nearest_neighbours(queries: Tensor, bank_chunks: Iterable[tuple[Tensor, Tensor]], k: int,
                       block_elements: int = BLOCK_ELEMENTS) -> tuple[Tensor, Tensor]:
    """(similarities, labels) of the k bank rows most similar to each query, best first.

    Queries and bank rows are L2-normalised. The bank comes in chunks (the whole bank, or
    one shard at a time) and a running top-k is merged chunk by chunk, so memory is one
    chunk plus queries x k; blocks of queries keep each (queries, chunk) product under
    `block_elements` values."""
    similarities = queries.new_empty((len(queries), 0))
    labels = torch.empty((len(queries), 0), dtype=torch.long, device=queries.device)
    for bank, bank_labels in bank_chunks:
        if len(bank) == 0:
            continue
        rows, found, found_labels = max(1, block_elements // len(bank)), [], []
        for start in range(0, len(queries), rows):
            values, indices = (queries[start : start + rows] @ bank.T).topk(min(k, len(bank)), dim=1)
            found.append(values)
            found_labels.append(bank_labels[indices])
        chunk, chunk_labels = torch.cat(found), torch.cat(found_labels)
        if similarities.shape[1]:
            chunk, chunk_labels = torch.cat([similarities, chunk], 1), torch.cat([labels, chunk_labels], 1)
            chunk, order = chunk.topk(min(k, chunk.shape[1]), dim=1)
            chunk_labels = chunk_labels.gather(1, order)
        similarities, labels = chunk, chunk_labels
    return similarities, labels


def directions(features: Tensor, kind: str, in_place: bool = False) -> Tensor:
    """Rows scaled to unit length, as F.normalize does, refusing rows with no direction: an
    all-zero row (norm under 1e-12) has cosine 0 to every row, so it beat real neighbours
    with negative similarity, and as a query got a confident class (measured 0.9999)."""
    norms = features.norm(dim=1, keepdim=True)
    short = (norms[:, 0] < 1e-12).nonzero()
    if len(short):
        raise UsageError(f"knn compares directions (cosine similarity), and {len(short)} {kind} row(s) have none: "
                         f"their features are all zero (first: row {int(short[0])}); drop them or use another head")
    return features.div_(norms) if in_place else features / norms


class KNNModule(nn.Module):
    """Cosine k-NN classifier with its L2-normalised training bank as buffers."""

    def __init__(self, bank: Tensor, bank_labels: Tensor, k: int, n_classes: int,
                 temperature: float, uniform: bool, search_k: int) -> None:
        super().__init__()
        self.register_buffer("bank", bank)
        self.register_buffer("bank_labels", bank_labels)
        self.k = k
        self.search_k = search_k
        self.n_classes = n_classes
        self.temperature = temperature
        self.uniform = uniform

    def forward(self, x: Tensor) -> Tensor:
        """Probabilities (N, classes); NaN for a row with no direction (all zero), which the
        library refuses (`directions`) and a module, traced without data-dependent errors,
        marks instead: predict reports such an image as having no prediction."""
        similarities, indices = (F.normalize(x, dim=1) @ self.bank.T).topk(self.search_k, dim=1)
        similarities, indices = similarities[:, : self.k], indices[:, : self.k]
        probabilities = knn_vote(similarities, self.bank_labels[indices], self.n_classes,
                                 self.temperature, self.uniform)
        no_direction = torch.linalg.vector_norm(x, 2.0, dim=1, keepdim=True) < 1e-12
        return torch.where(no_direction, torch.full_like(probabilities, float("nan")), probabilities)


class KNNHead(Head):
    """k nearest neighbours by cosine similarity, votes weighted by exp(similarity /
    temperature) or uniform; `k` is an int or a grid chosen on validation data.

    The bank is the normalised training features, in memory (`bank_`), or, for a head
    fitted out of core, read shard by shard from its cache (`bank_source_` names the
    split and tap; `bank_reader_` yields raw (features, labels) chunks and is attached
    by `featurecache.load_head`)."""

    name = "knn"
    _saved_attributes = ("best_params_", "sweep_", "bank_source_", "search_k_")

    def __init__(self, *, k: int | Sequence[int] = (1, 3, 5, 10, 20, 50),
                 weighting: str = "similarity", temperature: float = 0.07,
                 device: str = "auto", n_classes: int | None = None) -> None:
        self.k = k
        self.weighting = weighting
        self.temperature = temperature
        self.device = device
        self.n_classes = n_classes

    streams = "fit_streaming_knn"

    def _ks(self) -> list[int]:
        ks = [self.k] if np.isscalar(self.k) else list(self.k)
        if not ks or not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k > 0 for k in ks):
            raise HeadError(f"k must be a positive integer or a list of them, got {self.k!r}")
        return [int(k) for k in ks]

    def _check_params(self) -> None:
        self._ks()
        if self.weighting not in ("similarity", "uniform"):
            raise HeadError(f"weighting must be 'similarity' or 'uniform', got {self.weighting!r}")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) \
                or not math.isfinite(self.temperature) or not self.temperature > 0:
            raise HeadError(f"temperature must be positive, got {self.temperature!r}")
        resolve_device(self.device)

    def _module(self, k: int, n_classes: int, device: torch.device | str = "cpu") -> KNNModule:
        return KNNModule(self.bank_.to(device), self.bank_labels_.to(device), k, n_classes,
                         float(self.temperature), self.weighting == "uniform", max(k, self._search_k()))

    def _search_k(self) -> int:
        """How many neighbours a search finds, of which the first k vote: the largest k of
        the grid it was chosen from. Why: rows tied in similarity at the k-th place (duplicate
        training rows) are cut where topk happens to cut them, and topk(k) and the first k of
        topk(K) cut differently; searching as the grid did makes the head predict exactly
        what its validation score measured (12 of 40 random grids with ties chose another k,
        or reported another top-1, when predict searched for k alone)."""
        return max(self.best_params_["k"], getattr(self, "search_k_", None) or 0)

    def bank_ks(self, rows: int) -> list[int]:
        """The k grid for a bank of `rows` rows, sorted: a k beyond the rows becomes `rows`, said
        in a warning (it votes with every training row, which a k chosen so may not mean)."""
        beyond = sorted(k for k in self._ks() if k > rows)
        if beyond:
            logger.warning("knn: k=%s exceeds the %d training rows; k=%d (every row) is used instead",
                           ", ".join(map(str, beyond)), rows, rows)
        return sorted({min(k, rows) for k in self._ks()})

    def _fit(self, X, y, X_val, y_val, n_classes: int) -> None:
        ks = self.bank_ks(len(X))
        if len(ks) > 1 and X_val is None:
            raise HeadError("knn needs validation data to choose k from a grid (or pass one k)")
        self.bank_ = directions(torch.from_numpy(X), "training")
        self.bank_labels_ = torch.from_numpy(y)
        self.bank_source_ = None
        self.choose_k(ks, [] if X_val is None else [(X_val, y_val)], n_classes)

    def choose_k(self, ks: list[int], validation: Iterable[tuple[np.ndarray, np.ndarray]],
                 n_classes: int) -> None:
        """Score every k in `ks` (sorted, at most the bank size) on validation blocks of
        (features, labels), one neighbour search per block; keep the best k."""
        device = resolve_device(self.device)
        correct, loss, n = np.zeros(len(ks)), np.zeros(len(ks)), 0
        for X_val, y_val in validation:
            similarities, neighbour_labels = self._neighbours(X_val, ks[-1], device)
            labels = torch.from_numpy(y_val).to(device)
            for index, k in enumerate(ks):  # the top-k of every k are prefixes of the top-max(k)
                probabilities = knn_vote(similarities[:, :k], neighbour_labels[:, :k], n_classes,
                                         float(self.temperature), self.weighting == "uniform")
                correct[index] += (probabilities.argmax(dim=1) == labels).sum().item()
                loss[index] -= probabilities.gather(1, labels[:, None]).log().sum().item()
            n += len(y_val)
        self.sweep_ = [{"k": k, "val_top1": c / n, "val_log_loss": total / n}
                       for k, c, total in zip(ks, correct, loss)] if n else []
        best = max(self.sweep_, key=lambda entry: (entry["val_top1"], -entry["val_log_loss"]),
                   default={"k": ks[0]})
        self.best_params_, self.search_k_ = {"k": best["k"]}, ks[-1]
        logger.info("knn: chose k=%d", best["k"])

    def _bank_chunks(self, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
        if not getattr(self, "bank_source_", None):
            yield self.bank_.to(device), self.bank_labels_.to(device)
            return
        reader = getattr(self, "bank_reader_", None)
        if reader is None:
            raise HeadError("this knn head searches its cache's features on disk; load it with "
                            "featurecache.load_head(cache, name), which attaches them")
        for features, labels in reader():  # normalised in place, as F.normalize would: one copy of a shard
            features = features.to(device)
            yield directions(features, "training", in_place=True), labels.to(device)

    def _neighbours(self, X: np.ndarray, k: int, device: torch.device) -> tuple[Tensor, Tensor]:
        # X was checked where it came in (fit, predict_proba; a streamed split by the fit stage)
        queries = directions(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)).to(device), "query")
        streamed = getattr(self, "bank_source_", None)  # out of core: smaller products too
        return nearest_neighbours(queries, self._bank_chunks(device), k,
                                  STREAMED_BLOCK_ELEMENTS if streamed else BLOCK_ELEMENTS)

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        device = resolve_device(self.device)
        with torch.no_grad():
            k = self.best_params_["k"]
            similarities, labels = self._neighbours(X, self._search_k(), device)
            return knn_vote(similarities[:, :k], labels[:, :k], len(self.classes_), float(self.temperature),
                            self.weighting == "uniform").cpu().numpy()

    def export_refusal(self) -> str:
        """Why a streamed head has no self-contained module, and what to do instead."""
        source = self.bank_source_
        return (f"this knn head searches the cache's {source['rows']:,} {source['split']} rows on disk (its bank "
                f"exceeded the memory budget when it was fitted), so it cannot be exported; export a logistic or "
                f"mlp head, or fit knn again with --max-memory {-(-source['bytes'] // 2**20)}M or more")

    def as_module(self) -> nn.Module:
        check_is_fitted(self)
        if getattr(self, "bank_source_", None):
            return ProbabilitiesModule(self, self.export_refusal()).eval()  # the bank is not in a module
        return self._module(self.best_params_["k"], len(self.classes_)).eval()

    def to_tensors(self) -> dict[str, Tensor]:
        check_is_fitted(self)
        if getattr(self, "bank_source_", None):
            return {}  # the bank stays in the cache's shards
        return {"bank": self.bank_.contiguous(), "bank_labels": self.bank_labels_.contiguous()}

    def _load_tensors(self, tensors: dict[str, Tensor], config: dict) -> None:
        if not isinstance(self.best_params_, dict) or not isinstance(self.best_params_.get("k"), int) \
                or self.best_params_["k"] < 1:
            raise MismatchError(f"saved knn best_params_ {self.best_params_!r} has no valid k")
        search_k = self.search_k_
        if search_k is not None and not (isinstance(search_k, int) and self.best_params_["k"] <= search_k):
            raise MismatchError(f"saved knn search_k_ {search_k!r} is not an integer of at least k")
        if self.bank_source_:
            return
        self.bank_ = tensors["bank"].float()
        self.bank_labels_ = tensors["bank_labels"].long()
        if self.bank_.ndim != 2 or self.bank_.shape[1] != self.n_features_in_:
            raise MismatchError(f"saved knn bank has shape {tuple(self.bank_.shape)}, "
                                f"the config says {self.n_features_in_} features")
        if self.bank_labels_.shape != (len(self.bank_),) or (len(self.bank_labels_) and (
                self.bank_labels_.min() < 0 or self.bank_labels_.max() >= len(self.classes_))):
            raise MismatchError(f"saved knn labels (shape {tuple(self.bank_labels_.shape)}) do not match its bank "
                                f"of {len(self.bank_)} rows and {len(self.classes_)} classes")
        if max(self.best_params_["k"], search_k or 0) > len(self.bank_):
            raise MismatchError(f"saved knn k={self.best_params_['k']} (search {search_k}) exceeds its bank of "
                                f"{len(self.bank_)} rows")
