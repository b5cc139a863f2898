"""Per-optimizer-step schedules for the training ε (and the TRADES λ).

A schedule maps training progress ``t = step / total_steps ∈ [0, 1]`` to a *fraction* ``f(t)`` of a base
value; the trainer multiplies it by the base (``ε_train = multiplier · ε · f(t)``, ``λ = λ_final · f(t)``).
Interpolation is per optimizer step, not per epoch.

Named schedules (``s`` = ``start_fraction``, ``r`` = ramp length as a fraction of training, ``u = min(t/r, 1)``):

* ``fixed``: ``f = 1``.
* ``linear`` (``r = 1``) / ``linear_half`` (``r = 1/2``): ``f = s + (1 − s)·u``.
* ``log`` (``r = 1``) / ``log_half`` (``r = 1/2``): ``f = ln((e − e^s)·u + e^s)``, the GloRo
  "logarithmic" ramp (concave: fast early growth, slow near the end). It is evaluated in *ratio space*,
  i.e. on the fraction and only then multiplied by the base value, so the shape does not depend on ε's
  magnitude (the TF library interpolates after scaling, which makes ``log`` nearly linear for ε = 0.14).

Both ramps reach exactly ``f = 1`` at ``u = 1`` and hold it afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: schedule name → ramp length as a fraction of training (``None``: constant).
SCHEDULES: dict[str, float | None] = {
    "fixed": None,
    "linear": 1.0,
    "linear_half": 0.5,
    "log": 1.0,
    "log_half": 0.5,
}


@dataclass(frozen=True)
class Schedule:
    """A named schedule of a fraction in ``[start_fraction, 1]``; see the module docstring.

    Args:
        name: one of :data:`SCHEDULES`.
        start_fraction: ``f(0)`` for the ramps (ignored by ``fixed``); must lie in ``[0, 1]``.
        ramp_fraction: override of the ramp length as a fraction of training (``(0, 1]``); default from
            the name (``1`` or ``1/2``).
    """

    name: str = "fixed"
    start_fraction: float = 0.01
    ramp_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.name!r}; choose one of {sorted(SCHEDULES)}")
        if not 0.0 <= self.start_fraction <= 1.0:
            raise ValueError(f"start_fraction must lie in [0, 1], got {self.start_fraction}")
        if self.ramp_fraction is not None and not 0.0 < self.ramp_fraction <= 1.0:
            raise ValueError(f"ramp_fraction must lie in (0, 1], got {self.ramp_fraction}")

    @property
    def ramp(self) -> float | None:
        default = SCHEDULES[self.name]
        if default is None:
            return None
        return self.ramp_fraction if self.ramp_fraction is not None else default

    def fraction(self, step: int | float, total_steps: int | float) -> float:
        """``f(step / total_steps)``; ``total_steps ≤ 0`` (unknown length) gives the final value 1."""
        ramp = self.ramp
        if ramp is None or total_steps <= 0:
            return 1.0
        progress = min(max(float(step) / float(total_steps), 0.0), 1.0)
        u = min(progress / ramp, 1.0)
        s = self.start_fraction
        if self.name.startswith("linear"):
            return s + (1.0 - s) * u
        # log: ln((e − e^s)·u + e^s); u = 0 → s, u = 1 → 1.
        return math.log((math.e - math.exp(s)) * u + math.exp(s))

    def __call__(self, step: int | float, total_steps: int | float) -> float:
        return self.fraction(step, total_steps)


def training_epsilon(
    epsilon: float, step: int | float, total_steps: int | float, schedule: Schedule, multiplier: float = 1.0
) -> float:
    """``ε_train(step) = multiplier · ε · f(step / total_steps)`` (train at e.g. 1.5·ε, certify at ε)."""
    if multiplier <= 0:
        raise ValueError(f"the training-ε multiplier must be > 0, got {multiplier}")
    return float(multiplier) * float(epsilon) * schedule.fraction(step, total_steps)


def decay_after_half(progress: float, final_ratio: float) -> float:
    """LR factor of the GloRo recipe ``decay_to_X_after_half``: 1 for the first half, then exponential
    decay reaching ``final_ratio = X / lr₀`` at the end: ``final_ratio^{(t − ½)/½}``."""
    if not 0.0 < final_ratio <= 1.0:
        raise ValueError(f"final_ratio must lie in (0, 1], got {final_ratio}")
    progress = min(max(progress, 0.0), 1.0)
    if progress <= 0.5:
        return 1.0
    return final_ratio ** ((progress - 0.5) / 0.5)
