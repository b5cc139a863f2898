"""What every hf-gloro backbone shares: the timm model interface plus its Lipschitz bound."""

from __future__ import annotations

import torch
from torch import nn

from ..lipschitz import GloRoHead, LipschitzSequential


class LipschitzBackbone(nn.Module):
    """A timm-style classifier ``head(features(x))`` whose ``features`` map has a known Lipschitz bound.

    Subclasses build ``self.features`` (a :class:`LipschitzSequential`) and set ``num_features``. With
    ``num_classes=0`` (how :class:`~hf_gloro.GloRoForImageClassification` and timm feature extraction use
    it) the head is the identity and the model returns the ``num_features``-dim features.

    ``lipschitz_upper_bound()`` / ``lipschitz_estimate()`` always refer to ``features`` (input → pre-logits);
    the head enters through the GloRo margin constants instead.
    """

    features: LipschitzSequential
    num_features: int

    def _init_head(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = GloRoHead(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # --- timm interface -----------------------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self._init_head(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # --- Lipschitz interface ------------------------------------------------------------------------
    def lipschitz_estimate(self, iterations: int = 1, update: bool = True) -> torch.Tensor:
        """Power-iteration estimate of ``Lip(features)`` (differentiable; for training)."""
        return self.features.lipschitz_estimate(iterations, update)

    def lipschitz_upper_bound(self) -> float:
        """Guaranteed bound on ``Lip(features)`` (float64 with rounding slack; cached per weights)."""
        return self.features.lipschitz_upper_bound()
