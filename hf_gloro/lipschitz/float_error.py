"""Rigorous bounds on the floating-point error of a bounded chain, as this package executes it.

A GloRo certificate is a statement about the exact-arithmetic network ``f``; the package evaluates ``f̂ = fl(f)``.
This module bounds ``‖f̂ − f‖`` per input so that the certificate (:mod:`hf_gloro.lipschitz.certificate`) can
be made about the predictions the package actually returns.

Error model (per layer; Higham, *Accuracy and Stability of Numerical Algorithms*, §2.2 and Lemma 3.1)
    Every float operation is correctly rounded: ``fl(a ∘ b) = (a ∘ b)(1 + δ)``, ``|δ| ≤ u`` (``u = 2⁻²⁴`` float32,
    ``2⁻⁵³`` float64), plus an absolute error below the smallest normal number ``λ`` when a result underflows
    (this also covers flush-to-zero). A dot product of length ``n`` plus a bias, summed in **any** order with
    or without FMA, has ``|fl(wᵀx + b) − (wᵀx + b)| ≤ γ_{n+1}(|w|ᵀ|x| + |b|)`` (+ ``(n+1)·2λ``), with
    ``γ_n = nu/(1 − nu)``. That covers BLAS/oneDNN GEMMs and direct convolutions (blocked, split-K, vectorised:
    only the order differs) but **not** Winograd or FFT convolutions, which
    :func:`~hf_gloro.lipschitz.numerics.certification_numerics` rules out (cuDNN off; oneDNN is only asked
    for direct convolutions) together with TF32/bf16 "fast math". MinMax, ReLU and reshapes are exact.

Propagation along a chain ``z_ℓ = φ_ℓ(z_{ℓ−1})`` (``z_0 = x``, the input exactly as given)
    With ``ẑ_ℓ`` the computed activations, ``L_ℓ`` the layer's guaranteed Lipschitz bound and the layer's
    :class:`~hf_gloro.lipschitz.bounded.RoundingModel` (fan-in ``n``, ``N ≥ ‖|A|‖₂``, per-position bias norm ``β``):

        δ_ℓ = γ_{n+1}·(N·‖ẑ_{ℓ−1}‖ + β·√P_ℓ) + 2·√M_ℓ·(n + 1)·λ       (P_ℓ output positions, M_ℓ output elements)
        D_ℓ = L_ℓ·D_{ℓ−1} + δ_ℓ  ≥  ‖ẑ_ℓ − z_ℓ‖                        (D_0 = 0)

    because ``ẑ_ℓ − z_ℓ = (fl(φ)(ẑ) − φ(ẑ)) + (φ(ẑ) − φ(z))``. The norms ``‖ẑ‖`` are measured on the computed
    activations (in float64, inflated for that reduction's own rounding): an *a-posteriori* bound that is much
    tighter than propagating ``‖x‖`` through products of norms.

The ball (every ``x'`` with ``‖x' − x‖ ≤ r``), evaluated in float64
    Exact activations obey ``‖z_ℓ(x')‖ ≤ S_ℓ + Π_ℓ·r`` with ``S_ℓ = ‖ẑ_ℓ(x)‖ + D_ℓ(x)`` and ``Π_ℓ = L_1⋯L_ℓ`` (L2
    ball). For an L∞ ball (``‖x' − x‖∞ ≤ r``) ``Π_ℓ`` is replaced by the ∞→2 prefix constant ``P_ℓ`` of
    :func:`~hf_gloro.lipschitz.linf.prefix_constants` (``P_0 = √d``); nothing else in the analysis changes.
    The same recursion with ``u = 2⁻⁵³`` then gives a float64 deviation ``D'_ℓ(r) = c_ℓ + s_ℓ·r`` that is affine in
    ``r`` (see :func:`ball_deviation_float64`), so certified radii stay closed-form.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .bounded import RoundingModel
from .numerics import SMALLEST_NORMAL, UNIT_ROUNDOFF, gamma
from .spectral_bounds import dense_spectral_norm_bound

#: Relative inflation of every float64 norm this module measures (a float64 reduction of d ≤ 2²⁴ non-negative
#: squares has relative error ≤ d·2⁻⁵³ ≈ 2e-9, halved by the square root).
NORM_SLACK: float = 1e-8


# --- per-layer constants ----------------------------------------------------------------------------------------

@torch.no_grad()
def absolute_dense_norm_bound(weight: torch.Tensor) -> float:
    """Guaranteed upper bound on ``‖|W|‖₂`` (entrywise absolute value) of a dense ``out × in`` matrix."""
    return dense_spectral_norm_bound(weight.detach().abs())


@torch.no_grad()
def absolute_conv_norm_bound(kernel: torch.Tensor, groups: int = 1) -> float:
    """Guaranteed upper bound on ``‖|A|‖₂`` for the convolution ``A`` with ``kernel`` (any stride, padding,
    dilation, input size).

    ``|A|`` is the convolution with ``|K|``. On a torus, a stride-1 convolution has the Fourier symbol
    ``Σ_t |K_t| e^{−i⟨f,t⟩}``, entrywise bounded by ``S = Σ_t |K_t|`` (``C_out × C_in/g``); the spectral norm is
    monotone in the entrywise absolute value, so ``‖|C|‖ ≤ σ_max(S)``. A stride selects output rows and zero
    padding selects a sub-matrix, neither of which increases the norm. Groups: the maximum over blocks.
    """
    c_out = kernel.shape[0]
    summed = kernel.detach().abs().to(torch.float64).sum(dim=(2, 3))  # (C_out, C_in/g)
    per_group = c_out // groups
    return max(dense_spectral_norm_bound(summed[g * per_group:(g + 1) * per_group]) for g in range(groups))


# --- propagation ------------------------------------------------------------------------------------------------

def activation_norms(tensor: torch.Tensor) -> torch.Tensor:
    """Guaranteed upper bounds (float64) on the per-sample L2 norms of a batch, computed in its own dtype.

    A norm reduction in a dtype with unit roundoff ``u`` over ``d`` elements (squares, a sum in any order, a
    square root; or LAPACK-style scaled variants) satisfies ``computed² ≥ (1 − γ_{d+2})·true²``, so
    ``true ≤ computed·(1 + γ_{d+2})·(1 + 2u)``; squares that underflow lose less than ``λ`` each, covered by
    ``√(d·λ)``. Non-finite activations give ``inf`` (and thus no certificate). Float32 reductions are ~80×
    faster than float64 ones here, and the inflation (≤ 1e-3 for a million elements) is harmless.
    """
    flat = tensor.detach().reshape(len(tensor), -1)
    d = max(flat.shape[1], 1)
    u, smallest = UNIT_ROUNDOFF[flat.dtype], SMALLEST_NORMAL[flat.dtype]
    if (d + 2) * u >= 0.01:  # too large for the dtype's own reduction to be tight: reduce in float64
        flat, u, smallest = flat.to(torch.float64), UNIT_ROUNDOFF[torch.float64], SMALLEST_NORMAL[torch.float64]
    norms = torch.linalg.vector_norm(flat, dim=1).to(torch.float64)
    factor = (1.0 + gamma(d + 2, u)) * (1.0 + 2 * u) * (1.0 + NORM_SLACK)
    return norms * factor + math.sqrt(d * smallest)


def layer_rounding_error(model: RoundingModel, input_norm: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """``δ_ℓ`` (per sample) for a layer applied to inputs of norm ``input_norm`` producing ``output``."""
    if model.exact:
        return torch.zeros_like(input_norm)
    dtype = output.dtype
    u, smallest = UNIT_ROUNDOFF[dtype], SMALLEST_NORMAL[dtype]
    n = model.fan_in
    elements = output[0].numel() if len(output) else 0
    positions = elements // output.shape[1] if output.ndim > 1 and output.shape[1] else 1
    relative = gamma(n + 1, u)
    bias = model.bias_norm * math.sqrt(positions)
    underflow = 2.0 * math.sqrt(elements) * (n + 1) * smallest
    return relative * (model.abs_norm * input_norm + bias) * (1.0 + NORM_SLACK) + underflow


def layer_rounding_error_a_posteriori(leaf: torch.nn.Module, model: RoundingModel, z: torch.Tensor,
                                      output: torch.Tensor) -> torch.Tensor:
    """``δ_ℓ`` from the computed input itself: ``γ_{n+1}·‖|A|·|ẑ| + |b|‖`` (elementwise bound, then its norm).

    ``|A|·|ẑ| + |b|`` is evaluated by ``leaf.absolute_forward`` in ``ẑ``'s dtype: a sum of ``n + 1`` non-negative
    terms, so the computed value is at least ``(1 − γ_{n+1})`` times the exact one. Costs one more layer
    evaluation; much tighter than ``N·‖ẑ‖`` when ``|ẑ|`` is not aligned with the Perron vector of ``|A|``.
    """
    if model.exact:
        return torch.zeros(len(z), dtype=torch.float64, device=z.device)
    dtype = output.dtype
    u, smallest = UNIT_ROUNDOFF[dtype], SMALLEST_NORMAL[dtype]
    n = model.fan_in
    g = gamma(n + 1, u)
    with torch.no_grad():
        absolute = leaf.absolute_forward(z.detach().abs())
    elements = output[0].numel() if len(output) else 0
    underflow = 4.0 * math.sqrt(elements) * (n + 1) * smallest
    return g * activation_norms(absolute) / (1.0 - g) + underflow


class CompositeRounding:
    """The rounding model of a *composite* leaf (a :class:`~hf_gloro.lipschitz.graph.LipschitzGraph`): a leaf whose
    floating-point behaviour is not one affine map but a graph of them, propagated node by node.

    ``propagate(leaf, z, norm, deviation, a_posteriori)`` evaluates the leaf on the computed input ``z`` (in ``z``'s
    dtype) with ``norm ≥ ‖z‖`` and ``deviation ≥ ‖z − z_exact‖`` and returns ``(output, output_norm,
    output_deviation, detail)``; ``ball(detail, c, s, product)`` maps the float64 ball deviation ``c + s·r`` of its
    input (``product`` bounds the Lipschitz constant of everything before it) to that of its output, using
    ``detail`` (what ``propagate`` measured at ``x``). :func:`run_chain` and :func:`ball_deviation_float64` call
    these for composite leaves; a plain chain never does, so its numbers are unchanged.
    """

    exact = False

    def propagate(self, leaf, z, norm, deviation, a_posteriori):  # pragma: no cover - interface
        raise NotImplementedError

    def ball(self, detail, c, s, product):  # pragma: no cover - interface
        raise NotImplementedError


def affine_ball_step(model: RoundingModel, bound: float, shape, exact_norm: torch.Tensor, c: torch.Tensor,
                     s: torch.Tensor, product: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One affine layer of :func:`ball_deviation_float64`: ``(c, s) ↦ (L·c + constant, L·s + slope)`` for a layer
    with Lipschitz bound ``bound`` whose exact input has norm ``≤ exact_norm + product·r`` in the ball."""
    u, smallest = UNIT_ROUNDOFF[torch.float64], SMALLEST_NORMAL[torch.float64]
    g = gamma(model.fan_in + 1, u)
    elements = math.prod(shape)
    positions = elements // shape[0] if len(shape) > 1 and shape[0] else 1
    constant = g * (model.abs_norm * (exact_norm + c) + model.bias_norm * math.sqrt(positions))
    constant = constant + 2.0 * math.sqrt(elements) * (model.fan_in + 1) * smallest
    slope = g * model.abs_norm * (product + s)
    return bound * c + constant * (1.0 + NORM_SLACK), bound * s + slope * (1.0 + NORM_SLACK)


@dataclass
class ChainTrace:
    """What :func:`run_chain` measured along one evaluation of a chain (all per sample, float64).

    ``norms[ℓ]`` bounds ‖ẑ_ℓ‖ (``norms[0] = ‖x‖``), ``deviations[ℓ]`` bounds ‖ẑ_ℓ − z_ℓ‖ (``D_ℓ``).
    """

    output: torch.Tensor
    norms: list[torch.Tensor]
    deviations: list[torch.Tensor]
    shapes: list[torch.Size]  # per-sample output shape of every layer
    details: list = field(default_factory=list)  # per layer: what a composite leaf measured (None otherwise)


def run_chain(leaves: Sequence[torch.nn.Module], lipschitz: Sequence[float], rounding: Sequence[RoundingModel],
              x: torch.Tensor, a_posteriori: bool = False) -> ChainTrace:
    """Evaluate ``leaves`` in order on ``x`` (in ``x``'s dtype) and propagate ``(‖ẑ_ℓ‖, D_ℓ)``.

    Exact layers (MinMax, ReLU, Flatten) do not increase the norm, so their input norm bound passes through
    without a reduction; an affine layer's output norm is measured. ``a_posteriori`` bounds each affine layer's
    rounding with :func:`layer_rounding_error_a_posteriori` (one more evaluation of each affine layer) instead of
    :func:`layer_rounding_error`.
    """
    norm = activation_norms(x)
    deviation = torch.zeros_like(norm)
    norms, deviations, shapes, details = [norm], [deviation], [], []
    z = x
    for leaf, bound, model in zip(leaves, lipschitz, rounding):
        if isinstance(model, CompositeRounding):
            output, out_norm, deviation, detail = model.propagate(leaf, z, norm, deviation, a_posteriori)
            z, norm = output, out_norm
            norms.append(norm)
            deviations.append(deviation)
            shapes.append(output.shape[1:])
            details.append(detail)
            continue
        details.append(None)
        output = leaf(z)
        if model.exact:
            out_norm = norm
        else:
            local = (layer_rounding_error_a_posteriori(leaf, model, z, output) if a_posteriori
                     else layer_rounding_error(model, norm, output))
            deviation = bound * deviation + local
            out_norm = activation_norms(output)
        z, norm = output, out_norm
        norms.append(norm)
        deviations.append(deviation)
        shapes.append(output.shape[1:])
    return ChainTrace(z, norms, deviations, shapes, details)


def ball_deviation_float64(trace: ChainTrace, lipschitz: Sequence[float], rounding: Sequence[RoundingModel],
                           prefix: Sequence[float] | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bounds, affine in the radius ``r``, for a **float64** evaluation anywhere in the ball around ``x``.

    From a trace at ``x`` (any dtype), returns per sample ``(c, s, S_L, Π_L)`` such that for every
    ``‖x' − x‖ ≤ r``: the float64 features deviate from the exact ones by at most ``c + s·r``, and the exact
    features have norm at most ``S_L + Π_L·r``.

    ``prefix[ℓ]`` bounds ``‖z_ℓ(x') − z_ℓ(x)‖₂ / ‖x' − x‖`` for the exact input of leaf ``ℓ`` (``prefix[-1]``: the
    features), in the threat model's input norm (:func:`~hf_gloro.lipschitz.linf.prefix_constants`); the only
    place the input norm enters. Default: the L2 products ``1, L_1, L_1·L_2, …``.
    """
    c = torch.zeros_like(trace.norms[0])
    s = torch.zeros_like(c)
    product = 1.0
    details = trace.details or [None] * len(trace.shapes)
    for index, (bound, model, shape) in enumerate(zip(lipschitz, rounding, trace.shapes)):
        if prefix is not None:
            product = prefix[index]
        exact_norm = trace.norms[index] + trace.deviations[index]  # S_{ℓ−1} ≥ ‖z_{ℓ−1}(x)‖
        if isinstance(model, CompositeRounding):
            c, s = model.ball(details[index], c, s, product)
        elif not model.exact:
            c, s = affine_ball_step(model, bound, shape, exact_norm, c, s, product)
        product *= bound
    if prefix is not None:
        product = prefix[len(lipschitz)]
    exact_features = trace.norms[-1] + trace.deviations[-1]
    return c, s, exact_features, torch.full_like(c, product * (1.0 + 4 * len(lipschitz) * 2.0**-53))
