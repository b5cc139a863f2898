"""Model card: model-index with VRA per radius reloads, the plot and its data match the evaluation.

Also home of :func:`trained_mnist_checkpoint`, the small trained GloRo net that the sharing tests (card, Hub,
CLI, pipeline) use: trained once per session with a few Adam steps on real MNIST images.
"""

import csv
import json
import math
import pathlib

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

import hf_gloro
from hf_gloro.data import images_to_pixels, load_image_dataset
from hf_gloro.model_card import (
    CERTIFIER,
    CertifiedEvaluation,
    build_model_card,
    evaluate_for_card,
    format_radius,
    write_model_card,
)

EPSILON = 0.3
EVAL_LIMIT = 256


def trained_mnist_checkpoint(root: pathlib.Path, shared_data: pathlib.Path, steps: int = 40) -> pathlib.Path:
    """Train ``gloro_2c2f`` (ε = 0.3) for ``steps`` Adam steps on MNIST and save it under ``root`` (cached)."""
    directory = root / "gloro-mnist-checkpoint"
    if (directory / "model.safetensors").is_file():
        return directory
    torch.manual_seed(0)
    config = hf_gloro.GloRoConfig(backbone="gloro_2c2f", num_channels=1, image_size=28, epsilon=EPSILON,
                                  power_iterations=2, id2label={i: str(i) for i in range(10)})
    model = hf_gloro.GloRoForImageClassification(config).train()
    rows = load_image_dataset("ylecun/mnist", "train", str(shared_data))[:2048]
    x, y = images_to_pixels(rows["image"], 1, 28), torch.tensor(rows["label"])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        index = torch.randint(0, len(x), (64,))
        loss = model(x[index], labels=y[index]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(directory)
    hf_gloro.gloro_image_processor(1, 28).save_pretrained(directory)
    return directory


def write_mnist_pngs(folder: pathlib.Path, shared_data: pathlib.Path, count: int = 6) -> list[tuple[pathlib.Path, int]]:
    """Write ``count`` MNIST test digits as PNG files; return ``(path, label)`` pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    test = load_image_dataset("ylecun/mnist", "test", str(shared_data))
    written = []
    for index in range(count):
        path = folder / f"digit_{index:02d}.png"
        test[index]["image"].save(path)
        written.append((path, int(test[index]["label"])))
    return written


@pytest.fixture(scope="module")
def model(tmp_path_factory, shared_data):
    directory = trained_mnist_checkpoint(tmp_path_factory.getbasetemp(), shared_data)
    return hf_gloro.GloRoForImageClassification.from_pretrained(directory)


@pytest.fixture(scope="module")
def evaluation(model, shared_data):
    test = load_image_dataset("ylecun/mnist", "test", str(shared_data))
    return evaluate_for_card(model, test, dataset_id="ylecun/mnist", dataset_split="test", limit=EVAL_LIMIT,
                             radii=[0.15, 0.3, 0.6, 1.0], batch_size=128)


def test_evaluation_matches_certify_and_is_not_trivial(model, evaluation, shared_data):
    rows = load_image_dataset("ylecun/mnist", "test", str(shared_data))[:EVAL_LIMIT]
    certificate = model.certify(images_to_pixels(rows["image"], 1, 28))
    assert evaluation.num_examples == EVAL_LIMIT
    np.testing.assert_array_equal(evaluation.predictions, certificate.predictions.numpy())
    np.testing.assert_array_equal(evaluation.radius, certificate.radius.numpy())
    np.testing.assert_array_equal(evaluation.labels, np.asarray(rows["label"]))
    assert evaluation.lipschitz_constant == model.lipschitz_constant()
    metrics = evaluation.metrics()
    # The tiny model must have both certified and rejected points, or the checks below prove little.
    assert 0 < metrics["vra"] < metrics["clean_accuracy"] <= 1
    assert metrics["vra"] == pytest.approx(np.mean(evaluation.correct & certificate.certified.numpy()), abs=1 / 256)


def test_card_model_index_reloads_with_vra_per_radius(model, evaluation, tmp_path):
    write_model_card(model, tmp_path, evaluation, repo_id="gloro-org/mnist", training="40 Adam steps on MNIST")
    card = ModelCard.load(tmp_path / "README.md")
    results = card.data.eval_results
    assert card.data.model_name == "mnist" and card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-classification" and "ylecun/mnist" in card.data.datasets
    clean = [r for r in results if r.metric_type == "accuracy"]
    vra = {r.metric_args["epsilon"]: r for r in results if r.metric_type == "verified_robust_accuracy"}
    assert len(clean) == 1 and clean[0].metric_value == evaluation.metrics()["clean_accuracy"]
    assert sorted(vra) == [0.15, 0.3, 0.6, 1.0]
    for radius, result in vra.items():
        assert result.metric_args["norm"] == "l2" and result.metric_args["certifier"] == CERTIFIER
        assert result.metric_args["lipschitz_constant"] == model.lipschitz_constant()
        assert result.metric_value == pytest.approx(float(np.mean(evaluation.correct & (evaluation.radius > radius))))
        assert result.dataset_type == "ylecun/mnist" and result.dataset_split == "test"
        assert result.task_type == "image-classification"
    assert vra[0.3].metric_value == evaluation.metrics()["vra"]
    # VRA can only fall as the radius grows.
    values = [vra[r].metric_value for r in sorted(vra)]
    assert values == sorted(values, reverse=True)

    text = card.text
    assert repr(model.lipschitz_constant()) in text and "relative slack of **1e-6**" in text
    assert "float64" in text and "circular" in text and "product over the chain" in text
    assert "40 Adam steps on MNIST" in text
    assert 'GloRoForImageClassification.from_pretrained("gloro-org/mnist")' in text and "model.certify(" in text
    assert "L2 only" in text and "rounding error of the forward pass" in text and "preprocessing outside the model" in text
    assert "![Certified accuracy vs. L2 radius](certified_accuracy.png)" in text


def test_plot_exists_and_its_data_matches_the_evaluation(model, evaluation, tmp_path):
    write_model_card(model, tmp_path, evaluation)
    png = tmp_path / "certified_accuracy.png"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
    data = json.loads((tmp_path / "certified_accuracy.json").read_text())
    radius, accuracy = np.asarray(data["radius"]), np.asarray(data["certified_accuracy"])
    # Recompute the curve from the per-example radii, independently of the module's code.
    expected = [np.mean((evaluation.predictions == evaluation.labels) & (evaluation.radius > r)) for r in radius]
    np.testing.assert_allclose(accuracy, expected, rtol=0, atol=1e-15)
    assert radius[0] == 0 and accuracy[0] == pytest.approx(evaluation.metrics()["clean_accuracy"], abs=2 / 256)
    assert np.all(np.diff(radius) > 0) and np.all(np.diff(accuracy) <= 0)
    assert accuracy[radius == EPSILON][0] == data["metrics"]["vra"] == evaluation.metrics()["vra"]
    assert data["num_examples"] == EVAL_LIMIT and data["lipschitz_constant"] == model.lipschitz_constant()
    with open(tmp_path / "certified_accuracy.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["radius", "certified_accuracy"]
    np.testing.assert_array_equal(np.asarray(rows[1:], dtype=float), np.stack([radius, accuracy], axis=1))


def test_card_refuses_an_evaluation_of_other_weights(model, evaluation):
    other = hf_gloro.GloRoForImageClassification(model.config).eval()
    with pytest.raises(ValueError, match="evaluate the model you are describing"):
        build_model_card(other, evaluation)


def test_card_without_evaluation_has_no_model_index(model, tmp_path):
    card = write_model_card(model, tmp_path, None, repo_id="gloro-org/mnist")
    assert not (tmp_path / "certified_accuracy.png").exists()
    reloaded = ModelCard.load(tmp_path / "README.md")
    assert not reloaded.data.eval_results
    assert "No evaluation was attached" in card.text and repr(model.lipschitz_constant()) in card.text


def test_evaluation_validates_its_inputs():
    with pytest.raises(ValueError, match="same length"):
        CertifiedEvaluation([0, 1], [0], [0.1, 0.2], epsilon=0.3, lipschitz_constant=1.0, dataset_id="x")
    with pytest.raises(ValueError, match="epsilon"):
        CertifiedEvaluation([0], [0], [0.1], epsilon=math.nan, lipschitz_constant=1.0, dataset_id="x")
    evaluation = CertifiedEvaluation([0, 1, 1], [0, 1, 0], [0.5, 0.2, 0.9], epsilon=0.3, lipschitz_constant=1.0,
                                     dataset_id="x", radii=[0.1])
    assert evaluation.radii == [0.1, 0.3]
    np.testing.assert_array_equal(evaluation.certified_accuracy([0.0, 0.1, 0.3, 0.5]), [2 / 3, 2 / 3, 1 / 3, 0])


def test_format_radius_names_multiples_of_1_over_255():
    assert format_radius(36 / 255) == "36/255 ≈ 0.1412"
    assert format_radius(0.3) == "0.3"
    assert format_radius(1.58) == "1.58"
    assert format_radius(0.6) == "0.6"  # = 153/255, but a short decimal reads better
    assert format_radius(72 / 255) == "72/255 ≈ 0.2824" and format_radius(0.123456789) == "0.1235"
