"""Certified evaluation: one implementation of the figures, used by the trainer, the model card and the CLI.

* :func:`certified_metrics`: clean accuracy, verified-robust accuracy (VRA) at ε and at extra radii,
  rejection rate and median certified radius, from per-example predictions and certified radii. The
  ``evaluate`` metric module ``hf_gloro/metrics/certified_accuracy`` (:func:`certified_accuracy_metric`)
  computes its figures with this function, and the trainer and the card read them through that module.
* :func:`certify_exactly`: ``model.certify`` outside any ``torch.autocast`` region (certificates refuse
  reduced precision).
* :func:`iter_labelled_batches`: ``(pixel_values, labels)`` batches from a ``datasets.Dataset`` with an
  ``Image`` and a ``ClassLabel`` column, or from any iterable of batches.
* :class:`CertifiedEvaluation` / :func:`evaluate_for_card`: every example's prediction and certified radius
  on one labelled split, which is what a model card, its model-index and its plot need.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

#: Folder of the ``evaluate`` metric module (``evaluate.load(str(CERTIFIED_ACCURACY_METRIC))``).
CERTIFIED_ACCURACY_METRIC = Path(__file__).resolve().parent / "metrics" / "certified_accuracy"

__all__ = [
    "CERTIFIED_ACCURACY_METRIC",
    "CertifiedEvaluation",
    "certified_accuracy_metric",
    "certified_metrics",
    "certify_exactly",
    "compute_certified_metrics",
    "evaluate_certified",
    "evaluate_for_card",
    "iter_labelled_batches",
    "radius_key",
]


#: The threat models a certificate can be about, and how reports name them.
NORM_LABELS = {"l2": "L2", "linf": "L∞"}


def check_norm(norm: str) -> str:
    """``norm`` if it is ``"l2"`` or ``"linf"``, else a one-line ``ValueError``."""
    if norm not in NORM_LABELS:
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    return norm


def radius_key(radius: float) -> str:
    """Metric name of the VRA at an extra radius: ``vra@0.45``."""
    return f"vra@{radius:.4g}"


def certified_metrics(
    predictions: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    radius: np.ndarray | torch.Tensor,
    epsilon: float,
    extra_radii: Sequence[float] = (),
    norm: str = "l2",
) -> dict[str, float]:
    """Metrics from per-point predictions and certified radii (``epsilon``, the radii and ``extra_radii`` all in the
    certificate's ``norm``: ``"l2"`` or ``"linf"``; checked, the values do not depend on it).

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
    epsilon = float(epsilon)
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon}")
    check_norm(norm)
    correct = predictions == labels
    metrics = {
        "clean_accuracy": float(correct.mean()),
        "vra": float((correct & (radius > epsilon)).mean()),
        "rejection_rate": float((radius <= epsilon).mean()),
        "median_certified_radius": float(np.median(np.where(correct, radius, 0.0))),
    }
    for r in extra_radii:
        metrics[radius_key(float(r))] = float((correct & (radius > float(r))).mean())
    return metrics


@functools.lru_cache(maxsize=1)
def certified_accuracy_metric():
    """The ``evaluate`` metric module, loaded once per process (in memory: no cache files, no locks).

    Equivalent to ``evaluate.load(str(CERTIFIED_ACCURACY_METRIC), keep_in_memory=True)``; works offline.
    """
    import evaluate

    return evaluate.load(str(CERTIFIED_ACCURACY_METRIC), keep_in_memory=True)


def compute_certified_metrics(
    predictions, labels, radius, epsilon: float, extra_radii: Sequence[float] = (), norm: str = "l2"
) -> dict[str, float]:
    """:func:`certified_metrics`, computed through the ``evaluate`` metric module (what the trainer and the
    card report)."""
    predictions = np.asarray(predictions).reshape(-1).astype(np.int64)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    radius = np.asarray(radius, dtype=np.float64).reshape(-1)
    if not (len(predictions) == len(labels) == len(radius)):
        raise ValueError("predictions, labels and radius must have the same length")
    return certified_accuracy_metric().compute(
        predictions=predictions, references=labels, certified_radii=radius, epsilon=float(epsilon),
        extra_radii=[float(r) for r in extra_radii], norm=check_norm(norm),
    )


# --- certifying batches -----------------------------------------------------------------------------------
@torch.no_grad()
def certify_exactly(model, pixel_values: torch.Tensor, epsilon: float | None = None):
    """``model.certify(pixel_values, epsilon)`` with autocast switched off (also inside an autocast region,
    e.g. a mixed-precision ``Trainer`` evaluation): certificates are computed in full precision or not at all."""
    with torch.autocast(device_type=pixel_values.device.type, enabled=False):
        return model.certify(pixel_values, epsilon)


def iter_labelled_batches(model, data, batch_size: int = 256, limit: int | None = None) -> Iterator[tuple]:
    """``(pixel_values, labels)`` batches: from a ``datasets.Dataset`` (``Image`` + ``ClassLabel`` columns, or
    the decoded ``pixels`` layout of :func:`hf_gloro.data.decode_images`), or passed through from an iterable
    of batches (``limit`` then caps the number of examples)."""
    import datasets

    if not isinstance(data, datasets.Dataset):
        seen = 0
        for pixel_values, labels in data:
            if limit is not None and seen >= limit:
                return
            if limit is not None and seen + len(labels) > limit:
                pixel_values, labels = pixel_values[: limit - seen], labels[: limit - seen]
            seen += len(labels)
            yield pixel_values, labels
        return
    from .data import PIXELS_COLUMN, PixelsTransform, image_column, images_to_pixels, label_column

    config = model.config
    total = len(data) if limit is None else min(limit, len(data))
    if PIXELS_COLUMN in data.column_names:  # the recipe's decoded layout
        plain = data.with_format(None).with_transform(PixelsTransform(config.num_channels, config.image_size))
        for start in range(0, total, batch_size):
            rows = plain[start : min(start + batch_size, total)]
            yield rows["pixel_values"], rows["labels"]
        return
    images, label = image_column(data), label_column(data)
    for start in range(0, total, batch_size):
        rows = data[start : min(start + batch_size, total)]
        yield images_to_pixels(rows[images], config.num_channels, config.image_size), torch.tensor(rows[label])


def _certify_all(model, batches: Iterable, epsilon: float, progress: bool):
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    predictions, labels, radius = [], [], []
    bound, norm = None, "l2"
    for pixel_values, batch_labels in tqdm(batches, desc="certifying", disable=not progress, leave=False):
        certificate = certify_exactly(model, torch.as_tensor(pixel_values).to(device), epsilon)
        bound, norm = certificate.lipschitz_constant, getattr(certificate, "norm", "l2")
        predictions.append(certificate.predictions.cpu())
        radius.append(certificate.radius.cpu())
        labels.append(torch.as_tensor(batch_labels).cpu())
    if not labels:
        raise ValueError("no examples to evaluate")
    return (torch.cat(predictions).numpy(), torch.cat(labels).numpy(), torch.cat(radius).numpy(), float(bound),
            norm)


# --- per-example evaluation (cards and plots) -------------------------------------------------------------
@dataclass
class CertifiedEvaluation:
    """Per-example certificates of one model on one labelled split: everything a card and its plot need.

    Args:
        predictions, labels: ``(N,)`` integer arrays.
        radius: ``(N,)`` float64 certified radii (``min_{i≠j}(y_j − y_i)/K_ji``), from ``model.certify``.
        epsilon: the certifying radius the card reports (usually ``config.epsilon``).
        lipschitz_constant: the guaranteed bound the radii were computed with.
        dataset_id: Hub name of the data set (``ylecun/mnist``) or a local description.
        dataset_split: the split evaluated.
        radii: radii that get a VRA entry in the model-index (ε always included).
        dataset_name: human-readable name (defaults to ``dataset_id``).
        norm: the norm of ``epsilon``, the radii and the certificates (``"l2"`` or ``"linf"``).
    """

    predictions: np.ndarray
    labels: np.ndarray
    radius: np.ndarray
    epsilon: float
    lipschitz_constant: float
    dataset_id: str
    dataset_split: str = "test"
    radii: list[float] = field(default_factory=list)
    dataset_name: str | None = None
    norm: str = "l2"

    def __post_init__(self) -> None:
        check_norm(self.norm)
        self.predictions = np.asarray(self.predictions, dtype=np.int64).reshape(-1)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.radius = np.asarray(self.radius, dtype=np.float64).reshape(-1)
        if not len(self.predictions) == len(self.labels) == len(self.radius):
            raise ValueError("predictions, labels and radius must have the same length")
        if len(self.labels) == 0:
            raise ValueError("an evaluation needs at least one example")
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"epsilon must be finite and > 0, got {self.epsilon}")
        radii = {float(r) for r in self.radii if r > 0} | {float(self.epsilon)}
        self.radii = sorted(radii)
        self.dataset_name = self.dataset_name or self.dataset_id

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    @property
    def correct(self) -> np.ndarray:
        return self.predictions == self.labels

    def metrics(self) -> dict[str, float]:
        """The certified-accuracy metric at ``epsilon``, with ``vra@r`` for every radius."""
        return compute_certified_metrics(self.predictions, self.labels, self.radius, self.epsilon, self.radii,
                                         self.norm)

    def certified_accuracy(self, radius: float | Sequence[float]) -> np.ndarray:
        """Fraction of examples that are correct and certified beyond ``radius`` (VRA at that radius)."""
        r = np.asarray(radius, dtype=np.float64)
        hits = self.correct[None, :] & (self.radius[None, :] > r.reshape(-1, 1))
        return hits.mean(axis=1).reshape(r.shape)

    def curve(self, num_points: int = 201) -> dict[str, list[float]]:
        """Certified accuracy on a radius grid from 0 past the largest card radius (and the radii themselves)."""
        finite = self.radius[self.correct & np.isfinite(self.radius)]
        top = max(self.radii) * 1.5
        if finite.size:
            top = max(top, float(np.quantile(finite, 0.99)) * 1.05)
        grid = np.union1d(np.linspace(0.0, top, num_points), np.asarray(self.radii, dtype=np.float64))
        return {"radius": grid.tolist(), "certified_accuracy": self.certified_accuracy(grid).tolist()}

    def to_dict(self) -> dict:
        """JSON-ready summary (metrics and curve; not the per-example arrays)."""
        return {
            "dataset": self.dataset_id, "dataset_name": self.dataset_name, "split": self.dataset_split,
            "num_examples": self.num_examples, "epsilon": self.epsilon, "norm": self.norm,
            "lipschitz_constant": self.lipschitz_constant, "radii": self.radii, "metrics": self.metrics(),
            **self.curve(),
        }


@torch.no_grad()
def evaluate_for_card(
    model,
    data: Iterable,
    *,
    dataset_id: str,
    dataset_split: str = "test",
    epsilon: float | None = None,
    radii: Sequence[float] | None = None,
    batch_size: int = 256,
    limit: int | None = None,
    progress: bool = False,
    dataset_name: str | None = None,
) -> CertifiedEvaluation:
    """Certify ``data`` with ``model.certify`` and keep every example's prediction and radius.

    ``data`` is anything :func:`iter_labelled_batches` accepts. ``radii`` defaults to ``(ε/2, ε, 2ε)``.
    """
    epsilon = float(model.config.epsilon if epsilon is None else epsilon)
    radii = [epsilon / 2, epsilon, 2 * epsilon] if radii is None else list(radii)
    predictions, labels, radius, bound, norm = _certify_all(
        model, iter_labelled_batches(model, data, batch_size, limit), epsilon, progress)
    return CertifiedEvaluation(
        predictions=predictions, labels=labels, radius=radius, epsilon=epsilon, lipschitz_constant=bound,
        dataset_id=dataset_id, dataset_split=dataset_split, radii=radii, dataset_name=dataset_name, norm=norm,
    )


@torch.no_grad()
def evaluate_certified(
    model,
    batches: Iterable,
    epsilon: float | None = None,
    extra_radii: Sequence[float] = (),
    progress: bool = True,
) -> dict[str, float]:
    """Certify ``batches`` (anything :func:`iter_labelled_batches` accepts) and return the metrics, plus
    ``lipschitz_constant`` (the guaranteed bound used), ``num_examples`` and ``norm`` (``"l2"``/``"linf"``: the
    norm of ε and the radii)."""
    epsilon = float(model.config.epsilon if epsilon is None else epsilon)
    predictions, labels, radius, bound, norm = _certify_all(model, iter_labelled_batches(model, batches), epsilon,
                                                            progress)
    metrics = compute_certified_metrics(predictions, labels, radius, epsilon, extra_radii, norm)
    metrics["lipschitz_constant"] = bound
    metrics["norm"] = norm
    metrics["num_examples"] = len(labels)
    return metrics
