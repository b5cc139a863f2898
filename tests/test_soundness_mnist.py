"""Soundness on a model trained on real MNIST, with checks that can fail.

* A **minimum-norm attack** (per point, bisection of the L2 budget with PGD at each budget) finds, for every test
  point, the shortest perturbation it can that flips the prediction. Every such perturbation must be at least the
  point's certified radius (soundness), and for most points it must be within a modest factor of that radius
  (the attack is strong: a certificate that claimed radii larger than the truth would be contradicted).
* PGD inside each certified point's radius never flips it; margin gradients stay below the margin constants; the
  bound dominates the Jacobian and the product of the exact norms of the executed layers (the checks of
  ``test_soundness_backbones``, reused).
* The same check functions **fail** on copies of the model whose certification constants are scaled down
  (0.5 per layer, 0.5 and 0.75 for the whole network).

The attack perturbs freely in R^n (no clipping to [0, 1]): the certificate is a Lipschitz statement about the
network on the whole ball, and the box would only keep the attack away from the radius (measured: with clipping the
shortest flips were 2–3× the radius instead of 1.6–2×).
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from gloro_helpers import margin_to_runner_up, rebuilt

from hf_gloro import GloRoConfig, GloRoForImageClassification
from hf_gloro.data import image_column, images_to_pixels, load_image_dataset
from hf_gloro.lipschitz.conv import LipschitzConv2d
from hf_gloro.lipschitz.linear import LipschitzLinear
from hf_gloro.lipschitz.residual import LinearResidualConv2d

from test_soundness_backbones import (
    check_bound_dominates_executed_layers,
    check_bound_dominates_jacobian,
    check_margin_constants_dominate_gradients,
    executed_layer_norms,
)

EPSILON = 0.3
TRAIN_EPSILON = 2.5  # a large training ε makes the network use its Lipschitz budget: the certificate gets tighter


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mnist(shared_data):
    train = load_image_dataset("ylecun/mnist", "train", dataset_dir=str(shared_data)).select(range(8000))
    test = load_image_dataset("ylecun/mnist", "test", dataset_dir=str(shared_data)).select(range(1000))
    column = image_column(train)
    return (
        (images_to_pixels(train[column], 1, 28), torch.tensor(train["label"])),
        (images_to_pixels(test[column], 1, 28), torch.tensor(test["label"])),
    )


@pytest.fixture(scope="module")
def trained(mnist):
    """2C2F trained for 8 epochs at ε_train = 2.5 on 8,000 real MNIST digits (~19 s CPU, one thread).

    The large training ε costs clean accuracy (~0.84) but makes the certificate tight: the shortest flips the attack
    finds are 1.25–1.75× the certified radius (at ε_train = 0.45 for 4 epochs they were ≥ 1.6×, so a certificate
    over-claiming by 4/3 contradicted no point and could not be caught by any attack).
    """
    torch.manual_seed(0)
    (x, y), _ = mnist
    model = GloRoForImageClassification(GloRoConfig(backbone="gloro_2c2f", epsilon=EPSILON)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    start = time.process_time()
    for epoch in range(8):
        order = torch.randperm(len(x))
        for batch in order.split(128):
            loss = model(x[batch], labels=y[batch], epsilon=TRAIN_EPSILON * min(1.0, (epoch + 1) / 2)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    print(f"trained in {time.process_time() - start:.1f}s CPU")
    return model.eval()


# --- attacks ----------------------------------------------------------------------------------------------------

def pgd_l2(model, x, target, radius, steps=40, restarts=1, box=False, seed=0):
    """L2 PGD minimising the margin of ``target`` within ``‖δ‖ ≤ radius`` (per row); returns the best δ and
    margin.

    ``box``: keep ``x + δ`` in [0, 1]. The first run starts at 0, restarts at random points of the half-radius
    sphere.
    """
    generator = torch.Generator().manual_seed(seed)
    radius = torch.as_tensor(radius, dtype=x.dtype).reshape(-1, 1, 1, 1).expand(len(x), 1, 1, 1)
    best_delta, best_margin = torch.zeros_like(x), torch.full((len(x),), float("inf"))

    def project(delta):
        norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        delta = delta * torch.clamp(radius / norm.clamp_min(1e-12), max=1.0)
        return (x + delta).clamp(0, 1) - x if box else delta

    for restart in range(restarts):
        delta = torch.randn(x.shape, generator=generator) if restart else torch.zeros_like(x)
        delta = project(delta * (radius / delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)) * 0.5)
        for _ in range(steps):
            delta.requires_grad_(True)
            margin = margin_to_runner_up(model, x + delta, target)
            (grad,) = torch.autograd.grad(margin.sum(), delta)
            with torch.no_grad():
                step = 2.5 * radius / steps
                delta = project(delta - step * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1))
        with torch.no_grad():
            margin = margin_to_runner_up(model, x + delta, target)
            better = margin < best_margin
            best_margin = torch.where(better, margin, best_margin)
            best_delta[better] = delta[better]
    return best_delta, best_margin


def minimum_adversarial_norms(model, x, target, high=4.0, bisections=8, steps=30, restarts=1):
    """Per row, the shortest flipping perturbation found (``inf`` if none within ``high``), and that perturbation.

    PGD at budget ``high`` first; then bisection of each row's budget between the last failure and the shortest
    flip so far, with PGD at every budget. Lengths are those of the perturbations actually found.
    """
    n = len(x)
    best = torch.full((n,), math.inf, dtype=torch.float64)
    best_delta = torch.zeros_like(x)
    low = torch.zeros(n, dtype=torch.float64)
    up = torch.full((n,), float(high), dtype=torch.float64)
    for round_ in range(bisections + 1):
        budget = up if round_ == 0 else (low + up) / 2
        delta, margin = pgd_l2(model, x, target, budget.float(), steps=steps, restarts=restarts, seed=round_)
        length = delta.flatten(1).norm(dim=1).double()
        flipped = margin < 0
        shorter = flipped & (length < best)
        best = torch.where(shorter, length, best)
        best_delta[shorter] = delta[shorter].detach()
        up = torch.where(flipped, torch.minimum(budget, length), up)
        low = torch.where(flipped, low, budget if round_ else up)  # not flipped at `high`: stop bisecting
    return best, best_delta


def check_min_norm_attack(model, x, *, factor=2.0, fraction=0.9, **attack):
    """Soundness and strength of the certified radii at ``x`` against a minimum-norm attack.

    Asserts (1) every perturbation found that flips a prediction is at least that point's certified radius, and
    (2) for at least ``fraction`` of the points with a positive radius the shortest flip found is within
    ``factor`` × the radius. Returns the ratios (shortest flip / radius).
    """
    certificate = model.certify(x)
    keep = certificate.radius > 0
    x, radius, target = x[keep], certificate.radius[keep], certificate.predictions[keep]
    norms, deltas = minimum_adversarial_norms(model, x, target, **attack)
    flipped = torch.isfinite(norms)
    if flipped.any():  # the flips are real: the float64 network disagrees with the prediction there too
        with torch.no_grad():
            twin = rebuilt(model).double()
            worst = margin_to_runner_up(twin, (x + deltas)[flipped].double(), target[flipped])
        assert (worst < 1e-5).all(), "a float32 flip that the float64 network does not confirm"
    ratios = norms / radius
    broken = (norms < radius).nonzero().squeeze(1)
    assert len(broken) == 0, (
        f"{len(broken)} of {len(x)} points have a flipping perturbation shorter than their certified radius, "
        f"e.g. ‖δ‖ = {float(norms[broken[0]]):.5g} < radius {float(radius[broken[0]]):.5g}"
        f" (certified at ε={EPSILON}: {bool(radius[broken[0]] > EPSILON)})")
    close = (ratios <= factor).float().mean().item()
    assert close >= fraction, (
        f"the attack is weak: only {close:.0%} of the points have a flip within {factor}× their radius "
        f"(median ratio {float(ratios.median()):.3g})")
    return ratios


# --- tests ---------------------------------------------------------------------------------------------------------

def test_training_produced_a_useful_certified_model(trained, mnist):
    _, (x, y) = mnist
    certificate = trained.certify(x)
    clean = (certificate.predictions == y).float().mean().item()
    vra = ((certificate.predictions == y) & certificate.certified).float().mean().item()
    print(f"clean={clean:.3f} vra={vra:.3f} K={certificate.lipschitz_constant:.3f}")
    assert clean > 0.8 and vra > 0.6  # otherwise the attacks below would test little


def test_minimum_norm_attack_never_beats_a_radius_and_gets_close_to_it(trained, mnist):
    _, (x, _) = mnist
    start = time.process_time()
    ratios = check_min_norm_attack(trained, x[:160])
    q = torch.quantile(ratios[torch.isfinite(ratios)], torch.tensor([0.0, 0.1, 0.5, 0.9], dtype=torch.float64))
    print(f"shortest flip / certified radius over {len(ratios)} points: min {q[0]:.3f} q10 {q[1]:.3f} "
          f"median {q[2]:.3f} q90 {q[3]:.3f}; {time.process_time() - start:.1f}s CPU")


def test_pgd_inside_the_certified_radius_never_changes_a_prediction(trained, mnist):
    _, (x, _) = mnist
    certificate = trained.certify(x)
    idx = certificate.certified.nonzero().squeeze(1)[:200]
    target = certificate.predictions[idx]
    for box in (True, False):
        _, margin = pgd_l2(trained, x[idx], target, EPSILON, steps=40, restarts=2, box=box)
        assert (margin > 0).all(), f"{int((margin <= 0).sum())} certified points broken within ε"
        _, margin = pgd_l2(trained, x[idx], target, certificate.radius[idx].float() * 0.999, steps=40, box=box)
        assert (margin > 0).all(), f"{int((margin <= 0).sum())} certified points broken within their radius"


def test_bound_dominates_jacobian_layers_and_margin_gradients(trained, mnist):
    _, (x, _) = mnist
    probe = torch.cat([x[:100], (x[:100] + 0.1 * torch.randn_like(x[:100])).clamp(0, 1)])
    margin_ratio = check_margin_constants_dominate_gradients(trained, probe)
    jacobian_ratio = check_bound_dominates_jacobian(trained, x[:20])
    looseness = check_bound_dominates_executed_layers(trained, executed_layer_norms(trained, x[:1]))
    print(f"‖∇margin‖/K ≤ {margin_ratio:.3f}, ‖J‖/k ≤ {jacobian_ratio:.3f}, k/Πσ = {looseness:.4f}")
    # The bounds are not vacuous either: measurements reach a good fraction of them.
    assert margin_ratio > 0.5 and jacobian_ratio > 0.5 and looseness < 1.1


def _scale(monkeypatch, classes, factor):
    for cls in classes:
        original = cls._compute_upper_bound
        monkeypatch.setattr(cls, "_compute_upper_bound", lambda self, original=original: factor * original(self))


ALL_LAYERS = (LipschitzConv2d, LipschitzLinear, LinearResidualConv2d)


@pytest.mark.parametrize("classes, factor, total", [
    (ALL_LAYERS, 0.5, 0.125),  # every layer's bound halved (2C2F: two convolutions and one dense layer)
    ((LipschitzLinear,), 0.5, 0.5),  # the whole network's bound halved
    ((LipschitzLinear,), 0.75, 0.75),  # … or scaled by 0.75
])
def test_scaled_down_constants_fail_the_checks(trained, mnist, monkeypatch, classes, factor, total):
    _, (x, _) = mnist
    honest = trained.lipschitz_constant()
    layer_norms = executed_layer_norms(trained, x[:1])
    _scale(monkeypatch, classes, factor)
    broken = rebuilt(trained)
    assert broken.lipschitz_constant() == pytest.approx(total * honest, rel=1e-5), "the patch missed the bound"
    caught = []
    with pytest.raises(AssertionError, match="shorter than their certified radius"):
        check_min_norm_attack(broken, x[:160])
    caught.append("min-norm attack")
    with pytest.raises(AssertionError):
        check_bound_dominates_executed_layers(broken, layer_norms)
    caught.append("executed layers")
    for name, check in (("jacobian", lambda: check_bound_dominates_jacobian(broken, x[:20])),
                        ("margin gradients", lambda: check_margin_constants_dominate_gradients(broken, x[:100]))):
        try:
            check()
        except AssertionError:
            caught.append(name)
    print(f"constants × {total}: caught by {caught}")
    if total <= 0.5:
        assert len(caught) == 4
