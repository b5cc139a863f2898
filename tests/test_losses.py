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


# --- the trainer's loss at a known step, against a hand computation -------------------------------------------
def _hand_losses(logits, constants, labels, epsilon, trades_lambda):
    """TRADES, EMMA and margin written out per example with Python floats (no library loss code)."""
    rows = []
    for y, c in zip(logits.tolist(), labels.tolist()):
        m = len(y)
        k = constants[c].tolist()  # K_{c,i}
        j = max(range(m), key=lambda i: y[i])
        bottom = max(y[i] + epsilon * constants[j][i].item() for i in range(m) if i != j)
        log_z = math.log(sum(math.exp(v) for v in y))
        log_z_bot = math.log(sum(math.exp(v) for v in y) + math.exp(bottom))
        trades = (log_z - y[c]) + trades_lambda * (log_z_bot - log_z)
        z = [y[i] - y[c] for i in range(m)]
        emma_logits = []
        for i in range(m):
            push = epsilon * k[i]
            share = min(max(-z[i] / max(push, 1e-8), 0.01), 1.0)
            emma_logits.append(z[i] + share * push)
        emma = math.log(sum(math.exp(v) for v in emma_logits)) - emma_logits[c]
        margin_logits = [y[i] + epsilon * k[i] for i in range(m)]
        margin = math.log(sum(math.exp(v) for v in margin_logits)) - margin_logits[c]
        rows.append({"trades": trades, "emma": emma, "margin": margin})
    return {name: sum(row[name] for row in rows) / len(rows) for name in rows[0]}


@pytest.mark.parametrize("loss", ["trades", "emma", "margin"])
def test_trainer_loss_at_a_known_step_matches_a_hand_computation(tmp_path, loss):
    """Step 25 of 100: ε_train = 1.5 · 0.3 · (0.1 + 0.9 · 25/50) and λ = 2 · 25/100 (linear), then the loss by
    hand from the training forward's logits and margin constants at that ε."""
    from gloro_helpers import model_snapshot, tiny_trainer
    from hf_gloro.trainer import collate_pixels

    trainer = tiny_trainer(str(tmp_path), gloro_loss=loss, trades_lambda=2.0, trades_lambda_schedule="linear",
                           trades_lambda_start_fraction=0.0)
    trainer.state.max_steps, trainer.state.global_step = 100, 25
    epsilon, trades_lambda = 1.5 * 0.3 * (0.1 + 0.9 * 0.5), 2.0 * 0.25
    batch = collate_pixels([trainer.train_dataset[i] for i in range(16)])
    model = trainer.model.train()
    start = model_snapshot(model)
    value = trainer.compute_loss(model, batch).item()

    model.load_state_dict(start)  # the same power-iteration start: the same estimate
    with torch.no_grad():
        outputs = model(batch["pixel_values"], epsilon=epsilon)
        constants = outputs.margin_constants
    # The constants are the model's own differentiable estimate k·‖w_j − w_i‖ at this step.
    with torch.no_grad():
        estimate = model.head.margin_constants_estimate(model.lipschitz_estimate(iterations=0, update=False))
    torch.testing.assert_close(constants, estimate, rtol=1e-5, atol=1e-6)
    expected = _hand_losses(outputs.logits.double(), constants.double(), batch["labels"], epsilon, trades_lambda)
    assert value == pytest.approx(expected[loss], rel=1e-5)
    # The three objectives differ at this step, so matching the right one is informative.
    assert len({round(v, 4) for v in expected.values()}) == 3
