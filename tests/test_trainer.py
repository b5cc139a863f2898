"""GloRoTrainer: schedules inside the trainer, certified metrics, convergence before eval/save, checkpoints,
best-checkpoint selection on validation, resume-after-kill equivalence."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, EvalPrediction

import hf_gloro
from gloro_helpers import model_snapshot, tiny_arguments, tiny_model, tiny_trainer
from hf_gloro.trainer import CertifiedMetricsCSVCallback, GloRoTrainer, collate_pixels

HELPERS = pathlib.Path(__file__).with_name("gloro_helpers.py")


def test_certified_metrics_hand_case(tmp_path):
    trainer = tiny_trainer(str(tmp_path), extra_eval_radii=[0.4])
    trainer._last_certification = {"lipschitz_constant": 2.0, "lipschitz_estimate": 1.9}
    # (prediction, radius) rows; labels [0, 1, 1, 1]; ε = 0.3
    summary = np.array([[0, 0.5], [1, 0.1], [2, np.inf], [1, 0.35]])
    metrics = trainer.compute_metrics(EvalPrediction(predictions=summary, label_ids=np.array([0, 1, 1, 1])))
    assert metrics["clean_accuracy"] == 0.75
    assert metrics["vra"] == 0.5  # rows 0 and 3: correct and radius > 0.3
    assert metrics["rejection_rate"] == 0.25  # row 1
    assert metrics["vra@0.4"] == 0.25  # row 0 only
    assert metrics["median_certified_radius"] == pytest.approx(0.225)  # median of [0.5, 0.1, 0, 0.35]
    assert metrics["epsilon"] == 0.3 and metrics["lipschitz_constant"] == 2.0
    # The `evaluate` metric module gives the trainer's numbers on the same predictions.
    import evaluate
    from hf_gloro.metrics import CERTIFIED_ACCURACY

    module = evaluate.load(CERTIFIED_ACCURACY)
    for start in (0, 2):  # batches, as an evaluation loop would add them
        module.add_batch(predictions=summary[start:start + 2, 0].astype(int), references=[0, 1, 1, 1][start:start + 2],
                         certified_radii=summary[start:start + 2, 1])
    from_module = module.compute(epsilon=0.3, extra_radii=[0.4])
    assert from_module == {key: metrics[key] for key in from_module}
    assert set(from_module) == {"clean_accuracy", "vra", "rejection_rate", "median_certified_radius", "vra@0.4"}
    with pytest.raises(ValueError, match="epsilon"):
        module.compute(predictions=[0], references=[0], certified_radii=[1.0])


def test_schedules_drive_the_training_epsilon(tmp_path):
    trainer = tiny_trainer(str(tmp_path), trades_lambda=2.0, trades_lambda_schedule="linear",
                           trades_lambda_start_fraction=0.0, gloro_loss="trades")
    trainer.state.max_steps = 100
    trainer.state.global_step = 0
    assert trainer.current_training_epsilon() == pytest.approx(1.5 * 0.3 * 0.1)
    assert trainer.current_trades_lambda() == 0.0
    trainer.state.global_step = 25
    assert trainer.current_training_epsilon() == pytest.approx(1.5 * 0.3 * (0.1 + 0.9 * 0.5))
    assert trainer.current_trades_lambda() == pytest.approx(0.5)
    trainer.state.global_step = 80
    assert trainer.current_training_epsilon() == pytest.approx(0.45)
    assert trainer.model.config.epsilon == 0.3  # the certifying ε is untouched


def test_training_forward_uses_scheduled_epsilon(tmp_path):
    trainer = tiny_trainer(str(tmp_path))
    trainer.state.max_steps, trainer.state.global_step = 100, 0
    batch = collate_pixels([trainer.train_dataset[i] for i in range(8)])
    model = trainer.model.train()
    start = model_snapshot(model)
    loss = trainer.compute_loss(model, batch)
    model.load_state_dict(start)  # same power-iteration start → same estimate
    small = model(batch["pixel_values"], epsilon=0.045).gloro_logits
    expected = torch.nn.functional.cross_entropy(small, batch["labels"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    trainer.state.global_step = 100  # end of training: 1.5 ε
    assert trainer.compute_loss(model, batch).item() > loss.item()


def test_lr_decay_after_half(tmp_path):
    trainer = tiny_trainer(str(tmp_path), lr_decay_after_half_to=3e-6, learning_rate=3e-3)
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert lrs[0] == lrs[50] == pytest.approx(3e-3)
    assert lrs[75] == pytest.approx(3e-3 * (1e-3) ** 0.5, rel=1e-6)
    assert lrs[99] == pytest.approx(3e-3 * (1e-3) ** (49 / 50), rel=1e-6)


@pytest.mark.parametrize("loss", ["gloro_ce", "trades", "emma", "margin"])
def test_every_loss_trains(tmp_path, loss):
    trainer = tiny_trainer(str(tmp_path), gloro_loss=loss, max_steps=3, eval_strategy="no", save_strategy="no",
                           load_best_model_at_end=False)
    before = model_snapshot(trainer.model)
    iterate_name = next(n for n in before if n.endswith("power_iterate"))
    trainer.train()
    after = model_snapshot(trainer.model)
    assert np.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert not torch.equal(before[iterate_name], after[iterate_name])  # power iterations ran in training


def test_training_run_metrics_checkpoints_and_saved_model(tmp_path):
    csv_path = tmp_path / "curve.csv"
    trainer = tiny_trainer(str(tmp_path / "run"), load_best_model_at_end=True, extra_eval_radii=[0.1],
                           callbacks=[CertifiedMetricsCSVCallback(str(csv_path))])
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_vra" in entry]
    assert len(evals) == 3
    for entry in evals:
        for key in ("eval_clean_accuracy", "eval_vra", "eval_vra@0.1", "eval_rejection_rate",
                    "eval_median_certified_radius", "eval_lipschitz_constant", "eval_lipschitz_estimate"):
            assert key in entry
        assert 0 <= entry["eval_vra"] <= entry["eval_clean_accuracy"] <= 1
        assert entry["eval_vra"] <= entry["eval_vra@0.1"]
        # The converged power-iteration estimate approaches the guaranteed bound from below.
        assert entry["eval_lipschitz_estimate"] <= entry["eval_lipschitz_constant"]
    # Best checkpoint chosen on the validation VRA (the first of equal maxima), and load_best_model_at_end
    # restored exactly its weights.
    best = max(evals, key=lambda e: e["eval_vra"])
    assert trainer.state.best_metric == best["eval_vra"]
    best_step = best["step"]
    assert os.path.basename(trainer.state.best_model_checkpoint) == f"checkpoint-{best_step}"
    saved = load_file(str(pathlib.Path(trainer.state.best_model_checkpoint) / "model.safetensors"))
    current = trainer.model.state_dict()
    parameters = [name for name, _ in trainer.model.named_parameters()]
    assert parameters and set(parameters) <= set(saved)
    for name in parameters:
        assert torch.equal(current[name], saved[name]), name
    if best_step != 12:  # and not the last weights, when the best checkpoint is an earlier one
        last = load_file(str(tmp_path / "run" / "checkpoint-12" / "model.safetensors"))
        assert any(not torch.equal(current[name], last[name]) for name in parameters)
    rows = csv_path.read_text().strip().splitlines()
    assert len(rows) == 4 and rows[0].startswith("elapsed_s,epoch,step")

    # Checkpoints hold the iterates, converged before saving, a config with ε and the guaranteed bound, and the
    # image processor (so every checkpoint works with pipeline(...)).
    checkpoint = tmp_path / "run" / "checkpoint-12"
    processor = json.loads((checkpoint / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "GloRoImageProcessor" and processor["num_channels"] == 1
    assert processor["size"] == {"height": 8, "width": 8} and processor["do_normalize"] is False
    weights = load_file(str(checkpoint / "model.safetensors"))
    assert any(name.endswith("power_iterate") for name in weights)
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["epsilon"] == 0.3 and config["lipschitz_constant"] > 0
    loaded = AutoModelForImageClassification.from_pretrained(str(checkpoint))
    assert isinstance(loaded, hf_gloro.GloRoForImageClassification)
    assert config["lipschitz_constant"] == pytest.approx(loaded.lipschitz_constant(), rel=1e-12)
    converged = loaded.converge_power_iterates()
    with torch.no_grad():
        one_more = float(loaded.lipschitz_estimate(iterations=0, update=False))
    assert one_more == pytest.approx(converged, rel=1e-4)

    # Final save: certifying ε (not the 1.5× training ε) and the bound of the final weights; the processor too.
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "preprocessor_config.json").is_file()
    final = AutoModelForImageClassification.from_pretrained(str(tmp_path / "final"))
    assert final.config.epsilon == 0.3
    assert final.config.lipschitz_constant == pytest.approx(trainer.model.lipschitz_constant(), rel=1e-12)
    pixels = torch.stack([trainer.eval_dataset[i]["pixel_values"] for i in range(16)])
    certificate = final.certify(pixels)
    torch.testing.assert_close(certificate.radius, trainer.model.certify(pixels).radius)


def test_evaluation_converges_iterates_first(tmp_path):
    trainer = tiny_trainer(str(tmp_path))
    model = trainer.model
    for name, buffer in model.named_buffers():
        if name.endswith("power_iterate"):
            buffer.copy_(torch.nn.functional.normalize(torch.ones_like(buffer).flatten(), dim=0).view_as(buffer))
    with torch.no_grad():
        cold = float(model.lipschitz_estimate(iterations=0, update=False))
    metrics = trainer.evaluate()
    assert metrics["eval_lipschitz_estimate"] > cold
    with torch.no_grad():
        after = float(model.lipschitz_estimate(iterations=0, update=False))
    assert after == pytest.approx(metrics["eval_lipschitz_estimate"], rel=1e-5)


def test_seeded_augmentation_is_a_function_of_seed_epoch_and_index():
    from hf_gloro.data import PIXELS_COLUMN, PixelsTransform

    image = np.zeros((1, 8, 8), dtype=np.uint8)
    image[0, 3, 2] = 255  # one bright pixel
    batch = {PIXELS_COLUMN: [image.tobytes()] * 64, "label": [0] * 64, "index": list(range(64))}
    transform = PixelsTransform(1, 8, crop_padding=2, horizontal_flip=True, seed=7)
    first = transform(batch)["pixel_values"]
    torch.manual_seed(123)  # the global generator plays no role
    torch.testing.assert_close(transform(batch)["pixel_values"], first)
    transform.set_epoch(1)
    assert not torch.equal(transform(batch)["pixel_values"], first)  # new epoch, new crops/flips
    transform.set_epoch(0)
    shuffled = {key: values[::-1] for key, values in batch.items()}
    torch.testing.assert_close(transform(shuffled)["pixel_values"], first.flip(0))  # keyed by index, not position
    # Every output is the pixel moved by a crop offset in [-2, 2] (and possibly mirrored); some images lose it.
    positions = [tuple(torch.nonzero(image[0]).tolist()[0]) for image in first if image.sum() > 0]
    assert len(positions) > 32
    assert all(1 <= r <= 5 and (0 <= c <= 4 or 3 <= c <= 7) for r, c in positions)
    assert len(set(positions)) > 5
    with pytest.raises(KeyError, match="index"):
        transform({PIXELS_COLUMN: batch[PIXELS_COLUMN], "label": batch["label"]})


def test_arguments_defaults_and_validation(tmp_path):
    args = tiny_arguments(str(tmp_path))
    assert args.remove_unused_columns is False and args.ddp_find_unused_parameters is False
    assert args.label_names == ["labels"] and args.metric_for_best_model == "vra" and args.greater_is_better
    with pytest.raises(ValueError):
        tiny_arguments(str(tmp_path), gloro_loss="hinge")
    with pytest.raises(ValueError):
        tiny_arguments(str(tmp_path), epsilon_schedule="cosine")
    with pytest.raises(ValueError):
        tiny_arguments(str(tmp_path), train_epsilon_multiplier=0)


def _run(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(HELPERS), *args], env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    result = _run("resume", str(straight))
    assert result.returncode == 0, result.stderr[-3000:]
    result = _run("resume", str(killed), "--kill-at", "6")
    assert result.returncode == -9, result.stderr[-3000:]  # SIGKILL after step 6; last checkpoint: step 4
    assert (killed / "checkpoint-4").is_dir() and not (killed / "checkpoint-8").exists()
    assert not (killed / "final.pt").exists()
    result = _run("resume", str(killed), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]

    a = torch.load(straight / "final.pt", weights_only=False)
    b = torch.load(killed / "final.pt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 12
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name in a["state_dict"]:  # weights *and* power iterates
        torch.testing.assert_close(a["state_dict"][name], b["state_dict"][name], rtol=1e-5, atol=1e-6, msg=name)
    for key in ("eval_vra", "eval_clean_accuracy", "eval_rejection_rate", "eval_median_certified_radius"):
        assert a["metrics"][key] == pytest.approx(b["metrics"][key], abs=1e-9), key
    assert a["metrics"]["eval_lipschitz_constant"] == pytest.approx(b["metrics"]["eval_lipschitz_constant"], rel=1e-6)
    assert os.path.basename(a["best_checkpoint"]) == os.path.basename(b["best_checkpoint"])
    assert a["metrics"]["eval_clean_accuracy"] > 0.2  # the run actually learned (not a trivial comparison)
    # The resumed part of the history (steps 8, 12) matches too.
    losses_a = [e["loss"] for e in a["log_history"] if "loss" in e and e["step"] > 4]
    losses_b = [e["loss"] for e in b["log_history"] if "loss" in e and e["step"] > 4]
    assert losses_a == pytest.approx(losses_b, rel=1e-5)


def test_collator_accepts_label_and_labels():
    examples = [{"pixel_values": torch.zeros(1, 8, 8), "label": 3}, {"pixel_values": torch.ones(1, 8, 8), "label": 5}]
    batch = collate_pixels(examples)
    assert batch["labels"].tolist() == [3, 5] and batch["pixel_values"].shape == (2, 1, 8, 8)
    renamed = [{"pixel_values": e["pixel_values"], "labels": e["label"]} for e in examples]
    assert collate_pixels(renamed)["labels"].tolist() == [3, 5]
    with pytest.raises(KeyError, match="'labels' or 'label'"):
        collate_pixels([{"pixel_values": torch.zeros(1, 8, 8)}])


def test_tutorial_style_script_with_a_label_column_trains(tmp_path):
    """As in the transformers image-classification tutorial: an `image` + `label` dataset, the image processor
    in a `with_transform`, no custom collator."""
    from datasets import ClassLabel, Dataset, Features, Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [np.round(image * 255 / 16).astype(np.uint8) for image in digits.images[:128]]
    dataset = Dataset.from_dict({"image": images, "label": digits.target[:128].tolist()},
                                features=Features({"image": Image(), "label": ClassLabel(names=list("0123456789"))}))
    model = tiny_model()
    processor = hf_gloro.image_processing.image_processor_for_config(model.config)

    def transforms(examples):
        examples["pixel_values"] = [processor(image, return_tensors="pt")["pixel_values"][0]
                                    for image in examples["image"]]
        del examples["image"]
        return examples

    dataset = dataset.with_transform(transforms)
    args = tiny_arguments(str(tmp_path), max_steps=2, eval_strategy="no", save_strategy="no",
                          load_best_model_at_end=False)
    trainer = GloRoTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset)
    before = model.head.weight.detach().clone()
    trainer.train()
    assert trainer.state.global_step == 2 and not torch.equal(before, model.head.weight)
    metrics = trainer.evaluate()
    assert 0 <= metrics["eval_vra"] <= metrics["eval_clean_accuracy"] <= 1


def test_bf16_evaluation_reports_the_full_precision_vra(tmp_path, monkeypatch):
    """Certificates are never computed under autocast: a bf16 evaluation certifies in full precision and
    reports exactly the fp32 evaluation's figures for the same weights."""
    import hf_gloro.trainer as trainer_module

    exact_calls = []
    original = trainer_module.certify_exactly
    monkeypatch.setattr(trainer_module, "certify_exactly",
                        lambda *args, **kwargs: exact_calls.append(1) or original(*args, **kwargs))
    fp32 = tiny_trainer(str(tmp_path / "fp32"), max_steps=4)
    fp32.train()
    weights = model_snapshot(fp32.model)
    reference = fp32.evaluate()
    assert not exact_calls  # fp32: the eval-mode forward's own certificate
    model = tiny_model()
    model.load_state_dict(weights)
    bf16 = tiny_trainer(str(tmp_path / "bf16"), model=model, bf16=True)
    assert bf16.accelerator.mixed_precision == "bf16"
    metrics = bf16.evaluate()
    assert exact_calls  # the forward ran under autocast: certified again in full precision
    for key in ("eval_clean_accuracy", "eval_vra", "eval_rejection_rate", "eval_median_certified_radius",
                "eval_lipschitz_constant"):
        assert metrics[key] == reference[key], key
    assert 0 < reference["eval_clean_accuracy"]  # a trained model: the comparison is not between two zeros


def test_augmentation_epoch_follows_the_training_epoch(tmp_path):
    """The epoch callback (no private Trainer method overridden) tells the seeded augmentation each epoch."""
    from transformers import TrainerCallback

    seen = {}

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            transform = trainer.train_dataset.format["format_kwargs"]["transform"]
            seen[state.global_step + 1] = transform.epoch

    trainer = tiny_trainer(str(tmp_path), augment=True, max_steps=12, eval_strategy="no", save_strategy="no",
                           load_best_model_at_end=False, callbacks=[Record()])
    trainer.train()
    steps_per_epoch = len(trainer.get_train_dataloader())  # 256 images / 32 = 8
    assert steps_per_epoch == 8
    assert seen == {step: (step - 1) // steps_per_epoch for step in range(1, 13)}
