"""GloRo losses on hand-computed cases (values and, where it matters, gradients)."""

import math

import pytest
import torch

from hf_gloro.lipschitz import gloro_logits
from hf_gloro.losses import (
    LOSSES,
    emma_loss,
    gloro_cross_entropy,
    gloro_loss,
    gloro_trades_loss,
    margin_loss,
    resolve_loss_name,
    trades_kl_term,
)

# Three classes; K_ji symmetric with zero diagonal.
K = torch.tensor([[0.0, 2.0, 1.0], [2.0, 0.0, 3.0], [1.0, 3.0, 0.0]])


def test_gloro_cross_entropy_hand_case():
    logits = torch.tensor([[3.0, 1.0, 2.5]])
    # j = 0; y_⊥ = max(1 + 0.5·2, 2.5 + 0.5·1) = 3.0
    all_logits = gloro_logits(logits, K, 0.5)
    assert all_logits[0, -1].item() == pytest.approx(3.0)
    expected = math.log(math.exp(3) + math.exp(1) + math.exp(2.5) + math.exp(3.0)) - 3.0
    assert gloro_cross_entropy(all_logits, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-6)
    # The label is never ⊥: a wrong label costs more.
    assert gloro_cross_entropy(all_logits, torch.tensor([1])).item() > expected


def test_trades_kl_term_equals_explicit_kl():
    torch.manual_seed(0)
    logits = torch.randn(5, 4)
    bottom = torch.randn(5, 1) + 1.0
    all_logits = torch.cat([logits, bottom], dim=1)
    p = torch.cat([logits.softmax(-1), torch.zeros(5, 1)], dim=1)
    q = all_logits.softmax(-1)
    explicit = (p[:, :4] * (p[:, :4].log() - q[:, :4].log())).sum(-1)
    torch.testing.assert_close(trades_kl_term(logits, all_logits), explicit, rtol=1e-5, atol=1e-6)
    assert (trades_kl_term(logits, all_logits) >= 0).all()


def test_trades_loss_hand_case_and_lambda():
    logits = torch.tensor([[2.0, 0.0]])
    all_logits = torch.tensor([[2.0, 0.0, 1.0]])  # y_⊥ = 1
    labels = torch.tensor([0])
    ce = math.log(math.exp(2) + 1) - 2
    kl = math.log(math.exp(2) + 1 + math.e) - math.log(math.exp(2) + 1)
    assert gloro_trades_loss(logits, all_logits, labels, 0.0).item() == pytest.approx(ce, rel=1e-6)
    assert gloro_trades_loss(logits, all_logits, labels, 2.0).item() == pytest.approx(ce + 2 * kl, rel=1e-6)


def test_emma_hand_case_value_and_stopgrad_gradient():
    # label 0, z = [0, −2, −0.5], ε K_0· = [0, 2, 1]: class 1 is beaten by exactly εK (ε_1 = 1), class 2 is
    # inside the margin (ε_2 = 0.5) and is raised exactly to the label logit → ỹ = [0, 0, 0], loss = ln 3.
    logits = torch.tensor([[3.0, 1.0, 2.5]], requires_grad=True)
    constants = K.clone().requires_grad_(True)
    loss = emma_loss(logits, constants, torch.tensor([0]), 1.0)
    assert loss.item() == pytest.approx(math.log(3), rel=1e-6)
    loss.backward()
    # ε_i is stop-gradient'ed: ∂L/∂z = softmax(ỹ) − onehot = [−2/3, 1/3, 1/3]; ∂L/∂y_c = −Σ_{i≠c} ∂L/∂z_i.
    torch.testing.assert_close(logits.grad, torch.tensor([[-2 / 3, 1 / 3, 1 / 3]]))
    # ∂L/∂K_0i = ∂L/∂ỹ_i · ε_i · ε = [(1/3 − 1)·0.01, 1/3, 0.5/3]; other rows unused. (The diagonal entry is
    # harmless: the model's K_cc comes from a clamped zero distance, whose gradient is 0.)
    expected_k_grad = torch.zeros(3, 3)
    expected_k_grad[0, 0], expected_k_grad[0, 1], expected_k_grad[0, 2] = -2 / 3 * 0.01, 1 / 3, 0.5 / 3
    torch.testing.assert_close(constants.grad, expected_k_grad)


def test_emma_misclassified_gets_minimum_push():
    # label 0 but class 1 wins by 1: ε_1 = clip(−1/(εK), 0.01, 1) = 0.01 → ỹ_1 = 1 + 0.01·2.
    logits = torch.tensor([[0.0, 1.0, -10.0]])
    loss = emma_loss(logits, K, torch.tensor([0]), 1.0)
    z = torch.tensor([[0.0, 1.0 + 0.01 * 2.0, -10.0 + 1.0]])  # class 2: margin 10 ≥ εK = 1 → full push
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(z, torch.tensor([0])).item(), rel=1e-6)


def test_emma_per_example_epsilon():
    logits = torch.tensor([[3.0, 1.0, 2.5], [3.0, 1.0, 2.5]])
    labels = torch.tensor([0, 0])
    both = emma_loss(logits, K, labels, torch.tensor([1.0, 0.0]))
    first = emma_loss(logits[:1], K, labels[:1], 1.0)
    second = emma_loss(logits[:1], K, labels[:1], 0.0)  # ε = 0: plain CE on z
    assert both.item() == pytest.approx((first.item() + second.item()) / 2, rel=1e-6)
    assert second.item() == pytest.approx(torch.nn.functional.cross_entropy(logits[:1], labels[:1]).item(), rel=1e-6)


def test_margin_loss_hand_case():
    logits = torch.tensor([[3.0, 1.0, 2.5]])
    loss = margin_loss(logits, K, torch.tensor([0]), 0.5)
    expected = math.log(math.exp(3) + math.exp(2) + math.exp(3)) - 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dispatch_by_name():
    logits = torch.tensor([[3.0, 1.0, 2.5]])
    labels = torch.tensor([0])
    all_logits = gloro_logits(logits, K, 0.5)
    kwargs = dict(logits=logits, labels=labels, epsilon=0.5, gloro_logits=all_logits, margin_constants=K)
    assert gloro_loss("crossentropy", **kwargs) == gloro_cross_entropy(all_logits, labels)
    assert gloro_loss("TRADES", trades_lambda=1.5, **{k: v for k, v in kwargs.items()}) == gloro_trades_loss(
        logits, all_logits, labels, 1.5)
    assert gloro_loss("emma", **kwargs) == emma_loss(logits, K, labels, 0.5)
    assert gloro_loss("margin", **kwargs) == margin_loss(logits, K, labels, 0.5)
    assert set(LOSSES) == {"gloro_ce", "trades", "emma", "margin"}
    assert resolve_loss_name("CE") == "gloro_ce"
    with pytest.raises(ValueError, match="unknown GloRo loss"):
        resolve_loss_name("hinge")
    with pytest.raises(ValueError, match="margin-constant"):
        gloro_loss("emma", logits=logits, labels=labels, epsilon=0.5, gloro_logits=all_logits)
    with pytest.raises(ValueError, match="GloRo logits"):
        gloro_loss("trades", logits=logits, labels=labels, epsilon=0.5, margin_constants=K)
