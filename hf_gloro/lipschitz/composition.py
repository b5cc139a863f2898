"""Composition of Lipschitz bounds: a chain's constant is the product of its members' constants.

Only this package's own container, :class:`LipschitzSequential`, is bounded as a chain, and only while it runs
``nn.Sequential.forward``. Any other module, including an ``nn.Sequential`` (or a subclass with its own
``forward``, e.g. ``return x + super().forward(x)``), is an :class:`UnknownLipschitzError`, never silently 1
(the reference code's fallback made arbitrary graphs with skips, BatchNorm or Dropout unsound).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .bounded import LipschitzBounded, UnknownLipschitzError, check_bounded_forward


def _unknown(module: nn.Module) -> UnknownLipschitzError:
    kind = type(module).__qualname__
    hint = (" (an nn.Sequential is not trusted to be a chain: its forward may be overridden; "
            "use hf_gloro.lipschitz.LipschitzSequential)") if isinstance(module, nn.Sequential) else ""
    return UnknownLipschitzError(
        f"cannot bound the Lipschitz constant of {kind}{hint}; use the layers in hf_gloro.lipschitz "
        "(LipschitzLinear, LipschitzConv2d, LinearResidualConv2d, MinMax, ...) or implement the "
        "LipschitzBounded protocol (_compute_upper_bound, _compute_rounding_model, _bounded_forward)"
    )


def _bounded(module: nn.Module) -> LipschitzBounded:
    if not isinstance(module, LipschitzBounded):
        raise _unknown(module)
    check_bounded_forward(module)
    return module


def chain_leaves(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """The layers a chain executes, in order, with nested :class:`LipschitzSequential` expanded.

    Raises :class:`UnknownLipschitzError` for any member that is not a bounded layer running its bounded forward.
    """
    leaves: list[nn.Module] = []
    for module in modules:
        _bounded(module)
        if isinstance(module, LipschitzSequential):
            leaves.extend(chain_leaves(module))
        else:
            leaves.append(module)
    return leaves


def product_upper_bound(bounds: Iterable[float]) -> float:
    """``Π bounds`` rounded up: the float64 product rounds once per factor, covered with a wide margin."""
    result, count = 1.0, 0
    for bound in bounds:
        if not math.isfinite(bound) or bound < 0:
            raise ValueError(f"invalid Lipschitz bound {bound}")
        result *= bound
        count += 1
    return result * (1.0 + 4 * count * 2.0**-53)


def lipschitz_estimate(module: nn.Module, iterations: int = 1, update: bool = True) -> torch.Tensor:
    """Differentiable power-iteration estimate of ``module``'s Lipschitz constant (training only)."""
    return _bounded(module).lipschitz_estimate(iterations, update)


def lipschitz_upper_bound(module: nn.Module) -> float:
    """Guaranteed upper bound on ``module``'s L2 Lipschitz constant (product over a chain)."""
    bound = _bounded(module).lipschitz_upper_bound()
    if not math.isfinite(bound) or bound < 0:
        raise ValueError(f"invalid Lipschitz bound {bound} for {type(module).__name__}")
    return bound


class LipschitzSequential(LipschitzBounded, nn.Sequential):
    """``nn.Sequential`` whose bound is the product of its members' bounds (every member must be bounded)."""

    _bounded_forward = nn.Sequential.forward

    def _estimate(self, iterations: int, update: bool) -> torch.Tensor:
        result = torch.ones(())
        for child in self:
            result = result * lipschitz_estimate(child, iterations, update)
        return result

    def lipschitz_upper_bound(self) -> float:
        # Members cache their own bounds; the product is cheap and always current.
        check_bounded_forward(self)
        return product_upper_bound(lipschitz_upper_bound(leaf) for leaf in chain_leaves(self))

    def rounding_model(self):
        raise UnknownLipschitzError("a LipschitzSequential has no single rounding model; use chain_leaves()")


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
