"""LiResNet (Hu et al., NeurIPS 2023): Lipschitz CNN with linear residual blocks.

``stem conv (k5, s2) → act → depth × [LinearResidualConv2d → act] → neck conv (k4, s4) → act → flatten →
dense → act → mlp_depth × [Cholesky-orthogonal dense → act] (→ head)``. Each residual block is bounded as the
single convolution ``I + α·γ⊙V``; the activation follows the skip-add, so the chain's bound is the product of
exact per-layer norms. The optional orthogonal MLP is the CHORD/"Recipe" neck MLP (8 layers in LiResNet++;
:class:`~hf_gloro.lipschitz.CholeskyOrthogonalLinear`, each bounded from its realised float weight).

ImageNet: a *patchify* stem (``patch_size=p``: kernel = stride = p, no padding, as in ViTs and the LiResNet
ImageNet models, whose patch is ``round(√(width/3))`` — 14 for width 588 — giving a 16×16 trunk at 224×224).
Named ``liresnet_l{depth}w{width}``; ``liresnet_l12w588`` is the ImageNet model (patch 14, neck 2048, 8-layer
orthogonal MLP, 224×224 by default).
"""

from __future__ import annotations

from timm.models import generate_default_cfgs

from ..lipschitz import (
    CholeskyOrthogonalLinear,
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
        stem_kernel, stem_stride, stem_padding: stem convolution (5, 2 and (k−1)//2 for 32×32 / 64×64 inputs).
        patch_size: patchify stem (kernel = stride = ``patch_size``, padding 0; overrides the ``stem_*``
            arguments). ``img_size`` must be a multiple of it.
        mlp_depth: Cholesky-orthogonal dense layers (each followed by the activation) after the neck's dense
            layer, all ``neck_features`` wide (0: none).
        mlp_jitter: their relative Gram-matrix shift δ (see :mod:`hf_gloro.lipschitz.orthogonal`).
    """

    def __init__(self, depth: int = 12, width: int = 512, neck_features: int = 512, num_classes: int = 10,
                 in_chans: int = 3, img_size: int = 32, activation: str = "minmax", stem_kernel: int = 5,
                 stem_stride: int = 2, stem_padding: int | None = None, patch_size: int | None = None,
                 mlp_depth: int = 0, mlp_jitter: float = 1e-3, **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"unexpected arguments for LiResNet: {sorted(kwargs)}")
        if patch_size is not None:
            if patch_size < 1 or img_size % patch_size:
                raise ValueError(f"patch_size={patch_size} must divide img_size={img_size} (a patchify stem "
                                 "covers the image with non-overlapping patches)")
            stem_kernel = stem_stride = int(patch_size)
            stem_padding = 0
        if stem_padding is None:
            stem_padding = (stem_kernel - 1) // 2
        if mlp_depth < 0:
            raise ValueError(f"mlp_depth must be >= 0, got {mlp_depth}")
        stem = LipschitzConv2d(in_chans, width, stem_kernel, img_size, stride=stem_stride, padding=stem_padding)
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
        for _ in range(mlp_depth):
            layers += [CholeskyOrthogonalLinear(neck_features, neck_features, jitter=mlp_jitter),
                       create_activation(activation)]
        self.features = LipschitzSequential(*layers)
        self.patch_size, self.mlp_depth, self.trunk_size = patch_size, mlp_depth, size
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


#: variant → default constructor arguments (any of them can be overridden through ``timm.create_model`` kwargs).
_VARIANTS = {
    "liresnet_l6w128": dict(depth=6, width=128),
    "liresnet_l12w256": dict(depth=12, width=256),
    "liresnet_l12w512": dict(depth=12, width=512),
    "liresnet_l18w256": dict(depth=18, width=256),
    # ImageNet (Hu et al. 2023/2024): patchify stem with patch round(√(588/3)) = 14 → 16×16 trunk, 2048-wide
    # neck and the 8-layer Cholesky-orthogonal MLP of LiResNet++.
    "liresnet_l12w588": dict(depth=12, width=588, patch_size=14, img_size=224, neck_features=2048, mlp_depth=8,
                             num_classes=1000),
}

default_cfgs = generate_default_cfgs({
    f"{name}.untrained": (_cfg(size=224, num_classes=1000) if name == "liresnet_l12w588" else _cfg())
    for name in _VARIANTS
})


def _create(variant: str, pretrained: bool, **kwargs) -> LiResNet:
    return build_backbone(LiResNet, variant, pretrained, **dict(_VARIANTS[variant], **kwargs))


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


@register_lipschitz_model
def liresnet_l12w588(pretrained: bool = False, **kwargs) -> LiResNet:
    """LiResNet ImageNet model: 12 blocks of width 588, patchify stem (14×14 patches of a 224×224 image),
    2048-wide neck, 8-layer Cholesky-orthogonal MLP."""
    return _create("liresnet_l12w588", pretrained, **kwargs)
