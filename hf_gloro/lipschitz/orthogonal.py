"""Cholesky-orthogonalised dense layers (the CHORD / "Recipe" dense layers of LiResNet++).

Parametrisation. A free parameter ``V`` (``out × in``) is mapped to a matrix with orthonormal rows by whitening
it with the Cholesky factor of its row Gram matrix:

    Σ = V Vᵀ + δ·I,   δ = jitter · mean(diag(V Vᵀ)),   Σ = L Lᵀ (Cholesky, L lower triangular),   W = L⁻¹ V.

Then ``W Wᵀ = L⁻¹ V Vᵀ L⁻ᵀ = L⁻¹ (Σ − δI) L⁻ᵀ = I − δ·L⁻¹L⁻ᵀ = I − δ·(LᵀL)⁻¹``; ``LᵀL`` has the eigenvalues
of ``LLᵀ = Σ``, so in exact arithmetic ``σ_max(W)² = 1 − δ/λ_max(Σ) ≤ 1`` (``= 1`` for ``δ = 0`` and
``out ≤ in``: the rows are orthonormal). ``δ > 0``
keeps ``Σ`` positive definite for any shape and any ``V`` (it is what lets ``out > in`` work at all), at the price
of a slight contraction. ``W`` is a differentiable function of ``V`` (autograd through ``cholesky`` and
``solve_triangular``), so training updates ``V`` and the layer stays ≈ orthogonal without any projection step.

Soundness. In floating point the realised matrix ``Ŵ = fl(L⁻¹V)`` is only approximately orthogonal, and it is
``Ŵ`` the forward multiplies by. Hence:

* the **guaranteed bound** is ``σ_max(Ŵ)`` computed from the realised float ``Ŵ`` by
  :func:`~hf_gloro.lipschitz.spectral_bounds.dense_spectral_norm_bound` (float64 + slack), never the
  exact-arithmetic value 1;
* the **rounding model** is that of the affine map ``x ↦ Ŵx + b`` (Higham Lemma 3.1 with ``|Ŵ|``);
* outside differentiable training (eval mode, or no autograd) the forward multiplies by a **cached** ``Ŵ``,
  computed once per content of ``V`` (XXH3 hash of ``V``, the jitter, dtype and device). A Cholesky
  factorisation is not guaranteed to be bit-reproducible across thread counts or devices, so recomputing it
  for every forward could give a slightly different matrix than the one that was bounded; with the cache the
  bound and every certified forward (float32, and the float64 re-evaluation, which casts the same ``Ŵ`` up)
  read the very same tensor. The cached ``Ŵ`` itself is part of the layer's :meth:`bound_key`, so even an
  in-place write into it is seen.

Training estimate. :meth:`lipschitz_estimate` returns the exact-arithmetic constant 1 (an upper bound of
``σ_max(W)`` for this parametrisation, see above) without a power iteration: it costs nothing and never
under-states the margin constants used by the GloRo losses. The guaranteed bound is typically
``1 − 5·10⁻⁴`` (δ = 10⁻³·mean diag) up to float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bounded import LipschitzBounded, RoundingModel
from .float_error import absolute_dense_norm_bound
from .numerics import tensor_digest
from .spectral_bounds import dense_spectral_norm_bound

__all__ = ["CholeskyOrthogonalLinear", "cholesky_orthogonalize", "orthogonal_mlp"]


def _orthogonalize_forward(v: torch.Tensor, jitter: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, L)``: the whitened matrix and the Cholesky factor (no autograd)."""
    gram = v @ v.mT
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    # δ is a scale, not a function to differentiate through (as a constant it keeps the gradient simple).
    delta = gram.diagonal(dim1=-2, dim2=-1).mean(-1).mul(jitter)
    factor = torch.linalg.cholesky(gram + delta[..., None, None] * eye)
    return torch.linalg.solve_triangular(factor, v, upper=False), factor


class _CholeskyOrthogonalize(torch.autograd.Function):
    """``W = L⁻¹V`` with a closed-form backward (one triangular solve and two products instead of autograd's
    passes through ``cholesky`` and ``solve_triangular``).

    With ``Σ = VVᵀ + δI = LLᵀ`` (δ constant) and ``Y = L⁻¹dV``: ``dΣ = dV Vᵀ + V dVᵀ = dL Lᵀ + L dLᵀ`` gives
    ``L⁻¹dL = Φ(YWᵀ + WYᵀ)`` (``Φ``: lower triangle, half diagonal), so ``dW = L⁻¹(dV − dL W) = Y − Φ(YWᵀ + WYᵀ)W``.
    Taking adjoints, for an incoming gradient ``Ḡ`` and ``M = ḠWᵀ``:

        V̄ = L⁻ᵀ (Ḡ − S W),   S = tril(M, −1) + tril(M, −1)ᵀ + diag(M)   (M's lower triangle, mirrored).

    The forward is exactly :func:`cholesky_orthogonalize`'s (same operations, same values).
    """

    @staticmethod
    def forward(ctx, v: torch.Tensor, jitter: float) -> torch.Tensor:
        weight, factor = _orthogonalize_forward(v, jitter)
        ctx.save_for_backward(weight, factor)
        return weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, factor = ctx.saved_tensors
        m = grad @ weight.mT
        lower = m.tril(-1)
        mirrored = lower + lower.mT + torch.diag_embed(m.diagonal(dim1=-2, dim2=-1))
        return torch.linalg.solve_triangular(factor.mT, grad - mirrored @ weight, upper=True), None


def cholesky_orthogonalize(v: torch.Tensor, jitter: float = 1e-3) -> torch.Tensor:
    """``W = L⁻¹V`` with ``L Lᵀ = V Vᵀ + δI``, ``δ = jitter · mean(diag(V Vᵀ))`` (differentiable).

    Rows of ``W`` are orthonormal up to the jitter's contraction ``W Wᵀ = I − δ(LᵀL)⁻¹`` and floating-point
    rounding.
    A leading batch dimension is allowed (``(..., out, in)``). The gradient is the closed form of
    :class:`_CholeskyOrthogonalize` (δ is treated as a constant, as before).
    """
    if v.ndim < 2:
        raise ValueError(f"expected a matrix (out × in), got shape {tuple(v.shape)}")
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    if torch.is_grad_enabled() and v.requires_grad:
        return _CholeskyOrthogonalize.apply(v, float(jitter))
    return _orthogonalize_forward(v, jitter)[0]


class CholeskyOrthogonalLinear(LipschitzBounded, nn.Module):
    """Dense layer ``y = W x + b`` with ``W = cholesky_orthogonalize(V)`` (see the module docstring).

    Args:
        in_features, out_features: sizes (any; ``out > in`` contracts some directions to 0).
        bias: learnable bias (does not change the Lipschitz constant).
        jitter: relative diagonal shift ``δ / mean(diag(VVᵀ))`` of the Gram matrix (> 0 keeps it invertible).

    Parameters: ``weight_free`` (``V``, orthogonally initialised) and ``bias``. :meth:`realized_weight` is the
    matrix the forward multiplies by outside training.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, jitter: float = 1e-3,
                 device=None, dtype=None) -> None:
        super().__init__()
        if jitter <= 0 and out_features > in_features:
            raise ValueError("jitter must be > 0 when out_features > in_features (V Vᵀ is singular)")
        if jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {jitter}")
        self.in_features, self.out_features, self.jitter = int(in_features), int(out_features), float(jitter)
        self.weight_free = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        if self.weight_free.device.type != "meta":
            nn.init.orthogonal_(self.weight_free)

    # --- the realised weight ------------------------------------------------------------------------
    def _weight_key(self) -> tuple:
        v = self.weight_free
        return (tensor_digest(v), self.jitter, str(v.dtype), str(v.device))

    @torch.no_grad()
    def realized_weight(self) -> torch.Tensor:
        """The float ``Ŵ`` the eval-mode forward multiplies by (cached per content of ``V``; detached)."""
        key = self._weight_key()
        cache = self.__dict__.get("_cache_weight")
        if cache is None or cache[0] != key:
            weight = cholesky_orthogonalize(self.weight_free.detach(), self.jitter)
            if not torch.isfinite(weight).all():
                raise ValueError("the Cholesky-orthogonalised weight is not finite (V is degenerate or non-finite)")
            cache = (key, weight)
            self.__dict__["_cache_weight"] = cache
        return cache[1]

    def effective_weight(self) -> torch.Tensor:
        """``W``: differentiable while training with autograd, else the cached realised ``Ŵ``."""
        if self.training and torch.is_grad_enabled():
            return cholesky_orthogonalize(self.weight_free, self.jitter)
        return self.realized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The same float weights for a float64 re-evaluation (cast up exactly), as LipschitzLinear does.
        weight = self.effective_weight().to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    _bounded_forward = forward

    # --- bounded protocol ---------------------------------------------------------------------------
    def _estimate(self, iterations: int, update: bool) -> torch.Tensor:
        # σ_max(W) ≤ 1 in exact arithmetic for this parametrisation (module docstring): no power iteration.
        return torch.ones((), device=self.weight_free.device)

    def _compute_upper_bound(self) -> float:
        return dense_spectral_norm_bound(self.realized_weight())

    def _compute_rounding_model(self) -> RoundingModel:
        bias = 0.0 if self.bias is None else float(self.bias.detach().to(torch.float64).norm())
        return RoundingModel(fan_in=self.in_features, abs_norm=absolute_dense_norm_bound(self.realized_weight()),
                             bias_norm=bias * (1 + 1e-12))

    def absolute_forward(self, x_abs: torch.Tensor) -> torch.Tensor:
        """``|Ŵ|·x_abs + |b|``: the a-posteriori rounding term's operator."""
        bias = None if self.bias is None else self.bias.detach().abs().to(x_abs.dtype)
        return F.linear(x_abs, self.realized_weight().abs().to(x_abs.dtype), bias)

    def _bound_dependencies(self) -> tuple[torch.Tensor, ...]:
        # V, the bias and the realised Ŵ itself (what the forward reads).
        tensors = (self.weight_free, self.realized_weight())
        return tensors if self.bias is None else (*tensors, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, jitter={self.jitter:g}")


def orthogonal_mlp(features: int, depth: int, activation: str = "minmax", jitter: float = 1e-3) -> list[nn.Module]:
    """``depth × [CholeskyOrthogonalLinear(features, features) → activation]`` as a list of chain members."""
    from .activations import create_activation

    layers: list[nn.Module] = []
    for _ in range(int(depth)):
        layers += [CholeskyOrthogonalLinear(features, features, jitter=jitter), create_activation(activation)]
    return layers
