"""The GloRo head: a dense logits layer, optionally with unit-norm rows ("last-layer normalisation")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bounded import orthogonal_init_
from .margins import pairwise_row_distances, pairwise_row_distances_upper_bound
from .numerics import weights_fingerprint


class GloRoHead(nn.Linear):
    """Logits ``y = Ŵ z + b`` with ``Ŵ = W`` or, with ``normalize_rows`` (LLN), ``ŵ_i = w_i / ‖w_i‖₂``.

    The head is not part of the sub-network constant ``k``: its rows enter the per-pair margin constants
    ``K_ji = k · ‖ŵ_j − ŵ_i‖₂`` (the bias cancels in every margin).
    """

    def __init__(self, in_features: int, num_classes: int, normalize_rows: bool = False, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.normalize_rows = normalize_rows
        orthogonal_init_(self)

    def effective_weight(self) -> torch.Tensor:
        """The matrix the forward pass multiplies with (after LLN when enabled)."""
        return F.normalize(self.weight, dim=1) if self.normalize_rows else self.weight

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.effective_weight(), self.bias)

    def margin_constants_estimate(self, sub_lipschitz: torch.Tensor) -> torch.Tensor:
        """Differentiable ``K_ji = k ‖ŵ_j − ŵ_i‖`` from a training estimate ``k`` (``m × m``)."""
        return sub_lipschitz * pairwise_row_distances(self.effective_weight())

    @torch.no_grad()
    def margin_constants_upper_bound(self, sub_lipschitz: float) -> torch.Tensor:
        """Guaranteed ``K_ji`` (float64, ``m × m``) from a guaranteed bound ``k`` on the features' map.

        Uses the very float32 matrix the forward pass multiplies with, so LLN rounding is accounted for.
        Cached until the weights or ``k`` change.
        """
        key = (weights_fingerprint(self.weight), float(sub_lipschitz), self.normalize_rows)
        cache = self.__dict__.get("_margin_cache")
        if cache is None or cache[0] != key:
            distances = pairwise_row_distances_upper_bound(self.effective_weight())
            cache = (key, distances * float(sub_lipschitz))
            self.__dict__["_margin_cache"] = cache
        return cache[1]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", normalize_rows={self.normalize_rows}"
