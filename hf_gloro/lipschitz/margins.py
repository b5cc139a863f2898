"""GloRo margins: per-pair margin Lipschitz constants, the bottom logit ⊥, certificates and radii.

Notation: logits ``y ∈ R^m`` of a head ``y = W φ(x) + b`` on features ``φ`` with ``Lip(φ) ≤ k``;
``j = argmax_i y_i`` (the predicted class, first index on ties).

* Margin constants: ``K_ji = k · ‖w_j − w_i‖₂`` bounds the Lipschitz constant of ``y_j − y_i``.
* Bottom logit: ``y_⊥ = max_{i ≠ j} (y_i + ε · K_ji)``, masking **only** index ``j``. With a tie
  ``y_i = y_j`` for some ``i ≠ j``, ``y_⊥ ≥ y_j`` and the point is not certified (gloro issue #9).
* Certificate: the prediction ``j`` cannot change within the L2 ball of radius ε iff
  ``y_j > y_⊥`` (strict) ⇔ ``y_j − y_i > ε K_ji`` for all ``i ≠ j``.
* Certified radius: ``R = min_{i ≠ j} (y_j − y_i) / K_ji`` (``∞`` if ``m = 1`` or every ``K_ji = 0`` with a
  positive margin, 0 when the top is tied).
"""

from __future__ import annotations

import torch

from .numerics import BOUND_RELATIVE_SLACK, FLOAT64_UNIT_ROUNDOFF, round_up


def pairwise_row_distances(weight: torch.Tensor) -> torch.Tensor:
    """Differentiable ``D_ji = ‖w_j − w_i‖₂`` for the rows of ``weight`` (training estimate).

    Uses ``‖w_j‖² + ‖w_i‖² − 2⟨w_j, w_i⟩`` (memory ``m²`` instead of ``m²·d``), clamped away from 0 so
    the square root has a finite gradient; the diagonal is never used.
    """
    gram = weight @ weight.t()
    squared_norms = gram.diagonal()
    squared = squared_norms[:, None] + squared_norms[None, :] - 2 * gram
    return squared.clamp_min(1e-12).sqrt()


@torch.no_grad()
def pairwise_row_distances_upper_bound(weight: torch.Tensor) -> torch.Tensor:
    """Guaranteed upper bounds on ``‖w_j − w_i‖₂`` in float64 (``m × m``, zero diagonal).

    The Gram formula's float64 rounding error is at most ``γ_d (‖w_i‖² + ‖w_j‖² + 2|⟨w_i, w_j⟩|)`` with
    ``γ_d ≈ d·u``; it is added before the square root, and the result is inflated by the standard slack.
    """
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(w).all():
        raise ValueError("head weight contains NaN or inf; refusing to certify")
    gram = w @ w.t()
    squared_norms = gram.diagonal()
    squared = squared_norms[:, None] + squared_norms[None, :] - 2 * gram
    gamma = 2 * (w.shape[1] + 2) * FLOAT64_UNIT_ROUNDOFF
    error = gamma * (squared_norms[:, None] + squared_norms[None, :] + 2 * gram.abs())
    distances = (squared.clamp_min(0.0) + error).sqrt()
    distances.fill_diagonal_(0.0)
    return round_up(distances * (1.0 + BOUND_RELATIVE_SLACK))


def _predicted(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(j, one-hot mask of j)``: the first index of the maximum, and only that index."""
    predictions = logits.argmax(dim=-1)
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask.scatter_(-1, predictions[:, None], True)
    return predictions, mask


def bottom_logit(logits: torch.Tensor, margin_constants: torch.Tensor, epsilon: float | torch.Tensor) -> torch.Tensor:
    """``y_⊥ = max_{i ≠ j}(y_i + ε K_ji)`` per row; ``logits`` ``(B, m)``, ``margin_constants`` ``(m, m)``.

    ``epsilon`` may be a scalar or a ``(B,)`` tensor. Only the predicted index ``j`` is masked.
    """
    predictions, mask = _predicted(logits.detach())
    constants = margin_constants.to(logits.dtype)[predictions]  # (B, m): K_{j, ·}
    eps = torch.as_tensor(epsilon, dtype=logits.dtype, device=logits.device)
    if eps.ndim == 1:
        eps = eps[:, None]
    candidates = (logits + eps * constants).masked_fill(mask, float("-inf"))
    return candidates.max(dim=-1).values


def gloro_logits(logits: torch.Tensor, margin_constants: torch.Tensor, epsilon: float | torch.Tensor) -> torch.Tensor:
    """The ``m + 1`` GloRo logits ``[y_1, …, y_m, y_⊥]``."""
    return torch.cat([logits, bottom_logit(logits, margin_constants, epsilon)[:, None]], dim=-1)


@torch.no_grad()
def certify_logits(
    logits: torch.Tensor, margin_constants: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(predictions, certified, radius)`` from logits and *guaranteed* margin constants, in float64.

    This is the **exact-arithmetic** certificate: it treats the given logits as exact, ignoring the rounding
    of the forward pass that produced them. The package itself certifies with
    :func:`hf_gloro.lipschitz.certify_inputs` (float-sound); this function remains for comparisons
    (``benchmarks/bench_float_soundness.py``) and for logits known to be exact.

    ``radius[b] = min_{i≠j}(y_j − y_i)/K_ji`` and ``certified[b] = radius[b] > ε``, which is
    ``y_j > y_⊥`` (strict: a tied top class has radius 0 and is never certified). Each float64 operation
    is correctly rounded (relative error ≤ 2⁻⁵²), far inside the slack already in ``K``.
    """
    n = logits.shape[0]
    if logits.shape[-1] == 1:
        inf = torch.full((n,), float("inf"), dtype=torch.float64)
        return torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.bool), inf
    y = logits.detach().to(device="cpu", dtype=torch.float64)
    predictions, mask = _predicted(y)
    margins = y.gather(-1, predictions[:, None]) - y  # (B, m), ≥ 0
    k = margin_constants.to(device="cpu", dtype=torch.float64)[predictions]
    ratio = torch.where(k > 0, margins / k, torch.where(margins > 0, float("inf"), 0.0))
    radius = ratio.masked_fill_(mask, float("inf")).min(dim=-1).values
    return predictions, radius > float(epsilon), radius
