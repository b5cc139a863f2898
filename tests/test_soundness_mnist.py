"""Soundness on a model trained on real MNIST: attacks never break a certified point, and the margin
Lipschitz constants dominate every gradient norm measured on real inputs."""

import time

import pytest
import torch

from hf_gloro import GloRoConfig, GloRoForImageClassification
from hf_gloro.data import image_column, images_to_pixels, load_image_dataset

EPSILON = 0.3


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
    """2C2F trained for 4 epochs at ε_train = 0.45 on 8,000 real MNIST digits (~30 s on 2 cores)."""
    torch.manual_seed(0)
    (x, y), _ = mnist
    model = GloRoForImageClassification(GloRoConfig(backbone="gloro_2c2f", epsilon=EPSILON)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    start = time.time()
    for epoch in range(4):
        order = torch.randperm(len(x))
        for batch in order.split(128):
            loss = model(x[batch], labels=y[batch], epsilon=1.5 * EPSILON * min(1.0, (epoch + 1) / 2)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    print(f"trained in {time.time() - start:.1f}s")
    return model.eval()


def margin_to_runner_up(model, x, target):
    logits = model(x).logits
    top = logits.gather(1, target[:, None]).squeeze(1)
    others = logits.scatter(1, target[:, None], float("-inf"))
    return top - others.max(dim=1).values


def pgd_l2(model, x, target, radius, steps=60, restarts=2):
    """L2 PGD minimising the margin of ``target`` within ``‖δ‖ ≤ radius`` (per row); returns the best δ."""
    radius = torch.as_tensor(radius, dtype=x.dtype).reshape(-1, 1, 1, 1).expand(len(x), 1, 1, 1)
    best_delta, best_margin = torch.zeros_like(x), torch.full((len(x),), float("inf"))
    for restart in range(restarts):
        delta = torch.randn_like(x) if restart else torch.zeros_like(x)
        delta = delta * (radius / delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)) * 0.5
        for step in range(steps):
            delta.requires_grad_(True)
            margin = margin_to_runner_up(model, (x + delta).clamp(0, 1), target)
            (grad,) = torch.autograd.grad(margin.sum(), delta)
            with torch.no_grad():
                step_size = 2.5 * radius / steps
                delta = delta - step_size * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                delta = delta * torch.clamp(radius / norm.clamp_min(1e-12), max=1.0)
        with torch.no_grad():
            margin = margin_to_runner_up(model, (x + delta).clamp(0, 1), target)
            better = margin < best_margin
            best_margin = torch.where(better, margin, best_margin)
            best_delta[better] = delta[better]
    return best_delta, best_margin


def test_training_produced_a_useful_certified_model(trained, mnist):
    _, (x, y) = mnist
    certificate = trained.certify(x)
    clean = (certificate.predictions == y).float().mean().item()
    vra = ((certificate.predictions == y) & certificate.certified).float().mean().item()
    print(f"clean={clean:.3f} vra={vra:.3f} K={certificate.lipschitz_constant:.3f}")
    assert clean > 0.85 and vra > 0.5  # otherwise the attacks below would test little


def test_pgd_inside_the_epsilon_ball_never_changes_a_certified_prediction(trained, mnist):
    _, (x, y) = mnist
    certificate = trained.certify(x)
    idx = certificate.certified.nonzero().squeeze(1)[:300]
    target = certificate.predictions[idx]
    delta, margin = pgd_l2(trained, x[idx], target, EPSILON)
    assert (delta.flatten(1).norm(dim=1) <= EPSILON * (1 + 1e-5)).all()
    assert (margin > 0).all(), f"{int((margin <= 0).sum())} certified points were broken"
    # Stronger: up to each point's own certified radius.
    radius = certificate.radius[idx].float() * 0.999
    _, margin = pgd_l2(trained, x[idx], target, radius)
    assert (margin > 0).all()


def test_the_attack_is_strong_and_every_adversarial_example_lies_beyond_the_certified_radius(trained, mnist):
    # Guards against a broken attack passing the test above: with a large budget it must flip most
    # predictions, and each successful perturbation must be longer than the point's certified radius.
    _, (x, y) = mnist
    idx = torch.arange(200)
    certificate = trained.certify(x[idx])
    delta, margin = pgd_l2(trained, x[idx], certificate.predictions, 2.5, steps=100)
    broken = margin < 0
    assert broken.float().mean() > 0.5
    lengths = ((x[idx] + delta).clamp(0, 1) - x[idx]).flatten(1).norm(dim=1).double()  # actual perturbation
    assert (lengths[broken] > certificate.radius[broken]).all()


def test_margin_lipschitz_constants_dominate_gradient_norms_on_real_inputs(trained, mnist):
    _, (x, y) = mnist
    constants = trained.margin_lipschitz_constants()
    x = torch.cat([x[:200], (x[:200] + 0.1 * torch.randn_like(x[:200])).clamp(0, 1)])
    x.requires_grad_(True)
    logits = trained(x).logits
    worst_ratio = 0.0
    for j in range(10):
        for i in range(10):
            if i == j:
                continue
            (grad,) = torch.autograd.grad((logits[:, j] - logits[:, i]).sum(), x, retain_graph=True)
            norms = grad.flatten(1).norm(dim=1).double()
            assert (norms <= constants[j, i]).all(), (j, i, norms.max().item(), constants[j, i].item())
            worst_ratio = max(worst_ratio, float((norms / constants[j, i]).max()))
    # The bound is not vacuous either: measured gradients reach a visible fraction of it.
    assert worst_ratio > 0.2
    # The sub-network constant dominates the features' Jacobian norm (random directions, real inputs).
    features = lambda v: trained.backbone(trained.normalization(v))  # noqa: E731
    jvp_inputs = x[:50].detach()
    direction = torch.randn_like(jvp_inputs)
    direction = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    _, tangent = torch.func.jvp(features, (jvp_inputs,), (direction,))
    assert (tangent.norm(dim=1) <= trained.lipschitz_constant()).all()
