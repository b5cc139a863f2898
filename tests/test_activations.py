"""MinMax's custom autograd: values bit-identical to max/min, gradients equal to autograd's away from ties."""

import torch
from torch.func import jacrev, jvp

from hf_gloro.lipschitz import MinMax


def _reference(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[1] // 2
    a, b = x[:, :half], x[:, half:]
    return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


def test_minmax_values_are_exactly_max_and_min_with_and_without_grad():
    torch.manual_seed(0)
    x = torch.randn(5, 8, 3, 3) * torch.logspace(-30, 30, 8)[None, :, None, None]
    x[0, 0] = x[0, 4]  # ties
    expected = _reference(x)
    assert torch.equal(MinMax()(x), expected)
    assert torch.equal(MinMax()(x.clone().requires_grad_()), expected)


def test_minmax_gradients_match_autograd_and_route_every_entry_once():
    torch.manual_seed(1)
    x = torch.randn(4, 6, 2, 2, dtype=torch.float64)
    weights = torch.randn(4, 6, 2, 2, dtype=torch.float64)
    ours = x.clone().requires_grad_()
    (MinMax()(ours) * weights).sum().backward()
    theirs = x.clone().requires_grad_()
    (_reference(theirs) * weights).sum().backward()
    assert torch.equal(ours.grad, theirs.grad)
    # Ties split the gradient half and half, as autograd's maximum/minimum do.
    tied = torch.zeros(1, 2, requires_grad=True)
    (MinMax()(tied) * torch.tensor([[3.0, 1.0]])).sum().backward()
    assert torch.equal(tied.grad, torch.full((1, 2), 2.0))
    ties = torch.randn(4, 6, 2, 2, dtype=torch.float64)
    ties[:, :3] = ties[:, 3:]
    ours, theirs = ties.clone().requires_grad_(), ties.clone().requires_grad_()
    (MinMax()(ours) * weights).sum().backward()
    (_reference(theirs) * weights).sum().backward()
    assert torch.equal(ours.grad, theirs.grad)
    assert torch.autograd.gradgradcheck(MinMax(), (torch.randn(2, 4, dtype=torch.float64, requires_grad=True),))


def test_minmax_works_under_functorch_transforms():
    torch.manual_seed(2)
    x = torch.randn(3, 4, dtype=torch.float64)
    jacobian = jacrev(MinMax())(x)
    expected = torch.autograd.functional.jacobian(_reference, x)
    assert torch.equal(jacobian, expected)
    tangent = torch.randn_like(x)
    _, ours = jvp(MinMax(), (x,), (tangent,))
    _, theirs = jvp(_reference, (x,), (tangent,))
    assert torch.equal(ours, theirs)
