"""Lipschitz backbones, registered in timm's model registry on import."""

from .base import LIPSCHITZ_BACKBONES, LipschitzBackbone, register_lipschitz_model
from .gloro_convnets import GloRoConvNet
from .liresnet import LiResNet

__all__ = ["LIPSCHITZ_BACKBONES", "GloRoConvNet", "LiResNet", "LipschitzBackbone", "register_lipschitz_model"]
