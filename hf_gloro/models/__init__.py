"""Lipschitz backbones, registered in timm's model registry on import, and the adapter for other timm models."""

from .adapted import ADAPTATION_OPTIONS, AdaptedBackbone, BatchCentering2d, normalize_adaptation
from .base import LIPSCHITZ_BACKBONES, LipschitzBackbone, register_lipschitz_model
from .gloro_convnets import GloRoConvNet
from .liresnet import LiResNet

__all__ = ["ADAPTATION_OPTIONS", "LIPSCHITZ_BACKBONES", "AdaptedBackbone", "BatchCentering2d", "GloRoConvNet",
           "LiResNet", "LipschitzBackbone", "normalize_adaptation", "register_lipschitz_model"]
