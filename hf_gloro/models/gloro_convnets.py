"""The convolutional networks of the GloRo paper (Leino et al., ICML 2021): 2C2F, 4C3F, 6C2F, 8C2F.

``aCbF`` = ``a`` convolutions then ``b`` dense layers (the last dense layer is the GloRo head, which
lives outside the backbone). Activation after every hidden layer (MinMax by default, as in the gloro
library), orthogonal initialisation, padding ``(k − 1) // 2``.
"""

from __future__ import annotations

from collections.abc import Sequence

from timm.models import generate_default_cfgs

from ..lipschitz import Flatten, LipschitzConv2d, LipschitzLinear, LipschitzSequential, create_activation
from .base import LipschitzBackbone, build_backbone, register_lipschitz_model

ConvSpec = tuple[int, int, int]  # (out_channels, kernel, stride)


class GloRoConvNet(LipschitzBackbone):
    """Plain Lipschitz CNN: ``[conv → act]* → flatten → [dense → act]* (→ head)``.

    Args:
        convs: ``(out_channels, kernel, stride)`` per convolution.
        dense: widths of the hidden dense layers; the last one is ``num_features``.
        num_classes: size of the head (0: no head, return features).
        in_chans: input channels.
        img_size: input height = width (the bound of each convolution depends on it).
        activation: ``"minmax"`` or ``"relu"``.
    """

    def __init__(self, convs: Sequence[ConvSpec], dense: Sequence[int], num_classes: int = 10, in_chans: int = 1,
                 img_size: int = 28, activation: str = "minmax", **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"unexpected arguments for GloRoConvNet: {sorted(kwargs)}")
        layers, channels, size = [], in_chans, img_size
        for out_channels, kernel, stride in convs:
            conv = LipschitzConv2d(channels, out_channels, kernel, size, stride=stride, padding=(kernel - 1) // 2)
            layers += [conv, create_activation(activation)]
            channels, size = out_channels, conv.output_size[0]
        layers.append(Flatten())
        width = channels * size * size
        for out_features in dense:
            layers += [LipschitzLinear(width, out_features), create_activation(activation)]
            width = out_features
        self.features = LipschitzSequential(*layers)
        self.num_features = width
        self.in_chans, self.img_size = in_chans, img_size
        self._init_head(num_classes)


def _create(variant: str, pretrained: bool = False, **kwargs) -> GloRoConvNet:
    return build_backbone(GloRoConvNet, variant, pretrained, **kwargs)


def _cfg(in_chans: int, size: int, num_classes: int, **kwargs) -> dict:
    return {
        "url": "",
        "num_classes": num_classes,
        "input_size": (in_chans, size, size),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.0,) * in_chans,
        "std": (1.0,) * in_chans,
        "first_conv": "features.0",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "gloro_2c2f.untrained": _cfg(1, 28, 10),
    "gloro_4c3f.untrained": _cfg(1, 28, 10),
    "gloro_6c2f.untrained": _cfg(3, 32, 10),
    "gloro_8c2f.untrained": _cfg(3, 64, 200),
})


def _defaults(cfg_name: str, kwargs: dict) -> dict:
    cfg = default_cfgs[cfg_name].default
    kwargs.setdefault("in_chans", cfg.input_size[0])
    kwargs.setdefault("img_size", cfg.input_size[-1])
    return kwargs


@register_lipschitz_model
def gloro_2c2f(pretrained: bool = False, **kwargs) -> GloRoConvNet:
    """GloRo 2C2F (MNIST ε=0.3): C16k4s2 → C32k4s2 → D100 → head."""
    model_args = dict(convs=[(16, 4, 2), (32, 4, 2)], dense=[100])
    return _create("gloro_2c2f", pretrained, **dict(model_args, **_defaults("gloro_2c2f", kwargs)))


@register_lipschitz_model
def gloro_4c3f(pretrained: bool = False, **kwargs) -> GloRoConvNet:
    """GloRo 4C3F (MNIST ε=1.58): C32k3 → C32k4s2 → C64k3 → C64k4s2 → D512 → D512 → head."""
    model_args = dict(convs=[(32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 4, 2)], dense=[512, 512])
    return _create("gloro_4c3f", pretrained, **dict(model_args, **_defaults("gloro_4c3f", kwargs)))


@register_lipschitz_model
def gloro_6c2f(pretrained: bool = False, **kwargs) -> GloRoConvNet:
    """GloRo 6C2F (CIFAR-10): C32k3 ×2 → C32k4s2 → C64k3 ×2 → C64k4s2 → D512 → head."""
    model_args = dict(convs=[(32, 3, 1), (32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 3, 1), (64, 4, 2)], dense=[512])
    return _create("gloro_6c2f", pretrained, **dict(model_args, **_defaults("gloro_6c2f", kwargs)))


@register_lipschitz_model
def gloro_8c2f(pretrained: bool = False, **kwargs) -> GloRoConvNet:
    """GloRo 8C2F (Tiny-ImageNet): C64k3 ×2 → C64k4s2 → C128k3 ×2 → C128k4s2 → C256k3 → C256k4s2 → D256 → head."""
    model_args = dict(
        convs=[(64, 3, 1), (64, 3, 1), (64, 4, 2), (128, 3, 1), (128, 3, 1), (128, 4, 2), (256, 3, 1), (256, 4, 2)],
        dense=[256],
    )
    return _create("gloro_8c2f", pretrained, **dict(model_args, **_defaults("gloro_8c2f", kwargs)))
