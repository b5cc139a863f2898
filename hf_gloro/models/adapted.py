"""Widely used timm networks made GloRo-trainable: the adapter.

``GloRoConfig(backbone="resnet18", adaptation={...})`` (any timm model name that is not one of this package's
native Lipschitz backbones) builds the timm model **without its classifier**, applies the surgery the
``adaptation`` options ask for, traces what is left with ``torch.fx`` and bounds it with
:class:`hf_gloro.lipschitz.graph.LipschitzGraph` (a guaranteed bound propagated through every node of the
graph: convolutions/dense layers by their operator norms at the real input size, residual additions, pooling,
eval-mode BatchNorm, activations by their true constants; anything unknown is an error naming the node).
The GloRo head of :class:`~hf_gloro.GloRoForImageClassification` replaces the classifier.

The backbone is an ordinary :class:`~hf_gloro.models.LipschitzBackbone` whose ``features`` is
``LipschitzSequential(LipschitzGraph(trunk, (C, H, W)))``: the model's bound, certificate, caches and float-sound
certification path are exactly those of the native backbones.

Adaptation options (``GloRoConfig.adaptation``; every key has a default, and the saved config records all of
them)
    ``activation``: ``"minmax"`` (default; every activation *module* → :class:`~hf_gloro.lipschitz.MinMax`,
    GroupSort-2, 1-Lipschitz and gradient-norm preserving), ``"relu"`` (→ ReLU) or ``"keep"`` (GELU ≈ 1.13,
    SiLU ≈ 1.10 as the graph bounds them). Functional activations (``F.relu`` inside a ``forward``) cannot be
    swapped; with ``"minmax"``/``"relu"`` such a model is refused, naming the node.

    ``batchnorm``: ``"keep"`` (default), ``"center"`` or ``"remove"``.

    * ``keep``: BatchNorm stays. Certificates bound the **eval-mode** map ``γ(x − μ_run)/√(σ²_run + eps) + β``
      (a fixed per-channel affine map; certification always runs BatchNorm in eval mode, whatever the model's
      mode). In training the forward normalises with batch statistics, which is not a fixed map of one input;
      the training estimate (power iteration through the graph) uses the *running* statistics, i.e. it
      estimates — and the loss penalises — the constant of the network that will be certified.
    * ``center``: :class:`BatchCentering2d`, ``x − μ + β`` per channel (batch mean in training, running mean
      in eval): a translation, 1-Lipschitz in both modes, and a network whose training map and certified map
      have the same constant.
    * ``remove``: BatchNorm → identity.

    ``layernorm``: ``"batchnorm"`` (default), ``"center"`` or ``"remove"``. LayerNorm divides by the
    per-sample standard deviation, which has no finite global Lipschitz bound (it blows up near constant
    inputs), so it is always replaced: by a BatchNorm (then treated as ``batchnorm`` says), by centering, or by
    the identity. Only channels-first ``LayerNorm2d`` (timm) over the channel dimension is replaced; any other
    LayerNorm makes the adapter refuse the model.

    ``stem``: ``"keep"`` (default) or ``"cifar"``: a timm ResNet's 7×7 stride-2 ``conv1`` → 3×3 stride-1 and its
    max pool removed (the usual CIFAR ResNet stem for 32×32 inputs).

    ``pool``: ``"avg"`` (default; global average pooling after ``forward_features``, L2 norm ``1/√(HW)``) or
    ``"flatten"`` (keep every position).

    ConvNeXt blocks lose their layer scale (``x·γ``, a learned diagonal the next layer can absorb).

    ``init``: ``"orthogonal"`` (default; every conv/dense weight orthogonal with zero bias, as the native
    backbones, BatchNorm/centering reset, timm's ``zero_init_last`` of residual blocks applied) or ``"timm"``
    (the model's own initialisation).

The classifier (``pre_logits`` MLPs, final norms, heads) is never built into the backbone: only the modules
``forward_features`` runs are kept (found by tracing), so e.g. VGG's 100 M-parameter ``ConvMlp`` never exists.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..lipschitz import LipschitzBounded, LipschitzSequential, MinMax, ReLU, RoundingModel
from .base import LipschitzBackbone

#: Every adaptation option, its allowed values; the first value is the default.
ADAPTATION_OPTIONS: dict[str, tuple[str, ...]] = {
    "activation": ("minmax", "relu", "keep"),
    "batchnorm": ("keep", "center", "remove"),
    "layernorm": ("batchnorm", "center", "remove"),
    "stem": ("keep", "cifar"),
    "pool": ("avg", "flatten"),
    "init": ("orthogonal", "timm"),
}


def default_adaptation() -> dict[str, str]:
    return {key: values[0] for key, values in ADAPTATION_OPTIONS.items()}


def normalize_adaptation(options: Mapping[str, Any] | None) -> dict[str, str]:
    """The defaults updated with ``options``; a one-line ``ValueError`` for an unknown key or value."""
    result = default_adaptation()
    for key, value in dict(options or {}).items():
        if key not in ADAPTATION_OPTIONS:
            close = difflib.get_close_matches(str(key), ADAPTATION_OPTIONS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown adaptation option {key!r}{hint}; options: {', '.join(ADAPTATION_OPTIONS)}")
        allowed = ADAPTATION_OPTIONS[key]
        if value not in allowed:
            raise ValueError(f"adaptation option {key}={value!r} is not one of {', '.join(map(repr, allowed))}")
        result[key] = value
    return result


# --- layers the surgery inserts ----------------------------------------------------------------------------------

class BatchCentering2d(LipschitzBounded, nn.Module):
    """Mean-only batch normalisation: ``y = x − μ + β`` per channel of ``(B, C, H, W)``.

    ``μ`` is the batch mean over ``(B, H, W)`` in training (tracked in ``running_mean`` with ``momentum``) and
    ``running_mean`` in eval. Both are 1-Lipschitz in L2: in eval a translation, in training ``I − P`` with ``P``
    the orthogonal projection onto per-channel constants (then a translation by ``β``).

    Floating point (eval): ``fl(fl(x − μ) + β)`` is ``x − μ + β`` up to ``γ₂(|x| + |μ| + |β|)`` per element, i.e.
    the affine rounding model with fan-in 1, ``‖|A|‖ = 1`` and a per-position "bias" norm ``‖|μ| + |β|‖₂``.
    """

    def __init__(self, num_features: int, momentum: float = 0.1, device=None, dtype=None) -> None:
        super().__init__()
        self.num_features = num_features
        self.momentum = momentum
        self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.bias.zero_()
            self.running_mean.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean = x.mean(dim=(0, 2, 3))
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
        else:
            mean = self.running_mean.to(x.dtype)
        return x - mean.view(1, -1, 1, 1) + self.bias.to(x.dtype).view(1, -1, 1, 1)

    _bounded_forward = forward

    def _estimate(self, iterations: int, update: bool) -> torch.Tensor:
        return torch.ones((), device=self.bias.device)

    def _compute_upper_bound(self) -> float:
        return 1.0

    def _compute_rounding_model(self) -> RoundingModel:
        total = self.running_mean.detach().double().abs() + self.bias.detach().double().abs()
        if not torch.isfinite(total).all():
            raise ValueError("BatchCentering2d has non-finite running mean or bias; refusing to certify")
        return RoundingModel(fan_in=1, abs_norm=1.0, bias_norm=float(total.norm()) * (1 + 1e-12))

    def absolute_forward(self, x_abs: torch.Tensor) -> torch.Tensor:
        """``|x| + |μ| + |β|`` ≥ ``|x − μ + β|`` (the a-posteriori rounding operator)."""
        shift = (self.running_mean.abs() + self.bias.abs()).to(x_abs.dtype).view(1, -1, 1, 1)
        return x_abs + shift

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}"


# --- surgery ------------------------------------------------------------------------------------------------------

def _activation_types() -> tuple[type, ...]:
    import timm.layers.activations as timm_act

    torch_types = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
                   nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus)
    timm_types = tuple(getattr(timm_act, name) for name in (
        "GELU", "GELUTanh", "QuickGELU", "Swish", "Mish", "HardSwish", "HardSigmoid", "HardMish", "Sigmoid", "Tanh",
        "PReLU") if hasattr(timm_act, name))
    return torch_types + timm_types


#: Functions whose presence in a traced graph means an activation the module surgery could not replace.
_FUNCTIONAL_ACTIVATIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.gelu, F.silu, F.leaky_relu, F.elu,
                           F.hardswish, F.mish, torch.sigmoid, torch.tanh, F.relu6, F.softplus}


def _canonical(module: nn.Module) -> nn.Module:
    """timm's activation classes that compute exactly a torch one → that torch class (the graph knows those)."""
    import timm.layers.activations as timm_act

    if type(module) is getattr(timm_act, "GELU", None):
        return nn.GELU()
    if type(module) is getattr(timm_act, "Swish", None):
        return nn.SiLU()
    return module


def _replace(root: nn.Module, predicate, factory) -> int:
    """Replace every sub-module ``m`` with ``predicate(m)`` by ``factory(m)``; returns the count."""
    count = 0
    for name, child in list(root.named_children()):
        if predicate(child):
            setattr(root, name, factory(child))
            count += 1
        else:
            count += _replace(child, predicate, factory)
    return count


def _normalization_replacement(kind: str, channels: int, device) -> nn.Module:
    if kind in ("keep", "batchnorm"):
        return nn.BatchNorm2d(channels, device=device)
    if kind == "center":
        return BatchCentering2d(channels, device=device)
    return nn.Identity()


def _is_channel_layernorm(module: nn.Module) -> bool:
    from timm.layers import LayerNorm2d

    return isinstance(module, LayerNorm2d)


def adapt_modules(model: nn.Module, options: Mapping[str, str], name: str) -> nn.Module:
    """The module surgery (in place; returns ``model``): stem, activations, LayerNorm, BatchNorm."""
    device = next(iter(model.parameters())).device
    if options["stem"] == "cifar":
        conv1, maxpool = getattr(model, "conv1", None), getattr(model, "maxpool", None)
        if type(conv1) is not nn.Conv2d or maxpool is None:
            raise ValueError(f"adaptation stem='cifar' needs a timm ResNet with a single-conv stem (conv1 + maxpool);"
                             f" {name!r} has none")
        model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride=1, padding=1,
                                bias=conv1.bias is not None, device=device)
        model.maxpool = nn.Identity()
    activation = options["activation"]
    types = _activation_types()
    if activation == "minmax":
        _replace(model, lambda m: isinstance(m, types), lambda m: MinMax())
    elif activation == "relu":
        _replace(model, lambda m: isinstance(m, types), lambda m: ReLU())
    else:
        _replace(model, lambda m: isinstance(m, types), _canonical)
    # LayerNorm first (its replacement may be a BatchNorm, then handled by the `batchnorm` option below).
    replacement = options["layernorm"]
    _replace(model, _is_channel_layernorm,
             lambda m: _normalization_replacement(replacement, m.normalized_shape[0], device))
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.startswith(("LayerNorm", "RmsNorm")):
            raise ValueError(f"{name!r}: {module_name} ({type(module).__name__}) is a per-sample normalisation with no "
                             "global Lipschitz bound, and the adapter only replaces channels-first LayerNorm2d")
    for module in model.modules():
        # ConvNeXt's layer scale (`x.mul(gamma)`, a learned diagonal) only rescales what the next layer can scale
        # itself; removing it keeps the graph to convolutions, norms, activations and additions.
        if type(module).__name__ == "ConvNeXtBlock" and isinstance(getattr(module, "gamma", None), nn.Parameter):
            module.gamma = None
    batchnorm = options["batchnorm"]
    if batchnorm != "keep":
        _replace(model, lambda m: isinstance(m, nn.BatchNorm2d),
                 lambda m: _normalization_replacement(batchnorm, m.num_features, device))
    return model


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer with this package's bounded layers (MinMax, centering, ...) kept as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, LipschitzBounded) or super().is_leaf_module(m, qualname)


class _Headless(nn.Module):
    """``forward_features`` followed by global average pooling (or flattening): the trunk before a classifier."""

    def __init__(self, model: nn.Module, pool: str) -> None:
        super().__init__()
        self.model = model
        self.pool = nn.AdaptiveAvgPool2d(1) if pool == "avg" else nn.Identity()
        self.flatten = nn.Flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.pool(self.model.forward_features(x)))


def trace_trunk(model: nn.Module, pool: str, options: Mapping[str, str], name: str) -> torch.fx.GraphModule:
    """The traced trunk ``forward_features → pool → flatten`` as a GraphModule holding only the modules it runs.

    Sub-module paths keep timm's names (``model.layer1.0.conv1``), so checkpoints read naturally.
    """
    root = _Headless(model, pool)
    try:
        graph = _Tracer().trace(root)
    except Exception as error:  # a data-dependent branch, an untraceable helper...
        raise ValueError(f"{name!r} cannot be traced with torch.fx ({type(error).__name__}: {error})".splitlines()[0]
                         ) from error
    if options["activation"] != "keep":
        for node in graph.nodes:
            if node.op == "call_function" and node.target in _FUNCTIONAL_ACTIVATIONS or (
                    node.op == "call_method" and node.target in ("relu", "relu_", "sigmoid", "tanh")):
                raise ValueError(f"{name!r}: node {node.name!r} applies {getattr(node.target, '__name__', node.target)}"
                                 f" functionally, which activation={options['activation']!r} cannot replace; use "
                                 "activation='keep'")
    return torch.fx.GraphModule(root, graph, class_name="AdaptedTrunk")


# --- initialisation -----------------------------------------------------------------------------------------------

@torch.no_grad()
def orthogonal_initialise(module: nn.Module) -> None:
    """Orthogonal conv/dense weights (rows of the flattened kernel), zero biases, reset normalisation layers, then
    timm's ``zero_init_last`` on residual blocks that define it (their last norm's scale → 0: identity blocks)."""
    for name, m in module.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.orthogonal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_parameters()
        elif isinstance(m, BatchCentering2d):
            m.reset_parameters()
        elif any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
            if not hasattr(m, "reset_parameters"):
                raise ValueError(f"adaptation init='orthogonal' does not know how to initialise {name} "
                                 f"({type(m).__name__}); use init='timm'")
            m.reset_parameters()
    for m in module.modules():
        if hasattr(m, "zero_init_last") and callable(m.zero_init_last):
            m.zero_init_last()


# --- the backbone -------------------------------------------------------------------------------------------------

class AdaptedBackbone(LipschitzBackbone):
    """A timm model adapted for GloRo: ``features = LipschitzSequential(LipschitzGraph(trunk, (C, H, W)))``.

    Args:
        name: timm model name (``resnet18``, ``vgg11_bn``, ``convnext_atto``, ...).
        in_chans: input channels.
        img_size: input height = width; the graph bound is computed at this size.
        adaptation: the options of :data:`ADAPTATION_OPTIONS` (missing keys take their defaults).
        **kwargs: passed to ``timm.create_model`` (``channels=(16, 32, 64, 128)``, ``dims=...``, ``depths=...``).

    ``num_features`` is the trunk's output width. The trunk is ``trunk`` (a ``torch.fx.GraphModule``) inside the
    graph leaf; ``lipschitz_upper_bound()``/``lipschitz_estimate()`` are those of the graph.
    """

    def __init__(self, name: str, in_chans: int = 3, img_size: int = 224, adaptation: Mapping[str, str] | None = None,
                 num_classes: int = 0, **kwargs) -> None:
        import timm

        super().__init__()
        options = normalize_adaptation(adaptation)
        # Under transformers' from_pretrained the default device is `meta`; the graph bound's construction evaluates
        # the trunk on a sample input, so the trunk is always materialised (on the CPU then; the checkpoint's
        # tensors are loaded into it afterwards).
        target = torch.empty(()).device
        target = torch.device("cpu") if target.type == "meta" else target
        for reserved in ("num_classes", "in_chans", "pretrained", "features_only"):
            kwargs.pop(reserved, None)
        build_device = torch.device("meta") if options["init"] == "orthogonal" else target
        with torch.device(build_device):
            model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
        if not hasattr(model, "forward_features"):
            raise ValueError(f"timm model {name!r} has no forward_features(); it cannot be adapted")
        adapt_modules(model, options, name)
        trunk = trace_trunk(model, options["pool"], options, name)
        shape = _output_shape(trunk, (in_chans, img_size, img_size))
        if len(shape) != 1:
            raise ValueError(f"{name!r}: the trunk's output has shape {shape}, expected a flat feature vector")
        from ..lipschitz.graph import LipschitzGraph

        with torch.device(target):
            if build_device != target:
                trunk = trunk.to_empty(device=target)
                orthogonal_initialise(trunk)
            self.features = LipschitzSequential(LipschitzGraph(trunk, (in_chans, img_size, img_size)))
        self.num_features = int(shape[0])
        self.in_chans, self.img_size = in_chans, img_size
        self.adaptation = options
        self.timm_name = name
        self._init_head(num_classes)

    @property
    def trunk(self) -> nn.Module:
        """The traced, adapted timm trunk (what the graph leaf runs)."""
        return self.features[0].graph_module


def _output_shape(trunk: nn.Module, input_shape: tuple[int, int, int]) -> tuple[int, ...]:
    """Per-sample output shape, from an eval-mode forward on the meta device (no compute, no statistics updated)."""
    on_meta = all(t.device.type == "meta" for t in (*trunk.parameters(), *trunk.buffers()))
    skeleton = trunk if on_meta else copy.deepcopy(trunk).to("meta")
    was_training = skeleton.training
    skeleton.eval()
    try:
        with torch.no_grad():
            return tuple(skeleton(torch.empty(1, *input_shape, device="meta")).shape[1:])
    finally:
        skeleton.train(was_training)


def create_adapted_backbone(name: str, in_chans: int, img_size: int, adaptation: Mapping[str, str] | None,
                            **kwargs) -> AdaptedBackbone:
    """The backbone :class:`~hf_gloro.GloRoForImageClassification` builds for a non-native ``backbone`` name."""
    return AdaptedBackbone(name, in_chans=in_chans, img_size=img_size, adaptation=adaptation, **kwargs)
