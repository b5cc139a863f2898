"""Model cards for GloRo models: certified metrics in the model-index, the bound and its method, a plot.

The card is rendered from ``model_cards/gloro_model_card.md`` with :meth:`huggingface_hub.ModelCard.from_template`.
Its metadata carries a ``model-index`` with clean accuracy and one verified-robust-accuracy (VRA) entry per
radius (``metric_args``: norm, ε, certifier), so the Hub and ``ModelCard.load`` read them back. Next to the card
go ``certified_accuracy.png`` (certified accuracy vs. L2 radius, from the per-example certified radii) and the
curve's data as ``certified_accuracy.json`` / ``.csv``.

Example:

```python
>>> evaluation = evaluate_for_card(model, load_image_dataset("ylecun/mnist", "test"), dataset_id="ylecun/mnist")
>>> card = write_model_card(model, "out/", evaluation, repo_id="me/gloro-mnist", training="...")
```
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .evaluation import certified_metrics

#: File names written next to the card.
PLOT_FILE = "certified_accuracy.png"
CURVE_JSON_FILE = "certified_accuracy.json"
CURVE_CSV_FILE = "certified_accuracy.csv"

#: ``metric_args["certifier"]`` of every VRA entry.
CERTIFIER = "gloro-global-lipschitz"

TASK_TYPE = "image-classification"
TEMPLATE_NAME = "gloro_model_card.md"


def default_template_path() -> Path:
    """The card template: packaged (``hf_gloro/model_cards/``) or in the source tree (``model_cards/``)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "model_cards" / TEMPLATE_NAME, here.parent / "model_cards" / TEMPLATE_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"model card template {TEMPLATE_NAME!r} not found next to {here}")


# --- evaluation ---------------------------------------------------------------------------------------
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

    def __post_init__(self) -> None:
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
        """:func:`hf_gloro.evaluation.certified_metrics` at ``epsilon``, with ``vra@r`` for every radius."""
        return certified_metrics(self.predictions, self.labels, self.radius, self.epsilon, self.radii)

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
            "num_examples": self.num_examples, "epsilon": self.epsilon, "norm": "l2",
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

    ``data`` is a ``datasets.Dataset`` with an ``Image`` and a ``ClassLabel`` column (images are converted
    with :func:`hf_gloro.data.images_to_pixels`) or an iterable of ``(pixel_values, labels)`` batches.
    ``radii`` defaults to ``(ε/2, ε, 2ε)``.
    """
    from tqdm.auto import tqdm

    epsilon = float(model.config.epsilon if epsilon is None else epsilon)
    radii = [epsilon / 2, epsilon, 2 * epsilon] if radii is None else list(radii)
    batches = _batches(model, data, batch_size, limit)
    device = next(model.parameters()).device
    predictions, labels, radius = [], [], []
    bound = None
    for pixel_values, batch_labels in tqdm(batches, desc="certifying", disable=not progress, leave=False):
        certificate = model.certify(pixel_values.to(device), epsilon)
        bound = certificate.lipschitz_constant
        predictions.append(certificate.predictions.cpu())
        radius.append(certificate.radius.cpu())
        labels.append(torch.as_tensor(batch_labels).cpu())
    if not labels:
        raise ValueError("no examples to evaluate")
    return CertifiedEvaluation(
        predictions=torch.cat(predictions).numpy(), labels=torch.cat(labels).numpy(),
        radius=torch.cat(radius).numpy(), epsilon=epsilon, lipschitz_constant=float(bound),
        dataset_id=dataset_id, dataset_split=dataset_split, radii=radii, dataset_name=dataset_name,
    )


def _batches(model, data, batch_size: int, limit: int | None):
    import datasets

    if not isinstance(data, datasets.Dataset):
        yield from data
        return
    from .data import image_column, images_to_pixels, label_column

    images, label = image_column(data), label_column(data)
    total = len(data) if limit is None else min(limit, len(data))
    config = model.config
    for start in range(0, total, batch_size):
        rows = data[start : min(start + batch_size, total)]
        yield images_to_pixels(rows[images], config.num_channels, config.image_size), torch.tensor(rows[label])


# --- plot and curve data ------------------------------------------------------------------------------
def save_certified_accuracy_curve(evaluation: CertifiedEvaluation, directory: str | os.PathLike) -> dict[str, Path]:
    """Write the plot (PNG), and the curve as JSON and CSV, into ``directory``; return their paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = evaluation.to_dict()
    paths = {"json": directory / CURVE_JSON_FILE, "csv": directory / CURVE_CSV_FILE, "png": directory / PLOT_FILE}
    paths["json"].write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    with open(paths["csv"], "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["radius", "certified_accuracy"])
        writer.writerows(zip(data["radius"], data["certified_accuracy"]))

    # Figure + Agg canvas, not pyplot: no global backend switch, no GUI, safe in threads and notebooks.
    figure = Figure(figsize=(5.5, 3.6), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(data["radius"], [100 * a for a in data["certified_accuracy"]], color="tab:blue",
              label="certified accuracy (VRA)")
    clean = 100 * data["metrics"]["clean_accuracy"]
    axes.axhline(clean, color="tab:gray", linestyle=":", linewidth=1, label=f"clean accuracy {clean:.1f}%")
    vra = 100 * data["metrics"]["vra"]
    axes.axvline(evaluation.epsilon, color="tab:red", linestyle="--", linewidth=1)
    axes.plot([evaluation.epsilon], [vra], "o", color="tab:red", label=f"ε = {evaluation.epsilon:.4g}: {vra:.1f}%")
    axes.set_xlabel("L2 radius (pixel scale, images in [0, 1])")
    axes.set_ylabel("certified accuracy (%)")
    axes.set_xlim(0, data["radius"][-1])
    axes.set_ylim(0, 100)
    axes.grid(alpha=0.3)
    axes.set_title(f"{evaluation.dataset_name} ({evaluation.dataset_split}, {evaluation.num_examples} images)",
                   fontsize=10)
    axes.legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    figure.savefig(paths["png"])
    return paths


# --- card -----------------------------------------------------------------------------------------------
def format_radius(value: float) -> str:
    """``0.1412`` → ``"36/255 ≈ 0.1412"`` when the radius is a whole number of 1/255 steps, else ``"0.1412"``."""
    short = f"{value:.4g}"
    if float(short) == value:  # a short decimal (0.3, 1.58) stays one
        return short
    steps = Fraction(value * 255).limit_denominator(1)
    if 0 < steps < 255 and abs(float(steps) / 255 - value) <= 1e-9 * value:
        return f"{int(steps)}/255 ≈ {short}"
    return short


def eval_results(evaluation: CertifiedEvaluation) -> list[EvalResult]:
    """Model-index entries: clean accuracy, then one VRA entry per radius (norm and ε in ``metric_args``)."""
    metrics = evaluation.metrics()
    common = dict(task_type=TASK_TYPE, task_name="Certified image classification (L2)",
                  dataset_type=evaluation.dataset_id, dataset_name=evaluation.dataset_name,
                  dataset_split=evaluation.dataset_split)
    results = [EvalResult(metric_type="accuracy", metric_name="Clean accuracy",
                          metric_value=metrics["clean_accuracy"], **common)]
    for r in evaluation.radii:
        results.append(EvalResult(
            metric_type="verified_robust_accuracy", metric_name=f"VRA (l2, eps={r:.4g})",
            metric_value=float(evaluation.certified_accuracy(r)),
            metric_args={"norm": "l2", "epsilon": float(r), "certifier": CERTIFIER,
                         "lipschitz_constant": float(evaluation.lipschitz_constant)},
            **common,
        ))
    return results


def build_model_card(
    model,
    evaluation: CertifiedEvaluation | None = None,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    training: str | None = None,
    license: str | None = None,
    remote_code: bool = False,
    tags: Sequence[str] = (),
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """Render the GloRo card for ``model`` (and its evaluation, if any) from the template.

    Raises ``ValueError`` if ``evaluation`` was computed with a different Lipschitz bound than the model's,
    i.e. with other weights: a card must describe the weights it ships with.
    """
    config = model.config
    bound = float(model.lipschitz_constant())
    if evaluation is not None and not math.isclose(evaluation.lipschitz_constant, bound, rel_tol=1e-12):
        raise ValueError(
            f"the evaluation was computed with Lipschitz bound {evaluation.lipschitz_constant!r} but the model's "
            f"weights give {bound!r}: evaluate the model you are describing"
        )
    repo_id = repo_id or getattr(config, "_name_or_path", None) or "path/to/model"
    model_name = model_name or repo_id.rstrip("/").split("/")[-1]
    labels = [config.id2label[i] for i in sorted(config.id2label)]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        license=license,
        tags=list(dict.fromkeys(["gloro", "certified-robustness", "lipschitz", "hf-gloro", *tags])),
        datasets=[evaluation.dataset_id] if evaluation is not None else None,
        metrics=["accuracy", "verified_robust_accuracy"] if evaluation is not None else None,
        model_name=model_name,
        eval_results=eval_results(evaluation) if evaluation is not None else None,
    )
    variables = dict(
        title=model_name,
        summary=(f"A certifiably robust image classifier: every prediction comes with an L2 certificate "
                 f"at ε = {format_radius(float(config.epsilon))} (pixel scale)."),
        repo_id=repo_id,
        epsilon_str=format_radius(float(config.epsilon)),
        lipschitz_constant_repr=repr(bound),
        head_normalization=config.head_normalization,
        backbone=config.backbone,
        num_channels=config.num_channels,
        image_size=config.image_size,
        input_dimension=config.num_channels * config.image_size**2,
        image_mean=[round(float(v), 6) for v in config.image_mean],
        image_std=[round(float(v), 6) for v in config.image_std],
        num_labels=len(labels),
        label_preview=", ".join(labels[:10]) + (", …" if len(labels) > 10 else ""),
        num_parameters=f"{sum(p.numel() for p in model.parameters()):,}",
        training=training or "Training recipe and data were not recorded for this checkpoint.",
        remote_code=remote_code,
        has_evaluation=evaluation is not None,
        plot_file=PLOT_FILE, curve_file=CURVE_JSON_FILE, curve_csv_file=CURVE_CSV_FILE,
    )
    if evaluation is not None:
        metrics = evaluation.metrics()
        variables.update(
            dataset_id=evaluation.dataset_id, dataset_split=evaluation.dataset_split,
            num_examples=evaluation.num_examples, clean_accuracy=metrics["clean_accuracy"],
            rejection_rate=metrics["rejection_rate"], median_certified_radius=metrics["median_certified_radius"],
            vra_rows=[dict(radius_str=format_radius(r), value=float(evaluation.certified_accuracy(r)),
                           is_certifying=math.isclose(r, float(config.epsilon), rel_tol=1e-12))
                      for r in evaluation.radii],
        )
    template = Path(template_path) if template_path is not None else default_template_path()
    return ModelCard.from_template(card_data, template_path=str(template), **variables)


def write_model_card(
    model, directory: str | os.PathLike, evaluation: CertifiedEvaluation | None = None, **card_kwargs
) -> ModelCard:
    """Write ``README.md`` (and, with an evaluation, the plot and its data) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    card = build_model_card(model, evaluation, **card_kwargs)
    if evaluation is not None:
        save_certified_accuracy_curve(evaluation, directory)
    card.save(directory / "README.md")
    return card
