"""Floating-point soundness: the rounding-error bounds dominate the real float32 errors, layer by layer and
end to end, and certificates issued at points constructed on a decision boundary (tiny ε, where rounding alone
decides) are never contradicted by the package's prediction at a neighbour inside the ball."""

import math

import pytest
import torch

from hf_gloro import GloRoConfig, GloRoForImageClassification
from hf_gloro.lipschitz import (
    InputNormalization,
    LinearResidualConv2d,
    LipschitzAvgPool2d,
    LipschitzConv2d,
    LipschitzLinear,
    certify_logits,
)
from hf_gloro.lipschitz.certificate import round_keeping_argmax
from hf_gloro.lipschitz.float_error import (
    activation_norms,
    layer_rounding_error,
    layer_rounding_error_a_posteriori,
    run_chain,
)


def wide_range_input(shape, seed=0):
    """Inputs of mixed sign spanning several orders of magnitude (cancellation-heavy dot products)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape, generator=g))


LAYERS = {
    "dense 4096→64": (lambda: LipschitzLinear(4096, 64), (8, 4096)),
    "conv 3×3": (lambda: LipschitzConv2d(32, 32, 3, 10, padding=1), (4, 32, 10, 10)),
    "conv 4×4 stride 2": (lambda: LipschitzConv2d(16, 32, 4, 12, stride=2, padding=1), (4, 16, 12, 12)),
    "liresnet block": (lambda: LinearResidualConv2d(16, 8, residual_scale=0.7), (4, 16, 8, 8)),
    "normalisation": (lambda: InputNormalization([0.3, 0.7, 0.1], [0.2, 0.9, 0.31]), (4, 3, 9, 9)),
    "avg pool": (lambda: LipschitzAvgPool2d(3, 9, stride=2), (4, 5, 9, 9)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_each_layers_rounding_bound_dominates_its_float32_error(name):
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        for parameter in layer.parameters():  # large, mixed-sign weights and biases
            parameter.copy_(wide_range_input(parameter.shape, seed=1))
    worst = 0.0
    for seed in range(5):
        x = wide_range_input(shape, seed=seed)
        with torch.no_grad():
            out32 = layer(x)
            out64 = layer(x.double())  # same float32 parameters, float64 arithmetic (error ~1e-16 relative)
        error = (out32.double() - out64).reshape(len(x), -1).norm(dim=1)
        bound = layer_rounding_error(layer.rounding_model(), activation_norms(x), out32)
        bound64 = layer_rounding_error(layer.rounding_model(), activation_norms(x), out64)
        assert (error <= bound + bound64).all(), (name, error, bound)
        posterior = layer_rounding_error_a_posteriori(layer, layer.rounding_model(), x, out32)
        assert (error <= posterior + bound64).all(), (name, error, posterior)
        assert (posterior <= bound * (1 + 1e-6)).all()  # never looser than the norm-based bound
        worst = max(worst, float((error / posterior).max()))
    # Not vacuous: the worst case is within a few orders of magnitude of what really happens (a bound made with
    # float64's unit roundoff instead of float32's would be ~1e9 times smaller and fail above).
    assert worst > 1e-5 or name == "normalisation", worst


def models():
    torch.manual_seed(0)
    liresnet = GloRoForImageClassification(GloRoConfig(
        backbone="liresnet_l6w128", num_channels=3, image_size=16, epsilon=0.1, head_normalization="lln",
        backbone_kwargs={"width": 16, "depth": 3, "neck_features": 32}, image_mean=[0.5] * 3, image_std=[0.25] * 3))
    with torch.no_grad():
        for module in liresnet.modules():
            if isinstance(module, LinearResidualConv2d):
                module.weight.normal_(0, 0.3)
                module.bias.normal_(0, 0.5)
    convnet = GloRoForImageClassification(GloRoConfig(backbone="gloro_2c2f", image_size=16, epsilon=0.3))
    with torch.no_grad():
        for parameter in convnet.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return {"liresnet": liresnet.eval(), "2c2f": convnet.eval()}


@pytest.fixture(scope="module")
def networks():
    return models()


@pytest.mark.parametrize("a_posteriori", [False, True])
@pytest.mark.parametrize("name", ["liresnet", "2c2f"])
def test_chain_and_margin_error_bounds_dominate_float32_vs_float64(networks, name, a_posteriori):
    model = networks[name]
    constants = model._certification_constants()
    channels, size = model.config.num_channels, model.config.image_size
    x = torch.rand(64, channels, size, size)
    with torch.no_grad():
        trace32 = run_chain(constants.leaves, constants.lipschitz, constants.rounding, x, a_posteriori)
        trace64 = run_chain(constants.leaves, constants.lipschitz, constants.rounding, x.double())
    gap = (trace32.output.double() - trace64.output).norm(dim=1)
    assert (gap <= trace32.deviations[-1] + trace64.deviations[-1]).all()
    assert (trace32.deviations[-1] > 0).all()
    # Every intermediate deviation bound grows along the chain and stays finite.
    assert all(torch.isfinite(d).all() for d in trace32.deviations)


def exact_predictions(model, v):
    """Predictions of the float64 evaluation (the same float32 weights), with whether they are decided: the top
    margin exceeds twice the float64 error bound, so they are the exact network's predictions."""
    constants = model._certification_constants()
    with torch.no_grad():
        trace = run_chain(constants.leaves, constants.lipschitz, constants.rounding, v.double())
        logits = model.head(trace.output)
    top2 = logits.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    slack = 2 * 1.5 * trace.deviations[-1] + 1e-12 * logits.abs().max(dim=-1).values
    return logits.argmax(-1), margin > slack


def boundary_points(model, count=48, steps=60, seed=0):
    """Points bisected (in float64) onto the decision boundary between pairs of inputs with different labels."""
    g = torch.Generator().manual_seed(seed)
    channels, size = model.config.num_channels, model.config.image_size
    constants = model._certification_constants()

    def predict64(v):
        with torch.no_grad():
            trace = run_chain(constants.leaves, constants.lipschitz, constants.rounding, v)
            return model.head(trace.output).argmax(-1)

    a = torch.rand(count * 4, channels, size, size, generator=g).double()
    b = torch.rand(count * 4, channels, size, size, generator=g).double()
    pa, pb = predict64(a), predict64(b)
    keep = (pa != pb).nonzero().squeeze(1)[:count]
    a, b, pa = a[keep], b[keep], pa[keep]
    low, high = torch.zeros(len(a), dtype=torch.float64), torch.ones(len(a), dtype=torch.float64)
    for _ in range(steps):
        mid = (low + high) / 2
        same = predict64(a + mid.view(-1, 1, 1, 1) * (b - a)) == pa
        low, high = torch.where(same, mid, low), torch.where(same, high, mid)
    return (a + low.view(-1, 1, 1, 1) * (b - a)).float(), (b - a).float()


@pytest.mark.parametrize("name", ["liresnet", "2c2f"])
def test_certificates_at_a_decision_boundary_hold_for_every_neighbour(networks, name):
    model = networks[name]
    x, direction = boundary_points(model)
    assert len(x) >= 16
    epsilon = 1e-9
    certificate = model.certify(x, epsilon)
    # Rounding decides these points: the float32 logits alone would often disagree with the exact network.
    with torch.no_grad():
        logits32 = model.head(model.backbone(model.normalization(x)))
    float32_argmax = logits32.argmax(-1)
    constants = model.margin_lipschitz_constants()
    naive_predictions, naive_certified, _ = certify_logits(logits32, constants, epsilon)
    assert certificate.float64_rows.any()
    certified = certificate.certified.nonzero().squeeze(1)
    exact, decided = exact_predictions(model, x)
    assert torch.equal(certificate.predictions[decided], exact[decided])  # decided predictions are the exact ones
    # The package's prediction anywhere inside each certified ball is the certified one: random neighbours and the
    # neighbours straight across the boundary, via certify() and via the eval-mode forward.
    unit = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    g = torch.Generator().manual_seed(1)
    broken_naive = 0
    for trial in range(8):
        noise = torch.randn(x.shape, generator=g)
        noise = noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        step = unit if trial % 2 == 0 else noise
        sign = 1.0 if trial % 4 < 2 else -1.0
        neighbour = x + sign * 0.99 * epsilon * step
        neighbour_certificate = model.certify(neighbour, epsilon)
        assert torch.equal(neighbour_certificate.predictions[certified], certificate.predictions[certified])
        with torch.no_grad():
            forward_argmax = model(neighbour).logits.argmax(-1)
            naive_neighbour = model.head(model.backbone(model.normalization(neighbour))).argmax(-1)
        assert torch.equal(forward_argmax[certified], certificate.predictions[certified])
        exact, decided = exact_predictions(model, neighbour)
        assert torch.equal(exact[certified], certificate.predictions[certified])
        broken_naive += int((naive_certified & (naive_neighbour != naive_predictions)).sum())
    print(f"{name}: {len(x)} boundary points, {int(certificate.certified.sum())} certified at ε={epsilon:g}, "
          f"{int(certificate.float64_rows.sum())} re-evaluated in float64, float32 argmax ≠ decided prediction on "
          f"{int((float32_argmax != certificate.predictions).sum())}, exact-arithmetic certificates broken by a "
          f"float32 neighbour: {broken_naive}")


def test_round_keeping_argmax_preserves_strict_orders_and_first_index_ties():
    top = 1.0 + 2.0**-40
    logits = torch.tensor([[1.0, top, 0.5], [2.0, 2.0, 1.0], [-3.0, -3.0 - 2.0**-45, -7.0]], dtype=torch.float64)
    predictions = logits.argmax(-1)
    rounded = round_keeping_argmax(logits, predictions, torch.float32)
    assert torch.equal(rounded.argmax(-1), predictions)
    assert float(rounded[0, 1]) > float(rounded[0, 0])  # strict order kept although 1 + 2⁻⁴⁰ rounds to 1 in float32
    assert math.isfinite(float(rounded.abs().max()))


def test_eval_forward_and_certify_agree_and_keep_gradients(networks):
    model = networks["liresnet"]
    x, _ = boundary_points(model, count=16)
    x = torch.cat([x, torch.rand(16, 3, 16, 16)]).requires_grad_(True)
    output = model(x)
    certificate = model.certify(x.detach())
    assert torch.equal(output.logits.argmax(-1), certificate.predictions)
    assert torch.equal(output.certified_radius, certificate.radius)
    assert torch.equal(output.logits.detach(), certificate.logits)
    output.logits[:, 0].sum().backward()
    assert x.grad is not None and (x.grad.flatten(1).norm(dim=1) > 0).all()
