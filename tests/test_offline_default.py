"""The README's offline default (scikit-learn digits, no network) trains a certified model whose saved folder
loads with AutoModelForImageClassification and certifies."""

import json
import os
import pathlib
import re
import subprocess
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


PROGRESS_LINE = re.compile(r"\d+%\|.*\|\s*\d+/\d+")  # tqdm: " 45%|████      | 567/1260 [...]"


def _run_recipe(*args, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "recipes" / "train.py"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """The README's main command (12 epochs instead of 60), run as a user runs it; its folder and console."""
    output = tmp_path_factory.mktemp("main-job") / "offline_default"
    result = _run_recipe(CONFIG, "--num_train_epochs", "12", "--output_dir", output)
    assert result.returncode == 0, result.stderr[-4000:]
    return output, result


@pytest.mark.slow
def test_main_job_console_is_a_progress_bar_and_a_short_log(main_job):
    _, result = main_job
    lines = [line for line in (result.stdout + "\n" + result.stderr).replace("\r", "\n").splitlines() if line.strip()]
    bars = [line for line in lines if PROGRESS_LINE.search(line)]
    others = [line for line in lines if not PROGRESS_LINE.search(line) and line.strip() != "\x1b[A"
              and not set(line.strip()) <= {" ", "\x1b", "[", "A"}]
    assert any("/252" in line for line in bars), bars[-3:]  # the training bar (12 epochs × 21 steps)
    assert len(others) <= 20, "\n".join(others)
    assert not any("Writing model shards" in line for line in lines)
    # Training logs are floats, not strings: {'loss': 1.234, ...}, not {'loss': '1.234', ...}.
    logs = [line for line in others if line.startswith("{'loss'")]
    assert logs and all(re.search(r"'loss': \d", line) for line in logs), logs
    assert any(line.startswith("[hf-gloro] test: clean accuracy") and "VRA@0.3" in line for line in others)


@pytest.mark.slow
def test_main_job_folder_is_complete(main_job):
    output, _ = main_job
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md", "certified_accuracy.png",
                 "train_results.json", "eval_results.json", "test_results.json", "all_results.json",
                 "trainer_state.json", "training_recipe.json", "eval_metrics.csv"):
        assert (output / name).is_file(), name
    summary = json.loads((output / "all_results.json").read_text())
    test = json.loads((output / "test_results.json").read_text())
    assert test["test_vra"] == summary["test_vra"] and 0.3 < test["test_vra"] <= test["test_clean_accuracy"]
    assert test["test_clean_accuracy"] > 0.85
    assert json.loads((output / "eval_results.json").read_text())["eval_vra"] == summary["eval_vra"]
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 252
    record = json.loads((output / "training_recipe.json").read_text())
    assert record["data_args"]["dataset_name"] == "sklearn/digits" and record["training_args"]["num_train_epochs"] == 12

    from huggingface_hub import ModelCard

    card = ModelCard.load(output / "README.md")
    results = {(r.metric_type, (r.metric_args or {}).get("epsilon")): r for r in card.data.eval_results}
    assert results[("verified_robust_accuracy", 0.3)].metric_value == test["test_vra"]
    assert results[("accuracy", None)].metric_value == test["test_clean_accuracy"]
    assert {r.dataset_type for r in card.data.eval_results} == {"sklearn/digits"}
    assert "Trained with hf-gloro's certified-training recipe" in card.text and "offline_default.yaml" in card.text
    assert "--num_train_epochs 12" in card.text and "not recorded" not in card.text


@pytest.mark.slow
def test_main_job_folder_works_with_pipelines_cli_and_card(main_job, tmp_path, capsys):
    output, _ = main_job
    import hf_gloro  # noqa: F401  (registers the Auto classes)
    from PIL import Image
    from transformers import AutoModelForImageClassification, pipeline

    from hf_gloro.cli import main as cli

    model = AutoModelForImageClassification.from_pretrained(str(output))
    assert type(model).__name__ == "GloRoForImageClassification"
    assert model.config.lipschitz_constant == pytest.approx(model.lipschitz_constant(), rel=1e-12)
    # Two test digits as 16×16 PNG files, exactly the pixels the recipe evaluated.
    train = _recipe()
    _, _, test, _ = train.build_datasets(train.parse_arguments([str(CONFIG)])[1], seed=0)
    batch = test[:2]
    paths = []
    for index, pixels in enumerate(batch["pixel_values"]):
        path = tmp_path / f"digit_{index}.png"
        Image.fromarray((pixels[0] * 255).round().to(torch.uint8).numpy(), mode="L").save(path)
        paths.append(str(path))
    certificate = model.certify(batch["pixel_values"])

    plain = pipeline("image-classification", model=str(output))
    assert plain(paths[0])[0]["label"] == model.config.id2label[int(certificate.predictions[0])]
    certified = pipeline("certified-image-classification", model=str(output))
    results = certified(paths, batch_size=2)
    assert [r[0]["radius"] for r in results] == pytest.approx(certificate.radius.tolist(), rel=1e-5)
    assert [r[0]["certified"] for r in results] == certificate.certified.tolist()

    assert cli(["certify", str(output), *paths, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [row["prediction"] for row in rows] == certificate.predictions.tolist()

    # `hf-gloro card` on the folder, on the data it was trained with: the recorded test carve, same VRA.
    assert cli(["card", str(output), "--dataset", "sklearn/digits", "--output", str(tmp_path / "card"),
                "--quiet"]) == 0
    capsys.readouterr()
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "card" / "README.md")
    test_vra = json.loads((output / "test_results.json").read_text())["test_vra"]
    vra = [r.metric_value for r in card.data.eval_results if (r.metric_args or {}).get("epsilon") == 0.3]
    assert vra == [test_vra]
    assert "Trained with hf-gloro's certified-training recipe" in card.text
    assert (tmp_path / "card" / "certified_accuracy.png").stat().st_size > 1000


def test_help_starts_with_usage_and_the_yaml_argument(capsys):
    train = _recipe()
    with pytest.raises(SystemExit) as exit_info:
        train.parse_arguments(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    lines = text.splitlines()
    assert lines[0].startswith("usage:") and "CONFIG.yaml" in lines[0]
    assert "CONFIG.yaml" in "\n".join(lines[:8]) and len(lines) < 120
    assert "--gloro_loss" in text and "--dataset_name" in text and "--num_train_epochs" in text


@pytest.mark.parametrize("argv,message", [
    (["missing.yaml"], "config file 'missing.yaml' does not exist"),
    (["{config}", "--gloro_loss", "hinge"], "unknown GloRo loss 'hinge'"),
    (["{bad}"], "unknown keys in the config file"),
    (["{config}", "--dataset_name", "ylecun/mnist", "--dataset_dir", "{missing}"], "does not exist"),
])
def test_recipe_errors_are_one_line(argv, message, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epsilon: 0.3\nnot_an_option: 1\n")
    argv = [a.format(config=CONFIG, bad=bad, missing=tmp_path / "nowhere") for a in argv]
    train = _recipe()
    assert train.cli(argv + ["--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ": error: " in err[0] and message in err[0], err
    assert "Traceback" not in err[0]
    with pytest.raises(Exception):  # --debug: the traceback
        train.cli(argv + ["--output_dir", str(tmp_path / "out"), "--debug"])
