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


# --- The fast convolution bound (polyphase taps, tap-offset Gram matrices, Cholesky-verified thresholds) -----
# Attacks: the bound must dominate the exact norm of the unrolled operator for every geometry, dominate the
# exact circular norm computed independently (FFT + SVD of the aliased stacks) at every size, stay within
# 1e-4 of it, and these checks must notice a bound scaled by 0.99 or a skipped frequency region.

from hf_gloro.lipschitz import spectral_bounds  # noqa: E402


def circular_reference(kernel, input_size, stride, padding, dilation, groups) -> float:
    """max_ν σ_max([K̂(ν + aM)]_a)/s on the embedding torus, by FFT and SVD: independent of the fast code."""
    k = kernel.detach().double()
    c_out, c_in_g, kh, kw = k.shape
    (sh, sw), (ph, pw), (dh, dw) = (spectral_bounds._pair(v) for v in (stride, padding, dilation))
    big_h = spectral_bounds.circular_embedding_size(input_size[0], kh, sh, ph, dh)
    big_w = spectral_bounds.circular_embedding_size(input_size[1], kw, sw, pw, dw)
    embedded = torch.zeros(c_out, c_in_g, big_h, big_w, dtype=torch.float64)
    embedded[:, :, : dh * (kh - 1) + 1 : dh, : dw * (kw - 1) + 1 : dw] = k
    spectrum = torch.fft.fft2(embedded).permute(2, 3, 0, 1)  # (N_h, N_w, C_out, C_in/g)
    m_h, m_w = big_h // sh, big_w // sw
    stacks = spectrum.reshape(sh, m_h, sw, m_w, c_out, c_in_g).permute(1, 3, 4, 0, 2, 5)
    stacks = stacks.reshape(m_h, m_w, c_out, sh * sw, c_in_g)
    per_group = c_out // groups
    best = 0.0
    for g in range(groups):
        block = stacks[:, :, g * per_group : (g + 1) * per_group].reshape(m_h * m_w, per_group, -1)
        best = max(best, float(torch.linalg.svdvals(block)[:, 0].max()))
    return best / math.sqrt(sh * sw)


def dense_conv_norm(kernel, input_size, stride, padding, dilation, groups) -> float:
    c_in = kernel.shape[1] * groups
    w = kernel.detach().double()
    return exact_norm(lambda x: F.conv2d(x, w, None, stride, padding, dilation, groups), (c_in, *input_size))


@pytest.fixture(params=["search", "solve_all"])
def bound_path(request, monkeypatch):
    """Run a test through both threshold strategies: the threshold search used for large Gram matrices
    (forced even for tiny ones) and the solve-every-frequency path used for small ones."""
    monkeypatch.setattr(spectral_bounds, "_SOLVE_ALL_UP_TO", 0 if request.param == "search" else 10**9)
    return request.param


def random_geometry(seed: int):
    """(kernel, input_size, stride, padding, dilation, groups), small enough for a dense SVD."""
    g = torch.Generator().manual_seed(seed)

    def pick(*options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    groups = pick(1, 1, 1, 2, 3)
    c_in, c_out = groups * pick(1, 2, 3), groups * pick(1, 2, 4)
    kh, kw = pick(1, 2, 3, 4, 5), pick(1, 2, 3, 4)
    stride = (pick(1, 1, 2, 3, 4), pick(1, 2, 4))
    dilation = (pick(1, 1, 2, 3), pick(1, 2))
    padding = (pick(0, 1, 2, 3), pick(0, 1, 2))
    nh = max(dilation[0] * (kh - 1) + 1 - 2 * padding[0], 1) + pick(0, 1, 2, 3, 5)
    nw = max(dilation[1] * (kw - 1) + 1 - 2 * padding[1], 1) + pick(0, 1, 2, 4)
    kind = pick("gauss", "gauss", "low_rank", "modulated", "sparse")
    kernel = torch.randn(c_out, c_in // groups, kh, kw, generator=g, dtype=torch.float64)
    if kind == "low_rank":  # rank-1 in the channels, the same spatial pattern everywhere
        kernel = torch.einsum("o,i,hw->oihw", kernel[:, 0, 0, 0], kernel[0, :, 0, 0], kernel[0, 0])
    elif kind == "modulated":  # a sharp peak at a random, generally off-grid, frequency
        omega = 2 * math.pi * torch.rand(2, generator=g, dtype=torch.float64)
        phase = omega[0] * torch.arange(kh)[:, None] + omega[1] * torch.arange(kw)[None]
        kernel = kernel[:, :, :1, :1] * torch.cos(phase)
    elif kind == "sparse":
        kernel = kernel * (torch.rand(kernel.shape, generator=g, dtype=torch.float64) < 0.3)
    return kernel, (nh, nw), stride, padding, dilation, groups


@pytest.mark.parametrize("seed", range(60))
def test_fast_conv_bound_dominates_exact_norm_on_random_geometries(seed, bound_path):
    kernel, size, stride, padding, dilation, groups = random_geometry(seed)
    try:
        exact = dense_conv_norm(kernel, size, stride, padding, dilation, groups)
    except RuntimeError:  # no output for this geometry
        pytest.skip("empty output")
    bound = conv2d_spectral_norm_bound(kernel, size, stride, padding, dilation, groups)
    circular = circular_reference(kernel, size, stride, padding, dilation, groups)
    assert bound >= exact
    assert bound >= circular * (1 + 0.5 * BOUND_RELATIVE_SLACK)  # the computed maximum is never undershot
    assert bound <= circular * (1 + 1e-4) + 1e-300


ADVERSARIAL = {
    # name: (kernel factory, input size, stride, padding, dilation, groups)
    "identity_ties": (lambda: torch.eye(66, dtype=torch.float64)[:, :, None, None].expand(66, 66, 3, 3)
                      * (torch.arange(9) == 4).double().reshape(3, 3), (5, 5), 1, 1, 1, 1),
    "near_identity_liresnet": (lambda: _liresnet_kernel(66, 0.1), (5, 6), 1, 1, 1, 1),
    "strong_branch_liresnet": (lambda: _liresnet_kernel(66, 3.0), (5, 5), 1, 1, 1, 1),
    "low_rank_66": (lambda: torch.einsum("o,i,hw->oihw", torch.randn(66).double(), torch.randn(66).double(),
                                         torch.randn(3, 3).double()), (5, 5), 1, 1, 1, 1),
    "off_grid_peak": (lambda: _modulated(66, 66, 3, (2.2, 0.9)), (5, 6), 1, 1, 1, 1),
    "off_grid_peak_stride2": (lambda: _modulated(20, 20, 4, (2.9, -1.3)), (8, 8), 2, 1, 1, 1),
    "stride4_neck_like": (lambda: torch.randn(80, 8, 4, 4).double(), (8, 8), 4, 0, 1, 1),
    "stride4_k5": (lambda: torch.randn(70, 6, 5, 5).double(), (9, 9), 4, 2, 1, 1),
    "dilated_grouped": (lambda: torch.randn(132, 33, 3, 3).double(), (5, 5), 1, 2, 2, 2),
    "one_zero_group": (lambda: torch.cat([torch.randn(66, 3, 3, 3), torch.zeros(66, 3, 3, 3)]).double(),
                       (6, 6), 1, 1, 1, 2),
    "tiny_scale": (lambda: 1e-100 * torch.randn(66, 66, 3, 3).double(), (4, 5), 1, 1, 1, 1),
    "huge_scale": (lambda: 1e100 * torch.randn(66, 66, 3, 3).double(), (4, 5), 1, 1, 1, 1),
}


def _liresnet_kernel(channels: int, branch: float) -> torch.Tensor:
    kernel = branch * torch.randn(channels, channels, 3, 3, dtype=torch.float64) / (3 * math.sqrt(channels))
    kernel[torch.arange(channels), torch.arange(channels), 1, 1] += 1.0
    return kernel


def _modulated(c_out: int, c_in: int, size: int, omega: tuple[float, float]) -> torch.Tensor:
    taps = torch.arange(size, dtype=torch.float64)
    phase = omega[0] * taps[:, None] + omega[1] * taps[None]
    return torch.randn(c_out, c_in, 1, 1, dtype=torch.float64) * torch.cos(phase) + 0.05 * torch.randn(
        c_out, c_in, size, size, dtype=torch.float64)


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_fast_conv_bound_on_adversarial_kernels(name, bound_path):
    torch.manual_seed(hash(name) % 1000)
    factory, size, stride, padding, dilation, groups = ADVERSARIAL[name]
    kernel = factory().contiguous()
    exact = dense_conv_norm(kernel, size, stride, padding, dilation, groups)
    circular = circular_reference(kernel, size, stride, padding, dilation, groups)
    bound = conv2d_spectral_norm_bound(kernel, size, stride, padding, dilation, groups)
    assert bound >= exact
    assert bound >= circular * (1 + 0.5 * BOUND_RELATIVE_SLACK)
    assert bound <= circular * (1 + 1e-4)


@pytest.mark.parametrize("branch,stride,kernel_size,channels", [
    (0.05, 1, 3, 72), (1.0, 1, 3, 72), (4.0, 1, 3, 72), (None, 2, 4, 48), (None, 4, 4, 64),
])
def test_fast_conv_bound_is_tight_at_realistic_sizes(branch, stride, kernel_size, channels):
    torch.manual_seed(1)
    if branch is None:
        kernel = torch.randn(channels, channels, kernel_size, kernel_size, dtype=torch.float64)
        padding = 0 if stride == kernel_size else 1
    else:
        kernel, padding = _liresnet_kernel(channels, branch), 1
    size = (16, 16)
    bound = conv2d_spectral_norm_bound(kernel, size, stride, padding)
    circular = circular_reference(kernel, size, stride, padding, 1, 1)
    assert circular * (1 + 0.5 * BOUND_RELATIVE_SLACK) <= bound <= circular * (1 + 1e-4)
    layer = LipschitzConv2d(channels, channels, kernel_size, size, stride=stride, padding=padding).double()
    layer.weight.data.copy_(kernel)
    estimate = converge_power_iterates(layer, tolerance=1e-7, max_iterations=400)
    assert estimate <= bound <= 1.05 * estimate


def test_fast_conv_bound_search_recovers_from_a_bad_candidate(monkeypatch):
    """The power estimates only choose the first threshold: the worst possible choice is still sound and tight."""
    monkeypatch.setattr(spectral_bounds, "_SOLVE_ALL_UP_TO", 0)
    kernel = _liresnet_kernel(72, 3.0)
    honest = conv2d_spectral_norm_bound(kernel, (8, 8), 1, 1)
    monkeypatch.setattr(spectral_bounds, "_power_estimates", lambda grams, iterations: -grams[:, 0, 0].real)
    bad_pick = conv2d_spectral_norm_bound(kernel, (8, 8), 1, 1)
    assert spectral_bounds.last_call_stats["first_failures"] > 0  # the search path really ran
    circular = circular_reference(kernel, (8, 8), 1, 1, 1, 1)
    assert circular * (1 + 0.5 * BOUND_RELATIVE_SLACK) <= bad_pick <= circular * (1 + 1e-4)
    assert bad_pick == pytest.approx(honest, rel=1e-4)


def test_fast_conv_bound_is_reproducible_across_thread_counts():
    kernel = _liresnet_kernel(128, 1.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = conv2d_spectral_norm_bound(kernel, (10, 10), 1, 1)
        torch.set_num_threads(2)
        double = conv2d_spectral_norm_bound(kernel, (10, 10), 1, 1)
    finally:
        torch.set_num_threads(threads)
    assert single == double


def test_formation_error_term_covers_the_actual_rounding():
    """ε_form (a rigorous a-priori bound) dominates the measured difference to an FFT-formed Gram."""
    kernel = _liresnet_kernel(64, 2.0)
    positions, taps = spectral_bounds._polyphase_taps(kernel, (1, 1), (1, 1))
    symbol = spectral_bounds._SymbolGram(taps, positions, (9, 9))
    nu_h, nu_w = symbol.frequencies()
    fast = symbol.form(nu_h, nu_w)
    embedded = torch.zeros(64, 64, 9, 9, dtype=torch.float64)
    embedded[:, :, :3, :3] = kernel
    spectrum = torch.fft.fft2(embedded).permute(2, 3, 0, 1)[nu_h, nu_w]
    reference = spectrum @ spectrum.mH
    difference = float(torch.linalg.matrix_norm(fast - reference, ord=2).max())
    assert 0 < difference <= symbol.formation_error
    assert symbol.formation_error < 1e-9 * float(torch.linalg.eigvalsh(reference)[:, -1].max())


def test_certified_threshold_covers_cholesky_rounding():
    symbol = spectral_bounds._SymbolGram(*reversed(spectral_bounds._polyphase_taps(
        _liresnet_kernel(64, 1.0), (1, 1), (1, 1))), (8, 8))
    bound = spectral_bounds._certified(symbol, 2.0)
    # 2γ̃n with γ̃ = γ_{16(n+1)}, plus 2u, plus the formation term twice.
    assert bound > 2.0 * (1 + 2 * 16 * 65 * 64 * 2.0**-53)
    assert bound < 2.0 * (1 + 1e-9)


def test_fast_conv_bound_tests_notice_a_scaled_bound(monkeypatch):
    """Mutation check: a bound 1% too small violates the assertions used above: it falls below the exact
    circular norm, and below the exact norm itself where the circular embedding is exact (stride = kernel)."""
    torch.manual_seed(0)
    overlapping = ADVERSARIAL["off_grid_peak_stride2"][0]()
    blocks = torch.randn(80, 8, 4, 4, dtype=torch.float64)
    exact = dense_conv_norm(blocks, (8, 8), 4, 0, 1, 1)
    circular = circular_reference(overlapping, (8, 8), 2, 1, 1, 1)
    assert conv2d_spectral_norm_bound(blocks, (8, 8), 4) >= exact
    assert conv2d_spectral_norm_bound(overlapping, (8, 8), 2, 1) >= circular
    original = spectral_bounds._certified
    monkeypatch.setattr(spectral_bounds, "_certified", lambda symbol, t: 0.99**2 * original(symbol, t))
    assert conv2d_spectral_norm_bound(blocks, (8, 8), 4) < exact
    assert conv2d_spectral_norm_bound(overlapping, (8, 8), 2, 1) < circular


@pytest.mark.parametrize("region", ["low_h", "high_h", "zero_w"])
def test_fast_conv_bound_tests_notice_a_skipped_frequency_region(region, monkeypatch):
    """Mutation check: dropping the frequencies where a peaked kernel's symbol is largest undershoots the
    exact norm, so the dominance assertions above would catch a frequency set with a hole."""
    centre = {"low_h": (0.8, 0.4), "high_h": (-1.1, 2.0), "zero_w": (2.4, 0.0)}[region]
    torch.manual_seed(3)
    kernel = _modulated(6, 6, 5, centre)
    size = (12, 12)
    exact = dense_conv_norm(kernel, size, 1, 2, 1, 1)
    assert conv2d_spectral_norm_bound(kernel, size, 1, 2) >= exact
    frequencies = spectral_bounds._SymbolGram.frequencies

    def with_hole(self):
        nu_h, nu_w = frequencies(self)
        m_h, m_w = self.torus
        angle_h = 2 * math.pi * torch.minimum(nu_h, m_h - nu_h) / m_h * torch.where(nu_h * 2 > m_h, -1, 1)
        angle_w = 2 * math.pi * torch.minimum(nu_w, m_w - nu_w) / m_w * torch.where(nu_w * 2 > m_w, -1, 1)
        # Both ν and −ν of a pair describe the same matrix up to conjugation: test the region on either.
        near = ((angle_h - centre[0]).abs() < 0.6) & ((angle_w - centre[1]).abs() < 0.6)
        near |= ((angle_h + centre[0]).abs() < 0.6) & ((angle_w + centre[1]).abs() < 0.6)
        return nu_h[~near], nu_w[~near]

    monkeypatch.setattr(spectral_bounds._SymbolGram, "frequencies", with_hole)
    assert conv2d_spectral_norm_bound(kernel, size, 1, 2) < exact
