"""LiResNet's linear residual block, bounded as one merged convolution.

The block computes ``y = x + α·conv(x; γ⊙V) + b`` with a 3×3 kernel, stride 1, padding 1, and *no*
activation inside (the non-linearity follows the skip-add). Since ``x = conv(x; I_center)`` this is one
convolution with kernel

    K = I_center + α · γ ⊙ V,

whose spectral norm is computed directly. That is much tighter than ``1 + α‖γ⊙V‖``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .bounded import LipschitzBounded, reset_unit_iterate
from .conv import _ConvGeometry
from .spectral_bounds import _pair


class LinearResidualConv2d(_ConvGeometry, LipschitzBounded, nn.Module):
    """``x ↦ conv(x; I_center + α·γ⊙V) + b`` (LiResNet block without its activation).

    Args:
        channels: input = output channels.
        input_size: spatial size the block is applied to (its bound depends on it).
        residual_scale: α, LiResNet uses ``depth^{-1/2}`` (fixed, not trained).
    Parameters:
        weight: V ``(C, C, 3, 3)``, initialised ``N(0, 1)/(9C)``; gain: γ ``(C,)`` = 1; bias ``(C,)`` = 0.
    """

    def __init__(self, channels: int, input_size: int | tuple[int, int], residual_scale: float = 1.0,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.channels = channels
        self.input_size = _pair(input_size)
        self.stride, self.padding, self.dilation, self.groups = (1, 1), (1, 1), (1, 1), 1
        self.residual_scale = float(residual_scale)
        self.weight = nn.Parameter(torch.empty(channels, channels, 3, 3, device=device, dtype=dtype))
        self.gain = nn.Parameter(torch.empty(channels, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(channels, device=device, dtype=dtype)) if bias else None
        identity = torch.zeros(channels, channels, 3, 3, device=device, dtype=dtype)
        if identity.device.type != "meta":
            identity[torch.arange(channels), torch.arange(channels), 1, 1] = 1.0
        # Rebuilt from `channels`, never loaded: a checkpoint cannot change the skip connection.
        self.register_buffer("identity_kernel", identity, persistent=False)
        self.register_buffer("power_iterate", torch.empty(1, channels, *self.input_size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.device.type == "meta":
            return
        with torch.no_grad():
            nn.init.normal_(self.weight, std=1.0 / (9 * self.channels))
            nn.init.ones_(self.gain)
            if self.bias is not None:
                nn.init.zeros_(self.bias)
        self.reset_power_iterate()

    def init_non_persistent_buffers(self) -> None:
        """Rebuild the identity kernel (``from_pretrained`` leaves non-persistent buffers uninitialised)."""
        with torch.no_grad():
            self.identity_kernel.zero_()
            self.identity_kernel[torch.arange(self.channels), torch.arange(self.channels), 1, 1] = 1.0

    def reset_power_iterate(self) -> None:
        reset_unit_iterate(self.power_iterate)

    def effective_kernel(self) -> torch.Tensor:
        return self.identity_kernel + self.residual_scale * self.gain[:, None, None, None] * self.weight

    def _bound_dependencies(self) -> tuple[torch.Tensor, ...]:
        deps = (self.weight, self.gain, self.identity_kernel)
        return deps if self.bias is None else (*deps, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The kernel is formed in the parameters' dtype (the very values the bound is computed from), then
        # follows the input's dtype for a float64 re-evaluation.
        self._check_input_size(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.training and x.dtype == torch.float32 and x.device.type == "cpu" and x.requires_grad:
            # Training on the CPU: oneDNN's channels-last kernels are faster, and the format carries through the
            # MinMax and the following blocks (one copy for the whole trunk). Values may differ in the last bits
            # (summation order); certificates do not use this path, and any order obeys their error model.
            x = x.contiguous(memory_format=torch.channels_last)
        return F.conv2d(x, self.effective_kernel().to(x.dtype), bias, padding=1)

    _bounded_forward = forward

    def extra_repr(self) -> str:
        return f"channels={self.channels}, input_size={self.input_size}, residual_scale={self.residual_scale:.4g}"


def liresnet_residual_scale(depth: int) -> float:
    """α = depth^{-1/2}, the LiResNet scaling of the residual branch."""
    return 1.0 / math.sqrt(depth)
