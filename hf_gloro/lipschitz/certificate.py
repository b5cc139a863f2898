"""The one function that turns pixels into predictions and float-sound GloRo certificates.

Semantics (what a certificate promises)
    The package's prediction for an input is its **decided prediction**: the argmax of the float32 logits when
    the float32 error bound proves that class is the exact network's argmax, otherwise the argmax of a float64
    re-evaluation (whose logits are then returned, rounded to float32 so that the argmax is kept). Whenever a
    prediction is decided it *is* the exact-arithmetic prediction, whatever batch, thread count or BLAS
    summation order produced it.

    ``certified`` at ``x`` with radius ``R`` means: for every ``x'`` with ``‖x' − x‖ < R`` (``‖·‖₂``, or ``‖·‖∞`` for
    ``ChainConstants.norm == "linf"``: then ``K`` and the ball terms use the ∞→2 prefix constants of
    :mod:`hf_gloro.lipschitz.linf`, everything else is the same analysis) the exact network
    predicts ``j`` **and** the package's prediction at ``x'`` (from ``certify()``, eval-mode ``forward()``, the
    pipelines or the CLI) is ``j``: decided in float32 it is the exact argmax; re-evaluated in float64 the
    float64 error at ``x'`` is below the exact margin there.

The test, per competing class ``i`` (``j`` the prediction, all terms per input, float64)
    ``m_ji = ŷ_j − ŷ_i`` (computed logits) and ``E_ji`` bounds its rounding error at ``x`` (from
    :func:`~hf_gloro.lipschitz.float_error.run_chain` plus the head's own dot products); ``A_ji + B_ji·r``
    bounds the float64 margin error anywhere in the ball of radius ``r``; ``K_ji`` is the guaranteed margin
    Lipschitz constant. Then

        R = min_{i≠j} (m_ji − E_ji − A_ji) / (K_ji + B_ji),        certified ⇔ R > ε,

    which is ``m_ji − E_ji > ε·K_ji + A_ji + ε·B_ji`` for every ``i``: the exact margin at ``x`` minus its largest
    possible decrease over the ball exceeds the float64 error there.

Cost
    One float32 forward with a norm reduction per affine layer decides most inputs. *Grey* inputs (whose float32
    error bound straddles the test) and inputs with an undecided top class get a second float32 pass with
    a-posteriori bounds, and only those still open a float64 re-evaluation
    (:attr:`CertificationResult.float64_rows`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .bounded import RoundingModel
from .float_error import NORM_SLACK, ChainTrace, ball_deviation_float64, run_chain
from .margins import _predicted
from .numerics import SMALLEST_NORMAL, UNIT_ROUNDOFF, gamma


@dataclass
class HeadConstants:
    """Guaranteed float64 constants of a logits layer ``y = Ŵ z + b`` (``m × d``), as the forward uses it."""

    distances: torch.Tensor  # (m, m) ≥ ‖ŵ_j − ŵ_i‖₂
    abs_weight: torch.Tensor  # (m, d) |Ŵ|
    row_norms: torch.Tensor  # (m,) ≥ ‖ŵ_i‖₂
    abs_bias: torch.Tensor  # (m,) |b_i|
    fan_in: int


@dataclass
class ChainConstants:
    """Everything a certificate needs about a bounded chain followed by a head (cached per weights/settings)."""

    leaves: list[nn.Module]
    lipschitz: list[float]
    rounding: list[RoundingModel]
    sub_lipschitz: float  # k ≥ sup ‖Δfeatures‖₂ / ‖Δx‖ (L2: Π L_ℓ; L∞: the ∞→2 prefix constant P_L)
    margin_constants: torch.Tensor  # (m, m) K_ji = k·distances
    head: HeadConstants
    #: ``[P_0, …, P_L]``: bounds on ``‖Δz_ℓ‖₂ / ‖Δx‖`` at the input of every leaf (input norm of the threat model;
    #: :func:`~hf_gloro.lipschitz.linf.prefix_constants`). ``None``: the L2 products of ``lipschitz``.
    prefix: list[float] | None = None
    norm: str = "l2"  # the threat model: "l2" or "linf" (ε and radii in that norm)


@dataclass
class CertificationResult:
    """Per-row output of :func:`certify_inputs`."""

    logits: torch.Tensor  # (B, m) the logits of the decided prediction (float32 for a float32 model)
    predictions: torch.Tensor  # (B,)
    certified: torch.Tensor  # (B,) bool
    radius: torch.Tensor  # (B,) float64, ≥ 0
    float64_rows: torch.Tensor  # (B,) bool: re-evaluated in float64


def _pair_terms(logits: torch.Tensor, trace: ChainTrace, constants: ChainConstants) -> tuple[torch.Tensor, ...]:
    """``(predictions, mask, m − E, m + E, A, B+K)`` per (row, competitor), all float64."""
    head = constants.head
    dtype = logits.dtype
    u, smallest = UNIT_ROUNDOFF[dtype], SMALLEST_NORMAL[dtype]
    y = logits.detach().to(torch.float64)
    predictions, mask = _predicted(y)
    device = y.device
    distances = head.distances.to(device)[predictions]  # (B, m): ‖ŵ_j − ŵ_i‖
    abs_bias = head.abs_bias.to(device)
    row_norms = head.row_norms.to(device)
    d = head.fan_in
    # The head's own dot products at x: |fl(ŵ_i·ẑ + b_i) − (ŵ_i·ẑ + b_i)| ≤ γ_{d+1}(|ŵ_i|·|ẑ| + |b_i|) + 2(d+1)λ.
    absolute = trace.output.detach().abs().to(torch.float64) @ head.abs_weight.to(device).t()
    absolute = absolute * (1.0 + 2 * d * UNIT_ROUNDOFF[torch.float64] + NORM_SLACK)
    logit_error = gamma(d + 1, u) * (absolute + abs_bias) + 2 * (d + 1) * smallest
    top_error = logit_error.gather(-1, predictions[:, None])
    top = y.gather(-1, predictions[:, None])
    margins = top - y
    error = (top_error + logit_error + distances * trace.deviations[-1][:, None]
             + 2.0**-52 * (top.abs() + y.abs()))  # the float64 subtraction's own rounding
    # The ball, in float64: A + B·r.
    c, s, exact_norm, product = ball_deviation_float64(trace, constants.lipschitz, constants.rounding,
                                                       constants.prefix)
    g = gamma(d + 1, UNIT_ROUNDOFF[torch.float64])
    norm_pairs = row_norms[predictions][:, None] + row_norms[None, :]
    bias_pairs = abs_bias[predictions][:, None] + abs_bias[None, :]
    underflow = 4 * (d + 1) * SMALLEST_NORMAL[torch.float64]
    ball_constant = distances * c[:, None] + g * (norm_pairs * (exact_norm + c)[:, None] + bias_pairs) + underflow
    ball_slope = distances * s[:, None] + g * norm_pairs * (product + s)[:, None]
    constants_row = constants.margin_constants.to(device)[predictions]
    return predictions, mask, margins - error, margins + error, ball_constant, ball_slope + constants_row


def _radius(numerator: torch.Tensor, denominator: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``max(0, min_{i≠j} numerator/denominator)`` shrunk by ``1 − 1e-12`` for the division's own rounding."""
    ratio = torch.where(denominator > 0, numerator / denominator,
                        torch.where(numerator > 0, math.inf, 0.0))
    radius = ratio.masked_fill(mask, math.inf).min(dim=-1).values
    if mask.shape[-1] == 1:
        return radius  # a single class: nothing can change the prediction
    return (radius * (1.0 - 1e-12)).clamp_min(0.0)


def _evaluate(constants: ChainConstants, head: nn.Module, x: torch.Tensor, a_posteriori: bool = False):
    trace = run_chain(constants.leaves, constants.lipschitz, constants.rounding, x, a_posteriori)
    logits = head(trace.output)
    predictions, mask, low, high, ball_constant, denominator = _pair_terms(logits, trace, constants)
    radius = _radius(low - ball_constant, denominator, mask)
    best_possible = _radius(high - ball_constant, denominator, mask)
    decided = (low.masked_fill(mask, math.inf) > 0).all(dim=-1)
    return logits, predictions, radius, best_possible, decided


def round_keeping_argmax(logits: torch.Tensor, predictions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round higher-precision logits to ``dtype`` so that ``argmax`` is unchanged: the predicted logit is
    rounded up, every other logit down (a strict float64 order stays strict; float64 ties keep the first index)."""
    rounded = logits.to(dtype)
    inf = torch.tensor(math.inf, dtype=dtype, device=logits.device)
    down = torch.where(rounded.to(logits.dtype) > logits, torch.nextafter(rounded, -inf), rounded)
    top = logits.gather(-1, predictions[:, None])
    top_rounded = top.to(dtype)
    up = torch.where(top_rounded.to(logits.dtype) < top, torch.nextafter(top_rounded, inf), top_rounded)
    return down.scatter(-1, predictions[:, None], up)


def _replace_rows(logits: torch.Tensor, rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``logits`` with ``rows`` set to ``target`` (values exactly), keeping a straight-through gradient path."""
    current = logits[rows]
    straight_through = current + (target - current).detach()
    replaced = torch.where((straight_through == target).all(dim=-1, keepdim=True), straight_through, target)
    return logits.index_copy(0, rows, replaced)


def certify_inputs(constants: ChainConstants, head: nn.Module, x: torch.Tensor,
                   epsilon: float | torch.Tensor) -> CertificationResult:
    """Predictions, certificates and radii for a batch ``x`` (see the module docstring).

    Three stages, each sound on its own; a row leaves as soon as one settles it (certified, or provably not
    certifiable with a decided prediction):

    1. float32 forward, rounding bounded with the measured activation norms (every row);
    2. float32 forward of the open rows with a-posteriori rounding bounds (``|A|·|ẑ|``, one more pass);
    3. float64 forward of the rows still open (same float32 weights; its error bound is ~1e-9 of stage 1's).

    Must run under :func:`~hf_gloro.lipschitz.numerics.certification_numerics`, outside autocast, with the
    chain's parameters in float32 or float64. Gradients flow to the returned logits (rows settled by a later
    stage use a straight-through copy of that stage's values). ``epsilon`` is a float or a ``(B,)`` tensor.
    """
    if torch.is_tensor(epsilon) and epsilon.ndim:
        epsilon = epsilon.to(device=x.device, dtype=torch.float64)
    logits, predictions, radius, best_possible, decided = _evaluate(constants, head, x)
    certified = radius > epsilon
    open_rows = (~certified & (best_possible > epsilon)) | ~decided
    float64_rows = torch.zeros_like(certified)
    stages = [] if x.dtype == torch.float64 else [(x.dtype, True), (torch.float64, False)]
    for dtype, a_posteriori in stages:
        if not bool(open_rows.any()):
            break
        rows = open_rows.nonzero().squeeze(1)
        eps_rows = epsilon[rows] if torch.is_tensor(epsilon) and epsilon.ndim else epsilon
        with torch.no_grad():
            stage_logits, stage_predictions, stage_radius, stage_best, stage_decided = _evaluate(
                constants, head, x[rows].detach().to(dtype), a_posteriori)
        predictions = predictions.index_copy(0, rows, stage_predictions)
        radius = radius.index_copy(0, rows, stage_radius)
        target = (round_keeping_argmax(stage_logits, stage_predictions, logits.dtype)
                  if stage_logits.dtype != logits.dtype else stage_logits)
        logits = _replace_rows(logits, rows, target)
        if dtype == torch.float64:
            float64_rows[rows] = True
        stage_certified = stage_radius > eps_rows
        still_open = (~stage_certified & (stage_best > eps_rows)) | ~stage_decided
        open_rows = torch.zeros_like(open_rows).index_copy(0, rows, still_open)
    certified = radius > epsilon
    return CertificationResult(logits, predictions, certified, radius, float64_rows)
