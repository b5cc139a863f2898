"""2-D convolution with a persistent power iterate at the real input size and a guaranteed FFT bound."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bounded import LipschitzBounded, RoundingModel, orthogonal_init_, reset_unit_iterate
from .float_error import absolute_conv_norm_bound
from .linf import conv2d_linf_to_l2_bounds, conv2d_linf_to_l2_estimate
from .power_iteration import conv2d_operator, spectral_norm_estimate
from .spectral_bounds import _pair, conv2d_spectral_norm_bound


class _ConvGeometry:
    """Shared bookkeeping of convolution-like layers whose operator depends on the input size."""

    input_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    power_iterate: torch.Tensor
    bias: torch.Tensor | None

    def effective_kernel(self) -> torch.Tensor:
        raise NotImplementedError

    def _compute_rounding_model(self) -> RoundingModel:
        kernel = self.effective_kernel().detach()
        bias = 0.0 if self.bias is None else float(self.bias.detach().to(torch.float64).norm())
        return RoundingModel(fan_in=kernel[0].numel(), abs_norm=absolute_conv_norm_bound(kernel, self.groups),
                             bias_norm=bias * (1 + 1e-12))

    def absolute_forward(self, x_abs: torch.Tensor) -> torch.Tensor:
        """``|A|·x_abs + |b|`` (the convolution with ``|K|``): the a-posteriori rounding term's operator."""
        bias = None if self.bias is None else self.bias.detach().abs().to(x_abs.dtype)
        kernel = self.effective_kernel().detach().abs().to(x_abs.dtype)
        return F.conv2d(x_abs, kernel, bias, self.stride, self.padding, self.dilation, self.groups)

    def _check_input_size(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(
                f"{type(self).__name__} was bounded for inputs of size {self.input_size}, got {tuple(x.shape[-2:])}"
            )

    def _estimate(self, iterations: int, update: bool) -> torch.Tensor:
        forward, adjoint = conv2d_operator(
            self.effective_kernel(), self.input_size, self.stride, self.padding, self.dilation, self.groups
        )
        return spectral_norm_estimate(self.power_iterate, forward, adjoint, iterations, update)

    def _compute_upper_bound(self) -> float:
        return conv2d_spectral_norm_bound(
            self.effective_kernel(), self.input_size, self.stride, self.padding, self.dilation, self.groups
        )

    @property
    def output_size(self) -> tuple[int, int]:
        kernel = self.effective_kernel().shape[-2:]
        return tuple(  # type: ignore[return-value]
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, k, s, p, d in zip(self.input_size, kernel, self.stride, self.padding, self.dilation)
        )


class LipschitzConv2d(_ConvGeometry, LipschitzBounded, nn.Conv2d):
    """``nn.Conv2d`` (zero padding) bounded at a fixed input size.

    The operator norm of a padded convolution depends on the spatial size it is applied to, so the size is
    part of the layer: ``input_size=(H, W)``. Inputs of another size are rejected.

    Buffers:
        power_iterate: ``(1, C_in, H, W)`` unit tensor, warm start of the power iteration (persistent).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        input_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        orthogonal_init: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        if isinstance(padding, str):
            raise ValueError("LipschitzConv2d needs explicit integer padding, not a padding string")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode="zeros", device=device, dtype=dtype)
        self.input_size = _pair(input_size)
        self.register_buffer(
            "power_iterate", torch.empty(1, in_channels, *self.input_size, device=device, dtype=dtype)
        )
        if orthogonal_init:
            orthogonal_init_(self)
        self.reset_power_iterate()

    def reset_power_iterate(self) -> None:
        reset_unit_iterate(self.power_iterate)

    def effective_kernel(self) -> torch.Tensor:
        return self.weight

    def linf_to_l2_upper_bound(self) -> float:
        """Guaranteed ``‖conv‖∞→2`` at ``input_size`` (the L∞ certificate's first-layer bound;
        :mod:`hf_gloro.lipschitz.linf`), cached under the same key as the L2 bound (weights and settings)."""
        # effective_kernel(), like the L2 bound: a subclass that changes the kernel changes every bound with it.
        return self._cached("linf_to_l2", lambda: min(conv2d_linf_to_l2_bounds(
            self.effective_kernel(), self.input_size, self.stride, self.padding, self.dilation, self.groups,
            spectral_bound=self.lipschitz_upper_bound()).values()))

    def linf_to_l2_estimate(self, spectral_estimate: torch.Tensor) -> torch.Tensor:
        """Differentiable training estimate of :meth:`linf_to_l2_upper_bound` (``spectral_estimate`` ≈ ‖conv‖₂)."""
        return conv2d_linf_to_l2_estimate(self.effective_kernel(), self.input_size, self.stride, self.padding,
                                          self.dilation, self.groups, spectral_estimate)

    def _bound_dependencies(self) -> tuple[torch.Tensor, ...]:
        return (self.weight,) if self.bias is None else (self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Parameters follow the input's dtype, so a float64 input is evaluated in float64 with exactly the
        # float32 values the bound was computed from (the certificate's re-evaluation path).
        self._check_input_size(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, self.weight.to(x.dtype), bias, self.stride, self.padding, self.dilation, self.groups)

    _bounded_forward = forward

    def extra_repr(self) -> str:
        return super().extra_repr() + f", input_size={self.input_size}"
