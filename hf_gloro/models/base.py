"""What every hf-gloro backbone shares: the timm model interface plus its Lipschitz bound."""

from __future__ import annotations

import torch
from torch import nn

from ..lipschitz import GloRoHead, LipschitzSequential, UnknownLipschitzError


#: Names of the timm models that follow the Lipschitz-backbone protocol (filled by the decorator below).
LIPSCHITZ_BACKBONES: set[str] = set()


def register_lipschitz_model(fn):
    """``timm.models.register_model`` that also records the name as a Lipschitz backbone.

    Third-party packages can register their own backbones with it, as long as the model class provides
    ``num_features``, ``lipschitz_estimate()`` and ``lipschitz_upper_bound()`` (see :class:`LipschitzBackbone`).
    """
    from timm.models import register_model

    LIPSCHITZ_BACKBONES.add(fn.__name__)
    return register_model(fn)


def build_backbone(cls: type, variant: str, pretrained: bool, **kwargs) -> "LipschitzBackbone":
    """``timm.build_model_with_cfg`` plus a ``pretrained_cfg`` whose ``input_size``/``mean``/``std`` match
    the channels and size the model was actually built for (so ``resolve_data_config`` is right)."""
    from timm.models import build_model_with_cfg

    model = build_model_with_cfg(cls, variant, pretrained, **kwargs)
    cfg = dict(model.pretrained_cfg)
    channels, size = model.in_chans, model.img_size
    cfg["input_size"] = (channels, size, size)
    for key in ("mean", "std"):
        values = tuple(cfg.get(key) or ())
        if len(values) != channels:
            cfg[key] = (values[0],) * channels if values else ((0.0 if key == "mean" else 1.0),) * channels
    model.pretrained_cfg = model.default_cfg = cfg
    return model


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
    def bounded_chain(self) -> list[nn.Module]:
        """The chain ``forward`` runs when used as a feature extractor (``num_classes=0``): ``[self.features]``.

        Refused (:class:`~hf_gloro.lipschitz.UnknownLipschitzError`) if a subclass overrides ``forward``,
        ``forward_features`` or ``forward_head``, or if the head is not the identity: the bound describes
        ``features`` only.
        """
        cls = type(self)
        for name in ("forward", "forward_features", "forward_head"):
            if getattr(cls, name) is not getattr(LipschitzBackbone, name):
                raise UnknownLipschitzError(
                    f"{cls.__qualname__} overrides {name}(); its bound (that of `features`) may not describe what "
                    "it computes")
        if type(self.head) is not nn.Identity:
            raise UnknownLipschitzError(f"{cls.__qualname__} has a classifier head ({type(self.head).__name__}); "
                                        "certify a feature extractor (num_classes=0) followed by a GloRo head")
        return [self.features]

    def lipschitz_estimate(self, iterations: int = 1, update: bool = True) -> torch.Tensor:
        """Power-iteration estimate of ``Lip(features)`` (differentiable; for training)."""
        return self.features.lipschitz_estimate(iterations, update)

    def lipschitz_upper_bound(self) -> float:
        """Guaranteed bound on ``Lip(features)`` (float64 with rounding slack; cached per weights)."""
        return self.features.lipschitz_upper_bound()
