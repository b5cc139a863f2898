"""Guaranteed Lipschitz bounds and float-sound propagation through a ``torch.fx`` graph.

:class:`LipschitzGraph` traces an arbitrary module (a timm ResNet, VGG, ConvMixer after ReLU → MinMax surgery,
or this package's own backbones) for **one fixed per-sample input shape** ``(C, H, W)``, runs a sample input of
that size through every node (shapes, batch-independence checks), and propagates a guaranteed L2 Lipschitz
bound ``L(n)`` of the map *graph input → node n* in topological order. Nodes it does not know raise
:class:`~hf_gloro.lipschitz.bounded.UnknownLipschitzError` naming the fx node; nothing is ever silently 1.

Tracing
    ``torch.fx`` with this package's bounded layers (:class:`~hf_gloro.lipschitz.bounded.LipschitzBounded`, except
    :class:`~hf_gloro.lipschitz.composition.LipschitzSequential`, which is traced through) and ``torch.nn``'s own
    modules as leaves. Python control flow on *shapes* (timm's ``ConvMlp``: ``if x.shape[-2] < 7``) is decided on
    the sample input and frozen into the graph, which is sound because the graph only runs at that input shape
    (checked in ``forward``); control flow on *values* is refused. The module is traced in eval mode, so
    ``if self.training`` branches take their eval form (the forward is the traced graph in both modes).

Rules (``L_p`` = bound of the node's input; every float operation below is rounded *up*)
    * ``nn.Conv2d`` / ``nn.Linear`` / bounded leaves: ``L = ‖A‖·L_p`` with the guaranteed operator norm at the real
      input size (:func:`~hf_gloro.lipschitz.spectral_bounds.conv2d_spectral_norm_bound`,
      :func:`~hf_gloro.lipschitz.spectral_bounds.dense_spectral_norm_bound`, a leaf's ``lipschitz_upper_bound()``).
    * BatchNorm (eval mode, running statistics; training mode or ``track_running_stats=False`` is refused): the
      per-channel affine map ``y = α⊙x + β`` with ``α = γ/√(var + eps)``: ``L = max|α|·L_p``, ``max|α|`` from float64
      with a relative ``1e-12`` rounding margin. **Folding**: when a convolution's only user is the BatchNorm, the
      pair is the single convolution with kernel ``K'_o = α_o·K_o`` and ``L = ‖C_{K'}‖·L_{conv input}``. ``K'`` is
      formed in float64 (``α`` in three operations, the product in one: ``|K̂' − K'| ≤ 5u₆₄|K̂'|`` entrywise), so
      ``‖C_{K'}‖ ≤ ‖C_{K̂'}‖ + 5u₆₄·‖C_{|K̂'|}‖`` (a convolution with an entrywise-smaller kernel has a smaller
      norm than ``C_{|·|}``), which is the value used. The network still *computes* conv then BN; only the bound
      is of the composite.
    * add / subtract of two nodes: ``L_a + L_b`` (an operand broadcast to ``f`` times its size counts ``√f``);
      add of a constant: ``L_a``; ``a − mean(a, dims, keepdim=True)``: ``L_a`` (an orthogonal projection).
    * concatenation (``torch.cat``, not along the batch): ``√(Σ L_i²)``.
    * multiplication / division by a constant number or tensor of the node's own shape: ``max|c|·L_p``.
    * reshapes (``flatten``, ``view``, ``reshape``, ``contiguous``, ``squeeze``…), slicing, ``nn.Identity``,
      dropout in eval mode, ``neg``: ``L_p``.
    * activations: ReLU, ReLU6, Hardtanh, MinMax/GroupSort: 1; LeakyReLU(slope): ``max(1, |slope|)``; Tanh,
      Softplus(β): 1; Sigmoid: ``1/4`` (``σ' = σ(1 − σ) ≤ 1/4``); GELU (exact, ``approximate='none'``):
      ``GELU'(x) = Φ(x) + xφ(x)``, ``GELU''(x) = φ(x)(2 − x²)``, so ``GELU'`` has its extrema at ``x = ±√2``:
      ``Φ(√2) + √2·φ(√2) = 1.128904…`` and ``Φ(−√2) − √2·φ(√2) = −0.128904…``: ``L = 1.12891``; SiLU
      ``x·σ(x)``: ``SiLU' = σ(x)(1 + x(1 − σ(x)))``, extrema where ``SiLU'' = σ(1 − σ)(2 + x(1 − 2σ)) = 0``, i.e.
      ``x ≈ ±2.39936``: ``1.099839…`` and ``−0.099839…``: ``L = 1.09984``. (Constants rounded up; the tests check
      them against a fine grid.)
    * max pooling: ``√(c_h·c_w)`` where ``c`` is the largest number of windows any input position lies in, counted
      from the real geometry (kernel, stride, padding, dilation, ceil mode; ``≤ ⌈k/s⌉`` per axis for dilation 1):
      a max is 1-Lipschitz from ``‖·‖∞ ≤ ‖·‖₂`` of its window, and ``Σ_windows ‖Δ_w‖² ≤ c·‖Δ‖²``.
    * average pooling (``AvgPool2d``/``avg_pool2d`` with any padding, ``ceil_mode``, ``count_include_pad``,
      ``divisor_override``; ``AdaptiveAvgPool2d``; ``mean`` over non-batch dims): the operator is the Kronecker
      product of one non-negative matrix per axis (PyTorch's divisors are products of per-axis window sizes), so
      its norm is the product of the dense spectral norms of those small matrices: exact (global mean over ``n``
      positions: ``1/√n``). The matrices are checked against the real pooling on a random input first.
    * anything else (products of two activations, attention, LayerNorm, unknown functions/methods/modules) raises
      :class:`UnknownLipschitzError` naming the node and its target. In-place operations whose input has other users
      are refused too.

Training estimate (:meth:`LipschitzGraph.lipschitz_estimate`)
    The same rules with differentiable tensors: one persistent warm-started power iterate per ``nn.Conv2d`` /
    ``nn.Linear`` (folded conv-BN: on the folded kernel) held in ``power_iterates``, a bounded leaf's own
    ``lipschitz_estimate``, BN's ``max|α|``, constant factors for the rest.

Floating point (:class:`GraphRounding`, used by :func:`~hf_gloro.lipschitz.float_error.run_chain` through the
:class:`~hf_gloro.lipschitz.float_error.CompositeRounding` interface)
    Per node the deviation ``D(n) ≥ ‖ẑ_n − z_n‖`` of the computed from the exact activation, from the deviation of
    the graph's input (``u`` the dtype's unit roundoff, ``λ`` its smallest normal number, ``M`` output elements):

    * affine nodes (conv, linear, BN, pooling averages, bounded affine leaves): ``D = ‖A‖·D_p + δ`` with ``δ`` the
      :class:`~hf_gloro.lipschitz.bounded.RoundingModel` term ``γ_{n+1}(‖|A|‖·‖ẑ_p‖ + ‖b‖) + 2√M(n+1)λ`` (or its
      a-posteriori form ``γ_{n+1}‖|A|·|ẑ_p| + |b|‖``). BN in eval: ``y = (x − μ)·γ/√(var + eps) + b`` however the
      kernel orders it (precomputed ``α, β`` or not, ``rsqrt`` within 2 ulp) is within ``γ₁₂(|α||x| + |α||μ| + |b|)``
      of the exact map: a rounding model with ``n = 11``, ``|A| = diag|α|``, bias ``|α||μ| + |b|``. Average pools:
      a sum of ``k`` terms and a division, ``n = k + 1``. A folded conv→BN pair: ``D = ‖C_{K'}‖·D_in + max|α|·δ_conv
      + δ_BN`` (because ``ẑ_BN − z_BN = [fl(BN)(ẑ) − BN(ẑ)] + diag(α)([fl(conv)(ẑ_in) − conv(ẑ_in)] + C(ẑ_in − z_in))``).
    * exact nodes (ReLU, ReLU6, Hardtanh, MinMax, max pooling, reshapes, slicing, identity, dropout in eval, neg):
      ``D = κ·D_p`` with ``κ`` the node's Lipschitz constant (they compare and copy).
    * one correctly rounded operation per element (multiplication/division by a constant, LeakyReLU's negative
      side): ``D = κ·D_p + u‖ŵ‖/(1 − u) + √M·λ`` (``ŵ`` the computed output: ``|exact result of the rounded op| ≤
      |ŵ|/(1 − u)``).
    * add/subtract: ``D = √f_a·D_a + √f_b·D_b + u‖ŵ‖/(1 − u) + 3√M·λ`` (the last term covers flush-to-zero of
      subnormal inputs and outputs); concatenation: ``√(Σ D_i²)``.
    * GELU, SiLU, Tanh, Sigmoid, Softplus (transcendental functions whose library results are not correctly rounded
      and have no documented error bound): certification is **refused** with an error naming the node (the
      Lipschitz bound is still available).

    Norms ``‖ẑ_n‖`` are measured on the computed activations (:func:`~hf_gloro.lipschitz.float_error.activation_norms`)
    except after nodes that cannot increase them (ReLU, MinMax, reshapes, slicing). The float64 "ball" terms
    ``c_n + s_n·r`` (every input within ``r`` of ``x``) follow the same rules with ``u = 2⁻⁵³``, the exact activation
    norms ``S_n + Π_n·r`` (``S_n = ‖ẑ_n(x)‖ + D_n(x)``, ``Π_n`` = the chain's product before the graph times
    ``L(n)``), Minkowski for concatenation (``√Σ(c_i + s_i r)² ≤ √Σc_i² + r√Σs_i²``) and, for a folded conv, the
    conv's ``‖|C|‖`` standing in for its norm (the ball terms are ~1e-16 relative; looseness there costs nothing).
"""

from __future__ import annotations

import builtins
import inspect
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .bounded import EXACT, LipschitzBounded, RoundingModel, UnknownLipschitzError, settings_signature
from .float_error import (
    NORM_SLACK,
    CompositeRounding,
    absolute_conv_norm_bound,
    absolute_dense_norm_bound,
    activation_norms,
    affine_ball_step,
    layer_rounding_error,
    layer_rounding_error_a_posteriori,
)
from .numerics import SMALLEST_NORMAL, UNIT_ROUNDOFF, content_digest
from .power_iteration import conv2d_operator, dense_operator, spectral_norm_estimate
from .spectral_bounds import _pair, conv2d_spectral_norm_bound, dense_spectral_norm_bound

#: sup|GELU'| (exact GELU), attained at x = √2: Φ(√2) + √2·φ(√2) = 1.1289039…, rounded up.
GELU_LIPSCHITZ = 1.12891
#: sup|SiLU'|, attained at x ≈ 2.39936: σ(x)(1 + x(1 − σ(x))) = 1.0998393…, rounded up.
SILU_LIPSCHITZ = 1.09984

_U64 = 2.0**-53


#: Batch size of the sample the analysis runs through the graph.
_SAMPLES = 7


def gamma_safe(k: int, u: float) -> float:
    """``γ_k = k·u/(1 − k·u)``."""
    return k * u / (1.0 - k * u)


# --- upward-rounded float64 arithmetic -------------------------------------------------------------------------

def _up(value: float) -> float:
    """The next float64 above ``value``: covers the one rounding of the operation that produced it."""
    return math.nextafter(value, math.inf)


def _mul_up(a: float, b: float) -> float:
    return _up(a * b)


def _add_up(a: float, b: float) -> float:
    return _up(a + b)


def _sqrt_up(value: float) -> float:
    return _up(math.sqrt(_up(value)))


def _hypot_up(values) -> float:
    total = 0.0
    for v in values:
        total = _add_up(total, _mul_up(v, v))
    return _sqrt_up(total)


# --- tracing ---------------------------------------------------------------------------------------------------

def _is_bounded_leaf(module: nn.Module) -> bool:
    from .composition import LipschitzSequential

    return isinstance(module, LipschitzBounded) and not isinstance(module, LipschitzSequential)


def _run_untraced(module: nn.Module, args, kwargs):
    """Call ``module`` for real while fx is tracing: fx patches ``nn.Module.__call__``/``__getattr__`` (to record
    calls and parameter reads as nodes); the originals are put back for the duration of the call."""
    originals = (getattr(fx._symbolic_trace, "_orig_module_call", None),
                 getattr(fx._symbolic_trace, "_orig_module_getattr", None))
    patched = (nn.Module.__call__, nn.Module.__getattr__)
    if None in originals:
        raise UnknownLipschitzError("this torch.fx version does not expose the original Module.__call__")
    nn.Module.__call__, nn.Module.__getattr__ = originals
    try:
        return module(*args, **kwargs)
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = patched


class _ShapeTracer(fx.Tracer):
    """fx tracer whose leaves are ``torch.nn`` modules and this package's bounded layers, and which decides Python
    control flow on *shapes* with the concrete sample input (values: refused)."""

    def __init__(self, sample: torch.Tensor) -> None:
        super().__init__()
        self.sample = sample
        self._values: dict[fx.Node, object] = {}
        self._shape_only: set[fx.Node] = set()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _is_bounded_leaf(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        inputs = node.all_input_nodes
        if (kind == "call_function" and target is builtins.getattr and len(args) > 1
                and args[1] in ("shape", "ndim", "dtype", "device")) or (
                kind == "call_method" and target in ("size", "dim")):
            self._shape_only.add(node)
        elif kind in ("call_function", "call_method") and inputs and all(n in self._shape_only for n in inputs):
            self._shape_only.add(node)
        return node

    def _concrete(self, node: fx.Node):
        if node in self._values:
            return self._values[node]
        args = fx.node.map_arg(node.args, self._concrete)
        kwargs = fx.node.map_arg(node.kwargs, self._concrete)
        if node.op == "placeholder":
            value = self.sample
        elif node.op == "get_attr":
            value = _fetch_attr(self.root, node.target)
        elif node.op == "call_module":
            value = _run_untraced(self.root.get_submodule(node.target), args, kwargs)
        elif node.op == "call_function":
            value = node.target(*args, **kwargs)
        elif node.op == "call_method":
            value = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:  # pragma: no cover
            raise fx.proxy.TraceError(f"cannot evaluate {node.op}")
        self._values[node] = value
        return value

    def _specialize(self, obj: fx.Proxy, what: str):
        node = obj.node
        if node not in self._shape_only:
            raise UnknownLipschitzError(
                f"fx node {node.name!r} ({_describe_target(node)}) is used in Python control flow ({what}) and depends "
                "on tensor values, not only on shapes; such a graph cannot be bounded")
        with torch.no_grad():
            return self._concrete(node)

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self._specialize(obj, "a condition"))

    def iter(self, obj: fx.Proxy):
        value = self._specialize(obj, "iteration")
        return iter([obj[i] for i in range(len(value))])


def _fetch_attr(root: nn.Module, target: str):
    value = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _describe_target(node: fx.Node, root: nn.Module | None = None) -> str:
    if node.op == "call_module" and root is not None:
        return f"module {node.target!r} of type {type(root.get_submodule(node.target)).__qualname__}"
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__module__', '')}.{getattr(node.target, '__qualname__', node.target)}"
    if node.op == "call_method":
        return f"method Tensor.{node.target}"
    return f"{node.op} {node.target}"


def trace_graph(module: nn.Module, input_shape: tuple[int, ...]) -> fx.GraphModule:
    """``module`` as an fx ``GraphModule`` specialised to per-sample inputs of ``input_shape`` (traced in eval mode;
    the modules' train/eval flags are restored afterwards)."""
    flags = [(m, m.training) for m in module.modules()]
    parameter = next(iter(module.parameters()), None)
    dtype = parameter.dtype if parameter is not None else torch.float32
    device = parameter.device if parameter is not None else torch.device("cpu")
    sample = torch.zeros(2, *input_shape, dtype=dtype, device=device)
    module.eval()
    try:
        tracer = _ShapeTracer(sample)
        graph = tracer.trace(module)
    except fx.proxy.TraceError as error:
        raise UnknownLipschitzError(f"cannot trace {type(module).__qualname__} with torch.fx: {error}") from error
    finally:
        for m, flag in flags:
            m.train(flag)
    return fx.GraphModule(tracer.root, graph, class_name=type(module).__name__ + "Graph")


# --- per-node rules --------------------------------------------------------------------------------------------

@dataclass
class _Rule:
    """What one fx node contributes. ``kind``: input, static, affine, fold, exact, rounded, add, cat, smooth,
    leaf, output. ``local`` is the node's operator bound w.r.t. its tensor inputs (``factors`` per input for add)."""

    node: fx.Node
    kind: str
    inputs: list[str]
    local: float = 1.0
    factors: list[float] = field(default_factory=list)  # add: √(broadcast factor) per operand; cat: 1 each
    what: str = ""
    module: nn.Module | None = None
    norm_preserving: bool = False  # ‖output‖ ≤ ‖input‖ (no norm measurement needed)
    estimate: Callable | None = None  # (iterations, update) -> tensor local bound (training)
    rounding: RoundingModel | None = None  # affine nodes (filled for certification)
    absolute: Callable | None = None  # |A|·|z| + |b| evaluator (affine nodes)
    evaluate: Callable | None = None  # env-args -> value, in the input's dtype
    fold_conv: str | None = None  # for a BN folded with its conv: the conv node's name
    bn_scale: float = 0.0  # max|α| of a folded BN
    refuse_float: str | None = None  # why the float result of this node cannot be bounded
    center: bool = False  # a − mean(a, keepdim=True)
    folded: bool = False  # a conv bounded together with its BatchNorm
    offset: float = 0.0  # add: |c| of a Python-number operand (rounded to the dtype when computed)


def _bn_alpha(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 ``α = γ/√(var + eps)`` and ``|α||μ| + |b|`` of an eval-mode BatchNorm (checks the mode)."""
    if bn.training:
        raise UnknownLipschitzError(f"{type(bn).__name__} is in training mode (batch statistics): its output depends on "
                                    "the whole batch; call .eval() (running statistics) before bounding")
    if not bn.track_running_stats or bn.running_var is None:
        raise UnknownLipschitzError(f"{type(bn).__name__} without running statistics normalises with batch statistics; "
                                    "it cannot be bounded")
    var = bn.running_var.detach().to(torch.float64)
    mean = bn.running_mean.detach().to(torch.float64)
    gamma = bn.weight.detach().to(torch.float64) if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().to(torch.float64) if bn.bias is not None else torch.zeros_like(var)
    if not (torch.isfinite(var).all() and torch.isfinite(gamma).all() and torch.isfinite(mean).all()
            and torch.isfinite(beta).all()) or (var + bn.eps <= 0).any():
        raise ValueError(f"{type(bn).__name__} has non-finite or non-positive-variance statistics")
    alpha = gamma / torch.sqrt(var + bn.eps)
    return alpha, alpha.abs() * mean.abs() + beta.abs()


def _bn_estimate_alpha(bn: nn.Module) -> torch.Tensor:
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    return gamma / torch.sqrt(bn.running_var + bn.eps)


def _bn_forward(bn: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """What an eval-mode ``nn.BatchNorm*d`` computes, with its tensors following ``z``'s dtype."""
    cast = (lambda t: None if t is None else t.to(z.dtype))
    return F.batch_norm(z, cast(bn.running_mean), cast(bn.running_var), cast(bn.weight), cast(bn.bias), False, 0.0,
                        bn.eps)


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding_mode != "zeros":
        raise UnknownLipschitzError(f"Conv2d with padding_mode={conv.padding_mode!r} is not supported (zeros only)")
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            if total % 2:
                raise UnknownLipschitzError("Conv2d padding='same' with asymmetric padding is not supported")
            pads.append(total // 2)
        return tuple(pads)  # type: ignore[return-value]
    return _pair(conv.padding)


def _window_counts(n: int, k: int, s: int, p: int, d: int, out: int) -> int:
    """Largest number of (pooling) windows that contain one input position along an axis."""
    counts = [0] * n
    for o in range(out):
        start = o * s - p
        for t in range(k):
            i = start + t * d
            if 0 <= i < n:
                counts[i] += 1
    return max(counts) if counts else 0


def _avg_matrix(n: int, k: int, s: int, p: int, out: int, count_include_pad: bool, adaptive: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-axis window matrix ``B`` (0/1, ``out × n``) and per-output window extents (PyTorch's divisor factors)."""
    matrix = torch.zeros(out, n, dtype=torch.float64)
    sizes = torch.zeros(out, dtype=torch.float64)
    for o in range(out):
        if adaptive:
            start, end = (o * n) // out, -((-(o + 1) * n) // out)
            sizes[o] = end - start
        else:
            start = o * s - p
            end = min(start + k, n + p)
            padded = end - start
            start, end = max(start, 0), min(end, n)
            sizes[o] = padded if count_include_pad else end - start
        matrix[o, start:end] = 1.0
    return matrix, sizes


@torch.no_grad()
def _avg_pool_operator(x: torch.Tensor, y: torch.Tensor, params: dict, adaptive: bool) -> tuple[float, int]:
    """Exact operator-norm bound (product of per-axis norms) and largest window of a 2-D average pool mapping ``x``'s
    spatial size to ``y``'s; the per-axis construction is first checked against the real pooling output ``y``."""
    (n_h, n_w), (o_h, o_w) = x.shape[-2:], y.shape[-2:]
    if adaptive:
        (bh, sh), (bw, sw) = _avg_matrix(n_h, 0, 0, 0, o_h, True, True), _avg_matrix(n_w, 0, 0, 0, o_w, True, True)
        override = None
    else:
        (kh, kw), (s_h, s_w), (ph, pw) = (_pair(params["kernel_size"]), _pair(params["stride"] or params["kernel_size"]),
                                          _pair(params["padding"]))
        include = bool(params.get("count_include_pad", True))
        bh, sh = _avg_matrix(n_h, kh, s_h, ph, o_h, include)
        bw, sw = _avg_matrix(n_w, kw, s_w, pw, o_w, include)
        override = params.get("divisor_override")
    # y[o, o'] = Σ_{i,j} B_h[o,i]·B_w[o',j]·x[i,j] / divisor[o,o']: PyTorch's divisor is a product of per-axis
    # extents (or a constant override), so the operator is A_h ⊗ A_w with rows of B scaled per axis.
    if override:
        ah, aw = bh / float(override), bw
    else:
        ah, aw = bh / sh[:, None], bw / sw[:, None]
    probe = torch.randn(x.shape[1], n_h, n_w, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = torch.einsum("hi,cij,wj->chw", ah, probe, aw)
    actual = (F.adaptive_avg_pool2d(probe[None], (o_h, o_w)) if adaptive else F.avg_pool2d(
        probe[None], params["kernel_size"], params["stride"], params["padding"], params.get("ceil_mode", False),
        params.get("count_include_pad", True), params.get("divisor_override")))[0]
    if actual.shape != expected.shape or not torch.allclose(actual, expected, rtol=1e-9, atol=1e-12):
        raise UnknownLipschitzError("average pooling: this geometry does not match the modelled operator; refusing")
    norm = _mul_up(dense_spectral_norm_bound(ah), dense_spectral_norm_bound(aw))
    window = int(bh.sum(dim=1).max()) * int(bw.sum(dim=1).max())
    return norm, window


def _max_pool_signature(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                        return_indices=False):
    pass


def _avg_pool_signature(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                        divisor_override=None):
    pass


def _adaptive_avg_pool_signature(input, output_size):
    pass


_POOL_SIGNATURES = {F.max_pool2d: _max_pool_signature, F.avg_pool2d: _avg_pool_signature,
                    F.adaptive_avg_pool2d: _adaptive_avg_pool_signature}


def _bind(fn: Callable, args, kwargs) -> dict:
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return {}
    bound.apply_defaults()
    return dict(bound.arguments)


_ADD = {operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__radd__", "__iadd__"}
_SUB = {operator.sub, operator.isub, torch.sub, "sub", "sub_", "__sub__", "__isub__"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_", "__mul__", "__rmul__"}
_DIV = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_", "__truediv__"}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze", "permute", "transpose",
                    "view_as", "reshape_as", "clone", "detach"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
                      torch.clone}
_INPLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv, "add_", "sub_", "mul_", "div_", "relu_",
            "__iadd__", "__isub__"}

#: Elementwise activations (module type or function): (Lipschitz constant or callable(params), float class).
#: float class: "exact" (compare/copy, norm-preserving), "exact_measured" (compare/copy, may move away from 0),
#: "rounded" (one rounded operation), or None (float result not bounded: certification refused).
_ACTIVATION_MODULES = {
    nn.ReLU: (1.0, "exact"), nn.ReLU6: (1.0, "exact"), nn.Hardtanh: (1.0, "exact_measured"),
    nn.Identity: (1.0, "exact"), nn.Dropout: (1.0, "exact"), nn.Dropout2d: (1.0, "exact"), nn.Flatten: (1.0, "exact"),
    nn.Tanh: (1.0, None), nn.Sigmoid: (0.25, None), nn.SiLU: (SILU_LIPSCHITZ, None),
}


def _shape(value) -> tuple[int, ...]:
    return tuple(value.shape)


class _Analysis:
    """Classifies every node of a traced graph and computes the guaranteed bound (and, on request, the float data).

    ``values`` holds each node's value on a sample batch of two random inputs of the real size.
    """

    def __init__(self, owner: "LipschitzGraph", with_rounding: bool = False, with_bounds: bool = True) -> None:
        self.owner = owner
        self.gm = owner.graph_module
        self.fold = owner.fold_batchnorm
        self.with_rounding = with_rounding
        self.with_bounds = with_bounds
        self.rules: list[_Rule] = []
        self.values: dict[str, object] = {}
        self.bounds: dict[str, float] = {}
        self.by_name: dict[str, _Rule] = {}
        self._run()

    # -- helpers --
    def _unknown(self, node: fx.Node, why: str = "") -> UnknownLipschitzError:
        return UnknownLipschitzError(
            f"cannot bound the Lipschitz constant of fx node {node.name!r} ({_describe_target(node, self.gm)})"
            + (f": {why}" if why else "") + "; supported: conv/linear/BatchNorm(eval)/pooling/activations/add/cat/"
            "reshapes (see hf_gloro.lipschitz.graph)")

    def _check_batch(self, node: fx.Node, value) -> None:
        if isinstance(value, torch.Tensor) and (value.ndim == 0 or value.shape[0] != _SAMPLES):
            raise self._unknown(node, f"its output {tuple(value.shape)} does not keep the batch dimension first")

    def _module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)

    # -- main pass --
    def _run(self) -> None:
        gm = self.gm
        parameter = next(iter(gm.parameters()), None)
        dtype = parameter.dtype if parameter is not None else torch.float32
        device = parameter.device if parameter is not None else torch.device("cpu")
        g = torch.Generator(device="cpu").manual_seed(1234)
        # An odd batch size no layer is likely to have as a channel count: a reshape that moved samples into other
        # dimensions would show as a wrong leading dimension.
        sample = torch.randn(_SAMPLES, *self.owner.input_shape, generator=g, dtype=torch.float64).to(
            device=device, dtype=dtype)
        users = {node.name: len(node.users) for node in gm.graph.nodes}
        self.users = users
        with torch.no_grad():
            for node in gm.graph.nodes:
                rule = self._classify(node, sample)
                rule.node = node
                self.rules.append(rule)
                self.by_name[node.name] = rule
                if rule.kind != "output":
                    self.values[node.name] = rule.evaluate(fx.node.map_arg(node.args, lambda n: self.values[n.name]),
                                                           fx.node.map_arg(node.kwargs, lambda n: self.values[n.name]))
                    if rule.kind not in ("static", "constant"):
                        self._check_batch(node, self.values[node.name])
                    self._post(rule)
                if self.with_bounds:
                    self._bound(rule)
        self._check_independence(sample)
        if self.with_bounds:
            self.value = self.bounds[self.output_rule.inputs[0]]

    @torch.no_grad()
    def _check_independence(self, sample: torch.Tensor) -> None:
        """Changing one sample of the batch must leave every other sample's output unchanged (bit for bit): the
        bound is about a per-sample map."""
        changed = sample.clone()
        changed[0] = -3.0 * changed[0] + 1.0
        flags = [(m, m.training) for m in self.gm.modules()]
        self.gm.eval()
        try:
            out = self.gm(changed)
            reference = self.gm(sample)
        finally:
            for m, flag in flags:
                m.train(flag)
        if not isinstance(out, torch.Tensor) or not torch.equal(out[1:], reference[1:]):
            raise UnknownLipschitzError("the graph mixes samples of a batch (an output changed when another sample "
                                        "changed); only per-sample maps can be bounded")

    def _post(self, rule: _Rule) -> None:
        """Checks that need the node's output value (pool geometry)."""
        node = rule.node
        if rule.what in ("max_pool", "avg_pool", "adaptive_avg_pool"):
            x, y = self.values[rule.inputs[0]], self.values[node.name]
            params = rule.module_params
            if rule.what == "max_pool":
                (kh, kw), (sh, sw) = _pair(params["kernel_size"]), _pair(params["stride"] or params["kernel_size"])
                (ph, pw), (dh, dw) = _pair(params["padding"]), _pair(params["dilation"])
                ch = _window_counts(x.shape[-2], kh, sh, ph, dh, y.shape[-2])
                cw = _window_counts(x.shape[-1], kw, sw, pw, dw, y.shape[-1])
                rule.local = _sqrt_up(float(ch * cw))
            else:
                norm, window = _avg_pool_operator(x, y, params, rule.what == "adaptive_avg_pool")
                rule.local = norm
                rule.rounding = RoundingModel(fan_in=window + 1, abs_norm=norm)
        elif rule.what == "mean":
            x, y = self.values[rule.inputs[0]], self.values[node.name]
            n = x.numel() // y.numel()
            rule.local = _up(1.0 / math.sqrt(n) * (1 + 4 * _U64))
            rule.rounding = RoundingModel(fan_in=n + 1, abs_norm=rule.local)
        elif rule.kind == "add":
            out = self.values[node.name]
            factors = []
            for name in rule.inputs:
                v = self.values[name]
                if out.numel() % v.numel():
                    raise self._unknown(node, "operand shapes do not broadcast by repetition")
                factors.append(_sqrt_up(float(out.numel() // v.numel())))
            rule.factors = factors
        elif rule.kind in ("exact", "rounded") and rule.what in ("reshape", "getitem", "scale"):
            out, x = self.values[node.name], self.values[rule.inputs[0]]
            if rule.what == "scale" and out.shape != x.shape:
                raise self._unknown(node, "a constant factor that broadcasts the activation is not supported")
            if rule.what == "reshape" and out.numel() != x.numel():
                raise self._unknown(node, "a reshape that changes the number of elements")

    # -- classification --
    def _classify(self, node: fx.Node, sample: torch.Tensor) -> _Rule:
        op, target = node.op, node.target
        call = lambda fn: (lambda a, k: fn(*a, **k))  # noqa: E731
        if op == "placeholder":
            if any(r.kind == "input" for r in self.rules):
                raise self._unknown(node, "graphs with more than one input are not supported")
            return _Rule(node, "input", [], evaluate=lambda a, k: sample)
        if op == "get_attr":
            value = _fetch_attr(self.gm, target)
            return _Rule(node, "constant", [], evaluate=lambda a, k: value)
        if op == "output":
            if not isinstance(node.args[0], fx.Node):
                raise self._unknown(node, "the graph must return a single tensor")
            self.output_rule = _Rule(node, "output", [node.args[0].name])
            return self.output_rule
        # Activation operands, with multiplicity (x + x has two), in argument order.
        operands: list[str] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: operands.append(n.name)
                        if self.by_name[n.name].kind not in ("static", "constant") else None)
        names = operands
        # Computations on shapes and constants only (x.shape, x.size(1), integer arithmetic on them).
        if not names:
            if op in ("call_function", "call_method"):
                return _Rule(node, "static", [], evaluate=self._generic_evaluator(node))
            raise self._unknown(node)
        if (op == "call_function" and target is builtins.getattr and node.args[1] in ("shape", "ndim", "dtype",
                                                                                          "device")) or (
                op == "call_method" and target in ("size", "dim")):
            return _Rule(node, "static", [], evaluate=self._generic_evaluator(node))
        if target in _INPLACE or (op == "call_module" and getattr(self._module(node), "inplace", False)) or (
                op == "call_function" and node.kwargs.get("inplace")):
            if self.users.get(names[0], 0) > 1:
                raise self._unknown(node, "an in-place operation on an activation that has other users")
        if op == "call_module":
            return self._classify_module(node, names)
        return self._classify_function(node, names)

    def _generic_evaluator(self, node: fx.Node) -> Callable:
        op, target = node.op, node.target
        if op == "call_function":
            return lambda a, k: target(*a, **k)
        return lambda a, k: getattr(a[0], target)(*a[1:], **k)

    def _classify_module(self, node: fx.Node, names: list[str]) -> _Rule:
        module = self._module(node)
        if len(names) != 1 or len(node.args) != 1 or node.kwargs:
            raise self._unknown(node, "modules must take exactly one activation")
        name = names[0]
        if _is_bounded_leaf(module):
            return _Rule(node, "leaf", [name], module=module, what=type(module).__name__,
                         evaluate=lambda a, k: module(a[0]),
                         estimate=lambda it, up: module.lipschitz_estimate(it, up))
        kind = type(module)
        if kind is nn.Conv2d:
            padding = _conv_padding(module)
            rule = _Rule(node, "affine", [name], module=module, what="conv2d")

            def conv_eval(a, k, m=module, p=padding):
                z = a[0]
                return F.conv2d(z, m.weight.to(z.dtype), None if m.bias is None else m.bias.to(z.dtype), m.stride, p,
                                m.dilation, m.groups)
            rule.evaluate = conv_eval
            rule.padding = padding
            return rule
        if kind is nn.Linear:
            rule = _Rule(node, "affine", [name], module=module, what="linear")
            rule.evaluate = lambda a, k, m=module: F.linear(a[0], m.weight.to(a[0].dtype),
                                                             None if m.bias is None else m.bias.to(a[0].dtype))
            return rule
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and kind in (nn.BatchNorm1d, nn.BatchNorm2d):
            rule = _Rule(node, "affine", [name], module=module, what="batchnorm")
            rule.evaluate = lambda a, k, m=module: _bn_forward(m, a[0])
            return rule
        if kind in (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d):
            params = {key: getattr(module, key) for key in ("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                                            "count_include_pad", "divisor_override", "output_size",
                                                            "return_indices") if hasattr(module, key)}
            return self._pool_rule(node, name, kind.__name__, params, lambda a, k, m=module: m(a[0]))
        if kind is nn.LeakyReLU:
            slope = float(module.negative_slope)
            return _Rule(node, "rounded", [name], local=max(1.0, abs(slope)), what="leaky_relu",
                         evaluate=lambda a, k, m=module: F.leaky_relu(a[0], m.negative_slope))
        if kind is nn.GELU:
            if module.approximate != "none":
                raise self._unknown(node, f"GELU(approximate={module.approximate!r}) is not supported")
            return _Rule(node, "smooth", [name], local=GELU_LIPSCHITZ, what="gelu", evaluate=lambda a, k: F.gelu(a[0]),
                         refuse_float="GELU (erf) results are not correctly rounded")
        if kind is nn.Softplus:
            return _Rule(node, "smooth", [name], local=1.0, what="softplus", evaluate=lambda a, k, m=module: m(a[0]),
                         refuse_float="Softplus (exp/log1p) results are not correctly rounded")
        if kind in _ACTIVATION_MODULES:
            constant, float_kind = _ACTIVATION_MODULES[kind]
            if kind is nn.Hardtanh and not (module.min_val <= 0 <= module.max_val):
                float_kind = "exact_measured"
            if kind is nn.Flatten and module.start_dim == 0:
                raise self._unknown(node, "Flatten over the batch dimension")
            if float_kind is None:
                return _Rule(node, "smooth", [name], local=constant, what=kind.__name__.lower(),
                             evaluate=lambda a, k, m=module: m(a[0]),
                             refuse_float=f"{kind.__name__} results are not correctly rounded")
            if kind is nn.ReLU:
                evaluate = lambda a, k: F.relu(a[0])  # noqa: E731 (out of place: the input may be kept)
            elif issubclass(kind, nn.Hardtanh):
                evaluate = lambda a, k, m=module: F.hardtanh(a[0], m.min_val, m.max_val)  # noqa: E731
            elif kind in (nn.Dropout, nn.Dropout2d):
                evaluate = lambda a, k: a[0]  # noqa: E731 (eval mode; a training-mode dropout is refused by the bound)
            else:
                evaluate = lambda a, k, m=module: m(a[0])  # noqa: E731
            return _Rule(node, "exact", [name], local=constant, what=kind.__name__.lower(), evaluate=evaluate,
                         norm_preserving=float_kind == "exact")
        raise self._unknown(node)

    def _pool_rule(self, node, name, kind_name, params, evaluate) -> _Rule:
        if params.get("return_indices"):
            raise self._unknown(node, "pooling with return_indices")
        if "Max" in kind_name or "max" in kind_name:
            rule = _Rule(node, "exact", [name], what="max_pool", evaluate=evaluate)
        elif "Adaptive" in kind_name or "adaptive" in kind_name:
            rule = _Rule(node, "affine", [name], what="adaptive_avg_pool", evaluate=evaluate)
        else:
            rule = _Rule(node, "affine", [name], what="avg_pool", evaluate=evaluate)
        rule.module_params = params
        return rule

    def _classify_function(self, node: fx.Node, names: list[str]) -> _Rule:
        op, target = node.op, node.target
        generic = self._generic_evaluator(node)
        key = target
        args = list(node.args)
        values = fx.node.map_arg(node.args, lambda n: self.values[n.name])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self.values[n.name])
        if key in _ADD or key in _SUB:
            if "alpha" in node.kwargs and node.kwargs["alpha"] not in (1, 1.0):
                raise self._unknown(node, "add/sub with alpha ≠ 1")
            if len(args) != 2 or node.kwargs.keys() - {"alpha"}:
                raise self._unknown(node)
            if not all(isinstance(a, (fx.Node, int, float)) for a in args):
                raise self._unknown(node)
            evaluate = (lambda a, k: a[0] + a[1]) if key in _ADD else (lambda a, k: a[0] - a[1])
            rule = _Rule(node, "add", names, what="add" if key in _ADD else "sub", evaluate=evaluate)
            rule.offset = sum(abs(float(a)) for a in args if isinstance(a, (int, float)))
            if key in _SUB and len(names) == 2 and isinstance(args[1], fx.Node):
                mean_rule = self.by_name.get(args[1].name)
                if (mean_rule is not None and mean_rule.what == "mean" and mean_rule.keepdim
                        and isinstance(args[0], fx.Node) and mean_rule.inputs == [args[0].name]):
                    rule.center = True
            return rule
        if key in _MUL or key in _DIV:
            if len(names) != 1 or len(args) != 2 or node.kwargs:
                raise self._unknown(node, "a product of two activations" if len(names) > 1 else "")
            other = values[1] if isinstance(args[0], fx.Node) and args[0].name == names[0] else values[0]
            if key in _DIV and not (isinstance(args[0], fx.Node) and args[0].name == names[0]):
                raise self._unknown(node, "division by an activation")
            if isinstance(other, torch.Tensor):
                c = float(other.detach().abs().max().to(torch.float64))
                if key in _DIV:
                    c = float((1.0 / other.detach().to(torch.float64).abs()).max())
            elif isinstance(other, (int, float)):
                c = abs(float(other)) if key in _MUL else 1.0 / abs(float(other))
            else:
                raise self._unknown(node)
            if not math.isfinite(c):
                raise self._unknown(node, "non-finite constant factor")
            evaluate = (lambda a, k: a[0] * a[1]) if key in _MUL else (lambda a, k: a[0] / a[1])
            return _Rule(node, "rounded", names, local=_up(c * (1 + 4 * _U64)), what="scale", evaluate=evaluate)
        if key in (torch.cat, torch.concat):
            tensors = node.args[0] if node.args else node.kwargs.get("tensors")
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            ndim = self.values[names[0]].ndim
            if dim % ndim == 0 or not all(isinstance(t, fx.Node) and t.name in names for t in tensors):
                raise self._unknown(node, "concatenation along the batch or with constants")
            return _Rule(node, "cat", [t.name for t in tensors], what="cat", evaluate=generic)
        if key in (operator.neg, torch.neg, "neg", "__neg__"):
            return _Rule(node, "exact", names, what="neg", evaluate=generic, norm_preserving=True)
        if key is operator.getitem:
            index = node.args[1]
            index = index if isinstance(index, tuple) else (index,)
            flat = list(index)
            ok = all(isinstance(i, (slice, int, type(None), type(Ellipsis))) for i in flat)
            ok = ok and flat and (flat[0] == slice(None) or (flat[0] is Ellipsis and len(flat) < values[0].ndim))
            if not ok:
                raise self._unknown(node, f"indexing {node.args[1]!r} (only slices that keep the batch)")
            return _Rule(node, "exact", names, what="getitem", evaluate=generic, norm_preserving=True)
        if key in _RESHAPE_METHODS or key in _RESHAPE_FUNCTIONS:
            if key in ("permute", torch.permute):
                dims = args[1:] if op == "call_method" else args[1]
                dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
                if dims[0] != 0:
                    raise self._unknown(node, "a permutation that moves the batch dimension")
            if key in ("transpose", torch.transpose) and 0 in (args[1] % values[0].ndim, args[2] % values[0].ndim):
                raise self._unknown(node, "a transpose that moves the batch dimension")
            if key in ("flatten", torch.flatten):
                start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
                if start == 0:
                    raise self._unknown(node, "flatten over the batch dimension")
            if key in ("squeeze", torch.squeeze, "unsqueeze", torch.unsqueeze):
                dim = args[1] if len(args) > 1 else node.kwargs.get("dim")
                if dim is None or dim % (values[0].ndim + (1 if "unsqueeze" in str(key) else 0)) == 0:
                    raise self._unknown(node, "squeeze/unsqueeze of the batch dimension")
            return _Rule(node, "exact", names, what="reshape", evaluate=generic, norm_preserving=True)
        if key in (F.relu, torch.relu, "relu", "relu_"):
            return _Rule(node, "exact", names, what="relu", evaluate=lambda a, k: F.relu(a[0]), norm_preserving=True)
        if key in (F.dropout, F.dropout2d, torch.dropout):
            params = _bind(target, values, kwargs)
            if params.get("training", params.get("train", False)) and params.get("p", 0) > 0:
                raise self._unknown(node, "dropout traced in training mode")
            return _Rule(node, "exact", names[:1], what="dropout", evaluate=lambda a, k: a[0], norm_preserving=True)
        if key in (F.gelu, "gelu"):
            if kwargs.get("approximate", "none") != "none":
                raise self._unknown(node, "tanh-approximate GELU")
            return _Rule(node, "smooth", names, local=GELU_LIPSCHITZ, what="gelu", evaluate=generic,
                         refuse_float="GELU (erf) results are not correctly rounded")
        if key in (F.silu, "silu"):
            return _Rule(node, "smooth", names, local=SILU_LIPSCHITZ, what="silu", evaluate=generic,
                         refuse_float="SiLU (exp) results are not correctly rounded")
        if key in (torch.sigmoid, F.sigmoid, "sigmoid"):
            return _Rule(node, "smooth", names, local=0.25, what="sigmoid", evaluate=generic,
                         refuse_float="sigmoid (exp) results are not correctly rounded")
        if key in (torch.tanh, F.tanh, "tanh"):
            return _Rule(node, "smooth", names, local=1.0, what="tanh", evaluate=generic,
                         refuse_float="tanh results are not correctly rounded")
        if key in (F.leaky_relu,):
            slope = float(_bind(F.leaky_relu, values, kwargs).get("negative_slope", 0.01))
            return _Rule(node, "rounded", names, local=max(1.0, abs(slope)), what="leaky_relu", evaluate=generic)
        if key in (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, torch.max_pool2d):
            fn = {torch.max_pool2d: F.max_pool2d}.get(key, key)
            params = _bind(_POOL_SIGNATURES[fn], values, kwargs)
            if not params:
                raise self._unknown(node, "unexpected pooling arguments")
            name = {F.max_pool2d: "max", F.avg_pool2d: "avg", F.adaptive_avg_pool2d: "adaptive_avg"}[fn]
            return self._pool_rule(node, names[0], name, params, generic)
        if key in (torch.mean, "mean"):
            params = _bind(lambda input, dim=None, keepdim=False, dtype=None: None, values, kwargs)
            dims = params.get("dim")
            ndim = values[0].ndim
            if dims is None or params.get("dtype") is not None:
                raise self._unknown(node, "a mean over the batch dimension or with a dtype")
            dims = [dims] if isinstance(dims, int) else list(dims)
            if any(d % ndim == 0 for d in dims):
                raise self._unknown(node, "a mean over the batch dimension")
            rule = _Rule(node, "affine", names, what="mean", evaluate=generic)
            rule.keepdim = bool(params.get("keepdim"))
            return rule
        raise self._unknown(node)

    # -- bounds --
    def _local_bound(self, rule: _Rule) -> float:
        """Operator bound of an affine/leaf node w.r.t. its input (folded BN: w.r.t. the conv's input)."""
        node, module = rule.node, rule.module
        x = self.values[rule.inputs[0]] if rule.inputs else None
        if rule.what == "conv2d":
            if self.fold and self._folded_into(node) is not None:
                rule.folded = True
                return math.nan  # bounded with its BatchNorm
            return conv2d_spectral_norm_bound(module.weight, tuple(x.shape[-2:]), module.stride, rule.padding,
                                              module.dilation, module.groups)
        if rule.what == "linear":
            if x.ndim != 2:
                raise self._unknown(node, "nn.Linear on inputs with more than one feature dimension")
            return dense_spectral_norm_bound(module.weight)
        if rule.what == "batchnorm":
            alpha, _ = _bn_alpha(module)
            scale = _up(float(alpha.abs().max()) * (1 + 1e-12))
            rule.bn_scale = scale
            conv_node = self._conv_source(node)
            if conv_node is not None:
                conv_rule = self.by_name[conv_node.name]
                conv = conv_rule.module
                kernel = conv.weight.detach().to(torch.float64) * alpha[:, None, None, None]
                size = tuple(self.values[conv_rule.inputs[0]].shape[-2:])
                folded = conv2d_spectral_norm_bound(kernel, size, conv.stride, conv_rule.padding, conv.dilation,
                                                    conv.groups)
                error = 5 * _U64 * absolute_conv_norm_bound(kernel, conv.groups) * (1 + 1e-12)
                rule.fold_conv = conv_node.name
                return _add_up(folded, error)
            return scale
        if rule.kind == "leaf":
            return float(module.lipschitz_upper_bound())
        return rule.local

    def _check_modes(self, rule: _Rule) -> None:
        module = rule.module
        if isinstance(module, (nn.Dropout, nn.Dropout2d)) and module.training and module.p > 0:
            raise self._unknown(rule.node, "dropout in training mode (call .eval())")

    def _folded_into(self, node: fx.Node) -> fx.Node | None:
        """The BatchNorm node a conv node is folded into (its only user, in eval mode, same channel count)."""
        if len(node.users) != 1:
            return None
        (user,) = node.users
        if user.op == "call_module" and isinstance(self.gm.get_submodule(user.target), nn.BatchNorm2d):
            return user
        return None

    def _conv_source(self, bn_node: fx.Node) -> fx.Node | None:
        if not self.fold:
            return None
        source = bn_node.args[0]
        if isinstance(source, fx.Node) and self.by_name[source.name].what == "conv2d" and \
                self._folded_into(source) is bn_node:
            return source
        return None

    def _bound(self, rule: _Rule) -> None:
        name = rule.node.name
        kind = rule.kind
        if kind == "input":
            self.bounds[name] = 1.0
        elif kind in ("static", "constant", "output"):
            return
        elif kind in ("affine", "leaf"):
            rule.local = self._local_bound(rule)
            if rule.fold_conv is not None:
                source = self.by_name[rule.fold_conv].inputs[0]
                self.bounds[name] = _mul_up(rule.local, self.bounds[source])
            elif rule.folded:
                self.bounds[name] = math.nan  # folded: only its BatchNorm uses it
            else:
                self.bounds[name] = _mul_up(rule.local, self.bounds[rule.inputs[0]])
        elif kind in ("exact", "rounded", "smooth"):
            self._check_modes(rule)
            self.bounds[name] = _mul_up(rule.local, self.bounds[rule.inputs[0]])
        elif kind == "add":
            if rule.center:
                self.bounds[name] = self.bounds[rule.inputs[0]]
                return
            total = 0.0
            for operand, factor in zip(rule.inputs, rule.factors):
                total = _add_up(total, _mul_up(factor, self.bounds[operand]))
            self.bounds[name] = total
        elif kind == "cat":
            self.bounds[name] = _hypot_up(self.bounds[n] for n in rule.inputs)
        else:  # pragma: no cover
            raise self._unknown(rule.node)
        if not math.isfinite(self.bounds[name]) and not rule.folded:
            raise ValueError(f"non-finite Lipschitz bound at fx node {name!r}")

    def report(self) -> "GraphBoundReport":
        rows = []
        for rule in self.rules:
            if rule.kind in ("static", "constant", "output"):
                continue
            value = self.values.get(rule.node.name)
            shape = tuple(value.shape[1:]) if isinstance(value, torch.Tensor) else ()
            note = f"folded into {next(iter(rule.node.users)).name}" if rule.folded else (
                f"folded with {rule.fold_conv}" if rule.fold_conv else ("x − mean(x)" if rule.center else ""))
            if rule.refuse_float:
                note = (note + "; " if note else "") + "float certification refused"
            local = rule.factors if rule.kind == "add" and not rule.center else rule.local
            rows.append(NodeBound(rule.node.name, rule.kind, rule.what or _describe_target(rule.node, self.gm), shape,
                                  local, self.bounds.get(rule.node.name, math.nan), note))
        return GraphBoundReport(self.value, rows)


# --- report ----------------------------------------------------------------------------------------------------

@dataclass
class NodeBound:
    """One row of a :class:`GraphBoundReport`."""

    name: str
    kind: str
    op: str
    shape: tuple[int, ...]
    local: float | list[float]  # the node's own constant (add: √broadcast factor per operand)
    bound: float  # guaranteed Lipschitz bound of input → this node (nan: folded conv)
    note: str = ""


@dataclass
class GraphBoundReport:
    """Guaranteed L2 Lipschitz bound of a traced graph, with the bound of input → every node."""

    value: float
    nodes: list[NodeBound]

    def __float__(self) -> float:
        return float(self.value)

    def __str__(self) -> str:
        lines = [f"guaranteed L2 Lipschitz bound: {self.value:.9g}",
                 f"{'node':<28} {'kind':<7} {'op':<18} {'shape':<18} {'local':>12} {'bound':>14}  note"]
        for row in self.nodes:
            local = (", ".join(f"{v:.4g}" for v in row.local) if isinstance(row.local, list)
                     else f"{row.local:.6g}")
            lines.append(f"{row.name[:28]:<28} {row.kind:<7} {row.op[:18]:<18} {str(row.shape)[:18]:<18} "
                         f"{local[:12]:>12} {row.bound:>14.6g}  {row.note}")
        return "\n".join(lines)


# --- the module ------------------------------------------------------------------------------------------------

class LipschitzGraph(LipschitzBounded, nn.Module):
    """A module traced with ``torch.fx`` for per-sample inputs of ``input_shape``, bounded node by node.

    Implements the bounded protocol (``lipschitz_upper_bound()``, ``lipschitz_estimate(iterations, update)``,
    ``rounding_model()``), so it can be a leaf of a :class:`~hf_gloro.lipschitz.composition.LipschitzSequential`
    and of :func:`~hf_gloro.lipschitz.certificate.certify_inputs`. The forward runs the traced graph (the module's
    own submodules and parameters, shared with ``module``) and refuses other input shapes.

    Args:
        module: any traceable module (see the module docstring for the supported operations).
        input_shape: ``(C, H, W)`` (or any per-sample shape) of its inputs.
        fold_batchnorm: bound each conv → BatchNorm pair as one folded convolution (tighter; default).

    Buffers:
        ``power_iterates.<node>``: persistent warm starts of the training estimate, one per conv/linear node.
    """

    def __init__(self, module: nn.Module, input_shape: tuple[int, ...], fold_batchnorm: bool = True) -> None:
        super().__init__()
        self.input_shape = tuple(int(v) for v in input_shape)
        self.fold_batchnorm = bool(fold_batchnorm)
        self.graph_module = trace_graph(module, self.input_shape)
        self.power_iterates = nn.Module()
        analysis = _Analysis(self, with_bounds=False)  # structure, shapes and unsupported nodes (raises early)
        for rule in analysis.rules:
            if rule.what in ("conv2d", "linear") and rule.kind == "affine":
                x = analysis.values[rule.inputs[0]]
                weight = rule.module.weight
                shape = (1, *x.shape[1:]) if rule.what == "conv2d" else (x.shape[1],)
                iterate = torch.randn(shape, dtype=weight.dtype, device=weight.device)
                self.power_iterates.register_buffer(rule.node.name, iterate / iterate.norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"LipschitzGraph was traced and bounded for inputs of shape {self.input_shape}, got "
                             f"{tuple(x.shape[1:])}")
        return self.graph_module(x)

    _bounded_forward = forward

    def extra_repr(self) -> str:
        return f"input_shape={self.input_shape}, fold_batchnorm={self.fold_batchnorm}"

    # --- cache key: every tensor the graph reads, every setting of every module, the graph, the modes ---
    def _bound_dependencies(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.graph_module.parameters()) + tuple(self.graph_module.buffers())

    def _structure_key(self) -> tuple:
        """The graph's code, every module's settings and train/eval flag, and this wrapper's settings."""
        gm = self.graph_module
        modules = tuple((name, settings_signature(m), m.training) for name, m in gm.named_modules() if m is not gm)
        return (gm.code, modules, settings_signature(self))

    def bound_key(self) -> tuple:
        gm = self.graph_module
        constants = [_fetch_attr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"]
        tensors = [c for c in constants if isinstance(c, torch.Tensor)]
        return (content_digest(self._bound_dependencies() + tuple(tensors)), self._structure_key(),
                tuple(repr(c) for c in constants if not isinstance(c, torch.Tensor)))

    # --- bounds ---
    def _analysis(self) -> _Analysis:
        return self._cached("analysis", lambda: _Analysis(self))

    def _compute_upper_bound(self) -> float:
        return self._analysis().value

    def report(self) -> GraphBoundReport:
        """The guaranteed bound with the bound of input → every node (printable)."""
        return self._analysis().report()

    def _compute_rounding_model(self) -> "GraphRounding":
        return GraphRounding(self._analysis())

    # --- training estimate ---
    def _estimate(self, iterations: int, update: bool) -> torch.Tensor:
        # Shapes and node kinds do not depend on the weights: cached on the structure alone (one analysis, not one
        # per training step).
        analysis = self._cached("structure", lambda: _Analysis(self, with_bounds=False), key=self._structure_key())
        estimates: dict[str, torch.Tensor] = {}
        one = None
        for rule in analysis.rules:
            name, kind = rule.node.name, rule.kind
            if kind == "input":
                parameter = next(iter(self.graph_module.parameters()), None)
                one = torch.ones((), dtype=parameter.dtype if parameter is not None else torch.float32,
                                 device=parameter.device if parameter is not None else None)
                estimates[name] = one
            elif kind in ("static", "constant", "output"):
                continue
            elif kind == "affine" and rule.what in ("conv2d", "linear", "batchnorm"):
                conv = analysis._conv_source(rule.node) if rule.what == "batchnorm" else None
                if rule.what == "conv2d" and self.fold_batchnorm and analysis._folded_into(rule.node) is not None:
                    continue
                if rule.what == "batchnorm" and conv is not None:
                    conv_rule = analysis.by_name[conv.name]
                    kernel = conv_rule.module.weight * _bn_estimate_alpha(rule.module)[:, None, None, None]
                    local = self._power_estimate(conv_rule, kernel, analysis, iterations, update)
                    estimates[name] = local * estimates[conv_rule.inputs[0]]
                    continue
                if rule.what == "batchnorm":
                    local = _bn_estimate_alpha(rule.module).abs().max()
                else:
                    local = self._power_estimate(rule, rule.module.weight, analysis, iterations, update)
                estimates[name] = local * estimates[rule.inputs[0]]
            elif kind == "leaf":
                estimates[name] = rule.estimate(iterations, update) * estimates[rule.inputs[0]]
            elif kind == "affine":  # pooling, mean: constants
                estimates[name] = self._cached_local(analysis, rule) * estimates[rule.inputs[0]]
            elif kind in ("exact", "rounded", "smooth"):
                estimates[name] = self._cached_local(analysis, rule) * estimates[rule.inputs[0]]
            elif kind == "add":
                if rule.center:
                    estimates[name] = estimates[rule.inputs[0]]
                else:
                    estimates[name] = sum(f * estimates[n] for n, f in zip(rule.inputs, rule.factors))
            elif kind == "cat":
                estimates[name] = torch.sqrt(sum(estimates[n] ** 2 for n in rule.inputs))
        return estimates[analysis.output_rule.inputs[0]]

    @staticmethod
    def _cached_local(analysis: _Analysis, rule: _Rule) -> float:
        return rule.local

    def _power_estimate(self, rule: _Rule, kernel: torch.Tensor, analysis: _Analysis, iterations: int,
                        update: bool) -> torch.Tensor:
        iterate = getattr(self.power_iterates, rule.node.name)
        if rule.what == "conv2d":
            module = rule.module
            size = tuple(analysis.values[rule.inputs[0]].shape[-2:])
            forward, adjoint = conv2d_operator(kernel, size, module.stride, rule.padding, module.dilation,
                                               module.groups)
        else:
            forward, adjoint = dense_operator(kernel)
        return spectral_norm_estimate(iterate, forward, adjoint, iterations, update)


def graph_lipschitz_bound(module: nn.Module, input_shape: tuple[int, ...], fold_batchnorm: bool = True
                          ) -> GraphBoundReport:
    """Guaranteed L2 Lipschitz bound of ``module`` on per-sample inputs of ``input_shape``, with a per-node table
    (``float(report)`` is the bound; ``print(report)`` shows the table). See the module docstring for the rules."""
    graph = module if isinstance(module, LipschitzGraph) else LipschitzGraph(module, input_shape, fold_batchnorm)
    return graph.report()


def graph_lipschitz_estimate(graph: LipschitzGraph, iterations: int = 1, update: bool = True) -> torch.Tensor:
    """Differentiable training estimate of ``graph``'s Lipschitz constant (power iteration per linear node)."""
    return graph.lipschitz_estimate(iterations, update)


# --- floating point --------------------------------------------------------------------------------------------

class GraphRounding(CompositeRounding):
    """The floating-point model of a :class:`LipschitzGraph` (see the module docstring, "Floating point").

    Built from the graph's analysis; raises :class:`UnknownLipschitzError` for graphs with nodes whose float
    result cannot be bounded (GELU, SiLU, ...).
    """

    def __init__(self, analysis: _Analysis) -> None:
        self.analysis = analysis
        self.models: dict[str, object] = {}
        for rule in analysis.rules:
            if rule.refuse_float:
                raise UnknownLipschitzError(
                    f"cannot certify through fx node {rule.node.name!r} ({rule.what}): {rule.refuse_float}, so the "
                    "float computation cannot be bounded (the Lipschitz bound is still available)")
            if rule.kind == "leaf":
                self.models[rule.node.name] = rule.module.rounding_model()
            elif rule.kind == "affine":
                self.models[rule.node.name] = self._affine_model(rule)

    def _affine_model(self, rule: _Rule) -> RoundingModel:
        module = rule.module
        if rule.what == "conv2d":
            bias = 0.0 if module.bias is None else float(module.bias.detach().to(torch.float64).norm())
            return RoundingModel(fan_in=module.weight[0].numel(),
                                 abs_norm=absolute_conv_norm_bound(module.weight, module.groups),
                                 bias_norm=bias * (1 + 1e-12))
        if rule.what == "linear":
            bias = 0.0 if module.bias is None else float(module.bias.detach().to(torch.float64).norm())
            return RoundingModel(fan_in=module.in_features, abs_norm=absolute_dense_norm_bound(module.weight),
                                 bias_norm=bias * (1 + 1e-12))
        if rule.what == "batchnorm":
            alpha, offset = _bn_alpha(module)
            return RoundingModel(fan_in=11, abs_norm=_up(float(alpha.abs().max()) * (1 + 1e-12)),
                                 bias_norm=float(offset.norm()) * (1 + 1e-12))
        return rule.rounding  # pooling, mean: set during the analysis

    def _absolute(self, rule: _Rule, z_abs: torch.Tensor, lookup: Callable) -> torch.Tensor:
        """``|A|·z_abs + |b|`` for an affine node (in ``z_abs``'s dtype)."""
        module = rule.module
        if rule.what == "conv2d":
            bias = None if module.bias is None else module.bias.detach().abs().to(z_abs.dtype)
            return F.conv2d(z_abs, module.weight.detach().abs().to(z_abs.dtype), bias, module.stride, rule.padding,
                            module.dilation, module.groups)
        if rule.what == "linear":
            bias = None if module.bias is None else module.bias.detach().abs().to(z_abs.dtype)
            return F.linear(z_abs, module.weight.detach().abs().to(z_abs.dtype), bias)
        if rule.what == "batchnorm":
            alpha, offset = _bn_alpha(module)
            shape = (1, -1) + (1,) * (z_abs.ndim - 2)
            return z_abs * alpha.abs().to(z_abs.dtype).view(shape) + offset.to(z_abs.dtype).view(shape)
        # pooling / mean: non-negative weights, |A| = A
        return rule.evaluate([z_abs] + list(fx.node.map_arg(rule.node.args[1:], lookup)),
                             fx.node.map_arg(rule.node.kwargs, lookup))

    def propagate(self, leaf, z, norm, deviation, a_posteriori):
        analysis = self.analysis
        values: dict[str, object] = {}
        norms: dict[str, torch.Tensor] = {}
        devs: dict[str, torch.Tensor] = {}
        deltas: dict[str, torch.Tensor] = {}
        details: dict[str, object] = {}
        if tuple(z.shape[1:]) != leaf.input_shape:
            raise ValueError(f"LipschitzGraph expects inputs of shape {leaf.input_shape}, got {tuple(z.shape[1:])}")
        u, smallest = UNIT_ROUNDOFF[z.dtype], SMALLEST_NORMAL[z.dtype]
        rel, rel3 = (gamma_safe(k, u) * (1.0 + NORM_SLACK) for k in (1, 3))
        lookup = lambda n: values[n.name]  # noqa: E731
        for rule in analysis.rules:
            name, kind = rule.node.name, rule.kind
            if kind == "input":
                values[name], norms[name], devs[name] = z, norm, deviation
                continue
            if kind == "output":
                break
            if kind == "constant":
                values[name] = analysis.values[name]
                continue
            source = rule.inputs[0] if rule.inputs else None
            model = self.models.get(name)
            if isinstance(model, CompositeRounding):
                values[name], norms[name], devs[name], details[name] = model.propagate(
                    rule.module, values[source], norms[source], devs[source], a_posteriori)
                continue
            args, kwargs = fx.node.map_arg(rule.node.args, lookup), fx.node.map_arg(rule.node.kwargs, lookup)
            if kind == "static":  # shapes are re-evaluated (the batch size differs from the analysis); no gradient
                with torch.no_grad():
                    values[name] = rule.evaluate(args, kwargs)
                continue
            out = rule.evaluate(args, kwargs)  # with autograd: eval-mode logits keep their gradient path
            values[name] = out
            elements = out[0].numel() if len(out) else 0
            if kind in ("affine", "leaf"):
                if model.exact:
                    devs[name] = rule.local * devs[source]
                    norms[name] = norms[source]
                    continue
                x = values[source]
                if a_posteriori:
                    provider = rule.module if kind == "leaf" else _Absolute(self, rule, lookup)
                    delta = layer_rounding_error_a_posteriori(provider, model, x, out)
                else:
                    delta = layer_rounding_error(model, norms[source], out)
                deltas[name] = delta
                norms[name] = activation_norms(out)
                if rule.folded:
                    devs[name] = model.abs_norm * devs[source] + delta  # ‖|C|‖ ≥ ‖C‖; used by the ball only
                elif rule.fold_conv is not None:
                    conv_input = analysis.by_name[rule.fold_conv].inputs[0]
                    devs[name] = (rule.local * devs[conv_input] + rule.bn_scale * deltas[rule.fold_conv] + delta)
                else:
                    devs[name] = rule.local * devs[source] + delta
            elif kind == "exact":
                devs[name] = rule.local * devs[source]
                norms[name] = norms[source] if rule.norm_preserving else activation_norms(out)
            elif kind == "rounded":  # the constant may itself be rounded to the dtype, and 1/c formed: γ₃
                norms[name] = activation_norms(out)
                devs[name] = rule.local * devs[source] + rel3 * norms[name] + 2.0 * math.sqrt(elements) * smallest
            elif kind == "add":
                norms[name] = activation_norms(out)
                total = rel * norms[name] + 3.0 * math.sqrt(elements) * smallest
                if rule.offset:  # a Python number rounded to the dtype: ≤ u·|c| per element
                    total = total + rel * rule.offset * math.sqrt(elements)
                for operand, factor in zip(rule.inputs, rule.factors):
                    total = total + factor * devs[operand]
                devs[name] = total
            elif kind == "cat":
                devs[name] = torch.sqrt(sum(devs[n] ** 2 for n in rule.inputs)) * (1.0 + NORM_SLACK)
                norms[name] = torch.sqrt(sum(norms[n] ** 2 for n in rule.inputs)) * (1.0 + NORM_SLACK)
            else:  # pragma: no cover - smooth nodes were refused in __init__
                raise UnknownLipschitzError(f"no float model for fx node {name!r}")
        output = analysis.output_rule.inputs[0]
        detail = {"norms": norms, "devs": devs, "details": details,
                  "shapes": {n: tuple(v.shape[1:]) for n, v in values.items() if isinstance(v, torch.Tensor)}}
        return values[output], norms[output], devs[output], detail

    def ball(self, detail, c, s, product):
        analysis = self.analysis
        u, smallest = UNIT_ROUNDOFF[torch.float64], SMALLEST_NORMAL[torch.float64]
        rel, rel3 = (gamma_safe(k, u) * (1.0 + NORM_SLACK) for k in (1, 3))
        norms, devs, shapes = detail["norms"], detail["devs"], detail["shapes"]
        cs: dict[str, torch.Tensor] = {}
        ss: dict[str, torch.Tensor] = {}
        lips: dict[str, float] = {}  # Π_n: bound of (chain input → node)

        def exact_norm(n):
            return norms[n] + devs[n]

        for rule in analysis.rules:
            name, kind = rule.node.name, rule.kind
            if kind == "input":
                cs[name], ss[name], lips[name] = c, s, product
                continue
            if kind == "output":
                break
            if kind in ("static", "constant"):
                continue
            source = rule.inputs[0] if rule.inputs else None
            bound = analysis.bounds[name]
            model = self.models.get(name)
            if isinstance(model, CompositeRounding):
                lips[name] = product * bound
                cs[name], ss[name] = model.ball(detail["details"][name], cs[source], ss[source], lips[source])
                continue
            lips[name] = product * bound if math.isfinite(bound) else None
            elements = math.prod(shapes[name])
            if kind in ("affine", "leaf"):
                if model.exact:
                    cs[name], ss[name] = rule.local * cs[source], rule.local * ss[source]
                    continue
                if rule.folded:  # folded: ‖|C|‖ stands in for ‖C‖
                    lips[name] = lips[source] * model.abs_norm * (1 + 1e-12)
                    cs[name], ss[name] = affine_ball_step(model, model.abs_norm, shapes[name], exact_norm(source),
                                                          cs[source], ss[source], lips[source])
                else:
                    cs[name], ss[name] = affine_ball_step(model, rule.bn_scale if rule.fold_conv else rule.local,
                                                          shapes[name], exact_norm(source), cs[source], ss[source],
                                                          lips[source])
            elif kind == "exact":
                cs[name], ss[name] = rule.local * cs[source], rule.local * ss[source]
            elif kind in ("rounded", "add"):
                operands = [(source, rule.local)] if kind == "rounded" else list(zip(rule.inputs, rule.factors))
                r = rel3 if kind == "rounded" else rel
                # rounding ≤ u·‖exact result of the op on computed operands‖ ≤ u·(‖z_n(x')‖ + Σ factor·D'_operand)
                const = r * exact_norm(name) + 3.0 * math.sqrt(elements) * smallest
                slope = r * lips[name]
                for operand, factor in operands:
                    const = const + factor * cs[operand] * (1 + 2 * r)
                    slope = slope + factor * ss[operand] * (1 + 2 * r)
                cs[name], ss[name] = const, slope
            elif kind == "cat":
                cs[name] = torch.sqrt(sum(cs[n] ** 2 for n in rule.inputs)) * (1.0 + NORM_SLACK)
                ss[name] = torch.sqrt(sum(ss[n] ** 2 for n in rule.inputs)) * (1.0 + NORM_SLACK)
        output = analysis.output_rule.inputs[0]
        return cs[output], ss[output]


class _Absolute:
    """Adapter giving an affine graph node the ``absolute_forward`` that the a-posteriori bound calls."""

    def __init__(self, rounding: GraphRounding, rule: _Rule, lookup: Callable) -> None:
        self.rounding, self.rule, self.lookup = rounding, rule, lookup

    def absolute_forward(self, z_abs: torch.Tensor) -> torch.Tensor:
        return self.rounding._absolute(self.rule, z_abs, self.lookup)


__all__ = ["GELU_LIPSCHITZ", "SILU_LIPSCHITZ", "GraphBoundReport", "GraphRounding", "LipschitzGraph", "NodeBound",
           "graph_lipschitz_bound", "graph_lipschitz_estimate", "trace_graph"]
