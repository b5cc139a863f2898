"""The README's offline default (scikit-learn digits, no network) trains a certified model whose saved folder
loads with AutoModelForImageClassification and certifies."""

import json
import pathlib
import sys

import pytest
import torch
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "configs" / "offline_default.yaml"


def _recipe():
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import train
    finally:
        sys.path.remove(str(ROOT / "recipes"))
    return train


def test_offline_default_config_is_offline_and_selects_on_validation():
    values = yaml.safe_load(CONFIG.read_text())
    assert values["dataset_name"] == "sklearn/digits" and "dataset_dir" not in values
    assert values["metric_for_best_model"] == "vra" and values["load_best_model_at_end"]
    train = _recipe()
    model_args, data_args, training_args = train.parse_arguments([str(CONFIG), "--output_dir", "/tmp/unused"])
    assert training_args.gloro_loss == "gloro_ce" and model_args.epsilon == 0.3
    train_split, validation, test, labels = train.build_datasets(data_args, seed=0)
    assert labels == [str(i) for i in range(10)]
    assert len(train_split) + len(validation) + len(test) == 1797
    assert len(test) == 360 and len(validation) == 144
    # The three splits are disjoint (compare the raw images with their labels).
    def keys(split):
        raw = split.with_format(None)
        return {(p, l) for p, l in zip(raw["pixels"], raw["label"])}
    assert not keys(validation) & keys(test)


@pytest.mark.slow
def test_offline_default_trains_saves_and_certifies(tmp_path, capsys):
    train = _recipe()
    output = tmp_path / "model"
    summary = train.main([str(CONFIG), "--output_dir", str(output), "--num_train_epochs", "12",
                          "--torch_threads", "1"])
    printed = capsys.readouterr().out
    assert "[hf-gloro] test: clean accuracy" in printed and "VRA@0.3" in printed
    assert summary["test_clean_accuracy"] > 0.85
    assert summary["test_vra"] > 0.3
    assert summary["test_vra"] <= summary["test_clean_accuracy"]
    assert summary["certifying_epsilon"] == 0.3
    assert json.loads((output / "test_results.json").read_text())["test_vra"] == summary["test_vra"]

    import hf_gloro  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(str(output))
    assert type(model).__name__ == "GloRoForImageClassification"
    assert model.config.epsilon == 0.3
    assert model.config.lipschitz_constant == pytest.approx(model.lipschitz_constant(), rel=1e-12)
    # Certify the held-out test split again from the saved folder: same VRA as the recipe reported.
    _, _, test, _ = train.build_datasets(train.parse_arguments([str(CONFIG)])[1], seed=0)
    batch = test[: len(test)]
    certificate = model.certify(batch["pixel_values"])
    vra = ((certificate.predictions == batch["labels"]) & certificate.certified).float().mean().item()
    assert vra == pytest.approx(summary["test_vra"], abs=1.5 / len(test))
    # Certificates are sound at the radius they claim: a random perturbation inside the ball keeps the class.
    certified = certificate.certified.nonzero().flatten()[:32]
    noise = torch.randn_like(batch["pixel_values"][certified])
    noise = 0.999 * 0.3 * noise / noise.flatten(1).norm(dim=1)[:, None, None, None]
    perturbed = model.certify(batch["pixel_values"][certified] + noise).predictions
    assert torch.equal(perturbed, certificate.predictions[certified])
