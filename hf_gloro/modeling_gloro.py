"""``GloRoForImageClassification``: a certifiably robust image classifier as a ``transformers`` model.

Data flow: pixels in [0, 1] → input normalisation → Lipschitz backbone (timm) → GloRo head → logits →
GloRo logits ``[y, y_⊥]`` → certificate. Certificates always use the guaranteed bound
(:meth:`GloRoForImageClassification.lipschitz_constant`) and a rigorous bound on the floating-point error of the
forward pass (:mod:`hf_gloro.lipschitz.certificate`); the power-iteration estimate only shapes training.

One certification path: eval-mode :meth:`~GloRoForImageClassification.forward`,
:meth:`~GloRoForImageClassification.certify`, the pipelines, the CLI and the Trainer's metrics all go through
:meth:`GloRoForImageClassification._certify_batch` → :func:`hf_gloro.lipschitz.certify_inputs`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_gloro import GloRoConfig
from .lipschitz import (
    CertificationResult,
    ChainConstants,
    GloRoHead,
    InputNormalization,
    certification_numerics,
    certify_inputs,
    chain_leaves,
    converge_power_iterates,
    gloro_logits,
    product_upper_bound,
)
from .lipschitz.bounded import check_bounded_forward
from .lipschitz.linf import first_linf_leaf, prefix_constants, prefix_estimate
from .lipschitz.numerics import CERTIFIED_DTYPES, autocast_active

#: Pixel values may exceed [0, 1] by this much before certification refuses them (float rounding of rescaling).
PIXEL_RANGE_TOLERANCE = 1e-6


class InconsistentCheckpointError(ValueError):
    """A checkpoint whose recorded Lipschitz bound is below the bound recomputed from its weights, or whose
    tensors do not match the model (missing or unexpected weights)."""


class ReducedPrecisionError(RuntimeError):
    """A certificate was requested for a forward pass in reduced precision (autocast, fp16/bf16 weights or inputs).

    The floating-point error bound is derived for float32/float64 execution only. Certify outside autocast
    (``with torch.autocast(device_type, enabled=False): model.certify(x)``) on a float32 model.
    """


class CertificationRefusedError(RuntimeError):
    """The model cannot be certified as it stands (forward hooks registered, an unknown module in the chain...)."""


@dataclass
class GloRoImageClassifierOutput(ModelOutput):
    """Output of :class:`GloRoForImageClassification`.

    Args:
        loss: GloRo cross-entropy on the ``m + 1`` logits (when ``labels`` are given).
        logits: ``(B, m)`` class logits (what standard tools and pipelines read).
        gloro_logits: ``(B, m + 1)``: the class logits followed by the bottom logit ``y_⊥``.
        certified: ``(B,)`` bool, eval mode only: the prediction is certified at ε.
        certified_radius: ``(B,)`` float64, eval mode only: the radius the float-sound test proves
            (``min_{i≠j}(m_ji − E_ji − A_ji)/(K_ji + B_ji)``, see :mod:`hf_gloro.lipschitz.certificate`).
        margin_constants: ``(m, m)`` margin Lipschitz constants ``K_ji`` used for the bottom logit: the
            differentiable power-iteration estimate in training mode, the guaranteed constants in eval mode.

    In eval mode under ``torch.autocast`` or with fp16/bf16 weights no certificate is issued: ``certified`` and
    ``certified_radius`` are ``None`` and ``logits`` are the reduced-precision ones.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    gloro_logits: torch.FloatTensor | None = None
    certified: torch.BoolTensor | None = None
    certified_radius: torch.DoubleTensor | None = None
    margin_constants: torch.FloatTensor | None = None


@dataclass
class GloRoCertificate:
    """Per-row result of :meth:`GloRoForImageClassification.certify`.

    ``certified[b]`` means: every input within distance ``epsilon`` of image ``b`` in the ``norm`` of the threat
    model (``"l2"`` or ``"linf"``, pixel scale; ``config.norm``) gets
    the prediction ``predictions[b]`` from this package (eval-mode forward, ``certify``, pipelines, CLI), as
    executed in floating point; ``radius[b]`` is the largest radius this certificate proves. ``logits`` are
    the logits of that prediction; ``float64_rows`` marks the rows that needed a float64 re-evaluation.
    """

    predictions: torch.LongTensor
    certified: torch.BoolTensor
    radius: torch.DoubleTensor
    epsilon: float
    lipschitz_constant: float
    logits: torch.FloatTensor | None = None
    float64_rows: torch.BoolTensor | None = None
    norm: str = "l2"  # "l2" or "linf": the norm of epsilon, radius and the certificate

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
    """A GloRo net: Lipschitz backbone + head whose bottom logit certifies robustness at ε in ``config.norm``
    (L2, or L∞ with the first affine layer bounded as an ∞→2 operator).

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
        if config.is_adapted:
            from .models.adapted import create_adapted_backbone

            self.backbone = create_adapted_backbone(config.backbone, config.num_channels, config.image_size,
                                                    config.adaptation, **kwargs)
        else:
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
    def certification_chain(self) -> list[nn.Module]:
        """The layers pixels → features pass through, in order: input normalisation, then the backbone's chain.

        Raises :class:`~hf_gloro.lipschitz.UnknownLipschitzError` for any module that is not a bounded layer
        running its bounded forward, and if the backbone's own forward is not ``features`` followed by an
        identity head (a backbone with an overridden forward is refused, not trusted).
        """
        backbone = self.backbone
        chain = getattr(backbone, "bounded_chain", None)
        if chain is None:
            from .lipschitz import UnknownLipschitzError

            raise UnknownLipschitzError(
                f"backbone {type(backbone).__qualname__} does not expose bounded_chain(); it cannot be certified")
        return chain_leaves([self.normalization, *chain()])

    def _check_certifiable(self) -> None:
        """Refuse while forward hooks could change the function the bound describes."""
        globals_ = torch.nn.modules.module
        if any(getattr(globals_, name, None) for name in (
                "_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_with_kwargs")):
            raise CertificationRefusedError("global nn.Module forward hooks are registered; they may change what "
                                            "the network computes, so no certificate can be issued")
        for name, module in self.named_modules():
            if module._forward_hooks or module._forward_pre_hooks:
                raise CertificationRefusedError(
                    f"module {name or type(self).__name__!r} ({type(module).__name__}) has forward hooks; they may "
                    "change what it computes, so no certificate can be issued (remove the hooks first)")
        check_bounded_forward(self.head)

    def _certification_constants(self) -> ChainConstants:
        """Bounds, rounding models and margin constants, cached under a key that covers every tensor (content
        hash) and every setting of every layer in the chain and the head; recomputed only where changed."""
        leaves = self.certification_chain()
        norm, input_dim = self.config.norm, self.input_dimension
        key = (tuple(leaf.bound_key() for leaf in leaves), self.head.bound_key(), norm, input_dim)
        cache = self.__dict__.get("_cache_certification")
        if cache is not None and cache[0] == key and all(a is b for a, b in zip(cache[1].leaves, leaves)):
            return cache[1]
        with certification_numerics():
            lipschitz = [leaf.lipschitz_upper_bound() for leaf in leaves]
            rounding = [leaf.rounding_model() for leaf in leaves]
            # P_ℓ: ‖Δz_ℓ‖₂ per unit of input distance in the threat model's norm (L2: the running products).
            prefix = prefix_constants(leaves, lipschitz, norm, input_dim)
            if norm == "l2":
                bound = product_upper_bound(lipschitz)
            else:  # P_L, rounded up at every step, with the same final slack as the L2 product
                bound = prefix[-1] * (1.0 + 4 * len(lipschitz) * 2.0**-53)
            constants = ChainConstants(leaves, lipschitz, rounding, bound,
                                       self.head.margin_constants_upper_bound(bound), self.head.head_constants(),
                                       prefix=prefix, norm=norm)
        self.__dict__["_cache_certification"] = (key, constants)
        return constants

    @property
    def input_dimension(self) -> int:
        """``d = C·H·W``, the number of input elements (``‖v‖₂ ≤ √d·‖v‖∞``)."""
        return int(self.config.num_channels) * int(self.config.image_size) ** 2

    def lipschitz_constant(self) -> float:
        """Guaranteed bound ``k`` on ``‖Δfeatures‖₂ / ‖Δpixels‖`` in the config's norm (float64, cached).

        ``norm="l2"``: the product of every layer's guaranteed L2 bound along :meth:`certification_chain`
        (normalisation included). ``norm="linf"``: the ∞→2 constant ``P_L`` of
        :func:`hf_gloro.lipschitz.linf.prefix_constants` (first dense/conv layer bounded as an ∞→2 operator, L2
        after it; ``√d·Π L`` where that is smaller or where the first affine layer is inside a graph).
        """
        return self._certification_constants().sub_lipschitz

    def lipschitz_estimate(self, iterations: int | None = None, update: bool = True) -> torch.Tensor:
        """Differentiable power-iteration estimate of the same constant (training only).

        For ``norm="linf"``: ``min(√d·Π σ̂_ℓ, Q·B̃·Π_{after} σ̂_ℓ)`` with ``B̃`` the first affine layer's differentiable
        ∞→2 estimate (:func:`hf_gloro.lipschitz.linf.prefix_estimate`).
        """
        iterations = self.config.power_iterations if iterations is None else iterations
        if self.config.norm == "l2":
            return self.normalization.lipschitz_estimate(iterations, update) * self.backbone.lipschitz_estimate(
                iterations, update
            )
        leaves = self.certification_chain()
        estimates = [leaf.lipschitz_estimate(iterations, update) for leaf in leaves]
        index = first_linf_leaf(leaves)
        linf = {} if index is None else {index: leaves[index].linf_to_l2_estimate(estimates[index])}
        return prefix_estimate(leaves, estimates, "linf", self.input_dimension, linf)

    @torch.no_grad()
    def converge_power_iterates(self, tolerance: float = 1e-6, max_iterations: int = 2000) -> float:
        """Converge every power iterate (before evaluation/saving); returns the converged *estimate* (of the
        config's norm's constant, see :meth:`lipschitz_estimate`).

        The L2 estimate approaches the true constant from below; certificates never use it.
        """
        estimate = converge_power_iterates(self.backbone.features, tolerance, max_iterations)
        if self.config.norm != "l2":
            return float(self.lipschitz_estimate(iterations=1, update=True))
        return float(self.normalization.lipschitz_estimate()) * estimate

    def margin_lipschitz_constants(self) -> torch.Tensor:
        """Guaranteed ``K_ji = k‖ŵ_j − ŵ_i‖`` (float64, ``m × m``)."""
        return self._certification_constants().margin_constants

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

    def _check_certified_domain(self, pixel_values: torch.Tensor) -> None:
        """Certificates are about images in [0, 1] (ε is in that scale): refuse anything else, unless the config
        opts out (``check_input_range=False``, for models trained on another input domain)."""
        if not self.config.check_input_range or not len(pixel_values):
            return
        low, high = (float(v) for v in torch.aminmax(pixel_values.detach()))
        if low < -PIXEL_RANGE_TOLERANCE or high > 1 + PIXEL_RANGE_TOLERANCE:
            cause = " (0–255 images? divide by 255 or use the image processor)" if high > 1.5 else ""
            raise ValueError(
                f"pixel_values must lie in [0, 1] to be certified, got values in [{low:.4g}, {high:.4g}]{cause}; "
                "set config.check_input_range=False only for a model trained on another input domain"
            )

    def _reduced_precision(self, pixel_values: torch.Tensor) -> str | None:
        """Why a certificate cannot be issued in the current numeric context, or ``None``."""
        if autocast_active(pixel_values.device.type):
            return f"torch.autocast is enabled for {pixel_values.device.type}"
        dtypes = {p.dtype for p in self.parameters()}
        if not dtypes <= set(CERTIFIED_DTYPES):
            return f"the model's weights are {sorted(map(str, dtypes))}"
        if pixel_values.dtype not in CERTIFIED_DTYPES:
            return f"pixel_values are {pixel_values.dtype}"
        return None

    @staticmethod
    def _check_epsilon(epsilon: float) -> float:
        epsilon = float(epsilon)
        if not math.isfinite(epsilon) or epsilon <= 0:
            raise ValueError(f"epsilon must be a finite number > 0, got {epsilon}")
        return epsilon

    # --- forward ------------------------------------------------------------------------------------
    def _certify_batch(self, pixel_values: torch.Tensor, epsilon: float | torch.Tensor
                       ) -> tuple[CertificationResult, ChainConstants]:
        """The one certification path (eval-mode forward and :meth:`certify`): checks, then
        :func:`~hf_gloro.lipschitz.certify_inputs` under :func:`~hf_gloro.lipschitz.certification_numerics`."""
        self._check_certified_domain(pixel_values)
        self._check_certifiable()
        if self.head.weight.dtype == torch.float64 and pixel_values.dtype == torch.float32:
            # Evaluate a float64 model in float64 (exact widening of the input): the layers would otherwise round
            # their float64 weights to the input's float32, a different network than the one bounded.
            pixel_values = pixel_values.double()
        with certification_numerics(), _eval_mode(self):
            constants = self._certification_constants()
            result = certify_inputs(constants, self.head, pixel_values, epsilon)
        return result, constants

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
        (``config.power_iterations`` warm-started steps per call) and inputs may leave [0, 1] (augmentation). In
        eval mode the logits are the package's *decided* predictions and come with float-sound certificates
        (exactly what :meth:`certify` returns; gradients still flow to the logits), from the guaranteed bound.

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

        certified = radius = None
        if self.training:
            logits = self.head(self.backbone(self.normalization(pixel_values)))
            constants = self.head.margin_constants_estimate(self.lipschitz_estimate())
        else:
            reason = self._reduced_precision(pixel_values)
            if reason is None:
                result, chain = self._certify_batch(pixel_values, epsilon)
                logits, certified, radius = result.logits, result.certified, result.radius
                constants = chain.margin_constants
            else:
                _warn_no_certificate(reason)
                logits = self.head(self.backbone(self.normalization(pixel_values)))
                constants = self.margin_lipschitz_constants()
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
            loss=loss, logits=logits, gloro_logits=all_logits, certified=certified, certified_radius=radius,
            margin_constants=constants,
        )

    @torch.no_grad()
    def certify(self, pixel_values: torch.Tensor, epsilon: float | None = None) -> GloRoCertificate:
        """Predictions, certificates and certified radii for a batch: float-sound, from the guaranteed bound.

        Works in train or eval mode without changing either: certification runs every module in eval mode (the
        network the bound describes: BatchNorm of adapted backbones with running statistics) and restores the
        modes; no power iteration runs. Raises :class:`ReducedPrecisionError` under ``torch.autocast`` or for fp16/bf16
        weights or inputs, ``ValueError`` for pixel values outside [0, 1] (see ``config.check_input_range``) and
        :class:`CertificationRefusedError` while forward hooks are registered.
        """
        epsilon = self._check_epsilon(self.config.epsilon if epsilon is None else epsilon)
        self._check_pixel_values(pixel_values)
        reason = self._reduced_precision(pixel_values)
        if reason is not None:
            raise ReducedPrecisionError(
                f"cannot certify: {reason}. Certificates bound float32/float64 rounding only; call certify() "
                "outside autocast (torch.autocast(device_type, enabled=False)) on a float32 model (model.float())")
        result, constants = self._certify_batch(pixel_values, epsilon)
        return GloRoCertificate(result.predictions, result.certified, result.radius, epsilon,
                                constants.sub_lipschitz, result.logits, result.float64_rows, constants.norm)

    # --- persistence --------------------------------------------------------------------------------
    def verify_recorded_bound(self, rtol: float = 1e-6, where: str = "the checkpoint") -> float:
        """Recompute the guaranteed bound and compare it with ``config.lipschitz_constant``.

        Raises :class:`InconsistentCheckpointError` if the recorded value is smaller than the recomputed
        bound beyond ``rtol`` (a tampered or inconsistent checkpoint). Returns the recomputed bound.
        """
        bound = self.lipschitz_constant()
        recorded = self.config.lipschitz_constant
        if recorded is not None and recorded < bound * (1 - rtol):
            raise InconsistentCheckpointError(
                f"{where}: config.json records lipschitz_constant={recorded!r} but the weights give a guaranteed "
                f"bound of {bound!r}; refusing to load a model whose recorded bound is too small (tampered or "
                "inconsistent checkpoint; if you deliberately changed a setting that changes the bound, e.g. "
                "norm=..., pass lipschitz_constant=None to from_pretrained to record the recomputed bound)"
            )
        return bound

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, made strict: a checkpoint with missing, unexpected or
        mismatched tensors raises :class:`InconsistentCheckpointError` (instead of loading uninitialised memory
        with a warning), and the recorded bound is checked against the bound recomputed from the weights."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {kind: sorted(map(str, info.get(kind) or ())) for kind in
                    ("missing_keys", "unexpected_keys", "mismatched_keys")}
        problems = {kind: keys for kind, keys in problems.items() if keys}
        where = str(args[0] if args else kwargs.get("pretrained_model_name_or_path", "the checkpoint"))
        if problems:
            details = "; ".join(f"{kind.replace('_', ' ')}: {', '.join(keys[:8])}"
                                f"{' …' if len(keys) > 8 else ''}" for kind, keys in problems.items())
            raise InconsistentCheckpointError(f"{where}: the weights do not match the model ({details})")
        model.verify_recorded_bound(where=where)
        return (model, info) if wants_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights (iterates included), a config recording the current guaranteed bound, and the image
        processor (``preprocessor_config.json``), so the folder works with ``from_pretrained``, both pipelines
        and the CLI as it is.

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
        if kwargs.get("is_main_process", True):
            from .image_processing import image_processor_for_config

            image_processor_for_config(self.config).save_pretrained(save_directory)
            if auto_class is not None:
                from .remote_code import write_remote_code

                write_remote_code(save_directory)
        return result


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Every sub-module in eval mode while certifying, restored afterwards.

    The bound describes the eval-mode network (BatchNorm with running statistics, dropout off); a module left in
    training mode would compute another function (batch statistics) and update its statistics. Native backbones
    have no mode-dependent layers, so for them this changes nothing.
    """
    training = [module for module in model.modules() if module.training]
    for module in training:
        module.training = False
    try:
        yield
    finally:
        for module in training:
            module.training = True


_WARNED: set[str] = set()


def _warn_no_certificate(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"GloRo: no certificate issued in eval mode because {reason} (certificates need float32/"
                      "float64 execution outside autocast); `certified` and `certified_radius` are None",
                      stacklevel=3)
