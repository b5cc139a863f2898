"""``GloRoForImageClassification``: a certifiably robust image classifier as a ``transformers`` model.

Data flow: pixels in [0, 1] → input normalisation → Lipschitz backbone (timm) → GloRo head → logits →
GloRo logits ``[y, y_⊥]`` → certificate. Certificates always use the guaranteed bound
(:meth:`GloRoForImageClassification.lipschitz_constant`); the power-iteration estimate only shapes training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_gloro import GloRoConfig
from .lipschitz import (
    GloRoHead,
    InputNormalization,
    certify_logits,
    converge_power_iterates,
    exact_matmul,
    gloro_logits,
)
from .lipschitz.numerics import weights_fingerprint


class InconsistentCheckpointError(ValueError):
    """A checkpoint whose recorded Lipschitz bound is below the bound recomputed from its weights."""


@dataclass
class GloRoImageClassifierOutput(ModelOutput):
    """Output of :class:`GloRoForImageClassification`.

    Args:
        loss: GloRo cross-entropy on the ``m + 1`` logits (when ``labels`` are given).
        logits: ``(B, m)`` class logits (what standard tools and pipelines read).
        gloro_logits: ``(B, m + 1)``: the class logits followed by the bottom logit ``y_⊥``.
        certified: ``(B,)`` bool, eval mode only: the prediction is certified at ε.
        certified_radius: ``(B,)`` float64, eval mode only: ``min_{i≠j}(y_j − y_i)/K_ji``.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    gloro_logits: torch.FloatTensor | None = None
    certified: torch.BoolTensor | None = None
    certified_radius: torch.DoubleTensor | None = None


@dataclass
class GloRoCertificate:
    """Per-row result of :meth:`GloRoForImageClassification.certify`.

    ``certified[b]`` means: every input within L2 distance ``epsilon`` of image ``b`` (pixel scale) gets
    the prediction ``predictions[b]``; ``radius[b]`` is the largest radius this certificate proves.
    """

    predictions: torch.LongTensor
    certified: torch.BoolTensor
    radius: torch.DoubleTensor
    epsilon: float
    lipschitz_constant: float

    @property
    def certified_fraction(self) -> float:
        return float(self.certified.float().mean()) if self.certified.numel() else float("nan")


class GloRoPreTrainedModel(PreTrainedModel):
    config_class = GloRoConfig
    config: GloRoConfig
    base_model_prefix = "backbone"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["GloRoForImageClassification"]
    accepts_loss_kwargs = False
    _keep_in_fp32_modules = ["backbone", "head", "normalization"]

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        # Deliberately not calling super(): its N(0, 0.02) re-init would replace the orthogonal init the
        # Lipschitz layers rely on. Only state that `from_pretrained` cannot restore is rebuilt here.
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()
        if hasattr(module, "reset_power_iterate"):
            module.reset_power_iterate()


class GloRoForImageClassification(GloRoPreTrainedModel):
    """A GloRo net: Lipschitz backbone + head whose bottom logit certifies L2 robustness at ε.

    Example:

    ```python
    >>> import torch, hf_gloro
    >>> model = hf_gloro.GloRoForImageClassification(hf_gloro.GloRoConfig(backbone="gloro_2c2f", epsilon=0.3))
    >>> cert = model.certify(torch.rand(4, 1, 28, 28))
    >>> cert.predictions, cert.certified, cert.radius
    ```
    """

    def __init__(self, config: GloRoConfig) -> None:
        super().__init__(config)
        kwargs = dict(config.backbone_kwargs or {})
        for reserved in ("num_classes", "in_chans", "img_size", "pretrained"):
            kwargs.pop(reserved, None)
        self.normalization = InputNormalization(config.image_mean, config.image_std)
        self.backbone = timm.create_model(
            config.backbone, pretrained=False, num_classes=0, in_chans=config.num_channels,
            img_size=config.image_size, **kwargs,
        )
        if not hasattr(self.backbone, "lipschitz_upper_bound"):
            raise ValueError(f"backbone {config.backbone!r} is not a Lipschitz-bounded hf-gloro backbone")
        self.head = GloRoHead(self.backbone.num_features, config.num_labels,
                              normalize_rows=config.head_normalization == "lln")
        self.post_init()

    # --- bounds -------------------------------------------------------------------------------------
    def lipschitz_constant(self) -> float:
        """Guaranteed upper bound on the L2 Lipschitz constant of pixels → features (float64, cached).

        ``= Lip(normalisation) · Lip(backbone)``, each factor a guaranteed bound with rounding slack.
        """
        return self._certification_constants()[0]

    def _certification_constants(self) -> tuple[float, torch.Tensor]:
        """``(k, K)``: the guaranteed feature bound and margin constants, cached until any weight changes.

        One fingerprint over every parameter and buffer decides; the per-layer caches underneath then
        recompute only the layers that changed.
        """
        # Power iterates never enter the guaranteed bound; every other tensor may.
        tensors = [b for name, b in self.named_buffers() if not name.endswith("power_iterate")]
        key = weights_fingerprint(*self.parameters(), *tensors)
        cache = self.__dict__.get("_certification_cache")
        if cache is None or cache[0] != key:
            with exact_matmul():
                bound = self.normalization.lipschitz_upper_bound() * self.backbone.lipschitz_upper_bound()
                bound *= 1 + 1e-15  # the product's own rounding
                cache = (key, bound, self.head.margin_constants_upper_bound(bound))
            self.__dict__["_certification_cache"] = cache
        return cache[1], cache[2]

    def lipschitz_estimate(self, iterations: int | None = None, update: bool = True) -> torch.Tensor:
        """Differentiable power-iteration estimate of the same constant (training only)."""
        iterations = self.config.power_iterations if iterations is None else iterations
        return self.normalization.lipschitz_estimate(iterations, update) * self.backbone.lipschitz_estimate(
            iterations, update
        )

    @torch.no_grad()
    def converge_power_iterates(self, tolerance: float = 1e-6, max_iterations: int = 2000) -> float:
        """Converge every power iterate (before evaluation/saving); returns the converged *estimate*.

        The estimate approaches the true constant from below; certificates never use it.
        """
        estimate = converge_power_iterates(self.backbone.features, tolerance, max_iterations)
        return float(self.normalization.lipschitz_estimate()) * estimate

    def margin_lipschitz_constants(self) -> torch.Tensor:
        """Guaranteed ``K_ji = k‖ŵ_j − ŵ_i‖`` (float64, ``m × m``)."""
        return self._certification_constants()[1]

    # --- checks -------------------------------------------------------------------------------------
    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        config = self.config
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"pixel_values must be a floating-point tensor with values in [0, 1], got dtype {pixel_values.dtype}"
                " (convert uint8 images with `x.float() / 255` or use the image processor)"
            )
        if pixel_values.ndim != 4:
            raise ValueError("pixel_values must have shape (batch, channels, height, width), "
                             f"got {tuple(pixel_values.shape)}")
        if pixel_values.shape[1] != config.num_channels:
            raise ValueError(f"expected {config.num_channels} channel(s), got {pixel_values.shape[1]}")
        size = (config.image_size, config.image_size)
        if tuple(pixel_values.shape[-2:]) != size:
            raise ValueError(f"expected images of size {size}, got {tuple(pixel_values.shape[-2:])}")
        # A sum is finite iff every element is (barring overflow of huge values, re-checked exactly).
        if not torch.isfinite(pixel_values.sum()) and not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contain NaN or inf")

    @staticmethod
    def _check_epsilon(epsilon: float) -> float:
        epsilon = float(epsilon)
        if not math.isfinite(epsilon) or epsilon <= 0:
            raise ValueError(f"epsilon must be a finite number > 0, got {epsilon}")
        return epsilon

    # --- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        epsilon: float | torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> GloRoImageClassifierOutput:
        """Logits, GloRo logits and (eval mode) certificates.

        In training mode the margin constants come from the differentiable power-iteration estimate
        (``config.power_iterations`` warm-started steps per call); in eval mode from the guaranteed bound.

        Args:
            pixel_values: ``(B, C, H, W)`` float images in [0, 1].
            labels: ``(B,)`` class indices; adds the GloRo cross-entropy ``loss``.
            epsilon: radius for the bottom logit (default ``config.epsilon``); a training schedule may pass
                a different value. Scalar or ``(B,)``.
        """
        self._check_pixel_values(pixel_values)
        if epsilon is None:
            epsilon = self.config.epsilon
        elif not torch.is_tensor(epsilon):
            epsilon = self._check_epsilon(epsilon)
        logits = self.head(self.backbone(self.normalization(pixel_values)))

        certified = radius = None
        if self.training:
            constants = self.head.margin_constants_estimate(self.lipschitz_estimate())
        else:
            constants = self.margin_lipschitz_constants()
            if not torch.is_tensor(epsilon) or epsilon.ndim == 0:
                _, certified, radius = certify_logits(logits, constants, float(epsilon))
                certified, radius = certified.to(logits.device), radius.to(logits.device)
            constants = constants.to(device=logits.device, dtype=logits.dtype)
        all_logits = gloro_logits(logits, constants, epsilon)

        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if labels.shape != logits.shape[:1] or labels.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"labels must be an integer tensor of shape ({len(logits)},), got "
                                 f"{labels.dtype} {tuple(labels.shape)}")
            if len(labels) and (labels.min() < 0 or labels.max() >= logits.shape[-1]):
                raise ValueError(f"labels must lie in [0, {logits.shape[-1]}), got {labels.min()}..{labels.max()}")
            loss = F.cross_entropy(all_logits, labels.long())
        return GloRoImageClassifierOutput(
            loss=loss, logits=logits, gloro_logits=all_logits, certified=certified, certified_radius=radius
        )

    @torch.no_grad()
    def certify(self, pixel_values: torch.Tensor, epsilon: float | None = None) -> GloRoCertificate:
        """Predictions, certificates and certified radii for a batch, from the guaranteed bound only.

        Works in train or eval mode without changing either (the backbone has no mode-dependent layers,
        and no power iteration runs). TF32 is disabled while the logits are computed.
        """
        epsilon = self._check_epsilon(self.config.epsilon if epsilon is None else epsilon)
        self._check_pixel_values(pixel_values)
        with exact_matmul():
            logits = self.head(self.backbone(self.normalization(pixel_values)))
        bound, constants = self._certification_constants()
        predictions, certified, radius = certify_logits(logits, constants, epsilon)
        return GloRoCertificate(predictions, certified, radius, epsilon, bound)

    # --- persistence --------------------------------------------------------------------------------
    def verify_recorded_bound(self, rtol: float = 1e-6) -> float:
        """Recompute the guaranteed bound and compare it with ``config.lipschitz_constant``.

        Raises :class:`InconsistentCheckpointError` if the recorded value is smaller than the recomputed
        bound beyond ``rtol`` (a tampered or inconsistent checkpoint). Returns the recomputed bound.
        """
        bound = self.lipschitz_constant()
        recorded = self.config.lipschitz_constant
        if recorded is not None and recorded < bound * (1 - rtol):
            raise InconsistentCheckpointError(
                f"the checkpoint records lipschitz_constant={recorded!r} but its weights give a guaranteed "
                f"bound of {bound!r}; refusing to load a model whose recorded bound is too small "
                "(tampered or inconsistent checkpoint)"
            )
        return bound

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        loaded = model[0] if isinstance(model, tuple) else model
        loaded.verify_recorded_bound()
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights (iterates included) and a config recording the current guaranteed bound.

        After ``register_for_auto_class(...)`` the folder also gets the self-contained model code and an
        ``auto_map`` (``transformers`` itself can only copy flat sibling modules, not the ``lipschitz/`` and
        ``models/`` sub-packages), so ``trust_remote_code=True`` loads it without hf-gloro installed.
        """
        self.config.lipschitz_constant = self.lipschitz_constant()
        cls = type(self)
        auto_class = cls._auto_class  # set on the class by register_for_auto_class
        cls._auto_class = None  # keep transformers' own copier (flat files only) out of it
        try:
            result = super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            cls._auto_class = auto_class
        if auto_class is not None and kwargs.get("is_main_process", True):
            from .hub import write_remote_code

            write_remote_code(save_directory)
        return result
