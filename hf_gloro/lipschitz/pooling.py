"""Average pooling with its true operator norm."""

from __future__ import annotations

import torch
from torch import nn

from .bounded import LipschitzBounded, RoundingModel
from .spectral_bounds import _pair, conv2d_spectral_norm_bound


class LipschitzAvgPool2d(LipschitzBounded, nn.AvgPool2d):
    """``nn.AvgPool2d`` without padding, bounded as the depthwise convolution with kernel ``1/k²``.

    The pooling acts on each channel identically, so its norm is that of the single-channel convolution
    (for ``stride = kernel`` it is ``1/k``: e.g. 0.5 for a 2×2 pool).
    """

    def __init__(self, kernel_size: int | tuple[int, int], input_size: int | tuple[int, int],
                 stride: int | tuple[int, int] | None = None) -> None:
        super().__init__(kernel_size, stride=stride, padding=0)
        self.input_size = _pair(input_size)

    def _kernel(self) -> torch.Tensor:
        kh, kw = _pair(self.kernel_size)
        return torch.full((1, 1, kh, kw), 1.0 / (kh * kw), dtype=torch.float64)

    def _estimate(self, iterations: int, update: bool) -> torch.Tensor:
        return torch.tensor(self.lipschitz_upper_bound())

    def _compute_upper_bound(self) -> float:
        # The bound is that of the plain average; the forward reads these settings too.
        if _pair(self.padding) != (0, 0) or self.ceil_mode or self.divisor_override is not None:
            raise ValueError("LipschitzAvgPool2d is bounded without padding, ceil_mode or divisor_override; got "
                             f"padding={self.padding}, ceil_mode={self.ceil_mode}, "
                             f"divisor_override={self.divisor_override}")
        return conv2d_spectral_norm_bound(self._kernel(), self.input_size, _pair(self.stride))

    def _compute_rounding_model(self) -> RoundingModel:
        # A sum of k² terms and one division: a dot product with the non-negative weights 1/k² (|A| = A).
        kh, kw = _pair(self.kernel_size)
        return RoundingModel(fan_in=kh * kw, abs_norm=self.lipschitz_upper_bound())

    def absolute_forward(self, x_abs: torch.Tensor) -> torch.Tensor:
        """The average of ``|x|`` (non-negative weights: ``|A| = A``)."""
        return self(x_abs)

    def _bound_dependencies(self) -> tuple[torch.Tensor, ...]:
        return ()

    _bounded_forward = nn.AvgPool2d.forward
