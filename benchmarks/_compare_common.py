"""Shared pieces of the comparison benchmarks (``bench_local_bounds``, ``bench_certified_training``,
``bench_torchlip``): importing auto_LiRPA 0.3 on a current torch, exporting an hf-gloro model to a plain
PyTorch network, loading MNIST/CIFAR tensors, machine facts and writing results.

auto_LiRPA on PyPI is release 0.3 (2022; it pins ``torch<1.13``). It is installed with ``--no-deps`` (see
``benchmarks/requirements-compare.txt``) and needs three shims on torch 2.14 / numpy 2, applied by
:func:`import_auto_lirpa` before the import, without touching the installed files:

* ``numpy.lib.arraysetops`` (removed in numpy 2): a stand-in module with ``isin``;
* ``torch.onnx.symbolic_helper._set_opset_version`` (removed): sets the TorchScript exporter's opset;
* ``torch._C.Node.__getitem__`` (removed): attribute access by kind (``node.kindOf(k)``), as older torch did;
* α-CROWN's slope clamp: ``torch.clamp(α, 0, 1)`` now has a *zero* gradient at the bounds 0 and 1 (it was 1),
  and every α starts exactly at 0 or 1 (CROWN's adaptive slope), so the optimisation never moved. The ReLU's
  ``_relu_mask_alpha`` is replaced by the same formula with an inclusive clamp (gradient 1 on ``[0, 1]``);
  ``clip_alpha_`` still projects α back onto ``[0, 1]`` after every step, so the bounds stay valid.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# --- optional third-party packages -------------------------------------------------------------------------
def import_auto_lirpa():
    """``auto_LiRPA`` with the torch 2.14 / numpy 2 shims described in the module docstring."""
    import types

    import numpy as np

    if "numpy.lib.arraysetops" not in sys.modules:
        try:
            import numpy.lib.arraysetops  # noqa: F401
        except ImportError:
            shim = types.ModuleType("numpy.lib.arraysetops")
            shim.isin = np.isin
            sys.modules["numpy.lib.arraysetops"] = shim
    import torch.onnx.symbolic_helper as symbolic_helper

    if not hasattr(symbolic_helper, "_set_opset_version"):
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

        def _set_opset_version(version: int) -> None:
            GLOBALS.export_onnx_opset_version = version

        symbolic_helper._set_opset_version = _set_opset_version
    if not hasattr(torch._C.Node, "__getitem__"):
        torch._C.Node.__getitem__ = lambda node, key: getattr(node, node.kindOf(key))(key)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import auto_LiRPA
    import logging

    logging.getLogger("auto_LiRPA").setLevel(logging.WARNING)
    from auto_LiRPA.operators import activation

    relu = activation.BoundRelu
    if not getattr(relu, "_hf_gloro_inclusive_clamp", False):
        relu._relu_mask_alpha = staticmethod(_relu_mask_alpha_inclusive)
        relu._hf_gloro_inclusive_clamp = True
    return auto_LiRPA


def _clamp01_inclusive(alpha: torch.Tensor) -> torch.Tensor:
    """``clamp(α, 0, 1)`` whose gradient is 1 on the closed interval (torch ≥ 2.x gives 0 at the bounds)."""
    return torch.where((alpha >= 0) & (alpha <= 1), alpha, alpha.clamp(0.0, 1.0).detach())


def _relu_mask_alpha_inclusive(lower, upper, lb_lower_d, ub_lower_d):
    """auto_LiRPA 0.3's ``BoundRelu._relu_mask_alpha`` (lower slope α on unstable neurons, 1 on active, 0 on
    inactive ones) with :func:`_clamp01_inclusive` in place of ``torch.clamp``."""
    lower_mask = (lower >= 0).requires_grad_(False).to(lower.dtype)
    upper_mask = (upper <= 0).requires_grad_(False)
    zero_coeffs = upper_mask.all()
    no_mask = (1.0 - lower_mask) * (1.0 - upper_mask.to(upper.dtype))
    if lb_lower_d is not None:
        lb_lower_d = _clamp01_inclusive(lb_lower_d) * no_mask + lower_mask
    if ub_lower_d is not None:
        ub_lower_d = _clamp01_inclusive(ub_lower_d) * no_mask + lower_mask
    return lb_lower_d, ub_lower_d, zero_coeffs


def missing_packages(*modules: str) -> list[str]:
    """Names among ``modules`` that cannot be imported (auto_LiRPA through its shims)."""
    missing = []
    for name in modules:
        try:
            if name == "auto_LiRPA":
                import_auto_lirpa()
            else:
                __import__(name)
        except Exception:  # noqa: BLE001 (any import failure means "not usable here")
            missing.append(name)
    return missing


# --- hf-gloro → plain PyTorch ------------------------------------------------------------------------------
class PlainMinMax(nn.Module):
    """MinMax with ops every bound-propagation tool supports: for the pair ``(a, b)`` (channel ``c`` and
    ``c + C/2``), ``r = relu(a − b)``, ``max(a, b) = b + r``, ``min(a, b) = a − r``.

    Written as ``out = P·x + Q·relu(D·x)`` with fixed 0/±1 maps (1×1 convolutions or linear layers), so the
    graph contains only convolution / linear, ReLU and addition: one ReLU per pair, the tightest choice for
    a linear relaxation (the ``|t| = relu(t) + relu(−t)`` form relaxes two ReLUs per pair).
    """

    def __init__(self, channels: int, spatial: bool):
        super().__init__()
        half = channels // 2
        eye = torch.eye(half)
        difference = torch.cat([eye, -eye], dim=1)  # D x = a − b
        passthrough = torch.cat([torch.cat([torch.zeros(half, half), eye], 1),  # first half: b
                                 torch.cat([eye, torch.zeros(half, half)], 1)], 0)  # second half: a
        combine = torch.cat([eye, -eye], dim=0)  # [+r; −r]
        if spatial:
            make = lambda w: _fixed_conv1x1(w)  # noqa: E731
        else:
            make = lambda w: _fixed_linear(w)  # noqa: E731
        self.difference, self.passthrough, self.combine = make(difference), make(passthrough), make(combine)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.passthrough(x) + self.combine(self.relu(self.difference(x)))


def _fixed_conv1x1(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Conv2d:
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], 1, bias=bias is not None)
    with torch.no_grad():
        conv.weight.copy_(weight[:, :, None, None])
        if bias is not None:
            conv.bias.copy_(bias)
    conv.requires_grad_(False)
    return conv


def _fixed_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    linear.requires_grad_(False)
    return linear


class PlainExport(nn.Module):
    """An exported classifier: ``net(x − μ)`` (see :func:`export_plain`)."""

    def __init__(self, net: nn.Sequential, mean: torch.Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("mean", mean)

    def center(self, x: torch.Tensor) -> torch.Tensor:
        """The input of :attr:`net`: ``x − μ`` (a translation, so an L2 ball keeps its radius)."""
        return x - self.mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.center(x))


def export_plain(model) -> PlainExport:
    """The eval-mode hf-gloro classifier ``head(backbone(normalization(x)))`` as ``net(x − μ)`` where ``net`` is an
    ``nn.Sequential`` of ``nn.Conv2d`` / ``nn.Linear`` / :class:`PlainMinMax` / ``nn.ReLU`` / ``nn.Flatten``
    (a copy of the weights).

    * input normalisation ``(x − μ)/σ``: the translation ``x − μ`` is applied to the centre of the ball (same
      L2 radius), and ``1/σ`` is folded into the first layer's weight (``W·diag(1/σ)`` per input channel; exact
      with zero padding, since the padded zeros of ``(x − μ)/σ`` are the padded zeros of ``x − μ``). A separate
      normalisation layer would make interval propagation (IBP) replace the L2 ball by its bounding box before
      the first convolution, an artefact of the export rather than a property of the method;
    * ``LipschitzConv2d`` → ``nn.Conv2d`` (same geometry); ``LinearResidualConv2d`` → its merged kernel
      ``I + α·γ⊙V`` as one 3×3 convolution (padding 1), the very kernel its forward applies;
    * ``LipschitzLinear`` → ``nn.Linear``; the GloRo head → ``nn.Linear`` with its effective (optionally
      row-normalised, LLN) weight.

    Raises ``TypeError`` for a module it does not know (never guesses).
    """
    from hf_gloro.lipschitz.activations import Flatten, MinMax, ReLU
    from hf_gloro.lipschitz.conv import LipschitzConv2d
    from hf_gloro.lipschitz.linear import LipschitzLinear
    from hf_gloro.lipschitz.residual import LinearResidualConv2d

    layers: list[nn.Module] = []
    normalization = model.normalization
    channels = int(model.config.num_channels)
    inverse_std = (1.0 / normalization.std.detach().reshape(-1).double()).expand(channels)
    mean = normalization.mean.detach().reshape(-1).float().expand(channels).reshape(1, channels, 1, 1).clone()
    backbone = model.backbone
    if not isinstance(backbone.head, nn.Identity):
        raise TypeError(f"export_plain: backbone head {type(backbone.head).__name__} is not supported")
    features = list(backbone.features)
    if not isinstance(features[0], (LipschitzConv2d, LipschitzLinear)) and not bool((inverse_std == 1).all()):
        layers.append(_fixed_conv1x1(torch.diag(inverse_std.float())))
        inverse_std = torch.ones_like(inverse_std)
    last_channels = channels
    spatial = True
    for index, module in enumerate(features):
        if isinstance(module, LipschitzConv2d):
            conv = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                             module.padding, module.dilation, module.groups, bias=module.bias is not None)
            with torch.no_grad():
                weight = module.weight.detach().double()
                if index == 0:
                    weight = weight * inverse_std.reshape(1, -1, 1, 1)
                conv.weight.copy_(weight)
                if module.bias is not None:
                    conv.bias.copy_(module.bias)
            layers.append(conv)
            last_channels = module.out_channels
        elif isinstance(module, LinearResidualConv2d):
            conv = nn.Conv2d(module.channels, module.channels, 3, padding=1, bias=module.bias is not None)
            with torch.no_grad():
                conv.weight.copy_(module.effective_kernel())
                if module.bias is not None:
                    conv.bias.copy_(module.bias)
            layers.append(conv)
        elif isinstance(module, LipschitzLinear):
            weight = module.weight.detach()
            if index == 0:  # flat inputs: channel-major pixels
                weight = weight * inverse_std.float().repeat_interleave(weight.shape[1] // channels)
            layers.append(_fixed_linear(weight, None if module.bias is None else module.bias.detach()))
            last_channels = module.out_features
        elif isinstance(module, MinMax):
            layers.append(PlainMinMax(last_channels, spatial))
        elif isinstance(module, ReLU):
            layers.append(nn.ReLU())
        elif isinstance(module, Flatten):
            layers.append(nn.Flatten())
            spatial = False
        else:
            raise TypeError(f"export_plain: no plain equivalent for {type(module).__name__}")
    head = model.head
    layers.append(_fixed_linear(head.effective_weight().detach(), None if head.bias is None else head.bias.detach()))
    net = nn.Sequential(*layers).eval()
    net.requires_grad_(False)
    return PlainExport(net, mean).eval()


def check_export(model, plain: nn.Module, x: torch.Tensor, tolerance: float = 1e-4) -> float:
    """Max |logit difference| between the hf-gloro model's float32 forward and the exported network on ``x``;
    raises if it exceeds ``tolerance`` × max(1, largest logit magnitude): a wrong export is never measured."""
    with torch.no_grad():
        reference = model.head(model.backbone(model.normalization(x)))
        exported = plain(x)
    difference = float((reference - exported).abs().max())
    scale = max(1.0, float(reference.abs().max()))
    if not difference <= tolerance * scale:
        raise RuntimeError(f"exported network differs from the hf-gloro model by {difference:.3g} (scale {scale:.3g})")
    return difference


# --- data --------------------------------------------------------------------------------------------------
def load_tensors(dataset: str, split: str, dataset_dir: str | os.PathLike | None, channels: int, size: int,
                 limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixels in [0, 1], labels)`` of a split (Hub name, read from a local copy in the Hub layout)."""
    from hf_gloro.data import image_column, images_to_pixels, label_column, load_image_dataset

    data = load_image_dataset(dataset, split, dataset_dir=None if dataset_dir is None else str(dataset_dir))
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    return images_to_pixels(data[image_column(data)], channels, size), torch.tensor(data[label_column(data)])


# --- machine facts, memory, results ------------------------------------------------------------------------
def machine_info(threads: int) -> dict:
    load = os.getloadavg()
    return {"torch": torch.__version__, "torch_threads": threads, "cpus": os.cpu_count(),
            "load_average_1_5_15": [round(v, 2) for v in load], "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def machine_line(info: dict) -> str:
    load = info["load_average_1_5_15"]
    return (f"torch {info['torch']}, {info['torch_threads']} torch thread(s), {info['cpus']} CPU(s), "
            f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min), {info['date_utc']} UTC")


class Clock:
    """Wall and CPU seconds of a block. ``cpu`` is the calling thread's CPU time (``time.thread_time``): with one
    torch thread all tensor work runs in the calling thread, so ``cpu`` measures the work itself and does not
    grow when other jobs share the machine (the wall time does). Figures in the results are per CPU second
    unless a column says wall."""

    def __enter__(self):
        self._wall, self._cpu = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.thread_time() - self._cpu


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSS:
    """Peak resident memory growth during a block, sampled by a background thread (every ~2 ms)."""

    def __enter__(self):
        import threading

        self.base = rss_bytes()
        self.peak = self.base
        self._running = True

        def sample():
            while self._running:
                self.peak = max(self.peak, rss_bytes())
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def limit_address_space(gib: float) -> None:
    """Cap this process's virtual memory (``RLIMIT_AS``) so a bound computation that would exceed it raises
    ``MemoryError``/``RuntimeError`` instead of swapping the shared machine to death."""
    limit = int(gib * 2**30)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def write_results(stem: str, markdown: str, payload: dict, out_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    out = Path(out_dir) if out_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out / f"{stem}.md", out / f"{stem}.json"
    md_path.write_text(markdown)
    json_path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return md_path, json_path


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)
