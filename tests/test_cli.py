"""The ``hf-gloro`` command: certify (folders, files, data sets), verify (tampering), card, clear errors.

Error paths and input checks use a tiny untrained 8×8 model and generated images: they need no MNIST.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file, save_file
from test_model_card import trained_mnist_checkpoint, write_mnist_pngs

import hf_gloro
from hf_gloro.cli import main


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """An untrained 1×8×8 GloRo model saved with its image processor (no data set needed)."""
    from gloro_helpers import tiny_model

    from hf_gloro.image_processing import image_processor_for_config

    directory = tmp_path_factory.mktemp("tiny-model")
    model = tiny_model().eval()
    model.save_pretrained(directory)
    image_processor_for_config(model.config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_pngs(tmp_path_factory):
    """Three 8×8 grayscale digits (scikit-learn) as PNG files."""
    import numpy as np
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("tiny-pngs")
    paths = []
    for index, image in enumerate(load_digits().images[:3]):
        path = folder / f"digit_{index}.png"
        Image.fromarray(np.round(image * 255 / 16).astype(np.uint8), mode="L").save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shared_data):
    return trained_mnist_checkpoint(tmp_path_factory.getbasetemp(), shared_data)


@pytest.fixture(scope="module")
def model(checkpoint):
    return hf_gloro.GloRoForImageClassification.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory, shared_data):
    return write_mnist_pngs(tmp_path_factory.mktemp("pngs"), shared_data, count=6)


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_clear_error(status, out, err, message):
    assert status == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-gloro: error: ") and message in lines[0], err
    assert "Traceback" not in err


def _expected(model, paths):
    processor = hf_gloro.gloro_image_processor(1, 28)
    images = [Image.open(p).convert("L") for p in paths]
    return model.certify(processor(images=images, return_tensors="pt")["pixel_values"])


# --- certify ----------------------------------------------------------------------------------------------
def test_certify_folder_prints_a_row_per_image(capsys, checkpoint, model, pngs):
    folder = pngs[0][0].parent
    status, out, _ = run(capsys, "certify", checkpoint, folder, "--json")
    assert status == 0
    report = json.loads(out)
    rows = report["results"]
    assert [row["source"] for row in rows] == [str(p) for p, _ in pngs]
    expected = _expected(model, [p for p, _ in pngs])
    assert [row["prediction"] for row in rows] == expected.predictions.tolist()
    assert [row["certified"] for row in rows] == expected.certified.tolist()
    assert [row["radius"] for row in rows] == expected.radius.tolist()
    assert all(row["label"] == model.config.id2label[row["prediction"]] for row in rows)
    assert report["epsilon"] == 0.3 and report["lipschitz_constant"] == model.lipschitz_constant()
    assert report["num_certified"] == int(expected.certified.sum())

    status, out, _ = run(capsys, "certify", checkpoint, folder)
    lines = out.strip().splitlines()
    assert status == 0 and lines[0].split() == ["image", "prediction", "certified", "radius"]
    assert len(lines) == 1 + len(pngs) + 1 and lines[-1].startswith(f"{report['num_certified']}/{len(pngs)} certified")
    for line, (path, _), radius in zip(lines[1:], pngs, expected.radius.tolist()):
        assert line.startswith(str(path)) and line.endswith(f"{radius:.4f}")


def test_certify_epsilon_changes_the_certificates_not_the_radii(capsys, checkpoint, model, pngs):
    paths = [p for p, _ in pngs]
    status, out, _ = run(capsys, "certify", checkpoint, *paths, "--json", "--epsilon", "1e-6", "--batch-size", "4")
    rows = json.loads(out)["results"]
    expected = _expected(model, paths)
    assert status == 0 and [row["radius"] for row in rows] == expected.radius.tolist()
    assert [row["certified"] for row in rows] == (expected.radius > 1e-6).tolist()


@pytest.mark.parametrize("form", ["parquet_spec", "folder"])
def test_certify_dataset_inputs(capsys, checkpoint, model, shared_data, form):
    spec = f"parquet:{shared_data / 'mnist'}:test" if form == "parquet_spec" else shared_data / "mnist"
    status, out, _ = run(capsys, "certify", checkpoint, spec, "--split", "test", "--limit", "5", "--json")
    rows = json.loads(out)["results"]
    test = hf_gloro.data.load_image_dataset("ylecun/mnist", "test", str(shared_data))
    assert status == 0 and [row["index"] for row in rows] == [0, 1, 2, 3, 4]
    assert [row["true_label"] for row in rows] == test[:5]["label"]
    assert all(row["correct"] == (row["prediction"] == row["true_label"]) for row in rows)


def test_wrong_size_or_mode_is_refused_unless_resize_or_convert(capsys, tiny_checkpoint, tiny_pngs, tmp_path):
    big, rgb = tmp_path / "big.png", tmp_path / "rgb.png"
    Image.open(tiny_pngs[0]).resize((12, 12)).save(big)
    Image.open(tiny_pngs[0]).convert("RGB").save(rgb)
    assert_clear_error(*run(capsys, "certify", tiny_checkpoint, big),
                       f"image '{big}' is 12×12 but the model takes 8×8 images")
    assert_clear_error(*run(capsys, "certify", tiny_checkpoint, rgb),
                       f"image '{rgb}' is RGB but the model takes grayscale")
    # With the options, the row says that the certificate is about the processed image.
    status, out, _ = run(capsys, "certify", tiny_checkpoint, big, rgb, tiny_pngs[0], "--resize", "--convert",
                         "--json")
    rows = json.loads(out)["results"]
    assert status == 0 and [row["source"] for row in rows] == [str(big), str(rgb), str(tiny_pngs[0])]
    assert rows[0]["preprocessing"].startswith("resized from 12×12 to 8×8")
    assert rows[1]["preprocessing"].startswith("converted from RGB to L")
    assert all("the certificate is about this processed image" in row["preprocessing"] for row in rows[:2])
    assert "preprocessing" not in rows[2]
    # The resized copy is certified as the bilinear 8×8 image (float32 rounding differs between batch sizes).
    model = hf_gloro.GloRoForImageClassification.from_pretrained(tiny_checkpoint)
    resized = Image.open(big).resize((8, 8), Image.BILINEAR)
    pixels = hf_gloro.gloro_image_processor(1, 8)(images=[resized], return_tensors="pt", do_resize=False)
    assert rows[0]["radius"] == pytest.approx(model.certify(pixels["pixel_values"]).radius.item(), rel=1e-4)
    status, out, _ = run(capsys, "certify", tiny_checkpoint, big, "--resize")
    assert status == 0 and f"{big} *" in out and "certificates are about the processed images" in out


def test_an_unreadable_file_is_reported_and_skipped(capsys, tiny_checkpoint, tiny_pngs, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(tiny_pngs[0], folder / "a.png")
    (folder / "b.png").write_text("not an image")
    shutil.copy(tiny_pngs[1], folder / "c.png")
    status, out, err = run(capsys, "certify", tiny_checkpoint, folder, "--json")
    report = json.loads(out)
    assert status == 0
    assert [row["source"] for row in report["results"]] == [str(folder / "a.png"), str(folder / "c.png")]
    assert [entry["source"] for entry in report["skipped"]] == [str(folder / "b.png")]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "b.png" in lines[0] and "cannot read image" in lines[0] and "skipped" in lines[0]


@pytest.mark.parametrize("case,message", [
    ("missing_model", "does not exist"), ("not_a_model", "not a saved model"), ("missing_image", "no such file"),
    ("unreadable", "cannot read image"), ("empty_folder", "contains no images"), ("bad_epsilon", "--epsilon"),
    ("missing_parquet", "does not exist"), ("bad_split", "splits 'train' and 'test'"),
])
def test_bad_inputs_give_one_line_errors(capsys, tiny_checkpoint, tmp_path, tiny_pngs, case, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.png").write_text("not an image")
    argv = {
        "missing_model": ["certify", tmp_path / "nope", tiny_pngs[0]],
        "not_a_model": ["certify", tmp_path / "empty", tiny_pngs[0]],
        "missing_image": ["certify", tiny_checkpoint, tmp_path / "nope.png"],
        "unreadable": ["certify", tiny_checkpoint, tmp_path / "broken.png"],
        "empty_folder": ["certify", tiny_checkpoint, tmp_path / "empty"],
        "bad_epsilon": ["certify", tiny_checkpoint, tiny_pngs[0], "--epsilon", "-1"],
        "missing_parquet": ["certify", tiny_checkpoint, f"parquet:{tmp_path / 'nope'}:test"],
        "bad_split": ["card", tiny_checkpoint, "--dataset", "sklearn/digits", "--split", "validation"],
    }[case]
    assert_clear_error(*run(capsys, *argv), message)


def test_console_entry_point_reports_errors_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hf_gloro.cli", "verify", str(tmp_path / "missing")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == f"hf-gloro: error: model folder '{tmp_path / 'missing'}' does not exist"


# --- verify -----------------------------------------------------------------------------------------------
@pytest.fixture
def copy(tiny_checkpoint, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, target)
    return target


@pytest.fixture(scope="module")
def tiny_loaded(tiny_checkpoint):
    return hf_gloro.GloRoForImageClassification.from_pretrained(tiny_checkpoint)


def test_verify_passes_on_a_clean_checkpoint(capsys, copy, tiny_loaded):
    model = tiny_loaded
    status, out, _ = run(capsys, "verify", copy)
    assert status == 0 and "OK" in out
    assert f"recorded Lipschitz bound:   {model.lipschitz_constant()!r}" in out
    assert f"recomputed from the weights: {model.lipschitz_constant()!r}" in out


def test_verify_fails_when_the_recorded_bound_was_lowered(capsys, copy, tiny_loaded):
    model = tiny_loaded
    config = json.loads((copy / "config.json").read_text())
    config["lipschitz_constant"] *= 0.999
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf_gloro.InconsistentCheckpointError):  # loading refuses it ...
        hf_gloro.GloRoForImageClassification.from_pretrained(copy)
    status, out, _ = run(capsys, "verify", copy, "--json")  # ... verify reports it
    report = json.loads(out)
    assert status == 1 and not report["ok"] and "below" in report["message"]
    assert report["recorded"] == config["lipschitz_constant"] and report["recomputed"] == model.lipschitz_constant()
    # certify refuses it too, with one line
    assert_clear_error(*run(capsys, "certify", copy, copy), "tampered or inconsistent")


@pytest.mark.parametrize("scale,direction", [(1.5, "below"), (0.5, "above")])
def test_verify_fails_when_weights_were_altered_after_saving(capsys, copy, scale, direction):
    weights = load_file(copy / "model.safetensors")
    key = next(k for k in weights if k.endswith("features.0.weight"))
    weights[key] = weights[key] * scale
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    status, out, _ = run(capsys, "verify", copy)
    assert status == 1 and "MISMATCH" in out and direction in out


def test_verify_fails_without_a_recorded_bound(capsys, copy):
    config = json.loads((copy / "config.json").read_text())
    config["lipschitz_constant"] = None
    (copy / "config.json").write_text(json.dumps(config))
    status, out, _ = run(capsys, "verify", copy)
    assert status == 1 and "nothing to verify" in out


# --- card -------------------------------------------------------------------------------------------------
def test_card_command_writes_card_and_plot(capsys, checkpoint, model, shared_data, tmp_path):
    status, out, _ = run(capsys, "card", checkpoint, "--dataset", f"parquet:{shared_data / 'mnist'}:test",
                         "--limit", "64", "--radii", "0.3", "0.5",
                         "--output", tmp_path, "--training", "40 Adam steps", "--quiet")
    assert status == 0 and "VRA" in out
    card = ModelCard.load(tmp_path / "README.md")
    test = hf_gloro.data.load_image_dataset("ylecun/mnist", "test", str(shared_data))
    evaluation = hf_gloro.model_card.evaluate_for_card(model, test, dataset_id="ylecun/mnist", limit=64,
                                                       radii=[0.3, 0.5])
    values = {(r.metric_type, (r.metric_args or {}).get("epsilon")): r.metric_value for r in card.data.eval_results}
    assert values == {("accuracy", None): evaluation.metrics()["clean_accuracy"],
                      ("verified_robust_accuracy", 0.3): evaluation.metrics()["vra"],
                      ("verified_robust_accuracy", 0.5): evaluation.metrics()["vra@0.5"]}
    # the local copy of MNIST is named by its Hub id in the model-index
    assert {(r.dataset_type, r.dataset_split) for r in card.data.eval_results} == {("ylecun/mnist", "test")}
    assert (tmp_path / "certified_accuracy.png").stat().st_size > 1000
    curve = json.loads((tmp_path / "certified_accuracy.json").read_text())
    assert curve["certified_accuracy"] == evaluation.curve()["certified_accuracy"]
    assert "40 Adam steps" in card.text
    assert torch.equal(torch.tensor(curve["radius"]), torch.tensor(evaluation.curve()["radius"]))
