"""A head's own `predict_proba` as a torch module, for heads whose probabilities are not a
module's: a scikit-learn estimator that is not a softmax of a linear map, a k-NN head
whose bank is read from disk at each call."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import HeadError


class ProbabilitiesModule(nn.Module):
    """Features -> probabilities through `head.predict_proba`, so such a head predicts on new
    images as it does on cached features. TorchScript (script or trace, hence export) is
    refused with `refusal`; rows with NaN or inf features get NaN probabilities, as a
    module would give."""

    def __init__(self, head, refusal: str) -> None:
        super().__init__()
        self.fitted, self.refusal = head, refusal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() or torch.jit.is_scripting():
            raise HeadError(self.refusal)
        values = x.detach().cpu().float().numpy()
        finite = np.isfinite(values).all(axis=1)
        out = np.full((len(values), len(self.fitted.classes_)), np.nan, dtype=np.float32)
        if finite.any():
            out[finite] = self.fitted.predict_proba(values[finite])
        return torch.from_numpy(out)

    def __prepare_scriptable__(self) -> nn.Module:
        raise HeadError(self.refusal)
