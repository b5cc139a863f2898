"""``GloRoConfig``: the configuration of a GloRo image classifier over a timm-registered Lipschitz backbone."""

# No `from __future__ import annotations` here: huggingface_hub's strict dataclasses skip string annotations.
import contextvars
import difflib
import logging
import math
from typing import Any, Literal

import timm
from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .models import LIPSCHITZ_BACKBONES
from .models.adapted import ADAPTATION_OPTIONS, normalize_adaptation

logger = logging.getLogger(__name__)

#: Keyword arguments ``PreTrainedConfig`` consumes itself, or that its own ``to_dict`` writes.
_BASE_KWARGS = frozenset({
    "num_labels", "torch_dtype", "name_or_path", "_name_or_path", "model_type", "output_attentions",
    "attn_implementation", "experts_implementation", "per_layer_config", "_commit_hash", "auto_map",
    "custom_pipelines", "_attn_implementation_internal", "_experts_implementation_internal", "rope_scaling",
    "rope_theta", "use_return_dict",
})

#: True while a config is being read from a file (``from_dict``): unknown keys then warn instead of raising.
_LOADING = contextvars.ContextVar("gloro_config_loading", default=False)


def _generation_keys() -> frozenset[str]:
    try:
        from transformers import GenerationConfig

        return frozenset(GenerationConfig._get_default_generation_params())
    except Exception:  # pragma: no cover - depends on the transformers version
        return frozenset()


@strict
class GloRoConfig(PreTrainedConfig):
    r"""Configuration of :class:`~hf_gloro.GloRoForImageClassification`.

    A GloRo net appends a bottom logit ``y_⊥ = max_{i≠j}(y_i + ε·K_ji)`` to the ``m`` class logits, with
    ``K_ji = k·‖w_j − w_i‖₂`` and ``k`` a bound on the Lipschitz constant of pixels → features. Whenever ⊥
    does not win, the prediction is certified constant on the ball of radius ``epsilon`` in ``norm`` (L2 by
    default, or L∞; pixel scale, images in [0, 1]).

    Args:
        backbone (`str`): a timm model name. Either a native Lipschitz backbone of this package (``gloro_2c2f``,
            ``liresnet_l12w512``, ...; ``hf_gloro.models.LIPSCHITZ_BACKBONES``), or **any other timm model**
            (``resnet18``, ``vgg11_bn``, ``convnext_atto``, ...), which is then *adapted*: built without its
            classifier, modified as ``adaptation`` says and bounded through its ``torch.fx`` graph
            (:mod:`hf_gloro.models.adapted`).
        backbone_kwargs (`dict`, *optional*): extra keyword arguments for ``timm.create_model`` (e.g.
            ``{"channels": [16, 32, 64, 128]}`` for a narrow ResNet).
        adaptation (`dict`, *optional*): options for an adapted backbone, filled with their defaults (the
            saved config records every option); must be ``None`` for a native backbone. Keys and values:
            ``activation`` ``"minmax"`` (default) | ``"relu"`` | ``"keep"``; ``batchnorm`` ``"keep"`` (default:
            eval-mode BatchNorm in the certificate, running statistics in the training estimate) | ``"center"``
            (mean-only, 1-Lipschitz) | ``"remove"``; ``layernorm`` ``"batchnorm"`` (default) | ``"center"`` |
            ``"remove"`` (LayerNorm has no global bound and is always replaced); ``stem`` ``"keep"`` (default) |
            ``"cifar"`` (ResNet: 3×3 stride-1 first conv, no max pool); ``pool`` ``"avg"`` (default) |
            ``"flatten"``; ``init`` ``"orthogonal"`` (default) | ``"timm"``.
        num_channels (`int`): input channels (1 for MNIST, 3 for RGB).
        image_size (`int`): input height = width; the backbone's bound is computed at this size.
        epsilon (`float`): certifying radius in ``norm``, in the pixel scale ([0, 1] images). Must be > 0.
        norm (`str`): the threat model's norm: ``"l2"`` (default) or ``"linf"``. With ``"linf"``, ε, certified radii
            and ``lipschitz_constant`` are in L∞ units: the first dense/convolution layer is bounded as an ∞→2
            operator (the smallest of ``√d·‖W‖₂``, ``Σ_k ‖W[:, k]‖₂``, ``‖|W|·1‖₂`` and ``√(1ᵀ|WᵀW|1)``, see
            :mod:`hf_gloro.lipschitz.linf`), everything after it in L2; same float-soundness as L2. L∞ radii are
            ~``1/√d`` of L2 ones (MNIST ε∞ = 0.1 is a common setting). For adapted timm backbones the first layer is
            inside the graph and the looser ``√d·(L2 bound)`` is used.
        lipschitz_constant (`float`, *optional*): the guaranteed bound on Lip(pixels → features) (from ``norm`` to
            L2) recorded
            at save time. Informational: on load it is recomputed from the weights, and a recorded value
            below the recomputed bound makes loading fail.
        head_normalization (`str`): ``"none"`` or ``"lln"`` (unit-norm head rows, as in LiResNet).
        power_iterations (`int`): power-iteration steps per training forward pass.
        image_mean, image_std (`list[float]`, *optional*): per-channel normalisation applied *inside*
            the model (``(x − μ)/σ``, folded into the bound as ``1/min σ``). Default: the backbone's
            ``pretrained_cfg`` values.
        check_input_range (`bool`, defaults to `True`): certificates (eval-mode forward, ``certify``, pipelines,
            CLI) refuse pixel values outside [0, 1] — ε is in that scale, and a 0–255 image certified at a
            "radius" of 38 is meaningless. Set to ``False`` only for a model trained on another input domain.

    Unknown keyword arguments are an error (``epsilonn=0.5`` would otherwise be stored and ignored); unknown keys
    in a loaded ``config.json`` are kept with a warning.
    Example:

    ```python
    >>> import hf_gloro
    >>> config = hf_gloro.GloRoConfig(backbone="gloro_2c2f", num_channels=1, image_size=28, epsilon=0.3)
    >>> model = hf_gloro.GloRoForImageClassification(config)
    >>> adapted = hf_gloro.GloRoConfig(backbone="resnet18", num_channels=3, image_size=32, epsilon=36 / 255,
    ...                                num_labels=10, adaptation={"stem": "cifar", "batchnorm": "center"})
    ```
    """

    model_type = "gloro"

    backbone: str = "gloro_2c2f"
    backbone_kwargs: dict[str, Any] | None = None
    adaptation: dict[str, Any] | None = None
    num_channels: int = 1
    image_size: int = 28
    epsilon: float | int = 0.3
    norm: Literal["l2", "linf"] = "l2"
    lipschitz_constant: float | int | None = None
    head_normalization: Literal["none", "lln"] = "none"
    power_iterations: int = 10
    image_mean: list[float | int] | None = None
    image_std: list[float | int] | None = None
    check_input_range: bool = True

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        token = _LOADING.set(True)
        try:
            return super().from_dict(config_dict, **kwargs)
        finally:
            _LOADING.reset(token)

    def _reject_unknown(self, kwargs: dict) -> None:
        import dataclasses

        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(k for k in kwargs if k not in _BASE_KWARGS and k not in _generation_keys())
        if not unknown:
            return
        if _LOADING.get():
            logger.warning("GloRoConfig: unknown keys in the loaded configuration are kept but not used: %s",
                           ", ".join(unknown))
            return
        name = unknown[0]
        close = difflib.get_close_matches(name, sorted(fields | {"num_labels"}), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TypeError(f"GloRoConfig got an unexpected keyword argument {name!r}{hint}")

    def __post_init__(self, **kwargs):
        self._reject_unknown(kwargs)
        if (self.backbone not in LIPSCHITZ_BACKBONES and timm.is_model(self.backbone)
                and (self.adaptation is None or isinstance(self.adaptation, dict))):
            # Adapted backbone: record every option, so a later change of a default cannot change a saved model.
            try:
                self.adaptation = normalize_adaptation(self.adaptation)
            except ValueError:
                pass  # validate_backbone reports it
        if getattr(self, "id2label", None) is None and "num_labels" not in kwargs:
            # Without labels, default to the backbone's dataset (10 MNIST/CIFAR classes, 200 Tiny-ImageNet).
            kwargs["num_labels"] = _backbone_num_classes(self.backbone)
        if self.image_mean is None or self.image_std is None:
            defaults = _backbone_normalization(self.backbone, self.num_channels)
            if self.image_mean is None:
                self.image_mean = defaults[0]
            if self.image_std is None:
                self.image_std = defaults[1]
        super().__post_init__(**kwargs)

    def validate_epsilon(self):
        if isinstance(self.epsilon, bool) or not math.isfinite(self.epsilon) or self.epsilon <= 0:
            raise ValueError(f"epsilon must be a finite number > 0, got {self.epsilon!r}")

    @property
    def is_adapted(self) -> bool:
        """Whether ``backbone`` is a timm model adapted by :mod:`hf_gloro.models.adapted` (not a native one)."""
        return self.backbone not in LIPSCHITZ_BACKBONES

    def validate_backbone(self):
        if not timm.is_model(self.backbone):
            close = difflib.get_close_matches(self.backbone, sorted(LIPSCHITZ_BACKBONES | set(timm.list_models())),
                                              n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"backbone {self.backbone!r} is unknown (not a timm model){hint}")
        if self.backbone in LIPSCHITZ_BACKBONES:
            if self.adaptation is not None:
                raise ValueError(f"backbone {self.backbone!r} is a native Lipschitz backbone; adaptation must be None")
        else:
            normalize_adaptation(self.adaptation)  # one-line errors for unknown options

    def adaptation_description(self) -> str | None:
        """``"adapted timm resnet18 (activation=minmax, batchnorm=keep, ...)"``, or ``None`` for a native backbone."""
        if not self.is_adapted:
            return None
        options = normalize_adaptation(self.adaptation)
        return f"adapted timm {self.backbone} (" + ", ".join(f"{k}={options[k]}" for k in ADAPTATION_OPTIONS) + ")"

    def validate_shapes(self):
        if self.num_channels < 1:
            raise ValueError(f"num_channels must be >= 1, got {self.num_channels}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.power_iterations < 1:
            raise ValueError(f"power_iterations must be >= 1, got {self.power_iterations}")

    def validate_normalization(self):
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if values is not None and len(values) != self.num_channels:
                raise ValueError(f"{name} has {len(values)} entries but num_channels is {self.num_channels}")
        if self.image_std is not None and any(not (s > 0 and math.isfinite(s)) for s in self.image_std):
            raise ValueError(f"image_std must be finite and > 0, got {self.image_std}")

    def validate_lipschitz_constant(self):
        if self.lipschitz_constant is not None and not (
            math.isfinite(self.lipschitz_constant) and self.lipschitz_constant > 0
        ):
            raise ValueError(f"lipschitz_constant must be finite and > 0, got {self.lipschitz_constant}")


def _backbone_num_classes(backbone: str) -> int:
    try:
        return int(timm.models.get_pretrained_cfg(backbone).num_classes or 2)
    except Exception:  # unknown backbone: validate_backbone reports it
        return 2


def _backbone_normalization(backbone: str, channels: int) -> tuple[list[float], list[float]]:
    """Mean/std from the backbone's timm ``pretrained_cfg`` (zeros/ones when unknown or mismatched)."""
    try:
        cfg = timm.models.get_pretrained_cfg(backbone)
    except Exception:  # unknown backbone: validate_backbone reports it
        cfg = None
    mean = list(getattr(cfg, "mean", ()) or ())
    std = list(getattr(cfg, "std", ()) or ())
    if len(mean) != channels or len(std) != channels:
        return [0.0] * channels, [1.0] * channels
    return [float(m) for m in mean], [float(s) for s in std]
