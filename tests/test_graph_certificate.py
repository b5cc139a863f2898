"""Float-sound certification through a :class:`~hf_gloro.lipschitz.graph.LipschitzGraph` leaf.

* The propagated deviation bound ``D`` dominates the real float32 error (against the float64 evaluation, whose own
  bound is added) for graphs ending in every node rule, on wide-range inputs and weights.
* The float64 ball terms ``c + s·r`` dominate the pointwise float64 bound anywhere in the ball.
* ``certify_inputs`` on a graph leaf + GloRo head never certifies a point that PGD (L2, inside the certified radius)
  flips, on a briefly trained tiny graph model with a residual add, BatchNorm, pooling and concatenation.
* Graphs with GELU/SiLU are bounded but refused for certification.

Strength: dropping the add's rounding term (``gamma_safe`` → 0) fails the float check
(``test_dropping_the_add_rounding_term_is_caught``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_gloro.lipschitz import (
    GloRoHead,
    InputNormalization,
    MinMax,
    UnknownLipschitzError,
    certification_numerics,
    certify_inputs,
    gloro_logits,
    product_upper_bound,
)
from hf_gloro.lipschitz import graph as graph_module
from hf_gloro.lipschitz.certificate import ChainConstants
from hf_gloro.lipschitz.float_error import ball_deviation_float64, run_chain
from hf_gloro.lipschitz.graph import LipschitzGraph


def wide_range(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape, generator=g))


class Lambda(nn.Module):
    def __init__(self, fn, *modules: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.layers = nn.ModuleList(modules)

    def forward(self, x):
        return self.fn(x, *self.layers)


class ResBN(nn.Module):
    """conv → BN (folded) → MinMax, residual conv add, max pool, avg pool, concatenation, centering, dense."""

    def __init__(self, channels: int = 8, size: int = 8) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.c2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.act = MinMax()
        self.pool, self.avg = nn.MaxPool2d(3, 2, 1), nn.AvgPool2d(3, 2, 1)
        self.fc = nn.Linear(2 * channels * (size // 2) ** 2, 16)
        self.act2 = MinMax()

    def forward(self, x):
        y = self.act(self.bn1(self.c1(x)))
        y = y + 0.5 * self.bn2(self.c2(y))
        z = torch.cat([self.pool(y), self.avg(y)], dim=1)
        z = z - z.mean((2, 3), keepdim=True)
        return self.act2(self.fc(z.flatten(1)))


def _bn(channels):
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.copy_(wide_range(channels, 7))
        bn.running_var.copy_(wide_range(channels, 8).abs() + 1e-3)
    return bn


CASES = {
    "conv": (lambda: Lambda(lambda x, c: c(x), nn.Conv2d(3, 4, 3, padding=1)), (3, 6, 6)),
    "conv+bn folded": (lambda: Lambda(lambda x, c, b: b(c(x)), nn.Conv2d(3, 4, 3, padding=1), _bn(4)), (3, 6, 6)),
    "bn alone": (lambda: Lambda(lambda x, b: b(x), _bn(3)), (3, 6, 6)),
    "linear": (lambda: Lambda(lambda x, f: f(x.flatten(1)), nn.Linear(48, 7)), (3, 4, 4)),
    "residual add": (lambda: Lambda(lambda x, c: x + c(x), nn.Conv2d(3, 3, 3, padding=1)), (3, 6, 6)),
    "add of two convs": (lambda: Lambda(lambda x, a, b: a(x) - b(x), nn.Conv2d(3, 3, 3, padding=1),
                                        nn.Conv2d(3, 3, 1)), (3, 6, 6)),
    "cat": (lambda: Lambda(lambda x, a: torch.cat([a(x), x], 1), nn.Conv2d(3, 2, 3, padding=1)), (3, 6, 6)),
    "max pool": (lambda: Lambda(lambda x, c: F.max_pool2d(c(x), 3, 2, 1), nn.Conv2d(3, 3, 3)), (3, 9, 9)),
    "avg pool": (lambda: Lambda(lambda x, c: F.avg_pool2d(c(x), 3, 1, 1), nn.Conv2d(3, 3, 1)), (3, 7, 7)),
    "adaptive avg": (lambda: Lambda(lambda x, p: p(x), nn.AdaptiveAvgPool2d(3)), (3, 7, 7)),
    "mean": (lambda: Lambda(lambda x: x.mean((2, 3))), (3, 7, 7)),
    "centering": (lambda: Lambda(lambda x: x - x.mean((2, 3), keepdim=True)), (3, 7, 7)),
    "scale": (lambda: Lambda(lambda x, c: 0.3 * c(x) / 7.0, nn.Conv2d(3, 3, 1)), (3, 5, 5)),
    "leaky": (lambda: Lambda(lambda x, c, a: a(c(x)), nn.Conv2d(3, 3, 1), nn.LeakyReLU(0.3)), (3, 5, 5)),
    "nested graph": (lambda: Lambda(lambda x, g, c: c(g(x)), LipschitzGraph(
        Lambda(lambda x, c: x + c(x), nn.Conv2d(3, 3, 3, padding=1)), (3, 6, 6)), nn.Conv2d(3, 2, 1)), (3, 6, 6)),
    "resbn": (lambda: ResBN(4, 8), (1, 8, 8)),
}


def build(name, seed=0):
    factory, shape = CASES[name]
    torch.manual_seed(seed)
    model = factory().eval()
    with torch.no_grad():
        for i, (pname, p) in enumerate(model.named_parameters()):
            if "bn" in pname or isinstance(p, nn.parameter.UninitializedParameter):
                continue
            p.copy_(wide_range(p.shape, seed=10 + i))
    return LipschitzGraph(model, shape), shape


def deviation_check(graph, shape, a_posteriori, seeds=range(3)):
    """Worst ratio real error / bound over several wide-range batches (must be ≤ 1)."""
    rounding = graph.rounding_model()
    bound = graph.lipschitz_upper_bound()
    worst = 0.0
    for seed in seeds:
        x = wide_range((6, *shape), seed=seed)
        with torch.no_grad():
            t32 = run_chain([graph], [bound], [rounding], x, a_posteriori)
            t64 = run_chain([graph], [bound], [rounding], x.double())
        gap = (t32.output.double() - t64.output).reshape(len(x), -1).norm(dim=1)
        total = t32.deviations[-1] + t64.deviations[-1]
        assert torch.isfinite(total).all()
        worst = max(worst, float((gap / total).max()))
    return worst


@pytest.mark.parametrize("a_posteriori", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_propagated_deviation_dominates_the_float32_error(name, a_posteriori):
    graph, shape = build(name)
    worst = deviation_check(graph, shape, a_posteriori)
    assert worst <= 1.0, (name, worst)
    # Not vacuous: within a few orders of magnitude of what happens (γ_n is a worst case over summation orders).
    assert worst > 1e-6 or name in ("centering", "mean", "adaptive avg"), (name, worst)
    print(f"{name} (a_posteriori={a_posteriori}): worst real error / bound = {worst:.3g}")


def test_the_graph_leaf_reproduces_the_forward_and_mixes_with_chain_leaves():
    graph, shape = build("resbn")
    norm = InputNormalization([0.5], [0.25])
    x = torch.rand(5, *shape)
    leaves = [norm, graph]
    lipschitz = [norm.lipschitz_upper_bound(), graph.lipschitz_upper_bound()]
    rounding = [norm.rounding_model(), graph.rounding_model()]
    with torch.no_grad():
        trace = run_chain(leaves, lipschitz, rounding, x)
        assert torch.equal(trace.output, graph(norm(x)))
        t64 = run_chain(leaves, lipschitz, rounding, x.double())
    gap = (trace.output.double() - t64.output).norm(dim=1)
    assert (gap <= trace.deviations[-1] + t64.deviations[-1]).all()


@pytest.mark.parametrize("name", ["resbn", "nested graph", "cat"])
def test_ball_terms_dominate_the_pointwise_float64_bound_in_the_ball(name):
    graph, shape = build(name)
    bound, rounding = graph.lipschitz_upper_bound(), graph.rounding_model()
    x = wide_range((4, *shape), seed=3).double()
    with torch.no_grad():
        trace = run_chain([graph], [bound], [rounding], x)
        c, s, exact_norm, product = ball_deviation_float64(trace, [bound], [rounding])
        g = torch.Generator().manual_seed(0)
        for r in (1e-3, 1.0, 30.0):
            noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
            noise = noise / noise.flatten(1).norm(dim=1).view(-1, *([1] * len(shape))) * r
            there = run_chain([graph], [bound], [rounding], x + noise)
            assert (there.deviations[-1] <= c + s * r).all(), name
            assert (there.output.flatten(1).norm(dim=1) <= exact_norm + product * r + there.deviations[-1]).all()


def test_dropping_the_add_rounding_term_is_caught(monkeypatch):
    """Mutation: without the addition's own rounding term the bound no longer covers a graph that only adds."""
    graph = LipschitzGraph(Lambda(lambda x: x[:, :2] + x[:, 2:]), (4, 5, 5))
    assert deviation_check(graph, (4, 5, 5), False) <= 1.0
    monkeypatch.setattr(graph_module, "gamma_safe", lambda k, u: 0.0)
    graph = LipschitzGraph(Lambda(lambda x: x[:, :2] + x[:, 2:]), (4, 5, 5))
    assert deviation_check(graph, (4, 5, 5), False) > 1.0


@pytest.mark.parametrize("act, name", [(nn.GELU(), "GELU"), (nn.SiLU(), "SiLU"), (nn.Sigmoid(), "Sigmoid")])
def test_smooth_activations_are_bounded_but_not_certified(act, name):
    graph = LipschitzGraph(Lambda(lambda x, c, a: a(c(x)), nn.Conv2d(2, 2, 1), act).eval(), (2, 4, 4))
    assert math.isfinite(graph.lipschitz_upper_bound())
    with pytest.raises(UnknownLipschitzError, match=name):
        graph.rounding_model()


# --- end to end: a briefly trained tiny graph model, certificates vs PGD ---------------------------------------

def synthetic(count, seed):
    """Three classes of 8×8 images: a bright quadrant (top-left, top-right, bottom) plus noise, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (count,), generator=g)
    x = 0.3 * torch.rand(count, 1, 8, 8, generator=g)
    x[labels == 0, :, :4, :4] += 0.6
    x[labels == 1, :, :4, 4:] += 0.6
    x[labels == 2, :, 4:, :] += 0.6
    return x.clamp(0, 1), labels


def constants_for(graph, head):
    bound = graph.lipschitz_upper_bound()
    k = product_upper_bound([bound])
    return ChainConstants([graph], [bound], [graph.rounding_model()], k, head.margin_constants_upper_bound(k),
                          head.head_constants())


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    graph = LipschitzGraph(ResBN(8, 8).eval(), (1, 8, 8))
    head = GloRoHead(16, 3)
    graph.eval()  # BatchNorm as a learnable affine map with fixed statistics (what the certificate bounds)
    params = list(graph.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=3e-3)
    x, y = synthetic(512, 0)
    epsilon = 0.3
    for step in range(100):
        rows = torch.randint(0, len(x), (64,))
        k = graph.lipschitz_estimate(2, True)
        logits = head(graph(x[rows]))
        loss = F.cross_entropy(gloro_logits(logits, head.margin_constants_estimate(k), epsilon), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return graph, head


def pgd_l2(graph, head, x, target, radius, steps=30):
    """Untargeted L2 PGD on the float32 model: maximise the best competitor's margin over the target."""
    delta = torch.zeros_like(x, requires_grad=True)
    r = radius.view(-1, 1, 1, 1)
    for step in range(steps):
        logits = head(graph(x + delta))
        other = logits.masked_fill(F.one_hot(target, logits.shape[-1]).bool(), -math.inf).max(-1).values
        objective = (other - logits.gather(-1, target[:, None]).squeeze(1)).sum()
        (grad,) = torch.autograd.grad(objective, delta)
        with torch.no_grad():
            g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1)
            delta += 2.5 * r / steps * g
            norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            delta *= torch.where(norm > r, r / norm, torch.ones_like(norm))
    return (x + delta).detach()


def test_certified_points_survive_pgd_inside_their_radius(trained):
    graph, head = trained
    x, _ = synthetic(256, 1)
    with certification_numerics():
        constants = constants_for(graph, head)
        result = certify_inputs(constants, head, x, 0.05)
    certified = result.certified.nonzero().squeeze(1)
    assert len(certified) >= 20, int(result.certified.sum())
    radius = result.radius[certified].float() * 0.999
    adversarial = pgd_l2(graph, head, x[certified], result.predictions[certified], radius)
    assert ((adversarial - x[certified]).flatten(1).norm(dim=1) <= radius * (1 + 1e-5)).all()
    with certification_numerics():
        after = certify_inputs(constants, head, adversarial, 1e-6)
    assert torch.equal(after.predictions, result.predictions[certified])
    # The attack is real: at 4× the certified radius (where nothing is promised) it flips some predictions.
    strong = pgd_l2(graph, head, x[certified], result.predictions[certified], radius * 4)
    with certification_numerics():
        flipped = (certify_inputs(constants, head, strong, 1e-6).predictions != result.predictions[certified]).sum()
    print(f"{len(certified)}/256 certified at ε=0.05 (median radius {float(radius.median()):.3f}); PGD inside the "
          f"radius flipped 0, at 4× the radius {int(flipped)}")
    assert flipped > 0
