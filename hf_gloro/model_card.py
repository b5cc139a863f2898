"""Model cards for GloRo models: render the card (model-index, the bound and its method) and plot the curve.

This module only renders and plots; the figures come from :mod:`hf_gloro.evaluation`
(:class:`~hf_gloro.evaluation.CertifiedEvaluation`, computed with the certified-accuracy metric module).

The card is rendered from ``model_cards/gloro_model_card.md`` with :meth:`huggingface_hub.ModelCard.from_template`.
Its metadata carries a ``model-index`` with clean accuracy and one verified-robust-accuracy (VRA) entry per
radius (``metric_args``: norm, ε, certifier), so the Hub and ``ModelCard.load`` read them back. Next to the card
go ``certified_accuracy.png`` (certified accuracy vs. radius in the model's norm, L2 or L∞, from the per-example certified radii) and the
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
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

# The evaluation itself lives in hf_gloro.evaluation; re-exported here for existing imports.
from .evaluation import NORM_LABELS, CertifiedEvaluation, evaluate_for_card  # noqa: F401

#: File names written next to the card.
PLOT_FILE = "certified_accuracy.png"
CURVE_JSON_FILE = "certified_accuracy.json"
CURVE_CSV_FILE = "certified_accuracy.csv"

#: ``metric_args["certifier"]`` of every VRA entry.
CERTIFIER = "gloro-global-lipschitz"

#: What ``recipes/train.py`` records next to the model: the command and every argument of the run.
TRAINING_RECORD_FILE = "training_recipe.json"
#: transformers' ``Trainer.save_metrics("all", ...)`` file, read for the final figures of a run.
ALL_RESULTS_FILE = "all_results.json"

TASK_TYPE = "image-classification"
TEMPLATE_NAME = "gloro_model_card.md"


def default_template_path() -> Path:
    """The card template: packaged (``hf_gloro/model_cards/``) or in the source tree (``model_cards/``)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "model_cards" / TEMPLATE_NAME, here.parent / "model_cards" / TEMPLATE_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"model card template {TEMPLATE_NAME!r} not found next to {here}")


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
    axes.set_xlabel(f"{NORM_LABELS[evaluation.norm]} radius (pixel scale, images in [0, 1])")
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


# --- training record ----------------------------------------------------------------------------------
def read_training_record(directory: str | os.PathLike) -> tuple[dict | None, dict | None]:
    """``(training_recipe.json, all_results.json)`` of a model folder written by the recipe (``None`` if absent)."""
    found = []
    for name in (TRAINING_RECORD_FILE, ALL_RESULTS_FILE):
        path = Path(directory) / name
        try:
            found.append(json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None)
        except (OSError, ValueError):
            found.append(None)
    return found[0], found[1]


def describe_training(record: dict, results: dict | None = None) -> str:
    """The card's "Training" section (markdown) from a recipe record and, optionally, its final results."""
    model, data, args = record.get("model_args", {}), record.get("data_args", {}), record.get("training_args", {})
    command = " ".join(["python", record.get("recipe", "recipes/train.py"), *record.get("command_line", [])])
    lines = [f"Trained with hf-gloro's certified-training recipe: `{command}`.", ""]
    dataset = data.get("dataset_name", "?")
    if dataset == "sklearn/digits":
        split = (f"scikit-learn's bundled digits at {data.get('image_size')}×{data.get('image_size')}, "
                 f"a stratified {data.get('test_size', 0.2):.0%} test carve (seed {args.get('seed', 0)})")
    else:
        split = f"`{dataset}` (train split `{data.get('train_split', 'train')}`, test split `{data.get('test_split')}`)"
        if data.get("dataset_dir"):
            split += " read from a local copy in the Hub layout"
    validation = data.get("validation_size")
    if validation is not None:
        share = f"{validation:.0%} of the training images" if validation < 1 else f"{validation:g} images"
        split += f"; validation ({share}) carved from the training split for checkpoint selection"
    lines.append(f"- **Data:** {split}")
    augmentation = [f"random crop (padding {data['crop_padding']})"] if data.get("crop_padding") else []
    augmentation += ["horizontal flips"] if data.get("horizontal_flip") else []
    if augmentation:
        lines.append(f"- **Augmentation:** {', '.join(augmentation)}")
    epsilon = format_radius(float(model.get("epsilon", 0)))
    norm = NORM_LABELS.get(model.get("norm", "l2"), model.get("norm"))
    lines.append(f"- **Model:** `{model.get('backbone')}`, certifying ε = {epsilon} ({norm}), "
                 f"{model.get('power_iterations')} power iterations per step, head normalisation "
                 f"`{model.get('head_normalization')}`")
    loss = args.get("gloro_loss", "gloro_ce")
    objective = (f"`{loss}` at ε_train = {args.get('train_epsilon_multiplier', 1.0):g}·ε, schedule "
                 f"`{args.get('epsilon_schedule', 'fixed')}`")
    if args.get("epsilon_schedule", "fixed") != "fixed":
        objective += f" from {args.get('epsilon_start_fraction'):g}·ε_train"
    if loss == "trades":
        objective += f"; TRADES λ = {args.get('trades_lambda'):g} (`{args.get('trades_lambda_schedule')}`)"
    lines.append(f"- **Objective:** {objective}")
    lr = f"{args.get('learning_rate'):g}"
    if args.get("lr_decay_after_half_to") is not None:
        lr += f", constant for half of training then decaying exponentially to {args['lr_decay_after_half_to']:g}"
    else:
        lr += f" (`{args.get('lr_scheduler_type')}` schedule)"
    length = (f"{args['max_steps']} steps" if args.get("max_steps", -1) and args.get("max_steps", -1) > 0
              else f"{args.get('num_train_epochs'):g} epochs")
    lines.append(f"- **Optimisation:** `{args.get('optim')}`, learning rate {lr}, batch "
                 f"{args.get('per_device_train_batch_size')} per device, {length}, weight decay "
                 f"{args.get('weight_decay', 0):g}, seed {args.get('seed')}")
    if args.get("load_best_model_at_end"):
        lines.append(f"- **Selection:** the checkpoint with the best validation `{args.get('metric_for_best_model')}`")
    if results:
        done = [f"{results['epochs']:.1f} epochs" if "epochs" in results else None,
                f"{results['global_step']} optimizer steps" if "global_step" in results else None,
                f"{results['wall_time_s']:.0f} s wall time" if "wall_time_s" in results else None]
        done = [item for item in done if item]
        if done:
            lines.append(f"- **Run:** {', '.join(done)}")
    lines += ["", f"Every argument of the run is in [`{TRAINING_RECORD_FILE}`]({TRAINING_RECORD_FILE})."]
    return "\n".join(lines)


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
    norm = evaluation.norm
    common = dict(task_type=TASK_TYPE, task_name=f"Certified image classification ({NORM_LABELS[norm]})",
                  dataset_type=evaluation.dataset_id, dataset_name=evaluation.dataset_name,
                  dataset_split=evaluation.dataset_split)
    results = [EvalResult(metric_type="accuracy", metric_name="Clean accuracy",
                          metric_value=metrics["clean_accuracy"], **common)]
    for r in evaluation.radii:
        results.append(EvalResult(
            metric_type="verified_robust_accuracy", metric_name=f"VRA ({norm}, eps={r:.4g})",
            metric_value=float(evaluation.certified_accuracy(r)),
            metric_args={"norm": norm, "epsilon": float(r), "certifier": CERTIFIER,
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
    norm = getattr(config, "norm", "l2")
    if evaluation is not None and evaluation.norm != norm:
        raise ValueError(f"the evaluation's certificates are {evaluation.norm} but the model certifies {norm}")
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
        summary=(f"A certifiably robust image classifier: every prediction comes with an {NORM_LABELS[norm]} "
                 "certificate "
                 f"at ε = {format_radius(float(config.epsilon))} (pixel scale)."),
        repo_id=repo_id,
        epsilon_str=format_radius(float(config.epsilon)),
        norm=norm, norm_label=NORM_LABELS[norm],
        lipschitz_constant_repr=repr(bound),
        head_normalization=config.head_normalization,
        backbone=config.backbone,
        adaptation=(config.adaptation_description() if hasattr(config, "adaptation_description") else None),
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
