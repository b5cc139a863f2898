"""The GloRo head: a dense logits layer, optionally with unit-norm rows ("last-layer normalisation")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bounded import check_bounded_forward, orthogonal_init_, settings_signature
from .certificate import HeadConstants
from .margins import pairwise_row_distances, pairwise_row_distances_upper_bound
from .numerics import content_digest, round_up


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
        # The (normalised) matrix is formed in the parameters' dtype, then follows the input's dtype.
        bias = None if self.bias is None else self.bias.to(features.dtype)
        return F.linear(features, self.effective_weight().to(features.dtype), bias)

    _bounded_forward = forward

    def margin_constants_estimate(self, sub_lipschitz: torch.Tensor) -> torch.Tensor:
        """Differentiable ``K_ji = k ‖ŵ_j − ŵ_i‖`` from a training estimate ``k`` (``m × m``)."""
        return sub_lipschitz * pairwise_row_distances(self.effective_weight())

    def bound_key(self) -> tuple:
        """Content hash of the weight and bias plus every setting (``normalize_rows``): the cache key."""
        check_bounded_forward(self)
        return (content_digest(p for p in (self.weight, self.bias) if p is not None), settings_signature(self))

    @torch.no_grad()
    def head_constants(self) -> HeadConstants:
        """Guaranteed float64 constants of the matrix the forward multiplies with (LLN rounding included),
        cached until a weight, the bias or a setting (``normalize_rows``) changes."""
        key = self.bound_key()
        cache = self.__dict__.get("_cache_head")
        if cache is None or cache[0] != key:
            weight = self.effective_weight().detach()
            w = weight.to(device="cpu", dtype=torch.float64)
            bias = torch.zeros(w.shape[0], dtype=torch.float64) if self.bias is None else (
                self.bias.detach().to(device="cpu", dtype=torch.float64).abs())
            constants = HeadConstants(
                distances=pairwise_row_distances_upper_bound(weight),
                abs_weight=w.abs(),
                row_norms=round_up(w.norm(dim=1) * (1 + 1e-12)),
                abs_bias=bias,
                fan_in=w.shape[1],
            )
            cache = (key, constants)
            self.__dict__["_cache_head"] = cache
        return cache[1]

    @torch.no_grad()
    def margin_constants_upper_bound(self, sub_lipschitz: float) -> torch.Tensor:
        """Guaranteed ``K_ji = k‖ŵ_j − ŵ_i‖`` (float64, ``m × m``) from a guaranteed bound ``k`` on the features' map."""
        return round_up(self.head_constants().distances * float(sub_lipschitz) * (1 + 1e-15))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", normalize_rows={self.normalize_rows}"
