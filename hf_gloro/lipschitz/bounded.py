"""The protocol every Lipschitz-bounded module follows, and the cache of its guaranteed bound.

A bounded module provides two numbers for the map it computes (L2 → L2):

* ``lipschitz_estimate(iterations, update)``: a differentiable power-iteration estimate (training);
* ``lipschitz_upper_bound()``: a guaranteed upper bound as a Python float (certification).
"""

from __future__ import annotations

import torch
from torch import nn

from .numerics import weights_fingerprint


class LipschitzBounded:
    """Mixin for ``nn.Module`` subclasses with a known Lipschitz constant.

    Subclasses implement ``_estimate(iterations, update)`` and ``_compute_upper_bound()`` and list the
    tensors the bound depends on in ``_bound_dependencies()``; this class caches the guaranteed bound and
    recomputes it whenever any of those tensors changes.
    """

    def lipschitz_estimate(self, iterations: int = 1, update: bool = True) -> torch.Tensor:
        return self._estimate(iterations, update)

    def lipschitz_upper_bound(self) -> float:
        fingerprint = weights_fingerprint(*self._bound_dependencies())
        cache = self.__dict__.get("_upper_bound_cache")
        if cache is None or cache[0] != fingerprint:
            cache = (fingerprint, float(self._compute_upper_bound()))
            self.__dict__["_upper_bound_cache"] = cache
        return cache[1]

    # --- to implement -------------------------------------------------------------------------------
    def _estimate(self, iterations: int, update: bool) -> torch.Tensor:
        raise NotImplementedError

    def _compute_upper_bound(self) -> float:
        raise NotImplementedError

    def _bound_dependencies(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.parameters()) + tuple(self.buffers())  # type: ignore[attr-defined]


class ConstantLipschitz(LipschitzBounded):
    """Mixin for parameter-free maps whose Lipschitz constant is a known constant ``lipschitz_constant``."""

    lipschitz_constant: float = 1.0

    def _estimate(self, iterations: int, update: bool) -> torch.Tensor:
        return torch.tensor(float(self.lipschitz_constant))

    def lipschitz_upper_bound(self) -> float:
        return float(self.lipschitz_constant)


def reset_unit_iterate(buffer: torch.Tensor) -> None:
    """Fill a power-iteration buffer with a random unit vector.

    Buffers restored from a checkpoint by ``transformers`` (flagged ``_is_hf_initialized``) and buffers
    on the meta device are left alone.
    """
    if buffer.device.type == "meta" or getattr(buffer, "_is_hf_initialized", False):
        return
    with torch.no_grad():
        nn.init.normal_(buffer)
        norm = buffer.norm()
        if norm > 0:
            buffer.div_(norm)



def orthogonal_init_(layer: nn.Module) -> None:
    """Orthogonal weight (rows of the flattened kernel), zero bias; skipped on the meta device."""
    if layer.weight.device.type == "meta":
        return
    nn.init.orthogonal_(layer.weight)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)
