"""The protocol every Lipschitz-bounded module follows, and the caches of what a certificate rests on.

A bounded module provides, for the map it computes (L2 → L2):

* ``lipschitz_estimate(iterations, update)``: a differentiable power-iteration estimate (training);
* ``lipschitz_upper_bound()``: a guaranteed upper bound as a Python float (certification);
* ``rounding_model()``: how its floating-point evaluation may deviate from the exact map
  (:class:`RoundingModel`, used by :mod:`hf_gloro.lipschitz.float_error`).

Both guaranteed quantities are cached under a key that covers **everything the forward pass reads**: a
content hash of every tensor (:func:`~hf_gloro.lipschitz.numerics.tensor_digest`, so writes through ``.data``,
permutations, sign flips and exponent shifts are all seen) and every non-tensor attribute of the module
(stride, padding, ``residual_scale``, ``normalize_rows`` ...), see :func:`settings_signature`.

A bound is only valid for the ``forward`` it was derived for. Each class names that function in
``_bounded_forward``; a subclass that overrides ``forward`` without declaring it is refused
(:func:`check_bounded_forward`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .numerics import content_digest, tensor_digest


class UnknownLipschitzError(TypeError):
    """Raised for a module whose Lipschitz constant (or floating-point behaviour) this package cannot bound."""


@dataclass(frozen=True)
class RoundingModel:
    """The floating-point error model of one layer ``y = φ(x)``.

    Affine layers ``y = A x + b`` (dense, convolution, pooling, normalisation) computed in a dtype with unit
    roundoff ``u`` satisfy, for the input ``x̂`` they are actually given (Higham Lemma 3.1 per output, any
    summation order, FMA or not; the bias adds one term),

        ‖fl(A x̂ + b) − (A x̂ + b)‖₂ ≤ γ_{n+1}·(‖|A|‖₂·‖x̂‖₂ + ‖b‖₂) + 2·√M·(n + 1)·λ

    with ``n`` = ``fan_in`` (terms per output), ``‖|A|‖₂ ≤ abs_norm`` (the norm of the entrywise absolute
    value of the linear part), ``‖b‖₂ ≤ bias_norm`` (over the whole output), ``M`` output elements and ``λ`` the
    smallest normal number (an absolute term per operation that covers underflow and flush-to-zero).

    ``exact`` layers (MinMax, ReLU, Flatten) only compare and copy: ``fl(φ(x)) = φ(x)``, and ``‖φ(x)‖ ≤ ‖x‖``.
    """

    exact: bool = False
    fan_in: int = 0
    abs_norm: float = 0.0
    bias_norm: float = 0.0


EXACT = RoundingModel(exact=True)


#: Instance attributes every ``nn.Module`` has (hook tables, registries, ``training``): not settings.
_MODULE_INTERNALS = frozenset(vars(nn.Module()).keys())


def _freeze(value):
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return tuple(sorted(repr(_freeze(v)) for v in value))
    if isinstance(value, dict):
        return tuple(sorted((repr(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, torch.Tensor):
        return tensor_digest(value)
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    return (type(value).__qualname__, repr(value))


def settings_signature(module: nn.Module) -> tuple:
    """Every non-tensor attribute of ``module`` (and its type): what a cached bound must be keyed on besides
    its tensors. Parameters, buffers, sub-modules, hook tables, the train/eval flag and this package's own
    caches (``_cache_*``) are left out."""
    items = []
    for key, value in vars(module).items():
        if key in _MODULE_INTERNALS or key.startswith("_cache_"):
            continue
        items.append((key, _freeze(value)))
    return (type(module).__module__, type(module).__qualname__, tuple(sorted(items, key=lambda kv: kv[0])))


def check_bounded_forward(module: nn.Module) -> None:
    """Raise :class:`UnknownLipschitzError` unless ``module`` runs the very ``forward`` its bound was derived for."""
    expected = getattr(type(module), "_bounded_forward", None)
    if expected is None or type(module).forward is not expected:
        raise UnknownLipschitzError(
            f"{type(module).__qualname__} overrides forward() of a bounded layer, so its Lipschitz bound and "
            "rounding model no longer describe what it computes; implement _compute_upper_bound/"
            "_compute_rounding_model for the new forward and declare it with `_bounded_forward = forward`"
        )


class LipschitzBounded:
    """Mixin for ``nn.Module`` subclasses with a known Lipschitz constant.

    Subclasses implement ``_estimate(iterations, update)``, ``_compute_upper_bound()`` and
    ``_compute_rounding_model()``, list the tensors their forward reads in ``_bound_dependencies()`` and name
    the forward those describe in ``_bounded_forward``. This class caches both guaranteed quantities under
    :meth:`bound_key`.
    """

    _bounded_forward = None

    def lipschitz_estimate(self, iterations: int = 1, update: bool = True) -> torch.Tensor:
        return self._estimate(iterations, update)

    def bound_key(self) -> tuple:
        """Content hash of every tensor the forward reads plus every setting: cached values are valid iff equal."""
        return (content_digest(self._bound_dependencies()), settings_signature(self))  # type: ignore[arg-type]

    def _cached(self, name: str, compute, key: tuple | None = None):
        check_bounded_forward(self)  # type: ignore[arg-type]
        key = self.bound_key() if key is None else key
        cache = self.__dict__.get("_cache_" + name)
        if cache is None or cache[0] != key:
            cache = (key, compute())
            self.__dict__["_cache_" + name] = cache
        return cache[1]

    def lipschitz_upper_bound(self) -> float:
        return self._cached("upper_bound", lambda: float(self._compute_upper_bound()))

    def rounding_model(self) -> RoundingModel:
        return self._cached("rounding_model", self._compute_rounding_model)

    # --- to implement -------------------------------------------------------------------------------
    def _estimate(self, iterations: int, update: bool) -> torch.Tensor:
        raise NotImplementedError

    def _compute_upper_bound(self) -> float:
        raise NotImplementedError

    def _compute_rounding_model(self) -> RoundingModel:
        raise UnknownLipschitzError(
            f"{type(self).__qualname__} has no floating-point rounding model; certificates need one "
            "(implement _compute_rounding_model)"
        )

    def _bound_dependencies(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.parameters()) + tuple(self.buffers())  # type: ignore[attr-defined]


class ConstantLipschitz(LipschitzBounded):
    """Mixin for parameter-free maps whose Lipschitz constant is a known constant ``lipschitz_constant``.

    ``exact_in_floating_point`` must be declared ``True`` explicitly by maps that only compare and copy and
    never increase the norm (MinMax, ReLU, Flatten); any other constant map needs its own rounding model.
    """

    lipschitz_constant: float = 1.0
    exact_in_floating_point: bool = False

    def _estimate(self, iterations: int, update: bool) -> torch.Tensor:
        return torch.tensor(float(self.lipschitz_constant))

    def _compute_upper_bound(self) -> float:
        return float(self.lipschitz_constant)

    def _compute_rounding_model(self) -> RoundingModel:
        if not self.exact_in_floating_point:
            return super()._compute_rounding_model()
        return EXACT


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
