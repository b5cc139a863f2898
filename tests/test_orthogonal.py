"""Cholesky-orthogonalised dense layers: the parametrisation is orthogonal, the guaranteed bound is that of the
realised float weight (never an assumed 1), the forward multiplies by exactly the bounded matrix, caches see every
change, the float rounding bound dominates the real error, and the layer works inside a certified GloRo model."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_gloro import GloRoConfig, GloRoForImageClassification
from hf_gloro.lipschitz import CholeskyOrthogonalLinear, LipschitzSequential, MinMax, cholesky_orthogonalize
from hf_gloro.lipschitz.float_error import activation_norms, layer_rounding_error, layer_rounding_error_a_posteriori


def exact_norm(weight: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(weight.detach().double(), ord=2))


@pytest.mark.parametrize("shape", [(16, 16), (8, 24), (24, 8)])
def test_rows_are_orthonormal_up_to_the_jitter(shape):
    v = torch.randn(*shape, dtype=torch.float64) * torch.exp(torch.randn(shape[0], 1, dtype=torch.float64))
    jitter = 1e-3
    w = cholesky_orthogonalize(v, jitter)
    gram = v @ v.T
    delta = jitter * gram.diagonal().mean()
    factor = torch.linalg.cholesky(gram + delta * torch.eye(shape[0], dtype=torch.float64))
    # W Wᵀ = I − δ (LᵀL)⁻¹ exactly (up to float64 rounding) ...
    expected = torch.eye(shape[0], dtype=torch.float64) - delta * torch.linalg.inv(factor.T @ factor)
    torch.testing.assert_close(w @ w.T, expected, atol=1e-10, rtol=0)
    # ... so σ_max(W) ≤ 1, and ≈ 1 (not a trivially small matrix).
    assert 0.99 < exact_norm(w) <= 1.0 + 1e-12
    if shape[0] <= shape[1]:  # orthonormal rows without the jitter
        torch.testing.assert_close(cholesky_orthogonalize(v, 0.0) @ cholesky_orthogonalize(v, 0.0).T,
                                   torch.eye(shape[0], dtype=torch.float64), atol=1e-9, rtol=0)


def test_float32_weight_is_nearly_orthogonal_and_bound_dominates_its_exact_norm():
    torch.manual_seed(0)
    layer = CholeskyOrthogonalLinear(64, 64).eval()
    with torch.no_grad():
        layer.weight_free.mul_(torch.exp(0.5 * torch.randn(64, 1)))  # unequal rows: orthogonalisation fixes them
    w = layer.realized_weight()
    assert w.dtype == torch.float32
    exact = cholesky_orthogonalize(layer.weight_free.detach().double())  # same V, float64 arithmetic
    torch.testing.assert_close(w.double() @ w.double().T, exact @ exact.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(w.double() @ w.double().T, torch.eye(64, dtype=torch.float64), atol=0.05, rtol=0)
    bound = layer.lipschitz_upper_bound()
    assert bound >= exact_norm(w)
    assert bound <= exact_norm(w) * (1 + 1e-5) and bound < 1.001


def test_bound_is_read_from_the_realised_weight_not_assumed():
    """A bound that assumed 1 (or recomputed a fresh orthogonal matrix) fails here: the cached Ŵ the forward
    multiplies by is scaled in place, and both the forward and the bound must follow it."""
    torch.manual_seed(1)
    layer = CholeskyOrthogonalLinear(12, 12).eval()
    x = torch.randn(5, 12)
    before = layer.lipschitz_upper_bound()
    with torch.no_grad():
        layer.realized_weight().mul_(1.5)
    torch.testing.assert_close(layer(x), F.linear(x, layer.realized_weight(), layer.bias), rtol=0, atol=0)
    after = layer.lipschitz_upper_bound()
    assert after >= exact_norm(layer.realized_weight()) and after > 1.4 * before


def test_eval_forward_uses_exactly_the_bounded_matrix_and_follows_writes_to_v():
    torch.manual_seed(2)
    layer = CholeskyOrthogonalLinear(10, 6).eval()
    x = torch.randn(4, 10)
    w = layer.realized_weight()
    assert layer.realized_weight() is w  # cached: no second Cholesky factorisation
    torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias), rtol=0, atol=0)
    # The float64 re-evaluation of the certificate multiplies by the same float32 values, cast up exactly.
    torch.testing.assert_close(layer(x.double()), F.linear(x.double(), w.double(), layer.bias.double()),
                               rtol=0, atol=0)
    key, bound = layer.bound_key(), layer.lipschitz_upper_bound()
    with torch.no_grad():  # a write through .data: a different V gives a different Ŵ, key and bound
        layer.weight_free.data[0] *= 3.0
        layer.weight_free.data[1] = -layer.weight_free.data[2]
    w2 = layer.realized_weight()
    assert w2 is not w and layer.bound_key() != key
    assert layer.lipschitz_upper_bound() == pytest.approx(exact_norm(w2), rel=1e-5)
    assert layer.lipschitz_upper_bound() != bound
    layer.jitter = 0.5  # a setting is part of the key too
    assert layer.realized_weight() is not w2 and layer.lipschitz_upper_bound() < 0.95


def test_training_forward_is_differentiable_and_stays_orthogonal_after_updates():
    torch.manual_seed(3)
    layer = CholeskyOrthogonalLinear(8, 8).train()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.2)
    target = torch.randn(8, 8)
    for _ in range(5):
        x = torch.randn(16, 8)
        loss = (layer(x) - x @ target.T).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        assert layer.weight_free.grad is not None and layer.weight_free.grad.abs().sum() > 0
        optimizer.step()
    layer.eval()
    assert layer.lipschitz_upper_bound() == pytest.approx(1.0, abs=1e-3)
    assert float(layer.lipschitz_estimate()) == 1.0  # the exact-arithmetic constant of the parametrisation
    # Training mode under no_grad (e.g. certify() on a model left in train mode) reads the bounded matrix too.
    layer.train()
    with torch.no_grad():
        x = torch.randn(3, 8)
        torch.testing.assert_close(layer(x), F.linear(x, layer.realized_weight(), layer.bias), rtol=0, atol=0)


def test_rounding_bound_dominates_the_float32_error():
    torch.manual_seed(4)
    layer = CholeskyOrthogonalLinear(512, 256).eval()
    with torch.no_grad():
        layer.bias.copy_(torch.randn(256) * 1e3)
    worst = 0.0
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(8, 512, generator=g) * torch.exp(2 * torch.randn(8, 512, generator=g))
        with torch.no_grad():
            out32, out64 = layer(x), layer(x.double())
        error = (out32.double() - out64).norm(dim=1)
        model = layer.rounding_model()
        bound = layer_rounding_error(model, activation_norms(x), out32)
        bound64 = layer_rounding_error(model, activation_norms(x), out64)
        posterior = layer_rounding_error_a_posteriori(layer, model, x, out32)
        assert (error <= bound + bound64).all() and (error <= posterior + bound64).all()
        worst = max(worst, float((error / posterior).max()))
    assert worst > 1e-5, worst  # not vacuous (a float64 unit roundoff would make the bound ~1e9 too small)


def test_chain_member_and_certified_model_round_trip(tmp_path):
    chain = LipschitzSequential(CholeskyOrthogonalLinear(6, 6), MinMax(), CholeskyOrthogonalLinear(6, 4))
    assert chain.lipschitz_upper_bound() <= 1.0 + 1e-5
    torch.manual_seed(5)
    config = GloRoConfig(backbone="liresnet_l6w128", num_channels=3, image_size=16, epsilon=0.05,
                         backbone_kwargs={"width": 8, "depth": 2, "neck_features": 16, "mlp_depth": 2},
                         head_normalization="lln")
    model = GloRoForImageClassification(config).eval()
    leaves = model.certification_chain()
    assert sum(isinstance(leaf, CholeskyOrthogonalLinear) for leaf in leaves) == 2
    x = torch.rand(6, 3, 16, 16)
    certificate = model.certify(x)
    # The guaranteed bound of the whole model covers a sampled Jacobian norm (local Lipschitz constant).
    bound = model.lipschitz_constant()
    for i in range(3):
        jacobian = torch.autograd.functional.jacobian(
            lambda z: model.backbone(model.normalization(z)), x[i:i + 1].double().float()).reshape(16, -1)
        assert exact_norm(jacobian) <= bound
    model.save_pretrained(tmp_path)
    loaded = GloRoForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.lipschitz_constant() == bound
    again = loaded.certify(x)
    assert torch.equal(again.predictions, certificate.predictions)
    assert torch.equal(again.certified, certificate.certified)
    assert math.isfinite(float(again.radius.max()))
