"""Certified-robustness metrics: clean accuracy, verified-robust accuracy (VRA), rejection rate, radii."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch


def certified_metrics(
    predictions: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    radius: np.ndarray | torch.Tensor,
    epsilon: float,
    extra_radii: Sequence[float] = (),
) -> dict[str, float]:
    """Metrics from per-point predictions and certified radii.

    * ``clean_accuracy`` = mean(prediction == label);
    * ``vra`` = mean(prediction == label and radius > ε) (certified *and* correct); ``vra@r`` likewise per
      extra radius ``r``;
    * ``rejection_rate`` = mean(radius ≤ ε) (⊥ wins: not certified);
    * ``median_certified_radius`` = median over all points of the radius, counting misclassified
      points as 0 (so it is the radius at which VRA crosses 50%).
    """
    predictions = np.asarray(predictions).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    radius = np.asarray(radius, dtype=np.float64).reshape(-1)
    if not (len(predictions) == len(labels) == len(radius)):
        raise ValueError("predictions, labels and radius must have the same length")
    if len(labels) == 0:
        raise ValueError("cannot compute metrics on an empty set")
    correct = predictions == labels
    metrics = {
        "clean_accuracy": float(correct.mean()),
        "vra": float((correct & (radius > epsilon)).mean()),
        "rejection_rate": float((radius <= epsilon).mean()),
        "median_certified_radius": float(np.median(np.where(correct, radius, 0.0))),
    }
    for r in extra_radii:
        metrics[f"vra@{r:.4g}"] = float((correct & (radius > r)).mean())
    return metrics


@torch.no_grad()
def evaluate_certified(
    model,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    epsilon: float | None = None,
    extra_radii: Sequence[float] = (),
    progress: bool = True,
) -> dict[str, float]:
    """Run ``model.certify`` over ``(pixel_values, labels)`` batches and return :func:`certified_metrics`.

    Adds ``lipschitz_constant`` (the guaranteed bound used) and ``num_examples``.
    """
    from tqdm.auto import tqdm

    epsilon = float(model.config.epsilon if epsilon is None else epsilon)
    device = next(model.parameters()).device
    predictions, labels, radii = [], [], []
    for pixel_values, batch_labels in tqdm(batches, desc="certifying", disable=not progress, leave=False):
        certificate = model.certify(pixel_values.to(device), epsilon)
        predictions.append(certificate.predictions.cpu())
        radii.append(certificate.radius.cpu())
        labels.append(torch.as_tensor(batch_labels).cpu())
    metrics = certified_metrics(torch.cat(predictions), torch.cat(labels), torch.cat(radii), epsilon, extra_radii)
    metrics["lipschitz_constant"] = model.lipschitz_constant()
    metrics["num_examples"] = int(sum(len(label) for label in labels))
    return metrics
