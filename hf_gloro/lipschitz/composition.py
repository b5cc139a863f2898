"""Composition of Lipschitz bounds: a chain's constant is the product of its members' constants.

A module whose constant is unknown is an error, never silently 1 (the reference code's fallback made
arbitrary graphs with skips, BatchNorm or Dropout unsound).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .bounded import LipschitzBounded


class UnknownLipschitzError(TypeError):
    """Raised for a module whose Lipschitz constant this package cannot bound."""


def _unknown(module: nn.Module) -> UnknownLipschitzError:
    return UnknownLipschitzError(
        f"cannot bound the Lipschitz constant of {type(module).__name__}; use the layers in "
        "hf_gloro.lipschitz (LipschitzLinear, LipschitzConv2d, LinearResidualConv2d, MinMax, ...) "
        "or implement lipschitz_estimate/lipschitz_upper_bound"
    )


def _chain_estimate(children, iterations: int, update: bool) -> torch.Tensor:
    result = torch.ones(())
    for child in children:
        result = result * lipschitz_estimate(child, iterations, update)
    return result


def _chain_upper_bound(children) -> float:
    bound, count = 1.0, 0
    for child in children:
        bound *= lipschitz_upper_bound(child)
        count += 1
    # The float64 product itself rounds: one ulp per factor, covered with a wide margin.
    return bound * (1.0 + 4 * count * 2.0**-53)


def lipschitz_estimate(module: nn.Module, iterations: int = 1, update: bool = True) -> torch.Tensor:
    """Differentiable power-iteration estimate of ``module``'s Lipschitz constant (training only)."""
    if isinstance(module, LipschitzBounded):
        return module.lipschitz_estimate(iterations, update)
    if isinstance(module, nn.Sequential):
        return _chain_estimate(module, iterations, update)
    raise _unknown(module)


def lipschitz_upper_bound(module: nn.Module) -> float:
    """Guaranteed upper bound on ``module``'s L2 Lipschitz constant (product over a chain)."""
    if isinstance(module, LipschitzBounded):
        bound = module.lipschitz_upper_bound()
    elif isinstance(module, nn.Sequential):
        bound = _chain_upper_bound(module)
    else:
        raise _unknown(module)
    if not math.isfinite(bound) or bound < 0:
        raise ValueError(f"invalid Lipschitz bound {bound} for {type(module).__name__}")
    return bound


class LipschitzSequential(LipschitzBounded, nn.Sequential):
    """``nn.Sequential`` whose bound is the product of its members' bounds (every member must be bounded)."""

    def _estimate(self, iterations: int, update: bool) -> torch.Tensor:
        return _chain_estimate(self, iterations, update)

    def lipschitz_upper_bound(self) -> float:
        # Members cache their own bounds; the product is cheap and always current.
        return _chain_upper_bound(self)


@torch.no_grad()
def converge_power_iterates(
    module: nn.Module, tolerance: float = 1e-6, max_iterations: int = 2000, chunk: int = 10
) -> float:
    """Run power iterations until the estimate's relative change is below ``tolerance``; returns it.

    The result is still an estimate from below; use it to warm up the iterates before evaluation and as
    the denominator of tightness ratios, never for a certificate.
    """
    previous = float(lipschitz_estimate(module, chunk, update=True))
    done = chunk
    while done < max_iterations:
        current = float(lipschitz_estimate(module, chunk, update=True))
        done += chunk
        if abs(current - previous) <= tolerance * max(abs(current), 1e-30):
            return current
        previous = current
    return previous
