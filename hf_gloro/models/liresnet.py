"""LiResNet (Hu et al., NeurIPS 2023): Lipschitz CNN with linear residual blocks.

``stem conv (k5, s2) → act → depth × [LinearResidualConv2d → act] → neck conv (k4, s4) → act → flatten →
dense → act (→ head)``. Each residual block is bounded as the single convolution ``I + α·γ⊙V``; the
activation follows the skip-add, so the chain's bound is the product of exact per-layer norms.
Named ``liresnet_l{depth}w{width}``.
"""

from __future__ import annotations

from timm.models import generate_default_cfgs

from ..lipschitz import (
    Flatten,
    LinearResidualConv2d,
    LipschitzConv2d,
    LipschitzLinear,
    LipschitzSequential,
    create_activation,
    liresnet_residual_scale,
)
from .base import LipschitzBackbone, build_backbone, register_lipschitz_model


class LiResNet(LipschitzBackbone):
    """LiResNet backbone.

    Args:
        depth: number of linear residual blocks.
        width: channels of the stem and the residual trunk.
        neck_features: width of the dense layer after the neck (``num_features``).
        num_classes: size of the head (0: no head, return features).
        in_chans: input channels.
        img_size: input height = width; the stem halves it, the neck divides it by 4 again.
        activation: ``"minmax"`` (default) or ``"relu"``.
        stem_kernel, stem_stride: stem convolution (5 and 2 for 32×32 / 64×64 inputs).
    """

    def __init__(self, depth: int = 12, width: int = 512, neck_features: int = 512, num_classes: int = 10,
                 in_chans: int = 3, img_size: int = 32, activation: str = "minmax", stem_kernel: int = 5,
                 stem_stride: int = 2, **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"unexpected arguments for LiResNet: {sorted(kwargs)}")
        stem = LipschitzConv2d(in_chans, width, stem_kernel, img_size, stride=stem_stride,
                               padding=(stem_kernel - 1) // 2)
        size = stem.output_size[0]
        if size % 4:
            raise ValueError(f"LiResNet needs a trunk size divisible by 4 (neck stride), got {size} "
                             f"for img_size={img_size}")
        layers = [stem, create_activation(activation)]
        scale = liresnet_residual_scale(depth)
        for _ in range(depth):
            layers += [LinearResidualConv2d(width, size, residual_scale=scale), create_activation(activation)]
        neck = LipschitzConv2d(width, 2 * width, 4, size, stride=4, padding=0)
        layers += [neck, create_activation(activation), Flatten()]
        layers += [LipschitzLinear(2 * width * (size // 4) ** 2, neck_features), create_activation(activation)]
        self.features = LipschitzSequential(*layers)
        self.num_features = neck_features
        self.depth, self.width = depth, width
        self.in_chans, self.img_size = in_chans, img_size
        self._init_head(num_classes)


def _cfg(size: int = 32, num_classes: int = 10, **kwargs) -> dict:
    return {
        "url": "",
        "num_classes": num_classes,
        "input_size": (3, size, size),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.5, 0.5, 0.5),  # LiResNet centres inputs (x − 0.5) and does not rescale them
        "std": (1.0, 1.0, 1.0),
        "first_conv": "features.0",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


_VARIANTS = {"liresnet_l6w128": (6, 128), "liresnet_l12w256": (12, 256), "liresnet_l12w512": (12, 512),
             "liresnet_l18w256": (18, 256)}

default_cfgs = generate_default_cfgs({f"{name}.untrained": _cfg() for name in _VARIANTS})


def _create(variant: str, pretrained: bool, **kwargs) -> LiResNet:
    depth, width = _VARIANTS[variant]
    model_args = dict(depth=depth, width=width)
    return build_backbone(LiResNet, variant, pretrained, **dict(model_args, **kwargs))


@register_lipschitz_model
def liresnet_l6w128(pretrained: bool = False, **kwargs) -> LiResNet:
    """LiResNet, 6 residual blocks of width 128 (small; fast on a CPU)."""
    return _create("liresnet_l6w128", pretrained, **kwargs)


@register_lipschitz_model
def liresnet_l12w256(pretrained: bool = False, **kwargs) -> LiResNet:
    """LiResNet, 12 residual blocks of width 256."""
    return _create("liresnet_l12w256", pretrained, **kwargs)


@register_lipschitz_model
def liresnet_l12w512(pretrained: bool = False, **kwargs) -> LiResNet:
    """LiResNet, 12 residual blocks of width 512 (the rebuttal's CIFAR/Tiny-ImageNet model)."""
    return _create("liresnet_l12w512", pretrained, **kwargs)


@register_lipschitz_model
def liresnet_l18w256(pretrained: bool = False, **kwargs) -> LiResNet:
    """LiResNet, 18 residual blocks of width 256 (the gloro README's "18L256W")."""
    return _create("liresnet_l18w256", pretrained, **kwargs)
