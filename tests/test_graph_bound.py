"""Guaranteed Lipschitz bounds through torch.fx graphs (:mod:`hf_gloro.lipschitz.graph`).

Every bound is checked from below by independent measurements: the spectral norm of the exact dense Jacobian
(``torch.func.jacrev``, float64, at many random points and for linear graphs the exact operator norm), and a
gradient-ascent search for a large difference quotient. Strength: a graph bound with one node's constant
scaled by 0.6 fails these checks (``test_a_scaled_node_bound_is_caught``).
"""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import hf_gloro  # noqa: F401  (registers the native backbones)
from hf_gloro.lipschitz import LipschitzSequential, MinMax, UnknownLipschitzError, conv2d_spectral_norm_bound
from hf_gloro.lipschitz import graph as graph_module
from hf_gloro.lipschitz.graph import (
    GELU_LIPSCHITZ,
    SILU_LIPSCHITZ,
    LipschitzGraph,
    graph_lipschitz_bound,
)


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 3 + 0.05)
                m.weight.copy_(torch.randn(m.num_features, generator=g) * 1.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


class Residual(nn.Module):
    """conv → BN → ReLU → conv, plus an identity skip, then a strided conv skip-add."""

    def __init__(self, act: nn.Module | None = None) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.down, self.c3 = nn.Conv2d(4, 4, 1, stride=2), nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.act = act or nn.ReLU()

    def forward(self, x):
        y = self.act(self.bn1(self.c1(x)))
        y = y + self.c2(y)
        return self.c3(y) + self.down(y)


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 3, 1)
        self.fc = nn.Linear(6 * 6 * 6, 5)

    def forward(self, x):
        z = torch.cat([self.a(x), torch.relu(self.b(x))], dim=1)
        return self.fc(torch.flatten(z, 1))


class Pools(nn.Module):
    """Overlapping max and average pools (k3 s1 p1, k3 s2 p1, dilation, ceil mode), adaptive and global means."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(2, 4, 3, padding=1)
        self.p1 = nn.MaxPool2d(3, 1, 1)
        self.p2 = nn.AvgPool2d(3, 2, 1)
        self.p3 = nn.MaxPool2d(3, 2, 1)
        self.p4 = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.p5 = nn.MaxPool2d(2, 1, dilation=2, ceil_mode=True)
        self.ad = nn.AdaptiveAvgPool2d((3, 2))

    def forward(self, x):
        y = self.c(x)
        a = self.p2(self.p1(y))          # 7 → 7 → 4
        b = self.p4(self.p3(y))          # 7 → 4 → 4
        z = torch.cat([a, b], 1)
        c = self.ad(self.p5(F.avg_pool2d(z, 2, 1, ceil_mode=True)))
        return torch.cat([z.mean((2, 3)), 0.5 * c.flatten(1)], 1)


class BNChain(nn.Module):
    """A linear graph: conv → BN (foldable), conv → BN → mean-centering, plus a BN on a skip (not foldable)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.bn2 = nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4)
        self.bn3 = nn.BatchNorm2d(4)
        self.skip = nn.Conv2d(4, 4, 1, stride=2)

    def forward(self, x):
        y = self.bn1(self.c1(x))
        z = self.bn2(self.c2(y)) + self.skip(self.bn3(y))
        return z - z.mean((2, 3), keepdim=True)


class Smooth(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.c1, self.c2, self.act = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1), act

    def forward(self, x):
        return self.c2(self.act(self.c1(x))) * 1.5 + self.c2(torch.cat([x, x], 1)) / 4


GRAPHS = {
    "residual": (lambda: Residual(), (2, 6, 6)),
    "residual_minmax": (lambda: Residual(MinMax()), (2, 6, 6)),
    "concat": (lambda: Concat(), (2, 6, 6)),
    "pools": (lambda: Pools(), (2, 7, 7)),
    "bn_chain": (lambda: BNChain(), (2, 6, 6)),
    "gelu": (lambda: Smooth(nn.GELU()), (2, 5, 5)),
    "silu": (lambda: Smooth(nn.SiLU()), (2, 5, 5)),
    "leaky_tanh_sigmoid": (lambda: Smooth(nn.Sequential(nn.LeakyReLU(0.3), nn.Tanh(), nn.Sigmoid())), (2, 5, 5)),
}


def make(name: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    factory, shape = GRAPHS[name]
    torch.manual_seed(seed)
    model = factory()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)  # well above 1-Lipschitz per layer
    return randomise_batchnorm(model, seed), shape


def jacobian_norms(model: nn.Module, shape, points: int = 24, seed: int = 0) -> torch.Tensor:
    """Spectral norms of the exact Jacobian (float64) at random points, some of them with large amplitudes."""
    m = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(seed)
    norms = []
    for i in range(points):
        x = torch.randn(1, *shape, generator=g, dtype=torch.float64) * (1 + 3 * (i % 3))
        jac = torch.func.jacrev(lambda v: m(v))(x).reshape(-1, math.prod(shape))
        norms.append(torch.linalg.matrix_norm(jac, ord=2))
    return torch.stack(norms)


def ascent_lower_bound(model: nn.Module, shape, steps: int = 60, restarts: int = 4, seed: int = 0) -> float:
    """max ‖f(x) − f(y)‖/‖x − y‖ found by gradient ascent over pairs (a valid lower bound on the constant)."""
    m = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(restarts, *shape, generator=g, dtype=torch.float64).requires_grad_()
    d = (1e-2 * torch.randn(restarts, *shape, generator=g, dtype=torch.float64)).requires_grad_()
    opt = torch.optim.Adam([x, d], lr=0.05)
    best = 0.0
    for _ in range(steps):
        ratio = (m(x + d) - m(x)).flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)
        best = max(best, float(ratio.max()))
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    return best


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_graph_bound_dominates_jacobians_and_ascent(name):
    model, shape = make(name)
    report = graph_lipschitz_bound(model, shape)
    bound = report.value
    jac = jacobian_norms(model, shape)
    ascent = ascent_lower_bound(model, shape)
    assert (jac <= bound).all(), (name, float(jac.max()), bound)
    assert ascent <= bound, (name, ascent, bound)
    assert "guaranteed L2 Lipschitz bound" in str(report) and len(report.nodes) > 3
    print(f"{name}: bound {bound:.4f}, max Jacobian {float(jac.max()):.4f}, ascent {ascent:.4f}")


def test_linear_graph_bound_is_the_exact_operator_norm_with_folding():
    """A chain conv → BN is one linear map: its folded bound is its exact norm (up to the bound's slack)."""
    torch.manual_seed(3)
    model = randomise_batchnorm(nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3),
                                              nn.AvgPool2d(3, 1, 1), nn.Flatten(), nn.Linear(3 * 16, 4)), 3)
    shape = (2, 8, 8)
    m = copy.deepcopy(model).double()
    jac = torch.func.jacrev(m)(torch.zeros(1, *shape, dtype=torch.float64)).reshape(-1, math.prod(shape))
    exact = float(torch.linalg.matrix_norm(jac, ord=2))
    folded = graph_lipschitz_bound(model, shape).value
    unfolded = graph_lipschitz_bound(model, shape, fold_batchnorm=False).value
    assert exact <= folded <= unfolded
    # conv+BN is folded, the pool and the dense layer are separate factors: the product of exact per-node norms.
    assert folded < unfolded * 0.999
    print(f"exact {exact:.5f}, folded {folded:.5f}, unfolded {unfolded:.5f}")


def test_single_folded_conv_bn_is_tight():
    torch.manual_seed(4)
    model = randomise_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)), 4)
    shape = (3, 6, 6)
    jac = torch.func.jacrev(copy.deepcopy(model).double())(torch.zeros(1, *shape, dtype=torch.float64))
    exact = float(torch.linalg.matrix_norm(jac.reshape(-1, math.prod(shape)), ord=2))
    folded = graph_lipschitz_bound(model, shape).value
    # the folded pair is bounded as one convolution (the torus bound: a few % above the zero-padded norm at 6×6)
    kernel = model[0].weight.detach().double() * (model[1].weight / torch.sqrt(model[1].running_var + model[1].eps)
                                                  ).detach().double()[:, None, None, None]
    assert exact <= folded <= conv2d_spectral_norm_bound(kernel, (6, 6), 1, 1) * (1 + 1e-6) <= exact * 1.1


@pytest.mark.parametrize("name", ["residual", "bn_chain", "pools"])
def test_batchnorm_fold_is_never_looser(name):
    model, shape = make(name, seed=1)
    assert graph_lipschitz_bound(model, shape).value <= graph_lipschitz_bound(model, shape, False).value


@pytest.mark.parametrize("pool, size", [
    (nn.MaxPool2d(3, 1, 1), 7), (nn.MaxPool2d(3, 2, 1), 8), (nn.MaxPool2d(3, 2, 0, ceil_mode=True), 8),
    (nn.MaxPool2d(2, 1, 0, dilation=2), 7), (nn.MaxPool2d(4, 3, 1), 10), (nn.MaxPool2d(2), 6),
])
def test_max_pool_constant_is_attained(pool, size):
    """A spike at the most-covered position is the max of every window containing it: the Jacobian there has norm
    √(windows), which must equal the bound (it is the exact constant)."""
    model = nn.Sequential(pool)
    bound = graph_lipschitz_bound(model, (1, size, size)).value
    best = 0.0
    for i in range(size):
        for j in range(size):
            x = torch.zeros(1, 1, size, size, dtype=torch.float64)
            x[0, 0, i, j] = 1.0
            jac = torch.func.jacrev(model)(x).reshape(-1, size * size)
            best = max(best, float(torch.linalg.matrix_norm(jac, ord=2)))
    assert best <= bound <= best * (1 + 1e-12)


@pytest.mark.parametrize("pool, size", [
    (nn.AvgPool2d(3, 1, 1), 7), (nn.AvgPool2d(3, 2, 1), 8), (nn.AvgPool2d(3, 2, 1, count_include_pad=False), 8),
    (nn.AvgPool2d(3, 2, 0, ceil_mode=True), 8), (nn.AvgPool2d(2, 1, 1, divisor_override=3), 5),
    (nn.AdaptiveAvgPool2d(3), 7), (nn.AdaptiveAvgPool2d((1, 1)), 6),
])
def test_average_pool_bound_is_the_exact_operator_norm(pool, size):
    model = nn.Sequential(pool)
    bound = graph_lipschitz_bound(model, (2, size, size)).value
    jac = torch.func.jacrev(model)(torch.zeros(1, 2, size, size, dtype=torch.float64))
    exact = float(torch.linalg.matrix_norm(jac.reshape(-1, 2 * size * size), ord=2))
    assert exact <= bound <= exact * (1 + 1e-5)


def test_activation_constants_cover_the_derivatives():
    x = torch.linspace(-12, 12, 2_000_001, dtype=torch.float64)
    gelu = torch.func.vmap(torch.func.grad(lambda v: F.gelu(v)))(x).abs().max()
    silu = torch.func.vmap(torch.func.grad(lambda v: F.silu(v)))(x).abs().max()
    assert float(gelu) <= GELU_LIPSCHITZ < float(gelu) + 1e-5
    assert float(silu) <= SILU_LIPSCHITZ < float(silu) + 1e-5
    # the maximisers stated in the docstring
    assert abs(float(x[torch.func.vmap(torch.func.grad(F.gelu))(x).argmax()]) - math.sqrt(2)) < 1e-4
    assert abs(float(x[torch.func.vmap(torch.func.grad(F.silu))(x).argmax()]) - 2.39936) < 1e-4


class Square(nn.Module):
    def forward(self, x):
        return x * x


class Product(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.c(x) * x


class WithLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm([2, 4, 4])

    def forward(self, x):
        return self.norm(x) + x


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 1, batch_first=True)

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)
        return self.attn(t, t, t)[0]


class ValueBranch(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class BatchMix(nn.Module):
    def forward(self, x):
        return x - x.mean(0, keepdim=True)


class Softmax(nn.Module):
    def forward(self, x):
        return torch.softmax(x, dim=1)


@pytest.mark.parametrize("module, node", [
    (Square(), "mul"), (Product(), "mul"), (WithLayerNorm(), "norm"), (Attention(), "attn"),
    (ValueBranch(), "control flow"), (BatchMix(), "mean"), (Softmax(), "softmax"),
])
def test_unsupported_nodes_raise_naming_the_node(module, node):
    with pytest.raises(UnknownLipschitzError, match=node):
        graph_lipschitz_bound(module, (2, 4, 4))


def test_in_place_activation_whose_input_is_reused_is_refused():
    class Reuse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.act = nn.Conv2d(2, 2, 1), nn.ReLU(inplace=True)

        def forward(self, x):
            y = self.c(x)
            return self.act(y) + y

    with pytest.raises(UnknownLipschitzError, match="in-place"):
        graph_lipschitz_bound(Reuse(), (2, 4, 4))


def test_other_input_shapes_are_refused():
    graph = LipschitzGraph(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1)), (2, 5, 5))
    graph(torch.zeros(3, 2, 5, 5))
    with pytest.raises(ValueError, match="shape"):
        graph(torch.zeros(3, 2, 6, 6))


NATIVE = {
    "gloro_2c2f": dict(in_chans=1, img_size=12),
    "gloro_4c3f": dict(in_chans=1, img_size=8),
    "gloro_6c2f": dict(in_chans=3, img_size=8),
    "liresnet_l6w128": dict(in_chans=3, img_size=16, width=8, neck_features=16),
}


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_native_backbone_graph_bound_matches_the_chain_bound(name):
    kwargs = dict(NATIVE[name])
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=0, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    shape = (kwargs["in_chans"], kwargs["img_size"], kwargs["img_size"])
    chain = model.lipschitz_upper_bound()
    graph = LipschitzGraph(model, shape)
    value = graph.lipschitz_upper_bound()
    assert value <= chain * (1 + 1e-9), (value, chain)
    assert value >= chain * (1 - 1e-9), (value, chain)  # the same per-layer bounds, multiplied
    # It is a bounded leaf like any other: inside a LipschitzSequential the product is the same number.
    assert LipschitzSequential(graph).lipschitz_upper_bound() <= chain * (1 + 1e-9)
    x = torch.rand(3, *shape)
    assert torch.equal(graph(x), model(x))


def swap_relu(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, MinMax())
        else:
            swap_relu(child)
    return module


class Trunk(nn.Module):
    """``forward_features`` and a global mean (the classifier-free part the adapter keeps)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x).mean((2, 3))


#: vgg11_bn's layer pattern at 1/8 width with its ConvMlp pre-logits (a 7×7 conv after a shape-dependent
#: ``adaptive_avg_pool2d`` that replicates the 1×1 feature map to 7×7: the bound counts that as √49); the full-width
#: model bounds too (1677 for a random init at 32×32) but takes ~3 minutes on one core.
VGG11_NARROW = [8, "M", 16, "M", 32, 32, "M", 64, 64, "M", 64, 64, "M"]

TIMM = {
    "resnet18": lambda: timm.create_model("resnet18", num_classes=0),
    "vgg11_bn": lambda: timm.models.vgg.VGG(VGG11_NARROW, num_classes=0, norm_layer=nn.BatchNorm2d,
                                            mlp_ratio=1 / 64),
    "vgg11_bn_trunk": lambda: Trunk(timm.models.vgg.VGG(VGG11_NARROW, num_classes=0, norm_layer=nn.BatchNorm2d)),
    "convmixer": lambda: timm.models.convmixer.ConvMixer(dim=32, depth=2, kernel_size=3, patch_size=2,
                                                         num_classes=0, act_layer=nn.ReLU),
}


@pytest.mark.parametrize("name", sorted(TIMM))
def test_timm_models_trace_and_bound_after_relu_to_minmax(name):
    torch.manual_seed(0)
    model = swap_relu(TIMM[name]())
    shape = (3, 32, 32)
    with pytest.raises(UnknownLipschitzError, match="training mode"):  # BatchNorm still in training mode
        LipschitzGraph(model, shape).lipschitz_upper_bound()
    graph = LipschitzGraph(model.eval(), shape)
    bound = graph.lipschitz_upper_bound()
    estimate = float(graph.lipschitz_estimate(30, True))
    assert math.isfinite(bound) and 0 < estimate <= bound
    x = torch.rand(2, *shape)
    with torch.no_grad():
        assert torch.equal(graph(x), model(x))
    # the estimate is a differentiable function of the weights
    graph.lipschitz_estimate(1, False).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in graph.parameters())
    print(f"{name}: bound {bound:.4g}, estimate {estimate:.4g}, nodes {len(graph.report().nodes)}")


def test_estimate_converges_to_the_bound_on_a_linear_graph():
    model, shape = make("bn_chain", seed=2)
    graph = LipschitzGraph(model, shape)
    bound = graph.lipschitz_upper_bound()
    estimates = [float(graph.lipschitz_estimate(50, True)) for _ in range(6)]
    assert estimates[-1] <= bound
    # the same combination rules; the gap is the torus bound of each 6×6 convolution above its zero-padded norm
    # (measured: 27.85 vs 30.06)
    assert estimates[-1] >= bound * 0.85, (estimates, bound)
    buffers = dict(graph.named_buffers())
    assert any(k.startswith("power_iterates.") for k in buffers)
    assert "power_iterates.c1" in graph.state_dict() or "power_iterates.bn1" in graph.state_dict() or any(
        k.startswith("power_iterates.") for k in graph.state_dict())


def test_cached_bound_follows_statistics_settings_and_mode():
    model, shape = make("residual", seed=5)
    graph = LipschitzGraph(model, shape)
    first = graph.lipschitz_upper_bound()
    with torch.no_grad():
        model.bn1.running_var.mul_(0.25)  # α doubles
    second = graph.lipschitz_upper_bound()
    assert second > first * 1.5
    model.bn1.eps = 3.0  # a setting the forward reads
    third = graph.lipschitz_upper_bound()
    assert third < second
    model.bn1.eps = 1e-5
    assert graph.lipschitz_upper_bound() == second
    model.bn1.train()
    with pytest.raises(UnknownLipschitzError, match="training mode"):
        graph.lipschitz_upper_bound()


def test_a_scaled_node_bound_is_caught(monkeypatch):
    """Mutation: every affine node's constant × 0.6 must fail the Jacobian/ascent checks above."""
    original = graph_module._Analysis._local_bound
    monkeypatch.setattr(graph_module._Analysis, "_local_bound", lambda self, rule: 0.6 * original(self, rule))
    caught = []
    for name in ("residual", "concat", "pools", "bn_chain"):
        model, shape = make(name)
        bound = graph_lipschitz_bound(model, shape).value
        if float(jacobian_norms(model, shape, points=6).max()) > bound:
            caught.append(name)
    print("caught:", caught)
    assert len(caught) >= 2, caught
    # a tight (linear) graph is always caught
    torch.manual_seed(4)
    model = randomise_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)), 4)
    assert float(jacobian_norms(model, (3, 6, 6), points=2).max()) > graph_lipschitz_bound(model, (3, 6, 6)).value
