"""Dense layer with a persistent power iterate and an exact (float64) spectral-norm bound."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bounded import LipschitzBounded, RoundingModel, orthogonal_init_, reset_unit_iterate
from .float_error import absolute_dense_norm_bound
from .linf import dense_linf_to_l2_bounds, dense_linf_to_l2_estimate
from .power_iteration import dense_operator, spectral_norm_estimate
from .spectral_bounds import dense_spectral_norm_bound


class LipschitzLinear(LipschitzBounded, nn.Linear):
    """``nn.Linear`` whose Lipschitz constant ``‖W‖₂`` is tracked (bias does not change it).

    Buffers:
        power_iterate: ``(in_features,)`` unit vector, warm start of the power iteration (persistent).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, orthogonal_init: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("power_iterate", torch.empty(in_features, device=device, dtype=dtype))
        if orthogonal_init:
            orthogonal_init_(self)
        self.reset_power_iterate()

    def reset_power_iterate(self) -> None:
        reset_unit_iterate(self.power_iterate)

    def _estimate(self, iterations: int, update: bool) -> torch.Tensor:
        forward, adjoint = dense_operator(self.weight)
        return spectral_norm_estimate(self.power_iterate, forward, adjoint, iterations, update)

    def _compute_upper_bound(self) -> float:
        return dense_spectral_norm_bound(self.weight)

    def linf_to_l2_upper_bound(self) -> float:
        """Guaranteed ``‖W‖∞→2`` (the L∞ certificate's first-layer bound; :mod:`hf_gloro.lipschitz.linf`), cached
        under the same key as the L2 bound (weights and settings)."""
        return self._cached("linf_to_l2", lambda: min(
            dense_linf_to_l2_bounds(self.weight, self.lipschitz_upper_bound()).values()))

    def linf_to_l2_estimate(self, spectral_estimate: torch.Tensor) -> torch.Tensor:
        """Differentiable training estimate of :meth:`linf_to_l2_upper_bound` (``spectral_estimate`` ≈ ‖W‖₂)."""
        return dense_linf_to_l2_estimate(self.weight, spectral_estimate)

    def _compute_rounding_model(self) -> RoundingModel:
        bias = 0.0 if self.bias is None else float(self.bias.detach().to(torch.float64).norm())
        return RoundingModel(fan_in=self.in_features, abs_norm=absolute_dense_norm_bound(self.weight),
                             bias_norm=bias * (1 + 1e-12))

    def absolute_forward(self, x_abs: torch.Tensor) -> torch.Tensor:
        """``|W|·x_abs + |b|``: the a-posteriori rounding term's operator."""
        bias = None if self.bias is None else self.bias.detach().abs().to(x_abs.dtype)
        return F.linear(x_abs, self.weight.detach().abs().to(x_abs.dtype), bias)

    def _bound_dependencies(self) -> tuple[torch.Tensor, ...]:
        return (self.weight,) if self.bias is None else (self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Parameters follow the input's dtype (float64 re-evaluation with the same float32 values).
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    _bounded_forward = forward
