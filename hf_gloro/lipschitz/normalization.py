"""Input normalisation ``(x − μ)/σ`` folded into the bound as ``1 / min σ``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .bounded import LipschitzBounded, RoundingModel


class InputNormalization(LipschitzBounded, nn.Module):
    """Per-channel ``(x − μ_c)/σ_c`` on ``(B, C, H, W)``.

    A diagonal map with entries ``1/σ_c``: its L2 Lipschitz constant is ``1 / min_c |σ_c|``. Keeping it
    inside the model lets ε and certified radii stay in the pixel scale (images in [0, 1]).

    ``mean``/``std`` are constructor arguments (the model's config), held in non-persistent buffers: a
    checkpoint cannot change them behind the config's back.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if any(float(s) <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self._values = ([float(m) for m in mean], [float(s) for s in std])
        self.register_buffer("mean", torch.tensor(self._values[0]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self._values[1]).view(1, -1, 1, 1), persistent=False)

    def init_non_persistent_buffers(self) -> None:
        """Rebuild the buffers from the constructor values (``from_pretrained`` leaves them uninitialised)."""
        with torch.no_grad():
            self.mean.copy_(torch.tensor(self._values[0]).view(1, -1, 1, 1))
            self.std.copy_(torch.tensor(self._values[1]).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    _bounded_forward = forward

    def _estimate(self, iterations: int, update: bool) -> torch.Tensor:
        return 1.0 / self.std.abs().min()

    def _compute_upper_bound(self) -> float:
        std = self.std.detach().to(torch.float64)
        if not torch.isfinite(std).all() or (std <= 0).any():
            raise ValueError("input normalisation std must be finite and positive")
        # 1/σ rounded up: the float64 reciprocal is within one ulp.
        return (1.0 / float(std.min())) * (1.0 + 1e-15)

    def _compute_rounding_model(self) -> RoundingModel:
        # fl(fl(x − μ)/σ) = ((x − μ)(1 + δ₁)/σ)(1 + δ₂): error ≤ γ₂·|x − μ|/σ ≤ γ₂(|x|/σ + |μ|/σ) per element,
        # i.e. one "product" per output (n = 1) with |A| = A = diag(1/σ) and the bias −μ/σ.
        mean = self.mean.detach().to(torch.float64).reshape(-1)
        std = self.std.detach().to(torch.float64).reshape(-1)
        return RoundingModel(fan_in=1, abs_norm=self._compute_upper_bound(),
                             bias_norm=float((mean / std).norm()) * (1 + 1e-12))

    def absolute_forward(self, x_abs: torch.Tensor) -> torch.Tensor:
        """``(|x| + |μ|)/σ`` ≥ ``|x − μ|/σ``: the a-posteriori rounding term's operator."""
        return (x_abs + self.mean.abs().to(x_abs.dtype)) / self.std.to(x_abs.dtype)

    def _bound_dependencies(self) -> tuple[torch.Tensor, ...]:
        return (self.mean, self.std)
