"""Certified-training losses for GloRo nets, selected by name.

Notation (per example): class logits ``y ∈ R^m``, label ``c``, predicted class ``j = argmax y``, margin
constants ``K ∈ R^{m×m}`` with ``K_ji = k‖ŵ_j − ŵ_i‖`` (``k``: Lipschitz estimate of pixels → features,
``ŵ``: head rows after LLN), training radius ε, bottom logit ``y_⊥ = max_{i≠j}(y_i + ε K_ji)`` and GloRo
logits ``ỹ = [y, y_⊥] ∈ R^{m+1}``. Every loss is averaged over the batch.

* ``gloro_ce`` (aliases ``crossentropy``, ``ce``): ``L = CE(ỹ, c) = log(Σ_i e^{y_i} + e^{y_⊥}) − y_c``.
  The label is never ⊥, so ⊥ only ever takes probability mass away from the label.
* ``trades`` (GloRo-TRADES, KL form): ``L = CE(y, c) + λ · KL(softmax(y) ⊕ 0 ‖ softmax(ỹ))``.
  For ``i < m``, ``p_i/q_i = Z̃/Z`` with ``Z = Σ_i e^{y_i}`` and ``Z̃ = Z + e^{y_⊥}``, so the KL term is
  exactly ``log Z̃ − log Z = logsumexp(ỹ) − logsumexp(y) = −log(1 − q_⊥) ≥ 0`` (computed in that stable
  form; neither argument is stop-gradient'ed, as in the reference). λ may follow a schedule.
* ``emma`` (LiResNet/"Recipe" Efficient Margin MAximisation), with *label-class* margin constants
  ``K_i = K_ci = k‖ŵ_c − ŵ_i‖``: ``z_i = y_i − y_c`` (so ``m_i = −z_i`` is the margin to class ``i``),
  ``ε_i = stopgrad(clip(m_i / max(ε K_i, 1e-8), 0.01, 1))``, ``ỹ_i = z_i + ε_i · ε K_i`` and
  ``L = CE(ỹ, c)``. A class already beaten by ``≥ εK_i`` is pushed by the full ``εK_i``; one within the
  margin is raised exactly to the label logit; a class that beats the label only by ``0.01 εK_i``.
* ``margin`` (Lipschitz-margin training, LiResNet ``margin_loss``): ``ỹ_i = y_i + ε K_ci``,
  ``L = CE(ỹ, c)`` (``K_cc = 0``).

``gloro_ce`` and ``trades`` need ``gloro_logits``; ``emma`` and ``margin`` need the margin-constant matrix
(:data:`NEEDS_MARGIN_CONSTANTS`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "LOSSES",
    "NEEDS_MARGIN_CONSTANTS",
    "emma_loss",
    "gloro_cross_entropy",
    "gloro_loss",
    "gloro_trades_loss",
    "margin_loss",
    "resolve_loss_name",
]


def gloro_cross_entropy(gloro_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``mean_b CE([y, y_⊥]_b, c_b)`` on the ``m + 1`` GloRo logits."""
    return F.cross_entropy(gloro_logits, labels)


def trades_kl_term(logits: torch.Tensor, gloro_logits: torch.Tensor) -> torch.Tensor:
    """Per-example ``KL(softmax(y) ⊕ 0 ‖ softmax([y, y_⊥])) = logsumexp([y, y_⊥]) − logsumexp(y)``."""
    if gloro_logits.shape[-1] != logits.shape[-1] + 1:
        raise ValueError(f"gloro_logits must have m + 1 = {logits.shape[-1] + 1} columns, got {gloro_logits.shape[-1]}")
    return torch.logsumexp(gloro_logits, dim=-1) - torch.logsumexp(logits, dim=-1)


def gloro_trades_loss(
    logits: torch.Tensor, gloro_logits: torch.Tensor, labels: torch.Tensor, trades_lambda: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """GloRo-TRADES (KL form): ``mean_b [CE(y_b, c_b) + λ · KL(softmax(y_b)⊕0 ‖ softmax(ỹ_b))]``."""
    return F.cross_entropy(logits, labels) + trades_lambda * trades_kl_term(logits, gloro_logits).mean()


def _label_margin_constants(margin_constants: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``K_{c_b, ·}`` rows (``B × m``) of the margin-constant matrix."""
    if margin_constants.ndim != 2 or margin_constants.shape[0] != margin_constants.shape[1]:
        raise ValueError(f"margin_constants must be an m × m matrix, got {tuple(margin_constants.shape)}")
    return margin_constants.to(dtype)[labels]


def _epsilon_column(epsilon: float | torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    eps = torch.as_tensor(epsilon, dtype=reference.dtype, device=reference.device)
    return eps[:, None] if eps.ndim == 1 else eps


def emma_loss(
    logits: torch.Tensor, margin_constants: torch.Tensor, labels: torch.Tensor, epsilon: float | torch.Tensor
) -> torch.Tensor:
    """EMMA: ``CE(z + stopgrad(clip(−z/(εK_c), 0.01, 1)) · εK_c, c)`` with ``z = y − y_c``; see module docs."""
    constants = _label_margin_constants(margin_constants, labels, logits.dtype)
    eps = _epsilon_column(epsilon, logits)
    z = logits - logits.gather(-1, labels[:, None])
    push = eps * constants  # ε K_{c i}
    with torch.no_grad():
        adaptive = (-z / push.clamp_min(1e-8)).clamp(0.01, 1.0)
    return F.cross_entropy(z + adaptive * push, labels)


def margin_loss(
    logits: torch.Tensor, margin_constants: torch.Tensor, labels: torch.Tensor, epsilon: float | torch.Tensor
) -> torch.Tensor:
    """Lipschitz-margin loss ``CE(y + ε K_{c,·}, c)`` (``K_cc = 0``)."""
    constants = _label_margin_constants(margin_constants, labels, logits.dtype)
    return F.cross_entropy(logits + _epsilon_column(epsilon, logits) * constants, labels)


_ALIASES = {"crossentropy": "gloro_ce", "ce": "gloro_ce", "gloro": "gloro_ce", "trades_kl": "trades"}

#: Canonical loss names.
LOSSES: tuple[str, ...] = ("gloro_ce", "trades", "emma", "margin")

#: Losses that need the margin-constant matrix instead of (only) the GloRo logits.
NEEDS_MARGIN_CONSTANTS = frozenset({"emma", "margin"})


def resolve_loss_name(name: str) -> str:
    """Canonical name for ``name`` (case-insensitive, aliases allowed); raises ``ValueError`` if unknown."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in LOSSES:
        raise ValueError(f"unknown GloRo loss {name!r}; choose one of {list(LOSSES)} (aliases: {sorted(_ALIASES)})")
    return key


def gloro_loss(
    name: str,
    *,
    logits: torch.Tensor,
    labels: torch.Tensor,
    epsilon: float | torch.Tensor,
    gloro_logits: torch.Tensor | None = None,
    margin_constants: torch.Tensor | None = None,
    trades_lambda: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Dispatch to the loss called ``name`` (see the module docstring for the formulas)."""
    key = resolve_loss_name(name)
    labels = labels.long()
    if key in NEEDS_MARGIN_CONSTANTS:
        if margin_constants is None:
            raise ValueError(f"loss {key!r} needs the margin-constant matrix")
        fn: Callable = emma_loss if key == "emma" else margin_loss
        return fn(logits, margin_constants, labels, epsilon)
    if gloro_logits is None:
        raise ValueError(f"loss {key!r} needs the GloRo logits")
    if key == "gloro_ce":
        return gloro_cross_entropy(gloro_logits, labels)
    return gloro_trades_loss(logits, gloro_logits, labels, trades_lambda)
