"""Lipschitz backbones, registered in timm's model registry on import."""

from .base import LipschitzBackbone
from .gloro_convnets import GloRoConvNet
from .liresnet import LiResNet

__all__ = ["GloRoConvNet", "LiResNet", "LipschitzBackbone"]
