"""Soundness of every guaranteed bound: ≥ the exact norm of the unrolled operator, ≥ power iteration."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_gloro.lipschitz import (
    BOUND_RELATIVE_SLACK,
    Flatten,
    InputNormalization,
    LinearResidualConv2d,
    LipschitzAvgPool2d,
    LipschitzConv2d,
    LipschitzLinear,
    LipschitzSequential,
    MinMax,
    UnknownLipschitzError,
    conv2d_spectral_norm_bound,
    converge_power_iterates,
    dense_spectral_norm_bound,
    lipschitz_upper_bound,
)


def unrolled_matrix(fn, input_shape) -> torch.Tensor:
    """The matrix of a linear map, column by column, in float64."""
    numel = math.prod(input_shape)
    basis = torch.eye(numel, dtype=torch.float64).reshape(numel, *input_shape)
    return fn(basis).reshape(numel, -1).t()


def exact_norm(fn, input_shape) -> float:
    return float(torch.linalg.matrix_norm(unrolled_matrix(fn, input_shape), ord=2))


CONV_CASES = [
    # (c_in, c_out, kernel, size, stride, padding, dilation, groups)
    (2, 3, 3, 6, 1, 1, 1, 1),
    (3, 4, 4, 7, 2, 1, 1, 1),
    (2, 2, 5, 8, 2, 2, 1, 1),
    (4, 4, 3, 6, 1, 1, 1, 2),
    (2, 3, 3, 9, 3, 0, 1, 1),
    (1, 2, 3, 7, 1, 2, 2, 1),
    (3, 2, 2, 5, 2, 0, 1, 1),
    (2, 4, 4, 8, 4, 0, 1, 1),
    (1, 1, 3, 5, 1, 0, 1, 1),
    (2, 2, 1, 4, 1, 0, 1, 1),
    (3, 6, 3, 10, 2, 1, 1, 3),
    (2, 2, 4, 6, 2, 3, 1, 1),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(c) for c in CONV_CASES])
def test_conv_bound_dominates_exact_norm_and_power_iteration(case):
    c_in, c_out, k, n, s, p, d, g = case
    layer = LipschitzConv2d(c_in, c_out, k, n, stride=s, padding=p, dilation=d, groups=g)
    with torch.no_grad():
        layer.weight.normal_()  # not orthogonal: a generic kernel
    weight = layer.weight.detach().double()
    exact = exact_norm(lambda x: F.conv2d(x, weight, None, s, p, d, g), (c_in, n, n))
    bound = layer.lipschitz_upper_bound()
    estimate = converge_power_iterates(layer, tolerance=1e-10, max_iterations=20000)
    assert bound >= exact
    assert bound >= estimate
    # The power iteration runs on the true (zero-padded, strided) operator: it converges to the exact norm.
    assert estimate == pytest.approx(exact, rel=1e-4)
    # Not vacuous even at these tiny sizes (the circular embedding's slack shrinks as the size grows).
    assert bound <= 1.35 * exact


@pytest.mark.parametrize("stride,kernel", [(1, 3), (2, 4)])
def test_conv_bound_is_tight_at_realistic_sizes(stride, kernel):
    layer = LipschitzConv2d(8, 8, kernel, 16, stride=stride, padding=1)
    with torch.no_grad():
        layer.weight.normal_()
    weight = layer.weight.detach().double()
    exact = exact_norm(lambda x: F.conv2d(x, weight, None, stride, 1), (8, 16, 16))
    assert exact <= layer.lipschitz_upper_bound() <= 1.05 * exact


def test_conv_bound_is_exact_for_non_overlapping_stride():
    # stride = kernel, no padding: the operator is block diagonal over patches, the circular bound is exact.
    kernel = torch.randn(5, 3, 2, 2)
    exact = exact_norm(lambda x: F.conv2d(x, kernel.double(), stride=2), (3, 6, 6))
    assert conv2d_spectral_norm_bound(kernel, (6, 6), stride=2) == pytest.approx(exact, rel=2e-6)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (7, 3), (64, 16), (10, 300)])
def test_dense_bound_is_exact_sigma_max_plus_slack(shape):
    weight = torch.randn(*shape)
    sigma = float(torch.linalg.matrix_norm(weight.double(), ord=2))
    bound = dense_spectral_norm_bound(weight)
    assert sigma <= bound <= sigma * (1 + 2 * BOUND_RELATIVE_SLACK)
    layer = LipschitzLinear(shape[1], shape[0])
    layer.weight.data.copy_(weight)
    assert converge_power_iterates(layer, 1e-12, 20000) <= bound


def test_tiny_weights_are_not_underestimated():
    # gloro issue #8: an additive epsilon in the normalisation under-estimated small constants.
    layer = LipschitzLinear(1, 1)
    layer.weight.data.fill_(1e-5)
    assert layer.lipschitz_upper_bound() >= 1e-5
    assert layer.lipschitz_estimate(5).detach().item() == pytest.approx(1e-5, rel=1e-6)


def test_residual_block_bound_is_the_merged_operator_norm():
    block = LinearResidualConv2d(4, 6, residual_scale=0.5)
    with torch.no_grad():
        block.weight.normal_(std=0.3)
        block.gain.uniform_(0.5, 1.5)
    kernel = block.effective_kernel().detach().double()
    exact = exact_norm(lambda x: F.conv2d(x, kernel, padding=1), (4, 6, 6))
    # The block really is "x + α·conv(x; γ⊙V)".
    x = torch.randn(2, 4, 6, 6)
    residual = 0.5 * F.conv2d(x, block.gain[:, None, None, None] * block.weight, padding=1)
    assert torch.allclose(block(x), x + residual + block.bias[None, :, None, None], atol=1e-5)
    bound = block.lipschitz_upper_bound()
    assert exact <= bound <= 1.2 * exact
    # Much tighter than the naive 1 + α‖γ⊙V‖ bound.
    branch_kernel = (block.gain[:, None, None, None] * block.weight).detach().double()
    branch = exact_norm(lambda v: 0.5 * F.conv2d(v, branch_kernel, padding=1), (4, 6, 6))
    assert bound < 1 + branch
    assert converge_power_iterates(block, 1e-10, 20000) == pytest.approx(exact, rel=1e-4)


@pytest.mark.parametrize("kernel,stride,size", [(2, 2, 8), (3, 1, 7), (3, 2, 9)])
def test_average_pooling_bound(kernel, stride, size):
    pool = LipschitzAvgPool2d(kernel, size, stride=stride)
    exact = exact_norm(lambda x: F.avg_pool2d(x, kernel, stride), (1, size, size))
    assert exact <= pool.lipschitz_upper_bound() <= 1.2 * exact
    if kernel == stride:
        assert pool.lipschitz_upper_bound() == pytest.approx(1 / kernel, rel=1e-5)


def test_input_normalization_bound():
    norm = InputNormalization([0.5, 0.2, 0.1], [0.25, 0.5, 2.0])
    exact = exact_norm(lambda x: x / norm.std.double(), (3, 2, 2))
    assert norm.lipschitz_upper_bound() >= exact == pytest.approx(4.0)


def test_minmax_is_one_lipschitz_and_tight():
    act = MinMax()
    x, y = torch.randn(1000, 8), torch.randn(1000, 8)
    ratio = (act(x) - act(y)).norm(dim=1) / (x - y).norm(dim=1)
    assert ratio.max() <= 1 + 1e-6
    assert act.lipschitz_upper_bound() == 1.0
    # Gradient-norm preserving: the Jacobian is a permutation.
    jac = torch.autograd.functional.jacobian(lambda v: act(v[None])[0], torch.randn(8))
    assert torch.allclose(jac @ jac.t(), torch.eye(8))
    with pytest.raises(ValueError, match="even"):
        act(torch.randn(2, 3))


def test_chain_bound_is_product_and_dominates_the_composition():
    chain = LipschitzSequential(
        LipschitzConv2d(1, 4, 3, 6, padding=1), MinMax(), LipschitzConv2d(4, 4, 4, 6, stride=2, padding=1),
        Flatten(), LipschitzLinear(4 * 3 * 3, 6),
    )
    product = math.prod(lipschitz_upper_bound(m) for m in chain)
    assert chain.lipschitz_upper_bound() == pytest.approx(product, rel=1e-12)
    assert chain.lipschitz_upper_bound() >= product
    # Empirical Lipschitz ratios of the (nonlinear) chain stay below the bound.
    x = torch.randn(256, 1, 6, 6)
    delta = 1e-2 * torch.randn_like(x)
    with torch.no_grad():
        ratios = (chain(x + delta) - chain(x)).norm(dim=1) / delta.flatten(1).norm(dim=1)
    assert ratios.max() <= chain.lipschitz_upper_bound()


def test_unknown_modules_are_an_error_never_one():
    for module in [nn.BatchNorm2d(3), nn.Dropout(), nn.Linear(3, 3), nn.Sequential(MinMax(), nn.Conv2d(2, 2, 3))]:
        with pytest.raises(UnknownLipschitzError):
            lipschitz_upper_bound(module)
    with pytest.raises(UnknownLipschitzError):
        LipschitzSequential(MinMax(), nn.GELU()).lipschitz_upper_bound()


def test_cached_bound_follows_weight_changes():
    layer = LipschitzLinear(4, 4)
    first = layer.lipschitz_upper_bound()
    with torch.no_grad():
        layer.weight.mul_(3.0)  # in-place: bumps the version counter
    assert layer.lipschitz_upper_bound() == pytest.approx(3 * first, rel=1e-6)
    layer.weight.data.mul_(2.0)  # through .data: no version bump, caught by the value hash
    assert layer.lipschitz_upper_bound() == pytest.approx(6 * first, rel=1e-6)
    layer.load_state_dict({"weight": torch.eye(4) * 5, "bias": torch.zeros(4), "power_iterate": torch.ones(4)})
    assert layer.lipschitz_upper_bound() == pytest.approx(5.0, rel=1e-5)


def test_non_finite_weights_are_refused():
    layer = LipschitzConv2d(1, 2, 3, 5, padding=1)
    layer.weight.data[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer.lipschitz_upper_bound()


def test_conv_rejects_other_input_sizes_and_padding_strings():
    layer = LipschitzConv2d(1, 2, 3, 5, padding=1)
    with pytest.raises(ValueError, match="bounded for inputs of size"):
        layer(torch.randn(1, 1, 6, 6))
    with pytest.raises(ValueError, match="explicit integer padding"):
        LipschitzConv2d(1, 2, 3, 5, padding="same")


def test_power_iterate_is_persistent_and_warm_started():
    layer = LipschitzConv2d(2, 3, 3, 6, padding=1)
    assert "power_iterate" in layer.state_dict()
    before = layer.power_iterate.clone()
    estimate = layer.lipschitz_estimate(3)
    assert not torch.equal(before, layer.power_iterate)
    assert layer.power_iterate.norm() == pytest.approx(1.0, rel=1e-5)
    # Gradient flows through ‖A v‖ only, and reaches the weight.
    estimate.backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    # update=False leaves the iterate alone.
    state = layer.power_iterate.clone()
    layer.lipschitz_estimate(3, update=False)
    assert torch.equal(state, layer.power_iterate)


def test_power_iteration_survives_zero_weights_and_null_space_iterates():
    layer = LipschitzLinear(3, 3)
    layer.weight.data.zero_()
    assert layer.lipschitz_estimate(5).detach().item() == 0.0
    assert layer.power_iterate.norm() == pytest.approx(1.0, rel=1e-5)
    layer.weight.data.copy_(torch.diag(torch.tensor([2.0, 0.0, 0.0])))
    layer.power_iterate.copy_(torch.tensor([0.0, 1.0, 0.0]))  # in the null space: restarted at random
    assert layer.lipschitz_estimate(50).detach().item() == pytest.approx(2.0, rel=1e-4)
