"""The GloRo bottom logit, certificates and radii on hand-computed cases."""

import math

import pytest
import torch

from hf_gloro.lipschitz import GloRoHead, bottom_logit, certify_logits, gloro_logits, pairwise_row_distances
from hf_gloro.lipschitz.margins import pairwise_row_distances_upper_bound


def test_pairwise_distances_match_direct_computation():
    w = torch.randn(7, 5)
    direct = (w[:, None, :] - w[None, :, :]).norm(dim=-1)
    off_diagonal = ~torch.eye(7, dtype=torch.bool)
    assert torch.allclose(pairwise_row_distances(w)[off_diagonal], direct[off_diagonal], atol=1e-5)
    upper = pairwise_row_distances_upper_bound(w)
    assert (upper >= direct.double()).all()
    assert torch.allclose(upper, direct.double(), rtol=1e-5, atol=1e-6)
    assert torch.equal(upper.diagonal(), torch.zeros(7, dtype=torch.float64))


def test_bottom_logit_hand_computed():
    logits = torch.tensor([[3.0, 1.0, 0.0]])
    constants = torch.tensor([[0.0, 2.0, 4.0], [2.0, 0.0, 1.0], [4.0, 1.0, 0.0]])
    # j = 0; candidates: 1 + 0.5·2 = 2, 0 + 0.5·4 = 2 → y⊥ = 2 < 3: certified.
    assert bottom_logit(logits, constants, 0.5).item() == pytest.approx(2.0)
    out = gloro_logits(logits, constants, 0.5)
    assert out.shape == (1, 4) and out.argmax(-1).item() == 0
    predictions, certified, radius = certify_logits(logits, constants, 0.5)
    # radius = min((3 − 1)/2, (3 − 0)/4) = 0.75
    assert predictions.item() == 0 and certified.item() and radius.item() == pytest.approx(0.75)
    # At ε = 1 the bottom logit wins: y⊥ = max(1 + 2, 0 + 4) = 4 > 3.
    assert not certify_logits(logits, constants, 1.0)[1].item()
    assert gloro_logits(logits, constants, 1.0).argmax(-1).item() == 3


def test_a_tie_for_the_top_class_is_never_certified():
    # gloro issue #9: masking every class equal to the max made y⊥ = −inf and "certified" ties.
    logits = torch.tensor([[2.0, 2.0, -5.0], [1.0, 0.0, 1.0]])
    constants = torch.zeros(3, 3)  # even with K = 0 (identical rows), a tie must not certify
    _, certified, radius = certify_logits(logits, constants, 0.1)
    assert not certified.any()
    assert torch.equal(radius, torch.zeros(2, dtype=torch.float64))
    assert torch.isfinite(bottom_logit(logits, constants, 0.1)).all()
    constants = torch.ones(3, 3) - torch.eye(3)
    assert not certify_logits(logits, constants, 1e-9)[1].any()


def test_only_the_argmax_index_is_masked():
    logits = torch.tensor([[5.0, 1.0, 4.0]])
    constants = torch.tensor([[0.0, 10.0, 1.0], [10.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    # j = 0: candidates 1 + 10ε and 4 + ε; with ε = 0.1: max(2, 4.1) = 4.1.
    assert bottom_logit(logits, constants, 0.1).item() == pytest.approx(4.1)


def test_certified_iff_radius_exceeds_epsilon():
    torch.manual_seed(1)
    logits = torch.randn(500, 10) * 3
    head = GloRoHead(16, 10)
    constants = head.margin_constants_upper_bound(1.7)
    for eps in (0.05, 0.2, 0.8):
        _, certified, radius = certify_logits(logits, constants, eps)
        assert torch.equal(certified, radius > eps)
        assert 0 < certified.sum() < 500


def test_per_example_epsilon_and_single_class():
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    constants = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    bottom = bottom_logit(logits, constants, torch.tensor([0.5, 2.0]))
    assert bottom.tolist() == pytest.approx([0.5, 2.0])
    predictions, certified, radius = certify_logits(torch.tensor([[0.3]]), torch.zeros(1, 1), 1.0)
    assert certified.item() and math.isinf(radius.item())


def test_lln_head_has_unit_rows_and_bounded_margins():
    head = GloRoHead(8, 5, normalize_rows=True)
    with torch.no_grad():
        head.weight.mul_(7.0)
    assert torch.allclose(head.effective_weight().norm(dim=1), torch.ones(5))
    constants = head.margin_constants_upper_bound(3.0)
    assert (constants <= 2 * 3.0 * (1 + 1e-5)).all()  # ‖ŵ_j − ŵ_i‖ ≤ 2
    estimate = head.margin_constants_estimate(torch.tensor(3.0))
    assert torch.allclose(estimate.double().fill_diagonal_(0), constants, rtol=1e-4, atol=1e-4)
