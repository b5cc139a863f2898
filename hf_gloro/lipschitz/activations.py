"""1-Lipschitz activations."""

from __future__ import annotations

import torch
from torch import nn

from .bounded import ConstantLipschitz


class MinMax(ConstantLipschitz, nn.Module):
    """GroupSort-2 ("MinMax"): pairs channel ``c`` with ``c + C/2`` and outputs ``[max, min]``.

    Sorting each pair is a permutation of its two entries, so the map is 1-Lipschitz in L2 and preserves
    gradient norms. Works on ``(B, C)`` and ``(B, C, H, W)``; ``C`` must be even.
    """

    lipschitz_constant = 1.0
    exact_in_floating_point = True  # max/min/cat copy values; the norm is preserved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        if channels % 2:
            raise ValueError(f"MinMax needs an even number of channels, got {channels}")
        a, b = x[:, : channels // 2], x[:, channels // 2 :]
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)

    _bounded_forward = forward


class ReLU(ConstantLipschitz, nn.ReLU):
    """``nn.ReLU`` with its Lipschitz constant 1 declared."""

    lipschitz_constant = 1.0
    exact_in_floating_point = True  # max(x, 0) is exact and never increases the norm
    _bounded_forward = nn.ReLU.forward


class Flatten(ConstantLipschitz, nn.Flatten):
    """``nn.Flatten``: a reshape, an isometry."""

    lipschitz_constant = 1.0
    exact_in_floating_point = True
    _bounded_forward = nn.Flatten.forward


def create_activation(name: str) -> nn.Module:
    """Activation by name: ``"minmax"`` or ``"relu"``."""
    if name == "minmax":
        return MinMax()
    if name == "relu":
        return ReLU()
    raise ValueError(f"unknown activation {name!r}; expected 'minmax' or 'relu'")
